//! Rate limits and resource limits under abuse (issue 6, SPEC §4 and the limits of §5): per-token
//! GCRA with its headers, the per-IP failed-auth limiter, its memory under a flood of addresses,
//! slowloris, stalled TLS handshakes, oversized heads and bodies, connection and stream limits.
//!
//! Every test runs a real gateway on 127.0.0.1:0 in front of the recording upstream. Linux routes
//! all of 127/8 to `lo`, so clients bind 127.0.0.2 and up to act as other addresses.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use support::*;
use tokengate::metrics::ConnLimit;
use tokengate::store::RateOverride;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

// ------------------------------------------------------------------ helpers

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An HTTP/1.1 client whose connections come from `from`.
fn client_from(from: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(ip(from))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A TCP connection to `addr` from the loopback address `from`.
async fn tcp_from(from: &str, addr: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(ip(from), 0)).unwrap();
    s.connect(addr).await.unwrap()
}

/// Reads until the peer closes (or fails) or `limit` passes; returns the bytes and whether the
/// connection was closed.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Checks that the last request was refused with `status` and `reason` while its body was on
/// the way, the upstream having received at most `max_body` bytes of any body.
async fn assert_body_cut_off(tg: &TestGateway, status: u16, reason: &str, max_body: u64) {
    tg.assert_last_line(status, reason).await;
    tg.upstream.assert_bodies_at_most(max_body);
}

/// Checks that the server closes `s` (within 5 s) without answering a byte.
async fn assert_closed_unanswered(s: &mut TcpStream, what: &str) {
    let (got, closed) = read_until_closed(s, Duration::from_secs(5)).await;
    assert!(closed && got.is_empty(), "{what}");
}

/// Checks that a connection `what` was closed (`closed`, after `after`) at a timeout of 1 s,
/// without a reply (`got`).
fn assert_closed_silently_at_1s(what: &str, after: Duration, closed: bool, got: &[u8]) {
    assert!(closed, "{what}: still open after {after:?}");
    assert!(got.is_empty(), "{what}: no reply is owed, got {got:?}");
    assert!(
        after >= Duration::from_millis(900) && after <= Duration::from_secs(2),
        "{what}: closed after {after:?}, not at ~1 s"
    );
}

/// How many cells a failed-auth limiter of `limit` a minute gives back in `elapsed` (rounded up).
fn refills(elapsed: Duration, limit: usize) -> usize {
    (elapsed.as_secs_f64() / (60.0 / limit as f64)).ceil() as usize
}

/// GET `/apps/a/b` with `tok`: checks the status and the advertised `RateLimit-Limit`.
async fn get_limited(
    c: &reqwest::Client,
    tg: &TestGateway,
    tok: &str,
    status: u16,
    limit: impl ToString,
) -> reqwest::Response {
    let r = get_bearer_expect(c, tg.url("/apps/a/b"), tok, status).await;
    assert_eq!(header(&r, "ratelimit-limit"), limit.to_string());
    r
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .to_str()
        .unwrap()
}

/// Makes sure this process may open `need` files, raising the soft limit with `prlimit` if the
/// hard limit allows (the crate forbids `unsafe`, so no direct `setrlimit`).
fn ensure_open_files(need: u64) {
    let read = || -> (u64, u64) {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let v: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        (v[0], v[1])
    };
    let (soft, hard) = read();
    if soft >= need {
        return;
    }
    assert!(
        hard >= need,
        "this test needs {need} open files; the hard limit is {hard}"
    );
    let status = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={hard}:{hard}"))
        .status();
    assert!(
        matches!(status, Ok(s) if s.success()) && read().0 >= need,
        "could not raise the open-file limit to {need} (run `ulimit -n {need}` first)"
    );
}

