//! Rate limits (SPEC §4): a GCRA limiter per token, and a per-client-IP limiter on failed
//! authentication whose memory stays bounded under a flood of new addresses.
//!
//! Owns: [`Rate`] (config re-uses it), the in-process limiters, and — in [`redis`] — the limits
//! exact across replicas with their own options type.
//! Never imports: `config` (config converts into these types at the edge), `gateway`, `cli`,
//! `admin`; the only other module of ours it uses is `store`, for `redact_url` in log lines.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed, keyed::DefaultKeyedStateStore};
use governor::{Quota, RateLimiter};

pub mod redis;

/// A rate: requests per second and burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained rate.
    pub requests_per_second: f64,
    /// Burst size.
    pub burst: u32,
}

impl From<Rate> for crate::store::RateOverride {
    fn from(r: Rate) -> Self {
        crate::store::RateOverride {
            requests_per_second: r.requests_per_second,
            burst: r.burst,
        }
    }
}

/// Result of an allowed check: what goes into the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    /// `RateLimit-Limit`: the burst size.
    pub limit: u32,
    /// `RateLimit-Remaining`.
    pub remaining: u32,
    /// `RateLimit-Reset`: seconds until the bucket is full again.
    pub reset_secs: u64,
}

/// A refused check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    /// Burst size.
    pub limit: u32,
    /// Seconds until one request is allowed again (rounded up, at least 1).
    pub retry_after: u64,
}

fn quota(rate: Rate) -> Quota {
    let period =
        Duration::from_secs_f64(1.0 / rate.requests_per_second).max(Duration::from_nanos(1));
    Quota::with_period(period)
        .expect("non-zero period")
        .allow_burst(NonZeroU32::new(rate.burst.max(1)).expect("non-zero"))
}

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

/// The gateway's limiters' clock: governor's monotonic clock, moved forward by the gateway
/// clock's offset ([`crate::clock::Clock::offset`]; zero outside tests), so a test that advances
/// the gateway clock refills buckets and ends blocks without sleeping.
#[derive(Clone, Debug, Default)]
pub struct LimiterClock {
    base: DefaultClock,
    offset_ms: Arc<AtomicI64>,
}

impl LimiterClock {
    /// A clock following the offset of `clock`.
    pub fn following(clock: &crate::clock::Clock) -> Self {
        LimiterClock {
            base: DefaultClock::default(),
            offset_ms: clock.offset(),
        }
    }
}

impl Clock for LimiterClock {
    type Instant = <DefaultClock as Clock>::Instant;

    fn now(&self) -> Self::Instant {
        let offset = self.offset_ms.load(Ordering::Relaxed).max(0) as u64;
        self.base.now() + Nanos::from(Duration::from_millis(offset))
    }
}

struct Bucket<C: Clock> {
    rate: Rate,
    limiter: Direct<C>,
}

/// Per-token limiters, keyed by token id. Each token gets its own GCRA state with its own rate
/// (override, else role, else default); a changed rate (config reload) replaces the state.
pub struct TokenLimiter<C: Clock = DefaultClock> {
    clock: C,
    /// DashMap: lookups of different tokens never contend.
    buckets: DashMap<Arc<str>, Arc<Bucket<C>>>,
    limited: AtomicU64,
}

impl TokenLimiter<DefaultClock> {
    /// Limiter on the real clock.
    pub fn new() -> Self {
        Self::with_clock(DefaultClock::default())
    }
}

impl Default for TokenLimiter<DefaultClock> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: Clock + Clone> TokenLimiter<C> {
    /// Limiter on a given clock (tests use governor's `FakeRelativeClock`).
    pub fn with_clock(clock: C) -> Self {
        TokenLimiter {
            clock,
            buckets: DashMap::new(),
            limited: AtomicU64::new(0),
        }
    }

    fn bucket(&self, token_id: &str, rate: Rate) -> Arc<Bucket<C>> {
        if let Some(b) = self.buckets.get(token_id) {
            if b.rate == rate {
                return b.clone();
            }
        }
        let fresh = || {
            Arc::new(Bucket {
                rate,
                limiter: RateLimiter::direct_with_clock(quota(rate), self.clock.clone())
                    .with_middleware::<StateInformationMiddleware>(),
            })
        };
        // Through the entry (shard lock held): concurrent first requests of one token must share
        // one bucket, or each would get a full burst of its own.
        self.buckets
            .entry(Arc::from(token_id))
            .and_modify(|b| {
                if b.rate != rate {
                    *b = fresh();
                }
            })
            .or_insert_with(fresh)
            .clone()
    }

