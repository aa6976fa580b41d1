//! Every way the proxy itself can answer a request. They become responses in
//! one place, `respond` (through [`ProxyError::to_response`]), in the JSON
//! shape of SPEC §3 (`crate::json_error`).

use super::body::ProxyBody;
use crate::json_error::JsonError;
use crate::routing::ReadPreference;
use crate::upstream::{BodyError, SendError};
use http::{HeaderName, HeaderValue, Response, StatusCode};
use std::fmt;
use std::sync::Arc;

/// `x-shardgate-partition`: the partition that served (or would have served).
pub const PARTITION_HEADER: HeaderName = HeaderName::from_static("x-shardgate-partition");

/// Why a replica may not serve a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unfit {
    /// Further behind than the bound.
    TooStale = 0,
    /// Not known to have applied the token's write.
    TokenNotApplied = 1,
}

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Unfit {
    /// The `shardgate_replica_reads_total` result label.
    pub fn as_str(self) -> &'static str {
        match self {
            Unfit::TooStale => "too_stale",
            Unfit::TokenNotApplied => "token_not_applied",
        }
    }
}

/// Why no upstream produced an answer to pass on.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamCause {
    /// Nothing of the request was written: no connection, or a fresh one
    /// refused it.
    #[error(transparent)]
    Unsent(SendError),
    /// The exchange broke after the request was (maybe) written.
    #[error("{0}")]
    Broken(hyper::Error),
    /// The upstream tried to switch protocols; upgrades are never forwarded.
    #[error("unexpected 101 Switching Protocols")]
    UnexpectedUpgrade,
    /// No response headers in time.
    #[error("no response in time")]
    Timeout,
    /// The upstream answered with a status that counts as a failure.
    #[error("answered {0}")]
    Status(StatusCode),
    /// Every node's breaker (or in-flight limit) refused before any attempt.
    #[error("circuit breaker open")]
    BreakerOpen,
    /// Breakers refused every node once earlier attempts had failed.
    #[error("circuit breaker open after {upstream}: {last}")]
    BreakerOpenAfter {
        /// The node tried last.
        upstream: Arc<str>,
        /// How that attempt failed.
        last: Box<UpstreamCause>,
    },
    /// The request could not be sent at all (its only copy was used up).
    #[error("no attempt could be made")]
    NoAttempt,
    /// A replica answered from further behind than the read allows.
    #[error("a replica answered but was not fresh enough ({0})")]
    Stale(Unfit),
    /// The read preference needs a replica the partition does not have.
    #[error("read preference {0} needs a replica and the partition has none")]
    NoReplica(ReadPreference),
}

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
    /// The read-your-writes token is not one this proxy issues.
    #[error("x-shardgate-token: {0}")]
    InvalidToken(String),
    /// `x-max-staleness` is not a number of seconds.
    #[error("x-max-staleness: {0}")]
    InvalidMaxStaleness(String),
    /// A `secondary` read found no replica within its staleness bound or
    /// holding its token's write.
    #[error("partition {partition}: no replica is fresh enough for this read ({why})")]
    NoFreshReplica {
        /// Partition index.
        partition: u32,
        /// Which requirement no replica met.
        why: Unfit,
    },
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
    #[error("the client's request body ended early: {}", ClientCause(.0))]
    ClientBodyFailed(#[source] hyper::Error),
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
        upstream: Arc<str>,
        /// What happened.
        cause: UpstreamCause,
    },
    /// No node the request may use is available.
    #[error("partition {partition}: no healthy node may serve this request ({})", LastTried(.last.as_deref(), cause))]
    NoHealthyUpstream {
        /// Partition index.
        partition: u32,
        /// The node tried last, if any was.
        last: Option<Arc<str>>,
        /// What happened.
        cause: UpstreamCause,
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
        upstream: Arc<str>,
        /// What happened.
        cause: UpstreamCause,
    },
    /// No response in time.
    #[error("partition {partition}: no response from {upstream} in time")]
    UpstreamTimeout {
        /// Partition index.
        partition: u32,
        /// The upstream's address.
        upstream: Arc<str>,
    },
}

