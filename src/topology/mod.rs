//! The shard map: wire format, validation, epoch fencing and key lookup (SPEC §2).
//!
//! This module sits below both the data plane and the control plane; neither of
//! them is imported here.

mod hash;
mod node;
mod validate;

pub use hash::key_position;
pub use node::{NodeAddr, NodeAddrError};
pub use validate::{InvalidTopology, TopologyError};

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The topology document exactly as it travels over HTTP and sits in files.
///
/// Unknown fields are ignored so newer coordinators can add to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopologyDoc {
    /// Fencing epoch; a map with a lower epoch than the one in force is refused.
    pub cluster_epoch: u64,
    /// Id of the coordinator that leads the cluster.
    pub master_node_id: String,
    /// Declared number of partitions; must equal `partitions.len()`.
    pub partition_count: u32,
    /// The partitions, in any order.
    pub partitions: Vec<PartitionDoc>,
}

/// One partition as the wire format writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionDoc {
    /// The partition's stable index (reported in `x-shardgate-partition`).
    pub partition_index: u32,
    /// Address of the node that takes writes.
    pub primary_node_ip: String,
    /// Addresses of the nodes that may serve reads.
    pub replica_node_ips: Vec<String>,
    /// First ring position owned, 8 hex digits, inclusive.
    pub hash_range_start: String,
    /// Last ring position owned, 8 hex digits, inclusive.
    pub hash_range_end: String,
}

/// An inclusive range of ring positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HashRange {
    /// First position owned.
    pub start: u32,
    /// Last position owned.
    pub end: u32,
}

impl HashRange {
    /// Whether `pos` falls inside the range.
    pub fn contains(&self, pos: u32) -> bool {
        self.start <= pos && pos <= self.end
    }
}

/// A validated partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// The partition's index as the map names it.
    pub index: u32,
    /// The node that takes writes.
    pub primary: NodeAddr,
    /// Nodes that may serve reads.
    pub replicas: Vec<NodeAddr>,
    /// Ring positions owned.
    pub range: HashRange,
}

impl Partition {
    /// Every node of the partition, primary first.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeAddr> {
        std::iter::once(&self.primary).chain(self.replicas.iter())
    }
}

/// A validated shard map: complete, non-overlapping coverage of the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMap {
    epoch: u64,
    master_node_id: String,
    /// Sorted by `range.start`.
    partitions: Vec<Partition>,
    /// `partitions[i].range.start`, kept apart so the binary search stays in cache.
    starts: Vec<u32>,
}

/// The largest epoch a map may carry: every store can hold it (PostgreSQL's
/// `BIGINT` is signed), and a coordinator never raises an epoch past it.
pub const MAX_EPOCH: u64 = i64::MAX as u64;

/// Why an edit of a valid map was refused; the map is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapEditError {
    /// No partition has that index.
    #[error("partition {0} is not in the map")]
    NoSuchPartition(u32),
    /// The node named is not one of the partition's replicas.
    #[error("partition {partition}: {node} is not one of its replicas")]
    NotAReplica {
        /// The partition.
        partition: u32,
        /// The node named.
        node: NodeAddr,
    },
    /// The epoch is at its largest value ([`MAX_EPOCH`]); no change can be
    /// fenced above it.
    #[error("epoch {0} leaves no room to raise it (epochs stop at {MAX_EPOCH})")]
    EpochExhausted(u64),
}

/// What epoch fencing decides for a candidate map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fence {
    /// Higher epoch (or no map yet): replace the map in force.
    Apply,
    /// Same epoch: nothing to do.
    Unchanged,
    /// Lower epoch: refuse, the map in force is newer.
    Stale,
}

impl Fence {
    /// Decide for a candidate with `candidate` epoch against the epoch in force, if any.
    pub fn decide(in_force: Option<u64>, candidate: u64) -> Fence {
        match in_force {
            None => Fence::Apply,
            Some(cur) if candidate > cur => Fence::Apply,
            Some(cur) if candidate == cur => Fence::Unchanged,
            Some(_) => Fence::Stale,
        }
    }
}

impl ShardMap {
    /// The map's fencing epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The leading coordinator's id.
    pub fn master_node_id(&self) -> &str {
        &self.master_node_id
    }

