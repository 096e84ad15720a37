//! Decoding the API's input formats (JPEG, PNG, WebP) into an upright RGB picture plus optional
//! alpha, and encoding cutouts (RGBA or gray) as PNG or lossless WebP.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{
    DynamicImage, ExtendedColorType, GrayImage, ImageDecoder, ImageEncoder, ImageFormat, ImageReader, Limits, RgbImage,
    codecs::webp::WebPEncoder,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Why an input image was refused. Each variant has a stable machine-readable code.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the input is empty")]
    Empty,
    #[error("unsupported image format: {0} (JPEG, PNG and WebP are supported)")]
    Unsupported(String),
    #[error("the image is truncated or corrupt: {0}")]
    Corrupt(String),
    #[error("the image has {pixels} pixels ({width}x{height}), more than the limit of {limit}")]
    TooLarge {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error(
        "the image has {pixels} pixels ({width}x{height}); this device's memory limit allows at most {limit} \
         for {format} output"
    )]
    OverMemory {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
        format: &'static str,
    },
    #[error("could not encode the result: {0}")]
    Encode(String),
}

impl ImageError {
    pub fn code(&self) -> &'static str {
        match self {
            ImageError::Empty => "empty_image",
            ImageError::Unsupported(_) => "unsupported_format",
            ImageError::Corrupt(_) => "corrupt_image",
            ImageError::TooLarge { .. } | ImageError::OverMemory { .. } => "image_too_large",
            ImageError::Encode(_) => "encode_failed",
        }
    }
}

/// A decoded input: 8-bit RGB, upright (EXIF orientation applied), with the source alpha if it had one.
pub struct Picture {
    pub rgb: RgbImage,
    pub alpha: Option<GrayImage>,
}

impl Picture {
    pub fn width(&self) -> u32 {
        self.rgb.width()
    }
    pub fn height(&self) -> u32 {
        self.rgb.height()
    }
}

/// What an input's headers declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub width: u32,
    pub height: u32,
    /// The decoder's own pixel layout, before conversion to 8-bit RGB.
    pub color: image::ColorType,
}

impl Header {
    pub fn pixels(&self) -> u64 {
        self.width as u64 * self.height as u64
    }
}

/// Reads the headers only, with the same checks as [`decode`].
pub fn header(bytes: &[u8], max_pixels: u64) -> Result<Header, ImageError> {
    let decoder = open(bytes, max_pixels)?;
    let (width, height) = decoder.dimensions();
    Ok(Header {
        width,
        height,
        color: decoder.color_type(),
    })
}

/// Decodes `bytes`, refusing anything but JPEG/PNG/WebP, truncated data, and images over
/// `max_pixels` (checked from the header, before any pixel buffer is allocated).
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<Picture, ImageError> {
    let mut decoder = open(bytes, max_pixels)?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let img = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    let Picture { rgb, alpha } = split_alpha(img);
    let (w, h) = rgb.dimensions();
    let (rgb, (w, h)) = orient::<3>(rgb.into_raw(), (w, h), orientation);
    Ok(Picture {
        rgb: RgbImage::from_raw(w, h, rgb).expect("rgb buffer matches the image"),
        alpha: alpha.map(|a| {
            let (a, (w, h)) = orient::<1>(a.into_raw(), (w, h), orientation);
            GrayImage::from_raw(w, h, a).expect("alpha buffer matches the image")
        }),
    })
}

/// A decoder for `bytes` that has read the headers: JPEG, PNG or WebP, not cut short (JPEG),
/// with pixels, and at most `max_pixels` of them.
fn open(bytes: &[u8], max_pixels: u64) -> Result<impl ImageDecoder + '_, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let format = image::guess_format(bytes).map_err(|_| ImageError::Unsupported("unrecognised data".into()))?;
    if !matches!(format, ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP) {
        return Err(ImageError::Unsupported(format!("{format:?}")));
    }
    // The decoders are lenient and would fill a cut-off JPEG with grey; refuse it instead.
    if format == ImageFormat::Jpeg && !jpeg_has_end_of_image(bytes) {
        return Err(ImageError::Corrupt(
            "JPEG data ends before its end-of-image marker".into(),
        ));
    }
    // image-webp allocates a metadata chunk (EXIF, read for the orientation) at its declared
    // size before reading it: 1.6 KB declaring a 2.4 GB chunk aborted the process when the
    // allocation failed (fuzz/regressions/image_header). Such a file is cut short anyway.
    if format == ImageFormat::WebP && !webp_chunks_fit(bytes) {
        return Err(ImageError::Corrupt("a WebP chunk runs past the end of the data".into()));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    // Room for a 16-bit RGBA frame of the largest accepted size, plus the codec's own buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(ImageError::TooLarge {
            width,
            height,
            pixels,
            limit: max_pixels,
        });
    }
    if pixels == 0 {
        return Err(ImageError::Corrupt("the image has no pixels".into()));
    }
    Ok(decoder)
}

