//! Wall-clock time in milliseconds, with an offset tests can advance, and RFC 3339 formatting.

use std::sync::atomic::{AtomicI64, Ordering};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The gateway's wall clock: system time plus an offset (0 outside tests).
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    /// Now, in ms since the epoch.
    pub fn now_ms(&self) -> i64 {
        crate::store::system_now_ms() + self.offset_ms.load(Ordering::Relaxed)
    }

    /// Moves this clock forward (tests: expiry, rotation grace).
    #[doc(hidden)]
    pub fn advance_ms(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

/// Formats ms since the epoch as RFC 3339 UTC with millisecond precision (`2026-11-23T05:01:02.123Z`).
pub fn rfc3339(ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        ms.rem_euclid(1000)
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
    fn offset_moves_now() {
        let c = Clock::default();
        let a = c.now_ms();
        c.advance_ms(86_400_000);
        assert!(c.now_ms() - a >= 86_400_000);
    }
}
