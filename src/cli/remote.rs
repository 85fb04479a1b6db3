//! Remote CLI (SPEC §8): `login`, `logout`, `whoami`, and the `token` / `account` commands run
//! against a gateway's admin API instead of the local store.
//!
//! Credentials live in `$XDG_CONFIG_HOME/tokengate/credentials` (else
//! `$HOME/.config/tokengate/credentials`), a TOML file of profiles (`[default]`, `[NAME]`) with
//! `url` and `token`, written with mode 0600 in a 0700 folder. `TOKENGATE_TOKEN` beats the file;
//! `--profile` picks a profile; a token is only ever sent to the URL it was saved with. Tokens are
//! read from stdin or the environment, never from argv.
//!
//! Output goes through [`super::print`], the printer local commands use too. Must never import:
//! `cli::local` (local and remote are siblings under `cli`), `admin`, `gateway`.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use super::print::{self, join, print_json, str_of};
use super::{AccountCmd, Cli, CliError, Command, TokenCmd};
use crate::lifecycle::parse_scope;

/// Environment variable holding a token (beats the credentials file).
pub const ENV_TOKEN: &str = "TOKENGATE_TOKEN";
/// Environment variable naming a PEM bundle of CAs trusted for `https://` admin URLs.
pub const ENV_CA_FILE: &str = "TOKENGATE_CA_FILE";
/// Admin URL used by `login` when none is given or saved.
pub const DEFAULT_URL: &str = "http://127.0.0.1:9090";
/// Profile used when none is named.
pub const DEFAULT_PROFILE: &str = "default";
/// Largest response body read from the admin API.
const MAX_RESPONSE: usize = 8 * 1024 * 1024;

/// One saved profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Admin API base URL (`http://127.0.0.1:9090`).
    pub url: String,
    /// The token. Stored here because the user asked `login` to keep it (mode 0600).
    pub token: String,
}

/// The credentials file path: `$XDG_CONFIG_HOME/tokengate/credentials`, else
/// `$HOME/.config/tokengate/credentials`.
pub fn credentials_path() -> Result<PathBuf, CliError> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(h) => PathBuf::from(h).join(".config"),
            None => {
                return Err(CliError::usage(
                    "neither XDG_CONFIG_HOME nor HOME is set: cannot find the credentials file",
                ));
            }
        },
    };
    Ok(base.join("tokengate").join("credentials"))
}

