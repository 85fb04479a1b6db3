//! MFA for the person behind a web UI session (issue 19): TOTP enrolment (`/v1/mfa/enroll`,
//! `/v1/mfa/confirm`), step-up (`/v1/mfa/verify`), the shared TOTP check approvals use, and the
//! session's step-up marker (`mfa_verified_at` of the stored session, set through
//! [`super::session::set_mfa_verified`]).
//!
//! Enrolment is keyed by the account id of the session's sign-in token. The secret is sealed
//! with `[admin.mfa] key_file` before it reaches the store; the `otpauth://` URI, its QR code and
//! the recovery codes are answered once, at enrolment. Failed checks are counted per account
//! ([`crate::mfa::Failures`]) and audited `mfa.failed`.
//!
//! Owns: the `/v1/mfa...` handlers, [`check_code`], [`step_up_ok`]. Must never import `cli` or
//! `pipeline`.

use http::request::Parts;
use http::{Method, Response, StatusCode};
use serde::Deserialize;

use super::approvals::{Caller, person};
use super::{Actor, Admin, AdminError, ApiCall, json, session_cookie};
use crate::audit::Entry;
use crate::body::Body;
use crate::clock::rfc3339;
use crate::config::{Config, MfaConfig};
use crate::error::Reject;
use crate::mfa;
use crate::store::MfaRow;

/// Body of `/v1/mfa/confirm` and `/v1/mfa/verify`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CodeBody {
    code: String,
}

fn mfa_cfg(cfg: &Config) -> Result<&MfaConfig, AdminError> {
    cfg.mfa.as_ref().ok_or_else(|| {
        AdminError::status(
            StatusCode::CONFLICT,
            "mfa_disabled",
            "mfa_disabled",
            "MFA is not configured on this gateway (`[admin.mfa] key_file`).",
        )
    })
}

fn store_err(e: crate::store::StoreError) -> AdminError {
    crate::coalesced!(error, "admin_mfa_store_failed", error = %e, "MFA store call failed: answering 503");
    Reject::StoreUnavailable.into()
}

/// The end (ms) of the step-up held by this session (its last TOTP check plus
/// `[admin.mfa] step_up_ttl`), when it is still live.
fn step_up_until(cfg: &Config, s: &super::session::Session, now: i64) -> Option<i64> {
    let ttl = cfg.mfa.as_ref()?.step_up_ttl.as_millis() as i64;
    s.mfa_verified_at.map(|at| at + ttl).filter(|u| *u > now)
}

/// Does the session behind this request hold a live step-up?
pub(crate) async fn step_up_ok(gw: &Admin, cfg: &Config, headers: &http::HeaderMap) -> bool {
    let Some(id) = session_cookie(headers) else {
        return false;
    };
    let now = gw.now_ms();
    match super::session::live(gw, &id).await {
        Ok(Some(s)) => step_up_until(cfg, &s, now).is_some(),
        _ => false,
    }
}

/// With `[admin.mfa] required_for_admin = true`: an admin mutation through a web session needs
/// a live step-up (403 `mfa_required` otherwise). Bearer tokens (automation, break-glass) are
/// not sessions and are not asked.
pub(crate) async fn require_for_admin(
    gw: &Admin,
    cfg: &Config,
    parts: &Parts,
    actor: &Actor,
) -> Result<(), AdminError> {
    let required = cfg.mfa.as_ref().is_some_and(|m| m.required_for_admin);
    if !required
        || actor.auth_type != "session"
        || !actor.admin
        || matches!(parts.method, Method::GET | Method::HEAD)
    {
        return Ok(());
    }
    if step_up_ok(gw, cfg, &parts.headers).await {
        return Ok(());
    }
    Err(AdminError::forbidden(
        "mfa_required",
        "Admin actions need a recent TOTP check: verify a code (POST /v1/mfa/verify) and try again.",
    ))
}

/// Marks the session step-up verified for `[admin.mfa] step_up_ttl`; returns the end (ms).
async fn mark_step_up(gw: &Admin, cfg: &MfaConfig, session_id: &str) -> i64 {
    let until = gw.now_ms() + cfg.step_up_ttl.as_millis() as i64;
    if let Err(e) = super::session::set_mfa_verified(gw, session_id).await {
        crate::coalesced!(error, "admin_mfa_store_failed", error = %e, "cannot record the MFA step-up in the session");
    }
    until
}

