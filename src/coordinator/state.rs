//! The cluster as the coordinator sees it, and the rules that change it
//! (SPEC §4). Pure state transitions: no IO, time passed in, so every rule is
//! tested deterministically.

use crate::topology::{InvalidTopology, MapEditError, NodeAddr, Partition, ShardMap, TopologyDoc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
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

/// A partition's health as its nodes' statuses show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionHealth {
    /// The primary is alive.
    Ok,
    /// The primary is dead or unheard, but a replica is alive.
    PrimaryDown,
    /// No node of the partition is alive.
    Unavailable,
}

impl PartitionHealth {
    /// As the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            PartitionHealth::Ok => "ok",
            PartitionHealth::PrimaryDown => "primary_down",
            PartitionHealth::Unavailable => "unavailable",
        }
    }
}

/// An operator's map that was refused; the map in force is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum MapChangeError {
    /// It breaks the rules of SPEC §2.
    #[error(transparent)]
    Invalid(#[from] InvalidTopology),
    /// The map in force cannot be changed (its epoch is exhausted).
    #[error(transparent)]
    Edit(#[from] MapEditError),
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
}

/// A replica promoted to primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promotion {
    /// Partition index.
    pub partition: u32,
    /// The dead primary, now fenced.
    pub from: NodeAddr,
    /// The promoted replica.
    pub to: NodeAddr,
    /// The epoch the promotion created.
    pub epoch: u64,
}

/// What a sweep found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Nodes that just became DEAD.
    pub newly_dead: Vec<String>,
    /// Promotions made, one epoch each.
    pub promotions: Vec<Promotion>,
    /// Partitions with no live node at all (kept in the map, reported).
    pub unavailable: Vec<u32>,
    /// Partitions whose primary is dead but no replica could take over.
    pub stuck: Vec<u32>,
}

/// A node as persisted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PersistedNode {
    /// Stable name.
    pub id: String,
    /// Address.
    pub addr: NodeAddr,
    /// Last assignment it heard.
    pub told: Option<Assignment>,
}

/// Everything that must survive a restart: the map with its epoch, who is
/// fenced, and what each node was last told.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    /// The map, epoch included.
    pub map: TopologyDoc,
    /// Addresses told to stop (old primaries, removed nodes).
    pub fenced: BTreeSet<NodeAddr>,
    /// Known nodes.
    pub nodes: Vec<PersistedNode>,
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
}

/// The coordinator's view of the cluster.
#[derive(Clone, Debug)]
pub struct ClusterState {
    leader_id: String,
    map: ShardMap,
    nodes: BTreeMap<String, Node>,
    fenced: BTreeSet<NodeAddr>,
    last_failover: HashMap<u32, Instant>,
    /// Nodes named by the map but never heard get this much grace from here.
    started: Instant,
}

impl ClusterState {
    /// A fresh state around `map`.
    pub fn new(map: ShardMap, leader_id: &str, now: Instant) -> ClusterState {
        ClusterState {
            leader_id: leader_id.to_owned(),
            map,
            nodes: BTreeMap::new(),
            fenced: BTreeSet::new(),
            last_failover: HashMap::new(),
            started: now,
        }
    }

    /// Rebuild from what was persisted; every node gets a fresh timeout window.
    pub fn restore(
        p: &Persisted,
        leader_id: &str,
        now: Instant,
    ) -> Result<ClusterState, InvalidTopology> {
        let map = ShardMap::from_doc(&p.map)?;
        let mut s = ClusterState::new(map, leader_id, now);
        s.fenced.clone_from(&p.fenced);
        for n in &p.nodes {
            s.nodes.insert(
                n.id.clone(),
                Node {
                    id: n.id.clone(),
                    addr: n.addr,
                    status: NodeStatus::Active,
                    usage: Usage::default(),
                    last_seen: None,
                    last_seen_unix_ms: None,
                    skew_ms: 0,
                    told: n.told,
                },
            );
        }
        Ok(s)
    }

    /// What must be persisted.
    pub fn persisted(&self) -> Persisted {
        Persisted {
            map: self.doc(),
            fenced: self.fenced.clone(),
            nodes: self
                .nodes
                .values()
                .map(|n| PersistedNode {
                    id: n.id.clone(),
                    addr: n.addr,
                    told: n.told,
                })
                .collect(),
        }
    }

