//! The validated stage of the config: raw TOML structs → [`Config`], one function per section.
//!
//! Owns: every check on a value (each error names its dotted key), path resolution against the
//! config file's directory, `env:NAME` secrets, and the URL checks (`store.url`,
//! `rate_limit.redis`). Converts nothing into store, ratelimit or audit option types — those
//! conversions are in [`super`].
//! Never imports: `cli`, `gateway`, `admin` or `server`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::*;
use super::{
    AdminConfig, AuditSection, Config, ConfigError, Expiry, ForwardAuthConfig, HostRules, Rate,
    RateLimitConfig, RoleConfig, RouteConfig, ServerConfig, StoreConfig, TlsFiles, TokensConfig,
    TrailingSlash, UpstreamConnector, UpstreamTlsOptions, default_roles, parse_duration, parse_net,
};
use crate::authz::{self, Rule, RuleTable};

mod approvals;

/// Checks one config file: turns a failed check into an error that names the file and the key.
struct Checker<'a> {
    path: &'a Path,
}

impl Checker<'_> {
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

/// Validates every section in order (later sections may depend on earlier ones: routes on
/// `[server]`'s methods and reserved prefix).
pub(super) fn validate(raw: RawConfig, path: &Path, base: &Path) -> Result<Config, ConfigError> {
    let cx = Checker { path };
    let server = server(&cx, base, &raw.server)?;
    let mut admin = admin(&cx, base, &raw.admin, &server)?;
    let store = store(&cx, base, &raw.store)?;
    let tokens = tokens(&cx, &raw.tokens)?;
    let audit = audit(base, &raw.audit);
    let rate_limit = rate_limit(&cx, &raw.rate_limit)?;
    let roles = roles(&cx, &raw.roles)?;
    if let Some(o) = &raw.admin.oidc {
        let o = super::oidc::oidc(base, o, &roles).map_err(|(k, m)| cx.invalid(&k, m))?;
        admin.oidc = Some(o);
    }
    let mfa = approvals::mfa(&cx, base, &raw.admin)?;
    let named = approvals::named_raw(&raw.routes);
    let routes = routes(&cx, base, raw.routes, &server)?;
    let approvals = approvals::approvals(
        &cx,
        base,
        &named,
        &routes,
        raw.approvals.as_ref(),
        mfa.as_ref(),
    )?;
    let forward_auth = forward_auth(&cx, raw.forward_auth.as_ref(), &server)?;
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
        forward_auth,
        mfa,
        approvals,
    })
}

/// `[forward_auth]`: the endpoint lives under the reserved prefix, so no route can shadow it and
/// proxy mode never forwards it.
fn forward_auth(
    cx: &Checker<'_>,
    raw: Option<&RawForwardAuth>,
    server: &ServerConfig,
) -> Result<Option<ForwardAuthConfig>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    if raw.enabled == Some(false) {
        return Ok(None);
    }
    let path = raw
        .path
        .clone()
        .unwrap_or_else(|| DEFAULT_FORWARD_AUTH_PATH.to_string());
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"-._~/".contains(&b);
    if !path.starts_with(&server.reserved_prefix)
        || path.len() == server.reserved_prefix.len()
        || path.ends_with('/')
        || !path.bytes().all(plain)
        || path.split('/').any(|s| s == "." || s == "..")
        || path.contains("//")
    {
        return Err(cx.invalid(
            "forward_auth.path",
            format!(
                "must be a plain path under server.reserved_prefix (`{}`), without a trailing `/`, like `{DEFAULT_FORWARD_AUTH_PATH}`",
                server.reserved_prefix
            ),
        ));
    }
    if path[server.reserved_prefix.len()..].starts_with("v1/") || path.ends_with("/v1") {
        return Err(cx.invalid(
            "forward_auth.path",
            "must not overlap the gateway's own `v1` endpoints",
        ));
    }
    Ok(Some(ForwardAuthConfig { path }))
}

