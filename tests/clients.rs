//! remove.bg's own clients from the registries, unchanged except for their base URL, against a
//! real daemon on loopback: npm `remove.bg` 1.3.0 under Node, PyPI `removebg` 0.4 under Python.
//! They are installed once (pinned: tests/clients/package-lock.json, and `removebg==0.4`) into
//! the build's temporary directory with npm and pip, the same tools that fetch the models.

mod common;
mod daemon;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use common::*;
use daemon::*;
use serde_json::Value;

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

fn install_root() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("clients")
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (the client tests need Node.js with npm, and Python 3 with pip)"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `node_modules` with npm `remove.bg` as locked, installed once per lock file.
fn node_modules() -> PathBuf {
    let dir = install_root().join("node");
    let lock = std::fs::read(clients_dir().join("package-lock.json")).unwrap();
    if std::fs::read(dir.join("package-lock.json")).ok().as_ref() != Some(&lock)
        || !dir.join("node_modules/remove.bg").is_dir()
    {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(clients_dir().join("package.json"), dir.join("package.json")).unwrap();
        std::fs::write(dir.join("package-lock.json"), &lock).unwrap();
        run(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
                .current_dir(&dir),
            "npm ci (tests/clients)",
        );
    }
    dir.join("node_modules")
}

/// A directory holding PyPI `removebg` 0.4 and its dependencies, installed once.
fn python_path() -> PathBuf {
    let dir = install_root().join("python");
    if !dir.join("removebg/removebg.py").is_file() {
        let tmp = install_root().join("python.partial");
        let _ = std::fs::remove_dir_all(&tmp);
        run(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
                .arg(&tmp)
                .arg("removebg==0.4")
                .env("PIP_BREAK_SYSTEM_PACKAGES", "1"),
            "pip install removebg==0.4",
        );
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).unwrap();
    }
    dir
}

/// The client's report lines, by call name.
fn reports(stdout: &[u8]) -> std::collections::HashMap<String, Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| (v["name"].as_str().unwrap().to_owned(), v))
        .collect()
}

fn decode(b64: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap()
}

/// A pixel the cutout leaves fully transparent (by the engine's own cutout of the photo).
fn background_pixel(photo: &[u8]) -> usize {
    let (_, _, alpha) = alpha_of(&u2netp().cut(photo, &Default::default()).unwrap().bytes);
    alpha.iter().position(|&a| a == 0).unwrap()
}