    /// Takes one cell for `token_id` at `rate`.
    pub fn check(&self, token_id: &str, rate: Rate) -> Result<Allowance, Denied> {
        let b = self.bucket(token_id, rate);
        match b.limiter.check() {
            Ok(snap) => {
                let remaining = snap.remaining_burst_capacity();
                let missing = rate.burst.saturating_sub(remaining) as f64;
                Ok(Allowance {
                    limit: rate.burst,
                    remaining,
                    reset_secs: (missing / rate.requests_per_second).ceil() as u64,
                })
            }
            Err(not_until) => {
                self.limited.fetch_add(1, Ordering::Relaxed);
                let wait = not_until.wait_time_from(self.clock.now());
                Err(Denied {
                    limit: rate.burst,
                    retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
                })
            }
        }
    }

    /// Forget a token (revoked).
    pub fn forget(&self, token_id: &str) {
        self.buckets.remove(token_id);
    }

    /// Requests refused so far.
    pub fn limited_count(&self) -> u64 {
        self.limited.load(Ordering::Relaxed)
    }
}

/// Client key for the failed-auth limiter: IPv4 address, or the IPv6 /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        },
    }
}

type Keyed<C> = RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, C, StateInformationMiddleware>;

fn keyed<C: Clock>(quota: Quota, clock: C) -> Keyed<C> {
    RateLimiter::dashmap_with_clock(quota, clock).with_middleware::<StateInformationMiddleware>()
}

/// Failed-authentication limiter per client IP (IPv6 by /64).
///
/// Failures consume cells of a `failed_auth_per_minute` quota; a client that runs out is blocked
/// until its bucket refills, and blocked clients are answered 429 before any token lookup.
/// Memory: at most `max_clients` keys in each map; past that, keys back at a fresh state are
/// dropped (`retain_recent` + `shrink_to_fit`), and if the flood is still larger, the state is
/// replaced by an empty one (a flood of new addresses cannot grow memory without bound).
pub struct FailedAuthLimiter<C: Clock = DefaultClock> {
    clock: C,
    quota: Quota,
    /// ArcSwap so an overflowing state can be replaced without a lock on the request path.
    limiter: ArcSwap<Keyed<C>>,
    blocked: DashMap<IpAddr, C::Instant>,
    max_clients: usize,
    overflows: AtomicU64,
}

impl FailedAuthLimiter<DefaultClock> {
    /// Limiter on the real clock.
    pub fn new(per_minute: u32, max_clients: usize) -> Self {
        Self::with_clock(per_minute, max_clients, DefaultClock::default())
    }
}

impl<C: Clock + Clone> FailedAuthLimiter<C> {
    /// Limiter on a given clock.
    pub fn with_clock(per_minute: u32, max_clients: usize, clock: C) -> Self {
        let quota = Quota::per_minute(NonZeroU32::new(per_minute.max(1)).expect("non-zero"));
        FailedAuthLimiter {
            limiter: ArcSwap::from_pointee(keyed(quota, clock.clone())),
            quota,
            clock,
            blocked: DashMap::new(),
            max_clients: max_clients.max(1),
            overflows: AtomicU64::new(0),
        }
    }

    /// Step 2: is this client currently blocked? Returns seconds to wait.
    pub fn blocked(&self, ip: IpAddr) -> Option<u64> {
        if self.blocked.is_empty() {
            return None;
        }
        let key = client_key(ip);
        let until = *self.blocked.get(&key)?;
        let now = self.clock.now();
        if until > now {
            let wait: Duration = until.duration_since(now).into();
            Some(wait.as_secs_f64().ceil().max(1.0) as u64)
        } else {
            self.blocked.remove(&key);
            None
        }
    }

