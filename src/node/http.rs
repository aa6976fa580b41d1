//! The node's HTTP surface: `GET`/`PUT`/`DELETE /kv/{key}`, `GET
//! /_shardgate/status`, `POST /_shardgate/replicate`, `GET /healthz`; and
//! the one place a [`Refusal`] becomes a JSON error (SPEC's shape).

use super::{Node, Refusal};
use crate::clock::Hlc;
use crate::json_error::JsonError;
use crate::proto::node::AppendRequest;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use prost::Message;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest value stored.
const MAX_VALUE: usize = 1024 * 1024;
/// Largest replication message: a snapshot of a full store.
const MAX_REPLICATION: usize = 256 * 1024 * 1024;

const HLC: &str = "x-shardgate-hlc";
const APPLIED: &str = "x-shardgate-applied";
const EPOCH: &str = "x-cluster-epoch";

type Answer = Response<Full<Bytes>>;

fn json(node: &Node, status: StatusCode, body: &serde_json::Value) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(&node.id) {
        r.headers_mut().insert("x-node-id", v);
    }
    r
}

fn hlc_value(h: Hlc) -> HeaderValue {
    // 16 hex digits are always a valid header value.
    HeaderValue::from_bytes(&h.to_hex()).unwrap_or(HeaderValue::from_static("0000000000000000"))
}

/// A refusal as the SPEC's JSON error.
fn refused(node: &Node, r: &Refusal) -> Answer {
    let (status, code) = match r {
        Refusal::StaleEpoch { .. } => (StatusCode::MISDIRECTED_REQUEST, "stale_epoch"),
        Refusal::NotPrimary { .. } => (StatusCode::SERVICE_UNAVAILABLE, "not_primary"),
        Refusal::NoQuorum => (StatusCode::SERVICE_UNAVAILABLE, "no_quorum"),
        Refusal::LeaseExpired => (StatusCode::SERVICE_UNAVAILABLE, "lease_expired"),
        Refusal::Unconfirmed => (StatusCode::SERVICE_UNAVAILABLE, "no_quorum"),
        Refusal::Fenced => (StatusCode::SERVICE_UNAVAILABLE, "fenced"),
        Refusal::CatchingUp => (StatusCode::SERVICE_UNAVAILABLE, "catching_up"),
        Refusal::Unplaced => (StatusCode::SERVICE_UNAVAILABLE, "not_placed"),
        Refusal::Full(_) => (StatusCode::INSUFFICIENT_STORAGE, "store_full"),
        Refusal::BadHlc(_) => (StatusCode::BAD_REQUEST, "invalid_hlc"),
    };
    let mut e = JsonError::new(status, code, r.to_string());
    e.partition = node.partition();
    let mut resp: Answer = e.response();
    if let Ok(v) = HeaderValue::from_str(&node.id) {
        resp.headers_mut().insert("x-node-id", v);
    }
    if let Refusal::StaleEpoch { newest, .. } | Refusal::NotPrimary { epoch: newest } = r {
        resp.headers_mut().insert(EPOCH, HeaderValue::from(*newest));
    }
    resp
}

fn header_u64(req: &Request<Incoming>, name: &str) -> Option<u64> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

async fn handle(node: Arc<Node>, req: Request<Incoming>) -> Answer {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => json(
            &node,
            StatusCode::OK,
            &json!({ "node": node.id, "ok": true }),
        ),
        (&Method::GET, "/_shardgate/status") => status(&node),
        (&Method::POST, "/_shardgate/replicate") => replicate(&node, req).await,
        _ => match path.strip_prefix("/kv/").filter(|k| !k.is_empty()) {
            Some(key) => {
                let key = percent_encoding::percent_decode_str(key)
                    .decode_utf8_lossy()
                    .into_owned();
                kv(&node, key, req).await
            }
            None => json(
                &node,
                StatusCode::NOT_FOUND,
                &json!({ "node": node.id, "error": "use /kv/{key}" }),
            ),
        },
    }
}