/// What the client did, found in the chain of the failed exchange's causes.
struct ClientCause<'a>(&'a hyper::Error);

impl fmt::Display for ClientCause<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut source = std::error::Error::source(self.0);
        while let Some(e) = source {
            if let Some(BodyError::Client(c)) = e.downcast_ref::<BodyError>() {
                return write!(f, "{c}");
            }
            source = e.source();
        }
        write!(f, "{}", self.0)
    }
}

/// "last tried X: cause", or the cause alone.
struct LastTried<'a>(Option<&'a str>, &'a UpstreamCause);

impl fmt::Display for LastTried<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(upstream) => write!(f, "last tried {upstream}: {}", self.1),
            None => write!(f, "{}", self.1),
        }
    }
}

impl ProxyError {
    /// The SPEC error code.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::MissingShardKey(_) => "missing_shard_key",
            ProxyError::InvalidShardKey(_) => "invalid_shard_key",
            ProxyError::InvalidReadPreference(_) => "invalid_read_preference",
            ProxyError::InvalidToken(_) => "invalid_token",
            ProxyError::InvalidMaxStaleness(_) => "invalid_max_staleness",
            ProxyError::NoFreshReplica { .. } => "no_fresh_replica",
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
            | ProxyError::InvalidToken(_)
            | ProxyError::InvalidMaxStaleness(_)
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
            | ProxyError::NoFreshReplica { .. }
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
            | ProxyError::NoFreshReplica { partition, .. }
            | ProxyError::UpstreamFailed { partition, .. }
            | ProxyError::UpstreamTimeout { partition, .. } => Some(*partition),
            ProxyError::Overloaded { partition, .. } => *partition,
            _ => None,
        }
    }

    /// The SPEC JSON response, with `x-shardgate-partition` when a partition
    /// was chosen and `Connection: close` after a request whose byte stream
    /// can no longer be trusted.
    pub fn to_response(&self) -> Response<ProxyBody> {
        let partition = self.partition();
        let mut resp = JsonError {
            partition,
            ..JsonError::new(self.status(), self.code(), self.to_string())
        }
        .response::<ProxyBody>();
        let h = resp.headers_mut();
        if let Some(p) = partition {
            h.insert(PARTITION_HEADER, HeaderValue::from(p));
        }
        if self.closes_connection() {
            // hyper drops this for HTTP/2, where it has no meaning.
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
            cause: UpstreamCause::BreakerOpen,
        }
        .to_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["x-shardgate-error"], "primary_unavailable");
        assert_eq!(resp.headers()["x-shardgate-partition"], "2");
        assert_eq!(resp.headers()["retry-after"], "1");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "primary_unavailable");
        assert_eq!(v["partition"], 2);
        assert!(v["message"].as_str().unwrap().contains("primary"));

        let resp = ProxyError::MissingShardKey("none".into()).to_response();
        assert!(resp.headers().get("x-shardgate-partition").is_none());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["partition"], serde_json::Value::Null);
    }

    #[test]
    fn messages_say_who_failed_and_how() {
        let e = ProxyError::NoHealthyUpstream {
            partition: 1,
            last: Some("10.0.0.2:80".into()),
            cause: UpstreamCause::BreakerOpenAfter {
                upstream: "10.0.0.2:80".into(),
                last: Box::new(UpstreamCause::Timeout),
            },
        };
        assert_eq!(
            e.to_string(),
            "partition 1: no healthy node may serve this request (last tried 10.0.0.2:80: \
             circuit breaker open after 10.0.0.2:80: no response in time)"
        );
    }

    #[test]
    fn a_request_whose_stream_cannot_be_trusted_closes_its_connection() {
        let bad = ProxyError::BadRequest("two Host headers").to_response();
        assert_eq!(bad.headers()["connection"], "close");
        let busy = ProxyError::NoTopology.to_response();
        assert!(busy.headers().get("connection").is_none());
    }
}
