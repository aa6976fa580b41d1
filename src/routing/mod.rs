//! From request to nodes: the shard key, its partition, and which of the
//! partition's nodes may serve it (SPEC §3).

mod key;
mod preference;
mod table;

pub use key::{KeyError, KeyExtractor, KeySource, PathTemplate, TemplateError};
pub use preference::{ReadPreference, UnknownReadPreference};
pub use table::{
    MapOrigin, PartitionMetrics, RetryReason, Role, RoutePartition, RouteTable, ServedBy,
};

use http::{HeaderName, Method};

/// Request routing settings.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingConfig {
    /// Reads shard keys.
    pub keys: KeyExtractor,
    /// Partition for keyless requests, if they are routed at all.
    pub keyless_partition: Option<u32>,
    /// Default read preference.
    pub read_preference: ReadPreference,
    /// Per-request override header, if honoured.
    pub read_preference_header: Option<HeaderName>,
    /// Reveal the upstream address in responses.
    pub expose_upstream: bool,
    /// Replicas further behind than this (milliseconds) serve no reads.
    pub max_replica_lag_ms: Option<u64>,
}

/// Whether a request may change state; decides which nodes may see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestClass {
    /// GET, HEAD, OPTIONS: may be served by replicas.
    Read = 0,
    /// Everything else: the primary only, always.
    Write = 1,
}

impl RequestClass {
    /// The class of `method`.
    #[inline]
    pub fn of(method: &Method) -> RequestClass {
        if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
            RequestClass::Read
        } else {
            RequestClass::Write
        }
    }

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestClass::Read => "read",
            RequestClass::Write => "write",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_head_options_are_reads() {
        for m in ["GET", "HEAD", "OPTIONS"] {
            assert_eq!(RequestClass::of(&m.parse().unwrap()), RequestClass::Read);
        }
        // TRACE is idempotent but not a read: it must never reach a replica.
        for m in ["POST", "PUT", "DELETE", "PATCH", "TRACE", "FOO"] {
            assert_eq!(
                RequestClass::of(&m.parse().unwrap()),
                RequestClass::Write,
                "{m}"
            );
        }
    }
}
