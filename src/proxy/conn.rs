//! One client connection: its idle and header-read timeouts, and the ticket
//! every request holds until its response is done.
//!
//! hyper's own HTTP/1 header timer starts when a connection goes idle, so it
//! cannot tell "idle keep-alive" (long is fine) from "slowly sending a request
//! head" (slowloris). This wrapper knows whether a request is in flight and
//! applies the right deadline: `idle_timeout` while nothing is in flight,
//! `header_read_timeout` once the first byte of a new request head arrives,
//! and a write-stall limit for clients that stop reading.
//!
//! A request ending does not wake the connection's reader (it often ends in
//! the reader's own task, where a wake costs a whole extra pass over the
//! connection). It stamps the time instead; the reader picks the stamp up the
//! next time it runs, and while requests are in flight it keeps its timer
//! armed so that it does run, even if nothing else happens on the connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The proxy-wide in-flight request limit.
pub struct Admission {
    inflight: AtomicUsize,
    max: AtomicUsize,
}

impl Admission {
    /// A limit of `max` requests in flight.
    pub fn new(max: usize) -> Admission {
        Admission {
            inflight: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }

    /// Change the limit (config reload).
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Requests in flight now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }
}

/// What a connection's IO wrapper and its requests share.
pub struct ConnActivity {
    active: AtomicUsize,
    /// When the last request ended, in nanoseconds after `born`; 0 before any.
    idle_since: AtomicU64,
    born: Instant,
    admission: Arc<Admission>,
}

/// Held by a request from arrival until its response body is done.
pub struct Ticket(Arc<ConnActivity>);

impl Drop for Ticket {
    fn drop(&mut self) {
        let a = &self.0;
        a.admission.inflight.fetch_sub(1, Ordering::Relaxed);
        // Stamped before the count drops, so a reader that sees the connection
        // idle also sees since when. At least 1: 0 means "no request yet".
        let now = u64::try_from(a.born.elapsed().as_nanos()).unwrap_or(u64::MAX);
        a.idle_since.fetch_max(now.max(1), Ordering::Relaxed);
        a.active.fetch_sub(1, Ordering::Release);
    }
}

impl ConnActivity {
    /// Activity for a new connection under the proxy-wide `admission`.
    pub fn new(admission: Arc<Admission>) -> Arc<ConnActivity> {
        Arc::new(ConnActivity {
            active: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            born: Instant::now(),
            admission,
        })
    }

    /// Admit a request, or `None` when the proxy-wide limit is reached.
    pub fn enter(self: &Arc<Self>) -> Option<Ticket> {
        let a = &self.admission;
        let before = a.inflight.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::AcqRel);
        let ticket = Ticket(self.clone());
        (before < a.max.load(Ordering::Relaxed)).then_some(ticket)
    }

    fn busy(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }

    /// When the last request ended (`idle_since`'s raw value).
    fn idle_since(&self) -> u64 {
        self.idle_since.load(Ordering::Relaxed)
    }
}

/// Timeouts applied by `TimedIo`.
#[derive(Clone, Copy, Debug)]
pub struct ConnTimeouts {
    /// From the first byte of a request head to its end.
    pub header_read: Duration,
    /// With no request in flight.
    pub idle: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Waiting for or reading a request head (or serving it: requests in
    /// flight are never timed out here).
    Head,
    /// The first bytes of a new request head arrived. Its deadline is set by
    /// the first read that then finds nothing more — microseconds later, and
    /// never at all for the usual head that arrives whole, which saves a
    /// clock read per request.
    HeadBegun,
    /// No request in flight, nothing received since.
    Idle,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// A client stream with connection-level deadlines.
pub struct TimedIo<S> {
    inner: S,
    activity: Arc<ConnActivity>,
    timeouts: ConnTimeouts,
    phase: Phase,
    deadline: Instant,
    timer: Pin<Box<Sleep>>,
    armed: Instant,
    /// The timer holds this task's waker (it was polled since its last reset).
    timer_live: bool,
    /// The `idle_since` stamp this reader last acted on.
    idle_seen: u64,
    /// Unknown until the first bytes arrive.
    http2: Option<bool>,
    write_stall: Option<Pin<Box<Sleep>>>,
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_owned())
}

impl<S> TimedIo<S> {
    /// Wrap a freshly accepted stream: its first request head is due within
    /// the header-read timeout.
    pub fn new(inner: S, activity: Arc<ConnActivity>, timeouts: ConnTimeouts) -> TimedIo<S> {
        let deadline = Instant::now() + timeouts.header_read;
        TimedIo {
            inner,
            activity,
            timeouts,
            phase: Phase::Head,
            deadline,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            armed: deadline,
            timer_live: false,
            idle_seen: 0,
            http2: None,
            write_stall: None,
        }
    }

