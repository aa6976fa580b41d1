//! Send timeouts for HTTP/2 streams.
//!
//! An HTTP/1 client that stops reading blocks the socket, and the
//! connection's write-stall limit (`conn`) cuts it. An HTTP/2 client stops a
//! stream with flow control instead: it grants no window, hyper stops polling
//! the response body, and nothing on the socket stalls — the stream, its
//! upstream connection and the chunk it holds would wait forever, whatever
//! the request's deadline, because that deadline is enforced by the body as
//! it is polled.
//!
//! So each HTTP/2 stream's task runs under a [`Guarded`] future (hyper spawns
//! stream tasks through [`StreamExecutor`]). While the stream's response
//! body is streaming it counts the polls hyper makes; the guard checks the
//! count every `send_timeout` and ends the stream (hyper resets it) when it
//! has not moved — the client accepted nothing for between one and two
//! send timeouts — or when the request's overall deadline has passed.
//! Dropping the stream's task drops the body, which gives back the upstream
//! connection and the admission ticket.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::{Instant, Sleep};

tokio::task_local! {
    /// The progress of the HTTP/2 stream whose task is running.
    static STREAM: Arc<Progress>;
}

/// What a stream's response body tells its guard.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Times hyper polled the body.
    polls: AtomicU64,
    /// A body is streaming (set when it is made, cleared when it ends).
    streaming: AtomicBool,
    /// The request's overall deadline.
    deadline: OnceLock<Instant>,
}

/// A streaming body's handle on its stream's progress; ends the streaming
/// when dropped.
#[derive(Debug)]
pub(crate) struct Watch(Arc<Progress>);

impl Watch {
    /// For a body made in an HTTP/2 stream's task (`None` elsewhere: HTTP/1
    /// has the connection's write-stall limit), due by `deadline`.
    pub(crate) fn current(deadline: Instant) -> Option<Watch> {
        STREAM
            .try_with(|p| {
                let _ = p.deadline.set(deadline);
                p.streaming.store(true, Ordering::Relaxed);
                Watch(p.clone())
            })
            .ok()
    }

    /// hyper polled the body: the client is taking data.
    pub(crate) fn polled(&self) {
        self.0.polls.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.streaming.store(false, Ordering::Relaxed);
    }
}

/// hyper's executor for HTTP/2 stream tasks: each runs guarded.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamExecutor {
    send_timeout: Duration,
}

impl StreamExecutor {
    pub(crate) fn new(send_timeout: Duration) -> StreamExecutor {
        StreamExecutor { send_timeout }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let progress = Arc::<Progress>::default();
        tokio::spawn(Guarded {
            // Set for every poll of the stream's task without a clone per poll.
            fut: STREAM.scope(progress.clone(), fut),
            progress,
            timer: tokio::time::sleep(self.send_timeout),
            limit: self.send_timeout,
            seen: None,
        });
    }
}

pin_project_lite::pin_project! {
    /// A stream's task, ended when its body stalls past the send timeout
    /// or its deadline.
    struct Guarded<F> {
        #[pin]
        fut: TaskLocalFuture<Arc<Progress>, F>,
        progress: Arc<Progress>,
        #[pin]
        timer: Sleep,
        limit: Duration,
        // The poll count at the last check; `None` while nothing streams.
        seen: Option<u64>,
    }
}

impl<F: Future<Output = ()>> Future for Guarded<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if this.fut.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let p = &**this.progress;
        if !p.streaming.load(Ordering::Relaxed) {
            // Waiting for the upstream's answer (the attempts' own timers
            // apply), or done streaming.
            *this.seen = None;
            return Poll::Pending;
        }
        let deadline = p.deadline.get().copied();
        let next = |now: Instant| deadline.map_or(now + *this.limit, |d| d.min(now + *this.limit));
        if this.seen.is_none() {
            *this.seen = Some(p.polls.load(Ordering::Relaxed));
            this.timer.as_mut().reset(next(Instant::now()));
        }
        while this.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let polls = p.polls.load(Ordering::Relaxed);
            if deadline.is_some_and(|d| now >= d) {
                tracing::debug!("HTTP/2 stream cut at its deadline: the client took no data");
                return Poll::Ready(());
            }
            if *this.seen == Some(polls) {
                tracing::debug!(
                    "HTTP/2 stream cut: the client granted no window for the send timeout"
                );
                return Poll::Ready(());
            }
            *this.seen = Some(polls);
            this.timer.as_mut().reset(next(now));
        }
        Poll::Pending
    }
}
