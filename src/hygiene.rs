//! Request validation and header hygiene (SPEC §5), fail closed.
//!
//! Hop-by-hop headers are those of RFC 9110 §7.6.1 (`Connection`, `Proxy-Connection`,
//! `Keep-Alive`, `TE`, `Transfer-Encoding`, `Upgrade`) plus every header the `Connection` field
//! names; they are removed in both directions *before* the gateway adds its own headers, so
//! `Connection: X-Tokengate-Token-Id` can never delete a header the gateway sets.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};

use crate::error::Reject;

/// Hop-by-hop headers (RFC 9110 §7.6.1, RFC 9113 §8.2.2), plus proxy credentials and the h2c
/// upgrade settings which never cross the gateway.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "http2-settings",
];

/// W3C Trace Context headers: forwarded only when `traceparent` is valid ([`trace_id`]); an
/// invalid one is dropped together with its `tracestate` (which means nothing without it).
pub const TRACE_CONTEXT: [&str; 2] = ["traceparent", "tracestate"];

/// The trace id of a valid W3C `traceparent` (Trace Context level 1, version `00`):
/// `00-<32 hex trace-id, not all zero>-<16 hex parent-id, not all zero>-<2 hex flags>`, lowercase,
/// exactly one header. Anything else is None.
pub fn trace_id(headers: &HeaderMap) -> Option<&str> {
    let mut all = headers.get_all(TRACE_CONTEXT[0]).iter();
    let v = all.next()?.to_str().ok()?;
    if all.next().is_some() || v.len() != 55 {
        return None;
    }
    let mut parts = v.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    (parts.next().is_none()
        && version == "00"
        && hex(trace, 32)
        && !zero(trace)
        && hex(parent, 16)
        && !zero(parent)
        && hex(flags, 2))
    .then_some(trace)
}

/// Removes `traceparent` and `tracestate` unless the `traceparent` is valid ([`trace_id`]).
pub fn strip_invalid_trace_context(headers: &mut HeaderMap) {
    if trace_id(headers).is_none() {
        for name in TRACE_CONTEXT {
            headers.remove(name);
        }
    }
}

/// Headers the gateway owns: client copies are removed, then authoritative values are set.
pub const GATEWAY_OWNED: &[&str] = &[
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "forwarded",
    "x-real-ip",
    "x-request-id",
    "x-tokengate-token-id",
    "x-tokengate-token-name",
    "x-tokengate-account",
    "x-tokengate-permissions",
];

