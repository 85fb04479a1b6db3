//! Approval requests and MFA enrolments (issue 19), on both engines.
//!
//! The SQL here is written once with `$n` placeholders and the same column types on both engines
//! (BIGINT/INTEGER, TEXT, BYTEA/BLOB); each engine runs it through its small `Arg`
//! bridge (`exec_args`, `query_args`, `write_args`, which `store::sessions` uses too). Every
//! state change is a conditional `UPDATE` (from one status to the next, or a TOTP step only
//! upwards), so two replicas racing on the same approval or the same code cannot both win.
//!
//! Owns: the `approvals` and `mfa` tables (schema migration 4), [`ApprovalRow`], [`MfaRow`], the
//! `Arg` bridge. Never imports: `config`, `gateway`, `admin` or `cli`.

use serde::Serialize;

use super::Backend;

use super::row::{ReadRow, from_cells};
use super::{Store, StoreError};

/// Migration 4, written once for both engines: `$int` and `$bytes` are the engine's 64-bit
/// integer and byte-string types.
#[rustfmt::skip]
macro_rules! approvals_migration {
    ($int:literal, $bytes:literal) => {
        concat!("CREATE TABLE approvals (
        id TEXT PRIMARY KEY,
        rule TEXT NOT NULL,
        params TEXT NOT NULL,
        message TEXT NOT NULL,
        token_id TEXT NOT NULL,
        token_prefix TEXT NOT NULL,
        account TEXT NOT NULL,
        status TEXT NOT NULL,
        requested_at ", $int, " NOT NULL,
        decided_at ", $int, ",
        decided_by TEXT,
        note TEXT,
        window_ms ", $int, " NOT NULL,
        expires_at ", $int, ",
        used_count ", $int, " NOT NULL DEFAULT 0,
        last_used_at ", $int, "
    );
    CREATE INDEX approvals_binding ON approvals(token_id, rule, status);
    CREATE INDEX approvals_requested ON approvals(requested_at);
    CREATE TABLE mfa (
        account_id TEXT PRIMARY KEY,
        secret ", $bytes, " NOT NULL,
        active ", $int, " NOT NULL,
        last_step ", $int, " NOT NULL,
        created_at ", $int, " NOT NULL,
        recovery TEXT NOT NULL
    );")
    };
}

/// Migration 4 on SQLite.
pub(crate) const SQLITE_MIGRATION: &str = approvals_migration!("INTEGER", "BLOB");

/// Migration 4 on PostgreSQL (the same tables in its types).
pub(crate) const PG_MIGRATION: &str = approvals_migration!("BIGINT", "BYTEA");

/// A bound parameter.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    /// BIGINT / INTEGER.
    I(Option<i64>),
    /// TEXT.
    T(Option<String>),
    /// BYTEA / BLOB.
    B(Vec<u8>),
}

/// `$n` placeholders as SQLite writes them (`?n`).
pub(crate) fn sqlite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

/// One approval request, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApprovalRow {
    /// `apr_...`.
    pub id: String,
    /// The rule's `name`.
    pub rule: String,
    /// The captured parameters it is bound to, canonical JSON (an object, keys sorted).
    pub params: String,
    /// Why (from the requester).
    pub message: String,
    /// The requesting token's id.
    pub token_id: String,
    /// Its display prefix.
    pub token_prefix: String,
    /// Its account's name.
    pub account: String,
    /// `pending`, `approved`, `rejected`, `expired`.
    pub status: String,
    /// Unix ms.
    pub requested_at: i64,
    /// Unix ms of approval or rejection.
    pub decided_at: Option<i64>,
    /// Who decided: `account/token id` of the person's session.
    pub decided_by: Option<String>,
    /// The decider's note.
    pub note: Option<String>,
    /// The rule's window, ms.
    pub window_ms: i64,
    /// Approved: end of the window (Unix ms).
    pub expires_at: Option<i64>,
    /// Calls that went through under it.
    pub used_count: i64,
    /// Last such call (Unix ms).
    pub last_used_at: Option<i64>,
}