    /// Partitions in ring order.
    pub fn partitions(&self) -> &[Partition] {
        &self.partitions
    }

    /// Position in `partitions()` of the partition that owns `pos`, in O(log P).
    #[inline]
    pub fn slot_for(&self, pos: u32) -> usize {
        // Valid maps start at 0, so at least one start is <= pos.
        self.starts.partition_point(|&s| s <= pos).saturating_sub(1)
    }

    /// The partition that owns ring position `pos`.
    #[inline]
    pub fn partition_for(&self, pos: u32) -> &Partition {
        &self.partitions[self.slot_for(pos)]
    }

    /// The partition that owns `key`.
    pub fn partition_for_key(&self, key: &[u8]) -> &Partition {
        self.partition_for(key_position(key))
    }

    /// The same map under a different epoch (the coordinator raises epochs).
    pub fn with_epoch(mut self, epoch: u64) -> ShardMap {
        self.epoch = epoch;
        self
    }

    /// The epoch after this one; every change to the map takes it.
    pub fn next_epoch(&self) -> Result<u64, MapEditError> {
        match self.epoch.checked_add(1) {
            Some(next) if next <= MAX_EPOCH => Ok(next),
            _ => Err(MapEditError::EpochExhausted(self.epoch)),
        }
    }

    /// The map after a failover: `replica` becomes partition `index`'s
    /// primary, the old primary leaves the partition, and the epoch rises by
    /// one. Every other partition is untouched, so the result is valid by
    /// construction.
    pub fn promote(&self, index: u32, replica: NodeAddr) -> Result<ShardMap, MapEditError> {
        let epoch = self.next_epoch()?;
        let mut next = self.clone();
        let p = next
            .partitions
            .iter_mut()
            .find(|p| p.index == index)
            .ok_or(MapEditError::NoSuchPartition(index))?;
        let at =
            p.replicas
                .iter()
                .position(|r| *r == replica)
                .ok_or(MapEditError::NotAReplica {
                    partition: index,
                    node: replica,
                })?;
        p.replicas.remove(at);
        p.primary = replica;
        next.epoch = epoch;
        Ok(next)
    }

    /// The partition that names `addr` (as primary or replica), if any.
    pub fn partition_of(&self, addr: &NodeAddr) -> Option<&Partition> {
        self.partitions
            .iter()
            .find(|p| p.nodes().any(|n| n == addr))
    }

    /// The partition with index `index`, if the map has it.
    pub fn partition(&self, index: u32) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.index == index)
    }

    /// Back to the wire format, partitions ordered by index.
    pub fn to_doc(&self) -> TopologyDoc {
        let mut partitions: Vec<PartitionDoc> = self
            .partitions
            .iter()
            .map(|p| PartitionDoc {
                partition_index: p.index,
                primary_node_ip: p.primary.to_string(),
                replica_node_ips: p.replicas.iter().map(ToString::to_string).collect(),
                hash_range_start: format!("{:08x}", p.range.start),
                hash_range_end: format!("{:08x}", p.range.end),
            })
            .collect();
        partitions.sort_by_key(|p| p.partition_index);
        TopologyDoc {
            cluster_epoch: self.epoch,
            master_node_id: self.master_node_id.clone(),
            partition_count: partitions.len() as u32,
            partitions,
        }
    }
}

/// A topology file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TopologyFileError {
    /// Not readable.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Readable but invalid.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every broken rule.
        source: InvalidTopology,
    },
}

