//! The log's write state ([`Core`]): the sink, the chain (`seq`, `prev`), the encoded lines not
//! yet written, and everything that happens to the file: encoding, writing whole lines, cutting
//! back a short write, rotation, reopen, failures and recovery.
//!
//! It lives behind [`Shared::core`](super::Shared), a mutex taken by the writer thread for each
//! batch and, without waiting (`try_lock`), by a request that writes its own decision line
//! ([`Core::write_inline`]) while the writer is idle and healthy. Whoever holds it takes what is
//! queued (under the core lock, so records keep the order they were queued in), numbers it,
//! and writes it before letting go: the file stays in `seq` order and in queue order.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::super::line::{self, ends_with_newline, shift_rotated};
use super::super::sink::{Opener, Sink};
use super::super::{Entry, OnFailure, now_rfc3339};
use super::{Shared, lock};

/// Failure alerts (and failed-rotation warnings) are logged at most this often.
const ALERT_INTERVAL: Duration = Duration::from_secs(10);
/// The writer hands the sink at most this many bytes per write call.
const CHUNK_BYTES: usize = 64 * 1024;

/// What must happen to the sink's tail before the next line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Repair {
    None,
    /// Cut partial bytes of a failed write back to this length.
    Truncate(u64),
    /// An incomplete line is in the file (torn at start, or truncation failed): end it first.
    Newline,
}

/// What [`Core::write_inline`] did with a record.
// The declined entry moves back once, by value, to be queued: boxing it would allocate per
// request for nothing (as for `Entry` itself).
#[allow(clippy::large_enum_variant)]
pub(super) enum Inline {
    /// The line is written (`write()` returned); its slot has been released with it.
    Written,
    /// The write failed: the line is encoded and waits in `pending` (it keeps its slot), the
    /// writer is marked failing and must be woken to retry. Its slot is the line's now.
    Failed,
    /// Not attempted (the writer has work or trouble of its own): queue the record instead.
    Declined(Entry),
}

pub(super) struct Core {
    pub(super) path: Option<PathBuf>,
    pub(super) opener: Opener,
    pub(super) retry: Duration,
    pub(super) max_bytes: Option<u64>,
    /// None after a failed (re)open; reopened on the next attempt.
    pub(super) sink: Option<Box<dyn Sink>>,
    /// The file's length as this writer knows it: read when the file is opened, then grown by
    /// what it writes (no `stat` per batch). None for streams. Checked against the file before a
    /// rotation and after a failed write.
    pub(super) len: Option<u64>,
    /// seq of the last encoded line.
    pub(super) seq: u64,
    /// chain of the last encoded line (hex).
    pub(super) prev: String,
    /// Encoded lines not yet written, in seq order, each with whether it was queued (it has a
    /// ticket; false for a line written inline). Never dropped or reordered: the chain of every
    /// later line depends on them. Each holds one slot until it is written.
    pub(super) pending: VecDeque<(Vec<u8>, bool)>,
    /// The queue's entries, swapped out by an inline writer (kept for its capacity).
    pub(super) spare: Vec<Entry>,
    pub(super) chunk: Vec<u8>,
    pub(super) ends: Vec<usize>,
    pub(super) repair: Repair,
    /// Some while failing: when to try again.
    pub(super) next_retry: Option<Instant>,
    pub(super) failures_in_row: u64,
    pub(super) next_alert: Option<Instant>,
    pub(super) next_rotation_try: Option<Instant>,
    pub(super) warned_query: bool,
    /// The writer has stopped (and may have given up the writer lock): nothing is written any more.
    pub(super) gone: bool,
}

