//! The audit writer: one std thread per log that encodes records in order and writes them,
//! its cheap-to-clone handle [`AuditLog`] and the [`Reservation`] a request holds before it is
//! forwarded.
//!
//! Owns the bounded queue, the sinks (file, stdout, test doubles), write-failure handling
//! (reject/continue, retries, alerts), size rotation and reopen, and the writer lock.
//! The line format and chain are [`super::line`]'s. Never imports `config`, `gateway`, `cli`,
//! `store` or the reader/verifier.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::line::{self, GENESIS_CHAIN, ends_with_newline, read_tail, rotated_name, shift_rotated};
use super::sink::{Opener, Sink, StdoutSink, file_opener, take_writer_lock};
use super::{AuditConfig, AuditError, Entry, OnFailure, UnavailableCause, now_rfc3339};

mod wal;
pub use wal::Durable;
use wal::Mark;

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
/// The writer hands the sink at most this many bytes per write call.
const CHUNK_BYTES: usize = 64 * 1024;

/// Writer knobs that tests shorten or replace.
pub(super) struct WriterOptions {
    pub(super) opener: Opener,
    pub(super) retry: Duration,
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
    /// What [`Durable`] waiters watch: lines written, failing, writer gone. Published once per
    /// written batch (group commit), never per record.
    mark: tokio::sync::watch::Sender<Mark>,
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
    /// The writer is napping between batches (see [`BATCH_WINDOW`]).
    napping: bool,
    /// A queued record has a write-ahead waiter: the writer takes the next batch without a nap.
    urgent: bool,
}

#[derive(Default)]
struct Progress {
    written: u64,
    writer_gone: bool,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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

    pub(super) fn open_with(cfg: AuditConfig, opts: WriterOptions) -> Result<AuditLog, AuditError> {
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
            mark: tokio::sync::watch::Sender::new(Mark::default()),
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
    pub fn send(self, entry: Entry) {
        self.push(entry, false);
    }

    /// Write-ahead: hands the record to the writer and returns what resolves once its line is
    /// written (the `write` call returned: in the page cache, so it survives the process being
    /// killed, not a power loss). Records committed while the writer is busy go out together in
    /// its next write (group commit); the writer publishes its progress once per batch.
    pub fn commit(self, entry: Entry) -> Durable {
        let shared = self.shared.clone();
        let ticket = self.push(entry, true);
        match (shared, ticket) {
            (Some(s), Some(ticket)) => Durable {
                rx: Some(s.mark.subscribe()),
                on_failure: s.on_failure,
                ticket,
            },
            _ => Durable {
                rx: None,
                on_failure: OnFailure::Reject,
                ticket: 0,
            },
        }
    }

    /// Queues the record; returns its ticket (the `accepted` count including it), None when
    /// the writer is gone.
    fn push(mut self, entry: Entry, urgent: bool) -> Option<u64> {
        let shared = self.shared.take()?;
        let mut q = lock(&shared.queue);
        if q.writer_gone {
            drop(q);
            shared.slots.fetch_sub(1, Ordering::AcqRel);
            tracing::error!(
                request_id = entry_request_id(&entry),
                "audit record sent after the writer stopped; it was NOT written"
            );
            return None;
        }
        q.entries.push(entry);
        q.accepted += 1;
        let ticket = q.accepted;
        shared.depth.fetch_add(1, Ordering::Relaxed);
        // A napping writer is woken by the first urgent record of its nap only.
        let wake = q.parked || q.entries.len() >= WAKE_AT || (urgent && q.napping && !q.urgent);
        q.urgent |= urgent;
        drop(q);
        if wake {
            shared.wake.notify_one();
        }
        Some(ticket)
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
        Entry::Completion(c) => &c.request_id,
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
                if busy && !q.closing && !q.reopen && !q.urgent && q.entries.len() < WAKE_AT {
                    // Let a batch gather; producers do not wake us meanwhile (parked = false),
                    // except the first write-ahead record, which must not wait for the nap.
                    q.napping = true;
                    q = shared
                        .wake
                        .wait_timeout(q, BATCH_WINDOW)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    q.napping = false;
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
                q.urgent = false;
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
        self.shared.mark.send_modify(|m| m.gone = true);
    }

    /// Fills in what the caller left empty (timestamp) or must not log (a query), then seals the
    /// entry as the next line of the chain.
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
            Entry::Completion(c) => {
                if c.timestamp.is_empty() {
                    c.timestamp = now_rfc3339();
                }
            }
        }
        self.seq += 1;
        let (line, chain) = line::encode(&entry, self.seq, &self.prev);
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
        self.shared
            .mark
            .send_if_modified(|m| std::mem::replace(&mut m.failing, false));
    }

    fn failed(&mut self, e: &io::Error) {
        let now = Instant::now();
        self.failures_in_row += 1;
        self.shared.write_failures.fetch_add(1, Ordering::Relaxed);
        self.shared.healthy.store(false, Ordering::Release);
        self.shared
            .mark
            .send_if_modified(|m| !std::mem::replace(&mut m.failing, true));
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
    s.mark.send_modify(|m| m.written += n as u64);
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
