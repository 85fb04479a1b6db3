//! Shared test harness: a real gateway on 127.0.0.1:0 with a temp SQLite store and audit log, in
//! front of a recording upstream that keeps every request it received.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokengate::config::Config;
use tokengate::gateway::Gateway;
use tokengate::store::NewTokenSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Method.
    pub method: String,
    /// Request target exactly as received (path and query).
    pub target: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Body bytes received.
    pub body_len: u64,
}

/// A recording upstream.
///
/// Paths: `/slow/...` never answers; `/delay/{ms}` answers after `ms` milliseconds; `/status/NNN` answers NNN; `/download/N` streams N bytes;
/// `/ws` accepts a WebSocket-style upgrade and echoes bytes; everything else 200 `upstream ok`
/// with `x-upstream: yes` and `content-type: text/plain`.
#[derive(Clone)]
pub struct Upstream {
    /// Address.
    pub addr: SocketAddr,
    /// Everything received, in order.
    pub requests: Arc<Mutex<Vec<Recorded>>>,
}

/// A listener on a free loopback port, and its address.
pub async fn loopback_listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

impl Upstream {
    /// Starts one on a free port.
    pub async fn start() -> Upstream {
        let (listener, addr) = loopback_listener().await;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let rec = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let rec = rec.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle_upstream(req, rec.clone()));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, requests }
    }

    /// Snapshot of what was received.
    pub fn received(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// The request targets received, in order.
    pub fn targets(&self) -> Vec<String> {
        self.received().into_iter().map(|r| r.target).collect()
    }

    /// Number of requests received.
    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// Checks that no request body the upstream received was longer than `max` bytes.
    pub fn assert_bodies_at_most(&self, max: u64) {
        for seen in self.received() {
            assert!(
                seen.body_len <= max,
                "the upstream got {} body bytes of {}",
                seen.body_len,
                seen.target
            );
        }
    }

    /// Forgets what was received.
    pub fn clear(&self) {
        self.requests.lock().unwrap().clear();
    }

    /// Waits (at most [`WAIT_LIMIT`]) until a request for `target` has reached the upstream.
    pub async fn wait_for(&self, target: &str) {
        eventually(
            &format!("the request for {target} to reach the upstream"),
            WAIT_LIMIT,
            || async {
                self.received()
                    .iter()
                    .any(|r| r.target == target)
                    .then_some(())
            },
        )
        .await
    }
}

/// A response body of the upstreams here.
pub type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `total` bytes of `x`, streamed in 64 KiB chunks (what `/download/N` answers).
pub fn download_body(total: u64) -> UpBody {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let stream = futures_util::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= total {
                return None;
            }
            let n = (total - sent).min(chunk.len() as u64);
            Some((
                Ok::<_, Infallible>(Frame::data(chunk.slice(..n as usize))),
                sent + n,
            ))
        }
    });
    StreamBody::new(stream).boxed()
}

async fn handle_upstream(
    req: Request<Incoming>,
    rec: Arc<Mutex<Vec<Recorded>>>,
) -> Result<Response<UpBody>, Infallible> {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let method = req.method().to_string();
    let headers = req.headers().clone();
    let path = req.uri().path().to_string();
    if path == "/ws" {
        rec.lock().unwrap().push(Recorded {
            method,
            target,
            headers,
            body_len: 0,
        });
        let mut req = req;
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        let mut resp = Response::new(Full::new(Bytes::new()).boxed());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        resp.headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        return Ok(resp);
    }
    let mut body = req.into_body();
    let mut body_len = 0u64;
    while let Some(f) = body.frame().await {
        match f {
            Ok(f) => body_len += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    rec.lock().unwrap().push(Recorded {
        method,
        target,
        headers,
        body_len,
    });
    if path.starts_with("/slow") {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    // `/delay/{ms}`: answers normally after `ms` milliseconds (drain tests: a slow in-flight request).
    if let Some(ms) = path.strip_prefix("/delay/") {
        let ms: u64 = ms.parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let mut r = Response::new(Full::new(Bytes::from_static(b"status")).boxed());
        *r.status_mut() = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
        return Ok(r);
    }
    if let Some(n) = path.strip_prefix("/download/") {
        let mut r = Response::new(download_body(n.parse().unwrap_or(0)));
        r.headers_mut()
            .insert("content-type", "application/octet-stream".parse().unwrap());
        return Ok(r);
    }
    let mut r = Response::new(Full::new(Bytes::from(format!("upstream ok {body_len}"))).boxed());
    r.headers_mut().insert("x-upstream", "yes".parse().unwrap());
    r.headers_mut()
        .insert("content-type", "text/plain".parse().unwrap());
    // A hop-by-hop header the gateway must strip on the way back.
    r.headers_mut()
        .insert("connection", "x-upstream-private".parse().unwrap());
    r.headers_mut()
        .insert("x-upstream-private", "secret".parse().unwrap());
    Ok(r)
}

/// How long [`wait_until`] waits for an event before the test fails (a bound, not a goal).
pub const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// Polls `cond` until it holds; panics after [`WAIT_LIMIT`] (a wait for an event another task,
/// process or socket brings about, not a speed assertion).
pub async fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    wait_until_within(what, WAIT_LIMIT, cond).await
}

/// [`wait_until`] with another bound.
pub async fn wait_until_within(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `f` until it returns `Some`; panics after `limit` (a bound, not a goal).
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = Instant::now();
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(t0.elapsed() < limit, "gave up waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A bare TCP server on a free port of 127.0.0.1: `handle` serves each accepted connection in
/// a task of its own. Returns the address.
pub async fn tcp_server<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (l, addr) = loopback_listener().await;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(handle(s));
        }
    });
    addr
}

