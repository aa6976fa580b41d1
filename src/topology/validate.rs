//! The rules of SPEC §2 a map must keep, checked all at once so an invalid
//! map is refused with every broken rule named, each with its partition.

use super::{HashRange, NodeAddr, NodeAddrError, Partition, ShardMap, TopologyDoc};
use std::fmt;

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

#[cfg(test)]
mod tests {
    use super::super::tests::{SPEC_EXAMPLE, doc};
    use super::*;
    use crate::topology::NodeAddrError;

    fn errors_of(doc: &TopologyDoc) -> Vec<TopologyError> {
        ShardMap::from_doc(doc).unwrap_err().0
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
}
