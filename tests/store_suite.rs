//! One store test-suite, two engines (issue 10): every behaviour test below runs against a
//! SQLite file and against a real PostgreSQL database (see `support/services.rs`).

#[path = "support/services.rs"]
mod services;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokengate::store::{
    LastUsed, NewTokenSpec, PgOptions, RateOverride, SessionRow, Store, StoreError,
};

/// Keeps the backing file or database alive while the store is used.
#[allow(dead_code)]
enum Guard {
    Dir(tempfile::TempDir),
    Pg(services::PgDb),
}

fn open_sqlite() -> (Guard, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("t.db"), Duration::from_millis(250)).unwrap();
    (Guard::Dir(dir), s)
}

fn open_postgres() -> Option<(Guard, Store)> {
    let db = services::PgDb::create()?;
    let s = Store::open_postgres(&db.url, &PgOptions::default()).unwrap();
    Some((Guard::Pg(db), s))
}

/// Generates `sqlite::NAME` and `postgres::NAME` for each behaviour test `NAME(&Store)`.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { let (_g, s) = super::open_sqlite(); super::$name(&s); })*
        }
        mod postgres {
            $(#[test] fn $name() { let Some((_g, s)) = super::open_postgres() else { return }; super::$name(&s); })*
        }
    };
}

suite!(
    create_lookup_revoke_round_trip,
    accounts_are_unique_and_listed,
    cap_names_limit_and_lists_tokens,
    concurrent_creations_respect_the_cap,
    find_by_prefix_exact_ambiguous_unknown,
    list_filters_inactive_and_by_account,
    last_used_only_moves_forward,
    rotation_keeps_fields_and_sets_deadline,
    retire_rotated_is_idempotent,
    disabling_an_account_blocks_its_tokens,
    change_log_is_ordered_and_complete,
    concurrent_writers_never_hide_a_change_from_a_follower,
    outbox_push_peek_ack,
    count_active_counts_expiring,
    copy_round_trip_and_refuses_non_empty_destination,
    integrity_and_ping,
    approvals_are_decided_once_and_used_inside_their_window,
    mfa_steps_only_go_up_and_recovery_codes_are_single_use,
    purging_sessions_counts_its_writes_on_either_engine,
    reading_sessions_takes_no_write,
);

fn spec(account: &str, name: &str) -> NewTokenSpec {
    NewTokenSpec {
        account: account.into(),
        name: name.into(),
        role: Some("viewer".into()),
        permissions: vec!["apps:read".into(), "env:*".into()],
        scopes: BTreeMap::from([(
            "app".to_string(),
            vec!["billing".to_string(), "web-*".to_string()],
        )]),
        allowed_cidrs: vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ],
        rate: Some(RateOverride {
            requests_per_second: 5.5,
            burst: 7,
        }),
        expires_at: Some(1_000_000),
        created_by: "test".into(),
    }
}

fn create_lookup_revoke_round_trip(s: &Store) {
    s.create_account("ci", Some("ci@example.com"), "test", 1)
        .unwrap();
    let (row, new) = s.create_token(&spec("ci", "deploy"), "tg", 5, 10).unwrap();
    assert!(new.plaintext.starts_with("tg_"));
    let found = s.lookup_hash(&new.hash).unwrap().unwrap();
    assert_eq!(found, row);
    assert_eq!(found.account, "ci");
    assert_eq!(found.scopes["app"], vec!["billing", "web-*"]);
    assert_eq!(found.allowed_cidrs.len(), 2);
    assert_eq!(
        found.rate,
        Some(RateOverride {
            requests_per_second: 5.5,
            burst: 7
        })
    );
    assert_eq!(found.expires_at, Some(1_000_000));
    assert_eq!(found.created_at, 10);
    assert!(s.lookup_hash(&[7; 32]).unwrap().is_none());
    assert_eq!(s.find_token(&row.prefix).unwrap().id, row.id);
    let before = s.last_change_seq().unwrap();
    let r = s.revoke(&row.id, "alice", "leaked", 20).unwrap();
    assert_eq!(r.revoked_at, Some(20));
    assert_eq!(r.revoked_by.as_deref(), Some("alice"));
    assert_eq!(r.revoke_reason.as_deref(), Some("leaked"));
    assert!(matches!(
        s.revoke(&row.id, "t", "x", 21),
        Err(StoreError::AlreadyRevoked(_))
    ));
    assert!(matches!(
        s.revoke("tok_nope", "t", "x", 21),
        Err(StoreError::NoToken(_))
    ));
    let ch = s.changes_since(before).unwrap();
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].kind, "revoke");
    assert_eq!(ch[0].token_id.as_deref(), Some(row.id.as_str()));
    assert_eq!(
        s.lookup_hash(&new.hash).unwrap().unwrap().status(30),
        "revoked"
    );
}

