//! The client-facing listener: HTTP/1.1 and HTTP/2 on one port, in clear
//! text or over TLS (ALPN picks the protocol).

use super::Proxy;
use super::conn::{self, ConnTimeouts, Protocol, TimedIo};
use super::headers::{ClientInfo, HostMemo};
use super::pipeline::{self, ClientConn, ConnActivity};
use super::stall::StreamExecutor;
use crate::json_error::JsonError;
use crate::server::{Accepted, Drain, DrainWatcher, accept_loop};
use crate::tls::{HandshakeError, Terminator};
use crate::workers::Workers;
use http::StatusCode;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Listener settings; fixed for the life of the process.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    /// Client-facing listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Worker threads (0 = per CPU).
    pub workers: usize,
    /// Drain limit on shutdown.
    pub shutdown_grace: Duration,
    /// Serve HTTP/2 too.
    pub http2: bool,
    /// TLS on the client-facing listener.
    pub tls: Option<crate::tls::ServerTls>,
    /// TLS handshake deadline.
    pub tls_handshake_timeout: Duration,
    /// TLS on the admin listener.
    pub admin_tls: Option<crate::tls::ServerTls>,
}

/// Connections over the cap that get a written 503 rather than a bare close;
/// beyond this many at once they are simply closed.
const OVERLOAD_RESPONDERS: usize = 64;

/// Serve until `shutdown`, then drain for up to the grace period; each
/// connection is served on the next of `workers` (or here, without any).
pub(super) async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    cfg: ServerConfig,
    tls: Option<Arc<Terminator>>,
    workers: Arc<Workers>,
    shutdown: CancellationToken,
) {
    let snapshot = proxy.live.snapshot();
    let limits = &snapshot.settings.limits;
    let timeouts = ConnTimeouts {
        header_read: limits.header_read_timeout,
        idle: limits.idle_timeout,
        send: limits.send_timeout,
    };
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        // TimedIo enforces header-read and idle deadlines; hyper's own timer
        // would conflate the two.
        .header_read_timeout(None)
        .writev(false)
        .keep_alive(true)
        .max_buf_size(limits.max_header_bytes.max(8192) * 4);
    let mut http2 = http2::Builder::new(StreamExecutor::new(limits.send_timeout));
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(u32::try_from(limits.max_header_bytes * 2).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Builders {
        http1,
        http2: cfg.http2.then_some(http2),
        timeouts,
    };

    let builder = Arc::new(builder);
    let drain = Drain::default();
    let cap = Arc::new(Semaphore::new(limits.max_connections));
    let responders = Arc::new(Semaphore::new(OVERLOAD_RESPONDERS));
    accept_loop(
        &listener,
        &cap,
        &shutdown,
        |Accepted {
             stream,
             peer,
             permit,
         }| {
            let _ = stream.set_nodelay(true);
            proxy.clients.opened();
            let conn = Connection {
                closed: Closed {
                    proxy: proxy.clone(),
                    _permit: permit,
                },
                builder: builder.clone(),
                watcher: drain.watcher(),
                peer,
            };
            // Two task types, so a clear-text connection's task is not sized
            // for a TLS stream it never holds.
            match &tls {
                None => {
                    let head_by = Instant::now() + timeouts.header_read;
                    dispatch(&workers, stream, move |stream| {
                        conn.wait(stream, head_by, false)
                    });
                }
                Some(tls) => {
                    let tls = tls.clone();
                    let shutdown = shutdown.clone();
                    dispatch(&workers, stream, move |stream| async move {
                        let accepted = tokio::select! {
                            () = shutdown.cancelled() => None,
                            r = tls.accept(stream) => Some(r),
                        };
                        match accepted {
                            Some(Ok(stream)) => {
                                let head_by = Instant::now() + conn.builder.timeouts.header_read;
                                conn.serve(stream, true, head_by, None, false).await;
                            }
                            Some(Err(e)) => {
                                conn.proxy().clients.handshake_failures.count(&e);
                                match e {
                                    HandshakeError::PlainHttp(stream) => {
                                        refuse(stream, &plain_http()).await;
                                    }
                                    e => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                                }
                            }
                            None => {}
                        }
                    });
                }
            }
        },
        |stream| {
            proxy.clients.shed.increment(1);
            if let Ok(slot) = responders.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream, &overloaded()).await;
                    drop(slot);
                });
            }
        },
    )
    .await;
    drop(listener);
    let mut grace = cfg.shutdown_grace;
    if proxy.pipeline.closing.load(Ordering::Acquire) {
        // A successor serves: HTTP/1 clients are let go one by one after an
        // answer that closes their connection (see `respond`), as they come
        // back. Closing an idle keep-alive connection outright would race a
        // request the client may be sending on it at that moment; only the
        // connections idle through this whole window are closed that way.
        let window = grace.min(HANDOVER_WINDOW);
        let started = Instant::now();
        let _ = tokio::time::timeout(window, drain.settled()).await;
        grace = grace.saturating_sub(started.elapsed());
    }
    if tokio::time::timeout(grace, drain.shutdown()).await.is_err() {
        tracing::warn!("grace period over; closing remaining connections");
    }
}

