//! The config file (`/etc/removebgd/config.toml`): TOML into `config::ServeArgs`, exactly as
//! `config::read_file` reads it, then `ServeArgs::resolve` into the daemon's settings.
//!
//! Properties: no panic for any file; and a config that resolves prints (`removebgd config
//! print`, `ServeSettings::to_toml`) as a file that parses and resolves to the same settings
//! (the MQTT password, never printed, aside).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use removebgd::config::ServeArgs;

/// An empty config file, so that `resolve` reads no system-wide file: the fuzzed text is given
/// as the settings themselves (they take precedence, and are parsed by the same `toml` call).
fn empty_file() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // One name for every run (it is always empty), so that runs leave one file behind at most.
        let path = std::env::temp_dir().join("removebgd-fuzz-empty-config.toml");
        std::fs::write(&path, "").expect("writing an empty config file");
        path
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(mut args) = toml::from_str::<ServeArgs>(text) else {
        return;
    };
    args.config = Some(empty_file());
    let Ok(mut first) = args.resolve() else { return };

    let printed = first.to_toml();
    let mut again: ServeArgs =
        toml::from_str(&printed).unwrap_or_else(|e| panic!("the printed config does not parse: {e}\n{printed}"));
    again.config = Some(empty_file());
    let second = again
        .resolve()
        .unwrap_or_else(|e| panic!("the printed config does not resolve: {e:#}\n{printed}"));
    if let Some(m) = first.mqtt.as_mut() {
        m.password = None;
    }
    assert_eq!(format!("{first:?}"), format!("{second:?}"), "printed as:\n{printed}");
});
