//! Criterion benches for every hot path of one request (issue 9), one group per path:
//!
//! - `token`: format + checksum, SHA-256, cache hit, and the whole auth step (steps 3–5 on a hit);
//! - `path`: canonicalisation (step 1);
//! - `authz`: rule matching with 10 and 1,000 rules (step 6);
//! - `ratelimit`: the per-token GCRA check (step 7);
//! - `audit`: building a request record, reserving + sending it (request path, step 8), and
//!   encoding it as a chained JSON line (writer thread);
//! - `pipeline`: steps 1–8 for one allowed request, without sockets, composed from the public
//!   functions the gateway uses (see `decide` below for what is and is not in it).
//!
//! Run: `cargo bench --bench hot_paths` (all) or `cargo bench --bench hot_paths -- pipeline`.
//! Figures and method: docs/performance.md.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use sha2::{Digest, Sha256};
use tokengate::audit::{AuditConfig, AuditLog, Entry, OnFailure, RequestRecord};
use tokengate::authz::{Rule, RuleTable};
use tokengate::cache::TokenCache;
use tokengate::config::{Config, Rate};
use tokengate::ratelimit::TokenLimiter;
use tokengate::store::{NewTokenSpec, Store};
use tokengate::{auth, authz, gateway, path, token};

/// The allocator the `tokengate` binary uses, so allocation costs match the gateway's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Everything a request needs, built once: a real store with one real token (looked up and put
/// in the cache, as after the first request), a config with the usual rules, a limiter, an
/// audit log writing to a temp file.
struct Fixture {
    _dir: tempfile::TempDir,
    cfg: Arc<Config>,
    cache: TokenCache,
    audit: AuditLog,
    /// `Bearer <token>`; lives only in this process's memory, never printed.
    authorization: HeaderValue,
    hash: token::TokenHash,
}

const RULES: &str = r#"
[[routes.rules]]
methods = ["GET", "HEAD"]
path = "/apps/{app}/**"
permission = "apps:read"

[[routes.rules]]
methods = ["POST"]
path = "/apps/{app}/deploy"
permission = "apps:deploy"

[[routes.rules]]
methods = ["GET", "POST", "PUT"]
path = "/echo/**"
permission = "apps:read"

[[routes.rules]]
methods = ["GET"]
path = "/health"
public = true
"#;

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = format!(
            r#"[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[store]
path = "tokengate.db"
[audit]
path = "audit.log"
[rate_limit]
requests_per_second = 1000000000
burst = 1000000000
[[routes]]
name = "api"
prefix = "/"
upstream = "http://127.0.0.1:9"
{RULES}"#
        );
        let cfg_path = dir.path().join("tokengate.toml");
        std::fs::write(&cfg_path, &text).expect("write config");
        let cfg = Config::load(&cfg_path).expect("bench config is valid");
        let store = Store::open(&cfg.store.path, cfg.store.busy_timeout).expect("store");
        let now = tokengate::store::system_now_ms();
        store
            .create_account("bench", None, "bench", now)
            .expect("account");
        let spec = NewTokenSpec {
            account: "bench".into(),
            name: "bench".into(),
            role: None,
            permissions: vec!["apps:read".into()],
            scopes: Default::default(),
            allowed_cidrs: vec![],
            rate: None,
            expires_at: Some(now + 90 * 86_400_000),
            created_by: "bench".into(),
        };
        let (_row, new) = store.create_token(&spec, "tg", 5, now).expect("token");
        let hash = new.hash;
        let row = store.lookup_hash(&hash).expect("lookup").expect("found");
        let cache = TokenCache::new();
        assert!(cache.fill(hash, cache.entry(&hash, row), cache.epoch()));
        let authorization =
            HeaderValue::from_str(&format!("Bearer {}", new.plaintext)).expect("header");
        drop(new);
        let audit = AuditLog::open(AuditConfig {
            path: Some(dir.path().join("audit.log")),
            on_failure: OnFailure::Reject,
            max_bytes: None,
            queue: 65_536,
        })
        .expect("audit log");
        Fixture {
            _dir: dir,
            cfg: Arc::new(cfg),
            cache,
            audit,
            authorization,
            hash,
        }
    }

    /// A request head as hyper hands it to the gateway (HTTP/1.1, origin-form).
    fn request(&self, uri: &str) -> Request<()> {
        Request::builder()
            .method(Method::GET)
            .uri(uri)
            .header(header::HOST, "api.example.test")
            .header(header::USER_AGENT, "wrk/4.1.0 ci-pipeline")
            .header(header::ACCEPT, "*/*")
            .header(header::AUTHORIZATION, self.authorization.clone())
            .body(())
            .expect("request")
    }
}

