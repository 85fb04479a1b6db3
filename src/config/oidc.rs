//! `[admin.oidc]`: signing people in to the web UI with OpenID Connect, and
//! `[admin] session_absolute_timeout`'s default.
//!
//! Owns: the raw section, its validated form [`OidcConfig`] and the check that turns one into the
//! other (the issuer URL, the client secret from a file or an environment variable, the claim
//! mapping, who is an admin). Never imports: `admin`, `gateway`, `store` or `cli`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{RoleConfig, parse_duration};

/// `[admin] session_absolute_timeout`: a web UI session ends this long after sign-in, used or not.
pub const DEFAULT_SESSION_ABSOLUTE_TIMEOUT: Duration = Duration::from_secs(12 * 3600);
/// `[admin.oidc] scopes`.
pub const DEFAULT_OIDC_SCOPES: &[&str] = &["openid", "email", "profile"];
/// `[admin.oidc] groups_claim`.
pub const DEFAULT_GROUPS_CLAIM: &str = "groups";
/// `[admin.oidc] account_claim`.
pub const DEFAULT_ACCOUNT_CLAIM: &str = "email";
/// `[admin.oidc] self_role`.
pub const DEFAULT_SELF_ROLE: &str = "viewer";
/// `[admin.oidc] clock_skew`: leeway on the ID token's `exp`, `iat` and `nbf`.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// `[admin.oidc]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawOidc {
    issuer: Option<String>,
    client_id: Option<String>,
    client_secret_file: Option<PathBuf>,
    client_secret_env: Option<String>,
    redirect_url: Option<String>,
    scopes: Option<Vec<String>>,
    allowed_email_domains: Vec<String>,
    allowed_groups: Vec<String>,
    groups_claim: Option<String>,
    account_claim: Option<String>,
    default_access: Option<String>,
    self_role: Option<String>,
    admin_groups: Vec<String>,
    admin_emails: Vec<String>,
    create_accounts: bool,
    clock_skew: Option<String>,
}

/// A secret read from a file or the environment: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// What a signed-in person may do when no admin rule names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultAccess {
    /// Their own account's tokens, within `self_role` (`tokengate:self` powers).
    OwnAccount,
    /// Nothing: only `admin_groups` / `admin_emails` may sign in.
    None,
}

/// `[admin.oidc]`, checked.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// The provider's issuer URL (exactly as in its ID tokens).
    pub issuer: String,
    /// This gateway's client id at the provider.
    pub client_id: String,
    /// The client secret (None: a public client, PKCE only).
    pub client_secret: Option<Secret>,
    /// Where the provider sends the browser back; None: `<scheme>://<Host>/oidc/callback`.
    pub redirect_url: Option<String>,
    /// Scopes asked for (always with `openid`).
    pub scopes: Vec<String>,
    /// Email domains allowed to sign in (empty: any).
    pub allowed_email_domains: Vec<String>,
    /// Groups allowed to sign in (empty: any).
    pub allowed_groups: Vec<String>,
    /// The claim holding the person's groups.
    pub groups_claim: String,
    /// The claim naming the person's account.
    pub account_claim: String,
    /// What a person who is not an admin may do.
    pub default_access: DefaultAccess,
    /// The role whose permissions bound the tokens a person with own-account access may issue.
    pub self_role: String,
    /// Groups whose members sign in as admins.
    pub admin_groups: Vec<String>,
    /// Emails that sign in as admins.
    pub admin_emails: Vec<String>,
    /// Whether a person's first sign-in creates their account.
    pub create_accounts: bool,
    /// Leeway on the ID token's times.
    pub clock_skew: Duration,
}

/// True for an `http://` URL to a loopback host (allowed for tests and local providers only).
fn loopback_http(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host
        .rsplit_once(':')
        .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
        .map_or(host, |(h, _)| h);
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
}

/// An `https://` URL, or `http://` to a loopback host; no user-info, query or fragment.
pub fn check_provider_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("https://") || loopback_http(url)) {
        return Err("must be an https:// URL (http:// only to 127.0.0.1 or localhost)".into());
    }
    let after = &url[url.find("://").map_or(0, |i| i + 3)..];
    let authority = after.split('/').next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') || url.contains(['?', '#', ' ']) {
        return Err(
            "must be a plain URL: a host, an optional path, no user, query or fragment".into(),
        );
    }
    Ok(())
}

