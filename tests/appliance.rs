//! The daemon as an appliance: systemd notifications, graceful SIGTERM, /readyz, /metrics, the
//! results-directory cap and the merged configuration. Real daemon, real model (u2netp), real
//! SQLite file, loopback only.

mod common;
mod daemon;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use common::*;
use daemon::*;

fn sigterm(d: &Daemon) {
    let pid = d.child.as_ref().expect("running").id() as i32;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
}

/// Waits for the child to exit; panics after `limit`.
fn wait_exit(d: &mut Daemon, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    let child = d.child.as_mut().expect("running");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            d.child = None;
            return status;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Parses Prometheus text exposition strictly enough to catch malformed output: every sample
/// belongs to a family declared by `# TYPE` before it, names carry the `removebgd_` prefix,
/// values are numbers, histogram buckets are cumulative and end with `+Inf` == `_count`.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let mut last_bucket: Option<(String, f64)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, value) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap_or(""));
            match kind {
                "HELP" => assert!(!value.is_empty(), "empty HELP: {line}"),
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "histogram"].contains(&value),
                        "unknown type: {line}"
                    );
                    assert!(
                        types.insert(name.to_owned(), value.to_owned()).is_none(),
                        "TYPE twice: {name}"
                    );
                }
                _ => panic!("unknown comment: {line}"),
            }
            continue;
        }
        assert!(!line.trim().is_empty(), "blank line in the exposition");
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.starts_with("removebgd_") && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "bad name: {line}"
        );
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "bad labels: {line}");
            for pair in labels[1..labels.len() - 1].split("\",") {
                let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label: {line}"));
                assert!(k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "{line}");
                assert!(v.starts_with('"'), "{line}");
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
        if name.ends_with("_bucket") {
            if let Some((f, prev)) = &last_bucket
                && f == family
            {
                assert!(value >= *prev, "buckets not cumulative: {line}");
            }
            last_bucket = Some((family.to_owned(), value));
        } else if name.ends_with("_count") && types.get(family).is_some_and(|t| t == "histogram") {
            let inf = samples
                .get(&format!("{family}_bucket{{le=\"+Inf\"}}"))
                .copied()
                .unwrap_or_else(|| panic!("no +Inf bucket before {line}"));
            assert_eq!(inf, value, "+Inf bucket != count: {line}");
        }
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "duplicate series: {line}"
        );
    }
    samples
}

