//! The gateway state handle and the request pipeline (SPEC §1), read top to bottom:
//! canonicalise → failed-auth limiter → authenticate → authorise → rate-limit → audit → forward.
//! Each phase returns `Result<_, Reject>`; `error::respond` turns a rejection into a response.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::audit::{AdminRecord, AuditLog, Entry, RequestRecord, Reservation};
use crate::auth;
use crate::authz::{self, Lookup, RuleMatch};
use crate::body::{Body, BodyOutcome, full};
use crate::cache::{CachedToken, TokenCache};
use crate::clock::{Clock, rfc3339};
use crate::config::{Config, Rate, RouteConfig};
use crate::error::{Reject, respond};
use crate::hygiene::{self, Limits};
use crate::metrics::{Metrics, Snapshot};
use crate::path;
use crate::proxy::{self, ForwardInfo, UpstreamClient};
use crate::ratelimit::redis::RedisLimiter;
use crate::ratelimit::{Allowance, FailedAuthLimiter, TokenLimiter};
use crate::store::{ChangeSignal, LastUsed, Store, StoreError, TokenRow};
use crate::token::TokenHash;

/// Facts about the client connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// TCP peer.
    pub peer: SocketAddr,
    /// Whether the listener is TLS.
    pub tls: bool,
}

/// Cheap-to-clone handle to everything the pipeline needs.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    /// ArcSwap: the request path reads the config without a lock; SIGHUP swaps it whole.
    config: ArcSwap<Config>,
    store: Store,
    cache: TokenCache,
    audit: AuditLog,
    limiter: TokenLimiter,
    /// Limits exact across replicas (`rate_limit.redis`); None = the in-process `limiter` only.
    /// ArcSwap: a reload that changes the Redis settings replaces it without a lock.
    redis_limiter: arc_swap::ArcSwapOption<RedisLimiter>,
    /// ArcSwap: a reload with a new `failed_auth_per_minute` replaces the limiter.
    failed_auth: ArcSwap<FailedAuthLimiter>,
    metrics: Metrics,
    client: UpstreamClient,
    clock: Clock,
    /// Last use per token id, flushed in batches (never one write per request). DashMap: per-token
    /// updates from concurrent requests rarely share a shard.
    last_used: DashMap<Arc<str>, (i64, IpAddr)>,
    boot_id: u64,
    request_seq: AtomicU64,
    /// Highest change-log sequence applied to the cache.
    change_seq: AtomicU64,
    /// Last time the change poller succeeded (ms, gateway clock).
    last_poll_ok: AtomicU64,
    /// Highest store-outbox id already handed to the audit writer. Rows up to it are never
    /// recorded again, even when their flush timed out (the log failing) and they were not acked:
    /// the writer keeps them queued, so recording them again would log them twice.
    outbox_sent: AtomicI64,
    /// Web UI sessions of the admin listener (see `admin::session` for the lock choice).
    sessions: crate::admin::session::Sessions,
}

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
    ratelimit: Option<Allowance>,
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
    Answered(Response<Body>, Reservation),
    /// Allowed, to be forwarded to `route` (`ctx.upstream` is set).
    Forward {
        canon: path::CanonicalPath,
        route: &'c RouteConfig,
        facts: hygiene::RequestFacts,
        reservation: Reservation,
    },
}

/// Stops background tasks when dropped.
pub struct BackgroundGuard {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for BackgroundGuard {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Gateway {
    /// Builds the gateway over an opened store and audit log.
    pub fn new(config: Config, store: Store, audit: AuditLog) -> Gateway {
        let failed = FailedAuthLimiter::new(
            config.rate_limit.failed_auth_per_minute,
            config.rate_limit.failed_auth_max_clients,
        );
        let change_seq = store.last_change_seq().unwrap_or(0).max(0) as u64;
        let redis_limiter = arc_swap::ArcSwapOption::new(RedisLimiter::from_options(
            &config.rate_limit.redis_options(),
        ));
        let clock = Clock::default();
        let now = clock.now_ms();
        Gateway {
            inner: Arc::new(Inner {
                config: ArcSwap::from_pointee(config),
                store,
                cache: TokenCache::new(),
                audit,
                limiter: TokenLimiter::new(),
                redis_limiter,
                failed_auth: ArcSwap::from_pointee(failed),
                metrics: Metrics::default(),
                client: proxy::client(),
                clock,
                last_used: DashMap::new(),
                boot_id: rand::random::<u64>(),
                request_seq: AtomicU64::new(0),
                change_seq: AtomicU64::new(change_seq),
                last_poll_ok: AtomicU64::new(now as u64),
                outbox_sent: AtomicI64::new(0),
                sessions: crate::admin::session::Sessions::new(),
            }),
        }
    }

