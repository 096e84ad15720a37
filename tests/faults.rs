//! Faults a board meets in months unattended: the process killed mid-batch, the power cut
//! (a copy of the data directory taken at an arbitrary moment), and a full disk (the data
//! directory on a small tmpfs). After each: the database passes `PRAGMA integrity_check`, the
//! ledger equals the counters, no credit is held for nothing, and no half-written file is
//! visible. Real daemon (u2netp), real SQLite files, loopback only.

mod common;
mod daemon;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::*;
use daemon::*;
use serde_json::{Value, json};

/// A small seeded generator: the same moments on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn open(db: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(db).unwrap()
}

fn integrity(db: &Path) -> String {
    open(db).query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap()
}

fn statuses(db: &Path) -> BTreeMap<String, i64> {
    let c = open(db);
    let mut q = c.prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status").unwrap();
    q.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
}

fn n(s: &BTreeMap<String, i64>, status: &str) -> i64 {
    s.get(status).copied().unwrap_or(0)
}

/// Everything that must hold in any data directory at rest, whatever happened before:
/// the database is whole, every account's counters equal its ledger, a credit is reserved
/// exactly for each queued or running job, each job is charged at most once, and every
/// completed job has its whole result file (and the results directory holds nothing else but,
/// after a kill mid-write, the temporary file of a job still marked running, which the next
/// start deletes).
fn audit(data: &Path) -> BTreeMap<String, i64> {
    let db = data.join("removebgd.db");
    assert_eq!(integrity(&db), "ok");
    let c = open(&db);
    let accounts: Vec<(i64, i64, i64)> = c
        .prepare("SELECT id, credits_used, credits_reserved FROM accounts")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (id, used, reserved) in accounts {
        let (lu, lr): (i64, i64) = c
            .query_row(
                "SELECT COALESCE(SUM(used_delta),0), COALESCE(SUM(reserved_delta),0) FROM ledger WHERE account_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((used, reserved), (lu, lr), "account {id}: counters and ledger");
        let held: i64 = c
            .query_row("SELECT COALESCE(SUM(reserved),0) FROM jobs WHERE account_id = ?1", [id], |r| r.get(0))
            .unwrap();
        assert_eq!(reserved, held, "account {id}: reserved credits = jobs holding one");
    }
    let unheld: i64 = c
        .query_row("SELECT COUNT(*) FROM jobs WHERE status IN ('queued','running') AND reserved = 0", [], |r| r.get(0))
        .unwrap();
    assert_eq!(unheld, 0, "every queued or running job holds its credit");
    let twice: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM (SELECT job_id FROM ledger WHERE kind = 'charge' GROUP BY job_id HAVING COUNT(*) > 1)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(twice, 0, "no job charged twice");
    let charged: i64 = c
        .query_row("SELECT COUNT(*) FROM ledger WHERE kind = 'charge'", [], |r| r.get(0))
        .unwrap();
    let s = statuses(&db);
    assert_eq!(charged, n(&s, "completed"), "one charge per completed job: {s:?}");
    let files: Vec<String> = c
        .prepare("SELECT result_file FROM jobs WHERE status = 'completed' AND result_file IS NOT NULL")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for f in &files {
        let bytes = std::fs::read(data.join("results").join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        image::load_from_memory(&bytes).unwrap_or_else(|e| panic!("{f} is not a whole image: {e}"));
    }
    let (partial, mut on_disk): (Vec<String>, Vec<String>) = listing(&data.join("results"))
        .into_iter()
        .partition(|f| f.starts_with('.') && f.ends_with(".partial"));
    for p in &partial {
        let id = p.trim_start_matches('.').split('.').next().unwrap_or_default();
        let status: Option<String> = c
            .query_row("SELECT status FROM jobs WHERE id = ?1", [id], |r| r.get(0))
            .ok();
        assert_eq!(status.as_deref(), Some("running"), "{p} is a temporary file of a job not running");
    }
    let mut want = files.clone();
    on_disk.sort();
    want.sort();
    assert_eq!(on_disk, want, "the results directory holds exactly the completed results");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_ten_seeded_moments_during_batches_loses_no_item_and_no_credit() {
    let mut d = Daemon::start(1000, &["--workers", "2", "--fetch-allow", "127.0.0.0/8"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let img = image_server().await;
    let photos = ["rocket.jpg", "chelsea.png", "solid/20c020.png", "coffee.png", "solid/ff0000.png"];
    let batch = |k: usize| -> Value {
        let images: Vec<Value> = (0..20)
            .map(|i| {
                let p = photos[(i + k) % photos.len()];
                let url = if p.starts_with("solid/") { format!("http://{img}/{p}") } else { format!("http://{img}/img/{p}") };
                json!({"url": url, "id": format!("b{k}-{i}")})
            })
            .collect();
        json!({"images": images})
    };
    let db = d.data().join("removebgd.db");
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut submitted = 0;
    let mut kills = Vec::new();
    for k in 0..10 {
        if k % 3 == 0 {
            let (s, _, v) = d.post_json("/v1/removebg/batch", &key, &batch(k)).await;
            assert_eq!(s, StatusCode::ACCEPTED, "{v}");
            submitted += 20;
        }
        // Anywhere from just after the start to well into the work.
        let after = Duration::from_millis(rng.below(1500));
        tokio::time::sleep(after).await;
        let before = statuses(&db);
        d.kill();
        kills.push((after, before));
        let s = audit(&d.data());
        assert_eq!(s.values().sum::<i64>(), submitted, "no item lost or duplicated: {s:?}");
        d.launch().await;
    }
    // After the last restart everything runs to the end.
    let deadline = Instant::now() + Duration::from_secs(180);
    let end = loop {
        let s = statuses(&db);
        if n(&s, "queued") + n(&s, "running") == 0 {
            break s;
        }
        assert!(Instant::now() < deadline, "the batches never finished: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    d.kill();
    let s = audit(&d.data());
    assert_eq!(s, end);
    assert_eq!(n(&s, "completed"), submitted as i64, "every item completed exactly once: {s:?}");
    assert_eq!(d.credits("shop"), (submitted as i64, 0));
    let killed_running = kills.iter().filter(|(_, s)| n(s, "running") > 0).count();
    eprintln!("killed at {:?}; {killed_running} of 10 kills hit a running item", kills.iter().map(|k| k.0).collect::<Vec<_>>());
    assert!(killed_running >= 3, "the seeded moments should hit running work: {kills:?}");
}

/// Copies the data directory of a stopped (SIGSTOP) process: the state at an arbitrary moment.
fn snapshot(pid: u32, data: &Path, into: &Path) {
    // SAFETY: signals to our own child.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let copy = std::process::Command::new("cp").arg("-a").arg(data).arg(into).status().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    assert!(copy.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_of_the_data_directory_taken_mid_write_reopens_whole_with_every_credit() {
    let d = Daemon::start(10_000, &["--workers", "2", "--fetch-allow", "127.0.0.0/8"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let img = image_server().await;
    // Clients keep the daemon writing: single requests and batches.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = Vec::new();
    for c in 0..3 {
        let (client, base, key, stop) = (client(), d.url(""), key.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                let body = if c == 2 {
                    let urls: Vec<Value> = (0..4).map(|_| json!({"url": format!("http://{img}/img/rocket.jpg")})).collect();
                    (format!("{base}/v1/removebg/batch"), json!({"images": urls}))
                } else {
                    (format!("{base}/v1/removebg/process"), json!({"image_base64": b64(&noise_jpeg(200 + i % 7, 150))}))
                };
                let _ = client
                    .post(body.0)
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(body.1.to_string())
                    .send()
                    .await;
                i += 1;
            }
        }));
    }
    let pid = d.child.as_ref().unwrap().id();
    let snaps = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x0bad_cafe_f00d_0002);
    let mut taken = Vec::new();
    for k in 0..10 {
        tokio::time::sleep(Duration::from_millis(200 + rng.below(600))).await;
        let dir = snaps.path().join(format!("cut{k}"));
        std::fs::create_dir_all(&dir).unwrap();
        snapshot(pid, &d.data(), &dir);
        taken.push(dir);
    }
    stop.cancel();
    for c in clients {
        c.await.unwrap();
    }
    // Each copy, opened by a daemon (whose start-up recovery runs), is whole.
    let mut seen = Vec::new();
    for dir in &taken {
        let db = dir.join("data").join("removebgd.db");
        let raw = statuses(&db);
        // The start-up recovery settles what was running; the queued work then runs to the end.
        let (child, _, _) = spawn_serve(serve_cmd(dir));
        let child = ChildGuard(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        while {
            let s = statuses(&db);
            n(&s, "queued") + n(&s, "running") > 0
        } {
            assert!(Instant::now() < deadline, "the reopened copy never finished its work: {:?}", statuses(&db));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(child);
        let s = audit(&dir.join("data"));
        assert_eq!(
            n(&s, "completed") + n(&s, "failed"),
            raw.values().sum::<i64>(),
            "every job in the copy ends once: {raw:?} -> {s:?}"
        );
        seen.push((raw, s));
    }
    let mid_work = seen.iter().filter(|(raw, _)| n(raw, "running") > 0).count();
    eprintln!("power cuts: {mid_work} of 10 copies were taken with work running");
    assert!(mid_work >= 3, "the copies should catch work in flight: {seen:?}");
}

/// Kills the child when dropped.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tmpfs of `mb` megabytes at `at`, in a mount namespace kept alive by a sleeping process;
/// other processes enter it with nsenter, and this one reaches it through /proc/<pid>/root.
struct Tmpfs {
    holder: ChildGuard,
    at: PathBuf,
}

impl Tmpfs {
    fn new(at: &Path, mb: u64) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let holder = std::process::Command::new("unshare")
            .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
            .arg(format!("mount -t tmpfs -o size={mb}m tmpfs \"$0\" && exec sleep 600"))
            .arg(at)
            .spawn()
            .expect("unshare (util-linux)");
        let t = Tmpfs {
            holder: ChildGuard(holder),
            at: at.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(format!("/proc/{}/mounts", t.holder.0.id()))
            .unwrap_or_default()
            .contains(&format!("{} tmpfs", at.display()))
        {
            assert!(Instant::now() < deadline, "the tmpfs was not mounted");
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }

    /// The tmpfs as this process sees it.
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.holder.0.id())).join(self.at.strip_prefix("/").unwrap())
    }

    /// `cmd` run inside the namespace.
    fn enter(&self, cmd: std::process::Command) -> std::process::Command {
        let mut c = std::process::Command::new("nsenter");
        c.args(["-t", &self.holder.0.id().to_string(), "-U", "-m", "--preserve-credentials"]);
        c.arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }

    /// Fills the tmpfs to the last byte with files of `chunk` bytes; returns them.
    fn fill(&self, chunk: usize) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let block = vec![0xa5u8; chunk];
        for i in 0.. {
            let p = self.path().join(format!("filler-{i}"));
            match std::fs::write(&p, &block) {
                Ok(()) => files.push(p),
                Err(_) => {
                    let _ = std::fs::remove_file(&p);
                    break;
                }
            }
        }
        // The last few bytes too.
        for size in [65_536, 4096, 512, 1] {
            loop {
                let p = self.path().join(format!("filler-{}", files.len()));
                if std::fs::write(&p, vec![0u8; size]).is_err() {
                    let _ = std::fs::remove_file(&p);
                    break;
                }
                files.push(p);
            }
        }
        files
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_disk_answers_507_and_readyz_503_corrupts_nothing_and_service_resumes() {
    let work = tempfile::tempdir().unwrap();
    let tmpfs = Tmpfs::new(&work.path().join("data"), 40);
    // The daemon in the namespace; its models outside the tmpfs.
    let mut cmd = serve_cmd(work.path());
    cmd.args(["--min-free-disk-mb", "2"]);
    let (child, addr, _) = spawn_serve(tmpfs.enter(cmd));
    let _daemon = ChildGuard(child);
    let data = tmpfs.path();
    // SQLite resolves symbolic links in database paths, /proc/<pid>/root included, so the
    // database is only ever opened from inside the namespace (or in a copy taken out of it).
    let admin = |args: &[&str]| {
        let mut cmd = bin();
        cmd.args(args).arg("--data-dir").arg(&tmpfs.at);
        let o = tmpfs.enter(cmd).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    admin(&["accounts", "create", "shop", "--credits", "100"]);
    let key = admin(&["keys", "create", "--account", "shop", "--scopes", ALL_SCOPES]).lines().last().unwrap().trim().to_owned();
    let http = client();
    let url = |p: &str| format!("http://{addr}{p}");
    let process = |w: u32| {
        let (http, url, key) = (http.clone(), url("/v1/removebg/process"), key.clone());
        async move {
            let r = http
                .post(url)
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body(json!({"image_base64": b64(&noise_jpeg(w, w * 3 / 4))}).to_string())
                .send()
                .await
                .unwrap();
            split(r).await
        }
    };
    let readyz = || {
        let (http, url) = (http.clone(), url("/readyz"));
        async move { split(http.get(url).send().await.unwrap()).await }
    };
    let (s, _, v) = process(320).await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // Filled to the brim: refused before any work by the free-space reserve.
    let fillers = tmpfs.fill(1 << 20);
    let (s, h, v) = process(320).await;
    assert_eq!(error_code(s, &h, &v, StatusCode::INSUFFICIENT_STORAGE), "insufficient_storage");
    let (s, _, v) = readyz().await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(v["reasons"].to_string().contains("free"), "{v}");

    // Without the reserve, on the same full disk: the daemon still starts (a restart must not
    // loop), and the writes themselves fail: still 507, and nothing is left behind.
    drop(_daemon);
    let mut cmd = serve_cmd(work.path());
    cmd.args(["--min-free-disk-mb", "0"]);
    let (child, addr2, _) = spawn_serve(tmpfs.enter(cmd));
    let _daemon = ChildGuard(child);
    let url2 = |p: &str| format!("http://{addr2}{p}");
    for w in [320, 1200] {
        let r = http
            .post(url2("/v1/removebg/process"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(json!({"image_base64": b64(&noise_jpeg(w, w * 3 / 4))}).to_string())
            .send()
            .await
            .unwrap();
        let (s, h, v) = split(r).await;
        assert_eq!(error_code(s, &h, &v, StatusCode::INSUFFICIENT_STORAGE), "insufficient_storage", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("full"), "{v}");
    }
    assert!(
        !listing(&data.join("results")).iter().any(|f| f.starts_with('.')),
        "no partial result is left: {:?}",
        listing(&data.join("results"))
    );

    // Space returns: service resumes, and nothing was corrupted.
    for p in fillers.iter().filter(|p| p.exists()) {
        std::fs::remove_file(p).unwrap();
    }
    let r = http
        .post(url2("/v1/removebg/process"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(json!({"image_base64": b64(&noise_jpeg(320, 240))}).to_string())
        .send()
        .await
        .unwrap();
    let (s, _, v) = split(r).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, v) = split(http.get(url2("/readyz")).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    drop(_daemon);
    let copy = tempfile::tempdir().unwrap();
    assert!(std::process::Command::new("cp").arg("-a").arg(&data).arg(copy.path()).status().unwrap().success());
    let copied = copy.path().join("data");
    let st = audit(&copied);
    assert_eq!(n(&st, "completed"), 2, "{st:?}");
    let c = open(&copied.join("removebgd.db"));
    let (used, reserved): (i64, i64) = c
        .query_row("SELECT credits_used, credits_reserved FROM accounts WHERE name = 'shop'", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap();
    assert_eq!((used, reserved), (2, 0), "only the two successes were charged");
}
