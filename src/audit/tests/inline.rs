//! Write-ahead lines written by the request itself (`Reservation::commit` on an idle, healthy
//! writer), beside the writer thread's queue: order, chain, failures, and the tracked file length.

use super::*;

fn decision(id: &str) -> Entry {
    let mut r = req(id);
    r.status_code = 0;
    r.phase = Some("decision".into());
    r.into()
}

/// A single-line record (no completion expected), committed write-ahead.
fn line(id: &str) -> Entry {
    req(id).into()
}

fn completion(id: &str) -> Entry {
    Entry::Completion(CompletionRecord {
        request_id: id.to_owned(),
        status_code: 200,
        reason: "ok".into(),
        outcome: "complete".into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn an_idle_writer_lets_the_request_write_its_own_line() {
    let (_dir, path) = temp_log_path();
    let log = AuditLog::open(cfg(&path)).unwrap();
    wait_until("the writer parked", || log.writer_parked());
    for i in 0..3 {
        let durable = log.reserve().unwrap().commit(line(&format!("d{i}")));
        assert!(durable.settled(), "written by commit itself");
        // On file before anything is awaited: the writer thread took no part.
        assert_eq!(lines_of(&path).len(), i + 1);
        durable.written().await.unwrap();
    }
    assert!(log.writer_parked(), "nobody woke the writer");
    assert_eq!(log.queue_depth(), 0);
    assert_eq!(log.lines_written(), 3);
    // The slots were given back: a queue of 1 still takes a record.
    log.flush().unwrap();
    log.shutdown();
    assert_intact(std::slice::from_ref(&path), 3);
    assert_eq!(request_ids(&[path]), ["d0", "d1", "d2"]);
}

#[test]
fn inline_and_queued_lines_from_many_threads_keep_one_chain() {
    let (_dir, path) = temp_log_path();
    let log = AuditLog::open(cfg(&path)).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let mut inline = 0;
                for i in 0..2_000 {
                    let id = format!("{t}-{i}");
                    let durable = log.reserve().unwrap().commit(decision(&id));
                    inline += usize::from(durable.settled());
                    rt.block_on(durable.written()).unwrap();
                    log.reserve().unwrap().send(completion(&id));
                }
                inline
            })
        })
        .collect();
    let inline: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    log.flush().unwrap();
    assert_eq!(log.lines_written(), 16_000);
    log.shutdown();
    assert_intact(std::slice::from_ref(&path), 16_000);
    // Every decision exactly once, and before its completion.
    let mut decided = HashSet::new();
    let mut completed = HashSet::new();
    for l in lines_of(&path) {
        match serde_json::from_str::<Entry>(&l).unwrap() {
            Entry::Request(r) => assert!(decided.insert(r.request_id)),
            Entry::Completion(c) => {
                assert!(
                    decided.contains(&c.request_id),
                    "{} completed first",
                    c.request_id
                );
                assert!(completed.insert(c.request_id));
            }
            Entry::Admin(_) => panic!("no admin lines here"),
        }
    }
    assert_eq!((decided.len(), completed.len()), (8_000, 8_000));
    // Not a timing claim, a sanity check that the inline path ran at all.
    assert!(inline > 0);
}

#[tokio::test]
async fn a_failed_inline_write_refuses_the_request_and_the_line_is_written_on_recovery() {
    let (_dir, path) = temp_log_path();
    let (log, faults) = faulty(cfg(&path));
    write_n(&log, "ok", 2);
    wait_until("the writer parked", || log.writer_parked());
    // A real disk fills mid-write: half the line, then ENOSPC.
    faults.partial.store(true, Ordering::SeqCst);
    faults.failing.store(true, Ordering::SeqCst);
    let durable = log.reserve().unwrap().commit(line("failed"));
    assert!(durable.settled());
    assert!(matches!(
        durable.written().await,
        Err(AuditError::Unavailable {
            cause: UnavailableCause::Failing
        })
    ));
    assert!(!log.is_healthy());
    assert!(log.reserve().is_err(), "reject mode refuses while failing");
    assert_eq!(log.queue_depth(), 1, "the line waits in memory");
    // The half line was cut back: the file still ends on a complete line.
    assert!(ends_with_newline(&path).unwrap());
    assert_eq!(lines_of(&path).len(), 2);
    wait_until("retries", || log.write_failures() >= 3);

    faults.failing.store(false, Ordering::SeqCst);
    // `flush` waits for the line although it holds no ticket of the queue.
    log.flush().unwrap();
    assert!(log.is_healthy());
    assert_eq!(log.queue_depth(), 0);
    log.reserve()
        .unwrap()
        .commit(line("after"))
        .written()
        .await
        .unwrap();
    log.shutdown();
    assert_eq!(
        request_ids(std::slice::from_ref(&path)),
        ["ok0", "ok1", "failed", "after"]
    );
    assert_intact(&[path], 4);
}

