//! The HTTP accept loop, with the connection hygiene `axum::serve` lacks. `axum::serve` takes no
//! settings: a client that sends half a request head and then nothing holds its connection (and
//! a file descriptor) forever, idle keep-alive connections are never closed, and there is no cap,
//! so one LAN client could take every descriptor the unit allows. Here, per connection:
//! - **Header timeout** (hyper's): a fixed deadline from accept, and again from the end of each
//!   response, to the end of the next request head. Trickling bytes does not extend it. On
//!   expiry the socket is closed (hyper sends no 408).
//! - **Keep-alive timeout**: a connection with no request in the router and no byte moved either
//!   way for `keepalive_timeout` is closed.
//! - **Caps** on open connections, in all and per client address. Over a cap the connection is
//!   accepted, answered `503` without waiting, and closed: the kernel's accept queue never fills
//!   with connections nobody will serve, so well-behaved clients are not queued behind them.
//!
//! Slow request bodies are bounded where bodies are read (`read_body` in `http/mod.rs`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::metrics;

/// Connection settings (see `ServeArgs` for their defaults).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    /// Zero: every connection closes after one request.
    pub keepalive_timeout: Duration,
    pub max_connections: usize,
    /// Zero: no per-address cap (behind a reverse proxy every client has the proxy's address).
    pub max_per_ip: usize,
}

/// Request heads (line and headers) larger than this get 431: our routes need small heads, and
/// it bounds the memory a stalled connection can pin.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The listen backlog (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: u32 = 1024;

/// Counters for `/metrics` (no per-address labels: their number would be unbounded).
#[derive(Debug, Default)]
pub struct ConnMetrics {
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected_global: AtomicU64,
    pub rejected_per_ip: AtomicU64,
    pub header_timeouts: AtomicU64,
    pub idle_timeouts: AtomicU64,
    /// Counted by `read_body`.
    pub body_timeouts: AtomicU64,
    pub accept_errors: AtomicU64,
}

impl ConnMetrics {
    pub fn render(&self, out: &mut String, limits: &ConnLimits) {
        let get = |a: &AtomicU64| a.load(Relaxed);
        metrics::single(
            out,
            "removebgd_http_connections_open",
            "gauge",
            "HTTP connections open now.",
            get(&self.open),
        );
        metrics::header(
            out,
            "removebgd_http_connections_limit",
            "gauge",
            "Most HTTP connections open at once, in all and per client address (0: no cap).",
        );
        let _ = writeln!(out, "removebgd_http_connections_limit{{scope=\"global\"}} {}", limits.max_connections);
        let _ = writeln!(out, "removebgd_http_connections_limit{{scope=\"per_ip\"}} {}", limits.max_per_ip);
        metrics::single(
            out,
            "removebgd_http_connections_accepted_total",
            "counter",
            "HTTP connections accepted and served.",
            get(&self.accepted),
        );
        metrics::header(
            out,
            "removebgd_http_connections_rejected_total",
            "counter",
            "HTTP connections refused with 503 because a connection cap was reached.",
        );
        let _ = writeln!(
            out,
            "removebgd_http_connections_rejected_total{{reason=\"global_limit\"}} {}",
            get(&self.rejected_global)
        );
        let _ = writeln!(
            out,
            "removebgd_http_connections_rejected_total{{reason=\"per_ip_limit\"}} {}",
            get(&self.rejected_per_ip)
        );
        metrics::header(
            out,
            "removebgd_http_connections_closed_total",
            "counter",
            "HTTP connections closed by a timeout: the request head or body came too slowly, or the connection sat idle.",
        );
        for (reason, n) in [
            ("header_timeout", &self.header_timeouts),
            ("body_timeout", &self.body_timeouts),
            ("idle_timeout", &self.idle_timeouts),
        ] {
            let _ = writeln!(out, "removebgd_http_connections_closed_total{{reason=\"{reason}\"}} {}", get(n));
        }
        metrics::single(
            out,
            "removebgd_http_accept_errors_total",
            "counter",
            "Failed accepts (e.g. out of file descriptors).",
            get(&self.accept_errors),
        );
    }
}

