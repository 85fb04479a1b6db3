//! Forward-auth mode (issue 17, docs/forward-auth.md): the endpoint `[forward_auth] path` judges
//! the request a trusted front proxy describes with the proxy pipeline's phases.
//!
//! In-process: each header dialect (nginx, Traefik, Caddy, Envoy), refusals of untrusted peers and
//! of missing or ambiguous descriptions, and the path corpus judged exactly as proxy mode judges it.
//! With Debian's real nginx (`auth_request`) and Caddy (`forward_auth`) started here in front of the
//! endpoint and a recording upstream: allowed requests carry the identity headers to the upstream;
//! 401, 403 and 429 reach the client with their bodies and headers; and no request of the path
//! corpus (plus Host and header smuggling tricks) reaches the upstream on a path that authorisation
//! did not allow. nginx and caddy missing is a failure, not a skip (`.ci/run` installs them).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;
use tokengate::path::canonicalise;

const EP: &str = "/_tokengate/auth";
const HOST: &str = "gw.test";

/// A gateway serving the forward-auth endpoint, trusting `trusted` as front proxies.
async fn gateway(trusted: &str) -> TestGateway {
    TestGateway::start_with(Options {
        server: format!("trusted_proxies = [\"{trusted}\"]"),
        sections: format!("{NO_RATE_LIMIT}\n[forward_auth]\n"),
        ..Options::default()
    })
    .await
}

/// [`gateway`] with a token `reader` of account `acme` holding `apps:read`: (gateway, token, id).
async fn reader_gateway(trusted: &str) -> (TestGateway, String, String) {
    let tg = gateway(trusted).await;
    let (tok, id) = tg.token("acme", "reader", &["apps:read"]);
    (tg, tok, id)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// A raw GET to `path` with the given header lines (each ending in CRLF).
fn get(path: &str, headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n").into_bytes()
}

/// Sends [`get`]`(path, headers)` to `addr` and reads the response.
async fn send(addr: SocketAddr, path: &str, headers: &str) -> RawResponse {
    raw(addr, &get(path, headers)).await
}

/// The header lines of a request to `HOST` bearing `tok`.
fn bearer_to_host(tok: &str) -> String {
    format!("Host: {HOST}\r\nAuthorization: Bearer {tok}\r\n")
}

/// Sends the endpoint a request described by `headers`; checks the answer's status, returns it.
async fn judged(tg: &TestGateway, headers: &str, status: u16) -> RawResponse {
    let r = send(tg.addr, EP, headers).await;
    assert_eq!(r.status, status, "{}", r.raw);
    r
}

/// Envoy's form: the described request's target `original` after the endpoint, bearing `tok`;
/// checks the answer's status, returns it.
async fn envoy(tg: &TestGateway, original: &str, tok: &str, status: u16) -> RawResponse {
    let r = send(tg.addr, &format!("{EP}{original}"), &bearer_to_host(tok)).await;
    assert_eq!(r.status, status, "{}", r.raw);
    r
}

/// The header lines of a front proxy's auth subrequest (to its own name for the gateway) for a
/// client request to `HOST` bearing `tok`, described by the lines of `description`.
fn subrequest(tok: &str, description: &str) -> String {
    format!(
        "Host: tokengate.internal\r\nAuthorization: Bearer {tok}\r\nX-Forwarded-Host: {HOST}\r\n{description}"
    )
}

/// nginx's form of a GET of `uri` bearing `tok`: the header lines.
fn nginx_get(tok: &str, uri: &str) -> String {
    format!("{}X-Original-URI: {uri}\r\n", bearer_to_host(tok))
}

/// Checks the last audit line is a proxy-mode one (not a forward-auth decision).
async fn assert_proxy_mode_line(tg: &TestGateway) {
    let line = tg.last_request_line().await;
    assert_eq!(line["mode"], "proxy", "{line}");
}

/// Checks the last audit line is a forward-auth rejection with `status` and `reason`; returns it.
async fn assert_fa_rejection(tg: &TestGateway, status: u16, reason: &str) -> serde_json::Value {
    let line = tg.last_request_line().await;
    assert_rejection_line(&line, status, reason);
    assert_eq!(line["mode"], "forward_auth", "{line}");
    line
}

/// Checks a 403 for want of `permission`: body, `insufficient_scope` challenge; returns the body.
fn assert_insufficient_scope(r: &RawResponse, permission: &str) -> serde_json::Value {
    assert_eq!(r.status, 403, "{}", r.raw);
    let body = json(&r.body);
    assert_eq!(body["error"], "insufficient_scope");
    assert_eq!(body["required_permission"], permission);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("insufficient_scope"),
        "{}",
        r.raw
    );
    body
}

