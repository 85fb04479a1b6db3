//! The web UI: the "API tokens" page, its embedded assets, and sign-in / sign-out.
//!
//! No build step: the HTML, script and stylesheet are compiled into the binary. The page itself
//! talks to the JSON API (`/v1/...`) with the session cookie and the CSRF token it finds in a
//! `<meta>` tag. Sign-in takes a token once, checks it exactly like a Bearer call, and keeps only
//! the token's id in the session.
//!
//! Owns: the page, its assets, sign-in and sign-out. Must never import `cli`, `pipeline` or
//! `server`; token operations go through the JSON API and `lifecycle`.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;

use super::{
    Actor, Admin, AdminError, ApiCall, MAX_BODY_BYTES, check_csrf, check_origin, harden, json,
    session, session_actor,
};
use crate::audit::Entry;
use crate::body::{Body, full};
use crate::error::Reject;
use crate::gateway::ConnInfo;

const INDEX_HTML: &str = include_str!("assets/index.html");

/// The embedded asset served at `path`: its body and content type.
fn embedded(path: &str) -> Option<(&'static str, &'static str)> {
    const JS: &str = "text/javascript; charset=utf-8";
    Some(match path {
        "/assets/api.js" => (include_str!("assets/api.js"), JS),
        "/assets/app.js" => (include_str!("assets/app.js"), JS),
        "/assets/app.css" => (include_str!("assets/app.css"), "text/css; charset=utf-8"),
        "/assets/approvals.js" => (include_str!("assets/approvals.js"), JS),
        "/assets/icon.svg" => (include_str!("assets/icon.svg"), "image/svg+xml"),
        "/assets/signin.js" => (include_str!("assets/signin.js"), JS),
        "/assets/sessions.js" => (include_str!("assets/sessions.js"), JS),
        _ => return None,
    })
}

/// Content-Security-Policy of the page: only our own script, style and API; no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Paths the UI serves.
pub fn is_ui_path(path: &str) -> bool {
    matches!(
        path,
        "/" | "/index.html" | "/session" | "/session/logout" | "/oidc/login" | "/oidc/callback"
    ) || embedded(path).is_some()
}

/// Handles one UI request.
pub async fn handle(gw: &Admin, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let get = matches!(parts.method, Method::GET | Method::HEAD);
    if let Some((body, kind)) = embedded(&path).filter(|_| get) {
        return asset(body, kind);
    }
    match (get, path.as_str()) {
        (true, "/oidc/login" | "/oidc/callback") => super::oidc::handle(gw, parts, conn).await,
        (true, "/" | "/index.html") => index(gw, &parts, conn).await,
        (false, "/session" | "/session/logout") if parts.method == Method::POST => {
            let cfg = gw.config();
            let mut ctx = ApiCall::new(gw, &parts.method, &path, &parts.headers, conn);
            ctx.rule = Some(format!("admin:POST {path}"));
            let r = if path == "/session" {
                login(gw, &parts, body, conn, &mut ctx).await
            } else {
                logout(gw, &parts, conn, &mut ctx).await
            };
            ctx.finish(gw, &cfg.server.realm, r)
        }
        _ => {
            let mut r = json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({"error": "method_not_allowed", "message": "Method not allowed."}),
            );
            let allow = if path.starts_with("/session") {
                "POST"
            } else {
                "GET, HEAD"
            };
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            r
        }
    }
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from_static(body.as_bytes())));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Embedded in the binary: revalidate so an upgrade is picked up at once.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// Cookie attributes: HttpOnly and SameSite=Strict always; Secure (and the `__Host-` name) under TLS.
pub(crate) fn cookie(tls: bool, value: &str, clear: bool) -> String {
    let name = if tls {
        session::COOKIE_TLS
    } else {
        session::COOKIE
    };
    let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if tls {
        c.push_str("; Secure");
    }
    if clear {
        c.push_str("; Max-Age=0");
    }
    c
}

pub(crate) fn set_cookie(h: &mut HeaderMap, v: &str) {
    if let Ok(v) = HeaderValue::from_str(v) {
        h.append(header::SET_COOKIE, v);
    }
}

/// Escapes text for an HTML attribute value.
fn attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

async fn index(gw: &Admin, parts: &Parts, conn: ConnInfo) -> Response<Body> {
    let ip = crate::forwarded::client_ip(
        conn.peer.ip(),
        &parts.headers,
        &gw.config().server.trusted_proxies,
    );
    let live = session_actor(gw, &parts.headers, ip).await;
    let csrf = match &live {
        Ok(Some((_, s, _))) => s.csrf.clone(),
        _ => String::new(),
    };
    let sso = if gw.config().admin.oidc.is_some() {
        "on"
    } else {
        ""
    };
    let html = INDEX_HTML
        .replace("{{CSRF}}", &attr(&csrf))
        .replace("{{OIDC}}", sso);
    let mut r = Response::new(full(html));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    harden(h, "");
    h.remove("x-request-id");
    if super::session_cookie(&parts.headers).is_some() && csrf.is_empty() {
        // A cookie for a session that ended: tell the browser to drop it.
        set_cookie(h, &cookie(conn.tls, "", true));
    }
    r
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    token: String,
}

