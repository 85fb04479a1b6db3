//! Sign-in with OpenID Connect (`[admin.oidc]`): the authorization code flow with PKCE (S256),
//! state and nonce, on the admin listener.
//!
//! `GET /oidc/login[?return_to=/path]` stores the sign-in in progress (SHA-256 of `state`, the
//! nonce, the PKCE verifier, a local return path) bound to this browser by a `SameSite=Lax`
//! cookie, and redirects to the provider. `GET /oidc/callback` takes that sign-in once (a forged
//! or replayed `state`, or another browser, is refused), redeems the code with the verifier,
//! verifies the ID token ([`verify`]), maps its claims to an account and an access
//! (`allowed_email_domains`, `allowed_groups`, `admin_groups`, `admin_emails`, `account_claim`,
//! `create_accounts`), and starts a new session (never the one the browser held: no fixation),
//! audited `session.created`. Metadata (`/.well-known/openid-configuration`) and keys (JWKS) are
//! cached; an unknown `kid` refetches the keys, at most once every [`JWKS_REFETCH_MS`].
//!
//! Owns: the two routes, the provider cache and the claim mapping. Must never import `cli`,
//! `pipeline` or `server`.

pub mod verify;

use std::sync::Mutex;

use base64::Engine as _;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Response, StatusCode};
use jsonwebtoken::jwk::JwkSet;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::session::{self, Owner, Person};
use super::{Admin, AdminError, ApiCall};
use crate::audit::Entry;
use crate::body::{Body, full};
use crate::config::{DefaultAccess, OidcConfig};
use crate::error::Reject;
use crate::gateway::ConnInfo;
use crate::path::percent_encode as enc;
use crate::store::LoginState;

/// How long a sign-in may take at the provider.
pub const LOGIN_TIMEOUT_MS: i64 = 10 * 60_000;
/// Most sign-ins in progress kept at once (each `GET /oidc/login` stores one, unauthenticated;
/// they end after [`LOGIN_TIMEOUT_MS`]).
pub const MAX_PENDING_SIGN_INS: i64 = 10_000;
/// Least time between two JWKS fetches caused by an unknown `kid`.
pub const JWKS_REFETCH_MS: i64 = 60_000;
/// Metadata and keys are refreshed this often anyway.
const METADATA_TTL_MS: i64 = 3_600_000;
/// Largest discovery, JWKS or token answer read.
const MAX_ANSWER_BYTES: usize = 512 * 1024;
/// Cookie binding a sign-in in progress to the browser that started it (named in `hygiene`,
/// which strips it upstream).
pub use crate::hygiene::OIDC_BINDING_COOKIE as BINDING_COOKIE;

/// The provider's metadata (the fields we use).
#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    /// Issuer, equal to the configured one.
    pub issuer: String,
    /// Where the browser is sent.
    pub authorization_endpoint: String,
    /// Where the code is redeemed.
    pub token_endpoint: String,
    /// The keys.
    pub jwks_uri: String,
}

#[derive(Debug, Default)]
struct Cached {
    /// (issuer it is for, metadata, fetched at).
    metadata: Option<(String, Metadata, i64)>,
    /// (keys, fetched at).
    keys: Option<(JwkSet, i64)>,
}

/// The provider's metadata and keys, shared by every admin connection.
#[derive(Debug, Default)]
pub struct ProviderCache {
    cached: Mutex<Cached>,
}

fn client() -> Result<reqwest::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(10))
        .user_agent("tokengate")
        .build()
        .map_err(|e| e.to_string())
}

static CLIENT: std::sync::LazyLock<Result<reqwest::Client, String>> =
    std::sync::LazyLock::new(client);

fn http() -> Result<&'static reqwest::Client, String> {
    CLIENT.as_ref().map_err(|e| format!("HTTP client: {e}"))
}

/// Reads an answer as JSON, at most [`MAX_ANSWER_BYTES`]; (status, body).
async fn read_json(mut r: reqwest::Response) -> Result<(StatusCode, serde_json::Value), String> {
    let status = StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut buf = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(|e| e.to_string())? {
        buf.extend_from_slice(&chunk);
        if buf.len() > MAX_ANSWER_BYTES {
            return Err("answer too large".into());
        }
    }
    let v = serde_json::from_slice(&buf).map_err(|e| format!("not JSON: {e}"))?;
    Ok((status, v))
}

