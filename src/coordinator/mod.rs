//! `shardgate coordinator`: the control plane (SPEC §4).
//!
//! Heartbeats arrive over gRPC (`grpc`), the map is served over HTTP (`http`),
//! the rules live in `state` and persistence in `store`. This module wires
//! them: start-up from the store, the leader's sweep, followers' refresh.

mod grpc;
mod http;
mod limiter;
mod metric_handles;
mod settings;
pub mod state;
pub mod store;

pub use settings::{CoordinatorConfig, StoreUrl};

use crate::clock::{Hlc, HlcClock};
use crate::exit::{Exit, Failure};
use crate::server::{BindError, bind};
use crate::signals::{Signal, SignalError, Signals};
use crate::telemetry::{Metrics, names};
use crate::tls::{ALPN_H1, ALPN_H2, ServerTls, Terminator, TlsError};
use crate::topology::{InvalidTopology, NodeAddr, ShardMap, TopologyDoc, TopologyFileError};
use limiter::RateLimiter;
use metric_handles::CoordinatorMetrics;
use state::{ClusterState, Command, Heartbeat, NodeStatus, Rules, SweepReport};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use store::{Commit, EtcdStore, FileStore, PgStore, SharedStore, Store, StoreError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound (exit 2).
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Signal handlers could not be installed (exit 2).
    #[error(transparent)]
    Signals(#[from] SignalError),
    /// The store failed (exit 2).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No map to start from (exit 1).
    #[error("the store holds no cluster state and no --topology was given to start from")]
    NoTopology,
    /// The initial map is unusable (exit 1).
    #[error(transparent)]
    Topology(#[from] TopologyFileError),
    /// The store holds a map that breaks the rules (exit 1).
    #[error("stored map: {0}")]
    StoredMap(#[from] InvalidTopology),
    /// A TLS certificate, key or CA is unusable (exit 1).
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl Failure for StartError {
    fn exit(&self) -> Exit {
        match self {
            StartError::NoTopology
            | StartError::Topology(_)
            | StartError::StoredMap(_)
            | StartError::Tls(_) => Exit::Invalid,
            StartError::Bind(_) | StartError::Signals(_) | StartError::Store(_) => Exit::Runtime,
        }
    }
}

/// A heartbeat that was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// The state machine refused it (binding, too many strangers).
    #[error(transparent)]
    Refused(#[from] state::Refusal),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The coordinator's shared state.
pub struct Coordinator<S: Store> {
    cfg: CoordinatorConfig,
    store: S,
    state: Mutex<ClusterState>,
    /// The map as last committed to the store: what `GET /v1/cluster/topology`
    /// serves. The working state may already hold a newer epoch that is still
    /// being committed (and may lose the race to another coordinator); no
    /// client may see that one before it is durable.
    published: watch::Sender<Arc<TopologyDoc>>,
    /// The published map, validated: where heartbeat answers place nodes.
    committed: arc_swap::ArcSwap<ShardMap>,
    /// The recent changes of the published map, for the status page.
    changes: crate::status_page::Changes,
    /// The coordinator's HLC: advanced by what nodes report, sent back in
    /// every heartbeat answer.
    clock: HlcClock,
    leading: AtomicBool,
    limiter: RateLimiter,
    /// Topology watches held open; bounded so they never take every connection.
    watches: tokio::sync::Semaphore,
    metrics: CoordinatorMetrics,
}

/// Unix time in milliseconds, the coordinator's wall clock.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl<S: Store> Coordinator<S> {
    /// Load state from `store` (or initialise it from the configured map).
    pub async fn open(cfg: CoordinatorConfig, store: S) -> Result<Arc<Self>, StartError> {
        let now = Instant::now();
        let state = match store.load().await? {
            Some(p) => ClusterState::restore(&p, &cfg.id, now)?,
            None => {
                let path = cfg.topology.as_ref().ok_or(StartError::NoTopology)?;
                let map = crate::topology::read_topology_file(path)?;
                let state = ClusterState::new(map, &cfg.id, now);
                match store.commit(None, &state.persisted()).await? {
                    Commit::Won => state,
                    // Another coordinator initialised the shared store first.
                    Commit::Lost => {
                        let p = store.load().await?.ok_or(StartError::NoTopology)?;
                        ClusterState::restore(&p, &cfg.id, now)?
                    }
                }
            }
        };
        let (published, _) = watch::channel(Arc::new(state.doc()));
        let committed = arc_swap::ArcSwap::from_pointee(state.map().clone());
        let registry = Arc::new(Metrics::new());
        Ok(Arc::new(Coordinator {
            limiter: RateLimiter::new(cfg.max_heartbeats_per_second),
            watches: tokio::sync::Semaphore::new(cfg.max_watches),
            metrics: CoordinatorMetrics::new(registry),
            leading: AtomicBool::new(false),
            state: Mutex::new(state),
            published,
            committed,
            changes: crate::status_page::Changes::default(),
            clock: HlcClock::new(),
            store,
            cfg,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, ClusterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rules(&self) -> Rules {
        Rules {
            heartbeat_timeout: self.cfg.heartbeat_timeout,
            max_clock_skew: self.cfg.max_clock_skew,
            failover_hold_down: self.cfg.failover_hold_down,
            max_strangers: self.cfg.max_unknown_nodes,
            failover_max_lag: self.cfg.failover_max_lag,
        }
    }

    /// The epoch in force.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch()
    }

    /// Whether this coordinator currently leads.
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    fn publish(&self, doc: TopologyDoc) {
        self.published.send_if_modified(|current| {
            let newer = doc.cluster_epoch > current.cluster_epoch;
            if newer {
                match ShardMap::from_doc(&doc) {
                    Ok(map) => self.committed.store(Arc::new(map)),
                    // Every published doc came from a valid map.
                    Err(e) => tracing::error!("published map does not validate: {e}"),
                }
                self.changes.record(Some(current), &doc);
                *current = Arc::new(doc);
            }
            newer
        });
    }

    /// Where the committed map places the node at `addr`: its partition, and
    /// that map's epoch. Never a map still being committed, which could lose
    /// the race to another coordinator.
    pub fn placement(&self, addr: &NodeAddr) -> (Arc<ShardMap>, Option<u32>) {
        let map = self.committed.load_full();
        let index = map.partition_of(addr).map(|p| p.index);
        (map, index)
    }

    /// The lease to grant the node at `addr` with the answer to a heartbeat
    /// just recorded (SPEC §8; the reasoning is in `crate::lease`): only a
    /// leader grants one, and only to a node that both the map it serves and
    /// the one its sweep decides on (`primary_in_working`, read under the
    /// lock that recorded the heartbeat) name primary. A promotion changes
    /// the latter first, under that same lock, so a heartbeat racing a
    /// promotion never carries a lease past it.
    fn lease_for(&self, addr: &NodeAddr, primary_in_working: bool) -> Duration {
        let leads = self.store.shared().is_none() || self.is_leader();
        let served = self
            .committed
            .load()
            .partition_of(addr)
            .is_some_and(|p| p.primary == *addr);
        if leads && served && primary_in_working {
            self.cfg.lease
        } else {
            Duration::ZERO
        }
    }

    /// A reading of the coordinator's HLC, after taking `seen` into account.
    pub fn hlc(&self, seen: Option<Hlc>) -> Hlc {
        if let Some(seen) = seen
            && let Err(e) = self.clock.observe(seen)
        {
            tracing::debug!("node stamp not adopted: {e}");
        }
        self.clock.now()
    }

    /// The map last committed, and a way to wait for the next one.
    fn published(&self) -> watch::Receiver<Arc<TopologyDoc>> {
        self.published.subscribe()
    }

    /// Handle one validated heartbeat; the command to send back, and the
    /// lease the answer grants.
    pub async fn heartbeat(&self, hb: Heartbeat) -> Result<(Command, Duration), HeartbeatError> {
        let started = Instant::now();
        let replication = hb.replication;
        let now_ms = unix_ms();
        let rules = self.rules();
        let (mut command, persist, status, skew_ms, assignment, snapshot) = {
            let mut st = self.lock();
            let (command, persist) = st.heartbeat(&hb, started, now_ms, &rules)?;
            let node = st.nodes().find(|n| n.id == hb.node_id);
            let status = node.map_or(NodeStatus::Active, |n| n.status);
            let skew_ms = node.map_or(0, |n| n.skew_ms);
            let assignment = st.assignment_of(&hb.addr);
            let snapshot = persist.then(|| st.persisted());
            (command, persist, status, skew_ms, assignment, snapshot)
        };
        if let Some(shared) = self.store.shared() {
            shared
                .record_heartbeat(&hb, status, skew_ms, started.elapsed())
                .await?;
            if command == Command::Rebalance {
                match shared.claim_told(&hb.node_id, assignment).await {
                    Ok(true) => {}
                    // Another coordinator already told this node.
                    Ok(false) => command = Command::Continue,
                    // Unknown whether anyone told it: not now, and again on its
                    // next heartbeat. The heartbeat itself is answered.
                    Err(e) => {
                        tracing::warn!(node = %hb.node_id, "REBALANCE deferred: {e}");
                        self.lock().forget_told(&hb.node_id);
                        command = Command::Continue;
                    }
                }
            }
        }
        if let (true, Some(snapshot)) = (persist, snapshot) {
            self.store.save_nodes(&snapshot).await?;
        }
        // Only nodes the map names get a skew series: label values stay
        // bounded whatever ids strangers send.
        if assignment.partition.is_some() {
            self.set_skew(&hb.node_id, skew_ms);
            if let Some(r) = replication {
                self.set_lag(&hb.node_id, r);
            }
        }
        Ok((command, self.lease_for(&hb.addr, assignment.primary)))
    }

    fn set_lag(&self, node: &str, r: crate::replication::ReplicationReport) {
        let mut lag = self.metrics.lag.lock().unwrap_or_else(|e| e.into_inner());
        let (bytes, secs) = lag.entry(node.to_owned()).or_insert_with(|| {
            let r = &self.metrics.registry;
            (
                r.gauge(names::REPLICATION_LAG_BYTES, &[("node", node)]),
                r.gauge(names::REPLICATION_LAG_SECONDS, &[("node", node)]),
            )
        });
        bytes.set(r.lag_bytes as f64);
        secs.set(r.lag_ms as f64 / 1000.0);
    }

    fn set_skew(&self, node: &str, skew_ms: i64) {
        let mut skew = self.metrics.skew.lock().unwrap_or_else(|e| e.into_inner());
        let lazy = skew.entry(node.to_owned()).or_default();
        lazy.get(|| {
            self.metrics
                .registry
                .gauge(names::COORDINATOR_CLOCK_SKEW, &[("node", node)])
        })
        .set(skew_ms as f64 / 1000.0);
    }

    /// One round of the leader's duties: take the lead if free, refresh from
    /// a shared store, mark the dead, promote replicas, persist and announce.
    pub async fn sweep_once(&self) -> Result<Option<SweepReport>, StoreError> {
        // A coordinator that owns its store alone always leads.
        let shared = self.store.shared();
        let leading = match shared {
            Some(s) => s.lead().await?,
            None => true,
        };
        self.leading.store(leading, Ordering::SeqCst);
        self.metrics.leader.set(if leading { 1.0 } else { 0.0 });
        if shared.is_some() {
            self.refresh().await?;
        }
        if !leading {
            return Ok(None);
        }
        let stored: HashMap<_, _> = match shared {
            Some(s) => s.replication_progress().await?.into_iter().collect(),
            None => HashMap::new(),
        };
        let (report, before, snapshot) = {
            let mut st = self.lock();
            st.set_leader(&self.cfg.id);
            let before = st.epoch();
            let report = st.sweep(Instant::now(), &self.rules(), &|a| stored.get(a).copied());
            let snapshot = (!report.promotions.is_empty()).then(|| st.persisted());
            (report, before, snapshot)
        };
        // Before anything is published: whoever sees the new epoch must also
        // see the node counts that caused it.
        self.refresh_gauges();
        if !report.newly_dead.is_empty() {
            tracing::warn!(nodes = ?report.newly_dead, "nodes went silent: DEAD");
            if let Some(s) = shared {
                s.mark_dead(&report.newly_dead).await?;
            }
        }
        for p in &report.unavailable {
            tracing::error!(
                partition = p,
                "every node of the partition is dead; kept in the map"
            );
        }
        for (p, behind) in &report.too_far_behind {
            tracing::error!(
                partition = p,
                behind_ms = behind.as_millis() as u64,
                "primary is dead and its most caught-up replica is further behind than \
                 failover_max_lag: not promoted, so no acknowledged write is lost; the \
                 partition refuses writes until its primary returns, an operator changes \
                 the map, or failover_lagging = \"promote\" is chosen"
            );
        }
        for p in &report.available_again {
            tracing::info!(partition = p, "a node of the partition is alive again");
        }
        if !report.forgotten.is_empty() {
            tracing::info!(nodes = ?report.forgotten, "forgot silent nodes the map does not name");
        }
        if let Some(snapshot) = snapshot {
            match self.store.commit(Some(before), &snapshot).await? {
                Commit::Won => {
                    for p in &report.promotions {
                        tracing::warn!(partition = p.partition, from = %p.from, to = %p.to, epoch = p.epoch, "primary failed over");
                        let mut f = self
                            .metrics
                            .failovers
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        f.entry(p.partition)
                            .or_insert_with(|| {
                                self.metrics.registry.counter(
                                    names::COORDINATOR_FAILOVERS,
                                    &[("partition", &p.partition.to_string())],
                                )
                            })
                            .increment(1);
                    }
                    self.publish(snapshot.map);
                }
                Commit::Lost => {
                    // A newer leader changed the map first: ours was decided on
                    // stale state and is discarded.
                    tracing::warn!("promotion lost the epoch compare-and-set; reloading");
                    self.reload().await?;
                    self.refresh_gauges();
                }
            }
        }
        Ok(Some(report))
    }

    /// Replace in-memory state with the store's (after a lost race).
    async fn reload(&self) -> Result<(), StoreError> {
        if let Some(p) = self.store.load().await? {
            let restored = ClusterState::restore(&p, &p.map.master_node_id, Instant::now());
            if let Ok(mut fresh) = restored {
                let mut st = self.lock();
                // Keep what this coordinator heard directly.
                for n in st.nodes() {
                    if let Some(seen) = n.last_seen {
                        fresh.merge_remote(
                            &n.id,
                            n.addr,
                            seen.elapsed(),
                            n.usage,
                            n.skew_ms,
                            Instant::now(),
                        );
                    }
                }
                *st = fresh;
                let doc = st.doc();
                drop(st);
                self.publish(doc);
            }
        }
        Ok(())
    }

    /// Follow a shared store: adopt a newer map and every coordinator's heartbeats.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let Some(shared) = self.store.shared() else {
            return Ok(());
        };
        let remote = shared.remote_nodes().await?;
        let persisted = self.store.load().await?;
        let now = Instant::now();
        let mut st = self.lock();
        for n in remote {
            st.merge_remote(&n.id, n.addr, n.age, n.usage, n.skew_ms, now);
        }
        if let Some(p) = persisted {
            match st.adopt(&p) {
                Ok(true) => {
                    st.set_leader(&p.map.master_node_id);
                    let doc = st.doc();
                    drop(st);
                    self.publish(doc);
                }
                Ok(false) => {}
                Err(e) => tracing::error!("shared store holds an invalid map, ignored: {e}"),
            }
        }
        Ok(())
    }

    fn refresh_gauges(&self) {
        let counts = self.lock().status_counts();
        for (i, (_, n)) in counts.iter().enumerate() {
            self.metrics.nodes[i].set(*n as f64);
        }
        self.metrics
            .leader
            .set(if self.is_leader() { 1.0 } else { 0.0 });
    }
}

/// A started coordinator.
pub struct RunningCoordinator<S: Store> {
    /// Shared state.
    pub coordinator: Arc<Coordinator<S>>,
    /// HTTP address bound.
    pub http_addr: SocketAddr,
    /// gRPC address bound.
    pub grpc_addr: SocketAddr,
    /// TLS on the HTTP and gRPC listeners, if configured.
    tls: Vec<Arc<Terminator>>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl<S: Store> RunningCoordinator<S> {
    /// Re-read the TLS certificates (SIGHUP) on a blocking thread, so file
    /// reads never stall a runtime worker; new handshakes use them,
    /// established connections are untouched. On error the old ones stay.
    pub fn spawn_tls_reload(&self) -> JoinHandle<Result<(), TlsError>> {
        let tls = self.tls.clone();
        tokio::task::spawn_blocking(move || tls.iter().try_for_each(|t| t.reload(None)))
    }

    /// Stop serving and wait for the tasks to end.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The coordinator's two listeners, bound before anything else starts.
///
/// Binding first lets a supervisor (the demo) learn the gRPC address and hand
/// it to agents before the coordinator has a map to open.
pub struct Listeners {
    http: TcpListener,
    grpc: TcpListener,
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// Where the gRPC heartbeat service listens.
    pub grpc_addr: SocketAddr,
}

impl Listeners {
    /// Bind the configured HTTP and gRPC addresses.
    pub async fn bind(cfg: &CoordinatorConfig) -> Result<Self, StartError> {
        let (http, http_addr) = bind(cfg.http_listen).await?;
        let (grpc, grpc_addr) = bind(cfg.grpc_listen).await?;
        Ok(Listeners {
            http,
            grpc,
            http_addr,
            grpc_addr,
        })
    }
}

/// Bind the listeners, open the store and start every task.
pub async fn start<S: Store>(
    cfg: CoordinatorConfig,
    store: S,
) -> Result<RunningCoordinator<S>, StartError> {
    let listeners = Listeners::bind(&cfg).await?;
    start_on(cfg, store, listeners).await
}

/// Open the store and start every task on listeners bound earlier.
pub async fn start_on<S: Store>(
    cfg: CoordinatorConfig,
    store: S,
    listeners: Listeners,
) -> Result<RunningCoordinator<S>, StartError> {
    let Listeners {
        http,
        grpc: grpc_listener,
        http_addr,
        grpc_addr,
    } = listeners;
    let terminator = |spec: &Option<ServerTls>, alpn| {
        spec.as_ref()
            .map(|t| Terminator::new(t, alpn, TLS_HANDSHAKE_TIMEOUT))
            .transpose()
    };
    let http_tls = terminator(&cfg.http_tls, ALPN_H1)?;
    let grpc_tls = terminator(&cfg.grpc_tls, ALPN_H2)?;
    let coordinator = Coordinator::open(cfg, store).await?;
    let shutdown = CancellationToken::new();
    let mut tasks = vec![
        tokio::spawn(http::serve(
            coordinator.clone(),
            http,
            http_tls.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(grpc::serve(
            coordinator.clone(),
            grpc_listener,
            grpc_tls.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(sweeper(coordinator.clone(), shutdown.clone())),
        tokio::spawn(replication_recorder(coordinator.clone(), shutdown.clone())),
    ];
    if coordinator.store.shared().is_some() {
        tasks.push(tokio::spawn(follower(
            coordinator.clone(),
            shutdown.clone(),
        )));
    }
    let tls: Vec<_> = http_tls.into_iter().chain(grpc_tls).collect();
    tracing::info!(%http_addr, %grpc_addr, tls = !tls.is_empty(), epoch = coordinator.epoch(),
        "coordinator listening");
    Ok(RunningCoordinator {
        coordinator,
        http_addr,
        grpc_addr,
        tls,
        shutdown,
        tasks,
    })
}

/// The leader's loop; every coordinator runs it and only the leader acts.
async fn sweeper<S: Store>(c: Arc<Coordinator<S>>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(c.cfg.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match c.sweep_once().await {
            Ok(Some(_)) if last_prune.elapsed() > Duration::from_secs(60) => {
                last_prune = Instant::now();
                let Some(shared) = c.store.shared() else {
                    continue;
                };
                match shared.prune(c.cfg.heartbeat_retention).await {
                    Ok(n) if n > 0 => tracing::debug!(rows = n, "pruned heartbeat history"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("pruning heartbeat history failed: {e}"),
                }
            }
            Ok(_) => {}
            Err(e) => {
                c.leading.store(false, Ordering::SeqCst);
                tracing::error!("sweep failed: {e}");
            }
        }
    }
}

/// How often the replication rows are written, at most.
const REPLICATION_RECORD_PERIOD: Duration = Duration::from_secs(1);

/// Keeps the store's replication rows (`replication_logs`) current from the
/// heartbeats this coordinator hears: at most once a period, and only when a
/// row changed, so an idle cluster writes nothing and a busy one a row set a
/// second rather than one write per heartbeat.
async fn replication_recorder<S: Store>(c: Arc<Coordinator<S>>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(REPLICATION_RECORD_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Vec::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let rows = c.lock().replication();
        let now: Vec<_> = rows
            .iter()
            .map(|r| (r.source_addr, r.target_addr, r.report))
            .collect();
        if rows.is_empty() || now == last {
            continue;
        }
        match c.store.save_replication(&rows).await {
            Ok(()) => last = now,
            Err(e) => tracing::warn!("recording replication progress failed: {e}"),
        }
    }
}

/// Followers of a shared store pick up the leader's changes quickly, so
/// watches held open on any coordinator wake within a fraction of a second:
/// at once where the store can watch (etcd), else by polling.
async fn follower<S: Store>(c: Arc<Coordinator<S>>, shutdown: CancellationToken) {
    let Some(shared) = c.store.shared() else {
        return;
    };
    let period = c.cfg.sweep_interval.min(Duration::from_millis(250));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = shared.changed(period) => {}
        }
        if !c.is_leader()
            && let Err(e) = c.refresh().await
        {
            tracing::warn!("refresh from the shared store failed: {e}");
            // Not a busy loop while the store is away.
            tokio::time::sleep(period).await;
        }
    }
}

/// Deadline for a client to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve until SIGTERM/SIGINT; SIGHUP re-reads the TLS certificates.
async fn serve_until_stopped<S: Store>(signals: &mut Signals, running: &RunningCoordinator<S>) {
    while signals.recv().await == Signal::Reload {
        match running.spawn_tls_reload().await {
            Ok(Ok(())) => tracing::info!("reloaded TLS certificates"),
            Ok(Err(e)) => {
                tracing::error!("TLS reload refused; keeping the certificates in force: {e}");
            }
            Err(e) => {
                tracing::error!(
                    "TLS reload did not finish; keeping the certificates in force: {e}"
                );
            }
        }
    }
}

/// Open the configured store and run until SIGTERM/SIGINT; SIGHUP reloads certificates.
pub async fn run(
    cfg: CoordinatorConfig,
    ready: impl FnOnce(SocketAddr, SocketAddr),
) -> Result<(), StartError> {
    let mut signals = Signals::stop_and_reload()?;
    match cfg.store.clone() {
        StoreUrl::File(path) => serve_on(cfg, FileStore::new(path), &mut signals, ready).await,
        StoreUrl::Postgres(url) => {
            let store = PgStore::connect(&url, &cfg.id).await?;
            serve_on(cfg, store, &mut signals, ready).await
        }
        StoreUrl::Etcd(url) => {
            let store = EtcdStore::connect(&url, &cfg.id, cfg.heartbeat_timeout).await?;
            serve_on(cfg, store, &mut signals, ready).await
        }
    }
}

/// Serve on `store` until SIGTERM/SIGINT; a shared store's lead is given up
/// before the drain.
async fn serve_on<S: Store>(
    cfg: CoordinatorConfig,
    store: S,
    signals: &mut Signals,
    ready: impl FnOnce(SocketAddr, SocketAddr),
) -> Result<(), StartError> {
    let running = start(cfg, store).await?;
    ready(running.http_addr, running.grpc_addr);
    serve_until_stopped(signals, &running).await;
    if let Some(shared) = running.coordinator.store().shared() {
        shared.resign().await;
    }
    running.shutdown().await;
    Ok(())
}
