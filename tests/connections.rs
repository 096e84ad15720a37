//! Connection hygiene against a real `removebgd serve` on loopback: a slowloris of thousands of
//! half-sent request heads, the per-address and global connection caps, slow request bodies,
//! and idle keep-alive connections. Attackers connect from 127.0.0.2/127.0.0.3 (all of
//! 127.0.0.0/8 is this host), well-behaved clients from 127.0.0.1.

mod common;
mod daemon;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use daemon::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A value from the /metrics text, e.g. `removebgd_http_connections_open`.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

/// Polls `/metrics` until `series` reaches `want` (a generous deadline, not a timing claim).
async fn wait_metric(d: &Daemon, series: &str, want: u64, within: Duration) -> String {
    wait_until(d, series, |v| v == want, within).await
}

async fn wait_until(d: &Daemon, series: &str, ok: impl Fn(u64) -> bool, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let text = d.metrics().await;
        if ok(metric(&text, series)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {} after {within:?}",
            metric(&text, series)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Raises this process's descriptor limit towards `want` (children inherit it); returns what it
/// is now.
fn raise_nofile(want: u64) -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    let target = want.min(r.rlim_max as u64);
    if (r.rlim_cur as u64) < target {
        r.rlim_cur = target as libc::rlim_t;
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) }, 0);
    }
    target.max(r.rlim_cur as u64)
}

/// Connects from `from` (port chosen by the kernel).
async fn connect_from(from: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((from, 0)))?;
    s.connect(to).await
}

/// What happened to a connection that sent half a request head.
struct Attack {
    /// From its first byte sent to the server closing it.
    closed_after: Duration,
    /// What the server sent before closing (empty for a header timeout, a 503 for a refusal).
    answer: Vec<u8>,
}

