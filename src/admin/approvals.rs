//! The approvals API (issue 19): `POST /v1/approvals`, `GET /v1/approvals`,
//! `GET /v1/approvals/{id}`, `POST /v1/approvals/{id}/approve`, `POST /v1/approvals/{id}/reject`,
//! and the dispatch of the `/v1/mfa...` routes ([`super::mfa`]).
//!
//! Unlike the token API, these routes accept any valid token: a CI token that holds the rule's
//! permission asks for (and polls) its own approval. Deciding is a person's act: it needs a web
//! UI session (cookie + CSRF), a valid TOTP code in the body, an account that the rule's
//! `approvers` name, and is never the requesting token's account. A Bearer token alone never
//! decides, whatever its permissions.
//!
//! Owns: the `/v1/approvals...` handlers and their audit lines. Must never import `cli` or
//! `pipeline`.

use std::collections::BTreeMap;

use http::request::Parts;
use http::{HeaderValue, Method, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::Deserialize;

use super::api::{Matched, read_json};
use super::{Actor, Admin, AdminError, ApiCall, check_csrf, json, mfa, session_actor};
use crate::approval::{self, APPROVED, EXPIRED, PENDING, REJECTED, approval_json};
use crate::audit::Entry;
use crate::auth;
use crate::authz;
use crate::body::Body;
use crate::clock::rfc3339;
use crate::config::Config;
use crate::error::Reject;
use crate::gateway::ConnInfo;
use crate::store::{ApprovalRow, StoreError, TokenRow};

/// Longest message or note.
const MAX_TEXT: usize = 500;
/// Longest parameter value.
const MAX_PARAM_VALUE: usize = 256;
/// Requests listed at most.
const LIST_LIMIT: usize = 200;

/// Who calls an approvals or MFA route.
pub(crate) enum Caller {
    /// A Bearer token (any valid token; its full row).
    Token(TokenRow),
    /// A person in the web UI: the session id, the session, the actor behind it.
    Session {
        /// Cookie value (the session id).
        id: String,
        /// The sign-in token as an admin actor.
        actor: Actor,
    },
}

impl Caller {
    fn row(&self) -> &TokenRow {
        match self {
            Caller::Token(r) => r,
            Caller::Session { actor, .. } => &actor.row,
        }
    }
    fn admin(&self) -> bool {
        match self {
            Caller::Token(r) => authz::grants(&r.permissions, super::PERM_ADMIN),
            Caller::Session { actor, .. } => actor.admin,
        }
    }
}

/// The person behind a session; a Bearer token is refused (403 `session_required`).
pub(crate) fn person(c: &Caller) -> Result<(&str, &Actor), AdminError> {
    match c {
        Caller::Session { id, actor, .. } => Ok((id, actor)),
        Caller::Token(_) => Err(AdminError::forbidden(
            "session_required",
            "This needs a person: sign in to the web UI (a token alone is never enough).",
        )),
    }
}

/// The route template of an approvals or MFA path (`segs` after `v1`), with its `{id}`.
pub(crate) fn matched(
    segs: &[&str],
    param: impl Fn(&str) -> Option<String>,
) -> Option<(&'static str, Option<String>)> {
    Some(match segs {
        ["approvals"] => ("/v1/approvals", None),
        ["approvals", id] => ("/v1/approvals/{id}", Some(param(id)?)),
        ["approvals", id, "approve"] => ("/v1/approvals/{id}/approve", Some(param(id)?)),
        ["approvals", id, "reject"] => ("/v1/approvals/{id}/reject", Some(param(id)?)),
        ["mfa"] => ("/v1/mfa", None),
        ["mfa", "enroll"] => ("/v1/mfa/enroll", None),
        ["mfa", "confirm"] => ("/v1/mfa/confirm", None),
        ["mfa", "verify"] => ("/v1/mfa/verify", None),
        _ => return None,
    })
}

/// The web UI session (cookie, with CSRF on mutations), else a Bearer token.
async fn caller(
    gw: &Admin,
    parts: &Parts,
    conn: ConnInfo,
    ctx: &mut ApiCall,
) -> Result<Caller, AdminError> {
    if !parts.headers.contains_key(header::AUTHORIZATION) {
        if let Some((id, session, actor)) = session_actor(gw, &parts.headers, ctx.client_ip).await?
        {
            ctx.set_actor(&actor);
            if !matches!(parts.method, Method::GET | Method::HEAD) {
                check_csrf(parts, conn.tls, &session.csrf)?;
            }
            return Ok(Caller::Session { id, actor });
        }
    }
    ctx.auth_type = "api_token";
    if let Ok(p) = auth::extract(&parts.headers, parts.uri.query()).and_then(auth::parse) {
        ctx.token_prefix = Some(p.display_prefix().to_string());
    }
    let entry = gw
        .authenticate_bearer(&parts.headers, parts.uri.query(), ctx.client_ip)
        .await?;
    let row = gw.authenticate_id(entry.id(), ctx.client_ip).await?;
    ctx.token = Some(row.clone());
    Ok(Caller::Token(row))
}

/// Handles a matched approvals or MFA route.
pub(crate) async fn serve(
    gw: &Admin,
    cfg: &Config,
    parts: &Parts,
    body: Incoming,
    conn: ConnInfo,
    ctx: &mut ApiCall,
    m: Matched,
) -> Result<Response<Body>, AdminError> {
    let c = caller(gw, parts, conn, ctx).await?;
    m.admit(&parts.method, ctx)?;
    let id = m.param;
    let get = parts.method == Method::GET;
    match m.template {
        "/v1/approvals" if get => list(gw, cfg, &c, parts.uri.query()).await,
        "/v1/approvals" => request(gw, cfg, ctx, &c, read_json(parts, body, true).await?).await,
        "/v1/approvals/{id}" => show(gw, cfg, &c, &id).await,
        "/v1/approvals/{id}/approve" => {
            let b = read_json(parts, body, false).await?;
            decide(gw, cfg, ctx, &c, &id, true, b).await
        }
        "/v1/approvals/{id}/reject" => {
            let b = read_json(parts, body, false).await?;
            decide(gw, cfg, ctx, &c, &id, false, b).await
        }
        "/v1/mfa" => mfa::status(gw, cfg, &c).await,
        "/v1/mfa/enroll" => mfa::enroll(gw, cfg, ctx, &c).await,
        "/v1/mfa/confirm" => {
            mfa::confirm(gw, cfg, ctx, &c, read_json(parts, body, true).await?).await
        }
        "/v1/mfa/verify" => {
            mfa::verify(gw, cfg, ctx, &c, read_json(parts, body, true).await?).await
        }
        _ => Err(AdminError::not_found("No such API endpoint.")),
    }
}

fn store_err(e: StoreError) -> AdminError {
    crate::coalesced!(error, "admin_approvals_store_failed", error = %e, "approvals store call failed: answering 503");
    Reject::StoreUnavailable.into()
}

fn clean_text(field: &str, s: &str) -> Result<String, AdminError> {
    let s = s.trim();
    if s.chars().count() > MAX_TEXT || s.chars().any(|c| c.is_control() && c != '\n') {
        return Err(AdminError::bad_request(format!(
            "`{field}` is at most {MAX_TEXT} characters, without control characters."
        )));
    }
    Ok(s.to_string())
}

/// Body of `POST /v1/approvals`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestBody {
    rule: String,
    #[serde(default)]
    params: BTreeMap<String, String>,
    #[serde(default)]
    message: String,
}

