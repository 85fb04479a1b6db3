//! The rows both engines write and read: a token ready to insert, a token row as selected (with
//! its account) and its decoding into [`TokenRow`], the "account is full" error, and one decoder
//! per selected row shape that reads a row of either engine ([`ReadRow`]).
//!
//! Owns: [`NewTokenRow`], [`RawTokenRow`], `TOKEN_COLUMNS`, `from_cells!`. Never imports:
//! `config` or anything outside `store` but `token`.

use super::{
    Account, Change, DumpAccount, DumpChange, DumpToken, NewTokenSpec, RateOverride, StoreError,
    TokenRow,
};
use crate::token::{NewToken, TokenHash};

/// A token row ready to insert (columns as stored).
#[derive(Clone)]
pub(crate) struct NewTokenRow {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) display_prefix: String,
    pub(crate) hash: TokenHash,
    pub(crate) role: Option<String>,
    pub(crate) permissions: String,
    pub(crate) scopes: String,
    pub(crate) allowed_cidrs: String,
    pub(crate) rate_rps: Option<f64>,
    pub(crate) rate_burst: Option<i64>,
    pub(crate) created_at: i64,
    pub(crate) created_by: String,
    pub(crate) expires_at: Option<i64>,
    pub(crate) rotated_from: Option<String>,
}

impl NewTokenRow {
    pub(super) fn new(
        id: &str,
        spec: &NewTokenSpec,
        new: &NewToken,
        rotated_from: Option<&str>,
        now: i64,
    ) -> Self {
        let cidrs: Vec<String> = spec.allowed_cidrs.iter().map(|c| c.to_string()).collect();
        NewTokenRow {
            id: id.to_string(),
            name: spec.name.clone(),
            display_prefix: new.display_prefix.clone(),
            hash: new.hash,
            role: spec.role.clone(),
            permissions: serde_json::to_string(&spec.permissions).expect("serializable"),
            scopes: serde_json::to_string(&spec.scopes).expect("serializable"),
            allowed_cidrs: serde_json::to_string(&cidrs).expect("serializable"),
            rate_rps: spec.rate.map(|r| r.requests_per_second),
            rate_burst: spec.rate.map(|r| i64::from(r.burst)),
            created_at: now,
            created_by: spec.created_by.clone(),
            expires_at: spec.expires_at,
            rotated_from: rotated_from.map(str::to_string),
        }
    }
}

impl NewTokenRow {
    /// The row as stored, owned by `account_id`: what [`token_values!`] binds on insert.
    pub(crate) fn stored(&self, account_id: &str) -> DumpToken {
        DumpToken {
            id: self.id.clone(),
            account_id: account_id.to_string(),
            name: self.name.clone(),
            display_prefix: self.display_prefix.clone(),
            hash: self.hash.to_vec(),
            role: self.role.clone(),
            permissions: self.permissions.clone(),
            scopes: self.scopes.clone(),
            allowed_cidrs: self.allowed_cidrs.clone(),
            rate_rps: self.rate_rps,
            rate_burst: self.rate_burst,
            created_at: self.created_at,
            created_by: self.created_by.clone(),
            expires_at: self.expires_at,
            last_used_at: None,
            last_used_ip: None,
            revoked_at: None,
            revoked_by: None,
            revoke_reason: None,
            rotated_from: self.rotated_from.clone(),
            rotation_deadline: None,
        }
    }
}

/// The 21 values of a stored token row in `DUMP_TOKEN_COLUMNS` order, as an array of references
/// for either engine's parameter type (the caller's annotation picks it), with `rotated_from`
/// given apart: an import inserts every row without it first, then links them.
macro_rules! token_values {
    ($t:expr, $rotated_from:expr) => {
        [
            &$t.id,
            &$t.account_id,
            &$t.name,
            &$t.display_prefix,
            &$t.hash,
            &$t.role,
            &$t.permissions,
            &$t.scopes,
            &$t.allowed_cidrs,
            &$t.rate_rps,
            &$t.rate_burst,
            &$t.created_at,
            &$t.created_by,
            &$t.expires_at,
            &$t.last_used_at,
            &$t.last_used_ip,
            &$t.revoked_at,
            &$t.revoked_by,
            &$t.revoke_reason,
            $rotated_from,
            &$t.rotation_deadline,
        ]
    };
}
pub(crate) use token_values;

