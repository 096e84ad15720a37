//! Load: many concurrent clients against one real `removebgd serve` (u2netp, `--workers 2`) for
//! a fixed time, mixing every operation of both APIs (process by URL, base64 and multipart; batch
//! submit and polls; quota; results; remove.bg's v1.0 calls) with wrong keys, malformed and
//! oversize bodies, a second account that runs out of credits under concurrency, and one client
//! that bursts past its key's rate limit. Then the daemon drains and the ledger is audited.
//!
//! Asserted: no 5xx and no transport error; every status is one the README documents for its
//! operation; nothing is left queued, running or reserved; and for each account
//! `credits_used` = the ledger's sum = its completed jobs = the images the clients saw succeed.
//! Measured and printed (`--nocapture`), never asserted: latency per operation, statuses,
//! requests/s, and the daemon's RSS over time.
//!
//! Size: `REMOVEBGD_LOAD_CLIENTS` clients (40) for `REMOVEBGD_LOAD_SECS` seconds (15);
//! `REMOVEBGD_LOAD_SEED` picks the mix; `REMOVEBGD_LOAD_SETTLE` (0) seconds to wait at most,
//! once idle, for the daemon to release its cached big blocks before the last RSS reading.
//! `bench/load.sh` runs 200 clients for 60 s.
//!
//! Every client has its own API key and its own loopback source address (127.0.0.10 up to
//! 127.0.0.59, like kiosks on a LAN), so the daemon's default caps (10 requests/s per key, 64
//! connections per address) apply as they would in a shop. The rate limit is per key and the
//! same for every key, so an ordinary client, which waits for its cutouts, stays under it, and
//! the one bursting client (its own key too) gets the 429s.

mod common;
mod daemon;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use common::*;
use daemon::*;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

const DEFAULT_CLIENTS: usize = 40;
const DEFAULT_SECS: u64 = 15;
const DEFAULT_SEED: u64 = 0x5eed_10ad;
/// The documented poll interval of a batch (`--batch-poll-interval`), plus a margin.
const POLL_EVERY: Duration = Duration::from_millis(2050);
/// Longer than any request can take here, however loaded the machine: hitting it is a failure
/// (a transport error), not a measurement.
const REQUEST_DEADLINE: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------------------------
// Operations and what the README documents for each

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Op {
    ProcessUrl,
    ProcessBase64,
    ProcessMultipart,
    BatchSubmit,
    BatchPoll,
    Quota,
    Result,
    RemoveBgMultipart,
    RemoveBgBase64,
    RemoveBgAccount,
    WrongKey,
    RemoveBgWrongKey,
    MalformedJson,
    WrongContentType,
    /// Declares its length (Content-Length): refused before any of it is read.
    OversizeProcess,
    /// Chunked, no declared length: refused once the limit is crossed.
    OversizeProcessChunked,
    OversizeBatch,
    OversizeBatchChunked,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::ProcessUrl => "process url",
            Op::ProcessBase64 => "process base64",
            Op::ProcessMultipart => "process multipart",
            Op::BatchSubmit => "batch submit",
            Op::BatchPoll => "batch poll",
            Op::Quota => "quota",
            Op::Result => "result GET",
            Op::RemoveBgMultipart => "v1.0 removebg multipart",
            Op::RemoveBgBase64 => "v1.0 removebg b64 json",
            Op::RemoveBgAccount => "v1.0 account",
            Op::WrongKey => "wrong key (process)",
            Op::RemoveBgWrongKey => "wrong key (v1.0)",
            Op::MalformedJson => "malformed json",
            Op::WrongContentType => "wrong content type",
            Op::OversizeProcess => "16 MiB /process, length",
            Op::OversizeProcessChunked => "16 MiB /process, chunked",
            Op::OversizeBatch => "2 MiB /batch, length",
            Op::OversizeBatchChunked => "2 MiB /batch, chunked",
        }
    }

    /// The statuses the README documents for this operation as these clients send it (all
    /// scopes, valid JSON where it should be). 5xx are never accepted: 500 is a bug, 503 a
    /// connection cap these clients stay under, 507 a full disk this run cannot reach.
    fn documented(self) -> &'static [u16] {
        match self {
            // README "API" and "Errors": the request, the key, credits, the body deadline, the
            // size limits, the image itself, the rate limit.
            Op::ProcessUrl | Op::ProcessBase64 | Op::ProcessMultipart => &[200, 400, 401, 402, 408, 413, 422, 429],
            Op::BatchSubmit => &[202, 400, 401, 402, 408, 413, 429],
            // 429: "a batch polled within 2 s of the last poll".
            Op::BatchPoll => &[200, 401, 404, 429],
            Op::Quota => &[200, 401, 429],
            // No key; 404 once expired.
            Op::Result => &[200, 404],
            // remove.bg's statuses: 400 for every bad request or image, 402, 403 for keys, 429.
            Op::RemoveBgMultipart | Op::RemoveBgBase64 => &[200, 400, 402, 403, 429],
            Op::RemoveBgAccount => &[200, 403, 429],
            // An unknown key is refused before the rate limit is consulted.
            Op::WrongKey => &[401],
            Op::RemoveBgWrongKey => &[403],
            Op::MalformedJson | Op::WrongContentType => &[400, 429],
            // The size check comes before the key; a body arriving too slowly would be 408.
            Op::OversizeProcess | Op::OversizeProcessChunked | Op::OversizeBatch | Op::OversizeBatchChunked => {
                &[408, 413]
            }
        }
    }
}

/// How often an ordinary client picks each operation (out of the sum).
const MIX: [(Op, u64); 18] = [
    (Op::ProcessUrl, 28),
    (Op::ProcessBase64, 24),
    (Op::ProcessMultipart, 24),
    (Op::BatchSubmit, 12),
    (Op::BatchPoll, 20),
    (Op::Quota, 14),
    (Op::Result, 16),
    (Op::RemoveBgMultipart, 16),
    (Op::RemoveBgBase64, 16),
    (Op::RemoveBgAccount, 6),
    (Op::WrongKey, 4),
    (Op::RemoveBgWrongKey, 2),
    (Op::MalformedJson, 4),
    (Op::WrongContentType, 4),
    (Op::OversizeProcess, 1),
    (Op::OversizeProcessChunked, 1),
    (Op::OversizeBatch, 1),
    (Op::OversizeBatchChunked, 1),
];

// ---------------------------------------------------------------------------------------------
// Small helpers

