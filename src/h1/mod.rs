//! The purpose-built HTTP/1 forwarding path (issue 18). On a plain-TCP public connection, the
//! connection's own task reads each request head, parses it once ([`parse`]), runs the pipeline's
//! phases (`pipeline::Exchange`: the same code hyper's path runs), writes the rewritten head and
//! the body to a pooled raw upstream connection borrowed for the exchange (`Pool::borrow_raw`),
//! reads the response head, rewrites it the same way, and streams the body back with exact
//! framing ([`framing`]). No channel, no second task, no hyper on the way.
//!
//! It **declines** whatever it does not cover, before consuming a byte of that request: the
//! connection, with the bytes already read, goes to hyper ([`Prefixed`]), which serves it from
//! there on exactly as it would have from the start. Declined: HTTP/2 and anything that is not a
//! clean HTTP/1.1 origin-form head ([`parse`] lists the rules: `Transfer-Encoding`, `Upgrade`,
//! `Expect`, several `Content-Length`, bare LF, limits reached, ...), the reserved prefix and the
//! forward-auth endpoint, and requests for `https://` upstreams. TLS client connections never
//! come here (`server.rs`). So the fast path never refuses a request on framing grounds itself:
//! hyper does, with its statuses and audit lines; every refusal of the pipeline is the pipeline's
//! own response, written as hyper would write it.
//!
//! Owns: the connection loop of the fast path, its timeouts (header read, idle, body idle, send)
//! and drain behaviour. Must never import `server`, `admin` or `cli`.

#[doc(hidden)]
pub mod differential;
mod forward;
pub mod framing;
mod io;
pub mod parse;

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

pub use io::Prefixed;
pub(crate) use io::write_through;
use parse::{Head, Limits, Parsed};

use crate::config::Config;
use crate::gateway::{ConnInfo, Gateway};
use crate::metrics::HttpErrorKind;

/// First read buffer of a connection (hyper's initial buffer size).
const INIT_BUF: usize = 8 * 1024;

/// Where the server is in its life, as the fast path needs to know it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum Stop {
    /// Serving.
    Serving,
    /// Draining: requests are answered with `Connection: close`; idle connections stay.
    Draining,
    /// No request runs any more: idle connections close.
    Closing,
    /// The drain deadline passed: everything is dropped.
    Cut,
}

/// The server's side of a connection, as the fast path sees it.
pub(crate) struct Conn<'a, P> {
    /// The gateway.
    pub(crate) gw: &'a Gateway,
    /// The client.
    pub(crate) info: ConnInfo,
    /// The server's phase.
    pub(crate) stop: watch::Receiver<P>,
    /// Reads [`Stop`] from the server's phase.
    pub(crate) phase: fn(&P) -> Stop,
    /// Requests running on the server (drain).
    pub(crate) busy: &'a AtomicUsize,
}

impl<P> Conn<'_, P> {
    fn now(&self) -> Stop {
        (self.phase)(&self.stop.borrow())
    }
}

/// How a connection left the fast path.
pub(crate) enum Served {
    /// Closed.
    Done,
    /// Declined: hyper serves it from here, `buffered` first.
    Declined {
        /// The client connection.
        stream: TcpStream,
        /// Bytes read and not consumed.
        buffered: BytesMut,
    },
}

/// hyper's `max_buf_size` on the public listener (`server.rs` builds it the same way).
pub(crate) fn max_buf(cfg: &Config) -> usize {
    (cfg.server.max_header_bytes + cfg.server.max_uri_bytes + 4096).max(8192)
}

