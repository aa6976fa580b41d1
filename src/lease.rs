//! A primary's lease (SPEC §8): the time during which it may take writes
//! without hearing from the coordinator again.
//!
//! **The timing rule.** A node is declared dead, and its replica promoted,
//! no sooner than `heartbeat_timeout` after the coordinator last *received*
//! one of its heartbeats. The agent counts the lease from *before* it sent
//! that heartbeat, on its own monotonic clock, so on a perfect clock the
//! lease ends before the coordinator could act as long as
//! `lease < heartbeat_timeout`. Real clocks run at slightly different rates:
//! if the node's clock runs slow by a factor up to `1 + ρ` and the
//! coordinator's fast by as much, the lease must satisfy
//!
//! ```text
//!     lease × (1 + ρ)² < heartbeat_timeout        (ρ = MAX_CLOCK_RATE_DRIFT)
//! ```
//!
//! and the renewals must come often enough that a healthy primary never
//! lapses: the agent's `interval` plus a heartbeat's round trip well under
//! the lease (the agent warns when `2 × interval ≥ lease`). This is
//! Patroni's `loop_wait + 2 × retry_timeout ≤ ttl` turned around: there the
//! leader key's TTL must outlast the renewals; here the lease must end
//! before the failover. A SIGSTOPped or partitioned primary resumes with an
//! expired lease, because the monotonic clock kept counting.
//!
//! The coordinator grants a lease only while it leads and both the map it
//! serves and the one it is deciding on name the node primary, after
//! recording the heartbeat: a heartbeat that races a promotion either keeps
//! the primary alive (the sweep sees it) or gets no lease.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How much faster or slower than real time any process's monotonic clock
/// may run (1 %: NTP-disciplined clocks drift by tens of parts per million;
/// the margin also covers scheduling delays in reading the clock).
pub const MAX_CLOCK_RATE_DRIFT: f64 = 0.01;

/// The longest lease that is safe with `heartbeat_timeout` (see the module
/// comment), rounded down to a millisecond.
pub fn longest_safe(heartbeat_timeout: Duration) -> Duration {
    let factor = (1.0 + MAX_CLOCK_RATE_DRIFT) * (1.0 + MAX_CLOCK_RATE_DRIFT);
    let ms = (heartbeat_timeout.as_secs_f64() * 1000.0 / factor).floor();
    // Strictly below: a lease equal to the bound is not safe.
    Duration::from_millis((ms as u64).saturating_sub(1))
}

/// The default lease: two thirds of the heartbeat timeout, well inside the
/// bound, leaving a third for the coordinator's sweep and clock margins.
pub fn default_for(heartbeat_timeout: Duration) -> Duration {
    (heartbeat_timeout * 2 / 3).min(longest_safe(heartbeat_timeout))
}

/// A node's lease, shared by its agent (which renews it) and whatever
/// enforces it (the node in-process, or the gate).
#[derive(Debug, Default)]
pub struct Lease {
    until: Mutex<Option<Instant>>,
}

impl Lease {
    /// A heartbeat sent at `sent` was answered with a lease of `length`:
    /// valid until `sent + length`. Never shortens a lease already held.
    pub fn renew(&self, sent: Instant, length: Duration) {
        if length.is_zero() {
            return;
        }
        let until = sent + length;
        let mut held = self.until.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_none_or(|h| until > h) {
            *held = Some(until);
        }
    }

    /// Give the lease up at once (the node was demoted or fenced).
    pub fn revoke(&self) {
        *self.until.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether the lease is valid at `now`.
    pub fn valid_at(&self, now: Instant) -> bool {
        self.until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|until| now < until)
    }

    /// Whether the lease is valid now.
    pub fn valid(&self) -> bool {
        self.valid_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_ends_before_the_coordinator_may_act_even_on_drifting_clocks() {
        for timeout_ms in [1_000, 3_000, 15_000, 60_000] {
            let timeout = Duration::from_millis(timeout_ms);
            let lease = default_for(timeout);
            let worst = lease.as_secs_f64() * (1.0 + MAX_CLOCK_RATE_DRIFT).powi(2);
            assert!(worst < timeout.as_secs_f64(), "{lease:?} for {timeout:?}");
            assert!(longest_safe(timeout) >= lease);
            let longest =
                longest_safe(timeout).as_secs_f64() * (1.0 + MAX_CLOCK_RATE_DRIFT).powi(2);
            assert!(longest < timeout.as_secs_f64());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_counts_from_before_the_heartbeat_was_sent_and_never_shrinks() {
        let lease = Lease::default();
        assert!(!lease.valid(), "no lease until one is granted");
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(300)).await;
        lease.renew(sent, Duration::from_millis(1_000));
        assert!(lease.valid());
        tokio::time::advance(Duration::from_millis(699)).await;
        assert!(lease.valid());
        // An older answer arriving late does not shorten it.
        lease.renew(
            sent - Duration::from_millis(500),
            Duration::from_millis(1_000),
        );
        assert!(lease.valid());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!lease.valid(), "1 s after the send, not after the answer");
        lease.renew(Instant::now(), Duration::from_millis(1_000));
        assert!(lease.valid());
        lease.revoke();
        assert!(!lease.valid());
    }
}
