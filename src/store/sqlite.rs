//! The SQLite engine: one file, WAL, `synchronous=FULL`, `BEGIN IMMEDIATE` for writes.
//!
//! Every call blocks. Writes go through one writer connection; reads use a small pool of reader
//! connections so a slow write never stalls a cache miss (WAL mode). No connection maps the file
//! into memory: SQLite turns a read past the end of a mapped file that shrank under it (`truncate`)
//! into SIGBUS, which kills the process (issue 16); `pread` turns it into an error instead.
//!
//! The file is held to the one it opened ([`FileIdentity`]): every call first checks that the
//! path still names that file (same device and inode, a SQLite header, not cut short), so a store
//! deleted, replaced or truncated under a running gateway is refused with
//! [`StoreError::FileLost`] instead of being read from the old inode or a new file.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use super::copy::{COUNT_ROWS, require_empty};
use super::file::FileIdentity;
use super::row;
use super::{
    Account, Change, DUMP_TOKEN_COLUMNS, DumpToken, LastUsed, NewTokenRow, StoreDump, StoreError,
    TOKEN_COLUMNS, TokenRow, cap_reached,
};
use crate::token::TokenHash;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran. The
/// PostgreSQL engine has the same list with its own types (`postgres::MIGRATIONS`): both expand
/// the same templates (`store::tables`, `sessions`, `approvals`).
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: accounts, tokens, change log.
    super::tables::migration_1!(
        int: "INTEGER",
        bytes: "BLOB",
        length: "length",
        real: "REAL",
        serial: "INTEGER PRIMARY KEY AUTOINCREMENT",
        then: "",
    ),
    // 2: admin audit events written by the CLI while a gateway owns the audit log; the gateway
    // moves them into the log (a transactional outbox).
    super::tables::migration_2!(serial: "INTEGER PRIMARY KEY AUTOINCREMENT"),
    // 3: web UI sessions and pending OpenID Connect sign-ins (`store::sessions`).
    super::sessions::SQLITE_MIGRATION,
    // 4: approval requests and MFA enrolments (issue 19; SQL in `store::approvals`).
    super::approvals::SQLITE_MIGRATION,
];

/// `PRAGMA mmap_size` of every connection: 0, reads go through `pread`. Mapping the file (1 GiB
/// until issue 16) made a cold lookup at 1,000,000 tokens several times faster
/// (docs/performance.md), but SQLite cannot guard a mapped read: when the file is truncated
/// while mapped, touching a page past the new end raises SIGBUS and the process dies with no
/// line logged. With `pread` the same read is an error the gateway answers 503 for.
pub(crate) const READER_MMAP_SIZE: i64 = 0;

/// The request path's cache-miss query, built once. Plan: `tokens_hash` (unique) → the token's
/// row by rowid → `accounts` through its primary-key index, which covers `id`, and the account's
/// row by rowid for `name` and `disabled_at`.
static LOOKUP_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {TOKEN_COLUMNS} FROM tokens t JOIN accounts a ON a.id = t.account_id WHERE t.hash = ?1"
    )
});

/// A SQLite store.
pub(crate) struct Sqlite {
    path: PathBuf,
    busy_timeout: Duration,
    /// The single writer. A std Mutex: held only inside blocking code, never across `.await`.
    writer: Mutex<Connection>,
    /// Idle reader connections; a reader is taken out for one query and put back.
    readers: Mutex<Vec<Connection>>,
    writes: AtomicU64,
    /// The file opened, checked before every call.
    file: FileIdentity,
}

