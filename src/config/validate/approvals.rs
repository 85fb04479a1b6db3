//! Validation of `[admin.mfa]`, `[approvals]` and the rules' `name` / `approval` keys: each error
//! names its dotted key. Reads the MFA key file and the webhook secret file at load.
//! Never imports: `cli`, `gateway`, `admin` or `server`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use super::super::approvals::*;
use super::super::raw::{RawAdmin, RawApprovals, RawRoute};
use super::{Checker, ConfigError, RouteConfig, upstream_tls};

/// `[admin.mfa]`.
pub(in crate::config) fn mfa(
    cx: &Checker<'_>,
    base: &Path,
    a: &RawAdmin,
) -> Result<Option<MfaConfig>, ConfigError> {
    let Some(m) = &a.mfa else {
        return Ok(None);
    };
    let Some(key_file) = &m.key_file else {
        return Err(cx.invalid(
            "admin.mfa.key_file",
            "is required: a file holding 32 random bytes (e.g. `openssl rand -hex 32 > mfa.key`)",
        ));
    };
    let key_file = base.join(key_file);
    let sealer = crate::mfa::Sealer::from_file(&key_file)
        .map_err(|e| cx.invalid("admin.mfa.key_file", e.to_string()))?;
    let issuer = m
        .issuer
        .clone()
        .unwrap_or_else(|| DEFAULT_MFA_ISSUER.into());
    if issuer.is_empty() || issuer.len() > 64 || issuer.contains(':') {
        return Err(cx.invalid("admin.mfa.issuer", "1-64 characters, no `:`"));
    }
    Ok(Some(MfaConfig {
        key_file,
        sealer: Arc::new(sealer),
        required_for_admin: m.required_for_admin.unwrap_or(false),
        step_up_ttl: cx.duration("admin.mfa.step_up_ttl", &m.step_up_ttl, DEFAULT_STEP_UP_TTL)?,
        issuer,
    }))
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.as_bytes()[0].is_ascii_alphanumeric()
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

fn captures(path: &str) -> Vec<String> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|s| s.trim_end_matches("...").to_string())
        .collect()
}

/// The rules' `name` and `approval` keys, checked against the validated routes; and
/// `[approvals]`.
pub(in crate::config) fn approvals(
    cx: &Checker<'_>,
    base: &Path,
    raw_routes: &[NamedRaw],
    routes: &[RouteConfig],
    raw: Option<&RawApprovals>,
    mfa: Option<&MfaConfig>,
) -> Result<ApprovalsConfig, ConfigError> {
    let mut rules = BTreeMap::new();
    let mut by_rule_id = HashMap::new();
    for n in raw_routes {
        let key = format!("routes[{}].rules[{}]", n.route_index, n.rule_index);
        let Some(name) = &n.name else {
            if n.approval.is_some() {
                return Err(cx.invalid(
                    &format!("{key}.approval"),
                    "needs the rule to have a `name` (what `tokengate approval request --rule` names)",
                ));
            }
            continue;
        };
        if !valid_name(name) {
            return Err(cx.invalid(
                &format!("{key}.name"),
                format!(
                    "`{name}`: 1-64 of a-z, 0-9, `_`, `.`, `-`, starting with a letter or digit"
                ),
            ));
        }
        if rules.contains_key(name) {
            return Err(cx.invalid(
                &format!("{key}.name"),
                format!("`{name}` names another rule already"),
            ));
        }
        let approval = match &n.approval {
            None => None,
            Some(a) => {
                if n.public {
                    return Err(cx.invalid(
                        &format!("{key}.approval"),
                        "a public rule has no token to approve",
                    ));
                }
                let window = crate::config::parse_duration(&a.window)
                    .map_err(|m| cx.invalid(&format!("{key}.approval.window"), m))?;
                if window.is_zero() {
                    return Err(cx.invalid(&format!("{key}.approval.window"), "must be positive"));
                }
                if a.approvers.is_empty() {
                    return Err(cx.invalid(
                        &format!("{key}.approval.approvers"),
                        "needs at least one `role:NAME` or `account:NAME`",
                    ));
                }
                let mut approvers = Vec::new();
                for s in &a.approvers {
                    approvers.push(match s.split_once(':') {
                        Some(("role", r)) if !r.is_empty() => Approver::Role(r.to_string()),
                        Some(("account", r)) if !r.is_empty() => Approver::Account(r.to_string()),
                        _ => {
                            return Err(cx.invalid(
                                &format!("{key}.approval.approvers"),
                                format!("`{s}` is not `role:NAME` or `account:NAME`"),
                            ));
                        }
                    });
                }
                if mfa.is_none() {
                    return Err(cx.invalid(
                        &format!("{key}.approval"),
                        "needs `[admin.mfa]` (approving takes a TOTP code)",
                    ));
                }
                Some(ApprovalPolicy { window, approvers })
            }
        };
        let route = &routes[n.route_index];
        let methods = if n.methods.is_empty() {
            "*".to_string()
        } else {
            n.methods.join(",")
        };
        let rule_id = match &n.host {
            Some(h) => format!(
                "{}:{} {} host={}",
                route.name,
                methods,
                n.path,
                h.to_ascii_lowercase()
            ),
            None => format!("{}:{} {}", route.name, methods, n.path),
        };
        let rule = Arc::new(NamedRule {
            name: name.clone(),
            route: route.name.clone(),
            rule_id: rule_id.clone(),
            methods: n.methods.clone(),
            path: n.path.clone(),
            permission: n.permission.clone(),
            captures: captures(&n.path),
            approval,
        });
        by_rule_id.insert(rule_id, rule.clone());
        rules.insert(name.clone(), rule);
    }
    let request_ttl = cx.duration(
        "approvals.request_ttl",
        &raw.and_then(|r| r.request_ttl.clone()),
        DEFAULT_REQUEST_TTL,
    )?;
    let webhook = match raw.and_then(|r| r.webhook.as_ref()) {
        None => None,
        Some(w) => Some(webhook(cx, base, w)?),
    };
    Ok(ApprovalsConfig {
        rules,
        by_rule_id,
        request_ttl,
        webhook,
    })
}

