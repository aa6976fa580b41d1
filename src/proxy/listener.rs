//! The client-facing listener: HTTP/1.1 and HTTP/2 on one port, in clear
//! text or over TLS (ALPN picks the protocol).

use super::Proxy;
use super::conn::{ConnTimeouts, TimedIo};
use super::headers::{ClientInfo, HostMemo};
use super::pipeline::{self, ClientConn, ConnActivity};
use crate::json_error::JsonError;
use crate::server::{Accepted, Drain, DrainWatcher, accept_loop, executor};
use crate::tls::{HandshakeError, Terminator};
use http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
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

/// Serve until `shutdown`, then drain for up to the grace period.
pub(super) async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    cfg: ServerConfig,
    tls: Option<Arc<Terminator>>,
    shutdown: CancellationToken,
) {
    let snapshot = proxy.live.snapshot();
    let limits = &snapshot.settings.limits;
    let timeouts = ConnTimeouts {
        header_read: limits.header_read_timeout,
        idle: limits.idle_timeout,
    };
    let mut builder = auto::Builder::new(executor());
    builder
        .http1()
        .timer(TokioTimer::new())
        // TimedIo enforces header-read and idle deadlines; hyper's own timer
        // would conflate the two.
        .header_read_timeout(None)
        .writev(false)
        .keep_alive(true)
        .max_buf_size(limits.max_header_bytes.max(8192) * 4);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(u32::try_from(limits.max_header_bytes * 2).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    if !cfg.http2 {
        builder = builder.http1_only();
    }

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
            let conn = Connection {
                proxy: proxy.clone(),
                builder: builder.clone(),
                watcher: drain.watcher(),
                timeouts,
                peer,
            };
            let tls = tls.clone();
            let shutdown = shutdown.clone();
            proxy.clients.opened();
            tokio::spawn(async move {
                let proxy = conn.proxy.clone();
                match tls {
                    None => conn.serve(stream, false).await,
                    Some(tls) => {
                        let accepted = tokio::select! {
                            () = shutdown.cancelled() => None,
                            r = tls.accept(stream) => Some(r),
                        };
                        match accepted {
                            Some(Ok(stream)) => conn.serve(stream, true).await,
                            Some(Err(HandshakeError::PlainHttp(stream))) => {
                                refuse(stream, &plain_http()).await;
                            }
                            Some(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            }
                            None => {}
                        }
                    }
                }
                proxy.clients.closed();
                drop(permit);
            });
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
    if tokio::time::timeout(cfg.shutdown_grace, drain.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing remaining connections");
    }
}

/// Everything a client connection needs once it is past the cap (and TLS).
struct Connection {
    proxy: Arc<Proxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: DrainWatcher,
    timeouts: ConnTimeouts,
    peer: SocketAddr,
}

impl Connection {
    /// Serve HTTP on `stream` until the client leaves or shutdown drains it.
    async fn serve<S>(self, stream: S, tls: bool)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = ConnActivity::new(self.proxy.pipeline.limit.clone());
        // Owned by the pipeline, which hyper calls from this connection's task only.
        let client = ClientConn {
            info: ClientInfo::new(self.peer, tls),
            hosts: HostMemo::default(),
        };
        let svc = pipeline::connection(&self.proxy.pipeline, client, activity.clone());
        let io = TokioIo::new(TimedIo::new(stream, activity, self.timeouts));
        let conn = self.builder.serve_connection(io, svc);
        if let Err(e) = self.watcher.watch(conn).await {
            tracing::debug!(peer = %self.peer, error = %e, "client connection ended with an error");
        }
    }
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
