//! The shard map: wire format, validation, epoch fencing and key lookup (SPEC §2).
//!
//! This module sits below both the data plane and the control plane; neither of
//! them is imported here.

mod hash;
mod node;

pub use hash::key_position;
pub use node::{NodeAddr, NodeAddrError};

use serde::{Deserialize, Serialize};
use std::fmt;
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

/// One broken rule of SPEC §2, naming the partition it is about.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// Not JSON, or a required field missing or of the wrong type.
    #[error("not a topology document: {0}")]
    Malformed(String),
    /// `partitionCount` disagrees with the list.
    #[error("partitionCount is {declared} but {actual} partitions are listed")]
    CountMismatch {
        /// What the document declares.
        declared: u32,
        /// How many partitions it lists.
        actual: usize,
    },
    /// The map has no partitions at all.
    #[error("no partitions: the ring 00000000..ffffffff is not covered")]
    Empty,
    /// Two partitions share an index.
    #[error("partition {index}: partitionIndex is used by more than one partition")]
    DuplicateIndex {
        /// The repeated index.
        index: u32,
    },
    /// A range bound is not exactly 8 hex digits.
    #[error("partition {index}: {field} {value:?} is not 8 hex digits")]
    BadRangeBound {
        /// Partition named.
        index: u32,
        /// `hashRangeStart` or `hashRangeEnd`.
        field: &'static str,
        /// The offending text.
        value: String,
    },
    /// `hashRangeStart` is above `hashRangeEnd`.
    #[error("partition {index}: hashRangeStart {start:08x} is above hashRangeEnd {end:08x}")]
    InvertedRange {
        /// Partition named.
        index: u32,
        /// Start given.
        start: u32,
        /// End given.
        end: u32,
    },
    /// Two ranges share positions.
    #[error("partition {index}: range {start:08x}..{end:08x} overlaps partition {other}")]
    Overlap {
        /// Partition named.
        index: u32,
        /// Its start.
        start: u32,
        /// Its end.
        end: u32,
        /// The partition it overlaps.
        other: u32,
    },
    /// Positions between two ranges belong to nobody.
    #[error(
        "partition {index}: range starts at {start:08x}, leaving {gap_start:08x}..{gap_end:08x} uncovered"
    )]
    Gap {
        /// Partition after the gap.
        index: u32,
        /// Its start.
        start: u32,
        /// First uncovered position.
        gap_start: u32,
        /// Last uncovered position.
        gap_end: u32,
    },
    /// The ranges stop short of `ffffffff`.
    #[error(
        "partition {index}: the last range ends at {end:08x}, leaving {gap_start:08x}..ffffffff uncovered"
    )]
    ShortEnd {
        /// The partition with the highest range.
        index: u32,
        /// Its end.
        end: u32,
        /// First uncovered position.
        gap_start: u32,
    },
    /// The primary is missing or not an address.
    #[error("partition {index}: primaryNodeIp: {reason}")]
    BadPrimary {
        /// Partition named.
        index: u32,
        /// Why it did not parse.
        reason: NodeAddrError,
    },
    /// A replica is not an address.
    #[error("partition {index}: replicaNodeIps[{position}]: {reason}")]
    BadReplica {
        /// Partition named.
        index: u32,
        /// Position in the replica list.
        position: usize,
        /// Why it did not parse.
        reason: NodeAddrError,
    },
    /// The same node appears twice within one partition.
    #[error("partition {index}: node {node} is listed more than once")]
    DuplicateNode {
        /// Partition named.
        index: u32,
        /// The repeated node.
        node: NodeAddr,
    },
}

/// Every rule a rejected map broke; the map is refused whole.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct InvalidTopology(pub Vec<TopologyError>);

impl fmt::Display for InvalidTopology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid topology: ")?;
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

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
    /// The epoch is at its largest value; no change can be fenced above it.
    #[error("the epoch cannot be raised above {0}")]
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

fn parse_bound(index: u32, field: &'static str, value: &str) -> Result<u32, TopologyError> {
    let bad = || TopologyError::BadRangeBound {
        index,
        field,
        value: value.to_owned(),
    };
    if value.len() != 8 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    u32::from_str_radix(value, 16).map_err(|_| bad())
}

impl ShardMap {
    /// Parse and validate a JSON document (file or HTTP body).
    pub fn from_json(bytes: &[u8]) -> Result<ShardMap, InvalidTopology> {
        let doc: TopologyDoc = serde_json::from_slice(bytes)
            .map_err(|e| InvalidTopology(vec![TopologyError::Malformed(e.to_string())]))?;
        ShardMap::from_doc(&doc)
    }

