//! Stage 3, plan: which of the partition's nodes a request may try, best
//! first. Writes get the primary and nothing else, whatever the preference.
//! A read's replicas are only those fresh enough for it (`consistency`).

use super::super::error::{ProxyError, UpstreamCause};
use super::consistency::{self, Moment, Needs, Unfit};
use crate::routing::{ReadPreference, RequestClass, Role, RoutePartition, RoutingConfig};
use crate::upstream::Upstream;
use http::HeaderMap;
use rand::RngExt;
use smallvec::SmallVec;
use std::sync::Arc;

/// The nodes a request may try, best first.
pub(crate) struct Plan<'t> {
    /// Candidates in the order to try them.
    pub(crate) candidates: SmallVec<[(&'t Arc<Upstream>, Role); 4]>,
    /// Only the primary may serve (writes, or read preference `primary`).
    pub(crate) primary_only: bool,
    /// Replicas left out as not fresh enough, by reason (too stale, token).
    pub(crate) passed_over: [u8; 2],
}

/// The request's read preference: its header if allowed and present, else the default.
pub(crate) fn read_preference(
    headers: &HeaderMap,
    routing: &RoutingConfig,
) -> Result<ReadPreference, ProxyError> {
    match routing
        .read_preference_header
        .as_ref()
        .and_then(|h| headers.get(h))
    {
        Some(v) => ReadPreference::from_bytes(v.as_bytes())
            .map_err(|e| ProxyError::InvalidReadPreference(e.to_string())),
        None => Ok(routing.read_preference),
    }
}

/// Which nodes of `partition` a request of `class` under `pref` may try, in
/// order; an error when none may.
pub(crate) fn plan(
    partition: &RoutePartition,
    class: RequestClass,
    pref: ReadPreference,
    needs: Needs,
    at: Moment,
) -> Result<Plan<'_>, ProxyError> {
    let primary = (&partition.primary, Role::Primary);
    let mut candidates = SmallVec::new();
    let mut passed_over = [0u8; 2];
    let pref = match class {
        RequestClass::Write => ReadPreference::Primary,
        RequestClass::Read => pref,
    };
    let mut replicas =
        |out: &mut SmallVec<_>| push_replicas(partition, needs, at, out, &mut passed_over);
    match pref {
        ReadPreference::Primary => candidates.push(primary),
        ReadPreference::PrimaryPreferred => {
            candidates.push(primary);
            replicas(&mut candidates);
        }
        ReadPreference::Secondary => replicas(&mut candidates),
        ReadPreference::SecondaryPreferred => {
            replicas(&mut candidates);
            candidates.push(primary);
        }
        ReadPreference::Nearest => {
            candidates.push(primary);
            replicas(&mut candidates);
            order_nearest(&mut candidates);
        }
    }
    if candidates.is_empty() {
        if passed_over != [0, 0] {
            let why = if passed_over[1] > 0 {
                Unfit::TokenNotApplied
            } else {
                Unfit::TooStale
            };
            return Err(ProxyError::NoFreshReplica {
                partition: partition.index,
                why,
            });
        }
        return Err(ProxyError::NoHealthyUpstream {
            partition: partition.index,
            last: None,
            cause: UpstreamCause::NoReplica(pref),
        });
    }
    Ok(Plan {
        candidates,
        primary_only: pref == ReadPreference::Primary,
        passed_over,
    })
}

