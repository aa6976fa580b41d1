//! Stage 3a, consistency (SPEC §7): what a read asks of the replica that
//! serves it, and the read-your-writes token a write's answer carries.
//!
//! A read may carry a token (`x-shardgate-token`, from an earlier write's
//! answer) and a staleness bound (`x-max-staleness`, capped by `[routing]
//! max_replica_lag`). A replica may serve it only if it is known to have
//! applied the token's write, and if it is not further behind its primary
//! than the bound. "Behind" is measured as MongoDB's `maxStalenessSeconds`
//! measures it, in the time between writes: the larger of the lag the
//! coordinator last reported for the replica and the gap between the newest
//! write the proxy knows its primary has and the newest the replica's answer
//! says it has applied (`x-shardgate-applied`).
//!
//! That gap is only known when the replica answers, so it is judged twice.
//! After the answer, exactly ([`judge`]): a stale answer is not passed on and
//! the next candidate (often the primary) is tried instead. Before sending,
//! from what is known ([`fit`]): a replica is left out only on evidence that
//! is still fresh: the coordinator's report, or a gap its answers showed in
//! the last [`RECHECK_MS`]. Knowledge that old says nothing about now (under
//! steady writes an old applied HLC looks further behind every millisecond),
//! so a replica left out is tried again after that, as a half-open breaker
//! is: at most one wasted answer per replica per second, never a replica
//! left out for good because nobody reads it.
//!
//! **Tokens** are `v1.<partition>.<epoch>.<hlc>`: the write's partition,
//! the map epoch it was made under and the HLC the node stamped it with.
//! Only the HLC constrains a read. A token from another partition names no
//! write of this one and is ignored. A token from an older epoch keeps its
//! HLC requirement: a failover promotes the replica holding every
//! acknowledged write, and HLCs only rise across primaries, so a node that
//! applied that HLC under the new primary holds the write (with `async`
//! writes a failover may lose it, and then nobody has it, the primary
//! included).

use super::super::error::ProxyError;
pub(crate) use super::super::error::Unfit;
use crate::clock::Hlc;
use crate::routing::RoutingConfig;
use crate::upstream::{Freshness, Upstream, since_start_ms};
use http::{HeaderMap, HeaderName, HeaderValue};

/// `x-shardgate-token`: a write's read-your-writes token.
pub(crate) const TOKEN: HeaderName = HeaderName::from_static("x-shardgate-token");
/// `x-max-staleness`: a read's staleness bound, seconds.
pub(crate) const MAX_STALENESS: HeaderName = HeaderName::from_static("x-max-staleness");
/// `x-shardgate-hlc`: the proxy's stamp on a write; the node's stamp on its answer.
pub(crate) const HLC: HeaderName = HeaderName::from_static("x-shardgate-hlc");
/// `x-shardgate-applied`: the newest write a node had applied when it answered.
pub(crate) const APPLIED: HeaderName = HeaderName::from_static("x-shardgate-applied");

/// Longest token accepted (SPEC §7).
const MAX_TOKEN: usize = 128;
/// Largest staleness bound accepted, seconds.
const MAX_BOUND_SECS: f64 = 86_400.0;

/// What a read asks of a replica. `Default`: nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Needs {
    /// It must have applied this write.
    pub(crate) token: Option<Hlc>,
    /// It must be at most this far behind its primary, milliseconds.
    pub(crate) bound_ms: Option<u64>,
}

impl Needs {
    /// Whether any replica will do.
    #[inline]
    pub(crate) fn is_none(&self) -> bool {
        self.token.is_none() && self.bound_ms.is_none()
    }
}

/// A write's token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Token {
    pub(crate) partition: u32,
    pub(crate) epoch: u64,
    pub(crate) hlc: Hlc,
}

impl Token {
    /// The header value.
    /// Written into a stack buffer: one per acknowledged write, where
    /// `format!` cost ~1k instructions and two allocations.
    pub(crate) fn to_header(self) -> HeaderValue {
        // "v1." + u32 + "." + u64 + "." + 16 hex digits: at most 51 bytes.
        let mut buf = [0u8; 64];
        let mut n = 0;
        let mut put = |bytes: &[u8]| {
            buf[n..n + bytes.len()].copy_from_slice(bytes);
            n += bytes.len();
        };
        put(b"v1.");
        put(decimal(u64::from(self.partition), &mut [0; 20]));
        put(b".");
        put(decimal(self.epoch, &mut [0; 20]));
        put(b".");
        put(&self.hlc.to_hex());
        // Digits, dots and hex: always a valid header value.
        HeaderValue::from_bytes(&buf[..n])
            .unwrap_or(HeaderValue::from_static("v1.0.0.0000000000000000"))
    }

