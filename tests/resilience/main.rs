//! Breakers, retry budget, load shedding and deadlines against upstreams that
//! really misbehave, and a seeded chaos run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;
use support::*;
use tokio::time::Instant;

/// Breakers that trip after 5 failures and stay open `min_open`; no ratio trigger.
fn breaker_config(min_open: &str) -> String {
    format!(
        "[breaker]\nconsecutive_failures = 5\nfailure_ratio = 2.0\nmin_open = \"{min_open}\"\nmax_open = \"30s\"\nhalf_open_probes = 1\n"
    )
}

async fn pair(extra: &str) -> (Upstream, Upstream, TestProxy) {
    let primary = Upstream::start("primary").await;
    let replica = Upstream::start("replica").await;
    let proxy = TestProxy::start(&topology(1, &[(primary.addr, vec![replica.addr])]), extra).await;
    (primary, replica, proxy)
}

#[tokio::test]
async fn a_primary_answering_503_is_cut_off_and_reads_keep_answering_from_the_replica() {
    let (primary, replica, proxy) = pair(&breaker_config("30s")).await;
    primary.set(Behavior::Status(503));
    let c = client();
    for _ in 0..100 {
        let a = get_key(&c, &proxy.url("/kv/a"), "a").await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.text(), "replica");
    }
    assert_eq!(
        primary.requests(),
        5,
        "only the failures that opened the breaker reached it"
    );
    assert_eq!(replica.requests(), 100);
    let m = admin_get(proxy.admin, "/metrics").await.text();
    let gauge = format!("shardgate_breaker_state{{upstream=\"{}\"}} 2", primary.addr);
    assert!(m.contains(&gauge), "{m}");
}

#[tokio::test]
async fn a_primary_saying_it_may_not_take_writes_yet_keeps_its_breaker_closed() {
    // A just-promoted node answers `503 not_primary` until it hears its new
    // role: alive, answering, and about to take writes. Its breaker must not
    // open, or it would be shut out for the whole cool-down.
    let (primary, _replica, proxy) = pair(&breaker_config("30s")).await;
    primary.set(Behavior::Respond {
        status: 503,
        headers: vec![
            ("x-shardgate-error", "not_primary"),
            ("content-type", "application/json"),
        ],
        body: "{\"error\":\"not_primary\",\"message\":\"not yet\",\"partition\":0}",
    });
    let c = client();
    for _ in 0..10 {
        let a = send(&c, keyed("PUT", &proxy.url("/kv/a"), "a", "v")).await;
        assert_eq!(a.status, 503);
        assert_eq!(a.header("x-shardgate-error"), Some("not_primary"));
    }
    primary.set(Behavior::Ok);
    let a = send(&c, keyed("PUT", &proxy.url("/kv/a"), "a", "v")).await;
    assert_eq!(a.status, 200, "{}", a.text());
    // A plain 503 still counts against it.
    primary.set(Behavior::Status(503));
    for _ in 0..5 {
        send(&c, keyed("PUT", &proxy.url("/kv/a"), "a", "v")).await;
    }
    let after = primary.requests();
    send(&c, keyed("PUT", &proxy.url("/kv/a"), "a", "v"))
        .await
        .assert_error(503, "primary_unavailable");
    assert_eq!(primary.requests(), after, "open now: nothing sent");
}

