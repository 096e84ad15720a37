//! Shared test helpers: where the test photos and the models are, a loaded engine per
//! model, and the built CLI binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use removebgd::engine::{Engine, Pipeline, Precision};

/// A folder of model files (u2netp and isnet): the checkout's `models/`, filled once from
/// `$REMOVEBGD_MODEL_MIRROR` when it is set, else from the registries.
pub fn mirror() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| removebgd::provision::checkout_models(&["u2netp", "isnet"]).expect("test models"))
        .clone()
}

/// The fidelity photos.
pub fn images() -> PathBuf {
    fixture("images")
}

/// The onnxruntime reference mask of fidelity photo `stem` for `model` (file name part).
pub fn reference(stem: &str, model: &str) -> PathBuf {
    fixture("reference").join(format!("{stem}.{model}.png"))
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn read(p: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

/// The small real model, loaded once per test binary.
pub fn u2netp() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        removebgd::engine::use_threads(2);
        Engine::load(
            &mirror().join("u2netp.onnx"),
            Some(Pipeline::U2netp),
            Precision::Auto,
            50_000_000,
        )
        .expect("load u2netp")
    })
}

/// The CLI binary with a clean environment of its own settings.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_removebgd"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("REMOVEBGD_") {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "warn");
    c
}

/// Files in `dir`, names sorted (hidden temp files included, to catch leftovers).
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Mean absolute difference of two equally sized 8-bit buffers, in 8-bit levels.
pub fn mad(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "sizes differ");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as i32 - y as i32).unsigned_abs() as u64)
        .sum::<u64>() as f64
        / a.len() as f64
}

/// The alpha channel of an encoded RGBA result.
pub fn alpha_of(encoded: &[u8]) -> (u32, u32, Vec<u8>) {
    let img = image::load_from_memory(encoded).expect("result decodes").into_rgba8();
    let (w, h) = img.dimensions();
    (w, h, img.pixels().map(|p| p[3]).collect())
}

/// The bounding box of alpha >= 16 (the documented foreground threshold): left, top, width,
/// height.
pub fn subject_box(alpha: &[u8], w: u32) -> [u32; 4] {
    let w = w as usize;
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for (i, &a) in alpha.iter().enumerate() {
        if a >= 16 {
            let (x, y) = (i % w, i / w);
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        }
    }
    assert!(x0 != usize::MAX, "no subject");
    [x0 as u32, y0 as u32, (x1 - x0 + 1) as u32, (y1 - y0 + 1) as u32]
}

/// A JPEG of random pixels: its cutout compresses badly, so the PNG is large.
pub fn noise_jpeg(w: u32, h: u32) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let img = image::RgbImage::from_fn(w, h, |_, _| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&img)
        .unwrap();
    out
}
