//! Web UI sessions: random 256-bit ids, kept in the store (they survive a restart and every
//! replica on the same PostgreSQL database sees them), with an idle and an absolute lifetime and
//! a CSRF token each.
//!
//! The store keeps SHA-256(session id), never the id, so a database dump holds no usable cookie.
//! A session signed in with a token remembers the token's id (never the token) and every request
//! re-reads the token row, so revoking or expiring the sign-in token ends its sessions at once. A
//! session signed in with OpenID Connect remembers the person (`sub`, email), the account they act
//! for and their access (`self` or `admin`). `mfa_verified_at` records the last MFA step-up:
//! [`set_mfa_verified`] is the one way to set it.
//!
//! Owns: ids, CSRF tokens, lifetimes, the session audit events (`session.created`,
//! `session.revoked`, `session.expired`) and the cache of the OpenID provider's metadata and keys
//! (the cookie names are `hygiene`'s, which strips them upstream). Must never import `gateway`
//! (other than through [`Admin`]), `config` or `pipeline`: sessions belong to the admin side
//! alone.

use std::sync::atomic::{AtomicI64, Ordering};

use rand::TryRngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use http::{Response, StatusCode};

use super::{Actor, Admin, AdminError, ApiCall};
use crate::audit::{AdminRecord, Entry};
use crate::body::Body;
use crate::error::Reject;
pub use crate::store::sessions::SessionRow as Session;
use crate::token::hex;

/// Cookie names on plain HTTP and under TLS (`__Host-` prefix): named in `hygiene`, which strips
/// them from everything forwarded upstream and must not import the admin side.
pub use crate::hygiene::{SESSION_COOKIE as COOKIE, SESSION_COOKIE_TLS as COOKIE_TLS};

/// How often (at most) expired sessions are swept out of the store and audited.
const PURGE_EVERY_MS: i64 = 60_000;

/// The admin side's session state that is not in the store: when expired sessions were last
/// swept, and the OpenID provider's cached metadata and keys.
#[derive(Debug)]
pub struct Sessions {
    last_purge_ms: AtomicI64,
    pub(crate) provider: super::oidc::ProviderCache,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new()
    }
}

impl Sessions {
    /// Fresh state (the sessions themselves are in the store).
    pub fn new() -> Self {
        Sessions {
            last_purge_ms: AtomicI64::new(i64::MIN),
            provider: super::oidc::ProviderCache::default(),
        }
    }
}

/// 32 bytes from the OS CSPRNG, hex-encoded.
pub fn random_hex() -> String {
    let mut buf = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut buf)
        .expect("the OS random source failed");
    hex(&buf)
}

/// SHA-256 of a secret (session id, state, binding cookie), hex: what the store keeps.
pub fn hash_hex(id: &str) -> String {
    hex(&Sha256::digest(id.as_bytes()))
}

/// Constant-time string comparison (CSRF tokens).
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Who a new session is for.
#[derive(Debug, Clone)]
pub enum Owner {
    /// Signed in with an API token (its id).
    Token(String),
    /// Signed in with OpenID Connect.
    Person(Person),
}

/// A person signed in with OpenID Connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// The provider's subject (`sub`).
    pub subject: String,
    /// Their email, when the provider gave one.
    pub email: Option<String>,
    /// The account they act for (its name).
    pub account: String,
    /// `tokengate:admin` powers (else their own account, within `self_role`).
    pub admin: bool,
}

impl Person {
    /// The audit `actor` and `created_by` of what they do: `oidc:` and their email (else `sub`).
    pub fn label(&self) -> String {
        format!("oidc:{}", self.email.as_deref().unwrap_or(&self.subject))
    }
}

