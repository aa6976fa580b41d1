//! One client connection's deadlines: idle, header-read and write-stall.
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

use super::pipeline::ConnActivity;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Timeouts applied by `TimedIo`.
#[derive(Clone, Copy, Debug)]
pub(super) struct ConnTimeouts {
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
pub(super) struct TimedIo<S> {
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
    pub(super) fn new(inner: S, activity: Arc<ConnActivity>, timeouts: ConnTimeouts) -> TimedIo<S> {
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
            this.deadline = this.activity.born() + Duration::from_nanos(since) + this.timeouts.idle;
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

#[cfg(test)]
mod tests {
    use super::super::pipeline::InflightLimit;
    use super::*;
    use crate::telemetry::Metrics;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    const HEADER: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(60);

    fn connection() -> (DuplexStream, TimedIo<DuplexStream>, Arc<ConnActivity>) {
        let (client, server) = tokio::io::duplex(64);
        let limit = Arc::new(InflightLimit::new(100, Metrics::new().counter("shed", &[])));
        let activity = ConnActivity::new(limit);
        let io = TimedIo::new(
            server,
            activity.clone(),
            ConnTimeouts {
                header_read: HEADER,
                idle: IDLE,
            },
        );
        (client, io, activity)
    }

    /// The timer wheel counts whole milliseconds, rounding up.
    fn assert_about(took: Duration, expected: Duration) {
        assert!(
            took >= expected && took <= expected + Duration::from_millis(2),
            "{took:?}, expected {expected:?}"
        );
    }

    async fn read_err(io: &mut TimedIo<DuplexStream>) -> io::Error {
        let mut buf = [0u8; 64];
        loop {
            match io.read(&mut buf).await {
                Ok(0) => panic!("closed instead of timing out"),
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_is_closed_at_the_header_read_timeout() {
        let (_client, mut io, _) = connection();
        let t0 = Instant::now();
        let e = read_err(&mut io).await;
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("request head"), "{e}");
        assert_about(t0.elapsed(), HEADER);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout() {
        let (_client, mut io, activity) = connection();
        drop(activity.enter()); // a request came and went
        let t0 = Instant::now();
        let e = read_err(&mut io).await;
        assert!(e.to_string().contains("idle"), "{e}");
        assert_about(t0.elapsed(), IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_with_a_request_in_flight_is_never_timed_out_by_its_reader() {
        let (_client, mut io, activity) = connection();
        let _ticket = activity.enter();
        let mut buf = [0u8; 8];
        let waited = tokio::time::timeout(10 * IDLE, io.read(&mut buf)).await;
        assert!(waited.is_err(), "still waiting, no error: {waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_drips_is_cut_at_the_header_read_timeout_not_the_idle_one() {
        let (mut client, mut io, activity) = connection();
        drop(activity.enter());
        tokio::time::advance(Duration::from_secs(5)).await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(io.read(&mut buf).await.unwrap() > 0);
        let t0 = Instant::now();
        let e = read_err(&mut io).await;
        assert!(e.to_string().contains("request head"), "{e}");
        assert_about(t0.elapsed(), HEADER);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_after_the_idle_timeout() {
        let (_client, mut io, activity) = connection();
        let _ticket = activity.enter();
        let t0 = Instant::now();
        let chunk = [b'x'; 64];
        let e = loop {
            if let Err(e) = io.write_all(&chunk).await {
                break e;
            }
        };
        assert!(e.to_string().contains("stopped reading"), "{e}");
        assert_about(t0.elapsed(), IDLE);
    }
}
