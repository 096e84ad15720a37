//! remove.bg's API v1.0 on the same daemon: `POST /v1.0/removebg`, `GET /v1.0/account` and
//! `POST /v1.0/improve`, with remove.bg's fields, headers, statuses and error body, so that its
//! clients work unchanged (README, "Using existing remove.bg and rembg clients"). The keys,
//! credits, limits, fetch policy, memory bound, MQTT mirror and metrics are the native API's.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose;
use serde_json::{Value as Json, json};

use super::auth::Caller;
use super::error::{ApiError, Shape};
use super::process::SCOPE_PROCESS;
use super::quota::SCOPE_QUOTA;
use super::{AppState, PROCESS_BODY_LIMIT, Part, content_type, is_json, multipart, read_body};
use crate::clock;
use crate::jobs::removebg::{self, Value};
use crate::jobs::request::{decode_base64, probe_image};

/// Our errors in remove.bg's statuses and codes (README lists the mapping). Every one of them
/// has charged nothing.
fn to_removebg(mut e: ApiError) -> ApiError {
    let (status, code) = match e.code {
        "missing_api_key" | "invalid_api_key" | "revoked_api_key" | "expired_api_key" | "missing_scope" => {
            (StatusCode::FORBIDDEN, e.code)
        }
        "rate_limited" => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded"),
        "insufficient_credits" => (StatusCode::PAYMENT_REQUIRED, e.code),
        "payload_too_large" => (StatusCode::BAD_REQUEST, "file_too_large"),
        "image_too_large" => (StatusCode::BAD_REQUEST, "resolution_too_high"),
        "unsupported_format" | "not_an_image" => (StatusCode::BAD_REQUEST, "invalid_file_type"),
        "corrupt_image" | "empty_image" => (StatusCode::BAD_REQUEST, "failed_to_read_image"),
        "invalid_url" | "unsupported_scheme" => (StatusCode::BAD_REQUEST, "invalid_image_url"),
        "address_refused" | "fetch_failed" | "fetch_timeout" | "fetch_status" | "too_many_redirects"
        | "fetch_unavailable" => (StatusCode::BAD_REQUEST, "failed_image_download"),
        _ if e.status.is_client_error() && e.status != StatusCode::METHOD_NOT_ALLOWED => {
            (StatusCode::BAD_REQUEST, e.code)
        }
        _ => (e.status, e.code),
    };
    e.status = status;
    e.code = code;
    e.shape = Shape::RemoveBg;
    e
}

/// The caller, with authentication failures as remove.bg's 403.
async fn caller(parts: &mut Parts, state: &AppState, scope: &str) -> Result<Caller, ApiError> {
    let caller = Caller::from_request_parts(parts, state).await?;
    caller.require(scope)?;
    Ok(caller)
}

/// Every field of a multipart, JSON or form body, in order.
async fn fields(parts: Parts, body: Bytes, state: &AppState) -> Result<Vec<(String, Value)>, ApiError> {
    let ct = content_type(&parts.headers);
    let mut out = Vec::new();
    if ct == "multipart/form-data" {
        let req = Request::from_parts(parts, Body::from(body));
        for (name, part) in multipart(req, state, &["image_file", "bg_image_file"]).await? {
            out.push((
                name,
                match part {
                    Part::File(bytes) => Value::File(bytes),
                    Part::Text(text) => Value::Text(text),
                },
            ));
        }
    } else if is_json(&ct) {
        let map: serde_json::Map<String, Json> = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("malformed_json", format!("the body is not a JSON object: {e}")))?;
        for (name, v) in map {
            match v {
                Json::Null => {}
                Json::Bool(b) => out.push((name, Value::Bool(b))),
                Json::String(s) => out.push((name, Value::Text(s))),
                other => out.push((name, Value::Text(other.to_string()))),
            }
        }
    } else if ct == "application/x-www-form-urlencoded" {
        for (name, v) in form_urlencoded::parse(&body) {
            let v = if name == "image_file_b64" {
                // A `+` sent unencoded arrives as a space; base64 has no spaces.
                v.replace(' ', "+")
            } else {
                v.into_owned()
            };
            out.push((name.into_owned(), Value::Text(v)));
        }
    } else {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!(
                "Content-Type {:?} is not accepted; send multipart/form-data, application/json or \
                 application/x-www-form-urlencoded",
                if ct.is_empty() { "(none)" } else { &ct }
            ),
        ));
    }
    Ok(out)
}

/// Whether the client asked for JSON (`Accept: application/json`) rather than the image.
fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|m| m.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"))
}

fn set(headers: &mut HeaderMap, name: &'static str, v: impl ToString) {
    if let Ok(v) = HeaderValue::from_str(&v.to_string()) {
        headers.insert(name, v);
    }
}