/// Replicas fresh enough for `needs`, starting at a random one so reads
/// spread across them; those left out are counted in `passed_over`.
fn push_replicas<'t>(
    partition: &'t RoutePartition,
    needs: Needs,
    at: Moment,
    out: &mut SmallVec<[(&'t Arc<Upstream>, Role); 4]>,
    passed_over: &mut [u8; 2],
) {
    let replicas = &partition.replicas;
    let n = replicas.len();
    if n == 0 {
        return;
    }
    let start = if n == 1 {
        0
    } else {
        rand::rng().random_range(0..n)
    };
    for i in 0..n {
        let replica = &replicas[(start + i) % n];
        if !needs.is_none()
            && let Err(why) = consistency::fit(
                replica.freshness(),
                partition.primary.freshness(),
                needs,
                at,
            )
        {
            passed_over[why as usize] = passed_over[why as usize].saturating_add(1);
            continue;
        }
        out.push((replica, Role::Replica));
    }
}

/// Power of two choices over cost = latency estimate × (in-flight + 1): the
/// better of two random nodes goes first, the rest follow by cost.
fn order_nearest(c: &mut [(&Arc<Upstream>, Role)]) {
    let cost = |u: &Upstream| u.latency().estimate().as_nanos() as f64 * (u.inflight() + 1) as f64;
    let n = c.len();
    if n < 2 {
        return;
    }
    let mut rng = rand::rng();
    let a = rng.random_range(0..n);
    let mut b = rng.random_range(0..n - 1);
    if b >= a {
        b += 1;
    }
    let first = if cost(c[a].0) <= cost(c[b].0) { a } else { b };
    c.swap(0, first);
    c[1..].sort_by(|x, y| cost(x.0).total_cmp(&cost(y.0)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::PartitionMetrics;
    use crate::telemetry::Metrics;
    use crate::upstream::{PoolSettings, UpstreamFactory, UpstreamSettings};
    use http::HeaderValue;
    use std::time::Duration;

    fn partition(replicas: usize) -> RoutePartition {
        let metrics = Arc::new(Metrics::new());
        let factory = UpstreamFactory::new(
            UpstreamSettings {
                pool: PoolSettings {
                    max_idle: 1,
                    idle_timeout: Duration::from_secs(1),
                    connect_timeout: Duration::from_secs(1),
                },
                breaker: crate::resilience::BreakerConfig {
                    consecutive_failures: 5,
                    failure_ratio: 0.5,
                    window: Duration::from_secs(10),
                    min_requests: 20,
                    cool_down: crate::resilience::Backoff {
                        base: Duration::from_secs(5),
                        max: Duration::from_secs(60),
                        jitter: crate::resilience::Jitter::Equal,
                    },
                    half_open_probes: 1,
                },
                tls: None,
            },
            metrics.clone(),
        )
        .unwrap();
        let addr = |i: u16| format!("127.0.0.1:{}", 1000 + i).parse().unwrap();
        RoutePartition {
            index: 4,
            index_header: HeaderValue::from(4),
            primary: factory.make(addr(0)),
            replicas: (1..=replicas as u16)
                .map(|i| factory.make(addr(i)))
                .collect(),
            metrics: Arc::new(PartitionMetrics::new(metrics, "4")),
        }
    }

    fn roles(p: &Plan<'_>) -> Vec<Role> {
        p.candidates.iter().map(|(_, r)| *r).collect()
    }

    #[test]
    fn a_write_is_planned_for_the_primary_alone_whatever_the_preference() {
        let p = partition(2);
        for pref in [
            ReadPreference::Primary,
            ReadPreference::PrimaryPreferred,
            ReadPreference::Secondary,
            ReadPreference::SecondaryPreferred,
            ReadPreference::Nearest,
        ] {
            let plan = plan(
                &p,
                RequestClass::Write,
                pref,
                Needs::default(),
                Moment::default(),
            )
            .unwrap();
            assert_eq!(roles(&plan), [Role::Primary], "{pref}");
            assert!(plan.primary_only);
        }
    }

    #[test]
    fn reads_follow_their_preference() {
        let p = partition(2);
        let read = |pref| {
            roles(
                &plan(
                    &p,
                    RequestClass::Read,
                    pref,
                    Needs::default(),
                    Moment::default(),
                )
                .unwrap(),
            )
        };
        use Role::{Primary as P, Replica as R};
        assert_eq!(read(ReadPreference::Primary), [P]);
        assert_eq!(read(ReadPreference::PrimaryPreferred), [P, R, R]);
        assert_eq!(read(ReadPreference::Secondary), [R, R]);
        assert_eq!(read(ReadPreference::SecondaryPreferred), [R, R, P]);
        let mut nearest = read(ReadPreference::Nearest);
        nearest.sort_by_key(|r| *r == R);
        assert_eq!(nearest, [P, R, R], "every node, in cost order");
        assert!(
            !plan(
                &p,
                RequestClass::Read,
                ReadPreference::PrimaryPreferred,
                Needs::default(),
                Moment::default()
            )
            .unwrap()
            .primary_only
        );
    }

    #[test]
    fn replicas_are_spread_over() {
        let p = partition(3);
        let firsts: std::collections::HashSet<_> = (0..200)
            .map(|_| {
                plan(
                    &p,
                    RequestClass::Read,
                    ReadPreference::Secondary,
                    Needs::default(),
                    Moment::default(),
                )
                .unwrap()
                .candidates[0]
                    .0
                    .addr()
            })
            .collect();
        assert_eq!(firsts.len(), 3, "each replica comes first sometimes");
    }

    #[test]
    fn a_secondary_read_of_a_partition_without_replicas_is_refused() {
        let p = partition(0);
        let err = plan(
            &p,
            RequestClass::Read,
            ReadPreference::Secondary,
            Needs::default(),
            Moment::default(),
        )
        .err()
        .unwrap();
        assert_eq!(err.code(), "no_healthy_upstream");
        assert_eq!(err.partition(), Some(4));
        assert!(err.to_string().contains("secondary"), "{err}");
    }

    #[test]
    fn replicas_not_fresh_enough_for_a_read_are_left_out() {
        use crate::clock::Hlc;
        let p = partition(2);
        p.primary.freshness().note_applied(Hlc::new(1_000, 0));
        p.replicas[0].freshness().note_applied(Hlc::new(1_000, 0));
        p.replicas[1].freshness().note_applied(Hlc::new(400, 0));
        // Its last answer showed it 600 ms behind.
        p.replicas[1]
            .freshness()
            .observe_gap(600, crate::upstream::since_start_ms());
        let token = Needs {
            token: Some(Hlc::new(900, 0)),
            bound_ms: None,
        };
        let now = Moment {
            mono_ms: crate::upstream::since_start_ms(),
            wall_ms: 1_000,
        };
        let plan_for = |pref, needs| plan(&p, RequestClass::Read, pref, needs, now);
        let read = plan_for(ReadPreference::SecondaryPreferred, token).unwrap();
        assert_eq!(roles(&read), [Role::Replica, Role::Primary]);
        assert_eq!(
            read.candidates[0].0.addr(),
            p.replicas[0].addr(),
            "the one that has the write"
        );
        assert_eq!(read.passed_over, [0, 1]);
        let bound = Needs {
            token: None,
            bound_ms: Some(100),
        };
        assert_eq!(
            plan_for(ReadPreference::Secondary, bound)
                .unwrap()
                .passed_over,
            [1, 0]
        );
        // None fit: `secondary` is refused, the others fall back to the primary.
        // (Both showed a gap lately that the token's write is younger than.)
        p.replicas[0].freshness().observe_gap(600, now.mono_ms);
        let late = Needs {
            token: Some(Hlc::new(2_000, 0)),
            bound_ms: None,
        };
        let err = plan_for(ReadPreference::Secondary, late).err().unwrap();
        assert_eq!(
            (err.code(), err.status().as_u16()),
            ("no_fresh_replica", 503)
        );
        assert_eq!(
            roles(&plan_for(ReadPreference::Nearest, late).unwrap()),
            [Role::Primary]
        );
        // Writes never look at replicas at all.
        assert_eq!(
            plan(
                &p,
                RequestClass::Write,
                ReadPreference::Secondary,
                late,
                now
            )
            .unwrap()
            .passed_over,
            [0, 0]
        );
    }

    #[test]
    fn the_header_overrides_the_default_preference_when_allowed() {
        let mut routing = super::super::tests::settings().routing.clone();
        let mut h = HeaderMap::new();
        assert_eq!(
            read_preference(&h, &routing).unwrap(),
            ReadPreference::PrimaryPreferred
        );
        h.insert("x-read-preference", "Secondary".parse().unwrap());
        assert_eq!(
            read_preference(&h, &routing).unwrap(),
            ReadPreference::Secondary
        );
        h.insert("x-read-preference", "closest".parse().unwrap());
        assert_eq!(
            read_preference(&h, &routing).unwrap_err().code(),
            "invalid_read_preference"
        );
        routing.read_preference_header = None;
        assert_eq!(
            read_preference(&h, &routing).unwrap(),
            ReadPreference::PrimaryPreferred
        );
    }
}