/// The audit lines of forward-auth decisions.
async fn fa_lines(tg: &TestGateway) -> Vec<serde_json::Value> {
    tg.request_lines()
        .await
        .into_iter()
        .filter(|l| l["mode"] == "forward_auth")
        .collect()
}

// ------------------------------------------------------------------------------- in-process

#[tokio::test]
async fn nginx_dialect_allowed_answers_200_with_identity_headers() {
    let (tg, tok, id) = reader_gateway("127.0.0.1/32").await;
    let description = "X-Original-URI: /apps/x/logs?tail=1\r\nX-Original-Method: GET\r\n";
    let r = judged(&tg, &subrequest(&tok, description), 200).await;
    assert_eq!(r.body, "");
    assert_eq!(r.header("x-tokengate-token-id"), Some(id.as_str()));
    assert_eq!(r.header("x-tokengate-token-name"), Some("reader"));
    assert_eq!(r.header("x-tokengate-account"), Some("acme"));
    assert_eq!(r.header("x-tokengate-permissions"), Some("apps:read"));
    assert!(r.header("ratelimit-limit").is_some(), "{}", r.raw);
    assert!(r.header("ratelimit-remaining").is_some(), "{}", r.raw);
    let rid = r.header("x-request-id").unwrap().to_string();
    let line = tg.last_request_line().await;
    assert_eq!(line["mode"], "forward_auth", "{line}");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/apps/x/logs");
    assert_eq!(line["reason"], "ok");
    assert_eq!(line["rbac_decision"], "allow");
    assert_eq!(line["request_id"], rid.as_str());
    assert_eq!(line["api_token_id"], id.as_str());
    assert_eq!(tg.upstream.count(), 0, "forward-auth never forwards");
    // Proxy-mode lines say so.
    let proxied = send(tg.addr, "/health", &format!("Host: {HOST}\r\n")).await;
    assert_eq!(proxied.status, 200);
    assert_proxy_mode_line(&tg).await;
    tg.stop().await;
}

