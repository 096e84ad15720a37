//! Input handling with the real model: every accepted layout gives a correct, upright cutout;
//! every refused input gives its typed error.

mod common;
use common::*;

use image::{DynamicImage, ImageFormat, RgbImage};
use removebgd::engine::{CutOptions, EngineError, ImageError, OutputFormat};
use std::io::Cursor;

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

fn chelsea() -> RgbImage {
    image::open(images().join("chelsea.png")).unwrap().into_rgb8()
}

fn cut(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let c = u2netp().cut(bytes, &CutOptions::default()).expect("cut");
    alpha_of(&c.bytes)
}

#[test]
fn exif_orientation_is_applied() {
    // chelsea-exif6.jpg stores the photo turned a quarter left, with EXIF orientation 6.
    let decode = |name| {
        removebgd::engine::image_io::decode(&read(fixture(name)), 50_000_000)
            .unwrap()
            .rgb
    };
    let (upright, rotated) = (decode("chelsea.jpg"), decode("chelsea-exif6.jpg"));
    assert_eq!(rotated.dimensions(), upright.dimensions(), "must come out upright");
    let d = mad(upright.as_raw(), rotated.as_raw());
    assert!(
        d < 3.0,
        "the EXIF-rotated photo decodes {d} levels away from the upright one"
    );
    let flipped = image::imageops::rotate180(&upright);
    assert!(
        mad(flipped.as_raw(), rotated.as_raw()) > 20.0,
        "the comparison can tell orientations apart"
    );
    let c = u2netp()
        .cut(&read(fixture("chelsea-exif6.jpg")), &CutOptions::default())
        .unwrap();
    assert_eq!((c.width, c.height), upright.dimensions());
    // The model saw the upright pixels: same cutout as those pixels given directly.
    let direct = u2netp()
        .cut(
            &encode(&DynamicImage::ImageRgb8(rotated), ImageFormat::Png),
            &CutOptions::default(),
        )
        .unwrap();
    assert_eq!(c.bytes, direct.bytes);
}

#[test]
fn gray_input_is_cut_as_replicated_rgb() {
    let gray = DynamicImage::ImageRgb8(chelsea()).into_luma8();
    let as_rgb = DynamicImage::ImageLuma8(gray.clone()).into_rgb8();
    let from_gray = u2netp()
        .cut(
            &encode(&DynamicImage::ImageLuma8(gray), ImageFormat::Png),
            &CutOptions::default(),
        )
        .unwrap();
    let from_rgb = u2netp()
        .cut(
            &encode(&DynamicImage::ImageRgb8(as_rgb), ImageFormat::Png),
            &CutOptions::default(),
        )
        .unwrap();
    assert_eq!(from_gray.bytes, from_rgb.bytes);
}

#[test]
fn sixteen_bit_input_is_scaled_not_clipped() {
    let rgb = chelsea();
    let wide = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(rgb.width(), rgb.height(), |x, y| {
        let p = rgb.get_pixel(x, y);
        image::Rgb([p[0] as u16 * 257, p[1] as u16 * 257, p[2] as u16 * 257])
    });
    let a = u2netp()
        .cut(
            &encode(&DynamicImage::ImageRgb16(wide), ImageFormat::Png),
            &CutOptions::default(),
        )
        .unwrap();
    let b = u2netp()
        .cut(
            &encode(&DynamicImage::ImageRgb8(rgb), ImageFormat::Png),
            &CutOptions::default(),
        )
        .unwrap();
    assert_eq!(a.bytes, b.bytes, "16-bit samples v*257 must decode to exactly v");
}