const APPROVAL_COLUMNS: &str = "id, rule, params, message, token_id, token_prefix, account, status, requested_at, decided_at, decided_by, note, window_ms, expires_at, used_count, last_used_at";
/// `SELECT {APPROVAL_COLUMNS} FROM approvals`, on either engine.
fn approval<R: ReadRow>(r: &R) -> Result<ApprovalRow, R::Error> {
    from_cells!(r => ApprovalRow {
        id, rule, params, message, token_id, token_prefix, account, status, requested_at,
        decided_at, decided_by, note, window_ms, expires_at, used_count, last_used_at
    })
}

/// One account's TOTP enrolment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MfaRow {
    /// The account (`acc_...`).
    pub account_id: String,
    /// The secret, sealed (nonce ‖ AES-GCM ciphertext ‖ tag); never stored in clear.
    pub secret: Vec<u8>,
    /// Confirmed with a first code.
    pub active: bool,
    /// The last TOTP step accepted (a code is used once).
    pub last_step: i64,
    /// Unix ms.
    pub created_at: i64,
    /// Unused recovery codes, as SHA-256 hex hashes.
    pub recovery: Vec<String>,
}

/// `SELECT {MFA_COLUMNS} FROM mfa`, on either engine: `active` is stored as 0 or 1, the
/// recovery hashes as a JSON list.
fn mfa<R: ReadRow>(r: &R) -> Result<MfaRow, R::Error> {
    let (account_id, secret, active, last_step, created_at, recovery): (
        String,
        Vec<u8>,
        i64,
        i64,
        i64,
        String,
    ) = (
        r.cell(0)?,
        r.cell(1)?,
        r.cell(2)?,
        r.cell(3)?,
        r.cell(4)?,
        r.cell(5)?,
    );
    Ok(MfaRow {
        account_id,
        secret,
        active: active != 0,
        last_step,
        created_at,
        recovery: serde_json::from_str(&recovery).unwrap_or_default(),
    })
}

const MFA_COLUMNS: &str = "account_id, secret, active, last_step, created_at, recovery";

fn t(s: &str) -> Arg {
    Arg::T(Some(s.to_string()))
}
fn ot(s: Option<&str>) -> Arg {
    Arg::T(s.map(str::to_string))
}
fn i(v: i64) -> Arg {
    Arg::I(Some(v))
}

impl Store {
    /// Runs one statement written with `$n` placeholders on either engine; rows changed.
    pub(super) fn exec_args(&self, sql: &str, args: Vec<Arg>) -> Result<u64, StoreError> {
        on_backend!(self, b => b.exec_args(sql, args))
    }

    // The closures stay: a SQLite row borrows its statement, and a generic fn item is not
    // general enough over that lifetime.
    #[allow(clippy::redundant_closure)]
    fn approval_rows(&self, sql: &str, args: Vec<Arg>) -> Result<Vec<ApprovalRow>, StoreError> {
        on_backend!(self, b => b.query_args(sql, args, |r| approval(r)))
    }

    #[allow(clippy::redundant_closure)]
    fn mfa_rows(&self, sql: &str, args: Vec<Arg>) -> Result<Vec<MfaRow>, StoreError> {
        on_backend!(self, b => b.query_args(sql, args, |r| mfa(r)))
    }

    // ------------------------------------------------------------ approvals

    /// Stores a new (pending) approval request.
    pub fn approval_insert(&self, a: &ApprovalRow) -> Result<(), StoreError> {
        self.exec_args(
            &format!(
                "INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
            ),
            vec![
                t(&a.id),
                t(&a.rule),
                t(&a.params),
                t(&a.message),
                t(&a.token_id),
                t(&a.token_prefix),
                t(&a.account),
                t(&a.status),
                i(a.requested_at),
                Arg::I(a.decided_at),
                ot(a.decided_by.as_deref()),
                ot(a.note.as_deref()),
                i(a.window_ms),
                Arg::I(a.expires_at),
                i(a.used_count),
                Arg::I(a.last_used_at),
            ],
        )?;
        Ok(())
    }

    /// One approval request by id.
    pub fn approval_get(&self, id: &str) -> Result<Option<ApprovalRow>, StoreError> {
        let rows = self.approval_rows(
            &format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = $1"),
            vec![t(id)],
        )?;
        Ok(rows.into_iter().next())
    }

