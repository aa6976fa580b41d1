//! A primary's side of replication: one sender per replica, and the quorum.
//!
//! Each sender keeps one HTTP/1 connection to its replica and sends the log
//! in order (`POST /_shardgate/replicate`): a snapshot first (a new term, a
//! new replica, or one that fell off the log), then batches of tail writes,
//! and an empty batch every [`KEEPALIVE`] so the replica knows how far
//! behind it is and the primary knows whom it can reach. A write is
//! committed once a majority of the partition's members (the primary
//! included) have applied it; the primary refuses a write outright when it
//! has not heard from enough replicas within [`CONTACT`] (nothing is written
//! then), which is how an isolated primary becomes read-only.

use super::store::{Position, Write};
use super::{Node, wire};
use crate::proto::node::append_response::Outcome;
use crate::proto::node::{AppendRequest, AppendResponse};
use crate::resilience::{Backoff, Jitter};
use crate::topology::NodeAddr;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use prost::Message;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// An idle replica hears from its primary this often.
pub(crate) const KEEPALIVE: Duration = Duration::from_millis(100);
/// A replica not heard from for this long does not count towards a quorum.
pub(crate) const CONTACT: Duration = Duration::from_secs(1);
/// One exchange with a replica may take this long.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// A batch of tail writes is about this large at most.
const BATCH_BYTES: u64 = 1024 * 1024;
/// Largest answer a replica may send.
const MAX_ANSWER: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, Default)]
struct Peer {
    /// The newest write it has applied (of this term's log).
    acked: Option<Position>,
    /// When it last answered at all.
    heard: Option<Instant>,
}

/// This node's lead of its partition, for one term and one set of replicas.
pub(crate) struct Leading {
    pub(crate) term: u64,
    pub(crate) peers: Vec<NodeAddr>,
    /// Members (the primary included) that must hold a write.
    majority: usize,
    state: Mutex<HashMap<NodeAddr, Peer>>,
    /// The highest sequence number a majority holds.
    committed: watch::Sender<u64>,
    pub(crate) stop: CancellationToken,
}

/// Why a write could not be acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NotCommitted {
    /// It did not reach a majority in time; it may still.
    TimedOut,
    /// This node stopped leading meanwhile.
    Deposed,
}

