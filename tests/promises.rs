//! Promises the README makes that no other test held it to: a client that hangs up still gets
//! its cutout finished, stored and charged; `result_url` follows `--public-url`, else the Host
//! header; `credits_remaining` counts work in progress; the first key under systemd goes to a
//! 0600 file, once; `--log-format json` writes one JSON object per line. Real daemon, loopback.

mod common;
mod daemon;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::*;
use daemon::*;
use serde_json::{Value, json};

/// A loopback server whose one route never answers: a fetch from it keeps a job running.
async fn hanging_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/hang.jpg",
        axum::routing::get(|| async {
            tokio::time::sleep(Duration::from_secs(300)).await;
            "never"
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/hang.jpg")
}

fn job_rows(d: &Daemon) -> Vec<(String, String, Option<String>)> {
    let c = rusqlite::Connection::open(d.data().join("removebgd.db")).unwrap();
    let mut q = c.prepare("SELECT id, status, result_file FROM jobs").unwrap();
    q.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(Result::unwrap).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_still_gets_its_cutout_finished_stored_and_charged() {
    let d = Daemon::start(5, &[]).await;
    let key = d.key("shop", ALL_SCOPES);
    let body = json!({"image_base64": b64(&noise_jpeg(2400, 1800))}).to_string();
    let request = {
        let (client, url, key) = (client(), d.url("/v1/removebg/process"), key.clone());
        tokio::spawn(async move {
            client.post(url).bearer_auth(key).header("content-type", "application/json").body(body).send().await
        })
    };
    // Hang up once the image is being worked on.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !job_rows(&d).iter().any(|j| j.1 == "running") {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let jobs = job_rows(&d);
        if jobs[0].1 != "running" {
            break jobs[0].clone();
        }
        assert!(Instant::now() < deadline, "the job never ended: {jobs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job.1, "completed", "{job:?}");
    let file = job.2.expect("a result file");
    let png = std::fs::read(d.data().join("results").join(&file)).unwrap();
    assert_eq!(alpha_of(&png).0, 2400);
    assert_eq!(d.credits("shop"), (1, 0), "charged once, nothing left reserved");
    // And it can be fetched by the URL the client never saw.
    let r = d.client.get(d.url(&format!("/v1/removebg/results/{file}"))).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_url_follows_the_host_header_unless_a_public_url_is_set() {
    let input = json!({"image_base64": b64(&noise_jpeg(64, 48))}).to_string();
    let post = |d: &Daemon, key: &str, host: &str| {
        d.client
            .post(d.url("/v1/removebg/process"))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .header("host", host)
            .body(input.clone())
            .send()
    };
    let d = Daemon::start(5, &[]).await;
    let key = d.key("shop", ALL_SCOPES);
    let (s, _, v) = split(post(&d, &key, "kiosk-3.lan:8080").await.unwrap()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let url = v["result_url"].as_str().unwrap();
    assert!(url.starts_with("http://kiosk-3.lan:8080/v1/removebg/results/rbg_"), "{url}");

    let d = Daemon::start(5, &["--public-url", "https://cutouts.example.com/"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let (s, _, v) = split(post(&d, &key, "kiosk-3.lan:8080").await.unwrap()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let url = v["result_url"].as_str().unwrap();
    assert!(url.starts_with("https://cutouts.example.com/v1/removebg/results/rbg_"), "{url}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_remaining_counts_the_work_in_progress() {
    let d = Daemon::start(5, &["--fetch-allow", "127.0.0.0/8"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let url = hanging_url().await;
    let pending = {
        let (client, to, key) = (client(), d.url("/v1/removebg/process"), key.clone());
        tokio::spawn(async move {
            client
                .post(to)
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body(json!({"image_url": url}).to_string())
                .send()
                .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.credits("shop") != (0, 1) {
        assert!(Instant::now() < deadline, "the request never reserved its credit");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (s, _, v) = d.get("/v1/removebg/quota", &key).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!((v["credits_used"].as_i64(), v["credits_remaining"].as_i64()), (Some(0), Some(4)), "{v}");
    pending.abort();
}

#[test]
fn under_systemd_the_first_key_goes_to_a_0600_file_once_and_never_to_the_output() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = data.join("initial-api-key");
    let start = || {
        let mut cmd = serve_cmd(dir.path());
        // What systemd sets when stdout and stderr are the journal. spawn_serve asks for text
        // logs on stderr, so this works with or without a journal on the machine.
        cmd.env("JOURNAL_STREAM", "8:12345");
        let (mut child, _, log) = spawn_serve(cmd);
        child.kill().unwrap();
        child.wait().unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
        (out, log.lines().join("\n"))
    };
    let (out, log) = start();
    let key = std::fs::read_to_string(&file).unwrap().trim().to_owned();
    assert!(key.starts_with("xbk_live_") && key.len() == 49, "{key}");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(out.contains("initial-api-key") && !out.contains(&key), "{out}");
    assert!(!log.contains(&key[9..]), "the key is not logged");
    let store = removebgd::store::Store::open(&data.join("removebgd.db")).unwrap();
    assert!(store.find_key(&key).unwrap().is_some(), "the file holds a working key");
    drop(store);
    // The operator deletes the file, as told; a restart makes no new key.
    std::fs::remove_file(&file).unwrap();
    let (out, _) = start();
    assert!(!file.exists() && !out.contains("xbk_live_"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_writes_one_json_object_per_line_with_the_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = serve_cmd(dir.path());
    cmd.args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(err)).map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let addr = loop {
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("the daemon logs");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        lines.push(v.clone());
        if v["fields"]["message"] == "listening" {
            break v["fields"]["addr"].as_str().unwrap().to_owned();
        }
    };
    let r = client().get(format!("http://{addr}/healthz")).send().await.unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let done = loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("the request is logged");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["fields"]["message"] == "request done" {
            break v;
        }
    };
    assert_eq!(done["span"]["request_id"], id.as_str(), "{done}");
    assert_eq!(done["fields"]["status"], 200, "{done}");
    assert!(done["level"] == "INFO" && done["timestamp"].is_string(), "{done}");
    child.kill().unwrap();
    child.wait().unwrap();
}
