//! Admin listener (SPEC §8): operations endpoints, the JSON API and the web UI.
//!
//! Loopback by default (`admin.listen`). Routes:
//! - `/healthz`, `/readyz`, `/metrics` — operations, no authentication;
//! - `/v1/...` — the JSON API ([`api`]), a Bearer token or a web UI session;
//! - `/`, `/assets/...`, `/session`, `/session/logout` — the web UI ([`ui`], [`session`]);
//! - `/oidc/login`, `/oidc/callback` — sign-in with OpenID Connect ([`oidc`]).
//!
//! Owns the admin listener's state, [`Admin`]: the gateway handle plus the web UI sessions (the
//! gateway and the pipeline know nothing of sessions and never import this module).

pub mod api;
pub(crate) mod approvals;
pub(crate) mod mfa;
pub mod oidc;
pub mod session;
pub mod ui;

use std::net::IpAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::audit::{AdminRecord, Entry, RequestRecord, Reservation};
use crate::authz;
use crate::body::{Body, full};
use crate::error::{Reject, respond};
use crate::gateway::{ConnInfo, Gateway};
use crate::store::TokenRow;

pub use crate::lifecycle::{PERM_ADMIN, PERM_SELF};
/// Largest request body the admin listener reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The admin listener's state: the gateway it administers and the web UI sessions it owns.
/// Derefs to the gateway, so handlers reach the store, audit log and clock through it.
#[derive(Clone)]
pub struct Admin {
    gw: Gateway,
    sessions: Arc<session::Sessions>,
    mfa_failures: Arc<crate::mfa::Failures>,
}

impl Admin {
    /// The admin side of `gw`, with its sessions (shared by every admin connection).
    pub fn new(gw: Gateway, sessions: Arc<session::Sessions>) -> Admin {
        Admin {
            gw,
            sessions,
            mfa_failures: Arc::default(),
        }
    }

    /// Failed MFA checks per account (the step-up rate limit).
    pub fn mfa_failures(&self) -> &crate::mfa::Failures {
        &self.mfa_failures
    }

    /// Web UI sessions.
    pub fn sessions(&self) -> &session::Sessions {
        &self.sessions
    }
}

impl Deref for Admin {
    type Target = Gateway;

    fn deref(&self) -> &Gateway {
        &self.gw
    }
}

/// Routes one admin request.
pub async fn handle(gw: &Admin, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => readyz(gw).await,
        (&Method::GET, "/metrics") => metrics(gw).await,
        _ if path == "/v1" || path.starts_with("/v1/") => api::handle(gw, req, conn).await,
        _ if ui::is_ui_path(path) => ui::handle(gw, req, conn).await,
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found", "message": "Not found."}),
        ),
    }
}

/// Readiness ([`crate::health`]): 200 with one `check: ok` line each, else 503 naming the
/// failure.
async fn readyz(gw: &Admin) -> Response<Body> {
    let readiness = gw.readiness().await;
    let mut body = String::new();
    for (name, r) in &readiness.checks {
        match r {
            Ok(()) => body.push_str(&format!("{name}: ok\n")),
            Err(e) => {
                tracing::warn!(check = name, error = %e, "readiness check failed");
                // The store's line names its problem (deleted, replaced, truncated, unreadable):
                // the operator's next step depends on it.
                if *name == "store" {
                    body.push_str(&format!("{name}: FAILED: {e}\n"));
                } else {
                    body.push_str(&format!("{name}: FAILED\n"));
                }
            }
        }
    }
    let status = if readiness.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, body)
}