/// `VmRSS` and `VmHWM` (peak) of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A token that fails the checksum: a real token with its last character changed.
fn bad_checksum(good: &str) -> String {
    let mut b = good.as_bytes().to_vec();
    let last = b.len() - 1;
    b[last] = if b[last] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

// ------------------------------------------------------------------ per-token limits

#[tokio::test]
async fn one_token_bursts_into_429_while_another_is_unaffected_then_refills() {
    let tg = TestGateway::start().await;
    // 1 request a second, burst 3: the four requests below take milliseconds on loopback, far
    // inside the one second a cell takes to come back.
    let (hot, hot_id) = tg.rated_token("ci", "hot", 1.0, 3);
    let (calm, _) = tg.token("ci", "calm", &["apps:read"]);
    let c = client();
    for (remaining, reset) in [(2, 1), (1, 2), (0, 3)] {
        let r = get_limited(&c, &tg, &hot, 200, "3").await;
        assert_eq!(header(&r, "ratelimit-remaining"), remaining.to_string());
        // Seconds until the whole burst is back: one second per used cell at 1/s.
        assert_eq!(header(&r, "ratelimit-reset"), reset.to_string());
    }
    assert_eq!(tg.upstream.count(), 3);

    let r = get_bearer_expect(&c, tg.url("/apps/a/b"), &hot, 429).await;
    assert_eq!(header(&r, "retry-after"), "1");
    assert_eq!(header(&r, "ratelimit-limit"), "3");
    assert_eq!(header(&r, "ratelimit-remaining"), "0");
    assert_eq!(header(&r, "ratelimit-reset"), "1");
    assert_eq!(header(&r, "content-type"), "application/json");
    assert!(
        r.headers().get("www-authenticate").is_none(),
        "a valid token needs no challenge"
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert!(body["message"].as_str().unwrap().contains("Rate limit"));
    assert!(body["request_id"].is_string());
    let line = tg.last_request_line().await;
    assert_rejection_line(&line, 429, "rate_limited");
    assert_eq!(
        line["api_token_id"],
        hot_id.as_str(),
        "the audit line names the limited token"
    );
    assert_eq!(tg.upstream.count(), 3, "the 429 was not forwarded");

    // Another token is unaffected.
    let r = get_limited(&c, &tg, &calm, 200, "100").await;
    assert_eq!(header(&r, "ratelimit-remaining"), "99");
    assert_eq!(header(&r, "ratelimit-reset"), "1");

    // After Retry-After, one cell is back (GCRA guarantees it; exact refill timing is proven on
    // a fake clock in ratelimit/mod.rs). The limiter runs on the gateway clock: advance it.
    tg.gw.clock().advance_ms(1050);
    get_limited(&c, &tg, &hot, 200, "3").await;
    assert_eq!(tg.upstream.count(), 5);
    tg.stop().await;
}

#[tokio::test]
async fn a_fast_override_refills_within_milliseconds() {
    let tg = TestGateway::start().await;
    // 1000/s, burst 3: a used cell is back after 1 ms.
    let (fast, _) = tg.rated_token("ci", "fast", 1000.0, 3);
    let c = client();
    for _ in 0..3 {
        get_limited(&c, &tg, &fast, 200, "3").await;
        tg.gw.clock().advance_ms(5);
    }
    // Refilled: the burst is (almost) whole again after a few ms.
    let r = get_bearer_expect(&c, tg.url("/apps/a/b"), &fast, 200).await;
    assert_eq!(header(&r, "ratelimit-remaining"), "2");
    assert_eq!(
        header(&r, "ratelimit-reset"),
        "1",
        "whole seconds, rounded up"
    );
    tg.stop().await;
}

#[tokio::test]
async fn token_override_beats_role_beats_global_default() {
    let tg = TestGateway::start_with(Options {
        sections: r#"
[rate_limit]
requests_per_second = 5
burst = 7

[roles.limited]
permissions = ["apps:read"]
rate_limit = { requests_per_second = 2, burst = 4 }
"#
        .into(),
        ..Options::default()
    })
    .await;
    let role = |r: &str| Some(r.to_string());
    let (over, _) = tg.token_with("ci", "override", &["apps:read"], |s| {
        s.role = role("limited");
        s.rate = Some(RateOverride {
            requests_per_second: 1.0,
            burst: 2,
        });
    });
    let (by_role, _) = tg.token_with("ci", "by-role", &["apps:read"], |s| {
        s.role = role("limited")
    });
    let (plain, _) = tg.token("ci", "plain", &["apps:read"]);
    // A role name the config no longer has falls back to the global default.
    let (gone, _) = tg.token_with("ci", "gone-role", &["apps:read"], |s| {
        s.role = role("retired")
    });
    let c = client();
    for (tok, limit) in [(&over, 2), (&by_role, 4), (&plain, 7), (&gone, 7)] {
        let r = get_limited(&c, &tg, tok, 200, limit).await;
        assert_eq!(header(&r, "ratelimit-remaining"), (limit - 1).to_string());
    }
    // The override's burst of 2 is really enforced, not just advertised.
    get_bearer_expect(&c, tg.url("/apps/a/b"), &over, 200).await;
    get_limited(&c, &tg, &over, 429, "2").await;
    assert_eq!(tg.upstream.count(), 5);
    tg.stop().await;
}

// ------------------------------------------------------------------ failed-auth limiter

/// The failed-auth limit (failures a minute per address) of the tests that flood it.
const LIMIT: usize = 20;
/// How many bad tokens a flood sends.
const TOTAL: usize = 10_000;

/// The address limiters run on the gateway clock: a blocked address is judged again once the
/// clock has passed its `Retry-After`, with no real wait; until then it is refused without a
/// lookup, and nothing is forwarded either way.
#[tokio::test]
async fn a_blocked_address_is_judged_again_once_the_gateway_clock_passes_retry_after() {
    let tg = TestGateway::failed_auth_limited(2).await;
    let c = client();
    let unknown = || tokengate::token::generate("tg").plaintext;
    for _ in 0..2 {
        get_bearer_expect(&c, tg.url("/apps/a/b"), unknown(), 401).await;
    }
    let lookups = tg.gw.store().lookup_count();
    let r = get_bearer_expect(&c, tg.url("/apps/a/b"), unknown(), 429).await;
    let wait: i64 = header(&r, "retry-after").parse().unwrap();
    assert!(
        (1..=30).contains(&wait),
        "one failure back every 30 s: {wait}"
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "too_many_failures");
    assert_rejection_line(&tg.last_request_line().await, 429, "client_blocked");
    // Still blocked a second before the end of the wait.
    tg.gw.clock().advance_ms(wait * 1000 - 1000);
    get_bearer_expect(&c, tg.url("/apps/a/b"), unknown(), 429).await;
    assert_eq!(tg.gw.store().lookup_count(), lookups, "blocked: no lookup");
    // Past it: judged again (looked up, 401), then blocked again by the next failure.
    tg.gw.clock().advance_ms(1000);
    get_bearer_expect(&c, tg.url("/apps/a/b"), unknown(), 401).await;
    let line = tg.last_request_line().await;
    assert_rejection_line(&line, 401, "unknown_token");
    assert_eq!(tg.gw.store().lookup_count(), lookups + 1);
    get_bearer_expect(&c, tg.url("/apps/a/b"), unknown(), 429).await;
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_bad_tokens_from_one_ip_are_cut_off_before_any_lookup() {
    let tg = TestGateway::failed_auth_limited(LIMIT).await;
    let (good, _) = tg.token("ci", "good", &["apps:read"]);
    // Half fail the checksum (no lookup even before the limit), half are well-formed tokens the
    // store has never seen (each costs a lookup until the client is blocked).
    let bad: Vec<String> = (0..TOTAL)
        .map(|i| {
            let t = tokengate::token::generate("tg").plaintext;
            if i % 2 == 0 { bad_checksum(&t) } else { t }
        })
        .collect();
    let attacker = client_from("127.0.0.1");
    let lookups_before = tg.gw.store().lookup_count();

    // The first LIMIT failures are answered 401, one at a time so the count is exact.
    for (i, t) in bad[..LIMIT].iter().enumerate() {
        let r = get_bearer(&attacker, tg.url("/apps/a/b"), t).await;
        assert_eq!(r.status(), 401, "failure {i}");
        assert!(header(&r, "www-authenticate").contains("error=\"invalid_token\""));
    }
    let lookups_at_limit = tg.gw.store().lookup_count();
    assert_eq!(
        lookups_at_limit - lookups_before,
        (LIMIT / 2) as u64,
        "only the unknown tokens were looked up"
    );

    // From now on: 429 before any lookup.
    let r = get_bearer_expect(&attacker, tg.url("/apps/a/b"), &bad[LIMIT], 429).await;
    let wait: u64 = header(&r, "retry-after").parse().unwrap();
    assert!(
        (1..=3).contains(&wait),
        "one cell every 60 s / {LIMIT}: {wait}"
    );
    assert!(r.headers().get("www-authenticate").is_none());
    assert!(
        r.headers().get("ratelimit-limit").is_none(),
        "no per-token headers without a token"
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "too_many_failures");
    assert!(body["request_id"].is_string());
    let line = tg.last_request_line().await;
    assert_rejection_line(&line, 429, "client_blocked");
    assert_eq!(line["client_ip"], "127.0.0.1");
    // A good token from the blocked address is served all the same (the limiter protects
    // lookups, not valid tokens): it is not cached yet, and the address has used only half of its
    // unknown-token lookups, so it is looked up once. A spoofed X-Forwarded-For from an untrusted
    // peer changes nothing: the line names 127.0.0.1.
    let r = get_with(
        &attacker,
        tg.url("/apps/a/b"),
        Some(&good),
        &[("x-forwarded-for", "127.0.0.2")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let line = tg.last_request_line().await;
    assert_eq!(line["reason"], "ok", "{line}");
    assert_eq!(line["api_token_name"], "good", "{line}");
    assert_eq!(line["client_ip"], "127.0.0.1");
    assert_eq!(tg.gw.store().lookup_count(), lookups_at_limit + 1);
    assert_eq!(tg.upstream.count(), 1);

    // The rest of the 10,000, eight at a time. The flood lasts seconds, and the quota gives one
    // failure back every 60 s / LIMIT: each time it does, one more bad token is judged (401), and
    // the client is blocked again. The unknown tokens among them are looked up only until the
    // address has used its unknown-token lookups (LIMIT a minute, half used above); after that
    // they are refused without a lookup.
    // Meanwhile, a good token from another address is served (from the cache now).
    let flood_start = Instant::now();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let flood = futures_util::stream::iter(bad[LIMIT + 1..].iter())
        .map(|t| {
            let (c, url) = (attacker.clone(), tg.url("/apps/a/b"));
            let answered = answered.clone();
            async move {
                let st = get_bearer(&c, url, t).await.status().as_u16();
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                st
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<u16>>();
    let neighbour = async {
        wait_until("the flood is under way", || {
            answered.load(std::sync::atomic::Ordering::Relaxed) >= 64
        })
        .await;
        let r = client_from("127.0.0.2")
            .get(tg.url("/apps/a/b"))
            .bearer_auth(&good)
            .send()
            .await
            .unwrap();
        (r.status(), r.headers().get("ratelimit-limit").cloned())
    };
    let (statuses, (neighbour_status, neighbour_limit)) = tokio::join!(flood, neighbour);
    let flood = flood_start.elapsed();
    assert_eq!(
        neighbour_status, 200,
        "a good token from 127.0.0.2 is served during the flood"
    );
    assert_eq!(neighbour_limit.unwrap(), "100");
    let refused = statuses.iter().filter(|s| **s == 429).count();
    let judged = statuses.iter().filter(|s| **s == 401).count();
    assert_eq!(refused + judged, statuses.len(), "only 429 or 401");
    let refills = refills(flood, LIMIT);
    // Up to 8 requests are in flight when a cell comes back; each may pass the blocked check
    // before the first of them records its failure.
    assert!(
        judged <= refills * 8,
        "{judged} judged in {flood:?} ({refills} refills)"
    );
    println!(
        "flood: {} requests in {flood:?}: {refused} answered 429, {judged} judged",
        statuses.len()
    );
    let lines = tg.request_lines().await;
    let count = |reason: &str| lines.iter().filter(|l| l["reason"] == reason).count();
    assert_eq!(lines.len(), TOTAL + 2);
    assert_eq!(
        count("bad_checksum") + count("unknown_token"),
        LIMIT + judged
    );
    assert_eq!(count("client_blocked"), refused + 1);
    assert_eq!(count("ok"), 2);
    // Store lookups for the attacker's unknown tokens stop at the quota: LIMIT, plus what the
    // refills gave back during the flood. The good token cost one (then it is cached; the
    // neighbour's request was a cache hit).
    let unknown_lookups = tg.gw.store().lookup_count() - lookups_before - 1;
    assert!(
        unknown_lookups >= LIMIT as u64 && unknown_lookups <= (LIMIT + refills * 8) as u64,
        "{unknown_lookups} unknown-token lookups ({refills} refills)"
    );
    let ok: Vec<_> = lines.iter().filter(|l| l["reason"] == "ok").collect();
    assert_eq!(ok[0]["client_ip"], "127.0.0.1");
    assert_eq!(ok[1]["client_ip"], "127.0.0.2");
    assert_eq!(
        tg.upstream.count(),
        2,
        "only the two good requests were forwarded"
    );
    tg.stop().await;
}

#[tokio::test]
async fn forwarded_for_keys_the_limiter_only_behind_a_trusted_proxy() {
    let tg = TestGateway::start_with(Options {
        server: r#"trusted_proxies = ["127.0.0.3/32"]"#.into(),
        sections: failed_auth_limit(3),
        ..Options::default()
    })
    .await;
    let (good, _) = tg.token("ci", "good", &["apps:read"]);
    let junk = bad_checksum(&good);
    // The status of a GET with `tok` on client `c`, claiming to be forwarded for `xff`.
    let status = |c: &reqwest::Client, tok: &str, xff: Option<&str>| {
        let mut b = c.get(tg.url("/apps/a/b")).bearer_auth(tok);
        if let Some(x) = xff {
            b = b.header("x-forwarded-for", x);
        }
        async move { b.send().await.unwrap().status() }
    };

    // Behind the trusted proxy 127.0.0.3, the client is the forwarded address.
    let proxy = client_from("127.0.0.3");
    for _ in 0..3 {
        assert_eq!(status(&proxy, &junk, Some("203.0.113.5")).await, 401);
    }
    assert_eq!(
        status(&proxy, &junk, Some("203.0.113.5")).await,
        429,
        "203.0.113.5 is blocked"
    );
    let line = tg.last_request_line().await;
    assert_rejection_line(&line, 429, "client_blocked");
    assert_eq!(line["client_ip"], "203.0.113.5");
    // Blocked for failures, not for valid tokens.
    assert_eq!(status(&proxy, &good, Some("203.0.113.5")).await, 200);
    // Other clients of the same proxy, and the proxy itself, are not.
    assert_eq!(status(&proxy, &good, Some("203.0.113.6")).await, 200);
    assert_eq!(status(&proxy, &good, None).await, 200);

    // An untrusted peer's X-Forwarded-For is ignored: the block follows the TCP peer, whatever
    // address it claims on each request.
    let direct = client_from("127.0.0.4");
    for i in 0..3 {
        let claim = format!("198.51.100.{i}");
        assert_eq!(status(&direct, &junk, Some(&claim)).await, 401);
    }
    assert_eq!(status(&direct, &junk, Some("198.51.100.99")).await, 429);
    let line = tg.last_request_line().await;
    assert_rejection_line(&line, 429, "client_blocked");
    assert_eq!(line["client_ip"], "127.0.0.4");
    assert_eq!(status(&direct, &good, None).await, 200);
    assert_eq!(tg.upstream.count(), 4);
    tg.stop().await;
}

#[tokio::test]
async fn a_valid_token_is_served_from_an_address_blocked_for_failures() {
    let tg = TestGateway::failed_auth_limited(LIMIT).await;
    let (good, id) = tg.token("ci", "good", &["apps:read"]);
    let client = client_from("127.0.0.5");
    let lookups_before = tg.gw.store().lookup_count();

    // 50 requests without a token: the first LIMIT are judged (401), the rest refused (429).
    let mut statuses = Vec::new();
    for _ in 0..50 {
        let r = client.get(tg.url("/apps/a/b")).send().await.unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            assert!(r.headers().get("www-authenticate").is_none());
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"], "too_many_failures");
        }
    }
    assert_eq!(&statuses[..LIMIT], &[401; LIMIT][..]);
    assert_eq!(&statuses[LIMIT..], &[429; 50 - LIMIT][..]);
    let line = tg.last_request_line().await;
    assert_rejection_line(&line, 429, "client_blocked");
    assert_eq!(line["auth_type"], "none", "{line}");
    assert_eq!(tg.upstream.count(), 0, "nothing refused was forwarded");
    assert_eq!(
        tg.gw.store().lookup_count(),
        lookups_before,
        "no credential, no lookup"
    );
    // Still blocked for failures: a malformed credential is refused without being judged.
    let r = send_bearer(client.get(tg.url("/apps/a/b")), bad_checksum(&good)).await;
    assert_eq!(r.status(), 429);
    assert_rejection_line(&tg.last_request_line().await, 429, "client_blocked");

    // A valid token from the same address: served, and its audit line names it. Not cached yet,
    // so it costs one lookup (the address has used none of its unknown-token lookups).
    let r = get_bearer_expect(&client, tg.url("/apps/a/b"), &good, 200).await;
    assert_eq!(header(&r, "ratelimit-limit"), "100");
    let line = tg.last_request_line().await;
    assert_eq!(line["status_code"], 200, "{line}");
    assert_eq!(line["reason"], "ok", "{line}");
    assert_eq!(line["rbac_decision"], "allow", "{line}");
    assert_eq!(line["api_token_id"], id.as_str(), "{line}");
    assert_eq!(line["api_token_name"], "good", "{line}");
    assert_eq!(
        line["token_prefix"],
        &good[..line["token_prefix"].as_str().unwrap().len()]
    );
    assert_eq!(line["client_ip"], "127.0.0.5");
    assert_eq!(tg.upstream.count(), 1);
    assert_eq!(tg.gw.store().lookup_count(), lookups_before + 1);
    // Again: a cache hit, no lookup, still served.
    get_bearer_expect(&client, tg.url("/apps/a/b"), &good, 200).await;
    assert_eq!(tg.gw.store().lookup_count(), lookups_before + 1);
    assert_eq!(tg.upstream.count(), 2);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tokens_from_one_address_stop_costing_lookups_at_the_limit() {
    let tg = TestGateway::failed_auth_limited(LIMIT).await;
    // Well-formed tokens with a valid checksum that the store has never seen.
    let unknown: Vec<String> = (0..TOTAL)
        .map(|_| tokengate::token::generate("tg").plaintext)
        .collect();
    let attacker = client_from("127.0.0.6");
    let lookups_before = tg.gw.store().lookup_count();
    let start = Instant::now();
    let statuses = futures_util::stream::iter(unknown.iter())
        .map(|t| {
            let (c, url) = (attacker.clone(), tg.url("/apps/a/b"));
            async move {
                let r = get_bearer(&c, url, t).await;
                let status = r.status().as_u16();
                let body: serde_json::Value = r.json().await.unwrap();
                (
                    status,
                    body["error"].as_str().unwrap_or_default().to_owned(),
                )
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<(u16, String)>>()
        .await;
    let elapsed = start.elapsed();
    let refills = refills(elapsed, LIMIT);
    let lookups = (tg.gw.store().lookup_count() - lookups_before) as usize;
    let judged = statuses.iter().filter(|(s, _)| *s == 401).count();
    let refused = statuses
        .iter()
        .filter(|(s, e)| *s == 429 && e == "too_many_failures")
        .count();
    println!(
        "{TOTAL} unknown tokens in {elapsed:?}: {lookups} lookups, {judged} judged, {refused} refused"
    );
    assert_eq!(judged + refused, TOTAL, "only 401 or 429");
    // The lookups stop at the limit: LIMIT, plus one per refill for each request in flight.
    assert!(lookups >= LIMIT, "{lookups}");
    assert!(
        lookups <= LIMIT + refills * 8,
        "{lookups} lookups in {elapsed:?} ({refills} refills)"
    );
    assert!(judged <= lookups);
    let lines = tg.request_lines().await;
    assert_eq!(lines.len(), TOTAL);
    let blocked: Vec<_> = lines
        .iter()
        .filter(|l| l["reason"] == "client_blocked")
        .collect();
    assert_eq!(blocked.len(), refused);
    for l in &blocked {
        assert_rejection_line(l, 429, "client_blocked");
        // The credential was read (no store involved): the line carries its prefix.
        assert_eq!(l["auth_type"], "api_token", "{l}");
        assert!(
            l["token_prefix"]
                .as_str()
                .is_some_and(|p| p.starts_with("tg_")),
            "{l}"
        );
        assert!(l["api_token_id"].is_null(), "{l}");
        assert_eq!(l["client_ip"], "127.0.0.6");
    }
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["reason"] == "unknown_token")
            .count(),
        judged
    );
    assert_eq!(tg.upstream.count(), 0, "nothing was forwarded");
    tg.stop().await;
}

/// Runs in a child process (see the next test) so that RSS is not shared with other tests.
#[test]
#[ignore = "run by failed_auth_limiter_memory_stays_under_its_cap_for_a_million_addresses"]
fn measure_failed_auth_limiter_memory() {
    if std::env::var_os("TOKENGATE_LIMITS_CHILD").is_none() {
        return;
    }
    const CAP: usize = tokengate::config::DEFAULT_FAILED_AUTH_MAX_CLIENTS;
    // Quota 1 a minute: every address is blocked by its first failure, so both maps (limiter
    // state and blocked list) fill up, the worst case for memory.
    let f = tokengate::ratelimit::FailedAuthLimiter::new(1, CAP);
    let before = memory_kib().0;
    let (mut max_tracked, mut max_blocked) = (0, 0);
    for i in 0..1_000_000u128 {
        // Each a different IPv6 /64: what a client with a /48 or larger can do.
        f.record_failure(IpAddr::V6(
            (0x2001_0db8_0000_0000u128 + i).wrapping_shl(64).into(),
        ));
        if i % 1000 == 0 {
            let (t, b) = f.tracked();
            max_tracked = max_tracked.max(t);
            max_blocked = max_blocked.max(b);
        }
    }
    let (t, b) = f.tracked();
    let (after, peak) = memory_kib();
    println!(
        "RESULT before_kib={before} after_kib={after} peak_kib={peak} max_tracked={} max_blocked={} overflows={} cap={CAP}",
        max_tracked.max(t),
        max_blocked.max(b),
        f.overflow_count()
    );
}

#[test]
fn failed_auth_limiter_memory_stays_under_its_cap_for_a_million_addresses() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "measure_failed_auth_limiter_memory",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TOKENGATE_LIMITS_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .expect("child printed its result");
    println!("{line}");
    let v = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .and_then(|n| n.parse().ok())
            .unwrap()
    };
    let cap = v("cap");
    assert!(v("max_tracked") <= cap && v("max_blocked") <= cap, "{line}");
    assert!(
        v("overflows") > 0,
        "the flood was larger than the cap: {line}"
    );
    // Both maps at the cap hold (17-byte IpAddr + 8-byte state, padded to 32) plus hash-table
    // overhead: ~100,000 x 2 x ~70 B = ~14 MiB in the worst case. 48 MiB leaves room for the
    // allocator keeping freed pages; without a cap 1,000,000 x 2 entries would need 60+ MiB.
    let grown = v("peak_kib").saturating_sub(v("before_kib"));
    assert!(grown < 48 * 1024, "peak RSS grew by {grown} KiB: {line}");
}

// ------------------------------------------------------------------ slow clients

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_at_the_header_read_timeout_while_a_normal_client_is_served()
 {
    const SLOW: usize = 500;
    const TIMEOUT: Duration = Duration::from_secs(3);
    // 500 client sockets and 500 accepted ones live in this one process.
    ensure_open_files(2 * SLOW as u64 + 200);
    let tg =
        TestGateway::with_server("header_read_timeout = \"3s\"\nmax_connections_per_ip = 1000")
            .await;
    let (tok, _) = tg.token("ci", "normal", &["apps:read"]);
    let addr = tg.addr;
    // Each connection sends one byte of a request head, then another every 2 s. hyper's
    // `header_read_timeout` (with `.timer(TokioTimer::new())` in server.rs) closes it 3 s after
    // the head started, however many bytes trickle in. If the timer is removed while the timeout
    // is still configured, hyper panics in every connection task (no client is served, the
    // normal request below fails); if both are removed, hyper only logs a warning and never times
    // out, so these connections stay open and the `closed` check fails.
    let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..SLOW)
        .map(|_| {
            let started = started.clone();
            tokio::spawn(async move {
                let head = b"GET /apps/a/b HTTP/1.1\r\nHost: tokengate\r\nX-Slow: 1\r\n\r\n";
                let mut s = TcpStream::connect(addr).await.unwrap();
                started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let start = Instant::now();
                let mut reply = Vec::new();
                let mut buf = [0u8; 1024];
                for byte in head.iter().take(head.len() - 1) {
                    if s.write_all(std::slice::from_ref(byte)).await.is_err() {
                        return (start.elapsed(), true, reply);
                    }
                    match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
                        Err(_) => {}
                        Ok(Ok(0)) | Ok(Err(_)) => return (start.elapsed(), true, reply),
                        Ok(Ok(n)) => {
                            reply.extend_from_slice(&buf[..n]);
                            let (rest, closed) =
                                read_until_closed(&mut s, Duration::from_secs(2)).await;
                            reply.extend(rest);
                            return (start.elapsed(), closed, reply);
                        }
                    }
                    if start.elapsed() > Duration::from_secs(15) {
                        break;
                    }
                }
                (start.elapsed(), false, reply)
            })
        })
        .collect();

    // Meanwhile (every slow connection is open) a normal client is served.
    wait_until("the slow connections are open", || {
        started.load(std::sync::atomic::Ordering::Relaxed) == SLOW
    })
    .await;
    let r = get_bearer_expect(&client(), tg.url("/apps/a/b"), &tok, 200).await;
    assert_eq!(r.text().await.unwrap(), "upstream ok 0");

    let mut late = Vec::new();
    let mut replies = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        let (after, closed, reply) = t.await.unwrap();
        assert!(closed, "a slow connection was still open after {after:?}");
        if after > TIMEOUT + Duration::from_secs(1) || after < TIMEOUT - Duration::from_millis(100)
        {
            late.push(after);
        }
        let status = parse_responses(&String::from_utf8_lossy(&reply))
            .first()
            .map_or("closed without a response".to_string(), |r| {
                r.status.to_string()
            });
        *replies.entry(status).or_default() += 1;
    }
    assert!(
        late.is_empty(),
        "{} of {SLOW} closed outside [3 s, 4 s]: {late:?}",
        late.len()
    );
    // hyper answers a header timeout itself (408) or just closes; never a forwarded request.
    assert!(
        replies
            .keys()
            .all(|k| k == "408" || k.starts_with("closed")),
        "{replies:?}"
    );
    assert_eq!(
        tg.upstream.count(),
        1,
        "only the normal request reached the upstream"
    );
    let lines = tg.request_lines().await;
    assert_eq!(
        lines.len(),
        1,
        "slow heads never reach the pipeline, so they have no audit line"
    );
    assert_eq!(lines[0]["reason"], "ok");
    tg.stop().await;
}

#[tokio::test]
async fn silent_connections_and_a_dribbled_http2_preface_are_closed_at_the_header_read_timeout() {
    let tg = TestGateway::with_server("header_read_timeout = \"1s\"").await;
    let addr = tg.addr;
    // hyper-util's protocol detection reads the first bytes without a timer of its own; the
    // gateway's ProtocolDeadline closes these at the header read timeout.
    let silent = (0..10).map(|_| {
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let start = Instant::now();
            let (got, closed) = read_until_closed(&mut s, Duration::from_secs(10)).await;
            (start.elapsed(), closed, got)
        })
    });
    let dribble = (0..10).map(|_| {
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let start = Instant::now();
            for b in b"PRI * HTTP/2.0\r\n\r\nSM\r\n" {
                if s.write_all(std::slice::from_ref(b)).await.is_err() {
                    break;
                }
                let (got, closed) = read_until_closed(&mut s, Duration::from_millis(300)).await;
                if closed {
                    return (start.elapsed(), true, got);
                }
            }
            let (got, closed) = read_until_closed(&mut s, Duration::from_secs(10)).await;
            (start.elapsed(), closed, got)
        })
    });
    let all: Vec<_> = silent.chain(dribble).collect();
    for t in all {
        let (after, closed, got) = t.await.unwrap();
        assert_closed_silently_at_1s("a client that sent no request", after, closed, &got);
    }
    assert_eq!(tg.upstream.count(), 0);
    assert!(tg.request_lines().await.is_empty());

    // An idle keep-alive connection waits for its next request head under the same timer.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: tokengate\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let idle_from = Instant::now();
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    let after = idle_from.elapsed();
    assert!(
        closed && after <= Duration::from_secs(2),
        "idle keep-alive closed after {after:?}"
    );
    tg.stop().await;
}