#[tokio::test]
async fn the_breaker_closes_again_once_the_primary_heals() {
    let (primary, _replica, proxy) = pair(&breaker_config("300ms")).await;
    primary.set(Behavior::Status(503));
    let c = client();
    for _ in 0..10 {
        get_key(&c, &proxy.url("/kv/a"), "a").await;
    }
    assert_eq!(primary.requests(), 5);
    primary.set(Behavior::Ok);
    // After the cool-down one probe goes through, succeeds, and closes it.
    eventually(
        Duration::from_secs(10),
        "the primary serves reads again",
        || async { get_key(&c, &proxy.url("/kv/a"), "a").await.text() == "primary" },
    )
    .await;
    for _ in 0..10 {
        assert_eq!(
            get_key(&c, &proxy.url("/kv/a"), "a").await.text(),
            "primary"
        );
    }
    let upstreams = admin_get(proxy.admin, "/admin/upstreams").await.json();
    let p = upstreams["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["address"] == primary.addr.to_string())
        .unwrap()
        .clone();
    assert_eq!(p["breaker"], "closed");
}

#[tokio::test]
async fn writes_to_a_hanging_primary_are_bounded_by_the_deadline_then_fail_fast_once_open() {
    let extra = format!(
        "{}[timeouts]\nper_try = \"400ms\"\noverall = \"400ms\"\n",
        breaker_config("30s")
    );
    let (primary, replica, proxy) = pair(&extra).await;
    primary.set(Behavior::Hang);
    let c = client();
    for _ in 0..5 {
        let started = Instant::now();
        let a = send(&c, keyed("POST", &proxy.url("/kv/a"), "a", "v")).await;
        a.assert_error(504, "upstream_timeout");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "bounded by the deadline"
        );
    }
    // The breaker is open now: no network wait at all. The typical refusal is
    // well under a tenth of a second; none may come near the 400 ms deadline a
    // network wait would cost (a loaded machine may delay a single one).
    let mut took = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let a = send(&c, keyed("POST", &proxy.url("/kv/a"), "a", "v")).await;
        took.push(started.elapsed());
        a.assert_error(503, "primary_unavailable");
    }
    took.sort();
    assert!(took[10] < Duration::from_millis(100), "median of {took:?}");
    assert!(took[19] < Duration::from_millis(400), "slowest of {took:?}");
    assert_eq!(primary.arrivals(), 5, "no request reached the open primary");
    assert!(replica.writes().is_empty());
}

#[tokio::test]
async fn a_503_storm_on_both_owners_stays_within_the_retry_budget() {
    // No breakers, so only the budget limits retries; a floor of 1/s over 10 s.
    let extra = "[breaker]\nconsecutive_failures = 0\nfailure_ratio = 2.0\n\
                 [retry]\nmax_attempts = 3\nbase_delay = \"1ms\"\nmax_delay = \"2ms\"\n\
                 budget_ratio = 0.2\nbudget_window = \"10s\"\nbudget_min_per_second = 1\n";
    let (primary, replica, proxy) = pair(extra).await;
    primary.set(Behavior::Status(503));
    replica.set(Behavior::Status(503));
    let c = client();
    let requests = 300;
    for _ in 0..requests {
        assert_eq!(get_key(&c, &proxy.url("/kv/a"), "a").await.status, 503);
    }
    let attempts = primary.requests() + replica.requests();
    let allowed = (1.2 * requests as f64) as usize + 10;
    assert!(
        attempts <= allowed,
        "{attempts} attempts for {requests} requests (allowed {allowed})"
    );
    assert!(attempts > requests, "some retries were made");
    assert!(metric(proxy.admin, "shardgate_retry_budget_exhausted_total").await > 0.0);
}

