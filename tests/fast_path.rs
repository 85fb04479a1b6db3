//! The HTTP/1 fast path (issue 18): plain HTTP/1.1 requests are served by it (its counter shows
//! it), with every header, audit line and framing rule of hyper's path; what it does not cover
//! goes to hyper (its decline counter shows it) and gets hyper's answer. The same raw bytes sent
//! to a gateway with the fast path on and one with it off get the same answers.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::{RawResponse, TestGateway, raw_all};

fn served(tg: &TestGateway) -> (u64, u64) {
    let m = tg.gw.metrics();
    (
        m.h1_fast_path.load(Ordering::Relaxed),
        m.h1_declined.load(Ordering::Relaxed),
    )
}

async fn send(tg: &TestGateway, bytes: &str) -> Vec<RawResponse> {
    raw_all(tg.addr, bytes.as_bytes(), Duration::from_secs(3)).await
}

fn get(path: &str, tok: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\n{extra}\r\n")
}

#[tokio::test]
async fn plain_requests_take_the_fast_path_with_every_gateway_header() {
    let (tg, tok, id) = TestGateway::with_reader().await;
    // Two pipelined requests on one connection, the second closing it.
    let bytes = get("/apps/one?x=1", &tok, "X-Tokengate-Account: root\r\n")
        + &get("/apps/two", &tok, "Connection: close\r\n");
    let rs = send(&tg, &bytes).await;
    assert_eq!(rs.len(), 2, "{rs:?}");
    assert_eq!(served(&tg), (2, 0));
    for r in &rs {
        assert_eq!(r.status, 200, "{}", r.raw);
        assert!(r.header("x-request-id").is_some(), "{}", r.raw);
        assert!(r.header("ratelimit-limit").is_some(), "{}", r.raw);
        assert!(r.header("date").is_some(), "{}", r.raw);
        assert_eq!(r.header("x-upstream"), Some("yes"));
        // The upstream's hop-by-hop header and what it names are stripped.
        assert_eq!(r.header("x-upstream-private"), None, "{}", r.raw);
    }
    assert_eq!(rs[1].header("connection"), Some("close"));
    let got = tg.upstream.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].target, "/apps/one?x=1");
    assert_eq!(got[1].target, "/apps/two");
    let h = &got[0].headers;
    assert_eq!(h["x-tokengate-token-id"], id.as_str());
    assert_eq!(
        h["x-tokengate-account"], "ci",
        "a spoofed identity header is replaced"
    );
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-host"], "gw.test");
    assert_eq!(
        h["x-request-id"].to_str().unwrap(),
        rs[0].header("x-request-id").unwrap()
    );
    // Write-ahead: a decision line and a completion line per request.
    let lines = tg.raw_audit_lines().await;
    let id0 = rs[0].header("x-request-id").unwrap();
    let of_0: Vec<_> = lines.iter().filter(|l| l["request_id"] == id0).collect();
    assert_eq!(of_0.len(), 2, "{of_0:?}");
    assert_eq!(of_0[0]["phase"], "decision");
    assert_eq!(of_0[1]["status_code"], 200, "{}", of_0[1]);
    assert_eq!(of_0[1]["outcome"], "complete", "{}", of_0[1]);
    tg.stop().await;
}

#[tokio::test]
async fn bodies_stream_both_ways_with_exact_framing() {
    let tg = TestGateway::start().await;
    let (tok, _) = tg.token("ci", "writer", &["apps:read", "apps:write"]);
    // A Content-Length body, then a chunked response of 200000 bytes (the upstream streams it
    // without a length), then another request on the same connection.
    let post = format!(
        "POST /echo/up HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\nContent-Length: 11\r\n\r\nhello world"
    );
    let bytes = post
        + &get("/download/200000", &tok, "")
        + &get("/apps/last", &tok, "Connection: close\r\n");
    let rs = send(&tg, &bytes).await;
    assert_eq!(rs.len(), 3, "{rs:?}");
    assert_eq!(served(&tg), (3, 0));
    assert_eq!(rs[0].status, 200);
    assert_eq!(rs[0].body, "upstream ok 11");
    assert_eq!(rs[1].header("transfer-encoding"), Some("chunked"));
    assert_eq!(rs[1].body.len(), 200_000);
    assert_eq!(rs[2].status, 200);
    let got = tg.upstream.received();
    assert_eq!(got[0].body_len, 11);
    assert_eq!(got[0].headers["content-length"], "11");
    assert_eq!(got[1].target, "/download/200000");
    assert_eq!(got[2].target, "/apps/last");
    let line = tg.last_request_line().await;
    assert_eq!(line["status_code"], 200);
    tg.stop().await;
}

