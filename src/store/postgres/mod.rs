//! The PostgreSQL engine: several gateway replicas share one database.
//!
//! An async client (`tokio-postgres`) with a connection pool (`deadpool-postgres`), TLS through
//! rustls/ring, on a small runtime owned by this store. The blocking [`super::Store`] API hands
//! each call to that runtime and waits for its answer on a channel; this is safe from anywhere
//! (the gateway calls the store on `spawn_blocking` threads, the CLI is synchronous), and the
//! work never runs on the gateway's async workers.
//!
//! Change push: every insert into `changes` fires `NOTIFY tokengate_changes` (a statement trigger,
//! delivered at COMMIT). A dedicated connection LISTENs and turns notifications into
//! [`ChangeSignal`]s; it reports `Lost` the moment that connection fails (or misses a heartbeat)
//! and `Reconnected` once it listens again. The change log stays the source of truth: signals
//! only say when to read it.
//!
//! Ordering: writers take a transaction-scoped advisory lock just before appending to the change
//! log, so sequence numbers are assigned in commit order and a follower reading "everything after
//! seq N" can never skip a change that commits later with a smaller number.
//!
//! Owns: the PostgreSQL engine — its runtime, pool, TLS and every store call; the schema is in
//! [`schema`], the change push in [`feed`], `store copy` in [`copy`].
//! Never imports: `config` (the store's own [`PgOptions`] say how to connect), `ratelimit`,
//! `gateway`, `cli`.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime as PoolRuntime,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::broadcast;
use tokio_postgres::Row;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    Account, Change, ChangeSignal, DUMP_TOKEN_COLUMNS, LastUsed, NewTokenRow, PgOptions,
    StoreError, TOKEN_COLUMNS, TokenRow, cap_reached, redact_url, row,
};
use crate::store::approvals::Arg;
use crate::token::TokenHash;

mod copy;
mod feed;
mod schema;

use feed::{Feed, feed_loop, listen};
#[cfg(test)]
pub(crate) use schema::MIGRATIONS;

/// Advisory lock taken just before appending to the change log (seq order = commit order).
const CHANGE_LOG_LOCK: i64 = 0x746f_6b65_6e67_636c;

/// A PostgreSQL store.
pub(crate) struct Postgres {
    target: Arc<str>,
    /// Owned runtime; `Option` so `Drop` can shut it down without blocking (a store may be
    /// dropped inside another runtime).
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    pub(in crate::store) db: Db,
    feed: Arc<Feed>,
    timeout: Duration,
}

