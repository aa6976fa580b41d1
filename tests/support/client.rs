//! The test client: pooled HTTP/1.1 and HTTP/2, responses read whole,
//! SPEC error checks, and bounded polling instead of sleeps.

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The body type every test client and upstream uses.
pub(crate) type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A pooled HTTP/1.1 test client.
pub(crate) fn client() -> Client<HttpConnector, BoxBody> {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build_http()
}

/// An HTTP/2 prior-knowledge test client.
pub(crate) fn h2_client() -> Client<HttpConnector, BoxBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub(crate) fn empty() -> BoxBody {
    Full::new(Bytes::new())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

pub(crate) fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

/// A response read whole.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Assert this is a proxy error with the SPEC shape and `code`.
    pub(crate) fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "{}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert_eq!(self.header("x-shardgate-error"), Some(code));
        let v = self.json();
        assert_eq!(v["error"], code);
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(v.get("partition").is_some(), "partition field present");
        if status == 503 {
            assert!(
                self.header("retry-after").is_some(),
                "503 carries Retry-After"
            );
        }
    }
}

pub(crate) async fn send(client: &Client<HttpConnector, BoxBody>, req: Request<BoxBody>) -> Answer {
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// GET `url` with an `x-shard-key` header.
pub(crate) async fn get_key(
    client: &Client<HttpConnector, BoxBody>,
    url: &str,
    key: &str,
) -> Answer {
    send(
        client,
        Request::get(url)
            .header("x-shard-key", key)
            .body(empty())
            .unwrap(),
    )
    .await
}

/// A request with a key header.
/// Start `n` GETs of `key` at `url` and leave them in flight (for an upstream
/// told to hang); abort the returned handles to end them.
pub(crate) fn requests_in_flight(url: &str, key: &str, n: usize) -> Vec<tokio::task::AbortHandle> {
    (0..n)
        .map(|_| {
            let req = keyed("GET", url, key, "");
            tokio::spawn(async move { client().request(req).await }).abort_handle()
        })
        .collect()
}

pub(crate) fn keyed(
    method: &str,
    url: &str,
    key: &str,
    body: impl Into<Bytes>,
) -> Request<BoxBody> {
    Request::builder()
        .method(method)
        .uri(url)
        .header("x-shard-key", key)
        .body(full(body))
        .unwrap()
}

/// GET a path on an admin listener.
pub(crate) async fn admin_get(admin: SocketAddr, path: &str) -> Answer {
    send(
        &client(),
        Request::get(format!("http://{admin}{path}"))
            .body(empty())
            .unwrap(),
    )
    .await
}

/// Poll `cond` every few milliseconds until it holds or `within` passes.
pub(crate) async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Raw bytes over a fresh TCP connection; returns everything read until close or `within`.
pub(crate) async fn raw_exchange(addr: SocketAddr, bytes: &[u8], within: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    out
}
