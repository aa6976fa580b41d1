//! The routing table: a validated shard map bound to live upstreams, and the
//! choice of which nodes a request may try, in which order.

use super::{ReadPreference, RequestClass};
use crate::telemetry::{Lazy, Metrics, names};
use crate::topology::{Partition, ShardMap};
use crate::upstream::{Upstream, Upstreams};
use http::HeaderValue;
use metrics::{Counter, Histogram};
use rand::RngExt;
use smallvec::SmallVec;
use std::collections::HashSet;
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServedBy {
    /// The partition's primary.
    Primary = 0,
    /// One of its replicas.
    Replica = 1,
    /// The proxy itself (an error).
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

/// The nodes a request may try, best first.
pub struct Plan<'t> {
    /// Candidates in the order to try them.
    pub candidates: SmallVec<[(&'t Arc<Upstream>, Role); 4]>,
    /// Only the primary may serve (writes, or read preference `primary`).
    pub primary_only: bool,
}

impl RoutePartition {
    /// Which nodes a request of `class` under `pref` may try, in order.
    ///
    /// Writes get the primary and nothing else, whatever the preference.
    pub fn plan(&self, class: RequestClass, pref: ReadPreference) -> Plan<'_> {
        let primary = (&self.primary, Role::Primary);
        let mut candidates = SmallVec::new();
        let pref = match class {
            RequestClass::Write => ReadPreference::Primary,
            RequestClass::Read => pref,
        };
        match pref {
            ReadPreference::Primary => candidates.push(primary),
            ReadPreference::PrimaryPreferred => {
                candidates.push(primary);
                self.push_replicas(&mut candidates);
            }
            ReadPreference::Secondary => self.push_replicas(&mut candidates),
            ReadPreference::SecondaryPreferred => {
                self.push_replicas(&mut candidates);
                candidates.push(primary);
            }
            ReadPreference::Nearest => {
                candidates.push(primary);
                self.push_replicas(&mut candidates);
                order_nearest(&mut candidates);
            }
        }
        Plan {
            candidates,
            primary_only: pref == ReadPreference::Primary,
        }
    }

    /// Replicas starting at a random one, so reads spread across them.
    fn push_replicas<'t>(&'t self, out: &mut SmallVec<[(&'t Arc<Upstream>, Role); 4]>) {
        let n = self.replicas.len();
        if n == 0 {
            return;
        }
        let start = if n == 1 {
            0
        } else {
            rand::rng().random_range(0..n)
        };
        for i in 0..n {
            out.push((&self.replicas[(start + i) % n], Role::Replica));
        }
    }
}

/// Power of two choices over cost = latency estimate × (in-flight + 1): the
/// better of two random nodes goes first, the rest follow by cost.
fn order_nearest(c: &mut [(&Arc<Upstream>, Role)]) {
    let cost = |u: &Upstream| u.latency().estimate().as_nanos() as f64 * (u.inflight() + 1) as f64;
    let n = c.len();
    if n < 2 {
        return;
    }
    let mut rng = rand::rng();
    let a = rng.random_range(0..n);
    let mut b = rng.random_range(0..n - 1);
    if b >= a {
        b += 1;
    }
    let first = if cost(c[a].0) <= cost(c[b].0) { a } else { b };
    c.swap(0, first);
    c[1..].sort_by(|x, y| cost(x.0).total_cmp(&cost(y.0)));
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
    epoch_header: HeaderValue,
    origin: MapOrigin,
}

impl RouteTable {
    /// Bind `map` to upstreams from `upstreams`, filling in `default_port`.
    pub fn build(
        map: Arc<ShardMap>,
        upstreams: &Upstreams,
        default_port: u16,
        metrics: &Arc<Metrics>,
        origin: MapOrigin,
    ) -> RouteTable {
        let mut keep = HashSet::new();
        let partitions: Box<[RoutePartition]> = map
            .partitions()
            .iter()
            .map(|p: &Partition| {
                let mut bind = |addr: &crate::topology::NodeAddr| {
                    let sa = addr.socket_addr(default_port);
                    keep.insert(sa);
                    upstreams.resolve(sa)
                };
                RoutePartition {
                    index: p.index,
                    index_header: HeaderValue::from(p.index),
                    primary: bind(&p.primary),
                    replicas: p.replicas.iter().map(&mut bind).collect(),
                    metrics: Arc::new(PartitionMetrics::new(metrics.clone(), &p.index.to_string())),
                }
            })
            .collect();
        upstreams.retain(&keep);
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
            origin,
        }
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