async fn get_json(url: &str) -> Result<serde_json::Value, String> {
    let r = http()?.get(url).send().await.map_err(|e| e.to_string())?;
    match read_json(r).await? {
        (s, v) if s.is_success() => Ok(v),
        (s, _) => Err(format!("{url} answered {s}")),
    }
}

fn endpoint_ok(u: &str) -> bool {
    let base = u.split(['?', '#']).next().unwrap_or("");
    crate::config::check_provider_url(base).is_ok()
}

impl ProviderCache {
    /// The provider's metadata (fetched once an hour).
    pub async fn metadata(&self, cfg: &OidcConfig, now: i64) -> Result<Metadata, String> {
        {
            let c = self.cached.lock().expect("oidc cache poisoned");
            if let Some((iss, m, at)) = &c.metadata {
                if *iss == cfg.issuer && now - at < METADATA_TTL_MS {
                    return Ok(m.clone());
                }
            }
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            cfg.issuer.trim_end_matches('/')
        );
        let m: Metadata =
            serde_json::from_value(get_json(&url).await?).map_err(|e| format!("{url}: {e}"))?;
        if m.issuer != cfg.issuer {
            return Err(format!(
                "{url} names issuer `{}`, not the configured `{}`",
                m.issuer, cfg.issuer
            ));
        }
        for e in [&m.authorization_endpoint, &m.token_endpoint, &m.jwks_uri] {
            if !endpoint_ok(e) {
                return Err(format!("{url}: endpoint `{e}` is not https"));
            }
        }
        let mut c = self.cached.lock().expect("oidc cache poisoned");
        if c.metadata
            .as_ref()
            .is_some_and(|(_, old, _)| old.jwks_uri != m.jwks_uri)
        {
            c.keys = None;
        }
        c.metadata = Some((cfg.issuer.clone(), m.clone(), now));
        Ok(m)
    }

