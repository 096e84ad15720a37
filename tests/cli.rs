//! The `removebgd` binary end to end: folders, file/folder output rules, failures that write
//! nothing, exit codes, and model provisioning from a mirror.

mod common;
use common::*;

use std::path::Path;

fn cut_cmd(models: &Path) -> std::process::Command {
    cut_model(models, "u2netp")
}

/// `removebgd cut --model MODEL`, installing into `models` from the mirror.
fn cut_model(models: &Path, model: &str) -> std::process::Command {
    let mut c = bin();
    c.arg("cut")
        .arg("--model")
        .arg(model)
        .arg("--models-dir")
        .arg(models)
        .arg("--mirror")
        .arg(mirror());
    c
}

#[test]
fn a_folder_with_a_bad_file_writes_the_good_ones_and_fails() {
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::copy(images().join("rocket.jpg"), input.join("rocket.jpg")).unwrap();
    std::fs::copy(images().join("coffee.png"), input.join("coffee.png")).unwrap();
    let png = read(images().join("chelsea.png"));
    std::fs::write(input.join("truncated.png"), &png[..png.len() / 3]).unwrap();
    std::fs::write(input.join("empty.jpg"), b"").unwrap();
    std::fs::write(input.join("notes.webp"), b"not an image at all").unwrap();
    let out = work.path().join("out");
    let o = cut_cmd(&work.path().join("models"))
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .arg("--format")
        .arg("webp")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(listing(&out), vec!["coffee.webp", "rocket.webp"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("truncated.png") && err.contains("corrupt"), "{err}");
    assert!(err.contains("2 written, 3 failed"), "{err}");
}

#[test]
fn one_input_to_a_file_name_writes_that_file() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("cat.webp");
    let o = cut_cmd(&work.path().join("models"))
        .arg(images().join("chelsea.png"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&out).unwrap();
    assert!(img.color().has_alpha());
    assert_eq!((img.width(), img.height()), (451, 300));
    assert_eq!(listing(work.path()), vec!["cat.webp", "models"]);
}

#[test]
fn a_refused_single_input_writes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let bad = work.path().join("bad.jpg");
    let jpg = read(images().join("rocket.jpg"));
    std::fs::write(&bad, &jpg[..jpg.len() / 2]).unwrap();
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let o = cut_cmd(&work.path().join("models"))
        .arg(&bad)
        .arg("-o")
        .arg(out.join("x.png"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(listing(&out).is_empty(), "left behind: {:?}", listing(&out));
    let o = cut_cmd(&work.path().join("models"))
        .arg(images().join("rocket.jpg"))
        .arg("-o")
        .arg(out.join("x.png"))
        .arg("--max-pixels")
        .arg("1000")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("more than the limit of 1000"));
    assert!(listing(&out).is_empty());
}

/// A table named by `REMOVEBGD_INT8_TABLE` that cannot be read or parsed stops the run with
/// the variable named: it never falls back to the embedded table and measures something else.
#[test]
fn a_bad_int8_table_override_is_an_error() {
    let work = tempfile::tempdir().unwrap();
    let garbled = work.path().join("garbled.toml");
    std::fs::write(&garbled, "sha256 = [not toml").unwrap();
    for table in [work.path().join("missing.toml"), garbled] {
        let out = work.path().join("out.png");
        let o = cut_cmd(&work.path().join("models"))
            .env("REMOVEBGD_INT8_TABLE", &table)
            .arg("--precision")
            .arg("int8")
            .arg(images().join("rocket.jpg"))
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("REMOVEBGD_INT8_TABLE"), "{stderr}");
        assert!(!out.exists());
    }
}