impl Sqlite {
    /// Opens `path`, creating the file when `create` (else a missing file is an error), and
    /// applies migrations.
    pub(crate) fn open(
        path: &Path,
        busy_timeout: Duration,
        create: bool,
    ) -> Result<Sqlite, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        if create {
            create_private(path).map_err(|e| StoreError::Sqlite {
                path: path.to_path_buf(),
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                    Some(format!("cannot create the database file: {e}")),
                ),
            })?;
        }
        let writer = open_conn(path, busy_timeout, create).map_err(err)?;
        migrate(&writer, path)?;
        let file = FileIdentity::of(path).map_err(|e| StoreError::FileLost {
            path: path.to_path_buf(),
            problem: format!("cannot be opened ({e})"),
        })?;
        Ok(Sqlite {
            path: path.to_path_buf(),
            busy_timeout,
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
            writes: AtomicU64::new(0),
            file,
        })
    }

    /// Whether `path` still names the whole file this store opened ([`FileIdentity::problem`]).
    pub(crate) fn check_file(&self) -> Result<(), StoreError> {
        match self.file.problem(&self.path) {
            None => Ok(()),
            Some(problem) => Err(StoreError::FileLost {
                path: self.path.clone(),
                problem,
            }),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    pub(crate) fn write_count(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Runs `f` on a pooled reader, once the file is checked; a failed read checks it again, so
    /// a file lost during the read is reported as such.
    pub(super) fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.check_file()?;
        let conn = self.readers.lock().expect("reader pool poisoned").pop();
        let conn = match conn {
            Some(c) => c,
            None => open_reader(&self.path, self.busy_timeout).map_err(self.err())?,
        };
        let out = f(&conn);
        if let Err(StoreError::Sqlite { .. }) = &out {
            self.check_file()?;
        }
        let mut pool = self.readers.lock().expect("reader pool poisoned");
        if pool.len() < 8 {
            pool.push(conn);
        }
        out
    }

    pub(super) fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.check_file()?;
        let mut conn = self.writer.lock().expect("writer poisoned");
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.err())?;
        let out = f(&tx)?;
        tx.commit().map_err(self.err())?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(out)
    }

    /// Runs `sql` with `params` and maps every row with `f`.
    pub(super) fn query_all<T>(
        &self,
        c: &Connection,
        sql: &str,
        params: impl rusqlite::Params,
        f: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, StoreError> {
        let mut st = c.prepare_cached(sql).map_err(self.err())?;
        let rows = st.query_map(params, f).map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    fn query_tokens(
        &self,
        c: &Connection,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<TokenRow>, StoreError> {
        let mut st = c.prepare_cached(sql).map_err(self.err())?;
        let rows = st
            .query_map(params, |r| row::raw_token(r))
            .map_err(self.err())?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r.map_err(self.err())?.into_row()?);
        }
        Ok(out)
    }

    pub(crate) fn ping(&self) -> Result<(), StoreError> {
        self.with_reader(|c| {
            // Reads one page: proves the file and schema are readable without scanning.
            c.prepare_cached("SELECT count(*) FROM (SELECT 1 FROM accounts LIMIT 1)")
                .and_then(|mut st| st.query_row([], |_| Ok(())))
                .map_err(self.err())
        })
    }

    pub(crate) fn create_account(&self, acc: &Account) -> Result<(), StoreError> {
        self.write(|tx| {
            let exists: Option<String> = tx
                .query_row("SELECT id FROM accounts WHERE name = ?1", [&acc.name], |r| r.get(0))
                .optional()
                .map_err(self.err())?;
            if exists.is_some() {
                return Err(StoreError::AccountExists(acc.name.clone()));
            }
            tx.execute(
                "INSERT INTO accounts (id, name, email, created_at, created_by) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![acc.id, acc.name, acc.email, acc.created_at, acc.created_by],
            )
            .map_err(self.err())?;
            Ok(())
        })
    }

    pub(crate) fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        self.with_reader(|c| {
            self.query_all(
                c,
                "SELECT id, name, email, created_at, created_by, disabled_at FROM accounts ORDER BY name",
                [],
                |r| row::account(r),
            )
        })
    }

    pub(crate) fn find_account(&self, name_or_id: &str) -> Result<Option<Account>, StoreError> {
        self.with_reader(|c| find_account(c, name_or_id).map_err(self.err()))
    }

    pub(crate) fn disable_account(
        &self,
        name_or_id: &str,
        actor: &str,
        now: i64,
    ) -> Result<Account, StoreError> {
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

    pub(crate) fn create_token(
        &self,
        account: &str,
        row: &NewTokenRow,
        max_active: u32,
        now: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let acc = find_account(tx, account)
                .map_err(self.err())?
                .ok_or_else(|| StoreError::NoAccount(account.to_string()))?;
            if acc.disabled_at.is_some() {
                return Err(StoreError::AccountDisabled(acc.name));
            }
            let active = active_tokens(tx, &acc.id, now).map_err(self.err())?;
            if active.len() as u32 >= max_active {
                return Err(cap_reached(acc.name, max_active, &active));
            }
            insert_token(tx, &acc.id, row).map_err(self.err())?;
            Ok(())
        })
    }

    pub(crate) fn lookup_hash(&self, hash: &TokenHash) -> Result<Option<TokenRow>, StoreError> {
        self.with_reader(|c| {
            let mut rows = self.query_tokens(c, &LOOKUP_SQL, [&hash[..]])?;
            Ok(rows.pop())
        })
    }

    pub(crate) fn find_tokens(&self, id_or_prefix: &str) -> Result<Vec<TokenRow>, StoreError> {
        self.with_reader(|c| {
            static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
                format!(
                    "SELECT {TOKEN_COLUMNS} FROM tokens t JOIN accounts a ON a.id = t.account_id \
                     WHERE t.id = ?1 OR t.display_prefix = ?1 \
                        OR (length(?1) >= 6 AND (substr(t.id, 1, length(?1)) = ?1 OR substr(t.display_prefix, 1, length(?1)) = ?1)) \
                     LIMIT 3"
                )
            });
            self.query_tokens(c, &SQL, [id_or_prefix])
        })
    }

    pub(crate) fn list_tokens(
        &self,
        account_id: Option<&str>,
    ) -> Result<Vec<TokenRow>, StoreError> {
        self.with_reader(|c| {
            static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
                format!(
                    "SELECT {TOKEN_COLUMNS} FROM tokens t JOIN accounts a ON a.id = t.account_id \
                     WHERE (?1 IS NULL OR t.account_id = ?1) ORDER BY t.created_at DESC, t.id"
                )
            });
            self.query_tokens(c, &SQL, [account_id])
        })
    }

    pub(crate) fn revoke(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            if !mark_revoked(tx, id, actor, reason, now).map_err(self.err())? {
                let exists: Option<i64> = tx
                    .query_row("SELECT 1 FROM tokens WHERE id = ?1", [id], |r| r.get(0))
                    .optional()
                    .map_err(self.err())?;
                return Err(match exists {
                    Some(_) => StoreError::AlreadyRevoked(id.to_string()),
                    None => StoreError::NoToken(id.to_string()),
                });
            }
            Ok(())
        })
    }

    pub(crate) fn retire_rotated(&self, old_id: &str, now: i64) -> Result<bool, StoreError> {
        self.write(|tx| mark_revoked(tx, old_id, "tokengate", "rotated", now).map_err(self.err()))
    }

    pub(crate) fn rotate(
        &self,
        old_id: &str,
        account_id: &str,
        row: &NewTokenRow,
        deadline: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let still: Option<i64> = tx
                .query_row("SELECT 1 FROM tokens WHERE id = ?1 AND revoked_at IS NULL", [old_id], |r| r.get(0))
                .optional()
                .map_err(self.err())?;
            if still.is_none() {
                return Err(StoreError::AlreadyRevoked(old_id.to_string()));
            }
            insert_token(tx, account_id, row).map_err(self.err())?;
            tx.execute(
                "UPDATE tokens SET rotation_deadline = min(coalesce(rotation_deadline, ?1), ?1) WHERE id = ?2",
                params![deadline, old_id],
            )
            .map_err(self.err())?;
            record_change(tx, now, "rotate", Some(old_id), None).map_err(self.err())?;
            Ok(())
        })
    }

    pub(crate) fn flush_last_used(&self, batch: &[LastUsed]) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut st = tx
                .prepare_cached(
                    "UPDATE tokens SET last_used_at = ?1, last_used_ip = ?2 \
                     WHERE id = ?3 AND (last_used_at IS NULL OR last_used_at < ?1)",
                )
                .map_err(self.err())?;
            for u in batch {
                st.execute(params![u.at, u.ip, u.token_id])
                    .map_err(self.err())?;
            }
            Ok(())
        })
    }

    pub(crate) fn last_change_seq(&self) -> Result<i64, StoreError> {
        self.with_reader(|c| {
            c.prepare_cached("SELECT coalesce(max(seq), 0) FROM changes")
                .and_then(|mut st| st.query_row([], |r| r.get(0)))
                .map_err(self.err())
        })
    }

    pub(crate) fn changes_since(&self, seq: i64) -> Result<Vec<Change>, StoreError> {
        self.with_reader(|c| {
            self.query_all(
                c,
                "SELECT seq, kind, token_id, account_id FROM changes WHERE seq > ?1 ORDER BY seq LIMIT 10000",
                [seq],
                |r| row::change(r),
            )
        })
    }

    pub(crate) fn count_active(
        &self,
        now: i64,
        expiring_before: i64,
    ) -> Result<(u64, u64), StoreError> {
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

    pub(crate) fn outbox_push(&self, json: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute("INSERT INTO audit_outbox (line) VALUES (?1)", [json])
                .map_err(self.err())?;
            Ok(())
        })
    }

    pub(crate) fn outbox_peek(&self, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        self.with_reader(|c| {
            self.query_all(
                c,
                "SELECT id, line FROM audit_outbox ORDER BY id LIMIT ?1",
                [limit as i64],
                |r| row::outbox(r),
            )
        })
    }

    pub(crate) fn outbox_ack(&self, id: i64) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute("DELETE FROM audit_outbox WHERE id <= ?1", [id])
                .map_err(self.err())?;
            Ok(())
        })
    }

    pub(crate) fn integrity_check(&self) -> Result<String, StoreError> {
        self.with_reader(|c| {
            c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
                .map_err(self.err())
        })
    }

    pub(crate) fn backup(&self, dest: &Path) -> Result<(), StoreError> {
        self.with_reader(|c| {
            c.backup(
                rusqlite::MAIN_DB,
                dest,
                None::<fn(rusqlite::backup::Progress)>,
            )
            .map_err(self.err())
        })
    }

    pub(crate) fn export(&self) -> Result<StoreDump, StoreError> {
        // One read transaction: the four tables come from the same snapshot.
        self.with_reader(|c| {
            c.execute_batch("BEGIN").map_err(self.err())?;
            let out = self.export_in(c);
            let _ = c.execute_batch("COMMIT");
            out
        })
    }

    fn export_in(&self, c: &Connection) -> Result<StoreDump, StoreError> {
        let accounts = self.query_all(
            c,
            "SELECT id, name, email, created_at, created_by, disabled_at, disabled_by FROM accounts ORDER BY id",
            [],
            |r| row::dump_account(r),
        )?;
        let tokens = self.query_all(
            c,
            &format!("SELECT {DUMP_TOKEN_COLUMNS} FROM tokens ORDER BY id"),
            [],
            |r| row::dump_token(r),
        )?;
        let changes = self.query_all(
            c,
            "SELECT seq, at, kind, token_id, account_id FROM changes ORDER BY seq",
            [],
            |r| row::dump_change(r),
        )?;
        let outbox = self.query_all(
            c,
            "SELECT id, line FROM audit_outbox ORDER BY id",
            [],
            |r| row::outbox(r),
        )?;
        Ok(StoreDump {
            accounts,
            tokens,
            changes,
            outbox,
        })
    }

    pub(crate) fn import(&self, d: &StoreDump) -> Result<(), StoreError> {
        self.write(|tx| {
            let counts = tx
                .query_row(COUNT_ROWS, [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .map_err(self.err())?;
            require_empty(self.path.display().to_string(), counts)?;
            for a in &d.accounts {
                tx.execute(
                    "INSERT INTO accounts (id, name, email, created_at, created_by, disabled_at, disabled_by) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![a.id, a.name, a.email, a.created_at, a.created_by, a.disabled_at, a.disabled_by],
                )
                .map_err(self.err())?;
            }
            // rotated_from points at another token: insert without it, then link.
            for t in &d.tokens {
                insert_stored(tx, t, &None).map_err(self.err())?;
            }
            for t in d.tokens.iter().filter(|t| t.rotated_from.is_some()) {
                tx.execute("UPDATE tokens SET rotated_from = ?1 WHERE id = ?2", params![t.rotated_from, t.id])
                    .map_err(self.err())?;
            }
            // Explicit seqs keep the high-water mark (AUTOINCREMENT continues above it).
            for ch in &d.changes {
                tx.execute(
                    "INSERT INTO changes (seq, at, kind, token_id, account_id) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![ch.seq, ch.at, ch.kind, ch.token_id, ch.account_id],
                )
                .map_err(self.err())?;
            }
            for (id, line) in &d.outbox {
                tx.execute("INSERT INTO audit_outbox (id, line) VALUES (?1, ?2)", params![id, line])
                    .map_err(self.err())?;
            }
            Ok(())
        })
    }
}

/// Creates a missing database file with mode 0600 before SQLite first opens it: the file holds
/// token hashes and the admin event outbox, and SQLite gives its `-wal` and `-shm` files the
/// database file's mode, so all three are private to the gateway's user whatever the umask.
/// An existing file keeps its mode (the operator chose it).
fn create_private(path: &Path) -> std::io::Result<()> {
    let text = path.to_string_lossy();
    if text.starts_with("file:") || text == ":memory:" || path.exists() {
        return Ok(());
    }
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    match o.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn open_conn(path: &Path, busy: Duration, create: bool) -> rusqlite::Result<Connection> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let c = Connection::open_with_flags(path, flags)?;
    c.busy_timeout(busy)?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "FULL")?;
    c.pragma_update(None, "foreign_keys", "ON")?;
    // Grow and shrink the file in whole pages, and grow it *before* a checkpoint copies pages
    // into it: SQLite only acts on a checkpoint's size hint when a chunk size is set. Without
    // it, a checkpoint writes page 1 (with the new page count) before the pages that extend the
    // file, and for that moment the file looks shorter than its header says — which
    // [`super::file::FileIdentity`] would have to tell from a real truncation by waiting.
    let mut page: i32 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    c.file_control(
        rusqlite::DEFAULT_NAME,
        rusqlite::FileControl::ChunkSize(&mut page),
    )?;
    // Never map the file ([`READER_MMAP_SIZE`]); SQLite answers with the size it applied.
    let _: i64 = c.query_row(&format!("PRAGMA mmap_size = {READER_MMAP_SIZE}"), [], |r| {
        r.get(0)
    })?;
    Ok(c)
}

