//! One plain `GET` over HTTP/1.1 on a fresh connection, bounded in time and
//! in body size: for what asks a node or a service now and then (the
//! agent's health check and status read, `shardgate status`, the demo),
//! never for the request path, which pools its connections.

use bytes::Bytes;
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use std::time::Duration;

/// Why a `GET` got no answer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Not an `http://host[:port]/...` URL.
    #[error("not an http:// URL with a host")]
    Url,
    /// Connecting or exchanging failed.
    #[error("{0}")]
    Io(String),
    /// No whole answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// `GET url`: the status and at most `max_body` bytes of body, within `within`.
pub async fn get(
    url: &Uri,
    max_body: usize,
    within: Duration,
) -> Result<(StatusCode, Bytes), FetchError> {
    let io = |e: &dyn std::fmt::Display| FetchError::Io(e.to_string());
    let (Some("http"), Some(authority)) = (url.scheme_str(), url.authority().cloned()) else {
        return Err(FetchError::Url);
    };
    let fetch = async {
        let port = authority.port_u16().unwrap_or(80);
        let stream = tokio::net::TcpStream::connect((authority.host(), port))
            .await
            .map_err(|e| io(&e))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| io(&e))?;
        tokio::spawn(conn);
        let req = http::Request::get(url.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, authority.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| io(&e))?;
        let resp = send.send_request(req).await.map_err(|e| io(&e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| io(&e))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(within, fetch)
        .await
        .map_err(|_| FetchError::Timeout(within))?
}
