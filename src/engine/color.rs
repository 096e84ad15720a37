//! Background colours (`bg_color`) and compositing the cutout.

use std::str::FromStr;

/// A background colour parsed from `#rgb`, `#rrggbb` or `#rrggbbaa` (the `#` is optional).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BgColor(pub [u8; 4]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid bg_color {0:?}: expected a hex colour like #fff, #ffffff or #ffffff80")]
pub struct ColorError(pub String);

impl FromStr for BgColor {
    type Err = ColorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ColorError(s.to_string());
        let hex = s.trim().strip_prefix('#').unwrap_or(s.trim());
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let nibble = |i: usize| u8::from_str_radix(&hex[i..i + 1], 16).expect("checked hex digit");
        let byte = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).expect("checked hex digits");
        match hex.len() {
            3 => Ok(BgColor([nibble(0) * 17, nibble(1) * 17, nibble(2) * 17, 255])),
            6 => Ok(BgColor([byte(0), byte(2), byte(4), 255])),
            8 => Ok(BgColor([byte(0), byte(2), byte(4), byte(6)])),
            _ => Err(err()),
        }
    }
}

/// Builds RGBA pixels from RGB and a mask, laying the cutout over `bg` ("over" compositing in
/// straight alpha). With an opaque background every output pixel is opaque.
pub fn compose(rgb: &[u8], mask: &[u8], bg: Option<BgColor>) -> Vec<u8> {
    let mut out = vec![0; mask.len() * 4];
    compose_into(rgb, mask, bg, &mut out);
    out
}

/// `compose` into `out` (4 bytes per mask byte): one row at a time for the PNG writer.
pub fn compose_into(rgb: &[u8], mask: &[u8], bg: Option<BgColor>, out: &mut [u8]) {
    debug_assert!(rgb.len() == mask.len() * 3 && out.len() == mask.len() * 4);
    let pixels = out.chunks_exact_mut(4).zip(rgb.chunks_exact(3)).zip(mask);
    match bg {
        None => {
            for ((o, p), &a) in pixels {
                o.copy_from_slice(&[p[0], p[1], p[2], a]);
            }
        }
        Some(BgColor([br, bgc, bb, 255])) => {
            let bgp = [br as u32, bgc as u32, bb as u32];
            for ((o, p), &a) in pixels {
                let (a, na) = (a as u32, 255 - a as u32);
                let mix = |c: usize| ((p[c] as u32 * a + bgp[c] * na + 127) / 255) as u8;
                o.copy_from_slice(&[mix(0), mix(1), mix(2), 255]);
            }
        }
        Some(BgColor([br, bgc, bb, ba])) => {
            let ba = ba as f32 / 255.0;
            let bgp = [br as f32, bgc as f32, bb as f32];
            for ((o, p), &a) in pixels {
                let a = a as f32 / 255.0;
                let under = ba * (1.0 - a);
                let oa = a + under;
                let mix = |c: usize| {
                    if oa > 0.0 {
                        ((p[c] as f32 * a + bgp[c] * under) / oa).round() as u8
                    } else {
                        0
                    }
                };
                o.copy_from_slice(&[mix(0), mix(1), mix(2), (oa * 255.0).round() as u8]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_documented_forms() {
        assert_eq!("#fff".parse(), Ok(BgColor([255, 255, 255, 255])));
        assert_eq!("#1a2B3c".parse(), Ok(BgColor([0x1a, 0x2b, 0x3c, 255])));
        assert_eq!("#10203040".parse(), Ok(BgColor([0x10, 0x20, 0x30, 0x40])));
        assert_eq!("00ff00".parse(), Ok(BgColor([0, 255, 0, 255])));
    }

    #[test]
    fn rejects_malformed_colours() {
        for bad in ["", "#", "#ff", "#ffff", "#fffff", "#ggg", "red", "#ff00ff0", "#+1+2+3"] {
            assert!(bad.parse::<BgColor>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn transparent_background_keeps_mask_as_alpha() {
        assert_eq!(
            compose(&[10, 20, 30, 40, 50, 60], &[0, 200], None),
            vec![10, 20, 30, 0, 40, 50, 60, 200]
        );
    }

    #[test]
    fn opaque_background_fills_every_pixel() {
        let out = compose(
            &[200, 100, 0, 200, 100, 0, 200, 100, 0],
            &[0, 255, 128],
            Some(BgColor([0, 0, 255, 255])),
        );
        assert_eq!(&out[0..4], &[0, 0, 255, 255]);
        assert_eq!(&out[4..8], &[200, 100, 0, 255]);
        assert_eq!(&out[8..12], &[100, 50, 127, 255]);
    }

    #[test]
    fn translucent_background_composites_over() {
        // Background at 50% alpha under a fully transparent pixel: the background shows at 50%.
        let out = compose(&[9, 9, 9], &[0], Some(BgColor([255, 0, 0, 128])));
        assert_eq!(out, vec![255, 0, 0, 128]);
        // Under an opaque pixel the background is hidden.
        let out = compose(&[9, 9, 9], &[255], Some(BgColor([255, 0, 0, 128])));
        assert_eq!(out, vec![9, 9, 9, 255]);
    }
}
