//! The client address of a request: the TCP peer, or the last untrusted hop of
//! `X-Forwarded-For` when the peer is a configured trusted proxy (SPEC §1, `trusted_proxies`).
//!
//! Owns: [`client_ip`], used by the pipeline and the admin listener alike.
//! Must never import anything of ours: it is a pure function of the peer, the headers and the
//! trusted networks (so `gateway`, `pipeline` and `admin` can all use it without a circle).

use std::net::IpAddr;

use http::HeaderMap;
use http::header::HeaderName;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

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

/// The longest `X-Request-Id` kept from a trusted proxy.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// The `X-Request-Id` a trusted proxy sent, when it is sane: the peer is in
/// `server.trusted_proxies`, the header appears once, and its value is 1 to
/// [`MAX_REQUEST_ID_BYTES`] bytes of visible ASCII. Otherwise None (the gateway's own id is used).
pub fn trusted_request_id(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[ipnet::IpNet],
) -> Option<String> {
    if !trusted.iter().any(|n| n.contains(&peer)) {
        return None;
    }
    let mut values = headers.get_all(X_REQUEST_ID).iter();
    let v = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let b = v.as_bytes();
    let sane = !b.is_empty()
        && b.len() <= MAX_REQUEST_ID_BYTES
        && b.iter().all(|c| (0x21..=0x7e).contains(c));
    // Visible ASCII, so the bytes are valid UTF-8.
    sane.then(|| String::from_utf8_lossy(b).into_owned())
}
