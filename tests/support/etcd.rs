//! A throwaway etcd cluster on loopback (Debian's `etcd-server`, installed
//! by `scripts/test`): real members a test can kill, pause and restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One member: its ports, data directory and process (while running).
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    data: PathBuf,
    child: Option<Child>,
}

/// A cluster of `etcd` processes in a temporary directory, stopped (by PID)
/// when dropped.
pub(crate) struct EtcdCluster {
    members: Vec<Member>,
    initial: String,
    _dir: tempfile::TempDir,
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

impl EtcdCluster {
    /// `n` members, each healthy before this returns.
    pub(crate) async fn start(n: usize) -> EtcdCluster {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_addr(),
                peer: free_addr(),
                data: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            members,
            initial,
            _dir: dir,
        };
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.healthy(i).await;
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let initial = self.initial.clone();
        let m = &mut self.members[i];
        let log = std::fs::File::create(m.data.with_extension("log")).unwrap();
        let child = Command::new("etcd")
            .args([
                "--name",
                &m.name,
                "--data-dir",
                m.data.to_str().unwrap(),
                "--listen-client-urls",
                &format!("http://{}", m.client),
                "--advertise-client-urls",
                &format!("http://{}", m.client),
                "--listen-peer-urls",
                &format!("http://{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://{}", m.peer),
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "shardgate-test",
                // Loopback: elections in a fraction of a second.
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd not found: scripts/test installs Debian's etcd-server");
        m.child = Some(child);
    }

    /// Wait until member `i` answers `/health` with a quorum behind it.
    pub(crate) async fn healthy(&self, i: usize) {
        let url = format!("http://{}/health", self.members[i].client);
        super::eventually(Duration::from_secs(30), &format!("etcd {url}"), || async {
            let req = http::Request::get(&url).body(super::empty()).unwrap();
            match tokio::time::timeout(Duration::from_secs(2), super::client().request(req)).await {
                Ok(Ok(r)) if r.status() == 200 => {
                    use http_body_util::BodyExt;
                    let body = r.into_body().collect().await.map(|b| b.to_bytes());
                    body.is_ok_and(|b| String::from_utf8_lossy(&b).contains("\"true\""))
                }
                _ => false,
            }
        })
        .await;
    }

    /// `etcd://` URL naming every member, with `prefix`.
    pub(crate) fn url(&self, prefix: &str) -> String {
        let hosts: Vec<String> = self.members.iter().map(|m| m.client.to_string()).collect();
        format!("etcd://{}/{prefix}", hosts.join(","))
    }

    /// Each member's client address.
    pub(crate) fn client_addrs(&self) -> Vec<SocketAddr> {
        self.members.iter().map(|m| m.client).collect()
    }

    /// SIGKILL member `i`.
    pub(crate) fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send member `i` a signal (`"STOP"`, `"CONT"`), by its PID.
    pub(crate) fn signal(&self, i: usize, sig: &str) {
        let child = self.members[i].child.as_ref().expect("member is running");
        super::signal_pid(child.id() as i32, sig);
    }

    /// Start member `i` again on its data directory.
    pub(crate) fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