async fn login(
    gw: &Admin,
    parts: &Parts,
    body: Incoming,
    conn: ConnInfo,
    ctx: &mut ApiCall,
) -> Result<Response<Body>, AdminError> {
    check_origin(parts, conn.tls)?;
    let bytes = Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|_| AdminError::from(Reject::BodyTooLarge))?
        .to_bytes();
    let b: LoginBody = serde_json::from_slice(&bytes)
        .map_err(|_| AdminError::bad_request("Send {\"token\": \"...\"} as JSON."))?;
    ctx.auth_type = "session";
    // Check the token exactly as a Bearer call would (limiter, format, lookup, judgement).
    let mut h = HeaderMap::new();
    let v = HeaderValue::from_str(&format!("Bearer {}", b.token.trim())).map_err(|_| {
        AdminError::from(Reject::InvalidToken {
            reason: "bad_format",
        })
    })?;
    h.insert(header::AUTHORIZATION, v);
    if let Ok(p) = crate::auth::extract(&h, None).and_then(crate::auth::parse) {
        ctx.token_prefix = Some(p.display_prefix().to_string());
    }
    let entry = gw.authenticate_bearer(&h, None, ctx.client_ip).await?;
    // The full row (the cache keeps only what the request path reads), judged again.
    let row = gw.authenticate_id(entry.id(), ctx.client_ip).await?;
    ctx.token = Some(row.clone());
    let actor = Actor::new(row, "session")?;
    ctx.set_actor(&actor);
    let res = ctx.reserve(gw)?;
    let idle = gw.config().admin.session_idle_timeout;
    // A sign-in always starts a new session (no fixation); the one the browser held ends.
    if let Some(old) = super::session_cookie(&parts.headers) {
        let _ = session::remove(gw, &old).await;
    }
    let (id, sess) = session::create(
        gw,
        &session::Owner::Token(actor.row.id.clone()),
        Some(ctx.client_ip.to_string()),
        ctx.user_agent.clone(),
    )
    .await
    .map_err(|_| AdminError::Reject(Reject::StoreUnavailable))?;
    let mut rec = ctx.event(
        &actor,
        "session.login",
        Some(&actor.row.id),
        Some(&actor.row),
    );
    if let Some(d) = rec.details.as_mut() {
        d["idle_timeout_seconds"] = idle.as_secs().into();
        d["session"] = sess.public_id.clone().into();
    }
    res.send(Entry::Admin(rec));
    let mut r = json(
        StatusCode::OK,
        serde_json::json!({
            "csrf_token": sess.csrf,
            "idle_timeout_seconds": idle.as_secs(),
            "token": {"id": actor.row.id, "name": actor.row.name, "account": actor.row.account},
            "access": if actor.admin { "admin" } else { "self" },
        }),
    );
    set_cookie(r.headers_mut(), &cookie(conn.tls, &id, false));
    Ok(r)
}

async fn logout(
    gw: &Admin,
    parts: &Parts,
    conn: ConnInfo,
    ctx: &mut ApiCall,
) -> Result<Response<Body>, AdminError> {
    let live = session_actor(gw, &parts.headers, ctx.client_ip).await;
    let (id, sess, actor) = match live {
        Ok(Some(x)) => x,
        Ok(None) | Err(_) => {
            // Nothing to end; clear the cookie anyway.
            let mut r = AdminError::status(
                StatusCode::UNAUTHORIZED,
                "not_signed_in",
                "no_session",
                "Not signed in.",
            )
            .respond(&gw.config().server.realm, &ctx.request_id);
            set_cookie(r.headers_mut(), &cookie(conn.tls, "", true));
            return Ok(r);
        }
    };
    ctx.set_actor(&actor);
    check_csrf(parts, conn.tls, &sess.csrf)?;
    let res = ctx.reserve(gw)?;
    session::remove(gw, &id)
        .await
        .map_err(|_| AdminError::Reject(Reject::StoreUnavailable))?;
    if actor.person.is_some() {
        // A person's sign-out: `session.revoked`, naming them.
        let mut rec = session::event(
            &sess,
            "session.revoked",
            &actor.label(),
            Some(ctx.client_ip.to_string()),
        );
        rec.reason = Some("signed_out".into());
        res.send(Entry::Admin(rec));
    } else {
        res.send(Entry::Admin(ctx.event(
            &actor,
            "session.logout",
            Some(&actor.row.id),
            Some(&actor.row),
        )));
    }
    let mut r = json(StatusCode::OK, serde_json::json!({"signed_out": true}));
    set_cookie(r.headers_mut(), &cookie(conn.tls, "", true));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_flags() {
        assert_eq!(
            cookie(false, "abc", false),
            "tokengate_session=abc; Path=/; HttpOnly; SameSite=Strict"
        );
        let c = cookie(true, "abc", false);
        assert!(
            c.starts_with("__Host-tokengate_session=abc;") && c.ends_with("; Secure"),
            "{c}"
        );
        assert!(cookie(false, "", true).ends_with("Max-Age=0"));
    }

    #[test]
    fn page_has_the_csrf_slot_and_assets_are_local() {
        assert!(INDEX_HTML.contains("name=\"csrf-token\" content=\"{{CSRF}}\""));
        assert!(!INDEX_HTML.contains("http://") && !INDEX_HTML.contains("https://"));
        let (app_js, _) = embedded("/assets/app.js").unwrap();
        assert!(
            !app_js.contains("innerHTML"),
            "data is rendered with textContent only"
        );
        assert_eq!(attr("\"><x"), "&quot;&gt;&lt;x");
    }
}
