//! The segmentation model and everything around it: decode, preprocess, infer, postprocess,
//! composite, encode. Pure computation; the only I/O is reading model files.

mod budget;
mod color;
pub mod image_io;
pub mod layout;
mod model;
mod png_writer;
pub mod pool;
mod prepost;
pub mod refine;
pub mod resize;

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fast_image_resize::{FilterType, PixelType};
use image::ExtendedColorType;
use serde::{Deserialize, Serialize};

pub use color::{BgColor, ColorError, Gradient, GradientError};
pub use image_io::{ImageError, OutputFormat, Picture};
pub use layout::{BoxPx, Layout, Margin, Position, Roi};
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
    /// An option that cannot be met for this image (an roi outside it, nothing to crop to, a
    /// background photo that does not decode).
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
}

impl From<layout::LayoutError> for EngineError {
    fn from(e: layout::LayoutError) -> EngineError {
        EngineError::Invalid {
            code: e.code,
            message: e.message,
        }
    }
}

/// `output_size` in the API: a small preview or the original resolution (and remove.bg's
/// legacy in-between sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OutputSize {
    /// At most 0.25 megapixels, aspect ratio kept.
    Preview,
    /// At most 1.5 megapixels (remove.bg's `medium`).
    Medium,
    /// At most 4 megapixels (remove.bg's `hd`).
    Hd,
    /// The input's own size.
    #[default]
    Full,
}

impl OutputSize {
    /// The most pixels of this size (`None`: the input's own).
    pub fn max_pixels(self) -> Option<u64> {
        match self {
            OutputSize::Preview => Some(PREVIEW_PIXELS),
            OutputSize::Medium => Some(1_500_000),
            OutputSize::Hd => Some(4_000_000),
            OutputSize::Full => None,
        }
    }

    /// The size of a `w` x `h` input's output: within this size's pixels, aspect kept.
    pub fn fit(self, w: u32, h: u32) -> (u32, u32) {
        match self.max_pixels() {
            None => (w, h),
            Some(max) => resize::fit_within(w, h, max),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OutputSize::Preview => "preview",
            OutputSize::Medium => "medium",
            OutputSize::Hd => "hd",
            OutputSize::Full => "full",
        }
    }
}

/// Pixel budget of `OutputSize::Preview`.
pub const PREVIEW_PIXELS: u64 = 250_000;

/// What the cutout is laid over.
#[derive(Debug, Clone)]
pub enum Background {
    Color(BgColor),
    Gradient(Gradient),
    /// An encoded photo (JPEG, PNG or WebP), scaled to cover the canvas and centred.
    Image(Arc<Vec<u8>>),
}

/// The cutout (RGBA) or its mask alone (gray).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Channels {
    #[default]
    Rgba,
    Alpha,
}

/// How the model's mask is fitted to the photo at the output size ([`refine`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Refine {
    /// The model's mask, resized.
    Off,
    /// The edge band follows the photo, and its colours lose the old background.
    #[default]
    Fast,
}

/// What to produce from one input image.
#[derive(Debug, Clone, Default)]
pub struct CutOptions {
    pub format: OutputFormat,
    pub size: OutputSize,
    /// Composite onto this instead of leaving the background transparent.
    pub background: Option<Background>,
    pub channels: Channels,
    /// Only this region of the input can be foreground.
    pub roi: Option<Roi>,
    pub layout: Layout,
    pub refine: Refine,
}

