//! Attacks as tests (issue 3, SPEC §5): a raw-TCP corpus of request targets that try to reach
//! `/admin` with a token that may only read `/apps/**`, request smuggling, and spoofed identity and
//! forwarding headers. Every case asserts the status, the response body and challenge, the audit
//! line, and exactly what the recording upstream received.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::*;
use tokengate::path::canonicalise;

/// The Host every corpus request uses.
const HOST: &str = "gw.test";

/// What a corpus case must lead to.
#[derive(Debug, Clone)]
enum Want {
    /// Forwarded (200, audit `ok`); the upstream received exactly this request target.
    Fwd(String),
    /// Refused by the gateway with this status and audit reason; nothing forwarded.
    Deny(u16, &'static str),
    /// Refused by hyper's HTTP/1 parser with a bare 400 before the gateway saw a request: no
    /// request id in the answer, nothing forwarded; the audit line (reason `bad_request_http`,
    /// no path, no token) is written when the connection ends.
    Parser400,
}

/// One corpus entry: a label, the raw request bytes, and the expectation.
struct Case {
    label: String,
    /// The request target, for plain `GET` cases with the standard headers (also sent over HTTP/2).
    target: Option<String>,
    request: Vec<u8>,
    want: Want,
}

fn fwd(target: &str) -> Want {
    Want::Fwd(target.to_string())
}

const BAD_PATH: Want = Want::Deny(400, "bad_path");
const NO_RULE: Want = Want::Deny(403, "no_rule");
const NOT_ADMIN: Want = Want::Deny(403, "insufficient_permission");
const BAD_HOST: Want = Want::Deny(400, "bad_host");

/// A request with the given method, target and extra header lines (each ending in CRLF).
fn request(method: &str, target: &[u8], headers: &str) -> Vec<u8> {
    let mut r = format!("{method} ").into_bytes();
    r.extend_from_slice(target);
    r.extend_from_slice(b" HTTP/1.1\r\n");
    r.extend_from_slice(headers.as_bytes());
    r.extend_from_slice(b"Connection: close\r\n\r\n");
    r
}

/// The whole corpus for a token `tok` that holds `apps:read` only.
fn corpus(tok: &str) -> Vec<Case> {
    let std_headers = format!("Host: {HOST}\r\nAuthorization: Bearer {tok}\r\n");
    let mut cases = Vec::new();
    let mut add = |label: &str, target: &str, want: Want| {
        cases.push(Case {
            label: format!("{label}: GET {target:?}"),
            target: Some(target.to_string()),
            request: request("GET", target.as_bytes(), &std_headers),
            want,
        });
    };

    // Controls: what the token may do, so the refusals below are about the path and nothing else.
    add("control", "/apps/x", fwd("/apps/x"));
    add("control", "/apps/x/logs", fwd("/apps/x/logs"));
    add("control", "/apps/x/", fwd("/apps/x/"));
    add("control", "/apps/x/admin", fwd("/apps/x/admin"));
    add("control", "/apps/x/.well-known", fwd("/apps/x/.well-known"));
    add("control", "/apps/x/..a/b", fwd("/apps/x/..a/b"));
    // A segment ending in a dot or a space is what Win32 trims (`a..` is `a` on IIS): refused.
    add("trailing dot", "/apps/x/a..", BAD_PATH);
    add("trailing dot", "/apps/x/.a.", BAD_PATH);
    add("trailing dot", "/apps/x/admin.", BAD_PATH);
    add("trailing space", "/apps/x/..%20/admin", BAD_PATH);
    add("trailing space", "/apps/x/%2e%20", BAD_PATH);
    add("control", "/echo/a/b", fwd("/echo/a/b"));
    add("control", "/health", fwd("/health"));
    add("control", "/admin/x", NOT_ADMIN);
    add("control", "/admin", NOT_ADMIN);

    // Dot segments, raw, percent-encoded in both cases, double-encoded, and only-dots segments,
    // in several positions (cross product).
    const DOTS: &[&str] = &[
        ".",
        "..",
        "...",
        "....",
        "%2e",
        "%2E",
        "%2e%2e",
        "%2E%2E",
        "%2e%2E",
        ".%2e",
        "%2e.",
        ".%2E",
        "%2E.",
        "%252e",
        "%252e%252e",
        "%252E%252E",
        "%%32%65",
        "%25%32%65",
        "%2525%32%65",
    ];
    const DOT_AROUND: &[(&str, &str)] = &[
        ("/apps/x/", "/admin/secret"),
        ("/apps/x/", "/../admin"),
        ("/apps/x/", ""),
        ("/apps/x/", "/"),
        ("/", "/admin"),
        ("/apps/", "/admin/x"),
    ];
    for (before, after) in DOT_AROUND {
        for dot in DOTS {
            add("dot segment", &format!("{before}{dot}{after}"), BAD_PATH);
        }
    }

    // Encoded delimiters, controls and '%' itself, any case, single and double encoded; overlong
    // UTF-8 forms of '/', '\' and '.'.
    const ENCODED: &[&str] = &[
        "%2f",
        "%2F",
        "%5c",
        "%5C",
        "%3f",
        "%3F",
        "%23",
        "%3b",
        "%3B",
        "%00",
        "%0a",
        "%0A",
        "%0d",
        "%0D%0A",
        "%09",
        "%1f",
        "%7f",
        "%7F",
        "%25",
        "%252f",
        "%252F",
        "%255c",
        "%25%32%66",
        "%c0%af",
        "%C0%AF",
        "%c1%9c",
        "%e0%80%af",
        "%c0%ae",
        "%e0%80%ae",
        "%f0%80%80%ae",
        "%c0%80",
        "%c0%5c",
    ];
    const ENC_AROUND: &[&str] = &[
        "/apps/x{}..{}admin",
        "/apps{}x",
        "/apps/x/a{}b",
        "/admin{}",
        "/apps/x{}",
    ];
    for around in ENC_AROUND {
        for e in ENCODED {
            add("encoded", &around.replace("{}", e), BAD_PATH);
        }
    }

    // Raw characters the gateway refuses: path parameters, backslash, and ASCII that is not a
    // pchar but which the HTTP parser lets through.
    const RAW_REFUSED: &[&str] = &[";", "\\", "\"", "{", "}", "|", "^", "[", "]"];
    const RAW_AROUND: &[&str] = &[
        "/apps/x{}",
        "/apps{}x/y",
        "/admin{}/apps/x",
        "/apps/x/..{}/admin",
        "/apps/x/{}../admin",
    ];
    for around in RAW_AROUND {
        for r in RAW_REFUSED {
            add("raw char", &around.replace("{}", r), BAD_PATH);
        }
    }
    add("raw char", "/apps/x;jsessionid=1", BAD_PATH);
    add("raw char", "/admin;/apps/x", BAD_PATH);
    add("raw char", "/apps/x/..;/..;/admin", BAD_PATH);
    add("raw char", "/apps\\..\\admin", BAD_PATH);

    // Characters the HTTP/1 parser itself refuses in a request line, including CR/LF.
    for bad in [
        "<", ">", "`", "\x7f", "\x00", "\x01", "\x1b", "\t", "\r", "\n", "\r\n", "\x0b", "\x0c",
    ] {
        add("parser", &format!("/apps/x/a{bad}b"), Want::Parser400);
    }
    add("parser", "/apps/x\r\nX-Injected: 1", Want::Parser400);
    add("parser", "/admin\nHost: gw.test", Want::Parser400);
    add("parser", "/apps/x/a b", Want::Parser400);
    add("parser", "apps/x", Want::Parser400);

    // Non-ASCII: fullwidth and other confusables, invisible characters, overlong forms; on the
    // default route (ASCII only) and on `/intl`, which allows non-ASCII.
    const CONFUSABLE: &[&str] = &[
        "%ef%bc%8e", // U+FF0E fullwidth full stop
        "%EF%BC%8F", // U+FF0F fullwidth solidus
        "%ef%bc%bc", // U+FF3C fullwidth reverse solidus
        "%ef%bd%81", // U+FF41 fullwidth a
        "%ef%bc%a1", // U+FF21 fullwidth A
        "%e2%80%a4", // U+2024 one dot leader
        "%e2%88%95", // U+2215 division slash
        "%e2%81%84", // U+2044 fraction slash
        "%ef%b9%92", // U+FE52 small full stop
        "%e3%80%82", // U+3002 ideographic full stop
        "%e2%80%8b", // U+200B zero width space
        "%e2%80%ae", // U+202E right-to-left override
        "%c2%a0",    // U+00A0 no-break space
        "%ef%bb%bf", // U+FEFF byte order mark
        "%c3",       // truncated sequence
        "%ed%a0%80", // surrogate
    ];
    for c in CONFUSABLE {
        add("non-ascii", &format!("/intl/{c}dmin/x"), BAD_PATH);
        add("non-ascii", &format!("/intl/x/{c}{c}/admin"), BAD_PATH);
        add("non-ascii", &format!("/apps/x/{c}"), BAD_PATH);
    }
    for raw in [
        "/apps/x/\u{ff0e}\u{ff0e}/admin",
        "/\u{ff41}dmin/x",
        "/intl/caf\u{e9}",
        "/apps/\u{0430}pps",
        "/intl/\u{200b}",
    ] {
        add("raw non-ascii", raw, BAD_PATH);
    }
    add(
        "non-ascii",
        "/intl/caf%C3%A9/menu",
        fwd("/intl/caf%C3%A9/menu"),
    );
    add(
        "non-ascii",
        "/intl/caf%c3%a9/menu",
        fwd("/intl/caf%C3%A9/menu"),
    );
    add(
        "non-ascii",
        "/intl/%e6%97%a5%e6%9c%ac",
        fwd("/intl/%E6%97%A5%E6%9C%AC"),
    );
    add("non-ascii", "/intl/admin/caf%C3%A9", NOT_ADMIN);
    add("non-ascii", "/apps/caf%C3%A9", BAD_PATH);

    // Case and unreserved-escape variants: paths are case-sensitive; unreserved escapes decode.
    add("case", "/APPS/x", NO_RULE);
    add("case", "/Apps/x", NO_RULE);
    add("case", "/aPpS/x", NO_RULE);
    add("case", "/ADMIN/x", NO_RULE);
    add("case", "/Admin/secret", NO_RULE);
    add("case", "/%41pps/x", NO_RULE);
    add("case", "/%41DMIN/x", NO_RULE);
    add("case", "/%61pps/x", fwd("/apps/x"));
    add("case", "/%61%70%70%73/x", fwd("/apps/x"));
    add("case", "/app%73/x/logs", fwd("/apps/x/logs"));
    add("case", "/%61dmin/x", NOT_ADMIN);
    add("case", "/admi%6e/x", NOT_ADMIN);
    add("case", "/%61%64%6d%69%6e", NOT_ADMIN);
    add("case", "/apps/%58", fwd("/apps/X"));
    add("case", "/apps/x/%7e", fwd("/apps/x/~"));
    add("case", "/apps/x/%7E%2D%5F%2e1", fwd("/apps/x/~-_.1"));
    add("case", "/apps/x/a%3ab", fwd("/apps/x/a%3Ab"));
    add("case", "/apps/x/a%3Ab", fwd("/apps/x/a%3Ab"));
    add("case", "/apps/x/a%20b", fwd("/apps/x/a%20b"));
    add("case", "/apps/x/a%2bb", fwd("/apps/x/a%2Bb"));
    add("case", "/apps/x/%40me", fwd("/apps/x/%40me"));
    add("case", "/apps/x/@me:1", fwd("/apps/x/@me:1"));

    // Trailing slashes and segment boundaries.
    add("boundary", "/apps", NO_RULE);
    add("boundary", "/apps/", NO_RULE);
    add("boundary", "/appsX/y", NO_RULE);
    add("boundary", "/apps-x/y", NO_RULE);
    add("boundary", "/apps.x/y", NO_RULE);
    add("boundary", "/apps~/x", NO_RULE);
    add("boundary", "/adminX", NO_RULE);
    add("boundary", "/administrator", NO_RULE);
    add("boundary", "/admin-x/y", NO_RULE);
    add("boundary", "/admin/", NOT_ADMIN);
    add("boundary", "/admin/x/", NOT_ADMIN);
    add("boundary", "/health/", NO_RULE);
    add("boundary", "/healthX", NO_RULE);
    add("boundary", "/", NO_RULE);
    add("boundary", "//", BAD_PATH);
    add("boundary", "//admin", BAD_PATH);
    add("boundary", "/apps//x", BAD_PATH);
    add("boundary", "/apps/x//", BAD_PATH);
    add("boundary", "/apps/x//admin", BAD_PATH);
    add("boundary", "///admin/x", BAD_PATH);
    add("boundary", "/_tokengate/v1/../../admin", BAD_PATH);
    add("boundary", "/_tokengatex/admin", NO_RULE);

    // Query and fragment tricks: the query never takes part in matching and is forwarded untouched.
    add("query", "/admin?/apps/x", NOT_ADMIN);
    add("query", "/admin?x=/apps/x", NOT_ADMIN);
    add("query", "/apps/x?/admin", fwd("/apps/x?/admin"));
    add("query", "/apps/x?../../admin", fwd("/apps/x?../../admin"));
    add(
        "query",
        "/apps/x?q=%2e%2e%2fadmin",
        fwd("/apps/x?q=%2e%2e%2fadmin"),
    );
    add("query", "/apps/x?q=%2F&r=%00", fwd("/apps/x?q=%2F&r=%00"));
    add("query", "/apps/x??admin", fwd("/apps/x??admin"));
    add("query", "/?/apps/x", NO_RULE);
    add("query", "/apps%3F/x", BAD_PATH);
    add("query", "/admin%3F/apps/x", BAD_PATH);
    add(
        "query",
        "/apps/x?access_token=abc",
        Want::Deny(400, "token_in_query"),
    );
    add(
        "query",
        "/apps/x?a=1&TOKEN=abc",
        Want::Deny(400, "token_in_query"),
    );
    add(
        "query",
        "/apps/x?%61ccess_token=abc",
        Want::Deny(400, "token_in_query"),
    );
    // A fragment is not part of a request target; the parser drops it, and the gateway forwards
    // the canonical path it authorised, never the fragment.
    add("fragment", "/apps/x#/../admin", fwd("/apps/x"));
    add("fragment", "/apps/x#/../../admin/x", fwd("/apps/x"));
    add("fragment", "/admin#/apps/x", NOT_ADMIN);
    add("fragment", "/apps/#/x", NO_RULE);
    add("fragment", "/apps/x/..#/admin", BAD_PATH);
    add("fragment", "/apps/x?a#b", fwd("/apps/x?a"));
    add("fragment", "/apps/x%23/../admin", BAD_PATH);

    // Absolute-form targets: the authority must equal Host; the path is canonicalised as usual.
    add("absolute", "http://gw.test/apps/x", fwd("/apps/x"));
    add("absolute", "HTTP://GW.TEST/apps/x", fwd("/apps/x"));
    add("absolute", "http://gw.test/admin/x", NOT_ADMIN);
    add("absolute", "http://gw.test/apps/x/../../admin", BAD_PATH);
    add("absolute", "http://gw.test/apps/x/%2e%2e/admin", BAD_PATH);
    add("absolute", "http://gw.test", NO_RULE);
    add("absolute", "http://evil.test/apps/x", BAD_HOST);
    add("absolute", "http://evil.test/admin/x", BAD_HOST);
    add("absolute", "http://gw.test:80/apps/x", BAD_HOST);
    add("absolute", "http://gw.test@evil.test/apps/x", BAD_HOST);
    add("absolute", "http://evil.test@gw.test/apps/x", BAD_HOST);
    add("absolute", "//evil.test/apps/x", BAD_PATH);
    add("absolute", "*", BAD_PATH);

    let with_headers = |label: &str, method: &str, target: &str, headers: &str, want: Want| Case {
        label: format!("{label}: {method} {target:?} with {headers:?}"),
        target: None,
        request: request(method, target.as_bytes(), headers),
        want,
    };
    let auth = format!("Authorization: Bearer {tok}\r\n");
    let mut more = vec![
        // Host tricks.
        with_headers("host", "GET", "/apps/x", &auth, BAD_HOST),
        with_headers(
            "host",
            "GET",
            "/apps/x",
            &format!("Host: {HOST}\r\nHost: {HOST}\r\n{auth}"),
            BAD_HOST,
        ),
        with_headers(
            "host",
            "GET",
            "/apps/x",
            &format!("Host: evil.test\r\nHost: {HOST}\r\n{auth}"),
            BAD_HOST,
        ),
        with_headers(
            "host",
            "GET",
            "/apps/x",
            &format!("Host: a@b\r\n{auth}"),
            BAD_HOST,
        ),
        with_headers(
            "host",
            "GET",
            "/apps/x",
            &format!("Host: gw.test@evil.test\r\n{auth}"),
            BAD_HOST,
        ),
        with_headers(
            "host",
            "GET",
            "/apps/x",
            &format!("Host:\r\n{auth}"),
            BAD_HOST,
        ),
        with_headers(
            "host",
            "GET",
            "/apps/x",
            &format!("Host: gw.test, evil.test\r\n{auth}"),
            BAD_HOST,
        ),
        with_headers(
            "host",
            "GET",
            "/apps/x",
            &format!("Host: gw.test/admin\r\n{auth}"),
            BAD_HOST,
        ),
        with_headers(
            "host",
            "GET",
            "/apps/x",
            &format!("Host: gw test\r\n{auth}"),
            BAD_HOST,
        ),
        with_headers(
            "host",
            "GET",
            "/apps/x",
            &format!("Host: gw.test:abc\r\n{auth}"),
            BAD_HOST,
        ),
        with_headers(
            "host",
            "GET",
            "/apps/x",
            &format!("Host: gw.test:\r\n{auth}"),
            BAD_HOST,
        ),
        with_headers(
            "host",
            "GET",
            "/apps/x",
            &format!("Host: gw.test:80:80\r\n{auth}"),
            BAD_HOST,
        ),
        with_headers(
            "host",
            "GET",
            "/apps/x",
            &format!("Host: [::1\r\n{auth}"),
            BAD_HOST,
        ),
        with_headers(
            "host",
            "GET",
            "/apps/x",
            &format!("Host: [::1]x\r\n{auth}"),
            BAD_HOST,
        ),
        with_headers("host", "GET", "http://gw.test/apps/x", &auth, BAD_HOST),
        with_headers(
            "host",
            "GET",
            "http://gw.test/apps/x",
            &format!("Host: evil.test\r\n{auth}"),
            BAD_HOST,
        ),
        with_headers(
            "host",
            "GET",
            "/apps/x",
            &format!("Host: [::1]:8080\r\n{auth}"),
            fwd("/apps/x"),
        ),
        with_headers(
            "host",
            "GET",
            "http://gw.test:8080/apps/x",
            &format!("Host: gw.test:8080\r\n{auth}"),
            fwd("/apps/x"),
        ),
        // Methods.
        with_headers(
            "method",
            "TRACE",
            "/apps/x",
            &std_headers,
            Want::Deny(400, "method_not_allowed"),
        ),
        with_headers(
            "method",
            "CONNECT",
            "gw.test:443",
            &format!("Host: gw.test:443\r\n{auth}"),
            Want::Deny(400, "method_not_allowed"),
        ),
        with_headers(
            "method",
            "get",
            "/apps/x",
            &std_headers,
            Want::Deny(400, "method_not_allowed"),
        ),
        with_headers(
            "method",
            "PROPFIND",
            "/apps/x",
            &std_headers,
            Want::Deny(400, "method_not_allowed"),
        ),
        with_headers("method", "OPTIONS", "*", &std_headers, BAD_PATH),
        with_headers("method", "DELETE", "/apps/x", &std_headers, NO_RULE),
        with_headers("method", "DELETE", "/admin/x", &std_headers, NOT_ADMIN),
        with_headers(
            "method",
            "POST",
            "/apps/x/deploy",
            &format!("{std_headers}Content-Length: 0\r\n"),
            NOT_ADMIN,
        ),
        with_headers("method", "HEAD", "/apps/x", &std_headers, fwd("/apps/x")),
        with_headers(
            "method",
            "GET",
            "/apps/x",
            &format!("{std_headers}X-HTTP-Method-Override: DELETE\r\nX-Original-URL: /admin/x\r\n"),
            fwd("/apps/x"),
        ),
    ];
    cases.append(&mut more);
    cases
}

/// A gateway whose main route is ASCII-only, plus `/intl`, which allows non-ASCII paths. Both go to
/// `up`.
async fn corpus_gateway(up: &Upstream) -> TestGateway {
    let intl = format!(
        r#"
[[routes]]
name = "intl"
prefix = "/intl"
upstream = "http://{}"
allow_non_ascii = true
{}{}"#,
        up.addr,
        permission_rule(&["GET"], "/intl/**", "apps:read"),
        permission_rule(&[], "/intl/admin/**", "admin:all"),
    );
    TestGateway::start_with(Options {
        sections: NO_RATE_LIMIT.into(),
        extra_routes: intl,
        upstream_override: Some(up.addr.to_string()),
        ..Options::default()
    })
    .await
}

/// The path of a request target (no query).
fn path_of(target: &str) -> &str {
    target.split('?').next().unwrap_or(target)
}

/// Whether a forwarded path would reach an admin area (`/admin/**`, `/intl/admin/**`) as the most
/// lenient backend reads it: percent-decoded once, case-folded, `\` taken as `/`, empty segments
/// dropped, and `.`/`..` (even with trailing dots or spaces, as Win32 trims them) resolved.
fn reaches_admin(path: &str) -> bool {
    let decoded = percent_decode_once(path);
    let text = String::from_utf8_lossy(&decoded)
        .to_ascii_lowercase()
        .replace('\\', "/");
    let mut resolved: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        let trimmed = seg.trim_end_matches([' ', '.']);
        if seg.is_empty() || seg == "." {
            continue;
        }
        if trimmed.is_empty() {
            // "..", "...", ".. ": any longer run of dots goes up too.
            resolved.pop();
            continue;
        }
        resolved.push(trimmed);
    }
    matches!(resolved.as_slice(), ["admin", ..] | ["intl", "admin", ..])
}