    /// The newest `limit` approval requests, optionally only those of one token.
    pub fn approval_list(
        &self,
        token_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ApprovalRow>, StoreError> {
        match token_id {
            Some(tok) => self.approval_rows(
                &format!(
                    "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE token_id = $1 ORDER BY requested_at DESC, id LIMIT $2"
                ),
                vec![t(tok), i(limit as i64)],
            ),
            None => self.approval_rows(
                &format!(
                    "SELECT {APPROVAL_COLUMNS} FROM approvals ORDER BY requested_at DESC, id LIMIT $1"
                ),
                vec![i(limit as i64)],
            ),
        }
    }

    /// The live (pending or approved) requests bound to exactly this token, rule and parameters.
    pub fn approval_bound(
        &self,
        token_id: &str,
        rule: &str,
        params: &str,
    ) -> Result<Vec<ApprovalRow>, StoreError> {
        self.approval_rows(
            &format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE token_id = $1 AND rule = $2 AND params = $3 AND status IN ('pending', 'approved') ORDER BY requested_at DESC, id"
            ),
            vec![t(token_id), t(rule), t(params)]
        )
    }

    /// Moves a request from `from` to `to` (approve, reject, expire); false when it was no longer
    /// in `from` (another replica or person decided first).
    #[allow(clippy::too_many_arguments)]
    pub fn approval_transition(
        &self,
        id: &str,
        from: &str,
        to: &str,
        decided_at: Option<i64>,
        decided_by: Option<&str>,
        note: Option<&str>,
        expires_at: Option<i64>,
    ) -> Result<bool, StoreError> {
        let n = self.exec_args(
            "UPDATE approvals SET status = $1, decided_at = COALESCE($2, decided_at), decided_by = COALESCE($3, decided_by), note = COALESCE($4, note), expires_at = COALESCE($5, expires_at) WHERE id = $6 AND status = $7",
            vec![
                t(to),
                Arg::I(decided_at),
                ot(decided_by),
                ot(note),
                Arg::I(expires_at),
                t(id),
                t(from),
            ],
        )?;
        Ok(n == 1)
    }

    /// Counts one call made under an approved request still inside its window; false when it is
    /// no longer approved or its window has ended.
    pub fn approval_use(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let n = self.exec_args(
            "UPDATE approvals SET used_count = used_count + 1, last_used_at = $1 WHERE id = $2 AND status = 'approved' AND expires_at > $3",
            vec![i(now), t(id), i(now)],
        )?;
        Ok(n == 1)
    }

    // ------------------------------------------------------------ MFA

    /// An account's enrolment.
    pub fn mfa_get(&self, account_id: &str) -> Result<Option<MfaRow>, StoreError> {
        let rows = self.mfa_rows(
            &format!("SELECT {MFA_COLUMNS} FROM mfa WHERE account_id = $1"),
            vec![t(account_id)],
        )?;
        Ok(rows.into_iter().next())
    }

    /// Starts (or restarts) an enrolment that is not active yet; false when the account already
    /// has an active one.
    pub fn mfa_begin(&self, row: &MfaRow) -> Result<bool, StoreError> {
        self.exec_args(
            "DELETE FROM mfa WHERE account_id = $1 AND active = 0",
            vec![t(&row.account_id)],
        )?;
        let existing = self.mfa_get(&row.account_id)?;
        if existing.is_some() {
            return Ok(false);
        }
        let recovery = serde_json::to_string(&row.recovery).unwrap_or_else(|_| "[]".into());
        self.exec_args(
            &format!("INSERT INTO mfa ({MFA_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"),
            vec![
                t(&row.account_id),
                Arg::B(row.secret.clone()),
                i(row.active as i64),
                i(row.last_step),
                i(row.created_at),
                t(&recovery),
            ],
        )?;
        Ok(true)
    }

    /// Marks the enrolment confirmed.
    pub fn mfa_activate(&self, account_id: &str) -> Result<bool, StoreError> {
        Ok(self.exec_args(
            "UPDATE mfa SET active = 1 WHERE account_id = $1",
            vec![t(account_id)],
        )? == 1)
    }