/// `[server]`.
fn server(cx: &Checker<'_>, base: &Path, s: &RawServer) -> Result<ServerConfig, ConfigError> {
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
    let health_path = match s.health_path.as_deref() {
        None => Some(format!("{reserved_prefix}{DEFAULT_HEALTH_NAME}")),
        Some("") => None,
        Some(p) => {
            let canonical = crate::path::canonicalise(p, false).is_ok_and(|c| c.path == p);
            if !(p.starts_with(&reserved_prefix) && p.len() > reserved_prefix.len() && canonical) {
                return Err(cx.invalid(
                    "server.health_path",
                    format!(
                        "must be a plain path under server.reserved_prefix, like `{reserved_prefix}{DEFAULT_HEALTH_NAME}` (or \"\" to turn it off)"
                    ),
                ));
            }
            Some(p.to_string())
        }
    };
    let mut trusted_proxies = Vec::new();
    for p in &s.trusted_proxies {
        let net = parse_net(p).map_err(|e| cx.invalid("server.trusted_proxies", e))?;
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
        allow_plaintext_tokens: s.allow_plaintext_tokens,
        reserved_prefix,
        health_path,
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
        http1_fast_path: s.http1_fast_path.unwrap_or(true),
        workers: workers(cx, &s.workers)?,
    };
    if server.realm.contains('"') || server.realm.contains('\\') {
        return Err(cx.invalid("server.realm", "must not contain `\"` or `\\`"));
    }
    Ok(server)
}

/// `server.workers`: 0 (one shared runtime), 1 to [`MAX_WORKERS`], or `"auto"` (one per CPU this
/// process may run on: `available_parallelism` honours the affinity mask and cgroup quotas).
fn workers(cx: &Checker<'_>, raw: &Option<RawWorkers>) -> Result<usize, ConfigError> {
    let bad = |what: String| {
        cx.invalid(
            "server.workers",
            format!(
                "{what}: use 0 (one shared runtime), a number of runtimes up to {MAX_WORKERS} (one \
                 per CPU is the useful most), or \"auto\" (one per CPU)"
            ),
        )
    };
    match raw {
        None => Ok(DEFAULT_WORKERS),
        Some(RawWorkers::Count(n)) => match usize::try_from(*n) {
            Ok(n) if n <= MAX_WORKERS => Ok(n),
            _ => Err(bad(format!("{n} is not a number of runtimes"))),
        },
        Some(RawWorkers::Word(w)) if w == "auto" => {
            Ok(std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS)))
        }
        Some(RawWorkers::Word(w)) => Err(bad(format!("`{w}` is not a number"))),
    }
}

/// `[admin]`; its listener must differ from the public one.
fn admin(
    cx: &Checker<'_>,
    base: &Path,
    a: &RawAdmin,
    server: &ServerConfig,
) -> Result<AdminConfig, ConfigError> {
    let admin = AdminConfig {
        listen: cx.addr("admin.listen", &a.listen, DEFAULT_ADMIN_LISTEN)?,
        tls: cx.tls(base, &a.tls),
        session_idle_timeout: cx.duration(
            "admin.session_idle_timeout",
            &a.session_idle_timeout,
            DEFAULT_SESSION_IDLE_TIMEOUT,
        )?,
        session_absolute_timeout: cx.duration(
            "admin.session_absolute_timeout",
            &a.session_absolute_timeout,
            super::DEFAULT_SESSION_ABSOLUTE_TIMEOUT,
        )?,
        // Checked once the roles are known (`self_role`), in `validate`.
        oidc: None,
    };
    if admin.listen == server.listen && admin.listen.port() != 0 {
        return Err(cx.invalid("admin.listen", "must differ from server.listen"));
    }
    Ok(admin)
}

