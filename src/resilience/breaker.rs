//! Circuit breaker per upstream (SPEC §3).
//!
//! Closed: every request passes; it opens on N consecutive failures or on a
//! failure ratio over a rolling window with a minimum volume. Open: requests
//! are refused at once, for a jittered cool-down that grows with repeated trips
//! and never drops below the minimum open time. Half-open: a bounded number of
//! probes pass; the first success closes it, a failure re-opens it.

use super::backoff::Backoff;
use super::window::{Counter, RollingWindow};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Breaker parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker; 0 disables this trigger.
    pub consecutive_failures: u32,
    /// Failure ratio over the window that opens the breaker; above 1.0 disables it.
    pub failure_ratio: f64,
    /// Window for the ratio.
    pub window: Duration,
    /// Requests the window must hold before the ratio counts.
    pub min_requests: u32,
    /// Cool-down: `base` is the minimum open time, doubling per repeated trip up to `max`.
    pub cool_down: Backoff,
    /// Probes admitted at once while half-open.
    pub half_open_probes: u32,
}

/// The three states, numbered as the `shardgate_breaker_state` gauge reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BreakerState {
    /// Requests flow.
    Closed = 0,
    /// A few probes flow.
    HalfOpen = 1,
    /// Requests are refused without touching the network.
    Open = 2,
}

impl BreakerState {
    fn from_u8(v: u8) -> BreakerState {
        match v {
            0 => BreakerState::Closed,
            1 => BreakerState::HalfOpen,
            _ => BreakerState::Open,
        }
    }

    /// Lower-case name for metrics labels and admin output.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }
}

/// Told about every state change (metrics, logs).
pub trait BreakerObserver: Send + Sync {
    /// The breaker moved to `to`.
    fn transition(&self, to: BreakerState);
}

impl BreakerObserver for () {
    fn transition(&self, _to: BreakerState) {}
}

struct Inner {
    open_until: Instant,
    trips: u32,
    probes_in_flight: u32,
    last_closed: Instant,
    last_delay: Option<Duration>,
}

/// A circuit breaker; cheap to consult while closed (one atomic load).
pub struct Breaker {
    cfg: BreakerConfig,
    state: AtomicU8,
    consecutive: AtomicU32,
    /// A = successes, B = failures, while closed.
    window: RollingWindow,
    inner: Mutex<Inner>,
    observer: Box<dyn BreakerObserver>,
}

/// Leave to send one request; settle it with the outcome.
///
/// Dropping an unsettled probe gives its slot back, so a cancelled request
/// cannot leave the breaker stuck half-open.
#[must_use = "a permit must be settled with success() or failure()"]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    settled: bool,
}

impl Permit<'_> {
    /// The upstream answered acceptably (at `at`, a time the caller already read).
    pub fn success(mut self, at: Instant) {
        self.settled = true;
        self.breaker.on_success(self.probe, at);
    }

    /// The upstream failed (connect error, reset, timeout, failure status).
    pub fn failure(mut self, at: Instant) {
        self.settled = true;
        self.breaker.on_failure(self.probe, at);
    }

    /// Whether this permit is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            let mut inner = self.breaker.lock();
            inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
        }
    }
}

impl Breaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig, observer: Box<dyn BreakerObserver>) -> Breaker {
        let now = Instant::now();
        observer.transition(BreakerState::Closed);
        Breaker {
            cfg,
            state: AtomicU8::new(BreakerState::Closed as u8),
            consecutive: AtomicU32::new(0),
            window: RollingWindow::new(cfg.window.as_secs().clamp(1, 3600) as u32),
            inner: Mutex::new(Inner {
                open_until: now,
                trips: 0,
                probes_in_flight: 0,
                last_closed: now,
                last_delay: None,
            }),
            observer,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave Inner inconsistent in a
        // way that matters more than refusing all traffic would.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current state (an open breaker past its cool-down still reads open
    /// until a request asks).
    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// When an open breaker will next admit a probe, if it is open.
    pub fn open_until(&self) -> Option<Instant> {
        (self.state() == BreakerState::Open).then(|| self.lock().open_until)
    }

    /// Leave to send a request now, or `None` without any wait.
    pub fn try_acquire(&self) -> Option<Permit<'_>> {
        if self.state() == BreakerState::Closed {
            return Some(self.permit(false));
        }
        let mut inner = self.lock();
        match self.state() {
            BreakerState::Closed => Some(self.permit(false)),
            BreakerState::Open if Instant::now() >= inner.open_until => {
                inner.probes_in_flight = 1;
                self.set(BreakerState::HalfOpen);
                Some(self.permit(true))
            }
            BreakerState::Open => None,
            BreakerState::HalfOpen if inner.probes_in_flight < self.cfg.half_open_probes => {
                inner.probes_in_flight += 1;
                Some(self.permit(true))
            }
            BreakerState::HalfOpen => None,
        }
    }

