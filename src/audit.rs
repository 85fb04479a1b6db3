//! Audit log (SPEC §7): bounded writer, hash chain, verification and the operator reader.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::token::hex;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Default for [`AuditConfig::queue`]: records accepted but not yet written.
pub const DEFAULT_QUEUE: usize = 65_536;
/// How many size-rotated files are kept (`audit.log.1` ..= `audit.log.5`).
pub const ROTATE_KEEP: u32 = 5;
/// The `prev` of the first line of a brand-new log.
pub const GENESIS_CHAIN: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// While writes fail, the writer retries this often.
const RETRY_INTERVAL: Duration = Duration::from_millis(250);
/// Failure alerts (and failed-rotation warnings) are logged at most this often.
const ALERT_INTERVAL: Duration = Duration::from_secs(10);
/// At shutdown, how long the writer keeps retrying a failing sink / waiting for outstanding
/// reservations before it gives up (and logs how many records were lost).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// After a round that wrote records, the writer naps this long before taking the next batch,
/// without asking producers to wake it: under load a request then costs a push under an
/// uncontended mutex instead of a futex wake and two context switches. Bounds how long a line
/// waits in memory while the writer is busy; an idle writer is woken by the first record at once.
const BATCH_WINDOW: Duration = Duration::from_millis(2);
/// Producers wake a napping writer early once this many records are queued.
const WAKE_AT: usize = 1024;
/// `flush` gives up with `Unavailable` once the writer has been failing this long while it waits.
const FLUSH_FAILING_LIMIT: Duration = Duration::from_secs(5);
/// `follow` polls the file this often.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// The writer hands the sink at most this many bytes per write call.
const CHUNK_BYTES: usize = 64 * 1024;
/// `open` scans back at most this far for the last complete record before refusing the file.
const TAIL_SCAN_LIMIT: u64 = 16 * 1024 * 1024;
/// `,"chain":"` + 64 hex + `"}`.
const CHAIN_SUFFIX_LEN: usize = 76;
const CHAIN_PREFIX: &[u8] = b",\"chain\":\"";

// ---------------------------------------------------------------------------------------------
// Configuration and records
// ---------------------------------------------------------------------------------------------

/// `audit.on_failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// While the log cannot be written, `reserve` fails and the gateway answers 503.
    #[default]
    Reject,
    /// Keep serving; records wait in memory (up to `queue`), failures are counted and alerted.
    Continue,
}

/// Where and how the audit log is written.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// None = stdout.
    pub path: Option<PathBuf>,
    /// What `reserve` does while the log cannot be written.
    pub on_failure: OnFailure,
    /// Rotate when the file would exceed this many bytes (None = never; logrotate + reopen instead).
    pub max_bytes: Option<u64>,
    /// How many accepted-but-unwritten records may wait (bounded queue). Default 65_536.
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            path: None,
            on_failure: OnFailure::Reject,
            max_bytes: None,
            queue: DEFAULT_QUEUE,
        }
    }
}

/// One request line. Field order here is the order on disk. Option fields serialize as JSON null.
///
/// Callers pass clean values: never a token, an `Authorization` value or a query string. As a
/// safety net (it rejects nothing), the writer cuts `path` at the first `?` or `#` before writing.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RequestRecord {
    /// RFC 3339 UTC with milliseconds ([`now_rfc3339`]); filled in by the writer when empty.
    pub timestamp: String,
    /// The request id also sent upstream as `X-Request-Id`.
    pub request_id: String,
    /// `api_token` | `session` | `none`.
    pub auth_type: Cow<'static, str>,
    /// Id of the token, when one was identified.
    pub api_token_id: Option<String>,
    /// Name (label) of the token, when one was identified.
    pub api_token_name: Option<String>,
    /// Display prefix (`tg_` + 8 chars); also for unknown or revoked tokens with a valid format.
    pub token_prefix: Option<String>,
    /// Account that owns the token.
    pub account: Option<String>,
    /// HTTP method.
    pub method: Cow<'static, str>,
    /// Canonical path, never a query.
    pub path: String,
    /// Status answered to the client.
    pub status_code: u16,
    /// `allow` | `deny`.
    pub rbac_decision: Cow<'static, str>,
    /// `ok`, `missing_token`, `malformed`, `bad_checksum`, `unknown_token`, `expired`, `revoked`, ...
    pub reason: Cow<'static, str>,
    /// Permission the matched rule requires.
    pub permission: Option<String>,
    /// The matched rule (route name and template).
    pub rule: Option<String>,
    /// `would_allow` | `would_deny` when a shadow rule was evaluated.
    pub shadow_decision: Option<Cow<'static, str>>,
    /// Client address (TCP peer, or the last untrusted `X-Forwarded-For` hop).
    pub client_ip: String,
    /// `User-Agent` header.
    pub user_agent: Option<String>,
    /// Upstream the request was (or would have been) forwarded to.
    pub upstream: Option<String>,
    /// Time from request start to the response head, in milliseconds.
    pub duration_ms: f64,
}

/// One admin action line (token.created, token.revoked, token.rotated, token.identified,
/// account.created, account.disabled, config.reloaded, session.login, ...).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AdminRecord {
    /// RFC 3339 UTC with milliseconds; filled in by the writer when empty.
    pub timestamp: String,
    /// Dotted event name, e.g. `token.revoked`.
    pub event: String,
    /// Who did it: an account name, a token name, or the OS user for the CLI.
    pub actor: String,
    /// `cli` | `api_token` | `session`.
    pub auth_type: String,
    /// What it was done to (token id, account name, config path...).
    pub target: Option<String>,
    /// Account concerned.
    pub account: Option<String>,
    /// Token concerned.
    pub api_token_id: Option<String>,
    /// Display prefix of the token concerned.
    pub token_prefix: Option<String>,
    /// Free-text reason (e.g. the `--reason` of a revoke).
    pub reason: Option<String>,
    /// Client address for admin API / web UI actions.
    pub client_ip: Option<String>,
    /// Event-specific details.
    pub details: Option<serde_json::Value>,
}

/// One audit line; serialized with `"kind":"request"` or `"kind":"admin"` as its first field.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Entry {
    /// A request that reached the HTTP layer.
    Request(RequestRecord),
    /// An admin action.
    Admin(AdminRecord),
}

impl From<RequestRecord> for Entry {
    fn from(r: RequestRecord) -> Self {
        Entry::Request(r)
    }
}

impl From<AdminRecord> for Entry {
    fn from(r: AdminRecord) -> Self {
        Entry::Admin(r)
    }
}

/// Why the writer cannot accept a record right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnavailableCause {
    /// Writes are failing and `on_failure = "reject"`.
    Failing,
    /// `queue` records are already waiting.
    QueueFull,
}

impl fmt::Display for UnavailableCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnavailableCause::Failing => "the audit log cannot be written",
            UnavailableCause::QueueFull => "the audit queue is full",
        })
    }
}

/// Errors at the audit module's boundary.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log file could not be opened or read at start.
    #[error("cannot open audit log {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Reading a log file failed.
    #[error("cannot read audit log {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The existing file's tail holds no audit record, so the chain cannot be continued.
    #[error("{} does not end with an audit record (nothing found in its last {} MiB); move it aside", path.display(), TAIL_SCAN_LIMIT / (1024 * 1024))]
    NotAuditLog {
        /// The file.
        path: PathBuf,
    },
    /// The writer cannot accept a record (the gateway answers 503).
    #[error("audit writer unavailable: {cause}")]
    Unavailable {
        /// Why.
        cause: UnavailableCause,
    },
    /// Another process (a running gateway) is the writer of this log.
    #[error("audit log {} is being written by another tokengate process (lock {} is held); give each gateway process its own audit.path", path.display(), lock.display())]
    InUse {
        /// The log file.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// The writer was shut down.
    #[error("the audit writer is shut down")]
    Closed,
    /// The writer thread could not be started.
    #[error("cannot start the audit writer thread: {0}")]
    Spawn(io::Error),
    /// A `tokengate audit` filter is invalid.
    #[error("invalid filter: {0}")]
    Filter(String),
    /// Writing the reader's output failed (e.g. a closed pipe).
    #[error("cannot write output: {0}")]
    Output(io::Error),
}

/// A method for [`RequestRecord::method`]: the standard ones without allocating.
pub fn method_name(m: &http::Method) -> Cow<'static, str> {
    use http::Method as M;
    Cow::Borrowed(match *m {
        M::GET => "GET",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::HEAD => "HEAD",
        M::OPTIONS => "OPTIONS",
        M::PATCH => "PATCH",
        M::TRACE => "TRACE",
        M::CONNECT => "CONNECT",
        _ => return Cow::Owned(m.as_str().to_owned()),
    })
}

/// UTC now, millisecond precision, `Z` suffix: `2026-11-23T05:01:02.123Z`.
///
/// Called once per request: the date and time of day are formatted once per second per thread
/// and reused, so the common case is one small allocation and three digits.
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format_unix_ms(d.as_secs() as i64, d.subsec_millis())
}

/// `format_timestamp` of `secs` + `ms` after the epoch, with a per-thread cache of the
/// `YYYY-MM-DDTHH:MM:SS` part.
fn format_unix_ms(secs: i64, ms: u32) -> String {
    thread_local! {
        static SECOND: std::cell::Cell<(i64, [u8; 19])> =
            const { std::cell::Cell::new((i64::MIN, [0; 19])) };
    }
    let prefix = SECOND.with(|c| {
        let (cached, p) = c.get();
        if cached == secs {
            return Some(p);
        }
        let t = OffsetDateTime::from_unix_timestamp(secs).ok()?;
        let full = format_timestamp(t);
        let p: [u8; 19] = full.as_bytes().get(..19)?.try_into().ok()?;
        c.set((secs, p));
        Some(p)
    });
    let ms = ms.min(999);
    match prefix.as_ref().and_then(|p| std::str::from_utf8(p).ok()) {
        Some(p) => {
            let mut out = String::with_capacity(24);
            out.push_str(p);
            out.push('.');
            out.push(char::from(b'0' + (ms / 100) as u8));
            out.push(char::from(b'0' + (ms / 10 % 10) as u8));
            out.push(char::from(b'0' + (ms % 10) as u8));
            out.push('Z');
            out
        }
        // Outside the four-digit years: the slow path formats it whole.
        None => OffsetDateTime::from_unix_timestamp(secs)
            .map(|t| format_timestamp(t + time::Duration::milliseconds(ms.into())))
            .unwrap_or_default(),
    }
}