#[test]
fn models_fetch_from_a_mirror_verifies_and_rejects_corruption() {
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    let o = bin()
        .args(["models", "fetch", "u2netp", "--mirror"])
        .arg(mirror())
        .arg("--models-dir")
        .arg(&models)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(listing(&models), vec!["u2netp.onnx"]);
    assert_eq!(read(models.join("u2netp.onnx")), read(mirror().join("u2netp.onnx")));

    let bad_mirror = work.path().join("bad-mirror");
    std::fs::create_dir(&bad_mirror).unwrap();
    let mut bytes = read(mirror().join("u2netp.onnx"));
    bytes[1000] ^= 0x40;
    std::fs::write(bad_mirror.join("u2netp.onnx"), bytes).unwrap();
    let fresh = work.path().join("fresh");
    let o = bin()
        .args(["models", "fetch", "u2netp", "--mirror"])
        .arg(&bad_mirror)
        .arg("--models-dir")
        .arg(&fresh)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(err.contains("sha256") || err.contains("checksum"), "{err}");
    assert!(listing(&fresh).is_empty(), "left behind: {:?}", listing(&fresh));
}

/// A board whose configuration names the retired `isnet-int8` keeps working: `cut` runs `isnet`
/// (int8 by default) and says so, while `models fetch isnet-int8` refuses with what replaced it.
#[test]
fn a_retired_model_name_runs_its_replacement() {
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    let out = work.path().join("mask.png");
    let o = cut_model(&models, "isnet-int8")
        .args(["--mask-only", "-o"])
        .arg(&out)
        .arg(images().join("coffee.png"))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains(r#"model "isnet-int8" is retired; running "isnet" instead"#),
        "{log}"
    );
    let isnet = work.path().join("isnet.png");
    let o = cut_model(&models, "isnet")
        .args(["--mask-only", "-o"])
        .arg(&isnet)
        .arg(images().join("coffee.png"))
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(read(&out), read(&isnet), "the same mask as isnet's");
    assert!(models.join("isnet-medium.onnx").is_file());
    assert!(!models.join("isnet-small.onnx").exists());

    let o = bin()
        .args(["models", "fetch", "isnet-int8", "--models-dir"])
        .arg(&models)
        .arg("--mirror")
        .arg(mirror())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains(r#"model "isnet-int8" is retired: use "isnet""#));
}

/// The API's extensions on the command line: crop with a margin, JPEG on a background photo,
/// the mask alone, and `auto` naming each file by the format it chose.
#[test]
fn cut_crops_composites_onto_a_photo_and_names_auto_outputs() {
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    let photo = fixture("chelsea.jpg");
    let bg = work.path().join("bg.png");
    image::RgbImage::from_pixel(40, 30, image::Rgb([0, 0, 255])).save(&bg).unwrap();
    let run = |args: &[&str], out: &std::path::Path| {
        let o = cut_cmd(&models).arg(&photo).arg("-o").arg(out).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    let plain = work.path().join("plain.png");
    run(&["--mask-only"], &plain);
    let mask = image::open(&plain).unwrap().into_luma8();
    let (w, h) = mask.dimensions();
    let on = |x: u32, y: u32| mask.get_pixel(x, y)[0] >= 16;
    let cols: Vec<u32> = (0..w).filter(|&x| (0..h).any(|y| on(x, y))).collect();
    let rows: Vec<u32> = (0..h).filter(|&y| (0..w).any(|x| on(x, y))).collect();
    let (bw, bh) = (cols.last().unwrap() - cols[0] + 1, rows.last().unwrap() - rows[0] + 1);

    let cropped = work.path().join("cropped.jpg");
    run(&["--crop", "6px", "--bg-image", bg.to_str().unwrap()], &cropped);
    let img = image::open(&cropped).unwrap().into_rgb8();
    assert_eq!(img.dimensions(), (bw + 12, bh + 12));
    let corner = img.get_pixel(0, 0).0;
    assert!(corner[2] > 220 && corner[0] < 40, "the photo shows in the margin: {corner:?}");

    // auto: transparent, so PNG, named by what it wrote.
    let dir = work.path().join("auto");
    run(&["--format", "auto"], &dir);
    assert_eq!(listing(&dir), vec!["chelsea.png"]);
    let dir = work.path().join("auto-on-colour");
    run(&["--format", "auto", "--bg-color", "white"], &dir);
    assert_eq!(listing(&dir), vec!["chelsea.jpg"]);
    // Two backgrounds at once are refused before any work.
    let o = cut_cmd(&models)
        .arg(&photo)
        .arg("-o")
        .arg(work.path().join("x.png"))
        .args(["--bg-color", "red", "--bg-gradient", "#fff, #000"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}