    /// Send regardless of state (fail-open when every node is refused); the
    /// outcome still counts.
    pub fn force_acquire(&self) -> Permit<'_> {
        self.permit(false)
    }

    /// A failure seen outside a permit, e.g. a reset while streaming a body.
    pub fn record_failure(&self) {
        self.on_failure(false, Instant::now());
    }

    fn permit(&self, probe: bool) -> Permit<'_> {
        Permit {
            breaker: self,
            probe,
            settled: false,
        }
    }

    fn set(&self, to: BreakerState) {
        self.state.store(to as u8, Ordering::Release);
        self.observer.transition(to);
    }

    fn on_success(&self, probe: bool, at: Instant) {
        if probe {
            let mut inner = self.lock();
            inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
            if self.state() == BreakerState::HalfOpen {
                self.close(&mut inner);
            }
            return;
        }
        if self.state() != BreakerState::Closed {
            return;
        }
        // Skip the store when already zero: keeps the cache line shared on the hot path.
        if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
        }
        if self.cfg.failure_ratio <= 1.0 {
            self.window.add(Counter::A, at);
        }
    }

    fn on_failure(&self, probe: bool, at: Instant) {
        if probe {
            let mut inner = self.lock();
            inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
            if self.state() == BreakerState::HalfOpen {
                self.open(&mut inner);
            }
            return;
        }
        if self.state() != BreakerState::Closed {
            return;
        }
        let run = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if self.cfg.failure_ratio <= 1.0 {
            self.window.add(Counter::B, at);
        }
        if self.should_trip(run, at) {
            let mut inner = self.lock();
            if self.state() == BreakerState::Closed {
                self.open(&mut inner);
            }
        }
    }

    fn should_trip(&self, run: u32, at: Instant) -> bool {
        if self.cfg.consecutive_failures > 0 && run >= self.cfg.consecutive_failures {
            return true;
        }
        if self.cfg.failure_ratio > 1.0 {
            return false;
        }
        let (ok, failed) = self.window.totals(at);
        let total = ok + failed;
        total >= u64::from(self.cfg.min_requests.max(1))
            && failed as f64 >= self.cfg.failure_ratio * total as f64
    }

    fn open(&self, inner: &mut Inner) {
        let now = Instant::now();
        // A breaker that stayed closed for a long while starts its growth afresh;
        // one that flaps keeps doubling.
        let calm = now.saturating_duration_since(inner.last_closed) > self.cfg.cool_down.max * 2;
        inner.trips = if calm || inner.trips == 0 {
            1
        } else {
            inner.trips.saturating_add(1)
        };
        let jittered =
            self.cfg
                .cool_down
                .delay(inner.trips - 1, inner.last_delay, &mut rand::rng());
        let delay = jittered.max(self.cfg.cool_down.base);
        inner.last_delay = Some(delay);
        inner.open_until = now + delay;
        inner.probes_in_flight = 0;
        self.consecutive.store(0, Ordering::Relaxed);
        self.window.clear();
        self.set(BreakerState::Open);
    }

    fn close(&self, inner: &mut Inner) {
        inner.last_closed = Instant::now();
        self.consecutive.store(0, Ordering::Relaxed);
        self.window.clear();
        self.set(BreakerState::Closed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::Jitter;
    use std::sync::Arc;

    const SEC: Duration = Duration::from_secs(1);

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 5,
            failure_ratio: 0.5,
            window: 10 * SEC,
            min_requests: 20,
            cool_down: Backoff {
                base: 5 * SEC,
                max: 60 * SEC,
                jitter: Jitter::Equal,
            },
            half_open_probes: 2,
        }
    }

    #[derive(Default)]
    struct Log(Mutex<Vec<BreakerState>>);
    impl BreakerObserver for Arc<Log> {
        fn transition(&self, to: BreakerState) {
            self.0.lock().unwrap().push(to);
        }
    }

    fn fail(b: &Breaker, n: usize) {
        for _ in 0..n {
            b.try_acquire().expect("admitted").failure(Instant::now());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_consecutive_failures_and_refuses_without_waiting() {
        let b = Breaker::new(config(), Box::new(()));
        fail(&b, 4);
        assert_eq!(b.state(), BreakerState::Closed);
        b.try_acquire().unwrap().success(Instant::now());
        fail(&b, 4);
        assert_eq!(b.state(), BreakerState::Closed, "a success resets the run");
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_acquire().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_failure_ratio_only_with_minimum_volume() {
        let cfg = BreakerConfig {
            consecutive_failures: 0,
            ..config()
        };
        let b = Breaker::new(cfg, Box::new(()));
        // Alternate: never 5 in a row, but half of all requests fail.
        for i in 0..19 {
            let p = b.try_acquire().unwrap();
            if i % 2 == 0 {
                p.failure(Instant::now());
            } else {
                p.success(Instant::now());
            }
        }
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "19 requests is below the volume"
        );
        b.try_acquire().unwrap().failure(Instant::now());
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_bounded_probes_and_closes_on_success() {
        let b = Breaker::new(config(), Box::new(()));
        fail(&b, 5);
        tokio::time::advance(5 * SEC).await;
        let p1 = b.try_acquire().expect("first probe");
        assert!(p1.is_probe());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let p2 = b.try_acquire().expect("second probe");
        assert!(b.try_acquire().is_none(), "only two probes at once");
        drop(p2);
        let p3 = b.try_acquire().expect("a dropped probe frees its slot");
        p1.success(Instant::now());
        assert_eq!(b.state(), BreakerState::Closed);
        p3.failure(Instant::now());
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "late probe outcomes are ignored once closed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cool_down_never_undercuts_the_minimum_and_grows_while_flapping() {
        let log = Arc::new(Log::default());
        let b = Breaker::new(config(), Box::new(log.clone()));
        let mut opened_for = Vec::new();
        for _ in 0..5 {
            fail(&b, 5);
            let until = b.open_until().expect("open");
            let open_for = until - Instant::now();
            assert!(
                open_for >= 5 * SEC,
                "{open_for:?} is below the minimum open time"
            );
            opened_for.push(open_for);
            // Still refused one tick before the cool-down ends.
            tokio::time::advance(open_for - Duration::from_millis(1)).await;
            assert!(b.try_acquire().is_none());
            tokio::time::advance(Duration::from_millis(1)).await;
            b.try_acquire().expect("probe").failure(Instant::now());
            assert_eq!(b.state(), BreakerState::Open);
            let until = b.open_until().unwrap();
            tokio::time::advance(until - Instant::now()).await;
            b.try_acquire().expect("probe").success(Instant::now());
        }
        assert!(opened_for[4] > opened_for[0] * 2, "{opened_for:?}");
        assert!(opened_for.iter().all(|d| *d <= 60 * SEC));
        let log = log.0.lock().unwrap();
        assert_eq!(log[0], BreakerState::Closed);
        assert_eq!(log[1], BreakerState::Open);
        assert_eq!(log[2], BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn growth_resets_after_a_calm_period() {
        let b = Breaker::new(config(), Box::new(()));
        for _ in 0..4 {
            fail(&b, 5);
            let until = b.open_until().unwrap();
            tokio::time::advance(until - Instant::now()).await;
            b.try_acquire().unwrap().success(Instant::now());
        }
        tokio::time::advance(200 * SEC).await;
        fail(&b, 5);
        let open_for = b.open_until().unwrap() - Instant::now();
        assert!(open_for <= 5 * SEC, "{open_for:?}");
    }
}
