//! The PostgreSQL store against a real server (started by scripts/test):
//! schema, heartbeats, leadership, compare-and-set promotions, pruning.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use shardgate::coordinator::state::{ClusterState, Persisted};
use shardgate::coordinator::store::{Commit, PgStore, SharedStore, Store};
use shardgate::proto::heartbeat_response::Command;
use shardgate::topology::ShardMap;
use std::time::Duration;
use support::*;

fn initial(epoch: u64) -> Persisted {
    let map = ShardMap::from_json(two_partition_map(epoch).as_bytes()).unwrap();
    ClusterState::new(map, "coord", tokio::time::Instant::now()).persisted()
}

#[tokio::test]
async fn migrations_create_the_spec_schema_and_are_idempotent() {
    let url = pg_database().await;
    let _first = PgStore::connect(&url, "a").await.unwrap();
    let _second = PgStore::connect(&url, "b").await.unwrap(); // applies nothing twice
    let c = pg_client(&url).await;
    for table in [
        "cluster_nodes",
        "node_heartbeats",
        "replication_logs",
        "data_partitions",
        "cluster_state",
    ] {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = $1",
                &[&table],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "{table}");
    }
    for index in [
        "idx_nodes_status",
        "idx_heartbeats_lookup",
        "idx_replication_status",
        "idx_partitions_range",
    ] {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_indexes WHERE indexname = $1",
                &[&index],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "{index}");
    }
    // The SPEC's columns, with their types.
    let cols: Vec<(String, String)> = c
        .query(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'cluster_nodes'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (col, ty) in [
        ("node_id", "uuid"),
        ("ip_address", "character varying"),
        ("node_role", "character varying"),
        ("node_status", "character varying"),
        ("cpu_utilization", "numeric"),
        ("memory_free_bytes", "bigint"),
        ("last_heartbeat_at", "timestamp with time zone"),
        ("created_at", "timestamp with time zone"),
    ] {
        assert!(
            cols.contains(&(col.into(), ty.into())),
            "cluster_nodes.{col} {ty}: {cols:?}"
        );
    }
    let versions: Vec<i32> = c
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3]);
}

