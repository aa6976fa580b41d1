//! The coordinator's metric handles (SPEC §5), made once at start-up.

use super::state::NodeStatus;
use crate::telemetry::{Lazy, Metrics, names};
use metrics::{Counter, Gauge};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Coordinator metric handles.
pub(super) struct CoordinatorMetrics {
    pub(super) registry: Arc<Metrics>,
    pub(super) nodes: [Gauge; 3],
    pub(super) leader: Gauge,
    pub(super) heartbeats: HashMap<&'static str, Counter>,
    /// Watches held now (sampled when scraped).
    pub(super) watches: Gauge,
    /// Watches answered at once because too many were held.
    pub(super) watches_shed: Counter,
    pub(super) failovers: Mutex<HashMap<u32, Counter>>,
    pub(super) skew: Mutex<HashMap<String, Lazy<Gauge>>>,
    /// Replication lag per node: bytes, seconds.
    pub(super) lag: Mutex<HashMap<String, (Gauge, Gauge)>>,
}

/// Heartbeat results as `shardgate_coordinator_heartbeats_total` labels them.
const HEARTBEAT_RESULTS: [&str; 7] = [
    "ok",
    "invalid",
    "rate_limited",
    "unauthenticated",
    "store_error",
    "refused",
    "too_many_nodes",
];

impl CoordinatorMetrics {
    pub(super) fn new(registry: Arc<Metrics>) -> CoordinatorMetrics {
        let r = &registry;
        CoordinatorMetrics {
            nodes: [NodeStatus::Active, NodeStatus::Degraded, NodeStatus::Dead]
                .map(|s| r.gauge(names::COORDINATOR_NODES, &[("status", s.as_str())])),
            leader: r.gauge(names::COORDINATOR_IS_LEADER, &[]),
            heartbeats: HEARTBEAT_RESULTS
                .iter()
                .map(|res| {
                    (
                        *res,
                        r.counter(names::COORDINATOR_HEARTBEATS, &[("result", res)]),
                    )
                })
                .collect(),
            watches: r.gauge(names::COORDINATOR_WATCHES, &[]),
            watches_shed: r.counter(names::COORDINATOR_WATCHES_SHED, &[]),
            failovers: Mutex::new(HashMap::new()),
            skew: Mutex::new(HashMap::new()),
            lag: Mutex::new(HashMap::new()),
            registry,
        }
    }

    pub(super) fn heartbeat(&self, result: &'static str) {
        if let Some(c) = self.heartbeats.get(result) {
            c.increment(1);
        }
    }
}
