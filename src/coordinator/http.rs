//! The coordinator's HTTP API (SPEC §4): the map, with ETag and a long-poll
//! watch; the nodes; operator map changes; health and metrics.

use super::Coordinator;
use super::state::{MapChangeError, ReplicationRow};
use super::store::{Commit, Store};
use crate::json_error::JsonError;
use crate::secret::Secret;
use crate::server::serve_http1;
use crate::tls::Terminator;
use crate::topology::TopologyDoc;
use bytes::Bytes;
use http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, ETAG, IF_MATCH, IF_NONE_MATCH,
};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest map an operator may PUT.
const MAX_MAP_BYTES: usize = 4 * 1024 * 1024;

type Body = Full<Bytes>;

/// Serve the API until `shutdown`; watches end promptly on shutdown.
pub(super) async fn serve<S: Store>(
    c: Arc<Coordinator<S>>,
    listener: TcpListener,
    tls: Option<Arc<Terminator>>,
    shutdown: CancellationToken,
) {
    let stop = shutdown.clone();
    let max_connections = c.cfg.http_max_connections;
    serve_http1(
        listener,
        tls,
        max_connections,
        shutdown,
        Duration::from_secs(2),
        move |req, _| {
            let c = c.clone();
            let stop = stop.clone();
            async move { route(&c, req, &stop).await }
        },
    )
    .await;
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    respond(status, "application/json", v.to_string())
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    JsonError::new(status, code, message).response()
}

async fn route<S: Store>(
    c: &Coordinator<S>,
    req: Request<Incoming>,
    stop: &CancellationToken,
) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/v1/cluster/topology") => topology(c, &req, stop).await,
        (&Method::PUT, "/v1/cluster/topology") => put_topology(c, req).await,
        (&Method::GET, "/v1/cluster/nodes") => nodes(c),
        (&Method::GET, "/v1/cluster/replication") => replication(c),
        (&Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/") => respond(StatusCode::OK, "text/html; charset=utf-8", page(c)),
        (&Method::GET, "/metrics") => {
            c.refresh_gauges();
            c.metrics
                .watches
                .set((c.cfg.max_watches - c.watches.available_permits()) as f64);
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                c.metrics.registry.render(),
            )
        }
        (
            _,
            "/v1/cluster/topology"
            | "/v1/cluster/nodes"
            | "/v1/cluster/replication"
            | "/healthz"
            | "/metrics",
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed here",
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    }
}

