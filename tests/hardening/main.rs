//! The data plane under abuse: uploads an upstream refuses early, clients
//! that stop reading, a process out of file descriptors. Each test pins a
//! defect found by probing the running binary (the hardening issue).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Read from `s` until `done` says the bytes so far are enough, EOF, or
/// `within` passes (a hang). Returns the bytes and whether EOF was seen.
async fn read_until(
    s: &mut (impl AsyncReadExt + Unpin),
    within: Duration,
    done: impl Fn(&[u8]) -> bool,
) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if done(&out) {
            return (out, false);
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the connection hung: no answer and no close within {within:?}; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

/// Whether `bytes` hold one whole response with a body of `body_len` bytes.
fn whole_response(bytes: &[u8], body_len: usize) -> bool {
    let text = String::from_utf8_lossy(bytes);
    text.find("\r\n\r\n")
        .is_some_and(|end| bytes.len() >= end + 4 + body_len)
}

#[tokio::test]
async fn an_upload_the_upstream_answers_before_reading_never_wedges_the_client_connection() {
    let early = EarlyAnswer::start("413 Payload Too Large").await;
    let proxy = TestProxy::start(&topology(1, &[(early.addr, vec![])]), "").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"PUT /kv/a HTTP/1.1\r\nhost: p\r\nx-shard-key: a\r\ncontent-length: 1048576\r\n\r\n",
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(5),
        "the upstream saw the head",
        || async { early.heads() == 1 },
    )
    .await;
    // The body follows once the upstream has answered, then a second
    // request; whatever the proxy does with them, the writer must not be what
    // keeps the test going.
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..16 {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = wr
            .write_all(b"GET /kv/a HTTP/1.1\r\nhost: p\r\nx-shard-key: a\r\n\r\n")
            .await;
        // Keep the write half open until the test ends.
        std::future::pending::<()>().await;
    });
    let (first, _) = read_until(&mut rd, Duration::from_secs(10), |b| whole_response(b, 2)).await;
    let text = String::from_utf8_lossy(&first).to_lowercase();
    assert!(text.starts_with("http/1.1 413"), "{text}");
    let closing = text.contains("connection: close");
    // Either the proxy said it would close, and then closes (within the bound
    // of its drain), or it kept the connection and answers the next request.
    let (rest, eof) = read_until(&mut rd, Duration::from_secs(10), |b| whole_response(b, 2)).await;
    if eof {
        assert!(closing, "closed without saying so in the response");
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    } else {
        assert!(
            String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 413"),
            "the next request went through: {}",
            String::from_utf8_lossy(&rest)
        );
    }
    writer.abort();
}

#[tokio::test]
async fn a_large_upload_to_an_upstream_that_answers_at_once_finishes_promptly() {
    let early = EarlyAnswer::start("200 OK").await;
    let proxy = TestProxy::start(&topology(1, &[(early.addr, vec![])]), "").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload");
    std::fs::write(&file, vec![b'u'; 64 * 1024 * 1024]).unwrap();
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
        ])
        .args(["-H", "x-shard-key: a", "-T"])
        .arg(&file)
        .arg(proxy.url("/kv/a"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "curl did not finish the exchange: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
}

#[tokio::test]
async fn a_keep_alive_client_never_meets_a_silent_close_even_without_idle_pooling() {
    // Uploads the node answers without reading, with no idle pooling: the
    // proxy may close the client's connection after such an exchange, but
    // only after saying so (`connection: close`), never silently under a
    // client that sends its next request.
    let early = EarlyAnswer::start("200 OK").await;
    let proxy = TestProxy::start(
        &topology(1, &[(early.addr, vec![])]),
        "[upstream]\npool_max_idle = 0\n",
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut announced, mut answered) = (0, 0);
    // The upload's body is still on its way when the node answers.
    let mut body_due = false;
    for i in 0..200 {
        let mut req = String::new();
        if body_due {
            req.push_str("value");
            body_due = false;
        }
        if i % 2 == 0 {
            req.push_str(
                "PUT /kv/k HTTP/1.1\r\nhost: p\r\nx-shard-key: k\r\ncontent-length: 5\r\n\r\n",
            );
            body_due = true;
        } else {
            req.push_str("GET /kv/k HTTP/1.1\r\nhost: p\r\nx-shard-key: k\r\n\r\n");
        }
        s.write_all(req.as_bytes()).await.unwrap();
        let (answer, eof) =
            read_until(&mut s, Duration::from_secs(10), |b| whole_response(b, 2)).await;
        assert!(!eof, "round {i}: closed with a request unanswered");
        let text = String::from_utf8_lossy(&answer).to_lowercase();
        assert!(text.starts_with("http/1.1 200"), "round {i}: {text}");
        answered += 1;
        if text.contains("connection: close") {
            announced += 1;
            body_due = false;
            let (rest, eof) = read_until(&mut s, Duration::from_secs(10), |_| false).await;
            assert!(eof && rest.is_empty(), "announced close, then closed");
            s = TcpStream::connect(proxy.addr).await.unwrap();
        }
    }
    assert_eq!(answered, 200);
    assert!(announced <= 100, "only uploads may close ({announced})");
}

/// A one-worker proxy config over a one-partition map to `node`, with
/// `extra` TOML appended; written into `dir`.
fn proxy_config(
    dir: &std::path::Path,
    node: std::net::SocketAddr,
    extra: &str,
) -> std::path::PathBuf {
    let map = dir.join("map.json");
    std::fs::write(&map, topology(1, &[(node, vec![])])).unwrap();
    let config = dir.join("p.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nworkers = 1\n\
             [topology]\nsources = [{:?}]\n{extra}",
            map.display().to_string()
        ),
    )
    .unwrap();
    config
}

