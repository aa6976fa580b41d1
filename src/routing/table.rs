//! The routing table: a validated shard map bound to live upstreams.
//!
//! A table is built whole and never changed; a new map makes a new table.
//! Building one has no side effect: upstreams the previous table already had
//! are carried over (their breakers, pools and latency estimates survive the
//! swap), and the others are made by the factory in force.

use super::RequestClass;
use crate::telemetry::{Lazy, Metrics, names};
use crate::topology::{NodeAddr, ShardMap};
use crate::upstream::{Upstream, UpstreamFactory};
use http::HeaderValue;
use metrics::{Counter, Histogram};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;

/// A node's role in its partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Takes writes.
    Primary,
    /// Serves reads.
    Replica,
}

impl Role {
    /// The `served_by` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

/// Who produced a response, as `served_by` labels it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServedBy {
    /// The partition's primary.
    Primary = 0,
    /// One of its replicas.
    Replica = 1,
    /// The proxy itself (an error).
    #[default]
    Proxy = 2,
}

impl From<Role> for ServedBy {
    fn from(r: Role) -> Self {
        match r {
            Role::Primary => ServedBy::Primary,
            Role::Replica => ServedBy::Replica,
        }
    }
}

const SERVED_BY: [&str; 3] = ["primary", "replica", "proxy"];

impl ServedBy {
    /// Its `served_by` label.
    pub fn label(self) -> &'static str {
        SERVED_BY[self as usize]
    }
}
const CLASSES: [&str; 2] = ["read", "write"];
const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Per-partition metric handles, registered on first use.
pub struct PartitionMetrics {
    metrics: Arc<Metrics>,
    label: Arc<str>,
    /// [class][code class][served_by]
    requests: [[[Lazy<Counter>; 3]; 5]; 2],
    /// [class]
    duration: [Lazy<Histogram>; 2],
    /// [reason]
    retries: [Lazy<Counter>; 2],
}

/// Why a request was sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    /// Another attempt at a node already tried (after backoff).
    Retry = 0,
    /// A first attempt at another node of the partition.
    Failover = 1,
}

impl PartitionMetrics {
    /// Handles for a partition labelled `label` (its index, or `none`).
    pub fn new(metrics: Arc<Metrics>, label: &str) -> PartitionMetrics {
        PartitionMetrics {
            metrics,
            label: label.into(),
            requests: Default::default(),
            duration: Default::default(),
            retries: Default::default(),
        }
    }

    /// Count an answered request.
    pub fn request(&self, class: RequestClass, status: u16, served_by: ServedBy, secs: f64) {
        let code = (usize::from(status / 100)).clamp(1, 5) - 1;
        let c = class as usize;
        self.requests[c][code][served_by as usize]
            .get(|| {
                self.metrics.counter(
                    names::REQUESTS,
                    &[
                        ("partition", &self.label),
                        ("class", CLASSES[c]),
                        ("code", CODE_CLASSES[code]),
                        ("served_by", SERVED_BY[served_by as usize]),
                    ],
                )
            })
            .increment(1);
        self.duration[c]
            .get(|| {
                self.metrics.histogram(
                    names::REQUEST_DURATION,
                    &[("partition", &self.label), ("class", CLASSES[c])],
                )
            })
            .record(secs);
    }

    /// Count a retry.
    pub fn retry(&self, reason: RetryReason) {
        let label = match reason {
            RetryReason::Retry => "retry",
            RetryReason::Failover => "failover",
        };
        self.retries[reason as usize]
            .get(|| {
                self.metrics.counter(
                    names::RETRIES,
                    &[("partition", &self.label), ("reason", label)],
                )
            })
            .increment(1);
    }
}

/// A partition bound to its upstreams.
pub struct RoutePartition {
    /// The partition's index.
    pub index: u32,
    /// `x-shardgate-partition` value, made once.
    pub index_header: HeaderValue,
    /// Takes writes.
    pub primary: Arc<Upstream>,
    /// Serve reads.
    pub replicas: Box<[Arc<Upstream>]>,
    /// Metric handles.
    pub metrics: Arc<PartitionMetrics>,
}