/// Listens with a backlog of [`BACKLOG`] (tokio's `bind` uses 128).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves `router` on `listener` until `stop` is cancelled, then stops accepting, lets each
/// connection finish the request it is in, and returns when every connection has closed.
pub async fn serve(listener: TcpListener, router: Router, limits: ConnLimits, stats: Arc<ConnMetrics>, stop: CancellationToken) {
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        .keep_alive(!limits.keepalive_timeout.is_zero());
    let global = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_ip = Arc::new(PerIp {
        max: limits.max_per_ip,
        open: Mutex::default(),
    });
    let tasks = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                // The peer gave up between its handshake and our accept: nothing to do.
                Err(e) if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
                ) => continue,
                // Out of descriptors or buffers: the connection stays in the kernel's queue; back
                // off briefly so this loop does not spin.
                Err(e) => {
                    if stats.accept_errors.fetch_add(1, Relaxed) % 100 == 0 {
                        tracing::error!(error = %e, "accepting a connection failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = global.clone().try_acquire_owned() else {
            stats.rejected_global.fetch_add(1, Relaxed);
            refuse(tcp, "the server has too many connections open");
            continue;
        };
        let Some(ip_slot) = per_ip.enter(peer.ip().to_canonical()) else {
            stats.rejected_per_ip.fetch_add(1, Relaxed);
            refuse(tcp, "too many connections from your address");
            continue;
        };
        stats.accepted.fetch_add(1, Relaxed);
        let _ = tcp.set_nodelay(true);
        let (h1, router, stop, stats) = (h1.clone(), router.clone(), stop.clone(), stats.clone());
        tasks.spawn(async move {
            let _open = Open::new(&stats);
            let _held = (slot, ip_slot);
            connection(tcp, h1, router, limits.keepalive_timeout, &stats, stop).await;
        });
    }
    // New connections are refused from here on.
    drop(listener);
    tasks.close();
    tasks.wait().await;
}

/// Serves one connection until it ends, closing it when it sits idle.
async fn connection(
    tcp: TcpStream,
    h1: http1::Builder,
    router: Router,
    keepalive: Duration,
    stats: &ConnMetrics,
    stop: CancellationToken,
) {
    let activity = Arc::new(Activity::new());
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let busy = Busy::enter(&activity);
            let activity = activity.clone();
            let router = router.clone();
            // Boxed so that the connection can be polled without shutting the socket down.
            Box::pin(async move {
                let read = Arc::new(AtomicBool::new(false));
                let (parts, incoming) = req.into_parts();
                if hyper::body::Body::is_end_stream(&incoming) {
                    read.store(true, Relaxed);
                }
                let watched = WatchedBody {
                    inner: incoming,
                    read: read.clone(),
                };
                let mut res = router.oneshot(hyper::Request::from_parts(parts, Body::new(watched))).await;
                if let Ok(r) = &mut res {
                    activity.too_slow.store(r.status() == axum::http::StatusCode::REQUEST_TIMEOUT, Relaxed);
                    // Answered before the whole body was read (a declared size over the limit,
                    // a slow body): the connection cannot carry another request, so the client
                    // is told not to reuse it.
                    if !read.load(Relaxed) {
                        r.headers_mut()
                            .insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
                    }
                }
                drop(busy);
                res
            })
        })
    };
    let io = TokioIo::new(Tracked {
        inner: tcp,
        activity: activity.clone(),
    });
    let mut conn = h1.serve_connection(io, service);
    let mut closing = false;
    let mut idle_closed = false;
    // Without keep-alive hyper closes after each response; nothing to watch.
    let watch = !keepalive.is_zero();
    let ended = loop {
        tokio::select! {
            ended = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break ended,
            _ = stop.cancelled(), if !closing => {
                // Idle connections close now; one in a request closes after its response.
                closing = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
            _ = tokio::time::sleep(activity.until_idle(keepalive)), if watch && !closing => {
                if activity.idle_for() >= keepalive {
                    // Closes at once when between requests. A request head still arriving is
                    // left to the header timeout, which ends the connection by itself.
                    closing = true;
                    idle_closed = true;
                    Pin::new(&mut conn).graceful_shutdown();
                }
            }
        }
    };
    match ended {
        Err(e) if e.is_timeout() => {
            stats.header_timeouts.fetch_add(1, Relaxed);
        }
        _ if idle_closed => {
            stats.idle_timeouts.fetch_add(1, Relaxed);
        }
        _ if activity.too_slow.load(Relaxed) => {}
        _ => linger(conn.into_parts().io.into_inner().inner, &stop).await,
    }
}

/// How long a closing connection keeps reading (and discarding) what the client still sends.
const LINGER_TOTAL: Duration = Duration::from_secs(30);
/// ... and how long it waits for the next bytes.
const LINGER_QUIET: Duration = Duration::from_secs(5);

