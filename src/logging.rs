//! Coalescing of the operational log's per-request errors and warnings: while a dependency is
//! down (the audit disk, the store, Redis), every request fails the same way, and one line per
//! request would flood the log (78,299 lines in 20 s). Each *kind* of failure gets at most one
//! line per [`INTERVAL`]; the next line that is let through carries `suppressed`, the count of
//! lines of that kind left out since the previous one.
//!
//! Use [`coalesced!`](crate::coalesced) at every site a request (or any per-event path) can
//! reach repeatedly: `coalesced!(error, "store_lookup", error = %e, "token lookup failed")`.
//! The metrics, not the log, count every occurrence.
//!
//! Owns only its table of kinds; imports nothing from the crate.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// At most one line per kind per this interval.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Per-kind state: when the next line may go out, and how many were held back meanwhile.
///
/// Time is milliseconds on any clock that does not go backwards much: [`Coalescer::allow_at`]
/// takes an `Instant`, [`Coalescer::allow_at_ms`] a timestamp in ms, e.g. the gateway's clock,
/// which tests can advance. Use one kind of time per coalescer.
#[derive(Debug)]
pub struct Coalescer {
    kinds: Mutex<HashMap<&'static str, Slot>>,
    interval_ms: i64,
    /// The origin of [`Coalescer::allow_at`]'s instants.
    base: Instant,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer::new(INTERVAL)
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    next_ms: i64,
    suppressed: u64,
}

impl Coalescer {
    /// A coalescer letting one line per kind through per `interval`.
    pub fn new(interval: Duration) -> Self {
        Coalescer {
            kinds: Mutex::new(HashMap::new()),
            interval_ms: i64::try_from(interval.as_millis()).unwrap_or(i64::MAX),
            base: Instant::now(),
        }
    }

    /// Whether a line of `kind` may be logged at `now`: `Some(suppressed)` (the lines of this
    /// kind left out since the last one) or `None` (leave it out; it is counted).
    pub fn allow_at(&self, kind: &'static str, now: Instant) -> Option<u64> {
        let ms = now.saturating_duration_since(self.base).as_millis();
        self.allow_at_ms(kind, i64::try_from(ms).unwrap_or(i64::MAX))
    }

    /// [`Coalescer::allow_at`] with the time as milliseconds (e.g. `Gateway::now_ms`).
    pub fn allow_at_ms(&self, kind: &'static str, now_ms: i64) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(PoisonError::into_inner);
        let next_ms = now_ms.saturating_add(self.interval_ms);
        match kinds.get_mut(kind) {
            Some(slot) if now_ms < slot.next_ms => {
                slot.suppressed += 1;
                None
            }
            Some(slot) => {
                let suppressed = std::mem::take(&mut slot.suppressed);
                slot.next_ms = next_ms;
                Some(suppressed)
            }
            None => {
                kinds.insert(
                    kind,
                    Slot {
                        next_ms,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

static GLOBAL: LazyLock<Coalescer> = LazyLock::new(|| Coalescer::new(INTERVAL));

/// [`Coalescer::allow_at`] on the process-wide coalescer, now.
pub fn allow(kind: &'static str) -> Option<u64> {
    GLOBAL.allow_at(kind, Instant::now())
}

/// Logs through `tracing` at most once per [`INTERVAL`] per `kind`, adding the fields
/// `kind` and `suppressed`: `coalesced!(warn, "upstream_tls", reason = %why, "upstream TLS failed")`.
#[macro_export]
macro_rules! coalesced {
    ($level:ident, $kind:expr, $($rest:tt)+) => {
        if let Some(suppressed) = $crate::logging::allow($kind) {
            tracing::$level!(kind = $kind, suppressed, $($rest)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_interval_with_the_count_of_the_rest() {
        let c = Coalescer::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(c.allow_at("audit", t0), Some(0));
        for i in 1..=500 {
            assert_eq!(c.allow_at("audit", t0 + Duration::from_millis(i)), None);
        }
        // Another kind is not held back by the first.
        assert_eq!(c.allow_at("store", t0), Some(0));
        assert_eq!(c.allow_at("audit", t0 + Duration::from_secs(10)), Some(500));
        assert_eq!(c.allow_at("audit", t0 + Duration::from_secs(11)), None);
        assert_eq!(c.allow_at("audit", t0 + Duration::from_secs(21)), Some(1));
    }

    #[test]
    fn milliseconds_from_any_clock_work_alike() {
        let c = Coalescer::new(Duration::from_secs(10));
        let t0 = 1_800_000_000_000;
        assert_eq!(c.allow_at_ms("conn", t0), Some(0));
        assert_eq!(c.allow_at_ms("conn", t0 + 1), None);
        assert_eq!(c.allow_at_ms("conn", t0 + 9_999), None);
        assert_eq!(c.allow_at_ms("conn", t0 + 10_000), Some(2));
    }
}