fn accounts_are_unique_and_listed(s: &Store) {
    let a = s.create_account("zed", None, "test", 1).unwrap();
    s.create_account("amy", Some("amy@example.com"), "test", 2)
        .unwrap();
    assert!(matches!(
        s.create_account("zed", None, "test", 3),
        Err(StoreError::AccountExists(_))
    ));
    let names: Vec<String> = s
        .list_accounts()
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, vec!["amy", "zed"]);
    assert_eq!(s.get_account("zed").unwrap(), a);
    assert_eq!(s.get_account(&a.id).unwrap().name, "zed");
    assert!(matches!(
        s.get_account("nobody"),
        Err(StoreError::NoAccount(_))
    ));
}

fn cap_names_limit_and_lists_tokens(s: &Store) {
    s.create_account("ci", None, "test", 1).unwrap();
    for i in 0..2 {
        s.create_token(&spec("ci", &format!("t{i}")), "tg", 2, 10)
            .unwrap();
    }
    let e = s
        .create_token(&spec("ci", "t3"), "tg", 2, 10)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2 active tokens")
            && e.contains("t0")
            && e.contains("t1")
            && e.contains("token revoke"),
        "{e}"
    );
    // An expired token frees its slot.
    let mut expired = spec("ci", "old");
    expired.expires_at = Some(5);
    s.create_account("other", None, "test", 1).unwrap();
    s.create_token(
        &{
            let mut x = expired.clone();
            x.account = "other".into();
            x
        },
        "tg",
        1,
        1,
    )
    .unwrap();
    s.create_token(
        &{
            let mut x = spec("other", "fresh");
            x.expires_at = None;
            x
        },
        "tg",
        1,
        10,
    )
    .unwrap();
}