/// How long, after a successor took over, HTTP/1 keep-alive clients are
/// given to come back for the answer that closes their connection.
const HANDOVER_WINDOW: Duration = Duration::from_secs(5);

/// Serve `stream` with `serve` on the next of `workers`, moving the socket
/// from this runtime's reactor to that worker's; without workers, here, as
/// it is.
fn dispatch<F, Fut>(workers: &Workers, stream: TcpStream, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    if !workers.any() {
        tokio::spawn(serve(stream));
        return;
    }
    let Ok(stream) = stream.into_std() else {
        return;
    };
    workers.spawn(async move {
        if let Ok(stream) = TcpStream::from_std(stream) {
            serve(stream).await;
        }
    });
}

/// What every connection of a listener shares: hyper's per-protocol
/// settings and the connection deadlines.
struct Builders {
    http1: http1::Builder,
    /// `None`: HTTP/1 only.
    http2: Option<http2::Builder<StreamExecutor>>,
    timeouts: ConnTimeouts,
}

/// Counts a client connection closed, and frees its place under the cap,
/// however its task ends.
struct Closed {
    proxy: Arc<Proxy>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Closed {
    fn drop(&mut self) {
        self.proxy.clients.closed();
    }
}

/// Everything a client connection needs once it is past the cap (and TLS).
///
/// Kept small, as it is most of what a waiting connection's task holds:
/// what every connection of the listener shares lives behind `builder`.
struct Connection {
    /// Dropped when the connection's task ends.
    closed: Closed,
    builder: Arc<Builders>,
    watcher: DrainWatcher,
    peer: SocketAddr,
}

/// How an HTTP/1 connection is parked: its task hands the socket to a new,
/// small one ([`Connection::wait`]; clear text), or waits in place (TLS,
/// whose stream may hold decrypted bytes the socket no longer shows).
type HandOff<S> = Option<fn(Connection, S, Instant)>;

impl Connection {
    fn proxy(&self) -> &Arc<Proxy> {
        &self.closed.proxy
    }

