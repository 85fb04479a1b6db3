//! Prometheus metrics (text exposition format 0.0.4), kept in atomics so recording is lock-free
//! on the hot path. Every metric is listed with its meaning in `docs/operations.md`.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;

/// Histogram bucket upper bounds, in seconds (from 0.5 ms to 30 s: a gateway's own overhead is
/// sub-millisecond, upstreams take up to their timeout).
pub const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Bucket slots: one per bound plus the overflow (`+Inf`) slot.
const SLOTS: usize = BUCKETS.len() + 1;

/// A fixed-bucket histogram.
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is above the highest bound.
    counts: [AtomicU64; SLOTS],
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
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Writes the `_bucket`, `_sum` and `_count` samples; `labels` is `""` or `k="v",` pairs
    /// ending in a comma.
    fn render_samples(&self, out: &mut String, name: &str, labels: &str) {
        // Read every slot once so the buckets, +Inf and _count agree even under concurrent writes.
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let mut cum = 0;
        for (b, n) in BUCKETS.iter().zip(&counts) {
            cum += n;
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{b}\"}} {cum}");
        }
        cum += counts[BUCKETS.len()];
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {cum}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", l.trim_end_matches(','))
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {cum}", braces(labels));
    }
}

/// Values read from other components at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Snapshot {
    /// Cache hits.
    pub cache_hits: u64,
    /// Cache misses.
    pub cache_misses: u64,
    /// Cached tokens.
    pub cache_size: u64,
    /// Whether the store passed the readiness check at this scrape (`None`: not asked).
    pub store_up: Option<bool>,
    /// Active tokens in the store (`None` when the store could not be read: the sample is left
    /// out rather than reported as 0).
    pub active_tokens: Option<u64>,
    /// Active tokens expiring within 7 days (`None` as above).
    pub expiring_7d: Option<u64>,
    /// Audit queue depth.
    pub audit_queue: u64,
    /// Audit write failures.
    pub audit_failures: u64,
    /// Audit lines written.
    pub audit_lines: u64,
    /// Whether the audit writer's last write succeeded (`None`: not asked).
    pub audit_healthy: Option<bool>,
    /// Requests refused by the per-token limiter.
    pub rate_limited: u64,
    /// Failed-auth limiter tracked keys.
    pub failed_auth_tracked: u64,
    /// Per-token checks answered by the in-process fallback because Redis could not.
    pub redis_fallbacks: u64,
    /// Store lookups.
    pub store_lookups: u64,
    /// Store writes.
    pub store_writes: u64,
}

/// Token counts from the store, cached between scrapes (see `admin::metrics`).
#[derive(Debug, Clone, Copy)]
pub struct TokenCounts {
    /// When they were counted.
    pub at: Instant,
    /// Active tokens.
    pub active: u64,
    /// Active tokens expiring within 7 days.
    pub expiring_7d: u64,
}