fn failed(gw: &Admin, ctx: &ApiCall, actor: &Actor, why: &str) {
    let mut rec = ctx.event(actor, "mfa.failed", Some(&actor.row.account), None);
    rec.reason = Some(why.to_string());
    let _ = gw.audit().record(Entry::Admin(rec));
}

/// Checks a TOTP (or recovery) code of the person's account: refused while the account is over
/// its failure quota, for a wrong code, and for a code whose step was used already. Every
/// failure is counted and audited `mfa.failed`. `active`: the enrolment must be confirmed
/// (false only for the confirming check). Returns how it passed (`totp` or `recovery_code`).
pub(crate) async fn check_code(
    gw: &Admin,
    cfg: &Config,
    ctx: &ApiCall,
    actor: &Actor,
    code: &str,
    active: bool,
) -> Result<&'static str, AdminError> {
    let m = mfa_cfg(cfg)?;
    let account_id = actor.row.account_id.clone();
    let now = gw.now_ms();
    if let Some(wait) = gw.mfa_failures().locked(&account_id, now) {
        failed(gw, ctx, actor, "locked");
        return Err(AdminError::status(
            StatusCode::TOO_MANY_REQUESTS,
            "mfa_locked",
            "mfa_locked",
            format!(
                "Too many wrong codes; try again in {} s.",
                (wait + 999) / 1000
            ),
        ));
    }
    let acc = account_id.clone();
    let row: Option<MfaRow> = gw
        .store_call(move |s| s.mfa_get(&acc))
        .await
        .map_err(store_err)?;
    let Some(row) = row.filter(|r| r.active == active) else {
        return Err(AdminError::forbidden(
            "mfa_not_enrolled",
            if active {
                "Set up TOTP first (Approvals page, or POST /v1/mfa/enroll)."
            } else {
                "No enrolment is waiting for confirmation; start one with POST /v1/mfa/enroll."
            },
        ));
    };
    let code = code.trim().to_string();
    let passed = if active && mfa::looks_like_recovery(&code) {
        let (acc, hash) = (account_id.clone(), mfa::hash_recovery(&code));
        gw.store_call(move |s| s.mfa_use_recovery(&acc, &hash))
            .await
            .map_err(store_err)?
            .then_some("recovery_code")
    } else {
        let Some(secret) = m.sealer.open(&account_id, &row.secret) else {
            tracing::error!(account = %actor.row.account, "the MFA secret does not open with [admin.mfa] key_file: was the key changed?");
            return Err(Reject::Internal.into());
        };
        match mfa::verify(&secret, &code, now.div_euclid(1000), row.last_step) {
            None => None,
            Some(step) => {
                let acc = account_id.clone();
                gw.store_call(move |s| s.mfa_use_step(&acc, step))
                    .await
                    .map_err(store_err)?
                    .then_some("totp")
            }
        }
    };
    match passed {
        Some(how) => {
            gw.mfa_failures().clear(&account_id);
            Ok(how)
        }
        None => {
            gw.mfa_failures().record(&account_id, now);
            failed(gw, ctx, actor, "wrong_or_reused_code");
            Err(AdminError::forbidden(
                "mfa_failed",
                "Wrong or already used code: wait for the next one and try again.",
            ))
        }
    }
}

/// `GET /v1/mfa`: this person's MFA state.
pub(crate) async fn status(
    gw: &Admin,
    cfg: &Config,
    caller: &Caller,
) -> Result<Response<Body>, AdminError> {
    let (sid, actor) = person(caller)?;
    let acc = actor.row.account_id.clone();
    let row = match cfg.mfa {
        Some(_) => gw
            .store_call(move |s| s.mfa_get(&acc))
            .await
            .map_err(store_err)?,
        None => None,
    };
    let now = gw.now_ms();
    let until = match super::session::live(gw, sid).await {
        Ok(Some(s)) => step_up_until(cfg, &s, now),
        _ => None,
    };
    Ok(json(
        StatusCode::OK,
        serde_json::json!({
            "configured": cfg.mfa.is_some(),
            "required_for_admin": cfg.mfa.as_ref().is_some_and(|m| m.required_for_admin),
            "enrolled": row.as_ref().is_some_and(|r| r.active),
            "recovery_codes_left": row.as_ref().filter(|r| r.active).map(|r| r.recovery.len()),
            "step_up_until": until.map(rfc3339),
        }),
    ))
}

