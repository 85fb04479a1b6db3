//! SQLite store (SPEC §6): accounts, tokens (hashes only), and a change log other processes poll.
//!
//! Every call here blocks; async code reaches it through `tokio::task::spawn_blocking`
//! (see `Gateway::store_call`). Writes use `BEGIN IMMEDIATE` on one writer connection; reads use a
//! small pool of reader connections so a slow write never stalls a cache miss (WAL mode).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use ipnet::IpNet;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior, params};
use serde::Serialize;

use crate::config::Rate;
use crate::token::{self, NewToken, TokenHash};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: accounts, tokens, change log.
    "CREATE TABLE accounts (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        email TEXT,
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        disabled_at INTEGER,
        disabled_by TEXT
    );
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts(id),
        name TEXT NOT NULL,
        display_prefix TEXT NOT NULL,
        hash BLOB NOT NULL CHECK (length(hash) = 32),
        role TEXT,
        permissions TEXT NOT NULL,
        scopes TEXT NOT NULL,
        allowed_cidrs TEXT NOT NULL,
        rate_rps REAL,
        rate_burst INTEGER,
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        expires_at INTEGER,
        last_used_at INTEGER,
        last_used_ip TEXT,
        revoked_at INTEGER,
        revoked_by TEXT,
        revoke_reason TEXT,
        rotated_from TEXT REFERENCES tokens(id),
        rotation_deadline INTEGER
    );
    CREATE UNIQUE INDEX tokens_hash ON tokens(hash);
    CREATE INDEX tokens_account ON tokens(account_id, revoked_at);
    CREATE INDEX tokens_prefix ON tokens(display_prefix);
    CREATE TABLE changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        token_id TEXT,
        account_id TEXT
    );",
    // 2: admin audit events written by the CLI while a gateway owns the audit log; the gateway
    // moves them into the log (a transactional outbox).
    "CREATE TABLE audit_outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        line TEXT NOT NULL
    );",
];

/// Milliseconds since the Unix epoch, from the system clock.
pub fn system_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed (file unreadable, busy past the timeout, corrupt...).
    #[error("store error on {path}: {source}")]
    Sqlite {
        /// Database file.
        path: PathBuf,
        /// Cause.
        source: rusqlite::Error,
    },
    /// The schema is newer than this binary.
    #[error("{path} has schema version {found}, newer than this tokengate ({known}); upgrade tokengate")]
    TooNew {
        /// Database file.
        path: PathBuf,
        /// Version in the file.
        found: i64,
        /// Latest version known.
        known: i64,
    },
    /// No such account.
    #[error("no account named `{0}`; list them with `tokengate account list`")]
    NoAccount(String),
    /// Account exists.
    #[error("an account named `{0}` already exists")]
    AccountExists(String),
    /// Account disabled.
    #[error("account `{0}` is disabled")]
    AccountDisabled(String),
    /// No such token.
    #[error("no token with id or prefix `{0}`; list them with `tokengate token list --all`")]
    NoToken(String),
    /// The id/prefix matches several tokens.
    #[error("`{0}` matches several tokens; use the token id")]
    Ambiguous(String),
    /// Token already revoked.
    #[error("token {0} is already revoked")]
    AlreadyRevoked(String),
    /// Per-account cap reached.
    #[error(
        "account `{account}` already has {limit} active tokens, the limit (tokens.max_active_per_account):\n{list}\nrevoke one with `tokengate token revoke <ID>` and try again"
    )]
    CapReached {
        /// Account name.
        account: String,
        /// The limit.
        limit: u32,
        /// The active tokens, one per line.
        list: String,
    },
    /// Stored JSON column is corrupt.
    #[error("corrupt stored value in {column}: {message}")]
    Corrupt {
        /// Column.
        column: &'static str,
        /// Detail.
        message: String,
    },
}

/// An account.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Account {
    /// Id (`acc_...`).
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Optional email.
    pub email: Option<String>,
    /// Creation time (ms).
    pub created_at: i64,
    /// Who created it.
    pub created_by: String,
    /// When disabled (ms).
    pub disabled_at: Option<i64>,
}

