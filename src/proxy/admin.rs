//! The admin listener (SPEC §3): metrics, health, and what the proxy believes.

use super::Proxy;
use super::body::ProxyBody;
use crate::server::serve_http1;
use crate::tls::Terminator;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serve the admin endpoints until `shutdown`.
pub(super) async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    tls: Option<Arc<Terminator>>,
    shutdown: CancellationToken,
) {
    serve_http1(
        listener,
        tls,
        64,
        shutdown,
        Duration::from_secs(2),
        move |req, _peer| {
            let proxy = proxy.clone();
            async move { route(&proxy, &req) }
        },
    )
    .await;
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<ProxyBody> {
    respond(status, "application/json", v.to_string())
}

fn route(proxy: &Proxy, req: &Request<Incoming>) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            proxy.refresh_gauges();
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                proxy.registry().render(),
            )
        }
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match proxy.table() {
            Some(t) => respond(
                StatusCode::OK,
                "text/plain",
                format!("ready epoch={}\n", t.epoch()),
            ),
            None => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "no shard map yet\n".into(),
            ),
        },
        "/" => respond(StatusCode::OK, "text/html; charset=utf-8", page(proxy)),
        "/admin/topology" => topology(proxy),
        "/admin/upstreams" => upstreams(proxy),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// `GET /`: the status page (SPEC §10): the map this proxy routes by, and
/// each node as this proxy sees it.
fn page(proxy: &Proxy) -> String {
    use crate::status_page::{Cell, Page};
    let mut p = Page::new("shardgate proxy", 2);
    let status = proxy.live.status();
    let age = status.confirmed_at.map(|t| t.elapsed().as_secs_f64());
    let Some(table) = proxy.table() else {
        p.facts(&[
            ("Epoch", "none".into()),
            ("Ready", "no: no shard map yet".into()),
        ]);
        return p.finish();
    };
    p.facts(&[
        ("Epoch", table.epoch().to_string()),
        ("Source", table.origin().source.clone()),
        ("Map age", age.map_or("-".into(), |a| format!("{a:.1} s"))),
        ("Ready", "yes".into()),
        (
            "Last error",
            status.last_error.map_or("none".into(), |(m, _)| m),
        ),
    ]);
    p.heading("Hash ring");
    p.ring(&table.map().to_doc());
    let mut rows = Vec::new();
    for part in table.partitions() {
        let members = std::iter::once((&part.primary, "primary"))
            .chain(part.replicas.iter().map(|r| (r, "replica")));
        for (u, role) in members {
            let breaker = u.breaker().state().as_str();
            let class = match breaker {
                "closed" => "ok",
                "half_open" => "warn",
                _ => "bad",
            };
            let failures = u.recent_failures();
            rows.push(vec![
                Cell::plain(part.index.to_string()),
                Cell::plain(&**u.label()),
                Cell::plain(role),
                Cell::health(breaker, class),
                Cell::plain(u.inflight().to_string()),
                Cell::plain(format!(
                    "{:.2} ms",
                    u.latency().estimate().as_secs_f64() * 1000.0
                )),
                Cell::health(
                    failures.to_string(),
                    if failures == 0 { "ok" } else { "warn" },
                ),
                Cell::plain(
                    u.freshness()
                        .reported_lag_ms()
                        .map_or("-".into(), |l| format!("{l} ms")),
                ),
            ]);
        }
    }
    p.heading("Nodes");
    p.table(
        "nodes",
        &[
            "partition",
            "node",
            "role",
            "breaker",
            "in flight",
            "latency",
            "failures/min",
            "replication lag",
        ],
        &rows,
    );
    p.heading("Recent map changes");
    p.changes(&proxy.live.changes());
    p.finish()
}

fn topology(proxy: &Proxy) -> Response<ProxyBody> {
    let status = proxy.live.status();
    let last_error = status.last_error.map(|(msg, at)| {
        json!({
            "message": msg,
            "at_unix_ms": at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        })
    });
    let age = status.confirmed_at.map(|t| t.elapsed().as_secs_f64());
    let body = match proxy.table() {
        Some(t) => json!({
            "epoch": t.epoch(),
            "source": t.origin().source,
            "applied_seconds_ago": t.origin().applied_at.elapsed().as_secs_f64(),
            "age_seconds": age,
            "last_error": last_error,
            "map": t.map().to_doc(),
        }),
        None => json!({ "epoch": null, "map": null, "last_error": last_error }),
    };
    json_response(StatusCode::OK, &body)
}

fn upstreams(proxy: &Proxy) -> Response<ProxyBody> {
    let table = proxy.table();
    let list: Vec<_> = table
        .iter()
        .flat_map(|t| t.upstreams())
        .map(|u| {
            let (idle, parked) = u.pool().idle_counts();
            json!({
                "address": &**u.label(),
                "breaker": u.breaker().state().as_str(),
                "inflight": u.inflight(),
                "latency_ms": u.latency().estimate().as_secs_f64() * 1000.0,
                "idle_connections": idle,
                "parked_connections": parked,
                "failures_last_minute": u.recent_failures(),
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "upstreams": list }))
}