fn format_timestamp(t: OffsetDateTime) -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    let t = t.to_offset(time::UtcOffset::UTC);
    // Formatting a UTC instant with this description cannot fail; fall back to RFC 3339 anyway.
    t.format(&fmt)
        .or_else(|_| t.format(&Rfc3339))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Sinks (file, stdout, and a test double) behind one small trait
// ---------------------------------------------------------------------------------------------

/// Where encoded lines go. A trait object so tests can inject failures (ENOSPC, short writes).
trait Sink: Send {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    fn flush(&mut self) -> io::Result<()>;
    /// Current length for files; None for streams (no truncation, no rotation).
    fn size(&self) -> io::Result<Option<u64>>;
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    fn sync(&mut self) -> io::Result<()>;
}

struct FileSink(File);

impl Sink for FileSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
    fn size(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.0.metadata()?.len()))
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

struct StdoutSink(io::Stdout);

impl Sink for StdoutSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
    fn size(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }
    fn truncate(&mut self, _len: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "stdout cannot be truncated",
        ))
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Opens the sink for a path (at start, on reopen, after rotation).
type Opener = Arc<dyn Fn(&Path) -> io::Result<Box<dyn Sink>> + Send + Sync>;

fn open_append(path: &Path) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Account names and client addresses are not for every local user.
        o.mode(0o640);
    }
    o.open(path)
}

fn file_opener() -> Opener {
    Arc::new(|p: &Path| Ok(Box::new(FileSink(open_append(p)?)) as Box<dyn Sink>))
}

/// Writer knobs that tests shorten or replace.
struct WriterOptions {
    opener: Opener,
    retry: Duration,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            opener: file_opener(),
            retry: RETRY_INTERVAL,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The handle, reservations and the shared state
// ---------------------------------------------------------------------------------------------

/// Cheap-to-clone handle to the writer.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

/// Owned by the handles only: dropping the last handle shuts the writer down.
struct Inner {
    shared: Arc<Shared>,
    /// Exclusive lock on `<path>.lock`, released at shutdown (after the last write) or drop.
    /// A Mutex because shutdown is `&self`.
    writer_lock: Mutex<Option<File>>,
    /// Taken by the first `shutdown` to join the thread; a Mutex because shutdown is `&self`.
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// State shared by handles, reservations and the writer thread.
struct Shared {
    on_failure: OnFailure,
    capacity: usize,
    /// Producers push under this lock; the writer swaps the whole Vec out, so it is held only
    /// for a push or a swap, never during I/O.
    queue: Mutex<Queue>,
    /// Wakes the writer (new entry, reopen, shutdown).
    wake: Condvar,
    /// Lines written so far, for `flush` waiters; a separate lock so waiters never slow producers.
    progress: Mutex<Progress>,
    progress_cv: Condvar,
    /// Slots in use: outstanding reservations + sent-but-unwritten records. Bounded by `capacity`.
    slots: AtomicUsize,
    /// Sent-but-unwritten records.
    depth: AtomicUsize,
    healthy: AtomicBool,
    closed: AtomicBool,
    write_failures: AtomicU64,
    lines_written: AtomicU64,
}

#[derive(Default)]
struct Queue {
    entries: Vec<Entry>,
    /// Records ever sent; `flush` waits until `Progress::written` reaches it.
    accepted: u64,
    reopen: bool,
    closing: bool,
    writer_gone: bool,
    /// The writer is waiting for a producer's wake-up (it found the queue empty). While false
    /// the writer is working or napping between batches and will look at the queue by itself.
    parked: bool,
}

#[derive(Default)]
struct Progress {
    written: u64,
    writer_gone: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the audit log down with it; the data stays consistent
    // because every critical section is a push, a swap or a counter update.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AuditLog {
    /// Opens (creating, append mode) the file, reads the tail of the existing file to continue `seq` and `chain`
    /// (a torn last line — no trailing newline — is left in place, a warning is logged, and the chain continues from the last complete line; writing starts on a fresh line), and starts the writer on a dedicated std thread.
    ///
    /// When the file holds no record yet (fresh after logrotate), the chain continues from the
    /// tail of `<path>.1` if that exists.
    pub fn open(cfg: AuditConfig) -> Result<AuditLog, AuditError> {
        Self::open_with(cfg, WriterOptions::default())
    }

