//! The raw stage of the config: the TOML file exactly as serde reads it, and every default as a
//! named `DEFAULT_*` constant (each listed in `docs/configuration.md`).
//!
//! Owns: the `Raw*` structs (`deny_unknown_fields`, so a misspelt key is an error naming it) and
//! the defaults. Holds no checks — those are in [`super::validate`].
//! Never imports: anything of ours but the option types it deserialises into (`audit::OnFailure`),
//! and the owners' defaults it re-names; never `cli`, `gateway` or `admin`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::audit::OnFailure;

/// Public listener address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Admin listener address: loopback only, by default.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Realm in `WWW-Authenticate` challenges.
pub const DEFAULT_REALM: &str = "tokengate";
/// Prefix on which the gateway answers itself.
pub const DEFAULT_RESERVED_PREFIX: &str = "/_tokengate/";
/// `server.health_path` when unset: this name under `server.reserved_prefix`.
pub const DEFAULT_HEALTH_NAME: &str = "health";
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
/// `server.workers`: one shared runtime (a worker thread per CPU), not one runtime per worker.
pub const DEFAULT_WORKERS: usize = 0;
/// The most runtimes `server.workers` may ask for.
pub const MAX_WORKERS: usize = 256;
/// Idle timeout of a web UI session.
pub const DEFAULT_SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// SQLite file name, relative to the config file.
pub const DEFAULT_STORE_PATH: &str = "tokengate.db";
/// SQLite busy timeout on the request path.
pub const DEFAULT_BUSY_TIMEOUT: Duration = crate::store::DEFAULT_BUSY_TIMEOUT;
/// How often other processes' changes (revocations) are picked up from the store.
pub const DEFAULT_CHANGE_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Connections in the PostgreSQL pool (`store.url`).
pub const DEFAULT_STORE_POOL_SIZE: usize = crate::store::DEFAULT_POOL_SIZE;
/// Deadline for one PostgreSQL store call (pool wait, connect, queries).
pub const DEFAULT_STORE_TIMEOUT: Duration = crate::store::DEFAULT_TIMEOUT;
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
/// Path of the forward-auth endpoint on the public listener (`[forward_auth]`).
pub const DEFAULT_FORWARD_AUTH_PATH: &str = "/_tokengate/auth";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub(super) server: RawServer,
    pub(super) admin: RawAdmin,
    pub(super) store: RawStore,
    pub(super) tokens: RawTokens,
    pub(super) audit: RawAudit,
    pub(super) rate_limit: RawRateLimit,
    pub(super) roles: BTreeMap<String, RawRole>,
    pub(super) routes: Vec<RawRoute>,
    pub(super) forward_auth: Option<RawForwardAuth>,
    pub(super) approvals: Option<RawApprovals>,
}

/// `[approvals]` (issue 19).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawApprovals {
    pub(super) request_ttl: Option<String>,
    pub(super) webhook: Option<RawWebhook>,
}

/// `[approvals.webhook]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    pub(super) url: String,
    pub(super) secret_file: PathBuf,
    #[serde(default)]
    pub(super) max_attempts: Option<u32>,
    #[serde(default)]
    pub(super) timeout: Option<String>,
    #[serde(default)]
    pub(super) retry_backoff: Option<String>,
}

/// `[admin.mfa]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMfa {
    pub(super) key_file: Option<PathBuf>,
    pub(super) required_for_admin: Option<bool>,
    pub(super) step_up_ttl: Option<String>,
    pub(super) issuer: Option<String>,
}

/// A rule's `approval = { window, approvers }`.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApproval {
    pub(super) window: String,
    pub(super) approvers: Vec<String>,
}

/// `[forward_auth]`: present = the endpoint is served (unless `enabled = false`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawForwardAuth {
    pub(super) enabled: Option<bool>,
    pub(super) path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) tls: Option<RawTls>,
    pub(super) realm: Option<String>,
    pub(super) trusted_proxies: Vec<String>,
    pub(super) allow_plaintext_tokens: bool,
    pub(super) reserved_prefix: Option<String>,
    pub(super) health_path: Option<String>,
    pub(super) methods: Option<Vec<String>>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_connections_per_ip: Option<usize>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) tls_handshake_timeout: Option<String>,
    pub(super) body_idle_timeout: Option<String>,
    pub(super) request_timeout: Option<String>,
    pub(super) upstream_timeout: Option<String>,
    pub(super) max_header_bytes: Option<usize>,
    pub(super) max_uri_bytes: Option<usize>,
    pub(super) max_body_bytes: Option<u64>,
    pub(super) h2_max_concurrent_streams: Option<u32>,
    pub(super) h2_idle_timeout: Option<String>,
    pub(super) shutdown_grace: Option<String>,
    pub(super) http1_fast_path: Option<bool>,
    pub(super) workers: Option<RawWorkers>,
}

