//! Web UI sessions and pending OpenID Connect sign-ins, kept in the store so that they survive a
//! restart and every replica on the same PostgreSQL database sees them.
//!
//! A session row is keyed by SHA-256 of its cookie value (the value itself is never stored); a
//! sign-in in progress by SHA-256 of its `state`, and it is taken (read and deleted) exactly once.
//! The lifetimes are the caller's: every call that judges a session gets the idle and absolute
//! limits from it. Schema migration 3 creates both tables on both engines; the SQL is written
//! once with `$n` placeholders and runs on either engine through `store::approvals`' `Arg` bridge.
//!
//! Owns: the `admin_sessions` and `oidc_logins` tables and their SQL. Never imports: `config`,
//! `admin`, `gateway`, `audit` or `cli`.

use serde::Serialize;

use super::approvals::Arg;
use super::row::{ReadRow, from_cells};
use super::{Backend, Store, StoreError};

/// Migration 3, written once for both engines: `$int` is the engine's 64-bit integer type.
#[rustfmt::skip]
macro_rules! sessions_migration {
    ($int:literal) => {
        concat!("CREATE TABLE admin_sessions (
        id_hash TEXT PRIMARY KEY,
        public_id TEXT NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        kind TEXT NOT NULL,
        token_id TEXT,
        subject TEXT,
        email TEXT,
        account TEXT,
        access TEXT NOT NULL,
        csrf TEXT NOT NULL,
        created_at ", $int, " NOT NULL,
        last_seen_at ", $int, " NOT NULL,
        expires_at ", $int, " NOT NULL,
        mfa_verified_at ", $int, ",
        client_ip TEXT,
        user_agent TEXT
    );
    CREATE INDEX admin_sessions_owner ON admin_sessions(owner);
    CREATE TABLE oidc_logins (
        state_hash TEXT PRIMARY KEY,
        binding_hash TEXT NOT NULL,
        nonce TEXT NOT NULL,
        verifier TEXT NOT NULL,
        return_to TEXT NOT NULL,
        expires_at ", $int, " NOT NULL
    );")
    };
}

/// Migration 3 on SQLite.
pub(crate) const SQLITE_MIGRATION: &str = sessions_migration!("INTEGER");

/// Migration 3 on PostgreSQL (the same tables in its types).
pub(crate) const PG_MIGRATION: &str = sessions_migration!("BIGINT");

const COLUMNS: &str = "id_hash, public_id, owner, kind, token_id, subject, email, account, access, csrf, \
     created_at, last_seen_at, expires_at, mfa_verified_at, client_ip, user_agent";

/// One web UI session as stored (the cookie value is not: `id_hash` is its SHA-256, hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionRow {
    /// SHA-256 of the cookie value, hex.
    #[serde(skip)]
    pub id_hash: String,
    /// The id shown in lists and used to revoke it (`ses_...`): not a credential.
    pub public_id: String,
    /// Whose session: `token:<token id>` or `oidc:<issuer subject>`; "one's sessions" share it.
    pub owner: String,
    /// `token` (signed in with an API token) or `oidc` (signed in with OpenID Connect).
    pub kind: String,
    /// The token that signed in (kind `token`).
    pub token_id: Option<String>,
    /// The provider's `sub` (kind `oidc`).
    pub subject: Option<String>,
    /// The person's email (kind `oidc`).
    pub email: Option<String>,
    /// The account the person acts for (kind `oidc`).
    pub account: Option<String>,
    /// `self` or `admin` (kind `oidc`; a token session's access is its token's).
    pub access: String,
    /// CSRF token the page echoes in `X-CSRF-Token`.
    #[serde(skip)]
    pub csrf: String,
    /// Created (ms).
    pub created_at: i64,
    /// Last request (ms); the idle lifetime counts from here.
    pub last_seen_at: i64,
    /// End of the absolute lifetime (ms).
    pub expires_at: i64,
    /// Last MFA step-up (ms), when there was one in this session.
    pub mfa_verified_at: Option<i64>,
    /// Client address at sign-in.
    pub client_ip: Option<String>,
    /// User agent at sign-in.
    pub user_agent: Option<String>,
}

impl SessionRow {
    /// Expired when idle for `idle_ms` or past its absolute end.
    pub fn expired(&self, now: i64, idle_ms: i64) -> bool {
        now >= self.expires_at || now - self.last_seen_at >= idle_ms
    }
}