/// `[store]`: a SQLite `path` or a PostgreSQL `url`, never both.
fn store(cx: &Checker<'_>, base: &Path, st: &RawStore) -> Result<StoreConfig, ConfigError> {
    let url = match &st.url {
        None => None,
        Some(u) => {
            if st.path.is_some() {
                return Err(cx.invalid(
                    "store.url",
                    "set either `path` (SQLite) or `url` (PostgreSQL), not both",
                ));
            }
            let u = resolve_secret(cx, "store.url", u)?;
            check_postgres_url(&u).map_err(|m| cx.invalid("store.url", m))?;
            Some(u)
        }
    };
    if url.is_none() && (st.ca.is_some() || st.pool_size.is_some()) {
        return Err(cx.invalid(
            "store",
            "`ca` and `pool_size` apply to a PostgreSQL `url` only",
        ));
    }
    let pool_size = st.pool_size.unwrap_or(DEFAULT_STORE_POOL_SIZE);
    if pool_size == 0 {
        return Err(cx.invalid("store.pool_size", "must be at least 1"));
    }
    let store = StoreConfig {
        path: base.join(
            st.path
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE_PATH)),
        ),
        url,
        ca: st.ca.as_ref().map(|c| base.join(c)),
        pool_size,
        timeout: cx.duration("store.timeout", &st.timeout, DEFAULT_STORE_TIMEOUT)?,
        busy_timeout: cx.duration("store.busy_timeout", &st.busy_timeout, DEFAULT_BUSY_TIMEOUT)?,
        change_poll_interval: cx.duration(
            "store.change_poll_interval",
            &st.change_poll_interval,
            DEFAULT_CHANGE_POLL_INTERVAL,
        )?,
    };
    Ok(store)
}

/// `[tokens]`: prefix, expiry presets (cut by `max_lifetime_days`), caps.
fn tokens(cx: &Checker<'_>, t: &RawTokens) -> Result<TokensConfig, ConfigError> {
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
    Ok(tokens)
}

/// `[audit]`: `path = "-"` means stdout.
fn audit(base: &Path, a: &RawAudit) -> AuditSection {
    let audit_path = match a.path.as_deref() {
        Some("-") => None,
        Some(p) => Some(base.join(p)),
        None => Some(base.join(DEFAULT_AUDIT_PATH)),
    };
    AuditSection {
        path: audit_path,
        on_failure: a.on_failure.unwrap_or_default(),
        max_bytes: a.max_bytes,
        queue: a.queue.unwrap_or(DEFAULT_AUDIT_QUEUE).max(16),
    }
}

/// `[rate_limit]`.
fn rate_limit(cx: &Checker<'_>, r: &RawRateLimit) -> Result<RateLimitConfig, ConfigError> {
    let default_rate = Rate {
        requests_per_second: r.requests_per_second.unwrap_or(DEFAULT_REQUESTS_PER_SECOND),
        burst: r.burst.unwrap_or(DEFAULT_BURST),
    };
    check_rate(cx, "rate_limit", default_rate)?;
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
                let u = resolve_secret(cx, "rate_limit.redis", u)?;
                if !(u.starts_with("redis://")
                    || u.starts_with("rediss://")
                    || u.starts_with("redis+unix://"))
                {
                    return Err(
                        cx.invalid("rate_limit.redis", "must be a `redis://HOST:PORT[/DB]` URL")
                    );
                }
                check_redis_url(&u).map_err(|m| cx.invalid("rate_limit.redis", m))?;
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
    Ok(rate_limit)
}