/// The map's ETag: every change to the map raises the epoch, so it names the version.
fn etag(epoch: u64) -> HeaderValue {
    HeaderValue::try_from(format!("\"{epoch}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

fn wait_above(query: Option<&str>) -> Result<Option<u64>, ()> {
    let Some(q) = query else { return Ok(None) };
    for pair in q.split('&') {
        if let Some(v) = pair.strip_prefix("waitForEpochAbove=") {
            return v.parse().map(Some).map_err(|_| ());
        }
    }
    Ok(None)
}

/// GET the map. With `waitForEpochAbove=N` the answer is held until the
/// epoch passes N or the watch timeout ends (then the current map is sent).
async fn topology<S: Store>(
    c: &Coordinator<S>,
    req: &Request<Incoming>,
    stop: &CancellationToken,
) -> Response<Body> {
    let Ok(wait) = wait_above(req.uri().query()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "waitForEpochAbove must be a whole number",
        );
    };
    let mut published = c.published();
    let mut shed = false;
    if let Some(n) = wait {
        // Watches hold connections; past their bound one is answered at once
        // (the watcher polls instead), and closed, so the connections left
        // stay free for operators and health checks.
        match c.watches.try_acquire() {
            Ok(_held) => {
                let waited = tokio::time::timeout(c.cfg.watch_timeout, async {
                    tokio::select! {
                        r = published.wait_for(|d| d.cluster_epoch > n) => r.is_ok(),
                        () = stop.cancelled() => false,
                    }
                });
                let _ = waited.await;
            }
            Err(_) => {
                c.metrics.watches_shed.increment(1);
                shed = true;
            }
        }
    }
    // Only a committed map is served; the leader may change without a new one.
    let mut doc = TopologyDoc::clone(&published.borrow());
    doc.master_node_id = c.lock().leader_id().to_owned();
    let epoch = doc.cluster_epoch;
    let tag = etag(epoch);
    if req.headers().get(IF_NONE_MATCH).is_some_and(|v| v == tag) {
        let mut r = respond(StatusCode::NOT_MODIFIED, "application/json", Bytes::new());
        r.headers_mut().insert(ETAG, tag);
        return r;
    }
    let mut r = respond(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(&doc).unwrap_or_default(),
    );
    r.headers_mut().insert(ETAG, tag);
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if shed {
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// `GET /`: the status page (SPEC §10).
fn page<S: Store>(c: &Coordinator<S>) -> String {
    use crate::status_page::{Cell, Page};
    let st = c.lock();
    let doc = c.published.borrow().clone();
    let mut p = Page::new("shardgate coordinator", 2);
    p.facts(&[
        ("Epoch", doc.cluster_epoch.to_string()),
        ("Leader", doc.master_node_id.clone()),
        ("This coordinator", c.cfg.id.clone()),
        ("Leading", if c.is_leader() { "yes" } else { "no" }.into()),
        ("Nodes", st.nodes().count().to_string()),
    ]);
    p.heading("Hash ring");
    p.ring(&doc);
    let status = |addr: &crate::topology::NodeAddr| {
        let s = st.status_of(addr);
        let class = match s {
            Some(super::NodeStatus::Active) => "ok",
            Some(super::NodeStatus::Degraded) => "warn",
            _ => "bad",
        };
        (s.map_or("UNKNOWN", |s| s.as_str()), class)
    };
    let rows: Vec<Vec<Cell>> = st
        .map()
        .partitions()
        .iter()
        .map(|part| {
            let (ps, pc) = status(&part.primary);
            let replicas = part
                .replicas
                .iter()
                .map(|r| format!("{r} ({})", status(r).0))
                .collect::<Vec<_>>()
                .join(", ");
            vec![
                Cell::plain(part.index.to_string()),
                Cell::plain(format!("{:08x}–{:08x}", part.range.start, part.range.end)),
                Cell::health(format!("{} ({ps})", part.primary), pc),
                Cell::plain(if replicas.is_empty() {
                    "-".into()
                } else {
                    replicas
                }),
                Cell::plain(st.health(part).as_str()),
            ]
        })
        .collect();
    p.heading("Partitions");
    p.table(
        "partitions",
        &["partition", "range", "primary", "replicas", "health"],
        &rows,
    );
    let rows: Vec<Vec<Cell>> = st
        .nodes()
        .map(|n| {
            let a = st.assignment_of(&n.addr);
            let placement = match (a.partition, a.primary) {
                (None, _) => "-".to_owned(),
                (Some(i), true) => format!("P{i} primary"),
                (Some(i), false) => format!("P{i} replica"),
            };
            let (s, class) = status(&n.addr);
            vec![
                Cell::plain(n.id.clone()),
                Cell::plain(n.addr.to_string()),
                Cell::plain(placement),
                Cell::health(s, class),
                Cell::plain(format!("{} ms", n.skew_ms)),
                Cell::plain(n.last_seen.map_or("never".into(), |t| {
                    format!("{:.1} s ago", t.elapsed().as_secs_f64())
                })),
                Cell::plain(n.replication.map_or("-".into(), |r| {
                    format!("{} {} B {} ms", r.state.as_str(), r.lag_bytes, r.lag_ms)
                })),
            ]
        })
        .collect();
    p.heading("Nodes");
    p.table(
        "nodes",
        &[
            "node",
            "address",
            "placement",
            "status",
            "clock skew",
            "last heartbeat",
            "replication",
        ],
        &rows,
    );
    drop(st);
    p.heading("Recent map changes");
    p.changes(&c.changes.list());
    p.finish()
}

fn nodes<S: Store>(c: &Coordinator<S>) -> Response<Body> {
    let st = c.lock();
    let now_ms = super::unix_ms();
    let nodes: Vec<_> = st
        .nodes()
        .map(|n| {
            let a = st.assignment_of(&n.addr);
            json!({
                "id": n.id,
                "ip": n.addr.to_string(),
                "role": a.role(),
                "partition": a.partition,
                "partitionRole": match (a.partition, a.primary) {
                    (None, _) => "none",
                    (Some(_), true) => "primary",
                    (Some(_), false) => "replica",
                },
                "status": n.status.as_str(),
                "fenced": st.is_fenced(&n.addr),
                "cpuPercent": n.usage.cpu_percent,
                "freeMemoryBytes": n.usage.free_memory_bytes,
                "activeConnections": n.usage.active_connections,
                "lastHeartbeatUnixMs": n.last_seen_unix_ms,
                "lastHeartbeatAgeSeconds": n.last_seen.map(|t| t.elapsed().as_secs_f64()),
                "clockSkewMs": n.skew_ms,
                "replication": n.replication.map(|r| json!({
                    "role": r.role.as_str(),
                    "appliedHlc": r.applied.to_string(),
                    "lagBytes": r.lag_bytes,
                    "lagMs": r.lag_ms,
                    "state": r.state.as_str(),
                })),
            })
        })
        .collect();
    let partitions: Vec<_> = st
        .map()
        .partitions()
        .iter()
        .map(|p| {
            json!({
                "partitionIndex": p.index,
                "primary": p.primary.to_string(),
                "primaryStatus": st.status_of(&p.primary).map_or("UNKNOWN", |s| s.as_str()),
                "replicas": p.replicas.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "health": st.health(p).as_str(),
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({ "epoch": st.epoch(), "nowUnixMs": now_ms, "nodes": nodes, "partitions": partitions }),
    )
}

/// `GET /v1/cluster/replication` (SPEC §7): each replica's replication from
/// its primary, as the nodes last reported it. Lag changes never raise the epoch.
fn replication<S: Store>(c: &Coordinator<S>) -> Response<Body> {
    let rows: Vec<_> = c
        .lock()
        .replication()
        .iter()
        .map(ReplicationRow::to_json)
        .collect();
    json_response(StatusCode::OK, &json!({ "replication": rows }))
}

/// `409 Conflict` naming the epoch in force (header and ETag), so the
/// operator can read the map again and retry.
fn conflict(code: &str, message: String, in_force: u64) -> Response<Body> {
    let mut r = JsonError::new(StatusCode::CONFLICT, code, message).response::<Body>();
    r.headers_mut()
        .insert("x-cluster-epoch", HeaderValue::from(in_force));
    r.headers_mut().insert(ETAG, etag(in_force));
    r
}

fn bearer_ok(expected: &Secret, given: Option<&HeaderValue>) -> bool {
    !expected.is_empty() && expected.matches_bearer(given.and_then(|v| v.to_str().ok()))
}

/// PUT a new map: bearer token, validated like any map, epoch raised.
async fn put_topology<S: Store>(c: &Coordinator<S>, req: Request<Incoming>) -> Response<Body> {
    if !bearer_ok(&c.cfg.admin_token, req.headers().get(AUTHORIZATION)) {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "changing the map needs the operator bearer token",
        );
        r.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        return r;
    }
    let if_match = req.headers().get(IF_MATCH).cloned();
    let body = match Limited::new(req.into_body(), MAX_MAP_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, "bad_request", &e.to_string()),
    };
    let doc: TopologyDoc = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => {
            return JsonError {
                errors: vec![e.to_string()],
                ..JsonError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_topology",
                    "not a topology document",
                )
            }
            .response();
        }
    };
    let (before, snapshot, previous) = {
        let mut st = c.lock();
        let before = st.epoch();
        // Optimistic concurrency: a change made from an older version of the
        // map must not silently undo a newer one.
        if let Some(tag) = if_match
            && tag != "*"
            && tag != etag(before)
        {
            return conflict(
                "conflict",
                format!("If-Match {tag:?} names an older map; the epoch in force is {before}"),
                before,
            );
        }
        let previous = st.map_in_force();
        // Leaves the state as it was when it refuses.
        if let Err(e) = st.replace_map(doc) {
            return match &e {
                MapChangeError::Stale { in_force, .. } => {
                    conflict("stale_epoch", e.to_string(), *in_force)
                }
                MapChangeError::OutOfRange(_) => {
                    error(StatusCode::BAD_REQUEST, "epoch_exhausted", &e.to_string())
                }
                MapChangeError::Invalid(invalid) => JsonError {
                    errors: invalid.0.iter().map(ToString::to_string).collect(),
                    ..JsonError::new(StatusCode::BAD_REQUEST, "invalid_topology", e.to_string())
                }
                .response(),
            };
        }
        (before, st.persisted(), previous)
    };
    match c.store.commit(Some(before), &snapshot).await {
        Ok(Commit::Won) => {
            let epoch = snapshot.map.cluster_epoch;
            tracing::info!(epoch, "operator replaced the map");
            c.publish(snapshot.map.clone());
            let mut r = json_response(
                StatusCode::OK,
                &serde_json::to_value(&snapshot.map).unwrap_or_default(),
            );
            r.headers_mut().insert(ETAG, etag(epoch));
            r
        }
        Ok(Commit::Lost) => {
            let _ = c.reload().await;
            error(
                StatusCode::CONFLICT,
                "conflict",
                "the map changed meanwhile; read it again and retry",
            )
        }
        Err(e) => {
            // Not committed, so not in force: with the store unreachable a
            // reload cannot say so, and the state machine must not go on
            // telling nodes about a map nobody serves.
            {
                let mut st = c.lock();
                if st.epoch() == snapshot.map.cluster_epoch {
                    st.undo_map_change(previous);
                }
            }
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                &format!(
                    "the store did not confirm the change, which is not in force; it may still \
                     take effect once the store is back (read the map before retrying): {e}"
                ),
            )
        }
    }
}
