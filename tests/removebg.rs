//! remove.bg's API v1.0 over a real port: a real `removebgd serve` (u2netp), its SQLite file,
//! real images, a loopback image server, every field, header and error path, and the ledger.

mod common;
mod daemon;

use std::io::Read;

use axum::http::StatusCode;
use common::*;
use daemon::*;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

const ALLOW_LOOPBACK: [&str; 2] = ["--fetch-allow", "127.0.0.0/8"];
const ENDPOINT: &str = "/v1.0/removebg";

enum Part<'a> {
    Text(&'a str),
    File(&'a [u8]),
}

/// A multipart/form-data body as remove.bg clients send it (fields, then files).
fn multipart(fields: &[(&str, Part)]) -> (String, Vec<u8>) {
    let boundary = "--------------------------1234567890abcdef";
    let mut body = Vec::new();
    for (name, part) in fields {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match part {
            Part::Text(v) => {
                body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{v}\r\n").as_bytes())
            }
            Part::File(bytes) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"photo\"\r\n\r\n").as_bytes(),
                );
                body.extend_from_slice(bytes);
                body.extend_from_slice(b"\r\n");
            }
        }
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
            .to_owned()
    }

    fn number(&self, name: &str) -> u32 {
        self.header(name).parse().unwrap()
    }

    /// The remove.bg error code, after checking the body's shape and the status.
    fn error(&self, want: StatusCode) -> String {
        let v = self.json();
        assert_eq!(self.status, want, "{v}");
        let e = &v["errors"][0];
        assert!(!e["title"].as_str().unwrap().is_empty(), "{v}");
        assert!(!e["detail"].as_str().unwrap().is_empty(), "{v}");
        assert_eq!(v["errors"].as_array().unwrap().len(), 1);
        e["code"].as_str().unwrap().to_owned()
    }

    /// The foreground box from the headers: left, top, width, height.
    fn foreground(&self) -> [u32; 4] {
        [
            self.number("x-foreground-left"),
            self.number("x-foreground-top"),
            self.number("x-foreground-width"),
            self.number("x-foreground-height"),
        ]
    }
}

async fn send(d: &Daemon, key: &str, content_type: &str, body: Vec<u8>, accept: Option<&str>) -> Reply {
    let mut req = d
        .client
        .post(d.url(ENDPOINT))
        .header("X-Api-Key", key)
        .header("content-type", content_type)
        .body(body);
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let r = req.send().await.unwrap();
    Reply {
        status: r.status(),
        headers: r.headers().clone(),
        body: r.bytes().await.unwrap().to_vec(),
    }
}