#[tokio::test]
async fn a_tls_client_that_never_finishes_its_handshake_is_dropped_at_the_handshake_timeout() {
    let certs = LocalhostCert::new();
    let tg = TestGateway::with_server(format!(
        "{}\ntls_handshake_timeout = \"1s\"\nheader_read_timeout = \"10s\"",
        certs.server_tls()
    ))
    .await;
    let (tok, _) = tg.token("ci", "tls", &["apps:read"]);
    let addr = tg.addr;
    // A TLS record header announcing a 512-byte ClientHello, then only part of it.
    let partial_hello: &[u8] = &[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x11, 0x22,
    ];
    let stalled: Vec<_> = [&[][..], partial_hello]
        .into_iter()
        .flat_map(|bytes| std::iter::repeat_n(bytes, 5))
        .map(|bytes| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let start = Instant::now();
                s.write_all(bytes).await.unwrap();
                let (got, closed) = read_until_closed(&mut s, Duration::from_secs(10)).await;
                (bytes.len(), start.elapsed(), closed, got)
            })
        })
        .collect();

    // A real TLS client is served meanwhile.
    let ca = certs.reqwest_root();
    let c = reqwest::Client::builder()
        .add_root_certificate(ca)
        .tls_built_in_root_certs(false)
        .resolve("localhost", addr)
        .no_proxy()
        .build()
        .unwrap();
    let r = get_bearer(
        &c,
        format!("https://localhost:{}/apps/a/b", addr.port()),
        &tok,
    )
    .await;
    assert_eq!(r.status(), 200);

    for t in stalled {
        let (sent, after, closed, got) = t.await.unwrap();
        // No TLS alert or HTTP reply is owed to a half-open handshake.
        let what = format!("a stalled handshake ({sent} bytes)");
        assert_closed_silently_at_1s(&what, after, closed, &got);
    }
    assert_eq!(tg.upstream.count(), 1);
    assert_eq!(tg.request_lines().await.len(), 1);
    tg.stop().await;
}