#[tokio::test]
async fn heartbeats_land_in_cluster_nodes_and_node_heartbeats_and_the_map_is_mirrored() {
    let url = pg_database().await;
    let dir = tempfile::tempdir().unwrap();
    let coord = BinCoordinator::on_store(&url, dir.path(), "coord-a", &[]).await;
    let mut grpc = coord.grpc_client().await;
    for _ in 0..3 {
        let r = grpc
            .report_heartbeat(heartbeat_req("p0-primary", "127.0.0.10:9000", unix_ms()))
            .await
            .unwrap();
        assert_eq!(r.into_inner().recommended_command, Command::Continue as i32);
    }
    let c = pg_client(&url).await;
    let row = c
        .query_one(
            "SELECT node_name, node_status, node_role, cpu_utilization::float8, memory_free_bytes,
                    (SELECT count(*) FROM node_heartbeats h WHERE h.node_id = n.node_id)
               FROM cluster_nodes n WHERE ip_address = '127.0.0.10:9000'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some("p0-primary")
    );
    assert_eq!(row.get::<_, String>(1), "ACTIVE");
    assert_eq!(row.get::<_, String>(2), "MASTER");
    assert_eq!(row.get::<_, f64>(3), 10.0);
    assert_eq!(row.get::<_, i64>(4), 1 << 30);
    assert_eq!(
        row.get::<_, i64>(5),
        3,
        "every heartbeat appended to the history"
    );
    let load: serde_json::Value = c
        .query_one(
            "SELECT system_load_status FROM node_heartbeats LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(load["activeConnections"], 3);
    // data_partitions mirrors the map.
    let parts: Vec<(i32, String)> = c
        .query(
            "SELECT dp.partition_index, n.ip_address FROM data_partitions dp
               JOIN cluster_nodes n ON n.node_id = dp.primary_node_id ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        parts,
        [(0, "127.0.0.10:9000".into()), (1, "127.0.0.20:9000".into())]
    );
}

#[tokio::test]
async fn two_coordinators_have_one_leader_and_hand_over_without_a_double_promotion() {
    let url = pg_database().await;
    let dir = tempfile::tempdir().unwrap();
    // The leader sees the follower's agents through the store, and promotes once.
    let (leader, follower, agents, m) = failed_over_through_a_shared_store(&url, dir.path()).await;
    let master = m["masterNodeId"].as_str().unwrap();
    assert!(
        master == "coord-a" || master == "coord-b",
        "masterNodeId names the leader: {master}"
    );

    // The leader dies; the follower takes over, and does not promote again.
    leader.proc.kill().await;
    eventually(Duration::from_secs(15), "the follower leads", || async {
        follower.is_leader().await
    })
    .await;
    // A few sweeps under the new leader.
    let c = pg_client(&url).await;
    let before: i64 = c
        .query_one("SELECT cluster_epoch FROM cluster_state", &[])
        .await
        .unwrap()
        .get(0);
    eventually(Duration::from_secs(5), "new leader has swept", || async {
        let m = send(
            &client(),
            http::Request::get(follower.url("/metrics"))
                .body(empty())
                .unwrap(),
        )
        .await
        .text();
        m.contains("shardgate_coordinator_is_leader 1")
    })
    .await;
    let p1_epoch = follower.epoch().await;
    assert_eq!(p1_epoch, 11);
    assert_eq!(before, 11, "exactly one promotion across the handover");
    // One primary per partition in the table, and the old primary fenced.
    let primaries: i64 = c
        .query_one(
            "SELECT count(DISTINCT primary_node_id) FROM data_partitions",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(primaries, 2);
    let fenced: bool = c
        .query_one(
            "SELECT fenced FROM cluster_nodes WHERE ip_address = '127.0.0.10:9000'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(fenced);
    // The promoted node was told REBALANCE exactly once across both coordinators.
    eventually(
        Duration::from_secs(5),
        "promoted agent heard REBALANCE",
        || async { agents[0].stderr().contains("REBALANCE") },
    )
    .await;
    assert_eq!(agents[0].stderr().matches("says REBALANCE").count(), 1);
}

#[tokio::test]
async fn a_stale_leaders_promotion_loses_the_compare_and_set() {
    let url = pg_database().await;
    let a = PgStore::connect(&url, "coord-a").await.unwrap();
    let b = PgStore::connect(&url, "coord-b").await.unwrap();
    assert_eq!(a.commit(None, &initial(10)).await.unwrap(), Commit::Won);
    assert_eq!(
        b.commit(None, &initial(10)).await.unwrap(),
        Commit::Lost,
        "only one initialises"
    );

    // Both decide a promotion from epoch 10 — a stale leader and the new one.
    let mut from_a = b.load().await.unwrap().unwrap();
    from_a.map.cluster_epoch = 11;
    from_a.map.partitions[0].primary_node_ip = "127.0.0.11:9000".into();
    from_a.map.partitions[0].replica_node_ips = vec![];
    let mut from_b = from_a.clone();
    from_b.map.partitions[1].primary_node_ip = "127.0.0.21:9000".into();
    from_b.map.partitions[1].replica_node_ips = vec![];
    from_b.map.partitions[0] = initial(10).map.partitions[0].clone();

    assert_eq!(b.commit(Some(10), &from_b).await.unwrap(), Commit::Won);
    assert_eq!(a.commit(Some(10), &from_a).await.unwrap(), Commit::Lost);
    let stored = a.load().await.unwrap().unwrap();
    assert_eq!(stored.map.cluster_epoch, 11);
    assert_eq!(
        stored.map.partitions[0].primary_node_ip, "127.0.0.10:9000",
        "the stale promotion left no trace"
    );
    assert_eq!(stored.map.partitions[1].primary_node_ip, "127.0.0.21:9000");
}

#[tokio::test]
async fn exactly_one_store_holds_the_leader_lock_until_it_lets_go() {
    let url = pg_database().await;
    let a = PgStore::connect(&url, "a").await.unwrap();
    let b = PgStore::connect(&url, "b").await.unwrap();
    assert!(a.lead().await.unwrap());
    assert!(!b.lead().await.unwrap());
    assert!(a.lead().await.unwrap(), "the leader keeps leading");
    a.resign().await;
    eventually(Duration::from_secs(5), "b takes over", || async {
        b.lead().await.unwrap()
    })
    .await;
    assert!(!a.lead().await.unwrap());
}

/// A fresh database holding a map, its store, and a heartbeat to record.
async fn store_with_a_map() -> (String, PgStore, shardgate::coordinator::state::Heartbeat) {
    let url = pg_database().await;
    let store = PgStore::connect(&url, "a").await.unwrap();
    store.commit(None, &initial(1)).await.unwrap();
    let hb = shardgate::coordinator::state::Heartbeat {
        node_id: "n".into(),
        addr: "127.0.0.10:9000".parse().unwrap(),
        node_time_ms: unix_ms(),
        usage: Default::default(),
        replication: None,
    };
    (url, store, hb)
}

#[tokio::test]
async fn heartbeat_history_is_pruned_by_age() {
    let (url, store, hb) = store_with_a_map().await;
    for _ in 0..5 {
        store
            .record_heartbeat(
                &hb,
                shardgate::coordinator::state::NodeStatus::Active,
                0,
                Duration::ZERO,
            )
            .await
            .unwrap();
    }
    let c = pg_client(&url).await;
    c.execute(
        "UPDATE node_heartbeats SET created_at = NOW() - interval '2 hours'
          WHERE heartbeat_id IN (SELECT heartbeat_id FROM node_heartbeats ORDER BY heartbeat_id LIMIT 3)",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(store.prune(Duration::from_secs(3600)).await.unwrap(), 3);
    let left: i64 = c
        .query_one("SELECT count(*) FROM node_heartbeats", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 2);
}

#[tokio::test]
async fn the_store_reconnects_after_the_database_drops_its_connections() {
    let (url, store, hb) = store_with_a_map().await;
    let active = shardgate::coordinator::state::NodeStatus::Active;
    store
        .record_heartbeat(&hb, active, 0, Duration::ZERO)
        .await
        .unwrap();

    // What an operator's pg_terminate_backend or a database restart does.
    let admin = pg_client(&url).await;
    let killed: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 2, "the store's reader and heartbeat connections");

    // A call may still meet the dead session before the client notices; after
    // that, heartbeats and reads work again without a new store.
    eventually(
        Duration::from_secs(10),
        "heartbeats written again",
        || async {
            store
                .record_heartbeat(&hb, active, 0, Duration::ZERO)
                .await
                .is_ok()
        },
    )
    .await;
    eventually(Duration::from_secs(10), "the map read again", || async {
        store.load().await.is_ok_and(|p| p.is_some())
    })
    .await;
    let beats: i64 = admin
        .query_one("SELECT count(*) FROM node_heartbeats", &[])
        .await
        .unwrap()
        .get(0);
    assert!(beats >= 2, "history kept and appended: {beats}");
}

/// One heartbeat from each `(id, addr)` node.
async fn beat_all(
    grpc: &mut shardgate::proto::cluster_discovery_service_client::ClusterDiscoveryServiceClient<
        tonic::transport::Channel,
    >,
    nodes: &[(&str, &str)],
) {
    for (id, addr) in nodes {
        grpc.report_heartbeat(heartbeat_req(id, addr, unix_ms()))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_promotion_is_served_only_once_it_is_committed() {
    let url = pg_database().await;
    let dir = tempfile::tempdir().unwrap();
    let coord = BinCoordinator::on_store(&url, dir.path(), "coord-a", &[]).await;
    let mut grpc = coord.grpc_client().await;
    let live = [
        ("p0-replica", "127.0.0.11:9000"),
        ("p1-primary", "127.0.0.20:9000"),
        ("p1-replica", "127.0.0.21:9000"),
    ];
    beat_all(&mut grpc, &[("p0-primary", "127.0.0.10:9000")]).await;
    beat_all(&mut grpc, &live).await;
    assert_eq!(coord.epoch().await, 10);

    // Hold the map's row: the promotion's compare-and-set cannot commit.
    let mut blocker = pg_client(&url).await;
    let held = blocker.transaction().await.unwrap();
    held.query_one("SELECT cluster_epoch FROM cluster_state FOR UPDATE", &[])
        .await
        .unwrap();

    // p0's primary falls silent; the coordinator marks it dead and decides
    // the promotion in the same sweep, then waits on the row.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        beat_all(&mut grpc, &live).await;
        let primary = coord.node("p0-primary").await.unwrap();
        if primary["status"] == "DEAD" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "p0's primary never died"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // However often it is asked while the commit waits, the map served is the committed one.
    for _ in 0..10 {
        assert_eq!(coord.epoch().await, 10, "an uncommitted map was served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    held.rollback().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while coord.epoch().await != 11 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the promotion never committed"
        );
        beat_all(&mut grpc, &live).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = pg_client(&url)
        .await
        .query_one("SELECT cluster_epoch FROM cluster_state", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(stored, 11, "what is served is what the store holds");
}

#[tokio::test]
async fn replication_logs_rows_follow_what_the_replicas_report() {
    let url = pg_database().await;
    let p = Partition::start_on(&[&[], &[], &[]], false, Some(&url)).await;
    let primary = &p.nodes[0];
    for i in 0..20 {
        assert_eq!(primary.put(&format!("k{i}"), "v").await.status, 200);
    }
    let c = pg_client(&url).await;
    // One current row per (primary, replica) pair, at the primary's sequence.
    let want: i64 = primary.status().await.unwrap()["lastReplicatedSequence"]
        .as_i64()
        .unwrap();
    assert!(want >= 20);
    let query =
        "SELECT s.ip_address, t.ip_address, rl.replication_status, rl.last_replicated_sequence,
                        rl.replication_lag_bytes, rl.applied_hlc, rl.partition_index
                   FROM replication_logs rl
                   JOIN cluster_nodes s ON s.node_id = rl.source_node_id
                   JOIN cluster_nodes t ON t.node_id = rl.target_node_id
                  ORDER BY t.ip_address";
    type Row = (String, String, String, i64, i64, i64, Option<i32>);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let last: Vec<Row> = loop {
        let rows: Vec<Row> = c
            .query(query, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    r.get(3),
                    r.get(4),
                    r.get(5),
                    r.get(6),
                )
            })
            .collect();
        if rows.len() == 2 && rows.iter().all(|r| r.3 == want && r.2 == "IN_SYNC") {
            break rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replication_logs never caught up with sequence {want}: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut targets: Vec<String> = p.nodes[1..].iter().map(|n| n.addr.to_string()).collect();
    targets.sort();
    for (row, target) in last.iter().zip(&targets) {
        assert_eq!(row.0, primary.addr.to_string(), "source is the primary");
        assert_eq!(&row.1, target);
        assert_eq!(row.4, 0, "no bytes behind");
        assert!(row.5 > 0, "the applied HLC is kept");
        assert_eq!(row.6, Some(0), "partition 0");
    }
}
