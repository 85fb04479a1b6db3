//! Differential tests of the path pipeline (issue 3, SPEC §3, §5): generated request paths go
//! through `path::canonicalise` and the route's compiled rules in process (many cases), and through
//! a running gateway over raw TCP (fewer). The allow/deny decision must equal a small reference
//! matcher written here from the spec's wording, a backend that percent-decodes the forwarded path
//! once must reach the same decision, and an accepted request's forwarded path must be
//! byte-identical to the canonical path.

mod support;

use std::cmp::Ordering;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use support::*;
use tokengate::config::Config;
use tokengate::path::canonicalise;

/// The rules under test: (methods, template, permission; None = public). Both the gateway's
/// config and the reference matcher are built from this one table.
const RULES: &[(&[&str], &str, Option<&str>)] = &[
    (&["GET", "HEAD"], "/apps/{app}/**", Some("apps:read")),
    (&["GET"], "/apps/{app}/secrets/**", Some("apps:secrets")),
    (
        &["GET"],
        "/apps/billing/secrets/**",
        Some("billing:secrets"),
    ),
    (&["GET"], "/apps/{app}/status", None),
    (&["POST"], "/apps/{app}/deploy", Some("apps:deploy")),
    (&["GET"], "/docs/{page...}", None),
    (&["GET"], "/docs/", Some("docs:index")),
    (&["GET"], "/e/{a}/{b}", Some("e:read")),
    (&["GET"], "/e/{a}/", Some("e:list")),
    (&[], "/admin/**", Some("admin:all")),
];

/// What the token under test holds: exact, resource wildcard, and a permission no rule needs.
const PERMISSIONS: &[&str] = &["apps:read", "billing:secrets", "e:*", "docs:write"];

