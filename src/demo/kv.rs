//! The demo's shard node: a small in-memory key-value store over HTTP.
//!
//! `GET`/`PUT`/`DELETE /kv/{key}` answer with the node's id. It honours the
//! fencing token: a request carrying an `x-cluster-epoch` older than the
//! newest it has seen is answered `421 Misdirected Request` with that newer
//! epoch, so a proxy on an old map corrects itself at once.
//!
//! It does not replicate and keeps nothing on disk: a write it acknowledges
//! lives in this process's memory only, and every `PUT` answer says so
//! (`"replicated": false, "durable": false`), as do the demo's instructions.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest value stored.
const MAX_VALUE: usize = 1024 * 1024;
/// Most keys kept.
const MAX_KEYS: usize = 100_000;

/// One node's store.
pub(crate) struct KvNode {
    id: String,
    data: Mutex<HashMap<String, Bytes>>,
    newest_epoch: AtomicU64,
    /// Set when the coordinator fences this node: it stops taking writes.
    fenced: AtomicBool,
}

impl KvNode {
    /// An empty store named `id`.
    pub(crate) fn new(id: &str) -> Arc<KvNode> {
        Arc::new(KvNode {
            id: id.to_owned(),
            data: Mutex::new(HashMap::new()),
            newest_epoch: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
        })
    }

    /// Stop taking writes (the coordinator said TERMINATE).
    pub(crate) fn fence(&self) {
        self.fenced.store(true, Ordering::SeqCst);
    }

    fn answer(&self, status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(v) = HeaderValue::from_str(&self.id) {
            r.headers_mut().insert("x-node-id", v);
        }
        r
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() == "/healthz" {
            return self.answer(StatusCode::OK, &json!({ "node": self.id, "ok": true }));
        }
        let Some(key) = req
            .uri()
            .path()
            .strip_prefix("/kv/")
            .filter(|k| !k.is_empty())
        else {
            return self.answer(
                StatusCode::NOT_FOUND,
                &json!({ "node": self.id, "error": "use /kv/{key}" }),
            );
        };
        let key = percent_encoding::percent_decode_str(key)
            .decode_utf8_lossy()
            .into_owned();
        let epoch = req
            .headers()
            .get("x-cluster-epoch")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(e) = epoch {
            let newest = self.newest_epoch.fetch_max(e, Ordering::SeqCst).max(e);
            if e < newest {
                let mut r = self.answer(
                    StatusCode::MISDIRECTED_REQUEST,
                    &json!({ "node": self.id, "error": "stale_epoch", "newest_epoch": newest }),
                );
                r.headers_mut()
                    .insert("x-cluster-epoch", HeaderValue::from(newest));
                return r;
            }
        }
        let write = matches!(*req.method(), Method::PUT | Method::POST | Method::DELETE);
        if write && self.fenced.load(Ordering::SeqCst) {
            return self.answer(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({ "node": self.id, "error": "fenced: this node was replaced and takes no writes" }),
            );
        }
        match *req.method() {
            Method::GET | Method::HEAD => {
                let value = self
                    .data
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&key)
                    .cloned();
                match value {
                    Some(v) => self.answer(
                        StatusCode::OK,
                        &json!({ "node": self.id, "key": key, "value": String::from_utf8_lossy(&v) }),
                    ),
                    None => self.answer(StatusCode::NOT_FOUND, &json!({ "node": self.id, "key": key, "value": null })),
                }
            }
            Method::PUT | Method::POST => {
                let body = match Limited::new(req.into_body(), MAX_VALUE).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => {
                        return self.answer(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            &json!({ "node": self.id, "error": e.to_string() }),
                        );
                    }
                };
                let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
                if data.len() >= MAX_KEYS && !data.contains_key(&key) {
                    return self.answer(
                        StatusCode::INSUFFICIENT_STORAGE,
                        &json!({ "node": self.id, "error": "store full" }),
                    );
                }
                data.insert(key.clone(), body);
                self.answer(
                    StatusCode::OK,
                    // Says what the acknowledgement is worth: this node's
                    // memory only, until replication ships.
                    &json!({
                        "node": self.id, "key": key, "stored": true,
                        "replicated": false, "durable": false,
                    }),
                )
            }
            Method::DELETE => {
                let existed = self
                    .data
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key)
                    .is_some();
                self.answer(
                    StatusCode::OK,
                    &json!({ "node": self.id, "key": key, "deleted": existed }),
                )
            }
            _ => self.answer(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({ "node": self.id, "error": "GET, PUT or DELETE" }),
            ),
        }
    }
}

/// Serve `node` on `listener` until `shutdown`.
pub(crate) async fn serve(node: Arc<KvNode>, listener: TcpListener, shutdown: CancellationToken) {
    shardgate::server::serve_http1(
        listener,
        None,
        4096,
        shutdown,
        std::time::Duration::from_secs(2),
        move |req, _peer: SocketAddr| {
            let node = node.clone();
            async move { node.handle(req).await }
        },
    )
    .await;
}
