//! Whole processes and services for tests: the proxy in-process or as the
//! real binary, the coordinator and agents as real processes, a scriptable
//! coordinator stand-in, and throwaway PostgreSQL databases.

use super::client::{admin_get, client, empty, full, send};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;
/// A proxy running inside the test process.
pub(crate) struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub running: Option<shardgate::proxy::RunningProxy>,
    pub dir: tempfile::TempDir,
}

impl TestProxy {
    /// Start with `topology_json` and extra TOML appended to a loopback base config.
    pub(crate) async fn start(topology_json: &str, extra_toml: &str) -> TestProxy {
        let dir = tempfile::tempdir().unwrap();
        let topo = dir.path().join("topology.json");
        std::fs::write(&topo, topology_json).unwrap();
        let text = base_config(&topo, extra_toml);
        let config =
            shardgate::config::ProxyConfig::from_toml(&text, "test.toml", &Default::default())
                .unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let running = shardgate::proxy::start(config).await.unwrap();
        TestProxy {
            addr: running.addr,
            admin: running.admin_addr,
            running: Some(running),
            dir,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub(crate) fn topology_path(&self) -> PathBuf {
        self.dir.path().join("topology.json")
    }

    pub(crate) fn proxy(&self) -> &Arc<shardgate::proxy::Proxy> {
        &self.running.as_ref().unwrap().proxy
    }

    pub(crate) async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// A loopback config: ephemeral ports, the given topology file, then `extra`.
pub(crate) fn base_config(topology: &Path, extra: &str) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n\
         [topology]\nsources = [{:?}]\n",
        topology.display().to_string()
    );
    // Later sections in `extra` may repeat a table; merge by re-parsing.
    if !extra.is_empty() {
        let mut base: toml::Table = text.parse().unwrap();
        let add: toml::Table = extra.parse().unwrap();
        for (k, v) in add {
            match (base.get_mut(&k), v) {
                (Some(toml::Value::Table(b)), toml::Value::Table(a)) => b.extend(a),
                (_, v) => {
                    base.insert(k, v);
                }
            }
        }
        text = toml::to_string(&base).unwrap();
    }
    text
}

/// Append every line from `lines` to a shared string until EOF.
fn collect_lines<R>(
    mut lines: tokio::io::Lines<R>,
) -> (Arc<Mutex<String>>, tokio::task::JoinHandle<()>)
where
    R: tokio::io::AsyncBufRead + Unpin + Send + 'static,
{
    let text = Arc::new(Mutex::new(String::new()));
    let t = text.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut t = t.lock().unwrap();
            t.push_str(&line);
            t.push('\n');
        }
    });
    (text, reader)
}

/// The real `shardgate` binary, started with `args`.
pub(crate) struct BinProxy {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub stderr: Arc<Mutex<String>>,
    /// Everything printed to stdout after the listening line (a successor
    /// binary started by an upgrade prints its own there).
    pub stdout: Arc<Mutex<String>>,
}

pub(crate) fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shardgate"))
}

impl BinProxy {
    /// Spawn `shardgate proxy <args>` and wait for its listening line.
    pub(crate) async fn spawn(args: &[&str]) -> BinProxy {
        let mut cmd = tokio::process::Command::new(binary());
        cmd.arg("proxy").args(args);
        BinProxy::spawn_cmd(cmd).await
    }

    pub(crate) async fn spawn_cmd(mut cmd: tokio::process::Command) -> BinProxy {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (log, _) = collect_lines(BufReader::new(stderr).lines());
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("proxy did not announce its ports in time")
            .unwrap()
            .unwrap_or_else(|| panic!("proxy exited early: {}", log.lock().unwrap()));
        // "shardgate proxy listening on ADDR admin ADDR"
        let words: Vec<&str> = line.split_whitespace().collect();
        let addr = words[4].parse().unwrap();
        let admin = words[6].parse().unwrap();
        let (stdout, _) = collect_lines(lines);
        BinProxy {
            child,
            addr,
            admin,
            stderr: log,
            stdout,
        }
    }