fn concurrent_creations_respect_the_cap(s: &Store) {
    s.create_account("race", None, "test", 1).unwrap();
    let ok = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::scope(|sc| {
        for i in 0..8 {
            let (s, ok) = (s.clone(), ok.clone());
            sc.spawn(move || {
                for j in 0..3 {
                    // SQLite's busy timeout may refuse a writer under this contention: retry.
                    loop {
                        match s.create_token(&spec("race", &format!("t{i}-{j}")), "tg", 5, 10) {
                            Ok(_) => {
                                ok.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            Err(StoreError::CapReached { .. }) => {}
                            Err(StoreError::Sqlite { .. }) => continue,
                            Err(e) => panic!("{e}"),
                        }
                        break;
                    }
                }
            });
        }
    });
    assert_eq!(ok.load(std::sync::atomic::Ordering::SeqCst), 5);
    assert_eq!(s.list_tokens(Some("race"), false, 10).unwrap().len(), 5);
}

fn find_by_prefix_exact_ambiguous_unknown(s: &Store) {
    s.create_account("ci", None, "test", 1).unwrap();
    let (a, _) = s.create_token(&spec("ci", "a"), "tg", 5, 10).unwrap();
    let (b, _) = s.create_token(&spec("ci", "b"), "tg", 5, 11).unwrap();
    assert_eq!(s.find_token(&a.id).unwrap().id, a.id);
    assert_eq!(s.find_token(&b.prefix).unwrap().id, b.id);
    // A unique beginning of the id works; "tok_" is shorter than 6 characters' worth of id.
    assert_eq!(s.find_token(&a.id[..a.id.len() - 2]).unwrap().id, a.id);
    assert!(matches!(s.find_token("tg_"), Err(StoreError::NoToken(_))));
    assert!(matches!(
        s.find_token("tok_zzzzzzzzzzzz"),
        Err(StoreError::NoToken(_))
    ));
    let common = common_prefix(&a.id, &b.id);
    if common.len() >= 6 {
        assert!(matches!(
            s.find_token(&common),
            Err(StoreError::Ambiguous(_))
        ));
    }
}

fn common_prefix(a: &str, b: &str) -> String {
    a.chars()
        .zip(b.chars())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect()
}

fn list_filters_inactive_and_by_account(s: &Store) {
    s.create_account("a1", None, "test", 1).unwrap();
    s.create_account("a2", None, "test", 1).unwrap();
    let (t1, _) = s.create_token(&spec("a1", "one"), "tg", 5, 10).unwrap();
    let (t2, _) = s.create_token(&spec("a1", "two"), "tg", 5, 20).unwrap();
    let (t3, _) = s.create_token(&spec("a2", "three"), "tg", 5, 30).unwrap();
    s.revoke(&t1.id, "test", "x", 40).unwrap();
    let ids = |v: Vec<tokengate::store::TokenRow>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.list_tokens(None, false, 50).unwrap()),
        vec![t3.id.clone(), t2.id.clone()]
    );
    assert_eq!(
        ids(s.list_tokens(None, true, 50).unwrap()),
        vec![t3.id.clone(), t2.id.clone(), t1.id.clone()]
    );
    assert_eq!(
        ids(s.list_tokens(Some("a1"), true, 50).unwrap()),
        vec![t2.id, t1.id]
    );
    assert!(matches!(
        s.list_tokens(Some("none"), true, 50),
        Err(StoreError::NoAccount(_))
    ));
    // Expired by the clock passed in.
    assert!(s.list_tokens(None, false, 2_000_000).unwrap().is_empty());
}

fn last_used_only_moves_forward(s: &Store) {
    s.create_account("ci", None, "test", 1).unwrap();
    let (row, _) = s.create_token(&spec("ci", "x"), "tg", 5, 10).unwrap();
    let (other, _) = s.create_token(&spec("ci", "y"), "tg", 5, 10).unwrap();
    let u = |id: &str, at: i64| LastUsed {
        token_id: id.to_string(),
        at,
        ip: format!("10.0.0.{at}"),
    };
    let writes = s.write_count();
    // One batch, one transaction, duplicates keep the latest.
    s.flush_last_used(&[u(&row.id, 50), u(&other.id, 7), u(&row.id, 45)])
        .unwrap();
    assert_eq!(s.write_count() - writes, 1);
    // A replica with older data never moves it back.
    s.flush_last_used(&[u(&row.id, 40)]).unwrap();
    let r = s.get_token(&row.id).unwrap();
    assert_eq!(r.last_used_at, Some(50));
    assert_eq!(r.last_used_ip.as_deref(), Some("10.0.0.50"));
    assert_eq!(s.get_token(&other.id).unwrap().last_used_at, Some(7));
    s.flush_last_used(&[]).unwrap();
}

fn rotation_keeps_fields_and_sets_deadline(s: &Store) {
    s.create_account("ci", None, "test", 1).unwrap();
    let (old, _) = s.create_token(&spec("ci", "x"), "tg", 1, 10).unwrap();
    let (new, plain) = s.rotate(&old.id, "bob", 1000, "tg", 20).unwrap();
    assert_eq!(s.lookup_hash(&plain.hash).unwrap().unwrap().id, new.id);
    assert_eq!(new.rotated_from.as_deref(), Some(old.id.as_str()));
    assert_eq!(new.permissions, old.permissions);
    assert_eq!(new.scopes, old.scopes);
    assert_eq!(new.allowed_cidrs, old.allowed_cidrs);
    assert_eq!(new.rate, old.rate);
    assert_eq!(new.created_by, "bob");
    // The successor keeps the original expiry: rotation never extends a token's life.
    assert_eq!(new.expires_at, old.expires_at);
    assert_eq!(s.get_token(&old.id).unwrap().rotation_deadline, Some(1020));
    // A second rotation never extends the first deadline.
    s.rotate(&old.id, "bob", 5000, "tg", 30).unwrap();
    assert_eq!(s.get_token(&old.id).unwrap().rotation_deadline, Some(1020));
    let last = s.changes_since(0).unwrap();
    assert_eq!(last.last().unwrap().kind, "rotate");
}