async fn metrics(gw: &Admin) -> Response<Body> {
    let mut snap = gw.snapshot();
    snap.store_up = Some(crate::health::store_readable(gw).await.is_ok());
    if let Some(counts) = token_counts(gw).await {
        snap.active_tokens = Some(counts.active);
        snap.expiring_7d = Some(counts.expiring_7d);
    }
    snap.audit_healthy = Some(gw.audit().is_healthy());
    let body = gw.metrics().render(&snap);
    let mut r = Response::new(full(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// Active and soon-expiring token counts, recomputed at most every [`TOKEN_COUNTS_TTL`]: the
/// count scans the tokens table (about 2 s for a million tokens), too much for every scrape.
/// `None` when the store cannot be read (the gauges are then left out, not reported as 0).
async fn token_counts(gw: &Admin) -> Option<crate::metrics::TokenCounts> {
    // An async mutex held across the query on purpose: concurrent scrapes wait for one scan
    // instead of starting their own.
    let mut cached = gw.metrics().token_counts.lock().await;
    if let Some(c) = *cached {
        if c.at.elapsed() < TOKEN_COUNTS_TTL {
            return Some(c);
        }
    }
    let now = gw.now_ms();
    match gw
        .store_call(move |s| s.count_active(now, now + 7 * 86_400_000))
        .await
    {
        Ok((active, expiring_7d)) => {
            let c = crate::metrics::TokenCounts {
                at: std::time::Instant::now(),
                active,
                expiring_7d,
            };
            *cached = Some(c);
            Some(c)
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot count tokens; token gauges left out");
            *cached = None;
            None
        }
    }
}

/// How long `/metrics` reuses the token counts.
const TOKEN_COUNTS_TTL: std::time::Duration = std::time::Duration::from_secs(30);

fn text(status: StatusCode, s: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut r = Response::new(full(s));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A JSON response.
pub fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string() + "\n"));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

// ------------------------------------------------------------------------------------------------
// Shared by the API and the UI: who is calling, errors, audit.

/// The authenticated caller of an admin request.
#[derive(Debug, Clone)]
pub struct Actor {
    /// The acting token, as just read (never its plaintext).
    pub row: TokenRow,
    /// `api_token` (Bearer) or `session` (web UI cookie).
    pub auth_type: &'static str,
    /// Holds `tokengate:admin` (all accounts); otherwise `tokengate:self` (own account only).
    pub admin: bool,
    /// The person, when signed in with OpenID Connect (`row` is then built from their account
    /// and access, not read from the tokens table).
    pub person: Option<session::Person>,
}

impl Actor {
    /// Builds the actor, or refuses a token with neither admin permission (403, as on the public side).
    pub fn new(row: TokenRow, auth_type: &'static str) -> Result<Actor, Reject> {
        let admin = authz::grants(&row.permissions, PERM_ADMIN);
        if !admin && !authz::grants(&row.permissions, PERM_SELF) {
            return Err(Reject::Forbidden {
                reason: "insufficient_permission",
                permission: Some(PERM_SELF.to_string()),
            });
        }
        Ok(Actor {
            row,
            auth_type,
            admin,
            person: None,
        })
    }

    /// A person signed in with OpenID Connect, acting for `account`: an admin, or their own
    /// account with the permissions of `self_role` (`role_permissions`) and `tokengate:self`.
    /// Their powers are a token row's, so "never stronger than the caller" applies unchanged.
    pub fn person(
        person: session::Person,
        account: &crate::store::Account,
        self_role: &str,
        role_permissions: &[String],
        signed_in_at: i64,
    ) -> Actor {
        let mut permissions = role_permissions.to_vec();
        permissions.push(if person.admin { PERM_ADMIN } else { PERM_SELF }.to_string());
        let row = TokenRow {
            id: person.label(),
            account_id: account.id.clone(),
            account: account.name.clone(),
            name: person
                .email
                .clone()
                .unwrap_or_else(|| person.subject.clone()),
            prefix: String::new(),
            role: (!person.admin).then(|| self_role.to_string()),
            permissions,
            scopes: Default::default(),
            allowed_cidrs: vec![],
            rate: None,
            created_at: signed_in_at,
            created_by: "oidc".into(),
            expires_at: None,
            last_used_at: None,
            last_used_ip: None,
            revoked_at: None,
            revoked_by: None,
            revoke_reason: None,
            rotated_from: None,
            rotation_deadline: None,
            account_disabled_at: account.disabled_at,
        };
        Actor {
            admin: person.admin,
            row,
            auth_type: "session",
            person: Some(person),
        }
    }

    /// The `actor` of audit records and `created_by`/`revoked_by` in the store: the token id, or
    /// `oidc:` and the person's email.
    pub fn label(&self) -> String {
        self.row.id.clone()
    }
}

/// An admin-listener failure: a pipeline rejection (same status, body and WWW-Authenticate as on
/// the public listener) or an API-level answer with its own status and stable code.
#[derive(Debug, Clone)]
pub enum AdminError {
    /// Answered by `error::respond`.
    Reject(Reject),
    /// Any other answer.
    Status {
        /// HTTP status.
        status: StatusCode,
        /// Stable `error` code in the body.
        code: &'static str,
        /// Audit `reason`.
        reason: &'static str,
        /// Human sentence.
        message: String,
    },
}

impl From<Reject> for AdminError {
    fn from(r: Reject) -> Self {
        AdminError::Reject(r)
    }
}

impl AdminError {
    /// 400 with a message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::status(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "bad_request",
            message,
        )
    }
    /// Any status.
    pub fn status(
        status: StatusCode,
        code: &'static str,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        AdminError::Status {
            status,
            code,
            reason,
            message: message.into(),
        }
    }
    /// 403 that is not about the token's permissions (CSRF, Origin, policy).
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::status(StatusCode::FORBIDDEN, code, code, message)
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::status(StatusCode::NOT_FOUND, "not_found", "not_found", message)
    }
    /// 405 unless `method` is one of the `methods` the endpoint `template` accepts.
    pub fn check_method(template: &str, methods: &[&str], method: &Method) -> Result<(), Self> {
        if methods.contains(&method.as_str()) {
            return Ok(());
        }
        Err(Self::status(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method_not_allowed",
            format!("{template} accepts {}.", methods.join(", ")),
        ))
    }
    /// Audit reason.
    pub fn reason(&self) -> &'static str {
        match self {
            AdminError::Reject(r) => r.reason(),
            AdminError::Status { reason, .. } => reason,
        }
    }
    /// The response.
    pub fn respond(&self, realm: &str, request_id: &str) -> Response<Body> {
        match self {
            AdminError::Reject(r) => respond(r, realm, request_id),
            AdminError::Status {
                status,
                code,
                message,
                ..
            } => {
                let mut r = json(
                    *status,
                    serde_json::json!({"error": code, "message": message, "request_id": request_id}),
                );
                if *status == StatusCode::UNAUTHORIZED {
                    if let Ok(v) = HeaderValue::from_str(&format!("Bearer realm=\"{realm}\"")) {
                        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                    }
                }
                r
            }
        }
    }
}

