//! Admin listener (SPEC §8): operations endpoints (`/healthz`, `/readyz`, `/metrics`).
//!
//! Loopback by default (`admin.listen`). The JSON API and web UI live in sub-modules.

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::{Body, full};
use crate::gateway::{ConnInfo, Gateway};

/// Routes one admin request.
pub async fn handle(gw: &Gateway, req: Request<Incoming>, _conn: ConnInfo) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => readyz(gw).await,
        (&Method::GET, "/metrics") => metrics(gw).await,
        _ => json(StatusCode::NOT_FOUND, serde_json::json!({"error": "not_found", "message": "Not found."})),
    }
}

async fn readyz(gw: &Gateway) -> Response<Body> {
    let store = gw.store_call(|s| s.ping()).await;
    let audit_ok = gw.audit().is_healthy();
    match (store, audit_ok) {
        (Ok(()), true) => text(StatusCode::OK, "ready\n"),
        (Err(e), _) => {
            tracing::warn!(error = %e, "readiness: store unreadable");
            text(StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
        }
        (_, false) => text(StatusCode::SERVICE_UNAVAILABLE, "audit log not writable\n"),
    }
}

async fn metrics(gw: &Gateway) -> Response<Body> {
    let mut snap = gw.snapshot();
    let now = gw.now_ms();
    if let Ok((active, expiring)) = gw.store_call(move |s| s.count_active(now, now + 7 * 86_400_000)).await {
        snap.active_tokens = active;
        snap.expiring_7d = expiring;
    }
    let body = gw.metrics().render(&snap);
    let mut r = Response::new(full(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

fn text(status: StatusCode, s: &'static str) -> Response<Body> {
    let mut r = Response::new(full(s));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// A JSON response.
pub fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string() + "\n"));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