/// Builds a new session row (not yet stored): returns (cookie value, row).
pub fn new_session(
    owner: &Owner,
    now: i64,
    absolute_ms: i64,
    client_ip: Option<String>,
    user_agent: Option<String>,
) -> (String, Session) {
    let id = random_hex();
    let (owner_key, kind, token_id, person) = match owner {
        Owner::Token(t) => (format!("token:{t}"), "token", Some(t.clone()), None),
        Owner::Person(p) => (format!("oidc:{}", p.subject), "oidc", None, Some(p)),
    };
    let row = Session {
        id_hash: hash_hex(&id),
        public_id: format!("ses_{}", &random_hex()[..24]),
        owner: owner_key,
        kind: kind.into(),
        token_id,
        subject: person.map(|p| p.subject.clone()),
        email: person.and_then(|p| p.email.clone()),
        account: person.map(|p| p.account.clone()),
        access: match person {
            Some(p) if p.admin => "admin",
            _ => "self",
        }
        .into(),
        csrf: random_hex(),
        created_at: now,
        last_seen_at: now,
        expires_at: now.saturating_add(absolute_ms),
        mfa_verified_at: None,
        client_ip,
        user_agent,
    };
    (id, row)
}

/// The person behind an OpenID Connect session.
pub fn person_of(s: &Session) -> Option<Person> {
    (s.kind == "oidc").then(|| Person {
        subject: s.subject.clone().unwrap_or_default(),
        email: s.email.clone(),
        account: s.account.clone().unwrap_or_default(),
        admin: s.access == "admin",
    })
}

fn lifetimes(gw: &Admin) -> (i64, i64) {
    let a = &gw.config().admin;
    (
        a.session_idle_timeout.as_millis() as i64,
        a.session_absolute_timeout.as_millis() as i64,
    )
}

/// Stores a new session for `owner`; returns (cookie value, row).
pub(crate) async fn create(
    gw: &Admin,
    owner: &Owner,
    client_ip: Option<String>,
    user_agent: Option<String>,
) -> Result<(String, Session), crate::store::StoreError> {
    let (_, absolute) = lifetimes(gw);
    let (id, row) = new_session(owner, gw.now_ms(), absolute, client_ip, user_agent);
    let r = row.clone();
    gw.store_call(move |s| s.session_insert(&r)).await?;
    purge(gw).await;
    Ok((id, row))
}

/// The live session for this cookie value, its idle timer restarted; an expired one is removed
/// (and audited as `session.expired`) and `None` returned.
pub(crate) async fn live(
    gw: &Admin,
    id: &str,
) -> Result<Option<Session>, crate::store::StoreError> {
    let h = hash_hex(id);
    let h2 = h.clone();
    let Some(s) = gw.store_call(move |st| st.session_get(&h2)).await? else {
        return Ok(None);
    };
    let (idle, _) = lifetimes(gw);
    let now = gw.now_ms();
    if s.expired(now, idle) {
        if let Some(gone) = gw.store_call(move |st| st.session_delete(&h)).await? {
            audit_expired(gw, &gone, now);
        }
        return Ok(None);
    }
    // The idle timer moves in steps (a write per request would be too much): at most
    // a tenth of the idle lifetime, and at most a minute, is lost.
    if now - s.last_seen_at >= (idle / 10).min(60_000) {
        gw.store_call(move |st| st.session_touch(&h, now)).await?;
    }
    Ok(Some(s))
}

/// Records an MFA step-up in the session whose cookie value is `id` (the TOTP check calls this
/// once the code is verified); false when the session is gone.
pub(crate) async fn set_mfa_verified(
    gw: &Admin,
    id: &str,
) -> Result<bool, crate::store::StoreError> {
    let (h, now) = (hash_hex(id), gw.now_ms());
    gw.store_call(move |st| st.session_set_mfa(&h, now)).await
}

/// Ends a session (sign-out); returns it when it existed.
pub(crate) async fn remove(
    gw: &Admin,
    id: &str,
) -> Result<Option<Session>, crate::store::StoreError> {
    let h = hash_hex(id);
    gw.store_call(move |st| st.session_delete(&h)).await
}

/// Ends every session signed in with this token (it was revoked).
pub(crate) async fn remove_token(
    gw: &Admin,
    token_id: &str,
) -> Result<Vec<Session>, crate::store::StoreError> {
    let owner = format!("token:{token_id}");
    gw.store_call(move |st| st.session_delete_owner(&owner))
        .await
}

