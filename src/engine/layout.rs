//! Where the subject goes on the output canvas: the region of interest (`roi`), cropping to
//! the subject with a margin (`crop`, `crop_margin`), and scaling and positioning it
//! (`scale`, `position`), as remove.bg defines them; plus the foreground box every response
//! reports.

use std::str::FromStr;

use fast_image_resize::{FilterType, PixelType};
use serde::{Deserialize, Serialize};

use super::resize;

/// A mask value at or above this is the subject, for its bounding box (6% opacity: fainter
/// pixels are invisible on any background, and the model leaves faint noise in the background).
pub const FOREGROUND_ALPHA: u8 = 16;

/// The largest margin on each side: 50% of the subject's size, or 500 pixels (remove.bg's caps).
const MAX_MARGIN_PX: f64 = 500.0;
const MAX_MARGIN_FRACTION: f64 = 0.5;

/// A length in pixels or in percent of some reference size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Length {
    Px(f64),
    Percent(f64),
}

impl Length {
    fn parse(s: &str) -> Option<Length> {
        let s = s.trim();
        let (v, pct) = match s.strip_suffix('%') {
            Some(v) => (v, true),
            None => (s.strip_suffix("px").unwrap_or(s), false),
        };
        let v: f64 = v.trim().parse().ok().filter(|v: &f64| v.is_finite() && *v >= 0.0)?;
        Some(if pct { Length::Percent(v) } else { Length::Px(v) })
    }

    /// In pixels, given the size a percentage refers to.
    pub fn px(self, of: f64) -> f64 {
        match self {
            Length::Px(v) => v,
            Length::Percent(p) => p / 100.0 * of,
        }
    }
}

impl std::fmt::Display for Length {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Length::Px(v) => write!(f, "{v}px"),
            Length::Percent(v) => write!(f, "{v}%"),
        }
    }
}

/// Splits on spaces and commas.
fn words(s: &str) -> Vec<&str> {
    s.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .collect()
}

/// `crop_margin`: one value (every side), two (top and bottom, left and right) or four (top,
/// right, bottom, left), each in px or %; percentages of the subject's height (top, bottom) or
/// width (left, right).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Margin {
    pub top: Length,
    pub right: Length,
    pub bottom: Length,
    pub left: Length,
}

impl Default for Margin {
    fn default() -> Margin {
        Margin {
            top: Length::Px(0.0),
            right: Length::Px(0.0),
            bottom: Length::Px(0.0),
            left: Length::Px(0.0),
        }
    }
}

impl FromStr for Margin {
    type Err = String;
    fn from_str(s: &str) -> Result<Margin, String> {
        let err = || format!("crop_margin {s:?} must be 1, 2 or 4 values in px or %, like \"10px\" or \"5% 10%\"");
        let v: Vec<Length> = words(s).into_iter().map(Length::parse).collect::<Option<_>>().ok_or_else(err)?;
        let [top, right, bottom, left] = match v[..] {
            [a] => [a, a, a, a],
            [a, b] => [a, b, a, b],
            [a, b, c, d] => [a, b, c, d],
            _ => return Err(err()),
        };
        Ok(Margin {
            top,
            right,
            bottom,
            left,
        })
    }
}

impl std::fmt::Display for Margin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {} {}", self.top, self.right, self.bottom, self.left)
    }
}

/// `roi`: `"x1 y1 x2 y2"` in px (of the input image) or % (of its width and height).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Roi(pub [Length; 4]);

impl FromStr for Roi {
    type Err = String;
    fn from_str(s: &str) -> Result<Roi, String> {
        let err = || format!("roi {s:?} must be four values \"x1 y1 x2 y2\", each in px or %");
        let v: Vec<Length> = words(s).into_iter().map(Length::parse).collect::<Option<_>>().ok_or_else(err)?;
        let v: [Length; 4] = v.try_into().map_err(|_| err())?;
        Ok(Roi(v))
    }
}

impl std::fmt::Display for Roi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a} {b} {c} {d}")
    }
}

/// `scale`: the subject's size as a fraction of the canvas (0.1 to 1), or `original`.
pub fn parse_scale(s: &str) -> Result<Option<f64>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("original") {
        return Ok(None);
    }
    match s.strip_suffix('%').and_then(|v| v.trim().parse::<f64>().ok()) {
        Some(p) if (10.0..=100.0).contains(&p) => Ok(Some(p / 100.0)),
        _ => Err(format!("scale {s:?} must be from \"10%\" to \"100%\", or \"original\"")),
    }
}