#[tokio::test]
async fn a_flapping_upstream_does_not_move_the_breaker_faster_than_its_minimum_open_time() {
    let (primary, _replica, proxy) = pair(&breaker_config("500ms")).await;
    // Flap every 100 ms between failing and healthy, for 3 s.
    let flapper = {
        let up = std::sync::Arc::new(primary);
        let u = up.clone();
        let task = tokio::spawn(async move {
            for i in 0..30 {
                u.set(if i % 2 == 0 {
                    Behavior::Status(503)
                } else {
                    Behavior::Ok
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        (up, task)
    };
    let c = client();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        get_key(&c, &proxy.url("/kv/a"), "a").await;
    }
    flapper.1.await.unwrap();
    let opens = metric(
        proxy.admin,
        &format!(
            "shardgate_breaker_transitions_total{{upstream=\"{}\",to=\"open\"}}",
            flapper.0.addr
        ),
    )
    .await;
    assert!(opens >= 1.0, "the breaker tripped at least once");
    // Each open period lasts at least 500 ms: at most 3 s / 500 ms + 1 opens.
    assert!(opens <= 7.0, "{opens} opens in 3 s");
}

#[tokio::test]
async fn every_node_open_fails_fast_or_fails_open_as_configured() {
    let (primary, replica, proxy) = pair(&breaker_config("30s")).await;
    primary.set(Behavior::Status(503));
    replica.set(Behavior::Status(503));
    let c = client();
    for _ in 0..10 {
        get_key(&c, &proxy.url("/kv/a"), "a").await;
    }
    let before = primary.requests() + replica.requests();
    get_key(&c, &proxy.url("/kv/a"), "a")
        .await
        .assert_error(503, "no_healthy_upstream");
    assert_eq!(
        primary.requests() + replica.requests(),
        before,
        "fail fast: nothing sent"
    );
    assert!(
        metric(
            proxy.admin,
            r#"shardgate_load_shed_total{reason="breaker_open"}"#
        )
        .await
            >= 1.0
    );

    let extra = format!("{}when_all_open = \"fail_open\"\n", breaker_config("30s"));
    let (primary, replica, proxy) = pair(&extra).await;
    primary.set(Behavior::Status(503));
    replica.set(Behavior::Status(503));
    for _ in 0..10 {
        get_key(&c, &proxy.url("/kv/a"), "a").await;
    }
    let before = primary.requests() + replica.requests();
    primary.set(Behavior::Ok);
    replica.set(Behavior::Ok);
    let a = get_key(&c, &proxy.url("/kv/a"), "a").await;
    assert_eq!(a.status, 200, "fail open reaches the least-bad node");
    assert!(primary.requests() + replica.requests() > before);
    assert!(metric(proxy.admin, "shardgate_breaker_fail_open_total").await >= 1.0);
}

#[tokio::test]
async fn requests_beyond_the_per_upstream_limit_get_503_overloaded_at_once() {
    let (primary, _replica, proxy) =
        pair("[limits]\nmax_inflight_per_upstream = 2\n[routing]\nread_preference = \"primary\"\n")
            .await;
    primary.set(Behavior::Hang);
    let url = proxy.url("/kv/a");
    let hung = requests_in_flight(&url, "a", 2);
    eventually(
        Duration::from_secs(5),
        "two requests in flight upstream",
        || async { primary.arrivals() == 2 },
    )
    .await;
    let started = Instant::now();
    get_key(&client(), &url, "a")
        .await
        .assert_error(503, "overloaded");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(primary.arrivals(), 2);
    for h in hung {
        h.abort();
    }
}

#[tokio::test]
async fn upstream_work_is_cancelled_when_the_client_goes_away() {
    let (primary, _replica, proxy) = pair("[routing]\nread_preference = \"primary\"\n").await;
    primary.set(Behavior::Hang);
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /kv/a HTTP/1.1\r\nhost: a\r\nx-shard-key: a\r\n\r\n")
        .await
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "request reached the upstream",
        || async { primary.arrivals() == 1 },
    )
    .await;
    drop(s);
    eventually(
        Duration::from_secs(5),
        "the upstream saw the request abandoned",
        || async { primary.cancelled() == 1 },
    )
    .await;
}

#[tokio::test]
async fn nearest_prefers_the_faster_node() {
    let (primary, replica, proxy) = pair("[routing]\nread_preference = \"nearest\"\n").await;
    primary.set(Behavior::Slow(Duration::from_millis(40)));
    let c = client();
    // Warm both estimates, then count where reads land.
    for _ in 0..20 {
        get_key(&c, &proxy.url("/kv/a"), "a").await;
    }
    primary.clear_log();
    replica.clear_log();
    for _ in 0..100 {
        assert_eq!(get_key(&c, &proxy.url("/kv/a"), "a").await.status, 200);
    }
    assert!(
        replica.requests() >= 80,
        "fast replica {} vs slow primary {}",
        replica.requests(),
        primary.requests()
    );
}

/// Random kills and restarts under mixed load, seeded and bounded: no write
/// at a replica, no non-idempotent request twice, every answer accounted for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_random_kills_and_restarts_keeps_every_promise() {
    use rand::{RngExt, SeedableRng};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED);
    let seconds: u64 = std::env::var("CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let nodes: Vec<Arc<Upstream>> = {
        let mut v = Vec::new();
        for name in ["p0-primary", "p0-replica", "p1-primary", "p1-replica"] {
            v.push(Arc::new(Upstream::start(name).await));
        }
        v
    };
    let map = topology(
        1,
        &[
            (nodes[0].addr, vec![nodes[1].addr]),
            (nodes[2].addr, vec![nodes[3].addr]),
        ],
    );
    let proxy = TestProxy::start(
        &map,
        "[breaker]\nmin_open = \"300ms\"\nmax_open = \"2s\"\n[timeouts]\nconnect = \"200ms\"\nper_try = \"1s\"\noverall = \"2s\"\n",
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let unexplained = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let answered = Arc::new(AtomicU64::new(0));
    let mut load = tokio::task::JoinSet::new();
    for w in 0..6u64 {
        let (stop, bad, answered, url) = (
            stop.clone(),
            unexplained.clone(),
            answered.clone(),
            proxy.url("/kv/"),
        );
        load.spawn(async move {
            let c = client();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 200_000 {
                n += 1;
                let key = format!("k{}", (w * 7 + n) % 50);
                let method =
                    ["GET", "GET", "POST", "PUT", "DELETE", "GET"][(w as usize + n as usize) % 6];
                let mut req = keyed(
                    method,
                    &format!("{url}{key}"),
                    &key,
                    format!("body-{w}-{n}"),
                );
                req.headers_mut()
                    .insert("x-request-id", format!("{w}-{n}").parse().unwrap());
                let Ok(Ok(resp)) =
                    tokio::time::timeout(Duration::from_secs(10), c.request(req)).await
                else {
                    bad.lock().unwrap().push(format!("{method} no answer"));
                    continue;
                };
                answered.fetch_add(1, Ordering::Relaxed);
                let from_upstream = resp.headers().contains_key("x-upstream");
                let proxy_error = resp.headers().contains_key("x-shardgate-error");
                use http_body_util::BodyExt;
                let status = resp.status();
                let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                let ok = match (from_upstream, proxy_error, &body) {
                    (true, false, Ok(_)) => true,
                    (false, true, Ok(b)) => serde_json::from_slice::<serde_json::Value>(b)
                        .is_ok_and(|v| {
                            v["error"].is_string()
                                && v["message"].is_string()
                                && v.get("partition").is_some()
                        }),
                    _ => false,
                };
                if !ok {
                    bad.lock()
                        .unwrap()
                        .push(format!("{method} {status} {body:?}"));
                }
            }
        });
    }

    // Kill and restart nodes at random, never all of a partition for long.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let until = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < until {
        let victim = rng.random_range(0..nodes.len());
        nodes[victim].refuse();
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
        nodes[victim].resume();
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
    }
    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}

    let unexplained = unexplained.lock().unwrap();
    assert!(
        unexplained.is_empty(),
        "answers that are neither the upstream's nor a SPEC error: {:?}",
        &unexplained[..unexplained.len().min(5)]
    );
    for replica in [&nodes[1], &nodes[3]] {
        assert!(
            replica.writes().is_empty(),
            "a write reached replica {}",
            replica.name()
        );
    }
    let mut seen = std::collections::HashMap::new();
    for node in &nodes {
        for r in node.log().iter().filter(|r| r.method == http::Method::POST) {
            let id = r.header("x-request-id").unwrap().to_owned();
            *seen.entry(id).or_insert(0) += 1;
        }
    }
    let duplicated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicated.is_empty(),
        "POSTs delivered twice: {duplicated:?}"
    );
    eprintln!(
        "chaos seed {seed}: {} answered over {seconds}s, {} POSTs delivered once each",
        answered.load(Ordering::Relaxed),
        seen.len()
    );
}