/// A reader connection: the common pragmas (the file not mapped, [`READER_MMAP_SIZE`]), and the
/// query planner's stability guarantee (QPSG) on. Without QPSG, SQLite marks a statement whose
/// plan looked at a bound value (it does for the `tokens JOIN accounts ... WHERE t.hash = ?1` of
/// a cache miss) to be re-prepared — parsed and planned again — whenever that value changes,
/// that is on every lookup: about a third of a lookup's time at 1,000,000 tokens, even with the
/// statement cached. Our queries' plans never depend on the values (no `LIKE`, no ANALYZE).
fn open_reader(path: &Path, busy: Duration) -> rusqlite::Result<Connection> {
    let c = open_conn(path, busy, false)?;
    c.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(c)
}

fn migrate(c: &Connection, path: &Path) -> Result<(), StoreError> {
    let err = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let version: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(err)?;
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

/// Revokes token `id` (by `actor`, for `reason`) if it is not revoked yet, with its change-log
/// entry; false (and nothing written) if it was already revoked or does not exist.
fn mark_revoked(
    tx: &Connection,
    id: &str,
    actor: &str,
    reason: &str,
    now: i64,
) -> rusqlite::Result<bool> {
    let n = tx.execute(
        "UPDATE tokens SET revoked_at = ?1, revoked_by = ?2, revoke_reason = ?3 WHERE id = ?4 AND revoked_at IS NULL",
        params![now, actor, reason, id],
    )?;
    if n > 0 {
        record_change(tx, now, "revoke", Some(id), None)?;
    }
    Ok(n > 0)
}

fn record_change(
    tx: &Connection,
    now: i64,
    kind: &str,
    token_id: Option<&str>,
    account_id: Option<&str>,
) -> rusqlite::Result<()> {
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
        |r| row::account(r),
    )
    .optional()
}

