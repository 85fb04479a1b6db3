//! Listeners: accept → connection limits → TLS handshake (own timeout) → `TokioIo` → hyper's
//! auto (HTTP/1.1 + HTTP/2) builder with its timer set (without a timer hyper's header read
//! timeout silently does nothing) → the gateway pipeline. Graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::admin;
use crate::config::Config;
use crate::gateway::{ConnInfo, Gateway};
use crate::tls::{self, TlsError};

mod admission;
mod workers;
use admission::Admission;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// TLS files are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A `server.workers` runtime could not be built.
    #[error("cannot start a worker runtime (server.workers): {source}")]
    Runtime {
        /// Cause.
        source: std::io::Error,
    },
}

/// A bound server, not yet running.
pub struct Server {
    gateway: Gateway,
    public: Public,
    admin: TcpListener,
    public_tls: Arc<ArcSwapOption<TlsAcceptor>>,
    admin_tls: Arc<ArcSwapOption<TlsAcceptor>>,
    /// Web UI sessions: state of the admin listener, which owns them (the gateway does not).
    sessions: Arc<admin::session::Sessions>,
}

/// The public listener: one socket on the shared runtime, or one per `server.workers` runtime.
enum Public {
    Shared(TcpListener),
    Workers(Vec<workers::Worker>),
}

/// Handle to a running server's TLS material, for reloads.
#[derive(Clone)]
pub struct TlsHandle {
    public: Arc<ArcSwapOption<TlsAcceptor>>,
    admin: Arc<ArcSwapOption<TlsAcceptor>>,
}

impl TlsHandle {
    /// Reloads certificates from the config; on error the old ones stay.
    pub fn reload(&self, cfg: &Config) -> Result<(), TlsError> {
        let public = acceptor(cfg.server.tls.as_ref())?;
        let admin = acceptor(cfg.admin.tls.as_ref())?;
        self.public.store(public.map(Arc::new));
        self.admin.store(admin.map(Arc::new));
        Ok(())
    }
}

fn acceptor(files: Option<&crate::config::TlsFiles>) -> Result<Option<TlsAcceptor>, TlsError> {
    files
        .map(|f| tls::server_config(f).map(TlsAcceptor::from))
        .transpose()
}

