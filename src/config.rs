//! Configuration (SPEC §9): raw serde structs → `validate()` → the [`Config`] the program uses.
//!
//! Every default is a named `DEFAULT_*` constant and is listed in `docs/configuration.md`.
//! Unknown keys are rejected (serde `deny_unknown_fields`), and the error names the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::audit::OnFailure;
use crate::authz::{self, Rule, RuleTable};

/// Public listener address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Admin listener address: loopback only, by default.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Realm in `WWW-Authenticate` challenges.
pub const DEFAULT_REALM: &str = "tokengate";
/// Prefix on which the gateway answers itself.
pub const DEFAULT_RESERVED_PREFIX: &str = "/_tokengate/";
/// Methods accepted on the public listener. TRACE and CONNECT are never accepted.
pub const DEFAULT_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
/// Maximum concurrent connections on the public listener.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Maximum concurrent connections from one client IP.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 512;
/// Time a client has to send the complete request head.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to finish the TLS handshake.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause allowed between two chunks of a request or response body.
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for a whole request, from its head until the upstream's response head.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Time the upstream has to answer with a response head.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Maximum total size of the request header fields (names + values), answered with 431.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Maximum length of the request target, answered with 414.
pub const DEFAULT_MAX_URI_BYTES: usize = 8 * 1024;
/// Maximum request body size, counted while streaming, answered with 413.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// HTTP/2 concurrent streams per connection.
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// How long a connection with no request in flight (an HTTP/2 connection with no stream) stays open.
pub const DEFAULT_H2_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// How long SIGTERM waits for in-flight requests.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Idle timeout of a web UI session.
pub const DEFAULT_SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// SQLite file name, relative to the config file.
pub const DEFAULT_STORE_PATH: &str = "tokengate.db";
/// SQLite busy timeout on the request path.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_millis(250);
/// How often other processes' changes (revocations) are picked up from the store.
pub const DEFAULT_CHANGE_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Connections in the PostgreSQL pool (`store.url`).
pub const DEFAULT_STORE_POOL_SIZE: usize = 16;
/// Deadline for one PostgreSQL store call (pool wait, connect, queries).
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for one Redis rate-limit check before the in-process fallback answers.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(100);
/// Gateway replicas sharing the per-token limits; while Redis is unreachable each one falls
/// back to limit/`replicas` in process (see docs/scaling.md).
pub const DEFAULT_REPLICAS: u32 = 1;
/// Token prefix.
pub const DEFAULT_TOKEN_PREFIX: &str = "tg";
/// Active tokens per account.
pub const DEFAULT_MAX_ACTIVE_PER_ACCOUNT: u32 = 5;
/// Expiry presets offered.
pub const DEFAULT_ALLOWED_EXPIRY: &[&str] = &["7d", "30d", "90d", "180d", "365d", "never"];
/// Expiry used when `token create` gets no `--expires`.
pub const DEFAULT_EXPIRY: &str = "90d";
/// Days before expiry at which `Token-Expires-At` is sent.
pub const DEFAULT_EXPIRY_WARNING_DAYS: u32 = 14;
/// Grace period of the old token after a rotation.
pub const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(24 * 3600);
/// How often last-used data is written to the store.
pub const DEFAULT_LAST_USED_FLUSH_INTERVAL: Duration = Duration::from_secs(10);
/// Audit log file, relative to the config file.
pub const DEFAULT_AUDIT_PATH: &str = "audit.log";
/// Audit records that may wait for the writer.
pub const DEFAULT_AUDIT_QUEUE: usize = 65_536;
/// Per-token requests per second.
pub const DEFAULT_REQUESTS_PER_SECOND: f64 = 50.0;
/// Per-token burst.
pub const DEFAULT_BURST: u32 = 100;
/// Failed authentications per client IP per minute before 429.
pub const DEFAULT_FAILED_AUTH_PER_MINUTE: u32 = 20;
/// Client IPs tracked by the failed-auth limiter at most.
pub const DEFAULT_FAILED_AUTH_MAX_CLIENTS: usize = 100_000;

/// Errors loading or validating a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File that failed.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// TOML syntax error or unknown/mistyped key.
    #[error("{path}: {message}")]
    Parse {
        /// File that failed.
        path: PathBuf,
        /// Parser message, naming the key and line.
        message: String,
    },
    /// A value is not acceptable.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// File that failed.
        path: PathBuf,
        /// Dotted key path.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
}

