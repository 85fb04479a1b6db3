//! The admin JSON API (`/v1/...`, documented in `docs/openapi.yaml`).
//!
//! Callers authenticate with a Bearer token holding `tokengate:admin` (every account) or
//! `tokengate:self` (its own account's tokens only), or with a web UI session cookie, in which case
//! every mutation also needs the CSRF token and a same-origin `Origin`. A `tokengate:self` caller
//! never sees other accounts' tokens (lists are filtered, `show`/`revoke` answer 404). Every token
//! operation goes through [`crate::lifecycle`], whose rule makes its result never stronger than
//! the caller; a refusal is a 403 `forbidden` naming the attribute, audited as `token.refused`.
//! Every mutation reserves its audit slot before it is made.
//!
//! Owns: the `/v1/...` routes, their JSON shapes and their audit lines. Must never import `cli`,
//! `pipeline` or `server` (the server calls in; the pipeline is reached through the gateway
//! handle).

use std::collections::BTreeMap;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{
    Actor, Admin, AdminError, ApiCall, MAX_BODY_BYTES, PERM_ADMIN, check_csrf, json, session_actor,
};
use crate::audit::{Entry, Reservation};
use crate::auth;
use crate::authz;
use crate::body::Body;
use crate::clock::rfc3339;
use crate::config::Config;
use crate::error::Reject;
use crate::gateway::ConnInfo;
use crate::lifecycle::{
    self, Caller, CreateRequest, LifecycleError, ListFilter, Refusal, RotateRequest, token_json,
};
use crate::store::{Account, StoreError, TokenRow};

/// The API's routes: (template, methods). `docs/openapi.yaml` documents exactly these.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/v1/whoami", &["GET"]),
    ("/v1/policy", &["GET"]),
    ("/v1/accounts", &["GET", "POST"]),
    ("/v1/accounts/{name}/disable", &["POST"]),
    ("/v1/tokens", &["GET", "POST"]),
    ("/v1/tokens/identify", &["POST"]),
    ("/v1/tokens/{id}", &["GET", "DELETE"]),
    ("/v1/tokens/{id}/revoke", &["POST"]),
    ("/v1/tokens/{id}/rotate", &["POST"]),
    ("/v1/sessions", &["GET"]),
    ("/v1/sessions/revoke-all", &["POST"]),
    ("/v1/sessions/{id}", &["DELETE"]),
    ("/v1/approvals", &["GET", "POST"]),
    ("/v1/approvals/{id}", &["GET"]),
    ("/v1/approvals/{id}/approve", &["POST"]),
    ("/v1/approvals/{id}/reject", &["POST"]),
    ("/v1/mfa", &["GET"]),
    ("/v1/mfa/enroll", &["POST"]),
    ("/v1/mfa/confirm", &["POST"]),
    ("/v1/mfa/verify", &["POST"]),
];

/// Longest `{id}` / `{name}` path parameter accepted.
const MAX_PARAM: usize = 128;
/// Longest revoke reason.
const MAX_REASON: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Whoami,
    Policy,
    Accounts,
    AccountDisable,
    Tokens,
    Identify,
    Token,
    Revoke,
    Rotate,
    /// `/v1/sessions...`, answered by [`super::session::api`].
    Sessions,
    People,
}

/// Matches a path to (route, its index in [`ROUTES`], the path parameter).
fn match_route(path: &str) -> Option<(Route, usize, Option<String>)> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let param = |s: &str| pct_decode(s).filter(|p| !p.is_empty() && p.len() <= MAX_PARAM);
    let r = match segs.as_slice() {
        ["v1", "whoami"] => (Route::Whoami, 0, None),
        ["v1", "policy"] => (Route::Policy, 1, None),
        ["v1", "accounts"] => (Route::Accounts, 2, None),
        ["v1", "accounts", name, "disable"] => (Route::AccountDisable, 3, Some(param(name)?)),
        ["v1", "tokens"] => (Route::Tokens, 4, None),
        ["v1", "tokens", "identify"] => (Route::Identify, 5, None),
        ["v1", "tokens", id] => (Route::Token, 6, Some(param(id)?)),
        ["v1", "tokens", id, "revoke"] => (Route::Revoke, 7, Some(param(id)?)),
        ["v1", "tokens", id, "rotate"] => (Route::Rotate, 8, Some(param(id)?)),
        ["v1", "sessions"] => (Route::Sessions, 9, None),
        ["v1", "sessions", "revoke-all"] => (Route::Sessions, 10, None),
        ["v1", "sessions", id] => (Route::Sessions, 11, Some(param(id)?)),
        ["v1", "approvals" | "mfa", ..] => {
            let (t, p) = super::approvals::matched(&segs[1..], param)?;
            (Route::People, ROUTES.iter().position(|r| r.0 == t)?, p)
        }
        _ => return None,
    };
    Some(r)
}