#[tokio::test]
async fn refusals_on_the_fast_path_are_the_pipelines_and_forward_nothing() {
    let tg = TestGateway::start().await;
    let rs = send(
        &tg,
        "GET /apps/x HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(served(&tg), (1, 0));
    assert_eq!(rs[0].status, 401);
    assert!(rs[0].header("www-authenticate").is_some());
    assert_eq!(tg.upstream.count(), 0);
    support::assert_rejection_line(&tg.last_request_line().await, 401, "missing_token");
    tg.stop().await;
}

#[tokio::test]
async fn what_the_fast_path_does_not_cover_goes_to_hyper() {
    let tg = TestGateway::start().await;
    let (tok, _) = tg.token("ci", "writer", &["apps:read", "apps:write"]);
    let auth = format!("Authorization: Bearer {tok}\r\n");
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "chunked request body",
            format!(
                "POST /echo/c HTTP/1.1\r\nHost: gw.test\r\n{auth}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            ),
            200,
        ),
        (
            "HTTP/1.0",
            format!("GET /apps/old HTTP/1.0\r\nHost: gw.test\r\n{auth}\r\n"),
            200,
        ),
        (
            "Expect",
            format!(
                "POST /echo/e HTTP/1.1\r\nHost: gw.test\r\n{auth}Expect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
            ),
            200,
        ),
        (
            "health endpoint",
            "GET /_tokengate/health HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n".into(),
            200,
        ),
        (
            "two Content-Length",
            format!(
                "POST /echo/d HTTP/1.1\r\nHost: gw.test\r\n{auth}Content-Length: 2\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
            ),
            200, // hyper takes two equal lengths as one
        ),
        (
            "bare LF",
            format!(
                "GET /apps/lf HTTP/1.1\nHost: gw.test\n{}Connection: close\n\n",
                auth.replace("\r\n", "\n")
            ),
            200,
        ),
        (
            "obs-fold",
            format!(
                "GET /apps/f HTTP/1.1\r\nHost: gw.test\r\n{auth}X-A: 1\r\n 2\r\nConnection: close\r\n\r\n"
            ),
            400,
        ),
    ];
    for (i, (name, bytes, status)) in cases.iter().enumerate() {
        let rs = send(&tg, bytes).await;
        assert_eq!(rs.last().map(|r| r.status), Some(*status), "{name}: {rs:?}");
        assert_eq!(served(&tg), (0, i as u64 + 1), "{name}: declined to hyper");
    }
    // A connection served on the fast path, then declined: hyper serves the rest of it.
    let bytes = get("/apps/fast", &tok, "")
        + &format!(
            "POST /echo/slow HTTP/1.1\r\nHost: gw.test\r\n{auth}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        );
    let rs = send(&tg, &bytes).await;
    assert_eq!(rs.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200]);
    assert_eq!(served(&tg), (1, cases.len() as u64 + 1));
    let got = tg.upstream.received();
    let last = &got[got.len() - 1];
    assert_eq!((last.target.as_str(), last.body_len), ("/echo/slow", 3));
    tg.stop().await;
}

#[tokio::test]
async fn the_switch_turns_the_fast_path_off() {
    let tg = TestGateway::with_server("http1_fast_path = false").await;
    let (tok, _) = tg.token("ci", "reader", &["apps:read"]);
    let rs = send(&tg, &get("/apps/x", &tok, "Connection: close\r\n")).await;
    assert_eq!(rs[0].status, 200);
    assert_eq!(served(&tg), (0, 0));
    tg.stop().await;
}

/// What a response says, without what differs between any two requests (ids, dates, the
/// rate-limit window).
fn comparable(r: &RawResponse) -> (u16, Vec<(String, String)>, String) {
    let id = r.header("x-request-id").unwrap_or("-").to_string();
    let mut headers: Vec<(String, String)> = r
        .headers
        .iter()
        .filter(|(k, _)| {
            !matches!(k.as_str(), "date" | "x-request-id") && !k.starts_with("ratelimit-")
        })
        .cloned()
        .collect();
    headers.sort();
    (r.status, headers, r.body.replace(&id, "<id>"))
}

#[tokio::test]
async fn fast_path_and_hyper_answer_the_same_bytes_alike() {
    let on = TestGateway::start().await;
    let off = TestGateway::with_server("http1_fast_path = false").await;
    let (tok_on, _) = on.token("ci", "reader", &["apps:read"]);
    let (tok_off, _) = off.token("ci", "reader", &["apps:read"]);
    let cases = [
        "GET /apps/ok HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer TOK\r\n\r\n",
        "HEAD /apps/ok HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer TOK\r\n\r\n",
        "GET /status/404 HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer TOK\r\n\r\n",
        "GET /apps/x HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        "GET /apps/x HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer tg_nope\r\n\r\n",
        "GET /nowhere HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer TOK\r\n\r\n",
        "POST /echo/x HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer TOK\r\nContent-Length: 3\r\n\r\nabc",
        "GET /apps/%2e%2e/admin HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer TOK\r\n\r\n",
        "GET /apps/x HTTP/1.1\r\nAuthorization: Bearer TOK\r\n\r\n",
        "GET /apps/x HTTP/1.1\r\nHost: a\r\nHost: b\r\nAuthorization: Bearer TOK\r\n\r\n",
        "GET /apps/x HTTP/1.1\r\nHost: gw.test\r\nX_Forwarded_For: 1.2.3.4\r\nAuthorization: Bearer TOK\r\n\r\n",
        "TRACE /apps/x HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer TOK\r\n\r\n",
        "GET /apps/x HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 99999999999\r\nAuthorization: Bearer TOK\r\n\r\n",
        "GET /download/70000 HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer TOK\r\n\r\n",
    ];
    for case in cases {
        let bytes = |tok: &str| {
            case.replace("TOK", tok)
                + "GET /apps/after HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n"
        };
        let a = raw_all(on.addr, bytes(&tok_on).as_bytes(), Duration::from_secs(3)).await;
        let b = raw_all(off.addr, bytes(&tok_off).as_bytes(), Duration::from_secs(3)).await;
        let a: Vec<_> = a.iter().map(comparable).collect();
        let b: Vec<_> = b.iter().map(comparable).collect();
        assert_eq!(a, b, "{case:?}");
        assert_eq!(
            on.upstream
                .received()
                .iter()
                .map(|r| (r.target.clone(), r.body_len))
                .collect::<Vec<_>>(),
            off.upstream
                .received()
                .iter()
                .map(|r| (r.target.clone(), r.body_len))
                .collect::<Vec<_>>(),
            "{case:?}"
        );
    }
    assert!(served(&on).0 > 0);
    assert_eq!(served(&off), (0, 0));
    on.stop().await;
    off.stop().await;
}
