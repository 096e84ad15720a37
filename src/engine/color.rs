//! Background colours (`bg_color`) and compositing the cutout.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A CSS colour keyword (case-insensitive).
fn named(name: &str) -> Option<BgColor> {
    if name.eq_ignore_ascii_case("transparent") {
        return Some(BgColor([0, 0, 0, 0]));
    }
    let c = csscolorparser::parse(name).ok()?;
    Some(BgColor(c.to_rgba8()))
}

/// A background colour parsed from `#rgb`, `#rgba`, `#rrggbb` or `#rrggbbaa` (the `#` is
/// optional), or a CSS colour name (`white`, `rebeccapurple`, `transparent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgColor(pub [u8; 4]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid colour {0:?}: expected a hex colour like #fff, #ffffff or #ffffff80, or a CSS colour name")]
pub struct ColorError(pub String);

impl std::fmt::Display for BgColor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [r, g, b, a] = self.0;
        write!(f, "#{r:02x}{g:02x}{b:02x}{a:02x}")
    }
}

impl FromStr for BgColor {
    type Err = ColorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ColorError(s.to_string());
        let hex = s.trim().strip_prefix('#').unwrap_or(s.trim());
        if !hex.is_empty() && hex.len() == s.trim().len() && hex.bytes().all(|b| b.is_ascii_alphabetic()) {
            // A name (hex digits alone, like `fff` or `beaded`, read as hex above all).
            if !(hex.len() == 3 || hex.len() == 4 || hex.len() == 6 || hex.len() == 8)
                || !hex.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return named(hex).ok_or_else(err);
            }
        }
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let nibble = |i: usize| u8::from_str_radix(&hex[i..i + 1], 16).expect("checked hex digit");
        let byte = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).expect("checked hex digits");
        match hex.len() {
            3 => Ok(BgColor([nibble(0) * 17, nibble(1) * 17, nibble(2) * 17, 255])),
            4 => Ok(BgColor([nibble(0) * 17, nibble(1) * 17, nibble(2) * 17, nibble(3) * 17])),
            6 => Ok(BgColor([byte(0), byte(2), byte(4), 255])),
            8 => Ok(BgColor([byte(0), byte(2), byte(4), byte(6)])),
            _ => Err(err()),
        }
    }
}

/// Builds RGBA pixels from RGB and a mask, laying the cutout over `bg` ("over" compositing in
/// straight alpha). With an opaque background every output pixel is opaque.
#[cfg(test)]
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

/// A linear gradient behind the cutout, as CSS writes one: `"90deg, #ffffff, #0af 80%"`
/// (optionally wrapped in `linear-gradient(...)`). The angle is CSS's: 0deg points up, 90deg
/// right, and the default is 180deg (top to bottom). Two or more stops, each a colour and an
/// optional position in percent; stops without one are spread evenly between their neighbours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gradient {
    pub angle_deg: f32,
    pub stops: Vec<(f32, BgColor)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid bg_gradient {0:?}: {1}")]
pub struct GradientError(pub String, pub String);