    fn open_with(cfg: AuditConfig, opts: WriterOptions) -> Result<AuditLog, AuditError> {
        // One writer per log: the chain is kept in the writer's memory, so a second process
        // appending to the same file would fork it. The lock is held for the writer's lifetime.
        let lock_file = match &cfg.path {
            None => None,
            Some(path) => Some(take_writer_lock(path)?),
        };
        let (sink, seq, prev, repair) = match &cfg.path {
            None => (
                Box::new(StdoutSink(io::stdout())) as Box<dyn Sink>,
                0,
                GENESIS_CHAIN.to_owned(),
                Repair::None,
            ),
            Some(path) => {
                let open_err = |source| AuditError::Open {
                    path: path.clone(),
                    source,
                };
                let sink = (opts.opener)(path).map_err(open_err)?;
                let tail = read_tail(path)?;
                let mut last = tail.last;
                if last.is_none() {
                    let older = rotated_name(path, 1);
                    if older.exists() {
                        last = read_tail(&older)?.last;
                        if let Some((seq, _)) = &last {
                            tracing::info!(path = %older.display(), seq, "audit log is empty; continuing the chain from the previous file");
                        }
                    }
                }
                if tail.skipped > 0 {
                    tracing::warn!(path = %path.display(), lines = tail.skipped, "audit log tail holds lines that are not audit records; the chain continues from the last record");
                }
                let mut sink = sink;
                let repair = if tail.torn {
                    tracing::warn!(path = %path.display(), "audit log ends with an incomplete line (a crash mid-write?); it is left in place and writing continues on a fresh line");
                    // End it now; if that fails the writer retries before the first record.
                    match write_counted(sink.as_mut(), b"\n") {
                        (1, None) => Repair::None,
                        _ => Repair::Newline,
                    }
                } else {
                    Repair::None
                };
                let (seq, prev) = last.unwrap_or((0, GENESIS_CHAIN.to_owned()));
                (sink, seq, prev, repair)
            }
        };
        let shared = Arc::new(Shared {
            on_failure: cfg.on_failure,
            capacity: cfg.queue.max(1),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            progress: Mutex::new(Progress::default()),
            progress_cv: Condvar::new(),
            slots: AtomicUsize::new(0),
            depth: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            write_failures: AtomicU64::new(0),
            lines_written: AtomicU64::new(0),
        });
        let writer = Writer {
            shared: shared.clone(),
            path: cfg.path.clone(),
            opener: opts.opener,
            retry: opts.retry,
            max_bytes: cfg.max_bytes,
            sink: Some(sink),
            seq,
            prev,
            pending: VecDeque::new(),
            chunk: Vec::with_capacity(CHUNK_BYTES),
            ends: Vec::new(),
            repair,
            next_retry: None,
            failures_in_row: 0,
            next_alert: None,
            next_rotation_try: None,
            warned_query: false,
        };
        let thread = std::thread::Builder::new()
            .name("tokengate-audit".into())
            .spawn(move || writer.run())
            .map_err(AuditError::Spawn)?;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                shared,
                writer_lock: Mutex::new(lock_file),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Reserve room for one record. Fails with AuditError::Unavailable when the writer is currently failing and on_failure = Reject, or the queue is full.
    /// The gateway calls this BEFORE forwarding and only forwards on Ok. Must be cheap (no syscalls, no allocation beyond the permit).
    pub fn reserve(&self) -> Result<Reservation, AuditError> {
        let s = &self.inner.shared;
        if s.closed.load(Ordering::Acquire) {
            return Err(AuditError::Closed);
        }
        if s.on_failure == OnFailure::Reject && !s.healthy.load(Ordering::Acquire) {
            return Err(AuditError::Unavailable {
                cause: UnavailableCause::Failing,
            });
        }
        let mut cur = s.slots.load(Ordering::Relaxed);
        loop {
            if cur >= s.capacity {
                return Err(AuditError::Unavailable {
                    cause: UnavailableCause::QueueFull,
                });
            }
            match s
                .slots
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Ok(Reservation {
                        shared: Some(s.clone()),
                    });
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Convenience: reserve + send (used for rejections and admin events).
    pub fn record(&self, entry: Entry) -> Result<(), AuditError> {
        self.reserve()?.send(entry);
        Ok(())
    }

    /// Blocks until everything accepted so far is written and flushed (used by the CLI, at shutdown, and in tests).
    ///
    /// Returns `Unavailable` if the writer has been failing for 5 s while waiting (the records
    /// stay queued and are written on recovery), `Closed` if the writer stopped with records unwritten.
    pub fn flush(&self) -> Result<(), AuditError> {
        let s = &self.inner.shared;
        let target = lock(&s.queue).accepted;
        // Cut a napping writer's batch window short.
        s.wake.notify_one();
        let mut p = lock(&s.progress);
        let mut failing_since: Option<Instant> = None;
        loop {
            if p.written >= target {
                return Ok(());
            }
            if p.writer_gone {
                return Err(AuditError::Closed);
            }
            p = s
                .progress_cv
                .wait_timeout(p, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            if s.healthy.load(Ordering::Acquire) {
                failing_since = None;
            } else if failing_since.get_or_insert_with(Instant::now).elapsed()
                >= FLUSH_FAILING_LIMIT
            {
                return Err(AuditError::Unavailable {
                    cause: UnavailableCause::Failing,
                });
            }
        }
    }

    /// [`flush`](Self::flush) for async callers: the wait runs on the blocking pool.
    pub async fn flush_async(&self) -> Result<(), AuditError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.flush())
            .await
            .unwrap_or(Err(AuditError::Closed))
    }

    /// Reopen the file at the same path (SIGHUP, logrotate's `create` mode). The chain continues.
    pub fn reopen(&self) {
        let s = &self.inner.shared;
        lock(&s.queue).reopen = true;
        s.wake.notify_one();
    }

    /// Stops the writer after writing everything accepted; idempotent.
    ///
    /// New `reserve` calls fail with `Closed` at once. The writer waits up to 5 s for
    /// outstanding reservations and for a failing sink to recover, then logs what it lost.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Records sent but not yet written.
    pub fn queue_depth(&self) -> usize {
        self.inner.shared.depth.load(Ordering::Relaxed)
    }

    /// Count of failed write attempts (each retry counts).
    pub fn write_failures(&self) -> u64 {
        self.inner.shared.write_failures.load(Ordering::Relaxed)
    }

    /// False while writes are failing.
    pub fn is_healthy(&self) -> bool {
        self.inner.shared.healthy.load(Ordering::Acquire)
    }

    /// Lines written by this process.
    pub fn lines_written(&self) -> u64 {
        self.inner.shared.lines_written.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("queue_depth", &self.queue_depth())
            .field("healthy", &self.is_healthy())
            .field("lines_written", &self.lines_written())
            .finish()
    }
}

impl Inner {
    fn shutdown(&self) {
        let s = &self.shared;
        s.closed.store(true, Ordering::Release);
        lock(&s.queue).closing = true;
        s.wake.notify_all();
        let handle = lock(&self.thread).take();
        if handle.is_some_and(|h| h.join().is_err()) {
            tracing::error!("audit writer thread panicked");
        }
        // The writer is gone: another process may take over the log.
        lock(&self.writer_lock).take();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Holds one slot; dropping it without `send` releases the slot (no line written).
#[must_use = "dropping a Reservation releases the slot without writing a line"]
pub struct Reservation {
    shared: Option<Arc<Shared>>,
}

impl Reservation {
    /// Hands the record to the writer. Never blocks on I/O; the slot was reserved already.
    pub fn send(mut self, entry: Entry) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        let mut q = lock(&shared.queue);
        if q.writer_gone {
            drop(q);
            shared.slots.fetch_sub(1, Ordering::AcqRel);
            tracing::error!(
                request_id = entry_request_id(&entry),
                "audit record sent after the writer stopped; it was NOT written"
            );
            return;
        }
        q.entries.push(entry);
        q.accepted += 1;
        shared.depth.fetch_add(1, Ordering::Relaxed);
        let wake = q.parked || q.entries.len() >= WAKE_AT;
        drop(q);
        if wake {
            shared.wake.notify_one();
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.slots.fetch_sub(1, Ordering::AcqRel);
            if shared.closed.load(Ordering::Acquire) {
                // The writer may be waiting for the last outstanding reservation to exit.
                shared.wake.notify_one();
            }
        }
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reservation")
    }
}

fn entry_request_id(e: &Entry) -> &str {
    match e {
        Entry::Request(r) => &r.request_id,
        Entry::Admin(a) => &a.event,
    }
}

// ---------------------------------------------------------------------------------------------
// The writer thread
// ---------------------------------------------------------------------------------------------

/// What must happen to the sink's tail before the next line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repair {
    None,
    /// Cut partial bytes of a failed write back to this length.
    Truncate(u64),
    /// An incomplete line is in the file (torn at start, or truncation failed): end it first.
    Newline,
}

struct Writer {
    shared: Arc<Shared>,
    path: Option<PathBuf>,
    opener: Opener,
    retry: Duration,
    max_bytes: Option<u64>,
    /// None after a failed (re)open; reopened on the next attempt.
    sink: Option<Box<dyn Sink>>,
    /// seq of the last encoded line.
    seq: u64,
    /// chain of the last encoded line (hex).
    prev: String,
    /// Encoded lines not yet written, in seq order. Never dropped or reordered: the chain
    /// of every later line depends on them.
    pending: VecDeque<Vec<u8>>,
    chunk: Vec<u8>,
    ends: Vec<usize>,
    repair: Repair,
    /// Some while failing: when to try again.
    next_retry: Option<Instant>,
    failures_in_row: u64,
    next_alert: Option<Instant>,
    next_rotation_try: Option<Instant>,
    warned_query: bool,
}

impl Writer {
    fn run(mut self) {
        let shared = self.shared.clone();
        let mut closing_since: Option<Instant> = None;
        let mut busy = false;
        let mut batch: Vec<Entry> = Vec::new();
        loop {
            let (reopen, closing) = {
                let mut q = lock(&shared.queue);
                if busy && !q.closing && !q.reopen && q.entries.len() < WAKE_AT {
                    // Let a batch gather; producers do not wake us meanwhile (parked = false).
                    q = shared
                        .wake
                        .wait_timeout(q, BATCH_WINDOW)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                loop {
                    if !q.entries.is_empty() || q.reopen {
                        break;
                    }
                    if q.closing
                        && (self.idle()
                            || closing_since.is_some_and(|t| t.elapsed() >= SHUTDOWN_GRACE))
                    {
                        break;
                    }
                    let now = Instant::now();
                    let mut wait = self.next_retry.map(|t| t.saturating_duration_since(now));
                    if q.closing {
                        let poll = Duration::from_millis(10);
                        wait = Some(wait.map_or(poll, |w| w.min(poll)));
                    }
                    match wait {
                        Some(w) if w.is_zero() => break,
                        Some(w) => {
                            q.parked = true;
                            q = shared
                                .wake
                                .wait_timeout(q, w)
                                .unwrap_or_else(PoisonError::into_inner)
                                .0;
                            q.parked = false;
                            break;
                        }
                        None => {
                            q.parked = true;
                            q = shared.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
                            q.parked = false;
                        }
                    }
                }
                let reopen = std::mem::take(&mut q.reopen);
                // Swap in last round's (empty) Vec so its capacity is reused, not reallocated.
                std::mem::swap(&mut q.entries, &mut batch);
                (reopen, q.closing)
            };
            busy = !batch.is_empty();
            for entry in batch.drain(..) {
                let line = self.encode(entry);
                self.pending.push_back(line);
            }
            if reopen {
                self.reopen();
            }
            self.try_write();
            if closing {
                let since = *closing_since.get_or_insert_with(Instant::now);
                if self.idle() && lock(&shared.queue).entries.is_empty() {
                    break;
                }
                if since.elapsed() >= SHUTDOWN_GRACE && lock(&shared.queue).entries.is_empty() {
                    break;
                }
            }
        }
        self.finish();
    }

    /// Nothing pending and no outstanding reservation.
    fn idle(&self) -> bool {
        self.pending.is_empty() && self.shared.slots.load(Ordering::Acquire) == 0
    }

    fn finish(&mut self) {
        if let Some(sink) = self.sink.as_mut() {
            let _ = sink.flush();
            let _ = sink.sync();
        }
        let leftover = {
            let mut q = lock(&self.shared.queue);
            q.writer_gone = true;
            std::mem::take(&mut q.entries).len()
        };
        let lost = self.pending.len() + leftover;
        if lost > 0 {
            self.shared.healthy.store(false, Ordering::Release);
            tracing::error!(lost, "audit writer stopped with records it could not write");
        }
        lock(&self.shared.progress).writer_gone = true;
        self.shared.progress_cv.notify_all();
    }

    /// Serializes one entry as `{"kind":...,...,"seq":N,"chain":"<hex>"}\n`.
    fn encode(&mut self, mut entry: Entry) -> Vec<u8> {
        match &mut entry {
            Entry::Request(r) => {
                if r.timestamp.is_empty() {
                    r.timestamp = now_rfc3339();
                }
                // Safety net, not validation: a query string must never reach the log.
                if let Some(i) = r.path.find(['?', '#']) {
                    r.path.truncate(i);
                    if !self.warned_query {
                        self.warned_query = true;
                        tracing::warn!(
                            "an audit record's path carried a query; it was cut off (bug in the caller)"
                        );
                    }
                }
            }
            Entry::Admin(a) => {
                if a.timestamp.is_empty() {
                    a.timestamp = now_rfc3339();
                }
            }
        }
        let mut line = Vec::with_capacity(512);
        if serde_json::to_writer(&mut line, &entry).is_err() || line.last() != Some(&b'}') {
            // Unreachable for these types; keep the seq continuous rather than drop a record.
            tracing::error!("an audit record could not be serialized");
            line.clear();
            line.extend_from_slice(br#"{"kind":"unencodable"}"#);
        }
        self.seq += 1;
        line.pop();
        line.extend_from_slice(b",\"seq\":");
        line.extend_from_slice(self.seq.to_string().as_bytes());
        line.push(b'}');
        let chain = chain_hex(self.prev.as_bytes(), &line);
        line.pop();
        line.extend_from_slice(CHAIN_PREFIX);
        line.extend_from_slice(chain.as_bytes());
        line.extend_from_slice(b"\"}\n");
        self.prev = chain;
        line
    }

    fn reopen(&mut self) {
        let Some(path) = self.path.clone() else {
            return;
        };
        if let Some(old) = self.sink.as_mut() {
            let _ = old.flush();
        }
        match self.open_sink(&path) {
            Ok(sink) => {
                self.sink = Some(sink);
                tracing::info!(path = %path.display(), "audit log reopened");
            }
            Err(e) => {
                // The old handle may point at a renamed file; drop it so nothing lands there.
                self.sink = None;
                self.failed(&e);
            }
        }
    }

    /// Opens `path` and notes an unterminated tail so the next line starts on a fresh line.
    fn open_sink(&mut self, path: &Path) -> io::Result<Box<dyn Sink>> {
        let sink = (self.opener)(path)?;
        if sink.size()?.unwrap_or(0) > 0 && !ends_with_newline(path)? {
            self.repair = Repair::Newline;
        } else if self.repair != Repair::None {
            // Partial bytes of a failed write were in the old file, not this one.
            self.repair = Repair::None;
        }
        Ok(sink)
    }

    fn try_write(&mut self) {
        let failing = self.next_retry.is_some();
        if failing && self.next_retry.is_some_and(|t| Instant::now() < t) {
            return;
        }
        if !failing && self.pending.is_empty() && self.sink.is_some() && self.repair == Repair::None
        {
            return;
        }
        match self.write_pending() {
            Ok(()) => self.recovered(),
            Err(e) => self.failed(&e),
        }
    }

    /// A write succeeded. Called before the written lines are published, so a `flush` that
    /// returns never sees the writer still marked unhealthy.
    fn recovered(&mut self) {
        if self.next_retry.take().is_some() {
            tracing::warn!(
                failed_attempts = self.failures_in_row,
                "audit log writable again; queued records are being written"
            );
        }
        self.failures_in_row = 0;
        self.next_alert = None;
        self.shared.healthy.store(true, Ordering::Release);
    }

    fn failed(&mut self, e: &io::Error) {
        let now = Instant::now();
        self.failures_in_row += 1;
        self.shared.write_failures.fetch_add(1, Ordering::Relaxed);
        self.shared.healthy.store(false, Ordering::Release);
        self.next_retry = Some(now + self.retry);
        if self.next_alert.is_none_or(|t| now >= t) {
            self.next_alert = Some(now + ALERT_INTERVAL);
            let path = self
                .path
                .as_deref()
                .map_or(Cow::Borrowed("stdout"), |p| p.to_string_lossy());
            match self.shared.on_failure {
                OnFailure::Reject => tracing::error!(
                    path = %path, error = %e, waiting = self.pending.len(), failed_attempts = self.failures_in_row,
                    "audit log write failed; requests are refused (503) until it recovers"
                ),
                OnFailure::Continue => tracing::error!(
                    path = %path, error = %e, waiting = self.pending.len(), failed_attempts = self.failures_in_row,
                    "audit log write failed; on_failure=continue: requests are still served, records wait in memory"
                ),
            }
        }
    }

    /// Writes everything pending, in order; stops at the first error (the rest stays pending).
    fn write_pending(&mut self) -> io::Result<()> {
        if self.sink.is_none() {
            let path = self.path.clone().unwrap_or_default();
            self.sink = Some(self.open_sink(&path)?);
        }
        let Some(sink) = self.sink.as_mut() else {
            return Ok(());
        };
        match self.repair {
            Repair::None => {}
            Repair::Truncate(len) => {
                self.repair = match sink.truncate(len) {
                    Ok(()) => Repair::None,
                    Err(_) => Repair::Newline,
                };
            }
            Repair::Newline => {}
        }
        if self.repair == Repair::Newline {
            write_counted(sink.as_mut(), b"\n").1.map_or(Ok(()), Err)?;
            self.repair = Repair::None;
        }
        while let Some(front) = self.pending.front() {
            let Some(sink) = self.sink.as_mut() else {
                break;
            };
            let start = sink.size()?;
            let over = matches!((self.max_bytes, start),
                (Some(max), Some(len)) if len > 0 && len + front.len() as u64 > max);
            if over && self.next_rotation_try.is_none_or(|t| Instant::now() >= t) {
                self.rotate()?;
                continue;
            }
            self.chunk.clear();
            self.ends.clear();
            for line in &self.pending {
                if !self.chunk.is_empty() {
                    if self.chunk.len() + line.len() > CHUNK_BYTES {
                        break;
                    }
                    let grown = (self.chunk.len() + line.len()) as u64;
                    if matches!((self.max_bytes, start), (Some(max), Some(len)) if len + grown > max)
                    {
                        break;
                    }
                }
                self.chunk.extend_from_slice(line);
                self.ends.push(self.chunk.len());
            }
            let Some(sink) = self.sink.as_mut() else {
                break;
            };
            let (n, err) = write_counted(sink.as_mut(), &self.chunk);
            let complete = self.ends.iter().take_while(|&&e| e <= n).count();
            let boundary = if complete == 0 {
                0
            } else {
                self.ends[complete - 1]
            };
            let Some(e) = err else {
                self.recovered();
                self.pending.drain(..complete);
                mark_written(&self.shared, complete);
                continue;
            };
            self.pending.drain(..complete);
            mark_written(&self.shared, complete);
            if n > boundary {
                // A short write left part of a line: cut it back so the file ends on a line.
                self.repair = match start {
                    Some(len) => {
                        let good = len + boundary as u64;
                        match sink.truncate(good) {
                            Ok(()) => Repair::None,
                            Err(_) => Repair::Truncate(good),
                        }
                    }
                    None => Repair::Newline,
                };
            }
            return Err(e);
        }
        if let Some(sink) = self.sink.as_mut() {
            sink.flush()?;
        }
        Ok(())
    }

    /// `audit.log` → `audit.log.1` (older ones shift, keep 5), then a fresh file; the chain continues.
    fn rotate(&mut self) -> io::Result<()> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        if let Some(sink) = self.sink.as_mut() {
            sink.flush()?;
            let _ = sink.sync();
        }
        if let Err(e) = shift_rotated(&path) {
            // Keep writing to the current file (over the limit) rather than refuse requests.
            let now = Instant::now();
            self.next_rotation_try = Some(now + ALERT_INTERVAL);
            tracing::error!(path = %path.display(), error = %e, "audit log rotation failed; still writing to the current file");
            return Ok(());
        }
        self.next_rotation_try = None;
        // The old handle now points at `.1`; a failed open leaves `sink = None` to retry.
        self.sink = None;
        self.sink = Some(self.open_sink(&path)?);
        tracing::info!(path = %path.display(), seq = self.seq, "audit log rotated");
        Ok(())
    }
}

/// Publishes `n` lines as written: frees their slots and wakes `flush` waiters.
fn mark_written(s: &Shared, n: usize) {
    if n == 0 {
        return;
    }
    s.lines_written.fetch_add(n as u64, Ordering::Relaxed);
    s.depth.fetch_sub(n, Ordering::Relaxed);
    s.slots.fetch_sub(n, Ordering::AcqRel);
    lock(&s.progress).written += n as u64;
    s.progress_cv.notify_all();
}

/// Writes `buf` with as many `write` calls as needed; returns the bytes written and the error
/// that stopped it, if any (so a short write followed by ENOSPC is known precisely).
fn write_counted(sink: &mut dyn Sink, buf: &[u8]) -> (usize, Option<io::Error>) {
    let mut off = 0;
    while off < buf.len() {
        match sink.write(&buf[off..]) {
            Ok(0) => return (off, Some(io::Error::from(io::ErrorKind::WriteZero))),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (off, Some(e)),
        }
    }
    (off, None)
}

fn rotated_name(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn shift_rotated(path: &Path) -> io::Result<()> {
    let ignore_missing = |r: io::Result<()>| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    ignore_missing(fs::remove_file(rotated_name(path, ROTATE_KEEP)))?;
    for n in (1..ROTATE_KEEP).rev() {
        ignore_missing(fs::rename(rotated_name(path, n), rotated_name(path, n + 1)))?;
    }
    // NotFound: the live file was deleted behind our back; just start a fresh one.
    ignore_missing(fs::rename(path, rotated_name(path, 1)))
}

fn ends_with_newline(path: &Path) -> io::Result<bool> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(true);
    }
    f.seek(SeekFrom::Start(len - 1))?;
    let mut b = [0u8; 1];
    f.read_exact(&mut b)?;
    Ok(b[0] == b'\n')
}

fn chain_hex(prev_hex: &[u8], unchained: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(prev_hex);
    h.update(unchained);
    hex(&h.finalize())
}

// ---------------------------------------------------------------------------------------------
// Parsing lines (shared by open, verify)
// ---------------------------------------------------------------------------------------------

enum Parsed<'a> {
    NotJson,
    NoChain,
    Record {
        seq: u64,
        chain: &'a [u8],
        /// The line without `,"chain":"..."}`; the chain covers `head` + `}`.
        head: &'a [u8],
    },
}

fn parse_line(line: &[u8]) -> Parsed<'_> {
    #[derive(Deserialize)]
    struct SeqChain {
        seq: Option<u64>,
        chain: Option<String>,
    }
    if line.first() != Some(&b'{') {
        return Parsed::NotJson;
    }
    let Ok(v) = serde_json::from_slice::<SeqChain>(line) else {
        return Parsed::NotJson;
    };
    let (Some(seq), Some(chain)) = (v.seq, v.chain) else {
        return Parsed::NoChain;
    };
    if line.len() < CHAIN_SUFFIX_LEN + 1 {
        return Parsed::NoChain;
    }
    let (head, suffix) = line.split_at(line.len() - CHAIN_SUFFIX_LEN);
    let hex = &suffix[CHAIN_PREFIX.len()..CHAIN_SUFFIX_LEN - 2];
    if !suffix.starts_with(CHAIN_PREFIX)
        || !suffix.ends_with(b"\"}")
        || hex != chain.as_bytes()
        || !hex.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Parsed::NoChain;
    }
    Parsed::Record {
        seq,
        chain: hex,
        head,
    }
}

#[derive(Default)]
struct Tail {
    /// (seq, chain) of the last complete record.
    last: Option<(u64, String)>,
    /// The file does not end with `\n`.
    torn: bool,
    /// Complete lines after the last record that are not records (torn remnants of old crashes).
    skipped: u64,
}

/// Takes the exclusive writer lock `<path>.lock` (non-blocking).
fn take_writer_lock(path: &Path) -> Result<File, AuditError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock = PathBuf::from(name);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(|source| AuditError::Open {
            path: lock.clone(),
            source,
        })?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(AuditError::InUse {
            path: path.to_path_buf(),
            lock,
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(AuditError::Open { path: lock, source }),
    }
}

/// Finds the last complete record by reading backwards in growing windows.
fn read_tail(path: &Path) -> Result<Tail, AuditError> {
    let io_err = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Tail::default()),
        Err(e) => return Err(io_err(e)),
    };
    let len = f.metadata().map_err(io_err)?.len();
    if len == 0 {
        return Ok(Tail::default());
    }
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        f.seek(SeekFrom::Start(start)).map_err(io_err)?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        (&mut f)
            .take(len - start)
            .read_to_end(&mut buf)
            .map_err(io_err)?;
        let torn = buf.last() != Some(&b'\n');
        // Only lines that end with '\n' are complete; a window not at the file start begins mid-line.
        let end = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let body = &buf[..end];
        let first_complete = if start == 0 {
            0
        } else {
            body.iter()
                .position(|&b| b == b'\n')
                .map_or(body.len(), |i| i + 1)
        };
        let mut skipped = 0;
        let lines = body[first_complete..].strip_suffix(b"\n").unwrap_or(&[]);
        if !body[first_complete..].is_empty() {
            for line in lines.rsplit(|&b| b == b'\n') {
                if let Parsed::Record { seq, chain, .. } = parse_line(line) {
                    let chain = String::from_utf8_lossy(chain).into_owned();
                    return Ok(Tail {
                        last: Some((seq, chain)),
                        torn,
                        skipped,
                    });
                }
                skipped += 1;
            }
        }
        if start == 0 {
            return Ok(Tail {
                last: None,
                torn,
                skipped,
            });
        }
        if window >= TAIL_SCAN_LIMIT {
            return Err(AuditError::NotAuditLog {
                path: path.to_owned(),
            });
        }
        window *= 4;
    }
}

