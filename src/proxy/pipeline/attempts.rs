//! Stage 5, attempts: the request sent to the plan's nodes until one answers
//! acceptably or the rules say stop. This module performs; `policy` decides
//! (next node, backoff, budget, give up). Breaker permits and per-upstream
//! in-flight limits admit each attempt, and every attempt's outcome is
//! settled with its breaker and counted.

use super::super::RuntimeConfig;
use super::super::error::{ProxyError, UpstreamCause};
use super::consistency::{self, Needs, Unfit};
use super::outgoing::Outgoing;
use super::plan::Plan;
use super::policy::{self, Attempts, Next, Rules, Stop};
use super::response::Delivered;
use crate::clock::HlcClock;
use crate::resilience::{AllOpen, Permit, Reach, RetryBudget};
use crate::routing::{RetryReason, RoutePartition};
use crate::telemetry::TraceId;
use crate::upstream::{
    AttemptOutcome, BodyError, Conn, ConnectError, InflightGuard, SendError, Upstream,
};
use http::{Response, StatusCode};
use hyper::body::Incoming;
use metrics::Counter;
use std::pin::pin;
use std::sync::Arc;
use tokio::time::{Instant, error::Elapsed};

/// Metric handles of the attempt loop.
pub(crate) struct AttemptMetrics {
    /// `shardgate_retry_budget_exhausted_total`
    pub(crate) budget_exhausted: Counter,
    /// `shardgate_load_shed_total{reason="upstream_inflight"}`
    pub(crate) shed_upstream: Counter,
    /// `shardgate_load_shed_total{reason="breaker_open"}`
    pub(crate) shed_breaker: Counter,
    /// `shardgate_breaker_fail_open_total`
    pub(crate) breaker_fail_open: Counter,
    /// `shardgate_load_shed_total{reason="descriptors"}`
    pub(crate) shed_descriptors: Counter,
    /// `shardgate_replica_reads_total{result}`
    pub(crate) replica_reads: ReplicaReads,
}

/// `shardgate_replica_reads_total`, by result.
pub(crate) struct ReplicaReads {
    pub(crate) served: Counter,
    pub(crate) too_stale: Counter,
    pub(crate) token_not_applied: Counter,
}

impl ReplicaReads {
    /// Replicas the plan left out, by reason (too stale, token).
    #[inline]
    pub(crate) fn passed_over(&self, counts: &[u8; 2]) {
        if counts[0] > 0 {
            self.too_stale.increment(u64::from(counts[0]));
        }
        if counts[1] > 0 {
            self.token_not_applied.increment(u64::from(counts[1]));
        }
    }

    /// A replica passed over, before or after it answered.
    pub(crate) fn unfit(&self, why: Unfit) {
        match why {
            Unfit::TooStale => self.too_stale.increment(1),
            Unfit::TokenNotApplied => self.token_not_applied.increment(1),
        }
    }
}

/// What the attempts run under.
pub(crate) struct Run<'a> {
    pub(crate) settings: &'a RuntimeConfig,
    pub(crate) budget: &'a RetryBudget,
    pub(crate) metrics: &'a AttemptMetrics,
    /// The request's arrival (the first attempt's send time) and deadline.
    pub(crate) arrived: Instant,
    pub(crate) deadline: Instant,
    pub(crate) idempotent: bool,
    pub(crate) trace_id: u128,
    /// What a replica must have to serve this read.
    pub(crate) needs: Needs,
    /// The proxy's clock, advanced by the HLCs answers carry.
    pub(crate) clock: &'a HlcClock,
}

/// Why an attempt produced no response to pass on.
pub(crate) enum Failure {
    /// Nothing was written: no connection, or a fresh one refused the request.
    NotSent(SendError),
    /// The exchange broke after the request was (maybe) written.
    Broken(UpstreamCause),
    /// No response headers in time.
    Timeout,
    /// A retryable status; kept in case it ends up being the answer. Boxed:
    /// rare, and a failure is carried across awaits in the request's future.
    Status(Box<Delivered>),
    /// A replica answered, but from further behind than the read allows.
    Stale(Unfit),
}

impl Failure {
    fn reach(&self) -> Reach {
        match self {
            Failure::NotSent(_) => Reach::NotSent,
            _ => Reach::MaybeSent,
        }
    }