/// A request matched to one of [`ROUTES`]: the template it matched and its path parameter
/// (empty when the template has none).
pub(crate) struct Matched {
    pub(crate) template: &'static str,
    pub(crate) param: String,
    methods: &'static [&'static str],
}

impl Matched {
    fn new(index: usize, param: Option<String>) -> Self {
        let (template, methods) = ROUTES[index];
        Matched {
            template,
            param: param.unwrap_or_default(),
            methods,
        }
    }

    /// Names the route in the audit line's rule and refuses a method it does not take (405).
    pub(crate) fn admit(&self, method: &Method, ctx: &mut ApiCall) -> Result<(), AdminError> {
        ctx.rule = Some(format!("admin:{method} {}", self.template));
        AdminError::check_method(self.template, self.methods, method)
    }
}

/// Handles one `/v1/...` request: authenticate, route, answer, and write the request audit line.
pub async fn handle(gw: &Admin, req: http::Request<Incoming>, conn: ConnInfo) -> Response<Body> {
    let cfg = gw.config();
    let (parts, body) = req.into_parts();
    let mut ctx = ApiCall::new(gw, &parts.method, parts.uri.path(), &parts.headers, conn);
    let result = match tokio::time::timeout(
        cfg.server.request_timeout,
        serve(gw, &cfg, &parts, body, conn, &mut ctx),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(Reject::RequestTimeout.into()),
    };
    let (mut resp, reason) = match result {
        Ok(r) => (r, "ok"),
        Err(e) => {
            if matches!(
                e,
                AdminError::Reject(Reject::StoreUnavailable | Reject::Internal)
            ) {
                crate::coalesced!(warn, "admin_failed_ours", request_id = %ctx.request_id, reason = e.reason(), "admin request failed on our side");
            }
            (e.respond(&cfg.server.realm, &ctx.request_id), e.reason())
        }
    };
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
        if let Some((_, i, _)) = match_route(parts.uri.path()) {
            if let Ok(v) = HeaderValue::from_str(&ROUTES[i].1.join(", ")) {
                resp.headers_mut().insert(header::ALLOW, v);
            }
        }
    }
    ctx.seal(gw, resp, reason)
}

