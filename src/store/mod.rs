//! Token store (SPEC §6): accounts, tokens (hashes only), a change log other processes follow,
//! and an outbox of admin audit events — on SQLite (one host) or PostgreSQL (several replicas).
//!
//! [`Store`] is one cheap-to-clone handle with a blocking API whatever the engine: async code
//! reaches it through `tokio::task::spawn_blocking` (see `Gateway::store_call`), the CLI calls it
//! directly. The engines live in [`sqlite`] and [`postgres`]; both run the same schema and
//! migrations (DDL written per engine where types differ) and give the same answers, which
//! `tests/store_suite.rs` checks by running one suite against each.
//!
//! Owns: its options type [`StoreOptions`] (with [`PgOptions`]) and their defaults — config
//! converts its `[store]` section into them at the edge — and [`redact_url`], the one way a
//! connection URL is shown (the Redis limiter uses it too).
//! Never imports: `config`, `ratelimit`, `audit`, `gateway`, `cli` or `admin`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use ipnet::IpNet;
use serde::Serialize;

use crate::token::{NewToken, TokenHash};

pub mod postgres;
pub mod sqlite;

mod file;
mod row;
mod tables;

pub use approvals::{ApprovalRow, MfaRow};
pub(crate) use copy::DUMP_TOKEN_COLUMNS;
pub use copy::{DumpAccount, DumpChange, DumpToken, StoreDump};
pub(crate) use row::{NewTokenRow, TOKEN_COLUMNS, cap_reached};
pub use sessions::{LoginState, SessionRow};

/// Schema version this build creates and understands (the number of migrations; equal on both
/// engines).
pub const SCHEMA_VERSION: i64 = 4;

pub use crate::clock::system_now_ms;

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
    /// PostgreSQL failed (unreachable, pool exhausted past its timeout, query error...).
    #[error("store error on {target}: {message}")]
    Postgres {
        /// The server, as a URL without its password.
        target: String,
        /// Cause, with the server's message when there is one.
        message: String,
    },
    /// The schema is newer than this binary.
    #[error(
        "{path} has schema version {found}, newer than this tokengate ({known}); upgrade tokengate"
    )]
    TooNew {
        /// Database file or URL (without password).
        path: PathBuf,
        /// Version in the file.
        found: i64,
        /// Latest version known.
        known: i64,
    },
    /// The SQLite file is no longer the one the store opened: deleted, replaced or truncated
    /// under a running process. Nothing is read from or written to it until it is back.
    #[error(
        "the store file {path} {problem}: nothing is read from or written to it until the original file is back at that path (or tokengate is restarted on a restored store)"
    )]
    FileLost {
        /// Database file.
        path: PathBuf,
        /// What happened to it.
        problem: String,
    },
    /// No SQLite file where a store is expected (the CLI and `serve` never create one silently).
    #[error(
        "no store at {path}{detail}: create a new one with `tokengate store init`, or, if a store was expected there, restore it from a backup"
    )]
    Missing {
        /// Database file.
        path: PathBuf,
        /// Why it is not created here, when there is more to say (starts with `; `).
        detail: String,
    },
    /// The operation does not exist on this engine (e.g. SQLite's online backup on PostgreSQL).
    #[error("{0}")]
    Unsupported(String),
    /// The process is shutting down and the call was not run.
    #[error("the store call was cancelled: the gateway is shutting down")]
    ShuttingDown,
    /// `store copy` refuses to write into a store that already holds data.
    #[error("{target} is not empty ({what}); `store copy` only writes into an empty store")]
    NotEmpty {
        /// Destination.
        target: String,
        /// What was found.
        what: String,
    },
    /// `store copy` read back something different from what it wrote.
    #[error("copy verification failed: {0}")]
    CopyMismatch(String),
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

