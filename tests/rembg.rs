//! rembg's server API (`/api/remove`) over a real port: off by default, on with
//! `--rembg-account`, answering in rembg's shape, charging the named account or the key's.

mod common;
mod daemon;

use axum::http::StatusCode;
use common::*;
use daemon::*;
use serde_json::Value;

struct Reply {
    status: StatusCode,
    content_type: String,
    body: Vec<u8>,
}

impl Reply {
    fn detail(&self, want: StatusCode) -> String {
        let v: Value = serde_json::from_slice(&self.body).unwrap_or(Value::Null);
        assert_eq!(self.status, want, "{v}");
        assert!(!v["detail"].as_str().unwrap().is_empty(), "{v}");
        v["code"].as_str().unwrap().to_owned()
    }
}

async fn reply(r: reqwest::RequestBuilder) -> Reply {
    let r = r.send().await.unwrap();
    Reply {
        status: r.status(),
        content_type: r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default(),
        body: r.bytes().await.unwrap().to_vec(),
    }
}

/// `curl -F file=@photo` as rembg's README sends it, with extra form fields.
fn upload(d: &Daemon, query: &str, photo: &[u8], fields: &[(&str, &str)]) -> reqwest::RequestBuilder {
    let boundary = "------------------------d74496d66958873e";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n").as_bytes());
    }
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n")
            .as_bytes(),
    );
    body.extend_from_slice(photo);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    d.client
        .post(d.url(&format!("/api/remove{query}")))
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_by_default() {
    let d = Daemon::start(5, &[]).await;
    let r = reply(d.client.get(d.url("/api/remove?url=http://127.0.0.1/x.jpg"))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let photo = read(fixture("chelsea.jpg"));
    assert_eq!(reply(upload(&d, "", &photo, &[])).await.status, StatusCode::NOT_FOUND);
    assert_eq!(d.credits("shop"), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_as_rembg_does_and_charges_the_named_account() {
    // A node whose default is the model's mask as it is, so that `a` (rembg's alpha matting)
    // is seen turning the refinement on.
    let d = Daemon::start(6, &["--rembg-account", "shop", "--fetch-allow", "127.0.0.0/8", "--refine", "off"]).await;
    let server = image_server().await;
    let photo = read(fixture("chelsea.jpg"));
    let unrefined = removebgd::engine::CutOptions { refine: removebgd::engine::Refine::Off, ..Default::default() };
    let direct = u2netp().cut(&photo, &unrefined).unwrap();
    let (_, _, want) = alpha_of(&direct.bytes);

    // rembg's README: GET with a URL, POST with a file; no key. A full-size RGBA PNG.
    let r = reply(d.client.get(d.url(&format!("/api/remove?url=http://{server}/img/chelsea.jpg")))).await;
    assert_eq!((r.status, r.content_type.as_str()), (StatusCode::OK, "image/png"));
    let (w, h, alpha) = alpha_of(&r.body);
    assert_eq!((w, h), (451, 300));
    assert!(mad(&alpha, &want) < 0.01);
    let r = reply(upload(&d, "", &photo, &[("model", "u2netp"), ("a", "true"), ("af", "240")])).await;
    assert_eq!((r.status, r.content_type.as_str()), (StatusCode::OK, "image/png"));
    // Alpha matting turns on the edge refinement: the same subject, its edge moved.
    let refined = alpha_of(&r.body).2;
    assert_ne!(refined, alpha, "a=true refines the edge");
    // The same subject: on average within an eighth of full scale (12.6 of 255 when written).
    assert!(mad(&refined, &alpha) < 32.0, "{}", mad(&refined, &alpha));

    // om: the mask alone; bgc (from the query, as rembg reads it on a POST): opaque red behind.
    let r = reply(upload(&d, "", &photo, &[("om", "true")])).await;
    let mask = image::load_from_memory(&r.body).unwrap();
    assert!(matches!(mask.color(), image::ColorType::L8));
    assert_eq!(mask.into_luma8().into_raw(), alpha);
    let r = reply(upload(&d, "?bgc=255,0,0,255", &photo, &[])).await;
    let rgba = image::load_from_memory(&r.body).unwrap().into_rgba8();
    let i = alpha.iter().position(|&a| a == 0).unwrap();
    assert_eq!(rgba.as_raw()[i * 4..i * 4 + 4], [255, 0, 0, 255]);
    assert_eq!(d.credits("shop"), (4, 0));

    // Refusals: a clear 4xx in FastAPI's shape, and nothing charged.
    for (query, fields, code) in [
        ("", vec![("model", "isnet")], "model_not_loaded"),
        ("", vec![("model", "xu2netpx")], "model_not_loaded"),
        ("?bgc=red", vec![], "invalid_bgc"),
        ("", vec![("af", "300")], "invalid_parameter"),
        ("", vec![("a", "maybe")], "invalid_parameter"),
    ] {
        let r = reply(upload(&d, query, &photo, &fields)).await;
        assert_eq!(r.detail(StatusCode::BAD_REQUEST), code, "{query} {fields:?}");
    }
    let r = reply(upload(&d, "", b"not an image", &[])).await;
    assert_eq!(r.detail(StatusCode::UNPROCESSABLE_ENTITY), "unsupported_format");
    let r = reply(d.client.post(d.url("/api/remove")).header("content-type", "image/jpeg").body(photo.clone())).await;
    assert_eq!(r.detail(StatusCode::BAD_REQUEST), "invalid_request");
    let r = reply(d.client.get(d.url("/api/remove"))).await;
    assert_eq!(r.detail(StatusCode::BAD_REQUEST), "missing_url");
    let r = reply(d.client.get(d.url(&format!("/api/remove?url=http://{server}/img/chelsea.jpg&model=u2net")))).await;
    assert_eq!(r.detail(StatusCode::BAD_REQUEST), "model_not_loaded");
    assert_eq!(d.credits("shop"), (4, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_key_charges_its_own_account() {
    let d = Daemon::start(0, &["--rembg-account", "shop", "--rembg-require-key"]).await;
    d.admin(&["accounts", "create", "studio", "--credits", "3"]);
    let key = d.key("studio", ALL_SCOPES);
    let photo = read(fixture("chelsea.jpg"));
    let r = reply(upload(&d, "", &photo, &[])).await;
    assert_eq!(r.detail(StatusCode::UNAUTHORIZED), "missing_api_key");
    let r = reply(upload(&d, "", &photo, &[]).header("x-api-key", &key)).await;
    assert_eq!((r.status, r.content_type.as_str()), (StatusCode::OK, "image/png"));
    assert_eq!(d.credits("studio"), (1, 0));
    assert_eq!(d.credits("shop"), (0, 0));
}
