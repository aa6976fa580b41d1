//! One client connection's deadlines: idle, header-read and write-stall.
//!
//! hyper's own HTTP/1 header timer starts when a connection goes idle, so it
//! cannot tell "idle keep-alive" (long is fine) from "slowly sending a request
//! head" (slowloris). This wrapper knows whether a request is in flight and
//! applies the right deadline: `idle_timeout` while nothing is in flight,
//! `header_read_timeout` once the first byte of a new request head arrives,
//! and a write-stall limit for clients that stop reading.
//!
//! An idle HTTP/1 connection is *parked*: the reader tells hyper the client
//! is gone (an end of stream, which hyper meets between requests by letting
//! go), withholds the real shutdown, and the listener drops hyper's
//! connection state and buffers, keeping only the socket until the client
//! sends again. Bytes read while parked (or while telling HTTP/1 from
//! HTTP/2) are handed back first to the next reader. When depends on the
//! client (see [`PARK_AFTER`]): one that comes and goes is parked as soon as
//! its answer is out, one that keeps the connection busy after a second of
//! silence.
//!
//! A request ending does not wake a busy client's reader (it often ends in
//! the reader's own task, where a wake costs a whole extra pass over the
//! connection). It stamps the time instead; the reader picks the stamp up the
//! next time it runs, and while requests are in flight it keeps its timer
//! armed so that it does run, even if nothing else happens on the connection.
//! Only a reader that is to park at once asks to be woken (`ConnActivity`).

use super::pipeline::ConnActivity;
use bytes::{Bytes, BytesMut};
use std::future::poll_fn;
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
    /// A write that makes no progress.
    pub send: Duration,
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

/// The start of the HTTP/2 connection preface: enough to tell it from any
/// HTTP/1 request line.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// How long a busy HTTP/1 connection sits idle before its hyper state is
/// dropped; a connection that is not busy is parked as soon as it is idle.
///
/// nginx frees an idle connection's buffers at once, but its buffers come
/// from a pool that costs nothing to refill; rebuilding a hyper connection
/// costs a few allocations, which a client under load would pay on every
/// request. So a client that sends its next request within this time of the
/// last one ending is *busy*, and its connection lingers this long between
/// requests before it is parked. Any other client (a new connection, one
/// back after a pause) has its hyper state, 20 KiB with the read and write
/// buffers, dropped as soon as its answer is out, as nginx does: otherwise
/// a burst of 10,000 clients that each send one request holds 200 MB for a
/// second, and the allocator's bookkeeping for that peak stays for good.
pub(super) const PARK_AFTER: Duration = Duration::from_secs(1);

/// Whether a client whose connection was parked until `until` (its idle
/// deadline) and sends now is busy: its previous request ended less than
/// [`PARK_AFTER`] ago.
pub(super) fn back_soon(until: Instant, idle: Duration) -> bool {
    // now - (until - idle) < PARK_AFTER, without subtracting instants.
    Instant::now() + idle < until + PARK_AFTER
}

/// What a client speaks, from its first bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Protocol {
    Http1,
    Http2,
}

/// Why the deadline poll stopped the reader.
enum Due {
    /// An idle HTTP/1 connection should let go of its hyper state.
    Park,
    /// A deadline passed: the connection is closed with this error.
    Expired(io::Error),
}

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
    /// The timer was armed by [`TimedIo::keep_armed`] (at most a tick
    /// away), not for a deadline.
    ticking: bool,
    /// The `idle_since` stamp this reader last acted on.
    idle_seen: u64,
    /// Set once the first bytes are read ([`TimedIo::sniff`]).
    http2: bool,
    write_stall: Option<Pin<Box<Sleep>>>,
    /// Bytes read but not yet handed to a reader: served first.
    prefix: Bytes,
    /// While set, `deadline` is the point to park at, and this the idle
    /// deadline that follows it.
    park_then: Option<Instant>,
    /// The reader was told "end of stream" to make hyper let go; the
    /// stream is still open.
    parked: bool,
    /// Idle spells last [`PARK_AFTER`] before parking (a busy client), not
    /// nothing.
    linger: bool,
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_owned())
}

