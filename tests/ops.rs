//! Running tokengate in production (issue 8): `/metrics` in Prometheus text format, `/healthz` and
//! `/readyz`, SIGHUP reload of config and certificates, SIGTERM drain, `store backup`, and the
//! packaging in `deploy/` (systemd unit, Dockerfile, Kubernetes manifests, logrotate).
//!
//! Real servers on 127.0.0.1:0, real SQLite files in temp dirs, real TLS with certificates made
//! here (rcgen), the real `tokengate` binary with real signals, and the recording upstream to show
//! what was (not) forwarded.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command as StdCommand, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::{
    Options, Proc, TestGateway, Upstream, assert_success, challenge, client, default_rules,
    eventually, get_bearer, get_bearer_expect, issue_into, permission_rule, read_audit_file,
    rules_with_delay, signal, wait_refused, write_config,
};
use tokengate::config::Config;
use tokengate::store::Store;

const BIN: &str = env!("CARGO_BIN_EXE_tokengate");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

// =================================================================================================
// A strict parser for the Prometheus text exposition format 0.0.4.
// =================================================================================================

mod prom {
    use std::collections::{BTreeMap, HashSet};

    /// One sample line.
    #[derive(Debug, Clone)]
    pub struct Sample {
        pub name: String,
        pub labels: BTreeMap<String, String>,
        pub value: f64,
    }

    /// A metric family: HELP, TYPE and its samples.
    #[derive(Debug, Clone)]
    pub struct Family {
        pub name: String,
        pub kind: String,
        pub help: Option<String>,
        pub samples: Vec<Sample>,
    }

    fn is_metric_name(s: &str) -> bool {
        let mut c = s.chars();
        matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    }

    fn is_label_name(s: &str) -> bool {
        let mut c = s.chars();
        matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
            && !s.starts_with("__")
    }

    /// Go's ParseFloat as Prometheus uses it: decimal or exponent forms, NaN, +Inf, -Inf.
    pub fn parse_value(s: &str) -> Result<f64, String> {
        match s {
            "NaN" => return Ok(f64::NAN),
            "+Inf" | "Inf" => return Ok(f64::INFINITY),
            "-Inf" => return Ok(f64::NEG_INFINITY),
            _ => {}
        }
        let body = s.strip_prefix(['+', '-']).unwrap_or(s);
        let (mantissa, exponent) = match body.find(['e', 'E']) {
            Some(i) => (&body[..i], Some(&body[i + 1..])),
            None => (body, None),
        };
        let digits_ok = {
            let mut parts = mantissa.splitn(2, '.');
            let int = parts.next().unwrap_or("");
            let frac = parts.next();
            int.chars().all(|c| c.is_ascii_digit())
                && frac.is_none_or(|f| f.chars().all(|c| c.is_ascii_digit()))
                && (!int.is_empty() || frac.is_some_and(|f| !f.is_empty()))
        };
        let exp_ok = exponent.is_none_or(|e| {
            let e = e.strip_prefix(['+', '-']).unwrap_or(e);
            !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
        });
        if !digits_ok || !exp_ok {
            return Err(format!("not a float: {s:?}"));
        }
        s.parse::<f64>().map_err(|e| format!("{s:?}: {e}"))
    }