#[tokio::test]
async fn traefik_caddy_and_envoy_dialects_are_judged_on_the_described_request() {
    let (tg, tok, _) = reader_gateway("127.0.0.1/32").await;
    // Traefik: POST to deploy needs apps:deploy → the proxy's 403 with its body and challenge.
    let description = "X-Forwarded-Method: POST\r\nX-Forwarded-Uri: /apps/x/deploy\r\nX-Forwarded-Proto: https\r\n";
    let r = judged(&tg, &subrequest(&tok, description), 403).await;
    let body = assert_insufficient_scope(&r, "apps:deploy");
    // The body is also offered as a header, for nginx.
    assert_eq!(json(r.header("x-tokengate-error").unwrap()), body);
    let line = assert_fa_rejection(&tg, 403, "insufficient_permission").await;
    assert_eq!(
        (line["method"].as_str(), line["path"].as_str()),
        (Some("POST"), Some("/apps/x/deploy"))
    );

    // Caddy: no credentials → the proxy's 401.
    let caddy = format!("Host: {HOST}\r\nX-Forwarded-Method: GET\r\nX-Forwarded-Uri: /apps/x\r\n");
    let r = judged(&tg, &caddy, 401).await;
    assert_eq!(json(&r.body)["error"], "unauthorized");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"tokengate\"")
    );
    let line = tg.last_request_line().await;
    assert_rejection_line(&line, 401, "missing_token");
    assert_eq!(line["path"], "/apps/x");

    // Envoy: the original path follows the endpoint; method and Host are the request's own.
    envoy(&tg, "/apps/y/items?page=2", &tok, 200).await;
    let line = tg.last_request_line().await;
    assert_eq!(
        (line["path"].as_str(), line["reason"].as_str()),
        (Some("/apps/y/items"), Some("ok"))
    );
    envoy(&tg, "/apps/y/%2e%2e/%2e%2e/admin", &tok, 400).await;
    assert_rejection_line(&tg.last_request_line().await, 400, "bad_path");
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn untrusted_peers_are_refused_and_audited() {
    // 127.0.0.1 is not a trusted proxy here.
    let (tg, tok, _) = reader_gateway("10.0.0.0/8").await;
    let headers = format!(
        "{}X-Forwarded-For: 10.1.2.3\r\n",
        nginx_get(&tok, "/apps/x")
    );
    let r = judged(&tg, &headers, 403).await;
    let body = json(&r.body);
    assert_eq!(body["error"], "forbidden");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("trusted_proxies")
    );
    assert!(r.header("x-tokengate-token-id").is_none());
    let line = assert_fa_rejection(&tg, 403, "forward_auth_untrusted").await;
    assert_eq!(line["path"], EP, "the described path is not believed");
    assert_eq!(line["client_ip"], "127.0.0.1");
    assert!(line["api_token_id"].is_null());
    // Envoy's form from an untrusted peer too.
    envoy(&tg, "/apps/x", &tok, 403).await;
    assert_fa_rejection(&tg, 403, "forward_auth_untrusted").await;
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn missing_and_ambiguous_descriptions_are_400() {
    let (tg, tok, _) = reader_gateway("127.0.0.1/32").await;
    let auth = bearer_to_host(&tok);
    for (extra, reason) in [
        ("", "forward_auth_missing_uri"),
        (
            "X-Forwarded-Uri: /apps/x\r\n",
            "forward_auth_missing_method",
        ),
        (
            "X-Original-URI: /admin/x\r\nX-Forwarded-Uri: /apps/x\r\nX-Forwarded-Method: GET\r\n",
            "forward_auth_ambiguous",
        ),
        (
            "X-Original-URI: /apps/x\r\nX-Original-URI: /admin\r\n",
            "forward_auth_ambiguous",
        ),
        ("X-Original-URI: http://evil.test/apps/x\r\n", "bad_path"),
        (
            "X-Original-URI: /apps/x\r\nX-Original-Method: TRACE\r\n",
            "method_not_allowed",
        ),
        (
            "X-Original-URI: /apps/x\r\nX-Forwarded-Host: evil@gw.test\r\n",
            "bad_host",
        ),
    ] {
        let r = send(tg.addr, EP, &format!("{auth}{extra}")).await;
        assert_eq!(r.status, 400, "{extra}: {}", r.raw);
        assert_eq!(json(&r.body)["error"], "invalid_request", "{extra}");
        assert_fa_rejection(&tg, 400, reason).await;
    }
    assert_eq!(tg.upstream.count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn rate_limited_decision_is_the_proxys_429() {
    let tg = gateway("127.0.0.1/32").await;
    let (tok, _) = tg.rated_token("acme", "slow", 0.001, 1);
    let req = get(EP, &nginx_get(&tok, "/apps/x"));
    assert_eq!(raw(tg.addr, &req).await.status, 200);
    let r = raw_expect(tg.addr, &req, 429).await;
    assert_eq!(json(&r.body)["error"], "rate_limited");
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("ratelimit-limit"), Some("1"));
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    assert_fa_rejection(&tg, 429, "rate_limited").await;
    tg.stop().await;
}

#[tokio::test]
async fn without_the_table_the_endpoint_is_not_served() {
    let tg = TestGateway::with_server("trusted_proxies = [\"127.0.0.1/32\"]").await;
    let (tok, _) = tg.token("acme", "reader", &["apps:read"]);
    judged(&tg, &nginx_get(&tok, "/apps/x"), 404).await;
    assert_proxy_mode_line(&tg).await;
    tg.stop().await;
}

/// Request targets of the data-plane corpus (tests/security.rs): dot segments raw and encoded,
/// encoded slashes and backslashes, double encoding, `;`, case variants, slashes. The token used
/// holds `apps:read` only, so any path reaching `/admin` is a bypass.
const CORPUS: &[&str] = &[
    // Controls.
    "/apps/x",
    "/apps/x/logs",
    "/apps/x/",
    "/apps/x/..a/b",
    "/apps/x/admin",
    "/health",
    "/admin/x",
    "/admin",
    "/apps/x/logs?next=/../admin",
    // Dot segments.
    "/apps/x/../admin/secret",
    "/apps/x/../../admin",
    "/apps/x/./admin",
    "/apps/x/.../admin",
    "/apps/x/%2e%2e/admin",
    "/apps/x/%2E%2E/%2E%2E/admin",
    "/apps/x/.%2e/admin",
    "/apps/x/%2e./admin",
    "/apps/x/%252e%252e/admin",
    "/apps/x/%25%32%65%25%32%65/admin",
    "/apps/x/%2e",
    "/apps/./x",
    "/apps/x/a..",
    "/apps/x/admin.",
    "/apps/x/..%20/admin",
    // Encoded delimiters.
    "/apps/x%2f..%2fadmin",
    "/apps/x%2F..%2Fadmin",
    "/apps%2fx",
    "/apps/x/a%2fb",
    "/admin%2f",
    "/apps/x%5c..%5cadmin",
    "/apps/x%252f..%252fadmin",
    "/apps/x/a%3bb",
    "/apps/x/a%00b",
    "/apps/x%c0%af..%c0%afadmin",
    "/apps/x/%ef%bc%8e%ef%bc%8e/admin",
    // Path parameters and backslashes.
    "/apps/x;jsessionid=1",
    "/admin;/apps/x",
    "/apps/x/..;/..;/admin",
    "/apps\\..\\admin",
    // Case and unreserved escapes.
    "/Apps/x",
    "/APPS/x",
    "/ADMIN/x",
    "/Admin",
    "/%61pps/x",
    "/%61dmin/x",
    "/apps/%78",
    // Slashes.
    "/admin/",
    "//admin",
    "//apps/x",
    "/apps//x",
    "/apps/x//",
    "/health/",
];

#[tokio::test]
async fn described_paths_are_judged_exactly_as_proxy_mode_judges_them() {
    let (tg, tok, _) = reader_gateway("127.0.0.1/32").await;
    let auth = bearer_to_host(&tok);
    for target in CORPUS {
        let proxied = send(tg.addr, target, &auth).await;
        let proxy_line = tg.last_request_line().await;
        let described = send(tg.addr, EP, &format!("{auth}X-Original-URI: {target}\r\n")).await;
        let fa_line = tg.last_request_line().await;
        let envoy = send(tg.addr, &format!("{EP}{target}"), &auth).await;
        let envoy_line = tg.last_request_line().await;
        assert_eq!(fa_line["mode"], "forward_auth", "{target}");
        for (what, r, line) in [
            ("nginx form", &described, &fa_line),
            ("envoy form", &envoy, &envoy_line),
        ] {
            assert_eq!(r.status, proxied.status, "{target} ({what}): {}", r.raw);
            for k in [
                "reason",
                "rbac_decision",
                "path",
                "method",
                "rule",
                "permission",
            ] {
                assert_eq!(line[k], proxy_line[k], "{target} ({what}): {k}");
            }
            if r.status != 200 {
                assert_eq!(
                    json(&r.body)["error"],
                    json(&proxied.body)["error"],
                    "{target}"
                );
            }
        }
    }
    tg.stop().await;
}

// -------------------------------------------------------------------- real front proxies

fn free_port() -> u16 {
    dead_addr().port()
}

async fn wait_listening(addr: SocketAddr, child: &mut Child, what: &str, log: &Path) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what} did not listen on {addr}");
}

