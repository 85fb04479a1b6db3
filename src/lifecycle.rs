//! Token and account lifecycle: every operation that makes or changes a token, shared by the
//! local CLI, the admin API (and so the remote CLI and the web UI) and the request pipeline:
//! create, rotate, revoke, disable an account, retire a rotated predecessor on its successor's
//! first use, the JSON view of a token and the `--stale`/`--expiring` filter of a listing.
//!
//! It holds THE rule of the admin plane: the result of a lifecycle operation is never stronger
//! than the credential acting. A caller that is not an admin (`tokengate:admin` or `*`) can only
//! produce or touch tokens whose permissions it holds itself (wildcards as in [`authz::grants`]:
//! `apps:*` covers `apps:read`, `apps:read` does not cover `apps:*`), whose scopes and allowed
//! networks are at least as narrow as its own, that expire no later than it does, and whose rate
//! limit is no higher than its own effective rate. What a request leaves unsaid is narrowed to the
//! caller (inherited); what it asks for explicitly and the caller cannot give is refused, naming
//! the attribute. Only an admin may exceed itself, and only within the configured policy
//! (roles, `tokens.allowed_expiry`). Rotation keeps the original expiry.
//!
//! Must never import: `cli`, `admin`, `gateway`, `pipeline` (they import this module).

use std::collections::BTreeMap;
use std::time::Duration;

use ipnet::IpNet;

use crate::audit::AdminRecord;
use crate::authz;
use crate::clock::rfc3339;
use crate::config::{Config, Expiry, parse_duration, parse_net};
use crate::store::{Account, NewTokenSpec, RateOverride, Store, StoreError, TokenRow};
use crate::token::NewToken;

/// Permission that allows everything on the admin API, for every account (`*` grants it).
pub const PERM_ADMIN: &str = "tokengate:admin";
/// Permission that allows the admin API on the token's own account only.
pub const PERM_SELF: &str = "tokengate:self";

/// Who performs a lifecycle operation.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    /// Label for `created_by`/`revoked_by` and audit `actor` (a token id, or `cli:USER`).
    pub label: String,
    /// May exceed itself (within policy) and act on every account.
    pub admin: bool,
    /// The caller's own account id (empty for the local operator).
    pub account_id: String,
    /// The caller's own account name (empty for the local operator).
    pub account: String,
    /// Its permissions.
    pub permissions: Vec<String>,
    /// Its scopes.
    pub scopes: BTreeMap<String, Vec<String>>,
    /// Its allowed networks (empty: any).
    pub allowed_cidrs: Vec<IpNet>,
    /// Its expiry (None: never).
    pub expires_at: Option<i64>,
    /// Its effective rate limit (its override, else the configured default).
    pub rate: RateOverride,
    /// The configured default rate (what a token without an override gets).
    pub default_rate: RateOverride,
}

impl Caller {
    /// The local CLI on the store: the operator, an admin bound only by policy.
    pub fn operator(label: impl Into<String>, cfg: &Config) -> Caller {
        let rate: RateOverride = cfg.rate_limit.default.into();
        Caller {
            label: label.into(),
            admin: true,
            account_id: String::new(),
            account: String::new(),
            permissions: vec!["*".into()],
            scopes: BTreeMap::new(),
            allowed_cidrs: vec![],
            expires_at: None,
            rate,
            default_rate: rate,
        }
    }

    /// A token acting on the admin API (Bearer, remote CLI, or a web UI session's token).
    pub fn token(row: &TokenRow, default_rate: RateOverride) -> Caller {
        Caller {
            label: row.id.clone(),
            admin: authz::grants(&row.permissions, PERM_ADMIN),
            account_id: row.account_id.clone(),
            account: row.account.clone(),
            permissions: row.permissions.clone(),
            scopes: row.scopes.clone(),
            allowed_cidrs: row.allowed_cidrs.clone(),
            expires_at: row.expires_at,
            rate: row.rate.unwrap_or(default_rate),
            default_rate,
        }
    }

    fn owns(&self, account: &str) -> bool {
        account == self.account || account == self.account_id
    }
}