// ---------------------------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------------------------

/// The first problem `verify` found. Line numbers are 1-based, per file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyProblem {
    /// The line is not a JSON object (edited or corrupted).
    BadJson {
        /// File.
        file: PathBuf,
        /// Line number.
        line_no: u64,
    },
    /// The file ends without a newline (truncated mid-line, or a crash mid-write).
    TornLastLine {
        /// File.
        file: PathBuf,
        /// Line number.
        line_no: u64,
    },
    /// JSON, but `seq` and `chain` are missing or `chain` is not the last member.
    MissingChain {
        /// File.
        file: PathBuf,
        /// Line number.
        line_no: u64,
    },
    /// The first line of the set does not have seq 1: earlier lines (or files) are missing.
    TruncatedStart {
        /// File.
        file: PathBuf,
        /// Line number.
        line_no: u64,
        /// The seq found.
        found: u64,
    },
    /// seq jumped forward: lines were deleted.
    SeqGap {
        /// File.
        file: PathBuf,
        /// Line number.
        line_no: u64,
        /// seq expected here.
        expected: u64,
        /// seq found.
        found: u64,
    },
    /// seq went backward or lines were swapped: reordered or replayed.
    OutOfOrder {
        /// File.
        file: PathBuf,
        /// Line number.
        line_no: u64,
        /// seq expected here.
        expected: u64,
        /// seq found.
        found: u64,
    },
    /// seq is right but the chain does not match: the line's content was edited.
    ChainMismatch {
        /// File.
        file: PathBuf,
        /// Line number.
        line_no: u64,
    },
}