/// Reads every profile (none when the file does not exist).
pub fn load_profiles(path: &Path) -> Result<BTreeMap<String, Profile>, CliError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            toml::from_str(&text).map_err(|e| CliError::usage(format!("{}: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(CliError::failure(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// Writes every profile atomically: a 0600 temporary file in the same 0700 folder, then rename.
pub fn save_profiles(path: &Path, profiles: &BTreeMap<String, Profile>) -> Result<(), CliError> {
    let fail = |what: &str, e: std::io::Error| {
        CliError::failure(format!("cannot {what} {}: {e}", path.display()))
    };
    let dir = path.parent().expect("the credentials path has a folder");
    std::fs::create_dir_all(dir).map_err(|e| fail("create the folder of", e))?;
    let text = toml::to_string(profiles).expect("profiles serialize");
    let tmp = dir.join(format!(".credentials.{}.tmp", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    let _ = std::fs::remove_file(&tmp);
    let mut f = opts.open(&tmp).map_err(|e| fail("write", e))?;
    let header = "# tokengate remote CLI credentials: written by `tokengate login`. Keep this file private (mode 0600).\n";
    f.write_all(header.as_bytes())
        .and_then(|_| f.write_all(text.as_bytes()))
        .and_then(|_| f.sync_all())
        .map_err(|e| fail("write", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| fail("replace", e))
}

/// Where remote commands go, and with which token.
#[derive(Debug, Clone)]
pub struct Target {
    /// Admin API base URL.
    pub url: String,
    /// Token (never printed).
    token: String,
    /// Profile the token came from (None: `TOKENGATE_TOKEN`).
    pub profile: Option<String>,
}

/// Decides whether `token`/`account` commands run remotely, and against what:
/// remote when `--url`, `--profile` (or `TOKENGATE_URL` / `TOKENGATE_PROFILE`) is given, or when
/// there is no local config at all but a `[default]` profile exists.
pub fn target(cli: &Cli) -> Result<Option<Target>, CliError> {
    let implicit = cli.url.is_none()
        && cli.profile.is_none()
        && crate::app::default_config_path(cli.config.as_deref()).is_none();
    if cli.url.is_none() && cli.profile.is_none() && !implicit {
        return Ok(None);
    }
    let path = credentials_path()?;
    let profiles = load_profiles(&path)?;
    if implicit && !profiles.contains_key(DEFAULT_PROFILE) {
        return Ok(None);
    }
    resolve(cli.url.as_deref(), cli.profile.as_deref(), &profiles, &path).map(Some)
}

fn resolve(
    url: Option<&str>,
    profile: Option<&str>,
    profiles: &BTreeMap<String, Profile>,
    path: &Path,
) -> Result<Target, CliError> {
    let env_token = std::env::var(ENV_TOKEN)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    let name = profile.unwrap_or(DEFAULT_PROFILE);
    let saved = profiles.get(name);
    if profile.is_some() && saved.is_none() && (env_token.is_none() || url.is_none()) {
        return Err(CliError::usage(format!(
            "no profile `{name}` in {}; create it with `tokengate login --profile {name} --url URL`",
            path.display()
        )));
    }
    let url = match (url, saved) {
        (Some(u), _) => normalize_url(u)?,
        (None, Some(p)) => p.url.clone(),
        (None, None) => {
            return Err(CliError::usage(format!(
                "no admin URL: pass --url, or run `tokengate login` first (credentials: {})",
                path.display()
            )));
        }
    };
    if let Some(t) = env_token {
        return Ok(Target {
            url,
            token: t,
            profile: None,
        });
    }
    // A saved token only ever goes to the URL it was saved with.
    let from_file = saved
        .filter(|p| p.url == url)
        .map(|p| (name.to_string(), p))
        .or_else(|| {
            (profile.is_none())
                .then(|| profiles.iter().find(|(_, p)| p.url == url))
                .flatten()
                .map(|(n, p)| (n.clone(), p))
        });
    match from_file {
        Some((n, p)) => Ok(Target {
            url,
            token: p.token.clone(),
            profile: Some(n),
        }),
        None => Err(CliError::usage(format!(
            "no token for {url}: set {ENV_TOKEN}, or run `tokengate login --url {url}` (credentials: {})",
            path.display()
        ))),
    }
}

/// Checks a URL is `http(s)://host[:port][/base]` and drops a trailing `/`.
pub fn normalize_url(u: &str) -> Result<String, CliError> {
    let bad = || {
        CliError::usage(format!(
            "`{u}` is not an admin URL like http://127.0.0.1:9090"
        ))
    };
    let uri: Uri = u.trim().parse().map_err(|_| bad())?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(bad()),
    }
    if uri.authority().is_none() || uri.query().is_some() {
        return Err(bad());
    }
    Ok(u.trim().trim_end_matches('/').to_string())
}

// ------------------------------------------------------------------------------------------------
// HTTP

/// A small admin API client: one HTTP/1.1 connection per call (plain or rustls).
pub struct Client {
    url: String,
    token: String,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// A client for `target`.
    pub fn new(target: &Target) -> Result<Client, CliError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError::failure(format!("cannot start the runtime: {e}")))?;
        Ok(Client {
            url: target.url.clone(),
            token: target.token.clone(),
            rt,
        })
    }

    /// Calls the API; on a non-2xx answer returns the server's message as the error.
    pub fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, CliError> {
        let (status, v) = self
            .rt
            .block_on(send(&self.url, &self.token, method, path, body))?;
        if status.is_success() {
            return Ok(v);
        }
        let msg = v["message"].as_str().unwrap_or("no message").to_string();
        let code = v["error"].as_str().unwrap_or("error");
        Err(CliError::failure(format!(
            "{} ({} {code}): {msg}",
            self.url,
            status.as_u16()
        )))
    }
}

async fn send(
    base: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(StatusCode, serde_json::Value), CliError> {
    let full: Uri = format!("{base}{path}")
        .parse()
        .map_err(|_| CliError::usage(format!("bad URL {base}{path}")))?;
    let https = full.scheme_str() == Some("https");
    let host = full
        .host()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = full.port_u16().unwrap_or(if https { 443 } else { 80 });
    let unreachable = |e: &dyn std::fmt::Display| {
        CliError::failure(format!("cannot reach the admin API at {base}: {e}"))
    };
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| unreachable(&"connection timed out"))?
    .map_err(|e| unreachable(&e))?;
    let authority = full
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let mut req = Request::builder()
        .method(method)
        .uri(full.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header(header::HOST, authority)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::ACCEPT, "application/json")
        .header(
            header::USER_AGENT,
            concat!("tokengate-cli/", env!("CARGO_PKG_VERSION")),
        );
    if !bytes.is_empty() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(bytes))
        .map_err(|e| CliError::usage(format!("bad request: {e}")))?;
    let resp = if https {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config()?));
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|_| CliError::usage(format!("`{host}` is not a valid TLS server name")))?;
        let tls = connector
            .connect(name, stream)
            .await
            .map_err(|e| unreachable(&e))?;
        exchange(TokioIo::new(tls), req).await
    } else {
        exchange(TokioIo::new(stream), req).await
    }
    .map_err(|e| unreachable(&e))?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| unreachable(&e))?
        .to_bytes();
    let v = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    Ok((status, v))
}

