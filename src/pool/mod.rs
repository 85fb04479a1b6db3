//! Upstream connection pool: keep-alive HTTP/1.1 connections per upstream authority, built on
//! hyper's `client::conn::http1` (it replaced hyper-util's legacy pooled client, issue 9), over
//! TCP or, for `https://` upstreams, rustls ([`UpstreamConnector`], issue 17).
//!
//! TLS connections are pooled like plain ones, keyed by authority and connector (a reload builds
//! new connectors, so new connections use the new files); the connector's session cache lets a new
//! connection resume an earlier session. A route with `http2 = true` offers `h2` through ALPN:
//! when the upstream picks it, one HTTP/2 connection per upstream is shared by concurrent requests
//! (opened once, by the first request; the others wait for it). When the upstream picks HTTP/1.1
//! the host is remembered as HTTP/1.1 only, until the config is reloaded. Upgrades (WebSocket)
//! always go over HTTP/1.1.
//!
//! A connection goes back to its pool only once the response body has been read to its end; a
//! body dropped early, a `Connection: close` response, an upgrade, or any error drops it. Idle
//! connections are reused most-recently-used first and expire after [`DEFAULT_IDLE_TIMEOUT`]. A
//! request that a pooled connection hands back unsent (the connection closed before the request
//! was written) is retried once on a fresh connection; a request that may have been sent is
//! never replayed.
//!
//! Owns: [`Pool`], its [`Builder`] and the pooled HTTP/1.1 connections. Must never import `config`,
//! `gateway`, `pipeline` or `proxy` (the proxy uses the pool).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::Body;
use crate::tls::UpstreamConnector;

mod h2_conn;
use h2_conn::H2Idle;
mod raw;
pub use raw::{RawConn, set_runtime_slot};

/// How long a connection may sit idle in the pool before it is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per upstream authority; beyond it the oldest is closed.
pub const DEFAULT_MAX_IDLE_PER_HOST: usize = 1024;
/// Deadline for the TCP connect (name resolution included).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keepalive idle time on upstream sockets.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Largest read buffer of an HTTP/1.1 upstream connection (hyper's `max_buf_size`).
pub const UPSTREAM_READ_BUF: usize = 64 * 1024;

/// Why an upstream request failed. The gateway answers them 502: `upstream_tls_error` when
/// [`PoolError::tls_failure`] names a TLS failure, `upstream_error` otherwise.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The request URI named no upstream.
    #[error("upstream request has no authority")]
    NoAuthority,
    /// An `https` request without a TLS connector, or an `http` one with one.
    #[error("upstream scheme `{scheme}` does not match the TLS settings given")]
    Scheme {
        /// The request's scheme.
        scheme: String,
    },
    /// The TLS handshake failed (certificate refused, alert, not a TLS server...).
    #[error("TLS handshake with {authority} failed: {}", crate::tls::upstream_failure(source).unwrap_or_else(|| source.to_string()))]
    Tls {
        /// Upstream.
        authority: Authority,
        /// Cause (a `rustls::Error` inside, when rustls refused).
        source: std::io::Error,
    },
    /// TCP connect (or name resolution) failed.
    #[error("connect to {authority} failed: {source}")]
    Connect {
        /// Upstream.
        authority: Authority,
        /// Cause.
        source: std::io::Error,
    },
    /// TCP connect did not finish in time.
    #[error("connect to {authority} timed out after {timeout:?}")]
    ConnectTimeout {
        /// Upstream.
        authority: Authority,
        /// The connect timeout.
        timeout: Duration,
    },
    /// The HTTP/1.1 connection could not be set up.
    #[error("HTTP/1.1 handshake with {authority} failed: {source}")]
    Handshake {
        /// Upstream.
        authority: Authority,
        /// Cause.
        source: hyper::Error,
    },
    /// The HTTP/2 connection could not be set up.
    #[error("HTTP/2 handshake with {authority} failed: {source}")]
    Http2Handshake {
        /// Upstream.
        authority: Authority,
        /// Cause.
        source: hyper::Error,
    },
    /// Sending the request or reading the response head failed.
    #[error("upstream request failed: {0}")]
    Request(#[source] hyper::Error),
}