// ---------------------------------------------------------------- raw stage

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    server: RawServer,
    admin: RawAdmin,
    store: RawStore,
    tokens: RawTokens,
    audit: RawAudit,
    rate_limit: RawRateLimit,
    roles: BTreeMap<String, RawRole>,
    routes: Vec<RawRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: Option<String>,
    tls: Option<RawTls>,
    realm: Option<String>,
    trusted_proxies: Vec<String>,
    reserved_prefix: Option<String>,
    methods: Option<Vec<String>>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    header_read_timeout: Option<String>,
    tls_handshake_timeout: Option<String>,
    body_idle_timeout: Option<String>,
    request_timeout: Option<String>,
    upstream_timeout: Option<String>,
    max_header_bytes: Option<usize>,
    max_uri_bytes: Option<usize>,
    max_body_bytes: Option<u64>,
    h2_max_concurrent_streams: Option<u32>,
    h2_idle_timeout: Option<String>,
    shutdown_grace: Option<String>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    listen: Option<String>,
    tls: Option<RawTls>,
    session_idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    path: Option<PathBuf>,
    url: Option<String>,
    ca: Option<PathBuf>,
    pool_size: Option<usize>,
    timeout: Option<String>,
    busy_timeout: Option<String>,
    change_poll_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTokens {
    prefix: Option<String>,
    max_active_per_account: Option<u32>,
    allowed_expiry: Option<Vec<String>>,
    default_expiry: Option<String>,
    expiry_warning_days: Option<u32>,
    max_lifetime_days: Option<u32>,
    rotation_grace: Option<String>,
    last_used_flush_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAudit {
    path: Option<String>,
    on_failure: Option<OnFailure>,
    max_bytes: Option<u64>,
    queue: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRateLimit {
    requests_per_second: Option<f64>,
    burst: Option<u32>,
    failed_auth_per_minute: Option<u32>,
    failed_auth_max_clients: Option<usize>,
    redis: Option<String>,
    replicas: Option<u32>,
    redis_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
struct RawRole {
    permissions: Vec<String>,
    rate_limit: Option<RawRate>,
    shadow: bool,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawRate {
    requests_per_second: f64,
    burst: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    #[serde(default = "default_route_prefix")]
    prefix: String,
    upstream: String,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    forward_authorization: bool,
    #[serde(default)]
    websocket: bool,
    #[serde(default)]
    allow_non_ascii: bool,
    #[serde(default)]
    pass_host: bool,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    #[serde(default = "default_true")]
    case_sensitive: bool,
    #[serde(default)]
    trailing_slash: Option<String>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

fn default_true() -> bool {
    true
}

fn default_route_prefix() -> String {
    "/".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    methods: Vec<String>,
    path: String,
    #[serde(default)]
    permission: Option<String>,
    #[serde(default)]
    public: bool,
    #[serde(default)]
    shadow: bool,
    #[serde(default)]
    host: Option<String>,
}

// ---------------------------------------------------------------- validated stage

/// TLS certificate and key files (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Public listener.
    pub listen: SocketAddr,
    /// TLS for the public listener.
    pub tls: Option<TlsFiles>,
    /// Realm in challenges.
    pub realm: String,
    /// Peers allowed to set `X-Forwarded-For`.
    pub trusted_proxies: Vec<IpNet>,
    /// Prefix answered by the gateway itself (starts and ends with `/`).
    pub reserved_prefix: String,
    /// Methods accepted.
    pub methods: Vec<String>,
    /// Maximum concurrent connections.
    pub max_connections: usize,
    /// Maximum concurrent connections per client IP.
    pub max_connections_per_ip: usize,
    /// Header read timeout.
    pub header_read_timeout: Duration,
    /// TLS handshake timeout.
    pub tls_handshake_timeout: Duration,
    /// Body idle timeout.
    pub body_idle_timeout: Duration,
    /// Whole-request deadline.
    pub request_timeout: Duration,
    /// Default upstream timeout.
    pub upstream_timeout: Duration,
    /// Maximum header bytes (431).
    pub max_header_bytes: usize,
    /// Maximum URI length (414).
    pub max_uri_bytes: usize,
    /// Maximum body bytes (413).
    pub max_body_bytes: u64,
    /// HTTP/2 max concurrent streams.
    pub h2_max_concurrent_streams: u32,
    /// A connection with no request in flight (HTTP/2: no open stream) for this long is closed
    /// gracefully (GOAWAY).
    pub h2_idle_timeout: Duration,
    /// Drain deadline on SIGTERM.
    pub shutdown_grace: Duration,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Admin listener.
    pub listen: SocketAddr,
    /// TLS for the admin listener.
    pub tls: Option<TlsFiles>,
    /// Web UI session idle timeout.
    pub session_idle_timeout: Duration,
}

/// `[store]`.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// SQLite file (absolute); unused when `url` is set.
    pub path: PathBuf,
    /// PostgreSQL URL (`postgres://...`), resolved from `env:NAME` if written so; None = SQLite.
    pub url: Option<String>,
    /// CA certificates (PEM) for TLS to PostgreSQL; None = the system's roots.
    pub ca: Option<PathBuf>,
    /// PostgreSQL pool size.
    pub pool_size: usize,
    /// Deadline for one PostgreSQL store call.
    pub timeout: Duration,
    /// Busy timeout.
    pub busy_timeout: Duration,
    /// Cross-process change polling interval.
    pub change_poll_interval: Duration,
}

/// An expiry preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Expires after this many days.
    Days(u32),
    /// Never expires.
    Never,
}

impl Expiry {
    /// Parses `7d`, `30d`, ..., `never`.
    pub fn parse(s: &str) -> Result<Expiry, String> {
        if s == "never" {
            return Ok(Expiry::Never);
        }
        let days = s
            .strip_suffix('d')
            .and_then(|d| d.parse::<u32>().ok())
            .filter(|d| *d > 0)
            .ok_or_else(|| {
                format!("`{s}` is not an expiry: use a number of days like `30d`, or `never`")
            })?;
        Ok(Expiry::Days(days))
    }
}

impl std::fmt::Display for Expiry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expiry::Days(d) => write!(f, "{d}d"),
            Expiry::Never => f.write_str("never"),
        }
    }
}

