//! The rows both engines write and read: a token ready to insert, a token row as selected (with
//! its account) and its decoding into [`TokenRow`], and the "account is full" error.
//!
//! Owns: [`NewTokenRow`], [`RawTokenRow`], `TOKEN_COLUMNS`. Never imports: `config` or anything
//! outside `store` but `token`.

use super::{NewTokenSpec, RateOverride, StoreError, TokenRow};
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

/// The columns of a token joined with its account, as both engines read them.
pub(crate) struct RawTokenRow {
    pub(crate) id: String,
    pub(crate) account_id: String,
    pub(crate) account: String,
    pub(crate) name: String,
    pub(crate) prefix: String,
    pub(crate) role: Option<String>,
    pub(crate) permissions: String,
    pub(crate) scopes: String,
    pub(crate) allowed_cidrs: String,
    pub(crate) rate_rps: Option<f64>,
    pub(crate) rate_burst: Option<i64>,
    pub(crate) created_at: i64,
    pub(crate) created_by: String,
    pub(crate) expires_at: Option<i64>,
    pub(crate) last_used_at: Option<i64>,
    pub(crate) last_used_ip: Option<String>,
    pub(crate) revoked_at: Option<i64>,
    pub(crate) revoked_by: Option<String>,
    pub(crate) revoke_reason: Option<String>,
    pub(crate) rotated_from: Option<String>,
    pub(crate) rotation_deadline: Option<i64>,
    pub(crate) account_disabled_at: Option<i64>,
}

/// The select list matching [`RawTokenRow`], over `tokens t JOIN accounts a`.
pub(crate) const TOKEN_COLUMNS: &str = "t.id, t.account_id, a.name, t.name, t.display_prefix, t.role, t.permissions, t.scopes, \
     t.allowed_cidrs, t.rate_rps, t.rate_burst, t.created_at, t.created_by, t.expires_at, t.last_used_at, \
     t.last_used_ip, t.revoked_at, t.revoked_by, t.revoke_reason, t.rotated_from, t.rotation_deadline, a.disabled_at";

impl RawTokenRow {
    pub(crate) fn into_row(self) -> Result<TokenRow, StoreError> {
        let corrupt = |column, e: serde_json::Error| StoreError::Corrupt {
            column,
            message: e.to_string(),
        };
        let permissions =
            serde_json::from_str(&self.permissions).map_err(|e| corrupt("permissions", e))?;
        let scopes = serde_json::from_str(&self.scopes).map_err(|e| corrupt("scopes", e))?;
        let cidr_strings: Vec<String> =
            serde_json::from_str(&self.allowed_cidrs).map_err(|e| corrupt("allowed_cidrs", e))?;
        let mut allowed_cidrs = Vec::with_capacity(cidr_strings.len());
        for c in cidr_strings {
            allowed_cidrs.push(c.parse().map_err(|_| StoreError::Corrupt {
                column: "allowed_cidrs",
                message: format!("`{c}` is not a CIDR"),
            })?);
        }
        let rate = match (self.rate_rps, self.rate_burst) {
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
            id: self.id,
            account_id: self.account_id,
            account: self.account,
            name: self.name,
            prefix: self.prefix,
            role: self.role,
            permissions,
            scopes,
            allowed_cidrs,
            rate,
            created_at: self.created_at,
            created_by: self.created_by,
            expires_at: self.expires_at,
            last_used_at: self.last_used_at,
            last_used_ip: self.last_used_ip,
            revoked_at: self.revoked_at,
            revoked_by: self.revoked_by,
            revoke_reason: self.revoke_reason,
            rotated_from: self.rotated_from,
            rotation_deadline: self.rotation_deadline,
            account_disabled_at: self.account_disabled_at,
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