/// Opens `n` connections from `from` in waves of 200 (so the accept queue never overflows),
/// each sending half a request head, and returns a handle to each one's fate.
async fn slowloris(from: [u8; 4], to: SocketAddr, n: usize) -> Vec<tokio::task::JoinHandle<Attack>> {
    let mut handles = Vec::with_capacity(n);
    for wave in (0..n).collect::<Vec<_>>().chunks(200) {
        let mut opened = Vec::new();
        for _ in wave {
            opened.push(tokio::spawn(async move {
                let mut c = connect_from(from, to).await.expect("connect");
                let sent = Instant::now();
                // No blank line: the head never ends.
                let _ = c.write_all(b"GET /v1/removebg/quota HTTP/1.1\r\nHost: x\r\n").await;
                (c, sent)
            }));
        }
        for o in opened {
            let (mut c, sent) = o.await.unwrap();
            handles.push(tokio::spawn(async move {
                let mut answer = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    match tokio::time::timeout(Duration::from_secs(60), c.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(k)) => answer.extend_from_slice(&buf[..k]),
                        Err(_) => panic!("a half-open connection was still open after 60 s"),
                    }
                }
                Attack {
                    closed_after: sent.elapsed(),
                    answer,
                }
            }));
        }
    }
    handles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slowloris_of_5000_half_open_connections_is_closed_by_the_header_timeout_and_others_are_served() {
    // Both ends hold a descriptor per connection; the daemon inherits the raised limit.
    let limit = raise_nofile(20_000);
    let n = 5000.min(limit.saturating_sub(600) as usize);
    if n < 5000 {
        removebgd::test_note(&format!("the descriptor limit is {limit}: the slowloris used {n} connections, not 5000"));
    }
    // The default header timeout (10 s); caps out of the way so every attacker is admitted.
    let d = Daemon::start(10, &["--max-connections", "8000", "--max-connections-per-ip", "0"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let header_timeout = Duration::from_secs(10);

    let attacks = slowloris([127, 0, 0, 2], d.addr, n).await;
    // Every attacker is held open now (none has reached its timeout yet: they are closed only
    // by the server, which we see in each task).
    let text = wait_until(&d, "removebgd_http_connections_accepted_total", |v| v > n as u64, header_timeout).await;
    assert!(metric(&text, "removebgd_http_connections_open") > n as u64 / 2);

    // A well-behaved client, on new connections each time, is answered while they are held.
    for _ in 0..5 {
        let c = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let r = c.get(d.url("/v1/removebg/quota")).bearer_auth(&key).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let (_, _, v) = split(r).await;
        assert_eq!(v["credits_remaining"], 10);
    }
    let during = d.metrics().await;
    let still_open = metric(&during, "removebgd_http_connections_open");
    let timed_out = metric(&during, "removebgd_http_connections_closed_total{reason=\"header_timeout\"}");

    let mut slowest = Duration::ZERO;
    for a in attacks {
        let a = a.await.unwrap();
        assert!(a.answer.is_empty(), "a header timeout closes without an answer: {:?}", String::from_utf8_lossy(&a.answer));
        slowest = slowest.max(a.closed_after);
        // The timer starts at accept, before the attacker's first byte; 10 s of slack for a
        // loaded machine.
        assert!(
            a.closed_after <= header_timeout + Duration::from_secs(10),
            "closed only after {:?}",
            a.closed_after
        );
    }
    wait_metric(&d, "removebgd_http_connections_closed_total{reason=\"header_timeout\"}", n as u64, Duration::from_secs(10)).await;
    // Then only the /metrics request's own connection is open (closed ones are counted as the
    // server notices them).
    wait_metric(&d, "removebgd_http_connections_open", 1, Duration::from_secs(10)).await;
    eprintln!(
        "slowloris: {n} half-open connections; good requests answered while {still_open} were open and \
         {timed_out} had timed out; the last closed {slowest:?} after its first byte (header timeout {header_timeout:?})"
    );
    assert!(still_open > n as u64 / 2, "the good client was served during the attack");
    assert_eq!(d.credits("shop"), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_more_than_its_share_of_connections() {
    raise_nofile(4096);
    let d = Daemon::start(10, &["--max-connections-per-ip", "50", "--header-timeout", "4s", "--keepalive-timeout", "2s"]).await;
    let key = d.key("shop", ALL_SCOPES);
    let attacks = slowloris([127, 0, 0, 2], d.addr, 300).await;
    // The refused 250 were answered at once: count them as they finish.
    let text = wait_metric(&d, "removebgd_http_connections_rejected_total{reason=\"per_ip_limit\"}", 250, Duration::from_secs(20)).await;
    assert_eq!(metric(&text, "removebgd_http_connections_rejected_total{reason=\"global_limit\"}"), 0);

    // 127.0.0.1 has its own 50.
    let (status, _, v) = d.get("/v1/removebg/quota", &key).await;
    assert_eq!(status, StatusCode::OK, "{v}");

    let (mut refused, mut held) = (0, 0);
    for a in attacks {
        let a = a.await.unwrap();
        if a.answer.is_empty() {
            held += 1;
        } else {
            let text = String::from_utf8_lossy(&a.answer);
            assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
            assert!(text.contains("retry-after: 1"), "{text}");
            let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "too_many_connections");
            refused += 1;
        }
    }
    // A refused client may see its connection reset before it reads the 503 (its request bytes
    // were unread); the server's own count is exact.
    assert!(refused > 200 && refused + held == 300, "refused {refused}, held {held}");
    wait_metric(&d, "removebgd_http_connections_closed_total{reason=\"header_timeout\"}", 50, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_global_cap_new_connections_get_503_at_once_and_service_resumes() {
    // No keep-alive: the test's own requests leave no connection open to take a slot.
    let args = ["--max-connections", "100", "--max-connections-per-ip", "0", "--header-timeout", "3s", "--keepalive-timeout", "0s"];
    let d = Daemon::start(10, &args).await;
    let key = d.key("shop", ALL_SCOPES);
    // 110 attackers: the cap fills with them, 10 or so are refused.
    let attacks = slowloris([127, 0, 0, 3], d.addr, 110).await;
    // The cap is full: a new connection is answered 503 with the documented JSON and closed at
    // once, before it sends anything: it is not queued.
    let mut raw = TcpStream::connect(d.addr).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_string(&mut answer))
        .await
        .expect("refused at once, not queued")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    let v: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "too_many_connections");
    // An HTTP client that writes its request first sees the 503 or the closed connection.
    let c = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    match c.get(d.url("/v1/removebg/quota")).bearer_auth(&key).send().await {
        Ok(r) => assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE),
        Err(e) => assert!(e.is_request() || e.is_connect(), "{e}"),
    }
    let mut held = 0;
    for a in attacks {
        held += usize::from(a.await.unwrap().answer.is_empty());
    }
    assert!((99..=100).contains(&held), "{held} attackers held the 100 slots");
    // They all timed out: the client gets in again.
    let r = c.get(d.url("/v1/removebg/quota")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = d.metrics().await;
    assert!(metric(&text, "removebgd_http_connections_rejected_total{reason=\"global_limit\"}") >= 11);
    assert_eq!(metric(&text, "removebgd_http_connections_limit{scope=\"global\"}"), 100);
}

/// Sends a head, then the body in `chunk`-byte pieces every `every`; returns the raw answer.
async fn trickle(addr: SocketAddr, head: &str, body: &[u8], chunk: usize, every: Duration) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(head.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = c.into_split();
    let body = body.to_vec();
    let writer = tokio::spawn(async move {
        for piece in body.chunks(chunk) {
            if wr.write_all(piece).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
        // Dropping the write half would half-close the socket, which the server takes as the
        // client leaving: keep it until the answer is in.
        std::future::pending::<()>().await;
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), rd.read_to_end(&mut answer)).await;
    writer.abort();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_slower_than_the_minimum_rate_gets_408_and_a_slow_steady_upload_finishes() {
    let d = Daemon::start(10, &["--body-timeout", "1s", "--body-min-rate-kb", "1"]).await;
    let key = d.key("shop", ALL_SCOPES);
    // A 96x96 photo-like JPEG: about 12 kB of base64.
    let body = serde_json::json!({ "image_base64": b64(&common::noise_jpeg(96, 96)) }).to_string();
    let head = |len: usize| {
        format!(
            "POST /v1/removebg/process HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        )
    };

    // 20 bytes every 100 ms is 200 B/s: far below 1 kB/s once the 1 s grace is over.
    let answer = trickle(d.addr, &head(body.len()), body.as_bytes(), 20, Duration::from_millis(100)).await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    let json: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(json["error"]["code"], "request_timeout", "{json}");
    assert_eq!(d.credits("shop"), (0, 0), "nothing charged");
    let text = d.metrics().await;
    assert_eq!(metric(&text, "removebgd_http_connections_closed_total{reason=\"body_timeout\"}"), 1);

    // The same body at about 4x the minimum rate takes several times the grace and succeeds.
    let started = Instant::now();
    let answer = trickle(d.addr, &head(body.len()), body.as_bytes(), 1200, Duration::from_millis(300)).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{}", &answer[..answer.len().min(400)]);
    assert!(started.elapsed() > Duration::from_secs(2), "the upload outlasted the grace");
    assert_eq!(d.credits("shop"), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout() {
    let d = Daemon::start(10, &["--keepalive-timeout", "1s", "--header-timeout", "5s"]).await;
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    let get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    // Two requests on one connection: keep-alive works.
    for _ in 0..2 {
        c.write_all(get).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !got.ends_with(b"ok\n") {
            let k = c.read(&mut buf).await.unwrap();
            assert!(k > 0, "closed while a request was answered");
            got.extend_from_slice(&buf[..k]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200 "));
    }
    // Then it sits idle and the server closes it, long before the header timeout.
    let idle = Instant::now();
    let mut buf = [0u8; 16];
    let k = tokio::time::timeout(Duration::from_secs(30), c.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(k, 0, "closed without another answer");
    let waited = idle.elapsed();
    // On a new connection: the client's pooled one was just closed the same way.
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let text = fresh.get(d.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metric(&text, "removebgd_http_connections_closed_total{reason=\"idle_timeout\"}") >= 1);
    assert!(waited < Duration::from_secs(5), "closed by the idle timeout, not the header timeout ({waited:?})");
}

#[test]
fn the_connection_settings_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for (args, says) in [
        (vec!["--keepalive-timeout", "20s"], "keepalive_timeout"),
        (vec!["--header-timeout", "0s"], "header_timeout"),
        (vec!["--max-connections", "0"], "max_connections"),
        (vec!["--body-min-rate-kb", "0"], "body_min_rate_kb"),
    ] {
        let out = serve_cmd(dir.path()).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_declared_too_large_and_a_batch_submission_do_not_wait_for_a_photo_upload_slot() {
    let d = Daemon::start(10, &[]).await;
    let key = d.key("shop", ALL_SCOPES);
    // Eight uploads hold every upload slot while their bodies arrive.
    let body = serde_json::json!({ "image_base64": b64(&common::noise_jpeg(64, 48)) }).to_string();
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(HeldUpload::start(&d, &key, body.as_bytes()).await);
    }
    wait_until(&d, "removebgd_http_requests_in_flight", |v| v >= 8, Duration::from_secs(30)).await;
    // A ninth waits for a slot, but one that declares 16 MiB is answered now.
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    let head = format!(
        "POST /v1/removebg/process HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        16 << 20
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let k = tokio::time::timeout(Duration::from_secs(30), c.read(&mut answer)).await.expect("answered while the slots are held").unwrap();
    let answer = String::from_utf8_lossy(&answer[..k]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    // Batch bodies (at most 1 MiB) have slots of their own.
    let batch = serde_json::json!({"images": [{"url": "http://127.0.0.1:9/a.jpg"}]});
    let (s, _, v) = tokio::time::timeout(Duration::from_secs(30), d.post_json("/v1/removebg/batch", &key, &batch))
        .await
        .expect("a batch submission is answered while the photo upload slots are held");
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    for h in held {
        assert!(h.finish().await.starts_with("HTTP/1.1 200 "));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.credits("shop") != (8, 0) {
        assert!(Instant::now() < deadline, "the batch item never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An answer given before the body is read (a declared size over the limit) reaches a client
/// that is still uploading: the connection is not reset under it. Both a raw client that writes
/// its whole body before reading and reqwest see the documented 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_uploading_receives_the_early_413_instead_of_a_reset() {
    let d = Daemon::start(10, &[]).await;
    let key = d.key("shop", ALL_SCOPES);
    // 24 MiB: far more than the kernel's socket buffers hold, so without a lingering close
    // the server's close resets the connection while the client is still writing.
    let body = vec![b' '; 24 << 20];
    for path in ["/v1/removebg/batch", "/v1/removebg/process"] {
        let mut tcp = TcpStream::connect(d.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        tcp.write_all(&body).await.unwrap_or_else(|e| panic!("{path}: the upload was cut off: {e}"));
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut answer))
            .await
            .expect("closed after the body")
            .unwrap_or_else(|e| panic!("{path}: the answer was lost: {e}"));
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413 "), "{path}: {answer}");
        assert!(answer.contains("payload_too_large"), "{answer}");
        // The connection cannot carry another request: the client is told so.
        assert!(answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{answer}");

        let r = d
            .client
            .post(d.url(path))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: reqwest saw {e:?}"));
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE, "{path}");
    }
    assert_eq!(d.credits("shop"), (0, 0));
}
