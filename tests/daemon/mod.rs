//! A real `removebgd serve` on a loopback port with its own data directory, the admin CLI
//! against its database, an HTTP client, and a loopback image server to fetch URLs from.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::Value;

use crate::common::*;

pub const ALL_SCOPES: &str = "removebg:images:process,removebg:quota:read,removebg:batch:write,removebg:batch:read";

pub struct Daemon {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub args: Vec<String>,
    pub client: reqwest::Client,
}

/// A plain HTTP client (reqwest here is built without a default TLS provider).
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Below the daemon's keep-alive timeout (5 s): a connection the daemon is closing for
    // idleness is never picked for the next request.
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// Starts `removebgd serve` (which must listen on port 0) and returns it with the address it
/// bound, read from its log. Its stderr keeps being drained; warnings and errors are echoed.
pub fn spawn_serve(mut cmd: std::process::Command) -> (Child, SocketAddr, Log) {
    use std::io::BufRead;
    let mut child = cmd
        .env("RUST_LOG", "info")
        .arg("--log-format")
        .arg("text")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = Log::default();
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            lines.0.lock().unwrap().push(line.clone());
            if let Some(addr) = line
                .contains(" listening ")
                .then(|| line.split("addr=").nth(1))
                .flatten()
            {
                let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
            }
            if line.contains(" WARN ") || line.contains(" ERROR ") {
                eprintln!("daemon: {line}");
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("daemon did not start listening: {:?}", child.try_wait()));
    (child, addr.parse().unwrap(), log)
}