/// `X-RateLimit-*`: the key's token bucket (README, "Rate limits").
fn rate_headers(headers: &mut HeaderMap, state: &AppState, caller: &Caller) {
    let (limit, remaining, full_in) = state.rate.status(caller.key_id);
    set(headers, "x-ratelimit-limit", limit);
    set(headers, "x-ratelimit-remaining", remaining);
    set(headers, "x-ratelimit-reset", clock::now() + full_in as i64);
}

pub async fn removebg(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    remove(state, req).await.map_err(to_removebg)
}

async fn remove(state: AppState, req: Request) -> Result<Response, ApiError> {
    let (mut parts, body, _slot) = read_body(&state, req, PROCESS_BODY_LIMIT).await?;
    let caller = caller(&mut parts, &state, SCOPE_PROCESS).await?;
    let headers = parts.headers.clone();
    let job = removebg::parse(fields(parts, body, &state).await?)?;
    let done = state
        .jobs
        .process(caller.account_id, job.source, job.options, Some(state.base_url(&headers)))
        .await?;
    let fg = done.foreground.unwrap_or_default();
    let mut res = if wants_json(&headers) {
        axum::Json(json!({
            "data": {
                "result_b64": general_purpose::STANDARD.encode(done.bytes.as_slice()),
                "foreground_top": fg.top,
                "foreground_left": fg.left,
                "foreground_width": fg.width,
                "foreground_height": fg.height,
            }
        }))
        .into_response()
    } else {
        let mut res = Body::from(done.bytes.to_vec()).into_response();
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(done.content_type));
        res
    };
    let h = res.headers_mut();
    set(h, "x-credits-charged", 1);
    set(h, "x-width", done.width);
    set(h, "x-height", done.height);
    if !job.type_level_none {
        set(h, "x-type", job.detected_type);
    }
    set(h, "x-foreground-top", fg.top);
    set(h, "x-foreground-left", fg.left);
    set(h, "x-foreground-width", fg.width);
    set(h, "x-foreground-height", fg.height);
    set(h, "x-result-id", &done.id);
    rate_headers(h, &state, &caller);
    Ok(res)
}

pub async fn account(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    async {
        let (mut parts, _) = req.into_parts();
        let caller = caller(&mut parts, &state, SCOPE_QUOTA).await?;
        let account = caller.account_id;
        let q = state.jobs.db(move |s| s.quota(account)).await?;
        let mut res = axum::Json(json!({
            "data": {
                "attributes": {
                    "credits": {
                        "total": q.credits_remaining,
                        "subscription": q.credits_remaining,
                        "payg": 0,
                        "enterprise": 0,
                    },
                    "api": { "free_calls": 0, "sizes": "all" },
                }
            }
        }))
        .into_response();
        rate_headers(res.headers_mut(), &state, &caller);
        Ok(res)
    }
    .await
    .map_err(to_removebg)
}

/// Accepted and answered with an id; nothing is kept (README: there is no one to send
/// improvement samples to on an appliance).
pub async fn improve(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    async {
        let (mut parts, body, _slot) = read_body(&state, req, PROCESS_BODY_LIMIT).await?;
        let caller = caller(&mut parts, &state, SCOPE_PROCESS).await?;
        let fields = fields(parts, body, &state).await?;
        let given: Vec<&(String, Value)> = fields
            .iter()
            .filter(|(n, v)| {
                matches!(n.as_str(), "image_file" | "image_file_b64" | "image_url")
                    && !matches!(v, Value::Text(t) if t.trim().is_empty())
            })
            .collect();
        let [(name, value)] = given[..] else {
            return Err(ApiError::bad_request(
                if given.is_empty() { "missing_source" } else { "multiple_sources" },
                "Please provide exactly one of image_url, image_file and image_file_b64.",
            ));
        };
        // Checked as /removebg checks them (an upload must be an image), though nothing is kept.
        match (name.as_str(), value) {
            ("image_file", Value::File(bytes)) => probe_image(bytes)?,
            ("image_file_b64", Value::Text(t)) => {
                let bytes =
                    decode_base64(t).map_err(|e| ApiError::bad_request("invalid_image_file_b64", e.to_string()))?;
                probe_image(&bytes)?;
            }
            ("image_url", Value::Text(u)) if u.trim().starts_with("http://") || u.trim().starts_with("https://") => {}
            (name, _) => {
                return Err(ApiError::bad_request(
                    if name == "image_url" { "invalid_image_url" } else { "invalid_request" },
                    format!("{name} is not a valid image source"),
                ));
            }
        }
        let hex = crate::store::token(16);
        let id = format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..]);
        let mut res = axum::Json(json!({ "id": id })).into_response();
        rate_headers(res.headers_mut(), &state, &caller);
        Ok(res)
    }
    .await
    .map_err(to_removebg)
}
