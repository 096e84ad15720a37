//! One error shape for every response that is not a success:
//! `{"error": {"status": 402, "code": "insufficient_credits", "message": "…", "request_id": "req_…"}}`.
//! Status codes are decided here and only here. 500s are logged in full and shown as nothing
//! more than "internal error" plus the request id.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tracing::Instrument;

use super::AppState;
use crate::engine::{EngineError, ImageError};
use crate::fetch::FetchError;
use crate::jobs::JobError;
use crate::store::StoreError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
    /// Whose error body to render.
    pub shape: Shape,
}

/// The error bodies the daemon speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shape {
    /// `{"error": {"status", "code", "message", "request_id"}}` (api-spec.txt).
    #[default]
    Native,
    /// remove.bg's `{"errors": [{"title", "code", "detail"}]}`.
    RemoveBg,
    /// rembg's (FastAPI's) `{"detail": "..."}`.
    Rembg,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            shape: Shape::Native,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn too_many(message: impl Into<String>, retry_after: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after.max(1)),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
        }
    }

    /// A request body slower than the body deadline; the connection is closed after it.
    pub fn request_timeout(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", message)
    }

    /// Logs the cause; the client only learns that something went wrong on our side.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error; contact the operator with the request id",
        )
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> ApiError {
        let code = e.code();
        match e {
            JobError::Invalid { code, message } => ApiError::bad_request(code, message),
            JobError::TooLarge(message) => ApiError::too_large(message),
            JobError::NoCredits { .. } => ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                code,
                format!("{e}; wait for the monthly reset or ask the operator for more credits"),
            ),
            JobError::Fetch(FetchError::TooLarge { .. }) => ApiError::too_large(e.to_string()),
            JobError::Fetch(f) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, f.to_string()),
            JobError::Engine(EngineError::Invalid { code, message }) => ApiError::bad_request(code, message),
            JobError::Engine(EngineError::Image(i @ ImageError::Encode(_))) => ApiError::internal(i),
            JobError::Engine(EngineError::Image(i)) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, i.to_string())
            }
            JobError::NotFound(m) => ApiError::not_found(code, m),
            JobError::Storage(m) => ApiError::new(StatusCode::INSUFFICIENT_STORAGE, code, m),
            JobError::Engine(_) | JobError::Internal(_) => ApiError::internal(e),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        JobError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // The body needs the request id, which only the middleware knows: it renders this.
        let mut res = self.status.into_response();
        if let Some(secs) = self.retry_after {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may still be on its way: do not read it as the next request.
            res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        res.extensions_mut().insert(self);
        res
    }
}

fn render(err: &ApiError, id: &str) -> Response {
    let body = match err.shape {
        Shape::Native => json!({
            "error": {
                "status": err.status.as_u16(),
                "code": err.code,
                "message": err.message,
                "request_id": id,
            }
        }),
        Shape::RemoveBg => json!({
            "errors": [{
                "title": removebg_title(err),
                "code": err.code,
                "detail": err.message,
                "request_id": id,
            }]
        }),
        Shape::Rembg => json!({ "detail": err.message, "code": err.code, "request_id": id }),
    };
    (err.status, axum::Json(body)).into_response()
}

/// remove.bg's titles: short, by kind.
fn removebg_title(err: &ApiError) -> &'static str {
    match (err.status.as_u16(), err.code) {
        (_, "missing_source") => "No image given",
        (_, "missing_api_key") => "Missing API Key",
        (_, "file_too_large") => "File too large",
        (_, "resolution_too_high") => "Input image resolution too high",
        (_, "invalid_file_type") => "Invalid file type",
        (_, "failed_to_read_image") => "Failed to read image",
        (_, "failed_image_download") => "Failed to download image",
        (_, "failed_bg_download") | (_, "invalid_bg_image") => "Failed to read background image",
        (_, "unknown_foreground") => "Could not identify foreground in image",
        (_, "multiple_sources") => "Multiple image sources given",
        (_, "multiple_bg_sources") => "Multiple background sources given",
        (400, _) => "Invalid parameters or input file unprocessable",
        (402, _) => "Insufficient credits",
        (403, _) => "Authentication failed",
        (408, _) => "Request timeout",
        (429, _) => "Rate limit exceeded",
        (503, _) => "Service unavailable",
        (507, _) => "Insufficient storage",
        (s, _) if s >= 500 => "Internal error",
        _ => "Request failed",
    }
}