/// Per-request facts for the audit line of an admin request.
pub(crate) struct ApiCall {
    pub(crate) start: Instant,
    pub(crate) request_id: String,
    pub(crate) client_ip: IpAddr,
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) user_agent: Option<String>,
    pub(crate) token_prefix: Option<String>,
    pub(crate) token: Option<TokenRow>,
    /// The account of a person signed in with OpenID Connect (no token acts).
    pub(crate) account: Option<String>,
    pub(crate) auth_type: &'static str,
    pub(crate) rule: Option<String>,
    pub(crate) permission: Option<String>,
}

impl ApiCall {
    pub(crate) fn new(
        gw: &Admin,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        conn: ConnInfo,
    ) -> ApiCall {
        let cfg = gw.config();
        let id = session::random_hex();
        ApiCall {
            start: Instant::now(),
            request_id: id[..24].to_string(),
            client_ip: crate::forwarded::client_ip(
                conn.peer.ip(),
                headers,
                &cfg.server.trusted_proxies,
            ),
            method: method.clone(),
            path: path
                .chars()
                .take(512)
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
            user_agent: headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.chars().take(256).collect()),
            token_prefix: None,
            token: None,
            account: None,
            auth_type: "none",
            rule: None,
            permission: None,
        }
    }

    /// Notes the authenticated actor for the request line.
    pub(crate) fn set_actor(&mut self, a: &Actor) {
        if a.person.is_some() {
            self.account = Some(a.row.account.clone());
        } else {
            self.token_prefix = Some(a.row.prefix.clone());
            self.token = Some(a.row.clone());
        }
        self.auth_type = a.auth_type;
        self.permission = Some(if a.admin { PERM_ADMIN } else { PERM_SELF }.to_string());
    }

    /// Writes the request line (best effort: the response is already decided).
    pub(crate) fn record(&self, gw: &Admin, status: StatusCode, reason: &str) {
        let row = self.token.as_ref();
        let rec = RequestRecord {
            timestamp: crate::audit::now_rfc3339(),
            request_id: self.request_id.clone(),
            auth_type: self.auth_type.into(),
            api_token_id: row.map(|r| r.id.clone()),
            api_token_name: row.map(|r| r.name.clone()),
            token_prefix: self.token_prefix.clone(),
            account: row.map(|r| r.account.clone()).or(self.account.clone()),
            method: crate::audit::method_name(&self.method),
            path: self.path.clone(),
            status_code: status.as_u16(),
            rbac_decision: if status.is_success() { "allow" } else { "deny" }.into(),
            reason: reason.to_owned().into(),
            permission: self.permission.clone(),
            rule: self.rule.clone(),
            shadow_decision: None,
            client_ip: self.client_ip.to_string(),
            user_agent: self.user_agent.clone(),
            upstream: None,
            duration_ms: (self.start.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            mode: None,
            phase: None,
            trace_id: None,
        };
        if let Err(e) = gw.audit().record(Entry::Request(rec)) {
            crate::coalesced!(error, "admin_request_audit_unqueued", error = %e, request_id = %self.request_id, "audit record for an admin request could not be queued");
        }
    }

    /// The answer to `r` (an error answered for `realm`), through [`Self::seal`].
    pub(crate) fn finish(
        &self,
        gw: &Admin,
        realm: &str,
        r: Result<Response<Body>, AdminError>,
    ) -> Response<Body> {
        let (resp, reason) = match r {
            Ok(r) => (r, "ok"),
            Err(e) => (e.respond(realm, &self.request_id), e.reason()),
        };
        self.seal(gw, resp, reason)
    }

    /// The last step of every admin answer: the [`harden`]ed headers, then the request line
    /// (with `reason`).
    pub(crate) fn seal(
        &self,
        gw: &Admin,
        mut resp: Response<Body>,
        reason: &str,
    ) -> Response<Body> {
        harden(resp.headers_mut(), &self.request_id);
        self.record(gw, resp.status(), reason);
        resp
    }

    /// Reserves the audit slot of a mutation before it is made: no change happens unaudited.
    pub(crate) fn reserve(&self, gw: &Admin) -> Result<Reservation, AdminError> {
        gw.audit()
            .reserve()
            .map_err(|_| AdminError::Reject(Reject::AuditUnavailable))
    }

    /// An admin event by `actor`, about `target`.
    pub(crate) fn event(
        &self,
        actor: &Actor,
        event: &str,
        target: Option<&str>,
        row: Option<&TokenRow>,
    ) -> AdminRecord {
        let mut details = serde_json::json!({
            "actor_name": actor.row.name,
            "actor_account": actor.row.account,
            "request_id": self.request_id,
        });
        if let Some(p) = &actor.person {
            details["sub"] = p.subject.clone().into();
            details["email"] = p.email.clone().into();
        }
        AdminRecord {
            timestamp: crate::audit::now_rfc3339(),
            event: event.to_string(),
            actor: actor.label(),
            auth_type: actor.auth_type.to_string(),
            target: target.map(str::to_string),
            account: row.map(|r| r.account.clone()),
            api_token_id: row.map(|r| r.id.clone()),
            token_prefix: row.map(|r| r.prefix.clone()),
            reason: None,
            client_ip: Some(self.client_ip.to_string()),
            details: Some(details),
        }
    }
}

