//! The audit writer: one std thread per log that encodes records in order and writes them,
//! its cheap-to-clone handle [`AuditLog`] and the [`Reservation`] a request holds before it is
//! forwarded. A write-ahead line may instead be written by the request itself while the writer
//! is idle and healthy ([`Reservation::commit`]), under the same lock, so one chain, in order.
//!
//! Owns the bounded queue, the sinks (file, stdout, test doubles), write-failure handling
//! (reject/continue, retries, alerts), size rotation and reopen, and the writer lock. The file
//! state and its I/O are in `core`, the thread's loop in `thread`, write-ahead waits in `wal`.
//! The line format and chain are [`super::line`]'s. Never imports `config`, `gateway`, `cli`,
//! `store` or the reader/verifier.

use std::fmt;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::line::{GENESIS_CHAIN, read_tail, rotated_name};
use super::sink::{Opener, Sink, StdoutSink, file_opener, take_writer_lock};
use super::{AuditConfig, AuditError, Entry, OnFailure, UnavailableCause};

mod core;
mod thread;
mod wal;
use self::core::{Core, Inline, Repair, write_counted};
pub use wal::Durable;
use wal::Mark;

/// While writes fail, the writer retries this often.
const RETRY_INTERVAL: Duration = Duration::from_millis(250);
/// `flush` gives up with `Unavailable` once the writer has been failing this long while it waits.
const FLUSH_FAILING_LIMIT: Duration = Duration::from_secs(5);
/// The writer's encode buffer starts at this size.
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
    /// The file, the chain and the lines not yet written. Held by the writer thread for a batch,
    /// and by a request writing its own decision line inline (`try_lock`, never waiting). Lock
    /// order: never taken while `queue` is held.
    core: Mutex<Core>,
    /// Producers push under this lock; the writer swaps the whole Vec out, so it is held only
    /// for a push or a swap, never during I/O.
    queue: Mutex<Queue>,
    /// Wakes the writer (new entry, reopen, shutdown).
    wake: Condvar,
    /// Queued lines written so far, for `flush` waiters; a separate lock so waiters never slow
    /// producers.
    progress: Mutex<Progress>,
    progress_cv: Condvar,
    /// Slots in use: outstanding reservations + sent-but-unwritten records. Bounded by `capacity`.
    slots: AtomicUsize,
    /// Sent-but-unwritten records (queued, or encoded and waiting in the core).
    depth: AtomicUsize,
    /// Inline lines not yet written (their write failed): they wait in the core's `pending` with
    /// a slot but no ticket. Changed under the core lock; read by `flush`.
    untracked: AtomicUsize,
    healthy: AtomicBool,
    closed: AtomicBool,
    write_failures: AtomicU64,
    lines_written: AtomicU64,
    /// What [`Durable`] waiters watch: queued lines written, failing, writer gone. Published
    /// once per written batch (group commit), never per record.
    mark: tokio::sync::watch::Sender<Mark>,
}

#[derive(Default)]
struct Queue {
    entries: Vec<Entry>,
    /// Records ever queued (their tickets); `flush` waits until `Progress::written` reaches it.
    /// Lines written inline take no ticket: they are written before `commit` returns.
    accepted: u64,
    reopen: bool,
    closing: bool,
    writer_gone: bool,
    /// The writer is waiting for a producer's wake-up (it found the queue empty). While false
    /// the writer is working or napping between batches and will look at the queue by itself.
    parked: bool,
    /// The writer is napping between batches (see `thread::BATCH_WINDOW`).
    napping: bool,
    /// A queued record has a write-ahead waiter: the writer takes the next batch without a nap.
    urgent: bool,
    /// An inline write failed: the core has a line to retry (and a retry time the writer has
    /// not seen yet).
    kick: bool,
}

