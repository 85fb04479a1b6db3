//! `store copy` on PostgreSQL: export every table in one snapshot, import into an empty
//! database with ids, sequences and rotation links intact.
//!
//! Owns: `Postgres::export` and `Postgres::import`. Never imports: `config` or anything
//! outside `store`.

use tokio_postgres::types::ToSql;

use super::{INSERT_TOKEN, Postgres, query_map};
use crate::store::copy::{COUNT_ROWS, require_empty};
use crate::store::row;
use crate::store::{DUMP_TOKEN_COLUMNS, StoreDump, StoreError};

impl Postgres {
    pub(crate) fn export(&self) -> Result<StoreDump, StoreError> {
        let db = self.db.clone();
        self.run(async move {
            let mut c = db.conn().await?;
            // One snapshot for all four tables.
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(|e| db.err(e))?;
            let e = |e| db.err(e);
            let accounts = query_map(
                &tx,
                "SELECT id, name, email, created_at, created_by, disabled_at, disabled_by FROM accounts ORDER BY id COLLATE \"C\"",
                &[],
                row::dump_account,
            )
            .await
            .map_err(e)?;
            let sql = format!("SELECT {DUMP_TOKEN_COLUMNS} FROM tokens ORDER BY id COLLATE \"C\"");
            let tokens = query_map(&tx, &sql, &[], row::dump_token).await.map_err(e)?;
            let changes = query_map(
                &tx,
                "SELECT seq, at, kind, token_id, account_id FROM changes ORDER BY seq",
                &[],
                row::dump_change,
            )
            .await
            .map_err(e)?;
            let outbox = query_map(&tx, "SELECT id, line FROM audit_outbox ORDER BY id", &[], row::outbox)
                .await
                .map_err(e)?;
            tx.commit().await.map_err(e)?;
            Ok(StoreDump {
                accounts,
                tokens,
                changes,
                outbox,
            })
        })
    }

    pub(crate) fn import(&self, d: &StoreDump) -> Result<(), StoreError> {
        let (db, d) = (self.db.clone(), d.clone());
        self.run(async move {
            let mut c = db.conn().await?;
            let tx = c.transaction().await.map_err(|e| db.err(e))?;
            let e = |e| db.err(e);
            // Nobody else may write while the copy lands (and the emptiness check holds).
            tx.batch_execute("LOCK TABLE accounts, tokens, changes, audit_outbox IN EXCLUSIVE MODE")
                .await
                .map_err(e)?;
            let r = tx.query_one(COUNT_ROWS, &[]).await.map_err(e)?;
            let counts = (
                r.try_get(0).map_err(e)?,
                r.try_get(1).map_err(e)?,
                r.try_get(2).map_err(e)?,
                r.try_get(3).map_err(e)?,
            );
            require_empty(db.target.to_string(), counts)?;
            let ins = tx
                .prepare(
                    "INSERT INTO accounts (id, name, email, created_at, created_by, disabled_at, disabled_by) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .await
                .map_err(e)?;
            for a in &d.accounts {
                tx.execute(
                    &ins,
                    &[&a.id, &a.name, &a.email, &a.created_at, &a.created_by, &a.disabled_at, &a.disabled_by],
                )
                .await
                .map_err(e)?;
            }
            let ins = tx.prepare(&INSERT_TOKEN).await.map_err(e)?;
            for t in &d.tokens {
                let values: [&(dyn ToSql + Sync); 21] = row::token_values!(t, &None::<String>);
                tx.execute(&ins, &values).await.map_err(e)?;
            }
            for t in d.tokens.iter().filter(|t| t.rotated_from.is_some()) {
                tx.execute("UPDATE tokens SET rotated_from = $1 WHERE id = $2", &[&t.rotated_from, &t.id])
                    .await
                    .map_err(e)?;
            }
            let ins = tx
                .prepare("INSERT INTO changes (seq, at, kind, token_id, account_id) VALUES ($1, $2, $3, $4, $5)")
                .await
                .map_err(e)?;
            for ch in &d.changes {
                tx.execute(&ins, &[&ch.seq, &ch.at, &ch.kind, &ch.token_id, &ch.account_id])
                    .await
                    .map_err(e)?;
            }
            for (id, line) in &d.outbox {
                tx.execute("INSERT INTO audit_outbox (id, line) VALUES ($1, $2)", &[id, line])
                    .await
                    .map_err(e)?;
            }
            // Explicit ids do not move the sequences: continue above the copied high-water marks.
            if let Some(last) = d.changes.last() {
                tx.execute("SELECT setval(pg_get_serial_sequence('changes', 'seq'), $1)", &[&last.seq])
                    .await
                    .map_err(e)?;
            }
            if let Some((last, _)) = d.outbox.last() {
                tx.execute("SELECT setval(pg_get_serial_sequence('audit_outbox', 'id'), $1)", &[last])
                    .await
                    .map_err(e)?;
            }
            tx.commit().await.map_err(e)?;
            db.wrote();
            Ok(())
        })
    }
}
