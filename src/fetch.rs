//! Fetching images from user-supplied URLs (the REST API's `image_url` and batch `url`) without
//! letting a request turn the daemon into a proxy into its own host or network.
//!
//! Every address a fetch connects to passes a [`FetchPolicy`]: hostnames through a resolver that
//! drops refused addresses, IP-literal hosts (which reqwest connects to without resolving) before
//! the request and on every redirect hop. Size, time and redirect limits bound what one URL costs,
//! and only JPEG, PNG and WebP bodies are handed back.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Once};
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url, redirect};
use tracing::debug;

const USER_AGENT: &str = concat!("removebgd/", env!("CARGO_PKG_VERSION"));

/// An IPv4 or IPv6 network such as `10.0.0.0/8` or `fd00::/8`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            prefix,
        }
    }

    const fn v6(addr: Ipv6Addr, prefix: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V6(addr),
            prefix,
        }
    }

    /// Host bits are cleared, and a range of IPv4-mapped or -compatible IPv6 addresses becomes the
    /// IPv4 range it stands for, but only when every address in it is one: `::2/96` is `::/96`,
    /// which holds IPv6's own `::` and `::1`, and stays an IPv6 range rather than all of IPv4.
    fn new(addr: IpAddr, prefix: u8) -> Cidr {
        match addr {
            IpAddr::V4(v4) => Cidr::v4_masked(v4, prefix),
            IpAddr::V6(v6) => {
                let network = Ipv6Addr::from(u128::from(v6) & mask_v6(prefix));
                match canonical(IpAddr::V6(network)) {
                    IpAddr::V4(v4) if prefix >= 96 => Cidr::v4_masked(v4, prefix - 96),
                    _ => Cidr::v6(network, prefix),
                }
            }
        }
    }

    fn v4_masked(addr: Ipv4Addr, prefix: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::from(u32::from(addr) & mask_v4(prefix))),
            prefix,
        }
    }

    /// Whether `ip` is in this network; IPv4-mapped IPv6 addresses count as the IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => (u32::from(net) ^ u32::from(ip)) & mask_v4(self.prefix) == 0,
            (IpAddr::V6(net), IpAddr::V6(ip)) => (u128::from(net) ^ u128::from(ip)) & mask_v6(self.prefix) == 0,
            _ => false,
        }
    }
}

fn mask_v4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = ParseCidrError;

    fn from_str(s: &str) -> Result<Cidr, ParseCidrError> {
        let invalid = || ParseCidrError(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| invalid())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // u8's parser would also take "+8".
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse().ok().filter(|&p| p <= max).ok_or_else(invalid)?
            }
            Some(_) => return Err(invalid()),
        };
        Ok(Cidr::new(addr, prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address range {0:?}: expected an address or a CIDR range like 10.0.0.0/8, 192.168.1.20 or fd00::/8")]
pub struct ParseCidrError(String);

/// The IPv4 address behind an IPv4-mapped (`::ffff:a.b.c.d`) or IPv4-compatible (`::a.b.c.d`)
/// IPv6 address, so that IPv4 rules apply to it; other addresses are returned as they are.
fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let bits = u128::from(v6);
    // `::` and `::1` are IPv6's own unspecified and loopback addresses, not IPv4-compatible ones.
    if bits >> 32 == 0 && bits > 1 {
        return IpAddr::V4(Ipv4Addr::from(bits as u32));
    }
    ip
}

/// The IPv4 addresses an IPv6 address may carry to a translator: NAT64's well-known prefix
/// (`64:ff9b::/96`, the last 32 bits), 6to4 (`2002::/16`, bits 16-47) and NAT64's local-use
/// prefix (`64:ff9b:1::/48`, RFC 8215). A local-use network picks its own prefix length, /48 to
/// /96, and RFC 6052 places the IPv4 address differently for each (skipping bits 64-71), so every
/// placement the address fits counts.
fn translated_v4(ip: IpAddr) -> Vec<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return Vec::new() };
    let (s, o) = (v6.segments(), v6.octets());
    let at = |i: [usize; 4]| Ipv4Addr::new(o[i[0]], o[i[1]], o[i[2]], o[i[3]]);
    if u128::from(v6) >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
        return vec![at([12, 13, 14, 15])];
    }
    if (s[0], s[1], s[2]) == (0x64, 0xff9b, 1) {
        // RFC 6052 section 2.2: for /48, /56 and /64 the u-octet (byte 8) and the suffix after
        // the IPv4 address are zero, so only placements that leave them zero count; /96 always
        // does. A placement in 0.0.0.0/8 is the zero remainder of another one (`...:a00:0` is
        // 10.0.0.0 at /96, not 0.0.0.10 at /64), and no destination.
        let zero = |bytes: std::ops::Range<usize>| o[bytes].iter().all(|&b| b == 0);
        let placements = [
            (o[8] == 0 && zero(11..16), [6, 7, 9, 10]),
            (o[8] == 0 && zero(12..16), [7, 9, 10, 11]),
            (o[8] == 0 && zero(13..16), [9, 10, 11, 12]),
            (true, [12, 13, 14, 15]),
        ];
        return placements
            .into_iter()
            .filter(|&(fits, _)| fits)
            .map(|(_, bytes)| at(bytes))
            .filter(|v4| v4.octets()[0] != 0)
            .collect();
    }
    if s[0] == 0x2002 {
        return vec![at([2, 3, 4, 5])];
    }
    Vec::new()
}

/// Why the policy refuses an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Loopback,
    Unspecified,
    LinkLocal,
    Multicast,
    Broadcast,
    OwnAddress,
    Denied(Cidr),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Loopback => f.write_str("loopback"),
            Refusal::Unspecified => f.write_str("unspecified address"),
            Refusal::LinkLocal => f.write_str("link-local"),
            Refusal::Multicast => f.write_str("multicast"),
            Refusal::Broadcast => f.write_str("broadcast"),
            Refusal::OwnAddress => f.write_str("this host's own address"),
            Refusal::Denied(cidr) => write!(f, "denied by --fetch-deny {cidr}"),
        }
    }
}

