//! The change push: a dedicated connection LISTENs on `tokengate_changes` and turns
//! notifications into [`ChangeSignal`]s; it reports `Lost` the moment that connection fails (or
//! misses a heartbeat) and `Reconnected` once it listens again.
//!
//! Owns: the notification connection and its reconnect loop. Never imports: `config` or
//! anything outside `store`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_postgres::{AsyncMessage, Client};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::chain;
use crate::store::ChangeSignal;

/// The NOTIFY channel.
const CHANNEL: &str = "tokengate_changes";
/// How often the notification connection proves it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a heartbeat may take before the connection counts as lost.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// State of the notification connection, shared with its task.
pub(super) struct Feed {
    pub(super) tx: broadcast::Sender<ChangeSignal>,
    pub(super) up: AtomicBool,
    pub(super) hold: AtomicBool,
}

/// A connection that LISTENs, with the task that drives it.
pub(super) struct Listener {
    client: Client,
    notes: mpsc::UnboundedReceiver<()>,
    driver: tokio::task::JoinHandle<()>,
}

pub(super) async fn listen(
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
pub(super) async fn feed_loop(
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
