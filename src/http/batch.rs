//! `POST /v1/removebg/batch` and `GET /v1/removebg/batch/{id}`.

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::Foreground;
use super::auth::Caller;
use super::error::ApiError;
use super::process::SCOPE_PROCESS;
use super::{AppState, BATCH_BODY_LIMIT, content_type, is_json, read_body};
use crate::clock::rfc3339;
use crate::jobs::request;
use crate::store::JobStatus;

pub const SCOPE_WRITE: &str = "removebg:batch:write";
pub const SCOPE_READ: &str = "removebg:batch:read";
pub const MAX_ITEMS: usize = 100;
const MAX_REF_LEN: usize = 256;
const MAX_URL_LEN: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    images: Vec<BatchImage>,
    output_format: Option<String>,
    output_size: Option<String>,
    bg_color: Option<String>,
    // Extensions, as in /process.
    crop: Option<bool>,
    crop_margin: Option<String>,
    bg_image_url: Option<String>,
    bg_gradient: Option<String>,
    channels: Option<String>,
    refine: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchImage {
    url: String,
    id: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Submitted {
    job_id: String,
    status: &'static str,
    total: usize,
    completed: u32,
    failed: u32,
    credits_reserved: usize,
    created_at: String,
}

#[derive(Debug, Serialize)]
pub struct Progress {
    job_id: String,
    status: &'static str,
    total: i64,
    completed: i64,
    failed: i64,
    credits_used: i64,
    items: Vec<Item>,
}

#[derive(Debug, Serialize)]
pub struct Item {
    id: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    result_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    height: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    foreground: Option<Foreground>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<String>,
}

fn parse(body: &[u8]) -> Result<BatchBody, ApiError> {
    let b: BatchBody = serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            ApiError::bad_request("invalid_request", format!("invalid request body: {e}"))
        } else {
            ApiError::bad_request("malformed_json", format!("the body is not valid JSON: {e}"))
        }
    })?;
    if b.images.is_empty() {
        return Err(ApiError::bad_request(
            "no_images",
            "images must hold at least one image",
        ));
    }
    if b.images.len() > MAX_ITEMS {
        return Err(ApiError::bad_request(
            "too_many_images",
            format!(
                "a batch holds at most {MAX_ITEMS} images; this one has {}",
                b.images.len()
            ),
        ));
    }
    for (i, img) in b.images.iter().enumerate() {
        let url = img.url.trim();
        let scheme_ok = url.len() <= MAX_URL_LEN
            && reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !scheme_ok {
            return Err(ApiError::bad_request(
                "invalid_url",
                format!("images[{i}].url {url:?} is not an http:// or https:// URL"),
            ));
        }
        if img.id.as_ref().is_some_and(|id| id.len() > MAX_REF_LEN) {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("images[{i}].id is longer than {MAX_REF_LEN} characters"),
            ));
        }
    }
    Ok(b)
}

pub async fn submit(
    State(state): State<AppState>,
    req: axum::extract::Request,
) -> Result<(StatusCode, Json<Submitted>), ApiError> {
    let (mut parts, body, _slot) = read_body(&state, req, BATCH_BODY_LIMIT).await?;
    let caller = Caller::from_request_parts(&mut parts, &state).await?;
    caller.require(SCOPE_WRITE)?;
    caller.require(SCOPE_PROCESS)?;
    if !is_json(&content_type(&parts.headers)) {
        return Err(ApiError::bad_request(
            "unsupported_media_type",
            "send the batch as application/json",
        ));
    }
    let b = parse(&body)?;
    let fields = request::OptionFields {
        bg_color: b.bg_color,
        bg_gradient: b.bg_gradient,
        bg_image_url: b.bg_image_url,
        channels: b.channels,
        refine: b.refine,
        crop: b.crop,
        crop_margin: b.crop_margin,
    };
    let opts = request::options(b.output_format.as_deref(), b.output_size.as_deref(), &fields)?;
    let total = b.images.len();
    let items = b.images.into_iter().map(|i| (i.url.trim().to_owned(), i.id)).collect();
    let (job_id, created) = state.jobs.submit_batch(caller.account_id, items, opts).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Submitted {
            job_id,
            status: "processing",
            total,
            completed: 0,
            failed: 0,
            credits_reserved: total,
            created_at: rfc3339(created),
        }),
    ))
}

pub async fn poll(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Progress>, ApiError> {
    caller.require(SCOPE_READ)?;
    let account = caller.account_id;
    let lookup = id.clone();
    let Some(view) = state.jobs.db(move |s| s.batch(account, &lookup)).await? else {
        return Err(ApiError::not_found("batch_not_found", format!("no batch job {id}")));
    };
    if let Err(wait) = state.polls.check(&id) {
        return Err(ApiError::too_many(
            format!("poll batch {id} at most once every 2 seconds; retry after {wait} s"),
            wait,
        ));
    }
    let status = if !view.finished() {
        "processing"
    } else if view.completed > 0 {
        "completed"
    } else {
        "failed"
    };
    let items = view
        .items
        .into_iter()
        .map(|i| {
            let done = i.status == JobStatus::Completed;
            Item {
                id: i.client_ref.unwrap_or(i.job_id),
                status: match i.status {
                    JobStatus::Queued => "queued",
                    JobStatus::Running => "processing",
                    JobStatus::Completed => "completed",
                    JobStatus::Failed => "failed",
                },
                result_url: i.result_file.filter(|_| done).map(|f| state.result_url(&headers, &f)),
                width: i.width.filter(|_| done),
                height: i.height.filter(|_| done),
                expires_at: i.expires_at.filter(|_| done).map(rfc3339),
                foreground: i.foreground.filter(|_| done).map(Foreground::from),
                error: i.error_message,
                error_code: i.error_code,
            }
        })
        .collect();
    Ok(Json(Progress {
        job_id: view.id,
        status,
        total: view.total,
        completed: view.completed,
        failed: view.failed,
        credits_used: view.completed,
        items,
    }))
}
