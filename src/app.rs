//! Process lifecycle for `serve` (and `demo`): open the store and audit log, bind, run, reload on
//! SIGHUP, drain on SIGTERM / ctrl-c.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::audit::{self, AdminRecord, AuditConfig, AuditLog, Entry};
use crate::config::Config;
use crate::gateway::Gateway;
use crate::server::{Server, TlsHandle};
use crate::store::Store;

/// Exit code for bad usage or config (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// Exit code for failures.
pub const EXIT_FAILURE: u8 = 1;

/// Why the gateway could not start or run, with the process exit code it calls for.
#[derive(Debug)]
pub struct AppError {
    /// Exit code: [`EXIT_USAGE`] (config) or [`EXIT_FAILURE`].
    pub code: u8,
    /// Message for stderr.
    pub message: String,
}

impl AppError {
    /// Bad usage or config (64).
    pub fn usage(m: impl Into<String>) -> Self {
        AppError {
            code: EXIT_USAGE,
            message: m.into(),
        }
    }
    /// Failure (1).
    pub fn failure(m: impl Into<String>) -> Self {
        AppError {
            code: EXIT_FAILURE,
            message: m.into(),
        }
    }
}

/// Where the config is looked for when neither `--config` nor `TOKENGATE_CONFIG` names one, in
/// order: the working directory, then the system-wide file.
pub const CONFIG_CANDIDATES: [&str; 2] = ["tokengate.toml", "/etc/tokengate/tokengate.toml"];

/// The config file to use: `explicit` (`--config`/`TOKENGATE_CONFIG`) wins, else the first of
/// `candidates` that exists. Taking the list keeps the search testable without writing to /etc.
pub fn find_config(explicit: Option<&Path>, candidates: &[&Path]) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    candidates
        .iter()
        .find(|p| p.exists())
        .map(|p| p.to_path_buf())
}

/// The config found by [`find_config`] over [`CONFIG_CANDIDATES`].
pub fn default_config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    let candidates = CONFIG_CANDIDATES.map(Path::new);
    find_config(explicit, &candidates)
}

/// Finds the config: `--config`/`TOKENGATE_CONFIG`, else `./tokengate.toml`, else
/// `/etc/tokengate/tokengate.toml`.
pub fn load_config(path: Option<&Path>) -> Result<Config, AppError> {
    let Some(p) = default_config_path(path) else {
        return Err(AppError::usage(
            "no config file: pass --config FILE (or set TOKENGATE_CONFIG), put one in \
             ./tokengate.toml or /etc/tokengate/tokengate.toml, or try `tokengate demo`; \
             config/tokengate.toml in the repository is an annotated example",
        ));
    };
    Config::load(&p).map_err(|e| AppError::usage(e.to_string()))
}

/// Builds the audit writer config from the validated config (the audit module never reads it).
pub fn audit_config(cfg: &Config) -> AuditConfig {
    AuditConfig {
        path: cfg.audit.path.clone(),
        on_failure: cfg.audit.on_failure,
        max_bytes: cfg.audit.max_bytes,
        queue: cfg.audit.queue,
    }
}

/// A started gateway: bound listeners and background tasks.
pub struct Started {
    /// The gateway handle.
    pub gateway: Gateway,
    /// The bound server.
    pub server: Server,
    /// Background tasks (stopped on drop).
    pub background: crate::gateway::BackgroundGuard,
}

/// Opens the store (refusing to serve if it is unreadable) and the audit log, and binds.
pub async fn start(cfg: Config) -> Result<Started, AppError> {
    let store = open_store(&cfg)
        .map_err(|e| AppError::failure(format!("store unreadable, not serving: {e}")))?;
    store
        .ping()
        .map_err(|e| AppError::failure(format!("store unreadable, not serving: {e}")))?;
    let audit = AuditLog::open(audit_config(&cfg))
        .map_err(|e| AppError::failure(format!("audit log: {e}")))?;
    if listeners_share_host(cfg.server.listen, cfg.admin.listen) {
        tracing::warn!(
            public_listen = %cfg.server.listen,
            admin_listen = %cfg.admin.listen,
            "the admin and public listeners share one host: browsers send cookies to every port \
             of a host, so serve the admin UI under its own host name (the gateway strips its \
             session cookie from forwarded requests, but other sites on this host could read it)"
        );
    }
    let gateway = Gateway::new(cfg, store, audit);
    let server = Server::bind(gateway.clone())
        .await
        .map_err(|e| AppError::failure(e.to_string()))?;
    let background = gateway.spawn_background();
    Ok(Started {
        gateway,
        server,
        background,
    })
}

