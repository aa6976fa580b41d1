//! The client-facing listener: HTTP/1.1 and HTTP/2 on one port, in clear
//! text or over TLS (ALPN picks the protocol).

use super::Proxy;
use super::conn::{ConnActivity, ConnTimeouts, TimedIo};
use super::service::ClientConn;
use crate::config::ServerConfig;
use crate::proxy::headers::{ClientInfo, HostMemo};
use crate::server::{Accepted, Drain, DrainWatcher, accept_loop, executor};
use crate::tls::{HandshakeError, Terminator};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

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
    let rt = proxy.runtime.load_full();
    let limits = &rt.limits;
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
            proxy.connections.fetch_add(1, Ordering::Relaxed);
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
                                refuse(stream, PLAIN_HTTP).await;
                            }
                            Some(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            }
                            None => {}
                        }
                    }
                }
                proxy.connections.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        },
        |stream| {
            proxy.metrics.shed_connections.increment(1);
            if let Ok(slot) = responders.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream, OVERLOADED).await;
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
        let activity = ConnActivity::new(self.proxy.admission.clone());
        // Owned by the service, which hyper calls from this connection's task only.
        let client = ClientConn {
            info: ClientInfo::new(self.peer, tls),
            activity: activity.clone(),
            hosts: HostMemo::default(),
        };
        let io = TokioIo::new(TimedIo::new(stream, activity, self.timeouts));
        let proxy = self.proxy;
        let svc = hyper::service::service_fn(move |req| proxy.clone().handle(req, &client));
        let conn = self.builder.serve_connection(io, svc);
        if let Err(e) = self.watcher.watch(conn).await {
            tracing::debug!(peer = %self.peer, error = %e, "client connection ended with an error");
        }
    }
}

/// A canned answer for a connection that is refused before HTTP parsing.
struct Refusal {
    status: &'static str,
    code: &'static str,
    message: &'static str,
}

const OVERLOADED: Refusal = Refusal {
    status: "503 Service Unavailable",
    code: "overloaded",
    message: "overloaded: too many client connections",
};

const PLAIN_HTTP: Refusal = Refusal {
    status: "400 Bad Request",
    code: "bad_request",
    message: "plain HTTP sent to a TLS port; use https",
};

/// Answer `stream` with `r` without parsing what it sent, then close.
async fn refuse(mut stream: TcpStream, r: Refusal) {
    let body = format!(
        r#"{{"error":"{}","message":"{}","partition":null}}"#,
        r.code, r.message
    );
    let retry = if r.code == OVERLOADED.code {
        "retry-after: 1\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {}\r\ncontent-type: application/json\r\n\
         x-shardgate-error: {}\r\n{retry}connection: close\r\n\
         content-length: {}\r\n\r\n",
        r.status,
        r.code,
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        // Drain briefly so closing with unread input does not reset the
        // connection before the client reads the answer.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}
