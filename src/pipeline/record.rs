//! The request's audit record, built from the pipeline's context: the one builder behind the
//! refusal and final lines (the context's strings moved) and the write-ahead decision line
//! (copied), so both always carry the same fields. Part of the pipeline.
//!
//! Must never import `admin` or `cli`.

use std::time::Duration;

use super::{Ctx, ms};
use crate::audit::RequestRecord;
use crate::proxy;

/// How [`record_of`] takes the context's strings.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Strings {
    /// Moved out: the request is over.
    Move,
    /// Copied: the request goes on (the write-ahead decision line).
    Copy,
}

fn grab(v: &mut String, how: Strings) -> String {
    match how {
        Strings::Move => std::mem::take(v),
        Strings::Copy => v.clone(),
    }
}

fn grab_opt(v: &mut Option<String>, how: Strings) -> Option<String> {
    match how {
        Strings::Move => v.take(),
        Strings::Copy => v.clone(),
    }
}

/// One audit record from the context: the refusal or final line (strings moved) and the
/// write-ahead decision line (strings copied) are built here, so they always carry the same
/// fields. `status` 0: not answered yet.
pub(super) fn record_of(
    ctx: &mut Ctx,
    how: Strings,
    status: u16,
    decision: &'static str,
    reason: &'static str,
    elapsed: Duration,
) -> RequestRecord {
    let row = ctx.token.as_deref();
    RequestRecord {
        timestamp: crate::audit::now_rfc3339(),
        request_id: grab(&mut ctx.request_id, how),
        auth_type: if ctx.token_prefix.is_some() {
            "api_token"
        } else {
            "none"
        }
        .into(),
        api_token_id: row.map(|r| r.id().to_string()),
        api_token_name: row.map(|r| r.name().to_string()),
        account: row.map(|r| r.account().to_string()),
        token_prefix: grab_opt(&mut ctx.token_prefix, how),
        method: crate::audit::method_name(&ctx.method),
        path: grab(&mut ctx.path, how),
        status_code: status,
        rbac_decision: decision.into(),
        reason: reason.into(),
        permission: grab_opt(&mut ctx.permission, how),
        rule: grab_opt(&mut ctx.rule, how),
        shadow_decision: ctx.shadow_decision.map(Into::into),
        client_ip: proxy::ip_text(ctx.client_ip),
        user_agent: grab_opt(&mut ctx.user_agent, how),
        upstream: grab_opt(&mut ctx.upstream, how),
        duration_ms: ms(elapsed),
        mode: Some(crate::forward_auth::mode(ctx.forward_auth).into()),
        phase: None,
        trace_id: grab_opt(&mut ctx.trace_id, how),
    }
}