    fn into_cause(self) -> UpstreamCause {
        match self {
            Failure::NotSent(e) => UpstreamCause::Unsent(e),
            Failure::Broken(c) => c,
            Failure::Timeout => UpstreamCause::Timeout,
            Failure::Status(d) => UpstreamCause::Status(d.resp.status()),
            Failure::Stale(u) => UpstreamCause::Stale(u),
        }
    }
}

/// The last failed attempt: how, and at which node.
type Last = Option<(Failure, Arc<str>)>;

/// Try the plan's nodes in `out` until one answers acceptably or SPEC §3's
/// rules say stop; also returns how many attempts were made.
pub(crate) async fn run(
    out: &mut Outgoing,
    plan: &Plan<'_>,
    partition: &RoutePartition,
    r: &Run<'_>,
) -> (Result<Delivered, ProxyError>, u32) {
    r.budget.deposit(r.arrived);
    let rules = Rules {
        retry: &r.settings.retry,
        budget: r.budget,
        deadline: r.deadline,
        idempotent: r.idempotent,
    };
    let mut attempts = Attempts::default();
    let mut last: Last = None;
    loop {
        // Which node: the first from the cursor whose breaker and in-flight limit admit us.
        let Some((slot, permit, guard)) = admit(plan, attempts.cursor(), r) else {
            if let Some((Failure::Status(kept), _)) = last {
                // The upstream's own retryable answer beats a proxy error.
                return (Ok(*kept), attempts.made());
            }
            return (Err(refused(plan, partition, last, r)), attempts.made());
        };
        let (upstream, role) = plan.candidates[slot];
        if !out.refill() {
            let (head, replayer) = out.why_not_again();
            tracing::debug!(head, replayer, "cannot send the request again");
            return (give_up(last, plan, partition), attempts.made());
        }
        attempts.begin(slot);
        // A first attempt goes out microseconds after the request arrived:
        // its arrival time will do, saving a clock read per request.
        let sent_at = if attempts.made() == 1 {
            r.arrived
        } else {
            Instant::now()
        };
        let trace = TraceId(r.trace_id);
        tracing::debug!(attempt = attempts.made(), upstream = %upstream.label(), %trace, "attempt");
        let try_deadline = r.deadline.min(sent_at + r.settings.timeouts.per_try);
        // The attempt's result and failure live in this block only: a local
        // still in scope at the backoff's await below would be laid out in the
        // request's future, which hyper moves for every request.
        let backoff = {
            let result = {
                let attempt = pin!(tokio::time::timeout_at(
                    try_deadline,
                    upstream.send(out.slot(), sent_at)
                ));
                attempt.await
            };
            let failure = match settle(
                result,
                (upstream, &partition.primary),
                permit,
                guard,
                role,
                sent_at,
                r,
            ) {
                Settled::Deliver(d) => return (Ok(d), attempts.made()),
                Settled::ClientFault(e) => return (Err(e), attempts.made()),
                Settled::Local => {
                    r.metrics.shed_descriptors.increment(1);
                    let error = ProxyError::Overloaded {
                        reason: "out of file descriptors for upstream connections",
                        partition: Some(partition.index),
                    };
                    return (Err(error), attempts.made());
                }
                Settled::Failed(f) => f,
            };
            let label = upstream.label().clone();
            let next = attempts.after_failure(
                &rules,
                failure.reach(),
                out.can_resend(),
                plan.candidates.len(),
                Instant::now(),
                &mut rand::rng(),
            );
            tracing::debug!(attempt = attempts.made(), upstream = %label, %trace, ?next, "attempt failed");
            let delay = match next {
                Next::GiveUp(why) => {
                    if why == Stop::BudgetSpent {
                        r.metrics.budget_exhausted.increment(1);
                    }
                    return (
                        give_up(Some((failure, label)), plan, partition),
                        attempts.made(),
                    );
                }
                Next::Failover => {
                    partition.metrics.retry(RetryReason::Failover);
                    None
                }
                Next::Retry(delay) => {
                    partition.metrics.retry(RetryReason::Retry);
                    Some(delay)
                }
            };
            last = Some((failure, label));
            delay
        };
        if let Some(delay) = backoff {
            tokio::time::sleep(delay).await;
        }
    }
}