impl Core {
    /// Fills in what the caller left empty (timestamp) or must not log (a query).
    fn prepare(&mut self, entry: &mut Entry) {
        match entry {
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
    }

    /// Seals the entry as the next line of the chain and adds it to the lines to write;
    /// `queued`: it came through the queue (it has a ticket), else it is an inline line.
    pub(super) fn encode(&mut self, shared: &Shared, mut entry: Entry, queued: bool) {
        self.prepare(&mut entry);
        self.seq += 1;
        let (line, chain) = line::encode(&entry, self.seq, &self.prev);
        self.prev = chain;
        self.pending.push_back((line, queued));
        if !queued {
            shared.depth.fetch_add(1, Ordering::Relaxed);
            shared.untracked.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Writes `entry` now, on the caller's thread, when nothing stands in the way: the writer is
    /// healthy, has no line waiting, no tail to repair, no rotation near and no reopen asked,
    /// and has not stopped. Whatever is queued goes first, in the same `write()` (the caller
    /// does one round of the writer's work: queue order is kept, and a busy moment costs one
    /// write for many records, not one each).
    pub(super) fn write_inline(&mut self, shared: &Shared, entry: Entry) -> Inline {
        if self.gone
            || self.sink.is_none()
            || self.repair != Repair::None
            || self.next_retry.is_some()
            || !self.pending.is_empty()
            || self.rotation_near()
        {
            return Inline::Declined(entry);
        }
        let mut queued = std::mem::take(&mut self.spare);
        {
            let mut q = lock(&shared.queue);
            if q.reopen {
                drop(q);
                self.spare = queued;
                return Inline::Declined(entry);
            }
            std::mem::swap(&mut q.entries, &mut queued);
            q.urgent = false;
        }
        for e in queued.drain(..) {
            self.encode(shared, e, true);
        }
        self.spare = queued;
        self.encode(shared, entry, false);
        self.try_write(shared);
        if self.pending.is_empty() {
            Inline::Written
        } else {
            Inline::Failed
        }
    }

    /// The file is within a chunk of `max_bytes`: leave the rotation (and its `fsync`) to the
    /// writer thread.
    fn rotation_near(&self) -> bool {
        matches!((self.max_bytes, self.len),
            (Some(max), Some(len)) if len + CHUNK_BYTES as u64 > max)
    }

    /// The next line (`next` bytes) would take the file over `max_bytes` and a rotation may be
    /// tried now (judged by the tracked length; [`write_pending`](Self::write_pending) checks
    /// it against the file before it rotates).
    fn rotation_due(&self, next: usize) -> bool {
        matches!((self.max_bytes, self.len),
            (Some(max), Some(len)) if len > 0 && len + next as u64 > max)
            && self.next_rotation_try.is_none_or(|t| Instant::now() >= t)
    }

    fn grow(&mut self, n: usize) {
        if let Some(len) = self.len.as_mut() {
            *len += n as u64;
        }
    }

    /// A failed write left the last `partial` bytes of a line in the file: cut them off so
    /// the file ends on a line (or, when that is not possible, end the remnant with a newline
    /// before the next line). The target is taken from the file itself, not the tracked length.
    fn cut_back(&mut self, partial: usize) {
        let Some(sink) = self.sink.as_mut() else {
            return;
        };
        let (repair, len) = match sink.size() {
            Ok(Some(actual)) => {
                let good = actual.saturating_sub(partial as u64);
                match sink.truncate(good) {
                    Ok(()) => (Repair::None, Some(good)),
                    Err(_) => (Repair::Truncate(good), Some(actual)),
                }
            }
            Ok(None) => (Repair::Newline, None),
            Err(_) => (Repair::Newline, self.len),
        };
        self.repair = repair;
        self.len = len;
    }

    pub(super) fn reopen(&mut self, shared: &Shared) {
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
                self.failed(shared, &e);
            }
        }
    }

    /// Opens `path`, reads its length, and notes an unterminated tail so the next line starts
    /// on a fresh line.
    fn open_sink(&mut self, path: &Path) -> io::Result<Box<dyn Sink>> {
        let sink = (self.opener)(path)?;
        let len = sink.size()?;
        if len.unwrap_or(0) > 0 && !ends_with_newline(path)? {
            self.repair = Repair::Newline;
        } else if self.repair != Repair::None {
            // Partial bytes of a failed write were in the old file, not this one.
            self.repair = Repair::None;
        }
        self.len = len;
        Ok(sink)
    }

    /// Writes what is pending (or retries, when failing and it is time).
    pub(super) fn try_write(&mut self, shared: &Shared) {
        let failing = self.next_retry.is_some();
        if failing && self.next_retry.is_some_and(|t| Instant::now() < t) {
            return;
        }
        if !failing && self.pending.is_empty() && self.sink.is_some() && self.repair == Repair::None
        {
            return;
        }
        match self.write_pending(shared) {
            Ok(()) => self.recovered(shared),
            Err(e) => self.failed(shared, &e),
        }
    }

    /// A write succeeded. Called before the written lines are published, so a `flush` that
    /// returns never sees the writer still marked unhealthy.
    fn recovered(&mut self, shared: &Shared) {
        if self.next_retry.is_none() && self.failures_in_row == 0 {
            // Never failed since the last recovery: nothing to publish.
            return;
        }
        if self.next_retry.take().is_some() {
            tracing::warn!(
                failed_attempts = self.failures_in_row,
                "audit log writable again; queued records are being written"
            );
        }
        self.failures_in_row = 0;
        self.next_alert = None;
        shared.healthy.store(true, Ordering::Release);
        shared
            .mark
            .send_if_modified(|m| std::mem::replace(&mut m.failing, false));
    }

    fn failed(&mut self, shared: &Shared, e: &io::Error) {
        let now = Instant::now();
        self.failures_in_row += 1;
        shared.write_failures.fetch_add(1, Ordering::Relaxed);
        shared.healthy.store(false, Ordering::Release);
        shared
            .mark
            .send_if_modified(|m| !std::mem::replace(&mut m.failing, true));
        self.next_retry = Some(now + self.retry);
        if self.next_alert.is_none_or(|t| now >= t) {
            self.next_alert = Some(now + ALERT_INTERVAL);
            let path = self
                .path
                .as_deref()
                .map_or(Cow::Borrowed("stdout"), |p| p.to_string_lossy());
            match shared.on_failure {
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
    fn write_pending(&mut self, shared: &Shared) -> io::Result<()> {
        if self.sink.is_none() {
            let path = self.path.clone().unwrap_or_default();
            self.sink = Some(self.open_sink(&path)?);
        }
        if let Repair::Truncate(good) = self.repair {
            if let Some(sink) = self.sink.as_mut() {
                self.repair = match sink.truncate(good) {
                    Ok(()) => {
                        self.len = self.len.map(|_| good);
                        Repair::None
                    }
                    Err(_) => Repair::Newline,
                };
            }
        }
        if self.repair == Repair::Newline {
            if let Some(sink) = self.sink.as_mut() {
                let (n, err) = write_counted(sink.as_mut(), b"\n");
                self.grow(n);
                err.map_or(Ok(()), Err)?;
            }
            self.repair = Repair::None;
        }
        while let Some((front, _)) = self.pending.front() {
            if self.rotation_due(front.len()) {
                let Some(sink) = self.sink.as_mut() else {
                    break;
                };
                // Trust the file over the tracked length (it may have been cut behind our back).
                let actual = sink.size()?;
                if actual != self.len {
                    self.len = actual;
                    continue;
                }
                self.rotate()?;
                continue;
            }
            let start = self.len;
            self.chunk.clear();
            self.ends.clear();
            for (line, _) in &self.pending {
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
            self.grow(n);
            let complete = self.ends.iter().take_while(|&&e| e <= n).count();
            let boundary = if complete == 0 {
                0
            } else {
                self.ends[complete - 1]
            };
            let Some(e) = err else {
                self.recovered(shared);
                self.written(shared, complete);
                continue;
            };
            self.written(shared, complete);
            if n > boundary {
                self.cut_back(n - boundary);
            }
            return Err(e);
        }
        if let Some(sink) = self.sink.as_mut() {
            sink.flush()?;
        }
        Ok(())
    }

    /// The first `n` pending lines are in the file: drop them and publish them.
    fn written(&mut self, shared: &Shared, n: usize) {
        let queued = self.pending.drain(..n).filter(|(_, q)| *q).count();
        if queued < n {
            shared.untracked.fetch_sub(n - queued, Ordering::AcqRel);
        }
        mark_written(shared, n, queued);
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

    /// The writer stops: the file is flushed and synced, and nothing is written after this.
    /// Returns how many encoded lines could not be written.
    pub(super) fn stop(&mut self) -> usize {
        if let Some(sink) = self.sink.as_mut() {
            let _ = sink.flush();
            let _ = sink.sync();
        }
        self.gone = true;
        self.pending.len()
    }
}

/// Publishes `lines` lines as written, `ticketed` of them queued ones (the rest were written
/// inline: no ticket): frees their slots, moves the queue's progress for `flush` and
/// write-ahead waiters, and wakes `flush` waiters only if some wait.
fn mark_written(s: &Shared, lines: usize, ticketed: usize) {
    if lines == 0 {
        return;
    }
    s.lines_written.fetch_add(lines as u64, Ordering::Relaxed);
    s.depth.fetch_sub(lines, Ordering::Relaxed);
    s.slots.fetch_sub(lines, Ordering::AcqRel);
    if ticketed == 0 {
        return;
    }
    let waiting = {
        let mut p = lock(&s.progress);
        p.written += ticketed as u64;
        p.waiters > 0
    };
    if waiting {
        s.progress_cv.notify_all();
    }
    s.mark.send_modify(|m| m.written += ticketed as u64);
}

/// Writes `buf` with as many `write` calls as needed; returns the bytes written and the error
/// that stopped it, if any (so a short write followed by ENOSPC is known precisely).
pub(super) fn write_counted(sink: &mut dyn Sink, buf: &[u8]) -> (usize, Option<io::Error>) {
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