/// A sign-in in progress: what the callback must find again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginState {
    /// SHA-256 of `state`, hex.
    pub state_hash: String,
    /// SHA-256 of the browser-binding cookie, hex.
    pub binding_hash: String,
    /// The nonce sent in the authorization request.
    pub nonce: String,
    /// The PKCE code verifier.
    pub verifier: String,
    /// Where to send the browser afterwards (a local path).
    pub return_to: String,
    /// Ends (ms).
    pub expires_at: i64,
}

/// `SELECT {COLUMNS} FROM admin_sessions`, on either engine.
fn session<R: ReadRow>(r: &R) -> Result<SessionRow, R::Error> {
    from_cells!(r => SessionRow {
        id_hash, public_id, owner, kind, token_id, subject, email, account, access, csrf,
        created_at, last_seen_at, expires_at, mfa_verified_at, client_ip, user_agent
    })
}

/// `SELECT state_hash, binding_hash, nonce, verifier, return_to, expires_at FROM oidc_logins`,
/// on either engine.
fn login<R: ReadRow>(r: &R) -> Result<LoginState, R::Error> {
    from_cells!(r => LoginState {
        state_hash, binding_hash, nonce, verifier, return_to, expires_at
    })
}

impl Store {
    /// Runs one statement that writes and returns session rows (`RETURNING`), on either engine,
    /// in a write transaction.
    // The closures stay: a SQLite row borrows its statement, and a generic fn item is not
    // general enough over that lifetime.
    #[allow(clippy::redundant_closure)]
    fn session_rows(&self, sql: &str, args: Vec<Arg>) -> Result<Vec<SessionRow>, StoreError> {
        on_backend!(self, b => b.write_args(sql, args, |r| session(r)))
    }

    /// Runs one `SELECT` of session rows on a reader, on either engine: no write lock taken,
    /// no write counted.
    // The closure stays, as in `session_rows`.
    #[allow(clippy::redundant_closure)]
    fn session_select(&self, sql: &str, args: Vec<Arg>) -> Result<Vec<SessionRow>, StoreError> {
        on_backend!(self, b => b.query_args(sql, args, |r| session(r)))
    }