/// One attempt's result, settled with its breaker.
enum Settled {
    /// Pass this response on.
    Deliver(Delivered),
    /// The attempt failed; the policy decides what next.
    Failed(Failure),
    /// The client broke the exchange (its body); no retry, no breaker verdict.
    ClientFault(ProxyError),
    /// This process could not open a socket: its own overload. No breaker
    /// verdict (the node did nothing wrong), no retry (every node would fail
    /// alike).
    Local,
}

/// Classify an attempt's result, settle its breaker permit and count it.
fn settle(
    result: Result<Result<(Response<Incoming>, Conn), SendError>, Elapsed>,
    (upstream, primary): (&Upstream, &Upstream),
    permit: Permit<'_>,
    guard: InflightGuard,
    role: crate::routing::Role,
    sent_at: Instant,
    r: &Run<'_>,
) -> Settled {
    let outcome = |o, permit, at| verdict(upstream, permit, o, at);
    match result {
        Ok(Ok((resp, conn))) => {
            let answered_at = Instant::now();
            tracing::debug!(
                status = resp.status().as_u16(),
                reused = conn.is_reused(),
                "answered"
            );
            learn_latency(upstream, sent_at, answered_at);
            let status = resp.status();
            // What the node says it has applied (or stamped) teaches the
            // proxy its freshness and advances the proxy's clock; a replica
            // too far behind for this read is passed over, not passed on.
            let applied = consistency::learn(resp.headers(), upstream);
            if let Some(hlc) = applied {
                let _ = r.clock.observe(hlc);
            }
            if role == crate::routing::Role::Replica && !status.is_server_error() {
                if !r.needs.is_none()
                    && let Err(why) = consistency::judge_answer(
                        upstream.freshness(),
                        primary.freshness(),
                        applied,
                        r.needs,
                    )
                {
                    r.metrics.replica_reads.unfit(why);
                    outcome(AttemptOutcome::Ok, permit, answered_at);
                    return Settled::Failed(Failure::Stale(why));
                }
                r.metrics.replica_reads.served.increment(1);
            }
            let delivered = Delivered {
                resp,
                conn,
                guard,
                role,
                answered_at,
            };
            if status == StatusCode::SWITCHING_PROTOCOLS {
                // Upgrades are never forwarded, so a 101 is a confused upstream.
                outcome(AttemptOutcome::SendError, permit, answered_at);
                Settled::Failed(Failure::Broken(UpstreamCause::UnexpectedUpgrade))
            } else if r.settings.breaker.failure_statuses.contains(status) {
                // A node saying what it may not do right now (not primary
                // yet, lease lapsed, no quorum) is alive and answering: that
                // must not open its breaker, or a newly promoted primary that
                // refuses for the few milliseconds before it hears its new
                // role is shut out for the breaker's whole cool-down.
                let verdict = if policy::role_refusal(delivered.resp.headers()).is_some() {
                    AttemptOutcome::Ok
                } else {
                    AttemptOutcome::FailureStatus
                };
                outcome(verdict, permit, answered_at);
                if r.idempotent && r.settings.retry.retry_statuses.contains(status) {
                    Settled::Failed(Failure::Status(Box::new(delivered)))
                } else {
                    Settled::Deliver(delivered)
                }
            } else {
                outcome(AttemptOutcome::Ok, permit, answered_at);
                Settled::Deliver(delivered)
            }
        }
        Ok(Err(SendError::Connect(ConnectError::Local(e)))) => {
            tracing::debug!(error = %e, "no socket for an upstream connection");
            drop(permit);
            Settled::Local
        }
        Ok(Err(unsent @ (SendError::Connect(_) | SendError::NotSent(_)))) => {
            outcome(AttemptOutcome::ConnectError, permit, Instant::now());
            Settled::Failed(Failure::NotSent(unsent))
        }
        Ok(Err(nothing @ SendError::Nothing)) => {
            drop(permit);
            Settled::Failed(Failure::NotSent(nothing))
        }
        Ok(Err(SendError::Failed(error))) => {
            if is_client_side(&error) {
                drop(permit);
                return Settled::ClientFault(client_fault(error));
            }
            outcome(AttemptOutcome::SendError, permit, Instant::now());
            Settled::Failed(Failure::Broken(UpstreamCause::Broken(error)))
        }
        Err(_elapsed) => {
            outcome(AttemptOutcome::Timeout, permit, Instant::now());
            Settled::Failed(Failure::Timeout)
        }
    }
}

