//! Scale-out (issue 10), against real engines: several gateway replicas on one PostgreSQL with
//! revocations pushed to all of them (measured), a replica cut off from its notifications, exact
//! global limits in Redis (and the fallback without it), and `store copy` between engines.
//!
//! PostgreSQL and Redis come from `tests/support/services.sh` (see `support/services.rs`).

#[path = "support/services.rs"]
mod services;
mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::{
    Upstream, assert_success, challenge, client, dead_addr, failed_auth_limit, get_bearer,
};
use tokengate::store::{LastUsed, NewTokenSpec, PgOptions, RateOverride, Store};

/// One in-process gateway with its own config and audit log.
struct Replica {
    dir: tempfile::TempDir,
    run: support::Running,
}

impl std::ops::Deref for Replica {
    type Target = support::Running;

    fn deref(&self) -> &support::Running {
        &self.run
    }
}

impl Replica {
    /// Starts a replica whose `[store]` section is `store` (plus `extra` top-level TOML).
    async fn start(store: &str, extra: &str, upstream: &Upstream) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let o = support::Options {
            store: Some(store.into()),
            sections: extra.into(),
            rules: "[[routes.rules]]\nmethods = [\"GET\"]\npath = \"/apps/{app}/**\"\npermission = \"apps:read\"\n"
                .into(),
            ..support::Options::default()
        };
        let config = support::write_config(dir.path(), &upstream.addr.to_string(), &o);
        let run = support::Running::start(&config).await;
        Replica { dir, run }
    }

    /// A replica on PostgreSQL `url`; the change poll is slow on purpose (30 s), so anything
    /// faster is the push.
    async fn postgres(url: &str, extra: &str, upstream: &Upstream) -> Replica {
        let store = format!("url = \"{url}\"\nchange_poll_interval = \"30s\"");
        let extra = format!("{}{extra}", failed_auth_limit(1_000_000));
        Self::start(&store, &extra, upstream).await
    }

    async fn get(&self, token: &str) -> reqwest::Response {
        get_bearer(&client(), self.url("/apps/billing/x"), token).await
    }

    /// Asks with `token` until it is refused, for at most 10 s; the refusal must be an
    /// `invalid_token` 401 ([`assert_invalid_token`]).
    async fn wait_refused(&self, token: &str, what: &str) {
        let t0 = Instant::now();
        loop {
            let resp = self.get(token).await;
            if resp.status() == 401 {
                assert_invalid_token(resp, what).await;
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{what}: not propagated after 10 s"
            );
        }
    }

    /// Request rows (a forwarded request's decision and completion merged), once every
    /// forwarded request has its completion (bounded wait).
    async fn audit(&self) -> Vec<serde_json::Value> {
        let mut merged = (Vec::new(), 0);
        for _ in 0..100 {
            self.gw.audit().flush_async().await.unwrap();
            let text =
                std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default();
            merged = support::merge_completions(
                text.lines()
                    .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                    .collect(),
            );
            if merged.1 == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        merged
            .0
            .into_iter()
            .filter(|l| l["kind"] == "request")
            .collect()
    }
}

/// Runs a blocking store call off the test's async worker.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn spec(account: &str, name: &str) -> NewTokenSpec {
    let expires_at = Some(tokengate::store::system_now_ms() + 30 * 86_400_000);
    support::token_spec(account, name, &["apps:read"], expires_at)
}

/// Issues a token through `store`; returns (plaintext, id).
async fn issue(
    store: &Store,
    account: &str,
    name: &str,
    rate: Option<RateOverride>,
) -> (String, String) {
    let (store, account, name) = (store.clone(), account.to_string(), name.to_string());
    blocking(move || {
        let _ = store.create_account(&account, None, "test", tokengate::store::system_now_ms());
        let mut s = spec(&account, &name);
        // Polling loops under load can send more than the default burst before a change lands:
        // tests that are not about rate limits get a rate that never triggers.
        s.rate = rate.or(Some(RateOverride {
            requests_per_second: 1e6,
            burst: 1_000_000,
        }));
        let (row, new) = store
            .create_token(&s, "tg", 100_000, tokengate::store::system_now_ms())
            .unwrap();
        (new.plaintext, row.id)
    })
    .await
}

