//! Audit log (SPEC §7): what an audit line records, and the room's public face.
//!
//! Owns the records ([`RequestRecord`], [`AdminRecord`], [`Entry`]), the audit options type
//! ([`AuditConfig`], [`OnFailure`]) and the errors at the module's boundary. The work is done in:
//! - [`writer`]: the bounded writer thread, its handle ([`AuditLog`]) and reservations;
//! - [`sink`]: where the writer's lines go (file, stdout, test doubles) and the writer lock;
//! - [`line`]: the line format and the hash chain (encode, parse, the tail scan, file names);
//! - [`verify`]: checking a log (or a rotated set) against its chain;
//! - [`reader`]: the operator reader behind `tokengate audit` (query, follow).
//!
//! Never imports `config` (config converts into [`AuditConfig`] at the edge), nor `cli`,
//! `gateway`, `store` or `admin`: audit is a leaf that only uses `clock` and `token::hex`.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

mod line;
mod reader;
mod sink;
mod verify;
mod writer;

pub use crate::clock::now_rfc3339;
pub use line::{GENESIS_CHAIN, ROTATE_KEEP};
pub use reader::{Filter, OutputFormat, follow, parse_time_arg, query};
pub use verify::{VerifyOptions, VerifyProblem, VerifyReport, verify, verify_with};
pub use writer::{AuditLog, Durable, Reservation};

/// Default for [`AuditConfig::queue`]: records accepted but not yet written.
pub const DEFAULT_QUEUE: usize = 65_536;

// ---------------------------------------------------------------------------------------------
// Configuration and records
// ---------------------------------------------------------------------------------------------

/// `audit.on_failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// While the log cannot be written, `reserve` fails and the gateway answers 503.
    #[default]
    Reject,
    /// Keep serving; records wait in memory (up to `queue`), failures are counted and alerted.
    Continue,
}

/// Where and how the audit log is written.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// None = stdout.
    pub path: Option<PathBuf>,
    /// What `reserve` does while the log cannot be written.
    pub on_failure: OnFailure,
    /// Rotate when the file would exceed this many bytes (None = never; logrotate + reopen instead).
    pub max_bytes: Option<u64>,
    /// How many accepted-but-unwritten records may wait (bounded queue). Default 65_536.
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            path: None,
            on_failure: OnFailure::Reject,
            max_bytes: None,
            queue: DEFAULT_QUEUE,
        }
    }
}

/// One request line. Field order here is the order on disk. Option fields serialize as JSON null.
///
/// Callers pass clean values: never a token, an `Authorization` value or a query string. As a
/// safety net (it rejects nothing), the writer cuts `path` at the first `?` or `#` before writing.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RequestRecord {
    /// RFC 3339 UTC with milliseconds ([`now_rfc3339`]); filled in by the writer when empty.
    pub timestamp: String,
    /// The request id also sent upstream as `X-Request-Id`.
    pub request_id: String,
    /// `api_token` | `session` | `none`.
    pub auth_type: Cow<'static, str>,
    /// Id of the token, when one was identified.
    pub api_token_id: Option<String>,
    /// Name (label) of the token, when one was identified.
    pub api_token_name: Option<String>,
    /// Display prefix (`tg_` + 8 chars); also for unknown or revoked tokens with a valid format.
    pub token_prefix: Option<String>,
    /// Account that owns the token.
    pub account: Option<String>,
    /// HTTP method.
    pub method: Cow<'static, str>,
    /// Canonical path, never a query.
    pub path: String,
    /// Status answered to the client. 0 = not known yet: the decision line of a forwarded
    /// request (`phase = "decision"`), where the field is left out; its completion carries it.
    #[serde(default, skip_serializing_if = "status_pending")]
    pub status_code: u16,
    /// `allow` | `deny`.
    pub rbac_decision: Cow<'static, str>,
    /// `ok`, `missing_token`, `malformed`, `bad_checksum`, `unknown_token`, `expired`, `revoked`, ...
    pub reason: Cow<'static, str>,
    /// Permission the matched rule requires.
    pub permission: Option<String>,
    /// The matched rule (route name and template).
    pub rule: Option<String>,
    /// `would_allow` | `would_deny` when a shadow rule was evaluated.
    pub shadow_decision: Option<Cow<'static, str>>,
    /// Client address (TCP peer, or the last untrusted `X-Forwarded-For` hop).
    pub client_ip: String,
    /// `User-Agent` header.
    pub user_agent: Option<String>,
    /// Upstream the request was (or would have been) forwarded to.
    pub upstream: Option<String>,
    /// Time from request start to the response head (a decision line: to the decision), in
    /// milliseconds.
    pub duration_ms: f64,
    /// `proxy` (the public listener proxied or answered it), `forward_auth` (a decision a front
    /// proxy asked for, docs/forward-auth.md); null on the admin listener and in older logs.
    #[serde(default)]
    pub mode: Option<Cow<'static, str>>,
    /// `decision` on the write-ahead line of a forwarded request (written before the upstream
    /// sees a byte; a [`CompletionRecord`] with the same `request_id` follows). Absent on the
    /// single line of a request that was never forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Cow<'static, str>>,
    /// The trace id of a valid W3C `traceparent` the request carried (32 lowercase hex).
    #[serde(default)]
    pub trace_id: Option<String>,
}

