//! Unit tests of the audit writer: reservations, rotation, failure handling.

use super::*;

#[test]
fn line_layout_kind_first_seq_and_chain_last() {
    let (_dir, path) = make_log(2);
    let lines = lines_of(&path);
    assert!(
        lines[0].starts_with(r#"{"kind":"request","timestamp":""#),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains(r#""shadow_decision":null"#),
        "options serialize as null"
    );
    // The chain formula, recomputed by hand from the documented definition.
    let mut prev = GENESIS_CHAIN.to_owned();
    for (i, line) in lines.iter().enumerate() {
        let at = line.rfind(r#","chain":""#).unwrap();
        let without = format!("{}}}", &line[..at]);
        assert!(
            without.ends_with(&format!(r#","seq":{}}}"#, i + 1)),
            "{without}"
        );
        let expect = chain_hex(prev.as_bytes(), &[without.as_bytes()]);
        assert_eq!(&line[at..], format!(r#","chain":"{expect}"}}"#));
        prev = expect;
    }
    // Round trip through the public types.
    let Entry::Request(r) = serde_json::from_str::<Entry>(&lines[1]).unwrap() else {
        panic!("kind")
    };
    assert_eq!(r.request_id, "r1");
}

#[test]
fn admin_lines_and_query_string_safety_net() {
    let (_dir, path) = temp_log_path();
    let log = AuditLog::open(cfg(&path)).unwrap();
    let mut r = req("q");
    r.path = "/apps/x?access_token=secret".into();
    log.record(r.into()).unwrap();
    log.record(
        AdminRecord {
            event: "token.revoked".into(),
            actor: "alice".into(),
            auth_type: "cli".into(),
            ..Default::default()
        }
        .into(),
    )
    .unwrap();
    log.shutdown();
    let text = fs::read_to_string(&path).unwrap();
    assert!(!text.contains("secret") && !text.contains('?'), "{text}");
    let admin = text.lines().nth(1).unwrap();
    assert!(
        admin.starts_with(r#"{"kind":"admin","timestamp":"2"#),
        "timestamp filled in: {admin}"
    );
    assert!(verify(&[path]).unwrap().is_ok());
}

// ---- chain across restarts ---------------------------------------------------------------------

#[test]
fn chain_continues_across_open() {
    let (_dir, path) = temp_log_path();
    for round in 0..3 {
        let log = AuditLog::open(cfg(&path)).unwrap();
        write_n(&log, &format!("round{round}-"), 4);
        assert_eq!(log.lines_written(), 4);
        drop(log); // dropping the last handle shuts the writer down
    }
    assert_eq!(assert_intact(std::slice::from_ref(&path), 12).lines, 12);
}

#[test]
fn torn_tail_is_left_and_chain_continues_on_a_fresh_line() {
    let (_dir, path) = make_log(3);
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(br#"{"kind":"request","timestamp":"2026-"#)
        .unwrap(); // crash mid-line
    drop(f);
    for _ in 0..2 {
        let log = AuditLog::open(cfg(&path)).unwrap();
        write_n(&log, "after", 2);
        log.shutdown();
    }
    let lines = lines_of(&path);
    assert_eq!(lines.len(), 8, "3 + remnant + 2 + 2");
    assert_eq!(
        lines[3], r#"{"kind":"request","timestamp":"2026-"#,
        "remnant left in place"
    );
    let report = verify(std::slice::from_ref(&path)).unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.lines, 7);
    assert_eq!(report.torn_skipped, vec![(path.clone(), 4)]);
    assert!(
        report.to_string().contains("skipped 1 incomplete line"),
        "{report}"
    );
}

#[test]
fn torn_end_of_a_rotated_file_is_a_remnant_if_the_next_file_continues() {
    // Crash mid-line, then logrotate moved the file before the restart wrote anything.
    let (_dir, path) = make_log(3);
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(br#"{"kind":"adm"#).unwrap();
    drop(f);
    let older = rotated_name(&path, 1);
    fs::rename(&path, &older).unwrap();
    let log = AuditLog::open(cfg(&path)).unwrap();
    write_n(&log, "new", 2);
    log.shutdown();
    let set = vec![older.clone(), path.clone()];
    let report = verify(&set).unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.lines, 5);
    assert_eq!(report.torn_skipped, vec![(older.clone(), 4)]);
    // If what follows does not continue the chain, the torn end is the problem reported.
    let mut lines = lines_of(&path);
    lines.remove(0);
    set_lines(&path, &lines);
    assert_eq!(
        problem(&set),
        VerifyProblem::TornLastLine {
            file: older,
            line_no: 4
        }
    );
}

#[test]
fn reopen_of_an_empty_file_continues_from_dot_one() {
    // logrotate `create` mode, then a restart before anything was written to the new file.
    let (dir, path) = make_log(3);
    fs::rename(&path, rotated_name(&path, 1)).unwrap();
    File::create(&path).unwrap();
    let log = AuditLog::open(cfg(&path)).unwrap();
    write_n(&log, "new", 2);
    log.shutdown();
    assert_intact(&[dir.path().join("audit.log.1"), path.clone()], 5);
}

#[test]
fn reopen_follows_external_rotation() {
    let (_dir, path) = temp_log_path();
    let log = AuditLog::open(cfg(&path)).unwrap();
    write_n(&log, "a", 3);
    fs::rename(&path, rotated_name(&path, 1)).unwrap();
    write_n(&log, "b", 2); // before SIGHUP: still lands in the renamed file
    log.reopen();
    write_n(&log, "c", 2);
    log.shutdown();
    let set = vec![rotated_name(&path, 1), path.clone()];
    assert_eq!(lines_of(&set[0]).len(), 5);
    assert_eq!(lines_of(&path).len(), 2);
    assert_intact(&set, 7);
}

// ---- rotation --------------------------------------------------------------------------------

#[test]
fn rotation_by_size_keeps_five_and_verifies_oldest_first() {
    let (_dir, path) = temp_log_path();
    let max = 1_500;
    let log = open_rotating(&path, max);
    write_n(&log, "a", 8);
    let line_len = lines_of(&path)[0].len() as u64 + 1;
    assert!(line_len < max);
    write_n(&log, "b", 30);
    log.shutdown();
    let set = rotation_set(&path);
    assert_eq!(set.len(), ROTATE_KEEP as usize + 1, "{set:?}");
    assert!(
        !rotated_name(&path, ROTATE_KEEP + 1).exists(),
        "only 5 kept"
    );
    for p in &set {
        let len = fs::metadata(p).unwrap().len();
        assert!(len <= max, "{} is {len} bytes", p.display());
        assert!(len > 0);
    }
    // The oldest files were deleted by retention: strict verify says so, partial start passes.
    assert!(matches!(
        problem(&set),
        VerifyProblem::TruncatedStart { .. }
    ));
    let report = verify_with(
        &set,
        VerifyOptions {
            allow_partial_start: true,
        },
    )
    .unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(
        report.first_seq.unwrap() + report.lines - 1,
        38,
        "ends at the last seq"
    );

    // A restart continues the chain into the current file.
    let log = open_rotating(&path, max);
    write_n(&log, "c", 1);
    log.shutdown();
    let set = rotation_set(&path);
    assert_eq!(set.len(), ROTATE_KEEP as usize + 1, "{set:?}");
    assert!(
        verify_with(
            &set,
            VerifyOptions {
                allow_partial_start: true
            }
        )
        .unwrap()
        .is_ok()
    );
}

// ---- failures --------------------------------------------------------------------------------

#[test]
fn reject_mode_refuses_while_failing_and_recovers_without_loss() {
    let (_dir, path) = temp_log_path();
    let (log, faults) = faulty(cfg(&path));
    write_n(&log, "ok", 3);
    faults.partial.store(true, Ordering::SeqCst);
    faults.failing.store(true, Ordering::SeqCst);
    log.record(req("during").into()).unwrap(); // accepted while still healthy
    wait_until("unhealthy", || !log.is_healthy());
    assert!(matches!(
        log.reserve(),
        Err(AuditError::Unavailable {
            cause: UnavailableCause::Failing
        })
    ));
    assert!(log.record(req("refused").into()).is_err());
    wait_until("retries", || log.write_failures() >= 3);
    assert_eq!(log.queue_depth(), 1);
    // The short writes were cut back: the file still ends on a complete line.
    assert!(ends_with_newline(&path).unwrap());
    assert_eq!(lines_of(&path).len(), 3);

    faults.failing.store(false, Ordering::SeqCst);
    log.flush().unwrap();
    assert!(log.is_healthy());
    write_n(&log, "later", 2);
    log.shutdown();
    assert_eq!(
        request_ids(std::slice::from_ref(&path)),
        ["ok0", "ok1", "ok2", "during", "later0", "later1"]
    );
    assert_intact(&[path], 6);
}

#[test]
fn failed_truncation_leaves_a_terminated_remnant_that_verifies() {
    let (_dir, path) = temp_log_path();
    let (log, faults) = faulty(cfg(&path));
    write_n(&log, "ok", 2);
    faults.partial.store(true, Ordering::SeqCst);
    faults.truncate_fails.store(true, Ordering::SeqCst);
    faults.failing.store(true, Ordering::SeqCst);
    log.record(req("during").into()).unwrap();
    wait_until("retries", || log.write_failures() >= 3);
    faults.failing.store(false, Ordering::SeqCst);
    log.flush().unwrap();
    write_n(&log, "later", 1);
    log.shutdown();
    assert_eq!(
        request_ids(std::slice::from_ref(&path)),
        ["ok0", "ok1", "during", "later0"]
    );
    let report = verify(std::slice::from_ref(&path)).unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.lines, 4);
    assert_eq!(report.torn_skipped, vec![(path, 3)]);
}

#[test]
fn continue_mode_keeps_accepting_counts_failures_and_is_bounded() {
    let (_dir, path) = temp_log_path();
    let (log, faults) = faulty(AuditConfig {
        on_failure: OnFailure::Continue,
        queue: 20,
        ..cfg(&path)
    });
    write_n(&log, "ok", 2);
    faults.failing.store(true, Ordering::SeqCst);
    log.record(req("c0").into()).unwrap();
    wait_until("unhealthy", || !log.is_healthy());
    for i in 1..10 {
        log.record(req(&format!("c{i}")).into()).unwrap();
    }
    wait_until("retries", || log.write_failures() >= 2);
    assert!(!log.is_healthy());
    assert_eq!(log.queue_depth(), 10);
    // Memory stays bounded: past `queue` waiting records, even continue refuses.
    let held: Vec<Reservation> = (0..10).map(|_| log.reserve().unwrap()).collect();
    assert!(matches!(
        log.reserve(),
        Err(AuditError::Unavailable {
            cause: UnavailableCause::QueueFull
        })
    ));
    drop(held); // released without writing
    faults.failing.store(false, Ordering::SeqCst);
    log.flush().unwrap();
    assert!(log.is_healthy());
    assert_eq!(log.queue_depth(), 0);
    log.shutdown();
    let ids = request_ids(std::slice::from_ref(&path));
    assert_eq!(ids.len(), 12);
    assert_eq!(
        ids[2..],
        (0..10).map(|i| format!("c{i}")).collect::<Vec<_>>()[..]
    );
    assert!(verify(&[path]).unwrap().is_ok());
}

#[test]
fn reservations_release_and_shutdown_is_idempotent() {
    let (_dir, path) = temp_log_path();
    let log = AuditLog::open(AuditConfig {
        queue: 2,
        ..cfg(&path)
    })
    .unwrap();
    let a = log.reserve().unwrap();
    let b = log.reserve().unwrap();
    assert!(matches!(
        log.reserve(),
        Err(AuditError::Unavailable {
            cause: UnavailableCause::QueueFull
        })
    ));
    drop(a);
    b.send(req("b").into());
    log.reserve().unwrap().send(req("c").into());
    log.flush().unwrap();
    assert_eq!(log.lines_written(), 2);
    let held = log.reserve().unwrap();
    let clone = log.clone();
    let t = std::thread::spawn(move || clone.shutdown());
    std::thread::sleep(Duration::from_millis(50));
    held.send(req("late-but-reserved").into()); // shutdown waits for outstanding reservations
    t.join().unwrap();
    log.shutdown();
    assert!(matches!(
        log.record(req("x").into()),
        Err(AuditError::Closed)
    ));
    assert!(log.flush().is_ok(), "everything accepted was written");
    assert_eq!(request_ids(&[path]), ["b", "c", "late-but-reserved"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_from_async_code_and_flush_async() {
    let (_dir, path) = temp_log_path();
    let log = AuditLog::open(cfg(&path)).unwrap();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let permit = log.reserve().unwrap();
                tokio::task::yield_now().await; // "forward" while holding the slot
                permit.send(req(&format!("t{t}-{i}")).into());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    log.flush_async().await.unwrap();
    assert_eq!(log.lines_written(), 200);
    assert_eq!(verify(&[path]).unwrap().lines, 200);
}

#[test]
fn concurrency_8_threads_80k_records() {
    let (_dir, path) = temp_log_path();
    let log = AuditLog::open(cfg(&path)).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..10_000 {
                    let mut r = req(&format!("{t}-{i}"));
                    loop {
                        match log.record(r.into()) {
                            Ok(()) => break,
                            // The gateway would answer 503; the test waits for room instead.
                            Err(AuditError::Unavailable {
                                cause: UnavailableCause::QueueFull,
                            }) => {
                                std::thread::sleep(Duration::from_millis(1));
                                r = req(&format!("{t}-{i}"));
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    log.flush().unwrap();
    assert_eq!(log.lines_written(), 80_000);
    log.shutdown();
    assert_intact(std::slice::from_ref(&path), 80_000);
    // seq 1..=80000 is proven by verify; each record exactly once:
    let text = fs::read_to_string(&path).unwrap();
    let ids: HashSet<&str> = text
        .lines()
        .map(|l| {
            let at = l.find(r#""request_id":""#).unwrap() + 14;
            &l[at..at + l[at..].find('"').unwrap()]
        })
        .collect();
    assert_eq!(ids.len(), 80_000, "each record exactly once");
}
