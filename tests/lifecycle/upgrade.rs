//! SIGUSR2: the binary at the same path takes the listening sockets over,
//! under load, without a failed request or a refused connection; a new
//! binary that cannot start leaves the old one serving.

use super::support::*;
use http::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// A copy of the real binary in a directory of the test's own, to be
/// replaced as an operator would. Dropped (even by a failing test), it
/// stops every process still running from that path: successors the test
/// did not start itself, found by their exact `argv[0]` and stopped by PID.
struct Installed {
    exe: PathBuf,
}

impl Installed {
    fn new(dir: &Path) -> Installed {
        let exe = dir.join("shardgate");
        std::fs::copy(binary(), &exe).unwrap();
        Installed { exe }
    }

    fn running(&self) -> Vec<i32> {
        let argv0 = self.exe.as_os_str().as_encoded_bytes();
        std::fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                    .filter(|pid| {
                        std::fs::read(format!("/proc/{pid}/cmdline"))
                            .is_ok_and(|c| c.split(|b| *b == 0).next() == Some(argv0))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        for pid in self.running() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// Install `contents` at `path` the way package managers do: a new file
/// renamed over the old one (the running process keeps its own).
fn install(path: &Path, from: &Path) {
    let tmp = path.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn start_installed(exe: &Path, upstream: SocketAddr, dir: &Path) -> BinProxy {
    BinProxy::in_front_of(exe, dir, upstream, "").await
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
}

/// Keep-alive clients that never retry (a close that raced a request would
/// count), and clients that open a new connection for every request.
fn load(addr: SocketAddr, stop: &Arc<AtomicBool>, tally: &Arc<Tally>) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    let url = format!("http://{addr}/kv/x");
    for w in 0..6 {
        let (stop, tally, url) = (stop.clone(), tally.clone(), url.clone());
        set.spawn(async move {
            let c: Client<_, BoxBody> = Client::builder(TokioExecutor::new())
                .retry_canceled_requests(false)
                .build_http();
            // Bounded in count and in time (the test stops it first).
            for n in 0..200_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let req = Request::get(&url)
                    .header("x-shard-key", format!("k{w}-{n}"))
                    .body(empty())
                    .unwrap();
                let answer = tokio::time::timeout(Duration::from_secs(10), c.request(req)).await;
                match answer {
                    Ok(Ok(r)) if r.status() == 200 => {
                        use http_body_util::BodyExt;
                        match r.into_body().collect().await {
                            Ok(_) => tally.ok.fetch_add(1, Ordering::Relaxed),
                            Err(_) => tally.failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                    _ => {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    for w in 0..2 {
        let (stop, tally) = (stop.clone(), tally.clone());
        set.spawn(async move {
            for n in 0..200_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                    tally.refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let request = format!(
                    "GET /kv/x HTTP/1.1\r\nhost: a\r\nx-shard-key: c{w}-{n}\r\nconnection: close\r\n\r\n"
                );
                let answer = raw_over(stream, request.as_bytes()).await;
                if answer.starts_with(b"HTTP/1.1 200") {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    set
}

async fn raw_over(mut s: tokio::net::TcpStream, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut out = Vec::new();
    let exchange = async {
        s.write_all(bytes).await?;
        s.read_to_end(&mut out).await
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), exchange).await;
    out
}

/// The successor's PID, from the old process's log.
fn successor_pid(stderr: &str) -> Option<i32> {
    // Without the colour codes the log may carry.
    let mut plain = String::new();
    let mut in_escape = false;
    for c in stderr.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (false, c) => plain.push(c),
            (true, 'm') => in_escape = false,
            (true, _) => {}
        }
    }
    let line = plain
        .lines()
        .find(|l| l.contains("the new binary serves"))?;
    let at = line.find("successor=")? + "successor=".len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Stop a process this test did not start itself (the successor), by PID.
async fn stop_by_pid(pid: i32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    eventually(Duration::from_secs(20), "the successor exits", || async {
        !alive(pid)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_hands_the_listeners_to_the_new_binary_under_load_without_a_failed_request() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let installed = Installed::new(dir.path());
    let exe = installed.exe.clone();
    let mut old = start_installed(&exe, up.addr, dir.path()).await;
    let old_pid = old.pid();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut workers = load(old.addr, &stop, &tally);
    eventually(Duration::from_secs(10), "load is flowing", || async {
        tally.ok.load(Ordering::Relaxed) > 300
    })
    .await;

    // A new build at the same path, then the signal.
    install(&exe, &binary());
    old.signal("USR2");
    old.exits_zero().await;
    let new_pid = successor_pid(&old.stderr())
        .unwrap_or_else(|| panic!("the old process names its successor: {}", old.stderr()));
    assert_ne!(new_pid, old_pid);
    assert!(alive(new_pid), "the successor serves on");
    assert!(
        old.stdout
            .lock()
            .unwrap()
            .contains("shardgate proxy listening on"),
        "the successor announced itself"
    );
    // Load goes on against the successor alone, on the same ports.
    let before = tally.ok.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(10),
        "the successor serves load",
        || async { tally.ok.load(Ordering::Relaxed) > before + 300 },
    )
    .await;
    assert_eq!(admin_get(old.admin, "/readyz").await.status, 200);

    stop.store(true, Ordering::Relaxed);
    while let Some(w) = workers.join_next().await {
        w.unwrap();
    }
    let ok = tally.ok.load(Ordering::Relaxed);
    assert_eq!(
        tally.failed.load(Ordering::Relaxed),
        0,
        "failed, of {ok} served"
    );
    assert_eq!(
        tally.refused.load(Ordering::Relaxed),
        0,
        "refused, of {ok} served"
    );
    stop_by_pid(new_pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_cannot_start_leaves_the_old_one_serving() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let installed = Installed::new(dir.path());
    let exe = installed.exe.clone();
    let mut old = start_installed(&exe, up.addr, dir.path()).await;
    let url = format!("http://{}/kv/x", old.addr);

    let broken = dir.path().join("broken");
    std::fs::write(&broken, "#!/bin/sh\necho 'broken build' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    install(&exe, &broken);
    old.signal("USR2");
    eventually(
        Duration::from_secs(10),
        "the upgrade is refused",
        || async {
            old.stderr()
                .contains("upgrade failed, this binary keeps serving")
        },
    )
    .await;
    assert!(old.stderr().contains("exit status: 3"), "{}", old.stderr());
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the old one runs on"
    );
    for i in 0..20 {
        assert_eq!(get_key(&client(), &url, &format!("k{i}")).await.status, 200);
    }

    // A good build afterwards still upgrades: the failed attempt left nothing behind.
    install(&exe, &binary());
    old.signal("USR2");
    old.exits_zero().await;
    let new_pid = successor_pid(&old.stderr())
        .unwrap_or_else(|| panic!("the old process names its successor: {}", old.stderr()));
    assert_eq!(get_key(&client(), &url, "after").await.status, 200);
    stop_by_pid(new_pid).await;
}
