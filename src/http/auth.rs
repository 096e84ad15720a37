//! Who is calling: the API key from `Authorization: Bearer …` (or `X-Api-Key`, as remove.bg
//! clients send), its scopes, and its rate limit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};

use super::AppState;
use super::error::ApiError;
use crate::clock;

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub account_id: i64,
    pub key_id: i64,
    pub scopes: Vec<String>,
}

impl Caller {
    pub fn require(&self, scope: &str) -> Result<(), ApiError> {
        if self.scopes.iter().any(|s| s == scope) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "missing_scope",
                format!("this API key lacks the scope {scope}"),
            ))
        }
    }
}

fn presented_key(parts: &Parts) -> Option<String> {
    if let Some(v) = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
        if scheme.eq_ignore_ascii_case("bearer") && !rest.trim().is_empty() {
            return Some(rest.trim().to_owned());
        }
    }
    parts
        .headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// How often `last_used_at` is written for a busy key.
const TOUCH_EVERY: i64 = 60;

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        let Some(key) = presented_key(parts) else {
            return Err(ApiError::unauthorized(
                "missing_api_key",
                "send your API key as `Authorization: Bearer xbk_live_…`",
            ));
        };
        let Some(rec) = state.jobs.db(move |s| s.find_key(&key)).await? else {
            return Err(ApiError::unauthorized("invalid_api_key", "unknown API key"));
        };
        let now = clock::now();
        if rec.revoked_at.is_some() {
            return Err(ApiError::unauthorized(
                "revoked_api_key",
                "this API key has been revoked",
            ));
        }
        if rec.expires_at.is_some_and(|t| t <= now) {
            return Err(ApiError::unauthorized("expired_api_key", "this API key has expired"));
        }
        if let Err(wait) = state.rate.check(rec.id) {
            return Err(ApiError::too_many(
                format!("rate limit exceeded for key {}; retry after {wait} s", rec.prefix),
                wait,
            ));
        }
        if rec.last_used_at.is_none_or(|t| now - t >= TOUCH_EVERY) {
            let id = rec.id;
            state.jobs.db(move |s| s.touch_key(id, now)).await?;
        }
        Ok(Caller {
            account_id: rec.account_id,
            key_id: rec.id,
            scopes: rec.scopes,
        })
    }
}

/// A token bucket per key: `rate` requests per second sustained, `burst` at once.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<i64, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: u32) -> RateLimiter {
        RateLimiter {
            rate,
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The bucket of `key` now: its size, whole tokens left, and seconds until it is full.
    pub fn status(&self, key: i64) -> (u32, u32, u64) {
        let now = Instant::now();
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let tokens = match buckets.get(&key) {
            Some((tokens, last)) => (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst),
            None => self.burst,
        };
        let full_in = ((self.burst - tokens) / self.rate).ceil() as u64;
        (self.burst as u32, tokens.floor() as u32, full_in)
    }

    /// Takes a token, or says how many whole seconds until one is available.
    pub fn check(&self, key: i64) -> Result<(), u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = buckets.entry(key).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.rate).ceil() as u64)
        }
    }
}

/// At most one poll per `interval` for each batch.
pub struct PollLimiter {
    interval: Duration,
    last: Mutex<HashMap<String, Instant>>,
}

impl PollLimiter {
    pub fn new(interval: Duration) -> PollLimiter {
        PollLimiter {
            interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    pub fn check(&self, batch: &str) -> Result<(), u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.len() > 10_000 {
            last.retain(|_, t| now.duration_since(*t) < self.interval);
        }
        if let Some(t) = last.get(batch) {
            let since = now.duration_since(*t);
            if since < self.interval {
                return Err((self.interval - since).as_secs_f64().ceil() as u64);
            }
        }
        last.insert(batch.to_owned(), now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_refuses_with_a_wait() {
        let r = RateLimiter::new(0.5, 3);
        assert!((0..3).all(|_| r.check(1).is_ok()));
        assert_eq!(r.check(1), Err(2));
        assert!(r.check(2).is_ok(), "keys have separate buckets");
        assert_eq!(r.status(1), (3, 0, 6));
        assert_eq!(r.status(3), (3, 3, 0));
    }

    #[test]
    fn polls_closer_than_the_interval_are_refused() {
        let p = PollLimiter::new(Duration::from_secs(2));
        assert!(p.check("b1").is_ok());
        assert_eq!(p.check("b1"), Err(2));
        assert!(p.check("b2").is_ok());
    }
}
