//! Human approval of sensitive operations (issue 19): the gate the pipeline runs after step 6 on
//! an approval-gated rule, the binding of an approval (requesting token, rule, captured
//! parameters), its audit events, who may approve, its JSON view, and webhook notifications.
//!
//! An approval is usable only by the token that requested it, on the rule it names, with exactly
//! the parameters it captured, from its approval until `window` later. Each call that goes
//! through under it is audited `approval.used`; an approval found past its window (or a request
//! past `approvals.request_ttl`) is moved to `expired` and audited `approval.expired`.
//!
//! Owns: `Gateway::approval_gate`, [`canonical_params`], [`may_approve`], [`approval_json`],
//! [`notify`]. Must never import `admin`, `pipeline` or `cli`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Method, Request};
use ring::hmac;

use crate::audit::{AdminRecord, Entry};
use crate::cache::CachedToken;
use crate::clock::rfc3339;
use crate::config::{Approver, Config, NamedRule, WebhookConfig};
use crate::error::Reject;
use crate::gateway::Gateway;
use crate::store::ApprovalRow;

/// Approval statuses.
pub const PENDING: &str = "pending";
/// Approved: usable until `expires_at`.
pub const APPROVED: &str = "approved";
/// Rejected by a person.
pub const REJECTED: &str = "rejected";
/// Past its window (approved) or its request TTL (pending).
pub const EXPIRED: &str = "expired";

/// The parameters an approval is bound to, as stored and compared: a JSON object, keys sorted.
pub fn canonical_params(params: &BTreeMap<String, String>) -> String {
    serde_json::to_string(params).unwrap_or_else(|_| "{}".into())
}

/// May a person (account name, sign-in token role, admin access) approve under `approvers`?
/// `role:admin` also matches anyone holding `tokengate:admin`.
pub fn may_approve(approvers: &[Approver], account: &str, role: Option<&str>, admin: bool) -> bool {
    approvers.iter().any(|a| match a {
        Approver::Account(n) => n == account,
        Approver::Role(r) => role == Some(r.as_str()) || (r == "admin" && admin),
    })
}

/// The API view of a request.
pub fn approval_json(a: &ApprovalRow, now: i64) -> serde_json::Value {
    let params: serde_json::Value =
        serde_json::from_str(&a.params).unwrap_or_else(|_| serde_json::json!({}));
    let live = a.status == APPROVED && a.expires_at.is_some_and(|e| e > now);
    serde_json::json!({
        "id": a.id,
        "rule": a.rule,
        "params": params,
        "message": a.message,
        "status": if a.status == APPROVED && !live { EXPIRED } else { a.status.as_str() },
        "requested_by": {"token_id": a.token_id, "token_prefix": a.token_prefix, "account": a.account},
        "requested_at": rfc3339(a.requested_at),
        "decided_at": a.decided_at.map(rfc3339),
        "decided_by": a.decided_by,
        "note": a.note,
        "window_seconds": a.window_ms / 1000,
        "expires_at": a.expires_at.map(rfc3339),
        "used_count": a.used_count,
        "last_used_at": a.last_used_at.map(rfc3339),
    })
}

/// An audit record about request `a`.
pub fn event(
    name: &str,
    a: &ApprovalRow,
    actor: &str,
    auth_type: &str,
    client_ip: Option<IpAddr>,
    details: serde_json::Value,
) -> AdminRecord {
    let mut d = serde_json::json!({
        "approval_id": a.id,
        "rule": a.rule,
        "params": serde_json::from_str::<serde_json::Value>(&a.params).unwrap_or_default(),
    });
    if let (Some(d), serde_json::Value::Object(extra)) = (d.as_object_mut(), details) {
        d.extend(extra);
    }
    AdminRecord {
        timestamp: crate::audit::now_rfc3339(),
        event: name.to_string(),
        actor: actor.to_string(),
        auth_type: auth_type.to_string(),
        target: Some(a.id.clone()),
        account: Some(a.account.clone()),
        api_token_id: Some(a.token_id.clone()),
        token_prefix: Some(a.token_prefix.clone()),
        reason: None,
        client_ip: client_ip.map(|i| i.to_string()),
        details: Some(d),
    }
}