/// The real binary on `config`, its allocator handing freed pages back within
/// a tenth of a second (by default over ten), so that resident memory tracks
/// what the proxy holds.
async fn measured_proxy(config: &std::path::Path) -> BinProxy {
    let mut cmd = tokio::process::Command::new(binary());
    cmd.arg("proxy").arg("--config").arg(config);
    cmd.env("_RJEM_MALLOC_CONF", "dirty_decay_ms:100,muzzy_decay_ms:0");
    BinProxy::spawn_cmd(cmd).await
}

#[tokio::test]
async fn running_out_of_descriptors_is_the_proxys_overload_not_an_upstream_failure() {
    let up = Upstream::start("node").await;
    let dir = tempfile::tempdir().unwrap();
    let config = proxy_config(dir.path(), up.addr, "[upstream]\npool_max_idle = 0\n");
    // A process allowed 48 descriptors: a few dozen idle clients exhaust them.
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg("-c").arg(format!(
        "ulimit -n 48 && exec {} proxy --config {}",
        binary().display(),
        config.display()
    ));
    let proxy = BinProxy::spawn_cmd(cmd).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let get = b"GET /kv/a HTTP/1.1\r\nhost: p\r\nx-shard-key: a\r\n\r\n";
    c.write_all(get).await.unwrap();
    let (ok, _) = read_until(&mut c, Duration::from_secs(10), |b| whole_response(b, 4)).await;
    assert!(String::from_utf8_lossy(&ok).starts_with("HTTP/1.1 200"));
    // Idle clients take every descriptor the proxy has left.
    let mut idle = Vec::new();
    for _ in 0..60 {
        idle.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    eventually(Duration::from_secs(10), "descriptors exhausted", || async {
        std::fs::read_dir(format!("/proc/{}/fd", proxy.pid()))
            .map(|d| d.count() >= 47)
            .unwrap_or(false)
    })
    .await;
    // Each request now needs a descriptor for its upstream connection and
    // cannot have one: the proxy's own overload, never the node's failure.
    for _ in 0..8 {
        c.write_all(get).await.unwrap();
        let (answer, eof) =
            read_until(&mut c, Duration::from_secs(10), |b| whole_response(b, 0)).await;
        assert!(!eof);
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(text.contains("x-shardgate-error: overloaded"), "{text}");
        // Drain the JSON body.
        let len: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        let have = answer.len() - (text.find("\r\n\r\n").unwrap() + 4);
        let mut rest = vec![0u8; len - have];
        c.read_exact(&mut rest).await.unwrap();
    }
    drop(idle);
    // Descriptors free again: the very next request is served (no breaker
    // opened against a healthy node).
    let mut fresh = TcpStream::connect(proxy.addr).await.unwrap();
    fresh.write_all(get).await.unwrap();
    let (after, _) = read_until(&mut fresh, Duration::from_secs(10), |b| {
        whole_response(b, 4)
    })
    .await;
    assert!(
        String::from_utf8_lossy(&after).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&after)
    );
    let shed = metric(
        proxy.admin,
        "shardgate_load_shed_total{reason=\"descriptors\"}",
    )
    .await;
    assert!(shed >= 8.0, "shed {shed}");
    assert_eq!(
        metric(
            proxy.admin,
            &format!("shardgate_breaker_state{{upstream=\"{}\"}}", up.addr)
        )
        .await,
        0.0,
        "the healthy node's breaker stayed closed"
    );
}