/// Headers that some backends treat as a different URL or method: always removed.
pub const ALWAYS_REMOVED: &[&str] = &[
    "x-original-url",
    "x-rewrite-url",
    "x-forwarded-uri",
    "x-original-uri",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Headers common backends and their auth middlewares trust as the caller's identity or address
/// (oauth2-proxy, Authelia, Grafana, Apache `REMOTE_USER`, CDNs): a client copy would let the
/// caller pick who it is. Always removed; `X-Real-IP` is gateway-owned (set to the client IP).
pub const IDENTITY_HEADERS: &[&str] = &[
    "remote-user",
    "x-remote-user",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-preferred-username",
    "x-auth-request-groups",
    "x-auth-request-access-token",
    "x-webauth-user",
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-preferred-username",
    "client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-client-ip",
];

/// Cookie names the gateway itself issues (the admin web UI session, with and without the
/// `__Host-` prefix, and the OpenID Connect sign-in binding). A browser signed in to the admin UI
/// sends them to every listener of the same host name, whatever the port, so they are removed from
/// everything forwarded upstream.
pub const GATEWAY_COOKIES: &[&str] = &[SESSION_COOKIE, SESSION_COOKIE_TLS, OIDC_BINDING_COOKIE];

/// Binds an OpenID Connect sign-in in progress to the browser that started it
/// (`admin::oidc::BINDING_COOKIE`).
pub const OIDC_BINDING_COOKIE: &str = "tokengate_oidc";

/// The admin web UI's session cookie on plain HTTP (`admin::session::COOKIE`).
pub const SESSION_COOKIE: &str = "tokengate_session";
/// The session cookie under TLS: the `__Host-` prefix makes browsers insist on Secure, Path=/, no
/// Domain (`admin::session::COOKIE_TLS`).
pub const SESSION_COOKIE_TLS: &str = "__Host-tokengate_session";

/// Removes the gateway's own cookies and joins every remaining `cookie` field into one line with
/// `; ` (RFC 9113 §8.2.3: an HTTP/2 client may send one field per cookie; the HTTP/1.1 upstream
/// must get them as one). The client's other cookies travel unchanged, in order.
pub fn strip_gateway_cookies(headers: &mut HeaderMap) {
    let n = headers.get_all(header::COOKIE).iter().count();
    if n == 0 {
        return;
    }
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut dropped = false;
    for v in headers.get_all(header::COOKIE) {
        for pair in v.as_bytes().split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            if pair.is_empty() {
                continue;
            }
            let name = pair
                .split(|&b| b == b'=')
                .next()
                .unwrap_or(pair)
                .trim_ascii();
            if GATEWAY_COOKIES
                .iter()
                .any(|c| c.as_bytes().eq_ignore_ascii_case(name))
            {
                dropped = true;
                continue;
            }
            kept.push(pair);
        }
    }
    if n == 1 && !dropped {
        return;
    }
    let joined = kept.join(&b"; "[..]);
    let value = (!joined.is_empty())
        .then(|| HeaderValue::from_bytes(&joined).ok())
        .flatten();
    headers.remove(header::COOKIE);
    if let Some(v) = value {
        headers.insert(header::COOKIE, v);
    }
}

/// Removes hop-by-hop headers and every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the (few) headers present instead of a removal per listed name: removing by
    // `&str` parses and hashes the name each time, and this runs twice per request.
    let mut doomed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    doomed.extend(
        headers
            .keys()
            .filter(|k| HOP_BY_HOP.contains(&k.as_str()))
            .cloned(),
    );
    for n in doomed {
        headers.remove(n);
    }
}

const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Name prefixes the gateway owns as whole families: its identity namespace (so a header it may
/// add later, or one a backend invents like `X-Tokengate-Role`, can never carry a client value),
/// and the `X-Forwarded-*` metadata (`-Server`, `-Ssl`, `-Scheme`, `-User`, ...) that frameworks
/// trust as if a proxy had written it.
pub const GATEWAY_OWNED_PREFIXES: &[&str] = &["x-tokengate-", "x-forwarded-"];

/// Removes client copies of gateway-owned headers and the URL/method override family.
pub fn strip_owned(headers: &mut HeaderMap) {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            GATEWAY_OWNED.contains(&k)
                || ALWAYS_REMOVED.contains(&k)
                || IDENTITY_HEADERS.contains(&k)
                || GATEWAY_OWNED_PREFIXES.iter().any(|p| k.starts_with(p))
        })
        .cloned()
        .collect();
    for n in doomed {
        headers.remove(n);
    }
}

/// What step 1 learned about a request.
#[derive(Debug, Clone)]
pub struct RequestFacts {
    /// The Host (or `:authority`) the client used.
    pub host: Option<HeaderValue>,
    /// A WebSocket upgrade was requested.
    pub websocket: bool,
}

/// Limits used by [`check`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Maximum request-target length.
    pub max_uri_bytes: usize,
    /// Maximum total header bytes.
    pub max_header_bytes: usize,
    /// Maximum body size.
    pub max_body_bytes: u64,
}

