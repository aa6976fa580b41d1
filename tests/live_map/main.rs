//! The whole system: real coordinator, agents and proxy binaries following a
//! failover, static stability without the coordinator, map validation on the
//! wire, fast correction on 421, and `shardgate demo`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use support::*;
use tokio::time::Instant;

/// A proxy binary following `sources`, with `extra` TOML.
async fn proxy_following(sources: &[String], dir: &Path, extra: &str) -> BinProxy {
    let config = dir.join("proxy.toml");
    let sources: Vec<String> = sources.iter().map(|s| format!("{s:?}")).collect();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [topology]\nsources = [{}]\npoll_interval = \"100ms\"\nstartup_wait = \"5s\"\ncache_file = {:?}\n{extra}",
        sources.join(", "),
        dir.join("map-cache.json").display().to_string(),
    );
    let merged = merge_toml(&text);
    std::fs::write(&config, merged).unwrap();
    BinProxy::spawn(&["--config", config.to_str().unwrap()]).await
}

/// Later tables in the text extend earlier ones (tests append sections freely).
fn merge_toml(text: &str) -> String {
    let mut out = toml::Table::new();
    for chunk in text.split("\n[").enumerate().map(|(i, c)| {
        if i == 0 {
            c.to_owned()
        } else {
            format!("[{c}")
        }
    }) {
        let t: toml::Table = chunk.parse().unwrap();
        for (k, v) in t {
            match (out.get_mut(&k), v) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => a.extend(b),
                (_, v) => {
                    out.insert(k, v);
                }
            }
        }
    }
    toml::to_string(&out).unwrap()
}

async fn proxy_epoch(admin: std::net::SocketAddr) -> Option<u64> {
    admin_get(admin, "/admin/topology").await.json()["epoch"].as_u64()
}

/// Two partitions of recording upstreams, their agents, a coordinator.
struct Cluster {
    nodes: Vec<(String, Upstream)>,
    agents: Vec<Option<BinProcess>>,
    coordinator: BinCoordinator,
    dir: tempfile::TempDir,
}

async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for id in ["p0-primary", "p0-replica", "p1-primary", "p1-replica"] {
        nodes.push((id.to_owned(), Upstream::start(id).await));
    }
    let map = topology(
        1,
        &[
            (nodes[0].1.addr, vec![nodes[1].1.addr]),
            (nodes[2].1.addr, vec![nodes[3].1.addr]),
        ],
    );
    std::fs::write(dir.path().join("map.json"), &map).unwrap();
    std::fs::write(
        dir.path().join("coordinator.toml"),
        "[coordinator]\nfailover_hold_down = \"1s\"\nadmin_token = \"t\"\n",
    )
    .unwrap();
    let store = format!("file:{}", dir.path().join("state.json").display());
    let config = dir.path().join("coordinator.toml");
    let topology = dir.path().join("map.json");
    let mut args = vec![
        "--config",
        config.to_str().unwrap(),
        "--topology",
        topology.to_str().unwrap(),
        "--store",
        &store,
    ];
    args.extend_from_slice(&DETECTION_FLAGS);
    let coordinator = BinCoordinator::spawn(&args).await;
    let mut agents = Vec::new();
    for (id, up) in &nodes {
        let check = format!("http://{}/healthz", up.addr);
        agents.push(Some(
            spawn_agent(
                coordinator.grpc,
                id,
                &up.addr.to_string(),
                "0.2",
                &["--check-url", &check],
            )
            .await,
        ));
    }
    eventually(Duration::from_secs(10), "all nodes registered", || async {
        coordinator.get_json("/v1/cluster/nodes").await["nodes"]
            .as_array()
            .unwrap()
            .len()
            == 4
    })
    .await;
    Cluster {
        nodes,
        agents,
        coordinator,
        dir,
    }
}

impl Cluster {
    /// The node dies: its service stops answering and its agent is killed.
    async fn kill(&mut self, index: usize) {
        self.nodes[index].1.refuse();
        if let Some(a) = self.agents[index].take() {
            a.kill().await;
        }
    }
}

#[derive(Default)]
struct Tally {
    reads: AtomicU64,
    read_failures: AtomicU64,
    writes: AtomicU64,
    write_failures: AtomicU64,
    slowest_write_ms: AtomicU64,
    /// What the first failures were, for the failure message.
    failures: std::sync::Mutex<Vec<String>>,
    /// Per writer: when its request in flight started (ms since `origin`), 0 when idle.
    in_flight_since: [AtomicU64; 6],
    origin: std::sync::OnceLock<Instant>,
}