fn retire_rotated_is_idempotent(s: &Store) {
    s.create_account("ci", None, "test", 1).unwrap();
    let (old, _) = s.create_token(&spec("ci", "x"), "tg", 1, 10).unwrap();
    s.rotate(&old.id, "test", 1000, "tg", 20).unwrap();
    assert!(s.retire_rotated(&old.id, 30).unwrap());
    assert!(!s.retire_rotated(&old.id, 31).unwrap());
    let r = s.get_token(&old.id).unwrap();
    assert_eq!(r.revoke_reason.as_deref(), Some("rotated"));
    assert_eq!(r.revoked_by.as_deref(), Some("tokengate"));
    assert_eq!(r.revoked_at, Some(30));
    assert!(matches!(
        s.rotate(&old.id, "t", 1, "tg", 40),
        Err(StoreError::AlreadyRevoked(_))
    ));
}

fn disabling_an_account_blocks_its_tokens(s: &Store) {
    s.create_account("ci", None, "test", 1).unwrap();
    let (row, new) = s.create_token(&spec("ci", "x"), "tg", 5, 10).unwrap();
    let before = s.last_change_seq().unwrap();
    let acc = s.disable_account("ci", "test", 2).unwrap();
    assert_eq!(acc.disabled_at, Some(2));
    assert!(matches!(
        s.disable_account("ci", "test", 3),
        Err(StoreError::AccountDisabled(_))
    ));
    assert!(matches!(
        s.disable_account("nobody", "test", 3),
        Err(StoreError::NoAccount(_))
    ));
    assert!(matches!(
        s.create_token(&spec("ci", "y"), "tg", 5, 10),
        Err(StoreError::AccountDisabled(_))
    ));
    let looked = s.lookup_hash(&new.hash).unwrap().unwrap();
    assert_eq!(looked.account_disabled_at, Some(2));
    assert!(!looked.is_active(20));
    assert_eq!(looked.id, row.id);
    let ch = s.changes_since(before).unwrap();
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].kind, "account_disable");
    assert_eq!(ch[0].account_id.as_deref(), Some(acc.id.as_str()));
}

fn change_log_is_ordered_and_complete(s: &Store) {
    assert_eq!(s.last_change_seq().unwrap(), 0);
    assert!(s.changes_since(0).unwrap().is_empty());
    s.create_account("ci", None, "test", 1).unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            s.create_token(&spec("ci", &format!("t{i}")), "tg", 10, 10)
                .unwrap()
                .0
                .id,
        );
    }
    assert_eq!(
        s.last_change_seq().unwrap(),
        0,
        "creation needs no invalidation"
    );
    for id in &ids {
        s.revoke(id, "test", "x", 20).unwrap();
    }
    let all = s.changes_since(0).unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(
        all.iter()
            .map(|c| c.token_id.clone().unwrap())
            .collect::<Vec<_>>(),
        ids
    );
    assert_eq!(s.last_change_seq().unwrap(), all[4].seq);
    assert_eq!(s.changes_since(all[2].seq).unwrap(), all[3..].to_vec());
}

