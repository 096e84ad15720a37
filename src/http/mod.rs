//! The REST API (see README "API"): routes per resource, the auth extractor, error mapping and
//! body limits. The only module that knows HTTP status codes.

mod auth;
mod batch;
mod error;
mod health;
mod openapi;
mod process;
mod quota;
mod rembg;
mod removebg_v1;
mod results;
pub mod serve;
mod ui;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::routing::{get, post};

pub use auth::{PollLimiter, RateLimiter};
pub use error::ApiError;
pub use health::RequestMetrics;
pub use process::parse_multipart as process_form;
pub use rembg::RembgApi;

use crate::jobs::Jobs;
use crate::jobs::request::MAX_IMAGE_BYTES;

/// Largest request body for /process: a 10 MiB image as base64 (4/3) plus JSON or multipart framing.
pub const PROCESS_BODY_LIMIT: usize = 15 * 1024 * 1024;
/// Largest request body for /batch as JSON: 100 URLs need far less. A batch of uploaded photos
/// (multipart/form-data) may be as large as [`PROCESS_BODY_LIMIT`].
pub const BATCH_BODY_LIMIT: usize = 1024 * 1024;
/// Request bodies being received or waiting for their job at once; more wait their turn, so a
/// burst of uploads cannot hold more than about this many x 15 MiB in memory.
pub const MAX_CONCURRENT_UPLOADS: usize = 8;
/// Request bodies of at most [`BATCH_BODY_LIMIT`] (batch submissions) being received at once.
/// They have slots of their own, so a batch of URLs is not queued behind photo uploads that hold
/// theirs until their cutout is done; 16 x 1 MiB at most.
pub const MAX_CONCURRENT_SMALL_UPLOADS: usize = 16;
/// `return_base64` results larger than this come back as `result_url` only.
pub const MAX_BASE64_RESULT: usize = 5 * 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub jobs: Jobs,
    pub rate: Arc<RateLimiter>,
    pub polls: Arc<PollLimiter>,
    /// Bounds the request bodies held in memory (see [`MAX_CONCURRENT_UPLOADS`]).
    pub uploads: Arc<tokio::sync::Semaphore>,
    /// The same for bodies of at most 1 MiB (see [`MAX_CONCURRENT_SMALL_UPLOADS`]).
    pub small_uploads: Arc<tokio::sync::Semaphore>,
    /// Configured public base URL; otherwise the request's Host, otherwise `fallback_url`.
    pub public_url: Option<String>,
    pub fallback_url: String,
    /// Model name and the precision it runs in, for /readyz and /metrics.
    pub model: String,
    pub precision: String,
    pub requests: Arc<RequestMetrics>,
    /// MQTT link state for /metrics (never configured: no metric).
    pub mqtt: Arc<crate::metrics::LinkState>,
    /// Cancelled when shutdown begins: /readyz turns 503 so balancers stop sending work.
    pub draining: tokio_util::sync::CancellationToken,
    /// rembg's server API, when the operator turned it on.
    pub rembg: Option<RembgApi>,
    /// Connection caps and timeouts, and their counters for /metrics.
    pub connections: serve::ConnLimits,
    pub conn_stats: Arc<serve::ConnMetrics>,
    /// How slowly a request body may arrive (see [`read_body`]).
    pub body_deadline: BodyDeadline,
    /// API requests being handled now; the drain waits for them.
    pub in_flight: Arc<InFlight>,
}

/// Counts API requests inside their handlers, so a drain can wait for the last one.
#[derive(Debug, Default)]
pub struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One request in [`InFlight`]; leaves when dropped (also when the client goes away).
pub struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Returns once no request is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A body gets `grace`, plus one second for every `min_rate` bytes received: a slow upload
/// over poor Wi-Fi finishes, a client trickling bytes to hold an upload slot does not.
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline {
    pub grace: std::time::Duration,
    /// Bytes a second.
    pub min_rate: u64,
}

impl BodyDeadline {
    /// How long a body that has sent `received` bytes may have taken so far.
    fn allowed(&self, received: usize) -> std::time::Duration {
        self.grace + std::time::Duration::from_secs_f64(received as f64 / self.min_rate.max(1) as f64)
    }
}

impl AppState {
    /// The base URL a client reaches us at, for `result_url`.
    fn base_url(&self, headers: &HeaderMap) -> String {
        if let Some(u) = &self.public_url {
            return u.clone();
        }
        let host = headers
            .get(axum::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| {
                !h.is_empty() && h.len() < 256 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
            });
        match host {
            Some(h) => format!("http://{h}"),
            None => self.fallback_url.clone(),
        }
    }

    fn result_url(&self, headers: &HeaderMap, file: &str) -> String {
        format!("{}/v1/removebg/results/{file}", self.base_url(headers))
    }
}

/// One part of a multipart body.
pub enum Part {
    Text(String),
    File(Vec<u8>),
}

/// Every part of a multipart/form-data request, in order: the parts named in `files` as bytes
/// (each at most [`MAX_IMAGE_BYTES`], else 413), the others as text. Shared by every API that
/// takes uploads (and by the fuzz target `multipart`, with `()` for the state).
pub async fn multipart<S: Send + Sync>(req: Request, state: &S, files: &[&str]) -> Result<Vec<(String, Part)>, ApiError> {
    Ok(multipart_files(req, state, files)
        .await?
        .into_iter()
        .map(|(name, _, part)| (name, part))
        .collect())
}

