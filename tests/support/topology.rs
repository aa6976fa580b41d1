//! Shard maps for tests: even splits over given nodes, the SPEC example,
//! one broken variant per validation rule, and keys that land where a test
//! needs them.

use std::net::SocketAddr;

/// Coordinator flags for failure detection in clusters whose agents beat every
/// 0.2 s: a timeout of ten intervals, so a loaded machine stalling an agent does
/// not fail over a node the test keeps alive, and a quick sweep.
pub(crate) const DETECTION_FLAGS: [&str; 4] =
    ["--heartbeat-timeout", "2", "--sweep-interval", "0.1"];

/// Two partitions, each a primary and a replica, on fixed loopback addresses
/// no proxy dials (127.0.0.10/.11 and .20/.21, port 9000): the control plane's
/// test cluster.
pub(crate) fn two_partition_map(epoch: u64) -> String {
    let a = |s: &str| s.parse().unwrap();
    topology(
        epoch,
        &[
            (a("127.0.0.10:9000"), vec![a("127.0.0.11:9000")]),
            (a("127.0.0.20:9000"), vec![a("127.0.0.21:9000")]),
        ],
    )
}

/// A map splitting the ring evenly over `partitions` (primary, replicas).
pub(crate) fn topology(epoch: u64, partitions: &[(SocketAddr, Vec<SocketAddr>)]) -> String {
    let n = partitions.len() as u64;
    let span = (1u64 << 32) / n;
    let parts: Vec<_> = partitions
        .iter()
        .enumerate()
        .map(|(i, (primary, replicas))| {
            let start = span * i as u64;
            let end = if i as u64 == n - 1 {
                u32::MAX as u64
            } else {
                start + span - 1
            };
            serde_json::json!({
                "partitionIndex": i,
                "primaryNodeIp": primary.to_string(),
                "replicaNodeIps": replicas.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "hashRangeStart": format!("{start:08x}"),
                "hashRangeEnd": format!("{end:08x}"),
            })
        })
        .collect();
    serde_json::json!({
        "clusterEpoch": epoch,
        "masterNodeId": "test-coordinator",
        "partitionCount": partitions.len(),
        "partitions": parts,
    })
    .to_string()
}

/// The SPEC §2 example map (epoch 10294).
pub(crate) const SPEC_EXAMPLE: &str = include_str!("../fixtures/spec_example.json");

/// One broken variant of a valid map per validation rule of SPEC §2:
/// (rule, map text, a fragment the error message must contain).
pub(crate) fn invalid_maps(valid: &str) -> Vec<(&'static str, String, &'static str)> {
    let base: serde_json::Value = serde_json::from_str(valid).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = base.clone();
        f(&mut v);
        v.to_string()
    };
    vec![
        (
            "count mismatch",
            edit(&|v| v["partitionCount"] = 4.into()),
            "partitionCount is 4 but 3 partitions are listed",
        ),
        (
            "duplicate index",
            edit(&|v| v["partitions"][2]["partitionIndex"] = 1.into()),
            "partition 1: partitionIndex is used by more than one partition",
        ),
        (
            "gap",
            edit(&|v| v["partitions"][1]["hashRangeStart"] = "55555557".into()),
            "partition 1: range starts at 55555557, leaving 55555556..55555556 uncovered",
        ),
        (
            "overlap",
            edit(&|v| v["partitions"][1]["hashRangeStart"] = "55555550".into()),
            "partition 1: range 55555550..aaaaaaaa overlaps partition 0",
        ),
        (
            "does not start at zero",
            edit(&|v| v["partitions"][0]["hashRangeStart"] = "00000010".into()),
            "partition 0: range starts at 00000010, leaving 00000000..0000000f uncovered",
        ),
        (
            "does not reach ffffffff",
            edit(&|v| v["partitions"][2]["hashRangeEnd"] = "fffffff0".into()),
            "partition 2: the last range ends at fffffff0, leaving fffffff1..ffffffff uncovered",
        ),
        (
            "bound not 8 hex digits",
            edit(&|v| v["partitions"][1]["hashRangeEnd"] = "aaaaaaa".into()),
            "partition 1: hashRangeEnd \"aaaaaaa\" is not 8 hex digits",
        ),
        (
            "inverted range",
            edit(&|v| v["partitions"][1]["hashRangeEnd"] = "55555555".into()),
            "partition 1: hashRangeStart 55555556 is above hashRangeEnd 55555555",
        ),
        (
            "missing primary",
            edit(&|v| v["partitions"][0]["primaryNodeIp"] = "".into()),
            "partition 0: primaryNodeIp: address is empty",
        ),
        (
            "unparseable primary",
            edit(&|v| v["partitions"][2]["primaryNodeIp"] = "db-3.internal".into()),
            "partition 2: primaryNodeIp: \"db-3.internal\" is not an IP address",
        ),
        (
            "unparseable replica",
            edit(&|v| v["partitions"][0]["replicaNodeIps"][1] = "10.0.1.999".into()),
            "partition 0: replicaNodeIps[1]",
        ),
        (
            "node listed twice",
            edit(&|v| v["partitions"][1]["replicaNodeIps"] = serde_json::json!(["10.0.2.5"])),
            "partition 1: node 10.0.2.5 is listed more than once",
        ),
        (
            "no partitions",
            edit(&|v| {
                v["partitions"] = serde_json::json!([]);
                v["partitionCount"] = 0.into();
            }),
            "no partitions",
        ),
        (
            "required field missing",
            edit(&|v| {
                v.as_object_mut().unwrap().remove("clusterEpoch");
            }),
            "missing field `clusterEpoch`",
        ),
        (
            "not JSON",
            "{\"clusterEpoch\": ".to_owned(),
            "not a topology document",
        ),
    ]
}

/// A key whose hash lands in partition `index` of an even `n`-way split.
pub(crate) fn key_for_partition(index: usize, n: usize) -> String {
    let span = (1u64 << 32) / n as u64;
    (0..)
        .map(|i| format!("k{i}"))
        .find(|k| {
            let pos = u64::from(shardgate::topology::key_position(k.as_bytes()));
            let p = ((pos / span) as usize).min(n - 1);
            p == index
        })
        .unwrap()
}