// ------------------------------------------------------------------ sizes

#[tokio::test]
async fn oversized_headers_uri_and_body_get_431_414_413_and_nothing_is_forwarded() {
    // hyper's head buffer is max(2048 + 1024 + 4096, 8192) = 8192 bytes.
    let tg = TestGateway::with_server(
        "max_header_bytes = 2048\nmax_uri_bytes = 1024\nmax_body_bytes = 1000",
    )
    .await;
    let (tok, _) = tg.token("ci", "sizes", &["apps:read"]);
    let auth = format!("Authorization: Bearer {tok}\r\n");
    let head = |target: &str, extra: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: tokengate\r\n{auth}{extra}\r\n")
    };
    let mut audited = 0;

    // Answered by the gateway (step 1, with an audit line).
    let cases = [
        (
            "headers over max_header_bytes",
            head("/apps/a/b", &format!("X-Big: {}\r\n", "a".repeat(3000))),
            431,
            "headers_too_large",
        ),
        (
            "URI over max_uri_bytes",
            head(&format!("/apps/a/{}", "u".repeat(1500)), ""),
            414,
            "uri_too_long",
        ),
        (
            "declared body over max_body_bytes",
            format!(
                "POST /echo/x HTTP/1.1\r\nHost: tokengate\r\n{auth}Content-Length: 2000\r\n\r\n"
            ),
            413,
            "body_too_large",
        ),
    ];
    for (name, req, status, reason) in cases {
        let r = raw(tg.addr, &req).await;
        assert_eq!(r.status, status, "{name}: {}", r.raw);
        assert_eq!(r.header("content-type"), Some("application/json"), "{name}");
        assert_eq!(r.header("connection"), Some("close"), "{name}");
        assert!(r.header("www-authenticate").is_none(), "{name}");
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["error"], reason, "{name}");
        audited += 1;
        let lines = tg.request_lines().await;
        assert_eq!(lines.len(), audited, "{name}");
        assert_rejection_line(lines.last().unwrap(), status, reason);
        assert_eq!(tg.upstream.count(), 0, "{name}");
    }

    // Answered by hyper before the pipeline: a head larger than hyper's read buffer, however it
    // is made up, and more than 100 header fields. Each still gets an audit line, written when
    // hyper's connection ends with its parse error: reason `bad_request_http`, the peer, no
    // token, no path (the head was never parsed).
    let hyper_cases = [
        (
            "headers over the head buffer",
            head("/apps/a/b", &format!("X-Big: {}\r\n", "a".repeat(20_000))),
        ),
        (
            "URI over the head buffer",
            head(&format!("/apps/a/{}", "u".repeat(20_000)), ""),
        ),
        (
            "101 header fields",
            head(
                "/apps/a/b",
                &(0..101)
                    .map(|i| format!("X-H{i}: v\r\n"))
                    .collect::<String>(),
            ),
        ),
    ];
    for (name, req) in hyper_cases {
        let r = raw(tg.addr, &req).await;
        assert_eq!(r.status, 431, "{name}: {}", r.raw);
        assert_eq!(tg.upstream.count(), 0, "{name}");
        audited += 1;
        // Written as the connection ends, a moment after the client saw the close.
        let mut lines = tg.request_lines().await;
        for _ in 0..100 {
            if lines.len() == audited {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            lines = tg.request_lines().await;
        }
        assert_eq!(
            lines.len(),
            audited,
            "{name}: hyper's refusal has its audit line"
        );
        let line = lines.last().unwrap();
        assert_rejection_line(line, 431, "bad_request_http");
        assert_eq!(line["client_ip"], "127.0.0.1", "{name}");
        assert_eq!(line["path"], "", "{name}");
        assert!(line["token_prefix"].is_null(), "{name}");
    }

    // A chunked body is counted while it streams: the gateway cuts it off at the limit, answers
    // 413, and the upstream sees at most max_body_bytes of a request that never completes.
    let mut req = format!(
        "POST /echo/x HTTP/1.1\r\nHost: tokengate\r\n{auth}Transfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..20 {
        req.extend_from_slice(format!("64\r\n{}\r\n", "b".repeat(100)).as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let r = raw_expect(tg.addr, &req, 413).await;
    assert_eq!(r.header("connection"), Some("close"));
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["error"], "body_too_large");
    assert_body_cut_off(&tg, 413, "body_too_large", 1000).await;
    tg.stop().await;
}

// ------------------------------------------------------------------ connections and streams

#[tokio::test]
async fn connections_over_the_per_ip_and_global_limits_are_closed() {
    let tg = TestGateway::with_server("max_connections_per_ip = 3\nmax_connections = 5").await;
    let addr = tg.addr;
    let req = b"GET /health HTTP/1.1\r\nHost: tokengate\r\n\r\n";
    // Holds three connections from 127.0.0.1; the accept loop takes them in order.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tcp_from("127.0.0.1", addr).await);
    }
    assert_request_unanswered("127.0.0.1", addr, req, "the 4th connection from one IP").await;
    let refused = |limit| tg.gw.metrics().connections_refused(limit);
    assert_eq!(refused(ConnLimit::PerIp), 1, "the refusal is counted");
    assert_eq!(refused(ConnLimit::Total), 0);

    // Another address still gets in, until the global limit of 5.
    let mut other = vec![
        tcp_from("127.0.0.2", addr).await,
        tcp_from("127.0.0.2", addr).await,
    ];
    assert_request_unanswered("127.0.0.5", addr, req, "the 6th connection overall").await;
    assert_eq!(refused(ConnLimit::Total), 1);
    assert_eq!(refused(ConnLimit::PerIp), 1);
    let text = tg.gw.metrics().render(&tg.gw.snapshot());
    assert!(
        text.contains("tokengate_connections_refused_total{limit=\"per_ip\"} 1")
            && text.contains("tokengate_connections_refused_total{limit=\"total\"} 1"),
        "{text}"
    );
    assert_eq!(tg.upstream.count(), 0);

    // Held connections still work, and a freed slot is given back.
    other[0].write_all(req).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = other[0].read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    drop(held.pop());
    eventually(
        "a slot freed by a closed connection is reused",
        WAIT_LIMIT,
        || async {
            let mut s = tcp_from("127.0.0.1", addr).await;
            let _ = s.write_all(req).await;
            let (got, _) = read_until_closed(&mut s, Duration::from_millis(500)).await;
            got.starts_with(b"HTTP/1.1 200").then_some(())
        },
    )
    .await;
    assert_eq!(
        tg.upstream.count(),
        2,
        "only the two served /health requests were forwarded"
    );
    drop(other);
    tg.stop().await;
}

