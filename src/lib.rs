//! removebgd: on-device background removal. See README.md for the architecture.
pub mod app;
pub mod clock;
pub mod commands;
pub mod config;
pub mod digest;
pub mod engine;
pub mod fetch;
pub mod http;
pub mod jobs;
pub mod memory;
pub mod metrics;
pub mod mqtt;
pub mod ops;
pub mod provision;
pub mod store;
pub mod systemd;
pub mod telemetry;

/// A test that cannot cover something on this machine says so: on stderr, and appended to the
/// file `REMOVEBGD_TEST_NOTES` names, which `.ci/run` prints at the end, so no skip is silent.
#[doc(hidden)]
pub fn test_note(what: &str) {
    eprintln!("NOTE: {what}");
    if let Some(path) = std::env::var_os("REMOVEBGD_TEST_NOTES") {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{what}");
        }
    }
}
