//! Forward-auth mode (docs/forward-auth.md): reading the request a front proxy (nginx
//! `auth_request`, Traefik `ForwardAuth`, Caddy `forward_auth`, Envoy `ext_authz` over HTTP)
//! describes to the endpoint `[forward_auth] path`, in the header dialect it sends.
//!
//! Owns: recognising the endpoint on a raw path ([`endpoint`]), the trust check and turning an
//! auth request into the described request ([`describe`]) that the pipeline then runs its phases
//! on, exactly as in proxy mode, and the parts of the answer only this mode has ([`allowed`],
//! [`error_header`], the audit [`mode`]). Holds no state; never imports `gateway`, `pipeline` or
//! `admin`.
//!
//! Dialects, told apart by what is present (more than one of them, or a repeated header, is
//! refused as ambiguous: a client can smuggle one dialect's headers through a proxy that only sets
//! the other's):
//! - Envoy: the original path (and query) follows the endpoint path; method and Host are the
//!   auth request's own.
//! - nginx: `X-Original-URI`, optional `X-Original-Method` (the subrequest keeps the method),
//!   host from `X-Forwarded-Host`, else `Host`.
//! - Traefik and Caddy: `X-Forwarded-Uri` and `X-Forwarded-Method` (both required), host from
//!   `X-Forwarded-Host`, else `Host`. `X-Forwarded-Proto` is read by no phase and dropped.

use std::net::IpAddr;
use std::str::FromStr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Version};

use crate::body::Body;
use crate::cache::CachedToken;
use crate::config::Config;
use crate::error::Reject;
use crate::proxy::{X_FORWARDED_HOST, X_FORWARDED_PROTO};
use crate::{hygiene, proxy};

const X_TOKENGATE_ERROR: HeaderName = HeaderName::from_static("x-tokengate-error");

const X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
const X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
const X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
const X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");

/// The describing headers: never part of the described request.
const DESCRIBING: [HeaderName; 6] = [
    X_ORIGINAL_URI,
    X_ORIGINAL_METHOD,
    X_FORWARDED_URI,
    X_FORWARDED_METHOD,
    X_FORWARDED_HOST,
    X_FORWARDED_PROTO,
];

/// The configured endpoint, when the raw request path asks for it (`[forward_auth]` present).
pub fn endpoint<'c>(cfg: &'c Config, raw_path: &str) -> Option<&'c str> {
    let fa = cfg.forward_auth.as_ref()?;
    is_endpoint(raw_path, &fa.path).then_some(fa.path.as_str())
}

/// The audit line's `mode`.
pub fn mode(forward_auth: bool) -> &'static str {
    if forward_auth {
        "forward_auth"
    } else {
        "proxy"
    }
}

/// The answer to an allowed decision: 200, empty, with the identity headers (the caller adds the
/// gateway's own: `X-Request-Id`, `RateLimit-*`). Without a token (a public rule) they are present
/// but empty, so a front proxy that copies them (Caddy's `copy_headers`) copies nothing rather
/// than a placeholder.
pub fn allowed(token: Option<&CachedToken>) -> Response<Body> {
    let mut resp = Response::new(crate::body::empty());
    match token {
        Some(t) => proxy::identity_headers(resp.headers_mut(), t),
        None => proxy::empty_identity_headers(resp.headers_mut()),
    }
    resp
}

/// Adds the refusal's JSON body as `X-Tokengate-Error`: nginx's `auth_request` drops the body of
/// a denial, but can copy a header.
pub fn error_header(resp: &mut Response<Body>, reject: &Reject, request_id: &str) {
    let body = crate::error::body_json(reject, request_id);
    if let Ok(v) = HeaderValue::from_str(&body) {
        resp.headers_mut().insert(X_TOKENGATE_ERROR, v);
    }
}

/// Whether the raw request path asks the forward-auth endpoint `endpoint`: exactly it, or it
/// followed by `/` (Envoy's `path_prefix` with the original path appended).
pub fn is_endpoint(raw_path: &str, endpoint: &str) -> bool {
    raw_path.starts_with(endpoint)
        && matches!(raw_path.as_bytes().get(endpoint.len()), None | Some(b'/'))
}

