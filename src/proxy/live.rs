//! The live map: what every request reads, as one snapshot.
//!
//! A request takes one [`Snapshot`] when it arrives — the routing table, the
//! request path's settings and the retry budget — and keeps it to the end,
//! so it never sees a table from one map with settings from another, and a
//! swap never disturbs it. Every change (a new map, new settings) is computed
//! from the snapshot in force and stored under one lock, so no change can undo
//! another: a settings reload that rebuilds the table rebuilds it from the map
//! in force at that moment, never from one a concurrent map update replaced.
//!
//! [`MapNews`] is how requests that need a newer map (after a `421` from a
//! node that knows one, or a write held through a failover) ask for it and
//! wait for it.

use super::RuntimeConfig;
use crate::resilience::RetryBudget;
use crate::routing::{MapOrigin, RouteTable};
use crate::telemetry::{Metrics, names};
use crate::tls::TlsError;
use crate::topology::{Fence, ShardMap, TopologyFileError, read_topology_file};
use crate::upstream::UpstreamFactory;
use arc_swap::ArcSwap;
use metrics::{Counter, Gauge};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// Everything a request reads, taken once when it arrives.
pub(crate) struct Snapshot {
    /// The routing table, once a map has been applied.
    pub(crate) table: Option<Arc<RouteTable>>,
    /// The request path's settings.
    pub(crate) settings: Arc<RuntimeConfig>,
    /// The retry budget; it outlives map and settings changes unless its own
    /// settings change.
    pub(crate) budget: Arc<RetryBudget>,
}

/// Result of offering a map, as `shardgate_topology_updates_total` labels it.
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

/// What `/admin/topology` reports beyond the map itself.
#[derive(Clone, Debug, Default)]
pub(crate) struct MapStatus {
    /// The last refused or failed update, and when.
    pub(crate) last_error: Option<(String, SystemTime)>,
    /// When the map in force was last confirmed by its source.
    pub(crate) confirmed_at: Option<Instant>,
}

/// News of newer maps: how a request asks for one and waits for it.
pub(crate) struct MapNews {
    /// The epoch in force (0 before any map).
    epoch: watch::Sender<u64>,
    /// Wakes the coordinator follower for an immediate fetch.
    refresh: Notify,
}

impl MapNews {
    fn new() -> MapNews {
        MapNews {
            epoch: watch::channel(0).0,
            refresh: Notify::new(),
        }
    }

    /// Ask the follower to fetch the map now (a node told us ours is old).
    pub(crate) fn ask_for_refresh(&self) {
        self.refresh.notify_one();
    }

    /// Resolves when someone asks for a refresh.
    pub(crate) fn refresh_asked(&self) -> tokio::sync::futures::Notified<'_> {
        self.refresh.notified()
    }

    fn announce(&self, epoch: u64) {
        self.epoch.send_replace(epoch);
    }

    /// Whether a map newer than `epoch` arrives before `until`.
    async fn newer_than(&self, epoch: u64, until: Instant) -> bool {
        let mut rx = self.epoch.subscribe();
        matches!(
            tokio::time::timeout_at(until, rx.wait_for(|e| *e > epoch)).await,
            Ok(Ok(_))
        )
    }
}

/// What a change needs besides the snapshot in force.
struct Writer {
    /// Makes the upstreams of new tables, under the settings in force.
    factory: UpstreamFactory,
    default_port: u16,
    registry: Arc<Metrics>,
}

/// Map-update metric handles.
struct MapMetrics {
    updates: [Counter; 5],
    epoch: Gauge,
    age: Gauge,
}

