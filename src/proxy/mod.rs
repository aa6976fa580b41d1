//! `shardgate proxy`: the data plane.
//!
//! | module | job |
//! |---|---|
//! | `lifecycle` | start (bind, first map, tasks), SIGHUP reload, drain on SIGTERM |
//! | `listener` | the client listener: HTTP/1.1 and HTTP/2, TLS, connection cap |
//! | `conn` | one connection's idle, header-read and write-stall deadlines |
//! | `pipeline` | the request path, stage by stage (its opening comment is the map) |
//! | `live` | the live map: one snapshot of table, settings and budget per request |
//! | `follow` | following coordinators: watch, poll, fail over, cache |
//! | `admin` | the admin listener: metrics, health, what the proxy believes |
//! | `headers`, `head`, `body`, `error` | header rules, the kept head copy, bodies, the proxy's answers |
//!
//! [`Proxy`] is what those share, handed to each part at start-up; none of
//! them reaches into another's state.

mod admin;
mod body;
mod conn;
pub mod error;
mod follow;
mod head;
pub(crate) mod headers;
mod lifecycle;
mod listener;
mod live;
mod memory;
mod pipeline;
mod settings;
mod stall;
mod upgrade;

pub use follow::WatchConfig;
pub use lifecycle::{ReloadError, Reread, RunningProxy, StartError, run, start};
pub use listener::ServerConfig;
pub use live::MapUpdate;
#[doc(hidden)]
pub use pipeline::bench;
pub use settings::{FailoverBuffer, Limits, ProxyConfig, RuntimeConfig, Timeouts, TopologySource};
pub use upgrade::UpgradeError;

use crate::routing::{PartitionMetrics, RouteTable};
use crate::telemetry::{Metrics, SpanSink, names};
use crate::tls::{HandshakeError, TlsError};
use crate::topology::TopologyFileError;
use live::LiveMap;
use metrics::{Counter, Gauge};
use pipeline::{Forwarder, Holds, InflightLimit};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Open client connections, for the gauge and the connection cap's sheds.
pub(crate) struct Clients {
    open: AtomicUsize,
    /// `shardgate_load_shed_total{reason="connections"}`
    shed: Counter,
    /// `shardgate_tls_handshake_failures_total{reason}`: what the log no
    /// longer says per connection (a peer can cause any number of them).
    handshake_failures: HandshakeFailures,
}

/// Failed TLS handshakes by reason.
pub(crate) struct HandshakeFailures {
    /// Not finished within `handshake_timeout`.
    timeout: Counter,
    /// Refused by rustls (bad hello, old version, missing client certificate).
    refused: Counter,
    /// Plain HTTP sent to the TLS port (answered with a 400).
    plain_http: Counter,
}

impl HandshakeFailures {
    fn count(&self, e: &HandshakeError) {
        match e {
            HandshakeError::Timeout(_) => &self.timeout,
            HandshakeError::Failed(_) => &self.refused,
            HandshakeError::PlainHttp(_) => &self.plain_http,
        }
        .increment(1);
    }
}

impl Clients {
    fn opened(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// Gauges sampled when metrics are scraped, not updated per request.
struct Sampled {
    inflight: Gauge,
    connections: Gauge,
}

/// The data plane's shared state.
pub struct Proxy {
    live: Arc<LiveMap>,
    pipeline: pipeline::Shared,
    clients: Clients,
    sampled: Sampled,
    registry: Arc<Metrics>,
}

impl Proxy {
    /// A proxy with no map yet; fails if the upstream TLS files are unusable.
    /// Sampled requests' spans go to `spans`, when given.
    pub fn new(
        config: &ProxyConfig,
        registry: Arc<Metrics>,
        spans: Option<SpanSink>,
    ) -> Result<Arc<Proxy>, TlsError> {
        let settings = config.runtime.clone();
        let r = &registry;
        let shed = |reason| r.counter(names::LOAD_SHED, &[("reason", reason)]);
        let live = Arc::new(LiveMap::new(
            settings.clone(),
            config.default_upstream_port,
            registry.clone(),
        )?);
        let replica_reads = |result| r.counter(names::REPLICA_READS, &[("result", result)]);
        let forwarder = Arc::new(Forwarder {
            live: live.clone(),
            clock: crate::clock::HlcClock::new(),
            holds: Holds::new(settings.failover_buffer.map_or(0, |b| b.max_requests)),
            metrics: pipeline::AttemptMetrics {
                budget_exhausted: r.counter(names::RETRY_BUDGET_EXHAUSTED, &[]),
                shed_upstream: shed("upstream_inflight"),
                shed_breaker: shed("breaker_open"),
                breaker_fail_open: r.counter(names::BREAKER_FAIL_OPEN, &[]),
                shed_descriptors: shed("descriptors"),
                replica_reads: pipeline::ReplicaReads {
                    served: replica_reads("served"),
                    too_stale: replica_reads("too_stale"),
                    token_not_applied: replica_reads("token_not_applied"),
                },
            },
        });
        let limit = Arc::new(InflightLimit::new(
            settings.limits.max_inflight,
            shed("inflight"),
            shed("memory"),
        ));
        limit.set_max_memory(settings.limits.max_memory_bytes);
        Ok(Arc::new(Proxy {
            pipeline: pipeline::Shared {
                live: live.clone(),
                forwarder,
                limit,
                unrouted: Arc::new(PartitionMetrics::new(registry.clone(), "none")),
                closing: Arc::default(),
                spans: spans.map(Arc::new),
            },
            clients: Clients {
                open: AtomicUsize::new(0),
                shed: shed("connections"),
                handshake_failures: {
                    let failed =
                        |reason| r.counter(names::TLS_HANDSHAKE_FAILURES, &[("reason", reason)]);
                    HandshakeFailures {
                        timeout: failed("timeout"),
                        refused: failed("refused"),
                        plain_http: failed("plain_http"),
                    }
                },
            },
            sampled: Sampled {
                inflight: r.gauge(names::INFLIGHT, &[]),
                connections: r.gauge(names::DOWNSTREAM_CONNECTIONS, &[]),
            },
            live,
            registry,
        }))
    }

    /// The routing table in force, if a map has been applied.
    pub fn table(&self) -> Option<Arc<RouteTable>> {
        self.live.table()
    }

    /// The epoch in force, if any.
    pub fn epoch(&self) -> Option<u64> {
        self.live.epoch()
    }

    /// The metrics registry.
    pub fn registry(&self) -> &Arc<Metrics> {
        &self.registry
    }

    /// Read `path` and offer the map in it (epoch fencing decides).
    pub fn load_topology_file(&self, path: &Path) -> Result<MapUpdate, TopologyFileError> {
        self.live.load_file(path)
    }

    /// Put new request-path settings in force (SIGHUP). Unusable upstream
    /// TLS files refuse the whole change.
    fn reconfigure(&self, settings: Arc<RuntimeConfig>) -> Result<(), TlsError> {
        let limits = (
            settings.limits.max_inflight,
            settings.failover_buffer.map_or(0, |b| b.max_requests),
            settings.limits.max_memory_bytes,
        );
        self.live.reconfigure(settings)?;
        self.pipeline.limit.set_max(limits.0);
        self.pipeline.limit.set_max_memory(limits.2);
        self.pipeline.forwarder.holds.set_max(limits.1);
        Ok(())
    }

    /// Refresh the gauges that are sampled rather than updated per request.
    fn refresh_gauges(&self) {
        self.sampled
            .inflight
            .set(self.pipeline.limit.inflight() as f64);
        self.sampled.connections.set(self.clients.open() as f64);
        self.live.refresh_gauges();
    }
}
