//! The segmentation model and everything around it: decode, preprocess, infer, postprocess,
//! composite, encode. Pure computation; the only I/O is reading model files.

mod budget;
mod color;
pub mod image_io;
mod model;
mod png_writer;
pub mod pool;
mod prepost;
pub mod resize;

use std::path::Path;
use std::time::{Duration, Instant};

use fast_image_resize::{FilterType, PixelType};
use image::ExtendedColorType;
use serde::{Deserialize, Serialize};

pub use color::{BgColor, ColorError};
pub use image_io::{ImageError, OutputFormat, Picture};
pub use model::{Model, Precision, on_pool, use_threads};
pub use pool::Pool;

/// Which reference pre/post-processing a model follows (see models/manifest.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pipeline {
    /// IS-Net (imgly pipeline): 1024x1024 bilinear without half-pixel offset, (v-128)/256.
    Isnet,
    /// U^2-Net small (rembg pipeline): 320x320 Lanczos, ImageNet normalisation, min-max stretch.
    U2netp,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("model: {0}")]
    Model(String),
    #[error("inference failed: {0}")]
    Inference(String),
}

/// `output_size` in the API: a small preview or the original resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OutputSize {
    /// At most 0.25 megapixels, aspect ratio kept.
    Preview,
    /// The input's own size.
    #[default]
    Full,
}

/// Pixel budget of `OutputSize::Preview`.
pub const PREVIEW_PIXELS: u64 = 250_000;

/// What to produce from one input image.
#[derive(Debug, Clone, Default)]
pub struct CutOptions {
    pub format: OutputFormat,
    pub size: OutputSize,
    /// Composite onto this colour instead of leaving the background transparent.
    pub bg_color: Option<BgColor>,
    /// Emit the 8-bit mask as a gray image instead of the cutout.
    pub mask_only: bool,
}

/// Wall time of each stage of one cutout.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub decode: Duration,
    pub preprocess: Duration,
    pub inference: Duration,
    pub postprocess: Duration,
    pub encode: Duration,
}

impl Timings {
    pub fn total(&self) -> Duration {
        self.decode + self.preprocess + self.inference + self.postprocess + self.encode
    }
}

/// An encoded result.
#[derive(Debug)]
pub struct Cutout {
    pub bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub format: OutputFormat,
    pub timings: Timings,
}

/// The model plus the input limits; one per process, shared by reference.
pub struct Engine {
    model: Model,
    max_pixels: u64,
    /// What the images in flight may hold between them (unbounded until [`Engine::bound_memory`]).
    images: budget::MemoryBudget,
}

/// Default for the largest accepted input, in pixels (decompression-bomb guard).
pub const DEFAULT_MAX_PIXELS: u64 = 50_000_000;

impl Engine {
    pub fn load(
        path: &Path,
        pipeline: Option<Pipeline>,
        precision: Precision,
        max_pixels: u64,
    ) -> Result<Engine, EngineError> {
        Ok(Engine {
            model: Model::load(path, pipeline, precision)?,
            max_pixels,
            images: budget::MemoryBudget::new(u64::MAX),
        })
    }

    /// Lets the cutouts in flight hold at most `bytes` between them, by their estimate
    /// ([`cutout_bytes`]): a cutout waits for room before it decodes, and one that needs more
    /// than `bytes` on its own is refused (`image_too_large`).
    pub fn bound_memory(&mut self, bytes: u64) {
        self.images = budget::MemoryBudget::new(bytes);
    }

    /// Bytes the cutouts in flight may hold between them.
    pub fn image_memory(&self) -> u64 {
        self.images.capacity()
    }

    /// Bytes the cutouts in flight hold now, by their estimate.
    pub fn image_memory_reserved(&self) -> u64 {
        self.images.reserved()
    }