fn status(node: &Node) -> Answer {
    let r = node.report();
    json(
        node,
        StatusCode::OK,
        &json!({
            "nodeId": node.id,
            "role": r.role.as_str(),
            "partition": node.partition(),
            "epoch": node.newest_epoch(),
            "appliedHlc": r.applied.to_string(),
            "lagBytes": r.lag_bytes,
            "lagMs": r.lag_ms,
            "state": r.state.as_str(),
            "lastReplicatedSequence": r.sequence,
        }),
    )
}

async fn replicate(node: &Node, req: Request<Incoming>) -> Answer {
    let body = match Limited::new(req.into_body(), MAX_REPLICATION)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return refused_plain(node, StatusCode::PAYLOAD_TOO_LARGE, &e.to_string()),
    };
    let Ok(msg) = AppendRequest::decode(body) else {
        return refused_plain(node, StatusCode::BAD_REQUEST, "not a replication message");
    };
    if !node.apply_delay.is_zero() {
        tokio::time::sleep(node.apply_delay).await;
    }
    let answer = node.append(msg);
    let mut r = Response::new(Full::new(Bytes::from(answer.encode_to_vec())));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-protobuf"),
    );
    r
}

fn refused_plain(node: &Node, status: StatusCode, why: &str) -> Answer {
    json(node, status, &json!({ "node": node.id, "error": why }))
}

async fn kv(node: &Node, key: String, req: Request<Incoming>) -> Answer {
    if let Err(r) = node.check_epoch(header_u64(&req, EPOCH)) {
        return refused(node, &r);
    }
    let stamp = match req.headers().get(HLC).map(|v| Hlc::parse(v.as_bytes())) {
        None => None,
        Some(Ok(h)) => Some(h),
        Some(Err(e)) => return refused(node, &Refusal::BadHlc(e)),
    };
    match *req.method() {
        Method::GET | Method::HEAD => match node.read(&key) {
            Ok(read) => {
                let status = if read.value.is_some() {
                    StatusCode::OK
                } else {
                    StatusCode::NOT_FOUND
                };
                let value = read.value.as_ref().map(|v| String::from_utf8_lossy(v));
                let mut r = json(
                    node,
                    status,
                    &json!({ "node": node.id, "key": key, "value": value, "version": read.version.to_string() }),
                );
                r.headers_mut().insert(APPLIED, hlc_value(read.applied));
                r
            }
            Err(e) => refused(node, &e),
        },
        Method::PUT | Method::POST | Method::DELETE => {
            let value = if req.method() == Method::DELETE {
                None
            } else {
                match Limited::new(req.into_body(), MAX_VALUE).collect().await {
                    Ok(b) => Some(b.to_bytes()),
                    Err(e) => {
                        return refused_plain(node, StatusCode::PAYLOAD_TOO_LARGE, &e.to_string());
                    }
                }
            };
            let deleting = value.is_none();
            match node.write(key.clone(), value, stamp).await {
                Ok(w) => {
                    let mut r = json(
                        node,
                        StatusCode::OK,
                        // Says what the acknowledgement is worth: replicated
                        // to a majority (or not, with `async`), and memory only.
                        &json!({
                            "node": node.id, "key": key,
                            "stored": !deleting, "deleted": deleting,
                            "hlc": w.hlc.to_string(),
                            "replicated": w.replicated, "durable": false,
                        }),
                    );
                    r.headers_mut().insert(HLC, hlc_value(w.hlc));
                    r
                }
                Err(e) => refused(node, &e),
            }
        }
        _ => refused_plain(node, StatusCode::METHOD_NOT_ALLOWED, "GET, PUT or DELETE"),
    }
}

/// Serve `node` on `listener` until `shutdown`.
pub(super) async fn serve(node: Arc<Node>, listener: TcpListener, shutdown: CancellationToken) {
    crate::server::serve_http1(
        listener,
        None,
        4096,
        shutdown,
        std::time::Duration::from_secs(2),
        move |req, _peer: SocketAddr| handle(node.clone(), req),
    )
    .await;
}