/// Wall time of each stage of one cutout.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub decode: Duration,
    pub preprocess: Duration,
    pub inference: Duration,
    pub postprocess: Duration,
    /// Edge refinement (part of postprocessing; counted in it too).
    pub refine: Duration,
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
    /// The format written (`Auto` resolved).
    pub format: OutputFormat,
    /// The subject's bounding box in the output (`None`: no subject found).
    pub foreground: Option<BoxPx>,
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

    /// How many cutouts have waited for room under the memory bound, and the most bytes the
    /// cutouts in flight ever held at once (by their estimate).
    pub fn image_memory_waits_and_peak(&self) -> (u64, u64) {
        (self.images.waits(), self.images.peak())
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
        let extra = self.extra_bytes(&header, opts)?;
        // Reserved here, on the caller's thread: the inference pool's threads must stay free
        // for the cutouts that hold the memory, or they could not finish and return it.
        let _memory = self
            .images
            .reserve(header.pixels().saturating_mul(per_pixel).saturating_add(extra))
            .ok_or(ImageError::OverMemory {
                width: header.width,
                height: header.height,
                pixels: header.pixels(),
                limit: self.images.capacity() / per_pixel,
                format: opts.format.extension(),
            })?;
        let mut t = Timings::default();
        let start = Instant::now();
        let mut picture = on_pool(|| image_io::decode(input, self.max_pixels))?;
        // Waiting for memory is not decoding; reading the headers is.
        t.decode = read_header + start.elapsed();
        let layers = self.layers(&mut picture, opts, &mut t)?;
        let start = Instant::now();
        let backdrop = self.backdrop(opts, &layers)?;
        let (bytes, format) = layers.encode(opts, &backdrop)?;
        t.encode = start.elapsed();
        let (width, height) = layers.size;
        Ok(Cutout {
            bytes,
            width,
            height,
            format,
            foreground: layers.foreground,
            timings: t,
        })
    }

    /// Memory beyond the per-pixel estimate: the new canvas of a crop or a move (its mask and
    /// colours, at most 1000 px wider and higher than the output, plus the subject's region
    /// copied out), and a background photo decoded and fitted to the canvas.
    fn extra_bytes(&self, header: &image_io::Header, opts: &CutOptions) -> Result<u64, EngineError> {
        let (ow, oh) = opts.size.fit(header.width, header.height);
        let output = ow as u64 * oh as u64;
        let mut extra = 0u64;
        if opts.refine != Refine::Off {
            // Its working planes, and the photo at the output size even for a mask alone.
            extra += refine::working_bytes(output) + 3 * output;
        }
        let canvas = if opts.layout.is_identity() {
            output
        } else {
            let canvas = (ow as u64 + 1000) * (oh as u64 + 1000);
            extra += (canvas + output) * 4;
            canvas
        };
        if let Some(Background::Image(bytes)) = &opts.background {
            let bg = image_io::header(bytes, self.max_pixels).map_err(bg_image_error)?;
            extra += bg.pixels() * (bg.color.bytes_per_pixel() as u64 + 4).max(8) + canvas * 3;
        }
        Ok(extra)
    }

    /// The background laid out for `layers`' canvas.
    fn backdrop(&self, opts: &CutOptions, layers: &Layers<'_>) -> Result<Backdrop, EngineError> {
        if opts.channels == Channels::Alpha {
            return Ok(Backdrop::None);
        }
        Ok(match &opts.background {
            None => Backdrop::None,
            Some(Background::Color(c)) => Backdrop::Solid(*c),
            Some(Background::Gradient(g)) => Backdrop::Gradient(g.clone()),
            Some(Background::Image(bytes)) => {
                let bg = on_pool(|| image_io::decode(bytes, self.max_pixels)).map_err(bg_image_error)?;
                Backdrop::Image(on_pool(|| cover(&bg.rgb, layers.size)))
            }
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

    /// The mask (and, for a cutout, the colours) at the requested size and laid out, ready to
    /// encode.
    fn layers<'p>(&self, picture: &'p mut Picture, opts: &CutOptions, t: &mut Timings) -> Result<Layers<'p>, EngineError> {
        let (w, h) = (picture.width(), picture.height());
        let size = opts.size.fit(w, h);
        let mut mask = self.mask(picture, size, t)?;
        let start = Instant::now();
        let wants_rgb = opts.channels == Channels::Rgba || opts.format == OutputFormat::Zip;
        // The refinement takes the model's mask (before the input's own transparency and the
        // region of interest, which only take away) and the photo at the output size.
        let mut refined_rgb = None;
        if opts.refine != Refine::Off {
            let settings = refine::Settings::default();
            if size == (w, h) {
                let rgb: &mut [u8] = &mut picture.rgb;
                on_pool(|| refine::refine(rgb, &mut mask, size, wants_rgb, &settings));
            } else {
                let mut rgb = resize::convolve(picture.rgb.as_raw(), (w, h), PixelType::U8x3, size, FilterType::Lanczos3);
                on_pool(|| refine::refine(&mut rgb, &mut mask, size, wants_rgb, &settings));
                refined_rgb = Some(rgb);
            }
            t.refine = start.elapsed();
        }
        let picture: &'p Picture = picture;
        if let Some(alpha) = &picture.alpha {
            // A pixel transparent in the input stays transparent in the cutout.
            let alpha = shrink(alpha.as_raw(), (w, h), PixelType::U8, size);
            for (m, &a) in mask.iter_mut().zip(alpha.iter()) {
                *m = ((*m as u16 * a as u16 + 127) / 255) as u8;
            }
        }
        if let Some(roi) = &opts.roi {
            layout::apply_roi(roi, (w, h), &mut mask, size)?;
        }
        let mut rgb = wants_rgb.then(|| match refined_rgb {
            Some(rgb) => Cow::Owned(rgb),
            None => shrink(picture.rgb.as_raw(), (w, h), PixelType::U8x3, size),
        });
        let mut size = size;
        if !opts.layout.is_identity() {
            let subject = layout::foreground(&mask, size).ok_or_else(|| EngineError::Invalid {
                code: "unknown_foreground",
                message: "no subject was found in the image to crop, scale or position".into(),
            })?;
            let (canvas, to) = opts.layout.place(subject, size);
            mask = on_pool(|| layout::transplant(&mask, size, 1, subject, canvas, to));
            rgb = rgb.map(|rgb| Cow::Owned(on_pool(|| layout::transplant(&rgb, size, 3, subject, canvas, to))));
            size = canvas;
        }
        let foreground = layout::foreground(&mask, size);
        t.postprocess += start.elapsed();
        Ok(Layers {
            size,
            mask,
            rgb,
            foreground,
        })
    }
}