// ------------------------------------------------------------------ server.workers

/// `server.workers = 2`: the kernel spreads new connections over two sockets, each served by
/// its own single-threaded runtime (its own thread), and each runtime keeps its own idle
/// upstream connections. Every request gets the whole pipeline: 200, forwarded once, audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_both_serve_connections_and_each_keeps_its_upstream_connections() {
    let tg = TestGateway::with_server("workers = 2").await;
    let (tok, id) = tg.token("ci", "reader", &["apps:read"]);
    // 40 connections, one request each: the kernel picks a socket by the connection's
    // addresses and ports, so both workers get some (all on one: probability 2^-39).
    for i in 0..40 {
        let req = format!(
            "GET /apps/{i} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\nConnection: close\r\n\r\n"
        );
        let rs = raw_all(tg.addr, req.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(rs.len(), 1, "{rs:?}");
        assert_eq!(rs[0].status, 200, "{}", rs[0].raw);
    }
    // The two runtimes' threads (named after their slots).
    let threads: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    for name in ["tg-worker-1", "tg-worker-2"] {
        assert!(threads.contains(&name.to_string()), "{threads:?}");
    }
    let got = tg.upstream.received();
    assert_eq!(got.len(), 40);
    assert!(
        got.iter()
            .all(|r| r.headers["x-tokengate-token-id"] == id.as_str())
    );
    // Each runtime returned its upstream connections to its own idle list (runtime slots 1 and
    // 2; slot 0, the shared runtime, serves only the admin listener here).
    let by_runtime = tg.gw.upstream_pool().idle_raw_by_runtime();
    assert_eq!(
        by_runtime.keys().copied().collect::<Vec<_>>(),
        vec![1, 2],
        "{by_runtime:?}"
    );
    let lines = tg.request_lines().await;
    assert_eq!(lines.len(), 40);
    assert!(
        lines
            .iter()
            .all(|l| l["api_token_id"] == id.as_str() && l["status_code"] == 200)
    );
    tg.stop().await;
}