/// What one store call needs, cheap to move into a future.
#[derive(Clone)]
pub(in crate::store) struct Db {
    pool: Pool,
    target: Arc<str>,
    writes: Arc<AtomicU64>,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Runs `$body` in a transaction `$tx` on a pooled connection of `$db`, commits, counts the
/// write and answers `Ok` with the body's value. Inside an `async` block returning
/// `Result<_, StoreError>`: a `?` or `return Err(..)` in the body leaves without committing.
macro_rules! write_tx {
    ($db:expr, |$tx:ident| $body:block) => {{
        let mut c = $db.conn().await?;
        let $tx = c.transaction().await.map_err(|e| $db.err(e))?;
        let out = $body;
        $tx.commit().await.map_err(|e| $db.err(e))?;
        $db.wrote();
        Ok(out)
    }};
}

impl Postgres {
    pub(crate) fn open(url: &str, o: &PgOptions) -> Result<Postgres, StoreError> {
        let target: Arc<str> = Arc::from(redact_url(url));
        let fail = |message: String| StoreError::Postgres {
            target: target.to_string(),
            message,
        };
        let mut cfg: tokio_postgres::Config =
            url.parse().map_err(|e| fail(format!("invalid URL: {e}")))?;
        if cfg.get_application_name().is_none() {
            cfg.application_name("tokengate");
        }
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(o.timeout);
        }
        cfg.keepalives(true)
            .keepalives_idle(Duration::from_secs(10));
        let tls = make_tls(cfg.get_ssl_mode(), o.ca.as_deref()).map_err(fail)?;
        // One worker: the runtime only waits on sockets (queries, the LISTEN connection).
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tokengate-pg")
            .enable_all()
            .build()
            .map_err(|e| fail(format!("cannot start the store runtime: {e}")))?;
        let manager = Manager::from_config(
            cfg.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(o.pool_size.max(1))
            .wait_timeout(Some(o.timeout))
            .create_timeout(Some(o.timeout))
            .recycle_timeout(Some(o.timeout))
            .runtime(PoolRuntime::Tokio1)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let (tx, _) = broadcast::channel(1024);
        let feed = Arc::new(Feed {
            tx,
            up: AtomicBool::new(false),
            hold: AtomicBool::new(false),
        });
        let pg = Postgres {
            target: target.clone(),
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            db: Db {
                pool,
                target: target.clone(),
                writes: Arc::new(AtomicU64::new(0)),
            },
            feed: feed.clone(),
            timeout: o.timeout,
        };
        let db = pg.db.clone();
        pg.run(async move { db.migrate().await })?;
        // The notification connection must listen before the store is handed out: a gateway
        // that starts serving has no gap between its first change-log read and its first push.
        let mut listen_cfg = cfg.clone();
        let name = format!(
            "{}-listen",
            cfg.get_application_name().unwrap_or("tokengate")
        );
        listen_cfg.application_name(&name);
        let (lc, lt, t2) = (listen_cfg.clone(), tls.clone(), target.clone());
        let listener = pg.run(async move {
            listen(&lc, lt).await.map_err(|e| StoreError::Postgres {
                target: t2.to_string(),
                message: format!("cannot LISTEN for changes: {}", chain(&e)),
            })
        })?;
        feed.up.store(true, Ordering::SeqCst);
        pg.handle
            .spawn(feed_loop(listen_cfg, tls, feed, listener, target));
        Ok(pg)
    }

    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<ChangeSignal> {
        self.feed.tx.subscribe()
    }

    pub(crate) fn feed_up(&self) -> bool {
        self.feed.up.load(Ordering::SeqCst)
    }

    pub(crate) fn hold_feed(&self, hold: bool) {
        self.feed.hold.store(hold, Ordering::SeqCst);
    }

    pub(crate) fn write_count(&self) -> u64 {
        self.db.writes.load(Ordering::Relaxed)
    }