fn rules_toml() -> String {
    RULES
        .iter()
        .map(|(methods, path, perm)| match perm {
            Some(p) => permission_rule(methods, path, p),
            None => public_rule(methods, path),
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------
// The reference matcher: a direct reading of SPEC §3, no tries, no shortcuts.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg<'a> {
    Lit(&'a str),
    Param,
    Rest,
}

fn template(t: &str) -> Vec<Seg<'_>> {
    t[1..]
        .split('/')
        .map(|s| {
            if s == "**" || (s.starts_with('{') && s.ends_with("...}")) {
                Seg::Rest
            } else if s.starts_with('{') && s.ends_with('}') {
                Seg::Param
            } else {
                Seg::Lit(s)
            }
        })
        .collect()
}

/// Segments of a path: "/" has none, "/a/" is ["a", ""] (a trailing slash is significant).
fn segments(path: &str) -> Vec<&str> {
    if path == "/" {
        Vec::new()
    } else {
        path[1..].split('/').collect()
    }
}

fn matches(t: &[Seg<'_>], segs: &[&str]) -> bool {
    for (i, s) in t.iter().enumerate() {
        match s {
            Seg::Rest => return true,
            Seg::Lit(l) => {
                if segs.get(i) != Some(l) {
                    return false;
                }
            }
            // One whole, non-empty segment.
            Seg::Param => {
                if segs.get(i).is_none_or(|s| s.is_empty()) {
                    return false;
                }
            }
        }
    }
    t.len() == segs.len()
}

/// Specificity at position `i`: a literal beats a parameter, which beats the template ending
/// there, which beats a rest.
fn rank(t: &[Seg<'_>], i: usize) -> u8 {
    match t.get(i) {
        Some(Seg::Lit(_)) => 3,
        Some(Seg::Param) => 2,
        Some(Seg::Rest) => 0,
        None if t.last() == Some(&Seg::Rest) => 0,
        None => 1,
    }
}

fn more_specific(a: usize, b: usize, n: usize) -> Ordering {
    let (ta, tb) = (template(RULES[a].1), template(RULES[b].1));
    (0..=n)
        .map(|i| rank(&ta, i).cmp(&rank(&tb, i)))
        .find(|o| o.is_ne())
        .unwrap_or(Ordering::Equal)
        .then((!RULES[a].0.is_empty()).cmp(&!RULES[b].0.is_empty()))
}

fn grants(held: &[&str], needed: &str) -> bool {
    held.iter().any(|p| {
        *p == "*"
            || *p == needed
            || p.strip_suffix('*')
                .is_some_and(|res| res.ends_with(':') && needed.starts_with(res))
    })
}

/// What the gateway must answer for a canonical path: (status, audit reason).
fn reference(method: &str, segs: &[&str]) -> (u16, &'static str) {
    let candidates: Vec<usize> = (0..RULES.len())
        .filter(|&i| RULES[i].0.is_empty() || RULES[i].0.contains(&method))
        .filter(|&i| matches(&template(RULES[i].1), segs))
        .collect();
    let Some(best) = candidates.iter().copied().reduce(|a, b| {
        let o = more_specific(a, b, segs.len());
        assert_ne!(o, Ordering::Equal, "the rule table has a tie");
        if o.is_gt() { a } else { b }
    }) else {
        return (403, "no_rule");
    };
    match RULES[best].2 {
        None => (200, "ok"),
        Some(p) if grants(PERMISSIONS, p) => (200, "ok"),
        Some(_) => (403, "insufficient_permission"),
    }
}

/// Percent-decodes once, as a backend would.
fn decode_once(path: &str) -> String {
    let out = support::percent_decode_once(path);
    String::from_utf8(out).expect("a canonical ASCII-only path decodes to UTF-8")
}

// ------------------------------------------------------------------------------------------------
// Generators.

/// Pieces of a segment: mostly the literals the rules use (plain, encoded, case-changed), plus
/// everything that has ever confused a path check.
fn piece() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        6 => prop::sample::select(vec![
            "apps", "admin", "billing", "secrets", "status", "deploy", "docs", "e", "x", "y", "web-1", "readme",
        ]),
        2 => prop::sample::select(vec![
            "%61pps", "%61dmin", "admi%6E", "billin%67", "%73ecrets", "%41pps", "APPS", "Admin", "%64ocs", "%65",
            "%7e", "~", "-", "_", ".a", "a.", "..a", "%2Ea", "%3a", "%3A", ":", "@", "%40", "%20", "!", "$", "'", "*", "+", "=",
        ]),
        2 => prop::sample::select(vec![
            ".", "..", "%2e", "%2E", "%2e%2e", ".%2E", "...", "%252e", "%2f", "%2F", "%5c", "%5C", "%3b", "%3f", "%23",
            "%00", "%0a", "%7f", "%25", "%", "%g1", "%c3%a9", "%ef%bc%8e", "%c0%ae", ";", "\\", "\"", "{", "}", "|",
            "^", "[", "]", "\u{e9}", "\u{ff0e}", "",
        ]),
    ]
}

/// The first segment: the roots the rules name, their look-alikes, or any piece.
fn root() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        8 => prop::sample::select(vec!["apps", "apps", "apps", "docs", "e", "admin"]),
        2 => prop::sample::select(vec!["%61pps", "%61dmin", "APPS", "Admin", "%64ocs", "%65", "appsX", "apps.", "_tokengatex"]),
        2 => piece(),
    ]
}

/// A segment: usually one piece, sometimes two run together.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => piece().prop_map(str::to_string),
        1 => (piece(), piece()).prop_map(|(a, b)| format!("{a}{b}")),
    ]
}

/// A raw request path: "/", a root, 0-4 more segments, maybe a trailing slash.
fn raw_path() -> impl Strategy<Value = String> {
    (
        prop::option::weighted(0.95, root()),
        prop::collection::vec(segment(), 0..5),
        any::<bool>(),
    )
        .prop_map(|(root, segs, slash)| {
            let mut p = String::from("/");
            if let Some(root) = root {
                p.push_str(root);
                for s in segs {
                    p.push('/');
                    p.push_str(&s);
                }
                if slash {
                    p.push('/');
                }
            }
            p
        })
}

fn method() -> impl Strategy<Value = &'static str> {
    prop_oneof![6 => Just("GET"), 1 => Just("POST"), 1 => Just("DELETE"), 1 => Just("HEAD")]
}

