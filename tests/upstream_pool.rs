//! The upstream connection pool (issue 9): keep-alive reuse, concurrency, connections the upstream
//! closes, `Connection: close`, abandoned bodies, idle expiry, and never replaying a request that
//! may have been sent. Upstreams here are raw `TcpListener`s, so each test controls exactly when a
//! connection opens, answers and closes, and counts what it accepted and received.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokengate::pool::Pool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Barrier;

use support::*;

/// One request as the raw upstream read it.
#[derive(Debug, Clone)]
struct Seen {
    /// Index of the upstream connection it arrived on (0 = first accepted).
    conn: usize,
    method: String,
    /// Request target exactly as received.
    target: String,
    /// Header lines, names lower-cased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What the raw upstream does after reading a request.
struct Reply {
    /// Wait here before answering (forces requests to be in flight together).
    barrier: Option<Arc<Barrier>>,
    /// Response bytes, written as they are.
    bytes: Vec<u8>,
    /// Then write this many more `x` bytes (a large body), until the peer goes away.
    stream: u64,
    then: Then,
}

enum Then {
    KeepOpen,
    Close,
    /// Close the connection after this delay, without having said `Connection: close`.
    CloseAfter(Duration),
}

fn ok(body: &str) -> Reply {
    raw(&format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ))
}

/// `reply`, after which the upstream closes the connection.
fn closing(reply: Reply) -> Reply {
    Reply {
        then: Then::Close,
        ..reply
    }
}

fn raw(text: &str) -> Reply {
    Reply {
        barrier: None,
        bytes: text.as_bytes().to_vec(),
        stream: 0,
        then: Then::KeepOpen,
    }
}

type Script = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A raw HTTP/1.1 upstream run by a script: counts accepted and ended connections, records every
/// request it read.
#[derive(Clone)]
struct RawUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl RawUpstream {
    async fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> RawUpstream {
        let script: Script = Arc::new(script);
        let (listener, addr) = loopback_listener().await;
        let up = RawUpstream {
            addr,
            accepted: Arc::default(),
            ended: Arc::default(),
            seen: Arc::default(),
        };
        let state = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let conn = state.accepted.fetch_add(1, Ordering::SeqCst);
                let (state, script) = (state.clone(), script.clone());
                tokio::spawn(async move {
                    serve(stream, conn, &state, &script).await;
                    state.ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        up
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn ended(&self) -> usize {
        self.ended.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(mut s: TcpStream, conn: usize, state: &RawUpstream, script: &Script) {
    let mut buf = Vec::new();
    loop {
        let Some(seen) = read_request(&mut s, &mut buf, conn).await else {
            return;
        };
        state.seen.lock().unwrap().push(seen.clone());
        let reply = script(&seen);
        if let Some(b) = &reply.barrier {
            b.wait().await;
        }
        if s.write_all(&reply.bytes).await.is_err() {
            return;
        }
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = reply.stream;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if s.write_all(&chunk[..n]).await.is_err() {
                return;
            }
            left -= n as u64;
        }
        match reply.then {
            Then::KeepOpen => {}
            Then::Close => return,
            Then::CloseAfter(d) => {
                tokio::time::sleep(d).await;
                return;
            }
        }
    }
}

/// Reads more bytes into `buf`; false on EOF or error.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut tmp = [0u8; 16 * 1024];
    match s.read(&mut tmp).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&tmp[..n]);
            true
        }
    }
}

fn find(buf: &[u8], pat: &[u8]) -> Option<usize> {
    buf.windows(pat.len()).position(|w| w == pat)
}

/// Reads until `buf` holds `pat`: where it starts; None when the peer closed first.
async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, pat: &[u8]) -> Option<usize> {
    loop {
        if let Some(i) = find(buf, pat) {
            return Some(i);
        }
        if !fill(s, buf).await {
            return None;
        }
    }
}

/// Reads until `buf` holds at least `n` bytes; None when the peer closed first.
async fn read_at_least(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Option<()> {
    while buf.len() < n {
        if !fill(s, buf).await {
            return None;
        }
    }
    Some(())
}

/// Reads one request (Content-Length or chunked body); None when the peer closed.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>, conn: usize) -> Option<Seen> {
    let head_end = read_until(s, buf, b"\r\n\r\n").await?;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let line_end = read_until(s, buf, b"\r\n").await?;
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&buf[..line_end])
                    .split(';')
                    .next()?
                    .trim(),
                16,
            )
            .ok()?;
            buf.drain(..line_end + 2);
            if size == 0 {
                // Trailer section: lines until an empty one.
                loop {
                    let end = read_until(s, buf, b"\r\n").await?;
                    buf.drain(..end + 2);
                    if end == 0 {
                        break;
                    }
                }
                break;
            }
            read_at_least(s, buf, size + 2).await?;
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        read_at_least(s, buf, n).await?;
        body.extend(buf.drain(..n));
    }
    Some(Seen {
        conn,
        method,
        target,
        headers,
        body,
    })
}

