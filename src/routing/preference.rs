//! Read preferences, with MongoDB's names (SPEC §3).

use std::fmt;
use std::str::FromStr;

/// Which nodes of a partition may serve a read, and in what order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReadPreference {
    /// The primary or an error (consistency over availability).
    Primary,
    /// The primary, falling back to replicas when it fails or its breaker is open.
    #[default]
    PrimaryPreferred,
    /// Replicas only.
    Secondary,
    /// Replicas, falling back to the primary.
    SecondaryPreferred,
    /// The lowest-latency healthy node (power of two choices).
    Nearest,
}

/// A read preference name that is not one of the five.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown read preference {0:?} (expected primary, primaryPreferred, secondary, secondaryPreferred or nearest)"
)]
pub struct UnknownReadPreference(pub String);

impl ReadPreference {
    /// The canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadPreference::Primary => "primary",
            ReadPreference::PrimaryPreferred => "primaryPreferred",
            ReadPreference::Secondary => "secondary",
            ReadPreference::SecondaryPreferred => "secondaryPreferred",
            ReadPreference::Nearest => "nearest",
        }
    }

    /// Parse from raw header bytes; names match case-insensitively.
    pub fn from_bytes(b: &[u8]) -> Result<ReadPreference, UnknownReadPreference> {
        const ALL: [ReadPreference; 5] = [
            ReadPreference::Primary,
            ReadPreference::PrimaryPreferred,
            ReadPreference::Secondary,
            ReadPreference::SecondaryPreferred,
            ReadPreference::Nearest,
        ];
        ALL.into_iter()
            .find(|p| p.as_str().as_bytes().eq_ignore_ascii_case(b))
            .ok_or_else(|| UnknownReadPreference(String::from_utf8_lossy(b).into_owned()))
    }
}

impl FromStr for ReadPreference {
    type Err = UnknownReadPreference;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReadPreference::from_bytes(s.as_bytes())
    }
}

impl fmt::Display for ReadPreference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_ignore_case() {
        for p in [
            ReadPreference::Primary,
            ReadPreference::PrimaryPreferred,
            ReadPreference::Secondary,
            ReadPreference::SecondaryPreferred,
            ReadPreference::Nearest,
        ] {
            assert_eq!(p.as_str().parse::<ReadPreference>(), Ok(p));
        }
        assert_eq!(
            ReadPreference::from_bytes(b"SECONDARYPREFERRED"),
            Ok(ReadPreference::SecondaryPreferred)
        );
        assert!(ReadPreference::from_bytes(b"replica").is_err());
    }
}