/// Several writers commit changes while a follower reads "everything after the last seq I saw":
/// the follower must end up with every change (on PostgreSQL this needs seq order = commit order).
fn concurrent_writers_never_hide_a_change_from_a_follower(s: &Store) {
    s.create_account("ci", None, "test", 1).unwrap();
    let ids: Vec<String> = (0..60)
        .map(|i| {
            s.create_token(&spec("ci", &format!("t{i}")), "tg", 100, 10)
                .unwrap()
                .0
                .id
        })
        .collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    let seen = std::thread::scope(|sc| {
        let follower = sc.spawn(|| {
            let mut last = 0;
            let mut seen = BTreeSet::new();
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                for c in s.changes_since(last).unwrap() {
                    last = last.max(c.seq);
                    seen.insert(c.token_id.unwrap());
                }
                if finished {
                    return seen;
                }
            }
        });
        let writers: Vec<_> = ids
            .chunks(15)
            .map(|chunk| {
                sc.spawn(move || {
                    for id in chunk {
                        loop {
                            match s.revoke(id, "test", "x", 20) {
                                Ok(_) => break,
                                Err(StoreError::Sqlite { .. }) => continue,
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        follower.join().unwrap()
    });
    assert_eq!(seen, ids.into_iter().collect::<BTreeSet<_>>());
}

fn outbox_push_peek_ack(s: &Store) {
    assert!(s.outbox_peek(10).unwrap().is_empty());
    for i in 0..3 {
        s.outbox_push(&format!("{{\"n\":{i}}}")).unwrap();
    }
    let rows = s.outbox_peek(2).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].1, "{\"n\":0}");
    s.outbox_ack(rows[1].0).unwrap();
    let rest = s.outbox_peek(10).unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].1, "{\"n\":2}");
}

fn count_active_counts_expiring(s: &Store) {
    s.create_account("ci", None, "test", 1).unwrap();
    let mut soon = spec("ci", "soon");
    soon.expires_at = Some(500);
    s.create_token(&soon, "tg", 10, 10).unwrap();
    let mut never = spec("ci", "never");
    never.expires_at = None;
    s.create_token(&never, "tg", 10, 10).unwrap();
    let (gone, _) = s.create_token(&spec("ci", "gone"), "tg", 10, 10).unwrap();
    s.revoke(&gone.id, "t", "x", 11).unwrap();
    assert_eq!(s.count_active(100, 1000).unwrap(), (2, 1));
    assert_eq!(s.count_active(600, 1000).unwrap(), (1, 0));
}

fn copy_round_trip_and_refuses_non_empty_destination(s: &Store) {
    s.create_account("ci", Some("ci@example.com"), "test", 1)
        .unwrap();
    s.create_account("off", None, "test", 1).unwrap();
    let (t, plain) = s.create_token(&spec("ci", "x"), "tg", 10, 10).unwrap();
    s.rotate(&t.id, "test", 1000, "tg", 20).unwrap();
    s.flush_last_used(&[LastUsed {
        token_id: t.id.clone(),
        at: 15,
        ip: "10.1.2.3".into(),
    }])
    .unwrap();
    s.disable_account("off", "test", 30).unwrap();
    s.outbox_push("{\"queued\":true}").unwrap();
    // Into a SQLite file and back into a fresh store of the same engine.
    let dir = tempfile::tempdir().unwrap();
    let file = Store::open(&dir.path().join("copy.db"), Duration::from_millis(250)).unwrap();
    let dump = s.copy_to(&file).unwrap();
    assert_eq!(dump.accounts.len(), 2);
    assert_eq!(dump.tokens.len(), 2);
    assert_eq!(dump.changes.len(), 2);
    assert_eq!(file.lookup_hash(&plain.hash).unwrap().unwrap().id, t.id);
    // The seq high-water mark carries over: the next change continues above it.
    let last = dump.changes.last().unwrap().seq;
    file.revoke(&t.id, "test", "x", 40).unwrap();
    assert!(file.last_change_seq().unwrap() > last);
    // The destination must be empty.
    match s.copy_to(&file) {
        Err(StoreError::NotEmpty { what, .. }) => assert!(what.contains("2 accounts"), "{what}"),
        other => panic!("{:?}", other.map(|d| d.summary())),
    }
}

fn integrity_and_ping(s: &Store) {
    s.ping().unwrap();
    assert_eq!(s.integrity_check().unwrap(), "ok");
}

// ---------------------------------------------------------------- engine-specific

#[test]
fn postgres_pushes_a_signal_for_every_committed_change() {
    let Some(db) = services::PgDb::create() else {
        return;
    };
    let a = Store::open_postgres(&db.url, &PgOptions::default()).unwrap();
    let b = Store::open_postgres(&db.url, &PgOptions::default()).unwrap();
    assert_eq!(b.change_feed_up(), Some(true));
    let mut rx = b.change_events().unwrap();
    a.create_account("ci", None, "test", 1).unwrap();
    let (t, _) = a.create_token(&spec("ci", "x"), "tg", 5, 10).unwrap();
    a.revoke(&t.id, "test", "x", 20).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), rx.recv()).await });
    assert_eq!(
        got.unwrap().unwrap(),
        tokengate::store::ChangeSignal::Notified
    );
    // SQLite has no push: followers poll.
    let (_g, file) = open_sqlite();
    assert!(file.change_events().is_none());
    assert_eq!(file.change_feed_up(), None);
}

