//! A process request as clients spell it (the JSON of `POST /process`, also the MQTT submit
//! payload), and its validation into a source and output options. Shared by every front end
//! so that HTTP and MQTT accept and refuse exactly the same things.

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;

use super::{Bg, JobError, Options, Source};
use crate::engine::{BgColor, Channels, ColorError, Gradient, Margin, OutputFormat, OutputSize, Refine};

/// Largest image accepted as base64, upload or download (decoded bytes).
pub const MAX_IMAGE_BYTES: usize = 10 * 1024 * 1024;

/// Unknown fields are refused so that a typo (`bg_colour`) is not silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessRequest {
    pub image_url: Option<String>,
    pub image_base64: Option<String>,
    pub output_format: Option<String>,
    pub output_size: Option<String>,
    pub bg_color: Option<String>,
    pub return_base64: Option<bool>,
    /// Extensions (README, "Extensions to the spec"): crop to the subject, with a margin.
    pub crop: Option<bool>,
    pub crop_margin: Option<String>,
    /// Extensions: a background photo, or a CSS-style linear gradient.
    pub bg_image_url: Option<String>,
    pub bg_gradient: Option<String>,
    /// Extension: `rgba` (the cutout) or `alpha` (the mask alone).
    pub channels: Option<String>,
    /// Extension: edge refinement, `off` or `fast`.
    pub refine: Option<String>,
    /// The submitter's own id for the job (MQTT only).
    #[serde(rename = "ref")]
    pub client_ref: Option<String>,
}

fn invalid(code: &'static str, message: String) -> JobError {
    JobError::Invalid { code, message }
}

pub fn output_format(v: Option<&str>) -> Result<OutputFormat, JobError> {
    match v.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("png") => Ok(OutputFormat::Png),
        Some("webp") => Ok(OutputFormat::Webp),
        Some("jpg") | Some("jpeg") => Ok(OutputFormat::Jpg),
        Some(other) => Err(invalid(
            "invalid_output_format",
            format!("output_format {other:?} is not supported; use \"png\", \"webp\" or \"jpg\""),
        )),
    }
}

pub fn output_size(v: Option<&str>) -> Result<OutputSize, JobError> {
    match v.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("full") => Ok(OutputSize::Full),
        Some("preview") => Ok(OutputSize::Preview),
        Some(other) => Err(invalid(
            "invalid_output_size",
            format!("output_size {other:?} is not supported; use \"preview\" or \"full\""),
        )),
    }
}

pub fn bg_color(v: Option<&str>) -> Result<Option<BgColor>, JobError> {
    match v.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|e: ColorError| invalid("invalid_bg_color", e.to_string())),
    }
}

/// The output options every dialect shares, as text (absent or blank: the default).
#[derive(Debug, Default, Clone)]
pub struct OptionFields {
    pub bg_color: Option<String>,
    pub bg_gradient: Option<String>,
    pub bg_image_url: Option<String>,
    pub channels: Option<String>,
    pub refine: Option<String>,
    pub crop: Option<bool>,
    pub crop_margin: Option<String>,
}

