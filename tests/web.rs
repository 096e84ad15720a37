//! The operator's page (`GET /`) in a real Chromium, driven by npm `playwright-core` from
//! tests/web/page.mjs against a live daemon: the key from `/#key=`, an upload and its download,
//! a coloured background, the API's 401 and 402 messages, a 3-photo batch with its polls and
//! ZIP, screenshots at 1024x600 and 390x844 (in target/web-screenshots), CSP and CORS.
//!
//! Needs node, npm and Chromium (`CHROMIUM`, default /usr/bin/chromium). Without them the test
//! says so and passes, except under CI (`CI` set), where it fails.

mod common;
mod daemon;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use daemon::*;

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into())
}

fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `npm ci` of tests/web into the target's temporary directory, once per lock file.
fn install_playwright() -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web");
    std::fs::create_dir_all(&dir).unwrap();
    let lock = read(src.join("package-lock.json"));
    let stamp = dir.join("node_modules/.removebgd-lock");
    if std::fs::read(&stamp).ok().as_deref() == Some(&lock[..]) {
        return dir;
    }
    for f in ["package.json", "package-lock.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let o = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .output()
        .expect("npm");
    assert!(
        o.status.success(),
        "npm ci failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::write(&stamp, &lock).unwrap();
    dir
}

fn rgba(path: &Path) -> image::RgbaImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_rgba8()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_page_in_chromium() {
    let missing: Vec<&str> = [
        (!chromium().is_file()).then_some("chromium"),
        (!runs("node")).then_some("node"),
        (!runs("npm")).then_some("npm"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !missing.is_empty() {
        let what = format!(
            "the operator's page was not tested in a browser: {} missing",
            missing.join(", ")
        );
        assert!(std::env::var_os("CI").is_none(), "{what} (CI must have them)");
        removebgd::test_note(&what);
        return;
    }
    let modules = tokio::task::spawn_blocking(install_playwright).await.unwrap();

    let d = Daemon::start(20, &[]).await;
    let key = d.key("shop", ALL_SCOPES);
    d.admin(&["accounts", "create", "broke", "--credits", "0"]);
    let broke = d.key("broke", ALL_SCOPES);

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/web-screenshots");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    // The batch's photos: the fixtures enlarged to 12 MP, so that each takes long enough for the
    // page to poll the batch several times (and be seen keeping 2 s between polls).
    let big = tempfile::tempdir().unwrap();
    let batch: Vec<String> = ["chelsea.jpg", "images/astronaut.png", "images/rocket.jpg"]
        .iter()
        .map(|name| {
            let img = image::open(fixture(name)).unwrap().into_rgb8();
            let img = image::imageops::resize(&img, 4000, 3000, image::imageops::FilterType::Triangle);
            let path = big.path().join(Path::new(name).file_name().unwrap());
            let mut out = std::fs::File::create(&path).unwrap();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
                .encode_image(&img)
                .unwrap();
            path.display().to_string()
        })
        .collect();

    // Four photos of noise (about 5 MB each, 20 MB in all): more than one batch submission may
    // hold, so the page must send them as two.
    let noise = noise_jpeg(2000, 1400);
    assert!((4 << 20..9 << 20).contains(&noise.len()), "noise photo of {} bytes", noise.len());
    let big_photos: Vec<String> = (0..4)
        .map(|i| {
            let path = big.path().join(format!("noise-{i}.jpg"));
            std::fs::write(&path, &noise).unwrap();
            path.display().to_string()
        })
        .collect();

    let mut cmd = Command::new("node");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web/page.mjs"))
        .env("BASE_URL", d.url(""))
        .env("KEY", &key)
        .env("BROKE_KEY", &broke)
        .env("WEB_MODULES", &modules)
        .env("CHROMIUM", chromium())
        .env("OUT_DIR", &out)
        .env("PHOTO", fixture("chelsea.jpg"))
        .env("BATCH_PHOTOS", batch.join(":"))
        .env("BIG_PHOTOS", big_photos.join(":"));
    let o = tokio::task::spawn_blocking(move || cmd.output().expect("node"))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "page.mjs failed ({}):\n{stdout}", o.status);

    // The first download: a transparent cutout, with both clear background and solid subject.
    let cut = rgba(&out.join("cutout.png"));
    assert!(cut.pixels().any(|p| p[3] == 0), "cutout has no transparent pixel");
    assert!(cut.pixels().any(|p| p[3] == 255), "cutout has no opaque pixel");
    // On red: every pixel opaque, and the background red.
    let red = rgba(&out.join("red.png"));
    assert!(
        red.pixels().all(|p| p[3] == 255),
        "red background download is not opaque"
    );
    let reds = red.pixels().filter(|p| p[0] > 230 && p[1] < 25 && p[2] < 25).count();
    assert!(
        reds * 10 > (red.width() * red.height()) as usize,
        "too few red pixels: {reds}"
    );
    // "Download all": the batch's three results, each a decodable cutout.
    let mut zip = zip::ZipArchive::new(std::fs::File::open(out.join("all.zip")).unwrap()).expect("zip");
    assert_eq!(zip.len(), 3);
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut bytes).unwrap();
        let (_, _, alpha) = alpha_of(&bytes);
        assert!(alpha.contains(&0) && alpha.contains(&255), "{}: not a cutout", f.name());
    }
    for shot in ["kiosk-1024x600.png", "phone-390x844.png"] {
        let img = rgba(&out.join(shot));
        assert!(img.width() >= 390, "{shot}: {}x{}", img.width(), img.height());
    }
    // One photo, the red one, the cropped one, the batch of three and the four in two batches;
    // the failed requests cost nothing.
    assert_eq!(d.credits("shop"), (10, 0));
    assert_eq!(d.credits("broke"), (0, 0));
}
