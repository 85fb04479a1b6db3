//! The audit line of a request abandoned before it answered (client gone, drain deadline).

use super::*;

/// Writes the audit line of a request whose handling was abandoned before it answered.
pub(super) struct AuditGuard<'a> {
    pub(super) gw: &'a Gateway,
    pub(super) ctx: Ctx,
    pub(super) start: Instant,
    pub(super) armed: bool,
}

impl Drop for AuditGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // 499: the client closed the request before a response; 503 `shutdown`: the drain
        // deadline cut it (the client got no response either way).
        let gw = self.gw;
        let (code, reason) = if gw.inner.metrics.shutdown_cut.load(Ordering::Acquire) {
            (503, "shutdown")
        } else {
            (499, "client_closed")
        };
        let status = StatusCode::from_u16(code).expect("valid code");
        let decision = if self.ctx.upstream.is_some() {
            "allow"
        } else {
            "deny"
        };
        gw.inner
            .metrics
            .request(self.ctx.route.as_ref(), decision, reason, code);
        let reservation = self.ctx.reservation.take();
        if self.ctx.decided {
            let completion = CompletionRecord {
                request_id: std::mem::take(&mut self.ctx.request_id),
                status_code: code,
                reason: reason.into(),
                ..CompletionRecord::default()
            };
            send_completion(gw, reservation, completion, "none", 0, self.start);
            return;
        }
        let record = gw.audit_record(
            &mut self.ctx,
            status,
            decision,
            reason,
            self.start.elapsed(),
        );
        match reservation {
            Some(r) => r.send(Entry::Request(record)),
            None => {
                if let Err(e) = gw.inner.audit.record(Entry::Request(record)) {
                    crate::coalesced!(error, "audit_abandoned_unqueued", error = %e, "audit record for an abandoned request could not be queued");
                }
            }
        }
    }
}
