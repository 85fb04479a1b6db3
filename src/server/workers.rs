//! `server.workers`: the public listener served by N single-threaded runtimes, each on its own
//! thread with its own socket bound to the same address (`SO_REUSEPORT`: the kernel spreads new
//! connections over the sockets). A connection lives and dies on the runtime that accepted it,
//! with no work-stealing between threads; everything else (the gateway state, the audit writer,
//! the store, the admin listener, the drain) stays shared. Part of `server`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use super::admission::Admission;
use super::{Role, ServerError, Serving, accept_loop};

/// One worker's socket and runtime, bound and built at start (a failure is a start error, not
/// a thread that quietly never accepts).
pub(super) struct Worker {
    /// Taken by the worker's thread. A worker dropped unstarted (a server bound, never run)
    /// shuts its runtime down without blocking: dropping a runtime inside the caller's runtime
    /// panics.
    parts: Option<(std::net::TcpListener, tokio::runtime::Runtime)>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some((_, rt)) = self.parts.take() {
            rt.shutdown_background();
        }
    }
}

/// Binds `n` sockets to `addr` with `SO_REUSEPORT` (port 0: the port the first one got) and
/// builds a single-threaded runtime for each.
pub(super) fn bind(addr: SocketAddr, n: usize) -> Result<Vec<Worker>, ServerError> {
    let mut workers: Vec<Worker> = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let listener =
            reuseport_listener(addr).map_err(|source| ServerError::Bind { addr, source })?;
        if workers.is_empty() {
            addr = listener
                .local_addr()
                .map_err(|source| ServerError::Bind { addr, source })?;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ServerError::Runtime { source })?;
        workers.push(Worker {
            parts: Some((listener, runtime)),
        });
    }
    Ok(workers)
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

impl Worker {
    pub(super) fn local_addr(&self) -> SocketAddr {
        let (listener, _) = self.parts.as_ref().expect("not started");
        listener.local_addr().expect("bound")
    }
}

/// The running workers: each says when its accept loop has returned (its socket is closed),
/// and runs its connections until [`Running::finish`].
pub(super) struct Running {
    closed: Vec<oneshot::Receiver<()>>,
    finished: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Starts one thread per worker, runtime slot 1.. (see `crate::pool::set_runtime_slot`); every
/// accept loop serves with `serving` and shares the public listener's `admission`.
pub(super) fn start(
    workers: Vec<Worker>,
    serving: Serving,
    admission: Arc<Admission>,
) -> std::io::Result<Running> {
    let (finished, finished_rx) = watch::channel(false);
    let mut running = Running {
        closed: Vec::new(),
        finished,
        threads: Vec::new(),
    };
    for (i, mut w) in workers.into_iter().enumerate() {
        let slot = i + 1;
        let (closed_tx, closed_rx) = oneshot::channel();
        let mut finished = finished_rx.clone();
        let (serving, admission) = (serving.clone(), admission.clone());
        let thread = std::thread::Builder::new()
            .name(format!("tg-worker-{slot}"))
            .spawn(move || {
                crate::pool::set_runtime_slot(slot);
                let (listener, runtime) = w.parts.take().expect("a worker starts once");
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => accept_loop(l, Role::Public(admission), serving).await,
                        Err(e) => {
                            tracing::error!(worker = slot, error = %e, "worker cannot accept")
                        }
                    }
                    let _ = closed_tx.send(());
                    // Connections accepted here run on this runtime: keep it until the drain ends.
                    let _ = finished.wait_for(|f| *f).await;
                });
            })?;
        running.closed.push(closed_rx);
        running.threads.push(thread);
    }
    Ok(running)
}

impl Running {
    /// Waits until every worker's accept loop has returned and closed its socket.
    pub(super) async fn closed(&mut self) {
        for rx in self.closed.drain(..) {
            let _ = rx.await;
        }
    }

    /// Ends the workers (their runtimes drop what is left) and waits for their threads.
    pub(super) async fn finish(self) {
        let _ = self.finished.send(true);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}