/// Why an operation was refused because its result would be stronger than the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The attribute: `permissions`, `tokengate`, `scopes`, `allowed_cidrs`, `expiry`, `rate`,
    /// `account`.
    pub attribute: &'static str,
    /// A sentence naming the attribute and the value refused.
    pub message: String,
}

impl Refusal {
    fn new(attribute: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            attribute,
            message: message.into(),
        }
    }
}

/// A lifecycle failure.
#[derive(Debug)]
pub enum LifecycleError {
    /// The request is malformed or outside policy (400, or CLI exit 64).
    Invalid(String),
    /// The result would be stronger than the caller (403 `forbidden`, audited).
    Forbidden(Refusal),
    /// The store said no.
    Store(StoreError),
}

impl From<StoreError> for LifecycleError {
    fn from(e: StoreError) -> Self {
        LifecycleError::Store(e)
    }
}

impl From<Refusal> for LifecycleError {
    fn from(r: Refusal) -> Self {
        LifecycleError::Forbidden(r)
    }
}

/// A token-creation request, as the CLI flags and the API body give it (not yet checked).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CreateRequest {
    /// Owning account (name or id).
    pub account: String,
    /// Label.
    pub name: String,
    /// Role whose permissions are copied onto the token.
    pub role: Option<String>,
    /// Explicit permissions (added to the role's).
    pub permissions: Vec<String>,
    /// Expiry preset (`30d`, `never`); None: `tokens.default_expiry`.
    pub expires: Option<String>,
    /// Scopes (validated here).
    pub scopes: BTreeMap<String, Vec<String>>,
    /// Allowed networks, as CIDRs or addresses.
    pub allowed_cidrs: Vec<String>,
    /// Rate override `RPS/BURST`.
    pub rate: Option<String>,
}

/// Parses `KEY=V1,V2`.
pub fn parse_scope(s: &str) -> Result<(String, Vec<String>), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: scopes look like KEY=V1,V2"))?;
    let vals: Vec<String> = v
        .split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect();
    authz::validate_scope(k, &vals).map_err(|e| e.to_string())?;
    Ok((k.to_string(), vals))
}

