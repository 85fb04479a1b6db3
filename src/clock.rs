//! The gateway's one clock and its one RFC 3339 formatter.
//!
//! Owns wall-clock time in milliseconds since the epoch ([`system_now_ms`], and [`Clock`]: system
//! time plus an offset tests can advance), and formatting ([`rfc3339`], [`now_rfc3339`]) and
//! parsing ([`parse_rfc3339`]) of RFC 3339 instants. Every timestamp the gateway prints or logs
//! (audit lines included) comes from here.
//!
//! Imports nothing of ours: every module may use it, it uses none of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Milliseconds since the Unix epoch, from the system clock.
pub fn system_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The gateway's wall clock: system time plus an offset (0 outside tests).
#[derive(Debug, Default)]
pub struct Clock {
    /// Shared with the clocks that follow this one ([`Clock::offset`]: the rate limiters').
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// Now, in ms since the epoch.
    pub fn now_ms(&self) -> i64 {
        system_now_ms() + self.offset_ms.load(Ordering::Relaxed)
    }

    /// Moves this clock forward (tests: expiry, rotation grace, rate limits).
    #[doc(hidden)]
    pub fn advance_ms(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// The offset this clock adds to system time, shared: a monotonic clock elsewhere (the rate
    /// limiters') adds it too, so advancing this clock advances that one.
    pub fn offset(&self) -> Arc<AtomicI64> {
        self.offset_ms.clone()
    }
}

/// System time now as RFC 3339 UTC with milliseconds (`2026-11-23T05:01:02.123Z`): the
/// timestamp of audit lines, formatted once per request.
pub fn now_rfc3339() -> String {
    rfc3339(system_now_ms())
}

/// Formats ms since the epoch as RFC 3339 UTC with millisecond precision (`2026-11-23T05:01:02.123Z`).
///
/// Hot (once per audited request): the `YYYY-MM-DDTHH:MM:SS` part is formatted once per second
/// per thread and reused, so the common case is one small allocation and three digits.
pub fn rfc3339(ms: i64) -> String {
    thread_local! {
        static SECOND: std::cell::Cell<(i64, [u8; 19])> =
            const { std::cell::Cell::new((i64::MIN, [0; 19])) };
    }
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000) as u32;
    let prefix = SECOND.with(|c| {
        let (cached, p) = c.get();
        if cached == secs {
            return Some(p);
        }
        // Only four-digit years fit the cache; others take the slow path below.
        let p: [u8; 19] = format_second(secs).as_bytes().try_into().ok()?;
        c.set((secs, p));
        Some(p)
    });
    match prefix.as_ref().and_then(|p| std::str::from_utf8(p).ok()) {
        Some(p) => {
            let mut out = String::with_capacity(24);
            out.push_str(p);
            out.push('.');
            out.push(char::from(b'0' + (milli / 100) as u8));
            out.push(char::from(b'0' + (milli / 10 % 10) as u8));
            out.push(char::from(b'0' + (milli % 10) as u8));
            out.push('Z');
            out
        }
        None => format!("{}.{milli:03}Z", format_second(secs)),
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of a second since the epoch (the epoch itself when out of range).
fn format_second(secs: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
    )
}

/// Parses RFC 3339 into ms since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_milliseconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
        assert_eq!(
            parse_rfc3339("2026-11-18T11:06:40.123Z"),
            Some(1_795_000_000_123)
        );
    }

    #[test]
    fn timestamp_is_utc_with_milliseconds() {
        let t = time::macros::datetime!(2026-11-23 05:01:02.123456 UTC);
        let t = rfc3339((t.unix_timestamp_nanos() / 1_000_000) as i64);
        assert_eq!(t, "2026-11-23T05:01:02.123Z");
        let now = now_rfc3339();
        assert_eq!(now.len(), 24, "{now}");
        assert!(now.ends_with('Z'));
        assert!(OffsetDateTime::parse(&now, &Rfc3339).is_ok());
    }

    #[test]
    fn cached_second_formatting_matches_the_full_formatter() {
        // An independent formatter (the `time` crate's) as the reference.
        let format_timestamp = |t: OffsetDateTime| {
            let fmt = time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            );
            t.format(&fmt).unwrap()
        };
        // Same second twice (cache hit), the next second, a leap day, a year boundary, the epoch.
        let cases: [(i64, u32); 7] = [
            (1_795_410_062, 123),
            (1_795_410_062, 7),
            (1_795_410_063, 999),
            (1_709_164_799, 0),
            (1_735_689_599, 999),
            (1_735_689_600, 1),
            (0, 0),
        ];
        for (secs, ms) in cases {
            let t = OffsetDateTime::from_unix_timestamp(secs).unwrap()
                + time::Duration::milliseconds(ms.into());
            let formatted = rfc3339(secs * 1000 + i64::from(ms));
            assert_eq!(formatted, format_timestamp(t), "{secs}.{ms}");
        }
        // Before the epoch, and outside four-digit years (not cached).
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(253_402_300_800_000), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn offset_moves_now() {
        let c = Clock::default();
        let a = c.now_ms();
        c.advance_ms(86_400_000);
        assert!(c.now_ms() - a >= 86_400_000);
    }
}
