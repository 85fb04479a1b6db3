//! Connection faults (issue 16): clients that never read their response, a slow but steady
//! upload, requests on kept-alive connections during the drain and at its deadline, and requests
//! hyper refuses itself.
//!
//! Real sockets throughout; the slow-reader and drain tests run the real `tokengate` binary (its
//! memory is measured in /proc, and SIGTERM is a real signal), the others an in-process gateway in
//! front of the recording upstream. Times are short configured timeouts; nothing asserts how long
//! anything took.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command as StdCommand, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::{
    NO_RATE_LIMIT, Options, Proc, TestGateway, Upstream, assert_rejection_line, eventually,
    issue_into, metrics_text, parse_responses, raw, read_audit_file, rules_with_delay, signal,
    wait_refused,
};
use tokengate::metrics::HttpErrorKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_tokengate");

// =================================================================================================
// Harness: the real binary, a token issued into its store, an upstream that counts connections.
// =================================================================================================

/// The real binary (see [`Proc`]) in front of `upstream`, with a token holding `apps:read` issued
/// into its store before it starts. Returns the process and the token.
async fn start(upstream: SocketAddr, o: &Options) -> (Proc, String) {
    let mut token = String::new();
    let p = Proc::start(upstream, o, |db| {
        token = issue_into(db, "ci", "reader", &["apps:read"]).0;
    })
    .await;
    (p, token)
}

