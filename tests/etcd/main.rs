//! The etcd store against a real three-member etcd cluster on loopback
//! (Debian's `etcd-server`): leadership, fencing by revision, member and
//! majority loss, coordinators sharing state, migration from a file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use shardgate::coordinator::state::{ClusterState, Persisted};
use shardgate::coordinator::store::{Commit, EtcdStore, EtcdUrl, SharedStore, Store};
use shardgate::proto::heartbeat_response::Command;
use shardgate::topology::ShardMap;
use std::time::Duration;
use support::*;

fn initial(epoch: u64) -> Persisted {
    let map = ShardMap::from_json(two_partition_map(epoch).as_bytes()).unwrap();
    ClusterState::new(map, "coord", tokio::time::Instant::now()).persisted()
}

async fn store(cluster: &EtcdCluster, prefix: &str, id: &str) -> EtcdStore {
    let url = EtcdUrl::parse(&cluster.url(prefix)).unwrap();
    EtcdStore::connect(&url, id, Duration::from_secs(2))
        .await
        .unwrap()
}

async fn put_map(c: &BinCoordinator, map: &str) -> Answer {
    let r =
        http::Request::put(c.url("/v1/cluster/topology")).header("authorization", "Bearer s3cret");
    send(&client(), r.body(full(map.to_owned())).unwrap()).await
}

#[tokio::test]
async fn a_deposed_leaders_late_write_is_refused_by_the_leader_keys_revision() {
    let cluster = EtcdCluster::start(3).await;
    let a = store(&cluster, "fence", "coord-a").await;
    let b = store(&cluster, "fence", "coord-b").await;
    assert_eq!(a.commit(None, &initial(10)).await.unwrap(), Commit::Won);
    assert_eq!(
        b.commit(None, &initial(10)).await.unwrap(),
        Commit::Lost,
        "only one initialises"
    );
    assert!(a.lead().await.unwrap(), "the first to ask leads");
    assert!(!b.lead().await.unwrap(), "one leader at a time");

    // a stops renewing (a pause, a partition): its lease lapses, b takes the lead.
    eventually(
        Duration::from_secs(15),
        "b leads once a's lease lapsed",
        || async { b.lead().await.unwrap() },
    )
    .await;
    // a still believes it leads and commits a promotion decided at epoch 10;
    // the epoch has not moved, so only the revision of the leader key can stop it.
    let mut late = a.load().await.unwrap().unwrap();
    late.map.cluster_epoch = 11;
    late.map.partitions[0].primary_node_ip = "127.0.0.11:9000".into();
    late.map.partitions[0].replica_node_ips = vec![];
    assert_eq!(a.commit(Some(10), &late).await.unwrap(), Commit::Lost);
    assert_eq!(
        a.load().await.unwrap().unwrap().map.cluster_epoch,
        10,
        "nothing written"
    );
    // The new leader's own change goes through.
    assert_eq!(b.commit(Some(10), &late).await.unwrap(), Commit::Won);
    assert_eq!(b.load().await.unwrap().unwrap().map.cluster_epoch, 11);
    // And a, asking again, learns it no longer leads.
    assert!(!a.lead().await.unwrap());
}

