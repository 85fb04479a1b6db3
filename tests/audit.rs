//! The audit log end to end (issue 7): exactly one line per request over 100,000 mixed requests; a
//! full disk (a small tmpfs the test mounts, or RLIMIT_FSIZE on the real binary) with
//! `on_failure = "reject"` and `"continue"`; `tokengate audit verify` against every kind of tamper;
//! the reader's filters and `--follow` (across size rotation and a logrotate-style rename) through
//! the binary; CLI admin events written exactly once through the store outbox.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::*;
use tokengate::audit;
use tokengate::store::{NewTokenSpec, Store};

/// Liveness bound for things that happen in the background (writer retries every 250 ms, the
/// outbox is drained every 200 ms, `--follow` polls every 200 ms). Not a speed goal.
const PATIENCE: Duration = Duration::from_secs(30);

/// Runs the CLI as OS user `auditor` (the actor of its admin events is `cli:auditor`).
fn cli(cfg: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .env("USER", "auditor")
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Complete lines of an audit file (a line still being written is left out), parsed.
fn read_log(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn request_ids(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l["kind"] == "request")
        .map(|l| l["request_id"].as_str().unwrap().to_string())
        .collect()
}

/// A response header's value, as text.
fn header(h: &http::HeaderMap, name: &str) -> Option<String> {
    h.get(name).map(|v| v.to_str().unwrap().to_string())
}

/// The `X-Request-Id` every answer carries (panics, naming `status`, when it is missing).
fn request_id(status: u16, h: &http::HeaderMap) -> String {
    header(h, "x-request-id").unwrap_or_else(|| panic!("{status} without X-Request-Id"))
}

/// Polls `cond` until it holds; panics after [`PATIENCE`].
async fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    wait_until_within(what, PATIENCE, cond).await
}

/// Waits until every id is in the file's complete lines; returns the lines.
async fn wait_for_ids(path: &Path, ids: &[String]) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    wait_until("the audit lines", || {
        lines = read_log(path);
        let have: HashSet<String> = request_ids(&lines).into_iter().collect();
        // ...and every forwarded request among them has its completion line.
        ids.iter().all(|id| have.contains(id)) && support::merge_completions(lines.clone()).1 == 0
    })
    .await;
    lines
}

/// Waits until the store's outbox is empty: every CLI admin event queued there has been written
/// to the audit log and acknowledged, so no later drain can write it again.
async fn wait_for_empty_outbox(db: &Path) {
    let store = Store::open(db, Duration::from_secs(5)).unwrap();
    wait_until("an empty outbox", || {
        store.outbox_peek(10).unwrap().is_empty()
    })
    .await;
}

/// A token string with a valid shape and a wrong checksum (401 `bad_checksum`, no lookup).
const BAD_CHECKSUM_TOKEN: &str = "tg_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// Reads `name N` from a Prometheus text page.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// A minimal keep-alive client: hyper's connection-level HTTP/1.1 client, so every request is sent
// exactly once (no pool, no retries) and 32 of them keep 32 connections busy.
// ---------------------------------------------------------------------------------------------

