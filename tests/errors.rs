//! Every documented error code that a request can cause, caused by a real HTTP request to a
//! real daemon, in the documented shape, charging nothing; and the promises around failures
//! (a batch whose items all fail ends `failed`, each item carrying its code).

mod common;
mod daemon;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use daemon::*;
use serde_json::{Value, json};

const ALLOW_LOOPBACK: [&str; 2] = ["--fetch-allow", "127.0.0.0/8"];

/// Routes that misbehave in the ways the fetch errors name.
async fn hostile_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        // Redirects to itself forever.
        .route(
            "/loop.jpg",
            get(move || async move { axum::response::Redirect::temporary(&format!("http://{addr}/loop.jpg")) }),
        )
        // Never answers within the fetch deadline.
        .route(
            "/stall.jpg",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(120)).await;
                "late"
            }),
        )
        // A JPEG's first bytes, then 11 MiB: over the 10 MiB image limit.
        .route(
            "/huge.jpg",
            get(|| async {
                let mut body = vec![0xff, 0xd8, 0xff, 0xe0];
                body.resize(11 << 20, 0);
                ([(header::CONTENT_TYPE, "image/jpeg")], body).into_response()
            }),
        )
        // An image of no bytes.
        .route("/empty.png", get(|| async { ([(header::CONTENT_TYPE, "image/png")], Vec::<u8>::new()) }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A PNG of 10000 x 5100 pixels (51 MP, over the 50 MP limit) that is small on the wire.
fn png_51_megapixels() -> Vec<u8> {
    let img = image::GrayImage::new(10_000, 5_100);
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

async fn multipart(d: &Daemon, key: &str, content_type: &str, body: Vec<u8>) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let r = d
        .client
        .post(d.url("/v1/removebg/process"))
        .bearer_auth(key)
        .header(header::CONTENT_TYPE, content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    split(r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_documented_request_error_is_produced_in_the_documented_shape_and_charges_nothing() {
    let d = Daemon::start(5, &ALLOW_LOOPBACK).await;
    let key = d.key("shop", ALL_SCOPES);
    let bad = hostile_server().await;
    // A loopback port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let process = |body: Value| {
        let (d, key) = (&d, key.clone());
        async move { d.post_json("/v1/removebg/process", &key, &body).await }
    };
    let mut seen = Vec::new();
    let mut check = |name: &str, (s, h, v): (StatusCode, reqwest::header::HeaderMap, Value), want: StatusCode, code: &str| {
        assert_eq!(error_code(s, &h, &v, want), code, "{name}: {v}");
        seen.push(code.to_owned());
    };

    check("empty batch", d.post_json("/v1/removebg/batch", &key, &json!({"images": []})).await, StatusCode::BAD_REQUEST, "no_images");
    check(
        "multipart without a closing boundary",
        multipart(&d, &key, "multipart/form-data; boundary=XyZ", b"--XyZ\r\nContent-Disposition: form-data; name=\"image_url\"\r\n\r\nhttp://x".to_vec()).await,
        StatusCode::BAD_REQUEST,
        "invalid_multipart",
    );
    check(
        "unknown field",
        process(json!({"image_url": format!("http://{bad}/x.jpg"), "colour": "red"})).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    check(
        "image of no bytes",
        process(json!({"image_url": format!("http://{bad}/empty.png")})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "empty_image",
    );
    check(
        "redirect loop",
        process(json!({"image_url": format!("http://{bad}/loop.jpg")})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "too_many_redirects",
    );
    check(
        "nothing listening",
        process(json!({"image_url": format!("http://{closed}/x.jpg")})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "fetch_failed",
    );
    check(
        "download over 10 MiB",
        process(json!({"image_url": format!("http://{bad}/huge.jpg")})).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    check(
        "51 MP",
        process(json!({"image_base64": b64(&png_51_megapixels())})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "image_too_large",
    );
    // A batch body over 1 MiB (valid JSON: the size alone refuses it).
    let many: Vec<Value> = (0..100).map(|i| json!({"url": format!("http://{bad}/{i}.jpg"), "id": "x".repeat(200)})).collect();
    let mut big = json!({"images": many, "output_format": "png"}).to_string();
    big.insert_str(1, &format!("\"pad\":\"{}\",", " ".repeat(1 << 20)));
    let r = d
        .client
        .post(d.url("/v1/removebg/batch"))
        .bearer_auth(&key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    check("batch body over 1 MiB", split(r).await, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    // The fetch deadline is 30 s: the slowest case, last.
    let started = Instant::now();
    check(
        "server that never answers",
        process(json!({"image_url": format!("http://{bad}/stall.jpg")})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "fetch_timeout",
    );
    assert!(started.elapsed() < Duration::from_secs(100), "the fetch deadline holds");
    assert_eq!(d.credits("shop"), (0, 0), "no error costs anything: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_items_all_fail_ends_failed_with_each_items_code_and_its_credits_back() {
    let d = Daemon::start(5, &ALLOW_LOOPBACK).await;
    let key = d.key("shop", ALL_SCOPES);
    let bad = hostile_server().await;
    let img = image_server().await;
    let (s, _, v) = d
        .post_json(
            "/v1/removebg/batch",
            &key,
            &json!({"images": [
                {"url": format!("http://{bad}/loop.jpg"), "id": "loops"},
                {"url": format!("http://{bad}/empty.png"), "id": "empty"},
                {"url": format!("http://{img}/page.html"), "id": "html"},
            ]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    // The items may already have failed (and given their credits back) by now: nothing is spent.
    assert_eq!(d.credits("shop").0, 0, "nothing charged at submit");
    let id = v["job_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let v = loop {
        let (s, h, v) = d.get(&format!("/v1/removebg/batch/{id}"), &key).await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            let wait: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        assert_eq!(s, StatusCode::OK, "{v}");
        if v["status"] != "processing" {
            break v;
        }
        assert!(Instant::now() < deadline, "the batch never finished: {v}");
        tokio::time::sleep(Duration::from_millis(2100)).await;
    };
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!((v["completed"].as_u64(), v["failed"].as_u64(), v["credits_used"].as_u64()), (Some(0), Some(3), Some(0)), "{v}");
    let codes: Vec<(String, String)> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            assert_eq!(i["status"], "failed", "{i}");
            assert!(!i["error"].as_str().unwrap().is_empty(), "{i}");
            (i["id"].as_str().unwrap().to_owned(), i["error_code"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(
        codes,
        [
            ("loops".to_owned(), "too_many_redirects".to_owned()),
            ("empty".to_owned(), "empty_image".to_owned()),
            ("html".to_owned(), "not_an_image".to_owned())
        ]
    );
    assert_eq!(d.credits("shop"), (0, 0), "every credit released");
}
