//! Partition safety (SPEC §8) with the real binaries: a primary cut off from
//! the coordinator, or paused past its lease, never takes a write once its
//! successor may have been named. Faults are real: the test relay cuts the
//! agent's link to the coordinator, SIGSTOP pauses a process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tokio::time::Instant;

/// Every node acknowledges after its own apply, so nothing but the lease
/// stops a primary that lost its coordinator (a majority quorum would also
/// refuse, and hide a missing lease).
const ASYNC: &[&str] = &["--write-quorum", "async"];

/// The address the coordinator's map names primary now.
async fn primary_addr(p: &Partition) -> String {
    p.coordinator.get_json("/v1/cluster/topology").await["partitions"][0]["primaryNodeIp"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Each answer: when it came back, its status and its error code.
type Answers = Arc<Mutex<Vec<(Instant, u16, String)>>>;

/// Writes straight to `node`, as a proxy holding the old map would send
/// them, each with a unique value; every answer with when it came back.
fn hammer(
    node: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
) -> (Answers, tokio::task::JoinHandle<()>) {
    let log: Answers = Arc::default();
    let task = {
        let log = log.clone();
        tokio::spawn(async move {
            let c = client();
            let mut i = 0u64;
            while !stop.is_cancelled() {
                i += 1;
                let req = http::Request::put(format!("http://{node}/kv/w{i}"))
                    .body(full(format!("v{i}")))
                    .unwrap();
                let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), c.request(req)).await
                else {
                    continue;
                };
                let status = r.status().as_u16();
                let code = r
                    .headers()
                    .get("x-shardgate-error")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let body = http_body_util::BodyExt::collect(r.into_body()).await;
                let code = if code.is_empty() {
                    body.ok()
                        .and_then(|b| {
                            serde_json::from_slice::<serde_json::Value>(&b.to_bytes()).ok()
                        })
                        .and_then(|v| v["error"].as_str().map(str::to_owned))
                        .unwrap_or_default()
                } else {
                    code
                };
                log.lock().unwrap().push((Instant::now(), status, code));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    (log, task)
}

#[tokio::test]
async fn an_isolated_primary_refuses_writes_once_its_lease_expires() {
    let p = Partition::start(&[ASYNC, ASYNC, ASYNC], false).await;
    let old = p.nodes[0].addr;
    assert_eq!(primary_addr(&p).await, old.to_string());
    let stop = tokio_util::sync::CancellationToken::new();
    let (log, writer) = hammer(old, stop.clone());
    eventually(Duration::from_secs(5), "writes are taken", || async {
        log.lock().unwrap().iter().any(|(_, s, _)| *s == 200)
    })
    .await;
    // The primary loses its coordinator; everything else carries on.
    p.agent_links[0].set(Link::Cut);
    eventually(Duration::from_secs(10), "a successor is named", || async {
        primary_addr(&p).await != old.to_string()
    })
    .await;
    let promoted = Instant::now();
    // Reads go on: an isolated primary is read-only, never write-only.
    assert_eq!(p.nodes[0].get("w1").await.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    writer.await.unwrap();
    let log = std::mem::take(&mut *log.lock().unwrap());
    let late: Vec<_> = log
        .iter()
        .filter(|(at, status, _)| *status == 200 && *at >= promoted)
        .collect();
    assert!(
        late.is_empty(),
        "{} writes acknowledged by the old primary after its successor was named",
        late.len()
    );
    let refused: Vec<_> = log.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(
        refused
            .iter()
            .any(|(_, s, code)| *s == 503 && code == "lease_expired"),
        "the lapsed lease is named in the refusals: {:?}",
        &refused[..refused.len().min(5)]
    );
    // The last write it took came before the promotion by a margin: its
    // lease ended before the coordinator could act.
    let last_ok = log
        .iter()
        .filter(|(_, s, _)| *s == 200)
        .map(|(at, ..)| *at)
        .max()
        .unwrap();
    eprintln!(
        "last write taken {:?} before the successor was seen; {} refused",
        promoted - last_ok,
        refused.len()
    );
    // Healed, it hears it was replaced and stops for good.
    p.agent_links[0].set(Link::Pass);
    eventually(
        Duration::from_secs(10),
        "the old primary is fenced",
        || async {
            let r = p.nodes[0].put("after", "x").await;
            r.status == 503 && r.json()["error"] == "fenced"
        },
    )
    .await;
}

#[tokio::test]
async fn a_primary_paused_past_its_lease_refuses_writes_when_it_resumes() {
    let p = Partition::start(&[ASYNC, ASYNC, ASYNC], false).await;
    let old = &p.nodes[0];
    assert_eq!(old.put("before", "x").await.status, 200);
    // A long pause (a GC, a stalled VM); its link to the coordinator stays
    // cut after it resumes, so nothing but its own lease can tell it.
    old.proc.signal("STOP");
    p.agent_links[0].set(Link::Cut);
    eventually(Duration::from_secs(10), "a successor is named", || async {
        primary_addr(&p).await != old.addr.to_string()
    })
    .await;
    old.proc.signal("CONT");
    let mut answers = Vec::new();
    for i in 0..30 {
        let r = old.put(&format!("resumed{i}"), "x").await;
        answers.push((r.status.as_u16(), r.json()["error"].clone()));
    }
    assert!(
        answers
            .iter()
            .all(|(s, e)| *s == 503 && e == "lease_expired"),
        "every write after the pause is refused for its lease: {answers:?}"
    );
    assert_eq!(old.get("before").await.status, 200, "reads go on");
    p.agent_links[0].set(Link::Pass);
    eventually(
        Duration::from_secs(10),
        "the old primary is fenced",
        || async {
            let r = old.put("after", "x").await;
            r.status == 503 && r.json()["error"] == "fenced"
        },
    )
    .await;
}
