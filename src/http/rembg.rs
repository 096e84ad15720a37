//! rembg's HTTP server API (`GET`/`POST /api/remove`), opt-in (README, "rembg's server API"):
//! rembg's callers send no key, so the operator names the account it charges, and may require a
//! key anyway. Replies are `image/png`; errors are FastAPI's `{"detail": "..."}`.

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::auth::Caller;
use super::error::{ApiError, Shape};
use super::process::SCOPE_PROCESS;
use super::{AppState, PROCESS_BODY_LIMIT, Part, content_type, multipart, read_body};
use crate::jobs::Source;
use crate::jobs::rembg;

/// The rembg API's settings, when it is on.
#[derive(Debug, Clone)]
pub struct RembgApi {
    /// Charged for requests without a key.
    pub account_id: i64,
    /// Every request must carry a key (of any account, with the process scope), and that key's
    /// account is charged.
    pub require_key: bool,
}

/// The rate-limit bucket of anonymous rembg callers (key ids are positive).
const ANONYMOUS: i64 = -1;

fn to_rembg(mut e: ApiError) -> ApiError {
    e.shape = Shape::Rembg;
    e
}

fn query_pairs(req: &Request) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// The account to charge: the key's when one is required, else the configured one.
async fn account(parts: &mut axum::http::request::Parts, state: &AppState) -> Result<i64, ApiError> {
    let api = state.rembg.as_ref().expect("routes exist only when the API is on");
    if api.require_key {
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require(SCOPE_PROCESS)?;
        return Ok(caller.account_id);
    }
    if let Err(wait) = state.rate.check(ANONYMOUS) {
        return Err(ApiError::too_many(format!("rate limit exceeded; retry after {wait} s"), wait));
    }
    Ok(api.account_id)
}

async fn cut(state: &AppState, account: i64, source: Source, fields: &[(String, String)]) -> Result<Response, ApiError> {
    let opts = rembg::options(fields, &state.model)?;
    let done = state.jobs.process(account, source, opts, None).await?;
    let mut res = Body::from(done.bytes.to_vec()).into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    Ok(res)
}

/// `GET /api/remove?url=...`
pub async fn get_remove(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    async {
        let fields = query_pairs(&req);
        let (mut parts, _) = req.into_parts();
        let account = account(&mut parts, &state).await?;
        let url = fields
            .iter()
            .rev()
            .find(|(k, _)| k == "url")
            .map(|(_, v)| v.trim().to_owned())
            .filter(|u| !u.is_empty())
            .ok_or_else(|| ApiError::bad_request("missing_url", "give the image as ?url=http://..."))?;
        cut(&state, account, Source::Url(url), &fields).await
    }
    .await
    .map_err(to_rembg)
}

/// `POST /api/remove` with a multipart `file` (parameters as form fields or in the query).
pub async fn post_remove(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    async {
        let mut fields = query_pairs(&req);
        let (mut parts, body, _slot) = read_body(&state, req, PROCESS_BODY_LIMIT).await?;
        let account = account(&mut parts, &state).await?;
        if content_type(&parts.headers) != "multipart/form-data" {
            return Err(ApiError::bad_request(
                "invalid_request",
                "send the image as a multipart/form-data part named `file`",
            ));
        }
        let req = Request::from_parts(parts, Body::from(body));
        let mut file = None;
        for (name, part) in multipart(req, &state, &["file"]).await? {
            match part {
                Part::File(bytes) => file = Some(bytes),
                Part::Text(text) => fields.push((name, text)),
            }
        }
        let file = file.ok_or_else(|| ApiError::bad_request("missing_file", "give the image as a part named `file`"))?;
        cut(&state, account, Source::Bytes(file), &fields).await
    }
    .await
    .map_err(to_rembg)
}
