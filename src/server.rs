//! Accept loops shared by every listener: a connection cap, survival when the
//! process runs out of file descriptors, and graceful drain on shutdown.

use crate::tls::Terminator;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Graceful drain of served connections: on `shutdown`, each one finishes
/// the request in hand and closes; `shutdown` returns once all have.
///
/// hyper-util's `GracefulShutdown` polls a watch channel on every poll of
/// every connection, several times per proxied request. A `Draining`
/// connection reads one flag per poll instead, and polls the shutdown signal
/// only to register its task's waker (again only if the waker changes).
pub struct Drain {
    draining: Arc<AtomicBool>,
    signal: CancellationToken,
    /// Every connection holds a receiver; `closed` waits for the last.
    live: watch::Sender<()>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            draining: Arc::new(AtomicBool::new(false)),
            signal: CancellationToken::new(),
            live: watch::Sender::new(()),
        }
    }
}

impl Drain {
    /// A handle for one connection still to be made (e.g. after TLS).
    pub fn watcher(&self) -> DrainWatcher {
        DrainWatcher {
            draining: self.draining.clone(),
            signal: self.signal.clone(),
            live: self.live.subscribe(),
        }
    }

    /// Wait, without telling them anything, until every connection has ended.
    pub async fn settled(&self) {
        self.live.closed().await;
    }

    /// Tell every connection to finish, and wait until they all have.
    pub async fn shutdown(self) {
        self.draining.store(true, Ordering::Release);
        self.signal.cancel();
        self.live.closed().await;
    }
}

/// One connection's share of a `Drain`; `shutdown` waits for it until dropped.
/// Three handles: [`DrainWatcher::follow`] makes the part a task pins.
#[derive(Clone)]
pub struct DrainWatcher {
    draining: Arc<AtomicBool>,
    signal: CancellationToken,
    live: watch::Receiver<()>,
}

impl DrainWatcher {
    /// Wait for the drain to begin: for a task that only waits (no
    /// connection to close gracefully), smaller than a [`Following`].
    pub fn drain_begun(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.signal.cancelled()
    }

    /// Start following the drain from the task that serves the connection.
    pub fn follow(self) -> Following {
        Following {
            signal: self.signal.cancelled_owned(),
            draining: self.draining,
            registered: None,
            told: false,
            _live: self.live,
        }
    }

