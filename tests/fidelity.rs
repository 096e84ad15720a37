//! Fidelity against the onnxruntime reference masks: `removebgd cut` on every fidelity
//! photo, with the real models, must land within 1/255 mean absolute difference.

mod common;
use common::*;

fn fidelity(model: &str, reference_name: &str) {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let status = bin()
        .args(["cut", "--model", model, "--mask-only", "-o"])
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
    for entry in std::fs::read_dir(images()).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let got = image::open(out.join(format!("{stem}.png"))).unwrap().into_luma8();
        let want = image::open(reference(&stem, reference_name))
            .unwrap()
            .into_luma8();
        assert_eq!(got.dimensions(), want.dimensions(), "{stem}: size");
        let d = mad(got.as_raw(), want.as_raw());
        println!("fidelity {model} {stem}: mean |diff| = {d:.3}/255");
        assert!(d <= 1.0, "{model} {stem}: mean abs diff {d:.3} > 1/255");
        worst = worst.max(d);
    }
    println!("fidelity {model}: worst {worst:.3}/255");
}

#[test]
fn u2netp_matches_the_reference_masks() {
    fidelity("u2netp", "u2netp");
}

#[test]
fn isnet_matches_the_reference_masks() {
    fidelity("isnet", "isnet-medium");
}
