//! The shared HTTP/2 connection of an upstream whose route sets `http2 = true` and that picked
//! `h2` through ALPN: one connection per upstream (per [`Host`]), its sender cloned for every
//! request, opened once however many first requests wait for it, and dropped when it closes or
//! stays unused for the idle timeout.
//!
//! Must never import `config`, `gateway`, `pipeline` or `proxy`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme, Uri};
use http::{Request, Response, Version};
use hyper::client::conn::http1::SendRequest;
use hyper::client::conn::http2;
use tokio::time::Instant;

use super::{Conn, Host, Pool, PoolError, PooledBody, lock, origin_form};
use crate::body::Body;

/// The shared HTTP/2 sender and when a request last took it.
pub(super) struct H2Idle {
    tx: http2::SendRequest<Body>,
    since: Instant,
}

/// Where an HTTP/2-capable request goes.
enum H2Route {
    /// On the shared HTTP/2 connection.
    H2(http2::SendRequest<Body>),
    /// On this new HTTP/1.1 connection (the upstream declined `h2`).
    Fresh(SendRequest<Body>),
    /// Through the HTTP/1.1 pool.
    H1,
}

impl Host {
    /// Whether requests (other than upgrades) should try HTTP/2 first.
    pub(super) fn wants_h2(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.http2()) && !self.h2_refused.load(Ordering::Relaxed)
    }

    /// A clone of the shared HTTP/2 sender, unless there is none, it closed or it expired.
    fn h2_checkout(
        &self,
        now: Instant,
        idle_timeout: Duration,
    ) -> Option<http2::SendRequest<Body>> {
        let mut slot = lock(&self.h2);
        drop_expired(&mut slot, now, idle_timeout);
        slot.as_mut().map(|c| {
            c.since = now;
            c.tx.clone()
        })
    }

    /// Drops the shared sender when it closed or expired; when it expires otherwise.
    pub(super) fn prune_h2(&self, now: Instant, idle_timeout: Duration) -> Option<Instant> {
        let mut slot = lock(&self.h2);
        drop_expired(&mut slot, now, idle_timeout);
        slot.as_ref().map(|c| c.since + idle_timeout)
    }
}

fn drop_expired(slot: &mut Option<H2Idle>, now: Instant, idle_timeout: Duration) {
    if slot
        .as_ref()
        .is_some_and(|c| c.tx.is_closed() || now.saturating_duration_since(c.since) >= idle_timeout)
    {
        *slot = None;
    }
}

impl Pool {
    /// Sends `req` over HTTP/2 when the upstream speaks it (or on the HTTP/1.1 connection that
    /// learnt it does not); `Err(req)` hands the request back for the HTTP/1.1 pool.
    pub(super) async fn try_h2(
        &self,
        host: &Arc<Host>,
        mut req: Request<Body>,
    ) -> Result<Result<Response<PooledBody>, Request<Body>>, PoolError> {
        // At most twice: a shared connection that closed before taking the request hands it back
        // unsent, and it goes on a new one once.
        for _ in 0..2 {
            if !host.wants_h2() {
                break;
            }
            let mut tx = match self.h2_route(host).await? {
                H2Route::H2(tx) => tx,
                H2Route::Fresh(mut tx) => {
                    let resp = tx.send_request(req).await.map_err(PoolError::Request)?;
                    return Ok(Ok(self.lease(resp, tx, host.clone(), false)));
                }
                H2Route::H1 => break,
            };
            match tx.try_send_request(h2_form(req, host)).await {
                Ok(resp) => {
                    // The shared connection is not leased: the body needs no return.
                    let mut resp = resp.map(|inner| PooledBody { inner, lease: None });
                    *resp.version_mut() = Version::HTTP_11;
                    return Ok(Ok(resp));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => {
                        tracing::debug!(error = %e.error(), upstream = %host.authority, "shared HTTP/2 connection closed; retrying on a new one");
                        self.shared.retried.fetch_add(1, Ordering::Relaxed);
                        *lock(&host.h2) = None;
                        req = h1_form(unsent);
                    }
                    None => return Err(PoolError::Request(e.into_error())),
                },
            }
        }
        Ok(Err(req))
    }

    /// The shared HTTP/2 connection, opened (once, however many requests wait) when there is
    /// none; or, when the upstream declines `h2`, the HTTP/1.1 connection that offer opened.
    async fn h2_route(&self, host: &Arc<Host>) -> Result<H2Route, PoolError> {
        let idle_timeout = self.shared.settings.idle_timeout;
        if let Some(tx) = host.h2_checkout(self.now(), idle_timeout) {
            return Ok(H2Route::H2(tx));
        }
        let _opening = host.h2_connecting.lock().await;
        if let Some(tx) = host.h2_checkout(self.now(), idle_timeout) {
            return Ok(H2Route::H2(tx));
        }
        if !host.wants_h2() {
            return Ok(H2Route::H1);
        }
        match self.connect(host, true).await? {
            Conn::H2(tx) => {
                *lock(&host.h2) = Some(H2Idle {
                    tx: tx.clone(),
                    since: self.now(),
                });
                self.shared.ensure_reaper();
                Ok(H2Route::H2(tx))
            }
            Conn::H1(tx) => {
                tracing::debug!(upstream = %host.authority, "upstream declined h2 through ALPN: HTTP/1.1");
                host.h2_refused.store(true, Ordering::Relaxed);
                Ok(H2Route::Fresh(tx))
            }
        }
    }
}

/// The HTTP/2 form of an origin-form request: `https://{Host}{path}` (`:authority` from the `Host`
/// header, which HTTP/2 does not send besides it), version 2.
fn h2_form(req: Request<Body>, host: &Host) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    let authority = parts
        .headers
        .remove(header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .unwrap_or_else(|| host.authority.clone());
    let mut uri = parts.uri.into_parts();
    uri.scheme = Some(Scheme::HTTPS);
    uri.authority = Some(authority);
    parts.uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = Version::HTTP_2;
    Request::from_parts(parts, body)
}

/// Back from [`h2_form`] (a request the HTTP/2 connection handed back unsent).
fn h1_form(req: Request<Body>) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    if let Some(a) = parts.uri.authority() {
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            parts.headers.insert(header::HOST, v);
        }
    }
    parts.uri = origin_form(parts.uri);
    parts.version = Version::HTTP_11;
    Request::from_parts(parts, body)
}
