//! `GET /openapi.json`: the OpenAPI 3.1 document of every route (kept by hand in
//! docs/openapi.json; tests/openapi.rs proves it matches the router, and schemathesis in CI that
//! the responses conform).

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

pub const DOCUMENT: &str = include_str!("../../docs/openapi.json");

pub async fn openapi() -> Response {
    let mut res = DOCUMENT.into_response();
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}