#[cfg(test)]
impl TokenRow {
    /// An active token row for unit tests: account `account` (id and name), no grants, no
    /// limits, created at 0 by `t`; tests change what they need with `..TokenRow::test(..)`.
    pub(crate) fn test(id: &str, account: &str) -> TokenRow {
        TokenRow {
            id: id.into(),
            account_id: account.into(),
            account: account.into(),
            name: "n".into(),
            prefix: "tg_abcdefgh".into(),
            role: None,
            permissions: vec![],
            scopes: BTreeMap::new(),
            allowed_cidrs: vec![],
            rate: None,
            created_at: 0,
            created_by: "t".into(),
            expires_at: None,
            last_used_at: None,
            last_used_ip: None,
            revoked_at: None,
            revoked_by: None,
            revoke_reason: None,
            rotated_from: None,
            rotation_deadline: None,
            account_disabled_at: None,
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

/// What the change feed of a PostgreSQL store reports (see [`Store::change_events`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeSignal {
    /// A change was committed (by any replica): read the change log now.
    Notified,
    /// The notification connection is gone: changes may go unannounced until `Reconnected`.
    Lost,
    /// The notification connection is back and listening: resynchronise from the change log.
    Reconnected,
}

/// Which engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

/// Connections in a PostgreSQL store's pool, by default.
pub const DEFAULT_POOL_SIZE: usize = 16;
/// Deadline for one PostgreSQL store call (pool wait, connect, queries), by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a SQLite call waits for another process's lock, by default.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_millis(250);

/// How to open a store: a SQLite file, or a PostgreSQL URL with its connection settings.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// SQLite file; unused when `url` is set.
    pub path: PathBuf,
    /// PostgreSQL URL (`postgres://...`); None = SQLite.
    pub url: Option<String>,
    /// SQLite busy timeout.
    pub busy_timeout: Duration,
    /// PostgreSQL connection settings.
    pub pg: PgOptions,
}

/// PostgreSQL connection settings beyond the URL.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Connections in the pool.
    pub pool_size: usize,
    /// Deadline for one store call (pool wait, connect and queries together).
    pub timeout: Duration,
    /// CA certificates (PEM) that sign the server's certificate; None = the system's roots.
    pub ca: Option<PathBuf>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            pool_size: DEFAULT_POOL_SIZE,
            timeout: DEFAULT_TIMEOUT,
            ca: None,
        }
    }
}

/// Hook run inside `lookup_hash` after the read, before returning: lets tests widen race windows.
pub type LookupHook = Arc<dyn Fn() + Send + Sync>;

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    backend: Backend,
    lookups: AtomicU64,
    lookup_hook: ArcSwapOption<LookupHookBox>,
}

enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

struct LookupHookBox(LookupHook);

/// Runs `$e` with `$b` bound to whichever engine backs `$s`.
macro_rules! on_backend {
    ($s:expr, $b:ident => $e:expr) => {
        match &$s.inner.backend {
            Backend::Sqlite($b) => $e,
            Backend::Postgres($b) => $e,
        }
    };
}

// Declared after `on_backend!`, which they use.
pub mod approvals;
mod copy;
pub mod sessions;

/// True when `location` names a PostgreSQL server rather than a SQLite file.
pub fn is_postgres_url(location: &str) -> bool {
    location.starts_with("postgres://") || location.starts_with("postgresql://")
}

/// `url` without its password (user-info and `password=` parameter), for logs and messages.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest_start + colon + 1..rest_start + at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&");
        out = format!("{head}{query}");
    }
    out
}

impl Store {
    fn wrap(backend: Backend) -> Store {
        Store {
            inner: Arc::new(StoreInner {
                backend,
                lookups: AtomicU64::new(0),
                lookup_hook: ArcSwapOption::empty(),
            }),
        }
    }

    /// Opens (creating if needed) a SQLite database, applies migrations and pragmas. The CLI
    /// and `serve` use [`Store::open_existing`] instead, and create a file only on purpose.
    pub fn open(path: &Path, busy_timeout: Duration) -> Result<Store, StoreError> {
        Ok(Self::wrap(Backend::Sqlite(sqlite::Sqlite::open(
            path,
            busy_timeout,
            true,
        )?)))
    }

    /// Opens the store the options name, never creating a SQLite file: a missing one is
    /// [`StoreError::Missing`]. (PostgreSQL: as [`Store::open_options`].)
    pub fn open_existing(o: &StoreOptions) -> Result<Store, StoreError> {
        if o.url.is_some() {
            return Self::open_options(o);
        }
        if !o.path.exists() {
            return Err(StoreError::Missing {
                path: o.path.clone(),
                detail: String::new(),
            });
        }
        // SQLite takes an empty file for an empty database and would run the migrations into
        // it: a truncated store would silently become a new one (in the inode a gateway holds).
        if std::fs::metadata(&o.path).is_ok_and(|m| m.len() == 0) {
            return Err(StoreError::FileLost {
                path: o.path.clone(),
                problem: "is empty (0 bytes: truncated?)".into(),
            });
        }
        Ok(Self::wrap(Backend::Sqlite(sqlite::Sqlite::open(
            &o.path,
            o.busy_timeout,
            false,
        )?)))
    }