fn text(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl OptionFields {
    /// The background (at most one), channels and crop.
    pub fn apply(&self, opts: &mut Options) -> Result<(), JobError> {
        let given = [&self.bg_color, &self.bg_gradient, &self.bg_image_url]
            .iter()
            .filter(|v| text(v).is_some())
            .count();
        if given > 1 {
            return Err(invalid(
                "multiple_bg_sources",
                "give at most one of bg_color, bg_gradient and bg_image_url".into(),
            ));
        }
        if let Some(c) = bg_color(text(&self.bg_color))? {
            opts.background = Some(Bg::Color(c));
        }
        if let Some(g) = text(&self.bg_gradient) {
            let g: Gradient = g.parse().map_err(|e: crate::engine::GradientError| invalid("invalid_bg_gradient", e.to_string()))?;
            opts.background = Some(Bg::Gradient(g));
        }
        if let Some(u) = text(&self.bg_image_url) {
            if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() > 4096 {
                return Err(invalid(
                    "invalid_bg_image_url",
                    "bg_image_url must be an http or https URL of at most 4096 characters".into(),
                ));
            }
            opts.background = Some(Bg::ImageUrl(u.to_owned()));
        }
        opts.channels = match text(&self.channels).map(str::to_ascii_lowercase).as_deref() {
            None | Some("rgba") => Channels::Rgba,
            Some("alpha") => Channels::Alpha,
            Some(other) => {
                return Err(invalid(
                    "invalid_channels",
                    format!("channels {other:?} is not supported; use \"rgba\" or \"alpha\""),
                ));
            }
        };
        opts.refine = match text(&self.refine).map(str::to_ascii_lowercase).as_deref() {
            None => None,
            Some("off") => Some(Refine::Off),
            Some("fast") => Some(Refine::Fast),
            Some(other) => {
                return Err(invalid(
                    "invalid_refine",
                    format!("refine {other:?} is not supported; use \"off\" or \"fast\""),
                ));
            }
        };
        if self.crop == Some(true) {
            let margin = match text(&self.crop_margin) {
                None => Margin::default(),
                Some(m) => m.parse().map_err(|e| invalid("invalid_crop_margin", e))?,
            };
            opts.layout.crop = Some(margin);
        }
        Ok(())
    }
}

pub fn options(format: Option<&str>, size: Option<&str>, fields: &OptionFields) -> Result<Options, JobError> {
    let mut opts = Options {
        format: output_format(format)?,
        size: output_size(size)?,
        ..Options::default()
    };
    fields.apply(&mut opts)?;
    Ok(opts)
}

/// A boolean as forms spell it.
pub fn boolean(name: &str, v: &str) -> Result<bool, JobError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        other => Err(invalid("invalid_request", format!("{name} {other:?} is not a boolean"))),
    }
}

/// Whether `bytes` start like an image the engine reads (its header only; nothing decoded):
/// for uploads that are checked but not cut now, as remove.bg's `/improve` takes them and as a
/// batch of uploaded photos is queued.
pub fn probe_image(bytes: &[u8]) -> Result<(), JobError> {
    crate::engine::image_io::header(bytes, u64::MAX)
        .map(|_| ())
        .map_err(|e| JobError::Engine(e.into()))
}