    /// `exe proxy` in front of `upstream` alone (a one-partition map, epoch
    /// 1, in `dir`), with `config` as its config file; ephemeral ports.
    pub(crate) async fn in_front_of(
        exe: &Path,
        dir: &Path,
        upstream: SocketAddr,
        config: &str,
    ) -> BinProxy {
        let map = dir.join("map.json");
        std::fs::write(&map, super::topology(1, &[(upstream, vec![])])).unwrap();
        let cfg = dir.join("proxy.toml");
        std::fs::write(&cfg, config).unwrap();
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("proxy")
            .arg("--config")
            .arg(&cfg)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--topology",
            ])
            .arg(&map);
        BinProxy::spawn_cmd(cmd).await
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.id().unwrap() as i32
    }

    pub(crate) fn signal(&self, sig: &str) {
        signal_pid(self.pid(), sig);
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Wait (at most 10 s) for the proxy to exit, and check it exited 0.
    pub(crate) async fn exits_zero(&mut self) {
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("the proxy did not exit within 10 s")
            .unwrap();
        assert_eq!(status.code(), Some(0), "{}", self.stderr());
    }

    /// Peak resident memory so far, in KiB.
    pub(crate) fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

/// A process started from the real binary whose stderr is collected.
pub(crate) struct BinProcess {
    pub child: tokio::process::Child,
    pub stderr: Arc<Mutex<String>>,
    /// Everything printed to stdout after the first line.
    pub stdout: Arc<Mutex<String>>,
    pub first_line: String,
    /// The tasks copying stdout and stderr; they end at the process's EOF.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl BinProcess {
    /// Spawn `shardgate <args>`; with `wait_for_line`, wait for its first stdout line.
    pub(crate) async fn spawn(args: &[&str], wait_for_line: bool) -> BinProcess {
        BinProcess::spawn_in(None, args, wait_for_line).await
    }

    /// [`BinProcess::spawn`] inside network namespace `ns` (`ip netns exec`,
    /// which execs: the PID is shardgate's own).
    pub(crate) async fn spawn_in(
        ns: Option<&str>,
        args: &[&str],
        wait_for_line: bool,
    ) -> BinProcess {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary());
                c
            }
            None => tokio::process::Command::new(binary()),
        };
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (log, stderr_reader) = collect_lines(BufReader::new(stderr).lines());
        let mut lines = BufReader::new(stdout).lines();
        let first_line = if wait_for_line {
            tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .expect("no readiness line in time")
                .unwrap()
                .unwrap_or_else(|| panic!("{args:?} exited early: {}", log.lock().unwrap()))
        } else {
            String::new()
        };
        let (out, stdout_reader) = collect_lines(lines);
        BinProcess {
            child,
            stderr: log,
            stdout: out,
            first_line,
            readers: vec![stderr_reader, stdout_reader],
        }
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.id().unwrap() as i32
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub(crate) fn signal(&self, sig: &str) {
        signal_pid(self.pid(), sig);
    }

    /// Kill (SIGKILL) and reap.
    pub(crate) async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Wait for exit; afterwards `stderr()` and `stdout` hold everything it printed.
    pub(crate) async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let readers = std::mem::take(&mut self.readers);
        tokio::time::timeout(within, async {
            let status = self.child.wait().await.unwrap();
            for r in readers {
                let _ = r.await;
            }
            status.code()
        })
        .await
        .expect("process did not exit in time")
    }
}

/// `shardgate coordinator` from the real binary.
pub(crate) struct BinCoordinator {
    pub proc: BinProcess,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

impl BinCoordinator {
    pub(crate) async fn spawn(args: &[&str]) -> BinCoordinator {
        BinCoordinator::spawn_in(None, args).await
    }

    /// [`BinCoordinator::spawn`] inside network namespace `ns`.
    pub(crate) async fn spawn_in(ns: Option<&str>, args: &[&str]) -> BinCoordinator {
        let mut all = vec!["coordinator"];
        for flag in ["--http-listen", "--grpc-listen"] {
            if !args.contains(&flag) {
                all.extend([flag, "127.0.0.1:0"]);
            }
        }
        all.extend_from_slice(args);
        let proc = BinProcess::spawn_in(ns, &all, true).await;
        // "shardgate coordinator listening on http ADDR grpc ADDR"
        let w: Vec<&str> = proc.first_line.split_whitespace().collect();
        let http = w[5].parse().unwrap();
        let grpc = w[7].parse().unwrap();
        BinCoordinator { proc, http, grpc }
    }

