//! Shard nodes as the data plane sees them: one `Upstream` per address, with
//! its connection pool, circuit breaker, latency estimate and in-flight count.

mod latency;
mod pool;
mod request_body;
mod response_body;

pub use latency::PeakEwma;
pub use pool::{Conn, ConnectError, Pool, PoolSettings};
pub use request_body::{Replayer, RequestBody};
pub use response_body::UpstreamBody;

use crate::resilience::{
    Breaker, BreakerConfig, BreakerObserver, BreakerState, Counter as WindowCounter, RollingWindow,
};
use crate::telemetry::{Metrics, names};
use crate::tls::{ALPN_H1, ClientTls, Connector, TlsError};
use http::{Request, Response};
use hyper::body::Incoming;
use metrics::{Counter, Gauge};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::time::Instant;

/// Why a body stopped short.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client sent more than the configured body limit.
    #[error("request body exceeds the {limit}-byte limit")]
    TooLarge {
        /// The limit in force.
        limit: u64,
    },
    /// Reading the client's body failed (it went away or broke framing).
    #[error("client body: {0}")]
    Client(#[source] hyper::Error),
    /// A newer attempt took over this replayable body.
    #[error("request body was handed to a newer attempt")]
    Superseded,
    /// The upstream's response body failed mid-stream.
    #[error("upstream body: {0}")]
    Upstream(#[source] hyper::Error),
    /// The request's overall deadline passed while the response streamed.
    #[error("request deadline passed while streaming the response")]
    DeadlineExceeded,
}

/// How an attempt at an upstream ended, as `shardgate_upstream_attempts_total` labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A response that is not a failure.
    Ok,
    /// A response whose status counts as a failure.
    FailureStatus,
    /// No connection could be made.
    ConnectError,
    /// The exchange broke after the request was (maybe) sent.
    SendError,
    /// No response headers within the per-try timeout.
    Timeout,
}

impl AttemptOutcome {
    const ALL: [AttemptOutcome; 5] = [
        AttemptOutcome::Ok,
        AttemptOutcome::FailureStatus,
        AttemptOutcome::ConnectError,
        AttemptOutcome::SendError,
        AttemptOutcome::Timeout,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Ok => "ok",
            AttemptOutcome::FailureStatus => "failure_status",
            AttemptOutcome::ConnectError => "connect_error",
            AttemptOutcome::SendError => "send_error",
            AttemptOutcome::Timeout => "timeout",
        }
    }
}

struct BreakerMetrics {
    state: Gauge,
    to: [Counter; 3],
}

impl BreakerObserver for BreakerMetrics {
    fn transition(&self, to: BreakerState) {
        self.state.set(to as u8 as f64);
        self.to[to as usize].increment(1);
    }
}

/// One shard node.
pub struct Upstream {
    addr: SocketAddr,
    label: Arc<str>,
    pool: Pool,
    breaker: Breaker,
    latency: PeakEwma,
    inflight: AtomicUsize,
    attempts: [Counter; 5],
    /// Failed attempts over the last minute, for `/admin/upstreams`.
    recent_failures: RollingWindow,
}

/// Why an attempt produced no response. Where nothing was written, the
/// request is back in the caller's slot.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The slot held no request.
    #[error("no request to send")]
    Nothing,
    /// No connection; the request was not touched.
    #[error(transparent)]
    Connect(ConnectError),
    /// A fresh connection refused the request before writing it.
    #[error(transparent)]
    NotSent(hyper::Error),
    /// The exchange failed after the request was at least partly written.
    #[error(transparent)]
    Failed(hyper::Error),
}

/// Counts a request in flight at an upstream until dropped.
pub struct InflightGuard {
    upstream: Arc<Upstream>,
}

impl InflightGuard {
    /// The upstream being used.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.upstream.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upstream {
    fn new(
        addr: SocketAddr,
        settings: &UpstreamSettings,
        tls: Option<Arc<Connector>>,
        metrics: &Metrics,
    ) -> Upstream {
        let label: Arc<str> = addr.to_string().into();
        let l = &*label;
        let breaker_metrics = BreakerMetrics {
            state: metrics.gauge(names::BREAKER_STATE, &[("upstream", l)]),
            to: [
                BreakerState::Closed,
                BreakerState::HalfOpen,
                BreakerState::Open,
            ]
            .map(|s| {
                metrics.counter(
                    names::BREAKER_TRANSITIONS,
                    &[("upstream", l), ("to", s.as_str())],
                )
            }),
        };
        Upstream {
            addr,
            pool: Pool::new(addr, settings.pool, tls),
            breaker: Breaker::new(settings.breaker, Box::new(breaker_metrics)),
            latency: PeakEwma::default(),
            inflight: AtomicUsize::new(0),
            attempts: AttemptOutcome::ALL.map(|o| {
                metrics.counter(
                    names::UPSTREAM_ATTEMPTS,
                    &[("upstream", l), ("outcome", o.as_str())],
                )
            }),
            recent_failures: RollingWindow::new(60),
            label,
        }
    }

    /// The address dialled.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address as text (metrics label, admin output, optional response header).
    pub fn label(&self) -> &Arc<str> {
        &self.label
    }