/// A stored token (never the plaintext).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenRow {
    /// Id (`tok_...`).
    pub id: String,
    /// Owning account id.
    pub account_id: String,
    /// Owning account name.
    pub account: String,
    /// Human label.
    pub name: String,
    /// Display prefix (`tg_` + 8 chars).
    pub prefix: String,
    /// Role the permissions were expanded from (informational).
    pub role: Option<String>,
    /// Explicit permission list.
    pub permissions: Vec<String>,
    /// Scopes on captured names.
    pub scopes: BTreeMap<String, Vec<String>>,
    /// Client CIDRs allowed (empty = any).
    pub allowed_cidrs: Vec<IpNet>,
    /// Rate-limit override.
    pub rate: Option<RateOverride>,
    /// Created (ms).
    pub created_at: i64,
    /// Creator.
    pub created_by: String,
    /// Expiry (ms), None = never.
    pub expires_at: Option<i64>,
    /// Last use (ms), flushed in batches.
    pub last_used_at: Option<i64>,
    /// Last client IP.
    pub last_used_ip: Option<String>,
    /// Revoked (ms).
    pub revoked_at: Option<i64>,
    /// Revoker.
    pub revoked_by: Option<String>,
    /// Why revoked.
    pub revoke_reason: Option<String>,
    /// Predecessor in a rotation.
    pub rotated_from: Option<String>,
    /// When this token (the old one of a rotation) stops working at the latest.
    pub rotation_deadline: Option<i64>,
    /// When the owning account was disabled.
    pub account_disabled_at: Option<i64>,
}

/// Serializable rate override.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct RateOverride {
    /// Sustained rate.
    pub requests_per_second: f64,
    /// Burst.
    pub burst: u32,
}

impl From<Rate> for RateOverride {
    fn from(r: Rate) -> Self {
        RateOverride {
            requests_per_second: r.requests_per_second,
            burst: r.burst,
        }
    }
}

impl TokenRow {
    /// Active = not revoked, not expired, not past a rotation deadline, account enabled.
    pub fn is_active(&self, now: i64) -> bool {
        self.revoked_at.is_none()
            && self.account_disabled_at.is_none()
            && self.expires_at.is_none_or(|e| e > now)
            && self.rotation_deadline.is_none_or(|d| d > now)
    }
    /// Status word for listings.
    pub fn status(&self, now: i64) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.account_disabled_at.is_some() {
            "disabled"
        } else if self.expires_at.is_some_and(|e| e <= now) {
            "expired"
        } else if self.rotation_deadline.is_some_and(|d| d <= now) {
            "rotated"
        } else {
            "active"
        }
    }
}

/// What to create.
#[derive(Debug, Clone)]
pub struct NewTokenSpec {
    /// Account name or id.
    pub account: String,
    /// Label.
    pub name: String,
    /// Role (informational).
    pub role: Option<String>,
    /// Expanded permissions.
    pub permissions: Vec<String>,
    /// Scopes.
    pub scopes: BTreeMap<String, Vec<String>>,
    /// CIDRs.
    pub allowed_cidrs: Vec<IpNet>,
    /// Rate override.
    pub rate: Option<RateOverride>,
    /// Expiry (ms) or None.
    pub expires_at: Option<i64>,
    /// Creator.
    pub created_by: String,
}

/// A change another process must apply to its cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Sequence number.
    pub seq: i64,
    /// `revoke`, `rotate`, `account_disable`, `update`.
    pub kind: String,
    /// Affected token.
    pub token_id: Option<String>,
    /// Affected account.
    pub account_id: Option<String>,
}

/// Last-use data for one token.
#[derive(Debug, Clone)]
pub struct LastUsed {
    /// Token id.
    pub token_id: String,
    /// Time (ms).
    pub at: i64,
    /// Client IP.
    pub ip: String,
}

/// Hook run inside `lookup_hash` after the read, before returning: lets tests widen race windows.
pub type LookupHook = Arc<dyn Fn() + Send + Sync>;

/// Handle to the SQLite store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    path: PathBuf,
    busy_timeout: Duration,
    /// The single writer. A std Mutex: held only inside blocking code, never across `.await`.
    writer: Mutex<Connection>,
    /// Idle reader connections; a reader is taken out for one query and put back.
    readers: Mutex<Vec<Connection>>,
    lookups: AtomicU64,
    writes: AtomicU64,
    lookup_hook: ArcSwapOption<LookupHookBox>,
}

struct LookupHookBox(LookupHook);

const TOKEN_COLUMNS: &str = "t.id, t.account_id, a.name, t.name, t.display_prefix, t.role, t.permissions, t.scopes, \
     t.allowed_cidrs, t.rate_rps, t.rate_burst, t.created_at, t.created_by, t.expires_at, t.last_used_at, \
     t.last_used_ip, t.revoked_at, t.revoked_by, t.revoke_reason, t.rotated_from, t.rotation_deadline, a.disabled_at";

