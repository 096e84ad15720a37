//! The JSON body of `POST /v1/removebg/process` (also an MQTT submission without `ref`):
//! `parse_json`, then `into_job`.
//!
//! Properties: refusals are client errors with stable codes; an accepted body is a JSON object
//! (after the documented removal of raw line breaks); the job's source is the one field given
//! (a URL as sent, or exactly the base64's bytes); the options are the API's; and they survive
//! being stored and read back as a queued job's options.
#![no_main]

#[path = "shared.rs"]
mod shared;

use libfuzzer_sys::fuzz_target;
use removebgd::engine::{OutputFormat, OutputSize};
use removebgd::jobs::Source;
use removebgd::jobs::request::{decode_base64, parse_json};

fuzz_target!(|data: &[u8]| {
    let request = match parse_json(data) {
        Ok(r) => r,
        Err(e) => {
            shared::assert_client_error(&e);
            assert!(matches!(e.code(), "malformed_json" | "invalid_request"), "{}", e.code());
            return;
        }
    };
    let joined: Vec<u8> = data.iter().copied().filter(|b| *b != b'\n' && *b != b'\r').collect();
    let value = serde_json::from_slice::<serde_json::Value>(data)
        .or_else(|_| serde_json::from_slice::<serde_json::Value>(&joined))
        .expect("an accepted body is JSON");
    assert!(value.is_object(), "an accepted body is an object: {value}");

    let (url, b64) = (request.image_url.clone(), request.image_base64.clone());
    match request.into_job(None) {
        Ok((source, opts)) => {
            match source {
                Source::Url(u) => assert_eq!(Some(u), url),
                Source::Bytes(bytes) => assert!(bytes == decode_base64(&b64.expect("bytes came from base64")).unwrap()),
            }
            assert!(matches!(
                opts.format,
                OutputFormat::Png | OutputFormat::Webp | OutputFormat::Jpg
            ));
            assert!(matches!(opts.size, OutputSize::Full | OutputSize::Preview));
            shared::assert_queued_round_trip(&opts);
        }
        Err(e) => shared::assert_client_error(&e),
    }
});