impl PoolError {
    /// The TLS failure behind this error, in plain words (unknown CA, name mismatch, expired, a
    /// client certificate required...), or None when TLS is not the cause. With TLS 1.3 an
    /// upstream refuses a client certificate after the client's side of the handshake ended, so
    /// that shows up on the request rather than the handshake.
    pub fn tls_failure(&self) -> Option<String> {
        match self {
            PoolError::Tls { source, .. } => {
                Some(crate::tls::upstream_failure(source).unwrap_or_else(|| source.to_string()))
            }
            PoolError::Handshake { source, .. }
            | PoolError::Http2Handshake { source, .. }
            | PoolError::Request(source) => crate::tls::upstream_failure(source),
            _ => None,
        }
    }
}

/// Settings of a [`Pool`]; every default is a named `DEFAULT_*` const.
#[derive(Debug, Clone)]
pub struct Builder {
    idle_timeout: Duration,
    max_idle_per_host: usize,
    connect_timeout: Duration,
    tcp_keepalive: Option<Duration>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_idle_per_host: DEFAULT_MAX_IDLE_PER_HOST,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tcp_keepalive: Some(DEFAULT_TCP_KEEPALIVE),
        }
    }
}

impl Builder {
    /// Idle time after which a pooled connection is closed.
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }

    /// Idle connections kept per authority (0 disables reuse).
    pub fn max_idle_per_host(mut self, n: usize) -> Self {
        self.max_idle_per_host = n;
        self
    }

    /// TCP connect deadline.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// TCP keepalive idle time (None: leave the OS default, usually off).
    pub fn tcp_keepalive(mut self, d: Option<Duration>) -> Self {
        self.tcp_keepalive = d;
        self
    }

    /// Builds the pool.
    pub fn build(self) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                settings: self,
                h1: {
                    let mut b = http1::Builder::new();
                    // One flat buffer per write instead of an iovec per head and body chunk:
                    // fewer, simpler `write`s on loopback and LAN; measured 1.12-1.24 x
                    // throughput together with the server side (docs/performance.md).
                    b.writev(false);
                    // The read buffer (and so the largest body chunk handed on) stays at 64 KiB
                    // instead of hyper's ~400 KiB: what a client that stops reading can pin per
                    // upstream connection until the send timeout cuts it (docs/limits.md). Also
                    // the largest upstream response head accepted.
                    b.max_buf_size(UPSTREAM_READ_BUF);
                    b
                },
                h2: {
                    let mut b = http2::Builder::new(TokioExecutor::new());
                    b.timer(hyper_util::rt::TokioTimer::new());
                    b
                },
                hosts: RwLock::new(HashMap::new()),
                clock_offset_ms: AtomicU64::new(0),
                reaper_running: AtomicBool::new(false),
                opened: AtomicU64::new(0),
                retried: AtomicU64::new(0),
                raw: raw::RawIdle::default(),
            }),
        }
    }
}

/// Keep-alive HTTP/1.1 client to the upstreams: one pool of idle connections per authority.
/// Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("settings", &self.shared.settings)
            .field("idle", &self.idle_connections())
            .finish()
    }
}

/// The pool's hosts, by authority and TLS connector id (see `Shared::hosts`).
type Hosts = HashMap<(Authority, u64), Arc<Host>>;

struct Shared {
    settings: Builder,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// RwLock: every request takes the read lock for one lookup; the write lock is taken only the
    /// first time an upstream is seen. Keyed by authority and TLS connector id (0: plain TCP).
    /// Plain entries are never removed: the set of upstreams is the routes' (bounded), and an
    /// empty entry costs a few words. A TLS entry goes once its connector is no longer in any
    /// config (after a reload), with its connections.
    hosts: RwLock<Hosts>,
    /// Added to the monotonic clock: tests advance it instead of sleeping through the idle timeout.
    clock_offset_ms: AtomicU64,
    /// A reaper task is running (at most one; it exits when no connection is idle).
    reaper_running: AtomicBool,
    opened: AtomicU64,
    retried: AtomicU64,
    /// Raw HTTP/1.1 connections of the fast path ([`raw`]).
    raw: raw::RawIdle,
}