    /// A coordinator of the two-partition test map (epoch 10) on `store`
    /// (a file, PostgreSQL or etcd URL), with the test detection timings,
    /// a one-second failover hold-down and the operator token `s3cret`.
    pub(crate) async fn on_store(
        store: &str,
        dir: &Path,
        id: &str,
        extra: &[&str],
    ) -> BinCoordinator {
        let topo = dir.join("map.json");
        std::fs::write(&topo, super::two_partition_map(10)).unwrap();
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "[coordinator]\nid = \"{id}\"\nfailover_hold_down = \"1s\"\nadmin_token = \"s3cret\"\n"
            ),
        )
        .unwrap();
        let mut args = vec![
            "--config",
            config.to_str().unwrap(),
            "--topology",
            topo.to_str().unwrap(),
            "--store",
            store,
        ];
        args.extend_from_slice(&super::DETECTION_FLAGS);
        args.extend_from_slice(extra);
        BinCoordinator::spawn(&args).await
    }

    /// Whether it leads, by its own metric.
    pub(crate) async fn is_leader(&self) -> bool {
        let m = send(
            &client(),
            Request::get(self.url("/metrics")).body(empty()).unwrap(),
        )
        .await
        .text();
        m.lines().any(|l| l == "shardgate_coordinator_is_leader 1")
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub(crate) async fn get_json(&self, path: &str) -> serde_json::Value {
        let a = send(
            &client(),
            Request::get(self.url(path)).body(empty()).unwrap(),
        )
        .await;
        assert_eq!(a.status, 200, "{path}: {}", a.text());
        a.json()
    }

    pub(crate) async fn epoch(&self) -> u64 {
        self.get_json("/v1/cluster/topology").await["clusterEpoch"]
            .as_u64()
            .unwrap()
    }

    /// The node's entry in /v1/cluster/nodes.
    pub(crate) async fn node(&self, id: &str) -> Option<serde_json::Value> {
        let v = self.get_json("/v1/cluster/nodes").await;
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .cloned()
    }

    pub(crate) async fn grpc_client(
        &self,
    ) -> shardgate::proto::cluster_discovery_service_client::ClusterDiscoveryServiceClient<
        tonic::transport::Channel,
    > {
        shardgate::proto::cluster_discovery_service_client::ClusterDiscoveryServiceClient::connect(
            format!("http://{}", self.grpc),
        )
        .await
        .unwrap()
    }
}

/// Now, Unix milliseconds.
pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A heartbeat request as an agent would send it.
pub(crate) fn heartbeat_req(id: &str, ip: &str, ts: i64) -> shardgate::proto::HeartbeatRequest {
    shardgate::proto::HeartbeatRequest {
        node_id: id.into(),
        ip_address: ip.into(),
        epoch_timestamp_ms: ts,
        resource_status: Some(shardgate::proto::ResourceUsage {
            cpu_percent: 10.0,
            free_memory_bytes: 1 << 30,
            active_connections: 3,
        }),
        replication: None,
    }
}

/// Spawn `shardgate agent` for a node.
pub(crate) async fn spawn_agent(
    grpc: SocketAddr,
    id: &str,
    ip: &str,
    interval: &str,
    extra: &[&str],
) -> BinProcess {
    let grpc = grpc.to_string();
    let mut args = vec![
        "agent",
        "--coordinator",
        &grpc,
        "--node-id",
        id,
        "--ip",
        ip,
        "--interval",
        interval,
    ];
    args.extend_from_slice(extra);
    BinProcess::spawn(&args, false).await
}

/// Two coordinators sharing a store, once one of them leads: (leader,
/// follower). Exactly one leads every time they are asked, ten times over.
pub(crate) async fn leader_and_follower(
    a: BinCoordinator,
    b: BinCoordinator,
) -> (BinCoordinator, BinCoordinator) {
    super::eventually(Duration::from_secs(10), "a leader is chosen", || async {
        a.is_leader().await || b.is_leader().await
    })
    .await;
    for _ in 0..10 {
        let (la, lb) = (a.is_leader().await, b.is_leader().await);
        assert!(la != lb, "leaders: a={la} b={lb}");
    }
    if a.is_leader().await { (a, b) } else { (b, a) }
}

/// Two coordinators sharing `store`, agents heartbeating to the follower
/// (the leader hears them through the store) and p0's primary silent, once
/// the leader has promoted p0's replica (epoch 11, as both serve it):
/// (leader, follower, agents, the follower's map).
pub(crate) async fn failed_over_through_a_shared_store(
    store: &str,
    dir: &Path,
) -> (
    BinCoordinator,
    BinCoordinator,
    Vec<BinProcess>,
    serde_json::Value,
) {
    let a = BinCoordinator::on_store(store, dir, "coord-a", &[]).await;
    let b = BinCoordinator::on_store(store, dir, "coord-b", &[]).await;
    let (leader, follower) = leader_and_follower(a, b).await;
    let agents = agents_but_p0_primary(follower.grpc).await;
    super::eventually(Duration::from_secs(20), "p0 failed over", || async {
        follower.epoch().await == 11
    })
    .await;
    assert_eq!(leader.epoch().await, 11);
    let m = follower.get_json("/v1/cluster/topology").await;
    assert_eq!(m["partitions"][0]["primaryNodeIp"], "127.0.0.11:9000");
    (leader, follower, agents, m)
}