/// A front proxy process, killed on drop.
struct Front {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Starts the front proxy `bin` (Debian's package `what`) on a free port: `setup(dir, port)`
/// writes its config into the temp folder `dir` and returns the command to run and its log file.
async fn start_front(
    bin: &str,
    what: &str,
    setup: impl FnOnce(&Path, u16) -> (Command, std::path::PathBuf),
) -> Front {
    assert!(
        Path::new(bin).exists(),
        "{bin} is missing: install Debian's `{what}` (.ci/run does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (mut cmd, log) = setup(dir.path(), port);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {what}: {e}"));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, &mut child, what, &log).await;
    Front {
        child,
        addr,
        _dir: dir,
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The nginx config of docs/forward-auth.md, with the temp paths a test needs.
fn nginx_conf(dir: &Path, port: u16, tokengate: SocketAddr, upstream: SocketAddr) -> String {
    let d = dir.display();
    let user = if is_root() { "user root;\n" } else { "" };
    format!(
        r#"{user}worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;

    upstream tokengate {{ server {tokengate}; }}
    upstream api {{ server {upstream}; }}

    server {{
        listen 127.0.0.1:{port};

        location / {{
            auth_request /_tokengate_auth;
            auth_request_set $tg_status $upstream_status;
            auth_request_set $tg_error $upstream_http_x_tokengate_error;
            auth_request_set $tg_www_authenticate $upstream_http_www_authenticate;
            auth_request_set $tg_retry_after $upstream_http_retry_after;
            auth_request_set $tg_ratelimit_limit $upstream_http_ratelimit_limit;
            auth_request_set $tg_ratelimit_remaining $upstream_http_ratelimit_remaining;
            auth_request_set $tg_ratelimit_reset $upstream_http_ratelimit_reset;
            auth_request_set $tg_request_id $upstream_http_x_request_id;
            auth_request_set $tg_token_id $upstream_http_x_tokengate_token_id;
            auth_request_set $tg_token_name $upstream_http_x_tokengate_token_name;
            auth_request_set $tg_account $upstream_http_x_tokengate_account;
            auth_request_set $tg_permissions $upstream_http_x_tokengate_permissions;
            # Identity for the API: always set here, so a client's copy never passes.
            proxy_set_header X-Tokengate-Token-Id $tg_token_id;
            proxy_set_header X-Tokengate-Token-Name $tg_token_name;
            proxy_set_header X-Tokengate-Account $tg_account;
            proxy_set_header X-Tokengate-Permissions $tg_permissions;
            proxy_set_header X-Request-Id $tg_request_id;
            proxy_set_header Host $host;
            add_header RateLimit-Limit $tg_ratelimit_limit always;
            add_header RateLimit-Remaining $tg_ratelimit_remaining always;
            add_header RateLimit-Reset $tg_ratelimit_reset always;
            error_page 400 401 403 421 429 431 500 503 = @tokengate_denied;
            proxy_pass http://api;
        }}

        location = /_tokengate_auth {{
            internal;
            proxy_pass http://tokengate/_tokengate/auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            # A client's copies of the other dialects' headers are not forwarded.
            proxy_set_header X-Forwarded-Uri "";
            proxy_set_header X-Forwarded-Method "";
        }}

        # nginx answers 401/403 itself (and any other status as 500): give the client
        # tokengate's status, body and headers instead.
        location @tokengate_denied {{
            default_type application/json;
            add_header WWW-Authenticate $tg_www_authenticate always;
            add_header Retry-After $tg_retry_after always;
            add_header RateLimit-Limit $tg_ratelimit_limit always;
            add_header RateLimit-Remaining $tg_ratelimit_remaining always;
            add_header RateLimit-Reset $tg_ratelimit_reset always;
            add_header X-Request-Id $tg_request_id always;
            add_header Cache-Control no-store always;
            if ($tg_status = 400) {{ return 400 "$tg_error\n"; }}
            if ($tg_status = 401) {{ return 401 "$tg_error\n"; }}
            if ($tg_status = 403) {{ return 403 "$tg_error\n"; }}
            if ($tg_status = 421) {{ return 421 "$tg_error\n"; }}
            if ($tg_status = 429) {{ return 429 "$tg_error\n"; }}
            if ($tg_status = 431) {{ return 431 "$tg_error\n"; }}
            if ($tg_status = 503) {{ return 503 "$tg_error\n"; }}
            return 500;
        }}
    }}
}}
"#
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

async fn start_nginx(tokengate: SocketAddr, upstream: SocketAddr) -> Front {
    let bin = "/usr/sbin/nginx";
    start_front(bin, "nginx", |dir, port| {
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(dir, port, tokengate, upstream)).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        (cmd, dir.join("error.log"))
    })
    .await
}

/// The Caddyfile of docs/forward-auth.md, with the port a test needs.
fn caddyfile(port: u16, tokengate: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        r#"{{
    admin off
    auto_https off
}}

