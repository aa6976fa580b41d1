//! Peak-EWMA latency estimate per upstream, for the `nearest` read preference.
//!
//! Peak-sensitive: a slower observation replaces the estimate at once, a faster
//! one pulls it down gradually. A node that turns slow is avoided immediately
//! and trusted again only as it proves itself.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Decay constant: how quickly old observations are forgotten.
const DECAY: Duration = Duration::from_secs(10);

struct State {
    estimate_ns: f64,
    at: Instant,
}

/// A latency estimate, fed with response times.
pub struct PeakEwma {
    state: Mutex<State>,
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
            state: Mutex::new(State {
                estimate_ns: initial.as_nanos() as f64,
                at: Instant::now(),
            }),
        }
    }

    /// Feed one observed latency.
    pub fn observe(&self, rtt: Duration) {
        let now = Instant::now();
        let rtt = rtt.as_nanos() as f64;
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if rtt > s.estimate_ns {
            s.estimate_ns = rtt;
        } else {
            let elapsed = now.saturating_duration_since(s.at).as_nanos() as f64;
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            s.estimate_ns = s.estimate_ns * w + rtt * (1.0 - w);
        }
        s.at = now;
    }

    /// The current estimate.
    pub fn estimate(&self) -> Duration {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Duration::from_nanos(s.estimate_ns as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn peaks_jump_up_and_decay_down() {
        let e = PeakEwma::new(MS);
        e.observe(100 * MS);
        assert_eq!(e.estimate(), 100 * MS, "a slower sample takes over at once");
        tokio::time::advance(Duration::from_secs(1)).await;
        e.observe(MS);
        let after_1s = e.estimate();
        assert!(after_1s < 100 * MS && after_1s > 50 * MS, "{after_1s:?}");
        tokio::time::advance(Duration::from_secs(60)).await;
        e.observe(MS);
        assert!(e.estimate() < 2 * MS, "{:?}", e.estimate());
    }
}
