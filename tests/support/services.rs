//! Real PostgreSQL and Redis for the scale-out tests (issue 10).
//!
//! The servers come from `tests/support/services.sh start` (which `.ci/run` calls) through
//! `TOKENGATE_TEST_PG_URL` and `TOKENGATE_TEST_REDIS_URL`. When they are set, every test uses them
//! for real; when they are missing under CI the test fails saying why; locally it prints a skip
//! line and returns. Each test gets its own database, dropped afterwards.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

const HOW: &str = "start them with `eval \"$(bash tests/support/services.sh start)\"`";

fn required(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{var} is not set: CI must run these tests against a real {what}; {HOW}")
        }
        _ => {
            eprintln!("SKIPPED: {var} is not set, so this {what} test did not run; {HOW}");
            None
        }
    }
}

/// The Redis URL, or None (skip) locally when it is not configured.
pub fn redis_url() -> Option<String> {
    required("TOKENGATE_TEST_REDIS_URL", "Redis")
}

/// Runs `sql` (simple query protocol) against `url` on a private runtime; returns the first column
/// of every row. Works from sync and async code alike.
pub fn pg_exec(url: &str, sql: &str) -> Vec<Option<String>> {
    let (url, sql) = (url.to_string(), sql.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL: {e}"));
            let driver = tokio::spawn(conn);
            let msgs = client
                .simple_query(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
            drop(client);
            let _ = driver.await;
            msgs.into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some(r.get(0).map(str::to_string))
                    }
                    _ => None,
                })
                .collect()
        })
    })
    .join()
    .unwrap()
}

/// A fresh database on the test server, dropped (with its connections) when this is dropped.
pub struct PgDb {
    /// URL of the database.
    pub url: String,
    admin: String,
    name: String,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl PgDb {
    /// Creates one, or None (skip) locally when no server is configured.
    pub fn create() -> Option<PgDb> {
        let admin = required("TOKENGATE_TEST_PG_URL", "PostgreSQL")?;
        let name = format!(
            "tg_{}_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        pg_exec(&admin, &format!("CREATE DATABASE {name}"));
        let url = with_database(&admin, &name);
        Some(PgDb { url, admin, name })
    }

    /// `url` with extra query parameters (e.g. `application_name=replica-b`).
    pub fn url_with(&self, params: &str) -> String {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}{params}", self.url)
    }

    /// Runs SQL in this database.
    pub fn exec(&self, sql: &str) -> Vec<Option<String>> {
        pg_exec(&self.url, sql)
    }

    /// Terminates the server processes of connections with this `application_name`; returns how
    /// many were terminated.
    pub fn terminate(&self, application_name: &str) -> usize {
        pg_exec(
            &self.admin,
            &format!(
                "SELECT pg_terminate_backend(pid)::text FROM pg_stat_activity \
                 WHERE datname = '{}' AND application_name = '{application_name}'",
                self.name
            ),
        )
        .len()
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| {
            pg_exec(
                &self.admin,
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            );
        });
    }
}

/// `url` pointing at database `name` (query string kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}
