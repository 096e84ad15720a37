//! `POST /v1/removebg/batch` and `GET /v1/removebg/batch/{id}`.

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::Foreground;
use super::auth::Caller;
use super::error::ApiError;
use super::process::SCOPE_PROCESS;
use super::{AppState, BATCH_BODY_LIMIT, PROCESS_BODY_LIMIT, Part, content_type, is_json, multipart_files, read_body};
use crate::clock::rfc3339;
use crate::jobs::{Source, request};
use crate::store::JobStatus;

pub const SCOPE_WRITE: &str = "removebg:batch:write";
pub const SCOPE_READ: &str = "removebg:batch:read";
pub const MAX_ITEMS: usize = 100;
const MAX_REF_LEN: usize = 256;
const MAX_URL_LEN: usize = 4096;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    images: Vec<BatchImage>,
    /// Photos uploaded as multipart/form-data (`image_file` parts), with their file names.
    #[serde(skip)]
    uploads: Vec<(Vec<u8>, Option<String>)>,
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
    check_count(b.images.len())?;
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

fn check_count(n: usize) -> Result<(), ApiError> {
    if n == 0 {
        return Err(ApiError::bad_request(
            "no_images",
            "images must hold at least one image",
        ));
    }
    if n > MAX_ITEMS {
        return Err(ApiError::bad_request(
            "too_many_images",
            format!("a batch holds at most {MAX_ITEMS} images; this one has {n}"),
        ));
    }
    Ok(())
}

/// A batch of uploaded photos: `image_file` parts (each an item, its id the file's name), and
/// the options as text fields named as in the JSON body.
async fn parse_form<S: Send + Sync>(req: axum::extract::Request, state: &S) -> Result<BatchBody, ApiError> {
    let mut b = BatchBody::default();
    for (name, filename, part) in multipart_files(req, state, &["image_file"]).await? {
        let text = match part {
            Part::File(bytes) => {
                let id = filename.filter(|f| !f.is_empty());
                if id.as_ref().is_some_and(|id| id.len() > MAX_REF_LEN) {
                    return Err(ApiError::bad_request(
                        "invalid_request",
                        format!("the file name of image_file {} is longer than {MAX_REF_LEN} characters", b.uploads.len()),
                    ));
                }
                // Not an image at all: the whole batch is refused, before anything is charged
                // (a photo that only fails to decode fails as its own item).
                if let Err(e) = request::probe_image(&bytes) {
                    let mut err = ApiError::from(e);
                    err.message = format!(
                        "image_file {} ({}): {}",
                        b.uploads.len(),
                        id.as_deref().unwrap_or("no file name"),
                        err.message
                    );
                    return Err(err);
                }
                b.uploads.push((bytes, id));
                continue;
            }
            Part::Text(text) => text,
        };
        let slot = match name.as_str() {
            "output_format" => &mut b.output_format,
            "output_size" => &mut b.output_size,
            "bg_color" => &mut b.bg_color,
            "bg_gradient" => &mut b.bg_gradient,
            "bg_image_url" => &mut b.bg_image_url,
            "channels" => &mut b.channels,
            "refine" => &mut b.refine,
            "crop_margin" => &mut b.crop_margin,
            "crop" => {
                b.crop = Some(request::boolean("crop", &text)?);
                continue;
            }
            other => {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    format!("unknown form field {other:?} (a batch form holds image_file parts and options)"),
                ));
            }
        };
        *slot = Some(text);
    }
    check_count(b.uploads.len())?;
    Ok(b)
}

pub async fn submit(
    State(state): State<AppState>,
    req: axum::extract::Request,
) -> Result<(StatusCode, Json<Submitted>), ApiError> {
    // Photos need the upload limit and its slots; a JSON list of URLs the small ones.
    let ct = content_type(req.headers());
    let form = ct == "multipart/form-data";
    let limit = if form { PROCESS_BODY_LIMIT } else { BATCH_BODY_LIMIT };
    let (mut parts, body, _slot) = read_body(&state, req, limit).await?;
    let caller = Caller::from_request_parts(&mut parts, &state).await?;
    caller.require(SCOPE_WRITE)?;
    caller.require(SCOPE_PROCESS)?;
    let b = if form {
        parse_form(axum::extract::Request::from_parts(parts, axum::body::Body::from(body)), &state).await?
    } else if is_json(&ct) {
        parse(&body)?
    } else {
        return Err(ApiError::bad_request(
            "unsupported_media_type",
            "send the batch as application/json (image URLs) or multipart/form-data (photos)",
        ));
    };
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
    let total = b.images.len() + b.uploads.len();
    let items = b
        .images
        .into_iter()
        .map(|i| (Source::Url(i.url.trim().to_owned()), i.id))
        .chain(b.uploads.into_iter().map(|(bytes, id)| (Source::Bytes(bytes), id)))
        .collect();
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
