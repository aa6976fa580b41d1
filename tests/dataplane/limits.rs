//! Limits and timeouts, each with its status and JSON error.

use crate::support::*;
use std::time::Duration;

async fn single(extra: &str) -> (Upstream, TestProxy) {
    let up = Upstream::start("primary").await;
    let proxy = TestProxy::start(&topology(1, &[(up.addr, vec![])]), extra).await;
    (up, proxy)
}

#[tokio::test]
async fn missing_and_invalid_keys_are_400s_with_the_spec_shape() {
    let (up, proxy) = single("[routing]\nmax_key_bytes = 8\n").await;
    let c = client();
    send(
        &c,
        http::Request::get(proxy.url("/nothing"))
            .body(empty())
            .unwrap(),
    )
    .await
    .assert_error(400, "missing_shard_key");
    get_key(&c, &proxy.url("/x"), "123456789")
        .await
        .assert_error(400, "invalid_shard_key");
    send(
        &c,
        http::Request::get(proxy.url("/kv/%zz"))
            .body(empty())
            .unwrap(),
    )
    .await
    .assert_error(400, "invalid_shard_key");
    send(
        &c,
        http::Request::get(proxy.url("/x?key=a&key=b"))
            .body(empty())
            .unwrap(),
    )
    .await
    .assert_error(400, "invalid_shard_key");
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn oversized_headers_are_431() {
    let (up, proxy) = single("[limits]\nmax_header_bytes = 2048\n").await;
    let req = http::Request::get(proxy.url("/kv/a"))
        .header("x-big", "v".repeat(4000))
        .body(empty())
        .unwrap();
    send(&client(), req)
        .await
        .assert_error(431, "request_header_too_large");
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn oversized_bodies_are_413_declared_or_streamed() {
    let (up, proxy) = single("[limits]\nmax_body_bytes = 1000\n").await;
    let c = client();
    send(
        &c,
        keyed("POST", &proxy.url("/kv/a"), "a", vec![b'x'; 2000]),
    )
    .await
    .assert_error(413, "payload_too_large");
    assert_eq!(
        up.arrivals(),
        0,
        "a declared oversize body is refused before routing"
    );

    // Chunked: the limit is found while streaming.
    let out = raw_exchange(
        proxy.addr,
        format!(
            "POST /kv/a HTTP/1.1\r\nhost: a\r\nx-shard-key: a\r\ntransfer-encoding: chunked\r\n\r\n7d0\r\n{}\r\n0\r\n\r\n",
            "y".repeat(2000)
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(
        up.log()
            .iter()
            .all(|r| !r.body_complete || r.body_len <= 1000)
    );
}

#[tokio::test]
async fn a_hanging_upstream_answers_504_at_the_per_try_timeout() {
    let (up, proxy) =
        single("[timeouts]\nper_try = \"300ms\"\noverall = \"2s\"\n[retry]\nmax_attempts = 1\n")
            .await;
    up.set(Behavior::Hang);
    let started = tokio::time::Instant::now();
    get_key(&client(), &proxy.url("/kv/a"), "a")
        .await
        .assert_error(504, "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_dripping_response_is_cut_at_the_overall_deadline() {
    let (up, proxy) = single("[timeouts]\nper_try = \"1s\"\noverall = \"1s\"\n").await;
    up.set(Behavior::Drip {
        bytes: 1000,
        every: Duration::from_millis(50),
    });
    let resp = client()
        .request(keyed("GET", &proxy.url("/kv/a"), "a", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    use http_body_util::BodyExt;
    let started = tokio::time::Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect()).await;
    assert!(
        matches!(body, Ok(Err(_))),
        "the stream must end in an error, not complete"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_slow_client_is_closed_at_the_header_read_timeout() {
    let (_up, proxy) = single("[limits]\nheader_read_timeout = \"300ms\"\n").await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /kv/a HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "closed, not answered: {n:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// Send one GET on a raw keep-alive connection, check it is answered 200,
/// and return how long the connection then stayed open before the proxy
/// closed it (failing if it is not closed within 5 s).
async fn idle_after_one_request(addr: std::net::SocketAddr) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /kv/a HTTP/1.1\r\nhost: a\r\nx-shard-key: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "a request in flight is never timed out as idle: {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let idle_from = tokio::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the idle connection must be closed");
    assert!(matches!(n, Ok(0) | Err(_)));
    idle_from.elapsed()
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout_not_the_header_timeout() {
    let (_up, proxy) =
        single("[limits]\nheader_read_timeout = \"200ms\"\nidle_timeout = \"900ms\"\n").await;
    let idle = idle_after_one_request(proxy.addr).await;
    assert!(
        idle >= Duration::from_millis(600),
        "closed after {idle:?}: the header timeout fired on an idle connection"
    );
}

#[tokio::test]
async fn a_response_slower_than_the_idle_timeout_is_not_cut_and_idling_starts_when_it_ends() {
    let (up, proxy) =
        single("[limits]\nheader_read_timeout = \"200ms\"\nidle_timeout = \"700ms\"\n").await;
    up.set(Behavior::Slow(Duration::from_millis(1500)));
    let idle = idle_after_one_request(proxy.addr).await;
    assert!(
        idle >= Duration::from_millis(450),
        "closed {idle:?} after the response: idling was counted from before it ended"
    );
}

#[tokio::test]
async fn an_http2_connection_is_closed_at_the_idle_timeout_after_its_last_stream() {
    let (_up, proxy) = single("[limits]\nidle_timeout = \"700ms\"\n").await;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = keyed("GET", &proxy.url("/kv/a"), "a", "");
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    use http_body_util::BodyExt;
    resp.into_body().collect().await.unwrap();
    // The stream ended in its own task; the connection's reader must still
    // notice that the connection went idle.
    let idle_from = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the idle HTTP/2 connection must be closed")
        .unwrap()
        .ok();
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(450),
        "closed {idle:?} after the last stream, before the idle timeout"
    );
}

#[tokio::test]
async fn requests_beyond_max_inflight_get_503_overloaded_at_once() {
    let (up, proxy) = single("[limits]\nmax_inflight = 2\n[timeouts]\nper_try = \"5s\"\n").await;
    up.set(Behavior::Hang);
    let url = proxy.url("/kv/a");
    let hung = requests_in_flight(&url, "a", 2);
    eventually(
        Duration::from_secs(5),
        "two requests hang upstream",
        || async { up.arrivals() >= 2 },
    )
    .await;
    let started = tokio::time::Instant::now();
    get_key(&client(), &url, "a")
        .await
        .assert_error(503, "overloaded");
    assert!(started.elapsed() < Duration::from_secs(1));
    for h in hung {
        h.abort();
    }
}

#[tokio::test]
async fn connections_beyond_max_connections_get_503_overloaded() {
    let (_up, proxy) = single("[limits]\nmax_connections = 2\n").await;
    use tokio::io::AsyncWriteExt;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET /kv/a HTTP/1.1\r\nhost: a\r\nx-shard-key: a\r\n\r\n")
            .await
            .unwrap();
        held.push(s);
    }
    // Both held connections are served before the third arrives.
    eventually(
        Duration::from_secs(5),
        "two connections admitted",
        || async {
            let m = admin_get(proxy.admin, "/metrics").await.text();
            m.contains("shardgate_downstream_connections 2")
        },
    )
    .await;
    let out = raw_exchange(
        proxy.addr,
        b"GET /kv/a HTTP/1.1\r\nhost: a\r\nx-shard-key: a\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("\"error\":\"overloaded\""));
}

#[tokio::test]
async fn no_map_means_503_no_topology_and_not_ready() {
    // A proxy whose map never arrived: build one without loading a source.
    let config = shardgate::config::ProxyConfig::from_toml(
        "[server]\nlisten=\"127.0.0.1:0\"\nadmin_listen=\"127.0.0.1:0\"\n[topology]\nsources=[\"unused.json\"]\n",
        "t",
        &Default::default(),
    )
    .unwrap();
    let proxy = shardgate::proxy::Proxy::new(
        &config,
        std::sync::Arc::new(shardgate::telemetry::Metrics::new()),
        None,
    )
    .unwrap();
    assert!(proxy.table().is_none());
    let err = shardgate::proxy::error::ProxyError::NoTopology.to_response();
    assert_eq!(err.status(), 503);
}