/// [`multipart`], with each part's file name (as the client sent it) when it has one.
pub async fn multipart_files<S: Send + Sync>(
    req: Request,
    state: &S,
    files: &[&str],
) -> Result<Vec<(String, Option<String>, Part)>, ApiError> {
    use axum::extract::{FromRequest, Multipart};
    let mut form = Multipart::from_request(req, state)
        .await
        .map_err(|e| ApiError::bad_request("invalid_multipart", e.body_text()))?;
    let field_error = |e: axum::extract::multipart::MultipartError| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!("the request body is larger than the {} MB limit", PROCESS_BODY_LIMIT >> 20))
        } else {
            ApiError::bad_request("invalid_multipart", e.body_text())
        }
    };
    let mut parts = Vec::new();
    while let Some(field) = form.next_field().await.map_err(field_error)? {
        let name = field.name().unwrap_or_default().to_owned();
        let filename = field.file_name().map(str::to_owned);
        let part = if files.contains(&name.as_str()) {
            let bytes = field.bytes().await.map_err(field_error)?;
            if bytes.len() > MAX_IMAGE_BYTES {
                return Err(ApiError::too_large(format!(
                    "{name} is larger than the {} MB limit",
                    MAX_IMAGE_BYTES >> 20
                )));
            }
            Part::File(bytes.to_vec())
        } else {
            Part::Text(field.text().await.map_err(field_error)?)
        };
        parts.push((name, filename, part));
    }
    Ok(parts)
}

/// The subject's box in a result (an extension to the spec's responses).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Foreground {
    pub foreground_top: u32,
    pub foreground_left: u32,
    pub foreground_width: u32,
    pub foreground_height: u32,
}

impl From<[u32; 4]> for Foreground {
    fn from([left, top, width, height]: [u32; 4]) -> Foreground {
        Foreground {
            foreground_top: top,
            foreground_left: left,
            foreground_width: width,
            foreground_height: height,
        }
    }
}

impl Foreground {
    /// No subject found: an empty box at the origin.
    pub fn of(b: Option<crate::engine::BoxPx>) -> Foreground {
        b.map(|b| Foreground::from([b.left, b.top, b.width, b.height]))
            .unwrap_or(Foreground::from([0; 4]))
    }
}

/// The request's media type, lowercase, without parameters ("" when absent).
fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn is_json(media_type: &str) -> bool {
    media_type == "application/json" || media_type.ends_with("+json")
}

/// Reads the whole body (at most `limit` bytes) before anything else can fail: a client still
/// uploading when we answer 401 or 400 would otherwise see a reset connection, not the answer.
/// A body that arrives more slowly than `state.body_deadline` allows gets 408 and the connection
/// is closed. The body is held in one of the upload slots (returned, to keep while the request
/// needs its bytes; bodies limited to 1 MiB have slots of their own); a body declared too large
/// is refused before waiting for one.
async fn read_body(
    state: &AppState,
    req: Request,
    limit: usize,
) -> Result<(Parts, Bytes, tokio::sync::SemaphorePermit<'_>), ApiError> {
    use http_body_util::BodyExt as _;
    let (parts, mut body) = req.into_parts();
    let too_large = || ApiError::too_large(format!("the request body is larger than the {} MB limit", limit >> 20));
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let slots = if limit <= BATCH_BODY_LIMIT {
        &state.small_uploads
    } else {
        &state.uploads
    };
    let slot = slots.acquire().await.map_err(ApiError::internal)?;
    let started = tokio::time::Instant::now();
    let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    loop {
        let deadline = started + state.body_deadline.allowed(buf.len());
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                state.conn_stats.body_timeouts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let d = state.body_deadline;
                return Err(ApiError::request_timeout(format!(
                    "the request body arrived too slowly ({} bytes in {} s; allowed: {} s plus one second for every {} kB)",
                    buf.len(),
                    started.elapsed().as_secs(),
                    d.grace.as_secs(),
                    d.min_rate / 1000
                )));
            }
            Ok(None) => break,
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(_))) => {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    "the request body could not be read",
                ));
            }
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(too_large());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok((parts, buf.freeze(), slot))
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route(
            "/process",
            post(process::process).layer(DefaultBodyLimit::max(PROCESS_BODY_LIMIT)),
        )
        // JSON bodies are held to BATCH_BODY_LIMIT by the handler; forms of photos may be larger.
        .route(
            "/batch",
            post(batch::submit).layer(DefaultBodyLimit::max(PROCESS_BODY_LIMIT)),
        )
        .route("/batch/{id}", get(batch::poll))
        .route("/quota", get(quota::quota))
        .route("/results/{file}", get(results::result));
    // remove.bg's API v1.0, for its existing clients.
    let removebg = Router::new()
        .route(
            "/removebg",
            post(removebg_v1::removebg).layer(DefaultBodyLimit::max(PROCESS_BODY_LIMIT)),
        )
        .route("/account", get(removebg_v1::account))
        .route(
            "/improve",
            post(removebg_v1::improve).layer(DefaultBodyLimit::max(PROCESS_BODY_LIMIT)),
        );
    let mut router = Router::new().nest("/v1/removebg", api).nest("/v1.0", removebg);
    if state.rembg.is_some() {
        router = router.route(
            "/api/remove",
            get(rembg::get_remove).post(rembg::post_remove).layer(DefaultBodyLimit::max(PROCESS_BODY_LIMIT)),
        );
    }
    router
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::openapi))
        .route("/", get(ui::index))
        .route("/ui/app.js", get(ui::script))
        .route("/ui/app.css", get(ui::style))
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn(error::catch_panic))
        .layer(axum::middleware::from_fn_with_state(state.clone(), error::drain_gate))
        .layer(axum::middleware::from_fn_with_state(state.clone(), error::request_id))
        .with_state(state)
}