    /// Runs `fut` on the store's runtime and waits for it, within the call deadline.
    pub(in crate::store) fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let deadline = self.timeout;
        let target = self.target.clone();
        self.handle.spawn(async move {
            let out = match tokio::time::timeout(deadline, fut).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Postgres {
                    target: target.to_string(),
                    message: format!("no answer within {deadline:?}"),
                }),
            };
            let _ = tx.send(out);
        });
        rx.recv().unwrap_or_else(|_| {
            Err(StoreError::Postgres {
                target: self.target.to_string(),
                message: "the store's runtime has stopped".into(),
            })
        })
    }

    pub(crate) fn ping(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        self.run(async move {
            let c = db.conn().await?;
            c.query_one("SELECT count(*) FROM accounts", &[])
                .await
                .map_err(|e| db.err(e))?;
            Ok(())
        })
    }

    pub(crate) fn create_account(&self, acc: &Account) -> Result<(), StoreError> {
        let (db, acc) = (self.db.clone(), acc.clone());
        self.run(async move {
            write_tx!(db, |tx| {
                let n = tx
                    .execute(
                        "INSERT INTO accounts (id, name, email, created_at, created_by) VALUES ($1, $2, $3, $4, $5) \
                         ON CONFLICT (name) DO NOTHING",
                        &[&acc.id, &acc.name, &acc.email, &acc.created_at, &acc.created_by],
                    )
                    .await
                    .map_err(|e| db.err(e))?;
                if n == 0 {
                    return Err(StoreError::AccountExists(acc.name));
                }
            })
        })
    }

    pub(crate) fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        self.query_args(
            "SELECT id, name, email, created_at, created_by, disabled_at FROM accounts ORDER BY name",
            vec![],
            row::account,
        )
    }

    pub(crate) fn find_account(&self, name_or_id: &str) -> Result<Option<Account>, StoreError> {
        let (db, key) = (self.db.clone(), name_or_id.to_string());
        self.run(async move {
            let c = db.conn().await?;
            let rows = c
                .query(
                    "SELECT id, name, email, created_at, created_by, disabled_at FROM accounts WHERE name = $1 OR id = $1 LIMIT 1",
                    &[&key],
                )
                .await
                .map_err(|e| db.err(e))?;
            rows.first().map(row::account).transpose().map_err(|e| db.err(e))
        })
    }

    pub(crate) fn disable_account(
        &self,
        name_or_id: &str,
        actor: &str,
        now: i64,
    ) -> Result<Account, StoreError> {
        let (db, key, actor) = (self.db.clone(), name_or_id.to_string(), actor.to_string());
        self.run(async move {
            write_tx!(db, |tx| {
                let mut acc = lock_account(&tx, &key)
                    .await
                    .map_err(|e| db.err(e))?
                    .ok_or_else(|| StoreError::NoAccount(key.clone()))?;
                if acc.disabled_at.is_some() {
                    return Err(StoreError::AccountDisabled(acc.name));
                }
                tx.execute(
                    "UPDATE accounts SET disabled_at = $1, disabled_by = $2 WHERE id = $3",
                    &[&now, &actor, &acc.id],
                )
                .await
                .map_err(|e| db.err(e))?;
                record_change(&tx, now, "account_disable", None, Some(&acc.id))
                    .await
                    .map_err(|e| db.err(e))?;
                acc.disabled_at = Some(now);
                acc
            })
        })
    }

    pub(crate) fn create_token(
        &self,
        account: &str,
        row: &NewTokenRow,
        max_active: u32,
        now: i64,
    ) -> Result<(), StoreError> {
        let (db, key, row) = (self.db.clone(), account.to_string(), row.clone());
        self.run(async move {
            write_tx!(db, |tx| {
                // The account row lock serialises creations for one account across replicas, so
                // the cap check below cannot be raced.
                let acc = lock_account(&tx, &key)
                    .await
                    .map_err(|e| db.err(e))?
                    .ok_or_else(|| StoreError::NoAccount(key.clone()))?;
                if acc.disabled_at.is_some() {
                    return Err(StoreError::AccountDisabled(acc.name));
                }
                let active = query_map(
                    &tx,
                    "SELECT id, name, display_prefix FROM tokens WHERE account_id = $1 AND revoked_at IS NULL \
                     AND (expires_at IS NULL OR expires_at > $2) AND (rotation_deadline IS NULL OR rotation_deadline > $2) \
                     ORDER BY created_at",
                    &[&acc.id, &now],
                    |r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)),
                )
                .await
                .map_err(|e| db.err(e))?;
                if active.len() as u32 >= max_active {
                    return Err(cap_reached(acc.name, max_active, &active));
                }
                insert_token(&tx, &acc.id, &row).await.map_err(|e| db.err(e))?;
            })
        })
    }

    pub(crate) fn lookup_hash(&self, hash: &TokenHash) -> Result<Option<TokenRow>, StoreError> {
        let (db, hash) = (self.db.clone(), hash.to_vec());
        self.run(async move {
            let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens t JOIN accounts a ON a.id = t.account_id WHERE t.hash = $1");
            let mut rows = db.tokens(&sql, &[&hash]).await?;
            Ok(rows.pop())
        })
    }

    pub(crate) fn find_tokens(&self, id_or_prefix: &str) -> Result<Vec<TokenRow>, StoreError> {
        let (db, key) = (self.db.clone(), id_or_prefix.to_string());
        self.run(async move {
            let sql = format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens t JOIN accounts a ON a.id = t.account_id \
                 WHERE t.id = $1::text OR t.display_prefix = $1::text \
                    OR (length($1::text) >= 6 AND (left(t.id, length($1::text)) = $1::text \
                        OR left(t.display_prefix, length($1::text)) = $1::text)) \
                 LIMIT 3"
            );
            db.tokens(&sql, &[&key]).await
        })
    }

    pub(crate) fn list_tokens(
        &self,
        account_id: Option<&str>,
    ) -> Result<Vec<TokenRow>, StoreError> {
        let (db, account_id) = (self.db.clone(), account_id.map(str::to_string));
        self.run(async move {
            let sql = format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens t JOIN accounts a ON a.id = t.account_id \
                 WHERE ($1::text IS NULL OR t.account_id = $1::text) ORDER BY t.created_at DESC, t.id"
            );
            db.tokens(&sql, &[&account_id]).await
        })
    }

    pub(crate) fn revoke(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let (db, id, actor, reason) = (
            self.db.clone(),
            id.to_string(),
            actor.to_string(),
            reason.to_string(),
        );
        self.run(async move {
            write_tx!(db, |tx| {
                if !mark_revoked(&tx, &id, &actor, &reason, now)
                    .await
                    .map_err(|e| db.err(e))?
                {
                    let exists = tx
                        .query_opt("SELECT 1 FROM tokens WHERE id = $1", &[&id])
                        .await
                        .map_err(|e| db.err(e))?;
                    return Err(match exists {
                        Some(_) => StoreError::AlreadyRevoked(id),
                        None => StoreError::NoToken(id),
                    });
                }
            })
        })
    }

    pub(crate) fn retire_rotated(&self, old_id: &str, now: i64) -> Result<bool, StoreError> {
        let (db, id) = (self.db.clone(), old_id.to_string());
        self.run(async move {
            write_tx!(db, |tx| {
                mark_revoked(&tx, &id, "tokengate", "rotated", now)
                    .await
                    .map_err(|e| db.err(e))?
            })
        })
    }

    pub(crate) fn rotate(
        &self,
        old_id: &str,
        account_id: &str,
        row: &NewTokenRow,
        deadline: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        let (db, old_id, account_id, row) = (
            self.db.clone(),
            old_id.to_string(),
            account_id.to_string(),
            row.clone(),
        );
        self.run(async move {
            write_tx!(db, |tx| {
                let still = tx
                    .query_opt("SELECT 1 FROM tokens WHERE id = $1 AND revoked_at IS NULL FOR UPDATE", &[&old_id])
                    .await
                    .map_err(|e| db.err(e))?;
                if still.is_none() {
                    return Err(StoreError::AlreadyRevoked(old_id));
                }
                insert_token(&tx, &account_id, &row).await.map_err(|e| db.err(e))?;
                tx.execute(
                    "UPDATE tokens SET rotation_deadline = LEAST(COALESCE(rotation_deadline, $1), $1) WHERE id = $2",
                    &[&deadline, &old_id],
                )
                .await
                .map_err(|e| db.err(e))?;
                record_change(&tx, now, "rotate", Some(&old_id), None).await.map_err(|e| db.err(e))?;
            })
        })
    }

    pub(crate) fn flush_last_used(&self, batch: &[LastUsed]) -> Result<(), StoreError> {
        let (db, batch) = (self.db.clone(), batch.to_vec());
        self.run(async move {
            write_tx!(db, |tx| {
                let st = tx
                    .prepare(
                        "UPDATE tokens SET last_used_at = $1, last_used_ip = $2 \
                         WHERE id = $3 AND (last_used_at IS NULL OR last_used_at < $1)",
                    )
                    .await
                    .map_err(|e| db.err(e))?;
                // `batch` is sorted by token id (see `Store::flush_last_used`): a fixed lock order.
                for u in &batch {
                    tx.execute(&st, &[&u.at, &u.ip, &u.token_id])
                        .await
                        .map_err(|e| db.err(e))?;
                }
            })
        })
    }

    pub(crate) fn last_change_seq(&self) -> Result<i64, StoreError> {
        let db = self.db.clone();
        self.run(async move {
            let c = db.conn().await?;
            let r = c
                .query_one("SELECT coalesce(max(seq), 0)::bigint FROM changes", &[])
                .await
                .map_err(|e| db.err(e))?;
            r.try_get(0).map_err(|e| db.err(e))
        })
    }

    pub(crate) fn changes_since(&self, seq: i64) -> Result<Vec<Change>, StoreError> {
        self.query_args(
            "SELECT seq, kind, token_id, account_id FROM changes WHERE seq > $1 ORDER BY seq LIMIT 10000",
            vec![Arg::I(Some(seq))],
            row::change,
        )
    }

    pub(crate) fn count_active(
        &self,
        now: i64,
        expiring_before: i64,
    ) -> Result<(u64, u64), StoreError> {
        let db = self.db.clone();
        self.run(async move {
            let c = db.conn().await?;
            let r = c
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE t.expires_at IS NOT NULL AND t.expires_at < $2) \
                     FROM tokens t JOIN accounts a ON a.id = t.account_id \
                     WHERE t.revoked_at IS NULL AND a.disabled_at IS NULL \
                       AND (t.expires_at IS NULL OR t.expires_at > $1) \
                       AND (t.rotation_deadline IS NULL OR t.rotation_deadline > $1)",
                    &[&now, &expiring_before],
                )
                .await
                .map_err(|e| db.err(e))?;
            let (a, e): (i64, i64) = (r.try_get(0).map_err(|e| db.err(e))?, r.try_get(1).map_err(|e| db.err(e))?);
            Ok((a as u64, e as u64))
        })
    }

    pub(crate) fn outbox_push(&self, json: &str) -> Result<(), StoreError> {
        self.exec_args(
            "INSERT INTO audit_outbox (line) VALUES ($1)",
            vec![Arg::T(Some(json.to_string()))],
        )
        .map(drop)
    }

    pub(crate) fn outbox_peek(&self, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        self.query_args(
            "SELECT id, line FROM audit_outbox ORDER BY id LIMIT $1",
            vec![Arg::I(Some(limit as i64))],
            row::outbox,
        )
    }

    pub(crate) fn outbox_ack(&self, id: i64) -> Result<(), StoreError> {
        self.exec_args(
            "DELETE FROM audit_outbox WHERE id <= $1",
            vec![Arg::I(Some(id))],
        )
        .map(drop)
    }

    /// Runs one statement with `args` bound to `$n`, outside a transaction; counts the write;
    /// rows changed.
    pub(crate) fn exec_args(&self, sql: &str, args: Vec<Arg>) -> Result<u64, StoreError> {
        let (db, sql) = (self.db.clone(), sql.to_string());
        self.run(async move {
            let c = db.conn().await?;
            let n = c
                .execute(&sql, &params(&bind(args)))
                .await
                .map_err(|e| db.err(e))?;
            db.wrote();
            Ok(n)
        })
    }

    /// Runs one query with `args` bound to `$n`, outside a transaction; every row mapped with
    /// `row`.
    pub(crate) fn query_args<T: Send + 'static>(
        &self,
        sql: &str,
        args: Vec<Arg>,
        row: impl Fn(&Row) -> Result<T, tokio_postgres::Error> + Send + 'static,
    ) -> Result<Vec<T>, StoreError> {
        let (db, sql) = (self.db.clone(), sql.to_string());
        self.run(async move {
            let c = db.conn().await?;
            query_map(&c, &sql, &params(&bind(args)), row)
                .await
                .map_err(|e| db.err(e))
        })
    }

    /// [`Self::query_args`], counting a write: for a statement that writes and returns rows
    /// (`RETURNING`; one statement, so its own transaction).
    pub(crate) fn write_args<T: Send + 'static>(
        &self,
        sql: &str,
        args: Vec<Arg>,
        row: impl Fn(&Row) -> Result<T, tokio_postgres::Error> + Send + 'static,
    ) -> Result<Vec<T>, StoreError> {
        let rows = self.query_args(sql, args, row)?;
        self.db.wrote();
        Ok(rows)
    }

    pub(crate) fn integrity_check(&self) -> Result<String, StoreError> {
        let db = self.db.clone();
        self.run(async move {
            let c = db.conn().await?;
            c.query_one(
                "SELECT count(*) FROM tokens t JOIN accounts a ON a.id = t.account_id",
                &[],
            )
            .await
            .map_err(|e| db.err(e))?;
            Ok("ok".to_string())
        })
    }
}

