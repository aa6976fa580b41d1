//! The cluster as the coordinator sees it, and the rules that change it
//! (SPEC §4). Pure state transitions: no IO, time passed in, so every rule is
//! tested deterministically.
//!
//! Here: nodes and their heartbeats, assignments and commands, operator map
//! changes. `failover`: liveness, promotion, partition health. `persist`:
//! what survives a restart.

mod failover;
mod persist;

pub use failover::{PartitionHealth, Promotion, SweepReport};
pub use persist::{Persisted, PersistedNode};

use crate::replication::ReplicationReport;
use crate::topology::{InvalidTopology, MAX_EPOCH, NodeAddr, ShardMap, TopologyDoc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;
use tokio::time::Instant;

/// A node's health as the coordinator judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NodeStatus {
    /// Heartbeating, clock in line.
    Active,
    /// Heartbeating, but its clock is off by more than the limit.
    Degraded,
    /// Silent for longer than the heartbeat timeout.
    Dead,
}

impl NodeStatus {
    /// The status as the schema and API spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Active => "ACTIVE",
            NodeStatus::Degraded => "DEGRADED",
            NodeStatus::Dead => "DEAD",
        }
    }

    /// Parse the schema spelling.
    pub fn parse(s: &str) -> Option<NodeStatus> {
        match s {
            "ACTIVE" => Some(NodeStatus::Active),
            "DEGRADED" => Some(NodeStatus::Degraded),
            "DEAD" => Some(NodeStatus::Dead),
            _ => None,
        }
    }
}

/// An operator's map that was refused; the map in force is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum MapChangeError {
    /// It breaks the rules of SPEC §2.
    #[error(transparent)]
    Invalid(#[from] InvalidTopology),
    /// Its epoch is not above the one in force: it was made from an older
    /// map, or would undo a newer one.
    #[error("the map's epoch {given} is not above the epoch in force, {in_force}")]
    Stale {
        /// The epoch the map carries.
        given: u64,
        /// The epoch in force.
        in_force: u64,
    },
    /// Its epoch would leave no room for the failovers that must follow it.
    #[error(
        "epoch {0} is out of range: epochs stop at {MAX_EPOCH}, and a map must leave room to raise it"
    )]
    OutOfRange(u64),
}

/// A heartbeat that is refused: it is logged and changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A known node heartbeating from an address other than its own.
    #[error("node {id} is bound to {bound}; its heartbeat from {given} is refused")]
    IdBound {
        /// The node id.
        id: String,
        /// The address it is bound to.
        bound: NodeAddr,
        /// The address the heartbeat claimed.
        given: NodeAddr,
    },
    /// A heartbeat for an address bound to another node.
    #[error("{addr} is bound to node {owner}; a heartbeat from {id} for it is refused")]
    AddressBound {
        /// The address.
        addr: NodeAddr,
        /// The node bound to it.
        owner: String,
        /// The node id that claimed it.
        id: String,
    },
    /// Too many nodes the map does not name are registered already.
    #[error("{max} nodes the map does not name are registered; {id} is not")]
    TooManyStrangers {
        /// The limit.
        max: usize,
        /// The node id refused.
        id: String,
    },
}

/// What the coordinator tells a node in reply to a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Carry on.
    Continue,
    /// Your role or partition changed: re-read the map.
    Rebalance,
    /// You were removed or fenced: stop serving (an old primary must stop taking writes).
    Terminate,
}

/// Where a node sits in the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The partition it belongs to, if any.
    pub partition: Option<u32>,
    /// Whether it is that partition's primary.
    pub primary: bool,
}

impl Assignment {
    /// The schema's role: `MASTER` for a partition primary, `WORKER` otherwise.
    pub fn role(self) -> &'static str {
        if self.primary { "MASTER" } else { "WORKER" }
    }
}

/// A node's reported resource usage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// CPU in use, percent.
    pub cpu_percent: f64,
    /// Free memory, bytes.
    pub free_memory_bytes: i64,
    /// Open TCP connections.
    pub active_connections: i64,
}

/// A heartbeat that passed validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Heartbeat {
    /// The node's stable name.
    pub node_id: String,
    /// The node's address, as the map writes it.
    pub addr: NodeAddr,
    /// The node's own clock, Unix milliseconds.
    pub node_time_ms: i64,
    /// Reported usage.
    pub usage: Usage,
    /// Reported replication status, when the node's agent can read it.
    pub replication: Option<ReplicationReport>,
}

