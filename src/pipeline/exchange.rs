//! The pipeline's entry for the HTTP/1 fast path (`src/h1/`): the same phases as
//! [`Gateway::handle`], cut where the fast path does its own I/O. [`Exchange::decide`] runs
//! steps 1–8 (the same `decide` hyper's path runs), builds the upstream head with the same
//! header rewrite (`proxy::upstream_headers`) and writes the write-ahead decision line;
//! [`Exchange::answer`] cleans and decorates the upstream's response head exactly like
//! `proxy::downstream_response` + `decorate`, and hands back the completion line to write when
//! the body ends; [`Exchange::fail`] is `conclude` for a refusal.
//!
//! Must never import `admin`, `cli` or `h1` (the fast path calls in, never the other way).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{HeaderMap, Method, Request, Response, StatusCode};

use super::completion::CompletionSlot;
use super::{AuditGuard, Decided};
use crate::body::Body;
use crate::config::Config;
use crate::error::Reject;
use crate::gateway::{ConnInfo, Gateway};
use crate::hygiene;
use crate::metrics::InFlight;
use crate::proxy;

/// One request on the fast path, from its head to its audit line(s). Dropped before it
/// concluded (connection cut, drain deadline), it writes the abandoned request's line like
/// hyper's path does.
pub(crate) struct Exchange<'g> {
    guard: AuditGuard<'g>,
    cfg: Arc<Config>,
    _in_flight: InFlight<'g>,
}

/// What the upstream is to receive: the rewritten request head, and where to send it.
pub(crate) struct Outbound {
    /// Method.
    pub(crate) method: Method,
    /// Origin-form target: the canonical path and the untouched query.
    pub(crate) target: String,
    /// The headers after the shared rewrite (no framing headers).
    pub(crate) headers: HeaderMap,
    /// The route's upstream.
    pub(crate) authority: Authority,
    /// The route's upstream timeout (response head, from the end of the request body).
    pub(crate) timeout: Duration,
    /// The route's name (upstream latency metric).
    pub(crate) route: String,
}

impl Gateway {
    /// Starts a fast-path exchange for a request whose head is `req`, under `cfg` (the config
    /// loaded when its head was read).
    pub(crate) fn exchange<B>(
        &self,
        cfg: Arc<Config>,
        req: &Request<B>,
        conn: ConnInfo,
    ) -> Exchange<'_> {
        let start = Instant::now();
        let in_flight = self.inner.metrics.in_flight();
        let ctx = self.new_ctx(req, conn);
        Exchange {
            guard: AuditGuard {
                gw: self,
                ctx,
                start,
                armed: true,
            },
            cfg,
            _in_flight: in_flight,
        }
    }
}

impl Exchange<'_> {
    /// Steps 1–8, then the upstream head and the write-ahead line. `Err` is the concluded
    /// answer (refusal, or the gateway's own answer): write it, the request is over.
    pub(crate) async fn decide(
        &mut self,
        conn: ConnInfo,
        req: Request<()>,
    ) -> Result<Outbound, Response<Body>> {
        let gw = self.guard.gw;
        let cfg = self.cfg.clone();
        let start = self.guard.start;
        let decided = gw.decide(&cfg, conn, &req, &mut self.guard.ctx).await;
        let (canon, route, facts) = match decided {
            Ok(Decided::Answered(resp)) => return Err(self.conclude(Ok(resp)).0),
            Err(e) => return Err(self.fail(e)),
            Ok(Decided::Forward {
                canon,
                route,
                facts,
            }) => (canon, route, facts),
        };
        let (parts, ()) = req.into_parts();
        let ctx = &mut self.guard.ctx;
        let info = super::forward_info(&cfg, conn, ctx, &canon.path, parts.uri.query(), &facts);
        let target = proxy::path_and_query(&info);
        let headers = proxy::upstream_headers(parts.headers, route, &info);
        let out = Outbound {
            method: parts.method,
            target,
            headers,
            authority: route.upstream.clone(),
            timeout: route.timeout,
            route: route.name.clone(),
        };
        if let Err(e) = gw.write_ahead(&mut self.guard.ctx, start).await {
            return Err(self.fail(e));
        }
        Ok(out)
    }

    /// The upstream answered its head after `elapsed` (the route's latency histogram).
    pub(crate) fn upstream_answered(&self, route: &str, elapsed: Duration) {
        self.guard.gw.inner.metrics.upstream(route, elapsed);
    }

    /// The refusal's answer, metrics and audit line (`conclude`).
    pub(crate) fn fail(&mut self, reject: Reject) -> Response<Body> {
        self.conclude(Err(reject)).0
    }

    /// The upstream's response head, cleaned (hop-by-hop headers out) and decorated (request id,
    /// `RateLimit-*`, `Token-Expires-At`) as on hyper's path; metrics and the completion line to
    /// write once the body has been sent.
    pub(crate) fn answer(
        &mut self,
        status: StatusCode,
        mut headers: HeaderMap,
    ) -> (Response<Body>, CompletionSlot) {
        hygiene::strip_hop_by_hop(&mut headers);
        let mut resp = Response::new(crate::body::empty());
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        let resp = self.guard.gw.decorate(&self.cfg, resp, &self.guard.ctx);
        let (resp, pending) = self.conclude(Ok(resp));
        (resp, CompletionSlot::new(pending))
    }

    fn conclude(
        &mut self,
        result: Result<Response<Body>, Reject>,
    ) -> (Response<Body>, Option<super::completion::Pending>) {
        self.guard.armed = false;
        let gw = self.guard.gw;
        gw.conclude_pending(&self.cfg, &mut self.guard.ctx, self.guard.start, result)
    }
}