impl Db {
    pub(in crate::store) fn err(&self, e: tokio_postgres::Error) -> StoreError {
        StoreError::Postgres {
            target: self.target.to_string(),
            message: chain(&e),
        }
    }

    pub(in crate::store) fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    pub(in crate::store) async fn conn(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| StoreError::Postgres {
            target: self.target.to_string(),
            message: chain(&e),
        })
    }

    async fn tokens(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<TokenRow>, StoreError> {
        let c = self.conn().await?;
        let st = c.prepare_cached(sql).await.map_err(|e| self.err(e))?;
        let rows = c.query(&st, params).await.map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| row::raw_token(r).map_err(|e| self.err(e))?.into_row())
            .collect()
    }
}

async fn lock_account(
    tx: &deadpool_postgres::Transaction<'_>,
    key: &str,
) -> Result<Option<Account>, tokio_postgres::Error> {
    let rows = tx
        .query(
            "SELECT id, name, email, created_at, created_by, disabled_at FROM accounts WHERE name = $1 OR id = $1 LIMIT 1 FOR UPDATE",
            &[&key],
        )
        .await?;
    rows.first().map(row::account).transpose()
}

/// Revokes token `id` (by `actor`, for `reason`) if it is not revoked yet, with its change-log
/// entry; false (and nothing written) if it was already revoked or does not exist.
async fn mark_revoked(
    tx: &deadpool_postgres::Transaction<'_>,
    id: &str,
    actor: &str,
    reason: &str,
    now: i64,
) -> Result<bool, tokio_postgres::Error> {
    let n = tx
        .execute(
            "UPDATE tokens SET revoked_at = $1, revoked_by = $2, revoke_reason = $3 WHERE id = $4 AND revoked_at IS NULL",
            &[&now, &actor, &reason, &id],
        )
        .await?;
    if n > 0 {
        record_change(tx, now, "revoke", Some(id), None).await?;
    }
    Ok(n > 0)
}