/// Turns an interleaved 8-bit image of `C` channels upright. Phone photos are mostly stored
/// sideways (EXIF orientation 6); `image`'s own rotation visits the source a column at a
/// time, which cost 38 ms at 12 MP. This copies tile by tile, so reads stay within a few
/// cache lines per source row, on the current rayon pool.
fn orient<const C: usize>(src: Vec<u8>, (w, h): (u32, u32), o: Orientation) -> (Vec<u8>, (u32, u32)) {
    const TILE: usize = 64;
    let (wi, hi) = (w as isize, h as isize);
    // Output pixel (x, y) reads source pixel origin + x * dx + y * dy.
    let (origin, dx, dy) = match o {
        Orientation::NoTransforms => return (src, (w, h)),
        Orientation::FlipHorizontal => (wi - 1, -1, wi),
        Orientation::Rotate180 => (hi * wi - 1, -1, -wi),
        Orientation::FlipVertical => ((hi - 1) * wi, 1, -wi),
        Orientation::Rotate90FlipH => (0, wi, 1),
        Orientation::Rotate90 => ((hi - 1) * wi, -wi, 1),
        Orientation::Rotate270FlipH => (hi * wi - 1, -wi, -1),
        Orientation::Rotate270 => (wi - 1, wi, -1),
    };
    let (ow, oh) = if dx.abs() == 1 { (w, h) } else { (h, w) };
    let ow_px = ow as usize;
    let mut out = vec![0u8; ow_px * C * oh as usize];
    // Whole pixels: one bounds check and one small move each.
    let (src_px, _) = src.as_chunks::<C>();
    let (out_px, _) = out.as_chunks_mut::<C>();
    out_px
        .par_chunks_mut(ow_px * TILE)
        .enumerate()
        .for_each(|(band, rows)| {
            for x0 in (0..ow_px).step_by(TILE) {
                let x1 = (x0 + TILE).min(ow_px);
                for (r, row) in rows.chunks_exact_mut(ow_px).enumerate() {
                    let y = (band * TILE + r) as isize;
                    let mut at = origin + x0 as isize * dx + y * dy;
                    for px in &mut row[x0..x1] {
                        *px = src_px[at as usize];
                        at += dx;
                    }
                }
            }
        });
    (out, (ow, oh))
}

fn corrupt(e: image::ImageError) -> ImageError {
    match e {
        image::ImageError::Unsupported(u) => ImageError::Unsupported(u.to_string()),
        image::ImageError::Limits(l) => ImageError::Corrupt(format!("decoder limit: {l}")),
        other => ImageError::Corrupt(other.to_string()),
    }
}

/// Converts any decoded layout to 8-bit RGB (+ alpha). 16-bit samples are scaled, not clipped;
/// gray is replicated to three channels. CMYK JPEGs arrive here already converted to RGB.
fn split_alpha(img: DynamicImage) -> Picture {
    if !img.color().has_alpha() {
        return Picture {
            rgb: img.into_rgb8(),
            alpha: None,
        };
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut rgb = Vec::with_capacity(w as usize * h as usize * 3);
    let mut alpha = Vec::with_capacity(w as usize * h as usize);
    for p in rgba.as_raw().chunks_exact(4) {
        rgb.extend_from_slice(&p[..3]);
        alpha.push(p[3]);
    }
    let alpha = GrayImage::from_raw(w, h, alpha).expect("alpha buffer matches the image");
    Picture {
        rgb: RgbImage::from_raw(w, h, rgb).expect("rgb buffer matches the image"),
        alpha: alpha.as_raw().iter().any(|&a| a != 255).then_some(alpha),
    }
}

/// Whether the main image's entropy-coded data is followed by an EOI marker. Walks the marker
/// segments to the first SOS (so an EXIF thumbnail's own markers are skipped), then looks for
/// FFD9, which cannot occur inside scan data (0xFF there is always stuffed or a restart marker).
fn jpeg_has_end_of_image(b: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 4 <= b.len() {
        if b[i] != 0xFF {
            return false;
        }
        let marker = b[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        let len = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
        if marker == 0xDA {
            let scan = (i + 2 + len).min(b.len());
            // From the end: the marker is normally in the last two bytes, and this runs twice
            // per input (headers, then decode).
            return b[scan..].windows(2).rev().any(|w| w == [0xFF, 0xD9]);
        }
        i += 2 + len;
    }
    false
}

/// Whether each chunk of a WebP file (`RIFF` size `WEBP`, then chunks: fourcc, size as u32 LE,
/// data padded to an even length) that lies within the RIFF size ends within `b`.
fn webp_chunks_fit(b: &[u8]) -> bool {
    let Some(riff) = b.get(4..8) else { return false };
    let riff_end = (u32::from_le_bytes(riff.try_into().expect("4 bytes")) as usize).saturating_add(8);
    let end = b.len().min(riff_end);
    let mut i = 12;
    while i + 8 <= end {
        let size = u32::from_le_bytes(b[i + 4..i + 8].try_into().expect("4 bytes")) as usize;
        if size > b.len() - i - 8 {
            return false;
        }
        i += 8 + size + (size & 1);
    }
    true
}

/// Output container for cutouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Png,
    Webp,
    /// Opaque: transparent parts are laid over the background, or white.
    Jpg,
    /// `color.jpg` (the colours) and `alpha.png` (the mask) in one ZIP.
    Zip,
    /// PNG if anything in the result is transparent, else JPG.
    Auto,
}

impl OutputFormat {
    /// The file extension (`auto` is resolved before anything is written; as a name, "auto").
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Webp => "webp",
            OutputFormat::Jpg => "jpg",
            OutputFormat::Zip => "zip",
            OutputFormat::Auto => "auto",
        }
    }
    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Png | OutputFormat::Auto => "image/png",
            OutputFormat::Webp => "image/webp",
            OutputFormat::Jpg => "image/jpeg",
            OutputFormat::Zip => "application/zip",
        }
    }
}

