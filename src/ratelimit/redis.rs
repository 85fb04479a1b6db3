//! Per-token rate limits exact across replicas (issue 10): GCRA in Redis, one atomic Lua script
//! per check, keyed by token id, on Redis's clock (replicas' clocks may differ; Redis's is one).
//!
//! When Redis cannot answer within `rate_limit.redis_timeout`, the check falls back to an
//! in-process limiter at limit/`rate_limit.replicas` (so N replicas together stay near the
//! limit), counts `tokengate_ratelimit_redis_fallback_total`, logs at most one line per 10 s, and
//! leaves Redis alone for a second before trying again (no timeout per request while it is down).
//!
//! Owns: [`RedisLimiter`] and its options type [`RedisOptions`] (config converts
//! `[rate_limit]` into it). Never imports: `config`, `gateway`, `cli`, `admin`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;

use super::{Allowance, Denied, Rate, TokenLimiter};
use crate::store::redact_url;

/// GCRA: the key holds the token's theoretical arrival time (µs, Redis clock). A request is
/// allowed when `now >= tat + interval - interval * burst`, i.e. at most `burst` at once and one
/// per `interval` sustained. Returns `{allowed, remaining, µs until full (allowed) or until the
/// next allowed request (refused)}`.
const GCRA_LUA: &str = r#"
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if now < allow_at then
  return {0, 0, math.ceil(allow_at - now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, math.floor((now - allow_at) / interval), math.ceil(new_tat - now)}
"#;

/// Key prefix in Redis.
const KEY_PREFIX: &str = "tokengate:rl:";
/// After a Redis failure, checks use the fallback this long before Redis is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What the Redis limiter needs to know (`[rate_limit]` `redis`, `redis_timeout`, `replicas`).
#[derive(Debug, Clone, PartialEq)]
pub struct RedisOptions {
    /// Redis URL; None = no Redis limiter (per-process limits only).
    pub url: Option<String>,
    /// Deadline for one Redis check.
    pub timeout: Duration,
    /// Replicas sharing the limits: the in-process fallback allows limit/`replicas` each.
    pub replicas: u32,
}

/// The Redis-backed limiter with its in-process fallback.
pub struct RedisLimiter {
    client: redis::Client,
    target: String,
    /// The shared connection; ArcSwap so a failed one is dropped and replaced without a lock.
    conn: ArcSwapOption<MultiplexedConnection>,
    /// Serialises reconnects (one at a time; others use the fallback meanwhile).
    connecting: tokio::sync::Mutex<()>,
    script: redis::Script,
    timeout: Duration,
    replicas: u32,
    fallback: TokenLimiter,
    fallbacks: AtomicU64,
    limited: AtomicU64,
    origin: Instant,
    /// ms since `origin` until which Redis is skipped (0 = try it).
    skip_until_ms: AtomicU64,
}

impl RedisLimiter {
    /// Builds one from its options; None when no URL is set. Connects lazily.
    pub fn from_options(cfg: &RedisOptions) -> Option<Arc<RedisLimiter>> {
        let url = cfg.url.as_deref()?;
        let client = match redis::Client::open(url) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(redis = %redact_url(url), error = %e, "unusable Redis URL: per-token limits are per replica");
                return None;
            }
        };
        Some(Arc::new(RedisLimiter {
            client,
            target: redact_url(url),
            conn: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            script: redis::Script::new(GCRA_LUA),
            timeout: cfg.timeout,
            replicas: cfg.replicas.max(1),
            fallback: TokenLimiter::new(),
            fallbacks: AtomicU64::new(0),
            limited: AtomicU64::new(0),
            origin: Instant::now(),
            skip_until_ms: AtomicU64::new(0),
        }))
    }

    /// Whether this limiter was built from these settings (reloads keep it when unchanged).
    pub fn matches(&self, cfg: &RedisOptions) -> bool {
        cfg.url.as_deref().map(redact_url).as_deref() == Some(self.target.as_str())
            && cfg.timeout == self.timeout
            && cfg.replicas.max(1) == self.replicas
    }

    /// Takes one cell for `token_id` at `rate` in Redis, or in the fallback when Redis cannot
    /// answer in time.
    pub async fn check(&self, token_id: &str, rate: Rate) -> Result<Allowance, Denied> {
        let now_ms = self.origin.elapsed().as_millis() as u64;
        if now_ms >= self.skip_until_ms.load(Ordering::Relaxed) {
            match tokio::time::timeout(self.timeout, self.check_redis(token_id, rate)).await {
                Ok(Ok(r)) => {
                    if r.is_err() {
                        self.limited.fetch_add(1, Ordering::Relaxed);
                    }
                    return r;
                }
                Ok(Err(e)) => self.failed(&e.to_string()),
                Err(_) => self.failed(&format!("no answer within {:?}", self.timeout)),
            }
        }
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        let share = Rate {
            requests_per_second: rate.requests_per_second / f64::from(self.replicas),
            burst: (rate.burst / self.replicas).max(1),
        };
        let r = self.fallback.check(token_id, share);
        if r.is_err() {
            self.limited.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    async fn connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        if let Some(c) = self.conn.load_full() {
            return Ok((*c).clone());
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.conn.load_full() {
            return Ok((*c).clone());
        }
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let c = self
            .client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await?;
        self.conn.store(Some(Arc::new(c.clone())));
        Ok(c)
    }

    async fn check_redis(
        &self,
        token_id: &str,
        rate: Rate,
    ) -> redis::RedisResult<Result<Allowance, Denied>> {
        let mut conn = self.connection().await?;
        let interval_us = (1e6 / rate.requests_per_second).max(1.0);
        let burst = rate.burst.max(1);
        let (allowed, remaining, wait_us): (i64, i64, i64) = self
            .script
            .key(format!("{KEY_PREFIX}{token_id}"))
            .arg(interval_us)
            .arg(burst)
            .invoke_async(&mut conn)
            .await?;
        let secs = |us: i64| (us.max(0) as u64).div_ceil(1_000_000);
        Ok(if allowed == 1 {
            Ok(Allowance {
                limit: burst,
                remaining: remaining.clamp(0, i64::from(burst)) as u32,
                reset_secs: secs(wait_us),
            })
        } else {
            Err(Denied {
                limit: burst,
                retry_after: secs(wait_us).max(1),
            })
        })
    }

    fn failed(&self, error: &str) {
        self.conn.store(None);
        let now = self.origin.elapsed();
        self.skip_until_ms
            .store((now + RETRY_AFTER).as_millis() as u64, Ordering::Relaxed);
        // One line per 10 s, with the count left out (the process-wide coalescing).
        if let Some(suppressed) = crate::logging::allow("redis_unreachable") {
            tracing::warn!(
                suppressed,
                redis = %self.target,
                error,
                replicas = self.replicas,
                "Redis unreachable: per-token limits fall back to limit/{} in this replica",
                self.replicas
            );
        }
    }

    /// Checks answered by the in-process fallback so far.
    pub fn fallback_count(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Requests refused so far (Redis or fallback).
    pub fn limited_count(&self) -> u64 {
        self.limited.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> RedisOptions {
        RedisOptions {
            url: Some(url.into()),
            replicas: 3,
            timeout: Duration::from_millis(200),
        }
    }

    #[tokio::test]
    async fn unreachable_redis_falls_back_to_a_share_of_the_limit() {
        // Port 1 refuses connections at once.
        let l = RedisLimiter::from_options(&cfg("redis://127.0.0.1:1/")).unwrap();
        let rate = Rate {
            requests_per_second: 0.001,
            burst: 9,
        };
        let mut allowed = 0;
        for _ in 0..10 {
            allowed += usize::from(l.check("tok_a", rate).await.is_ok());
        }
        assert_eq!(allowed, 3, "9 / 3 replicas");
        assert_eq!(l.fallback_count(), 10);
        assert_eq!(l.limited_count(), 7);
        assert!(l.matches(&cfg("redis://127.0.0.1:1/")));
        assert!(!l.matches(&RedisOptions {
            replicas: 2,
            ..cfg("redis://127.0.0.1:1/")
        }));
    }
}