impl Server {
    /// Binds both listeners (port 0 allowed) and loads TLS.
    pub async fn bind(gateway: Gateway) -> Result<Server, ServerError> {
        let cfg = gateway.config();
        let public_tls = acceptor(cfg.server.tls.as_ref())?;
        let admin_tls = acceptor(cfg.admin.tls.as_ref())?;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })
        };
        let public = match cfg.server.workers {
            0 => Public::Shared(bind(cfg.server.listen).await?),
            n => Public::Workers(workers::bind(cfg.server.listen, n)?),
        };
        let admin = bind(cfg.admin.listen).await?;
        Ok(Server {
            gateway,
            public,
            admin,
            public_tls: Arc::new(ArcSwapOption::new(public_tls.map(Arc::new))),
            admin_tls: Arc::new(ArcSwapOption::new(admin_tls.map(Arc::new))),
            sessions: Arc::new(admin::session::Sessions::new()),
        })
    }

    /// Public listener address.
    pub fn public_addr(&self) -> SocketAddr {
        match &self.public {
            Public::Shared(l) => l.local_addr().expect("bound"),
            Public::Workers(w) => w[0].local_addr(),
        }
    }

    /// Admin listener address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound")
    }

    /// The admin listener's web UI sessions.
    pub fn sessions(&self) -> Arc<admin::session::Sessions> {
        self.sessions.clone()
    }

    /// TLS reload handle.
    pub fn tls_handle(&self) -> TlsHandle {
        TlsHandle {
            public: self.public_tls.clone(),
            admin: self.admin_tls.clone(),
        }
    }

    /// Serves until `shutdown` completes, then stops accepting, drains in-flight requests up to
    /// `server.shutdown_grace`, and flushes last-used data and the audit log.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(Phase::Serving);
        let busy = Arc::new(AtomicUsize::new(0));
        let graceful = Arc::new(GracefulShutdown::new());
        let gw = self.gateway.clone();
        // Bound in `bind`, accepting from the next line on (readiness reports this).
        gw.metrics().listening.store(true, Ordering::Relaxed);
        let admission = Arc::new(Admission::new());
        let public_serving = Serving {
            tls: self.public_tls.clone(),
            gw: gw.clone(),
            shared: Shared {
                stop: stop_rx.clone(),
                busy: busy.clone(),
            },
            graceful: graceful.clone(),
        };
        let mut public = match self.public {
            Public::Shared(l) => Accepting::Shared(tokio::spawn(accept_loop(
                l,
                Role::Public(admission),
                public_serving,
            ))),
            Public::Workers(w) => {
                let n = w.len();
                match workers::start(w, public_serving, admission) {
                    Ok(running) => {
                        tracing::debug!(workers = n, "worker runtimes started");
                        Accepting::Workers(running)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the worker threads (server.workers); the public listener is not served");
                        // `/readyz` fails, so a load balancer or orchestrator notices.
                        gw.metrics().listening.store(false, Ordering::Relaxed);
                        Accepting::None
                    }
                }
            }
        };
        let admin = tokio::spawn(accept_loop(
            self.admin,
            Role::Admin(self.sessions.clone()),
            Serving {
                tls: self.admin_tls.clone(),
                gw: gw.clone(),
                shared: Shared {
                    stop: stop_rx,
                    busy: busy.clone(),
                },
                graceful: graceful.clone(),
            },
        ));
        shutdown.await;
        tracing::info!("shutting down: no new connections; draining in-flight requests");
        gw.metrics().listening.store(false, Ordering::Relaxed);
        let _ = stop_tx.send(Phase::Draining);
        // The accept loops return and drop their listeners: new connections are refused from here.
        match &mut public {
            Accepting::Shared(h) => {
                let _ = h.await;
            }
            Accepting::Workers(w) => w.closed().await,
            Accepting::None => {}
        }
        let _ = admin.await;
        let grace = gw.config().server.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        match Arc::try_unwrap(graceful) {
            Ok(g) => {
                let drained = g.shutdown();
                tokio::pin!(drained);
                // Idle keep-alive connections stay open (and serve what arrives on them, with
                // `Connection: close`) while requests are still running; once none runs, they
                // close too.
                let idle_release = async {
                    while busy.load(Ordering::Acquire) > 0 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    let _ = stop_tx.send(Phase::Closing);
                    std::future::pending::<()>().await
                };
                tokio::select! {
                    _ = &mut drained => {}
                    _ = idle_release => {}
                    _ = tokio::time::sleep_until(deadline) => {
                        tracing::warn!(
                            ?grace,
                            "drain deadline passed; cutting the requests still running"
                        );
                        // The requests dropped from here are audited as cut by the shutdown.
                        gw.metrics().shutdown_cut.store(true, Ordering::Release);
                        let _ = stop_tx.send(Phase::Cut);
                        if tokio::time::timeout(Duration::from_secs(5), &mut drained)
                            .await
                            .is_err()
                        {
                            tracing::warn!("connections still open after the cut");
                        }
                    }
                }
            }
            Err(_) => tracing::warn!("connection tracker still shared; skipping drain"),
        }
        if let Accepting::Workers(w) = public {
            w.finish().await;
        }
        gw.flush_last_used().await;
        if let Err(e) = gw.audit().flush_async().await {
            tracing::error!(error = %e, "audit log flush at shutdown failed");
        }
        tracing::info!("stopped");
    }
}

/// The public listener's accept loop(s) while the server runs.
enum Accepting {
    Shared(tokio::task::JoinHandle<()>),
    Workers(workers::Running),
    /// The worker threads could not start (logged).
    None,
}

/// Where the server is in its life; connections watch it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Phase {
    /// Accepting and serving.
    Serving,
    /// SIGTERM: listeners closed; busy connections finish with `Connection: close`, idle ones
    /// stay open and serve what arrives the same way.
    Draining,
    /// No request is running any more: idle connections close.
    Closing,
    /// The drain deadline passed: every connection is dropped, its running request cut.
    Cut,
}

/// What every connection of a server shares with it.
#[derive(Clone)]
struct Shared {
    stop: watch::Receiver<Phase>,
    /// Requests being handled, on both listeners (drain: idle connections close at zero).
    busy: Arc<AtomicUsize>,
}