fn status_pending(s: &u16) -> bool {
    *s == 0
}

/// The second line of a forwarded request (`"kind":"completion"`): how it ended.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CompletionRecord {
    /// RFC 3339 UTC with milliseconds; filled in by the writer when empty.
    pub timestamp: String,
    /// The `request_id` of the decision line this completes.
    pub request_id: String,
    /// Status answered to the client (499 when the client left before the response head).
    pub status_code: u16,
    /// `ok`, or why the request failed after it was forwarded (`upstream_error`,
    /// `upstream_timeout`, `client_closed`, ...).
    pub reason: Cow<'static, str>,
    /// How the response body ended: `complete`, `upstream_reset` (the upstream cut it),
    /// `client_closed` (the client left mid-body), `upstream_idle` (the upstream stalled past
    /// the body idle timeout), or `none` (the gateway answered itself; no upstream body).
    pub outcome: Cow<'static, str>,
    /// Response body bytes sent to the client.
    pub bytes: u64,
    /// Time from request start to the end of the response body, in milliseconds.
    pub duration_ms: f64,
}

/// One admin action line (token.created, token.revoked, token.rotated, token.identified,
/// account.created, account.disabled, config.reloaded, session.login, ...).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AdminRecord {
    /// RFC 3339 UTC with milliseconds; filled in by the writer when empty.
    pub timestamp: String,
    /// Dotted event name, e.g. `token.revoked`.
    pub event: String,
    /// Who did it: an account name, a token name, or the OS user for the CLI.
    pub actor: String,
    /// `cli` | `api_token` | `session`.
    pub auth_type: String,
    /// What it was done to (token id, account name, config path...).
    pub target: Option<String>,
    /// Account concerned.
    pub account: Option<String>,
    /// Token concerned.
    pub api_token_id: Option<String>,
    /// Display prefix of the token concerned.
    pub token_prefix: Option<String>,
    /// Free-text reason (e.g. the `--reason` of a revoke).
    pub reason: Option<String>,
    /// Client address for admin API / web UI actions.
    pub client_ip: Option<String>,
    /// Event-specific details.
    pub details: Option<serde_json::Value>,
}

/// One audit line; serialized with `"kind":"request"` or `"kind":"admin"` as its first field.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
// Records move once, by value, into the writer's queue: boxing the request record would add an
// allocation per request on the hot path for no gain.
#[allow(clippy::large_enum_variant)]
pub enum Entry {
    /// A request that reached the HTTP layer.
    Request(RequestRecord),
    /// An admin action.
    Admin(AdminRecord),
    /// The completion of a forwarded request whose decision line was written before it.
    Completion(CompletionRecord),
}

impl From<RequestRecord> for Entry {
    fn from(r: RequestRecord) -> Self {
        Entry::Request(r)
    }
}

impl From<AdminRecord> for Entry {
    fn from(r: AdminRecord) -> Self {
        Entry::Admin(r)
    }
}

/// Why the writer cannot accept a record right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnavailableCause {
    /// Writes are failing and `on_failure = "reject"`.
    Failing,
    /// `queue` records are already waiting.
    QueueFull,
}

impl fmt::Display for UnavailableCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnavailableCause::Failing => "the audit log cannot be written",
            UnavailableCause::QueueFull => "the audit queue is full",
        })
    }
}

/// Errors at the audit module's boundary.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log file could not be opened or read at start.
    #[error("cannot open audit log {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Reading a log file failed.
    #[error("cannot read audit log {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The existing file's tail holds no audit record, so the chain cannot be continued.
    #[error("{} does not end with an audit record (nothing found in its last {} MiB); move it aside", path.display(), line::TAIL_SCAN_LIMIT / (1024 * 1024))]
    NotAuditLog {
        /// The file.
        path: PathBuf,
    },
    /// The writer cannot accept a record (the gateway answers 503).
    #[error("audit writer unavailable: {cause}")]
    Unavailable {
        /// Why.
        cause: UnavailableCause,
    },
    /// Another process (a running gateway) is the writer of this log.
    #[error("audit log {} is being written by another tokengate process (lock {} is held); give each gateway process its own audit.path", path.display(), lock.display())]
    InUse {
        /// The log file.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// The writer was shut down.
    #[error("the audit writer is shut down")]
    Closed,
    /// The writer thread could not be started.
    #[error("cannot start the audit writer thread: {0}")]
    Spawn(io::Error),
    /// A `tokengate audit` filter is invalid.
    #[error("invalid filter: {0}")]
    Filter(String),
    /// Writing the reader's output failed (e.g. a closed pipe).
    #[error("cannot write output: {0}")]
    Output(io::Error),
}

/// A method for [`RequestRecord::method`]: the standard ones without allocating.
pub fn method_name(m: &http::Method) -> Cow<'static, str> {
    use http::Method as M;
    Cow::Borrowed(match *m {
        M::GET => "GET",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::HEAD => "HEAD",
        M::OPTIONS => "OPTIONS",
        M::PATCH => "PATCH",
        M::TRACE => "TRACE",
        M::CONNECT => "CONNECT",
        _ => return Cow::Owned(m.as_str().to_owned()),
    })
}

#[cfg(test)]
mod tests;