impl Gateway {
    /// After step 6 on an approval-gated rule: lets the request on when `token` holds a live
    /// approval for `rule` with exactly `params` (counting the use), else 403
    /// `approval_required` naming the pending request, if any. Stale requests met on the way
    /// are expired and audited.
    pub(crate) async fn approval_gate(
        &self,
        (rule, params): &(Arc<NamedRule>, String),
        token: &CachedToken,
        client_ip: IpAddr,
        request_id: &str,
    ) -> Result<(), Reject> {
        let now = self.now_ms();
        let request_ttl = self.config().approvals.request_ttl.as_millis() as i64;
        let (tok, name, p) = (
            token.id().to_string(),
            rule.name.clone(),
            params.to_string(),
        );
        let rows = self
            .store_call(move |s| s.approval_bound(&tok, &name, &p))
            .await
            .map_err(|_| Reject::StoreUnavailable)?;
        let mut pending = None;
        for r in rows {
            let stale = match r.status.as_str() {
                APPROVED => r.expires_at.is_none_or(|e| e <= now),
                PENDING => r.requested_at + request_ttl <= now,
                _ => continue,
            };
            if stale {
                self.expire_approval(&r, now).await?;
                continue;
            }
            if r.status == PENDING {
                pending.get_or_insert(r.id.clone());
                continue;
            }
            let id = r.id.clone();
            let used = self
                .store_call(move |s| s.approval_use(&id, now))
                .await
                .map_err(|_| Reject::StoreUnavailable)?;
            if used {
                let rec = event(
                    "approval.used",
                    &r,
                    token.id(),
                    "api_token",
                    Some(client_ip),
                    serde_json::json!({"request_id": request_id, "use": r.used_count + 1}),
                );
                self.audit()
                    .record(Entry::Admin(rec))
                    .map_err(|_| Reject::AuditUnavailable)?;
                return Ok(());
            }
        }
        Err(Reject::ApprovalRequired {
            rule: rule.name.clone(),
            approval_id: pending,
        })
    }

    /// Moves a stale request to `expired` (once, whichever replica gets there first) and
    /// audits `approval.expired`.
    pub(crate) async fn expire_approval(&self, r: &ApprovalRow, now: i64) -> Result<(), Reject> {
        let (id, from) = (r.id.clone(), r.status.clone());
        let moved = self
            .store_call(move |s| s.approval_transition(&id, &from, EXPIRED, None, None, None, None))
            .await
            .map_err(|_| Reject::StoreUnavailable)?;
        if moved {
            let rec = event(
                "approval.expired",
                r,
                "tokengate",
                "system",
                None,
                serde_json::json!({"was": r.status, "at": rfc3339(now)}),
            );
            let _ = self.audit().record(Entry::Admin(rec));
        }
        Ok(())
    }
}

/// Webhook deliveries in flight at most; past this a notification is dropped (and audited).
const MAX_IN_FLIGHT: usize = 256;
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// The pauses between webhook attempts: `first`, doubled after each failure, at most 5 minutes.
pub fn backoff_schedule(first: Duration, attempts: u32) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut d = first;
    for _ in 1..attempts {
        out.push(d);
        d = (d * 2).min(Duration::from_secs(300));
    }
    out
}

/// The `X-Tokengate-Signature` value of `body` sent at `unix_secs`: `sha256=` and the hex
/// HMAC-SHA256 of `"{unix_secs}.{body}"` under the shared secret. The receiver recomputes it and
/// refuses a timestamp older than a few minutes (replay).
pub fn signature(secret: &[u8], unix_secs: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(unix_secs.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", crate::token::hex(ctx.sign().as_ref()))
}

/// Sends a notification about `a` (`approval.requested`, `.approved`, `.rejected`) to the
/// configured webhook on a background task: retried with exponential backoff, a final failure
/// audited `webhook.failed`. Never waits for the webhook.
pub fn notify(gw: &Gateway, name: &'static str, a: &ApprovalRow) {
    let cfg = gw.config();
    let Some(hook) = cfg.approvals.webhook.clone() else {
        return;
    };
    let now = gw.now_ms();
    let params = serde_json::from_str::<serde_json::Value>(&a.params).unwrap_or_default();
    let what = match name {
        "approval.requested" => format!(
            ":lock: Approval requested for rule `{}` {} by `{}` ({}): {}",
            a.rule, a.params, a.account, a.token_prefix, a.message
        ),
        "approval.approved" => format!(
            ":white_check_mark: Approval {} for rule `{}` {} approved by `{}`",
            a.id,
            a.rule,
            a.params,
            a.decided_by.as_deref().unwrap_or("?")
        ),
        _ => format!(
            ":no_entry: Approval {} for rule `{}` {} rejected by `{}`: {}",
            a.id,
            a.rule,
            a.params,
            a.decided_by.as_deref().unwrap_or("?"),
            a.note.as_deref().unwrap_or("")
        ),
    };
    let body = serde_json::json!({
        "text": what,
        "event": name,
        "approval": approval_json(a, now),
        "fields": [
            {"title": "Rule", "value": a.rule, "short": true},
            {"title": "Parameters", "value": params.to_string(), "short": true},
            {"title": "Requested by", "value": a.account, "short": true},
            {"title": "Status", "value": a.status, "short": true},
        ],
    })
    .to_string();
    if IN_FLIGHT.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
        webhook_failed(gw, name, a, 0, "too many deliveries in flight");
        return;
    }
    let (gw, a) = (gw.clone(), a.clone());
    tokio::spawn(async move {
        deliver(&gw, &hook, name, &a, body).await;
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    });
}

