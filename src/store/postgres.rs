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

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime as PoolRuntime};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    Account, Change, ChangeSignal, DUMP_TOKEN_COLUMNS, DumpAccount, DumpChange, DumpToken,
    LastUsed, NewTokenRow, PgOptions, RawTokenRow, StoreDump, StoreError, TOKEN_COLUMNS, TokenRow,
    cap_reached, redact_url,
};
use crate::token::TokenHash;

/// Schema migrations, the same steps as `sqlite::MIGRATIONS` in PostgreSQL types; the
/// `schema_version` table records how many ran.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: accounts, tokens, change log (+ the NOTIFY trigger that pushes it).
    "CREATE TABLE accounts (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        email TEXT,
        created_at BIGINT NOT NULL,
        created_by TEXT NOT NULL,
        disabled_at BIGINT,
        disabled_by TEXT
    );
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts(id),
        name TEXT NOT NULL,
        display_prefix TEXT NOT NULL,
        hash BYTEA NOT NULL CHECK (octet_length(hash) = 32),
        role TEXT,
        permissions TEXT NOT NULL,
        scopes TEXT NOT NULL,
        allowed_cidrs TEXT NOT NULL,
        rate_rps DOUBLE PRECISION,
        rate_burst BIGINT,
        created_at BIGINT NOT NULL,
        created_by TEXT NOT NULL,
        expires_at BIGINT,
        last_used_at BIGINT,
        last_used_ip TEXT,
        revoked_at BIGINT,
        revoked_by TEXT,
        revoke_reason TEXT,
        rotated_from TEXT REFERENCES tokens(id),
        rotation_deadline BIGINT
    );
    CREATE UNIQUE INDEX tokens_hash ON tokens(hash);
    CREATE INDEX tokens_account ON tokens(account_id, revoked_at);
    CREATE INDEX tokens_prefix ON tokens(display_prefix);
    CREATE TABLE changes (
        seq BIGSERIAL PRIMARY KEY,
        at BIGINT NOT NULL,
        kind TEXT NOT NULL,
        token_id TEXT,
        account_id TEXT
    );
    CREATE FUNCTION tokengate_notify_changes() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('tokengate_changes', '');
        RETURN NULL;
    END $$;
    CREATE TRIGGER changes_notify AFTER INSERT ON changes
        FOR EACH STATEMENT EXECUTE FUNCTION tokengate_notify_changes();",
    // 2: admin audit events written by the CLI while a gateway owns the audit log.
    "CREATE TABLE audit_outbox (
        id BIGSERIAL PRIMARY KEY,
        line TEXT NOT NULL
    );",
];

/// The NOTIFY channel.
const CHANNEL: &str = "tokengate_changes";
/// Advisory lock serialising migrations of concurrently starting replicas.
const MIGRATION_LOCK: i64 = 0x746f_6b65_6e67_6d69;
/// Advisory lock taken just before appending to the change log (seq order = commit order).
const CHANGE_LOG_LOCK: i64 = 0x746f_6b65_6e67_636c;
/// How often the notification connection proves it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a heartbeat may take before the connection counts as lost.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A PostgreSQL store.
pub(crate) struct Postgres {
    target: Arc<str>,
    /// Owned runtime; `Option` so `Drop` can shut it down without blocking (a store may be
    /// dropped inside another runtime).
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    db: Db,
    feed: Arc<Feed>,
    timeout: Duration,
}

/// What one store call needs, cheap to move into a future.
#[derive(Clone)]
struct Db {
    pool: Pool,
    target: Arc<str>,
    writes: Arc<AtomicU64>,
}

