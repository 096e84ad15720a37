//! `POST /v1/removebg/process`: one image by URL, base64 (JSON) or upload (multipart).

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose;
use serde::Serialize;

use super::auth::Caller;
use super::error::ApiError;
use super::{
    AppState, Foreground, MAX_BASE64_RESULT, PROCESS_BODY_LIMIT, Part, content_type, is_json, multipart, read_body,
};
use crate::clock::rfc3339;
use crate::jobs::request::{self, ProcessRequest, parse_json};

pub const SCOPE_PROCESS: &str = "removebg:images:process";

#[derive(Debug, Serialize)]
struct ProcessResponse {
    id: String,
    result_url: String,
    result_base64: Option<String>,
    width: u32,
    height: u32,
    credits_used: u32,
    expires_at: String,
    #[serde(flatten)]
    foreground: Foreground,
}

/// `/v1/removebg/process`'s form: its fields, and the uploaded `image_file` if any.
pub async fn parse_multipart<S: Send + Sync>(
    req: Request,
    state: &S,
) -> Result<(ProcessRequest, Option<Vec<u8>>), ApiError> {
    let mut body = ProcessRequest::default();
    let mut file = None;
    for (name, part) in multipart(req, state, &["image_file"]).await? {
        let text = match part {
            Part::File(bytes) => {
                file = Some(bytes);
                continue;
            }
            Part::Text(text) => text,
        };
        let slot = match name.as_str() {
            "image_url" => &mut body.image_url,
            "image_base64" => &mut body.image_base64,
            "output_format" => &mut body.output_format,
            "output_size" => &mut body.output_size,
            "bg_color" => &mut body.bg_color,
            "bg_gradient" => &mut body.bg_gradient,
            "bg_image_url" => &mut body.bg_image_url,
            "channels" => &mut body.channels,
            "refine" => &mut body.refine,
            "crop_margin" => &mut body.crop_margin,
            "return_base64" => {
                body.return_base64 = Some(request::boolean("return_base64", &text)?);
                continue;
            }
            "crop" => {
                body.crop = Some(request::boolean("crop", &text)?);
                continue;
            }
            other => {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    format!("unknown form field {other:?}"),
                ));
            }
        };
        *slot = Some(text);
    }
    Ok((body, file))
}

pub async fn process(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let (mut parts, mut bytes, _slot) = read_body(&state, req, PROCESS_BODY_LIMIT).await?;
    let caller = Caller::from_request_parts(&mut parts, &state).await?;
    caller.require(SCOPE_PROCESS)?;
    let headers = parts.headers.clone();
    let ct = content_type(&headers);
    let (body, upload) = if ct == "multipart/form-data" {
        parse_multipart(Request::from_parts(parts, Body::from(bytes)), &state).await?
    } else if is_json(&ct) {
        // The raw body goes once parsed: it is not held while the job waits its turn.
        (parse_json(&std::mem::take(&mut bytes))?, None)
    } else {
        return Err(ApiError::bad_request(
            "unsupported_media_type",
            format!(
                "Content-Type {:?} is not accepted; send application/json or multipart/form-data",
                if ct.is_empty() { "(none)" } else { &ct }
            ),
        ));
    };

    if body.client_ref.is_some() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "unknown field `ref` (it belongs to MQTT submissions)",
        ));
    }
    let return_base64 = body.return_base64.unwrap_or(false);
    let (source, opts) = body.into_job(upload)?;
    let done = state
        .jobs
        .process(caller.account_id, source, opts, Some(state.base_url(&headers)))
        .await?;
    let inline = return_base64 && done.bytes.len() <= MAX_BASE64_RESULT;
    let response = ProcessResponse {
        result_url: state.result_url(&headers, &done.file),
        result_base64: inline.then(|| general_purpose::STANDARD.encode(done.bytes.as_slice())),
        id: done.id,
        width: done.width,
        height: done.height,
        credits_used: 1,
        expires_at: rfc3339(done.expires_at),
        foreground: Foreground::of(done.foreground),
    };
    let mut res = (StatusCode::OK, axum::Json(response)).into_response();
    res.headers_mut().insert("x-credits-charged", HeaderValue::from(1));
    if return_base64 && !inline {
        res.headers_mut()
            .insert("x-result-base64", HeaderValue::from_static("omitted-too-large"));
    }
    Ok(res)
}