    /// The connection pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The circuit breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The latency estimate.
    pub fn latency(&self) -> &PeakEwma {
        &self.latency
    }

    /// Requests in flight here (attempt start to response body end).
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Count an attempt's outcome.
    pub fn count_attempt(&self, outcome: AttemptOutcome) {
        self.attempts[outcome as usize].increment(1);
        if outcome != AttemptOutcome::Ok {
            self.recent_failures
                .add(WindowCounter::A, tokio::time::Instant::now());
        }
    }

    /// Failed attempts over the last minute.
    pub fn recent_failures(&self) -> u64 {
        self.recent_failures.totals(tokio::time::Instant::now()).0
    }

    /// Reserve an in-flight slot, unless `limit` (0 = none) is reached.
    pub fn try_begin(self: &Arc<Self>, limit: usize) -> Option<InflightGuard> {
        let before = self.inflight.fetch_add(1, Ordering::Relaxed);
        let guard = InflightGuard {
            upstream: self.clone(),
        };
        if limit != 0 && before >= limit {
            return None; // the guard's drop gives the slot back
        }
        Some(guard)
    }

    /// Send the request in `slot` on a pooled connection and drive it until
    /// the response head arrives; a stale pooled connection is replaced
    /// transparently because nothing was written to it. The request is taken
    /// from the slot only once a connection is ready, and put back whenever
    /// none of it was written. `now` is the send's time, recent enough to
    /// judge pooled connections' idle age by (it saves a clock read).
    ///
    /// A slot rather than a value: a request passed by value is stored twice
    /// in this future (argument and moved-into local), and every byte of the
    /// request future is copied when hyper moves it.
    pub async fn send(
        &self,
        slot: &mut Option<Request<RequestBody>>,
        now: Instant,
    ) -> Result<(Response<Incoming>, Conn), SendError> {
        loop {
            let mut conn = self.pool.checkout(now).await.map_err(SendError::Connect)?;
            tracing::trace!(upstream = %self.label, reused = conn.is_reused(), "connection checked out");
            let Some(req) = slot.take() else {
                return Err(SendError::Nothing);
            };
            let mut response = std::pin::pin!(conn.sender.try_send_request(req));
            let mut written = false;
            let result = std::future::poll_fn(|cx| {
                // The connection's IO runs here, in the request's own task.
                if written {
                    conn.poll_with(cx, |cx| response.as_mut().poll(cx))
                } else {
                    // This first drive writes the request: no response yet.
                    written = true;
                    conn.poll_waiting(cx, |cx| response.as_mut().poll(cx))
                }
            })
            .await;
            tracing::trace!(upstream = %self.label, ok = result.is_ok(), "exchange resolved");
            match result {
                Ok(resp) => return Ok((resp, conn)),
                Err(mut e) => {
                    let Some(back) = e.take_message() else {
                        return Err(SendError::Failed(e.into_error()));
                    };
                    *slot = Some(back);
                    if !conn.is_reused() {
                        return Err(SendError::NotSent(e.into_error()));
                    }
                }
            }
        }
    }
}

/// Per-upstream settings; a change replaces every upstream.
#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamSettings {
    /// Pooling.
    pub pool: PoolSettings,
    /// Breaker.
    pub breaker: BreakerConfig,
    /// TLS to shard nodes, if enabled.
    pub tls: Option<UpstreamTls>,
}

/// TLS to shard nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamTls {
    /// Verification roots and client identity.
    pub client: ClientTls,
    /// Name their certificates must carry; `None`: each node's IP address.
    pub server_name: Option<String>,
}

fn connector(settings: &UpstreamSettings) -> Result<Option<Arc<Connector>>, TlsError> {
    settings
        .tls
        .as_ref()
        .map(|t| Connector::new(&t.client, ALPN_H1, t.server_name.as_deref()))
        .transpose()
}

/// Makes upstreams under one set of settings.
///
/// Settings are fixed per upstream: a change of settings means a new factory,
/// and a routing table built with it makes every upstream afresh.
pub struct UpstreamFactory {
    settings: UpstreamSettings,
    tls: Option<Arc<Connector>>,
    metrics: Arc<Metrics>,
}

impl UpstreamFactory {
    /// A factory for `settings`; fails if the upstream TLS files are unusable.
    pub fn new(settings: UpstreamSettings, metrics: Arc<Metrics>) -> Result<Self, TlsError> {
        Ok(UpstreamFactory {
            tls: connector(&settings)?,
            settings,
            metrics,
        })
    }

    /// The settings every upstream it makes has.
    pub fn settings(&self) -> &UpstreamSettings {
        &self.settings
    }

    /// A new upstream for `addr`.
    pub fn make(&self, addr: SocketAddr) -> Arc<Upstream> {
        Arc::new(Upstream::new(
            addr,
            &self.settings,
            self.tls.clone(),
            &self.metrics,
        ))
    }

    /// Re-read the TLS files (a renewed CA or client certificate): new
    /// connections use them; pooled ones and breaker state stay.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        self.tls.as_ref().map_or(Ok(()), |tls| tls.reload())
    }
}
