//! The request pipeline of the public listener (SPEC §1), read top to bottom, one function per
//! phase: canonicalise → authenticate (with the per-address failed-auth limiter) → authorise →
//! rate-limit → reserve the audit slot → forward → conclude (response, metrics, audit line).
//!
//! Owns: [`Gateway::handle`], [`Gateway::evaluate`], the per-request context, the audit line of a
//! request (also of an abandoned one, [`AuditGuard`]), the gateway's own endpoints under the
//! reserved prefix, the response headers it adds, [`client_ip`], and the Bearer authentication
//! the admin listener shares ([`Gateway::authenticate_bearer`]).
//!
//! Each phase returns `Result<_, Reject>`; the audit reservation, once taken, is carried in the
//! context, so a refusal after step 8 still writes its line into the reserved slot. Outcomes are
//! classified by `Reject` variant (`is_auth_failure`, `counts_as_allowed`), never by reason text.
//!
//! Must never import `admin` or `cli`. The state it runs on lives in `gateway`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::header::{self, HeaderName};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::audit::{CompletionRecord, Entry, RequestRecord, Reservation};
use crate::auth;
use crate::authz::{self, Lookup, ShadowRoles, Subject};
use crate::body::{Body, BodyOutcome};
use crate::cache::CachedToken;
use crate::config::{Config, Rate, RoleConfig, RouteConfig};
use crate::error::{Reject, respond};
use crate::forwarded::{client_ip, trusted_request_id};
use crate::gateway::{ConnInfo, Gateway};
use crate::hygiene::{self, Limits};
use crate::path;
use crate::proxy::{self, ForwardInfo};
use crate::ratelimit::Allowance;
use crate::token::TokenHash;

mod answer;
pub(crate) mod completion;
pub(crate) mod exchange;
mod guard;
use guard::AuditGuard;
mod record;
use record::{Strings, record_of};
mod transport;
use completion::send_completion;

/// Per-request facts collected for the audit line.
struct Ctx {
    request_id: String,
    client_ip: IpAddr,
    method: Method,
    path: String,
    user_agent: Option<String>,
    token_prefix: Option<String>,
    token: Option<Arc<CachedToken>>,
    public: bool,
    permission: Option<String>,
    rule: Option<String>,
    shadow_decision: Option<&'static str>,
    upstream: Option<String>,
    /// The route the path belongs to, once step 1 found it (the metrics' `route` label).
    route: Option<Arc<str>>,
    trace_id: Option<String>,
    ratelimit: Option<Allowance>,
    /// The audit slot, once step 8 reserved it: the request's line goes there, whatever follows.
    /// After the decision line of a forwarded request is written, the completion's slot.
    reservation: Option<Reservation>,
    /// A forward-auth decision (docs/forward-auth.md): the audit line says `"mode":"forward_auth"`.
    forward_auth: bool,
    /// The decision line was written ahead of forwarding: what follows is a completion line.
    decided: bool,
    /// The matched rule needs a person's approval: the rule and the parameters it captured.
    gate: Option<(Arc<crate::config::NamedRule>, String)>,
}

impl Ctx {
    /// A context with nothing known yet but the client and the method (allocates nothing).
    fn empty(client_ip: IpAddr, method: Method) -> Ctx {
        Ctx {
            request_id: String::new(),
            client_ip,
            method,
            path: String::new(),
            user_agent: None,
            token_prefix: None,
            token: None,
            public: false,
            permission: None,
            rule: None,
            shadow_decision: None,
            upstream: None,
            route: None,
            trace_id: None,
            ratelimit: None,
            reservation: None,
            forward_auth: false,
            decided: false,
            gate: None,
        }
    }
}

// Response header names, parsed once (inserting by `&str` parses the name on every call).
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
const TOKEN_EXPIRES_AT: HeaderName = HeaderName::from_static("token-expires-at");

/// What steps 1–8 decided for a request that may go on.
enum Decided<'c> {
    /// Answered by the gateway itself: its own endpoints under the reserved prefix.
    Answered(Response<Body>),
    /// Allowed, to be forwarded to `route` (`ctx.upstream` is set).
    Forward {
        canon: path::CanonicalPath,
        route: &'c RouteConfig,
        facts: hygiene::RequestFacts,
    },
}

