//! Retries only where SPEC §3 allows them.

use crate::support::*;
use std::time::Duration;

async fn single(extra: &str) -> (Upstream, TestProxy) {
    let up = Upstream::start("primary").await;
    let proxy = TestProxy::start(&topology(1, &[(up.addr, vec![])]), extra).await;
    (up, proxy)
}

#[tokio::test]
async fn a_post_hit_by_a_reset_is_sent_exactly_once_and_answers_502() {
    let (up, proxy) = single("").await;
    up.script(vec![Behavior::Reset]);
    let a = send(
        &client(),
        keyed("POST", &proxy.url("/kv/a"), "a", "order-1"),
    )
    .await;
    a.assert_error(502, "upstream_failed");
    assert_eq!(a.json()["partition"], 0);
    assert_eq!(
        up.arrivals(),
        1,
        "a POST that reached the upstream is never replayed"
    );
}

#[tokio::test]
async fn a_post_on_a_pooled_connection_the_upstream_closed_goes_once_on_a_new_one() {
    let (up, proxy) = single("").await;
    assert_eq!(
        get_key(&client(), &proxy.url("/kv/a"), "a").await.status,
        200
    );
    eventually(Duration::from_secs(5), "the connection pooled", || async {
        admin_get(proxy.admin, "/admin/upstreams").await.json()["upstreams"][0]["idle_connections"]
            == 1
    })
    .await;
    up.close_connections().await;
    let a = send(
        &client(),
        keyed("POST", &proxy.url("/kv/a"), "a", "order-1"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(up.writes().len(), 1, "sent once");
    assert_eq!(
        up.connections_accepted(),
        2,
        "the closed connection was replaced, not written to"
    );
}

#[tokio::test]
async fn a_get_hit_by_a_reset_is_retried_to_a_200() {
    let (up, proxy) = single("").await;
    up.script(vec![Behavior::Reset]);
    let a = get_key(&client(), &proxy.url("/kv/a"), "a").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(up.arrivals(), 2);
}

#[tokio::test]
async fn a_put_is_retried_with_its_whole_body_replayed() {
    let (up, proxy) = single("").await;
    up.script(vec![Behavior::Reset]);
    let body = "x".repeat(10_000);
    let a = send(
        &client(),
        keyed("PUT", &proxy.url("/kv/a"), "a", body.clone()),
    )
    .await;
    assert_eq!(a.status, 200);
    let log = up.log();
    let last = log.last().unwrap();
    assert_eq!(last.body_len, 10_000);
    assert!(last.body_complete);
    assert_eq!(last.header("content-length"), Some("10000"));
}

#[tokio::test]
async fn a_put_larger_than_the_retry_buffer_is_not_retried() {
    let (up, proxy) = single("[retry]\nbuffer_bytes = 1024\n").await;
    up.script(vec![Behavior::Reset]);
    let a = send(
        &client(),
        keyed("PUT", &proxy.url("/kv/a"), "a", "y".repeat(50_000)),
    )
    .await;
    // hyper may read part of the body before the reset; either way one attempt only.
    a.assert_error(502, "upstream_failed");
    assert_eq!(up.arrivals(), 1);
}

#[tokio::test]
async fn gets_answered_503_are_retried_up_to_max_attempts_then_passed_through() {
    let (up, proxy) = single("[breaker]\nconsecutive_failures = 100\n").await;
    up.set(Behavior::Status(503));
    let a = get_key(&client(), &proxy.url("/kv/a"), "a").await;
    assert_eq!(a.status, 503);
    assert_eq!(
        a.text(),
        "primary",
        "the upstream's own answer is passed through"
    );
    assert_eq!(a.header("x-shardgate-error"), None);
    assert_eq!(up.requests(), 3);
}

#[tokio::test]
async fn posts_answered_503_are_not_retried() {
    let (up, proxy) = single("").await;
    up.set(Behavior::Status(503));
    let a = send(&client(), keyed("POST", &proxy.url("/kv/a"), "a", "v")).await;
    assert_eq!(a.status, 503);
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn retries_stop_at_max_attempts() {
    let (up, proxy) =
        single("[retry]\nmax_attempts = 5\n[breaker]\nconsecutive_failures = 100\n").await;
    up.set(Behavior::Reset);
    get_key(&client(), &proxy.url("/kv/a"), "a")
        .await
        .assert_error(502, "upstream_failed");
    assert_eq!(up.arrivals(), 5);
}

#[tokio::test]
async fn one_attempt_means_no_retry() {
    let (up, proxy) = single("[retry]\nmax_attempts = 1\n").await;
    up.script(vec![Behavior::Reset]);
    get_key(&client(), &proxy.url("/kv/a"), "a")
        .await
        .assert_error(502, "upstream_failed");
    assert_eq!(up.arrivals(), 1);
}
