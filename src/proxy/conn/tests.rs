//! `TimedIo`'s deadlines and parking, under tokio's paused clock.

use super::super::pipeline::{InflightLimit, Ticket};
use super::*;
use crate::telemetry::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const HEADER: Duration = Duration::from_secs(10);
const IDLE: Duration = Duration::from_secs(60);
const SEND: Duration = Duration::from_secs(30);

/// A connection of a busy client (see [`PARK_AFTER`]).
fn connection() -> (DuplexStream, TimedIo<DuplexStream>, Arc<ConnActivity>) {
    connection_of(true)
}

fn connection_of(linger: bool) -> (DuplexStream, TimedIo<DuplexStream>, Arc<ConnActivity>) {
    let (client, server) = tokio::io::duplex(64);
    let m = Metrics::new();
    let limit = Arc::new(InflightLimit::new(
        100,
        m.counter("shed", &[]),
        m.counter("memory", &[]),
    ));
    let activity = ConnActivity::new(limit);
    let io = TimedIo::new(
        server,
        activity.clone(),
        ConnTimeouts {
            header_read: HEADER,
            idle: IDLE,
            send: SEND,
        },
        Instant::now() + HEADER,
        linger,
    );
    (client, io, activity)
}

/// The timer wheel counts whole milliseconds, rounding up.
fn assert_about(took: Duration, expected: Duration) {
    assert!(
        took >= expected && took <= expected + Duration::from_millis(2),
        "{took:?}, expected {expected:?}"
    );
}

/// The next read fails as idle, the idle timeout from now.
async fn closed_when_idle_times_out(io: &mut TimedIo<DuplexStream>) {
    let t0 = Instant::now();
    let e = read_err(io).await;
    assert!(e.to_string().contains("idle"), "{e}");
    assert_about(t0.elapsed(), IDLE);
}