/// Decodes `image_base64` (a bare string or a `data:` URI; line breaks and padding tolerated).
pub fn decode_base64(text: &str) -> Result<Vec<u8>, JobError> {
    let text = match text.trim_start().strip_prefix("data:") {
        Some(rest) => rest.split_once(',').map(|(_, data)| data).unwrap_or(""),
        None => text,
    };
    let compact: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let too_large = || {
        JobError::TooLarge(format!(
            "image_base64 decodes to more than the {} MB limit",
            MAX_IMAGE_BYTES >> 20
        ))
    };
    if compact.len() / 4 * 3 > MAX_IMAGE_BYTES + 2 {
        return Err(too_large());
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
        .map_err(|e| invalid("invalid_base64", format!("image_base64 is not valid base64: {e}")))?;
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Parses a JSON request body.
pub fn parse_json(body: &[u8]) -> Result<ProcessRequest, JobError> {
    let err = match serde_json::from_slice::<ProcessRequest>(body) {
        Ok(b) => return Ok(b),
        Err(e) => e,
    };
    // `base64 product.jpg` wraps its output; pasted into a JSON string that gives raw line
    // breaks, which JSON forbids. Valid JSON never needs a raw line break, so drop them and retry.
    if err.is_syntax() && body.iter().any(|b| *b == b'\n' || *b == b'\r') {
        let joined: Vec<u8> = body.iter().copied().filter(|b| *b != b'\n' && *b != b'\r').collect();
        if let Ok(b) = serde_json::from_slice::<ProcessRequest>(&joined) {
            return Ok(b);
        }
    }
    Err(if err.is_data() {
        invalid("invalid_request", format!("invalid request body: {err}"))
    } else {
        invalid("malformed_json", format!("the body is not valid JSON: {err}"))
    })
}

fn nonempty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

impl ProcessRequest {
    /// Validates options and picks the one image source (`upload` is a multipart file).
    pub fn into_job(self, upload: Option<Vec<u8>>) -> Result<(Source, Options), JobError> {
        let fields = OptionFields {
            bg_color: self.bg_color,
            bg_gradient: self.bg_gradient,
            bg_image_url: self.bg_image_url,
            channels: self.channels,
            refine: self.refine,
            crop: self.crop,
            crop_margin: self.crop_margin,
        };
        let opts = options(self.output_format.as_deref(), self.output_size.as_deref(), &fields)?;
        let source = match (nonempty(self.image_url), nonempty(self.image_base64), upload) {
            (Some(u), None, None) => Source::Url(u),
            (None, Some(b), None) => Source::Bytes(decode_base64(&b)?),
            (None, None, Some(f)) => Source::Bytes(f),
            (None, None, None) => {
                return Err(invalid(
                    "missing_image",
                    "give the image as image_url or image_base64 (or an image_file upload)".into(),
                ));
            }
            _ => {
                return Err(invalid(
                    "ambiguous_image",
                    "give exactly one of image_url, image_base64 and image_file".into(),
                ));
            }
        };
        Ok((source, opts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose;

    fn code(e: JobError) -> &'static str {
        e.code()
    }

    #[test]
    fn base64_accepts_wrapped_padded_unpadded_and_data_uris() {
        let want = b"\x89PNG\r\n\x1a\nhello".to_vec();
        let std = general_purpose::STANDARD.encode(&want);
        assert_eq!(decode_base64(&std).unwrap(), want);
        assert_eq!(decode_base64(std.trim_end_matches('=')).unwrap(), want);
        let wrapped = format!("{}\n{}", &std[..8], &std[8..]);
        assert_eq!(decode_base64(&wrapped).unwrap(), want);
        assert_eq!(decode_base64(&format!("data:image/png;base64,{std}")).unwrap(), want);
        assert_eq!(code(decode_base64("not base64 at all!").unwrap_err()), "invalid_base64");
    }

    #[test]
    fn base64_over_ten_megabytes_is_refused_before_decoding() {
        let big = "A".repeat((MAX_IMAGE_BYTES / 3 + 10) * 4);
        assert!(matches!(decode_base64(&big), Err(JobError::TooLarge(_))));
    }

    #[test]
    fn json_with_raw_line_breaks_in_base64_is_accepted() {
        let body = b"{\"image_base64\": \"AAAA\nBBBB\",\n \"output_format\": \"png\"}";
        let parsed = parse_json(body).unwrap();
        assert_eq!(parsed.image_base64.as_deref(), Some("AAAABBBB"));
        assert_eq!(code(parse_json(b"{\"image_url\": ").unwrap_err()), "malformed_json");
        assert_eq!(
            code(parse_json(b"{\"bg_colour\": \"#fff\"}").unwrap_err()),
            "invalid_request"
        );
    }

    #[test]
    fn options_and_sources_are_validated() {
        assert_eq!(output_format(Some("WEBP")).unwrap(), OutputFormat::Webp);
        assert_eq!(output_format(Some("jpg")).unwrap(), OutputFormat::Jpg);
        assert_eq!(code(output_format(Some("gif")).unwrap_err()), "invalid_output_format");
        assert_eq!(output_size(None).unwrap(), OutputSize::Full);
        assert_eq!(code(output_size(Some("medium")).unwrap_err()), "invalid_output_size");
        assert_eq!(bg_color(Some("ffffff")).unwrap(), Some(BgColor([255, 255, 255, 255])));
        assert_eq!(code(bg_color(Some("#ggg")).unwrap_err()), "invalid_bg_color");
        let none = ProcessRequest::default();
        assert_eq!(code(none.into_job(None).unwrap_err()), "missing_image");
        let both = ProcessRequest {
            image_url: Some("http://a/b.jpg".into()),
            ..Default::default()
        };
        assert_eq!(code(both.into_job(Some(vec![1])).unwrap_err()), "ambiguous_image");
    }
}