    /// Wait, as a task that holds the socket and little else, until the
    /// client sends (then serve it, as a new task), closes, or lets `until`
    /// pass (then close: the header-read deadline of a connection that
    /// never sent, the idle deadline of a `parked` one).
    ///
    /// A task's size is fixed by its largest state, so a connection that
    /// waits inside the task that serves it costs as much as one being
    /// served; most connections of a large population are waiting.
    // Each byte counts here: tokio's task cell is 128-byte aligned, so the
    // future's size sets the allocation in steps of 128 bytes (the test
    // below pins it). So the drain is followed through the watcher's own
    // token rather than a `Following` copy of the watcher, and nothing is
    // built outside the future and moved in (a captured value keeps its
    // place beside the copy the `select!` holds).
    //
    // Not `async fn`: the declared `Send` breaks the cycle the compiler
    // cannot infer through (`wait` spawns `serve`, which spawns `wait`).
    #[allow(clippy::manual_async_fn)]
    fn wait(
        self,
        stream: TcpStream,
        until: Instant,
        parked: bool,
    ) -> impl Future<Output = ()> + Send {
        async move {
            let readable = {
                tokio::select! {
                    biased;
                    () = self.watcher.drain_begun() => false,
                    // A peek, not `readable()`: it takes the socket's
                    // reader slot, dropping the waker the serving task left
                    // there (which would keep that task's memory while the
                    // connection waits). Not `poll_read_ready` either: that
                    // reported a newly accepted, silent socket ready, and it
                    // then waited in the far larger serving task.
                    r = std::future::poll_fn(|cx| {
                        let mut first = [0u8; 1];
                        stream.poll_peek(cx, &mut tokio::io::ReadBuf::new(&mut first))
                    }) => matches!(r, Ok(n) if n > 0),
                    () = tokio::time::sleep_until(until) => {
                        tracing::debug!(peer = %self.peer, "client connection closed: nothing sent in time");
                        false
                    }
                }
            };
            if readable {
                let timeouts = self.builder.timeouts;
                let busy = parked && conn::back_soon(until, timeouts.idle);
                let head_by = Instant::now() + timeouts.header_read;
                tokio::spawn(self.serve(stream, false, head_by, Some(park), busy));
            }
        }
    }

    /// Serve HTTP on `stream` until the client leaves, shutdown drains it,
    /// or (HTTP/1) it goes idle and is parked; its next request head is due
    /// by `head_by`, and `busy` says whether the client is (see
    /// [`conn::PARK_AFTER`]).
    ///
    /// Nothing of hyper's is built until the client's first bytes arrive,
    /// and an HTTP/1 connection that goes idle is parked (see `conn`): hyper
    /// lets go, and `hand_off` (or, without one, this task) waits for the
    /// client with the socket alone. To keep the task small, everything is
    /// built before the future, which captures each piece once, and hyper's
    /// connections are boxed.
    fn serve<S>(
        self,
        stream: S,
        tls: bool,
        head_by: Instant,
        hand_off: HandOff<S>,
        busy: bool,
    ) -> impl Future<Output = ()> + Send + use<S>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let conn = self;
        let activity = ConnActivity::new(conn.proxy().pipeline.limit.clone());
        // Owned by the pipeline, which hyper calls from this connection's task only.
        let client = ClientConn {
            info: ClientInfo::new(conn.peer, tls),
            hosts: HostMemo::default(),
        };
        let mut svc = pipeline::connection(&conn.proxy().pipeline, client, activity.clone());
        let mut io = TimedIo::new(stream, activity, conn.builder.timeouts, head_by, busy);
        async move {
            // Followed through a copy: `conn` stays whole to hand over.
            let mut watcher = pin!(conn.watcher.clone().follow());
            let protocol = tokio::select! {
                r = io.sniff() => r,
                () = watcher.as_mut().drained() => return,
            };
            let ended: Result<(), Box<dyn std::error::Error + Send + Sync>> =
                match (protocol, &conn.builder.http2) {
                    (Ok(None), _) => return,
                    (Err(e), _) => Err(e.into()),
                    (Ok(Some(Protocol::Http2)), Some(http2)) => {
                        let mut http = Box::pin(http2.serve_connection(TokioIo::new(io), svc));
                        watcher
                            .as_mut()
                            .serve(http.as_mut())
                            .await
                            .map_err(Into::into)
                    }
                    (Ok(Some(_)), _) => loop {
                        let mut http =
                            Box::new(conn.builder.http1.serve_connection(TokioIo::new(io), svc));
                        let served = watcher.as_mut().serve(Pin::new(&mut *http)).await;
                        let parked = {
                            let parts = http.into_parts();
                            (io, svc) = (parts.io.into_inner(), parts.service);
                            io.unpark(parts.read_buf)
                        };
                        match served {
                            Ok(()) => {}
                            // Parked with the next request's head begun (it
                            // came with the last one): hyper took the end of
                            // stream for the client's and gave up on the head,
                            // whose bytes `unpark` kept for the next reader.
                            Err(e) if parked && e.is_incomplete_message() => {}
                            Err(e) => break Err(e.into()),
                        }
                        if !parked || watcher.told() {
                            break Ok(());
                        }
                        if let Some(hand_off) = hand_off.filter(|_| !io.read_ahead()) {
                            let (stream, until) = io.into_parked();
                            drop(svc);
                            return hand_off(conn, stream, until);
                        }
                        // Parked in place: hyper's state is gone; wait for the client.
                        let more = tokio::select! {
                            r = io.wait_for_bytes() => r,
                            () = watcher.as_mut().drained() => Ok(false),
                        };
                        match more {
                            Ok(true) => continue,
                            Ok(false) => break Ok(()),
                            Err(e) => break Err(e.into()),
                        }
                    },
                };
            if let Err(e) = ended {
                tracing::debug!(peer = %conn.peer, error = %e, "client connection ended with an error");
            }
        }
    }
}