    /// Records one failed authentication from `ip`.
    pub fn record_failure(&self, ip: IpAddr) {
        let key = client_key(ip);
        let limiter = self.limiter.load();
        let limiter = if limiter.len() >= self.max_clients {
            self.compact();
            self.limiter.load()
        } else {
            limiter
        };
        let until = match limiter.check_key(&key) {
            Ok(snap) if snap.remaining_burst_capacity() > 0 => return,
            // That failure used the last cell: the client is blocked now, so its next request is
            // answered 429 without a lookup (the quota counts failures, not failures + 1). The
            // probe is refused, so it consumes nothing; it only tells when a cell is free again.
            Ok(_) => match limiter.check_key(&key) {
                Err(not_until) => not_until.earliest_possible(),
                // A cell freed up in between (and the probe took it): still within the quota.
                Ok(_) => return,
            },
            Err(not_until) => not_until.earliest_possible(),
        };
        if self.blocked.len() >= self.max_clients {
            let now = self.clock.now();
            self.blocked.retain(|_, blocked_until| *blocked_until > now);
            if self.blocked.len() >= self.max_clients {
                self.overflows.fetch_add(1, Ordering::Relaxed);
                self.blocked.clear();
                self.blocked.shrink_to_fit();
            }
        }
        self.blocked.insert(key, until);
    }