/// Mixed load on partition 0 (where the failover happens) and partition 1.
fn mixed_load(
    proxy: std::net::SocketAddr,
    stop: &Arc<AtomicBool>,
    tally: &Arc<Tally>,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    let keys: Vec<String> = (0..2).map(|p| key_for_partition(p, 2)).collect();
    for w in 0..6 {
        let (stop, tally, key) = (stop.clone(), tally.clone(), keys[w % 2].clone());
        set.spawn(async move {
            let c = client();
            let url = format!("http://{proxy}/kv/{key}");
            let write = w >= 4;
            let mut n = 0u64;
            let origin = *tally.origin.get_or_init(Instant::now);
            while !stop.load(Ordering::Relaxed) && n < 50_000 {
                n += 1;
                let started = Instant::now();
                tally.in_flight_since[w]
                    .store(origin.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
                let req = if write {
                    keyed("PUT", &url, &key, format!("v{n}"))
                } else {
                    keyed("GET", &url, &key, "")
                };
                let outcome = tokio::time::timeout(Duration::from_secs(20), c.request(req)).await;
                tally.in_flight_since[w].store(0, Ordering::Relaxed);
                let ok = matches!(&outcome, Ok(Ok(r)) if r.status() == 200);
                if !ok {
                    let what = match &outcome {
                        Ok(Ok(r)) => format!(
                            "{} {} {:?} after {:?}",
                            if write { "PUT" } else { "GET" },
                            r.status(),
                            r.headers().get("x-shardgate-error"),
                            started.elapsed()
                        ),
                        Ok(Err(e)) => format!("client error {e}"),
                        Err(_) => "no answer in 20 s".into(),
                    };
                    let mut f = tally.failures.lock().unwrap();
                    if f.len() < 5 {
                        f.push(what);
                    }
                }
                let (count, failures) = if write {
                    (&tally.writes, &tally.write_failures)
                } else {
                    (&tally.reads, &tally.read_failures)
                };
                count.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                if write {
                    tally
                        .slowest_write_ms
                        .fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
            }
        });
    }
    set
}

/// Kill partition 0's primary under load; returns the tally and the epochs seen.
async fn failover_under_load(buffering: bool) -> (Arc<Tally>, Cluster, Duration) {
    let mut c = cluster().await;
    let extra = if buffering {
        "\n[failover_buffer]\nenabled = true\nmax_wait = \"10s\"\n[timeouts]\noverall = \"15s\"\n"
    } else {
        ""
    };
    let proxy = proxy_following(&[c.coordinator.url("")], c.dir.path(), extra).await;
    assert_eq!(proxy_epoch(proxy.admin).await, Some(1));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut load = mixed_load(proxy.addr, &stop, &tally);
    eventually(Duration::from_secs(10), "load flowing", || async {
        tally.reads.load(Ordering::Relaxed) > 200
    })
    .await;

    // Watch the coordinator for the new epoch while the primary dies.
    let watch_url = c
        .coordinator
        .url("/v1/cluster/topology?waitForEpochAbove=1");
    let coordinator_saw = tokio::spawn(async move {
        let a = send(
            &client(),
            http::Request::get(watch_url).body(empty()).unwrap(),
        )
        .await;
        (Instant::now(), a.json()["clusterEpoch"].as_u64())
    });
    c.kill(0).await;
    let (at_coordinator, epoch) = coordinator_saw.await.unwrap();
    assert_eq!(epoch, Some(2));
    eventually(Duration::from_secs(5), "the proxy follows", || async {
        proxy_epoch(proxy.admin).await == Some(2)
    })
    .await;
    let propagation = at_coordinator.elapsed();

    let promoted = &c.nodes[1].1;
    let writes_before = promoted.writes().len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while promoted.writes().len() <= writes_before + 50 {
        if Instant::now() > deadline {
            let key0 = key_for_partition(0, 2);
            let probe = tokio::time::timeout(
                Duration::from_secs(3),
                client().request(keyed(
                    "PUT",
                    &format!("http://{}/kv/{key0}", proxy.addr),
                    &key0,
                    "probe",
                )),
            )
            .await;
            let probe = match probe {
                Ok(Ok(r)) => format!("{} {:?}", r.status(), r.headers().get("x-shardgate-error")),
                Ok(Err(e)) => format!("client error {e}"),
                Err(_) => "no answer in 3 s".into(),
            };
            let upstreams = admin_get(proxy.admin, "/admin/upstreams").await.text();
            let origin = tally.origin.get().copied().unwrap_or_else(Instant::now);
            let waiting: Vec<String> = tally
                .in_flight_since
                .iter()
                .enumerate()
                .map(|(w, t)| match t.load(Ordering::Relaxed) {
                    0 => format!("w{w} idle"),
                    since => format!(
                        "w{w} waiting {} ms",
                        origin.elapsed().as_millis() as u64 + 1 - since
                    ),
                })
                .collect();
            panic!(
                "writes did not resume on the promoted node; a fresh write: {probe}; \
                 writers: {waiting:?}; upstreams: {upstreams}; proxy log:\n{}",
                proxy.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    // Every write the promoted node took carries the new fencing epoch.
    let writes = promoted.writes();
    assert!(!writes.is_empty());
    for w in &writes {
        assert_eq!(w.header("x-cluster-epoch"), Some("2"), "{:?}", w.headers);
    }
    // The dead primary's replica took no write while it was a replica.
    drop(proxy);
    (tally, c, propagation)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_dies_under_mixed_load_and_no_read_fails() {
    let (tally, _c, propagation) = failover_under_load(false).await;
    assert_eq!(
        tally.read_failures.load(Ordering::Relaxed),
        0,
        "of {} reads",
        tally.reads.load(Ordering::Relaxed)
    );
    assert!(
        propagation < Duration::from_secs(1),
        "proxy followed {propagation:?} after the coordinator"
    );
    eprintln!(
        "buffering off: {} reads, {} writes, {} writes failed during the failover, slowest write {} ms, propagation {:?}",
        tally.reads.load(Ordering::Relaxed),
        tally.writes.load(Ordering::Relaxed),
        tally.write_failures.load(Ordering::Relaxed),
        tally.slowest_write_ms.load(Ordering::Relaxed),
        propagation
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_failover_buffering_no_write_fails_across_a_failover() {
    let (tally, _c, propagation) = failover_under_load(true).await;

    assert_eq!(tally.read_failures.load(Ordering::Relaxed), 0);
    assert_eq!(
        tally.write_failures.load(Ordering::Relaxed),
        0,
        "of {} writes: {:?}",
        tally.writes.load(Ordering::Relaxed),
        tally.failures.lock().unwrap()
    );
    eprintln!(
        "buffering on: {} writes, none failed; slowest write (the added latency) {} ms; propagation {:?}",
        tally.writes.load(Ordering::Relaxed),
        tally.slowest_write_ms.load(Ordering::Relaxed),
        propagation
    );
}

#[tokio::test]
async fn with_the_coordinator_down_traffic_flows_and_a_restarted_proxy_serves_its_cache() {
    let c = cluster().await;
    let proxy = proxy_following(&[c.coordinator.url("")], c.dir.path(), "").await;
    let key = key_for_partition(1, 2);
    let url = format!("http://{}/kv/{key}", proxy.addr);
    assert_eq!(get_key(&client(), &url, &key).await.status, 200);
    let cache = c.dir.path().join("map-cache.json");
    eventually(Duration::from_secs(5), "map cached", || async {
        cache.exists()
    })
    .await;

    let coordinator_url = c.coordinator.url("");
    c.coordinator.proc.kill().await;
    for _ in 0..20 {
        assert_eq!(get_key(&client(), &url, &key).await.status, 200);
    }
    assert_eq!(admin_get(proxy.admin, "/readyz").await.status, 200);
    eventually(Duration::from_secs(10), "the map's age grows", || async {
        metric(proxy.admin, "shardgate_topology_age_seconds").await >= 1.0
    })
    .await;
    assert!(
        metric(
            proxy.admin,
            r#"shardgate_topology_updates_total{result="fetch_error"}"#
        )
        .await
            >= 1.0
    );

    // A proxy restarted during the outage serves from its cache.
    drop(proxy);
    let dir2 = tempfile::tempdir().unwrap();
    std::fs::copy(&cache, dir2.path().join("map-cache.json")).unwrap();
    let restarted = proxy_following(
        &[coordinator_url],
        dir2.path(),
        "[topology]\nstartup_wait = \"300ms\"\n",
    )
    .await;
    let url = format!("http://{}/kv/{key}", restarted.addr);
    assert_eq!(get_key(&client(), &url, &key).await.status, 200);
    let status = admin_get(restarted.admin, "/admin/topology").await.json();
    assert_eq!(status["epoch"], 1);
    assert!(
        status["source"].as_str().unwrap().starts_with("cache "),
        "{status}"
    );
    assert_eq!(admin_get(restarted.admin, "/readyz").await.status, 200);
}

fn single_map(epoch: u64, node: std::net::SocketAddr) -> String {
    topology(epoch, &[(node, vec![])])
}

/// Wait until the proxy counts a map update as `result`, then check the map
/// in force still routes `url` to node "a".
async fn refused_and_counted(admin: std::net::SocketAddr, url: &str, result: &str) {
    let line = format!(r#"shardgate_topology_updates_total{{result="{result}"}}"#);
    eventually(Duration::from_secs(5), result, || async {
        metric(admin, &line).await >= 1.0
    })
    .await;
    assert_eq!(
        get_key(&client(), url, "x").await.text(),
        "a",
        "a {result} map routed"
    );
}

#[tokio::test]
async fn invalid_and_older_maps_from_a_coordinator_are_refused_and_counted() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    // A coordinator whose watches end after 200 ms answers with whatever it
    // holds, older maps included.
    let fake =
        FakeCoordinator::with_watch_hold(&single_map(5, a.addr), Duration::from_millis(200)).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_following(&[fake.url()], dir.path(), "").await;
    let url = format!("http://{}/kv/x", proxy.addr);
    assert_eq!(get_key(&client(), &url, "x").await.text(), "a");

    let mut broken: serde_json::Value = serde_json::from_str(&single_map(9, b.addr)).unwrap();
    broken["partitions"][0]["hashRangeEnd"] = "fffffff0".into();
    fake.publish(&broken.to_string());
    refused_and_counted(proxy.admin, &url, "rejected_invalid").await;

    fake.publish(&single_map(3, b.addr));
    refused_and_counted(proxy.admin, &url, "rejected_stale").await;
    assert_eq!(proxy_epoch(proxy.admin).await, Some(5));

    fake.publish(&single_map(6, b.addr));
    eventually(Duration::from_secs(5), "newer map applied", || async {
        proxy_epoch(proxy.admin).await == Some(6)
    })
    .await;
    assert_eq!(get_key(&client(), &url, "x").await.text(), "b");
}

/// A proxy following a fake coordinator that starts out serving `map`.
struct FollowingFake {
    fake: FakeCoordinator,
    proxy: BinProxy,
    _dir: tempfile::TempDir,
}

async fn following_fake(map: &str, extra: &str) -> FollowingFake {
    let fake = FakeCoordinator::start(map).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_following(&[fake.url()], dir.path(), extra).await;
    FollowingFake {
        fake,
        proxy,
        _dir: dir,
    }
}

/// A read of key "x" through `proxy`.
async fn read_x(proxy: &BinProxy) -> Answer {
    get_key(&client(), &format!("http://{}/kv/x", proxy.addr), "x").await
}

/// A node that refuses everything with a 421 claiming epoch 8.
async fn misdirecting_node() -> Upstream {
    let stale = Upstream::start("stale").await;
    stale.set(Behavior::Respond {
        status: 421,
        headers: vec![("x-cluster-epoch", "8")],
        body: "misdirected",
    });
    stale
}

#[tokio::test]
async fn a_421_with_a_newer_epoch_refreshes_the_map_at_once_and_a_read_is_rerouted() {
    let stale = misdirecting_node().await;
    let fresh = Upstream::start("fresh").await;
    let first = following_fake(&single_map(7, stale.addr), "").await;
    let (fake, proxy) = (&first.fake, &first.proxy);
    // The new map exists, but no watch will be woken: only the 421 can reveal it.
    fake.set_silently(&single_map(8, fresh.addr));

    let started = Instant::now();
    let a = read_x(proxy).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.text(),
        "fresh",
        "the read went once more, under the new map"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(proxy_epoch(proxy.admin).await, Some(8));
    assert_eq!(stale.requests(), 1);

    // A write that meets a 421 is not sent again; the client sees the 421.
    let second = following_fake(&single_map(7, stale.addr), "").await;
    let (fake2, proxy2) = (&second.fake, &second.proxy);
    fake2.set_silently(&single_map(8, fresh.addr));
    let w = send(
        &client(),
        keyed("POST", &format!("http://{}/kv/x", proxy2.addr), "x", "v"),
    )
    .await;
    assert_eq!(w.status, 421);
    eventually(
        Duration::from_secs(2),
        "the map was refreshed anyway",
        || async { proxy_epoch(proxy2.admin).await == Some(8) },
    )
    .await;
}

#[tokio::test]
async fn a_read_met_by_a_421_gets_the_421_when_no_newer_map_turns_up() {
    let stale = misdirecting_node().await;
    // The node claims epoch 8; the coordinator never gets past 7.
    let following = following_fake(&single_map(7, stale.addr), "").await;
    let proxy = &following.proxy;

    let a = read_x(proxy).await;
    assert_eq!(a.status, 421, "{}", a.text());
    assert_eq!(
        a.text(),
        "misdirected",
        "the node's own answer is passed on"
    );
    assert_eq!(stale.requests(), 1, "not sent again under the same map");
    assert_eq!(proxy_epoch(proxy.admin).await, Some(7));
}

#[tokio::test]
async fn a_read_placed_again_under_a_newer_map_retries_with_the_newer_epoch() {
    let stale = misdirecting_node().await;
    let fresh = Upstream::start("fresh").await;
    // The re-sent read is reset once after reaching the new node, so the
    // retry is rebuilt from the request's kept copy.
    fresh.script(vec![Behavior::Reset, Behavior::Ok]);
    let following = following_fake(&single_map(7, stale.addr), "").await;
    following.fake.set_silently(&single_map(8, fresh.addr));

    let a = read_x(&following.proxy).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.text(), "fresh");
    let epochs: Vec<_> = fresh
        .log()
        .iter()
        .map(|r| r.header("x-cluster-epoch").map(str::to_owned))
        .collect();
    assert_eq!(epochs, [Some("8".to_owned()), Some("8".to_owned())]);
    assert_eq!(stale.log()[0].header("x-cluster-epoch"), Some("7"));
}

#[tokio::test]
async fn a_held_write_answers_primary_unavailable_when_no_new_primary_turns_up() {
    let primary = Upstream::start("primary").await;
    let replica = Upstream::start("replica").await;
    primary.refuse();
    // The coordinator never promotes anyone: the map stays at epoch 7.
    let following = following_fake(
        &topology(7, &[(primary.addr, vec![replica.addr])]),
        "\n[failover_buffer]\nenabled = true\nmax_wait = \"300ms\"\n",
    )
    .await;
    let proxy = &following.proxy;

    let w = send(
        &client(),
        keyed("PUT", &format!("http://{}/kv/x", proxy.addr), "x", "v"),
    )
    .await;
    w.assert_error(503, "primary_unavailable");
    assert!(replica.writes().is_empty(), "{:?}", replica.writes());
    assert_eq!(proxy_epoch(proxy.admin).await, Some(7));
}

#[tokio::test]
async fn a_cache_write_stuck_on_a_hung_file_neither_stops_traffic_nor_holds_shutdown() {
    let node = Upstream::start("node").await;
    let fake = FakeCoordinator::start(&single_map(3, node.addr)).await;
    let dir = tempfile::tempdir().unwrap();
    // The cache is written through a sibling `.tmp` file: as a FIFO nobody
    // reads, opening it blocks like a write to a hung mount.
    make_fifo(&dir.path().join("map-cache.tmp"));
    let mut proxy = proxy_following(&[fake.url()], dir.path(), "").await;

    let a = read_x(&proxy).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.text(), "node");
    assert_eq!(proxy_epoch(proxy.admin).await, Some(3));

    proxy.signal("TERM");
    proxy.exits_zero().await;
}

#[tokio::test]
async fn writes_answer_topology_stale_when_the_map_is_too_old_and_reads_carry_on() {
    let a = Upstream::start("a").await;
    let fake = FakeCoordinator::start(&single_map(2, a.addr)).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_following(
        &[fake.url()],
        dir.path(),
        "[topology]\nmax_staleness = \"1s\"\nwatch_timeout = \"200ms\"\n",
    )
    .await;
    let url = format!("http://{}/kv/x", proxy.addr);
    assert_eq!(
        send(&client(), keyed("PUT", &url, "x", "v")).await.status,
        200
    );
    drop(fake);
    eventually(
        Duration::from_secs(10),
        "writes refused as stale",
        || async { send(&client(), keyed("PUT", &url, "x", "v")).await.status == 503 },
    )
    .await;
    send(&client(), keyed("PUT", &url, "x", "v"))
        .await
        .assert_error(503, "topology_stale");
    assert_eq!(
        get_key(&client(), &url, "x").await.status,
        200,
        "reads carry on"
    );
}

#[tokio::test]
async fn the_demo_runs_a_cluster_that_answers_and_stops_cleanly() {
    let mut demo = BinProcess::spawn(
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--coordinator-http",
            "127.0.0.1:0",
            "--coordinator-grpc",
            "127.0.0.1:0",
        ],
        true,
    )
    .await;
    // "shardgate demo ready proxy=ADDR admin=ADDR coordinator=ADDR"
    let field = |name: &str| -> String {
        demo.first_line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap()
            .to_owned()
    };
    let proxy = field("proxy");
    let admin: std::net::SocketAddr = field("admin").parse().unwrap();
    eventually(Duration::from_secs(10), "demo ready", || async {
        admin_get(admin, "/readyz").await.status == 200
    })
    .await;
    let put = send(
        &client(),
        http::Request::put(format!("http://{proxy}/kv/user:42"))
            .body(full("hello"))
            .unwrap(),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.text());
    assert_eq!(
        (
            put.json()["replicated"].clone(),
            put.json()["durable"].clone()
        ),
        (serde_json::json!(true), serde_json::json!(false)),
        "a demo write says what its acknowledgement is worth (a majority holds it, in memory): {}",
        put.text()
    );
    let get = send(
        &client(),
        http::Request::get(format!("http://{proxy}/kv/user:42"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(get.status, 200);
    assert_eq!(get.json()["value"], "hello");
    assert_eq!(
        get.header("x-shardgate-partition"),
        put.header("x-shardgate-partition")
    );
    // Replicas replicate: with a majority of three, a write is on at least
    // one replica when it is acknowledged, and the other follows.
    eventually(
        Duration::from_secs(5),
        "both replicas serve the write",
        || {
            let proxy = proxy.clone();
            async move {
                let mut served = std::collections::BTreeSet::new();
                for _ in 0..8 {
                    let r = send(
                        &client(),
                        http::Request::get(format!("http://{proxy}/kv/user:42"))
                            .header("x-read-preference", "secondary")
                            .body(empty())
                            .unwrap(),
                    )
                    .await;
                    if r.status != 200 || r.json()["value"] != "hello" {
                        return false;
                    }
                    served.insert(r.header("x-node-id").unwrap_or_default().to_owned());
                }
                served.len() == 2 && !served.iter().any(|n| n.ends_with("-n0"))
            }
        },
    )
    .await;

    // With the write's token, a replica read right after the write sees it,
    // even though one replica of each partition is 300 ms late on purpose.
    for i in 0..10 {
        let value = format!("v{i}");
        let put = send(
            &client(),
            http::Request::put(format!("http://{proxy}/kv/user:42"))
                .body(full(value.clone()))
                .unwrap(),
        )
        .await;
        assert_eq!(put.status, 200, "{}", put.text());
        let token = put.header("x-shardgate-token").expect("a write's token");
        let get = send(
            &client(),
            http::Request::get(format!("http://{proxy}/kv/user:42"))
                .header("x-read-preference", "secondaryPreferred")
                .header("x-shardgate-token", token)
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(get.json()["value"], value.as_str(), "{}", get.text());
    }

    // The node processes it started, from the "pid N" in its instructions.
    eventually(Duration::from_secs(5), "instructions printed", || async {
        demo.stdout.lock().unwrap().contains("Ctrl-C")
    })
    .await;
    let text = demo.stdout.lock().unwrap().clone();
    assert!(
        text.contains("does NOT guarantee")
            && text.contains("nothing is written to disk")
            && text.contains("x-shardgate-token")
            && text.contains("x-max-staleness"),
        "the demo says what it does not guarantee:\n{text}"
    );
    let words: Vec<&str> = text.split_whitespace().collect();
    let pids: Vec<u32> = words
        .windows(2)
        .filter(|w| w[0] == "pid")
        .filter_map(|w| w[1].parse().ok())
        .collect();
    assert_eq!(pids.len(), 9, "three members per partition: {text}");
    for pid in &pids {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "node {pid} running"
        );
    }

    demo.signal("INT");
    let stopped = Instant::now();
    let code = tokio::time::timeout(Duration::from_secs(15), demo.child.wait()).await;
    assert!(
        matches!(code, Ok(Ok(s)) if s.code() == Some(0)),
        "demo did not stop cleanly within 15 s ({code:?} after {:?}); stderr:\n{}",
        stopped.elapsed(),
        demo.stderr()
    );
    for pid in &pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "node {pid} left running after Ctrl-C"
        );
    }
}

#[tokio::test]
async fn the_full_url_of_a_coordinators_map_works_as_a_topology_source() {
    // The URL a user copies from the curl they just ran (SPEC §10).
    let c = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let map_url = c.coordinator.url("/v1/cluster/topology");
    let proxy = proxy_following(&[map_url], dir.path(), "").await;
    eventually(
        Duration::from_secs(10),
        "ready on the coordinator's map",
        || async { admin_get(proxy.admin, "/readyz").await.status == 200 },
    )
    .await;
    assert_eq!(
        proxy_epoch(proxy.admin).await,
        Some(c.coordinator.epoch().await),
        "the map it follows is the coordinator's"
    );
    // And it follows changes, which it asks for on the base it kept.
    let doc = c.coordinator.get_json("/v1/cluster/topology").await;
    let mut next = doc.clone();
    next["clusterEpoch"] = (doc["clusterEpoch"].as_u64().unwrap() + 1).into();
    let put = send(
        &client(),
        http::Request::put(c.coordinator.url("/v1/cluster/topology"))
            .header("authorization", "Bearer t")
            .body(full(next.to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.text());
    let want = next["clusterEpoch"].as_u64();
    eventually(
        Duration::from_secs(10),
        "the new epoch followed",
        || async { proxy_epoch(proxy.admin).await == want },
    )
    .await;
}

#[tokio::test]
async fn a_proxy_restarted_during_an_outage_serves_its_default_cache() {
    // No cache_file in the config: by default each proxy instance keeps one
    // in the state directory (here systemd's $STATE_DIRECTORY, a temporary
    // directory), named by its listen address.
    let c = cluster().await;
    let state = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = state.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [topology]\nsources = [\"{}\"]\nstartup_wait = \"300ms\"\n",
            c.coordinator.url("")
        ),
    )
    .unwrap();
    let start = || {
        let mut cmd = tokio::process::Command::new(binary());
        cmd.args(["proxy", "--config", config.to_str().unwrap()])
            .env("STATE_DIRECTORY", state.path());
        BinProxy::spawn_cmd(cmd)
    };
    let proxy = start().await;
    let cache = state
        .path()
        .join(format!("map-cache-127.0.0.1-{port}.json"));
    eventually(Duration::from_secs(10), "map cached by default", || async {
        cache.exists()
    })
    .await;
    c.coordinator.proc.kill().await;
    drop(proxy);
    let restarted = start().await;
    let key = key_for_partition(1, 2);
    let url = format!("http://{}/kv/{key}", restarted.addr);
    assert_eq!(get_key(&client(), &url, &key).await.status, 200);
    let status = admin_get(restarted.admin, "/admin/topology").await.json();
    assert!(
        status["source"].as_str().unwrap().starts_with("cache "),
        "{status}"
    );
}

/// `shardgate status ARGS`: its stdout, after it exited 0.
async fn status_of(args: &[&str]) -> String {
    let out = tokio::process::Command::new(binary())
        .arg("status")
        .args(args)
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The line of `table` that starts with `first`, split into its columns.
fn row<'t>(table: &'t str, first: &str) -> Vec<&'t str> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no row {first} in:\n{table}"))
        .split_whitespace()
        .collect()
}

#[tokio::test]
async fn shardgate_status_prints_the_cluster_as_a_coordinator_and_a_proxy_see_it() {
    let mut c = cluster().await;
    let coordinator = c.coordinator.url("");
    let before = status_of(&["--coordinator", &coordinator]).await;
    assert!(before.starts_with("EPOCH 1  LEADER "), "{before}");
    let primary = c.nodes[0].1.addr.to_string();
    let p0 = row(&before, "p0-primary");
    assert_eq!(
        p0[1..5],
        [primary.as_str(), "P0", "primary", "ACTIVE"],
        "{before}"
    );
    assert_eq!(row(&before, "0")[2], primary, "{before}");
    // The JSON is what the coordinator serves.
    let json: serde_json::Value =
        serde_json::from_str(&status_of(&["--coordinator", &coordinator, "--json"]).await).unwrap();
    assert_eq!(json["topology"]["clusterEpoch"], 1);
    assert_eq!(json["nodes"].as_array().unwrap().len(), 4);
    // After a failover: the old primary dead, its replica primary, epoch 2.
    c.kill(0).await;
    eventually(Duration::from_secs(10), "failed over", || async {
        c.coordinator.epoch().await == 2
    })
    .await;
    let after = status_of(&["--coordinator", &coordinator]).await;
    assert!(after.starts_with("EPOCH 2  "), "{after}");
    assert!(row(&after, "p0-primary").contains(&"DEAD"), "{after}");
    let replica = c.nodes[1].1.addr.to_string();
    assert_eq!(row(&after, "0")[2], replica, "{after}");
    assert_eq!(
        row(&after, "p0-replica")[2..4],
        ["P0", "primary"],
        "{after}"
    );
    // A proxy's view: its map and its upstreams' breakers.
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_following(std::slice::from_ref(&coordinator), dir.path(), "").await;
    eventually(Duration::from_secs(10), "proxy on epoch 2", || async {
        proxy_epoch(proxy.admin).await == Some(2)
    })
    .await;
    let key = key_for_partition(0, 2);
    let url = format!("http://{}/kv/{key}", proxy.addr);
    assert_eq!(get_key(&client(), &url, &key).await.status, 200);
    let admin = format!("http://{}", proxy.admin);
    let seen = status_of(&["--admin", &admin]).await;
    assert!(seen.starts_with("EPOCH 2  SOURCE "), "{seen}");
    let up = row(&seen, &replica);
    assert_eq!(up[1..4], ["P0", "primary", "closed"], "{seen}");
}

/// Headless Chromium (Debian's, as scripts/test installs it), run once.
async fn chromium(args: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(args)
            .output(),
    )
    .await
    .expect("chromium did not finish within 60 s")
    .expect("chromium not found: scripts/test installs Debian's chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page at `url` as Chromium rendered it (its DOM), and screenshots of
/// it at desktop and phone sizes under `$CARGO_TARGET_TMPDIR/status-pages/`.
async fn look_at(url: &str, name: &str) -> String {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-pages");
    std::fs::create_dir_all(&dir).unwrap();
    let dom = chromium(&["--dump-dom".to_owned(), url.to_owned()]).await;
    for (size, suffix) in [("1200,900", ""), ("390,844", "-phone")] {
        let shot = dir.join(format!("{name}{suffix}.png"));
        chromium(&[
            format!("--window-size={size}"),
            format!("--screenshot={}", shot.display()),
            url.to_owned(),
        ])
        .await;
        assert!(
            std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1000),
            "no screenshot at {}",
            shot.display()
        );
    }
    dom
}

/// The text of the table row whose first cells contain `first`.
fn page_row<'p>(dom: &'p str, first: &str) -> &'p str {
    dom.split("<tr>")
        .find(|r| r.contains(&format!(">{first}<")))
        .unwrap_or_else(|| panic!("no row {first} in the page:\n{dom}"))
}

#[tokio::test]
async fn the_status_pages_show_the_cluster_in_a_browser_before_and_after_a_failover() {
    let mut c = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_following(&[c.coordinator.url("")], dir.path(), "").await;
    eventually(Duration::from_secs(10), "proxy ready", || async {
        proxy_epoch(proxy.admin).await == Some(1)
    })
    .await;
    let coordinator_page = c.coordinator.url("/");
    let proxy_page = format!("http://{}/", proxy.admin);
    let old = c.nodes[0].1.addr.to_string();
    let new = c.nodes[1].1.addr.to_string();

    let before = look_at(&coordinator_page, "coordinator-before").await;
    assert!(before.contains(r#"<span id="epoch">1</span>"#), "{before}");
    assert_eq!(
        before.matches(r#"class="range""#).count(),
        2,
        "two partitions on the ring"
    );
    for (id, _) in &c.nodes {
        assert!(
            page_row(&before, id).contains(r#"<td class="ok">ACTIVE</td>"#),
            "{id}"
        );
    }
    assert!(
        before.contains("http-equiv=\"refresh\""),
        "the page refreshes itself"
    );
    assert!(before.contains("name=\"viewport\""), "readable on a phone");
    let seen = look_at(&proxy_page, "proxy-before").await;
    assert!(seen.contains(r#"<span id="epoch">1</span>"#), "{seen}");
    assert!(page_row(&seen, &old).contains(">primary<"), "{seen}");
    assert!(page_row(&seen, &old).contains(r#"<td class="ok">closed</td>"#));

    c.kill(0).await;
    eventually(
        Duration::from_secs(10),
        "failed over and followed",
        || async { proxy_epoch(proxy.admin).await == Some(2) },
    )
    .await;
    let after = look_at(&coordinator_page, "coordinator-after").await;
    assert!(after.contains(r#"<span id="epoch">2</span>"#), "{after}");
    // The dead node is shown DEAD until, out of the map and silent for
    // twice the timeout, the coordinator forgets it (a slow machine may get
    // there before the browser does).
    if after.contains(">p0-primary<") {
        assert!(
            page_row(&after, "p0-primary").contains(r#"<td class="bad">DEAD</td>"#),
            "{after}"
        );
    }
    assert!(
        page_row(&after, "p0-replica").contains(">P0 primary<"),
        "{after}"
    );
    let failover = format!("partition 0: primary {old} → {new}");
    assert!(after.contains(&failover), "the change is listed: {after}");
    let seen = look_at(&proxy_page, "proxy-after").await;
    assert!(seen.contains(r#"<span id="epoch">2</span>"#), "{seen}");
    assert!(page_row(&seen, &new).contains(">primary<"), "{seen}");
    assert!(seen.contains(&failover), "{seen}");
}