http://:{port} {{
    bind 127.0.0.1
    route {{
        # Caddy keeps a client's copy of a header the auth response lacks: drop them first.
        request_header -X-Tokengate-Token-Id
        request_header -X-Tokengate-Token-Name
        request_header -X-Tokengate-Account
        request_header -X-Tokengate-Permissions
        request_header -X-Request-Id
        forward_auth {tokengate} {{
            uri /_tokengate/auth
            copy_headers X-Tokengate-Token-Id X-Tokengate-Token-Name X-Tokengate-Account X-Tokengate-Permissions X-Request-Id
        }}
        reverse_proxy {upstream}
    }}
}}
"#
    )
}

async fn start_caddy(tokengate: SocketAddr, upstream: SocketAddr) -> Front {
    let bin = "/usr/bin/caddy";
    start_front(bin, "caddy", |dir, port| {
        let conf = dir.join("Caddyfile");
        std::fs::write(&conf, caddyfile(port, tokengate, upstream)).unwrap();
        let log = dir.join("caddy.log");
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&conf)
            .env("HOME", dir)
            .env("XDG_DATA_HOME", dir)
            .env("XDG_CONFIG_HOME", dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        (cmd, log)
    })
    .await
}

/// Allowed, 401, 403 and 429 through a real front proxy. `allowed_ratelimit_headers`: the
/// proxy's snippet copies RateLimit-* to the client on allowed requests (nginx; Caddy's
/// `forward_auth` copies headers to the upstream request only).
async fn decisions_through(front: &Front, tg: &TestGateway, allowed_ratelimit_headers: bool) {
    let (tok, id) = tg.token("acme", "reader", &["apps:read"]);
    let auth = bearer_to_host(&tok);

    // Allowed: the upstream gets the request and the identity, not the client's copies.
    let r = send(
        front.addr,
        "/apps/x/logs?tail=1",
        &format!("{auth}X-Tokengate-Account: root\r\nX-Request-Id: forged\r\n"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert!(r.body.starts_with("upstream ok"), "{}", r.raw);
    let got = tg.upstream.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let up = &got[0];
    assert_eq!(
        (up.method.as_str(), up.target.as_str()),
        ("GET", "/apps/x/logs?tail=1")
    );
    let h = |n: &str| up.headers.get(n).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(h("x-tokengate-token-id"), Some(id.clone()));
    assert_eq!(h("x-tokengate-token-name").as_deref(), Some("reader"));
    assert_eq!(h("x-tokengate-account").as_deref(), Some("acme"));
    assert_eq!(h("x-tokengate-permissions").as_deref(), Some("apps:read"));
    let line = fa_lines(tg).await.pop().unwrap();
    assert_eq!(h("x-request-id").as_deref(), line["request_id"].as_str());
    assert_eq!(
        (line["path"].as_str(), line["reason"].as_str()),
        (Some("/apps/x/logs"), Some("ok"))
    );
    assert_eq!(line["client_ip"], "127.0.0.1");

    // Public rule: no identity, and the client's forged identity does not pass either.
    tg.upstream.clear();
    let r = send(
        front.addr,
        "/health",
        &format!(
            "Host: {HOST}\r\nX-Tokengate-Account: root\r\nX-Tokengate-Token-Id: tok_forged\r\n"
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let got = tg.upstream.received();
    assert_eq!(got.len(), 1);
    // Absent (nginx) or empty (Caddy copies the endpoint's empty values): never the client's.
    for name in ["x-tokengate-account", "x-tokengate-token-id"] {
        let v = got[0].headers.get(name).map(|v| v.as_bytes());
        assert!(
            matches!(v, None | Some(b"")),
            "{name}: {:?}",
            got[0].headers
        );
    }
    tg.upstream.clear();

    // 401 with tokengate's body and challenge.
    let r = send(front.addr, "/apps/x", &format!("Host: {HOST}\r\n")).await;
    assert_eq!(r.status, 401, "{}", r.raw);
    let body = json(&r.body);
    assert_eq!(body["error"], "unauthorized");
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .starts_with("Bearer realm=\"tokengate\""),
        "{}",
        r.raw
    );
    let line = fa_lines(tg).await.pop().unwrap();
    assert_rejection_line(&line, 401, "missing_token");
    assert_eq!(body["request_id"], line["request_id"]);

    // 403 with the required permission.
    let r = send(front.addr, "/admin/users", &auth).await;
    assert_insufficient_scope(&r, "admin:all");
    let line = fa_lines(tg).await.pop().unwrap();
    assert_rejection_line(&line, 403, "insufficient_permission");
    assert_eq!(line["path"], "/admin/users");

    // 429 with Retry-After and RateLimit-*.
    let (slow, _) = tg.rated_token("acme", "slow", 0.001, 1);
    let slow_auth = bearer_to_host(&slow);
    let r = send(front.addr, "/apps/x", &slow_auth).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    if allowed_ratelimit_headers {
        assert_eq!(r.header("ratelimit-limit"), Some("1"), "{}", r.raw);
    }
    tg.upstream.clear();
    let r = send(front.addr, "/apps/x", &slow_auth).await;
    assert_eq!(r.status, 429, "{}", r.raw);
    assert_eq!(json(&r.body)["error"], "rate_limited");
    assert!(r.header("retry-after").is_some(), "{}", r.raw);
    assert_eq!(r.header("ratelimit-remaining"), Some("0"), "{}", r.raw);
    assert_rejection_line(&fa_lines(tg).await.pop().unwrap(), 429, "rate_limited");
    assert_eq!(
        tg.upstream.count(),
        0,
        "refused requests never reach the upstream"
    );
}

/// Sends the corpus and the Host/header tricks through `front`; then every request the upstream
/// received must have a forward-auth line allowing exactly its (canonical) path and method.
async fn corpus_through(front: &Front, tg: &TestGateway) {
    let (tok, _) = tg.token("acme", "corpus", &["apps:read"]);
    let auth = bearer_to_host(&tok);
    tg.upstream.clear();
    let mut requests: Vec<Vec<u8>> = CORPUS.iter().map(|t| get(t, &auth)).collect();
    let bearer = format!("Authorization: Bearer {tok}\r\n");
    for tricks in [
        // Host tricks.
        format!("Host: gw.test:abc\r\n{bearer}"),
        format!("Host: evil@gw.test\r\n{bearer}"),
        format!("Host: gw.test\r\nHost: evil.test\r\n{bearer}"),
        format!("{auth}X-Forwarded-Host: evil.test\r\n"),
        // Smuggled descriptions: the client says it asked for something it may read.
        format!("{auth}X-Original-URI: /apps/x\r\nX-Original-Method: GET\r\n"),
        format!("{auth}X-Forwarded-Uri: /apps/x\r\nX-Forwarded-Method: GET\r\n"),
        format!("{auth}X-Rewrite-URL: /apps/x\r\nX-Original-URL: /apps/x\r\n"),
    ] {
        requests.push(get("/admin/x", &tricks));
    }
    requests.push(
        format!("GET http://evil.test/admin/x HTTP/1.1\r\n{auth}Connection: close\r\n\r\n")
            .into_bytes(),
    );
    requests.push(
        format!("GET http://gw.test/admin/x HTTP/1.1\r\n{auth}Connection: close\r\n\r\n")
            .into_bytes(),
    );
    for req in &requests {
        let _ = raw(front.addr, req).await;
    }
    let allowed: Vec<(String, String)> = fa_lines(tg)
        .await
        .into_iter()
        .filter(|l| l["rbac_decision"] == "allow" && l["reason"] == "ok")
        .map(|l| {
            (
                l["method"].as_str().unwrap().to_string(),
                l["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let got = tg.upstream.received();
    assert!(
        got.iter().any(|r| r.target == "/apps/x/logs") && got.iter().any(|r| r.target == "/health"),
        "the controls reach the upstream: {:?}",
        got.iter().map(|r| &r.target).collect::<Vec<_>>()
    );
    for r in &got {
        let path = r.target.split('?').next().unwrap();
        let canon = canonicalise(path, false).unwrap_or_else(|e| {
            panic!(
                "the upstream got {:?}, which is not canonical ({e})",
                r.target
            )
        });
        assert!(
            allowed.contains(&(r.method.clone(), canon.path.clone())),
            "the upstream got {} {:?} but no forward-auth decision allowed {:?}; allowed: {allowed:?}",
            r.method,
            r.target,
            canon.path
        );
        assert!(
            !canon.path.to_ascii_lowercase().contains("admin")
                || canon.path.starts_with("/apps/x/"),
            "{}",
            r.target
        );
    }
}

/// The decisions and the corpus through the front proxy `start` puts before a gateway.
async fn in_front<F: std::future::Future<Output = Front>>(
    start: impl FnOnce(SocketAddr, SocketAddr) -> F,
    allowed_ratelimit_headers: bool,
) {
    let tg = gateway("127.0.0.1/32").await;
    let front = start(tg.addr, tg.upstream.addr).await;
    decisions_through(&front, &tg, allowed_ratelimit_headers).await;
    corpus_through(&front, &tg).await;
    drop(front);
    tg.stop().await;
}

#[tokio::test]
async fn nginx_auth_request_in_front() {
    in_front(start_nginx, true).await;
}

#[tokio::test]
async fn caddy_forward_auth_in_front() {
    in_front(start_caddy, false).await;
}

#[tokio::test]
async fn route_host_options_apply_to_the_described_host() {
    let tg = TestGateway::start_with(Options {
        server: "trusted_proxies = [\"127.0.0.1/32\"]".into(),
        sections: "[forward_auth]\n".into(),
        extra_routes: r#"
[[routes]]
name = "hosted"
prefix = "/hosted"
upstream = "http://127.0.0.1:9"
allowed_hosts = ["api.example"]

[[routes.rules]]
methods = ["GET"]
path = "/hosted/**"
public = true
"#
        .into(),
        ..Options::default()
    })
    .await;
    let ask = |host: &str| {
        get(
            EP,
            &format!(
                "Host: tokengate.internal\r\nX-Original-URI: /hosted/a\r\nX-Forwarded-Host: {host}\r\n"
            ),
        )
    };
    raw_expect(tg.addr, &ask("api.example"), 200).await;
    let line = tg.last_request_line().await;
    assert_eq!(
        (line["reason"].as_str(), line["upstream"].as_str()),
        (Some("ok"), Some("hosted"))
    );
    raw_expect(tg.addr, &ask("evil.test"), 421).await;
    assert_rejection_line(&tg.last_request_line().await, 421, "host_not_allowed");
    tg.stop().await;
}