/// Response headers every admin API and UI answer carries.
pub(crate) fn harden(h: &mut HeaderMap, request_id: &str) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-request-id", v);
    }
}

/// The session cookie's value, if the request carries one.
pub(crate) fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == session::COOKIE || *k == session::COOKIE_TLS)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// For a cookie-authenticated mutation: the `Origin` (when sent) must be this listener's own, and
/// the `X-CSRF-Token` header must equal the session's token (SameSite=Strict is the third layer).
pub(crate) fn check_csrf(
    parts: &http::request::Parts,
    tls: bool,
    csrf: &str,
) -> Result<(), AdminError> {
    check_origin(parts, tls)?;
    let headers = &parts.headers;
    let sent = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if sent.is_empty() || !session::same_secret(sent, csrf) {
        return Err(AdminError::forbidden(
            "csrf_failed",
            "Missing or wrong CSRF token: reload the page and try again.",
        ));
    }
    Ok(())
}

/// Refuses a browser request sent from another site: `Origin` must be this listener's own
/// origin (scheme of the listener, authority from `Host` or, in HTTP/2, `:authority`), and
/// `Sec-Fetch-Site`, when sent, must be `same-origin`.
pub(crate) fn check_origin(parts: &http::request::Parts, tls: bool) -> Result<(), AdminError> {
    let headers = &parts.headers;
    let refuse = || AdminError::forbidden("foreign_origin", "Cross-origin requests are refused.");
    if let Some(site) = headers.get("sec-fetch-site") {
        if !matches!(site.to_str(), Ok("same-origin") | Ok("none")) {
            return Err(refuse());
        }
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    let expected = format!("{}://{}", if tls { "https" } else { "http" }, host);
    match origin.to_str() {
        Ok(o) if !host.is_empty() && o.eq_ignore_ascii_case(&expected) => Ok(()),
        _ => Err(refuse()),
    }
}

/// Shared by API and UI: the live session behind the cookie and who acts through it (None: no or
/// dead session). A token session re-reads its token; a person's session re-reads their account.
pub(crate) async fn session_actor(
    gw: &Admin,
    headers: &HeaderMap,
    client_ip: IpAddr,
) -> Result<Option<(String, session::Session, Actor)>, AdminError> {
    let Some(id) = session_cookie(headers) else {
        return Ok(None);
    };
    let store_err = |e: crate::store::StoreError| {
        crate::coalesced!(warn, "session_store_failed", error = %e, "web UI session lookup failed");
        AdminError::Reject(Reject::StoreUnavailable)
    };
    let Some(sess) = session::live(gw, &id).await.map_err(store_err)? else {
        return Ok(None);
    };
    if let Some(person) = session::person_of(&sess) {
        let cfg = gw.config();
        let Some(oidc) = cfg.admin.oidc.as_ref() else {
            // Sign-in with OpenID Connect was turned off: its sessions end.
            let _ = session::remove(gw, &id).await;
            return Ok(None);
        };
        let name = person.account.clone();
        let account = match gw.store_call(move |s| s.get_account(&name)).await {
            Ok(a) if a.disabled_at.is_none() => a,
            Ok(_) | Err(crate::store::StoreError::NoAccount(_)) => {
                let _ = session::remove(gw, &id).await;
                return Err(AdminError::status(
                    StatusCode::UNAUTHORIZED,
                    "not_signed_in",
                    "account_disabled",
                    "Your account is disabled or gone: the session ended.",
                ));
            }
            Err(e) => return Err(store_err(e)),
        };
        let perms = cfg
            .roles
            .get(&oidc.self_role)
            .map(|r| r.permissions.clone())
            .unwrap_or_default();
        let actor = Actor::person(person, &account, &oidc.self_role, &perms, sess.created_at);
        return Ok(Some((id, sess, actor)));
    }
    let token_id = sess.token_id.clone().unwrap_or_default();
    match gw.authenticate_id(&token_id, client_ip).await {
        Ok(row) => {
            let actor = Actor::new(row, "session")?;
            Ok(Some((id, sess, actor)))
        }
        Err(Reject::InvalidToken { reason }) => {
            // The sign-in token was revoked, expired or disabled since: the session ends with it.
            let _ = session::remove(gw, &id).await;
            Err(AdminError::Reject(Reject::InvalidToken { reason }))
        }
        Err(e) => Err(e.into()),
    }
}