impl FromStr for Gradient {
    type Err = GradientError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| GradientError(s.to_string(), why.to_string());
        let mut text = s.trim();
        if let Some(inner) = text.strip_prefix("linear-gradient(") {
            text = inner.strip_suffix(')').ok_or_else(|| err("missing the closing parenthesis"))?;
        }
        let mut parts: Vec<&str> = text.split(',').map(str::trim).collect();
        let mut angle_deg = 180.0;
        if let Some(first) = parts.first()
            && let Some(deg) = first.strip_suffix("deg")
        {
            angle_deg = deg
                .trim()
                .parse::<f32>()
                .ok()
                .filter(|a| a.is_finite())
                .ok_or_else(|| err("the angle is not a number of degrees"))?;
            parts.remove(0);
        }
        if parts.len() < 2 {
            return Err(err("give an angle (optional) and at least two colour stops, like \"90deg, #fff, #0af\""));
        }
        if parts.len() > 16 {
            return Err(err("at most 16 colour stops"));
        }
        let mut stops: Vec<(Option<f32>, BgColor)> = Vec::with_capacity(parts.len());
        for part in parts {
            let mut words = part.split_whitespace();
            let color = words.next().ok_or_else(|| err("an empty colour stop"))?;
            let color: BgColor = color.parse().map_err(|e: ColorError| err(&e.to_string()))?;
            let at = match words.next() {
                None => None,
                Some(p) => Some(
                    p.strip_suffix('%')
                        .and_then(|v| v.parse::<f32>().ok())
                        .filter(|v| (0.0..=100.0).contains(v))
                        .ok_or_else(|| err("a stop position must be a percentage from 0% to 100%"))?
                        / 100.0,
                ),
            };
            if words.next().is_some() {
                return Err(err("a colour stop is a colour and at most one position"));
            }
            stops.push((at, color));
        }
        // CSS: the first and last default to 0% and 100%, the others are spread evenly between
        // their positioned neighbours, and a position never goes back.
        let n = stops.len();
        stops[0].0.get_or_insert(0.0);
        stops[n - 1].0.get_or_insert(1.0);
        let mut i = 1;
        while i < n {
            if stops[i].0.is_some() {
                i += 1;
                continue;
            }
            let next = (i..n).find(|&j| stops[j].0.is_some()).expect("the last stop has a position");
            let (from, to) = (stops[i - 1].0.unwrap(), stops[next].0.unwrap());
            for (k, stop) in stops[i..next].iter_mut().enumerate() {
                stop.0 = Some(from + (to - from) * (k + 1) as f32 / (next - i + 1) as f32);
            }
            i = next;
        }
        let mut last = 0.0f32;
        let stops = stops
            .into_iter()
            .map(|(at, c)| {
                last = last.max(at.unwrap());
                (last, c)
            })
            .collect();
        Ok(Gradient { angle_deg, stops })
    }
}

impl std::fmt::Display for Gradient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}deg", self.angle_deg)?;
        for (at, c) in &self.stops {
            write!(f, ", {c} {}%", at * 100.0)?;
        }
        Ok(())
    }
}

impl Gradient {
    pub fn opaque(&self) -> bool {
        self.stops.iter().all(|(_, c)| c.0[3] == 255)
    }

    /// The colour at `t` along the gradient line (0 at its start, 1 at its end).
    fn at(&self, t: f32) -> [u8; 4] {
        let first = &self.stops[0];
        if t <= first.0 {
            return first.1.0;
        }
        for pair in self.stops.windows(2) {
            let ((a, ca), (b, cb)) = (pair[0], pair[1]);
            if t <= b {
                let f = if b > a { (t - a) / (b - a) } else { 1.0 };
                return std::array::from_fn(|i| (ca.0[i] as f32 + (cb.0[i] as f32 - ca.0[i] as f32) * f + 0.5) as u8);
            }
        }
        self.stops[self.stops.len() - 1].1.0
    }

    /// Row `y` of the gradient on a `w` x `h` canvas, as RGBA.
    pub fn fill_row(&self, y: usize, (w, h): (u32, u32), out: &mut [u8]) {
        let (sin, cos) = self.angle_deg.to_radians().sin_cos();
        let (w, h) = (w as f32, h as f32);
        // CSS: the gradient line passes through the centre, long enough that its ends' normals
        // touch the corners.
        let len = (w * sin).abs() + (h * cos).abs();
        let len = if len > 0.0 { len } else { 1.0 };
        let dy = (y as f32 + 0.5 - h / 2.0) * -cos;
        for (x, px) in out.chunks_exact_mut(4).enumerate() {
            let t = ((x as f32 + 0.5 - w / 2.0) * sin + dy) / len + 0.5;
            px.copy_from_slice(&self.at(t));
        }
    }
}

/// What the cutout is laid over, for one row.
pub enum BgRow<'a> {
    Transparent,
    Solid(BgColor),
    /// RGBA, one pixel per mask byte.
    Pixels(&'a [u8]),
}

/// Row composition onto any backdrop: `compose_into`, or per-pixel "over" for a gradient or
/// a photo.
pub fn compose_row(rgb: &[u8], mask: &[u8], bg: BgRow<'_>, out: &mut [u8]) {
    match bg {
        BgRow::Transparent => compose_into(rgb, mask, None, out),
        BgRow::Solid(c) => compose_into(rgb, mask, Some(c), out),
        BgRow::Pixels(bg) => {
            debug_assert!(bg.len() == mask.len() * 4);
            for (((o, p), &a), b) in out.chunks_exact_mut(4).zip(rgb.chunks_exact(3)).zip(mask).zip(bg.chunks_exact(4)) {
                over(p, a, [b[0], b[1], b[2], b[3]], o);
            }
        }
    }
}

