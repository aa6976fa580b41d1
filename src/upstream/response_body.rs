//! The upstream's response body on its way to the client: streamed, bounded
//! by the request's deadline, and driving its connection, which goes back to
//! the pool only after a clean end.

use super::pool::Conn;
use super::{BodyError, InflightGuard, Upload};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::time::{Instant, Sleep};

/// An upstream's response body on its way to the client.
pub struct UpstreamBody {
    inner: Incoming,
    /// Holds the upstream's in-flight slot until the body is done.
    guard: InflightGuard,
    conn: Option<Conn>,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    finished: bool,
    /// When the response head arrived: the connection's idle stamp.
    answered_at: Instant,
    /// The request body, when it was still coming as the answer began.
    upload: Option<Upload>,
}

impl UpstreamBody {
    /// Stream `inner` (its head arrived at `answered_at`) from the guarded
    /// upstream; `conn` returns to its pool at a clean end. `upload` is the
    /// request's body if the client may still be sending it: once the answer
    /// ends, whatever it has not sent is cut off (and the connection, left
    /// mid-request, is not pooled).
    pub fn new(
        inner: Incoming,
        guard: InflightGuard,
        conn: Conn,
        deadline: Instant,
        answered_at: Instant,
        upload: Option<Upload>,
    ) -> Self {
        let mut body = UpstreamBody {
            inner,
            guard,
            conn: Some(conn),
            deadline,
            sleep: None,
            finished: false,
            answered_at,
            upload,
        };
        // HEAD, 204 and 304 responses have no body to poll; the connection is
        // already free.
        if body.inner.is_end_stream() {
            body.finish(true);
        }
        body
    }

    fn finish(&mut self, clean: bool) {
        if self.finished {
            return;
        }
        self.finished = true;
        let cut = self.upload.take().is_some_and(|u| u.cut_if_unfinished());
        if let (true, false, Some(conn)) = (clean, cut, self.conn.take()) {
            self.guard.upstream().pool().checkin(conn, self.answered_at);
        }
        self.conn = None;
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // An unfinished body leaves unread bytes on the connection: never reuse it.
        self.finish(false);
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        // The upstream connection's IO runs in whichever task reads its body.
        let inner = &mut this.inner;
        let polled = match this.conn.as_mut() {
            Some(conn) => conn.poll_with(cx, |cx| Pin::new(&mut *inner).poll_frame(cx)),
            None => Pin::new(inner).poll_frame(cx),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.guard.upstream().breaker().record_failure();
                this.finish(false);
                Poll::Ready(Some(Err(BodyError::Upstream(e))))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Pending => {
                let deadline = this.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if sleep.as_mut().poll(cx).is_ready() {
                    this.finish(false);
                    return Poll::Ready(Some(Err(BodyError::DeadlineExceeded)));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
