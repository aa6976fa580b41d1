//! Keep-alive connections to one upstream: a bounded LIFO idle list.
//!
//! A connection goes back to the list only after its response body ended
//! cleanly (see `UpstreamBody`); any framing error, reset or early drop closes
//! it instead, so a confused connection is never reused.

use super::body::RequestBody;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;
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
    /// The TCP connect failed (refused, unreachable, out of descriptors...).
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    /// The HTTP/1 handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

/// A connection checked out of the pool for one request.
pub struct Conn {
    pub(super) sender: http1::SendRequest<RequestBody>,
    reused: bool,
}

impl Conn {
    /// Whether this connection served an earlier request.
    pub fn is_reused(&self) -> bool {
        self.reused
    }
}

/// The idle connections to one upstream.
pub struct Pool {
    addr: SocketAddr,
    settings: PoolSettings,
    idle: Mutex<Vec<Idle>>,
}

impl Pool {
    /// An empty pool for `addr`.
    pub fn new(addr: SocketAddr, settings: PoolSettings) -> Pool {
        Pool {
            addr,
            settings,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Idle connections currently held.
    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    /// A ready connection: the most recently used idle one, or a new one.
    pub async fn checkout(&self) -> Result<Conn, ConnectError> {
        loop {
            let candidate = self.lock().pop();
            let Some(mut idle) = candidate else { break };
            if idle.sender.is_closed() || idle.since.elapsed() >= self.settings.idle_timeout {
                continue;
            }
            // A connection returned the instant its body ended may not have
            // been polled back to "ready" yet; waiting is a task hop, not I/O.
            if idle.sender.is_ready() || idle.sender.ready().await.is_ok() {
                return Ok(Conn {
                    sender: idle.sender,
                    reused: true,
                });
            }
        }
        self.connect().await
    }

    async fn connect(&self) -> Result<Conn, ConnectError> {
        let timeout = self.settings.connect_timeout;
        let stream = tokio::time::timeout(timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| ConnectError::Timeout(timeout))??;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(1024 * 1024)
            .handshake(TokioIo::new(stream))
            .await?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %addr, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Conn {
            sender,
            reused: false,
        })
    }

    /// Return a connection whose exchange finished cleanly.
    pub fn checkin(&self, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < self.settings.max_idle {
            idle.push(Idle {
                sender: conn.sender,
                since: Instant::now(),
            });
        }
    }

    /// Drop idle connections past their idle timeout (called periodically).
    pub fn evict_expired(&self) {
        let timeout = self.settings.idle_timeout;
        self.lock()
            .retain(|i| !i.sender.is_closed() && i.since.elapsed() < timeout);
    }
}