/// Counters owned by the gateway.
pub struct Metrics {
    /// Finished requests by (route, decision, reason, status / 100); `-` is the route of requests
    /// no route served. DashMap: the key set is small and fixed after warm-up, so the hot path
    /// is a shard read lock and an atomic add.
    requests: DashMap<(Arc<str>, &'static str, &'static str, u16), AtomicU64>,
    /// The `route` label of requests refused before routing, answered by the gateway itself, or
    /// on a path no route serves.
    no_route: Arc<str>,
    /// Whole-request latency.
    pub request_latency: Histogram,
    /// Upstream response-head latency per route name (bounded by the routes in the config).
    upstream_latency: DashMap<String, Histogram>,
    /// Requests being handled on the public listener right now.
    pub in_flight: AtomicI64,
    /// Open client connections.
    pub open_connections: AtomicI64,
    /// Config reloads (ok).
    pub reloads_ok: AtomicU64,
    /// Config reloads refused.
    pub reloads_failed: AtomicU64,
    /// Whether the last reload attempt succeeded (true before any).
    pub last_reload_ok: AtomicBool,
    /// Whether the listeners are bound and accepting (false before `run` and once draining).
    pub listening: AtomicBool,
    /// Connections that ended with an error, by [`HttpErrorKind`].
    http_errors: [AtomicU64; HttpErrorKind::ALL.len()],
    /// Connections the accept loop refused, by [`ConnLimit`].
    connections_refused: [AtomicU64; ConnLimit::ALL.len()],
    /// Set when the drain deadline passes: requests dropped from then on were cut by the
    /// shutdown (their audit reason says `shutdown`, not `client_closed`).
    pub shutdown_cut: AtomicBool,
    /// Requests served by the HTTP/1 fast path (`src/h1/`).
    pub h1_fast_path: AtomicU64,
    /// Connections the HTTP/1 fast path handed to hyper (something it does not cover).
    pub h1_declined: AtomicU64,
    /// Process start, Unix seconds.
    started_at: f64,
    /// Last token counts. A tokio mutex: the scrape holds it across the store query so that
    /// concurrent scrapes share one count.
    pub token_counts: tokio::sync::Mutex<Option<TokenCounts>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: DashMap::new(),
            no_route: Arc::from("-"),
            request_latency: Histogram::default(),
            upstream_latency: DashMap::new(),
            in_flight: AtomicI64::new(0),
            open_connections: AtomicI64::new(0),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            last_reload_ok: AtomicBool::new(true),
            listening: AtomicBool::new(false),
            http_errors: std::array::from_fn(|_| AtomicU64::new(0)),
            connections_refused: std::array::from_fn(|_| AtomicU64::new(0)),
            shutdown_cut: AtomicBool::new(false),
            h1_fast_path: AtomicU64::new(0),
            h1_declined: AtomicU64::new(0),
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64().floor()),
            token_counts: tokio::sync::Mutex::new(None),
        }
    }
}

/// Why a client connection ended with an error (`tokengate_http_errors_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpErrorKind {
    /// hyper could not parse the request head (bad method, header, URI or version, two
    /// different `Content-Length`s, obs-fold, TLS bytes on a plain listener): it answered 400.
    BadRequest,
    /// Request head larger than hyper's buffer, or more than 100 header fields: 431.
    HeadTooLarge,
    /// Request target longer than hyper's buffer: 414.
    UriTooLong,
    /// No complete request head within `server.header_read_timeout`: closed, no response.
    HeaderTimeout,
    /// The client accepted no byte for `server.body_idle_timeout` while a response was being
    /// written to it: cut.
    SendTimeout,
}

impl HttpErrorKind {
    /// Every kind, in the order of the counters.
    pub const ALL: [HttpErrorKind; 5] = [
        HttpErrorKind::BadRequest,
        HttpErrorKind::HeadTooLarge,
        HttpErrorKind::UriTooLong,
        HttpErrorKind::HeaderTimeout,
        HttpErrorKind::SendTimeout,
    ];

    /// The `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            HttpErrorKind::BadRequest => "bad_request",
            HttpErrorKind::HeadTooLarge => "head_too_large",
            HttpErrorKind::UriTooLong => "uri_too_long",
            HttpErrorKind::HeaderTimeout => "header_timeout",
            HttpErrorKind::SendTimeout => "send_timeout",
        }
    }

    /// The status hyper answered a request it refused itself with; `None` when no request was
    /// refused (nothing was answered).
    pub fn refusal_status(self) -> Option<u16> {
        match self {
            HttpErrorKind::BadRequest => Some(400),
            HttpErrorKind::HeadTooLarge => Some(431),
            HttpErrorKind::UriTooLong => Some(414),
            HttpErrorKind::HeaderTimeout | HttpErrorKind::SendTimeout => None,
        }
    }
}

/// The limit a refused connection hit (`tokengate_connections_refused_total{limit}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnLimit {
    /// `server.max_connections_per_ip`: the client address already held that many.
    PerIp,
    /// `server.max_connections`: the listener already held that many.
    Total,
}