/// xorshift64*: a seeded, reproducible choice of operations and inputs.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Raises this process's soft descriptor limit to the hard limit (the daemon inherits it).
fn raise_nofile() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    if r.rlim_cur < r.rlim_max {
        r.rlim_cur = r.rlim_max;
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) }, 0);
    }
    r.rlim_cur as u64
}

/// A value from the /metrics text, e.g. `removebgd_queue_depth`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// The daemon's resident set (VmRSS) in kB.
fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The daemon's resident memory by kind, in MB, from /proc/<pid>/smaps: glibc's heap (small and
/// medium blocks; never trimmed, see main.rs), anonymous mappings of 4 MiB and up (the big
/// blocks of memory.rs: tensors, large bodies), other anonymous mappings (thread stacks, small
/// maps), and file-backed pages (the binary, libraries).
#[derive(Debug, Clone, Copy, Default)]
struct Kinds {
    heap: u64,
    big: u64,
    anon: u64,
    files: u64,
}

impl std::fmt::Display for Kinds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |kb: u64| kb as f64 / 1024.0;
        write!(
            f,
            "heap {:.1} + big blocks {:.1} + other anonymous {:.1} + files {:.1}",
            mb(self.heap),
            mb(self.big),
            mb(self.anon),
            mb(self.files)
        )
    }
}

fn rss_breakdown(pid: u32) -> Kinds {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return Kinds::default();
    };
    let (mut heap, mut big, mut anon, mut files) = (0u64, 0u64, 0u64, 0u64);
    let mut kind = 0;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let first = parts.next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-')
            && let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
        {
            let path = parts.nth(4).unwrap_or("");
            kind = match path {
                "[heap]" => 0,
                "" if hi - lo >= 4 << 20 => 1,
                "" => 2,
                p if p.starts_with('[') => 2,
                _ => 3,
            };
        } else if first == "Rss:" {
            let kb: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *[&mut heap, &mut big, &mut anon, &mut files][kind] += kb;
        }
    }
    Kinds { heap, big, anon, files }
}

