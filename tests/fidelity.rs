//! Fidelity against the onnxruntime reference masks: `removebgd cut` on every fidelity
//! photo, with the real models, must land within 1/255 mean absolute difference.

mod common;
use common::*;

fn fidelity(model: &str, reference_name: &str) {
    fidelity_at(model, reference_name, "f32", 1.0, 1.0);
}

/// `removebgd cut --precision PRECISION` on every fidelity photo: the mean |diff| from the
/// reference within `bound`, and at most `flipped`% of the pixels off by more than 32 levels.
fn fidelity_at(model: &str, reference_name: &str, precision: &str, bound: f64, flipped: f64) {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let status = bin()
        .args(["cut", "--model", model, "--precision", precision, "--mask-only", "--refine", "off", "-o"])
        .arg(&out)
        .arg(images())
        .arg("--models-dir")
        .arg(work.path().join("models"))
        .arg("--mirror")
        .arg(mirror())
        .status()
        .unwrap();
    assert!(status.success(), "cut failed: {status}");
    let mut worst = 0.0f64;
    let mut compared = 0;
    for entry in std::fs::read_dir(images()).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let got = image::open(out.join(format!("{stem}.png"))).unwrap().into_luma8();
        let want = image::open(reference(&stem, reference_name))
            .unwrap()
            .into_luma8();
        assert_eq!(got.dimensions(), want.dimensions(), "{stem}: size");
        let d = mad(got.as_raw(), want.as_raw());
        let far = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| (**a as i32 - **b as i32).abs() > 32)
            .count() as f64
            * 100.0
            / got.as_raw().len() as f64;
        println!("fidelity {model} {precision} {stem}: mean |diff| = {d:.3}/255, {far:.3}% off by more than 32");
        assert!(d <= bound, "{model} {precision} {stem}: mean abs diff {d:.3} > {bound}/255");
        assert!(far <= flipped, "{model} {precision} {stem}: {far:.3}% of pixels off by more than 32 levels");
        worst = worst.max(d);
        compared += 1;
    }
    // Every reference mask of this model was compared: an empty or partial folder fails.
    let references = std::fs::read_dir(fixture("reference"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(&format!(".{reference_name}.png")))
        .count();
    assert!(compared >= 5 && compared == references, "{compared} photos compared, {references} references");
    println!("fidelity {model} {precision}: worst {worst:.3}/255");
}

#[test]
fn u2netp_matches_the_reference_masks() {
    fidelity("u2netp", "u2netp");
}

#[test]
fn isnet_matches_the_reference_masks() {
    fidelity("isnet", "isnet-medium");
}

#[test]
fn isnet_int8_matches_the_reference_masks() {
    fidelity_at("isnet", "isnet-medium", "int8", 1.0, 0.5);
}
