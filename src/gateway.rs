//! The gateway state handle: the shared state every request runs on (config, store, cache,
//! audit log, limiters, metrics, upstream client, clock), the config swap on reload, and the
//! background jobs (change poller, CLI audit outbox, last-used flusher, limiter compaction).
//! The token/account operations `revoke` and `disable_account` live here for now.
//!
//! The request pipeline that runs on this state is in `pipeline` (`Gateway::handle`,
//! `Gateway::evaluate`, `Gateway::authenticate_bearer`); the client address is `forwarded::client_ip`.
//!
//! Must never import `admin`, `cli` or `pipeline`: the admin side owns its own state
//! (web UI sessions) and calls in through this handle.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;

use crate::audit::{AdminRecord, AuditLog, Entry};
use crate::auth;
use crate::cache::TokenCache;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::Reject;
use crate::metrics::{Metrics, Snapshot};
use crate::proxy::{self, UpstreamClient};
use crate::ratelimit::redis::RedisLimiter;
use crate::ratelimit::{FailedAuthLimiter, LimiterClock, TokenLimiter};
use crate::store::{ChangeSignal, LastUsed, Store, StoreError, TokenRow};

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
    /// Read by `pipeline` (same crate); nothing outside the crate sees it.
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// ArcSwap: the request path reads the config without a lock; SIGHUP swaps it whole.
    pub(crate) config: ArcSwap<Config>,
    pub(crate) store: Store,
    pub(crate) cache: TokenCache,
    pub(crate) audit: AuditLog,
    /// On the gateway clock ([`LimiterClock`]), like the two address limiters.
    pub(crate) limiter: TokenLimiter<LimiterClock>,
    /// Limits exact across replicas (`rate_limit.redis`); None = the in-process `limiter` only.
    /// ArcSwap: a reload that changes the Redis settings replaces it without a lock.
    pub(crate) redis_limiter: arc_swap::ArcSwapOption<RedisLimiter>,
    /// ArcSwap: a reload with a new `failed_auth_per_minute` replaces the limiter.
    pub(crate) failed_auth: ArcSwap<FailedAuthLimiter<LimiterClock>>,
    /// Store lookups that found no token, per client address, on the same quota: a cache miss
    /// from an address over it is refused without a lookup (see `pipeline::lookup`).
    pub(crate) unknown_lookups: ArcSwap<FailedAuthLimiter<LimiterClock>>,
    pub(crate) metrics: Metrics,
    pub(crate) client: UpstreamClient,
    pub(crate) clock: Clock,
    /// Last use per token id, flushed in batches (never one write per request). DashMap: per-token
    /// updates from concurrent requests rarely share a shard.
    pub(crate) last_used: DashMap<Arc<str>, (i64, IpAddr)>,
    pub(crate) boot_id: u64,
    pub(crate) request_seq: AtomicU64,
    /// Highest change-log sequence applied to the cache.
    pub(crate) change_seq: AtomicU64,
    /// Last time the change poller succeeded (ms, gateway clock).
    pub(crate) last_poll_ok: AtomicU64,
    /// Highest store-outbox id already handed to the audit writer. Rows up to it are never
    /// recorded again, even when their flush timed out (the log failing) and they were not acked:
    /// the writer keeps them queued, so recording them again would log them twice.
    pub(crate) outbox_sent: AtomicI64,
    /// The public health endpoint's probe bookkeeping (see `readiness::ProbeState`).
    pub(crate) health: crate::readiness::ProbeState,
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
        let clock = Clock::default();
        let failed = address_limiter(&config, &clock);
        let unknown = address_limiter(&config, &clock);
        let change_seq = store.last_change_seq().unwrap_or(0).max(0) as u64;
        let redis_limiter = arc_swap::ArcSwapOption::new(RedisLimiter::from_options(
            &config.rate_limit.redis_options(),
        ));
        let now = clock.now_ms();
        Gateway {
            inner: Arc::new(Inner {
                config: ArcSwap::from_pointee(config),
                store,
                cache: TokenCache::new(),
                audit,
                limiter: TokenLimiter::with_clock(LimiterClock::following(&clock)),
                redis_limiter,
                failed_auth: ArcSwap::from_pointee(failed),
                unknown_lookups: ArcSwap::from_pointee(unknown),
                metrics: Metrics::default(),
                client: proxy::client(),
                clock,
                last_used: DashMap::new(),
                boot_id: rand::random::<u64>(),
                request_seq: AtomicU64::new(0),
                change_seq: AtomicU64::new(change_seq),
                last_poll_ok: AtomicU64::new(now as u64),
                outbox_sent: AtomicI64::new(0),
                health: Default::default(),
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
                .store(Arc::new(address_limiter(&config, &self.inner.clock)));
            self.inner
                .unknown_lookups
                .store(Arc::new(address_limiter(&config, &self.inner.clock)));
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

    /// The upstream connection pool (tests: wait until it has seen an upstream's close).
    #[doc(hidden)]
    pub fn upstream_pool(&self) -> &UpstreamClient {
        &self.inner.client
    }

    /// Now (ms).
    pub fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
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
                    crate::coalesced!(error, "session_lookup_failed", error = %e, "session token lookup failed: answering 503");
                    Reject::StoreUnavailable
                }
            })?;
        auth::judge_row(&row, self.now_ms(), client_ip)?;
        Ok(row)
    }

    pub(crate) fn next_request_id(&self) -> String {
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
                gw.inner.unknown_lookups.load().compact();
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
}

/// A per-address limiter on the failed-auth quota (`rate_limit.failed_auth_*`).
fn address_limiter(config: &Config, clock: &Clock) -> FailedAuthLimiter<LimiterClock> {
    FailedAuthLimiter::with_clock(
        config.rate_limit.failed_auth_per_minute,
        config.rate_limit.failed_auth_max_clients,
        LimiterClock::following(clock),
    )
}