/// One upstream authority (and TLS connector) and its idle connections.
struct Host {
    authority: Authority,
    /// TLS settings (`https://` upstreams).
    tls: Option<Arc<UpstreamConnector>>,
    /// Host for `TcpStream::connect`: IPv6 literals without their brackets.
    connect_host: Box<str>,
    port: u16,
    /// `Host` header for requests that carry none, computed once (the legacy client's rule: the
    /// port only when it is not 80).
    host_header: HeaderValue,
    /// Mutex held only to push or pop (never across an await). Oldest at the front, so expiry
    /// trims the front and checkout takes from the back (most recently used: warm caches).
    idle: Mutex<VecDeque<Idle>>,
    /// The shared HTTP/2 connection, when the upstream picked `h2`. Mutex held only to clone or
    /// replace the sender.
    h2: Mutex<Option<H2Idle>>,
    /// Held (across the connect) by the request opening the HTTP/2 connection, so that concurrent
    /// first requests share one connection instead of each opening its own.
    h2_connecting: tokio::sync::Mutex<()>,
    /// The upstream answered an `h2` offer with HTTP/1.1: later connections go straight to the
    /// HTTP/1.1 pool without waiting on `h2_connecting`.
    h2_refused: AtomicBool,
}

struct Idle {
    tx: SendRequest<Body>,
    since: Instant,
}

/// A new connection, as ALPN decided.
enum Conn {
    H1(SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Host {
    fn new(authority: &Authority, tls: Option<Arc<UpstreamConnector>>) -> Host {
        let host = authority.host();
        let default_port = if tls.is_some() { 443 } else { 80 };
        let port = authority.port_u16().unwrap_or(default_port);
        let host_header = if port == default_port {
            HeaderValue::from_str(host)
        } else {
            HeaderValue::from_str(&format!("{host}:{port}"))
        }
        .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        let connect_host = host.trim_start_matches('[').trim_end_matches(']').into();
        Host {
            authority: authority.clone(),
            tls,
            connect_host,
            port,
            host_header,
            idle: Mutex::new(VecDeque::new()),
            h2: Mutex::new(None),
            h2_connecting: tokio::sync::Mutex::new(()),
            h2_refused: AtomicBool::new(false),
        }
    }

    /// Takes the most recently used idle connection that is ready, dropping expired and closed
    /// ones on the way. A connection that is neither ready nor closed stays: it is still finishing
    /// its last exchange (e.g. the request body after an early response) and may become ready.
    fn checkout(&self, now: Instant, idle_timeout: Duration) -> Option<SendRequest<Body>> {
        let mut idle = lock(&self.idle);
        trim_front(&mut idle, now, idle_timeout);
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if idle[i].tx.is_closed() {
                idle.remove(i);
            } else if idle[i].tx.is_ready() {
                return idle.remove(i).map(|c| c.tx);
            }
        }
        None
    }

    /// Puts a connection whose exchange completed back; false when it was not kept.
    fn release(&self, tx: SendRequest<Body>, now: Instant, settings: &Builder) -> bool {
        if tx.is_closed() || settings.max_idle_per_host == 0 {
            return false;
        }
        let mut idle = lock(&self.idle);
        trim_front(&mut idle, now, settings.idle_timeout);
        while idle.len() >= settings.max_idle_per_host {
            idle.pop_front();
        }
        idle.push_back(Idle { tx, since: now });
        true
    }

    /// Drops expired and closed connections; returns when the oldest remaining one expires.
    fn prune(&self, now: Instant, idle_timeout: Duration) -> Option<Instant> {
        let h2 = self.prune_h2(now, idle_timeout);
        let mut idle = lock(&self.idle);
        trim_front(&mut idle, now, idle_timeout);
        idle.retain(|c| !c.tx.is_closed());
        let h1 = idle.front().map(|c| c.since + idle_timeout);
        h1.into_iter().chain(h2).min()
    }

    /// A TLS host whose connector no config holds any more (replaced by a reload): nothing will
    /// ask for it again.
    fn stale(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| Arc::strong_count(t) == 1)
    }
}