/// One node known to the coordinator.
#[derive(Clone, Debug)]
pub struct Node {
    /// Stable name.
    pub id: String,
    /// Address.
    pub addr: NodeAddr,
    /// Health.
    pub status: NodeStatus,
    /// Last reported usage.
    pub usage: Usage,
    /// When the last heartbeat arrived (coordinator's monotonic clock).
    pub last_seen: Option<Instant>,
    /// When the last heartbeat arrived, Unix milliseconds (for display).
    pub last_seen_unix_ms: Option<i64>,
    /// Node clock minus coordinator clock at the last heartbeat, milliseconds.
    pub skew_ms: i64,
    /// The assignment the node last heard about.
    pub told: Option<Assignment>,
    /// Its last reported replication status.
    pub replication: Option<ReplicationReport>,
}

/// One replica's replication from its primary.
#[derive(Clone, Debug)]
pub struct ReplicationRow {
    /// The partition.
    pub partition: u32,
    /// The primary's node id (its address if it never reported).
    pub source: String,
    /// The primary's address.
    pub source_addr: NodeAddr,
    /// The replica's node id.
    pub target: String,
    /// The replica's address.
    pub target_addr: NodeAddr,
    /// What the replica last reported.
    pub report: ReplicationReport,
    /// When (Unix milliseconds).
    pub updated_unix_ms: Option<i64>,
}

impl ReplicationRow {
    /// Its form in `GET /v1/cluster/replication` and the file store.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "partition": self.partition,
            "source": self.source,
            "target": self.target,
            "targetIp": self.target_addr.to_string(),
            "state": self.report.state.as_str(),
            "lagBytes": self.report.lag_bytes,
            "lagMs": self.report.lag_ms,
            "appliedHlc": self.report.applied.to_string(),
            "lastReplicatedSequence": self.report.sequence,
            "updatedAt": self.updated_unix_ms,
        })
    }
}

/// Timing rules for liveness and failover.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// Silence before DEAD.
    pub heartbeat_timeout: Duration,
    /// Skew before DEGRADED.
    pub max_clock_skew: Duration,
    /// No second failover in a partition within this long.
    pub failover_hold_down: Duration,
    /// Nodes the map does not name that may be registered at once.
    pub max_strangers: usize,
    /// CP or AP when every live replica is far behind a dead primary:
    /// `Some(d)` never promotes one more than `d` behind (the partition
    /// refuses writes until its primary returns or an operator acts);
    /// `None` promotes the most caught-up one however far behind, and the
    /// writes it never received are lost.
    pub failover_max_lag: Option<Duration>,
}

/// The coordinator's view of the cluster.
#[derive(Clone, Debug)]
pub struct ClusterState {
    leader_id: String,
    map: ShardMap,
    /// Every address `map` names.
    named: HashSet<NodeAddr>,
    nodes: BTreeMap<String, Node>,
    fenced: BTreeSet<NodeAddr>,
    last_failover: HashMap<u32, Instant>,
    /// Partitions with no live node at the last sweep.
    unavailable: BTreeSet<u32>,
    /// Nodes named by the map but never heard get this much grace from here.
    started: Instant,
}

/// A map and its fencing, as they stood before a change
/// ([`ClusterState::map_in_force`]).
#[derive(Clone, Debug)]
pub struct MapInForce {
    map: ShardMap,
    fenced: BTreeSet<NodeAddr>,
}

/// Every address `map` names.
fn named(map: &ShardMap) -> HashSet<NodeAddr> {
    map.partitions()
        .iter()
        .flat_map(|p| p.nodes().copied())
        .collect()
}

impl ClusterState {
    /// A fresh state around `map`.
    pub fn new(map: ShardMap, leader_id: &str, now: Instant) -> ClusterState {
        ClusterState {
            leader_id: leader_id.to_owned(),
            named: named(&map),
            map,
            nodes: BTreeMap::new(),
            fenced: BTreeSet::new(),
            last_failover: HashMap::new(),
            unavailable: BTreeSet::new(),
            started: now,
        }
    }

    /// The map in force.
    pub fn map(&self) -> &ShardMap {
        &self.map
    }

    /// Put `map` in force.
    fn set_map(&mut self, map: ShardMap) {
        self.named = named(&map);
        self.map = map;
    }

    /// Whether the map in force names `addr`.
    fn is_named(&self, addr: &NodeAddr) -> bool {
        self.named.contains(addr)
    }

    /// The epoch in force.
    pub fn epoch(&self) -> u64 {
        self.map.epoch()
    }

    /// The map as served: `masterNodeId` names the leading coordinator.
    pub fn doc(&self) -> TopologyDoc {
        let mut doc = self.map.to_doc();
        doc.master_node_id = self.leader_id.clone();
        doc
    }

    /// The leading coordinator's id.
    pub fn leader_id(&self) -> &str {
        &self.leader_id
    }

    /// Name the leading coordinator.
    pub fn set_leader(&mut self, id: &str) {
        id.clone_into(&mut self.leader_id);
    }