/// Gives every request an id and a span, renders errors with it, sets `X-Request-Id`, and turns
/// axum's own plain-text rejections (405) into the JSON shape.
pub async fn request_id(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let id = format!("req_{}", crate::store::token(8));
    let route = req.extensions().get::<MatchedPath>().cloned();
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let started = std::time::Instant::now();
    let mut res = next.run(req).instrument(span.clone()).await;
    let err = res.extensions_mut().remove::<ApiError>().or_else(|| {
        (res.status() == StatusCode::METHOD_NOT_ALLOWED).then(|| {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not accept that method",
            )
        })
    });
    if let Some(err) = err {
        let mut rendered = render(&err, &id);
        for name in [header::RETRY_AFTER, header::ALLOW, header::CONNECTION] {
            if let Some(v) = res.headers().get(&name) {
                rendered.headers_mut().insert(name, v.clone());
            }
        }
        res = rendered;
    }
    let took = started.elapsed();
    state
        .requests
        .record(route.as_ref().map(MatchedPath::as_str), res.status().as_u16(), took);
    span.in_scope(|| {
        tracing::info!(
            status = res.status().as_u16(),
            ms = took.as_millis() as u64,
            "request done"
        )
    });
    res.headers_mut().insert(
        "x-request-id",
        HeaderValue::from_str(&id).expect("hex id is a valid header"),
    );
    res
}

/// Which API's error shape a path speaks.
fn shape_of(path: &str) -> Shape {
    if path.starts_with("/v1.0/") {
        Shape::RemoveBg
    } else if path.starts_with("/api/") {
        Shape::Rembg
    } else {
        Shape::Native
    }
}

/// While the daemon drains, new API requests get 503 `shutting_down` (the operator endpoints
/// keep answering, `/readyz` with 503); requests already inside run to the end, and the drain
/// waits for them through [`super::InFlight`].
pub async fn drain_gate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if matches!(path, "/healthz" | "/readyz" | "/metrics" | "/openapi.json") {
        return next.run(req).await;
    }
    // In before looking: a drain that starts after this check waits for this request.
    let _in = state.in_flight.enter();
    if state.draining.is_cancelled() {
        let mut res = ApiError {
            retry_after: Some(5),
            shape: shape_of(path),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "removebgd is shutting down; retry in a few seconds (or on another node)",
            )
        }
        .into_response();
        res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return res;
    }
    next.run(req).await
}

/// A handler that panics (a bug) answers 500 in its API's error shape, logged with its request
/// id, instead of dropping the connection with no answer.
pub async fn catch_panic(req: Request, next: Next) -> Response {
    use futures_util::FutureExt as _;
    let shape = shape_of(req.uri().path());
    match std::panic::AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(res) => res,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            ApiError {
                shape,
                ..ApiError::internal(format!("the handler panicked: {what}"))
            }
            .into_response()
        }
    }
}

/// Unknown paths.
pub async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such endpoint; see the API section of the README")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tower::ServiceExt as _;

    async fn bug() -> &'static str {
        panic!("a bug")
    }

    async fn formatted_bug() -> &'static str {
        panic!("{}", String::from("another bug"))
    }

    async fn call(path: &str) -> Response {
        let app = axum::Router::new()
            .route("/v1/removebg/quota", get(bug))
            .route("/v1.0/account", get(formatted_bug))
            .route("/healthz", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(catch_panic));
        app.oneshot(Request::get(path).body(axum::body::Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_in_its_apis_shape() {
        let res = call("/v1/removebg/quota").await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let err = res.extensions().get::<ApiError>().expect("rendered by request_id");
        assert_eq!((err.code, err.shape), ("internal_error", Shape::Native));
        assert!(!err.message.contains("a bug"), "the panic stays in the log: {}", err.message);

        let res = call("/v1.0/account").await;
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(res.extensions().get::<ApiError>().unwrap().shape, Shape::RemoveBg);

        assert_eq!(call("/healthz").await.status(), StatusCode::OK);
    }
}