fn rule(methods: &[&str], path: &str, permission: Option<&str>) -> Rule {
    Rule {
        methods: methods.iter().map(|m| m.to_string()).collect(),
        path: path.to_string(),
        permission: permission.map(str::to_string),
        public: permission.is_none(),
        shadow: false,
    }
}

/// `n` distinct, non-ambiguous rules of the shapes real configs use (literals, `{param}`, rests).
fn rules(n: usize) -> Vec<Rule> {
    (0..n)
        .map(|i| match i % 5 {
            0 => rule(
                &["GET", "HEAD"],
                &format!("/svc{i}/{{app}}/**"),
                Some("apps:read"),
            ),
            1 => rule(
                &["POST"],
                &format!("/svc{i}/{{app}}/deploy"),
                Some("apps:deploy"),
            ),
            2 => rule(
                &["GET"],
                &format!("/svc{i}/items/{{id}}"),
                Some("items:read"),
            ),
            3 => rule(&[], &format!("/svc{i}/admin/**"), Some("admin:all")),
            _ => rule(&["GET"], &format!("/svc{i}/health"), None),
        })
        .collect()
}

// ------------------------------------------------------------------------------------ token

fn bench_token(c: &mut Criterion) {
    let fx = Fixture::new();
    let req = fx.request("/apps/billing/items");
    let mut g = c.benchmark_group("token");
    g.throughput(Throughput::Elements(1));
    let credential = auth::extract(req.headers(), None).expect("credential");
    g.bench_function("extract_header", |b| {
        b.iter(|| auth::extract(black_box(req.headers()), black_box(None)).is_ok())
    });
    g.bench_function("parse_checksum", |b| {
        b.iter(|| token::parse(black_box(credential)).is_ok())
    });
    g.bench_function("sha256", |b| b.iter(|| token::hash(black_box(credential))));
    g.bench_function("cache_hit", |b| {
        b.iter(|| fx.cache.get(black_box(&fx.hash)).is_some())
    });
    // Steps 3–5 on a cache hit: extract, parse + checksum, hash, cache, judge.
    let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    g.bench_function("auth_step", |b| {
        b.iter(|| {
            let cred = auth::extract(black_box(req.headers()), None).expect("credential");
            let parsed = auth::parse(cred).expect("well-formed");
            let prefix = parsed.display_prefix().to_string();
            let entry = fx.cache.get(&parsed.hash()).expect("cached");
            auth::judge(&entry, tokengate::store::system_now_ms(), peer).expect("valid");
            (prefix, entry)
        })
    });
    g.finish();
}

// ------------------------------------------------------------------------------------ path

fn bench_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("path");
    g.throughput(Throughput::Elements(1));
    for (name, p) in [
        ("short", "/health"),
        ("typical", "/apps/billing/items/12345"),
        ("escaped", "/apps/bill%69ng/items/a%3ab/%7Euser"),
        (
            "long_12_segments",
            "/a/bb/ccc/dddd/eeeee/ffffff/ggggggg/hhhhhhhh/iiiiiiiii/jjjjjjjjjj/kkkkkkkkkkk/l",
        ),
    ] {
        g.bench_with_input(BenchmarkId::new("canonicalise", name), p, |b, p| {
            b.iter(|| path::canonicalise(black_box(p), false).is_ok())
        });
    }
    g.bench_function("reject_dot_segment", |b| {
        b.iter(|| path::canonicalise(black_box("/apps/%2e%2E/admin"), false).is_err())
    });
    g.finish();
}

// ------------------------------------------------------------------------------------ authz

