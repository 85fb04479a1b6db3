//! Write-ahead support of the writer: what a request waits on until its decision line is
//! written ([`Durable`], fed by the writer's [`Mark`], published once per written batch), and
//! the CLI's check that the log can take a record before it changes anything
//! ([`AuditLog::check_room`]).

use std::fmt;
use std::io;
use std::path::PathBuf;

use super::{AuditError, AuditLog, OnFailure, UnavailableCause, lock};

/// Bytes [`AuditLog::check_room`] must be able to write next to the log (an admin line is
/// well under this).
const ROOM_PROBE: usize = 4096;

/// The writer's progress as write-ahead waiters see it.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Mark {
    pub(super) written: u64,
    pub(super) failing: bool,
    pub(super) gone: bool,
}

/// A committed record's line on its way to the file ([`Reservation::commit`]).
#[must_use = "a write-ahead record is only durable once `written` resolves"]
pub struct Durable {
    pub(super) rx: Option<tokio::sync::watch::Receiver<Mark>>,
    pub(super) on_failure: OnFailure,
    pub(super) ticket: u64,
    /// Already settled when `commit` returned (written inline, failed inline, writer gone).
    pub(super) done: Option<Result<(), AuditError>>,
}

impl Durable {
    /// Resolves once the line is written. Fails with `Unavailable` when writes are failing and
    /// `on_failure = "reject"` (the line stays queued and is written on recovery), `Closed`
    /// when the writer stopped. With `on_failure = "continue"` a failing log does not hold the
    /// request: it resolves at once (the line waits in memory, as every record then does).
    pub async fn written(self) -> Result<(), AuditError> {
        if let Some(done) = self.done {
            return done;
        }
        let Some(mut rx) = self.rx else {
            return Err(AuditError::Closed);
        };
        let ticket = self.ticket;
        let on_failure = self.on_failure;
        let m = rx
            .wait_for(|m| m.written >= ticket || m.gone || m.failing)
            .await
            .map(|m| *m)
            .map_err(|_| AuditError::Closed)?;
        if m.written >= ticket {
            Ok(())
        } else if m.gone {
            Err(AuditError::Closed)
        } else if on_failure == OnFailure::Continue {
            Ok(())
        } else {
            Err(AuditError::Unavailable {
                cause: UnavailableCause::Failing,
            })
        }
    }
}

impl Durable {
    /// Whether `commit` settled it (the line was written inline, or that write failed).
    #[cfg(test)]
    pub(in crate::audit) fn settled(&self) -> bool {
        self.done.is_some()
    }

    /// A record whose fate `commit` already knows.
    pub(super) fn done(result: Result<(), AuditError>) -> Durable {
        Durable {
            rx: None,
            on_failure: OnFailure::Reject,
            ticket: 0,
            done: Some(result),
        }
    }
}

impl fmt::Debug for Durable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Durable")
            .field("ticket", &self.ticket)
            .finish()
    }
}

impl AuditLog {
    /// The writer thread is parked, waiting for a producer's wake-up (so it does not touch the
    /// core until something is queued).
    #[cfg(test)]
    pub(in crate::audit) fn writer_parked(&self) -> bool {
        lock(&self.inner.shared.queue).parked
    }

    /// Whether the log can take a record now, checked without writing to the log: the writer is
    /// healthy and the file system under the log accepts [`ROOM_PROBE`] bytes (written to the
    /// writer's own lock file `<path>.lock`, then cut back to zero). For the CLI, which must not
    /// change anything it cannot audit. Stdout always can.
    pub fn check_room(&self) -> Result<(), AuditError> {
        let failing = AuditError::Unavailable {
            cause: UnavailableCause::Failing,
        };
        if !self.is_healthy() {
            return Err(failing);
        }
        let guard = lock(&self.inner.writer_lock);
        let Some(f) = guard.as_ref() else {
            return Ok(());
        };
        let probe = || -> io::Result<()> {
            use std::io::{Seek, Write};
            let mut f = f;
            f.seek(io::SeekFrom::Start(0))?;
            let r = f
                .write_all(&[b' '; ROOM_PROBE])
                .and_then(|()| f.sync_data());
            let cut = f.set_len(0);
            r.and(cut)
        };
        probe().map_err(|source| AuditError::Io {
            path: PathBuf::from("<audit log>.lock"),
            source,
        })
    }
}