/// `POST /v1/approvals`: the calling token asks for an approval of `rule` with `params` (its
/// capture values). The token must hold the rule's permission within its scopes. A pending
/// request, or a live approval, with the same binding is answered again (200) rather than
/// duplicated: a re-run pipeline inside the window goes on at once.
async fn request(
    gw: &Admin,
    cfg: &Config,
    ctx: &ApiCall,
    c: &Caller,
    b: RequestBody,
) -> Result<Response<Body>, AdminError> {
    let Some(rule) = cfg.approvals.rules.get(&b.rule) else {
        return Err(AdminError::not_found(format!(
            "No rule named `{}` in the config.",
            b.rule
        )));
    };
    let Some(policy) = &rule.approval else {
        return Err(AdminError::bad_request(format!(
            "Rule `{}` needs no approval.",
            b.rule
        )));
    };
    let want: Vec<&String> = rule.captures.iter().collect();
    let got: Vec<&String> = b.params.keys().collect();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    if want_sorted != got {
        return Err(AdminError::bad_request(format!(
            "Rule `{}` is approved for its parameters {}: give exactly these (`--param NAME=VALUE`).",
            b.rule,
            if want.is_empty() {
                "(none)".to_string()
            } else {
                want.iter()
                    .map(|w| format!("`{w}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )));
    }
    if b.params.values().any(|v| {
        v.is_empty()
            || v.len() > MAX_PARAM_VALUE
            || v.contains('/')
            || v.chars().any(char::is_control)
    }) {
        return Err(AdminError::bad_request(
            "Parameter values are 1-256 characters, without `/` or control characters.",
        ));
    }
    // On a case-insensitive route the gate sees the captures lower-cased: bind them so.
    let mut b = b;
    if cfg
        .routes
        .iter()
        .any(|r| r.name == rule.route && !r.case_sensitive)
    {
        for v in b.params.values_mut() {
            *v = v.to_ascii_lowercase();
        }
    }
    let message = clean_text("message", &b.message)?;
    let row = c.row();
    let perm = rule.permission.as_deref().unwrap_or("");
    let captures: Vec<(&str, String)> = b
        .params
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    if !authz::grants(&row.permissions, perm) || !authz::scopes_allow(&row.scopes, &captures) {
        return Err(Reject::Forbidden {
            reason: "insufficient_permission",
            permission: Some(perm.to_string()),
        }
        .into());
    }
    let params = approval::canonical_params(&b.params);
    let now = gw.now_ms();
    let ttl = cfg.approvals.request_ttl.as_millis() as i64;
    let (tok, name, p) = (row.id.clone(), rule.name.clone(), params.clone());
    let bound = gw
        .store_call(move |s| s.approval_bound(&tok, &name, &p))
        .await
        .map_err(store_err)?;
    for r in bound {
        let live = match r.status.as_str() {
            PENDING => r.requested_at + ttl > now,
            APPROVED => r.expires_at.is_some_and(|e| e > now),
            _ => false,
        };
        if live {
            return Ok(json(StatusCode::OK, approval_json(&r, now)));
        }
    }
    let a = ApprovalRow {
        id: approval::new_id(),
        rule: rule.name.clone(),
        params,
        message,
        token_id: row.id.clone(),
        token_prefix: row.prefix.clone(),
        account: row.account.clone(),
        status: PENDING.into(),
        requested_at: now,
        decided_at: None,
        decided_by: None,
        note: None,
        window_ms: policy.window.as_millis() as i64,
        expires_at: None,
        used_count: 0,
        last_used_at: None,
    };
    let res = ctx.reserve(gw)?;
    let stored = a.clone();
    gw.store_call(move |s| s.approval_insert(&stored))
        .await
        .map_err(store_err)?;
    res.send(Entry::Admin(approval::event(
        "approval.requested",
        &a,
        &row.id,
        ctx.auth_type,
        Some(ctx.client_ip),
        serde_json::json!({"message": a.message, "request_id": ctx.request_id,
            "approvers": policy.approvers.iter().map(|p| p.to_string()).collect::<Vec<_>>()}),
    )));
    approval::notify(gw, "approval.requested", &a);
    let mut r = json(StatusCode::CREATED, approval_json(&a, now));
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/approvals/{}", a.id)) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

/// Who may see a request: its token, admins, and people the rule names as approvers.
fn visible(cfg: &Config, c: &Caller, a: &ApprovalRow) -> bool {
    if c.row().id == a.token_id || c.admin() {
        return true;
    }
    match c {
        Caller::Session { actor, .. } => cfg
            .approvals
            .rules
            .get(&a.rule)
            .and_then(|r| r.approval.as_ref())
            .is_some_and(|p| {
                approval::may_approve(
                    &p.approvers,
                    &actor.row.account,
                    actor.row.role.as_deref(),
                    actor.admin,
                )
            }),
        Caller::Token(_) => false,
    }
}

/// A stale request (past its window or its TTL) is expired and audited before it is shown.
async fn fresh(gw: &Admin, cfg: &Config, a: ApprovalRow) -> Result<ApprovalRow, AdminError> {
    let now = gw.now_ms();
    let ttl = cfg.approvals.request_ttl.as_millis() as i64;
    let stale = match a.status.as_str() {
        PENDING => a.requested_at + ttl <= now,
        APPROVED => a.expires_at.is_none_or(|e| e <= now),
        _ => false,
    };
    if !stale {
        return Ok(a);
    }
    gw.expire_approval(&a, now).await?;
    let id = a.id.clone();
    Ok(gw
        .store_call(move |s| s.approval_get(&id))
        .await
        .map_err(store_err)?
        .unwrap_or(ApprovalRow {
            status: EXPIRED.into(),
            ..a
        }))
}

async fn list(
    gw: &Admin,
    cfg: &Config,
    c: &Caller,
    query: Option<&str>,
) -> Result<Response<Body>, AdminError> {
    let status = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("status="))
        .map(str::to_string);
    let sees_all = c.admin() || matches!(c, Caller::Session { .. });
    let tok = (!sees_all).then(|| c.row().id.clone());
    let rows = gw
        .store_call(move |s| s.approval_list(tok.as_deref(), LIST_LIMIT))
        .await
        .map_err(store_err)?;
    let mut out = Vec::new();
    let now = gw.now_ms();
    for a in rows {
        if !visible(cfg, c, &a) {
            continue;
        }
        let a = fresh(gw, cfg, a).await?;
        if status.as_deref().is_none_or(|s| s == a.status) {
            out.push(approval_json(&a, now));
        }
    }
    Ok(json(StatusCode::OK, serde_json::json!({"approvals": out})))
}

async fn find(gw: &Admin, cfg: &Config, c: &Caller, id: &str) -> Result<ApprovalRow, AdminError> {
    let key = id.to_string();
    let a = gw
        .store_call(move |s| s.approval_get(&key))
        .await
        .map_err(store_err)?;
    match a {
        Some(a) if visible(cfg, c, &a) => fresh(gw, cfg, a).await,
        _ => Err(AdminError::not_found(format!(
            "No approval request `{id}`."
        ))),
    }
}

async fn show(
    gw: &Admin,
    cfg: &Config,
    c: &Caller,
    id: &str,
) -> Result<Response<Body>, AdminError> {
    let a = find(gw, cfg, c, id).await?;
    Ok(json(StatusCode::OK, approval_json(&a, gw.now_ms())))
}

/// Body of approve / reject.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    #[serde(default)]
    note: Option<String>,
    #[serde(default)]
    totp: Option<String>,
}

/// Approve or reject: a person in a web session, named by the rule's approvers, not of the
/// requesting account, with a valid TOTP code.
#[allow(clippy::too_many_arguments)]
async fn decide(
    gw: &Admin,
    cfg: &Config,
    ctx: &ApiCall,
    c: &Caller,
    id: &str,
    approve: bool,
    b: DecideBody,
) -> Result<Response<Body>, AdminError> {
    let (sid, actor) = person(c)?;
    let a = find(gw, cfg, c, id).await?;
    let policy = cfg
        .approvals
        .rules
        .get(&a.rule)
        .and_then(|r| r.approval.clone());
    let Some(policy) = policy else {
        return Err(AdminError::status(
            StatusCode::CONFLICT,
            "rule_gone",
            "rule_gone",
            format!("Rule `{}` no longer needs approval in the config.", a.rule),
        ));
    };
    if actor.row.id == a.token_id || actor.row.account == a.account {
        return Err(AdminError::forbidden(
            "self_approval",
            "A request is decided by someone else than the account that made it.",
        ));
    }
    if !approval::may_approve(
        &policy.approvers,
        &actor.row.account,
        actor.row.role.as_deref(),
        actor.admin,
    ) {
        return Err(AdminError::forbidden(
            "not_an_approver",
            format!(
                "Rule `{}` is approved by {}.",
                a.rule,
                policy
                    .approvers
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    if a.status != PENDING {
        return Err(AdminError::status(
            StatusCode::CONFLICT,
            "not_pending",
            "not_pending",
            format!("Request {} is {}, not pending.", a.id, a.status),
        ));
    }
    let note = clean_text("note", b.note.as_deref().unwrap_or(""))?;
    let Some(code) = b.totp.filter(|t| !t.trim().is_empty()) else {
        return Err(AdminError::forbidden(
            "mfa_required",
            "Deciding needs a TOTP code from your authenticator app (`totp`).",
        ));
    };
    let res = ctx.reserve(gw)?;
    mfa::check_code(gw, cfg, ctx, actor, &code, true).await?;
    mfa::stepped_up(gw, cfg, sid).await;
    let now = gw.now_ms();
    let (to, expires) = if approve {
        (APPROVED, Some(now + a.window_ms))
    } else {
        (REJECTED, None)
    };
    let by = format!("{} ({})", actor.row.account, actor.row.id);
    let (key, by2, note2) = (a.id.clone(), by.clone(), note.clone());
    let moved = gw
        .store_call(move |s| {
            s.approval_transition(
                &key,
                PENDING,
                to,
                Some(now),
                Some(&by2),
                (!note2.is_empty()).then_some(note2.as_str()),
                expires,
            )
        })
        .await
        .map_err(store_err)?;
    if !moved {
        return Err(AdminError::status(
            StatusCode::CONFLICT,
            "not_pending",
            "not_pending",
            format!("Request {} was decided meanwhile.", a.id),
        ));
    }
    let key = a.id.clone();
    let a = gw
        .store_call(move |s| s.approval_get(&key))
        .await
        .map_err(store_err)?
        .ok_or_else(|| AdminError::not_found("The request is gone."))?;
    let name = if approve {
        "approval.approved"
    } else {
        "approval.rejected"
    };
    res.send(Entry::Admin(approval::event(
        name,
        &a,
        &actor.label(),
        "session",
        Some(ctx.client_ip),
        serde_json::json!({
            "decided_by_account": actor.row.account,
            "note": note,
            "expires_at": a.expires_at.map(rfc3339),
            "request_id": ctx.request_id,
        }),
    )));
    approval::notify(gw, name, &a);
    Ok(json(StatusCode::OK, approval_json(&a, now)))
}