/// Drops expired (and closed) connections from the old end of the queue.
fn trim_front(idle: &mut VecDeque<Idle>, now: Instant, idle_timeout: Duration) {
    while idle
        .front()
        .is_some_and(|c| now.saturating_duration_since(c.since) >= idle_timeout || c.tx.is_closed())
    {
        idle.pop_front();
    }
}

impl Default for Pool {
    fn default() -> Self {
        Builder::default().build()
    }
}

impl Pool {
    /// A builder with the documented defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Sends `req` (absolute `http://` URI naming the upstream, as `proxy::upstream_request`
    /// builds it) on an idle connection to its authority, or on a new one. The request goes out in
    /// origin-form with its headers as they are; a `Host` header is added from the authority only
    /// when the request has none.
    pub async fn request(&self, req: Request<Body>) -> Result<Response<PooledBody>, PoolError> {
        self.request_via(req, None).await
    }

    /// [`request`](Self::request), over TLS with `tls` for an `https://` URI (the route's
    /// connector; required for `https`, refused for `http`). On HTTP/2 the request goes out with
    /// `:authority` taken from its `Host` header (and no `Host`), like the HTTP/1.1 upstream
    /// would have seen it; the response is handed on as HTTP/1.1.
    pub async fn request_via(
        &self,
        req: Request<Body>,
        tls: Option<&Arc<UpstreamConnector>>,
    ) -> Result<Response<PooledBody>, PoolError> {
        let (mut parts, body) = req.into_parts();
        if (parts.uri.scheme() == Some(&Scheme::HTTPS)) != tls.is_some() {
            return Err(PoolError::Scheme {
                scheme: parts.uri.scheme_str().unwrap_or("").to_string(),
            });
        }
        let host = self.host(parts.uri.authority().ok_or(PoolError::NoAuthority)?, tls);
        parts.uri = origin_form(parts.uri);
        if !parts.headers.contains_key(header::HOST) {
            parts.headers.insert(header::HOST, host.host_header.clone());
        }
        let upgrade = parts.headers.contains_key(header::UPGRADE);
        let mut req = Request::from_parts(parts, body);

        if !upgrade && host.wants_h2() {
            req = match self.try_h2(&host, req).await? {
                Ok(resp) => return Ok(resp),
                Err(req) => req,
            };
        }

        if let Some(mut tx) = host.checkout(self.now(), self.shared.settings.idle_timeout) {
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(self.lease(resp, tx, host, upgrade)),
                Err(mut e) => match e.take_message() {
                    // The connection closed before the request was written: nothing was sent,
                    // so one retry on a fresh connection is safe for any method.
                    Some(unsent) => {
                        tracing::debug!(error = %e.error(), upstream = %host.authority, "pooled connection closed; retrying on a new one");
                        self.shared.retried.fetch_add(1, Ordering::Relaxed);
                        req = unsent;
                    }
                    // It may have been sent: never replayed.
                    None => return Err(PoolError::Request(e.into_error())),
                },
            }
        }
        let mut tx = match self.connect(&host, false).await? {
            Conn::H1(tx) => tx,
            // Not offered, so not picked; a server that picks it anyway is not spoken to.
            Conn::H2(_) => {
                return Err(PoolError::Tls {
                    authority: host.authority.clone(),
                    source: std::io::Error::other("the upstream chose h2 without it being offered"),
                });
            }
        };
        let resp = tx.send_request(req).await.map_err(PoolError::Request)?;
        Ok(self.lease(resp, tx, host, upgrade))
    }

    /// Connections opened so far (tests, metrics).
    pub fn connections_opened(&self) -> u64 {
        self.shared.opened.load(Ordering::Relaxed)
    }

    /// Requests retried on a new connection because a pooled one closed before sending.
    pub fn retries(&self) -> u64 {
        self.shared.retried.load(Ordering::Relaxed)
    }

    /// Idle connections across all authorities (closed or expired ones included until pruned).
    pub fn idle_connections(&self) -> usize {
        let hosts = self.shared.read_hosts();
        hosts
            .values()
            .map(|h| lock(&h.idle).len() + usize::from(lock(&h.h2).is_some()))
            .sum()
    }

    /// Idle HTTP/1 connections whose peer has closed them, not yet pruned (tests: wait until
    /// the pool has seen the FIN instead of sleeping).
    #[doc(hidden)]
    pub fn closed_idle_connections(&self) -> usize {
        let hosts = self.shared.read_hosts();
        hosts
            .values()
            .map(|h| lock(&h.idle).iter().filter(|c| c.tx.is_closed()).count())
            .sum()
    }

    /// Moves the pool's idle clock forward (tests: idle expiry without sleeping).
    #[doc(hidden)]
    pub fn advance_clock(&self, by: Duration) {
        self.shared
            .clock_offset_ms
            .fetch_add(by.as_millis() as u64, Ordering::Relaxed);
    }

    fn now(&self) -> Instant {
        self.shared.now()
    }

    fn host(&self, authority: &Authority, tls: Option<&Arc<UpstreamConnector>>) -> Arc<Host> {
        let key = (authority.clone(), tls.map_or(0, |t| t.id()));
        {
            let hosts = self.shared.read_hosts();
            if let Some(h) = hosts.get(&key) {
                return h.clone();
            }
        }
        let mut hosts = self.shared.write_hosts();
        // A new connector is seen after a reload: drop the hosts of the connectors it replaced.
        hosts.retain(|_, h| !h.stale());
        hosts
            .entry(key)
            .or_insert_with(|| Arc::new(Host::new(authority, tls.cloned())))
            .clone()
    }

    /// Opens a connection: TCP, then TLS for an `https` upstream (offering `h2` when `offer_h2`
    /// and the route allows it), then the HTTP handshake of the protocol ALPN settled on. The
    /// connect timeout covers TCP and TLS together.
    async fn connect(&self, host: &Host, offer_h2: bool) -> Result<Conn, PoolError> {
        let deadline = Instant::now() + self.shared.settings.connect_timeout;
        let stream = self.connect_tcp(host).await?;
        let Some(tls) = &host.tls else {
            return self.handshake_h1(host, TokioIo::new(stream)).await;
        };
        let connector = tokio_rustls::TlsConnector::from(tls.client_config(offer_h2));
        let handshake = connector.connect(tls.server_name().clone(), stream);
        let stream = self.in_time(
            host,
            tokio::time::timeout_at(deadline, handshake).await,
            |authority, source| PoolError::Tls { authority, source },
        )?;
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (tx, conn) = self
                .shared
                .h2
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|source| PoolError::Http2Handshake {
                    authority: host.authority.clone(),
                    source,
                })?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                }
            });
            self.shared.opened.fetch_add(1, Ordering::Relaxed);
            return Ok(Conn::H2(tx));
        }
        self.handshake_h1(host, TokioIo::new(stream)).await
    }

    async fn handshake_h1<T>(&self, host: &Host, io: T) -> Result<Conn, PoolError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (tx, conn) =
            self.shared
                .h1
                .handshake(io)
                .await
                .map_err(|source| PoolError::Handshake {
                    authority: host.authority.clone(),
                    source,
                })?;
        // `with_upgrades`: a 101 hands the socket to `hyper::upgrade::on` (WebSocket).
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        self.shared.opened.fetch_add(1, Ordering::Relaxed);
        Ok(Conn::H1(tx))
    }

    /// A connect step's outcome under the connect timeout: its own error turned into a
    /// [`PoolError`] by `err`, or [`PoolError::ConnectTimeout`].
    fn in_time<T>(
        &self,
        host: &Host,
        r: Result<std::io::Result<T>, tokio::time::error::Elapsed>,
        err: impl FnOnce(Authority, std::io::Error) -> PoolError,
    ) -> Result<T, PoolError> {
        match r {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(source)) => Err(err(host.authority.clone(), source)),
            Err(_) => Err(PoolError::ConnectTimeout {
                authority: host.authority.clone(),
                timeout: self.shared.settings.connect_timeout,
            }),
        }
    }

    async fn connect_tcp(&self, host: &Host) -> Result<TcpStream, PoolError> {
        let settings = &self.shared.settings;
        let connect = TcpStream::connect((&*host.connect_host, host.port));
        let stream = self.in_time(
            host,
            tokio::time::timeout(settings.connect_timeout, connect).await,
            |authority, source| PoolError::Connect { authority, source },
        )?;
        stream
            .set_nodelay(true)
            .map_err(|source| PoolError::Connect {
                authority: host.authority.clone(),
                source,
            })?;
        if let Some(time) = settings.tcp_keepalive {
            let keepalive = socket2::TcpKeepalive::new().with_time(time);
            if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
                tracing::debug!(error = %e, upstream = %host.authority, "could not set TCP keepalive");
            }
        }
        Ok(stream)
    }

    /// Wraps the response body so that reading it to the end returns the connection.
    fn lease(
        &self,
        resp: Response<Incoming>,
        tx: SendRequest<Body>,
        host: Arc<Host>,
        upgrade: bool,
    ) -> Response<PooledBody> {
        let reusable = !upgrade
            && resp.status() != StatusCode::SWITCHING_PROTOCOLS
            && keep_alive(resp.version(), resp.headers());
        let lease = reusable.then(|| Lease {
            shared: self.shared.clone(),
            host,
            tx,
        });
        resp.map(|inner| {
            let mut body = PooledBody { inner, lease };
            // No body to read (HEAD, 204, 304, `content-length: 0`): the exchange is complete.
            if body.inner.is_end_stream() {
                body.release();
            }
            body
        })
    }
}