/// The data plane's live map and settings.
pub(crate) struct LiveMap {
    current: ArcSwap<Snapshot>,
    /// Held by every change from reading the snapshot in force to storing the next.
    writer: Mutex<Writer>,
    news: MapNews,
    status: Mutex<MapStatus>,
    /// When the map in force was last confirmed, ms since `born` (lock-free age).
    confirmed_ms: AtomicU64,
    born: Instant,
    metrics: MapMetrics,
    /// The recent changes of the map in force, for the status page.
    changes: crate::status_page::Changes,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LiveMap {
    /// No map yet, `settings` in force; fails if the upstream TLS files are unusable.
    pub(crate) fn new(
        settings: Arc<RuntimeConfig>,
        default_port: u16,
        registry: Arc<Metrics>,
    ) -> Result<LiveMap, TlsError> {
        let factory = UpstreamFactory::new(settings.upstream.clone(), registry.clone())?;
        let r = &registry;
        Ok(LiveMap {
            current: ArcSwap::from_pointee(Snapshot {
                table: None,
                budget: Arc::new(RetryBudget::new(settings.budget)),
                settings,
            }),
            metrics: MapMetrics {
                updates: MapUpdate::LABELS
                    .map(|l| r.counter(names::TOPOLOGY_UPDATES, &[("result", l)])),
                epoch: r.gauge(names::TOPOLOGY_EPOCH, &[]),
                age: r.gauge(names::TOPOLOGY_AGE, &[]),
            },
            writer: Mutex::new(Writer {
                factory,
                default_port,
                registry,
            }),
            news: MapNews::new(),
            status: Mutex::new(MapStatus::default()),
            confirmed_ms: AtomicU64::new(0),
            born: Instant::now(),
            changes: crate::status_page::Changes::default(),
        })
    }

    /// The snapshot in force; a request keeps it to its end.
    #[inline]
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The routing table in force, if a map has been applied.
    pub(crate) fn table(&self) -> Option<Arc<RouteTable>> {
        self.current.load().table.clone()
    }

    /// The upstream the map in force binds to `addr`, if any.
    pub(crate) fn upstream_at(
        &self,
        addr: &crate::topology::NodeAddr,
    ) -> Option<Arc<crate::upstream::Upstream>> {
        let port = lock(&self.writer).default_port;
        self.current
            .load()
            .table
            .as_ref()?
            .upstream(addr.socket_addr(port))
    }

    /// The epoch in force, if any.
    pub(crate) fn epoch(&self) -> Option<u64> {
        self.current.load().table.as_ref().map(|t| t.epoch())
    }

    /// News of newer maps.
    pub(crate) fn news(&self) -> &MapNews {
        &self.news
    }

    /// What `/admin/topology` reports about updates.
    pub(crate) fn status(&self) -> MapStatus {
        lock(&self.status).clone()
    }

    /// Offer a validated map from `source`; epoch fencing decides (SPEC §2).
    ///
    /// Requests keep reading the old snapshot until the new one is stored, and
    /// in-flight requests finish on the one they took.
    /// The recent changes of the map in force, newest first.
    pub(crate) fn changes(&self) -> Vec<crate::status_page::Change> {
        self.changes.list()
    }

    pub(crate) fn offer(&self, map: ShardMap, source: &str) -> MapUpdate {
        let writer = lock(&self.writer);
        let now = self.current.load_full();
        let in_force = now.table.as_ref().map(|t| t.epoch());
        let result = match Fence::decide(in_force, map.epoch()) {
            Fence::Apply => {
                let epoch = map.epoch();
                let new_doc = map.to_doc();
                let old_doc = now.table.as_ref().map(|t| t.map().to_doc());
                self.changes.record(old_doc.as_ref(), &new_doc);
                let table = RouteTable::build(
                    Arc::new(map),
                    now.table.as_deref(),
                    &writer.factory,
                    writer.default_port,
                    &writer.registry,
                    MapOrigin {
                        source: source.to_owned(),
                        applied_at: Instant::now(),
                    },
                );
                self.current.store(Arc::new(Snapshot {
                    table: Some(Arc::new(table)),
                    settings: now.settings.clone(),
                    budget: now.budget.clone(),
                }));
                drop(writer);
                self.metrics.epoch.set(epoch as f64);
                self.confirm();
                self.news.announce(epoch);
                tracing::info!(epoch, previous = ?in_force, source, "shard map applied");
                MapUpdate::Applied
            }
            Fence::Unchanged => {
                drop(writer);
                self.confirm();
                MapUpdate::Unchanged
            }
            Fence::Stale => {
                drop(writer);
                let why = format!(
                    "epoch {} is older than {} in force",
                    map.epoch(),
                    in_force.unwrap_or_default()
                );
                self.note_refusal(source, &why);
                MapUpdate::RejectedStale
            }
        };
        self.metrics.updates[result as usize].increment(1);
        result
    }

    /// Record a map that could not be fetched or failed validation.
    pub(crate) fn refuse(&self, result: MapUpdate, source: &str, why: &str) {
        self.note_refusal(source, why);
        self.metrics.updates[result as usize].increment(1);
    }

    fn note_refusal(&self, source: &str, why: &str) {
        let msg = format!("refused map from {source}: {why}");
        tracing::warn!("{msg}");
        lock(&self.status).last_error = Some((msg, SystemTime::now()));
    }

    /// Read `path` and offer the map in it.
    pub(crate) fn load_file(&self, path: &Path) -> Result<MapUpdate, TopologyFileError> {
        let source = path.display().to_string();
        match read_topology_file(path) {
            Ok(map) => Ok(self.offer(map, &source)),
            Err(e) => {
                let kind = match e {
                    TopologyFileError::Read { .. } => MapUpdate::FetchError,
                    TopologyFileError::Invalid { .. } => MapUpdate::RejectedInvalid,
                };
                self.refuse(kind, &source, &e.to_string());
                Err(e)
            }
        }
    }

    /// Put new request-path settings in force (SIGHUP).
    ///
    /// Changed upstream settings make every upstream afresh (the table is
    /// rebuilt from the map in force); unchanged ones re-read the upstream TLS
    /// files. Unusable TLS files refuse the whole change.
    pub(crate) fn reconfigure(&self, settings: Arc<RuntimeConfig>) -> Result<(), TlsError> {
        let mut writer = lock(&self.writer);
        let now = self.current.load_full();
        let table = if *writer.factory.settings() == settings.upstream {
            writer.factory.reload_tls()?;
            now.table.clone()
        } else {
            writer.factory =
                UpstreamFactory::new(settings.upstream.clone(), writer.registry.clone())?;
            now.table.as_ref().map(|t| {
                Arc::new(RouteTable::build(
                    t.map().clone(),
                    None,
                    &writer.factory,
                    writer.default_port,
                    &writer.registry,
                    t.origin().clone(),
                ))
            })
        };
        let budget = if now.settings.budget == settings.budget {
            now.budget.clone()
        } else {
            Arc::new(RetryBudget::new(settings.budget))
        };
        self.current.store(Arc::new(Snapshot {
            table,
            settings,
            budget,
        }));
        Ok(())
    }

    /// Note that the source confirmed the map in force is current.
    pub(crate) fn confirm(&self) {
        let now = Instant::now();
        lock(&self.status).confirmed_at = Some(now);
        self.confirmed_ms.store(
            now.saturating_duration_since(self.born).as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    /// How long ago the map in force was confirmed by its source.
    pub(crate) fn age(&self) -> Duration {
        let confirmed = Duration::from_millis(self.confirmed_ms.load(Ordering::Relaxed));
        Instant::now()
            .saturating_duration_since(self.born)
            .saturating_sub(confirmed)
    }

    /// The snapshot of a map newer than `epoch`, if one is in force before `until`.
    pub(crate) async fn newer_than(&self, epoch: u64, until: Instant) -> Option<Arc<Snapshot>> {
        if self.news.newer_than(epoch, until).await {
            Some(self.snapshot())
        } else {
            None
        }
    }

    /// Refresh the sampled gauges (the map's age).
    pub(crate) fn refresh_gauges(&self) {
        if let Some(at) = lock(&self.status).confirmed_at {
            self.metrics.age.set(at.elapsed().as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxyOverrides;
    use crate::proxy::ProxyConfig;
    use std::sync::atomic::AtomicBool;

    fn map(epoch: u64) -> ShardMap {
        let text = format!(
            r#"{{"clusterEpoch":{epoch},"masterNodeId":"t","partitionCount":2,"partitions":[
            {{"partitionIndex":0,"primaryNodeIp":"127.0.0.1:1001","replicaNodeIps":["127.0.0.1:1002"],
             "hashRangeStart":"00000000","hashRangeEnd":"7fffffff"}},
            {{"partitionIndex":1,"primaryNodeIp":"127.0.0.1:1003","replicaNodeIps":[],
             "hashRangeStart":"80000000","hashRangeEnd":"ffffffff"}}]}}"#
        );
        ShardMap::from_json(text.as_bytes()).unwrap()
    }

    fn settings() -> Arc<RuntimeConfig> {
        let config = ProxyConfig::from_toml(
            "[topology]\nsources = [\"m.json\"]\n",
            "t",
            &ProxyOverrides::default(),
        )
        .unwrap();
        config.runtime
    }

    fn live() -> LiveMap {
        LiveMap::new(settings(), 80, Arc::new(Metrics::new())).unwrap()
    }

    fn with_idle(idle: usize) -> Arc<RuntimeConfig> {
        let mut s = (*settings()).clone();
        s.upstream.pool.max_idle = idle;
        Arc::new(s)
    }

    #[test]
    fn epochs_fence_offered_maps() {
        let live = live();
        assert_eq!(live.offer(map(5), "t"), MapUpdate::Applied);
        assert_eq!(live.offer(map(5), "t"), MapUpdate::Unchanged);
        assert_eq!(live.offer(map(4), "t"), MapUpdate::RejectedStale);
        assert_eq!(live.epoch(), Some(5));
        assert!(
            live.status()
                .last_error
                .is_some_and(|(m, _)| m.contains("older"))
        );
    }

    #[test]
    fn a_new_map_keeps_the_upstreams_of_nodes_it_keeps() {
        let live = live();
        live.offer(map(1), "t");
        let before = live.table().unwrap();
        live.offer(map(2), "t");
        let after = live.table().unwrap();
        for (a, b) in before.upstreams().iter().zip(after.upstreams()) {
            assert!(Arc::ptr_eq(a, b), "{} was made again", a.label());
        }
    }

    #[test]
    fn changed_upstream_settings_make_every_upstream_afresh_under_the_map_in_force() {
        let live = live();
        live.offer(map(3), "t");
        let before = live.snapshot();
        live.reconfigure(with_idle(1)).unwrap();
        let after = live.snapshot();
        let (b, a) = (
            before.table.as_ref().unwrap(),
            after.table.as_ref().unwrap(),
        );
        assert_eq!(a.epoch(), 3);
        assert!(
            b.upstreams()
                .iter()
                .zip(a.upstreams())
                .all(|(x, y)| !Arc::ptr_eq(x, y))
        );
        assert!(
            Arc::ptr_eq(&before.budget, &after.budget),
            "same budget settings"
        );
        assert_eq!(after.settings.upstream.pool.max_idle, 1);
    }

    /// Settings reloads and map updates race from two threads while a third
    /// watches the epoch: it must never go backwards, and the last map
    /// offered must be the one in force. (Before the live map, a reload
    /// rebuilt the table from the map it had read and stored it without the
    /// lock map updates held, undoing any map applied meanwhile.)
    #[test]
    fn a_settings_reload_never_undoes_a_newer_map() {
        const LAST: u64 = 3000;
        let live = live();
        live.offer(map(1), "t");
        let variants = [with_idle(1), with_idle(2)];
        let done = AtomicBool::new(false);
        let regressions = AtomicU64::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                for e in 2..=LAST {
                    live.offer(map(e), "t");
                }
                done.store(true, Ordering::SeqCst);
            });
            s.spawn(|| {
                let mut i = 0;
                while !done.load(Ordering::SeqCst) {
                    live.reconfigure(variants[i % 2].clone()).unwrap();
                    i += 1;
                }
            });
            s.spawn(|| {
                let mut seen = 0;
                while !done.load(Ordering::SeqCst) {
                    let e = live.epoch().unwrap_or(0);
                    if e < seen {
                        regressions.fetch_add(1, Ordering::SeqCst);
                    }
                    seen = seen.max(e);
                }
            });
        });
        assert_eq!(
            regressions.load(Ordering::SeqCst),
            0,
            "the epoch went backwards"
        );
        assert_eq!(live.epoch(), Some(LAST));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_for_a_newer_map_ends_when_one_is_applied_or_at_its_deadline() {
        let live = Arc::new(live());
        live.offer(map(7), "t");
        let until = Instant::now() + Duration::from_secs(2);
        assert!(
            live.newer_than(7, until).await.is_none(),
            "no newer map came"
        );
        let waiter = {
            let live = live.clone();
            tokio::spawn(async move {
                live.newer_than(7, Instant::now() + Duration::from_secs(2))
                    .await
                    .and_then(|s| s.table.as_ref().map(|t| t.epoch()))
            })
        };
        tokio::task::yield_now().await;
        live.offer(map(8), "t");
        assert_eq!(waiter.await.unwrap(), Some(8));
    }
}
