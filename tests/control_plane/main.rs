//! The coordinator and agents, as real processes, with a real tonic client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod abuse;

use shardgate::proto::heartbeat_response::Command;
use std::path::Path;
use std::time::Duration;
use support::*;

const NODES: [(&str, &str); 4] = [
    ("p0-primary", "127.0.0.10:9000"),
    ("p0-replica", "127.0.0.11:9000"),
    ("p1-primary", "127.0.0.20:9000"),
    ("p1-replica", "127.0.0.21:9000"),
];

struct Cluster {
    coordinator: BinCoordinator,
    /// Holds the state file and map for the cluster's lifetime.
    _dir: tempfile::TempDir,
}

async fn coordinator_in(dir: &Path, extra: &[&str]) -> BinCoordinator {
    let topo = dir.join("map.json");
    if !topo.exists() {
        std::fs::write(&topo, two_partition_map(10)).unwrap();
    }
    let store = format!("file:{}", dir.join("state.json").display());
    let config = dir.join("coordinator.toml");
    if !config.exists() {
        std::fs::write(
            &config,
            "[coordinator]\nid = \"coord-a\"\nmax_clock_skew = \"100ms\"\nfailover_hold_down = \"1s\"\n\
             watch_timeout = \"5s\"\nadmin_token = \"s3cret\"\n",
        )
        .unwrap();
    }
    let mut args = vec![
        "--config",
        config.to_str().unwrap(),
        "--topology",
        topo.to_str().unwrap(),
        "--store",
        &store,
    ];
    args.extend_from_slice(&DETECTION_FLAGS);
    args.extend_from_slice(extra);
    BinCoordinator::spawn(&args).await
}

async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = coordinator_in(dir.path(), &[]).await;
    Cluster {
        coordinator,
        _dir: dir,
    }
}

async fn beat(c: &BinCoordinator, id: &str, ip: &str) -> Result<Command, tonic::Status> {
    let mut client = c.grpc_client().await;
    let r = client
        .report_heartbeat(heartbeat_req(id, ip, unix_ms()))
        .await?;
    Ok(Command::try_from(r.into_inner().recommended_command).unwrap())
}

#[tokio::test]
async fn heartbeats_are_answered_continue_with_the_coordinators_clock() {
    let c = cluster().await;
    let mut client = c.coordinator.grpc_client().await;
    let before = unix_ms();
    let r = client
        .report_heartbeat(heartbeat_req("p0-primary", "127.0.0.10:9000", unix_ms()))
        .await
        .unwrap()
        .into_inner();
    let after = unix_ms();
    assert_eq!(r.recommended_command, Command::Continue as i32);
    assert!(
        (before - 5..=after + 5).contains(&r.sync_epoch_timestamp_ms),
        "coordinator clock {} outside [{before}, {after}]",
        r.sync_epoch_timestamp_ms
    );
    let node = c.coordinator.node("p0-primary").await.unwrap();
    assert_eq!(node["status"], "ACTIVE");
    assert_eq!(node["role"], "MASTER");
    assert_eq!(node["partition"], 0);
    assert_eq!(node["activeConnections"], 3);

    // A node the map does not know registers as a WORKER without a partition.
    assert_eq!(
        beat(&c.coordinator, "stray", "127.0.0.99:9000")
            .await
            .unwrap(),
        Command::Continue
    );
    let stray = c.coordinator.node("stray").await.unwrap();
    assert_eq!(
        (stray["role"].as_str(), stray["partition"].is_null()),
        (Some("WORKER"), true)
    );
}

#[tokio::test]
async fn the_standard_grpc_health_service_reports_serving() {
    let c = cluster().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.coordinator.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "codesprintpro.cluster.discovery.v1.ClusterDiscoveryService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn malformed_heartbeats_are_invalid_argument_and_change_nothing() {
    let c = cluster().await;
    let mut client = c.coordinator.grpc_client().await;
    let now = unix_ms();
    for (what, req) in [
        ("empty id", heartbeat_req("", "127.0.0.10:9000", now)),
        ("bad address", heartbeat_req("n", "db-1.internal", now)),
        (
            "absurd timestamp",
            heartbeat_req("n", "127.0.0.10:9000", now + 2 * 86_400_000),
        ),
        ("zero timestamp", heartbeat_req("n", "127.0.0.10:9000", 0)),
    ] {
        let err = client.report_heartbeat(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}");
    }
    let nodes = c.coordinator.get_json("/v1/cluster/nodes").await;
    assert!(nodes["nodes"].as_array().unwrap().is_empty(), "{nodes}");
    assert_eq!(c.coordinator.epoch().await, 10);
}