/// The connection limits count across workers: three held connections from one address fill
/// `max_connections_per_ip = 3` whichever sockets they reached, and the fourth is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_ip_limit_is_shared_by_all_workers() {
    let tg = TestGateway::with_server("workers = 2\nmax_connections_per_ip = 3").await;
    let addr = tg.addr;
    let open = || {
        tg.gw
            .metrics()
            .open_connections
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut held = Vec::new();
    for n in 1..=3 {
        held.push(tcp_from("127.0.0.1", addr).await);
        eventually("the connection to be admitted", WAIT_LIMIT, || async {
            (open() == n).then_some(())
        })
        .await;
    }
    for _ in 0..4 {
        let mut extra = tcp_from("127.0.0.1", addr).await;
        let _ = extra
            .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            .await;
        let (got, closed) = read_until_closed(&mut extra, Duration::from_secs(5)).await;
        assert!(
            closed && got.is_empty(),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
    assert_eq!(tg.gw.metrics().connections_refused(ConnLimit::PerIp), 4);
    assert_eq!(open(), 3);
    for s in &mut held {
        assert!(health_ok(s).await);
    }
    assert_eq!(
        tg.upstream.count(),
        3,
        "only the held connections' requests"
    );
    tg.stop().await;
}

/// Checks that a new connection from `from` that sends `req` is closed unanswered.
async fn assert_request_unanswered(from: &str, addr: SocketAddr, req: &[u8], what: &str) {
    let mut s = tcp_from(from, addr).await;
    let _ = s.write_all(req).await;
    assert_closed_unanswered(&mut s, &format!("{what} is closed unanswered")).await;
}

/// A `/health` request on `s`; true when it was answered 200.
async fn health_ok(s: &mut TcpStream) -> bool {
    let req = b"GET /health HTTP/1.1\r\nHost: tokengate\r\n\r\n";
    if s.write_all(req).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 1024];
    matches!(s.read(&mut buf).await, Ok(n) if buf[..n].starts_with(b"HTTP/1.1 200"))
}

#[tokio::test]
async fn a_trusted_proxy_is_not_capped_per_address_but_the_global_cap_still_applies() {
    let tg = TestGateway::start_with(Options {
        server:
            "max_connections_per_ip = 2\nmax_connections = 8\ntrusted_proxies = [\"127.0.0.3/32\"]"
                .into(),
        ..Options::default()
    })
    .await;
    let addr = tg.addr;
    let refused = |limit| tg.gw.metrics().connections_refused(limit);
    // The load balancer's address holds five connections, over the per-address cap of 2, and
    // every one of them is served.
    let mut lb = Vec::new();
    for i in 0..5 {
        let mut s = tcp_from("127.0.0.3", addr).await;
        assert!(health_ok(&mut s).await, "trusted connection {i} is served");
        lb.push(s);
    }
    assert_eq!(refused(ConnLimit::PerIp), 0);
    // An untrusted address is still capped at 2.
    let mut other = vec![
        tcp_from("127.0.0.4", addr).await,
        tcp_from("127.0.0.4", addr).await,
    ];
    assert!(health_ok(&mut other[0]).await);
    let mut third = tcp_from("127.0.0.4", addr).await;
    assert_closed_unanswered(&mut third, "the untrusted 3rd connection is closed").await;
    assert_eq!(refused(ConnLimit::PerIp), 1);
    assert_eq!(refused(ConnLimit::Total), 0);
    // Seven open of the global 8: the proxy's next one fits, the one after that does not.
    let mut sixth = tcp_from("127.0.0.3", addr).await;
    assert!(
        health_ok(&mut sixth).await,
        "the proxy's 6th connection fits the global cap"
    );
    let mut seventh = tcp_from("127.0.0.3", addr).await;
    assert_closed_unanswered(&mut seventh, "the global cap applies to the proxy too").await;
    assert_eq!(refused(ConnLimit::Total), 1);
    assert_eq!(refused(ConnLimit::PerIp), 1);
    drop((lb, other, sixth));
    tg.stop().await;
}

/// Log lines written through `tracing` on this thread since [`capture_logs`] (`#[tokio::test]`
/// runs the gateway's tasks on it).
#[derive(Clone, Default)]
struct LogCapture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<LogCapture>> = const { std::cell::RefCell::new(None) };
}