    /// Files SQLite leaves next to a database (`-wal`, `-shm`, `-journal`) that exist for `path`.
    /// Next to a missing database they mean one was there (and a process may still have it
    /// open); a new database created beside a `-wal` would even replay the old one's frames.
    pub fn leftovers(path: &Path) -> Vec<PathBuf> {
        ["-wal", "-shm", "-journal"]
            .iter()
            .map(|ext| {
                let mut p = path.as_os_str().to_owned();
                p.push(ext);
                PathBuf::from(p)
            })
            .filter(|p| p.exists())
            .collect()
    }

    /// SQLite: whether the path still names the whole file this store opened (not deleted,
    /// replaced or truncated); every store call checks it first. Always Ok on PostgreSQL.
    pub fn check_file(&self) -> Result<(), StoreError> {
        match &self.inner.backend {
            Backend::Sqlite(s) => s.check_file(),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Connects to a PostgreSQL database (`postgres://...`), applies migrations, and starts
    /// listening for change notifications. Fails when the server cannot be reached.
    pub fn open_postgres(url: &str, options: &PgOptions) -> Result<Store, StoreError> {
        Ok(Self::wrap(Backend::Postgres(postgres::Postgres::open(
            url, options,
        )?)))
    }

    /// Opens the store the options name.
    pub fn open_options(o: &StoreOptions) -> Result<Store, StoreError> {
        match &o.url {
            Some(url) => Self::open_postgres(url, &o.pg),
            None => Self::open(&o.path, o.busy_timeout),
        }
    }

    /// Opens a SQLite file or a `postgres://` URL (`store copy`).
    pub fn open_location(
        location: &str,
        busy_timeout: Duration,
        pg: &PgOptions,
    ) -> Result<Store, StoreError> {
        if is_postgres_url(location) {
            Self::open_postgres(location, pg)
        } else {
            Self::open(Path::new(location), busy_timeout)
        }
    }

    /// The engine.
    pub fn engine(&self) -> Engine {
        match &self.inner.backend {
            Backend::Sqlite(_) => Engine::Sqlite,
            Backend::Postgres(_) => Engine::Postgres,
        }
    }

    /// Database file (SQLite); an empty path for PostgreSQL (see [`Store::location`]).
    pub fn path(&self) -> &Path {
        match &self.inner.backend {
            Backend::Sqlite(s) => s.path(),
            Backend::Postgres(_) => Path::new(""),
        }
    }

    /// The SQLite file, or None on PostgreSQL.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match &self.inner.backend {
            Backend::Sqlite(s) => Some(s.path()),
            Backend::Postgres(_) => None,
        }
    }

    /// Where the store lives, for messages: the file, or the URL without its password.
    pub fn location(&self) -> String {
        match &self.inner.backend {
            Backend::Sqlite(s) => s.path().display().to_string(),
            Backend::Postgres(p) => p.target().to_string(),
        }
    }