impl fmt::Display for VerifyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyProblem::BadJson { file, line_no } => write!(
                f,
                "{}:{line_no}: not a valid audit record (not JSON): the line was edited or corrupted",
                file.display()
            ),
            VerifyProblem::TornLastLine { file, line_no } => write!(
                f,
                "{}:{line_no}: the last line is incomplete (no newline): the file was truncated or the writer crashed mid-line",
                file.display()
            ),
            VerifyProblem::MissingChain { file, line_no } => write!(
                f,
                "{}:{line_no}: the line has no seq/chain at its end: it was not written by the audit writer or was edited",
                file.display()
            ),
            VerifyProblem::TruncatedStart {
                file,
                line_no,
                found,
            } => write!(
                f,
                "{}:{line_no}: the set starts at seq {found}, not 1: the first {} line(s) are missing (pass every rotated file, oldest first)",
                file.display(),
                found.saturating_sub(1)
            ),
            VerifyProblem::SeqGap {
                file,
                line_no,
                expected,
                found,
            } => write!(
                f,
                "{}:{line_no}: expected seq {expected}, found {found}: {} line(s) were deleted",
                file.display(),
                found - expected
            ),
            VerifyProblem::OutOfOrder {
                file,
                line_no,
                expected,
                found,
            } => write!(
                f,
                "{}:{line_no}: expected seq {expected}, found {found}: lines were reordered or replayed",
                file.display()
            ),
            VerifyProblem::ChainMismatch { file, line_no } => write!(
                f,
                "{}:{line_no}: the chain does not match: the line was edited",
                file.display()
            ),
        }
    }
}

/// Result of [`verify`]: `Display` prints `OK: N lines, chain intact` or the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records verified (before the problem, if any).
    pub lines: u64,
    /// The first problem, None when the chain is intact.
    pub problem: Option<VerifyProblem>,
    /// seq of the first record (1 unless `allow_partial_start`).
    pub first_seq: Option<u64>,
    /// Incomplete lines left by a crash and terminated by the next writer start: tolerated
    /// because the record after each one continues the chain exactly, so nothing was lost.
    pub torn_skipped: Vec<(PathBuf, u64)>,
}

impl VerifyReport {
    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problem.is_none()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            Some(p) => write!(f, "FAILED: {p} ({} line(s) before it verified)", self.lines),
            None => {
                write!(f, "OK: {} lines, chain intact", self.lines)?;
                if let Some(first) = self.first_seq.filter(|&s| s != 1) {
                    write!(f, " from seq {first} (earlier lines not checked)")?;
                }
                if !self.torn_skipped.is_empty() {
                    let at: Vec<String> = self
                        .torn_skipped
                        .iter()
                        .map(|(p, n)| format!("{}:{n}", p.display()))
                        .collect();
                    write!(
                        f,
                        "; skipped {} incomplete line(s) left by a crash: {}",
                        at.len(),
                        at.join(", ")
                    )?;
                }
                Ok(())
            }
        }
    }
}

/// Options for [`verify_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions {
    /// Accept a set whose first line is not seq 1 (older files deleted by retention): the first
    /// line is trusted as the anchor, and everything after it is checked.
    pub allow_partial_start: bool,
}

/// Verify one file or a rotated set given oldest-first; the chain must continue across files.
pub fn verify(paths: &[PathBuf]) -> Result<VerifyReport, AuditError> {
    verify_with(paths, VerifyOptions::default())
}

