//! The client address of a request: the TCP peer, or the last untrusted hop of
//! `X-Forwarded-For` when the peer is a configured trusted proxy (SPEC §1, `trusted_proxies`).
//!
//! Owns: [`is_trusted`] (the one test of a peer against `trusted_proxies`), [`client_ip`] and
//! [`secure_transport`] (tokens only over HTTPS), used by the pipeline, forward-auth, the
//! listener's connection limits and the admin listener alike.
//! Must never import anything of ours: it is a pure function of the peer, the headers and the
//! trusted networks (so `gateway`, `pipeline` and `admin` can all use it without a circle).

use std::net::IpAddr;

use http::HeaderMap;
use http::header::HeaderName;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Whether `ip` is in one of the `trusted` networks (`server.trusted_proxies`).
pub fn is_trusted(ip: IpAddr, trusted: &[ipnet::IpNet]) -> bool {
    trusted.iter().any(|n| n.contains(&ip))
}

/// The client address: the TCP peer, or — only when the peer is a trusted proxy — the last
/// untrusted hop of `X-Forwarded-For` (walking right to left past trusted proxies).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    if trusted.is_empty() || !is_trusted(peer, trusted) {
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
                if !is_trusted(ip, trusted) {
                    return ip;
                }
            }
            // An unparsable hop was written by someone we do not trust: stop at the last trusted one.
            Err(_) => return client,
        }
    }
    client
}

/// Whether a Bearer token may be accepted on this transport (docs/security.md, "Tokens only over
/// HTTPS"): the connection is TLS, or the peer is loopback (a client on this host, or a local
/// proxy), or the peer is a trusted proxy whose last `X-Forwarded-Proto` or `Forwarded: proto=`
/// says the client used `https`. A header from an untrusted peer is never believed.
pub fn secure_transport(
    peer: IpAddr,
    tls: bool,
    headers: &HeaderMap,
    trusted: &[ipnet::IpNet],
) -> bool {
    if tls || peer.is_loopback() || peer.to_canonical().is_loopback() {
        return true;
    }
    if !is_trusted(peer, trusted) {
        return false;
    }
    // The hop nearest to us wrote the last value: that is the one the trusted proxy vouches for.
    let last = |name: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|v| !v.is_empty())
            .map(str::to_ascii_lowercase)
    };
    if let Some(p) = last("x-forwarded-proto") {
        return p == "https";
    }
    last("forwarded").is_some_and(|element| {
        element.split(';').any(|pair| {
            pair.split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("proto")
                    && v.trim().trim_matches('"').eq_ignore_ascii_case("https")
            })
        })
    })
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
    if !is_trusted(peer, trusted) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn tokens_only_over_https_loopback_or_a_trusted_https_proxy() {
        let remote: IpAddr = "192.0.2.7".parse().unwrap();
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/24".parse().unwrap()];
        let none = HeaderMap::new();
        let https = headers(&[("x-forwarded-proto", "https")]);
        // TLS, loopback (v4, v6, v4-mapped v6): always.
        assert!(secure_transport(remote, true, &none, &[]));
        for lo in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
            assert!(
                secure_transport(lo.parse().unwrap(), false, &none, &[]),
                "{lo}"
            );
        }
        // Plain HTTP from elsewhere: never, whatever it claims.
        assert!(!secure_transport(remote, false, &none, &trusted));
        assert!(
            !secure_transport(remote, false, &https, &trusted),
            "untrusted peer's header"
        );
        // A trusted proxy vouches with X-Forwarded-Proto or Forwarded; its last value counts.
        assert!(secure_transport(proxy, false, &https, &trusted));
        assert!(!secure_transport(proxy, false, &none, &trusted));
        // What a trusted proxy's headers say: (headers, secure?).
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[("x-forwarded-proto", "http")], false),
            (&[("x-forwarded-proto", "https, http")], false),
            (
                &[
                    ("x-forwarded-proto", "http"),
                    ("x-forwarded-proto", "HTTPS"),
                ],
                true,
            ),
            (&[("forwarded", "for=192.0.2.7;proto=https")], true),
            (
                &[(
                    "forwarded",
                    "for=1.2.3.4;proto=http, for=192.0.2.7;Proto=\"https\"",
                )],
                true,
            ),
            (&[("forwarded", "for=192.0.2.7;proto=http")], false),
        ];
        for (pairs, secure) in cases {
            assert_eq!(
                secure_transport(proxy, false, &headers(pairs), &trusted),
                *secure,
                "{pairs:?}"
            );
        }
    }
}
