//! Write-ahead audit (issue 16): a forwarded request's decision line is written before the
//! upstream sees a byte, its completion line (status, bytes, duration, outcome) after the
//! response body ends; a crash leaves decisions that `audit verify` names. Also: a response cut
//! by the upstream is audited as such, a full audit disk does not flood the operational log, and
//! the CLI changes nothing it cannot audit.
//!
//! Real processes (the `tokengate` binary, `kill -9`), real files, a real tmpfs for a full disk,
//! the recording upstream to show what was forwarded.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use support::{
    MOUNT_NEEDED, Options, Served, TestGateway, Tmpfs, Upstream, assert_exit_code, cli, client,
    fill, get_bearer, get_bearer_expect, read_audit_file, rules_with_delay, write_config,
};
use tokengate::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PATIENCE: Duration = Duration::from_secs(30);

/// Issues a token (never expiring) straight into a store file.
fn issue(db: &Path) -> String {
    support::issue_into_with(db, "acme", "ci", &["apps:read"], |s| s.expires_at = None).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_20_requests_in_flight_leaves_20_decisions_that_verify_names() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let o = Options {
        rules: rules_with_delay(),
        ..Options::default()
    };
    let config = write_config(dir.path(), &upstream.addr.to_string(), &o);
    let token = issue(&dir.path().join("tokengate.db"));
    let mut gw = Served::start(&config).await;

    // 20 requests the upstream holds for 30 s.
    let c = client();
    let mut calls = Vec::new();
    for _ in 0..20 {
        let req = c.get(gw.url("/delay/30000")).bearer_auth(&token).send();
        calls.push(tokio::spawn(req));
    }
    let t0 = Instant::now();
    while upstream.count() < 20 {
        assert!(
            t0.elapsed() < PATIENCE,
            "the upstream got {}",
            upstream.count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.kill9();
    for call in calls {
        assert!(call.await.unwrap().is_err(), "no answer after kill -9");
    }

    // The upstream's ids are exactly the decisions in the log: nothing forwarded unaudited.
    let forwarded: HashSet<String> = upstream
        .received()
        .iter()
        .map(|r| r.headers["x-request-id"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(forwarded.len(), 20);
    let log = dir.path().join("audit.log");
    let lines = read_audit_file(&log);
    let decisions: HashSet<String> = lines
        .iter()
        .filter(|l| l["kind"] == "request" && l["phase"] == "decision")
        .map(|l| l["request_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(decisions, forwarded);
    for l in &lines {
        assert_ne!(l["kind"], "completion", "nothing completed: {l}");
        assert!(l.get("status_code").is_none(), "no status yet: {l}");
        assert_eq!(l["rbac_decision"], "allow", "{l}");
        assert_eq!(l["path"], "/delay/30000", "{l}");
        assert_eq!(l["upstream"], "api", "{l}");
    }

    // verify: the chain is intact, 20 requests have no completion (exit 3), each named.
    let o = cli(&config, &["audit", "verify"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(3), "{out}");
    assert!(
        out.starts_with(&format!("INCOMPLETE: {} lines, chain intact;", lines.len())),
        "{out}"
    );
    assert!(
        out.contains("20 forwarded request(s) have no completion line"),
        "{out}"
    );
    for id in &forwarded {
        assert!(out.contains(id.as_str()), "{id} not named: {out}");
    }
    // The reader shows them as one row each, marked.
    let o = cli(&config, &["audit", "--json"]);
    assert_eq!(o.status.code(), Some(0));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 20);
    assert!(rows.iter().all(|r| r["outcome"] == "no_completion"));

    // A restarted gateway continues the chain; new requests complete.
    let gw = Served::start(&config).await;
    let r = get_bearer_expect(&c, gw.url("/apps/billing/status"), &token, 200).await;
    r.bytes().await.unwrap();
    let t0 = Instant::now();
    while !read_audit_file(&log)
        .iter()
        .any(|l| l["kind"] == "completion")
    {
        assert!(t0.elapsed() < PATIENCE, "no completion line");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = tokengate::audit::verify(std::slice::from_ref(&log)).unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.unfinished.len(), 20, "{report}");
}

/// The audit line (as the reader shows it) of the request `rid`.
async fn line_of(tg: &TestGateway, rid: &str) -> serde_json::Value {
    tg.audit_lines()
        .await
        .into_iter()
        .find(|l| l["request_id"] == rid)
        .unwrap_or_else(|| panic!("no audit line for {rid}"))
}

/// An upstream that promises `Content-Length: 100000`, sends 1000 bytes and closes.
async fn cutting_upstream() -> SocketAddr {
    support::tcp_server(|mut s| async move {
        let mut buf = vec![0u8; 8192];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = s
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\ncontent-type: text/plain\r\n\r\n",
            )
            .await;
        let _ = s.write_all(&[b'x'; 1000]).await;
        let _ = s.flush().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Dropped: the connection closes mid-body.
    })
    .await
}

#[tokio::test]
async fn a_response_cut_by_the_upstream_is_audited_with_its_outcome_and_bytes() {
    let cut = cutting_upstream().await;
    let tg = TestGateway::start_with(Options {
        extra_routes: format!(
            "\n[[routes]]\nname = \"cut\"\nprefix = \"/cut/\"\nupstream = \"http://{cut}\"\n\n[[routes.rules]]\nmethods = [\"GET\"]\npath = \"/cut/**\"\npermission = \"apps:read\"\n"
        ),
        ..Options::default()
    })
    .await;
    let (tok, _) = tg.token("acme", "ci", &["apps:read"]);
    let r = get_bearer_expect(&client(), tg.url("/cut/file"), &tok, 200).await;
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(r.bytes().await.is_err(), "the body was cut");

    let raw = tg.raw_audit_lines().await;
    let decision = raw
        .iter()
        .find(|l| l["request_id"] == rid.as_str() && l["kind"] == "request")
        .unwrap();
    assert_eq!(decision["phase"], "decision");
    let line = line_of(&tg, &rid).await;
    assert_eq!(line["status_code"], 200, "{line}");
    assert_eq!(line["outcome"], "upstream_reset", "{line}");
    assert_eq!(line["reason"], "upstream_reset", "{line}");
    assert_eq!(line["bytes"], 1000, "{line}");

    // A complete one says so, with its byte count.
    let r = get_bearer(&client(), tg.url("/download/200000"), &tok).await;
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(r.bytes().await.unwrap().len(), 200_000);
    let line = line_of(&tg, &rid).await;
    assert_eq!(line["outcome"], "complete", "{line}");
    assert_eq!(line["reason"], "ok", "{line}");
    assert_eq!(line["bytes"], 200_000, "{line}");
    tg.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_body_is_audited_as_client_closed() {
    let tg = TestGateway::start().await;
    let (tok, _) = tg.token("acme", "ci", &["apps:read"]);
    let mut s = tokio::net::TcpStream::connect(tg.addr).await.unwrap();
    s.write_all(
        format!(
            "GET /download/50000000 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {tok}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let rid = head
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap()
        .trim()
        .to_string();
    drop(s);
    let line = line_of(&tg, &rid).await;
    assert_eq!(line["outcome"], "client_closed", "{line}");
    assert_eq!(line["reason"], "client_closed", "{line}");
    assert!(line["bytes"].as_u64().unwrap() < 50_000_000, "{line}");
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_audit_disk_for_20_s_under_load_logs_fewer_than_10_error_lines() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("audit");
    let _fs = Tmpfs::mount(&mnt, 256 * 1024).expect(MOUNT_NEEDED);
    let upstream = Upstream::start().await;
    let o = Options {
        audit_path: Some(mnt.join("audit.log").to_str().unwrap().to_string()),
        ..Options::default()
    };
    let config = write_config(dir.path(), &upstream.addr.to_string(), &o);
    let token = issue(&dir.path().join("tokengate.db"));
    let gw = Served::start(&config).await;
    let c = client();
    let r = get_bearer_expect(&c, gw.url("/apps/billing/status"), &token, 200).await;
    r.bytes().await.unwrap();

    let filler = fill(&mnt);
    let forwarded = upstream.count();
    let until = Instant::now() + Duration::from_secs(20);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (c, url, token) = (c.clone(), gw.url("/apps/billing/status"), token.clone());
        tasks.push(tokio::spawn(async move {
            let mut refused = 0u64;
            while Instant::now() < until {
                let r = get_bearer(&c, &url, &token).await;
                if r.status() == 503 {
                    refused += 1;
                }
                let _ = r.bytes().await;
            }
            refused
        }));
    }
    let mut refused = 0;
    for t in tasks {
        refused += t.await.unwrap();
    }
    assert!(refused > 100, "steady load: {refused} refusals");
    // (Requests whose decision still fit in the log file's last page were forwarded; that
    // they were logged is checked below.)
    assert!(upstream.count() >= forwarded);

    let errors: Vec<String> = gw
        .stderr
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .cloned()
        .collect();
    assert!(
        errors.len() < 10,
        "{} error lines for {refused} refusals:\n{}",
        errors.len(),
        errors.join("\n")
    );
    // What was left out is counted on the next line of the same kind.
    let suppressed: u64 = errors
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|j| {
            let f = if j["fields"].is_object() {
                j["fields"].clone()
            } else {
                j
            };
            f["suppressed"].as_u64()
        })
        .sum();
    assert!(suppressed > 100, "suppressed {suppressed}: {errors:?}");

    // Room again: served again without a restart.
    std::fs::remove_file(filler).unwrap();
    let t0 = Instant::now();
    loop {
        let r = get_bearer(&c, gw.url("/apps/billing/status"), &token).await;
        if r.status() == 200 {
            break;
        }
        assert!(t0.elapsed() < PATIENCE, "no recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing was forwarded without its decision line.
    let log = mnt.join("audit.log");
    let t0 = Instant::now();
    loop {
        let decided: HashSet<String> = read_audit_file(&log)
            .iter()
            .filter(|l| l["phase"] == "decision")
            .map(|l| l["request_id"].as_str().unwrap().to_string())
            .collect();
        let missing: Vec<String> = upstream
            .received()
            .iter()
            .map(|r| r.headers["x-request-id"].to_str().unwrap().to_string())
            .filter(|id| !decided.contains(id))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < PATIENCE,
            "forwarded without a decision line: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn cli_token_create_with_a_full_audit_disk_and_no_gateway_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("audit");
    let _fs = Tmpfs::mount(&mnt, 64 * 1024).expect(MOUNT_NEEDED);
    let o = Options {
        audit_path: Some(mnt.join("audit.log").to_str().unwrap().to_string()),
        ..Options::default()
    };
    let config = write_config(dir.path(), "127.0.0.1:9", &o);
    let db = dir.path().join("tokengate.db");
    issue(&db);
    let cli = |args: &[&str]| support::cli(&config, args);
    // Writable: works.
    let ok = cli(&[
        "token",
        "create",
        "--account",
        "acme",
        "--name",
        "one",
        "--permission",
        "apps:read",
    ]);
    assert_exit_code(&ok, 0);

    let tokens = |db: &Path| {
        Store::open(db, Duration::from_secs(5))
            .unwrap()
            .list_tokens(Some("acme"), true, tokengate::store::system_now_ms())
            .unwrap()
            .len()
    };
    let before = tokens(&db);
    let lines_before = read_audit_file(&mnt.join("audit.log")).len();
    let _filler = fill(&mnt);
    let o = cli(&[
        "token",
        "create",
        "--account",
        "acme",
        "--name",
        "two",
        "--permission",
        "apps:read",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(err.contains("audit log"), "{err}");
    assert!(!out.contains("tg_"), "no secret printed: {out}");
    assert_eq!(tokens(&db), before, "no token created");
    assert_eq!(read_audit_file(&mnt.join("audit.log")).len(), lines_before);
    // Same for a revoke and an account change.
    let o = cli(&["account", "create", "globex"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing was changed"));
}