/// Everything a daemon wrote to stderr.
#[derive(Clone, Default)]
pub struct Log(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Log {
    pub fn contains(&self, needle: &str) -> bool {
        self.0.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

impl Daemon {
    /// Creates the data directory with account `shop` (`credits`) and starts the daemon.
    pub async fn start(credits: i64, args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Daemon {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            args: args.iter().map(|s| s.to_string()).collect(),
            client: client(),
        };
        d.admin(&["accounts", "create", "shop", "--credits", &credits.to_string()]);
        d.launch().await;
        d
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn cmd(&self) -> std::process::Command {
        let mut c = serve_cmd(self.dir.path());
        c.args(&self.args);
        c
    }

    /// (Re)starts the process and waits until it answers.
    pub async fn launch(&mut self) {
        let (child, addr, _) = spawn_serve(self.cmd());
        self.child = Some(child);
        self.addr = addr;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = self.client.get(self.url("/healthz")).send().await
                && r.status() == StatusCode::OK
            {
                return;
            }
            assert!(Instant::now() < deadline, "daemon did not answer");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The /metrics page's text.
    pub async fn metrics(&self) -> String {
        let r = self.client.get(self.url("/metrics")).send().await.unwrap();
        r.text().await.unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Runs an admin command against this daemon's database; returns stdout.
    pub fn admin(&self, args: &[&str]) -> String {
        let o = bin().args(args).arg("--data-dir").arg(self.data()).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }

    /// A new key for `account` with `scopes` (comma-separated).
    pub fn key(&self, account: &str, scopes: &str) -> String {
        let out = self.admin(&["keys", "create", "--account", account, "--scopes", scopes]);
        out.lines().last().unwrap().trim().to_owned()
    }

    pub fn store(&self) -> removebgd::store::Store {
        removebgd::store::Store::open(&self.data().join("removebgd.db")).unwrap()
    }

    /// (credits_used, credits_reserved) of an account, from the database, checked against the ledger.
    pub fn credits(&self, account: &str) -> (i64, i64) {
        let s = self.store();
        let a = s.account_by_name(account).unwrap();
        assert_eq!(
            s.ledger_sums(a.id).unwrap(),
            (a.credits_used, a.credits_reserved),
            "ledger and counters disagree"
        );
        (a.credits_used, a.credits_reserved)
    }

    pub async fn post_json(
        &self,
        path: &str,
        key: &str,
        body: &Value,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let r = self
            .client
            .post(self.url(path))
            .bearer_auth(key)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        split(r).await
    }

    pub async fn get(&self, path: &str, key: &str) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let r = self.client.get(self.url(path)).bearer_auth(key).send().await.unwrap();
        split(r).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn split(r: reqwest::Response) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let status = r.status();
    let headers = r.headers().clone();
    let bytes = r.bytes().await.unwrap();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, v)
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Asserts the documented error shape and returns its code.
pub fn error_code(status: StatusCode, headers: &reqwest::header::HeaderMap, v: &Value, want: StatusCode) -> String {
    assert_eq!(status, want, "body: {v}");
    let e = &v["error"];
    assert_eq!(e["status"].as_u64(), Some(want.as_u16() as u64), "{v}");
    let id = e["request_id"].as_str().expect("request_id");
    assert_eq!(headers["x-request-id"].to_str().unwrap(), id);
    assert!(!e["message"].as_str().unwrap().is_empty());
    e["code"].as_str().unwrap().to_owned()
}

/// A loopback HTTP server with test images and misbehaving routes.
pub async fn image_server() -> SocketAddr {
    async fn image(axum::extract::Path(name): axum::extract::Path<String>) -> axum::response::Response {
        let path = if fixture(&name).is_file() {
            fixture(&name)
        } else {
            images().join(&name)
        };
        match std::fs::read(path) {
            Ok(b) => b.into_response(),
            Err(_) => StatusCode::NOT_FOUND.into_response(),
        }
    }
    // `/solid/RRGGBB.png`: a 64x48 PNG of one colour (a background photo with known pixels).
    async fn solid(axum::extract::Path(name): axum::extract::Path<String>) -> axum::response::Response {
        let hex = name.trim_end_matches(".png");
        let Ok(v) = u32::from_str_radix(hex, 16) else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let img = image::RgbImage::from_pixel(64, 48, image::Rgb([(v >> 16) as u8, (v >> 8) as u8, v as u8]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        ([(header::CONTENT_TYPE, "image/png")], out.into_inner()).into_response()
    }
    let app = Router::new()
        .route("/img/{name}", get(image))
        .route("/solid/{name}", get(solid))
        .route(
            "/page.html",
            get(|| async { ([(header::CONTENT_TYPE, "text/html")], "<html>not an image</html>") }),
        )
        .route(
            "/slow.jpg",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(700)).await;
                read(fixture("chelsea.jpg"))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// `removebgd serve` on a free loopback port with u2netp on one thread, its data and models
/// under `dir` (`dir/data`, `dir/models`), the model copied from the shared mirror.
pub fn serve_cmd(dir: &Path) -> std::process::Command {
    let mut c = bin();
    c.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--model",
        "u2netp",
        "--threads",
        "1",
    ])
    .arg("--data-dir")
    .arg(dir.join("data"))
    .arg("--models-dir")
    .arg(dir.join("models"))
    .arg("--model-mirror")
    .arg(mirror());
    c
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}

/// An upload held open: the head and the first bytes of the body are sent, the rest when
/// `finish` is called. While it is held, its request is inside the daemon.
pub struct HeldUpload {
    stream: tokio::net::TcpStream,
    rest: Vec<u8>,
}

impl HeldUpload {
    pub async fn start(d: &Daemon, key: &str, body: &[u8]) -> HeldUpload {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(d.addr).await.unwrap();
        let head = format!(
            "POST /v1/removebg/process HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body[..10]).await.unwrap();
        HeldUpload {
            stream,
            rest: body[10..].to_vec(),
        }
    }

    /// Sends the rest and reads the answer's status line.
    pub async fn finish(mut self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(&self.rest).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let k = self.stream.read(&mut buf).await.unwrap();
            assert!(k > 0, "closed before answering");
            answer.extend_from_slice(&buf[..k]);
        }
        String::from_utf8_lossy(&answer).lines().next().unwrap().to_owned()
    }
}