/// The columns of a token joined with its account, as both engines read them: the stored token
/// row (the same shape `store dump` copies) plus the account's name and disabled time.
pub(crate) struct RawTokenRow {
    pub(crate) stored: DumpToken,
    pub(crate) account: String,
    pub(crate) account_disabled_at: Option<i64>,
}

/// The select list matching [`RawTokenRow`], over `tokens t JOIN accounts a`: the dump columns
/// in their order, then the account's.
pub(crate) const TOKEN_COLUMNS: &str = "t.id, t.account_id, t.name, t.display_prefix, t.hash, t.role, t.permissions, t.scopes, \
     t.allowed_cidrs, t.rate_rps, t.rate_burst, t.created_at, t.created_by, t.expires_at, t.last_used_at, \
     t.last_used_ip, t.revoked_at, t.revoked_by, t.revoke_reason, t.rotated_from, t.rotation_deadline, \
     a.name, a.disabled_at";

impl RawTokenRow {
    pub(crate) fn into_row(self) -> Result<TokenRow, StoreError> {
        let RawTokenRow {
            stored: t,
            account,
            account_disabled_at,
        } = self;
        let corrupt = |column, e: serde_json::Error| StoreError::Corrupt {
            column,
            message: e.to_string(),
        };
        let permissions =
            serde_json::from_str(&t.permissions).map_err(|e| corrupt("permissions", e))?;
        let scopes = serde_json::from_str(&t.scopes).map_err(|e| corrupt("scopes", e))?;
        let cidr_strings: Vec<String> =
            serde_json::from_str(&t.allowed_cidrs).map_err(|e| corrupt("allowed_cidrs", e))?;
        let mut allowed_cidrs = Vec::with_capacity(cidr_strings.len());
        for c in cidr_strings {
            allowed_cidrs.push(c.parse().map_err(|_| StoreError::Corrupt {
                column: "allowed_cidrs",
                message: format!("`{c}` is not a CIDR"),
            })?);
        }
        let rate = match (t.rate_rps, t.rate_burst) {
            (Some(requests_per_second), Some(burst)) => Some(RateOverride {
                requests_per_second,
                burst: u32::try_from(burst).map_err(|_| StoreError::Corrupt {
                    column: "rate_burst",
                    message: format!("{burst} is out of range"),
                })?,
            }),
            _ => None,
        };
        Ok(TokenRow {
            id: t.id,
            account_id: t.account_id,
            account,
            name: t.name,
            prefix: t.display_prefix,
            role: t.role,
            permissions,
            scopes,
            allowed_cidrs,
            rate,
            created_at: t.created_at,
            created_by: t.created_by,
            expires_at: t.expires_at,
            last_used_at: t.last_used_at,
            last_used_ip: t.last_used_ip,
            revoked_at: t.revoked_at,
            revoked_by: t.revoked_by,
            revoke_reason: t.revoke_reason,
            rotated_from: t.rotated_from,
            rotation_deadline: t.rotation_deadline,
            account_disabled_at,
        })
    }
}

/// The error for a full account: names the limit and lists the active tokens.
pub(crate) fn cap_reached(
    account: String,
    limit: u32,
    active: &[(String, String, String)],
) -> StoreError {
    let list = active
        .iter()
        .map(|(id, name, prefix)| format!("  {id}  {prefix}  {name}"))
        .collect::<Vec<_>>()
        .join("\n");
    StoreError::CapReached {
        account,
        limit,
        list,
    }
}