impl<S> TimedIo<S> {
    /// Wrap a stream whose next request head is due by `head_by`; `linger`
    /// for a busy client (see [`PARK_AFTER`]).
    pub(super) fn new(
        inner: S,
        activity: Arc<ConnActivity>,
        timeouts: ConnTimeouts,
        head_by: Instant,
        linger: bool,
    ) -> TimedIo<S> {
        let deadline = head_by;
        TimedIo {
            inner,
            activity,
            timeouts,
            phase: Phase::Head,
            deadline,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            armed: deadline,
            timer_live: false,
            ticking: false,
            idle_seen: 0,
            http2: false,
            write_stall: None,
            prefix: Bytes::new(),
            park_then: None,
            parked: false,
            linger,
        }
    }

    /// Read the client's first bytes and tell HTTP/1 from HTTP/2 (prior
    /// knowledge, or ALPN's "h2" over TLS: both start with the preface).
    /// `None`: the client closed before sending anything. The bytes are
    /// kept for the protocol's reader.
    pub(super) async fn sniff(&mut self) -> io::Result<Option<Protocol>>
    where
        S: AsyncRead + Unpin,
    {
        loop {
            let have = self.prefix.len();
            let may_be_h2 = H2_PREFACE.starts_with(&self.prefix[..have.min(H2_PREFACE.len())]);
            if have > 0 && (have >= H2_PREFACE.len() || !may_be_h2) {
                let h2 = may_be_h2;
                self.http2 = h2;
                if h2 {
                    // HTTP/2 multiplexes; only "no stream in flight" matters.
                    self.set_deadline(Phase::Idle, self.timeouts.idle);
                }
                return Ok(Some(if h2 { Protocol::Http2 } else { Protocol::Http1 }));
            }
            if !poll_fn(|cx| self.poll_fill(cx)).await? {
                return Ok(None);
            }
        }
    }

    /// Wait while parked, holding nothing but the stream, until the client
    /// sends more (and from then linger if it is busy). `false`: it closed
    /// instead. Deadlines apply as to any read.
    pub(super) async fn wait_for_bytes(&mut self) -> io::Result<bool>
    where
        S: AsyncRead + Unpin,
    {
        // Bytes read ahead were pipelined behind the last request: busy.
        let (back, busy) = if self.prefix.is_empty() {
            let back = poll_fn(|cx| self.poll_fill(cx)).await?;
            // Parked, the deadline is the idle one until a head begins.
            (back, back && back_soon(self.deadline, self.timeouts.idle))
        } else {
            (true, true)
        };
        if busy {
            self.lingers();
        } else {
            self.linger = false;
        }
        Ok(back)
    }

    /// Read what the stream has into `prefix`; `false` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>>
    where
        S: AsyncRead + Unpin,
    {
        // On the stack of this poll, not in the parked future's state.
        let mut space = [0u8; 64];
        let mut buf = ReadBuf::new(&mut space);
        std::task::ready!(self.poll_read_tracked(cx, &mut buf))?;
        let got = buf.filled();
        if got.is_empty() {
            return Poll::Ready(Ok(false));
        }
        let mut joined = BytesMut::with_capacity(self.prefix.len() + got.len());
        joined.extend_from_slice(&self.prefix);
        joined.extend_from_slice(got);
        self.prefix = joined.freeze();
        Poll::Ready(Ok(true))
    }

    /// Whether bytes were read ahead of the next reader (they would be
    /// lost with the wrapper).
    pub(super) fn read_ahead(&self) -> bool {
        !self.prefix.is_empty()
    }

    /// The stream again, once parked (with nothing [read ahead]), and when
    /// the idle timeout closes it.
    ///
    /// [read ahead]: TimedIo::read_ahead
    pub(super) fn into_parked(self) -> (S, Instant) {
        debug_assert!(self.prefix.is_empty());
        (self.inner, self.deadline)
    }

    /// Whether hyper let go because the connection was parked (rather
    /// than because the client left). Clears the mark, and keeps `unread`
    /// (what hyper had read but not parsed) for the next reader.
    pub(super) fn unpark(&mut self, unread: Bytes) -> bool {
        let parked = std::mem::take(&mut self.parked);
        if parked && !unread.is_empty() {
            self.prefix = unread;
        }
        parked
    }