/// Read and validate a topology file.
pub fn read_topology_file(path: &Path) -> Result<ShardMap, TopologyFileError> {
    let bytes = std::fs::read(path).map_err(|source| TopologyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    ShardMap::from_json(&bytes).map_err(|source| TopologyFileError::Invalid {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const SPEC_EXAMPLE: &str = r#"{
      "clusterEpoch": 10294,
      "masterNodeId": "node_master_001.prod",
      "partitionCount": 3,
      "partitions": [
        {"partitionIndex": 0, "primaryNodeIp": "10.0.1.5", "replicaNodeIps": ["10.0.1.6", "10.0.1.7"],
         "hashRangeStart": "00000000", "hashRangeEnd": "55555555"},
        {"partitionIndex": 1, "primaryNodeIp": "10.0.2.5", "replicaNodeIps": ["10.0.2.6"],
         "hashRangeStart": "55555556", "hashRangeEnd": "aaaaaaaa"},
        {"partitionIndex": 2, "primaryNodeIp": "10.0.3.5", "replicaNodeIps": ["10.0.3.6"],
         "hashRangeStart": "aaaaaaab", "hashRangeEnd": "ffffffff"}
      ]
    }"#;

    pub(super) fn doc() -> TopologyDoc {
        serde_json::from_str(SPEC_EXAMPLE).unwrap()
    }

    #[test]
    fn the_spec_example_is_valid_and_routes_boundaries_inclusively() {
        let map = ShardMap::from_doc(&doc()).unwrap();
        assert_eq!(map.epoch(), 10294);
        assert_eq!(map.partition_for(0).index, 0);
        assert_eq!(map.partition_for(0x5555_5555).index, 0);
        assert_eq!(map.partition_for(0x5555_5556).index, 1);
        assert_eq!(map.partition_for(0xaaaa_aaaa).index, 1);
        assert_eq!(map.partition_for(0xaaaa_aaab).index, 2);
        assert_eq!(map.partition_for(u32::MAX).index, 2);
    }

    #[test]
    fn epochs_fence() {
        assert_eq!(Fence::decide(None, 0), Fence::Apply);
        assert_eq!(Fence::decide(Some(5), 6), Fence::Apply);
        assert_eq!(Fence::decide(Some(5), 5), Fence::Unchanged);
        assert_eq!(Fence::decide(Some(5), 4), Fence::Stale);
    }

    #[test]
    fn round_trips_through_the_wire_format() {
        let map = ShardMap::from_doc(&doc()).unwrap();
        let again = ShardMap::from_doc(&map.to_doc()).unwrap();
        assert_eq!(map, again);
    }

    #[test]
    fn a_promotion_moves_a_replica_into_the_primary_slot_under_the_next_epoch() {
        let map = ShardMap::from_doc(&doc()).unwrap();
        let replica: NodeAddr = "10.0.1.7".parse().unwrap();
        let next = map.promote(0, replica).unwrap();
        assert_eq!(next.epoch(), 10295);
        let p = next.partition(0).unwrap();
        assert_eq!(p.primary, replica);
        assert_eq!(p.replicas, ["10.0.1.6".parse::<NodeAddr>().unwrap()]);
        assert_eq!(next.partition(1), map.partition(1), "others untouched");
        assert!(ShardMap::from_doc(&next.to_doc()).is_ok(), "still valid");
        assert_eq!(
            map.promote(0, "10.0.2.6".parse().unwrap()),
            Err(MapEditError::NotAReplica {
                partition: 0,
                node: "10.0.2.6".parse().unwrap()
            })
        );
        assert_eq!(
            map.promote(9, replica),
            Err(MapEditError::NoSuchPartition(9))
        );
    }

    #[test]
    fn the_epoch_never_wraps_or_leaves_what_every_store_can_hold() {
        let map = ShardMap::from_doc(&doc()).unwrap().with_epoch(u64::MAX);
        assert_eq!(
            map.next_epoch(),
            Err(MapEditError::EpochExhausted(u64::MAX))
        );
        assert!(map.promote(0, "10.0.1.6".parse().unwrap()).is_err());
        let last = ShardMap::from_doc(&doc())
            .unwrap()
            .with_epoch(MAX_EPOCH - 1);
        assert_eq!(last.next_epoch(), Ok(MAX_EPOCH));
        let at_max = last.with_epoch(MAX_EPOCH);
        assert_eq!(
            at_max.next_epoch(),
            Err(MapEditError::EpochExhausted(MAX_EPOCH))
        );
    }

    #[test]
    fn single_partition_owns_the_whole_ring() {
        let text = r#"{"clusterEpoch":1,"masterNodeId":"m","partitionCount":1,"partitions":[
            {"partitionIndex":7,"primaryNodeIp":"127.0.0.1:1","replicaNodeIps":[],
             "hashRangeStart":"00000000","hashRangeEnd":"FFFFFFFF"}]}"#;
        let map = ShardMap::from_json(text.as_bytes()).unwrap();
        assert_eq!(map.partition_for(0).index, 7);
        assert_eq!(map.partition_for(u32::MAX).index, 7);
    }
}
