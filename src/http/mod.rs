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
pub use rembg::RembgApi;

use crate::jobs::Jobs;
use crate::jobs::request::MAX_IMAGE_BYTES;

/// Largest request body for /process: a 10 MiB image as base64 (4/3) plus JSON or multipart framing.
pub const PROCESS_BODY_LIMIT: usize = 15 * 1024 * 1024;
/// Largest request body for /batch: 100 URLs need far less.
pub const BATCH_BODY_LIMIT: usize = 1024 * 1024;
/// Request bodies being received or waiting for their job at once; more wait their turn, so a
/// burst of uploads cannot hold more than about this many x 15 MiB in memory.
pub const MAX_CONCURRENT_UPLOADS: usize = 8;
/// `return_base64` results larger than this come back as `result_url` only.
pub const MAX_BASE64_RESULT: usize = 5 * 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub jobs: Jobs,
    pub rate: Arc<RateLimiter>,
    pub polls: Arc<PollLimiter>,
    /// Bounds the request bodies held in memory (see [`MAX_CONCURRENT_UPLOADS`]).
    pub uploads: Arc<tokio::sync::Semaphore>,
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
enum Part {
    Text(String),
    File(Vec<u8>),
}

/// Every part of a multipart/form-data request, in order: the parts named in `files` as bytes
/// (each at most [`MAX_IMAGE_BYTES`], else 413), the others as text. Shared by every API that
/// takes uploads.
async fn multipart(req: Request, state: &AppState, files: &[&str]) -> Result<Vec<(String, Part)>, ApiError> {
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
        parts.push((name, part));
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
async fn read_body(req: Request, limit: usize) -> Result<(Parts, Bytes), ApiError> {
    let (parts, body) = req.into_parts();
    let too_large = || ApiError::too_large(format!("the request body is larger than the {} MB limit", limit >> 20));
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => Ok((parts, bytes)),
        Err(e) => {
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(c) = cause {
                if c.is::<http_body_util::LengthLimitError>() {
                    return Err(too_large());
                }
                cause = c.source();
            }
            Err(ApiError::bad_request(
                "invalid_request",
                "the request body could not be read",
            ))
        }
    }
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route(
            "/process",
            post(process::process).layer(DefaultBodyLimit::max(PROCESS_BODY_LIMIT)),
        )
        .route(
            "/batch",
            post(batch::submit).layer(DefaultBodyLimit::max(BATCH_BODY_LIMIT)),
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
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), error::request_id))
        .with_state(state)
}
