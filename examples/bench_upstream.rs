//! A fast upstream for the load benchmark (`benches/load.sh`): HTTP/1.1 keep-alive on one
//! current-thread runtime, answering every request with the same small body. It does as little
//! as possible so that the load benchmark measures the proxy in front of it, not the upstream.
//!
//! Usage: `cargo run --release --example bench_upstream -- [ADDR]` (default `127.0.0.1:0`).
//! Prints `listening on ADDR` on stdout once bound; runs until killed.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The fixed answer: small, so the bench measures request handling rather than copying.
const BODY: &[u8] = b"hello from upstream\n";

async fn answer(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // hyper sets Content-Length from the known body size; the request body (none here) is dropped.
    let mut r = Response::new(Full::new(Bytes::from_static(BODY)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(r)
}

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_string())
        .parse()
        .map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("bad address: {e}"),
            )
        })?;
    // One thread: the benchmark pins this process to a core; a multi-thread runtime would only
    // add cross-thread wake-ups.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        println!("listening on {}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service_fn(answer))
                    .await;
            });
        }
    })
}
