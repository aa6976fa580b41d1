//! What operators see: every SPEC §5 metric, bounded cardinality, promtool
//! validity, and the sampled access log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod otlp;
#[path = "../support/mod.rs"]
mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

/// Run `promtool check <what>` with `input` on stdin (or a path argument).
fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: scripts/test installs Debian's prometheus package");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn series(exposition: &str) -> Vec<&str> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.rsplit_once(' ').map_or(l, |(name, _)| name))
        .collect()
}

fn value(exposition: &str, series_name: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.rsplit_once(' ').is_some_and(|(n, _)| n == series_name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn every_spec_metric_appears_and_moves_as_it_should() {
    let primary = Upstream::start("primary").await;
    let replica = Upstream::start("replica").await;
    let proxy = TestProxy::start(
        &topology(3, &[(primary.addr, vec![replica.addr])]),
        "[breaker]\nconsecutive_failures = 5\nmin_open = \"30s\"\n[limits]\nmax_inflight = 50\n",
    )
    .await;
    let c = client();
    let url = proxy.url("/kv/a");

    // Plain traffic; a GET whose primary resets fails over to the replica;
    // then the primary answers 503 until its breaker opens (the reset was
    // its first failure, four 503s make five).
    for _ in 0..20 {
        get_key(&c, &url, "a").await;
    }
    primary.script(vec![Behavior::Reset]);
    let retried = get_key(&c, &url, "a").await;
    assert_eq!(retried.status, 200);
    primary.set(Behavior::Status(503));
    for _ in 0..10 {
        get_key(&c, &url, "a").await;
    }
    send(
        &c,
        http::Request::get(proxy.url("/no-key"))
            .body(empty())
            .unwrap(),
    )
    .await;

    let m = admin_get(proxy.admin, "/metrics").await.text();
    for name in [
        "shardgate_requests_total",
        "shardgate_request_duration_seconds_bucket",
        "shardgate_upstream_attempts_total",
        "shardgate_retries_total",
        "shardgate_retry_budget_exhausted_total",
        "shardgate_breaker_state",
        "shardgate_breaker_transitions_total",
        "shardgate_topology_epoch",
        "shardgate_topology_updates_total",
        "shardgate_topology_age_seconds",
        "shardgate_inflight_requests",
        "shardgate_downstream_connections",
        "shardgate_load_shed_total",
    ] {
        assert!(
            m.lines().any(|l| l.starts_with(name)),
            "{name} missing:\n{m}"
        );
    }
    let p = primary.addr.to_string();
    assert_eq!(
        value(&m, &format!("shardgate_breaker_state{{upstream=\"{p}\"}}")),
        Some(2.0)
    );
    assert_eq!(
        value(
            &m,
            &format!("shardgate_breaker_transitions_total{{upstream=\"{p}\",to=\"open\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            &format!(
                "shardgate_upstream_attempts_total{{upstream=\"{p}\",outcome=\"failure_status\"}}"
            )
        ),
        Some(4.0)
    );
    assert_eq!(
        value(
            &m,
            &format!(
                "shardgate_upstream_attempts_total{{upstream=\"{p}\",outcome=\"send_error\"}}"
            )
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            r#"shardgate_retries_total{partition="0",reason="failover"}"#
        ),
        Some(5.0),
        "each failure failed over to the replica once"
    );
    assert_eq!(
        value(
            &m,
            r#"shardgate_requests_total{partition="0",class="read",code="2xx",served_by="primary"}"#
        ),
        Some(20.0)
    );
    assert_eq!(
        value(
            &m,
            r#"shardgate_requests_total{partition="0",class="read",code="2xx",served_by="replica"}"#
        ),
        Some(11.0)
    );
    assert_eq!(
        value(
            &m,
            r#"shardgate_requests_total{partition="none",class="read",code="4xx",served_by="proxy"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            r#"shardgate_request_duration_seconds_count{partition="0",class="read"}"#
        ),
        Some(31.0)
    );
    assert!(
        m.contains(
            r#"shardgate_request_duration_seconds_bucket{partition="0",class="read",le="0.0001"}"#
        ),
        "latency buckets from 100 µs"
    );
    assert!(m.contains(r#"le="10"}"#), "latency buckets up to 10 s");
    assert_eq!(value(&m, "shardgate_topology_epoch"), Some(3.0));
    assert_eq!(
        value(&m, r#"shardgate_topology_updates_total{result="applied"}"#),
        Some(1.0)
    );
    assert_eq!(value(&m, "shardgate_inflight_requests"), Some(0.0));

    // The epoch gauge follows a swap.
    std::fs::write(
        proxy.topology_path(),
        topology(4, &[(replica.addr, vec![])]),
    )
    .unwrap();
    proxy
        .proxy()
        .load_topology_file(&proxy.topology_path())
        .unwrap();
    let m = admin_get(proxy.admin, "/metrics").await.text();
    assert_eq!(value(&m, "shardgate_topology_epoch"), Some(4.0));
    assert_eq!(
        value(&m, r#"shardgate_topology_updates_total{result="applied"}"#),
        Some(2.0)
    );

    let (ok, out) = promtool(&["check", "metrics"], Some(&m));
    assert!(ok, "promtool check metrics:\n{out}");
}

#[tokio::test]
async fn ten_thousand_distinct_keys_add_no_series() {
    let ups = [Upstream::start("p0").await, Upstream::start("p1").await];
    let proxy = TestProxy::start(
        &topology(1, &[(ups[0].addr, vec![]), (ups[1].addr, vec![])]),
        "",
    )
    .await;
    let c = client();
    // Warm every series the traffic below can touch: reads and writes, both partitions.
    for k in ["w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7"] {
        get_key(&c, &proxy.url("/kv/x"), k).await;
        send(&c, keyed("PUT", &proxy.url("/kv/x"), k, "v")).await;
    }
    let before = series(&admin_get(proxy.admin, "/metrics").await.text()).len();
    let url = std::sync::Arc::new(proxy.url("/kv/x"));
    for chunk in 0..50 {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..200 {
            let (c, url) = (c.clone(), url.clone());
            set.spawn(async move {
                let key = format!("distinct-{chunk}-{i}");
                if i % 2 == 0 {
                    get_key(&c, &url, &key).await
                } else {
                    send(&c, keyed("PUT", &url, &key, "v")).await
                }
            });
        }
        while set.join_next().await.is_some() {}
    }
    let after = admin_get(proxy.admin, "/metrics").await.text();
    assert_eq!(series(&after).len(), before, "keys leaked into labels");
    assert!(
        !after.contains("distinct-"),
        "a key appears in the exposition"
    );
}

#[tokio::test]
async fn the_deploy_rules_and_scrape_config_pass_promtool() {
    let root = env!("CARGO_MANIFEST_DIR");
    let (ok, out) = promtool(
        &[
            "check",
            "rules",
            &format!("{root}/deploy/prometheus/alerts.yml"),
        ],
        None,
    );
    assert!(ok, "{out}");
    assert!(out.contains("9 rules found"), "{out}");
    // The rules fire when they should, on series shaped like the real ones.
    let (ok, out) = promtool(
        &[
            "test",
            "rules",
            &format!("{root}/deploy/prometheus/alerts_test.yml"),
        ],
        None,
    );
    assert!(ok && out.contains("SUCCESS"), "{out}");
    let (ok, out) = promtool(
        &[
            "check",
            "config",
            &format!("{root}/deploy/prometheus/prometheus.yml"),
        ],
        None,
    );
    assert!(ok, "{out}");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/grafana/shardgate.json")).unwrap(),
    )
    .unwrap();
    // Every metric a dashboard panel or alert uses exists in shardgate's code.
    let names = std::fs::read_to_string(format!("{root}/src/telemetry/registry.rs")).unwrap();
    let alerts = std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml")).unwrap();
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["expr"].as_str().unwrap().to_owned())
        })
        .collect();
    exprs.push(alerts);
    for expr in exprs {
        for word in expr.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
            if let Some(base) = word.strip_prefix("shardgate_") {
                let base = base.trim_end_matches("_bucket");
                assert!(
                    names.contains(&format!("\"shardgate_{base}\"")),
                    "unknown metric shardgate_{base}"
                );
            }
        }
    }
}

#[tokio::test]
async fn the_coordinator_exports_its_metrics_and_they_pass_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let topo = dir.path().join("map.json");
    std::fs::write(
        &topo,
        topology(
            1,
            &[(
                "127.0.0.10:9000".parse().unwrap(),
                vec!["127.0.0.11:9000".parse().unwrap()],
            )],
        ),
    )
    .unwrap();
    let store = format!("file:{}", dir.path().join("state.json").display());
    let coord = BinCoordinator::spawn(&[
        "--topology",
        topo.to_str().unwrap(),
        "--store",
        &store,
        "--heartbeat-timeout",
        "1",
        "--sweep-interval",
        "0.1",
    ])
    .await;
    let mut grpc = coord.grpc_client().await;
    grpc.report_heartbeat(heartbeat_req("p", "127.0.0.10:9000", unix_ms()))
        .await
        .unwrap();
    grpc.report_heartbeat(heartbeat_req("", "127.0.0.10:9000", unix_ms()))
        .await
        .unwrap_err();
    // Only the replica keeps beating: the primary dies and is replaced.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while coord.epoch().await != 2 {
        assert!(tokio::time::Instant::now() < deadline, "no failover");
        grpc.report_heartbeat(heartbeat_req("r", "127.0.0.11:9000", unix_ms()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let m = send(
        &client(),
        http::Request::get(coord.url("/metrics"))
            .body(empty())
            .unwrap(),
    )
    .await
    .text();
    assert_eq!(value(&m, "shardgate_coordinator_is_leader"), Some(1.0));
    assert_eq!(
        value(
            &m,
            r#"shardgate_coordinator_failovers_total{partition="0"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&m, r#"shardgate_coordinator_nodes{status="DEAD"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(&m, r#"shardgate_coordinator_nodes{status="ACTIVE"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            r#"shardgate_coordinator_heartbeats_total{result="invalid"}"#
        ),
        Some(1.0)
    );
    assert!(value(&m, r#"shardgate_coordinator_heartbeats_total{result="ok"}"#).unwrap() >= 2.0);
    assert!(m.contains(r#"shardgate_coordinator_node_clock_skew_seconds{node="r"}"#));
    let (ok, out) = promtool(&["check", "metrics"], Some(&m));
    assert!(ok, "promtool check metrics:\n{out}");
}

#[tokio::test]
async fn the_access_log_keeps_every_error_and_about_the_configured_share_of_successes() {
    let up = Upstream::start("p").await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = BinProxy::in_front_of(
        &binary(),
        dir.path(),
        up.addr,
        "[log]\nformat = \"json\"\naccess_log_sample = 0.1\n",
    )
    .await;
    let c = client();
    let url = format!("http://{}/kv/a", proxy.addr);
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for _ in 0..2000 {
        get_key(&c, &url, "a").await;
    }
    for _ in 0..50 {
        send(
            &c,
            http::Request::get(format!("http://{}/none", proxy.addr))
                .header("traceparent", trace)
                .body(empty())
                .unwrap(),
        )
        .await;
    }
    // Proxy-side 5xx: the upstream is gone.
    up.refuse();
    for _ in 0..10 {
        get_key(&c, &url, "a").await;
    }
    eventually(Duration::from_secs(5), "access log flushed", || async {
        proxy
            .stderr()
            .lines()
            .filter(|l| l.contains("\"status\":503"))
            .count()
            == 10
    })
    .await;
    let lines: Vec<serde_json::Value> = proxy
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "shardgate::access")
        .collect();
    let successes = lines.iter().filter(|v| v["status"] == 200).count();
    let errors: Vec<_> = lines.iter().filter(|v| v["status"] != 200).collect();
    assert_eq!(errors.len(), 60, "every error is logged");
    // 10% of 2000: binomial, standard deviation ~13.4; allow five of them.
    assert!(
        (133..=267).contains(&successes),
        "{successes} of 2000 successes logged at a 10% sample"
    );
    let e = errors
        .iter()
        .find(|v| v["error"] == "missing_shard_key")
        .unwrap();
    assert_eq!(
        e["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "the client's trace continues: {e}"
    );
    let u = lines.iter().find(|v| v["status"] == 200).unwrap();
    for field in [
        "partition",
        "upstream",
        "attempts",
        "duration_ms",
        "trace_id",
        "method",
    ] {
        assert!(u.get(field).is_some(), "access log lacks {field}: {u}");
    }
}
