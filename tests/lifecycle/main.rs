//! The real `shardgate proxy` binary: signals, reloads, memory and resource
//! exhaustion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;
mod upgrade;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use support::*;

/// Replace `path` atomically, as operators (and config management) should.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn start_binary(map: &str, dir: &Path, extra_args: &[&str]) -> BinProxy {
    let path = dir.join("map.json");
    write_atomically(&path, map);
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--topology",
        path.to_str().unwrap(),
    ];
    args.extend_from_slice(extra_args);
    BinProxy::spawn(&args).await
}

/// The binary with `[server] workers = 1`: everything on one thread, so
/// anything that blocks it stops all traffic.
async fn start_one_worker(map: &str, dir: &Path) -> BinProxy {
    let config = dir.join("proxy.toml");
    std::fs::write(&config, "[server]\nworkers = 1\n").unwrap();
    start_binary(map, dir, &["--config", config.to_str().unwrap()]).await
}

/// The binary in front of one node holding the only partition, epoch 1.
async fn start_in_front_of(node: &Upstream, dir: &Path) -> BinProxy {
    start_binary(&topology(1, &[(node.addr, vec![])]), dir, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_swap_under_concurrent_load_fails_zero_requests() {
    let old = [
        Upstream::start("old-0").await,
        Upstream::start("old-1").await,
    ];
    let new = [
        Upstream::start("new-0").await,
        Upstream::start("new-1").await,
    ];
    let dir = tempfile::tempdir().unwrap();
    let map_v1 = topology(1, &old.iter().map(|u| (u.addr, vec![])).collect::<Vec<_>>());
    let map_v2 = topology(2, &new.iter().map(|u| (u.addr, vec![])).collect::<Vec<_>>());
    let proxy = start_binary(&map_v1, dir.path(), &[]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let served_by_new = Arc::new(AtomicU64::new(0));
    let url = Arc::new(format!("http://{}/kv/x", proxy.addr));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..8 {
        let (stop, failures, new_count, url) = (
            stop.clone(),
            failures.clone(),
            served_by_new.clone(),
            url.clone(),
        );
        workers.spawn(async move {
            let c = client();
            let mut n = 0u64;
            // Bounded in count and in time.
            while !stop.load(Ordering::Relaxed) && n < 20_000 {
                let key = format!("w{w}-{n}");
                let a = get_key(&c, &url, &key).await;
                if a.status != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                if a.text().starts_with("new") {
                    new_count.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
            n
        });
    }
    eventually(Duration::from_secs(10), "load is flowing", || async {
        old.iter().map(|u| u.requests()).sum::<usize>() > 200
    })
    .await;
    write_atomically(&dir.path().join("map.json"), &map_v2);
    proxy.signal("HUP");
    eventually(Duration::from_secs(10), "the new map serves", || async {
        served_by_new.load(Ordering::Relaxed) > 500
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    while let Some(n) = workers.join_next().await {
        total += n.unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {total} requests");
    // After the swap the new nodes see the new epoch, and the old nodes nothing more.
    let old_after = old.iter().map(|u| u.requests()).sum::<usize>();
    for _ in 0..20 {
        get_key(&client(), &url, "after").await;
    }
    assert_eq!(old.iter().map(|u| u.requests()).sum::<usize>(), old_after);
    for u in &new {
        assert!(
            u.log()
                .iter()
                .all(|r| r.header("x-cluster-epoch") == Some("2"))
        );
    }
}

#[tokio::test]
async fn sighup_refuses_every_invalid_map_and_keeps_the_old_one() {
    let primary = Upstream::start("p").await;
    let dir = tempfile::tempdir().unwrap();
    // The SPEC example with every node pointed at our upstream keeps the
    // example's shape (and so every broken variant's message) intact.
    let example: serde_json::Value = serde_json::from_str(SPEC_EXAMPLE).unwrap();
    let mut valid = example.clone();
    for (i, p) in valid["partitions"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        p["primaryNodeIp"] = primary.addr.to_string().into();
        p["replicaNodeIps"] = serde_json::json!([format!("127.0.0.{}:9", i + 2)]);
    }
    let proxy = start_binary(&valid.to_string(), dir.path(), &[]).await;
    let map_path = dir.path().join("map.json");
    let url = format!("http://{}/kv/x", proxy.addr);
    assert_eq!(get_key(&client(), &url, "k").await.status, 200);

    let rejected = r#"shardgate_topology_updates_total{result="rejected_invalid"}"#;
    for (n, (rule, text, fragment)) in invalid_maps(SPEC_EXAMPLE).into_iter().enumerate() {
        write_atomically(&map_path, &text);
        proxy.signal("HUP");
        eventually(Duration::from_secs(10), rule, || async {
            metric(proxy.admin, rejected).await >= (n + 1) as f64
        })
        .await;
        let status = admin_get(proxy.admin, "/admin/topology").await.json();
        assert_eq!(status["epoch"], 10294, "{rule}: the old map stays in force");
        let err = status["last_error"]["message"].as_str().unwrap();
        assert!(err.contains(fragment), "{rule}: {err}");
        assert_eq!(
            get_key(&client(), &url, "k").await.status,
            200,
            "{rule}: still routing"
        );
    }
    assert!(proxy.stderr().contains("refused map"));
}

#[tokio::test]
async fn sighup_refuses_an_older_epoch_and_applies_a_newer_one() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_binary(&topology(5, &[(a.addr, vec![])]), dir.path(), &[]).await;
    let url = format!("http://{}/kv/x", proxy.addr);
    let path = dir.path().join("map.json");

    write_atomically(&path, &topology(4, &[(b.addr, vec![])]));
    proxy.signal("HUP");
    let stale = r#"shardgate_topology_updates_total{result="rejected_stale"}"#;
    eventually(Duration::from_secs(10), "stale map refused", || async {
        metric(proxy.admin, stale).await >= 1.0
    })
    .await;
    assert_eq!(get_key(&client(), &url, "k").await.text(), "a");

    write_atomically(&path, &topology(5, &[(b.addr, vec![])]));
    proxy.signal("HUP");
    let unchanged = r#"shardgate_topology_updates_total{result="unchanged"}"#;
    eventually(
        Duration::from_secs(10),
        "equal epoch is a no-op",
        || async { metric(proxy.admin, unchanged).await >= 1.0 },
    )
    .await;
    assert_eq!(get_key(&client(), &url, "k").await.text(), "a");

    write_atomically(&path, &topology(6, &[(b.addr, vec![])]));
    proxy.signal("HUP");
    eventually(Duration::from_secs(10), "newer map applied", || async {
        metric(proxy.admin, "shardgate_topology_epoch").await == 6.0
    })
    .await;
    assert_eq!(get_key(&client(), &url, "k").await.text(), "b");
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let up = Upstream::start("slow").await;
    up.set(Behavior::Drip {
        bytes: 20,
        every: Duration::from_millis(50),
    });
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = start_in_front_of(&up, dir.path()).await;
    let url = format!("http://{}/kv/x", proxy.addr);
    let in_flight = tokio::spawn(async move { get_key(&client(), &url, "k").await });
    eventually(
        Duration::from_secs(5),
        "request reached the upstream",
        || async { up.arrivals() == 1 },
    )
    .await;
    proxy.signal("TERM");
    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body.len(), 20, "the in-flight response completed");
    proxy.exits_zero().await;
}

#[tokio::test]
async fn sigterm_closes_idle_keep_alive_connections_at_once_not_after_the_grace_period() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start("primary").await;
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = start_in_front_of(&up, dir.path()).await;
    let mut idle = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(b"GET /kv/x HTTP/1.1\r\nhost: a\r\nx-shard-key: k\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"primary") {
        let n = idle.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    // The connection now sits idle, kept alive; the default grace is 30 s.
    proxy.signal("TERM");
    let closed = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the idle connection was not closed: {closed:?}"
    );
    proxy.exits_zero().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_body_streams_both_ways_with_bounded_proxy_memory() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let up = Upstream::start("sink").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, "[limits]\nmax_body_bytes = 1073741824\n[timeouts]\noverall = \"120s\"\nper_try = \"120s\"\n").unwrap();
    let proxy = start_binary(
        &topology(1, &[(up.addr, vec![])]),
        dir.path(),
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let url = format!("http://{}/kv/x", proxy.addr);

    // Upload: a generated stream, never held whole by anyone.
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>(4);
    tokio::spawn(async move {
        let chunk = bytes::Bytes::from(vec![b'u'; 256 * 1024]);
        let mut sent = 0;
        while sent < SIZE {
            if tx
                .send(Ok(hyper::body::Frame::data(chunk.clone())))
                .await
                .is_err()
            {
                return;
            }
            sent += chunk.len() as u64;
        }
    });
    use http_body_util::BodyExt;
    let body = http_body_util::StreamBody::new(ReceiverStream(rx)).boxed();
    let req = http::Request::post(&url)
        .header("x-shard-key", "k")
        .header("content-length", SIZE.to_string())
        .body(body)
        .unwrap();
    let a = send(&client(), req).await;
    assert_eq!(a.status, 200);
    let seen = up.log().pop().unwrap();
    assert_eq!(seen.body_len, SIZE);
    assert!(seen.body_complete);

    // Download.
    up.set(Behavior::Stream { bytes: SIZE });
    let resp = client().request(keyed("GET", &url, "k", "")).await.unwrap();
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            got += d.len() as u64;
        }
    }
    assert_eq!(got, SIZE);

    let peak = proxy.peak_rss_kib();
    eprintln!("proxy peak RSS: {peak} KiB");
    assert!(
        peak < 64 * 1024,
        "proxy peak RSS {peak} KiB for 2 x 100 MiB streamed"
    );
}

struct ReceiverStream<T>(tokio::sync::mpsc::Receiver<T>);
impl<T> futures_core::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

#[tokio::test]
async fn the_accept_loop_survives_running_out_of_file_descriptors() {
    let up = Upstream::start("p").await;
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("map.json");
    write_atomically(&map, &topology(1, &[(up.addr, vec![])]));
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg("-c")
        .arg(format!(
            "ulimit -n 48 && exec {} proxy --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --topology {}",
            binary().display(),
            map.display()
        ));
    let proxy = BinProxy::spawn_cmd(cmd).await;
    let url = format!("http://{}/kv/x", proxy.addr);
    assert_eq!(get_key(&client(), &url, "k").await.status, 200);

    // Hold far more connections than the proxy has descriptors for.
    let mut held = Vec::new();
    for _ in 0..80 {
        if let Ok(s) = tokio::net::TcpStream::connect(proxy.addr).await {
            held.push(s);
        }
    }
    eventually(
        Duration::from_secs(10),
        "the proxy runs out of descriptors",
        || async { proxy.stderr().contains("accept failed") },
    )
    .await;
    drop(held);
    // Once descriptors free up, it serves again without a restart.
    eventually(Duration::from_secs(10), "serving again", || async {
        let c = client();
        matches!(
            tokio::time::timeout(Duration::from_secs(2), c.request(keyed("GET", &url, "k", ""))).await,
            Ok(Ok(r)) if r.status() == 200
        )
    })
    .await;
}

/// Threads of a running process, from /proc.
/// Threads that run proxy code: jemalloc's background purger (which hands
/// freed memory back to the system) is the allocator's, not a worker.
fn thread_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .map_or(true, |name| name.trim() != "jemalloc_bg_thd")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_serves_on_a_single_thread_through_load_reload_and_drain() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = start_one_worker(&topology(1, &[(a.addr, vec![])]), dir.path()).await;
    let url = format!("http://{}/kv/x", proxy.addr);

    let mut load = tokio::task::JoinSet::new();
    for i in 0..8 {
        let url = url.clone();
        load.spawn(async move {
            let c = client();
            for j in 0..25 {
                assert_eq!(get_key(&c, &url, &format!("k{i}-{j}")).await.status, 200);
            }
        });
    }
    while let Some(done) = load.join_next().await {
        done.unwrap();
    }
    assert_eq!(
        thread_count(proxy.pid()),
        1,
        "workers = 1 must not start a second thread"
    );

    write_atomically(
        &dir.path().join("map.json"),
        &topology(2, &[(b.addr, vec![])]),
    );
    proxy.signal("HUP");
    eventually(Duration::from_secs(10), "newer map applied", || async {
        metric(proxy.admin, "shardgate_topology_epoch").await == 2.0
    })
    .await;
    assert_eq!(get_key(&client(), &url, "k").await.text(), "b");
    // The reload ran on a helper thread, which does not outstay it.
    eventually(
        Duration::from_secs(10),
        "back to a single thread",
        || async { thread_count(proxy.pid()) == 1 },
    )
    .await;

    proxy.signal("TERM");
    proxy.exits_zero().await;
}

/// The FIFO's write end, once a reader (the proxy's reload) has opened it.
async fn fifo_writer_once_read(path: &Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Opening a FIFO for writing without blocking fails until it has a reader.
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path);
        match opened {
            Ok(f) => return f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
            Err(e) => panic!("cannot open the FIFO: {e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reload never opened the topology file"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Write `text` into the FIFO and close it: the reader sees the whole file.
fn feed(mut writer: std::fs::File, text: &str) {
    use std::io::Write;
    writer.write_all(text.as_bytes()).unwrap();
}

#[tokio::test]
async fn a_reload_stuck_reading_the_topology_file_does_not_stall_serving() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    // One worker: a reload on the serving thread would stop everything.
    let mut proxy = start_one_worker(&topology(1, &[(a.addr, vec![])]), dir.path()).await;
    let url = format!("http://{}/kv/x", proxy.addr);
    let path = dir.path().join("map.json");
    make_fifo(&path);

    proxy.signal("HUP");
    let writer = fifo_writer_once_read(&path).await;
    // The reload now waits in read() for as long as the writer is silent.
    for i in 0..20 {
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            get_key(&client(), &url, &format!("k{i}")),
        )
        .await
        .expect("a request was held up by the reload");
        assert_eq!(answer.text(), "a", "the old map serves meanwhile");
    }
    // SIGHUPs during the reload make one more, not a pile of stuck readers.
    proxy.signal("HUP");
    proxy.signal("HUP");

    feed(writer, &topology(2, &[(b.addr, vec![])]));
    eventually(Duration::from_secs(10), "newer map applied", || async {
        metric(proxy.admin, "shardgate_topology_epoch").await == 2.0
    })
    .await;
    assert_eq!(get_key(&client(), &url, "k").await.text(), "b");
    // The follow-up reload opens the FIFO again; answer it with the same map.
    feed(
        fifo_writer_once_read(&path).await,
        &topology(2, &[(b.addr, vec![])]),
    );
    let unchanged = r#"shardgate_topology_updates_total{result="unchanged"}"#;
    eventually(Duration::from_secs(10), "follow-up reload done", || async {
        metric(proxy.admin, unchanged).await >= 1.0
    })
    .await;

    proxy.signal("TERM");
    proxy.exits_zero().await;
}

#[tokio::test]
async fn sigterm_exits_zero_even_while_a_reload_is_stuck_reading_a_file() {
    let a = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = start_in_front_of(&a, dir.path()).await;
    let path = dir.path().join("map.json");
    make_fifo(&path);
    proxy.signal("HUP");
    let writer = fifo_writer_once_read(&path).await;

    proxy.signal("TERM");
    proxy.exits_zero().await;
    drop(writer);
}
