//! `shardgate proxy`: the data plane.
//!
//! `Proxy` holds what every request reads — the runtime config and the routing
//! table, each behind an `ArcSwap` so the hot path takes no lock and a request
//! keeps the versions it started with. `start` binds the listeners and spawns
//! the servers; `run` adds signal handling for the binary.

mod admin;
pub mod body;
mod conn;
pub mod error;
pub mod headers;
mod server;
mod service;

use crate::config::{ConfigErrors, ProxyConfig, ProxyOverrides, RuntimeConfig, TopologySource};
use crate::resilience::RetryBudget;
use crate::routing::{MapOrigin, PartitionMetrics, RouteTable};
use crate::telemetry::{Metrics, names};
use crate::topology::{Fence, ShardMap, TopologyFileError, read_topology_file};
use crate::upstream::{PoolSettings, UpstreamSettings, Upstreams};
use arc_swap::{ArcSwap, ArcSwapOption};
use conn::Admission;
use metrics::{Counter, Gauge};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Result of offering a map to the proxy, as `shardgate_topology_updates_total` labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapUpdate {
    /// A higher epoch replaced the map in force.
    Applied = 0,
    /// Same epoch as the map in force.
    Unchanged = 1,
    /// The map broke a rule and was refused.
    RejectedInvalid = 2,
    /// A lower epoch than the map in force; refused.
    RejectedStale = 3,
    /// The source could not be read.
    FetchError = 4,
}

impl MapUpdate {
    const LABELS: [&'static str; 5] = [
        "applied",
        "unchanged",
        "rejected_invalid",
        "rejected_stale",
        "fetch_error",
    ];
}

/// Proxy-wide metric handles, registered once.
pub(crate) struct ProxyMetrics {
    registry: Arc<Metrics>,
    budget_exhausted: Counter,
    shed_inflight: Counter,
    shed_connections: Counter,
    shed_upstream: Counter,
    shed_breaker: Counter,
    breaker_fail_open: Counter,
    updates: [Counter; 5],
    epoch: Gauge,
    age: Gauge,
    inflight: Gauge,
    connections: Gauge,
    unrouted: PartitionMetrics,
}

impl ProxyMetrics {
    fn new(registry: Arc<Metrics>) -> ProxyMetrics {
        let r = &registry;
        let shed = |reason| r.counter(names::LOAD_SHED, &[("reason", reason)]);
        ProxyMetrics {
            budget_exhausted: r.counter(names::RETRY_BUDGET_EXHAUSTED, &[]),
            shed_inflight: shed("inflight"),
            shed_connections: shed("connections"),
            shed_upstream: shed("upstream_inflight"),
            shed_breaker: shed("breaker_open"),
            breaker_fail_open: r.counter(names::BREAKER_FAIL_OPEN, &[]),
            updates: MapUpdate::LABELS
                .map(|l| r.counter(names::TOPOLOGY_UPDATES, &[("result", l)])),
            epoch: r.gauge(names::TOPOLOGY_EPOCH, &[]),
            age: r.gauge(names::TOPOLOGY_AGE, &[]),
            inflight: r.gauge(names::INFLIGHT, &[]),
            connections: r.gauge(names::DOWNSTREAM_CONNECTIONS, &[]),
            unrouted: PartitionMetrics::new(registry.clone(), "none"),
            registry,
        }
    }
}

/// What `/admin/topology` reports beyond the map itself.
#[derive(Clone, Debug, Default)]
pub struct MapStatus {
    /// The last refused or failed update, and when.
    pub last_error: Option<(String, std::time::SystemTime)>,
    /// When the map in force was last confirmed by its source.
    pub confirmed_at: Option<Instant>,
}

/// The data plane's shared state.
pub struct Proxy {
    runtime: ArcSwap<RuntimeConfig>,
    routes: ArcSwapOption<RouteTable>,
    upstreams: Upstreams,
    budget: ArcSwap<RetryBudget>,
    metrics: ProxyMetrics,
    admission: Arc<Admission>,
    connections: AtomicUsize,
    default_port: u16,
    status: Mutex<MapStatus>,
}

fn upstream_settings(rt: &RuntimeConfig) -> UpstreamSettings {
    UpstreamSettings {
        pool: PoolSettings {
            max_idle: rt.pool.max_idle,
            idle_timeout: rt.pool.idle_timeout,
            connect_timeout: rt.pool.connect_timeout,
        },
        breaker: rt.breaker.breaker,
    }
}