/// Every answer teaches the node's latency estimate (for `nearest`).
#[inline]
pub(crate) fn learn_latency(upstream: &Upstream, sent_at: Instant, answered_at: Instant) {
    upstream
        .latency()
        .observe(answered_at - sent_at, answered_at);
}

/// An attempt's verdict: counted, and settled with its breaker.
#[inline]
pub(crate) fn verdict(
    upstream: &Upstream,
    permit: Permit<'_>,
    outcome: AttemptOutcome,
    at: Instant,
) {
    upstream.count_attempt(outcome);
    match outcome {
        AttemptOutcome::Ok => permit.success(at),
        _ => permit.failure(at),
    }
}

/// The first candidate from `cursor` on that a breaker and the per-upstream
/// in-flight limit admit; `fail_open` falls back to the least-bad node.
fn admit<'p>(
    plan: &Plan<'p>,
    cursor: usize,
    r: &Run<'_>,
) -> Option<(usize, Permit<'p>, InflightGuard)> {
    let n = plan.candidates.len();
    let limit = r.settings.limits.max_inflight_per_upstream;
    for i in 0..n {
        let slot = (cursor + i) % n;
        let upstream: &'p Arc<Upstream> = plan.candidates[slot].0;
        let Some(permit) = upstream.breaker().try_acquire() else {
            continue;
        };
        match upstream.try_begin(limit) {
            Some(guard) => return Some((slot, permit, guard)),
            None => r.metrics.shed_upstream.increment(1),
        }
    }
    if r.settings.breaker.when_all_open == AllOpen::FailOpen {
        let least_bad = (0..n).min_by_key(|&s| {
            plan.candidates[s]
                .0
                .breaker()
                .open_until()
                .unwrap_or_else(Instant::now)
        })?;
        let upstream: &'p Arc<Upstream> = plan.candidates[least_bad].0;
        let guard = upstream.try_begin(limit)?;
        r.metrics.breaker_fail_open.increment(1);
        return Some((least_bad, upstream.breaker().force_acquire(), guard));
    }
    None
}

/// Every node the request may use refused it (breakers open, in-flight
/// limits) before the next attempt could be made.
fn refused(plan: &Plan<'_>, partition: &RoutePartition, last: Last, r: &Run<'_>) -> ProxyError {
    let per_upstream = r.settings.limits.max_inflight_per_upstream;
    let full = per_upstream != 0
        && plan
            .candidates
            .iter()
            .any(|(u, _)| u.inflight() >= per_upstream);
    if full && last.is_none() {
        return ProxyError::Overloaded {
            reason: "upstream in-flight limit reached",
            partition: Some(partition.index),
        };
    }
    r.metrics.shed_breaker.increment(1);
    // Earlier attempts may have failed on their own; what matters now is
    // that no node may be tried: the partition has no reachable primary (or
    // no healthy node), which is what failover buffering waits out.
    let cause = match last {
        Some((f, upstream)) => UpstreamCause::BreakerOpenAfter {
            upstream,
            last: Box::new(f.into_cause()),
        },
        None => UpstreamCause::BreakerOpen,
    };
    if plan.primary_only {
        ProxyError::PrimaryUnavailable {
            partition: partition.index,
            upstream: plan.candidates[0].0.label().clone(),
            cause,
        }
    } else {
        ProxyError::NoHealthyUpstream {
            partition: partition.index,
            last: None,
            cause,
        }
    }
}

