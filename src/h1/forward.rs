//! One exchange on the fast path: the pipeline's decision, the request to the upstream (head and
//! the body's first bytes in one write), the response head rewritten and written with the
//! body's first bytes in one write, then both bodies streamed with exact framing. Refusals are
//! the pipeline's responses, written as hyper writes them (`content-length`, `date`).
//!
//! Must never import `server`, `admin` or `cli`.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};

use super::Stop;
use super::framing::{self, BodyFraming, Chunked, Piece, ResponseHead};
use super::io::push_date;
use super::parse::Head;
use crate::body::Body;
use crate::config::Config;
use crate::error::Reject;
use crate::gateway::{ConnInfo, Gateway};
use crate::metrics::HttpErrorKind;
use crate::pipeline::completion::CompletionSlot;
use crate::pipeline::exchange::Outbound;
use crate::pool::{RawConn, UPSTREAM_READ_BUF};

/// Upstream read buffer per exchange.
const UP_BUF: usize = 16 * 1024;

/// Runs one exchange; true when the client connection can carry the next request.
#[allow(clippy::too_many_arguments)]
pub(super) async fn exchange(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    head: Head,
    gw: &Gateway,
    info: ConnInfo,
    phase: &impl Fn() -> Stop,
    cfg: Arc<Config>,
) -> bool {
    let is_head = head.method == Method::HEAD;
    let content_length = head.has_content_length.then_some(head.body_len);
    let mut body_left = head.body_len;
    let keep_client = head.keep_alive;
    let mut req = Request::new(());
    *req.method_mut() = head.method;
    *req.uri_mut() = head.uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = head.headers;
    let mut ex = gw.exchange(cfg.clone(), &req, info);
    let send_timeout = cfg.server.body_idle_timeout;
    let req_deadline = Instant::now() + cfg.server.request_timeout;
    let decided = timeout_at(req_deadline, ex.decide(info, req)).await;
    // A refusal (by the pipeline, or an upstream that failed before its response head) leaves
    // this block with the answer to write; a forwarded exchange returns from inside it.
    let refusal = 'refused: {
        let out = match decided {
            Ok(Ok(out)) => out,
            Ok(Err(resp)) => break 'refused resp,
            Err(_) => break 'refused ex.fail(Reject::RequestTimeout),
        };
        let up_start = std::time::Instant::now();
        let sent = send_request(
            gw,
            client,
            buf,
            &out,
            content_length,
            &mut body_left,
            &cfg,
            req_deadline,
        )
        .await;
        let received = match sent {
            // As hyper does, a client that hangs up while the upstream thinks drops the exchange
            // (its audit line says `client_closed`) and the upstream connection with it.
            Ok(up) => tokio::select! {
                r = read_response_head(up, &out, is_head, req_deadline) => r,
                () = client_gone(client, buf, super::max_buf(&cfg)) => return false,
            },
            Err(e) => Err(e),
        };
        ex.upstream_answered(&out.route, up_start.elapsed());
        let (up, mut upbuf, rh) = match received {
            Ok(r) => r,
            Err(reject) => break 'refused ex.fail(reject),
        };
        let closing = !keep_client || phase() >= Stop::Draining;
        let ResponseHead {
            len,
            status,
            headers,
            framing,
            reusable,
        } = rh;
        upbuf.advance(len);
        let (resp, mut slot) = ex.answer(status, headers);
        drop(ex);
        let mut wire = Vec::with_capacity(512 + upbuf.len().min(UP_BUF));
        push_head(
            &mut wire,
            resp.status(),
            resp.headers(),
            framing_header(framing),
            closing,
        );
        let ok = stream_body(
            client,
            up,
            upbuf,
            wire,
            framing,
            reusable,
            &mut slot,
            gw,
            send_timeout,
        )
        .await;
        return ok && !closing;
    };
    answer_local(
        client,
        buf,
        refusal,
        body_left,
        keep_client,
        is_head,
        phase,
        gw,
        &cfg,
    )
    .await
}