impl Shared {
    /// The hosts, for a lookup (a poisoned lock is taken anyway: no writer leaves the map half
    /// changed).
    fn read_hosts(&self) -> RwLockReadGuard<'_, Hosts> {
        self.hosts.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The hosts, to add or drop some.
    fn write_hosts(&self) -> RwLockWriteGuard<'_, Hosts> {
        self.hosts.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.clock_offset_ms.load(Ordering::Relaxed))
    }

    /// Starts the reaper unless one runs: idle connections then close on time even when no
    /// request comes to check them out.
    fn ensure_reaper(self: &Arc<Self>) {
        if self.reaper_running.load(Ordering::Relaxed)
            || self.reaper_running.swap(true, Ordering::AcqRel)
        {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(reap(Arc::downgrade(self)));
            }
            Err(_) => self.reaper_running.store(false, Ordering::Release),
        }
    }

    /// Prunes every host (dropping those of replaced connectors); the earliest expiry among the
    /// remaining idle connections.
    fn prune_all(&self) -> Option<Instant> {
        let now = self.now();
        {
            let hosts = self.read_hosts();
            if !hosts.values().any(|h| h.stale()) {
                return hosts
                    .values()
                    .filter_map(|h| h.prune(now, self.settings.idle_timeout))
                    .min();
            }
        }
        let mut hosts = self.write_hosts();
        hosts.retain(|_, h| !h.stale());
        hosts
            .values()
            .filter_map(|h| h.prune(now, self.settings.idle_timeout))
            .min()
    }
}