#[tokio::test]
async fn a_skewed_node_becomes_degraded_and_its_skew_is_exported() {
    let c = cluster().await;
    let mut client = c.coordinator.grpc_client().await;
    client
        .report_heartbeat(heartbeat_req(
            "p1-replica",
            "127.0.0.21:9000",
            unix_ms() + 2_000,
        ))
        .await
        .unwrap();
    let node = c.coordinator.node("p1-replica").await.unwrap();
    assert_eq!(node["status"], "DEGRADED");
    let skew = node["clockSkewMs"].as_i64().unwrap();
    assert!((1_900..=2_100).contains(&skew), "{skew}");
    let metrics = send(
        &client_http(),
        http::Request::get(c.coordinator.url("/metrics"))
            .body(empty())
            .unwrap(),
    )
    .await
    .text();
    assert!(
        metrics.contains("shardgate_coordinator_node_clock_skew_seconds{node=\"p1-replica\"} 1.9")
            || metrics
                .contains("shardgate_coordinator_node_clock_skew_seconds{node=\"p1-replica\"} 2"),
        "{metrics}"
    );
    client
        .report_heartbeat(heartbeat_req("p1-replica", "127.0.0.21:9000", unix_ms()))
        .await
        .unwrap();
    assert_eq!(
        c.coordinator.node("p1-replica").await.unwrap()["status"],
        "ACTIVE"
    );
}

fn client_http()
-> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, BoxBody> {
    client()
}

#[tokio::test]
async fn a_node_flooding_heartbeats_is_rate_limited_without_starving_others() {
    let c = cluster().await;
    let mut client = c.coordinator.grpc_client().await;
    let mut limited = 0;
    for _ in 0..50 {
        if let Err(e) = client
            .report_heartbeat(heartbeat_req("flood", "127.0.0.50:9000", unix_ms()))
            .await
        {
            assert_eq!(e.code(), tonic::Code::ResourceExhausted);
            limited += 1;
        }
    }
    assert!(limited >= 30, "only {limited} of 50 refused");
    assert_eq!(
        beat(&c.coordinator, "calm", "127.0.0.51:9000")
            .await
            .unwrap(),
        Command::Continue
    );
}

#[tokio::test]
async fn a_silent_primary_is_replaced_and_everyone_hears_about_it() {
    let c = cluster().await;
    let coord = &c.coordinator;
    // Real agents for every node, heartbeating every 200 ms.
    let mut agents = Vec::new();
    for (id, ip) in NODES {
        agents.push((id, spawn_agent(coord.grpc, id, ip, "0.2", &[]).await));
    }
    eventually(
        Duration::from_secs(10),
        "all four nodes registered",
        || async {
            coord.get_json("/v1/cluster/nodes").await["nodes"]
                .as_array()
                .unwrap()
                .len()
                == 4
        },
    )
    .await;
    let epoch = coord.epoch().await;

    // A watch waiting for the next epoch, opened before the primary dies.
    let watch_url = coord.url(&format!("/v1/cluster/topology?waitForEpochAbove={epoch}"));
    let watch = tokio::spawn(async move {
        send(
            &client(),
            http::Request::get(watch_url).body(empty()).unwrap(),
        )
        .await
    });

    let (_, primary) = agents.remove(0);
    let killed_at = tokio::time::Instant::now();
    primary.kill().await;

    eventually(
        Duration::from_secs(10),
        "p0-primary DEAD and replaced",
        || async { coord.epoch().await == epoch + 1 },
    )
    .await;
    let took = killed_at.elapsed();
    assert!(
        took < Duration::from_millis(2_000 + 100 + 1_500),
        "{took:?}: timeout + sweep + slack"
    );
    let node = coord.node("p0-primary").await.unwrap();
    assert_eq!(node["status"], "DEAD");
    assert_eq!(node["fenced"], true);

    let map = coord.get_json("/v1/cluster/topology").await;
    assert_eq!(
        map["clusterEpoch"].as_u64(),
        Some(epoch + 1),
        "epoch rose by exactly one"
    );
    assert_eq!(map["partitions"][0]["primaryNodeIp"], "127.0.0.11:9000");
    assert_eq!(
        map["partitions"][0]["replicaNodeIps"],
        serde_json::json!([])
    );
    assert_eq!(map["masterNodeId"], "coord-a");

    let woke = watch.await.unwrap();
    assert_eq!(woke.status, 200);
    assert_eq!(
        woke.json()["clusterEpoch"].as_u64(),
        Some(epoch + 1),
        "the pending watch saw it"
    );

    // The promoted node's agent was told REBALANCE exactly once.
    let promoted = &agents[0].1;
    eventually(Duration::from_secs(5), "agent heard REBALANCE", || async {
        promoted.stderr().contains("REBALANCE")
    })
    .await;
    // Let several more heartbeats go by, then check it was not told again.
    let heard_at = coord.node("p0-replica").await.unwrap()["lastHeartbeatUnixMs"]
        .as_i64()
        .unwrap();
    eventually(Duration::from_secs(5), "three more heartbeats", || async {
        coord.node("p0-replica").await.unwrap()["lastHeartbeatUnixMs"]
            .as_i64()
            .unwrap()
            > heard_at + 500
    })
    .await;
    assert_eq!(
        promoted.stderr().matches("says REBALANCE").count(),
        1,
        "{}",
        promoted.stderr()
    );
    assert_eq!(coord.node("p0-replica").await.unwrap()["role"], "MASTER");

    // The old primary comes back: it is told TERMINATE and its agent exits 3.
    let mut returned = spawn_agent(coord.grpc, "p0-primary", "127.0.0.10:9000", "0.2", &[]).await;
    assert_eq!(returned.exit_code(Duration::from_secs(10)).await, Some(3));
    assert!(returned.stderr().contains("TERMINATE"));
    assert_eq!(coord.epoch().await, epoch + 1, "its return changes nothing");
}

