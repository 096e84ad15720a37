//! `GET /v1/removebg/quota`.

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use crate::clock::rfc3339;

pub const SCOPE_QUOTA: &str = "removebg:quota:read";

#[derive(Debug, Serialize)]
pub struct QuotaResponse {
    plan: String,
    credits_total: i64,
    credits_used: i64,
    credits_remaining: i64,
    resets_at: String,
}

pub async fn quota(State(state): State<AppState>, caller: Caller) -> Result<Json<QuotaResponse>, ApiError> {
    caller.require(SCOPE_QUOTA)?;
    let account = caller.account_id;
    let q = state.jobs.db(move |s| s.quota(account)).await?;
    Ok(Json(QuotaResponse {
        plan: q.plan,
        credits_total: q.credits_total,
        credits_used: q.credits_used,
        credits_remaining: q.credits_remaining,
        resets_at: rfc3339(q.resets_at),
    }))
}
