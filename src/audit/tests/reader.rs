//! Unit tests of the audit reader (`tokengate audit show` filters and table).

use super::*;

// ---- reader ----------------------------------------------------------------------------------

fn at(hour: u8) -> String {
    format!("2026-01-01T{hour:02}:00:00.000Z")
}

fn mixed_log() -> (tempfile::TempDir, PathBuf) {
    let (dir, path) = temp_log_path();
    let log = AuditLog::open(cfg(&path)).unwrap();
    let anon = |id: &str, hour, status, reason: &str, prefix: Option<&str>| RequestRecord {
        timestamp: at(hour),
        auth_type: "none".into(),
        api_token_id: None,
        api_token_name: None,
        token_prefix: prefix.map(str::to_owned),
        account: None,
        status_code: status,
        rbac_decision: "deny".into(),
        reason: reason.to_owned().into(),
        permission: None,
        ..req(id)
    };
    let web = |id: &str, hour, status, decision: &str, reason: &str, path: &str| RequestRecord {
        timestamp: at(hour),
        api_token_id: Some("tok_2".into()),
        api_token_name: Some("web-read".into()),
        token_prefix: Some("tg_QqQqQqQq".into()),
        account: Some("bob".into()),
        status_code: status,
        rbac_decision: decision.to_owned().into(),
        reason: reason.to_owned().into(),
        path: path.into(),
        ..req(id)
    };
    let entries: Vec<Entry> = vec![
        RequestRecord {
            timestamp: at(0),
            ..req("e1")
        }
        .into(),
        RequestRecord {
            timestamp: at(1),
            method: "POST".into(),
            path: "/apps/billing/deploy".into(),
            status_code: 403,
            rbac_decision: "deny".into(),
            reason: "insufficient_permission".into(),
            ..req("e2")
        }
        .into(),
        anon("e3", 2, 401, "unknown_token", Some("tg_ZzZzZzZz")).into(),
        anon("e4", 3, 401, "missing_token", None).into(),
        web("e5", 4, 200, "allow", "ok", "/health").into(),
        web("e6", 5, 429, "deny", "rate_limited", "/apps/web").into(),
        AdminRecord {
            timestamp: at(6),
            event: "token.revoked".into(),
            actor: "alice".into(),
            auth_type: "cli".into(),
            target: Some("tok_1".into()),
            account: Some("alice".into()),
            api_token_id: Some("tok_1".into()),
            token_prefix: Some("tg_AbCdEfGh".into()),
            reason: Some("leaked".into()),
            client_ip: None,
            details: None,
        }
        .into(),
        AdminRecord {
            timestamp: at(7),
            event: "account.created".into(),
            actor: "root".into(),
            auth_type: "cli".into(),
            target: Some("carol".into()),
            account: Some("carol".into()),
            ..Default::default()
        }
        .into(),
        web("e9", 8, 502, "allow", "upstream_error", "/apps/web").into(),
    ];
    for e in entries {
        log.record(e).unwrap();
    }
    log.shutdown();
    (dir, path)
}

fn run_query(path: &Path, filter: &Filter) -> (u64, Vec<String>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let n = query(
        &[path.to_owned()],
        filter,
        OutputFormat::Json,
        &mut out,
        &mut err,
    )
    .unwrap();
    assert!(err.is_empty(), "{}", String::from_utf8_lossy(&err));
    let text = String::from_utf8(out).unwrap();
    let ids = text
        .lines()
        .map(|l| match serde_json::from_str::<Entry>(l).unwrap() {
            Entry::Request(r) => r.request_id,
            Entry::Admin(a) => a.event,
            Entry::Completion(c) => c.request_id,
        })
        .collect::<Vec<_>>();
    assert_eq!(ids.len() as u64, n);
    (n, ids)
}

/// A filter on one text field.
fn by(field: &str, value: &str) -> Filter {
    let mut f = Filter::default();
    let slot = match field {
        "token" => &mut f.token,
        "account" => &mut f.account,
        "decision" => &mut f.decision,
        "reason" => &mut f.reason,
        "status" => &mut f.status,
        "event" => &mut f.event,
        other => panic!("no text filter {other}"),
    };
    *slot = Some(value.to_owned());
    f
}