async fn record_change(
    tx: &deadpool_postgres::Transaction<'_>,
    now: i64,
    kind: &str,
    token_id: Option<&str>,
    account_id: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    // Held until COMMIT: the next writer gets its seq only after this one is visible.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CHANGE_LOG_LOCK])
        .await?;
    tx.execute(
        "INSERT INTO changes (at, kind, token_id, account_id) VALUES ($1, $2, $3, $4)",
        &[&now, &kind, &token_id, &account_id],
    )
    .await?;
    Ok(())
}

async fn insert_token(
    tx: &deadpool_postgres::Transaction<'_>,
    account_id: &str,
    t: &NewTokenRow,
) -> Result<(), tokio_postgres::Error> {
    let stored = t.stored(account_id);
    let values: [&(dyn ToSql + Sync); 21] = row::token_values!(stored, &stored.rotated_from);
    tx.execute(&*INSERT_TOKEN, &values).await?;
    Ok(())
}

/// Inserts one stored token row, all of `DUMP_TOKEN_COLUMNS` bound as `$1..$21`.
pub(super) static INSERT_TOKEN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let marks: Vec<String> = (1..=21).map(|i| format!("${i}")).collect();
    format!(
        "INSERT INTO tokens ({DUMP_TOKEN_COLUMNS}) VALUES ({})",
        marks.join(", ")
    )
});

