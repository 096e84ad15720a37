//! `POST /v1/removebg/process`: one image by URL, base64 (JSON) or upload (multipart).

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Multipart, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, general_purpose};
use serde::{Deserialize, Serialize};

use super::auth::Caller;
use super::error::ApiError;
use super::{AppState, MAX_BASE64_RESULT, MAX_IMAGE_BYTES, PROCESS_BODY_LIMIT, read_body};
use crate::clock::rfc3339;
use crate::engine::{BgColor, OutputFormat, OutputSize};
use crate::jobs::{Options, Source};

pub const SCOPE_PROCESS: &str = "removebg:images:process";

/// The JSON body. Unknown fields are refused so that a typo (`bg_colour`) is not silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProcessBody {
    image_url: Option<String>,
    image_base64: Option<String>,
    output_format: Option<String>,
    output_size: Option<String>,
    bg_color: Option<String>,
    return_base64: Option<bool>,
}

#[derive(Debug, Serialize)]
struct ProcessResponse {
    id: String,
    result_url: String,
    result_base64: Option<String>,
    width: u32,
    height: u32,
    credits_used: u32,
    expires_at: String,
}

fn nonempty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

pub fn output_format(v: Option<&str>) -> Result<OutputFormat, ApiError> {
    match v.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("png") => Ok(OutputFormat::Png),
        Some("webp") => Ok(OutputFormat::Webp),
        Some(other) => Err(ApiError::bad_request(
            "invalid_output_format",
            format!("output_format {other:?} is not supported; use \"png\" or \"webp\""),
        )),
    }
}

pub fn output_size(v: Option<&str>) -> Result<OutputSize, ApiError> {
    match v.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("full") => Ok(OutputSize::Full),
        Some("preview") => Ok(OutputSize::Preview),
        Some(other) => Err(ApiError::bad_request(
            "invalid_output_size",
            format!("output_size {other:?} is not supported; use \"preview\" or \"full\""),
        )),
    }
}

pub fn bg_color(v: Option<&str>) -> Result<Option<BgColor>, ApiError> {
    match v.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|e: crate::engine::ColorError| ApiError::bad_request("invalid_bg_color", e.to_string())),
    }
}

/// Decodes `image_base64` (a bare string or a `data:` URI; line breaks and padding tolerated).
fn decode_base64(text: &str) -> Result<Vec<u8>, ApiError> {
    let text = match text.trim_start().strip_prefix("data:") {
        Some(rest) => rest.split_once(',').map(|(_, data)| data).unwrap_or(""),
        None => text,
    };
    let compact: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if compact.len() / 4 * 3 > MAX_IMAGE_BYTES + 2 {
        return Err(ApiError::too_large(format!(
            "image_base64 decodes to more than the {} MB limit",
            MAX_IMAGE_BYTES / (1024 * 1024)
        )));
    }
    let lenient = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let url_safe = compact.iter().any(|b| *b == b'-' || *b == b'_');
    let engine = if url_safe {
        GeneralPurpose::new(&base64::alphabet::URL_SAFE, lenient)
    } else {
        GeneralPurpose::new(&base64::alphabet::STANDARD, lenient)
    };
    let bytes = engine
        .decode(&compact)
        .map_err(|e| ApiError::bad_request("invalid_base64", format!("image_base64 is not valid base64: {e}")))?;
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(ApiError::too_large("image_base64 decodes to more than the 10 MB limit"));
    }
    Ok(bytes)
}

fn parse_json(body: &[u8]) -> Result<ProcessBody, ApiError> {
    let first = serde_json::from_slice::<ProcessBody>(body);
    let err = match first {
        Ok(b) => return Ok(b),
        Err(e) => e,
    };
    // `base64 product.jpg` wraps its output; pasted into a JSON string that gives raw line
    // breaks, which JSON forbids. Valid JSON never needs a raw line break, so drop them and retry.
    if err.is_syntax() && body.iter().any(|b| *b == b'\n' || *b == b'\r') {
        let joined: Vec<u8> = body.iter().copied().filter(|b| *b != b'\n' && *b != b'\r').collect();
        if let Ok(b) = serde_json::from_slice::<ProcessBody>(&joined) {
            return Ok(b);
        }
    }
    Err(if err.is_data() {
        ApiError::bad_request("invalid_request", format!("invalid request body: {err}"))
    } else {
        ApiError::bad_request("malformed_json", format!("the body is not valid JSON: {err}"))
    })
}