#[test]
fn cmyk_jpeg_is_converted_to_the_right_colours() {
    let original = chelsea();
    let pic = removebgd::engine::image_io::decode(&read(fixture("chelsea-cmyk.jpg")), 50_000_000).unwrap();
    assert_eq!(pic.rgb.dimensions(), original.dimensions());
    let d = mad(pic.rgb.as_raw(), original.as_raw());
    assert!(d < 4.0, "CMYK JPEG decoded {d} levels away from its RGB source");
    let (_, _, from_cmyk) = cut(&read(fixture("chelsea-cmyk.jpg")));
    let (_, _, from_rgb) = cut(&read(images().join("chelsea.png")));
    // u2netp's mask moves by about 2 levels for the few levels the JPEG round trip costs (1.7
    // with the earlier resize order, 2.1 with Pillow's); a wrong conversion moves it by far more.
    let d = mad(&from_cmyk, &from_rgb);
    assert!(d < 3.0, "the mask from the CMYK JPEG is {d} levels away");
    let mut swapped = original.clone();
    swapped.pixels_mut().for_each(|p| p.0.swap(0, 2));
    let (_, _, from_bgr) = cut(&encode(&DynamicImage::ImageRgb8(swapped), ImageFormat::Png));
    let wrong = mad(&from_bgr, &from_rgb);
    assert!(wrong > 20.0, "the comparison can tell a channel swap apart ({wrong})");
}

#[test]
fn rgba_input_keeps_its_transparent_pixels_transparent() {
    let rgb = chelsea();
    let (w, h) = rgb.dimensions();
    let rgba = image::RgbaImage::from_fn(w, h, |x, y| {
        let p = rgb.get_pixel(x, y);
        image::Rgba([p[0], p[1], p[2], if x < w / 2 { 0 } else { 255 }])
    });
    let (_, _, cut_rgba) = cut(&encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png));
    let (_, _, cut_rgb) = cut(&encode(&DynamicImage::ImageRgb8(rgb), ImageFormat::Png));
    for y in 0..h as usize {
        for x in 0..w as usize {
            let i = y * w as usize + x;
            let want = if x < w as usize / 2 { 0 } else { cut_rgb[i] };
            assert_eq!(cut_rgba[i], want, "pixel {x},{y}");
        }
    }
    assert!(cut_rgb[..].iter().any(|&a| a > 128), "the cat is found at all");
}