#[tokio::test]
async fn the_state_file_survives_a_restart_with_the_same_epoch_and_promotions() {
    let dir = tempfile::tempdir().unwrap();
    let coord = coordinator_in(dir.path(), &[]).await;
    beat(&coord, "p1-primary", "127.0.0.20:9000").await.unwrap();
    // Everyone but p1's primary keeps heartbeating.
    let mut agents = Vec::new();
    for (id, ip) in NODES.iter().filter(|(id, _)| *id != "p1-primary") {
        agents.push(spawn_agent(coord.grpc, id, ip, "0.2", &[]).await);
    }
    eventually(Duration::from_secs(10), "p1 failed over", || async {
        coord.epoch().await == 11
    })
    .await;
    let promoted = &agents[2];
    eventually(
        Duration::from_secs(5),
        "the promoted node heard REBALANCE",
        || async { promoted.stderr().contains("REBALANCE") },
    )
    .await;
    for a in agents {
        a.kill().await;
    }
    coord.proc.signal("TERM");
    let mut proc = coord.proc;
    assert_eq!(proc.exit_code(Duration::from_secs(10)).await, Some(0));

    // A different --topology must not win over the stored state.
    std::fs::write(dir.path().join("map.json"), two_partition_map(1)).unwrap();
    let again = coordinator_in(dir.path(), &[]).await;
    let m = again.get_json("/v1/cluster/topology").await;
    assert_eq!(m["clusterEpoch"], 11);
    assert_eq!(m["partitions"][1]["primaryNodeIp"], "127.0.0.21:9000");
    // The fencing and what each node was told survived too.
    assert_eq!(
        beat(&again, "p1-primary", "127.0.0.20:9000").await.unwrap(),
        Command::Terminate
    );
    assert_eq!(
        beat(&again, "p1-replica", "127.0.0.21:9000").await.unwrap(),
        Command::Continue
    );
    assert_eq!(again.node("p1-replica").await.unwrap()["role"], "MASTER");
}