/// A daemon with a key and an image server, the photo, and a folder for the client's files.
struct Setup {
    d: Daemon,
    photo: Vec<u8>,
    out: tempfile::TempDir,
    args: Vec<std::ffi::OsString>,
    env: Vec<(&'static str, String)>,
}

async fn setup() -> Setup {
    let d = Daemon::start(10, &["--fetch-allow", "127.0.0.0/8"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let server = image_server().await;
    let out = tempfile::tempdir().unwrap();
    let photo_path = fixture("chelsea.jpg");
    let args = vec![
        photo_path.clone().into_os_string(),
        format!("http://{server}/img/chelsea.jpg").into(),
        out.path().into(),
    ];
    let env = vec![
        ("REMOVEBG_BASE", d.url("").trim_end_matches('/').to_owned()),
        ("REMOVEBG_KEY", key),
        ("NO_PROXY", "127.0.0.1,localhost".to_owned()),
    ];
    Setup {
        photo: read(&photo_path),
        d,
        out,
        args,
        env,
    }
}

impl Setup {
    /// Runs a client script (its arguments: photo, photo URL, output folder) and reads its reports.
    fn run(&self, cmd: &mut Command) -> std::collections::HashMap<String, Value> {
        let o = cmd.args(&self.args).envs(self.env.iter().map(|(k, v)| (k, v))).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r = reports(&o.stdout);
        assert_eq!(r.len(), 4, "every call settled: {}", String::from_utf8_lossy(&o.stdout));
        r
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_npm_remove_bg_client_works_unchanged() {
    let modules = node_modules();
    let s = setup().await;
    let (d, photo, out) = (&s.d, &s.photo, &s.out);
    let r = s.run(
        Command::new("node")
            .arg("-r")
            .arg(clients_dir().join("rebase.js"))
            .arg(clients_dir().join("removebg_node.js"))
            .env("NODE_PATH", &modules),
    );

    // Multipart upload: a PNG cutout in JSON mode, the headers the client reads, the file it wrote.
    let file = &r["file"];
    assert_eq!(file["ok"], true, "{file}");
    let res = &file["result"];
    let png = decode(&res["base64img"]);
    let (w, h, alpha) = alpha_of(&png);
    assert_eq!((w, h), (451, 300));
    let direct = u2netp().cut(&photo, &Default::default()).unwrap();
    assert!(mad(&alpha, &alpha_of(&direct.bytes).2) < 0.01);
    for (field, want) in [("creditsCharged", "1"), ("detectedType", "other"), ("resultWidth", "451"), ("resultHeight", "300")] {
        assert_eq!(res[field], want, "{field}");
    }
    assert!(res["rateLimit"].as_str().unwrap().parse::<u32>().unwrap() > 0);
    assert!(res["rateLimitRemaining"].as_str().unwrap().parse::<u32>().is_ok());
    assert!(res["rateLimitReset"].as_str().unwrap().parse::<u64>().is_ok());
    assert_eq!(std::fs::read(out.path().join("node-file.png")).unwrap(), png);

    // JSON body with a URL on a colour: format auto gives an opaque JPEG with the colour behind.
    let url = &r["url"];
    assert_eq!(url["ok"], true, "{url}");
    let jpg = decode(&url["result"]["base64img"]);
    assert_eq!(image::guess_format(&jpg).unwrap(), image::ImageFormat::Jpeg);
    let rgb = image::load_from_memory(&jpg).unwrap().into_rgb8();
    let i = background_pixel(&photo);
    let p = &rgb.as_raw()[i * 3..i * 3 + 3];
    assert!(p[0] < 30 && p[1] > 225 && p[2] < 30, "green behind the subject: {p:?}");

    // JSON body with base64, the mask alone, cropped with a 10 px margin.
    let b = &r["base64"];
    assert_eq!(b["ok"], true, "{b}");
    let mask = image::load_from_memory(&decode(&b["result"]["base64img"])).unwrap();
    assert!(matches!(mask.color(), image::ColorType::L8));
    let [_, _, bw, bh] = subject_box(&alpha, w);
    assert_eq!((mask.width(), mask.height()), (bw + 20, bh + 20));

    // A wrong key: the promise rejects with remove.bg's errors array.
    let bad = &r["bad_key"];
    assert_eq!(bad["ok"], false);
    assert_eq!(bad["errors"][0]["code"], "invalid_api_key", "{bad}");
    assert!(bad["errors"][0]["title"].is_string() && bad["errors"][0]["detail"].is_string());

    assert_eq!(d.credits("shop"), (3, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pypi_removebg_client_works_unchanged() {
    let pythonpath = python_path();
    let s = setup().await;
    let (d, photo, out) = (&s.d, &s.photo, &s.out);
    let r = s.run(
        Command::new("python3")
            .arg(clients_dir().join("removebg_py.py"))
            .env("PYTHONPATH", &pythonpath),
    );
    for call in ["file", "url", "base64"] {
        assert_eq!(r[call]["ok"], true, "{}", r[call]);
    }

    // Multipart upload with the client's default size ("regular", remove.bg's preview): the
    // binary PNG, written next to the input.
    let png = std::fs::read(out.path().join("py-input.jpg_no_bg.png")).unwrap();
    let (w, h, alpha) = alpha_of(&png);
    assert_eq!((w, h), (451, 300));
    let direct = u2netp().cut(&photo, &Default::default()).unwrap();
    assert!(mad(&alpha, &alpha_of(&direct.bytes).2) < 0.01);
    // Form-urlencoded URL, full size, on "red": auto gives a JPEG with red behind the subject.
    let jpg = std::fs::read(out.path().join("py-url.img")).unwrap();
    assert_eq!(image::guess_format(&jpg).unwrap(), image::ImageFormat::Jpeg);
    let rgb = image::load_from_memory(&jpg).unwrap().into_rgb8();
    let i = background_pixel(&photo);
    let p = &rgb.as_raw()[i * 3..i * 3 + 3];
    assert!(p[0] > 225 && p[1] < 30 && p[2] < 30, "red behind the subject: {p:?}");
    // Form-urlencoded base64: the same cutout as the upload.
    assert_eq!(alpha_of(&std::fs::read(out.path().join("py-b64.img")).unwrap()).2, alpha);
    // A wrong key: the client raises on the 403.
    assert_eq!(r["bad_key"]["ok"], false);
    assert_eq!(r["bad_key"]["status"], 403, "{}", r["bad_key"]);

    assert_eq!(d.credits("shop"), (3, 0));
}
