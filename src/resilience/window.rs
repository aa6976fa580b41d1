//! A rolling window of two counters in one-second slots, lock-free.
//!
//! The retry budget counts requests and retries; the breaker counts successes
//! and failures. Both need "how many in the last N seconds" cheaply on the hot
//! path, and both must be drivable by tokio's paused clock in tests.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use tokio::time::Instant;

struct Slot {
    /// Which second (since `origin`) the counts belong to.
    second: AtomicU64,
    a: AtomicU32,
    b: AtomicU32,
}

/// Two counters summed over the last `len` seconds.
pub struct RollingWindow {
    origin: Instant,
    slots: Box<[Slot]>,
}

/// Which of the two counters to bump.
#[derive(Clone, Copy, Debug)]
pub enum Counter {
    /// The first counter.
    A,
    /// The second counter.
    B,
}

impl RollingWindow {
    /// A window of `seconds` one-second slots (at least one).
    pub fn new(seconds: u32) -> RollingWindow {
        let slots = (0..seconds.max(1))
            .map(|_| Slot {
                second: AtomicU64::new(u64::MAX),
                a: AtomicU32::new(0),
                b: AtomicU32::new(0),
            })
            .collect();
        RollingWindow {
            origin: Instant::now(),
            slots,
        }
    }

    /// The window length in seconds.
    pub fn seconds(&self) -> u32 {
        self.slots.len() as u32
    }

    fn second_of(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_secs()
    }

    /// Count one event at `at` (callers pass a time they already read).
    pub fn add(&self, counter: Counter, at: Instant) {
        let now = self.second_of(at);
        let slot = &self.slots[(now % self.slots.len() as u64) as usize];
        let seen = slot.second.load(Relaxed);
        if seen != now
            && slot
                .second
                .compare_exchange(seen, now, Relaxed, Relaxed)
                .is_ok()
        {
            // We own the reset of this slot. A concurrent add that lands between
            // the exchange and these stores is lost: an undercount of one event
            // per slot turnover, which a budget and a breaker both tolerate.
            slot.a.store(0, Relaxed);
            slot.b.store(0, Relaxed);
        }
        match counter {
            Counter::A => slot.a.fetch_add(1, Relaxed),
            Counter::B => slot.b.fetch_add(1, Relaxed),
        };
    }

    /// The sums of both counters over the window ending at `at`.
    pub fn totals(&self, at: Instant) -> (u64, u64) {
        let now = self.second_of(at);
        let len = self.slots.len() as u64;
        self.slots
            .iter()
            .filter(|s| {
                let sec = s.second.load(Relaxed);
                sec != u64::MAX && sec <= now && now - sec < len
            })
            .fold((0, 0), |(a, b), s| {
                (
                    a + u64::from(s.a.load(Relaxed)),
                    b + u64::from(s.b.load(Relaxed)),
                )
            })
    }

    /// Forget everything counted so far.
    pub fn clear(&self) {
        for s in self.slots.iter() {
            s.second.store(u64::MAX, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn counts_expire_after_the_window() {
        let w = RollingWindow::new(3);
        let now = Instant::now;
        w.add(Counter::A, now());
        w.add(Counter::B, now());
        w.add(Counter::B, now());
        assert_eq!(w.totals(now()), (1, 2));
        tokio::time::advance(Duration::from_secs(2)).await;
        w.add(Counter::A, now());
        assert_eq!(w.totals(now()), (2, 2));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            w.totals(now()),
            (1, 0),
            "the first second has left the window"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(w.totals(now()), (0, 0));
        w.add(Counter::A, now());
        assert_eq!(w.totals(now()), (1, 0), "a reused slot starts from zero");
    }
}
