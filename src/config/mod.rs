//! Configuration (SPEC §9): raw serde structs ([`raw`]) → `validate()` ([`validate`]) → the
//! [`Config`] the program uses.
//!
//! Owns: the validated section types, loading a file, and the conversions at the edge into the
//! option types the subsystems own ([`crate::store::StoreOptions`],
//! [`crate::ratelimit::redis::RedisOptions`]); the value parsers settings and commands share
//! ([`parse_duration`], [`parse_net`]); [`Rate`] is the rate limiter's type, re-used here.
//! Every default is a named `DEFAULT_*` constant and is listed in `docs/configuration.md`.
//! Unknown keys are rejected (serde `deny_unknown_fields`), and the error names the key.
//! Never imports: `cli`, `gateway`, `admin`, `server` or `app` (they import config, not the
//! other way round).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::audit::OnFailure;
use crate::authz::RuleTable;
pub use crate::ratelimit::Rate;

mod approvals;
mod oidc;
mod raw;
mod validate;

pub use approvals::{
    ApprovalPolicy, ApprovalsConfig, Approver, DEFAULT_MFA_ISSUER, DEFAULT_REQUEST_TTL,
    DEFAULT_STEP_UP_TTL, DEFAULT_WEBHOOK_MAX_ATTEMPTS, DEFAULT_WEBHOOK_RETRY_BACKOFF,
    DEFAULT_WEBHOOK_TIMEOUT, MfaConfig, NamedRule, WebhookConfig,
};
pub use oidc::{
    DEFAULT_ACCOUNT_CLAIM, DEFAULT_CLOCK_SKEW, DEFAULT_GROUPS_CLAIM, DEFAULT_OIDC_SCOPES,
    DEFAULT_SELF_ROLE, DEFAULT_SESSION_ABSOLUTE_TIMEOUT, DefaultAccess, OidcConfig, Secret,
    check_provider_url,
};

pub use raw::{
    DEFAULT_ADMIN_LISTEN, DEFAULT_ALLOWED_EXPIRY, DEFAULT_AUDIT_PATH, DEFAULT_AUDIT_QUEUE,
    DEFAULT_BODY_IDLE_TIMEOUT, DEFAULT_BURST, DEFAULT_BUSY_TIMEOUT, DEFAULT_CHANGE_POLL_INTERVAL,
    DEFAULT_EXPIRY, DEFAULT_EXPIRY_WARNING_DAYS, DEFAULT_FAILED_AUTH_MAX_CLIENTS,
    DEFAULT_FAILED_AUTH_PER_MINUTE, DEFAULT_FORWARD_AUTH_PATH, DEFAULT_H2_IDLE_TIMEOUT,
    DEFAULT_H2_MAX_CONCURRENT_STREAMS, DEFAULT_HEADER_READ_TIMEOUT,
    DEFAULT_LAST_USED_FLUSH_INTERVAL, DEFAULT_LISTEN, DEFAULT_MAX_ACTIVE_PER_ACCOUNT,
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_IP,
    DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_URI_BYTES, DEFAULT_METHODS, DEFAULT_REALM,
    DEFAULT_REDIS_TIMEOUT, DEFAULT_REPLICAS, DEFAULT_REQUEST_TIMEOUT, DEFAULT_REQUESTS_PER_SECOND,
    DEFAULT_RESERVED_PREFIX, DEFAULT_ROTATION_GRACE, DEFAULT_SESSION_IDLE_TIMEOUT,
    DEFAULT_SHUTDOWN_GRACE, DEFAULT_STORE_PATH, DEFAULT_STORE_POOL_SIZE, DEFAULT_STORE_TIMEOUT,
    DEFAULT_TLS_HANDSHAKE_TIMEOUT, DEFAULT_TOKEN_PREFIX, DEFAULT_UPSTREAM_TIMEOUT,
};

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

// ---------------------------------------------------------------- validated stage

pub use crate::tls::{TlsFiles, UpstreamConnector, UpstreamTlsOptions};

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
    /// Accept Bearer tokens over plain HTTP from any peer (default false: only over TLS, from
    /// loopback, or through a trusted proxy that says the client used HTTPS).
    pub allow_plaintext_tokens: bool,
    /// Prefix answered by the gateway itself (starts and ends with `/`).
    pub reserved_prefix: String,
    /// The public health endpoint (under `reserved_prefix`), answered without a token; None: off.
    pub health_path: Option<String>,
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
    /// Plain HTTP/1.1 requests take the purpose-built forwarding path (`src/h1/`) instead of
    /// hyper's; off: hyper serves everything.
    pub http1_fast_path: bool,
    /// Runtimes serving the public listener, each a single thread with its own socket on the
    /// listen address (`SO_REUSEPORT`: the kernel spreads new connections over them). 0: one
    /// shared runtime with a worker thread per CPU. Applied at start (a reload warns).
    pub workers: usize,
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
    /// Web UI session absolute lifetime (from sign-in).
    pub session_absolute_timeout: Duration,
    /// `[admin.oidc]`: sign-in with OpenID Connect, when configured.
    pub oidc: Option<OidcConfig>,
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
    /// The name again, shared: the `route` label of the request metrics (counting a request
    /// clones the `Arc`, it does not allocate; a reload keeps the series of a route by name).
    pub label: std::sync::Arc<str>,
    /// Path prefix (segment boundary respected).
    pub prefix: String,
    /// Upstream authority and scheme.
    pub upstream: http::uri::Authority,
    /// `http` or `https`.
    pub upstream_scheme: http::uri::Scheme,
    /// TLS to the upstream: Some exactly for `https://` upstreams (system roots and the host's
    /// name unless `[routes.upstream_tls]` says otherwise); built, files read, at load.
    pub upstream_tls: Option<std::sync::Arc<UpstreamConnector>>,
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