/// `POST /v1/mfa/enroll`: a new secret for this person (refused when one is active). Answers
/// the secret, its `otpauth://` URI, the QR code (SVG) and the recovery codes: once.
pub(crate) async fn enroll(
    gw: &Admin,
    cfg: &Config,
    ctx: &ApiCall,
    caller: &Caller,
) -> Result<Response<Body>, AdminError> {
    let m = mfa_cfg(cfg)?;
    let (_, actor) = person(caller)?;
    let secret = mfa::new_secret();
    let codes = mfa::new_recovery_codes();
    let row = MfaRow {
        account_id: actor.row.account_id.clone(),
        secret: m.sealer.seal(&actor.row.account_id, &secret),
        active: false,
        last_step: 0,
        created_at: gw.now_ms(),
        recovery: codes.iter().map(|c| mfa::hash_recovery(c)).collect(),
    };
    let res = ctx.reserve(gw)?;
    let began = gw
        .store_call(move |s| s.mfa_begin(&row))
        .await
        .map_err(store_err)?;
    if !began {
        return Err(AdminError::status(
            StatusCode::CONFLICT,
            "already_enrolled",
            "already_enrolled",
            "TOTP is already set up for this account.",
        ));
    }
    res.send(Entry::Admin(ctx.event(
        actor,
        "mfa.enrollment_started",
        Some(&actor.row.account),
        None,
    )));
    let uri = mfa::otpauth_uri(&m.issuer, &actor.row.account, &secret);
    Ok(json(
        StatusCode::CREATED,
        serde_json::json!({
            "secret": mfa::base32(&secret),
            "otpauth_uri": uri,
            "qr_svg": mfa::qr_svg(&uri),
            "recovery_codes": codes,
            "message": "Scan the QR code (or type the secret) into an authenticator app, then confirm with a code. The recovery codes are shown only now.",
        }),
    ))
}

/// `POST /v1/mfa/confirm`: the first code activates the enrolment (`mfa.enrolled`) and steps
/// the session up.
pub(crate) async fn confirm(
    gw: &Admin,
    cfg: &Config,
    ctx: &ApiCall,
    caller: &Caller,
    b: CodeBody,
) -> Result<Response<Body>, AdminError> {
    let m = mfa_cfg(cfg)?;
    let (sid, actor) = person(caller)?;
    let res = ctx.reserve(gw)?;
    check_code(gw, cfg, ctx, actor, &b.code, false).await?;
    let acc = actor.row.account_id.clone();
    gw.store_call(move |s| s.mfa_activate(&acc))
        .await
        .map_err(store_err)?;
    let until = mark_step_up(gw, m, sid).await;
    res.send(Entry::Admin(ctx.event(
        actor,
        "mfa.enrolled",
        Some(&actor.row.account),
        None,
    )));
    Ok(json(
        StatusCode::OK,
        serde_json::json!({"enrolled": true, "step_up_until": rfc3339(until)}),
    ))
}

/// `POST /v1/mfa/verify`: a TOTP or recovery code steps the session up (`mfa.verified`).
pub(crate) async fn verify(
    gw: &Admin,
    cfg: &Config,
    ctx: &ApiCall,
    caller: &Caller,
    b: CodeBody,
) -> Result<Response<Body>, AdminError> {
    let m = mfa_cfg(cfg)?;
    let (sid, actor) = person(caller)?;
    let res = ctx.reserve(gw)?;
    let how = check_code(gw, cfg, ctx, actor, &b.code, true).await?;
    let until = mark_step_up(gw, m, sid).await;
    let mut rec = ctx.event(actor, "mfa.verified", Some(&actor.row.account), None);
    if let Some(d) = rec.details.as_mut() {
        d["method"] = how.into();
    }
    res.send(Entry::Admin(rec));
    Ok(json(
        StatusCode::OK,
        serde_json::json!({"step_up_until": rfc3339(until), "method": how}),
    ))
}

/// After an approver's TOTP check passed: the session is stepped up too.
pub(crate) async fn stepped_up(gw: &Admin, cfg: &Config, session_id: &str) {
    if let Some(m) = &cfg.mfa {
        mark_step_up(gw, m, session_id).await;
    }
}
