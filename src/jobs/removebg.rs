//! remove.bg's API v1.0 request, as its clients spell it (multipart, JSON or form fields; see
//! README, "Using existing remove.bg and rembg clients"), validated into a source and options.
//! Its codes are remove.bg's (`missing_source`, `invalid_size`, ...).

use std::collections::HashMap;
use std::sync::Arc;

use super::request::{OptionFields, decode_base64};
use super::{Bg, JobError, Options, Source};
use crate::engine::{OutputFormat, OutputSize, layout};

/// One field's value as it arrived.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Bool(bool),
    /// An uploaded file (multipart only).
    File(Vec<u8>),
}

/// A validated remove.bg request.
#[derive(Debug)]
pub struct RemoveBgJob {
    pub source: Source,
    pub options: Options,
    /// What `X-Type` reports: the `type` asked for, else "other" (we have no classifier).
    pub detected_type: &'static str,
    /// `type_level=none`: no `X-Type` header.
    pub type_level_none: bool,
}

/// Fields accepted and not acted on (README: which ones and why).
pub const IGNORED: [&str; 6] = [
    "add_shadow",
    "shadow_type",
    "shadow_opacity",
    "semitransparency",
    "type_level",
    "type",
];

fn invalid(code: &'static str, message: impl Into<String>) -> JobError {
    JobError::Invalid {
        code,
        message: message.into(),
    }
}

/// Parses the fields of one request (in arrival order; a repeated field's last value counts,
/// except that two files or image sources are `multiple_sources`).
pub fn parse(fields: Vec<(String, Value)>) -> Result<RemoveBgJob, JobError> {
    let mut sources = 0;
    let mut bg_files = 0;
    let mut map: HashMap<String, Value> = HashMap::new();
    for (name, value) in fields {
        let blank = matches!(&value, Value::Text(t) if t.trim().is_empty());
        if blank {
            continue;
        }
        match name.as_str() {
            "image_file" | "image_file_b64" | "image_url" => sources += 1,
            "bg_image_file" => bg_files += 1,
            _ => {}
        }
        map.insert(name, value);
    }
    let text = |name: &str| -> Result<Option<String>, JobError> {
        match map.get(name) {
            None => Ok(None),
            Some(Value::Text(t)) => Ok(Some(t.trim().to_owned())),
            Some(Value::Bool(b)) => Ok(Some(b.to_string())),
            Some(Value::File(_)) => Err(invalid(
                invalid_code(name),
                format!("{name} must be a text field, not a file"),
            )),
        }
    };
    let flag = |name: &str| -> Result<bool, JobError> {
        match map.get(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::Text(t)) => match t.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                other => Err(invalid(invalid_code(name), format!("{name} {other:?} is not true or false"))),
            },
            Some(Value::File(_)) => Err(invalid(invalid_code(name), format!("{name} must be true or false"))),
        }
    };

    if sources == 0 {
        return Err(invalid(
            "missing_source",
            "Please provide the source image in the image_url, image_file or image_file_b64 parameter.",
        ));
    }
    if sources > 1 {
        return Err(invalid(
            "multiple_sources",
            "Please provide only one of image_url, image_file and image_file_b64.",
        ));
    }

    let format = match text("format")?.map(|f| f.to_ascii_lowercase()).as_deref() {
        None | Some("auto") => OutputFormat::Auto,
        Some("png") => OutputFormat::Png,
        Some("jpg") | Some("jpeg") => OutputFormat::Jpg,
        Some("webp") => OutputFormat::Webp,
        Some("zip") => OutputFormat::Zip,
        Some(other) => {
            return Err(invalid(
                "invalid_format",
                format!("format {other:?} is not supported; use auto, png, jpg, webp or zip"),
            ));
        }
    };
    let size = match text("size")?.map(|f| f.to_ascii_lowercase()).as_deref() {
        None | Some("preview") | Some("small") | Some("regular") => OutputSize::Preview,
        Some("medium") => OutputSize::Medium,
        Some("hd") => OutputSize::Hd,
        Some("full") | Some("4k") | Some("auto") | Some("50mp") => OutputSize::Full,
        Some(other) => {
            return Err(invalid(
                "invalid_size",
                format!("size {other:?} is not supported; use preview, full, auto, 50MP, small, regular, medium, hd or 4k"),
            ));
        }
    };
    let mut options = Options {
        format,
        size,
        ..Options::default()
    };
    let bg_given = ["bg_color", "bg_image_url"].iter().filter(|n| map.contains_key(**n)).count() + bg_files;
    if bg_given > 1 {
        return Err(invalid(
            "multiple_bg_sources",
            "Please provide only one of bg_color, bg_image_url and bg_image_file.",
        ));
    }
    OptionFields {
        bg_color: text("bg_color")?,
        bg_gradient: None,
        bg_image_url: text("bg_image_url")?,
        channels: text("channels")?,
        refine: text("refine")?,
        crop: Some(flag("crop")?),
        crop_margin: text("crop_margin")?,
    }
    .apply(&mut options)?;
    if let Some(Value::File(bytes)) = map.get("bg_image_file") {
        options.background = Some(Bg::ImageBytes(Arc::new(bytes.clone())));
    }
    if let Some(s) = text("scale")? {
        options.layout.scale = layout::parse_scale(&s).map_err(|e| invalid("invalid_scale", e))?;
    }
    if let Some(p) = text("position")? {
        options.layout.position = Some(p.parse().map_err(|e| invalid("invalid_position", e))?);
    }
    if let Some(r) = text("roi")? {
        options.roi = Some(r.parse().map_err(|e| invalid("invalid_roi", e))?);
    }

    let detected_type = match text("type")?.map(|t| t.to_ascii_lowercase()).as_deref() {
        Some("person") => "person",
        Some("product") => "product",
        Some("animal") => "animal",
        Some("car") => "car",
        Some("graphic") | Some("graphics") => "graphics",
        Some("transportation") => "transportation",
        _ => "other",
    };
    let type_level_none = text("type_level")?.is_some_and(|t| t.eq_ignore_ascii_case("none"));

    let source = match (map.remove("image_file"), map.remove("image_file_b64"), map.remove("image_url")) {
        (Some(Value::File(bytes)), _, _) => Source::Bytes(bytes),
        (Some(_), _, _) => return Err(invalid("invalid_image_file", "image_file must be a file upload")),
        (_, Some(Value::Text(b64)), _) => Source::Bytes(decode_base64(&b64).map_err(|e| match e {
            JobError::Invalid { message, .. } => invalid("invalid_image_file_b64", message),
            other => other,
        })?),
        (_, Some(_), _) => return Err(invalid("invalid_image_file_b64", "image_file_b64 must be base64 text")),
        (_, _, Some(Value::Text(url))) => Source::Url(url.trim().to_owned()),
        _ => return Err(invalid("invalid_image_url", "image_url must be an http or https URL")),
    };
    Ok(RemoveBgJob {
        source,
        options,
        detected_type,
        type_level_none,
    })
}