    /// Records `step` as used, only when it is above the last one (false: a replay).
    pub fn mfa_use_step(&self, account_id: &str, step: i64) -> Result<bool, StoreError> {
        Ok(self.exec_args(
            "UPDATE mfa SET last_step = $1 WHERE account_id = $2 AND last_step < $3",
            vec![i(step), t(account_id), i(step)],
        )? == 1)
    }

    /// Spends one recovery code (by its hash); false when it is not (or no longer) there.
    pub fn mfa_use_recovery(&self, account_id: &str, hash: &str) -> Result<bool, StoreError> {
        let Some(row) = self.mfa_get(account_id)? else {
            return Ok(false);
        };
        if !row.recovery.iter().any(|h| h == hash) {
            return Ok(false);
        }
        let old = serde_json::to_string(&row.recovery).unwrap_or_default();
        let left: Vec<&String> = row.recovery.iter().filter(|h| *h != hash).collect();
        let new = serde_json::to_string(&left).unwrap_or_default();
        // Compare-and-swap on the whole list: two uses of the same code cannot both succeed.
        Ok(self.exec_args(
            "UPDATE mfa SET recovery = $1 WHERE account_id = $2 AND recovery = $3",
            vec![t(&new), t(account_id), t(&old)],
        )? == 1)
    }

    /// Every approval request, by id (for `store copy`).
    pub fn approval_all(&self) -> Result<Vec<ApprovalRow>, StoreError> {
        self.approval_rows(
            &format!("SELECT {APPROVAL_COLUMNS} FROM approvals ORDER BY id"),
            vec![],
        )
    }

    /// Every MFA enrolment, by account (for `store copy`; secrets stay sealed).
    pub fn mfa_all(&self) -> Result<Vec<MfaRow>, StoreError> {
        self.mfa_rows(
            &format!("SELECT {MFA_COLUMNS} FROM mfa ORDER BY account_id"),
            vec![],
        )
    }

    /// `store copy`, after the main tables: approval requests and MFA enrolments, row by row,
    /// into `dest` (whose own are empty), then read back and compared.
    pub(crate) fn copy_people_to(&self, dest: &Store) -> Result<(), StoreError> {
        let (approvals, mfa) = (self.approval_all()?, self.mfa_all()?);
        let (there_a, there_m) = (dest.approval_all()?.len(), dest.mfa_all()?.len());
        if there_a + there_m > 0 {
            return Err(StoreError::NotEmpty {
                target: dest.location(),
                what: format!("{there_a} approval requests, {there_m} MFA enrolments"),
            });
        }
        for a in &approvals {
            dest.approval_insert(a)?;
        }
        for m in &mfa {
            dest.mfa_begin(m)?;
        }
        if dest.approval_all()? != approvals || dest.mfa_all()? != mfa {
            return Err(StoreError::CopyMismatch(format!(
                "wrote {} approval requests and {} MFA enrolments; read back something else",
                approvals.len(),
                mfa.len()
            )));
        }
        Ok(())
    }

    /// Removes an account's enrolment (an admin reset).
    pub fn mfa_remove(&self, account_id: &str) -> Result<bool, StoreError> {
        Ok(self.exec_args("DELETE FROM mfa WHERE account_id = $1", vec![t(account_id)])? == 1)
    }
}

impl super::sqlite::Sqlite {
    /// Runs one statement written with `$n` placeholders, `args` bound to them; rows changed.
    pub(crate) fn exec_args(&self, sql: &str, args: Vec<Arg>) -> Result<u64, StoreError> {
        let sql = sqlite_sql(sql);
        self.write(|tx| {
            let n = tx.execute(&sql, sqlite_params(args)).map_err(self.err())?;
            Ok(n as u64)
        })
    }