    /// The provider's keys: cached, refetched when `refresh` and the last fetch is older than
    /// [`JWKS_REFETCH_MS`] (an unknown `kid`: the provider rotated its keys).
    pub async fn keys(&self, m: &Metadata, now: i64, refresh: bool) -> Result<JwkSet, String> {
        {
            let c = self.cached.lock().expect("oidc cache poisoned");
            if let Some((k, at)) = &c.keys {
                let stale = now - at >= METADATA_TTL_MS;
                let may_refetch = now - at >= JWKS_REFETCH_MS;
                if !(stale || refresh && may_refetch) {
                    return Ok(k.clone());
                }
            }
        }
        let k: JwkSet = serde_json::from_value(get_json(&m.jwks_uri).await?)
            .map_err(|e| format!("{}: {e}", m.jwks_uri))?;
        self.cached.lock().expect("oidc cache poisoned").keys = Some((k.clone(), now));
        Ok(k)
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The PKCE S256 challenge of a verifier (RFC 7636 §4.2).
pub fn pkce_challenge(verifier: &str) -> String {
    b64(&Sha256::digest(verifier.as_bytes()))
}

/// A return path the sign-in may send the browser to: a local absolute path only (no scheme,
/// no `//host`, no backslash, no control characters); anything else becomes `/`.
pub fn safe_return_to(v: Option<&str>) -> String {
    match v {
        Some(p)
            if p.starts_with('/')
                && !p.starts_with("//")
                && !p.contains('\\')
                && p.len() <= 512
                && !p.chars().any(|c| c.is_control()) =>
        {
            p.to_string()
        }
        _ => "/".into(),
    }
}

fn query_param(parts: &Parts, name: &str) -> Option<String> {
    let q = parts.uri.query()?;
    form_urlencoded_pairs(q)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// Decodes `a=b&c=d` (percent-decoding, `+` as space).
fn form_urlencoded_pairs(q: &str) -> Vec<(String, String)> {
    let dec = |s: &str| -> String {
        let s = s.replace('+', " ");
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                if let Ok(x) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    out.push(x);
                    i += 3;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (dec(k), dec(v)),
            None => (dec(kv), String::new()),
        })
        .collect()
}

fn cookie_value(parts: &Parts, name: &str) -> Option<String> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The binding cookie: `SameSite=Lax` (it must come back on the provider's top-level redirect),
/// HttpOnly, Secure under TLS, scoped to `/oidc/`, gone after the login timeout.
fn binding_cookie(tls: bool, value: &str, clear: bool) -> String {
    let mut c = format!("{BINDING_COOKIE}={value}; Path=/oidc/; HttpOnly; SameSite=Lax");
    if tls {
        c.push_str("; Secure");
    }
    c.push_str(if clear {
        "; Max-Age=0"
    } else {
        "; Max-Age=600"
    });
    c
}

fn redirect_url(cfg: &OidcConfig, parts: &Parts, tls: bool) -> String {
    cfg.redirect_url.clone().unwrap_or_else(|| {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()))
            .unwrap_or("localhost");
        format!(
            "{}://{host}/oidc/callback",
            if tls { "https" } else { "http" }
        )
    })
}

/// The provider's metadata, or the answer for an unreachable provider.
async fn metadata(gw: &Admin, o: &OidcConfig, now: i64) -> Result<Metadata, AdminError> {
    gw.sessions()
        .provider
        .metadata(o, now)
        .await
        .map_err(unavailable)
}

fn unavailable(e: String) -> AdminError {
    crate::coalesced!(warn, "oidc_provider_unavailable", error = %e, "OpenID provider unreachable or misconfigured");
    AdminError::status(
        StatusCode::BAD_GATEWAY,
        "provider_unavailable",
        "oidc_provider_unavailable",
        "The sign-in provider could not be reached; try again later.",
    )
}

fn refused(reason: &'static str, message: &str) -> AdminError {
    AdminError::status(StatusCode::FORBIDDEN, "sign_in_refused", reason, message)
}

fn bad_state() -> AdminError {
    AdminError::status(
        StatusCode::BAD_REQUEST,
        "invalid_state",
        "oidc_invalid_state",
        "This sign-in is unknown, was already used, expired, or was started in another browser: start again.",
    )
}

/// Handles `GET /oidc/login` and `GET /oidc/callback`, writing the request audit line.
pub async fn handle(gw: &Admin, parts: Parts, conn: ConnInfo) -> Response<Body> {
    let cfg = gw.config();
    let path = parts.uri.path().to_string();
    let mut ctx = ApiCall::new(gw, &parts.method, &path, &parts.headers, conn);
    ctx.rule = Some(format!("admin:GET {path}"));
    ctx.auth_type = "session";
    let r = match cfg.admin.oidc.as_ref() {
        None => Err(AdminError::not_found(
            "Sign-in with OpenID Connect is not configured ([admin.oidc]).",
        )),
        Some(o) if path == "/oidc/login" => login(gw, o, &parts, conn).await,
        Some(o) => callback(gw, o, &parts, conn, &mut ctx).await,
    };
    ctx.finish(gw, &cfg.server.realm, r)
}

async fn login(
    gw: &Admin,
    o: &OidcConfig,
    parts: &Parts,
    conn: ConnInfo,
) -> Result<Response<Body>, AdminError> {
    let now = gw.now_ms();
    let m = metadata(gw, o, now).await?;
    // Sign-ins never finished are swept with expired sessions (at most once a minute).
    session::purge(gw).await;
    let (state, nonce, verifier, binding) = (
        session::random_hex(),
        session::random_hex(),
        session::random_hex(),
        session::random_hex(),
    );
    let l = LoginState {
        state_hash: session::hash_hex(&state),
        binding_hash: session::hash_hex(&binding),
        nonce: nonce.clone(),
        verifier: verifier.clone(),
        return_to: safe_return_to(query_param(parts, "return_to").as_deref()),
        expires_at: now + LOGIN_TIMEOUT_MS,
    };
    let stored = gw
        .store_call(move |s| s.login_put(&l, MAX_PENDING_SIGN_INS))
        .await
        .map_err(|_| AdminError::Reject(Reject::StoreUnavailable))?;
    if !stored {
        crate::coalesced!(
            warn,
            "oidc_too_many_sign_ins",
            "too many OpenID Connect sign-ins in progress: refusing new ones until some finish or expire"
        );
        return Err(AdminError::status(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_sign_ins",
            "oidc_too_many_sign_ins",
            "Too many sign-ins are in progress; try again in a few minutes.",
        ));
    }
    let sep = if m.authorization_endpoint.contains('?') {
        '&'
    } else {
        '?'
    };
    let url = format!(
        "{}{sep}response_type=code&client_id={}&redirect_uri={}&scope={}&state={state}&nonce={nonce}&code_challenge={}&code_challenge_method=S256",
        m.authorization_endpoint,
        enc(&o.client_id),
        enc(&redirect_url(o, parts, conn.tls)),
        enc(&o.scopes.join(" ")),
        pkce_challenge(&verifier),
    );
    let mut r = Response::new(full(""));
    *r.status_mut() = StatusCode::FOUND;
    if let Ok(v) = HeaderValue::from_str(&url) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    super::ui::set_cookie(r.headers_mut(), &binding_cookie(conn.tls, &binding, false));
    Ok(r)
}

async fn callback(
    gw: &Admin,
    o: &OidcConfig,
    parts: &Parts,
    conn: ConnInfo,
    ctx: &mut ApiCall,
) -> Result<Response<Body>, AdminError> {
    let now = gw.now_ms();
    let state = query_param(parts, "state").ok_or_else(bad_state)?;
    let h = session::hash_hex(&state);
    let l = gw
        .store_call(move |s| s.login_take(&h))
        .await
        .map_err(|_| AdminError::Reject(Reject::StoreUnavailable))?
        .ok_or_else(bad_state)?;
    let binding = cookie_value(parts, BINDING_COOKIE).unwrap_or_default();
    if l.expires_at <= now || !session::same_secret(&session::hash_hex(&binding), &l.binding_hash) {
        return Err(bad_state());
    }
    // RFC 9207: when the provider names itself in the answer, it must be our issuer (mix-up).
    if query_param(parts, "iss").is_some_and(|iss| iss != o.issuer) {
        return Err(refused(
            "oidc_wrong_issuer",
            "The answer came from another provider than the configured one.",
        ));
    }
    if query_param(parts, "error").is_some() {
        return Err(refused(
            "oidc_provider_error",
            "The provider did not sign you in (it answered with an error).",
        ));
    }
    let code = query_param(parts, "code").ok_or_else(|| AdminError::bad_request("No code."))?;
    let m = metadata(gw, o, now).await?;
    let mut form = vec![
        ("grant_type", "authorization_code".to_string()),
        ("code", code),
        ("redirect_uri", redirect_url(o, parts, conn.tls)),
        ("code_verifier", l.verifier.clone()),
    ];
    let mut req = http().map_err(unavailable)?.post(&m.token_endpoint);
    match &o.client_secret {
        Some(s) => req = req.basic_auth(enc(&o.client_id), Some(enc(&s.0))),
        None => form.push(("client_id", o.client_id.clone())),
    }
    let body = form
        .iter()
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect::<Vec<_>>()
        .join("&");
    let resp = req
        .header("content-type", "application/x-www-form-urlencoded")
        .header("accept", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let (status, tok) = read_json(resp).await.map_err(unavailable)?;
    if !status.is_success() {
        // invalid_grant: a used or unknown code, or a verifier that does not match.
        return Err(refused(
            "oidc_code_refused",
            "The provider refused the sign-in code (used, expired, or not for this sign-in).",
        ));
    }
    let id_token = tok
        .get("id_token")
        .and_then(|v| v.as_str())
        .ok_or_else(|| refused("oidc_no_id_token", "The provider sent no ID token."))?;
    let claims = verify_with_rotation(gw, o, &m, id_token, &l.nonce, now).await?;
    let person = person_from_claims(o, &claims).map_err(|(r, msg)| refused(r, &msg))?;
    ensure_account(gw, o, &person).await?;
    // Sign-in always starts a new session: the one the browser held (if any) ends.
    if let Some(old) = super::session_cookie(&parts.headers) {
        let _ = session::remove(gw, &old).await;
    }
    ctx.account = Some(person.account.clone());
    let res = ctx.reserve(gw)?;
    let (id, sess) = session::create(
        gw,
        &Owner::Person(person.clone()),
        Some(ctx.client_ip.to_string()),
        ctx.user_agent.clone(),
    )
    .await
    .map_err(|_| AdminError::Reject(Reject::StoreUnavailable))?;
    let mut rec = session::event(
        &sess,
        "session.created",
        &person.label(),
        Some(ctx.client_ip.to_string()),
    );
    if let Some(d) = rec.details.as_mut() {
        d["issuer"] = o.issuer.clone().into();
        d["request_id"] = ctx.request_id.clone().into();
    }
    res.send(Entry::Admin(rec));
    // A page that moves on by itself: a redirect chain that started at the provider would not
    // carry the new SameSite=Strict cookie; a navigation started by our own page does.
    let html = format!(
        "<!doctype html><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0;url={0}\">\
         <link rel=\"icon\" href=\"/assets/icon.svg\" type=\"image/svg+xml\">\
         <title>Signed in · tokengate</title><p>Signed in. <a href=\"{0}\">Continue</a></p>\n",
        attr(&l.return_to)
    );
    let mut r = Response::new(full(html));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(super::ui::CSP),
    );
    super::ui::set_cookie(h, &super::ui::cookie(conn.tls, &id, false));
    super::ui::set_cookie(h, &binding_cookie(conn.tls, "", true));
    Ok(r)
}

fn attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Verifies the ID token; an unknown `kid` refetches the keys (rate-limited) and tries once more.
async fn verify_with_rotation(
    gw: &Admin,
    o: &OidcConfig,
    m: &Metadata,
    id_token: &str,
    nonce: &str,
    now: i64,
) -> Result<verify::Claims, AdminError> {
    let expect = verify::Expect {
        issuer: &o.issuer,
        client_id: &o.client_id,
        nonce,
        now: now.div_euclid(1000),
        leeway: o.clock_skew.as_secs() as i64,
    };
    let cache = &gw.sessions().provider;
    let keys = cache.keys(m, now, false).await.map_err(unavailable)?;
    let first = verify::verify(id_token, &keys, &expect);
    let r = match first {
        Err(verify::Refused::UnknownKey(_)) => {
            let keys = cache.keys(m, now, true).await.map_err(unavailable)?;
            verify::verify(id_token, &keys, &expect)
        }
        r => r,
    };
    r.map_err(|e| {
        let reason = match e {
            verify::Refused::UnknownKey(_) => "unknown_key",
            verify::Refused::Invalid(r) => r,
        };
        tracing::warn!(reason, "OpenID Connect ID token refused");
        refused(
            "oidc_id_token_invalid",
            &format!("The ID token was refused ({reason})."),
        )
    })
}

/// Maps verified claims to a person, or refuses (audit reason, message).
pub fn person_from_claims(
    o: &OidcConfig,
    c: &verify::Claims,
) -> Result<Person, (&'static str, String)> {
    let s = |k: &str| c.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let subject = s("sub").unwrap_or_default();
    let email = s("email").map(|e| e.to_ascii_lowercase());
    if email.is_some() && c.get("email_verified").and_then(|v| v.as_bool()) == Some(false) {
        return Err((
            "oidc_email_unverified",
            "Your email is not verified at the provider.".into(),
        ));
    }
    if !o.allowed_email_domains.is_empty() {
        let domain = email
            .as_deref()
            .and_then(|e| e.rsplit_once('@'))
            .map(|(_, d)| d);
        if !domain.is_some_and(|d| o.allowed_email_domains.iter().any(|a| a == d)) {
            return Err((
                "oidc_domain_not_allowed",
                "Your email domain may not sign in here.".into(),
            ));
        }
    }
    let groups: Vec<String> = match c.get(&o.groups_claim) {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        Some(serde_json::Value::String(g)) => vec![g.clone()],
        _ => vec![],
    };
    if !o.allowed_groups.is_empty() && !groups.iter().any(|g| o.allowed_groups.contains(g)) {
        return Err((
            "oidc_group_not_allowed",
            "None of your groups may sign in here.".into(),
        ));
    }
    let admin = groups.iter().any(|g| o.admin_groups.contains(g))
        || email.as_ref().is_some_and(|e| o.admin_emails.contains(e));
    if !admin && o.default_access == DefaultAccess::None {
        return Err((
            "oidc_no_access",
            "Only administrators may sign in here.".into(),
        ));
    }
    let account = match c.get(&o.account_claim) {
        Some(serde_json::Value::String(a)) if o.account_claim == "email" => a.to_ascii_lowercase(),
        Some(serde_json::Value::String(a)) => a.clone(),
        _ => {
            return Err((
                "oidc_no_account_claim",
                format!(
                    "The ID token has no `{}` claim to name your account.",
                    o.account_claim
                ),
            ));
        }
    };
    if !crate::lifecycle::valid_account_name(&account) {
        return Err((
            "oidc_bad_account_claim",
            format!("`{}` cannot name an account.", o.account_claim),
        ));
    }
    Ok(Person {
        subject,
        email,
        account,
        admin,
    })
}

/// The person's account must exist and be enabled; created on first sign-in when
/// `create_accounts` (audited `account.created`).
async fn ensure_account(gw: &Admin, o: &OidcConfig, p: &Person) -> Result<(), AdminError> {
    let name = p.account.clone();
    match gw.store_call(move |s| s.get_account(&name)).await {
        Ok(a) if a.disabled_at.is_some() => {
            Err(refused("account_disabled", "Your account is disabled."))
        }
        Ok(_) => Ok(()),
        Err(crate::store::StoreError::NoAccount(_)) if o.create_accounts => {
            let res = gw
                .audit()
                .reserve()
                .map_err(|_| AdminError::Reject(Reject::AuditUnavailable))?;
            let (name, email, label, now) =
                (p.account.clone(), p.email.clone(), p.label(), gw.now_ms());
            let acc = gw
                .store_call(move |s| s.create_account(&name, email.as_deref(), &label, now))
                .await;
            match acc {
                Ok(a) => {
                    res.send(Entry::Admin(crate::audit::AdminRecord {
                        timestamp: crate::audit::now_rfc3339(),
                        event: "account.created".into(),
                        actor: p.label(),
                        auth_type: "session".into(),
                        target: Some(a.id.clone()),
                        account: Some(a.name.clone()),
                        api_token_id: None,
                        token_prefix: None,
                        reason: Some("first_sign_in".into()),
                        client_ip: None,
                        details: Some(serde_json::json!({"sub": p.subject, "email": p.email, "account_id": a.id})),
                    }));
                    Ok(())
                }
                // Another replica created it meanwhile.
                Err(crate::store::StoreError::AccountExists(_)) => Ok(()),
                Err(_) => Err(AdminError::Reject(Reject::StoreUnavailable)),
            }
        }
        Err(crate::store::StoreError::NoAccount(_)) => Err(refused(
            "oidc_no_account",
            "You have no account here yet; ask an administrator to create it.",
        )),
        Err(_) => Err(AdminError::Reject(Reject::StoreUnavailable)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_paths_stay_local() {
        for bad in [
            "https://evil.example",
            "//evil.example/x",
            "/\\evil.example",
            "javascript:alert(1)",
            "evil",
            "/a\nb",
        ] {
            assert_eq!(safe_return_to(Some(bad)), "/", "{bad}");
        }
        assert_eq!(safe_return_to(Some("/#sessions")), "/#sessions");
        assert_eq!(safe_return_to(None), "/");
    }

    #[test]
    fn pkce_s256_matches_rfc_7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn query_decoding() {
        assert_eq!(
            form_urlencoded_pairs("a=b%20c&d=%2F%2Fx&e=1+2&f"),
            vec![
                ("a".into(), "b c".into()),
                ("d".into(), "//x".into()),
                ("e".into(), "1 2".into()),
                ("f".into(), String::new())
            ]
        );
    }
}
