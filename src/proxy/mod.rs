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
mod head;
pub mod headers;
mod server;
mod service;
mod watch;

use crate::config::{ConfigErrors, ProxyConfig, ProxyOverrides, RuntimeConfig, TopologySource};
use crate::resilience::RetryBudget;
use crate::routing::{MapOrigin, PartitionMetrics, RouteTable};
use crate::telemetry::{Metrics, names};
use crate::tls::{ALPN_H1, ALPN_H2_H1, Terminator, TlsError};
use crate::topology::{Fence, ShardMap, TopologyFileError, read_topology_file};
use crate::upstream::{PoolSettings, UpstreamSettings, Upstreams};
use arc_swap::{ArcSwap, ArcSwapOption};
use conn::Admission;
use metrics::{Counter, Gauge};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// The epoch in force (0 before any map), for requests waiting on a newer one.
    epoch_tx: tokio::sync::watch::Sender<u64>,
    /// Wakes the coordinator watcher for an immediate fetch.
    refresh: tokio::sync::Notify,
    /// When the map in force was last confirmed, ms since `born` (lock-free age).
    confirmed_ms: AtomicU64,
    born: Instant,
    /// Writes held while their partition has no primary (failover buffering).
    held: Arc<tokio::sync::Semaphore>,
}

fn upstream_settings(rt: &RuntimeConfig) -> UpstreamSettings {
    UpstreamSettings {
        pool: PoolSettings {
            max_idle: rt.pool.max_idle,
            idle_timeout: rt.pool.idle_timeout,
            connect_timeout: rt.pool.connect_timeout,
        },
        breaker: rt.breaker.breaker,
        tls: rt.pool.tls.clone(),
    }
}

impl Proxy {
    /// A proxy with no map yet; fails if the upstream TLS files are unusable.
    pub fn new(config: &ProxyConfig, registry: Arc<Metrics>) -> Result<Arc<Proxy>, TlsError> {
        let rt = config.runtime.clone();
        Ok(Arc::new(Proxy {
            upstreams: Upstreams::new(upstream_settings(&rt), registry.clone())?,
            budget: ArcSwap::from_pointee(RetryBudget::new(rt.budget)),
            admission: Arc::new(Admission::new(rt.limits.max_inflight)),
            metrics: ProxyMetrics::new(registry),
            connections: AtomicUsize::new(0),
            default_port: config.default_upstream_port,
            routes: ArcSwapOption::empty(),
            status: Mutex::new(MapStatus::default()),
            epoch_tx: tokio::sync::watch::channel(0).0,
            refresh: tokio::sync::Notify::new(),
            confirmed_ms: AtomicU64::new(0),
            born: Instant::now(),
            held: Arc::new(tokio::sync::Semaphore::new(
                rt.failover_buffer.map_or(0, |b| b.max_requests),
            )),
            runtime: ArcSwap::new(rt),
        }))
    }