impl RouteConfig {
    /// The path rules are matched against ([`crate::authz::match_path`] with this route's
    /// `case_sensitive` and `trailing_slash`).
    pub fn match_path<'a>(&self, path: &'a str) -> std::borrow::Cow<'a, str> {
        crate::authz::match_path(
            path,
            self.case_sensitive,
            self.trailing_slash == TrailingSlash::Ignore,
        )
    }

    /// The rule table and audit ids for a request to `host` (a lower-case name without port):
    /// an exact host entry first, then the longest matching `*.` pattern, else the rules
    /// without `host`.
    pub fn rules_for(&self, host: Option<&str>) -> (&RuleTable, &[String]) {
        if let Some(h) = host.filter(|_| !self.host_rules.is_empty()) {
            let exact = self.host_rules.iter().find(|r| r.host == h);
            let wild = || {
                self.host_rules
                    .iter()
                    .filter(|r| {
                        r.host.starts_with("*.")
                            && crate::hygiene::host_allowed(h, std::slice::from_ref(&r.host))
                    })
                    .max_by_key(|r| r.host.len())
            };
            if let Some(r) = exact.or_else(wild) {
                return (&r.rules, &r.rule_ids);
            }
        }
        (&self.rules, &self.rule_ids)
    }
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
    /// `[forward_auth]`: the endpoint front proxies ask; None = not served.
    pub forward_auth: Option<ForwardAuthConfig>,
    /// `[admin.mfa]`: TOTP step-up for people; None = MFA is off.
    pub mfa: Option<MfaConfig>,
    /// Named rules, approval-gated rules and `[approvals]`.
    pub approvals: ApprovalsConfig,
}

/// `[forward_auth]` (docs/forward-auth.md).
#[derive(Debug, Clone)]
pub struct ForwardAuthConfig {
    /// Path of the endpoint on the public listener, under `server.reserved_prefix`, without a
    /// trailing `/`. Envoy's ext_authz appends the original path to it.
    pub path: String,
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

/// The longest duration any setting or command accepts (100 years): every timestamp computed
/// from a duration (now + grace, in milliseconds) stays far inside `i64`.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses a network: a CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a bare address, taken as its
/// `/32` or `/128`; an error that says what it takes if it is neither.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
        .ok_or_else(|| {
            format!(
                "`{s}` is neither an IP address nor a CIDR like `10.0.0.0/8` or `2001:db8::/32`"
            )
        })
}

/// Parses a duration like `250ms`, `10s`, `5m`, `24h`, `7d`, or a compound of them in any order
/// without repeats, like `1h30m` or `1d12h`. Arithmetic is checked: a value that overflows or
/// exceeds [`MAX_DURATION`] is an error, never a wrapped number.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let shape = || {
        format!(
            "`{s}` is not a duration: use a number and a unit (ms, s, m, h, d), like `10s`, \
             `500ms`, `24h`, or a compound like `1h30m`"
        )
    };
    let too_long = || format!("`{s}` is too long: the longest duration accepted is 100 years");
    if s.is_empty() {
        return Err(shape());
    }
    let mut rest = s;
    let mut total_ms: u64 = 0;
    let mut seen: Vec<&str> = Vec::new();
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(shape());
        }
        let (num, after) = rest.split_at(digits);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let per_ms: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(shape()),
            _ => {
                return Err(format!(
                    "`{s}` has an unknown unit `{unit}`: use ms, s, m, h or d"
                ));
            }
        };
        if seen.contains(&unit) {
            return Err(format!("`{s}` gives the unit `{unit}` twice"));
        }
        seen.push(unit);
        // A number too long for u64 is an overflow too, not a shape error.
        let n: u64 = num.parse().map_err(|_| too_long())?;
        total_ms = n
            .checked_mul(per_ms)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(too_long)?;
        rest = next;
    }
    let d = Duration::from_millis(total_ms);
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
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
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::path::absolute(&base).unwrap_or(base);
        validate::validate(raw, path, &base)
    }
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

