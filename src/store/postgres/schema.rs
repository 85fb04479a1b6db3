//! The PostgreSQL schema: the migrations (the same steps as SQLite's, in PostgreSQL types) and
//! the code that applies them, one replica at a time.
//!
//! Owns: `MIGRATIONS` and `Db::migrate`. Never imports: `config` or anything outside `store`.

use std::path::PathBuf;

use super::Db;
use crate::store::StoreError;

/// Schema migrations, the same steps as `sqlite::MIGRATIONS` in PostgreSQL types; the
/// `schema_version` table records how many ran.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: accounts, tokens, change log (+ the NOTIFY trigger that pushes it).
    crate::store::tables::migration_1!(
        int: "BIGINT",
        bytes: "BYTEA",
        length: "octet_length",
        real: "DOUBLE PRECISION",
        serial: "BIGSERIAL PRIMARY KEY",
        then: "
    CREATE FUNCTION tokengate_notify_changes() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('tokengate_changes', '');
        RETURN NULL;
    END $$;
    CREATE TRIGGER changes_notify AFTER INSERT ON changes
        FOR EACH STATEMENT EXECUTE FUNCTION tokengate_notify_changes();",
    ),
    // 2: admin audit events written by the CLI while a gateway owns the audit log.
    crate::store::tables::migration_2!(serial: "BIGSERIAL PRIMARY KEY"),
    // 3: web UI sessions and pending OpenID Connect sign-ins (`store::sessions`).
    crate::store::sessions::PG_MIGRATION,
    // 4: approval requests and MFA enrolments (issue 19; SQL in `store::approvals`).
    crate::store::approvals::PG_MIGRATION,
];

/// Advisory lock serialising migrations of concurrently starting replicas.
const MIGRATION_LOCK: i64 = 0x746f_6b65_6e67_6d69;

impl Db {
    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(|e| self.err(e))?;
        let e = |e| self.err(e);
        // Replicas starting together: one migrates, the others wait and find it done.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(e)?;
        let exists: bool = tx
            .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
            .await
            .map_err(e)?
            .try_get(0)
            .map_err(e)?;
        if !exists {
            tx.batch_execute("CREATE TABLE schema_version (version BIGINT NOT NULL)")
                .await
                .map_err(e)?;
        }
        let found = tx
            .query_opt("SELECT version FROM schema_version", &[])
            .await
            .map_err(e)?
            .map(|r| r.try_get::<_, i64>(0))
            .transpose()
            .map_err(e)?;
        let version = match found {
            Some(v) => v,
            None => {
                tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[])
                    .await
                    .map_err(e)?;
                0
            }
        };
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                path: PathBuf::from(self.target.to_string()),
                found: version,
                known,
            });
        }
        if version < known {
            for sql in MIGRATIONS.iter().skip(version as usize) {
                tx.batch_execute(sql).await.map_err(e)?;
            }
            tx.execute("UPDATE schema_version SET version = $1", &[&known])
                .await
                .map_err(e)?;
        }
        tx.commit().await.map_err(e)?;
        Ok(())
    }
}
