//! Checks more than one target makes (included with `#[path]`; not a target itself).
#![allow(dead_code)]

use removebgd::jobs::{JobError, Options};

/// A queued job (MQTT, batch) is stored and read back before it runs: its options must come
/// back exactly as validated.
pub fn assert_queued_round_trip(opts: &Options) {
    let stored = opts.stored();
    let bg = opts.bg_text();
    let back = Options::from_stored(
        opts.format.extension(),
        opts.size.name(),
        bg.as_deref(),
        stored.as_deref(),
    );
    assert_eq!(
        format!("{back:?}"),
        format!("{opts:?}"),
        "stored as {stored:?}, bg {bg:?}"
    );
}

/// A refusal of a request is always the client's fault: a stable snake_case code, a 4xx.
pub fn assert_client_error(e: &JobError) {
    match e {
        JobError::Invalid { code, message } => {
            assert!(
                !code.is_empty()
                    && code
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{code}"
            );
            assert!(!message.is_empty(), "{code} without a message");
        }
        JobError::TooLarge(_) => {}
        other => panic!("a request was refused with a server-side error: {other:?}"),
    }
}