    /// Parses `{a="b",c="d"}` starting at the `{`; returns the labels and the rest of the line.
    fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
        let mut labels = BTreeMap::new();
        let mut rest = s.strip_prefix('{').ok_or("expected {")?;
        loop {
            rest = rest.trim_start_matches(' ');
            if let Some(r) = rest.strip_prefix('}') {
                return Ok((labels, r));
            }
            let eq = rest
                .find('=')
                .ok_or_else(|| format!("label without '=': {rest:?}"))?;
            let name = rest[..eq].trim();
            if !is_label_name(name) {
                return Err(format!("bad label name {name:?}"));
            }
            rest = rest[eq + 1..].trim_start_matches(' ');
            rest = rest
                .strip_prefix('"')
                .ok_or_else(|| format!("label {name}: value not quoted"))?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    None => return Err(format!("label {name}: unterminated value")),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => return Err(format!("label {name}: bad escape {other:?}")),
                    },
                    Some((_, '\n')) => return Err(format!("label {name}: raw newline")),
                    Some((_, c)) => value.push(c),
                }
            };
            if labels.insert(name.to_string(), value).is_some() {
                return Err(format!("duplicate label {name}"));
            }
            rest = rest[end + 1..].trim_start_matches(' ');
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
            } else if !rest.starts_with('}') {
                return Err(format!("expected ',' or '}}' after label {name}: {rest:?}"));
            }
        }
    }

    /// The family a sample name belongs to, given the declared types.
    fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> &'a str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if matches!(types.get(base).map(String::as_str), Some("histogram")) {
                    return base;
                }
                if suffix != "_bucket"
                    && matches!(types.get(base).map(String::as_str), Some("summary"))
                {
                    return base;
                }
            }
        }
        name
    }

    /// Starts the family `name` after the last one, whose samples are closed from then on.
    fn open_family<'a>(
        families: &'a mut Vec<Family>,
        closed: &mut HashSet<String>,
        name: &str,
    ) -> &'a mut Family {
        if let Some(prev) = families.last() {
            closed.insert(prev.name.clone());
        }
        families.push(Family {
            name: name.into(),
            kind: "untyped".into(),
            help: None,
            samples: vec![],
        });
        families.last_mut().unwrap()
    }

    /// Parses and validates a whole exposition. Errors name the line.
    pub fn parse(text: &str) -> Result<Vec<Family>, String> {
        if !text.ends_with('\n') {
            return Err("exposition must end with a newline".into());
        }
        let mut families: Vec<Family> = Vec::new();
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut helped: HashSet<String> = HashSet::new();
        let mut closed: HashSet<String> = HashSet::new();
        let mut series: HashSet<String> = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let n = n + 1;
            let err = |m: String| format!("line {n}: {m}: {line:?}");
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix('#') {
                let rest = rest.strip_prefix(' ').unwrap_or(rest);
                let mut parts = rest.splitn(3, ' ');
                let keyword = parts.next().unwrap_or("");
                if keyword != "HELP" && keyword != "TYPE" {
                    continue; // a plain comment
                }
                let name = parts.next().ok_or_else(|| err("no metric name".into()))?;
                if !is_metric_name(name) {
                    return Err(err(format!("bad metric name {name:?}")));
                }
                let arg = parts.next().unwrap_or("");
                if closed.contains(name) {
                    return Err(err(format!("{name} declared again after its samples")));
                }
                let fam = match families.iter_mut().rev().find(|f| f.name == name) {
                    Some(f) => f,
                    None => open_family(&mut families, &mut closed, name),
                };
                if keyword == "HELP" {
                    if !helped.insert(name.to_string()) {
                        return Err(err("second HELP".into()));
                    }
                    let mut chars = arg.chars();
                    while let Some(c) = chars.next() {
                        if c == '\\' && !matches!(chars.next(), Some('\\') | Some('n')) {
                            return Err(err("bad escape in HELP".into()));
                        }
                    }
                    fam.help = Some(arg.to_string());
                } else {
                    if types.contains_key(name) {
                        return Err(err("second TYPE".into()));
                    }
                    if !fam.samples.is_empty() {
                        return Err(err("TYPE after samples".into()));
                    }
                    if !matches!(
                        arg,
                        "counter" | "gauge" | "histogram" | "summary" | "untyped"
                    ) {
                        return Err(err(format!("unknown type {arg:?}")));
                    }
                    types.insert(name.to_string(), arg.to_string());
                    fam.kind = arg.to_string();
                }
                continue;
            }
            // A sample: name[{labels}] value [timestamp]
            let name_end = line
                .find(['{', ' '])
                .ok_or_else(|| err("no value".into()))?;
            let name = &line[..name_end];
            if !is_metric_name(name) {
                return Err(err(format!("bad metric name {name:?}")));
            }
            let (labels, rest) = if line[name_end..].starts_with('{') {
                parse_labels(&line[name_end..]).map_err(err)?
            } else {
                (BTreeMap::new(), &line[name_end..])
            };
            let rest = rest
                .strip_prefix(' ')
                .ok_or_else(|| err("no space before value".into()))?;
            let mut fields = rest.split(' ');
            let value = parse_value(fields.next().unwrap_or("")).map_err(err)?;
            if let Some(ts) = fields.next() {
                ts.parse::<i64>()
                    .map_err(|e| err(format!("bad timestamp: {e}")))?;
            }
            if fields.next().is_some() {
                return Err(err("trailing fields".into()));
            }
            let fam_name = family_of(name, &types).to_string();
            if closed.contains(&fam_name) {
                return Err(err(format!("samples of {fam_name} are not contiguous")));
            }
            let key = format!("{name}{labels:?}");
            if !series.insert(key) {
                return Err(err("duplicate series".into()));
            }
            let is_last = families.last().is_some_and(|f| f.name == fam_name);
            if !is_last {
                open_family(&mut families, &mut closed, &fam_name);
            }
            let fam = families.last_mut().unwrap();
            match fam.kind.as_str() {
                "counter" if value < 0.0 || value.is_nan() => {
                    return Err(err("counter below 0 or NaN".into()));
                }
                "histogram" => {
                    if name.ends_with("_bucket") && !labels.contains_key("le") {
                        return Err(err("bucket without le".into()));
                    }
                    if !name.ends_with("_bucket") && labels.contains_key("le") {
                        return Err(err("le outside a bucket".into()));
                    }
                }
                _ => {}
            }
            fam.samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        for f in &families {
            if f.kind == "histogram" {
                check_histogram(f)?;
            }
        }
        Ok(families)
    }

    /// Buckets in increasing `le` order, cumulative counts that never decrease, a `+Inf` bucket
    /// equal to `_count`, and a `_sum`, for every label set.
    fn check_histogram(f: &Family) -> Result<(), String> {
        /// One label set of a histogram: (le, count) buckets in order of appearance, _sum, _count.
        type Series = (Vec<(f64, f64)>, Option<f64>, Option<f64>);
        let mut groups: BTreeMap<String, Series> = BTreeMap::new();
        for s in &f.samples {
            let mut key_labels = s.labels.clone();
            let le = key_labels.remove("le");
            let g = groups.entry(format!("{key_labels:?}")).or_default();
            if s.name.ends_with("_bucket") {
                let le = parse_value(le.as_deref().unwrap_or(""))
                    .map_err(|e| format!("{}: le {e}", f.name))?;
                g.0.push((le, s.value));
            } else if s.name.ends_with("_sum") {
                g.1 = Some(s.value);
            } else if s.name.ends_with("_count") {
                g.2 = Some(s.value);
            } else {
                return Err(format!("{}: stray sample {}", f.name, s.name));
            }
        }
        for (labels, (buckets, sum, count)) in groups {
            let ctx = format!("{}{labels}", f.name);
            if buckets.is_empty() {
                return Err(format!("{ctx}: no buckets"));
            }
            for w in buckets.windows(2) {
                if w[1].0 <= w[0].0 {
                    return Err(format!(
                        "{ctx}: le not increasing ({} then {})",
                        w[0].0, w[1].0
                    ));
                }
                if w[1].1 < w[0].1 {
                    return Err(format!("{ctx}: bucket counts decrease at le={}", w[1].0));
                }
            }
            let (last_le, last_count) = *buckets.last().unwrap();
            if last_le != f64::INFINITY {
                return Err(format!("{ctx}: no +Inf bucket"));
            }
            if sum.is_none() {
                return Err(format!("{ctx}: no _sum"));
            }
            match count {
                Some(c) if c == last_count => {}
                other => {
                    return Err(format!(
                        "{ctx}: _count {other:?} != +Inf bucket {last_count}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The value of the sample `name` whose labels include every pair in `labels`.
    pub fn value(fams: &[Family], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        fams.iter()
            .flat_map(|f| &f.samples)
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    #[test]
    fn the_parser_rejects_what_prometheus_rejects() {
        let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n";
        assert!(parse(ok).is_ok());
        for bad in [
            "a_total 1",                                                // no final newline
            "# TYPE a counter\na -1\n",                                 // negative counter
            "# TYPE a gauge\na{x=\"1\",x=\"2\"} 1\n",                   // duplicate label
            "# TYPE a gauge\na{1x=\"1\"} 1\n",                          // bad label name
            "# TYPE a gauge\na{x=\"\\t\"} 1\n",                         // bad escape
            "# TYPE a gauge\na 1.2.3\n",                                // bad float
            "# TYPE a gauge\na inf\n",                                  // Rust-only spelling
            "# TYPE a gauge\na 1\na 2\n",                               // duplicate series
            "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na{x=\"y\"} 2\n", // not contiguous
            "# TYPE a gauge\n# TYPE a gauge\na 1\n",                    // second TYPE
            "# TYPE 0a gauge\n0a 1\n",                                  // bad metric name
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", // decreasing
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", // no +Inf
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n", // +Inf != count
            "# TYPE h histogram\nh_bucket{le=\"2\"} 1\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        ] {
            assert!(parse(bad).is_err(), "accepted: {bad:?}");
        }
        assert_eq!(parse_value("1e-3").unwrap(), 0.001);
        assert_eq!(parse_value("+Inf").unwrap(), f64::INFINITY);
        assert!(parse_value("NaN").unwrap().is_nan());
    }
}

// =================================================================================================
// Helpers
// =================================================================================================

/// The standard process metrics (Prometheus client convention), read from /proc/self.
const PROCESS_METRICS: [&str; 6] = [
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
];

async fn get_text(url: &str) -> (u16, String, String) {
    let r = client().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, ct, r.text().await.unwrap())
}

async fn scrape(admin: SocketAddr) -> Vec<prom::Family> {
    let (status, ct, body) = get_text(&format!("http://{admin}/metrics")).await;
    assert_eq!(status, 200);
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    prom::parse(&body).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{body}"))
}

fn v(fams: &[prom::Family], name: &str, labels: &[(&str, &str)]) -> f64 {
    prom::value(fams, name, labels).unwrap_or(0.0)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn run_cli(args: &[&str]) -> std::process::Output {
    StdCommand::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The rule that lets holders of `reports:read` read `/reports/**`.
fn reports_rule() -> String {
    permission_rule(&["GET"], "/reports/**", "reports:read")
}

/// [`Proc::start`], or with `one_cpu` under `taskset -c 0`, so that the binary may use one CPU
/// only (and picks tokio's current-thread runtime).
async fn start_on(
    upstream: &Upstream,
    o: &Options,
    prepare: impl FnOnce(&Path),
    one_cpu: bool,
) -> Proc {
    let cmd = if one_cpu {
        let mut c = StdCommand::new("taskset");
        c.args(["-c", "0", BIN]);
        c
    } else {
        StdCommand::new(BIN)
    };
    Proc::start_by(cmd, upstream.addr, o, prepare).await
}

/// Makes sure a system tool exists: installs its Debian package when running as root in CI,
/// otherwise returns false so the caller can skip with a printed reason.
fn ensure_tool(bin: &str, package: &str) -> bool {
    let have = || {
        StdCommand::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if have() {
        return true;
    }
    let root = StdCommand::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if !(root && ci) {
        eprintln!(
            "SKIP: `{bin}` is missing and this is not a root CI run (install the `{package}` package to run this check)"
        );
        return false;
    }
    let st = StdCommand::new("sh")
        .args(["-c", &format!("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends {package}")])
        .status()
        .unwrap();
    assert!(st.success(), "apt-get install {package} failed");
    assert!(have(), "`{bin}` still missing after installing {package}");
    true
}

fn read_repo(rel: &str) -> String {
    std::fs::read_to_string(Path::new(REPO).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

// =================================================================================================
// /metrics
// =================================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_requests_and_parse_as_prometheus_text() {
    let (tg, ok_token, _) = TestGateway::with_reader().await;
    // Expires in 3 days: counted by tokengate_tokens_expiring_7d.
    let (_soon, _) = tg.token_with("ci", "soon", &["apps:read"], |s| {
        s.expires_at = Some(tg.gw.now_ms() + 3 * 86_400_000)
    });
    let (slow_token, _) = tg.rated_token("ci", "limited", 0.001, 1);

    let before = scrape(tg.admin_addr).await;
    assert_eq!(v(&before, "tokengate_listening", &[]), 1.0);
    assert_eq!(v(&before, "tokengate_active_tokens", &[]), 3.0);
    assert_eq!(v(&before, "tokengate_tokens_expiring_7d", &[]), 1.0);
    assert_eq!(v(&before, "tokengate_store_up", &[]), 1.0);
    assert_eq!(v(&before, "tokengate_audit_healthy", &[]), 1.0);
    assert_eq!(
        v(
            &before,
            "tokengate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    let c = client();
    for _ in 0..2 {
        get_bearer_expect(&c, tg.url("/apps/billing/status"), &ok_token, 200).await;
    }
    // Denials: no token (401), no rule (403), rate limited (429 on the second request).
    let r = c.get(tg.url("/apps/billing/status")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer realm=\"tokengate\""
    );
    let r = get_bearer_expect(&c, tg.url("/nothing/here"), &ok_token, 403).await;
    assert!(challenge(&r).contains("error=\"insufficient_scope\""));
    get_bearer_expect(&c, tg.url("/apps/a/b"), &slow_token, 200).await;
    let r = get_bearer_expect(&c, tg.url("/apps/a/b"), &slow_token, 429).await;
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    // Only the three allowed requests reached the upstream.
    assert_eq!(tg.upstream.count(), 3);
    let lines = tg.request_lines().await;
    let reasons: Vec<&str> = lines
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        ["ok", "ok", "missing_token", "no_rule", "ok", "rate_limited"]
    );
    support::assert_rejection_line(&lines[2], 401, "missing_token");
    support::assert_rejection_line(&lines[3], 403, "no_rule");
    support::assert_rejection_line(&lines[5], 429, "rate_limited");

    let after = scrape(tg.admin_addr).await;
    let delta =
        |name: &str, labels: &[(&str, &str)]| v(&after, name, labels) - v(&before, name, labels);
    fn series<'a>(d: &'a str, r: &'a str, c: &'a str) -> [(&'static str, &'a str); 3] {
        [("decision", d), ("reason", r), ("status_class", c)]
    }
    assert_eq!(
        delta("tokengate_requests_total", &series("allow", "ok", "2xx")),
        3.0
    );
    assert_eq!(
        delta(
            "tokengate_requests_total",
            &series("deny", "missing_token", "4xx")
        ),
        1.0
    );
    assert_eq!(
        delta(
            "tokengate_requests_total",
            &series("deny", "no_rule", "4xx")
        ),
        1.0
    );
    assert_eq!(
        delta(
            "tokengate_requests_total",
            &series("deny", "rate_limited", "4xx")
        ),
        1.0
    );
    assert_eq!(delta("tokengate_rate_limited_total", &[]), 1.0);
    assert_eq!(delta("tokengate_request_duration_seconds_count", &[]), 6.0);
    assert_eq!(
        delta(
            "tokengate_upstream_duration_seconds_count",
            &[("upstream", "api")]
        ),
        3.0
    );
    assert!(
        v(
            &after,
            "tokengate_upstream_duration_seconds_sum",
            &[("upstream", "api")]
        ) > 0.0
    );
    // First use of each token misses the cache, later uses hit it.
    assert_eq!(delta("tokengate_cache_misses_total", &[]), 2.0);
    assert_eq!(delta("tokengate_cache_hits_total", &[]), 3.0);
    assert_eq!(v(&after, "tokengate_cache_entries", &[]), 2.0);
    // Six requests; the three forwarded ones have a decision and a completion line.
    assert_eq!(delta("tokengate_audit_lines_total", &[]), 9.0);
    assert_eq!(v(&after, "tokengate_audit_queue_depth", &[]), 0.0);
    assert_eq!(v(&after, "tokengate_audit_write_failures_total", &[]), 0.0);
    assert_eq!(v(&after, "tokengate_requests_in_flight", &[]), 0.0);
    // reqwest keeps its connection open in the pool.
    assert!(v(&after, "tokengate_open_connections", &[]) >= 1.0);

    #[cfg(target_os = "linux")]
    for name in PROCESS_METRICS {
        assert!(v(&after, name, &[]) > 0.0, "{name}");
    }
    // Every counter follows the _total convention, and every family has HELP and TYPE.
    for f in &after {
        assert!(f.help.is_some(), "{} has no HELP", f.name);
        assert_ne!(f.kind, "untyped", "{} has no TYPE", f.name);
        // Ours start with tokengate_; the standard process_* set keeps its conventional names.
        assert!(
            f.name.starts_with("tokengate_") || PROCESS_METRICS.contains(&f.name.as_str()),
            "{}",
            f.name
        );
        if f.kind == "counter" {
            assert!(f.name.ends_with("_total"), "{}", f.name);
        }
    }
    for name in [
        "tokengate_requests_total",
        "tokengate_request_duration_seconds",
        "tokengate_upstream_duration_seconds",
        "tokengate_cache_hits_total",
        "tokengate_cache_misses_total",
        "tokengate_cache_entries",
        "tokengate_active_tokens",
        "tokengate_tokens_expiring_7d",
        "tokengate_audit_queue_depth",
        "tokengate_audit_write_failures_total",
        "tokengate_rate_limited_total",
        "tokengate_open_connections",
    ] {
        assert!(after.iter().any(|f| f.name == name), "missing {name}");
    }
    tg.stop().await;
}

/// A default gateway, a token `reporter` holding `apps:read` and `reports:read`, the gateway's TLS
/// handle (for reloads) and its upstream's address.
async fn reporter_gateway() -> (TestGateway, String, tokengate::server::TlsHandle, String) {
    let tg = TestGateway::start().await;
    let (token, _) = tg.token("ci", "reporter", &["apps:read", "reports:read"]);
    let tls = tg.tls.clone().unwrap();
    let up = tg.upstream.addr.to_string();
    (tg, token, tls, up)
}

/// The `route` label of `tokengate_requests_total`: the route the path belongs to (also when the
/// request was refused on it), `-` for what no route serves (the gateway's own endpoints, a path
/// outside every prefix); a reload that keeps a route's name keeps its series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_per_route_and_reloads_keep_the_series() {
    let (tg, token, tls, up) = reporter_gateway().await;
    let reports_route = |rules: &str| {
        format!(
            "\n[[routes]]\nname = \"reports\"\nprefix = \"/reports\"\nupstream = \"http://{up}\"\n{rules}"
        )
    };
    write_config(
        tg.dir.path(),
        &up,
        &Options {
            extra_routes: reports_route(&reports_rule()),
            ..Options::default()
        },
    );
    assert!(tokengate::app::reload(&tg.gw, &tls, &tg.config_path).await);
    let c = client();
    let get = |path: &str, auth: bool| {
        let mut r = c.get(tg.url(path));
        if auth {
            r = r.header("authorization", bearer(&token));
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    let before = scrape(tg.admin_addr).await;
    assert_eq!(get("/apps/billing/status", true).await, 200);
    assert_eq!(get("/reports/q1", true).await, 200);
    assert_eq!(get("/reports/q2", true).await, 200);
    assert_eq!(get("/reports/q3", false).await, 401);
    assert_eq!(get("/_tokengate/health", false).await, 200);
    assert_eq!(tg.upstream.count(), 3);

    let series = |route: &'static str, d: &'static str, r: &'static str, c: &'static str| {
        [
            ("route", route),
            ("decision", d),
            ("reason", r),
            ("status_class", c),
        ]
    };
    let delta = |after: &[prom::Family], labels: &[(&str, &str)]| {
        v(after, "tokengate_requests_total", labels)
            - v(&before, "tokengate_requests_total", labels)
    };
    let after = scrape(tg.admin_addr).await;
    assert_eq!(delta(&after, &series("api", "allow", "ok", "2xx")), 1.0);
    assert_eq!(delta(&after, &series("reports", "allow", "ok", "2xx")), 2.0);
    assert_eq!(
        delta(&after, &series("reports", "deny", "missing_token", "4xx")),
        1.0,
        "a refusal is counted on the route it was refused on"
    );
    assert_eq!(
        delta(&after, &series("-", "allow", "ok", "2xx")),
        1.0,
        "the health endpoint is the gateway's own: route -"
    );
    let total: f64 = after
        .iter()
        .filter(|f| f.name == "tokengate_requests_total")
        .flat_map(|f| &f.samples)
        .map(|s| {
            assert!(
                s.labels.contains_key("route"),
                "{:?} has no route",
                s.labels
            );
            s.value
        })
        .sum::<f64>()
        - before
            .iter()
            .filter(|f| f.name == "tokengate_requests_total")
            .flat_map(|f| &f.samples)
            .map(|s| s.value)
            .sum::<f64>();
    assert_eq!(total, 5.0, "every request counted once");

    // A reload that rebuilds the route under the same name: the series goes on from where it was.
    write_config(
        tg.dir.path(),
        &up,
        &Options {
            extra_routes: reports_route(&format!("{}\n# reloaded\n", reports_rule())),
            ..Options::default()
        },
    );
    assert!(tokengate::app::reload(&tg.gw, &tls, &tg.config_path).await);
    assert_eq!(get("/reports/q4", true).await, 200);
    let reloaded = scrape(tg.admin_addr).await;
    assert_eq!(
        delta(&reloaded, &series("reports", "allow", "ok", "2xx")),
        3.0
    );
    let reports_ok = reloaded
        .iter()
        .filter(|f| f.name == "tokengate_requests_total")
        .flat_map(|f| &f.samples)
        .filter(|s| {
            s.labels.get("route").map(String::as_str) == Some("reports")
                && s.labels.get("reason").map(String::as_str) == Some("ok")
        })
        .count();
    assert_eq!(
        reports_ok, 1,
        "one series per route name, not per config generation"
    );
    tg.stop().await;
}

// =================================================================================================
// /healthz and /readyz
// =================================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_health_endpoint_answers_without_a_token_and_follows_readiness() {
    let tg = TestGateway::start().await;
    let url = tg.url("/_tokengate/health");
    // No token, no forwarding; the same readiness as /readyz.
    let (s, ct, body) = get_text(&url).await;
    assert_eq!(
        (s, ct.as_str(), body.as_str()),
        (200, "application/json", "{\"status\":\"ok\"}\n")
    );
    let head = client().head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert!(head.headers().get("x-request-id").is_some());
    // A token that would be refused is not even looked at.
    get_bearer_expect(&client(), &url, "tg_not_a_token", 200).await;
    assert_eq!(tg.upstream.count(), 0, "never forwarded");
    let line = tg.last_request_line().await;
    assert_eq!(line["path"], "/_tokengate/health");
    assert_eq!(line["status_code"], 200);
    assert!(line["upstream"].is_null());

    // Not ready (the store file is gone): 503, still without forwarding.
    let db = tg.dir.path().join("tokengate.db");
    let kept = tg.dir.path().join("tokengate.db.kept");
    std::fs::rename(&db, &kept).unwrap();
    let (s, _, body) = get_text(&url).await;
    assert_eq!((s, body.as_str()), (503, "{\"status\":\"unavailable\"}\n"));
    assert_eq!(
        get_text(&format!("http://{}/readyz", tg.admin_addr))
            .await
            .0,
        503
    );
    std::fs::rename(&kept, &db).unwrap();
    assert_eq!(get_text(&url).await.0, 200);

    // Other methods and near-miss spellings are not the health endpoint: they need a token.
    let r = client().post(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(get_text(&tg.url("/_tokengate/health/")).await.0, 401);
    assert_eq!(get_text(&tg.url("/_tokengate/Health")).await.0, 401);
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn health_path_is_configurable_and_can_be_turned_off() {
    let tg = TestGateway::with_server("health_path = \"/_tokengate/lb\"").await;
    assert_eq!(get_text(&tg.url("/_tokengate/lb")).await.0, 200);
    assert_eq!(get_text(&tg.url("/_tokengate/health")).await.0, 401);
    tg.stop().await;
    let tg = TestGateway::with_server("health_path = \"\"").await;
    assert_eq!(get_text(&tg.url("/_tokengate/health")).await.0, 401);
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
    // Outside the reserved prefix (it would shadow a route) or not canonical: refused.
    for bad in [
        "/health",
        "/_tokengate/",
        "/_tokengate/a/../b",
        "_tokengate/health",
    ] {
        let text = format!("[server]\nhealth_path = \"{bad}\"\n");
        let e = Config::from_toml(&text, Path::new("/x/tokengate.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.health_path"), "{bad}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_store_the_audit_log_and_the_listeners() {
    let (tg, token, _) = TestGateway::with_reader().await;
    let base = format!("http://{}", tg.admin_addr);
    let (s, _, body) = get_text(&format!("{base}/healthz")).await;
    assert_eq!((s, body.as_str()), (200, "ok\n"));
    let (s, _, body) = get_text(&format!("{base}/readyz")).await;
    assert_eq!(
        (s, body.as_str()),
        (200, "store: ok\naudit: ok\nlisteners: ok\n")
    );

    // The store file disappears (a bad restore, a removed volume): not ready, still alive.
    let db = tg.dir.path().join("tokengate.db");
    let kept = tg.dir.path().join("tokengate.db.kept");
    std::fs::rename(&db, &kept).unwrap();
    let (s, _, body) = get_text(&format!("{base}/readyz")).await;
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("store: FAILED"), "{body}");
    assert_eq!(get_text(&format!("{base}/healthz")).await.0, 200);
    // Garbage in its place (with its WAL moved aside too: SQLite would read page 1 from the WAL).
    let side = |ext: &str| {
        (
            tg.dir.path().join(format!("tokengate.db{ext}")),
            tg.dir.path().join(format!("tokengate.db{ext}.kept")),
        )
    };
    for ext in ["-wal", "-shm"] {
        let (from, to) = side(ext);
        if from.exists() {
            std::fs::rename(from, to).unwrap();
        }
    }
    std::fs::write(&db, vec![0x5a; 64 * 1024]).unwrap();
    let (s, _, body) = get_text(&format!("{base}/readyz")).await;
    assert_eq!(s, 503, "{body}");
    assert!(
        body.contains("store: FAILED") && body.contains("audit: ok"),
        "{body}"
    );
    for ext in ["-wal", "-shm"] {
        let (to, from) = side(ext);
        if from.exists() {
            std::fs::rename(from, to).unwrap();
        }
    }
    std::fs::rename(&kept, &db).unwrap();
    assert_eq!(get_text(&format!("{base}/readyz")).await.0, 200);

    // The audit log cannot be written: its path becomes a directory and the writer reopens it
    // (as after logrotate + SIGHUP).
    let audit = tg.dir.path().join("audit.log");
    let audit_kept = tg.dir.path().join("audit.log.kept");
    tg.gw.audit().flush_async().await.unwrap();
    std::fs::rename(&audit, &audit_kept).unwrap();
    std::fs::create_dir(&audit).unwrap();
    tg.gw.audit().reopen();
    let body = eventually(
        "readyz to fail on the audit log",
        Duration::from_secs(10),
        || async {
            let (s, _, body) = get_text(&format!("{base}/readyz")).await;
            (s == 503).then_some(body)
        },
    )
    .await;
    assert_eq!(body, "store: ok\naudit: FAILED\nlisteners: ok\n");
    let m = scrape(tg.admin_addr).await;
    assert_eq!(v(&m, "tokengate_audit_healthy", &[]), 0.0);
    assert!(v(&m, "tokengate_audit_write_failures_total", &[]) >= 1.0);
    // Meanwhile requests are refused, never forwarded unaudited.
    let r = get_bearer_expect(&client(), tg.url("/apps/a/b"), &token, 503).await;
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "unavailable");
    assert_eq!(tg.upstream.count(), 0);
    // Repaired: ready again once the writer's retry succeeds.
    std::fs::remove_dir(&audit).unwrap();
    std::fs::rename(&audit_kept, &audit).unwrap();
    tg.gw.audit().reopen();
    eventually("readyz to recover", Duration::from_secs(15), || async {
        (get_text(&format!("{base}/readyz")).await.0 == 200).then_some(())
    })
    .await;

    // Listeners: up while serving, down once draining.
    let gw = tg.gw.clone();
    assert!(
        gw.metrics()
            .listening
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    tg.stop().await;
    assert!(
        !gw.metrics()
            .listening
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(
        gw.metrics()
            .render(&Default::default())
            .contains("\ntokengate_listening 0\n")
    );
}

// =================================================================================================
// Reload
// =================================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_a_new_rule_and_refuses_a_broken_config_while_serving() {
    let (tg, token, tls, up) = reporter_gateway().await;
    let c = client();

    // Before: no rule for /reports -> 403 no_rule, nothing forwarded.
    let r = get_bearer_expect(&c, tg.url("/reports/q1"), &token, 403).await;
    assert!(challenge(&r).contains("insufficient_scope"));
    support::assert_rejection_line(&tg.last_request_line().await, 403, "no_rule");
    assert_eq!(tg.upstream.count(), 0);

    // A new rule.
    write_config(
        tg.dir.path(),
        &up,
        &Options {
            rules: default_rules() + &reports_rule(),
            ..Options::default()
        },
    );
    assert!(tokengate::app::reload(&tg.gw, &tls, &tg.config_path).await);
    get_bearer_expect(&c, tg.url("/reports/q1"), &token, 200).await;
    assert_eq!(tg.upstream.received().last().unwrap().target, "/reports/q1");
    let line = tg.last_request_line().await;
    assert_eq!(line["rule"], "api:GET /reports/**");
    assert_eq!(line["permission"], "reports:read");

    // Broken configs, while traffic flows on new and kept-alive connections.
    let traffic = {
        let (url, token) = (tg.url("/reports/q1"), token.clone());
        tokio::spawn(async move {
            let keep = client();
            let mut statuses = Vec::new();
            for i in 0..60 {
                let c = if i % 2 == 0 { keep.clone() } else { client() };
                let r = get_bearer(&c, &url, &token).await;
                statuses.push(r.status().as_u16());
            }
            statuses
        })
    };
    // Three kinds of broken config, tried again and again until the traffic is done.
    let path = tg.config_path.clone();
    let broken = [
        (None, "tokengate.toml"),                 // not TOML
        (Some("no_such_key = 1"), "no_such_key"), // unknown key
        (
            Some("tls = { cert = \"missing.pem\", key = \"missing.key\" }"),
            "missing.pem",
        ), // missing TLS files
    ];
    let mut attempts = 0;
    while attempts < broken.len() || !traffic.is_finished() {
        match broken[attempts % broken.len()].0 {
            None => std::fs::write(&path, "[server\nlisten = ").unwrap(),
            Some(server) => {
                write_config(
                    tg.dir.path(),
                    &up,
                    &Options {
                        server: server.into(),
                        ..Options::default()
                    },
                );
            }
        }
        assert!(!tokengate::app::reload(&tg.gw, &tls, &path).await);
        attempts += 1;
    }
    let statuses = traffic.await.unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // The old config (with the reports rule) is still in force.
    get_bearer_expect(&c, tg.url("/reports/q2"), &token, 200).await;

    // Audited, counted.
    let admin: Vec<_> = tg
        .audit_lines()
        .await
        .into_iter()
        .filter(|l| l["kind"] == "admin")
        .collect();
    let events: Vec<&str> = admin.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(events.len(), 1 + attempts);
    assert_eq!(events[0], "config.reloaded");
    assert!(
        events[1..].iter().all(|e| *e == "config.reload_failed"),
        "{events:?}"
    );
    assert!(admin.iter().all(|l| l["actor"] == "signal:SIGHUP"));
    for (i, (_, needle)) in broken.iter().enumerate() {
        let reason = admin[1 + i]["reason"].as_str().unwrap();
        assert!(reason.contains(needle), "{reason}");
    }
    let m = scrape(tg.admin_addr).await;
    assert_eq!(v(&m, "tokengate_config_reloads_total", &[]), 1.0);
    assert_eq!(
        v(&m, "tokengate_config_reload_failures_total", &[]),
        attempts as f64
    );
    assert_eq!(v(&m, "tokengate_config_last_reload_successful", &[]), 0.0);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_real_binary_and_keeps_serving_on_a_broken_config() {
    let upstream = Upstream::start().await;
    let mut token = String::new();
    let mut p = Proc::start(upstream.addr, &Options::default(), |db| {
        token = issue_into(db, "ci", "reporter", &["apps:read", "reports:read"]).0;
    })
    .await;
    let c = client();
    let url = format!("http://{}/reports/q1", p.public);
    let r = get_bearer_expect(&c, &url, &token, 403).await;
    assert!(challenge(&r).contains("insufficient_scope"));
    assert_eq!(upstream.count(), 0);

    write_config(
        p.dir.path(),
        &upstream.addr.to_string(),
        &Options {
            rules: default_rules() + &reports_rule(),
            ..Options::default()
        },
    );
    signal(p.pid(), "-HUP");
    eventually(
        "the new rule to take effect",
        Duration::from_secs(20),
        || {
            let (c, url, token) = (c.clone(), url.clone(), token.clone());
            async move {
                let r = get_bearer(&c, &url, &token).await;
                (r.status() == 200).then_some(())
            }
        },
    )
    .await;
    assert_eq!(upstream.received().last().unwrap().target, "/reports/q1");

    std::fs::write(&p.config, "[[routes]\nbroken").unwrap();
    signal(p.pid(), "-HUP");
    eventually(
        "the broken config to be refused",
        Duration::from_secs(20),
        || async {
            p.stderr_has("new configuration refused; keeping the old one")
                .then_some(())
        },
    )
    .await;
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "the process must survive a bad reload"
    );
    for _ in 0..5 {
        get_bearer_expect(&c, &url, &token, 200).await;
    }

    signal(p.pid(), "-TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(30)).await, 0);
    let lines = read_audit_file(&p.audit_path());
    let events: Vec<&str> = lines
        .iter()
        .filter(|l| l["kind"] == "admin")
        .map(|l| l["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["config.reloaded", "config.reload_failed"]);
    let out = run_cli(&["audit", "verify", p.audit_path().to_str().unwrap()]);
    assert_success(&out);
}

// ---- certificates ----

struct Pki {
    ca: rcgen::Certificate,
    leaf_pem: String,
    key_pem: String,
    leaf_der: Vec<u8>,
}

fn pki(name: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    params.distinguished_name.push(DnType::CommonName, name);
    let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
    Pki {
        leaf_pem: leaf.pem(),
        key_pem: key.serialize_pem(),
        leaf_der: leaf.der().to_vec(),
        ca,
    }
}

fn tls_client(cas: &[&rcgen::Certificate]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(ca.der().clone()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn tls_connect(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) -> std::io::Result<TlsStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

fn served_cert(s: &TlsStream) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec()
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn http_over(s: TlsStream) -> Sender {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get_over(sender: &mut Sender, path: &str, token: &str) -> u16 {
    let req = http::Request::get(path)
        .header("host", "localhost")
        .header("authorization", bearer(token))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_serves_a_new_certificate_to_new_connections_and_keeps_old_ones() {
    let certs = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let one = pki("tokengate one");
    let two = pki("tokengate two");
    std::fs::write(&cert_path, &one.leaf_pem).unwrap();
    std::fs::write(&key_path, &one.key_pem).unwrap();
    let tg = TestGateway::start_with(Options {
        server: format!("tls = {{ cert = {:?}, key = {:?} }}", cert_path, key_path),
        ..Options::default()
    })
    .await;
    let (token, _) = tg.token("ci", "reader", &["apps:read"]);
    let both = tls_client(&[&one.ca, &two.ca]);

    // Before the reload: certificate one.
    let s = tls_connect(tg.addr, &both).await.unwrap();
    assert_eq!(served_cert(&s), one.leaf_der);
    let mut old_conn = http_over(s).await;
    assert_eq!(get_over(&mut old_conn, "/apps/a/b", &token).await, 200);
    assert!(tls_connect(tg.addr, &tls_client(&[&two.ca])).await.is_err());

    // Renewal: new files at the same paths, then reload.
    std::fs::write(&cert_path, &two.leaf_pem).unwrap();
    std::fs::write(&key_path, &two.key_pem).unwrap();
    assert!(tokengate::app::reload(&tg.gw, tg.tls.as_ref().unwrap(), &tg.config_path).await);
    let s = tls_connect(tg.addr, &both).await.unwrap();
    assert_eq!(served_cert(&s), two.leaf_der);
    let mut new_conn = http_over(s).await;
    assert_eq!(get_over(&mut new_conn, "/apps/a/b", &token).await, 200);
    assert!(tls_connect(tg.addr, &tls_client(&[&two.ca])).await.is_ok());
    assert!(
        tls_connect(tg.addr, &tls_client(&[&one.ca])).await.is_err(),
        "certificate one must be gone"
    );
    // The connection opened before the reload was not dropped.
    assert_eq!(get_over(&mut old_conn, "/apps/a/c", &token).await, 200);

    // A broken certificate is refused; certificate two stays.
    std::fs::write(
        &cert_path,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(!tokengate::app::reload(&tg.gw, tg.tls.as_ref().unwrap(), &tg.config_path).await);
    let s = tls_connect(tg.addr, &both).await.unwrap();
    assert_eq!(served_cert(&s), two.leaf_der);
    assert_eq!(tg.upstream.count(), 3);
    tg.stop().await;
}

// =================================================================================================
// Drain
// =================================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_refuses_new_connections_and_flushes() {
    sigterm_drain(false, 0).await;
}

/// The same drain with `server.workers = 2`: the public listener is two sockets on two
/// single-threaded runtimes; both close at SIGTERM, and the request running on one finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_workers_sigterm_closes_every_socket_and_drains_the_same() {
    sigterm_drain(false, 2).await;
}

/// The same drain with the process limited to one CPU: the binary then runs tokio's
/// current-thread runtime (its start-up line says so), and everything must work the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_cpu_the_current_thread_runtime_serves_and_drains_the_same() {
    sigterm_drain(true, 0).await;
}

async fn sigterm_drain(one_cpu: bool, workers: usize) {
    let upstream = Upstream::start().await;
    let mut ids = (String::new(), String::new());
    let o = Options {
        server: format!("shutdown_grace = \"30s\"\nworkers = {workers}"),
        // last-used is written only at shutdown in this test: the flush must come from the drain.
        sections: "[tokens]\nlast_used_flush_interval = \"1h\"\n".into(),
        rules: rules_with_delay(),
        ..Options::default()
    };
    let mut p = start_on(
        &upstream,
        &o,
        |db| ids = issue_into(db, "ci", "reader", &["apps:read"]),
        one_cpu,
    )
    .await;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = if one_cpu || cpus == 1 {
        r#""runtime":"current_thread""#
    } else {
        r#""runtime":"multi_thread""#
    };
    assert!(
        p.stderr_has(runtime),
        "the start-up line should say {runtime}"
    );
    // The same start-up line says how many runtimes of their own serve the public listener.
    assert!(
        p.stderr_has(&format!(r#""workers":{workers}"#)),
        "the start-up line should say workers {workers}"
    );
    let (token, token_id) = ids;
    let c = client();
    get_bearer_expect(&c, format!("http://{}/apps/a/b", p.public), &token, 200).await;

    // A slow request: the upstream answers after 4 s.
    let slow = {
        let url = format!("http://{}/delay/4000", p.public);
        let token = token.clone();
        tokio::spawn(async move {
            let r = get_bearer(&client(), &url, &token).await;
            let status = r.status().as_u16();
            let connection = r
                .headers()
                .get("connection")
                .map(|v| v.to_str().unwrap().to_string());
            (status, connection, r.text().await.unwrap(), Instant::now())
        })
    };
    upstream.wait_for("/delay/4000").await;
    signal(p.pid(), "-TERM");

    // New connections are refused (public and admin) while the slow request is still running.
    wait_refused("the listeners to close", p.public).await;
    let refused_at = Instant::now();
    assert!(
        !slow.is_finished(),
        "the slow request finished before the listener closed"
    );
    assert_eq!(
        tokio::net::TcpStream::connect(p.admin)
            .await
            .unwrap_err()
            .kind(),
        std::io::ErrorKind::ConnectionRefused
    );

    // The in-flight request completes normally, then the process exits 0.
    let (status, connection, body, done_at) = slow.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "upstream ok 0"));
    // The drained connection tells the client it will close.
    assert_eq!(connection.as_deref(), Some("close"));
    assert!(done_at > refused_at);
    assert_eq!(p.wait_exit(Duration::from_secs(60)).await, 0);
    assert!(p.stderr_has("SIGTERM received"));
    assert!(p.stderr_has("draining in-flight requests"));
    assert!(!p.stderr_has("drain deadline passed"));

    // One audit line per request (a forwarded one's decision and completion merged), complete
    // and chained; last-used written at shutdown.
    let lines = support::merge_completions(read_audit_file(&p.audit_path())).0;
    let requests: Vec<_> = lines.iter().filter(|l| l["kind"] == "request").collect();
    assert_eq!(requests.len(), 2, "{lines:?}");
    assert_eq!(requests[0]["path"], "/apps/a/b");
    assert_eq!(requests[1]["path"], "/delay/4000");
    assert_eq!(requests[1]["status_code"], 200);
    assert_eq!(requests[1]["reason"], "ok");
    assert!(requests[1]["duration_ms"].as_f64().unwrap() >= 4000.0);
    assert!(
        requests
            .iter()
            .all(|l| l["api_token_id"] == token_id.as_str())
    );
    let out = run_cli(&["audit", "verify", p.audit_path().to_str().unwrap()]);
    assert_success(&out);
    let store = Store::open(&p.dir.path().join("tokengate.db"), Duration::from_secs(5)).unwrap();
    let row = store.find_token(&token_id).unwrap();
    assert!(
        row.last_used_at.is_some(),
        "last-used was not flushed at shutdown"
    );
    assert_eq!(row.last_used_ip.as_deref(), Some("127.0.0.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_waiting_at_the_drain_deadline_and_still_exits_zero() {
    let upstream = Upstream::start().await;
    let mut token = String::new();
    let o = Options {
        server: "shutdown_grace = \"1s\"".into(),
        ..Options::default()
    };
    let mut p = Proc::start(upstream.addr, &o, |db| {
        token = issue_into(db, "ci", "reader", &["apps:read"]).0
    })
    .await;
    get_bearer_expect(
        &client(),
        format!("http://{}/apps/a/b", p.public),
        &token,
        200,
    )
    .await;
    // `/slow` never answers.
    let stuck = {
        let url = format!("http://{}/slow/forever", p.public);
        let token = token.clone();
        tokio::spawn(async move {
            client()
                .get(&url)
                .header("authorization", bearer(&token))
                .send()
                .await
                .map(|r| r.status())
        })
    };
    upstream.wait_for("/slow/forever").await;
    signal(p.pid(), "-TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(30)).await, 0);
    assert!(p.stderr_has("drain deadline passed"));
    assert!(
        stuck.await.unwrap().is_err(),
        "the stuck request is cut at the deadline"
    );
    // What was written is complete and chained.
    let lines = read_audit_file(&p.audit_path());
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["kind"] == "request" && l["path"] == "/apps/a/b")
            .count(),
        1
    );
    let out = run_cli(&["audit", "verify", p.audit_path().to_str().unwrap()]);
    // The request cut at the deadline reached the upstream: its decision is on file; its
    // completion may be missing (exit 3, the request named), the chain is intact either way.
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("chain intact"));
}

// =================================================================================================
// store backup
// =================================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_backup_is_consistent_online_and_serves_the_same_tokens() {
    let tg = TestGateway::start().await;
    let (before, before_id) = tg.token("ci", "before-backup", &["apps:read"]);
    let c = client();
    get_bearer_expect(&c, tg.url("/apps/a/b"), &before, 200).await;

    // Online: the gateway keeps running (and writing last-used) during the backup.
    let backups = tempfile::tempdir().unwrap();
    let file = backups.path().join("tokengate-backup.db");
    let cfg = tg.config_path.to_str().unwrap().to_string();
    let out = run_cli(&["--config", &cfg, "store", "backup", file.to_str().unwrap()]);
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("integrity_check ok"));
    // Never over an existing file.
    let again = run_cli(&["--config", &cfg, "store", "backup", file.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(64));
    let (after, _) = tg.token("ci", "after-backup", &["apps:read"]);

    let copy = Store::open(&file, Duration::from_secs(5)).unwrap();
    assert_eq!(copy.integrity_check().unwrap(), "ok");
    assert_eq!(copy.find_token(&before_id).unwrap().name, "before-backup");
    assert!(
        copy.lookup_hash(&tokengate::token::hash(&before))
            .unwrap()
            .is_some()
    );
    assert!(
        copy.lookup_hash(&tokengate::token::hash(&after))
            .unwrap()
            .is_none()
    );
    drop(copy);

    // A gateway started on the backup file accepts the token issued before the backup.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &tg.upstream.addr.to_string(),
        &Options::default(),
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("path = \"tokengate.db\"", &format!("path = {:?}", file));
    std::fs::write(&config, text).unwrap();
    let restored = support::Running::start(&config).await;
    assert_eq!(
        get_text(&format!("http://{}/readyz", restored.admin))
            .await
            .0,
        200
    );
    let seen = tg.upstream.count();
    get_bearer_expect(&c, restored.url("/apps/restored/x"), &before, 200).await;
    assert_eq!(tg.upstream.count(), seen + 1);
    // The token issued after the backup is unknown there: 401, not forwarded, audited.
    let r = get_bearer_expect(&c, restored.url("/apps/restored/y"), &after, 401).await;
    assert!(challenge(&r).contains("error=\"invalid_token\""));
    assert_eq!(tg.upstream.count(), seen + 1);
    restored.stop().await;
    let lines = read_audit_file(&dir.path().join("audit.log"));
    support::assert_rejection_line(
        lines.iter().rev().find(|l| l["kind"] == "request").unwrap(),
        401,
        "unknown_token",
    );
    tg.stop().await;
}

// =================================================================================================
// deploy/
// =================================================================================================

/// `Key=Value` lines of one section of a unit file, in order.
fn unit_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == format!("[{section}]");
            continue;
        }
        if !inside || line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a Key=Value line: {line}"));
        out.push((k.trim().to_string(), v.trim().to_string()));
    }
    out
}

#[test]
fn systemd_unit_is_hardened_verifies_and_matches_the_cli() {
    let unit = read_repo("deploy/systemd/tokengate.service");
    let service = unit_section(&unit, "Service");
    let get = |k: &str| {
        service
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    for (k, want) in [
        ("User", "tokengate"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("StateDirectory", "tokengate"),
        ("LogsDirectory", "tokengate"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
        ("LimitNOFILE", "65536"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(get(k), Some(want), "{k}");
    }
    // The stop timeout leaves room for the drain (server.shutdown_grace in the shipped config).
    let example = Config::load(&Path::new(REPO).join("deploy/systemd/tokengate.toml")).unwrap();
    let stop: u64 = get("TimeoutStopSec")
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(Duration::from_secs(stop) > example.server.shutdown_grace + Duration::from_secs(5));
    assert_eq!(
        example.store.path,
        Path::new("/var/lib/tokengate/tokengate.db")
    );
    assert_eq!(
        example.audit.path.as_deref(),
        Some(Path::new("/var/log/tokengate/audit.log"))
    );

    // ExecStartPre / ExecStart parse with the real CLI, and do what they say.
    use clap::Parser;
    use tokengate::cli::{Cli, Command, ConfigCmd};
    let pre: Vec<&str> = get("ExecStartPre").unwrap().split_whitespace().collect();
    let start: Vec<&str> = get("ExecStart").unwrap().split_whitespace().collect();
    assert_eq!(pre[0], "/usr/bin/tokengate");
    assert_eq!(start[0], "/usr/bin/tokengate");
    let parsed = Cli::try_parse_from(pre.clone()).unwrap();
    assert!(matches!(parsed.command, Command::Config(ConfigCmd::Check)));
    assert_eq!(
        parsed.config.as_deref(),
        Some(Path::new("/etc/tokengate/tokengate.toml"))
    );
    let parsed = Cli::try_parse_from(start.clone()).unwrap();
    assert!(matches!(parsed.command, Command::Serve));
    assert_eq!(
        parsed.config.as_deref(),
        Some(Path::new("/etc/tokengate/tokengate.toml"))
    );
    // The real binary with ExecStartPre's arguments: 0 on the shipped config, 64 on a bad one.
    let swap = |args: &[&str], cfg: &str| -> Vec<String> {
        args[1..]
            .iter()
            .map(|a| {
                if *a == "/etc/tokengate/tokengate.toml" {
                    cfg.to_string()
                } else {
                    a.to_string()
                }
            })
            .collect()
    };
    // `config check` loads the certificates too: give the shipped config real ones.
    let certs = tempfile::tempdir().unwrap();
    let shipped = certs.path().join("tokengate.toml");
    let text = read_repo("deploy/systemd/tokengate.toml");
    std::fs::write(&shipped, with_test_certs(&text, certs.path())).unwrap();
    let out = StdCommand::new(BIN)
        .args(swap(&pre, shipped.to_str().unwrap()))
        .output()
        .unwrap();
    assert_success(&out);
    let bad_dir = tempfile::tempdir().unwrap();
    let bad = bad_dir.path().join("tokengate.toml");
    std::fs::write(&bad, "[server]\nlisten = \"nowhere\"\n").unwrap();
    let out = StdCommand::new(BIN)
        .args(swap(&pre, bad.to_str().unwrap()))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "ExecStartPre must stop a bad config"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));

    // systemd-analyze verify, on a copy whose binary path points at the one cargo built (the
    // verifier checks that the executable exists); any warning about the unit fails the test.
    if !ensure_tool("systemd-analyze", "systemd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("tokengate.service");
    std::fs::write(&copy, unit.replace("/usr/bin/tokengate", BIN)).unwrap();
    let out = StdCommand::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("tokengate.service"))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
    // And its exposure score stays in the "OK" band.
    let out = StdCommand::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&copy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    match text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for tokengate.service: "))
    {
        Some((_, rest)) => {
            let score: f64 = rest.split_whitespace().next().unwrap().parse().unwrap();
            assert!(score <= 2.5, "exposure {score}:\n{text}");
        }
        None => eprintln!(
            "SKIP: this systemd-analyze has no offline security review:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn sysusers_file_creates_the_units_user() {
    let sysusers = read_repo("deploy/systemd/tokengate.sysusers");
    let line = sysusers.lines().find(|l| l.starts_with("u ")).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[..2], ["u", "tokengate"]);
    assert!(line.ends_with("/var/lib/tokengate"));
}

/// The TOML embedded in the ConfigMap (`tokengate.toml: |` block).
fn configmap_toml(yaml: &str) -> String {
    let mut lines = yaml
        .lines()
        .skip_while(|l| l.trim() != "tokengate.toml: |")
        .skip(1);
    let mut out = String::new();
    for l in lines.by_ref() {
        if !l.is_empty() && !l.starts_with("    ") {
            break;
        }
        out.push_str(l.strip_prefix("    ").unwrap_or(""));
        out.push('\n');
    }
    out
}

#[test]
fn kubernetes_manifests_agree_with_each_other_and_the_cli() {
    let cm = read_repo("deploy/kubernetes/configmap.yaml");
    let deploy = read_repo("deploy/kubernetes/deployment.yaml");
    let toml = configmap_toml(&cm);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokengate.toml");
    std::fs::write(&path, with_test_certs(&toml, dir.path())).unwrap();
    let out = run_cli(&["--config", path.to_str().unwrap(), "config", "check"]);
    assert!(
        out.status.success(),
        "{}\n{toml}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shipped = dir.path().join("shipped.toml");
    std::fs::write(&shipped, &toml).unwrap();
    let cfg = Config::load(&shipped).unwrap();
    // Probes reach the admin listener, so it must not be on loopback in Kubernetes.
    assert_eq!(cfg.admin.listen, "0.0.0.0:9090".parse().unwrap());
    assert!(cfg.server.shutdown_grace < Duration::from_secs(45 - 5));

    let has = |s: &str| assert!(deploy.contains(s), "deployment.yaml lacks {s:?}");
    has("replicas: 1\n");
    has("type: Recreate\n");
    has("terminationGracePeriodSeconds: 45\n");
    has("containerPort: 9090\n");
    has(
        "readinessProbe:\n            httpGet:\n              path: /readyz\n              port: admin\n",
    );
    has(
        "livenessProbe:\n            httpGet:\n              path: /healthz\n              port: admin\n",
    );
    has("runAsNonRoot: true");
    has("readOnlyRootFilesystem: true");
    has("allowPrivilegeEscalation: false");
    // Mounts line up with the paths in the config.
    has("mountPath: /etc/tokengate/config\n");
    has("mountPath: /etc/tokengate/tls\n");
    has("mountPath: /var/lib/tokengate\n");
    assert!(cfg.store.path.starts_with("/var/lib/tokengate"));
    assert!(
        cfg.audit
            .path
            .as_ref()
            .unwrap()
            .starts_with("/var/lib/tokengate")
    );
    let tls = cfg.server.tls.as_ref().unwrap();
    assert_eq!(tls.cert, Path::new("/etc/tokengate/tls/tls.crt"));
    assert_eq!(tls.key, Path::new("/etc/tokengate/tls/tls.key"));
    // Names referenced by the Deployment exist.
    assert!(deploy.contains("name: tokengate-config") && cm.contains("name: tokengate-config"));
    assert!(
        deploy.contains("secretName: tokengate-tls")
            && read_repo("deploy/kubernetes/secret.yaml").contains("name: tokengate-tls")
    );
    assert!(read_repo("deploy/kubernetes/secret.yaml").contains("type: kubernetes.io/tls"));
    assert!(
        deploy.contains("claimName: tokengate-data")
            && read_repo("deploy/kubernetes/pvc.yaml").contains("name: tokengate-data")
    );
    assert!(read_repo("deploy/kubernetes/pvc.yaml").contains("ReadWriteOnce"));
    let np = read_repo("deploy/kubernetes/networkpolicy.yaml");
    assert!(np.contains("port: 9090") && np.contains("namespaceSelector"));
    // The container args parse with the real CLI.
    let args_line = deploy
        .lines()
        .find(|l| l.trim_start().starts_with("args:"))
        .unwrap();
    let args: Vec<String> =
        serde_json::from_str(args_line.trim_start().trim_start_matches("args:").trim()).unwrap();
    use clap::Parser;
    let cli =
        tokengate::cli::Cli::try_parse_from(std::iter::once("tokengate".to_string()).chain(args))
            .unwrap();
    assert!(matches!(cli.command, tokengate::cli::Command::Serve));
    assert_eq!(
        cli.config.as_deref(),
        Some(Path::new("/etc/tokengate/config/tokengate.toml"))
    );
    for f in [
        "configmap.yaml",
        "secret.yaml",
        "pvc.yaml",
        "deployment.yaml",
        "service.yaml",
        "networkpolicy.yaml",
    ] {
        assert!(
            read_repo("deploy/kubernetes/kustomization.yaml").contains(&format!("- {f}")),
            "{f}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerfile_is_multi_stage_non_root_and_its_healthcheck_probe_works() {
    let df = read_repo("deploy/docker/Dockerfile");
    let froms: Vec<&str> = df.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(
        froms.len() >= 2 && froms[0].contains(" AS build"),
        "{froms:?}"
    );
    assert!(df.contains("COPY --from=build /src/target/release/tokengate /usr/bin/tokengate"));
    let user = df.lines().find_map(|l| l.strip_prefix("USER ")).unwrap();
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "USER {user}"
    );
    // The baked-in config passes `config check` and keeps the admin listener on loopback.
    let out = run_cli(&[
        "--config",
        &format!("{REPO}/deploy/docker/tokengate.toml"),
        "config",
        "check",
    ]);
    assert_success(&out);
    let cfg = Config::load(&Path::new(REPO).join("deploy/docker/tokengate.toml")).unwrap();
    assert!(cfg.admin.listen.ip().is_loopback());
    assert_eq!(cfg.admin.listen.port(), 9090);

    // HEALTHCHECK: its exact command, run against a real gateway's admin port.
    let hc_start = df.find("\nHEALTHCHECK ").unwrap();
    let hc = df[hc_start..].replace("\\\n", " ");
    let json = &hc[hc.find("CMD [").unwrap() + 4..hc.find("]\n").unwrap() + 1];
    let argv: Vec<String> = serde_json::from_str(json).unwrap();
    assert_eq!(argv[0], "bash");
    if !ensure_tool("bash", "bash") {
        return;
    }
    let tg = TestGateway::start().await;
    let probe = |port: u16| {
        let argv: Vec<String> = argv
            .iter()
            .map(|a| a.replace("/9090", &format!("/{port}")))
            .collect();
        async move {
            tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .status()
                .await
                .unwrap()
                .success()
        }
    };
    assert!(
        probe(tg.admin_addr.port()).await,
        "probe fails against a healthy gateway"
    );
    let port = tg.admin_addr.port();
    tg.stop().await;
    assert!(!probe(port).await, "probe passes with nothing listening");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logrotate_config_rotates_without_breaking_the_audit_chain() {
    let shipped = read_repo("deploy/logrotate/tokengate");
    assert!(shipped.contains("/var/log/tokengate/audit.log {"));
    let directives: Vec<&str> = shipped
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert!(directives.iter().any(|l| l.starts_with("create ")));
    assert!(directives.contains(&"delaycompress"));
    assert!(
        !directives
            .iter()
            .any(|l| l.contains("copytruncate") || l.contains("dateext"))
    );
    assert!(shipped.contains("systemctl reload tokengate.service"));
    if !ensure_tool("logrotate", "logrotate") {
        return;
    }
    let upstream = Upstream::start().await;
    let mut token = String::new();
    let mut p = Proc::start(upstream.addr, &Options::default(), |db| {
        token = issue_into(db, "ci", "reader", &["apps:read"]).0
    })
    .await;
    let c = client();
    let hit = |path: &'static str| {
        let (c, url, token) = (
            c.clone(),
            format!("http://{}{path}", p.public),
            token.clone(),
        );
        async move {
            c.get(&url)
                .header("authorization", bearer(&token))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    for _ in 0..3 {
        assert_eq!(hit("/apps/before/rotation").await, 200);
    }
    // The shipped file, pointed at this test's log and process (and without an owner for
    // `create`, which names a system user that a test machine may not have).
    let audit = p.audit_path();
    let conf = shipped
        .replace("/var/log/tokengate/audit.log", audit.to_str().unwrap())
        .replace(
            "systemctl reload tokengate.service",
            &format!("kill -HUP {}", p.pid()),
        )
        .replace("create 0640 tokengate tokengate", "create 0640");
    let conf_path = p.dir.path().join("logrotate.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let state = p.dir.path().join("logrotate.state");
    // The lines so far must be on disk before the rename.
    eventually(
        "the audit lines to be written",
        Duration::from_secs(10),
        || async { (read_audit_file(&audit).len() >= 3).then_some(()) },
    )
    .await;
    let out = StdCommand::new("logrotate")
        .arg("-f")
        .arg("-s")
        .arg(&state)
        .arg(&conf_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "logrotate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rotated = p.dir.path().join("audit.log.1");
    assert!(rotated.exists(), "delaycompress keeps audit.log.1 plain");
    eventually(
        "the reload after rotation",
        Duration::from_secs(20),
        || async { p.stderr_has("audit log reopened").then_some(()) },
    )
    .await;
    for _ in 0..2 {
        assert_eq!(hit("/apps/after/rotation").await, 200);
    }
    signal(p.pid(), "-TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(30)).await, 0);
    let old = read_audit_file(&rotated);
    let new = read_audit_file(&audit);
    assert_eq!(old.iter().filter(|l| l["kind"] == "request").count(), 3);
    assert_eq!(new.iter().filter(|l| l["kind"] == "request").count(), 2);
    // The new file continues the sequence, and the set verifies oldest first.
    assert_eq!(
        new[0]["seq"].as_u64().unwrap(),
        old.last().unwrap()["seq"].as_u64().unwrap() + 1
    );
    let out = run_cli(&[
        "audit",
        "verify",
        rotated.to_str().unwrap(),
        audit.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Points the shipped `/etc/tokengate/tls/tls.{crt,key}` at a certificate made for the test,
/// since `config check` loads the certificate files like `serve` does.
fn with_test_certs(toml: &str, dir: &Path) -> String {
    let ck = rcgen::generate_simple_self_signed(vec!["tokengate.test".into()]).unwrap();
    let crt = dir.join("tls.crt");
    let key = dir.join("tls.key");
    std::fs::write(&crt, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    toml.replace("/etc/tokengate/tls/tls.crt", crt.to_str().unwrap())
        .replace("/etc/tokengate/tls/tls.key", key.to_str().unwrap())
}

// =================================================================================================
// systemd Type=notify
// =================================================================================================

/// `tokengate serve` under `NOTIFY_SOCKET`: READY=1 once listening, RELOADING=1 (with
/// MONOTONIC_USEC) then READY=1 around SIGHUP, STOPPING=1 on SIGTERM.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reports_readiness_reload_and_stop_to_systemd() {
    use std::os::unix::net::UnixDatagram;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &upstream.addr.to_string(), &Options::default());
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    // A bound on each wait, so a missing message fails the test instead of hanging it.
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = StdCommand::new(BIN)
        .args(["--config", config.to_str().unwrap(), "serve"])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let recv = move || {
        let mut buf = vec![0u8; 4096];
        let n = sock.recv(&mut buf).expect("a notification from tokengate");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    };
    let (recv, ready) = tokio::task::spawn_blocking(move || {
        let m = recv();
        (recv, m)
    })
    .await
    .unwrap();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=serving on 127.0.0.1:")),
        "{ready}"
    );
    assert!(
        ready.contains(&format!("MAINPID={}", child.id())),
        "{ready}"
    );

    signal(child.id(), "-HUP");
    let (recv, reloading, again) = tokio::task::spawn_blocking(move || {
        let a = recv();
        let b = recv();
        (recv, a, b)
    })
    .await
    .unwrap();
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC with RELOADING=1");
    assert!(usec.parse::<u64>().unwrap() > 0);
    assert!(again.lines().any(|l| l == "READY=1"), "{again}");
    assert!(again.contains("STATUS=configuration reloaded"), "{again}");

    signal(child.id(), "-TERM");
    let stopping = tokio::task::spawn_blocking(recv).await.unwrap();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
