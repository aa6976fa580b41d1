//! Heartbeats per second one coordinator sustains, with each store.
//!
//! Starts the real `shardgate coordinator` (release build) with a map of
//! 1,000 nodes, then keeps 64 heartbeats in flight from 1,000 distinct node
//! ids over four HTTP/2 channels for 10 s, after a 2 s warm-up. Reports
//! heartbeats/s, latency p50/p99 and the coordinator's CPU per heartbeat
//! (PostgreSQL's own CPU is not included). The PostgreSQL run needs a server:
//! `SHARDGATE_BENCH_PG=postgres://user@127.0.0.1:port/postgres` (a database
//! is created for the run and dropped after); without it only the file
//! store is measured. The etcd run needs a cluster:
//! `SHARDGATE_BENCH_ETCD=etcd://127.0.0.1:2379,127.0.0.1:2381,127.0.0.1:2383`
//! (a fresh key prefix is used for the run).
//!
//! With `SHARDGATE_BENCH_FORGED=N` the heartbeats instead come from N node
//! ids the map does not know (what anyone reaching the gRPC port can send),
//! and the coordinator's peak and final RSS are reported too. With
//! `SHARDGATE_BENCH_BINARY=PATH` another build's coordinator is measured
//! (a before/after).
//!
//! Run: `cargo bench --bench heartbeats`. Talks only to 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shardgate::proto::cluster_discovery_service_client::ClusterDiscoveryServiceClient;
use shardgate::proto::{HeartbeatRequest, ResourceUsage};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

const NODES: usize = 1000;
const IN_FLIGHT: usize = 64;
const CHANNELS: usize = 4;
const WARM_UP: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(10);

fn node_addr(i: usize) -> String {
    format!("10.{}.{}.{}:9000", i / 65536, (i / 256) % 256, i % 256)
}

/// 500 partitions, each a primary and a replica: 1,000 nodes.
fn map() -> String {
    let parts = NODES / 2;
    let span = (1u64 << 32) / parts as u64;
    let partitions: Vec<_> = (0..parts)
        .map(|p| {
            let start = span * p as u64;
            let end = if p == parts - 1 {
                u64::from(u32::MAX)
            } else {
                start + span - 1
            };
            serde_json::json!({
                "partitionIndex": p,
                "primaryNodeIp": node_addr(2 * p),
                "replicaNodeIps": [node_addr(2 * p + 1)],
                "hashRangeStart": format!("{start:08x}"),
                "hashRangeEnd": format!("{end:08x}"),
            })
        })
        .collect();
    serde_json::json!({
        "clusterEpoch": 1, "masterNodeId": "bench", "partitionCount": parts,
        "partitions": partitions,
    })
    .to_string()
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // /proc reports in USER_HZ, which the Linux ABI fixes at 100.
    ticks / 100.0
}

