//! The coordinator under abuse: epochs pushed to their limits, forged and
//! flooding heartbeats, thousands of watchers, sloppy operators. Each test
//! pins a defect found by probing the running binary (the hardening issue).

use crate::{NODES, beat, coordinator_in};
use shardgate::proto::heartbeat_response::Command;
use std::path::Path;
use std::time::Duration;
use support::*;

use crate::support;

/// A coordinator whose config file is the test's `[coordinator]` lines.
async fn coordinator_with(dir: &Path, extra: &str, flags: &[&str]) -> BinCoordinator {
    std::fs::write(
        dir.join("coordinator.toml"),
        format!(
            "[coordinator]\nid = \"coord-a\"\nfailover_hold_down = \"1s\"\nwatch_timeout = \"30s\"\n\
             admin_token = \"s3cret\"\n{extra}"
        ),
    )
    .unwrap();
    coordinator_in(dir, flags).await
}

async fn put_map(c: &BinCoordinator, map: &str, if_match: Option<&str>) -> Answer {
    let mut r =
        http::Request::put(c.url("/v1/cluster/topology")).header("authorization", "Bearer s3cret");
    if let Some(tag) = if_match {
        r = r.header("if-match", tag);
    }
    send(&client(), r.body(full(map.to_owned())).unwrap()).await
}

#[tokio::test]
async fn a_map_whose_epoch_is_not_above_the_one_in_force_is_a_409_naming_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator_with(dir.path(), "", &[]).await;
    assert_eq!(c.epoch().await, 10);
    for stale in [10, 9, 2] {
        let r = put_map(&c, &two_partition_map(stale), None).await;
        assert_eq!(r.status, 409, "epoch {stale}: {}", r.text());
        assert_eq!(r.json()["error"], "stale_epoch");
        assert_eq!(r.header("x-cluster-epoch"), Some("10"));
    }
    assert_eq!(c.epoch().await, 10, "nothing changed");
    let r = put_map(&c, &two_partition_map(11), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.epoch().await, 11);
}

#[tokio::test]
async fn a_put_with_a_stale_if_match_is_a_409_and_undoes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator_with(dir.path(), "", &[]).await;
    let r = put_map(&c, &two_partition_map(11), Some("\"10\"")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // A second operator still holding version 10 tries to write over 11.
    let r = put_map(&c, &two_partition_map(12), Some("\"10\"")).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["error"], "conflict");
    assert_eq!(r.header("x-cluster-epoch"), Some("11"));
    assert_eq!(c.epoch().await, 11);
}

#[tokio::test]
async fn an_epoch_that_would_exhaust_the_epoch_space_is_refused_and_nothing_is_persisted() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = coordinator_with(dir.path(), "", &[]).await;
    for huge in [u64::MAX, u64::MAX - 1, 1 << 63] {
        let r = put_map(&c, &two_partition_map(huge), None).await;
        assert_eq!(r.status, 400, "epoch {huge}: {}", r.text());
        assert_eq!(r.json()["error"], "epoch_exhausted");
    }
    assert_eq!(c.epoch().await, 10);
    // What is persisted is what was served: a restart serves epoch 10, and
    // the next change takes 11.
    c.proc.signal("TERM");
    assert_eq!(c.proc.exit_code(Duration::from_secs(10)).await, Some(0));
    let c = coordinator_with(dir.path(), "", &[]).await;
    assert_eq!(c.epoch().await, 10);
    assert_eq!(put_map(&c, &two_partition_map(11), None).await.status, 200);
}

#[tokio::test]
async fn a_known_node_heartbeating_from_another_address_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator_with(dir.path(), "", &[]).await;
    let (id, addr) = NODES[0];
    assert_eq!(beat(&c, id, addr).await.unwrap(), Command::Continue);
    let e = beat(&c, id, "127.0.0.99:9000").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert_eq!(
        c.node(id).await.unwrap()["ip"],
        addr,
        "still bound to its address"
    );
    assert_eq!(c.node(id).await.unwrap()["role"], "MASTER", "not demoted");
    let map = c.get_json("/v1/cluster/topology").await;
    assert_eq!(map["partitions"][0]["primaryNodeIp"], addr);
    assert_eq!(c.epoch().await, 10);
}

#[tokio::test]
async fn another_node_id_cannot_heartbeat_for_a_bound_address() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator_with(dir.path(), "", &[]).await;
    let (id, addr) = NODES[1];
    beat(&c, id, addr).await.unwrap();
    let e = beat(&c, "impostor", addr).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(c.node("impostor").await.is_none());
}

#[tokio::test]
async fn unknown_nodes_are_bounded_and_forgotten_once_silent() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator_with(dir.path(), "max_unknown_nodes = 20\n", &[]).await;
    let mut client = c.grpc_client().await;
    let mut refused = 0;
    for i in 0..30 {
        let r = client
            .report_heartbeat(heartbeat_req(
                &format!("stranger-{i}"),
                &format!("127.0.1.{}:9000", i + 1),
                unix_ms(),
            ))
            .await;
        if let Err(e) = r {
            assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
            refused += 1;
        }
    }
    assert_eq!(refused, 10, "twenty registered, ten refused");
    // Nodes the map names always get in, however many strangers came first.
    assert_eq!(
        beat(&c, NODES[2].0, NODES[2].1).await.unwrap(),
        Command::Continue
    );
    // Silent strangers are forgotten (DEAD after the 2 s timeout, then gone).
    eventually(
        Duration::from_secs(20),
        "silent strangers pruned",
        || async { c.node("stranger-0").await.is_none() },
    )
    .await;
    let state = std::fs::read_to_string(dir.path().join("state.json")).unwrap();
    assert!(!state.contains("stranger"), "strangers are never persisted");
}