/// Writes to this thread's capture, if any.
struct ThreadWriter;

impl std::io::Write for ThreadWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with(|c| {
            if let Some(c) = c.borrow().as_ref() {
                c.0.lock().unwrap().extend_from_slice(b);
            }
        });
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures this thread's log lines from here on. The subscriber is the process-wide default
/// (installed once): a thread-scoped one misses events whose call site another test's thread
/// reached first, because `tracing` caches a call site's interest process-wide.
fn capture_logs() -> LogCapture {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(|| ThreadWriter)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
    });
    let capture = LogCapture::default();
    CAPTURE.with(|c| *c.borrow_mut() = Some(capture.clone()));
    capture
}

impl LogCapture {
    fn lines(&self, containing: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(containing))
            .map(str::to_string)
            .collect()
    }
}

#[tokio::test]
async fn a_burst_of_refused_connections_logs_one_warning_then_one_with_the_count() {
    let capture = capture_logs();
    let tg = TestGateway::with_server("max_connections_per_ip = 2").await;
    let addr = tg.addr;
    let held = vec![
        tcp_from("127.0.0.6", addr).await,
        tcp_from("127.0.0.6", addr).await,
    ];
    let refuse_one = || async {
        let mut s = tcp_from("127.0.0.6", addr).await;
        let (got, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
        assert!(closed && got.is_empty(), "over the cap: closed unanswered");
    };
    for _ in 0..5 {
        refuse_one().await;
    }
    assert_eq!(tg.gw.metrics().connections_refused(ConnLimit::PerIp), 5);
    let warned = capture.lines("connection refused");
    assert_eq!(warned.len(), 1, "one line for the burst: {warned:#?}");
    let first = &warned[0];
    for part in [
        "WARN",
        "peer=127.0.0.6",
        "server.max_connections_per_ip",
        "server.trusted_proxies",
        "max=2",
        "suppressed=0",
    ] {
        assert!(first.contains(part), "{part} in {first}");
    }
    // The coalescing interval passes on the gateway clock: the next refusal is logged with
    // the count of the four left out.
    tg.gw.clock().advance_ms(10_000);
    refuse_one().await;
    let warned = capture.lines("connection refused");
    assert_eq!(warned.len(), 2, "{warned:#?}");
    assert!(warned[1].contains("suppressed=4"), "{}", warned[1]);
    assert_eq!(tg.gw.metrics().connections_refused(ConnLimit::PerIp), 6);
    drop(held);
    tg.stop().await;
}

/// Minimal HPACK for a GET: indexed `:method GET` and `:scheme http`, the rest literal without
/// indexing (RFC 7541 §6.2.2); every value here is shorter than 127 bytes.
fn h2_get_headers(authority: &str, path: &str, bearer: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86];
    let lit = |b: &mut Vec<u8>, index_prefix: &[u8], value: &str| {
        b.extend_from_slice(index_prefix);
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
    };
    lit(&mut b, &[0x04], path); // :path (static index 4)
    lit(&mut b, &[0x01], authority); // :authority (1)
    lit(&mut b, &[0x0f, 0x08], &format!("Bearer {bearer}")); // authorization (23 = 15 + 8)
    b
}

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

