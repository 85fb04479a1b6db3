//! The differential check of the fast path's framing against hyper's (issue 18): the same bytes
//! go to [`parse`](super::parse::parse), request after request, and to a hyper HTTP/1 server
//! (built with the listener's limits) over an in-memory duplex. Every request the fast path
//! takes must be one hyper takes too, in the same place of the stream: same method, target and
//! header fields, same body length, and hyper must read its body whole. Where the fast path
//! declines, hyper is the one that decides, so there is nothing to compare from there on.
//!
//! Used by `fuzz/fuzz_targets/h1_framing.rs` and the tests of `h1::parse`. Imports nothing of
//! the crate but `h1::parse`.

use std::cell::RefCell;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::parse::{Limits, Parsed, parse};

/// The limits both sides are run with (the defaults of `server.max_header_bytes` and
/// `server.max_uri_bytes`, and the hyper buffer `server.rs` derives from them).
pub const LIMITS: Limits = Limits {
    max_buf: 16 * 1024 + 8 * 1024 + 4096,
    max_uri: 8 * 1024,
};

/// One request as a side saw it.
#[derive(Debug, PartialEq)]
pub struct Seen {
    /// Method.
    pub method: Method,
    /// Target as received.
    pub target: String,
    /// Header fields.
    pub headers: HeaderMap,
    /// Body length, or None when the body could not be read whole.
    pub body: Option<u64>,
}

/// The requests the fast path takes from the start of `bytes` (it stops at the first it declines,
/// at one whose body is not all there, and after one that closes the connection).
pub fn fast_path(bytes: &[u8]) -> Vec<Seen> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Parsed::Head(h) = parse(&bytes[pos..], LIMITS) {
        let end = pos as u64 + h.len as u64 + h.body_len;
        if end > bytes.len() as u64 {
            break;
        }
        out.push(Seen {
            method: h.method,
            target: h.uri.to_string(),
            headers: h.headers,
            body: Some(h.body_len),
        });
        pos = end as usize;
        if !h.keep_alive {
            break;
        }
    }
    out
}

/// The requests hyper's HTTP/1 server reads from `bytes` (sent whole), in order.
pub fn hyper(bytes: &[u8]) -> Vec<Seen> {
    RUNTIME.with(|rt| rt.borrow().block_on(hyper_async(bytes)))
}

thread_local! {
    static RUNTIME: RefCell<tokio::runtime::Runtime> = RefCell::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime"),
    );
}

async fn hyper_async(bytes: &[u8]) -> Vec<Seen> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (mut client, server) = tokio::io::duplex(bytes.len() + 64 * 1024);
    let svc = {
        let seen = seen.clone();
        service_fn(move |req: Request<Incoming>| {
            let seen = seen.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.ok().map(|b| b.to_bytes().len() as u64);
                seen.lock().expect("not poisoned").push(Seen {
                    method: parts.method,
                    target: parts.uri.to_string(),
                    headers: parts.headers,
                    body,
                });
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.max_buf_size(LIMITS.max_buf).keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(server), svc);
    // The client sends everything and never closes: hyper stops reading once it has seen an
    // end of stream, even with whole requests still in its buffer. Everything runs on this one
    // task, so once hyper has made no progress for a while it is waiting for bytes that will
    // not come.
    let drive_client = async {
        let _ = client.write_all(bytes).await;
        let mut last = usize::MAX;
        let mut still = 0;
        while still < 64 {
            tokio::task::yield_now().await;
            let n = seen.lock().expect("not poisoned").len();
            if n == last {
                still += 1;
            } else {
                (last, still) = (n, 0);
            }
        }
    };
    tokio::select! {
        _ = conn => {}
        () = drive_client => {}
    }
    std::mem::take(&mut *seen.lock().expect("not poisoned"))
}

/// Compares the two: every request the fast path takes, hyper takes alike and reads whole.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    let fast = fast_path(bytes);
    if fast.is_empty() {
        return Ok(());
    }
    let slow = hyper(bytes);
    for (i, f) in fast.iter().enumerate() {
        match slow.get(i) {
            Some(s) if s == f => {}
            Some(s) => {
                return Err(format!(
                    "request {i}: the fast path read {f:?}, hyper {s:?} (input {:?})",
                    String::from_utf8_lossy(bytes)
                ));
            }
            None => {
                return Err(format!(
                    "request {i}: the fast path read {f:?}, hyper refused it or stopped before \
                     (input {:?})",
                    String::from_utf8_lossy(bytes)
                ));
            }
        }
    }
    Ok(())
}
