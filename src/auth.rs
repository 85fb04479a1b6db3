//! Authentication (SPEC §1 steps 3–5): extract the Bearer credential, check its format and
//! checksum, then judge the stored token (revoked, expired, account disabled, IP allowlist).
//!
//! Owns: credential extraction and the token verdict (`judge`). Must never import `config`,
//! `gateway`, `pipeline`, `admin` or `cli`: it judges what it is given.

use std::net::IpAddr;

use http::HeaderMap;
use http::header::AUTHORIZATION;
use ipnet::IpNet;

use crate::cache::CachedToken;
use crate::error::Reject;
use crate::store::TokenRow;
use crate::token::{self, ParsedToken};

/// Step 3: exactly one `Authorization: Bearer <b64token>` header, and no token in the query.
///
/// RFC 6750 §2.1: `credentials = "Bearer" 1*SP b64token`, the scheme is case-insensitive
/// (RFC 9110 §11.1). RFC 6750 §2.3 (query parameter) is deliberately not supported.
pub fn extract<'a>(headers: &'a HeaderMap, query: Option<&str>) -> Result<&'a str, Reject> {
    if let Some(q) = query {
        if query_has_token(q) {
            return Err(Reject::InvalidRequest {
                reason: "token_in_query",
                message: "Tokens are not accepted in the query string; send `Authorization: Bearer <token>`.",
            });
        }
    }
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(Reject::MissingToken {
            reason: "missing_token",
        });
    };
    if values.next().is_some() {
        return Err(Reject::InvalidRequest {
            reason: "duplicate_authorization",
            message: "Send exactly one Authorization header.",
        });
    }
    let malformed = Reject::InvalidRequest {
        reason: "malformed",
        message: "Malformed Authorization header: expected `Bearer <token>`.",
    };
    let value = value.to_str().map_err(|_| malformed.clone())?;
    let (scheme, rest) = match value.find(' ') {
        Some(i) => (&value[..i], &value[i..]),
        None => (value, ""),
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        if scheme.is_empty() || !scheme.bytes().all(is_tchar) {
            return Err(malformed);
        }
        return Err(Reject::MissingToken {
            reason: "unsupported_scheme",
        });
    }
    let credential = rest.trim_start_matches(' ').trim_end_matches([' ', '\t']);
    if credential.is_empty() || !is_b64token(credential) {
        return Err(malformed);
    }
    Ok(credential)
}

/// Query parameter names, normalised by [`token_param_key`], that carry a credential: the RFC 6750
/// §2.3 name and its near misses (`accessToken`, `ACCESS-TOKEN`, `access_token[]`, `token%20`),
/// and the usual API-key spellings (`api_key`, `apiKey`, `auth_token`, `bearer`, ...).
const TOKEN_PARAMS: &[&str] = &[
    "accesstoken",
    "token",
    "apikey",
    "authtoken",
    "bearer",
    "bearertoken",
    "authorization",
];

/// The comparable form of a query parameter name: percent-decoded (`+` as space),
/// lower-cased, array brackets dropped (`token[]`, `token[0]`), and `-`, `_`, `.` and spaces
/// removed, so `Access-Token`, `access_token[]` and `token%20` all read as their plain name.
fn token_param_key(name: &str) -> String {
    let decoded = percent_decode_lossy(name).to_ascii_lowercase();
    let base = decoded.split('[').next().unwrap_or("");
    base.chars()
        .filter(|c| !matches!(c, '-' | '_' | '.') && !c.is_whitespace())
        .collect()
}

/// A credential anywhere in the query: a parameter named like one ([`TOKEN_PARAMS`]), or a
/// value that is a well-formed tokengate token under any name.
fn query_has_token(q: &str) -> bool {
    q.split(['&', ';']).any(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if TOKEN_PARAMS.contains(&token_param_key(name).as_str()) {
            return true;
        }
        let value = percent_decode_lossy(value);
        token::parse(value.trim()).is_ok()
    })
}