/// `[tokens]`.
#[derive(Debug, Clone)]
pub struct TokensConfig {
    /// Token prefix.
    pub prefix: String,
    /// Active tokens per account.
    pub max_active_per_account: u32,
    /// Allowed expiry presets.
    pub allowed_expiry: Vec<Expiry>,
    /// Expiry used when none is given.
    pub default_expiry: Expiry,
    /// Days before expiry when `Token-Expires-At` is sent.
    pub expiry_warning_days: u32,
    /// Policy maximum lifetime.
    pub max_lifetime_days: Option<u32>,
    /// Default rotation grace.
    pub rotation_grace: Duration,
    /// last_used flush interval.
    pub last_used_flush_interval: Duration,
}

/// `[audit]`.
#[derive(Debug, Clone)]
pub struct AuditSection {
    /// File, or None for stdout.
    pub path: Option<PathBuf>,
    /// What to do when the log cannot be written.
    pub on_failure: OnFailure,
    /// Size-based rotation.
    pub max_bytes: Option<u64>,
    /// Queue bound.
    pub queue: usize,
}

/// A rate: requests per second and burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained rate.
    pub requests_per_second: f64,
    /// Burst size.
    pub burst: u32,
}

/// `[rate_limit]`.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// Global default per-token rate.
    pub default: Rate,
    /// Failed authentications per minute per client IP.
    pub failed_auth_per_minute: u32,
    /// Maximum client IPs tracked by the failed-auth limiter.
    pub failed_auth_max_clients: usize,
    /// Redis URL for limits exact across replicas (`env:NAME` resolved); None = per process.
    pub redis: Option<String>,
    /// Replicas sharing the limits: the in-process fallback allows limit/`replicas` each.
    pub replicas: u32,
    /// Deadline for one Redis check.
    pub redis_timeout: Duration,
}

/// `[roles.NAME]`.
#[derive(Debug, Clone)]
pub struct RoleConfig {
    /// Permissions the role expands to.
    pub permissions: Vec<String>,
    /// Role rate limit.
    pub rate_limit: Option<Rate>,
    /// When true, tokens of this role are also evaluated against this permission list and the
    /// result is logged as `shadow_decision` (the stored list stays what is enforced).
    pub shadow: bool,
}

/// `[[routes]]`.
#[derive(Debug)]
pub struct RouteConfig {
    /// Route name (audit `upstream` field uses it).
    pub name: String,
    /// Path prefix (segment boundary respected).
    pub prefix: String,
    /// Upstream authority and scheme.
    pub upstream: http::uri::Authority,
    /// `http` (TLS to upstreams is not supported yet).
    pub upstream_scheme: http::uri::Scheme,
    /// Upstream URL as configured, for logs.
    pub upstream_url: String,
    /// Upstream response-head timeout.
    pub timeout: Duration,
    /// Forward the client's `Authorization` header.
    pub forward_authorization: bool,
    /// Allow WebSocket upgrades.
    pub websocket: bool,
    /// Allow non-ASCII paths.
    pub allow_non_ascii: bool,
    /// Compiled rules.
    pub rules: RuleTable,
    /// Audit `rule` value of each rule (`route:METHODS path`), by rule index; built at load so
    /// the request path does not format it.
    pub rule_ids: Vec<String>,
    /// Send the client's Host to the upstream (false: the upstream's own authority, like
    /// nginx's `$proxy_host`; the client's Host travels as `X-Forwarded-Host` either way).
    pub pass_host: bool,
    /// Host names this route answers for (`api.example.com`, `*.example.com`), lower-case;
    /// empty = any. Others are refused 421 `host_not_allowed`.
    pub allowed_hosts: Vec<String>,
    /// Match rules case-sensitively (false: path and rules are compared lower-cased).
    pub case_sensitive: bool,
    /// How a trailing `/` counts when matching rules.
    pub trailing_slash: TrailingSlash,
    /// Rule tables for host-specific rules (`host = ...`): each holds that host's rules plus
    /// every rule without `host`, in file order. `rules`/`rule_ids` hold the rules without `host`.
    pub host_rules: Vec<HostRules>,
}

/// `trailing_slash` of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrailingSlash {
    /// `/admin/` and `/admin` are different paths (the default).
    Strict,
    /// One trailing `/` is ignored when matching rules (`/admin/` is judged as `/admin`).
    Ignore,
}

/// The rules that apply to requests for one host (or host pattern).
#[derive(Debug)]
pub struct HostRules {
    /// Exact lower-case name, or `*.example.com`.
    pub host: String,
    /// Compiled rules.
    pub rules: RuleTable,
    /// Audit `rule` values, by rule index in `rules`.
    pub rule_ids: Vec<String>,
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    /// File it came from (None for built-in configs, e.g. tests).
    pub source: Option<PathBuf>,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[admin]`.
    pub admin: AdminConfig,
    /// `[store]`.
    pub store: StoreConfig,
    /// `[tokens]`.
    pub tokens: TokensConfig,
    /// `[audit]`.
    pub audit: AuditSection,
    /// `[rate_limit]`.
    pub rate_limit: RateLimitConfig,
    /// Roles (built-in defaults merged with the file's).
    pub roles: BTreeMap<String, RoleConfig>,
    /// Routes, in file order.
    pub routes: Vec<RouteConfig>,
}

/// The built-in roles (SPEC §3), used unless the file redefines a role of the same name.
pub fn default_roles() -> BTreeMap<String, RoleConfig> {
    let role = |perms: &[&str]| RoleConfig {
        permissions: perms.iter().map(|p| p.to_string()).collect(),
        rate_limit: None,
        shadow: false,
    };
    BTreeMap::from([
        ("viewer".to_string(), role(&["apps:read", "logs:read"])),
        (
            "ops".to_string(),
            role(&[
                "apps:read",
                "logs:read",
                "apps:restart",
                "apps:exec",
                "env:read",
            ]),
        ),
        (
            "deployer".to_string(),
            role(&[
                "apps:read",
                "logs:read",
                "apps:deploy",
                "apps:restart",
                "env:read",
                "env:write",
            ]),
        ),
        ("cicd".to_string(), role(&["apps:read", "apps:deploy"])),
        ("admin".to_string(), role(&["*"])),
    ])
}

/// Parses a duration like `250ms`, `10s`, `5m`, `24h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("`{s}` is not a duration: use a number and a unit, like `10s`, `500ms`, `24h`")
    })?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        _ => {
            return Err(format!(
                "`{s}` has an unknown unit `{unit}`: use ms, s, m, h or d"
            ));
        }
    };
    Ok(d)
}