impl Leading {
    pub(crate) fn new(term: u64, peers: Vec<NodeAddr>) -> Arc<Leading> {
        let members = peers.len() + 1;
        Arc::new(Leading {
            term,
            majority: members / 2 + 1,
            state: Mutex::new(peers.iter().map(|p| (*p, Peer::default())).collect()),
            peers,
            committed: watch::channel(0).0,
            stop: CancellationToken::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeAddr, Peer>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether enough replicas answered recently for a write to reach a
    /// majority; if not, a write is refused before anything is written.
    pub(crate) fn reaches_majority(&self, now: Instant) -> bool {
        let live = self
            .lock()
            .values()
            .filter(|p| {
                p.heard
                    .is_some_and(|t| now.saturating_duration_since(t) < CONTACT)
            })
            .count();
        live + 1 >= self.majority
    }

    /// Wait until a majority holds write `seq`.
    pub(crate) async fn committed(&self, seq: u64, within: Duration) -> Result<(), NotCommitted> {
        let mut rx = self.committed.subscribe();
        let wait = rx.wait_for(|c| *c >= seq);
        tokio::select! {
            r = tokio::time::timeout(within, wait) => match r {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(_)) => Err(NotCommitted::Deposed),
                Err(_) => Err(NotCommitted::TimedOut),
            },
            () = self.stop.cancelled() => Err(NotCommitted::Deposed),
        }
    }

    /// Record a replica's answer, and what a majority now holds. `own` is
    /// the primary's newest write.
    fn heard(&self, peer: NodeAddr, acked: Option<Position>, own: u64, now: Instant) {
        let committed = {
            let mut state = self.lock();
            let p = state.entry(peer).or_default();
            p.heard = Some(now);
            if acked.is_some() {
                p.acked = acked;
            }
            let mut seqs: Vec<u64> = state
                .values()
                .map(|p| p.acked.map_or(0, |a| a.seq))
                .collect();
            seqs.push(own);
            seqs.sort_unstable_by(|a, b| b.cmp(a));
            seqs.get(self.majority - 1).copied().unwrap_or(0)
        };
        self.committed.send_if_modified(|c| {
            let raised = committed > *c;
            if raised {
                *c = committed;
            }
            raised
        });
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(peer: NodeAddr) -> Result<Sender, String> {
    let stream = tokio::net::TcpStream::connect(peer.socket_addr(80))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn exchange(
    send: &mut Sender,
    peer: NodeAddr,
    req: &AppendRequest,
) -> Result<AppendResponse, String> {
    send.ready().await.map_err(|e| format!("connection: {e}"))?;
    let request = http::Request::post("/_shardgate/replicate")
        .header(http::header::HOST, peer.to_string())
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(req.encode_to_vec())))
        .map_err(|e| e.to_string())?;
    let resp = send
        .send_request(request)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let body = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("answer: {e}"))?
        .to_bytes();
    AppendResponse::decode(body).map_err(|e| format!("answer: {e}"))
}

/// Send this term's log to `peer` until the lead ends.
pub(crate) async fn replicate(node: Arc<Node>, leading: Arc<Leading>, peer: NodeAddr) {
    let backoff = Backoff {
        base: Duration::from_millis(50),
        max: Duration::from_secs(1),
        jitter: Jitter::Decorrelated,
    };
    let mut send: Option<Sender> = None;
    let mut acked: Option<Position> = None;
    let mut failures = 0u32;
    let mut last_delay = None;
    let mut head = node.head.subscribe();
    loop {
        if leading.stop.is_cancelled() {
            return;
        }
        let Some((req, own)) = node.next_batch(&leading, acked) else {
            return;
        };
        let up_to_date = !req.snapshot && req.writes.is_empty();
        let result = async {
            if send.as_ref().is_none_or(Sender::is_closed) {
                send = Some(connect(peer).await?);
            }
            let s = send.as_mut().ok_or("no connection")?;
            exchange(s, peer, &req).await
        };
        let result = tokio::select! {
            r = tokio::time::timeout(EXCHANGE_TIMEOUT, result) => r.unwrap_or_else(|_| Err("timed out".into())),
            () = leading.stop.cancelled() => return,
        };
        let pause = match result.map(|r| (Outcome::try_from(r.outcome), r)) {
            Ok((Ok(Outcome::Applied), r)) => {
                acked = r.applied.map(wire::position);
                leading.heard(peer, acked, own, Instant::now());
                failures = 0;
                last_delay = None;
                // Caught up: wait for the next write, or send a keepalive.
                (up_to_date || acked.is_some_and(|a| a.seq >= own)).then_some(KEEPALIVE)
            }
            Ok((Ok(Outcome::NeedSnapshot), r)) => {
                tracing::debug!(%peer, reason = r.reason, "replica needs a snapshot");
                acked = None;
                leading.heard(peer, None, own, Instant::now());
                None
            }
            Ok((outcome, r)) => {
                tracing::debug!(%peer, ?outcome, reason = r.reason, "replica refused");
                send = None;
                Some(delay(&backoff, &mut failures, &mut last_delay))
            }
            Err(e) => {
                tracing::debug!(%peer, "replication: {e}");
                send = None;
                Some(delay(&backoff, &mut failures, &mut last_delay))
            }
        };
        if let Some(pause) = pause {
            head.mark_unchanged();
            tokio::select! {
                _ = head.changed(), if failures == 0 => {}
                () = tokio::time::sleep(pause) => {}
                () = leading.stop.cancelled() => return,
            }
        }
    }
}

fn delay(backoff: &Backoff, failures: &mut u32, last: &mut Option<Duration>) -> Duration {
    let d = backoff.delay(*failures, *last, &mut rand::rng());
    *failures = failures.saturating_add(1);
    *last = Some(d);
    d
}

/// The request that takes `peer` from `acked` towards the head.
pub(crate) fn batch(
    term: u64,
    primary: NodeAddr,
    store: &super::store::Store,
    acked: Option<Position>,
    hlc: crate::clock::Hlc,
) -> Option<AppendRequest> {
    let head = store.applied();
    let tail = acked.and_then(|a| store.writes_after(a, BATCH_BYTES).map(|w| (a, w)));
    let (prev, writes, snapshot): (Position, Vec<Write>, bool) = match tail {
        Some((prev, writes)) => (prev, writes, false),
        None => {
            let s = store.snapshot()?;
            let writes = s
                .items
                .into_iter()
                .map(|(key, v)| Write {
                    at: Position {
                        hlc: v.hlc,
                        ..Position::default()
                    },
                    key,
                    value: v.value,
                })
                .collect();
            (s.at, writes, true)
        }
    };
    Some(AppendRequest {
        term,
        primary: primary.to_string(),
        head: Some(wire::to_position(head)),
        prev: Some(wire::to_position(prev)),
        writes: writes.into_iter().map(wire::to_write).collect(),
        snapshot,
        hlc: hlc.as_u64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> NodeAddr {
        s.parse().unwrap()
    }

    fn at(seq: u64) -> Option<Position> {
        Some(Position {
            seq,
            ..Position::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_commits_once_a_majority_of_members_hold_it() {
        let l = Leading::new(3, vec![addr("10.0.0.2:1"), addr("10.0.0.3:1")]);
        let now = Instant::now();
        l.heard(addr("10.0.0.2:1"), at(4), 5, now);
        assert_eq!(*l.committed.borrow(), 4, "primary and one replica of three");
        l.heard(addr("10.0.0.3:1"), at(5), 5, now);
        assert_eq!(*l.committed.borrow(), 5);
        assert_eq!(l.committed(5, Duration::from_millis(1)).await, Ok(()));
        assert_eq!(
            l.committed(6, Duration::from_millis(10)).await,
            Err(NotCommitted::TimedOut)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_one_replica_both_members_must_hold_a_write() {
        let l = Leading::new(3, vec![addr("10.0.0.2:1")]);
        l.heard(addr("10.0.0.2:1"), at(2), 3, Instant::now());
        assert_eq!(*l.committed.borrow(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_primary_that_has_not_heard_from_a_majority_lately_refuses_writes() {
        let l = Leading::new(3, vec![addr("10.0.0.2:1"), addr("10.0.0.3:1")]);
        assert!(!l.reaches_majority(Instant::now()), "never heard");
        l.heard(addr("10.0.0.2:1"), None, 0, Instant::now());
        assert!(l.reaches_majority(Instant::now()), "one replica and itself");
        tokio::time::advance(CONTACT).await;
        assert!(
            !l.reaches_majority(Instant::now()),
            "that replica went quiet"
        );
        // A partition of one needs nobody.
        assert!(Leading::new(3, vec![]).reaches_majority(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_waiting_for_its_quorum_ends_when_the_lead_does() {
        let l = Leading::new(3, vec![addr("10.0.0.2:1")]);
        let waiting = {
            let l = l.clone();
            tokio::spawn(async move { l.committed(1, Duration::from_secs(60)).await })
        };
        tokio::task::yield_now().await;
        l.stop.cancel();
        assert_eq!(waiting.await.unwrap(), Err(NotCommitted::Deposed));
    }
}