/// Whether a browser may reach both listeners under one host name (cookies are scoped to a host,
/// not a port): the same address, or either bound to every address.
pub fn listeners_share_host(public: std::net::SocketAddr, admin: std::net::SocketAddr) -> bool {
    public.ip() == admin.ip()
        || public.ip().is_unspecified()
        || admin.ip().is_unspecified()
        || public.ip().is_loopback() && admin.ip().is_loopback()
}

/// Opens the store for serving. A missing SQLite file is created only on a first start: when
/// none of its `-wal`/`-shm`/`-journal` files is there and the audit log is missing or empty.
/// Otherwise a store existed and vanished, and a new empty one would silently answer "no such
/// token" for every token issued (and every revocation made) so far: refuse, and say how to
/// create one on purpose (`tokengate store init`).
fn open_store(cfg: &Config) -> Result<Store, crate::store::StoreError> {
    let o = cfg.store.options();
    if o.url.is_some() || o.path.exists() {
        return Store::open_existing(&o);
    }
    let leftovers = Store::leftovers(&o.path);
    // An audit log on stdout (no `audit.path`) says nothing about earlier starts.
    let audit_with_lines = cfg
        .audit
        .path
        .as_ref()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0));
    let detail = if !leftovers.is_empty() {
        let names: Vec<String> = leftovers.iter().map(|p| p.display().to_string()).collect();
        format!(
            "; {} {} still there, so a store existed (and a process may still have it open)",
            names.join(" and "),
            if names.len() == 1 { "is" } else { "are" }
        )
    } else if let Some(audit) = audit_with_lines {
        format!(
            "; the audit log {} already has lines, so this is not a first start",
            audit.display()
        )
    } else {
        let store = Store::open(&o.path, o.busy_timeout)?;
        tracing::info!(path = %o.path.display(), "no store yet (first start): created a new one");
        return Ok(store);
    };
    Err(crate::store::StoreError::Missing {
        path: o.path,
        detail,
    })
}

/// `tokengate serve`.
pub async fn serve(config: Option<&Path>) -> Result<(), AppError> {
    let cfg = load_config(config)?;
    let source = cfg.source.clone();
    // Handlers go in before anything is bound: once tokengate says it listens, a SIGHUP from
    // logrotate or systemd must never meet the default action (which would kill the process).
    let signals = Signals::install()?;
    let started = start(cfg).await?;
    let gw = started.gateway.clone();
    tracing::info!(
        public = %started.server.public_addr(),
        admin = %started.server.admin_addr(),
        pid = std::process::id(),
        runtime = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::CurrentThread => "current_thread",
            _ => "multi_thread",
        },
        // 0: the public listener is served on that runtime; N: on N runtimes of its own.
        workers = gw.config().server.workers,
        "tokengate listening"
    );
    // Under systemd `Type=notify`: the listeners are bound (connections queue from here on).
    crate::sdnotify::ready(&format!(
        "serving on {} (admin {})",
        started.server.public_addr(),
        started.server.admin_addr()
    ));
    let tls = started.server.tls_handle();
    let Signals { hangup, terminate } = signals;
    match source {
        Some(path) => spawn_reloader(gw.clone(), tls, path, hangup),
        None => drop(hangup),
    }
    let Started {
        server, background, ..
    } = started;
    server
        .run(async move {
            terminate.await;
            crate::sdnotify::stopping();
        })
        .await;
    drop(background);
    gw.audit().shutdown();
    tracing::info!("exiting");
    Ok(())
}

/// Signal handlers installed before the listeners bind.
struct Signals {
    /// SIGHUP: reload.
    hangup: Hangup,
    /// Resolves on SIGTERM or SIGINT.
    terminate: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

#[cfg(unix)]
type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangup = ();

impl Signals {
    #[cfg(unix)]
    fn install() -> Result<Signals, AppError> {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind: SignalKind, name: &str| {
            signal(kind)
                .map_err(|e| AppError::failure(format!("cannot install the {name} handler: {e}")))
        };
        let mut term = install(SignalKind::terminate(), "SIGTERM")?;
        let mut int = install(SignalKind::interrupt(), "SIGINT")?;
        let hangup = install(SignalKind::hangup(), "SIGHUP")?;
        // SIGXFSZ (25 on Linux, except MIPS): a write past RLIMIT_FSIZE raises it, and its
        // default action terminates the process. With a handler installed the write fails with
        // EFBIG instead, which the audit writer treats like a full disk (503 or `continue`,
        // retried until the limit is raised) — the gateway never dies for a full log.
        #[cfg(all(
            target_os = "linux",
            not(any(target_arch = "mips", target_arch = "mips64"))
        ))]
        {
            let mut xfsz = install(SignalKind::from_raw(25), "SIGXFSZ")?;
            tokio::spawn(async move { while xfsz.recv().await.is_some() {} });
        }
        let terminate = Box::pin(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        });
        Ok(Signals { hangup, terminate })
    }

    #[cfg(not(unix))]
    fn install() -> Result<Signals, AppError> {
        Ok(Signals {
            hangup: (),
            terminate: Box::pin(shutdown_signal()),
        })
    }
}

