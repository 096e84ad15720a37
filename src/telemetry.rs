//! Logging: journald under systemd, readable text on a terminal, JSON for log shippers.
//! Level filter from `RUST_LOG` (default `info`).

use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Auto if under_journald() => match tracing_journald::layer() {
            Ok(layer) => registry
                .with(layer.with_syslog_identifier("removebgd".into()))
                .try_init(),
            Err(_) => registry.with(text_layer()).try_init(),
        },
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Auto | LogFormat::Text => registry.with(text_layer()).try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}

/// Whether systemd connected our output to the journal.
pub fn under_journald() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

fn text_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use std::io::IsTerminal;
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
}