/// Park a clear-text connection: a small task waits for its client.
fn park(conn: Connection, stream: TcpStream, until: Instant) {
    tokio::spawn(conn.wait(stream, until, true));
}

/// The answer to a connection over the cap.
fn overloaded() -> JsonError<'static> {
    JsonError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "overloaded: too many client connections",
    )
}

/// The answer to plain HTTP on the TLS port.
fn plain_http() -> JsonError<'static> {
    JsonError::new(
        StatusCode::BAD_REQUEST,
        "bad_request",
        "plain HTTP sent to a TLS port; use https",
    )
}

/// Answer `stream` with `e` without parsing what it sent, then close.
async fn refuse(mut stream: TcpStream, e: &JsonError<'_>) {
    let answer = e.raw_http1();
    let write = async {
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        // Drain briefly so closing with unread input does not reset the
        // connection before the client reads the answer.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection whose client sent nothing yet, or that went idle, is a
    /// task waiting on its socket: at 10,000 of them its size is the proxy's
    /// memory. tokio keeps a task in a 128-byte-aligned cell with 112 bytes
    /// of its own (tokio 1.54: header, scheduler and id, trailer), so a
    /// future of at most 400 bytes takes a 512-byte cell, and one byte more
    /// takes 640.
    #[tokio::test]
    async fn a_waiting_connection_is_a_512_byte_task_until_its_client_sends() {
        let config = crate::config::ProxyConfig::from_toml(
            "[topology]\nsources = [\"map.json\"]\n",
            "t.toml",
            &crate::config::ProxyOverrides::default(),
        )
        .unwrap();
        let proxy = Proxy::new(&config, Arc::new(crate::telemetry::Metrics::new()), None).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let second = Duration::from_secs(1);
        let conn = Connection {
            closed: Closed {
                proxy,
                _permit: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
            },
            builder: Arc::new(Builders {
                http1: http1::Builder::new(),
                http2: None,
                timeouts: ConnTimeouts {
                    header_read: second,
                    idle: second,
                    send: second,
                },
            }),
            watcher: Drain::default().watcher(),
            peer,
        };
        let waiting = conn.wait(stream, Instant::now() + Duration::from_secs(60), true);
        let size = std::mem::size_of_val(&waiting);
        assert!(
            size <= 400,
            "the waiting connection's future is {size} bytes"
        );

        // And it stays that small task until its client sends: it does not
        // hand over to the serving task (and end) on a readiness alone.
        let waiting = tokio::spawn(waiting);
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(
            !waiting.is_finished(),
            "a client that sent nothing is served by the larger task"
        );
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the first bytes hand the connection to the serving task")
            .unwrap();
    }
}