/// Step 1 (everything but the path): size limits, method allow-list, Host, header names, upgrades.
pub fn check<B>(
    parts: &http::Request<B>,
    methods: &[String],
    limits: Limits,
) -> Result<RequestFacts, Reject> {
    let bad = |reason: &'static str, message: &str| Reject::BadRequest {
        reason,
        message: message.to_string(),
    };
    let uri_len = parts
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().len())
        .unwrap_or(1)
        + parts
            .uri()
            .authority()
            .map(|a| a.as_str().len())
            .unwrap_or(0);
    if uri_len > limits.max_uri_bytes {
        return Err(Reject::UriTooLong);
    }
    let mut header_bytes = 0usize;
    for (name, value) in parts.headers() {
        header_bytes += name.as_str().len() + value.len() + 4;
        if name.as_str().contains('_') {
            return Err(bad(
                "bad_header",
                "Header names with `_` are not accepted (they collide with `-` in many backends).",
            ));
        }
    }
    if header_bytes > limits.max_header_bytes {
        return Err(Reject::HeadersTooLarge);
    }
    if *parts.method() == Method::TRACE || *parts.method() == Method::CONNECT {
        return Err(bad(
            "method_not_allowed",
            "TRACE and CONNECT are not accepted.",
        ));
    }
    if !methods
        .iter()
        .any(|m| m.as_str() == parts.method().as_str())
    {
        return Err(bad(
            "method_not_allowed",
            "This method is not accepted by the gateway.",
        ));
    }
    if let Some(cl) = parts.headers().get(header::CONTENT_LENGTH) {
        match cl.to_str().ok().and_then(|v| v.parse::<u64>().ok()) {
            Some(n) if n > limits.max_body_bytes => return Err(Reject::BodyTooLarge),
            Some(_) => {}
            None => return Err(bad("bad_header", "Invalid Content-Length.")),
        }
    }

    // Transfer codings other than a lone `chunked` (`gzip, chunked`, ...) are not implemented:
    // refused like Envoy does, so no backend ever decodes a body the gateway framed differently.
    let codings: Vec<String> = parts
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|c| String::from_utf8_lossy(c).trim().to_ascii_lowercase())
        // RFC 9110 §5.6.1: empty list elements are ignored.
        .filter(|c| !c.is_empty())
        .collect();
    if !codings.is_empty() && (codings.len() != 1 || codings[0] != "chunked") {
        return Err(Reject::NotImplemented {
            reason: "unsupported_transfer_coding",
        });
    }

    // Host: exactly one; the request-target's authority (absolute-form, or HTTP/2 :authority)
    // must agree with it.
    let mut hosts = parts.headers().get_all(header::HOST).iter();
    let host = hosts.next().cloned();
    if hosts.next().is_some() {
        return Err(bad("bad_host", "Send exactly one Host header."));
    }
    let host = match (parts.version(), parts.uri().authority(), host) {
        (Version::HTTP_2 | Version::HTTP_3, Some(auth), Some(h)) => {
            if !h.as_bytes().eq_ignore_ascii_case(auth.as_str().as_bytes()) {
                return Err(bad("bad_host", "Host does not match :authority."));
            }
            Some(h)
        }
        (Version::HTTP_2 | Version::HTTP_3, Some(auth), None) => Some(
            HeaderValue::from_str(auth.as_str())
                .map_err(|_| bad("bad_host", "Invalid :authority."))?,
        ),
        (_, Some(auth), Some(h)) => {
            if !h.as_bytes().eq_ignore_ascii_case(auth.as_str().as_bytes()) {
                return Err(bad(
                    "bad_host",
                    "The absolute-form target's authority does not match Host.",
                ));
            }
            Some(h)
        }
        (_, _, None) => return Err(bad("bad_host", "A Host header is required.")),
        (_, None, Some(h)) => Some(h),
    };
    if let Some(h) = &host {
        let ok = h
            .to_str()
            .ok()
            .and_then(|s| s.parse::<http::uri::Authority>().ok())
            .is_some_and(|a| a.as_str().find('@').is_none() && authority_is_valid(a.as_str()));
        if !ok {
            return Err(bad("bad_host", "Invalid Host header."));
        }
    }
    if let Some(auth) = parts.uri().authority() {
        if auth.as_str().contains('@') {
            return Err(bad(
                "bad_host",
                "User information in the request target is not accepted.",
            ));
        }
    }

    // Upgrades: only WebSocket, only where the route allows it (checked by the caller); never h2c.
    let mut websocket = false;
    let upgrades: Vec<&HeaderValue> = parts.headers().get_all(header::UPGRADE).iter().collect();
    if !upgrades.is_empty() {
        let list: Vec<String> = upgrades
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_ascii_lowercase())
            .collect();
        if list.len() != 1
            || list[0] != "websocket"
            || parts.version() != Version::HTTP_11
            || *parts.method() != Method::GET
        {
            return Err(Reject::UpgradeRefused);
        }
        let connection_upgrade = parts
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        if !connection_upgrade {
            return Err(Reject::UpgradeRefused);
        }
        websocket = true;
    }
    if parts.headers().contains_key(HTTP2_SETTINGS) {
        return Err(Reject::UpgradeRefused);
    }
    Ok(RequestFacts { host, websocket })
}