fn bench_authz(c: &mut Criterion) {
    let mut g = c.benchmark_group("authz");
    g.throughput(Throughput::Elements(1));
    for n in [10usize, 1_000] {
        let table = RuleTable::new(rules(n)).expect("rules compile");
        let last = (n - 1) / 5 * 5; // a `/svc{i}/{app}/**` rule near the end
        let hit = format!("/svc{last}/billing/items/42");
        let literal = format!("/svc{}/items/7", last.saturating_sub(3));
        g.bench_with_input(BenchmarkId::new("lookup_capture_rest", n), &hit, |b, p| {
            b.iter(|| {
                black_box(table.lookup("GET", black_box(p)))
                    .enforced
                    .is_some()
            })
        });
        g.bench_with_input(
            BenchmarkId::new("lookup_literal_param", n),
            &literal,
            |b, p| {
                b.iter(|| {
                    black_box(table.lookup("GET", black_box(p)))
                        .enforced
                        .is_some()
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("lookup_no_rule", n),
            "/nothing/here",
            |b, p| {
                b.iter(|| {
                    black_box(table.lookup("GET", black_box(p)))
                        .enforced
                        .is_none()
                })
            },
        );
    }
    let perms: Vec<String> = ["apps:read", "logs:read", "env:read"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    g.bench_function("grants", |b| {
        b.iter(|| authz::grants(black_box(&perms), black_box("env:read")))
    });
    g.finish();
}

// ------------------------------------------------------------------------------------ ratelimit

fn bench_ratelimit(c: &mut Criterion) {
    let mut g = c.benchmark_group("ratelimit");
    g.throughput(Throughput::Elements(1));
    // High enough never to refuse: the allowed path is the one every request takes.
    let rate = Rate {
        requests_per_second: 1e9,
        burst: 1_000_000_000,
    };
    let one = TokenLimiter::new();
    g.bench_function("check_one_token", |b| {
        b.iter(|| one.check(black_box("tok_bench"), rate).is_ok())
    });
    let many = TokenLimiter::new();
    let ids: Vec<String> = (0..10_000).map(|i| format!("tok_{i:016}")).collect();
    for id in &ids {
        let _ = many.check(id, rate);
    }
    let mut i = 0usize;
    g.bench_function("check_among_10k_tokens", |b| {
        b.iter(|| {
            i = (i + 7919) % ids.len();
            many.check(black_box(&ids[i]), rate).is_ok()
        })
    });
    g.finish();
}

// ------------------------------------------------------------------------------------ audit

fn sample_record() -> RequestRecord {
    RequestRecord {
        timestamp: tokengate::audit::now_rfc3339(),
        request_id: "5eed5eed5eed5eed0000002a".into(),
        auth_type: "api_token".into(),
        api_token_id: Some("tok_3hT9kq0ZpLmN2xYw".into()),
        api_token_name: Some("ci-deploy".into()),
        token_prefix: Some("tg_AbCdEfGh".into()),
        account: Some("ci-bot".into()),
        method: "GET".into(),
        path: "/apps/billing/items".into(),
        status_code: 200,
        rbac_decision: "allow".into(),
        reason: "ok".into(),
        permission: Some("apps:read".into()),
        rule: Some("api:GET,HEAD /apps/{app}/**".into()),
        shadow_decision: None,
        client_ip: "127.0.0.1".into(),
        user_agent: Some("wrk/4.1.0 ci-pipeline".into()),
        upstream: Some("api".into()),
        duration_ms: 0.123,
        mode: Some("proxy".into()),
        phase: None,
        trace_id: None,
    }
}

/// A chained line as serde would encode it: serde JSON of the entry, `,"seq":N`, then `"chain"`
/// = SHA-256(prev chain ‖ line) in hex. The writer's own encoder (`audit::line`, private) writes
/// the same bytes without serde for request and completion records.
fn encode_line(entry: &Entry, seq: u64, prev: &str) -> (Vec<u8>, String) {
    let mut line = Vec::with_capacity(512);
    serde_json::to_writer(&mut line, entry).expect("serializable");
    line.pop();
    line.extend_from_slice(b",\"seq\":");
    line.extend_from_slice(seq.to_string().as_bytes());
    line.push(b'}');
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(&line);
    let chain = token::hex(&h.finalize());
    line.pop();
    line.extend_from_slice(b",\"chain\":\"");
    line.extend_from_slice(chain.as_bytes());
    line.extend_from_slice(b"\"}\n");
    (line, chain)
}

/// Runs `f` `iters` times in batches, flushing the audit log between batches outside the
/// timed region so that the bounded queue (65,536) never fills.
fn timed_with_flush(audit: &AuditLog, iters: u64, mut f: impl FnMut()) -> Duration {
    const BATCH: u64 = 8_192;
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(BATCH);
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        total += t.elapsed();
        audit.flush().expect("audit flush");
        left -= n;
    }
    total
}

fn bench_audit(c: &mut Criterion) {
    let fx = Fixture::new();
    let mut g = c.benchmark_group("audit");
    g.throughput(Throughput::Elements(1));
    g.bench_function("timestamp_rfc3339", |b| {
        b.iter(tokengate::audit::now_rfc3339)
    });
    g.bench_function("build_record", |b| b.iter(|| black_box(sample_record())));
    let entry = Entry::Request(sample_record());
    g.bench_function("serde_json_only", |b| {
        b.iter(|| serde_json::to_vec(black_box(&entry)).expect("json"))
    });
    let prev = tokengate::audit::GENESIS_CHAIN.to_string();
    g.bench_function("encode_chained_line", |b| {
        b.iter(|| encode_line(black_box(&entry), 42, &prev))
    });
    g.bench_function("reserve_send", |b| {
        b.iter_custom(|iters| {
            timed_with_flush(&fx.audit, iters, || {
                let r = fx.audit.reserve().expect("audit accepts");
                r.send(Entry::Request(sample_record()));
            })
        })
    });
    // Write-ahead (issue 16): a forwarded request waits until its decision line is written.
    // One request at a time: the full round trip to the writer thread and a write().
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for concurrent in [1u64, 64] {
        g.bench_function(format!("write_ahead_commit_{concurrent}_concurrent"), |b| {
            b.iter_custom(|iters| {
                let per_task = iters.div_ceil(concurrent);
                let audit = fx.audit.clone();
                rt.block_on(async move {
                    let t0 = std::time::Instant::now();
                    let tasks: Vec<_> = (0..concurrent)
                        .map(|_| {
                            let audit = audit.clone();
                            tokio::spawn(async move {
                                for _ in 0..per_task {
                                    let r = audit.reserve().expect("audit accepts");
                                    r.commit(Entry::Request(sample_record()))
                                        .written()
                                        .await
                                        .expect("written");
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.expect("task");
                    }
                    // Amortised per request.
                    t0.elapsed()
                        .mul_f64(iters as f64 / (per_task * concurrent) as f64)
                })
            })
        });
    }
    g.finish();
}

// ------------------------------------------------------------------------------------ pipeline

/// Polls `Gateway::evaluate` once: with the token cached, steps 1–8 never wait (no store read,
/// no Redis), so the future is ready on its first poll and no runtime is measured.
fn evaluate(
    gw: &gateway::Gateway,
    req: &Request<()>,
    conn: gateway::ConnInfo,
) -> Response<tokengate::body::Body> {
    let fut = std::pin::pin!(gw.evaluate(req, conn));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.poll(&mut cx) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => panic!("evaluate waited: the token should be cached"),
    }
}

fn bench_pipeline(c: &mut Criterion) {
    let fx = Fixture::new();
    let conn = gateway::ConnInfo {
        peer: "127.0.0.1:40000".parse().expect("addr"),
        tls: false,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let gw = {
        let _guard = rt.enter();
        let store = Store::open(&fx.cfg.store.path, fx.cfg.store.busy_timeout).expect("store");
        let cfg = Config::load(&fx._dir.path().join("tokengate.toml")).expect("config");
        gateway::Gateway::new(cfg, store, fx.audit.clone())
    };
    let req = fx.request("/apps/billing/items?page=2");
    // The first request reads the token from the store and caches it (that part may wait).
    let first = rt.block_on(gw.evaluate(&req, conn));
    // The request must really be allowed, or the bench measures nothing useful.
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["ratelimit-limit"], "1000000000");
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(1));
    // `Gateway::evaluate`: the code `Gateway::handle` runs up to the upstream call (request id,
    // hygiene, client IP, canonical path, route and rule lookup, failed-auth gate, extract + parse
    // + hash + cache hit + judge, permission + scopes, rate limit, last-use bookkeeping, audit
    // reserve, response headers, metrics, audit record built and sent). Not included: the upstream
    // request rewrite (it needs a hyper body) and the request-timeout future.
    g.bench_function("allowed_request_steps_1_to_8", |b| {
        b.iter_custom(|iters| {
            timed_with_flush(&fx.audit, iters, || {
                drop(black_box(evaluate(&gw, &req, conn)))
            })
        })
    });
    // For comparison: building the request head alone (what hyper's parser hands over costs more).
    g.bench_function("build_request_head_only", |b| {
        b.iter(|| fx.request(black_box("/apps/billing/items?page=2")))
    });
    g.finish();
}

/// Shorter runs than criterion's defaults: the machine is shared, and these are sub-µs paths.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_token, bench_path, bench_authz, bench_ratelimit, bench_audit, bench_pipeline
}
criterion_main!(benches);
