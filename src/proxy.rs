//! Forwarding (SPEC §1 step 9): builds the upstream request from the canonical path, streams both
//! bodies, and cleans the upstream response.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::body::{Body, BodyOutcome, Guarded};
use crate::cache::CachedToken;
use crate::config::RouteConfig;
use crate::hygiene;
use crate::pool::{Pool, PooledBody};

/// Pooled keep-alive HTTP/1.1 client to the upstreams ([`crate::pool`]): `request(req)` sends a
/// request built by [`upstream_request`].
pub type UpstreamClient = Pool;

/// Builds the shared upstream client: 60 s idle timeout, 1024 idle connections per upstream,
/// 5 s connect timeout, TCP_NODELAY, TCP keepalive 60 s.
pub fn client() -> UpstreamClient {
    Pool::default()
}

/// What the gateway knows about the caller, for the forwarded headers.
pub struct ForwardInfo<'a> {
    /// Canonical path.
    pub path: &'a str,
    /// Untouched query.
    pub query: Option<&'a str>,
    /// Client IP (after trusted proxies).
    pub client_ip: IpAddr,
    /// `http` or `https` (the public listener).
    pub proto: &'static str,
    /// Host the client used.
    pub host: Option<HeaderValue>,
    /// Request id.
    pub request_id: &'a str,
    /// Authenticated token (None on public rules).
    pub token: Option<&'a CachedToken>,
    /// WebSocket upgrade.
    pub websocket: bool,
    /// Body limit.
    pub max_body_bytes: u64,
    /// Body idle timeout.
    pub body_idle: Duration,
}

/// `ip.to_string()` without the formatting machinery for IPv4 (every request formats the client
/// address twice: the forwarded headers and the audit line).
pub fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            for (i, &o) in v4.octets().iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                if o >= 100 {
                    s.push(char::from(b'0' + o / 100));
                }
                if o >= 10 {
                    s.push(char::from(b'0' + o / 10 % 10));
                }
                s.push(char::from(b'0' + o % 10));
            }
            s
        }
        IpAddr::V6(_) => ip.to_string(),
    }
}

// Header names, parsed once (inserting by `&str` parses the name on every call).
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_TOKENGATE_TOKEN_ID: HeaderName = HeaderName::from_static("x-tokengate-token-id");
const X_TOKENGATE_TOKEN_NAME: HeaderName = HeaderName::from_static("x-tokengate-token-name");
const X_TOKENGATE_ACCOUNT: HeaderName = HeaderName::from_static("x-tokengate-account");
const X_TOKENGATE_PERMISSIONS: HeaderName = HeaderName::from_static("x-tokengate-permissions");

