//! What survives a restart: the map with its epoch, who is fenced, and what
//! each node was last told.

use super::{Assignment, ClusterState, Node, NodeStatus, Usage};
use crate::topology::{InvalidTopology, NodeAddr, ShardMap, TopologyDoc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use tokio::time::Instant;

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

impl ClusterState {
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
                    replication: None,
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
            // Strangers hold nothing that must survive a restart.
            nodes: self
                .nodes
                .values()
                .filter(|n| self.is_named(&n.addr))
                .map(|n| PersistedNode {
                    id: n.id.clone(),
                    addr: n.addr,
                    told: n.told,
                })
                .collect(),
        }
    }

    /// Take a newer map from a shared store (another coordinator changed it).
    pub fn adopt(&mut self, p: &Persisted) -> Result<bool, InvalidTopology> {
        if p.map.cluster_epoch <= self.map.epoch() {
            return Ok(false);
        }
        self.set_map(ShardMap::from_doc(&p.map)?);
        self.fenced.clone_from(&p.fenced);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;
    use tokio::time::Instant;

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
