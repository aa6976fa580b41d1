//! Stage 3, plan: which of the partition's nodes a request may try, best
//! first. Writes get the primary and nothing else, whatever the preference.

use super::super::error::{ProxyError, UpstreamCause};
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
) -> Result<Plan<'_>, ProxyError> {
    let primary = (&partition.primary, Role::Primary);
    let mut candidates = SmallVec::new();
    let pref = match class {
        RequestClass::Write => ReadPreference::Primary,
        RequestClass::Read => pref,
    };
    match pref {
        ReadPreference::Primary => candidates.push(primary),
        ReadPreference::PrimaryPreferred => {
            candidates.push(primary);
            push_replicas(partition, &mut candidates);
        }
        ReadPreference::Secondary => push_replicas(partition, &mut candidates),
        ReadPreference::SecondaryPreferred => {
            push_replicas(partition, &mut candidates);
            candidates.push(primary);
        }
        ReadPreference::Nearest => {
            candidates.push(primary);
            push_replicas(partition, &mut candidates);
            order_nearest(&mut candidates);
        }
    }
    if candidates.is_empty() {
        return Err(ProxyError::NoHealthyUpstream {
            partition: partition.index,
            last: None,
            cause: UpstreamCause::NoReplica(pref),
        });
    }
    Ok(Plan {
        candidates,
        primary_only: pref == ReadPreference::Primary,
    })
}

/// Replicas starting at a random one, so reads spread across them.
fn push_replicas<'t>(
    partition: &'t RoutePartition,
    out: &mut SmallVec<[(&'t Arc<Upstream>, Role); 4]>,
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
        out.push((&replicas[(start + i) % n], Role::Replica));
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
            let plan = plan(&p, RequestClass::Write, pref).unwrap();
            assert_eq!(roles(&plan), [Role::Primary], "{pref}");
            assert!(plan.primary_only);
        }
    }

    #[test]
    fn reads_follow_their_preference() {
        let p = partition(2);
        let read = |pref| roles(&plan(&p, RequestClass::Read, pref).unwrap());
        use Role::{Primary as P, Replica as R};
        assert_eq!(read(ReadPreference::Primary), [P]);
        assert_eq!(read(ReadPreference::PrimaryPreferred), [P, R, R]);
        assert_eq!(read(ReadPreference::Secondary), [R, R]);
        assert_eq!(read(ReadPreference::SecondaryPreferred), [R, R, P]);
        let mut nearest = read(ReadPreference::Nearest);
        nearest.sort_by_key(|r| *r == R);
        assert_eq!(nearest, [P, R, R], "every node, in cost order");
        assert!(
            !plan(&p, RequestClass::Read, ReadPreference::PrimaryPreferred)
                .unwrap()
                .primary_only
        );
    }

    #[test]
    fn replicas_are_spread_over() {
        let p = partition(3);
        let firsts: std::collections::HashSet<_> = (0..200)
            .map(|_| {
                plan(&p, RequestClass::Read, ReadPreference::Secondary)
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
        let err = plan(&p, RequestClass::Read, ReadPreference::Secondary)
            .err()
            .unwrap();
        assert_eq!(err.code(), "no_healthy_upstream");
        assert_eq!(err.partition(), Some(4));
        assert!(err.to_string().contains("secondary"), "{err}");
    }

    #[test]
    fn the_header_overrides_the_default_preference_when_allowed() {
        let mut routing = crate::proxy::ProxyConfig::from_toml(
            "[topology]\nsources = [\"m.json\"]\n",
            "t",
            &Default::default(),
        )
        .unwrap()
        .runtime
        .routing
        .clone();
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
