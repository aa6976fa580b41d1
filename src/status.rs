//! `shardgate status`: a cluster's state in a terminal, as `kubectl get` or
//! HAProxy's `show stat` print theirs. It reads the same JSON the status
//! pages and scripts read (the coordinator's `/v1/cluster/*`, the proxy's
//! `/admin/*`) and prints tables, or that JSON with `--json`.

use serde_json::{Value, json};
use std::fmt::Write as _;
use std::time::Duration;

/// Why a status could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StatusError {
    /// The URL is not a plain `http://host:port` one.
    #[error("{0:?}: expected http://HOST:PORT")]
    Url(String),
    /// The request failed or timed out.
    #[error("{url}: {why}")]
    Fetch { url: String, why: String },
}

/// GET `base` + `path` as JSON, within five seconds.
async fn get(base: &str, path: &str) -> Result<Value, StatusError> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let uri: http::Uri = url.parse().map_err(|_| StatusError::Url(base.to_owned()))?;
    let fail = |why: String| StatusError::Fetch {
        url: url.clone(),
        why,
    };
    let (status, body) = shardgate::fetch::get(&uri, 64 << 20, Duration::from_secs(5))
        .await
        .map_err(|e| match e {
            shardgate::fetch::FetchError::Url => StatusError::Url(base.to_owned()),
            e => fail(e.to_string()),
        })?;
    if !status.is_success() {
        return Err(fail(format!("answered {status}")));
    }
    serde_json::from_slice(&body).map_err(|e| fail(format!("not JSON: {e}")))
}

/// What a coordinator knows: its map, its nodes, replication.
pub(crate) async fn coordinator(base: &str) -> Result<Value, StatusError> {
    Ok(json!({
        "topology": get(base, "/v1/cluster/topology").await?,
        "nodes": get(base, "/v1/cluster/nodes").await?["nodes"],
        "replication": get(base, "/v1/cluster/replication").await?["replication"],
    }))
}

/// What a proxy believes: its map and its upstreams.
pub(crate) async fn proxy(base: &str) -> Result<Value, StatusError> {
    Ok(json!({
        "topology": get(base, "/admin/topology").await?,
        "upstreams": get(base, "/admin/upstreams").await?["upstreams"],
    }))
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Where each address sits in `map`: "P0 primary", "P0 replica".
fn placement(map: &Value, addr: &str) -> String {
    for p in map["partitions"].as_array().into_iter().flatten() {
        if p["primaryNodeIp"] == addr {
            return format!("P{} primary", text(&p["partitionIndex"]));
        }
        if p["replicaNodeIps"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x == addr))
        {
            return format!("P{} replica", text(&p["partitionIndex"]));
        }
    }
    "-".into()
}

/// The ring: each partition's range and members.
fn ring(map: &Value) -> String {
    let rows: Vec<Vec<String>> = map["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                text(&p["partitionIndex"]),
                format!(
                    "{}-{}",
                    text(&p["hashRangeStart"]),
                    text(&p["hashRangeEnd"])
                ),
                text(&p["primaryNodeIp"]),
                p["replicaNodeIps"]
                    .as_array()
                    .map(|r| r.iter().map(text).collect::<Vec<_>>().join(","))
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(&["PARTITION", "RANGE", "PRIMARY", "REPLICAS"], &rows)
}

/// A coordinator's status as tables.
pub(crate) fn render_coordinator(v: &Value) -> String {
    let map = &v["topology"];
    let mut out = format!(
        "EPOCH {}  LEADER {}  PARTITIONS {}\n\n",
        text(&map["clusterEpoch"]),
        text(&map["masterNodeId"]),
        text(&map["partitionCount"])
    );
    out.push_str(&ring(map));
    let rows: Vec<Vec<String>> = v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            let addr = text(&n["ip"]);
            let r = &n["replication"];
            vec![
                text(&n["id"]),
                addr.clone(),
                placement(map, &addr),
                text(&n["status"]),
                format!("{}ms", text(&n["clockSkewMs"])),
                n["lastHeartbeatAgeSeconds"]
                    .as_f64()
                    .map_or("-".into(), |s| format!("{s:.1}s ago")),
                if r.is_null() {
                    "-".into()
                } else {
                    format!(
                        "{} {}B {}ms",
                        text(&r["state"]),
                        text(&r["lagBytes"]),
                        text(&r["lagMs"])
                    )
                },
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &[
            "NODE",
            "ADDRESS",
            "PLACEMENT",
            "STATUS",
            "SKEW",
            "HEARTBEAT",
            "REPLICATION",
        ],
        &rows,
    ));
    out
}

/// A proxy's status as tables.
pub(crate) fn render_proxy(v: &Value) -> String {
    let t = &v["topology"];
    let map = &t["map"];
    let mut out = format!(
        "EPOCH {}  SOURCE {}  AGE {}\n\n",
        text(&t["epoch"]),
        text(&t["source"]),
        t["age_seconds"]
            .as_f64()
            .map_or("-".into(), |s| format!("{s:.1}s"))
    );
    if !map.is_null() {
        out.push_str(&ring(map));
        out.push('\n');
    }
    let rows: Vec<Vec<String>> = v["upstreams"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|u| {
            let addr = text(&u["address"]);
            vec![
                addr.clone(),
                placement(map, &addr),
                text(&u["breaker"]),
                text(&u["inflight"]),
                u["latency_ms"]
                    .as_f64()
                    .map_or("-".into(), |l| format!("{l:.2}ms")),
                text(&u["failures_last_minute"]),
                text(&u["idle_connections"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "UPSTREAM",
            "PLACEMENT",
            "BREAKER",
            "INFLIGHT",
            "LATENCY",
            "FAILURES/MIN",
            "IDLE",
        ],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_pads_each_column_to_its_widest_cell() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["long".into(), "x".into()],
                vec!["s".into(), "yyy".into()],
            ],
        );
        assert_eq!(t, "A     BB\nlong  x\ns     yyy\n");
    }
}