/// Sends the request head and body; the upstream connection it was sent on.
#[allow(clippy::too_many_arguments)]
async fn send_request(
    gw: &Gateway,
    client: &mut TcpStream,
    buf: &mut BytesMut,
    out: &Outbound,
    content_length: Option<u64>,
    body_left: &mut u64,
    cfg: &Config,
    req_deadline: Instant,
) -> Result<RawConn, Reject> {
    let pool = &gw.inner.client;
    let idle = cfg.server.body_idle_timeout;
    let mut up = match timeout_at(req_deadline, pool.borrow_raw(&out.authority)).await {
        Ok(Ok(up)) => up,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, upstream = %out.authority, "upstream connect failed");
            return Err(Reject::UpstreamError);
        }
        Err(_) => return Err(Reject::RequestTimeout),
    };
    let first = (*body_left).min(buf.len() as u64) as usize;
    let mut wire = Vec::with_capacity(256 + out.target.len() + 48 * out.headers.len() + first);
    push_request_head(&mut wire, out, content_length);
    wire.extend_from_slice(&buf[..first]);
    let mut written = timeout(idle, up.stream.write_all(&wire)).await;
    if !matches!(written, Ok(Ok(()))) && up.reused() {
        // A pooled connection that the upstream closed as it was taken: nothing was received
        // there, so the request goes once more on a fresh connection (as the hyper pool does).
        up = match timeout_at(req_deadline, pool.connect_raw(&out.authority)).await {
            Ok(Ok(up)) => up,
            Ok(Err(_)) => return Err(Reject::UpstreamError),
            Err(_) => return Err(Reject::RequestTimeout),
        };
        written = timeout(idle, up.stream.write_all(&wire)).await;
    }
    if !matches!(written, Ok(Ok(()))) {
        return Err(Reject::UpstreamError);
    }
    buf.advance(first);
    *body_left -= first as u64;
    while *body_left > 0 {
        if buf.is_empty() {
            if buf.capacity() < UP_BUF {
                buf.reserve(UP_BUF);
            }
            match timeout(idle, client.read_buf(buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(Reject::UpstreamError),
                Ok(Ok(_)) => {}
                Err(_) => return Err(Reject::BodyIdle),
            }
        }
        let n = (*body_left).min(buf.len() as u64) as usize;
        match timeout(idle, up.stream.write_all(&buf[..n])).await {
            Ok(Ok(())) => {}
            _ => return Err(Reject::UpstreamError),
        }
        buf.advance(n);
        *body_left -= n as u64;
    }
    Ok(up)
}

