//! The REST API over a real port: a real `removebgd serve` (u2netp), its SQLite file, real
//! images, and a loopback image server for URLs.

mod common;
mod daemon;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::*;
use daemon::*;
use serde_json::{Value, json};

const ALLOW_LOOPBACK: [&str; 2] = ["--fetch-allow", "127.0.0.0/8"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_base64_returns_the_documented_fields_and_a_working_result_url() {
    let d = Daemon::start(5, &[]).await;
    let key = d.key("shop", ALL_SCOPES);
    let input = read(fixture("chelsea.jpg"));
    let (status, headers, v) = d
        .post_json(
            "/v1/removebg/process",
            &key,
            &json!({"image_base64": b64(&input), "output_format": "png"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(headers["x-credits-charged"], "1");
    assert!(headers.contains_key("x-request-id"));
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("rbg_") && id.len() >= 36, "{id}");
    assert_eq!(v["result_base64"], Value::Null);
    assert_eq!((v["width"].as_u64(), v["height"].as_u64()), (Some(451), Some(300)));
    assert_eq!(v["credits_used"], 1);
    let expires = v["expires_at"].as_str().unwrap();
    assert!(expires.len() == 20 && expires.ends_with('Z'), "{expires}");
    let url = v["result_url"].as_str().unwrap();
    assert_eq!(url, d.url(&format!("/v1/removebg/results/{id}.png")));

    // The result needs no key and is the cutout the engine makes.
    let r = d.client.get(url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "image/png");
    let png = r.bytes().await.unwrap();
    let (w, h, alpha) = alpha_of(&png);
    assert_eq!((w, h), (451, 300));
    let direct = u2netp().cut(&input, &Default::default()).unwrap();
    assert!(mad(&alpha, &alpha_of(&direct.bytes).2) < 0.01);

    let (_, _, q) = d.get("/v1/removebg/quota", &key).await;
    assert_eq!(
        (q["credits_used"].as_i64(), q["credits_remaining"].as_i64()),
        (Some(1), Some(4))
    );
    assert_eq!(d.credits("shop"), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_options_preview_webp_colour_base64_and_multipart() {
    let d = Daemon::start(10, &[]).await;
    let key = d.key("shop", "removebg:images:process");
    let input = read(images().join("rocket.jpg"));

    let (status, _, v) = d
        .post_json(
            "/v1/removebg/process",
            &key,
            &json!({"image_base64": b64(&input), "output_format": "webp", "output_size": "preview",
                    "bg_color": "#00ff00", "return_base64": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (w, h) = (v["width"].as_u64().unwrap(), v["height"].as_u64().unwrap());
    assert!(w * h <= 250_000 && w * h > 240_000, "{w}x{h}");
    use base64::Engine as _;
    let inline = base64::engine::general_purpose::STANDARD
        .decode(v["result_base64"].as_str().unwrap())
        .unwrap();
    let served = d.client.get(v["result_url"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(served.headers()["content-type"], "image/webp");
    assert_eq!(served.bytes().await.unwrap().as_ref(), inline.as_slice());
    let img = image::load_from_memory(&inline).unwrap().into_rgba8();
    assert!(
        img.pixels().all(|p| p[3] == 255),
        "an opaque bg_color gives an opaque image"
    );

    // multipart/form-data with an image_file part, as remove.bg clients send it.
    let boundary = "XbOuNdArY";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"output_size\"\r\n\r\npreview\r\n--{boundary}\r\n\
             Content-Disposition: form-data; name=\"image_file\"; filename=\"c.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&input);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let r = d
        .client
        .post(d.url("/v1/removebg/process"))
        .header("X-Api-Key", &key)
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, _, v) = split(r).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["width"].as_u64().unwrap() < 640);
    assert_eq!(d.credits("shop"), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_by_url_fetches_from_an_allowed_lan_server_and_refuses_loopback_by_default() {
    let images = image_server().await;
    let allowed = Daemon::start(5, &ALLOW_LOOPBACK).await;
    let key = allowed.key("shop", ALL_SCOPES);
    let url = format!("http://{images}/img/rocket.jpg");
    let (status, _, v) = allowed
        .post_json("/v1/removebg/process", &key, &json!({"image_url": url}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (w, h) = image::image_dimensions(common::images().join("rocket.jpg")).unwrap();
    assert_eq!(
        (v["width"].as_u64(), v["height"].as_u64()),
        (Some(w as u64), Some(h as u64))
    );

    let strict = Daemon::start(5, &[]).await;
    let key = strict.key("shop", ALL_SCOPES);
    let (status, headers, v) = strict
        .post_json("/v1/removebg/process", &key, &json!({"image_url": url}))
        .await;
    assert_eq!(
        error_code(status, &headers, &v, StatusCode::UNPROCESSABLE_ENTITY),
        "address_refused"
    );
    assert!(v["error"]["message"].as_str().unwrap().contains("127.0.0.1"), "{v}");
    assert_eq!(strict.credits("shop"), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_in_the_table_has_the_documented_status_and_charges_nothing() {
    let images = image_server().await;
    let d = Daemon::start(3, &ALLOW_LOOPBACK).await;
    let key = d.key("shop", ALL_SCOPES);
    let img = b64(&read(fixture("chelsea.jpg")));
    let p = "/v1/removebg/process";

    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (json!({}), StatusCode::BAD_REQUEST, "missing_image"),
        (
            json!({"image_url": "http://x/a.jpg", "image_base64": img}),
            StatusCode::BAD_REQUEST,
            "ambiguous_image",
        ),
        (
            json!({"image_base64": img, "output_format": "gif"}),
            StatusCode::BAD_REQUEST,
            "invalid_output_format",
        ),
        (
            json!({"image_base64": img, "output_size": "huge"}),
            StatusCode::BAD_REQUEST,
            "invalid_output_size",
        ),
        (
            json!({"image_base64": img, "bg_color": "blue-ish"}),
            StatusCode::BAD_REQUEST,
            "invalid_bg_color",
        ),
        (
            json!({"image_base64": "%%%"}),
            StatusCode::BAD_REQUEST,
            "invalid_base64",
        ),
        (
            json!({"image_base64": b64(b"GIF89a not really")}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unsupported_format",
        ),
        (
            json!({"image_base64": b64(&read(fixture("chelsea.jpg"))[..20_000])}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "corrupt_image",
        ),
        (
            json!({"image_url": format!("http://{images}/img/missing.jpg")}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "fetch_status",
        ),
        (
            json!({"image_url": format!("http://{images}/page.html")}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_an_image",
        ),
        (
            json!({"image_url": "ftp://example.org/a.jpg"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unsupported_scheme",
        ),
        (
            json!({"image_base64": "A".repeat(14_500_000)}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];
    for (body, want, code) in cases {
        let (status, headers, v) = d.post_json(p, &key, &body).await;
        assert_eq!(
            error_code(status, &headers, &v, want),
            code,
            "{}",
            &body.to_string()[..body.to_string().len().min(120)]
        );
    }

    // Malformed JSON, a body over the limit and a wrong content type.
    let raw = |ct: &'static str, body: Vec<u8>| {
        d.client
            .post(d.url(p))
            .bearer_auth(&key)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let (s, h, v) = split(raw("application/json", b"{\"image_url\": ".to_vec()).await.unwrap()).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::BAD_REQUEST), "malformed_json");
    // A declared body over the limit is answered before it is sent (a client streaming it
    // would see the connection close), so speak raw HTTP here.
    let (s, v) = raw_http(
        d.addr,
        &format!(
            "POST {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            16 * 1024 * 1024
        ),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{v}"
    );
    let (s, h, v) = split(raw("text/plain", b"hello".to_vec()).await.unwrap()).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::BAD_REQUEST), "unsupported_media_type");

    // Batch: too many images, bad URL; unknown batch; unknown route and method.
    let many: Vec<Value> = (0..101)
        .map(|i| json!({"url": format!("http://{images}/img/{i}.jpg")}))
        .collect();
    let (s, h, v) = d.post_json("/v1/removebg/batch", &key, &json!({"images": many})).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::BAD_REQUEST), "too_many_images");
    let (s, h, v) = d
        .post_json("/v1/removebg/batch", &key, &json!({"images": [{"url": "nope"}]}))
        .await;
    assert_eq!(error_code(s, &h, &v, StatusCode::BAD_REQUEST), "invalid_url");
    let (s, h, v) = d.get("/v1/removebg/batch/batch_doesnotexist", &key).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::NOT_FOUND), "batch_not_found");
    let (s, h, v) = d.get("/v1/removebg/nothing", &key).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::NOT_FOUND), "not_found");
    let (s, h, v) = d.get("/v1/removebg/process", &key).await;
    assert_eq!(
        error_code(s, &h, &v, StatusCode::METHOD_NOT_ALLOWED),
        "method_not_allowed"
    );
    let (s, h, v) = split(
        d.client
            .get(d.url("/v1/removebg/results/rbg_0000.png"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(error_code(s, &h, &v, StatusCode::NOT_FOUND), "result_not_found");

    // 500: the results directory is broken; the failure says nothing internal and costs nothing.
    let results = d.data().join("results");
    std::fs::remove_dir_all(&results).unwrap();
    std::fs::write(&results, b"not a directory").unwrap();
    let (s, h, v) = d.post_json(p, &key, &json!({"image_base64": img})).await;
    assert_eq!(
        error_code(s, &h, &v, StatusCode::INTERNAL_SERVER_ERROR),
        "internal_error"
    );
    assert!(!v["error"]["message"].as_str().unwrap().contains("results"), "{v}");
    std::fs::remove_file(&results).unwrap();
    std::fs::create_dir(&results).unwrap();

    assert_eq!(d.credits("shop"), (0, 0), "no failure was charged");
    let jobs = d.store().queued_jobs().unwrap();
    assert_eq!(jobs, 0);

    // 402: spend the three credits, then the fourth is refused before any work.
    for _ in 0..3 {
        let (s, _, v) = d
            .post_json(p, &key, &json!({"image_base64": img, "output_size": "preview"}))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, h, v) = d.post_json(p, &key, &json!({"image_base64": img})).await;
    assert_eq!(
        error_code(s, &h, &v, StatusCode::PAYMENT_REQUIRED),
        "insufficient_credits"
    );
    let (s, h, v) = d
        .post_json(
            "/v1/removebg/batch",
            &key,
            &json!({"images": [{"url": format!("http://{images}/img/rocket.jpg")}]}),
        )
        .await;
    assert_eq!(
        error_code(s, &h, &v, StatusCode::PAYMENT_REQUIRED),
        "insufficient_credits"
    );
    assert_eq!(d.credits("shop"), (3, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_missing_unknown_revoked_expired_get_401_and_missing_scopes_403() {
    let d = Daemon::start(5, &[]).await;
    let quota = "/v1/removebg/quota";
    let r = d.client.get(d.url(quota)).send().await.unwrap();
    let (s, h, v) = split(r).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::UNAUTHORIZED), "missing_api_key");
    let (s, h, v) = d.get(quota, "xbk_live_0123456789abcdef0123456789abcdef01234567").await;
    assert_eq!(error_code(s, &h, &v, StatusCode::UNAUTHORIZED), "invalid_api_key");

    let revoked = d.key("shop", ALL_SCOPES);
    assert_eq!(d.get(quota, &revoked).await.0, StatusCode::OK);
    d.admin(&["keys", "revoke", &revoked[..17]]);
    let (s, h, v) = d.get(quota, &revoked).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::UNAUTHORIZED), "revoked_api_key");

    let out = d.admin(&[
        "keys",
        "create",
        "--account",
        "shop",
        "--scopes",
        ALL_SCOPES,
        "--expires-in",
        "1s",
    ]);
    let expiring = out.lines().last().unwrap().trim().to_owned();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (s, h, v) = d.get(quota, &expiring).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::UNAUTHORIZED), "expired_api_key");

    let img = b64(&read(fixture("chelsea.jpg")));
    let all: Vec<&str> = ALL_SCOPES.split(',').collect();
    let without = |scope: &str| {
        d.key(
            "shop",
            &all.iter()
                .filter(|s| **s != scope)
                .copied()
                .collect::<Vec<_>>()
                .join(","),
        )
    };
    let k = without("removebg:images:process");
    let (s, h, v) = d
        .post_json("/v1/removebg/process", &k, &json!({"image_base64": img}))
        .await;
    assert_eq!(error_code(s, &h, &v, StatusCode::FORBIDDEN), "missing_scope");
    let batch = json!({"images": [{"url": "http://10.0.0.1/a.jpg"}]});
    let (s, h, v) = d.post_json("/v1/removebg/batch", &k, &batch).await;
    assert_eq!(
        error_code(s, &h, &v, StatusCode::FORBIDDEN),
        "missing_scope",
        "batch needs process too"
    );
    let k = without("removebg:batch:write");
    let (s, h, v) = d.post_json("/v1/removebg/batch", &k, &batch).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::FORBIDDEN), "missing_scope");
    let k = without("removebg:batch:read");
    let (s, h, v) = d.get("/v1/removebg/batch/batch_x", &k).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::FORBIDDEN), "missing_scope");
    let k = without("removebg:quota:read");
    let (s, h, v) = d.get(quota, &k).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::FORBIDDEN), "missing_scope");
    assert_eq!(d.credits("shop"), (0, 0));

    // Listings never show a key.
    let listing = d.admin(&["keys", "list"]);
    assert!(
        !listing.contains(&revoked) && listing.contains(&revoked[..17]),
        "{listing}"
    );
}

/// A daemon whose memory limit leaves room for about one megapixel refuses a bigger photo with
/// 422 `image_too_large` and charges nothing, still serves one that fits, and shows the bound
/// on /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_photo_over_the_memory_limit_is_refused_and_charges_nothing() {
    // 1 MB does not even hold the model: images get the 10 MB floor, 1 MP of JPEG to PNG (and
    // no room for the edge refinement's working planes, which the photo that fits would need:
    // tests/inputs.rs counts those).
    let d = Daemon::start(5, &["--memory-limit-mb", "1", "--refine", "off"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let big =
        image::open(fixture("chelsea.jpg"))
            .unwrap()
            .resize_exact(1400, 1000, image::imageops::FilterType::Triangle);
    let mut jpeg = Vec::new();
    big.write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
        .unwrap();
    let p = "/v1/removebg/process";
    let (s, h, v) = d.post_json(p, &key, &json!({"image_base64": b64(&jpeg)})).await;
    assert_eq!(
        error_code(s, &h, &v, StatusCode::UNPROCESSABLE_ENTITY),
        "image_too_large"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("memory limit allows at most 1000000"),
        "{v}"
    );
    assert_eq!(d.credits("shop"), (0, 0), "the refusal was charged");

    let small = b64(&read(fixture("chelsea.jpg")));
    let (s, _, v) = d.post_json(p, &key, &json!({"image_base64": small})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let metrics = d.metrics().await;
    assert!(
        metrics.contains("removebgd_image_memory_limit_bytes 10000000\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("removebgd_image_memory_reserved_bytes 0\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_on_ten_credits_charge_exactly_ten() {
    let d = Daemon::start(10, &["--workers", "2", "--rate-limit", "1000", "--rate-burst", "1000"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let body = json!({"image_base64": b64(&read(fixture("chelsea.jpg"))), "output_size": "preview"});
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (client, url, key, body) = (
                d.client.clone(),
                d.url("/v1/removebg/process"),
                key.clone(),
                body.clone(),
            );
            tokio::spawn(async move {
                let r = client
                    .post(url)
                    .bearer_auth(key)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap();
                r.status()
            })
        })
        .collect();
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::PAYMENT_REQUIRED => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, refused), (10, 40));
    assert_eq!(d.credits("shop"), (10, 0));
}

/// Sends `head` on a fresh connection and returns the status and JSON body of the answer.
async fn raw_http(addr: std::net::SocketAddr, head: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (status, body) = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk))
            .await
            .expect("an answer")
            .unwrap();
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len || n == 0 {
                break (
                    head.split_whitespace().nth(1).unwrap().parse().unwrap(),
                    body[..len.min(body.len())].to_owned(),
                );
            }
        }
        assert!(n > 0, "connection closed early: {text}");
    };
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn poll_until_done(d: &Daemon, key: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (s, _, v) = d.get(&format!("/v1/removebg/batch/{id}"), key).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        if v["status"] != "processing" {
            return v;
        }
        assert!(Instant::now() < deadline, "batch never finished: {v}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_runs_its_items_in_order_reports_failures_and_settles_credits() {
    let images = image_server().await;
    let d = Daemon::start(
        10,
        &[
            "--fetch-allow",
            "127.0.0.0/8",
            "--batch-poll-interval",
            "0",
            "--workers",
            "2",
        ],
    )
    .await;
    let key = d.key("shop", ALL_SCOPES);
    let body = json!({
        "images": [
            {"url": format!("http://{images}/img/rocket.jpg"), "id": "prod_001"},
            {"url": format!("http://{images}/img/chelsea.jpg"), "id": "prod_002"},
            {"url": format!("http://{images}/img/gone.jpg"), "id": "prod_003"},
            {"url": format!("http://{images}/img/coffee.png")}
        ],
        "output_format": "png"
    });
    let (s, _, v) = d.post_json("/v1/removebg/batch", &key, &body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["job_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("batch_"));
    assert_eq!(v["status"], "processing");
    assert_eq!(
        (v["total"].as_i64(), v["credits_reserved"].as_i64()),
        (Some(4), Some(4))
    );
    assert_eq!((v["completed"].as_i64(), v["failed"].as_i64()), (Some(0), Some(0)));
    assert!(v["created_at"].as_str().unwrap().ends_with('Z'));

    let v = poll_until_done(&d, &key, &id).await;
    assert_eq!(v["status"], "completed");
    assert_eq!(
        (
            v["completed"].as_i64(),
            v["failed"].as_i64(),
            v["credits_used"].as_i64()
        ),
        (Some(3), Some(1), Some(3))
    );
    let items = v["items"].as_array().unwrap();
    let ids: Vec<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(&ids[..3], ["prod_001", "prod_002", "prod_003"]);
    assert!(ids[3].starts_with("rbg_"), "an item without id gets ours");
    assert_eq!(items[2]["status"], "failed");
    assert!(
        items[2]["error"].as_str().unwrap().contains("could not be fetched"),
        "{}",
        items[2]
    );
    for i in [0, 1, 3] {
        assert_eq!(items[i]["status"], "completed");
        let r = d
            .client
            .get(items[i]["result_url"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let (w, h, _) = alpha_of(&r.bytes().await.unwrap());
        assert_eq!(
            (Some(w as u64), Some(h as u64)),
            (items[i]["width"].as_u64(), items[i]["height"].as_u64())
        );
    }
    assert_eq!(d.credits("shop"), (3, 0));
}

/// A multipart/form-data body: (name, file name, bytes) parts; a part with a file name is a file.
fn form_body(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "----removebgd-test-7c0ffee";
    let mut body = Vec::new();
    for (name, filename, bytes) in parts {
        let file = filename.map(|f| format!("; filename=\"{f}\"")).unwrap_or_default();
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"{file}\r\n\r\n").as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn post_form(d: &Daemon, key: &str, parts: &[(&str, Option<&str>, &[u8])]) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let (ct, body) = form_body(parts);
    let r = d
        .client
        .post(d.url("/v1/removebg/batch"))
        .bearer_auth(key)
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    split(r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_uploaded_photos_runs_each_in_order_and_charges_the_ones_done() {
    let d = Daemon::start(5, &["--batch-poll-interval", "0", "--workers", "2"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let cat = read(fixture("chelsea.jpg"));
    let rotated = read(fixture("chelsea-exif6.jpg"));
    let inbox = d.data().join("inbox");

    // Refused forms charge nothing and leave nothing in the inbox.
    let (s, h, v) = post_form(&d, &key, &[("output_format", None, b"png")]).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::BAD_REQUEST), "no_images");
    let (s, h, v) = post_form(&d, &key, &[("image_file", Some("a.jpg"), &cat), ("colour", None, b"red")]).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::BAD_REQUEST), "invalid_request");
    assert!(v["error"]["message"].as_str().unwrap().contains("colour"), "{v}");
    let (s, h, v) = post_form(&d, &key, &[("image_file", Some("a.jpg"), &cat), ("output_format", None, b"gif")]).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::BAD_REQUEST), "invalid_output_format");
    let six: Vec<(&str, Option<&str>, &[u8])> = (0..6).map(|_| ("image_file", Some("c.jpg"), cat.as_slice())).collect();
    let (s, h, v) = post_form(&d, &key, &six).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::PAYMENT_REQUIRED), "insufficient_credits", "6 photos on 5 credits");
    // A part that is not an image at all refuses the batch, naming it.
    let (s, h, v) = post_form(
        &d,
        &key,
        &[("image_file", Some("a.jpg"), &cat), ("image_file", Some("notes.txt"), b"not a photo at all")],
    )
    .await;
    assert_eq!(error_code(s, &h, &v, StatusCode::UNPROCESSABLE_ENTITY), "unsupported_format");
    assert!(v["error"]["message"].as_str().unwrap().starts_with("image_file 1 (notes.txt): "), "{v}");
    assert_eq!(d.credits("shop"), (0, 0));
    assert_eq!(listing(&inbox), Vec::<String>::new(), "a refused batch leaves no upload behind");

    // Three photos, the middle one cut short (its header reads, its pixels do not); options
    // apply to all.
    let png = read(fixture("images/chelsea.png"));
    let truncated = &png[..png.len() / 2];
    let (s, _, v) = post_form(
        &d,
        &key,
        &[
            ("output_format", None, b"png"),
            ("image_file", Some("cat.jpg"), &cat),
            ("image_file", Some("cut-short.png"), truncated),
            ("image_file", Some("rotated.jpg"), &rotated),
            ("bg_color", None, b"ff0000"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!((v["total"].as_i64(), v["credits_reserved"].as_i64()), (Some(3), Some(3)));
    let id = v["job_id"].as_str().unwrap().to_owned();
    let v = poll_until_done(&d, &key, &id).await;
    assert_eq!(v["status"], "completed");
    assert_eq!(
        (v["completed"].as_i64(), v["failed"].as_i64(), v["credits_used"].as_i64()),
        (Some(2), Some(1), Some(2))
    );
    let items = v["items"].as_array().unwrap();
    let ids: Vec<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["cat.jpg", "cut-short.png", "rotated.jpg"], "items in the order sent, named by file");
    assert_eq!(items[1]["status"], "failed");
    assert_eq!(items[1]["error_code"], "corrupt_image", "{}", items[1]);
    let mut sizes = Vec::new();
    for i in [0, 2] {
        assert_eq!(items[i]["status"], "completed", "{}", items[i]);
        let r = d.client.get(items[i]["result_url"].as_str().unwrap()).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let png = image::load_from_memory(&r.bytes().await.unwrap()).unwrap().to_rgba8();
        assert!(png.pixels().all(|p| p[3] == 255), "bg_color filled every pixel");
        assert!(png.pixels().any(|p| p[0] > 200 && p[1] < 60 && p[2] < 60), "red background");
        sizes.push(png.dimensions());
    }
    assert_eq!(sizes[1], sizes[0], "the EXIF-rotated upload came out upright, like the plain one");
    assert_eq!(d.credits("shop"), (2, 0));
    // The runner deletes an upload just after recording its item.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listing(&inbox).is_empty() {
        assert!(Instant::now() < deadline, "uploads are deleted once their item ran: {:?}", listing(&inbox));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_then_restart_completes_every_item_with_exact_credits() {
    let images = image_server().await;
    let mut d = Daemon::start(25, &["--fetch-allow", "127.0.0.0/8", "--batch-poll-interval", "0"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let names = [
        "rocket.jpg",
        "coffee.png",
        "chelsea.png",
        "astronaut.png",
        "motorcycle_left.png",
    ];
    let images_json: Vec<Value> = (0..20)
        .map(|i| json!({"url": format!("http://{images}/img/{}", names[i % 5]), "id": format!("item{i}")}))
        .collect();
    let (s, _, v) = d
        .post_json("/v1/removebg/batch", &key, &json!({"images": images_json}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["job_id"].as_str().unwrap().to_owned();
    // Let a few items finish, then kill the process without warning.
    let deadline = Instant::now() + Duration::from_secs(120);
    let before = loop {
        let (_, _, v) = d.get(&format!("/v1/removebg/batch/{id}"), &key).await;
        if v["completed"].as_i64().unwrap() >= 3 {
            assert!(v["completed"].as_i64().unwrap() < 20, "too late to interrupt: {v}");
            break v;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    d.kill();
    let (used, reserved) = d.credits("shop");
    assert!(
        used >= 3 && used + reserved == 20,
        "{used} used, {reserved} reserved: {before}"
    );

    d.launch().await;
    let v = poll_until_done(&d, &key, &id).await;
    assert_eq!(
        (v["completed"].as_i64(), v["failed"].as_i64()),
        (Some(20), Some(0)),
        "{v}"
    );
    let items = v["items"].as_array().unwrap();
    assert!(
        items
            .iter()
            .enumerate()
            .all(|(i, it)| it["id"] == format!("item{i}") && it["status"] == "completed")
    );
    assert_eq!(d.credits("shop"), (20, 0));
    // Each item was recorded once: 20 charges in the ledger, 20 results.
    let store = d.store();
    assert_eq!(store.result_totals().unwrap().0, 20);
    let files = listing(&d.data().join("results"));
    assert_eq!(files.len(), 20, "no leftover or duplicate files: {files:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_expire_then_404_and_their_files_are_deleted() {
    let d = Daemon::start(5, &["--result-ttl", "2s", "--sweep-interval", "1s"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let (s, _, v) = d
        .post_json(
            "/v1/removebg/process",
            &key,
            &json!({"image_base64": b64(&read(fixture("chelsea.jpg"))), "output_size": "preview"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let url = v["result_url"].as_str().unwrap().to_owned();
    let file = d.data().join("results").join(url.rsplit('/').next().unwrap());
    assert!(file.is_file());
    assert_eq!(d.client.get(&url).send().await.unwrap().status(), StatusCode::OK);
    // Expired after 2 s; the sweeper runs every second. Generous deadlines, no fixed pause.
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.client.get(&url).send().await.unwrap().status() != StatusCode::NOT_FOUND {
        assert!(Instant::now() < deadline, "the result never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while file.exists() {
        assert!(Instant::now() < deadline, "the sweeper never deleted the file");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(d.store().result_totals().unwrap(), (0, 0), "and its row");
    assert_eq!(d.credits("shop"), (1, 0), "expiry does not refund");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_per_key_and_batch_polling_answer_429_with_retry_after() {
    let d = Daemon::start(5, &["--rate-limit", "0.5", "--rate-burst", "3"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let other = d.key("shop", ALL_SCOPES);
    for _ in 0..3 {
        assert_eq!(d.get("/v1/removebg/quota", &key).await.0, StatusCode::OK);
    }
    let (s, h, v) = d.get("/v1/removebg/quota", &key).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::TOO_MANY_REQUESTS), "rate_limited");
    // A token every 2 s: the next one is at most 2 s away (less if the three took a while).
    let wait: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    assert_eq!(
        d.get("/v1/removebg/quota", &other).await.0,
        StatusCode::OK,
        "another key is not limited"
    );
    // Retry-After is honest: waiting that long is enough.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(d.get("/v1/removebg/quota", &key).await.0, StatusCode::OK);

    let d = Daemon::start(5, &["--fetch-allow", "127.0.0.0/8"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let (_, _, v) = d
        .post_json(
            "/v1/removebg/batch",
            &key,
            &json!({"images": [{"url": "http://127.0.0.1:9/a.jpg"}]}),
        )
        .await;
    let path = format!("/v1/removebg/batch/{}", v["job_id"].as_str().unwrap());
    assert_eq!(d.get(&path, &key).await.0, StatusCode::OK);
    let (s, h, v) = d.get(&path, &key).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::TOO_MANY_REQUESTS), "rate_limited");
    let wait: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    // Retry-After is honest: waiting that long is enough.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(d.get(&path, &key).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_creates_a_default_account_and_prints_a_working_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = serve_cmd(dir.path());
    let (mut child, addr, log) = spawn_serve(cmd);
    let port = addr.port();
    let stdout = child.stdout.take().unwrap();
    let key = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map(|l| l.unwrap())
            .find_map(|l| {
                l.split_whitespace()
                    .find(|w| w.starts_with("xbk_live_"))
                    .map(str::to_owned)
            })
            .expect("the key is printed")
    })
    .await
    .unwrap();
    let client = client();
    let url = format!("http://127.0.0.1:{port}/v1/removebg/quota");
    let deadline = Instant::now() + Duration::from_secs(60);
    let v = loop {
        if let Ok(r) = client.get(&url).bearer_auth(&key).send().await {
            break split(r).await.2;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (v["plan"].as_str(), v["credits_total"].as_i64()),
        (Some("Local"), Some(10_000)),
        "{v}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(log.len() > 3, "the daemon logged at info level");
    assert!(
        !log.contains(&key) && !log.contains(&key[17..]),
        "the key is not logged"
    );
    // A second start on the same data directory creates nothing and prints no key.
    let (mut child, _, _) = spawn_serve(serve_cmd(dir.path()));
    child.kill().unwrap();
    child.wait().unwrap();
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut printed).unwrap();
    assert!(!printed.contains("xbk_live_"), "{printed}");
    let keys = bin().args(["keys", "list", "--data-dir"]).arg(dir.path().join("data")).output().unwrap();
    let keys = String::from_utf8(keys.stdout).unwrap();
    assert_eq!(keys.lines().filter(|l| l.starts_with("xbk_live_")).count(), 1, "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn return_base64_over_five_megabytes_falls_back_to_the_url() {
    let d = Daemon::start(5, &[]).await;
    let key = d.key("shop", ALL_SCOPES);
    let input = noise_jpeg(2000, 1500);
    assert!(input.len() < 10 * 1024 * 1024);
    let (s, h, v) = d
        .post_json(
            "/v1/removebg/process",
            &key,
            &json!({"image_base64": b64(&input), "return_base64": true}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["result_base64"], Value::Null);
    assert_eq!(h["x-result-base64"], "omitted-too-large");
    let r = d.client.get(v["result_url"].as_str().unwrap()).send().await.unwrap();
    let png = r.bytes().await.unwrap();
    assert!(png.len() > 5 * 1024 * 1024, "{} bytes", png.len());
    assert_eq!(alpha_of(&png).0, 2000);
    assert_eq!(d.credits("shop"), (1, 0), "the cutout was delivered and charged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monthly_reset_happens_on_time_without_any_request() {
    let d = Daemon::start(5, &["--sweep-interval", "1s"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let body = json!({"image_base64": b64(&read(fixture("chelsea.jpg")))});
    assert_eq!(d.post_json("/v1/removebg/process", &key, &body).await.0, StatusCode::OK);
    assert_eq!(d.credits("shop"), (1, 0));
    let db = rusqlite::Connection::open(d.data().join("removebgd.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    db.execute("UPDATE accounts SET resets_at = ?1 WHERE name = 'shop'", [now - 1])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.credits("shop") != (0, 0) {
        assert!(Instant::now() < deadline, "the sweeper never reset the period");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (resets_at, resets): (i64, i64) = db
        .query_row(
            "SELECT resets_at, (SELECT COUNT(*) FROM ledger WHERE kind = 'period_reset') FROM accounts WHERE name = 'shop'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(
        resets_at > now && resets_at - now <= 31 * 86_400,
        "next reset within a month"
    );
    assert_eq!(resets, 1);
    let (_, _, q) = d.get("/v1/removebg/quota", &key).await;
    assert_eq!(
        (q["credits_used"].as_i64(), q["credits_remaining"].as_i64()),
        (Some(0), Some(5))
    );
}

#[test]
fn admin_commands_manage_accounts_and_keys_and_refuse_nonsense() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| bin().args(args).arg("--data-dir").arg(dir.path()).output().unwrap();
    let o = run(&[
        "accounts",
        "create",
        "kiosk-3",
        "--plan",
        "Pro",
        "--credits",
        "10000",
        "--reset-day",
        "15",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["accounts", "set-credits", "kiosk-3", "20000", "--plan", "Max"]);
    assert!(o.status.success());
    let list = String::from_utf8(run(&["accounts", "list"]).stdout).unwrap();
    let row = list.lines().find(|l| l.starts_with("kiosk-3")).unwrap();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[1..6], ["Max", "20000", "0", "0", "20000"]);
    assert!(cols[6].contains("-15T00:00:00Z"), "{row}");

    let o = run(&[
        "keys",
        "create",
        "--account",
        "kiosk-3",
        "--scopes",
        "removebg:quota:read",
        "--expires-in",
        "30d",
    ]);
    assert!(o.status.success());
    let key = String::from_utf8(o.stdout).unwrap().lines().last().unwrap().to_owned();
    assert!(key.starts_with("xbk_live_") && key.len() == 49, "{key}");
    let keys = String::from_utf8(run(&["keys", "list"]).stdout).unwrap();
    assert!(keys.contains(&key[..17]) && !keys.contains(&key), "{keys}");

    for bad in [
        &[
            "keys",
            "create",
            "--account",
            "kiosk-3",
            "--scopes",
            "removebg:everything",
        ][..],
        &[
            "keys",
            "create",
            "--account",
            "nobody",
            "--scopes",
            "removebg:quota:read",
        ],
        &[
            "keys",
            "create",
            "--account",
            "kiosk-3",
            "--scopes",
            "removebg:quota:read",
            "--expires-in",
            "soon",
        ],
        &["accounts", "create", "kiosk-3", "--credits", "5"],
        &["accounts", "create", "x", "--credits", "5", "--reset-day", "31"],
        &["keys", "revoke", "xbk_live_zzzzzzzz"],
    ] {
        let o = run(bad);
        assert_eq!(o.status.code(), Some(2), "{bad:?} should fail");
        assert!(!String::from_utf8_lossy(&o.stderr).trim().is_empty());
    }
}


fn foreground_of(v: &Value) -> [u64; 4] {
    ["foreground_left", "foreground_top", "foreground_width", "foreground_height"]
        .map(|k| v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_extensions_crop_jpg_backgrounds_channels_and_the_foreground_box() {
    let images = image_server().await;
    let d = Daemon::start(20, &["--fetch-allow", "127.0.0.0/8", "--batch-poll-interval", "0"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let url = format!("http://{images}/img/chelsea.jpg");
    let process = |extra: Value| {
        let (d, key, url) = (&d, &key, &url);
        async move {
            let mut body = json!({"image_url": url, "return_base64": true});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            let (s, _, v) = d.post_json("/v1/removebg/process", key, &body).await;
            assert_eq!(s, StatusCode::OK, "{extra}: {v}");
            let bytes = {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.decode(v["result_base64"].as_str().unwrap()).unwrap()
            };
            (v, bytes)
        }
    };
    // The spec's fields keep their meaning: PNG, full size; the box comes with every result.
    let (v, png) = process(json!({})).await;
    assert!(v["result_url"].as_str().unwrap().ends_with(".png"));
    let (w, h, alpha) = alpha_of(&png);
    assert_eq!((w, h), (451, 300));
    let [x, y, bw, bh] = subject_box(&alpha, w).map(u64::from);
    assert_eq!(foreground_of(&v), [x, y, bw, bh]);

    // crop with a margin: the box plus the margin; the subject sits at the margin.
    let (v, png) = process(json!({"crop": true, "crop_margin": "12px"})).await;
    assert_eq!((v["width"].as_u64(), v["height"].as_u64()), (Some(bw + 24), Some(bh + 24)));
    assert_eq!(foreground_of(&v), [12, 12, bw, bh]);
    let (cw, _, calpha) = alpha_of(&png);
    let row = |a: &[u8], stride: u64, r: u64, from: u64| a[(r * stride + from) as usize..][..bw as usize].to_vec();
    assert_eq!(row(&calpha, cw as u64, 12 + bh / 2, 12), row(&alpha, w as u64, y + bh / 2, x));

    // jpg: opaque, served as image/jpeg; on a gradient from black at the left to white.
    let (v, jpg) = process(json!({"output_format": "jpg", "bg_gradient": "90deg, #000000, #ffffff"})).await;
    let url_jpg = v["result_url"].as_str().unwrap();
    assert!(url_jpg.ends_with(".jpg"), "{url_jpg}");
    let r = d.client.get(url_jpg).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "image/jpeg");
    let rgb = image::load_from_memory(&jpg).unwrap().into_rgb8();
    // Transparent pixels on the left edge are dark, on the right edge light.
    let edge = |col: u32| {
        (0..h)
            .filter(|&r| alpha[(r * w + col) as usize] == 0)
            .map(|r| rgb.get_pixel(col, r)[0] as u32)
            .next()
            .unwrap_or_else(|| panic!("no background pixel in column {col}"))
    };
    assert!(edge(w - 1) > 220, "right edge {}", edge(w - 1));
    let left_col = (0..w).find(|&c| (0..h).any(|r| alpha[(r * w + c) as usize] == 0)).unwrap();
    assert!(edge(left_col) < 60 + left_col * 255 / w, "left side {}", edge(left_col));

    // bg_image_url: a one-colour photo behind the subject; PNG stays the default format.
    let (_, png) = process(json!({"bg_image_url": format!("http://{images}/solid/0000ff.png")})).await;
    let rgba = image::load_from_memory(&png).unwrap().into_rgba8();
    let i = alpha.iter().position(|&a| a == 0).unwrap();
    assert_eq!(rgba.as_raw()[i * 4..i * 4 + 4], [0, 0, 255, 255]);

    // channels=alpha: the mask alone.
    let (_, mask) = process(json!({"channels": "alpha"})).await;
    let mask = image::load_from_memory(&mask).unwrap();
    assert!(matches!(mask.color(), image::ColorType::L8));
    assert_eq!(mask.into_luma8().into_raw(), alpha);

    // Refusals keep the native codes and cost nothing.
    let before = d.credits("shop");
    for (extra, code) in [
        (json!({"bg_gradient": "90deg, #fff"}), "invalid_bg_gradient"),
        (json!({"bg_color": "#fff", "bg_gradient": "#fff, #000"}), "multiple_bg_sources"),
        (json!({"channels": "rgb"}), "invalid_channels"),
        (json!({"crop": true, "crop_margin": "wide"}), "invalid_crop_margin"),
        (json!({"bg_image_url": "file:///etc/passwd"}), "invalid_bg_image_url"),
        (json!({"output_format": "zip"}), "invalid_output_format"),
    ] {
        let mut body = json!({"image_url": url});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (s, h, v) = d.post_json("/v1/removebg/process", &key, &body).await;
        assert_eq!(error_code(s, &h, &v, StatusCode::BAD_REQUEST), code, "{extra}");
    }
    assert_eq!(d.credits("shop"), before);

    // Batch items run from the queue with the same options, and report the box.
    let body = json!({"images": [{"url": url, "id": "a"}], "output_format": "jpg", "crop": true,
                      "crop_margin": "5px", "bg_gradient": "#ff0000, #0000ff"});
    let (s, _, v) = d.post_json("/v1/removebg/batch", &key, &body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let done = poll_until_done(&d, &key, v["job_id"].as_str().unwrap()).await;
    let item = &done["items"][0];
    assert_eq!(item["status"], "completed", "{done}");
    assert!(item["result_url"].as_str().unwrap().ends_with(".jpg"), "{item}");
    assert_eq!((item["width"].as_u64(), item["height"].as_u64()), (Some(bw + 10), Some(bh + 10)));
    assert_eq!(foreground_of(item), [5, 5, bw, bh]);
    let r = d.client.get(item["result_url"].as_str().unwrap()).send().await.unwrap();
    let img = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
    assert_eq!((img.width() as u64, img.height() as u64), (bw + 10, bh + 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_names_never_reach_outside_the_stored_results() {
    let d = Daemon::start(5, &[]).await;
    // Files that exist in and around the data directory.
    std::fs::write(d.data().join("results").join("planted.png"), b"not a result").unwrap();
    for name in [
        "removebgd.db",
        "planted.png",
        "..%2fremovebgd.db",
        "%2e%2e%2fremovebgd.db",
        "..%5cremovebgd.db",
        "%2fetc%2fpasswd",
        "rbg_x.png%00.png",
        "RBG_X.PNG",
        ".hidden",
    ] {
        let r = d.client.get(d.url(&format!("/v1/removebg/results/{name}"))).send().await.unwrap();
        let (s, h, v) = split(r).await;
        assert_eq!(error_code(s, &h, &v, StatusCode::NOT_FOUND), "result_not_found", "{name}");
    }
    // Paths that leave the route altogether are unknown routes.
    for path in ["/v1/removebg/results/../../removebgd.db", "/v1/removebg/results/a/b.png"] {
        let r = d.client.get(d.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
    }
}
