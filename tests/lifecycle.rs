//! Token lifecycle (issue: expiry, cap, instant revocation, rotation, leaks): expiry while cached,
//! the per-account cap, revocation races, two processes on one store, rotation, batched last-use
//! writes, crash safety of token creation.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::*;
use tokengate::store::Store;

/// `token create --account ci --name NAME --role viewer` followed by `extra`.
fn viewer_args<'a>(name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "token",
        "create",
        "--account",
        "ci",
        "--name",
        name,
        "--role",
        "viewer",
    ];
    args.extend_from_slice(extra);
    args
}

/// Runs `token create` for a viewer token of account `ci` (see [`viewer_args`]).
fn create_viewer(cfg: &std::path::Path, name: &str, extra: &[&str]) -> std::process::Output {
    cli(cfg, &viewer_args(name, extra))
}

#[tokio::test]
async fn a_token_that_expires_while_cached_is_refused_at_once_and_warns_before() {
    let tg = TestGateway::start().await;
    let now = tg.gw.now_ms();
    let (tok, _) = tg.token_with("ci", "short", &["apps:read"], |s| {
        s.expires_at = Some(now + 3 * 86_400_000)
    });
    let (far, _) = tg.token_with("ci", "far", &["apps:read"], |s| {
        s.expires_at = Some(now + 60 * 86_400_000)
    });
    let c = client();
    let r = get_bearer_expect(&c, tg.url("/apps/a/b"), &tok, 200).await;
    let warn = r.headers()["token-expires-at"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(warn, tokengate::clock::rfc3339(now + 3 * 86_400_000));
    let r = get_bearer(&c, tg.url("/apps/a/b"), &far).await;
    assert!(
        r.headers().get("token-expires-at").is_none(),
        "no warning 60 days ahead"
    );
    assert_eq!(tg.gw.cache().len(), 2, "both cached");
    tg.gw.clock().advance_ms(3 * 86_400_000 + 1);
    let r = get_bearer_expect(&c, tg.url("/apps/a/b"), &tok, 401).await;
    assert!(challenge(&r).contains("expired"));
    assert_eq!(tg.last_request_line().await["reason"], "expired");
    get_bearer_expect(&c, tg.url("/apps/a/b"), &far, 200).await;
    assert_eq!(tg.upstream.count(), 3);
    tg.stop().await;
}

#[tokio::test]
async fn the_sixth_token_is_refused_with_the_limit_and_revoking_one_lets_it_through() {
    let tg = TestGateway::start_with(Options::unserved()).await;
    let cfg = tg.config_path.clone();
    assert!(cli(&cfg, &["account", "create", "ci"]).status.success());
    let mut ids = Vec::new();
    for i in 0..5 {
        let o = create_viewer(&cfg, &format!("t{i}"), &["--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v["token"].as_str().unwrap().starts_with("tg_"));
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let o = create_viewer(&cfg, "t5", &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty(), "no token printed");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("5 active tokens") && err.contains("max_active_per_account"),
        "{err}"
    );
    assert!(
        err.contains("t0") && err.contains(&ids[0]),
        "lists the active tokens: {err}"
    );
    assert!(
        err.contains("tokengate token revoke"),
        "says how to revoke: {err}"
    );
    assert!(
        cli(&cfg, &["token", "revoke", &ids[2], "--reason", "make room"])
            .status
            .success()
    );
    let o = create_viewer(&cfg, "t5", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The gateway owns the audit log: CLI events reach it through the store's outbox.
    tg.gw.drain_outbox().await.unwrap();
    let lines = tg.audit_lines().await;
    let events: Vec<&str> = lines.iter().filter_map(|l| l["event"].as_str()).collect();
    assert_eq!(events.iter().filter(|e| **e == "token.created").count(), 6);
    assert!(events.contains(&"account.created") && events.contains(&"token.revoked"));
    let revoked = lines
        .iter()
        .find(|l| l["event"] == "token.revoked")
        .unwrap();
    assert!(revoked["actor"].as_str().unwrap().starts_with("cli:"));
    assert_eq!(revoked["reason"], "make room");
    tg.stop().await;
}

#[tokio::test]
async fn expiry_policy_is_enforced_at_creation() {
    let tg = TestGateway::start_with(Options::unserved_sections(
        "[tokens]\nmax_lifetime_days = 90\n",
    ))
    .await;
    let cfg = tg.config_path.clone();
    assert!(cli(&cfg, &["account", "create", "ci"]).status.success());
    for bad in ["never", "180d", "365d", "12d"] {
        let o = create_viewer(&cfg, "x", &["--expires", bad]);
        assert_eq!(o.status.code(), Some(64), "{bad}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("not allowed")
                || String::from_utf8_lossy(&o.stderr).contains("expiry")
        );
    }
    let o = create_viewer(&cfg, "x", &["--expires", "7d", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let exp = tokengate::clock::parse_rfc3339(v["expires_at"].as_str().unwrap()).unwrap();
    let created = tokengate::clock::parse_rfc3339(v["created_at"].as_str().unwrap()).unwrap();
    assert_eq!(exp - created, 7 * 86_400_000);
    tg.stop().await;
}

/// Clients hammer a token while it is revoked; a slow store read straddles the revoke. After
/// `revoke` returns, no request may succeed. 1,000 repetitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_succeeds_after_revoke_returns_even_with_a_slow_store_read() {
    let tg = TestGateway::failed_auth_limited(1_000_000).await;
    let slow = Arc::new(AtomicBool::new(false));
    let s2 = slow.clone();
    tg.gw.store().set_lookup_hook(Some(Arc::new(move || {
        if s2.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(2));
        }
    })));
    let late_successes = Arc::new(AtomicU64::new(0));
    let c = client();
    for round in 0..1000 {
        let (tok, id) = tg.token(
            &format!("acc{}", round % 7),
            &format!("t{round}"),
            &["apps:read"],
        );
        slow.store(round % 2 == 0, Ordering::Relaxed);
        let revoked = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for _ in 0..3 {
            let (c, tok, revoked, late, url) = (
                c.clone(),
                tok.clone(),
                revoked.clone(),
                late_successes.clone(),
                tg.url("/apps/a/b"),
            );
            clients.push(tokio::spawn(async move {
                for _ in 0..4 {
                    // Read the flag *before* sending: a request sent after revoke returned must fail.
                    let after = revoked.load(Ordering::SeqCst);
                    let st = get_bearer(&c, &url, &tok).await.status();
                    if after && st == 200 {
                        late.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        tokio::task::yield_now().await;
        tg.gw.revoke(&id, "test", "race").await.unwrap();
        revoked.store(true, Ordering::SeqCst);
        for cl in clients {
            cl.await.unwrap();
        }
        let st = get_bearer(&c, tg.url("/apps/a/b"), &tok).await.status();
        assert_eq!(st, 401, "round {round}");
    }
    assert_eq!(late_successes.load(Ordering::Relaxed), 0);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_processes_on_one_store_see_a_revoke_within_a_second() {
    // Every trial ends with one 401 from the same client IP: lift the failed-auth limit.
    let tg =
        TestGateway::start_with(Options::unserved_sections(failed_auth_limit(1_000_000))).await;
    // Same store, each process its own audit log (one writer per log file).
    let serve_copy = |name: &str| {
        let copy = tg.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &copy,
            std::fs::read_to_string(&tg.config_path).unwrap().replace(
                "path = \"audit.log\"",
                &format!("path = \"audit-{name}.log\""),
            ),
        )
        .unwrap();
        serve_binary(&copy)
    };
    let a = serve_copy("b");
    let b = serve_copy("c");
    let store = Store::open(&tg.dir.path().join("tokengate.db"), Duration::from_secs(5)).unwrap();
    store.create_account("ci", None, "test", 0).unwrap();
    let c = client();
    let mut latencies = Vec::new();
    for i in 0..100 {
        let spec = token_spec("ci", &format!("t{i}"), &["apps:read"], None);
        let (row, new) = store
            .create_token(&spec, "tg", 1000, tokengate::store::system_now_ms())
            .unwrap();
        for p in [&a, &b] {
            get_bearer_expect(
                &c,
                format!("http://{}/apps/x/y", p.addr),
                &new.plaintext,
                200,
            )
            .await;
        }
        // Trials would otherwise lock onto the poller's phase: start each at a random offset.
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 250)).await;
        // Revoke "through one of them": another process on the same store.
        store
            .revoke(&row.id, "test", "trial", tokengate::store::system_now_ms())
            .unwrap();
        let t0 = Instant::now();
        loop {
            // The promise is about requests sent a second after the revoke: one sent before
            // and answered later (a loaded machine) may still be a 200.
            let sent = t0.elapsed();
            let r = get_bearer(&c, format!("http://{}/apps/x/y", b.addr), &new.plaintext).await;
            if r.status() == 401 {
                break;
            }
            assert_eq!(r.status(), 200);
            assert!(
                sent < Duration::from_secs(1),
                "trial {i}: a request sent {sent:?} after the revoke was accepted"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        latencies.push(t0.elapsed());
        store.flush_last_used(&[]).unwrap();
    }
    latencies.sort();
    let p50 = latencies[49];
    let p99 = latencies[98];
    println!(
        "cross-process revocation: p50 {p50:?}, p99 {p99:?}, max {:?}",
        latencies[99]
    );
    drop((a, b));
    tg.stop().await;
}

#[tokio::test]
async fn disabling_an_account_rejects_all_its_tokens_in_a_running_gateway() {
    let tg = TestGateway::start().await;
    let (t1, _) = tg.token("team", "a", &["apps:read"]);
    let (t2, _) = tg.token("team", "b", &["apps:read"]);
    let (other, _) = tg.token("other", "c", &["apps:read"]);
    let c = client();
    for t in [&t1, &t2, &other] {
        get_bearer_expect(&c, tg.url("/apps/a/b"), t, 200).await;
    }
    let o = cli(&tg.config_path, &["account", "disable", "team"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t0 = Instant::now();
    for t in [&t1, &t2] {
        loop {
            let st = get_bearer(&c, tg.url("/apps/a/b"), t).await.status();
            if st == 401 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(1));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(tg.last_request_line().await["reason"], "account_disabled");
    get_bearer_expect(&c, tg.url("/apps/a/b"), &other, 200).await;
    tg.stop().await;
}

#[tokio::test]
async fn rotation_old_token_works_until_the_new_one_is_used_or_the_grace_ends() {
    let tg = TestGateway::start().await;
    let c = client();
    let get = |t: String| {
        let (c, url) = (c.clone(), tg.url("/apps/a/b"));
        async move { get_bearer(&c, url, t).await.status().as_u16() }
    };
    // Case 1: the new token's first use retires the old one.
    let (old, old_id) = tg.token("ci", "rot", &["apps:read"]);
    assert_eq!(get(old.clone()).await, 200);
    let out = cli(
        &tg.config_path,
        &["token", "rotate", &old_id, "--grace", "1h", "--json"],
    );
    assert_success(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let new = v["token"].as_str().unwrap().to_string();
    assert_eq!(v["rotated_from"], old_id.as_str());
    tg.gw.poll_changes().await.unwrap(); // the CLI's rotation reaches the cache now
    assert_eq!(
        get(old.clone()).await,
        200,
        "old works before the new one is used"
    );
    assert_eq!(get(new.clone()).await, 200);
    assert_eq!(
        get(old.clone()).await,
        401,
        "old refused right after the new one's first use"
    );
    assert_eq!(get(new.clone()).await, 200);
    let row = tg.gw.store().get_token(&old_id).unwrap();
    assert_eq!(row.revoke_reason.as_deref(), Some("rotated"));

    // Case 2: unused, the old one ends with the grace period (gateway clock moved forward).
    let (old2, old2_id) = tg.token("ci", "rot2", &["apps:read"]);
    assert_eq!(get(old2.clone()).await, 200);
    let (new2_row, new2) = tg
        .gw
        .store()
        .rotate(&old2_id, "test", 3_600_000, "tg", tg.gw.now_ms())
        .unwrap();
    tg.gw.poll_changes().await.unwrap();
    assert_eq!(get(old2.clone()).await, 200, "within the grace");
    tg.gw.clock().advance_ms(3_600_001);
    assert_eq!(get(old2.clone()).await, 401, "after the grace");
    assert_eq!(new2_row.rotated_from.as_deref(), Some(old2_id.as_str()));
    assert_eq!(get(new2.plaintext.clone()).await, 200);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_cause_only_a_handful_of_store_writes() {
    // The periodic flush would fire every 10 s of real time, so a slow run would see more
    // writes: keep it out of the way and drive the flush explicitly below.
    let tg = TestGateway::with_sections("[tokens]\nlast_used_flush_interval = \"24h\"\n").await;
    let (tok, id) = tg.rated_token("ci", "busy", 1e6, 1_000_000);
    let writes_before = tg.gw.store().write_count();
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, tok, url) = (c.clone(), tok.clone(), tg.url("/apps/a/b"));
        tasks.push(tokio::spawn(async move {
            for _ in 0..1250 {
                get_bearer_expect(&c, &url, &tok, 200).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tg.gw.flush_last_used().await;
    let writes = tg.gw.store().write_count() - writes_before;
    println!("store writes for 10,000 requests: {writes}");
    assert!(writes <= 3, "{writes} writes");
    let row = tg.gw.store().get_token(&id).unwrap();
    assert!(row.last_used_at.is_some());
    assert_eq!(row.last_used_ip.as_deref(), Some("127.0.0.1"));
    let o = cli(&tg.config_path, &["token", "show", &id, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["last_used_at"].is_string());
    tg.stop().await;
}

#[tokio::test]
async fn list_filters_and_identify_of_a_leaked_token() {
    let tg = TestGateway::start_with(Options::unserved()).await;
    let now = tg.gw.now_ms();
    let day = 86_400_000;
    let (_, fresh) = tg.token_with("ci", "fresh", &["apps:read"], |s| {
        s.expires_at = Some(now + 3 * day)
    });
    let (leaked, leaked_id) = tg.token_with("ci", "leaky", &["apps:read"], |s| {
        s.expires_at = Some(now + 30 * day)
    });
    let (_, gone) = tg.token("ci", "gone", &["apps:read"]);
    tg.gw.store().revoke(&gone, "t", "x", now).unwrap();
    tg.gw
        .store()
        .flush_last_used(&[tokengate::store::LastUsed {
            token_id: fresh.clone(),
            at: now - 100 * day,
            ip: "10.0.0.1".into(),
        }])
        .unwrap();
    let list = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["token", "list", "--json"];
        a.extend_from_slice(args);
        let o = cli(&tg.config_path, &a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
        v.iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect()
    };
    let mut all = list(&["--all"]);
    all.sort();
    assert_eq!(all, vec!["fresh", "gone", "leaky"]);
    let mut active = list(&[]);
    active.sort();
    assert_eq!(active, vec!["fresh", "leaky"]);
    assert_eq!(list(&["--expiring", "7d"]), vec!["fresh"]);
    assert_eq!(list(&["--stale", "90d"]), vec!["fresh"]);
    assert_eq!(list(&["--account", "ci"]).len(), 2);
    let o = cli(&tg.config_path, &["token", "list", "--account", "nobody"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no account named `nobody`"));
    let table = cli(&tg.config_path, &["token", "list"]);
    let t = String::from_utf8_lossy(&table.stdout);
    assert!(t.contains("LAST USED") && t.contains("leaky") && t.contains("EXPIRES"));

    // identify reads stdin, never argv, and revokes on request.
    let identify = |args: &[&str], stdin: &str| {
        let mut child = Command::new(bin())
            .arg("--config")
            .arg(&tg.config_path)
            .args(["token", "identify"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let o = identify(&["--revoke", "--json"], &format!("  {leaked}\n"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["id"], leaked_id.as_str());
    assert_eq!(v["status"], "revoked");
    assert_eq!(v["revoke_reason"], "leaked");
    tg.gw.drain_outbox().await.unwrap();
    let events: Vec<serde_json::Value> = tg
        .audit_lines()
        .await
        .into_iter()
        .filter(|l| l["kind"] == "admin")
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "token.identified" && e["api_token_id"] == leaked_id.as_str())
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "token.revoked" && e["reason"] == "leaked")
    );
    // A token-looking string that is not ours fails clearly.
    let o = identify(&[], &tokengate::token::generate("tg").plaintext);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not in this store"));
    tg.stop().await;
}

#[test]
fn kill_9_during_token_creation_never_leaves_a_half_created_token() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tokengate.toml");
    std::fs::write(&cfg, "[tokens]\nmax_active_per_account = 100000\n").unwrap();
    // No command but `store init` creates the store (issue 16).
    assert!(cli(&cfg, &["store", "init"]).status.success());
    assert!(cli(&cfg, &["account", "create", "ci"]).status.success());
    let mut rng_state = 12345u64;
    for i in 0..60 {
        let mut child = Command::new(bin())
            .arg("--config")
            .arg(&cfg)
            .args(viewer_args(&format!("k{i}"), &[]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        rng_state = rng_state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = (rng_state >> 33) % 40;
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
    }
    let store = Store::open(&dir.path().join("tokengate.db"), Duration::from_secs(5)).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    let rows = store.list_tokens(None, true, 0).unwrap();
    for r in &rows {
        // Every row that exists is complete (list_tokens parses every column).
        assert_eq!(
            r.permissions,
            vec!["apps:read".to_string(), "logs:read".to_string()]
        );
        assert!(r.prefix.starts_with("tg_") && r.name.starts_with('k'));
    }
    println!("{} of 60 killed creations committed", rows.len());
}