struct Ctx<'a> {
    path: &'a Path,
}

impl Ctx<'_> {
    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            message: message.into(),
        }
    }
    fn duration(
        &self,
        key: &str,
        v: &Option<String>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => parse_duration(s).map_err(|m| self.invalid(key, m)),
        }
    }
    fn addr(
        &self,
        key: &str,
        v: &Option<String>,
        default: &str,
    ) -> Result<SocketAddr, ConfigError> {
        let s = v.as_deref().unwrap_or(default);
        s.parse().map_err(|_| {
            self.invalid(
                key,
                format!("`{s}` is not an address: use IP:PORT, like `127.0.0.1:8080`"),
            )
        })
    }
    fn tls(&self, base: &Path, raw: &Option<RawTls>) -> Option<TlsFiles> {
        raw.as_ref().map(|t| TlsFiles {
            cert: base.join(&t.cert),
            key: base.join(&t.key),
        })
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Config::from_toml(&text, path)?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Parses and validates TOML text; relative paths resolve against `path`'s directory.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::path::absolute(&base).unwrap_or(base);
        validate(raw, path, &base)
    }
}

fn validate(raw: RawConfig, path: &Path, base: &Path) -> Result<Config, ConfigError> {
    let cx = Ctx { path };

    // [server]
    let s = &raw.server;
    let reserved_prefix = s
        .reserved_prefix
        .clone()
        .unwrap_or_else(|| DEFAULT_RESERVED_PREFIX.to_string());
    if !(reserved_prefix.starts_with('/')
        && reserved_prefix.ends_with('/')
        && reserved_prefix.len() > 2)
    {
        return Err(cx.invalid(
            "server.reserved_prefix",
            "must start and end with `/` and name a segment, like `/_tokengate/`",
        ));
    }
    let mut trusted_proxies = Vec::new();
    for p in &s.trusted_proxies {
        let net = p
            .parse::<IpNet>()
            .or_else(|_| p.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| {
                cx.invalid(
                    "server.trusted_proxies",
                    format!("`{p}` is not a CIDR like `10.0.0.0/8`"),
                )
            })?;
        trusted_proxies.push(net);
    }
    let methods: Vec<String> = match &s.methods {
        None => DEFAULT_METHODS.iter().map(|m| m.to_string()).collect(),
        Some(m) => m.clone(),
    };
    for m in &methods {
        if m == "TRACE" || m == "CONNECT" {
            return Err(cx.invalid(
                "server.methods",
                format!("{m} is never allowed through the gateway"),
            ));
        }
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(cx.invalid(
                "server.methods",
                format!("`{m}` is not an upper-case method name"),
            ));
        }
    }
    let max_header_bytes = s.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
    if max_header_bytes < 1024 {
        return Err(cx.invalid("server.max_header_bytes", "must be at least 1024"));
    }
    let server = ServerConfig {
        listen: cx.addr("server.listen", &s.listen, DEFAULT_LISTEN)?,
        tls: cx.tls(base, &s.tls),
        realm: s.realm.clone().unwrap_or_else(|| DEFAULT_REALM.to_string()),
        trusted_proxies,
        reserved_prefix,
        methods,
        max_connections: s.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        max_connections_per_ip: s
            .max_connections_per_ip
            .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_IP),
        header_read_timeout: cx.duration(
            "server.header_read_timeout",
            &s.header_read_timeout,
            DEFAULT_HEADER_READ_TIMEOUT,
        )?,
        tls_handshake_timeout: cx.duration(
            "server.tls_handshake_timeout",
            &s.tls_handshake_timeout,
            DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        )?,
        body_idle_timeout: cx.duration(
            "server.body_idle_timeout",
            &s.body_idle_timeout,
            DEFAULT_BODY_IDLE_TIMEOUT,
        )?,
        request_timeout: cx.duration(
            "server.request_timeout",
            &s.request_timeout,
            DEFAULT_REQUEST_TIMEOUT,
        )?,
        upstream_timeout: cx.duration(
            "server.upstream_timeout",
            &s.upstream_timeout,
            DEFAULT_UPSTREAM_TIMEOUT,
        )?,
        max_header_bytes,
        max_uri_bytes: s.max_uri_bytes.unwrap_or(DEFAULT_MAX_URI_BYTES),
        max_body_bytes: s.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
        h2_max_concurrent_streams: s
            .h2_max_concurrent_streams
            .unwrap_or(DEFAULT_H2_MAX_CONCURRENT_STREAMS),
        h2_idle_timeout: cx.duration(
            "server.h2_idle_timeout",
            &s.h2_idle_timeout,
            DEFAULT_H2_IDLE_TIMEOUT,
        )?,
        shutdown_grace: cx.duration(
            "server.shutdown_grace",
            &s.shutdown_grace,
            DEFAULT_SHUTDOWN_GRACE,
        )?,
    };
    if server.realm.contains('"') || server.realm.contains('\\') {
        return Err(cx.invalid("server.realm", "must not contain `\"` or `\\`"));
    }

    // [admin]
    let admin = AdminConfig {
        listen: cx.addr("admin.listen", &raw.admin.listen, DEFAULT_ADMIN_LISTEN)?,
        tls: cx.tls(base, &raw.admin.tls),
        session_idle_timeout: cx.duration(
            "admin.session_idle_timeout",
            &raw.admin.session_idle_timeout,
            DEFAULT_SESSION_IDLE_TIMEOUT,
        )?,
    };
    if admin.listen == server.listen && admin.listen.port() != 0 {
        return Err(cx.invalid("admin.listen", "must differ from server.listen"));
    }

    // [store]
    let url = match &raw.store.url {
        None => None,
        Some(u) => {
            if raw.store.path.is_some() {
                return Err(cx.invalid(
                    "store.url",
                    "set either `path` (SQLite) or `url` (PostgreSQL), not both",
                ));
            }
            let u = resolve_secret(&cx, "store.url", u)?;
            crate::store::check_postgres_url(&u).map_err(|m| cx.invalid("store.url", m))?;
            Some(u)
        }
    };
    if url.is_none() && (raw.store.ca.is_some() || raw.store.pool_size.is_some()) {
        return Err(cx.invalid(
            "store",
            "`ca` and `pool_size` apply to a PostgreSQL `url` only",
        ));
    }
    let pool_size = raw.store.pool_size.unwrap_or(DEFAULT_STORE_POOL_SIZE);
    if pool_size == 0 {
        return Err(cx.invalid("store.pool_size", "must be at least 1"));
    }
    let store = StoreConfig {
        path: base.join(
            raw.store
                .path
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE_PATH)),
        ),
        url,
        ca: raw.store.ca.as_ref().map(|c| base.join(c)),
        pool_size,
        timeout: cx.duration("store.timeout", &raw.store.timeout, DEFAULT_STORE_TIMEOUT)?,
        busy_timeout: cx.duration(
            "store.busy_timeout",
            &raw.store.busy_timeout,
            DEFAULT_BUSY_TIMEOUT,
        )?,
        change_poll_interval: cx.duration(
            "store.change_poll_interval",
            &raw.store.change_poll_interval,
            DEFAULT_CHANGE_POLL_INTERVAL,
        )?,
    };

    // [tokens]
    let t = &raw.tokens;
    let prefix = t
        .prefix
        .clone()
        .unwrap_or_else(|| DEFAULT_TOKEN_PREFIX.to_string());
    if !crate::token::valid_prefix(&prefix) {
        return Err(cx.invalid(
            "tokens.prefix",
            format!("`{prefix}` must match [a-z][a-z0-9]{{1,9}}"),
        ));
    }
    let allowed_expiry = match &t.allowed_expiry {
        None => DEFAULT_ALLOWED_EXPIRY
            .iter()
            .map(|e| Expiry::parse(e).expect("valid default"))
            .collect(),
        Some(list) => list
            .iter()
            .map(|e| Expiry::parse(e).map_err(|m| cx.invalid("tokens.allowed_expiry", m)))
            .collect::<Result<Vec<_>, _>>()?,
    };
    if allowed_expiry.is_empty() {
        return Err(cx.invalid("tokens.allowed_expiry", "must list at least one preset"));
    }
    let max_lifetime_days = t.max_lifetime_days;
    let mut allowed_expiry: Vec<Expiry> = allowed_expiry;
    if let Some(max) = max_lifetime_days {
        allowed_expiry.retain(|e| matches!(e, Expiry::Days(d) if *d <= max));
        if allowed_expiry.is_empty() {
            return Err(cx.invalid(
                "tokens.max_lifetime_days",
                "forbids every preset in tokens.allowed_expiry",
            ));
        }
    }
    let default_expiry = match &t.default_expiry {
        Some(e) => Expiry::parse(e).map_err(|m| cx.invalid("tokens.default_expiry", m))?,
        None => {
            let d = Expiry::parse(DEFAULT_EXPIRY).expect("valid default");
            if allowed_expiry.contains(&d) {
                d
            } else {
                allowed_expiry[0]
            }
        }
    };
    if !allowed_expiry.contains(&default_expiry) {
        return Err(cx.invalid(
            "tokens.default_expiry",
            format!("`{default_expiry}` is not in tokens.allowed_expiry (after max_lifetime_days)"),
        ));
    }
    let tokens = TokensConfig {
        prefix,
        max_active_per_account: t
            .max_active_per_account
            .unwrap_or(DEFAULT_MAX_ACTIVE_PER_ACCOUNT),
        allowed_expiry,
        default_expiry,
        expiry_warning_days: t.expiry_warning_days.unwrap_or(DEFAULT_EXPIRY_WARNING_DAYS),
        max_lifetime_days,
        rotation_grace: cx.duration(
            "tokens.rotation_grace",
            &t.rotation_grace,
            DEFAULT_ROTATION_GRACE,
        )?,
        last_used_flush_interval: cx.duration(
            "tokens.last_used_flush_interval",
            &t.last_used_flush_interval,
            DEFAULT_LAST_USED_FLUSH_INTERVAL,
        )?,
    };
    if tokens.max_active_per_account == 0 {
        return Err(cx.invalid("tokens.max_active_per_account", "must be at least 1"));
    }

    // [audit]
    let audit_path = match raw.audit.path.as_deref() {
        Some("-") => None,
        Some(p) => Some(base.join(p)),
        None => Some(base.join(DEFAULT_AUDIT_PATH)),
    };
    let audit = AuditSection {
        path: audit_path,
        on_failure: raw.audit.on_failure.unwrap_or_default(),
        max_bytes: raw.audit.max_bytes,
        queue: raw.audit.queue.unwrap_or(DEFAULT_AUDIT_QUEUE).max(16),
    };

    // [rate_limit]
    let r = &raw.rate_limit;
    let default_rate = Rate {
        requests_per_second: r.requests_per_second.unwrap_or(DEFAULT_REQUESTS_PER_SECOND),
        burst: r.burst.unwrap_or(DEFAULT_BURST),
    };
    check_rate(&cx, "rate_limit", default_rate)?;
    let rate_limit = RateLimitConfig {
        default: default_rate,
        failed_auth_per_minute: r
            .failed_auth_per_minute
            .unwrap_or(DEFAULT_FAILED_AUTH_PER_MINUTE),
        failed_auth_max_clients: r
            .failed_auth_max_clients
            .unwrap_or(DEFAULT_FAILED_AUTH_MAX_CLIENTS),
        redis: match &r.redis {
            None => None,
            Some(u) => {
                let u = resolve_secret(&cx, "rate_limit.redis", u)?;
                if !(u.starts_with("redis://")
                    || u.starts_with("rediss://")
                    || u.starts_with("redis+unix://"))
                {
                    return Err(
                        cx.invalid("rate_limit.redis", "must be a `redis://HOST:PORT[/DB]` URL")
                    );
                }
                crate::ratelimit_redis::check_url(&u)
                    .map_err(|m| cx.invalid("rate_limit.redis", m))?;
                Some(u)
            }
        },
        replicas: r.replicas.unwrap_or(DEFAULT_REPLICAS),
        redis_timeout: cx.duration(
            "rate_limit.redis_timeout",
            &r.redis_timeout,
            DEFAULT_REDIS_TIMEOUT,
        )?,
    };
    if rate_limit.replicas == 0 {
        return Err(cx.invalid("rate_limit.replicas", "must be at least 1"));
    }
    if rate_limit.failed_auth_per_minute == 0 {
        return Err(cx.invalid("rate_limit.failed_auth_per_minute", "must be at least 1"));
    }

    // [roles]
    let mut roles = default_roles();
    for (name, role) in &raw.roles {
        let key = format!("roles.{name}");
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
            || name.is_empty()
        {
            return Err(cx.invalid(&key, "role names use a-z, 0-9, `_` and `-`"));
        }
        for p in &role.permissions {
            authz::validate_permission(p)
                .map_err(|e| cx.invalid(&format!("{key}.permissions"), e.to_string()))?;
        }
        let rate = role.rate_limit.map(|r| Rate {
            requests_per_second: r.requests_per_second,
            burst: r.burst,
        });
        if let Some(rate) = rate {
            check_rate(&cx, &format!("{key}.rate_limit"), rate)?;
        }
        roles.insert(
            name.clone(),
            RoleConfig {
                permissions: role.permissions.clone(),
                rate_limit: rate,
                shadow: role.shadow,
            },
        );
    }

    // [[routes]]
    let mut routes = Vec::new();
    for (i, r) in raw.routes.into_iter().enumerate() {
        let key = format!("routes[{i}] ({})", r.name);
        if r.name.is_empty() {
            return Err(cx.invalid(&format!("routes[{i}].name"), "must not be empty"));
        }
        if routes.iter().any(|o: &RouteConfig| o.name == r.name) {
            return Err(cx.invalid(&key, "route names must be unique"));
        }
        if !r.prefix.starts_with('/') {
            return Err(cx.invalid(&format!("{key}.prefix"), "must start with `/`"));
        }
        if routes.iter().any(|o: &RouteConfig| o.prefix == r.prefix) {
            return Err(cx.invalid(
                &format!("{key}.prefix"),
                format!("`{}` is used by another route", r.prefix),
            ));
        }
        if r.prefix.starts_with(&server.reserved_prefix)
            || server.reserved_prefix.starts_with(&r.prefix) && r.prefix != "/"
        {
            return Err(cx.invalid(&format!("{key}.prefix"), "overlaps server.reserved_prefix"));
        }
        let uri: http::Uri = r.upstream.parse().map_err(|_| {
            cx.invalid(
                &format!("{key}.upstream"),
                format!("`{}` is not a URL", r.upstream),
            )
        })?;
        let scheme = uri.scheme().cloned();
        if scheme.as_ref() != Some(&http::uri::Scheme::HTTP) {
            return Err(cx.invalid(
                &format!("{key}.upstream"),
                "must be an http:// URL (TLS to the upstream is not supported yet; run the upstream on loopback or a private network)",
            ));
        }
        if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
            return Err(cx.invalid(
                &format!("{key}.upstream"),
                "must not have a path or query: requests keep their path, like `http://127.0.0.1:5000`",
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| cx.invalid(&format!("{key}.upstream"), "needs a host"))?;
        let trailing_slash = match r.trailing_slash.as_deref() {
            None | Some("strict") => TrailingSlash::Strict,
            Some("ignore") => TrailingSlash::Ignore,
            Some(o) => {
                return Err(cx.invalid(
                    &format!("{key}.trailing_slash"),
                    format!("`{o}` is not `strict` or `ignore`"),
                ));
            }
        };
        let allowed_hosts: Vec<String> = r
            .allowed_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        for h in &allowed_hosts {
            if !crate::hygiene::host_pattern_ok(h) {
                return Err(cx.invalid(
                    &format!("{key}.allowed_hosts"),
                    format!("`{h}` is not a host name or `*.` pattern (no port)"),
                ));
            }
        }
        if r.pass_host && allowed_hosts.is_empty() {
            return Err(cx.invalid(
                &format!("{key}.pass_host"),
                "needs `allowed_hosts`: only listed host names may reach the upstream",
            ));
        }
        let mut rule_hosts: Vec<Option<String>> = Vec::new();
        for (j, rule) in r.rules.iter().enumerate() {
            let rkey = format!("{key}.rules[{j}]");
            let inside = rule.path.starts_with(&r.prefix)
                || (r.prefix.ends_with('/') && rule.path == r.prefix[..r.prefix.len() - 1]);
            if !inside {
                return Err(cx.invalid(
                    &rkey,
                    format!(
                        "path `{}` is outside the route prefix `{}`",
                        rule.path, r.prefix
                    ),
                ));
            }
            if let Some(p) = &rule.permission {
                authz::validate_permission(p)
                    .map_err(|e| cx.invalid(&format!("{rkey}.permission"), e.to_string()))?;
            }
            if !rule.public && rule.permission.is_none() {
                return Err(cx.invalid(&rkey, "needs `permission`, or `public = true`"));
            }
            for m in &rule.methods {
                if !server.methods.contains(m) {
                    return Err(cx.invalid(
                        &format!("{rkey}.methods"),
                        format!("`{m}` is not in server.methods"),
                    ));
                }
            }
            let host = rule.host.as_ref().map(|h| h.to_ascii_lowercase());
            if let Some(h) = &host {
                if !r.pass_host || !allowed_hosts.contains(h) || !crate::hygiene::host_pattern_ok(h)
                {
                    return Err(cx.invalid(
                        &format!("{rkey}.host"),
                        format!(
                            "`{h}` needs `pass_host = true` and must be listed in `allowed_hosts`"
                        ),
                    ));
                }
            }
            rule_hosts.push(host);
        }
        // Rules as matched: lower-cased for a case-insensitive route, without a trailing `/`
        // when trailing slashes are ignored; audit ids keep the path as written.
        let compiled = |want: Option<&str>| -> Result<(RuleTable, Vec<String>), ConfigError> {
            let mut rules = Vec::new();
            let mut ids = Vec::new();
            for (rule, host) in r.rules.iter().zip(&rule_hosts) {
                if host.is_some() && host.as_deref() != want {
                    continue;
                }
                // In a host's table, its own rule replaces a host-less rule for the same path
                // and methods (otherwise the two would be ambiguous).
                let overlaps = |a: &[String], b: &[String]| {
                    a.is_empty() || b.is_empty() || a.iter().any(|m| b.contains(m))
                };
                let replaced = host.is_none()
                    && want.is_some()
                    && r.rules.iter().zip(&rule_hosts).any(|(o, oh)| {
                        oh.as_deref() == want
                            && o.path == rule.path
                            && overlaps(&o.methods, &rule.methods)
                    });
                if replaced {
                    continue;
                }
                let mut path = if r.case_sensitive {
                    rule.path.clone()
                } else {
                    crate::authz::lowercase_template(&rule.path)
                };
                if trailing_slash == TrailingSlash::Ignore && path.len() > 1 && path.ends_with('/')
                {
                    path.pop();
                }
                let methods = if rule.methods.is_empty() {
                    "*".to_string()
                } else {
                    rule.methods.join(",")
                };
                ids.push(match host {
                    Some(h) => format!("{}:{} {} host={h}", r.name, methods, rule.path),
                    None => format!("{}:{} {}", r.name, methods, rule.path),
                });
                rules.push(Rule {
                    methods: rule.methods.clone(),
                    path,
                    permission: rule.permission.clone(),
                    public: rule.public,
                    shadow: rule.shadow,
                });
            }
            let table = RuleTable::new(rules)
                .map_err(|e| cx.invalid(&format!("{key}.rules"), e.to_string()))?;
            Ok((table, ids))
        };
        let (rules, rule_ids) = compiled(None)?;
        let mut host_rules = Vec::new();
        for h in rule_hosts.iter().flatten() {
            if host_rules.iter().any(|x: &HostRules| &x.host == h) {
                continue;
            }
            let (rules, rule_ids) = compiled(Some(h))?;
            host_rules.push(HostRules {
                host: h.clone(),
                rules,
                rule_ids,
            });
        }
        routes.push(RouteConfig {
            name: r.name,
            prefix: r.prefix,
            upstream: authority,
            upstream_scheme: http::uri::Scheme::HTTP,
            upstream_url: r.upstream,
            timeout: cx.duration(
                &format!("{key}.timeout"),
                &r.timeout,
                server.upstream_timeout,
            )?,
            forward_authorization: r.forward_authorization,
            websocket: r.websocket,
            allow_non_ascii: r.allow_non_ascii,
            rules,
            rule_ids,
            pass_host: r.pass_host,
            allowed_hosts,
            case_sensitive: r.case_sensitive,
            trailing_slash,
            host_rules,
        });
    }

    Ok(Config {
        source: None,
        server,
        admin,
        store,
        tokens,
        audit,
        rate_limit,
        roles,
        routes,
    })
}