    /// The map in force.
    pub fn map(&self) -> &ShardMap {
        &self.map
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

    /// Record a heartbeat received at `now` (coordinator wall clock `now_unix_ms`)
    /// and decide the node's command. Returns whether anything persistent changed.
    pub fn heartbeat(
        &mut self,
        hb: &Heartbeat,
        now: Instant,
        now_unix_ms: i64,
        rules: &Rules,
    ) -> (Command, bool) {
        let assignment = self.assignment_of(&hb.addr);
        let fenced = self.fenced.contains(&hb.addr);
        let skew_ms = hb.node_time_ms.saturating_sub(now_unix_ms);
        let degraded = skew_ms.unsigned_abs() > rules.max_clock_skew.as_millis() as u64;
        let mut persist = false;
        let node = self.nodes.entry(hb.node_id.clone()).or_insert_with(|| {
            persist = true;
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
            }
        });
        if node.addr != hb.addr {
            node.addr = hb.addr;
            persist = true;
        }
        node.usage = hb.usage;
        node.last_seen = Some(now);
        node.last_seen_unix_ms = Some(now_unix_ms);
        node.skew_ms = skew_ms;
        node.status = if degraded {
            NodeStatus::Degraded
        } else {
            NodeStatus::Active
        };
        if fenced {
            return (Command::Terminate, persist);
        }
        if node.told != Some(assignment) {
            node.told = Some(assignment);
            return (Command::Rebalance, true);
        }
        (Command::Continue, persist)
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

    /// Whether the node at `addr` is alive (ACTIVE or DEGRADED); a node the
    /// map names but nobody has heard from is alive until the startup grace ends.
    fn alive(&self, addr: &NodeAddr, now: Instant, timeout: Duration) -> Option<NodeStatus> {
        let node = self
            .nodes
            .values()
            .filter(|n| n.addr == *addr)
            .max_by_key(|n| n.last_seen);
        match node {
            Some(n)
                if n.last_seen.is_some()
                    || now.saturating_duration_since(self.started) < timeout =>
            {
                (n.status != NodeStatus::Dead).then_some(n.status)
            }
            Some(_) => None,
            None if now.saturating_duration_since(self.started) < timeout => {
                Some(NodeStatus::Active)
            }
            None => None,
        }
    }

    /// Mark silent nodes DEAD and promote replicas of dead primaries (the
    /// leader only). `lag` gives a replica's replication lag when known.
    pub fn sweep(
        &mut self,
        now: Instant,
        rules: &Rules,
        lag: &dyn Fn(&NodeAddr) -> Option<u64>,
    ) -> SweepReport {
        let mut report = SweepReport::default();
        let timeout = rules.heartbeat_timeout;
        let grace_over = now.saturating_duration_since(self.started) >= timeout;
        for n in self.nodes.values_mut() {
            let silent = match n.last_seen {
                Some(t) => now.saturating_duration_since(t) > timeout,
                None => grace_over,
            };
            if silent && n.status != NodeStatus::Dead {
                n.status = NodeStatus::Dead;
                report.newly_dead.push(n.id.clone());
            }
        }

        // Decide on the map as it stood when the sweep began; each promotion
        // then raises the epoch by one.
        let mut decided = Vec::new();
        for p in self.map.partitions() {
            if self.alive(&p.primary, now, timeout).is_some() {
                continue;
            }
            let mut candidates: Vec<(usize, NodeAddr)> = p
                .replicas
                .iter()
                .copied()
                .enumerate()
                .filter(|(_, r)| {
                    self.alive(r, now, timeout) == Some(NodeStatus::Active)
                        && !self.fenced.contains(r)
                })
                .collect();
            // Least-lagged first where lag is known; unknown lag keeps map order, after known.
            candidates.sort_by_key(|(i, r)| (lag(r).unwrap_or(u64::MAX), *i));
            let Some(&(_, to)) = candidates.first() else {
                if p.replicas
                    .iter()
                    .all(|r| self.alive(r, now, timeout).is_none())
                {
                    report.unavailable.push(p.index);
                } else {
                    report.stuck.push(p.index);
                }
                continue;
            };
            let held = self
                .last_failover
                .get(&p.index)
                .is_some_and(|t| now.saturating_duration_since(*t) < rules.failover_hold_down);
            if held {
                report.stuck.push(p.index);
                continue;
            }
            decided.push((p.index, p.primary, to));
        }
        for (partition, from, to) in decided {
            match self.map.promote(partition, to) {
                Ok(map) => {
                    self.map = map;
                    self.fenced.insert(from);
                    self.last_failover.insert(partition, now);
                    report.promotions.push(Promotion {
                        partition,
                        from,
                        to,
                        epoch: self.map.epoch(),
                    });
                }
                // Only an exhausted epoch refuses a promotion decided on this
                // map; keeping the map in force is the safe side.
                Err(e) => {
                    tracing::error!(partition, "failover refused: {e}");
                    report.stuck.push(partition);
                }
            }
        }
        report
    }

    /// An operator's new map: validated, epoch raised above the one in force,
    /// nodes it drops fenced and nodes it names unfenced.
    pub fn replace_map(&mut self, mut doc: TopologyDoc) -> Result<u64, MapChangeError> {
        doc.cluster_epoch = doc.cluster_epoch.max(self.map.next_epoch()?);
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
        self.map = map;
        Ok(self.map.epoch())
    }

    /// Take a newer map from a shared store (another coordinator changed it).
    pub fn adopt(&mut self, p: &Persisted) -> Result<bool, InvalidTopology> {
        if p.map.cluster_epoch <= self.map.epoch() {
            return Ok(false);
        }
        self.map = ShardMap::from_doc(&p.map)?;
        self.fenced.clone_from(&p.fenced);
        Ok(true)
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

    /// Whether `p` can take writes, and if not, whether it can serve reads.
    pub fn health(&self, p: &Partition) -> PartitionHealth {
        let live = |a: &NodeAddr| {
            matches!(
                self.status_of(a),
                Some(NodeStatus::Active | NodeStatus::Degraded)
            )
        };
        if live(&p.primary) {
            PartitionHealth::Ok
        } else if p.replicas.iter().any(live) {
            PartitionHealth::PrimaryDown
        } else {
            PartitionHealth::Unavailable
        }
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
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn rules() -> Rules {
        Rules {
            heartbeat_timeout: 15 * SEC,
            max_clock_skew: Duration::from_millis(100),
            failover_hold_down: 30 * SEC,
        }
    }

    fn map() -> ShardMap {
        let text = r#"{"clusterEpoch":7,"masterNodeId":"x","partitionCount":2,"partitions":[
            {"partitionIndex":0,"primaryNodeIp":"10.0.0.1:80","replicaNodeIps":["10.0.0.2:80","10.0.0.3:80"],
             "hashRangeStart":"00000000","hashRangeEnd":"7fffffff"},
            {"partitionIndex":1,"primaryNodeIp":"10.0.1.1:80","replicaNodeIps":["10.0.1.2:80"],
             "hashRangeStart":"80000000","hashRangeEnd":"ffffffff"}]}"#;
        ShardMap::from_json(text.as_bytes()).unwrap()
    }

    fn hb(id: &str, addr: &str, skew_ms: i64) -> Heartbeat {
        Heartbeat {
            node_id: id.into(),
            addr: addr.parse().unwrap(),
            node_time_ms: 1_000_000 + skew_ms,
            usage: Usage::default(),
        }
    }

    fn beat(s: &mut ClusterState, id: &str, addr: &str) -> Command {
        s.heartbeat(&hb(id, addr, 0), Instant::now(), 1_000_000, &rules())
            .0
    }

    fn all_beat(s: &mut ClusterState, except: &[&str]) {
        for (id, addr) in [
            ("a", "10.0.0.1:80"),
            ("b", "10.0.0.2:80"),
            ("c", "10.0.0.3:80"),
            ("d", "10.0.1.1:80"),
            ("e", "10.0.1.2:80"),
        ] {
            if !except.contains(&id) {
                beat(s, id, addr);
            }
        }
    }

    fn no_lag(_: &NodeAddr) -> Option<u64> {
        None
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_register_nodes_and_continue() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        let (cmd, persist) = s.heartbeat(
            &hb("a", "10.0.0.1:80", 0),
            Instant::now(),
            1_000_000,
            &rules(),
        );
        assert_eq!((cmd, persist), (Command::Continue, true));
        assert_eq!(beat(&mut s, "a", "10.0.0.1:80"), Command::Continue);
        assert_eq!(beat(&mut s, "stranger", "10.9.9.9:80"), Command::Continue);
        let stranger = s.nodes().find(|n| n.id == "stranger").unwrap();
        assert_eq!(stranger.told.unwrap().role(), "WORKER");
        assert_eq!(stranger.told.unwrap().partition, None);
    }

    #[tokio::test(start_paused = true)]
    async fn skewed_clocks_degrade_a_node() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        s.heartbeat(
            &hb("a", "10.0.0.1:80", 250),
            Instant::now(),
            1_000_000,
            &rules(),
        );
        let a = s.nodes().next().unwrap();
        assert_eq!(a.status, NodeStatus::Degraded);
        assert_eq!(a.skew_ms, 250);
        s.heartbeat(
            &hb("a", "10.0.0.1:80", -50),
            Instant::now(),
            1_000_000,
            &rules(),
        );
        assert_eq!(s.nodes().next().unwrap().status, NodeStatus::Active);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_primary_dies_and_its_first_active_replica_is_promoted_once() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        all_beat(&mut s, &[]);
        tokio::time::advance(10 * SEC).await;
        all_beat(&mut s, &["a"]);
        tokio::time::advance(6 * SEC).await;
        let r = s.sweep(Instant::now(), &rules(), &no_lag);
        assert_eq!(r.newly_dead, ["a"]);
        assert_eq!(r.promotions.len(), 1);
        let p = &r.promotions[0];
        assert_eq!(
            (p.partition, p.to.to_string().as_str(), p.epoch),
            (0, "10.0.0.2:80", 8)
        );
        assert_eq!(s.epoch(), 8, "one epoch per promotion");
        let part = &s.map().partitions()[0];
        assert_eq!(part.primary.to_string(), "10.0.0.2:80");
        assert_eq!(part.replicas.len(), 1, "the old primary left the partition");
        // A second sweep changes nothing.
        let again = s.sweep(Instant::now(), &rules(), &no_lag);
        assert!(again.promotions.is_empty());
        assert_eq!(s.epoch(), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn the_promoted_node_hears_rebalance_once_and_the_old_primary_terminate() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        all_beat(&mut s, &[]);
        tokio::time::advance(16 * SEC).await;
        all_beat(&mut s, &["a"]);
        s.sweep(Instant::now(), &rules(), &no_lag);
        assert_eq!(beat(&mut s, "b", "10.0.0.2:80"), Command::Rebalance);
        assert_eq!(beat(&mut s, "b", "10.0.0.2:80"), Command::Continue);
        assert_eq!(
            beat(&mut s, "c", "10.0.0.3:80"),
            Command::Continue,
            "c's role did not change"
        );
        assert_eq!(beat(&mut s, "a", "10.0.0.1:80"), Command::Terminate);
        assert_eq!(
            beat(&mut s, "a", "10.0.0.1:80"),
            Command::Terminate,
            "fenced stays fenced"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_least_lagged_active_replica_is_preferred() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        all_beat(&mut s, &[]);
        tokio::time::advance(16 * SEC).await;
        all_beat(&mut s, &["a"]);
        let lag = |r: &NodeAddr| match r.to_string().as_str() {
            "10.0.0.2:80" => Some(5000),
            "10.0.0.3:80" => Some(10),
            _ => None,
        };
        let r = s.sweep(Instant::now(), &rules(), &lag);
        assert_eq!(r.promotions[0].to.to_string(), "10.0.0.3:80");
    }

    #[tokio::test(start_paused = true)]
    async fn no_promotion_ping_pong_within_the_hold_down() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        all_beat(&mut s, &[]);
        tokio::time::advance(16 * SEC).await;
        all_beat(&mut s, &["a"]);
        assert_eq!(
            s.sweep(Instant::now(), &rules(), &no_lag).promotions.len(),
            1
        );
        // The promoted node dies right away; c is alive but the partition is held.
        tokio::time::advance(10 * SEC).await;
        all_beat(&mut s, &["a", "b"]);
        tokio::time::advance(6 * SEC).await;
        all_beat(&mut s, &["a", "b"]);
        let r = s.sweep(Instant::now(), &rules(), &no_lag);
        assert!(r.promotions.is_empty());
        assert_eq!(r.stuck, [0]);
        tokio::time::advance(15 * SEC).await;
        all_beat(&mut s, &["a", "b"]);
        let r = s.sweep(Instant::now(), &rules(), &no_lag);
        assert_eq!(
            r.promotions.len(),
            1,
            "after the hold-down the next replica takes over"
        );
        assert_eq!(s.epoch(), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_whose_every_node_died_is_kept_and_reported() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        all_beat(&mut s, &[]);
        tokio::time::advance(16 * SEC).await;
        all_beat(&mut s, &["d", "e"]);
        let r = s.sweep(Instant::now(), &rules(), &no_lag);
        assert_eq!(r.unavailable, [1]);
        assert!(r.promotions.is_empty());
        assert_eq!(s.map().partitions().len(), 2);
        assert_eq!(s.epoch(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn degraded_replicas_are_not_promoted() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        all_beat(&mut s, &[]);
        tokio::time::advance(16 * SEC).await;
        beat(&mut s, "e", "10.0.1.2:80");
        s.heartbeat(
            &hb("b", "10.0.0.2:80", 500),
            Instant::now(),
            1_000_000,
            &rules(),
        );
        beat(&mut s, "c", "10.0.0.3:80");
        let r = s.sweep(Instant::now(), &rules(), &no_lag);
        let p0 = r.promotions.iter().find(|p| p.partition == 0).unwrap();
        assert_eq!(p0.to.to_string(), "10.0.0.3:80");
    }

    #[tokio::test(start_paused = true)]
    async fn nodes_never_heard_get_a_startup_grace() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        tokio::time::advance(5 * SEC).await;
        beat(&mut s, "b", "10.0.0.2:80");
        assert!(
            s.sweep(Instant::now(), &rules(), &no_lag)
                .promotions
                .is_empty()
        );
        tokio::time::advance(11 * SEC).await;
        beat(&mut s, "b", "10.0.0.2:80");
        let r = s.sweep(Instant::now(), &rules(), &no_lag);
        assert_eq!(
            r.promotions.len(),
            1,
            "a never-heard primary is dead after the grace"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn persisted_state_round_trips_with_epoch_fencing_and_told() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        all_beat(&mut s, &[]);
        tokio::time::advance(16 * SEC).await;
        all_beat(&mut s, &["a"]);
        s.sweep(Instant::now(), &rules(), &no_lag);
        let p = s.persisted();
        let text = serde_json::to_string(&p).unwrap();
        let back: Persisted = serde_json::from_str(&text).unwrap();
        let mut r = ClusterState::restore(&back, "coord", Instant::now()).unwrap();
        assert_eq!(r.epoch(), 8);
        assert_eq!(beat(&mut r, "a", "10.0.0.1:80"), Command::Terminate);
        assert_eq!(beat(&mut r, "b", "10.0.0.2:80"), Command::Rebalance);
    }

    #[tokio::test(start_paused = true)]
    async fn operator_maps_raise_the_epoch_and_fence_dropped_nodes() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        let mut doc = s.doc();
        doc.partitions[1].replica_node_ips = vec!["10.0.1.9:80".into()];
        doc.cluster_epoch = 3;
        assert_eq!(s.replace_map(doc.clone()).unwrap(), 8);
        assert!(s.is_fenced(&"10.0.1.2:80".parse().unwrap()));
        doc.cluster_epoch = 100;
        assert_eq!(s.replace_map(doc).unwrap(), 100);
        let mut bad = s.doc();
        bad.partition_count = 9;
        assert!(s.replace_map(bad).is_err());
        assert_eq!(s.epoch(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn partition_health_follows_its_nodes_statuses() {
        let mut s = ClusterState::new(map(), "coord", Instant::now());
        all_beat(&mut s, &[]);
        let p0 = s.map().partitions()[0].clone();
        assert_eq!(s.health(&p0), PartitionHealth::Ok);
        tokio::time::advance(16 * SEC).await;
        all_beat(&mut s, &["a", "b", "c"]);
        // Mark the silent ones dead without promoting (the replicas are silent too).
        s.sweep(Instant::now(), &rules(), &no_lag);
        assert_eq!(s.health(&p0), PartitionHealth::Unavailable);
        beat(&mut s, "c", "10.0.0.3:80");
        assert_eq!(s.health(&p0), PartitionHealth::PrimaryDown);
        assert_eq!(s.status_of(&"10.0.0.9:80".parse().unwrap()), None);
    }

    #[test]
    fn a_stored_state_with_a_bad_address_is_refused_not_trimmed() {
        let text = r#"{"map":{"clusterEpoch":1,"masterNodeId":"m","partitionCount":1,"partitions":[
            {"partitionIndex":0,"primaryNodeIp":"10.0.0.1:80","replicaNodeIps":[],
             "hashRangeStart":"00000000","hashRangeEnd":"ffffffff"}]},
            "fenced":["not-an-address"],"nodes":[]}"#;
        let err = serde_json::from_str::<Persisted>(text).unwrap_err();
        assert!(err.to_string().contains("not-an-address"), "{err}");
    }
}
