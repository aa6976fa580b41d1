//! Keep-alive connections to one upstream: a bounded LIFO idle list.
//!
//! A connection is driven by whichever request holds it — its IO runs inside
//! the request's own task, not a task of its own — so a proxied exchange costs
//! no task hops between the client side and the upstream side. It goes back to
//! the idle list only after its response body ended cleanly (see
//! `UpstreamBody`); any framing error, reset or early drop closes it instead,
//! so a confused connection is never reused. With upstream TLS configured,
//! every connection is TLS; there is no fallback to plain text.
//!
//! A connection idle for a while is *parked*: hyper's state for it (its read
//! and write buffers, ~26 KiB) is let go and the pool keeps the socket alone,
//! as nginx keeps an idle upstream connection without buffers. Taking it out
//! again first checks the socket (a peer that closed or spoke while it was
//! parked loses it), then starts hyper afresh on it, which costs a few
//! allocations and no I/O. Connections in steady use are never parked.

use super::request_body::RequestBody;
use crate::tls::{ClientStream, Connector};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// The most an upstream connection's read buffer grows to.
///
/// A response body chunk is a slice of this buffer and keeps all of it
/// alive until the client has taken the chunk; a client that stops reading
/// holds up to hyper's 16 queued chunks. At 1 MiB that was ~4 MiB per slow
/// reader; at 64 KiB (nginx reads 8 x 8 KiB, Envoy 1 MiB per connection in
/// all) it is at most 1 MiB and usually a few hundred KiB, at no cost in
/// throughput on loopback. Response heads must fit: 64 KiB is far more than
/// any proxy forwards (nginx's default is 4-8 KiB).
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Pool settings, fixed per upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSettings {
    /// Idle connections kept.
    pub max_idle: usize,
    /// How long an idle connection is kept.
    pub idle_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
}

/// Why no connection could be had; nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connect did not finish in time.
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    /// The TCP connect failed (refused, unreachable...).
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    /// This process could not open a socket: it is out of file descriptors
    /// or buffer memory. The proxy's own overload, not the node's failure.
    #[error("no socket for the connect: {0}")]
    Local(std::io::Error),
    /// The TLS handshake failed (untrusted certificate, wrong name...).
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    /// The HTTP/1 handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

type Driver = http1::Connection<TokioIo<ClientStream>, RequestBody>;

/// One upstream connection: the handle requests are sent on, and the
/// connection state machine that must be polled for any IO to happen.
pub struct Conn {
    pub(super) sender: http1::SendRequest<RequestBody>,
    /// `None` once the connection ended. It must be dropped then: hyper fails
    /// (or hands back, unsent) the requests still queued to a connection only
    /// when its state machine is dropped, so keeping a finished one would
    /// leave such a request waiting forever.
    driver: Option<Pin<Box<Driver>>>,
    reused: bool,
}

impl Conn {
    /// Whether this connection served an earlier request.
    pub fn is_reused(&self) -> bool {
        self.reused
    }

    /// Run the connection's IO; `Ready` once the connection has ended.
    pub fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(driver) = self.driver.as_mut() else {
            return Poll::Ready(());
        };
        match driver.as_mut().poll(cx) {
            Poll::Ready(result) => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
                self.driver = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Poll `outcome` — something only this connection's IO can complete (a
    /// response, a body frame) — driving the connection as far as needed.
    ///
    /// hyper hands results from the connection to `outcome` through wakers.
    /// Both run in this one task and `outcome` is always checked right after
    /// a drive, so those wakers could only wake this task for a useless extra
    /// poll (a whole pass over the client connection, ~3 % of a request).
    /// So `outcome` is checked first (what an earlier drive delivered needs
    /// no drive), then the connection is driven with a no-op waker; only if
    /// `outcome` is still pending is it driven again with the task's waker,
    /// so that the socket wakes the task when more arrives.
    pub fn poll_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut outcome: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        let quiet = &mut Context::from_waker(Waker::noop());
        if let Poll::Ready(t) = outcome(quiet) {
            return Poll::Ready(t);
        }
        let _ = self.poll_drive(quiet);
        if let Poll::Ready(t) = outcome(quiet) {
            return Poll::Ready(t);
        }
        self.poll_waiting(cx, outcome)
    }