/// Checks `[admin.oidc]` (`roles` are the validated roles, for `self_role`); an error is
/// (key under `admin.oidc`, message).
pub(super) fn oidc(
    base: &Path,
    r: &RawOidc,
    roles: &BTreeMap<String, RoleConfig>,
) -> Result<OidcConfig, (String, String)> {
    let bad = |k: &str, m: String| (format!("admin.oidc.{k}"), m);
    let issuer = r
        .issuer
        .clone()
        .ok_or_else(|| bad("issuer", "is required".into()))?;
    check_provider_url(&issuer).map_err(|m| bad("issuer", m))?;
    let client_id = r
        .client_id
        .clone()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| bad("client_id", "is required".into()))?;
    let client_secret = match (&r.client_secret_file, &r.client_secret_env) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "client_secret_file",
                "set either `client_secret_file` or `client_secret_env`, not both".into(),
            ));
        }
        (Some(f), None) => {
            let p = base.join(f);
            let s = std::fs::read_to_string(&p)
                .map_err(|e| bad("client_secret_file", format!("{}: {e}", p.display())))?;
            let s = s.trim().to_string();
            if s.is_empty() {
                return Err(bad(
                    "client_secret_file",
                    format!("{} is empty", p.display()),
                ));
            }
            Some(Secret(s))
        }
        (None, Some(name)) => match std::env::var(name) {
            Ok(v) if !v.trim().is_empty() => Some(Secret(v.trim().to_string())),
            _ => {
                return Err(bad(
                    "client_secret_env",
                    format!("environment variable `{name}` is not set"),
                ));
            }
        },
        (None, None) => None,
    };
    if let Some(u) = &r.redirect_url {
        check_provider_url(u).map_err(|m| bad("redirect_url", m))?;
        if !u.ends_with("/oidc/callback") {
            return Err(bad(
                "redirect_url",
                "must end with /oidc/callback (the admin listener's callback path)".into(),
            ));
        }
    }
    let scopes = r
        .scopes
        .clone()
        .unwrap_or_else(|| DEFAULT_OIDC_SCOPES.iter().map(|s| s.to_string()).collect());
    if !scopes.iter().any(|s| s == "openid") {
        return Err(bad("scopes", "must include `openid`".into()));
    }
    if let Some(s) = scopes
        .iter()
        .find(|s| s.is_empty() || !s.chars().all(|c| c.is_ascii_graphic()))
    {
        return Err(bad("scopes", format!("`{s}` is not a scope")));
    }
    let default_access = match r.default_access.as_deref().unwrap_or("self") {
        "self" => DefaultAccess::OwnAccount,
        "none" => DefaultAccess::None,
        other => {
            return Err(bad(
                "default_access",
                format!("`{other}`: use \"self\" (own account) or \"none\" (admins only)"),
            ));
        }
    };
    let self_role = r
        .self_role
        .clone()
        .unwrap_or_else(|| DEFAULT_SELF_ROLE.to_string());
    match roles.get(&self_role) {
        None => {
            return Err(bad(
                "self_role",
                format!(
                    "no role `{self_role}`; roles: {}",
                    roles.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        Some(role)
            if role
                .permissions
                .iter()
                .any(|p| p == "*" || p.starts_with("tokengate:")) =>
        {
            return Err(bad(
                "self_role",
                format!(
                    "role `{self_role}` grants admin powers; name a role without `*` or `tokengate:*`"
                ),
            ));
        }
        Some(_) => {}
    }
    let lower = |v: &[String]| v.iter().map(|s| s.trim().to_ascii_lowercase()).collect();
    let allowed_email_domains: Vec<String> = lower(&r.allowed_email_domains);
    if let Some(d) = allowed_email_domains
        .iter()
        .find(|d| d.is_empty() || d.contains('@'))
    {
        return Err(bad(
            "allowed_email_domains",
            format!("`{d}` is not a domain (write `example.com`)"),
        ));
    }
    let claim = |k: &str, v: &Option<String>, d: &str| -> Result<String, (String, String)> {
        let c = v.clone().unwrap_or_else(|| d.to_string());
        if c.is_empty() {
            return Err(bad(k, "must not be empty".into()));
        }
        Ok(c)
    };
    let clock_skew = match &r.clock_skew {
        None => DEFAULT_CLOCK_SKEW,
        Some(s) => parse_duration(s).map_err(|m| bad("clock_skew", m))?,
    };
    if clock_skew > Duration::from_secs(600) {
        return Err(bad("clock_skew", "must be at most 10m".into()));
    }
    Ok(OidcConfig {
        issuer,
        client_id,
        client_secret,
        redirect_url: r.redirect_url.clone(),
        scopes,
        allowed_email_domains,
        allowed_groups: r.allowed_groups.clone(),
        groups_claim: claim("groups_claim", &r.groups_claim, DEFAULT_GROUPS_CLAIM)?,
        account_claim: claim("account_claim", &r.account_claim, DEFAULT_ACCOUNT_CLAIM)?,
        default_access,
        self_role,
        admin_groups: r.admin_groups.clone(),
        admin_emails: lower(&r.admin_emails),
        create_accounts: r.create_accounts,
        clock_skew,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(toml_src: &str) -> RawOidc {
        toml::from_str(toml_src).unwrap()
    }

    #[test]
    fn provider_urls() {
        assert!(check_provider_url("https://accounts.google.com").is_ok());
        assert!(check_provider_url("http://127.0.0.1:8080/realms/x").is_ok());
        assert!(check_provider_url("http://localhost:3000").is_ok());
        assert!(check_provider_url("http://idp.example.com").is_err());
        assert!(check_provider_url("http://127.0.0.1.example.com").is_err());
        assert!(check_provider_url("https://u:p@idp.example.com").is_err());
        assert!(check_provider_url("https://idp.example.com/?x=1").is_err());
    }

    #[test]
    fn section_defaults_and_refusals() {
        let roles = super::super::default_roles();
        let base = Path::new("/");
        let c = oidc(
            base,
            &raw("issuer = \"https://idp.example.com\"\nclient_id = \"tg\""),
            &roles,
        )
        .unwrap();
        assert_eq!(c.scopes, ["openid", "email", "profile"]);
        assert_eq!(c.default_access, DefaultAccess::OwnAccount);
        assert_eq!(
            (c.self_role.as_str(), c.account_claim.as_str()),
            ("viewer", "email")
        );
        assert!(!c.create_accounts && c.client_secret.is_none());
        for (src, key) in [
            ("client_id = \"tg\"", "admin.oidc.issuer"),
            (
                "issuer = \"http://idp.example.com\"\nclient_id = \"x\"",
                "admin.oidc.issuer",
            ),
            ("issuer = \"https://i\"", "admin.oidc.client_id"),
            (
                "issuer = \"https://i\"\nclient_id = \"x\"\nscopes = [\"email\"]",
                "admin.oidc.scopes",
            ),
            (
                "issuer = \"https://i\"\nclient_id = \"x\"\nself_role = \"admin\"",
                "admin.oidc.self_role",
            ),
            (
                "issuer = \"https://i\"\nclient_id = \"x\"\nself_role = \"nope\"",
                "admin.oidc.self_role",
            ),
            (
                "issuer = \"https://i\"\nclient_id = \"x\"\ndefault_access = \"all\"",
                "admin.oidc.default_access",
            ),
            (
                "issuer = \"https://i\"\nclient_id = \"x\"\nclient_secret_env = \"TG_TEST_UNSET_VAR_9\"",
                "admin.oidc.client_secret_env",
            ),
            (
                "issuer = \"https://i\"\nclient_id = \"x\"\nallowed_email_domains = [\"@x.com\"]",
                "admin.oidc.allowed_email_domains",
            ),
            (
                "issuer = \"https://i\"\nclient_id = \"x\"\nredirect_url = \"https://gw/cb\"",
                "admin.oidc.redirect_url",
            ),
        ] {
            assert_eq!(oidc(base, &raw(src), &roles).unwrap_err().0, key, "{src}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
        let c = oidc(
            dir.path(),
            &raw("issuer = \"https://i\"\nclient_id = \"x\"\nclient_secret_file = \"secret\""),
            &roles,
        )
        .unwrap();
        assert_eq!(c.client_secret, Some(Secret("s3cret".into())));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "the secret is never printed"
        );
    }
}