    /// Runs one query written with `$n` placeholders on a reader, `args` bound to them; every
    /// row mapped with `row`.
    pub(crate) fn query_args<T>(
        &self,
        sql: &str,
        args: Vec<Arg>,
        row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, StoreError> {
        let sql = sqlite_sql(sql);
        self.with_reader(|c| self.query_all(c, &sql, sqlite_params(args), row))
    }

    /// Like [`Self::query_args`], in a write transaction: for a statement that writes and
    /// returns rows (`RETURNING`).
    pub(crate) fn write_args<T>(
        &self,
        sql: &str,
        args: Vec<Arg>,
        row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, StoreError> {
        let sql = sqlite_sql(sql);
        self.write(|tx| self.query_all(tx, &sql, sqlite_params(args), row))
    }
}

/// `args` as SQLite binds them.
fn sqlite_params(args: Vec<Arg>) -> rusqlite::ParamsFromIter<Vec<Box<dyn rusqlite::ToSql>>> {
    rusqlite::params_from_iter(
        args.into_iter()
            .map(|a| -> Box<dyn rusqlite::ToSql> {
                match a {
                    Arg::I(v) => Box::new(v),
                    Arg::T(v) => Box::new(v),
                    Arg::B(v) => Box::new(v),
                }
            })
            .collect::<Vec<_>>(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, status: &str) -> ApprovalRow {
        ApprovalRow {
            id: id.into(),
            rule: "deploy".into(),
            params: r#"{"app":"billing"}"#.into(),
            message: "release".into(),
            token_id: "tok_1".into(),
            token_prefix: "tg_x".into(),
            account: "ci".into(),
            status: status.into(),
            requested_at: 10,
            decided_at: None,
            decided_by: None,
            note: None,
            window_ms: 900_000,
            expires_at: None,
            used_count: 0,
            last_used_at: None,
        }
    }

    #[test]
    fn approvals_move_once_and_are_used_inside_their_window() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("t.db"), super::super::DEFAULT_BUSY_TIMEOUT).unwrap();
        s.approval_insert(&row("apr_1", "pending")).unwrap();
        assert_eq!(s.approval_get("apr_1").unwrap().unwrap().status, "pending");
        assert!(
            !s.approval_use("apr_1", 20).unwrap(),
            "pending is not usable"
        );
        assert!(
            s.approval_transition(
                "apr_1",
                "pending",
                "approved",
                Some(20),
                Some("ops"),
                Some("ok"),
                Some(100)
            )
            .unwrap()
        );
        assert!(
            !s.approval_transition(
                "apr_1",
                "pending",
                "rejected",
                Some(21),
                Some("x"),
                None,
                None
            )
            .unwrap(),
            "decided once"
        );
        assert!(s.approval_use("apr_1", 50).unwrap());
        assert!(!s.approval_use("apr_1", 100).unwrap(), "window ended");
        let a = s.approval_get("apr_1").unwrap().unwrap();
        assert_eq!((a.used_count, a.note.as_deref()), (1, Some("ok")));
        assert_eq!(
            s.approval_bound("tok_1", "deploy", r#"{"app":"billing"}"#)
                .unwrap()
                .len(),
            1
        );
        assert!(
            s.approval_bound("tok_1", "deploy", r#"{"app":"web"}"#)
                .unwrap()
                .is_empty()
        );
        assert_eq!(s.approval_list(None, 10).unwrap().len(), 1);
        assert!(s.approval_list(Some("tok_2"), 10).unwrap().is_empty());
    }

    #[test]
    fn mfa_steps_only_go_up_and_recovery_codes_are_single_use() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("t.db"), super::super::DEFAULT_BUSY_TIMEOUT).unwrap();
        let r = MfaRow {
            account_id: "acc_1".into(),
            secret: vec![1, 2, 3],
            active: false,
            last_step: 0,
            created_at: 1,
            recovery: vec!["h1".into(), "h2".into()],
        };
        assert!(s.mfa_begin(&r).unwrap());
        assert!(
            s.mfa_begin(&r).unwrap(),
            "an unconfirmed enrolment restarts"
        );
        assert!(s.mfa_activate("acc_1").unwrap());
        assert!(!s.mfa_begin(&r).unwrap(), "an active one is kept");
        assert!(s.mfa_use_step("acc_1", 5).unwrap());
        assert!(!s.mfa_use_step("acc_1", 5).unwrap());
        assert!(!s.mfa_use_step("acc_1", 4).unwrap());
        assert!(s.mfa_use_recovery("acc_1", "h1").unwrap());
        assert!(!s.mfa_use_recovery("acc_1", "h1").unwrap());
        let got = s.mfa_get("acc_1").unwrap().unwrap();
        assert_eq!(
            (got.active, got.last_step, got.recovery),
            (true, 5, vec!["h2".to_string()])
        );
    }
}
