//! Shard nodes as the data plane sees them: one `Upstream` per address, with
//! its connection pool, circuit breaker, latency estimate and in-flight count.

mod freshness;
mod latency;
mod pool;
mod request_body;
mod response_body;

pub use freshness::{Freshness, since_start_ms};
pub use latency::PeakEwma;
pub use pool::{Conn, ConnectError, Pool, PoolSettings};
pub use request_body::{Replayer, RequestBody, Upload};
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
    Client(#[source] Box<dyn std::error::Error + Send + Sync>),
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
    /// How far behind its primary it is, as far as the proxy knows.
    freshness: Freshness,
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
            freshness: Freshness::default(),
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

    /// How far behind its primary it is known to be.
    pub fn freshness(&self) -> &Freshness {
        &self.freshness
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::{Backoff, Jitter};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Notify;

    fn settings(max_idle: usize) -> UpstreamSettings {
        UpstreamSettings {
            pool: PoolSettings {
                max_idle,
                idle_timeout: Duration::from_secs(30),
                connect_timeout: Duration::from_secs(2),
            },
            breaker: crate::resilience::BreakerConfig {
                consecutive_failures: 5,
                failure_ratio: 2.0,
                window: Duration::from_secs(10),
                min_requests: 20,
                cool_down: Backoff {
                    base: Duration::from_secs(5),
                    max: Duration::from_secs(60),
                    jitter: Jitter::Equal,
                },
                half_open_probes: 1,
            },
            tls: None,
        }
    }

    /// A loopback node answering "ok"; `close` asks every client to hang up.
    async fn node(close: bool) -> (SocketAddr, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| async move {
                        let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
                        if close {
                            r.headers_mut()
                                .insert("connection", http::HeaderValue::from_static("close"));
                        }
                        Ok::<_, Infallible>(r)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    /// One GET through `u`, its body read to the end (which pools the connection).
    async fn get(u: &Arc<Upstream>, now: Instant) -> bool {
        let mut slot = Some(
            Request::get("/")
                .header("host", "node")
                .body(RequestBody::empty())
                .unwrap(),
        );
        let (resp, conn) = u.send(&mut slot, now).await.unwrap();
        let reused = conn.is_reused();
        let guard = u.try_begin(0).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let body = UpstreamBody::new(
            resp.into_body(),
            guard,
            conn,
            deadline,
            Instant::now(),
            None,
        );
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"ok");
        reused
    }

    fn factory(max_idle: usize) -> UpstreamFactory {
        UpstreamFactory::new(settings(max_idle), Arc::new(Metrics::new())).unwrap()
    }

    #[tokio::test]
    async fn a_connection_whose_response_ended_cleanly_is_used_again() {
        let (addr, accepted) = node(false).await;
        let u = factory(4).make(addr);
        assert!(!get(&u, Instant::now()).await, "the first is new");
        assert_eq!(u.pool().idle_counts().0, 1);
        assert!(get(&u, Instant::now()).await, "the second reuses it");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_idle_connection_past_its_timeout_is_not_used() {
        let (addr, accepted) = node(false).await;
        let u = factory(4).make(addr);
        get(&u, Instant::now()).await;
        let later = Instant::now() + Duration::from_secs(31);
        assert!(!get(&u, later).await, "expired: a new connection");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn no_connection_is_kept_beyond_max_idle_or_after_the_node_closed_it() {
        let (addr, accepted) = node(false).await;
        let u = factory(0).make(addr);
        get(&u, Instant::now()).await;
        assert_eq!(u.pool().idle_counts().0, 0);
        let (closing, closed) = node(true).await;
        let v = factory(4).make(closing);
        get(&v, Instant::now()).await;
        assert!(
            !get(&v, Instant::now()).await,
            "the node hung up: a new connection"
        );
        assert_eq!(closed.load(Ordering::SeqCst), 2);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_idle_for_a_while_is_parked_and_serves_again_on_its_socket() {
        let (addr, accepted) = node(false).await;
        let u = factory(4).make(addr);
        get(&u, Instant::now()).await;
        u.pool().sweep(Instant::now());
        assert_eq!(u.pool().idle_counts().1, 0, "just used: kept whole");
        u.pool().sweep(Instant::now() + Duration::from_secs(2));
        assert_eq!(u.pool().idle_counts().1, 1, "idle a while: parked");
        assert!(get(&u, Instant::now()).await, "the parked socket is reused");
        assert!(get(&u, Instant::now()).await, "and pooled again whole");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// A node that answers each connection's first request, then, once told
    /// (`hang_up`), sends `farewell` and closes it without having said it
    /// would (as a restarting node does); `gone` fires when it has.
    async fn node_that_hangs_up(farewell: &'static [u8]) -> (SocketAddr, Arc<Notify>, Arc<Notify>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (hang_up, gone) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let (told, telling) = (hang_up.clone(), gone.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (told, telling) = (told.clone(), telling.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    stream.write_all(ok).await.unwrap();
                    told.notified().await;
                    let _ = stream.write_all(farewell).await;
                    drop(stream);
                    telling.notify_one();
                });
            }
        });
        (addr, hang_up, gone)
    }

    #[tokio::test]
    async fn a_parked_connection_its_node_closed_or_spoke_on_is_replaced_unseen() {
        for farewell in [&b""[..], b"HTTP/1.1 408 Request Timeout\r\n\r\n"] {
            let (addr, hang_up, gone) = node_that_hangs_up(farewell).await;
            let u = factory(4).make(addr);
            get(&u, Instant::now()).await;
            u.pool().sweep(Instant::now() + Duration::from_secs(2));
            assert_eq!(u.pool().idle_counts().1, 1);
            hang_up.notify_one();
            gone.notified().await;
            // Let the runtime take in the socket's news (a yield polls the
            // IO driver).
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert!(
                !get(&u, Instant::now()).await,
                "a new connection answers, and the request does not fail"
            );
        }
    }

    #[tokio::test]
    async fn a_refused_connect_leaves_the_request_in_its_slot() {
        // Bound and not listening: connects are refused.
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let u = factory(4).make(held.local_addr().unwrap());
        let mut slot = Some(Request::new(RequestBody::empty()));
        let Err(err) = u.send(&mut slot, Instant::now()).await else {
            panic!("a refused connect cannot answer");
        };
        assert!(matches!(err, SendError::Connect(_)), "{err}");
        assert!(
            slot.is_some(),
            "nothing was sent: the request can go elsewhere"
        );
    }

    #[test]
    fn the_in_flight_limit_counts_guards_and_a_refusal_holds_nothing() {
        let u = factory(4).make("127.0.0.1:9".parse().unwrap());
        let a = u.try_begin(2).unwrap();
        let b = u.try_begin(2).unwrap();
        assert!(u.try_begin(2).is_none());
        assert_eq!(u.inflight(), 2);
        drop(a);
        let c = u.try_begin(2).expect("a slot was freed");
        assert!(u.try_begin(0).is_some(), "0 means no limit");
        drop((b, c));
        assert_eq!(u.inflight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_counted_over_the_last_minute() {
        let u = factory(4).make("127.0.0.1:9".parse().unwrap());
        u.count_attempt(AttemptOutcome::Ok);
        u.count_attempt(AttemptOutcome::Timeout);
        u.count_attempt(AttemptOutcome::ConnectError);
        assert_eq!(u.recent_failures(), 2);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(u.recent_failures(), 0);
    }
}