/// A multipart/form-data body (text fields and files).
fn multipart(fields: &[(&str, Result<&str, &[u8]>)]) -> (String, Vec<u8>) {
    let boundary = "----removebgd-load-7d1f3a";
    let mut body = Vec::new();
    for (name, part) in fields {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match part {
            Ok(text) => {
                body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{text}\r\n").as_bytes())
            }
            Err(bytes) => {
                body.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"photo.jpg\"\r\n\
                         Content-Type: image/jpeg\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend_from_slice(bytes);
                body.extend_from_slice(b"\r\n");
            }
        }
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Small photos: a 160x120 noise JPEG and the chelsea and rocket photos scaled down to at most
/// 224 px (each cutout is quick with u2netp).
fn small_photos() -> Vec<(String, Vec<u8>)> {
    let shrink = |bytes: Vec<u8>| {
        let img = image::load_from_memory(&bytes).unwrap();
        let rgb = img.resize(224, 224, image::imageops::FilterType::Triangle).to_rgb8();
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
            .encode_image(&rgb)
            .unwrap();
        out
    };
    vec![
        ("noise.jpg".to_owned(), noise_jpeg(160, 120)),
        ("chelsea-small.jpg".to_owned(), shrink(read(fixture("chelsea.jpg")))),
        ("rocket-small.jpg".to_owned(), shrink(read(images().join("rocket.jpg")))),
    ]
}

/// A loopback server for the small photos at `/small/{name}` (the fixture server only has the
/// files as they are).
async fn photo_server(photos: Arc<Vec<(String, Vec<u8>)>>) -> SocketAddr {
    let app = axum::Router::new().route(
        "/small/{name}",
        axum::routing::get(move |axum::extract::Path(name): axum::extract::Path<String>| {
            let photos = Arc::clone(&photos);
            async move {
                match photos.iter().find(|(n, _)| *n == name) {
                    Some((_, bytes)) => ([(header::CONTENT_TYPE, "image/jpeg")], bytes.clone()).into_response(),
                    None => StatusCode::NOT_FOUND.into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An oversize body over raw HTTP/1.1, as a careful client sends one: the body is written while
/// the answer is read, and writing stops once the answer is in (the server answers 413 without
/// reading the rest, then closes). `chunked` sends no Content-Length, so the server has to count.
/// Errors are transport errors: no complete answer.
async fn oversize(
    to: SocketAddr,
    from: IpAddr,
    path: &str,
    key: &str,
    len: usize,
    chunked: bool,
    filler: Arc<Vec<u8>>,
) -> Result<(u16, Value), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    sock.bind(SocketAddr::new(from, 0)).map_err(|e| format!("bind: {e}"))?;
    let stream = sock.connect(to).await.map_err(|e| format!("connect: {e}"))?;
    let (mut rd, mut wr) = stream.into_split();
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {len}")
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {to}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\n{framing}\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        let mut sent = 0;
        while sent < len {
            let n = (len - sent).min(filler.len());
            if chunked {
                wr.write_all(format!("{n:x}\r\n").as_bytes()).await?;
            }
            wr.write_all(&filler[..n]).await?;
            if chunked {
                wr.write_all(b"\r\n").await?;
            }
            sent += n;
        }
        if chunked {
            wr.write_all(b"0\r\n\r\n").await?;
        }
        // Kept open: a half-closed connection may be taken for a client that went away.
        Ok::<_, std::io::Error>(wr)
    });
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let answer = loop {
        let n = match rd.read(&mut chunk).await {
            Ok(n) => n,
            Err(e) => break Err(format!("read after {} bytes of answer: {e}", buf.len())),
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let body_len: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                .unwrap_or(0);
            if buf.len() >= end + 4 + body_len {
                let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                let body = serde_json::from_slice(&buf[end + 4..end + 4 + body_len]).unwrap_or(Value::Null);
                break Ok((status, body));
            }
        }
        if n == 0 {
            break Err(format!(
                "closed after {} bytes of answer: {:?}",
                buf.len(),
                String::from_utf8_lossy(&buf[..buf.len().min(200)])
            ));
        }
    };
    writer.abort();
    answer
}

fn error_code(v: &Value) -> String {
    v["error"]["code"]
        .as_str()
        .or_else(|| v["errors"][0]["code"].as_str())
        .or_else(|| v["code"].as_str())
        .unwrap_or("")
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// Clients

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Account `shop`, plenty of credits.
    Normal,
    /// Account `poor`, a few credits shared by several clients.
    Poor,
    /// Account `shop`, bursts of cheap requests past its key's rate limit, then honours
    /// Retry-After.
    Burst,
}

struct Rec {
    op: Op,
    status: u16,
    code: String,
    latency: Duration,
    /// When it was sent, from the start of the run.
    at: Duration,
    role: Role,
}

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
    json: Value,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

struct Ctx {
    base: String,
    addr: SocketAddr,
    /// Image URLs the daemon may fetch: the small photos and the fixture server's chelsea.jpg.
    urls: Vec<String>,
    photos: Vec<Vec<u8>>,
    /// 64 KiB of filler for the oversize bodies.
    filler: Arc<Vec<u8>>,
    t0: Instant,
    end: Instant,
}

struct Batch {
    id: String,
    total: u64,
    last_poll: Instant,
}

struct Client {
    n: usize,
    role: Role,
    key: String,
    from: IpAddr,
    http: reqwest::Client,
    rng: Rng,
    ctx: Arc<Ctx>,
    batches: Vec<Batch>,
    results: VecDeque<String>,
    /// Images this client saw succeed: each 200 from a process or remove.bg call, and each
    /// completed item of a finished batch.
    seen_ok: i64,
    recs: Vec<Rec>,
    anomalies: Vec<String>,
}

impl Client {
    fn new(n: usize, role: Role, key: String, seed: u64, ctx: Arc<Ctx>) -> Client {
        // 127.0.0.10 ..= 127.0.0.59: a few clients per address.
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + (n % 50) as u8));
        let http = reqwest::Client::builder()
            .local_address(from)
            // Shorter than the daemon's keep-alive timeout (5 s), so a pooled connection is
            // never reused just as the daemon closes it.
            .pool_idle_timeout(Duration::from_secs(2))
            .timeout(REQUEST_DEADLINE)
            .build()
            .unwrap();
        Client {
            n,
            role,
            key,
            from,
            http,
            rng: Rng::new(seed ^ (n as u64).wrapping_mul(0xa076_1d64_78bd_642f)),
            ctx,
            batches: Vec::new(),
            results: VecDeque::new(),
            seen_ok: 0,
            recs: Vec::new(),
            anomalies: Vec::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.ctx.base)
    }

    fn anomaly(&mut self, op: Op, what: String) {
        self.anomalies.push(format!("client {} ({:?}) {}: {what}", self.n, self.role, op.name()));
    }

    fn record(&mut self, op: Op, status: u16, code: String, started: Instant) {
        self.recs.push(Rec {
            op,
            status,
            code,
            latency: started.elapsed(),
            at: started.duration_since(self.ctx.t0),
            role: self.role,
        });
    }

    async fn exchange(&mut self, op: Op, req: reqwest::RequestBuilder) -> Option<Reply> {
        let started = Instant::now();
        let res: Result<Reply, reqwest::Error> = async {
            let r = req.send().await?;
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            let body = r.bytes().await?.to_vec();
            let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
            Ok(Reply {
                status,
                headers,
                body,
                json,
            })
        }
        .await;
        match res {
            Ok(reply) => {
                self.record(op, reply.status, error_code(&reply.json), started);
                Some(reply)
            }
            Err(e) => {
                self.record(op, 0, format!("transport error: {e:?}"), started);
                None
            }
        }
    }

    fn photo(&mut self) -> Vec<u8> {
        let i = self.rng.below(self.ctx.photos.len());
        self.ctx.photos[i].clone()
    }

    fn image_url(&mut self) -> String {
        let i = self.rng.below(self.ctx.urls.len());
        self.ctx.urls[i].clone()
    }

    fn due_batch(&self) -> Option<usize> {
        self.batches.iter().position(|b| b.last_poll.elapsed() >= POLL_EVERY)
    }

    fn pick(&mut self) -> Op {
        let total: u64 = MIX.iter().map(|(_, w)| w).sum();
        loop {
            let mut r = self.rng.next() % total;
            let op = MIX
                .iter()
                .find(|(_, w)| {
                    if r < *w {
                        true
                    } else {
                        r -= w;
                        false
                    }
                })
                .unwrap()
                .0;
            match op {
                Op::BatchSubmit if self.batches.len() >= 2 => continue,
                Op::BatchPoll if self.due_batch().is_none() => continue,
                Op::Result if self.results.is_empty() => continue,
                _ => return op,
            }
        }
    }

    async fn run(mut self) -> Client {
        // The first request of each ordinary client goes round every operation that needs no
        // earlier answer, so that even a short run has each of them; then the seeded mix.
        let starters: Vec<Op> = MIX
            .iter()
            .map(|(op, _)| *op)
            .filter(|op| !matches!(op, Op::BatchPoll | Op::Result))
            .collect();
        // A poor client starts with a cutout: together they ask for one credit more than the
        // account has, so one of them gets 402 on the last credits whatever the timing.
        const IMAGE_OPS: [Op; 5] =
            [Op::ProcessBase64, Op::ProcessUrl, Op::RemoveBgMultipart, Op::ProcessMultipart, Op::RemoveBgBase64];
        let mut first = Some(match self.role {
            Role::Poor => IMAGE_OPS[self.n / 10 % IMAGE_OPS.len()],
            _ => starters[self.n % starters.len()],
        });
        while Instant::now() < self.ctx.end {
            if self.role == Role::Burst {
                self.burst().await;
            } else {
                let op = first.take().unwrap_or_else(|| self.pick());
                self.act(op).await;
            }
        }
        // The run is over: follow each batch to its end, at the documented poll interval.
        let deadline = Instant::now() + Duration::from_secs(600);
        while let Some(next) = self.batches.iter().map(|b| b.last_poll + POLL_EVERY).min() {
            if Instant::now() > deadline {
                let left: Vec<String> = self.batches.iter().map(|b| b.id.clone()).collect();
                self.anomaly(Op::BatchPoll, format!("batches still processing 600 s after the run: {left:?}"));
                break;
            }
            tokio::time::sleep_until(next.into()).await;
            self.act(Op::BatchPoll).await;
        }
        self
    }

    /// 30 cheap requests at once on this client's key (half as many again as its burst of 20,
    /// however quickly the daemon answers), then a pause: the longest Retry-After it was given,
    /// and at least 5 s (a dashboard refreshing).
    async fn burst(&mut self) {
        let sends = (0..30).map(|i| {
            let op = if i % 4 == 3 { Op::RemoveBgAccount } else { Op::Quota };
            let req = match op {
                Op::Quota => self.http.get(self.url("/v1/removebg/quota")).bearer_auth(&self.key),
                _ => self.http.get(self.url("/v1.0/account")).header("X-Api-Key", &self.key),
            };
            async move {
                let started = Instant::now();
                let reply = match req.send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let headers = r.headers().clone();
                        r.bytes().await.map(|b| (status, headers, b))
                    }
                    Err(e) => Err(e),
                };
                (op, started, reply)
            }
        });
        let mut wait = 0;
        for (op, started, reply) in futures_util::future::join_all(sends).await {
            match reply {
                Ok((status, headers, body)) => {
                    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    self.record(op, status, error_code(&json), started);
                    let after = headers.get("retry-after").and_then(|v| v.to_str().ok()).unwrap_or("");
                    if status == 429 {
                        match after.parse::<u64>() {
                            Ok(w @ 1..=60) => wait = wait.max(w),
                            _ => self.anomaly(op, format!("429 with Retry-After {after:?}")),
                        }
                    }
                }
                Err(e) => self.record(op, 0, format!("transport error: {e:?}"), started),
            }
        }
        let pause = Duration::from_secs(wait.max(5));
        tokio::time::sleep(pause.min(self.ctx.end.saturating_duration_since(Instant::now()))).await;
    }

    /// One request of `op`; its reply, checked.
    async fn act(&mut self, op: Op) -> Option<Reply> {
        let ctx = Arc::clone(&self.ctx);
        let json_post = |c: &Client, path: &str, body: String| {
            c.http
                .post(c.url(path))
                .bearer_auth(&c.key)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body)
        };
        let reply = match op {
            Op::ProcessUrl => {
                let format = if self.rng.chance(20) { "webp" } else { "png" };
                let body = json!({"image_url": self.image_url(), "output_format": format});
                let req = json_post(self, "/v1/removebg/process", body.to_string());
                self.exchange(op, req).await
            }
            Op::ProcessBase64 => {
                let photo = self.photo();
                let body = json!({
                    "image_base64": b64(&photo),
                    "output_size": if self.rng.chance(50) { "preview" } else { "full" },
                    "return_base64": self.rng.chance(30),
                });
                let req = json_post(self, "/v1/removebg/process", body.to_string());
                self.exchange(op, req).await
            }
            Op::ProcessMultipart => {
                let photo = self.photo();
                let mut fields: Vec<(&str, Result<&str, &[u8]>)> = vec![("output_size", Ok("preview"))];
                if self.rng.chance(25) {
                    fields.push(("bg_color", Ok("#00aa00")));
                }
                fields.push(("image_file", Err(photo.as_slice())));
                let (ct, body) = multipart(&fields);
                let req = self
                    .http
                    .post(self.url("/v1/removebg/process"))
                    .header("X-Api-Key", &self.key)
                    .header(header::CONTENT_TYPE, ct)
                    .body(body);
                self.exchange(op, req).await
            }
            Op::BatchSubmit => {
                let n = 2 + self.rng.below(2);
                let images: Vec<Value> = (0..n)
                    .map(|i| json!({"url": self.image_url(), "id": format!("c{}-item{i}", self.n)}))
                    .collect();
                let body = json!({"images": images, "output_format": "png"});
                let req = json_post(self, "/v1/removebg/batch", body.to_string());
                self.exchange(op, req).await
            }
            Op::BatchPoll => {
                let i = self.due_batch().unwrap_or(0);
                let id = self.batches[i].id.clone();
                let req = self.http.get(self.url(&format!("/v1/removebg/batch/{id}"))).bearer_auth(&self.key);
                let r = self.exchange(op, req).await;
                self.batches[i].last_poll = Instant::now();
                r
            }
            Op::Quota => {
                let req = self.http.get(self.url("/v1/removebg/quota")).bearer_auth(&self.key);
                self.exchange(op, req).await
            }
            Op::Result => {
                let url = self.results[self.rng.below(self.results.len())].clone();
                let req = self.http.get(url);
                self.exchange(op, req).await
            }
            Op::RemoveBgMultipart => {
                let photo = self.photo();
                let size = ["preview", "full", "auto", "regular"][self.rng.below(4)];
                let (ct, body) = multipart(&[("size", Ok(size)), ("image_file", Err(photo.as_slice()))]);
                let req = self
                    .http
                    .post(self.url("/v1.0/removebg"))
                    .header("X-Api-Key", &self.key)
                    .header(header::CONTENT_TYPE, ct)
                    .body(body);
                self.exchange(op, req).await
            }
            Op::RemoveBgBase64 => {
                let photo = self.photo();
                let body = json!({"image_file_b64": b64(&photo), "size": "preview", "format": "png"});
                let mut req = self
                    .http
                    .post(self.url("/v1.0/removebg"))
                    .header("X-Api-Key", &self.key)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(body.to_string());
                if self.rng.chance(50) {
                    req = req.header(header::ACCEPT, "application/json");
                }
                self.exchange(op, req).await
            }
            Op::RemoveBgAccount => {
                let req = self.http.get(self.url("/v1.0/account")).header("X-Api-Key", &self.key);
                self.exchange(op, req).await
            }
            Op::WrongKey => {
                let wrong = format!("xbk_live_{:016x}{:024x}", self.rng.next(), self.rng.next());
                let body = json!({"image_url": self.image_url()});
                let req = self
                    .http
                    .post(self.url("/v1/removebg/process"))
                    .bearer_auth(wrong)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(body.to_string());
                self.exchange(op, req).await
            }
            Op::RemoveBgWrongKey => {
                let wrong = format!("xbk_live_{:016x}", self.rng.next());
                let photo = self.photo();
                let (ct, body) = multipart(&[("image_file", Err(photo.as_slice()))]);
                let req = self
                    .http
                    .post(self.url("/v1.0/removebg"))
                    .header("X-Api-Key", wrong)
                    .header(header::CONTENT_TYPE, ct)
                    .body(body);
                self.exchange(op, req).await
            }
            Op::MalformedJson => {
                let (path, body) = if self.rng.chance(50) {
                    ("/v1/removebg/process", "{\"image_url\": \"http://x/a.jpg\", ")
                } else {
                    ("/v1/removebg/batch", "{\"images\": [{\"url\": ")
                };
                let req = json_post(self, path, body.to_owned());
                self.exchange(op, req).await
            }
            Op::WrongContentType => {
                let path = if self.rng.chance(50) { "/v1/removebg/process" } else { "/v1/removebg/batch" };
                let req = self
                    .http
                    .post(self.url(path))
                    .bearer_auth(&self.key)
                    .header(header::CONTENT_TYPE, "text/plain")
                    .body("image_url=http://x/a.jpg");
                self.exchange(op, req).await
            }
            Op::OversizeProcess | Op::OversizeProcessChunked | Op::OversizeBatch | Op::OversizeBatchChunked => {
                let (path, len) = if matches!(op, Op::OversizeProcess | Op::OversizeProcessChunked) {
                    ("/v1/removebg/process", 16 << 20)
                } else {
                    ("/v1/removebg/batch", 2 << 20)
                };
                let chunked = matches!(op, Op::OversizeProcessChunked | Op::OversizeBatchChunked);
                let started = Instant::now();
                let key = self.key.clone();
                let sent = tokio::time::timeout(
                    REQUEST_DEADLINE,
                    oversize(ctx.addr, self.from, path, &key, len, chunked, Arc::clone(&ctx.filler)),
                )
                .await
                .unwrap_or_else(|_| Err("no answer within the deadline".to_owned()));
                match sent {
                    Ok((status, json)) => {
                        self.record(op, status, error_code(&json), started);
                        Some(Reply {
                            status,
                            headers: HeaderMap::new(),
                            body: Vec::new(),
                            json,
                        })
                    }
                    Err(e) => {
                        let how = if chunked { "chunked" } else { "with Content-Length" };
                        self.record(op, 0, format!("transport error ({how}): {e}"), started);
                        None
                    }
                }
            }
        };
        if let Some(r) = &reply {
            self.check(op, r);
        }
        reply
    }

    /// Follows up a reply: counts successes, keeps result URLs and batches, notes anything a
    /// documented status alone would not show.
    fn check(&mut self, op: Op, r: &Reply) {
        if r.status == 402 && self.role != Role::Poor {
            self.anomaly(op, format!("402 on the account with plenty of credits: {}", r.json));
        }
        match (op, r.status) {
            (Op::ProcessUrl | Op::ProcessBase64 | Op::ProcessMultipart, 200) => {
                if r.header("x-credits-charged") != "1" || r.json["credits_used"] != 1 {
                    self.anomaly(op, format!("a success without its charge: {}", r.json));
                }
                match r.json["result_url"].as_str() {
                    Some(u) => self.keep_result(u.to_owned()),
                    None => self.anomaly(op, format!("no result_url: {}", r.json)),
                }
                self.seen_ok += 1;
            }
            (Op::RemoveBgMultipart | Op::RemoveBgBase64, 200) => {
                if r.header("x-credits-charged") != "1" || r.header("x-result-id").is_empty() {
                    self.anomaly(op, "a success without X-Credits-Charged: 1 and X-Result-Id".into());
                }
                let is_json = r.header("content-type").starts_with("application/json");
                let ok = if is_json {
                    r.json["data"]["result_b64"].as_str().is_some_and(|s| !s.is_empty())
                } else {
                    r.header("content-type").starts_with("image/") && !r.body.is_empty()
                };
                if !ok {
                    self.anomaly(op, format!("a 200 without an image ({})", r.header("content-type")));
                }
                self.seen_ok += 1;
            }
            (Op::BatchSubmit, 202) => match (r.json["job_id"].as_str(), r.json["total"].as_u64()) {
                (Some(id), Some(total)) => self.batches.push(Batch {
                    id: id.to_owned(),
                    total,
                    last_poll: Instant::now(),
                }),
                _ => self.anomaly(op, format!("202 without job_id and total: {}", r.json)),
            },
            (Op::BatchPoll, 200) => {
                let v = &r.json;
                let Some(i) = self.batches.iter().position(|b| Some(b.id.as_str()) == v["job_id"].as_str()) else {
                    self.anomaly(op, format!("an answer for a batch this client is not polling: {v}"));
                    return;
                };
                if v["status"] == "processing" {
                    return;
                }
                let batch = self.batches.remove(i);
                let (completed, failed) = (v["completed"].as_u64().unwrap_or(0), v["failed"].as_u64().unwrap_or(0));
                let items = v["items"].as_array().cloned().unwrap_or_default();
                let done: Vec<&Value> = items.iter().filter(|i| i["status"] == "completed").collect();
                if completed + failed != batch.total
                    || v["credits_used"].as_u64() != Some(completed)
                    || done.len() as u64 != completed
                    || items.len() as u64 != batch.total
                {
                    self.anomaly(op, format!("a finished batch that does not add up: {v}"));
                }
                if failed > 0 {
                    self.anomaly(op, format!("batch items failed: {v}"));
                }
                for item in done {
                    match item["result_url"].as_str() {
                        Some(u) => self.keep_result(u.to_owned()),
                        None => self.anomaly(op, format!("a completed item without result_url: {item}")),
                    }
                }
                self.seen_ok += completed as i64;
            }
            (Op::BatchPoll, 404) => self.anomaly(op, format!("this client's own batch is not found: {}", r.json)),
            (Op::Quota, 200) => {
                if r.json["credits_remaining"].as_i64().is_none() {
                    self.anomaly(op, format!("quota without credits_remaining: {}", r.json));
                }
            }
            (Op::Result, 200) => {
                if !r.header("content-type").starts_with("image/") || r.body.is_empty() {
                    self.anomaly(op, format!("a result that is not an image ({})", r.header("content-type")));
                }
            }
            // Nothing expires or is evicted during a run: a result seen once must stay.
            (Op::Result, 404) => self.anomaly(op, "a result that was served before is gone".into()),
            (Op::ProcessUrl | Op::ProcessBase64 | Op::ProcessMultipart | Op::RemoveBgMultipart | Op::RemoveBgBase64, 422)
            | (Op::ProcessUrl | Op::ProcessBase64 | Op::ProcessMultipart | Op::RemoveBgMultipart | Op::RemoveBgBase64, 400) => {
                // Documented, but every input here is a good image: say which, for the report.
                self.anomaly(op, format!("a good image refused: {}", r.json));
            }
            _ => {}
        }
    }

    fn keep_result(&mut self, url: String) {
        if self.results.len() >= 16 {
            self.results.pop_front();
        }
        self.results.push_back(url);
    }
}