async fn exchange<I>(
    io: I,
    req: Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await
}

/// rustls client config trusting `TOKENGATE_CA_FILE`, else `SSL_CERT_FILE`, else the system bundle.
fn tls_config() -> Result<rustls::ClientConfig, CliError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let file = std::env::var_os(ENV_CA_FILE)
        .or_else(|| std::env::var_os("SSL_CERT_FILE"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&file).map_err(|e| {
        CliError::usage(format!(
            "cannot read CA certificates from {} ({ENV_CA_FILE}): {e}",
            file.display()
        ))
    })?;
    for c in certs.flatten() {
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err(CliError::usage(format!(
            "no CA certificates in {}",
            file.display()
        )));
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| CliError::failure(format!("TLS setup failed: {e}")))
}

// ------------------------------------------------------------------------------------------------
// login, logout, whoami

/// Reads a token from `TOKENGATE_TOKEN`, else the first line of stdin (echo off on a terminal).
fn read_token() -> Result<String, CliError> {
    if let Some(t) = std::env::var(ENV_TOKEN)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
    {
        return Ok(t);
    }
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprint!("Paste the token and press Enter (it is not shown): ");
        let _ = std::io::stderr().flush();
        echo(false);
    }
    let mut line = String::new();
    let r = std::io::stdin().lock().read_line(&mut line);
    if tty {
        echo(true);
        eprintln!();
    }
    r.map_err(|e| CliError::failure(format!("cannot read stdin: {e}")))?;
    let t = line.trim().to_string();
    if t.is_empty() {
        return Err(CliError::usage(format!(
            "no token: pipe it on stdin (e.g. `pbpaste | tokengate login`) or set {ENV_TOKEN}; it is never read from the command line"
        )));
    }
    Ok(t)
}

/// Best effort: turn terminal echo off/on with `stty` (no extra dependency for a prompt).
fn echo(on: bool) {
    let _ = std::process::Command::new("stty")
        .arg(if on { "echo" } else { "-echo" })
        .stdin(std::process::Stdio::inherit())
        .status();
}

/// The credentials file, the profiles in it, and the profile `--profile` names (else the default).
fn profile_file(cli: &Cli) -> Result<(PathBuf, BTreeMap<String, Profile>, String), CliError> {
    let path = credentials_path()?;
    let profiles = load_profiles(&path)?;
    let name = cli
        .profile
        .clone()
        .unwrap_or_else(|| DEFAULT_PROFILE.to_string());
    Ok((path, profiles, name))
}

/// `tokengate login [--url URL] [--profile NAME]`.
pub fn login(cli: &Cli) -> Result<(), CliError> {
    let (path, mut profiles, name) = profile_file(cli)?;
    super::check_name(
        &name,
        "._-",
        "profile names are 1-64 letters, digits, `.`, `_`, `-`",
    )?;
    let url = match (&cli.url, profiles.get(&name)) {
        (Some(u), _) => normalize_url(u)?,
        (None, Some(p)) => p.url.clone(),
        (None, None) => DEFAULT_URL.to_string(),
    };
    let token = read_token()?;
    crate::token::parse(&token)
        .map_err(|e| CliError::usage(format!("this is not a tokengate token: {e}")))?;
    let target = Target {
        url: url.clone(),
        token: token.clone(),
        profile: Some(name.clone()),
    };
    let me = Client::new(&target)?.call(Method::GET, "/v1/whoami", None)?;
    profiles.insert(
        name.clone(),
        Profile {
            url: url.clone(),
            token,
        },
    );
    save_profiles(&path, &profiles)?;
    println!(
        "Logged in to {url} as {} ({}), account {}, access {}.",
        me["name"].as_str().unwrap_or("?"),
        me["prefix"].as_str().unwrap_or("?"),
        me["account"].as_str().unwrap_or("?"),
        me["access"].as_str().unwrap_or("?"),
    );
    println!(
        "Saved as profile `{name}` in {} (mode 0600).",
        path.display()
    );
    Ok(())
}