    /// Stores a new session.
    pub fn session_insert(&self, s: &SessionRow) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO admin_sessions ({COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) RETURNING {COLUMNS}"
        );
        let ps = vec![
            Arg::T(Some(s.id_hash.clone())),
            Arg::T(Some(s.public_id.clone())),
            Arg::T(Some(s.owner.clone())),
            Arg::T(Some(s.kind.clone())),
            Arg::T(s.token_id.clone()),
            Arg::T(s.subject.clone()),
            Arg::T(s.email.clone()),
            Arg::T(s.account.clone()),
            Arg::T(Some(s.access.clone())),
            Arg::T(Some(s.csrf.clone())),
            Arg::I(Some(s.created_at)),
            Arg::I(Some(s.last_seen_at)),
            Arg::I(Some(s.expires_at)),
            Arg::I(s.mfa_verified_at),
            Arg::T(s.client_ip.clone()),
            Arg::T(s.user_agent.clone()),
        ];
        self.session_rows(&sql, ps).map(|_| ())
    }

    /// The session whose cookie hashes to `id_hash`, whatever its age.
    pub fn session_get(&self, id_hash: &str) -> Result<Option<SessionRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM admin_sessions WHERE id_hash = $1");
        Ok(self
            .session_select(&sql, vec![Arg::T(Some(id_hash.into()))])?
            .pop())
    }

    /// Records a request at `now` (restarts the idle lifetime).
    pub fn session_touch(&self, id_hash: &str, now: i64) -> Result<(), StoreError> {
        let sql = format!(
            "UPDATE admin_sessions SET last_seen_at = $2 WHERE id_hash = $1 RETURNING {COLUMNS}"
        );
        self.session_rows(&sql, vec![Arg::T(Some(id_hash.into())), Arg::I(Some(now))])
            .map(|_| ())
    }

    /// Records an MFA step-up at `now`; false when the session is gone.
    pub fn session_set_mfa(&self, id_hash: &str, now: i64) -> Result<bool, StoreError> {
        let sql = format!(
            "UPDATE admin_sessions SET mfa_verified_at = $2 WHERE id_hash = $1 RETURNING {COLUMNS}"
        );
        Ok(!self
            .session_rows(&sql, vec![Arg::T(Some(id_hash.into())), Arg::I(Some(now))])?
            .is_empty())
    }

    /// Every session of `owner`, newest first.
    pub fn session_list(&self, owner: &str) -> Result<Vec<SessionRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM admin_sessions WHERE owner = $1 ORDER BY created_at DESC, public_id"
        );
        self.session_select(&sql, vec![Arg::T(Some(owner.into()))])
    }

    /// Every session, newest first (for an admin).
    pub fn session_list_all(&self) -> Result<Vec<SessionRow>, StoreError> {
        let sql =
            format!("SELECT {COLUMNS} FROM admin_sessions ORDER BY created_at DESC, public_id");
        self.session_select(&sql, vec![])
    }

    /// Deletes the session whose cookie hashes to `id_hash`; returns it when it existed.
    pub fn session_delete(&self, id_hash: &str) -> Result<Option<SessionRow>, StoreError> {
        let sql = format!("DELETE FROM admin_sessions WHERE id_hash = $1 RETURNING {COLUMNS}");
        Ok(self
            .session_rows(&sql, vec![Arg::T(Some(id_hash.into()))])?
            .pop())
    }

    /// Deletes the session `public_id`, when `owner` (None: any owner) holds it.
    pub fn session_delete_public(
        &self,
        public_id: &str,
        owner: Option<&str>,
    ) -> Result<Option<SessionRow>, StoreError> {
        let sql = format!(
            "DELETE FROM admin_sessions WHERE public_id = $1 AND (CAST($2 AS TEXT) IS NULL OR owner = CAST($2 AS TEXT)) RETURNING {COLUMNS}"
        );
        let ps = vec![
            Arg::T(Some(public_id.into())),
            Arg::T(owner.map(str::to_string)),
        ];
        Ok(self.session_rows(&sql, ps)?.pop())
    }

    /// Deletes every session of `owner` (sign out everywhere); returns them.
    pub fn session_delete_owner(&self, owner: &str) -> Result<Vec<SessionRow>, StoreError> {
        let sql = format!("DELETE FROM admin_sessions WHERE owner = $1 RETURNING {COLUMNS}");
        self.session_rows(&sql, vec![Arg::T(Some(owner.into()))])
    }

    /// Deletes the sessions idle since `idle_before` or past their absolute end at `now`, and
    /// the sign-ins in progress that ended; returns the sessions.
    pub fn session_purge(&self, now: i64, idle_before: i64) -> Result<Vec<SessionRow>, StoreError> {
        let sql = format!(
            "DELETE FROM admin_sessions WHERE expires_at <= $1 OR last_seen_at <= $2 RETURNING {COLUMNS}"
        );
        let gone = self.session_rows(&sql, vec![Arg::I(Some(now)), Arg::I(Some(idle_before))])?;
        self.exec_args(
            "DELETE FROM oidc_logins WHERE expires_at <= $1",
            vec![Arg::I(Some(now))],
        )?;
        Ok(gone)
    }

    /// Stores a sign-in in progress, unless `max_pending` are stored already (an unauthenticated
    /// caller starts them: the table stays bounded); false when it was not stored.
    pub fn login_put(&self, l: &LoginState, max_pending: i64) -> Result<bool, StoreError> {
        let n = self.exec_args(
            "INSERT INTO oidc_logins (state_hash, binding_hash, nonce, verifier, return_to, expires_at) \
             SELECT $1, $2, $3, $4, $5, $6 WHERE (SELECT count(*) FROM oidc_logins) < $7",
            vec![
                Arg::T(Some(l.state_hash.clone())),
                Arg::T(Some(l.binding_hash.clone())),
                Arg::T(Some(l.nonce.clone())),
                Arg::T(Some(l.verifier.clone())),
                Arg::T(Some(l.return_to.clone())),
                Arg::I(Some(l.expires_at)),
                Arg::I(Some(max_pending)),
            ],
        )?;
        Ok(n == 1)
    }

    /// Takes (reads and deletes, once) the sign-in whose `state` hashes to `state_hash`.
    #[allow(clippy::redundant_closure)] // See `session_rows`.
    pub fn login_take(&self, state_hash: &str) -> Result<Option<LoginState>, StoreError> {
        let mut taken = on_backend!(self, b => b.write_args(
            "DELETE FROM oidc_logins WHERE state_hash = $1 \
             RETURNING state_hash, binding_hash, nonce, verifier, return_to, expires_at",
            vec![Arg::T(Some(state_hash.to_string()))],
            |r| login(r),
        ))?;
        Ok(taken.pop())
    }
}