/// The final answer once no further attempt will be made.
fn give_up(
    last: Last,
    plan: &Plan<'_>,
    partition: &RoutePartition,
) -> Result<Delivered, ProxyError> {
    let index = partition.index;
    let Some((failure, upstream)) = last else {
        return Err(ProxyError::NoHealthyUpstream {
            partition: index,
            last: None,
            cause: UpstreamCause::NoAttempt,
        });
    };
    match failure {
        // The upstream's own answer is passed through as the final response.
        Failure::Status(d) => Ok(*d),
        Failure::NotSent(e) if plan.primary_only => Err(ProxyError::PrimaryUnavailable {
            partition: index,
            upstream,
            cause: UpstreamCause::Unsent(e),
        }),
        Failure::NotSent(e) => Err(ProxyError::NoHealthyUpstream {
            partition: index,
            last: Some(upstream),
            cause: UpstreamCause::Unsent(e),
        }),
        Failure::Stale(why) => Err(ProxyError::NoFreshReplica {
            partition: index,
            why,
        }),
        Failure::Timeout => Err(ProxyError::UpstreamTimeout {
            partition: index,
            upstream,
        }),
        Failure::Broken(cause) => Err(ProxyError::UpstreamFailed {
            partition: index,
            upstream,
            cause,
        }),
    }
}

/// Whether a failed exchange was the client's doing (an oversized or broken body).
fn is_client_side(error: &hyper::Error) -> bool {
    client_body_error(error)
        .is_some_and(|b| matches!(b, BodyError::TooLarge { .. } | BodyError::Client(_)))
}

fn client_body_error(error: &hyper::Error) -> Option<&BodyError> {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(b) = e.downcast_ref::<BodyError>() {
            return Some(b);
        }
        source = e.source();
    }
    None
}

/// The proxy's answer to a client whose body broke the exchange.
fn client_fault(error: hyper::Error) -> ProxyError {
    match client_body_error(&error) {
        Some(BodyError::TooLarge { limit }) => ProxyError::PayloadTooLarge { limit: *limit },
        _ => ProxyError::ClientBodyFailed(error),
    }
}

#[cfg(test)]
mod tests {
    use super::super::consistency::Moment;
    use super::super::plan::plan;
    use super::super::tests::settings;
    use super::*;
    use crate::routing::{PartitionMetrics, ReadPreference, RequestClass};
    use crate::telemetry::Metrics;
    use crate::upstream::UpstreamFactory;
    use http::HeaderValue;

    struct Fixture {
        partition: RoutePartition,
        settings: Arc<RuntimeConfig>,
        budget: RetryBudget,
        metrics: AttemptMetrics,
        registry: Arc<Metrics>,
        clock: HlcClock,
    }

    fn fixture(settings: Arc<RuntimeConfig>) -> Fixture {
        let registry = Arc::new(Metrics::new());
        let f = UpstreamFactory::new(settings.upstream.clone(), registry.clone()).unwrap();
        let node = |p: u16| f.make(format!("127.0.0.1:{p}").parse().unwrap());
        Fixture {
            partition: RoutePartition {
                index: 1,
                index_header: HeaderValue::from(1),
                primary: node(1001),
                replicas: vec![node(1002)].into(),
                metrics: Arc::new(PartitionMetrics::new(registry.clone(), "1")),
            },
            budget: RetryBudget::new(settings.budget),
            metrics: AttemptMetrics {
                budget_exhausted: registry.counter("budget", &[]),
                shed_upstream: registry.counter("shed_upstream", &[]),
                shed_breaker: registry.counter("shed_breaker", &[]),
                breaker_fail_open: registry.counter("fail_open", &[]),
                shed_descriptors: registry.counter("shed_descriptors", &[]),
                replica_reads: ReplicaReads {
                    served: registry.counter("replica_served", &[]),
                    too_stale: registry.counter("replica_too_stale", &[]),
                    token_not_applied: registry.counter("replica_token", &[]),
                },
            },
            settings,
            registry,
            clock: HlcClock::new(),
        }
    }

    impl Fixture {
        /// What this partition's plan is for a request with nothing to ask of replicas.
        fn plan(&self, class: RequestClass, pref: ReadPreference) -> Plan<'_> {
            plan(
                &self.partition,
                class,
                pref,
                Needs::default(),
                Moment::default(),
            )
            .unwrap()
        }