#[test]
fn query_filters() {
    let (_dir, path) = mixed_log();
    let q = |f: Filter| run_query(&path, &f).1;
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(q(Filter::default()).len(), 9);
    for (field, value, want) in [
        ("token", "ci-deploy", &["e1", "e2"][..]),
        ("token", "tok_1", &["e1", "e2", "token.revoked"][..]),
        ("token", "tg_AbCd", &["e1", "e2", "token.revoked"][..]),
        ("token", "tg_ZzZzZzZz", &["e3"][..]),
        ("account", "bob", &["e5", "e6", "e9"][..]),
        ("decision", "deny", &["e2", "e3", "e4", "e6"][..]),
        ("reason", "unknown_token", &["e3"][..]),
        ("reason", "leaked", &["token.revoked"][..]),
        ("status", "403", &["e2"][..]),
        ("status", "4xx", &["e2", "e3", "e4", "e6"][..]),
        ("status", "5XX", &["e9"][..]),
        ("event", "token.revoked", &["token.revoked"][..]),
        ("event", "account.*", &["account.created"][..]),
    ] {
        assert_eq!(q(by(field, value)), want, "{field} = {value}");
    }
    let t = |h| OffsetDateTime::parse(&at(h), &Rfc3339).unwrap();
    assert_eq!(
        q(Filter {
            since: Some(t(2)),
            until: Some(t(5)),
            ..Default::default()
        }),
        ["e3", "e4", "e5"]
    );
    assert_eq!(
        q(Filter {
            since: Some(t(7)),
            ..Default::default()
        }),
        ["account.created", "e9"]
    );
    assert_eq!(
        q(Filter {
            account: s("alice"),
            decision: s("deny"),
            ..Default::default()
        }),
        ["e2"]
    );
    for bad in [by("status", "4x"), by("decision", "maybe")] {
        let r = query(
            std::slice::from_ref(&path),
            &bad,
            OutputFormat::Json,
            &mut Vec::new(),
            &mut Vec::new(),
        );
        assert!(matches!(r, Err(AuditError::Filter(_))));
    }
    // JSON output is the original lines, byte for byte.
    let mut out = Vec::new();
    query(
        std::slice::from_ref(&path),
        &Filter::default(),
        OutputFormat::Json,
        &mut out,
        &mut Vec::new(),
    )
    .unwrap();
    assert_eq!(out, fs::read(&path).unwrap());
}

#[test]
fn query_table_columns() {
    let (_dir, path) = mixed_log();
    let mut out = Vec::new();
    let f = Filter {
        since: parse_time_arg("2026-01-01T01:00:00Z", OffsetDateTime::now_utc()).ok(),
        ..Default::default()
    };
    let n = query(&[path], &f, OutputFormat::Table, &mut out, &mut Vec::new()).unwrap();
    assert_eq!(n, 8);
    let text = String::from_utf8(out).unwrap();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "TIME",
            "STATUS",
            "DECISION",
            "REASON",
            "METHOD",
            "PATH",
            "TOKEN",
            "ACCOUNT",
            "CLIENT_IP"
        ]
    );
    assert_eq!(
        rows[1],
        [
            &at(1) as &str,
            "403",
            "deny",
            "insufficient_permission",
            "POST",
            "/apps/billing/deploy",
            "ci-deploy",
            "alice",
            "192.0.2.7"
        ]
    );
    assert_eq!(
        rows[3],
        [
            &at(3) as &str,
            "401",
            "deny",
            "missing_token",
            "GET",
            "/apps/billing/status",
            "-",
            "-",
            "192.0.2.7"
        ]
    );
    // Admin lines: event (and target) in place of method/path.
    assert_eq!(
        rows[6],
        [
            &at(6) as &str,
            "-",
            "-",
            "leaked",
            "token.revoked",
            "tok_1",
            "tg_AbCdEfGh",
            "alice",
            "-"
        ]
    );
    // Columns line up: every request row has STATUS at the same offset.
    let status_at = text.lines().next().unwrap().find("STATUS").unwrap();
    assert_eq!(
        &text.lines().nth(1).unwrap()[status_at..status_at + 3],
        "403"
    );
    assert_eq!(&text.lines().nth(6).unwrap()[status_at..status_at + 1], "-");
}