/// Builds the upstream request: the request line is the canonical path plus the untouched query;
/// hop-by-hop and client copies of gateway-owned headers are removed before ours are set.
pub fn upstream_request(
    parts: http::request::Parts,
    body: Incoming,
    route: &RouteConfig,
    info: &ForwardInfo<'_>,
    outcome: BodyOutcome,
) -> Request<Body> {
    let uri = Uri::builder()
        .scheme(route.upstream_scheme.clone())
        .authority(route.upstream.clone())
        .path_and_query(path_and_query(info))
        .build()
        .expect("canonical path and validated query form a URI");
    let headers = upstream_headers(parts.headers, route, info);
    let body = Guarded::new(body, info.max_body_bytes, info.body_idle, outcome).boxed_unsync();
    let mut req = Request::new(body);
    *req.method_mut() = parts.method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

/// The upstream request's target: the canonical path plus the untouched query.
pub fn path_and_query(info: &ForwardInfo<'_>) -> String {
    let mut pq = String::with_capacity(info.path.len() + info.query.map_or(0, |q| q.len() + 1));
    pq.push_str(info.path);
    if let Some(q) = info.query {
        pq.push('?');
        pq.push_str(q);
    }
    pq
}

/// The upstream request's headers (hyper's path and the HTTP/1 fast path share them): hop-by-hop
/// headers, client copies of gateway-owned headers, the client's framing and session cookie
/// removed, then the Host, forwarding, request id and identity headers set. Framing
/// (`Content-Length`, `Transfer-Encoding`) is the sender's to add.
pub fn upstream_headers(
    mut headers: http::HeaderMap,
    route: &RouteConfig,
    info: &ForwardInfo<'_>,
) -> http::HeaderMap {
    hygiene::strip_hop_by_hop(&mut headers);
    hygiene::strip_owned(&mut headers);
    hygiene::strip_invalid_trace_context(&mut headers);
    // hyper re-frames the body; the client's framing is never copied.
    headers.remove(header::CONTENT_LENGTH);
    if !route.forward_authorization {
        headers.remove(header::AUTHORIZATION);
    }
    hygiene::strip_gateway_cookies(&mut headers);
    // The upstream sees its own authority (nginx's `$proxy_host`) unless the route passes the
    // client's (allow-listed) Host through; the client's Host travels as X-Forwarded-Host.
    if route.pass_host {
        if let Some(h) = &info.host {
            headers.insert(header::HOST, h.clone());
        }
    } else if let Ok(v) = HeaderValue::from_str(route.upstream.as_str()) {
        headers.insert(header::HOST, v);
    }
    if let Some(h) = &info.host {
        headers.insert(X_FORWARDED_HOST, h.clone());
    }
    let ip = ip_text(info.client_ip);
    let ip_value = HeaderValue::from_str(&ip).expect("an IP is a valid header value");
    headers.insert(X_FORWARDED_FOR, ip_value.clone());
    headers.insert(X_REAL_IP, ip_value);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(info.proto));
    // RFC 7239: `for=1.2.3.4;proto=http;host="h"`, an IPv6 address quoted and bracketed.
    let host = info.host.as_ref().and_then(|h| h.to_str().ok());
    let mut forwarded = String::with_capacity(32 + ip.len() + host.map_or(0, str::len));
    forwarded.push_str("for=");
    if info.client_ip.is_ipv6() {
        forwarded.push_str("\"[");
        forwarded.push_str(&ip);
        forwarded.push_str("]\"");
    } else {
        forwarded.push_str(&ip);
    }
    forwarded.push_str(";proto=");
    forwarded.push_str(info.proto);
    if let Some(h) = host {
        forwarded.push_str(";host=\"");
        forwarded.push_str(h);
        forwarded.push('"');
    }
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert(header::FORWARDED, v);
    }
    if let Ok(v) = HeaderValue::from_str(info.request_id) {
        headers.insert(X_REQUEST_ID, v);
    }
    if let Some(t) = info.token {
        identity_headers(&mut headers, t);
    }
    if info.websocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    headers
}

/// Sets the identity headers of a token (`X-Tokengate-Token-Id`, `-Token-Name`, `-Account`,
/// `-Permissions`): on the upstream request in proxy mode, on the 200 answer in forward-auth mode.
pub fn identity_headers(headers: &mut http::HeaderMap, t: &CachedToken) {
    let set = |headers: &mut http::HeaderMap, name: HeaderName, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            headers.insert(name, v);
        }
    };
    set(headers, X_TOKENGATE_TOKEN_ID, t.id());
    set(headers, X_TOKENGATE_TOKEN_NAME, t.name());
    set(headers, X_TOKENGATE_ACCOUNT, t.account());
    set(headers, X_TOKENGATE_PERMISSIONS, t.permissions_header());
}

/// The identity headers with empty values (forward-auth mode, a request without a token).
pub fn empty_identity_headers(headers: &mut http::HeaderMap) {
    for name in [
        X_TOKENGATE_TOKEN_ID,
        X_TOKENGATE_TOKEN_NAME,
        X_TOKENGATE_ACCOUNT,
        X_TOKENGATE_PERMISSIONS,
    ] {
        headers.insert(name, HeaderValue::from_static(""));
    }
}

/// Cleans the upstream response head and wraps its body with the idle guard.
pub fn downstream_response(resp: Response<PooledBody>, body_idle: Duration) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    let upgrade = parts.status == http::StatusCode::SWITCHING_PROTOCOLS;
    hygiene::strip_hop_by_hop(&mut parts.headers);
    if upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts
            .headers
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    let body = Guarded::new(body, u64::MAX, body_idle, BodyOutcome::default()).boxed_unsync();
    Response::from_parts(parts, body)
}

/// After a 101 from the upstream: splice the two upgraded connections together.
pub fn splice_upgrade(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (c, u) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "websocket upgrade failed");
                return;
            }
        };
        let mut c = TokioIo::new(c);
        let mut u = TokioIo::new(u);
        if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
            tracing::debug!(error = %e, "websocket connection ended");
        }
    });
}

/// An empty body for a `Bytes` request (used by internal calls).
pub fn bytes_body(b: Bytes) -> Body {
    crate::body::full(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_text_matches_display() {
        let samples = [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.100.9",
            "127.0.0.1",
            "1.22.133.4",
            "99.100.199.200",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.0.0.1",
        ];
        for t in samples {
            let ip: IpAddr = t.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string(), "{t}");
        }
        for n in (0..=u32::MAX).step_by(16_777_259) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(n));
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }
}