/// Closes idle connections as they expire; exits when none is idle or the pool is gone.
async fn reap(shared: Weak<Shared>) {
    loop {
        let next = {
            let Some(s) = shared.upgrade() else { return };
            match s.prune_all() {
                Some(at) => at,
                None => {
                    s.reaper_running.store(false, Ordering::Release);
                    // A release may have raced the store above and seen the old `true`.
                    if s.prune_all().is_some() && !s.reaper_running.swap(true, Ordering::AcqRel) {
                        continue;
                    }
                    return;
                }
            }
        };
        // `next` is on the pool's (offset) clock; sleep the same span on the real one.
        let wait = shared
            .upgrade()
            .map_or(Duration::ZERO, |s| next.saturating_duration_since(s.now()));
        tokio::time::sleep(wait + Duration::from_millis(1)).await;
    }
}

/// The origin-form request target (`/path?query`), as the legacy client sent it.
fn origin_form(uri: Uri) -> Uri {
    let mut parts = uri.into_parts();
    parts.scheme = None;
    parts.authority = None;
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

/// Whether the upstream lets the connection live on (RFC 9112 §9.3).
fn keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let mut keep = version == Version::HTTP_11;
    for v in headers.get_all(header::CONNECTION) {
        for token in v.to_str().unwrap_or("close").split(',') {
            let token = token.trim();
            if token.eq_ignore_ascii_case("close") {
                return false;
            }
            if token.eq_ignore_ascii_case("keep-alive") {
                keep = true;
            }
        }
    }
    keep
}