impl Store {
    /// Opens (creating if needed) the database, applies migrations and pragmas.
    pub fn open(path: &Path, busy_timeout: Duration) -> Result<Store, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let writer = open_conn(path, busy_timeout, true).map_err(err)?;
        migrate(&writer, path)?;
        let inner = StoreInner {
            path: path.to_path_buf(),
            busy_timeout,
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
            lookups: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            lookup_hook: ArcSwapOption::empty(),
        };
        Ok(Store { inner: Arc::new(inner) })
    }

    /// Database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            path: self.inner.path.clone(),
            source,
        }
    }

    /// Number of token lookups by hash so far (cache misses reaching SQLite).
    pub fn lookup_count(&self) -> u64 {
        self.inner.lookups.load(Ordering::Relaxed)
    }

    /// Number of write transactions so far.
    pub fn write_count(&self) -> u64 {
        self.inner.writes.load(Ordering::Relaxed)
    }

    /// Installs (or clears) a hook run during `lookup_hash` (tests use it to slow reads down).
    #[doc(hidden)]
    pub fn set_lookup_hook(&self, hook: Option<LookupHook>) {
        self.inner.lookup_hook.store(hook.map(|h| Arc::new(LookupHookBox(h))));
    }

    fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let conn = self.inner.readers.lock().expect("reader pool poisoned").pop();
        let conn = match conn {
            Some(c) => c,
            None => open_conn(&self.inner.path, self.inner.busy_timeout, false).map_err(self.err())?,
        };
        let out = f(&conn);
        let mut pool = self.inner.readers.lock().expect("reader pool poisoned");
        if pool.len() < 8 {
            pool.push(conn);
        }
        out
    }

    fn write<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut conn = self.inner.writer.lock().expect("writer poisoned");
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.err())?;
        let out = f(&tx)?;
        tx.commit().map_err(self.err())?;
        self.inner.writes.fetch_add(1, Ordering::Relaxed);
        Ok(out)
    }

    /// Runs a read-only check that the file is readable (used at start and by `/readyz`).
    pub fn ping(&self) -> Result<(), StoreError> {
        self.with_reader(|c| {
            c.query_row("SELECT count(*) FROM accounts", [], |_| Ok(()))
                .map_err(self.err())
        })
    }

    // ------------------------------------------------------------ accounts

    /// Creates an account.
    pub fn create_account(&self, name: &str, email: Option<&str>, actor: &str, now: i64) -> Result<Account, StoreError> {
        self.write(|tx| {
            let exists: Option<String> = tx
                .query_row("SELECT id FROM accounts WHERE name = ?1", [name], |r| r.get(0))
                .optional()
                .map_err(self.err())?;
            if exists.is_some() {
                return Err(StoreError::AccountExists(name.to_string()));
            }
            let acc = Account {
                id: token::new_id("acc"),
                name: name.to_string(),
                email: email.map(str::to_string),
                created_at: now,
                created_by: actor.to_string(),
                disabled_at: None,
            };
            tx.execute(
                "INSERT INTO accounts (id, name, email, created_at, created_by) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![acc.id, acc.name, acc.email, acc.created_at, acc.created_by],
            )
            .map_err(self.err())?;
            Ok(acc)
        })
    }

    /// All accounts, by name.
    pub fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        self.with_reader(|c| {
            let mut st = c
                .prepare("SELECT id, name, email, created_at, created_by, disabled_at FROM accounts ORDER BY name")
                .map_err(self.err())?;
            let rows = st.query_map([], account_from_row).map_err(self.err())?;
            rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
        })
    }

    /// Finds an account by name or id.
    pub fn get_account(&self, name_or_id: &str) -> Result<Account, StoreError> {
        self.with_reader(|c| find_account(c, name_or_id).map_err(self.err()))?
            .ok_or_else(|| StoreError::NoAccount(name_or_id.to_string()))
    }

    /// Disables an account: every one of its tokens is rejected from now on.
    pub fn disable_account(&self, name_or_id: &str, actor: &str, now: i64) -> Result<Account, StoreError> {
        self.write(|tx| {
            let mut acc = find_account(tx, name_or_id)
                .map_err(self.err())?
                .ok_or_else(|| StoreError::NoAccount(name_or_id.to_string()))?;
            if acc.disabled_at.is_some() {
                return Err(StoreError::AccountDisabled(acc.name));
            }
            tx.execute(
                "UPDATE accounts SET disabled_at = ?1, disabled_by = ?2 WHERE id = ?3",
                params![now, actor, acc.id],
            )
            .map_err(self.err())?;
            record_change(tx, now, "account_disable", None, Some(&acc.id)).map_err(self.err())?;
            acc.disabled_at = Some(now);
            Ok(acc)
        })
    }

    // ------------------------------------------------------------ tokens

    /// Creates a token in one transaction; the plaintext is returned only after COMMIT.
    pub fn create_token(
        &self,
        spec: &NewTokenSpec,
        prefix: &str,
        max_active: u32,
        now: i64,
    ) -> Result<(TokenRow, NewToken), StoreError> {
        let new = token::generate(prefix);
        let id = self.write(|tx| {
            let acc = find_account(tx, &spec.account)
                .map_err(self.err())?
                .ok_or_else(|| StoreError::NoAccount(spec.account.clone()))?;
            if acc.disabled_at.is_some() {
                return Err(StoreError::AccountDisabled(acc.name));
            }
            let active = active_tokens(tx, &acc.id, now).map_err(self.err())?;
            if active.len() as u32 >= max_active {
                let list = active
                    .iter()
                    .map(|(id, name, prefix)| format!("  {id}  {prefix}  {name}"))
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(StoreError::CapReached {
                    account: acc.name,
                    limit: max_active,
                    list,
                });
            }
            let id = token::new_id("tok");
            insert_token(tx, &id, &acc.id, spec, &new, None, now).map_err(self.err())?;
            Ok(id)
        })?;
        let row = self.get_token(&id)?;
        Ok((row, new))
    }

    /// Looks a token up by its hash (the request path on a cache miss).
    pub fn lookup_hash(&self, hash: &TokenHash) -> Result<Option<TokenRow>, StoreError> {
        self.inner.lookups.fetch_add(1, Ordering::Relaxed);
        let row = self.with_reader(|c| {
            let sql = format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens t JOIN accounts a ON a.id = t.account_id WHERE t.hash = ?1"
            );
            let mut st = c.prepare_cached(&sql).map_err(self.err())?;
            st.query_row([&hash[..]], token_from_row)
                .optional()
                .map_err(self.err())?
                .transpose()
        })?;
        if let Some(h) = self.inner.lookup_hook.load_full() {
            (h.0)();
        }
        Ok(row)
    }

    /// A token by exact id.
    pub fn get_token(&self, id: &str) -> Result<TokenRow, StoreError> {
        self.find_token(id)
    }

    /// A token by id or display prefix (or a unique beginning of either).
    pub fn find_token(&self, id_or_prefix: &str) -> Result<TokenRow, StoreError> {
        let rows = self.with_reader(|c| {
            let sql = format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens t JOIN accounts a ON a.id = t.account_id \
                 WHERE t.id = ?1 OR t.display_prefix = ?1 \
                    OR (length(?1) >= 6 AND (substr(t.id, 1, length(?1)) = ?1 OR substr(t.display_prefix, 1, length(?1)) = ?1)) \
                 LIMIT 3"
            );
            let mut st = c.prepare(&sql).map_err(self.err())?;
            let rows = st.query_map([id_or_prefix], token_from_row).map_err(self.err())?;
            let mut out = Vec::new();
            for r in rows {
                out.push(r.map_err(self.err())??);
            }
            Ok(out)
        })?;
        // An exact match wins over longer prefix matches.
        if let Some(exact) = rows.iter().find(|r| r.id == id_or_prefix || r.prefix == id_or_prefix) {
            let n = rows.iter().filter(|r| r.id == id_or_prefix || r.prefix == id_or_prefix).count();
            if n == 1 {
                return Ok(exact.clone());
            }
        }
        match rows.len() {
            0 => Err(StoreError::NoToken(id_or_prefix.to_string())),
            1 => Ok(rows.into_iter().next().expect("one")),
            _ => Err(StoreError::Ambiguous(id_or_prefix.to_string())),
        }
    }

    /// Tokens, newest first; revoked/expired ones only with `include_inactive`.
    pub fn list_tokens(&self, account: Option<&str>, include_inactive: bool, now: i64) -> Result<Vec<TokenRow>, StoreError> {
        let account_id = match account {
            Some(a) => Some(self.get_account(a)?.id),
            None => None,
        };
        let rows = self.with_reader(|c| {
            let sql = format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens t JOIN accounts a ON a.id = t.account_id \
                 WHERE (?1 IS NULL OR t.account_id = ?1) ORDER BY t.created_at DESC, t.id"
            );
            let mut st = c.prepare(&sql).map_err(self.err())?;
            let rows = st.query_map([&account_id], token_from_row).map_err(self.err())?;
            let mut out = Vec::new();
            for r in rows {
                out.push(r.map_err(self.err())??);
            }
            Ok(out)
        })?;
        Ok(rows
            .into_iter()
            .filter(|r| include_inactive || r.is_active(now))
            .collect())
    }

    /// Revokes a token (soft delete) and logs the change for other processes.
    pub fn revoke(&self, id: &str, actor: &str, reason: &str, now: i64) -> Result<TokenRow, StoreError> {
        self.write(|tx| {
            let n = tx
                .execute(
                    "UPDATE tokens SET revoked_at = ?1, revoked_by = ?2, revoke_reason = ?3 WHERE id = ?4 AND revoked_at IS NULL",
                    params![now, actor, reason, id],
                )
                .map_err(self.err())?;
            if n == 0 {
                let exists: Option<i64> = tx
                    .query_row("SELECT 1 FROM tokens WHERE id = ?1", [id], |r| r.get(0))
                    .optional()
                    .map_err(self.err())?;
                return Err(match exists {
                    Some(_) => StoreError::AlreadyRevoked(id.to_string()),
                    None => StoreError::NoToken(id.to_string()),
                });
            }
            record_change(tx, now, "revoke", Some(id), None).map_err(self.err())?;
            Ok(())
        })?;
        self.get_token(id)
    }

    /// Revokes the predecessor of a rotation once its successor is used (idempotent).
    pub fn retire_rotated(&self, old_id: &str, now: i64) -> Result<bool, StoreError> {
        self.write(|tx| {
            let n = tx
                .execute(
                    "UPDATE tokens SET revoked_at = ?1, revoked_by = 'tokengate', revoke_reason = 'rotated' \
                     WHERE id = ?2 AND revoked_at IS NULL",
                    params![now, old_id],
                )
                .map_err(self.err())?;
            if n > 0 {
                record_change(tx, now, "revoke", Some(old_id), None).map_err(self.err())?;
            }
            Ok(n > 0)
        })
    }

    /// Rotates: a new token with the same account, permissions, scopes and limits; the old one
    /// keeps working until the new one is used or `now + grace_ms`, whichever comes first.
    /// The cap is not applied: the old token's slot is handed over.
    pub fn rotate(&self, id: &str, actor: &str, grace_ms: i64, prefix: &str, now: i64) -> Result<(TokenRow, NewToken), StoreError> {
        let old = self.find_token(id)?;
        if !old.is_active(now) {
            return Err(StoreError::AlreadyRevoked(old.id));
        }
        let new = token::generate(prefix);
        let new_id = self.write(|tx| {
            let still: Option<i64> = tx
                .query_row(
                    "SELECT 1 FROM tokens WHERE id = ?1 AND revoked_at IS NULL",
                    [&old.id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(self.err())?;
            if still.is_none() {
                return Err(StoreError::AlreadyRevoked(old.id.clone()));
            }
            let spec = NewTokenSpec {
                account: old.account_id.clone(),
                name: old.name.clone(),
                role: old.role.clone(),
                permissions: old.permissions.clone(),
                scopes: old.scopes.clone(),
                allowed_cidrs: old.allowed_cidrs.clone(),
                rate: old.rate,
                expires_at: old.expires_at.map(|e| now + (e - old.created_at)),
                created_by: actor.to_string(),
            };
            let new_id = token::new_id("tok");
            insert_token(tx, &new_id, &old.account_id, &spec, &new, Some(&old.id), now).map_err(self.err())?;
            let deadline = now + grace_ms;
            tx.execute(
                "UPDATE tokens SET rotation_deadline = min(coalesce(rotation_deadline, ?1), ?1) WHERE id = ?2",
                params![deadline, old.id],
            )
            .map_err(self.err())?;
            record_change(tx, now, "rotate", Some(&old.id), None).map_err(self.err())?;
            Ok(new_id)
        })?;
        Ok((self.get_token(&new_id)?, new))
    }

    /// Writes a batch of last-use data in one transaction; only ever moves `last_used_at` forward.
    pub fn flush_last_used(&self, batch: &[LastUsed]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let mut st = tx
                .prepare_cached(
                    "UPDATE tokens SET last_used_at = ?1, last_used_ip = ?2 \
                     WHERE id = ?3 AND (last_used_at IS NULL OR last_used_at < ?1)",
                )
                .map_err(self.err())?;
            for u in batch {
                st.execute(params![u.at, u.ip, u.token_id]).map_err(self.err())?;
            }
            Ok(())
        })
    }

    /// Highest change sequence number (0 when none).
    pub fn last_change_seq(&self) -> Result<i64, StoreError> {
        self.with_reader(|c| {
            c.query_row("SELECT coalesce(max(seq), 0) FROM changes", [], |r| r.get(0))
                .map_err(self.err())
        })
    }

    /// Changes after `seq`, oldest first.
    pub fn changes_since(&self, seq: i64) -> Result<Vec<Change>, StoreError> {
        self.with_reader(|c| {
            let mut st = c
                .prepare_cached("SELECT seq, kind, token_id, account_id FROM changes WHERE seq > ?1 ORDER BY seq LIMIT 10000")
                .map_err(self.err())?;
            let rows = st
                .query_map([seq], |r| {
                    Ok(Change {
                        seq: r.get(0)?,
                        kind: r.get(1)?,
                        token_id: r.get(2)?,
                        account_id: r.get(3)?,
                    })
                })
                .map_err(self.err())?;
            rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
        })
    }

    /// Tokens that are active now, and those expiring before `before` (for metrics).
    pub fn count_active(&self, now: i64, expiring_before: i64) -> Result<(u64, u64), StoreError> {
        self.with_reader(|c| {
            c.query_row(
                "SELECT count(*), coalesce(sum(t.expires_at IS NOT NULL AND t.expires_at < ?2), 0) \
                 FROM tokens t JOIN accounts a ON a.id = t.account_id \
                 WHERE t.revoked_at IS NULL AND a.disabled_at IS NULL \
                   AND (t.expires_at IS NULL OR t.expires_at > ?1) \
                   AND (t.rotation_deadline IS NULL OR t.rotation_deadline > ?1)",
                params![now, expiring_before],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .map_err(self.err())
        })
    }

    /// Queues an admin audit record (JSON) for the process that owns the audit log.
    pub fn outbox_push(&self, json: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute("INSERT INTO audit_outbox (line) VALUES (?1)", [json])
                .map_err(self.err())?;
            Ok(())
        })
    }

    /// Oldest queued admin audit records, with their ids.
    pub fn outbox_peek(&self, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        self.with_reader(|c| {
            let mut st = c
                .prepare_cached("SELECT id, line FROM audit_outbox ORDER BY id LIMIT ?1")
                .map_err(self.err())?;
            let rows = st
                .query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(self.err())?;
            rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
        })
    }

    /// Deletes queued records up to and including `id`.
    pub fn outbox_ack(&self, id: i64) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute("DELETE FROM audit_outbox WHERE id <= ?1", [id])
                .map_err(self.err())?;
            Ok(())
        })
    }

    /// `PRAGMA integrity_check`; Ok(()) when it says "ok".
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        self.with_reader(|c| {
            c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
                .map_err(self.err())
        })
    }

    /// Online backup to `dest` through SQLite's backup API.
    pub fn backup(&self, dest: &Path) -> Result<(), StoreError> {
        self.with_reader(|c| {
            c.backup(rusqlite::MAIN_DB, dest, None::<fn(rusqlite::backup::Progress)>)
                .map_err(self.err())
        })
    }
}