// ---------------------------------------------------------------------------------------------
// The report

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    percentile(&s, 0.5)
}

fn sparkline(values: &[f64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if values.is_empty() {
        return String::new();
    }
    let per = values.len().div_ceil(width.max(1));
    let buckets: Vec<f64> = values.chunks(per).map(|c| c.iter().copied().fold(f64::MIN, f64::max)).collect();
    let (lo, hi) = (
        buckets.iter().copied().fold(f64::MAX, f64::min),
        buckets.iter().copied().fold(f64::MIN, f64::max),
    );
    buckets
        .iter()
        .map(|v| {
            let i = if hi > lo { ((v - lo) / (hi - lo) * 7.0).round() as usize } else { 0 };
            BARS[i.min(7)]
        })
        .collect()
}

fn statuses(recs: &[&Rec]) -> String {
    let mut h: BTreeMap<(u16, &str), usize> = BTreeMap::new();
    for r in recs {
        let code = if r.status == 0 { "transport" } else { r.code.as_str() };
        *h.entry((r.status, code)).or_default() += 1;
    }
    h.iter()
        .map(|((s, c), n)| if c.is_empty() { format!("{s}×{n}") } else { format!("{s} {c}×{n}") })
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_get_only_documented_answers_and_the_ledger_balances() {
    let wall = Instant::now();
    let nofile = raise_nofile();
    let clients: usize = env_or("REMOVEBGD_LOAD_CLIENTS", DEFAULT_CLIENTS);
    let secs: u64 = env_or("REMOVEBGD_LOAD_SECS", DEFAULT_SECS);
    let seed: u64 = env_or("REMOVEBGD_LOAD_SEED", DEFAULT_SEED);
    assert!(clients >= 3, "at least one ordinary, one poor and one bursting client");
    // One credit fewer than there are poor clients (see Client::run).
    let shop_credits = 1_000_000;
    let roles: Vec<Role> = (0..clients)
        .map(|i| match i {
            0 => Role::Burst,
            i if i % 10 == 5 || (clients < 10 && i == 1) => Role::Poor,
            _ => Role::Normal,
        })
        .collect();
    let poor_clients = roles.iter().filter(|r| **r == Role::Poor).count();
    let poor_credits = poor_clients as i64 - 1;

    // A daemon of our own (as Daemon::start, but keeping its log): account `shop` with plenty of
    // credits, account `poor` with a few.
    let args = [
        "--workers",
        "2",
        "--fetch-allow",
        "127.0.0.0/8",
        // The defaults, spelled out: per key, so each client has its own bucket.
        "--rate-limit",
        "10",
        "--rate-burst",
        "20",
    ];
    let mut d = Daemon {
        child: None,
        dir: tempfile::tempdir().unwrap(),
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        args: args.iter().map(|s| s.to_string()).collect(),
        client: client(),
    };
    d.admin(&["accounts", "create", "shop", "--credits", &shop_credits.to_string()]);
    d.admin(&["accounts", "create", "poor", "--credits", &poor_credits.to_string()]);
    let (child, addr, log) = spawn_serve(d.cmd());
    let pid = child.id();
    d.child = Some(child);
    d.addr = addr;
    let ready = Instant::now() + Duration::from_secs(60);
    while !matches!(d.client.get(d.url("/healthz")).send().await, Ok(r) if r.status() == StatusCode::OK) {
        assert!(Instant::now() < ready, "the daemon did not answer");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Keys: one per client. Client 0 bursts; every tenth (5, 15, ...) uses `poor`.
    let keys: Vec<String> = {
        let store = d.store();
        let scopes: Vec<String> = ALL_SCOPES.split(',').map(str::to_owned).collect();
        roles
            .iter()
            .map(|r| {
                let account = if *r == Role::Poor { "poor" } else { "shop" };
                store.create_key(account, &scopes, None, removebgd::clock::now()).unwrap().key
            })
            .collect()
    };

    let photos = small_photos();
    let fixtures = image_server().await;
    let photo_srv = photo_server(Arc::new(photos.clone())).await;
    let mut urls: Vec<String> = photos.iter().map(|(n, _)| format!("http://{photo_srv}/small/{n}")).collect();
    urls.push(format!("http://{fixtures}/img/chelsea.jpg"));
    let photo_sizes: Vec<String> = photos.iter().map(|(n, b)| format!("{n} {} KB", b.len() / 1024)).collect();

    // RSS once a second from now until the daemon has drained.
    let smaps_start = rss_breakdown(pid);
    let sampling = Arc::new(AtomicBool::new(true));
    let t0 = Instant::now();
    let sampler = {
        let sampling = Arc::clone(&sampling);
        tokio::spawn(async move {
            let mut samples: Vec<(f64, f64)> = Vec::new();
            let mut at_peak = Kinds::default();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while sampling.load(Ordering::Relaxed) {
                tick.tick().await;
                if let Some(kb) = rss_kb(pid) {
                    let mb = kb as f64 / 1024.0;
                    if samples.iter().all(|s| s.1 < mb) {
                        at_peak = rss_breakdown(pid);
                    }
                    samples.push((t0.elapsed().as_secs_f64(), mb));
                }
            }
            (samples, at_peak)
        })
    };

    let ctx = Arc::new(Ctx {
        base: format!("http://{addr}"),
        addr,
        urls,
        photos: photos.into_iter().map(|(_, b)| b).collect(),
        filler: Arc::new(vec![b'A'; 64 * 1024]),
        t0,
        end: t0 + Duration::from_secs(secs),
    });
    let handles: Vec<_> = roles
        .iter()
        .zip(keys)
        .enumerate()
        .map(|(i, (role, key))| tokio::spawn(Client::new(i, *role, key, seed, Arc::clone(&ctx)).run()))
        .collect();
    let mut done = Vec::new();
    for h in handles {
        done.push(h.await.expect("a client panicked"));
    }
    let clients_done = t0.elapsed();
    let smaps_loaded = rss_breakdown(pid);

    // Wait for the daemon to be idle: nothing in flight, nothing queued (memory and database).
    let idle_deadline = Instant::now() + Duration::from_secs(300);
    let final_metrics = loop {
        let text = d.metrics().await;
        let in_flight = metric(&text, "removebgd_jobs_in_flight");
        let queued = metric(&text, "removebgd_queue_depth");
        let open: i64 = {
            let db = rusqlite::Connection::open(d.data().join("removebgd.db")).unwrap();
            db.busy_timeout(Duration::from_secs(10)).unwrap();
            db.query_row("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')", [], |r| r.get(0))
                .unwrap()
        };
        if in_flight == Some(0.0) && queued == Some(0.0) && open == 0 {
            break text;
        }
        assert!(
            Instant::now() < idle_deadline,
            "not idle 300 s after the clients stopped: in flight {in_flight:?}, queued {queued:?}, open jobs {open}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let idle_at = t0.elapsed();
    let smaps_idle = rss_breakdown(pid);
    sampling.store(false, Ordering::Relaxed);
    let (rss, smaps_peak) = sampler.await.unwrap();
    // Optionally (bench/load.sh) wait for the daemon to hand back the big blocks it keeps for
    // reuse, which it does after a quiet spell (memory.rs): what is left is what it holds idle.
    let settle: u64 = env_or("REMOVEBGD_LOAD_SETTLE", 0);
    let settled = if settle > 0 {
        let deadline = Instant::now() + Duration::from_secs(settle);
        loop {
            let k = rss_breakdown(pid);
            if k.big < 1024 || Instant::now() >= deadline {
                break Some((t0.elapsed(), k, rss_kb(pid).unwrap_or(0) as f64 / 1024.0));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    } else {
        None
    };

    // ---- the ledger audit, straight from the database file
    let db = rusqlite::Connection::open(d.data().join("removebgd.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let one = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> i64 { db.query_row(sql, p, |r| r.get(0)).unwrap() };
    struct Audit {
        name: &'static str,
        total: i64,
        used: i64,
        reserved: i64,
        ledger_used: i64,
        ledger_reserved: i64,
        completed: i64,
        failed: i64,
        charges: i64,
        charged_jobs: i64,
        held: i64,
        seen: i64,
    }
    let mut audits = Vec::new();
    for (name, role_of) in [("shop", [Role::Normal, Role::Burst]), ("poor", [Role::Poor, Role::Poor])] {
        let (used, reserved) = d.credits(name);
        let id = one("SELECT id FROM accounts WHERE name = ?1", &[&name]);
        audits.push(Audit {
            name,
            total: one("SELECT credits_total FROM accounts WHERE id = ?1", &[&id]),
            used,
            reserved,
            ledger_used: one("SELECT COALESCE(SUM(used_delta), 0) FROM ledger WHERE account_id = ?1", &[&id]),
            ledger_reserved: one("SELECT COALESCE(SUM(reserved_delta), 0) FROM ledger WHERE account_id = ?1", &[&id]),
            completed: one("SELECT COUNT(*) FROM jobs WHERE account_id = ?1 AND status = 'completed'", &[&id]),
            failed: one("SELECT COUNT(*) FROM jobs WHERE account_id = ?1 AND status = 'failed'", &[&id]),
            charges: one("SELECT COUNT(*) FROM ledger WHERE account_id = ?1 AND kind = 'charge'", &[&id]),
            charged_jobs: one(
                "SELECT COUNT(DISTINCT job_id) FROM ledger WHERE account_id = ?1 AND kind = 'charge'",
                &[&id],
            ),
            held: one("SELECT COALESCE(SUM(reserved), 0) FROM jobs WHERE account_id = ?1", &[&id]),
            seen: done.iter().filter(|c| role_of.contains(&c.role)).map(|c| c.seen_ok).sum(),
        });
    }
    let unsettled = one(
        "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running') OR reserved != 0",
        &[],
    );
    let result_rows = one("SELECT COUNT(*) FROM results", &[]);
    let completed_jobs = one("SELECT COUNT(*) FROM jobs WHERE status = 'completed'", &[]);
    let failed_codes: Vec<(String, i64)> = db
        .prepare("SELECT COALESCE(error_code, ''), COUNT(*) FROM jobs WHERE status = 'failed' GROUP BY 1")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let integrity: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    let files = listing(&d.data().join("results"));
    let leftovers: Vec<&String> = files.iter().filter(|f| f.starts_with('.')).collect();

    // ---- the report
    let recs: Vec<&Rec> = done.iter().flat_map(|c| &c.recs).collect();
    let in_run = recs.iter().filter(|r| r.at < Duration::from_secs(secs)).count();
    let mut out = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "\n=== load: {clients} clients ({poor_clients} on account `poor` with {poor_credits} credits, 1 bursting past \
         its key's rate limit) for {secs} s; seed {seed:#x}; u2netp, --workers 2; RLIMIT_NOFILE {nofile}"
    );
    let _ = writeln!(out, "photos: {}; plus the fixture chelsea.jpg (451x300) by URL", photo_sizes.join(", "));
    let _ = writeln!(
        out,
        "{:<24} {:>6} {:>9} {:>9} {:>9}  statuses",
        "operation", "count", "p50 ms", "p99 ms", "max ms"
    );
    let mut ops: Vec<Op> = recs.iter().map(|r| r.op).collect();
    ops.sort();
    ops.dedup();
    for op in &ops {
        let these: Vec<&Rec> = recs.iter().copied().filter(|r| r.op == *op).collect();
        let mut ms: Vec<f64> = these.iter().map(|r| r.latency.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let _ = writeln!(
            out,
            "{:<24} {:>6} {:>9.0} {:>9.0} {:>9.0}  {}",
            op.name(),
            these.len(),
            percentile(&ms, 0.5),
            percentile(&ms, 0.99),
            ms.last().copied().unwrap_or(0.0),
            statuses(&these)
        );
    }
    let mut all_ms: Vec<f64> = recs.iter().map(|r| r.latency.as_secs_f64() * 1000.0).collect();
    all_ms.sort_by(f64::total_cmp);
    let _ = writeln!(
        out,
        "{:<24} {:>6} {:>9.0} {:>9.0} {:>9.0}  {}",
        "all",
        recs.len(),
        percentile(&all_ms, 0.5),
        percentile(&all_ms, 0.99),
        all_ms.last().copied().unwrap_or(0.0),
        statuses(&recs)
    );
    let images_ok: i64 = audits.iter().map(|a| a.seen).sum();
    let _ = writeln!(
        out,
        "requests: {} in {:.1} s until the last client finished ({:.1} req/s); {} sent within the {secs} s \
         ({:.1} req/s); images completed {images_ok} ({:.1}/s); daemon idle at {:.1} s",
        recs.len(),
        clients_done.as_secs_f64(),
        recs.len() as f64 / clients_done.as_secs_f64(),
        in_run,
        in_run as f64 / secs as f64,
        images_ok as f64 / clients_done.as_secs_f64(),
        idle_at.as_secs_f64()
    );
    let count = |f: &dyn Fn(&Rec) -> bool| recs.iter().filter(|r| f(r)).count();
    let _ = writeln!(
        out,
        "429s: bursting client {} of {}; batch polls {} of {}; ordinary clients' other requests {} of {}. \
         402s on `poor`: {}",
        count(&|r| r.role == Role::Burst && r.status == 429),
        count(&|r| r.role == Role::Burst),
        count(&|r| r.op == Op::BatchPoll && r.status == 429),
        count(&|r| r.op == Op::BatchPoll),
        count(&|r| r.role != Role::Burst && r.op != Op::BatchPoll && r.status == 429),
        count(&|r| r.role != Role::Burst && r.op != Op::BatchPoll),
        count(&|r| r.role == Role::Poor && r.status == 402),
    );
    let rss_mb: Vec<f64> = rss.iter().map(|s| s.1).collect();
    if !rss.is_empty() {
        let peak = rss_mb.iter().copied().fold(f64::MIN, f64::max);
        // Under load: from the start until the last client finished.
        let run: Vec<f64> = rss.iter().filter(|s| s.0 <= clients_done.as_secs_f64()).map(|s| s.1).collect();
        let third = (run.len() / 3).max(1);
        let (first, last) = (median(&run[..third.min(run.len())]), median(&run[run.len().saturating_sub(third)..]));
        let _ = writeln!(
            out,
            "daemon RSS MB: start {:.1}, peak {peak:.1}, end {:.1} (idle, at {:.0} s); under load (until the last \
             client finished): median of the first third {first:.1}, of the last third {last:.1}: slope {:+.1} MB \
             ({:+.1}%)",
            rss_mb[0],
            rss_mb[rss_mb.len() - 1],
            rss[rss.len() - 1].0,
            last - first,
            (last - first) / first * 100.0
        );
        let every10: Vec<String> = rss
            .iter()
            .filter(|s| (s.0.round() as u64).is_multiple_of(10))
            .map(|s| format!("{:.0}s {:.1}", s.0, s.1))
            .collect();
        let _ = writeln!(out, "daemon RSS every 10 s: {}", every10.join(" | "));
        let _ = writeln!(out, "daemon RSS each second: {}", sparkline(&rss_mb, 120));
        let _ = writeln!(
            out,
            "daemon RSS MB by kind: at the start {smaps_start}; at the peak {smaps_peak}; when the last client \
             finished {smaps_loaded}; idle {smaps_idle}"
        );
        if let Some((at, kinds, mb)) = settled {
            let _ = writeln!(
                out,
                "daemon RSS after its quiet-spell release: {mb:.1} MB at {:.0} s ({kinds})",
                at.as_secs_f64()
            );
        }
    }
    for a in &audits {
        let _ = writeln!(
            out,
            "ledger `{}`: credits_total {}, credits_used {} = ledger sum {} = completed jobs {} = images the \
             clients saw {}; charge rows {} for {} jobs; credits_reserved {} (ledger {}, jobs holding {}); \
             failed jobs {}",
            a.name,
            a.total,
            a.used,
            a.ledger_used,
            a.completed,
            a.seen,
            a.charges,
            a.charged_jobs,
            a.reserved,
            a.ledger_reserved,
            a.held,
            a.failed
        );
    }
    let _ = writeln!(
        out,
        "database: jobs queued/running/reserved {unsettled}; results rows {result_rows} for {completed_jobs} \
         completed jobs, {} files (hidden leftovers {}); failed jobs by code {failed_codes:?}; integrity_check {integrity}",
        files.len(),
        leftovers.len()
    );
    let _ = writeln!(
        out,
        "daemon: jobs_total completed {:?} failed {:?}; connections accepted {:?}, rejected {:?}/{:?} \
         (global/per address), closed by timeouts {:?}/{:?}/{:?} (header/body/idle); log lines {} \
         ({} WARN, {} ERROR)",
        metric(&final_metrics, "removebgd_jobs_total{outcome=\"completed\"}"),
        metric(&final_metrics, "removebgd_jobs_total{outcome=\"failed\"}"),
        metric(&final_metrics, "removebgd_http_connections_accepted_total"),
        metric(&final_metrics, "removebgd_http_connections_rejected_total{reason=\"global_limit\"}"),
        metric(&final_metrics, "removebgd_http_connections_rejected_total{reason=\"per_ip_limit\"}"),
        metric(&final_metrics, "removebgd_http_connections_closed_total{reason=\"header_timeout\"}"),
        metric(&final_metrics, "removebgd_http_connections_closed_total{reason=\"body_timeout\"}"),
        metric(&final_metrics, "removebgd_http_connections_closed_total{reason=\"idle_timeout\"}"),
        log.len(),
        log.lines().iter().filter(|l| l.contains(" WARN ")).count(),
        log.lines().iter().filter(|l| l.contains(" ERROR ")).count(),
    );
    let mean = |name: &str| {
        let sum = metric(&final_metrics, &format!("{name}_sum")).unwrap_or(0.0);
        let n = metric(&final_metrics, &format!("{name}_count")).unwrap_or(0.0);
        if n > 0.0 { sum / n * 1000.0 } else { 0.0 }
    };
    let _ = writeln!(
        out,
        "daemon: mean inference {:.0} ms, mean job (fetch, decode, inference, encode) {:.0} ms",
        mean("removebgd_inference_seconds"),
        mean("removebgd_job_duration_seconds")
    );
    let _ = writeln!(out, "wall time of this test: {:.1} s", wall.elapsed().as_secs_f64());
    println!("{out}");

    // ---- the assertions
    let failures: Vec<String> = recs
        .iter()
        .filter(|r| r.status == 0 || r.status >= 500 || !r.op.documented().contains(&r.status))
        .take(20)
        .map(|r| format!("{} at {:.1} s: {} {}", r.op.name(), r.at.as_secs_f64(), r.status, r.code))
        .collect();
    if !failures.is_empty() {
        for l in log.lines().iter().filter(|l| l.contains(" ERROR ")).take(20) {
            eprintln!("daemon: {l}");
        }
    }
    assert!(failures.is_empty(), "transport errors, 5xx or undocumented statuses:\n{}", failures.join("\n"));
    let anomalies: Vec<&String> = done.iter().flat_map(|c| &c.anomalies).take(20).collect();
    assert!(anomalies.is_empty(), "{anomalies:#?}");
    for a in &audits {
        assert_eq!(a.used, a.ledger_used, "`{}`: credits_used vs the ledger", a.name);
        assert_eq!(a.used, a.completed, "`{}`: credits_used vs completed jobs", a.name);
        assert_eq!(a.completed, a.seen, "`{}`: completed jobs vs the successes the clients saw", a.name);
        assert_eq!((a.charges, a.charged_jobs), (a.completed, a.completed), "`{}`: one charge per job", a.name);
        assert_eq!((a.reserved, a.ledger_reserved, a.held), (0, 0, 0), "`{}`: a reservation left over", a.name);
        assert!(a.used <= a.total, "`{}` overspent", a.name);
    }
    assert_eq!(unsettled, 0, "jobs left queued, running or holding a credit");
    assert_eq!(result_rows, completed_jobs, "a result row per completed job (nothing expired or was evicted)");
    assert_eq!(files.len() as i64, result_rows, "a file per result row: {leftovers:?}");
    assert_eq!(integrity, "ok");
    // What the mix is for: the last credits of `poor` were contended, and the limiter answered.
    assert!(count(&|r| r.role == Role::Poor && r.status == 402) > 0, "`poor` never ran out of credits");
    assert!(count(&|r| r.role == Role::Burst && r.status == 429) > 0, "the bursting client never got a 429");
}