/// `invalid_<name>` for the fields that have one.
fn invalid_code(name: &str) -> &'static str {
    match name {
        "crop" => "invalid_crop",
        "format" => "invalid_format",
        "size" => "invalid_size",
        "channels" => "invalid_channels",
        "refine" => "invalid_refine",
        "bg_color" => "invalid_bg_color",
        "bg_image_url" => "invalid_bg_image_url",
        "crop_margin" => "invalid_crop_margin",
        "scale" => "invalid_scale",
        "position" => "invalid_position",
        "roi" => "invalid_roi",
        "image_url" => "invalid_image_url",
        "image_file_b64" => "invalid_image_file_b64",
        _ => "invalid_request",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Channels, Position};

    fn t(name: &str, v: &str) -> (String, Value) {
        (name.into(), Value::Text(v.into()))
    }

    fn code(fields: Vec<(String, Value)>) -> &'static str {
        parse(fields).unwrap_err().code()
    }

    #[test]
    fn exactly_one_source() {
        assert_eq!(code(vec![t("size", "preview")]), "missing_source");
        assert_eq!(code(vec![t("image_url", " ")]), "missing_source");
        assert_eq!(
            code(vec![t("image_url", "http://a/b.jpg"), ("image_file".into(), Value::File(vec![1]))]),
            "multiple_sources"
        );
        let job = parse(vec![t("image_url", "http://a/b.jpg")]).unwrap();
        assert!(matches!(job.source, Source::Url(u) if u == "http://a/b.jpg"));
    }

    #[test]
    fn defaults_are_remove_bg_s() {
        let job = parse(vec![t("image_url", "http://a/b.jpg")]).unwrap();
        assert_eq!(job.options.format, OutputFormat::Auto);
        assert_eq!(job.options.size, OutputSize::Preview);
        assert_eq!(job.options.channels, Channels::Rgba);
        assert!(job.options.layout.is_identity() && job.options.background.is_none());
        assert_eq!((job.detected_type, job.type_level_none), ("other", false));
    }

    #[test]
    fn sizes_formats_and_booleans_in_every_spelling() {
        let size = |s: &str| parse(vec![t("image_url", "http://x/y"), t("size", s)]).map(|j| j.options.size);
        for (name, want) in [
            ("regular", OutputSize::Preview),
            ("small", OutputSize::Preview),
            ("medium", OutputSize::Medium),
            ("HD", OutputSize::Hd),
            ("4k", OutputSize::Full),
            ("50MP", OutputSize::Full),
            ("auto", OutputSize::Full),
        ] {
            assert_eq!(size(name).unwrap(), want, "{name}");
        }
        assert_eq!(size("huge").unwrap_err().code(), "invalid_size");
        let fmt = |s: &str| parse(vec![t("image_url", "http://x/y"), t("format", s)]).map(|j| j.options.format);
        assert_eq!(fmt("zip").unwrap(), OutputFormat::Zip);
        assert_eq!(fmt("gif").unwrap_err().code(), "invalid_format");
        for crop in [Value::Bool(true), Value::Text("true".into())] {
            let job = parse(vec![t("image_url", "http://x/y"), ("crop".into(), crop), t("crop_margin", "10%")]).unwrap();
            assert!(job.options.layout.crop.is_some());
        }
        let job = parse(vec![t("image_url", "http://x/y"), ("crop".into(), Value::Bool(false)), t("crop_margin", "10%")]).unwrap();
        assert!(job.options.layout.crop.is_none(), "crop_margin alone does nothing");
        assert_eq!(code(vec![t("image_url", "http://x/y"), t("crop", "maybe")]), "invalid_crop");
    }

    #[test]
    fn layout_background_and_ignored_fields() {
        let job = parse(vec![
            t("image_url", "http://x/y"),
            t("scale", "50%"),
            t("position", "center"),
            t("roi", "0% 0% 50% 100%"),
            t("bg_color", "81d4fa77"),
            t("type", "product"),
            t("type_level", "none"),
            t("add_shadow", "true"),
            t("semitransparency", "whatever"),
            t("shadow_type", "drop"),
            t("something_new", "x"),
        ])
        .unwrap();
        assert_eq!(job.options.layout.scale, Some(0.5));
        assert_eq!(job.options.layout.position, Some(Position::At(0.5, 0.5)));
        assert!(job.options.roi.is_some());
        assert!(matches!(job.options.background, Some(Bg::Color(c)) if c.0 == [0x81, 0xd4, 0xfa, 0x77]));
        assert_eq!((job.detected_type, job.type_level_none), ("product", true));
        let bad = |name: &str, v: &str| code(vec![t("image_url", "http://x/y"), t(name, v)]);
        assert_eq!(bad("scale", "5%"), "invalid_scale");
        assert_eq!(bad("position", "left"), "invalid_position");
        assert_eq!(bad("roi", "1 2 3"), "invalid_roi");
        assert_eq!(bad("channels", "rgb"), "invalid_channels");
        assert_eq!(bad("bg_color", "nope"), "invalid_bg_color");
        assert_eq!(
            code(vec![t("image_url", "http://x/y"), t("crop", "true"), t("crop_margin", "x")]),
            "invalid_crop_margin"
        );
        assert_eq!(
            code(vec![t("image_url", "http://x/y"), t("bg_color", "red"), t("bg_image_url", "http://x/z")]),
            "multiple_bg_sources"
        );
        assert_eq!(
            code(vec![t("image_url", "http://x/y"), t("bg_color", "red"), ("bg_image_file".into(), Value::File(vec![1]))]),
            "multiple_bg_sources"
        );
        assert_eq!(code(vec![t("image_file_b64", "!!!")]), "invalid_image_file_b64");
    }
}
