//! Prometheus text exposition (format 0.0.4): the few metric kinds removebgd needs, without a
//! registry. Each part of the daemon owns its metrics; `GET /metrics` asks them to render.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

/// Latency buckets in seconds: requests and inferences take from milliseconds (preview of a
/// small image with u2netp) to tens of seconds (isnet on a slow board, or a long queue).
pub const LATENCY_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// A histogram of durations with fixed upper bounds.
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistogramState>,
}

#[derive(Clone, Default)]
struct HistogramState {
    /// Per-bucket (not cumulative) counts; the last one is +Inf.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            state: Mutex::new(HistogramState {
                counts: vec![0; bounds.len() + 1],
                sum: 0.0,
            }),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.iter().position(|b| secs <= *b).unwrap_or(self.bounds.len());
        let mut s = self.state.lock().expect("histogram lock poisoned");
        s.counts[i] += 1;
        s.sum += secs;
    }

    /// Appends `name_bucket`, `name_sum` and `name_count` lines (with HELP and TYPE).
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let s = self.state.lock().expect("histogram lock poisoned").clone();
        header(out, name, "histogram", help);
        let mut cumulative = 0;
        for (i, count) in s.counts.iter().enumerate() {
            cumulative += count;
            let le = self.bounds.get(i).map_or("+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum {}", s.sum);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// `# HELP` and `# TYPE` lines.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A metric with one unlabelled sample.
pub fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// A label value with `\`, `"` and newlines escaped.
pub fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// State of a link to another system (MQTT), shared by whoever keeps it up and whoever reports it.
#[derive(Default)]
pub struct LinkState(AtomicU8);

impl LinkState {
    pub fn set_connected(&self, up: bool) {
        self.0.store(if up { 2 } else { 1 }, Ordering::Relaxed);
    }

    /// `None` while the link was never configured; otherwise whether it is up now.
    pub fn connected(&self) -> Option<bool> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v == 2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(3));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "test");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "# HELP x_seconds test",
                "# TYPE x_seconds histogram",
                "x_seconds_bucket{le=\"0.1\"} 1",
                "x_seconds_bucket{le=\"1\"} 3",
                "x_seconds_bucket{le=\"+Inf\"} 4",
                "x_seconds_sum 4.05",
                "x_seconds_count 4",
            ]
        );
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