/// RFC 9110 §7.2 `Host = uri-host [ ":" port ]`, held to what a real host can be: a DNS name
/// (letters, digits, `-`, `.`) or a bracketed IPv6 literal, then nothing or `:` and a port in
/// 1–65535. `http::uri::Authority` alone accepts `gw.test:abc`, `[::1]x`, `a:99999`, `a!b` and
/// `%41`, which backends then read as different hosts.
pub fn authority_is_valid(authority: &str) -> bool {
    let (host, rest) = if let Some(inner) = authority.strip_prefix('[') {
        match inner.split_once(']') {
            Some((ip, rest)) => {
                if ip.is_empty() || ip.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                (None, rest)
            }
            None => return false,
        }
    } else {
        match authority.find(':') {
            Some(i) => (Some(&authority[..i]), &authority[i..]),
            None => (Some(authority), ""),
        }
    };
    if let Some(h) = host {
        let dns = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'.';
        if h.is_empty() || h.len() > 253 || !h.bytes().all(dns) || h.starts_with('.') {
            return false;
        }
    }
    rest.is_empty()
        || rest.strip_prefix(':').is_some_and(|p| {
            (1..=5).contains(&p.len())
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u32>().is_ok_and(|n| (1..=65535).contains(&n))
        })
}

/// The host name of a validated authority, without the port, lower-cased.
pub fn host_name(authority: &str) -> String {
    let name = if authority.starts_with('[') {
        authority
            .split_once(']')
            .map_or(authority, |(h, _)| h)
            .to_string()
            + "]"
    } else {
        authority.split(':').next().unwrap_or(authority).to_string()
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Does `host` (a name from [`host_name`]) match an allow-list entry: an exact name, or
/// `*.example.com` for any name strictly below `example.com` (never `example.com` itself).
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    allowed.iter().any(|a| match a.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None => a == host,
    })
}

