//! Jittered exponential backoff: `min(max, base * 2^attempt)`, then jitter.
//!
//! One primitive for retry spacing, breaker cool-downs and control-plane polling,
//! so every "wait before trying again" in shardgate behaves alike.

use rand::{Rng, RngExt};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How a computed delay is randomised, so synchronized clients spread out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Jitter {
    /// Exactly the exponential delay (tests, or a single client).
    None,
    /// Uniform in `[0, d]`: the widest spread (AWS "full jitter").
    #[default]
    Full,
    /// Uniform in `[d/2, d]`: never shorter than half the delay.
    Equal,
    /// Uniform in `[base, 3 * previous]`, capped (AWS "decorrelated jitter").
    Decorrelated,
}

/// A jitter name that is not one of the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown jitter {0:?} (expected none, full, equal or decorrelated)")]
pub struct UnknownJitter(pub String);

impl FromStr for Jitter {
    type Err = UnknownJitter;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Jitter::None),
            "full" => Ok(Jitter::Full),
            "equal" => Ok(Jitter::Equal),
            "decorrelated" => Ok(Jitter::Decorrelated),
            _ => Err(UnknownJitter(s.to_owned())),
        }
    }
}

impl fmt::Display for Jitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Jitter::None => "none",
            Jitter::Full => "full",
            Jitter::Equal => "equal",
            Jitter::Decorrelated => "decorrelated",
        })
    }
}

/// Exponential backoff parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry, before jitter.
    pub base: Duration,
    /// Upper bound on any delay.
    pub max: Duration,
    /// How delays are randomised.
    pub jitter: Jitter,
}

impl Backoff {
    /// The un-jittered delay for `attempt` (0-based): `min(max, base * 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry number `attempt` (0-based).
    ///
    /// `previous` is the last delay actually slept; only decorrelated jitter uses it.
    pub fn delay<R: Rng + ?Sized>(
        &self,
        attempt: u32,
        previous: Option<Duration>,
        rng: &mut R,
    ) -> Duration {
        let ceiling = self.ceiling(attempt);
        match self.jitter {
            Jitter::None => ceiling,
            Jitter::Full => uniform(rng, Duration::ZERO, ceiling),
            Jitter::Equal => uniform(rng, ceiling / 2, ceiling),
            Jitter::Decorrelated => {
                let prev = previous.unwrap_or(self.base);
                let hi = prev.saturating_mul(3).min(self.max).max(self.base);
                uniform(rng, self.base.min(hi), hi)
            }
        }
    }
}

fn uniform<R: Rng + ?Sized>(rng: &mut R, lo: Duration, hi: Duration) -> Duration {
    if hi <= lo {
        return lo;
    }
    let span = (hi - lo).as_nanos().min(u64::MAX as u128) as u64;
    lo + Duration::from_nanos(rng.random_range(0..=span))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const MS: Duration = Duration::from_millis(1);

    fn backoff(jitter: Jitter) -> Backoff {
        Backoff {
            base: 10 * MS,
            max: 100 * MS,
            jitter,
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = backoff(Jitter::None);
        let got: Vec<_> = (0..6).map(|a| b.ceiling(a)).collect();
        assert_eq!(
            got,
            [10 * MS, 20 * MS, 40 * MS, 80 * MS, 100 * MS, 100 * MS]
        );
        assert_eq!(b.ceiling(200), 100 * MS, "huge attempts must not overflow");
    }

    #[test]
    fn each_jitter_stays_inside_its_band() {
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..8 {
            let c = backoff(Jitter::None).ceiling(attempt);
            for _ in 0..200 {
                let full = backoff(Jitter::Full).delay(attempt, None, &mut rng);
                assert!(full <= c);
                let equal = backoff(Jitter::Equal).delay(attempt, None, &mut rng);
                assert!(equal >= c / 2 && equal <= c);
            }
        }
    }

    #[test]
    fn decorrelated_grows_from_the_previous_delay_and_respects_bounds() {
        let b = backoff(Jitter::Decorrelated);
        let mut rng = StdRng::seed_from_u64(1);
        let mut prev = None;
        for attempt in 0..50 {
            let d = b.delay(attempt, prev, &mut rng);
            assert!(d >= b.base && d <= b.max, "{d:?}");
            if let Some(p) = prev {
                assert!(d <= (p * 3).min(b.max));
            }
            prev = Some(d);
        }
    }

    #[test]
    fn jitter_names_parse() {
        assert_eq!("equal".parse::<Jitter>(), Ok(Jitter::Equal));
        assert!("fuzzy".parse::<Jitter>().is_err());
    }
}