async fn h2_read_frame(s: &mut TcpStream) -> (u8, u8, u32, Vec<u8>) {
    let mut h = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut h))
        .await
        .expect("a frame")
        .unwrap();
    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    (
        h[3],
        h[4],
        u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        payload,
    )
}

#[tokio::test]
async fn http2_max_concurrent_streams_is_advertised_and_enforced() {
    const MAX: u32 = 3;
    let tg = TestGateway::start_with(Options {
        server: format!("h2_max_concurrent_streams = {MAX}\nshutdown_grace = \"1s\""),
        ..Options::default()
    })
    .await;
    let (tok, _) = tg.token("ci", "h2", &["apps:read"]);
    let mut s = TcpStream::connect(tg.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&h2_frame(0x4, 0, 0, &[])).await.unwrap();
    // The server's SETTINGS advertise the limit.
    let advertised = loop {
        let (kind, flags, _, payload) = h2_read_frame(&mut s).await;
        if kind == 0x4 && flags & 0x1 == 0 {
            break payload
                .chunks(6)
                .find(|c| u16::from_be_bytes([c[0], c[1]]) == 0x3)
                .map(|c| u32::from_be_bytes([c[2], c[3], c[4], c[5]]));
        }
    };
    assert_eq!(advertised, Some(MAX), "SETTINGS_MAX_CONCURRENT_STREAMS");
    s.write_all(&h2_frame(0x4, 0x1, 0, &[])).await.unwrap();

    // A client that ignores it: MAX streams to a never-answering upstream path, then one more.
    let authority = tg.addr.to_string();
    for i in 0..=MAX {
        let block = h2_get_headers(&authority, &format!("/slow/{i}"), &tok);
        // END_STREAM | END_HEADERS
        s.write_all(&h2_frame(0x1, 0x5, 2 * i + 1, &block))
            .await
            .unwrap();
    }
    let extra = 2 * MAX + 1;
    let reset = loop {
        let (kind, _, stream, payload) = h2_read_frame(&mut s).await;
        if kind == 0x3 {
            break (
                stream,
                u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]),
            );
        }
        assert_ne!(
            kind, 0x1,
            "no stream is answered: the upstream never replies to /slow"
        );
    };
    assert_eq!(
        reset,
        (extra, 0x7),
        "the extra stream is refused with REFUSED_STREAM"
    );
    // The allowed streams reached the upstream; the refused one never does (a stream refused
    // with REFUSED_STREAM never reaches the service, so nothing can follow the reset).
    wait_until("the allowed streams reach the upstream", || {
        tg.upstream.count() >= MAX as usize
    })
    .await;
    let targets: Vec<String> = tg.upstream.targets();
    assert_eq!(targets.len(), MAX as usize, "{targets:?}");
    assert!(!targets.contains(&format!("/slow/{MAX}")), "{targets:?}");
    drop(s);
    tg.stop().await;
}

// ------------------------------------------------------------------ body idle, request deadline

#[tokio::test]
async fn a_stalled_request_body_is_cut_off_at_the_body_idle_timeout() {
    let tg = TestGateway::with_server("body_idle_timeout = \"1s\"").await;
    let (tok, _) = tg.token("ci", "idle", &["apps:read"]);
    let mut s = TcpStream::connect(tg.addr).await.unwrap();
    let start = Instant::now();
    s.write_all(
        format!("POST /echo/x HTTP/1.1\r\nHost: tokengate\r\nAuthorization: Bearer {tok}\r\nContent-Length: 100\r\n\r\n0123456789")
            .as_bytes(),
    )
    .await
    .unwrap();
    let (got, _) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    let after = start.elapsed();
    let r = parse_responses(&String::from_utf8_lossy(&got))
        .into_iter()
        .next()
        .expect("a response");
    assert_eq!(
        r.status, 408,
        "the client stalled: a client error, not a gateway timeout: {}",
        r.raw
    );
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["error"], "request_timeout");
    assert!(after >= Duration::from_millis(900), "{after:?}");
    // The upstream got only what the client sent.
    assert_body_cut_off(&tg, 408, "body_idle", 10).await;
    tg.stop().await;
}

#[tokio::test]
async fn the_total_request_deadline_answers_504() {
    let tg = TestGateway::with_server("request_timeout = \"1s\"\nshutdown_grace = \"1s\"").await;
    let (tok, _) = tg.token("ci", "deadline", &["apps:read"]);
    let r = get_bearer_expect(&client(), tg.url("/slow/x"), &tok, 504).await;
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "gateway_timeout");
    tg.assert_last_line(504, "request_timeout").await;
    tg.stop().await;
}