/// One pixel of `rgb` at alpha `a` over `bg`, in straight alpha.
#[inline]
fn over(p: &[u8], a: u8, bg: [u8; 4], o: &mut [u8]) {
    if bg[3] == 255 {
        let (a, na) = (a as u32, 255 - a as u32);
        let mix = |c: usize| ((p[c] as u32 * a + bg[c] as u32 * na + 127) / 255) as u8;
        o.copy_from_slice(&[mix(0), mix(1), mix(2), 255]);
    } else {
        let a = a as f32 / 255.0;
        let under = bg[3] as f32 / 255.0 * (1.0 - a);
        let oa = a + under;
        let mix = |c: usize| {
            if oa > 0.0 {
                ((p[c] as f32 * a + bg[c] as f32 * under) / oa).round() as u8
            } else {
                0
            }
        };
        o.copy_from_slice(&[mix(0), mix(1), mix(2), (oa * 255.0).round() as u8]);
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
        assert_eq!("#f008".parse(), Ok(BgColor([255, 0, 0, 0x88])));
        assert_eq!("Red".parse(), Ok(BgColor([255, 0, 0, 255])));
        assert_eq!("rebeccapurple".parse(), Ok(BgColor([0x66, 0x33, 0x99, 255])));
        assert_eq!("transparent".parse(), Ok(BgColor([0, 0, 0, 0])));
        // Hex digits that also spell a word are hex.
        assert_eq!("beaded".parse(), Ok(BgColor([0xbe, 0xad, 0xed, 255])));
    }

    #[test]
    fn rejects_malformed_colours() {
        for bad in ["", "#", "#ff", "#fffff", "#ggg", "#red", "reddish", "#ff00ff0", "#+1+2+3", "rgb(1,2,3)"] {
            assert!(bad.parse::<BgColor>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn gradients_parse_like_css_and_fill_along_their_angle() {
        let g: Gradient = "90deg, #000, #fff".parse().unwrap();
        assert_eq!(g.stops, vec![(0.0, BgColor([0, 0, 0, 255])), (1.0, BgColor([255, 255, 255, 255]))]);
        // Left to right: the row darkest at the left, lightest at the right, the same on every row.
        let mut row = vec![0; 4 * 4];
        g.fill_row(0, (4, 2), &mut row);
        let reds: Vec<u8> = row.chunks(4).map(|p| p[0]).collect();
        assert_eq!(reds, vec![32, 96, 159, 223]);
        let mut other = vec![0; 16];
        g.fill_row(1, (4, 2), &mut other);
        assert_eq!(row, other);
        // The default is top to bottom; stops without positions are spread evenly.
        let g: Gradient = "linear-gradient(red, lime, blue)".parse().unwrap();
        assert_eq!(g.angle_deg, 180.0);
        assert_eq!(g.stops.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0.0, 0.5, 1.0]);
        let mut top = vec![0; 4];
        g.fill_row(0, (1, 100), &mut top);
        assert!(top[0] > 240 && top[1] < 16, "{top:?}");
        let g: Gradient = "45deg, #fff 20%, #000, #f00 80%".parse().unwrap();
        assert_eq!(g.stops.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0.2, 0.5, 0.8]);
        assert_eq!(g.to_string().parse::<Gradient>().unwrap(), g);
        for bad in ["", "#fff", "90deg, #fff", "xdeg, #fff, #000", "#fff 120%, #000", "#fff, #nothex", "#fff 1 2, #000"] {
            assert!(bad.parse::<Gradient>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn rows_over_a_backdrop_match_the_solid_colour_path() {
        let rgb = [200, 100, 0, 10, 20, 30, 5, 5, 5];
        let mask = [255, 0, 128];
        for c in [BgColor([0, 0, 255, 255]), BgColor([255, 0, 0, 128])] {
            let bg: Vec<u8> = (0..3).flat_map(|_| c.0).collect();
            let (mut a, mut b) = (vec![0; 12], vec![0; 12]);
            compose_row(&rgb, &mask, BgRow::Solid(c), &mut a);
            compose_row(&rgb, &mask, BgRow::Pixels(&bg), &mut b);
            assert_eq!(a, b);
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