/// Agents for every node of the two-partition test map but p0's primary,
/// heartbeating to `grpc` every 0.2 s: p0 is due a failover.
pub(crate) async fn agents_but_p0_primary(grpc: SocketAddr) -> Vec<BinProcess> {
    let mut agents = Vec::new();
    for (id, ip) in [
        ("p0-replica", "127.0.0.11:9000"),
        ("p1-primary", "127.0.0.20:9000"),
        ("p1-replica", "127.0.0.21:9000"),
    ] {
        agents.push(spawn_agent(grpc, id, ip, "0.2", &[]).await);
    }
    agents
}

/// A coordinator stand-in that serves whatever map a test sets, so the
/// proxy's watcher can be driven exactly. A watch (`waitForEpochAbove=N`) is
/// answered at once when the map's epoch is above N, else when the test
/// publishes a map (whatever its epoch: a coordinator gone wrong) or after 30 s.
pub(crate) struct FakeCoordinator {
    pub addr: SocketAddr,
    state: Arc<Mutex<(String, u64)>>,
    published: tokio::sync::watch::Sender<u64>,
    pub requests: Arc<AtomicU64>,
    task: AbortHandle,
}

impl Drop for FakeCoordinator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeCoordinator {
    pub(crate) async fn start(map: &str) -> FakeCoordinator {
        FakeCoordinator::with_watch_hold(map, Duration::from_secs(30)).await
    }

    /// Watches are held at most `hold`, then answered with the current map.
    pub(crate) async fn with_watch_hold(map: &str, hold: Duration) -> FakeCoordinator {
        let epoch = epoch_of(map);
        let state = Arc::new(Mutex::new((map.to_owned(), epoch)));
        let (published, _) = tokio::sync::watch::channel(epoch);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let (st, tx, n) = (state.clone(), published.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (st, tx, n) = (st.clone(), tx.clone(), n.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (st, tx, n) = (st.clone(), tx.clone(), n.clone());
                        async move {
                            n.fetch_add(1, Ordering::SeqCst);
                            let wait = req.uri().query().and_then(|q| {
                                q.strip_prefix("waitForEpochAbove=")
                                    .and_then(|v| v.parse::<u64>().ok())
                            });
                            if let Some(above) = wait {
                                let mut rx = tx.subscribe();
                                let current = st.lock().unwrap().1;
                                if current <= above {
                                    let _ = tokio::time::timeout(hold, rx.changed()).await;
                                }
                            }
                            let body = st.lock().unwrap().0.clone();
                            Ok::<_, Infallible>(Response::new(full(body)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        })
        .abort_handle();
        FakeCoordinator {
            addr,
            state,
            published,
            requests,
            task,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serve `map` and answer every waiting watch with it.
    pub(crate) fn publish(&self, map: &str) {
        let epoch = epoch_of(map);
        *self.state.lock().unwrap() = (map.to_owned(), epoch);
        self.published.send_modify(|generation| *generation += 1);
    }

    /// Serve `map` to plain fetches only; watches keep waiting.
    pub(crate) fn set_silently(&self, map: &str) {
        let epoch = epoch_of(map);
        *self.state.lock().unwrap() = (map.to_owned(), epoch);
    }
}

fn epoch_of(map: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(map)
        .ok()
        .and_then(|v| v["clusterEpoch"].as_u64())
        .unwrap_or(0)
}

/// The value of an unlabelled or fully written metric line on an admin listener.
pub(crate) async fn metric(admin: SocketAddr, line_prefix: &str) -> f64 {
    let text = admin_get(admin, "/metrics").await.text();
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A fresh, empty database on the throwaway server `scripts/test` started.
pub(crate) async fn pg_database() -> String {
    let admin = std::env::var("SHARDGATE_TEST_PG").expect(
        "SHARDGATE_TEST_PG is not set: run scripts/test, which starts a throwaway PostgreSQL",
    );
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .expect("cannot reach the test PostgreSQL");
    tokio::spawn(conn);
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "t_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        unix_ms() % 1_000_000
    );
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let base = admin.rsplit_once('/').unwrap().0;
    format!("{base}/{name}")
}

/// A connected client for `url`.
pub(crate) async fn pg_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Make `path` a FIFO (replacing any file there): opening or reading it
/// blocks until the test opens the other end, as a file on a hung network
/// mount would.
pub(crate) fn make_fifo(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot remove {}: {e}", path.display()),
    }
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo failed");
}

/// Send a process a signal (`"STOP"`, `"CONT"`, `"HUP"`…) by its PID.
pub(crate) fn signal_pid(pid: i32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}
