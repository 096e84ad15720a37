//! Resizing. Two families:
//! - `bilinear_nohalf`: the IS-Net reference bilinear (imgly's JS pipeline): source coordinate
//!   `x * src / dst` with no half-pixel offset, taps `floor` and `min(ceil, src-1)`, rounded to u8.
//!   It must match the reference bit for bit-ish, so it is ours, separable and allocation-light.
//! - `convolve`: antialiased convolution (Lanczos3 etc.) through `fast_image_resize`'s SIMD kernels,
//!   which follow Pillow's algorithm, the reference for U^2-Net and a good default elsewhere.

use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image, images::ImageRef};
use rayon::prelude::*;

/// One destination coordinate: the two source samples it blends and the weight of the second.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tap {
    lo: usize,
    hi: usize,
    w: f32,
}

fn taps(src: usize, dst: usize) -> Vec<Tap> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|i| {
            let s = i as f64 * scale;
            let lo = s.floor() as usize;
            let hi = (s.ceil() as usize).min(src - 1);
            Tap {
                lo,
                hi,
                w: (s - lo as f64) as f32,
            }
        })
        .collect()
}

/// Resizes an interleaved u8 image of `channels` channels with the IS-Net reference bilinear.
/// Bilinear is separable, so each destination row first blends two source rows (vertical pass,
/// kept in f32), then blends two samples of that row per destination pixel (horizontal pass).
pub fn bilinear_nohalf(src: &[u8], (sw, sh): (u32, u32), channels: usize, (dw, dh): (u32, u32)) -> Vec<u8> {
    let (sw, sh, dw, dh) = (sw as usize, sh as usize, dw as usize, dh as usize);
    assert_eq!(src.len(), sw * sh * channels, "source buffer does not match its size");
    let xt = taps(sw, dw);
    let yt = taps(sh, dh);
    let stride = sw * channels;
    let mut out = vec![0u8; dw * dh * channels];
    // Rows are independent: they run on the current rayon pool, each task with its own f32 row.
    out.par_chunks_mut(dw * channels).zip(&yt).for_each_init(
        || vec![0f32; stride],
        |row, (dst, ty)| {
            let a = &src[ty.lo * stride..][..stride];
            let b = &src[ty.hi * stride..][..stride];
            for ((r, &a), &b) in row.iter_mut().zip(a).zip(b) {
                *r = a as f32 + (b as f32 - a as f32) * ty.w;
            }
            for (px, tx) in dst.chunks_exact_mut(channels).zip(&xt) {
                let l = &row[tx.lo * channels..][..channels];
                let h = &row[tx.hi * channels..][..channels];
                for c in 0..channels {
                    px[c] = round_u8(l[c] + (h[c] - l[c]) * tx.w);
                }
            }
        },
    );
    out
}

/// `floor(v + 0.5)` clamped to u8, as the reference does. A float-to-int cast truncates and
/// saturates, which is that exactly (truncation is floor from 0 up, and everything below 0 or
/// NaN gives 0), without `floor`, a library call on x86-64 CPUs before SSE4.1.
#[inline]
pub fn round_u8(v: f32) -> u8 {
    (v + 0.5) as u8
}

/// Antialiased convolution resize with a SIMD kernel. `pixel` says how `src` is laid out
/// (U8 gray, U8x3 RGB, U8x4 RGBA).
pub fn convolve(
    src: &[u8],
    (sw, sh): (u32, u32),
    pixel: PixelType,
    (dw, dh): (u32, u32),
    filter: FilterType,
) -> Vec<u8> {
    if (sw, sh) == (dw, dh) {
        return src.to_vec();
    }
    if dh > sh && dw != sw {
        // For 8-bit pixels fast_image_resize runs the vertical pass first, so its costlier
        // horizontal pass would see every output row: 4x the work for u2netp's 320² mask going
        // up to 12 MP. Upscaling, take the horizontal pass first, on the source's rows, as
        // Pillow (the reference) does.
        let wide = convolve(src, (sw, sh), pixel, (dw, sh), filter);
        return convolve(&wide, (dw, sh), pixel, (dw, dh), filter);
    }
    let src = ImageRef::new(sw, sh, src, pixel).expect("source buffer matches its size");
    let mut dst = Image::new(dw, dh, pixel);
    Resizer::new()
        .resize(
            &src,
            &mut dst,
            &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter)),
        )
        .expect("pixel types of source and destination agree");
    dst.into_vec()
}