    /// The current config.
    pub fn config(&self) -> Arc<Config> {
        self.inner.config.load_full()
    }

    /// Replaces the config (SIGHUP). The caller validated it.
    pub fn set_config(&self, config: Config) {
        let old = self.inner.config.load();
        if old.rate_limit.failed_auth_per_minute != config.rate_limit.failed_auth_per_minute
            || old.rate_limit.failed_auth_max_clients != config.rate_limit.failed_auth_max_clients
        {
            self.inner
                .failed_auth
                .store(Arc::new(FailedAuthLimiter::new(
                    config.rate_limit.failed_auth_per_minute,
                    config.rate_limit.failed_auth_max_clients,
                )));
        }
        let redis_changed = match self.inner.redis_limiter.load().as_ref() {
            Some(r) => !r.matches(&config.rate_limit.redis_options()),
            None => config.rate_limit.redis.is_some(),
        };
        if redis_changed {
            self.inner.redis_limiter.store(RedisLimiter::from_options(
                &config.rate_limit.redis_options(),
            ));
        }
        self.inner.config.store(Arc::new(config));
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The token cache.
    pub fn cache(&self) -> &TokenCache {
        &self.inner.cache
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.inner.audit
    }

    /// Metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The gateway clock.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// Now (ms).
    pub fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    /// Web UI sessions (admin listener).
    pub fn sessions(&self) -> &crate::admin::session::Sessions {
        &self.inner.sessions
    }

    /// Authenticates a Bearer token for the admin listener with the public pipeline's steps 2–5:
    /// the per-IP failed-auth limiter, extraction, format and checksum, cache-then-store lookup,
    /// and the judgement (revoked, expired, account disabled, IP allowlist). Failures count
    /// towards the limiter exactly as on the public side; a success records last use.
    pub async fn authenticate_bearer(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        client_ip: IpAddr,
    ) -> Result<Arc<CachedToken>, Reject> {
        if let Some(wait) = self.inner.failed_auth.load().blocked(client_ip) {
            return Err(Reject::ClientBlocked { retry_after: wait });
        }
        let result = async {
            let credential = auth::extract(headers, query)?;
            let parsed = auth::parse(credential)?;
            let entry = self.lookup(parsed.hash()).await?;
            auth::judge(&entry, self.now_ms(), client_ip)?;
            Ok(entry)
        }
        .await;
        match &result {
            Ok(entry) => self.note_use(entry, client_ip).await,
            Err(e) if is_auth_failure(e) => self.inner.failed_auth.load().record_failure(client_ip),
            Err(_) => {}
        }
        result
    }

    /// Re-reads a token by id (a web UI session's sign-in token) and judges it as a lookup would.
    pub async fn authenticate_id(
        &self,
        token_id: &str,
        client_ip: IpAddr,
    ) -> Result<TokenRow, Reject> {
        let id = token_id.to_string();
        let row = self
            .store_call(move |s| s.get_token(&id))
            .await
            .map_err(|e| match e {
                StoreError::NoToken(_) => Reject::InvalidToken {
                    reason: "unknown_token",
                },
                e => {
                    tracing::error!(error = %e, "session token lookup failed: answering 503");
                    Reject::StoreUnavailable
                }
            })?;
        auth::judge_row(&row, self.now_ms(), client_ip)?;
        Ok(row)
    }

    fn next_request_id(&self) -> String {
        let n = self.inner.request_seq.fetch_add(1, Ordering::Relaxed);
        if n > u64::from(u32::MAX) {
            return format!("{:016x}{:08x}", self.inner.boot_id, n);
        }
        // The same `{:016x}{:08x}` without the formatting machinery (every request).
        let mut raw = [0u8; 12];
        raw[..8].copy_from_slice(&self.inner.boot_id.to_be_bytes());
        raw[8..].copy_from_slice(&(n as u32).to_be_bytes());
        crate::token::hex(&raw)
    }

    /// Runs a blocking store call off the async workers.
    pub async fn store_call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.inner.store.clone();
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down: the call never ran.
            Err(_) => Err(StoreError::ShuttingDown),
        }
    }

