//! rembg's HTTP server API (`rembg s`, `/api/remove`), as its callers spell it: query or form
//! fields, validated into output options. The reply is always a full-size PNG.

use super::{Bg, JobError, Options};
use crate::engine::{BgColor, Channels, OutputFormat, OutputSize, Refine};

/// Names the loaded model answers to: ours, and rembg's name for the same network.
pub fn model_names(model: &str) -> Vec<String> {
    let mut names = vec![model.to_owned()];
    if model == "isnet" {
        names.push("isnet-general-use".to_owned());
    }
    names
}

fn invalid(code: &'static str, message: impl Into<String>) -> JobError {
    JobError::Invalid {
        code,
        message: message.into(),
    }
}

/// A boolean as pydantic reads one.
fn boolean(name: &str, v: &str) -> Result<bool, JobError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" | "t" | "y" => Ok(true),
        "false" | "0" | "no" | "off" | "f" | "n" => Ok(false),
        _ => Err(invalid("invalid_parameter", format!("{name} {v:?} is not a boolean"))),
    }
}

fn int(name: &str, v: &str, max: Option<i64>) -> Result<i64, JobError> {
    v.trim()
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0 && max.is_none_or(|m| *n <= m))
        .ok_or_else(|| {
            invalid(
                "invalid_parameter",
                match max {
                    Some(m) => format!("{name} {v:?} must be an integer from 0 to {m}"),
                    None => format!("{name} {v:?} must be a non-negative integer"),
                },
            )
        })
}

/// Validates rembg's parameters (later values win) against the loaded `model`. Alpha matting
/// (`a`) turns on the edge refinement (`refine=fast`), our answer to the same need; its
/// thresholds (`af`, `ab`, `ae`) and the post-processing switches (`ppm`, `dc`, `vm`) are
/// checked as rembg checks them and otherwise not acted on (README); `extras` is ignored, as
/// rembg ignores what it does not understand.
pub fn options(fields: &[(String, String)], model: &str) -> Result<Options, JobError> {
    let mut opts = Options {
        format: OutputFormat::Png,
        size: OutputSize::Full,
        ..Options::default()
    };
    let mut only_mask = false;
    let mut bgc = None;
    for (name, value) in fields {
        match name.as_str() {
            "model" => {
                let names = model_names(model);
                if !names.iter().any(|n| n == value.trim()) {
                    return Err(invalid(
                        "model_not_loaded",
                        format!("model {value:?} is not loaded on this node; it runs {}", names.join(" or ")),
                    ));
                }
            }
            "om" => only_mask = boolean("om", value)?,
            "a" => {
                opts.refine = boolean(name, value)?.then_some(Refine::Fast);
            }
            "ppm" | "dc" | "vm" => {
                boolean(name, value)?;
            }
            "af" | "ab" => {
                int(name, value, Some(255))?;
            }
            "ae" => {
                int(name, value, None)?;
            }
            "bgc" => bgc = Some(value.clone()),
            _ => {}
        }
    }
    if only_mask {
        // rembg ignores bgc with om.
        opts.channels = Channels::Alpha;
    } else if let Some(bgc) = bgc {
        let parts: Vec<Option<u8>> = bgc.split(',').map(|p| p.trim().parse::<u8>().ok()).collect();
        let c = match parts[..] {
            [Some(r), Some(g), Some(b)] => [r, g, b, 255],
            [Some(r), Some(g), Some(b), Some(a)] => [r, g, b, a],
            _ => {
                return Err(invalid(
                    "invalid_bgc",
                    format!("bgc {bgc:?} must be \"R,G,B,A\" (or \"R,G,B\"), each from 0 to 255"),
                ));
            }
        };
        opts.background = Some(Bg::Color(BgColor(c)));
    }
    Ok(opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn rembg_parameters_are_checked_as_rembg_checks_them() {
        let o = options(&f(&[("bgc", "255,0,0,128"), ("a", "true"), ("af", "240"), ("ae", "15")]), "u2netp").unwrap();
        assert!(matches!(o.background, Some(Bg::Color(BgColor([255, 0, 0, 128])))));
        assert_eq!((o.format, o.size, o.channels), (OutputFormat::Png, OutputSize::Full, Channels::Rgba));
        assert_eq!(o.refine, Some(Refine::Fast), "alpha matting asks for the refinement");
        let o = options(&f(&[("om", "Yes"), ("bgc", "1,2,3")]), "u2netp").unwrap();
        assert_eq!(o.refine, None, "no matting asked for: the node's default");
        assert_eq!(o.channels, Channels::Alpha);
        assert!(o.background.is_none(), "bgc is ignored with om");
        assert!(options(&f(&[("model", "isnet-general-use")]), "isnet").is_ok());
        let code = |p: &[(&str, &str)]| options(&f(p), "u2netp").unwrap_err().code();
        assert_eq!(code(&[("model", "u2net")]), "model_not_loaded");
        assert_eq!(code(&[("model", "xu2netpx")]), "model_not_loaded");
        assert_eq!(code(&[("bgc", "red")]), "invalid_bgc");
        assert_eq!(code(&[("bgc", "1,2,300")]), "invalid_bgc");
        assert_eq!(code(&[("af", "300")]), "invalid_parameter");
        assert_eq!(code(&[("a", "maybe")]), "invalid_parameter");
        assert_eq!(code(&[("ae", "-1")]), "invalid_parameter");
    }
}