/// Resolves when the client closes its side of the connection; what it sends meanwhile (a
/// pipelined request) is kept in `buf`, up to `max` bytes, after which it is no longer read.
async fn client_gone(client: &mut TcpStream, buf: &mut BytesMut, max: usize) {
    loop {
        if buf.len() >= max {
            return std::future::pending().await;
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        match client.read_buf(buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Reads the response head (1xx skipped), within the route's timeout from the end of the request
/// body (504) and the request's own deadline.
async fn read_response_head(
    mut up: RawConn,
    out: &Outbound,
    is_head: bool,
    req_deadline: Instant,
) -> Result<(RawConn, BytesMut, ResponseHead), Reject> {
    let up_deadline = Instant::now() + out.timeout;
    let (deadline, late) = if up_deadline <= req_deadline {
        (up_deadline, Reject::UpstreamTimeout)
    } else {
        (req_deadline, Reject::RequestTimeout)
    };
    let mut upbuf = BytesMut::with_capacity(UP_BUF);
    loop {
        match framing::parse_response(&upbuf, is_head) {
            Ok(Some(h)) if h.status == StatusCode::SWITCHING_PROTOCOLS => {
                return Err(Reject::UpstreamError);
            }
            Ok(Some(h)) if h.status.is_informational() => {
                upbuf.advance(h.len);
                continue;
            }
            Ok(Some(h)) => return Ok((up, upbuf, h)),
            Ok(None) if upbuf.len() >= UPSTREAM_READ_BUF => return Err(Reject::UpstreamError),
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(why = e.0, upstream = %out.authority, "unusable upstream response");
                return Err(Reject::UpstreamError);
            }
        }
        if upbuf.capacity() - upbuf.len() < 1024 {
            upbuf.reserve(UP_BUF);
        }
        match timeout_at(deadline, up.stream.read_buf(&mut upbuf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(Reject::UpstreamError),
            Ok(Ok(_)) => {}
            Err(_) => return Err(late),
        }
    }
}

/// Streams the response body after its head (in `wire`); writes the completion line. True when
/// the client got the whole response.
#[allow(clippy::too_many_arguments)]
async fn stream_body(
    client: &mut TcpStream,
    mut up: RawConn,
    mut upbuf: BytesMut,
    mut wire: Vec<u8>,
    framing: BodyFraming,
    reusable: bool,
    slot: &mut CompletionSlot,
    gw: &Gateway,
    send_timeout: Duration,
) -> bool {
    let idle = send_timeout;
    let mut left = match framing {
        BodyFraming::Length(n) => n,
        _ => 0,
    };
    let mut chunked = Chunked::default();
    let mut ended = matches!(framing, BodyFraming::Empty) || framing == BodyFraming::Length(0);
    loop {
        // Frame what has arrived into `wire`.
        match framing {
            BodyFraming::Empty => {}
            BodyFraming::Length(_) => {
                let n = left.min(upbuf.len() as u64) as usize;
                wire.extend_from_slice(&upbuf[..n]);
                upbuf.advance(n);
                slot.sent(n);
                left -= n as u64;
                ended = left == 0;
            }
            BodyFraming::Chunked => {
                while !upbuf.is_empty() && !chunked.done() {
                    match chunked.decode(&upbuf) {
                        Ok(Piece::Data(n)) => {
                            push_chunk(&mut wire, &upbuf[..n]);
                            slot.sent(n);
                            upbuf.advance(n);
                        }
                        Ok(Piece::Framing(n)) => upbuf.advance(n),
                        Ok(Piece::End(n)) => {
                            upbuf.advance(n);
                            wire.extend_from_slice(b"0\r\n\r\n");
                        }
                        Err(e) => {
                            tracing::debug!(why = e.0, "bad chunked body from the upstream");
                            let _ = write_client(client, &wire, send_timeout, gw).await;
                            slot.finish("upstream_reset");
                            return false;
                        }
                    }
                }
                ended = chunked.done();
            }
            BodyFraming::Close => {
                if !upbuf.is_empty() {
                    push_chunk(&mut wire, &upbuf);
                    slot.sent(upbuf.len());
                    upbuf.clear();
                }
            }
        }
        if ended {
            slot.finish("complete");
            if !wire.is_empty() && !write_client(client, &wire, send_timeout, gw).await {
                return false;
            }
            if reusable && upbuf.is_empty() {
                gw.inner.client.return_raw(up);
            }
            return true;
        }
        if !wire.is_empty() {
            if !write_client(client, &wire, send_timeout, gw).await {
                return false;
            }
            wire.clear();
        }
        if upbuf.capacity() - upbuf.len() < 1024 {
            upbuf.reserve(UP_BUF);
        }
        match timeout(idle, up.stream.read_buf(&mut upbuf)).await {
            Ok(Ok(0)) if framing == BodyFraming::Close => {
                wire.extend_from_slice(b"0\r\n\r\n");
                slot.finish("complete");
                return write_client(client, &wire, send_timeout, gw).await;
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                slot.finish("upstream_reset");
                return false;
            }
            Ok(Ok(_)) => {}
            Err(_) => {
                slot.finish("upstream_idle");
                return false;
            }
        }
    }
}

/// Writes to the client within the send timeout; a stalled client is counted and cut.
async fn write_client(client: &mut TcpStream, bytes: &[u8], send: Duration, gw: &Gateway) -> bool {
    match timeout(send, client.write_all(bytes)).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            gw.metrics().http_error(HttpErrorKind::SendTimeout);
            false
        }
    }
}

/// Writes a response the gateway made itself (a refusal, its own answer); true when the
/// connection can carry the next request. A request body not yet read is skipped when it has
/// arrived whole, else the connection closes after the answer (as hyper does).
#[allow(clippy::too_many_arguments)]
async fn answer_local(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    resp: Response<Body>,
    body_left: u64,
    keep_client: bool,
    is_head: bool,
    phase: &impl Fn() -> Stop,
    gw: &Gateway,
    cfg: &Config,
) -> bool {
    // A refusal that says `Connection: close` (hyper closes after it too).
    let says_close = resp
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let mut keep = keep_client && !says_close && phase() < Stop::Draining;
    if body_left > 0 {
        if (buf.len() as u64) >= body_left {
            buf.advance(body_left as usize);
        } else {
            keep = false;
        }
    }
    let (parts, body) = resp.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut wire = Vec::with_capacity(256 + bytes.len());
    let framing = if parts.headers.contains_key(header::CONTENT_LENGTH)
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED
    {
        None
    } else {
        Some(Framing::Length(bytes.len()))
    };
    push_head(
        &mut wire,
        parts.status,
        &parts.headers,
        framing,
        !keep_client || phase() >= Stop::Draining,
    );
    if !is_head {
        wire.extend_from_slice(&bytes);
    }
    write_client(client, &wire, cfg.server.body_idle_timeout, gw).await && keep
}

/// The framing header the fast path adds to a response head.
enum Framing {
    Length(usize),
    Chunked,
}

fn framing_header(f: BodyFraming) -> Option<Framing> {
    match f {
        // The upstream's `content-length` stays (hop-by-hop stripping keeps it).
        BodyFraming::Empty | BodyFraming::Length(_) => None,
        BodyFraming::Chunked | BodyFraming::Close => Some(Framing::Chunked),
    }
}

fn push_head(
    wire: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    framing: Option<Framing>,
    close: bool,
) {
    wire.extend_from_slice(b"HTTP/1.1 ");
    wire.extend_from_slice(status.as_str().as_bytes());
    wire.push(b' ');
    wire.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    wire.extend_from_slice(b"\r\n");
    push_headers(wire, headers);
    match framing {
        Some(Framing::Length(n)) => {
            wire.extend_from_slice(b"content-length: ");
            let mut b = itoa_buf();
            wire.extend_from_slice(itoa(&mut b, n as u64));
            wire.extend_from_slice(b"\r\n");
        }
        Some(Framing::Chunked) => wire.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        None => {}
    }
    if close && !headers.contains_key(header::CONNECTION) {
        wire.extend_from_slice(b"connection: close\r\n");
    }
    if !headers.contains_key(header::DATE) {
        wire.extend_from_slice(b"date: ");
        push_date(wire);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"\r\n");
}

fn push_request_head(wire: &mut Vec<u8>, out: &Outbound, content_length: Option<u64>) {
    wire.extend_from_slice(out.method.as_str().as_bytes());
    wire.push(b' ');
    wire.extend_from_slice(out.target.as_bytes());
    wire.extend_from_slice(b" HTTP/1.1\r\n");
    push_headers(wire, &out.headers);
    if let Some(n) = content_length {
        wire.extend_from_slice(b"content-length: ");
        let mut b = itoa_buf();
        wire.extend_from_slice(itoa(&mut b, n));
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"\r\n");
}

fn push_headers(wire: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        wire.extend_from_slice(name.as_str().as_bytes());
        wire.extend_from_slice(b": ");
        wire.extend_from_slice(value.as_bytes());
        wire.extend_from_slice(b"\r\n");
    }
}

fn push_chunk(wire: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let mut hex = [0u8; 16];
    let mut n = data.len();
    let mut i = hex.len();
    loop {
        i -= 1;
        hex[i] = b"0123456789abcdef"[n % 16];
        n /= 16;
        if n == 0 {
            break;
        }
    }
    wire.extend_from_slice(&hex[i..]);
    wire.extend_from_slice(b"\r\n");
    wire.extend_from_slice(data);
    wire.extend_from_slice(b"\r\n");
}

fn itoa_buf() -> [u8; 20] {
    [0; 20]
}

fn itoa(b: &mut [u8; 20], mut n: u64) -> &[u8] {
    let mut i = b.len();
    loop {
        i -= 1;
        b[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &b[i..]
}