/// The proxy's resident memory, in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// Resident memory once it stops moving (freed pages go back to the system
/// a little after the free).
async fn settled_rss(pid: i32) -> u64 {
    let mut last = rss(pid);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = rss(pid);
        if now.abs_diff(last) < 64 * 1024 {
            return now;
        }
        last = now;
    }
    panic!("the proxy's memory never settled")
}

/// One keep-alive GET on `s`, read to the end of its 4-byte body.
async fn keyed_get(s: &mut TcpStream, key: usize) -> String {
    let get = format!("GET /kv/a HTTP/1.1\r\nhost: p\r\nx-shard-key: user:{key}\r\n\r\n");
    s.write_all(get.as_bytes()).await.unwrap();
    let (answer, eof) = read_until(s, Duration::from_secs(30), |b| whole_response(b, 4)).await;
    assert!(!eof, "the proxy closed a keep-alive connection");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn an_idle_keep_alive_connection_costs_little_more_than_its_socket() {
    const CLIENTS: usize = 2000;
    // nginx keeps ~0.6 KiB per idle connection, HAProxy ~1.2 KiB; shardgate
    // kept ~14 KiB (hyper's read and write buffers, and a remembered Host
    // header that pinned the read buffer) until idle connections were
    // parked, and ~2.7 KiB while a stale waker kept the serving task's
    // memory after the hand-off. An idle connection is ~0.9 KiB in a release
    // build at 9,900 connections (benches/idle.py), pooled upstream
    // connections parked too.
    const PER_IDLE_CLIENT: u64 = 2048;
    let up = Upstream::start("node").await;
    let dir = tempfile::tempdir().unwrap();
    // The clients connect first and send one by one: on a loaded machine the
    // last may wait longer than the default header-read deadline to send.
    let limits = format!(
        "[limits]\nmax_connections = {}\nidle_timeout = \"300s\"\nheader_read_timeout = \"300s\"\n",
        CLIENTS + 100
    );
    let proxy = measured_proxy(&proxy_config(dir.path(), up.addr, &limits)).await;
    let mut warm = TcpStream::connect(proxy.addr).await.unwrap();
    for key in 0..100 {
        assert!(keyed_get(&mut warm, key).await.starts_with("HTTP/1.1 200"));
    }
    drop(warm);
    let base = settled_rss(proxy.pid()).await;
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    // A request on every connection, then all of them idle.
    for (key, s) in clients.iter_mut().enumerate() {
        let answer = keyed_get(s, key).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let pid = proxy.pid();
    let per_client = move || rss(pid).saturating_sub(base) / CLIENTS as u64;
    eventually(
        Duration::from_secs(30),
        "idle connections shrink to their sockets",
        || async { per_client() <= PER_IDLE_CLIENT },
    )
    .await;
    // A parked connection serves its next request as if nothing happened.
    for (key, s) in clients.iter_mut().enumerate().step_by(97) {
        let answer = keyed_get(s, key).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    assert_eq!(
        metric(proxy.admin, "shardgate_downstream_connections").await,
        CLIENTS as f64,
        "every client is still connected"
    );

    drop(clients);
    eventually(
        Duration::from_secs(30),
        "memory goes back once the clients leave",
        || async { rss(pid) <= base + base / 10 },
    )
    .await;
}

/// A bare upstream that answers `GET /big` with `len` bytes, written as fast
/// as the proxy takes them, and anything else with two. Counts the request
/// heads for `/big` it has seen.
async fn big_body_upstream(len: usize) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    body_upstream(len, Framing::Length).await
}

/// How [`body_upstream`] frames its answer to `GET /big`.
#[derive(Clone, Copy)]
enum Framing {
    /// `content-length`, the body streamed in 64 KiB writes.
    Length,
    /// One chunk of chunked encoding, written at once with the head and the
    /// end; the connection is then held open.
    Chunked,
}

async fn body_upstream(len: usize, framing: Framing) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let counted = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let (head, _) = read_until(&mut s, Duration::from_secs(60), |b| {
                    b.windows(4).any(|w| w == b"\r\n\r\n")
                })
                .await;
                if head.is_empty() {
                    return;
                }
                if !head.starts_with(b"GET /big ") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    return;
                }
                counted.fetch_add(1, Ordering::SeqCst);
                match framing {
                    Framing::Length => {
                        let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                        s.write_all(answer.as_bytes()).await.unwrap_or(());
                        let chunk = vec![b'b'; 64 * 1024];
                        let mut left = len;
                        while left > 0 {
                            let n = left.min(chunk.len());
                            if s.write_all(&chunk[..n]).await.is_err() {
                                return;
                            }
                            left -= n;
                        }
                    }
                    Framing::Chunked => {
                        let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                        let mut answer = format!("{head}{len:x}\r\n").into_bytes();
                        answer.resize(answer.len() + len, b'c');
                        answer.extend_from_slice(b"\r\n0\r\n\r\n");
                        let _ = s.write_all(&answer).await;
                        let _ = read_until(&mut s, Duration::from_secs(60), |_| false).await;
                    }
                }
            });
        }
    });
    (addr, heads)
}

