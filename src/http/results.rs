//! `GET /v1/removebg/results/{file}`: stored cutouts, no key needed (the names are unguessable),
//! until they expire.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use tokio_util::io::ReaderStream;

use super::AppState;
use super::error::ApiError;
use crate::clock;

fn gone(file: &str) -> ApiError {
    ApiError::not_found(
        "result_not_found",
        format!("no result {file}: results are kept for a limited time (see expires_at)"),
    )
}

pub async fn result(State(state): State<AppState>, Path(file): Path<String>) -> Result<Response, ApiError> {
    let safe = file.len() < 100
        && file
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
        && !file.starts_with('.');
    if !safe {
        return Err(gone(&file));
    }
    let now = clock::now();
    let name = file.clone();
    let Some(stored) = state.jobs.db(move |s| s.result(&name, now)).await? else {
        return Err(gone(&file));
    };
    let handle = match tokio::fs::File::open(state.jobs.results_dir().join(&stored.file)).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(gone(&file)),
        Err(e) => return Err(ApiError::internal(format!("opening result {file}: {e}"))),
    };
    let mut res = Body::from_stream(ReaderStream::new(handle)).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&stored.content_type).map_err(ApiError::internal)?,
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(stored.bytes));
    let max_age = (stored.expires_at - now).max(0);
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_str(&format!("private, max-age={max_age}")).map_err(ApiError::internal)?,
    );
    Ok(res)
}