fn webhook(
    cx: &Checker<'_>,
    base: &Path,
    w: &super::super::raw::RawWebhook,
) -> Result<WebhookConfig, ConfigError> {
    let secret_file = base.join(&w.secret_file);
    let url: http::Uri = w
        .url
        .parse()
        .map_err(|_| cx.invalid("approvals.webhook.url", "is not a URL"))?;
    let https = match url.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(cx.invalid(
                "approvals.webhook.url",
                "must be an http:// or https:// URL",
            ));
        }
    };
    let Some(authority) = url.authority().cloned() else {
        return Err(cx.invalid("approvals.webhook.url", "needs a host"));
    };
    let secret = std::fs::read(&secret_file).map_err(|e| {
        cx.invalid(
            "approvals.webhook.secret_file",
            format!("cannot read {}: {e}", secret_file.display()),
        )
    })?;
    let secret: Vec<u8> = String::from_utf8_lossy(&secret).trim().as_bytes().to_vec();
    if secret.len() < 16 {
        return Err(cx.invalid(
            "approvals.webhook.secret_file",
            "must hold at least 16 characters",
        ));
    }
    let tls = upstream_tls(
        cx,
        Path::new("."),
        "approvals.webhook",
        https,
        &authority,
        &None,
    )?;
    let max_attempts = w.max_attempts.unwrap_or(DEFAULT_WEBHOOK_MAX_ATTEMPTS);
    if max_attempts == 0 || max_attempts > 20 {
        return Err(cx.invalid("approvals.webhook.max_attempts", "must be 1-20"));
    }
    Ok(WebhookConfig {
        url,
        secret: Arc::new(secret),
        tls,
        max_attempts,
        timeout: cx.duration(
            "approvals.webhook.timeout",
            &w.timeout,
            DEFAULT_WEBHOOK_TIMEOUT,
        )?,
        retry_backoff: cx.duration(
            "approvals.webhook.retry_backoff",
            &w.retry_backoff,
            DEFAULT_WEBHOOK_RETRY_BACKOFF,
        )?,
    })
}

/// What the named-rule check needs of one raw rule (taken before the routes are consumed).
pub(in crate::config) struct NamedRaw {
    route_index: usize,
    rule_index: usize,
    name: Option<String>,
    approval: Option<super::super::raw::RawApproval>,
    methods: Vec<String>,
    path: String,
    host: Option<String>,
    permission: Option<String>,
    public: bool,
}

/// The raw rules that carry a `name` or an `approval`.
pub(in crate::config) fn named_raw(routes: &[RawRoute]) -> Vec<NamedRaw> {
    let mut out = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        for (j, rule) in r.rules.iter().enumerate() {
            if rule.name.is_none() && rule.approval.is_none() {
                continue;
            }
            out.push(NamedRaw {
                route_index: i,
                rule_index: j,
                name: rule.name.clone(),
                approval: rule.approval.clone(),
                methods: rule.methods.clone(),
                path: rule.path.clone(),
                host: rule.host.clone(),
                permission: rule.permission.clone(),
                public: rule.public,
            });
        }
    }
    out
}