    /// Read a token; a clear error for anything this proxy does not issue.
    pub(crate) fn parse(raw: &[u8]) -> Result<Token, String> {
        if raw.len() > MAX_TOKEN {
            return Err(format!("longer than {MAX_TOKEN} bytes"));
        }
        let text = std::str::from_utf8(raw).map_err(|_| "not ASCII".to_owned())?;
        let mut parts = text.split('.');
        let (Some("v1"), Some(p), Some(e), Some(h), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err("not a token this proxy issued (v1.<partition>.<epoch>.<hlc>)".into());
        };
        let number = |s: &str| s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty();
        if !number(p) || !number(e) {
            return Err("partition and epoch must be decimal numbers".into());
        }
        Ok(Token {
            partition: p.parse().map_err(|_| "partition out of range".to_owned())?,
            epoch: e.parse().map_err(|_| "epoch out of range".to_owned())?,
            hlc: Hlc::parse(h.as_bytes()).map_err(|e| e.to_string())?,
        })
    }
}

/// `v` in decimal, written at the end of `buf`.
fn decimal(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

/// What a read asked for, before it is placed.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Asked {
    token: Option<Token>,
    bound_ms: Option<u64>,
}

impl Asked {
    /// What it asks of `partition`'s replicas: a token of another partition
    /// names no write of this one.
    #[inline]
    pub(crate) fn needs(&self, partition: u32) -> Needs {
        Needs {
            token: self
                .token
                .filter(|t| t.partition == partition)
                .map(|t| t.hlc),
            bound_ms: self.bound_ms,
        }
    }
}

/// What the read in `headers` asks for; a clear error for a malformed token
/// or bound.
pub(crate) fn asked(headers: &HeaderMap, routing: &RoutingConfig) -> Result<Asked, ProxyError> {
    let (token, staleness) = either(headers, &TOKEN, &MAX_STALENESS);
    let token = match token {
        None => None,
        Some(v) => Some(Token::parse(v.as_bytes()).map_err(ProxyError::InvalidToken)?),
    };
    let asked = match staleness {
        None => None,
        Some(v) => Some(bound_ms(v.as_bytes()).map_err(ProxyError::InvalidMaxStaleness)?),
    };
    let bound_ms = match (asked, routing.max_replica_lag_ms) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    };
    Ok(Asked { token, bound_ms })
}

/// The first values of headers `a` and `b`, in one pass over `headers`.
///
/// Every request and every answer asks for two of these headers, and almost
/// none carries them: two `HeaderMap::get`s of custom names hash each name
/// (~170 instructions apiece, 0.7k per proxied request), while a pass over
/// a dozen entries compares lengths first and bytes rarely.
#[inline]
fn either<'h>(
    headers: &'h HeaderMap,
    a: &HeaderName,
    b: &HeaderName,
) -> (Option<&'h HeaderValue>, Option<&'h HeaderValue>) {
    let (a, b) = (a.as_str(), b.as_str());
    let (mut found_a, mut found_b) = (None, None);
    for (name, value) in headers {
        let n = name.as_str();
        if found_a.is_none() && n.len() == a.len() && n == a {
            found_a = Some(value);
        } else if found_b.is_none() && n.len() == b.len() && n == b {
            found_b = Some(value);
        }
    }
    (found_a, found_b)
}

/// Seconds (a decimal, as `Retry-After` and MongoDB write them) into milliseconds.
fn bound_ms(raw: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "not a number of seconds".to_owned())?;
    let plain = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let secs: f64 = text
        .parse()
        .ok()
        .filter(|s: &f64| plain && s.is_finite() && *s >= 0.0)
        .ok_or_else(|| format!("{text:?} is not a number of seconds"))?;
    if secs > MAX_BOUND_SECS {
        return Err(format!("{secs} s is more than a day"));
    }
    Ok((secs * 1000.0) as u64)
}

/// Whether a replica known to have applied `applied` may serve a read that
/// `needs` this, its primary known to have `primary` and the coordinator
/// reporting `reported_lag_ms`.
#[inline]
pub(crate) fn judge(
    applied: Hlc,
    primary: Hlc,
    reported_lag_ms: Option<u64>,
    needs: Needs,
) -> Result<(), Unfit> {
    if needs.token.is_some_and(|t| applied < t) {
        return Err(Unfit::TokenNotApplied);
    }
    if let Some(bound) = needs.bound_ms {
        let gap = primary.physical_ms().saturating_sub(applied.physical_ms());
        if gap.max(reported_lag_ms.unwrap_or(0)) > bound {
            return Err(Unfit::TooStale);
        }
    }
    Ok(())
}