#[tokio::test]
async fn the_topology_endpoint_has_etags_and_a_bounded_watch() {
    let c = cluster().await;
    let coord = &c.coordinator;
    let a = send(
        &client(),
        http::Request::get(coord.url("/v1/cluster/topology"))
            .body(empty())
            .unwrap(),
    )
    .await;
    let etag = a.header("etag").unwrap().to_owned();
    assert_eq!(etag, "\"10\"");
    let b = send(
        &client(),
        http::Request::get(coord.url("/v1/cluster/topology"))
            .header("if-none-match", &etag)
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(b.status, 304);
    // Already above: answered at once.
    let started = tokio::time::Instant::now();
    let now = coord
        .get_json("/v1/cluster/topology?waitForEpochAbove=3")
        .await;
    assert_eq!(now["clusterEpoch"], 10);
    // Well under the 5 s hold, with room for a loaded machine.
    assert!(started.elapsed() < Duration::from_secs(2));
    // Not above: held until the watch timeout (5 s here, longer than failure
    // detection so a watch opened before a failover sees it), then the current map.
    let started = tokio::time::Instant::now();
    let held = coord
        .get_json("/v1/cluster/topology?waitForEpochAbove=10")
        .await;
    assert_eq!(held["clusterEpoch"], 10);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(4_900) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    let bad = send(
        &client(),
        http::Request::get(coord.url("/v1/cluster/topology?waitForEpochAbove=x"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(bad.status, 400);
}

#[tokio::test]
async fn operators_change_the_map_only_with_the_token_and_a_valid_map() {
    let c = cluster().await;
    let coord = &c.coordinator;
    let put = |token: Option<&str>, body: String| {
        let mut r = http::Request::put(coord.url("/v1/cluster/topology"));
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        send_owned(r.body(full(body)).unwrap())
    };
    assert_eq!(put(None, two_partition_map(50)).await.status, 401);
    assert_eq!(put(Some("wrong"), two_partition_map(50)).await.status, 401);

    let mut invalid: serde_json::Value = serde_json::from_str(&two_partition_map(50)).unwrap();
    invalid["partitionCount"] = 3.into();
    invalid["partitions"][1]["primaryNodeIp"] = "".into();
    let r = put(Some("s3cret"), invalid.to_string()).await;
    assert_eq!(r.status, 400);
    let errors = r.json()["errors"].as_array().unwrap().len();
    assert_eq!(errors, 2, "every validation error listed: {}", r.text());
    assert_eq!(coord.epoch().await, 10);

    let mut new = serde_json::from_str::<serde_json::Value>(&two_partition_map(2)).unwrap();
    new["partitions"][1]["replicaNodeIps"] = serde_json::json!(["127.0.0.22:9000"]);
    let r = put(Some("s3cret"), new.to_string()).await;
    assert_eq!(
        r.status,
        409,
        "a map older than the one in force: {}",
        r.text()
    );
    assert_eq!(coord.epoch().await, 10);
    new["clusterEpoch"] = 11.into();
    let r = put(Some("s3cret"), new.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["clusterEpoch"], 11);
    assert_eq!(coord.epoch().await, 11);
    // The dropped replica is fenced.
    assert_eq!(
        beat(coord, "p1-replica", "127.0.0.21:9000").await.unwrap(),
        Command::Terminate
    );
}

async fn send_owned(req: http::Request<BoxBody>) -> Answer {
    send(&client(), req).await
}

#[tokio::test]
async fn heartbeats_need_the_token_when_one_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("coordinator.toml"),
        "[coordinator]\nheartbeat_token = \"hb-token\"\n",
    )
    .unwrap();
    let coord = coordinator_in(dir.path(), &[]).await;
    let err = beat(&coord, "p0-primary", "127.0.0.10:9000")
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut client = coord.grpc_client().await;
    let mut req = tonic::Request::new(heartbeat_req("p0-primary", "127.0.0.10:9000", unix_ms()));
    req.metadata_mut()
        .insert("authorization", "Bearer hb-token".parse().unwrap());
    assert!(client.report_heartbeat(req).await.is_ok());
    // The agent reads it from its environment.
    let token_agent = tokio::process::Command::new(binary())
        .args([
            "agent",
            "--coordinator",
            &coord.grpc.to_string(),
            "--node-id",
            "p1-primary",
            "--ip",
            "127.0.0.20:9000",
            "--interval",
            "0.2",
        ])
        .env("SHARDGATE_HEARTBEAT_TOKEN", "hb-token")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "agent with token registered",
        || async { coord.node("p1-primary").await.is_some() },
    )
    .await;
    drop(token_agent);
}

#[tokio::test]
async fn an_agent_pauses_while_its_service_is_unhealthy_and_backs_off_while_the_coordinator_is_down()
 {
    let dir = tempfile::tempdir().unwrap();
    let service = Upstream::start("kv").await;
    // Start the agent before the coordinator exists: it must keep trying.
    // The port stays free until the coordinator binds it, seconds later. On a
    // loopback address no other test binds, no other test's port 0 can take it.
    let grpc = std::net::TcpListener::bind("127.0.83.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let check = format!("http://{}/health", service.addr);
    let agent = BinProcess::spawn(
        &[
            "agent",
            "--coordinator",
            &grpc,
            "--node-id",
            "p0-primary",
            "--ip",
            "127.0.0.10:9000",
            "--interval",
            "0.2",
            "--check-url",
            &check,
        ],
        false,
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "agent reports the coordinator unreachable",
        || async { agent.stderr().contains("heartbeat failed") },
    )
    .await;
    let coord = coordinator_in(dir.path(), &["--grpc-listen", &grpc]).await;
    eventually(
        Duration::from_secs(40),
        "agent reaches the coordinator once it is up",
        || async {
            coord
                .node("p0-primary")
                .await
                .is_some_and(|n| n["status"] == "ACTIVE")
        },
    )
    .await;
    // The local service goes down: heartbeats stop, the node dies.
    service.refuse();
    eventually(
        Duration::from_secs(10),
        "node DEAD while its service is down",
        || async {
            coord
                .node("p0-primary")
                .await
                .is_some_and(|n| n["status"] == "DEAD")
        },
    )
    .await;
    assert!(agent.stderr().contains("heartbeats paused"));
}