/// The size of a preview: at most `max_pixels`, the original aspect ratio, never upscaled.
pub fn fit_within(w: u32, h: u32, max_pixels: u64) -> (u32, u32) {
    let pixels = w as u64 * h as u64;
    if pixels <= max_pixels {
        return (w, h);
    }
    let s = (max_pixels as f64 / pixels as f64).sqrt();
    let (mut nw, mut nh) = (
        ((w as f64 * s).round() as u32).max(1),
        ((h as f64 * s).round() as u32).max(1),
    );
    // Rounding may overshoot by a row or column; shrink the longer side until it fits.
    while nw as u64 * nh as u64 > max_pixels {
        if nw * h >= nh * w { nw -= 1 } else { nh -= 1 }
    }
    (nw, nh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_have_no_half_pixel_offset_and_clamp_at_the_edge() {
        let t = taps(4, 8);
        assert_eq!(t[0], Tap { lo: 0, hi: 0, w: 0.0 });
        assert_eq!(t[1], Tap { lo: 0, hi: 1, w: 0.5 });
        // 7 * 4/8 = 3.5: floor 3, ceil 4 clamped to the last column.
        assert_eq!(t[7], Tap { lo: 3, hi: 3, w: 0.5 });
    }

    #[test]
    fn bilinear_matches_the_reference_formula_on_a_ramp() {
        // 3x1 gray ramp upscaled to 6x1: positions 0, .5, 1, 1.5, 2, 2.5(clamped).
        let out = bilinear_nohalf(&[0, 100, 200], (3, 1), 1, (6, 1));
        assert_eq!(out, vec![0, 50, 100, 150, 200, 200]);
    }

    #[test]
    fn bilinear_downscale_samples_without_antialiasing() {
        // 4x4 checker of 0/255 down to 2x2 picks source (0,0),(2,0),(0,2),(2,2): all 0.
        let mut src = vec![0u8; 16];
        for y in 0..4 {
            for x in 0..4 {
                src[y * 4 + x] = if (x + y) % 2 == 1 { 255 } else { 0 };
            }
        }
        assert_eq!(bilinear_nohalf(&src, (4, 4), 1, (2, 2)), vec![0, 0, 0, 0]);
    }

    #[test]
    fn bilinear_keeps_channels_apart() {
        let src = [10, 20, 30, 110, 120, 130];
        let out = bilinear_nohalf(&src, (2, 1), 3, (4, 1));
        assert_eq!(&out[..6], &[10, 20, 30, 60, 70, 80]);
    }

    #[test]
    fn rounding_is_half_up() {
        assert_eq!(round_u8(2.5), 3);
        assert_eq!(round_u8(2.49), 2);
        assert_eq!(round_u8(-3.0), 0);
        assert_eq!(round_u8(300.0), 255);
        // Bit for bit the reference formula, over every value the resizes can produce and
        // well beyond, in steps finer than the f32 spacing near 255.
        for i in -40_000..=300_000 {
            let v = i as f32 / 1024.0;
            assert_eq!(round_u8(v), (v + 0.5).floor().clamp(0.0, 255.0) as u8, "{v}");
        }
        assert_eq!(round_u8(f32::NAN), 0);
    }

    #[test]
    fn convolve_preserves_a_flat_colour() {
        let src: Vec<u8> = [7u8, 77, 177].repeat(100 * 50);
        let out = convolve(&src, (100, 50), PixelType::U8x3, (33, 17), FilterType::Lanczos3);
        assert_eq!(out.len(), 33 * 17 * 3);
        assert!(out.chunks(3).all(|p| p == [7, 77, 177]));
    }

    #[test]
    fn fit_within_caps_pixels_and_keeps_aspect() {
        for &(w, h) in &[(4032, 3024), (3024, 4032), (10000, 100), (1001, 999), (640, 480)] {
            let (nw, nh) = fit_within(w, h, 250_000);
            assert!(nw as u64 * nh as u64 <= 250_000, "{w}x{h} -> {nw}x{nh}");
            let (a, b) = (w as f64 / h as f64, nw as f64 / nh as f64);
            assert!((a - b).abs() / a < 0.02, "{w}x{h} -> {nw}x{nh}");
        }
        assert_eq!(fit_within(640, 390, 250_000), (640, 390));
    }
}