    /// Drive the connection with the task's waker (so the socket wakes the
    /// task), then check `outcome` with a no-op one (see `poll_with`). For a
    /// drive that is known to leave `outcome` waiting, such as the one that
    /// writes a request.
    pub fn poll_waiting<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut outcome: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        let _ = self.poll_drive(cx);
        outcome(&mut Context::from_waker(Waker::noop()))
    }

    /// Whether the connection has ended.
    fn ended(&self) -> bool {
        self.driver.is_none()
    }

    /// Drive until the connection can take a request; `false` if it ended.
    pub async fn ready(&mut self) -> bool {
        poll_fn(|cx| {
            let ended = self.poll_drive(cx).is_ready();
            match self.sender.poll_ready(cx) {
                Poll::Ready(r) => Poll::Ready(r.is_ok()),
                Poll::Pending if ended => Poll::Ready(false),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }
}

/// How long a connection sits idle before it is parked. Sweeps run every few
/// seconds (`evict_expired`), so parking happens between this and one sweep
/// interval more.
const PARK_AFTER: Duration = Duration::from_secs(1);

struct Idle {
    kept: Kept,
    since: Instant,
}

/// An idle connection as the pool keeps it.
enum Kept {
    /// With hyper's state: ready to send on at once.
    Live(Conn),
    /// The socket alone (see the module comment).
    Parked(ClientStream),
}

impl Kept {
    /// Whether the connection is known to have ended while idle.
    fn is_closed(&self) -> bool {
        match self {
            Kept::Live(conn) => conn.ended() || conn.sender.is_closed(),
            Kept::Parked(_) => false,
        }
    }

    /// Let go of hyper's state; `None` if the connection cannot be kept
    /// (it ended, or the peer sent bytes no request asked for).
    fn park(self) -> Option<Kept> {
        let Kept::Live(conn) = self else {
            return Some(self);
        };
        let driver = conn.driver?;
        if conn.sender.is_closed() {
            return None;
        }
        let parts = Pin::into_inner(driver).into_parts();
        parts
            .read_buf
            .is_empty()
            .then(|| Kept::Parked(parts.io.into_inner()))
    }
}

/// Shards of a pool: one per worker thread (`crate::workers`), so a request
/// reuses connections its own worker opened and polls, and workers never
/// contend for one lock. Workers beyond this share shards.
const SHARDS: usize = 16;

/// The idle connections to one upstream.
pub struct Pool {
    addr: SocketAddr,
    settings: PoolSettings,
    tls: Option<Arc<Connector>>,
    /// Idle connections by worker (`max_idle` is per shard).
    idle: [Mutex<Vec<Idle>>; SHARDS],
}

impl Pool {
    /// An empty pool for `addr`, speaking TLS through `tls` when given.
    pub fn new(addr: SocketAddr, settings: PoolSettings, tls: Option<Arc<Connector>>) -> Pool {
        Pool {
            addr,
            settings,
            tls,
            idle: std::array::from_fn(|_| Mutex::new(Vec::new())),
        }
    }

    /// This worker's shard.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.shard(crate::workers::current() % SHARDS)
    }

    fn shard(&self, i: usize) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Idle connections currently held, and how many of them are parked.
    pub fn idle_counts(&self) -> (usize, usize) {
        (0..SHARDS)
            .map(|i| {
                let shard = self.shard(i);
                let parked = shard
                    .iter()
                    .filter(|i| matches!(i.kept, Kept::Parked(_)))
                    .count();
                (shard.len(), parked)
            })
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    }

    /// A connection ready for a request: the most recently used idle one that
    /// is still alive, or a new one. `now` need only be recent (the request's
    /// arrival): idle ages are judged against it.
    pub async fn checkout(&self, now: Instant) -> Result<Conn, ConnectError> {
        loop {
            let candidate = self.lock().pop();
            let Some(Idle { kept, since }) = candidate else {
                break;
            };
            if now.saturating_duration_since(since) >= self.settings.idle_timeout
                || kept.is_closed()
            {
                continue;
            }
            let mut conn = match kept {
                Kept::Live(conn) => conn,
                Kept::Parked(io) => match Self::unpark(io).await {
                    Some(conn) => conn,
                    None => continue,
                },
            };
            // A connection that already asked for its next request needs no
            // check here: a peer's close while it sat idle is seen when the
            // request is sent, because hyper reads before it writes and hands
            // back, unsent, a request it could not write (`Upstream::send`
            // then takes the next connection).
            if conn.sender.is_ready() {
                conn.reused = true;
                return Ok(conn);
            }
            tracing::trace!(upstream = %self.addr, "checking an idle connection");
            if conn.ready().await {
                conn.reused = true;
                return Ok(conn);
            }
            tracing::trace!(upstream = %self.addr, "idle connection was closed");
        }
        // Boxed: connecting is the rare path, and its future would otherwise
        // inflate every request's state machine.
        Box::pin(self.connect()).await
    }

    /// hyper afresh on a parked connection's socket, unless the peer closed
    /// or sent something while it was parked.
    async fn unpark(io: ClientStream) -> Option<Conn> {
        if !io.is_quiet() {
            return None;
        }
        let (sender, driver) = Self::hyper(io).await.ok()?;
        Some(Conn {
            sender,
            driver: Some(Box::pin(driver)),
            reused: true,
        })
    }

    /// hyper's client on `io` (HTTP/1: no I/O until a request is sent).
    async fn hyper(io: ClientStream) -> hyper::Result<(http1::SendRequest<RequestBody>, Driver)> {
        http1::Builder::new()
            .writev(false)
            .max_buf_size(UPSTREAM_READ_BUFFER)
            .handshake(TokioIo::new(io))
            .await
    }

    async fn connect(&self) -> Result<Conn, ConnectError> {
        tracing::trace!(upstream = %self.addr, "connecting");
        // One deadline covers TCP and TLS: both are "getting a connection".
        let timeout = self.settings.connect_timeout;
        let io = tokio::time::timeout(timeout, self.open())
            .await
            .map_err(|_| ConnectError::Timeout(timeout))??;
        let (sender, driver) = Self::hyper(io).await?;
        let mut conn = Conn {
            sender,
            driver: Some(Box::pin(driver)),
            reused: false,
        };
        if conn.ready().await {
            Ok(conn)
        } else {
            Err(ConnectError::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "connection closed during setup",
            )))
        }
    }

    async fn open(&self) -> Result<ClientStream, ConnectError> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                    ConnectError::Local(e)
                }
                _ => ConnectError::Io(e),
            })?;
        stream.set_nodelay(true)?;
        match &self.tls {
            None => Ok(ClientStream::Plain(stream)),
            Some(tls) => tls
                .connect(stream, None, self.addr.ip())
                .await
                .map_err(ConnectError::Tls),
        }
    }

    /// Return a connection whose exchange finished cleanly, idle since
    /// `idle_since`. Callers pass when the response arrived rather than read
    /// the clock: a stamp earlier than the true idle start can only retire the
    /// connection sooner, the safe side of the upstream's keep-alive timeout.
    pub fn checkin(&self, conn: Conn, idle_since: Instant) {
        if conn.ended() || conn.sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < self.settings.max_idle {
            idle.push(Idle {
                kept: Kept::Live(conn),
                since: idle_since,
            });
        }
    }

    /// Drop idle connections past their idle timeout and park those idle
    /// for [`PARK_AFTER`] (called every few seconds).
    pub fn evict_expired(&self) {
        self.sweep(Instant::now());
    }

    /// The sweep as of `now`.
    pub(super) fn sweep(&self, now: Instant) {
        let timeout = self.settings.idle_timeout;
        for i in 0..SHARDS {
            let mut shard = self.shard(i);
            if shard.is_empty() {
                continue;
            }
            let kept = std::mem::take(&mut *shard);
            *shard = kept
                .into_iter()
                .filter_map(|Idle { kept, since }| {
                    let idle = now.saturating_duration_since(since);
                    if idle >= timeout || kept.is_closed() {
                        return None;
                    }
                    let kept = if idle >= PARK_AFTER {
                        kept.park()?
                    } else {
                        kept
                    };
                    Some(Idle { kept, since })
                })
                .collect();
        }
    }
}