/// Runs `sql` and maps every row with `row`; a row that does not fit fails the whole answer.
async fn query_map<T>(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    row: impl Fn(&Row) -> Result<T, tokio_postgres::Error>,
) -> Result<Vec<T>, tokio_postgres::Error> {
    c.query(sql, params).await?.iter().map(row).collect()
}

/// Dynamic SQL arguments as PostgreSQL binds them (owned, so they can move into a call).
fn bind(args: Vec<Arg>) -> Vec<Box<dyn ToSql + Sync + Send>> {
    args.into_iter()
        .map(|a| -> Box<dyn ToSql + Sync + Send> {
            match a {
                Arg::I(v) => Box::new(v),
                Arg::T(v) => Box::new(v),
                Arg::B(v) => Box::new(v),
            }
        })
        .collect()
}

/// The parameter list of a query, borrowed from [`bind`]'s answer.
fn params(bound: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    bound
        .iter()
        .map(|b| b.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// rustls client config: the CA file when given, else the system's roots (not read at all when
/// the URL says `sslmode=disable`).
fn make_tls(mode: SslMode, ca: Option<&Path>) -> Result<MakeRustlsConnect, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read store.ca {}: {e}", path.display()))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| format!("cannot read store.ca {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("store.ca {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "store.ca {}: no CERTIFICATE block found",
                    path.display()
                ));
            }
        }
        None if mode != SslMode::Disable => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
        None => {}
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}
