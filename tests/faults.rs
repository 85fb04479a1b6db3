//! Faults injected on purpose into a real `tokengate serve` process (issue 16): real processes,
//! real files in temp dirs, the recording upstream to show what was (not) forwarded.
//!
//! Sections (each owns its helpers; the shared ones are at the top):
//! - Store faults: the SQLite file truncated, deleted or replaced under load; CLI commands against
//!   a missing store.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{Options, Served, Upstream, cli, client, eventually, write_config};

// =================================================================================================
// Shared helpers: the real binary, its stderr, bounded waits.
// =================================================================================================

/// An upstream, a temporary folder with a config (`o`) that forwards to it, and the path of
/// the store that config names (not created): (upstream, folder, config, store).
async fn site(o: &Options) -> (Upstream, tempfile::TempDir, PathBuf, PathBuf) {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &upstream.addr.to_string(), o);
    let db = dir.path().join("tokengate.db");
    (upstream, dir, config, db)
}

async fn get(url: &str, token: Option<&str>) -> (u16, String) {
    let mut r = client().get(url);
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    match r.send().await {
        Ok(resp) => {
            let s = resp.status().as_u16();
            (s, resp.text().await.unwrap_or_default())
        }
        Err(e) => panic!("no answer from {url}: {e}"),
    }
}

/// The files in `dir`, by name.
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// =================================================================================================
// Store faults: the SQLite file truncated, deleted or replaced under load; CLI commands against a
// missing store.
// =================================================================================================

/// Issues a token with `apps:read` of account `ci` straight into the store file (the gateway
/// runs as a separate process).
fn issue(db: &Path, name: &str) -> (String, String) {
    support::issue_into(db, "ci", name, &["apps:read"])
}

#[derive(Clone, Copy, Debug)]
enum StoreFault {
    /// `truncate -s 0` on the file.
    Truncate,
    /// `rm` of the file (its `-wal`/`-shm` stay, as with `rm tokengate.db`).
    Delete,
    /// A valid store put in its place (`mv`): a backup taken before the revocation, in which
    /// the revoked token is still active.
    Replace,
}

/// What the client loop saw.
#[derive(Default)]
struct Seen {
    valid_ok: AtomicU64,
    valid_503: AtomicU64,
    revoked_ok: AtomicU64,
    revoked_refused: AtomicU64,
    other: Mutex<Vec<String>>,
}

/// The test config: neither the client loop's 401s for the revoked token (failed-auth limiter)
/// nor its pace (per-token limit) may turn answers into 429s.
fn store_fault_options() -> Options {
    Options {
        sections: "[rate_limit]\nrequests_per_second = 1000000\nburst = 1000000\nfailed_auth_per_minute = 1000000\n".into(),
        ..Options::default()
    }
}

