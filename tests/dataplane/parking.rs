//! Idle HTTP/1 connections are parked: hyper's state and buffers are dropped
//! between requests and rebuilt when the client sends again (at once for a
//! client that comes and goes, after a second for a busy one). No request
//! the client sent may be lost or answered out of order on the way.

use crate::support::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn single() -> (Upstream, TestProxy) {
    let up = Upstream::start("primary").await;
    let proxy = TestProxy::start(&topology(1, &[(up.addr, vec![])]), "").await;
    (up, proxy)
}

/// The answers arriving on a raw HTTP/1.1 connection, each framed by its
/// content-length.
#[derive(Default)]
struct Answers {
    buf: Vec<u8>,
}

impl Answers {
    /// The next answer's status line and body.
    async fn next(&mut self, s: &mut TcpStream) -> (String, String) {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .expect("every answer here has a content-length");
                if self.buf.len() >= end + 4 + length {
                    let body = self.buf[end + 4..end + 4 + length].to_vec();
                    self.buf.drain(..end + 4 + length);
                    let status = head.lines().next().unwrap_or_default().to_owned();
                    return (status, String::from_utf8_lossy(&body).to_string());
                }
            }
            let mut chunk = [0u8; 16384];
            let got = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
                .await
                .expect("no answer within 10 s")
                .unwrap();
            assert!(got > 0, "closed before its answer");
            self.buf.extend_from_slice(&chunk[..got]);
        }
    }
}

/// Read exactly `n` answers from `s`.
async fn responses(s: &mut TcpStream, n: usize) -> Vec<(String, String)> {
    let mut answers = Answers::default();
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(answers.next(s).await);
    }
    assert!(answers.buf.is_empty(), "nothing more was sent");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_all_answered_in_order_across_parking() {
    let up = Upstream::start("primary").await;
    let dir = tempfile::tempdir().unwrap();
    // The binary: with its own worker runtime, as in use (in this test's
    // runtime the race below did not show).
    let proxy = BinProxy::in_front_of(&binary(), dir.path(), up.addr, "").await;
    // As h2load --h1 -m 8 does: eight requests in flight, and one more sent
    // as each answer arrives, on new connections (parked as soon as idle).
    // Most are answered by the proxy itself (no key: a 400), every third by
    // the upstream.
    let forwarded = |i: usize| i.is_multiple_of(3);
    let request = |conn: usize, i: usize| {
        if forwarded(i) {
            format!("GET /kv/c{conn}-{i} HTTP/1.1\r\nhost: a\r\n\r\n")
        } else {
            "GET /nothing HTTP/1.1\r\nhost: a\r\n\r\n".to_owned()
        }
    };
    const EACH: usize = 64;
    for conn in 0..30 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        let first: String = (0..8).map(|i| request(conn, i)).collect();
        s.write_all(first.as_bytes()).await.unwrap();
        let mut next = 8;
        let mut got = Vec::new();
        let mut answers = Answers::default();
        for _ in 0..EACH {
            got.push(answers.next(&mut s).await);
            if next < EACH {
                s.write_all(request(conn, next).as_bytes()).await.unwrap();
                next += 1;
            }
        }
        let statuses: Vec<u16> = got
            .iter()
            .map(|(status, _)| status[9..12].parse().unwrap())
            .collect();
        let expected: Vec<u16> = (0..EACH)
            .map(|i| if forwarded(i) { 200 } else { 400 })
            .collect();
        assert_eq!(statuses, expected, "connection {conn}: {got:?}");
        for (i, (_, body)) in got.iter().enumerate() {
            if forwarded(i) {
                assert_eq!(body, "primary");
            } else {
                assert!(body.contains("missing_shard_key"), "{body}");
            }
        }
    }
    let paths: Vec<String> = up.log().iter().map(|r| r.uri.path().to_owned()).collect();
    let expected: Vec<String> = (0..30)
        .flat_map(|conn| {
            (0..EACH)
                .filter(|&i| forwarded(i))
                .map(move |i| format!("/kv/c{conn}-{i}"))
        })
        .collect();
    assert_eq!(paths, expected, "each forwarded once, in order");
}

#[tokio::test]
async fn a_request_head_begun_behind_the_last_one_survives_parking() {
    let (up, proxy) = single().await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    // The second head's first bytes arrive with the first request; the rest
    // only after its answer, once the idle connection has been parked.
    s.write_all(b"GET /kv/first HTTP/1.1\r\nhost: a\r\n\r\nGET /kv/sec")
        .await
        .unwrap();
    let first = responses(&mut s, 1).await;
    assert_eq!(first[0].0, "HTTP/1.1 200 OK");
    // The client pausing mid-head is the scenario, not a wait for a condition.
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"ond HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let second = responses(&mut s, 1).await;
    assert_eq!(second[0].0, "HTTP/1.1 200 OK");
    let paths: Vec<String> = up.log().iter().map(|r| r.uri.path().to_owned()).collect();
    assert_eq!(paths, ["/kv/first", "/kv/second"]);
}

#[tokio::test]
async fn a_client_that_comes_and_goes_is_served_on_its_kept_connection_every_time() {
    let (up, proxy) = single().await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    for i in 0..8 {
        s.write_all(format!("GET /kv/k{i} HTTP/1.1\r\nhost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let got = responses(&mut s, 1).await;
        assert_eq!(got[0].0, "HTTP/1.1 200 OK", "request {i}");
        // Back soon (a busy client, whose connection lingers) or after more
        // than a second (one parked at once); far below the idle timeout.
        tokio::time::sleep(Duration::from_millis(if i % 4 == 3 { 1100 } else { 5 })).await;
    }
    assert_eq!(up.requests(), 8);
}