fn query() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "",
        "",
        "",
        "?q=1",
        "?/admin",
        "?a=%2e%2e%2fadmin&b",
        "?x=..%2F..%2Fadmin#frag",
    ])
}

/// The gateway's own decision from the library: canonicalise, the route's rule table, permissions.
fn library_decision(
    cfg: &Config,
    method: &str,
    raw: &str,
) -> Result<(String, (u16, &'static str)), ()> {
    let canon = canonicalise(raw, false).map_err(|_| ())?;
    let route = cfg.route_for(&canon.path).expect("the catch-all route");
    let lookup = route.rules.lookup(method, &canon.path);
    let held: Vec<String> = PERMISSIONS.iter().map(|p| p.to_string()).collect();
    let decision = match lookup.enforced {
        None => (403, "no_rule"),
        Some(m) if m.rule.public => (200, "ok"),
        Some(m) if tokengate::authz::grants(&held, m.rule.permission.as_deref().unwrap_or("")) => {
            (200, "ok")
        }
        Some(_) => (403, "insufficient_permission"),
    };
    Ok((canon.path, decision))
}

fn test_config() -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "127.0.0.1:9",
        &Options {
            rules: rules_toml(),
            ..Options::default()
        },
    );
    let cfg = Config::load(&path).unwrap();
    (dir, cfg)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, failure_persistence: None, ..ProptestConfig::default() })]

    /// In process: the library's decision equals the reference on the canonical path and on the
    /// path as a backend decodes it; the canonical path is a fixed point.
    #[test]
    fn library_decision_equals_the_reference(method in method(), raw in raw_path()) {
        let (_dir, cfg) = test_config_cached();
        if let Ok((canonical, decision)) = library_decision(cfg, method, &raw) {
            prop_assert_eq!(decision, reference(method, &segments(&canonical)), "{} {:?} -> {:?}", method, raw, canonical);
            let decoded = decode_once(&canonical);
            prop_assert_eq!(
                reference(method, &segments(&decoded)),
                decision,
                "a backend decoding {:?} once reads {:?} and decides differently", canonical, decoded
            );
            prop_assert_eq!(canonicalise(&canonical, false).map(|c| c.path), Ok(canonical.clone()));
        }
    }
}

/// The config is loaded once for all in-process cases.
fn test_config_cached() -> &'static (tempfile::TempDir, Config) {
    static CFG: std::sync::OnceLock<(tempfile::TempDir, Config)> = std::sync::OnceLock::new();
    CFG.get_or_init(test_config)
}

#[test]
fn reference_matcher_reads_the_spec() {
    let d = |m: &str, p: &str| reference(m, &segments(p));
    assert_eq!(d("GET", "/apps/x"), (200, "ok"));
    assert_eq!(d("GET", "/apps/x/"), (200, "ok"));
    assert_eq!(d("GET", "/apps"), (403, "no_rule"));
    assert_eq!(d("GET", "/apps/"), (403, "no_rule"));
    assert_eq!(d("GET", "/appsX/y"), (403, "no_rule"));
    assert_eq!(
        d("GET", "/apps/x/secrets/k"),
        (403, "insufficient_permission")
    );
    assert_eq!(d("GET", "/apps/billing/secrets/k"), (200, "ok"));
    assert_eq!(d("GET", "/apps/x/status"), (200, "ok"));
    assert_eq!(d("GET", "/apps/x/status/y"), (200, "ok"));
    assert_eq!(
        d("POST", "/apps/x/deploy"),
        (403, "insufficient_permission")
    );
    assert_eq!(d("POST", "/apps/x/status"), (403, "no_rule"));
    assert_eq!(d("GET", "/docs"), (200, "ok"));
    assert_eq!(d("GET", "/docs/"), (403, "insufficient_permission"));
    assert_eq!(d("GET", "/docs/a/b"), (200, "ok"));
    assert_eq!(d("GET", "/e/a/b"), (200, "ok"));
    assert_eq!(d("GET", "/e/a/"), (200, "ok"));
    assert_eq!(d("GET", "/e/a"), (403, "no_rule"));
    assert_eq!(d("DELETE", "/admin"), (403, "insufficient_permission"));
    assert_eq!(d("GET", "/"), (403, "no_rule"));
}