    /// Revokes a token: when this returns, this process answers 401 for it (0 ms).
    pub async fn revoke(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
    ) -> Result<TokenRow, StoreError> {
        let now = self.now_ms();
        let (id2, actor2, reason2) = (id.to_string(), actor.to_string(), reason.to_string());
        let row = self
            .store_call(move |s| {
                let t = s.find_token(&id2)?;
                s.revoke(&t.id, &actor2, &reason2, now)
            })
            .await?;
        self.inner.cache.invalidate_token(&row.id);
        self.inner.limiter.forget(&row.id);
        Ok(row)
    }

    /// Disables an account: all its tokens are rejected when this returns.
    pub async fn disable_account(
        &self,
        name: &str,
        actor: &str,
    ) -> Result<crate::store::Account, StoreError> {
        let now = self.now_ms();
        let (n, a) = (name.to_string(), actor.to_string());
        let acc = self
            .store_call(move |s| s.disable_account(&n, &a, now))
            .await?;
        self.inner.cache.invalidate_account(&acc.id);
        Ok(acc)
    }

    /// Invalidates what a change-log entry touched.
    pub fn apply_change(&self, change: &crate::store::Change) {
        if let Some(t) = &change.token_id {
            self.inner.cache.invalidate_token(t);
        }
        if let Some(a) = &change.account_id {
            self.inner.cache.invalidate_account(a);
        }
    }

    /// One round of the change poller: applies other processes' changes to the cache.
    pub async fn poll_changes(&self) -> Result<usize, StoreError> {
        let since = self.inner.change_seq.load(Ordering::SeqCst) as i64;
        let changes = self.store_call(move |s| s.changes_since(since)).await?;
        for c in &changes {
            self.apply_change(c);
            self.inner
                .change_seq
                .fetch_max(c.seq as u64, Ordering::SeqCst);
        }
        Ok(changes.len())
    }

    /// Moves admin events queued by CLI processes (store outbox) into the audit log, each once:
    /// rows are acked (deleted) only after their lines are written, and a row handed to the
    /// writer is never handed again while it waits for a failing log to recover.
    pub async fn drain_outbox(&self) -> Result<usize, StoreError> {
        let rows = self.store_call(|s| s.outbox_peek(500)).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut n = 0;
        for (id, line) in rows {
            if id <= self.inner.outbox_sent.load(Ordering::Acquire) {
                continue; // queued in the writer already; only the ack is missing
            }
            match serde_json::from_str::<AdminRecord>(&line) {
                Ok(rec) => {
                    if let Err(e) = self.inner.audit.record(Entry::Admin(rec)) {
                        tracing::warn!(error = %e, "audit writer busy; CLI events stay queued");
                        break;
                    }
                    n += 1;
                }
                Err(e) => tracing::error!(id, error = %e, "unreadable queued audit event skipped"),
            }
            self.inner.outbox_sent.store(id, Ordering::Release);
        }
        // While the log is failing, the flush would hold this poller (and with it the change
        // poll that propagates revocations) for seconds: ack on a later round instead.
        let sent = self.inner.outbox_sent.load(Ordering::Acquire);
        if sent > 0 && self.inner.audit.is_healthy() && self.inner.audit.flush_async().await.is_ok()
        {
            self.store_call(move |s| s.outbox_ack(sent)).await?;
        }
        Ok(n)
    }

    /// Writes accumulated last-use data in one transaction.
    pub async fn flush_last_used(&self) {
        let batch: Vec<LastUsed> = {
            let keys: Vec<Arc<str>> = self
                .inner
                .last_used
                .iter()
                .map(|e| e.key().clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| {
                    self.inner
                        .last_used
                        .remove(&k)
                        .map(|(k, (at, ip))| LastUsed {
                            token_id: k.to_string(),
                            at,
                            ip: ip.to_string(),
                        })
                })
                .collect()
        };
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        let shared = Arc::new(batch);
        let to_write = shared.clone();
        if let Err(e) = self.store_call(move |s| s.flush_last_used(&to_write)).await {
            tracing::warn!(error = %e, tokens = n, "could not write last-used data; it will be retried");
            // Put the batch back, keeping whichever use is newer, so the next flush retries it.
            for u in shared.iter() {
                let Ok(ip) = u.ip.parse::<IpAddr>() else {
                    continue;
                };
                let key: Arc<str> = Arc::from(u.token_id.as_str());
                let mut e = self.inner.last_used.entry(key).or_insert((u.at, ip));
                if e.0 < u.at {
                    *e = (u.at, ip);
                }
            }
        }
    }