/// Where a table's map came from, for `/admin/topology`.
#[derive(Clone, Debug)]
pub struct MapOrigin {
    /// File path or URL.
    pub source: String,
    /// When the map was applied.
    pub applied_at: Instant,
}

/// A shard map bound to upstreams, swapped whole when the map changes.
pub struct RouteTable {
    map: Arc<ShardMap>,
    partitions: Box<[RoutePartition]>,
    /// (partition index, slot) sorted by index, for keyless routing.
    by_index: Box<[(u32, usize)]>,
    /// Every upstream the partitions use, sorted by address.
    upstreams: Box<[Arc<Upstream>]>,
    epoch_header: HeaderValue,
    origin: MapOrigin,
}

impl RouteTable {
    /// Bind `map` to upstreams, filling in `default_port` where the map gives
    /// none. A node `previous` has keeps its upstream; any other is made by
    /// `factory` (whose settings `previous`'s upstreams must share).
    pub fn build(
        map: Arc<ShardMap>,
        previous: Option<&RouteTable>,
        factory: &UpstreamFactory,
        default_port: u16,
        metrics: &Arc<Metrics>,
        origin: MapOrigin,
    ) -> RouteTable {
        let mut bound: HashMap<SocketAddr, Arc<Upstream>> = HashMap::new();
        let mut bind = |addr: &NodeAddr| {
            let sa = addr.socket_addr(default_port);
            bound
                .entry(sa)
                .or_insert_with(|| {
                    previous
                        .and_then(|t| t.upstream(sa))
                        .unwrap_or_else(|| factory.make(sa))
                })
                .clone()
        };
        let partitions: Box<[RoutePartition]> = map
            .partitions()
            .iter()
            .map(|p| RoutePartition {
                index: p.index,
                index_header: HeaderValue::from(p.index),
                primary: bind(&p.primary),
                replicas: p.replicas.iter().map(&mut bind).collect(),
                metrics: Arc::new(PartitionMetrics::new(metrics.clone(), &p.index.to_string())),
            })
            .collect();
        let mut upstreams: Vec<Arc<Upstream>> = bound.into_values().collect();
        upstreams.sort_by_key(|u| u.addr());
        let mut by_index: Vec<(u32, usize)> = partitions
            .iter()
            .enumerate()
            .map(|(slot, p)| (p.index, slot))
            .collect();
        by_index.sort_unstable();
        RouteTable {
            epoch_header: HeaderValue::from(map.epoch()),
            map,
            partitions,
            by_index: by_index.into(),
            upstreams: upstreams.into(),
            origin,
        }
    }

    /// The upstream for `addr`, if this table has one.
    pub fn upstream(&self, addr: SocketAddr) -> Option<Arc<Upstream>> {
        self.upstreams
            .binary_search_by_key(&addr, |u| u.addr())
            .ok()
            .map(|i| self.upstreams[i].clone())
    }

    /// Every node of the map once, sorted by address.
    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// The validated map.
    pub fn map(&self) -> &Arc<ShardMap> {
        &self.map
    }

    /// The map's epoch.
    pub fn epoch(&self) -> u64 {
        self.map.epoch()
    }

    /// `x-cluster-epoch` value, made once.
    pub fn epoch_header(&self) -> &HeaderValue {
        &self.epoch_header
    }

    /// Where the map came from and when it was applied.
    pub fn origin(&self) -> &MapOrigin {
        &self.origin
    }

    /// The partition owning ring position `pos`.
    #[inline]
    pub fn partition_for(&self, pos: u32) -> &RoutePartition {
        &self.partitions[self.map.slot_for(pos)]
    }

    /// The partition with index `index`, if the map has it.
    pub fn partition_by_index(&self, index: u32) -> Option<&RoutePartition> {
        let at = self
            .by_index
            .binary_search_by_key(&index, |(i, _)| *i)
            .ok()?;
        Some(&self.partitions[self.by_index[at].1])
    }

