//! Reads may fall back to replicas; writes never reach one.

use crate::support::*;

struct Cluster {
    primary: Upstream,
    replica: Upstream,
    proxy: TestProxy,
}

async fn one_partition(extra: &str) -> Cluster {
    let primary = Upstream::start("primary").await;
    let replica = Upstream::start("replica").await;
    let topo = topology(1, &[(primary.addr, vec![replica.addr])]);
    let proxy = TestProxy::start(&topo, extra).await;
    Cluster {
        primary,
        replica,
        proxy,
    }
}

async fn read(c: &Cluster, pref: Option<&str>) -> Answer {
    let mut req = http::Request::get(c.proxy.url("/kv/item")).header("x-shard-key", "item");
    if let Some(p) = pref {
        req = req.header("x-read-preference", p);
    }
    send(&client(), req.body(empty()).unwrap()).await
}

#[tokio::test]
async fn reads_fall_back_to_replica_when_primary_refuses() {
    let c = one_partition("").await;
    c.primary.refuse();
    for _ in 0..20 {
        let a = read(&c, None).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.text(), "replica");
    }
}

#[tokio::test]
async fn primary_preference_answers_primary_unavailable_when_primary_refuses() {
    let c = one_partition("").await;
    c.primary.refuse();
    let a = read(&c, Some("primary")).await;
    a.assert_error(503, "primary_unavailable");
    assert_eq!(a.json()["partition"], 0);
    assert_eq!(
        c.replica.requests(),
        0,
        "primary means the primary or an error"
    );
}

#[tokio::test]
async fn writes_answer_503_and_never_reach_a_replica_when_primary_refuses() {
    let c = one_partition("").await;
    c.primary.refuse();
    let client = client();
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for pref in ["primaryPreferred", "secondary", "nearest"] {
            let mut req = keyed(method, &c.proxy.url("/kv/item"), "item", "payload");
            req.headers_mut()
                .insert("x-read-preference", pref.parse().unwrap());
            let a = send(&client, req).await;
            a.assert_error(503, "primary_unavailable");
        }
    }
    assert!(c.replica.writes().is_empty(), "{:?}", c.replica.writes());
    assert_eq!(c.replica.requests(), 0);
}

#[tokio::test]
async fn writes_go_to_the_primary_whatever_the_read_preference() {
    let c = one_partition("[routing]\nread_preference = \"secondary\"\n").await;
    let a = send(
        &client(),
        keyed("POST", &c.proxy.url("/kv/item"), "item", "v"),
    )
    .await;
    assert_eq!(a.text(), "primary");
    assert_eq!(c.primary.writes().len(), 1);
    assert!(c.replica.writes().is_empty());
}

#[tokio::test]
async fn secondary_reads_use_replicas_only_and_secondary_preferred_falls_back() {
    let c = one_partition("").await;
    assert_eq!(read(&c, Some("secondary")).await.text(), "replica");
    assert_eq!(read(&c, Some("secondaryPreferred")).await.text(), "replica");
    c.replica.refuse();
    read(&c, Some("secondary"))
        .await
        .assert_error(503, "no_healthy_upstream");
    assert_eq!(read(&c, Some("secondaryPreferred")).await.text(), "primary");
}

#[tokio::test]
async fn secondary_read_of_a_partition_without_replicas_is_refused_at_once() {
    let primary = Upstream::start("primary").await;
    let proxy = TestProxy::start(&topology(1, &[(primary.addr, vec![])]), "").await;
    let req = http::Request::get(proxy.url("/kv/a"))
        .header("x-read-preference", "secondary")
        .body(empty())
        .unwrap();
    send(&client(), req)
        .await
        .assert_error(503, "no_healthy_upstream");
    assert_eq!(primary.requests(), 0);
}

#[tokio::test]
async fn nearest_reads_go_to_the_faster_node_and_survive_it_refusing() {
    let c = one_partition("").await;
    // The replica answers 200 ms late: once either node has answered, the
    // latency estimates put the primary first.
    c.replica
        .set(Behavior::Slow(std::time::Duration::from_millis(200)));
    let mut primary = 0;
    for _ in 0..40 {
        let a = read(&c, Some("nearest")).await;
        assert_eq!(a.status, 200);
        if a.text() == "primary" {
            primary += 1;
        }
    }
    // New nodes start with an equal, optimistic estimate, so the first read
    // or two may try the slow one; after that it costs more.
    assert!(primary >= 36, "the faster node served {primary} of 40");
    c.primary.refuse();
    for _ in 0..10 {
        assert_eq!(read(&c, Some("nearest")).await.text(), "replica");
    }
}

#[tokio::test]
async fn an_unknown_read_preference_is_a_400() {
    let c = one_partition("").await;
    read(&c, Some("closest"))
        .await
        .assert_error(400, "invalid_read_preference");
}

#[tokio::test]
async fn the_override_header_is_ignored_when_disabled() {
    let c = one_partition(
        "[routing]\nallow_read_preference_override = false\nread_preference = \"primary\"\n",
    )
    .await;
    assert_eq!(read(&c, Some("secondary")).await.text(), "primary");
}