fn bad(reason: &'static str, message: &str) -> Reject {
    Reject::BadRequest {
        reason,
        message: message.to_string(),
    }
}

/// At most one value of `name`, as text.
fn one<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Result<Option<&'h str>, Reject> {
    let mut values = headers.get_all(name).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(bad(
            "forward_auth_ambiguous",
            &format!("The forward-auth request carries `{name}` more than once."),
        ));
    }
    v.to_str().map(Some).map_err(|_| {
        bad(
            "forward_auth_ambiguous",
            &format!("The forward-auth request's `{name}` is not visible ASCII."),
        )
    })
}

/// The request the front proxy describes: original method, URI (path and query, origin-form)
/// and Host, with the auth request's other headers (credentials, `X-Forwarded-For`, ...) minus the
/// describing and hop-by-hop ones. No body. `req`'s path starts with `endpoint` ([`is_endpoint`]).
/// A `peer` outside `trusted` is refused (`forward_auth_untrusted`) before anything is read.
pub fn describe<B>(
    req: &Request<B>,
    endpoint: &str,
    peer: IpAddr,
    trusted: &[ipnet::IpNet],
) -> Result<Request<()>, Reject> {
    if !crate::forwarded::is_trusted(peer, trusted) {
        return Err(Reject::ForwardAuthUntrusted);
    }
    let h = req.headers();
    let pq = req.uri().path_and_query().map_or("", |pq| pq.as_str());
    let suffix = pq.get(endpoint.len()..).unwrap_or("");
    let envoy = suffix.starts_with('/');
    let original_uri = one(h, &X_ORIGINAL_URI)?;
    let forwarded_uri = one(h, &X_FORWARDED_URI)?;
    let host_header = || -> Result<Option<&str>, Reject> {
        Ok(one(h, &X_FORWARDED_HOST)?.or(one(h, &header::HOST)?))
    };
    let (method, uri, host) = match (envoy, original_uri, forwarded_uri) {
        (true, None, None) => (req.method().clone(), suffix, one(h, &header::HOST)?),
        (false, Some(uri), None) => {
            let method = match one(h, &X_ORIGINAL_METHOD)? {
                Some(m) => parse_method(m)?,
                None => req.method().clone(),
            };
            (method, uri, host_header()?)
        }
        (false, None, Some(uri)) => {
            let m = one(h, &X_FORWARDED_METHOD)?.ok_or_else(|| {
                bad(
                    "forward_auth_missing_method",
                    "X-Forwarded-Uri needs X-Forwarded-Method.",
                )
            })?;
            (parse_method(m)?, uri, host_header()?)
        }
        (false, None, None) => {
            return Err(bad(
                "forward_auth_missing_uri",
                "The forward-auth request does not say which URI to judge: send X-Original-URI (nginx) or X-Forwarded-Uri and X-Forwarded-Method (Traefik, Caddy), or append the path (Envoy).",
            ));
        }
        _ => {
            return Err(bad(
                "forward_auth_ambiguous",
                "The forward-auth request describes its URI in more than one way.",
            ));
        }
    };
    let bad_uri = || bad("bad_path", "The described URI is not an origin-form path.");
    if !uri.starts_with('/') || uri.contains('#') {
        return Err(bad_uri());
    }
    let pq = PathAndQuery::from_str(uri).map_err(|_| bad_uri())?;
    if pq.as_str() != uri {
        return Err(bad_uri());
    }
    let mut headers = h.clone();
    hygiene::strip_hop_by_hop(&mut headers);
    for name in DESCRIBING {
        headers.remove(name);
    }
    headers.remove(header::HOST);
    if let Some(host) = host {
        let v = HeaderValue::from_str(host).map_err(|_| bad("bad_host", "Invalid Host header."))?;
        headers.insert(header::HOST, v);
    }
    let mut described = Request::new(());
    *described.method_mut() = method;
    *described.uri_mut() = http::Uri::from(pq);
    *described.version_mut() = Version::HTTP_11;
    *described.headers_mut() = headers;
    Ok(described)
}

