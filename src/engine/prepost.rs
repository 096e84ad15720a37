//! Each model's reference pre- and post-processing (see models/manifest.toml and SOURCES.md),
//! as plain functions from pixels to tensors and back.

use fast_image_resize::{FilterType, PixelType};

use super::Pipeline;
use super::resize::{bilinear_nohalf, convolve};

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Pipeline {
    /// The square input side the model was trained and exported for.
    pub fn input_size(self) -> u32 {
        match self {
            Pipeline::Isnet => 1024,
            Pipeline::U2netp => 320,
        }
    }

    /// Memory an inference needs beyond the loaded weights: the activations alive at its
    /// widest stage and the run state (measured as the peak resident set over one small photo
    /// minus the resident set after loading: IS-Net 207 MB, U^2-Net small 109 MB), with margin.
    pub fn working_set(self) -> u64 {
        match self {
            Pipeline::Isnet => 240 << 20,
            Pipeline::U2netp => 128 << 20,
        }
    }

    /// RGB u8 (interleaved, `w`x`h`) to the model's NCHW f32 input, flattened.
    pub fn preprocess(self, rgb: &[u8], (w, h): (u32, u32)) -> Vec<f32> {
        let s = self.input_size();
        let plane = (s * s) as usize;
        let mut out = vec![0f32; 3 * plane];
        match self {
            Pipeline::Isnet => {
                let small = bilinear_nohalf(rgb, (w, h), 3, (s, s));
                for (i, px) in small.chunks_exact(3).enumerate() {
                    for c in 0..3 {
                        out[c * plane + i] = (px[c] as f32 - 128.0) / 256.0;
                    }
                }
            }
            Pipeline::U2netp => {
                let small = convolve(rgb, (w, h), PixelType::U8x3, (s, s), FilterType::Lanczos3);
                // rembg divides by the resized image's maximum before the ImageNet normalisation.
                let max = small.iter().copied().max().unwrap_or(0).max(1) as f32;
                for (i, px) in small.chunks_exact(3).enumerate() {
                    for c in 0..3 {
                        out[c * plane + i] = (px[c] as f32 / max - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
                    }
                }
            }
        }
        out
    }

    /// The model's square output (probabilities, `input_size()`² values) to an 8-bit mask of `w`x`h`.
    pub fn postprocess(self, out: &[f32], (w, h): (u32, u32)) -> Vec<u8> {
        let s = self.input_size();
        debug_assert_eq!(out.len(), (s * s) as usize);
        match self {
            Pipeline::Isnet => {
                let m: Vec<u8> = out.iter().map(|&v| (v * 255.0).clamp(0.0, 255.0) as u8).collect();
                bilinear_nohalf(&m, (s, s), 1, (w, h))
            }
            Pipeline::U2netp => {
                let (lo, hi) = out.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                });
                let range = if hi > lo { hi - lo } else { 1.0 };
                let m: Vec<u8> = out.iter().map(|&v| ((v - lo) / range * 255.0) as u8).collect();
                convolve(&m, (s, s), PixelType::U8, (w, h), FilterType::Lanczos3)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isnet_normalises_around_128_in_nchw_order() {
        // A flat image keeps its value through the resize; channels land in separate planes.
        let rgb = [0u8, 128, 255].repeat(7 * 5);
        let t = Pipeline::Isnet.preprocess(&rgb, (7, 5));
        let plane = 1024 * 1024;
        assert_eq!(t.len(), 3 * plane);
        assert!(t[..plane].iter().all(|&v| v == -0.5));
        assert!(t[plane..2 * plane].iter().all(|&v| v == 0.0));
        assert!(t[2 * plane..].iter().all(|&v| v == 127.0 / 256.0));
    }

    #[test]
    fn u2netp_divides_by_max_then_applies_imagenet_stats() {
        let rgb = [100u8, 200, 50].repeat(40 * 30);
        let t = Pipeline::U2netp.preprocess(&rgb, (40, 30));
        let plane = 320 * 320;
        let expect = |c: usize, v: f32| (v / 200.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        for (c, v) in [(0, 100.0), (1, 200.0), (2, 50.0)] {
            assert!(
                t[c * plane..(c + 1) * plane]
                    .iter()
                    .all(|&x| (x - expect(c, v)).abs() < 1e-6),
                "channel {c}"
            );
        }
    }

    #[test]
    fn isnet_mask_truncates_probabilities() {
        let mut out = vec![0.0f32; 1024 * 1024];
        out[0] = 1.0;
        out[1] = 0.999; // 254.7 truncates to 254
        out[2] = 0.5; // 127.5 truncates to 127
        let m = Pipeline::Isnet.postprocess(&out, (1024, 1024));
        assert_eq!(&m[..4], &[255, 254, 127, 0]);
    }

    #[test]
    fn u2netp_mask_is_min_max_stretched() {
        let out: Vec<f32> = (0..320 * 320).map(|i| 0.2 + 0.1 * ((i % 320) as f32 / 319.0)).collect();
        let m = Pipeline::U2netp.postprocess(&out, (320, 320));
        assert_eq!(m[0], 0);
        assert_eq!(m[319], 255);
        assert_eq!(m.len(), 320 * 320);
    }
}
