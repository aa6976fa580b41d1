//! Every way the proxy itself can answer a request, and the one place those
//! answers become SPEC §3 JSON responses.

use super::body::ProxyBody;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Response, StatusCode};

/// `x-shardgate-error`: the error code, for clients that do not parse bodies.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-shardgate-error");
/// `x-shardgate-partition`: the partition that served (or would have served).
pub const PARTITION_HEADER: HeaderName = HeaderName::from_static("x-shardgate-partition");

/// A request the proxy answers itself instead of forwarding.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No configured source held a shard key.
    #[error("{0}")]
    MissingShardKey(String),
    /// The shard key is ambiguous, malformed or too long.
    #[error("{0}")]
    InvalidShardKey(String),
    /// The read preference header names no known preference.
    #[error("{0}")]
    InvalidReadPreference(String),
    /// The request is malformed or ambiguous and will not be forwarded.
    #[error("{0}")]
    BadRequest(&'static str),
    /// The method cannot be proxied.
    #[error("method {0} is not proxied")]
    MethodNotAllowed(http::Method),
    /// An `Expect` other than `100-continue`.
    #[error("only Expect: 100-continue is supported")]
    ExpectationFailed,
    /// Request line and headers exceed the limit.
    #[error("request headers exceed {limit} bytes")]
    HeadersTooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// The body exceeds the limit.
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge {
        /// The limit in force.
        limit: u64,
    },
    /// The client stopped sending its body part-way.
    #[error("the client's request body ended early: {0}")]
    ClientBodyFailed(String),
    /// No shard map has been loaded yet.
    #[error("no shard map is loaded yet")]
    NoTopology,
    /// The map in force is older than `max_staleness`; writes are refused.
    #[error("the shard map in force is {age_secs}s old, beyond the staleness limit")]
    TopologyStale {
        /// Age of the map.
        age_secs: u64,
    },
    /// A write (or `primary` read) could not reach the partition's primary.
    #[error("partition {partition}: primary {upstream} is unavailable ({cause})")]
    PrimaryUnavailable {
        /// Partition index.
        partition: u32,
        /// The primary's address.
        upstream: String,
        /// What happened.
        cause: String,
    },
    /// No node the request may use is available.
    #[error("partition {partition}: no healthy node may serve this request ({cause})")]
    NoHealthyUpstream {
        /// Partition index.
        partition: u32,
        /// What happened.
        cause: String,
    },
    /// The proxy or an upstream is at its concurrency limit.
    #[error("overloaded: {reason}")]
    Overloaded {
        /// Which limit.
        reason: &'static str,
        /// Partition, if known.
        partition: Option<u32>,
    },
    /// The upstream broke the exchange after the request was sent.
    #[error("partition {partition}: upstream {upstream} failed: {cause}")]
    UpstreamFailed {
        /// Partition index.
        partition: u32,
        /// The upstream's address.
        upstream: String,
        /// What happened.
        cause: String,
    },
    /// No response in time.
    #[error("partition {partition}: no response from {upstream} in time")]
    UpstreamTimeout {
        /// Partition index.
        partition: u32,
        /// The upstream's address.
        upstream: String,
    },
}

impl ProxyError {
    /// The SPEC error code.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::MissingShardKey(_) => "missing_shard_key",
            ProxyError::InvalidShardKey(_) => "invalid_shard_key",
            ProxyError::InvalidReadPreference(_) => "invalid_read_preference",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::ExpectationFailed => "expectation_failed",
            ProxyError::HeadersTooLarge { .. } => "request_header_too_large",
            ProxyError::PayloadTooLarge { .. } => "payload_too_large",
            ProxyError::ClientBodyFailed(_) => "client_body_failed",
            ProxyError::NoTopology => "no_topology",
            ProxyError::TopologyStale { .. } => "topology_stale",
            ProxyError::PrimaryUnavailable { .. } => "primary_unavailable",
            ProxyError::NoHealthyUpstream { .. } => "no_healthy_upstream",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::UpstreamFailed { .. } => "upstream_failed",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingShardKey(_)
            | ProxyError::InvalidShardKey(_)
            | ProxyError::InvalidReadPreference(_)
            | ProxyError::BadRequest(_)
            | ProxyError::ClientBodyFailed(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::ExpectationFailed => StatusCode::EXPECTATION_FAILED,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoTopology
            | ProxyError::TopologyStale { .. }
            | ProxyError::PrimaryUnavailable { .. }
            | ProxyError::NoHealthyUpstream { .. }
            | ProxyError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Whether the client connection must not carry another request.
    fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::ExpectationFailed
                | ProxyError::HeadersTooLarge { .. }
                | ProxyError::PayloadTooLarge { .. }
                | ProxyError::ClientBodyFailed(_)
        )
    }

    /// The partition the error concerns, when one was chosen.
    pub fn partition(&self) -> Option<u32> {
        match self {
            ProxyError::PrimaryUnavailable { partition, .. }
            | ProxyError::NoHealthyUpstream { partition, .. }
            | ProxyError::UpstreamFailed { partition, .. }
            | ProxyError::UpstreamTimeout { partition, .. } => Some(*partition),
            ProxyError::Overloaded { partition, .. } => *partition,
            _ => None,
        }
    }

    /// The JSON response: `{"error", "message", "partition"}` with
    /// `x-shardgate-error`, and `Retry-After` on 503s.
    pub fn to_response(&self) -> Response<ProxyBody> {
        let status = self.status();
        let partition = self.partition();
        let body = serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
            "partition": partition,
        });
        let bytes = Bytes::from(body.to_string());
        let mut resp = Response::new(ProxyBody::full(bytes.clone()));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        h.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Some(p) = partition {
            h.insert(PARTITION_HEADER, HeaderValue::from(p));
        }
        if self.closes_connection() {
            // After a malformed or half-read request the byte stream cannot be
            // trusted to start a new request; hyper drops this for HTTP/2.
            h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn errors_have_the_spec_json_shape() {
        let resp = ProxyError::PrimaryUnavailable {
            partition: 2,
            upstream: "10.0.0.1:80".into(),
            cause: "connection refused".into(),
        }
        .to_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["x-shardgate-error"], "primary_unavailable");
        assert_eq!(resp.headers()["retry-after"], "1");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "primary_unavailable");
        assert_eq!(v["partition"], 2);
        assert!(v["message"].as_str().unwrap().contains("primary"));

        let resp = ProxyError::MissingShardKey("none".into()).to_response();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["partition"], serde_json::Value::Null);
    }
}