/// Checks one corpus case: status, body, challenge, and what the upstream received.
fn check_case(
    case: &Case,
    resp: &RawResponse,
    new: &[Recorded],
    tok: &str,
    token_id: &str,
) -> Result<(), String> {
    macro_rules! ensure {
        ($cond:expr, $($fmt:tt)+) => {
            if !$cond {
                return Err(format!($($fmt)+));
            }
        };
    }
    ensure!(!resp.raw.contains(tok), "token echoed");
    let targets: Vec<&str> = new.iter().map(|r| r.target.as_str()).collect();
    match &case.want {
        Want::Fwd(target) => {
            ensure!(
                resp.status == 200,
                "status {} (want 200): {}",
                resp.status,
                resp.raw
            );
            ensure!(
                targets == [target.as_str()],
                "upstream received {targets:?}, want [{target:?}]"
            );
            let identity = new[0]
                .headers
                .get("x-tokengate-token-id")
                .and_then(|v| v.to_str().ok());
            let public = target == "/health";
            ensure!(
                identity == (!public).then_some(token_id),
                "identity header {identity:?} (public rule: {public})"
            );
        }
        Want::Deny(status, reason) => {
            ensure!(
                resp.status == *status,
                "status {} (want {status} {reason}): {}",
                resp.status,
                resp.raw
            );
            ensure!(targets.is_empty(), "upstream received {targets:?}");
            let body: serde_json::Value = serde_json::from_str(&resp.body)
                .map_err(|_| format!("body is not JSON: {:?}", resp.body))?;
            ensure!(
                body["message"].is_string() && body["request_id"].is_string(),
                "body {body}"
            );
            let www = resp.header("www-authenticate");
            match (*status, *reason) {
                (403, _) => {
                    ensure!(body["error"] == "insufficient_scope", "body {body}");
                    let www = www.ok_or("no WWW-Authenticate on 403")?;
                    ensure!(
                        www.starts_with("Bearer realm=\"tokengate\""),
                        "challenge {www}"
                    );
                    ensure!(
                        www.contains("error=\"insufficient_scope\""),
                        "challenge {www}"
                    );
                    ensure!(
                        (*reason == "insufficient_permission")
                            == body["required_permission"].is_string(),
                        "required_permission in {body}"
                    );
                }
                (400, "token_in_query") => {
                    ensure!(body["error"] == "invalid_request", "body {body}");
                    ensure!(
                        www.is_some_and(|w| w.contains("error=\"invalid_request\"")),
                        "challenge {www:?}"
                    );
                }
                (400, _) => {
                    ensure!(body["error"] == "invalid_request", "body {body}");
                    ensure!(
                        www.is_none(),
                        "a malformed request is not an auth challenge: {www:?}"
                    );
                }
                _ => return Err(format!("unexpected expectation {status}")),
            }
        }
        Want::Parser400 => {
            ensure!(
                resp.status == 400,
                "status {} (want a parser 400): {}",
                resp.status,
                resp.raw
            );
            ensure!(
                resp.header("x-request-id").is_none(),
                "reached the gateway: {}",
                resp.raw
            );
            ensure!(targets.is_empty(), "upstream received {targets:?}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn corpus_of_request_targets_never_reaches_a_path_the_token_may_not() {
    let up = Upstream::start().await;
    let tg = corpus_gateway(&up).await;
    let (tok, token_id) = tg.token("ci", "reader", &["apps:read"]);
    let cases = corpus(&tok);
    assert!(cases.len() >= 300, "only {} cases", cases.len());

    let mut by_request_id: HashMap<String, usize> = HashMap::new();
    let mut counts: HashMap<&'static str, usize> = HashMap::new();
    let mut failures = Vec::new();
    for (n, case) in cases.iter().enumerate() {
        let before = up.count();
        let resp = raw(tg.addr, &case.request).await;
        let new: Vec<Recorded> = up.received()[before..].to_vec();
        *counts
            .entry(match case.want {
                Want::Fwd(_) => "forwarded",
                Want::Deny(400, _) => "refused 400",
                Want::Deny(..) => "refused 403",
                Want::Parser400 => "parser 400",
            })
            .or_default() += 1;
        if let Err(why) = check_case(case, &resp, &new, &tok, &token_id) {
            failures.push(format!("{}: {why}", case.label));
        }
        if let Some(id) = resp.header("x-request-id") {
            by_request_id.insert(id.to_string(), n);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // One audit line per request the gateway answered, with the decision the client saw, and
    // one per request hyper's parser refused.
    let parser_cases = cases
        .iter()
        .filter(|c| matches!(c.want, Want::Parser400))
        .count();
    let mut all = tg.request_lines().await;
    for _ in 0..100 {
        if all.len() >= by_request_id.len() + parser_cases {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        all = tg.request_lines().await;
    }
    let (parser_lines, lines): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|l| l["reason"] == "bad_request_http");
    assert_eq!(
        lines.len(),
        by_request_id.len(),
        "exactly one audit line per request that reached the gateway"
    );
    assert_eq!(
        parser_lines.len(),
        parser_cases,
        "one audit line per request the HTTP parser refused"
    );
    for line in &parser_lines {
        assert_rejection_line(line, 400, "bad_request_http");
        assert_eq!(line["path"], "", "{line}");
        assert!(line["token_prefix"].is_null(), "{line}");
    }
    for line in &lines {
        let id = line["request_id"].as_str().unwrap();
        let case = &cases[by_request_id[id]];
        let label = &case.label;
        match &case.want {
            Want::Fwd(target) => {
                assert_eq!(line["status_code"], 200, "{label}: {line}");
                assert_eq!(line["reason"], "ok", "{label}: {line}");
                assert_eq!(line["rbac_decision"], "allow", "{label}: {line}");
                assert_eq!(
                    line["path"],
                    path_of(target),
                    "{label}: audit path is the canonical path: {line}"
                );
            }
            Want::Deny(status, reason) => assert_rejection_line(line, *status, reason),
            Want::Parser400 => unreachable!(),
        }
        let text = line.to_string();
        assert!(!text.contains(&tok), "{label}: token in the audit log");
        assert!(
            !text.contains("access_token") && !text.contains("q=%2e"),
            "{label}: query in the audit log: {text}"
        );
    }

    // Whatever happened above: the upstream never received a path under /admin, and every path it
    // received is byte-identical to the canonical form (a fixed point of the canonicaliser).
    let received = up.received();
    let forwarded = cases
        .iter()
        .filter(|c| matches!(c.want, Want::Fwd(_)))
        .count();
    assert_eq!(received.len(), forwarded);
    for r in &received {
        let path = path_of(&r.target);
        assert!(
            !reaches_admin(path),
            "upstream received an admin path: {}",
            r.target
        );
        let canonical = canonicalise(path, true)
            .unwrap_or_else(|e| panic!("forwarded a non-canonical path {path:?}: {e}"));
        assert_eq!(
            canonical.path, path,
            "forwarded path is not byte-identical to its canonical form"
        );
    }
    eprintln!("corpus: {} cases {counts:?}", cases.len());
    tg.stop().await;
}

/// One HTTP/2 request (prior knowledge) with an exact `:path`, which no URL library normalised.
async fn h2_get(
    addr: std::net::SocketAddr,
    uri: http::Uri,
    tok: &str,
    host: Option<&str>,
) -> Result<(u16, Option<String>), String> {
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .uri(uri)
        .header("authorization", format!("Bearer {tok}"));
    if let Some(h) = host {
        req = req.header("host", h);
    }
    let req = req
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((resp.status().as_u16(), id))
}

#[tokio::test]
async fn the_corpus_over_http2_gets_the_same_answers() {
    let up = Upstream::start().await;
    let tg = corpus_gateway(&up).await;
    let (tok, _) = tg.token("ci", "reader", &["apps:read"]);
    let cases = corpus(&tok);
    let (mut sent, mut unsendable) = (0, 0);
    let mut failures = Vec::new();
    for case in &cases {
        let Some(target) = case.target.as_deref().filter(|t| t.starts_with('/')) else {
            continue;
        };
        // The client library refuses some targets outright (controls, spaces, raw non-ASCII).
        let Ok(uri) = format!("http://{HOST}{target}").parse::<http::Uri>() else {
            unsendable += 1;
            continue;
        };
        sent += 1;
        let before = up.count();
        let result = h2_get(tg.addr, uri, &tok, None).await;
        let got: Vec<String> = up.received()[before..]
            .iter()
            .map(|r| r.target.clone())
            .collect();
        let ok = match (&case.want, &result) {
            (Want::Fwd(t), Ok((200, Some(_)))) => got == [t.clone()],
            (Want::Deny(status, _), Ok((s, Some(_)))) => s == status && got.is_empty(),
            // Not a valid HTTP/1 request line; whatever HTTP/2 does with it, nothing is forwarded.
            (Want::Parser400, Ok((s, _))) => *s >= 400 && got.is_empty(),
            (Want::Parser400, Err(_)) => got.is_empty(),
            _ => false,
        };
        if !ok {
            failures.push(format!("{}: {result:?}, upstream {got:?}", case.label));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        sent >= 300,
        "only {sent} targets sent over HTTP/2 ({unsendable} unsendable)"
    );

    // :authority and host must agree.
    let uri: http::Uri = format!("http://{HOST}/apps/x").parse().unwrap();
    let before = up.count();
    let r = h2_get(tg.addr, uri.clone(), &tok, Some("evil.test"))
        .await
        .unwrap();
    assert_eq!(r.0, 400);
    assert_rejection_line(&tg.last_request_line().await, 400, "bad_host");
    assert_eq!(up.count(), before);
    assert_eq!(h2_get(tg.addr, uri, &tok, Some(HOST)).await.unwrap().0, 200);
    eprintln!("http/2: {sent} targets sent, {unsendable} not expressible as a URI");
    tg.stop().await;
}

#[test]
fn admin_detector_is_not_vacuous() {
    for p in [
        "/admin",
        "/admin/x",
        "/%61dmin/x",
        "/ADMIN",
        "/x/..\\admin",
        "/intl/admin/x",
        "/admin%20/x",
        "//admin",
        "/apps/x/%2e%2e/../admin",
        "/apps/x/.../.../admin.",
        "/intl/./admin",
        "/admin/.",
    ] {
        assert!(reaches_admin(p), "{p}");
    }
    for p in [
        "/apps/x",
        "/apps/x/admin",
        "/administrator",
        "/adminx/y",
        "/health",
        "/apps/x/..a/admin",
    ] {
        assert!(!reaches_admin(p), "{p}");
    }
}

// ------------------------------------------------------------------------------------------------
// Request smuggling over raw TCP.

/// A request the gateway must never forward: no credentials, so if the gateway parsed it, it
/// answered 401; only a framing confusion could bring it to the upstream.
const SMUGGLED: &str = "GET /apps/smuggled HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n";

/// One smuggling attempt: the raw bytes, the statuses of the responses on that connection, and
/// exactly what the upstream must receive (target, body length).
struct Smuggle {
    name: &'static str,
    bytes: String,
    statuses: Vec<u16>,
    upstream: Vec<(&'static str, u64)>,
}

impl Smuggle {
    /// An attempt the gateway must refuse outright: one 400 on the connection, nothing forwarded.
    fn refused(name: &'static str, bytes: String) -> Smuggle {
        Smuggle {
            name,
            bytes,
            statuses: vec![400],
            upstream: vec![],
        }
    }
}

fn smuggling_cases(tok: &str) -> Vec<Smuggle> {
    let head = |target: &str, extra: &str| {
        format!(
            "POST {target} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\n{extra}\r\n"
        )
    };
    let chunk_of_smuggled = format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len());
    let cl_te_body = format!("0\r\n\r\n{SMUGGLED}");
    vec![
        Smuggle {
            name: "CL then TE (CL.TE: the body per Content-Length hides a request after the last chunk)",
            bytes: head(
                "/echo/cl-te",
                &format!(
                    "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                    cl_te_body.len()
                ),
            ) + &cl_te_body,
            // hyper reads the body as chunked (RFC 9112 §6.3) and closes the connection after
            // answering, so the bytes after the last chunk are never parsed as a request.
            statuses: vec![200],
            upstream: vec![("/echo/cl-te", 0)],
        },
        Smuggle {
            name: "TE then CL",
            bytes: head(
                "/echo/te-cl-order",
                &format!(
                    "Transfer-Encoding: chunked\r\nContent-Length: {}\r\n",
                    cl_te_body.len()
                ),
            ) + &cl_te_body,
            statuses: vec![200],
            upstream: vec![("/echo/te-cl-order", 0)],
        },
        Smuggle {
            name: "TE.CL: a short Content-Length with the request inside a chunk",
            bytes: head(
                "/echo/te-cl",
                "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
            ) + &chunk_of_smuggled,
            statuses: vec![200],
            upstream: vec![("/echo/te-cl", SMUGGLED.len() as u64)],
        },
        Smuggle {
            name: "Transfer-Encoding: ,chunked (empty list element) then a pipelined request",
            bytes: head("/echo/comma", "Transfer-Encoding: ,chunked\r\n")
                + "3\r\nabc\r\n0\r\n\r\n"
                + SMUGGLED,
            // Read as chunked, like the upstream will read hyper's re-framed body; the next
            // request on the connection is parsed and authorised on its own (401).
            statuses: vec![200, 401],
            upstream: vec![("/echo/comma", 3)],
        },
        Smuggle::refused(
            "Transfer-Encoding: chunked, identity",
            head(
                "/echo/te-identity",
                "Transfer-Encoding: chunked, identity\r\n",
            ) + &chunk_of_smuggled,
        ),
        Smuggle::refused(
            "two Transfer-Encoding lines, chunked then identity",
            head(
                "/echo/te-two",
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            ) + &chunk_of_smuggled,
        ),
        Smuggle::refused(
            "Transfer-Encoding: xchunked",
            head("/echo/te-x", "Transfer-Encoding: xchunked\r\n") + &chunk_of_smuggled,
        ),
        Smuggle::refused(
            "Transfer-Encoding: identity",
            head("/echo/te-only-identity", "Transfer-Encoding: identity\r\n") + &chunk_of_smuggled,
        ),
        Smuggle::refused(
            "Transfer-Encoding with a space before the colon",
            head(
                "/echo/te-space",
                "Transfer-Encoding : chunked\r\nContent-Length: 5\r\n",
            ) + &cl_te_body,
        ),
        Smuggle::refused(
            "Transfer-Encoding folded onto a continuation line (obs-fold)",
            head(
                "/echo/te-fold",
                "Transfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n",
            ) + &cl_te_body,
        ),
        Smuggle::refused(
            "obs-fold continuation of an ordinary header",
            format!(
                "GET /apps/fold HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\nX-Note: a\r\n b\r\nConnection: close\r\n\r\n"
            ),
        ),
        Smuggle::refused(
            "two differing Content-Length headers",
            head(
                "/echo/cl-two",
                "Content-Length: 3\r\nContent-Length: 40\r\n",
            ) + "abc"
                + SMUGGLED,
        ),
        Smuggle::refused(
            "Content-Length list with differing values",
            head("/echo/cl-list", "Content-Length: 3, 40\r\n") + "abc" + SMUGGLED,
        ),
        Smuggle::refused(
            "Content-Length with a sign",
            head("/echo/cl-sign", "Content-Length: +3\r\n") + "abc" + SMUGGLED,
        ),
        Smuggle {
            name: "Content-Length shorter than the bytes sent: the rest is the next request, authorised on its own",
            bytes: head("/echo/cl-short", "Content-Length: 3\r\n") + "abc" + SMUGGLED,
            statuses: vec![200, 401],
            upstream: vec![("/echo/cl-short", 3)],
        },
        Smuggle {
            name: "a second request inside a Content-Length body",
            bytes: head(
                "/echo/body",
                &format!(
                    "Content-Length: {}\r\nConnection: close\r\n",
                    SMUGGLED.len()
                ),
            ) + SMUGGLED,
            statuses: vec![200],
            upstream: vec![("/echo/body", SMUGGLED.len() as u64)],
        },
        Smuggle {
            name: "a second request inside a chunked body",
            bytes: head(
                "/echo/chunked-body",
                "Transfer-Encoding: chunked\r\nConnection: close\r\n",
            ) + &chunk_of_smuggled,
            statuses: vec![200],
            upstream: vec![("/echo/chunked-body", SMUGGLED.len() as u64)],
        },
        Smuggle::refused(
            "X_Auth_User (underscore header name)",
            format!(
                "GET /apps/underscore HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\nX_Auth_User: admin\r\nConnection: close\r\n\r\n"
            ),
        ),
        Smuggle::refused(
            "X-Forwarded_For (underscore header name)",
            format!(
                "GET /apps/underscore HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\nX-Forwarded_For: 10.0.0.1\r\nConnection: close\r\n\r\n"
            ),
        ),
        Smuggle {
            name: "pipelined requests are authorised one by one",
            bytes: format!(
                "GET /apps/first HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\n\r\nGET /admin/second HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\n\r\n{SMUGGLED}"
            ),
            statuses: vec![200, 403, 401],
            upstream: vec![("/apps/first", 0)],
        },
        Smuggle {
            name: "nothing after Connection: close is read",
            bytes: format!(
                "GET /apps/closing HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\nGET /apps/after-close HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\n\r\n"
            ),
            statuses: vec![200],
            upstream: vec![("/apps/closing", 0)],
        },
    ]
}

#[tokio::test]
async fn smuggling_attempts_reach_the_upstream_only_as_the_requests_they_are() {
    let (tg, tok, _) = TestGateway::with_reader().await;
    let cases = smuggling_cases(&tok);
    let mut failures = Vec::new();
    let mut answered = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let before = tg.upstream.count();
        let responses = raw_all(tg.addr, case.bytes.as_bytes(), Duration::from_secs(3)).await;
        let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
        let got: Vec<(String, u64)> = tg.upstream.received()[before..]
            .iter()
            .map(|r| (r.target.clone(), r.body_len))
            .collect();
        let want: Vec<(String, u64)> = case
            .upstream
            .iter()
            .map(|(t, n)| (t.to_string(), *n))
            .collect();
        if statuses != case.statuses || got != want {
            failures.push(format!(
                "{}: statuses {statuses:?} (want {:?}), upstream {got:?} (want {want:?})",
                case.name, case.statuses
            ));
        }
        for r in &responses {
            if let Some(id) = r.header("x-request-id") {
                answered.push((case.name, id.to_string(), r.status));
            }
        }
        // A clean request on a new connection is served normally and reaches the upstream alone.
        let before = tg.upstream.count();
        let clean = format!("/apps/clean-{i}");
        let r = raw(
            tg.addr,
            format!("GET {clean} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let got: Vec<String> = tg.upstream.received()[before..]
            .iter()
            .map(|r| r.target.clone())
            .collect();
        if r.status != 200 || got != [clean.clone()] {
            failures.push(format!(
                "{}: clean request after it: {} {got:?}",
                case.name, r.status
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Every answer the gateway gave has its audit line; refusals were not forwarded.
    let lines = tg.request_lines().await;
    for (name, id, status) in answered {
        let line = lines
            .iter()
            .find(|l| l["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("{name}: no audit line for {id}"));
        assert_eq!(line["status_code"], status, "{name}: {line}");
        if status != 200 {
            assert_eq!(line["rbac_decision"], "deny", "{name}: {line}");
            assert!(line["upstream"].is_null(), "{name}: {line}");
        }
        if name.starts_with("X_") || name.starts_with("X-Forwarded_") {
            assert_rejection_line(line, 400, "bad_header");
        }
    }
    let smuggled: Vec<String> = tg
        .upstream
        .received()
        .iter()
        .map(|r| r.target.clone())
        .filter(|t| t.contains("smuggled") || t.contains("second") || t.contains("after-close"))
        .collect();
    assert!(
        smuggled.is_empty(),
        "smuggled requests reached the upstream: {smuggled:?}"
    );
    tg.stop().await;
}

#[tokio::test]
async fn underscore_header_is_refused_with_an_audit_line_and_nothing_forwarded() {
    let (tg, tok, _) = TestGateway::with_reader().await;
    let r = raw_expect(
        tg.addr,
        format!("GET /apps/x HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\nX_Auth_User: admin\r\nConnection: close\r\n\r\n"), 400).await;
    assert!(r.header("www-authenticate").is_none());
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["error"], "invalid_request");
    assert!(body["message"].as_str().unwrap().contains('_'));
    assert_rejection_line(&tg.last_request_line().await, 400, "bad_header");
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

// ------------------------------------------------------------------------------------------------
// Spoofed identity and forwarding headers.

/// Headers a client might send to impersonate a token, a client address or a URL.
const SPOOFED: &[(&str, &str)] = &[
    ("X-Tokengate-Token-Id", "spoof-id"),
    ("x-tokengate-token-id", "spoof-id-2"),
    ("X-TOKENGATE-TOKEN-NAME", "spoof-name"),
    ("X-Tokengate-Account", "spoof-account"),
    ("X-Tokengate-Permissions", "*"),
    ("X-Tokengate-Role", "spoof-admin"),
    ("X-Tokengate-Scopes", "app=spoof*"),
    ("X-Tokengate-Authenticated", "spoof-true"),
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-For", "6.6.6.7, 6.6.6.8"),
    ("X-Forwarded-Proto", "spoof-https"),
    ("X-Forwarded-Host", "spoof.evil"),
    ("X-Forwarded-Port", "6666"),
    ("X-Forwarded-Prefix", "/spoof-admin"),
    ("X-Forwarded-Server", "spoof.evil"),
    ("X-Forwarded-Scheme", "spoof-https"),
    ("X-Forwarded-Ssl", "spoof-on"),
    ("X-Forwarded-User", "spoof-admin"),
    ("X-Forwarded-Email", "spoof@evil"),
    ("Forwarded", "for=6.6.6.6;proto=https;host=spoof.evil"),
    ("X-Real-IP", "6.6.6.6"),
    ("X-Request-Id", "spoof-request-id"),
    ("X-Original-URL", "/admin/spoof"),
    ("X-Rewrite-URL", "/admin/spoof"),
    ("X-Forwarded-Uri", "/admin/spoof"),
    ("X-Original-Uri", "/admin/spoof"),
    ("X-HTTP-Method-Override", "DELETE-spoof"),
    ("X-HTTP-Method", "DELETE-spoof"),
    ("X-Method-Override", "DELETE-spoof"),
];

fn spoofed_request(target: &str, auth: Option<&str>, connection: &str) -> String {
    let mut r = format!("GET {target} HTTP/1.1\r\nHost: gw.test\r\n");
    if let Some(tok) = auth {
        r.push_str(&format!("Authorization: Bearer {tok}\r\n"));
    }
    for (k, v) in SPOOFED {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str(&format!("Connection: {connection}\r\n\r\n"));
    r
}

/// No header the upstream received carries a client-supplied spoof value.
fn assert_no_spoofed_value(r: &Recorded) {
    for (name, value) in &r.headers {
        let v = value.to_str().unwrap_or("");
        assert!(
            !v.contains("spoof") && !v.contains("6.6.6.") && !v.contains("DELETE") && v != "*",
            "client value reached the upstream: {name}: {v}"
        );
    }
    for (name, _) in SPOOFED {
        let lower = name.to_ascii_lowercase();
        let set_by_gateway = [
            "x-tokengate-token-id",
            "x-tokengate-token-name",
            "x-tokengate-account",
            "x-tokengate-permissions",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "forwarded",
            "x-real-ip",
            "x-request-id",
        ];
        if !set_by_gateway.contains(&lower.as_str()) {
            assert!(
                r.headers.get(&lower).is_none(),
                "{lower} reached the upstream"
            );
        }
    }
}

#[tokio::test]
async fn spoofed_identity_and_forwarding_headers_are_replaced_by_the_gateway() {
    let (tg, tok, id) = TestGateway::with_reader().await;
    // Every header the gateway sets is also named in Connection: it must still arrive, with the
    // gateway's value, because hop-by-hop stripping happens before the gateway sets its own.
    let connection = "close, X-Tokengate-Token-Id, X-Tokengate-Token-Name, X-Tokengate-Account, \
                      X-Tokengate-Permissions, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, \
                      Forwarded, X-Real-IP, X-Request-Id, Host";
    for conn in ["close", connection] {
        tg.upstream.clear();
        let r = raw_expect(
            tg.addr,
            spoofed_request("/apps/billing/status", Some(&tok), conn),
            200,
        )
        .await;
        let got = tg.upstream.received();
        assert_eq!(got.len(), 1);
        let up = &got[0];
        assert_eq!(up.target, "/apps/billing/status");
        let one = |name: &str| {
            let all: Vec<&str> = up
                .headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            assert_eq!(all.len(), 1, "{name}: {all:?} (Connection: {conn})");
            all[0].to_string()
        };
        assert_eq!(one("x-tokengate-token-id"), id);
        assert_eq!(one("x-tokengate-token-name"), "reader");
        assert_eq!(one("x-tokengate-account"), "ci");
        assert_eq!(one("x-tokengate-permissions"), "apps:read");
        assert_eq!(one("x-forwarded-for"), "127.0.0.1");
        assert_eq!(one("x-real-ip"), "127.0.0.1");
        assert_eq!(one("x-forwarded-proto"), "http");
        assert_eq!(one("x-forwarded-host"), "gw.test");
        // The upstream gets its own authority; the client's Host only as X-Forwarded-Host.
        assert_eq!(one("host"), tg.upstream.addr.to_string());
        assert_eq!(
            one("forwarded"),
            "for=127.0.0.1;proto=http;host=\"gw.test\""
        );
        let request_id = r.header("x-request-id").unwrap();
        assert_eq!(
            one("x-request-id"),
            request_id,
            "the upstream sees the gateway's request id"
        );
        assert!(up.headers.get("authorization").is_none());
        assert!(
            up.headers
                .get("connection")
                .is_none_or(|v| !v.to_str().unwrap().contains("okengate"))
        );
        assert_no_spoofed_value(up);
        let line = tg.last_request_line().await;
        assert_eq!(line["request_id"], request_id);
        assert_eq!(
            line["client_ip"], "127.0.0.1",
            "the audit line ignores X-Forwarded-For without a trusted proxy"
        );
    }
    tg.stop().await;
}

#[tokio::test]
async fn public_rule_forwards_no_identity_header_even_when_the_client_sends_one() {
    let (tg, tok, _) = TestGateway::with_reader().await;
    for auth in [None, Some(tok.as_str())] {
        tg.upstream.clear();
        let conn = "close, X-Tokengate-Token-Id";
        raw_expect(tg.addr, spoofed_request("/health", auth, conn), 200).await;
        let got = tg.upstream.received();
        assert_eq!(got.len(), 1);
        let up = &got[0];
        let identity: Vec<&str> = up
            .headers
            .keys()
            .map(|k| k.as_str())
            .filter(|k| k.starts_with("x-tokengate-"))
            .collect();
        assert!(
            identity.is_empty(),
            "public rule forwarded identity headers {identity:?}"
        );
        assert_eq!(up.headers["x-forwarded-for"], "127.0.0.1");
        assert_no_spoofed_value(up);
        let line = tg.last_request_line().await;
        assert_eq!(line["reason"], "ok");
        assert_eq!(line["auth_type"], "none");
        assert!(line["api_token_id"].is_null());
    }
    tg.stop().await;
}

#[tokio::test]
async fn spoofed_headers_on_a_refused_request_reach_nothing() {
    let (tg, tok, _) = TestGateway::with_reader().await;
    // The method-override and URL-override family cannot turn an allowed request into an admin
    // one, and cannot make a refused one pass.
    let r = raw_expect(
        tg.addr,
        spoofed_request("/admin/users", Some(&tok), "close"),
        403,
    )
    .await;
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("error=\"insufficient_scope\"")
    );
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["required_permission"], "admin:all");
    assert_ne!(r.header("x-request-id").unwrap(), "spoof-request-id");
    let line = tg.last_request_line().await;
    assert_rejection_line(&line, 403, "insufficient_permission");
    assert_eq!(line["client_ip"], "127.0.0.1");
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn spoofed_headers_over_http2_are_replaced_too() {
    let (tg, tok, id) = TestGateway::with_reader().await;
    let h2 = h2_client();
    let mut req = h2.get(tg.url("/apps/billing/h2")).bearer_auth(&tok);
    for (k, v) in SPOOFED {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let got = tg.upstream.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].headers["x-tokengate-token-id"], id.as_str());
    assert_eq!(
        got[0]
            .headers
            .get_all("x-tokengate-token-id")
            .iter()
            .count(),
        1
    );
    assert_eq!(got[0].headers["x-forwarded-for"], "127.0.0.1");
    assert_no_spoofed_value(&got[0]);
    tg.stop().await;
}