/// A secret written as `env:NAME` is read from that environment variable (Kubernetes Secrets,
/// systemd credentials), so the config file itself holds no password.
fn resolve_secret(cx: &Ctx<'_>, key: &str, value: &str) -> Result<String, ConfigError> {
    match value.strip_prefix("env:") {
        None => Ok(value.to_string()),
        Some(name) => match std::env::var(name) {
            Ok(v) if !v.is_empty() => Ok(v),
            _ => Err(cx.invalid(key, format!("environment variable `{name}` is not set"))),
        },
    }
}

fn check_rate(cx: &Ctx<'_>, key: &str, rate: Rate) -> Result<(), ConfigError> {
    if !(rate.requests_per_second > 0.0 && rate.requests_per_second.is_finite()) {
        return Err(cx.invalid(
            &format!("{key}.requests_per_second"),
            "must be a positive number",
        ));
    }
    if rate.burst == 0 {
        return Err(cx.invalid(&format!("{key}.burst"), "must be at least 1"));
    }
    Ok(())
}

impl Config {
    /// The route whose prefix is the longest match for `path`, honouring segment boundaries.
    pub fn route_for(&self, path: &str) -> Option<&RouteConfig> {
        self.routes
            .iter()
            .filter(|r| {
                // A case-insensitive route claims its prefix in any case (`/X/` for `/x/`).
                if r.case_sensitive {
                    prefix_matches(&r.prefix, path)
                } else {
                    prefix_matches(&r.prefix.to_ascii_lowercase(), &path.to_ascii_lowercase())
                }
            })
            .max_by_key(|r| r.prefix.len())
    }
}

