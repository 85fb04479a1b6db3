//! The client address of a request: the TCP peer, or the last untrusted hop of
//! `X-Forwarded-For` when the peer is a configured trusted proxy (SPEC §1, `trusted_proxies`).
//!
//! Owns: [`client_ip`], used by the pipeline and the admin listener alike.
//! Must never import anything of ours: it is a pure function of the peer, the headers and the
//! trusted networks (so `gateway`, `pipeline` and `admin` can all use it without a circle).

use std::net::IpAddr;

use http::HeaderMap;

/// The client address: the TCP peer, or — only when the peer is a trusted proxy — the last
/// untrusted hop of `X-Forwarded-For` (walking right to left past trusted proxies).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if trusted.is_empty() || !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    return ip;
                }
            }
            // An unparsable hop was written by someone we do not trust: stop at the last trusted one.
            Err(_) => return client,
        }
    }
    client
}