/// `VmHWM` and `VmRSS` of `pid`, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Node ids the heartbeats come from: the map's, or `SHARDGATE_BENCH_FORGED`
/// unknown ones.
fn forged() -> usize {
    std::env::var("SHARDGATE_BENCH_FORGED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

struct Result {
    store: &'static str,
    peak_kib: u64,
    rss_kib: u64,
    per_second: f64,
    p50: Duration,
    p99: Duration,
    cpu_us: f64,
    errors: u64,
}

async fn measure(store: &'static str, store_url: &str, dir: &std::path::Path) -> Result {
    let topo = dir.join("map.json");
    std::fs::write(&topo, map()).unwrap();
    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        "[coordinator]\nmax_heartbeats_per_second = 1000000\nheartbeat_timeout = \"60s\"\n\
         sweep_interval = \"1s\"\n[log]\nlevel = \"warn\"\n",
    )
    .unwrap();
    let binary = std::env::var("SHARDGATE_BENCH_BINARY")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_shardgate").to_owned());
    let mut child = tokio::process::Command::new(binary)
        .args(["coordinator", "--config", config.to_str().unwrap()])
        .args(["--topology", topo.to_str().unwrap(), "--store", store_url])
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines
        .next_line()
        .await
        .unwrap()
        .expect("coordinator exited");
    // "shardgate coordinator listening on http ADDR grpc ADDR"
    let grpc: SocketAddr = ready.split_whitespace().nth(7).unwrap().parse().unwrap();
    let pid = child.id().unwrap();

    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        channels.push(ClusterDiscoveryServiceClient::new(ch));
    }
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..IN_FLIGHT {
        let mut client = channels[t % CHANNELS].clone();
        let (measuring, stop) = (measuring.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let (ids, forged) = match forged() {
                0 => (NODES, false),
                n => (n, true),
            };
            let mut i = t % ids;
            while !stop.load(Ordering::Relaxed) {
                let req = HeartbeatRequest {
                    node_id: if forged {
                        format!("forged-{i}")
                    } else {
                        format!("node-{i}")
                    },
                    ip_address: node_addr(if forged { NODES + i } else { i }),
                    epoch_timestamp_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis() as i64,
                    resource_status: Some(ResourceUsage {
                        cpu_percent: 12.5,
                        free_memory_bytes: 1 << 30,
                        active_connections: 40,
                    }),
                    replication: None,
                };
                let sent = Instant::now();
                let ok = client.report_heartbeat(req).await.is_ok();
                if measuring.load(Ordering::Relaxed) {
                    // Answered either way: a refusal of a forged id is the
                    // coordinator doing its job, and is timed like the rest.
                    latencies.push(sent.elapsed());
                    errors += u64::from(!ok);
                }
                i = (i + IN_FLIGHT) % ids;
            }
            (latencies, errors)
        }));
    }
    tokio::time::sleep(WARM_UP).await;
    let cpu0 = cpu_seconds(pid);
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(MEASURE).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let cpu1 = cpu_seconds(pid);
    let (peak_kib, rss_kib) = rss_kib(pid);
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let _ = child.kill().await;
    all.sort();
    let n = all.len().max(1);
    Result {
        store,
        peak_kib,
        rss_kib,
        per_second: all.len() as f64 / elapsed.as_secs_f64(),
        p50: all.get(n / 2).copied().unwrap_or_default(),
        p99: all.get(n * 99 / 100).copied().unwrap_or_default(),
        cpu_us: (cpu1 - cpu0) * 1e6 / n as f64,
        errors,
    }
}

async fn postgres_database(admin: &str) -> (tokio_postgres::Client, String, String) {
    let (client, conn) = tokio_postgres::connect(admin, tokio_postgres::NoTls)
        .await
        .expect("cannot reach SHARDGATE_BENCH_PG");
    tokio::spawn(conn);
    let name = format!("heartbeat_bench_{}", std::process::id());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    (client, name, url)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Test runners list targets; this one is a benchmark, not a test.
    if args.iter().any(|a| a == "--list") || !args.iter().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut results = Vec::new();
        let dir = tempfile::tempdir().unwrap();
        let file = format!("file:{}", dir.path().join("state.json").display());
        results.push(measure("file", &file, dir.path()).await);
        match std::env::var("SHARDGATE_BENCH_PG") {
            Ok(admin) => {
                let (client, name, url) = postgres_database(&admin).await;
                let dir = tempfile::tempdir().unwrap();
                results.push(measure("postgresql", &url, dir.path()).await);
                let _ = client
                    .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
                    .await;
            }
            Err(_) => eprintln!("SHARDGATE_BENCH_PG not set: PostgreSQL store skipped"),
        }
        match std::env::var("SHARDGATE_BENCH_ETCD") {
            Ok(cluster) => {
                let hosts = cluster.trim_start_matches("etcd://").split('/').next().unwrap_or("");
                let url = format!("etcd://{hosts}/bench-{}", std::process::id());
                let dir = tempfile::tempdir().unwrap();
                results.push(measure("etcd", &url, dir.path()).await);
            }
            Err(_) => eprintln!("SHARDGATE_BENCH_ETCD not set: etcd store skipped"),
        }
        let ids = match forged() {
            0 => format!("{NODES} node ids of the map"),
            n => format!("{n} forged node ids the map does not know"),
        };
        println!(
            "\n{IN_FLIGHT} heartbeats in flight from {ids}, {}s after {}s warm-up\n",
            MEASURE.as_secs(),
            WARM_UP.as_secs()
        );
        println!(
            "| store | heartbeats/s | p50 | p99 | coordinator CPU µs/heartbeat | errors (refusals) | peak RSS | RSS at end |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in results {
            println!(
                "| {} | {:.0} | {:.2} ms | {:.2} ms | {:.1} | {} | {:.1} MiB | {:.1} MiB |",
                r.store,
                r.per_second,
                r.p50.as_secs_f64() * 1e3,
                r.p99.as_secs_f64() * 1e3,
                r.cpu_us,
                r.errors,
                r.peak_kib as f64 / 1024.0,
                r.rss_kib as f64 / 1024.0
            );
        }
    });
}
