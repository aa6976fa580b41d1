//! The process-wide memory bound: Envoy's overload manager with its
//! fixed-heap monitor, in one rule.
//!
//! Per-connection buffers are bounded (hyper's queues, capped upstream read
//! buffers, send timeouts), but many slow clients together can still hold a
//! lot. Every [`SAMPLE_EVERY`] (a second) the watch reads the bytes the allocator has
//! handed out; over `max_memory_bytes`, new requests are refused with
//! `503 overloaded` (`shardgate_load_shed_total{reason="memory"}`) until it
//! is back under 90 % of the bound, while requests already admitted finish.
//! The request path pays one relaxed load.

use super::pipeline::InflightLimit;
use metrics::Gauge;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the allocator's counters are read: Envoy's overload manager
/// refreshes every second too. Refreshing jemalloc's counters merges every
/// arena's (tens of thousands of instructions): at ten a second it was
/// visible in `benches/instructions.py`, whose requests crawl under valgrind.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Bytes allocated and not yet freed, as the allocator counts them.
///
/// jemalloc's counters are refreshed by advancing its stats epoch; a process
/// whose global allocator is not jemalloc (the library's unit tests) reads
/// close to nothing.
pub(crate) fn allocated() -> Option<u64> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    tikv_jemalloc_ctl::stats::allocated::read()
        .ok()
        .and_then(|b| u64::try_from(b).ok())
}

/// Whether the process is over its bound, given whether it was: refusal
/// starts above `max` and ends below 90 % of it, so it does not flap.
fn over(allocated: u64, max: u64, was_over: bool) -> bool {
    if max == 0 {
        false
    } else if was_over {
        allocated >= max / 10 * 9
    } else {
        allocated > max
    }
}

/// Sample the allocator until `shutdown`, publishing `allocated` on `gauge`
/// and telling `limit` when the process is over its memory bound.
pub(crate) async fn watch(limit: Arc<InflightLimit>, gauge: Gauge, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_over = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(bytes) = allocated() else { continue };
        gauge.set(bytes as f64);
        let max = limit.max_memory();
        let now_over = over(bytes, max, was_over);
        if now_over != was_over {
            if now_over {
                tracing::warn!(
                    allocated = bytes,
                    max,
                    "over the memory bound: refusing new requests"
                );
            } else {
                tracing::info!(allocated = bytes, max, "back under the memory bound");
            }
            limit.set_over_memory(now_over);
            was_over = now_over;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_starts_above_the_bound_and_ends_below_ninety_percent_of_it() {
        assert!(!over(100, 100, false), "at the bound is not over it");
        assert!(over(101, 100, false));
        assert!(
            over(95, 100, true),
            "still refusing between 90 % and the bound"
        );
        assert!(!over(89, 100, true));
        assert!(!over(u64::MAX, 0, false), "0 means no bound");
    }
}
