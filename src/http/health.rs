//! Operator endpoints: `/healthz` (the process answers), `/readyz` (it can do work now) and
//! `/metrics` (Prometheus text). No API key: they reveal no images, keys or results, and
//! monitoring on the LAN must reach them; account names appear as metric labels.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use crate::metrics::{self, Histogram, LATENCY_BUCKETS};

/// Requests served, by route template and status, and how long they took.
pub struct RequestMetrics {
    counts: Mutex<BTreeMap<(String, u16), u64>>,
    duration: Histogram,
}

impl Default for RequestMetrics {
    fn default() -> RequestMetrics {
        RequestMetrics {
            counts: Mutex::new(BTreeMap::new()),
            duration: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl RequestMetrics {
    /// `route` is the matched route template (a fixed set, so label values stay bounded
    /// whatever paths clients send); unmatched requests count as `other`.
    pub fn record(&self, route: Option<&str>, status: u16, took: Duration) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((route.unwrap_or("other").to_owned(), status))
            .or_default() += 1;
        self.duration.observe(took);
    }
}

pub async fn healthz() -> &'static str {
    "ok\n"
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    let mut reasons = Vec::new();
    if state.draining.is_cancelled() {
        reasons.push("shutting down".to_owned());
    }
    reasons.extend(state.jobs.unready_reasons().await);
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // The queue as /metrics counts it; a database that cannot answer is already among the
    // reasons, and the count is then left out rather than failing the probe.
    let queued = state.jobs.db(|s| s.queued_jobs()).await.ok();
    let pool = state.jobs.pool();
    let body = json!({
        "ready": reasons.is_empty(),
        "model": state.model,
        "precision": state.precision,
        "reasons": reasons,
        "queue": {
            "waiting": queued.map(|q| q + pool.queued() as i64),
            "running": pool.running(),
        },
        "mqtt": state.mqtt.connected().map(|up| json!({ "connected": up })),
    });
    (status, axum::Json(body)).into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let (accounts, (results, result_bytes), queued) = state
        .jobs
        .db(|s| Ok((s.accounts()?, s.result_totals()?, s.queued_jobs()?)))
        .await?;
    let jobs = &state.jobs;
    let stats = jobs.stats();
    let mut out = String::with_capacity(4096);

    metrics::header(
        &mut out,
        "removebgd_build_info",
        "gauge",
        "Version, model and numeric precision of this daemon.",
    );
    let _ = writeln!(
        out,
        "removebgd_build_info{{version=\"{}\",model=\"{}\",precision=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        metrics::label(&state.model),
        metrics::label(&state.precision)
    );
    metrics::single(
        &mut out,
        "removebgd_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        stats.uptime().as_secs(),
    );

    metrics::header(
        &mut out,
        "removebgd_http_requests_total",
        "counter",
        "HTTP requests answered, by route and status.",
    );
    for ((route, status), n) in state.requests.counts.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = writeln!(
            out,
            "removebgd_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
        );
    }
    state.requests.duration.render(
        &mut out,
        "removebgd_http_request_duration_seconds",
        "Time from request to response, all routes.",
    );
    state.conn_stats.render(&mut out, &state.connections);
    metrics::single(
        &mut out,
        "removebgd_http_requests_in_flight",
        "gauge",
        "API requests being handled now (the operator endpoints not counted).",
        state.in_flight.count(),
    );

    metrics::header(
        &mut out,
        "removebgd_jobs_total",
        "counter",
        "Jobs finished, by outcome.",
    );
    let _ = writeln!(
        out,
        "removebgd_jobs_total{{outcome=\"completed\"}} {}",
        stats.processed.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "removebgd_jobs_total{{outcome=\"failed\"}} {}",
        stats.failed.load(Ordering::Relaxed)
    );
    stats.end_to_end.render(
        &mut out,
        "removebgd_job_duration_seconds",
        "Successful jobs from start (fetch, decode, inference, encode) to the result on disk.",
    );
    stats
        .inference
        .render(&mut out, "removebgd_inference_seconds", "Model inference per image.");
    metrics::single(
        &mut out,
        "removebgd_queue_depth",
        "gauge",
        "Jobs waiting: queued batch and MQTT items plus images waiting for a worker.",
        queued + jobs.pool().queued() as i64,
    );
    metrics::single(
        &mut out,
        "removebgd_jobs_in_flight",
        "gauge",
        "Images being processed by the workers now.",
        jobs.pool().running(),
    );
    metrics::single(
        &mut out,
        "removebgd_image_memory_reserved_bytes",
        "gauge",
        "Memory reserved by the images being processed now (their estimate, see README: Memory).",
        jobs.engine().image_memory_reserved(),
    );
    metrics::single(
        &mut out,
        "removebgd_image_memory_waits_total",
        "counter",
        "Images that waited for room under the memory limit before they were decoded.",
        jobs.engine().image_memory_waits_and_peak().0,
    );
    metrics::single(
        &mut out,
        "removebgd_image_memory_limit_bytes",
        "gauge",
        "Memory the images being processed may reserve between them.",
        jobs.engine().image_memory(),
    );

    metrics::header(
        &mut out,
        "removebgd_credits_remaining",
        "gauge",
        "Credits left in the current period, by account (reserved ones count as spent).",
    );
    for a in &accounts {
        let _ = writeln!(
            out,
            "removebgd_credits_remaining{{account=\"{}\"}} {}",
            metrics::label(&a.name),
            a.remaining()
        );
    }
    metrics::single(
        &mut out,
        "removebgd_results_stored",
        "gauge",
        "Result files kept for download.",
        results,
    );
    metrics::single(
        &mut out,
        "removebgd_results_bytes",
        "gauge",
        "Bytes the stored result files take.",
        result_bytes,
    );
    if let Some(up) = state.mqtt.connected() {
        metrics::single(
            &mut out,
            "removebgd_mqtt_connected",
            "gauge",
            "1 while connected to the MQTT broker.",
            u8::from(up),
        );
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        out,
    )
        .into_response())
}