/// Runs `bash script` (a node server of tests/, `script` relative to the crate) and waits, at
/// most `limit`, for its `listening PORT` line; `what` names the server in failures. Returns the
/// child (killed on drop) and the port.
pub async fn start_listening_script(
    script: &str,
    limit: Duration,
    what: &str,
) -> (tokio::process::Child, u16) {
    use tokio::io::AsyncBufReadExt;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let mut child = tokio::process::Command::new("bash")
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("bash runs {script}: {e}"));
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(limit, lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("{what} starts"))
        .unwrap()
        .expect("a listening line");
    let port: u16 = line.strip_prefix("listening ").unwrap().parse().unwrap();
    (child, port)
}

/// A reqwest client that speaks HTTP/2 without TLS (prior knowledge).
pub fn h2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

/// The built `tokengate` binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tokengate")
}

/// Runs the CLI with `--config cfg`.
pub fn cli(cfg: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin())
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap()
}

/// Checks that a command exited with `code` (showing what it printed otherwise); returns its
/// stderr.
pub fn assert_exit_code(out: &std::process::Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// Asserts a CLI run succeeded, showing its stderr when not.
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `tokengate serve` in a child process (killed when dropped).
pub struct Served {
    /// The process.
    pub child: std::process::Child,
    /// Public address.
    pub addr: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// Its stderr (JSON log lines) after the listening line.
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Served {
    /// Starts the binary on `config` (see [`spawn_serve_logged`]: every stderr line is kept).
    pub async fn start(config: &Path) -> Served {
        let (child, addr, admin, stderr) = spawn_serve_logged(config).await;
        Served {
            child,
            addr,
            admin,
            stderr,
        }
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Panics with the log when the process is gone (a crash: SIGBUS was exit 135).
    pub fn assert_alive(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!(
                "tokengate exited ({st:?}); stderr:\n{}",
                self.stderr.lock().unwrap().join("\n")
            );
        }
    }

    /// How many stderr lines contain `needle`.
    pub fn log_lines_with(&self, needle: &str) -> usize {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        signal(self.child.id(), "-9");
        let _ = self.child.wait();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `tokengate serve` child process, its public and admin addresses, and its stderr lines so far.
pub type LoggedServe = (
    std::process::Child,
    SocketAddr,
    SocketAddr,
    Arc<Mutex<Vec<String>>>,
);

/// `tokengate serve` on `config` with JSON logs at `RUST_LOG=info`, started as a child process.
/// Every stderr line is kept (those before the listening line too); waits, at most 60 s, for the
/// "tokengate listening" line. Returns the child, the public and admin addresses, and the lines.
pub async fn spawn_serve_logged(config: &Path) -> LoggedServe {
    spawn_serve_logged_by(std::process::Command::new(bin()), config).await
}

/// [`spawn_serve_logged`] with the binary started by `cmd` (for example `taskset -c 0 BIN`):
/// the `serve` arguments are appended to it.
pub async fn spawn_serve_logged_by(mut cmd: std::process::Command, config: &Path) -> LoggedServe {
    use std::io::BufRead;
    use std::process::Stdio;
    let mut child = cmd
        .args([
            "--config",
            config.to_str().unwrap(),
            "--log-format",
            "json",
            "serve",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel::<(SocketAddr, SocketAddr)>();
    let lines = stderr.clone();
    let pipe = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            lines.lock().unwrap().push(line.clone());
            if let Ok(j) = serde_json::from_str::<serde_json::Value>(&line) {
                let f = if j["fields"].is_object() {
                    &j["fields"]
                } else {
                    &j
                };
                if f["message"] == "tokengate listening" {
                    let p = f["public"].as_str().unwrap().parse().unwrap();
                    let a = f["admin"].as_str().unwrap().parse().unwrap();
                    let _ = tx.send((p, a));
                }
            }
        }
    });
    let (public, admin) =
        tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .unwrap()
            .unwrap_or_else(|_| panic!("tokengate serve did not start"));
    (child, public, admin, stderr)
}

/// Starts `tokengate serve`; the addresses come from the JSON "tokengate listening" line.
pub fn serve_binary(cfg: &Path) -> Served {
    use std::io::BufRead;
    let mut child = std::process::Command::new(bin())
        .args(["--log-format", "json", "--config"])
        .arg(cfg)
        .arg("serve")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (addr, admin) = loop {
        let line = lines.next().expect("serve exited").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if let (Some(p), Some(a)) = (
            v["fields"]["public"].as_str(),
            v["fields"]["admin"].as_str(),
        ) {
            break (p.parse().unwrap(), a.parse().unwrap());
        }
    };
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let sink = stderr.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    Served {
        child,
        addr,
        admin,
        stderr,
    }
}

/// The real `tokengate serve` in a child process (killed when dropped), with its temp folder
/// (config, store, audit log) and its stderr lines (JSON logs).
pub struct Proc {
    /// The process.
    pub child: std::process::Child,
    /// The temp folder.
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
    /// Public address.
    pub public: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// Every stderr line.
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Writes a config in a temp folder (in front of `upstream`), lets `prepare` seed the store
    /// (its path is passed), starts the binary and waits for its "listening" line.
    pub async fn start(upstream: SocketAddr, o: &Options, prepare: impl FnOnce(&Path)) -> Proc {
        Proc::start_by(std::process::Command::new(bin()), upstream, o, prepare).await
    }

    /// [`Proc::start`] with the binary started by `cmd` (see [`spawn_serve_logged_by`]).
    pub async fn start_by(
        cmd: std::process::Command,
        upstream: SocketAddr,
        o: &Options,
        prepare: impl FnOnce(&Path),
    ) -> Proc {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &upstream.to_string(), o);
        prepare(&dir.path().join("tokengate.db"));
        let (child, public, admin, stderr) = spawn_serve_logged_by(cmd, &config).await;
        Proc {
            child,
            dir,
            config,
            public,
            admin,
            stderr,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether a stderr line contains `needle`.
    pub fn stderr_has(&self, needle: &str) -> bool {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    /// The audit log.
    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "tokengate did not exit within {limit:?}; stderr:\n{}",
                    self.stderr.lock().unwrap().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `field` of /proc/PID/status in KiB (`VmRSS`, `RssAnon`).
    pub fn status_kib(&self, field: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends signal `sig` (like `-TERM`) to process `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid} failed");
}

/// Waits (at most [`WAIT_LIMIT`]) until connecting to `addr` is refused (its listener closed).
pub async fn wait_refused(what: &str, addr: SocketAddr) {
    eventually(what, WAIT_LIMIT, || async {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        }
    })
    .await
}

/// The `/metrics` text of the admin listener at `admin`.
pub async fn metrics_text(admin: SocketAddr) -> String {
    client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// An audit log file's lines as written (each must be JSON).
pub fn read_audit_file(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}"))
        })
        .collect()
}

/// Issues a token straight into the store file `db` (for a gateway run as a separate process),
/// creating `account` if needed; it expires in 30 days. Returns (plaintext, id).
pub fn issue_into(db: &Path, account: &str, name: &str, perms: &[&str]) -> (String, String) {
    issue_into_with(db, account, name, perms, |_| {})
}

/// [`issue_into`], letting the caller adjust the spec.
pub fn issue_into_with(
    db: &Path,
    account: &str,
    name: &str,
    perms: &[&str],
    f: impl FnOnce(&mut NewTokenSpec),
) -> (String, String) {
    let store = tokengate::store::Store::open(db, Duration::from_secs(5)).unwrap();
    let now = tokengate::store::system_now_ms();
    let _ = store.create_account(account, None, "test", now);
    let mut spec = token_spec(account, name, perms, Some(now + 30 * 86_400_000));
    f(&mut spec);
    let (row, new) = store.create_token(&spec, "tg", 1000, now).unwrap();
    (new.plaintext, row.id)
}

/// Percent-decodes once, as a backend would (bytes; `%` without two hex digits stays).
pub fn percent_decode_once(path: &str) -> Vec<u8> {
    let b = path.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// A self-signed certificate for `localhost`, written as `cert.pem` and `key.pem` to a temp folder.
pub struct LocalhostCert {
    /// The folder (removed when dropped).
    pub dir: tempfile::TempDir,
    /// `cert.pem`.
    pub cert: PathBuf,
    /// `key.pem`.
    pub key: PathBuf,
    /// The certificate in PEM.
    pub pem: String,
}

impl LocalhostCert {
    /// Makes one.
    pub fn new() -> LocalhostCert {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        LocalhostCert {
            dir,
            cert,
            key,
            pem: ck.cert.pem(),
        }
    }

    /// `tls = { cert = "...", key = "..." }` for `[server]`.
    pub fn server_tls(&self) -> String {
        format!(
            "tls = {{ cert = \"{}\", key = \"{}\" }}",
            self.cert.display(),
            self.key.display()
        )
    }

    /// An `[admin.tls]` section with this certificate.
    pub fn admin_tls(&self) -> String {
        format!(
            "[admin.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            self.cert.display(),
            self.key.display()
        )
    }

    /// The certificate as a root for a reqwest client.
    pub fn reqwest_root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.pem.as_bytes()).unwrap()
    }
}

/// A token spec with explicit permissions and nothing else (no role, scopes, CIDRs or rate).
pub fn token_spec(
    account: &str,
    name: &str,
    perms: &[&str],
    expires_at: Option<i64>,
) -> NewTokenSpec {
    NewTokenSpec {
        account: account.into(),
        name: name.into(),
        role: None,
        permissions: perms.iter().map(|s| s.to_string()).collect(),
        scopes: Default::default(),
        allowed_cidrs: vec![],
        rate: None,
        expires_at,
        created_by: "test".into(),
    }
}

/// A `[[routes.rules]]` table for `methods` (none: any method) on `path`, with `keys` (TOML lines).
pub fn rule(methods: &[&str], path: &str, keys: &str) -> String {
    let methods = if methods.is_empty() {
        String::new()
    } else {
        format!("methods = {methods:?}\n")
    };
    format!("\n[[routes.rules]]\n{methods}path = {path:?}\n{keys}\n")
}

/// A rule letting holders of `permission` use `methods` (none: any method) on `path`.
pub fn permission_rule(methods: &[&str], path: &str, permission: &str) -> String {
    rule(methods, path, &format!("permission = {permission:?}"))
}

/// A rule opening `methods` on `path` to anyone, without a token.
pub fn public_rule(methods: &[&str], path: &str) -> String {
    rule(methods, path, "public = true")
}

/// `rule` staged as a shadow rule: its decision is logged, never enforced.
pub fn shadow(rule: String) -> String {
    rule + "shadow = true\n"
}

/// The rules every test gateway starts with.
pub fn default_rules() -> String {
    [
        permission_rule(&["GET", "HEAD"], "/apps/{app}/**", "apps:read"),
        permission_rule(&["POST"], "/apps/{app}/deploy", "apps:deploy"),
        permission_rule(&["GET", "POST", "PUT"], "/echo/**", "apps:read"),
        public_rule(&["GET"], "/health"),
        permission_rule(&["GET", "POST"], "/slow/**", "apps:read"),
        permission_rule(&["GET"], "/status/{code}", "apps:read"),
        permission_rule(&["GET"], "/download/{n}", "apps:read"),
        permission_rule(&[], "/admin/**", "admin:all"),
    ]
    .concat()
}

/// [`default_rules`] and a rule for the upstream's `/delay/{ms}` (a slow answer, for drains).
pub fn rules_with_delay() -> String {
    default_rules() + &permission_rule(&["GET"], "/delay/{ms}", "apps:read")
}

/// A loopback address nothing listens on (its port was free a moment ago): for 502s and refused
/// connections.
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A `[rate_limit]` section with a per-token rate limit high enough that the corpus and load
/// tests never hit it.
pub const NO_RATE_LIMIT: &str = "[rate_limit]\nrequests_per_second = 100000\nburst = 100000\n";

/// A `[rate_limit]` section letting each client address fail authentication `per_minute` times a
/// minute before it is refused.
pub fn failed_auth_limit(per_minute: usize) -> String {
    format!("[rate_limit]\nfailed_auth_per_minute = {per_minute}\n")
}

/// Options for a test gateway.
pub struct Options {
    /// Extra TOML appended to `[server]` (lines like `max_body_bytes = 10`).
    pub server: String,
    /// Extra top-level TOML sections (e.g. `[rate_limit]`), placed before the routes.
    pub sections: String,
    /// Extra keys on the route (e.g. `websocket = true`).
    pub route: String,
    /// Rules (default: [`default_rules`]).
    pub rules: String,
    /// Extra routes appended at the end.
    pub extra_routes: String,
    /// Start the server (false: only build config/store/gateway).
    pub serve: bool,
    /// Use this upstream address instead of a fresh recording upstream (e.g. a dead port).
    pub upstream_override: Option<String>,
    /// `[audit] path` (default `audit.log` in the temp folder), e.g. an absolute path on a small
    /// file system the test mounted.
    pub audit_path: Option<String>,
    /// Extra keys in `[audit]` (lines like `max_bytes = 4000` or `on_failure = "continue"`).
    pub audit: String,
    /// `[server] listen` (default `127.0.0.1:0`), e.g. `0.0.0.0:0` to be reached from a
    /// non-loopback address of this host.
    pub listen: Option<String>,
    /// The `[store]` keys (default `path = "tokengate.db"`), e.g. a PostgreSQL `url`.
    pub store: Option<String>,
}

impl Options {
    /// The defaults, changed by `change`.
    fn defaults_with(change: impl FnOnce(&mut Options)) -> Options {
        let mut o = Options::default();
        change(&mut o);
        o
    }

    /// The defaults with extra `[server]` keys.
    pub fn server(keys: impl Into<String>) -> Options {
        Self::defaults_with(|o| o.server = keys.into())
    }

    /// The defaults with extra top-level sections.
    pub fn sections(toml: impl Into<String>) -> Options {
        Self::defaults_with(|o| o.sections = toml.into())
    }

    /// The defaults with extra keys in `[audit]`.
    pub fn audit(keys: impl Into<String>) -> Options {
        Self::defaults_with(|o| o.audit = keys.into())
    }

    /// The defaults with extra top-level sections, built (config, store, gateway) but not served.
    pub fn unserved_sections(toml: impl Into<String>) -> Options {
        Self::defaults_with(|o| {
            o.sections = toml.into();
            o.serve = false;
        })
    }

    /// The defaults, built (config, store, gateway) but not served.
    pub fn unserved() -> Options {
        Self::defaults_with(|o| o.serve = false)
    }

    /// The defaults with these rules instead of [`default_rules`].
    pub fn rules(toml: impl Into<String>) -> Options {
        Self::defaults_with(|o| o.rules = toml.into())
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            server: String::new(),
            sections: String::new(),
            route: String::new(),
            rules: default_rules(),
            extra_routes: String::new(),
            serve: true,
            upstream_override: None,
            audit_path: None,
            audit: String::new(),
            listen: None,
            store: None,
        }
    }
}

/// A running gateway.
pub struct TestGateway {
    /// Temp folder with config, store and audit log.
    pub dir: tempfile::TempDir,
    /// Config file.
    pub config_path: PathBuf,
    /// The gateway.
    pub gw: Gateway,
    /// Public address.
    pub addr: SocketAddr,
    /// Admin address.
    pub admin_addr: SocketAddr,
    /// The recording upstream.
    pub upstream: Upstream,
    /// TLS handle for reload tests.
    pub tls: Option<tokengate::server::TlsHandle>,
    /// The admin listener's web UI sessions.
    pub sessions: std::sync::Arc<tokengate::admin::session::Sessions>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _bg: Option<tokengate::gateway::BackgroundGuard>,
}

/// Runs a started gateway's server in a task until the returned sender fires (or is dropped).
pub fn run_started(
    started: tokengate::app::Started,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
    tokengate::gateway::BackgroundGuard,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tokengate::app::Started {
        server, background, ..
    } = started;
    let task = tokio::spawn(async move {
        server
            .run(async move {
                let _ = rx.await;
            })
            .await;
    });
    (tx, task, background)
}

/// A gateway started in this process from a config file; told to stop when dropped.
pub struct Running {
    /// The gateway.
    pub gw: Gateway,
    /// Public address.
    pub addr: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _bg: tokengate::gateway::BackgroundGuard,
}

impl Running {
    /// Loads `config` and serves it.
    pub async fn start(config: &Path) -> Running {
        let cfg =
            Config::load(config).unwrap_or_else(|e| panic!("config {}: {e}", config.display()));
        let started = tokengate::app::start(cfg)
            .await
            .map_err(|e| e.message)
            .unwrap();
        let gw = started.gateway.clone();
        let (addr, admin) = (started.server.public_addr(), started.server.admin_addr());
        let (tx, task, bg) = run_started(started);
        Running {
            gw,
            addr,
            admin,
            stop: Some(tx),
            task: Some(task),
            _bg: bg,
        }
    }

    /// `http://{public address}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the server and waits for the drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Writes a config file for tests.
pub fn write_config(dir: &Path, upstream: &str, o: &Options) -> PathBuf {
    let text = format!(
        r#"[server]
listen = "{listen}"
{server}

[admin]
listen = "127.0.0.1:0"

[store]
{store}

[audit]
path = "{audit_path}"
{audit}

{sections}

[[routes]]
name = "api"
prefix = "/"
upstream = "http://{upstream}"
{route}
{rules}
{extra}
"#,
        server = o.server,
        sections = o.sections,
        route = o.route,
        rules = o.rules,
        extra = o.extra_routes,
        audit_path = o
            .audit_path
            .as_deref()
            .unwrap_or("audit.log")
            .replace('\\', "\\\\")
            .replace('"', "\\\""),
        audit = o.audit,
        listen = o.listen.as_deref().unwrap_or("127.0.0.1:0"),
        store = o.store.as_deref().unwrap_or("path = \"tokengate.db\""),
    );
    let p = dir.join("tokengate.toml");
    std::fs::write(&p, text).unwrap();
    p
}

impl TestGateway {
    /// Default gateway.
    pub async fn start() -> TestGateway {
        Self::start_with(Options::default()).await
    }

    /// Gateway with options.
    pub async fn start_with(o: Options) -> TestGateway {
        let upstream = Upstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let up = o
            .upstream_override
            .clone()
            .unwrap_or_else(|| upstream.addr.to_string());
        let config_path = write_config(dir.path(), &up, &o);
        let cfg = Config::load(&config_path).unwrap_or_else(|e| panic!("test config: {e}"));
        let started = tokengate::app::start(cfg)
            .await
            .map_err(|e| e.message)
            .unwrap();
        let gw = started.gateway.clone();
        let addr = started.server.public_addr();
        let admin_addr = started.server.admin_addr();
        let tls = Some(started.server.tls_handle());
        let sessions = started.server.sessions();
        let (tx, task, background) = if o.serve {
            let (tx, task, background) = run_started(started);
            (tx, Some(task), background)
        } else {
            (
                tokio::sync::oneshot::channel::<()>().0,
                None,
                started.background,
            )
        };
        TestGateway {
            dir,
            config_path,
            gw,
            addr,
            admin_addr,
            upstream,
            tls,
            sessions,
            stop: Some(tx),
            task,
            _bg: Some(background),
        }
    }

    /// A default gateway with extra `[server]` keys ([`Options::server`]).
    pub async fn with_server(keys: impl Into<String>) -> TestGateway {
        Self::start_with(Options::server(keys)).await
    }

    /// A default gateway with extra top-level sections ([`Options::sections`]).
    pub async fn with_sections(toml: impl Into<String>) -> TestGateway {
        Self::start_with(Options::sections(toml)).await
    }

    /// A default gateway with the failed-auth limit [`failed_auth_limit`]`(per_minute)`.
    pub async fn failed_auth_limited(per_minute: usize) -> TestGateway {
        Self::start_with(Options::sections(failed_auth_limit(per_minute))).await
    }

    /// A default gateway and an admin token `root` of account `ops` holding `tokengate:admin`:
    /// (gateway, plaintext, id).
    pub async fn with_admin() -> (TestGateway, String, String) {
        let tg = Self::start().await;
        let (tok, id) = tg.token("ops", "root", &["tokengate:admin"]);
        (tg, tok, id)
    }

    /// A default gateway and a token `reader` of account `ci` holding `apps:read`:
    /// (gateway, plaintext, id).
    pub async fn with_reader() -> (TestGateway, String, String) {
        let tg = Self::start().await;
        let (tok, id) = tg.token("ci", "reader", &["apps:read"]);
        (tg, tok, id)
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Creates an account (ignores "exists").
    pub fn account(&self, name: &str) {
        let _ = self
            .gw
            .store()
            .create_account(name, None, "test", self.gw.now_ms());
    }

    /// Issues a token with explicit permissions; returns (plaintext, id).
    pub fn token(&self, account: &str, name: &str, perms: &[&str]) -> (String, String) {
        self.token_with(account, name, perms, |_| {})
    }

    /// Issues a token, letting the caller adjust the spec.
    pub fn token_with(
        &self,
        account: &str,
        name: &str,
        perms: &[&str],
        f: impl FnOnce(&mut NewTokenSpec),
    ) -> (String, String) {
        self.account(account);
        let expires_at = Some(self.gw.now_ms() + 30 * 86_400_000);
        let mut spec = token_spec(account, name, perms, expires_at);
        f(&mut spec);
        let (row, new) = self
            .gw
            .store()
            .create_token(&spec, "tg", 1000, self.gw.now_ms())
            .unwrap();
        (new.plaintext, row.id)
    }

    /// Issues a token holding `apps:read` with its own rate limit (`rps` a second, `burst`).
    pub fn rated_token(&self, account: &str, name: &str, rps: f64, burst: u32) -> (String, String) {
        self.token_with(account, name, &["apps:read"], |s| {
            s.rate = Some(tokengate::store::RateOverride {
                requests_per_second: rps,
                burst,
            })
        })
    }

    /// The audit log file (`[audit] path` of the config).
    pub fn audit_path(&self) -> PathBuf {
        self.gw
            .config()
            .audit
            .path
            .clone()
            .unwrap_or_else(|| self.dir.path().join("audit.log"))
    }

    /// The audit log's lines as written, after flushing.
    pub async fn raw_audit_lines(&self) -> Vec<serde_json::Value> {
        self.gw.audit().flush_async().await.unwrap();
        let text = std::fs::read_to_string(self.audit_path()).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The audit log's lines, one per request as `tokengate audit` shows them: the completion
    /// line of a forwarded request is merged into its decision line. Waits (briefly) for the
    /// completions of requests whose response body is still ending.
    pub async fn audit_lines(&self) -> Vec<serde_json::Value> {
        for _ in 0..100 {
            let (merged, open) = merge_completions(self.raw_audit_lines().await);
            if open == 0 {
                return merged;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        merge_completions(self.raw_audit_lines().await).0
    }

    /// Request audit lines only.
    pub async fn request_lines(&self) -> Vec<serde_json::Value> {
        self.audit_lines()
            .await
            .into_iter()
            .filter(|l| l["kind"] == "request")
            .collect()
    }

    /// The last request audit line.
    pub async fn last_request_line(&self) -> serde_json::Value {
        // The line is queued after the response is built; give the writer a moment.
        eventually("a request line in the audit log", WAIT_LIMIT, || async {
            self.request_lines().await.last().cloned()
        })
        .await
    }

    /// Checks the last request line's `status_code` and `reason`; returns the line.
    pub async fn assert_last_line(&self, status: u16, reason: &str) -> serde_json::Value {
        let line = self.last_request_line().await;
        assert_eq!(line["status_code"], status, "{line}");
        assert_eq!(line["reason"], reason, "{line}");
        line
    }

    /// The admin event lines (`kind` admin) of `event`.
    pub async fn admin_events(&self, event: &str) -> Vec<serde_json::Value> {
        self.audit_lines()
            .await
            .into_iter()
            .filter(|l| l["kind"] == "admin" && l["event"] == event)
            .collect()
    }

    /// The last request line for `path` (waits for it, at most [`WAIT_LIMIT`]).
    pub async fn last_line_for(&self, path: &str) -> serde_json::Value {
        let what = format!("a request line for {path}");
        eventually(&what, WAIT_LIMIT, || async {
            self.request_lines()
                .await
                .into_iter()
                .rev()
                .find(|l| l["path"] == path)
        })
        .await
    }

    /// Stops the server and waits for the drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// A plain HTTP/1.1 client.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// `GET url` with a bearer token on client `c`.
pub async fn get_bearer(
    c: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    token: impl std::fmt::Display,
) -> reqwest::Response {
    c.get(url).bearer_auth(token).send().await.unwrap()
}

/// [`get_bearer`] that checks the answer's status is `status`; returns the response.
pub async fn get_bearer_expect(
    c: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    token: impl std::fmt::Display,
    status: u16,
) -> reqwest::Response {
    let r = get_bearer(c, url, token).await;
    assert_eq!(r.status(), status, "GET {}", r.url().path());
    r
}

/// Sends the request `rb` built, with the bearer `token`.
pub async fn send_bearer(
    rb: reqwest::RequestBuilder,
    token: impl std::fmt::Display,
) -> reqwest::Response {
    rb.bearer_auth(token).send().await.unwrap()
}

/// `GET url` on client `c` with the bearer `token` (when given) and the headers `headers`.
pub async fn get_with(
    c: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut r = c.get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

/// Checks that `r` answers `status` with a JSON body whose `message` contains `needle`; returns
/// the body.
pub async fn assert_error_message(
    r: reqwest::Response,
    status: u16,
    needle: &str,
) -> serde_json::Value {
    assert_eq!(r.status(), status, "{}", r.url().path());
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains(needle)),
        "{needle:?} not in {body}"
    );
    body
}

/// The `WWW-Authenticate` header of `r` (which must have one).
pub fn challenge(r: &reqwest::Response) -> &str {
    r.headers()["www-authenticate"].to_str().unwrap()
}

/// Signs in to the web UI (`POST url` with an `Origin` header and the token as JSON) on client `c`.
pub async fn post_session(
    c: &reqwest::Client,
    url: String,
    origin: &str,
    token: &str,
) -> reqwest::Response {
    c.post(url)
        .header("origin", origin)
        .json(&serde_json::json!({ "token": token }))
        .send()
        .await
        .unwrap()
}

/// Signs in to the web UI of the admin listener at `origin` (`http://host:port`) with `token` on
/// client `c`; asserts 200 and returns the session cookie (`name=value`) and the CSRF token.
pub async fn sign_in_session(c: &reqwest::Client, origin: &str, token: &str) -> (String, String) {
    let r = post_session(c, format!("{origin}/session"), origin, token).await;
    assert_eq!(r.status(), 200);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    let body: serde_json::Value = r.json().await.unwrap();
    (
        set.split(';').next().unwrap().to_string(),
        body["csrf_token"].as_str().unwrap().to_string(),
    )
}

/// A raw response parsed from bytes.
#[derive(Debug)]
pub struct RawResponse {
    /// Status code (0 when nothing came back).
    pub status: u16,
    /// Header lines, lower-cased names.
    pub headers: Vec<(String, String)>,
    /// Everything after the head.
    pub body: String,
    /// The whole text.
    pub raw: String,
}

impl RawResponse {
    /// First header value by name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// [`raw`] that checks the response's status; returns the response.
pub async fn raw_expect(addr: SocketAddr, bytes: impl AsRef<[u8]>, status: u16) -> RawResponse {
    let r = raw(addr, bytes).await;
    assert_eq!(r.status, status, "{}", r.raw);
    r
}

/// Sends raw bytes and reads until the server closes or `timeout` passes; parses the first response.
pub async fn raw(addr: SocketAddr, bytes: impl AsRef<[u8]>) -> RawResponse {
    raw_all(addr, bytes.as_ref(), Duration::from_secs(3))
        .await
        .into_iter()
        .next()
        .unwrap_or(RawResponse {
            status: 0,
            headers: vec![],
            body: String::new(),
            raw: String::new(),
        })
}

/// Sends raw bytes and returns every response found in the reply stream (pipelining).
pub async fn raw_all(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> Vec<RawResponse> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(timeout, s.read_to_end(&mut buf)).await;
    parse_responses(&String::from_utf8_lossy(&buf))
}

/// Parses a stream of HTTP/1.1 responses (Content-Length or chunked bodies).
pub fn parse_responses(text: &str) -> Vec<RawResponse> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(head_end) = rest.find("\r\n\r\n") {
        let head = &rest[..head_end];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let after = &rest[head_end + 4..];
        let (body, consumed) = if let Some(cl) = headers.iter().find(|(k, _)| k == "content-length")
        {
            let n: usize = cl.1.parse().unwrap_or(0).min(after.len());
            (after[..n].to_string(), n)
        } else if headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
        {
            let mut body = String::new();
            let mut pos = 0;
            while let Some(le) = after[pos..].find("\r\n") {
                let size = usize::from_str_radix(after[pos..pos + le].trim(), 16).unwrap_or(0);
                pos += le + 2;
                if size == 0 {
                    pos = (pos + 2).min(after.len());
                    break;
                }
                let end = (pos + size).min(after.len());
                body.push_str(&after[pos..end]);
                pos = (end + 2).min(after.len());
            }
            (body, pos)
        } else {
            (String::new(), 0)
        };
        out.push(RawResponse {
            status,
            headers,
            body,
            raw: rest[..head_end + 4 + consumed].to_string(),
        });
        rest = &after[consumed..];
    }
    out
}

/// Merges each `completion` line into the decision line of its request (status, reason,
/// outcome, bytes, duration; `phase` removed), as the reader shows a request. Returns the lines
/// and how many decisions have no completion.
pub fn merge_completions(lines: Vec<serde_json::Value>) -> (Vec<serde_json::Value>, usize) {
    let mut out: Vec<serde_json::Value> = Vec::with_capacity(lines.len());
    let mut open: HashMap<String, usize> = HashMap::new();
    for l in lines {
        if l["kind"] == "request" && l["phase"] == "decision" {
            open.insert(l["request_id"].as_str().unwrap_or("").to_owned(), out.len());
            out.push(l);
        } else if l["kind"] == "completion" {
            let id = l["request_id"].as_str().unwrap_or("");
            match open.remove(id) {
                Some(i) => {
                    let d = out[i].as_object_mut().unwrap();
                    d.remove("phase");
                    for k in ["status_code", "reason", "outcome", "bytes", "duration_ms"] {
                        d.insert(k.into(), l[k].clone());
                    }
                }
                None => out.push(l),
            }
        } else {
            out.push(l);
        }
    }
    (out, open.len())
}

/// Checks the audit line for a rejected request.
pub fn assert_rejection_line(line: &serde_json::Value, status: u16, reason: &str) {
    assert_eq!(line["status_code"], status, "{line}");
    assert_eq!(line["reason"], reason, "{line}");
    assert_eq!(line["rbac_decision"], "deny", "{line}");
    assert!(line["upstream"].is_null(), "{line}");
}

/// A tmpfs mounted for one test (a small, really full disk); unmounted when dropped, even when
/// the test fails (lazily when files on it are still open).
pub struct Tmpfs {
    /// The mount point.
    pub dir: PathBuf,
}

/// Why a test that needs a tmpfs failed to get one.
pub const MOUNT_NEEDED: &str = "cannot mount a tmpfs: these tests need root (as .ci/run runs them)";

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` at `dir` (created); None when that is not possible here (not
    /// root, no tmpfs).
    pub fn mount(dir: &Path, bytes: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes},mode=0700"),
                "tokengate-test",
            ])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut c = std::process::Command::new("umount");
            if lazy {
                // Files may still be open (a gateway task not yet dropped): detach now.
                c.arg("-l");
            }
            c.arg(&self.dir)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !umount(false) {
            umount(true);
        }
    }
}

/// Fills a file system: writes until ENOSPC, then byte by byte into the last page.
pub fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let big = vec![0u8; 64 * 1024];
    while matches!(f.write(&big), Ok(n) if n > 0) {}
    while matches!(f.write(&[0u8]), Ok(1)) {}
    p
}