async fn read_err(io: &mut TimedIo<DuplexStream>) -> io::Error {
    let mut buf = [0u8; 64];
    loop {
        match io.read(&mut buf).await {
            Ok(0) => panic!("closed instead of timing out"),
            Ok(_) => continue,
            Err(e) => return e,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_sends_nothing_is_closed_at_the_header_read_timeout() {
    let (_client, mut io, _) = connection();
    let t0 = Instant::now();
    let e = read_err(&mut io).await;
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert!(e.to_string().contains("request head"), "{e}");
    assert_about(t0.elapsed(), HEADER);
}

#[tokio::test(start_paused = true)]
async fn a_busy_clients_idle_connection_parks_after_a_second_and_closes_at_the_idle_timeout() {
    let (_client, mut io, activity) = connection();
    drop(activity.enter()); // a request came and went
    let t0 = Instant::now();
    let mut buf = [0u8; 8];
    assert_eq!(
        io.read(&mut buf).await.unwrap(),
        0,
        "hyper is told to let go"
    );
    assert_about(t0.elapsed(), PARK_AFTER);
    assert!(io.unpark(Bytes::new()), "parked, not closed by the client");
    assert!(!io.unpark(Bytes::new()), "the mark is cleared");
    let e = read_err(&mut io).await;
    assert!(e.to_string().contains("idle"), "{e}");
    assert_about(t0.elapsed(), IDLE);
}

/// With a read pending in its own task (polled again only when woken,
/// as hyper's is) and `ticket` in flight: end the request elsewhere, as
/// hyper's write path does, and return how long the reader then took to
/// park.
async fn ends_and_parks(
    read: tokio::task::JoinHandle<(usize, Instant)>,
    ticket: Option<Ticket>,
) -> Duration {
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!read.is_finished());
    drop(ticket);
    let t0 = Instant::now();
    let (n, at) = read.await.unwrap();
    assert_eq!(n, 0, "parked");
    at - t0
}

/// Within two seconds of the request's end, not at the header deadline.
fn soon_enough(took: Duration) {
    assert!(
        took <= 2 * PARK_AFTER,
        "parked {took:?} after the request ended; the header deadline is {HEADER:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_ending_while_the_reader_waits_still_parks_about_a_second_later() {
    let (_client, mut io, activity) = connection();
    let ticket = activity.enter().ok();
    let read = tokio::spawn(async move {
        let n = io.read(&mut [0u8; 8]).await;
        (n.unwrap(), Instant::now())
    });
    soon_enough(ends_and_parks(read, ticket).await);
}

#[tokio::test(start_paused = true)]
async fn a_first_request_parks_once_it_ends_not_at_the_header_deadline() {
    let (mut client, mut io, activity) = connection_of(false);
    client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let (head_read, admitted) = (
        tokio::sync::oneshot::channel(),
        tokio::sync::oneshot::channel(),
    );
    let read = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        // The head arrives under the header deadline.
        assert!(io.read(&mut buf).await.unwrap() > 0);
        head_read.0.send(()).unwrap();
        admitted.1.await.unwrap();
        let n = io.read(&mut buf).await;
        (n.unwrap(), Instant::now())
    });
    head_read.1.await.unwrap();
    let ticket = activity.enter().ok();
    admitted.0.send(()).unwrap();
    soon_enough(ends_and_parks(read, ticket).await);
}

/// Parked: hyper is told to let go (an end of stream), and the mark
/// is taken.
/// A connection whose request came and went, its reader having told hyper
/// to let go (not yet unparked).
async fn let_go_after_a_request() -> (DuplexStream, TimedIo<DuplexStream>) {
    let (client, mut io, activity) = connection();
    drop(activity.enter());
    assert_eq!(io.read(&mut [0u8; 8]).await.unwrap(), 0, "hyper lets go");
    (client, io)
}

async fn parks(io: &mut TimedIo<DuplexStream>) {
    assert_eq!(io.read(&mut [0u8; 8]).await.unwrap(), 0, "hyper lets go");
    assert!(io.unpark(Bytes::new()), "parked, not closed by the client");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_comes_and_goes_is_parked_as_soon_as_its_answer_is_out() {
    let (_client, mut io, activity) = connection_of(false);
    drop(activity.enter());
    let t0 = Instant::now();
    parks(&mut io).await;
    assert_about(t0.elapsed(), Duration::ZERO);
    closed_when_idle_times_out(&mut io).await;
}

#[tokio::test(start_paused = true)]
async fn a_request_ending_elsewhere_wakes_a_reader_that_parks_at_once() {
    let (_client, mut io, activity) = connection_of(false);
    let ticket = activity.enter().ok();
    let read = tokio::spawn(async move {
        let n = io.read(&mut [0u8; 8]).await;
        (n.unwrap(), Instant::now())
    });
    assert_about(ends_and_parks(read, ticket).await, Duration::ZERO);
}

/// A request comes and goes on a connection that lingers or not; its
/// client is back `after` the connection parks, with its next request,
/// which comes and goes too. How long, after that, until it parks again.
async fn parks_again_after(linger: bool, after: Duration) -> Duration {
    let (mut client, mut io, activity) = connection_of(linger);
    drop(activity.enter());
    parks(&mut io).await;
    tokio::time::sleep(after).await;
    client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(io.wait_for_bytes().await.unwrap());
    let mut buf = [0u8; 64];
    assert!(io.read(&mut buf).await.unwrap() > 0);
    drop(activity.enter());
    let t0 = Instant::now();
    parks(&mut io).await;
    t0.elapsed()
}

#[tokio::test(start_paused = true)]
async fn a_client_back_within_a_second_is_busy_and_its_connection_lingers() {
    let took = parks_again_after(false, Duration::from_millis(300)).await;
    assert_about(took, PARK_AFTER);
}

#[tokio::test(start_paused = true)]
async fn a_busy_client_back_after_a_pause_is_parked_at_once_again() {
    let took = parks_again_after(true, Duration::from_secs(5)).await;
    assert_about(took, Duration::ZERO);
}

#[test]
fn a_client_is_busy_if_it_sends_within_a_second_of_its_last_request() {
    let idle = Duration::from_secs(60);
    let now = Instant::now();
    // Parked with the idle deadline `until`: its request ended at until - idle.
    assert!(back_soon(now + idle, idle), "ended just now");
    assert!(back_soon(now + idle - PARK_AFTER / 2, idle));
    assert!(!back_soon(now + idle - PARK_AFTER, idle));
    assert!(
        !back_soon(now + Duration::from_secs(10), idle),
        "ended 50 s ago"
    );
}

#[tokio::test(start_paused = true)]
async fn a_parked_connection_keeps_its_socket_when_hyper_shuts_it_down() {
    let (mut client, mut io) = let_go_after_a_request().await;
    io.shutdown().await.unwrap();
    let mut got = [0u8; 8];
    let still_open = tokio::time::timeout(Duration::from_secs(1), client.read(&mut got)).await;
    assert!(
        still_open.is_err(),
        "the client saw no end of stream: {still_open:?}"
    );
    assert!(io.unpark(Bytes::new()));
    io.shutdown().await.unwrap();
    assert_eq!(
        client.read(&mut got).await.unwrap(),
        0,
        "a real shutdown once unparked"
    );
}

#[tokio::test(start_paused = true)]
async fn bytes_read_while_parked_and_hypers_unread_bytes_come_first() {
    let (mut client, mut io) = let_go_after_a_request().await;
    assert!(io.unpark(Bytes::from_static(b"GET /a")));
    let mut buf = [0u8; 64];
    client.write_all(b" HTTP/1.1\r\n").await.unwrap();
    assert!(io.wait_for_bytes().await.unwrap());
    let mut got = Vec::new();
    while got.len() < 17 {
        let n = io.read(&mut buf).await.unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"GET /a HTTP/1.1\r\n");
}

#[tokio::test(start_paused = true)]
async fn the_preface_tells_http2_from_http1_even_when_it_arrives_in_pieces() {
    let (mut client, mut io, _) = connection();
    client.write_all(b"PRI * HT").await.unwrap();
    let sniffed = tokio::spawn(async move {
        let p = io.sniff().await.unwrap();
        (p, io)
    });
    tokio::task::yield_now().await;
    client.write_all(b"TP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let (p, mut io) = sniffed.await.unwrap();
    assert_eq!(p, Some(Protocol::Http2));
    let mut buf = [0u8; 24];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "nothing lost");

    let (mut client, mut io, _) = connection();
    client.write_all(b"P").await.unwrap();
    client.write_all(b"UT / HTTP/1.1\r\n").await.unwrap();
    assert_eq!(io.sniff().await.unwrap(), Some(Protocol::Http1));
    let (client, mut io, _) = connection();
    drop(client);
    assert_eq!(io.sniff().await.unwrap(), None, "closed before a byte");
}

#[tokio::test(start_paused = true)]
async fn http2_connections_are_never_parked() {
    let (mut client, mut io, activity) = connection();
    client
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(io.sniff().await.unwrap(), Some(Protocol::Http2));
    let mut buf = [0u8; 24];
    io.read_exact(&mut buf).await.unwrap();
    drop(activity.enter());
    closed_when_idle_times_out(&mut io).await;
}

#[tokio::test(start_paused = true)]
async fn a_response_stalled_on_a_slow_client_is_not_parked() {
    let (_client, mut io, activity) = connection();
    let ticket = activity.enter().ok();
    // Fill the pipe until the write stalls, then let the request end.
    let chunk = [b'x'; 64];
    let write = async {
        loop {
            io.write_all(&chunk).await?;
        }
        #[allow(unreachable_code)]
        Ok::<_, io::Error>(())
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(10), write)
            .await
            .is_err()
    );
    drop(ticket);
    // Closed, never parked.
    closed_when_idle_times_out(&mut io).await;
}

#[tokio::test(start_paused = true)]
async fn a_connection_with_a_request_in_flight_is_never_timed_out_by_its_reader() {
    let (_client, mut io, activity) = connection();
    let _ticket = activity.enter().ok();
    let mut buf = [0u8; 8];
    let waited = tokio::time::timeout(10 * IDLE, io.read(&mut buf)).await;
    assert!(waited.is_err(), "still waiting, no error: {waited:?}");
}

#[tokio::test(start_paused = true)]
async fn a_head_that_drips_is_cut_at_the_header_read_timeout_not_the_idle_one() {
    let (mut client, mut io, activity) = connection();
    drop(activity.enter());
    tokio::time::advance(Duration::from_secs(5)).await;
    client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    assert!(io.read(&mut buf).await.unwrap() > 0);
    let t0 = Instant::now();
    let e = read_err(&mut io).await;
    assert!(e.to_string().contains("request head"), "{e}");
    assert_about(t0.elapsed(), HEADER);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_cut_after_the_send_timeout() {
    let (_client, mut io, activity) = connection();
    let _ticket = activity.enter().ok();
    let t0 = Instant::now();
    let chunk = [b'x'; 64];
    let e = loop {
        if let Err(e) = io.write_all(&chunk).await {
            break e;
        }
    };
    assert!(e.to_string().contains("stopped reading"), "{e}");
    assert_about(t0.elapsed(), SEND);
}