    /// Known nodes.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// Whether `addr` is fenced.
    pub fn is_fenced(&self, addr: &NodeAddr) -> bool {
        self.fenced.contains(addr)
    }

    /// Each replica's replication from its primary, as the nodes last
    /// reported it (`GET /v1/cluster/replication`, the `replication_logs` rows).
    pub fn replication(&self) -> Vec<ReplicationRow> {
        let node_at = |a: &NodeAddr| {
            self.nodes
                .values()
                .filter(|n| n.addr == *a)
                .max_by_key(|n| n.last_seen)
        };
        let mut rows = Vec::new();
        for p in self.map.partitions() {
            let source = node_at(&p.primary).map(|n| n.id.clone());
            for r in &p.replicas {
                let Some(target) = node_at(r) else { continue };
                let Some(rep) = target.replication else {
                    continue;
                };
                rows.push(ReplicationRow {
                    partition: p.index,
                    source: source.clone().unwrap_or_else(|| p.primary.to_string()),
                    source_addr: p.primary,
                    target: target.id.clone(),
                    target_addr: *r,
                    report: rep,
                    updated_unix_ms: target.last_seen_unix_ms,
                });
            }
        }
        rows
    }

    /// Where `addr` sits in the map.
    pub fn assignment_of(&self, addr: &NodeAddr) -> Assignment {
        for p in self.map.partitions() {
            if p.primary == *addr {
                return Assignment {
                    partition: Some(p.index),
                    primary: true,
                };
            }
            if p.replicas.contains(addr) {
                return Assignment {
                    partition: Some(p.index),
                    primary: false,
                };
            }
        }
        Assignment {
            partition: None,
            primary: false,
        }
    }

    /// Record a heartbeat received at `now` (coordinator wall clock
    /// `now_unix_ms`) and decide the node's command; also whether anything
    /// persistent changed. A heartbeat that would break a node's binding to
    /// its address, or register one stranger too many, is refused and
    /// changes nothing.
    pub fn heartbeat(
        &mut self,
        hb: &Heartbeat,
        now: Instant,
        now_unix_ms: i64,
        rules: &Rules,
    ) -> Result<(Command, bool), Refusal> {
        self.admit(hb, rules)?;
        let assignment = self.assignment_of(&hb.addr);
        let named = self.is_named(&hb.addr);
        let fenced = self.fenced.contains(&hb.addr);
        let skew_ms = hb.node_time_ms.saturating_sub(now_unix_ms);
        let degraded = skew_ms.unsigned_abs() > rules.max_clock_skew.as_millis() as u64;
        // Only nodes the map names are persisted: a stranger holds nothing
        // that must survive a restart, and it registers again.
        let mut persist = false;
        let node = self.nodes.entry(hb.node_id.clone()).or_insert_with(|| {
            persist = named;
            Node {
                id: hb.node_id.clone(),
                addr: hb.addr,
                status: NodeStatus::Active,
                usage: Usage::default(),
                last_seen: None,
                last_seen_unix_ms: None,
                skew_ms: 0,
                // First contact: nothing has changed since it last heard.
                told: Some(assignment),
                replication: None,
            }
        });
        if node.addr != hb.addr {
            // A move `admit` allowed: its old address left the map.
            node.addr = hb.addr;
            persist = named;
        }
        node.usage = hb.usage;
        if hb.replication.is_some() {
            node.replication = hb.replication;
        }
        node.last_seen = Some(now);
        node.last_seen_unix_ms = Some(now_unix_ms);
        node.skew_ms = skew_ms;
        node.status = if degraded {
            NodeStatus::Degraded
        } else {
            NodeStatus::Active
        };
        if fenced {
            return Ok((Command::Terminate, persist));
        }
        if node.told != Some(assignment) {
            node.told = Some(assignment);
            return Ok((Command::Rebalance, named));
        }
        Ok((Command::Continue, persist))
    }