/// [`verify`] with options.
pub fn verify_with(paths: &[PathBuf], opts: VerifyOptions) -> Result<VerifyReport, AuditError> {
    let mut v = Verifier {
        opts,
        prev: GENESIS_CHAIN.as_bytes().to_vec(),
        expected: 1,
        started: false,
        pending: None,
        report: VerifyReport {
            lines: 0,
            problem: None,
            first_seq: None,
            torn_skipped: Vec::new(),
        },
    };
    let mut buf = Vec::with_capacity(1024);
    for (i, path) in paths.iter().enumerate() {
        let last_file = i + 1 == paths.len();
        let file = File::open(path).map_err(|source| AuditError::Open {
            path: path.clone(),
            source,
        })?;
        let mut r = BufReader::with_capacity(64 * 1024, file);
        let mut line_no = 0;
        loop {
            buf.clear();
            let n = r
                .read_until(b'\n', &mut buf)
                .map_err(|source| AuditError::Io {
                    path: path.clone(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            line_no += 1;
            let terminated = buf.last() == Some(&b'\n');
            if terminated {
                buf.pop();
            }
            let end = match (terminated, last_file) {
                (true, _) => LineEnd::Newline,
                (false, true) => LineEnd::TornLast,
                // A rotated file was not terminated after a crash: judged like a crash remnant.
                (false, false) => LineEnd::TornRotated,
            };
            if let Some(problem) = v.line(path, line_no, &buf, end) {
                v.report.problem = Some(problem);
                return Ok(v.report);
            }
        }
    }
    v.report.problem = match v.pending.take() {
        Some(Pending::Bad {
            file,
            line_no,
            torn,
        }) => Some(bad_line(file, line_no, torn)),
        Some(Pending::Gap {
            file,
            line_no,
            expected,
            found,
        }) => Some(VerifyProblem::SeqGap {
            file,
            line_no,
            expected,
            found,
        }),
        None => None,
    };
    Ok(v.report)
}

/// How a physical line ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LineEnd {
    Newline,
    /// No newline at the end of the last file.
    TornLast,
    /// No newline at the end of an earlier (rotated) file.
    TornRotated,
}

fn bad_line(file: PathBuf, line_no: u64, torn: bool) -> VerifyProblem {
    if torn {
        VerifyProblem::TornLastLine { file, line_no }
    } else {
        VerifyProblem::BadJson { file, line_no }
    }
}

/// A line whose verdict depends on the next one.
enum Pending {
    /// Not a record: a torn remnant (fine) if the next record continues the chain, else an edit.
    Bad {
        file: PathBuf,
        line_no: u64,
        /// It was the unterminated end of a rotated file.
        torn: bool,
    },
    /// seq jumped: a reorder if the next seq is smaller, else a deletion.
    Gap {
        file: PathBuf,
        line_no: u64,
        expected: u64,
        found: u64,
    },
}

struct Verifier {
    opts: VerifyOptions,
    prev: Vec<u8>,
    expected: u64,
    started: bool,
    pending: Option<Pending>,
    report: VerifyReport,
}

impl Verifier {
    fn line(
        &mut self,
        file: &Path,
        line_no: u64,
        bytes: &[u8],
        end: LineEnd,
    ) -> Option<VerifyProblem> {
        let parsed = match end {
            LineEnd::Newline => Some(parse_line(bytes)),
            LineEnd::TornLast | LineEnd::TornRotated => None,
        };
        match self.pending.take() {
            Some(Pending::Gap {
                file,
                line_no,
                expected,
                found,
            }) => {
                return Some(match parsed {
                    Some(Parsed::Record { seq, .. }) if seq < found => VerifyProblem::OutOfOrder {
                        file,
                        line_no,
                        expected,
                        found,
                    },
                    _ => VerifyProblem::SeqGap {
                        file,
                        line_no,
                        expected,
                        found,
                    },
                });
            }
            Some(Pending::Bad {
                file: bad_file,
                line_no: bad_no,
                torn,
            }) => {
                let continues = match &parsed {
                    Some(Parsed::Record { seq, chain, head }) => {
                        let start_ok = self.started || *seq == 1;
                        start_ok && *seq == self.expected && self.chain_ok(head, chain)
                    }
                    _ => false,
                };
                if !continues {
                    return Some(bad_line(bad_file, bad_no, torn));
                }
                self.report.torn_skipped.push((bad_file, bad_no));
            }
            None => {}
        }
        let file = file.to_owned();
        let (seq, chain, head) = match parsed {
            None if end == LineEnd::TornLast => {
                return Some(VerifyProblem::TornLastLine { file, line_no });
            }
            None => {
                self.pending = Some(Pending::Bad {
                    file,
                    line_no,
                    torn: true,
                });
                return None;
            }
            Some(Parsed::NotJson) => {
                self.pending = Some(Pending::Bad {
                    file,
                    line_no,
                    torn: false,
                });
                return None;
            }
            Some(Parsed::NoChain) => return Some(VerifyProblem::MissingChain { file, line_no }),
            Some(Parsed::Record { seq, chain, head }) => (seq, chain, head),
        };
        if !self.started {
            self.started = true;
            self.report.first_seq = Some(seq);
            if seq != 1 {
                if !self.opts.allow_partial_start {
                    return Some(VerifyProblem::TruncatedStart {
                        file,
                        line_no,
                        found: seq,
                    });
                }
                // Trust this line as the anchor: its own chain cannot be recomputed.
                self.accept(seq, chain);
                return None;
            }
        }
        if seq < self.expected {
            return Some(VerifyProblem::OutOfOrder {
                file,
                line_no,
                expected: self.expected,
                found: seq,
            });
        }
        if seq > self.expected {
            self.pending = Some(Pending::Gap {
                file,
                line_no,
                expected: self.expected,
                found: seq,
            });
            return None;
        }
        if !self.chain_ok(head, chain) {
            return Some(VerifyProblem::ChainMismatch { file, line_no });
        }
        self.accept(seq, chain);
        None
    }

    fn chain_ok(&self, head: &[u8], chain: &[u8]) -> bool {
        let mut h = Sha256::new();
        h.update(&self.prev);
        h.update(head);
        h.update(b"}");
        hex(&h.finalize()).as_bytes() == chain
    }

    fn accept(&mut self, seq: u64, chain: &[u8]) {
        self.prev.clear();
        self.prev.extend_from_slice(chain);
        self.expected = seq + 1;
        self.report.lines += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Reader for `tokengate audit`
// ---------------------------------------------------------------------------------------------

/// Filters of `tokengate audit`; all set filters must match.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// matches api_token_name, api_token_id or token_prefix (exact, or prefix for token_prefix);
    /// admin lines also match on `target`.
    pub token: Option<String>,
    /// Exact account.
    pub account: Option<String>,
    /// allow|deny (request lines only).
    pub decision: Option<String>,
    /// Exact reason.
    pub reason: Option<String>,
    /// "403" exact or "4xx" class (request lines only).
    pub status: Option<String>,
    /// Inclusive lower bound on `timestamp`.
    pub since: Option<OffsetDateTime>,
    /// Exclusive upper bound on `timestamp`.
    pub until: Option<OffsetDateTime>,
    /// Admin event, exact or `token.*` (admin lines only).
    pub event: Option<String>,
}

/// How `query` and `follow` print matching lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Fixed columns for people.
    Table,
    /// The original JSON lines, byte for byte.
    Json,
}

/// Parse "1h", "30m", "7d", "45s" (relative to now) or an RFC 3339 instant.
pub fn parse_time_arg(s: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    let s = s.trim();
    let bad = || {
        format!(
            "expected a duration like 45s, 30m, 1h, 7d or an RFC 3339 time like 2026-11-23T05:01:02Z, got {s:?}"
        )
    };
    let (num, unit) = match s.char_indices().last() {
        Some((i, unit)) => (&s[..i], unit),
        None => return Err(bad()),
    };
    if !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()) {
        let n: i64 = num.parse().map_err(|_| bad())?;
        let secs = match unit {
            's' => Some(n),
            'm' => n.checked_mul(60),
            'h' => n.checked_mul(3600),
            'd' => n.checked_mul(86_400),
            'w' => n.checked_mul(7 * 86_400),
            _ => return Err(bad()),
        };
        return secs
            .and_then(|secs| now.checked_sub(time::Duration::seconds(secs)))
            .ok_or_else(|| format!("duration {s:?} is too large"));
    }
    OffsetDateTime::parse(s, &Rfc3339).map_err(|_| bad())
}

/// The fields the reader looks at; anything else in the line is ignored.
#[derive(Debug, Default, Deserialize)]
struct View {
    kind: Option<String>,
    timestamp: Option<String>,
    event: Option<String>,
    target: Option<String>,
    api_token_id: Option<String>,
    api_token_name: Option<String>,
    token_prefix: Option<String>,
    account: Option<String>,
    method: Option<String>,
    path: Option<String>,
    status_code: Option<u16>,
    rbac_decision: Option<String>,
    reason: Option<String>,
    client_ip: Option<String>,
}

impl View {
    fn is_admin(&self) -> bool {
        self.kind.as_deref() == Some("admin")
    }
}

enum StatusMatch {
    Exact(u16),
    Class(u16),
}

struct Matcher<'a> {
    f: &'a Filter,
    status: Option<StatusMatch>,
}

impl<'a> Matcher<'a> {
    fn new(f: &'a Filter) -> Result<Self, AuditError> {
        let status = match f.status.as_deref().map(str::trim) {
            None => None,
            Some(s) => {
                let b = s.as_bytes();
                if b.len() == 3
                    && (b'1'..=b'5').contains(&b[0])
                    && b[1..].eq_ignore_ascii_case(b"xx")
                {
                    Some(StatusMatch::Class(u16::from(b[0] - b'0')))
                } else {
                    match s.parse::<u16>() {
                        Ok(code) if (100..=599).contains(&code) => Some(StatusMatch::Exact(code)),
                        _ => {
                            return Err(AuditError::Filter(format!(
                                "status must be a code like 403 or a class like 4xx, got {s:?}"
                            )));
                        }
                    }
                }
            }
        };
        if let Some(d) = f.decision.as_deref() {
            if d != "allow" && d != "deny" {
                return Err(AuditError::Filter(format!(
                    "decision must be allow or deny, got {d:?}"
                )));
            }
        }
        if f.token.as_deref().is_some_and(str::is_empty) {
            return Err(AuditError::Filter("token must not be empty".into()));
        }
        Ok(Matcher { f, status })
    }