    /// From now on idle spells last [`PARK_AFTER`]: the client is busy.
    fn lingers(&mut self) {
        if !self.linger {
            self.linger = true;
            self.activity.quiet_end();
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
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Result<(), Due> {
        if self.armed > self.deadline {
            self.timer.as_mut().reset(self.deadline);
            self.armed = self.deadline;
            self.timer_live = false;
            self.ticking = false;
        } else if self.timer_waiting() {
            return Ok(()); // armed no later than the deadline
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= self.deadline {
                if let Some(idle_end) = self.park_then.take() {
                    self.deadline = idle_end;
                    self.timer_live = false;
                    return Err(Due::Park);
                }
                return Err(Due::Expired(timed_out(match self.phase {
                    Phase::Head => "client did not send a complete request head in time",
                    _ => "client connection idle too long",
                })));
            }
            self.timer.as_mut().reset(self.deadline);
            self.armed = self.deadline;
            self.ticking = false;
        }
        self.timer_live = true;
        Ok(())
    }

    /// Whether an idle spell can end in parking (HTTP/1, and an idle
    /// timeout longer than the wait before parking).
    fn may_park(&self) -> bool {
        !self.http2 && PARK_AFTER < self.timeouts.idle
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
        // An HTTP/1 connection may be parked a second after its last request
        // ends; the reader must run by then to see that it has. A timer
        // armed for a deadline (the header-read one of a new connection) is
        // brought in once per busy spell; a ticking one is left alone, so a
        // connection under load pays nothing per request.
        let every = if self.may_park() {
            if !self.ticking {
                let next = Instant::now() + PARK_AFTER;
                self.timer.as_mut().reset(next);
                self.armed = next;
                self.ticking = true;
                self.timer_live = false;
            }
            PARK_AFTER
        } else {
            self.timeouts.idle
        };
        if self.timer_waiting() {
            return;
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            let next = Instant::now() + every;
            self.timer.as_mut().reset(next);
            self.armed = next;
        }
        self.timer_live = true;
    }
}

impl<S: AsyncRead + Unpin> TimedIo<S> {
    /// Read from the stream under the connection's deadlines.
    fn poll_read_tracked(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        if this.activity.busy() {
            let before = buf.filled().len();
            let r = Pin::new(&mut this.inner).poll_read(cx, buf);
            if buf.filled().len() > before {
                // Sent while a request is in flight (its body, or the next
                // request): hyper may hold part of a message when this one
                // ends, which a withheld end of stream would cut short.
                this.lingers();
            }
            if r.is_pending() {
                this.keep_armed(cx);
                // To be parked as soon as the request ends, which happens
                // elsewhere (see the module's opening comment): be woken.
                if !this.linger && !this.activity.wake_reader_at_end(cx.waker()) {
                    cx.waker().wake_by_ref();
                }
            }
            return r;
        }
        let since = this.activity.idle_since();
        if since != this.idle_seen {
            // A request ended since this reader last looked: idle from then.
            this.idle_seen = since;
            this.phase = Phase::Idle;
            let ended = this.activity.born() + Duration::from_nanos(since);
            this.deadline = ended + this.timeouts.idle;
            this.park_then = None;
            if this.may_park() {
                this.park_then = Some(this.deadline);
                this.deadline = if this.linger {
                    ended + PARK_AFTER
                } else {
                    ended
                };
            }
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && this.phase == Phase::Idle && !this.http2 {
                    this.phase = Phase::HeadBegun;
                    this.park_then = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.phase == Phase::HeadBegun {
                    this.set_deadline(Phase::Head, this.timeouts.header_read);
                }
                match this.poll_deadline(cx) {
                    Ok(()) => Poll::Pending,
                    // A response still being written to a slow client
                    // keeps its connection as it is; its write-stall limit
                    // applies.
                    Err(Due::Park) if this.write_stall.is_some() => match this.poll_deadline(cx) {
                        Ok(()) | Err(Due::Park) => Poll::Pending,
                        Err(Due::Expired(e)) => Poll::Ready(Err(e)),
                    },
                    Err(Due::Park) => {
                        // End of stream, as hyper sees it: it lets go of an
                        // idle connection. `poll_shutdown` keeps the socket.
                        this.parked = true;
                        Poll::Ready(Ok(()))
                    }
                    Err(Due::Expired(e)) => Poll::Ready(Err(e)),
                }
            }
            other => other,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TimedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        this.poll_read_tracked(cx, buf)
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
                let limit = self.timeouts.send;
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
        let this = self.get_mut();
        if this.parked {
            // hyper closing a parked connection: the client is still there.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
