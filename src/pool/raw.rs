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

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use http::uri::Authority;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{Pool, PoolError, lock};

/// Idle raw connections per runtime and upstream authority, most recently returned last (so the
/// expired ones are at the front, and returning one costs O(1) whatever the list's length).
#[derive(Default)]
pub(super) struct RawIdle {
    idle: Mutex<HashMap<IdleKey, VecDeque<(TcpStream, Instant)>>>,
}

/// The runtime slot ([`set_runtime_slot`]) and the upstream authority.
type IdleKey = (usize, Authority);

thread_local! {
    /// Which runtime this thread serves: 0 for the shared runtime, 1.. for the single-threaded
    /// ones of `server.workers`. A socket is registered with the I/O driver of the runtime that
    /// opened it, so an idle one is only handed out again on that runtime.
    static RUNTIME_SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the calling thread as the one thread of runtime `slot` (`server.workers`).
pub fn set_runtime_slot(slot: usize) {
    RUNTIME_SLOT.with(|s| s.set(slot));
}

fn runtime_slot() -> usize {
    RUNTIME_SLOT.with(std::cell::Cell::get)
}

/// An upstream connection borrowed for one exchange; give it back with [`Pool::return_raw`].
#[derive(Debug)]
pub struct RawConn {
    /// The socket.
    pub stream: TcpStream,
    authority: Authority,
    /// The runtime whose I/O driver the socket is registered with ([`set_runtime_slot`]).
    slot: usize,
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
                slot: runtime_slot(),
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
            slot: runtime_slot(),
            reused: false,
        })
    }

    /// Gives a connection back after an exchange that ended cleanly.
    pub fn return_raw(&self, conn: RawConn) {
        let now = self.now();
        let settings = &self.shared.settings;
        if settings.max_idle_per_host == 0 {
            return;
        }
        let mut idle = lock(&self.shared.raw.idle);
        let list = idle.entry((conn.slot, conn.authority)).or_default();
        while list.front().is_some_and(|(_, since)| {
            now.saturating_duration_since(*since) >= settings.idle_timeout
        }) {
            list.pop_front();
        }
        if list.len() >= settings.max_idle_per_host {
            list.pop_front();
        }
        list.push_back((conn.stream, now));
    }

    /// Idle raw connections across all authorities (tests).
    pub fn idle_raw_connections(&self) -> usize {
        lock(&self.shared.raw.idle)
            .values()
            .map(VecDeque::len)
            .sum()
    }

    /// Idle raw connections per runtime slot ([`set_runtime_slot`]), across authorities (tests:
    /// which runtimes served requests).
    pub fn idle_raw_by_runtime(&self) -> std::collections::BTreeMap<usize, usize> {
        let mut by = std::collections::BTreeMap::new();
        for ((slot, _), list) in lock(&self.shared.raw.idle).iter() {
            *by.entry(*slot).or_default() += list.len();
        }
        by
    }

    fn checkout_raw(&self, authority: &Authority) -> Option<TcpStream> {
        let now = self.now();
        let timeout = self.shared.settings.idle_timeout;
        let key = (runtime_slot(), authority.clone());
        loop {
            let (stream, since) = lock(&self.shared.raw.idle).get_mut(&key)?.pop_back()?;
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