async fn form(d: &Daemon, key: &str, fields: &[(&str, Part<'_>)]) -> Reply {
    let (ct, body) = multipart(fields);
    send(d, key, &ct, body, None).await
}

async fn json_req(d: &Daemon, key: &str, body: Value, accept: Option<&str>) -> Reply {
    send(d, key, "application/json; charset=utf-8", body.to_string().into_bytes(), accept).await
}

async fn body_json(r: reqwest::Response) -> Value {
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

async fn json_to(d: &Daemon, path: &str, key: &str, body: Value) -> Reply {
    let r = d.client.post(d.url(path)).header("x-api-key", key).header("content-type", "application/json").body(body.to_string()).send().await.unwrap();
    Reply { status: r.status(), headers: r.headers().clone(), body: r.bytes().await.unwrap().to_vec() }
}

fn count(d: &Daemon, sql: &str) -> i64 {
    let db = rusqlite::Connection::open(d.data().join("removebgd.db")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    db.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn gray(encoded: &[u8]) -> image::GrayImage {
    let img = image::load_from_memory(encoded).unwrap();
    assert!(matches!(img.color(), image::ColorType::L8), "{:?}", img.color());
    img.into_luma8()
}

fn format_of(bytes: &[u8]) -> image::ImageFormat {
    image::guess_format(bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_by_default_with_every_header_and_one_credit() {
    let d = Daemon::start(5, &[]).await;
    let key = d.key("shop", ALL_SCOPES);
    let photo = read(fixture("chelsea.jpg"));
    let r = form(&d, &key, &[("size", Part::Text("full")), ("image_file", Part::File(&photo))]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    // format=auto: the cutout has transparency, so PNG.
    assert_eq!(r.header("content-type"), "image/png");
    assert_eq!(r.header("x-credits-charged"), "1");
    assert_eq!(r.header("x-type"), "other");
    let (w, h, alpha) = alpha_of(&r.body);
    assert_eq!((w, h), (451, 300));
    assert_eq!((r.number("x-width"), r.number("x-height")), (451, 300));
    assert_eq!(r.foreground(), subject_box(&alpha, w));
    assert!(r.foreground()[2] < 451, "the subject is narrower than the photo");
    assert!(r.number("x-ratelimit-limit") >= 1);
    assert!(r.number("x-ratelimit-remaining") <= r.number("x-ratelimit-limit"));
    let reset: i64 = r.header("x-ratelimit-reset").parse().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now - 5..now + 120).contains(&reset), "{reset} vs {now}");
    // The same engine as the native API.
    let direct = u2netp().cut(&photo, &Default::default()).unwrap();
    assert!(mad(&alpha, &alpha_of(&direct.bytes).2) < 0.01);
    assert_eq!(d.credits("shop"), (1, 0));

    // Without `size`: preview (0.25 MP) is the default; a 3 MP photo comes back small.
    let big = noise_jpeg(2000, 1500);
    let r = form(&d, &key, &[("image_file", Part::File(&big))]).await;
    assert_eq!(r.status, StatusCode::OK);
    let (w, h) = (r.number("x-width"), r.number("x-height"));
    assert!(w * h <= 250_000 && w * h > 240_000, "{w}x{h}");
    assert!((w as f64 / h as f64 - 4.0 / 3.0).abs() < 0.01, "aspect kept: {w}x{h}");
    let img = image::load_from_memory(&r.body).unwrap();
    assert_eq!((img.width(), img.height()), (w, h));
    // type_level=none: no X-Type.
    let r = form(
        &d,
        &key,
        &[("type_level", Part::Text("none")), ("type", Part::Text("product")), ("image_file", Part::File(&photo))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers.get("x-type").is_none());
    assert_eq!(d.credits("shop"), (3, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_mode_bodies_and_key_spellings() {
    let d = Daemon::start(10, &[]).await;
    let key = d.key("shop", ALL_SCOPES);
    let photo = read(fixture("chelsea.jpg"));
    // JSON body, JSON booleans and nulls, Accept: application/json, a Bearer key.
    let r = d
        .client
        .post(d.url(ENDPOINT))
        .bearer_auth(&key)
        .header("content-type", "Application/JSON; charset=utf-8")
        .header("accept", "application/json")
        .body(
            json!({"image_file_b64": b64(&photo), "size": "full", "crop": false, "add_shadow": true,
                   "semitransparency": false, "shadow_type": "drop", "shadow_opacity": 50, "bg_color": null})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/json");
    let headers = r.headers().clone();
    let v = body_json(r).await;
    let data = &v["data"];
    let png = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(data["result_b64"].as_str().unwrap())
            .unwrap()
    };
    let (w, _, alpha) = alpha_of(&png);
    let want = subject_box(&alpha, w);
    let got = ["foreground_left", "foreground_top", "foreground_width", "foreground_height"].map(|k| data[k].as_u64().unwrap() as u32);
    assert_eq!(got, want);
    assert_eq!(headers["x-foreground-width"].to_str().unwrap(), want[2].to_string());

    // Form-urlencoded base64, percent-encoded as the Python client sends it, and with the `+`
    // left raw (it arrives as a space) as a hand-written curl might.
    let encoded: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("image_file_b64", &b64(&photo))
        .append_pair("size", "regular")
        .finish();
    for body in [encoded.clone(), encoded.replace("%2B", "+")] {
        let r = send(&d, &key, "application/x-www-form-urlencoded", body.into_bytes(), Some("*/*")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(alpha_of(&r.body).2, alpha);
    }
    // Multipart booleans as strings; the key header in lower case.
    let (ct, body) = multipart(&[("crop", Part::Text("false")), ("size", Part::Text("full")), ("image_file", Part::File(&photo))]);
    let r = d
        .client
        .post(d.url(ENDPOINT))
        .header("x-api-key", &key)
        .header("content-type", ct)
        .header("accept", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(body_json(r).await["data"]["result_b64"].is_string());
    assert_eq!(d.credits("shop"), (4, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formats_channels_and_zip() {
    let d = Daemon::start(10, &[]).await;
    let key = d.key("shop", ALL_SCOPES);
    let photo = read(fixture("chelsea.jpg"));
    let cut = |extra: Vec<(&'static str, &'static str)>| {
        let (d, key, photo) = (&d, &key, &photo);
        async move {
            let mut fields: Vec<(&str, Part)> = extra.iter().map(|(k, v)| (*k, Part::Text(v))).collect();
            fields.push(("size", Part::Text("full")));
            fields.push(("image_file", Part::File(photo)));
            let r = form(d, key, &fields).await;
            assert_eq!(r.status, StatusCode::OK, "{extra:?}: {}", String::from_utf8_lossy(&r.body));
            r
        }
    };
    let png = cut(vec![("format", "png")]).await;
    let (_, _, alpha) = alpha_of(&png.body);

    // auto with an opaque background: nothing is transparent, so JPEG.
    let r = cut(vec![("bg_color", "81d4fa")]).await;
    assert_eq!((r.header("content-type").as_str(), format_of(&r.body)), ("image/jpeg", image::ImageFormat::Jpeg));
    // jpg without a background: opaque, on white.
    let r = cut(vec![("format", "jpg")]).await;
    let jpg = image::load_from_memory(&r.body).unwrap().into_rgb8();
    let i = alpha.iter().position(|&a| a == 0).unwrap();
    let p = jpg.as_raw()[i * 3..i * 3 + 3].to_vec();
    assert!(p.iter().all(|&c| c > 235), "transparent parts are white: {p:?}");
    let r = cut(vec![("format", "webp")]).await;
    assert_eq!((r.header("content-type").as_str(), format_of(&r.body)), ("image/webp", image::ImageFormat::WebP));
    assert_eq!(alpha_of(&r.body).2, alpha, "lossless WebP carries the same alpha");
    // A CSS colour name with 4-digit hex alpha spelling accepted too.
    let r = cut(vec![("format", "png"), ("bg_color", "#f008")]).await;
    let rgba = image::load_from_memory(&r.body).unwrap().into_rgba8();
    assert_eq!(rgba.as_raw()[i * 4..i * 4 + 4], [255, 0, 0, 0x88]);
    let r = cut(vec![("format", "jpg"), ("bg_color", "rebeccapurple")]).await;
    let p = image::load_from_memory(&r.body).unwrap().into_rgb8().as_raw()[i * 3..i * 3 + 3].to_vec();
    assert!(p.iter().zip([0x66, 0x33, 0x99]).all(|(&a, b)| (a as i32 - b).abs() < 12), "{p:?}");

    // channels=alpha: the mask alone, as a gray PNG, equal to the cutout's alpha.
    let r = cut(vec![("channels", "alpha")]).await;
    assert_eq!(r.header("content-type"), "image/png");
    assert_eq!(gray(&r.body).into_raw(), alpha);

    // zip: color.jpg and alpha.png, both decodable, at the output size.
    let r = cut(vec![("format", "zip")]).await;
    assert_eq!(r.header("content-type"), "application/zip");
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(r.body.clone())).unwrap();
    let mut names: Vec<String> = z.file_names().map(str::to_owned).collect();
    names.sort();
    assert_eq!(names, ["alpha.png", "color.jpg"]);
    let mut member = |name: &str| {
        let mut v = Vec::new();
        z.by_name(name).unwrap().read_to_end(&mut v).unwrap();
        v
    };
    let color = image::load_from_memory(&member("color.jpg")).unwrap();
    assert_eq!((color.width(), color.height(), format_of(&member("color.jpg"))), (451, 300, image::ImageFormat::Jpeg));
    assert_eq!(gray(&member("alpha.png")).into_raw(), alpha);
    assert_eq!(d.credits("shop"), (8, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crop_scale_position_roi_and_background_photos() {
    let d = Daemon::start(20, &ALLOW_LOOPBACK).await;
    let key = d.key("shop", ALL_SCOPES);
    let server = image_server().await;
    let photo = read(fixture("chelsea.jpg"));
    let url = format!("http://{server}/img/chelsea.jpg");
    let cut = |extra: Value| {
        let (d, key, url) = (&d, &key, &url);
        async move {
            let mut body = json!({"image_url": url, "size": "full", "format": "png"});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            let r = json_req(d, key, body, None).await;
            assert_eq!(r.status, StatusCode::OK, "{extra}: {}", String::from_utf8_lossy(&r.body));
            r
        }
    };
    let full = cut(json!({})).await;
    let (w, _, alpha) = alpha_of(&full.body);
    let [x, y, bw, bh] = subject_box(&alpha, w);

    // crop: the output is the subject's box plus the margin (10 px above and below, 20 at the
    // sides), and the subject is where the margin puts it, unchanged.
    let r = cut(json!({"crop": true, "crop_margin": "10px 20px"})).await;
    let (cw, ch, calpha) = alpha_of(&r.body);
    assert_eq!((cw, ch), (bw + 40, bh + 20));
    assert_eq!((r.number("x-width"), r.number("x-height")), (cw, ch));
    assert_eq!(r.foreground(), [20, 10, bw, bh]);
    for row in 0..bh {
        let src = &alpha[((y + row) * w + x) as usize..][..bw as usize];
        let dst = &calpha[((10 + row) * cw + 20) as usize..][..bw as usize];
        assert_eq!(src, dst, "row {row}");
    }
    // A percentage margin is of the subject's size.
    let r = cut(json!({"crop": "true", "crop_margin": "10%"})).await;
    let (mw, mh) = ((bw as f64 * 0.1).round() as u32, (bh as f64 * 0.1).round() as u32);
    assert_eq!((r.number("x-width"), r.number("x-height")), (bw + 2 * mw, bh + 2 * mh));

    // roi: only the left half can be the subject.
    let r = cut(json!({"roi": "0% 0% 50% 100%"})).await;
    let fg = r.foreground();
    assert!(fg[0] + fg[2] <= 226, "{fg:?}");
    // An roi beyond the image, an empty one, and crop with nothing in the roi.
    for (extra, code) in [
        (json!({"roi": "0px 0px 999px 10px"}), "roi_exceeds_bounds"),
        (json!({"roi": "10px 10px 5px 20px"}), "roi_region_empty"),
        (json!({"roi": format!("{}px 0px 451px 300px", x + bw), "crop": true}), "unknown_foreground"),
    ] {
        let mut body = json!({"image_url": url, "size": "full"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        assert_eq!(json_req(&d, &key, body, None).await.error(StatusCode::BAD_REQUEST), code, "{extra}");
    }

    // scale 50%: the subject is as large as fits in half the canvas, centred.
    let r = cut(json!({"scale": "50%"})).await;
    assert_eq!((r.number("x-width"), r.number("x-height")), (451, 300));
    let [fx, fy, fw, fh] = r.foreground();
    let f = 0.5 * (451.0 / bw as f64).min(300.0 / bh as f64);
    assert!(((bw as f64 * f) - fw as f64).abs() <= 2.0 && ((bh as f64 * f) - fh as f64).abs() <= 2.0, "{fw}x{fh}");
    assert!(((451 - fw) as i32 / 2 - fx as i32).abs() <= 2 && ((300 - fh) as i32 / 2 - fy as i32).abs() <= 2);
    // position alone: the subject moves to the top-left corner at its own size.
    let r = cut(json!({"position": "0% 0%"})).await;
    assert_eq!(r.foreground(), [0, 0, bw, bh]);

    // bg_image_url: the photo (one red colour) shows where the cutout is transparent; auto is
    // JPEG since nothing is transparent any more.
    let mut body = json!({"image_url": url, "size": "full", "bg_image_url": format!("http://{server}/solid/ff0000.png")});
    let r = json_req(&d, &key, body.clone(), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(format_of(&r.body), image::ImageFormat::Jpeg);
    let rgb = image::load_from_memory(&r.body).unwrap().into_rgb8();
    let i = alpha.iter().position(|&a| a == 0).unwrap();
    let p = &rgb.as_raw()[i * 3..i * 3 + 3];
    assert!(p[0] > 230 && p[1] < 30 && p[2] < 30, "{p:?}");
    // The same photo uploaded as bg_image_file, with PNG output: identical pixels.
    let bg = d.client.get(format!("http://{server}/solid/ff0000.png")).send().await.unwrap().bytes().await.unwrap();
    let from_url = cut(json!({"bg_image_url": format!("http://{server}/solid/ff0000.png")})).await;
    let r = form(
        &d,
        &key,
        &[("size", Part::Text("full")), ("format", Part::Text("png")), ("image_file", Part::File(&photo)), ("bg_image_file", Part::File(&bg))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        image::load_from_memory(&r.body).unwrap().into_rgba8(),
        image::load_from_memory(&from_url.body).unwrap().into_rgba8()
    );
    // A background that cannot be fetched costs nothing.
    let before = d.credits("shop");
    body["bg_image_url"] = json!(format!("http://{server}/img/missing.png"));
    assert_eq!(json_req(&d, &key, body, None).await.error(StatusCode::BAD_REQUEST), "failed_bg_download");
    assert_eq!(d.credits("shop"), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_by_name() {
    let d = Daemon::start(10, &[]).await;
    let key = d.key("shop", ALL_SCOPES);
    let big = noise_jpeg(2400, 1800); // 4.32 MP
    for (size, most) in [("small", 250_000), ("medium", 1_500_000), ("hd", 4_000_000), ("4k", 4_320_000), ("auto", 4_320_000), ("full", 4_320_000), ("50MP", 4_320_000)] {
        let r = form(&d, &key, &[("size", Part::Text(size)), ("format", Part::Text("jpg")), ("image_file", Part::File(&big))]).await;
        assert_eq!(r.status, StatusCode::OK, "{size}");
        let (w, h) = (r.number("x-width"), r.number("x-height"));
        assert!(w * h <= most && w * h > most * 95 / 100, "{size}: {w}x{h}");
        assert!((w as f64 / h as f64 - 4.0 / 3.0).abs() < 0.01, "{size}: aspect {w}x{h}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_path_charges_nothing() {
    let d = Daemon::start(3, &["--fetch-allow", "127.0.0.0/8", "--max-pixels", "200000", "--rate-limit", "1000", "--rate-burst", "1000"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let server = image_server().await;
    let photo = read(fixture("chelsea.jpg"));
    let url = format!("http://{server}/img/chelsea.jpg");
    let bad = |body: Value| {
        let (d, key) = (&d, &key);
        async move { json_req(d, key, body, None).await.error(StatusCode::BAD_REQUEST) }
    };
    assert_eq!(bad(json!({"size": "full"})).await, "missing_source");
    assert_eq!(bad(json!({"image_url": url, "image_file_b64": b64(&photo)})).await, "multiple_sources");
    let (ct, body) = multipart(&[("image_url", Part::Text(&url)), ("image_file", Part::File(&photo))]);
    assert_eq!(send(&d, &key, &ct, body, None).await.error(StatusCode::BAD_REQUEST), "multiple_sources");
    for (field, value, code) in [
        ("size", "huge", "invalid_size"),
        ("format", "gif", "invalid_format"),
        ("channels", "rgb", "invalid_channels"),
        ("bg_color", "notacolour", "invalid_bg_color"),
        ("scale", "5%", "invalid_scale"),
        ("position", "left", "invalid_position"),
        ("roi", "1 2 3", "invalid_roi"),
        ("bg_image_url", "ftp://x/y.png", "invalid_bg_image_url"),
    ] {
        assert_eq!(bad(json!({"image_url": url, field: value})).await, code, "{field}={value}");
    }
    assert_eq!(bad(json!({"image_url": url, "crop": true, "crop_margin": "lots"})).await, "invalid_crop_margin");
    assert_eq!(bad(json!({"image_url": url, "bg_color": "red", "bg_image_url": url})).await, "multiple_bg_sources");
    assert_eq!(bad(json!({"image_file_b64": "!!!not base64"})).await, "invalid_image_file_b64");
    // The image itself: not an image, cut short, too many pixels for this daemon, too many bytes.
    assert_eq!(bad(json!({"image_file_b64": b64(b"just some text, not a picture")})).await, "invalid_file_type");
    assert_eq!(bad(json!({"image_file_b64": b64(&photo[..photo.len() / 2])})).await, "failed_to_read_image");
    let big = noise_jpeg(600, 400);
    assert_eq!(bad(json!({"image_file_b64": b64(&big)})).await, "resolution_too_high");
    let huge = vec![0u8; 11 * 1024 * 1024];
    let r = form(&d, &key, &[("image_file", Part::File(&huge))]).await;
    assert_eq!(r.error(StatusCode::BAD_REQUEST), "file_too_large");
    // URLs: refused address, not found, not http.
    assert_eq!(bad(json!({"image_url": format!("http://{server}/img/missing.jpg")})).await, "failed_image_download");
    assert_eq!(bad(json!({"image_url": "ftp://example/x.jpg"})).await, "invalid_image_url");
    // A body no client sends.
    let r = send(&d, &key, "text/plain", b"hello".to_vec(), None).await;
    assert_eq!(r.error(StatusCode::BAD_REQUEST), "invalid_request");
    let r = send(&d, &key, "application/json", b"{not json".to_vec(), None).await;
    assert_eq!(r.error(StatusCode::BAD_REQUEST), "malformed_json");

    // Keys: missing, unknown, without the scope: 403.
    let r = d.client.post(d.url(ENDPOINT)).header("content-type", "application/json").body("{}").send().await.unwrap();
    let r = Reply { status: r.status(), headers: r.headers().clone(), body: r.bytes().await.unwrap().to_vec() };
    assert_eq!(r.error(StatusCode::FORBIDDEN), "missing_api_key");
    assert_eq!(json_req(&d, "xbk_live_nope", json!({"image_url": url}), None).await.error(StatusCode::FORBIDDEN), "invalid_api_key");
    let quota_only = d.key("shop", "removebg:quota:read");
    assert_eq!(json_req(&d, &quota_only, json!({"image_url": url}), None).await.error(StatusCode::FORBIDDEN), "missing_scope");
    assert_eq!(d.credits("shop"), (0, 0), "no failure cost anything");

    // Credits: three successes, then 402.
    for _ in 0..3 {
        assert_eq!(json_req(&d, &key, json!({"image_url": url, "size": "preview"}), None).await.status, StatusCode::OK);
    }
    let r = json_req(&d, &key, json!({"image_url": url}), Some("application/json")).await;
    assert_eq!(r.error(StatusCode::PAYMENT_REQUIRED), "insufficient_credits");
    assert_eq!(d.credits("shop"), (3, 0));
    assert_eq!(count(&d, "SELECT COUNT(*) FROM jobs WHERE status = 'completed'"), 3, "charged credits equal completed jobs");
    assert_eq!(common::listing(&d.data().join("results")).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_with_retry_after() {
    let d = Daemon::start(5, &["--rate-limit", "0.2", "--rate-burst", "1"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let r = d.client.get(d.url("/v1.0/account")).header("x-api-key", &key).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    let r = json_req(&d, &key, json!({"image_url": "http://127.0.0.1:9/x.jpg"}), None).await;
    assert_eq!(r.error(StatusCode::TOO_MANY_REQUESTS), "rate_limit_exceeded");
    let wait: u64 = r.header("retry-after").parse().unwrap();
    assert!((1..=5).contains(&wait), "{wait}");
    assert_eq!(d.credits("shop"), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_and_improve() {
    let d = Daemon::start(7, &[]).await;
    let key = d.key("shop", ALL_SCOPES);
    let photo = read(fixture("chelsea.jpg"));
    assert_eq!(form(&d, &key, &[("image_file", Part::File(&photo))]).await.status, StatusCode::OK);
    let r = d.client.get(d.url("/v1.0/account")).header("X-API-Key", &key).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v = body_json(r).await;
    let a = &v["data"]["attributes"];
    assert_eq!(a["credits"], json!({"total": 6, "subscription": 6, "payg": 0, "enterprise": 0}));
    assert_eq!(a["api"], json!({"free_calls": 0, "sizes": "all"}));
    let r = d.client.get(d.url("/v1.0/account")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(body_json(r).await["errors"][0]["code"], "missing_api_key");

    // improve: an id back, nothing kept, nothing charged.
    let jobs = || count(&d, "SELECT COUNT(*) FROM jobs");
    let before = (jobs(), common::listing(&d.data().join("results")));
    let (ct, body) = multipart(&[("tag", Part::Text("hair")), ("image_file", Part::File(&photo))]);
    let r = d.client.post(d.url("/v1.0/improve")).header("x-api-key", &key).header("content-type", ct).body(body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let id = body_json(r).await["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "{id}");
    let r = json_to(&d, "/v1.0/improve", &key, json!({"tag": "x"})).await;
    assert_eq!(r.error(StatusCode::BAD_REQUEST), "missing_source");
    let r = json_to(&d, "/v1.0/improve", &key, json!({"image_file_b64": {}})).await;
    assert_eq!(r.error(StatusCode::BAD_REQUEST), "invalid_image_file_b64");
    let r = json_to(&d, "/v1.0/improve", &key, json!({"image_url": "file:///etc/passwd"})).await;
    assert_eq!(r.error(StatusCode::BAD_REQUEST), "invalid_image_url");
    // An upload must be an image, as /removebg requires (found by schemathesis: a part holding
    // the text "null" was accepted).
    let (ct, body) = multipart(&[("image_file", Part::File(b"null"))]);
    let r = d.client.post(d.url("/v1.0/improve")).header("x-api-key", &key).header("content-type", ct).body(body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(body_json(r).await["errors"][0]["code"], "invalid_file_type");
    let r = json_to(&d, "/v1.0/improve", &key, json!({"image_file_b64": "bnVsbA=="})).await;
    assert_eq!(r.error(StatusCode::BAD_REQUEST), "invalid_file_type");
    assert_eq!((jobs(), common::listing(&d.data().join("results"))), before);
    assert_eq!(d.credits("shop"), (1, 0));
}