    fn matches(&self, v: &View) -> bool {
        let f = self.f;
        let eq = |field: &Option<String>, want: &str| field.as_deref() == Some(want);
        if let Some(t) = f.token.as_deref() {
            let hit = eq(&v.api_token_name, t)
                || eq(&v.api_token_id, t)
                || v.token_prefix.as_deref().is_some_and(|p| p.starts_with(t))
                || (v.is_admin() && eq(&v.target, t));
            if !hit {
                return false;
            }
        }
        if f.account.as_deref().is_some_and(|a| !eq(&v.account, a)) {
            return false;
        }
        if f.decision
            .as_deref()
            .is_some_and(|d| v.is_admin() || !eq(&v.rbac_decision, d))
        {
            return false;
        }
        if f.reason.as_deref().is_some_and(|r| !eq(&v.reason, r)) {
            return false;
        }
        if let Some(s) = &self.status {
            let Some(code) = v.status_code.filter(|_| !v.is_admin()) else {
                return false;
            };
            let ok = match s {
                StatusMatch::Exact(c) => code == *c,
                StatusMatch::Class(c) => code / 100 == *c,
            };
            if !ok {
                return false;
            }
        }
        if f.since.is_some() || f.until.is_some() {
            let Some(t) = v
                .timestamp
                .as_deref()
                .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            else {
                return false;
            };
            if f.since.is_some_and(|s| t < s) || f.until.is_some_and(|u| t >= u) {
                return false;
            }
        }
        if let Some(e) = f.event.as_deref() {
            let Some(ev) = v.event.as_deref().filter(|_| v.is_admin()) else {
                return false;
            };
            let ok = match e.strip_suffix('*') {
                Some(prefix) => ev.starts_with(prefix),
                None => ev == e,
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

/// Stream the log (never loading it whole), writing matching lines to `out` as a table (fixed columns: time, status, decision, reason, method, path, token, account, client_ip; admin lines show the event in place of method/path) or as the original JSON lines. Torn/bad lines are reported to `err` with the line number, not silently skipped.
pub fn query(
    paths: &[PathBuf],
    filter: &Filter,
    format: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<u64, AuditError> {
    let m = Matcher::new(filter)?;
    if format == OutputFormat::Table {
        write_table_header(out).map_err(AuditError::Output)?;
    }
    let mut matched = 0;
    let mut buf = Vec::with_capacity(1024);
    for path in paths {
        let file = File::open(path).map_err(|source| AuditError::Open {
            path: path.clone(),
            source,
        })?;
        let mut r = BufReader::with_capacity(64 * 1024, file);
        let mut line_no = 0;
        loop {
            buf.clear();
            let n = r
                .read_until(b'\n', &mut buf)
                .map_err(|source| AuditError::Io {
                    path: path.clone(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            line_no += 1;
            if buf.pop() != Some(b'\n') {
                writeln!(
                    err,
                    "{}:{line_no}: skipped: incomplete last line (no newline)",
                    path.display()
                )
                .map_err(AuditError::Output)?;
                break;
            }
            if emit(&m, path, line_no, &buf, format, out, err)? {
                matched += 1;
            }
        }
    }
    out.flush().map_err(AuditError::Output)?;
    Ok(matched)
}

/// Prints one line if it matches; reports it to `err` if it is not a record.
fn emit(
    m: &Matcher<'_>,
    path: &Path,
    line_no: u64,
    line: &[u8],
    format: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<bool, AuditError> {
    let view = match serde_json::from_slice::<View>(line) {
        Ok(v) if line.first() == Some(&b'{') => v,
        _ => {
            writeln!(
                err,
                "{}:{line_no}: skipped: not a JSON audit record",
                path.display()
            )
            .map_err(AuditError::Output)?;
            return Ok(false);
        }
    };
    if !m.matches(&view) {
        return Ok(false);
    }
    match format {
        OutputFormat::Json => {
            out.write_all(line)
                .and_then(|()| out.write_all(b"\n"))
                .map_err(AuditError::Output)?;
        }
        OutputFormat::Table => write_table_row(out, &view).map_err(AuditError::Output)?,
    }
    Ok(true)
}

fn write_table_header(out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "{:<24} {:<6} {:<8} {:<24} {:<7} {:<36} {:<20} {:<16} CLIENT_IP",
        "TIME", "STATUS", "DECISION", "REASON", "METHOD", "PATH", "TOKEN", "ACCOUNT"
    )
}

/// A cell for people: "-" when empty; control characters (a tampered log could carry terminal
/// escapes) shown as `?`.
fn cell(s: Option<&str>) -> Cow<'_, str> {
    match s {
        None | Some("") => Cow::Borrowed("-"),
        Some(s) if s.chars().any(char::is_control) => Cow::Owned(
            s.chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        ),
        Some(s) => Cow::Borrowed(s),
    }
}

fn write_table_row(out: &mut dyn Write, v: &View) -> io::Result<()> {
    let token = v
        .api_token_name
        .as_deref()
        .or(v.token_prefix.as_deref())
        .or(v.api_token_id.as_deref());
    let time = cell(v.timestamp.as_deref());
    let reason = cell(v.reason.as_deref());
    let token = cell(token);
    let account = cell(v.account.as_deref());
    let ip = cell(v.client_ip.as_deref());
    if v.is_admin() {
        let what = match v.target.as_deref().filter(|t| !t.is_empty()) {
            Some(t) => format!("{} {}", cell(v.event.as_deref()), cell(Some(t))),
            None => cell(v.event.as_deref()).into_owned(),
        };
        writeln!(
            out,
            "{time:<24} {:<6} {:<8} {reason:<24} {what:<44} {token:<20} {account:<16} {ip}",
            "-", "-"
        )
    } else {
        let status = v
            .status_code
            .map_or_else(|| "-".to_owned(), |s| s.to_string());
        let decision = cell(v.rbac_decision.as_deref());
        let method = cell(v.method.as_deref());
        let path = cell(v.path.as_deref());
        writeln!(
            out,
            "{time:<24} {status:<6} {decision:<8} {reason:<24} {method:<7} {path:<36} {token:<20} {account:<16} {ip}"
        )
    }
}

/// Like `tail -f`: after printing existing matching lines, keep printing new ones; survives rotation (file replaced → reopen from the new file's start; file truncated → start over). Poll every 200 ms. Runs until `stop` returns true (checked every poll) — the CLI passes `|| false`, tests pass a flag.
///
/// Lines that are not records are reported on stderr with their line number.
pub fn follow(
    path: &Path,
    filter: &Filter,
    format: OutputFormat,
    out: &mut dyn Write,
    stop: &dyn Fn() -> bool,
) -> Result<(), AuditError> {
    follow_with(path, filter, format, out, &mut io::stderr(), stop)
}

fn follow_with(
    path: &Path,
    filter: &Filter,
    format: OutputFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
    stop: &dyn Fn() -> bool,
) -> Result<(), AuditError> {
    let m = Matcher::new(filter)?;
    if format == OutputFormat::Table {
        write_table_header(out).map_err(AuditError::Output)?;
    }
    let open = |p: &Path| {
        File::open(p).map_err(|source| AuditError::Open {
            path: p.to_owned(),
            source,
        })
    };
    let io_err = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = open(path)?;
    let mut id = file_id(&file.metadata().map_err(io_err)?);
    let mut t = Tailer {
        pos: 0,
        line_no: 0,
        partial: Vec::new(),
        buf: vec![0; 64 * 1024],
    };
    loop {
        t.read_available(&mut file, path, &m, format, out, err)?;
        out.flush().map_err(AuditError::Output)?;
        if stop() {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_POLL);
        match fs::metadata(path) {
            Ok(meta) if file_id(&meta) != id => {
                // Rotated: finish the old file (still open), then start the new one from its start.
                t.read_available(&mut file, path, &m, format, out, err)?;
                t.finish(path, err)?;
                let new = match open(path) {
                    Ok(f) => f,
                    Err(_) => continue, // replaced again in between; retry at the next poll
                };
                let new_id = file_id(&new.metadata().map_err(io_err)?);
                // Size rotation may have run more than once since the last poll: the files
                // rotated after ours come before the new one, or their lines would be skipped.
                for between in rotated_between(path, id, new_id) {
                    let Ok(mut f) = File::open(&between) else {
                        continue;
                    };
                    t.restart();
                    t.read_available(&mut f, &between, &m, format, out, err)?;
                    t.finish(&between, err)?;
                }
                file = new;
                id = new_id;
                t.restart();
            }
            Ok(meta) if meta.len() < t.pos => {
                // Truncated in place (copytruncate): start over.
                file.seek(SeekFrom::Start(0)).map_err(io_err)?;
                t.restart();
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {} // between rename and create
            Err(e) => return Err(io_err(e)),
        }
    }
}

struct Tailer {
    /// Bytes consumed from the current file (including `partial`).
    pos: u64,
    line_no: u64,
    /// The start of a line whose newline has not arrived yet.
    partial: Vec<u8>,
    buf: Vec<u8>,
}

impl Tailer {
    fn restart(&mut self) {
        self.pos = 0;
        self.line_no = 0;
        self.partial.clear();
    }

    /// The file is left for another: a line without its newline is reported, not dropped silently.
    fn finish(&mut self, path: &Path, err: &mut dyn Write) -> Result<(), AuditError> {
        if self.partial.is_empty() {
            return Ok(());
        }
        writeln!(
            err,
            "{}:{}: skipped: incomplete last line (no newline)",
            path.display(),
            self.line_no + 1
        )
        .map_err(AuditError::Output)
    }

    fn read_available(
        &mut self,
        file: &mut File,
        path: &Path,
        m: &Matcher<'_>,
        format: OutputFormat,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> Result<(), AuditError> {
        loop {
            let n = match file.read(&mut self.buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(AuditError::Io {
                        path: path.to_owned(),
                        source,
                    });
                }
            };
            self.pos += n as u64;
            let mut chunk = &self.buf[..n];
            while let Some(i) = chunk.iter().position(|&b| b == b'\n') {
                self.partial.extend_from_slice(&chunk[..i]);
                chunk = &chunk[i + 1..];
                self.line_no += 1;
                emit(m, path, self.line_no, &self.partial, format, out, err)?;
                self.partial.clear();
            }
            self.partial.extend_from_slice(chunk);
        }
    }
}

/// The size-rotated files written after `old` and before `new`, oldest first: `path.k-1` ..=
/// `path.1` when `old` is now `path.k`. Empty when `old` is not among them (renamed away by
/// logrotate, deleted) or was rotated only once.
fn rotated_between(path: &Path, old: Option<(u64, u64)>, new: Option<(u64, u64)>) -> Vec<PathBuf> {
    let mut between = Vec::new();
    for n in 1..=ROTATE_KEEP {
        let p = rotated_name(path, n);
        let Ok(meta) = fs::metadata(&p) else {
            return Vec::new();
        };
        let id = file_id(&meta);
        if id == old {
            between.reverse();
            return between;
        }
        if id == new {
            // The file just opened was rotated too: only files older than it are in between.
            between.clear();
        } else {
            between.push(p);
        }
    }
    Vec::new()
}

#[cfg(unix)]
fn file_id(m: &fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_m: &fs::Metadata) -> Option<(u64, u64)> {
    None
}

#[cfg(test)]
mod tests {
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
        }
    }

    fn cfg(path: &Path) -> AuditConfig {
        AuditConfig {
            path: Some(path.to_owned()),
            ..AuditConfig::default()
        }
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

    /// A log of `n` request lines, written and closed.
    fn make_log(n: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(cfg(&path)).unwrap();
        write_n(&log, "r", n);
        log.shutdown();
        (dir, path)
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

    // ---- format --------------------------------------------------------------------------------

    #[test]
    fn timestamp_is_utc_with_milliseconds() {
        let t = format_timestamp(time::macros::datetime!(2026-11-23 05:01:02.123456 UTC));
        assert_eq!(t, "2026-11-23T05:01:02.123Z");
        let now = now_rfc3339();
        assert_eq!(now.len(), 24, "{now}");
        assert!(now.ends_with('Z'));
        assert!(OffsetDateTime::parse(&now, &Rfc3339).is_ok());
    }

    #[test]
    fn cached_second_formatting_matches_the_full_formatter() {
        // Same second twice (cache hit), the next second, a leap day, a year boundary, the epoch.
        let cases: [(i64, u32); 7] = [
            (1_795_410_062, 123),
            (1_795_410_062, 7),
            (1_795_410_063, 999),
            (1_709_164_799, 0),
            (1_735_689_599, 999),
            (1_735_689_600, 1),
            (0, 0),
        ];
        for (secs, ms) in cases {
            let t = OffsetDateTime::from_unix_timestamp(secs).unwrap()
                + time::Duration::milliseconds(ms.into());
            assert_eq!(format_unix_ms(secs, ms), format_timestamp(t), "{secs}.{ms}");
        }
    }

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
            let expect = chain_hex(prev.as_bytes(), without.as_bytes());
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        for round in 0..3 {
            let log = AuditLog::open(cfg(&path)).unwrap();
            write_n(&log, &format!("round{round}-"), 4);
            assert_eq!(log.lines_written(), 4);
            drop(log); // dropping the last handle shuts the writer down
        }
        let report = verify(std::slice::from_ref(&path)).unwrap();
        assert_eq!(report.to_string(), "OK: 12 lines, chain intact");
        assert_eq!(report.lines, 12);
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
        let set = vec![dir.path().join("audit.log.1"), path.clone()];
        assert_eq!(
            verify(&set).unwrap().to_string(),
            "OK: 5 lines, chain intact"
        );
    }

    #[test]
    fn reopen_follows_external_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
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
        assert_eq!(
            verify(&set).unwrap().to_string(),
            "OK: 7 lines, chain intact"
        );
    }

    // ---- tamper detection ------------------------------------------------------------------------

    #[test]
    fn tamper_edit_field_is_chain_mismatch() {
        let (_dir, path) = make_log(6);
        let mut lines = lines_of(&path);
        lines[2] = lines[2].replace(r#""status_code":200"#, r#""status_code":201"#);
        set_lines(&path, &lines);
        assert_eq!(
            problem(std::slice::from_ref(&path)),
            VerifyProblem::ChainMismatch {
                file: path,
                line_no: 3
            }
        );
    }

    #[test]
    fn tamper_edit_breaking_json_is_bad_json() {
        let (_dir, path) = make_log(6);
        let mut lines = lines_of(&path);
        lines[3] = lines[3].replacen('{', "", 1);
        set_lines(&path, &lines);
        let p = problem(std::slice::from_ref(&path));
        assert_eq!(
            p,
            VerifyProblem::BadJson {
                file: path.clone(),
                line_no: 4
            }
        );
        assert!(
            p.to_string()
                .contains("audit.log:4: not a valid audit record"),
            "{p}"
        );
    }

    #[test]
    fn tamper_delete_line_is_seq_gap() {
        let (_dir, path) = make_log(6);
        let mut lines = lines_of(&path);
        lines.remove(2);
        set_lines(&path, &lines);
        let p = problem(std::slice::from_ref(&path));
        assert_eq!(
            p,
            VerifyProblem::SeqGap {
                file: path.clone(),
                line_no: 3,
                expected: 3,
                found: 4
            }
        );
        assert!(p.to_string().contains("1 line(s) were deleted"), "{p}");
        // Deleting the last line is not detectable without an external anchor, but two at the end of a
        // rotated file are caught by the next file.
    }

    #[test]
    fn tamper_swap_lines_is_out_of_order() {
        let (_dir, path) = make_log(6);
        let mut lines = lines_of(&path);
        lines.swap(1, 2);
        set_lines(&path, &lines);
        assert_eq!(
            problem(std::slice::from_ref(&path)),
            VerifyProblem::OutOfOrder {
                file: path.clone(),
                line_no: 2,
                expected: 2,
                found: 3
            }
        );
        // A replayed (duplicated) line: seq goes backward.
        let mut lines = lines_of(&path);
        lines.swap(1, 2);
        lines.insert(4, lines[1].clone());
        set_lines(&path, &lines);
        assert_eq!(
            problem(std::slice::from_ref(&path)),
            VerifyProblem::OutOfOrder {
                file: path,
                line_no: 5,
                expected: 5,
                found: 2
            }
        );
    }

    #[test]
    fn tamper_truncated_mid_line_is_torn_last_line() {
        let (_dir, path) = make_log(6);
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 30)
            .unwrap();
        let report = verify(std::slice::from_ref(&path)).unwrap();
        assert_eq!(
            report.problem,
            Some(VerifyProblem::TornLastLine {
                file: path,
                line_no: 6
            })
        );
        assert_eq!(report.lines, 5);
        assert!(report.to_string().starts_with("FAILED: "), "{report}");
    }

    #[test]
    fn tamper_first_line_removed_is_truncated_start() {
        let (_dir, path) = make_log(6);
        let mut lines = lines_of(&path);
        lines.remove(0);
        set_lines(&path, &lines);
        assert_eq!(
            problem(std::slice::from_ref(&path)),
            VerifyProblem::TruncatedStart {
                file: path.clone(),
                line_no: 1,
                found: 2
            }
        );
        // Retention deleted older files: check the rest from the first line on.
        let report = verify_with(
            &[path],
            VerifyOptions {
                allow_partial_start: true,
            },
        )
        .unwrap();
        assert_eq!(
            report.to_string(),
            "OK: 5 lines, chain intact from seq 2 (earlier lines not checked)"
        );
    }

    #[test]
    fn tamper_missing_chain_and_appended_line() {
        let (_dir, path) = make_log(3);
        let mut lines = lines_of(&path);
        lines.push(r#"{"kind":"request","request_id":"forged"}"#.into());
        set_lines(&path, &lines);
        assert_eq!(
            problem(std::slice::from_ref(&path)),
            VerifyProblem::MissingChain {
                file: path,
                line_no: 4
            }
        );
    }

    #[test]
    fn verify_rotated_set_must_be_complete_and_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(AuditConfig {
            max_bytes: Some(2_000),
            ..cfg(&path)
        })
        .unwrap();
        write_n(&log, "r", 12);
        log.shutdown();
        let mut set: Vec<PathBuf> = (1..=ROTATE_KEEP)
            .rev()
            .map(|n| rotated_name(&path, n))
            .filter(|p| p.exists())
            .collect();
        set.push(path.clone());
        assert!((3..=ROTATE_KEEP as usize).contains(&set.len()), "{set:?}");
        assert!(verify(&set).unwrap().is_ok());
        // Newest-first by mistake.
        let reversed: Vec<PathBuf> = set.iter().rev().cloned().collect();
        assert!(matches!(
            problem(&reversed),
            VerifyProblem::TruncatedStart { .. }
        ));
        // A middle file missing.
        let n_first = lines_of(&set[0]).len() as u64;
        assert_eq!(
            problem(&[set[0].clone(), set[2].clone()]),
            VerifyProblem::SeqGap {
                file: set[2].clone(),
                line_no: 1,
                expected: n_first + 1,
                found: n_first + lines_of(&set[1]).len() as u64 + 1
            }
        );
    }

    // ---- rotation --------------------------------------------------------------------------------

    #[test]
    fn rotation_by_size_keeps_five_and_verifies_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let max = 1_500;
        let log = AuditLog::open(AuditConfig {
            max_bytes: Some(max),
            ..cfg(&path)
        })
        .unwrap();
        write_n(&log, "a", 8);
        let line_len = lines_of(&path)[0].len() as u64 + 1;
        assert!(line_len < max);
        write_n(&log, "b", 30);
        log.shutdown();
        let mut set: Vec<PathBuf> = (1..=ROTATE_KEEP)
            .rev()
            .map(|n| rotated_name(&path, n))
            .collect();
        set.push(path.clone());
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
        let log = AuditLog::open(AuditConfig {
            max_bytes: Some(max),
            ..cfg(&path)
        })
        .unwrap();
        write_n(&log, "c", 1);
        log.shutdown();
        let mut set: Vec<PathBuf> = (1..=ROTATE_KEEP)
            .rev()
            .map(|n| rotated_name(&path, n))
            .collect();
        set.push(path.clone());
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
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
        let report = verify(&[path]).unwrap();
        assert_eq!(report.to_string(), "OK: 6 lines, chain intact");
    }

    #[test]
    fn failed_truncation_leaves_a_terminated_remnant_that_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
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
        let report = verify(std::slice::from_ref(&path)).unwrap();
        assert_eq!(report.to_string(), "OK: 80000 lines, chain intact");
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

    // ---- reader ----------------------------------------------------------------------------------

    fn at(hour: u8) -> String {
        format!("2026-01-01T{hour:02}:00:00.000Z")
    }

    fn mixed_log() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
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
        let web =
            |id: &str, hour, status, decision: &str, reason: &str, path: &str| RequestRecord {
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
            })
            .collect::<Vec<_>>();
        assert_eq!(ids.len() as u64, n);
        (n, ids)
    }

    #[test]
    fn query_filters() {
        let (_dir, path) = mixed_log();
        let q = |f: Filter| run_query(&path, &f).1;
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(q(Filter::default()).len(), 9);
        assert_eq!(
            q(Filter {
                token: s("ci-deploy"),
                ..Default::default()
            }),
            ["e1", "e2"]
        );
        assert_eq!(
            q(Filter {
                token: s("tok_1"),
                ..Default::default()
            }),
            ["e1", "e2", "token.revoked"]
        );
        assert_eq!(
            q(Filter {
                token: s("tg_AbCd"),
                ..Default::default()
            }),
            ["e1", "e2", "token.revoked"]
        );
        assert_eq!(
            q(Filter {
                token: s("tg_ZzZzZzZz"),
                ..Default::default()
            }),
            ["e3"]
        );
        assert_eq!(
            q(Filter {
                account: s("bob"),
                ..Default::default()
            }),
            ["e5", "e6", "e9"]
        );
        assert_eq!(
            q(Filter {
                decision: s("deny"),
                ..Default::default()
            }),
            ["e2", "e3", "e4", "e6"]
        );
        assert_eq!(
            q(Filter {
                reason: s("unknown_token"),
                ..Default::default()
            }),
            ["e3"]
        );
        assert_eq!(
            q(Filter {
                reason: s("leaked"),
                ..Default::default()
            }),
            ["token.revoked"]
        );
        assert_eq!(
            q(Filter {
                status: s("403"),
                ..Default::default()
            }),
            ["e2"]
        );
        assert_eq!(
            q(Filter {
                status: s("4xx"),
                ..Default::default()
            }),
            ["e2", "e3", "e4", "e6"]
        );
        assert_eq!(
            q(Filter {
                status: s("5XX"),
                ..Default::default()
            }),
            ["e9"]
        );
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
                event: s("token.revoked"),
                ..Default::default()
            }),
            ["token.revoked"]
        );
        assert_eq!(
            q(Filter {
                event: s("account.*"),
                ..Default::default()
            }),
            ["account.created"]
        );
        assert_eq!(
            q(Filter {
                account: s("alice"),
                decision: s("deny"),
                ..Default::default()
            }),
            ["e2"]
        );
        for bad in [
            Filter {
                status: s("4x"),
                ..Default::default()
            },
            Filter {
                decision: s("maybe"),
                ..Default::default()
            },
        ] {
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
        assert_eq!(
            parse_time_arg("1h", now).unwrap(),
            time::macros::datetime!(2026-11-23 04:00:00 UTC)
        );
        assert_eq!(
            parse_time_arg("30m", now).unwrap(),
            time::macros::datetime!(2026-11-23 04:30:00 UTC)
        );
        assert_eq!(
            parse_time_arg("7d", now).unwrap(),
            time::macros::datetime!(2026-11-16 05:00:00 UTC)
        );
        assert_eq!(
            parse_time_arg("45s", now).unwrap(),
            time::macros::datetime!(2026-11-23 04:59:15 UTC)
        );
        assert_eq!(
            parse_time_arg("2026-11-23T06:01:02+01:00", now).unwrap(),
            time::macros::datetime!(2026-11-23 05:01:02 UTC)
        );
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(AuditConfig {
            max_bytes: Some(3_000),
            ..cfg(&path)
        })
        .unwrap();
        write_n(&log, "a", 3);
        let per_file = 3_000 / (lines_of(&path)[0].len() + 1);

        let stop = Arc::new(AtomicBool::new(false));
        let (out, err) = (SharedBuf::default(), SharedBuf::default());
        let handle = {
            let (stop, path, mut out, mut err) =
                (stop.clone(), path.clone(), out.clone(), err.clone());
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
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
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
}