/// What an accept loop serves its listener's connections with.
#[derive(Clone)]
struct Serving {
    /// The listener's TLS acceptor (None: plain), swapped by a reload.
    tls: Arc<ArcSwapOption<TlsAcceptor>>,
    gw: Gateway,
    shared: Shared,
    graceful: Arc<GracefulShutdown>,
}

/// What one connection's task carries besides its socket.
struct Carried {
    acceptor: Option<Arc<TlsAcceptor>>,
    gw: Gateway,
    /// The admin listener's state (its sessions); None on the public listener.
    admin_state: Option<admin::Admin>,
    watcher: Watcher,
    shared: Shared,
}

/// Which listener an accept loop serves, with that listener's own state.
enum Role {
    /// The public listener and its connection limits.
    Public(Arc<Admission>),
    /// The admin listener and its web UI sessions.
    Admin(Arc<admin::session::Sessions>),
}

async fn accept_loop(listener: TcpListener, role: Role, serving: Serving) {
    let Serving {
        tls,
        gw,
        shared,
        graceful,
    } = serving;
    let mut stop = shared.stop.clone();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        // A dual-stack listener (`[::]`) shows an IPv4 client as `::ffff:a.b.c.d`: from here on
        // it is that IPv4 address, for the limits, trusted proxies, token networks, the
        // forwarded headers and the audit line alike.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let cfg = gw.config();
        let slot = match &role {
            Role::Public(admission) => match admission.admit(&gw, &cfg, peer) {
                Some(slot) => Some(slot),
                // Dropping the stream closes the connection unanswered.
                None => continue,
            },
            Role::Admin(_) => None,
        };
        let _ = stream.set_nodelay(true);
        let carried = Carried {
            acceptor: tls.load_full(),
            gw: gw.clone(),
            admin_state: match &role {
                Role::Admin(sessions) => Some(admin::Admin::new(gw.clone(), sessions.clone())),
                Role::Public(_) => None,
            },
            watcher: graceful.watcher(),
            shared: shared.clone(),
        };
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(stream, peer, carried).await;
        });
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, carried: Carried) {
    let conn = ConnInfo {
        peer,
        tls: carried.acceptor.is_some(),
    };
    // Plain HTTP/1.1 on the public listener: the fast path (`h1`), until it declines a request.
    let fast = carried.admin_state.is_none()
        && carried.acceptor.is_none()
        && carried.gw.config().server.http1_fast_path;
    let (stream, buffered) = if fast {
        let c = crate::h1::Conn {
            gw: &carried.gw,
            info: conn,
            stop: carried.shared.stop.clone(),
            phase: h1_phase,
            busy: &carried.shared.busy,
        };
        match crate::h1::serve(stream, c).await {
            crate::h1::Served::Done => return,
            crate::h1::Served::Declined { stream, buffered } => (stream, buffered),
        }
    } else {
        (stream, bytes::BytesMut::new())
    };
    // Boxed: hyper's connection state is several KiB; inline it would size the task of every
    // connection, the fast path's idle ones included (docs/performance.md, "Idle connections").
    // Built inside `Box::pin(..)`: a `let` binding of the unboxed future would keep its storage
    // in this future's state across the `.await`, which is the size this avoids.
    Box::pin(serve_hyper(stream, buffered, conn, carried)).await;
}