/// Serves `stream` until it closes or a request is declined.
pub(crate) async fn serve<P>(mut stream: TcpStream, mut c: Conn<'_, P>) -> Served {
    // No buffer until the first bytes arrive (`read_more`): a connection that has sent nothing
    // yet holds none, like an idle keep-alive one.
    let mut buf = BytesMut::new();
    let mut first = true;
    let watch = c.stop.clone();
    let phase = c.phase;
    let phase_now = move || phase(&watch.borrow());
    let mut stop_open = true;
    loop {
        let cfg = c.gw.config();
        let limits = Limits {
            max_buf: max_buf(&cfg),
            max_uri: cfg.server.max_uri_bytes,
        };
        let start = Instant::now();
        let head_deadline = start + cfg.server.header_read_timeout;
        let idle_deadline = start + cfg.server.h2_idle_timeout;
        let head = loop {
            match parse::parse(&buf, limits) {
                Parsed::Head(h) => break h,
                Parsed::Decline(why) => return decline(c.gw, stream, buf, why),
                Parsed::Partial => {}
            }
            let phase = c.now();
            if phase == Stop::Cut || (buf.is_empty() && phase >= Stop::Closing) {
                return Served::Done;
            }
            // One timer: an idle keep-alive connection (nothing of a next head yet) closes at
            // the earlier of the two deadlines; a head being read has only its own.
            let idle = buf.is_empty() && !first;
            let deadline = if idle {
                head_deadline.min(idle_deadline)
            } else {
                head_deadline
            };
            tokio::select! {
                r = read_more(&mut stream, &mut buf) => match r {
                    Ok(0) if buf.is_empty() => return Served::Done,
                    // hyper decides what a cut head is worth (it reads the same EOF).
                    Ok(0) => return decline(c.gw, stream, buf, "end of stream inside a head"),
                    Ok(_) => {}
                    Err(_) => return Served::Done,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    // As hyper: a connection that sent nothing yet, or part of a head, counts
                    // as a header timeout; an idle keep-alive connection just closes.
                    if !idle {
                        c.gw.metrics().http_error(HttpErrorKind::HeaderTimeout);
                    }
                    return Served::Done;
                }
                r = c.stop.changed(), if stop_open => stop_open = r.is_ok(),
            }
        };
        // The config as of this request (a reload may have come while the connection idled).
        let cfg = c.gw.config();
        if let Some(why) = pre_decline(&cfg, &head) {
            return decline(c.gw, stream, buf, why);
        }
        first = false;
        bytes::Buf::advance(&mut buf, head.len);
        c.gw.metrics().h1_fast_path.fetch_add(1, Ordering::Relaxed);
        c.busy.fetch_add(1, Ordering::AcqRel);
        let _busy = Busy(c.busy);
        let keep = {
            // Boxed, once per request: the exchange's state (~5 KiB) would otherwise be part of
            // this future, and so of every connection's task while it idles.
            let mut ex = Box::pin(forward::exchange(
                &mut stream,
                &mut buf,
                head,
                c.gw,
                c.info,
                &phase_now,
                cfg,
            ));
            loop {
                tokio::select! {
                    keep = &mut ex => break keep,
                    r = c.stop.changed(), if stop_open => {
                        stop_open = r.is_ok();
                        if c.now() == Stop::Cut {
                            // Dropping the exchange writes its audit line (`shutdown`).
                            break false;
                        }
                    }
                }
            }
        };
        drop(_busy);
        if !keep {
            let _ = stream.shutdown().await;
            return Served::Done;
        }
        if buf.is_empty() {
            // An idle connection holds no buffer: it is taken again once bytes arrive.
            buf = BytesMut::new();
        }
    }
}

/// Reads more of the client's bytes into `buf`. A released buffer (an idle connection's) is
/// allocated only once the socket is readable.
async fn read_more(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() == 0 {
        loop {
            stream.readable().await?;
            buf.reserve(INIT_BUF);
            match stream.try_read_buf(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(INIT_BUF);
    }
    stream.read_buf(buf).await
}

/// Requests the fast path leaves to hyper though their head parsed cleanly: the gateway's own
/// endpoints, the forward-auth endpoint, and requests for an `https://` upstream.
fn pre_decline(cfg: &Config, head: &Head) -> Option<&'static str> {
    let path = head.uri.path();
    if path.starts_with(&cfg.server.reserved_prefix) {
        return Some("reserved prefix");
    }
    if crate::forward_auth::endpoint(cfg, path).is_some() {
        return Some("forward-auth endpoint");
    }
    if cfg.routes.iter().any(|r| r.upstream_tls.is_some()) {
        let any_non_ascii = cfg.routes.iter().any(|r| r.allow_non_ascii);
        if let Ok(canon) = crate::path::canonicalise(path, any_non_ascii) {
            if cfg
                .route_for(&canon.path)
                .is_some_and(|r| r.upstream_tls.is_some())
            {
                return Some("https upstream");
            }
        }
    }
    None
}

fn decline(gw: &Gateway, stream: TcpStream, buffered: BytesMut, why: &'static str) -> Served {
    tracing::trace!(
        why,
        "HTTP/1 fast path declined; hyper serves the connection"
    );
    gw.metrics().h1_declined.fetch_add(1, Ordering::Relaxed);
    Served::Declined { stream, buffered }
}

/// Counts a request in the server's busy count while it lives.
struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