impl StoreConfig {
    /// The store's own options for this section (the edge where config meets the store).
    pub fn options(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            path: self.path.clone(),
            url: self.url.clone(),
            busy_timeout: self.busy_timeout,
            pg: crate::store::PgOptions {
                pool_size: self.pool_size,
                timeout: self.timeout,
                ca: self.ca.clone(),
            },
        }
    }
}

impl RateLimitConfig {
    /// The Redis limiter's own options for this section.
    pub fn redis_options(&self) -> crate::ratelimit::redis::RedisOptions {
        crate::ratelimit::redis::RedisOptions {
            url: self.redis.clone(),
            timeout: self.redis_timeout,
            replicas: self.replicas,
        }
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
        assert_eq!(c.server.workers, 0, "one shared runtime unless asked");
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let auto = load("[server]\nworkers = \"auto\"\n").unwrap();
        assert_eq!(auto.server.workers, cpus, "auto: one runtime per CPU");
        assert_eq!(load("[server]\nworkers = 3\n").unwrap().server.workers, 3);
        assert_eq!(c.admin.listen, DEFAULT_ADMIN_LISTEN.parse().unwrap());
        assert!(c.admin.listen.ip().is_loopback());
        assert_eq!(c.server.realm, DEFAULT_REALM);
        assert!(c.server.trusted_proxies.is_empty());
        assert!(!c.server.allow_plaintext_tokens);
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
    fn minimal_file_converts_into_the_owners_defaults() {
        let c = load("").unwrap();
        let store = c.store.options();
        assert_eq!(store.url, None);
        assert_eq!(store.path, PathBuf::from("/etc/tokengate/tokengate.db"));
        assert_eq!(store.busy_timeout, crate::store::DEFAULT_BUSY_TIMEOUT);
        assert_eq!(
            store.pg.pool_size,
            crate::store::PgOptions::default().pool_size
        );
        assert_eq!(store.pg.timeout, crate::store::PgOptions::default().timeout);
        assert_eq!(store.pg.ca, None);
        let redis = c.rate_limit.redis_options();
        assert_eq!(redis.url, None);
        assert_eq!(redis.timeout, DEFAULT_REDIS_TIMEOUT);
        assert_eq!(redis.replicas, DEFAULT_REPLICAS);
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
            ("[server]\nworkers = 257\n", "server.workers"),
            ("[server]\nworkers = -1\n", "server.workers"),
            ("[server]\nworkers = \"all\"\n", "server.workers"),
            ("[tokens]\nprefix = \"TG\"\n", "tokens.prefix"),
            (
                "[server]\nheader_read_timeout = \"10 parsecs\"\n",
                "server.header_read_timeout",
            ),
            (
                "[[routes]]\nname = \"a\"\nupstream = \"ftp://x\"\n",
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
    fn networks_take_an_address_or_a_cidr_and_say_so_when_neither() {
        assert_eq!(parse_net("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_net("192.0.2.1").unwrap().to_string(), "192.0.2.1/32");
        assert_eq!(
            parse_net("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        let e = load("[server]\ntrusted_proxies = [\"10/8/8\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.trusted_proxies")
                && e.contains("`10/8/8` is neither an IP address nor a CIDR like `10.0.0.0/8`"),
            "{e}"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("1h 30m").is_err());
        assert!(parse_duration("1h1h").is_err());
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn compound_durations_parse() {
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5_400));
        assert_eq!(
            parse_duration("1d12h").unwrap(),
            Duration::from_secs(129_600)
        );
        assert_eq!(
            parse_duration("1m30s250ms").unwrap(),
            Duration::from_millis(90_250)
        );
        assert_eq!(parse_duration("30m1h").unwrap(), Duration::from_secs(5_400));
    }

    #[test]
    fn duration_overflow_is_an_error() {
        // 307445734561825861 * 60 wraps u64 to 44: it once became a 44 s grace.
        let e = parse_duration("307445734561825861m").unwrap_err();
        assert!(e.contains("too long"), "{e}");
        assert!(
            parse_duration("18446744073709551616s")
                .unwrap_err()
                .contains("too long")
        );
        assert!(parse_duration("36501d").unwrap_err().contains("too long"));
        assert!(parse_duration("1d18446744073709551615ms").is_err());
        assert_eq!(parse_duration("36500d").unwrap(), MAX_DURATION);
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

    #[test]
    fn urls_are_checked() {
        assert!(validate::check_redis_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(validate::check_redis_url("http://x").is_err());
        assert!(validate::check_postgres_url("postgres://tg@db:5432/tg").is_ok());
        assert!(validate::check_postgres_url("mysql://tg@db/tg").is_err());
        assert!(validate::check_postgres_url("postgres://tg@db/tg?sslmode=sometimes").is_err());
    }
}