/// Sweeps expired sessions out of the store, at most once a minute, auditing each.
pub(crate) async fn purge(gw: &Admin) {
    let now = gw.now_ms();
    let last = gw.sessions().last_purge_ms.load(Ordering::Relaxed);
    if now.saturating_sub(last) < PURGE_EVERY_MS
        || gw
            .sessions()
            .last_purge_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    let (idle, _) = lifetimes(gw);
    match gw
        .store_call(move |st| st.session_purge(now, now - idle))
        .await
    {
        Ok(gone) => {
            for s in &gone {
                audit_expired(gw, s, now);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot sweep expired web UI sessions"),
    }
}

fn audit_expired(gw: &Admin, s: &Session, now: i64) {
    let why = if now >= s.expires_at {
        "absolute_timeout"
    } else {
        "idle_timeout"
    };
    let mut rec = event(s, "session.expired", &owner_label(s), None);
    rec.reason = Some(why.into());
    if let Err(e) = gw.audit().record(Entry::Admin(rec)) {
        crate::coalesced!(error, "session_expired_unqueued", error = %e, "audit record of an expired session could not be queued");
    }
}

/// The audit label of a session's owner: the token id, or `oidc:` and the person's email.
pub fn owner_label(s: &Session) -> String {
    match person_of(s) {
        Some(p) => p.label(),
        None => s.token_id.clone().unwrap_or_default(),
    }
}

/// A session audit event (`auth_type = "session"`), about session `s`, by `actor`.
pub fn event(s: &Session, name: &str, actor: &str, client_ip: Option<String>) -> AdminRecord {
    AdminRecord {
        timestamp: crate::audit::now_rfc3339(),
        event: name.into(),
        actor: actor.into(),
        auth_type: "session".into(),
        target: Some(s.public_id.clone()),
        account: s.account.clone(),
        api_token_id: s.token_id.clone(),
        token_prefix: None,
        reason: None,
        client_ip: client_ip.or_else(|| s.client_ip.clone()),
        details: Some(serde_json::json!({
            "session": s.public_id,
            "kind": s.kind,
            "sub": s.subject,
            "email": s.email,
            "access": s.access,
            "created_at": crate::clock::rfc3339(s.created_at),
            "expires_at": crate::clock::rfc3339(s.expires_at),
        })),
    }
}

/// A session as the API lists it (never its id or CSRF token).
pub fn session_json(s: &Session, current: bool) -> serde_json::Value {
    serde_json::json!({
        "id": s.public_id,
        "kind": s.kind,
        "sub": s.subject,
        "email": s.email,
        "account": s.account,
        "token_id": s.token_id,
        "access": s.access,
        "created_at": crate::clock::rfc3339(s.created_at),
        "last_seen_at": crate::clock::rfc3339(s.last_seen_at),
        "expires_at": crate::clock::rfc3339(s.expires_at),
        "mfa_verified_at": s.mfa_verified_at.map(crate::clock::rfc3339),
        "client_ip": s.client_ip,
        "user_agent": s.user_agent,
        "current": current,
    })
}

/// The owner key of the actor's own sessions.
fn owner_of(actor: &Actor) -> String {
    match &actor.person {
        Some(p) => format!("oidc:{}", p.subject),
        None => format!("token:{}", actor.row.id),
    }
}

/// `GET /v1/sessions` (one's own; an admin's `?all=true`: everyone's), `DELETE
/// /v1/sessions/{id}` (one's own; an admin: any) and `POST /v1/sessions/revoke-all` (sign out
/// everywhere: every session of the caller, this one too). Revocations are audited
/// `session.revoked`, their audit slot reserved first.
pub(crate) async fn api(
    gw: &Admin,
    actor: &Actor,
    ctx: &mut ApiCall,
    parts: &http::request::Parts,
    tls: bool,
    template: &str,
    id: &str,
) -> Result<Response<Body>, AdminError> {
    let store_err = |e: crate::store::StoreError| {
        crate::coalesced!(error, "session_api_store_failed", error = %e, "session API store call failed: answering 503");
        AdminError::Reject(Reject::StoreUnavailable)
    };
    let current = super::session_cookie(&parts.headers).map(|c| hash_hex(&c));
    let owner = owner_of(actor);
    let ip = Some(ctx.client_ip.to_string());
    match template {
        "/v1/sessions" => {
            purge(gw).await;
            let all = actor.admin
                && parts
                    .uri
                    .query()
                    .is_some_and(|q| q.split('&').any(|kv| kv == "all=true"));
            let rows = if all {
                gw.store_call(|s| s.session_list_all()).await
            } else {
                gw.store_call(move |s| s.session_list(&owner)).await
            }
            .map_err(store_err)?;
            let (idle, _) = lifetimes(gw);
            let now = gw.now_ms();
            let list: Vec<_> = rows
                .iter()
                .filter(|s| !s.expired(now, idle))
                .map(|s| session_json(s, current.as_deref() == Some(&s.id_hash)))
                .collect();
            Ok(super::json(
                StatusCode::OK,
                serde_json::json!({ "sessions": list }),
            ))
        }
        "/v1/sessions/revoke-all" => {
            let res = ctx.reserve(gw)?;
            let gone = gw
                .store_call(move |s| s.session_delete_owner(&owner))
                .await
                .map_err(store_err)?;
            let n = gone.len();
            let mut recs = gone.iter().map(|s| {
                let mut r = event(s, "session.revoked", &actor.label(), ip.clone());
                r.reason = Some("signed_out_everywhere".into());
                r
            });
            // The reserved slot takes the first record; the rest are queued after it.
            match recs.next() {
                Some(first) => res.send(Entry::Admin(first)),
                None => drop(res),
            }
            for r in recs {
                if gw.audit().record(Entry::Admin(r)).is_err() {
                    crate::coalesced!(
                        error,
                        "session_revoked_unqueued",
                        "audit record of a revoked session could not be queued"
                    );
                }
            }
            let mut r = super::json(StatusCode::OK, serde_json::json!({ "revoked": n }));
            if current.is_some() {
                super::ui::set_cookie(r.headers_mut(), &super::ui::cookie(tls, "", true));
            }
            Ok(r)
        }
        _ => {
            let res = ctx.reserve(gw)?;
            let (pid, only) = (id.to_string(), (!actor.admin).then_some(owner));
            let gone = gw
                .store_call(move |s| s.session_delete_public(&pid, only.as_deref()))
                .await
                .map_err(store_err)?
                .ok_or_else(|| AdminError::not_found(format!("No session `{id}`.")))?;
            let mut rec = event(&gone, "session.revoked", &actor.label(), ip);
            rec.reason = Some("revoked".into());
            res.send(Entry::Admin(rec));
            let mut r = Response::new(crate::body::full(bytes::Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            Ok(r)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_sessions_hold_only_a_hash_of_their_id() {
        let p = Person {
            subject: "sub-1".into(),
            email: Some("ada@example.com".into()),
            account: "ada".into(),
            admin: false,
        };
        let (id, s) = new_session(&Owner::Person(p.clone()), 1_000, 500, None, None);
        assert_eq!(id.len(), 64);
        assert_ne!(id, s.csrf);
        assert_eq!(s.id_hash, hash_hex(&id));
        assert!(
            !format!("{s:?}").contains(&id),
            "only a hash of the id is kept"
        );
        assert!(!session_json(&s, true).to_string().contains(&s.csrf));
        assert_eq!(
            (s.owner.as_str(), s.access.as_str()),
            ("oidc:sub-1", "self")
        );
        assert_eq!(person_of(&s), Some(p));
        assert_eq!(owner_label(&s), "oidc:ada@example.com");
        assert!(!s.expired(1_499, 100_000));
        assert!(s.expired(1_500, 100_000), "absolute lifetime");
        assert!(s.expired(1_100, 100), "idle lifetime");
        let (id2, t) = new_session(&Owner::Token("tok_1".into()), 0, 10, None, None);
        assert_ne!(id, id2);
        assert_ne!(s.public_id, t.public_id);
        assert_eq!(
            (t.owner.as_str(), t.kind.as_str()),
            ("token:tok_1", "token")
        );
        assert_eq!(person_of(&t), None);
    }

    #[test]
    fn csrf_compare() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