/// A value both engines can read from a column (strings, integers, floats, bytes, and their
/// `Option`s).
pub(crate) trait Cell:
    rusqlite::types::FromSql + for<'a> tokio_postgres::types::FromSql<'a>
{
}
impl<T> Cell for T where T: rusqlite::types::FromSql + for<'a> tokio_postgres::types::FromSql<'a> {}

/// A selected row of either engine, read by column index, so each row shape below is decoded by
/// one function whatever the engine.
pub(crate) trait ReadRow {
    /// The engine's error.
    type Error;
    /// The value of column `i`.
    fn cell<T: Cell>(&self, i: usize) -> Result<T, Self::Error>;
}

impl ReadRow for rusqlite::Row<'_> {
    type Error = rusqlite::Error;
    fn cell<T: Cell>(&self, i: usize) -> Result<T, rusqlite::Error> {
        self.get(i)
    }
}

impl ReadRow for tokio_postgres::Row {
    type Error = tokio_postgres::Error;
    fn cell<T: Cell>(&self, i: usize) -> Result<T, tokio_postgres::Error> {
        self.try_get(i)
    }
}

/// Decodes a selected row of either engine into `Type { a, b, .. }`: column 0 into `a`, 1 into
/// `b`, and so on, so the fields are named in the order of the select list and the column
/// numbers are never written out.
macro_rules! from_cells {
    ($r:expr => $ty:ident { $($field:ident),* $(,)? }) => {{
        let r = $r;
        let mut column = 0..;
        Ok($ty {
            $($field: $crate::store::row::ReadRow::cell(r, column.next().expect("unbounded"))?,)*
        })
    }};
}
pub(crate) use from_cells;

/// `SELECT id, name, email, created_at, created_by, disabled_at FROM accounts`.
pub(crate) fn account<R: ReadRow>(r: &R) -> Result<Account, R::Error> {
    from_cells!(r => Account { id, name, email, created_at, created_by, disabled_at })
}

/// `SELECT {TOKEN_COLUMNS}`.
pub(crate) fn raw_token<R: ReadRow>(r: &R) -> Result<RawTokenRow, R::Error> {
    Ok(RawTokenRow {
        stored: dump_token(r)?,
        account: r.cell(21)?,
        account_disabled_at: r.cell(22)?,
    })
}

/// `SELECT seq, kind, token_id, account_id FROM changes`.
pub(crate) fn change<R: ReadRow>(r: &R) -> Result<Change, R::Error> {
    from_cells!(r => Change { seq, kind, token_id, account_id })
}

/// `SELECT id, line FROM audit_outbox`.
pub(crate) fn outbox<R: ReadRow>(r: &R) -> Result<(i64, String), R::Error> {
    Ok((r.cell(0)?, r.cell(1)?))
}

/// `SELECT id, name, email, created_at, created_by, disabled_at, disabled_by FROM accounts`.
pub(crate) fn dump_account<R: ReadRow>(r: &R) -> Result<DumpAccount, R::Error> {
    from_cells!(r => DumpAccount {
        id, name, email, created_at, created_by, disabled_at, disabled_by
    })
}

/// `SELECT {DUMP_TOKEN_COLUMNS} FROM tokens`.
pub(crate) fn dump_token<R: ReadRow>(r: &R) -> Result<DumpToken, R::Error> {
    from_cells!(r => DumpToken {
        id, account_id, name, display_prefix, hash, role, permissions, scopes,
        allowed_cidrs, rate_rps, rate_burst, created_at, created_by, expires_at,
        last_used_at, last_used_ip, revoked_at, revoked_by, revoke_reason, rotated_from,
        rotation_deadline
    })
}

/// `SELECT seq, at, kind, token_id, account_id FROM changes`.
pub(crate) fn dump_change<R: ReadRow>(r: &R) -> Result<DumpChange, R::Error> {
    from_cells!(r => DumpChange { seq, at, kind, token_id, account_id })
}