#[test]
fn query_reports_bad_and_torn_lines() {
    let (_dir, path) = make_log(3);
    let mut lines = lines_of(&path);
    lines.insert(1, "garbage".into());
    let mut text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    text.push_str(r#"{"kind":"req"#);
    fs::write(&path, text).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let n = query(
        std::slice::from_ref(&path),
        &Filter::default(),
        OutputFormat::Json,
        &mut out,
        &mut err,
    )
    .unwrap();
    assert_eq!(n, 3);
    let err = String::from_utf8(err).unwrap();
    assert!(
        err.contains("audit.log:2: skipped: not a JSON audit record"),
        "{err}"
    );
    assert!(
        err.contains("audit.log:5: skipped: incomplete last line"),
        "{err}"
    );
}

#[test]
fn table_escapes_control_characters() {
    let v = View {
        path: Some("/x\u{1b}[31m".into()),
        kind: Some("request".into()),
        ..Default::default()
    };
    let mut out = Vec::new();
    write_table_row(&mut out, &v).unwrap();
    let s = String::from_utf8(out).unwrap();
    assert!(s.contains("/x?[31m") && !s.contains('\u{1b}'), "{s:?}");
}

#[test]
fn time_arguments() {
    let now = time::macros::datetime!(2026-11-23 05:00:00 UTC);
    for (arg, want) in [
        ("1h", time::macros::datetime!(2026-11-23 04:00:00 UTC)),
        ("30m", time::macros::datetime!(2026-11-23 04:30:00 UTC)),
        ("7d", time::macros::datetime!(2026-11-16 05:00:00 UTC)),
        ("45s", time::macros::datetime!(2026-11-23 04:59:15 UTC)),
        (
            "2026-11-23T06:01:02+01:00",
            time::macros::datetime!(2026-11-23 05:01:02 UTC),
        ),
    ] {
        assert_eq!(parse_time_arg(arg, now).unwrap(), want, "{arg}");
    }
    for bad in [
        "",
        "h",
        "1y",
        "-1h",
        "yesterday",
        "1é",
        "99999999999999999d",
    ] {
        assert!(parse_time_arg(bad, now).is_err(), "{bad:?}");
    }
}

#[test]
fn follow_prints_new_lines_across_rotation_and_truncation() {
    let (_dir, path) = temp_log_path();
    let log = open_rotating(&path, 3_000);
    write_n(&log, "a", 3);
    let per_file = 3_000 / (lines_of(&path)[0].len() + 1);

    let stop = Arc::new(AtomicBool::new(false));
    let (out, err) = (SharedBuf::default(), SharedBuf::default());
    let handle = {
        let (stop, path, mut out, mut err) = (stop.clone(), path.clone(), out.clone(), err.clone());
        std::thread::spawn(move || {
            let stop_fn = || stop.load(Ordering::SeqCst);
            follow_with(
                &path,
                &Filter::default(),
                OutputFormat::Json,
                &mut out,
                &mut err,
                &stop_fn,
            )
        })
    };
    let has = |id: &str| out.text().contains(&format!(r#""request_id":"{id}""#));
    wait_until("existing lines", || has("a2"));

    // Enough to rotate exactly once.
    write_n(&log, "b", per_file);
    assert!(rotated_name(&path, 1).exists());
    assert!(!rotated_name(&path, 2).exists());
    wait_until("lines after rotation", || {
        has(&format!("b{}", per_file - 1))
    });

    // copytruncate-style: truncated in place, then written again.
    log.shutdown();
    truncate_in_place(&path);
    let log = AuditLog::open(cfg(&path)).unwrap();
    write_n(&log, "c", 1);
    wait_until("lines after truncation", || has("c0"));

    stop.store(true, Ordering::SeqCst);
    handle.join().unwrap().unwrap();
    let text = out.text();
    for id in (0..3)
        .map(|i| format!("a{i}"))
        .chain((0..per_file).map(|i| format!("b{i}")))
        .chain(["c0".into()])
    {
        assert_eq!(
            text.matches(&format!(r#""request_id":"{id}""#)).count(),
            1,
            "{id} exactly once"
        );
    }
    assert!(err.text().is_empty(), "{}", err.text());
}