#[tokio::test]
async fn a_coordinator_reachable_beyond_loopback_without_heartbeat_auth_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    let map = dir.path().join("map.json");
    std::fs::write(&map, two_partition_map(1)).unwrap();
    std::fs::write(&config, "[coordinator]\ngrpc_listen = \"0.0.0.0:7401\"\n").unwrap();
    let mut refused = BinProcess::spawn(
        &[
            "coordinator",
            "--config",
            config.to_str().unwrap(),
            "--topology",
            map.to_str().unwrap(),
        ],
        false,
    )
    .await;
    assert_eq!(refused.exit_code(Duration::from_secs(10)).await, Some(1));
    let why = refused.stderr();
    assert!(why.contains("--insecure-heartbeats"), "{why}");
    assert!(why.contains("heartbeat_token"), "{why}");
    let check = |text: &str| {
        std::fs::write(&config, text).unwrap();
        std::process::Command::new(binary())
            .args(["check-config", config.to_str().unwrap()])
            .output()
            .unwrap()
    };
    assert!(
        !check("[coordinator]\ngrpc_listen = \"0.0.0.0:7401\"\n")
            .status
            .success()
    );
    let with_token =
        check("[coordinator]\ngrpc_listen = \"0.0.0.0:7401\"\nheartbeat_token = \"t\"\n");
    assert!(with_token.status.success(), "{with_token:?}");
    let insecure =
        check("[coordinator]\ngrpc_listen = \"0.0.0.0:7401\"\ninsecure_heartbeats = true\n");
    assert!(insecure.status.success(), "{insecure:?}");
}

/// A watch held open on a fresh connection; resolves with the answer.
async fn watch(c: &BinCoordinator, above: u64) -> tokio::task::JoinHandle<Answer> {
    let url = c.url(&format!("/v1/cluster/topology?waitForEpochAbove={above}"));
    tokio::spawn(async move {
        // One connection per watcher, as proxies hold them.
        let client = client();
        send(&client, http::Request::get(url).body(empty()).unwrap()).await
    })
}

#[tokio::test]
async fn watchers_cannot_lock_operators_and_health_checks_out() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator_with(
        dir.path(),
        "http_max_connections = 64\nmax_watches = 16\n",
        &[],
    )
    .await;
    let mut watchers = Vec::new();
    for _ in 0..60 {
        watchers.push(watch(&c, 10).await);
    }
    eventually(Duration::from_secs(10), "16 watches held", || async {
        metric(c.http, "shardgate_coordinator_watches ").await == 16.0
    })
    .await;
    // The watches over the bound were answered at once with the map in force
    // (their tasks may still be reading the answer when the gauge says 16).
    eventually(Duration::from_secs(10), "44 watches answered early", || {
        let answered_early = watchers.iter().filter(|w| w.is_finished()).count();
        async move { answered_early >= 44 }
    })
    .await;
    // Operators and health checks still get in.
    let health = send(
        &client(),
        http::Request::get(c.url("/healthz")).body(empty()).unwrap(),
    )
    .await;
    assert_eq!(health.status, 200);
    assert_eq!(put_map(&c, &two_partition_map(11), None).await.status, 200);
    // The held watches wake with the new map.
    for w in watchers {
        let a = w.await.unwrap();
        assert_eq!(a.status, 200);
    }
    assert!(metric(c.http, "shardgate_coordinator_watches_shed_total").await >= 44.0);
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator_with(dir.path(), "", &[]).await;
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let epoch = c.epoch().await + 1;
        let r = http::Request::put(c.url("/v1/cluster/topology"))
            .header("authorization", format!("{scheme} s3cret"))
            .body(full(two_partition_map(epoch)))
            .unwrap();
        let a = send(&client(), r).await;
        assert_eq!(a.status, 200, "{scheme}: {}", a.text());
    }
}

#[tokio::test]
async fn an_oversized_heartbeat_is_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator_with(dir.path(), "", &[]).await;
    let mut client = c.grpc_client().await;
    let huge = "x".repeat(64 * 1024);
    let e = client
        .report_heartbeat(heartbeat_req(&huge, "127.0.0.10:9000", unix_ms()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
}

#[tokio::test]
async fn a_partition_whose_every_node_is_dead_is_reported_once_not_every_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator_with(dir.path(), "", &[]).await;
    // Nobody heartbeats: after the 2 s grace both partitions are dead, and
    // the sweep (every 100 ms) finds them so for seconds on end.
    eventually(
        Duration::from_secs(10),
        "partitions reported dead",
        || async {
            c.proc
                .stderr()
                .matches("every node of the partition is dead")
                .count()
                >= 2
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // twenty more sweeps
    let logged = c
        .proc
        .stderr()
        .matches("every node of the partition is dead")
        .count();
    assert_eq!(logged, 2, "once per partition:\n{}", c.proc.stderr());
}
