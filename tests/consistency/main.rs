//! Replication and consistency (SPEC §7) with the real binaries: reference
//! nodes (`shardgate node`, each with its agent in-process), a coordinator
//! and a proxy, faults by SIGKILL and SIGSTOP, and a ledger of unique write
//! ids checked after every round.
//!
//! Rounds are seeded: `CONSISTENCY_SEED` picks the first seed and
//! `CONSISTENCY_ROUNDS` how many rounds run (a few by default; `scripts/soak`
//! runs 20).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use rand::{RngExt, SeedableRng};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[tokio::test]
async fn replicas_apply_every_write_in_order_and_report_their_place() {
    let p = Partition::start(&[&[], &[], &[]], false).await;
    let primary = &p.nodes[0];
    let mut last = String::new();
    for i in 0..50 {
        let r = primary.put(&format!("k{}", i % 7), &format!("v{i}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["replicated"], true);
        let hlc = r.header("x-shardgate-hlc").unwrap().to_owned();
        assert_eq!(hlc.len(), 16);
        assert!(
            hlc > last,
            "each write's HLC is above the last: {hlc} after {last}"
        );
        last = hlc;
    }
    p.wait_until_in_sync(&[0, 1, 2]).await;
    for n in &p.nodes[1..] {
        for k in 0..7 {
            let r = n.get(&format!("k{k}")).await;
            assert_eq!(r.status, 200);
            // The last write to k{k} was v{i} with the largest i ≡ k (mod 7) below 50.
            let i = (0..50).filter(|i| i % 7 == k).max().unwrap();
            assert_eq!(r.json()["value"], format!("v{i}"), "{} on {}", k, n.id);
            assert!(
                r.header("x-shardgate-applied")
                    .is_some_and(|a| a >= r.json()["version"].as_str().unwrap())
            );
        }
        let s = n.status().await.unwrap();
        assert_eq!(
            (s["role"].as_str(), s["appliedHlc"].as_str()),
            (Some("replica"), Some(last.as_str()))
        );
        assert_eq!(s["lastReplicatedSequence"], 50);
    }
    // The coordinator hears it through the agents.
    eventually(
        Duration::from_secs(5),
        "applied HLCs reach the coordinator",
        || async {
            let nodes = p.coordinator.get_json("/v1/cluster/nodes").await;
            nodes["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["id"].as_str().is_some_and(|id| id.starts_with('n')))
                .count()
                == 3
        },
    )
    .await;
    // The file store keeps the replication rows beside its state file.
    let rows_file = p.dir.path().join("state.json.replication");
    eventually(
        Duration::from_secs(5),
        "the file store's replication rows reach sequence 50",
        || async {
            let Ok(text) = std::fs::read_to_string(&rows_file) else {
                return false;
            };
            let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
            let rows = doc["replication"].as_array().unwrap();
            rows.len() == 2
                && rows
                    .iter()
                    .all(|r| r["lastReplicatedSequence"] == 50 && r["source"] == "n0")
        },
    )
    .await;
    // A replica takes no writes.
    p.nodes[1]
        .put("k0", "x")
        .await
        .assert_error(503, "not_primary");
}

#[tokio::test]
async fn a_primary_cut_off_from_its_replicas_refuses_writes_and_keeps_serving_reads() {
    let p = Partition::start(&[&[], &[], &[]], false).await;
    let primary = &p.nodes[0];
    assert_eq!(primary.put("k", "before").await.status, 200);
    for n in &p.nodes[1..] {
        n.proc.signal("STOP");
    }
    eventually(
        Duration::from_secs(5),
        "writes refused without a majority",
        || async {
            let r = primary.put("k", "during").await;
            r.status == 503 && r.json()["error"] == "no_quorum"
        },
    )
    .await;
    let r = primary.get("k").await;
    assert_eq!(r.status, 200, "reads carry on");
    assert_ne!(r.json()["value"], serde_json::Value::Null);
    for n in &p.nodes[1..] {
        n.proc.signal("CONT");
    }
    eventually(Duration::from_secs(10), "writes accepted again", || async {
        primary.put("k", "after").await.status == 200
    })
    .await;
}

#[tokio::test]
async fn a_replica_that_restarts_empty_serves_no_reads_until_it_has_caught_up() {
    let mut p = Partition::start(&[&[], &[], &[]], false).await;
    for i in 0..200 {
        assert_eq!(
            p.nodes[0]
                .put(&format!("k{i}"), &format!("v{i}"))
                .await
                .status,
            200
        );
    }
    let old = p.nodes.pop().unwrap();
    let (id, addr) = (old.id.clone(), old.addr.to_string());
    old.proc.kill().await;
    // Writes go on while it is away (the primary and n1 are a majority).
    for i in 200..300 {
        assert_eq!(
            p.nodes[0]
                .put(&format!("k{i}"), &format!("v{i}"))
                .await
                .status,
            200
        );
    }
    let back = NodeProc::spawn_in(None, p.dir.path(), &id, &addr, p.coordinator.grpc, &[]).await;
    // From its first answer on, it either refuses or serves the whole state:
    // never its empty memory as if it were current.
    let mut refused = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = back.get("k299").await;
        if r.status == 200 {
            assert_eq!(r.json()["value"], "v299");
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(
            ["catching_up", "not_placed"].contains(&r.json()["error"].as_str().unwrap()),
            "{}",
            r.text()
        );
        refused += 1;
        assert!(tokio::time::Instant::now() < deadline, "never caught up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(refused > 0, "a restarted node starts by refusing reads");
    for i in (0..300).step_by(37) {
        assert_eq!(
            back.get(&format!("k{i}")).await.json()["value"],
            format!("v{i}")
        );
    }
    p.nodes.push(back);
    p.wait_until_in_sync(&[0, 1, 2]).await;
}

/// What one round of writes through the proxy saw.
#[derive(Default)]
struct Ledger {
    /// id → value of every write the proxy acknowledged (200).
    acked: BTreeMap<String, String>,
    /// Writes whose outcome is unknown (timeouts, 5xx after sending).
    unknown: usize,
    /// The last acknowledged counter of each hot key, in write order.
    hot: BTreeMap<String, u64>,
}

/// Write unique ids through the proxy until `stop`; hot keys are rewritten
/// with a rising counter by one writer each, so their order is known.
async fn write_load(
    url: String,
    round: u64,
    writer: usize,
    ledger: Arc<Mutex<Ledger>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut i = 0u64;
    while !stop.is_cancelled() {
        i += 1;
        let (key, value) = if i.is_multiple_of(5) {
            (format!("hot-{writer}"), format!("{i}"))
        } else {
            (
                format!("r{round}-w{writer}-{i}"),
                format!("v{round}-{writer}-{i}"),
            )
        };
        let req = http::Request::put(format!("{url}/kv/{key}"))
            .body(full(value.clone()))
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), client().request(req)).await;
        let status = match answer {
            Ok(Ok(r)) => r.status().as_u16(),
            _ => 0,
        };
        let mut l = ledger.lock().unwrap();
        match status {
            200 => {
                if key.starts_with("hot-") {
                    l.hot.insert(key.clone(), i);
                }
                l.acked.insert(key, value);
            }
            // Refused before anything was written.
            421 => {}
            _ => l.unknown += 1,
        }
    }
}

/// Run one round: write through the proxy, SIGKILL the primary, keep
/// writing through the failover, then check the ledger against the
/// promoted primary. Returns (acknowledged, lost).
async fn kill_primary_round(seed: u64, quorum: &str) -> (usize, usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Clocks that disagree by up to ±500 ms: versions must still rise.
    let offsets: Vec<String> = (0..3)
        .map(|_| rng.random_range(-500i64..=500).to_string())
        .collect();
    // One replica lags (its applies are delayed): with `async` the primary
    // runs ahead of it, and the failover must not promote it.
    let slow = rng.random_range(1..3usize);
    let flags: Vec<Vec<&str>> = offsets
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let mut f = vec!["--write-quorum", quorum, "--clock-offset-ms", o.as_str()];
            if i == slow {
                f.extend(["--apply-delay-ms", "30"]);
            }
            f
        })
        .collect();
    let flag_refs: Vec<&[&str]> = flags.iter().map(Vec::as_slice).collect();
    let p = Partition::start(&flag_refs, true).await;
    let url = p.proxy_url("");
    eventually(
        Duration::from_secs(10),
        "the proxy serves the partition",
        || async {
            send(
                &client(),
                http::Request::put(format!("{url}/kv/warmup"))
                    .body(full("x"))
                    .unwrap(),
            )
            .await
            .status
                == 200
        },
    )
    .await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            tokio::spawn(write_load(
                url.clone(),
                seed,
                w,
                ledger.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
    let old = p.primary().await;
    let old_id = old.id.clone();
    old.proc.signal("KILL");
    // Writes carry on through the failover and after it.
    eventually(
        Duration::from_secs(20),
        "a new primary is named",
        || async { p.primary().await.id != old_id },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
    stop.cancel();
    for w in writers {
        w.await.unwrap();
    }
    let new = p.primary().await;
    let l = std::mem::take(&mut *ledger.lock().unwrap());
    let mut lost = 0;
    for (key, value) in &l.acked {
        let r = new.get(key).await;
        if key.starts_with("hot-") {
            // The later write wins: never an older value than the last acknowledged.
            let got: u64 = r.json()["value"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if got < l.hot[key] {
                lost += 1;
            }
        } else if r.status != 200 || r.json()["value"] != value.as_str() {
            lost += 1;
        }
    }
    eprintln!(
        "seed {seed} ({quorum}, clock offsets {offsets:?} ms, n{slow} slowed): {} acknowledged, {} unknown, {lost} lost; {} took over from {old_id}",
        l.acked.len(),
        l.unknown,
        new.id
    );
    assert!(
        l.acked.len() > 20,
        "the round wrote something: {}",
        l.acked.len()
    );
    (l.acked.len(), lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_majority_writes_a_killed_primary_loses_no_acknowledged_write() {
    let first = env_u64("CONSISTENCY_SEED", 0xC0FFEE);
    let rounds = env_u64("CONSISTENCY_ROUNDS", 2);
    let mut total = (0, 0);
    for round in 0..rounds {
        let (acked, lost) = kill_primary_round(first + round, "majority").await;
        total = (total.0 + acked, total.1 + lost);
        assert_eq!(lost, 0, "seed {}: acknowledged writes lost", first + round);
    }
    eprintln!(
        "majority: {rounds} rounds, {} acknowledged, {} lost",
        total.0, total.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_async_writes_a_killed_primary_may_lose_acknowledged_writes_and_says_how_many() {
    let first = env_u64("CONSISTENCY_SEED", 0xC0FFEE);
    let rounds = env_u64("CONSISTENCY_ROUNDS", 2).div_ceil(2);
    let mut total = (0, 0);
    for round in 0..rounds {
        let (acked, lost) = kill_primary_round(first + round, "async").await;
        total = (total.0 + acked, total.1 + lost);
        // Whatever was lost, what survives is what was written: the check
        // above compared every surviving value with the ledger.
        assert!(lost <= acked);
    }
    eprintln!(
        "async: {rounds} rounds, {} acknowledged, {} lost",
        total.0, total.1
    );
}

/// Node flags: the primary and a fast replica, and a replica whose applies
/// are delayed by `slow_ms`.
fn one_slow_replica(slow_ms: &str) -> [Vec<&str>; 3] {
    [vec![], vec![], vec!["--apply-delay-ms", slow_ms]]
}

async fn put_via(url: &str, key: &str, value: &str) -> Answer {
    send(
        &client(),
        http::Request::put(format!("{url}/kv/{key}"))
            .body(full(value.to_owned()))
            .unwrap(),
    )
    .await
}

async fn get_via(url: &str, key: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = http::Request::get(format!("{url}/kv/{key}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(&client(), req.body(empty()).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_with_its_writes_token_always_sees_that_write_even_from_lagging_replicas() {
    let pairs = env_u64("CONSISTENCY_PAIRS", 300);
    let flags = one_slow_replica("40");
    let flag_refs: Vec<&[&str]> = flags.iter().map(Vec::as_slice).collect();
    let p = Partition::start(&flag_refs, true).await;
    let url = p.proxy_url("");
    let slow = p.nodes[2].id.clone();
    let (mut stale_without_token, mut served_by_replica) = (0, 0);
    let mut last_token = String::new();
    for i in 0..pairs {
        let key = format!("ryw-{}", i % 16);
        let value = format!("v{i}");
        let put = put_via(&url, &key, &value).await;
        assert_eq!(put.status, 200, "{}", put.text());
        let token = put
            .header("x-shardgate-token")
            .expect("a write's answer carries a token")
            .to_owned();
        assert!(
            token.len() <= 128 && token.bytes().all(|b| b.is_ascii_graphic()),
            "{token}"
        );
        last_token.clone_from(&token);
        let read = get_via(
            &url,
            &key,
            &[
                ("x-read-preference", "secondaryPreferred"),
                ("x-shardgate-token", &token),
            ],
        )
        .await;
        assert_eq!(read.status, 200, "{}", read.text());
        assert_eq!(
            read.json()["value"],
            value.as_str(),
            "pair {i}: read its own write ({})",
            read.header("x-node-id").unwrap_or("?")
        );
        if read.header("x-node-id").is_some_and(|n| n != "n0") {
            served_by_replica += 1;
        }
        // The control: the same read without the token, straight from the
        // lagging replica, often does not see it yet.
        if i % 4 == 0 {
            let slow_node = p.nodes.iter().find(|n| n.id == slow).unwrap();
            if slow_node.get(&key).await.json()["value"] != value.as_str() {
                stale_without_token += 1;
            }
        }
    }
    eprintln!(
        "{pairs} write-then-read pairs: {served_by_replica} served by a replica; the lagging replica was stale {stale_without_token} times without the token"
    );
    assert!(
        stale_without_token > 0,
        "the lagging replica must really lag for this test to mean anything"
    );
    // The replica that keeps up acknowledged each write with the primary, so
    // token reads spread onto it rather than all falling to the primary.
    assert!(
        served_by_replica * 10 >= pairs,
        "only {served_by_replica} of {pairs} token reads were served by a replica"
    );
    // Right after its write, a token read goes where the write is known to
    // be, often the primary. Once the replicas' own answers show they have
    // it, they serve it.
    let last_key = format!("ryw-{}", (pairs - 1) % 16);
    eventually(
        Duration::from_secs(10),
        "a replica known to hold the write serves the token read",
        || {
            let (url, key, token) = (url.clone(), last_key.clone(), last_token.clone());
            async move {
                // Plain replica reads teach the proxy how far each replica got.
                get_via(&url, &key, &[("x-read-preference", "secondary")]).await;
                let r = get_via(
                    &url,
                    &key,
                    &[
                        ("x-read-preference", "secondaryPreferred"),
                        ("x-shardgate-token", &token),
                    ],
                )
                .await;
                r.status == 200 && r.header("x-node-id").is_some_and(|n| n != "n0")
            }
        },
    )
    .await;
    let admin = p.proxy.as_ref().unwrap().admin;
    assert!(
        metric(
            admin,
            "shardgate_replica_reads_total{result=\"token_not_applied\"}"
        )
        .await
            > 0.0
    );
    assert!(metric(admin, "shardgate_replica_reads_total{result=\"served\"}").await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_further_behind_than_the_staleness_bound_serve_no_reads() {
    let flags = one_slow_replica("400");
    let flag_refs: Vec<&[&str]> = flags.iter().map(Vec::as_slice).collect();
    let p = Partition::start(&flag_refs, true).await;
    let url = p.proxy_url("");
    // One writer raises a counter on one key; the ledger keeps when each
    // value was acknowledged.
    let acked: Arc<Mutex<Vec<(tokio::time::Instant, u64)>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (url, acked, stop) = (url.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.is_cancelled() {
                i += 1;
                if put_via(&url, "counter", &i.to_string()).await.status == 200 {
                    acked.lock().unwrap().push((tokio::time::Instant::now(), i));
                }
            }
        })
    };
    let bound = Duration::from_millis(250);
    let (mut reads, mut by_replica, mut too_old) = (0, 0, Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < deadline {
        let started = tokio::time::Instant::now();
        let r = get_via(
            &url,
            "counter",
            &[
                ("x-read-preference", "secondaryPreferred"),
                ("x-max-staleness", "0.25"),
            ],
        )
        .await;
        if r.status != 200 {
            continue;
        }
        reads += 1;
        let got: u64 = r.json()["value"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let must_have = acked
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at + bound < started)
            .map(|(_, i)| *i)
            .max()
            .unwrap_or(0);
        let node = r.header("x-node-id").unwrap_or("?").to_owned();
        if node != "n0" {
            by_replica += 1;
        }
        if got < must_have {
            too_old.push((node, got, must_have));
        }
    }
    stop.cancel();
    writer.await.unwrap();
    let admin = p.proxy.as_ref().unwrap().admin;
    let passed_over = metric(admin, "shardgate_replica_reads_total{result=\"too_stale\"}").await;
    eprintln!(
        "{reads} bounded reads, {by_replica} by a replica, {passed_over} replica choices passed over as too stale"
    );
    assert!(
        too_old.is_empty(),
        "{} reads older than the bound were served, first: {:?}",
        too_old.len(),
        &too_old[..too_old.len().min(5)]
    );
    assert!(by_replica > 0, "the replica within the bound serves reads");
    assert!(
        passed_over > 0.0,
        "the lagging replica must have been passed over"
    );
    // `secondary` with no replica within a bound of zero is refused.
    let strict = get_via(
        &url,
        "counter",
        &[("x-read-preference", "secondary"), ("x-max-staleness", "0")],
    )
    .await;
    assert!(
        strict.status == 200 || strict.json()["error"] == "no_fresh_replica",
        "{}",
        strict.text()
    );
}

#[tokio::test]
async fn a_malformed_token_or_staleness_bound_is_a_clear_400_and_a_write_is_stamped() {
    let p = Partition::start(&[&[], &[], &[]], true).await;
    let url = p.proxy_url("");
    get_via(&url, "k", &[("x-shardgate-token", "not-a-token")])
        .await
        .assert_error(400, "invalid_token");
    get_via(&url, "k", &[("x-max-staleness", "soon")])
        .await
        .assert_error(400, "invalid_max_staleness");
    // A client cannot stamp a write itself: the proxy's stamp replaces it,
    // and the node versions the write above it.
    let put = send(
        &client(),
        http::Request::put(format!("{url}/kv/k"))
            .header("x-shardgate-hlc", "7fffffffffff0000")
            .body(full("v"))
            .unwrap(),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.text());
    let hlc = put.header("x-shardgate-hlc").unwrap();
    assert!(hlc < "7fffffffffff0000", "{hlc}");
    let token = put.header("x-shardgate-token").unwrap();
    assert!(
        token.ends_with(hlc),
        "the token names the node's stamp: {token} {hlc}"
    );
}

/// PUT through the proxy until it is acknowledged (a failover may refuse a
/// few); the answer's HLC.
async fn put_until_acked(url: &str, key: &str, value: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = put_via(url, key, value).await;
        if r.status == 200 {
            return r.header("x-shardgate-hlc").unwrap().to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key}={value} never acknowledged: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn with_clocks_half_a_second_apart_versions_only_rise_and_the_later_write_wins() {
    // The primary's clock runs 500 ms ahead, the replica that replaces it
    // 500 ms behind: a second apart on the wall.
    let p = Partition::start(
        &[
            &["--clock-offset-ms", "500"],
            &["--clock-offset-ms", "-500"],
            &[],
        ],
        true,
    )
    .await;
    let url = p.proxy_url("");
    let mut versions = Vec::new();
    for i in 0..30 {
        versions.push((put_until_acked(&url, "clock", &format!("a{i}")).await, i));
    }
    // A switchover by the operator, so the next write lands on the slow
    // clock at once (a failover's detection time would let its wall clock
    // catch up with the versions already written).
    let (n0, n1, n2) = (
        p.nodes[0].addr.to_string(),
        p.nodes[1].addr.to_string(),
        p.nodes[2].addr.to_string(),
    );
    let put = send(
        &client(),
        http::Request::put(p.coordinator.url("/v1/cluster/topology"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .header("content-type", "application/json")
            .body(full(map(3, &n1, &[n0, n2])))
            .unwrap(),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.text());
    let new = &p.nodes[1];
    eventually(
        Duration::from_secs(10),
        "n1 leads and n0 follows",
        || async {
            let role = |s: Option<serde_json::Value>| s.map(|s| s["role"].clone());
            role(new.status().await) == Some("primary".into())
                && role(p.nodes[0].status().await) == Some("replica".into())
        },
    )
    .await;
    for i in 30..60 {
        versions.push((put_until_acked(&url, "clock", &format!("a{i}")).await, i));
    }
    for w in versions.windows(2) {
        assert!(
            w[1].0 > w[0].0,
            "write {} got version {} after write {}'s {}: versions must rise whatever the clocks say",
            w[1].1,
            w[1].0,
            w[0].1,
            w[0].0
        );
    }
    // The later write wins on the new primary, and it carries the last version.
    let r = new.get("clock").await;
    assert_eq!(r.json()["value"], "a59", "{}", r.text());
    assert_eq!(
        r.json()["version"].as_str(),
        Some(versions.last().unwrap().0.as_str())
    );
}