/// Refused unless allowed: nothing a remote image legitimately lives on, and the ways back into
/// this host (link-local also covers cloud metadata services at 169.254.169.254).
const DEFAULT_REFUSED: [(Cidr, Refusal); 9] = [
    (Cidr::v4(127, 0, 0, 0, 8), Refusal::Loopback),
    (Cidr::v6(Ipv6Addr::LOCALHOST, 128), Refusal::Loopback),
    (Cidr::v4(0, 0, 0, 0, 8), Refusal::Unspecified),
    (Cidr::v6(Ipv6Addr::UNSPECIFIED, 128), Refusal::Unspecified),
    (Cidr::v4(169, 254, 0, 0, 16), Refusal::LinkLocal),
    (
        Cidr::v6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
        Refusal::LinkLocal,
    ),
    (Cidr::v4(224, 0, 0, 0, 4), Refusal::Multicast),
    (
        Cidr::v6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
        Refusal::Multicast,
    ),
    (Cidr::v4(255, 255, 255, 255, 32), Refusal::Broadcast),
];

/// Which addresses a fetch may connect to. Private LAN ranges are allowed by default: the cameras
/// a kiosk takes pictures from live there.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    own: Vec<IpAddr>,
}

impl FetchPolicy {
    /// `allow` wins over everything; `deny` adds refusals; `own` are this host's addresses
    /// (see [`local_addresses`]), refused by default.
    pub fn new(allow: Vec<Cidr>, deny: Vec<Cidr>, own: Vec<IpAddr>) -> FetchPolicy {
        let own = own.into_iter().map(canonical).collect();
        FetchPolicy { allow, deny, own }
    }

    /// Whether a connection to `ip` may be made, and if not why. An IPv6 address that carries
    /// an IPv4 one for a translator (NAT64, 6to4) is judged by both: `64:ff9b::7f00:1` is a way
    /// to 127.0.0.1 on a network with a NAT64 gateway.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = canonical(ip);
        if self.allow.iter().any(|cidr| cidr.contains(ip)) {
            return Ok(());
        }
        for v4 in translated_v4(ip) {
            if !self.allow.iter().any(|cidr| cidr.contains(IpAddr::V4(v4))) {
                self.check(IpAddr::V4(v4))?;
            }
        }
        if let Some((_, refusal)) = DEFAULT_REFUSED.iter().find(|(cidr, _)| cidr.contains(ip)) {
            return Err(*refusal);
        }
        if self.own.contains(&ip) {
            return Err(Refusal::OwnAddress);
        }
        match self.deny.iter().find(|cidr| cidr.contains(ip)) {
            Some(cidr) => Err(Refusal::Denied(*cidr)),
            None => Ok(()),
        }
    }
}

/// The addresses of all of this host's interfaces, IPv4 and IPv6 (empty if they cannot be listed).
pub fn local_addresses() -> Vec<IpAddr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: on success `list` is a linked list that stays valid until freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "could not list this host's addresses");
        return Vec::new();
    }
    let mut addresses = Vec::new();
    let mut node = list;
    while !node.is_null() {
        // SAFETY: `node` is an entry of the list, which has not been freed yet.
        let entry = unsafe { &*node };
        // SAFETY: getifaddrs gives a null or a valid sockaddr of the family it names.
        if let Some(ip) = unsafe { sockaddr_ip(entry.ifa_addr) }
            && !addresses.contains(&ip)
        {
            addresses.push(ip);
        }
        node = entry.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and no reference into it outlives this call.
    unsafe { libc::freeifaddrs(list) };
    addresses
}

