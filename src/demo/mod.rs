//! `shardgate demo`: a whole cluster on loopback for a newcomer.
//!
//! A coordinator (state file in a temporary directory), three partitions of
//! three reference nodes each (`shardgate node`: a primary and two replicas,
//! every node its own process with its agent in-process, writes acknowledged
//! once a majority holds them), and a proxy following the coordinator. Each
//! partition's last replica applies writes 300 ms late, so a stale replica
//! read is easy to see. It prints what to try: a stale read, a token read
//! that avoids it, a staleness bound, and killing a primary without losing
//! an acknowledged write.
//! Ctrl-C stops everything and removes the temporary directory.

use shardgate::config::{CoordinatorConfig, CoordinatorOverrides, ProxyConfig, ProxyOverrides};
use shardgate::coordinator::store::FileStore;
use shardgate::exit::{Exit, Failure};
use shardgate::signals::Signals;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where the demo listens.
#[derive(Clone, Debug)]
pub(crate) struct DemoConfig {
    /// Proxy listener.
    pub proxy: SocketAddr,
    /// Proxy admin listener.
    pub admin: SocketAddr,
    /// Coordinator HTTP listener.
    pub coordinator_http: SocketAddr,
    /// Coordinator gRPC listener.
    pub coordinator_grpc: SocketAddr,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DemoError {
    /// Setting up files or processes failed.
    #[error("{0}")]
    Setup(String),
    /// The coordinator did not start.
    #[error("coordinator: {0}")]
    Coordinator(#[from] shardgate::coordinator::StartError),
    /// The proxy did not start.
    #[error("proxy: {0}")]
    Proxy(#[from] shardgate::proxy::StartError),
    /// Signal handlers could not be installed.
    #[error(transparent)]
    Signals(#[from] shardgate::signals::SignalError),
}

impl Failure for DemoError {
    fn exit(&self) -> Exit {
        match self {
            DemoError::Coordinator(e) => e.exit(),
            DemoError::Proxy(e) => e.exit(),
            DemoError::Setup(_) | DemoError::Signals(_) => Exit::Runtime,
        }
    }
}

fn setup(e: impl std::fmt::Display) -> DemoError {
    DemoError::Setup(e.to_string())
}

/// One running node, as the map and the instructions name it.
struct Node {
    addr: SocketAddr,
    pid: u32,
}

fn addr_file(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.addr"))
}

/// Members per partition: a majority survives the loss of one.
const MEMBERS: usize = 3;

/// How late each partition's last replica applies writes: long enough for a
/// person to see a stale read, short enough to catch up at once.
const SLOW_REPLICA_DELAY_MS: &str = "300";

/// Start one `node` process on a port of its own choosing.
fn spawn_node(
    exe: &Path,
    dir: &Path,
    id: &str,
    grpc: SocketAddr,
    slow: bool,
) -> Result<Child, DemoError> {
    let log = std::fs::File::create(dir.join(format!("{id}.log"))).map_err(setup)?;
    let delay = if slow { SLOW_REPLICA_DELAY_MS } else { "0" };
    Command::new(exe)
        .args(["node", "--id", id, "--listen", "127.0.0.1:0", "--addr-file"])
        .arg(addr_file(dir, id))
        .args(["--coordinator", &grpc.to_string()])
        .args(["--apply-delay-ms", delay])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(setup)?)
        .stderr(log)
        .spawn()
        .map_err(setup)
}

/// Wait (bounded) for a node to report the address it listens on.
async fn node_address(id: &str, child: &mut Child, dir: &Path) -> Result<SocketAddr, DemoError> {
    let path = addr_file(dir, id);
    let failed = |why: String| setup(format!("node {id} {why}; see {}/{id}.log", dir.display()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        // The file is written atomically, so whatever is there is whole.
        if let Ok(text) = std::fs::read_to_string(&path) {
            return text
                .trim()
                .parse()
                .map_err(|e| failed(format!("wrote an unreadable address ({e})")));
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(failed(format!("exited before listening ({status})")));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(failed("did not start listening within 15 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait (bounded) until the node at `addr` knows its role and is in sync
/// with its primary, so the first write the newcomer tries is taken.
async fn wait_until_replicating(addr: SocketAddr) -> Result<(), DemoError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = node_status(addr).await
            && status["role"] != "unassigned"
            && status["state"] == "IN_SYNC"
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(setup(format!(
                "node {addr} did not join its partition within 15 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /_shardgate/status` of the node at `addr`.
async fn node_status(addr: SocketAddr) -> Option<serde_json::Value> {
    let url = format!("http://{addr}/_shardgate/status").parse().ok()?;
    let (_, body) = shardgate::fetch::get(&url, 64 * 1024, Duration::from_secs(2))
        .await
        .ok()?;
    serde_json::from_slice(&body).ok()
}

/// Stops child processes by PID when dropped, whatever happened.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &self.0 {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Three partitions over the nine nodes, in (primary, replica, replica) triples.
fn topology(nodes: &[Node]) -> serde_json::Value {
    let ranges = [
        ("00000000", "55555555"),
        ("55555556", "aaaaaaaa"),
        ("aaaaaaab", "ffffffff"),
    ];
    let partitions: Vec<_> = ranges
        .iter()
        .enumerate()
        .map(|(i, (start, end))| {
            serde_json::json!({
                "partitionIndex": i,
                "primaryNodeIp": nodes[MEMBERS * i].addr.to_string(),
                "replicaNodeIps": nodes[MEMBERS * i + 1..MEMBERS * (i + 1)]
                    .iter()
                    .map(|n| n.addr.to_string())
                    .collect::<Vec<_>>(),
                "hashRangeStart": start,
                "hashRangeEnd": end,
            })
        })
        .collect();
    serde_json::json!({
        "clusterEpoch": 1,
        "masterNodeId": "demo-coordinator",
        "partitionCount": 3,
        "partitions": partitions,
    })
}

/// Run the demo until SIGINT/SIGTERM.
pub(crate) async fn run(cfg: DemoConfig) -> Result<(), DemoError> {
    let mut signals = Signals::stop()?;
    let dir = TempDir(std::env::temp_dir().join(format!("shardgate-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).map_err(setup)?;
    let exe = std::env::current_exe().map_err(setup)?;

    // The coordinator's listeners are bound first so the agents know where to
    // report; each node binds its own port 0 and writes back what it got
    // (picking a free port here and handing it over would race every other
    // program binding port 0 meanwhile).
    let mut coordinator_cfg = coordinator_config(&cfg, &dir.0)?;
    let listeners = shardgate::coordinator::Listeners::bind(&coordinator_cfg).await?;
    let ids: Vec<String> = (0..3)
        .flat_map(|p| (0..MEMBERS).map(move |m| format!("p{p}-n{m}")))
        .collect();
    let mut children = Children(Vec::new());
    for (i, id) in ids.iter().enumerate() {
        let slow = i % MEMBERS == MEMBERS - 1;
        children
            .0
            .push(spawn_node(&exe, &dir.0, id, listeners.grpc_addr, slow)?);
    }
    let mut nodes = Vec::new();
    for (id, child) in ids.into_iter().zip(&mut children.0) {
        let addr = node_address(&id, child, &dir.0).await?;
        let pid = child.id();
        nodes.push(Node { addr, pid });
    }

    let map = topology(&nodes);
    let map_path = dir.0.join("topology.json");
    std::fs::write(&map_path, serde_json::to_vec_pretty(&map).map_err(setup)?).map_err(setup)?;
    coordinator_cfg.topology = Some(map_path.clone());
    let store = FileStore::new(dir.0.join("coordinator-state.json"));
    let coordinator = shardgate::coordinator::start_on(coordinator_cfg, store, listeners).await?;

    let proxy_toml = format!(
        "[server]\nlisten = \"{}\"\nadmin_listen = \"{}\"\n\
         [topology]\nsources = [\"http://{}\"]\ncache_file = \"{}\"\n\
         [failover_buffer]\nenabled = true\n[log]\nlevel = \"warn\"\n",
        cfg.proxy,
        cfg.admin,
        coordinator.http_addr,
        dir.0.join("proxy-map-cache.json").display()
    );
    let proxy_cfg =
        ProxyConfig::from_toml(&proxy_toml, "demo", &ProxyOverrides::default()).map_err(setup)?;
    let proxy = shardgate::proxy::start(proxy_cfg).await?;

    for node in &nodes {
        wait_until_replicating(node.addr).await?;
    }
    print_instructions(&proxy, &coordinator, &nodes, &dir.0, &map_path);

    signals.stopped().await;
    eprintln!("\nstopping the demo...");
    drop(children);
    proxy.shutdown().await;
    coordinator.shutdown().await;
    Ok(())
}

fn coordinator_config(cfg: &DemoConfig, dir: &Path) -> Result<CoordinatorConfig, DemoError> {
    // Short timeouts so a killed primary is replaced within a few seconds.
    let text = "[coordinator]\nid = \"demo-coordinator\"\nheartbeat_timeout = \"3s\"\n\
                sweep_interval = \"500ms\"\nfailover_hold_down = \"10s\"\nadmin_token = \"demo\"\n\
                [log]\nlevel = \"warn\"\n";
    let overrides = CoordinatorOverrides {
        http_listen: Some(cfg.coordinator_http.to_string()),
        grpc_listen: Some(cfg.coordinator_grpc.to_string()),
        store: Some(format!(
            "file:{}",
            dir.join("coordinator-state.json").display()
        )),
        ..Default::default()
    };
    CoordinatorConfig::from_toml(text, "demo", &overrides).map_err(setup)
}

/// What the demo's nodes do not do, printed with its instructions so no one
/// mistakes an acknowledged write for a kept one.
const NOT_GUARANTEED: &[&str] = &[
    "nothing is written to disk: a write lives in the memory of the nodes that hold it, \
     and stopping the demo (or killing a majority of a partition) loses it",
    "a replica read without a token or a staleness bound may be stale \
     (each partition's last replica is 300 ms late on purpose)",
];

fn print_instructions<S: shardgate::coordinator::store::Store>(
    proxy: &shardgate::proxy::RunningProxy,
    coordinator: &shardgate::coordinator::RunningCoordinator<S>,
    nodes: &[Node],
    dir: &Path,
    map: &Path,
) {
    let p = proxy.addr;
    let a = proxy.admin_addr;
    let c = coordinator.http_addr;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "shardgate demo ready proxy={p} admin={a} coordinator={c}"
    );
    let _ = writeln!(out, "\nA sharded key-value cluster is running on loopback:");
    let _ = writeln!(out, "  proxy        http://{p}   (admin http://{a})");
    let _ = writeln!(
        out,
        "  coordinator  http://{c}   (gRPC {})",
        coordinator.grpc_addr
    );
    for (p, members) in nodes.chunks(MEMBERS).enumerate() {
        let _ = write!(out, "  partition {p} ");
        for (m, n) in members.iter().enumerate() {
            let role = match m {
                0 => "primary",
                m if m == MEMBERS - 1 => "slow replica",
                _ => "replica",
            };
            let _ = write!(out, "  {role} {} pid {}", n.addr, n.pid);
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "\nTry it:");
    let _ = writeln!(out, "  curl -X PUT --data hello http://{p}/kv/user:42");
    let _ = writeln!(out, "  curl http://{p}/kv/user:42");
    let _ = writeln!(
        out,
        "  curl -H 'x-read-preference: secondary' http://{p}/kv/user:42"
    );
    let _ = writeln!(
        out,
        "  shardgate route --topology {} user:42",
        map.display()
    );
    let _ = writeln!(out, "  curl http://{c}/v1/cluster/nodes");
    let _ = writeln!(
        out,
        "\nStale reads, and the two ways to avoid them (run each line quickly after the last):"
    );
    let _ = writeln!(
        out,
        "  curl -X PUT --data v2 http://{p}/kv/user:42 -D - | grep -i x-shardgate-token   # the write's token"
    );
    let _ = writeln!(
        out,
        "  for i in 1 2 3 4; do curl -s -H 'x-read-preference: secondary' http://{p}/kv/user:42; echo; done\n\
         \x20                                  # right after a write, the slow replica may still say the old value"
    );
    let _ = writeln!(
        out,
        "  curl -H 'x-read-preference: secondary' -H 'x-shardgate-token: TOKEN' http://{p}/kv/user:42\n\
         \x20                                  # read-your-writes: never older than the write that gave TOKEN"
    );
    let _ = writeln!(
        out,
        "  curl -H 'x-read-preference: secondaryPreferred' -H 'x-max-staleness: 0.1' http://{p}/kv/user:42\n\
         \x20                                  # bounded staleness: replicas over 100 ms behind are skipped"
    );
    let _ = writeln!(out, "\nFail over a primary and watch the map change:");
    let _ = writeln!(
        out,
        "  curl 'http://{c}/v1/cluster/topology?waitForEpochAbove=1' &   # waits for the new epoch"
    );
    // The partition the example key lives in, so killing its primary is
    // what the next read notices.
    let home = std::fs::read(map)
        .ok()
        .and_then(|b| shardgate::topology::ShardMap::from_json(&b).ok())
        .map_or(0, |m| m.partition_for_key(b"user:42").index as usize);
    let _ = writeln!(
        out,
        "  kill {}                                               # user:42's primary (partition {home})",
        nodes[home * MEMBERS].pid
    );
    let _ = writeln!(
        out,
        "  curl http://{a}/admin/topology                # the proxy follows within a second"
    );
    let _ = writeln!(
        out,
        "  curl http://{p}/kv/user:42                       # the promoted replica has every acknowledged write"
    );
    let _ = writeln!(
        out,
        "  curl http://{}/_shardgate/status          # a node's role, applied HLC and lag",
        nodes[home * MEMBERS + 1].addr
    );
    let _ = writeln!(
        out,
        "\nWhat it guarantees: a write is acknowledged once a majority of its partition (2 of 3) applied it,\n\
         and a failover promotes the most caught-up replica, so killing one node loses no acknowledged write."
    );
    let _ = writeln!(out, "\nWhat this demo does NOT guarantee:");
    for line in NOT_GUARANTEED {
        let _ = writeln!(out, "  - {line}");
    }
    let _ = writeln!(
        out,
        "\nNode logs: {}/*.log   Ctrl-C stops everything.",
        dir.display()
    );
    let _ = out.flush();
}