async fn serve(
    gw: &Admin,
    cfg: &Config,
    parts: &Parts,
    body: Incoming,
    conn: ConnInfo,
    ctx: &mut ApiCall,
) -> Result<Response<Body>, AdminError> {
    if let Some((Route::People, idx, param)) = match_route(parts.uri.path()) {
        let m = Matched::new(idx, param);
        return super::approvals::serve(gw, cfg, parts, body, conn, ctx, m).await;
    }
    let actor = authenticate(gw, parts, conn, ctx).await?;
    super::mfa::require_for_admin(gw, cfg, parts, &actor).await?;
    let Some((route, idx, param)) = match_route(parts.uri.path()) else {
        return Err(AdminError::not_found(
            "No such API endpoint; see docs/openapi.yaml.",
        ));
    };
    let m = Matched::new(idx, param);
    m.admit(&parts.method, ctx)?;
    let p = m.param;
    let get = parts.method == Method::GET;
    match route {
        Route::People => Err(AdminError::not_found("No such API endpoint.")),
        Route::Whoami => Ok(ok(StatusCode::OK, whoami_json(&actor, gw.now_ms()))),
        Route::Policy => Ok(ok(StatusCode::OK, policy_json(cfg, &actor))),
        Route::Accounts if get => list_accounts(gw, &actor).await,
        Route::Accounts => {
            create_account(gw, &actor, ctx, read_json(parts, body, true).await?).await
        }
        Route::AccountDisable => disable_account(gw, &actor, ctx, &p).await,
        Route::Tokens if get => list_tokens(gw, &actor, parts.uri.query()).await,
        Route::Tokens => {
            create_token(gw, cfg, &actor, ctx, read_json(parts, body, true).await?).await
        }
        Route::Identify => {
            identify(gw, cfg, &actor, ctx, read_json(parts, body, true).await?).await
        }
        Route::Token if get => {
            let t = find_visible(gw, &actor, &p).await?;
            Ok(ok(StatusCode::OK, token_json(&t, gw.now_ms())))
        }
        Route::Token => {
            // DELETE is a revoke (soft delete: the row stays for the audit trail), answered 204.
            let b = read_json(parts, body, false).await?;
            revoke(gw, cfg, &actor, ctx, &p, b).await?;
            let mut r = Response::new(crate::body::full(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            Ok(r)
        }
        Route::Revoke => {
            let b = read_json(parts, body, false).await?;
            let row = revoke(gw, cfg, &actor, ctx, &p, b).await?;
            Ok(ok(StatusCode::OK, token_json(&row, gw.now_ms())))
        }
        Route::Sessions => {
            super::session::api(gw, &actor, ctx, parts, conn.tls, m.template, &p).await
        }
        Route::Rotate => {
            rotate(
                gw,
                cfg,
                &actor,
                ctx,
                &p,
                read_json(parts, body, false).await?,
            )
            .await
        }
    }
}

/// Bearer token (as on the public listener), else the web UI session cookie.
async fn authenticate(
    gw: &Admin,
    parts: &Parts,
    conn: ConnInfo,
    ctx: &mut ApiCall,
) -> Result<Actor, AdminError> {
    if !parts.headers.contains_key(header::AUTHORIZATION) {
        if let Some((_, sess, actor)) = session_actor(gw, &parts.headers, ctx.client_ip).await? {
            ctx.set_actor(&actor);
            if !matches!(parts.method, Method::GET | Method::HEAD) {
                check_csrf(parts, conn.tls, &sess.csrf)?;
            }
            return Ok(actor);
        }
    } else {
        ctx.auth_type = "api_token";
        if let Ok(p) = auth::extract(&parts.headers, parts.uri.query()).and_then(auth::parse) {
            ctx.token_prefix = Some(p.display_prefix().to_string());
        }
        // Tokens only over HTTPS, as on the public listener (docs/security.md).
        let cfg = gw.config();
        if !cfg.server.allow_plaintext_tokens
            && !crate::forwarded::secure_transport(
                conn.peer.ip(),
                conn.tls,
                &parts.headers,
                &cfg.server.trusted_proxies,
            )
        {
            return Err(Reject::PlaintextToken.into());
        }
    }
    let entry = gw
        .authenticate_bearer(&parts.headers, parts.uri.query(), ctx.client_ip)
        .await?;
    // The cache keeps only what the request path reads: the actor's full row (printed in
    // answers and audit details) comes from the store, judged again as it is now.
    let row = gw.authenticate_id(entry.id(), ctx.client_ip).await?;
    ctx.token = Some(row.clone());
    ctx.permission = Some(super::PERM_SELF.to_string());
    let actor = Actor::new(row, "api_token")?;
    ctx.set_actor(&actor);
    Ok(actor)
}

fn ok(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    json(status, v)
}

/// Reads a JSON body: at most 64 KiB, `Content-Type: application/json`, unknown fields refused.
/// An empty body is allowed when `required` is false (it means "all defaults").
pub(crate) async fn read_json<T: DeserializeOwned + Default>(
    parts: &Parts,
    body: Incoming,
    required: bool,
) -> Result<T, AdminError> {
    let bytes: Bytes = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Err(Reject::BodyTooLarge.into());
            }
            return Err(AdminError::bad_request(
                "The request body could not be read.",
            ));
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        if required {
            return Err(AdminError::bad_request("A JSON body is required."));
        }
        return Ok(T::default());
    }
    let ct = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(AdminError::status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "unsupported_media_type",
            "Send the body as JSON with `Content-Type: application/json`.",
        ));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| AdminError::bad_request(format!("Invalid JSON body: {e}.")))
}