    /// Validate a parsed document, reporting every broken rule at once.
    pub fn from_doc(doc: &TopologyDoc) -> Result<ShardMap, InvalidTopology> {
        let mut errors = Vec::new();
        if doc.partitions.is_empty() {
            errors.push(TopologyError::Empty);
        }
        if doc.partition_count as usize != doc.partitions.len() {
            errors.push(TopologyError::CountMismatch {
                declared: doc.partition_count,
                actual: doc.partitions.len(),
            });
        }

        let mut seen_index = std::collections::HashSet::new();
        let mut partitions = Vec::with_capacity(doc.partitions.len());
        // Ranges that parsed, even if the partition has other faults, so coverage
        // problems are reported alongside node problems.
        let mut ranges: Vec<(HashRange, u32)> = Vec::with_capacity(doc.partitions.len());
        for p in &doc.partitions {
            let index = p.partition_index;
            if !seen_index.insert(index) {
                errors.push(TopologyError::DuplicateIndex { index });
            }
            let start = parse_bound(index, "hashRangeStart", &p.hash_range_start);
            let end = parse_bound(index, "hashRangeEnd", &p.hash_range_end);
            let range = match (start, end) {
                (Ok(start), Ok(end)) if start <= end => Some(HashRange { start, end }),
                (Ok(start), Ok(end)) => {
                    errors.push(TopologyError::InvertedRange { index, start, end });
                    None
                }
                (s, e) => {
                    errors.extend(s.err());
                    errors.extend(e.err());
                    None
                }
            };
            if let Some(r) = range {
                ranges.push((r, index));
            }

            let primary = p
                .primary_node_ip
                .parse::<NodeAddr>()
                .map_err(|reason| errors.push(TopologyError::BadPrimary { index, reason }))
                .ok();
            let mut replicas = Vec::with_capacity(p.replica_node_ips.len());
            for (position, r) in p.replica_node_ips.iter().enumerate() {
                match r.parse::<NodeAddr>() {
                    Ok(addr) => replicas.push(addr),
                    Err(reason) => errors.push(TopologyError::BadReplica {
                        index,
                        position,
                        reason,
                    }),
                }
            }
            let mut seen_node = std::collections::HashSet::new();
            for node in primary.iter().chain(replicas.iter()) {
                if !seen_node.insert(*node) {
                    errors.push(TopologyError::DuplicateNode { index, node: *node });
                }
            }
            if let (Some(range), Some(primary)) = (range, primary) {
                partitions.push(Partition {
                    index,
                    primary,
                    replicas,
                    range,
                });
            }
        }

        check_coverage(&mut ranges, &mut errors);
        if !errors.is_empty() {
            return Err(InvalidTopology(errors));
        }
        partitions.sort_by_key(|p| p.range.start);
        let starts = partitions.iter().map(|p| p.range.start).collect();
        Ok(ShardMap {
            epoch: doc.cluster_epoch,
            master_node_id: doc.master_node_id.clone(),
            partitions,
            starts,
        })
    }

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
        self.epoch
            .checked_add(1)
            .ok_or(MapEditError::EpochExhausted(self.epoch))
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

/// Ranges must tile `00000000..=ffffffff` with no gap and no overlap.
fn check_coverage(ranges: &mut [(HashRange, u32)], errors: &mut Vec<TopologyError>) {
    ranges.sort_by_key(|(r, _)| (r.start, r.end));
    // The next position that must be covered; `None` once ffffffff is covered.
    let mut next: Option<u32> = Some(0);
    let mut prev: Option<(HashRange, u32)> = None;
    for &(range, index) in ranges.iter() {
        match next {
            Some(n) if range.start > n => errors.push(TopologyError::Gap {
                index,
                start: range.start,
                gap_start: n,
                gap_end: range.start - 1,
            }),
            Some(n) if range.start < n => errors.push(TopologyError::Overlap {
                index,
                start: range.start,
                end: range.end,
                other: prev.map_or(index, |(_, i)| i),
            }),
            None => errors.push(TopologyError::Overlap {
                index,
                start: range.start,
                end: range.end,
                other: prev.map_or(index, |(_, i)| i),
            }),
            Some(_) => {}
        }
        // Keep the furthest end so one long range is not "forgotten" by a short one inside it.
        let reach = prev.map_or(range.end, |(p, _)| p.end.max(range.end));
        next = reach.checked_add(1);
        if prev.is_none_or(|(p, _)| range.end >= p.end) {
            prev = Some((range, index));
        }
    }
    if let (Some(gap_start), Some((last, index))) = (next, prev) {
        errors.push(TopologyError::ShortEnd {
            index,
            end: last.end,
            gap_start,
        });
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

    pub(crate) const SPEC_EXAMPLE: &str = r#"{
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

    fn doc() -> TopologyDoc {
        serde_json::from_str(SPEC_EXAMPLE).unwrap()
    }

    fn errors_of(doc: &TopologyDoc) -> Vec<TopologyError> {
        ShardMap::from_doc(doc).unwrap_err().0
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
    fn unknown_fields_are_ignored_and_hex_case_does_not_matter() {
        let text = SPEC_EXAMPLE
            .replace(
                "\"masterNodeId\"",
                "\"futureField\": [1,2], \"masterNodeId\"",
            )
            .replace("aaaaaaab", "AAAAAAAB");
        assert!(ShardMap::from_json(text.as_bytes()).is_ok());
    }

    #[test]
    fn missing_required_field_is_malformed() {
        let text = SPEC_EXAMPLE.replace("\"masterNodeId\": \"node_master_001.prod\",", "");
        let err = ShardMap::from_json(text.as_bytes()).unwrap_err();
        assert!(matches!(&err.0[0], TopologyError::Malformed(m) if m.contains("masterNodeId")));
    }

    #[test]
    fn count_mismatch_is_named() {
        let mut d = doc();
        d.partition_count = 4;
        assert_eq!(
            errors_of(&d),
            vec![TopologyError::CountMismatch {
                declared: 4,
                actual: 3
            }]
        );
    }

    #[test]
    fn duplicate_index_is_named() {
        let mut d = doc();
        d.partitions[2].partition_index = 1;
        assert_eq!(
            errors_of(&d),
            vec![TopologyError::DuplicateIndex { index: 1 }]
        );
    }

    #[test]
    fn gap_overlap_and_short_end_are_each_named() {
        let mut d = doc();
        d.partitions[1].hash_range_start = "55555557".into();
        assert!(matches!(
            errors_of(&d)[..],
            [TopologyError::Gap {
                index: 1,
                gap_start: 0x5555_5556,
                gap_end: 0x5555_5556,
                ..
            }]
        ));

        let mut d = doc();
        d.partitions[1].hash_range_start = "55555555".into();
        assert!(matches!(
            errors_of(&d)[..],
            [TopologyError::Overlap {
                index: 1,
                other: 0,
                ..
            }]
        ));

        let mut d = doc();
        d.partitions[2].hash_range_end = "fffffffe".into();
        assert!(matches!(
            errors_of(&d)[..],
            [TopologyError::ShortEnd { index: 2, .. }]
        ));

        let mut d = doc();
        d.partitions[0].hash_range_start = "00000001".into();
        assert!(matches!(
            errors_of(&d)[..],
            [TopologyError::Gap {
                index: 0,
                gap_start: 0,
                ..
            }]
        ));
    }

    #[test]
    fn a_range_nested_inside_another_is_an_overlap() {
        let mut d = doc();
        d.partitions[0].hash_range_end = "ffffffff".into();
        let errs = errors_of(&d);
        assert!(
            errs.iter()
                .all(|e| matches!(e, TopologyError::Overlap { other: 0, .. }))
        );
        assert_eq!(errs.len(), 2);
    }

    #[test]
    fn bad_bounds_and_inverted_ranges_are_named() {
        let mut d = doc();
        d.partitions[0].hash_range_end = "5555555".into();
        assert!(errors_of(&d).contains(&TopologyError::BadRangeBound {
            index: 0,
            field: "hashRangeEnd",
            value: "5555555".into()
        }));
        let mut d = doc();
        d.partitions[0].hash_range_end = "+5555555".into();
        assert!(matches!(
            errors_of(&d)[0],
            TopologyError::BadRangeBound { index: 0, .. }
        ));
        let mut d = doc();
        d.partitions[1].hash_range_start = "bbbbbbbb".into();
        assert!(errors_of(&d).contains(&TopologyError::InvertedRange {
            index: 1,
            start: 0xbbbb_bbbb,
            end: 0xaaaa_aaaa
        }));
    }

    #[test]
    fn node_rules_are_named() {
        let mut d = doc();
        d.partitions[1].primary_node_ip = "".into();
        assert_eq!(
            errors_of(&d),
            vec![TopologyError::BadPrimary {
                index: 1,
                reason: NodeAddrError::Empty
            }]
        );
        let mut d = doc();
        d.partitions[2].replica_node_ips = vec!["10.0.3.6".into(), "not-an-ip".into()];
        assert!(matches!(
            errors_of(&d)[..],
            [TopologyError::BadReplica {
                index: 2,
                position: 1,
                ..
            }]
        ));
        let mut d = doc();
        d.partitions[0].replica_node_ips = vec!["10.0.1.5".into()];
        assert!(matches!(
            errors_of(&d)[..],
            [TopologyError::DuplicateNode { index: 0, .. }]
        ));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut d = doc();
        d.partition_count = 7;
        d.partitions[0].primary_node_ip = "x".into();
        d.partitions[2].hash_range_end = "zz".into();
        assert_eq!(errors_of(&d).len(), 4, "{:?}", errors_of(&d));
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
    fn the_epoch_never_wraps() {
        let map = ShardMap::from_doc(&doc()).unwrap().with_epoch(u64::MAX);
        assert_eq!(
            map.next_epoch(),
            Err(MapEditError::EpochExhausted(u64::MAX))
        );
        assert!(map.promote(0, "10.0.1.6".parse().unwrap()).is_err());
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
