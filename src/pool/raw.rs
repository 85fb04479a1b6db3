//! Raw HTTP/1.1 upstream connections for the fast path (`src/h1/`): plain TCP sockets, borrowed
//! for one exchange and given back only when that exchange ended cleanly (response framed and
//! read to its end, no `Connection: close`). The fast path writes and reads the bytes itself.
//!
//! Same settings as the hyper connections of the pool: connect timeout, `TCP_NODELAY`, TCP
//! keepalive, idle timeout, idle connections per upstream. TLS upstreams are not covered: the
//! fast path leaves their requests to hyper. An idle socket the upstream closed (or that has
//! unexpected bytes waiting) is noticed at checkout, without blocking, and dropped; expired
//! ones are dropped at checkout and return.
//!
//! Must never import `config`, `gateway`, `pipeline`, `proxy` or `h1`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use http::uri::Authority;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{Pool, PoolError, lock};

/// Idle raw connections per upstream authority, most recently returned last.
#[derive(Default)]
pub(super) struct RawIdle {
    idle: Mutex<HashMap<Authority, Vec<(TcpStream, Instant)>>>,
}

/// An upstream connection borrowed for one exchange; give it back with [`Pool::return_raw`].
#[derive(Debug)]
pub struct RawConn {
    /// The socket.
    pub stream: TcpStream,
    authority: Authority,
    reused: bool,
}

impl RawConn {
    /// Whether it came from the idle list (a failure before any response byte may then be
    /// a close that raced the checkout).
    pub fn reused(&self) -> bool {
        self.reused
    }
}

impl Pool {
    /// An idle plain-TCP connection to `authority`, or a new one.
    pub async fn borrow_raw(&self, authority: &Authority) -> Result<RawConn, PoolError> {
        if let Some(stream) = self.checkout_raw(authority) {
            return Ok(RawConn {
                stream,
                authority: authority.clone(),
                reused: true,
            });
        }
        self.connect_raw(authority).await
    }

    /// A new plain-TCP connection to `authority` (never from the idle list).
    pub async fn connect_raw(&self, authority: &Authority) -> Result<RawConn, PoolError> {
        let host = self.host(authority, None);
        let stream = self.connect_tcp(&host).await?;
        self.shared.opened.fetch_add(1, Ordering::Relaxed);
        Ok(RawConn {
            stream,
            authority: authority.clone(),
            reused: false,
        })
    }

    /// Gives a connection back after an exchange that ended cleanly.
    pub fn return_raw(&self, conn: RawConn) {
        let now = self.now();
        let settings = &self.shared.settings;
        let mut idle = lock(&self.shared.raw.idle);
        let list = idle.entry(conn.authority).or_default();
        list.retain(|(_, since)| now.saturating_duration_since(*since) < settings.idle_timeout);
        if list.len() >= settings.max_idle_per_host {
            list.remove(0);
        }
        list.push((conn.stream, now));
    }

    /// Idle raw connections across all authorities (tests).
    pub fn idle_raw_connections(&self) -> usize {
        lock(&self.shared.raw.idle).values().map(Vec::len).sum()
    }

    fn checkout_raw(&self, authority: &Authority) -> Option<TcpStream> {
        let now = self.now();
        let timeout = self.shared.settings.idle_timeout;
        loop {
            let (stream, since) = lock(&self.shared.raw.idle).get_mut(authority)?.pop()?;
            if now.saturating_duration_since(since) >= timeout {
                continue;
            }
            // Alive and quiet: nothing to read, no FIN.
            let mut probe = [0u8; 1];
            match stream.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(stream),
                _ => continue,
            }
        }
    }
}