    /// Note that the source confirmed the map in force is current.
    pub fn confirm(&self) {
        let now = Instant::now();
        self.status().confirmed_at = Some(now);
        self.confirmed_ms.store(
            now.saturating_duration_since(self.born).as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    /// How long ago the map in force was confirmed by its source.
    pub fn map_age(&self) -> Duration {
        let confirmed = Duration::from_millis(self.confirmed_ms.load(Ordering::Relaxed));
        Instant::now()
            .saturating_duration_since(self.born)
            .saturating_sub(confirmed)
    }

    /// Ask the coordinator watcher to fetch the map now.
    pub fn request_refresh(&self) {
        self.refresh.notify_one();
    }

    /// Wait until a map newer than `epoch` is in force, or `until` passes.
    pub async fn newer_table(&self, epoch: u64, until: Instant) -> Option<Arc<RouteTable>> {
        let mut rx = self.epoch_tx.subscribe();
        let newer = tokio::time::timeout_at(until, rx.wait_for(|e| *e > epoch)).await;
        match newer {
            Ok(Ok(_)) => self.table(),
            _ => None,
        }
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
                drop(status);
                self.confirm();
                self.epoch_tx.send_replace(epoch);
                tracing::info!(epoch, previous = ?current, source, "shard map applied");
                MapUpdate::Applied
            }
            Fence::Unchanged => {
                drop(status);
                self.confirm();
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
    /// their own settings changed. Unusable upstream TLS files refuse the
    /// whole change.
    pub fn apply_runtime(&self, rt: Arc<RuntimeConfig>) -> Result<(), TlsError> {
        let rebuilt = self.upstreams.reconfigure(upstream_settings(&rt))?;
        let old = self.runtime.load_full();
        if old.failover_buffer != rt.failover_buffer {
            let want = rt.failover_buffer.map_or(0, |b| b.max_requests);
            let have = old.failover_buffer.map_or(0, |b| b.max_requests);
            if want > have {
                self.held.add_permits(want - have);
            } else {
                self.held.forget_permits(have - want);
            }
        }
        if old.budget != rt.budget {
            self.budget.store(Arc::new(RetryBudget::new(rt.budget)));
        }
        self.admission.set_max(rt.limits.max_inflight);
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
        Ok(())
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
    /// A TLS certificate, key or CA is unusable (exit 1).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Signal handlers could not be installed (exit 2).
    #[error("cannot install signal handlers")]
    Signals,
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
    /// What a reload replaces. Behind a lock so that a reload runs on a
    /// blocking thread: it reads files (which may sit on a slow or hung
    /// network mount) and parses and indexes maps of thousands of partitions,
    /// none of which may stall a thread that serves requests.
    reloadable: Arc<Mutex<Reloadable>>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// The part of a running proxy that SIGHUP re-reads.
struct Reloadable {
    config: ProxyConfig,
    /// TLS on the client listener and the admin listener, if configured.
    tls: Option<Arc<Terminator>>,
    admin_tls: Option<Arc<Terminator>>,
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
    let server = &config.server;
    let client_alpn = if server.http2 { ALPN_H2_H1 } else { ALPN_H1 };
    let tls = server
        .tls
        .as_ref()
        .map(|t| Terminator::new(t, client_alpn, server.tls_handshake_timeout))
        .transpose()?;
    let admin_tls = server
        .admin_tls
        .as_ref()
        .map(|t| Terminator::new(t, ALPN_H1, server.tls_handshake_timeout))
        .transpose()?;
    let proxy = Proxy::new(&config, Arc::new(Metrics::new()))?;
    let shutdown = CancellationToken::new();
    let coordinators: Vec<http::Uri> = config
        .topology_sources
        .iter()
        .filter_map(|s| match s {
            TopologySource::Coordinator(u) => Some(u.clone()),
            TopologySource::File(_) => None,
        })
        .collect();
    for source in &config.topology_sources {
        if let TopologySource::File(path) = source {
            proxy.load_topology_file(path)?;
        }
    }
    let mut tasks = Vec::new();
    if !coordinators.is_empty() {
        tasks.push(tokio::spawn(watch::follow(
            proxy.clone(),
            coordinators,
            config.watch.clone(),
            shutdown.clone(),
        )));
        let until = Instant::now() + config.watch.startup_wait;
        if proxy.newer_table(0, until).await.is_none() {
            match &config.watch.cache_file {
                Some(cache) if cache.exists() => match read_topology_file(cache) {
                    Ok(map) => {
                        tracing::warn!(cache = %cache.display(), epoch = map.epoch(),
                            "no coordinator answered; serving the cached map");
                        proxy.offer(map, &format!("cache {}", cache.display()));
                    }
                    Err(e) => {
                        tracing::error!("no coordinator answered and the cache is unusable: {e}");
                    }
                },
                _ => {
                    tracing::warn!("no coordinator answered yet; requests get 503 until one does");
                }
            }
        }
    }

    tasks.extend([
        tokio::spawn(server::serve(
            proxy.clone(),
            listener,
            config.server.clone(),
            tls.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(admin::serve(
            proxy.clone(),
            admin,
            admin_tls.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(housekeeping(proxy.clone(), shutdown.clone())),
    ]);
    tracing::info!(%addr, %admin_addr, tls = tls.is_some(), "proxy listening");
    Ok(RunningProxy {
        proxy,
        addr,
        admin_addr,
        reloadable: Arc::new(Mutex::new(Reloadable {
            config,
            tls,
            admin_tls,
        })),
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
    /// Re-read the config file (if any), the TLS certificates and the
    /// topology file on a blocking thread; an invalid config, certificate or
    /// map is refused whole and the old state kept. Established connections
    /// are untouched: new certificates apply to new handshakes.
    pub fn spawn_reload(
        &self,
        config_path: Option<PathBuf>,
        overrides: ProxyOverrides,
    ) -> JoinHandle<Result<(), ReloadError>> {
        let proxy = self.proxy.clone();
        let reloadable = self.reloadable.clone();
        tokio::task::spawn_blocking(move || {
            let mut state = reloadable.lock().unwrap_or_else(|e| e.into_inner());
            state.reload(&proxy, config_path.as_deref(), &overrides)
        })
    }

    /// Stop accepting, drain in-flight requests up to the grace period, stop.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

impl Reloadable {
    /// The reload itself; see [`RunningProxy::spawn_reload`].
    fn reload(
        &mut self,
        proxy: &Proxy,
        config_path: Option<&Path>,
        overrides: &ProxyOverrides,
    ) -> Result<(), ReloadError> {
        let new = match config_path {
            Some(path) => Some(ProxyConfig::load(Some(path), overrides)?),
            None => None,
        };
        let server = new.as_ref().map_or(&self.config.server, |n| &n.server);
        // Certificates first: they are the part most likely to be refused, and
        // nothing else may change if they are.
        for (terminator, spec, what) in [
            (&self.tls, &server.tls, "client listener"),
            (&self.admin_tls, &server.admin_tls, "admin listener"),
        ] {
            match (terminator, spec) {
                (Some(t), Some(spec)) => t.reload(Some(spec)).map_err(ReloadError::Tls)?,
                (Some(_), None) | (None, Some(_)) => {
                    tracing::warn!(
                        "TLS on the {what} switched on or off; that takes effect on restart"
                    );
                }
                (None, None) => {}
            }
        }
        if let Some(new) = new {
            if new.server.listen != self.config.server.listen
                || new.server.admin_listen != self.config.server.admin_listen
                || new.server.http2 != self.config.server.http2
                || new.server.workers != self.config.server.workers
            {
                tracing::warn!("listener settings changed; they take effect on restart");
            }
            proxy.apply_runtime(new.runtime.clone())?;
            self.config.runtime = new.runtime;
            self.config.topology_sources = new.topology_sources;
            self.config.server.tls = new.server.tls;
            self.config.server.admin_tls = new.server.admin_tls;
        }
        for source in &self.config.topology_sources {
            if let TopologySource::File(path) = source {
                proxy.load_topology_file(path)?;
            }
        }
        Ok(())
    }
}

/// A reload that was refused; the old state stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The config file is invalid.
    #[error("config refused:\n{0}")]
    Config(#[from] ConfigErrors),
    /// A TLS certificate, key or CA is unusable.
    #[error("TLS refused: {0}")]
    Tls(#[from] TlsError),
    /// The topology file is unusable.
    #[error("topology refused: {0}")]
    Topology(#[from] TopologyFileError),
}

/// The outcome of `job` once it ends; never, while there is none. The caller
/// replaces the finished handle.
async fn finished<T>(job: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match job {
        Some(j) => j.await,
        None => std::future::pending().await,
    }
}

/// Run until SIGTERM/SIGINT (drain, then return); SIGHUP reloads.
///
/// A reload still running at shutdown (say, stuck reading a file from a hung
/// mount) is left behind: the caller should not wait for blocking tasks when
/// it drops the runtime.
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
    let running = start(config).await?;
    ready(&running);
    // One reload at a time; SIGHUPs that arrive during one make one more.
    let mut reloading = None;
    let mut again = false;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                if reloading.is_some() {
                    again = true;
                } else {
                    reloading = Some(running.spawn_reload(config_path.clone(), overrides.clone()));
                }
            }
            done = finished(&mut reloading) => {
                match done {
                    Ok(Ok(())) => tracing::info!("reload complete"),
                    Ok(Err(e)) => tracing::error!("reload refused, previous state kept: {e}"),
                    Err(e) => tracing::error!("reload failed, previous state kept: {e}"),
                }
                reloading = std::mem::take(&mut again)
                    .then(|| running.spawn_reload(config_path.clone(), overrides.clone()));
            }
        }
    }
    tracing::info!("draining");
    running.shutdown().await;
    Ok(())
}
