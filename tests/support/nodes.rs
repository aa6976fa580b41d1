//! Replicated reference nodes (`shardgate node`, each with its agent
//! in-process) in one partition behind a real coordinator, and optionally a
//! proxy: the harness of the consistency tests and the PostgreSQL ones.

use super::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// The coordinator's admin token in these tests.
pub(crate) const ADMIN_TOKEN: &str = "s3cret";

/// One `shardgate node` process.
pub(crate) struct NodeProc {
    pub(crate) id: String,
    pub(crate) addr: SocketAddr,
    pub(crate) proc: BinProcess,
}

impl NodeProc {
    pub(crate) async fn spawn(dir: &Path, id: &str, grpc: SocketAddr, extra: &[&str]) -> NodeProc {
        NodeProc::spawn_in(None, dir, id, "127.0.0.1:0", grpc, extra).await
    }

    /// A node listening on `listen`, in network namespace `ns` if given.
    pub(crate) async fn spawn_in(
        ns: Option<&str>,
        dir: &Path,
        id: &str,
        listen: &str,
        grpc: SocketAddr,
        extra: &[&str],
    ) -> NodeProc {
        let addr_file = dir.join(format!("{id}.addr"));
        let _ = std::fs::remove_file(&addr_file);
        let grpc = grpc.to_string();
        let mut args = vec![
            "node",
            "--id",
            id,
            "--listen",
            listen,
            "--addr-file",
            addr_file.to_str().unwrap(),
            "--coordinator",
            &grpc,
        ];
        // Heartbeats every 100 ms unless the test sets its own pace.
        if !extra.contains(&"--interval") {
            args.extend_from_slice(&["--interval", "0.1"]);
        }
        args.extend_from_slice(extra);
        let proc = BinProcess::spawn_in(ns, &args, false).await;
        let read = || -> Option<SocketAddr> {
            std::fs::read_to_string(&addr_file)
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        eventually(Duration::from_secs(15), "node listening", || {
            let found = read().is_some();
            async move { found }
        })
        .await;
        NodeProc {
            id: id.to_owned(),
            addr: read().unwrap(),
            proc,
        }
    }

    pub(crate) async fn status(&self) -> Option<serde_json::Value> {
        let url = format!("http://{}/_shardgate/status", self.addr)
            .parse()
            .ok()?;
        let (_, body) = shardgate::fetch::get(&url, 1 << 20, Duration::from_secs(2))
            .await
            .ok()?;
        serde_json::from_slice(&body).ok()
    }

    pub(crate) async fn get(&self, key: &str) -> Answer {
        send(
            &client(),
            http::Request::get(format!("http://{}/kv/{key}", self.addr))
                .body(empty())
                .unwrap(),
        )
        .await
    }

    pub(crate) async fn put(&self, key: &str, value: &str) -> Answer {
        send(
            &client(),
            http::Request::put(format!("http://{}/kv/{key}", self.addr))
                .body(full(value.to_owned()))
                .unwrap(),
        )
        .await
    }
}

/// A coordinator, one partition of three nodes, and optionally a proxy.
pub(crate) struct Partition {
    pub(crate) coordinator: BinCoordinator,
    pub(crate) nodes: Vec<NodeProc>,
    /// Node i's link to the coordinator (its agent's heartbeats), to cut.
    pub(crate) agent_links: Vec<Relay>,
    pub(crate) proxy: Option<BinProxy>,
    pub(crate) dir: tempfile::TempDir,
}

pub(crate) fn map(epoch: u64, primary: &str, replicas: &[String]) -> String {
    serde_json::json!({
        "clusterEpoch": epoch,
        "masterNodeId": "coord-a",
        "partitionCount": 1,
        "partitions": [{
            "partitionIndex": 0,
            "primaryNodeIp": primary,
            "replicaNodeIps": replicas,
            "hashRangeStart": "00000000",
            "hashRangeEnd": "ffffffff",
        }],
    })
    .to_string()
}

impl Partition {
    /// Start it; `node_flags[i]` are node i's extra flags (node 0 is the primary).
    pub(crate) async fn start(node_flags: &[&[&str]], with_proxy: bool) -> Partition {
        Partition::start_on(node_flags, with_proxy, None).await
    }

