//! Retry budget: retries may not exceed a ratio of recent requests plus a floor.
//!
//! Without it, a struggling cluster is buried by its own retries: every client
//! multiplies load by its attempt count exactly when capacity is lowest.

use super::window::{Counter, RollingWindow};
use std::time::Duration;
use tokio::time::Instant;

/// Budget parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetConfig {
    /// Retries allowed per request over the window (0.2 = 20%).
    pub ratio: f64,
    /// Window over which requests and retries are counted.
    pub window: Duration,
    /// Retries per second always allowed, so low traffic can still retry.
    pub min_per_second: u32,
}

/// A shared retry budget.
pub struct RetryBudget {
    cfg: BudgetConfig,
    /// A = requests, B = retries.
    window: RollingWindow,
}

impl RetryBudget {
    /// A budget with nothing spent.
    pub fn new(cfg: BudgetConfig) -> RetryBudget {
        RetryBudget {
            cfg,
            window: RollingWindow::new(cfg.window.as_secs().clamp(1, 3600) as u32),
        }
    }

    /// Count one original request (a deposit) arriving at `at`.
    pub fn deposit(&self, at: Instant) {
        self.window.add(Counter::A, at);
    }

    /// Reserve one retry at `now`, when it is decided (before any backoff), or refuse.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let (requests, retries) = self.window.totals(now);
        let floor = u64::from(self.cfg.min_per_second) * u64::from(self.window.seconds());
        let allowed = (self.cfg.ratio * requests as f64) as u64 + floor;
        if retries < allowed {
            self.window.add(Counter::B, now);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(min_per_second: u32) -> RetryBudget {
        RetryBudget::new(BudgetConfig {
            ratio: 0.2,
            window: Duration::from_secs(10),
            min_per_second,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_capped_at_the_ratio_of_requests() {
        let b = budget(0);
        for _ in 0..100 {
            b.deposit(Instant::now());
        }
        let granted = (0..100).filter(|_| b.try_withdraw(Instant::now())).count();
        assert_eq!(granted, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_allows_retries_with_no_traffic_then_refills_over_time() {
        let b = budget(1);
        let granted = (0..100).filter(|_| b.try_withdraw(Instant::now())).count();
        assert_eq!(granted, 10, "1/s over a 10 s window");
        assert!(!b.try_withdraw(Instant::now()));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            b.try_withdraw(Instant::now()),
            "spent retries leave the window"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_counts_immediately_even_if_the_retry_is_still_waiting() {
        let b = budget(0);
        for _ in 0..10 {
            b.deposit(Instant::now());
        }
        // Retries decided back to back, all still "in backoff": 20% of 10 is two,
        // and the third is refused because the first two already count.
        assert!(b.try_withdraw(Instant::now()));
        assert!(b.try_withdraw(Instant::now()));
        assert!(!b.try_withdraw(Instant::now()));
    }
}