/// Validates an `allowed_hosts` entry or a rule's `host`: a DNS name or `*.` plus one.
pub fn host_pattern_ok(h: &str) -> bool {
    let name = h.strip_prefix("*.").unwrap_or(h);
    !name.is_empty() && !name.contains('*') && !name.contains(':') && authority_is_valid(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(lines: &[(&str, &str)], uri: &str, method: &str) -> http::Request<()> {
        let mut b = http::Request::builder().uri(uri).method(method);
        for (k, v) in lines {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn methods() -> Vec<String> {
        vec!["GET".into(), "POST".into()]
    }

    const L: Limits = Limits {
        max_uri_bytes: 100,
        max_header_bytes: 1000,
        max_body_bytes: 1000,
    };

    #[test]
    fn connection_named_headers_go_but_gateway_headers_are_set_after() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("X-Tokengate-Token-Id, keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-tokengate-token-id", HeaderValue::from_static("spoofed"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        strip_owned(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn step_one_rejections() {
        let ok = parts(&[("host", "api.example")], "/x", "GET");
        assert!(check(&ok, &methods(), L).is_ok());
        let cases: Vec<(http::Request<()>, &str)> = vec![
            (parts(&[("host", "a")], "/x", "TRACE"), "method_not_allowed"),
            (
                parts(&[("host", "a")], "/x", "DELETE"),
                "method_not_allowed",
            ),
            (parts(&[], "/x", "GET"), "bad_host"),
            (
                parts(&[("host", "a"), ("host", "b")], "/x", "GET"),
                "bad_host",
            ),
            (parts(&[("host", "a")], "http://b/x", "GET"), "bad_host"),
            (
                parts(&[("host", "a"), ("x_auth_user", "admin")], "/x", "GET"),
                "bad_header",
            ),
            (
                parts(
                    &[("host", "a"), ("upgrade", "h2c"), ("connection", "upgrade")],
                    "/x",
                    "GET",
                ),
                "upgrade_refused",
            ),
            (parts(&[("host", "a b")], "/x", "GET"), "bad_host"),
            (
                parts(&[("host", "a"), ("content-length", "5000")], "/x", "POST"),
                "body_too_large",
            ),
        ];
        for (p, reason) in cases {
            assert_eq!(
                check(&p, &methods(), L).unwrap_err().reason(),
                reason,
                "{p:?}"
            );
        }
        let long = format!("/{}", "a".repeat(200));
        assert_eq!(
            check(&parts(&[("host", "a")], &long, "GET"), &methods(), L)
                .unwrap_err()
                .reason(),
            "uri_too_long"
        );
        let ws = parts(
            &[
                ("host", "a"),
                ("upgrade", "websocket"),
                ("connection", "Upgrade"),
            ],
            "/x",
            "GET",
        );
        assert!(check(&ws, &methods(), L).unwrap().websocket);
    }

    #[test]
    fn owned_families_and_host_ports() {
        let mut h = HeaderMap::new();
        for n in [
            "x-tokengate-role",
            "x-forwarded-server",
            "x-forwarded-ssl",
            "x-forwarded-user",
        ] {
            h.insert(
                HeaderName::from_static(n),
                HeaderValue::from_static("spoof"),
            );
        }
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_owned(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        for (host, ok) in [
            ("a", true),
            ("a:8080", true),
            ("[::1]", true),
            ("[::1]:80", true),
            ("a:abc", false),
            ("a:", false),
            ("a:80:80", false),
            ("a:123456", false),
            ("[::1]x", false),
            ("[::1", false),
            ("a:99999", false),
            ("a:0", false),
            ("a:65535", true),
            ("a!b", false),
            ("%61", false),
            ("a_b", false),
            ("[zz]", false),
        ] {
            let got = check(&parts(&[("host", host)], "/x", "GET"), &methods(), L);
            assert_eq!(got.is_ok(), ok, "{host}: {got:?}");
        }
    }

    #[test]
    fn host_allow_lists_and_cookie_stripping() {
        let allowed = vec!["api.example.com".to_string(), "*.example.com".to_string()];
        for (h, ok) in [
            ("api.example.com", true),
            ("eu.example.com", true),
            ("a.b.example.com", true),
            ("example.com", false),
            ("xexample.com", false),
            ("api.example.com.evil", false),
        ] {
            assert_eq!(host_allowed(h, &allowed), ok, "{h}");
        }
        assert_eq!(host_name("API.Example.COM.:8443"), "api.example.com");
        assert_eq!(host_name("[::1]:80"), "[::1]");

        let mut h = HeaderMap::new();
        h.append(
            "cookie",
            HeaderValue::from_static("a=1; tokengate_session=s"),
        );
        h.append(
            "cookie",
            HeaderValue::from_static("__Host-tokengate_session=s;b=2"),
        );
        strip_gateway_cookies(&mut h);
        assert_eq!(h.get_all("cookie").iter().collect::<Vec<_>>(), ["a=1; b=2"]);
        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("tokengate_session=s"));
        strip_gateway_cookies(&mut h);
        assert!(!h.contains_key("cookie"));
    }
}