    /// [`Partition::start`] with the coordinator on `store` (default: a
    /// state file in the partition's directory).
    pub(crate) async fn start_on(
        node_flags: &[&[&str]],
        with_proxy: bool,
        store: Option<&str>,
    ) -> Partition {
        let dir = tempfile::tempdir().unwrap();
        // The nodes pick their own ports, so the coordinator starts on a
        // map of addresses nobody listens on, and the real map replaces it.
        let placeholder = dir.path().join("placeholder.json");
        std::fs::write(
            &placeholder,
            map(
                1,
                "127.0.0.2:9",
                &["127.0.0.3:9".into(), "127.0.0.4:9".into()],
            ),
        )
        .unwrap();
        let config = dir.path().join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "[coordinator]\nid = \"coord-a\"\nfailover_hold_down = \"1s\"\nadmin_token = \"{ADMIN_TOKEN}\"\n\
                 max_clock_skew = \"5s\"\n"
            ),
        )
        .unwrap();
        let store = store.map_or_else(
            || format!("file:{}", dir.path().join("state.json").display()),
            str::to_owned,
        );
        let coordinator = BinCoordinator::spawn(&[
            "--config",
            config.to_str().unwrap(),
            "--topology",
            placeholder.to_str().unwrap(),
            "--store",
            &store,
            "--heartbeat-timeout",
            "1",
            "--sweep-interval",
            "0.1",
        ])
        .await;
        let (mut nodes, mut agent_links) = (Vec::new(), Vec::new());
        for (i, flags) in node_flags.iter().enumerate() {
            let link = Relay::start(coordinator.grpc).await;
            nodes.push(NodeProc::spawn(dir.path(), &format!("n{i}"), link.addr, flags).await);
            agent_links.push(link);
        }
        let replicas: Vec<String> = nodes[1..].iter().map(|n| n.addr.to_string()).collect();
        let put = send(
            &client(),
            http::Request::put(coordinator.url("/v1/cluster/topology"))
                .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                .header("content-type", "application/json")
                .body(full(map(2, &nodes[0].addr.to_string(), &replicas)))
                .unwrap(),
        )
        .await;
        assert_eq!(put.status, 200, "{}", put.text());
        let proxy = if with_proxy {
            let toml = dir.path().join("proxy.toml");
            std::fs::write(
                &toml,
                format!(
                    "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                     [topology]\nsources = [\"http://{}\"]\n\
                     [failover_buffer]\nenabled = true\n",
                    coordinator.http
                ),
            )
            .unwrap();
            Some(BinProxy::spawn(&["--config", toml.to_str().unwrap()]).await)
        } else {
            None
        };
        let p = Partition {
            coordinator,
            nodes,
            agent_links,
            proxy,
            dir,
        };
        p.wait_until_in_sync(&[0, 1, 2]).await;
        p
    }

    /// Wait until node `primary` leads and every other listed node follows it in sync.
    pub(crate) async fn wait_until_in_sync(&self, members: &[usize]) {
        let mut last = Vec::new();
        let within = Duration::from_secs(20);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            last.clear();
            for &i in members {
                last.push(self.nodes[i].status().await);
            }
            let applied: Vec<_> = last
                .iter()
                .map(|s| {
                    s.as_ref()
                        .map(|s| (s["state"].clone(), s["appliedHlc"].clone()))
                })
                .collect();
            let one_primary = last
                .iter()
                .filter(|s| s.as_ref().is_some_and(|s| s["role"] == "primary"))
                .count()
                == 1;
            if one_primary
                && applied
                    .iter()
                    .all(|a| a.as_ref().is_some_and(|(s, _)| s == "IN_SYNC"))
                && applied
                    .windows(2)
                    .all(|w| w[0].as_ref().map(|a| &a.1) == w[1].as_ref().map(|a| &a.1))
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "replication did not converge within {within:?}: {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn proxy_url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy.as_ref().unwrap().addr, path)
    }

    /// The node the coordinator's map names primary now.
    pub(crate) async fn primary(&self) -> &NodeProc {
        let doc = self.coordinator.get_json("/v1/cluster/topology").await;
        let addr = doc["partitions"][0]["primaryNodeIp"]
            .as_str()
            .unwrap()
            .to_owned();
        self.nodes
            .iter()
            .find(|n| n.addr.to_string() == addr)
            .unwrap()
    }
}