/// `position`: where the subject sits on the canvas, as fractions of the free space.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Position {
    Original,
    At(f64, f64),
}

impl FromStr for Position {
    type Err = String;
    fn from_str(s: &str) -> Result<Position, String> {
        let err = || format!("position {s:?} must be \"original\", \"center\", or one or two values from 0% to 100%");
        let t = s.trim();
        if t.eq_ignore_ascii_case("original") {
            return Ok(Position::Original);
        }
        if t.eq_ignore_ascii_case("center") || t.eq_ignore_ascii_case("centre") {
            return Ok(Position::At(0.5, 0.5));
        }
        let pct = |w: &str| {
            w.strip_suffix('%')
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| (0.0..=100.0).contains(v))
                .map(|v| v / 100.0)
        };
        let v: Vec<f64> = words(t).into_iter().map(pct).collect::<Option<_>>().ok_or_else(err)?;
        match v[..] {
            [a] => Ok(Position::At(a, a)),
            [a, b] => Ok(Position::At(a, b)),
            _ => Err(err()),
        }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Position::Original => write!(f, "original"),
            Position::At(x, y) => write!(f, "{}% {}%", x * 100.0, y * 100.0),
        }
    }
}

/// A rectangle in output pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BoxPx {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
}

/// The bounding box of the mask's subject (values at or above [`FOREGROUND_ALPHA`]); `None`
/// when there is none.
pub fn foreground(mask: &[u8], (w, h): (u32, u32)) -> Option<BoxPx> {
    let w = w as usize;
    let (mut x0, mut x1, mut y0, mut y1) = (usize::MAX, 0, usize::MAX, 0);
    for (y, row) in mask.chunks_exact(w).enumerate().take(h as usize) {
        let Some(first) = row.iter().position(|&a| a >= FOREGROUND_ALPHA) else {
            continue;
        };
        let last = row.iter().rposition(|&a| a >= FOREGROUND_ALPHA).expect("a first means a last");
        (x0, x1) = (x0.min(first), x1.max(last));
        (y0, y1) = (y0.min(y), y);
    }
    (x0 != usize::MAX).then(|| BoxPx {
        left: x0 as u32,
        top: y0 as u32,
        width: (x1 - x0 + 1) as u32,
        height: (y1 - y0 + 1) as u32,
    })
}

/// Why a layout request cannot be met for this image (remove.bg's codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutError {
    pub code: &'static str,
    pub message: String,
}

fn layout_error(code: &'static str, message: impl Into<String>) -> LayoutError {
    LayoutError {
        code,
        message: message.into(),
    }
}

/// Clears the mask outside the region of interest. `input` is the decoded image's size (px
/// values refer to it), `size` the mask's.
pub fn apply_roi(roi: &Roi, input: (u32, u32), mask: &mut [u8], size: (u32, u32)) -> Result<(), LayoutError> {
    let [x1, y1, x2, y2] = roi.0;
    let (iw, ih) = (input.0 as f64, input.1 as f64);
    let (x1, y1, x2, y2) = (x1.px(iw), y1.px(ih), x2.px(iw), y2.px(ih));
    if x1 > iw || x2 > iw || y1 > ih || y2 > ih {
        return Err(layout_error(
            "roi_exceeds_bounds",
            format!("the roi reaches beyond the {}x{} image", input.0, input.1),
        ));
    }
    if x2 <= x1 || y2 <= y1 {
        return Err(layout_error(
            "roi_region_empty",
            "the roi is empty: x2 must be greater than x1 and y2 than y1",
        ));
    }
    let (sx, sy) = (size.0 as f64 / iw, size.1 as f64 / ih);
    let cols = (x1 * sx).round() as usize..((x2 * sx).round() as usize).min(size.0 as usize);
    let rows = (y1 * sy).round() as usize..((y2 * sy).round() as usize).min(size.1 as usize);
    for (y, row) in mask.chunks_exact_mut(size.0 as usize).enumerate() {
        if rows.contains(&y) {
            row[..cols.start].fill(0);
            row[cols.end..].fill(0);
        } else {
            row.fill(0);
        }
    }
    Ok(())
}

/// The layout options of one cutout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    /// Crop to the subject plus this margin.
    pub crop: Option<Margin>,
    /// The subject's size as a fraction of the canvas.
    pub scale: Option<f64>,
    pub position: Option<Position>,
}