    /// Drops keys whose state is back to fresh and gives memory back; starts over if still over
    /// the cap. Also run periodically by the gateway.
    pub fn compact(&self) {
        let limiter = self.limiter.load();
        limiter.retain_recent();
        limiter.shrink_to_fit();
        if limiter.len() >= self.max_clients {
            self.overflows.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                clients = limiter.len(),
                cap = self.max_clients,
                "failed-auth limiter over its client cap; forgetting tracked clients"
            );
            self.limiter
                .store(Arc::new(keyed(self.quota, self.clock.clone())));
        }
        let now = self.clock.now();
        self.blocked.retain(|_, until| *until > now);
        self.blocked.shrink_to_fit();
    }

    /// Tracked client keys (limiter state, blocked list).
    pub fn tracked(&self) -> (usize, usize) {
        (self.limiter.load().len(), self.blocked.len())
    }

    /// Times the cap forced forgetting.
    pub fn overflow_count(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn the_limiter_clock_follows_the_gateway_clock() {
        let gateway = crate::clock::Clock::default();
        let clock = LimiterClock::following(&gateway);
        let before = clock.now();
        gateway.advance_ms(90_000);
        let moved: Duration = clock.now().duration_since(before).into();
        assert!(moved >= Duration::from_secs(90), "{moved:?}");
        // A limiter on it: a blocked address (1 failure a minute) is judged again after the
        // gateway clock moved a minute on.
        let f = FailedAuthLimiter::with_clock(1, 1000, LimiterClock::following(&gateway));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        f.record_failure(ip);
        assert!(f.blocked(ip).is_some());
        gateway.advance_ms(60_000);
        assert_eq!(f.blocked(ip), None);
    }

    fn rate(requests_per_second: f64, burst: u32) -> Rate {
        Rate {
            requests_per_second,
            burst,
        }
    }

    /// A token limiter on a fake clock the test advances.
    fn limiter() -> (FakeRelativeClock, TokenLimiter<FakeRelativeClock>) {
        let clock = FakeRelativeClock::default();
        (clock.clone(), TokenLimiter::with_clock(clock))
    }

    #[test]
    fn one_token_bursts_into_429_while_another_is_unaffected_and_it_refills() {
        let (clock, l) = limiter();
        let rate = rate(2.0, 3);
        for expect_remaining in [2, 1, 0] {
            let a = l.check("tok_a", rate).unwrap();
            assert_eq!(a.limit, 3);
            assert_eq!(a.remaining, expect_remaining);
        }
        let d = l.check("tok_a", rate).unwrap_err();
        assert_eq!(d.retry_after, 1);
        assert_eq!(d.limit, 3);
        assert_eq!(l.check("tok_b", rate).unwrap().remaining, 2);
        clock.advance(Duration::from_millis(500));
        assert_eq!(l.check("tok_a", rate).unwrap().remaining, 0);
        assert!(l.check("tok_a", rate).is_err());
        clock.advance(Duration::from_secs(2));
        let a = l.check("tok_a", rate).unwrap();
        assert_eq!(a.remaining, 2);
        assert_eq!(a.reset_secs, 1);
        assert_eq!(l.limited_count(), 2);
    }

    #[test]
    fn a_fast_override_refills_within_milliseconds_and_reset_counts_to_full() {
        let (clock, l) = limiter();
        let fast = rate(1000.0, 3);
        for _ in 0..3 {
            l.check("t", fast).unwrap();
        }
        let d = l.check("t", fast).unwrap_err();
        assert_eq!(d.retry_after, 1, "rounded up to whole seconds, at least 1");
        clock.advance(Duration::from_millis(1));
        let a = l.check("t", fast).unwrap();
        assert_eq!(a.remaining, 0);
        clock.advance(Duration::from_millis(3));
        let a = l.check("t", fast).unwrap();
        assert_eq!((a.limit, a.remaining, a.reset_secs), (3, 2, 1));
        // A slow rate: reset is the time until the whole burst is back.
        let slow = rate(0.5, 4);
        let a = l.check("s", slow).unwrap();
        assert_eq!((a.remaining, a.reset_secs), (3, 2));
        l.check("s", slow).unwrap();
        let a = l.check("s", slow).unwrap();
        assert_eq!((a.remaining, a.reset_secs), (1, 6));
    }

    #[test]
    fn concurrent_first_requests_of_a_token_share_one_burst() {
        for round in 0..20 {
            let l = Arc::new(TokenLimiter::with_clock(FakeRelativeClock::default()));
            let rate = rate(1.0, 5);
            let barrier = Arc::new(std::sync::Barrier::new(8));
            let allowed: usize = (0..8)
                .map(|_| {
                    let (l, barrier) = (l.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        (0..4).filter(|_| l.check("tok", rate).is_ok()).count()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .sum();
            assert_eq!(
                allowed, 5,
                "round {round}: the burst is exact under concurrency"
            );
        }
    }

    #[test]
    fn a_changed_rate_takes_effect() {
        let l = TokenLimiter::with_clock(FakeRelativeClock::default());
        assert!(l.check("t", rate(1.0, 1)).is_ok());
        assert!(l.check("t", rate(1.0, 1)).is_err());
        assert!(l.check("t", rate(1.0, 5)).is_ok());
    }

    #[test]
    fn failed_auth_blocks_after_the_quota_and_unblocks() {
        let clock = FakeRelativeClock::default();
        let f = FailedAuthLimiter::with_clock(3, 1000, clock.clone());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..3 {
            assert!(f.blocked(ip).is_none());
            f.record_failure(ip);
        }
        // The third failure used the quota up: the next request is refused before any lookup.
        let wait = f.blocked(ip).unwrap();
        assert_eq!(wait, 20, "one cell every 60 s / 3");
        assert!(f.blocked("192.0.2.8".parse().unwrap()).is_none());
        clock.advance(Duration::from_secs(19));
        assert_eq!(f.blocked(ip), Some(1));
        clock.advance(Duration::from_secs(1));
        assert!(f.blocked(ip).is_none());
        // One cell came back: exactly one more failure, then blocked again (3 a minute, not 4).
        f.record_failure(ip);
        assert_eq!(f.blocked(ip), Some(20));
        clock.advance(Duration::from_secs(60));
        for _ in 0..3 {
            assert!(f.blocked(ip).is_none());
            f.record_failure(ip);
        }
        assert!(f.blocked(ip).is_some());
    }

    #[test]
    fn ipv6_is_keyed_by_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_key(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
        let clock = FakeRelativeClock::default();
        let f = FailedAuthLimiter::with_clock(1, 1000, clock);
        f.record_failure(a);
        f.record_failure(b);
        assert!(f.blocked(a).is_some());
        assert!(f.blocked(c).is_none());
    }

    #[test]
    fn a_million_new_addresses_stay_under_the_cap() {
        let clock = FakeRelativeClock::default();
        let cap = 10_000;
        let f = FailedAuthLimiter::with_clock(20, cap, clock);
        for i in 0..1_000_000u32 {
            f.record_failure(IpAddr::V4(std::net::Ipv4Addr::from(
                i.wrapping_mul(2_654_435_761),
            )));
            let (tracked, blocked) = f.tracked();
            assert!(tracked <= cap && blocked <= cap);
        }
        assert!(f.overflow_count() > 0);
    }

    #[test]
    fn a_flood_of_blocked_addresses_stays_under_the_cap() {
        // Quota 1: every new address is blocked by its first failure, so both maps fill up.
        let clock = FakeRelativeClock::default();
        let cap = 5_000;
        let f = FailedAuthLimiter::with_clock(1, cap, clock);
        for i in 0..100_000u32 {
            f.record_failure(IpAddr::V6(Ipv6Addr::from(u128::from(i) << 64)));
            let (tracked, blocked) = f.tracked();
            assert!(tracked <= cap && blocked <= cap, "{tracked} {blocked}");
        }
        assert!(f.overflow_count() > 0);
    }
}
