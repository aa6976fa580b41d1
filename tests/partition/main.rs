//! Partition safety (SPEC §8) with the real binaries: a primary cut off from
//! the coordinator, or paused past its lease, never takes a write once its
//! successor may have been named. Faults are real: the test relay cuts the
//! agent's link to the coordinator, SIGSTOP pauses a process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tokio::time::Instant;

/// Every node acknowledges after its own apply, so nothing but the lease
/// stops a primary that lost its coordinator (a majority quorum would also
/// refuse, and hide a missing lease).
const ASYNC: &[&str] = &["--write-quorum", "async"];

/// The address the coordinator's map names primary now.
async fn primary_addr(p: &Partition) -> String {
    p.coordinator.get_json("/v1/cluster/topology").await["partitions"][0]["primaryNodeIp"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Each answer: when it came back, its status and its error code.
type Answers = Arc<Mutex<Vec<(Instant, u16, String)>>>;

/// Writes straight to `node`, as a proxy holding the old map would send
/// them, each with a unique value; every answer with when it came back.
fn hammer(
    node: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
) -> (Answers, tokio::task::JoinHandle<()>) {
    let log: Answers = Arc::default();
    let task = {
        let log = log.clone();
        tokio::spawn(async move {
            let c = client();
            let mut i = 0u64;
            while !stop.is_cancelled() {
                i += 1;
                let req = http::Request::put(format!("http://{node}/kv/w{i}"))
                    .body(full(format!("v{i}")))
                    .unwrap();
                let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), c.request(req)).await
                else {
                    continue;
                };
                let status = r.status().as_u16();
                let code = r
                    .headers()
                    .get("x-shardgate-error")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let body = http_body_util::BodyExt::collect(r.into_body()).await;
                let code = if code.is_empty() {
                    body.ok()
                        .and_then(|b| {
                            serde_json::from_slice::<serde_json::Value>(&b.to_bytes()).ok()
                        })
                        .and_then(|v| v["error"].as_str().map(str::to_owned))
                        .unwrap_or_default()
                } else {
                    code
                };
                log.lock().unwrap().push((Instant::now(), status, code));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    (log, task)
}

#[tokio::test]
async fn an_isolated_primary_refuses_writes_once_its_lease_expires() {
    let p = Partition::start(&[ASYNC, ASYNC, ASYNC], false).await;
    let old = p.nodes[0].addr;
    assert_eq!(primary_addr(&p).await, old.to_string());
    let stop = tokio_util::sync::CancellationToken::new();
    let (log, writer) = hammer(old, stop.clone());
    eventually(Duration::from_secs(5), "writes are taken", || async {
        log.lock().unwrap().iter().any(|(_, s, _)| *s == 200)
    })
    .await;
    // The primary loses its coordinator; everything else carries on.
    p.agent_links[0].set(Link::Cut);
    eventually(Duration::from_secs(10), "a successor is named", || async {
        primary_addr(&p).await != old.to_string()
    })
    .await;
    let promoted = Instant::now();
    // Reads go on: an isolated primary is read-only, never write-only.
    assert_eq!(p.nodes[0].get("w1").await.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    writer.await.unwrap();
    let log = std::mem::take(&mut *log.lock().unwrap());
    let late: Vec<_> = log
        .iter()
        .filter(|(at, status, _)| *status == 200 && *at >= promoted)
        .collect();
    assert!(
        late.is_empty(),
        "{} writes acknowledged by the old primary after its successor was named",
        late.len()
    );
    let refused: Vec<_> = log.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(
        refused
            .iter()
            .any(|(_, s, code)| *s == 503 && code == "lease_expired"),
        "the lapsed lease is named in the refusals: {:?}",
        &refused[..refused.len().min(5)]
    );
    // The last write it took came before the promotion by a margin: its
    // lease ended before the coordinator could act.
    let last_ok = log
        .iter()
        .filter(|(_, s, _)| *s == 200)
        .map(|(at, ..)| *at)
        .max()
        .unwrap();
    eprintln!(
        "last write taken {:?} before the successor was seen; {} refused",
        promoted - last_ok,
        refused.len()
    );
    // Healed, it hears it was replaced and stops for good.
    p.agent_links[0].set(Link::Pass);
    eventually(
        Duration::from_secs(10),
        "the old primary is fenced",
        || async {
            let r = p.nodes[0].put("after", "x").await;
            r.status == 503 && r.json()["error"] == "fenced"
        },
    )
    .await;
}

#[tokio::test]
async fn a_primary_paused_past_its_lease_refuses_writes_when_it_resumes() {
    let p = Partition::start(&[ASYNC, ASYNC, ASYNC], false).await;
    let old = &p.nodes[0];
    assert_eq!(old.put("before", "x").await.status, 200);
    // A long pause (a GC, a stalled VM); its link to the coordinator stays
    // cut after it resumes, so nothing but its own lease can tell it.
    old.proc.signal("STOP");
    p.agent_links[0].set(Link::Cut);
    eventually(Duration::from_secs(10), "a successor is named", || async {
        primary_addr(&p).await != old.addr.to_string()
    })
    .await;
    old.proc.signal("CONT");
    let mut answers = Vec::new();
    for i in 0..30 {
        let r = old.put(&format!("resumed{i}"), "x").await;
        answers.push((r.status.as_u16(), r.json()["error"].clone()));
    }
    assert!(
        answers
            .iter()
            .all(|(s, e)| *s == 503 && e == "lease_expired"),
        "every write after the pause is refused for its lease: {answers:?}"
    );
    assert_eq!(old.get("before").await.status, 200, "reads go on");
    p.agent_links[0].set(Link::Pass);
    eventually(
        Duration::from_secs(10),
        "the old primary is fenced",
        || async {
            let r = old.put("after", "x").await;
            r.status == 503 && r.json()["error"] == "fenced"
        },
    )
    .await;
}

// ---------------------------------------------------------------------------
// The Jepsen-style partition test: hosts in network namespaces.

/// One request through a proxy, as the ledger keeps it.
#[derive(Clone, Debug)]
struct Op {
    id: u64,
    /// `'A'`: through the proxy cut off with the old primary; `'B'`: the other.
    side: char,
    write: bool,
    /// The read preference (reads).
    pref: &'static str,
    status: u16,
    /// `x-shardgate-error`, else the node's JSON `error`.
    code: String,
    /// `x-node-id`: who served it.
    node: String,
    /// The version the write was stamped with, physical milliseconds.
    hlc_ms: u64,
    /// The value read.
    value: Option<String>,
    sent_ms: u64,
    done_ms: u64,
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// One request; a timeout or a broken connection is status 0.
async fn call(
    c: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        BoxBody,
    >,
    req: http::Request<BoxBody>,
) -> (u16, String, String, u64, Option<String>) {
    let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(3), c.request(req)).await else {
        return (0, "timeout".into(), String::new(), 0, None);
    };
    let header = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (status, code, node) = (
        r.status().as_u16(),
        header("x-shardgate-error"),
        header("x-node-id"),
    );
    let hlc_ms = shardgate::clock::Hlc::parse(header("x-shardgate-hlc").as_bytes())
        .map_or(0, |h| h.physical_ms());
    let body = http_body_util::BodyExt::collect(r.into_body())
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let code = if code.is_empty() {
        json["error"].as_str().unwrap_or_default().to_owned()
    } else {
        code
    };
    let value = json["value"].as_str().map(str::to_owned);
    (status, code, node, hlc_ms, value)
}

/// Writes of unique ids and reads of this side's acknowledged ones, through
/// `proxy`, until `stop`.
async fn workload(
    side: char,
    proxy: std::net::SocketAddr,
    seed: u64,
    ledger: Arc<Mutex<Vec<Op>>>,
    stop: tokio_util::sync::CancellationToken,
) {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let c = client();
    let mut acked: Vec<u64> = Vec::new();
    let base = if side == 'A' { 1 << 40 } else { 2 << 40 } + (seed << 20);
    for n in 0..100_000u64 {
        if stop.is_cancelled() {
            break;
        }
        let write = acked.is_empty() || rng.random_bool(0.6);
        let (id, pref, req) = if write {
            let id = base + n;
            let req = http::Request::put(format!("http://{proxy}/kv/j{id}"))
                .body(full(format!("v{id}")))
                .unwrap();
            (id, "primary", req)
        } else {
            let id = acked[rng.random_range(0..acked.len())];
            let pref =
                ["primary", "primaryPreferred", "secondaryPreferred"][rng.random_range(0..3)];
            let req = http::Request::get(format!("http://{proxy}/kv/j{id}"))
                .header("x-read-preference", pref)
                .body(empty())
                .unwrap();
            (id, pref, req)
        };
        let sent_ms = wall_ms();
        let (status, code, node, hlc_ms, value) = call(&c, req).await;
        if write && status == 200 {
            acked.push(id);
        }
        ledger.lock().unwrap().push(Op {
            id,
            side,
            write,
            pref,
            status,
            code,
            node,
            hlc_ms,
            value,
            sent_ms,
            done_ms: wall_ms(),
        });
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..6))).await;
    }
}

/// The fault a round injects on the old primary.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Its host (with proxy A) cut off from everything else.
    Partition(Cut),
    /// Its process paused past its lease (a long GC pause), then resumed.
    Pause,
}

/// What one round found.
#[derive(Debug, Default)]
struct Found {
    acked: usize,
    /// Writes the old primary acknowledged after its successor's epoch began.
    split: usize,
    /// Acknowledged writes the final primary does not hold.
    lost: usize,
    /// Side A's failed writes during the fault without a SPEC error code.
    uncoded: usize,
    /// Side A's writes refused during the fault.
    refused: usize,
    /// Reads that broke their read preference's promise.
    bad_reads: usize,
    /// The longest time side B took no write, ms.
    unavailable_ms: u64,
    /// From the fault to side B's first write the successor acknowledged, ms.
    failover_ms: u64,
}

async fn partition_round(seed: u64, quorum: &str) -> Found {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let fault = match rng.random_range(0..3) {
        0 => Fault::Partition(Cut::Reject),
        1 => Fault::Partition(Cut::Drop),
        _ => Fault::Pause,
    };
    let net = Net::create(&["coord", "a", "b", "c", "pb"]);
    let dir = tempfile::tempdir().unwrap();
    let token = "hb-secret";
    let cfg = dir.path().join("coordinator.toml");
    std::fs::write(
        &cfg,
        format!(
            "[coordinator]\nid = \"coord-a\"\nfailover_hold_down = \"1s\"\nadmin_token = \"{ADMIN_TOKEN}\"\n\
             heartbeat_token = \"{token}\"\nmax_clock_skew = \"5s\"\n"
        ),
    )
    .unwrap();
    let placeholder = dir.path().join("placeholder.json");
    std::fs::write(&placeholder, map(1, "127.0.0.2:9", &["127.0.0.3:9".into()])).unwrap();
    let (http_listen, grpc_listen) = (
        format!("{}:0", net.ip("coord")),
        format!("{}:0", net.ip("coord")),
    );
    let mut flags = coordinator_flags(dir.path(), &cfg, &placeholder);
    flags.extend([
        "--http-listen".into(),
        http_listen,
        "--grpc-listen".into(),
        grpc_listen,
    ]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let coordinator = BinCoordinator::spawn_in(Some(net.ns("coord")), &flags).await;
    let mut nodes = Vec::new();
    for host in ["a", "b", "c"] {
        let listen = format!("{}:0", net.ip(host));
        let flags = ["--token", token, "--write-quorum", quorum];
        let n = NodeProc::spawn_in(
            Some(net.ns(host)),
            dir.path(),
            &format!("n{host}"),
            &listen,
            coordinator.grpc,
            &flags,
        )
        .await;
        nodes.push((n.id, n.addr, n.proc));
    }
    let addr_of = |i: usize| nodes[i].1.to_string();
    let doc = map(2, &addr_of(0), &[addr_of(1), addr_of(2)]);
    let url = coordinator.url("/v1/cluster/topology");
    let put = net
        .on("pb", async move {
            send(
                &client(),
                http::Request::put(url)
                    .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                    .body(full(doc))
                    .unwrap(),
            )
            .await
            .status
        })
        .await;
    assert_eq!(put, 200);
    // Both proxies follow the coordinator; proxy A lives with the old primary.
    let mut proxies = Vec::new();
    for host in ["a", "pb"] {
        let toml = dir.path().join(format!("proxy-{host}.toml"));
        std::fs::write(
            &toml,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 [topology]\nsources = [\"http://{}\"]\n[failover_buffer]\nenabled = true\n\
                 [timeouts]\nconnect = \"500ms\"\nper_try = \"1s\"\noverall = \"2500ms\"\n",
                coordinator.http
            ),
        )
        .unwrap();
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", net.ns(host)])
            .arg(binary())
            .args(["proxy", "--config", toml.to_str().unwrap()]);
        proxies.push(BinProxy::spawn_cmd(cmd).await);
    }
    // Everyone in place: replicas in sync, both proxies on epoch 2.
    let statuses: Vec<_> = nodes.iter().map(|n| n.1).collect();
    let admins = [proxies[0].admin, proxies[1].admin];
    let ready = |host: &'static str, admin: std::net::SocketAddr| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if admin_get(admin, "/admin/topology").await.json()["epoch"] == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("proxy on {host} never took epoch 2");
    };
    net.on("a", ready("a", admins[0])).await;
    net.on("pb", ready("pb", admins[1])).await;
    net.on("pb", async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut synced = 0;
            for n in &statuses[1..] {
                let r = send(
                    &client(),
                    http::Request::get(format!("http://{n}/_shardgate/status"))
                        .body(empty())
                        .unwrap(),
                )
                .await;
                if r.json()["state"] == "IN_SYNC" {
                    synced += 1;
                }
            }
            if synced == 2 {
                return;
            }
            assert!(Instant::now() < deadline, "replicas never in sync");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let ledger: Arc<Mutex<Vec<Op>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for (k, (host, side, proxy)) in [("a", 'A', proxies[0].addr), ("pb", 'B', proxies[1].addr)]
        .into_iter()
        .enumerate()
    {
        for w in 0..2u64 {
            workers.push(net.runtime(host).spawn(workload(
                side,
                proxy,
                seed * 8 + k as u64 * 2 + w,
                ledger.clone(),
                stop.clone(),
            )));
        }
    }
    tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
    let fault_start = wall_ms();
    match fault {
        Fault::Partition(how) => net.isolate("a", &["coord", "b", "c", "pb"], how),
        Fault::Pause => nodes[0].2.signal("STOP"),
    }
    // The successor's epoch began after the last look that still saw epoch 2.
    let topo = coordinator.url("/v1/cluster/topology");
    let epoch_began_ms = net
        .on("pb", async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            let mut last_old = wall_ms();
            loop {
                let doc = send(&client(), http::Request::get(&topo).body(empty()).unwrap()).await;
                if doc.json()["clusterEpoch"].as_u64().unwrap_or(0) > 2 {
                    return last_old;
                }
                last_old = wall_ms();
                assert!(Instant::now() < deadline, "no successor was named");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    tokio::time::sleep(Duration::from_millis(rng.random_range(800..2000))).await;
    match fault {
        Fault::Partition(_) => net.heal(),
        Fault::Pause => nodes[0].2.signal("CONT"),
    }
    let fault_end = wall_ms();
    // Healed, the old primary hears it was replaced and is fenced.
    let old = nodes[0].1;
    net.on("pb", async move {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = send(
                &client(),
                http::Request::put(format!("http://{old}/kv/probe"))
                    .body(full("x"))
                    .unwrap(),
            )
            .await;
            if r.status == 503 && r.json()["error"] == "fenced" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the old primary was never fenced"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }

    // The checks, over the whole ledger.
    let ops = std::mem::take(&mut *ledger.lock().unwrap());
    let final_doc = coordinator.url("/v1/cluster/topology");
    let final_primary: String = net
        .on("pb", async move {
            send(
                &client(),
                http::Request::get(final_doc).body(empty()).unwrap(),
            )
            .await
            .json()["partitions"][0]["primaryNodeIp"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .await;
    let mut found = Found::default();
    let acked: Vec<Op> = ops
        .iter()
        .filter(|o| o.write && o.status == 200)
        .cloned()
        .collect();
    found.acked = acked.len();
    found.split = acked
        .iter()
        .filter(|o| o.node == "na" && o.hlc_ms >= epoch_began_ms)
        .count();
    let ids: Vec<u64> = acked.iter().map(|o| o.id).collect();
    found.lost = net
        .on("pb", async move {
            let c = client();
            let mut lost = 0;
            for id in ids {
                let r = send(
                    &c,
                    http::Request::get(format!("http://{final_primary}/kv/j{id}"))
                        .body(empty())
                        .unwrap(),
                )
                .await;
                if r.json()["value"] != format!("v{id}").as_str() {
                    lost += 1;
                }
            }
            lost
        })
        .await;
    let during =
        |o: &&Op| o.side == 'A' && o.write && o.sent_ms >= fault_start && o.done_ms <= fault_end;
    found.refused = ops
        .iter()
        .filter(during)
        .filter(|o| o.status != 200)
        .count();
    found.uncoded = ops
        .iter()
        .filter(during)
        .filter(|o| o.status != 200 && o.status != 0 && o.code.is_empty())
        .count();
    // A read answers the value it asked for, says nothing is there yet (a
    // replica read may trail), or fails with a SPEC error; a `primary` read
    // of a write acknowledged before it was sent is never missing.
    let acked_at: std::collections::HashMap<u64, u64> =
        acked.iter().map(|o| (o.id, o.done_ms)).collect();
    found.bad_reads = ops
        .iter()
        .filter(|o| !o.write)
        .filter(|o| match o.status {
            200 => o.value.as_deref() != Some(format!("v{}", o.id).as_str()),
            404 => {
                o.pref == "primary"
                    && acked_at.get(&o.id).is_some_and(|t| *t < o.sent_ms)
                    && quorum == "majority"
            }
            0 => false,
            _ => o.code.is_empty(),
        })
        .count();
    let mut b_ok: Vec<u64> = ops
        .iter()
        .filter(|o| o.side == 'B' && o.write && o.status == 200)
        .map(|o| o.done_ms)
        .collect();
    b_ok.sort_unstable();
    found.unavailable_ms = b_ok.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    found.failover_ms = ops
        .iter()
        .filter(|o| o.side == 'B' && o.write && o.status == 200 && o.node != "na")
        .map(|o| o.done_ms.saturating_sub(fault_start))
        .min()
        .unwrap_or(u64::MAX);
    if std::env::var_os("PARTITION_DEBUG").is_some() {
        for o in ops
            .iter()
            .filter(|o| o.done_ms + 200 >= fault_start && o.sent_ms <= fault_end + 200)
        {
            eprintln!(
                "  {} {} {:>5} +{:>5}ms {:>4}ms {} {} {}",
                o.side,
                if o.write { "W" } else { "R" },
                o.pref,
                o.sent_ms as i64 - fault_start as i64,
                o.done_ms - o.sent_ms,
                o.status,
                o.code,
                o.node
            );
        }
        eprintln!(
            "  epoch began +{}ms, fault ended +{}ms",
            epoch_began_ms as i64 - fault_start as i64,
            fault_end - fault_start
        );
    }
    eprintln!(
        "seed {seed} ({quorum}, {fault:?}): {} acknowledged, {} split-brain, {} lost, side A refused {} during the fault ({} without a SPEC code), {} bad reads; side B's first write on the successor {} ms after the fault, its longest wait {} ms",
        found.acked,
        found.split,
        found.lost,
        found.refused,
        found.uncoded,
        found.bad_reads,
        found.failover_ms,
        found.unavailable_ms
    );
    for p in &mut proxies {
        let _ = p.child.kill().await;
    }
    found
}

/// A coordinator on `config`, starting from `placeholder`, its state in
/// `dir`, quick to declare a silent node dead.
fn coordinator_flags(
    dir: &std::path::Path,
    config: &std::path::Path,
    placeholder: &std::path::Path,
) -> Vec<String> {
    [
        "--config".to_owned(),
        config.display().to_string(),
        "--topology".into(),
        placeholder.display().to_string(),
        "--store".into(),
        format!("file:{}", dir.join("state.json").display()),
        "--heartbeat-timeout".into(),
        "1".into(),
        "--sweep-interval".into(),
        "0.1".into(),
    ]
    .into()
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_or_paused_primary_never_takes_a_write_after_its_successor_is_named() {
    let first = env_u64("PARTITION_SEED", 0x5EED_0019);
    let rounds = env_u64("PARTITION_ROUNDS", 3);
    let mut totals = Found::default();
    let mut failovers = Vec::new();
    for seed in first..first + rounds {
        let f = partition_round(seed, "majority").await;
        assert_eq!(f.split, 0, "seed {seed}: split brain");
        assert_eq!(f.lost, 0, "seed {seed}: acknowledged writes lost");
        assert_eq!(
            f.uncoded, 0,
            "seed {seed}: side A failures without a SPEC error"
        );
        assert_eq!(
            f.bad_reads, 0,
            "seed {seed}: reads broke their preference's promise"
        );
        totals.acked += f.acked;
        totals.refused += f.refused;
        totals.unavailable_ms = totals.unavailable_ms.max(f.unavailable_ms);
        failovers.push(f.failover_ms);
    }
    failovers.sort_unstable();
    eprintln!(
        "majority: {rounds} rounds, {} acknowledged, 0 split-brain, 0 lost, {} refused on side A; \
         side B's first write on the successor after {} ms (median; max {} ms), its longest wait {} ms",
        totals.acked,
        totals.refused,
        failovers[failovers.len() / 2],
        failovers[failovers.len() - 1],
        totals.unavailable_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_async_writes_the_lease_alone_keeps_an_isolated_primary_from_split_brain() {
    let first = env_u64("PARTITION_SEED", 0x5EED_0019);
    let rounds = env_u64("PARTITION_ROUNDS", 3).div_ceil(3);
    let (mut acked, mut lost) = (0, 0);
    for seed in first..first + rounds {
        let f = partition_round(seed, "async").await;
        assert_eq!(f.split, 0, "seed {seed}: split brain");
        assert_eq!(
            f.uncoded, 0,
            "seed {seed}: side A failures without a SPEC error"
        );
        acked += f.acked;
        lost += f.lost;
    }
    eprintln!(
        "async: {rounds} rounds, {acked} acknowledged, 0 split-brain, {lost} lost (async promises no more)"
    );
}

// ---------------------------------------------------------------------------
// The gate: an agent that fronts any HTTP node and enforces SPEC §8.

#[tokio::test]
async fn the_gate_passes_a_primarys_writes_only_under_its_lease_and_its_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let store = Upstream::start("store").await;
    let placeholder = dir.path().join("placeholder.json");
    std::fs::write(&placeholder, map(1, "127.0.0.2:9", &[])).unwrap();
    let cfg = dir.path().join("coordinator.toml");
    std::fs::write(
        &cfg,
        format!("[coordinator]\nadmin_token = \"{ADMIN_TOKEN}\"\nmax_clock_skew = \"5s\"\n"),
    )
    .unwrap();
    let flags = coordinator_flags(dir.path(), &cfg, &placeholder);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let coordinator = BinCoordinator::spawn(&flags).await;
    let link = Relay::start(coordinator.grpc).await;
    let addr_file = dir.path().join("gate.addr");
    let hooks = dir.path().join("hooks.log");
    let on = |what: &str| {
        format!(
            "echo {what} $SHARDGATE_ROLE $SHARDGATE_PARTITION $SHARDGATE_EPOCH >> {}",
            hooks.display()
        )
    };
    let (promote, demote) = (on("promote"), on("demote"));
    let coordinator_addr = link.addr.to_string();
    let node = format!("http://{}", store.addr);
    let mut agent = BinProcess::spawn(
        &[
            "agent",
            "--coordinator",
            &coordinator_addr,
            "--node-id",
            "g1",
            "--interval",
            "0.1",
            "--gate-listen",
            "127.0.0.1:0",
            "--node",
            &node,
            "--addr-file",
            addr_file.to_str().unwrap(),
            "--on-promote",
            &promote,
            "--on-demote",
            &demote,
        ],
        false,
    )
    .await;
    eventually(Duration::from_secs(10), "the gate listens", || {
        let there = std::fs::read_to_string(&addr_file).is_ok();
        async move { there }
    })
    .await;
    let gate: std::net::SocketAddr = std::fs::read_to_string(&addr_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let put = send(
        &client(),
        http::Request::put(coordinator.url("/v1/cluster/topology"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(full(map(2, &gate.to_string(), &[])))
            .unwrap(),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.text());
    let write = |epoch: Option<u64>| {
        let mut req = http::Request::put(format!("http://{gate}/kv/x"));
        if let Some(e) = epoch {
            req = req.header("x-cluster-epoch", e);
        }
        async move { send(&client(), req.body(full("v")).unwrap()).await }
    };
    eventually(
        Duration::from_secs(10),
        "the gate's node is primary",
        || async { write(Some(2)).await.status == 200 },
    )
    .await;
    let passed = store.requests();
    // A write routed by an older map is sent back with the newer epoch.
    let stale = write(Some(1)).await;
    stale.assert_error(421, "stale_epoch");
    assert_eq!(stale.header("x-cluster-epoch"), Some("2"));
    assert_eq!(
        store.requests(),
        passed,
        "refused writes never reach the node"
    );
    // Cut from its coordinator, its lease runs out: writes refused, reads pass.
    link.set(Link::Cut);
    eventually(Duration::from_secs(5), "the lease expires", || async {
        let r = write(Some(2)).await;
        r.status == 503 && r.header("x-shardgate-error") == Some("lease_expired")
    })
    .await;
    let refused_at = store.requests();
    write(Some(2)).await.assert_error(503, "lease_expired");
    assert_eq!(store.requests(), refused_at);
    let read = send(
        &client(),
        http::Request::get(format!("http://{gate}/kv/x"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        read.status, 200,
        "an isolated node is read-only, never write-only"
    );
    assert_eq!(store.requests(), refused_at + 1);
    // Through a proxy (which sends its map's epoch), the refusal reaches the
    // client as the SPEC's error, and reads go on.
    let toml = dir.path().join("proxy.toml");
    std::fs::write(
        &toml,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [topology]\nsources = [\"http://{}\"]\n",
            coordinator.http
        ),
    )
    .unwrap();
    let proxy = BinProxy::spawn(&["--config", toml.to_str().unwrap()]).await;
    let via = |method: http::Method| {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}/kv/x", proxy.addr))
            .header("x-shard-key", "x")
            .body(full("v"))
            .unwrap();
        async move { send(&client(), req).await }
    };
    let refused = via(http::Method::PUT).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        matches!(
            refused.header("x-shardgate-error"),
            Some("lease_expired" | "primary_unavailable")
        ),
        "{:?}: {}",
        refused.header("x-shardgate-error"),
        refused.text()
    );
    assert_eq!(via(http::Method::GET).await.status, 200, "reads go on");
    // Healed before anyone replaced it, it takes writes again, from the
    // proxy too.
    link.set(Link::Pass);
    eventually(Duration::from_secs(10), "the lease is renewed", || async {
        write(Some(2)).await.status == 200
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "the proxy's writes pass",
        || async { via(http::Method::PUT).await.status == 200 },
    )
    .await;
    // Moved out of the primary slot, it refuses writes as not primary. (The
    // new primary heartbeats, so the coordinator keeps it.)
    let other = "127.0.0.9:9".to_owned();
    let grpc = coordinator.grpc.to_string();
    let _successor = BinProcess::spawn(
        &[
            "agent",
            "--coordinator",
            &grpc,
            "--node-id",
            "g2",
            "--ip",
            &other,
            "--interval",
            "0.1",
        ],
        false,
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the successor heartbeats",
        || async { coordinator.node("g2").await.is_some() },
    )
    .await;
    let put = send(
        &client(),
        http::Request::put(coordinator.url("/v1/cluster/topology"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(full(map(3, &other, &[gate.to_string()])))
            .unwrap(),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.text());
    eventually(Duration::from_secs(10), "demoted", || async {
        let r = write(Some(3)).await;
        r.status == 503 && r.header("x-shardgate-error") == Some("not_primary")
    })
    .await;
    eventually(Duration::from_secs(10), "both hooks ran", || async {
        std::fs::read_to_string(&hooks).is_ok_and(|h| h.lines().count() >= 2)
    })
    .await;
    let log = std::fs::read_to_string(&hooks).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines[0], "promote primary 0 2", "{log}");
    assert_eq!(lines[1], "demote replica 0 3", "{log}");
    agent.signal("TERM");
    assert_eq!(agent.exit_code(Duration::from_secs(10)).await, Some(0));
}

/// A promoted node takes up its role only when its agent next hears from the
/// coordinator; heartbeats every 300 ms make that moment wide enough that
/// writes released from the failover hold meet it.
const SLOW_AGENT: &[&str] = &["--interval", "0.3"];

/// Each write's key, the status it got and its error code.
type Ledger = Arc<Mutex<Vec<(String, u16, String)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_failover_buffering_writes_a_promoted_node_refuses_before_taking_up_its_role_are_held_not_failed()
 {
    let mut p = Partition::start(&[SLOW_AGENT, SLOW_AGENT, SLOW_AGENT], true).await;
    let url = p.proxy_url("");
    let old = p.nodes[0].addr.to_string();
    assert_eq!(primary_addr(&p).await, old);
    // One writer through the proxy, a unique key and value per write; the
    // ledger keeps every answer.
    let stop = tokio_util::sync::CancellationToken::new();
    let ledger: Ledger = Arc::default();
    let writer = {
        let (stop, ledger, url) = (stop.clone(), ledger.clone(), url.clone());
        tokio::spawn(async move {
            let c = client();
            let mut i = 0u64;
            while !stop.is_cancelled() && i < 20_000 {
                i += 1;
                let key = format!("held-{i}");
                let a = send(
                    &c,
                    http::Request::put(format!("{url}/kv/{key}"))
                        .body(full(format!("v{i}")))
                        .unwrap(),
                )
                .await;
                let code = a.header("x-shardgate-error").unwrap_or_default().to_owned();
                ledger.lock().unwrap().push((key, a.status.as_u16(), code));
            }
        })
    };
    let taken = |ledger: &Ledger| {
        ledger
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s, _)| *s == 200)
            .count()
    };
    eventually(Duration::from_secs(10), "writes are taken", || async {
        taken(&ledger) > 20
    })
    .await;
    p.nodes.remove(0).proc.kill().await;
    eventually(Duration::from_secs(10), "a successor is named", || async {
        primary_addr(&p).await != old
    })
    .await;
    // Past the successor's first heartbeats: it has taken up its role.
    let after = taken(&ledger);
    eventually(
        Duration::from_secs(10),
        "the successor takes writes",
        || async { taken(&ledger) > after + 50 },
    )
    .await;
    stop.cancel();
    writer.await.unwrap();
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let failed: Vec<_> = ledger.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} writes failed across the failover: {:?}",
        failed.len(),
        ledger.len(),
        &failed[..failed.len().min(5)]
    );
    // Nothing acknowledged is lost: the new primary holds every write.
    let primary = p.primary().await;
    for (i, (key, ..)) in ledger.iter().enumerate() {
        let got = primary.get(key).await;
        assert_eq!(
            got.status, 200,
            "{key} acknowledged but not on the new primary"
        );
        assert_eq!(got.json()["value"], format!("v{}", i + 1), "{key}");
    }
}
