//! The writer thread: takes what producers queued, in batches, and has [`Core`](super::core)
//! encode and write it; retries while the sink fails, reopens on request, and at shutdown
//! writes everything accepted (waiting up to a grace period for outstanding reservations).

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{Entry, Queue, Shared, lock};

/// At shutdown, how long the writer keeps retrying a failing sink / waiting for outstanding
/// reservations before it gives up (and logs how many records were lost).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// After a round that wrote records, the writer naps this long before taking the next batch,
/// without asking producers to wake it: under load a record then costs a push under an
/// uncontended mutex instead of a futex wake and two context switches. Bounds how long a line
/// waits in memory while the writer is busy; an idle writer is woken by the first record at once.
const BATCH_WINDOW: Duration = Duration::from_millis(2);
/// Producers wake a napping writer early once this many records are queued.
pub(super) const WAKE_AT: usize = 1024;

/// Sleeps on the writer's condition variable, at most `timeout` (`None`: until woken), with the
/// flag `flag` picks (`napping` or `parked`: how producers tell whether to wake it) set meanwhile.
fn sleep<'a>(
    shared: &'a Shared,
    mut q: MutexGuard<'a, Queue>,
    flag: fn(&mut Queue) -> &mut bool,
    timeout: Option<Duration>,
) -> MutexGuard<'a, Queue> {
    *flag(&mut q) = true;
    q = match timeout {
        Some(t) => {
            let woken = shared.wake.wait_timeout(q, t);
            woken.unwrap_or_else(PoisonError::into_inner).0
        }
        None => shared.wake.wait(q).unwrap_or_else(PoisonError::into_inner),
    };
    *flag(&mut q) = false;
    q
}

pub(super) fn run(shared: Arc<Shared>) {
    let mut closing_since: Option<Instant> = None;
    let mut busy = false;
    let mut batch: Vec<Entry> = Vec::new();
    loop {
        // What the core says, read before the queue lock (the core is never taken while the
        // queue is held): a request that makes the core fail after this sets `kick`.
        let (next_retry, nothing_pending) = {
            let c = lock(&shared.core);
            (c.next_retry, c.pending.is_empty())
        };
        let idle = nothing_pending && shared.slots.load(Ordering::Acquire) == 0;
        {
            let mut q = lock(&shared.queue);
            if busy && !q.closing && !q.reopen && !q.urgent && !q.kick && q.entries.len() < WAKE_AT
            {
                // Let a batch gather; producers do not wake us meanwhile (parked = false),
                // except the first write-ahead record, which must not wait for the nap.
                q = sleep(&shared, q, |q| &mut q.napping, Some(BATCH_WINDOW));
            }
            loop {
                if !q.entries.is_empty() || q.reopen || q.kick {
                    break;
                }
                if q.closing
                    && (idle || closing_since.is_some_and(|t| t.elapsed() >= SHUTDOWN_GRACE))
                {
                    break;
                }
                let now = Instant::now();
                let mut wait = next_retry.map(|t| t.saturating_duration_since(now));
                if q.closing {
                    let poll = Duration::from_millis(10);
                    wait = Some(wait.map_or(poll, |w| w.min(poll)));
                }
                match wait {
                    Some(w) if w.is_zero() => break,
                    Some(w) => {
                        q = sleep(&shared, q, |q| &mut q.parked, Some(w));
                        break;
                    }
                    None => q = sleep(&shared, q, |q| &mut q.parked, None),
                }
            }
        }
        // The batch is taken with the core held (core, then queue: the one lock order), so no
        // request writing inline can take later records before this batch is written.
        let mut c = lock(&shared.core);
        let (reopen, closing) = {
            let mut q = lock(&shared.queue);
            let reopen = std::mem::take(&mut q.reopen);
            q.urgent = false;
            q.kick = false;
            // Swap in last round's (empty) Vec so its capacity is reused, not reallocated.
            std::mem::swap(&mut q.entries, &mut batch);
            (reopen, q.closing)
        };
        busy = !batch.is_empty();
        let idle = {
            for entry in batch.drain(..) {
                c.encode(&shared, entry, true);
            }
            if reopen {
                c.reopen(&shared);
            }
            c.try_write(&shared);
            c.pending.is_empty() && shared.slots.load(Ordering::Acquire) == 0
        };
        drop(c);
        if closing {
            let since = *closing_since.get_or_insert_with(Instant::now);
            let drained = lock(&shared.queue).entries.is_empty();
            if drained && (idle || since.elapsed() >= SHUTDOWN_GRACE) {
                break;
            }
        }
    }
    finish(&shared);
}

fn finish(shared: &Shared) {
    // The core first: from here on no request writes inline.
    let unwritten = lock(&shared.core).stop();
    let leftover = {
        let mut q = lock(&shared.queue);
        q.writer_gone = true;
        std::mem::take(&mut q.entries).len()
    };
    let lost = unwritten + leftover;
    if lost > 0 {
        shared.healthy.store(false, Ordering::Release);
        tracing::error!(lost, "audit writer stopped with records it could not write");
    }
    lock(&shared.progress).writer_gone = true;
    shared.progress_cv.notify_all();
    shared.mark.send_modify(|m| m.gone = true);
}