fn open_conn(path: &Path, busy: Duration, create: bool) -> rusqlite::Result<Connection> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let c = Connection::open_with_flags(path, flags)?;
    c.busy_timeout(busy)?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "FULL")?;
    c.pragma_update(None, "foreign_keys", "ON")?;
    Ok(c)
}

fn migrate(c: &Connection, path: &Path) -> Result<(), StoreError> {
    let err = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(err)?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        c.execute_batch(&format!(
            "BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {}; COMMIT;",
            i + 1
        ))
        .map_err(|source| {
            let _ = c.execute_batch("ROLLBACK");
            err(source)
        })?;
    }
    Ok(())
}

fn record_change(tx: &Connection, now: i64, kind: &str, token_id: Option<&str>, account_id: Option<&str>) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO changes (at, kind, token_id, account_id) VALUES (?1, ?2, ?3, ?4)",
        params![now, kind, token_id, account_id],
    )?;
    Ok(())
}

fn find_account(c: &Connection, name_or_id: &str) -> rusqlite::Result<Option<Account>> {
    c.query_row(
        "SELECT id, name, email, created_at, created_by, disabled_at FROM accounts WHERE name = ?1 OR id = ?1",
        [name_or_id],
        account_from_row,
    )
    .optional()
}

fn active_tokens(c: &Connection, account_id: &str, now: i64) -> rusqlite::Result<Vec<(String, String, String)>> {
    let mut st = c.prepare(
        "SELECT id, name, display_prefix FROM tokens WHERE account_id = ?1 AND revoked_at IS NULL \
         AND (expires_at IS NULL OR expires_at > ?2) AND (rotation_deadline IS NULL OR rotation_deadline > ?2) \
         ORDER BY created_at",
    )?;
    let rows = st.query_map(params![account_id, now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    rows.collect()
}

fn insert_token(
    tx: &Connection,
    id: &str,
    account_id: &str,
    spec: &NewTokenSpec,
    new: &NewToken,
    rotated_from: Option<&str>,
    now: i64,
) -> rusqlite::Result<()> {
    let perms = serde_json::to_string(&spec.permissions).expect("serializable");
    let scopes = serde_json::to_string(&spec.scopes).expect("serializable");
    let cidrs = serde_json::to_string(&spec.allowed_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>())
        .expect("serializable");
    tx.execute(
        "INSERT INTO tokens (id, account_id, name, display_prefix, hash, role, permissions, scopes, allowed_cidrs, \
         rate_rps, rate_burst, created_at, created_by, expires_at, rotated_from) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        params![
            id,
            account_id,
            spec.name,
            new.display_prefix,
            &new.hash[..],
            spec.role,
            perms,
            scopes,
            cidrs,
            spec.rate.map(|r| r.requests_per_second),
            spec.rate.map(|r| r.burst),
            now,
            spec.created_by,
            spec.expires_at,
            rotated_from,
        ],
    )?;
    Ok(())
}

fn account_from_row(r: &Row<'_>) -> rusqlite::Result<Account> {
    Ok(Account {
        id: r.get(0)?,
        name: r.get(1)?,
        email: r.get(2)?,
        created_at: r.get(3)?,
        created_by: r.get(4)?,
        disabled_at: r.get(5)?,
    })
}

fn token_from_row(r: &Row<'_>) -> rusqlite::Result<Result<TokenRow, StoreError>> {
    let perms: String = r.get(6)?;
    let scopes: String = r.get(7)?;
    let cidrs: String = r.get(8)?;
    let rps: Option<f64> = r.get(9)?;
    let burst: Option<u32> = r.get(10)?;
    let corrupt = |column, e: serde_json::Error| StoreError::Corrupt {
        column,
        message: e.to_string(),
    };
    let permissions = match serde_json::from_str(&perms) {
        Ok(p) => p,
        Err(e) => return Ok(Err(corrupt("permissions", e))),
    };
    let scopes = match serde_json::from_str(&scopes) {
        Ok(p) => p,
        Err(e) => return Ok(Err(corrupt("scopes", e))),
    };
    let cidr_strings: Vec<String> = match serde_json::from_str(&cidrs) {
        Ok(p) => p,
        Err(e) => return Ok(Err(corrupt("allowed_cidrs", e))),
    };
    let mut allowed_cidrs = Vec::with_capacity(cidr_strings.len());
    for c in cidr_strings {
        match c.parse() {
            Ok(n) => allowed_cidrs.push(n),
            Err(_) => {
                return Ok(Err(StoreError::Corrupt {
                    column: "allowed_cidrs",
                    message: format!("`{c}` is not a CIDR"),
                }));
            }
        }
    }
    Ok(Ok(TokenRow {
        id: r.get(0)?,
        account_id: r.get(1)?,
        account: r.get(2)?,
        name: r.get(3)?,
        prefix: r.get(4)?,
        role: r.get(5)?,
        permissions,
        scopes,
        allowed_cidrs,
        rate: match (rps, burst) {
            (Some(requests_per_second), Some(burst)) => Some(RateOverride {
                requests_per_second,
                burst,
            }),
            _ => None,
        },
        created_at: r.get(11)?,
        created_by: r.get(12)?,
        expires_at: r.get(13)?,
        last_used_at: r.get(14)?,
        last_used_ip: r.get(15)?,
        revoked_at: r.get(16)?,
        revoked_by: r.get(17)?,
        revoke_reason: r.get(18)?,
        rotated_from: r.get(19)?,
        rotation_deadline: r.get(20)?,
        account_disabled_at: r.get(21)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(account: &str, name: &str) -> NewTokenSpec {
        NewTokenSpec {
            account: account.into(),
            name: name.into(),
            role: Some("viewer".into()),
            permissions: vec!["apps:read".into()],
            scopes: BTreeMap::from([("app".to_string(), vec!["billing".to_string()])]),
            allowed_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            rate: Some(RateOverride {
                requests_per_second: 5.0,
                burst: 7,
            }),
            expires_at: None,
            created_by: "test".into(),
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("t.db"), Duration::from_millis(250)).unwrap();
        (dir, s)
    }

    #[test]
    fn create_lookup_revoke_round_trip() {
        let (_d, s) = open();
        s.create_account("ci", None, "test", 1).unwrap();
        let (row, new) = s.create_token(&spec("ci", "deploy"), "tg", 5, 10).unwrap();
        let found = s.lookup_hash(&new.hash).unwrap().unwrap();
        assert_eq!(found, row);
        assert_eq!(found.scopes["app"], vec!["billing"]);
        assert_eq!(found.rate.unwrap().burst, 7);
        assert_eq!(s.find_token(&row.prefix).unwrap().id, row.id);
        let before = s.last_change_seq().unwrap();
        let r = s.revoke(&row.id, "test", "leaked", 20).unwrap();
        assert_eq!(r.revoked_at, Some(20));
        assert!(matches!(s.revoke(&row.id, "t", "x", 21), Err(StoreError::AlreadyRevoked(_))));
        let ch = s.changes_since(before).unwrap();
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].token_id.as_deref(), Some(row.id.as_str()));
    }

    #[test]
    fn cap_names_limit_and_lists_tokens() {
        let (_d, s) = open();
        s.create_account("ci", None, "test", 1).unwrap();
        for i in 0..2 {
            s.create_token(&spec("ci", &format!("t{i}")), "tg", 2, 10).unwrap();
        }
        let e = s.create_token(&spec("ci", "t3"), "tg", 2, 10).unwrap_err().to_string();
        assert!(e.contains("2 active tokens") && e.contains("t0") && e.contains("token revoke"), "{e}");
    }

    #[test]
    fn plaintext_is_not_in_the_file() {
        let (d, s) = open();
        s.create_account("ci", None, "test", 1).unwrap();
        let (_, new) = s.create_token(&spec("ci", "x"), "tg", 5, 10).unwrap();
        for f in std::fs::read_dir(d.path()).unwrap() {
            let bytes = std::fs::read(f.unwrap().path()).unwrap();
            let needle = new.plaintext.as_bytes();
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        }
    }

    #[test]
    fn last_used_only_moves_forward() {
        let (_d, s) = open();
        s.create_account("ci", None, "test", 1).unwrap();
        let (row, _) = s.create_token(&spec("ci", "x"), "tg", 5, 10).unwrap();
        let u = |at| LastUsed {
            token_id: row.id.clone(),
            at,
            ip: format!("10.0.0.{at}"),
        };
        s.flush_last_used(&[u(50)]).unwrap();
        s.flush_last_used(&[u(40)]).unwrap();
        let r = s.get_token(&row.id).unwrap();
        assert_eq!(r.last_used_at, Some(50));
        assert_eq!(r.last_used_ip.as_deref(), Some("10.0.0.50"));
    }

    #[test]
    fn rotation_keeps_fields_and_sets_deadline() {
        let (_d, s) = open();
        s.create_account("ci", None, "test", 1).unwrap();
        let (old, _) = s.create_token(&spec("ci", "x"), "tg", 1, 10).unwrap();
        let (new, _) = s.rotate(&old.id, "test", 1000, "tg", 20).unwrap();
        assert_eq!(new.rotated_from.as_deref(), Some(old.id.as_str()));
        assert_eq!(new.permissions, old.permissions);
        assert_eq!(new.scopes, old.scopes);
        assert_eq!(new.allowed_cidrs, old.allowed_cidrs);
        assert_eq!(s.get_token(&old.id).unwrap().rotation_deadline, Some(1020));
        assert!(s.retire_rotated(&old.id, 30).unwrap());
        assert!(!s.retire_rotated(&old.id, 31).unwrap());
        assert_eq!(s.get_token(&old.id).unwrap().revoke_reason.as_deref(), Some("rotated"));
    }

    #[test]
    fn disabled_account_blocks_creation() {
        let (_d, s) = open();
        s.create_account("ci", None, "test", 1).unwrap();
        s.disable_account("ci", "test", 2).unwrap();
        assert!(matches!(
            s.create_token(&spec("ci", "x"), "tg", 5, 10),
            Err(StoreError::AccountDisabled(_))
        ));
    }

    #[test]
    fn reopening_keeps_schema_version() {
        let (d, s) = open();
        drop(s);
        let s = Store::open(&d.path().join("t.db"), Duration::from_millis(250)).unwrap();
        assert_eq!(s.integrity_check().unwrap(), "ok");
    }
}