impl Layout {
    pub fn is_identity(&self) -> bool {
        self.crop.is_none() && self.scale.is_none() && matches!(self.position, None | Some(Position::Original))
    }

    /// The canvas size and where the subject box `b` of an image of `size` goes on it: the
    /// box it is drawn into (its size after scaling).
    pub fn place(&self, b: BoxPx, size: (u32, u32)) -> ((u32, u32), BoxPx) {
        let (bw, bh) = (b.width as f64, b.height as f64);
        let (canvas, origin) = match self.crop {
            Some(m) => {
                let side = |l: Length, of: f64| l.px(of).min(MAX_MARGIN_FRACTION * of).min(MAX_MARGIN_PX).round();
                let (t, r, bo, l) = (side(m.top, bh), side(m.right, bw), side(m.bottom, bh), side(m.left, bw));
                (((bw + l + r) as u32, (bh + t + bo) as u32), (l, t))
            }
            None => (size, (b.left as f64, b.top as f64)),
        };
        let (cw, ch) = (canvas.0 as f64, canvas.1 as f64);
        let f = match self.scale {
            Some(s) => s * (cw / bw).min(ch / bh),
            None => 1.0,
        };
        let (sw, sh) = ((bw * f).round().max(1.0), (bh * f).round().max(1.0));
        let position = self.position.unwrap_or(if self.scale.is_some() {
            Position::At(0.5, 0.5)
        } else {
            Position::Original
        });
        let (x, y) = match position {
            Position::Original => origin,
            Position::At(px, py) => (((cw - sw) * px).round(), ((ch - sh) * py).round()),
        };
        let placed = BoxPx {
            left: x.max(0.0) as u32,
            top: y.max(0.0) as u32,
            width: sw as u32,
            height: sh as u32,
        };
        (canvas, placed)
    }
}