    /// All partitions, in ring order.
    pub fn partitions(&self) -> &[RoutePartition] {
        &self.partitions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::{Backoff, BreakerConfig, Jitter};
    use crate::upstream::{PoolSettings, UpstreamSettings};
    use std::time::Duration;

    fn factory() -> UpstreamFactory {
        UpstreamFactory::new(
            UpstreamSettings {
                pool: PoolSettings {
                    max_idle: 1,
                    idle_timeout: Duration::from_secs(1),
                    connect_timeout: Duration::from_secs(1),
                },
                breaker: BreakerConfig {
                    consecutive_failures: 1,
                    failure_ratio: 2.0,
                    window: Duration::from_secs(10),
                    min_requests: 1,
                    cool_down: Backoff {
                        base: Duration::from_secs(5),
                        max: Duration::from_secs(5),
                        jitter: Jitter::None,
                    },
                    half_open_probes: 1,
                },
                tls: None,
            },
            Arc::new(Metrics::new()),
        )
        .unwrap()
    }

    /// Partition 5 owns the low half, partition 2 the high half; node
    /// 10.0.0.3 serves in both, and 10.0.0.1 has no port.
    fn map(epoch: u64) -> Arc<ShardMap> {
        let text = format!(
            r#"{{"clusterEpoch":{epoch},"masterNodeId":"m","partitionCount":2,"partitions":[
            {{"partitionIndex":2,"primaryNodeIp":"10.0.0.2:81","replicaNodeIps":["10.0.0.3:81"],
             "hashRangeStart":"80000000","hashRangeEnd":"ffffffff"}},
            {{"partitionIndex":5,"primaryNodeIp":"10.0.0.1","replicaNodeIps":["10.0.0.3:81"],
             "hashRangeStart":"00000000","hashRangeEnd":"7fffffff"}}]}}"#
        );
        Arc::new(ShardMap::from_json(text.as_bytes()).unwrap())
    }

    fn build(map: Arc<ShardMap>, previous: Option<&RouteTable>, f: &UpstreamFactory) -> RouteTable {
        let metrics = Arc::new(Metrics::new());
        let origin = MapOrigin {
            source: "test".into(),
            applied_at: Instant::now(),
        };
        RouteTable::build(map, previous, f, 8080, &metrics, origin)
    }

    #[test]
    fn positions_and_indexes_find_their_partitions() {
        let t = build(map(4), None, &factory());
        assert_eq!(t.epoch(), 4);
        assert_eq!(t.epoch_header(), "4");
        assert_eq!(t.partition_for(0).index, 5);
        assert_eq!(t.partition_for(u32::MAX).index, 2);
        assert_eq!(t.partition_by_index(2).unwrap().index_header, "2");
        assert!(t.partition_by_index(3).is_none());
        assert_eq!(
            t.partition_by_index(5).unwrap().primary.addr(),
            "10.0.0.1:8080".parse().unwrap(),
            "the default port fills in"
        );
    }

    #[test]
    fn a_node_in_two_partitions_is_one_upstream() {
        let t = build(map(1), None, &factory());
        assert_eq!(t.upstreams().len(), 3);
        let shared_low = &t.partition_by_index(5).unwrap().replicas[0];
        let shared_high = &t.partition_by_index(2).unwrap().replicas[0];
        assert!(
            Arc::ptr_eq(shared_low, shared_high),
            "one breaker, one pool"
        );
        let addrs: Vec<_> = t.upstreams().iter().map(|u| u.addr()).collect();
        let mut sorted = addrs.clone();
        sorted.sort();
        assert_eq!(addrs, sorted);
    }

    #[test]
    fn a_new_table_keeps_the_state_of_nodes_it_keeps() {
        let f = factory();
        let old = build(map(1), None, &f);
        // The breaker of a node opens under the old table...
        let node = old.partition_by_index(2).unwrap().primary.clone();
        node.breaker()
            .try_acquire()
            .unwrap()
            .failure(Instant::now());
        // ...and is still open under the next one.
        let new = build(map(2), Some(&old), &f);
        let same = &new.partition_by_index(2).unwrap().primary;
        assert!(Arc::ptr_eq(&node, same));
        assert!(same.breaker().try_acquire().is_none());
        let fresh = build(map(3), None, &f);
        assert!(
            fresh
                .partition_by_index(2)
                .unwrap()
                .primary
                .breaker()
                .try_acquire()
                .is_some()
        );
    }
}