    /// Starts the change poller, the last-used flusher and limiter compaction.
    pub fn spawn_background(&self) -> BackgroundGuard {
        let mut tasks = Vec::new();
        let gw = self.clone();
        tasks.push(tokio::spawn(async move {
            let mut warned = false;
            // PostgreSQL pushes change signals (wake at once); SQLite is only polled.
            let mut events = gw.inner.store.change_events();
            // Set after a lost notification connection until the change log is read again.
            let mut resync = false;
            loop {
                let every = gw.config().store.change_poll_interval;
                let first = match events.as_mut() {
                    Some(rx) => tokio::select! {
                        _ = tokio::time::sleep(every) => None,
                        s = rx.recv() => Some(s),
                    },
                    None => {
                        tokio::time::sleep(every).await;
                        None
                    }
                };
                // Handle everything queued, in order, before one read of the change log.
                let mut next = first;
                while let Some(signal) = next.take() {
                    use tokio::sync::broadcast::error::RecvError;
                    match signal {
                        Ok(ChangeSignal::Notified) => {}
                        Ok(ChangeSignal::Reconnected) => resync = true,
                        // Lagged: a `Lost` may be among the missed signals; assume the worst.
                        Ok(ChangeSignal::Lost) | Err(RecvError::Lagged(_)) => {
                            if gw.inner.cache.is_trusted() {
                                gw.inner.cache.distrust();
                                tracing::warn!("change notifications lost: every request reads the store, nothing is cached, until they are back");
                            }
                            resync = true;
                        }
                        Err(RecvError::Closed) => events = None,
                    }
                    next = events.as_mut().and_then(|rx| match rx.try_recv() {
                        Ok(s) => Some(Ok(s)),
                        Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => Some(Err(RecvError::Lagged(n))),
                        Err(_) => None,
                    });
                }
                // Level check too: covers a loss before we subscribed. Read before the poll: trust
                // comes back only if the connection already listened when the read began.
                let feed_up = gw.inner.store.change_feed_up();
                if feed_up == Some(false) && gw.inner.cache.is_trusted() {
                    gw.inner.cache.distrust();
                    resync = true;
                }
                match gw.poll_changes().await {
                    Ok(_) => {
                        if resync && feed_up != Some(false) {
                            // Listening again, and the change log is applied up to now: any
                            // later change will be pushed, so caching is safe again.
                            resync = false;
                            gw.inner.cache.trust();
                            tracing::info!("change notifications are back and the change log is applied: caching again");
                        }
                        if let Err(e) = gw.drain_outbox().await {
                            tracing::warn!(error = %e, "cannot move queued CLI audit events");
                        }
                        gw.inner.last_poll_ok.store(gw.now_ms() as u64, Ordering::SeqCst);
                        if warned {
                            tracing::info!("the store's change log is readable again: caching again");
                        }
                        warned = false;
                    }
                    Err(e) => {
                        // Changes may be missed: stop trusting cached allowances after 1 s.
                        let since = gw.now_ms() - gw.inner.last_poll_ok.load(Ordering::SeqCst) as i64;
                        if since > 1000 {
                            gw.inner.cache.clear();
                        }
                        if !warned {
                            tracing::error!(error = %e, "cannot read the store's change log; cache entries are dropped until it recovers");
                            warned = true;
                        }
                    }
                }
            }
        }));
        let gw = self.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let every = gw.config().tokens.last_used_flush_interval;
                tokio::time::sleep(every).await;
                gw.flush_last_used().await;
            }
        }));
        let gw = self.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                gw.inner.failed_auth.load().compact();
            }
        }));
        BackgroundGuard { tasks }
    }

    /// Metrics snapshot of other components.
    pub fn snapshot(&self) -> Snapshot {
        let (hits, misses) = self.inner.cache.stats();
        let (tracked, _) = self.inner.failed_auth.load().tracked();
        Snapshot {
            cache_hits: hits,
            cache_misses: misses,
            cache_size: self.inner.cache.len() as u64,
            audit_queue: self.inner.audit.queue_depth() as u64,
            audit_failures: self.inner.audit.write_failures(),
            audit_lines: self.inner.audit.lines_written(),
            rate_limited: self.inner.limiter.limited_count()
                + self
                    .inner
                    .redis_limiter
                    .load()
                    .as_ref()
                    .map_or(0, |r| r.limited_count()),
            redis_fallbacks: self
                .inner
                .redis_limiter
                .load()
                .as_ref()
                .map_or(0, |r| r.fallback_count()),
            failed_auth_tracked: tracked as u64,
            store_lookups: self.inner.store.lookup_count(),
            store_writes: self.inner.store.write_count(),
            ..Snapshot::default()
        }
    }

    // ------------------------------------------------------------------ the pipeline

    /// Handles one request on the public listener. Always answers; never panics on input.
    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let start = Instant::now();
        let _in_flight = self.inner.metrics.in_flight();
        let cfg = self.inner.config.load_full();
        let ctx = self.new_ctx(&req, conn);
        // If this future is dropped before it answers (client gone, drain deadline), the guard
        // still writes the request's audit line: one line per request that reached the HTTP layer.
        let mut guard = AuditGuard {
            gw: self,
            ctx,
            start,
            armed: true,
        };
        let result = match tokio::time::timeout(
            cfg.server.request_timeout,
            self.pipeline(&cfg, conn, req, &mut guard.ctx),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err((Reject::RequestTimeout, None)),
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
            Ok(Decided::Answered(resp, reservation)) => Ok((resp, reservation)),
            Ok(Decided::Forward { reservation, .. }) => {
                let resp = self.decorate(&cfg, Response::new(crate::body::empty()), &ctx);
                Ok((resp, reservation))
            }
            Err(e) => Err(e),
        };
        self.conclude(&cfg, &mut ctx, start, result)
    }

    fn new_ctx<B>(&self, req: &Request<B>, conn: ConnInfo) -> Ctx {
        Ctx {
            request_id: self.next_request_id(),
            client_ip: conn.peer.ip(),
            method: req.method().clone(),
            path: String::new(),
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
            token_prefix: None,
            token: None,
            public: false,
            permission: None,
            rule: None,
            shadow_decision: None,
            upstream: None,
            ratelimit: None,
        }
    }

    /// After the pipeline: the refusal's response, metrics, and the audit line.
    fn conclude(
        &self,
        cfg: &Config,
        ctx: &mut Ctx,
        start: Instant,
        result: Result<(Response<Body>, Reservation), (Reject, Option<Reservation>)>,
    ) -> Response<Body> {
        let (status, reason, reservation, response) = match result {
            Ok((resp, reservation)) => (resp.status(), "ok", Some(reservation), resp),
            Err((reject, reservation)) => {
                if is_auth_failure(&reject) {
                    self.inner.failed_auth.load().record_failure(ctx.client_ip);
                }
                if matches!(reject, Reject::StoreUnavailable | Reject::Internal) {
                    tracing::warn!(request_id = %ctx.request_id, reason = reject.reason(), "request failed on our side");
                }
                let resp = respond(&reject, &cfg.server.realm, &ctx.request_id);
                (resp.status(), reject.reason(), reservation, resp)
            }
        };
        let elapsed = start.elapsed();
        let decision = if reason == "ok"
            || matches!(
                reason,
                "upstream_error" | "upstream_timeout" | "body_too_large" | "body_idle"
            ) && ctx.upstream.is_some()
        {
            "allow"
        } else {
            "deny"
        };
        self.inner
            .metrics
            .request(decision, reason, status.as_u16());
        self.inner.metrics.request_latency.observe(elapsed);
        let record = self.audit_record(ctx, status, decision, reason, elapsed);
        match reservation {
            Some(r) => r.send(Entry::Request(record)),
            None => {
                let request_id = record.request_id.clone();
                if let Err(e) = self.inner.audit.record(Entry::Request(record)) {
                    tracing::error!(error = %e, %request_id, "audit record for a refused request could not be queued");
                }
            }
        }
        response
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
        let row = ctx.token.as_deref();
        RequestRecord {
            timestamp: crate::audit::now_rfc3339(),
            request_id: std::mem::take(&mut ctx.request_id),
            auth_type: if ctx.token_prefix.is_some() {
                "api_token"
            } else {
                "none"
            }
            .into(),
            api_token_id: row.map(|r| r.id().to_string()),
            api_token_name: row.map(|r| r.name().to_string()),
            token_prefix: ctx.token_prefix.take(),
            account: row.map(|r| r.account().to_string()),
            method: crate::audit::method_name(&ctx.method),
            path: std::mem::take(&mut ctx.path),
            status_code: status.as_u16(),
            rbac_decision: decision.into(),
            reason: reason.into(),
            permission: ctx.permission.take(),
            rule: ctx.rule.take(),
            shadow_decision: ctx.shadow_decision.map(Into::into),
            client_ip: proxy::ip_text(ctx.client_ip),
            user_agent: ctx.user_agent.take(),
            upstream: ctx.upstream.take(),
            duration_ms: (elapsed.as_secs_f64() * 1e6).round() / 1e3,
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
    ) -> Result<Decided<'c>, (Reject, Option<Reservation>)> {
        // 1. Canonicalise and check the request.
        let limits = Limits {
            max_uri_bytes: cfg.server.max_uri_bytes,
            max_header_bytes: cfg.server.max_header_bytes,
            max_body_bytes: cfg.server.max_body_bytes,
        };
        // Until the path is canonical, the audit line gets a sanitised copy of the raw one.
        let facts = hygiene::check(req, &cfg.server.methods, limits).map_err(|r| {
            ctx.path = sanitize_raw_path(req.uri().path());
            no_res(r)
        })?;
        ctx.client_ip = client_ip(conn.peer.ip(), req.headers(), &cfg.server.trusted_proxies);
        let any_non_ascii = cfg.routes.iter().any(|r| r.allow_non_ascii);
        let canon = path::canonicalise(req.uri().path(), any_non_ascii).map_err(|e| {
            ctx.path = sanitize_raw_path(req.uri().path());
            no_res(Reject::BadRequest {
                reason: "bad_path",
                message: format!("Invalid request path: {e}."),
            })
        })?;
        ctx.path = canon.path.clone();
        let reserved = canon.path.starts_with(&cfg.server.reserved_prefix);
        let route = if reserved {
            None
        } else {
            cfg.route_for(&canon.path)
        };
        if canon.has_non_ascii && !route.is_some_and(|r| r.allow_non_ascii) {
            return Err(no_res(Reject::BadRequest {
                reason: "bad_path",
                message: "Non-ASCII paths are not accepted on this route.".into(),
            }));
        }
        if facts.websocket && !route.is_some_and(|r| r.websocket) {
            return Err(no_res(Reject::UpgradeRefused));
        }
        let lookup = route.map(|r| r.rules.lookup(ctx.method.as_str(), &canon.path));
        let enforced = lookup.as_ref().and_then(|l| l.enforced.as_ref());
        if let (Some(r), Some(m)) = (route, enforced) {
            ctx.rule = Some(rule_id(r, m));
            ctx.permission = m.rule.permission.clone();
        }
        ctx.public = enforced.is_some_and(|m| m.rule.public);

        // 2.–5. Authenticate (public rules skip it).
        if !ctx.public {
            if let Some(wait) = self.inner.failed_auth.load().blocked(ctx.client_ip) {
                return Err(no_res(Reject::ClientBlocked { retry_after: wait }));
            }
            let token = self.authenticate(req, ctx).await.map_err(no_res)?;
            ctx.token = Some(token);
        }

        // 6. Authorise.
        if reserved {
            // The gateway's own endpoints need a valid token, nothing more.
        } else {
            self.authorise(cfg, lookup.as_ref(), ctx).map_err(no_res)?;
        }

        // 7. Per-token rate limit.
        if let Some(t) = &ctx.token {
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
                    return Err(no_res(Reject::RateLimited {
                        retry_after: d.retry_after,
                        limit: d.limit,
                    }));
                }
            }
            self.note_use(t, ctx.client_ip).await;
        }

        // 8. The audit writer must accept the record before anything is forwarded.
        let reservation = self
            .inner
            .audit
            .reserve()
            .map_err(|_| no_res(Reject::AuditUnavailable))?;
        if reserved {
            return match self.internal(cfg, &ctx.method, &canon.path, ctx) {
                Ok(r) => Ok(Decided::Answered(self.decorate(cfg, r, ctx), reservation)),
                Err(e) => Err((e, Some(reservation))),
            };
        }
        let Some(route) = route else {
            return Err((
                Reject::Forbidden {
                    reason: "no_rule",
                    permission: None,
                },
                Some(reservation),
            ));
        };
        ctx.upstream = Some(route.name.clone());
        Ok(Decided::Forward {
            canon,
            route,
            facts,
            reservation,
        })
    }

    async fn pipeline(
        &self,
        cfg: &Config,
        conn: ConnInfo,
        mut req: Request<Incoming>,
        ctx: &mut Ctx,
    ) -> Result<(Response<Body>, Reservation), (Reject, Option<Reservation>)> {
        let (canon, route, facts, reservation) = match self.decide(cfg, conn, &req, ctx).await? {
            Decided::Answered(resp, reservation) => return Ok((resp, reservation)),
            Decided::Forward {
                canon,
                route,
                facts,
                reservation,
            } => (canon, route, facts, reservation),
        };

        // 9. Forward.
        let client_upgrade = facts.websocket.then(|| hyper::upgrade::on(&mut req));
        let query = req.uri().query().map(str::to_string);
        let (parts, body) = req.into_parts();
        let outcome = BodyOutcome::default();
        let info = ForwardInfo {
            path: &canon.path,
            query: query.as_deref(),
            client_ip: ctx.client_ip,
            proto: if conn.tls { "https" } else { "http" },
            host: facts.host.clone(),
            request_id: &ctx.request_id,
            token: ctx.token.as_deref(),
            websocket: facts.websocket,
            max_body_bytes: cfg.server.max_body_bytes,
            body_idle: cfg.server.body_idle_timeout,
        };
        let up_req = proxy::upstream_request(parts, body, route, &info, outcome.clone());
        let up_start = Instant::now();
        let result = tokio::time::timeout(route.timeout, self.inner.client.request(up_req)).await;
        self.inner.metrics.upstream(&route.name, up_start.elapsed());
        match result {
            Err(_) => Err((Reject::UpstreamTimeout, Some(reservation))),
            Ok(Err(e)) => {
                if outcome.too_large() {
                    Err((Reject::BodyTooLarge, Some(reservation)))
                } else if outcome.idle() {
                    Err((Reject::BodyIdle, Some(reservation)))
                } else {
                    tracing::debug!(error = %e, upstream = %route.upstream_url, "upstream request failed");
                    Err((Reject::UpstreamError, Some(reservation)))
                }
            }
            Ok(Ok(mut resp)) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client) = client_upgrade {
                        proxy::splice_upgrade(client, hyper::upgrade::on(&mut resp));
                    }
                }
                let resp = proxy::downstream_response(resp, cfg.server.body_idle_timeout);
                Ok((self.decorate(cfg, resp, ctx), reservation))
            }
        }
    }

    /// Steps 3–5.
    async fn authenticate<B>(
        &self,
        req: &Request<B>,
        ctx: &mut Ctx,
    ) -> Result<Arc<CachedToken>, Reject> {
        let credential = auth::extract(req.headers(), req.uri().query())?;
        let parsed = auth::parse(credential)?;
        ctx.token_prefix = Some(parsed.display_prefix().to_string());
        let entry = self.lookup(parsed.hash()).await?;
        ctx.token = Some(entry.clone());
        let now = self.now_ms();
        auth::judge(&entry, now, ctx.client_ip)?;
        Ok(entry)
    }

    /// Cache, then store. A fill that raced an invalidation is retried, never kept.
    async fn lookup(&self, hash: TokenHash) -> Result<Arc<CachedToken>, Reject> {
        if let Some(e) = self.inner.cache.get(&hash) {
            return Ok(e);
        }
        for _ in 0..8 {
            let epoch = self.inner.cache.epoch();
            let row = self
                .store_call(move |s| s.lookup_hash(&hash))
                .await
                .map_err(|e| {
                    // A lost store file is logged once by the change poller, not per request.
                    if !matches!(e, StoreError::FileLost { .. }) {
                        tracing::error!(error = %e, "token lookup failed: answering 503");
                    }
                    Reject::StoreUnavailable
                })?;
            let Some(row) = row else {
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

    /// Step 6, and the shadow evaluation that is logged but never enforced.
    fn authorise(
        &self,
        cfg: &Config,
        lookup: Option<&Lookup<'_>>,
        ctx: &mut Ctx,
    ) -> Result<(), Reject> {
        let row = ctx.token.as_deref();
        let enforced = lookup.and_then(|l| l.enforced.as_ref());
        let decide = |m: Option<&RuleMatch<'_>>, perms: Option<&[String]>| -> Result<(), Reject> {
            let Some(m) = m else {
                return Err(Reject::Forbidden {
                    reason: "no_rule",
                    permission: None,
                });
            };
            if m.rule.public {
                return Ok(());
            }
            let perm = m.rule.permission.as_deref().unwrap_or("");
            let (Some(row), Some(perms)) = (row, perms) else {
                return Err(Reject::Forbidden {
                    reason: "insufficient_permission",
                    permission: Some(perm.to_string()),
                });
            };
            if !authz::grants(perms, perm) {
                return Err(Reject::Forbidden {
                    reason: "insufficient_permission",
                    permission: Some(perm.to_string()),
                });
            }
            if !authz::scopes_allow(row.scopes(), &m.captures) {
                return Err(Reject::Forbidden {
                    reason: "out_of_scope",
                    permission: Some(perm.to_string()),
                });
            }
            Ok(())
        };
        let token_perms = row.map(|r| r.permissions());
        let verdict = decide(enforced, token_perms);
        // Shadow: a staged rule that would win, or a role marked shadow (its current permission list).
        let shadow_rule = lookup.and_then(|l| l.shadow.as_ref());
        let shadow_role = row
            .and_then(|r| r.role())
            .and_then(|name| cfg.roles.get(name))
            .filter(|role| role.shadow);
        if shadow_rule.is_some() || shadow_role.is_some() {
            let m = shadow_rule.or(enforced);
            let perms = shadow_role
                .map(|r| r.permissions.as_slice())
                .or(token_perms);
            ctx.shadow_decision = Some(if decide(m, perms).is_ok() {
                "would_allow"
            } else {
                "would_deny"
            });
        }
        verdict
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
                match self.store_call(move |s| s.retire_rotated(&old2, now)).await {
                    Ok(retired) => {
                        self.inner.cache.invalidate_token(&old);
                        self.inner.limiter.forget(&old);
                        if retired {
                            let rec = AdminRecord {
                                timestamp: crate::audit::now_rfc3339(),
                                event: "token.revoked".into(),
                                actor: "tokengate".into(),
                                auth_type: "api_token".into(),
                                target: Some(old),
                                account: Some(t.account().to_string()),
                                api_token_id: Some(t.id().to_string()),
                                token_prefix: Some(t.prefix().to_string()),
                                reason: Some("rotated".into()),
                                client_ip: Some(ip.to_string()),
                                details: None,
                            };
                            let _ = self.inner.audit.record(Entry::Admin(rec));
                        }
                    }
                    Err(e) => {
                        t.predecessor_retired.store(false, Ordering::Release);
                        tracing::warn!(error = %e, "could not retire a rotated token; will retry on next use");
                    }
                }
            }
        }
    }

    /// Endpoints under the reserved prefix.
    fn internal(
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

    /// Adds the gateway's response headers.
    fn decorate(&self, cfg: &Config, mut resp: Response<Body>, ctx: &Ctx) -> Response<Body> {
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

/// Writes the audit line of a request whose handling was abandoned before it answered.
struct AuditGuard<'a> {
    gw: &'a Gateway,
    ctx: Ctx,
    start: Instant,
    armed: bool,
}

impl Drop for AuditGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // 499: the client closed the request (or the drain deadline cut it) before a response.
        let status = StatusCode::from_u16(499).expect("valid code");
        let decision = if self.ctx.upstream.is_some() {
            "allow"
        } else {
            "deny"
        };
        let gw = self.gw;
        gw.inner.metrics.request(decision, "client_closed", 499);
        let record = gw.audit_record(
            &mut self.ctx,
            status,
            decision,
            "client_closed",
            self.start.elapsed(),
        );
        if let Err(e) = gw.inner.audit.record(Entry::Request(record)) {
            tracing::error!(error = %e, "audit record for an abandoned request could not be queued");
        }
    }
}

fn no_res(r: Reject) -> (Reject, Option<Reservation>) {
    (r, None)
}

fn is_auth_failure(r: &Reject) -> bool {
    matches!(
        r,
        Reject::MissingToken { .. } | Reject::InvalidRequest { .. } | Reject::InvalidToken { .. }
    )
}

/// Audit-safe form of a path that failed canonicalisation: no query, bounded, printable.
fn sanitize_raw_path(p: &str) -> String {
    p.chars()
        .take(512)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn rule_id(route: &RouteConfig, m: &RuleMatch<'_>) -> String {
    route.rule_ids[m.index].clone()
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

/// The client address: the TCP peer, or — only when the peer is a trusted proxy — the last
/// untrusted hop of `X-Forwarded-For` (walking right to left past trusted proxies).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if trusted.is_empty() || !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    return ip;
                }
            }
            // An unparsable hop was written by someone we do not trust: stop at the last trusted one.
            Err(_) => return client,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

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
