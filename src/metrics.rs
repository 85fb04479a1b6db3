//! Prometheus metrics (text exposition format 0.0.4), kept in atomics so recording is lock-free
//! on the hot path.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

/// Histogram bucket upper bounds, in seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A fixed-bucket histogram.
pub struct Histogram {
    counts: [AtomicU64; 16],
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {cum}");
    }
}

/// Gauges read from other components at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Snapshot {
    /// Cache hits.
    pub cache_hits: u64,
    /// Cache misses.
    pub cache_misses: u64,
    /// Cached tokens.
    pub cache_size: u64,
    /// Active tokens in the store.
    pub active_tokens: u64,
    /// Tokens expiring within 7 days.
    pub expiring_7d: u64,
    /// Audit queue depth.
    pub audit_queue: u64,
    /// Audit write failures.
    pub audit_failures: u64,
    /// Audit lines written.
    pub audit_lines: u64,
    /// Requests refused by the per-token limiter.
    pub rate_limited: u64,
    /// Failed-auth limiter tracked keys.
    pub failed_auth_tracked: u64,
    /// Store lookups.
    pub store_lookups: u64,
    /// Store writes.
    pub store_writes: u64,
}

/// Counters owned by the gateway.
#[derive(Default)]
pub struct Metrics {
    requests: DashMap<(&'static str, &'static str, u16), AtomicU64>,
    /// Whole-request latency.
    pub request_latency: Histogram,
    /// Upstream response-head latency.
    pub upstream_latency: Histogram,
    /// Open client connections.
    pub open_connections: AtomicI64,
    /// Config reloads (ok).
    pub reloads_ok: AtomicU64,
    /// Config reloads refused.
    pub reloads_failed: AtomicU64,
}

impl Metrics {
    /// Counts one finished request.
    pub fn request(&self, decision: &'static str, reason: &'static str, status: u16) {
        let key = (decision, reason, status / 100);
        if let Some(c) = self.requests.get(&key) {
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.requests.entry(key).or_default().fetch_add(1, Ordering::Relaxed);
    }

    /// Renders everything in Prometheus text format.
    pub fn render(&self, snap: &Snapshot) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP tokengate_requests_total Requests handled on the public listener.\n# TYPE tokengate_requests_total counter\n");
        let mut rows: Vec<_> = self
            .requests
            .iter()
            .map(|e| (*e.key(), e.value().load(Ordering::Relaxed)))
            .collect();
        rows.sort();
        for ((decision, reason, class), n) in rows {
            let _ = writeln!(
                out,
                "tokengate_requests_total{{decision=\"{decision}\",reason=\"{reason}\",status_class=\"{class}xx\"}} {n}"
            );
        }
        self.request_latency
            .render(&mut out, "tokengate_request_duration_seconds", "Time from request head to response head.");
        self.upstream_latency
            .render(&mut out, "tokengate_upstream_duration_seconds", "Time the upstream took to answer with a response head.");
        let gauge = |out: &mut String, name: &str, kind: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        gauge(&mut out, "tokengate_cache_hits_total", "counter", "Token cache hits.", snap.cache_hits as f64);
        gauge(&mut out, "tokengate_cache_misses_total", "counter", "Token cache misses.", snap.cache_misses as f64);
        gauge(&mut out, "tokengate_cache_entries", "gauge", "Tokens in the cache.", snap.cache_size as f64);
        gauge(&mut out, "tokengate_active_tokens", "gauge", "Active tokens in the store.", snap.active_tokens as f64);
        gauge(&mut out, "tokengate_tokens_expiring_7d", "gauge", "Active tokens expiring within 7 days.", snap.expiring_7d as f64);
        gauge(&mut out, "tokengate_audit_queue_depth", "gauge", "Audit records waiting for the writer.", snap.audit_queue as f64);
        gauge(&mut out, "tokengate_audit_write_failures_total", "counter", "Failed audit write attempts.", snap.audit_failures as f64);
        gauge(&mut out, "tokengate_audit_lines_total", "counter", "Audit lines written.", snap.audit_lines as f64);
        gauge(&mut out, "tokengate_rate_limited_total", "counter", "Requests refused by per-token rate limits.", snap.rate_limited as f64);
        gauge(&mut out, "tokengate_failed_auth_tracked_clients", "gauge", "Client keys tracked by the failed-auth limiter.", snap.failed_auth_tracked as f64);
        gauge(&mut out, "tokengate_store_lookups_total", "counter", "Token lookups that reached the store.", snap.store_lookups as f64);
        gauge(&mut out, "tokengate_store_writes_total", "counter", "Write transactions on the store.", snap.store_writes as f64);
        gauge(&mut out, "tokengate_open_connections", "gauge", "Open client connections on the public listener.", self.open_connections.load(Ordering::Relaxed) as f64);
        gauge(&mut out, "tokengate_config_reloads_total", "counter", "Successful config reloads.", self.reloads_ok.load(Ordering::Relaxed) as f64);
        gauge(&mut out, "tokengate_config_reload_failures_total", "counter", "Refused config reloads.", self.reloads_failed.load(Ordering::Relaxed) as f64);
        out
    }
}