    /// The largest input a cutout to `format` may have: `--max-pixels`, or less when the
    /// memory bound is lower (for an 8-bit RGB input such as a JPEG).
    pub fn max_pixels(&self, format: OutputFormat) -> u64 {
        self.max_pixels
            .min(self.images.capacity() / cutout_bytes_per_pixel(image::ColorType::Rgb8, format))
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Decodes `input`, removes its background and encodes the result.
    pub fn cut(&self, input: &[u8], opts: &CutOptions) -> Result<Cutout, EngineError> {
        let start = Instant::now();
        let header = image_io::header(input, self.max_pixels)?;
        let read_header = start.elapsed();
        let per_pixel = cutout_bytes_per_pixel(header.color, opts.format);
        // Reserved here, on the caller's thread: the inference pool's threads must stay free
        // for the cutouts that hold the memory, or they could not finish and return it.
        let _memory = self
            .images
            .reserve(header.pixels().saturating_mul(per_pixel))
            .ok_or(ImageError::OverMemory {
                width: header.width,
                height: header.height,
                pixels: header.pixels(),
                limit: self.images.capacity() / per_pixel,
                format: opts.format.extension(),
            })?;
        let mut t = Timings::default();
        let start = Instant::now();
        let picture = on_pool(|| image_io::decode(input, self.max_pixels))?;
        // Waiting for memory is not decoding; reading the headers is.
        t.decode = read_header + start.elapsed();
        let layers = self.layers(&picture, opts, &mut t)?;
        let start = Instant::now();
        let bytes = layers.encode(opts)?;
        t.encode = start.elapsed();
        let (width, height) = layers.size;
        Ok(Cutout {
            bytes,
            width,
            height,
            format: opts.format,
            timings: t,
        })
    }

    /// The model's mask for `picture` at `size` (8-bit, one byte per pixel).
    pub fn mask(&self, picture: &Picture, size: (u32, u32), t: &mut Timings) -> Result<Vec<u8>, EngineError> {
        let pipeline = self.model.pipeline();
        let start = Instant::now();
        let input = on_pool(|| pipeline.preprocess(picture.rgb.as_raw(), picture.rgb.dimensions()));
        t.preprocess = start.elapsed();
        let start = Instant::now();
        let out = self.model.infer(input)?;
        t.inference = start.elapsed();
        let start = Instant::now();
        let mask = on_pool(|| pipeline.postprocess(&out, size));
        t.postprocess = start.elapsed();
        Ok(mask)
    }

    /// The mask (and, for a cutout, the colours) at the requested size, ready to encode.
    fn layers<'p>(&self, picture: &'p Picture, opts: &CutOptions, t: &mut Timings) -> Result<Layers<'p>, EngineError> {
        let (w, h) = (picture.width(), picture.height());
        let size = match opts.size {
            OutputSize::Full => (w, h),
            OutputSize::Preview => resize::fit_within(w, h, PREVIEW_PIXELS),
        };
        let mut mask = self.mask(picture, size, t)?;
        let start = Instant::now();
        if let Some(alpha) = &picture.alpha {
            // A pixel transparent in the input stays transparent in the cutout.
            let alpha = shrink(alpha.as_raw(), (w, h), PixelType::U8, size);
            for (m, &a) in mask.iter_mut().zip(alpha.iter()) {
                *m = ((*m as u16 * a as u16 + 127) / 255) as u8;
            }
        }
        let rgb = (!opts.mask_only).then(|| shrink(picture.rgb.as_raw(), (w, h), PixelType::U8x3, size));
        t.postprocess += start.elapsed();
        Ok(Layers { size, mask, rgb })
    }
}

/// A cutout before encoding: the mask, and the colours unless only the mask is wanted.
struct Layers<'p> {
    size: (u32, u32),
    mask: Vec<u8>,
    rgb: Option<std::borrow::Cow<'p, [u8]>>,
}

impl Layers<'_> {
    /// Encodes the gray mask or the RGBA cutout. PNG rows are composed band by band as the
    /// writer asks for them, on the inference threads, so no full RGBA copy is ever built.
    fn encode(&self, opts: &CutOptions) -> Result<Vec<u8>, ImageError> {
        let (w, h) = self.size;
        let width = w as usize;
        match (&self.rgb, opts.format) {
            (None, format) => image_io::encode(&self.mask, w, h, ExtendedColorType::L8, format),
            (Some(rgb), OutputFormat::Png) => Ok(on_pool(|| {
                png_writer::write_png(w, h, 4, |y, row| {
                    let mask = &self.mask[y * width..][..width];
                    color::compose_into(&rgb[y * width * 3..][..width * 3], mask, opts.bg_color, row)
                })
            })),
            (Some(rgb), format) => {
                let rgba = color::compose(rgb, &self.mask, opts.bg_color);
                image_io::encode(&rgba, w, h, ExtendedColorType::Rgba8, format)
            }
        }
    }
}

/// The most bytes per input pixel a cutout holds at once, an upper bound from how the stages
/// hand their buffers on (measured peaks are in README.md, Memory):
/// - decoding: the decoder's frame plus its 8-bit conversion (at most 4 bytes), or an 8-bit
///   RGBA frame beside its RGB and alpha split, or an RGB frame beside its upright copy;
/// - encoding: RGB, alpha and mask (5 bytes) plus the output: a PNG (under 5 bytes even when
///   nothing compresses) or, for WebP, the composed RGBA frame, the encoder's own copy and the
///   file (12).
fn cutout_bytes_per_pixel(decoded: image::ColorType, format: OutputFormat) -> u64 {
    let decode = (decoded.bytes_per_pixel() as u64 + 4).max(8);
    let output = match format {
        OutputFormat::Png => 5,
        OutputFormat::Webp => 12,
    };
    decode.max(5 + output)
}

/// Resizes to `size` with Lanczos3 if it differs; borrows nothing when it doesn't need to.
fn shrink(src: &[u8], from: (u32, u32), pixel: PixelType, to: (u32, u32)) -> std::borrow::Cow<'_, [u8]> {
    if from == to {
        std::borrow::Cow::Borrowed(src)
    } else {
        std::borrow::Cow::Owned(resize::convolve(src, from, pixel, to, FilterType::Lanczos3))
    }
}