    /// Forget what `node` was last told, so its next heartbeat is answered
    /// REBALANCE again (after a claim on the shared store that could not be
    /// made: better told twice than never).
    pub fn forget_told(&mut self, node: &str) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.told = None;
        }
    }

    /// Whether `hb` may be recorded.
    ///
    /// A node id and its address are bound once known: a known node may move
    /// only once the map no longer names its old address (an operator moved
    /// it), and no other id may heartbeat for an address a node holds. So a
    /// forged heartbeat can neither demote a live primary nor keep a dead
    /// replica looking alive. Strangers (nodes the map does not name) are
    /// bounded, and those that fall silent are forgotten (`sweep`).
    fn admit(&self, hb: &Heartbeat, rules: &Rules) -> Result<(), Refusal> {
        let known = self.nodes.get(&hb.node_id);
        if let Some(n) = known
            && n.addr != hb.addr
            && self.is_named(&n.addr)
        {
            return Err(Refusal::IdBound {
                id: hb.node_id.clone(),
                bound: n.addr,
                given: hb.addr,
            });
        }
        if let Some(owner) = self
            .nodes
            .values()
            .find(|n| n.addr == hb.addr && n.id != hb.node_id)
        {
            return Err(Refusal::AddressBound {
                addr: hb.addr,
                owner: owner.id.clone(),
                id: hb.node_id.clone(),
            });
        }
        if known.is_none() && !self.is_named(&hb.addr) && !self.fenced.contains(&hb.addr) {
            let strangers = self
                .nodes
                .values()
                .filter(|n| !self.is_named(&n.addr))
                .count();
            if strangers >= rules.max_strangers {
                return Err(Refusal::TooManyStrangers {
                    max: rules.max_strangers,
                    id: hb.node_id.clone(),
                });
            }
        }
        Ok(())
    }

    /// Merge a heartbeat another coordinator recorded (shared store); `age` is
    /// how long ago it arrived by the store's clock.
    pub fn merge_remote(
        &mut self,
        id: &str,
        addr: NodeAddr,
        age: Duration,
        usage: Usage,
        skew_ms: i64,
        now: Instant,
    ) {
        let seen = now.checked_sub(age).unwrap_or(now);
        let node = self.nodes.entry(id.to_owned()).or_insert_with(|| Node {
            id: id.to_owned(),
            addr,
            status: NodeStatus::Active,
            usage,
            last_seen: None,
            last_seen_unix_ms: None,
            skew_ms,
            told: None,
            replication: None,
        });
        if node.last_seen.is_none_or(|t| seen > t) {
            node.addr = addr;
            node.usage = usage;
            node.skew_ms = skew_ms;
            node.last_seen = Some(seen);
            if node.status == NodeStatus::Dead {
                node.status = NodeStatus::Active;
            }
        }
    }

    /// An operator's new map: validated, its epoch above the one in force
    /// (and below [`MAX_EPOCH`]), nodes it drops fenced and nodes it names
    /// unfenced.
    pub fn replace_map(&mut self, mut doc: TopologyDoc) -> Result<u64, MapChangeError> {
        let in_force = self.map.epoch();
        if doc.cluster_epoch <= in_force {
            return Err(MapChangeError::Stale {
                given: doc.cluster_epoch,
                in_force,
            });
        }
        if doc.cluster_epoch >= MAX_EPOCH {
            return Err(MapChangeError::OutOfRange(doc.cluster_epoch));
        }
        doc.master_node_id = self.leader_id.clone();
        let map = ShardMap::from_doc(&doc)?;
        let named: BTreeSet<NodeAddr> = map
            .partitions()
            .iter()
            .flat_map(|p| p.nodes().copied())
            .collect();
        for gone in self.map.partitions().iter().flat_map(|p| p.nodes()) {
            if !named.contains(gone) {
                self.fenced.insert(*gone);
            }
        }
        self.fenced.retain(|a| !named.contains(a));
        self.set_map(map);
        Ok(self.map.epoch())
    }

    /// The map in force and who is fenced: what [`ClusterState::replace_map`]
    /// changes, to put back with [`ClusterState::undo_map_change`].
    pub fn map_in_force(&self) -> MapInForce {
        MapInForce {
            map: self.map.clone(),
            fenced: self.fenced.clone(),
        }
    }

    /// Put back the map a change replaced when the store did not confirm the
    /// change. Only the map and its fencing go back: what was heard while
    /// the store was asked (heartbeats, what nodes were told) stays, or a
    /// slow refusal would age every node by the time it took and the next
    /// sweep could take them all for dead.
    pub fn undo_map_change(&mut self, before: MapInForce) {
        self.fenced = before.fenced;
        self.set_map(before.map);
    }

    /// The status of the node at `addr` (the one heard last, if several
    /// have claimed it); `None` if none has been heard.
    pub fn status_of(&self, addr: &NodeAddr) -> Option<NodeStatus> {
        self.nodes
            .values()
            .filter(|n| n.addr == *addr)
            .max_by_key(|n| n.last_seen)
            .map(|n| n.status)
    }

    /// Counts of nodes by status.
    pub fn status_counts(&self) -> [(NodeStatus, usize); 3] {
        let count = |s| self.nodes.values().filter(|n| n.status == s).count();
        [
            (NodeStatus::Active, count(NodeStatus::Active)),
            (NodeStatus::Degraded, count(NodeStatus::Degraded)),
            (NodeStatus::Dead, count(NodeStatus::Dead)),
        ]
    }
}

#[cfg(test)]
pub(super) mod tests;