impl ConnLimit {
    /// Every limit, in the order of the counters.
    pub const ALL: [ConnLimit; 2] = [ConnLimit::PerIp, ConnLimit::Total];

    /// The `limit` label.
    pub fn label(self) -> &'static str {
        match self {
            ConnLimit::PerIp => "per_ip",
            ConnLimit::Total => "total",
        }
    }

    /// The config key that sets it.
    pub fn config_key(self) -> &'static str {
        match self {
            ConnLimit::PerIp => "server.max_connections_per_ip",
            ConnLimit::Total => "server.max_connections",
        }
    }
}

/// Counts a request as in flight until dropped (also when the request future is cancelled).
#[must_use = "the request counts as in flight only while the guard lives"]
pub struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Counts one finished request of `route` (`None`: refused before routing, the gateway's
    /// own endpoints, or a path no route serves: counted as route `-`).
    pub fn request(
        &self,
        route: Option<&Arc<str>>,
        decision: &'static str,
        reason: &'static str,
        status: u16,
    ) {
        let route = route.unwrap_or(&self.no_route).clone();
        let key = (route, decision, reason, status / 100);
        if let Some(c) = self.requests.get(&key) {
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.requests
            .entry(key)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one connection that ended with an error of `kind`.
    pub fn http_error(&self, kind: HttpErrorKind) {
        self.http_errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections counted so far for `kind`.
    pub fn http_errors(&self, kind: HttpErrorKind) -> u64 {
        self.http_errors[kind as usize].load(Ordering::Relaxed)
    }

    /// Counts one connection refused at `limit`.
    pub fn connection_refused(&self, limit: ConnLimit) {
        self.connections_refused[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections refused so far at `limit`.
    pub fn connections_refused(&self, limit: ConnLimit) -> u64 {
        self.connections_refused[limit as usize].load(Ordering::Relaxed)
    }

    /// Marks one request as in flight for the guard's lifetime.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    /// Records how long the upstream of `route` took to answer with a response head.
    pub fn upstream(&self, route: &str, d: Duration) {
        if let Some(h) = self.upstream_latency.get(route) {
            h.observe(d);
            return;
        }
        self.upstream_latency
            .entry(route.to_string())
            .or_default()
            .observe(d);
    }

    /// Requests counted so far for one (decision, reason, status class), summed over routes.
    pub fn requests_count(&self, decision: &str, reason: &str, status_class: u16) -> u64 {
        self.requests
            .iter()
            .filter(|e| e.key().1 == decision && e.key().2 == reason && e.key().3 == status_class)
            .map(|e| e.value().load(Ordering::Relaxed))
            .sum()
    }

    /// Renders everything in Prometheus text format 0.0.4.
    pub fn render(&self, snap: &Snapshot) -> String {
        let mut out = String::with_capacity(8192);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let flag = |b: bool| if b { 1.0 } else { 0.0 };

        render_process(&mut out);
        header(
            &mut out,
            "tokengate_build_info",
            "gauge",
            "Always 1; the version label names the running build.",
        );
        let _ = writeln!(
            out,
            "tokengate_build_info{{version=\"{}\"}} 1",
            escape_label(env!("CARGO_PKG_VERSION"))
        );
        single(
            &mut out,
            "tokengate_process_start_time_seconds",
            "gauge",
            "Start time of the process, Unix seconds.",
            self.started_at,
        );
        single(
            &mut out,
            "tokengate_listening",
            "gauge",
            "1 while the listeners are bound and accepting; 0 before start and while draining.",
            flag(self.listening.load(Ordering::Relaxed)),
        );

        header(
            &mut out,
            "tokengate_requests_total",
            "counter",
            "Requests handled on the public listener, by decision, reason, route and status class.",
        );
        let mut rows: Vec<_> = self
            .requests
            .iter()
            .map(|e| (e.key().clone(), e.value().load(Ordering::Relaxed)))
            .collect();
        rows.sort();
        for ((route, decision, reason, class), n) in rows {
            let _ = writeln!(
                out,
                "tokengate_requests_total{{decision=\"{}\",reason=\"{}\",route=\"{}\",status_class=\"{class}xx\"}} {n}",
                escape_label(decision),
                escape_label(reason),
                escape_label(&route),
            );
        }
        single(
            &mut out,
            "tokengate_requests_in_flight",
            "gauge",
            "Requests being handled on the public listener.",
            self.in_flight.load(Ordering::Relaxed) as f64,
        );

        let name = "tokengate_request_duration_seconds";
        header(
            &mut out,
            name,
            "histogram",
            "Time from request head to response head, every request.",
        );
        self.request_latency.render_samples(&mut out, name, "");
        let name = "tokengate_upstream_duration_seconds";
        header(
            &mut out,
            name,
            "histogram",
            "Time the upstream took to answer with a response head, by route.",
        );
        let mut routes: Vec<String> = self
            .upstream_latency
            .iter()
            .map(|e| e.key().clone())
            .collect();
        routes.sort();
        for route in routes {
            if let Some(h) = self.upstream_latency.get(&route) {
                let labels = format!("upstream=\"{}\",", escape_label(&route));
                h.render_samples(&mut out, name, &labels);
            }
        }

        single(
            &mut out,
            "tokengate_cache_hits_total",
            "counter",
            "Token lookups answered by the cache.",
            snap.cache_hits as f64,
        );
        single(
            &mut out,
            "tokengate_cache_misses_total",
            "counter",
            "Token lookups the cache could not answer.",
            snap.cache_misses as f64,
        );
        single(
            &mut out,
            "tokengate_cache_entries",
            "gauge",
            "Tokens in the cache.",
            snap.cache_size as f64,
        );
        if let Some(up) = snap.store_up {
            single(
                &mut out,
                "tokengate_store_up",
                "gauge",
                "1 when the store passed the readiness check at this scrape.",
                flag(up),
            );
        }
        if let Some(n) = snap.active_tokens {
            single(
                &mut out,
                "tokengate_active_tokens",
                "gauge",
                "Active tokens in the store (not revoked, expired or disabled); counted at most every 30 s.",
                n as f64,
            );
        }
        if let Some(n) = snap.expiring_7d {
            single(
                &mut out,
                "tokengate_tokens_expiring_7d",
                "gauge",
                "Active tokens that expire within 7 days; counted at most every 30 s.",
                n as f64,
            );
        }
        single(
            &mut out,
            "tokengate_store_lookups_total",
            "counter",
            "Token lookups that reached the store.",
            snap.store_lookups as f64,
        );
        single(
            &mut out,
            "tokengate_store_writes_total",
            "counter",
            "Write transactions on the store.",
            snap.store_writes as f64,
        );
        single(
            &mut out,
            "tokengate_audit_queue_depth",
            "gauge",
            "Audit records accepted but not yet written.",
            snap.audit_queue as f64,
        );
        single(
            &mut out,
            "tokengate_audit_write_failures_total",
            "counter",
            "Failed audit write attempts (each retry counts).",
            snap.audit_failures as f64,
        );
        single(
            &mut out,
            "tokengate_audit_lines_total",
            "counter",
            "Audit lines written by this process.",
            snap.audit_lines as f64,
        );
        if let Some(ok) = snap.audit_healthy {
            single(
                &mut out,
                "tokengate_audit_healthy",
                "gauge",
                "1 while audit writes succeed; 0 while they fail.",
                flag(ok),
            );
        }
        single(
            &mut out,
            "tokengate_rate_limited_total",
            "counter",
            "Requests refused by per-token rate limits.",
            snap.rate_limited as f64,
        );
        single(
            &mut out,
            "tokengate_ratelimit_redis_fallback_total",
            "counter",
            "Per-token rate-limit checks answered in process (limit/replicas) because Redis could not answer.",
            snap.redis_fallbacks as f64,
        );
        single(
            &mut out,
            "tokengate_failed_auth_tracked_clients",
            "gauge",
            "Client keys tracked by the failed-auth limiter.",
            snap.failed_auth_tracked as f64,
        );
        single(
            &mut out,
            "tokengate_open_connections",
            "gauge",
            "Open client connections on the public listener.",
            self.open_connections.load(Ordering::Relaxed) as f64,
        );
        by_label(
            &mut out,
            "tokengate_http_errors_total",
            "Client connections ended by an HTTP-level error, by kind (requests hyper refused itself, header read and send timeouts).",
            "kind",
            HttpErrorKind::ALL.map(|kind| (kind.label(), self.http_errors(kind))),
        );
        by_label(
            &mut out,
            "tokengate_connections_refused_total",
            "Client connections closed at accept because a connection limit was reached, by limit (per_ip: server.max_connections_per_ip; total: server.max_connections).",
            "limit",
            ConnLimit::ALL.map(|limit| (limit.label(), self.connections_refused(limit))),
        );
        single(
            &mut out,
            "tokengate_http1_fast_path_requests_total",
            "counter",
            "Requests served by the HTTP/1 fast path.",
            load(&self.h1_fast_path),
        );
        single(
            &mut out,
            "tokengate_http1_fast_path_declined_total",
            "counter",
            "Connections the HTTP/1 fast path handed to hyper.",
            load(&self.h1_declined),
        );
        single(
            &mut out,
            "tokengate_config_reloads_total",
            "counter",
            "Successful config reloads.",
            load(&self.reloads_ok),
        );
        single(
            &mut out,
            "tokengate_config_reload_failures_total",
            "counter",
            "Refused config reloads (the old config was kept).",
            load(&self.reloads_failed),
        );
        single(
            &mut out,
            "tokengate_config_last_reload_successful",
            "gauge",
            "1 when the last reload succeeded (or none was tried).",
            flag(self.last_reload_ok.load(Ordering::Relaxed)),
        );
        out
    }
}

/// The standard `process_*` metrics (the Prometheus client convention), read from /proc/self on
/// Linux at scrape time; a value that cannot be read is left out, never made up.
fn render_process(out: &mut String) {
    for (name, kind, help, v) in process_metrics() {
        single(out, name, kind, help, v);
    }
}

/// (name, type, help, value) of each readable `process_*` metric.
#[cfg(target_os = "linux")]
pub fn process_metrics() -> Vec<(&'static str, &'static str, &'static str, f64)> {
    let mut m = Vec::new();
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let page = rustix::param::page_size() as f64;
    // /proc/self/stat: the fields after the `)` that closes the command name; field 3 is index 0.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|s| s.parse::<f64>().ok());
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        m.push((
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (utime + stime) / ticks,
        ));
    }
    if let Some(vsize) = field(23) {
        m.push((
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            vsize,
        ));
    }
    if let Some(rss) = field(24) {
        m.push((
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss * page,
        ));
    }
    let btime = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    if let (Some(btime), Some(start)) = (btime, field(22)) {
        m.push((
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            btime + start / ticks,
        ));
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        m.push((
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            dir.count() as f64,
        ));
    }
    let max = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l["Max open files".len()..].split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        });
    if let Some(max) = max {
        m.push((
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max,
        ));
    }
    m
}

/// No /proc: no `process_*` metrics.
#[cfg(not(target_os = "linux"))]
pub fn process_metrics() -> Vec<(&'static str, &'static str, &'static str, f64)> {
    Vec::new()
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A counter with one label: one line per `(label value, count)`.
fn by_label(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    rows: impl IntoIterator<Item = (&'static str, u64)>,
) {
    header(out, name, "counter", help);
    for (value, n) in rows {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
    }
}

fn single(out: &mut String, name: &str, kind: &str, help: &str, v: f64) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {v}");
}

/// Escapes a label value: backslash, double quote and newline (exposition format 0.0.4).
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_inf_equals_count() {
        let h = Histogram::default();
        for ms in [0, 1, 3, 40, 700, 2_000, 60_000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut out = String::new();
        h.render_samples(&mut out, "x", "upstream=\"a\",");
        let buckets: Vec<u64> = out
            .lines()
            .filter(|l| l.starts_with("x_bucket"))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(buckets.len(), BUCKETS.len() + 1);
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{out}");
        assert_eq!(*buckets.last().unwrap(), 7);
        assert!(out.contains("x_count{upstream=\"a\"} 7\n"), "{out}");
        assert!(
            out.contains("x_bucket{upstream=\"a\",le=\"+Inf\"} 7\n"),
            "{out}"
        );
        // 0 ms and 1 ms are both <= 1 ms; 60 s is only in +Inf.
        assert!(
            out.contains("x_bucket{upstream=\"a\",le=\"0.001\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{upstream=\"a\",le=\"30\"} 6\n"),
            "{out}"
        );
        assert_eq!(h.count(), 7);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("a\nb"), "a\\nb");
        let m = Metrics::default();
        m.upstream("we\"ird", Duration::from_millis(5));
        let out = m.render(&Snapshot::default());
        assert!(out.contains("upstream=\"we\\\"ird\""), "{out}");
    }

    #[test]
    fn unknown_store_values_are_left_out_not_zero() {
        let m = Metrics::default();
        let out = m.render(&Snapshot::default());
        assert!(!out.contains("tokengate_active_tokens"), "{out}");
        let out = m.render(&Snapshot {
            store_up: Some(true),
            active_tokens: Some(3),
            expiring_7d: Some(1),
            ..Snapshot::default()
        });
        assert!(out.contains("\ntokengate_active_tokens 3\n"), "{out}");
        assert!(out.contains("\ntokengate_tokens_expiring_7d 1\n"), "{out}");
        assert!(out.contains("\ntokengate_store_up 1\n"), "{out}");
    }

    #[test]
    fn in_flight_guard_gives_the_slot_back() {
        let m = Metrics::default();
        {
            let _a = m.in_flight();
            let _b = m.in_flight();
            assert_eq!(m.in_flight.load(Ordering::Relaxed), 2);
        }
        assert_eq!(m.in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn requests_are_counted_by_series() {
        let m = Metrics::default();
        let api: Arc<str> = Arc::from("api");
        m.request(Some(&api), "allow", "ok", 200);
        // A reload builds a new name: the same series goes on.
        m.request(Some(&Arc::from("api")), "allow", "ok", 204);
        m.request(Some(&Arc::from("web")), "allow", "ok", 200);
        m.request(Some(&api), "deny", "no_rule", 403);
        m.request(None, "deny", "missing_token", 401);
        assert_eq!(m.requests_count("allow", "ok", 2), 3);
        assert_eq!(m.requests_count("deny", "no_rule", 4), 1);
        let out = m.render(&Snapshot::default());
        for line in [
            "tokengate_requests_total{decision=\"allow\",reason=\"ok\",route=\"api\",status_class=\"2xx\"} 2\n",
            "tokengate_requests_total{decision=\"allow\",reason=\"ok\",route=\"web\",status_class=\"2xx\"} 1\n",
            "tokengate_requests_total{decision=\"deny\",reason=\"missing_token\",route=\"-\",status_class=\"4xx\"} 1\n",
        ] {
            assert!(out.contains(line), "{line} missing from:\n{out}");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod process_tests {
    #[test]
    fn process_metrics_are_read_from_proc() {
        let m = super::process_metrics();
        let get = |n: &str| m.iter().find(|(name, ..)| *name == n).map(|(.., v)| *v);
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(get(name).is_some(), "{name} missing");
        }
        assert!(get("process_resident_memory_bytes").unwrap() > 1e5);
        assert!(
            get("process_virtual_memory_bytes").unwrap()
                >= get("process_resident_memory_bytes").unwrap()
        );
        assert!(get("process_open_fds").unwrap() >= 3.0);
        assert!(get("process_max_fds").unwrap() >= get("process_open_fds").unwrap());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = get("process_start_time_seconds").unwrap();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0,
            "{start} vs {now}"
        );
    }
}
