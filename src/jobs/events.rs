//! What jobs announce as they move (for the MQTT mirror or any other listener), and the
//! running statistics a node reports.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::{Histogram, LATENCY_BUCKETS};
use crate::store::Reply;

/// Who a job is and where its answer goes.
#[derive(Debug, Clone, Default)]
pub struct JobMeta {
    pub id: String,
    /// `http`, `batch` or `mqtt`.
    pub source: &'static str,
    pub batch_id: Option<String>,
    pub client_ref: Option<String>,
    pub reply: Reply,
    /// Base URL the submitter used (HTTP), so mirrored result URLs match the response.
    pub base_url: Option<String>,
}

#[derive(Debug, Clone)]
pub enum JobEvent {
    Processing(Arc<JobMeta>),
    Completed {
        job: Arc<JobMeta>,
        file: String,
        width: u32,
        height: u32,
        expires_at: i64,
        /// The subject's box: left, top, width, height.
        foreground: Option<[u32; 4]>,
    },
    Failed {
        job: Arc<JobMeta>,
        code: &'static str,
        message: String,
    },
    Batch {
        batch_id: String,
        total: i64,
        completed: i64,
        failed: i64,
    },
}

/// Counters since start-up.
pub struct Stats {
    started: Instant,
    pub processed: AtomicU64,
    pub failed: AtomicU64,
    latencies: Mutex<VecDeque<Duration>>,
    /// Successful jobs, from start (after any queueing) to the result on disk.
    pub end_to_end: Histogram,
    /// The model alone, per image.
    pub inference: Histogram,
}

/// How many recent job latencies the median is taken over.
const LATENCY_WINDOW: usize = 256;

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            started: Instant::now(),
            processed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            latencies: Mutex::new(VecDeque::with_capacity(LATENCY_WINDOW)),
            end_to_end: Histogram::new(LATENCY_BUCKETS),
            inference: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl Stats {
    pub fn record(&self, ok: bool, took: Duration) {
        if ok {
            self.processed.fetch_add(1, Ordering::Relaxed);
            self.end_to_end.observe(took);
            let mut l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
            if l.len() == LATENCY_WINDOW {
                l.pop_front();
            }
            l.push_back(took);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Median end-to-end time of the recent successful jobs.
    pub fn median_latency(&self) -> Option<Duration> {
        let mut v: Vec<Duration> = self
            .latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        v.sort();
        v.get(v.len() / 2).copied()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_median_over_the_window() {
        let s = Stats::default();
        assert_eq!(s.median_latency(), None);
        for ms in [30, 10, 20] {
            s.record(true, Duration::from_millis(ms));
        }
        s.record(false, Duration::from_millis(999));
        assert_eq!(s.median_latency(), Some(Duration::from_millis(20)));
        assert_eq!(s.processed.load(Ordering::Relaxed), 3);
        assert_eq!(s.failed.load(Ordering::Relaxed), 1);
        for _ in 0..LATENCY_WINDOW {
            s.record(true, Duration::from_millis(5));
        }
        assert_eq!(
            s.median_latency(),
            Some(Duration::from_millis(5)),
            "old samples age out"
        );
    }
}