impl Proxy {
    /// A proxy with no map yet.
    pub fn new(config: &ProxyConfig, registry: Arc<Metrics>) -> Arc<Proxy> {
        let rt = config.runtime.clone();
        Arc::new(Proxy {
            upstreams: Upstreams::new(upstream_settings(&rt), registry.clone()),
            budget: ArcSwap::from_pointee(RetryBudget::new(rt.budget)),
            admission: Arc::new(Admission::new(rt.limits.max_inflight)),
            metrics: ProxyMetrics::new(registry),
            connections: AtomicUsize::new(0),
            default_port: config.default_upstream_port,
            routes: ArcSwapOption::empty(),
            status: Mutex::new(MapStatus::default()),
            runtime: ArcSwap::new(rt),
        })
    }

    fn status(&self) -> MutexGuard<'_, MapStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The routing table in force, if a map has been applied.
    pub fn table(&self) -> Option<Arc<RouteTable>> {
        self.routes.load_full()
    }

    /// The epoch in force, if any.
    pub fn epoch(&self) -> Option<u64> {
        self.routes.load().as_ref().map(|t| t.epoch())
    }

    /// The metrics registry.
    pub fn registry(&self) -> &Arc<Metrics> {
        &self.metrics.registry
    }

    /// Offer a validated map from `source`; epoch fencing decides (SPEC §2).
    ///
    /// Updates are serialised; requests keep reading the old table until the
    /// new one is stored, and in-flight requests finish on the one they took.
    pub fn offer(&self, map: ShardMap, source: &str) -> MapUpdate {
        let mut status = self.status();
        let current = self.epoch();
        let result = match Fence::decide(current, map.epoch()) {
            Fence::Apply => {
                let epoch = map.epoch();
                let table = RouteTable::build(
                    Arc::new(map),
                    &self.upstreams,
                    self.default_port,
                    &self.metrics.registry,
                    MapOrigin {
                        source: source.to_owned(),
                        applied_at: Instant::now(),
                    },
                );
                self.routes.store(Some(Arc::new(table)));
                self.metrics.epoch.set(epoch as f64);
                status.confirmed_at = Some(Instant::now());
                tracing::info!(epoch, previous = ?current, source, "shard map applied");
                MapUpdate::Applied
            }
            Fence::Unchanged => {
                status.confirmed_at = Some(Instant::now());
                MapUpdate::Unchanged
            }
            Fence::Stale => {
                let msg = format!(
                    "refused map from {source}: epoch {} is older than {} in force",
                    map.epoch(),
                    current.unwrap_or_default()
                );
                tracing::warn!("{msg}");
                status.last_error = Some((msg, std::time::SystemTime::now()));
                MapUpdate::RejectedStale
            }
        };
        self.metrics.updates[result as usize].increment(1);
        result
    }

    /// Record a map that could not be fetched or failed validation.
    pub fn refuse(&self, result: MapUpdate, source: &str, why: &str) {
        let msg = format!("refused map from {source}: {why}");
        tracing::warn!("{msg}");
        self.status().last_error = Some((msg, std::time::SystemTime::now()));
        self.metrics.updates[result as usize].increment(1);
    }

    /// Read `path` and offer the map in it.
    pub fn load_topology_file(&self, path: &Path) -> Result<MapUpdate, TopologyFileError> {
        let source = path.display().to_string();
        let map = match read_topology_file(path) {
            Ok(m) => m,
            Err(e) => {
                let kind = match e {
                    TopologyFileError::Read { .. } => MapUpdate::FetchError,
                    TopologyFileError::Invalid { .. } => MapUpdate::RejectedInvalid,
                };
                self.refuse(kind, &source, &e.to_string());
                return Err(e);
            }
        };
        Ok(self.offer(map, &source))
    }

    /// Swap in new runtime settings (SIGHUP); upstreams are rebuilt only when
    /// their own settings changed.
    pub fn apply_runtime(&self, rt: Arc<RuntimeConfig>) {
        let old = self.runtime.load_full();
        if old.budget != rt.budget {
            self.budget.store(Arc::new(RetryBudget::new(rt.budget)));
        }
        self.admission.set_max(rt.limits.max_inflight);
        let rebuilt = self.upstreams.reconfigure(upstream_settings(&rt));
        self.runtime.store(rt);
        if rebuilt && let Some(t) = self.table() {
            let table = RouteTable::build(
                t.map().clone(),
                &self.upstreams,
                self.default_port,
                &self.metrics.registry,
                t.origin().clone(),
            );
            self.routes.store(Some(Arc::new(table)));
        }
    }

