//! Peak-EWMA latency estimate per upstream, for the `nearest` read preference.
//!
//! Peak-sensitive: a slower observation replaces the estimate at once, a faster
//! one pulls it down gradually. A node that turns slow is avoided immediately
//! and trusted again only as it proves itself.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::time::Instant;

/// Decay constant: how quickly old observations are forgotten.
const DECAY: Duration = Duration::from_secs(10);

/// A latency estimate, fed with response times.
///
/// Two relaxed atomics rather than a lock: concurrent updates may lose one
/// observation, which an estimate tolerates, and the request path never waits.
pub struct PeakEwma {
    origin: Instant,
    estimate_ns: AtomicU64,
    at_ns: AtomicU64,
}

impl Default for PeakEwma {
    fn default() -> Self {
        PeakEwma::new(Duration::from_millis(1))
    }
}

impl PeakEwma {
    /// An estimate starting at `initial` (optimistic, so new nodes get tried).
    pub fn new(initial: Duration) -> PeakEwma {
        PeakEwma {
            origin: Instant::now(),
            estimate_ns: AtomicU64::new(initial.as_nanos() as u64),
            at_ns: AtomicU64::new(0),
        }
    }

    /// Feed one latency observed at `now`.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        // Through u64: a u128 to f64 conversion is a slow library call.
        let rtt = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX) as f64;
        let now_ns = now.saturating_duration_since(self.origin).as_nanos() as u64;
        let estimate = self.estimate_ns.load(Relaxed) as f64;
        let next = if rtt > estimate {
            rtt
        } else {
            let elapsed = now_ns.saturating_sub(self.at_ns.load(Relaxed)) as f64;
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            estimate * w + rtt * (1.0 - w)
        };
        self.estimate_ns.store(next as u64, Relaxed);
        self.at_ns.store(now_ns, Relaxed);
    }

    /// The current estimate.
    pub fn estimate(&self) -> Duration {
        Duration::from_nanos(self.estimate_ns.load(Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn peaks_jump_up_and_decay_down() {
        let e = PeakEwma::new(MS);
        e.observe(100 * MS, Instant::now());
        assert_eq!(e.estimate(), 100 * MS, "a slower sample takes over at once");
        tokio::time::advance(Duration::from_secs(1)).await;
        e.observe(MS, Instant::now());
        let after_1s = e.estimate();
        assert!(after_1s < 100 * MS && after_1s > 50 * MS, "{after_1s:?}");
        tokio::time::advance(Duration::from_secs(60)).await;
        e.observe(MS, Instant::now());
        assert!(e.estimate() < 2 * MS, "{:?}", e.estimate());
    }
}