/// `tokengate logout [--profile NAME]`: forgets a saved profile (the token stays valid; revoke it
/// with `tokengate token revoke` if it should stop working).
pub fn logout(cli: &Cli) -> Result<(), CliError> {
    let (path, mut profiles, name) = profile_file(cli)?;
    if profiles.remove(&name).is_none() {
        return Err(CliError::failure(format!(
            "no profile `{name}` in {}",
            path.display()
        )));
    }
    save_profiles(&path, &profiles)?;
    println!(
        "Logged out: profile `{name}` removed from {}.",
        path.display()
    );
    Ok(())
}

/// `tokengate whoami [--profile NAME] [--json]`.
pub fn whoami(cli: &Cli, json: bool) -> Result<(), CliError> {
    let path = credentials_path()?;
    let profiles = load_profiles(&path)?;
    let t = resolve(cli.url.as_deref(), cli.profile.as_deref(), &profiles, &path)?;
    let me = Client::new(&t)?.call(Method::GET, "/v1/whoami", None)?;
    if json {
        print_json(&me);
        return Ok(());
    }
    let s = |k: &str| me[k].as_str().unwrap_or("-").to_string();
    println!(
        "{} ({}) of account {}",
        s("name"),
        s("prefix"),
        s("account")
    );
    println!("  token id     {}", s("id"));
    println!(
        "  access       {}",
        if s("access") == "admin" {
            "admin (all accounts)"
        } else {
            "self (own account)"
        }
    );
    println!("  permissions  {}", join(&me["permissions"]));
    println!(
        "  expires      {}",
        me["expires_at"].as_str().unwrap_or("never")
    );
    println!(
        "  via          {} ({})",
        t.url,
        t.profile
            .as_deref()
            .map(|p| format!("profile {p}"))
            .unwrap_or_else(|| ENV_TOKEN.to_string())
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// token and account commands

/// Runs a `token` / `account` command against the admin API.
pub fn run(t: &Target, command: &Command) -> Result<(), CliError> {
    let c = Client::new(t)?;
    match command {
        Command::Account(cmd) => account(&c, cmd),
        Command::Token(cmd) => token(&c, cmd),
        _ => Err(CliError::usage(
            "only `token` and `account` commands run remotely",
        )),
    }
}

fn account(c: &Client, cmd: &AccountCmd) -> Result<(), CliError> {
    match cmd {
        AccountCmd::ResetMfa { .. } => {
            return Err(CliError::usage(
                "`account reset-mfa` runs on the local store only (use --config, not --url)",
            ));
        }
        AccountCmd::Create { name, email, json } => {
            let v = c.call(
                Method::POST,
                "/v1/accounts",
                Some(serde_json::json!({"name": name, "email": email})),
            )?;
            if *json {
                print_json(&v);
            } else {
                println!(
                    "created account {} ({})",
                    str_of(&v, "name"),
                    str_of(&v, "id")
                );
            }
        }
        AccountCmd::List { json } => {
            let v = c.call(Method::GET, "/v1/accounts", None)?;
            if *json {
                print_json(&v["accounts"]);
            } else {
                let list = v["accounts"].as_array().cloned().unwrap_or_default();
                print::account_table(&list);
            }
        }
        AccountCmd::Disable { name } => {
            c.call(
                Method::POST,
                &format!("/v1/accounts/{}/disable", enc(name)),
                None,
            )?;
            println!("disabled account {name}: its tokens are rejected from now on");
        }
    }
    Ok(())
}

fn token(c: &Client, cmd: &TokenCmd) -> Result<(), CliError> {
    match cmd {
        TokenCmd::Create(a) => {
            let mut scopes = serde_json::Map::new();
            for s in &a.scope {
                let (k, v) = parse_scope(s).map_err(CliError::usage)?;
                scopes.insert(k, v.into());
            }
            let body = serde_json::json!({
                "account": a.account,
                "name": a.name,
                "role": a.role,
                "permissions": a.permission,
                "expires": a.expires,
                "scopes": scopes,
                "allowed_cidrs": a.allow_ip,
                "rate": a.rate,
            });
            let v = c.call(Method::POST, "/v1/tokens", Some(body))?;
            print::new_token(&v, a.json, "created");
        }
        TokenCmd::List {
            account,
            stale,
            expiring,
            all,
            json,
        } => {
            let mut q = vec![];
            for (k, v) in [
                ("account", account),
                ("stale", stale),
                ("expiring", expiring),
            ] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", enc(v)));
                }
            }
            if *all {
                q.push("all=true".into());
            }
            let path = if q.is_empty() {
                "/v1/tokens".to_string()
            } else {
                format!("/v1/tokens?{}", q.join("&"))
            };
            let v = c.call(Method::GET, &path, None)?;
            let list = v["tokens"].as_array().cloned().unwrap_or_default();
            if *json {
                print_json(&serde_json::Value::Array(list));
            } else {
                print::token_table(&list);
            }
        }
        TokenCmd::Show { id, json } => {
            let v = c.call(Method::GET, &format!("/v1/tokens/{}", enc(id)), None)?;
            if *json {
                print_json(&v);
            } else {
                print::token_detail(&v);
            }
        }
        TokenCmd::Revoke { id, reason } => {
            let v = c.call(
                Method::POST,
                &format!("/v1/tokens/{}/revoke", enc(id)),
                Some(serde_json::json!({"reason": reason})),
            )?;
            println!(
                "revoked {} ({}, {})",
                str_of(&v, "id"),
                str_of(&v, "prefix"),
                str_of(&v, "name")
            );
        }
        TokenCmd::Rotate {
            id,
            grace,
            expires,
            json,
        } => {
            let mut body = serde_json::json!({"grace": grace});
            if let Some(e) = expires {
                body["expires"] = e.as_str().into();
            }
            let v = c.call(
                Method::POST,
                &format!("/v1/tokens/{}/rotate", enc(id)),
                Some(body),
            )?;
            print::new_token(&v, *json, "rotated: new");
            print::rotated(
                &str_of(&v, "rotated_from"),
                v["grace_seconds"].as_u64().unwrap_or(0),
            );
        }
        TokenCmd::Identify {
            revoke,
            reason,
            json,
        } => {
            let line = super::read_identify_token()?;
            let raw = line.as_str();
            let v = c.call(
                Method::POST,
                "/v1/tokens/identify",
                Some(serde_json::json!({"token": raw, "revoke": revoke, "reason": reason})),
            )?;
            if *json {
                print_json(&v);
            } else {
                print::token_detail(&v);
                if *revoke {
                    println!("revoked: the gateway rejects it from now on");
                }
            }
        }
    }
    Ok(())
}