    /// Refresh gauges that are sampled rather than updated per request.
    fn refresh_gauges(&self) {
        let m = &self.metrics;
        m.inflight.set(self.admission.inflight() as f64);
        m.connections
            .set(self.connections.load(std::sync::atomic::Ordering::Relaxed) as f64);
        if let Some(at) = self.status().confirmed_at {
            m.age.set(at.elapsed().as_secs_f64());
        }
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound (exit 2).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The initial topology file is unusable (exit 1).
    #[error(transparent)]
    Topology(#[from] TopologyFileError),
    /// Signal handlers could not be installed (exit 2).
    #[error("cannot install signal handlers")]
    Signals,
    /// A source kind this build cannot use yet (exit 1).
    #[error("topology source {0} is not supported by this build")]
    Unsupported(String),
}

impl StartError {
    /// Whether the cause is the operator's input (exit 1) rather than the environment (exit 2).
    pub fn is_input_error(&self) -> bool {
        !matches!(self, StartError::Bind { .. } | StartError::Signals)
    }
}

/// A started proxy: its addresses and the handle to stop it.
pub struct RunningProxy {
    /// Shared state (tests read it; reloads go through it).
    pub proxy: Arc<Proxy>,
    /// The client-facing address actually bound.
    pub addr: SocketAddr,
    /// The admin address actually bound.
    pub admin_addr: SocketAddr,
    config: ProxyConfig,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Bind, load the initial map and start serving.
pub async fn start(config: ProxyConfig) -> Result<RunningProxy, StartError> {
    let listener = bind(config.server.listen).await?;
    let admin = bind(config.server.admin_listen).await?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.server.listen,
        source,
    })?;
    let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
        addr: config.server.admin_listen,
        source,
    })?;
    let proxy = Proxy::new(&config, Arc::new(Metrics::new()));
    for source in &config.topology_sources {
        match source {
            TopologySource::File(path) => {
                proxy.load_topology_file(path)?;
            }
            TopologySource::Coordinator(uri) => {
                return Err(StartError::Unsupported(uri.to_string()));
            }
        }
    }

    let shutdown = CancellationToken::new();
    let tasks = vec![
        tokio::spawn(server::serve(
            proxy.clone(),
            listener,
            config.server.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(admin::serve(proxy.clone(), admin, shutdown.clone())),
        tokio::spawn(housekeeping(proxy.clone(), shutdown.clone())),
    ];
    tracing::info!(%addr, %admin_addr, "proxy listening");
    Ok(RunningProxy {
        proxy,
        addr,
        admin_addr,
        config,
        shutdown,
        tasks,
    })
}

/// Periodic chores off the request path: histogram upkeep and idle-pool eviction.
async fn housekeeping(proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                proxy.metrics.registry.upkeep();
                proxy.upstreams.evict_idle();
            }
        }
    }
}

impl RunningProxy {
    /// Re-read the config file (if any) and the topology file; an invalid
    /// config or map is refused whole and the old state kept.
    pub fn reload(
        &mut self,
        config_path: Option<&Path>,
        overrides: &ProxyOverrides,
    ) -> Result<(), ReloadError> {
        if let Some(path) = config_path {
            let new = ProxyConfig::load(Some(path), overrides)?;
            if new.server != self.config.server {
                tracing::warn!("listener settings changed; they take effect on restart");
            }
            self.proxy.apply_runtime(new.runtime.clone());
            self.config.runtime = new.runtime;
            self.config.topology_sources = new.topology_sources;
        }
        for source in &self.config.topology_sources {
            if let TopologySource::File(path) = source {
                self.proxy.load_topology_file(path)?;
            }
        }
        Ok(())
    }

    /// Stop accepting, drain in-flight requests up to the grace period, stop.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// A reload that was refused; the old state stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The config file is invalid.
    #[error("config refused:\n{0}")]
    Config(#[from] ConfigErrors),
    /// The topology file is unusable.
    #[error("topology refused: {0}")]
    Topology(#[from] TopologyFileError),
}

/// Run until SIGTERM/SIGINT (drain, then return); SIGHUP reloads.
pub async fn run(
    config: ProxyConfig,
    config_path: Option<PathBuf>,
    overrides: ProxyOverrides,
    ready: impl FnOnce(&RunningProxy),
) -> Result<(), StartError> {
    use tokio::signal::unix::{SignalKind, signal};
    // Handlers go in before anything announces readiness: SIGHUP's default
    // action would otherwise kill a process that was just told to reload.
    let signals = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    );
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = signals else {
        return Err(StartError::Signals);
    };
    let mut running = start(config).await?;
    ready(&running);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match running.reload(config_path.as_deref(), &overrides) {
                Ok(()) => tracing::info!("reload complete"),
                Err(e) => tracing::error!("reload refused, previous state kept: {e}"),
            },
        }
    }
    tracing::info!("draining");
    running.shutdown().await;
    Ok(())
}
