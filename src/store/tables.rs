//! The tables of schema migrations 1 and 2 (accounts, tokens, the change log, the audit outbox),
//! written once: each engine's list (`sqlite::MIGRATIONS`, `postgres::MIGRATIONS`) expands them
//! with its own column types, so the two schemas cannot drift apart.
//!
//! Owns: `migration_1!`, `migration_2!`. Never imports anything.

/// Migration 1: accounts, tokens, change log. `int`: a 64-bit integer; `bytes`: a byte string
/// and `length` its length function; `real`: a double; `serial`: an auto-numbered 64-bit primary
/// key; `then`: what the engine adds after the tables.
#[rustfmt::skip]
macro_rules! migration_1 {
    (
        int: $int:literal,
        bytes: $bytes:literal,
        length: $length:literal,
        real: $real:literal,
        serial: $serial:literal,
        then: $then:literal $(,)?
    ) => {
        concat!("CREATE TABLE accounts (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        email TEXT,
        created_at ", $int, " NOT NULL,
        created_by TEXT NOT NULL,
        disabled_at ", $int, ",
        disabled_by TEXT
    );
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts(id),
        name TEXT NOT NULL,
        display_prefix TEXT NOT NULL,
        hash ", $bytes, " NOT NULL CHECK (", $length, "(hash) = 32),
        role TEXT,
        permissions TEXT NOT NULL,
        scopes TEXT NOT NULL,
        allowed_cidrs TEXT NOT NULL,
        rate_rps ", $real, ",
        rate_burst ", $int, ",
        created_at ", $int, " NOT NULL,
        created_by TEXT NOT NULL,
        expires_at ", $int, ",
        last_used_at ", $int, ",
        last_used_ip TEXT,
        revoked_at ", $int, ",
        revoked_by TEXT,
        revoke_reason TEXT,
        rotated_from TEXT REFERENCES tokens(id),
        rotation_deadline ", $int, "
    );
    CREATE UNIQUE INDEX tokens_hash ON tokens(hash);
    CREATE INDEX tokens_account ON tokens(account_id, revoked_at);
    CREATE INDEX tokens_prefix ON tokens(display_prefix);
    CREATE TABLE changes (
        seq ", $serial, ",
        at ", $int, " NOT NULL,
        kind TEXT NOT NULL,
        token_id TEXT,
        account_id TEXT
    );", $then)
    };
}
pub(crate) use migration_1;

/// Migration 2: admin audit events written by the CLI while a gateway owns the audit log.
/// `serial`: an auto-numbered 64-bit primary key.
#[rustfmt::skip]
macro_rules! migration_2 {
    (serial: $serial:literal) => {
        concat!("CREATE TABLE audit_outbox (
        id ", $serial, ",
        line TEXT NOT NULL
    );")
    };
}
pub(crate) use migration_2;
