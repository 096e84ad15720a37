//! `--fetch-allow` / `--fetch-deny` CIDR lists (`fetch::Cidr`) and the fetch policy
//! (`FetchPolicy::check`) that keeps image URLs off this host and its loopback, link-local and
//! multicast ranges.
//!
//! Input, as text: line 1 the allow list, line 2 the deny list (comma-separated, as the flags and
//! `config::cidrs` read them), line 3 an address to check, line 4 this host's own addresses.
//!
//! Properties: a CIDR's `Display` (used by `config print`) parses back to the same range, which
//! contains its own network address and last address and not the one after; an IPv4-mapped range
//! equals its IPv4 range; the policy answers the same for an IPv4 address and its IPv4-mapped
//! and -compatible IPv6 forms; NAT64 (RFC 6052's placements) and 6to4 forms of a loopback
//! address are refused; and every
//! answer matches an independent statement of the rules, built on std's address predicates.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use removebgd::fetch::{Cidr, FetchPolicy, Refusal};

fn list(line: &str) -> Vec<Cidr> {
    line.split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .filter_map(|v| v.parse::<Cidr>().ok())
        .collect()
}

/// The network address and prefix length, from `Display`.
fn parts(c: &Cidr) -> (IpAddr, u8) {
    let text = c.to_string();
    let (addr, prefix) = text.split_once('/').expect("address/prefix");
    (addr.parse().expect("an address"), prefix.parse().expect("a prefix"))
}

/// IPv4 rules apply to IPv4-mapped and IPv4-compatible IPv6 addresses.
fn v4_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None if u128::from(v6) >> 32 == 0 && u128::from(v6) > 1 => {
                IpAddr::V4(Ipv4Addr::from(u128::from(v6) as u32))
            }
            None => ip,
        },
        v4 => v4,
    }
}

/// The built-in refusals, stated with std's predicates.
fn default_refusal(ip: IpAddr) -> Option<Refusal> {
    match v4_of(ip) {
        IpAddr::V4(a) if a.is_loopback() => Some(Refusal::Loopback),
        IpAddr::V4(a) if a.octets()[0] == 0 => Some(Refusal::Unspecified),
        IpAddr::V4(a) if a.is_link_local() => Some(Refusal::LinkLocal),
        IpAddr::V4(a) if a.is_multicast() => Some(Refusal::Multicast),
        IpAddr::V4(a) if a.is_broadcast() => Some(Refusal::Broadcast),
        IpAddr::V6(a) if a.is_loopback() => Some(Refusal::Loopback),
        IpAddr::V6(a) if a.is_unspecified() => Some(Refusal::Unspecified),
        IpAddr::V6(a) if a.is_unicast_link_local() => Some(Refusal::LinkLocal),
        IpAddr::V6(a) if a.is_multicast() => Some(Refusal::Multicast),
        _ => None,
    }
}

/// The IPv4 addresses a translator may reach for an IPv6 one: NAT64's well-known 64:ff9b::/96
/// (the last 32 bits), 6to4 (2002:AABB:CCDD::/48), and NAT64's local-use 64:ff9b:1::/48, whose
/// networks choose a prefix of /48, /56, /64 or /96 (RFC 6052 2.2): the 32 bits start at the
/// prefix's end, skip bits 64-71 (the u-octet, zero) and are followed by zero bits. Placements
/// in 0.0.0.0/8 are the zero remainder of another placement, not a destination.
fn translated(ip: IpAddr) -> Vec<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return Vec::new() };
    let bits = u128::from(v6);
    let [a, b, c, d, e, f, _, _] = v6.segments();
    match (a, b, c) {
        (0x64, 0xff9b, 0) if (d, e, f) == (0, 0, 0) => vec![Ipv4Addr::from(bits as u32)],
        (0x64, 0xff9b, 1) => {
            let u_octet = (bits >> 56) & 0xff;
            // The address without its u-octet: 120 bits.
            let joined = ((bits >> 64) << 56) | (bits & ((1u128 << 56) - 1));
            // Judged in order of prefix length: the first refusal is the answer.
            let mut found = Vec::new();
            for start in [48u32, 56, 64] {
                let rest = 120 - start - 32;
                if u_octet == 0 && joined & ((1u128 << rest) - 1) == 0 {
                    found.push(Ipv4Addr::from((joined >> rest) as u32));
                }
            }
            found.push(Ipv4Addr::from(bits as u32));
            found.retain(|v4| v4.octets()[0] != 0);
            found
        }
        (0x2002, _, _) => vec![Ipv4Addr::from((u32::from(b) << 16) | u32::from(c))],
        _ => Vec::new(),
    }
}