/// Resolves on SIGTERM or ctrl-c (for embedders; `serve` installs its handlers earlier).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("ctrl-c received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

#[cfg(unix)]
fn spawn_reloader(gw: Gateway, tls: TlsHandle, path: PathBuf, mut hup: Hangup) {
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!(config = %path.display(), "SIGHUP received: reloading");
            crate::sdnotify::reloading();
            let status = if reload(&gw, &tls, &path).await {
                "configuration reloaded"
            } else {
                "new configuration refused: serving with the previous one"
            };
            crate::sdnotify::ready(status);
        }
    });
}

#[cfg(not(unix))]
fn spawn_reloader(_gw: Gateway, _tls: TlsHandle, _path: PathBuf, _hup: Hangup) {}

/// Reloads config and certificates; a bad new config is refused and the old one kept.
pub async fn reload(gw: &Gateway, tls: &TlsHandle, path: &Path) -> bool {
    let p = path.to_path_buf();
    let loaded = tokio::task::spawn_blocking(move || Config::load(&p)).await;
    let result = match loaded {
        Ok(Ok(cfg)) => match tls.reload(&cfg) {
            Ok(()) => Ok(cfg),
            Err(e) => Err(e.to_string()),
        },
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let (event, ok, detail) = match result {
        Ok(cfg) => {
            let old = gw.config();
            if old.server.listen != cfg.server.listen || old.admin.listen != cfg.admin.listen {
                tracing::warn!("listen addresses changed: restart tokengate to apply them");
            }
            if old.server.workers != cfg.server.workers {
                tracing::warn!("server.workers changed: restart tokengate to apply it");
            }
            gw.set_config(cfg);
            gw.audit().reopen();
            gw.metrics().reloads_ok.fetch_add(1, Ordering::Relaxed);
            gw.metrics().last_reload_ok.store(true, Ordering::Relaxed);
            tracing::info!(config = %path.display(), "configuration reloaded");
            ("config.reloaded", true, None)
        }
        Err(e) => {
            gw.metrics().reloads_failed.fetch_add(1, Ordering::Relaxed);
            gw.metrics().last_reload_ok.store(false, Ordering::Relaxed);
            tracing::error!(config = %path.display(), error = %e, "new configuration refused; keeping the old one");
            ("config.reload_failed", false, Some(e))
        }
    };
    let _ = gw.audit().record(Entry::Admin(AdminRecord {
        timestamp: audit::now_rfc3339(),
        event: event.into(),
        actor: "signal:SIGHUP".into(),
        auth_type: "signal".into(),
        target: Some(path.display().to_string()),
        reason: detail,
        ..AdminRecord::default()
    }));
    // Give the writer a moment so tests and operators see the line promptly.
    let _ = tokio::time::timeout(Duration::from_secs(1), gw.audit().flush_async()).await;
    ok
}

#[cfg(test)]
mod config_search_tests {
    use super::*;

    #[test]
    fn explicit_config_wins_then_the_first_candidate_that_exists() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("tokengate.toml");
        let system = dir.path().join("etc-tokengate.toml");
        let explicit = dir.path().join("given.toml");
        let candidates = [local.as_path(), system.as_path()];
        assert_eq!(find_config(None, &candidates), None);
        std::fs::write(&system, "").unwrap();
        assert_eq!(find_config(None, &candidates), Some(system.clone()));
        std::fs::write(&local, "").unwrap();
        assert_eq!(find_config(None, &candidates), Some(local.clone()));
        // --config / TOKENGATE_CONFIG wins even over existing files, and even when missing
        // (loading it then fails with its name, rather than silently using another file).
        assert_eq!(
            find_config(Some(&explicit), &candidates),
            Some(explicit.clone())
        );
    }

    #[test]
    fn the_system_file_is_the_last_fallback() {
        assert_eq!(
            CONFIG_CANDIDATES.last(),
            Some(&"/etc/tokengate/tokengate.toml")
        );
        assert_eq!(CONFIG_CANDIDATES[0], "tokengate.toml");
    }
}