#[test]
fn postgres_reopen_keeps_schema_and_unreachable_server_fails_fast() {
    let Some(db) = services::PgDb::create() else {
        return;
    };
    drop(Store::open_postgres(&db.url, &PgOptions::default()).unwrap());
    let s = Store::open_postgres(&db.url, &PgOptions::default()).unwrap();
    assert_eq!(
        db.exec("SELECT version::text FROM schema_version"),
        vec![Some(tokengate::store::SCHEMA_VERSION.to_string())]
    );
    s.ping().unwrap();
    // Nothing listens on port 1: a clear error naming the server without its password.
    let e = Store::open_postgres(
        "postgres://tg:hunter2@127.0.0.1:1/tg?connect_timeout=2",
        &PgOptions {
            timeout: Duration::from_secs(3),
            ..PgOptions::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("127.0.0.1:1") && !e.contains("hunter2"), "{e}");
    let e = s
        .backup(std::path::Path::new("/tmp/never.db"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("pg_dump"), "{e}");
}

fn approval(id: &str, token: &str, params: &str) -> tokengate::store::ApprovalRow {
    tokengate::store::ApprovalRow {
        id: id.into(),
        rule: "deploy".into(),
        params: params.into(),
        message: "release".into(),
        token_id: token.into(),
        token_prefix: "tg_x".into(),
        account: "ci".into(),
        status: "pending".into(),
        requested_at: 10,
        decided_at: None,
        decided_by: None,
        note: None,
        window_ms: 900_000,
        expires_at: None,
        used_count: 0,
        last_used_at: None,
    }
}

fn approvals_are_decided_once_and_used_inside_their_window(s: &Store) {
    let billing = r#"{"app":"billing"}"#;
    s.approval_insert(&approval("apr_1", "tok_1", billing))
        .unwrap();
    s.approval_insert(&approval("apr_2", "tok_2", billing))
        .unwrap();
    assert!(
        !s.approval_use("apr_1", 20).unwrap(),
        "pending is not usable"
    );
    assert!(
        s.approval_transition(
            "apr_1",
            "pending",
            "approved",
            Some(20),
            Some("ops"),
            Some("ok"),
            Some(100)
        )
        .unwrap()
    );
    assert!(
        !s.approval_transition(
            "apr_1",
            "pending",
            "rejected",
            Some(21),
            Some("x"),
            None,
            None
        )
        .unwrap(),
        "decided once"
    );
    assert!(s.approval_use("apr_1", 50).unwrap());
    assert!(!s.approval_use("apr_1", 100).unwrap(), "window ended");
    let a = s.approval_get("apr_1").unwrap().unwrap();
    assert_eq!(a.status, "approved");
    assert_eq!(
        (a.used_count, a.last_used_at, a.expires_at),
        (1, Some(50), Some(100))
    );
    assert_eq!(
        (a.decided_by.as_deref(), a.note.as_deref()),
        (Some("ops"), Some("ok"))
    );
    assert_eq!(
        s.approval_bound("tok_1", "deploy", billing).unwrap().len(),
        1
    );
    assert!(
        s.approval_bound("tok_1", "deploy", r#"{"app":"web"}"#)
            .unwrap()
            .is_empty()
    );
    assert!(
        s.approval_bound("tok_1", "restart", billing)
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.approval_list(None, 10).unwrap().len(), 2);
    assert_eq!(s.approval_list(Some("tok_2"), 10).unwrap()[0].id, "apr_2");
    assert!(s.approval_get("apr_9").unwrap().is_none());
    assert!(
        s.approval_transition("apr_1", "approved", "expired", None, None, None, None)
            .unwrap()
    );
    assert!(
        s.approval_bound("tok_1", "deploy", billing)
            .unwrap()
            .is_empty()
    );
}

fn mfa_steps_only_go_up_and_recovery_codes_are_single_use(s: &Store) {
    let r = tokengate::store::MfaRow {
        account_id: "acc_1".into(),
        secret: vec![0, 1, 2, 255],
        active: false,
        last_step: 0,
        created_at: 1,
        recovery: vec!["h1".into(), "h2".into()],
    };
    assert!(s.mfa_begin(&r).unwrap());
    assert!(
        s.mfa_begin(&r).unwrap(),
        "an unconfirmed enrolment restarts"
    );
    assert!(s.mfa_activate("acc_1").unwrap());
    assert!(!s.mfa_begin(&r).unwrap(), "an active one is kept");
    assert!(s.mfa_use_step("acc_1", 5).unwrap());
    assert!(!s.mfa_use_step("acc_1", 5).unwrap(), "replay");
    assert!(!s.mfa_use_step("acc_1", 4).unwrap());
    assert!(s.mfa_use_recovery("acc_1", "h1").unwrap());
    assert!(!s.mfa_use_recovery("acc_1", "h1").unwrap());
    let got = s.mfa_get("acc_1").unwrap().unwrap();
    assert_eq!(got.secret, vec![0, 1, 2, 255]);
    assert_eq!(
        (got.active, got.last_step, got.recovery),
        (true, 5, vec!["h2".to_string()])
    );
    // `store copy` carries both tables (secrets still sealed) to another engine's empty store.
    s.approval_insert(&approval("apr_c", "tok_1", "{}"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = Store::open(&dir.path().join("copy.db"), Duration::from_millis(250)).unwrap();
    s.copy_to(&dest).unwrap();
    assert_eq!(dest.mfa_all().unwrap(), s.mfa_all().unwrap());
    assert_eq!(dest.approval_all().unwrap(), s.approval_all().unwrap());
    assert!(matches!(s.copy_to(&dest), Err(StoreError::NotEmpty { .. })));
    assert!(s.mfa_remove("acc_1").unwrap());
    assert!(s.mfa_get("acc_1").unwrap().is_none());
}

/// `tokengate_store_writes_total` means the same on both engines: purging sessions is two writes
/// (the expired sessions, then the ended sign-ins), whichever engine holds them.
fn purging_sessions_counts_its_writes_on_either_engine(s: &Store) {
    let writes = s.write_count();
    assert!(s.session_purge(10_000, 0).unwrap().is_empty());
    assert_eq!(
        s.write_count() - writes,
        2,
        "the session delete and the sign-in sweep"
    );
}

fn reading_sessions_takes_no_write(s: &Store) {
    let row = SessionRow {
        id_hash: "h1".into(),
        public_id: "ses_1".into(),
        owner: "token:tok_1".into(),
        kind: "token".into(),
        token_id: Some("tok_1".into()),
        subject: None,
        email: None,
        account: None,
        access: "self".into(),
        csrf: "c".into(),
        created_at: 1,
        last_seen_at: 1,
        expires_at: 100,
        mfa_verified_at: None,
        client_ip: None,
        user_agent: None,
    };
    s.session_insert(&row).unwrap();
    let writes = s.write_count();
    assert_eq!(s.session_get("h1").unwrap(), Some(row.clone()));
    assert_eq!(s.session_list("token:tok_1").unwrap(), vec![row.clone()]);
    assert_eq!(s.session_list_all().unwrap(), vec![row]);
    assert_eq!(s.write_count(), writes, "reads run on a reader");
    s.session_touch("h1", 5).unwrap();
    assert_eq!(s.write_count(), writes + 1);
    assert_eq!(
        s.session_get("h1").unwrap().unwrap().last_seen_at,
        5,
        "a read sees the write before it"
    );
}