    /// Pushed change signals (PostgreSQL LISTEN/NOTIFY); None on SQLite, which is polled only.
    /// Every receiver sees every signal from its creation on.
    pub fn change_events(&self) -> Option<tokio::sync::broadcast::Receiver<ChangeSignal>> {
        match &self.inner.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(p) => Some(p.subscribe()),
        }
    }

    /// Whether the notification connection is listening now (None on SQLite).
    pub fn change_feed_up(&self) -> Option<bool> {
        match &self.inner.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(p) => Some(p.feed_up()),
        }
    }

    /// Test hook: while held, a lost notification connection is not re-established.
    #[doc(hidden)]
    pub fn hold_change_feed(&self, hold: bool) {
        if let Backend::Postgres(p) = &self.inner.backend {
            p.hold_feed(hold);
        }
    }

    /// Number of token lookups by hash so far (cache misses reaching the store).
    pub fn lookup_count(&self) -> u64 {
        self.inner.lookups.load(Ordering::Relaxed)
    }

    /// Number of write transactions so far.
    pub fn write_count(&self) -> u64 {
        on_backend!(self, b => b.write_count())
    }

    /// Installs (or clears) a hook run during `lookup_hash` (tests use it to slow reads down).
    #[doc(hidden)]
    pub fn set_lookup_hook(&self, hook: Option<LookupHook>) {
        self.inner
            .lookup_hook
            .store(hook.map(|h| Arc::new(LookupHookBox(h))));
    }

    /// Runs a read-only check that the store is readable (used at start and by `/readyz`).
    pub fn ping(&self) -> Result<(), StoreError> {
        on_backend!(self, b => b.ping())
    }

    // ------------------------------------------------------------ accounts

    /// Creates an account.
    pub fn create_account(
        &self,
        name: &str,
        email: Option<&str>,
        actor: &str,
        now: i64,
    ) -> Result<Account, StoreError> {
        let acc = Account {
            id: crate::token::new_id("acc"),
            name: name.to_string(),
            email: email.map(str::to_string),
            created_at: now,
            created_by: actor.to_string(),
            disabled_at: None,
        };
        on_backend!(self, b => b.create_account(&acc))?;
        Ok(acc)
    }

    /// All accounts, by name.
    pub fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        on_backend!(self, b => b.list_accounts())
    }

    /// Finds an account by name or id.
    pub fn get_account(&self, name_or_id: &str) -> Result<Account, StoreError> {
        on_backend!(self, b => b.find_account(name_or_id))?
            .ok_or_else(|| StoreError::NoAccount(name_or_id.to_string()))
    }

    /// Disables an account: every one of its tokens is rejected from now on.
    pub fn disable_account(
        &self,
        name_or_id: &str,
        actor: &str,
        now: i64,
    ) -> Result<Account, StoreError> {
        on_backend!(self, b => b.disable_account(name_or_id, actor, now))
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
        let new = crate::token::generate(prefix);
        let id = crate::token::new_id("tok");
        let row = NewTokenRow::new(&id, spec, &new, None, now);
        on_backend!(self, b => b.create_token(&spec.account, &row, max_active, now))?;
        let row = self.get_token(&id)?;
        Ok((row, new))
    }

    /// Looks a token up by its hash (the request path on a cache miss).
    pub fn lookup_hash(&self, hash: &TokenHash) -> Result<Option<TokenRow>, StoreError> {
        self.inner.lookups.fetch_add(1, Ordering::Relaxed);
        let row = on_backend!(self, b => b.lookup_hash(hash))?;
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
        let rows = on_backend!(self, b => b.find_tokens(id_or_prefix))?;
        pick_token(rows, id_or_prefix)
    }

    /// Tokens, newest first; revoked/expired ones only with `include_inactive`.
    pub fn list_tokens(
        &self,
        account: Option<&str>,
        include_inactive: bool,
        now: i64,
    ) -> Result<Vec<TokenRow>, StoreError> {
        let account_id = match account {
            Some(a) => Some(self.get_account(a)?.id),
            None => None,
        };
        let rows = on_backend!(self, b => b.list_tokens(account_id.as_deref()))?;
        Ok(rows
            .into_iter()
            .filter(|r| include_inactive || r.is_active(now))
            .collect())
    }

    /// Revokes a token (soft delete) and logs the change for other processes.
    pub fn revoke(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
        now: i64,
    ) -> Result<TokenRow, StoreError> {
        on_backend!(self, b => b.revoke(id, actor, reason, now))?;
        self.get_token(id)
    }

    /// Revokes the predecessor of a rotation once its successor is used (idempotent).
    pub fn retire_rotated(&self, old_id: &str, now: i64) -> Result<bool, StoreError> {
        on_backend!(self, b => b.retire_rotated(old_id, now))
    }

    /// Rotates: a new token with the same account, permissions, scopes, limits and expiry (a
    /// rotation never extends a token's life); the old one keeps working until the new one is used or `now + grace_ms`, whichever comes first.
    /// The cap is not applied: the old token's slot is handed over.
    pub fn rotate(
        &self,
        id: &str,
        actor: &str,
        grace_ms: i64,
        prefix: &str,
        now: i64,
    ) -> Result<(TokenRow, NewToken), StoreError> {
        let old = self.find_token(id)?;
        let expires_at = old.expires_at;
        self.rotate_until(&old.id, actor, grace_ms, prefix, now, expires_at)
    }

    /// [`Store::rotate`] with the successor's expiry given (`lifecycle` decides it: the original
    /// one, or a new lifetime an admin asked for within policy).
    pub fn rotate_until(
        &self,
        id: &str,
        actor: &str,
        grace_ms: i64,
        prefix: &str,
        now: i64,
        expires_at: Option<i64>,
    ) -> Result<(TokenRow, NewToken), StoreError> {
        let old = self.find_token(id)?;
        if !old.is_active(now) {
            return Err(StoreError::AlreadyRevoked(old.id));
        }
        let new = crate::token::generate(prefix);
        let spec = NewTokenSpec {
            account: old.account_id.clone(),
            name: old.name.clone(),
            role: old.role.clone(),
            permissions: old.permissions.clone(),
            scopes: old.scopes.clone(),
            allowed_cidrs: old.allowed_cidrs.clone(),
            rate: old.rate,
            expires_at,
            created_by: actor.to_string(),
        };
        let new_id = crate::token::new_id("tok");
        let row = NewTokenRow::new(&new_id, &spec, &new, Some(&old.id), now);
        on_backend!(self, b => b.rotate(&old.id, &old.account_id, &row, now + grace_ms, now))?;
        Ok((self.get_token(&new_id)?, new))
    }

    /// Writes a batch of last-use data in one transaction; only ever moves `last_used_at`
    /// forward, so replicas flushing in any order converge on the latest use.
    pub fn flush_last_used(&self, batch: &[LastUsed]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        // One entry per token (the latest), in id order: concurrent flushes from several
        // replicas then lock rows in the same order and cannot deadlock.
        let mut latest: BTreeMap<&str, &LastUsed> = BTreeMap::new();
        for u in batch {
            let e = latest.entry(u.token_id.as_str()).or_insert(u);
            if u.at > e.at {
                *e = u;
            }
        }
        let sorted: Vec<LastUsed> = latest.into_values().cloned().collect();
        on_backend!(self, b => b.flush_last_used(&sorted))
    }

    /// Highest change sequence number (0 when none).
    pub fn last_change_seq(&self) -> Result<i64, StoreError> {
        on_backend!(self, b => b.last_change_seq())
    }

    /// Changes after `seq`, oldest first.
    pub fn changes_since(&self, seq: i64) -> Result<Vec<Change>, StoreError> {
        on_backend!(self, b => b.changes_since(seq))
    }

    /// Tokens that are active now, and those expiring before `before` (for metrics).
    pub fn count_active(&self, now: i64, expiring_before: i64) -> Result<(u64, u64), StoreError> {
        on_backend!(self, b => b.count_active(now, expiring_before))
    }

    /// Queues an admin audit record (JSON) for the process that owns the audit log.
    pub fn outbox_push(&self, json: &str) -> Result<(), StoreError> {
        on_backend!(self, b => b.outbox_push(json))
    }

    /// Oldest queued admin audit records, with their ids.
    pub fn outbox_peek(&self, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        on_backend!(self, b => b.outbox_peek(limit))
    }

    /// Deletes queued records up to and including `id`.
    pub fn outbox_ack(&self, id: i64) -> Result<(), StoreError> {
        on_backend!(self, b => b.outbox_ack(id))
    }

    /// SQLite: `PRAGMA integrity_check` ("ok" when sound). PostgreSQL checks its own pages; this
    /// answers "ok" when the tables can be read.
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        on_backend!(self, b => b.integrity_check())
    }

    /// Online backup to `dest` through SQLite's backup API (SQLite only).
    pub fn backup(&self, dest: &Path) -> Result<(), StoreError> {
        match &self.inner.backend {
            Backend::Sqlite(s) => s.backup(dest),
            Backend::Postgres(_) => Err(StoreError::Unsupported(
                "`store backup` is for SQLite files; back PostgreSQL up with pg_dump, or copy it into a file with `tokengate store copy --to FILE`".into(),
            )),
        }
    }
}