/// A 401 for a token that is no longer valid: status, challenge, JSON body.
async fn assert_invalid_token(resp: reqwest::Response, what: &str) {
    assert_eq!(resp.status(), 401, "{what}");
    let challenge = challenge(&resp).to_string();
    assert!(
        challenge.starts_with("Bearer realm=\"tokengate\"")
            && challenge.contains("error=\"invalid_token\""),
        "{challenge}"
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_token", "{body}");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_through_one_replica_reaches_the_other_two_measured_over_100_trials() {
    let Some(db) = services::PgDb::create() else {
        return;
    };
    let upstream = Upstream::start().await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Replica::postgres(&db.url, "", &upstream).await);
    }
    let (a, others) = replicas.split_first().unwrap();
    let mut allowed = 0usize;
    let mut latencies = Vec::new();
    for trial in 0..100 {
        let (token, id) = issue(a.gw.store(), "ci", &format!("t{trial}"), None).await;
        // Warm the other replicas' caches: they answer from memory from now on.
        for r in others {
            assert_eq!(r.get(&token).await.status(), 200);
            allowed += 1;
        }
        a.gw.revoke(&id, "test", "trial").await.unwrap();
        // The revoking replica: 0 ms.
        assert_invalid_token(a.get(&token).await, "revoking replica").await;
        let t0 = Instant::now();
        let mut pending: Vec<&Replica> = others.iter().collect();
        while !pending.is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "trial {trial}: not propagated after 10 s"
            );
            let mut still = Vec::new();
            for r in pending {
                let resp = r.get(&token).await;
                match resp.status().as_u16() {
                    200 => {
                        allowed += 1;
                        still.push(r);
                    }
                    401 => assert_invalid_token(resp, "other replica").await,
                    s => panic!("unexpected {s}"),
                }
            }
            pending = still;
        }
        latencies.push(t0.elapsed());
    }
    latencies.sort();
    let (p50, p99, max) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        *latencies.last().unwrap(),
    );
    println!(
        "revocation propagation to 2 other replicas over {} trials (PostgreSQL LISTEN/NOTIFY, poll backstop 30 s): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    // Far below the 30 s poll: the push did it. (The speed figure itself is reported, not asserted.)
    assert!(max < Duration::from_secs(10));
    // Only allowed requests reached the upstream; every 401 is audited as `revoked`.
    assert_eq!(upstream.count(), allowed);
    let mut denied = 0;
    for r in &replicas {
        for l in r.audit().await {
            if l["status_code"] == 401 {
                support::assert_rejection_line(&l, 401, "revoked");
                denied += 1;
            }
        }
    }
    assert!(denied >= 300, "{denied}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_disable_and_rotation_reach_the_other_replicas() {
    let Some(db) = services::PgDb::create() else {
        return;
    };
    let upstream = Upstream::start().await;
    let a = Replica::postgres(&db.url, "", &upstream).await;
    let b = Replica::postgres(&db.url, "", &upstream).await;
    let (token, id) = issue(a.gw.store(), "team", "one", None).await;
    let (other, _) = issue(a.gw.store(), "team", "two", None).await;
    assert_eq!(b.get(&token).await.status(), 200);
    assert_eq!(b.get(&other).await.status(), 200);
    // Rotation: the successor's first use (on A) retires the predecessor everywhere.
    let (store, id2) = (a.gw.store().clone(), id.clone());
    let (_, new) = blocking(move || {
        store
            .rotate(
                &id2,
                "test",
                86_400_000,
                "tg",
                tokengate::store::system_now_ms(),
            )
            .unwrap()
    })
    .await;
    assert_eq!(
        b.get(&token).await.status(),
        200,
        "the old token works during the grace period"
    );
    assert_eq!(a.get(&new.plaintext).await.status(), 200);
    let before = upstream.count();
    let t0 = Instant::now();
    while b.get(&token).await.status() == 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "rotation retirement not propagated"
        );
    }
    assert_invalid_token(b.get(&token).await, "retired predecessor").await;
    // Account disable through A: B rejects every token of the account.
    a.gw.disable_account("team", "test").await.unwrap();
    b.wait_refused(&other, "disabled account").await;
    let lines = b.audit().await;
    let last = lines.last().unwrap();
    support::assert_rejection_line(last, 401, "account_disabled");
    // Allowed requests during propagation went up; no 401 did.
    let twos = lines.iter().filter(|l| l["status_code"] == 200).count();
    let ones = a
        .audit()
        .await
        .iter()
        .filter(|l| l["status_code"] == 200)
        .count();
    assert_eq!(upstream.count(), twos + ones);
    assert!(upstream.count() >= before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_notifications_never_serves_a_token_revoked_meanwhile_and_recovers()
{
    let Some(db) = services::PgDb::create() else {
        return;
    };
    let upstream = Upstream::start().await;
    let a = Replica::postgres(&db.url_with("application_name=replica-a"), "", &upstream).await;
    let c = Replica::postgres(&db.url_with("application_name=replica-c"), "", &upstream).await;
    let (t1, id1) = issue(a.gw.store(), "ci", "one", None).await;
    let (t2, id2) = issue(a.gw.store(), "ci", "two", None).await;
    assert_eq!(c.get(&t1).await.status(), 200);
    assert_eq!(c.gw.cache().len(), 1, "t1 is cached on C");

    // Cut C's notification connection (the real way: the server kills it) and keep it down.
    c.gw.store().hold_change_feed(true);
    assert_eq!(db.terminate("replica-c-listen"), 1);
    support::wait_until("C to notice the lost connection", || {
        !c.gw.cache().is_trusted()
    })
    .await;
    assert_eq!(c.gw.store().change_feed_up(), Some(false));
    assert_eq!(c.gw.cache().len(), 0, "what could go stale was dropped");

    // Revoked while C is cut off: C must never answer 200 for it.
    a.gw.revoke(&id1, "test", "cut off").await.unwrap();
    let upstream_before = upstream.count();
    for _ in 0..20 {
        assert_invalid_token(c.get(&t1).await, "revoked while cut off").await;
    }
    // Valid tokens still work, straight from the store and uncached.
    let lookups = c.gw.store().lookup_count();
    for _ in 0..5 {
        assert_eq!(c.get(&t2).await.status(), 200);
    }
    assert!(
        c.gw.store().lookup_count() - lookups >= 5,
        "every request read the store"
    );
    assert_eq!(c.gw.cache().len(), 0);
    assert_eq!(upstream.count(), upstream_before + 5);
    let lines = c.audit().await;
    let revoked: Vec<_> = lines.iter().filter(|l| l["status_code"] == 401).collect();
    assert_eq!(revoked.len(), 20);
    for l in revoked {
        support::assert_rejection_line(l, 401, "revoked");
    }

    // Let it reconnect: C trusts its cache again on its own, after reading the change log.
    c.gw.store().hold_change_feed(false);
    support::wait_until("C to recover", || c.gw.cache().is_trusted()).await;
    assert_eq!(c.gw.store().change_feed_up(), Some(true));
    // Notifications work again: a cached token revoked through A is refused by C long before
    // its 30 s poll.
    assert_eq!(c.get(&t2).await.status(), 200);
    assert_eq!(c.gw.cache().len(), 1);
    a.gw.revoke(&id2, "test", "after recovery").await.unwrap();
    // Push resumed.
    c.wait_refused(&t2, "revoked after recovery").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_limit_of_100_over_3_replicas_with_redis_admits_100() {
    let Some(db) = services::PgDb::create() else {
        return;
    };
    let Some(redis) = services::redis_url() else {
        return;
    };
    let upstream = Upstream::start().await;
    let extra = format!("redis = \"{redis}\"\nreplicas = 3\nredis_timeout = \"2s\"");
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Arc::new(
            Replica::postgres(&db.url, &extra, &upstream).await,
        ));
    }
    // 100 at once, then one per 1000 s: the window holds exactly the burst.
    let rate = RateOverride {
        requests_per_second: 0.001,
        burst: 100,
    };
    let (token, _) = issue(replicas[0].gw.store(), "ci", "global", Some(rate)).await;
    let ok = Arc::new(AtomicUsize::new(0));
    let limited = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for r in &replicas {
        for _ in 0..5 {
            let (r, token, ok, limited) = (r.clone(), token.clone(), ok.clone(), limited.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..40 {
                    let resp = r.get(&token).await;
                    match resp.status().as_u16() {
                        200 => {
                            assert_eq!(resp.headers()["ratelimit-limit"], "100");
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        429 => {
                            assert!(resp.headers().contains_key("retry-after"));
                            assert_eq!(resp.headers()["ratelimit-limit"], "100");
                            limited.fetch_add(1, Ordering::SeqCst);
                        }
                        s => panic!("unexpected {s}"),
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, limited) = (ok.load(Ordering::SeqCst), limited.load(Ordering::SeqCst));
    println!(
        "global limit 100 over 3 replicas (Redis GCRA): {ok} admitted, {limited} refused of 600"
    );
    assert!((98..=102).contains(&ok), "{ok} admitted");
    assert_eq!(ok + limited, 600);
    assert_eq!(
        upstream.count(),
        ok,
        "refused requests never reach the upstream"
    );
    let mut refused_lines = 0;
    for r in &replicas {
        assert_eq!(
            r.gw.snapshot().redis_fallbacks,
            0,
            "Redis answered every check"
        );
        for l in r.audit().await {
            if l["status_code"] == 429 {
                support::assert_rejection_line(&l, 429, "rate_limited");
                refused_lines += 1;
            }
        }
    }
    assert_eq!(refused_lines, limited);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_replica_falls_back_to_its_share_and_says_so() {
    // A port nobody listens on: Redis "down". The store is SQLite: this is about limits only.
    let port = dead_addr().port();
    let upstream = Upstream::start().await;
    let extra = format!(
        "[rate_limit]\nredis = \"redis://127.0.0.1:{port}/\"\nreplicas = 2\nredis_timeout = \"200ms\""
    );
    let r = Replica::start("path = \"tokengate.db\"", &extra, &upstream).await;
    let (token, _) = issue(
        r.gw.store(),
        "ci",
        "fallback",
        Some(RateOverride {
            requests_per_second: 0.001,
            burst: 10,
        }),
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(r.get(&token).await.status().as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "limit 10 / 2 replicas: {statuses:?}"
    );
    assert!(statuses[5..].iter().all(|s| *s == 429));
    assert_eq!(upstream.count(), 5);
    let metrics = client()
        .get(format!("http://{}/metrics", r.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tokengate_ratelimit_redis_fallback_total 12"),
        "{metrics}"
    );
    let last = r.audit().await.pop().unwrap();
    support::assert_rejection_line(&last, 429, "rate_limited");
}

/// Runs the CLI binary.
fn cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tokengate"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_sqlite_to_postgres_and_back_keeps_every_row_and_token() {
    let Some(db) = services::PgDb::create() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.db");
    let back = dir.path().join("back.db");
    // A store with a bit of everything: emails, a disabled account, rotation, revocation,
    // overrides, scopes, CIDRs, last use, a queued audit event.
    let (plain, expected) = {
        let first = first.clone();
        blocking(move || {
            let s = Store::open(&first, Duration::from_secs(5)).unwrap();
            let now = tokengate::store::system_now_ms();
            s.create_account("ci", Some("ci@example.com"), "test", now)
                .unwrap();
            s.create_account("gone", None, "test", now).unwrap();
            let mut rich = spec("ci", "rich");
            rich.role = Some("viewer".into());
            rich.scopes
                .insert("app".into(), vec!["billing".into(), "web-*".into()]);
            rich.allowed_cidrs = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
            rich.rate = Some(RateOverride {
                requests_per_second: 2.5,
                burst: 9,
            });
            let (keep, keep_plain) = s.create_token(&rich, "tg", 10, now).unwrap();
            let (old, _) = s.create_token(&spec("ci", "old"), "tg", 10, now).unwrap();
            s.rotate(&old.id, "test", 3_600_000, "tg", now + 1).unwrap();
            let (dead, _) = s
                .create_token(&spec("gone", "dead"), "tg", 10, now)
                .unwrap();
            s.revoke(&dead.id, "test", "leaked", now + 2).unwrap();
            s.disable_account("gone", "test", now + 3).unwrap();
            s.flush_last_used(&[LastUsed {
                token_id: keep.id.clone(),
                at: now + 4,
                ip: "10.9.8.7".into(),
            }])
            .unwrap();
            s.outbox_push("{\"event\":\"queued\"}").unwrap();
            (keep_plain.plaintext, s.export().unwrap())
        })
        .await
    };
    assert_eq!(expected.tokens.len(), 4);
    let url_env = [("TG_TEST_COPY_URL", db.url.as_str())];
    let out = cli(
        &[
            "store",
            "copy",
            "--from",
            first.to_str().unwrap(),
            "--to",
            "env:TG_TEST_COPY_URL",
        ],
        &url_env,
    );
    assert_success(&out);
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("2 accounts, 4 tokens") && msg.contains("identical"),
        "{msg}"
    );
    let out = cli(
        &[
            "store",
            "copy",
            "--from",
            "env:TG_TEST_COPY_URL",
            "--to",
            back.to_str().unwrap(),
        ],
        &url_env,
    );
    assert_success(&out);
    // Row for row, field for field, on both engines.
    let (pg_url, back2) = (db.url.clone(), back.clone());
    let (in_pg, in_back) = blocking(move || {
        let pg = Store::open_postgres(&pg_url, &PgOptions::default()).unwrap();
        let b = Store::open(&back2, Duration::from_secs(5)).unwrap();
        (pg.export().unwrap(), b.export().unwrap())
    })
    .await;
    assert_eq!(in_pg, expected);
    assert_eq!(in_back, expected);
    // A non-empty destination is refused, and nothing is written.
    let out = cli(
        &[
            "store",
            "copy",
            "--from",
            back.to_str().unwrap(),
            "--to",
            "env:TG_TEST_COPY_URL",
        ],
        &url_env,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
    // The copied token authenticates, on PostgreSQL and on the SQLite copy of the copy.
    let upstream = Upstream::start().await;
    let on_pg = Replica::postgres(&db.url, "", &upstream).await;
    assert_eq!(on_pg.get(&plain).await.status(), 200);
    let store = format!("path = \"{}\"", back.display());
    let on_file = Replica::start(&store, "", &upstream).await;
    assert_eq!(on_file.get(&plain).await.status(), 200);
    assert_eq!(upstream.count(), 2);
    assert!(Path::new(&back).exists());
}