/// A gateway serving a store, with a used (cached) valid token, a token revoked through the
/// CLI after it was used (a CLI write: the trigger of the SIGBUS in issue 16), a valid token
/// never used (uncached), and a client loop on the first two; then `fault`.
async fn store_fault_under_load(fault: StoreFault) {
    let (upstream, dir, config, db) = site(&store_fault_options()).await;
    // Enough rows that the file spans many pages, as a real store does.
    for i in 0..200 {
        issue(&db, &format!("filler-{i}"));
    }
    let (valid, _) = issue(&db, "valid");
    let (revoked, revoked_id) = issue(&db, "revoked");
    let (uncached, uncached_id) = issue(&db, "uncached");
    let mut gw = Served::start(&config).await;
    let base = format!("http://{}", gw.addr);
    let admin = format!("http://{}", gw.admin);
    assert_eq!(get(&format!("{base}/apps/a/b"), Some(&valid)).await.0, 200);
    assert_eq!(
        get(&format!("{base}/apps/a/b"), Some(&revoked)).await.0,
        200
    );
    let backup = dir.path().join("before-revoke.db");
    let out = support::cli(&config, &["store", "backup", backup.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let out = support::cli(
        &config,
        &["token", "revoke", &revoked_id, "--reason", "test"],
    );
    assert!(out.status.success(), "{out:?}");
    eventually(
        "the revocation to reach the gateway",
        Duration::from_secs(10),
        || async {
            (get(&format!("{base}/apps/a/b"), Some(&revoked)).await.0 == 401).then_some(())
        },
    )
    .await;
    assert_eq!(get(&format!("{admin}/readyz"), None).await.0, 200);
    let forwarded_for = |id: &str| {
        upstream
            .received()
            .iter()
            .filter(|r| {
                r.headers
                    .get("x-tokengate-token-id")
                    .is_some_and(|v| v == id)
            })
            .count()
    };
    let revoked_forwards = forwarded_for(&revoked_id);

    // The client loop: the valid and the revoked token, back to back, until told to stop.
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    for _ in 0..2 {
        let (seen, stop, base) = (seen.clone(), stop.clone(), base.clone());
        let (valid, revoked) = (valid.clone(), revoked.clone());
        loops.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (s, body) = get(&format!("{base}/apps/a/b"), Some(&valid)).await;
                match s {
                    200 => seen.valid_ok.fetch_add(1, Ordering::Relaxed),
                    503 => seen.valid_503.fetch_add(1, Ordering::Relaxed),
                    _ => {
                        seen.other
                            .lock()
                            .unwrap()
                            .push(format!("valid: {s} {body}"));
                        0
                    }
                };
                let (s, body) = get(&format!("{base}/apps/a/b"), Some(&revoked)).await;
                match s {
                    401 | 503 => seen.revoked_refused.fetch_add(1, Ordering::Relaxed),
                    _ => {
                        seen.other
                            .lock()
                            .unwrap()
                            .push(format!("revoked: {s} {body}"));
                        seen.revoked_ok.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    eventually(
        "the client loop to run",
        Duration::from_secs(10),
        || async { (seen.valid_ok.load(Ordering::Relaxed) >= 20).then_some(()) },
    )
    .await;

    // The fault.
    let expected = match fault {
        StoreFault::Truncate => {
            let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
            f.set_len(0).unwrap();
            "was truncated"
        }
        StoreFault::Delete => {
            std::fs::remove_file(&db).unwrap();
            "was deleted or moved away"
        }
        StoreFault::Replace => {
            let new = dir.path().join("incoming.db");
            std::fs::copy(&backup, &new).unwrap();
            std::fs::rename(&new, &db).unwrap();
            "was replaced by another file"
        }
    };

    // Readiness fails and names the problem; the process answers throughout.
    let body = eventually("readyz to fail", Duration::from_secs(10), || async {
        let (s, body) = get(&format!("{admin}/readyz"), None).await;
        (s == 503).then_some(body)
    })
    .await;
    assert!(
        body.contains("store: FAILED: the store file") && body.contains(expected),
        "{body}"
    );
    assert!(
        body.contains("audit: ok") && body.contains("listeners: ok"),
        "{body}"
    );
    let (_, metrics) = get(&format!("{admin}/metrics"), None).await;
    assert!(metrics.contains("\ntokengate_store_up 0\n"), "{metrics}");
    gw.assert_alive();

    // A token the gateway has not cached is refused 503, never looked up in a new file or
    // forwarded; the audit line says why.
    let forwarded_before = upstream.count();
    let (s, body) = get(&format!("{base}/apps/x/y"), Some(&uncached)).await;
    assert_eq!(s, 503, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["error"], "unavailable");
    let forwarded: Vec<_> = upstream.received()[forwarded_before..]
        .iter()
        .filter(|r| r.target == "/apps/x/y")
        .cloned()
        .collect();
    assert!(forwarded.is_empty(), "{forwarded:?}");
    assert!(
        !upstream.received().iter().any(|r| r
            .headers
            .get("x-tokengate-token-id")
            .is_some_and(|v| v == uncached_id.as_str() || v == revoked_id.as_str())
            && r.target == "/apps/x/y"),
        "nothing was forwarded for the uncached or the revoked token"
    );

    // Cached allowances are trusted for at most about a second more (revocations made
    // elsewhere can no longer be seen), then every token is refused until the store is back.
    eventually(
        "cached tokens to be refused too",
        Duration::from_secs(15),
        || async { (get(&format!("{base}/apps/a/b"), Some(&valid)).await.0 == 503).then_some(()) },
    )
    .await;
    let refused_after = seen.revoked_refused.load(Ordering::Relaxed);
    eventually(
        "the client loop to keep going",
        Duration::from_secs(10),
        || async {
            (seen.revoked_refused.load(Ordering::Relaxed) >= refused_after + 20).then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    gw.assert_alive();
    assert_eq!(
        seen.revoked_ok.load(Ordering::Relaxed),
        0,
        "a revoked token was accepted: {:?}",
        seen.other.lock().unwrap()
    );
    assert!(
        seen.other.lock().unwrap().is_empty(),
        "{:?}",
        seen.other.lock().unwrap()
    );
    assert!(seen.valid_503.load(Ordering::Relaxed) > 0);
    // The upstream never saw the revoked token after its revocation, nor the uncached one.
    assert_eq!(forwarded_for(&revoked_id), revoked_forwards);
    assert_eq!(forwarded_for(&uncached_id), 0);

    // The operational log says it once (the change poller), not once per refused request.
    let lines = gw.log_lines_with(expected);
    assert!(
        (1..=3).contains(&lines),
        "{lines} log lines name the lost store file"
    );

    // The next CLI command does not start over with an empty store where one is expected.
    if let StoreFault::Delete = fault {
        let before = names_in(dir.path());
        let out = support::cli(&config, &["token", "revoke", &uncached_id]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("tokengate store init"), "{err}");
        // The deleted store's -wal/-shm are still there: even `store init` refuses.
        let out = support::cli(&config, &["store", "init"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("-wal") && err.contains("deleted"), "{err}");
        assert_eq!(names_in(dir.path()), before);
        let (s, body) = get(&format!("{admin}/readyz"), None).await;
        assert_eq!(s, 503, "{body}");
    }
    // Nor does it take an emptied file for a new store (SQLite would write a schema into it,
    // in the very inode the gateway holds).
    if let StoreFault::Truncate = fault {
        let out = support::cli(&config, &["token", "revoke", &uncached_id]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is empty"), "{err}");
        assert_eq!(std::fs::metadata(&db).unwrap().len(), 0);
        let (s, body) = get(&format!("{admin}/readyz"), None).await;
        assert_eq!(s, 503, "{body}");
    }
    gw.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_truncated_under_load_no_crash_no_revoked_token_accepted() {
    store_fault_under_load(StoreFault::Truncate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_deleted_under_load_no_crash_no_revoked_token_accepted_cli_creates_nothing() {
    store_fault_under_load(StoreFault::Delete).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_replaced_under_load_no_crash_no_revoked_token_accepted() {
    store_fault_under_load(StoreFault::Replace).await;
}

/// Waits (up to 10 s) until exactly one line of `gw`'s stderr contains `needle`.
async fn logged_once(gw: &Served, what: &str, needle: &str) {
    eventually(what, Duration::from_secs(10), || async {
        (gw.log_lines_with(needle) == 1).then_some(())
    })
    .await
}

/// The file moved away and back (a mistaken `mv`, a volume remounted): the gateway recovers by
/// itself, serving uncached tokens again, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_moved_away_and_back_recovers_by_itself() {
    let (upstream, dir, config, db) = site(&Options::default()).await;
    let (token, _) = issue(&db, "t");
    let mut gw = Served::start(&config).await;
    let base = format!("http://{}", gw.addr);
    let admin = format!("http://{}", gw.admin);
    let aside = dir.path().join("aside.db");
    std::fs::rename(&db, &aside).unwrap();
    let body = eventually("readyz to fail", Duration::from_secs(10), || async {
        let (s, body) = get(&format!("{admin}/readyz"), None).await;
        (s == 503).then_some(body)
    })
    .await;
    assert!(body.contains("was deleted or moved away"), "{body}");
    assert_eq!(get(&format!("{base}/apps/a/b"), Some(&token)).await.0, 503);
    assert_eq!(upstream.count(), 0);

    logged_once(
        &gw,
        "the change poller to log it",
        "cannot read the store's change log",
    )
    .await;
    std::fs::rename(&aside, &db).unwrap();
    eventually("readyz to recover", Duration::from_secs(10), || async {
        (get(&format!("{admin}/readyz"), None).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(get(&format!("{base}/apps/a/b"), Some(&token)).await.0, 200);
    assert_eq!(upstream.count(), 1);
    logged_once(&gw, "the recovery to be logged", "readable again").await;
    gw.assert_alive();
}

/// Every store command against a missing file fails with the way to create one, and creates
/// nothing; `store init` creates it once; `serve` creates one only on a first start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_against_a_missing_store_fails_clearly_and_creates_nothing() {
    let (upstream, dir, config, db) = site(&Options::default()).await;
    let before = names_in(dir.path());
    let backup = dir.path().join("b.db");
    let commands: &[&[&str]] = &[
        &["account", "create", "ci"],
        &["account", "list"],
        &["account", "disable", "ci"],
        &["token", "list"],
        &["token", "show", "tg_12345678"],
        &["token", "revoke", "tok_x"],
        &["token", "rotate", "tok_x"],
        &[
            "token",
            "create",
            "--account",
            "ci",
            "--name",
            "x",
            "--permission",
            "apps:read",
        ],
        &["store", "backup", backup.to_str().unwrap()],
    ];
    for args in commands {
        let out = support::cli(&config, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("no store at {}", db.display()))
                && err.contains("create a new one with `tokengate store init`"),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
        assert_eq!(names_in(dir.path()), before, "{args:?} created a file");
    }

    // `store init` creates it; a second one changes nothing.
    let out = support::cli(&config, &["store", "init"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("created an empty store"));
    assert!(db.is_file());
    let out = support::cli(&config, &["account", "create", "ci"]);
    assert!(out.status.success(), "{out:?}");
    let out = support::cli(&config, &["store", "init"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists already"));
    let out = support::cli(&config, &["account", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ci"),
        "{out:?}"
    );

    // `serve`: a first start (no file, no -wal/-shm, no audit lines) creates the store...
    let fresh = tempfile::tempdir().unwrap();
    let fresh_config = write_config(
        fresh.path(),
        &upstream.addr.to_string(),
        &Options::default(),
    );
    let gw = Served::start(&fresh_config).await;
    assert!(fresh.path().join("tokengate.db").is_file());
    assert_eq!(gw.log_lines_with("first start"), 1);
    let audit = fresh.path().join("audit.log");
    assert_eq!(
        get(&format!("http://{}/apps/a/b", gw.addr), None).await.0,
        401
    );
    eventually("an audit line", Duration::from_secs(10), || async {
        std::fs::metadata(&audit)
            .is_ok_and(|m| m.len() > 0)
            .then_some(())
    })
    .await;
    drop(gw);
    // ... a later one whose store vanished does not.
    for f in ["tokengate.db", "tokengate.db-wal", "tokengate.db-shm"] {
        let _ = std::fs::remove_file(fresh.path().join(f));
    }
    let out = cli(&fresh_config, &["serve"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a first start") && err.contains("tokengate store init"),
        "{err}"
    );
    assert!(!fresh.path().join("tokengate.db").exists());
}