fn parse_method(m: &str) -> Result<Method, Reject> {
    Method::from_bytes(m.as_bytes()).map_err(|_| {
        bad(
            "method_not_allowed",
            "The described method is not a valid HTTP method.",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EP: &str = "/_tokengate/auth";
    const LO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn trusted() -> Vec<ipnet::IpNet> {
        vec!["127.0.0.1/32".parse().unwrap()]
    }

    fn auth(path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method("GET").uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn endpoint_is_the_path_or_the_path_and_a_slash() {
        assert!(is_endpoint(EP, EP));
        assert!(is_endpoint("/_tokengate/auth/api/x", EP));
        assert!(!is_endpoint("/_tokengate/authx", EP));
        assert!(!is_endpoint("/_tokengate/aut", EP));
    }

    #[test]
    fn each_dialect_is_read() {
        let nginx = auth(
            EP,
            &[
                ("host", "tg.internal"),
                ("x-original-uri", "/api/items?x=1"),
                ("x-original-method", "DELETE"),
                ("x-forwarded-host", "api.example"),
                ("authorization", "Bearer x"),
            ],
        );
        let d = describe(&nginx, EP, LO, &trusted()).unwrap();
        assert_eq!(d.method(), Method::DELETE);
        assert_eq!(d.uri().to_string(), "/api/items?x=1");
        assert_eq!(d.headers()["host"], "api.example");
        assert_eq!(d.headers()["authorization"], "Bearer x");
        assert!(!d.headers().contains_key("x-original-uri"));

        let caddy = auth(
            EP,
            &[
                ("host", "api.example"),
                ("x-forwarded-uri", "/api/a"),
                ("x-forwarded-method", "POST"),
            ],
        );
        let d = describe(&caddy, EP, LO, &trusted()).unwrap();
        assert_eq!((d.method(), d.uri().path()), (&Method::POST, "/api/a"));
        assert_eq!(d.headers()["host"], "api.example");

        let envoy = auth("/_tokengate/auth/api/a%2Fb?q=1", &[("host", "api.example")]);
        let d = describe(&envoy, EP, LO, &trusted()).unwrap();
        assert_eq!(d.uri().to_string(), "/api/a%2Fb?q=1");
        assert_eq!(d.method(), Method::GET);
    }

    #[test]
    fn missing_ambiguous_and_bad_descriptions_are_refused() {
        let reason = |r: Request<()>| describe(&r, EP, LO, &trusted()).unwrap_err().reason();
        assert_eq!(reason(auth(EP, &[])), "forward_auth_missing_uri");
        let other: IpAddr = "192.0.2.1".parse().unwrap();
        let e = describe(
            &auth(EP, &[("x-original-uri", "/a")]),
            EP,
            other,
            &trusted(),
        );
        assert_eq!(e.unwrap_err().reason(), "forward_auth_untrusted");
        assert_eq!(
            reason(auth(
                EP,
                &[("x-original-uri", "/a"), ("x-forwarded-uri", "/b")]
            )),
            "forward_auth_ambiguous"
        );
        assert_eq!(
            reason(auth("/_tokengate/auth/a", &[("x-forwarded-uri", "/b")])),
            "forward_auth_ambiguous"
        );
        assert_eq!(
            reason(auth(
                EP,
                &[("x-original-uri", "/a"), ("x-original-uri", "/b")]
            )),
            "forward_auth_ambiguous"
        );
        assert_eq!(
            reason(auth(EP, &[("x-forwarded-uri", "/a")])),
            "forward_auth_missing_method"
        );
        for uri in ["a", "*", "http://evil/a", "/a#b"] {
            assert_eq!(
                reason(auth(EP, &[("x-original-uri", uri)])),
                "bad_path",
                "{uri}"
            );
        }
    }
}