/// Step 1's result: the checked request, its canonical path, and the route and rules it meets.
struct Checked<'c> {
    facts: hygiene::RequestFacts,
    canon: path::CanonicalPath,
    reserved: bool,
    route: Option<&'c RouteConfig>,
    lookup: Option<Lookup<'c>>,
}

/// The config's roles as `authz::decide` asks for them (authz never reads the config).
struct Roles<'c>(&'c BTreeMap<String, RoleConfig>);

impl ShadowRoles for Roles<'_> {
    fn shadow_permissions(&self, role: &str) -> Option<&[String]> {
        self.0
            .get(role)
            .filter(|r| r.shadow)
            .map(|r| r.permissions.as_slice())
    }
}

impl Gateway {
    /// Handles one request on the public listener. Always answers; never panics on input.
    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let start = Instant::now();
        let _in_flight = self.inner.metrics.in_flight();
        let cfg = self.inner.config.load_full();
        let mut ctx = self.new_ctx(&req, conn);
        let forward_auth = crate::forward_auth::endpoint(&cfg, req.uri().path());
        ctx.forward_auth = forward_auth.is_some();
        // If this future is dropped before it answers (client gone, drain deadline), the guard
        // still writes the request's audit line: one line per request that reached the HTTP layer.
        let mut guard = AuditGuard {
            gw: self,
            ctx,
            start,
            armed: true,
        };
        let ctx = &mut guard.ctx;
        let work = async {
            match forward_auth {
                Some(endpoint) => self.forward_auth(&cfg, conn, &req, endpoint, ctx).await,
                None => self.pipeline(&cfg, conn, req, ctx, start).await,
            }
        };
        let result = match tokio::time::timeout(cfg.server.request_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(Reject::RequestTimeout),
        };
        guard.armed = false;
        self.conclude(&cfg, &mut guard.ctx, start, result)
    }

    /// Steps 1–8 and the audit line for one request, without forwarding it: the gateway's own
    /// cost of a request, for the in-process benchmark (`benches/hot_paths.rs`, `pipeline`).
    /// Runs the same code as [`handle`](Self::handle) up to the upstream call; an allowed
    /// request gets an empty 200 carrying the headers the gateway adds, a refused one its
    /// real refusal. Never touches the request body.
    pub async fn evaluate<B>(&self, req: &Request<B>, conn: ConnInfo) -> Response<Body> {
        let start = Instant::now();
        let cfg = self.inner.config.load_full();
        let mut ctx = self.new_ctx(req, conn);
        let result = match self.decide(&cfg, conn, req, &mut ctx).await {
            Ok(Decided::Answered(resp)) => Ok(resp),
            Ok(Decided::Forward { .. }) => {
                Ok(self.decorate(&cfg, Response::new(crate::body::empty()), &ctx))
            }
            Err(e) => Err(e),
        };
        self.conclude(&cfg, &mut ctx, start, result)
    }

    fn new_ctx<B>(&self, req: &Request<B>, conn: ConnInfo) -> Ctx {
        Ctx {
            request_id: self.next_request_id(),
            user_agent: req
                .headers()
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(|s| {
                    // `to_str` succeeded: visible ASCII, so bytes are chars.
                    if s.len() <= 256 {
                        s.to_owned()
                    } else {
                        s.chars().take(256).collect()
                    }
                }),
            trace_id: hygiene::trace_id(req.headers()).map(str::to_owned),
            ..Ctx::empty(conn.peer.ip(), req.method().clone())
        }
    }

    /// Steps 1–9 for one request.
    async fn pipeline(
        &self,
        cfg: &Config,
        conn: ConnInfo,
        req: Request<Incoming>,
        ctx: &mut Ctx,
        start: Instant,
    ) -> Result<Response<Body>, Reject> {
        match self.decide(cfg, conn, &req, ctx).await? {
            Decided::Answered(resp) => Ok(resp),
            Decided::Forward {
                canon,
                route,
                facts,
            } => {
                self.forward(cfg, conn, req, ctx, start, canon, route, facts)
                    .await
            }
        }
    }

    /// Forward-auth mode: steps 1–8 on the request a trusted front proxy describes, answered
    /// 200 with the identity headers (allowed) or with the refusal proxy mode would send.
    async fn forward_auth<B>(
        &self,
        cfg: &Config,
        conn: ConnInfo,
        req: &Request<B>,
        endpoint: &str,
        ctx: &mut Ctx,
    ) -> Result<Response<Body>, Reject> {
        let trusted = &cfg.server.trusted_proxies;
        let described = crate::forward_auth::describe(req, endpoint, conn.peer.ip(), trusted)
            .inspect_err(|_| ctx.path = sanitize_raw_path(req.uri().path()))?;
        ctx.method = described.method().clone();
        match self.decide(cfg, conn, &described, ctx).await? {
            // Nothing is reserved in forward-auth mode (`check`): unreachable, refused if not.
            Decided::Answered(_) => Err(Reject::Internal),
            Decided::Forward { .. } => {
                let resp = crate::forward_auth::allowed(ctx.token.as_deref());
                Ok(self.decorate(cfg, resp, ctx))
            }
        }
    }

    /// Steps 1–8: everything the gateway decides before the upstream sees the request, ending
    /// with the audit slot reserved; the reserved prefix is answered here, a path no route
    /// serves refused (403 no_rule). Generic over the body, which it never reads.
    async fn decide<'c, B>(
        &self,
        cfg: &'c Config,
        conn: ConnInfo,
        req: &Request<B>,
        ctx: &mut Ctx,
    ) -> Result<Decided<'c>, Reject> {
        let checked = self.check(cfg, conn, req, ctx)?;
        if let Some(resp) = self.health(cfg, &checked, ctx).await {
            return Ok(Decided::Answered(resp));
        }
        if !ctx.public {
            transport::check_transport(cfg, conn, req, ctx)?;
            let token = self
                .authenticate(req.headers(), req.uri().query(), ctx.client_ip, ctx)
                .await?;
            ctx.token = Some(token);
        }
        if !checked.reserved {
            self.authorise(cfg, checked.lookup.as_ref(), ctx)?;
        }
        self.rate_limit(cfg, ctx).await?;
        if let (Some(g), Some(t)) = (&ctx.gate, &ctx.token) {
            self.approval_gate(g, t, ctx.client_ip, &ctx.request_id)
                .await?;
        }
        self.reserve(ctx)?;
        self.route(cfg, checked, ctx)
    }

    /// Step 1: canonicalise and check the request; find its route and the rule that applies.
    fn check<'c, B>(
        &self,
        cfg: &'c Config,
        conn: ConnInfo,
        req: &Request<B>,
        ctx: &mut Ctx,
    ) -> Result<Checked<'c>, Reject> {
        let limits = Limits {
            max_uri_bytes: cfg.server.max_uri_bytes,
            max_header_bytes: cfg.server.max_header_bytes,
            max_body_bytes: cfg.server.max_body_bytes,
        };
        if let Some(id) =
            trusted_request_id(conn.peer.ip(), req.headers(), &cfg.server.trusted_proxies)
        {
            ctx.request_id = id;
        }
        // Until the path is canonical, the audit line gets a sanitised copy of the raw one.
        let facts = hygiene::check(req, &cfg.server.methods, limits).inspect_err(|_| {
            ctx.path = sanitize_raw_path(req.uri().path());
        })?;
        ctx.client_ip = client_ip(conn.peer.ip(), req.headers(), &cfg.server.trusted_proxies);
        let any_non_ascii = cfg.routes.iter().any(|r| r.allow_non_ascii);
        let canon = path::canonicalise(req.uri().path(), any_non_ascii).map_err(|e| {
            ctx.path = sanitize_raw_path(req.uri().path());
            Reject::BadRequest {
                reason: "bad_path",
                message: format!("Invalid request path: {e}."),
            }
        })?;
        ctx.path = canon.path.clone();
        // A described request goes to the front proxy's upstream, never to us: the reserved
        // prefix is an ordinary path there.
        let reserved = !ctx.forward_auth && canon.path.starts_with(&cfg.server.reserved_prefix);
        let route = if reserved {
            None
        } else {
            cfg.route_for(&canon.path)
        };
        ctx.route = route.map(|r| r.label.clone());
        if canon.has_non_ascii && !route.is_some_and(|r| r.allow_non_ascii) {
            return Err(Reject::BadRequest {
                reason: "bad_path",
                message: "Non-ASCII paths are not accepted on this route.".into(),
            });
        }
        if facts.websocket && !route.is_some_and(|r| r.websocket) {
            return Err(Reject::UpgradeRefused);
        }
        let host_name = facts
            .host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .map(hygiene::host_name);
        if let Some(r) = route {
            check_route_host(r, host_name.as_deref())?;
        }
        // Rules are matched on the path as the route's backend will read it (case, trailing /).
        let tables = route.map(|r| (r, r.rules_for(host_name.as_deref())));
        let lookup = tables
            .map(|(r, (table, _))| table.lookup(ctx.method.as_str(), &r.match_path(&canon.path)));
        let enforced = lookup.as_ref().and_then(|l| l.enforced.as_ref());
        if let (Some((_, (_, ids))), Some(m)) = (tables, enforced) {
            ctx.rule = Some(ids[m.index].clone());
            ctx.permission = m.rule.permission.clone();
            ctx.gate = crate::approval::gate_of(cfg, &ids[m.index], &m.captures);
        }
        ctx.public = enforced.is_some_and(|m| m.rule.public);
        Ok(Checked {
            facts,
            canon,
            reserved,
            route,
            lookup,
        })
    }

    /// Steps 2–5: the per-address failed-auth limiter, extraction, format and checksum, lookup,
    /// and the judgement (revoked, expired, account disabled, IP allowlist). Shared by the public
    /// pipeline and the admin listener's Bearer authentication.
    ///
    /// An address over its failed-auth quota is not refused outright: its credential is still
    /// parsed (no store involved) and a cached token is served as usual, so a valid token is
    /// never refused because others failed from the same address. A cache miss goes to the store
    /// only while the address is within its unknown-token lookup quota (lookups that found no
    /// token, counted per address), so a flood of unknown tokens stops costing store lookups at
    /// that quota. A blocked address's failing credential is answered 429, never 401.
    async fn authenticate(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        client_ip: IpAddr,
        ctx: &mut Ctx,
    ) -> Result<Arc<CachedToken>, Reject> {
        let blocked = self.inner.failed_auth.load().blocked(client_ip);
        let result = self.credential(headers, query, client_ip, ctx).await;
        match (result, blocked) {
            (Ok(entry), _) => Ok(entry),
            // Refused without a lookup (the lookup quota), or failed while blocked: 429.
            (Err(Reject::ClientBlocked { retry_after }), b) => Err(Reject::ClientBlocked {
                retry_after: b.map_or(retry_after, |w| w.max(retry_after)),
            }),
            (Err(e), Some(wait)) if e.is_auth_failure() => {
                Err(Reject::ClientBlocked { retry_after: wait })
            }
            (Err(e), _) => Err(e),
        }
    }

    /// Steps 3–5 proper: extract, parse, look up, judge.
    async fn credential(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        client_ip: IpAddr,
        ctx: &mut Ctx,
    ) -> Result<Arc<CachedToken>, Reject> {
        let credential = auth::extract(headers, query)?;
        let parsed = auth::parse(credential)?;
        ctx.token_prefix = Some(parsed.display_prefix().to_string());
        let entry = self.lookup(parsed.hash(), client_ip).await?;
        ctx.token = Some(entry.clone());
        auth::judge(&entry, self.now_ms(), client_ip)?;
        Ok(entry)
    }

    /// Authenticates a Bearer token for the admin listener with the public pipeline's steps 2–5
    /// (see `authenticate`). Failures count towards the limiter exactly as on the public side; a
    /// success records last use.
    pub async fn authenticate_bearer(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        client_ip: IpAddr,
    ) -> Result<Arc<CachedToken>, Reject> {
        let mut ctx = Ctx::empty(client_ip, Method::GET);
        let result = self.authenticate(headers, query, client_ip, &mut ctx).await;
        match &result {
            Ok(entry) => self.note_use(entry, client_ip).await,
            Err(e) if e.is_auth_failure() => {
                self.inner.failed_auth.load().record_failure(client_ip)
            }
            Err(_) => {}
        }
        result
    }

    /// Cache, then store. A fill that raced an invalidation is retried, never kept. A cache
    /// miss from an address over its unknown-token lookup quota is refused without a lookup; a
    /// lookup that finds no token counts towards that quota.
    async fn lookup(&self, hash: TokenHash, client_ip: IpAddr) -> Result<Arc<CachedToken>, Reject> {
        if let Some(e) = self.inner.cache.get(&hash) {
            return Ok(e);
        }
        if let Some(wait) = self.inner.unknown_lookups.load().blocked(client_ip) {
            return Err(Reject::ClientBlocked { retry_after: wait });
        }
        for _ in 0..8 {
            let epoch = self.inner.cache.epoch();
            let row = self
                .store_call(move |s| s.lookup_hash(&hash))
                .await
                .map_err(|e| {
                    // A lost store file is logged once by the change poller, not per request.
                    if !matches!(e, crate::store::StoreError::FileLost { .. }) {
                        crate::coalesced!(error, "store_lookup_failed", error = %e, "token lookup failed: answering 503");
                    }
                    Reject::StoreUnavailable
                })?;
            let Some(row) = row else {
                self.inner.unknown_lookups.load().record_failure(client_ip);
                return Err(Reject::InvalidToken {
                    reason: "unknown_token",
                });
            };
            let entry = self.inner.cache.entry(&hash, row);
            if !self.inner.cache.is_trusted() {
                // Changes may be going unannounced: use this fresh read once, cache nothing.
                return Ok(entry);
            }
            if self.inner.cache.fill(hash, entry.clone(), epoch) {
                return Ok(entry);
            }
        }
        Err(Reject::StoreUnavailable)
    }

    /// Step 6: the decision (`authz::decide`), and the shadow verdict that is logged but never
    /// enforced.
    fn authorise(
        &self,
        cfg: &Config,
        lookup: Option<&Lookup<'_>>,
        ctx: &mut Ctx,
    ) -> Result<(), Reject> {
        let subject = ctx.token.as_deref().map(|t| Subject {
            permissions: t.permissions(),
            scopes: t.scopes(),
            role: t.role(),
        });
        let decision = authz::decide(lookup, subject, &Roles(&cfg.roles));
        ctx.shadow_decision = decision.shadow.map(authz::Shadow::as_str);
        decision.verdict.map_err(|d| Reject::Forbidden {
            reason: d.reason(),
            permission: d.permission().map(str::to_string),
        })
    }

    /// Step 7: the per-token rate limit; an allowed request records the token's use.
    async fn rate_limit(&self, cfg: &Config, ctx: &mut Ctx) -> Result<(), Reject> {
        let Some(t) = &ctx.token else {
            return Ok(());
        };
        let rate = token_rate(cfg, t);
        // Redis only when configured: the in-process path stays a plain function call.
        let redis = self.inner.redis_limiter.load_full();
        let checked = match redis {
            Some(r) => r.check(t.id(), rate).await,
            None => self.inner.limiter.check(t.id(), rate),
        };
        match checked {
            Ok(a) => ctx.ratelimit = Some(a),
            Err(d) => {
                return Err(Reject::RateLimited {
                    retry_after: d.retry_after,
                    limit: d.limit,
                });
            }
        }
        self.note_use(t, ctx.client_ip).await;
        Ok(())
    }

    /// Step 8: the audit writer must accept the record before anything is forwarded.
    fn reserve(&self, ctx: &mut Ctx) -> Result<(), Reject> {
        let reservation = self
            .inner
            .audit
            .reserve()
            .map_err(|_| Reject::AuditUnavailable)?;
        ctx.reservation = Some(reservation);
        Ok(())
    }

    /// After step 8: answer the reserved prefix, refuse a path no route serves, or forward.
    fn route<'c>(
        &self,
        cfg: &'c Config,
        checked: Checked<'c>,
        ctx: &mut Ctx,
    ) -> Result<Decided<'c>, Reject> {
        if checked.reserved {
            let resp = self.internal(cfg, &ctx.method, &checked.canon.path, ctx)?;
            return Ok(Decided::Answered(self.decorate(cfg, resp, ctx)));
        }
        let Some(route) = checked.route else {
            return Err(Reject::Forbidden {
                reason: "no_rule",
                permission: None,
            });
        };
        ctx.upstream = Some(route.name.clone());
        Ok(Decided::Forward {
            canon: checked.canon,
            route,
            facts: checked.facts,
        })
    }

    /// Step 9: forward to the upstream and stream its answer back.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        cfg: &Config,
        conn: ConnInfo,
        mut req: Request<Incoming>,
        ctx: &mut Ctx,
        start: Instant,
        canon: path::CanonicalPath,
        route: &RouteConfig,
        facts: hygiene::RequestFacts,
    ) -> Result<Response<Body>, Reject> {
        let client_upgrade = facts.websocket.then(|| hyper::upgrade::on(&mut req));
        let query = req.uri().query().map(str::to_string);
        let (parts, body) = req.into_parts();
        let outcome = BodyOutcome::default();
        let info = forward_info(cfg, conn, ctx, &canon.path, query.as_deref(), &facts);
        let up_req = proxy::upstream_request(parts, body, route, &info, outcome.clone());
        self.write_ahead(ctx, start).await?;
        let up_start = Instant::now();
        // The upstream's time to answer counts from the end of the request body: a slow but
        // steady upload is bounded by the body idle guard (and `request_timeout`), not by this.
        let head_deadline = async {
            outcome.finished().await;
            tokio::time::sleep(route.timeout).await
        };
        let result = tokio::select! {
            r = self
                .inner
                .client
                .request_via(up_req, route.upstream_tls.as_ref()) => Ok(r),
            _ = head_deadline => Err(()),
        };
        self.inner.metrics.upstream(&route.name, up_start.elapsed());
        match result {
            Err(_) => Err(Reject::UpstreamTimeout),
            Ok(Err(e)) => {
                if outcome.too_large() {
                    Err(Reject::BodyTooLarge)
                } else if outcome.idle() {
                    Err(Reject::BodyIdle)
                } else if let Some(why) = e.tls_failure() {
                    // Never retried without TLS or verification: the client gets a 502.
                    crate::coalesced!(warn, "upstream_tls_failed", request_id = %ctx.request_id, route = %route.name, upstream = %route.upstream_url, reason = %why, "upstream TLS failed: answering 502");
                    Err(Reject::UpstreamTls)
                } else {
                    tracing::debug!(error = %e, upstream = %route.upstream_url, "upstream request failed");
                    Err(Reject::UpstreamError)
                }
            }
            Ok(Ok(mut resp)) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client) = client_upgrade {
                        proxy::splice_upgrade(client, hyper::upgrade::on(&mut resp));
                    }
                }
                let resp = proxy::downstream_response(resp, cfg.server.body_idle_timeout);
                Ok(self.decorate(cfg, resp, ctx))
            }
        }
    }

    /// After the pipeline: the refusal's response, metrics, and the audit line (into the
    /// reserved slot when step 8 took one).
    fn conclude(
        &self,
        cfg: &Config,
        ctx: &mut Ctx,
        start: Instant,
        result: Result<Response<Body>, Reject>,
    ) -> Response<Body> {
        match self.conclude_pending(cfg, ctx, start, result) {
            (response, None) => response,
            // Forwarded and answered: the completion is written when the body ends.
            (response, Some(pending)) => completion::completing(response, pending),
        }
    }

    /// [`conclude`](Self::conclude), handing back the completion still to write instead of
    /// wrapping the body (the HTTP/1 fast path streams the body itself).
    fn conclude_pending(
        &self,
        cfg: &Config,
        ctx: &mut Ctx,
        start: Instant,
        result: Result<Response<Body>, Reject>,
    ) -> (Response<Body>, Option<completion::Pending>) {
        let (reason, allowed, response) = match result {
            Ok(resp) => ("ok", true, resp),
            Err(reject) => {
                if reject.is_auth_failure() {
                    self.inner.failed_auth.load().record_failure(ctx.client_ip);
                }
                if reject.is_ours() {
                    crate::coalesced!(warn, "request_failed_ours", request_id = %ctx.request_id, reason = reject.reason(), "request failed on our side");
                }
                let mut resp = respond(&reject, &cfg.server.realm, &ctx.request_id);
                if ctx.forward_auth {
                    crate::forward_auth::error_header(&mut resp, &reject, &ctx.request_id);
                }
                // Failed after it reached the upstream: still an allowed request.
                let allowed = reject.counts_as_allowed() && ctx.upstream.is_some();
                (reject.reason(), allowed, resp)
            }
        };
        let status = response.status();
        let elapsed = start.elapsed();
        let decision = if allowed { "allow" } else { "deny" };
        self.inner
            .metrics
            .request(ctx.route.as_ref(), decision, reason, status.as_u16());
        self.inner.metrics.request_latency.observe(elapsed);
        let reservation = ctx.reservation.take();
        if ctx.decided {
            let completion = CompletionRecord {
                request_id: std::mem::take(&mut ctx.request_id),
                status_code: status.as_u16(),
                reason: reason.into(),
                ..CompletionRecord::default()
            };
            return match (allowed && reason == "ok", reservation) {
                (true, Some(r)) => (response, Some((r, completion, start))),
                (_, r) => {
                    send_completion(self, r, completion, "none", 0, start);
                    (response, None)
                }
            };
        }
        let record = self.audit_record(ctx, status, decision, reason, elapsed);
        match reservation {
            Some(r) => r.send(Entry::Request(record)),
            None => {
                let request_id = record.request_id.clone();
                if let Err(e) = self.inner.audit.record(Entry::Request(record)) {
                    crate::coalesced!(error, "audit_refused_unqueued", error = %e, %request_id, "audit record for a refused request could not be queued");
                }
            }
        }
        (response, None)
    }

    /// The request's audit record. Moves the context's strings into it (the request is over).
    fn audit_record(
        &self,
        ctx: &mut Ctx,
        status: StatusCode,
        decision: &'static str,
        reason: &'static str,
        elapsed: Duration,
    ) -> RequestRecord {
        record_of(
            ctx,
            Strings::Move,
            status.as_u16(),
            decision,
            reason,
            elapsed,
        )
    }

    /// The audit line of a request hyper refused itself before the pipeline saw it (a head it
    /// could not parse, or too large): `status` is what hyper answered, the reason
    /// `bad_request_http`; only the peer is known (no path, no token).
    pub(crate) fn audit_http_refusal(&self, peer: IpAddr, status: u16) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut ctx = Ctx::empty(peer, Method::GET);
        ctx.request_id = self.next_request_id();
        let reason = "bad_request_http";
        self.inner
            .metrics
            .request(None, "deny", reason, status.as_u16());
        let mut record = self.audit_record(&mut ctx, status, "deny", reason, Duration::ZERO);
        // The method was never parsed.
        record.method = std::borrow::Cow::Borrowed("");
        if let Err(e) = self.inner.audit.record(Entry::Request(record)) {
            crate::coalesced!(error, "audit_http_refusal_failed", error = %e, "audit record for a request refused by the HTTP layer could not be queued");
        }
    }

    /// Records last use; on the first use of a rotated token, retires its predecessor.
    async fn note_use(&self, t: &Arc<CachedToken>, ip: IpAddr) {
        let now = self.now_ms();
        match self.inner.last_used.get_mut(t.id()) {
            Some(mut e) => *e = (now, ip),
            None => {
                self.inner.last_used.insert(Arc::from(t.id()), (now, ip));
            }
        }
        if !t.predecessor_retired.load(Ordering::Acquire)
            && !t.predecessor_retired.swap(true, Ordering::AcqRel)
        {
            if let Some(old) = t.rotated_from().map(str::to_string) {
                let old2 = old.clone();
                let (id, prefix, account) = (
                    t.id().to_string(),
                    t.prefix().to_string(),
                    t.account().to_string(),
                );
                let retire = move |s: &crate::store::Store| {
                    let by = crate::lifecycle::Successor {
                        id: &id,
                        prefix: &prefix,
                        account: &account,
                    };
                    crate::lifecycle::retire_predecessor(s, &old2, by, ip, now)
                };
                match self.store_call(retire).await {
                    Ok(record) => {
                        self.inner.cache.invalidate_token(&old);
                        self.inner.limiter.forget(&old);
                        if let Some(rec) = record {
                            let _ = self.inner.audit.record(Entry::Admin(rec));
                        }
                    }
                    Err(e) => {
                        t.predecessor_retired.store(false, Ordering::Release);
                        crate::coalesced!(warn, "retire_predecessor_failed", error = %e, "could not retire a rotated token; will retry on next use");
                    }
                }
            }
        }
    }
}