/// A gateway in front of `up`, and a token that may read and deploy.
async fn gateway_for(up: &RawUpstream) -> (TestGateway, String) {
    let tg = TestGateway::start_with(Options {
        upstream_override: Some(up.addr.to_string()),
        ..Options::default()
    })
    .await;
    let (tok, _) = tg.token("ci", "pool-bot", &["apps:read", "apps:deploy"]);
    (tg, tok)
}

async fn get(tg: &TestGateway, tok: &str, path: &str) -> (u16, String) {
    let r = get_bearer(&client(), tg.url(path), tok).await;
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let up = RawUpstream::start(|_| ok("fine")).await;
    let (tg, tok) = gateway_for(&up).await;
    for i in 0..20 {
        let (status, body) = get(&tg, &tok, &format!("/apps/a/item?n={i}")).await;
        assert_eq!((status, body.as_str()), (200, "fine"));
    }
    assert_eq!(up.accepted(), 1, "one upstream connection for 20 requests");
    let seen = up.seen();
    assert_eq!(seen.len(), 20);
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s.conn, 0);
        // Origin-form request line, the upstream's own authority as Host (the client's only
        // as X-Forwarded-Host), exactly one Host.
        assert_eq!(s.target, format!("/apps/a/item?n={i}"));
        assert_eq!(s.header_values("host"), vec![up.addr.to_string()]);
        assert_eq!(
            s.header_values("x-forwarded-host"),
            vec![tg.addr.to_string()]
        );
    }
    tg.stop().await;
}