/// How long a gap seen in a replica's answer keeps it out of reads whose
/// bound it broke.
pub(crate) const RECHECK_MS: u64 = 1_000;

/// When a plan is made, on the two clocks [`fit`] reads.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Moment {
    /// [`since_start_ms`]: when evidence was gathered, and how old it is.
    pub(crate) mono_ms: u64,
    /// The proxy's wall clock: how old a token's write is.
    pub(crate) wall_ms: u64,
}

impl Moment {
    /// Now, read only for a read that needs something of its replica.
    #[inline]
    pub(crate) fn now(needs: Needs, clock: &crate::clock::HlcClock) -> Moment {
        if needs.is_none() {
            return Moment::default();
        }
        Moment {
            mono_ms: since_start_ms(),
            wall_ms: clock.wall_ms(),
        }
    }
}

/// Whether `replica` is worth trying for a read that `needs` this, as the
/// proxy knows it at `at`. Knowledge counts only while it is fresh (see the
/// module comment); without it the replica is tried, and its answer decides.
/// - A token: fit if the replica is known to have applied it, or if it is
///   expected to have by now: the token's write is older than the gap its
///   recent answers showed (a replica that keeps up applies a write within
///   its gap of the primary). With `majority` writes that is the replica
///   that acknowledged the write, so token reads spread over replicas
///   rather than all falling to the primary.
/// - A bound: unfit if the coordinator reports it lagging past the bound,
///   or a recent answer showed a gap past it, unless it has since been seen
///   to hold everything the primary is known to have.
#[inline]
pub(crate) fn fit(
    f: &Freshness,
    primary: &Freshness,
    needs: Needs,
    at: Moment,
) -> Result<(), Unfit> {
    let recent_gap = || f.observed_gap_since(at.mono_ms.saturating_sub(RECHECK_MS));
    if let Some(token) = needs.token
        && f.applied() < token
        && recent_gap().is_some_and(|gap| at.wall_ms.saturating_sub(token.physical_ms()) < gap)
    {
        return Err(Unfit::TokenNotApplied);
    }
    if let Some(bound) = needs.bound_ms {
        let caught_up = f.applied() >= primary.applied();
        let seen = if caught_up {
            0
        } else {
            recent_gap().unwrap_or(0)
        };
        if seen.max(f.reported_lag_ms().unwrap_or(0)) > bound {
            return Err(Unfit::TooStale);
        }
    }
    Ok(())
}

/// Judge a replica's answer, which said it had applied `applied`, and
/// remember the gap it showed for [`fit`].
#[inline]
pub(crate) fn judge_answer(
    f: &Freshness,
    primary: &Freshness,
    applied: Option<Hlc>,
    needs: Needs,
) -> Result<(), Unfit> {
    let applied = applied.unwrap_or(Hlc::ZERO);
    let known = primary.applied();
    let gap = known.physical_ms().saturating_sub(applied.physical_ms());
    f.observe_gap(gap, since_start_ms());
    judge(applied, known, f.reported_lag_ms(), needs)
}

/// The node's stamp on a write's answer (`x-shardgate-hlc`), if it sent one.
#[inline]
pub(crate) fn stamp_of(headers: &HeaderMap) -> Option<Hlc> {
    let hlc = HLC;
    let name = hlc.as_str();
    let (_, stamp) = headers
        .iter()
        .find(|(n, _)| n.as_str().len() == name.len() && n.as_str() == name)?;
    Hlc::parse(stamp.as_bytes()).ok()
}

