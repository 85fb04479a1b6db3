//! `store copy`: everything a store holds, row by row ([`StoreDump`]), and moving it between
//! engines with a read-back check. Each engine reads and writes the rows itself
//! (`sqlite.rs`, `postgres/copy.rs`).
//!
//! Owns: the dump types, [`Store::copy_to`] and the import's emptiness check (`COUNT_ROWS`,
//! `require_empty`). Never imports: `config` or anything outside `store`.

use super::{Backend, Store, StoreError};

/// One account exactly as stored (for `store copy`).
#[derive(Debug, Clone, PartialEq)]
pub struct DumpAccount {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Email.
    pub email: Option<String>,
    /// Created (ms).
    pub created_at: i64,
    /// Creator.
    pub created_by: String,
    /// Disabled (ms).
    pub disabled_at: Option<i64>,
    /// Who disabled it.
    pub disabled_by: Option<String>,
}

/// One token exactly as stored (for `store copy`): the hash, never a plaintext.
#[derive(Debug, Clone, PartialEq)]
pub struct DumpToken {
    /// Id.
    pub id: String,
    /// Account id.
    pub account_id: String,
    /// Label.
    pub name: String,
    /// Display prefix.
    pub display_prefix: String,
    /// SHA-256 of the token (32 bytes).
    pub hash: Vec<u8>,
    /// Role.
    pub role: Option<String>,
    /// Permissions, as stored (JSON).
    pub permissions: String,
    /// Scopes, as stored (JSON).
    pub scopes: String,
    /// CIDRs, as stored (JSON).
    pub allowed_cidrs: String,
    /// Rate override: requests per second.
    pub rate_rps: Option<f64>,
    /// Rate override: burst.
    pub rate_burst: Option<i64>,
    /// Created (ms).
    pub created_at: i64,
    /// Creator.
    pub created_by: String,
    /// Expiry (ms).
    pub expires_at: Option<i64>,
    /// Last use (ms).
    pub last_used_at: Option<i64>,
    /// Last client IP.
    pub last_used_ip: Option<String>,
    /// Revoked (ms).
    pub revoked_at: Option<i64>,
    /// Revoker.
    pub revoked_by: Option<String>,
    /// Why revoked.
    pub revoke_reason: Option<String>,
    /// Rotation predecessor.
    pub rotated_from: Option<String>,
    /// Rotation deadline (ms).
    pub rotation_deadline: Option<i64>,
}

/// One change-log entry exactly as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpChange {
    /// Sequence number.
    pub seq: i64,
    /// Time (ms).
    pub at: i64,
    /// Kind.
    pub kind: String,
    /// Token.
    pub token_id: Option<String>,
    /// Account.
    pub account_id: Option<String>,
}

/// Everything a store holds, row by row, as `store copy` moves it between engines.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoreDump {
    /// Accounts, by id.
    pub accounts: Vec<DumpAccount>,
    /// Tokens, by id.
    pub tokens: Vec<DumpToken>,
    /// The change log, by seq (its high-water mark carries over, so followers never go back).
    pub changes: Vec<DumpChange>,
    /// Queued admin audit events `(id, line)`, by id.
    pub outbox: Vec<(i64, String)>,
}

impl StoreDump {
    /// One line of counts, for messages.
    pub fn summary(&self) -> String {
        format!(
            "{} accounts, {} tokens, {} change-log entries (last seq {}), {} queued audit events",
            self.accounts.len(),
            self.tokens.len(),
            self.changes.len(),
            self.changes.last().map_or(0, |c| c.seq),
            self.outbox.len()
        )
    }
}

/// The select list matching [`DumpToken`], over `tokens`.
pub(crate) const DUMP_TOKEN_COLUMNS: &str = "id, account_id, name, display_prefix, hash, role, permissions, scopes, \
     allowed_cidrs, rate_rps, rate_burst, created_at, created_by, expires_at, last_used_at, last_used_ip, \
     revoked_at, revoked_by, revoke_reason, rotated_from, rotation_deadline";

/// How many rows each table `store copy` fills holds already, on either engine.
pub(crate) const COUNT_ROWS: &str = "SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM tokens), \
     (SELECT count(*) FROM changes), (SELECT count(*) FROM audit_outbox)";

/// An import's first check: refuses `target` unless [`COUNT_ROWS`] found nothing.
pub(crate) fn require_empty(
    target: String,
    counts: (i64, i64, i64, i64),
) -> Result<(), StoreError> {
    if counts == (0, 0, 0, 0) {
        return Ok(());
    }
    Err(StoreError::NotEmpty {
        target,
        what: format!(
            "{} accounts, {} tokens, {} change-log entries, {} queued audit events",
            counts.0, counts.1, counts.2, counts.3
        ),
    })
}

impl Store {
    /// Every row of every table, as stored.
    pub fn export(&self) -> Result<StoreDump, StoreError> {
        on_backend!(self, b => b.export())
    }

    /// Writes `dump` into this store in one transaction; refuses unless the store is empty.
    pub fn import(&self, dump: &StoreDump) -> Result<(), StoreError> {
        on_backend!(self, b => b.import(dump))
    }

    /// Copies everything from `self` into the empty store `dest`, then reads `dest` back and
    /// checks that it holds exactly what was read here. Returns what was copied.
    pub fn copy_to(&self, dest: &Store) -> Result<StoreDump, StoreError> {
        let dump = self.export()?;
        dest.import(&dump)?;
        let back = dest.export()?;
        if back != dump {
            return Err(StoreError::CopyMismatch(format!(
                "wrote {}; read back {}",
                dump.summary(),
                back.summary()
            )));
        }
        self.copy_people_to(dest)?;
        Ok(dump)
    }
}