/// Baseline JPEG of `L8` or `Rgb8` pixels.
pub fn encode_jpeg(pixels: &[u8], w: u32, h: u32, color: ExtendedColorType, quality: u8) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::with_capacity(pixels.len() / 8);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .write_image(pixels, w, h, color)
        .map_err(|e| ImageError::Encode(e.to_string()))?;
    Ok(out)
}

/// A ZIP of already-compressed members, stored as they are.
pub fn zip(members: &[(&str, &[u8])]) -> Result<Vec<u8>, ImageError> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .last_modified_time(zip::DateTime::default());
    for (name, bytes) in members {
        w.start_file(*name, opts).map_err(|e| ImageError::Encode(e.to_string()))?;
        w.write_all(bytes).map_err(|e| ImageError::Encode(e.to_string()))?;
    }
    Ok(w.finish().map_err(|e| ImageError::Encode(e.to_string()))?.into_inner())
}

/// Encodes raw 8-bit pixels (`L8` gray or `Rgba8`) as PNG (our parallel writer: the cutout is big
/// and waited for) or lossless WebP.
pub fn encode(
    pixels: &[u8],
    w: u32,
    h: u32,
    color: ExtendedColorType,
    format: OutputFormat,
) -> Result<Vec<u8>, ImageError> {
    match format {
        OutputFormat::Png => {
            let channels = color.channel_count() as usize;
            if color.bits_per_pixel() != 8 * channels as u16 || pixels.len() != w as usize * h as usize * channels {
                return Err(ImageError::Encode(format!(
                    "{w}x{h} {color:?} does not match {} bytes",
                    pixels.len()
                )));
            }
            let stride = w as usize * channels;
            Ok(super::on_pool(|| {
                super::png_writer::write_png(w, h, channels, |y, row| {
                    row.copy_from_slice(&pixels[y * stride..][..stride])
                })
            }))
        }
        OutputFormat::Jpg | OutputFormat::Zip | OutputFormat::Auto => {
            Err(ImageError::Encode(format!("{format:?} is encoded by the cutout, not here")))
        }
        OutputFormat::Webp => {
            let mut out = Vec::with_capacity(pixels.len() / 2);
            WebPEncoder::new_lossless(&mut out)
                .write_image(pixels, w, h, color)
                .map_err(|e| ImageError::Encode(e.to_string()))?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg_bytes(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&img)
            .unwrap();
        out
    }

    #[test]
    fn eoi_detection_accepts_whole_and_rejects_cut_jpeg() {
        let whole = jpeg_bytes(64, 48);
        assert!(jpeg_has_end_of_image(&whole));
        assert!(!jpeg_has_end_of_image(&whole[..whole.len() - 2]));
        assert!(!jpeg_has_end_of_image(&whole[..whole.len() / 2]));
        let mut trailer = whole.clone();
        trailer.extend_from_slice(b"trailing data some cameras append");
        assert!(jpeg_has_end_of_image(&trailer));
    }

    /// fuzz/regressions/image_header/webp-exif-chunk-2gb.webp: a real lossless WebP (a seed)
    /// whose EXIF chunk declares 2,382,364,698 bytes. Reading the orientation allocated that
    /// much, and the process aborted where the system could not provide it. Refused at the
    /// headers now, before any decoder runs.
    #[test]
    fn a_webp_chunk_larger_than_the_file_is_refused_before_decoding() {
        let found = include_bytes!("../../fuzz/regressions/image_header/webp-exif-chunk-2gb.webp");
        for result in [
            header(found, 50_000_000).map(|_| ()),
            decode(found, 50_000_000).map(|_| ()),
        ] {
            match result {
                Err(e @ ImageError::Corrupt(_)) => assert!(e.to_string().contains("past the end"), "{e}"),
                other => panic!("expected corrupt_image, got {other:?}"),
            }
        }
        // With its EXIF chunk's true size (26 bytes) its headers are read again.
        let mut fixed = found.to_vec();
        let exif = fixed.len() - 34;
        assert_eq!(&fixed[exif..exif + 4], b"EXIF");
        fixed[exif + 4..exif + 8].copy_from_slice(&26u32.to_le_bytes());
        assert!(webp_chunks_fit(&fixed));
        let h = header(&fixed, 50_000_000).unwrap();
        assert_eq!((h.width, h.height), (40, 27));
        assert!(!webp_chunks_fit(&fixed[..fixed.len() - 1]), "the EXIF chunk cut short");
    }

    #[test]
    fn decode_refuses_empty_unknown_and_oversize() {
        assert!(matches!(decode(&[], 1000), Err(ImageError::Empty)));
        assert!(matches!(decode(b"GIF89a....", 1000), Err(ImageError::Unsupported(_))));
        assert!(matches!(decode(b"hello, world", 1000), Err(ImageError::Unsupported(_))));
        let j = jpeg_bytes(64, 48);
        match decode(&j, 64 * 48 - 1) {
            Err(ImageError::TooLarge { pixels, limit, .. }) => assert_eq!((pixels, limit), (3072, 3071)),
            other => panic!("expected TooLarge, got {:?}", other.map(|p| p.width())),
        }
        assert_eq!(decode(&j, 64 * 48).unwrap().rgb.dimensions(), (64, 48));
    }

    #[test]
    fn sixteen_bit_gray_alpha_is_scaled_not_clipped() {
        let img =
            image::ImageBuffer::<image::LumaA<u16>, _>::from_fn(4, 2, |x, _| image::LumaA([x as u16 * 20000, 32896]));
        let mut png = Vec::new();
        DynamicImage::ImageLumaA16(img)
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let pic = decode(&png, 1000).unwrap();
        let reds: Vec<u8> = (0..4).map(|x| pic.rgb.get_pixel(x, 0)[0]).collect();
        assert_eq!(reds, vec![0, 78, 156, 233]);
        assert!(pic.rgb.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
        assert!(pic.alpha.unwrap().pixels().all(|a| a[0] == 128));
    }

    #[test]
    fn opaque_alpha_channel_is_dropped() {
        let img = image::RgbaImage::from_pixel(3, 3, image::Rgba([1, 2, 3, 255]));
        let mut png = Vec::new();
        DynamicImage::ImageRgba8(img)
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        assert!(decode(&png, 100).unwrap().alpha.is_none());
    }

    #[test]
    fn encoders_round_trip_rgba() {
        let px: Vec<u8> = (0..(5 * 4))
            .flat_map(|i| [i as u8, 2 * i as u8, 3, (i * 12) as u8])
            .collect();
        for f in [OutputFormat::Png, OutputFormat::Webp] {
            let bytes = encode(&px, 5, 4, ExtendedColorType::Rgba8, f).unwrap();
            let back = image::load_from_memory(&bytes).unwrap();
            assert!(back.color().has_alpha(), "{f:?}");
            assert_eq!(back.into_rgba8().into_raw(), px, "{f:?} is lossless");
        }
    }

    #[test]
    fn orient_matches_image_for_every_exif_orientation() {
        // 70x130 crosses the 64-pixel tiles in both directions, with partial tiles at the ends.
        let (w, h) = (70u32, 130u32);
        let rgb = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, (x * 3 + y * 7) as u8]));
        let gray = GrayImage::from_fn(w, h, |x, y| image::Luma([(x * 5 + y * 11) as u8]));
        for exif in 1..=8 {
            let o = Orientation::from_exif(exif).unwrap();
            let mut want = DynamicImage::ImageRgb8(rgb.clone());
            want.apply_orientation(o);
            let (got, size) = orient::<3>(rgb.as_raw().clone(), (w, h), o);
            assert_eq!(size, (want.width(), want.height()), "exif {exif}");
            assert_eq!(got, want.into_rgb8().into_raw(), "exif {exif}");
            let mut want = DynamicImage::ImageLuma8(gray.clone());
            want.apply_orientation(o);
            let (got, _) = orient::<1>(gray.as_raw().clone(), (w, h), o);
            assert_eq!(got, want.into_luma8().into_raw(), "exif {exif}, gray");
        }
    }
}
