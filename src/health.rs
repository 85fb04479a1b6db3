//! Readiness: the checks behind the admin `/readyz` and the public health endpoint
//! (`server.health_path`), so both answer from exactly the same facts.
//!
//! Ready means: the store is readable (through the pipeline's pooled connections *and* a fresh
//! one, so a deleted or replaced file shows up), the audit writer's last write succeeded, and the
//! listeners are accepting.
//!
//! Must never import `admin` or `cli`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::gateway::Gateway;

pub use crate::readiness::Readiness;

/// How long a readiness probe waits for the store before calling it unavailable.
pub const READY_STORE_TIMEOUT: Duration = Duration::from_secs(2);

impl Gateway {
    /// Runs the readiness checks now (the admin `/readyz`).
    pub async fn readiness(&self) -> Readiness {
        let store = store_readable(self).await;
        let audit = if self.audit().is_healthy() {
            Ok(())
        } else {
            Err("audit log writes are failing".to_string())
        };
        let listeners = if self.metrics().listening.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("not accepting connections (starting or draining)".to_string())
        };
        Readiness {
            checks: [("store", store), ("audit", audit), ("listeners", listeners)],
        }
    }

    /// Readiness for the public health endpoint: a fresh probe, or the last finished one while
    /// another probe is running (see [`crate::readiness::ProbeState`]).
    pub async fn readiness_shared(&self) -> Readiness {
        let state = &self.inner.health;
        if state
            .running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            let last = state.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(r) = last {
                return r;
            }
            // No probe has finished yet: run one of our own rather than guess.
            return self.readiness().await;
        }
        // Clears the flag even if this future is dropped mid-probe.
        struct Running<'a>(&'a AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _running = Running(&state.running);
        let r = self.readiness().await;
        *state.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.clone());
        r
    }
}

/// The store answers through the pipeline's own connections and, for SQLite, on a fresh
/// read-only connection to `store.path` (so a deleted, replaced or unmounted file shows up even
/// while old connections still hold the old inode), within [`READY_STORE_TIMEOUT`].
pub async fn store_readable(gw: &Gateway) -> Result<(), String> {
    let probe = async {
        let pooled = gw.store_call(|s| s.ping()).await.map_err(|e| e.to_string());
        // SQLite only: PostgreSQL has no file to replace, and `ping` already used the pool.
        let path = gw.store().sqlite_path().map(|p| p.to_path_buf());
        let fresh = match path {
            Some(path) => tokio::task::spawn_blocking(move || probe_store_file(&path))
                .await
                .unwrap_or_else(|e| Err(e.to_string())),
            None => Ok(()),
        };
        pooled.and(fresh)
    };
    match tokio::time::timeout(READY_STORE_TIMEOUT, probe).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {READY_STORE_TIMEOUT:?}")),
    }
}

/// Opens the store file read-only on a new connection and reads a table.
fn probe_store_file(path: &std::path::Path) -> Result<(), String> {
    use rusqlite::OpenFlags;
    let c = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| e.to_string())?;
    c.busy_timeout(READY_STORE_TIMEOUT)
        .map_err(|e| e.to_string())?;
    // Reads the schema and at most one row: cheap with millions of tokens.
    c.query_row(
        "SELECT count(*) FROM (SELECT 1 FROM tokens LIMIT 1)",
        [],
        |_| Ok(()),
    )
    .map_err(|e| e.to_string())
}