#[test]
fn webp_input_cuts_like_the_same_pixels_in_png() {
    let img = DynamicImage::ImageRgb8(chelsea());
    let mut webp = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
        .encode(
            img.as_bytes(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    let a = u2netp().cut(&webp, &CutOptions::default()).unwrap();
    let b = u2netp()
        .cut(&encode(&img, ImageFormat::Png), &CutOptions::default())
        .unwrap();
    assert_eq!(a.bytes, b.bytes);
}

fn refused(bytes: &[u8]) -> ImageError {
    match u2netp().cut(
        bytes,
        &CutOptions {
            format: OutputFormat::Png,
            ..Default::default()
        },
    ) {
        Err(EngineError::Image(e)) => e,
        Err(e) => panic!("expected an image error, got {e}"),
        Ok(_) => panic!("expected an error, got a cutout"),
    }
}

#[test]
fn bad_inputs_get_typed_errors() {
    assert_eq!(refused(b"").code(), "empty_image");
    assert_eq!(refused(b"just some text, not an image").code(), "unsupported_format");
    let gif = encode(&DynamicImage::ImageRgb8(RgbImage::new(4, 4)), ImageFormat::Png);
    assert_eq!(
        refused(&[b"GIF89a".as_slice(), &gif[6..]].concat()).code(),
        "unsupported_format"
    );
    let png = read(images().join("chelsea.png"));
    assert_eq!(refused(&png[..png.len() / 2]).code(), "corrupt_image");
    let jpg = read(fixture("chelsea.jpg"));
    assert_eq!(refused(&jpg[..jpg.len() * 2 / 3]).code(), "corrupt_image");
    let img = chelsea();
    let mut webp = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
        .encode(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .unwrap();
    assert_eq!(refused(&webp[..webp.len() / 2]).code(), "corrupt_image");
}

#[test]
fn over_limit_images_are_refused_from_the_header() {
    // A PNG header claiming 20000x20000 (400 MP) with no pixel data behind it: refused as too
    // large before any attempt to allocate or decode.
    let mut png = Vec::new();
    png.extend_from_slice(b"\x89PNG\r\n\x1a\n");
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(b"IHDR");
    ihdr.extend_from_slice(&20000u32.to_be_bytes());
    ihdr.extend_from_slice(&20000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    for chunk in [b"IDAT", b"IEND"] {
        png.extend_from_slice(&0u32.to_be_bytes());
        png.extend_from_slice(chunk);
        png.extend_from_slice(&crc32(chunk).to_be_bytes());
    }
    match refused(&png) {
        ImageError::TooLarge { pixels, limit, .. } => assert_eq!((pixels, limit), (400_000_000, 50_000_000)),
        e => panic!("expected TooLarge, got {e}"),
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Under a memory bound that holds one photo's estimate (10 bytes a pixel for an 8-bit RGB
/// input to PNG, 17 to WebP) but not two, concurrent cutouts take turns and each comes out as it
/// does unbounded; a photo whose estimate exceeds the bound is refused before it is decoded.
#[test]
fn cutouts_over_the_memory_bound_take_turns_and_one_that_cannot_fit_is_refused() {
    let mut engine = removebgd::engine::Engine::load(
        &mirror().join("u2netp.onnx"),
        Some(removebgd::engine::Pipeline::U2netp),
        removebgd::engine::Precision::Auto,
        50_000_000,
    )
    .unwrap();
    let photo = encode(&DynamicImage::ImageRgb8(chelsea()), ImageFormat::Jpeg);
    let pixels = chelsea().width() as u64 * chelsea().height() as u64;
    engine.bound_memory(pixels * 15);
    assert_eq!(engine.max_pixels(OutputFormat::Png), pixels * 3 / 2);
    assert_eq!(engine.max_pixels(OutputFormat::Webp), pixels * 15 / 17);

    // The per-pixel estimate alone: the edge refinement's working planes come on top of it.
    let plain = CutOptions {
        refine: removebgd::engine::Refine::Off,
        ..CutOptions::default()
    };
    let want = u2netp().cut(&photo, &plain).unwrap().bytes;
    let outputs: Vec<Vec<u8>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..3)
            .map(|_| s.spawn(|| engine.cut(&photo, &plain).unwrap().bytes))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    assert!(outputs.iter().all(|o| *o == want), "a bounded cutout differs");
    assert_eq!(engine.image_memory_reserved(), 0, "every reservation was returned");
    // Three at once where one fits: the others waited, and the bound was never exceeded.
    let (waits, peak) = engine.image_memory_waits_and_peak();
    assert!(waits >= 1, "no cutout waited for room");
    assert!(peak <= pixels * 15 && peak > 0, "{peak} reserved at once, bound {}", pixels * 15);

    // With the refinement (the default) the same photo needs its working planes too (128
    // bytes a working pixel, and the photo again), which this bound cannot hold.
    match engine.cut(&photo, &CutOptions::default()) {
        Err(EngineError::Image(e @ ImageError::OverMemory { .. })) => assert_eq!(e.code(), "image_too_large"),
        other => panic!("expected the refinement's memory to be counted, got {:?}", other.map(|c| c.bytes.len())),
    }
    let webp = CutOptions {
        format: OutputFormat::Webp,
        ..plain.clone()
    };
    match engine.cut(&photo, &webp) {
        Err(EngineError::Image(e @ ImageError::OverMemory { .. })) => {
            assert_eq!(e.code(), "image_too_large");
            let ImageError::OverMemory { pixels: p, limit, .. } = e else {
                unreachable!()
            };
            assert_eq!((p, limit), (pixels, pixels * 15 / 17));
        }
        other => panic!("expected OverMemory, got {:?}", other.map(|c| c.width)),
    }
    assert_eq!(engine.image_memory_reserved(), 0);
}