/// # Safety
/// `addr` is null or points to a socket address as large as its family says.
unsafe fn sockaddr_ip(addr: *const libc::sockaddr) -> Option<IpAddr> {
    if addr.is_null() {
        return None;
    }
    // SAFETY (all three reads): guaranteed by the caller; read_unaligned because a plain
    // sockaddr is less aligned than the family-specific structs.
    match i32::from(unsafe { (*addr).sa_family }) {
        libc::AF_INET => {
            let sin = unsafe { addr.cast::<libc::sockaddr_in>().read_unaligned() };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            let sin6 = unsafe { addr.cast::<libc::sockaddr_in6>().read_unaligned() };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

/// What one URL may cost.
#[derive(Debug, Clone, Copy)]
pub struct FetchLimits {
    pub connect_timeout: Duration,
    /// For the whole fetch: resolving, connecting, redirects and the body.
    pub total_timeout: Duration,
    pub max_bytes: usize,
    pub max_redirects: usize,
}

impl Default for FetchLimits {
    fn default() -> FetchLimits {
        FetchLimits {
            connect_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(30),
            max_bytes: 10 * 1024 * 1024,
            max_redirects: 3,
        }
    }
}

/// A fetch that failed; the message is meant for the API user who supplied the URL.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("invalid image URL: {0}")]
    InvalidUrl(String),
    #[error("unsupported image URL scheme {scheme:?}: only http and https URLs are fetched")]
    UnsupportedScheme { scheme: String },
    #[error("image could not be fetched from {host}: it redirects to an unsupported {scheme:?} URL")]
    RedirectScheme { host: String, scheme: String },
    #[error("image could not be fetched from {host}: address {ip} is refused ({refusal}); allow it with --fetch-allow")]
    AddressRefused { host: String, ip: IpAddr, refusal: Refusal },
    #[error("image could not be fetched from {host}: {reason}")]
    Failed { host: String, reason: &'static str },
    #[error("image could not be fetched from {host}: timed out after {}", seconds(*.after))]
    Timeout { host: String, after: Duration },
    #[error("image could not be fetched from {host}: server answered {status}")]
    Status { host: String, status: StatusCode },
    #[error("image from {host} is larger than the limit of {}", size(*.max_bytes))]
    TooLarge { host: String, max_bytes: usize },
    #[error("content from {host} is not a JPEG, PNG or WebP image ({detail})")]
    NotAnImage { host: String, detail: String },
    #[error("image could not be fetched from {host}: more than {max} redirects")]
    TooManyRedirects { host: String, max: usize },
    #[error("image fetching is unavailable: {0}")]
    Setup(String),
}

impl FetchError {
    /// A stable machine-readable code for API responses.
    pub fn code(&self) -> &'static str {
        match self {
            FetchError::InvalidUrl(_) => "invalid_url",
            FetchError::UnsupportedScheme { .. } | FetchError::RedirectScheme { .. } => "unsupported_scheme",
            FetchError::AddressRefused { .. } => "address_refused",
            FetchError::Failed { .. } => "fetch_failed",
            FetchError::Timeout { .. } => "fetch_timeout",
            FetchError::Status { .. } => "fetch_status",
            FetchError::TooLarge { .. } => "image_too_large",
            FetchError::NotAnImage { .. } => "not_an_image",
            FetchError::TooManyRedirects { .. } => "too_many_redirects",
            FetchError::Setup(_) => "fetch_unavailable",
        }
    }
}

fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

fn size(bytes: usize) -> String {
    const MIB: usize = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// Why reqwest's resolver or redirect hook stopped a fetch; recovered from the error's causes.
#[derive(Debug, Clone)]
enum Blocked {
    Address { host: String, ip: IpAddr, refusal: Refusal },
    Unresolved { host: String },
    Scheme { scheme: String },
    TooManyRedirects,
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocked::Address { host, ip, refusal } => write!(f, "{host}: address {ip} is refused ({refusal})"),
            Blocked::Unresolved { host } => write!(f, "{host} could not be resolved"),
            Blocked::Scheme { scheme } => write!(f, "redirect to unsupported scheme {scheme:?}"),
            Blocked::TooManyRedirects => f.write_str("too many redirects"),
        }
    }
}

impl StdError for Blocked {}

impl Blocked {
    /// `host` is the one the user asked for; refusals and failed lookups name the host they concern.
    fn into_fetch_error(self, host: &str, max_redirects: usize) -> FetchError {
        let host = host.to_owned();
        match self {
            Blocked::Address { host, ip, refusal } => FetchError::AddressRefused { host, ip, refusal },
            Blocked::Unresolved { host } => FetchError::Failed {
                host,
                reason: "the host name could not be resolved",
            },
            Blocked::Scheme { scheme } => FetchError::RedirectScheme { host, scheme },
            Blocked::TooManyRedirects => FetchError::TooManyRedirects {
                host,
                max: max_redirects,
            },
        }
    }
}

/// The address of an IP-literal host, which reqwest (through hyper's connector) connects to
/// without asking the resolver; the same test hyper makes.
fn literal_ip(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .parse()
        .ok()
}

fn check_url(policy: &FetchPolicy, url: &Url) -> Result<(), Blocked> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Blocked::Scheme {
            scheme: url.scheme().to_owned(),
        });
    }
    if let Some(ip) = literal_ip(url) {
        policy.check(ip).map_err(|refusal| Blocked::Address {
            host: url.host_str().unwrap_or_default().to_owned(),
            ip,
            refusal,
        })?;
    }
    Ok(())
}

/// Resolves hostnames and hands reqwest only the addresses the policy allows.
struct PolicyResolver {
    policy: Arc<FetchPolicy>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: hyper puts the URL's port in.
            let lookup = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map(Iterator::collect::<Vec<SocketAddr>>);
            let found = match lookup {
                Ok(found) => found,
                Err(error) => {
                    debug!(%host, %error, "image host lookup failed");
                    return Err(Blocked::Unresolved { host }.into());
                }
            };
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|addr| match policy.check(addr.ip()) {
                    Ok(()) => true,
                    Err(refusal) => {
                        debug!(%host, ip = %addr.ip(), %refusal, "image host address refused");
                        refused.get_or_insert((addr.ip(), refusal));
                        false
                    }
                })
                .collect();
            match refused {
                _ if !allowed.is_empty() => Ok(Box::new(allowed.into_iter()) as Addrs),
                Some((ip, refusal)) => Err(Blocked::Address { host, ip, refusal }.into()),
                None => Err(Blocked::Unresolved { host }.into()),
            }
        })
    }
}

/// Fetches images under a policy and limits. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ImageFetcher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: reqwest::Client,
    policy: Arc<FetchPolicy>,
    limits: FetchLimits,
}

