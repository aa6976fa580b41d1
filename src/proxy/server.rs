//! The client-facing listener: HTTP/1.1 and cleartext HTTP/2 on one port.

use super::Proxy;
use super::conn::{ConnActivity, ConnTimeouts, TimedIo};
use super::service::ClientConn;
use crate::config::ServerConfig;
use crate::proxy::headers::ClientInfo;
use crate::server::{Accepted, accept_loop, executor};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

    let graceful = GracefulShutdown::new();
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
            let activity = ConnActivity::new(proxy.admission.clone());
            let client = Arc::new(ClientConn {
                info: ClientInfo::new(peer, false),
                activity: activity.clone(),
            });
            let io = TokioIo::new(TimedIo::new(stream, activity, timeouts));
            let p = proxy.clone();
            let svc = hyper::service::service_fn(move |req| p.clone().handle(req, client.clone()));
            let conn = builder.serve_connection(io, svc).into_owned();
            let watched = graceful.watch(conn);
            let proxy = proxy.clone();
            proxy.connections.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                if let Err(e) = watched.await {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
                proxy.connections.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        },
        |stream| {
            proxy.metrics.shed_connections.increment(1);
            if let Ok(slot) = responders.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse_overloaded(stream).await;
                    drop(slot);
                });
            }
        },
    )
    .await;
    drop(listener);
    if tokio::time::timeout(cfg.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing remaining connections");
    }
}

/// Answer a connection over the cap with `503 overloaded` without parsing it.
async fn refuse_overloaded(mut stream: TcpStream) {
    const BODY: &str = r#"{"error":"overloaded","message":"overloaded: too many client connections","partition":null}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         x-shardgate-error: overloaded\r\nretry-after: 1\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n",
        BODY.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(BODY.as_bytes()).await?;
        stream.shutdown().await?;
        // Drain briefly so closing with unread input does not reset the
        // connection before the client reads the answer.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}
