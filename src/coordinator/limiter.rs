//! Per-node heartbeat rate limiting: one token bucket per node id, so a node
//! heartbeating far too fast is refused without starving any other.

use std::collections::HashMap;
use std::sync::Mutex;
use tokio::time::Instant;

/// Distinct node ids tracked before idle ones are forgotten.
const MAX_TRACKED: usize = 10_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by node id.
pub(super) struct RateLimiter {
    per_second: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `per_second` heartbeats per node, with a burst of the same size.
    pub(super) fn new(per_second: u32) -> RateLimiter {
        RateLimiter {
            per_second: f64::from(per_second.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take a token for `node`; `false` when it is over its rate.
    pub(super) fn allow(&self, node: &str) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(node) {
            // Forget nodes quiet for a minute; their next heartbeat starts full.
            buckets.retain(|_, b| now.saturating_duration_since(b.at).as_secs() < 60);
        }
        let b = buckets.entry(node.to_owned()).or_insert(Bucket {
            tokens: self.per_second,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.per_second;
        b.tokens = (b.tokens + refill).min(self.per_second);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_flooding_node_is_limited_and_others_are_not() {
        let l = RateLimiter::new(2);
        assert!(l.allow("flood"));
        assert!(l.allow("flood"));
        assert!(!l.allow("flood"));
        assert!(l.allow("calm"), "another node has its own bucket");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(l.allow("flood"), "tokens refill at the configured rate");
        assert!(!l.allow("flood"));
    }
}