#[tokio::test]
async fn clients_that_stop_reading_a_large_response_hold_a_bounded_amount_of_proxy_memory() {
    const READERS: usize = 16;
    // nginx holds ~80 KiB per such client, HAProxy ~50 KiB; shardgate held
    // ~4 MiB (a slow client pinned up to 16 of the upstream connection's
    // 1 MiB read buffers) and now ~300 KiB.
    const PER_READER: u64 = 1024 * 1024;
    let (up, heads) = big_body_upstream(256 * 1024 * 1024).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = measured_proxy(&proxy_config(dir.path(), up, "")).await;
    let base = settled_rss(proxy.pid()).await;

    let mut readers = Vec::new();
    for i in 0..READERS {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(proxy.addr).await.unwrap();
        let get = format!("GET /big HTTP/1.1\r\nhost: p\r\nx-shard-key: user:{i}\r\n\r\n");
        s.write_all(get.as_bytes()).await.unwrap();
        readers.push(s); // and never read
    }
    eventually(
        Duration::from_secs(10),
        "every request reached the upstream",
        || async { heads.load(Ordering::SeqCst) == READERS },
    )
    .await;
    // The proxy fills what it may buffer and stops reading its upstreams.
    let held = settled_rss(proxy.pid()).await.saturating_sub(base);
    assert!(
        held / READERS as u64 <= PER_READER,
        "{} KiB per client that stopped reading",
        held / READERS as u64 / 1024
    );
    assert_eq!(
        metric(proxy.admin, "shardgate_downstream_connections").await,
        READERS as f64,
        "slow, not yet cut"
    );
}