fn store_err(e: StoreError) -> AdminError {
    let conflict = |m: String| AdminError::status(StatusCode::CONFLICT, "conflict", "conflict", m);
    match e {
        StoreError::NoAccount(a) => AdminError::not_found(format!("No account named `{a}`.")),
        StoreError::NoToken(t) => {
            AdminError::not_found(format!("No token with id or prefix `{t}`."))
        }
        StoreError::Ambiguous(t) => AdminError::status(
            StatusCode::BAD_REQUEST,
            "ambiguous",
            "ambiguous",
            format!("`{t}` matches several tokens; use the token id."),
        ),
        StoreError::AccountExists(a) => conflict(format!("An account named `{a}` already exists.")),
        StoreError::AccountDisabled(a) => conflict(format!("Account `{a}` is disabled.")),
        StoreError::AlreadyRevoked(t) => conflict(format!("Token {t} is already revoked.")),
        StoreError::CapReached {
            account,
            limit,
            list,
        } => AdminError::status(
            StatusCode::CONFLICT,
            "token_limit",
            "token_limit",
            format!(
                "Account `{account}` already has {limit} active tokens, the limit (tokens.max_active_per_account). \
                 Revoke one (POST /v1/tokens/{{id}}/revoke, the web UI, or `tokengate token revoke <ID>`) and try again. Active: {}",
                list.lines().map(str::trim).collect::<Vec<_>>().join("; ")
            ),
        ),
        e => {
            crate::coalesced!(error, "admin_store_failed", error = %e, "admin API store call failed: answering 503");
            Reject::StoreUnavailable.into()
        }
    }
}

// ------------------------------------------------------------------------------------------------
// whoami, policy

fn whoami_json(actor: &Actor, now: i64) -> serde_json::Value {
    let mut v = token_json(&actor.row, now);
    v["auth_type"] = actor.auth_type.into();
    v["access"] = if actor.admin { "admin" } else { "self" }.into();
    if let Some(p) = &actor.person {
        v["person"] = serde_json::json!({"sub": p.subject, "email": p.email});
    }
    v
}

fn policy_json(cfg: &Config, actor: &Actor) -> serde_json::Value {
    let roles: Vec<serde_json::Value> = cfg
        .roles
        .iter()
        .map(|(name, r)| {
            let grantable = actor.admin
                || r.permissions
                    .iter()
                    .all(|p| authz::grants(&actor.row.permissions, p));
            serde_json::json!({"name": name, "permissions": r.permissions, "grantable": grantable})
        })
        .collect();
    serde_json::json!({
        "roles": roles,
        "expiry": {
            "allowed": cfg.tokens.allowed_expiry.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            "default": cfg.tokens.default_expiry.to_string(),
        },
        "max_active_per_account": cfg.tokens.max_active_per_account,
        "token_prefix": cfg.tokens.prefix,
        "scanner_regex": crate::token::SCANNER_REGEX,
    })
}

mod accounts;
pub use crate::lifecycle::account_json;
pub use accounts::valid_account_name;
use accounts::*;

// ------------------------------------------------------------------------------------------------
// tokens

