//! MQTT submission payloads (`<prefix>/jobs/submit`): `mqtt::parse_submission`, what the
//! daemon checks before it queues a job.
//!
//! Properties: it accepts and refuses exactly what HTTP's JSON parser does (apart from `ref`);
//! refusals are client errors; an accepted `ref` is non-empty, at most 200 bytes, and makes a
//! valid MQTT topic level for the answer (`<prefix>/results/<ref>`): no wildcard or separator, and
//! no character MQTT forbids or lets a broker reject (MQTT 5.0 1.5.4: U+0000, other control
//! characters, non-characters); and the job's options survive the queue.
#![no_main]

#[path = "shared.rs"]
mod shared;

use libfuzzer_sys::fuzz_target;
use removebgd::jobs::request::parse_json;
use removebgd::mqtt::{Submission, parse_submission};

/// What MQTT 5.0 (1.5.4) lets a receiver treat as a malformed packet, as brokers do.
fn mqtt_forbidden(c: char) -> bool {
    let u = c as u32;
    c.is_control() || (0xFDD0..=0xFDEF).contains(&u) || (u & 0xFFFE) == 0xFFFE
}

fuzz_target!(|data: &[u8]| {
    let http = parse_json(data).and_then(|mut r| {
        r.client_ref = None;
        r.into_job(None)
    });
    match parse_submission(data) {
        Ok(Submission {
            client_ref,
            source,
            opts,
        }) => {
            let (http_source, http_opts) = http.expect("MQTT accepted what HTTP refuses");
            assert_eq!(format!("{source:?}"), format!("{http_source:?}"));
            assert_eq!(format!("{opts:?}"), format!("{http_opts:?}"));
            if let Some(r) = &client_ref {
                assert!(!r.is_empty() && r.len() <= 200, "{r:?}");
                assert!(!r.contains(['/', '+', '#']), "{r:?}");
                assert!(
                    !r.chars().any(mqtt_forbidden),
                    "ref {r:?} cannot be an MQTT topic level"
                );
            }
            shared::assert_queued_round_trip(&opts);
        }
        Err((client_ref, e)) => {
            shared::assert_client_error(&e);
            if let Some(r) = &client_ref {
                assert!(
                    !r.chars().any(mqtt_forbidden),
                    "answered under ref {r:?}, not a valid topic level"
                );
            }
            // Refused here but accepted over HTTP: only for the `ref`.
            if http.is_ok() {
                assert_eq!(e.code(), "invalid_request", "{e}");
                assert!(client_ref.is_none());
            }
        }
    }
});
