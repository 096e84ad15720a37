//! remove.bg's API v1.0 fields (`POST /v1.0/removebg`) and rembg's parameters (`/api/remove`).
//!
//! The input is a request body: a JSON object is read as remove.bg's JSON clients send it, anything
//! else as an `application/x-www-form-urlencoded` form (both as `http::removebg_v1` turns them into
//! fields); the form's pairs are also rembg's query parameters.
//!
//! Properties: refusals are client errors with stable codes; an accepted request has exactly one
//! source, taken as given; its options are within their documented ranges; rembg's answer is
//! always a full-size PNG and a mask-only answer has no background.
#![no_main]

#[path = "shared.rs"]
mod shared;

use libfuzzer_sys::fuzz_target;
use removebgd::engine::{Channels, OutputFormat, OutputSize, Position};
use removebgd::jobs::removebg::{self, Value};
use removebgd::jobs::{Source, rembg};

fn fields(data: &[u8]) -> Vec<(String, Value)> {
    if let Ok(map) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(data) {
        return map
            .into_iter()
            .filter_map(|(name, v)| match v {
                serde_json::Value::Null => None,
                serde_json::Value::Bool(b) => Some((name, Value::Bool(b))),
                serde_json::Value::String(s) => Some((name, Value::Text(s))),
                other => Some((name, Value::Text(other.to_string()))),
            })
            .collect();
    }
    form_urlencoded::parse(data)
        .map(|(name, v)| {
            // A `+` sent unencoded arrives as a space; base64 has no spaces.
            let v = if name == "image_file_b64" {
                v.replace(' ', "+")
            } else {
                v.into_owned()
            };
            (name.into_owned(), Value::Text(v))
        })
        .collect()
}

fn check_removebg(fields: Vec<(String, Value)>) {
    let given = |name: &str| {
        fields
            .iter()
            .filter(|(n, v)| n == name && !matches!(v, Value::Text(t) if t.trim().is_empty()))
            .count()
    };
    let sources = given("image_file") + given("image_file_b64") + given("image_url");
    let last_url = fields
        .iter()
        .rev()
        .find(|(n, v)| n == "image_url" && !matches!(v, Value::Text(t) if t.trim().is_empty()))
        .map(|(_, v)| v.clone());
    let format_given = given("format") > 0;
    match removebg::parse(fields) {
        Ok(job) => {
            assert_eq!(sources, 1, "accepted with {sources} sources");
            if let Source::Url(u) = &job.source {
                assert_eq!(
                    Some(Value::Text(u.clone())),
                    last_url.map(|v| match v {
                        Value::Text(t) => Value::Text(t.trim().to_owned()),
                        other => other,
                    })
                );
            }
            if !format_given {
                assert_eq!(job.options.format, OutputFormat::Auto);
            }
            let layout = job.options.layout;
            if let Some(s) = layout.scale {
                assert!((0.1..=1.0).contains(&s), "scale {s}");
            }
            if let Some(Position::At(x, y)) = layout.position {
                assert!((0.0..=1.0).contains(&x) && (0.0..=1.0).contains(&y), "position {x} {y}");
            }
            assert!(
                [
                    "person",
                    "product",
                    "animal",
                    "car",
                    "graphics",
                    "transportation",
                    "other"
                ]
                .contains(&job.detected_type)
            );
        }
        Err(e) => {
            shared::assert_client_error(&e);
            if sources == 0 {
                assert_eq!(e.code(), "missing_source");
            } else if sources > 1 {
                assert_eq!(e.code(), "multiple_sources");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check_removebg(fields(data));

    let pairs: Vec<(String, String)> = form_urlencoded::parse(data).into_owned().collect();
    for model in ["u2netp", "isnet"] {
        match rembg::options(&pairs, model) {
            Ok(opts) => {
                assert_eq!((opts.format, opts.size), (OutputFormat::Png, OutputSize::Full));
                if opts.channels == Channels::Alpha {
                    assert!(opts.background.is_none(), "rembg ignores bgc with om");
                }
                if let Some((_, m)) = pairs.iter().find(|(k, _)| k == "model") {
                    assert!(
                        rembg::model_names(model).iter().any(|n| n == m.trim()),
                        "{m:?} is not {model}"
                    );
                }
            }
            Err(e) => shared::assert_client_error(&e),
        }
    }
});
