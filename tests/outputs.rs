//! Output options with the real model: background colour, preview size, WebP with alpha.

mod common;
use common::*;

use removebgd::engine::{Background, BgColor, CutOptions, OutputFormat, OutputSize};

fn rocket() -> Vec<u8> {
    read(images().join("rocket.jpg"))
}

#[test]
fn opaque_bg_color_makes_every_pixel_opaque() {
    let opts = CutOptions {
        background: Some(Background::Color("#00ff00".parse::<BgColor>().unwrap())),
        ..Default::default()
    };
    let c = u2netp().cut(&rocket(), &opts).unwrap();
    let img = image::load_from_memory(&c.bytes).unwrap().into_rgba8();
    assert!(img.pixels().all(|p| p[3] == 255));
    // Background shows through where the subject is not: some pure green pixels exist.
    assert!(img.pixels().any(|p| p.0 == [0, 255, 0, 255]));
    let plain = alpha_of(&u2netp().cut(&rocket(), &CutOptions::default()).unwrap().bytes).2;
    assert!(
        plain.iter().any(|&a| a < 255),
        "without bg_color the background is transparent"
    );
}

#[test]
fn preview_is_at_most_a_quarter_megapixel_with_the_same_aspect() {
    let full = u2netp().cut(&rocket(), &CutOptions::default()).unwrap();
    let prev = u2netp()
        .cut(
            &rocket(),
            &CutOptions {
                size: OutputSize::Preview,
                ..Default::default()
            },
        )
        .unwrap();
    let (pw, ph, _) = alpha_of(&prev.bytes);
    assert_eq!((pw, ph), (prev.width, prev.height));
    assert!((pw as u64) * (ph as u64) <= 250_000, "{pw}x{ph}");
    assert!(
        full.width as u64 * full.height as u64 > 250_000,
        "the test image must be larger than a preview"
    );
    let (a, b) = (full.width as f64 / full.height as f64, pw as f64 / ph as f64);
    assert!((a - b).abs() / a < 0.01, "aspect {a} became {b}");
}

#[test]
fn webp_output_is_lossless_with_alpha() {
    // The PNG is composed band by band inside the parallel writer, the WebP from one composed
    // frame: the same pixels for every compositing case (rocket.jpg's PNG has three bands).
    for bg in [None, Some("#00ff00"), Some("#ff000080")] {
        let opts = |format| CutOptions {
            format,
            background: bg.map(|c| Background::Color(c.parse::<BgColor>().unwrap())),
            ..Default::default()
        };
        let png = u2netp().cut(&rocket(), &opts(OutputFormat::Png)).unwrap();
        let webp = u2netp().cut(&rocket(), &opts(OutputFormat::Webp)).unwrap();
        assert_eq!(&webp.bytes[..4], b"RIFF");
        let w = image::load_from_memory(&webp.bytes).unwrap();
        assert!(w.color().has_alpha());
        assert_eq!(
            w.into_rgba8().into_raw(),
            image::load_from_memory(&png.bytes).unwrap().into_rgba8().into_raw(),
            "bg_color {bg:?}"
        );
    }
}