/// The documented rules: the allow list wins; an address carrying an IPv4 one for a translator
/// is also judged as that IPv4 address (unless the allow list names it); then the built-in
/// refusals, this host's own addresses and the deny list.
fn expected(allow: &[Cidr], deny: &[Cidr], own: &[IpAddr], ip: IpAddr) -> Result<(), Refusal> {
    let ip = v4_of(ip);
    if allow.iter().any(|c| c.contains(ip)) {
        return Ok(());
    }
    for v4 in translated(ip) {
        if !allow.iter().any(|c| c.contains(IpAddr::V4(v4))) {
            expected(allow, deny, own, IpAddr::V4(v4))?;
        }
    }
    if let Some(r) = default_refusal(ip) {
        Err(r)
    } else if own.iter().any(|o| v4_of(*o) == ip) {
        Err(Refusal::OwnAddress)
    } else if let Some(c) = deny.iter().find(|c| c.contains(ip)) {
        Err(Refusal::Denied(*c))
    } else {
        Ok(())
    }
}

fn check_policy(policy: &FetchPolicy, allow: &[Cidr], deny: &[Cidr], own: &[IpAddr], ip: IpAddr) {
    let got = policy.check(ip);
    assert_eq!(got, expected(allow, deny, own, ip), "check({ip})");
    // Loopback stays out of reach through every IPv6 form, unless allowed.
    for v4 in translated(v4_of(ip)) {
        if v4.is_loopback() && !allow.iter().any(|c| c.contains(ip) || c.contains(IpAddr::V4(v4))) {
            assert!(got.is_err(), "{ip} reaches {v4}");
        }
    }
    if let IpAddr::V4(v4) = v4_of(ip) {
        assert_eq!(
            policy.check(IpAddr::V6(v4.to_ipv6_mapped())),
            got,
            "{ip} as ::ffff:{v4}"
        );
        if u32::from(v4) > 1 {
            assert_eq!(policy.check(IpAddr::V6(v4.to_ipv6_compatible())), got, "{ip} as ::{v4}");
        }
        assert_eq!(policy.check(IpAddr::V4(v4)), got, "{ip} as {v4}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.split('\n');
    let allow = list(lines.next().unwrap_or(""));
    let deny = list(lines.next().unwrap_or(""));
    let ip: Option<IpAddr> = lines.next().and_then(|l| l.trim().parse().ok());
    let own: Vec<IpAddr> = lines
        .next()
        .unwrap_or("")
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();

    let mut candidates: Vec<IpAddr> = ip.into_iter().chain(own.iter().copied()).collect();
    // The candidate's NAT64 and 6to4 forms.
    if let Some(IpAddr::V4(v4)) = ip.map(v4_of) {
        let [a, b, c, d] = v4.octets();
        let (hi, lo) = (u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]));
        candidates.push(IpAddr::V6(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, hi, lo)));
        candidates.push(IpAddr::V6(Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, hi, lo)));
        // RFC 6052's /48, /56 and /64 placements in the local-use prefix (u-octet skipped).
        let o = v4.octets();
        let place = |at: [usize; 4]| {
            let mut bytes = [0u8; 16];
            bytes[..6].copy_from_slice(&[0, 0x64, 0xff, 0x9b, 0, 1]);
            for (i, &pos) in at.iter().enumerate() {
                bytes[pos] = o[i];
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        };
        candidates.extend([place([6, 7, 9, 10]), place([7, 9, 10, 11]), place([9, 10, 11, 12])]);
        candidates.push(IpAddr::V6(Ipv6Addr::new(0x2002, hi, lo, 0, 0, 0, 0, 1)));
    }
    for c in allow.iter().chain(&deny) {
        assert_eq!(c.to_string().parse::<Cidr>(), Ok(*c), "{c}");
        let (net, prefix) = parts(c);
        assert!(prefix <= if net.is_ipv4() { 32 } else { 128 }, "{c}");
        assert!(c.contains(net), "{c} does not contain {net}");
        if let IpAddr::V4(v4) = net {
            let mapped = format!("::ffff:{v4}/{}", u32::from(prefix) + 96);
            assert_eq!(mapped.parse::<Cidr>(), Ok(*c), "{mapped} is not {c}");
        }
        // The last address of the range is in it, the one after it is not.
        let last = match net {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(
                u32::from(a) | u32::MAX.checked_shr(prefix.into()).unwrap_or(0),
            )),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(
                u128::from(a) | u128::MAX.checked_shr(prefix.into()).unwrap_or(0),
            )),
        };
        // IPv4-compatible addresses count as IPv4: an IPv6 range like ::/96 does not hold them.
        if net.is_ipv4() || v4_of(last) == last {
            assert!(c.contains(last), "{c} does not contain {last}");
        }
        let after = match last {
            IpAddr::V4(a) => u32::from(a).checked_add(1).map(|n| IpAddr::V4(Ipv4Addr::from(n))),
            IpAddr::V6(a) => u128::from(a).checked_add(1).map(|n| IpAddr::V6(Ipv6Addr::from(n))),
        };
        if let Some(after) = after {
            // An IPv6 range below ::ffff:0:0/96 may also hold IPv4 forms; compare within a family.
            if net.is_ipv4() || v4_of(after) == after {
                assert!(!c.contains(after), "{c} contains {after}");
            }
        }
        candidates.extend([net, last]);
    }

    let policy = FetchPolicy::new(allow.clone(), deny.clone(), own.clone());
    for ip in candidates {
        check_policy(&policy, &allow, &deny, &own, ip);
    }
});