/// `/api` matches `/api` and `/api/...` but not `/apix`; `/api/` matches `/api/...`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/tokengate/tokengate.toml"))
    }

    #[test]
    fn minimal_file_yields_documented_defaults() {
        let c = load("").unwrap();
        assert_eq!(c.server.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(c.admin.listen, DEFAULT_ADMIN_LISTEN.parse().unwrap());
        assert!(c.admin.listen.ip().is_loopback());
        assert_eq!(c.server.realm, DEFAULT_REALM);
        assert!(c.server.trusted_proxies.is_empty());
        assert_eq!(c.server.reserved_prefix, DEFAULT_RESERVED_PREFIX);
        assert_eq!(c.store.path, PathBuf::from("/etc/tokengate/tokengate.db"));
        assert_eq!(c.tokens.prefix, "tg");
        assert_eq!(c.tokens.max_active_per_account, 5);
        assert_eq!(c.tokens.expiry_warning_days, 14);
        assert_eq!(c.tokens.allowed_expiry.len(), 6);
        assert_eq!(c.tokens.default_expiry, Expiry::Days(90));
        assert_eq!(c.tokens.rotation_grace, Duration::from_secs(86_400));
        assert_eq!(
            c.audit.path,
            Some(PathBuf::from("/etc/tokengate/audit.log"))
        );
        assert_eq!(c.audit.on_failure, OnFailure::Reject);
        assert_eq!(c.rate_limit.default.requests_per_second, 50.0);
        assert_eq!(c.rate_limit.default.burst, 100);
        assert_eq!(c.rate_limit.failed_auth_per_minute, 20);
        assert!(c.routes.is_empty());
        for r in ["viewer", "ops", "deployer", "cicd", "admin"] {
            assert!(c.roles.contains_key(r), "{r}");
        }
        assert_eq!(c.server.header_read_timeout, DEFAULT_HEADER_READ_TIMEOUT);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = load("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lisen"), "{e}");
        let e = load("[sever]\n").unwrap_err().to_string();
        assert!(e.contains("sever"), "{e}");
    }

    #[test]
    fn max_lifetime_forbids_never() {
        let c = load("[tokens]\nmax_lifetime_days = 90\n").unwrap();
        assert!(!c.tokens.allowed_expiry.contains(&Expiry::Never));
        assert!(!c.tokens.allowed_expiry.contains(&Expiry::Days(180)));
        assert!(c.tokens.allowed_expiry.contains(&Expiry::Days(90)));
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[server]\nlisten = \"nope\"\n", "server.listen"),
            ("[tokens]\nprefix = \"TG\"\n", "tokens.prefix"),
            (
                "[server]\nheader_read_timeout = \"10 parsecs\"\n",
                "server.header_read_timeout",
            ),
            (
                "[[routes]]\nname = \"a\"\nupstream = \"https://x\"\n",
                "upstream",
            ),
            (
                "[[routes]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\n[[routes.rules]]\npath = \"/x\"\n",
                "permission",
            ),
        ];
        for (text, key) in cases {
            let e = load(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn prefixes_respect_segments() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(!prefix_matches("/api/", "/api"));
    }
}