#[tokio::test]
async fn two_coordinators_on_etcd_have_one_leader_and_hand_over_without_a_double_promotion() {
    let cluster = EtcdCluster::start(3).await;
    let url = cluster.url("handover");
    let dir = tempfile::tempdir().unwrap();
    // The leader hears the follower's agents through etcd, and promotes once.
    let (leader, follower, agents, m) = failed_over_through_a_shared_store(&url, dir.path()).await;
    assert_eq!(
        m["partitions"][1]["primaryNodeIp"], "127.0.0.20:9000",
        "p1's primary is alive"
    );

    // The leader dies; the follower takes over and promotes nothing more:
    // p1's nodes keep heartbeating and their liveness survived in etcd.
    leader.proc.kill().await;
    eventually(Duration::from_secs(15), "the follower leads", || async {
        follower.is_leader().await
    })
    .await;
    for _ in 0..20 {
        assert_eq!(follower.epoch().await, 11, "no second promotion");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually(
        Duration::from_secs(5),
        "promoted agent heard REBALANCE",
        || async { agents[0].stderr().contains("REBALANCE") },
    )
    .await;
    assert_eq!(agents[0].stderr().matches("says REBALANCE").count(), 1);
}

/// Heartbeats for the four nodes of the map, each on its own 150 ms timer
/// as agents send them, until `stop`; returns (answered, failed, told to
/// terminate).
fn heartbeat_load(
    c: &BinCoordinator,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinSet<(u64, u64, u64)> {
    let mut set = tokio::task::JoinSet::new();
    for (id, ip) in [
        ("p0-primary", "127.0.0.10:9000"),
        ("p0-replica", "127.0.0.11:9000"),
        ("p1-primary", "127.0.0.20:9000"),
        ("p1-replica", "127.0.0.21:9000"),
    ] {
        let (stop, grpc) = (stop.clone(), c.grpc);
        set.spawn(async move {
            let mut client =
                shardgate::proto::cluster_discovery_service_client::ClusterDiscoveryServiceClient::connect(
                    format!("http://{grpc}"),
                )
                .await
                .unwrap();
            let (mut ok, mut failed, mut terminate) = (0, 0, 0);
            // Bounded in count (and by `stop`).
            for _ in 0..2_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match client.report_heartbeat(heartbeat_req(id, ip, unix_ms())).await {
                    Ok(r) if r.get_ref().recommended_command == Command::Terminate as i32 => {
                        terminate += 1;
                    }
                    Ok(_) => ok += 1,
                    Err(e) => {
                        eprintln!("{id}: heartbeat failed: {e}");
                        failed += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            (ok, failed, terminate)
        });
    }
    set
}

/// Stop `heartbeat_load` and total its counts: (answered, failed, told to
/// terminate).
async fn stop_load(
    stop: &std::sync::atomic::AtomicBool,
    mut load: tokio::task::JoinSet<(u64, u64, u64)>,
) -> (u64, u64, u64) {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed, mut terminate) = (0, 0, 0);
    while let Some(r) = load.join_next().await {
        let (o, f, t) = r.unwrap();
        (ok, failed, terminate) = (ok + o, failed + f, terminate + t);
    }
    (ok, failed, terminate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_lost_changes_nothing_and_losing_the_majority_makes_changes_fail_until_it_returns()
 {
    let mut cluster = EtcdCluster::start(3).await;
    let url = cluster.url("majority");
    let dir = tempfile::tempdir().unwrap();
    let c = BinCoordinator::on_store(&url, dir.path(), "coord-a", &[]).await;
    eventually(Duration::from_secs(10), "the coordinator leads", || async {
        c.is_leader().await
    })
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = heartbeat_load(&c, &stop);

    // One member down under heartbeat load: heartbeats and changes go on.
    cluster.kill(2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = put_map(&c, &two_partition_map(11)).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // The majority lost: the map in force is still served, heartbeats are
    // still answered, and a change is refused with the store's error.
    cluster.kill(1);
    let r = put_map(&c, &two_partition_map(12)).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "store_unavailable");
    assert_eq!(c.epoch().await, 11, "the last map is served, read-only");

    // Back: changes go through again. (The refused change may itself land
    // once etcd has its majority back: etcd may have taken the proposal it
    // could not commit, which is why the refusal says it may still apply.)
    cluster.restart(1);
    cluster.restart(2);
    cluster.healthy(0).await;
    let mut last = String::new();
    let back = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if c.epoch().await == 13 {
                return;
            }
            let r = put_map(&c, &two_partition_map(13)).await;
            last = format!("{} {}", r.status, r.text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        back.is_ok(),
        "changes still refused: {last}\n{}",
        c.proc.stderr()
    );
    let (ok, failed, terminate) = stop_load(&stop, load).await;
    assert_eq!(failed, 0, "heartbeats failed, of {ok} answered");
    assert_eq!(terminate, 0, "no node was taken for dead");
    assert!(
        !c.proc.stderr().contains("went silent"),
        "{}",
        c.proc.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_change_etcd_never_confirms_is_undone_without_forgetting_the_heartbeats_heard_meanwhile()
 {
    let cluster = EtcdCluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let c = BinCoordinator::on_store(&cluster.url("undo"), dir.path(), "coord-a", &[]).await;
    eventually(Duration::from_secs(10), "the coordinator leads", || async {
        c.is_leader().await
    })
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = heartbeat_load(&c, &stop);
    eventually(Duration::from_secs(10), "every node heard", || async {
        let nodes = c.get_json("/v1/cluster/nodes").await;
        nodes["nodes"].as_array().is_some_and(|n| n.len() == 4)
    })
    .await;

    // A stopped etcd takes the request and never answers: the change waits
    // for its deadline, in force meanwhile, while the nodes beat on.
    cluster.signal(0, "STOP");
    let asked = unix_ms();
    let r = put_map(&c, &two_partition_map(11)).await;
    let waited = unix_ms() - asked;
    cluster.signal(0, "CONT");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "store_unavailable");
    assert!(
        waited >= 1_000,
        "refused after {waited} ms, before any deadline"
    );

    // Undone: the map goes back, what was heard during the wait stays. Had
    // the whole state gone back, every node would look silent since before
    // the change, and the next sweep would take them all for dead.
    let nodes = c.get_json("/v1/cluster/nodes").await;
    assert_eq!(nodes["epoch"], 10, "the unconfirmed map is not in force");
    for n in nodes["nodes"].as_array().unwrap() {
        let heard = n["lastHeartbeatUnixMs"].as_i64().unwrap();
        assert!(
            heard > asked + 500,
            "last heard {} ms after the change was asked: {n}",
            heard - asked
        );
        assert_eq!(n["status"], "ACTIVE", "{n}");
    }
    let (_, failed, terminate) = stop_load(&stop, load).await;
    assert_eq!(
        (failed, terminate),
        (0, 0),
        "heartbeats failed or nodes were told to stop"
    );
    assert!(
        !c.proc.stderr().contains("went silent"),
        "{}",
        c.proc.stderr()
    );
}

#[tokio::test]
async fn migrate_store_copies_a_file_stores_state_into_etcd_with_its_epoch() {
    let cluster = EtcdCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.json");
    // A file-store coordinator that has moved on to epoch 11.
    {
        let c = etcd_free_coordinator(dir.path(), &file).await;
        let r = put_map(&c, &two_partition_map(11)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        c.proc.kill().await;
    }
    let to = cluster.url("migrated");
    let from = format!("file:{}", file.display());
    let migrate = || {
        std::process::Command::new(binary())
            .args(["coordinator", "migrate-store", "--from", &from, "--to", &to])
            .output()
            .unwrap()
    };
    let out = migrate();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("epoch 11"));
    // A second copy over a store that holds state is refused.
    let again = migrate();
    assert_eq!(
        again.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    let c = BinCoordinator::on_store(&to, dir.path(), "coord-b", &[]).await;
    assert_eq!(c.epoch().await, 11, "the epoch came along");
    let m = c.get_json("/v1/cluster/topology").await;
    let from_file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(m["partitions"], from_file["map"]["partitions"]);
}

/// A coordinator on a state file, for the migration's source.
async fn etcd_free_coordinator(dir: &std::path::Path, file: &std::path::Path) -> BinCoordinator {
    let store = format!("file:{}", file.display());
    BinCoordinator::on_store(&store, dir, "coord-file", &[]).await
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// What one fault does to the leading coordinator.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGSTOP for a while, then SIGCONT: it wakes believing it leads.
    Pause(Duration),
    /// SIGKILL.
    Kill,
    /// Its links to every etcd member cut for a while (test relays).
    Partition(Duration),
}

/// One coordinator's answer: its epoch and each partition's primary.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    coordinator: usize,
    epoch: u64,
    primaries: Vec<String>,
}

async fn served(http: std::net::SocketAddr) -> Option<(u64, Vec<String>)> {
    let req = http::Request::get(format!("http://{http}/v1/cluster/topology"))
        .body(empty())
        .unwrap();
    let r = tokio::time::timeout(Duration::from_millis(300), client().request(req))
        .await
        .ok()?
        .ok()?;
    use http_body_util::BodyExt;
    let body = r.into_body().collect().await.ok()?.to_bytes();
    let m: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let primaries = m["partitions"]
        .as_array()?
        .iter()
        .map(|p| p["primaryNodeIp"].as_str().unwrap_or("").to_owned())
        .collect();
    Some((m["clusterEpoch"].as_u64()?, primaries))
}

/// One seeded round: two coordinators on etcd (each through its own relays,
/// so it can be cut off), p0's primary silent so a failover is due, and a
/// fault on whichever coordinator leads, at a random moment around it.
/// Returns the promotions logged and what observers saw.
async fn leader_fault_round(cluster: &EtcdCluster, seed: u64) -> (usize, Vec<Seen>, Fault) {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let members = cluster.client_addrs();
    let mut relays = Vec::new();
    let mut coordinators = Vec::new();
    for name in ["coord-a", "coord-b"] {
        let mut mine = Vec::new();
        for m in &members {
            mine.push(Relay::start(*m).await);
        }
        let hosts: Vec<String> = mine.iter().map(|r| r.addr.to_string()).collect();
        let url = format!("etcd://{}/round-{seed}", hosts.join(","));
        coordinators.push(BinCoordinator::on_store(&url, dir.path(), name, &[]).await);
        relays.push(mine);
    }
    let mut leader = None;
    for _ in 0..200 {
        for (i, c) in coordinators.iter().enumerate() {
            if c.is_leader().await {
                leader = Some(i);
            }
        }
        if leader.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leader = leader.expect("no coordinator took the lead");
    let follower = 1 - leader;

    // Observers: every coordinator's map, every 20 ms, for the whole round.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ledger = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut observers = Vec::new();
    for (i, c) in coordinators.iter().enumerate() {
        let (stop, ledger, http) = (stop.clone(), ledger.clone(), c.http);
        observers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some((epoch, primaries)) = served(http).await {
                    ledger.lock().unwrap().push(Seen {
                        coordinator: i,
                        epoch,
                        primaries,
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let agents = agents_but_p0_primary(coordinators[follower].grpc).await;
    // The failover is due ~2-3 s in (2 s silence, 1 s hold-down): strike
    // before, during or after it.
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..3500))).await;
    // Consecutive seeds take the three faults in turn, so a short run has each.
    let fault = match seed % 3 {
        0 => Fault::Pause(Duration::from_millis(rng.random_range(2500..4500))),
        1 => Fault::Kill,
        _ => Fault::Partition(Duration::from_millis(rng.random_range(2500..4500))),
    };
    match fault {
        Fault::Pause(d) => {
            coordinators[leader].proc.signal("STOP");
            tokio::time::sleep(d).await;
            coordinators[leader].proc.signal("CONT");
        }
        Fault::Kill => {}
        Fault::Partition(d) => {
            for r in &relays[leader] {
                r.set(Link::Cut);
            }
            tokio::time::sleep(d).await;
            for r in &relays[leader] {
                r.set(Link::Pass);
            }
        }
    }
    let survivors: Vec<usize> = match fault {
        Fault::Kill => {
            let killed = coordinators.remove(leader);
            killed.proc.kill().await;
            vec![0]
        }
        _ => vec![0, 1],
    };
    // Whoever is alive ends up serving the failover (epoch 11).
    for &i in &survivors {
        let c = &coordinators[i];
        eventually(
            Duration::from_secs(30),
            &format!("seed {seed}: coordinator {i} serves the failover"),
            || async { served(c.http).await.is_some_and(|(e, _)| e >= 11) },
        )
        .await;
    }
    // A little longer: a deposed leader that woke late would show itself now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for o in observers {
        o.await.unwrap();
    }
    let promotions = coordinators
        .iter()
        .map(|c| c.proc.stderr().matches("primary failed over").count())
        .sum::<usize>();
    let seen = ledger.lock().unwrap().clone();
    drop(agents);
    (promotions, seen, fault)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_faults_during_failovers_never_promote_twice_or_move_an_epoch_back() {
    let cluster = EtcdCluster::start(3).await;
    let first = env_u64("ETCD_SEED", 0x5EED_0021);
    let rounds = env_u64("ETCD_ROUNDS", 3);
    for seed in first..first + rounds {
        let (promotions, seen, fault) = leader_fault_round(&cluster, seed).await;
        // Every observer's epochs only rise.
        for c in 0..2 {
            let epochs: Vec<u64> = seen
                .iter()
                .filter(|s| s.coordinator == c)
                .map(|s| s.epoch)
                .collect();
            assert!(
                epochs.windows(2).all(|w| w[0] <= w[1]),
                "seed {seed} ({fault:?}): coordinator {c}'s epoch went back: {epochs:?}"
            );
        }
        // One map per epoch, whoever serves it: no split brain.
        let mut by_epoch: std::collections::HashMap<u64, &Vec<String>> = Default::default();
        for s in &seen {
            let first = by_epoch.entry(s.epoch).or_insert(&s.primaries);
            assert_eq!(
                *first, &s.primaries,
                "seed {seed} ({fault:?}): two maps at epoch {}",
                s.epoch
            );
        }
        let last = seen.iter().map(|s| s.epoch).max().unwrap_or(0);
        assert_eq!(
            last,
            11,
            "seed {seed} ({fault:?}): exactly one promotion, epochs seen {:?}",
            by_epoch.keys()
        );
        assert_eq!(
            by_epoch[&11],
            &vec!["127.0.0.11:9000".to_owned(), "127.0.0.20:9000".to_owned()],
            "seed {seed}: p0's replica promoted, p1 untouched"
        );
        assert!(
            promotions <= 1,
            "seed {seed} ({fault:?}): {promotions} promotions committed (logged)"
        );
        println!(
            "seed {seed}: {fault:?}: {} observations, epochs {:?}, promotions logged {promotions}",
            seen.len(),
            {
                let mut e: Vec<_> = by_epoch.keys().copied().collect();
                e.sort_unstable();
                e
            }
        );
    }
}