    /// Follow `conn`, so the drain can close it gracefully.
    pub fn watch<C: GracefulConnection>(self, conn: C) -> Draining<C> {
        Draining {
            conn,
            following: self.follow(),
            shut: false,
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection's task following a `Drain`.
    pub struct Following {
        #[pin]
        signal: WaitForCancellationFutureOwned,
        draining: Arc<AtomicBool>,
        // The waker the signal holds; polled again only when it changes.
        registered: Option<Waker>,
        told: bool,
        _live: watch::Receiver<()>,
    }
}

impl Following {
    /// Whether the drain has begun. Until it has, makes sure this task is
    /// woken when it does (reading one flag when the waker is unchanged).
    pub fn poll_drain(self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        let this = self.project();
        if *this.told {
            return true;
        }
        let stale = this
            .registered
            .as_ref()
            .is_none_or(|w| !w.will_wake(cx.waker()));
        if stale || this.draining.load(Ordering::Acquire) {
            if this.signal.poll(cx).is_ready() {
                *this.told = true;
            } else if stale {
                *this.registered = Some(cx.waker().clone());
            }
        }
        *this.told
    }

    /// Whether the drain has begun, as of the last poll.
    pub fn told(&self) -> bool {
        self.told
    }

    /// Wait for the drain to begin.
    pub async fn drained(mut self: Pin<&mut Self>) {
        std::future::poll_fn(|cx| {
            if self.as_mut().poll_drain(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    /// Run `conn` to its end, closing it gracefully once the drain begins.
    pub async fn serve<C: GracefulConnection>(
        mut self: Pin<&mut Self>,
        mut conn: Pin<&mut C>,
    ) -> C::Output {
        let mut shut = false;
        std::future::poll_fn(|cx| {
            if !shut && self.as_mut().poll_drain(cx) {
                shut = true;
                conn.as_mut().graceful_shutdown();
            }
            conn.as_mut().poll(cx)
        })
        .await
    }
}

pin_project_lite::pin_project! {
    /// A connection that closes gracefully once its `Drain` shuts down.
    pub struct Draining<C> {
        #[pin]
        conn: C,
        #[pin]
        following: Following,
        shut: bool,
    }
}

impl<C: GracefulConnection> Future for Draining<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        if !*this.shut && this.following.poll_drain(cx) {
            *this.shut = true;
            this.conn.as_mut().graceful_shutdown();
        }
        this.conn.poll(cx)
    }
}

/// A listener that could not be bound (a runtime failure: exit 2).
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    pub source: io::Error,
}

/// How many finished handshakes the kernel queues for `accept`.
///
/// tokio's `TcpListener::bind` listens with 128 (mio follows the standard
/// library): a burst of new clients overflows that while the proxy is busy,
/// the kernel drops their handshakes, and they see resets (646 of 2,000
/// clients connecting at once, after a previous burst). nginx listens with
/// 511 and HAProxy with its connection limit; the kernel caps the value at
/// `net.core.somaxconn` (4,096 by default since Linux 5.4), and a queue
/// costs memory only as it fills.
const LISTEN_BACKLOG: u32 = 4096;

/// Bind `addr`; the listener and the address actually bound (port 0 picks one).
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), BindError> {
    let err = |source| BindError { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    // As `TcpListener::bind` does: a restarted server rebinds at once.
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    let listener = socket.listen(LISTEN_BACKLOG).map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// Raise this process's open-file limit to the most it may have, and return
/// it. A server holding thousands of connections needs far more than the
/// 1,024 most systems give a process by default; the hard limit (systemd's
/// `LimitNOFILE`, `ulimit -Hn`) stays the operator's to set.
pub fn raise_open_files_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// How long to pause accepting after a resource error (EMFILE, ENOBUFS...).
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// A connection that got a place under the cap.
pub struct Accepted {
    /// The client stream.
    pub stream: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// Its place under the connection cap, held until the connection ends.
    pub permit: OwnedSemaphorePermit,
}

/// Errors that concern one connection only; accepting continues at once.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Accept until `shutdown`; connections under the cap go to `serve`, the rest to `refuse`.
///
/// Running out of descriptors does not end the loop: it pauses briefly and
/// tries again, so the listener recovers as soon as connections close.
pub async fn accept_loop(
    listener: &TcpListener,
    cap: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    mut serve: impl FnMut(Accepted),
    mut refuse: impl FnMut(TcpStream),
) {
    let mut pausing = false;
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                if !pausing {
                    tracing::error!(error = %e, "accept failed; pausing accepts until resources free up");
                }
                pausing = true;
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(ACCEPT_PAUSE) => continue,
                }
            }
        };
        if pausing {
            tracing::info!("accepting again");
            pausing = false;
        }
        match cap.clone().try_acquire_owned() {
            Ok(permit) => serve(Accepted {
                stream,
                peer,
                permit,
            }),
            Err(_) => refuse(stream),
        }
    }
}