/// Milliseconds with microsecond precision, as audit lines carry them.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Audit-safe form of a path that failed canonicalisation: no query, bounded, printable.
fn sanitize_raw_path(p: &str) -> String {
    p.chars()
        .take(512)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A route with `allowed_hosts` answers only for those names (421 `host_not_allowed`).
fn check_route_host(route: &RouteConfig, host: Option<&str>) -> Result<(), Reject> {
    if route.allowed_hosts.is_empty()
        || host.is_some_and(|h| hygiene::host_allowed(h, &route.allowed_hosts))
    {
        return Ok(());
    }
    Err(Reject::Misdirected {
        reason: "host_not_allowed",
    })
}

fn token_rate(cfg: &Config, t: &CachedToken) -> Rate {
    if let Some(r) = t.rate() {
        return Rate {
            requests_per_second: r.requests_per_second,
            burst: r.burst,
        };
    }
    t.role()
        .and_then(|name| cfg.roles.get(name))
        .and_then(|r| r.rate_limit)
        .unwrap_or(cfg.rate_limit.default)
}

/// What the forwarded request says about its caller (`proxy`'s forwarded headers), for both
/// forwarding paths (hyper's, and the fast path's [`Exchange`]).
fn forward_info<'a>(
    cfg: &Config,
    conn: ConnInfo,
    ctx: &'a Ctx,
    path: &'a str,
    query: Option<&'a str>,
    facts: &hygiene::RequestFacts,
) -> ForwardInfo<'a> {
    ForwardInfo {
        path,
        query,
        client_ip: ctx.client_ip,
        proto: if conn.tls { "https" } else { "http" },
        host: facts.host.clone(),
        request_id: &ctx.request_id,
        token: ctx.token.as_deref(),
        websocket: facts.websocket,
        max_body_bytes: cfg.server.max_body_bytes,
        body_idle: cfg.server.body_idle_timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forwarded::MAX_REQUEST_ID_BYTES;
    use http::header::HeaderValue;

    #[test]
    fn request_id_is_kept_only_from_trusted_proxies_and_only_when_sane() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let other: IpAddr = "192.0.2.7".parse().unwrap();
        let with = |vals: &[&[u8]]| {
            let mut h = HeaderMap::new();
            for v in vals {
                h.append(X_REQUEST_ID, HeaderValue::from_bytes(v).unwrap());
            }
            h
        };
        let ok = with(&[b"lb-7f3a9c/01"]);
        assert_eq!(
            trusted_request_id(proxy, &ok, &trusted).as_deref(),
            Some("lb-7f3a9c/01")
        );
        assert_eq!(trusted_request_id(other, &ok, &trusted), None);
        assert_eq!(trusted_request_id(proxy, &ok, &[]), None);
        assert_eq!(trusted_request_id(proxy, &HeaderMap::new(), &trusted), None);
        let long = vec![b'a'; MAX_REQUEST_ID_BYTES + 1];
        assert_eq!(trusted_request_id(proxy, &with(&[&long]), &trusted), None);
        let max = vec![b'a'; MAX_REQUEST_ID_BYTES];
        assert!(trusted_request_id(proxy, &with(&[&max]), &trusted).is_some());
        for bad in [&b"has space"[..], b"tab\there", b"caf\xc3\xa9", b""] {
            assert_eq!(
                trusted_request_id(proxy, &with(&[bad]), &trusted),
                None,
                "{bad:?}"
            );
        }
        assert_eq!(
            trusted_request_id(proxy, &with(&[b"a", b"b"]), &trusted),
            None
        );
    }

    #[test]
    fn forwarded_for_is_only_believed_from_trusted_proxies() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.9, 10.0.0.2"),
        );
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(client_ip(peer, &h, &[]), peer);
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        let outsider: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(client_ip(outsider, &h, &trusted), outsider);
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("junk, 10.0.0.2"),
        );
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
    }
}