/// Learn from an answer's headers: the node's applied HLC (reads) or its
/// stamp (writes). Returns the HLC the answer carried, if any.
#[inline]
pub(crate) fn learn(headers: &HeaderMap, upstream: &Upstream) -> Option<Hlc> {
    let (applied, stamp) = either(headers, &APPLIED, &HLC);
    let v = applied.or(stamp)?;
    let hlc = Hlc::parse(v.as_bytes()).ok()?;
    upstream.freshness().note_applied(hlc);
    Some(hlc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> Hlc {
        Hlc::new(ms, 0)
    }

    fn routing(max_lag: Option<u64>) -> RoutingConfig {
        let mut r = super::super::tests::settings().routing.clone();
        r.max_replica_lag_ms = max_lag;
        r
    }

    fn headers(pairs: &[(&HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert((*k).clone(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_token_reads_back_what_it_says_and_fits_the_spec_limits() {
        let tok = Token {
            partition: 3,
            epoch: 17,
            hlc: t(1_700_000_000_000),
        };
        let v = tok.to_header();
        assert!(v.len() <= MAX_TOKEN && v.as_bytes().iter().all(|b| b.is_ascii_graphic()));
        assert_eq!(Token::parse(v.as_bytes()), Ok(tok));
    }

    #[test]
    fn a_malformed_token_is_a_clear_400() {
        let long = "v1.1.1.".to_owned() + &"0".repeat(200);
        for bad in [
            "",
            "v2.1.1.0000000000000000",
            "v1.1.1",
            "v1.a.1.0000000000000000",
            "v1.1.1.000000000000000g",
            "v1.1.1.0000000000000000.9",
            "v1.-1.1.0000000000000000",
            long.as_str(),
        ] {
            let h = headers(&[(&TOKEN, bad)]);
            let e = asked(&h, &routing(None)).map(|a| a.needs(1)).unwrap_err();
            assert_eq!(
                (e.code(), e.status().as_u16()),
                ("invalid_token", 400),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_token_from_another_partition_asks_nothing_and_one_from_an_older_epoch_keeps_its_hlc() {
        let other = Token {
            partition: 2,
            epoch: 5,
            hlc: t(900),
        }
        .to_header();
        let h = headers(&[(&TOKEN, other.to_str().unwrap())]);
        assert!(
            asked(&h, &routing(None))
                .map(|a| a.needs(1))
                .unwrap()
                .is_none()
        );
        let older = Token {
            partition: 1,
            epoch: 1,
            hlc: t(900),
        }
        .to_header();
        let h = headers(&[(&TOKEN, older.to_str().unwrap())]);
        assert_eq!(
            asked(&h, &routing(None)).map(|a| a.needs(1)).unwrap().token,
            Some(t(900))
        );
    }

    #[test]
    fn the_staleness_bound_is_the_tighter_of_the_request_and_the_config() {
        let h = headers(&[(&MAX_STALENESS, "2.5")]);
        assert_eq!(
            asked(&h, &routing(None))
                .map(|a| a.needs(0))
                .unwrap()
                .bound_ms,
            Some(2500)
        );
        assert_eq!(
            asked(&h, &routing(Some(1000)))
                .map(|a| a.needs(0))
                .unwrap()
                .bound_ms,
            Some(1000)
        );
        assert_eq!(
            asked(&HeaderMap::new(), &routing(Some(1000)))
                .map(|a| a.needs(0))
                .unwrap()
                .bound_ms,
            Some(1000)
        );
        assert!(
            asked(&HeaderMap::new(), &routing(None))
                .map(|a| a.needs(0))
                .unwrap()
                .is_none()
        );
        for bad in ["-1", "soon", "1e3", "inf", "100000", ""] {
            let e = asked(&headers(&[(&MAX_STALENESS, bad)]), &routing(None)).unwrap_err();
            assert_eq!(e.code(), "invalid_max_staleness", "{bad:?}");
        }
    }

    #[test]
    fn a_replica_serves_only_what_it_is_known_to_have() {
        let token = Needs {
            token: Some(t(500)),
            bound_ms: None,
        };
        assert_eq!(
            judge(t(499), t(600), None, token),
            Err(Unfit::TokenNotApplied)
        );
        assert_eq!(judge(t(500), t(600), None, token), Ok(()));
        let bound = Needs {
            token: None,
            bound_ms: Some(100),
        };
        assert_eq!(
            judge(t(400), t(600), None, bound),
            Err(Unfit::TooStale),
            "200 ms behind its primary"
        );
        assert_eq!(judge(t(550), t(600), None, bound), Ok(()));
        assert_eq!(
            judge(t(550), t(600), Some(150), bound),
            Err(Unfit::TooStale),
            "the coordinator saw it lag"
        );
        assert_eq!(judge(t(0), t(0), None, Needs::default()), Ok(()));
    }

    fn mono(ms: u64) -> Moment {
        Moment {
            mono_ms: ms,
            wall_ms: 0,
        }
    }

    fn upstream(applied: u64) -> Freshness {
        let f = Freshness::default();
        f.note_applied(t(applied));
        f
    }

    #[test]
    fn a_replica_is_left_out_on_fresh_evidence_only_and_tried_again_after_it() {
        let primary = upstream(10_000);
        let replica = upstream(9_000);
        let bound = Needs {
            token: None,
            bound_ms: Some(250),
        };
        assert_eq!(
            fit(&replica, &primary, bound, mono(5_000)),
            Ok(()),
            "an old applied HLC, never judged: tried, its answer decides"
        );
        replica.observe_gap(400, 5_000);
        assert_eq!(
            fit(&replica, &primary, bound, mono(5_000 + RECHECK_MS - 1)),
            Err(Unfit::TooStale)
        );
        assert_eq!(
            fit(
                &replica,
                &primary,
                Needs {
                    bound_ms: Some(500),
                    ..bound
                },
                mono(5_500)
            ),
            Ok(()),
            "a looser bound"
        );
        assert_eq!(
            fit(&replica, &primary, bound, mono(5_000 + RECHECK_MS + 1)),
            Ok(()),
            "tried again once the evidence is old"
        );
        replica.note_applied(t(10_000));
        assert_eq!(
            fit(&replica, &primary, bound, mono(5_500)),
            Ok(()),
            "it has since been seen to have all the primary has"
        );
        replica.set_reported_lag(Some(300));
        assert_eq!(
            fit(&replica, &primary, bound, mono(5_500)),
            Err(Unfit::TooStale),
            "the coordinator saw it lag"
        );
    }

    #[test]
    fn an_answer_is_judged_by_what_it_says_it_applied_and_teaches_the_gap() {
        let primary = upstream(10_000);
        let replica = upstream(0);
        let bound = Needs {
            token: None,
            bound_ms: Some(250),
        };
        assert_eq!(
            judge_answer(&replica, &primary, Some(t(9_900)), bound),
            Ok(())
        );
        assert_eq!(
            judge_answer(&replica, &primary, Some(t(9_000)), bound),
            Err(Unfit::TooStale)
        );
        let now = since_start_ms();
        assert_eq!(
            replica.observed_gap_since(now.saturating_sub(10)),
            Some(1_000)
        );
        assert_eq!(
            judge_answer(&replica, &primary, None, bound),
            Err(Unfit::TooStale),
            "a replica that does not say what it applied promises nothing"
        );
    }

    #[test]
    fn a_token_read_tries_a_replica_expected_to_have_the_write_by_now() {
        let primary = upstream(10_000);
        let replica = upstream(9_000);
        let token = Needs {
            token: Some(t(10_000)),
            bound_ms: None,
        };
        let at = |wall_ms| Moment {
            mono_ms: 5_000,
            wall_ms,
        };
        assert_eq!(
            fit(&replica, &primary, token, at(10_001)),
            Ok(()),
            "nothing known of it lately: tried, its answer decides"
        );
        replica.observe_gap(40, 5_000);
        assert_eq!(
            fit(&replica, &primary, token, at(10_010)),
            Err(Unfit::TokenNotApplied),
            "40 ms behind, and the write is 10 ms old"
        );
        assert_eq!(
            fit(&replica, &primary, token, at(10_050)),
            Ok(()),
            "the write is older than its gap"
        );
        replica.observe_gap(0, 5_000);
        assert_eq!(
            fit(&replica, &primary, token, at(10_000)),
            Ok(()),
            "a replica that keeps up (the one that acknowledged the write)"
        );
        replica.observe_gap(40, 5_000);
        replica.note_applied(t(10_000));
        assert_eq!(
            fit(&replica, &primary, token, at(10_000)),
            Ok(()),
            "known to have it"
        );
    }

    #[test]
    fn one_pass_finds_each_headers_first_value() {
        let mut h = headers(&[(&HLC, "0000000000000002")]);
        h.append(HLC, "0000000000000003".parse().unwrap());
        h.insert(http::header::CONTENT_TYPE, "x".parse().unwrap());
        let (applied, stamp) = either(&h, &APPLIED, &HLC);
        assert_eq!(applied, None);
        assert_eq!(
            stamp.map(HeaderValue::as_bytes),
            Some(&b"0000000000000002"[..])
        );
        h.insert(APPLIED, "0000000000000009".parse().unwrap());
        let (applied, _) = either(&h, &APPLIED, &HLC);
        assert_eq!(
            applied.map(HeaderValue::as_bytes),
            Some(&b"0000000000000009"[..])
        );
    }

    #[test]
    fn a_token_is_written_without_formatting_and_reads_back_at_the_extremes() {
        for (partition, epoch, hlc) in [(0, 0, 0), (u32::MAX, u64::MAX, u64::MAX), (7, 10, 1 << 20)]
        {
            let tok = Token {
                partition,
                epoch,
                hlc: Hlc::from_u64(hlc),
            };
            let v = tok.to_header();
            assert_eq!(
                v.to_str().unwrap(),
                format!("v1.{partition}.{epoch}.{}", Hlc::from_u64(hlc))
            );
            assert_eq!(Token::parse(v.as_bytes()), Ok(tok));
        }
    }
}