/// Draws the subject box `from` of `src` (`channels` bytes per pixel, `size`) into `to` on a new
/// canvas of `canvas` (zero elsewhere), resampling with Lanczos3 if the sizes differ.
pub fn transplant(src: &[u8], size: (u32, u32), channels: usize, from: BoxPx, canvas: (u32, u32), to: BoxPx) -> Vec<u8> {
    let row = size.0 as usize * channels;
    let (fw, fh) = (from.width as usize, from.height as usize);
    let mut region = Vec::with_capacity(fw * fh * channels);
    for y in from.top as usize..from.top as usize + fh {
        let start = y * row + from.left as usize * channels;
        region.extend_from_slice(&src[start..start + fw * channels]);
    }
    let pixel = match channels {
        1 => PixelType::U8,
        3 => PixelType::U8x3,
        _ => PixelType::U8x4,
    };
    let region = if (from.width, from.height) == (to.width, to.height) {
        region
    } else {
        resize::convolve(&region, (from.width, from.height), pixel, (to.width, to.height), FilterType::Lanczos3)
    };
    let (cw, ch) = (canvas.0 as usize, canvas.1 as usize);
    let mut out = vec![0; cw * ch * channels];
    let tw = to.width as usize;
    let cols = (to.left as usize).min(cw)..(to.left as usize + tw).min(cw);
    for (ty, y) in (to.top as usize..to.top as usize + to.height as usize).enumerate() {
        if y >= ch {
            break;
        }
        let src_row = &region[ty * tw * channels..][..cols.len() * channels];
        out[(y * cw + cols.start) * channels..][..src_row.len()].copy_from_slice(src_row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_as_remove_bg_writes_them() {
        assert_eq!(
            "10px".parse::<Margin>().unwrap(),
            Margin {
                top: Length::Px(10.0),
                right: Length::Px(10.0),
                bottom: Length::Px(10.0),
                left: Length::Px(10.0)
            }
        );
        let m: Margin = "5% 20".parse().unwrap();
        assert_eq!((m.top, m.right, m.bottom, m.left), (Length::Percent(5.0), Length::Px(20.0), Length::Percent(5.0), Length::Px(20.0)));
        let m: Margin = "1px 2px 3px 4px".parse().unwrap();
        assert_eq!(m.left, Length::Px(4.0));
        for bad in ["", "1 2 3", "-5px", "ten", "1 2 3 4 5"] {
            assert!(bad.parse::<Margin>().is_err(), "{bad:?}");
        }
        assert_eq!("0% 0% 100% 100%".parse::<Roi>().unwrap().0[2], Length::Percent(100.0));
        assert!("0 0 10".parse::<Roi>().is_err());
        assert_eq!(parse_scale("50%").unwrap(), Some(0.5));
        assert_eq!(parse_scale("original").unwrap(), None);
        assert!(parse_scale("5%").is_err() && parse_scale("101%").is_err() && parse_scale("0.5").is_err());
        assert_eq!("center".parse::<Position>().unwrap(), Position::At(0.5, 0.5));
        assert_eq!("0% 100%".parse::<Position>().unwrap(), Position::At(0.0, 1.0));
        assert_eq!("25%".parse::<Position>().unwrap(), Position::At(0.25, 0.25));
        assert!("left".parse::<Position>().is_err() && "120%".parse::<Position>().is_err());
    }

    /// A 10x8 mask with a subject in columns 2..=5, rows 3..=4.
    fn subject() -> Vec<u8> {
        let mut m = vec![0u8; 80];
        for y in 3..=4 {
            for x in 2..=5 {
                m[y * 10 + x] = 255;
            }
        }
        m[0] = FOREGROUND_ALPHA - 1; // faint noise is not the subject
        m
    }

    #[test]
    fn the_foreground_box_bounds_the_subject() {
        let b = foreground(&subject(), (10, 8)).unwrap();
        assert_eq!(b, BoxPx { left: 2, top: 3, width: 4, height: 2 });
        assert_eq!(foreground(&[0; 80], (10, 8)), None);
    }

    #[test]
    fn crop_with_a_margin_gives_the_box_plus_the_margin() {
        let b = foreground(&subject(), (10, 8)).unwrap();
        let layout = Layout {
            crop: Some("1px 3px".parse().unwrap()),
            ..Layout::default()
        };
        let (canvas, to) = layout.place(b, (10, 8));
        // 1 px above and below; 3 px at the sides is capped at 50% of the 4 px width.
        assert_eq!(canvas, (4 + 2 * 2, 2 + 2 * 1));
        assert_eq!(to, BoxPx { left: 2, top: 1, width: 4, height: 2 });
        let out = transplant(&subject(), (10, 8), 1, b, canvas, to);
        assert_eq!(foreground(&out, canvas), Some(to));
        assert_eq!(out.iter().filter(|&&a| a == 255).count(), 8);
    }

    #[test]
    fn scale_and_position_move_the_subject_on_the_same_canvas() {
        let b = foreground(&subject(), (10, 8)).unwrap();
        // 100%: as large as fits (4x2 -> 10x5), centred vertically.
        let (canvas, to) = Layout { scale: Some(1.0), ..Layout::default() }.place(b, (10, 8));
        assert_eq!((canvas, to), ((10, 8), BoxPx { left: 0, top: 2, width: 10, height: 5 }));
        // Bottom-right corner, original size.
        let layout = Layout { position: Some(Position::At(1.0, 1.0)), ..Layout::default() };
        let (canvas, to) = layout.place(b, (10, 8));
        assert_eq!(to, BoxPx { left: 6, top: 6, width: 4, height: 2 });
        let out = transplant(&subject(), (10, 8), 1, b, canvas, to);
        assert_eq!(foreground(&out, canvas), Some(to));
    }

    #[test]
    fn roi_clears_outside_and_refuses_bad_regions() {
        let mut m = subject();
        apply_roi(&"0px 0px 4px 8px".parse().unwrap(), (10, 8), &mut m, (10, 8)).unwrap();
        assert_eq!(foreground(&m, (10, 8)), Some(BoxPx { left: 2, top: 3, width: 2, height: 2 }));
        // Percentages and a mask smaller than the input.
        let mut m = vec![255u8; 25];
        apply_roi(&"20% 20% 60% 100%".parse().unwrap(), (100, 100), &mut m, (5, 5)).unwrap();
        assert_eq!(foreground(&m, (5, 5)), Some(BoxPx { left: 1, top: 1, width: 2, height: 4 }));
        let code = |r: &str| apply_roi(&r.parse().unwrap(), (10, 8), &mut subject(), (10, 8)).unwrap_err().code;
        assert_eq!(code("0px 0px 11px 8px"), "roi_exceeds_bounds");
        assert_eq!(code("5px 0px 5px 8px"), "roi_region_empty");
    }
}
