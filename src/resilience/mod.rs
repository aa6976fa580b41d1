//! Keeping one failing node from becoming an outage: backoff, retry rules,
//! the retry budget and circuit breakers (SPEC §3).

mod backoff;
mod breaker;
mod budget;
mod window;

pub use backoff::{Backoff, Jitter, UnknownJitter};
pub use breaker::{Breaker, BreakerConfig, BreakerObserver, BreakerState, Permit};
pub use budget::{BudgetConfig, RetryBudget};
pub use window::{Counter, RollingWindow};

use http::{Method, StatusCode};

/// When and how often a request may be tried again.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts including the first (1 disables retries).
    pub max_attempts: u32,
    /// Spacing between attempts at the same upstream.
    pub backoff: Backoff,
    /// Upstream statuses that count as a failed attempt for idempotent requests.
    pub retry_statuses: StatusSet,
    /// Request bodies up to this size are kept so they can be replayed.
    pub buffer_limit: usize,
}

/// What counts as an upstream failure, and what to do when every node's
/// breaker is open.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerPolicy {
    /// Statuses that count as failures.
    pub failure_statuses: StatusSet,
    /// Behaviour when all candidates are open.
    pub when_all_open: AllOpen,
}

/// What happens when every node a request may use has an open breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllOpen {
    /// Answer `503 no_healthy_upstream` at once.
    FailFast,
    /// Send to the node whose breaker reopens soonest.
    FailOpen,
}

/// A set of HTTP status codes, as a 512-bit map so membership is one shift.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StatusSet([u64; 8]);

impl StatusSet {
    /// A set holding `codes`; codes outside 0..512 are ignored by construction
    /// because `StatusCode` is always 100..=999 and config validation refuses 600+.
    pub fn from_codes(codes: &[u16]) -> StatusSet {
        let mut set = StatusSet::default();
        for &c in codes {
            if c < 512 {
                set.0[(c / 64) as usize] |= 1 << (c % 64);
            }
        }
        set
    }

    /// Whether `status` is in the set.
    #[inline]
    pub fn contains(&self, status: StatusCode) -> bool {
        let c = status.as_u16();
        c < 512 && self.0[(c / 64) as usize] & (1 << (c % 64)) != 0
    }
}

/// RFC 9110 §9.2.2: methods whose repetition has the same effect as one request.
#[inline]
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// How far an attempt got before it failed; decides whether replay is safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Nothing was written to the upstream: safe to send again, whatever the method.
    NotSent,
    /// Some or all of the request may have reached the upstream.
    MaybeSent,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_follows_rfc_9110() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(is_idempotent(&m.parse().unwrap()), "{m}");
        }
        for m in ["POST", "PATCH", "CONNECT", "PURGE"] {
            assert!(!is_idempotent(&m.parse().unwrap()), "{m}");
        }
    }

    #[test]
    fn status_set_membership() {
        let s = StatusSet::from_codes(&[502, 503, 504]);
        assert!(s.contains(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!s.contains(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!s.contains(StatusCode::from_u16(999).unwrap()));
    }
}
