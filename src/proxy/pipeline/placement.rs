//! Stage 2, placement: the partition of the map in force that owns the
//! request. A placement is kept, so the request can be placed again under a
//! newer map; and a write is refused while the map in force is older than
//! `max_staleness` (its primaries may no longer be primaries).

use super::super::error::ProxyError;
use crate::routing::{RequestClass, RoutePartition, RouteTable};
use std::time::Duration;

/// Where a request belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// The key's ring position.
    Position(u32),
    /// A fixed partition (keyless requests, when configured).
    Index(u32),
}

/// The partition of `table` that `placement` names.
pub(crate) fn place(
    table: &RouteTable,
    placement: Placement,
) -> Result<&RoutePartition, ProxyError> {
    match placement {
        Placement::Position(pos) => Ok(table.partition_for(pos)),
        Placement::Index(i) => table.partition_by_index(i).ok_or_else(|| {
            ProxyError::MissingShardKey(format!(
                "no shard key, and the keyless partition {i} is not in the map"
            ))
        }),
    }
}

/// Refuse a write under a map confirmed `age` ago when that is beyond `max`.
pub(crate) fn check_fresh(
    class: RequestClass,
    max: Option<Duration>,
    age: impl FnOnce() -> Duration,
) -> Result<(), ProxyError> {
    if class == RequestClass::Write
        && let Some(max) = max
    {
        let age = age();
        if age > max {
            return Err(ProxyError::TopologyStale {
                age_secs: age.as_secs(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::MapOrigin;
    use crate::telemetry::Metrics;
    use crate::topology::ShardMap;
    use crate::upstream::UpstreamFactory;
    use std::sync::Arc;
    use tokio::time::Instant;

    fn table() -> RouteTable {
        let map = ShardMap::from_json(
            br#"{"clusterEpoch":1,"masterNodeId":"t","partitionCount":2,"partitions":[
            {"partitionIndex":7,"primaryNodeIp":"127.0.0.1:1","replicaNodeIps":[],
             "hashRangeStart":"00000000","hashRangeEnd":"7fffffff"},
            {"partitionIndex":3,"primaryNodeIp":"127.0.0.1:2","replicaNodeIps":[],
             "hashRangeStart":"80000000","hashRangeEnd":"ffffffff"}]}"#,
        )
        .unwrap();
        let metrics = Arc::new(Metrics::new());
        let settings = super::super::tests::settings();
        let factory = UpstreamFactory::new(settings.upstream.clone(), metrics.clone()).unwrap();
        RouteTable::build(
            Arc::new(map),
            None,
            &factory,
            80,
            &metrics,
            MapOrigin {
                source: "t".into(),
                applied_at: Instant::now(),
            },
        )
    }

    #[test]
    fn a_position_is_placed_in_the_range_that_owns_it() {
        let t = table();
        assert_eq!(place(&t, Placement::Position(0)).unwrap().index, 7);
        assert_eq!(
            place(&t, Placement::Position(0x7fff_ffff)).unwrap().index,
            7
        );
        assert_eq!(
            place(&t, Placement::Position(0x8000_0000)).unwrap().index,
            3
        );
    }

    #[test]
    fn a_fixed_partition_must_be_in_the_map() {
        let t = table();
        assert_eq!(place(&t, Placement::Index(3)).unwrap().index, 3);
        let e = place(&t, Placement::Index(9)).err().unwrap();
        assert_eq!(e.code(), "missing_shard_key");
    }

    #[test]
    fn only_writes_are_refused_under_a_stale_map() {
        let max = Some(Duration::from_secs(10));
        let old = || Duration::from_secs(11);
        assert_eq!(
            check_fresh(RequestClass::Write, max, old)
                .unwrap_err()
                .code(),
            "topology_stale"
        );
        assert!(check_fresh(RequestClass::Read, max, old).is_ok());
        assert!(check_fresh(RequestClass::Write, max, || Duration::from_secs(9)).is_ok());
        assert!(check_fresh(RequestClass::Write, None, old).is_ok());
    }
}
