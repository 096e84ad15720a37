//! Image header reading and decoding (JPEG, PNG, WebP, with EXIF orientation), as every upload,
//! base64 body and fetched URL goes through them.
//!
//! Properties: `header` and `decode` agree (same refusal, or a picture of the header's size,
//! turned upright); nothing over the pixel limit is decoded; and the upright picture is exactly
//! what the `image` crate's own decoder and `apply_orientation` give (the daemon rotates with its
//! own tiled copy, `image_io::orient`).
#![no_main]

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader};
use libfuzzer_sys::fuzz_target;
use removebgd::engine::image_io::{Picture, decode, header};

/// Small, so that a decode stays fast (4 MP).
const MAX_PIXELS: u64 = 4_000_000;

/// The same bytes through the `image` crate alone: orientation and the upright picture.
fn reference(data: &[u8]) -> (Orientation, DynamicImage) {
    let format = image::guess_format(data).expect("decode recognised the format");
    let mut decoder = ImageReader::with_format(Cursor::new(data), format)
        .into_decoder()
        .expect("decode read these headers");
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).expect("decode decoded these pixels");
    img.apply_orientation(orientation);
    (orientation, img)
}

fn check_picture(data: &[u8], head: removebgd::engine::image_io::Header, pic: &Picture) {
    let (w, h) = (pic.width(), pic.height());
    assert!(head.pixels() > 0 && head.pixels() <= MAX_PIXELS, "{head:?}");
    assert_eq!(pic.rgb.as_raw().len(), w as usize * h as usize * 3);
    let (orientation, upright) = reference(data);
    let turned = !matches!(
        orientation,
        Orientation::NoTransforms | Orientation::FlipHorizontal | Orientation::FlipVertical | Orientation::Rotate180
    );
    let want = if turned {
        (head.height, head.width)
    } else {
        (head.width, head.height)
    };
    assert_eq!(
        (w, h),
        want,
        "{orientation:?} of a {}x{} image",
        head.width,
        head.height
    );
    assert_eq!((upright.width(), upright.height()), (w, h));
    assert!(
        pic.rgb.as_raw() == upright.to_rgb8().as_raw(),
        "RGB differs from image's ({orientation:?})"
    );
    match &pic.alpha {
        Some(a) => {
            assert!(head.color.has_alpha(), "alpha from an opaque layout {:?}", head.color);
            assert_eq!(a.dimensions(), (w, h));
            assert!(a.as_raw().iter().any(|&v| v != 255), "an all-opaque alpha is dropped");
            let want: Vec<u8> = upright.to_rgba8().as_raw().chunks_exact(4).map(|p| p[3]).collect();
            assert!(a.as_raw() == &want, "alpha differs from image's ({orientation:?})");
        }
        None if head.color.has_alpha() => {
            assert!(
                upright.to_rgba8().as_raw().chunks_exact(4).all(|p| p[3] == 255),
                "transparency dropped"
            );
        }
        None => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let head = header(data, MAX_PIXELS);
    let pic = decode(data, MAX_PIXELS);
    match (head, pic) {
        (Ok(head), Ok(pic)) => check_picture(data, head, &pic),
        (Err(e), Ok(_)) => panic!("header refused ({e}) what decode accepted"),
        (Err(a), Err(b)) => assert_eq!(a.code(), b.code(), "header: {a}; decode: {b}"),
        // Headers fine, pixel data not: only a corrupt (or unsupported) body may fail now.
        (Ok(head), Err(e)) => {
            assert!(head.pixels() <= MAX_PIXELS);
            assert!(matches!(e.code(), "corrupt_image" | "unsupported_format"), "{e}");
        }
    }
});
