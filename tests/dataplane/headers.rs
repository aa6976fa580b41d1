//! Header rules of SPEC §3, both ways.

use crate::support::*;
use std::time::Duration;

async fn single() -> (Upstream, TestProxy) {
    let up = Upstream::start("primary").await;
    let proxy = TestProxy::start(&topology(7, &[(up.addr, vec![])]), "").await;
    (up, proxy)
}

#[tokio::test]
async fn hop_by_hop_headers_never_cross_either_way() {
    let (up, proxy) = single().await;
    up.set(Behavior::Respond {
        status: 200,
        headers: vec![
            ("connection", "x-upstream-private"),
            ("x-upstream-private", "secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic"),
            ("upgrade", "websocket"),
            ("x-visible", "yes"),
        ],
        body: "hello",
    });
    let req = http::Request::get(proxy.url("/kv/a"))
        .header("x-shard-key", "a")
        .header("connection", "keep-alive, x-client-private")
        .header("x-client-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic eDp5")
        .header("te", "trailers")
        .header("upgrade", "h2c")
        .header("x-visible", "yes")
        .body(empty())
        .unwrap();
    let a = send(&client(), req).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.text(), "hello");
    for gone in [
        "x-upstream-private",
        "keep-alive",
        "proxy-authenticate",
        "upgrade",
    ] {
        assert!(a.header(gone).is_none(), "{gone} reached the client");
    }
    assert_eq!(a.header("x-visible"), Some("yes"));

    let seen = up.log().pop().unwrap();
    for gone in [
        "x-client-private",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(seen.header(gone).is_none(), "{gone} reached the upstream");
    }
    // hyper's client may add its own keep-alive framing, but never the client's tokens.
    assert!(
        seen.header("connection")
            .is_none_or(|c| !c.contains("x-client-private"))
    );
    assert_eq!(seen.header("x-visible"), Some("yes"));
}

#[tokio::test]
async fn forwarding_and_tracing_headers_are_set() {
    let (up, proxy) = single().await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let req = http::Request::get(proxy.url("/kv/a"))
        .header("host", "shop.example")
        .header("x-shard-key", "a")
        .header("x-forwarded-for", "203.0.113.9")
        .header("traceparent", parent)
        .header("tracestate", "vendor=1")
        .body(empty())
        .unwrap();
    let a = send(&client(), req).await;
    assert_eq!(a.header("x-shardgate-partition"), Some("0"));
    assert!(
        a.header("x-shardgate-upstream").is_none(),
        "the upstream stays private"
    );
    let seen = up.log().pop().unwrap();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("shop.example"));
    assert_eq!(seen.header("host"), Some("shop.example"));
    assert_eq!(seen.header("x-cluster-epoch"), Some("7"));
    let tp = seen.header("traceparent").unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert_ne!(tp, parent, "the proxy is a hop with its own span id");
    assert_eq!(seen.header("tracestate"), Some("vendor=1"));

    // Without a parent, a trace is started.
    get_key(&client(), &proxy.url("/kv/a"), "a").await;
    let seen = up.log().pop().unwrap();
    assert_eq!(seen.header("traceparent").unwrap().len(), 55);
}

#[tokio::test]
async fn a_client_supplied_epoch_is_overwritten() {
    let (up, proxy) = single().await;
    let req = http::Request::get(proxy.url("/kv/a"))
        .header("x-shard-key", "a")
        .header("x-cluster-epoch", "999999")
        .body(empty())
        .unwrap();
    send(&client(), req).await;
    assert_eq!(up.log().pop().unwrap().header("x-cluster-epoch"), Some("7"));
}

#[tokio::test]
async fn ambiguous_hosts_are_refused_before_reaching_an_upstream() {
    let (up, proxy) = single().await;
    let out = raw_exchange(
        proxy.addr,
        b"GET /kv/a HTTP/1.1\r\nhost: a.example\r\nhost: b.example\r\nx-shard-key: a\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("bad_request"));

    let out = raw_exchange(
        proxy.addr,
        b"GET http://a.example/kv/a HTTP/1.1\r\nhost: b.example\r\nx-shard-key: a\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"));
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_forwarded_chunked_only_and_the_client_closed() {
    let (up, proxy) = single().await;
    let out = raw_exchange(
        proxy.addr,
        b"POST /kv/a HTTP/1.1\r\nhost: a\r\nx-shard-key: a\r\ncontent-length: 3\r\n\
          transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // read_to_end returned: the proxy closed the client connection.
    let seen = up.log().pop().unwrap();
    assert_eq!(seen.body_len, 5, "the chunked framing won");
    assert!(seen.header("content-length").is_none());
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
}

#[tokio::test]
async fn expect_continue_is_answered_by_the_proxy_and_not_forwarded() {
    let (up, proxy) = single().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"PUT /kv/a HTTP/1.1\r\nhost: a\r\nx-shard-key: a\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue"));
    s.write_all(b"hello").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    let seen = up.log().pop().unwrap();
    assert!(seen.header("expect").is_none());
    assert_eq!(seen.body_len, 5);

    let out = raw_exchange(
        proxy.addr,
        b"GET /kv/a HTTP/1.1\r\nhost: a\r\nx-shard-key: a\r\nexpect: something-else\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 417"));
}

#[tokio::test]
async fn an_upstream_connection_that_sent_extra_bytes_is_never_reused() {
    let (up, proxy) = single().await;
    let c = client();
    up.script(vec![Behavior::ExtraBytes]);
    let first = get_key(&c, &proxy.url("/kv/a"), "a").await;
    assert_eq!(first.text(), "ok");
    for _ in 0..5 {
        let next = get_key(&c, &proxy.url("/kv/a"), "a").await;
        assert_eq!(next.status, 200);
        assert_eq!(
            next.text(),
            "primary",
            "a stale response leaked from a confused connection"
        );
    }
}

#[tokio::test]
async fn upstream_connections_are_pooled_not_opened_per_request() {
    let (up, proxy) = single().await;
    let c = client();
    for _ in 0..50 {
        assert_eq!(get_key(&c, &proxy.url("/kv/a"), "a").await.status, 200);
    }
    assert!(
        up.connections_accepted() <= 2,
        "{} connections for 50 sequential requests",
        up.connections_accepted()
    );
}