/// The value of `series` in the `/metrics` of `p`.
async fn metric_of(p: &Proc, series: &str) -> f64 {
    metrics_text(p.admin)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

/// The audit file as the reader shows it: each forwarded request's completion merged into its
/// write-ahead decision line.
fn audit_file_lines(path: &Path) -> Vec<serde_json::Value> {
    support::merge_completions(read_audit_file(path)).0
}

fn verify_audit(path: &Path) {
    let out = StdCommand::new(BIN)
        .args(["audit", "verify", path.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    support::assert_success(&out);
}

/// An upstream that counts its open connections and requests; `/download/N` streams N bytes in
/// 64 KiB chunks.
#[derive(Clone)]
struct CountingUpstream {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl CountingUpstream {
    async fn start() -> CountingUpstream {
        let (listener, addr) = support::loopback_listener().await;
        let open = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (o, r) = (open.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (o, r) = (o.clone(), r.clone());
                o.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        r.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let total: u64 = req
                                .uri()
                                .path()
                                .strip_prefix("/download/")
                                .and_then(|n| n.parse().ok())
                                .unwrap_or(0);
                            Ok::<_, Infallible>(Response::new(support::download_body(total)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        CountingUpstream {
            addr,
            open,
            requests,
        }
    }
}

// =================================================================================================
// Item 5: clients that never read
// =================================================================================================

/// What one slow reader may pin, as docs/limits.md states it ("Memory a slow reader can pin"):
/// at most 512 KiB (hyper's write buffer with one body chunk, the upstream connection's read
/// buffer, both connections' state, allocator slack), until the send timeout cuts it.
const SLOW_READER_BOUND_KIB: u64 = 512;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_are_cut_and_release_their_upstream_connections() {
    const CLIENTS: usize = 200;
    let upstream = CountingUpstream::start().await;
    let o = Options {
        server: "body_idle_timeout = \"2s\"\nmax_connections_per_ip = 1000".into(),
        sections: NO_RATE_LIMIT.into(),
        ..Options::default()
    };
    let (p, token) = start(upstream.addr, &o).await;
    let request = format!(
        "GET /download/1073741824 HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    // Warm up (allocator arenas, the pool, the token cache) with one client that reads it all.
    let mut warm = TcpStream::connect(p.public).await.unwrap();
    warm.write_all(
        format!("GET /download/1048576 HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut sink = Vec::new();
    warm.read_to_end(&mut sink).await.unwrap();
    assert!(sink.len() > 1_048_576, "the warm-up download was served");
    let base_rss = p.status_kib("VmRSS");
    let base_anon = p.status_kib("RssAnon");

    // 200 clients ask for 1 GiB each and never read a byte.
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let mut s = TcpStream::connect(p.public).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        clients.push(s);
    }
    eventually(
        "every slow reader's request to reach the upstream",
        Duration::from_secs(30),
        || async { (upstream.requests.load(Ordering::SeqCst) > CLIENTS).then_some(()) },
    )
    .await;
    // While they are stalled (before the cut), the process's memory is at its highest. Sampled at
    // least once, also when a loaded machine let the first cuts happen before the last request
    // reached the upstream.
    let mut peak_rss = p.status_kib("VmRSS");
    let mut peak_anon = p.status_kib("RssAnon");
    let cut = Instant::now();
    while upstream.open.load(Ordering::SeqCst) >= CLIENTS && cut.elapsed() < Duration::from_secs(60)
    {
        peak_rss = peak_rss.max(p.status_kib("VmRSS"));
        peak_anon = peak_anon.max(p.status_kib("RssAnon"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let growth = peak_rss.saturating_sub(base_rss);
    let growth_anon = peak_anon.saturating_sub(base_anon);
    let bound = SLOW_READER_BOUND_KIB * CLIENTS as u64;
    eprintln!(
        "{CLIENTS} slow readers: VmRSS {base_rss} -> {peak_rss} KiB (+{growth}), RssAnon {base_anon} -> {peak_anon} KiB (+{growth_anon}); bound {bound} KiB"
    );
    assert!(
        growth <= bound,
        "RSS grew by {growth} KiB for {CLIENTS} slow readers, over the documented {bound} KiB"
    );

    // After the send timeout every upstream connection is gone: dropped with the response, not
    // parked in the pool.
    eventually(
        "the upstream connections of the slow readers to close",
        Duration::from_secs(60),
        || async { (upstream.open.load(Ordering::SeqCst) == 0).then_some(()) },
    )
    .await;
    // Each client's connection was closed: reading what the kernel buffered ends in EOF or reset.
    for mut s in clients {
        let mut buf = vec![0u8; 1 << 20];
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "a slow reader's connection is still open");
    }
    // Each slow reader's line says why it was cut: `client_closed` when the write to it stalled
    // for the send timeout (counted in the metric), or `upstream_idle` when, on a loaded machine,
    // this test's own upstream was not scheduled within the same timeout first. Nothing else.
    let cut_lines = |lines: &[serde_json::Value], outcome: &str| {
        lines
            .iter()
            .filter(|l| l["reason"] != "ok" && l["outcome"] == outcome)
            .count()
    };
    let lines = eventually(
        "a line for every slow reader",
        Duration::from_secs(10),
        || {
            let lines = audit_file_lines(&p.audit_path());
            async move { (lines.len() > CLIENTS).then_some(lines) }
        },
    )
    .await;
    let stalled = cut_lines(&lines, "client_closed");
    let starved = cut_lines(&lines, "upstream_idle");
    assert_eq!(
        stalled + starved,
        CLIENTS,
        "every slow reader was cut for not reading: {lines:?}"
    );
    assert!(
        stalled > CLIENTS / 2,
        "{stalled} of {CLIENTS} cut by the send timeout"
    );
    // The counter moves just after the socket is closed: wait for the last ones.
    let metric = "tokengate_http_errors_total{kind=\"send_timeout\"}";
    eventually(
        "every stalled write to be counted as a send timeout",
        Duration::from_secs(10),
        || async { (metric_of(&p, metric).await == stalled as f64).then_some(()) },
    )
    .await;
    eventually(
        "no open connection left",
        Duration::from_secs(10),
        || async { (metric_of(&p, "tokengate_open_connections").await == 0.0).then_some(()) },
    )
    .await;
}

// =================================================================================================
// Item 6: the upstream timeout counts from the end of the request body
// =================================================================================================

/// Sends a chunked upload of `chunks` × 1 KiB, one chunk every `every`, and returns the response.
async fn slow_upload(
    addr: SocketAddr,
    token: &str,
    path: &str,
    chunks: usize,
    every: Duration,
) -> support::RawResponse {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let chunk = format!("400\r\n{}\r\n", "u".repeat(1024));
    for _ in 0..chunks {
        s.write_all(chunk.as_bytes()).await.unwrap();
        tokio::time::sleep(every).await;
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await;
    parse_responses(&String::from_utf8_lossy(&buf))
        .into_iter()
        .next()
        .expect("a response")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_steady_upload_of_30_s_gets_200_with_a_2_s_upstream_timeout() {
    let tg =
        TestGateway::with_server("upstream_timeout = \"2s\"\nbody_idle_timeout = \"3s\"").await;
    let (token, _) = tg.token("ci", "uploader", &["apps:read"]);
    // 60 KiB over 30 s: a chunk every 500 ms, well inside the body idle timeout; the upload
    // alone lasts 15 times the upstream timeout.
    let r = slow_upload(
        tg.addr,
        &token,
        "/echo/upload",
        60,
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body, format!("upstream ok {}", 60 * 1024));
    let line = tg.last_request_line().await;
    assert_eq!(line["reason"], "ok", "{line}");
    assert_eq!(line["status_code"], 200, "{line}");
    let received = tg.upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body_len, 60 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_timeout_still_applies_once_the_body_is_sent_and_a_stalled_upload_is_cut() {
    let tg =
        TestGateway::with_server("upstream_timeout = \"1s\"\nbody_idle_timeout = \"1s\"").await;
    let (token, _) = tg.token("ci", "uploader", &["apps:read"]);
    // The upstream reads the body, then never answers: 504 after the body.
    let r = slow_upload(tg.addr, &token, "/slow/x", 3, Duration::from_millis(300)).await;
    assert_eq!(r.status, 504, "{}", r.raw);
    let line = tg.last_request_line().await;
    assert_eq!(line["reason"], "upstream_timeout", "{line}");
    assert_eq!(tg.upstream.received()[0].body_len, 3 * 1024);

    // An upload that stops mid-body is cut by the body idle guard (408), not left waiting.
    let mut s = TcpStream::connect(tg.addr).await.unwrap();
    s.write_all(
        format!(
            "POST /echo/stalled HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n{}\r\n",
            "u".repeat(1024)
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await;
    let r = parse_responses(&String::from_utf8_lossy(&buf))
        .into_iter()
        .next()
        .expect("a response");
    assert_eq!(r.status, 408, "{}", r.raw);
    let line = tg.last_request_line().await;
    assert_eq!(line["reason"], "body_idle", "{line}");
}

// =================================================================================================
// Item 9: the drain answers instead of dropping, and its deadline cuts with an audit line
// =================================================================================================

/// Reads one response with a `Content-Length` body from a kept-alive connection.
async fn read_one(s: &mut TcpStream) -> support::RawResponse {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return parse_responses(&text).into_iter().next().unwrap();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut tmp))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(
            n > 0,
            "connection closed without a (complete) response: {text}"
        );
        buf.extend_from_slice(&tmp[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_connection_idle_at_sigterm_is_served_with_connection_close() {
    let upstream = Upstream::start().await;
    let o = Options {
        server: "shutdown_grace = \"30s\"".into(),
        rules: rules_with_delay(),
        ..Options::default()
    };
    let (mut p, token) = start(upstream.addr, &o).await;
    let get = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\n\r\n")
    };
    // A kept-alive connection: one request, then idle.
    let mut idle = TcpStream::connect(p.public).await.unwrap();
    idle.write_all(get("/apps/a/first").as_bytes())
        .await
        .unwrap();
    let r = read_one(&mut idle).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_ne!(r.header("connection"), Some("close"));

    // Another client's request keeps the drain going for 3 s.
    let mut busy = TcpStream::connect(p.public).await.unwrap();
    busy.write_all(get("/delay/3000").as_bytes()).await.unwrap();
    upstream.wait_for("/delay/3000").await;
    signal(p.pid(), "-TERM");
    wait_refused("the listener to close", p.public).await;

    // The connection that was idle at SIGTERM sends a request: it is answered, with
    // `Connection: close`, and then closed.
    idle.write_all(get("/apps/a/during-drain").as_bytes())
        .await
        .unwrap();
    let r = read_one(&mut idle).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body, "upstream ok 0");
    assert_eq!(r.header("connection"), Some("close"));
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut rest))
        .await
        .expect("closed after the response")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing after the last response");

    // The slow request is answered too, and the process exits 0 without hitting the deadline.
    let r = read_one(&mut busy).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(p.wait_exit(Duration::from_secs(60)).await, 0);
    assert!(!p.stderr_has("drain deadline passed"));
    let lines = audit_file_lines(&p.audit_path());
    let mut paths: Vec<_> = lines
        .iter()
        .filter(|l| l["kind"] == "request")
        .map(|l| (l["path"].as_str().unwrap(), l["reason"].as_str().unwrap()))
        .collect();
    // Write-ahead: lines are in decision order (the slow request was decided first).
    paths.sort();
    assert_eq!(
        paths,
        [
            ("/apps/a/during-drain", "ok"),
            ("/apps/a/first", "ok"),
            ("/delay/3000", "ok")
        ]
    );
    verify_audit(&p.audit_path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_deadline_cuts_a_running_request_and_audits_it_as_shutdown() {
    let upstream = Upstream::start().await;
    let o = Options {
        server: "shutdown_grace = \"1s\"".into(),
        ..Options::default()
    };
    let (mut p, token) = start(upstream.addr, &o).await;
    // `/slow` never answers.
    let mut stuck = TcpStream::connect(p.public).await.unwrap();
    stuck
        .write_all(
            format!("GET /slow/forever HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    upstream.wait_for("/slow/forever").await;
    signal(p.pid(), "-TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(30)).await, 0);
    assert!(p.stderr_has("drain deadline passed"));
    // The client gets its connection closed, without a response.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stuck.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    // ... and the request has its audit line: cut by the shutdown, forwarded before.
    let lines = audit_file_lines(&p.audit_path());
    let line = lines
        .iter()
        .find(|l| l["kind"] == "request" && l["path"] == "/slow/forever")
        .unwrap_or_else(|| panic!("no audit line for the cut request: {lines:?}"));
    assert_eq!(line["reason"], "shutdown", "{line}");
    assert_eq!(line["status_code"], 503, "{line}");
    assert_eq!(line["rbac_decision"], "allow", "{line}");
    assert!(line["upstream"].is_string(), "{line}");
    verify_audit(&p.audit_path());
}

// =================================================================================================
// Item 7 (second half): requests hyper refuses itself are audited and counted
// =================================================================================================

#[tokio::test]
async fn requests_refused_by_the_http_layer_have_an_audit_line_and_a_metric() {
    let (tg, token, _) = TestGateway::with_reader().await;
    let auth = format!("Authorization: Bearer {token}\r\n");
    let many_headers: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
    // A TLS ClientHello's first bytes on the plain listener.
    let tls_hello: &[u8] = &[
        0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03, 0x03, 0x11, 0x22, 0x33,
    ];
    let cases: Vec<(&str, Vec<u8>, u16, HttpErrorKind)> = vec![
        (
            "two different Content-Length",
            format!("POST /echo/x HTTP/1.1\r\nHost: gw.test\r\n{auth}Content-Length: 3\r\nContent-Length: 5\r\n\r\nabcde").into_bytes(),
            400,
            HttpErrorKind::BadRequest,
        ),
        (
            "101 header fields",
            format!("GET /apps/a/b HTTP/1.1\r\nHost: gw.test\r\n{auth}{many_headers}\r\n").into_bytes(),
            431,
            HttpErrorKind::HeadTooLarge,
        ),
        (
            "a 40 KB request target",
            format!("GET /apps/a/{} HTTP/1.1\r\nHost: gw.test\r\n{auth}\r\n", "u".repeat(40_000)).into_bytes(),
            431,
            HttpErrorKind::HeadTooLarge,
        ),
        (
            "obs-fold",
            format!("GET /apps/a/b HTTP/1.1\r\nHost: gw.test\r\n{auth}X-Folded: a\r\n b\r\n\r\n").into_bytes(),
            400,
            HttpErrorKind::BadRequest,
        ),
        (
            "HTTP/9.9",
            format!("GET /apps/a/b HTTP/9.9\r\nHost: gw.test\r\n{auth}\r\n").into_bytes(),
            400,
            HttpErrorKind::BadRequest,
        ),
        (
            "TLS bytes on the plain listener",
            tls_hello.to_vec(),
            400,
            HttpErrorKind::BadRequest,
        ),
    ];
    for (i, (name, bytes, status, kind)) in cases.into_iter().enumerate() {
        let audited = i + 1;
        let before = tg.gw.metrics().http_errors(kind);
        let r = raw(tg.addr, &bytes).await;
        assert_eq!(r.status, status, "{name}: {}", r.raw);
        assert!(
            r.header("x-request-id").is_none(),
            "{name}: reached the pipeline"
        );
        let lines = eventually(name, Duration::from_secs(5), || async {
            let l = tg.request_lines().await;
            (l.len() == audited).then_some(l)
        })
        .await;
        let line = lines.last().unwrap();
        assert_rejection_line(line, status, "bad_request_http");
        assert_eq!(line["client_ip"], "127.0.0.1", "{name}");
        assert_eq!(line["path"], "", "{name}");
        assert_eq!(line["auth_type"], "none", "{name}");
        assert!(line["token_prefix"].is_null(), "{name}");
        assert!(
            !line.to_string().contains(&token),
            "{name}: token in the audit log"
        );
        assert_eq!(tg.gw.metrics().http_errors(kind), before + 1, "{name}");
        assert_eq!(tg.upstream.count(), 0, "{name}: forwarded");
    }
    // The metric is exported.
    let text = metrics_text(tg.admin_addr).await;
    assert!(
        text.contains("tokengate_http_errors_total{kind=\"bad_request\"} 4"),
        "{text}"
    );
    assert!(text.contains("tokengate_http_errors_total{kind=\"head_too_large\"} 2"));

    // A connection that sends nothing is closed at the header timeout: counted, not audited
    // (there was no request).
    let tg = TestGateway::with_server("header_read_timeout = \"500ms\"").await;
    let mut s = TcpStream::connect(tg.addr).await.unwrap();
    s.write_all(b"GET /apps/a/b HTTP/1.1\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    eventually(
        "the header timeout to be counted",
        Duration::from_secs(5),
        || async { (tg.gw.metrics().http_errors(HttpErrorKind::HeaderTimeout) == 1).then_some(()) },
    )
    .await;
    assert!(tg.request_lines().await.is_empty());
}
