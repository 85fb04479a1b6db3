//! Body types: the boxed body every response uses, and a streaming guard that enforces the body
//! size limit and the body idle timeout without ever buffering.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

/// Boxed error for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the gateway sends and every request it forwards.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A complete in-memory body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// How a guarded body ended early, and whether it has ended at all; shared with the pipeline so
/// it can answer 413 rather than 502, and start the upstream's response timeout only once the
/// request body has been sent.
#[derive(Debug, Clone, Default)]
pub struct BodyOutcome(Arc<OutcomeState>);

#[derive(Debug, Default)]
struct OutcomeState {
    early: AtomicU8,
    ended: AtomicBool,
    on_end: Notify,
}

const TOO_LARGE: u8 = 1;
const IDLE: u8 = 2;

impl BodyOutcome {
    /// The body exceeded its size limit.
    pub fn too_large(&self) -> bool {
        self.0.early.load(Ordering::Relaxed) == TOO_LARGE
    }
    /// The body stalled past its idle timeout.
    pub fn idle(&self) -> bool {
        self.0.early.load(Ordering::Relaxed) == IDLE
    }

    fn fail(&self, why: u8) {
        self.0.early.store(why, Ordering::Relaxed);
        self.end();
    }

    fn end(&self) {
        if !self.0.ended.swap(true, Ordering::AcqRel) {
            self.0.on_end.notify_waiters();
        }
    }

    /// Whether the body has ended (all of it read, or failed).
    pub fn ended(&self) -> bool {
        self.0.ended.load(Ordering::Acquire)
    }

    /// Resolves once the body has ended (at once for a body that was empty from the start).
    pub async fn finished(&self) {
        loop {
            let notified = self.0.on_end.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.ended() {
                return;
            }
            notified.await;
        }
    }
}

/// Error raised inside a guarded body.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// More bytes than allowed.
    #[error("body larger than {0} bytes")]
    TooLarge(u64),
    /// No data for longer than the idle timeout.
    #[error("body idle for more than {0:?}")]
    Idle(Duration),
}

pin_project_lite::pin_project! {
    /// Streams `inner`, failing when it exceeds `limit` bytes or pauses longer than `idle`.
    pub struct Guarded<B> {
        #[pin]
        inner: B,
        seen: u64,
        limit: u64,
        idle: Duration,
        timer: Option<Pin<Box<Sleep>>>,
        outcome: BodyOutcome,
    }
}

impl<B> Guarded<B> {
    /// Wraps `inner`. `limit = u64::MAX` for no size limit.
    pub fn new(inner: B, limit: u64, idle: Duration, outcome: BodyOutcome) -> Self
    where
        B: HttpBody,
    {
        if inner.is_end_stream() {
            outcome.end();
        }
        Guarded {
            inner,
            seen: 0,
            limit,
            idle,
            timer: None,
            outcome,
        }
    }
}

impl<B> HttpBody for Guarded<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let mut inner = this.inner;
        match inner.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => {
                // Activity: the idle timer restarts lazily on the next Pending.
                *this.timer = None;
                match frame {
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            *this.seen += d.len() as u64;
                            if *this.seen > *this.limit {
                                this.outcome.fail(TOO_LARGE);
                                return Poll::Ready(Some(Err(Box::new(BodyError::TooLarge(
                                    *this.limit,
                                )))));
                            }
                        }
                        // A reader may stop at `is_end_stream` without polling for the `None`.
                        if inner.is_end_stream() {
                            this.outcome.end();
                        }
                        Poll::Ready(Some(Ok(f)))
                    }
                    Some(Err(e)) => {
                        this.outcome.end();
                        Poll::Ready(Some(Err(e.into())))
                    }
                    None => {
                        this.outcome.end();
                        Poll::Ready(None)
                    }
                }
            }
            Poll::Pending => {
                let idle = *this.idle;
                let timer = this.timer.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(Instant::now() + idle))
                });
                ready!(timer.as_mut().poll(cx));
                this.outcome.fail(IDLE);
                Poll::Ready(Some(Err(Box::new(BodyError::Idle(idle)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.outcome.end();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future;

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    #[tokio::test]
    async fn limit_is_enforced_while_streaming() {
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = (0..10)
            .map(|_| Ok(Frame::data(Bytes::from_static(&[0u8; 100]))))
            .collect();
        let out = BodyOutcome::default();
        let b = Guarded::new(
            StreamBody::new(futures_stream(chunks)),
            550,
            Duration::from_secs(5),
            out.clone(),
        );
        let r = b.collect().await;
        assert!(r.is_err());
        assert!(out.too_large());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_body_times_out() {
        let (_tx, rx) =
            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
        let stream = tokio_stream_from(rx);
        let out = BodyOutcome::default();
        let b = Guarded::new(
            StreamBody::new(stream),
            u64::MAX,
            Duration::from_secs(3),
            out.clone(),
        );
        let r = b.collect().await;
        assert!(r.is_err());
        assert!(out.idle());
    }

    #[tokio::test]
    async fn the_end_of_a_body_is_signalled_once_it_is_read_or_known_empty() {
        let empty = BodyOutcome::default();
        let _b = Guarded::new(
            http_body_util::Empty::<Bytes>::new(),
            u64::MAX,
            Duration::from_secs(5),
            empty.clone(),
        );
        assert!(empty.ended(), "an empty body has ended before it is read");
        empty.finished().await;

        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
        let out = BodyOutcome::default();
        let b = Guarded::new(
            StreamBody::new(tokio_stream_from(rx)),
            u64::MAX,
            Duration::from_secs(5),
            out.clone(),
        );
        let reader = tokio::spawn(b.collect());
        let waiter = {
            let out = out.clone();
            tokio::spawn(async move { out.finished().await })
        };
        tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
            .await
            .unwrap();
        tokio::task::yield_now().await;
        assert!(!out.ended(), "still streaming");
        drop(tx);
        waiter.await.unwrap();
        assert!(out.ended());
        assert!(!out.idle() && !out.too_large());
        reader.await.unwrap().unwrap();
    }

    fn futures_stream<T: Unpin>(v: Vec<T>) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::iter(v)
    }

    fn tokio_stream_from<T>(
        rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
    }
}