impl ImageFetcher {
    pub fn new(policy: FetchPolicy, limits: FetchLimits) -> Result<ImageFetcher, FetchError> {
        install_crypto_provider();
        let policy = Arc::new(policy);
        let hop_policy = Arc::clone(&policy);
        let redirects = redirect::Policy::custom(move |attempt| {
            // `previous` holds the URL asked for plus every hop already followed.
            let result = if attempt.previous().len() > limits.max_redirects {
                Err(Blocked::TooManyRedirects)
            } else {
                check_url(&hop_policy, attempt.url())
            };
            match result {
                Ok(()) => attempt.follow(),
                Err(blocked) => attempt.error(blocked),
            }
        });
        // Servers that negotiate formats should not pick one (AVIF, SVG) that we cannot decode.
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static("image/jpeg, image/png, image/webp, */*;q=0.1"),
        );
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .default_headers(headers)
            // An environment proxy would connect on our behalf, past the policy.
            .no_proxy()
            .dns_resolver(PolicyResolver {
                policy: Arc::clone(&policy),
            })
            .redirect(redirects)
            .connect_timeout(limits.connect_timeout)
            .build()
            .map_err(|e| FetchError::Setup(DisplayChain(&e).to_string()))?;
        Ok(ImageFetcher {
            inner: Arc::new(Inner { client, policy, limits }),
        })
    }

    /// The body of `url` if it is a JPEG, PNG or WebP image within the limits.
    pub async fn get(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let url = Url::parse(url).map_err(|e| FetchError::InvalidUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(FetchError::UnsupportedScheme {
                scheme: url.scheme().to_owned(),
            });
        }
        let Some(host) = url.host_str().map(str::to_owned) else {
            return Err(FetchError::InvalidUrl("the URL has no host".into()));
        };
        let limits = self.inner.limits;
        check_url(&self.inner.policy, &url).map_err(|blocked| blocked.into_fetch_error(&host, limits.max_redirects))?;
        match tokio::time::timeout(limits.total_timeout, self.download(url, &host)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout {
                host,
                after: limits.total_timeout,
            }),
        }
    }

    async fn download(&self, url: Url, host: &str) -> Result<Vec<u8>, FetchError> {
        let limits = self.inner.limits;
        let mut response = self
            .inner
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| self.failure(&e, host))?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status {
                host: host.to_owned(),
                status,
            });
        }
        if let Some(mime) = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
            let mime = mime.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
            if clearly_not_image(&mime) {
                let detail = format!("the server says it is {mime}");
                return Err(FetchError::NotAnImage {
                    host: host.to_owned(),
                    detail,
                });
            }
        }
        let too_large = || FetchError::TooLarge {
            host: host.to_owned(),
            max_bytes: limits.max_bytes,
        };
        let declared = response.content_length().unwrap_or(0);
        if declared > limits.max_bytes as u64 {
            return Err(too_large());
        }
        let mut body = Vec::with_capacity(declared as usize);
        while let Some(chunk) = response.chunk().await.map_err(|e| self.failure(&e, host))? {
            if chunk.len() > limits.max_bytes - body.len() {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        // An empty body is handed back: the decoder names it (`empty_image`), which says more
        // than "not an image" about a camera that served a zero-length file.
        if !body.is_empty() && !is_image(&body) {
            let detail = "its content is not in any of these formats".to_owned();
            return Err(FetchError::NotAnImage {
                host: host.to_owned(),
                detail,
            });
        }
        Ok(body)
    }

    fn failure(&self, error: &reqwest::Error, host: &str) -> FetchError {
        let limits = self.inner.limits;
        if let Some(blocked) = causes(error).find_map(|cause| cause.downcast_ref::<Blocked>()) {
            return blocked.clone().into_fetch_error(host, limits.max_redirects);
        }
        debug!(%host, error = %DisplayChain(error), "image fetch failed");
        if error.is_timeout() {
            // Only the connect timeout is reqwest's; the total one wraps the whole fetch.
            return FetchError::Timeout {
                host: host.to_owned(),
                after: limits.connect_timeout,
            };
        }
        FetchError::Failed {
            host: host.to_owned(),
            reason: reason(error),
        }
    }
}

fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    // reqwest is built without a provider of its own; an error only means that something else
    // in the process installed one first, which reqwest then uses.
    INSTALL.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A short, internals-free reason for a failure that is neither a refusal nor a timeout.
fn reason(error: &reqwest::Error) -> &'static str {
    for cause in causes(error) {
        if cause.is::<rustls::Error>() {
            return "the secure connection could not be established (TLS)";
        }
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::ConnectionRefused => return "the connection was refused",
                io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                    return "the host is unreachable";
                }
                _ => {}
            }
        }
    }
    if error.is_connect() {
        "could not connect to the server"
    } else if error.is_body() || error.is_decode() {
        "the connection broke off while the image was downloading"
    } else {
        "the server's answer could not be read"
    }
}

/// An error and its causes, looking inside `io::Error`s too: their `source()` skips the error
/// they wrap, which is where rustls's errors sit.
fn causes<'a>(error: &'a (dyn StdError + 'static)) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |&e| {
        match e.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        }
    })
}

/// The causes under a reqwest error, whose own messages are vague and carry the whole URL
/// (credentials and tokens included).
struct DisplayChain<'a>(&'a reqwest::Error);

impl fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut causes = causes(self.0).filter(|cause| !cause.is::<reqwest::Error>());
        if let Some(first) = causes.next() {
            write!(f, "{first}")?;
        }
        causes.try_for_each(|cause| write!(f, ": {cause}"))
    }
}

/// Types that cannot be an image; anything else (including none) is left to the magic bytes.
fn clearly_not_image(mime: &str) -> bool {
    let (top, sub) = mime.split_once('/').unwrap_or((mime, ""));
    match top {
        "text" | "audio" | "video" | "font" | "model" | "multipart" | "message" => true,
        "application" => {
            sub.ends_with("json")
                || sub.ends_with("xml")
                || matches!(sub, "javascript" | "ecmascript" | "pdf" | "x-www-form-urlencoded")
        }
        _ => false,
    }
}