#[tokio::test]
async fn continue_mode_serves_through_a_failed_inline_write() {
    let (_dir, path) = temp_log_path();
    let (log, faults) = faulty(AuditConfig {
        on_failure: OnFailure::Continue,
        ..cfg(&path)
    });
    write_n(&log, "ok", 1);
    wait_until("the writer parked", || log.writer_parked());
    faults.failing.store(true, Ordering::SeqCst);
    let durable = log.reserve().unwrap().commit(line("kept"));
    assert!(durable.settled());
    durable.written().await.unwrap();
    assert!(!log.is_healthy());
    // While failing, later records queue behind it (no inline write while a line waits).
    let later = log.reserve().unwrap().commit(line("queued"));
    assert!(!later.settled());
    later.written().await.unwrap();
    wait_until("retries", || log.write_failures() >= 2);
    faults.failing.store(false, Ordering::SeqCst);
    log.flush().unwrap();
    log.shutdown();
    assert_eq!(
        request_ids(std::slice::from_ref(&path)),
        ["ok0", "kept", "queued"]
    );
    assert_intact(&[path], 3);
}

#[test]
fn a_file_cut_behind_the_writers_back_is_not_rotated_or_padded() {
    // logrotate's copytruncate: the file is emptied while the writer holds it open in append
    // mode. The writer tracks the length it wrote; before rotating it asks the file.
    let (_dir, path) = temp_log_path();
    let probe = {
        let (_d, p) = make_log(1);
        fs::metadata(&p).unwrap().len()
    };
    let log = open_rotating(&path, probe * 7 / 2);
    write_n(&log, "a", 3);
    truncate_in_place(&path);
    write_n(&log, "b", 3);
    log.shutdown();
    assert!(
        !rotated_name(&path, 1).exists(),
        "no rotation: the file holds 3 lines"
    );
    let bytes = fs::read(&path).unwrap();
    assert!(!bytes.contains(&0), "no hole of zeros");
    assert_eq!(request_ids(&[path]), ["b0", "b1", "b2"]);
}

#[tokio::test]
async fn an_inline_line_never_overtakes_records_queued_before_it() {
    let (_dir, path) = temp_log_path();
    let log = AuditLog::open(cfg(&path)).unwrap();
    for round in 0..50 {
        // Queued (a refusal, a completion), then committed write-ahead: whoever writes them, the
        // writer thread or the committing request, the file has them in this order.
        log.reserve()
            .unwrap()
            .send(req(&format!("q{round}a")).into());
        log.reserve()
            .unwrap()
            .send(completion(&format!("q{round}b")));
        let d = log.reserve().unwrap().commit(line(&format!("d{round}")));
        d.written().await.unwrap();
    }
    log.flush().unwrap();
    log.shutdown();
    let mut want = Vec::new();
    for round in 0..50 {
        want.extend([
            format!("q{round}a"),
            format!("q{round}b"),
            format!("d{round}"),
        ]);
    }
    let got: Vec<String> = lines_of(&path)
        .iter()
        .map(|l| match serde_json::from_str::<Entry>(l).unwrap() {
            Entry::Request(r) => r.request_id,
            Entry::Completion(c) => c.request_id,
            Entry::Admin(a) => a.event,
        })
        .collect();
    assert_eq!(got, want);
    assert_intact(&[path], 150);
}
