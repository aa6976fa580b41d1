//! The hybrid logical clock (SPEC §7), shared by every process: proxy, node,
//! agent and coordinator.
//!
//! An [`Hlc`] is 64 bits: the upper 48 are physical milliseconds since the
//! Unix epoch, the lower 16 a logical counter that breaks ties. Packed this
//! way, the clock's order is the integer order, so "later" is `>`. On the
//! wire it is 16 lowercase hex digits.
//!
//! [`HlcClock`] never goes backwards, whatever the wall clock does: a reading
//! is above every reading it gave before and every stamp it has observed. A
//! wall clock that steps back only stops the physical part from moving until
//! the wall catches up; the logical part keeps readings distinct meanwhile.
//! A peer's stamp far ahead of our wall clock is refused rather than
//! adopted, so one node with a wild clock cannot drag every clock in the
//! cluster into its future (CockroachDB's max-offset rule).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Bits of the logical counter.
const LOGICAL_BITS: u32 = 16;

/// How far ahead of our wall clock a peer's stamp may be before it is
/// refused. Generous beside NTP's milliseconds; the coordinator marks a node
/// DEGRADED at a much smaller skew.
pub const DEFAULT_MAX_AHEAD: Duration = Duration::from_secs(10);

/// One hybrid logical timestamp.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hlc(u64);

impl Hlc {
    /// Before every real timestamp.
    pub const ZERO: Hlc = Hlc(0);

    /// From physical milliseconds and a logical counter.
    pub fn new(physical_ms: u64, logical: u16) -> Hlc {
        Hlc((physical_ms << LOGICAL_BITS) | u64::from(logical))
    }

    /// From its 64-bit form.
    pub const fn from_u64(raw: u64) -> Hlc {
        Hlc(raw)
    }

    /// Its 64-bit form.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Milliseconds since the Unix epoch.
    pub const fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// The logical counter.
    pub const fn logical(self) -> u16 {
        (self.0 & 0xffff) as u16
    }

    /// How far `self` is behind `newer` in physical time (zero if it is not).
    pub fn behind(self, newer: Hlc) -> Duration {
        Duration::from_millis(newer.physical_ms().saturating_sub(self.physical_ms()))
    }

    /// The wire form: 16 lowercase hex digits.
    pub fn to_hex(self) -> [u8; 16] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = DIGITS[((self.0 >> (60 - 4 * i)) & 0xf) as usize];
        }
        out
    }

    /// Read the wire form: exactly 16 lowercase hex digits.
    pub fn parse(text: &[u8]) -> Result<Hlc, HlcError> {
        if text.len() != 16 {
            return Err(HlcError::Length(text.len()));
        }
        let mut raw = 0u64;
        for &c in text {
            let digit = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                _ => return Err(HlcError::Digit),
            };
            raw = (raw << 4) | u64::from(digit);
        }
        Ok(Hlc(raw))
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for Hlc {
    type Err = HlcError;

    fn from_str(s: &str) -> Result<Hlc, HlcError> {
        Hlc::parse(s.as_bytes())
    }
}

/// A timestamp that is not an HLC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HlcError {
    /// Not 16 characters.
    #[error("an HLC is 16 hex digits, not {0} characters")]
    Length(usize),
    /// A character other than `0-9a-f`.
    #[error("an HLC is lowercase hex digits only")]
    Digit,
    /// A peer's stamp too far in our future.
    #[error("a stamp {ahead_ms} ms ahead of this clock is beyond the {max_ms} ms allowed")]
    TooFarAhead {
        /// How far ahead.
        ahead_ms: u64,
        /// The limit.
        max_ms: u64,
    },
}

/// Where a clock reads the wall time from.
#[derive(Clone, Debug)]
enum Wall {
    /// The system clock, shifted by an offset (tests give one node a skewed clock).
    System(Arc<AtomicI64>),
    /// A wall time set by hand (unit tests).
    Manual(Arc<AtomicU64>),
}

impl Wall {
    fn now_ms(&self) -> u64 {
        match self {
            Wall::System(offset) => {
                let ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                ms.saturating_add(offset.load(Ordering::Relaxed)).max(0) as u64
            }
            Wall::Manual(ms) => ms.load(Ordering::Relaxed),
        }
    }
}

/// A process's hybrid logical clock.
#[derive(Debug)]
pub struct HlcClock {
    last: AtomicU64,
    wall: Wall,
    max_ahead_ms: u64,
}

impl Default for HlcClock {
    fn default() -> HlcClock {
        HlcClock::new()
    }
}

impl HlcClock {
    /// A clock on the system's wall time.
    pub fn new() -> HlcClock {
        HlcClock::with_offset(0)
    }

    /// A clock whose wall time is the system's shifted by `offset_ms` (the
    /// test-only skew flags use this to give one node a drifting clock).
    pub fn with_offset(offset_ms: i64) -> HlcClock {
        HlcClock {
            last: AtomicU64::new(0),
            wall: Wall::System(Arc::new(AtomicI64::new(offset_ms))),
            max_ahead_ms: DEFAULT_MAX_AHEAD.as_millis() as u64,
        }
    }