/// Percent-encodes a path segment or query value.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profiles() -> BTreeMap<String, Profile> {
        BTreeMap::from([
            (
                "default".to_string(),
                Profile {
                    url: "http://a:9090".into(),
                    token: "tg_a".into(),
                },
            ),
            (
                "staging".to_string(),
                Profile {
                    url: "https://b:9090".into(),
                    token: "tg_b".into(),
                },
            ),
        ])
    }

    #[test]
    fn saved_tokens_only_go_to_their_own_url() {
        let p = profiles();
        let path = Path::new("/x/credentials");
        // Runs without TOKENGATE_TOKEN in the test environment.
        if std::env::var_os(ENV_TOKEN).is_some() {
            return;
        }
        let t = resolve(None, None, &p, path).unwrap();
        assert_eq!(
            (t.url.as_str(), t.token.as_str()),
            ("http://a:9090", "tg_a")
        );
        let t = resolve(None, Some("staging"), &p, path).unwrap();
        assert_eq!(t.token, "tg_b");
        let t = resolve(Some("https://b:9090/"), None, &p, path).unwrap();
        assert_eq!(
            (t.token.as_str(), t.profile.as_deref()),
            ("tg_b", Some("staging")),
            "matched by URL"
        );
        let e = resolve(Some("http://evil:9090"), None, &p, path).unwrap_err();
        assert!(
            e.message.contains("no token for http://evil:9090"),
            "{}",
            e.message
        );
        assert!(resolve(Some("http://evil:9090"), Some("default"), &p, path).is_err());
        assert!(resolve(None, Some("nope"), &p, path).is_err());
    }

    #[test]
    fn credentials_file_round_trip_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokengate").join("credentials");
        save_profiles(&path, &profiles()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("[default]") && text.contains("[staging]"),
            "{text}"
        );
        assert_eq!(load_profiles(&path).unwrap(), profiles());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            assert_eq!(
                std::fs::metadata(path.parent().unwrap())
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777,
                0o700
            );
        }
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            normalize_url("http://127.0.0.1:9090/").unwrap(),
            "http://127.0.0.1:9090"
        );
        assert!(normalize_url("ftp://x").is_err());
        assert!(normalize_url("127.0.0.1:9090").is_err());
        assert!(normalize_url("http://x/?a=1").is_err());
        assert_eq!(enc("a b@c/d"), "a%20b%40c%2Fd");
    }
}