        fn run(&self) -> Run<'_> {
            Run {
                settings: &self.settings,
                budget: &self.budget,
                metrics: &self.metrics,
                arrived: Instant::now(),
                deadline: Instant::now() + std::time::Duration::from_secs(30),
                idempotent: true,
                trace_id: 1,
                needs: Needs::default(),
                clock: &self.clock,
            }
        }

        fn open(&self, u: &Upstream) {
            for _ in 0..5 {
                u.breaker().try_acquire().unwrap().failure(Instant::now());
            }
            assert!(u.breaker().try_acquire().is_none());
        }
    }

    fn connect_refused() -> Failure {
        Failure::NotSent(SendError::Connect(crate::upstream::ConnectError::Io(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        )))
    }

    #[tokio::test]
    async fn the_last_failure_becomes_the_spec_error_for_who_may_serve() {
        let fx = fixture(settings());
        let write = fx.plan(RequestClass::Write, ReadPreference::Nearest);
        let read = fx.plan(RequestClass::Read, ReadPreference::PrimaryPreferred);
        let node: Arc<str> = "127.0.0.1:1001".into();
        let code = |r: Result<Delivered, ProxyError>| r.err().unwrap().code();
        let last = |f| Some((f, node.clone()));
        assert_eq!(
            code(give_up(last(connect_refused()), &write, &fx.partition)),
            "primary_unavailable"
        );
        assert_eq!(
            code(give_up(last(connect_refused()), &read, &fx.partition)),
            "no_healthy_upstream"
        );
        assert_eq!(
            code(give_up(last(Failure::Timeout), &read, &fx.partition)),
            "upstream_timeout"
        );
        assert_eq!(
            code(give_up(
                last(Failure::Broken(UpstreamCause::UnexpectedUpgrade)),
                &read,
                &fx.partition
            )),
            "upstream_failed"
        );
    }

    #[tokio::test]
    async fn breakers_admit_the_first_closed_node_from_the_cursor_and_no_open_one() {
        let fx = fixture(settings());
        let read = fx.plan(RequestClass::Read, ReadPreference::PrimaryPreferred);
        let r = fx.run();
        let (slot, _permit, _guard) = admit(&read, 0, &r).unwrap();
        assert_eq!(slot, 0, "the primary first");
        fx.open(&fx.partition.primary);
        let (slot, _permit, _guard) = admit(&read, 0, &r).unwrap();
        assert_eq!(slot, 1, "its breaker is open: the replica");
        fx.open(&fx.partition.replicas[0]);
        assert!(admit(&read, 0, &r).is_none(), "fail fast: no network wait");
        let err = refused(&read, &fx.partition, None, &r);
        assert_eq!(err.code(), "no_healthy_upstream");
        assert!(err.to_string().contains("circuit breaker open"), "{err}");
        assert!(fx.registry.render().contains("shed_breaker 1"));
    }

    #[tokio::test]
    async fn fail_open_sends_to_the_node_that_reopens_soonest() {
        let mut s = (*settings()).clone();
        s.breaker.when_all_open = AllOpen::FailOpen;
        let fx = fixture(Arc::new(s));
        let write = fx.plan(RequestClass::Write, ReadPreference::Primary);
        fx.open(&fx.partition.primary);
        let (slot, _permit, _guard) = admit(&write, 0, &fx.run()).expect("fail open");
        assert_eq!(slot, 0);
        assert!(fx.registry.render().contains("fail_open 1"));
    }

    #[tokio::test]
    async fn a_full_upstream_sheds_before_any_attempt_as_overloaded() {
        let mut s = (*settings()).clone();
        s.limits.max_inflight_per_upstream = 1;
        let fx = fixture(Arc::new(s));
        let write = fx.plan(RequestClass::Write, ReadPreference::Primary);
        let _busy = fx.partition.primary.try_begin(1).unwrap();
        let r = fx.run();
        assert!(admit(&write, 0, &r).is_none());
        let err = refused(&write, &fx.partition, None, &r);
        assert_eq!(err.code(), "overloaded");
        assert_eq!(err.partition(), Some(1));
        let after = refused(
            &write,
            &fx.partition,
            Some((Failure::Timeout, "n".into())),
            &r,
        );
        assert_eq!(
            after.code(),
            "primary_unavailable",
            "after a failed attempt it is the primary that is missing"
        );
        assert!(
            after.to_string().contains("after n: no response in time"),
            "{after}"
        );
    }
}