    /// A clock whose wall time is whatever `wall_ms` holds.
    pub fn manual(wall_ms: Arc<AtomicU64>) -> HlcClock {
        HlcClock {
            last: AtomicU64::new(0),
            wall: Wall::Manual(wall_ms),
            max_ahead_ms: DEFAULT_MAX_AHEAD.as_millis() as u64,
        }
    }

    fn wall(&self) -> Hlc {
        Hlc::new(self.wall.now_ms(), 0)
    }

    /// This clock's wall time, milliseconds since the Unix epoch.
    pub fn wall_ms(&self) -> u64 {
        self.wall.now_ms()
    }

    /// A new timestamp, above every one this clock gave or observed.
    pub fn now(&self) -> Hlc {
        let wall = self.wall().0;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            // Past the last reading: the wall time if it moved on, else one
            // logical tick (which carries into the milliseconds, still above).
            let next = wall.max(last.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Hlc(next),
                Err(seen) => last = seen,
            }
        }
    }

    /// The newest timestamp given or observed, without making a new one.
    pub fn peek(&self) -> Hlc {
        Hlc(self.last.load(Ordering::Acquire))
    }

    /// Take a peer's stamp into account: every later reading is above it.
    /// A stamp too far ahead of our wall clock is refused and changes nothing.
    pub fn observe(&self, remote: Hlc) -> Result<(), HlcError> {
        let wall = self.wall.now_ms();
        let ahead = remote.physical_ms().saturating_sub(wall);
        if ahead > self.max_ahead_ms {
            return Err(HlcError::TooFarAhead {
                ahead_ms: ahead,
                max_ms: self.max_ahead_ms,
            });
        }
        self.last.fetch_max(remote.0, Ordering::AcqRel);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manual(ms: u64) -> (HlcClock, Arc<AtomicU64>) {
        let wall = Arc::new(AtomicU64::new(ms));
        (HlcClock::manual(wall.clone()), wall)
    }

    #[test]
    fn the_wire_form_is_sixteen_lowercase_hex_digits_and_reads_back() {
        let t = Hlc::new(1_700_000_000_123, 7);
        let hex = t.to_hex();
        assert_eq!(&hex, format!("{t}").as_bytes());
        assert_eq!(std::str::from_utf8(&hex).unwrap(), "018bcfe5687b0007");
        assert_eq!(Hlc::parse(&hex), Ok(t));
        assert_eq!(t.physical_ms(), 1_700_000_000_123);
        assert_eq!(t.logical(), 7);
        assert_eq!("0000000000000000".parse(), Ok(Hlc::ZERO));
    }

    #[test]
    fn anything_else_is_not_an_hlc() {
        for bad in [
            "",
            "018bcfe568fb000",
            "018bcfe568fb00070",
            "018BCFE568FB0007",
            "018bcfe568fb000g",
            " 18bcfe568fb0007",
        ] {
            assert!(bad.parse::<Hlc>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn readings_rise_within_one_millisecond_and_follow_the_wall() {
        let (clock, wall) = manual(1_000);
        let a = clock.now();
        let b = clock.now();
        assert_eq!(a, Hlc::new(1_000, 0));
        assert_eq!(b, Hlc::new(1_000, 1));
        wall.store(1_005, Ordering::Relaxed);
        assert_eq!(clock.now(), Hlc::new(1_005, 0));
    }

    #[test]
    fn a_wall_clock_stepping_back_never_moves_the_clock_back() {
        let (clock, wall) = manual(5_000);
        let before = clock.now();
        wall.store(1_000, Ordering::Relaxed);
        let after = clock.now();
        assert!(after > before);
        assert_eq!(
            after.physical_ms(),
            5_000,
            "physical time holds until the wall catches up"
        );
    }

    #[test]
    fn an_observed_stamp_orders_every_later_reading_after_it() {
        let (clock, _) = manual(1_000);
        let remote = Hlc::new(1_400, 9);
        clock.observe(remote).unwrap();
        let next = clock.now();
        assert!(next > remote);
        assert_eq!(next, Hlc::new(1_400, 10));
        // An older stamp changes nothing.
        clock.observe(Hlc::new(900, 0)).unwrap();
        assert!(clock.now() > next);
    }

    #[test]
    fn a_stamp_far_in_the_future_is_refused_and_changes_nothing() {
        let (clock, _) = manual(1_000);
        let before = clock.peek();
        let e = clock.observe(Hlc::new(1_000 + 60_000, 0)).unwrap_err();
        assert!(matches!(
            e,
            HlcError::TooFarAhead {
                ahead_ms: 60_000,
                ..
            }
        ));
        assert_eq!(clock.peek(), before);
    }

    #[test]
    fn readings_from_many_threads_are_all_distinct() {
        let clock = Arc::new(HlcClock::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let c = clock.clone();
                std::thread::spawn(move || (0..10_000).map(|_| c.now()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<Hlc> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