#[tokio::test]
async fn bodiless_chunked_and_head_responses_all_return_their_connection() {
    let up = RawUpstream::start(|s| match (s.method.as_str(), s.target.as_str()) {
        ("HEAD", _) => raw("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
        (_, "/status/204") => raw("HTTP/1.1 204 No Content\r\n\r\n"),
        (_, "/apps/a/empty") => raw("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
        (_, "/apps/a/chunked") => raw(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        ),
        _ => ok("plain"),
    })
    .await;
    let (tg, tok) = gateway_for(&up).await;
    let c = client();
    for _ in 0..3 {
        let r = send_bearer(c.head(tg.url("/apps/a/x")), &tok).await;
        assert_eq!(r.status(), 200);
        assert_eq!(get(&tg, &tok, "/status/204").await, (204, String::new()));
        assert_eq!(get(&tg, &tok, "/apps/a/empty").await, (200, String::new()));
        assert_eq!(
            get(&tg, &tok, "/apps/a/chunked").await,
            (200, "hello world".to_string())
        );
        assert_eq!(
            get(&tg, &tok, "/apps/a/x").await,
            (200, "plain".to_string())
        );
    }
    assert_eq!(up.seen().len(), 15);
    assert_eq!(
        up.accepted(),
        1,
        "every kind of response left the connection reusable"
    );
    tg.stop().await;
}

#[tokio::test]
async fn concurrent_requests_open_at_most_the_concurrency_and_are_all_reused() {
    const N: usize = 4;
    let barrier = Arc::new(Barrier::new(N));
    let b = barrier.clone();
    let up = RawUpstream::start(move |s| {
        let mut r = ok("together");
        if s.target.contains("together") {
            // Nobody answers before all N are in flight: N connections are needed.
            r.barrier = Some(b.clone());
        }
        r
    })
    .await;
    let (tg, tok) = gateway_for(&up).await;
    let paths: Vec<String> = (0..N).map(|i| format!("/apps/a/together?i={i}")).collect();
    let round = || futures_util::future::join_all(paths.iter().map(|p| get(&tg, &tok, p)));
    for r in round().await {
        assert_eq!(r, (200, "together".to_string()));
    }
    assert_eq!(
        up.accepted(),
        N,
        "N requests in flight at once need N connections"
    );
    for r in round().await {
        assert_eq!(r, (200, "together".to_string()));
    }
    for _ in 0..2 * N {
        assert_eq!(get(&tg, &tok, "/apps/a/x").await.0, 200);
    }
    assert_eq!(
        up.accepted(),
        N,
        "the N pooled connections served everything after"
    );
    assert_eq!(up.seen().len(), 4 * N);
    tg.stop().await;
}

#[tokio::test]
async fn connection_close_response_is_not_reused() {
    let up = RawUpstream::start(|_| {
        closing(raw(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbye",
        ))
    })
    .await;
    let (tg, tok) = gateway_for(&up).await;
    for i in 0..3 {
        assert_eq!(get(&tg, &tok, "/apps/a/x").await, (200, "bye".to_string()));
        assert_eq!(up.accepted(), i + 1);
    }
    let conns: Vec<usize> = up.seen().iter().map(|s| s.conn).collect();
    assert_eq!(conns, vec![0, 1, 2]);
    tg.stop().await;
}

/// Every idle connection in the pool is one the upstream has closed (or none is left).
fn no_open_idle(pool: &Pool) -> bool {
    pool.idle_connections() == pool.closed_idle_connections()
}

/// Waits until the upstream has closed `ended` connections in all, then until `pool` has seen
/// the close ([`no_open_idle`]).
async fn wait_closed(up: &RawUpstream, pool: &Pool, ended: usize, what: &str) {
    wait_until(what, || up.ended() == ended).await;
    wait_until("the pool saw the close", || no_open_idle(pool)).await;
}

#[tokio::test]
async fn upstream_closing_an_idle_connection_is_survived_and_a_post_is_sent_once() {
    // Every connection answers one request, then the upstream closes it a moment later without
    // having said `Connection: close` (an upstream's keep-alive timeout).
    let up = RawUpstream::start(|_| Reply {
        then: Then::CloseAfter(Duration::from_millis(30)),
        ..ok("done")
    })
    .await;
    let (tg, tok) = gateway_for(&up).await;
    // [`wait_closed`] for the gateway's pool.
    let closed = |ended, what| wait_closed(&up, tg.gw.upstream_pool(), ended, what);
    let c = client();
    for i in 0..3 {
        assert_eq!(get(&tg, &tok, "/apps/a/x").await, (200, "done".to_string()));
        // The upstream closed it, and the gateway's connection task has read the FIN: no open
        // idle connection is left.
        closed(2 * i + 1, "the upstream closed its idle connection").await;
        let r = send_bearer(
            c.post(tg.url("/apps/a/deploy"))
                .body(format!("payload-{i}")),
            &tok,
        )
        .await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "done");
        closed(2 * i + 2, "the upstream closed the POST's connection").await;
    }
    let seen = up.seen();
    let posts: Vec<&Seen> = seen.iter().filter(|s| s.method == "POST").collect();
    assert_eq!(
        posts.len(),
        3,
        "each POST reached the upstream exactly once"
    );
    for (i, p) in posts.iter().enumerate() {
        assert_eq!(p.body, format!("payload-{i}").into_bytes());
    }
    // Each request needed a fresh connection: the closed ones were never used again.
    assert_eq!(up.accepted(), 6);
    let conns: Vec<usize> = seen.iter().map(|s| s.conn).collect();
    assert_eq!(conns, vec![0, 1, 2, 3, 4, 5]);
    tg.stop().await;
}

#[tokio::test]
async fn a_post_that_may_have_been_sent_is_never_replayed() {
    // The upstream reads the POST on a reused connection, then hangs up without answering: the
    // request may have been acted on, so the gateway answers 502 and does not send it again.
    let up = RawUpstream::start(|s| {
        if s.method == "POST" {
            closing(raw(""))
        } else {
            ok("warm")
        }
    })
    .await;
    let (tg, tok) = gateway_for(&up).await;
    assert_eq!(get(&tg, &tok, "/apps/a/x").await, (200, "warm".to_string()));
    let r = client()
        .post(tg.url("/apps/a/deploy"))
        .bearer_auth(&tok)
        .body("deploy-once")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert!(r.headers().get("www-authenticate").is_none());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "bad_gateway");
    assert!(v["request_id"].is_string());
    let line = tg.last_request_line().await;
    assert_eq!(line["status_code"], 502, "{line}");
    assert_eq!(line["reason"], "upstream_error", "{line}");
    assert_eq!(line["method"], "POST", "{line}");
    assert_eq!(line["upstream"], "api", "{line}");
    // A (wrong) replay would be sent inside the request's handling, before its response and
    // audit line: nothing can arrive after this point.
    let seen = up.seen();
    let posts: Vec<&Seen> = seen.iter().filter(|s| s.method == "POST").collect();
    assert_eq!(posts.len(), 1, "sent once, never replayed");
    assert_eq!(posts[0].conn, 0, "it went out on the pooled connection");
    assert_eq!(posts[0].body, b"deploy-once");
    assert_eq!(up.accepted(), 1, "no new connection for a replay");
    tg.stop().await;
}