/// Serves a connection with hyper: TLS, HTTP/2, the admin listener, and whatever the fast path
/// declined (`buffered`: the bytes it had read).
async fn serve_hyper(
    stream: TcpStream,
    buffered: bytes::BytesMut,
    conn: ConnInfo,
    carried: Carried,
) {
    let Carried {
        acceptor,
        gw,
        admin_state,
        watcher,
        shared,
    } = carried;
    let cfg = gw.config();
    let peer = conn.peer;
    let public = admin_state.is_none();
    let stop = shared.stop.clone();
    // A client that accepts no byte of what is written to it for this long is cut (nginx's
    // `send_timeout`): its response, and the upstream connection feeding it, are dropped.
    let send_timeout = cfg.server.body_idle_timeout;
    // Requests in flight on this connection, for the idle timeout.
    let (in_flight, idle_rx) = watch::channel(0usize);
    let in_flight = Arc::new(in_flight);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.server.header_read_timeout)
        .max_buf_size((cfg.server.max_header_bytes + cfg.server.max_uri_bytes + 4096).max(8192))
        // Flatten head + body into one buffer per write (see `pool/mod.rs`, same measurement):
        // small responses cost one copy instead of a multi-iovec `writev`; large bodies are
        // still bounded by `max_buf_size`.
        .writev(false)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.server.h2_max_concurrent_streams)
        .max_header_list_size((cfg.server.max_header_bytes + cfg.server.max_uri_bytes) as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let svc = {
        let gw = gw.clone();
        service_fn(move |req| {
            let gw = gw.clone();
            let admin_state = admin_state.clone();
            let in_flight = in_flight.clone();
            let busy = shared.busy.clone();
            async move {
                in_flight.send_modify(|n| *n += 1);
                busy.fetch_add(1, Ordering::AcqRel);
                let _done = InFlight(in_flight, busy);
                let resp = match admin_state {
                    Some(a) => admin::handle(&a, req, conn).await,
                    None => gw.handle(req, conn).await,
                };
                Ok::<_, Infallible>(resp)
            }
        })
    };
    // hyper's header read timeout starts only once it knows the protocol; until then (no byte
    // yet, or a dribbled HTTP/2 preface) this deadline holds the connection to the same limit.
    let deadline = cfg.server.header_read_timeout;
    let idle = cfg.server.h2_idle_timeout;
    let served = match acceptor {
        None => {
            let c = builder.serve_connection_with_upgrades(
                TokioIo::new(SendDeadline::new(
                    ProtocolDeadline::new(crate::h1::Prefixed::new(stream, buffered), deadline),
                    send_timeout,
                )),
                svc,
            );
            drive(c.into_owned(), watcher, stop, idle_rx, idle).await
        }
        Some(acceptor) => {
            let tls = match tokio::time::timeout(
                cfg.server.tls_handshake_timeout,
                acceptor.accept(stream),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let c = builder.serve_connection_with_upgrades(
                TokioIo::new(SendDeadline::new(
                    ProtocolDeadline::new(tls, deadline),
                    send_timeout,
                )),
                svc,
            );
            drive(c.into_owned(), watcher, stop, idle_rx, idle).await
        }
    };
    if let Err(e) = served {
        connection_error(&gw, peer, public, &*e);
    }
}

/// The server's phase as the HTTP/1 fast path reads it.
fn h1_phase(p: &Phase) -> crate::h1::Stop {
    match p {
        Phase::Serving => crate::h1::Stop::Serving,
        Phase::Draining => crate::h1::Stop::Draining,
        Phase::Closing => crate::h1::Stop::Closing,
        Phase::Cut => crate::h1::Stop::Cut,
    }
}

/// Decrements the connection's in-flight count and the server's busy count when a request's
/// handler is done (or dropped).
struct InFlight(Arc<watch::Sender<usize>>, Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
        self.1.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs a connection until it ends, shutting it down gracefully (HTTP/2 GOAWAY, HTTP/1 close
/// when idle) on server stop or once it has had no request in flight for `idle`: hyper's
/// HTTP/2 keep-alive pings only detect dead peers, so without this a live client could hold
/// an empty HTTP/2 connection (and its slot of `max_connections`) for ever. `watcher` is held
/// until the end so the server's drain waits for this connection.
///
/// On stop a connection with a request in flight shuts down gracefully at once (its response
/// carries `Connection: close`); an idle one stays open while the server drains, and a request
/// that arrives on it is served the same way, so a client that sent on its kept-alive
/// connection just after SIGTERM gets an answer rather than a closed connection. It closes when
/// no request runs on the server any more ([`Phase::Closing`]); at the drain deadline
/// ([`Phase::Cut`]) the connection is dropped with whatever still runs on it.
async fn drive<C, E>(
    conn: C,
    watcher: Watcher,
    mut stop: watch::Receiver<Phase>,
    mut in_flight: watch::Receiver<usize>,
    idle: Duration,
) -> Result<(), E>
where
    C: hyper_util::server::graceful::GracefulConnection<Error = E>,
{
    let local = GracefulShutdown::new();
    let conn = local.watch(conn);
    tokio::pin!(conn);
    let mut idle_rx = in_flight.clone();
    let idle_for = async move {
        loop {
            if *idle_rx.borrow_and_update() == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(idle) => return,
                    r = idle_rx.changed() => if r.is_err() { return },
                }
            } else if idle_rx.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::pin!(idle_for);
    let mut stopping = *stop.borrow_and_update() != Phase::Serving;
    if !stopping {
        tokio::select! {
            r = &mut conn => return r,
            _ = stop.changed() => stopping = true,
            _ = &mut idle_for => {}
        }
    }
    if stopping {
        // Idle at stop: wait for a request (served with `Connection: close`) or the end of
        // the drain.
        loop {
            if *in_flight.borrow_and_update() > 0 || *stop.borrow_and_update() >= Phase::Closing {
                break;
            }
            tokio::select! {
                r = &mut conn => return r,
                r = stop.changed() => if r.is_err() { break },
                r = in_flight.changed() => if r.is_err() { break },
            }
        }
    }
    // GOAWAY (or close when idle), then let in-flight streams finish, up to the drain deadline.
    let shutdown = tokio::spawn(local.shutdown());
    let r = tokio::select! {
        r = &mut conn => r,
        _ = stop.wait_for(|p| *p == Phase::Cut) => Ok(()),
    };
    shutdown.abort();
    drop(watcher);
    r
}

/// The HTTP/2 connection preface; hyper's auto builder reads up to this many bytes to choose a
/// protocol.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pin_project_lite::pin_project! {
    /// Fails reads with `TimedOut` if the client has not sent enough bytes for the protocol choice
    /// (one byte that is not the HTTP/2 preface, or the whole preface) before the deadline.
    ///
    /// hyper-util's auto builder waits for those bytes without any timer, and hyper's
    /// `header_read_timeout` only starts after that choice, so without this a client that
    /// connects and sends nothing (or `PRI * HTTP/2.0...` one byte at a time) would hold its
    /// connection slot forever. Once the choice is made this wrapper is a plain pass-through:
    /// from then on hyper's own timer (HTTP/1) bounds header reads.
    struct ProtocolDeadline<I> {
        #[pin]
        io: I,
        matched: usize,
        armed: bool,
        sleep: Pin<Box<tokio::time::Sleep>>,
    }
}

impl<I> ProtocolDeadline<I> {
    fn new(io: I, deadline: Duration) -> Self {
        ProtocolDeadline {
            io,
            matched: 0,
            armed: true,
            sleep: Box::pin(tokio::time::sleep(deadline)),
        }
    }
}

impl<I: AsyncRead> AsyncRead for ProtocolDeadline<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !*this.armed {
            return this.io.poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match this.io.poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                for b in &buf.filled()[before..] {
                    if *b != H2_PREFACE[*this.matched] {
                        *this.armed = false;
                        break;
                    }
                    *this.matched += 1;
                    if *this.matched == H2_PREFACE.len() {
                        *this.armed = false;
                        break;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the header read timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

crate::h1::write_through!(ProtocolDeadline);

pin_project_lite::pin_project! {
    /// Fails writes with [`SendStalled`] once the client has accepted no byte for `timeout`
    /// while the gateway had bytes for it (nginx's `send_timeout`). A client that stops reading
    /// otherwise keeps its connection, the response body it is not reading (and the upstream
    /// connection feeding it) for as long as it likes: hyper stops polling a body it cannot
    /// write, so the body's own idle guard never runs. The timer runs only while a write is
    /// pending; any progress clears it.
    struct SendDeadline<I> {
        #[pin]
        io: I,
        timeout: Duration,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<I> SendDeadline<I> {
    fn new(io: I, timeout: Duration) -> Self {
        SendDeadline {
            io,
            timeout,
            timer: None,
        }
    }
}

/// The error a stalled write ends the connection with (found again in [`connection_error`]).
#[derive(Debug, thiserror::Error)]
#[error("the client accepted no data for {0:?}")]
struct SendStalled(Duration);

/// Progress clears the timer; `Pending` arms it (once) and fails the write when it fires.
fn send_progress<T>(
    r: Poll<io::Result<T>>,
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
    cx: &mut Context<'_>,
) -> Poll<io::Result<T>> {
    match r {
        Poll::Pending => {
            let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
            match t.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    SendStalled(timeout),
                ))),
                Poll::Pending => Poll::Pending,
            }
        }
        ready => {
            *timer = None;
            ready
        }
    }
}

impl<I: AsyncRead> AsyncRead for SendDeadline<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite> AsyncWrite for SendDeadline<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.io.poll_write(cx, buf);
        send_progress(r, this.timer, *this.timeout, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.io.poll_write_vectored(cx, bufs);
        send_progress(r, this.timer, *this.timeout, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let r = this.io.poll_flush(cx);
        send_progress(r, this.timer, *this.timeout, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let r = this.io.poll_shutdown(cx);
        send_progress(r, this.timer, *this.timeout, cx)
    }
}

/// What ended a connection with an error, for `tokengate_http_errors_total{kind}`; `None` for
/// the ordinary ends (the client went away, a reset).
fn error_kind(e: &(dyn std::error::Error + 'static)) -> Option<crate::metrics::HttpErrorKind> {
    use crate::metrics::HttpErrorKind as K;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_parse_too_large() {
                return Some(if h.to_string().contains("URI") {
                    K::UriTooLong
                } else {
                    K::HeadTooLarge
                });
            }
            if h.is_parse() {
                return Some(K::BadRequest);
            }
            if h.is_timeout() {
                return Some(K::HeaderTimeout);
            }
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if io.get_ref().is_some_and(|i| i.is::<SendStalled>()) {
                return Some(K::SendTimeout);
            }
            if io.kind() == io::ErrorKind::TimedOut {
                return Some(K::HeaderTimeout);
            }
        }
        cur = err.source();
    }
    None
}

/// Counts a connection that ended with an error and, for a request hyper refused itself on the
/// public listener (it answered 400, 414 or 431 without calling the gateway), writes its audit
/// line: reason `bad_request_http`, the peer, no token.
fn connection_error(
    gw: &Gateway,
    peer: SocketAddr,
    public: bool,
    e: &(dyn std::error::Error + Send + Sync + 'static),
) {
    let kind = error_kind(e);
    tracing::debug!(%peer, error = %e, kind = kind.map(|k| k.label()), "connection ended with an error");
    let Some(kind) = kind else { return };
    gw.metrics().http_error(kind);
    if let (true, Some(status)) = (public, kind.refusal_status()) {
        gw.audit_http_refusal(peer.ip(), status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gateway on a store and audit log in `dir`, its config the defaults plus `server`
    /// (`[server]` keys) and loopback listeners on free ports.
    fn gateway(dir: &std::path::Path, server: &str) -> Gateway {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [store]\npath = \"{0}/t.db\"\n[audit]\npath = \"{0}/audit.log\"\n",
            dir.display()
        );
        let cfg = Config::from_toml(&toml, &dir.join("t.toml")).unwrap();
        let store = crate::store::Store::open(&dir.join("t.db"), Duration::from_secs(1)).unwrap();
        let audit = crate::audit::AuditLog::open(crate::app::audit_config(&cfg)).unwrap();
        Gateway::new(cfg, store, audit)
    }

    /// A server bound with `server.workers` and dropped without running (a start that fails
    /// after binding) lets its worker runtimes go without blocking the caller's runtime (which
    /// panics), and frees the port.
    #[tokio::test]
    async fn a_server_with_workers_dropped_unstarted_frees_its_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::bind(gateway(dir.path(), "workers = 2"))
            .await
            .unwrap();
        let addr = server.public_addr();
        drop(server);
        let err = TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// A connection's task future is allocated whole at `tokio::spawn` and lives as long as the
    /// connection, so 10,000 idle connections hold 10,000 of them (docs/performance.md, "Idle
    /// connections": 1,648 bytes in release once hyper's path and a fast-path exchange were
    /// boxed, from 7,520). This guards the size in the build the tests run in: if it grows past
    /// the bound, something large was inlined into the connection again (box it, or measure
    /// `benches/idle.sh` and raise the bound with the figures).
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let gw = gateway(dir.path(), "");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let peer = stream.local_addr().unwrap();
        let (_stop, stop) = watch::channel(Phase::Serving);
        let graceful = GracefulShutdown::new();
        let shared = Shared {
            stop,
            busy: Arc::new(AtomicUsize::new(0)),
        };
        let carried = Carried {
            acceptor: None,
            gw,
            admin_state: None,
            watcher: graceful.watcher(),
            shared,
        };
        let task = serve_connection(stream, peer, carried);
        let size = std::mem::size_of_val(&task);
        // 1,440 bytes in the debug build when this was written.
        let bound = 2048;
        assert!(
            size <= bound,
            "a connection's task is {size} bytes (bound {bound})"
        );
    }
}