async fn metrics(d: &Daemon) -> BTreeMap<String, f64> {
    let r = d.client.get(d.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        r.headers()
    );
    parse_metrics(&r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_a_request() {
    let d = Daemon::start(5, &[]).await;
    let key = d.key("shop", ALL_SCOPES);
    let before = metrics(&d).await;
    let process_ok = "removebgd_http_requests_total{route=\"/v1/removebg/process\",status=\"200\"}";
    assert_eq!(before.get(process_ok), None);
    assert_eq!(before["removebgd_credits_remaining{account=\"shop\"}"], 5.0);
    assert_eq!(before["removebgd_inference_seconds_count"], 0.0);
    assert_eq!(before["removebgd_results_stored"], 0.0);

    let (s, _, v) = d
        .post_json(
            "/v1/removebg/process",
            &key,
            &json!({"image_base64": b64(&read(images().join("rocket.jpg"))), "output_size": "preview"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, _) = d.get("/v1/removebg/batch/batch_nope", &key).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let after = metrics(&d).await;
    assert_eq!(after[process_ok], 1.0);
    assert_eq!(
        after["removebgd_http_requests_total{route=\"/v1/removebg/batch/{id}\",status=\"404\"}"], 1.0,
        "the route template, not the raw path, is the label"
    );
    assert_eq!(after["removebgd_jobs_total{outcome=\"completed\"}"], 1.0);
    assert_eq!(after["removebgd_inference_seconds_count"], 1.0);
    assert!(after["removebgd_inference_seconds_sum"] > 0.0);
    assert_eq!(after["removebgd_job_duration_seconds_count"], 1.0);
    assert_eq!(after["removebgd_credits_remaining{account=\"shop\"}"], 4.0);
    assert_eq!(after["removebgd_results_stored"], 1.0);
    assert!(after["removebgd_results_bytes"] > 1000.0);
    assert_eq!(after["removebgd_jobs_in_flight"], 0.0);
    assert_eq!(after["removebgd_queue_depth"], 0.0);
    assert_eq!(after.get("removebgd_mqtt_connected"), None, "MQTT is not configured");
    let info = format!("removebgd_build_info{{version=\"{}\",model=\"u2netp\",precision=\"f32\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(after.get(&info), Some(&1.0), "{:?}", after.keys().filter(|k| k.contains("info")).collect::<Vec<_>>());
}

/// The precision in use is named where operators look: /readyz and /metrics (MQTT stats: the
/// mqtt tests). u2netp's `auto` is f32; int8 when asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_and_metrics_name_the_precision() {
    for (args, want) in [(&[][..], "f32"), (&["--precision", "int8"][..], "int8")] {
        let d = Daemon::start(1, args).await;
        let (s, v) = readyz(&d).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!((v["model"].as_str(), v["precision"].as_str()), (Some("u2netp"), Some(want)), "{v}");
        let info = format!(
            "removebgd_build_info{{version=\"{}\",model=\"u2netp\",precision=\"{want}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(metrics(&d).await.get(&info), Some(&1.0), "{args:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_long_request_lets_it_finish_and_exits_0() {
    let mut d = Daemon::start(5, &[]).await;
    let key = d.key("shop", ALL_SCOPES);
    let input = noise_jpeg(2000, 1500);
    let request = {
        let (client, url, key) = (d.client.clone(), d.url("/v1/removebg/process"), key.clone());
        tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body(json!({"image_base64": b64(&input)}).to_string())
                .send()
                .await
                .unwrap();
            split(r).await
        })
    };
    // Signal only once the image is on a worker.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics(&d).await["removebgd_jobs_in_flight"] < 1.0 {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sigterm(&d);
    let (s, _, v) = request.await.unwrap();
    assert_eq!(s, StatusCode::OK, "the request in flight finishes: {v}");
    assert_eq!(v["width"], 2000);
    let status = wait_exit(&mut d, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(d.credits("shop"), (1, 0), "charged once, nothing left reserved");
    let file = d
        .data()
        .join("results")
        .join(format!("{}.png", v["id"].as_str().unwrap()));
    assert!(file.is_file(), "the result is on disk for the next start to serve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_after_bind_then_watchdog_pings_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut cmd = serve_cmd(dir.path());
    cmd.env("NOTIFY_SOCKET", &sock_path).env("WATCHDOG_USEC", "400000");
    let (child, addr, log) = spawn_serve(cmd);
    let mut d = Daemon {
        child: Some(child),
        dir: tempfile::tempdir().unwrap(),
        addr,
        args: vec![],
        client: client(),
    };
    let seen = std::cell::RefCell::new(Vec::<String>::new());
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "no notification ({e}) after {:?}; daemon log: {:?}",
                seen.borrow(),
                log.lines()
            )
        });
        let m = String::from_utf8(buf[..n].to_vec()).unwrap();
        seen.borrow_mut().push(m.clone());
        m
    };
    let mut before_ready = Vec::new();
    let ready = loop {
        let m = recv();
        if m.contains("READY=1") {
            break m;
        }
        before_ready.push(m);
    };
    assert!(
        before_ready.iter().any(|m| m.starts_with("STATUS=loading model")),
        "{before_ready:?}"
    );
    assert!(ready.contains(&format!("STATUS=serving on {addr}")), "{ready}");
    // READY=1 came after the port was bound and the model loaded: it answers at once.
    let (s, _, v) = split(d.client.get(d.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["ready"], true);
    let pings = (0..3).map(|_| recv()).filter(|m| m == "WATCHDOG=1").count();
    assert_eq!(pings, 3, "the watchdog is pinged every WATCHDOG_USEC/2");
    sigterm(&d);
    let stopping = loop {
        let m = recv();
        if m != "WATCHDOG=1" {
            break m;
        }
    };
    assert!(stopping.starts_with("STOPPING=1"), "{stopping}");
    assert_eq!(wait_exit(&mut d, Duration::from_secs(30)).code(), Some(0));
    assert!(log.contains("stopped"));
}

/// Makes a file read-only even for root (which ignores permission bits) and undoes it on drop.
struct ReadOnly(std::path::PathBuf);

impl ReadOnly {
    fn set(path: &std::path::Path) -> ReadOnly {
        // SAFETY: plain libc call without arguments.
        let root = unsafe { libc::geteuid() } == 0;
        let ok = if root {
            std::process::Command::new("chattr")
                .arg("+i")
                .arg(path)
                .status()
                .unwrap()
                .success()
        } else {
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o444)).is_ok()
        };
        assert!(ok, "could not make {} read-only", path.display());
        ReadOnly(path.to_owned())
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr").arg("-i").arg(&self.0).status();
        let _ = std::fs::set_permissions(&self.0, std::os::unix::fs::PermissionsExt::from_mode(0o644));
    }
}

async fn readyz(d: &Daemon) -> (StatusCode, Value) {
    let (s, _, v) = split(d.client.get(d.url("/readyz")).send().await.unwrap()).await;
    (s, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_with_reasons_when_the_database_is_read_only() {
    let d = Daemon::start(5, &[]).await;
    let (s, v) = readyz(&d).await;
    assert_eq!((s, &v["reasons"]), (StatusCode::OK, &json!([])), "{v}");
    {
        let _ro = ReadOnly::set(&d.data().join("removebgd.db"));
        let (s, v) = readyz(&d).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert_eq!(v["ready"], false);
        assert!(v["reasons"][0].as_str().unwrap().contains("read-only"), "{v}");
    }
    let (s, v) = readyz(&d).await;
    assert_eq!(s, StatusCode::OK, "ready again once writable: {v}");
    let (s, _) = (d.client.get(d.url("/healthz")).send().await.unwrap().status(), ());
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_free_disk_reserve_readyz_is_503_and_work_is_refused_with_507() {
    // A reserve larger than any disk: the threshold is crossed from the start.
    let d = Daemon::start(5, &["--min-free-disk-mb", "1000000000"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let (s, v) = readyz(&d).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(v["reasons"][0].as_str().unwrap().contains("reserve"), "{v}");
    let (s, h, v) = d
        .post_json(
            "/v1/removebg/process",
            &key,
            &json!({"image_base64": b64(&read(images().join("rocket.jpg")))}),
        )
        .await;
    assert_eq!(
        error_code(s, &h, &v, StatusCode::INSUFFICIENT_STORAGE),
        "insufficient_storage"
    );
    assert_eq!(d.credits("shop"), (0, 0), "nothing charged or held");
    assert_eq!(std::fs::read_dir(d.data().join("results")).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_results_cap_evicts_the_soonest_expiring_then_refuses_when_only_young_results_remain() {
    // Random pixels compress badly: the cutout is over 1 MB, so a whole-MB cap can hold two
    // results and not three.
    let input = noise_jpeg(800, 600);
    let probe = Daemon::start(1, &[]).await;
    let key = probe.key("shop", ALL_SCOPES);
    let (s, _, v) = probe
        .post_json("/v1/removebg/process", &key, &json!({"image_base64": b64(&input)}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let size = std::fs::metadata(
        probe
            .data()
            .join("results")
            .join(format!("{}.png", v["id"].as_str().unwrap())),
    )
    .unwrap()
    .len();
    drop(probe);
    let cap_mb = (2 * size).div_ceil(1_000_000);
    assert!(
        cap_mb * 1_000_000 < 3 * size,
        "the cutout ({size} bytes) must be large enough for a cap in whole MB"
    );

    // An hour's minimum keep: the results made here are young throughout, however slow the
    // machine. The two that may give way are aged in the database instead of by waiting.
    let d = Daemon::start(
        10,
        &["--results-max-mb", &cap_mb.to_string(), "--results-min-keep", "1h"],
    )
    .await;
    let key = d.key("shop", ALL_SCOPES);
    let body = json!({"image_base64": b64(&input)});
    let process = || d.post_json("/v1/removebg/process", &key, &body);
    let file_of = |v: &Value| {
        d.data()
            .join("results")
            .join(format!("{}.png", v["id"].as_str().unwrap()))
    };
    let (_, _, a) = process().await;
    let (_, _, b) = process().await;
    assert!(file_of(&a).is_file() && file_of(&b).is_file(), "{a} {b}");
    // `a` is the older (finished 3 h ago) but expires last (in 20 h); `b` finished 2 h ago and
    // expires in 1 h. Soonest to expire goes first: `b`, though `a` is older.
    let now = removebgd::clock::now();
    let db = rusqlite::Connection::open(d.data().join("removebgd.db")).unwrap();
    for (v, finished_ago, expires_in) in [(&a, 3 * 3600, 20 * 3600), (&b, 2 * 3600, 3600)] {
        let id = v["id"].as_str().unwrap();
        let (finished, expires) = (now - finished_ago, now + expires_in);
        db.execute("UPDATE jobs SET finished_at = ?2, expires_at = ?3 WHERE id = ?1", (id, finished, expires))
            .unwrap();
        let n = db
            .execute("UPDATE results SET expires_at = ?2 WHERE job_id = ?1", (id, expires))
            .unwrap();
        assert_eq!(n, 1);
    }
    drop(db);

    let (s, _, c) = process().await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert!(!file_of(&b).exists(), "the soonest-expiring result made room");
    let gone = d.client.get(b["result_url"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    assert!(file_of(&a).is_file(), "the oldest result stays: it expires later");

    let (s, _, e) = process().await;
    assert_eq!(s, StatusCode::OK, "{e}");
    assert!(!file_of(&a).exists(), "a was old enough to give way");

    // Only results younger than the minimum remain: refuse rather than overfill.
    let (s, h, v) = process().await;
    assert_eq!(
        error_code(s, &h, &v, StatusCode::INSUFFICIENT_STORAGE),
        "insufficient_storage"
    );
    assert!(file_of(&c).is_file() && file_of(&e).is_file());
    assert_eq!(d.credits("shop"), (4, 0), "the refused request cost nothing");
    let on_disk: u64 = std::fs::read_dir(d.data().join("results"))
        .unwrap()
        .map(|f| f.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk <= cap_mb * 1_000_000, "{on_disk} bytes on disk");
}

#[test]
fn config_print_merges_flag_over_env_over_file_over_default_and_unknown_keys_fail() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        "workers = 3\nresult_ttl = \"2h\"\nrate_burst = 7\nmqtt_url = \"mqtt://rig:hunter2@127.0.0.1:1883\"\n",
    )
    .unwrap();
    let out = bin()
        .args(["config", "print", "--config"])
        .arg(&file)
        .args(["--workers", "5"])
        .env("REMOVEBGD_WORKERS", "4")
        .env("REMOVEBGD_RESULT_TTL", "3h")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: toml::Table = stdout.parse().unwrap();
    assert_eq!(printed["workers"].as_integer(), Some(5), "flag over env over file");
    assert_eq!(printed["result_ttl"].as_str(), Some("3h"), "env over file");
    assert_eq!(printed["rate_burst"].as_integer(), Some(7), "file over default");
    assert_eq!(printed["sweep_interval"].as_str(), Some("1m"), "default");
    assert_eq!(printed["drain_timeout"].as_str(), Some("30s"), "default");
    assert_eq!(printed["listen"].as_str(), Some("0.0.0.0:8080"), "default");
    assert!(!stdout.contains("hunter2"), "the MQTT password is never printed");

    std::fs::write(&file, "workers = 2\nresults_max_megabytes = 5\n").unwrap();
    let out = bin().args(["config", "print", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("results_max_megabytes"), "{err}");
    std::fs::write(&file, "drain_timeout = \"soon\"\n").unwrap();
    let out = bin().args(["serve", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "serve refuses to start");
    assert!(String::from_utf8_lossy(&out.stderr).contains("drain_timeout"));
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify_and_its_security_threshold() {
    let out = std::process::Command::new(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/verify"))
        .arg(env!("CARGO_BIN_EXE_removebgd"))
        .output()
        .expect("systemd/verify runs (needs systemd-analyze: apt-get install systemd)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("removebgd.service OK"), "{text}");
    // The exposure the README promises is the one measured.
    let number_after = |text: &str, marker: &str| -> f64 {
        let at = text.find(marker).unwrap_or_else(|| panic!("no {marker:?}")) + marker.len();
        text[at..]
            .trim_start()
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let measured = number_after(&text, "Overall exposure level for removebgd.service:");
    let readme = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let promised = number_after(&readme, "`systemd-analyze security` exposure");
    assert!(measured <= promised, "exposure {measured}, README promises {promised}");
}

/// Job counts by status, read from the daemon's database file.
fn job_statuses(d: &Daemon) -> BTreeMap<String, i64> {
    let db = rusqlite::Connection::open_with_flags(
        d.data().join("removebgd.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut q = db.prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status").unwrap();
    q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Waits (generously) until `ok` holds for the job counts.
async fn wait_jobs(d: &Daemon, what: &str, ok: impl Fn(&BTreeMap<String, i64>) -> bool) -> BTreeMap<String, i64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = job_statuses(d);
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: jobs are {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn count(s: &BTreeMap<String, i64>, status: &str) -> i64 {
    s.get(status).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_answers_503_to_new_work_finishes_what_runs_and_leaves_queued_items_for_the_next_start() {
    let mut d = Daemon::start(20, &["--workers", "1", "--fetch-allow", "127.0.0.0/8", "--drain-timeout", "60s"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let img = image_server().await;
    // Five batch items, each fetched from a URL that answers after 0.7 s: one runs at a time.
    let urls: Vec<Value> = (0..5).map(|_| json!({"url": format!("http://{img}/slow.jpg")})).collect();
    let (s, _, batch) = d.post_json("/v1/removebg/batch", &key, &json!({"images": urls})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{batch}");
    // A single request whose upload is still arriving: the drain must wait for it.
    let body = json!({"image_base64": b64(&noise_jpeg(64, 48))}).to_string();
    let upload = HeldUpload::start(&d, &key, body.as_bytes()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while metrics(&d).await["removebgd_http_requests_in_flight"] < 1.0 {
        assert!(Instant::now() < deadline, "the upload never reached its handler");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_jobs(&d, "a batch item starts", |s| count(s, "running") >= 1).await;

    sigterm(&d);
    // The daemon still answers: /readyz says it is going away, new work gets 503.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let (s, v) = readyz(&d).await;
        if s == StatusCode::SERVICE_UNAVAILABLE {
            break v;
        }
        assert!(Instant::now() < deadline, "/readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(ready["reasons"].to_string().contains("shutting down"), "{ready}");
    let (s, h, v) = d
        .post_json("/v1/removebg/process", &key, &json!({"image_base64": b64(&noise_jpeg(64, 48))}))
        .await;
    assert_eq!(error_code(s, &h, &v, StatusCode::SERVICE_UNAVAILABLE), "shutting_down");
    assert_eq!(h["retry-after"], "5");
    let (s, h, v) = d.get("/v1/removebg/quota", &key).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::SERVICE_UNAVAILABLE), "shutting_down");
    // The running item finishes; the queued ones are not started.
    let during = wait_jobs(&d, "the running item ends", |s| count(s, "running") == 0).await;
    assert_eq!(count(&during, "queued"), 5 - count(&during, "completed"), "{during:?}");
    assert!(count(&during, "queued") >= 3, "{during:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(job_statuses(&d), during, "nothing else starts while draining");
    assert!(d.child.as_mut().unwrap().try_wait().unwrap().is_none(), "still draining: the upload is open");

    // The held upload completes normally; then the daemon exits.
    assert!(upload.finish().await.starts_with("HTTP/1.1 200 "));
    let status = wait_exit(&mut d, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status:?}");
    let after = job_statuses(&d);
    assert_eq!(count(&after, "queued"), count(&during, "queued"), "{after:?}");
    assert_eq!(count(&after, "failed"), 0, "{after:?}");

    // The next start runs the queued items.
    d.launch().await;
    wait_jobs(&d, "the batch completes after the restart", |s| count(s, "completed") == 6).await;
    assert_eq!(d.credits("shop"), (6, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_drain_deadline_passes_the_daemon_exits_and_the_unfinished_request_is_interrupted_and_released() {
    // An image URL that never answers: the request is running (its credit reserved) when the
    // 1 s drain deadline passes.
    let app = axum::Router::new().route(
        "/hang.jpg",
        axum::routing::get(|| async {
            tokio::time::sleep(Duration::from_secs(300)).await;
            "never"
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mut d = Daemon::start(5, &["--fetch-allow", "127.0.0.0/8", "--drain-timeout", "1s"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let request = {
        let (client, url, key) = (d.client.clone(), d.url("/v1/removebg/process"), key.clone());
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body(json!({"image_url": format!("http://{hang}/hang.jpg")}).to_string())
                .send()
                .await
        })
    };
    wait_jobs(&d, "the request starts", |s| count(s, "running") == 1).await;
    assert_eq!(d.credits("shop"), (0, 1), "its credit is reserved");
    sigterm(&d);
    let status = wait_exit(&mut d, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(request.await.unwrap().is_err(), "the client sees the connection end");
    assert_eq!(count(&job_statuses(&d), "running"), 1, "left running by the exit");

    d.launch().await;
    let after = job_statuses(&d);
    assert_eq!(count(&after, "failed"), 1, "{after:?}");
    let db = rusqlite::Connection::open(d.data().join("removebgd.db")).unwrap();
    let code: String = db.query_row("SELECT error_code FROM jobs", [], |r| r.get(0)).unwrap();
    assert_eq!(code, "interrupted");
    assert_eq!(d.credits("shop"), (0, 0), "the credit is released");
}
