//! Keys land on the partition whose range holds their hash.

use crate::support::*;
use std::collections::HashMap;
use std::sync::Arc;

/// The partition owning `key` by an implementation independent of shardgate's:
/// twox-hash's XXH3 and a linear scan of the ranges.
fn expected_partition(key: &str, bounds: &[(u32, u32)]) -> usize {
    let pos = (twox_hash::XxHash3_64::oneshot(key.as_bytes()) >> 32) as u32;
    bounds
        .iter()
        .position(|&(s, e)| s <= pos && pos <= e)
        .expect("ranges cover the ring")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keys_land_on_the_partition_owning_their_hash() {
    let ups = [
        Upstream::start("p0").await,
        Upstream::start("p1").await,
        Upstream::start("p2").await,
        Upstream::start("p3").await,
    ];
    let topo = topology(1, &ups.iter().map(|u| (u.addr, vec![])).collect::<Vec<_>>());
    let doc: serde_json::Value = serde_json::from_str(&topo).unwrap();
    let bounds: Vec<(u32, u32)> = doc["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let b = |f: &str| u32::from_str_radix(p[f].as_str().unwrap(), 16).unwrap();
            (b("hashRangeStart"), b("hashRangeEnd"))
        })
        .collect();
    let proxy = TestProxy::start(&topo, "").await;
    let client = client();
    let url = Arc::new(proxy.url("/item"));

    let keys: Vec<String> = (0..10_000)
        .map(|i| format!("user-{i}-{}", i * 7919))
        .collect();
    let mut answered: HashMap<String, String> = HashMap::new();
    for chunk in keys.chunks(200) {
        let mut set = tokio::task::JoinSet::new();
        for k in chunk {
            let (c, u, k) = (client.clone(), url.clone(), k.clone());
            set.spawn(async move {
                let a = get_key(&c, &u, &k).await;
                assert_eq!(a.status, 200, "{}", a.text());
                (
                    k,
                    a.text(),
                    a.header("x-shardgate-partition").unwrap().to_owned(),
                )
            });
        }
        while let Some(r) = set.join_next().await {
            let (k, served_by, partition_header) = r.unwrap();
            assert_eq!(format!("p{partition_header}"), served_by);
            answered.insert(k, served_by);
        }
    }
    for k in &keys {
        let want = format!("p{}", expected_partition(k, &bounds));
        assert_eq!(answered[k], want, "key {k}");
    }
    // Every upstream saw exactly its keys, and nothing else.
    for (i, u) in ups.iter().enumerate() {
        let seen = u.log().len();
        let want = keys
            .iter()
            .filter(|k| expected_partition(k, &bounds) == i)
            .count();
        assert_eq!(seen, want, "upstream p{i}");
    }
}

#[tokio::test]
async fn path_and_query_keys_route_like_the_header_key() {
    let ups = [Upstream::start("p0").await, Upstream::start("p1").await];
    let topo = topology(1, &ups.iter().map(|u| (u.addr, vec![])).collect::<Vec<_>>());
    let proxy = TestProxy::start(&topo, "").await;
    let c = client();
    for key in ["alpha", "beta", "gamma", "delta", "a/b c"] {
        let by_header = get_key(&c, &proxy.url("/x"), key).await.text();
        let encoded = key.replace('/', "%2F").replace(' ', "%20");
        let by_path = send(
            &c,
            http::Request::get(proxy.url(&format!("/kv/{encoded}")))
                .body(empty())
                .unwrap(),
        )
        .await;
        let by_query = send(
            &c,
            http::Request::get(proxy.url(&format!("/x?key={encoded}")))
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(by_path.text(), by_header, "path key {key}");
        assert_eq!(by_query.text(), by_header, "query key {key}");
    }
}

#[tokio::test]
async fn keyless_requests_go_to_the_configured_partition() {
    let ups = [Upstream::start("p0").await, Upstream::start("p1").await];
    let topo = topology(1, &ups.iter().map(|u| (u.addr, vec![])).collect::<Vec<_>>());
    let proxy = TestProxy::start(&topo, "[routing]\nkeyless_partition = 1\n").await;
    let a = send(
        &client(),
        http::Request::get(proxy.url("/no-key"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.text(), "p1");
    assert_eq!(a.header("x-shardgate-partition"), Some("1"));
}

#[tokio::test]
async fn http2_cleartext_clients_are_routed_too() {
    let ups = [Upstream::start("p0").await, Upstream::start("p1").await];
    let topo = topology(1, &ups.iter().map(|u| (u.addr, vec![])).collect::<Vec<_>>());
    let proxy = TestProxy::start(&topo, "").await;
    let h1 = get_key(&client(), &proxy.url("/x"), "some-key").await;
    let h2 = get_key(&h2_client(), &proxy.url("/x"), "some-key").await;
    assert_eq!(h2.status, 200);
    assert_eq!(h2.text(), h1.text());
    // The upstream always speaks HTTP/1.1 with exactly one Host.
    let last = ups.iter().flat_map(|u| u.log()).last().unwrap();
    assert_eq!(last.version, http::Version::HTTP_11);
    assert_eq!(last.headers.get_all("host").iter().count(), 1);
}