/// An HTTP/2 connection to `addr` (prior knowledge) whose streams are each
/// granted `window` bytes, and no more until the body is read.
async fn h2_connection(
    addr: std::net::SocketAddr,
    window: u32,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(window)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

fn big_get(proxy: &BinProxy, key: usize) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::get(format!("http://{}/big", proxy.addr))
        .header("x-shard-key", format!("user:{key}"))
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// A proxy in front of `up` that cuts a client accepting nothing after one
/// second, long before its requests' overall deadline.
async fn quick_send_timeout_proxy(dir: &std::path::Path, up: std::net::SocketAddr) -> BinProxy {
    let limits = "[limits]\nsend_timeout = \"1s\"\n[timeouts]\noverall = \"60s\"\n";
    measured_proxy(&proxy_config(dir, up, limits)).await
}

#[tokio::test]
async fn an_http2_stream_granted_no_window_is_reset_at_the_send_timeout() {
    let (up, heads) = big_body_upstream(256 * 1024 * 1024).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = quick_send_timeout_proxy(dir.path(), up).await;
    let mut sender = h2_connection(proxy.addr, 16 * 1024).await;
    // Streams whose client never reads: their window runs out at 16 KiB.
    let mut stalled = Vec::new();
    for key in 0..8 {
        let resp = sender.send_request(big_get(&proxy, key)).await.unwrap();
        assert_eq!(resp.status(), 200);
        stalled.push(resp.into_body());
    }
    assert_eq!(heads.load(Ordering::SeqCst), 8);
    assert_eq!(
        metric(proxy.admin, "shardgate_inflight_requests").await,
        8.0
    );
    // Cut after one to two send timeouts, long before the overall deadline:
    // the streams' places, upstream connections and buffers are given back.
    eventually(
        Duration::from_secs(10),
        "stalled streams are cut",
        || async { metric(proxy.admin, "shardgate_inflight_requests").await == 0.0 },
    )
    .await;
    use http_body_util::BodyExt;
    for body in stalled {
        let read = tokio::time::timeout(Duration::from_secs(10), body.collect()).await;
        assert!(
            matches!(read, Ok(Err(_))),
            "the stream was reset, not ended as if complete"
        );
    }
    // The connection itself is fine: a stream whose client reads is served.
    let mut reading = h2_connection(proxy.addr, 64 * 1024).await;
    let resp = reading.send_request(big_get(&proxy, 99)).await.unwrap();
    let mut body = resp.into_body();
    let mut got = 0usize;
    // Read slowly, a frame at a time, for longer than the send timeout.
    let until = tokio::time::Instant::now() + Duration::from_millis(2500);
    while tokio::time::Instant::now() < until {
        let frame = body.frame().await.expect("stream open").expect("not reset");
        got += frame.data_ref().map_or(0, |d| d.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(got > 0);
}

#[tokio::test]
async fn an_http2_stream_whose_last_bytes_wait_for_a_window_is_still_reset_at_the_send_timeout() {
    // The whole body arrives in one piece and is more than the client's
    // window: the proxy hands its last chunk to HTTP/2 while part of the
    // window is open, and (before the fix) was done with the stream, so
    // nothing timed the client that never granted the rest.
    // With a length, and chunked (whose end shows only after its last
    // chunk); more than is sent whole as a copy, and less than hyper's first
    // read of an upstream (8 KiB), so that it arrives as one chunk.
    for (up, heads) in [
        big_body_upstream(6 * 1024).await,
        body_upstream(6 * 1024, Framing::Chunked).await,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let proxy = quick_send_timeout_proxy(dir.path(), up).await;
        let mut sender = h2_connection(proxy.addr, 1024).await;
        let resp = sender.send_request(big_get(&proxy, 1)).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(heads.load(Ordering::SeqCst), 1);
        eventually(
            Duration::from_secs(10),
            "the stream is cut or given up",
            || async { metric(proxy.admin, "shardgate_inflight_requests").await == 0.0 },
        )
        .await;
        use http_body_util::BodyExt;
        let read = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
            .await
            .map(|r| r.map(|body| body.to_bytes().len()));
        assert!(
            matches!(read, Ok(Err(_))),
            "the stream was reset at the send timeout, not left for the client to finish: {read:?}"
        );
    }
}

#[tokio::test]
async fn over_its_memory_bound_the_proxy_refuses_new_requests_until_memory_is_back() {
    const BOUND: u64 = 24 * 1024 * 1024;
    let (up, _) = big_body_upstream(256 * 1024 * 1024).await;
    let dir = tempfile::tempdir().unwrap();
    let config = proxy_config(
        dir.path(),
        up,
        &format!("[limits]\nmax_memory_bytes = {BOUND}\nsend_timeout = \"300s\"\n"),
    );
    let proxy = measured_proxy(&config).await;
    let get = |key: usize| {
        let url = format!("http://{}/kv/a", proxy.addr);
        async move {
            let c = client();
            get_key(&c, &url, &format!("small:{key}")).await
        }
    };
    let allocated = || metric(proxy.admin, "shardgate_memory_allocated_bytes");
    eventually(Duration::from_secs(5), "memory is sampled", || async {
        allocated().await > 0.0
    })
    .await;
    assert!(allocated().await < BOUND as f64, "starts under its bound");

    // Clients that stop reading large responses, each holding a few hundred
    // KiB, until the process is over its bound.
    let mut readers = Vec::new();
    while allocated().await <= BOUND as f64 {
        assert!(readers.len() < 2000, "memory never grew past the bound");
        for _ in 0..8 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            let mut s = socket.connect(proxy.addr).await.unwrap();
            let key = readers.len();
            let get = format!("GET /big HTTP/1.1\r\nhost: p\r\nx-shard-key: user:{key}\r\n\r\n");
            s.write_all(get.as_bytes()).await.unwrap();
            readers.push(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A sample later, new requests are refused as the proxy's overload.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let r = get(1).await;
        if r.status == 503 || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    refused.assert_error(503, "overloaded");
    assert!(refused.text().contains("memory"), "{}", refused.text());
    assert!(metric(proxy.admin, "shardgate_load_shed_total{reason=\"memory\"}").await >= 1.0);

    // The slow clients leave; memory goes back and so does service.
    drop(readers);
    eventually(
        Duration::from_secs(20),
        "requests are served again",
        || async { get(2).await.status == 200 },
    )
    .await;
}