/// `server.workers`: a number of runtimes, or a word (`"auto"`).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub(super) enum RawWorkers {
    Count(i64),
    Word(String),
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<String>,
    pub(super) tls: Option<RawTls>,
    pub(super) session_idle_timeout: Option<String>,
    pub(super) session_absolute_timeout: Option<String>,
    pub(super) oidc: Option<super::oidc::RawOidc>,
    pub(super) mfa: Option<RawMfa>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawStore {
    pub(super) path: Option<PathBuf>,
    pub(super) url: Option<String>,
    pub(super) ca: Option<PathBuf>,
    pub(super) pool_size: Option<usize>,
    pub(super) timeout: Option<String>,
    pub(super) busy_timeout: Option<String>,
    pub(super) change_poll_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTokens {
    pub(super) prefix: Option<String>,
    pub(super) max_active_per_account: Option<u32>,
    pub(super) allowed_expiry: Option<Vec<String>>,
    pub(super) default_expiry: Option<String>,
    pub(super) expiry_warning_days: Option<u32>,
    pub(super) max_lifetime_days: Option<u32>,
    pub(super) rotation_grace: Option<String>,
    pub(super) last_used_flush_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAudit {
    pub(super) path: Option<String>,
    pub(super) on_failure: Option<OnFailure>,
    pub(super) max_bytes: Option<u64>,
    pub(super) queue: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRateLimit {
    pub(super) requests_per_second: Option<f64>,
    pub(super) burst: Option<u32>,
    pub(super) failed_auth_per_minute: Option<u32>,
    pub(super) failed_auth_max_clients: Option<usize>,
    pub(super) redis: Option<String>,
    pub(super) replicas: Option<u32>,
    pub(super) redis_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRole {
    pub(super) permissions: Vec<String>,
    pub(super) rate_limit: Option<RawRate>,
    pub(super) shadow: bool,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRate {
    pub(super) requests_per_second: f64,
    pub(super) burst: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: String,
    #[serde(default = "default_route_prefix")]
    pub(super) prefix: String,
    pub(super) upstream: String,
    #[serde(default)]
    pub(super) timeout: Option<String>,
    #[serde(default)]
    pub(super) forward_authorization: bool,
    #[serde(default)]
    pub(super) websocket: bool,
    #[serde(default)]
    pub(super) allow_non_ascii: bool,
    #[serde(default)]
    pub(super) pass_host: bool,
    #[serde(default)]
    pub(super) allowed_hosts: Vec<String>,
    #[serde(default = "default_true")]
    pub(super) case_sensitive: bool,
    #[serde(default)]
    pub(super) trailing_slash: Option<String>,
    #[serde(default)]
    pub(super) rules: Vec<RawRule>,
    #[serde(default)]
    pub(super) upstream_tls: Option<RawUpstreamTls>,
}

/// `[routes.upstream_tls]`: TLS to an `https://` upstream.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUpstreamTls {
    pub(super) ca_file: Option<PathBuf>,
    pub(super) server_name: Option<String>,
    pub(super) client_cert_file: Option<PathBuf>,
    pub(super) client_key_file: Option<PathBuf>,
    pub(super) http2: bool,
}

pub(super) fn default_true() -> bool {
    true
}

pub(super) fn default_route_prefix() -> String {
    "/".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    #[serde(default)]
    pub(super) methods: Vec<String>,
    pub(super) path: String,
    #[serde(default)]
    pub(super) permission: Option<String>,
    #[serde(default)]
    pub(super) public: bool,
    #[serde(default)]
    pub(super) shadow: bool,
    #[serde(default)]
    pub(super) host: Option<String>,
    #[serde(default)]
    pub(super) name: Option<String>,
    #[serde(default)]
    pub(super) approval: Option<RawApproval>,
}

// ---------------------------------------------------------------- validated stage