/// JPEG, PNG or WebP, by their signatures.
fn is_image(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
        || bytes.starts_with(b"\x89PNG\r\n\x1a\n")
        || (bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(&b"WEBP"[..]))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn jpeg() -> Vec<u8> {
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chelsea.jpg")).unwrap()
    }

    #[test]
    fn cidr_parses_and_displays() {
        for (input, shown) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("fd00::/8", "fd00::/8"),
            ("127.0.0.1", "127.0.0.1/32"),
            ("::1", "::1/128"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("::/0", "::/0"),
            ("10.1.2.3/16", "10.1.0.0/16"),
            ("fd12:3456::1/32", "fd12:3456::/32"),
            ("::ffff:127.0.0.0/104", "127.0.0.0/8"),
            ("::ffff:10.1.2.3", "10.1.2.3/32"),
            ("::10.1.2.3/120", "10.1.2.0/24"),
            // `::/96` also holds `::` and `::1`: not a range of IPv4-compatible addresses, and
            // not all of IPv4 either.
            ("::2/96", "::/96"),
            ("::1/127", "::/127"),
        ] {
            assert_eq!(cidr(input).to_string(), shown, "{input}");
        }
    }

    #[test]
    fn cidr_rejects_bad_input() {
        for bad in [
            "",
            "/8",
            "10.0.0.0/",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
            "10.0.0/8",
            "10.0.0.0 /8",
            "example.com",
            "[::1]/128",
            "10.0.0.0/300",
        ] {
            let err = bad.parse::<Cidr>().unwrap_err();
            assert!(err.to_string().contains("10.0.0.0/8"), "{bad}: {err}");
        }
    }

    #[test]
    fn cidr_contains() {
        let ten = cidr("10.0.0.0/8");
        assert!(ten.contains(ip("10.0.0.0")));
        assert!(ten.contains(ip("10.255.255.255")));
        assert!(!ten.contains(ip("11.0.0.0")));
        assert!(!ten.contains(ip("9.255.255.255")));
        assert!(ten.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped addresses are IPv4");
        assert!(!ten.contains(ip("fd00::a00:1")));

        let ula = cidr("fd00::/8");
        assert!(ula.contains(ip("fd12:3456::1")));
        assert!(!ula.contains(ip("fe80::1")));
        assert!(!ula.contains(ip("10.0.0.1")));

        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!cidr("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
        assert!(cidr("192.168.1.20").contains(ip("192.168.1.20")));
        assert!(!cidr("192.168.1.20").contains(ip("192.168.1.21")));
        let compat = cidr("::2/96");
        assert!(!compat.contains(ip("127.0.0.1")), "an IPv6 range that is not all IPv4-compatible");
        assert!(!compat.contains(ip("8.8.8.8")));
        assert!(compat.contains(ip("::1")));
        assert!(cidr("2001:db8::1").contains(ip("2001:db8::1")));
        assert!(!cidr("2001:db8::1").contains(ip("2001:db8::2")));
    }

    #[test]
    fn default_policy_refuses_the_ways_back_into_this_host() {
        let policy = FetchPolicy::new(vec![], vec![], vec![ip("192.0.2.2"), ip("fd00::2")]);
        for (address, refusal) in [
            ("127.0.0.1", Refusal::Loopback),
            ("127.8.9.10", Refusal::Loopback),
            ("::1", Refusal::Loopback),
            ("::ffff:127.0.0.1", Refusal::Loopback),
            ("::127.0.0.1", Refusal::Loopback),
            ("0.0.0.0", Refusal::Unspecified),
            ("::", Refusal::Unspecified),
            ("169.254.169.254", Refusal::LinkLocal),
            ("::ffff:169.254.169.254", Refusal::LinkLocal),
            ("fe80::1", Refusal::LinkLocal),
            ("224.0.0.1", Refusal::Multicast),
            ("ff02::1", Refusal::Multicast),
            ("255.255.255.255", Refusal::Broadcast),
            ("192.0.2.2", Refusal::OwnAddress),
            ("::ffff:192.0.2.2", Refusal::OwnAddress),
            ("fd00::2", Refusal::OwnAddress),
            // Through a NAT64 gateway or a 6to4 relay.
            ("64:ff9b::7f00:1", Refusal::Loopback),
            ("64:ff9b::a9fe:a9fe", Refusal::LinkLocal),
            ("64:ff9b:1::a9fe:a9fe", Refusal::LinkLocal),
            // RFC 6052's placements for a local-use NAT64 prefix of /48, /56 and /64: the IPv4
            // address skips bits 64-71.
            ("64:ff9b:1:7f00:0:100::", Refusal::Loopback),
            ("64:ff9b:1:a9:fe:a9fe::", Refusal::LinkLocal),
            ("64:ff9b:1:0:7f:0:100::", Refusal::Loopback),
            ("2002:7f00:1::", Refusal::Loopback),
            ("2002:c000:202::1", Refusal::OwnAddress),
        ] {
            assert_eq!(policy.check(ip(address)), Err(refusal), "{address}");
        }
        // An explicit allow of the IPv4 address covers its translated forms.
        let lab = FetchPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec![], vec![]);
        assert_eq!(lab.check(ip("64:ff9b::7f00:1")), Ok(()));
        for allowed in [
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.20",
            "192.0.2.3",
            "fd00::3",
            "203.0.113.9",
            "8.8.8.8",
            "2001:db8::1",
            "::ffff:192.168.1.20",
            "64:ff9b::808:808",
            "64:ff9b:1::808:808",
            "64:ff9b:1:808:8:800::",
            "64:ff9b:1::a00:0",
            "2002:cb00:7109::1",
        ] {
            assert_eq!(policy.check(ip(allowed)), Ok(()), "{allowed}");
        }
        assert_eq!(Refusal::OwnAddress.to_string(), "this host's own address");
        assert_eq!(Refusal::LinkLocal.to_string(), "link-local");
    }

    #[test]
    fn allow_wins_and_deny_adds() {
        let policy = FetchPolicy::new(
            vec![cidr("127.0.0.1"), cidr("10.1.2.0/24"), cidr("192.0.2.2")],
            vec![cidr("10.1.0.0/16"), cidr("2001:db8::/32")],
            vec![ip("192.0.2.2")],
        );
        assert_eq!(policy.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(policy.check(ip("::ffff:127.0.0.1")), Ok(()));
        assert_eq!(policy.check(ip("127.0.0.2")), Err(Refusal::Loopback));
        assert_eq!(policy.check(ip("10.1.2.3")), Ok(()), "allow wins over deny");
        assert_eq!(policy.check(ip("192.0.2.2")), Ok(()), "allow wins over own addresses");
        let denied = policy.check(ip("10.1.3.4")).unwrap_err();
        assert_eq!(denied, Refusal::Denied(cidr("10.1.0.0/16")));
        assert_eq!(denied.to_string(), "denied by --fetch-deny 10.1.0.0/16");
        assert_eq!(
            policy.check(ip("2001:db8:1::5")),
            Err(Refusal::Denied(cidr("2001:db8::/32")))
        );
        assert_eq!(policy.check(ip("10.2.0.1")), Ok(()));
    }

    #[test]
    fn local_addresses_lists_the_interfaces() {
        let addresses = local_addresses();
        assert!(addresses.contains(&ip("127.0.0.1")), "{addresses:?}");
        for (i, a) in addresses.iter().enumerate() {
            assert!(!addresses[i + 1..].contains(a), "{a} listed twice");
        }
    }

    #[test]
    fn sniffs_and_classifies_content() {
        assert!(is_image(&jpeg()));
        assert!(is_image(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"));
        assert!(is_image(b"RIFF\x24\0\0\0WEBPVP8 "));
        assert!(!is_image(b"RIFF\x24\0\0\0WAVEfmt "));
        assert!(!is_image(b"RIFF"));
        assert!(!is_image(b"\xFF\xD8"));
        assert!(!is_image(b"<!doctype html>"));
        assert!(!is_image(b""));
        for not_image in [
            "text/html",
            "text/plain",
            "application/json",
            "application/problem+json",
            "application/xhtml+xml",
        ] {
            assert!(clearly_not_image(not_image), "{not_image}");
        }
        for maybe in [
            "image/jpeg",
            "image/webp",
            "application/octet-stream",
            "binary/octet-stream",
            "",
        ] {
            assert!(!clearly_not_image(maybe), "{maybe}");
        }
    }

    /// A tiny HTTP/1.1 server on a loopback address that records what it is asked.
    struct Server {
        addr: SocketAddr,
        connections: Arc<AtomicUsize>,
        requests: Arc<Mutex<Vec<String>>>,
    }

    impl Server {
        async fn start(bind: &str) -> io::Result<Server> {
            let listener = TcpListener::bind(bind).await?;
            let addr = listener.local_addr()?;
            let connections = Arc::new(AtomicUsize::new(0));
            let requests = Arc::new(Mutex::new(Vec::new()));
            let (count, log) = (Arc::clone(&connections), Arc::clone(&requests));
            let jpeg = Arc::new(jpeg());
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(handle(stream, Arc::clone(&log), Arc::clone(&jpeg)));
                }
            });
            Ok(Server {
                addr,
                connections,
                requests,
            })
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }

        fn paths(&self) -> Vec<String> {
            let requests = self.requests.lock().unwrap();
            requests
                .iter()
                .map(|r| r.split(' ').nth(1).unwrap_or_default().to_owned())
                .collect()
        }
    }

    // The server sticks to tokio's `net` API (readable/try_read), which needs no io-util feature.
    async fn read_some(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            stream.readable().await?;
            match stream.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return result,
            }
        }
    }

    async fn write_all(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            stream.writable().await?;
            match stream.try_write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn handle(stream: TcpStream, log: Arc<Mutex<Vec<String>>>, jpeg: Arc<Vec<u8>>) {
        let mut head = Vec::new();
        let mut buf = [0; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match read_some(&stream, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            // A TLS ClientHello: answer in plain HTTP, as a misconfigured server would.
            if head[0] == 0x16 {
                let _ = write_all(&stream, b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n").await;
                return;
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
        log.lock().unwrap().push(head);
        let _ = respond(&stream, &path, &jpeg).await;
    }

    async fn send(stream: &TcpStream, status: &str, headers: &str, body: &[u8]) -> io::Result<()> {
        let head = format!(
            "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        write_all(stream, head.as_bytes()).await?;
        write_all(stream, body).await
    }

    /// A response without Content-Length: its body ends when the connection closes.
    async fn send_unsized(stream: &TcpStream, body: &[u8]) -> io::Result<()> {
        write_all(stream, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").await?;
        write_all(stream, body).await
    }

    async fn respond(stream: &TcpStream, path: &str, jpeg: &[u8]) -> io::Result<()> {
        if let Some(hops) = path.strip_prefix("/redirect/") {
            return match hops.parse::<u32>().unwrap() {
                0 => send(stream, "200 OK", "Content-Type: image/jpeg\r\n", jpeg).await,
                n => send(stream, "302 Found", &format!("Location: /redirect/{}\r\n", n - 1), b"").await,
            };
        }
        if let Some(target) = path.strip_prefix("/to?") {
            return send(stream, "302 Found", &format!("Location: {target}\r\n"), b"").await;
        }
        match path {
            "/cat.jpg" => send(stream, "200 OK", "Content-Type: image/jpeg\r\n", jpeg).await,
            "/cat-unsized" => send_unsized(stream, jpeg).await,
            "/page.html" => {
                let page = b"<!doctype html><title>cat</title><img src=cat.jpg>";
                send(stream, "200 OK", "Content-Type: text/html; charset=utf-8\r\n", page).await
            }
            "/page-as-octets" => {
                send(
                    stream,
                    "200 OK",
                    "Content-Type: application/octet-stream\r\n",
                    b"<!doctype html>",
                )
                .await
            }
            "/huge-declared" => {
                // Announces a gigabyte, then sends nothing: only reading the body would wait.
                let head = "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 1073741824\r\n\r\n";
                write_all(stream, head.as_bytes()).await?;
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(())
            }
            "/endless" => {
                write_all(stream, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").await?;
                write_all(stream, &jpeg[..64]).await?;
                let block = vec![0; 64 * 1024];
                // Bounded: stops at 64 MiB or as soon as the client hangs up.
                for _ in 0..1024 {
                    write_all(stream, &block).await?;
                }
                Ok(())
            }
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(())
            }
            _ => {
                send(
                    stream,
                    "404 Not Found",
                    "Content-Type: text/plain\r\n",
                    b"no such image",
                )
                .await
            }
        }
    }

    fn fetcher(allow: &[&str], limits: FetchLimits) -> ImageFetcher {
        let allow = allow.iter().map(|c| cidr(c)).collect();
        ImageFetcher::new(FetchPolicy::new(allow, vec![], local_addresses()), limits).unwrap()
    }

    fn loopback_fetcher() -> ImageFetcher {
        fetcher(&["127.0.0.0/8"], FetchLimits::default())
    }

    #[tokio::test]
    async fn loopback_is_refused_by_default_without_connecting() {
        let server = Server::start("127.0.0.1:0").await.unwrap();
        let port = server.addr.port();
        let fetcher = fetcher(&[], FetchLimits::default());
        let err = fetcher.get(&server.url("/cat.jpg")).await.unwrap_err();
        assert_eq!(err.code(), "address_refused", "{err}");
        assert_eq!(
            err.to_string(),
            "image could not be fetched from 127.0.0.1: address 127.0.0.1 is refused (loopback); \
             allow it with --fetch-allow"
        );
        for (url, refusal) in [
            (format!("http://[::ffff:127.0.0.1]:{port}/cat.jpg"), "(loopback)"),
            (format!("http://[::1]:{port}/cat.jpg"), "(loopback)"),
            (format!("http://2130706433:{port}/cat.jpg"), "(loopback)"),
            (format!("http://0x7f.1:{port}/cat.jpg"), "(loopback)"),
            (format!("http://0.0.0.0:{port}/cat.jpg"), "(unspecified address)"),
            (format!("https://127.0.0.1:{port}/cat.jpg"), "(loopback)"),
        ] {
            let err = fetcher.get(&url).await.unwrap_err();
            assert_eq!(err.code(), "address_refused", "{url}: {err}");
            assert!(err.to_string().contains(refusal), "{url}: {err}");
        }
        assert_eq!(
            server.connections(),
            0,
            "nothing may be requested from a refused address"
        );
    }

    #[tokio::test]
    async fn hostnames_go_through_the_policy_resolver() {
        let server = Server::start("127.0.0.1:0").await.unwrap();
        let url = format!("http://localhost:{}/cat.jpg", server.addr.port());
        let err = fetcher(&[], FetchLimits::default()).get(&url).await.unwrap_err();
        assert_eq!(err.code(), "address_refused", "{err}");
        assert!(
            err.to_string()
                .starts_with("image could not be fetched from localhost: address "),
            "{err}"
        );
        assert!(err.to_string().contains("(loopback)"), "{err}");
        assert_eq!(server.connections(), 0);

        // Allowing only the IPv4 loopback still works: the resolver drops any ::1 it finds.
        let body = fetcher(&["127.0.0.0/8"], FetchLimits::default())
            .get(&url)
            .await
            .unwrap();
        assert_eq!(body, jpeg());
        assert_eq!(server.connections(), 1);
    }

    #[tokio::test]
    async fn fetches_the_exact_bytes_when_allowed() {
        let server = Server::start("127.0.0.1:0").await.unwrap();
        let body = loopback_fetcher().get(&server.url("/cat.jpg")).await.unwrap();
        assert_eq!(body, jpeg());
        let requests = server.requests.lock().unwrap().clone();
        let head = requests[0].to_ascii_lowercase();
        assert!(
            head.contains(&format!("user-agent: removebgd/{}\r\n", env!("CARGO_PKG_VERSION"))),
            "{head}"
        );
        assert!(
            head.contains("accept: image/jpeg, image/png, image/webp, */*;q=0.1\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn error_status_is_fetch_status() {
        let server = Server::start("127.0.0.1:0").await.unwrap();
        let err = loopback_fetcher().get(&server.url("/missing.jpg")).await.unwrap_err();
        assert_eq!(err.code(), "fetch_status");
        assert!(matches!(
            err,
            FetchError::Status {
                status: StatusCode::NOT_FOUND,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "image could not be fetched from 127.0.0.1: server answered 404 Not Found"
        );
    }

    #[tokio::test]
    async fn html_is_not_an_image() {
        let server = Server::start("127.0.0.1:0").await.unwrap();
        let fetcher = loopback_fetcher();
        let err = fetcher.get(&server.url("/page.html")).await.unwrap_err();
        assert_eq!(err.code(), "not_an_image");
        assert!(err.to_string().contains("the server says it is text/html"), "{err}");
        // A neutral Content-Type leaves it to the magic bytes.
        let err = fetcher.get(&server.url("/page-as-octets")).await.unwrap_err();
        assert_eq!(err.code(), "not_an_image", "{err}");
    }

    #[tokio::test]
    async fn follows_up_to_max_redirects() {
        let server = Server::start("127.0.0.1:0").await.unwrap();
        let three = loopback_fetcher();
        // Twice: the hop count must not carry over from one fetch to the next.
        for _ in 0..2 {
            assert_eq!(three.get(&server.url("/redirect/3")).await.unwrap(), jpeg());
        }
        assert_eq!(server.paths().len(), 8);
        let err = three.get(&server.url("/redirect/4")).await.unwrap_err();
        assert_eq!(err.code(), "too_many_redirects", "{err}");
        assert_eq!(
            err.to_string(),
            "image could not be fetched from 127.0.0.1: more than 3 redirects"
        );
        assert_eq!(server.paths().len(), 12, "the fourth redirect is not followed");

        let none = fetcher(
            &["127.0.0.0/8"],
            FetchLimits {
                max_redirects: 0,
                ..FetchLimits::default()
            },
        );
        let err = none.get(&server.url("/redirect/1")).await.unwrap_err();
        assert_eq!(err.code(), "too_many_redirects", "{err}");
    }

    #[tokio::test]
    async fn redirects_to_refused_addresses_are_refused() {
        let allowed = Server::start("127.0.0.1:0").await.unwrap();
        let other = Server::start("127.0.0.2:0").await.unwrap();
        let fetcher = fetcher(&["127.0.0.1/32"], FetchLimits::default());
        assert_eq!(fetcher.get(&allowed.url("/cat.jpg")).await.unwrap(), jpeg());

        let err = fetcher
            .get(&allowed.url(&format!("/to?{}", other.url("/cat.jpg"))))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "address_refused", "{err}");
        assert!(err.to_string().contains("127.0.0.2 is refused (loopback)"), "{err}");

        // Where the machine has IPv6 loopback, the same for [::1].
        if let Ok(v6) = Server::start("[::1]:0").await {
            let err = fetcher
                .get(&allowed.url(&format!("/to?{}", v6.url("/cat.jpg"))))
                .await
                .unwrap_err();
            assert_eq!(err.code(), "address_refused", "{err}");
            assert!(err.to_string().contains("::1 is refused (loopback)"), "{err}");
            assert_eq!(v6.connections(), 0);
        }
        assert_eq!(other.connections(), 0);
    }

    #[tokio::test]
    async fn redirects_to_other_schemes_are_refused() {
        let server = Server::start("127.0.0.1:0").await.unwrap();
        let err = loopback_fetcher()
            .get(&server.url("/to?ftp://127.0.0.1/cat.jpg"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "unsupported_scheme", "{err}");
        // tower-http cannot turn a host-less Location into a request URI, so it hands the 302 back
        // without asking the redirect policy.
        let err = loopback_fetcher()
            .get(&server.url("/to?file:///etc/passwd"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                FetchError::Status {
                    status: StatusCode::FOUND,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(server.paths().len(), 2);
    }

    #[tokio::test]
    async fn body_over_the_limit_with_content_length() {
        let server = Server::start("127.0.0.1:0").await.unwrap();
        let len = jpeg().len();
        let exact = fetcher(
            &["127.0.0.0/8"],
            FetchLimits {
                max_bytes: len,
                ..FetchLimits::default()
            },
        );
        assert_eq!(exact.get(&server.url("/cat.jpg")).await.unwrap().len(), len);
        let short = fetcher(
            &["127.0.0.0/8"],
            FetchLimits {
                max_bytes: len - 1,
                ..FetchLimits::default()
            },
        );
        let err = short.get(&server.url("/cat.jpg")).await.unwrap_err();
        assert_eq!(err.code(), "image_too_large", "{err}");
        assert_eq!(
            err.to_string(),
            format!("image from 127.0.0.1 is larger than the limit of {} bytes", len - 1)
        );

        // Refused on the header alone: this body never comes, so reading it would time out.
        let started = Instant::now();
        let err = loopback_fetcher().get(&server.url("/huge-declared")).await.unwrap_err();
        assert_eq!(err.code(), "image_too_large", "{err}");
        assert_eq!(
            err.to_string(),
            "image from 127.0.0.1 is larger than the limit of 10 MiB"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn body_over_the_limit_without_content_length() {
        let server = Server::start("127.0.0.1:0").await.unwrap();
        let len = jpeg().len();
        let exact = fetcher(
            &["127.0.0.0/8"],
            FetchLimits {
                max_bytes: len,
                ..FetchLimits::default()
            },
        );
        assert_eq!(exact.get(&server.url("/cat-unsized")).await.unwrap(), jpeg());
        let short = fetcher(
            &["127.0.0.0/8"],
            FetchLimits {
                max_bytes: len - 1,
                ..FetchLimits::default()
            },
        );
        let err = short.get(&server.url("/cat-unsized")).await.unwrap_err();
        assert_eq!(err.code(), "image_too_large", "{err}");

        // A stream that would go on for 64 MiB stops being read at the limit.
        let small = fetcher(
            &["127.0.0.0/8"],
            FetchLimits {
                max_bytes: 100 * 1024,
                ..FetchLimits::default()
            },
        );
        let started = Instant::now();
        let err = small.get(&server.url("/endless")).await.unwrap_err();
        assert_eq!(err.code(), "image_too_large", "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let server = Server::start("127.0.0.1:0").await.unwrap();
        let limits = FetchLimits {
            total_timeout: Duration::from_millis(300),
            ..FetchLimits::default()
        };
        let started = Instant::now();
        let err = fetcher(&["127.0.0.0/8"], limits)
            .get(&server.url("/slow"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "fetch_timeout", "{err}");
        assert_eq!(
            err.to_string(),
            "image could not be fetched from 127.0.0.1: timed out after 300 ms"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(server.paths(), ["/slow"]);
    }

    #[tokio::test]
    async fn closed_port_is_fetch_failed() {
        // Bound and dropped, so nothing listens there.
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = loopback_fetcher()
            .get(&format!("http://127.0.0.1:{port}/cat.jpg"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "fetch_failed", "{err}");
        assert_eq!(
            err.to_string(),
            "image could not be fetched from 127.0.0.1: the connection was refused"
        );
    }

    #[tokio::test]
    async fn tls_failure_is_fetch_failed() {
        let server = Server::start("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/cat.jpg", server.addr);
        let err = loopback_fetcher().get(&url).await.unwrap_err();
        assert_eq!(err.code(), "fetch_failed", "{err}");
        assert_eq!(
            err.to_string(),
            "image could not be fetched from 127.0.0.1: the secure connection could not be established (TLS)"
        );
        assert_eq!(server.connections(), 1);
    }

    #[tokio::test]
    async fn rejects_bad_urls_and_schemes() {
        let fetcher = loopback_fetcher();
        for (url, code) in [
            ("ftp://127.0.0.1/cat.jpg", "unsupported_scheme"),
            ("file:///etc/passwd", "unsupported_scheme"),
            ("data:image/jpeg;base64,/9j/", "unsupported_scheme"),
            ("gopher://127.0.0.1:70/", "unsupported_scheme"),
            ("", "invalid_url"),
            ("not a url", "invalid_url"),
            ("/cat.jpg", "invalid_url"),
            ("http://", "invalid_url"),
            ("http://[::1/cat.jpg", "invalid_url"),
            ("http://127.0.0.1:99999/cat.jpg", "invalid_url"),
            ("http://exa mple.com/cat.jpg", "invalid_url"),
        ] {
            let err = fetcher.get(url).await.unwrap_err();
            assert_eq!(err.code(), code, "{url:?}: {err}");
        }
        let err = fetcher.get("ftp://127.0.0.1/cat.jpg").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported image URL scheme \"ftp\": only http and https URLs are fetched"
        );
    }
}