#[derive(Default)]
struct Progress {
    written: u64,
    writer_gone: bool,
    /// Threads in `flush`: the writer signals `progress_cv` only when some wait.
    waiters: usize,
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
        let (sink, len, seq, prev, repair) = match &cfg.path {
            None => (
                Box::new(StdoutSink(io::stdout())) as Box<dyn Sink>,
                None,
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
                // The one `stat` of the file until it is rotated or reopened.
                let len = sink.size().map_err(open_err)?;
                (sink, len, seq, prev, repair)
            }
        };
        let core = Core {
            path: cfg.path.clone(),
            opener: opts.opener,
            retry: opts.retry,
            max_bytes: cfg.max_bytes,
            sink: Some(sink),
            len,
            seq,
            prev,
            pending: Default::default(),
            spare: Vec::new(),
            chunk: Vec::with_capacity(CHUNK_BYTES),
            ends: Vec::new(),
            repair,
            next_retry: None,
            failures_in_row: 0,
            next_alert: None,
            next_rotation_try: None,
            warned_query: false,
            gone: false,
        };
        let shared = Arc::new(Shared {
            on_failure: cfg.on_failure,
            capacity: cfg.queue.max(1),
            core: Mutex::new(core),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            progress: Mutex::new(Progress::default()),
            progress_cv: Condvar::new(),
            slots: AtomicUsize::new(0),
            depth: AtomicUsize::new(0),
            untracked: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            closed: AtomicBool::new(false),
            write_failures: AtomicU64::new(0),
            lines_written: AtomicU64::new(0),
            mark: tokio::sync::watch::Sender::new(Mark::default()),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("tokengate-audit".into())
                .spawn(move || thread::run(shared))
                .map_err(AuditError::Spawn)?
        };
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
        p.waiters += 1;
        let mut failing_since: Option<Instant> = None;
        let result = loop {
            // A failed inline line has no ticket; its retry is seen by polling.
            if p.written >= target && s.untracked.load(Ordering::Acquire) == 0 {
                break Ok(());
            }
            if p.writer_gone {
                break Err(AuditError::Closed);
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
                break Err(AuditError::Unavailable {
                    cause: UnavailableCause::Failing,
                });
            }
        };
        p.waiters -= 1;
        result
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

    /// Write-ahead: writes the record's line and returns what resolves once it is written (the
    /// `write` call returned: in the page cache, so it survives the process being killed, not a
    /// power loss).
    ///
    /// When the writer is idle and healthy, the line is written here, on the caller's thread,
    /// under the writer's own lock (taken with `try_lock`: a busy writer is never waited for),
    /// after whatever was queued before it, in the same `write()`; the returned [`Durable`] is
    /// already resolved: no wake-up of the writer thread, none back. Otherwise the record is
    /// queued for the writer: records committed while it is busy go out together in its next
    /// write (group commit), and it publishes its progress once per batch.
    ///
    /// The inline `write()` is a blocking call on the caller's thread (an async worker): an
    /// append to the page cache, microseconds. When the disk holds it up, the worker waits where
    /// the request would have waited for the writer thread; rotation (with its `fsync`) is left
    /// to the writer thread.
    pub fn commit(mut self, entry: Entry) -> Durable {
        let Some(s) = self.shared.clone() else {
            return Durable::done(Err(AuditError::Closed));
        };
        let entry = match s.core.try_lock() {
            Ok(mut core) => core.write_inline(&s, entry),
            Err(TryLockError::Poisoned(p)) => p.into_inner().write_inline(&s, entry),
            Err(TryLockError::WouldBlock) => Inline::Declined(entry),
        };
        let entry = match entry {
            Inline::Declined(entry) => entry,
            Inline::Written => {
                // The slot went with the line (as for every written line).
                self.shared = None;
                return Durable::done(Ok(()));
            }
            Inline::Failed => {
                // The line waits in the core and keeps the slot until the writer writes it.
                self.shared = None;
                lock(&s.queue).kick = true;
                s.wake.notify_one();
                return Durable::done(match s.on_failure {
                    OnFailure::Continue => Ok(()),
                    OnFailure::Reject => Err(AuditError::Unavailable {
                        cause: UnavailableCause::Failing,
                    }),
                });
            }
        };
        match self.push(entry, true) {
            Some(ticket) => Durable {
                rx: Some(s.mark.subscribe()),
                on_failure: s.on_failure,
                ticket,
                done: None,
            },
            None => Durable::done(Err(AuditError::Closed)),
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
        let wake =
            q.parked || q.entries.len() >= thread::WAKE_AT || (urgent && q.napping && !q.urgent);
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
