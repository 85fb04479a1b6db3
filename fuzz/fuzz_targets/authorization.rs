//! Fuzzes `tokengate::auth::extract` (SPEC §1 step 3) with arbitrary header bytes: it never panics,
//! is deterministic, ignores every header but `Authorization`, accepts only exactly one
//! `Bearer <b64token>` with no token in the query, and its rejections never echo the credential.
//!
//! Input: the first byte's low two bits give the number of `Authorization` headers (0-3) and bit 2
//! says whether a query follows; the rest is split on NUL bytes (which no header value may hold)
//! into the header values, then the query, then unrelated headers.
//!
//! Run from the repository root (nightly, or `RUSTC_BOOTSTRAP=1` on stable):
//! `cargo fuzz run authorization -- -max_total_time=600`

#![no_main]

use http::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tokengate::auth::{extract, parse};
use tokengate::error::{Reject, respond};

const REASONS: &[&str] = &[
    "missing_token",
    "unsupported_scheme",
    "duplicate_authorization",
    "malformed",
    "token_in_query",
];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let n_auth = usize::from(flags & 0b11);
    let has_query = flags & 0b100 != 0;
    let mut chunks = rest.split(|&b| b == 0);

    let mut auth_values: Vec<HeaderValue> = Vec::new();
    for _ in 0..n_auth {
        if let Some(v) = chunks.next().and_then(|c| HeaderValue::from_bytes(c).ok()) {
            auth_values.push(v);
        }
    }
    let query = if has_query {
        chunks.next().and_then(|q| std::str::from_utf8(q).ok())
    } else {
        None
    };

    let mut only_auth = HeaderMap::new();
    for v in &auth_values {
        only_auth.append(AUTHORIZATION, v.clone());
    }
    let mut full = only_auth.clone();
    for (i, c) in chunks.enumerate().take(8) {
        if let Ok(v) = HeaderValue::from_bytes(c) {
            let name = HeaderName::from_bytes(format!("x-other-{i}").as_bytes()).unwrap();
            full.append(name, v);
        }
    }

    let result = extract(&full, query);
    // Deterministic, and blind to every other header.
    assert_eq!(result, extract(&full, query));
    assert_eq!(result, extract(&only_auth, query));

    // RFC 6750 §2.3 names and their near misses (any case, any percent-encoding, `[]`, `-`, `_`,
    // `.` and spaces ignored), the API-key spellings, or a well-formed token as any value,
    // anywhere in the query.
    let query_token = query.is_some_and(|q| {
        q.split(['&', ';']).any(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = form_decode(name).to_ascii_lowercase();
            let key: String = name
                .split('[')
                .next()
                .unwrap_or("")
                .chars()
                .filter(|c| !matches!(c, '-' | '_' | '.') && !c.is_whitespace())
                .collect();
            [
                "accesstoken",
                "token",
                "apikey",
                "authtoken",
                "bearer",
                "bearertoken",
                "authorization",
            ]
            .contains(&key.as_str())
                || parse(form_decode(value).trim()).is_ok()
        })
    });

    match result {
        Ok(credential) => {
            assert!(!query_token, "accepted a token in the query {query:?}");
            assert_eq!(
                auth_values.len(),
                1,
                "accepted with {} Authorization headers",
                auth_values.len()
            );
            let value = auth_values[0]
                .to_str()
                .expect("an accepted value is visible ASCII");
            let (scheme, after) = value.split_at(6);
            assert!(scheme.eq_ignore_ascii_case("bearer"), "scheme of {value:?}");
            assert!(
                after.starts_with(' '),
                "no space after the scheme in {value:?}"
            );
            assert!(
                after.trim_start_matches(' ').starts_with(credential),
                "{value:?} -> {credential:?}"
            );
            assert!(
                value.trim_end_matches([' ', '\t']).ends_with(credential),
                "{value:?} -> {credential:?}"
            );
            assert!(is_b64token(credential), "not a b64token: {credential:?}");
            // Step 4 must not panic on whatever step 3 lets through.
            if let Ok(parsed) = parse(credential) {
                let prefix = parsed.display_prefix();
                assert!(
                    credential.starts_with(prefix),
                    "{prefix:?} is not a prefix of the token"
                );
                assert!(prefix.contains('_'));
                assert_eq!(parsed.hash(), tokengate::token::hash(credential));
            }
        }
        Err(reject) => {
            let reason = reject.reason();
            assert!(REASONS.contains(&reason), "unexpected reason {reason}");
            assert!(
                matches!(
                    reject,
                    Reject::MissingToken { .. } | Reject::InvalidRequest { .. }
                ),
                "{reject:?}"
            );
            if query_token {
                assert_eq!(reason, "token_in_query");
            } else if auth_values.is_empty() {
                assert_eq!(reason, "missing_token");
            } else if auth_values.len() > 1 {
                assert_eq!(reason, "duplicate_authorization");
            }
            let status = reject.status().as_u16();
            assert!(status == 400 || status == 401, "{status}");
            let challenge = reject
                .challenge("tg")
                .expect("every step-3 rejection carries a challenge");
            assert!(challenge.starts_with("Bearer realm=\"tg\""), "{challenge}");
            // Nothing the client sent is echoed back in the response head.
            let resp = respond(&reject, "tg", "rid");
            for v in &auth_values {
                // The credential part: after the scheme, a run of b64token characters. Only ones
                // with a digit and 10+ characters are checked, so fixed text in the challenge
                // ("Malformed Authorization header") cannot match by accident.
                let sent = String::from_utf8_lossy(v.as_bytes());
                let secret = sent.split_once(' ').map_or("", |(_, s)| s).trim();
                if secret.len() >= 10
                    && is_b64token(secret)
                    && secret.bytes().any(|b| b.is_ascii_digit())
                {
                    for (name, h) in resp.headers() {
                        let h = String::from_utf8_lossy(h.as_bytes());
                        assert!(!h.contains(secret), "{name} echoes the credential: {h}");
                    }
                }
            }
        }
    }
});

/// RFC 6750 §2.1: `b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_b64token(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-._~+/".contains(&c))
}

/// `application/x-www-form-urlencoded` name decoding: `%XX` escapes and `+` as space.
fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())
            .filter(|_| b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
