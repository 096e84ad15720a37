//! `multipart/form-data` uploads, as `/v1/removebg/process`, `/v1.0/removebg` and rembg's
//! `/api/remove` read them: axum's `Multipart` over the buffered body, parts named as files kept
//! as bytes and the others as text, then each API's own fields.
//!
//! It calls the daemon's own reader, `removebgd::http::multipart`, and `/v1/removebg/process`'s
//! form reader, `removebgd::http::process_form`. Input: the boundary on the first line, then the
//! body.
//!
//! Properties: the reader never panics or hangs; a refusal is a 4xx; each part's content appears
//! in the body as sent (no part is invented or altered); there are no more parts than boundary
//! lines; and what the APIs make of the parts is a job or a client error.
#![no_main]

#[path = "shared.rs"]
mod shared;

use std::sync::OnceLock;

use axum::body::Body;
use axum::extract::Request;
use libfuzzer_sys::fuzz_target;
use removebgd::http::{ApiError, Part, multipart, process_form};
use removebgd::jobs::removebg::{self, Value};
use removebgd::jobs::rembg;

/// Parts read as bytes by one API or another (process: image_file; remove.bg: also
/// bg_image_file; rembg: file).
const FILES: [&str; 3] = ["image_file", "bg_image_file", "file"];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

fn request(boundary: &str, body: &[u8]) -> Option<Request> {
    Request::builder()
        .method("POST")
        .uri("/v1/removebg/process")
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(Body::from(body.to_vec()))
        .ok()
}

/// A refusal of an upload is the client's: a 4xx with a stable snake_case code.
fn assert_client_api_error(e: &ApiError) {
    assert!(e.status.is_client_error(), "{} {}: {}", e.status, e.code, e.message);
    assert!(
        !e.code.is_empty() && e.code.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "{}",
        e.code
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let Ok(boundary) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let body = data.get(split + 1..).unwrap_or_default();
    let Some(req) = request(boundary, body) else {
        return;
    };
    let parts = match runtime().block_on(multipart(req, &(), &FILES)) {
        Ok(parts) => parts,
        Err(e) => return assert_client_api_error(&e),
    };

    let delimiter = format!("--{boundary}");
    assert!(
        !boundary.is_empty() || parts.is_empty(),
        "{} parts read without a boundary",
        parts.len()
    );
    // The header's parser reads the boundary parameter; when it is plain token characters it
    // is the line as given (`b;`, `"b"` and the like are read otherwise).
    if !boundary.is_empty()
        && boundary
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"'+_.-".contains(&b))
    {
        let boundaries = body
            .windows(delimiter.len())
            .filter(|w| *w == delimiter.as_bytes())
            .count();
        assert!(
            parts.len() <= boundaries,
            "{} parts from {boundaries} delimiters",
            parts.len()
        );
    }
    // A text part opening with a UTF-16 byte order mark is decoded as UTF-16.
    let utf16 = contains(body, &[0xFE, 0xFF]) || contains(body, &[0xFF, 0xFE]);
    // A part's `charset` parameter transcodes its text.
    let charset = contains(&body.to_ascii_lowercase(), b"charset");
    for (name, part) in &parts {
        // A quoted name may escape its quotes (`name="a\"b"`).
        let escaped = name.replace('"', "\\\"");
        assert!(
            contains(body, name.as_bytes()) || contains(body, escaped.as_bytes()),
            "part name {name:?} is not in the body"
        );
        let content = match part {
            // Text is decoded leniently (a `charset`, BOM sniffing, U+FFFD for bad bytes):
            // verbatim only when it was plain UTF-8.
            Part::Text(t) if !t.contains('\u{FFFD}') && !utf16 && !charset => t.as_bytes(),
            Part::Text(_) => continue,
            Part::File(b) => b,
        };
        assert!(contains(body, content), "part {name:?} is not in the body as sent");
    }

    // `/v1/removebg/process`'s own form reader over the same request, then its job.
    let form = request(boundary, body).map(|req| runtime().block_on(process_form(req, &())));
    match form {
        Some(Ok((fields, file))) => {
            let had_file = file.is_some();
            match fields.into_job(file) {
                Ok((source, _)) => assert!(!had_file || matches!(source, removebgd::jobs::Source::Bytes(_))),
                Err(e) => shared::assert_client_error(&e),
            }
        }
        Some(Err(e)) => assert_client_api_error(&e),
        None => {}
    }
    let fields: Vec<(String, Value)> = parts
        .iter()
        .map(|(n, p)| {
            let v = match p {
                Part::File(b) => Value::File(b.clone()),
                Part::Text(t) => Value::Text(t.clone()),
            };
            (n.clone(), v)
        })
        .collect();
    if let Err(e) = removebg::parse(fields) {
        shared::assert_client_error(&e);
    }
    let pairs: Vec<(String, String)> = parts
        .iter()
        .filter_map(|(n, p)| match p {
            Part::Text(t) => Some((n.clone(), t.clone())),
            Part::File(_) => None,
        })
        .collect();
    if let Err(e) = rembg::options(&pairs, "u2netp") {
        shared::assert_client_error(&e);
    }
});
