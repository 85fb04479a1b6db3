//! The write-ahead part of the pipeline (issue 16): the decision line written before step 9
//! sends a byte, and the completion line written when the response body ends — complete, cut by
//! the upstream, stalled, or dropped because the client left.

use std::time::Instant;

use crate::audit::{CompletionRecord, Entry, Reservation};
use crate::body::Body;
use crate::error::Reject;
use crate::gateway::Gateway;

use super::{Ctx, Strings, ms, record_of};

impl Gateway {
    /// Write-ahead (before step 9 sends a byte): the decision line of the request is written to
    /// the log, and a slot is reserved for its completion. Refused (503) when the log cannot take
    /// it, exactly like the reservation of step 8.
    pub(super) async fn write_ahead(&self, ctx: &mut Ctx, start: Instant) -> Result<(), Reject> {
        let completion = self
            .inner
            .audit
            .reserve()
            .map_err(|_| Reject::AuditUnavailable)?;
        let Some(decision_slot) = ctx.reservation.replace(completion) else {
            return Err(Reject::Internal);
        };
        // The context so far, copied (the request goes on); no status yet.
        let mut record = record_of(ctx, Strings::Copy, 0, "allow", "ok", start.elapsed());
        record.phase = Some("decision".into());
        ctx.decided = true;
        decision_slot
            .commit(Entry::Request(record))
            .written()
            .await
            .map_err(|_| Reject::AuditUnavailable)
    }
}

/// Writes a forwarded request's completion line into its reserved slot (or a fresh one).
pub(super) fn send_completion(
    gw: &Gateway,
    slot: Option<Reservation>,
    mut c: CompletionRecord,
    outcome: &'static str,
    bytes: u64,
    start: Instant,
) {
    c.outcome = outcome.into();
    c.bytes = bytes;
    c.duration_ms = ms(start.elapsed());
    let slot = match slot {
        Some(r) => Ok(r),
        None => gw.inner.audit.reserve(),
    };
    match slot {
        Ok(r) => r.send(Entry::Completion(c)),
        Err(e) => {
            crate::coalesced!(error, "audit_completion_unqueued", error = %e, request_id = %c.request_id, "the completion line of a forwarded request could not be queued; `audit verify` will name it");
        }
    }
}

/// The response body of a forwarded request: counts the bytes sent and writes the completion
/// line when the body ends — complete, cut by the upstream (`upstream_reset`), stalled past the
/// idle timeout (`upstream_idle`), or dropped before its end because the client left
/// (`client_closed`).
pub(super) struct Completing {
    pub(super) inner: Body,
    pub(super) pending: Option<Pending>,
    pub(super) bytes: u64,
}

/// A forwarded request's response, its body wrapped in [`Completing`]: the completion line is
/// written when the body ends.
pub(super) fn completing(response: http::Response<Body>, pending: Pending) -> http::Response<Body> {
    let (parts, body) = response.into_parts();
    let body = Completing {
        inner: body,
        pending: Some(pending),
        bytes: 0,
    };
    http::Response::from_parts(parts, http_body_util::BodyExt::boxed_unsync(body))
}

/// A forwarded request's completion, still to be written: its slot, its record, its start.
pub(crate) type Pending = (Reservation, CompletionRecord, Instant);

/// Writes a pending completion line (once): `outcome` as in [`Completing`].
fn finish_pending(pending: &mut Option<Pending>, outcome: &'static str, bytes: u64) {
    if let Some((slot, mut c, start)) = pending.take() {
        if outcome != "complete" {
            c.reason = outcome.into();
        }
        c.outcome = outcome.into();
        c.bytes = bytes;
        c.duration_ms = ms(start.elapsed());
        slot.send(Entry::Completion(c));
    }
}

impl Completing {
    fn finish(&mut self, outcome: &'static str) {
        finish_pending(&mut self.pending, outcome, self.bytes);
    }
}

/// The completion of a forwarded request whose body the HTTP/1 fast path streams itself: the
/// same outcomes as [`Completing`] (`complete`, `upstream_reset`, `upstream_idle`, and
/// `client_closed` when dropped before [`finish`](Self::finish)).
pub(crate) struct CompletionSlot {
    pending: Option<Pending>,
    bytes: u64,
}

impl CompletionSlot {
    pub(super) fn new(pending: Option<Pending>) -> CompletionSlot {
        CompletionSlot { pending, bytes: 0 }
    }

    /// Counts `n` more body bytes sent to the client.
    pub(crate) fn sent(&mut self, n: usize) {
        self.bytes += n as u64;
    }

    /// Writes the completion line with `outcome`.
    pub(crate) fn finish(&mut self, outcome: &'static str) {
        finish_pending(&mut self.pending, outcome, self.bytes);
    }
}

impl Drop for CompletionSlot {
    fn drop(&mut self) {
        finish_pending(&mut self.pending, "client_closed", self.bytes);
    }
}

impl http_body::Body for Completing {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish("complete");
                }
            }
            std::task::Poll::Ready(Some(Err(e))) => {
                let idle = e.downcast_ref::<crate::body::BodyError>().is_some();
                this.finish(if idle {
                    "upstream_idle"
                } else {
                    "upstream_reset"
                });
            }
            std::task::Poll::Ready(None) => this.finish("complete"),
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Completing {
    fn drop(&mut self) {
        use http_body::Body as _;
        let outcome = if self.inner.is_end_stream() {
            "complete"
        } else {
            "client_closed"
        };
        self.finish(outcome);
    }
}