async fn list_tokens(
    gw: &Admin,
    actor: &Actor,
    query: Option<&str>,
) -> Result<Response<Body>, AdminError> {
    let q = parse_query(query)?;
    let account = q.get("account").cloned();
    let all = match q.get("all").map(String::as_str) {
        None | Some("") | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(_) => return Err(AdminError::bad_request("`all` is true or false.")),
    };
    let list = ListFilter::parse(
        q.get("stale").map(String::as_str),
        q.get("expiring").map(String::as_str),
    )
    .map_err(AdminError::bad_request)?;
    let filter = if actor.admin {
        account
    } else {
        if account
            .as_deref()
            .is_some_and(|a| a != actor.row.account && a != actor.row.account_id)
        {
            return Err(AdminError::forbidden(
                "other_account",
                "This token may only list its own account's tokens (it holds tokengate:self, not tokengate:admin).",
            ));
        }
        Some(actor.row.account_id.clone())
    };
    let now = gw.now_ms();
    let rows = gw
        .store_call(move |s| s.list_tokens(filter.as_deref(), all, now))
        .await
        .map_err(store_err)?;
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .filter(|t| list.keeps(t, now))
        .map(|t| token_json(t, now))
        .collect();
    Ok(ok(StatusCode::OK, serde_json::json!({"tokens": rows})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    account: Option<String>,
    name: String,
    role: Option<String>,
    #[serde(default)]
    permissions: Vec<String>,
    expires: Option<String>,
    #[serde(default)]
    scopes: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    allowed_cidrs: Vec<String>,
    rate: Option<String>,
}

async fn create_token(
    gw: &Admin,
    cfg: &Config,
    actor: &Actor,
    ctx: &ApiCall,
    b: CreateBody,
) -> Result<Response<Body>, AdminError> {
    let account = b
        .account
        .clone()
        .unwrap_or_else(|| actor.row.account.clone());
    if !actor.admin && account != actor.row.account && account != actor.row.account_id {
        return Err(AdminError::forbidden(
            "other_account",
            "This token may only issue tokens for its own account (it holds tokengate:self, not tokengate:admin).",
        ));
    }
    if b.role.is_none() && b.permissions.is_empty() {
        return Err(AdminError::bad_request(
            "Give a `role` or a list of `permissions`.",
        ));
    }
    let now = gw.now_ms();
    let req = CreateRequest {
        account,
        name: b.name,
        role: b.role,
        permissions: b.permissions,
        expires: b.expires,
        scopes: b.scopes,
        allowed_cidrs: b.allowed_cidrs,
        rate: b.rate,
    };
    let caller = caller_of(cfg, actor);
    // Checked before the audit slot is reserved, so a refusal changes nothing.
    lifecycle::check_create(cfg, &caller, &req, now)
        .map_err(|e| lifecycle_err(gw, ctx, actor, "create", None, e))?;
    let res = ctx.reserve(gw)?;
    let cfg2 = gw.config();
    let (row, new) = gw
        .store_call(move |s| Ok(lifecycle::create(s, &cfg2, &caller, &req, now)))
        .await
        .map_err(store_err)?
        .map_err(|e| lifecycle_err(gw, ctx, actor, "create", None, e))?;
    let mut rec = ctx.event(actor, "token.created", Some(&row.id), Some(&row));
    if let Some(d) = rec.details.as_mut() {
        d["name"] = row.name.clone().into();
        d["role"] = row.role.clone().into();
        d["permissions"] = row.permissions.clone().into();
        d["expires_at"] = row.expires_at.map(rfc3339).into();
    }
    res.send(Entry::Admin(rec));
    let mut v = token_json(&row, now);
    v["token"] = new.plaintext.as_str().into();
    Ok(ok(StatusCode::CREATED, v))
}

/// A token by id or display prefix, among those this actor may see. For a `tokengate:self` actor
/// the search runs inside its own account only, so another account's token is simply "not found".
async fn find_visible(gw: &Admin, actor: &Actor, id: &str) -> Result<TokenRow, AdminError> {
    if actor.admin {
        let id2 = id.to_string();
        return gw
            .store_call(move |s| s.find_token(&id2))
            .await
            .map_err(store_err);
    }
    let (acc, now) = (actor.row.account_id.clone(), gw.now_ms());
    let rows = gw
        .store_call(move |s| s.list_tokens(Some(&acc), true, now))
        .await
        .map_err(store_err)?;
    if let Some(t) = rows.iter().find(|t| t.id == id || t.prefix == id) {
        return Ok(t.clone());
    }
    let hits: Vec<&TokenRow> = if id.len() >= 6 {
        rows.iter()
            .filter(|t| t.id.starts_with(id) || t.prefix.starts_with(id))
            .collect()
    } else {
        vec![]
    };
    match hits.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(store_err(StoreError::NoToken(id.to_string()))),
        _ => Err(store_err(StoreError::Ambiguous(id.to_string()))),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    reason: Option<String>,
}

fn check_reason(r: Option<String>, default: &str) -> Result<String, AdminError> {
    let r = r.unwrap_or_else(|| default.to_string());
    if r.is_empty() || r.len() > MAX_REASON || r.chars().any(char::is_control) {
        return Err(AdminError::bad_request(
            "A reason is 1-200 characters without control characters.",
        ));
    }
    Ok(r)
}

/// Revokes (POST `.../revoke` and DELETE): the lifecycle rule first, then the gateway's revoke,
/// which drops the token from this process's cache before answering.
async fn revoke(
    gw: &Admin,
    cfg: &Config,
    actor: &Actor,
    ctx: &ApiCall,
    id: &str,
    b: RevokeBody,
) -> Result<TokenRow, AdminError> {
    let reason = check_reason(b.reason, "revoked")?;
    let t = find_visible(gw, actor, id).await?;
    revoke_row(gw, cfg, actor, ctx, &t, reason).await
}

async fn revoke_row(
    gw: &Admin,
    cfg: &Config,
    actor: &Actor,
    ctx: &ApiCall,
    t: &TokenRow,
    reason: String,
) -> Result<TokenRow, AdminError> {
    lifecycle::may_revoke(&caller_of(cfg, actor), t)
        .map_err(|r| refused(gw, ctx, actor, "revoke", Some(t), r))?;
    let res = ctx.reserve(gw)?;
    let row = gw
        .revoke(&t.id, &actor.label(), &reason)
        .await
        .map_err(store_err)?;
    let _ = super::session::remove_token(gw, &row.id).await;
    let mut rec = ctx.event(actor, "token.revoked", Some(&row.id), Some(&row));
    rec.reason = Some(reason);
    res.send(Entry::Admin(rec));
    Ok(row)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    grace: Option<String>,
    /// A new lifetime (admins only, within policy); without it the successor keeps the expiry.
    expires: Option<String>,
}

async fn rotate(
    gw: &Admin,
    cfg: &Config,
    actor: &Actor,
    ctx: &ApiCall,
    id: &str,
    b: RotateBody,
) -> Result<Response<Body>, AdminError> {
    let old = find_visible(gw, actor, id).await?;
    let now = gw.now_ms();
    let caller = caller_of(cfg, actor);
    let req = RotateRequest {
        grace: b.grace,
        expires: b.expires,
    };
    lifecycle::check_rotate(cfg, &caller, &old, &req, now)
        .map_err(|e| lifecycle_err(gw, ctx, actor, "rotate", Some(&old), e))?;
    let res = ctx.reserve(gw)?;
    let (cfg2, old2) = (gw.config(), old.clone());
    let (row, new, grace) = gw
        .store_call(move |s| Ok(lifecycle::rotate(s, &cfg2, &caller, &old2, &req, now)))
        .await
        .map_err(store_err)?
        .map_err(|e| lifecycle_err(gw, ctx, actor, "rotate", Some(&old), e))?;
    // The old token's cached row lacks its new deadline: drop it now rather than at the next poll.
    gw.cache().invalidate_token(&old.id);
    let mut rec = ctx.event(actor, "token.rotated", Some(&old.id), Some(&row));
    if let Some(d) = rec.details.as_mut() {
        d["new_token_id"] = row.id.clone().into();
        d["grace_seconds"] = grace.as_secs().into();
    }
    res.send(Entry::Admin(rec));
    let mut v = token_json(&row, now);
    v["token"] = new.plaintext.as_str().into();
    v["grace_seconds"] = grace.as_secs().into();
    Ok(ok(StatusCode::CREATED, v))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentifyBody {
    token: String,
    #[serde(default)]
    revoke: bool,
    reason: Option<String>,
}

async fn identify(
    gw: &Admin,
    cfg: &Config,
    actor: &Actor,
    ctx: &ApiCall,
    b: IdentifyBody,
) -> Result<Response<Body>, AdminError> {
    let reason = check_reason(b.reason, "leaked")?;
    let parsed = crate::token::parse(b.token.trim())
        .map_err(|e| AdminError::bad_request(format!("This is not a tokengate token: {e}.")))?;
    let (hash, shown) = (parsed.hash(), parsed.display_prefix().to_string());
    let found = gw
        .store_call(move |s| s.lookup_hash(&hash))
        .await
        .map_err(store_err)?;
    let unknown = || {
        AdminError::not_found(format!(
            "{shown}… is well-formed but not a token this caller can see in this store."
        ))
    };
    let Some(t) = found.filter(|t| actor.admin || t.account_id == actor.row.account_id) else {
        return Err(unknown());
    };
    let res = ctx.reserve(gw)?;
    res.send(Entry::Admin(ctx.event(
        actor,
        "token.identified",
        Some(&t.id),
        Some(&t),
    )));
    let mut revoked_now = false;
    let t = if b.revoke && t.revoked_at.is_none() {
        revoked_now = true;
        revoke_row(gw, cfg, actor, ctx, &t, reason).await?
    } else {
        t
    };
    let mut v = token_json(&t, gw.now_ms());
    v["revoked_now"] = revoked_now.into();
    Ok(ok(StatusCode::OK, v))
}

// ------------------------------------------------------------------------------------------------
// the lifecycle rule's answers

/// The acting credential as the lifecycle rule sees it.
fn caller_of(cfg: &Config, actor: &Actor) -> Caller {
    Caller::token(&actor.row, cfg.rate_limit.default.into())
}

/// A refusal by the lifecycle rule: 403 `forbidden` naming the attribute, and a `token.refused`
/// admin event (reason `escalation`, the attribute and operation in its details).
fn refused(
    gw: &Admin,
    ctx: &ApiCall,
    actor: &Actor,
    operation: &str,
    target: Option<&TokenRow>,
    r: Refusal,
) -> AdminError {
    let mut rec = ctx.event(
        actor,
        "token.refused",
        target.map(|t| t.id.as_str()),
        target,
    );
    rec.reason = Some("escalation".into());
    if let Some(d) = rec.details.as_mut() {
        d["operation"] = operation.into();
        d["attribute"] = r.attribute.into();
        d["message"] = r.message.clone().into();
    }
    if rec.account.is_none() {
        rec.account = Some(actor.row.account.clone());
    }
    if let Err(e) = gw.audit().record(Entry::Admin(rec)) {
        crate::coalesced!(error, "admin_audit_unqueued", error = %e, request_id = %ctx.request_id, "audit record for a refused admin operation could not be queued");
    }
    AdminError::status(StatusCode::FORBIDDEN, "forbidden", "escalation", r.message)
}

fn lifecycle_err(
    gw: &Admin,
    ctx: &ApiCall,
    actor: &Actor,
    operation: &str,
    target: Option<&TokenRow>,
    e: LifecycleError,
) -> AdminError {
    match e {
        LifecycleError::Invalid(m) => AdminError::bad_request(m),
        LifecycleError::Forbidden(r) => refused(gw, ctx, actor, operation, target, r),
        LifecycleError::Store(e) => store_err(e),
    }
}

// ------------------------------------------------------------------------------------------------
// small parsers

/// Strict percent-decoding to UTF-8 (`+` stays `+`); None when malformed.
fn pct_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(out).ok()?;
    (!s.chars().any(char::is_control)).then_some(s)
}

fn parse_query(q: Option<&str>) -> Result<BTreeMap<String, String>, AdminError> {
    let mut out = BTreeMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(k), Some(v)) = (pct_decode(k), pct_decode(&v.replace('+', " "))) else {
            return Err(AdminError::bad_request("Malformed query string."));
        };
        out.insert(k, v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_their_templates() {
        assert_eq!(match_route("/v1/tokens").unwrap().0, Route::Tokens);
        assert_eq!(
            match_route("/v1/tokens/identify").unwrap().0,
            Route::Identify
        );
        let (r, i, p) = match_route("/v1/tokens/tok_abc/revoke").unwrap();
        assert_eq!(
            (r, ROUTES[i].0, p.as_deref()),
            (Route::Revoke, "/v1/tokens/{id}/revoke", Some("tok_abc"))
        );
        let (r, _, p) = match_route("/v1/accounts/ci%40example/disable").unwrap();
        assert_eq!(
            (r, p.as_deref()),
            (Route::AccountDisable, Some("ci@example"))
        );
        assert!(match_route("/v1/tokens/a/b/c").is_none());
        assert!(match_route("/v1/tokens/%zz").is_none());
        assert!(match_route("/v1/tokens//revoke").is_none());
        for (i, (t, _)) in ROUTES.iter().enumerate() {
            let concrete = t.replace("{id}", "tok_x").replace("{name}", "acc");
            assert_eq!(match_route(&concrete).unwrap().1, i, "{t}");
        }
    }

    #[test]
    fn query_parsing() {
        let q = parse_query(Some("account=ci%40x&all=true&stale=90d")).unwrap();
        assert_eq!(q["account"], "ci@x");
        assert_eq!(q["all"], "true");
        assert!(parse_query(Some("a=%0a")).is_err());
    }
}
