//! The gateway's own answers: the endpoints under the reserved prefix and the response headers
//! the gateway adds (request id, `RateLimit-*`, `Token-Expires-At`). Part of the pipeline.
//!
//! Must never import `admin` or `cli`.

use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};

use super::{
    Checked, Ctx, RATELIMIT_LIMIT, RATELIMIT_REMAINING, RATELIMIT_RESET, TOKEN_EXPIRES_AT,
    X_REQUEST_ID,
};
use crate::body::{Body, full};
use crate::clock::rfc3339;
use crate::config::Config;
use crate::error::Reject;
use crate::gateway::Gateway;

impl Gateway {
    /// Endpoints under the reserved prefix.
    pub(super) fn internal(
        &self,
        cfg: &Config,
        method: &Method,
        path: &str,
        ctx: &Ctx,
    ) -> Result<Response<Body>, Reject> {
        let rest = &path[cfg.server.reserved_prefix.len()..];
        match (method, rest) {
            (&Method::GET | &Method::HEAD, "v1/whoami") => {
                let t = ctx.token.as_deref().ok_or(Reject::Internal)?;
                let body = serde_json::json!({
                    "id": t.id(),
                    "name": t.name(),
                    "prefix": t.prefix(),
                    "account": t.account(),
                    "role": t.role(),
                    "permissions": t.permissions(),
                    "scopes": t.scopes(),
                    "allowed_cidrs": t.allowed_cidrs().iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                    "created_at": rfc3339(t.created_at()),
                    "expires_at": t.expires_at().map(rfc3339),
                });
                let mut resp = Response::new(full(body.to_string() + "\n"));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                resp.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                Ok(resp)
            }
            _ => Err(Reject::NotFound),
        }
    }

    /// The public health endpoint (`server.health_path`, under the reserved prefix): GET or HEAD,
    /// no token, never forwarded; 200 `{"status":"ok"}` when ready (the admin `/readyz` checks),
    /// else 503 `{"status":"unavailable"}`. Other methods go on like any reserved path.
    pub(super) async fn health(
        &self,
        cfg: &Config,
        checked: &Checked<'_>,
        ctx: &Ctx,
    ) -> Option<Response<Body>> {
        if !(checked.reserved
            && matches!(ctx.method, Method::GET | Method::HEAD)
            && cfg.server.health_path.as_deref() == Some(checked.canon.path.as_str()))
        {
            return None;
        }
        let ready = self.readiness_shared().await.ready();
        let (status, body) = if ready {
            (StatusCode::OK, "{\"status\":\"ok\"}\n")
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "{\"status\":\"unavailable\"}\n",
            )
        };
        let mut resp = Response::new(full(body));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Some(self.decorate(cfg, resp, ctx))
    }

    /// Adds the gateway's response headers.
    pub(super) fn decorate(
        &self,
        cfg: &Config,
        mut resp: Response<Body>,
        ctx: &Ctx,
    ) -> Response<Body> {
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
            h.insert(X_REQUEST_ID, v);
        }
        if let Some(a) = ctx.ratelimit {
            h.insert(RATELIMIT_LIMIT, HeaderValue::from(a.limit));
            h.insert(RATELIMIT_REMAINING, HeaderValue::from(a.remaining));
            h.insert(RATELIMIT_RESET, HeaderValue::from(a.reset_secs));
        }
        if let Some(exp) = ctx.token.as_ref().and_then(|t| t.expires_at()) {
            let warn_ms = cfg.tokens.expiry_warning_days as i64 * 86_400_000;
            if exp - self.now_ms() <= warn_ms {
                if let Ok(v) = HeaderValue::from_str(&rfc3339(exp)) {
                    h.insert(TOKEN_EXPIRES_AT, v);
                }
            }
        }
        resp
    }
}