struct Conn {
    addr: SocketAddr,
    sender: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        Conn { addr, sender: None }
    }

    /// Sends one GET; returns (status, X-Request-Id, WWW-Authenticate, body).
    async fn get(
        &mut self,
        path: &str,
        bearer: Option<&str>,
    ) -> (u16, String, Option<String>, Bytes) {
        if let Some(s) = &mut self.sender {
            // A connection the server closed is replaced before anything is sent on it.
            if s.ready().await.is_err() {
                self.sender = None;
            }
        }
        if self.sender.is_none() {
            let stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().unwrap();
        let mut req = http::Request::get(path)
            .header("host", self.addr.to_string())
            .header("user-agent", "audit-test");
        if let Some(t) = bearer {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = sender
            .send_request(req.body(Empty::new()).unwrap())
            .await
            .expect("request failed on the client side");
        let status = resp.status().as_u16();
        let rid = request_id(status, resp.headers());
        let www = header(resp.headers(), "www-authenticate");
        let close = resp
            .headers()
            .get("connection")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        if close {
            self.sender = None;
        }
        (status, rid, www, body)
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Exactly one line per request
// ---------------------------------------------------------------------------------------------

/// What each request of the mix is, and what it must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Allowed,
    BadPath,
    NoToken,
    BadChecksum,
    Forbidden,
    RateLimited,
    DeadUpstream,
}

/// The mix. Forwarded requests (200, 502) cost the most in a debug build, so they are 30%.
fn kind_of(i: usize) -> Kind {
    match i % 10 {
        0 | 1 => Kind::Allowed,
        2 => Kind::BadPath,
        3 => Kind::NoToken,
        4 => Kind::BadChecksum,
        5 | 6 => Kind::Forbidden,
        7 | 8 => Kind::RateLimited,
        _ => Kind::DeadUpstream,
    }
}

/// `"key":"value"` or `"key":value` of a flat audit line, without a JSON parser (100,000 lines in a
/// debug build); the writer's field order and escaping make the first match the field itself.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let tag = format!("\"{key}\":");
    let at = line
        .find(&tag)
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + tag.len();
    let rest = &line[at..];
    match rest.strip_prefix('"') {
        Some(v) => &v[..v.find('"').unwrap()],
        None => &rest[..rest.find([',', '}']).unwrap()],
    }
}

/// What the client must see for each kind: the upstream's answer, or the gateway's error code and
/// challenge.
fn check_answer(kind: Kind, status: u16, www: Option<&str>, body: &[u8]) {
    let body = std::str::from_utf8(body).unwrap();
    let (code, challenge) = match (kind, status) {
        (Kind::Allowed | Kind::RateLimited, 200) => {
            assert!(body.starts_with("upstream ok"), "{body}");
            assert_eq!(www, None);
            return;
        }
        (Kind::BadPath, _) => ("invalid_request", None),
        (Kind::NoToken, _) => ("unauthorized", Some(r#"Bearer realm="tokengate""#)),
        (Kind::BadChecksum, _) => ("invalid_token", Some(r#"error="invalid_token""#)),
        (Kind::Forbidden, _) => ("insufficient_scope", Some(r#"error="insufficient_scope""#)),
        (Kind::RateLimited, _) => ("rate_limited", None),
        (Kind::DeadUpstream, _) => ("bad_gateway", None),
        (Kind::Allowed, _) => panic!("allowed request got {status}: {body}"),
    };
    assert!(
        body.contains(&format!(r#""error":"{code}""#)),
        "{kind:?}: {body}"
    );
    match challenge {
        Some(c) => assert!(www.is_some_and(|w| w.contains(c)), "{kind:?}: {www:?}"),
        None => assert_eq!(www, None, "{kind:?}"),
    }
    if kind == Kind::NoToken {
        assert!(
            !www.unwrap().contains("error="),
            "no error= without credentials: {www:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_line_per_request_over_100k_mixed_requests() {
    const TOTAL: usize = 100_000;
    const TASKS: usize = 32;
    let dead = dead_addr();
    let tg = TestGateway::start_with(Options {
        // 401s must stay 401s, not turn into the per-IP limiter's 429.
        sections: failed_auth_limit(100_000_000),
        extra_routes: format!(
            r#"
[[routes]]
name = "dead"
prefix = "/dead/"
upstream = "http://{dead}"
{}"#,
            permission_rule(&["GET"], "/dead/**", "apps:read")
        ),
        ..Options::default()
    })
    .await;
    let (fast, _) = tg.rated_token("acme", "fast", 1_000_000.0, 1_000_000);
    let (slow, _) = tg.rated_token("acme", "slow", 1.0, 1);

    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (addr, fast, slow) = (tg.addr, fast.clone(), slow.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let mut seen = Vec::with_capacity(TOTAL / TASKS + 1);
            for i in (t..TOTAL).step_by(TASKS) {
                let kind = kind_of(i);
                let (path, bearer) = match kind {
                    // The query must never reach the log.
                    Kind::Allowed => (
                        "/apps/billing/status?code=s3cr3t-query",
                        Some(fast.as_str()),
                    ),
                    Kind::BadPath => ("/apps/a;b/status", Some(fast.as_str())),
                    Kind::NoToken => ("/apps/billing/status", None),
                    Kind::BadChecksum => ("/apps/billing/status", Some(BAD_CHECKSUM_TOKEN)),
                    Kind::Forbidden => ("/admin/users", Some(fast.as_str())),
                    Kind::RateLimited => ("/apps/billing/status", Some(slow.as_str())),
                    Kind::DeadUpstream => ("/dead/x", Some(fast.as_str())),
                };
                let (status, rid, www, body) = conn.get(path, bearer).await;
                check_answer(kind, status, www.as_deref(), &body);
                seen.push((kind, status, rid));
            }
            seen
        }));
    }
    let mut seen = Vec::with_capacity(TOTAL);
    for t in tasks {
        seen.extend(t.await.unwrap());
    }
    let elapsed = t0.elapsed();
    println!(
        "{TOTAL} requests over {TASKS} keep-alive connections in {elapsed:?} ({:.0} req/s, debug build)",
        TOTAL as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(seen.len(), TOTAL);

    // What the client saw: each kind got its status.
    let mut client_by_status: HashMap<u16, usize> = HashMap::new();
    for (kind, status, _) in &seen {
        let want: &[u16] = match kind {
            Kind::Allowed => &[200],
            Kind::BadPath => &[400],
            Kind::NoToken | Kind::BadChecksum => &[401],
            Kind::Forbidden => &[403],
            Kind::RateLimited => &[429, 200],
            Kind::DeadUpstream => &[502],
        };
        assert!(want.contains(status), "{kind:?} got {status}");
        *client_by_status.entry(*status).or_default() += 1;
    }
    assert!(client_by_status[&429] > TOTAL / 20, "{client_by_status:?}");

    // What the log holds: one line per request, same statuses, same ids, nothing else.
    tg.gw.audit().flush_async().await.unwrap();
    let path = tg.audit_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let mut log: HashMap<String, (u16, String)> = HashMap::with_capacity(TOTAL);
    let mut lines = 0;
    // A forwarded request has its decision line (written before forwarding) and a completion
    // line: one request row, as `tokengate audit` shows it.
    let mut decided: HashSet<String> = HashSet::new();
    for l in text.lines() {
        let rid = field(l, "request_id").to_string();
        if field(l, "kind") == "completion" {
            assert!(decided.remove(&rid), "completion without its decision: {l}");
            let status: u16 = field(l, "status_code").parse().unwrap();
            let prev = log.insert(rid.clone(), (status, field(l, "reason").to_string()));
            assert!(prev.is_none(), "request_id {rid} logged twice");
            continue;
        }
        assert_eq!(field(l, "kind"), "request", "{l}");
        if l.contains(r#""phase":"decision""#) {
            assert!(
                decided.insert(rid.clone()),
                "request_id {rid} decided twice"
            );
            assert!(!log.contains_key(&rid), "request_id {rid} logged twice");
            lines += 1;
            continue;
        }
        let status: u16 = field(l, "status_code").parse().unwrap();
        let prev = log.insert(rid.clone(), (status, field(l, "reason").to_string()));
        assert!(prev.is_none(), "request_id {rid} logged twice");
        lines += 1;
    }
    assert!(
        decided.is_empty(),
        "decisions without completion: {decided:?}"
    );
    assert_eq!(lines, TOTAL, "exactly one request row per request");
    let mut log_by_status: HashMap<u16, usize> = HashMap::new();
    for (kind, status, rid) in &seen {
        let (st, reason) = log.get(rid).unwrap_or_else(|| panic!("no line for {rid}"));
        assert_eq!(st, status, "{rid}");
        let want = match (kind, status) {
            (Kind::Allowed | Kind::RateLimited, 200) => "ok",
            (Kind::BadPath, _) => "bad_path",
            (Kind::NoToken, _) => "missing_token",
            (Kind::BadChecksum, _) => "bad_checksum",
            (Kind::Forbidden, _) => "insufficient_permission",
            (Kind::RateLimited, _) => "rate_limited",
            (Kind::DeadUpstream, _) => "upstream_error",
            (Kind::Allowed, _) => unreachable!(),
        };
        assert_eq!(reason, want, "{kind:?} {rid}");
        *log_by_status.entry(*st).or_default() += 1;
    }
    assert_eq!(log_by_status, client_by_status);

    // What the upstream received: exactly the 200s, each once, under the logged request id.
    let received = tg.upstream.received();
    assert_eq!(received.len(), client_by_status[&200]);
    let upstream_ids: HashSet<&str> = received
        .iter()
        .map(|r| r.headers["x-request-id"].to_str().unwrap())
        .collect();
    assert_eq!(upstream_ids.len(), received.len());
    let ok_ids: HashSet<&str> = seen
        .iter()
        .filter(|(_, s, _)| *s == 200)
        .map(|(_, _, rid)| rid.as_str())
        .collect();
    assert_eq!(upstream_ids, ok_ids);

    let report = audit::verify(std::slice::from_ref(&path)).unwrap();
    assert!(report.is_complete(), "{report}");
    assert_eq!(report.lines, text.lines().count() as u64);
    for secret in [
        fast.as_str(),
        slow.as_str(),
        "s3cr3t-query",
        "Bearer",
        BAD_CHECKSUM_TOKEN,
    ] {
        assert!(!text.contains(secret), "{secret} in the audit log");
    }
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. A full disk
// ---------------------------------------------------------------------------------------------

/// How the disk runs out of room.
enum Backend {
    /// In-process gateway with its audit log on a small tmpfs.
    Tmpfs {
        tg: TestGateway,
        fs: Tmpfs,
        filler: Option<PathBuf>,
    },
    /// The real binary with its RLIMIT_FSIZE lowered to the log's size (`prlimit`).
    Fsize { proc: Served },
}

/// A gateway whose audit log can be made unwritable and writable again.
struct Rig {
    addr: SocketAddr,
    admin: SocketAddr,
    upstream: Upstream,
    config: PathBuf,
    log: PathBuf,
    /// The gateway's store (its outbox holds CLI admin events until they are written).
    db: PathBuf,
    token: String,
    backend: Backend,
    /// Owns the temp folders (dropped last: after the gateway and the unmount).
    _dirs: Vec<tempfile::TempDir>,
}

impl Rig {
    /// On a tmpfs when this process may mount one, else under RLIMIT_FSIZE.
    async fn start(on_failure: &str, force_fsize: bool) -> Rig {
        if !force_fsize {
            let mnt_dir = tempfile::tempdir().unwrap();
            let mnt = mnt_dir.path().join("mnt");
            // `TOKENGATE_TEST_NO_MOUNT` forces the RLIMIT_FSIZE fallback below.
            let mounted = std::env::var_os("TOKENGATE_TEST_NO_MOUNT")
                .is_none()
                .then(|| Tmpfs::mount(&mnt, 256 * 1024))
                .flatten();
            if let Some(fs) = mounted {
                let log = mnt.join("audit.log");
                let tg = TestGateway::start_with(Options {
                    audit_path: Some(log.to_str().unwrap().to_string()),
                    audit: format!("on_failure = \"{on_failure}\"\n"),
                    ..Options::default()
                })
                .await;
                let (token, _) = tg.token("acme", "ci", &["apps:read"]);
                return Rig {
                    addr: tg.addr,
                    admin: tg.admin_addr,
                    upstream: tg.upstream.clone(),
                    config: tg.config_path.clone(),
                    log,
                    db: tg.dir.path().join("tokengate.db"),
                    token,
                    backend: Backend::Tmpfs {
                        tg,
                        fs,
                        filler: None,
                    },
                    _dirs: vec![mnt_dir],
                };
            }
            eprintln!("cannot mount a tmpfs here: falling back to RLIMIT_FSIZE");
        }
        let dir = tempfile::tempdir().unwrap();
        let upstream = Upstream::start().await;
        let config = write_config(
            dir.path(),
            &upstream.addr.to_string(),
            &Options::audit(format!("on_failure = \"{on_failure}\"\n")),
        );
        let store = Store::open(&dir.path().join("tokengate.db"), Duration::from_secs(5)).unwrap();
        let now = tokengate::store::system_now_ms();
        store.create_account("acme", None, "test", now).unwrap();
        let spec = token_spec("acme", "ci", &["apps:read"], None);
        let (_, new) = store.create_token(&spec, "tg", 1000, now).unwrap();
        drop(store);
        let proc = serve_binary(&config);
        Rig {
            addr: proc.addr,
            admin: proc.admin,
            upstream,
            log: dir.path().join("audit.log"),
            db: dir.path().join("tokengate.db"),
            config,
            token: new.plaintext,
            backend: Backend::Fsize { proc },
            _dirs: vec![dir],
        }
    }

    fn is_fsize(&self) -> bool {
        matches!(self.backend, Backend::Fsize { .. })
    }

    /// No room left for the audit log.
    fn fill(&mut self) {
        let log_len = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        match &mut self.backend {
            Backend::Tmpfs { fs, filler, .. } => *filler = Some(fill(&fs.dir)),
            Backend::Fsize { proc } => prlimit(proc.child.id(), &format!("{log_len}:")),
        }
    }

    /// Room again.
    fn free(&mut self) {
        match &mut self.backend {
            Backend::Tmpfs { filler, .. } => {
                std::fs::remove_file(filler.take().expect("filled")).unwrap();
            }
            Backend::Fsize { proc } => prlimit(proc.child.id(), "unlimited:"),
        }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        get_bearer(
            &client(),
            format!("http://{}{path}", self.addr),
            &self.token,
        )
        .await
    }

    /// `n` requests that must be answered 200; their request ids.
    async fn get_ok(&self, n: usize, why: &str) -> Vec<String> {
        let mut ids = Vec::new();
        for _ in 0..n {
            let (st, rid, _) = status_and_id(self.get("/apps/billing/status").await).await;
            assert_eq!(st, 200, "{why}");
            ids.push(rid);
        }
        ids
    }

    async fn admin_get(&self, path: &str) -> (u16, String) {
        let r = client()
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn metric(&self, name: &str) -> f64 {
        metric(&self.admin_get("/metrics").await.1, name)
    }

    /// The child survived (SIGXFSZ did not kill it) and logged the failure.
    fn assert_binary_alive_and_alerted(&mut self) {
        if let Backend::Fsize { proc } = &mut self.backend {
            assert!(proc.child.try_wait().unwrap().is_none(), "the gateway died");
            let err = proc.stderr.lock().unwrap().join("\n");
            assert!(err.contains("audit log write failed"), "{err}");
        }
    }

    async fn stop(self) {
        match self.backend {
            Backend::Tmpfs { tg, fs, .. } => {
                tg.stop().await;
                drop(fs);
            }
            Backend::Fsize { proc } => drop(proc),
        }
    }
}

/// Lowers or raises the soft RLIMIT_FSIZE of a running process (`soft:` keeps the hard limit,
/// so raising it again needs no privilege).
fn prlimit(pid: u32, soft: &str) {
    let o = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--fsize={soft}")])
        .output()
        .expect("prlimit (util-linux) is needed for the RLIMIT_FSIZE fallback");
    assert!(o.status.success(), "prlimit: {}", stderr(&o));
}

/// The id the gateway gave a request: `X-Request-Id`, also in error bodies.
async fn status_and_id(r: reqwest::Response) -> (u16, String, String) {
    let status = r.status().as_u16();
    let rid = request_id(status, r.headers());
    let www = header(r.headers(), "www-authenticate");
    let retry = header(r.headers(), "retry-after");
    let body = r.text().await.unwrap();
    if status == 503 {
        // The client learns "retry later", not which part of the gateway failed; the reason
        // (`audit_unavailable`) is in the metrics (these requests have no audit line).
        assert_eq!(www, None, "a 503 for the audit log is not an auth failure");
        assert_eq!(retry.as_deref(), Some("1"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "unavailable", "{body}");
        assert_eq!(v["request_id"], rid.as_str(), "{body}");
    }
    (status, rid, body)
}

async fn full_disk_reject(mut rig: Rig) {
    let mut ok_ids = rig.get_ok(5, "served while the log is writable").await;
    wait_for_ids(&rig.log, &ok_ids).await;
    assert_eq!(rig.admin_get("/readyz").await.0, 200);

    rig.fill();
    // The request that meets the full disk was accepted while the writer was healthy: it is
    // forwarded and its line waits in memory. From then on, nothing is forwarded.
    let mut first_refusal = None;
    for _ in 0..500 {
        let (st, rid, _) = status_and_id(rig.get("/apps/billing/status").await).await;
        match st {
            200 => ok_ids.push(rid),
            503 => {
                first_refusal = Some(rid);
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    let first_refusal = first_refusal.expect("a full disk must turn into 503s");
    let forwarded = rig.upstream.count();
    assert_eq!(forwarded, ok_ids.len());
    let mut refused = vec![first_refusal];
    for _ in 0..20 {
        let (st, rid, _) = status_and_id(rig.get("/apps/billing/status").await).await;
        assert_eq!(st, 503);
        refused.push(rid);
    }
    assert_eq!(
        rig.upstream.count(),
        forwarded,
        "nothing forwarded unaudited"
    );
    let (st, body) = rig.admin_get("/readyz").await;
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("audit: FAILED"), "{body}");
    assert!(rig.metric("tokengate_audit_write_failures_total").await > 0.0);
    assert_eq!(rig.metric("tokengate_audit_healthy").await, 0.0);
    let refusals = r#"tokengate_requests_total{decision="deny",reason="audit_unavailable",route="api",status_class="5xx"}"#;
    assert_eq!(
        rig.metric(refusals).await,
        refused.len() as f64,
        "every refusal is counted"
    );
    let during = request_ids(&read_log(&rig.log));
    // Write-ahead: the request that met the full disk was decided but its decision line could
    // not be written, so it was refused (503) before the upstream saw a byte; the line waits
    // in memory.
    assert!(
        !during.contains(&refused[0]),
        "the line that met the full disk is not written yet"
    );
    rig.assert_binary_alive_and_alerted();

    // Room again: the writer's retry writes the backlog, the gateway serves again, no restart.
    rig.free();
    let mut recovering = Vec::new();
    let t0 = Instant::now();
    loop {
        let (st, rid, _) = status_and_id(rig.get("/apps/billing/status").await).await;
        if st == 200 {
            ok_ids.push(rid);
            break;
        }
        assert_eq!(st, 503);
        recovering.push(rid);
        assert!(
            t0.elapsed() < PATIENCE,
            "no recovery after the disk was freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ok_ids.extend(rig.get_ok(5, "served again after recovery").await);
    let lines = wait_for_ids(&rig.log, &ok_ids).await;
    assert_eq!(rig.admin_get("/readyz").await.0, 200);

    // Nothing lost, nothing duplicated, nothing forwarded without its line.
    let lines = support::merge_completions(lines).0;
    let ids = request_ids(&lines);
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a line was duplicated");
    let logged_ok: HashSet<String> = lines
        .iter()
        .filter(|l| l["kind"] == "request" && l["status_code"] == 200)
        .map(|l| l["request_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(logged_ok, ok_ids.iter().cloned().collect::<HashSet<_>>());
    let upstream_ids: HashSet<String> = rig
        .upstream
        .received()
        .iter()
        .map(|r| r.headers["x-request-id"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(rig.upstream.count(), ok_ids.len());
    assert_eq!(
        upstream_ids, logged_ok,
        "the upstream got exactly the audited requests"
    );
    // Refused while the disk was full: never forwarded, and (the writer refusing) not logged —
    // but the one that met the full disk: its decision waited in memory, its completion says 503.
    // (Whether that one got that far depends on where the disk filled: a completion line that
    // met it first turns the writer unhealthy, and the next request is refused at step 8.)
    if let Some(met) = lines
        .iter()
        .find(|l| l["request_id"] == refused[0].as_str())
    {
        assert_eq!(met["status_code"], 503, "{met}");
        assert_eq!(met["reason"], "audit_unavailable", "{met}");
    }
    for rid in &refused[1..] {
        assert!(!unique.contains(rid), "{rid} was refused but logged");
    }
    // Refused just as the writer recovered: at most a 503 line (the refusal itself).
    for l in &lines {
        if l["status_code"] != 200 && l["request_id"] != refused[0].as_str() {
            assert!(
                recovering.iter().any(|r| l["request_id"] == r.as_str()),
                "{l}"
            );
            assert_rejection_line(l, 503, "audit_unavailable");
        }
    }
    let report = audit::verify(std::slice::from_ref(&rig.log)).unwrap();
    assert!(report.is_complete(), "{report}");
    assert_eq!(report.lines, read_log(&rig.log).len() as u64);
    rig.assert_binary_alive_and_alerted();
    rig.stop().await;
}

async fn full_disk_continue(mut rig: Rig) {
    let mut ok_ids = rig.get_ok(5, "served while the log is writable").await;
    wait_for_ids(&rig.log, &ok_ids).await;
    let failures_before = rig.metric("tokengate_audit_write_failures_total").await;

    rig.fill();
    ok_ids.extend(rig.get_ok(30, "on_failure = continue keeps serving").await);
    assert_eq!(rig.upstream.count(), ok_ids.len());
    let m = eventually("write failures are counted", PATIENCE, || async {
        let m = rig.admin_get("/metrics").await.1;
        (metric(&m, "tokengate_audit_write_failures_total") > failures_before).then_some(m)
    })
    .await;
    let failures = metric(&m, "tokengate_audit_write_failures_total");
    assert!(failures > failures_before, "write failures are counted");
    assert!(
        metric(&m, "tokengate_audit_queue_depth") > 0.0,
        "records wait in memory"
    );
    assert!(!request_ids(&read_log(&rig.log)).contains(ok_ids.last().unwrap()));
    // An admin event from the CLI while the log is failing: it goes through the outbox, and must
    // be written once even when the failure outlasts the gateway's flush wait (5 s).
    let o = cli(&rig.config, &["account", "create", "during-outage"]);
    assert!(o.status.success(), "{}", stderr(&o));
    tokio::time::sleep(Duration::from_secs(7)).await;
    rig.assert_binary_alive_and_alerted();

    rig.free();
    let lines = wait_for_ids(&rig.log, &ok_ids).await;
    let mut lines = lines;
    wait_until("the CLI event", || {
        lines = read_log(&rig.log);
        lines.iter().any(|l| l["event"] == "account.created")
    })
    .await;
    // The outbox is emptied once the line is written: later drains cannot repeat it.
    wait_for_empty_outbox(&rig.db).await;
    let lines = read_log(&rig.log);
    let ids = request_ids(&lines);
    assert_eq!(
        ids.len(),
        ok_ids.len(),
        "one line per request, none lost or duplicated"
    );
    assert_eq!(
        ids.iter().collect::<HashSet<_>>(),
        ok_ids.iter().collect::<HashSet<_>>()
    );
    let created: Vec<_> = lines
        .iter()
        .filter(|l| l["event"] == "account.created")
        .collect();
    assert_eq!(created.len(), 1, "the CLI event exactly once: {created:?}");
    assert_eq!(created[0]["actor"], "cli:auditor");
    assert_eq!(created[0]["account"], "during-outage");
    let report = audit::verify(std::slice::from_ref(&rig.log)).unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.lines, lines.len() as u64);
    assert!(rig.metric("tokengate_audit_write_failures_total").await >= failures);
    assert_eq!(rig.metric("tokengate_audit_queue_depth").await, 0.0);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_with_reject_answers_503_forwards_nothing_and_recovers_without_restart() {
    full_disk_reject(Rig::start("reject", false).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_with_continue_keeps_serving_counts_failures_and_writes_the_backlog() {
    full_disk_continue(Rig::start("continue", false).await).await;
}

/// The fallback where mounting is impossible, run everywhere: the real binary under a lowered
/// RLIMIT_FSIZE survives SIGXFSZ, refuses with 503 and recovers when the limit is raised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_size_limit_with_reject_survives_sigxfsz_and_recovers() {
    let rig = Rig::start("reject", true).await;
    assert!(rig.is_fsize());
    full_disk_reject(rig).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_size_limit_with_continue_keeps_serving_and_writes_the_backlog() {
    let rig = Rig::start("continue", true).await;
    assert!(rig.is_fsize());
    full_disk_continue(rig).await;
}

// ---------------------------------------------------------------------------------------------
// 3. `tokengate audit verify` against tampering
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn audit_verify_binary_detects_each_kind_of_tamper_and_names_the_first_bad_line() {
    let tg = TestGateway::start().await;
    let (tok, _) = tg.token("acme", "ci", &["apps:read"]);
    let c = client();
    for i in 0..10 {
        let path = if i % 3 == 2 {
            "/admin/x"
        } else {
            "/apps/billing/status"
        };
        get_bearer(&c, tg.url(path), &tok).await;
    }
    c.get(tg.url("/apps/billing/status")).send().await.unwrap();
    let lines = tg.audit_lines().await;
    let n = lines.len();
    assert_eq!(n, 11);
    let log = tg.audit_path();
    let cfg = tg.config_path.clone();
    let dir = tg.dir.path().to_path_buf();

    // Intact, through the configured path and an explicit one. (A forwarded request is two
    // lines: its decision and its completion.)
    let n = tg.raw_audit_lines().await.len();
    for args in [
        vec!["audit", "verify"],
        vec!["audit", "verify", log.to_str().unwrap()],
    ] {
        let o = cli(&cfg, &args);
        assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
        assert_eq!(stdout(&o), format!("OK: {n} lines, chain intact\n"));
    }

    let text = std::fs::read_to_string(&log).unwrap();
    let raw: Vec<String> = text.lines().map(str::to_string).collect();
    assert_eq!(raw.len(), n);
    let join = |ls: &[String]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();
    let mut edited = raw.clone();
    // Line 4 may be a completion line (no method): edit its reason or its method.
    edited[3] = raw[3]
        .replace("\"method\":\"GET\"", "\"method\":\"PUT\"")
        .replace("\"reason\":\"ok\"", "\"reason\":\"ko\"");
    assert_ne!(edited[3], raw[3]);
    let mut deleted = raw.clone();
    deleted.remove(4);
    let mut swapped = raw.clone();
    swapped.swap(5, 6);
    let mut replayed = raw.clone();
    replayed.insert(7, raw[2].clone());
    let mut corrupted = raw.clone();
    corrupted[6] = raw[6][..raw[6].len() / 2].to_string();
    let mut head_cut = raw.clone();
    head_cut.remove(0);
    let torn = {
        let t = join(&raw);
        t[..t.len() - 40].to_string()
    };
    let cases: Vec<(&str, String, String)> = vec![
        (
            "edited",
            join(&edited),
            "4: the chain does not match: the line was edited".into(),
        ),
        (
            "deleted",
            join(&deleted),
            "5: expected seq 5, found 6: 1 line(s) were deleted".into(),
        ),
        (
            "swapped",
            join(&swapped),
            "6: expected seq 6, found 7: lines were reordered or replayed".into(),
        ),
        (
            "replayed",
            join(&replayed),
            "8: expected seq 8, found 3: lines were reordered or replayed".into(),
        ),
        (
            "corrupted",
            join(&corrupted),
            "7: not a valid audit record (not JSON): the line was edited or corrupted".into(),
        ),
        (
            "torn",
            torn,
            format!(
                "{n}: the last line is incomplete (no newline): the file was truncated or the writer crashed mid-line"
            ),
        ),
        (
            "head-cut",
            join(&head_cut),
            "1: the set starts at seq 2, not 1: the first 1 line(s) are missing".into(),
        ),
    ];
    for (name, content, want) in cases {
        let f = dir.join(format!("{name}.log"));
        std::fs::write(&f, content).unwrap();
        let o = cli(&cfg, &["audit", "verify", f.to_str().unwrap()]);
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {out}{}", stderr(&o));
        assert!(out.starts_with("FAILED: "), "{name}: {out}");
        assert!(
            out.contains(&format!("{}:{want}", f.display())),
            "{name}: {out}"
        );
    }
    // The documented limit: cutting whole lines off the end leaves no trace in the file itself
    // (that is what shipping the lines off the host is for).
    let f = dir.join("tail-cut.log");
    // (The last three lines: request 10's decision and completion, and the 401.)
    std::fs::write(&f, join(&raw[..n - 3])).unwrap();
    let o = cli(&cfg, &["audit", "verify", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o), format!("OK: {} lines, chain intact\n", n - 3));
    // The head-cut set passes with --allow-partial-start, anchored at seq 2.
    let f = dir.join("head-cut.log");
    let o = cli(
        &cfg,
        &[
            "audit",
            "verify",
            "--allow-partial-start",
            f.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert_eq!(
        stdout(&o),
        format!(
            "OK: {} lines, chain intact from seq 2 (earlier lines not checked)\n",
            n - 1
        )
    );
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. The reader: filters and --follow through the binary
// ---------------------------------------------------------------------------------------------

/// The [`line_id`] of each of these JSON lines.
fn line_ids(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| line_id(&serde_json::from_str(l).unwrap()))
        .collect()
}

/// An id per line: the request id, or `event:target` for admin lines.
fn line_id(l: &serde_json::Value) -> String {
    if l["kind"] == "admin" {
        format!(
            "{}:{}",
            l["event"].as_str().unwrap(),
            l["target"].as_str().unwrap_or("-")
        )
    } else {
        l["request_id"].as_str().unwrap().to_string()
    }
}

#[tokio::test]
async fn audit_reader_filters_on_a_generated_log() {
    let tg = TestGateway::start().await;
    let (deployer, dep_id) = tg.token("acme", "deployer", &["apps:read", "apps:deploy"]);
    // One request per 1000 s: the second one is 429 whatever the machine's speed.
    let (reader, _) = tg.rated_token("globex", "reader", 0.001, 1);
    let dep_prefix = tg.gw.store().find_token(&dep_id).unwrap().prefix;
    let unknown = {
        // Well-formed and checksummed, but never stored.
        let other = tempfile::tempdir().unwrap();
        let s = Store::open(&other.path().join("x.db"), Duration::from_secs(5)).unwrap();
        s.create_account("x", None, "t", 0).unwrap();
        let spec = NewTokenSpec {
            created_by: "t".into(),
            ..token_spec("x", "x", &[], None)
        };
        s.create_token(&spec, "tg", 10, 0).unwrap().1.plaintext
    };
    let c = client();
    let mut ids = Vec::new();
    let mut send = async |method: &str, path: &str, tok: Option<&str>, want: u16| {
        let mut r = c.request(method.parse().unwrap(), tg.url(path));
        if let Some(t) = tok {
            r = r.bearer_auth(t);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), want, "{method} {path}");
        ids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
    };
    send("GET", "/apps/billing/status", Some(&deployer), 200).await; // 0
    send("POST", "/apps/billing/deploy", Some(&deployer), 200).await; // 1
    send("GET", "/apps/web/status", Some(&reader), 200).await; // 2
    send("GET", "/apps/web/status", Some(&reader), 429).await; // 3
    send("POST", "/apps/web/deploy", Some(&reader), 403).await; // 4
    send("GET", "/apps/web/status", None, 401).await; // 5
    send("GET", "/apps/web/status", Some(&unknown), 401).await; // 6
    send("GET", "/health", None, 200).await; // 7
    send("GET", "/admin/users", Some(&deployer), 403).await; // 8
    let o = cli(
        &tg.config_path,
        &["token", "revoke", &dep_id, "--reason", "leaked"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let log = tg.audit_path();
    wait_until("the revocation line", || {
        read_log(&log).iter().any(|l| l["event"] == "token.revoked")
    })
    .await;
    send("GET", "/apps/billing/status", Some(&deployer), 401).await; // 9
    let lines = tg.audit_lines().await;
    assert_eq!(lines.len(), 11);
    let revoked = format!("token.revoked:{dep_id}");
    let raw_text = std::fs::read_to_string(&log).unwrap();
    // One row per request: a forwarded request's decision and completion merged.
    let raw: HashMap<String, serde_json::Value> = support::merge_completions(
        raw_text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
    )
    .0
    .into_iter()
    .map(|v| (line_id(&v), v))
    .collect();

    let query = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["audit", "--json"];
        a.extend_from_slice(args);
        let o = cli(&tg.config_path, &a);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o), "", "{args:?}");
        stdout(&o)
            .lines()
            .map(|l| {
                let id = line_id(&serde_json::from_str(l).unwrap());
                // JSON output is the original line (a forwarded request: its two lines merged).
                assert_eq!(
                    raw[&id],
                    serde_json::from_str::<serde_json::Value>(l).unwrap()
                );
                id
            })
            .collect()
    };
    let pick = |idx: &[usize]| -> Vec<String> { idx.iter().map(|&i| ids[i].clone()).collect() };
    let with = |mut v: Vec<String>, extra: &str| {
        v.push(extra.to_string());
        v
    };
    assert_eq!(query(&[]).len(), 11);
    assert_eq!(query(&["--token", "deployer"]), pick(&[0, 1, 8, 9]));
    assert_eq!(
        query(&["--token", &dep_id]),
        with(pick(&[0, 1, 8]), &revoked)
            .into_iter()
            .chain(pick(&[9]))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        query(&["--token", &dep_prefix]),
        query(&["--token", &dep_id])
    );
    assert_eq!(query(&["--token", &unknown[..11]]), pick(&[6]));
    assert_eq!(query(&["--account", "globex"]), pick(&[2, 3, 4]));
    assert_eq!(query(&["--decision", "deny"]), pick(&[3, 4, 5, 6, 8, 9]));
    assert_eq!(query(&["--decision", "allow"]), pick(&[0, 1, 2, 7]));
    assert_eq!(query(&["--reason", "rate_limited"]), pick(&[3]));
    assert_eq!(query(&["--reason", "leaked"]), vec![revoked.clone()]);
    assert_eq!(query(&["--reason", "revoked"]), pick(&[9]));
    assert_eq!(query(&["--status", "4xx"]), pick(&[3, 4, 5, 6, 8, 9]));
    assert_eq!(query(&["--status", "403"]), pick(&[4, 8]));
    assert_eq!(query(&["--status", "2xx"]), pick(&[0, 1, 2, 7]));
    assert_eq!(
        query(&["--account", "acme", "--decision", "deny", "--status", "403"]),
        pick(&[8])
    );
    assert_eq!(query(&["--event", "token.*"]), vec![revoked.clone()]);
    assert_eq!(query(&["--since", "1h"]).len(), 11);
    assert!(query(&["--until", "1h"]).is_empty());
    assert!(query(&["--since", "2999-01-01T00:00:00Z"]).is_empty());
    // since ≤ timestamp < until, on the log's own timestamps.
    let ts = |i: usize| lines[i]["timestamp"].as_str().unwrap().to_string();
    let (since, until) = (ts(3), ts(8));
    let want: Vec<String> = lines
        .iter()
        .filter(|l| {
            let t = l["timestamp"].as_str().unwrap();
            t >= since.as_str() && t < until.as_str()
        })
        .map(line_id)
        .collect();
    assert!(!want.is_empty());
    assert_eq!(query(&["--since", &since, "--until", &until]), want);

    // The table: a header, one row per match, the token's name in place of any secret.
    let o = cli(&tg.config_path, &["audit", "--token", "deployer"]);
    assert_eq!(o.status.code(), Some(0));
    let table = stdout(&o);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "TIME",
            "STATUS",
            "DECISION",
            "REASON",
            "METHOD",
            "PATH",
            "TOKEN",
            "ACCOUNT",
            "CLIENT_IP"
        ]
    );
    assert_eq!(rows.len(), 5);
    assert_eq!(
        rows[2][1..],
        [
            "200",
            "allow",
            "ok",
            "POST",
            "/apps/billing/deploy",
            "deployer",
            "acme",
            "127.0.0.1"
        ]
    );
    assert_eq!(
        rows[4][1..],
        [
            "401",
            "deny",
            "revoked",
            "GET",
            "/apps/billing/status",
            "deployer",
            "acme",
            "127.0.0.1"
        ]
    );
    let o = cli(&tg.config_path, &["audit", "--event", "token.revoked"]);
    let admin_table = stdout(&o);
    let admin_row: Vec<&str> = admin_table
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        admin_row[1..],
        [
            "-",
            "-",
            "leaked",
            "token.revoked",
            dep_id.as_str(),
            dep_prefix.as_str(),
            "acme",
            "-"
        ]
    );

    // Bad filters are refused, not ignored.
    for (args, code) in [
        (vec!["audit", "--status", "4x"], 64),
        (vec!["audit", "--decision", "maybe"], 64),
        (vec!["audit", "--since", "yesterday"], 64),
    ] {
        let o = cli(&tg.config_path, &args);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", stderr(&o));
        assert!(
            stdout(&o).is_empty() || stdout(&o).starts_with("TIME"),
            "{args:?}"
        );
    }
    for secret in [deployer.as_str(), reader.as_str(), unknown.as_str()] {
        assert!(!raw_text.contains(secret));
    }
    tg.stop().await;
}

/// `tokengate audit --follow ...` in a child; its stdout lines arrive on a channel.
struct Follower {
    child: Child,
    rx: mpsc::Receiver<String>,
    got: Vec<String>,
}

impl Follower {
    fn spawn(cfg: &Path, args: &[&str]) -> Follower {
        let mut child = Command::new(bin())
            .arg("--config")
            .arg(cfg)
            .args(["audit", "--follow"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Follower {
            child,
            rx,
            got: Vec::new(),
        }
    }

    /// Waits until every id has been printed.
    async fn wait_for(&mut self, ids: &[String]) {
        self.wait(
            |got| {
                ids.iter()
                    .all(|id| got.iter().any(|l| l.contains(id.as_str())))
            },
            |_| format!("--follow did not print {ids:?}"),
        )
        .await;
    }

    /// Waits until `n` lines have been printed (table rows carry no request id).
    async fn wait_for_lines(&mut self, n: usize) {
        self.wait(
            |got| got.len() >= n,
            |got| format!("--follow printed {} of {n} lines", got.len()),
        )
        .await;
    }

    /// Collects printed lines until `done` holds; panics with `failure` after [`PATIENCE`].
    async fn wait(
        &mut self,
        done: impl Fn(&[String]) -> bool,
        failure: impl Fn(&[String]) -> String,
    ) {
        let t0 = Instant::now();
        loop {
            while let Ok(l) = self.rx.try_recv() {
                self.got.push(l);
            }
            if done(&self.got) {
                return;
            }
            assert!(t0.elapsed() < PATIENCE, "{}", failure(&self.got));
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Follower {
    /// Whether the follower process has `file` (the same inode) open: it has seen the newest
    /// rotation of the log (Linux: `/proc/<pid>/fd`).
    fn has_open(&self, file: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(want) = std::fs::metadata(file) else {
            return false;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", self.child.id())) else {
            return false;
        };
        fds.flatten().any(|fd| {
            std::fs::metadata(fd.path())
                .is_ok_and(|m| (m.dev(), m.ino()) == (want.dev(), want.ino()))
        })
    }
}

/// Waits until all three followers have `log` (the current file) open and `deny`
/// (`--decision deny`) and `table` (`--status 2xx`) have printed every line `all` has.
///
/// A follower must have caught up before the log is rotated or renamed again: one that has not
/// yet seen the newest rotation finds the files rotated since under their `audit.log.N` names,
/// but not a file renamed out of the set (logrotate) meanwhile, and one that is not running yet
/// starts at the current file (like `tail -f`). The followers poll on their own 200 ms phases,
/// so `all` having printed a line says nothing about the other two.
async fn catch_up(log: &Path, all: &Follower, deny: &mut Follower, table: &mut Follower) {
    let lines: Vec<serde_json::Value> = all
        .got
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let denied: Vec<String> = lines
        .iter()
        .filter(|l| l["rbac_decision"] == "deny")
        .map(line_id)
        .collect();
    let ok = lines.iter().filter(|l| l["status_code"] == 200).count();
    deny.wait_for(&denied).await;
    table.wait_for_lines(1 + ok).await;
    wait_until("every follower on the current log file", || {
        [all, &*deny, &*table].iter().all(|f| f.has_open(log))
    })
    .await;
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_follow_picks_up_new_lines_across_size_rotation_and_a_logrotate_rename() {
    let tg = TestGateway::start_with(Options::audit("max_bytes = 4000\n")).await;
    let (tok, _) = tg.token("acme", "ci", &["apps:read"]);
    let c = client();
    let mut sent = Vec::new();
    let mut denied = Vec::new();
    let mut batch = async |n: usize| -> Vec<String> {
        let mut ids = Vec::new();
        for i in 0..n {
            let path = if i % 2 == 0 {
                "/apps/billing/status"
            } else {
                "/admin/users"
            };
            let r = get_bearer(&c, tg.url(path), &tok).await;
            let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
            if r.status() == 403 {
                denied.push(rid.clone());
            }
            ids.push(rid);
        }
        tg.gw.audit().flush_async().await.unwrap();
        sent.extend(ids.clone());
        ids
    };
    let first = batch(3).await;
    let mut all = Follower::spawn(&tg.config_path, &["--json"]);
    let mut deny = Follower::spawn(&tg.config_path, &["--json", "--decision", "deny"]);
    let mut table = Follower::spawn(&tg.config_path, &["--status", "2xx"]);
    all.wait_for(&first).await;
    let log = tg.audit_path();
    catch_up(&log, &all, &mut deny, &mut table).await;
    let rotated = |n: u32| PathBuf::from(format!("{}.{n}", log.display()));
    let inode = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&log).unwrap().ino()
    };

    // Size rotation, with every follower printing each batch before the next one.
    let mut rotations = 0;
    while rotations < 2 {
        let before = inode();
        let ids = batch(2).await;
        if inode() != before {
            rotations += 1;
        }
        all.wait_for(&ids).await;
        catch_up(&log, &all, &mut deny, &mut table).await;
    }
    assert!(rotated(2).exists());

    // Two rotations between two polls: followers stopped (SIGSTOP) while the log rotates
    // twice must still print the file in between once resumed.
    let followers = [&all, &deny, &table];
    let signal = |sig: &str| {
        for f in followers {
            let ok = Command::new("kill")
                .args([sig, &f.child.id().to_string()])
                .status()
                .unwrap();
            assert!(ok.success());
        }
    };
    signal("-STOP");
    let mut ids = Vec::new();
    while rotations < 4 {
        let before = inode();
        ids.extend(batch(1).await);
        if inode() != before {
            rotations += 1;
        }
    }
    signal("-CONT");
    all.wait_for(&ids).await;
    catch_up(&log, &all, &mut deny, &mut table).await;
    assert!(rotated(4).exists());
    assert!(!rotated(5).exists(), "nothing was deleted by retention");

    // logrotate `create` mode: rename, the writer keeps appending to the renamed file until the
    // reopen (SIGHUP), then writes a fresh file. The current file holds one line, so the size
    // limit does not strike in between.
    let renamed = tg.dir.path().join("audit.log-renamed");
    std::fs::rename(&log, &renamed).unwrap();
    let ids = batch(2).await;
    all.wait_for(&ids).await;
    assert!(!log.exists());
    tg.gw.audit().reopen();
    let ids = batch(3).await;
    all.wait_for(&ids).await;
    assert!(log.exists());
    deny.wait_for(&denied).await;
    let ok: Vec<String> = sent
        .iter()
        .filter(|id| !denied.contains(id))
        .cloned()
        .collect();
    table.wait_for_lines(1 + ok.len()).await;
    // Two more poll rounds: anything printed twice would show up now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for f in [&mut all, &mut deny, &mut table] {
        while let Ok(l) = f.rx.try_recv() {
            f.got.push(l);
        }
    }

    // Every request exactly once, in chain order (a forwarded request's row carries the seq of
    // its decision line; its completion line is merged into it).
    let seqs: Vec<u64> = all
        .got
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs.len(), sent.len());
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(line_ids(&all.got), sent);
    assert_eq!(line_ids(&deny.got), denied);
    assert!(table.got[0].starts_with("TIME "), "{:?}", table.got[0]);
    assert_eq!(table.got.len(), 1 + ok.len());
    // (`all` printed every line, checked above.)
    let everything: Vec<serde_json::Value> = all
        .got
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (row, id) in table.got[1..].iter().zip(&ok) {
        let l = everything
            .iter()
            .find(|l| l["request_id"] == id.as_str())
            .unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cols[..6],
            [
                l["timestamp"].as_str().unwrap(),
                "200",
                "allow",
                "ok",
                "GET",
                "/apps/billing/status"
            ],
            "{row}"
        );
    }

    // The whole set verifies, oldest first: the size-rotated files, the renamed file, the new one.
    let mut files: Vec<PathBuf> = (1..=5).rev().map(rotated).filter(|p| p.exists()).collect();
    files.push(renamed.clone());
    files.push(log.clone());
    let mut args: Vec<&str> = vec!["audit", "verify"];
    args.extend(files.iter().map(|p| p.to_str().unwrap()));
    let o = cli(&tg.config_path, &args);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    // (A forwarded request is two lines: its decision and its completion.)
    let written: usize = files.iter().map(|f| read_log(f).len()).sum();
    assert_eq!(stdout(&o), format!("OK: {written} lines, chain intact\n"));
    // Newest first is refused: the set must start at seq 1.
    files.reverse();
    let mut args: Vec<&str> = vec!["audit", "verify"];
    args.extend(files.iter().map(|p| p.to_str().unwrap()));
    let o = cli(&tg.config_path, &args);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("the set starts at seq"),
        "{}",
        stdout(&o)
    );
    drop((all, deny, table));
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Admin events from the CLI while a gateway owns the log
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_admin_events_while_the_gateway_runs_are_logged_exactly_once() {
    let tg = TestGateway::start().await;
    let (tok, _) = tg.token("acme", "ci", &["apps:read"]);
    let c = client();
    let cfg = tg.config_path.clone();
    let run = |args: &[&str]| {
        let o = cli(&cfg, args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        o
    };
    let mut rids = Vec::new();
    let mut req = async || {
        let r = get_bearer_expect(&c, tg.url("/apps/billing/status"), &tok, 200).await;
        rids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
    };
    req().await;
    run(&["account", "create", "ops-team"]);
    req().await;
    let o = run(&[
        "token",
        "create",
        "--account",
        "ops-team",
        "--name",
        "deploy-bot",
        "--role",
        "viewer",
        "--json",
    ]);
    let created: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (plain, id) = (
        created["token"].as_str().unwrap().to_string(),
        created["id"].as_str().unwrap().to_string(),
    );
    req().await;
    run(&["token", "revoke", &id, "--reason", "rotating the bot"]);
    run(&["account", "disable", "ops-team"]);
    req().await;

    let log = tg.audit_path();
    let events = [
        "account.created",
        "token.created",
        "token.revoked",
        "account.disabled",
    ];
    wait_until("the CLI events", || {
        let lines = read_log(&log);
        events
            .iter()
            .all(|e| lines.iter().any(|l| l["event"] == *e))
    })
    .await;
    // The outbox is emptied once the lines are written; later drains cannot repeat them.
    wait_for_empty_outbox(&tg.dir.path().join("tokengate.db")).await;

    let lines = tg.audit_lines().await;
    let admin: Vec<&serde_json::Value> = lines.iter().filter(|l| l["kind"] == "admin").collect();
    let names: Vec<&str> = admin.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(names, events, "each CLI event exactly once, in order");
    for l in &admin {
        assert_eq!(l["actor"], "cli:auditor", "{l}");
        assert_eq!(l["auth_type"], "cli", "{l}");
        assert_eq!(l["account"], "ops-team", "{l}");
    }
    assert_eq!(admin[1]["api_token_id"], id.as_str());
    assert_eq!(admin[2]["target"], id.as_str());
    assert_eq!(admin[2]["reason"], "rotating the bot");
    assert_eq!(request_ids(&lines), rids);
    let report = audit::verify(std::slice::from_ref(&log)).unwrap();
    assert!(report.is_complete(), "{report}");
    let written = tg.raw_audit_lines().await.len();
    assert_eq!(report.lines, written as u64);
    let o = run(&["audit", "verify"]);
    assert_eq!(stdout(&o), format!("OK: {written} lines, chain intact\n"));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains(&plain) && !text.contains(&tok),
        "a token in the audit log"
    );
    tg.stop().await;
}
