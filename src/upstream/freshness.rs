//! How far behind its primary a node is, as the proxy knows it (SPEC §7):
//! the newest write the node's own answers said it had applied
//! (`x-shardgate-applied`, and `x-shardgate-hlc` on writes), and the lag the
//! coordinator last reported for it, and how far behind its primary its
//! latest judged answer was. All of it only informs; none is a promise about
//! the node's next answer, which is checked again.

use crate::clock::Hlc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::time::Instant;

/// No lag reported.
const UNKNOWN: u64 = u64::MAX;

/// One node's freshness.
#[derive(Debug)]
pub struct Freshness {
    applied: AtomicU64,
    reported_lag_ms: AtomicU64,
    /// The gap its latest judged answer showed, and when (`since_start_ms`;
    /// 0: never judged).
    observed_gap_ms: AtomicU64,
    observed_at_ms: AtomicU64,
}

impl Default for Freshness {
    fn default() -> Freshness {
        Freshness {
            applied: AtomicU64::new(0),
            reported_lag_ms: AtomicU64::new(UNKNOWN),
            observed_gap_ms: AtomicU64::new(0),
            observed_at_ms: AtomicU64::new(0),
        }
    }
}

impl Freshness {
    /// The node said it has applied `hlc`; knowledge only grows.
    #[inline]
    pub fn note_applied(&self, hlc: Hlc) {
        // A plain load first: most answers repeat what is known, and a
        // read-modify-write on a shared line costs every core.
        if hlc.as_u64() > self.applied.load(Ordering::Relaxed) {
            self.applied.fetch_max(hlc.as_u64(), Ordering::Relaxed);
        }
    }

    /// The newest write it is known to have applied.
    #[inline]
    pub fn applied(&self) -> Hlc {
        Hlc::from_u64(self.applied.load(Ordering::Relaxed))
    }

    /// The coordinator's latest report of its lag (`None`: not reported).
    pub fn set_reported_lag(&self, lag_ms: Option<u64>) {
        self.reported_lag_ms.store(
            lag_ms.map_or(UNKNOWN, |l| l.min(UNKNOWN - 1)),
            Ordering::Relaxed,
        );
    }

    /// The lag the coordinator last reported, if any.
    #[inline]
    pub fn reported_lag_ms(&self) -> Option<u64> {
        let l = self.reported_lag_ms.load(Ordering::Relaxed);
        (l != UNKNOWN).then_some(l)
    }

    /// An answer of the node's was `gap_ms` behind its primary at `at_ms`.
    pub fn observe_gap(&self, gap_ms: u64, at_ms: u64) {
        self.observed_gap_ms.store(gap_ms, Ordering::Relaxed);
        self.observed_at_ms.store(at_ms.max(1), Ordering::Relaxed);
    }

    /// The gap its latest judged answer showed, if it was judged after `since_ms`.
    #[inline]
    pub fn observed_gap_since(&self, since_ms: u64) -> Option<u64> {
        let at = self.observed_at_ms.load(Ordering::Relaxed);
        (at != 0 && at >= since_ms).then(|| self.observed_gap_ms.load(Ordering::Relaxed))
    }
}

/// Milliseconds since this process first asked: a monotonic clock for
/// freshness observations (never 0 once asked, so 0 can mean "never").
pub fn since_start_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}
