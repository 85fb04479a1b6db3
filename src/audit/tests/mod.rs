//! Unit tests of the audit room: shared helpers here, one file per part.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::line::*;
use super::reader::*;
use super::sink::*;
use super::verify::*;
use super::writer::*;
use super::*;
use std::collections::HashSet;
use std::sync::atomic::AtomicBool;

// ---- helpers -----------------------------------------------------------------------------

fn req(id: &str) -> RequestRecord {
    RequestRecord {
        timestamp: now_rfc3339(),
        request_id: id.to_owned(),
        auth_type: "api_token".into(),
        api_token_id: Some("tok_1".into()),
        api_token_name: Some("ci-deploy".into()),
        token_prefix: Some("tg_AbCdEfGh".into()),
        account: Some("alice".into()),
        method: "GET".into(),
        path: "/apps/billing/status".into(),
        status_code: 200,
        rbac_decision: "allow".into(),
        reason: "ok".into(),
        permission: Some("apps:read".into()),
        rule: Some("api GET /apps/{app}/**".into()),
        shadow_decision: None,
        client_ip: "192.0.2.7".into(),
        user_agent: Some("curl/8.5".into()),
        upstream: Some("http://127.0.0.1:5000".into()),
        duration_ms: 1.25,
        mode: None,
        phase: None,
        trace_id: None,
    }
}

fn cfg(path: &Path) -> AuditConfig {
    AuditConfig {
        path: Some(path.to_owned()),
        ..AuditConfig::default()
    }
}

/// An audit log at `path` that rotates once a file would pass `max_bytes`.
fn open_rotating(path: &Path, max_bytes: u64) -> AuditLog {
    AuditLog::open(AuditConfig {
        max_bytes: Some(max_bytes),
        ..cfg(path)
    })
    .unwrap()
}

/// The rotated files that exist, oldest first, then the current file.
fn rotation_set(path: &Path) -> Vec<PathBuf> {
    let mut set: Vec<PathBuf> = (1..=ROTATE_KEEP)
        .rev()
        .map(|n| rotated_name(path, n))
        .filter(|p| p.exists())
        .collect();
    set.push(path.to_owned());
    set
}

fn write_n(log: &AuditLog, prefix: &str, n: usize) {
    for i in 0..n {
        log.record(req(&format!("{prefix}{i}")).into()).unwrap();
    }
    log.flush().unwrap();
}

fn lines_of(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Empties the file in place, as logrotate's `copytruncate` does.
fn truncate_in_place(path: &Path) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(0)
        .unwrap();
}

fn set_lines(path: &Path, lines: &[String]) {
    fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

fn request_ids(paths: &[PathBuf]) -> Vec<String> {
    let mut ids = Vec::new();
    for p in paths {
        for l in lines_of(p) {
            if let Ok(Entry::Request(r)) = serde_json::from_str::<Entry>(&l) {
                ids.push(r.request_id);
            }
        }
    }
    ids
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A fresh temporary directory and the `audit.log` path in it (the file not yet created); the
/// directory is removed when the returned guard drops.
fn temp_log_path() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    (dir, path)
}

/// A log of `n` request lines, written and closed.
fn make_log(n: usize) -> (tempfile::TempDir, PathBuf) {
    let (dir, path) = temp_log_path();
    let log = AuditLog::open(cfg(&path)).unwrap();
    write_n(&log, "r", n);
    log.shutdown();
    (dir, path)
}

/// `verify` passes on `paths` with `lines` lines and an intact chain; its report.
fn assert_intact(paths: &[PathBuf], lines: u64) -> VerifyReport {
    let report = verify(paths).unwrap();
    assert_eq!(
        report.to_string(),
        format!("OK: {lines} lines, chain intact")
    );
    report
}

fn problem(paths: &[PathBuf]) -> VerifyProblem {
    let report = verify(paths).unwrap();
    let shown = report.to_string();
    report
        .problem
        .unwrap_or_else(|| panic!("expected a problem, got {shown}"))
}

/// Fails writes on demand: ENOSPC, optionally after a short write, optionally with truncation failing too.
#[derive(Default)]
struct Faults {
    failing: AtomicBool,
    partial: AtomicBool,
    truncate_fails: AtomicBool,
}

struct FaultySink {
    inner: FileSink,
    faults: Arc<Faults>,
    err_next: bool,
}

impl Sink for FaultySink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let enospc =
            || io::Error::new(io::ErrorKind::StorageFull, "No space left on device (test)");
        if std::mem::take(&mut self.err_next) {
            return Err(enospc());
        }
        if self.faults.failing.load(Ordering::SeqCst) {
            if self.faults.partial.load(Ordering::SeqCst) && buf.len() > 1 {
                // A real disk fills mid-write: a short write, then ENOSPC.
                let n = self.inner.write(&buf[..buf.len() / 2])?;
                self.err_next = true;
                return Ok(n);
            }
            return Err(enospc());
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
    fn size(&self) -> io::Result<Option<u64>> {
        self.inner.size()
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        if self.faults.truncate_fails.load(Ordering::SeqCst) {
            return Err(io::Error::other("truncate refused (test)"));
        }
        self.inner.truncate(len)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.inner.sync()
    }
}

fn faulty(cfg: AuditConfig) -> (AuditLog, Arc<Faults>) {
    let faults = Arc::new(Faults::default());
    let f = faults.clone();
    let opener: Opener = Arc::new(move |p: &Path| {
        Ok(Box::new(FaultySink {
            inner: FileSink(open_append(p)?),
            faults: f.clone(),
            err_next: false,
        }) as Box<dyn Sink>)
    });
    let log = AuditLog::open_with(
        cfg,
        WriterOptions {
            opener,
            retry: Duration::from_millis(10),
        },
    )
    .unwrap();
    (log, faults)
}

/// A `Write` shared with a `follow` thread.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SharedBuf {
    fn text(&self) -> String {
        String::from_utf8(lock(&self.0).clone()).unwrap()
    }
}

mod inline;
mod json;
mod reader;
mod verify;
mod writer;