async fn parse_multipart(req: Request, state: &AppState) -> Result<(ProcessBody, Option<Vec<u8>>), ApiError> {
    let mut form = Multipart::from_request(req, state)
        .await
        .map_err(|e| ApiError::bad_request("invalid_multipart", e.body_text()))?;
    let mut body = ProcessBody::default();
    let mut file = None;
    let field_error = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large("the request body is larger than the 15 MB limit")
        } else {
            ApiError::bad_request("invalid_multipart", e.body_text())
        }
    };
    while let Some(field) = form.next_field().await.map_err(field_error)? {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "image_file" {
            let bytes = field.bytes().await.map_err(field_error)?;
            if bytes.len() > MAX_IMAGE_BYTES {
                return Err(ApiError::too_large("image_file is larger than the 10 MB limit"));
            }
            file = Some(bytes.to_vec());
            continue;
        }
        let text = field.text().await.map_err(field_error)?;
        let slot = match name.as_str() {
            "image_url" => &mut body.image_url,
            "image_base64" => &mut body.image_base64,
            "output_format" => &mut body.output_format,
            "output_size" => &mut body.output_size,
            "bg_color" => &mut body.bg_color,
            "return_base64" => {
                body.return_base64 = Some(match text.trim() {
                    "true" | "1" | "yes" | "on" => true,
                    "false" | "0" | "no" | "off" | "" => false,
                    other => {
                        return Err(ApiError::bad_request(
                            "invalid_request",
                            format!("return_base64 {other:?} is not a boolean"),
                        ));
                    }
                });
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

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

pub async fn process(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let _slot = state.uploads.acquire().await.map_err(ApiError::internal)?;
    let (mut parts, bytes) = read_body(req, PROCESS_BODY_LIMIT).await?;
    let caller = Caller::from_request_parts(&mut parts, &state).await?;
    caller.require(SCOPE_PROCESS)?;
    let headers = parts.headers.clone();
    let ct = content_type(&headers);
    let (body, upload) = if ct == "multipart/form-data" {
        parse_multipart(Request::from_parts(parts, Body::from(bytes)), &state).await?
    } else if ct == "application/json" || ct.ends_with("+json") {
        (parse_json(&bytes)?, None)
    } else {
        return Err(ApiError::bad_request(
            "unsupported_media_type",
            format!(
                "Content-Type {:?} is not accepted; send application/json or multipart/form-data",
                if ct.is_empty() { "(none)" } else { &ct }
            ),
        ));
    };

    let opts = Options {
        format: output_format(body.output_format.as_deref())?,
        size: output_size(body.output_size.as_deref())?,
        bg_color: bg_color(body.bg_color.as_deref())?,
    };
    let url = nonempty(body.image_url);
    let b64 = nonempty(body.image_base64);
    let source = match (url, b64, upload) {
        (Some(u), None, None) => Source::Url(u),
        (None, Some(b), None) => Source::Bytes(decode_base64(&b)?),
        (None, None, Some(f)) => Source::Bytes(f),
        (None, None, None) => {
            return Err(ApiError::bad_request(
                "missing_image",
                "give the image as image_url or image_base64 (or an image_file upload)",
            ));
        }
        _ => {
            return Err(ApiError::bad_request(
                "ambiguous_image",
                "give exactly one of image_url, image_base64 and image_file",
            ));
        }
    };

    let done = state.jobs.process(caller.account_id, source, opts, "http").await?;
    let inline = body.return_base64.unwrap_or(false) && done.bytes.len() <= MAX_BASE64_RESULT;
    let response = ProcessResponse {
        result_url: state.result_url(&headers, &done.file),
        result_base64: inline.then(|| general_purpose::STANDARD.encode(done.bytes.as_slice())),
        id: done.id,
        width: done.width,
        height: done.height,
        credits_used: 1,
        expires_at: rfc3339(done.expires_at),
    };
    let mut res = (StatusCode::OK, axum::Json(response)).into_response();
    res.headers_mut().insert("x-credits-charged", HeaderValue::from(1));
    if body.return_base64.unwrap_or(false) && !inline {
        res.headers_mut()
            .insert("x-result-base64", HeaderValue::from_static("omitted-too-large"));
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_accepts_wrapped_padded_unpadded_and_data_uris() {
        let want = b"\x89PNG\r\n\x1a\nhello".to_vec();
        let std = general_purpose::STANDARD.encode(&want);
        assert_eq!(decode_base64(&std).unwrap(), want);
        assert_eq!(decode_base64(std.trim_end_matches('=')).unwrap(), want);
        let wrapped = format!("{}\n{}", &std[..8], &std[8..]);
        assert_eq!(decode_base64(&wrapped).unwrap(), want);
        assert_eq!(decode_base64(&format!("data:image/png;base64,{std}")).unwrap(), want);
        let err = decode_base64("not base64 at all!").unwrap_err();
        assert_eq!((err.status, err.code), (StatusCode::BAD_REQUEST, "invalid_base64"));
    }

    #[test]
    fn base64_over_ten_megabytes_is_413_before_decoding() {
        let big = "A".repeat((MAX_IMAGE_BYTES / 3 + 10) * 4);
        assert_eq!(decode_base64(&big).unwrap_err().status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn json_with_raw_line_breaks_in_base64_is_accepted() {
        let body = b"{\"image_base64\": \"AAAA\nBBBB\",\n \"output_format\": \"png\"}";
        let parsed = parse_json(body).unwrap();
        assert_eq!(parsed.image_base64.as_deref(), Some("AAAABBBB"));
        assert_eq!(parse_json(b"{\"image_url\": ").unwrap_err().code, "malformed_json");
        assert_eq!(
            parse_json(b"{\"bg_colour\": \"#fff\"}").unwrap_err().code,
            "invalid_request"
        );
    }

    #[test]
    fn options_are_validated() {
        assert_eq!(output_format(Some("WEBP")).unwrap(), OutputFormat::Webp);
        assert_eq!(output_format(Some("jpg")).unwrap_err().code, "invalid_output_format");
        assert_eq!(output_size(None).unwrap(), OutputSize::Full);
        assert_eq!(output_size(Some("medium")).unwrap_err().code, "invalid_output_size");
        assert_eq!(bg_color(Some("ffffff")).unwrap(), Some(BgColor([255, 255, 255, 255])));
        assert_eq!(bg_color(Some("#ggg")).unwrap_err().code, "invalid_bg_color");
    }
}