#[tokio::test]
async fn abandoned_response_body_does_not_return_its_connection() {
    let up = RawUpstream::start(|s| {
        if s.target == "/apps/a/big" {
            let total: u64 = 256 * 1024 * 1024;
            Reply {
                stream: total,
                ..raw(&format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {total}\r\n\r\n"
                ))
            }
        } else {
            ok("small")
        }
    })
    .await;
    let (tg, tok) = gateway_for(&up).await;
    // A client that reads the start of a large download, then goes away.
    let mut s = TcpStream::connect(tg.addr).await.unwrap();
    s.write_all(
        format!(
            "GET /apps/a/big HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {tok}\r\n\r\n",
            tg.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while got < 512 * 1024 {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "the download started");
        if got == 0 {
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        }
        got += n;
    }
    drop(s);
    // The gateway drops the half-read upstream connection instead of pooling it.
    wait_until(
        "the upstream connection of the abandoned body closed",
        || up.ended() == 1,
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            get(&tg, &tok, "/apps/a/x").await,
            (200, "small".to_string())
        );
    }
    assert_eq!(up.accepted(), 2);
    let conns: Vec<usize> = up.seen().iter().map(|s| s.conn).collect();
    assert_eq!(conns, vec![0, 1, 1, 1]);
    tg.stop().await;
}

// The pool on its own: idle expiry, the reaper, the Host fallback.

fn request(up: &RawUpstream, path: &str) -> http::Request<tokengate::body::Body> {
    http::Request::get(format!("http://{}{path}", up.addr))
        .body(tokengate::body::empty())
        .unwrap()
}

async fn send(pool: &Pool, req: http::Request<tokengate::body::Body>) -> (u16, Bytes) {
    let resp = pool.request(req).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn idle_connections_expire_after_the_idle_timeout() {
    let up = RawUpstream::start(|_| ok("hi")).await;
    let pool = Pool::default();
    assert_eq!(send(&pool, request(&up, "/a")).await.0, 200);
    assert_eq!(pool.idle_connections(), 1);
    pool.advance_clock(Duration::from_secs(59));
    assert_eq!(send(&pool, request(&up, "/b")).await.0, 200);
    assert_eq!(pool.connections_opened(), 1, "59 s idle: still reused");
    pool.advance_clock(Duration::from_secs(61));
    assert_eq!(send(&pool, request(&up, "/c")).await.0, 200);
    assert_eq!(pool.connections_opened(), 2, "61 s idle: expired");
    assert_eq!(up.accepted(), 2);
    // The expired connection was closed, not just forgotten.
    wait_until("the expired connection closed", || up.ended() == 1).await;
    assert_eq!(pool.idle_connections(), 1);
    let conns: Vec<usize> = up.seen().iter().map(|s| s.conn).collect();
    assert_eq!(conns, vec![0, 0, 1]);
}

#[tokio::test]
async fn idle_connections_close_on_time_without_further_traffic() {
    let up = RawUpstream::start(|_| ok("hi")).await;
    let pool = Pool::builder()
        .idle_timeout(Duration::from_millis(100))
        .build();
    assert_eq!(send(&pool, request(&up, "/a")).await.0, 200);
    wait_until("the reaper closed the idle connection", || {
        up.ended() == 1 && pool.idle_connections() == 0
    })
    .await;
    // The pool still works afterwards.
    assert_eq!(send(&pool, request(&up, "/b")).await.0, 200);
    assert_eq!(pool.connections_opened(), 2);
}

#[tokio::test]
async fn a_connection_the_upstream_closed_is_dropped_from_the_pool() {
    let up = RawUpstream::start(|_| closing(ok("hi"))).await;
    let pool = Pool::default();
    assert_eq!(send(&pool, request(&up, "/a")).await.0, 200);
    wait_closed(&up, &pool, 1, "the upstream closed").await;
    assert_eq!(
        send(&pool, request(&up, "/b")).await,
        (200, Bytes::from("hi"))
    );
    assert_eq!(pool.connections_opened(), 2);
    assert_eq!(
        pool.retries(),
        0,
        "seen closed at checkout, nothing to retry"
    );
    assert_eq!(up.seen().len(), 2);
}

#[tokio::test]
async fn host_comes_from_the_authority_only_when_the_request_has_none() {
    let up = RawUpstream::start(|_| ok("hi")).await;
    let pool = Pool::default();
    send(&pool, request(&up, "/none?q=1")).await;
    let mut req = request(&up, "/given");
    req.headers_mut()
        .insert("host", "api.example.com".parse().unwrap());
    send(&pool, req).await;
    let seen = up.seen();
    assert_eq!(seen[0].target, "/none?q=1");
    assert_eq!(seen[0].header_values("host"), vec![up.addr.to_string()]);
    assert_eq!(seen[1].target, "/given");
    assert_eq!(seen[1].header_values("host"), vec!["api.example.com"]);
}

#[tokio::test]
async fn a_refused_connect_is_an_error_not_a_hang() {
    let dead = dead_addr();
    let pool = Pool::default();
    let req = http::Request::get(format!("http://{dead}/x"))
        .body(tokengate::body::empty())
        .unwrap();
    let err = pool.request(req).await.unwrap_err();
    assert!(
        matches!(err, tokengate::pool::PoolError::Connect { .. }),
        "{err}"
    );
    assert_eq!(pool.connections_opened(), 0);
}