fn bg_image_error(e: ImageError) -> EngineError {
    EngineError::Invalid {
        code: "invalid_bg_image",
        message: format!("the background image cannot be used: {e}"),
    }
}

/// `src` scaled to cover `size` (aspect kept) and centred, as RGB.
fn cover(src: &image::RgbImage, (cw, ch): (u32, u32)) -> Vec<u8> {
    let (bw, bh) = src.dimensions();
    if (bw, bh) == (cw, ch) {
        return src.as_raw().clone();
    }
    // The centred part of the photo with the canvas's aspect, then resized to the canvas.
    let s = (cw as f64 / bw as f64).max(ch as f64 / bh as f64);
    let (rw, rh) = (
        ((cw as f64 / s).round() as u32).clamp(1, bw),
        ((ch as f64 / s).round() as u32).clamp(1, bh),
    );
    let from = BoxPx {
        left: (bw - rw) / 2,
        top: (bh - rh) / 2,
        width: rw,
        height: rh,
    };
    let to = BoxPx {
        left: 0,
        top: 0,
        width: cw,
        height: ch,
    };
    layout::transplant(src.as_raw(), (bw, bh), 3, from, (cw, ch), to)
}

/// The background behind one canvas.
enum Backdrop {
    None,
    Solid(BgColor),
    Gradient(Gradient),
    /// RGB at the canvas's size.
    Image(Vec<u8>),
}

impl Backdrop {
    /// Row `y` as the compositor takes it; `scratch` holds RGBA when one is built.
    fn row<'a>(&'a self, y: usize, size: (u32, u32), scratch: &'a mut Vec<u8>) -> color::BgRow<'a> {
        let width = size.0 as usize;
        match self {
            Backdrop::None => color::BgRow::Transparent,
            Backdrop::Solid(c) => color::BgRow::Solid(*c),
            Backdrop::Gradient(g) => {
                scratch.resize(width * 4, 0);
                g.fill_row(y, size, scratch);
                color::BgRow::Pixels(scratch)
            }
            Backdrop::Image(rgb) => {
                scratch.clear();
                for p in rgb[y * width * 3..][..width * 3].chunks_exact(3) {
                    scratch.extend_from_slice(&[p[0], p[1], p[2], 255]);
                }
                color::BgRow::Pixels(scratch)
            }
        }
    }

    fn opaque(&self) -> bool {
        match self {
            Backdrop::None => false,
            Backdrop::Solid(c) => c.0[3] == 255,
            Backdrop::Gradient(g) => g.opaque(),
            Backdrop::Image(_) => true,
        }
    }
}

/// A cutout before encoding: the mask, the colours unless only the mask is wanted, and where
/// the subject is.
struct Layers<'p> {
    size: (u32, u32),
    mask: Vec<u8>,
    rgb: Option<Cow<'p, [u8]>>,
    foreground: Option<BoxPx>,
}

/// Quality of JPEG output (`jpg`, and `color.jpg` in a ZIP).
const JPEG_QUALITY: u8 = 90;

