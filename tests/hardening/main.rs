//! The data plane under abuse: uploads an upstream refuses early, clients
//! that stop reading, a process out of file descriptors. Each test pins a
//! defect found by probing the running binary (the hardening issue).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

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

#[tokio::test]
async fn running_out_of_descriptors_is_the_proxys_overload_not_an_upstream_failure() {
    let up = Upstream::start("node").await;
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("map.json");
    std::fs::write(&map, topology(1, &[(up.addr, vec![])])).unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nworkers = 1\n\
             [topology]\nsources = [{:?}]\n[upstream]\npool_max_idle = 0\n",
            map.display().to_string()
        ),
    )
    .unwrap();
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
