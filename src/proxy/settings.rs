//! The proxy's validated configuration, as the data plane runs on it.
//! (`crate::config` reads and checks the file; these are its results.)

use super::follow::WatchConfig;
use super::listener::ServerConfig;
use crate::resilience::{BreakerPolicy, BudgetConfig, RetryPolicy};
use crate::routing::RoutingConfig;
use crate::telemetry::LogConfig;
use crate::upstream::UpstreamSettings;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A validated proxy configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyConfig {
    /// Listeners.
    pub server: ServerConfig,
    /// Shard map sources, in order.
    pub topology_sources: Vec<TopologySource>,
    /// Port for node addresses without one.
    pub default_upstream_port: u16,
    /// Following coordinators.
    pub watch: WatchConfig,
    /// Logging.
    pub log: LogConfig,
    /// Where sampled traces are exported over OTLP, if anywhere.
    pub otlp: Option<crate::telemetry::OtlpConfig>,
    /// The request path's settings.
    pub runtime: Arc<RuntimeConfig>,
}

/// Everything the request path reads; swapped as a whole on reload.
#[derive(Clone, Debug, PartialEq)]
pub struct RuntimeConfig {
    /// Keys, keyless requests, read preference.
    pub routing: RoutingConfig,
    /// Client limits.
    pub limits: Limits,
    /// Upstream timeouts.
    pub timeouts: Timeouts,
    /// Retries.
    pub retry: RetryPolicy,
    /// Retry budget.
    pub budget: BudgetConfig,
    /// What counts as an upstream failure, and what to do when every breaker is open.
    pub breaker: BreakerPolicy,
    /// Every upstream's pool, breaker and TLS settings.
    pub upstream: UpstreamSettings,
    /// Share of successes written to the access log.
    pub access_log_sample: f64,
    /// Writes refused beyond this map age, if set.
    pub max_staleness: Option<Duration>,
    /// Failover buffering, if enabled.
    pub failover_buffer: Option<FailoverBuffer>,
}

/// Where a shard map is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopologySource {
    /// A JSON file, re-read on SIGHUP.
    File(PathBuf),
    /// A coordinator's base URL.
    Coordinator(http::Uri),
}

impl std::fmt::Display for TopologySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopologySource::File(p) => write!(f, "file {}", p.display()),
            TopologySource::Coordinator(u) => write!(f, "coordinator {u}"),
        }
    }
}

/// Client limits.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Request head size limit.
    pub max_header_bytes: usize,
    /// Request body size limit.
    pub max_body_bytes: u64,
    /// Client connection limit.
    pub max_connections: usize,
    /// Global in-flight request limit.
    pub max_inflight: usize,
    /// Per-upstream in-flight limit (0 = none).
    pub max_inflight_per_upstream: usize,
    /// Request head deadline.
    pub header_read_timeout: Duration,
    /// Idle connection lifetime.
    pub idle_timeout: Duration,
    /// Time a client may take nothing of a response before it is cut off.
    pub send_timeout: Duration,
    /// The process-wide memory bound in bytes (0 = none).
    pub max_memory_bytes: u64,
}

/// Upstream timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// One attempt until response headers.
    pub per_try: Duration,
    /// The whole request.
    pub overall: Duration,
}

/// Failover buffering, when enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailoverBuffer {
    /// Longest hold.
    pub max_wait: Duration,
    /// Concurrent holds.
    pub max_requests: usize,
}