impl Layers<'_> {
    /// Encodes the gray mask or the cutout, resolving `auto`. PNG rows are composed band by
    /// band as the writer asks for them, on the inference threads, so no full RGBA copy is
    /// ever built.
    fn encode(&self, opts: &CutOptions, bg: &Backdrop) -> Result<(Vec<u8>, OutputFormat), ImageError> {
        let (w, h) = self.size;
        let format = match opts.format {
            // A mask is kept lossless; a cutout is a JPEG when nothing in it is transparent.
            OutputFormat::Auto if self.rgb.is_none() => OutputFormat::Png,
            OutputFormat::Auto if bg.opaque() || self.mask.iter().all(|&a| a == 255) => OutputFormat::Jpg,
            OutputFormat::Auto => OutputFormat::Png,
            f => f,
        };
        let bytes = match (&self.rgb, format) {
            (_, OutputFormat::Zip) => {
                let rgb = self.rgb.as_deref().expect("a ZIP keeps the colours");
                // color.jpg: the subject's colours, or the composite when there is a background.
                let color = match bg {
                    Backdrop::None => image_io::encode_jpeg(rgb, w, h, ExtendedColorType::Rgb8, JPEG_QUALITY)?,
                    _ => self.flat_jpeg(rgb, bg)?,
                };
                let alpha = image_io::encode(&self.mask, w, h, ExtendedColorType::L8, OutputFormat::Png)?;
                image_io::zip(&[("color.jpg", &color), ("alpha.png", &alpha)])?
            }
            (None, OutputFormat::Jpg) => image_io::encode_jpeg(&self.mask, w, h, ExtendedColorType::L8, JPEG_QUALITY)?,
            (None, format) => image_io::encode(&self.mask, w, h, ExtendedColorType::L8, format)?,
            (Some(rgb), OutputFormat::Png) => {
                let width = w as usize;
                on_pool(|| {
                    png_writer::write_png(w, h, 4, |y, row| {
                        let mask = &self.mask[y * width..][..width];
                        let mut scratch = Vec::new();
                        let under = bg.row(y, self.size, &mut scratch);
                        color::compose_row(&rgb[y * width * 3..][..width * 3], mask, under, row)
                    })
                })
            }
            (Some(rgb), OutputFormat::Jpg) => self.flat_jpeg(rgb, bg)?,
            (Some(rgb), format) => {
                let rgba = self.composed(rgb, bg);
                image_io::encode(&rgba, w, h, ExtendedColorType::Rgba8, format)?
            }
        };
        Ok((bytes, format))
    }

    /// The whole RGBA composite.
    fn composed(&self, rgb: &[u8], bg: &Backdrop) -> Vec<u8> {
        use rayon::prelude::*;
        let width = self.size.0 as usize;
        let mut out = vec![0; self.mask.len() * 4];
        on_pool(|| {
            out.par_chunks_mut(width * 4).enumerate().for_each(|(y, row)| {
                let mut scratch = Vec::new();
                let under = bg.row(y, self.size, &mut scratch);
                color::compose_row(&rgb[y * width * 3..][..width * 3], &self.mask[y * width..][..width], under, row)
            })
        });
        out
    }

    /// A JPEG of the composite, laid over white where anything is still transparent. Rows are
    /// composed and flattened together on the inference threads, so only the RGB frame is built.
    fn flat_jpeg(&self, rgb: &[u8], bg: &Backdrop) -> Result<Vec<u8>, ImageError> {
        use rayon::prelude::*;
        let (w, h) = self.size;
        let width = w as usize;
        let mut flat = vec![0; self.mask.len() * 3];
        on_pool(|| {
            flat.par_chunks_mut(width * 3).enumerate().for_each(|(y, out)| {
                let (mut scratch, mut rgba) = (Vec::new(), vec![0; width * 4]);
                let under = bg.row(y, self.size, &mut scratch);
                color::compose_row(&rgb[y * width * 3..][..width * 3], &self.mask[y * width..][..width], under, &mut rgba);
                for (o, p) in out.chunks_exact_mut(3).zip(rgba.chunks_exact(4)) {
                    let a = p[3] as u32;
                    let mix = |c: u8| ((c as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
                    o.copy_from_slice(&[mix(p[0]), mix(p[1]), mix(p[2])]);
                }
            })
        });
        image_io::encode_jpeg(&flat, w, h, ExtendedColorType::Rgb8, JPEG_QUALITY)
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
        // The flattened RGB frame and the file (up to 3 bytes a pixel for noise at quality 90),
        // with room for the encoder's own rows.
        OutputFormat::Jpg | OutputFormat::Auto => 7,
        // The same, plus the mask's PNG.
        OutputFormat::Zip => 11,
        OutputFormat::Webp => 12,
    };
    decode.max(5 + output)
}

/// Resizes to `size` with Lanczos3 if it differs; borrows nothing when it doesn't need to.
fn shrink(src: &[u8], from: (u32, u32), pixel: PixelType, to: (u32, u32)) -> Cow<'_, [u8]> {
    if from == to {
        Cow::Borrowed(src)
    } else {
        Cow::Owned(resize::convolve(src, from, pixel, to, FilterType::Lanczos3))
    }
}