/// Parses `RPS/BURST`.
pub fn parse_rate(s: &str) -> Result<RateOverride, String> {
    let (r, b) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}`: a rate looks like RPS/BURST, e.g. 5/10"))?;
    let rps: f64 = r
        .parse()
        .ok()
        .filter(|x: &f64| *x > 0.0 && x.is_finite())
        .ok_or_else(|| format!("`{r}` is not a positive rate"))?;
    let burst: u32 = b
        .parse()
        .ok()
        .filter(|x| *x > 0)
        .ok_or_else(|| format!("`{b}` is not a positive burst"))?;
    Ok(RateOverride {
        requests_per_second: rps,
        burst,
    })
}

/// Validates a token label.
pub fn valid_token_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_graphic() || c == ' ')
}

/// Account names: 1-64 letters, digits, `.`, `_`, `-`, `@`.
pub fn valid_account_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
}

fn expiry_in_policy(cfg: &Config, s: Option<&str>) -> Result<Expiry, LifecycleError> {
    let expiry = match s {
        Some(e) => Expiry::parse(e).map_err(LifecycleError::Invalid)?,
        None => cfg.tokens.default_expiry,
    };
    if !cfg.tokens.allowed_expiry.contains(&expiry) {
        return Err(LifecycleError::Invalid(format!(
            "expiry `{expiry}` is not allowed by policy; allowed: {}",
            cfg.tokens
                .allowed_expiry
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(expiry)
}

fn expires_at(expiry: Expiry, now: i64) -> Option<i64> {
    match expiry {
        Expiry::Days(d) => Some(now + d as i64 * 86_400_000),
        Expiry::Never => None,
    }
}

/// Turns a creation request into a spec, checking it against the policy (roles, allowed
/// expiries, well-formed permissions, scopes, networks and rate). Not the caller rule: see
/// [`not_stronger`].
pub fn build_spec(
    cfg: &Config,
    r: &CreateRequest,
    created_by: &str,
    now: i64,
) -> Result<NewTokenSpec, LifecycleError> {
    let invalid = LifecycleError::Invalid;
    if !valid_token_name(&r.name) {
        return Err(invalid(
            "token names are 1-64 printable ASCII characters".into(),
        ));
    }
    let (role, permissions) = match &r.role {
        Some(name) => {
            let role = cfg.roles.get(name).ok_or_else(|| {
                invalid(format!(
                    "no role `{name}`; roles: {}",
                    cfg.roles.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
            let mut perms = role.permissions.clone();
            for p in &r.permissions {
                if !perms.contains(p) {
                    perms.push(p.clone());
                }
            }
            (Some(name.clone()), perms)
        }
        None => (None, r.permissions.clone()),
    };
    for p in &permissions {
        authz::validate_permission(p).map_err(|e| invalid(e.to_string()))?;
    }
    let expiry = expiry_in_policy(cfg, r.expires.as_deref())?;
    for (k, v) in &r.scopes {
        authz::validate_scope(k, v).map_err(|e| invalid(e.to_string()))?;
    }
    let mut allowed_cidrs = Vec::new();
    for c in &r.allowed_cidrs {
        let net = parse_net(c).map_err(invalid)?;
        allowed_cidrs.push(net);
    }
    let rate = r
        .rate
        .as_deref()
        .map(parse_rate)
        .transpose()
        .map_err(invalid)?;
    Ok(NewTokenSpec {
        account: r.account.clone(),
        name: r.name.clone(),
        role,
        permissions,
        scopes: r.scopes.clone(),
        allowed_cidrs,
        rate,
        expires_at: expires_at(expiry, now),
        created_by: created_by.to_string(),
    })
}

/// What a request stated explicitly (refused when too wide) rather than left to defaults
/// (narrowed to the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Explicit {
    /// The expiry was asked for.
    pub expiry: bool,
    /// The rate was asked for.
    pub rate: bool,
    /// Empty scopes/networks mean "unrestricted" rather than "inherit" (an existing token).
    pub existing: bool,
}

impl Explicit {
    /// An existing token (rotate, revoke): nothing is narrowed, everything is compared.
    pub const EXISTING: Explicit = Explicit {
        expiry: true,
        rate: true,
        existing: true,
    };
}

fn rate_exceeds(a: RateOverride, b: RateOverride) -> bool {
    a.requests_per_second > b.requests_per_second || a.burst > b.burst
}

fn is_tokengate(p: &str) -> bool {
    p == "*" || p.starts_with("tokengate:")
}

/// THE rule: makes `spec` no stronger than `caller`, narrowing what the request left unsaid and
/// refusing what it asked for and the caller cannot give. An admin may exceed itself (policy is
/// checked by [`build_spec`]).
pub fn not_stronger(caller: &Caller, spec: &mut NewTokenSpec, ex: Explicit) -> Result<(), Refusal> {
    if caller.admin {
        return Ok(());
    }
    // An existing token is judged as it is, never narrowed.
    let ex = if ex.existing { Explicit::EXISTING } else { ex };
    for p in &spec.permissions {
        if !authz::grants(&caller.permissions, p) {
            let attribute = if is_tokengate(p) {
                "tokengate"
            } else {
                "permissions"
            };
            return Err(Refusal::new(
                attribute,
                format!(
                    "{attribute}: this token may not grant `{p}`: a tokengate:self token can only issue or manage tokens with permissions it holds itself."
                ),
            ));
        }
    }
    for (key, allowed) in &caller.scopes {
        match spec.scopes.get(key) {
            None if !ex.existing => {
                spec.scopes.insert(key.clone(), allowed.clone());
            }
            None => {
                return Err(Refusal::new(
                    "scopes",
                    format!(
                        "scopes: the token is not limited to this token's own scope `{key}={}`.",
                        allowed.join(",")
                    ),
                ));
            }
            Some(asked) => {
                let mine = BTreeMap::from([(key.clone(), allowed.clone())]);
                if let Some(bad) = asked
                    .iter()
                    .find(|v| !authz::scopes_allow(&mine, &[(key.as_str(), (*v).clone())]))
                {
                    return Err(Refusal::new(
                        "scopes",
                        format!(
                            "scopes: scope `{key}={bad}` is wider than this token's own scope."
                        ),
                    ));
                }
            }
        }
    }
    if !caller.allowed_cidrs.is_empty() {
        if spec.allowed_cidrs.is_empty() {
            if ex.existing {
                return Err(Refusal::new(
                    "allowed_cidrs",
                    "allowed_cidrs: the token may be used from any network, wider than this token's own allowed networks.",
                ));
            }
            spec.allowed_cidrs = caller.allowed_cidrs.clone();
        } else if let Some(bad) = spec
            .allowed_cidrs
            .iter()
            .find(|c| !caller.allowed_cidrs.iter().any(|a| a.contains(*c)))
        {
            return Err(Refusal::new(
                "allowed_cidrs",
                format!(
                    "allowed_cidrs: network `{bad}` is outside this token's own allowed networks."
                ),
            ));
        }
    }
    if let Some(mine) = caller.expires_at {
        match spec.expires_at {
            Some(e) if e <= mine => {}
            _ if !ex.expiry => spec.expires_at = Some(mine),
            e => {
                return Err(Refusal::new(
                    "expiry",
                    format!(
                        "expiry: the token would expire {}, later than this token ({}).",
                        e.map(rfc3339).unwrap_or_else(|| "never".into()),
                        rfc3339(mine)
                    ),
                ));
            }
        }
    }
    let asked = spec.rate.unwrap_or(caller.default_rate);
    if rate_exceeds(asked, caller.rate) {
        if spec.rate.is_none() && !ex.rate {
            spec.rate = Some(caller.rate);
        } else {
            return Err(Refusal::new(
                "rate",
                format!(
                    "rate: {}/{} is above this token's own rate limit {}/{}.",
                    asked.requests_per_second,
                    asked.burst,
                    caller.rate.requests_per_second,
                    caller.rate.burst
                ),
            ));
        }
    }
    Ok(())
}

/// The spec an existing token would be issued with (to compare it with a caller).
fn spec_of(t: &TokenRow) -> NewTokenSpec {
    NewTokenSpec {
        account: t.account_id.clone(),
        name: t.name.clone(),
        role: t.role.clone(),
        permissions: t.permissions.clone(),
        scopes: t.scopes.clone(),
        allowed_cidrs: t.allowed_cidrs.clone(),
        rate: t.rate,
        expires_at: t.expires_at,
        created_by: t.created_by.clone(),
    }
}

fn own_account(caller: &Caller, account: &str) -> Result<(), Refusal> {
    if caller.admin || caller.owns(account) {
        return Ok(());
    }
    Err(Refusal::new(
        "account",
        "account: this token may only manage its own account's tokens (it holds tokengate:self, not tokengate:admin).",
    ))
}

/// May `caller` rotate the existing token `t`? Only if `t` is in its own account and no stronger
/// than itself in every attribute, since the successor is a copy of `t` (an admin may rotate any).
pub fn may_rotate(caller: &Caller, t: &TokenRow) -> Result<(), Refusal> {
    own_account(caller, &t.account_id)?;
    not_stronger(caller, &mut spec_of(t), Explicit::EXISTING)
}

/// May `caller` revoke the existing token `t`? Revoking only takes away, so scopes, networks,
/// expiry and rate do not matter; but a non-admin may only revoke its own account's tokens whose
/// permissions it holds itself (a `tokengate:self` token cannot take out the account's admin
/// token, or one with powers it lacks).
pub fn may_revoke(caller: &Caller, t: &TokenRow) -> Result<(), Refusal> {
    own_account(caller, &t.account_id)?;
    // `t`'s permissions with the caller's own limits: only the permissions are compared.
    let mut perms_only = NewTokenSpec {
        account: t.account_id.clone(),
        name: t.name.clone(),
        role: None,
        permissions: t.permissions.clone(),
        scopes: caller.scopes.clone(),
        allowed_cidrs: caller.allowed_cidrs.clone(),
        rate: Some(caller.rate),
        expires_at: caller.expires_at,
        created_by: String::new(),
    };
    not_stronger(caller, &mut perms_only, Explicit::EXISTING)
}

/// Checks a creation request and returns the spec to store (policy, own account, the rule).
pub fn check_create(
    cfg: &Config,
    caller: &Caller,
    r: &CreateRequest,
    now: i64,
) -> Result<NewTokenSpec, LifecycleError> {
    own_account(caller, &r.account)?;
    let mut spec = build_spec(cfg, r, &caller.label, now)?;
    let ex = Explicit {
        expiry: r.expires.is_some(),
        rate: r.rate.is_some(),
        existing: false,
    };
    not_stronger(caller, &mut spec, ex)?;
    Ok(spec)
}

/// Creates a token.
pub fn create(
    store: &Store,
    cfg: &Config,
    caller: &Caller,
    r: &CreateRequest,
    now: i64,
) -> Result<(TokenRow, NewToken), LifecycleError> {
    let spec = check_create(cfg, caller, r, now)?;
    Ok(store.create_token(
        &spec,
        &cfg.tokens.prefix,
        cfg.tokens.max_active_per_account,
        now,
    )?)
}

/// A rotation request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotateRequest {
    /// How long the old token stays valid at most (default `tokens.rotation_grace`).
    pub grace: Option<String>,
    /// A new lifetime for the successor (admins only, within policy); None keeps the expiry.
    pub expires: Option<String>,
}

/// Checks a rotation of `old` and returns (grace, the successor's expiry).
pub fn check_rotate(
    cfg: &Config,
    caller: &Caller,
    old: &TokenRow,
    r: &RotateRequest,
    now: i64,
) -> Result<(Duration, Option<i64>), LifecycleError> {
    let grace = match r.grace.as_deref() {
        Some(g) => parse_duration(g).map_err(LifecycleError::Invalid)?,
        None => cfg.tokens.rotation_grace,
    };
    may_rotate(caller, old)?;
    let expires = match &r.expires {
        None => old.expires_at,
        Some(_) if !caller.admin => {
            return Err(Refusal::new(
                "expiry",
                "expiry: only an admin may give a rotated token a new lifetime; the successor keeps the original expiry.",
            )
            .into());
        }
        Some(e) => expires_at(expiry_in_policy(cfg, Some(e))?, now),
    };
    Ok((grace, expires))
}

/// Rotates `old` (found by the caller's own visibility rules): the successor keeps every
/// attribute and the original expiry. Returns (successor, its plaintext, grace).
pub fn rotate(
    store: &Store,
    cfg: &Config,
    caller: &Caller,
    old: &TokenRow,
    r: &RotateRequest,
    now: i64,
) -> Result<(TokenRow, NewToken, Duration), LifecycleError> {
    let (grace, expires) = check_rotate(cfg, caller, old, r, now)?;
    let (row, new) = store.rotate_until(
        &old.id,
        &caller.label,
        grace.as_millis() as i64,
        &cfg.tokens.prefix,
        now,
        expires,
    )?;
    Ok((row, new, grace))
}

/// Revokes `t` (soft delete: the row stays, marked revoked).
pub fn revoke(
    store: &Store,
    caller: &Caller,
    t: &TokenRow,
    reason: &str,
    now: i64,
) -> Result<TokenRow, LifecycleError> {
    may_revoke(caller, t)?;
    Ok(store.revoke(&t.id, &caller.label, reason, now)?)
}

/// Disables an account (admins only): every token of it is rejected from then on.
pub fn disable_account(
    store: &Store,
    caller: &Caller,
    name: &str,
    now: i64,
) -> Result<Account, LifecycleError> {
    if !caller.admin {
        return Err(Refusal::new(
            "tokengate",
            format!("tokengate: disabling an account needs `{PERM_ADMIN}`."),
        )
        .into());
    }
    Ok(store.disable_account(name, &caller.label, now)?)
}

/// The successor of a rotation that is being used for the first time.
#[derive(Debug, Clone, Copy)]
pub struct Successor<'a> {
    /// Its id.
    pub id: &'a str,
    /// Its display prefix.
    pub prefix: &'a str,
    /// Its account name.
    pub account: &'a str,
}

/// Retire-on-first-use: revokes the rotated predecessor `old` (reason `rotated`, actor
/// `tokengate`). Returns the audit record to write when this call retired it (None when it was
/// already retired: the store call is idempotent).
pub fn retire_predecessor(
    store: &Store,
    old: &str,
    by: Successor<'_>,
    client_ip: std::net::IpAddr,
    now: i64,
) -> Result<Option<AdminRecord>, StoreError> {
    if !store.retire_rotated(old, now)? {
        return Ok(None);
    }
    Ok(Some(AdminRecord {
        timestamp: crate::audit::now_rfc3339(),
        event: "token.revoked".into(),
        actor: "tokengate".into(),
        auth_type: "api_token".into(),
        target: Some(old.to_string()),
        account: Some(by.account.to_string()),
        api_token_id: Some(by.id.to_string()),
        token_prefix: Some(by.prefix.to_string()),
        reason: Some("rotated".into()),
        client_ip: Some(client_ip.to_string()),
        details: None,
    }))
}

/// The `--stale` and `--expiring` of a token listing, on the CLI and the API alike: keep the
/// tokens unused for longer than `stale` (one never used counts from its creation) and those
/// expiring within `expiring` (not expired yet); either, when given, in ms.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListFilter {
    /// Unused for longer than this (ms).
    pub stale: Option<i64>,
    /// Expiring within this (ms).
    pub expiring: Option<i64>,
}

impl ListFilter {
    /// Parses the two durations (`90d`, `12h`, ...), `stale` first.
    pub fn parse(stale: Option<&str>, expiring: Option<&str>) -> Result<ListFilter, String> {
        let ms = |s: Option<&str>| {
            s.map(|s| parse_duration(s).map(|d| d.as_millis() as i64))
                .transpose()
        };
        Ok(ListFilter {
            stale: ms(stale)?,
            expiring: ms(expiring)?,
        })
    }

    /// True when `t` is listed at `now`.
    pub fn keeps(&self, t: &TokenRow, now: i64) -> bool {
        self.stale
            .is_none_or(|s| t.last_used_at.unwrap_or(t.created_at) < now - s)
            && self
                .expiring
                .is_none_or(|w| t.expires_at.is_some_and(|e| e > now && e <= now + w))
    }
}

/// JSON view of a token (never the hash, never the plaintext).
pub fn token_json(t: &TokenRow, now: i64) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "name": t.name,
        "prefix": t.prefix,
        "account": t.account,
        "role": t.role,
        "permissions": t.permissions,
        "scopes": t.scopes,
        "allowed_cidrs": t.allowed_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "rate_limit": t.rate,
        "created_at": rfc3339(t.created_at),
        "created_by": t.created_by,
        "expires_at": t.expires_at.map(rfc3339),
        "last_used_at": t.last_used_at.map(rfc3339),
        "last_used_ip": t.last_used_ip,
        "revoked_at": t.revoked_at.map(rfc3339),
        "revoked_by": t.revoked_by,
        "revoke_reason": t.revoke_reason,
        "rotated_from": t.rotated_from,
        "rotation_deadline": t.rotation_deadline.map(rfc3339),
        "status": t.status(now),
    })
}

/// JSON view of an account.
pub fn account_json(a: &Account) -> serde_json::Value {
    serde_json::json!({
        "id": a.id,
        "name": a.name,
        "email": a.email,
        "created_at": rfc3339(a.created_at),
        "created_by": a.created_by,
        "disabled_at": a.disabled_at.map(rfc3339),
        "status": if a.disabled_at.is_some() { "disabled" } else { "active" },
    })
}

#[cfg(test)]
mod tests;