fn percent_decode_lossy(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hexval(b[i + 1]), hexval(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hexval(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// `b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`
fn is_b64token(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-._~+/".contains(&c))
}

/// Step 4: format and checksum; no store access.
pub fn parse(credential: &str) -> Result<ParsedToken<'_>, Reject> {
    token::parse(credential).map_err(|e| Reject::InvalidToken { reason: e.reason() })
}

/// Step 5 (after the lookup): is this token usable now, from this client?
pub fn judge(entry: &CachedToken, now_ms: i64, client_ip: IpAddr) -> Result<(), Reject> {
    verdict(
        &Standing {
            revoked: entry.revoked(),
            account_disabled: entry.account_disabled(),
            expires_at: entry.expires_at(),
            rotation_deadline: entry.rotation_deadline(),
            allowed_cidrs: entry.allowed_cidrs(),
        },
        now_ms,
        client_ip,
    )
}

/// [`judge`] for a row read from the store by id (a web UI session's sign-in token).
pub fn judge_row(row: &TokenRow, now_ms: i64, client_ip: IpAddr) -> Result<(), Reject> {
    verdict(
        &Standing {
            revoked: row.revoked_at.is_some(),
            account_disabled: row.account_disabled_at.is_some(),
            expires_at: row.expires_at,
            rotation_deadline: row.rotation_deadline,
            allowed_cidrs: &row.allowed_cidrs,
        },
        now_ms,
        client_ip,
    )
}

/// The facts step 5 judges, whichever form the token was read in.
struct Standing<'a> {
    revoked: bool,
    account_disabled: bool,
    expires_at: Option<i64>,
    rotation_deadline: Option<i64>,
    allowed_cidrs: &'a [IpNet],
}

fn verdict(t: &Standing<'_>, now_ms: i64, client_ip: IpAddr) -> Result<(), Reject> {
    if t.revoked {
        return Err(Reject::InvalidToken { reason: "revoked" });
    }
    if t.account_disabled {
        return Err(Reject::InvalidToken {
            reason: "account_disabled",
        });
    }
    if t.expires_at.is_some_and(|e| e <= now_ms) {
        return Err(Reject::InvalidToken { reason: "expired" });
    }
    if t.rotation_deadline.is_some_and(|d| d <= now_ms) {
        return Err(Reject::InvalidToken { reason: "revoked" });
    }
    if !t.allowed_cidrs.is_empty() {
        let ip = match client_ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(client_ip),
            v4 => v4,
        };
        if !t.allowed_cidrs.iter().any(|n| n.contains(&ip)) {
            return Err(Reject::InvalidToken {
                reason: "ip_not_allowed",
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(values: &[&str]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for v in values {
            m.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn extraction_cases() {
        assert_eq!(extract(&h(&["Bearer abc"]), None).unwrap(), "abc");
        assert_eq!(extract(&h(&["bEaReR   abc  "]), None).unwrap(), "abc");
        assert_eq!(extract(&h(&["Bearer abc=="]), None).unwrap(), "abc==");
        assert_eq!(
            extract(&h(&[]), None).unwrap_err().reason(),
            "missing_token"
        );
        assert_eq!(
            extract(&h(&["Basic dXNlcjpwdw=="]), None)
                .unwrap_err()
                .reason(),
            "unsupported_scheme"
        );
        assert_eq!(
            extract(&h(&["Bearer a", "Bearer b"]), None)
                .unwrap_err()
                .reason(),
            "duplicate_authorization"
        );
        for bad in [
            "Bearer",
            "Bearer ",
            "Bearer a b",
            "Bearer a,b",
            "Bearer =abc",
            "Bearer ab\"c",
            "(bad) x",
        ] {
            assert_eq!(
                extract(&h(&[bad]), None).unwrap_err().reason(),
                "malformed",
                "{bad}"
            );
        }
        for q in [
            "access_token=x",
            "a=1&token=y",
            "ACCESS_TOKEN=z",
            "%61ccess_token=q",
            "x=1;token=2",
            "access_token[]=x",
            "accessToken=x",
            "token%20=x",
            "access-token=x",
            "Access.Token=x",
            "api_key=x",
            "apiKey=x",
            "API-KEY=x",
            "auth_token=x",
            "token[0]=x",
            "bearer=x",
        ] {
            assert_eq!(
                extract(&h(&["Bearer abc"]), Some(q)).unwrap_err().reason(),
                "token_in_query",
                "{q}"
            );
        }
        assert!(extract(&h(&["Bearer abc"]), Some("tokens=1&my_token=2")).is_ok());
        assert!(extract(&h(&["Bearer abc"]), Some("page=2&token_type=x&csrf=1")).is_ok());
        // A real token's shape under any name is refused too.
        let t = crate::token::generate("tg");
        let q = format!("q={}", t.plaintext);
        assert_eq!(
            extract(&h(&["Bearer abc"]), Some(&q)).unwrap_err().reason(),
            "token_in_query"
        );
    }
}