/// Serve HTTP/1.1 (over TLS when `tls` is given) with `handle` until
/// `shutdown`, then drain for up to `grace`.
///
/// For small internal listeners (admin, coordinator HTTP): a fixed connection
/// cap and header-read timeout, no HTTP/2.
pub async fn serve_http1<F, Fut, B>(
    listener: TcpListener,
    tls: Option<Arc<Terminator>>,
    max_connections: usize,
    shutdown: CancellationToken,
    grace: Duration,
    handle: F,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let drain = Drain::default();
    let cap = Arc::new(Semaphore::new(max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .keep_alive(true);
    accept_loop(
        &listener,
        &cap,
        &shutdown,
        |a| {
            let handle = handle.clone();
            let peer = a.peer;
            let svc = hyper::service::service_fn(move |req| {
                let f = handle(req, peer);
                async move { Ok::<_, Infallible>(f.await) }
            });
            let builder = builder.clone();
            let watcher = drain.watcher();
            let tls = tls.clone();
            let shutdown = shutdown.clone();
            let permit = a.permit;
            tokio::spawn(async move {
                match tls {
                    None => {
                        let _ = watcher
                            .watch(builder.serve_connection(TokioIo::new(a.stream), svc))
                            .await;
                    }
                    Some(tls) => {
                        let accepted = tokio::select! {
                            () = shutdown.cancelled() => return,
                            r = tls.accept(a.stream) => r,
                        };
                        match accepted {
                            Ok(stream) => {
                                let _ = watcher
                                    .watch(builder.serve_connection(TokioIo::new(stream), svc))
                                    .await;
                            }
                            // Dropping the stream closes it at once.
                            Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        }
                    }
                }
                drop(permit);
            });
        },
        drop,
    )
    .await;
    drop(listener);
    let _ = tokio::time::timeout(grace, drain.shutdown()).await;
}

/// TLS connections accepted on `listener`, for servers that take a stream of
/// connections (tonic). Handshakes run concurrently, each within the
/// terminator's deadline, so one slow client cannot hold up the others;
/// failed handshakes are dropped here and never reach the server.
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<Terminator>,
    max_handshakes: usize,
    shutdown: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(max_handshakes.max(1));
    tokio::spawn(async move {
        let cap = Arc::new(Semaphore::new(max_handshakes));
        accept_loop(
            &listener,
            &cap,
            &shutdown,
            |a| {
                let tls = tls.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tls.accept(a.stream).await {
                        Ok(stream) => {
                            drop(a.permit);
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Err(e) => {
                            tracing::debug!(peer = %a.peer, error = %e, "TLS handshake failed");
                        }
                    }
                });
            },
            drop,
        )
        .await;
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_drain_lets_the_request_in_hand_finish_then_closes_and_returns() {
        let drain = Drain::default();
        let (mut client, server) = tokio::io::duplex(4096);
        let release = Arc::new(tokio::sync::Notify::new());
        let answer = release.clone();
        let svc = hyper::service::service_fn(move |_req| {
            let answer = answer.clone();
            async move {
                answer.notified().await;
                Ok::<_, Infallible>(Response::new(Full::new(bytes::Bytes::from_static(b"done"))))
            }
        });
        let conn =
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), svc);
        let served = tokio::spawn(drain.watcher().watch(conn));
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::task::yield_now().await;
        let mut shutdown = tokio::spawn(drain.shutdown());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut shutdown)
                .await
                .is_err(),
            "the drain waits for the request in hand"
        );
        release.notify_one();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("done"), "answered, then closed: {answer}");
        shutdown.await.unwrap();
        served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_refused_and_accepting_goes_on() {
        let (listener, addr) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let cap = Arc::new(Semaphore::new(1));
        let shutdown = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = shutdown.clone();
        let looping = tokio::spawn(async move {
            let mut held = Vec::new();
            accept_loop(
                &listener,
                &cap,
                &stop,
                |a| {
                    let _ = tx.send("served");
                    held.push(a.permit);
                },
                |_| {
                    let _ = tx.send("refused");
                },
            )
            .await;
        });
        let _first = TcpStream::connect(addr).await.unwrap();
        assert_eq!(rx.recv().await, Some("served"));
        let _second = TcpStream::connect(addr).await.unwrap();
        assert_eq!(rx.recv().await, Some("refused"));
        shutdown.cancel();
        looping.await.unwrap();
    }

    /// Clients whose handshake completes while nothing accepts wait in the
    /// kernel's queue, 600 of them here (tokio's own bind queued 128, and
    /// the kernel dropped the rest's handshakes).
    #[tokio::test]
    async fn a_burst_of_clients_waits_in_the_accept_queue_rather_than_being_dropped() {
        let (_listener, addr) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let connects = (0..600).map(|_| {
            tokio::spawn(tokio::time::timeout(
                Duration::from_secs(5),
                TcpStream::connect(addr),
            ))
        });
        let mut clients = Vec::new();
        for c in connects {
            let connected = c.await.unwrap();
            clients.push(
                connected
                    .expect("a dropped handshake is retried only after a second")
                    .unwrap(),
            );
        }
        assert_eq!(clients.len(), 600);
    }

    #[tokio::test]
    async fn a_taken_address_is_a_bind_error_naming_it() {
        let (_held, addr) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let e = bind(addr).await.err().unwrap();
        assert_eq!(e.addr, addr);
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}