/// Closes a connection the way nginx's lingering close does. An answer given before the request
/// body was read (413 for a declared size, 401, 400) is written, the sending side is shut, and
/// the rest of the body is read and thrown away until the client closes, goes quiet for
/// [`LINGER_QUIET`], or [`LINGER_TOTAL`] passes. Closing at once would make the kernel reset the
/// connection while the client is still uploading, and most clients then report a broken pipe
/// instead of the answer.
async fn linger(mut tcp: TcpStream, stop: &CancellationToken) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    if tcp.shutdown().await.is_err() {
        return;
    }
    let until = tokio::time::Instant::now() + LINGER_TOTAL;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let next = (tokio::time::Instant::now() + LINGER_QUIET).min(until);
        tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout_at(next, tcp.read(&mut buf)) => match r {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            },
        }
    }
}

/// Over a cap: answer without waiting for anything, then close (dropping the stream).
fn refuse(tcp: TcpStream, why: &str) {
    let body = format!(
        r#"{{"error":{{"status":503,"code":"too_many_connections","message":"{why}; retry shortly"}}}}"#
    );
    let res = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // A full send buffer on a brand-new socket cannot happen; if the write fails the client
    // sees the close instead.
    let _ = tcp.try_write(res.as_bytes());
}

/// Open connections per client address.
struct PerIp {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in [`PerIp`], given back when dropped.
struct IpSlot(Option<(Arc<PerIp>, IpAddr)>);

impl PerIp {
    fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        if self.max == 0 {
            return Some(IpSlot(None));
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot(Some((self.clone(), ip))))
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some((per_ip, ip)) = self.0.take() {
            let mut open = per_ip.open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = open.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&ip);
                }
            }
        }
    }
}

/// Keeps `connections_open` right however the connection task ends.
struct Open<'a>(&'a ConnMetrics);

impl<'a> Open<'a> {
    fn new(stats: &'a ConnMetrics) -> Open<'a> {
        stats.open.fetch_add(1, Relaxed);
        Open(stats)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

/// When a connection last moved a byte, and how many of its requests are in the router.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
    /// The last answer was 408: the client is too slow to be waited for when closing.
    too_slow: AtomicBool,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            too_slow: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    /// How long nothing has happened (zero while a request is being handled).
    fn idle_for(&self) -> Duration {
        if self.busy.load(Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// When to look again: when the connection would have been idle for `limit`.
    fn until_idle(&self, limit: Duration) -> Duration {
        limit.saturating_sub(self.idle_for()).max(Duration::from_millis(10))
    }
}

/// A request inside the router: the connection is not idle, however long that takes.
struct Busy(Arc<Activity>);

impl Busy {
    fn enter(activity: &Arc<Activity>) -> Busy {
        activity.busy.fetch_add(1, Relaxed);
        Busy(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Relaxed);
    }
}

/// A request body that notes when it has been read to its end.
struct WatchedBody {
    inner: Incoming,
    read: Arc<AtomicBool>,
}

impl hyper::body::Body for WatchedBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) || hyper::body::Body::is_end_stream(&self.inner) {
            self.read.store(true, Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        hyper::body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::Body::size_hint(&self.inner)
    }
}

/// The socket, noting activity whenever bytes move.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_slots_are_counted_and_given_back() {
        let per_ip = Arc::new(PerIp {
            max: 2,
            open: Mutex::default(),
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = per_ip.enter(a).unwrap();
        let _second = per_ip.enter(a).unwrap();
        assert!(per_ip.enter(a).is_none(), "a third from the same address is over the cap");
        let _other = per_ip.enter(b).expect("another address has its own count");
        drop(first);
        let _again = per_ip.enter(a).expect("a closed connection gives its slot back");
        assert!(per_ip.enter(a).is_none());
    }

    #[test]
    fn an_ipv4_mapped_address_counts_as_the_ipv4_address() {
        let per_ip = Arc::new(PerIp {
            max: 1,
            open: Mutex::default(),
        });
        let v4: IpAddr = "192.168.1.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.168.1.7".parse().unwrap();
        let _slot = per_ip.enter(v4).unwrap();
        assert!(per_ip.enter(mapped.to_canonical()).is_none());
    }

    #[test]
    fn no_cap_means_no_count() {
        let per_ip = Arc::new(PerIp {
            max: 0,
            open: Mutex::default(),
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let slots: Vec<_> = (0..1000).map(|_| per_ip.enter(ip).unwrap()).collect();
        assert_eq!(slots.len(), 1000);
        assert!(per_ip.open.lock().unwrap().is_empty());
    }

    #[test]
    fn a_request_in_the_router_is_never_idle() {
        let activity = Arc::new(Activity::new());
        let busy = Busy::enter(&activity);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(activity.idle_for(), Duration::ZERO);
        drop(busy);
        assert!(activity.idle_for() < Duration::from_millis(20), "leaving the router counts as activity");
        std::thread::sleep(Duration::from_millis(20));
        assert!(activity.idle_for() >= Duration::from_millis(20));
    }
}
