//! The coordinator's validated configuration (`crate::config` reads and
//! checks the file; this is its result).

use crate::secret::Secret;
use crate::telemetry::LogFormat;
use crate::tls::ServerTls;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where the coordinator keeps its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// A local JSON state file, written atomically.
    File(PathBuf),
    /// A PostgreSQL connection string.
    Postgres(String),
    /// An etcd cluster and key prefix.
    Etcd(super::store::EtcdUrl),
}

impl StoreUrl {
    /// `file:PATH`, `postgres://...` or `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`.
    pub fn parse(s: &str) -> Result<StoreUrl, String> {
        if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err("file: needs a path".into());
            }
            Ok(StoreUrl::File(PathBuf::from(path)))
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(StoreUrl::Postgres(s.to_owned()))
        } else if s.starts_with("etcd://") {
            super::store::EtcdUrl::parse(s).map(StoreUrl::Etcd)
        } else {
            Err(format!(
                "{s:?}: expected file:PATH, postgres://... or etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"
            ))
        }
    }
}

/// A validated coordinator configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct CoordinatorConfig {
    /// Coordinator id.
    pub id: String,
    /// HTTP listener.
    pub http_listen: SocketAddr,
    /// gRPC listener.
    pub grpc_listen: SocketAddr,
    /// Initial map file.
    pub topology: Option<PathBuf>,
    /// The store.
    pub store: StoreUrl,
    /// Silence before DEAD.
    pub heartbeat_timeout: Duration,
    /// Sweep period.
    pub sweep_interval: Duration,
    /// Skew before DEGRADED.
    pub max_clock_skew: Duration,
    /// Failover hold-down.
    pub failover_hold_down: Duration,
    /// `Some`: never promote a replica further behind its dead primary (CP);
    /// `None`: promote the most caught-up however far behind (AP).
    pub failover_max_lag: Option<Duration>,
    /// The lease a primary's heartbeat answer grants (SPEC §8; always
    /// shorter than `heartbeat_timeout` with the drift margin of
    /// `crate::lease`).
    pub lease: Duration,
    /// Watch limit.
    pub watch_timeout: Duration,
    /// Per-node heartbeat rate.
    pub max_heartbeats_per_second: u32,
    /// Nodes the map does not name that may be registered at once.
    pub max_unknown_nodes: usize,
    /// Connections the HTTP API holds at once.
    pub http_max_connections: usize,
    /// Topology watches held at once; more are answered at once.
    pub max_watches: usize,
    /// PUT token (empty: changes refused).
    pub admin_token: Secret,
    /// Heartbeat token (empty: none required).
    pub heartbeat_token: Secret,
    /// Heartbeat history retention.
    pub heartbeat_retention: Duration,
    /// TLS on the HTTP listener.
    pub http_tls: Option<ServerTls>,
    /// TLS on the gRPC listener.
    pub grpc_tls: Option<ServerTls>,
    /// Log level or filter.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
}