fn active_tokens(
    c: &Connection,
    account_id: &str,
    now: i64,
) -> rusqlite::Result<Vec<(String, String, String)>> {
    let mut st = c.prepare(
        "SELECT id, name, display_prefix FROM tokens WHERE account_id = ?1 AND revoked_at IS NULL \
         AND (expires_at IS NULL OR expires_at > ?2) AND (rotation_deadline IS NULL OR rotation_deadline > ?2) \
         ORDER BY created_at",
    )?;
    let rows = st.query_map(params![account_id, now], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    rows.collect()
}

fn insert_token(tx: &Connection, account_id: &str, t: &NewTokenRow) -> rusqlite::Result<()> {
    let stored = t.stored(account_id);
    insert_stored(tx, &stored, &stored.rotated_from)
}

/// Inserts one stored token row (a new token, or a row of an import).
fn insert_stored(
    tx: &Connection,
    t: &DumpToken,
    rotated_from: &Option<String>,
) -> rusqlite::Result<()> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let marks: Vec<String> = (1..=21).map(|i| format!("?{i}")).collect();
        format!(
            "INSERT INTO tokens ({DUMP_TOKEN_COLUMNS}) VALUES ({})",
            marks.join(", ")
        )
    });
    let values: [&dyn rusqlite::ToSql; 21] = row::token_values!(t, rotated_from);
    tx.prepare_cached(&SQL)?.execute(&values[..])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! SQLite-only properties; the behaviour both engines share is in `tests/store_suite.rs`.
    use super::super::{NewTokenSpec, Store};
    use std::collections::BTreeMap;
    use std::time::Duration;

    /// Options that open the SQLite file at `path`.
    fn options(path: &std::path::Path) -> super::super::StoreOptions {
        super::super::StoreOptions {
            path: path.to_path_buf(),
            url: None,
            busy_timeout: Duration::from_millis(250),
            pg: Default::default(),
        }
    }

    fn spec(account: &str, name: &str) -> NewTokenSpec {
        NewTokenSpec {
            account: account.into(),
            name: name.into(),
            role: Some("viewer".into()),
            permissions: vec!["apps:read".into()],
            scopes: BTreeMap::new(),
            allowed_cidrs: vec![],
            rate: None,
            expires_at: None,
            created_by: "test".into(),
        }
    }

    /// A checkpoint that grows the file never shows it shorter than its header says: our
    /// connections extend the file before copying pages in (the chunk size in `open_conn`), so a
    /// request that checks the file mid-checkpoint does not take it for a truncated one.
    #[test]
    fn a_growing_checkpoint_never_looks_like_a_truncation() {
        use super::super::file::{FileIdentity, Look};
        use std::sync::atomic::{AtomicBool, Ordering};
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("t.db");
        let c = super::open_conn(&path, Duration::from_secs(5), true).unwrap();
        c.execute_batch("PRAGMA wal_autocheckpoint = 0; CREATE TABLE b (x BLOB);")
            .unwrap();
        let id = FileIdentity::of(&path).unwrap();
        let done = &AtomicBool::new(false);
        let (looks, short) = std::thread::scope(|s| {
            s.spawn(move || {
                for _ in 0..300 {
                    c.execute("INSERT INTO b VALUES (zeroblob(40000))", [])
                        .unwrap();
                    c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                        .unwrap();
                }
                done.store(true, Ordering::SeqCst);
            });
            let (mut looks, mut short) = (0u64, Vec::new());
            while !done.load(Ordering::SeqCst) {
                match id.look(&path) {
                    Look::Whole => {}
                    other => short.push(other),
                }
                looks += 1;
            }
            (looks, short)
        });
        assert!(looks > 300, "the file was looked at {looks} times");
        assert_eq!(short, vec![], "{} of {looks} looks", short.len());
        assert!(std::fs::metadata(&path).unwrap().len() > 300 * 40_000);
    }

    #[test]
    fn plaintext_is_not_in_the_file() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("t.db"), Duration::from_millis(250)).unwrap();
        s.create_account("ci", None, "test", 1).unwrap();
        let (_, new) = s.create_token(&spec("ci", "x"), "tg", 5, 10).unwrap();
        for f in std::fs::read_dir(d.path()).unwrap() {
            let bytes = std::fs::read(f.unwrap().path()).unwrap();
            let needle = new.plaintext.as_bytes();
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        }
    }

    #[test]
    fn cache_miss_lookups_are_never_re_prepared() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("t.db");
        let s = Store::open(&path, Duration::from_millis(250)).unwrap();
        s.create_account("ci", None, "test", 1).unwrap();
        let hashes: Vec<_> = (0..3)
            .map(|i| {
                s.create_token(&spec("ci", &format!("t{i}")), "tg", 5, 10)
                    .unwrap()
                    .1
                    .hash
            })
            .collect();
        let c = super::open_reader(&path, Duration::from_millis(250)).unwrap();
        let mmap: i64 = c.query_row("PRAGMA mmap_size", [], |r| r.get(0)).unwrap();
        assert_eq!(mmap, super::READER_MMAP_SIZE);
        for _ in 0..5 {
            for h in &hashes {
                let mut st = c.prepare_cached(&super::LOOKUP_SQL).unwrap();
                let found = st.query_map([&h[..]], |_| Ok(())).unwrap().count();
                assert_eq!(found, 1);
            }
        }
        let st = c.prepare_cached(&super::LOOKUP_SQL).unwrap();
        assert_eq!(st.get_status(rusqlite::StatementStatus::Run), 15);
        assert_eq!(
            st.get_status(rusqlite::StatementStatus::RePrepare),
            0,
            "a new bound hash must not make SQLite parse and plan the lookup again"
        );
    }

    #[cfg(unix)]
    #[test]
    fn database_wal_and_shm_are_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("tokengate.db");
        // Under the usual umask (022) SQLite alone would create all three 0644.
        let s = Store::open(&path, Duration::from_millis(250)).unwrap();
        s.ping().unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let p = d.path().join(format!("tokengate.db{suffix}"));
            let mode = std::fs::metadata(&p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{}", p.display());
        }
    }

    fn lost(r: Result<impl std::fmt::Debug, super::StoreError>) -> String {
        match r {
            Err(e @ super::StoreError::FileLost { .. }) => e.to_string(),
            other => panic!("expected FileLost, got {other:?}"),
        }
    }

    #[test]
    fn a_deleted_replaced_or_truncated_file_is_refused_and_the_original_accepted_again() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("t.db");
        let s = Store::open(&path, Duration::from_millis(250)).unwrap();
        s.create_account("ci", None, "test", 1).unwrap();
        let (_, new) = s.create_token(&spec("ci", "x"), "tg", 5, 10).unwrap();
        // Checkpointed, so the main file holds every page and its header counts them.
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        drop(c);
        assert!(s.lookup_hash(&new.hash).unwrap().is_some());

        // Deleted (moved away): every call is refused, reads and writes alike.
        let kept = d.path().join("kept.db");
        std::fs::rename(&path, &kept).unwrap();
        assert!(lost(s.lookup_hash(&new.hash)).contains("was deleted or moved away"));
        assert!(lost(s.create_account("other", None, "test", 2)).contains("deleted"));
        assert!(lost(s.ping()).contains("t.db"));
        // Another file at the path (what a CLI would create there): still refused.
        let other = Store::open(&path, Duration::from_millis(250)).unwrap();
        assert!(other.ping().is_ok());
        assert!(lost(s.lookup_hash(&new.hash)).contains("was replaced by another file"));
        drop(other);
        std::fs::remove_file(&path).unwrap();
        for f in super::super::Store::leftovers(&path) {
            std::fs::remove_file(f).unwrap();
        }
        // The original is back: accepted again, same answers.
        std::fs::rename(&kept, &path).unwrap();
        assert!(s.check_file().is_ok());
        assert!(s.lookup_hash(&new.hash).unwrap().is_some());

        // Cut short in place: an error, not SIGBUS, and named as a truncation.
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let whole = std::fs::read(&path).unwrap();
        f.set_len(len - 4096).unwrap();
        assert!(lost(s.lookup_hash(&new.hash)).contains("was truncated"));
        f.set_len(0).unwrap();
        assert!(lost(s.count_active(0, 0)).contains("truncated"));
        // Damage is remembered: the same bytes written back into the inode are not trusted
        // (the connections' caches and the WAL index no longer describe it).
        std::fs::write(&path, &whole).unwrap();
        assert!(lost(s.lookup_hash(&new.hash)).contains("was truncated"));
        // Another process does not take the emptied file for a new store either.
        f.set_len(0).unwrap();
        let o = options(&path);
        let e = Store::open_existing(&o).err().expect("empty file");
        assert!(e.to_string().contains("is empty"), "{e}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn open_existing_never_creates_a_file() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("t.db");
        let o = options(&path);
        let e = Store::open_existing(&o).err().expect("missing");
        assert!(e.to_string().contains("tokengate store init"), "{e}");
        assert!(!path.exists());
        assert!(std::fs::read_dir(d.path()).unwrap().next().is_none());
        drop(Store::open(&path, Duration::from_millis(250)).unwrap());
        assert!(Store::open_existing(&o).is_ok());
    }

    #[test]
    fn reopening_keeps_schema_version() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("t.db"), Duration::from_millis(250)).unwrap();
        drop(s);
        let s = Store::open(&d.path().join("t.db"), Duration::from_millis(250)).unwrap();
        assert_eq!(s.integrity_check().unwrap(), "ok");
        let v: i64 = rusqlite::Connection::open(d.path().join("t.db"))
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, super::super::SCHEMA_VERSION);
    }
}
