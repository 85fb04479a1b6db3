//! `tokengate demo`: a real gateway with its SQLite store in a temporary folder, in front of a
//! small built-in echo upstream, with freshly issued tokens and ready-to-paste `curl` lines.
//!
//! Must never import: `cli` (it takes [`DemoOptions`], not clap types).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::app::AppError;
use crate::config::Config;
use crate::store::NewTokenSpec;

/// Starts the echo upstream on `addr` (port 0 for any). It answers every request with a JSON
/// description of what it received: method, path, query, headers, and body size.
pub async fn spawn_echo_upstream(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(echo);
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(local)
}

async fn echo(req: Request<Incoming>) -> Result<Response<http_body_util::Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let mut size = 0usize;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => size += f.data_ref().map_or(0, |d| d.len()),
            Err(_) => break,
        }
    }
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
            )
        })
        .collect();
    let v = serde_json::json!({
        "upstream": "tokengate demo echo",
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": size,
    });
    let mut resp = Response::new(http_body_util::Full::new(Bytes::from(
        serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
    )));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

async fn free_port(start: u16) -> u16 {
    for p in start..start.saturating_add(50) {
        if TcpListener::bind(("127.0.0.1", p)).await.is_ok() {
            return p;
        }
    }
    0
}

/// The demo's config: one route to the echo upstream with read, deploy and public rules.
pub fn demo_config(public: u16, admin: u16, upstream: SocketAddr) -> String {
    format!(
        r#"# Written by `tokengate demo`.
[server]
listen = "127.0.0.1:{public}"

[admin]
listen = "127.0.0.1:{admin}"

[store]
path = "tokengate.db"

[audit]
path = "audit.log"

[[routes]]
name = "echo"
prefix = "/"
upstream = "http://{upstream}"

[[routes.rules]]
methods = ["GET", "HEAD"]
path = "/apps/{{app}}/**"
permission = "apps:read"

[[routes.rules]]
methods = ["POST"]
path = "/apps/{{app}}/deploy"
permission = "apps:deploy"

[[routes.rules]]
methods = ["GET"]
path = "/health"
public = true
"#
    )
}

/// What `tokengate demo` was asked for (plain options: the demo knows nothing of clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoOptions {
    /// Public port to try first (the next free one is used if taken).
    pub port: u16,
    /// Exit after printing the tokens and curl lines.
    pub print_only: bool,
}

/// Runs the demo until ctrl-c.
pub async fn run(args: &DemoOptions) -> Result<(), AppError> {
    let dir = tempfile::Builder::new()
        .prefix("tokengate-demo-")
        .tempdir()
        .map_err(|e| AppError::failure(format!("cannot create a temporary folder: {e}")))?;
    let upstream = spawn_echo_upstream("127.0.0.1:0".parse().expect("addr"))
        .await
        .map_err(|e| AppError::failure(format!("cannot start the echo upstream: {e}")))?;
    let public = free_port(args.port).await;
    let admin = free_port(if public == 9090 { 9091 } else { 9090 }).await;
    let cfg_path = dir.path().join("tokengate.toml");
    std::fs::write(&cfg_path, demo_config(public, admin, upstream))
        .map_err(|e| AppError::failure(format!("cannot write the demo config: {e}")))?;
    let cfg = Config::load(&cfg_path).map_err(|e| AppError::failure(e.to_string()))?;
    let started = crate::app::start(cfg).await?;
    let gw = started.gateway.clone();
    let public_addr = started.server.public_addr();
    let admin_addr = started.server.admin_addr();

    let now = gw.now_ms();
    let prefix = gw.config().tokens.prefix.clone();
    let issued = gw
        .store_call(move |s| {
            s.create_account("demo", Some("demo@example.com"), "demo", now)?;
            let mut out = Vec::new();
            for (name, role) in [("demo-admin", "admin"), ("demo-viewer", "viewer")] {
                let perms = if role == "admin" {
                    vec!["*".to_string()]
                } else {
                    vec!["apps:read".to_string(), "logs:read".to_string()]
                };
                let spec = NewTokenSpec {
                    account: "demo".into(),
                    name: name.into(),
                    role: Some(role.into()),
                    permissions: perms,
                    scopes: Default::default(),
                    allowed_cidrs: vec![],
                    rate: None,
                    expires_at: Some(now + 7 * 86_400_000),
                    created_by: "demo".into(),
                };
                let (_, new) = s.create_token(&spec, &prefix, 5, now)?;
                out.push(new.plaintext);
            }
            Ok(out)
        })
        .await
        .map_err(|e| AppError::failure(e.to_string()))?;
    let (admin_token, viewer_token) = (&issued[0], &issued[1]);
    let base = format!("http://{public_addr}");
    println!(
        r#"
tokengate demo is running.
  gateway    {base}   (store and audit log in {dir})
  admin UI   http://{admin_addr}/   (sign in with the admin token; also /healthz, /readyz, /metrics)
  upstream   http://{upstream}   (built-in echo)

Tokens (shown once; they live only in this demo's temporary store):
  admin   {admin_token}
  viewer  {viewer_token}

Try:
  # 1. no token -> 401
  curl -i {base}/apps/billing/status
  # 2. viewer token -> 200, the echo upstream shows the identity headers it received
  curl -i -H "Authorization: Bearer {viewer_token}" {base}/apps/billing/status
  # 3. viewer may not deploy -> 403 insufficient_scope
  curl -i -X POST -H "Authorization: Bearer {viewer_token}" {base}/apps/billing/deploy
  # who am I?
  curl -s -H "Authorization: Bearer {admin_token}" {base}/_tokengate/v1/whoami
  # the audit log
  tail -f {dir}/audit.log

Press ctrl-c to stop (the temporary folder is deleted).
"#,
        dir = dir.path().display()
    );
    if args.print_only {
        return Ok(());
    }
    let crate::app::Started {
        server, background, ..
    } = started;
    server.run(crate::app::shutdown_signal()).await;
    drop(background);
    gw.audit().shutdown();
    drop(dir);
    Ok(())
}
