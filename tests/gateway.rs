//! End-to-end gateway behaviour (issue: the gateway, end to end): forwarding, TLS, HTTP/2,
//! every authentication rejection, revocation through the CLI, no plaintext at rest, streaming.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

#[tokio::test]
async fn valid_token_is_forwarded_with_identity_and_without_authorization() {
    let tg = TestGateway::start().await;
    let (tok, id) = tg.token("ci", "deploy-bot", &["apps:read"]);
    let resp = get_with(
        &client(),
        tg.url("/apps/billing/status?verbose=1&x=%2F"),
        Some(&tok),
        &[
            ("x-tokengate-token-id", "spoofed"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
            ("x-original-url", "/admin/secrets"),
            ("x-http-method-override", "DELETE"),
            ("connection", "X-Tokengate-Token-Id, X-Forwarded-For"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-upstream"], "yes");
    assert_eq!(resp.headers()["content-type"], "text/plain");
    assert!(
        resp.headers().get("x-upstream-private").is_none(),
        "Connection-named response header stripped"
    );
    assert_eq!(resp.headers()["ratelimit-limit"], "100");
    assert!(resp.headers().get("x-request-id").is_some());
    assert_eq!(resp.text().await.unwrap(), "upstream ok 0");
    let got = tg.upstream.received();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(
        r.target, "/apps/billing/status?verbose=1&x=%2F",
        "canonical path plus untouched query"
    );
    assert!(r.headers.get("authorization").is_none());
    assert_eq!(r.headers["x-tokengate-token-id"], id.as_str());
    assert_eq!(r.headers["x-tokengate-token-name"], "deploy-bot");
    assert_eq!(r.headers["x-tokengate-account"], "ci");
    assert_eq!(r.headers["x-tokengate-permissions"], "apps:read");
    assert_eq!(r.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(r.headers["x-real-ip"], "127.0.0.1");
    assert_eq!(r.headers["x-forwarded-proto"], "http");
    assert!(r.headers.get("x-original-url").is_none());
    assert!(r.headers.get("x-http-method-override").is_none());
    assert_eq!(r.headers.get_all("x-tokengate-token-id").iter().count(), 1);
    let line = tg.last_request_line().await;
    assert_eq!(line["reason"], "ok");
    assert_eq!(line["rbac_decision"], "allow");
    assert_eq!(line["api_token_id"], id.as_str());
    assert_eq!(line["path"], "/apps/billing/status");
    assert_eq!(line["permission"], "apps:read");
    assert_eq!(line["upstream"], "api");
    assert!(
        !line.to_string().contains("verbose"),
        "no query in the audit log"
    );
    tg.stop().await;
}

#[tokio::test]
async fn every_authentication_rejection_has_its_status_challenge_body_and_audit_line() {
    let tg = TestGateway::start().await;
    let (good, _) = tg.token("ci", "good", &["apps:read"]);
    let (revoked, rid) = tg.token("ci", "old", &["apps:read"]);
    tg.gw.revoke(&rid, "test", "test").await.unwrap();
    let (expired, _) = tg.token_with("ci", "expired", &["apps:read"], |s| s.expires_at = Some(1));
    let unknown = {
        let t = tokengate::token::generate("tg");
        t.plaintext
    };
    let mut bad_sum = good.clone().into_bytes();
    let last = bad_sum.len() - 1;
    bad_sum[last] = if bad_sum[last] == b'A' { b'B' } else { b'A' };
    let bad_sum = String::from_utf8(bad_sum).unwrap();

    struct Case {
        name: &'static str,
        auth: Vec<String>,
        query: &'static str,
        status: u16,
        challenge: Option<&'static str>,
        reason: &'static str,
    }
    let cases = vec![
        Case {
            name: "no header",
            auth: vec![],
            query: "",
            status: 401,
            challenge: Some("Bearer realm=\"tokengate\""),
            reason: "missing_token",
        },
        Case {
            name: "basic",
            auth: vec!["Basic dXNlcjpwYXNz".into()],
            query: "",
            status: 401,
            challenge: Some("Bearer realm=\"tokengate\""),
            reason: "unsupported_scheme",
        },
        Case {
            name: "two headers",
            auth: vec![format!("Bearer {good}"), format!("Bearer {good}")],
            query: "",
            status: 400,
            challenge: Some("error=\"invalid_request\""),
            reason: "duplicate_authorization",
        },
        Case {
            name: "malformed",
            auth: vec!["Bearer a b".into()],
            query: "",
            status: 400,
            challenge: Some("error=\"invalid_request\""),
            reason: "malformed",
        },
        Case {
            name: "empty bearer",
            auth: vec!["Bearer".into()],
            query: "",
            status: 400,
            challenge: Some("error=\"invalid_request\""),
            reason: "malformed",
        },
        Case {
            name: "token in query",
            auth: vec![format!("Bearer {good}")],
            query: "?access_token=x",
            status: 400,
            challenge: Some("error=\"invalid_request\""),
            reason: "token_in_query",
        },
        Case {
            name: "query only",
            auth: vec![],
            query: "?token=abc",
            status: 400,
            challenge: Some("error=\"invalid_request\""),
            reason: "token_in_query",
        },
        Case {
            name: "not our format",
            auth: vec!["Bearer abcdef".into()],
            query: "",
            status: 401,
            challenge: Some("error=\"invalid_token\""),
            reason: "bad_format",
        },
        Case {
            name: "bad checksum",
            auth: vec![format!("Bearer {bad_sum}")],
            query: "",
            status: 401,
            challenge: Some("error=\"invalid_token\""),
            reason: "bad_checksum",
        },
        Case {
            name: "unknown",
            auth: vec![format!("Bearer {unknown}")],
            query: "",
            status: 401,
            challenge: Some("error=\"invalid_token\""),
            reason: "unknown_token",
        },
        Case {
            name: "revoked",
            auth: vec![format!("Bearer {revoked}")],
            query: "",
            status: 401,
            challenge: Some("revoked"),
            reason: "revoked",
        },
        Case {
            name: "expired",
            auth: vec![format!("Bearer {expired}")],
            query: "",
            status: 401,
            challenge: Some("expired"),
            reason: "expired",
        },
    ];
    let lookups_before = tg.gw.store().lookup_count();
    for c in &cases {
        let mut req = format!(
            "GET /apps/billing/status{} HTTP/1.1\r\nHost: gw.test\r\n",
            c.query
        );
        for a in &c.auth {
            req.push_str(&format!("Authorization: {a}\r\n"));
        }
        req.push_str("Connection: close\r\n\r\n");
        let resp = raw(tg.addr, &req).await;
        assert_eq!(resp.status, c.status, "{}: {}", c.name, resp.raw);
        let www = resp.header("www-authenticate").unwrap_or("");
        if let Some(ch) = c.challenge {
            assert!(www.contains(ch), "{}: {www}", c.name);
            assert!(
                www.starts_with("Bearer realm=\"tokengate\""),
                "{}: {www}",
                c.name
            );
        }
        if c.reason == "unknown_token" {
            assert!(
                !www.contains("unknown"),
                "generic description for unknown tokens: {www}"
            );
        }
        let body: serde_json::Value = serde_json::from_str(&resp.body)
            .unwrap_or_else(|_| panic!("{}: {}", c.name, resp.body));
        assert!(
            body["error"].is_string()
                && body["message"].is_string()
                && body["request_id"].is_string()
        );
        assert!(!resp.raw.contains(&good), "{}: token echoed", c.name);
        let line = tg.last_request_line().await;
        assert_rejection_line(&line, c.status, c.reason);
        assert_eq!(line["request_id"], body["request_id"]);
        assert!(!line.to_string().contains(&good));
    }
    // Format and checksum failures never reached the store; known tokens did (once each, then cached).
    assert!(tg.gw.store().lookup_count() - lookups_before <= 3);
    assert_eq!(tg.upstream.count(), 0, "nothing was forwarded");
    tg.stop().await;
}

#[tokio::test]
async fn revoke_through_the_cli_reaches_the_running_gateway_within_a_second() {
    let (tg, tok, id) = TestGateway::with_reader().await;
    let c = client();
    get_bearer_expect(&c, tg.url("/apps/a/x"), &tok, 200).await;
    let out = cli(&tg.config_path, &["token", "revoke", &id]);
    assert_success(&out);
    let revoked_at = Instant::now();
    loop {
        let r = get_bearer(&c, tg.url("/apps/a/x"), &tok).await;
        if r.status() == 401 {
            let www = challenge(&r).to_string();
            assert!(www.contains("revoked"), "{www}");
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "still accepted after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tg.stop().await;
}

#[tokio::test]
async fn revoke_in_process_is_instant() {
    let (tg, tok, id) = TestGateway::with_reader().await;
    let c = client();
    get_bearer_expect(&c, tg.url("/apps/a/x"), &tok, 200).await;
    tg.gw.revoke(&id, "test", "test").await.unwrap();
    get_bearer_expect(&c, tg.url("/apps/a/x"), &tok, 401).await;
    tg.stop().await;
}

#[tokio::test]
async fn upstream_down_is_502_and_silent_upstream_is_504() {
    let dead = dead_addr();
    let tg = TestGateway::start_with(Options {
        upstream_override: Some(dead.to_string()),
        ..Options::default()
    })
    .await;
    let (tok, _) = tg.token("ci", "bot", &["apps:read"]);
    get_bearer_expect(&client(), tg.url("/apps/a/x"), &tok, 502).await;
    let line = tg.last_request_line().await;
    assert_eq!(line["reason"], "upstream_error");
    assert_eq!(line["upstream"], "api");
    tg.stop().await;

    let tg = TestGateway::start_with(Options {
        route: "timeout = \"300ms\"".into(),
        ..Options::default()
    })
    .await;
    let (tok, _) = tg.token("ci", "bot", &["apps:read"]);
    let start = Instant::now();
    get_bearer_expect(&client(), tg.url("/slow/x"), &tok, 504).await;
    assert!(start.elapsed() < Duration::from_secs(5));
    let line = tg.last_request_line().await;
    assert_eq!(line["reason"], "upstream_timeout");
    tg.stop().await;
}

#[tokio::test]
async fn public_rule_needs_no_token_and_whoami_describes_the_caller() {
    let tg = TestGateway::start().await;
    let c = client();
    assert_eq!(c.get(tg.url("/health")).send().await.unwrap().status(), 200);
    let (tok, id) = tg.token_with("ci", "who", &["apps:read"], |s| {
        s.scopes.insert("app".into(), vec!["billing".into()]);
    });
    let r = get_bearer_expect(&c, tg.url("/_tokengate/v1/whoami"), &tok, 200).await;
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["name"], "who");
    assert_eq!(v["account"], "ci");
    assert_eq!(v["permissions"][0], "apps:read");
    assert_eq!(v["scopes"]["app"][0], "billing");
    assert!(v["prefix"].as_str().unwrap().starts_with("tg_"));
    assert!(v["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        c.get(tg.url("/_tokengate/v1/whoami"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(tg.upstream.count(), 1, "only /health reached the upstream");
    tg.stop().await;
}

#[tokio::test]
async fn http2_prior_knowledge_works() {
    let (tg, tok, _) = TestGateway::with_reader().await;
    let c = h2_client();
    let r = get_bearer(&c, tg.url("/apps/x/y"), &tok).await;
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "upstream ok 0");
    let got = tg.upstream.received();
    assert_eq!(got[0].target, "/apps/x/y");
    assert!(got[0].headers.get("authorization").is_none());
    let r = c.get(tg.url("/apps/x/y")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    tg.stop().await;
}

#[tokio::test]
async fn tls_with_a_certificate_made_in_the_test_serves_h1_and_h2() {
    tls_serves_h1_and_h2(0).await;
}

/// The same over `server.workers = 2`: the TLS handshake, ALPN and HTTP/2 (its streams spawned
/// on the worker's runtime) work on a worker runtime as on the shared one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_worker_runtimes_serves_h1_and_h2() {
    tls_serves_h1_and_h2(2).await;
}

async fn tls_serves_h1_and_h2(workers: usize) {
    let certs = LocalhostCert::new();
    let tg = TestGateway::with_server(format!("{}\nworkers = {workers}", certs.server_tls())).await;
    let (tok, _) = tg.token("ci", "tls", &["apps:read"]);
    let ca = certs.reqwest_root();
    let url = format!("https://localhost:{}/apps/a/b", tg.addr.port());
    for h2 in [false, true] {
        let mut b = reqwest::Client::builder()
            .add_root_certificate(ca.clone())
            .tls_built_in_root_certs(false)
            .resolve("localhost", tg.addr)
            .no_proxy();
        if !h2 {
            b = b.http1_only();
        }
        let c = b.build().unwrap();
        let r = get_bearer_expect(&c, &url, &tok, 200).await;
        assert_eq!(
            r.version(),
            if h2 {
                reqwest::Version::HTTP_2
            } else {
                reqwest::Version::HTTP_11
            }
        );
        assert_eq!(r.text().await.unwrap(), "upstream ok 0");
        assert_eq!(c.get(&url).send().await.unwrap().status(), 401);
    }
    let got = tg.upstream.received();
    assert_eq!(got.len(), 2);
    assert!(
        got.iter()
            .all(|r| r.headers["x-forwarded-proto"] == "https")
    );
    tg.stop().await;
}

#[tokio::test]
async fn no_plaintext_token_in_db_wal_audit_or_output() {
    let tg = TestGateway::start().await;
    let run = |args: &[&str]| cli(&tg.config_path, args);
    assert!(run(&["account", "create", "ci"]).status.success());
    let out = run(&[
        "token",
        "create",
        "--account",
        "ci",
        "--name",
        "cli-made",
        "--role",
        "viewer",
        "--expires",
        "30d",
    ]);
    assert_success(&out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = stdout.lines().next().unwrap().to_string();
    assert!(tokengate::token::parse(&token).is_ok());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains(&token),
        "stderr has only the reminder"
    );
    // Use it, list it, show it, fail with it.
    let c = client();
    get_bearer_expect(&c, tg.url("/apps/a/b"), &token, 200).await;
    let _ = send_bearer(c.post(tg.url("/apps/a/deploy")), &token).await;
    let _ = c
        .get(tg.url(&format!("/apps/a/b?access_token={token}")))
        .send()
        .await
        .unwrap();
    let mut outputs = String::new();
    for args in [
        vec!["token", "list", "--all"],
        vec!["token", "list", "--json"],
        vec!["account", "list"],
    ] {
        let o = run(&args);
        outputs.push_str(&String::from_utf8_lossy(&o.stdout));
        outputs.push_str(&String::from_utf8_lossy(&o.stderr));
    }
    let o = std::process::Command::new(bin())
        .arg("--config")
        .arg(&tg.config_path)
        .args(["token", "identify"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut ch| {
            use std::io::Write;
            ch.stdin
                .take()
                .unwrap()
                .write_all(format!("{token}\n").as_bytes())
                .unwrap();
            ch.wait_with_output()
        })
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    outputs.push_str(&String::from_utf8_lossy(&o.stdout));
    outputs.push_str(&String::from_utf8_lossy(&o.stderr));
    assert!(outputs.contains("cli-made"));
    assert!(
        !outputs.contains(&token),
        "a command printed the token again"
    );
    tg.gw.flush_last_used().await;
    tg.gw.audit().flush_async().await.unwrap();
    for entry in std::fs::read_dir(tg.dir.path()).unwrap() {
        let p = entry.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        let needle = token.as_bytes();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "plaintext token found in {}",
            p.display()
        );
        // The secret part alone must not be there either.
        let secret = &needle[3..];
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret),
            "secret part found in {}",
            p.display()
        );
    }
    tg.stop().await;
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_upload_and_download_stream_without_buffering() {
    const SIZE: u64 = 200 * 1024 * 1024;
    let tg = TestGateway::start_with(Options {
        server: format!("max_body_bytes = {}", SIZE * 2),
        ..Options::default()
    })
    .await;
    let (tok, _) = tg.token("ci", "big", &["apps:read"]);
    let c = client();
    // Warm up connections and allocator.
    get_bearer_expect(&c, tg.url("/apps/a/b"), &tok, 200).await;
    let before = rss_kib();
    let chunk = bytes::Bytes::from(vec![7u8; 256 * 1024]);
    let n = (SIZE / chunk.len() as u64) as usize;
    let stream =
        futures_util::stream::iter((0..n).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let r = send_bearer(
        c.post(tg.url("/echo/upload"))
            .body(reqwest::Body::wrap_stream(stream)),
        &tok,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), format!("upstream ok {SIZE}"));
    let mut r = get_bearer(&c, tg.url(&format!("/download/{SIZE}")), &tok).await;
    assert_eq!(r.status(), 200);
    let mut got = 0u64;
    while let Some(ch) = r.chunk().await.unwrap() {
        got += ch.len() as u64;
    }
    assert_eq!(got, SIZE);
    let grown = rss_kib().saturating_sub(before);
    // The test process holds client, gateway and upstream: all three together stay under 64 MiB.
    assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
    tg.stop().await;
}

#[tokio::test]
async fn oversized_body_is_413_counted_while_streaming() {
    let tg = TestGateway::with_server("max_body_bytes = 1000").await;
    let (tok, _) = tg.token("ci", "b", &["apps:read"]);
    let c = client();
    let r = send_bearer(c.post(tg.url("/echo/x")).body(vec![0u8; 2000]), &tok).await;
    assert_eq!(r.status(), 413, "declared length");
    assert_eq!(tg.upstream.count(), 0);
    let chunks = futures_util::stream::iter(
        (0..20).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![1u8; 100]))),
    );
    let r = send_bearer(
        c.post(tg.url("/echo/x"))
            .body(reqwest::Body::wrap_stream(chunks)),
        &tok,
    )
    .await;
    assert_eq!(r.status(), 413, "chunked body over the limit");
    let line = tg.last_request_line().await;
    assert_eq!(line["reason"], "body_too_large");
    tg.stop().await;
}

#[test]
fn config_check_passes_on_the_example_and_names_a_misspelled_key() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tokengate.toml");
    let out = cli(Path::new(example), &["config", "check"]);
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(example)
        .unwrap()
        .replacen("realm =", "relam =", 1);
    std::fs::write(&bad, text).unwrap();
    let out = cli(&bad, &["config", "check"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("relam"), "{err}");
    // Unknown command or flag: usage error 64.
    let out = std::process::Command::new(bin())
        .args(["token", "frobnicate"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = std::process::Command::new(bin())
        .args(["token", "create", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Example"));
}

#[tokio::test]
async fn a_client_that_disconnects_before_the_answer_still_gets_its_audit_line() {
    let (tg, tok, id) = TestGateway::with_reader().await;
    let req =
        format!("GET /slow/x HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\n\r\n");
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(tg.addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        // Wait until the upstream has the request, then hang up.
        wait_until("the upstream has the request", || tg.upstream.count() == 1).await;
    }
    let line = tg.last_request_line().await;
    assert_eq!(line["reason"], "client_closed", "{line}");
    assert_eq!(line["status_code"], 499);
    assert_eq!(line["api_token_id"], id.as_str());
    assert_eq!(line["upstream"], "api");
    assert_eq!(tg.request_lines().await.len(), 1, "exactly one line");
    tg.stop().await;
}

/// `GET /apps/billing/status` with the bearer `tok` (when given) and `X-Request-Id: id`.
async fn with_request_id(tg: &TestGateway, tok: Option<&str>, id: &str) -> reqwest::Response {
    get_with(
        &client(),
        tg.url("/apps/billing/status"),
        tok,
        &[("x-request-id", id)],
    )
    .await
}

#[tokio::test]
async fn request_id_from_a_trusted_proxy_is_kept_and_audited() {
    let tg = TestGateway::with_server(r#"trusted_proxies = ["127.0.0.1/32"]"#).await;
    let (tok, _) = tg.token("ci", "reader", &["apps:read"]);
    let resp = with_request_id(&tg, Some(&tok), "lb-7f3a9c").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "lb-7f3a9c");
    let got = tg.upstream.received();
    assert_eq!(got[0].headers["x-request-id"], "lb-7f3a9c");
    assert_eq!(got[0].headers.get_all("x-request-id").iter().count(), 1);
    assert_eq!(tg.last_request_line().await["request_id"], "lb-7f3a9c");
    // A refusal carries it too.
    let resp = with_request_id(&tg, None, "lb-refused").await;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["x-request-id"], "lb-refused");
    assert_eq!(tg.last_request_line().await["request_id"], "lb-refused");
    // Not sane (too long): the gateway's own id.
    let long = "a".repeat(129);
    let resp = with_request_id(&tg, Some(&tok), &long).await;
    let own = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(own, long);
    assert_eq!(
        tg.upstream.received()[1].headers["x-request-id"],
        own.as_str()
    );
    assert_eq!(tg.last_request_line().await["request_id"], own.as_str());
    tg.stop().await;
}

#[tokio::test]
async fn request_id_from_an_untrusted_peer_is_replaced() {
    let (tg, tok, _) = TestGateway::with_reader().await;
    let resp = with_request_id(&tg, Some(&tok), "forged-id").await;
    assert_eq!(resp.status(), 200);
    let own = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(own, "forged-id");
    let got = tg.upstream.received();
    assert_eq!(got[0].headers["x-request-id"], own.as_str());
    assert_eq!(tg.last_request_line().await["request_id"], own.as_str());
    tg.stop().await;
}

#[tokio::test]
async fn a_valid_traceparent_is_forwarded_and_audited_an_invalid_one_dropped() {
    let (tg, tok, _) = TestGateway::with_reader().await;
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let send = |tp: Option<&'static str>| {
        let mut r = client()
            .get(tg.url("/apps/billing/status"))
            .bearer_auth(&tok)
            .header("tracestate", "vendor=abc");
        if let Some(tp) = tp {
            r = r.header("traceparent", tp);
        }
        r.send()
    };
    assert_eq!(send(Some(valid)).await.unwrap().status(), 200);
    let got = tg.upstream.received();
    assert_eq!(got[0].headers["traceparent"], valid);
    assert_eq!(got[0].headers["tracestate"], "vendor=abc");
    assert_eq!(
        tg.last_request_line().await["trace_id"],
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    let invalid = [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "garbage",
    ];
    for (i, tp) in invalid.into_iter().enumerate() {
        assert_eq!(send(Some(tp)).await.unwrap().status(), 200, "{tp}");
        let r = &tg.upstream.received()[i + 1];
        assert!(r.headers.get("traceparent").is_none(), "{tp} dropped");
        assert!(
            r.headers.get("tracestate").is_none(),
            "{tp}: tracestate dropped with it"
        );
        assert!(tg.last_request_line().await["trace_id"].is_null(), "{tp}");
    }
    // None sent: none made up.
    assert_eq!(send(None).await.unwrap().status(), 200);
    let last = tg.upstream.received().pop().unwrap();
    assert!(last.headers.get("traceparent").is_none());
    assert!(last.headers.get("tracestate").is_none());
    // A refusal records it too.
    let r = get_with(
        &client(),
        tg.url("/apps/billing/status"),
        None,
        &[("traceparent", valid)],
    )
    .await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        tg.last_request_line().await["trace_id"],
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    tg.stop().await;
}