async fn deliver(
    gw: &Gateway,
    hook: &WebhookConfig,
    name: &'static str,
    a: &ApprovalRow,
    body: String,
) {
    let mut pauses = backoff_schedule(hook.retry_backoff, hook.max_attempts).into_iter();
    let last = loop {
        let Err(e) = attempt_once(gw, hook, name, &body).await else {
            return;
        };
        match pauses.next() {
            Some(p) => tokio::time::sleep(p).await,
            None => break e,
        }
    };
    webhook_failed(gw, name, a, hook.max_attempts, &last);
}

async fn attempt_once(
    gw: &Gateway,
    hook: &WebhookConfig,
    name: &str,
    body: &str,
) -> Result<(), String> {
    let ts = gw.now_ms() / 1000;
    let req = Request::builder()
        .method(Method::POST)
        .uri(hook.url.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "tokengate-webhook")
        .header("x-tokengate-event", name)
        .header("x-tokengate-timestamp", ts.to_string())
        .header(
            "x-tokengate-signature",
            signature(&hook.secret, ts, body.as_bytes()),
        )
        .body(crate::body::full(body.to_string()))
        .map_err(|e| e.to_string())?;
    let call = gw.upstream_pool().request_via(req, hook.tls.as_ref());
    match tokio::time::timeout(hook.timeout, call).await {
        Err(_) => Err(format!("no answer within {:?}", hook.timeout)),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
        Ok(Ok(resp)) => Err(format!("answered {}", resp.status())),
    }
}

fn webhook_failed(gw: &Gateway, name: &str, a: &ApprovalRow, attempts: u32, error: &str) {
    tracing::warn!(event = name, approval = %a.id, attempts, error, "approval webhook failed");
    let mut rec = event(
        "webhook.failed",
        a,
        "tokengate",
        "system",
        None,
        serde_json::json!({"notification": name, "attempts": attempts, "error": error}),
    );
    rec.reason = Some(error.chars().take(200).collect());
    let _ = gw.audit().record(Entry::Admin(rec));
}

/// The approval gate of the rule with audit id `rule_id`, when it has one: the rule and the
/// parameters this match captured (what an approval must be bound to).
pub(crate) fn gate_of(
    cfg: &Config,
    rule_id: &str,
    captures: &[(&str, String)],
) -> Option<(Arc<NamedRule>, String)> {
    cfg.approvals
        .gate(rule_id)
        .map(|g| (g.clone(), params_of(captures)))
}

/// The bound parameters of a rule match, as [`canonical_params`] stores them.
pub fn params_of(captures: &[(&str, String)]) -> String {
    let m: BTreeMap<String, String> = captures
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    canonical_params(&m)
}

/// Shared by the admin side: a short random id `apr_...`.
pub fn new_id() -> String {
    crate::token::new_id("apr")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approvers_match_roles_accounts_and_admin() {
        let a = [
            Approver::Role("admin".into()),
            Approver::Account("ops".into()),
        ];
        assert!(may_approve(&a, "x", None, true));
        assert!(may_approve(&a, "x", Some("admin"), false));
        assert!(may_approve(&a, "ops", None, false));
        assert!(!may_approve(&a, "dev", Some("deployer"), false));
    }

    #[test]
    fn params_are_canonical() {
        let p = params_of(&[("b", "2".into()), ("a", "1".into())]);
        assert_eq!(p, r#"{"a":"1","b":"2"}"#);
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let s = backoff_schedule(Duration::from_secs(1), 5);
        assert_eq!(s, [1, 2, 4, 8].map(Duration::from_secs));
        let s = backoff_schedule(Duration::from_secs(200), 4);
        assert_eq!(s, [200, 300, 300].map(Duration::from_secs));
        assert!(backoff_schedule(Duration::from_secs(1), 1).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_waits_on_tokio_time() {
        let start = tokio::time::Instant::now();
        for p in backoff_schedule(Duration::from_secs(1), 4) {
            tokio::time::sleep(p).await;
        }
        assert_eq!(start.elapsed(), Duration::from_secs(7));
    }

    #[test]
    fn signatures_cover_timestamp_and_body() {
        let s = signature(b"0123456789abcdef", 1700000000, b"{}");
        assert!(s.starts_with("sha256=") && s.len() == 7 + 64);
        assert_ne!(s, signature(b"0123456789abcdef", 1700000001, b"{}"));
        assert_ne!(s, signature(b"0123456789abcdef", 1700000000, b"{ }"));
    }
}