/// Chooses among the (at most 3) rows matching an id or prefix: an exact match wins over longer
/// prefix matches; otherwise exactly one row must match.
fn pick_token(rows: Vec<TokenRow>, id_or_prefix: &str) -> Result<TokenRow, StoreError> {
    let exact = |r: &&TokenRow| r.id == id_or_prefix || r.prefix == id_or_prefix;
    if rows.iter().filter(exact).count() == 1 {
        return Ok(rows.iter().find(exact).expect("one").clone());
    }
    match rows.len() {
        0 => Err(StoreError::NoToken(id_or_prefix.to_string())),
        1 => Ok(rows.into_iter().next().expect("one")),
        _ => Err(StoreError::Ambiguous(id_or_prefix.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://tg:s3cret@db:5432/tg"),
            "postgres://tg:***@db:5432/tg"
        );
        assert_eq!(redact_url("postgres://tg@db/tg"), "postgres://tg@db/tg");
        assert_eq!(
            redact_url("postgresql://db/tg?user=tg&password=s3cret&sslmode=require"),
            "postgresql://db/tg?user=tg&password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("redis://:pw@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert!(is_postgres_url("postgresql://x") && is_postgres_url("postgres://x"));
        assert!(!is_postgres_url("/var/lib/tokengate/tokengate.db"));
    }

    #[test]
    fn both_engines_know_the_same_schema_version() {
        assert_eq!(sqlite::MIGRATIONS.len() as i64, SCHEMA_VERSION);
        assert_eq!(postgres::MIGRATIONS.len() as i64, SCHEMA_VERSION);
    }
}