/// `[roles.NAME]`: the built-in roles, with the file's roles added or replacing them.
fn roles(
    cx: &Checker<'_>,
    raw: &BTreeMap<String, RawRole>,
) -> Result<BTreeMap<String, RoleConfig>, ConfigError> {
    let mut roles = default_roles();
    for (name, role) in raw {
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
            check_rate(cx, &format!("{key}.rate_limit"), rate)?;
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
    Ok(roles)
}

/// `[[routes]]`, in file order, with their compiled rules.
fn routes(
    cx: &Checker<'_>,
    base: &Path,
    raw: Vec<RawRoute>,
    server: &ServerConfig,
) -> Result<Vec<RouteConfig>, ConfigError> {
    let mut routes = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
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
        let https = match &scheme {
            Some(s) if *s == http::uri::Scheme::HTTP => false,
            Some(s) if *s == http::uri::Scheme::HTTPS => true,
            _ => {
                return Err(cx.invalid(
                    &format!("{key}.upstream"),
                    "must be an http:// or https:// URL, like `http://127.0.0.1:5000`",
                ));
            }
        };
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
        let upstream_tls = upstream_tls(cx, base, &key, https, &authority, &r.upstream_tls)?;
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
            label: r.name.as_str().into(),
            name: r.name,
            prefix: r.prefix,
            upstream: authority,
            upstream_scheme: if https {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            },
            upstream_tls,
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

    Ok(routes)
}

/// `[routes.upstream_tls]`: the connector of an `https://` upstream, its files read now so that
/// `config check` and a reload report a missing or bad file; refused on an `http://` upstream.
fn upstream_tls(
    cx: &Checker<'_>,
    base: &Path,
    key: &str,
    https: bool,
    authority: &http::uri::Authority,
    raw: &Option<RawUpstreamTls>,
) -> Result<Option<std::sync::Arc<UpstreamConnector>>, ConfigError> {
    if !https {
        return match raw {
            Some(_) => Err(cx.invalid(
                &format!("{key}.upstream_tls"),
                "applies to https:// upstreams only: use `upstream = \"https://...\"` or remove the table",
            )),
            None => Ok(None),
        };
    }
    let raw = raw.as_ref();
    let file = |f: Option<&PathBuf>| f.map(|p| base.join(p));
    let options = UpstreamTlsOptions {
        ca_file: file(raw.and_then(|t| t.ca_file.as_ref())),
        server_name: raw.and_then(|t| t.server_name.clone()),
        client_cert_file: file(raw.and_then(|t| t.client_cert_file.as_ref())),
        client_key_file: file(raw.and_then(|t| t.client_key_file.as_ref())),
        http2: raw.is_some_and(|t| t.http2),
    };
    let connector = UpstreamConnector::new(authority.host(), &options).map_err(|e| {
        let k = match e.key {
            "upstream" => format!("{key}.upstream"),
            k => format!("{key}.upstream_tls.{k}"),
        };
        cx.invalid(&k, e.message)
    })?;
    Ok(Some(std::sync::Arc::new(connector)))
}

/// A secret written as `env:NAME` is read from that environment variable (Kubernetes Secrets,
/// systemd credentials), so the config file itself holds no password.
fn resolve_secret(cx: &Checker<'_>, key: &str, value: &str) -> Result<String, ConfigError> {
    match value.strip_prefix("env:") {
        None => Ok(value.to_string()),
        Some(name) => match std::env::var(name) {
            Ok(v) if !v.is_empty() => Ok(v),
            _ => Err(cx.invalid(key, format!("environment variable `{name}` is not set"))),
        },
    }
}

fn check_rate(cx: &Checker<'_>, key: &str, rate: Rate) -> Result<(), ConfigError> {
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

/// Checks that `url` is a PostgreSQL URL this build can connect with (`store.url`).
pub(super) fn check_postgres_url(url: &str) -> Result<(), String> {
    if !crate::store::is_postgres_url(url) {
        return Err("must be a `postgres://USER@HOST:PORT/DB` URL".into());
    }
    url.parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|e| format!("not a valid PostgreSQL URL: {e}"))
}

/// Checks `url` can be used as a Redis URL (`rate_limit.redis`).
pub(super) fn check_redis_url(url: &str) -> Result<(), String> {
    redis::Client::open(url)
        .map(|_| ())
        .map_err(|e| format!("not a usable Redis URL: {e}"))
}
