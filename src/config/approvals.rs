//! The validated `[admin.mfa]`, `[approvals]` and named-rule settings (issue 19).
//!
//! Owns: [`MfaConfig`], [`ApprovalsConfig`], [`NamedRule`], [`ApprovalPolicy`], [`Approver`],
//! [`WebhookConfig`]. Built by `validate`; read by the pipeline (the approval gate) and the admin
//! side. Never imports: `gateway`, `admin`, `pipeline` or `cli`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::mfa::Sealer;
use crate::tls::UpstreamConnector;

/// How long a TOTP check counts as a step-up for the session it was made in.
pub const DEFAULT_STEP_UP_TTL: Duration = Duration::from_secs(10 * 60);
/// Issuer shown in authenticator apps.
pub const DEFAULT_MFA_ISSUER: &str = "tokengate";
/// How long a pending approval request waits for a decision.
pub const DEFAULT_REQUEST_TTL: Duration = Duration::from_secs(60 * 60);
/// Attempts at delivering one webhook notification.
pub const DEFAULT_WEBHOOK_MAX_ATTEMPTS: u32 = 5;
/// First pause before a webhook retry; doubled after each failed attempt.
pub const DEFAULT_WEBHOOK_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// Deadline of one webhook attempt.
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// `[admin.mfa]`: TOTP step-up for people.
#[derive(Debug, Clone)]
pub struct MfaConfig {
    /// The key file (32 bytes, raw or hex) that seals TOTP secrets at rest.
    pub key_file: PathBuf,
    /// The key, loaded.
    pub sealer: Arc<Sealer>,
    /// Admin mutations through a web session need a fresh step-up.
    pub required_for_admin: bool,
    /// How long a TOTP check counts as a step-up.
    pub step_up_ttl: Duration,
    /// Issuer in the `otpauth://` URI.
    pub issuer: String,
}

/// Who may approve: `role:NAME` or `account:NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approver {
    /// `role:NAME`: the person's sign-in token has role NAME (`role:admin` also matches anyone
    /// holding `tokengate:admin`).
    Role(String),
    /// `account:NAME`: the person's account.
    Account(String),
}

impl std::fmt::Display for Approver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Approver::Role(r) => write!(f, "role:{r}"),
            Approver::Account(a) => write!(f, "account:{a}"),
        }
    }
}

/// A rule's `approval = { window, approvers }`.
#[derive(Debug, Clone)]
pub struct ApprovalPolicy {
    /// How long an approval lasts, from the moment it is given.
    pub window: Duration,
    /// Who may approve.
    pub approvers: Vec<Approver>,
}

/// A rule with a `name`.
#[derive(Debug, Clone)]
pub struct NamedRule {
    /// Its name.
    pub name: String,
    /// The route it belongs to.
    pub route: String,
    /// Its audit id (`route:METHODS path`).
    pub rule_id: String,
    /// Its methods (empty: all).
    pub methods: Vec<String>,
    /// Its path template.
    pub path: String,
    /// The permission it requires.
    pub permission: Option<String>,
    /// The template's capture names: what an approval is bound to.
    pub captures: Vec<String>,
    /// Human approval, when the rule needs it.
    pub approval: Option<ApprovalPolicy>,
}

/// `[approvals.webhook]`.
#[derive(Clone)]
pub struct WebhookConfig {
    /// Where notifications are POSTed.
    pub url: http::Uri,
    /// The HMAC-SHA256 key (from `secret_file`).
    pub secret: Arc<Vec<u8>>,
    /// TLS for an `https://` URL (system roots).
    pub tls: Option<Arc<UpstreamConnector>>,
    /// Attempts per notification.
    pub max_attempts: u32,
    /// Deadline of one attempt.
    pub timeout: Duration,
    /// First pause before a retry (doubled each time, at most 5 minutes).
    pub retry_backoff: Duration,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

/// Named rules and approval settings.
#[derive(Debug, Clone, Default)]
pub struct ApprovalsConfig {
    /// Named rules by name.
    pub rules: BTreeMap<String, Arc<NamedRule>>,
    /// Named rules by audit rule id (the pipeline's key).
    pub by_rule_id: HashMap<String, Arc<NamedRule>>,
    /// How long a pending request waits.
    pub request_ttl: Duration,
    /// Notifications.
    pub webhook: Option<WebhookConfig>,
}

impl ApprovalsConfig {
    /// The approval-gated rule with this audit id, if any.
    pub fn gate(&self, rule_id: &str) -> Option<&Arc<NamedRule>> {
        self.by_rule_id
            .get(rule_id)
            .filter(|r| r.approval.is_some())
    }
}