/// A connection out of the pool for one exchange.
struct Lease {
    shared: Arc<Shared>,
    host: Arc<Host>,
    tx: SendRequest<Body>,
}

pin_project_lite::pin_project! {
    /// An upstream response body. Read to its end, it returns its connection to the pool; dropped
    /// before, it takes the connection with it (hyper closes a connection whose body was left
    /// unread).
    pub struct PooledBody {
        #[pin]
        inner: Incoming,
        lease: Option<Lease>,
    }
}

impl PooledBody {
    fn release(&mut self) {
        release(&mut self.lease);
    }
}

fn release(lease: &mut Option<Lease>) {
    if let Some(Lease { shared, host, tx }) = lease.take() {
        if host.release(tx, shared.now(), &shared.settings) {
            shared.ensure_reaper();
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        let frame = ready!(inner.as_mut().poll_frame(cx));
        match &frame {
            // A reader may stop at `is_end_stream` without polling for the `None`.
            Some(Ok(_)) if inner.is_end_stream() => release(this.lease),
            Some(Ok(_)) => {}
            Some(Err(_)) => drop(this.lease.take()),
            None => release(this.lease),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("pooled", &self.lease.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use std::sync::atomic::AtomicUsize;
    use tokio::net::TcpListener;

    #[test]
    fn origin_form_keeps_path_and_query_only() {
        let u: Uri = "http://10.0.0.1:8080/a/b?x=1&y=%2F".parse().unwrap();
        assert_eq!(origin_form(u).to_string(), "/a/b?x=1&y=%2F");
        let u: Uri = "http://10.0.0.1:8080".parse().unwrap();
        assert_eq!(origin_form(u).to_string(), "/");
    }

    #[test]
    fn keep_alive_follows_version_and_connection_tokens() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::CONNECTION, v.parse().unwrap());
            m
        };
        assert!(keep_alive(Version::HTTP_11, &HeaderMap::new()));
        assert!(keep_alive(Version::HTTP_11, &h("x-private")));
        assert!(!keep_alive(Version::HTTP_11, &h("x-private, Close")));
        assert!(!keep_alive(Version::HTTP_10, &HeaderMap::new()));
        assert!(keep_alive(Version::HTTP_10, &h("Keep-Alive")));
    }

    #[test]
    fn host_header_and_connect_address_come_from_the_authority() {
        let h = Host::new(&"backend:80".parse().unwrap(), None);
        assert_eq!((h.host_header.to_str().unwrap(), h.port), ("backend", 80));
        let h = Host::new(&"backend".parse().unwrap(), None);
        assert_eq!((h.host_header.to_str().unwrap(), h.port), ("backend", 80));
        let h = Host::new(&"[::1]:8080".parse().unwrap(), None);
        assert_eq!(h.host_header.to_str().unwrap(), "[::1]:8080");
        assert_eq!((&*h.connect_host, h.port), ("::1", 8080));
    }

    /// The raw idle list: the most recently returned connection is borrowed first, at most
    /// `max_idle_per_host` stay (the oldest go), and the expired ones are dropped when one is
    /// returned or borrowed (on the pool's clock, advanced here instead of waiting).
    #[tokio::test]
    async fn raw_connections_are_reused_newest_first_capped_and_expired() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let pool = Pool::builder()
            .max_idle_per_host(2)
            .idle_timeout(Duration::from_secs(10))
            .build();
        let mut conns = Vec::new();
        for _ in 0..3 {
            conns.push(pool.borrow_raw(&authority).await.unwrap());
        }
        assert!(conns.iter().all(|c| !c.reused()));
        let ports: Vec<u16> = conns
            .iter()
            .map(|c| c.stream.local_addr().unwrap().port())
            .collect();
        for c in conns {
            pool.return_raw(c);
        }
        assert_eq!(pool.idle_raw_connections(), 2, "the oldest was dropped");
        let newest = pool.borrow_raw(&authority).await.unwrap();
        assert!(newest.reused());
        assert_eq!(newest.stream.local_addr().unwrap().port(), ports[2]);
        // The one left idle expires; returning another drops it.
        pool.advance_clock(Duration::from_secs(11));
        pool.return_raw(newest);
        assert_eq!(pool.idle_raw_connections(), 1);
        let again = pool.borrow_raw(&authority).await.unwrap();
        assert_eq!(again.stream.local_addr().unwrap().port(), ports[2]);
        assert_eq!(pool.idle_raw_connections(), 0);
    }

    /// A hyper upstream that records (connection index, method, path, body) of every request.
    async fn upstream() -> (std::net::SocketAddr, Arc<Mutex<Vec<(usize, String)>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rec = seen.clone();
        let conns = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let conn = conns.fetch_add(1, Ordering::SeqCst);
                let rec = rec.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let rec = rec.clone();
                        async move {
                            let line = format!("{} {}", req.method(), req.uri());
                            let body = req.into_body().collect().await?.to_bytes();
                            let body = String::from_utf8_lossy(&body).to_string();
                            rec.lock().unwrap().push((conn, format!("{line} {body}")));
                            Ok::<_, hyper::Error>(Response::new(crate::body::full("ok")))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn a_request_handed_back_unsent_is_retried_once_on_a_new_connection() {
        let (addr, seen) = upstream().await;
        let pool = Pool::default();
        let host = pool.host(&addr.to_string().parse().unwrap(), None);
        // A pooled connection that is ready but whose task then stops: what is queued on it is
        // never written, and dropping the task hands it back (the connection closed before the
        // request went out, like an upstream's FIN racing the checkout).
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) = http1::handshake::<_, Body>(TokioIo::new(stream))
            .await
            .unwrap();
        let mut conn = Box::pin(conn);
        tokio::select! {
            _ = &mut conn => panic!("connection ended"),
            r = tx.ready() => r.unwrap(),
        }
        assert!(host.release(tx, pool.now(), &pool.shared.settings));
        let req = Request::post(format!("http://{addr}/deploy"))
            .body(crate::body::full("payload"))
            .unwrap();
        let mut conn = Some(conn);
        let (resp, ()) = tokio::join!(pool.request(req), async {
            tokio::task::yield_now().await;
            drop(conn.take());
        });
        let resp = resp.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            &resp.into_body().collect().await.unwrap().to_bytes()[..],
            b"ok"
        );
        assert_eq!((pool.retries(), pool.connections_opened()), (1, 1));
        // Sent once, whole, on the new connection (index 1; index 0 was the stopped one).
        assert_eq!(
            *seen.lock().unwrap(),
            vec![(1, "POST /deploy payload".to_string())]
        );
    }

    #[tokio::test]
    async fn at_most_max_idle_connections_are_kept_per_authority() {
        let (addr, _) = upstream().await;
        let pool = Pool::builder().max_idle_per_host(2).build();
        let host = pool.host(&addr.to_string().parse().unwrap(), None);
        for _ in 0..3 {
            let Conn::H1(tx) = pool.connect(&host, false).await.unwrap() else {
                panic!("plain TCP is HTTP/1.1")
            };
            host.release(tx, pool.now(), &pool.shared.settings);
        }
        assert_eq!(pool.idle_connections(), 2);
    }
}