    fn set_deadline(&mut self, phase: Phase, after: Duration) {
        self.phase = phase;
        self.deadline = Instant::now() + after;
    }

    /// Poll the connection deadline; `Err` once it has passed.
    ///
    /// The timer is re-armed lazily: a deadline that moves later (every new
    /// request on a keep-alive connection) leaves the armed timer alone, and a
    /// timer that fires early is simply re-armed. Only a deadline moving
    /// earlier touches the timer wheel at once.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.armed > self.deadline {
            self.timer.as_mut().reset(self.deadline);
            self.armed = self.deadline;
            self.timer_live = false;
        } else if self.timer_waiting() {
            return Ok(()); // armed no later than the deadline
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= self.deadline {
                return Err(timed_out(match self.phase {
                    Phase::Head => "client did not send a complete request head in time",
                    _ => "client connection idle too long",
                }));
            }
            self.timer.as_mut().reset(self.deadline);
            self.armed = self.deadline;
        }
        self.timer_live = true;
        Ok(())
    }

    /// Whether the timer is pending with this task's waker.
    fn timer_waiting(&self) -> bool {
        self.timer_live && !self.timer.is_elapsed()
    }

    /// With requests in flight nothing is due, but the timer must stay armed
    /// with this task's waker: when the last request ends elsewhere (an HTTP/2
    /// stream's task, a body dropped late) nothing else may wake this reader
    /// to start the idle deadline.
    fn keep_armed(&mut self, cx: &mut Context<'_>) {
        if self.timer_waiting() {
            return;
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            let next = Instant::now() + self.timeouts.idle;
            self.timer.as_mut().reset(next);
            self.armed = next;
        }
        self.timer_live = true;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TimedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.activity.busy() {
            let r = Pin::new(&mut this.inner).poll_read(cx, buf);
            if r.is_pending() {
                this.keep_armed(cx);
            }
            return r;
        }
        let since = this.activity.idle_since();
        if since != this.idle_seen {
            // A request ended since this reader last looked: idle from then.
            this.idle_seen = since;
            this.phase = Phase::Idle;
            this.deadline = this.activity.born + Duration::from_nanos(since) + this.timeouts.idle;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fresh = &buf.filled()[before..];
                if !fresh.is_empty() {
                    if this.http2.is_none() {
                        let h2 = fresh.starts_with(H2_PREFACE);
                        this.http2 = Some(h2);
                        if h2 {
                            // HTTP/2 multiplexes; only "no stream in flight" matters.
                            this.set_deadline(Phase::Idle, this.timeouts.idle);
                        }
                    }
                    if this.phase == Phase::Idle && this.http2 == Some(false) {
                        this.phase = Phase::HeadBegun;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.phase == Phase::HeadBegun {
                    this.set_deadline(Phase::Head, this.timeouts.header_read);
                }
                match this.poll_deadline(cx) {
                    Ok(()) => Poll::Pending,
                    Err(e) => Poll::Ready(Err(e)),
                }
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> TimedIo<S> {
    fn track_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => {
                let limit = self.timeouts.idle;
                let stall = self
                    .write_stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if stall.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(timed_out("client stopped reading")));
                }
                Poll::Pending
            }
            ready => {
                self.write_stall = None;
                ready
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TimedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.track_write(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.track_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.track_write(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// A response body that releases its request's ticket when it ends.
    pub struct Tracked<B> {
        #[pin]
        inner: B,
        ticket: Option<Ticket>,
    }
}

impl<B> Tracked<B> {
    /// Hold `ticket` until `inner` ends or is dropped.
    pub fn new(inner: B, ticket: Option<Ticket>) -> Tracked<B> {
        Tracked { inner, ticket }
    }
}

impl<B: http_body::Body> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.ticket.take();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