/// State of the notification connection, shared with its task.
struct Feed {
    tx: broadcast::Sender<ChangeSignal>,
    up: AtomicBool,
    hold: AtomicBool,
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
    fn run<T: Send + 'static>(
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
            let mut c = db.conn().await?;
            let tx = c.transaction().await.map_err(|e| db.err(e))?;
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
            tx.commit().await.map_err(|e| db.err(e))?;
            db.wrote();
            Ok(())
        })
    }

    pub(crate) fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        let db = self.db.clone();
        self.run(async move {
            let c = db.conn().await?;
            let rows = c
                .query("SELECT id, name, email, created_at, created_by, disabled_at FROM accounts ORDER BY name", &[])
                .await
                .map_err(|e| db.err(e))?;
            rows.iter().map(|r| account(r).map_err(|e| db.err(e))).collect()
        })
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
            rows.first().map(account).transpose().map_err(|e| db.err(e))
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
            let mut c = db.conn().await?;
            let tx = c.transaction().await.map_err(|e| db.err(e))?;
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
            tx.commit().await.map_err(|e| db.err(e))?;
            db.wrote();
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
        let (db, key, row) = (self.db.clone(), account.to_string(), row.clone());
        self.run(async move {
            let mut c = db.conn().await?;
            let tx = c.transaction().await.map_err(|e| db.err(e))?;
            // The account row lock serialises creations for one account across replicas, so
            // the cap check below cannot be raced.
            let acc = lock_account(&tx, &key)
                .await
                .map_err(|e| db.err(e))?
                .ok_or_else(|| StoreError::NoAccount(key.clone()))?;
            if acc.disabled_at.is_some() {
                return Err(StoreError::AccountDisabled(acc.name));
            }
            let active = tx
                .query(
                    "SELECT id, name, display_prefix FROM tokens WHERE account_id = $1 AND revoked_at IS NULL \
                     AND (expires_at IS NULL OR expires_at > $2) AND (rotation_deadline IS NULL OR rotation_deadline > $2) \
                     ORDER BY created_at",
                    &[&acc.id, &now],
                )
                .await
                .map_err(|e| db.err(e))?;
            if active.len() as u32 >= max_active {
                let list = active
                    .iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                    .collect::<Result<Vec<_>, tokio_postgres::Error>>()
                    .map_err(|e| db.err(e))?;
                return Err(cap_reached(acc.name, max_active, &list));
            }
            insert_token(&tx, &acc.id, &row).await.map_err(|e| db.err(e))?;
            tx.commit().await.map_err(|e| db.err(e))?;
            db.wrote();
            Ok(())
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
            let mut c = db.conn().await?;
            let tx = c.transaction().await.map_err(|e| db.err(e))?;
            let n = tx
                .execute(
                    "UPDATE tokens SET revoked_at = $1, revoked_by = $2, revoke_reason = $3 WHERE id = $4 AND revoked_at IS NULL",
                    &[&now, &actor, &reason, &id],
                )
                .await
                .map_err(|e| db.err(e))?;
            if n == 0 {
                let exists = tx
                    .query_opt("SELECT 1 FROM tokens WHERE id = $1", &[&id])
                    .await
                    .map_err(|e| db.err(e))?;
                return Err(match exists {
                    Some(_) => StoreError::AlreadyRevoked(id),
                    None => StoreError::NoToken(id),
                });
            }
            record_change(&tx, now, "revoke", Some(&id), None).await.map_err(|e| db.err(e))?;
            tx.commit().await.map_err(|e| db.err(e))?;
            db.wrote();
            Ok(())
        })
    }

    pub(crate) fn retire_rotated(&self, old_id: &str, now: i64) -> Result<bool, StoreError> {
        let (db, id) = (self.db.clone(), old_id.to_string());
        self.run(async move {
            let mut c = db.conn().await?;
            let tx = c.transaction().await.map_err(|e| db.err(e))?;
            let n = tx
                .execute(
                    "UPDATE tokens SET revoked_at = $1, revoked_by = 'tokengate', revoke_reason = 'rotated' \
                     WHERE id = $2 AND revoked_at IS NULL",
                    &[&now, &id],
                )
                .await
                .map_err(|e| db.err(e))?;
            if n > 0 {
                record_change(&tx, now, "revoke", Some(&id), None).await.map_err(|e| db.err(e))?;
            }
            tx.commit().await.map_err(|e| db.err(e))?;
            db.wrote();
            Ok(n > 0)
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
            let mut c = db.conn().await?;
            let tx = c.transaction().await.map_err(|e| db.err(e))?;
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
            tx.commit().await.map_err(|e| db.err(e))?;
            db.wrote();
            Ok(())
        })
    }

    pub(crate) fn flush_last_used(&self, batch: &[LastUsed]) -> Result<(), StoreError> {
        let (db, batch) = (self.db.clone(), batch.to_vec());
        self.run(async move {
            let mut c = db.conn().await?;
            let tx = c.transaction().await.map_err(|e| db.err(e))?;
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
            tx.commit().await.map_err(|e| db.err(e))?;
            db.wrote();
            Ok(())
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
        let db = self.db.clone();
        self.run(async move {
            let c = db.conn().await?;
            let rows = c
                .query(
                    "SELECT seq, kind, token_id, account_id FROM changes WHERE seq > $1 ORDER BY seq LIMIT 10000",
                    &[&seq],
                )
                .await
                .map_err(|e| db.err(e))?;
            rows.iter()
                .map(|r| {
                    Ok(Change {
                        seq: r.try_get(0)?,
                        kind: r.try_get(1)?,
                        token_id: r.try_get(2)?,
                        account_id: r.try_get(3)?,
                    })
                })
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()
                .map_err(|e| db.err(e))
        })
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
        let (db, json) = (self.db.clone(), json.to_string());
        self.run(async move {
            let c = db.conn().await?;
            c.execute("INSERT INTO audit_outbox (line) VALUES ($1)", &[&json])
                .await
                .map_err(|e| db.err(e))?;
            db.wrote();
            Ok(())
        })
    }

    pub(crate) fn outbox_peek(&self, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        let db = self.db.clone();
        self.run(async move {
            let c = db.conn().await?;
            let rows = c
                .query(
                    "SELECT id, line FROM audit_outbox ORDER BY id LIMIT $1",
                    &[&(limit as i64)],
                )
                .await
                .map_err(|e| db.err(e))?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()
                .map_err(|e| db.err(e))
        })
    }

    pub(crate) fn outbox_ack(&self, id: i64) -> Result<(), StoreError> {
        let db = self.db.clone();
        self.run(async move {
            let c = db.conn().await?;
            c.execute("DELETE FROM audit_outbox WHERE id <= $1", &[&id])
                .await
                .map_err(|e| db.err(e))?;
            db.wrote();
            Ok(())
        })
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
            let accounts = tx
                .query(
                    "SELECT id, name, email, created_at, created_by, disabled_at, disabled_by FROM accounts ORDER BY id COLLATE \"C\"",
                    &[],
                )
                .await
                .map_err(e)?
                .iter()
                .map(|r| {
                    Ok(DumpAccount {
                        id: r.try_get(0)?,
                        name: r.try_get(1)?,
                        email: r.try_get(2)?,
                        created_at: r.try_get(3)?,
                        created_by: r.try_get(4)?,
                        disabled_at: r.try_get(5)?,
                        disabled_by: r.try_get(6)?,
                    })
                })
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()
                .map_err(e)?;
            let tokens = tx
                .query(&format!("SELECT {DUMP_TOKEN_COLUMNS} FROM tokens ORDER BY id COLLATE \"C\""), &[])
                .await
                .map_err(e)?
                .iter()
                .map(|r| {
                    Ok(DumpToken {
                        id: r.try_get(0)?,
                        account_id: r.try_get(1)?,
                        name: r.try_get(2)?,
                        display_prefix: r.try_get(3)?,
                        hash: r.try_get(4)?,
                        role: r.try_get(5)?,
                        permissions: r.try_get(6)?,
                        scopes: r.try_get(7)?,
                        allowed_cidrs: r.try_get(8)?,
                        rate_rps: r.try_get(9)?,
                        rate_burst: r.try_get(10)?,
                        created_at: r.try_get(11)?,
                        created_by: r.try_get(12)?,
                        expires_at: r.try_get(13)?,
                        last_used_at: r.try_get(14)?,
                        last_used_ip: r.try_get(15)?,
                        revoked_at: r.try_get(16)?,
                        revoked_by: r.try_get(17)?,
                        revoke_reason: r.try_get(18)?,
                        rotated_from: r.try_get(19)?,
                        rotation_deadline: r.try_get(20)?,
                    })
                })
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()
                .map_err(e)?;
            let changes = tx
                .query("SELECT seq, at, kind, token_id, account_id FROM changes ORDER BY seq", &[])
                .await
                .map_err(e)?
                .iter()
                .map(|r| {
                    Ok(DumpChange {
                        seq: r.try_get(0)?,
                        at: r.try_get(1)?,
                        kind: r.try_get(2)?,
                        token_id: r.try_get(3)?,
                        account_id: r.try_get(4)?,
                    })
                })
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()
                .map_err(e)?;
            let outbox = tx
                .query("SELECT id, line FROM audit_outbox ORDER BY id", &[])
                .await
                .map_err(e)?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()
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
            let r = tx
                .query_one(
                    "SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM tokens), \
                     (SELECT count(*) FROM changes), (SELECT count(*) FROM audit_outbox)",
                    &[],
                )
                .await
                .map_err(e)?;
            let counts: (i64, i64, i64, i64) = (
                r.try_get(0).map_err(e)?,
                r.try_get(1).map_err(e)?,
                r.try_get(2).map_err(e)?,
                r.try_get(3).map_err(e)?,
            );
            if counts != (0, 0, 0, 0) {
                return Err(StoreError::NotEmpty {
                    target: db.target.to_string(),
                    what: format!(
                        "{} accounts, {} tokens, {} change-log entries, {} queued audit events",
                        counts.0, counts.1, counts.2, counts.3
                    ),
                });
            }
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
            let ins = tx
                .prepare(&format!(
                    "INSERT INTO tokens ({DUMP_TOKEN_COLUMNS}) VALUES \
                     ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, NULL, $20)"
                ))
                .await
                .map_err(e)?;
            for t in &d.tokens {
                let params: [&(dyn ToSql + Sync); 20] = [
                    &t.id,
                    &t.account_id,
                    &t.name,
                    &t.display_prefix,
                    &t.hash,
                    &t.role,
                    &t.permissions,
                    &t.scopes,
                    &t.allowed_cidrs,
                    &t.rate_rps,
                    &t.rate_burst,
                    &t.created_at,
                    &t.created_by,
                    &t.expires_at,
                    &t.last_used_at,
                    &t.last_used_ip,
                    &t.revoked_at,
                    &t.revoked_by,
                    &t.revoke_reason,
                    &t.rotation_deadline,
                ];
                tx.execute(&ins, &params).await.map_err(e)?;
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

impl Db {
    fn err(&self, e: tokio_postgres::Error) -> StoreError {
        StoreError::Postgres {
            target: self.target.to_string(),
            message: chain(&e),
        }
    }

    fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    async fn conn(&self) -> Result<deadpool_postgres::Object, StoreError> {
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
            .map(|r| raw_token(r).map_err(|e| self.err(e))?.into_row())
            .collect()
    }

    async fn migrate(&self) -> Result<(), StoreError> {
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
    rows.first().map(account).transpose()
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
    let hash: &[u8] = &t.hash;
    tx.execute(
        "INSERT INTO tokens (id, account_id, name, display_prefix, hash, role, permissions, scopes, allowed_cidrs, \
         rate_rps, rate_burst, created_at, created_by, expires_at, rotated_from) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        &[
            &t.id,
            &account_id,
            &t.name,
            &t.display_prefix,
            &hash,
            &t.role,
            &t.permissions,
            &t.scopes,
            &t.allowed_cidrs,
            &t.rate_rps,
            &t.rate_burst,
            &t.created_at,
            &t.created_by,
            &t.expires_at,
            &t.rotated_from,
        ],
    )
    .await?;
    Ok(())
}

fn account(r: &Row) -> Result<Account, tokio_postgres::Error> {
    Ok(Account {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        email: r.try_get(2)?,
        created_at: r.try_get(3)?,
        created_by: r.try_get(4)?,
        disabled_at: r.try_get(5)?,
    })
}

fn raw_token(r: &Row) -> Result<RawTokenRow, tokio_postgres::Error> {
    Ok(RawTokenRow {
        id: r.try_get(0)?,
        account_id: r.try_get(1)?,
        account: r.try_get(2)?,
        name: r.try_get(3)?,
        prefix: r.try_get(4)?,
        role: r.try_get(5)?,
        permissions: r.try_get(6)?,
        scopes: r.try_get(7)?,
        allowed_cidrs: r.try_get(8)?,
        rate_rps: r.try_get(9)?,
        rate_burst: r.try_get(10)?,
        created_at: r.try_get(11)?,
        created_by: r.try_get(12)?,
        expires_at: r.try_get(13)?,
        last_used_at: r.try_get(14)?,
        last_used_ip: r.try_get(15)?,
        revoked_at: r.try_get(16)?,
        revoked_by: r.try_get(17)?,
        revoke_reason: r.try_get(18)?,
        rotated_from: r.try_get(19)?,
        rotation_deadline: r.try_get(20)?,
        account_disabled_at: r.try_get(21)?,
    })
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

/// A connection that LISTENs, with the task that drives it.
struct Listener {
    client: Client,
    notes: mpsc::UnboundedReceiver<()>,
    driver: tokio::task::JoinHandle<()>,
}

async fn listen(
    cfg: &tokio_postgres::Config,
    tls: MakeRustlsConnect,
) -> Result<Listener, tokio_postgres::Error> {
    let (client, mut conn) = cfg.connect(tls).await?;
    let (tx, notes) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    if tx.send(()).is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
    });
    if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
        driver.abort();
        return Err(e);
    }
    Ok(Listener {
        client,
        notes,
        driver,
    })
}

/// Forwards notifications until the connection fails or misses a heartbeat.
async fn serve(feed: &Feed, l: &mut Listener) {
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    loop {
        tokio::select! {
            n = l.notes.recv() => match n {
                Some(()) => {
                    let _ = feed.tx.send(ChangeSignal::Notified);
                }
                None => return,
            },
            _ = beat.tick() => {
                match tokio::time::timeout(HEARTBEAT_TIMEOUT, l.client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    _ => return,
                }
            }
        }
    }
}

/// The notification connection's life: serve, report `Lost`, reconnect with backoff, report
/// `Reconnected`, forever (until the store's runtime shuts down).
async fn feed_loop(
    cfg: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    feed: Arc<Feed>,
    mut listener: Listener,
    target: Arc<str>,
) {
    loop {
        serve(&feed, &mut listener).await;
        listener.driver.abort();
        feed.up.store(false, Ordering::SeqCst);
        let _ = feed.tx.send(ChangeSignal::Lost);
        tracing::warn!(
            store = %target,
            "lost the PostgreSQL notification connection: cached tokens are dropped and every request reads the store until it is back"
        );
        let mut delay = Duration::from_millis(50);
        let mut attempts = 0u32;
        let mut next_log = 0u32;
        listener = loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_BACKOFF);
            if feed.hold.load(Ordering::SeqCst) {
                continue;
            }
            attempts += 1;
            match tokio::time::timeout(Duration::from_secs(5), listen(&cfg, tls.clone())).await {
                Ok(Ok(l)) => break l,
                // First failure, then one line per 30 attempts (about a minute).
                Ok(Err(e)) if attempts == 1 || attempts >= next_log => {
                    next_log = attempts + 30;
                    tracing::warn!(store = %target, attempts, error = %chain(&e), "cannot re-establish the notification connection yet");
                }
                _ => {}
            }
        };
        feed.up.store(true, Ordering::SeqCst);
        let _ = feed.tx.send(ChangeSignal::Reconnected);
        tracing::info!(store = %target, "notification connection re-established; resynchronising from the change log");
    }
}