/// Guards against a vacuous property: the generator reaches every outcome often.
#[test]
fn generator_reaches_every_outcome() {
    use proptest::strategy::ValueTree;
    let (_dir, cfg) = test_config_cached();
    let mut runner = TestRunner::deterministic();
    let (mut allowed, mut denied, mut refused) = (0, 0, 0);
    for _ in 0..2000 {
        let m = method().new_tree(&mut runner).unwrap().current();
        let raw = raw_path().new_tree(&mut runner).unwrap().current();
        match library_decision(cfg, m, &raw) {
            Ok((_, (200, _))) => allowed += 1,
            Ok(_) => denied += 1,
            Err(()) => refused += 1,
        }
    }
    eprintln!("allowed {allowed}, denied {denied}, refused {refused} of 2000");
    assert!(
        allowed >= 200 && denied >= 200 && refused >= 200,
        "{allowed} {denied} {refused}"
    );
}

// ------------------------------------------------------------------------------------------------
// Through a running gateway.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_gateway_agrees_with_the_reference_and_forwards_the_canonical_path() {
    let tg = TestGateway::start_with(Options {
        sections: NO_RATE_LIMIT.into(),
        ..Options::rules(rules_toml())
    })
    .await;
    let (tok, _) = tg.token("ci", "diff", PERMISSIONS);
    let (_dir, cfg) = test_config_cached();
    let counts = [
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ];
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        let config = ProptestConfig {
            cases: 400,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        let mut runner = TestRunner::new(config);
        let result = runner.run(&(method(), raw_path(), query()), |(method, path, query)| {
            handle.block_on(async {
                let before = tg.upstream.count();
                let body = if method == "POST" { "Content-Length: 0\r\n" } else { "" };
                let req = format!(
                    "{method} {path}{query} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {tok}\r\n{body}Connection: close\r\n\r\n"
                );
                let resp = raw(tg.addr, &req).await;
                let got: Vec<String> = tg.upstream.received()[before..].iter().map(|r| r.target.clone()).collect();
                let id = resp.header("x-request-id").map(str::to_string);
                prop_assert!(id.is_some(), "{} {:?}: the parser refused what the gateway should judge: {}", method, path, resp.raw);
                let line = tg.last_request_line().await;
                prop_assert_eq!(line["request_id"].as_str(), id.as_deref());
                match library_decision(cfg, method, &path) {
                    Err(()) => {
                        counts[2].fetch_add(1, Relaxed);
                        prop_assert_eq!(resp.status, 400, "{} {:?}", method, path);
                        prop_assert_eq!(&line["reason"], "bad_path");
                        prop_assert!(got.is_empty(), "{:?} forwarded {:?}", path, got);
                    }
                    Ok((canonical, decision)) => {
                        let (status, reason) = reference(method, &segments(&canonical));
                        prop_assert_eq!(decision, (status, reason));
                        prop_assert_eq!(resp.status, status, "{} {:?} -> {:?}: {}", method, path, canonical, resp.raw);
                        prop_assert_eq!(&line["reason"], reason);
                        prop_assert_eq!(&line["path"], canonical.as_str());
                        if status == 200 {
                            counts[0].fetch_add(1, Relaxed);
                            let q = query.split('#').next().unwrap_or("");
                            prop_assert_eq!(got, vec![format!("{canonical}{q}")], "forwarded target for {:?}", path);
                        } else {
                            counts[1].fetch_add(1, Relaxed);
                            prop_assert!(got.is_empty(), "{:?} forwarded {:?}", path, got);
                        }
                    }
                }
                Ok::<(), TestCaseError>(())
            })
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    });
    let [a, d, r] = counts.map(|c| c.into_inner());
    eprintln!("live: forwarded {a}, denied {d}, refused {r}");
    assert!(
        a >= 40 && d >= 40 && r >= 40,
        "generator too one-sided: {a} {d} {r}"
    );
    tg.stop().await;
}
