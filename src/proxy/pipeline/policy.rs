//! When to send a request again, where, and after how long: SPEC §3's retry
//! rules and the proxy's re-placement rules as decisions over what happened
//! and the time. Nothing here does I/O or reads the clock; the attempt loop
//! (`attempts`) performs what this decides, and the tests drive it with
//! tokio's paused clock.

use super::super::FailoverBuffer;
use crate::resilience::{Reach, RetryBudget, RetryPolicy};
use crate::routing::RequestClass;
use http::{HeaderMap, StatusCode};
use rand::Rng;
use std::time::Duration;
use tokio::time::Instant;

/// How long a read that met a `421` may wait for the newer map.
pub(crate) const MISDIRECTED_WAIT: Duration = Duration::from_secs(2);

/// The first pause before a held write goes again to a primary that refused
/// it for its role; each later pause doubles, up to [`ROLE_WAIT_MAX`]. A
/// promoted node takes up its role at its agent's next heartbeat.
pub(crate) const ROLE_WAIT_FIRST: Duration = Duration::from_millis(10);
/// The longest pause between sends of a write held for a primary's role.
pub(crate) const ROLE_WAIT_MAX: Duration = Duration::from_millis(100);

/// The rules one request's attempts follow.
pub(crate) struct Rules<'a> {
    /// Attempts, backoff.
    pub(crate) retry: &'a RetryPolicy,
    /// Retries allowed across all requests.
    pub(crate) budget: &'a RetryBudget,
    /// The request's overall deadline.
    pub(crate) deadline: Instant,
    /// Whether the method may be repeated (RFC 9110 §9.2.2).
    pub(crate) idempotent: bool,
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Send again at once, to the next node not yet tried.
    Failover,
    /// Send again after this delay, to a node already tried.
    Retry(Duration),
    /// Stop: the last failure is the answer.
    GiveUp(Stop),
}

/// Why the attempts stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Attempts used up, or nothing more may be sent (a non-idempotent request
    /// that may have reached the upstream, a body that cannot be replayed).
    NotAllowed,
    /// The retry budget is spent.
    BudgetSpent,
    /// The deadline has passed, or would before the next attempt.
    Deadline,
}

/// One request's attempts so far: how many, at which candidates, and the
/// last backoff (decorrelated jitter grows from it).
#[derive(Debug, Default)]
pub(crate) struct Attempts {
    made: u32,
    /// Where the search for the next candidate starts.
    cursor: usize,
    /// Bit `i`: candidate `i` was tried (candidates beyond 63 share bit 63).
    tried: u64,
    previous_delay: Option<Duration>,
}

fn bit(slot: usize) -> u64 {
    1 << slot.min(63)
}

impl Attempts {
    /// Attempts made so far.
    pub(crate) fn made(&self) -> u32 {
        self.made
    }

    /// Where to start looking for a candidate that will take the next attempt.
    pub(crate) fn cursor(&self) -> usize {
        self.cursor
    }

    /// An attempt goes to candidate `slot`.
    pub(crate) fn begin(&mut self, slot: usize) {
        self.cursor = slot;
        self.tried |= bit(slot);
        self.made += 1;
    }

    /// The attempt just begun failed, getting as far as `reach`; `resendable`:
    /// the request can still be sent again (it is back unsent, or a copy can be
    /// rebuilt). Of `candidates` nodes, moving to one not yet tried is
    /// immediate, going back to one is spaced by backoff; every retry is
    /// withdrawn from the budget when it is decided.
    pub(crate) fn after_failure(
        &mut self,
        rules: &Rules<'_>,
        reach: Reach,
        resendable: bool,
        candidates: usize,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Next {
        let allowed = self.made < rules.retry.max_attempts
            && (reach == Reach::NotSent || rules.idempotent)
            && resendable;
        if !allowed {
            return Next::GiveUp(Stop::NotAllowed);
        }
        if now >= rules.deadline {
            return Next::GiveUp(Stop::Deadline);
        }
        if !rules.budget.try_withdraw(now) {
            return Next::GiveUp(Stop::BudgetSpent);
        }
        self.cursor = (self.cursor + 1) % candidates.max(1);
        if self.tried & bit(self.cursor) == 0 {
            return Next::Failover;
        }
        let delay = rules
            .retry
            .backoff
            .delay(self.made - 1, self.previous_delay, rng);
        if now + delay >= rules.deadline {
            return Next::GiveUp(Stop::Deadline);
        }
        self.previous_delay = Some(delay);
        Next::Retry(delay)
    }
}

/// The epoch a `421 Misdirected Request` names, when it is newer than `ours`:
/// a node that knows a newer map refused the request.
pub(crate) fn misdirected(status: StatusCode, headers: &HeaderMap, ours: u64) -> Option<u64> {
    if status != StatusCode::MISDIRECTED_REQUEST {
        return None;
    }
    let theirs: u64 = headers
        .get(crate::proxy::headers::EPOCH_HEADER)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    (theirs > ours).then_some(theirs)
}

/// A node's refusal about its role or its partition's state (SPEC §7–§8),
/// rather than a failure of the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RoleRefusal {
    /// Not primary, no lease, no majority in reach — yet: given before a
    /// write is applied, and over once a promoted node takes up its role and
    /// its replicas follow it.
    NotYet,
    /// Fenced, catching up, not placed.
    Other,
}

/// The role refusal an answer carries, if it is one.
pub(crate) fn role_refusal(headers: &HeaderMap) -> Option<RoleRefusal> {
    match headers.get(crate::json_error::ERROR_HEADER)?.as_bytes() {
        b"not_primary" | b"lease_expired" | b"no_quorum" => Some(RoleRefusal::NotYet),
        b"fenced" | b"catching_up" | b"not_placed" => Some(RoleRefusal::Other),
        _ => None,
    }
}

/// Whether an answer refused a write that the node has not applied and may
/// take once it is in its role. Only a `503` is looked into: this runs on
/// every answer.
pub(crate) fn refused_not_yet(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::SERVICE_UNAVAILABLE && role_refusal(headers) == Some(RoleRefusal::NotYet)
}

/// A wait for a map newer than `above`, until `until`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WaitFor {
    /// The epoch the new map must exceed.
    pub(crate) above: u64,
    /// When to stop waiting.
    pub(crate) until: Instant,
}

/// Placing a request again under a newer map: at most once per request.
/// A write its primary refused for its role may also go again, for as long
/// as failover buffering holds it.
#[derive(Debug, Default)]
pub(crate) struct Replacement {
    used: bool,
    /// Since the primary first refused the write for its role: when the hold
    /// ends, and the next pause.
    role_hold: Option<(Instant, Duration)>,
}

impl Replacement {
    /// A node that knows map `theirs` refused the request. A read waits for
    /// that map (briefly) and is placed again; a write never is: it reached a
    /// node, and only a read is safe to send twice without a kept copy.
    pub(crate) fn after_misdirected(
        &mut self,
        class: RequestClass,
        theirs: u64,
        deadline: Instant,
        now: Instant,
    ) -> Option<WaitFor> {
        if self.used || class != RequestClass::Read {
            return None;
        }
        self.used = true;
        Some(WaitFor {
            above: theirs.saturating_sub(1),
            until: deadline.min(now + MISDIRECTED_WAIT),
        })
    }

    /// No primary could take a request under map `ours`. With failover
    /// buffering a write waits for the map that names the new primary (the
    /// caller also needs a hold slot and a request it can send again).
    pub(crate) fn after_primary_unavailable(
        &mut self,
        class: RequestClass,
        buffer: Option<FailoverBuffer>,
        ours: u64,
        deadline: Instant,
        now: Instant,
    ) -> Option<WaitFor> {
        if self.used || class != RequestClass::Write {
            return None;
        }
        let buffer = buffer?;
        self.used = true;
        Some(WaitFor {
            above: ours,
            until: deadline.min(now + buffer.max_wait),
        })
    }

    /// The primary refused a write for its role ([`refused_not_yet`]). It
    /// applied nothing, so the write may go again; a node just promoted
    /// takes up its role within a heartbeat. With failover buffering the
    /// write waits — for a newer map, or a pause that doubles from
    /// [`ROLE_WAIT_FIRST`] — and goes again, until `max_wait` from the first
    /// refusal or the deadline. `None`: answer with the refusal.
    ///
    /// Returns when to send it again at the latest (a newer map, if one comes
    /// first, is used at once).
    pub(crate) fn after_role_refusal(
        &mut self,
        class: RequestClass,
        buffer: Option<FailoverBuffer>,
        (deadline, now): (Instant, Instant),
    ) -> Option<Instant> {
        let buffer = buffer.filter(|_| class == RequestClass::Write)?;
        let (ends, pause) = *self
            .role_hold
            .get_or_insert((deadline.min(now + buffer.max_wait), ROLE_WAIT_FIRST));
        if now >= ends {
            return None;
        }
        self.role_hold = Some((ends, (pause * 2).min(ROLE_WAIT_MAX)));
        Some(ends.min(now + pause))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::{Backoff, BudgetConfig, Jitter, StatusSet};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    fn retry(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            backoff: Backoff {
                base: 25 * MS,
                max: SEC,
                jitter: Jitter::None,
            },
            retry_statuses: StatusSet::from_codes(&[502, 503, 504]),
            buffer_limit: 64 * 1024,
        }
    }

    fn budget(min_per_second: u32) -> RetryBudget {
        RetryBudget::new(BudgetConfig {
            ratio: 0.2,
            window: 10 * SEC,
            min_per_second,
        })
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    struct Case {
        retry: RetryPolicy,
        budget: RetryBudget,
        deadline: Instant,
        idempotent: bool,
    }

    impl Case {
        fn new(max_attempts: u32, idempotent: bool) -> Case {
            Case {
                retry: retry(max_attempts),
                budget: budget(10),
                deadline: Instant::now() + 30 * SEC,
                idempotent,
            }
        }

        fn rules(&self) -> Rules<'_> {
            Rules {
                retry: &self.retry,
                budget: &self.budget,
                deadline: self.deadline,
                idempotent: self.idempotent,
            }
        }
    }

    fn fail(a: &mut Attempts, c: &Case, reach: Reach, candidates: usize) -> Next {
        a.after_failure(
            &c.rules(),
            reach,
            true,
            candidates,
            Instant::now(),
            &mut rng(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn an_untried_node_is_next_at_once_and_a_tried_one_after_backoff() {
        let c = Case::new(5, true);
        let mut a = Attempts::default();
        a.begin(0);
        assert_eq!(fail(&mut a, &c, Reach::MaybeSent, 2), Next::Failover);
        assert_eq!(a.cursor(), 1);
        a.begin(1);
        assert_eq!(
            fail(&mut a, &c, Reach::MaybeSent, 2),
            Next::Retry(50 * MS),
            "back to the first node: base doubled once, no jitter"
        );
        assert_eq!(a.cursor(), 0);
        a.begin(0);
        assert_eq!(fail(&mut a, &c, Reach::MaybeSent, 2), Next::Retry(100 * MS));
        assert_eq!(a.made(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded() {
        let c = Case::new(2, true);
        let mut a = Attempts::default();
        a.begin(0);
        assert_eq!(fail(&mut a, &c, Reach::NotSent, 1), Next::Retry(25 * MS));
        a.begin(0);
        assert_eq!(
            fail(&mut a, &c, Reach::NotSent, 1),
            Next::GiveUp(Stop::NotAllowed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_may_have_been_sent_is_repeated_only_if_idempotent() {
        let post = Case::new(3, false);
        let mut a = Attempts::default();
        a.begin(0);
        assert_eq!(
            fail(&mut a, &post, Reach::MaybeSent, 2),
            Next::GiveUp(Stop::NotAllowed),
            "a POST that may have reached the node is never sent twice"
        );
        let mut a = Attempts::default();
        a.begin(0);
        assert_eq!(
            fail(&mut a, &post, Reach::NotSent, 2),
            Next::Failover,
            "nothing of it left: safe whatever the method"
        );
        let put = Case::new(3, true);
        let mut a = Attempts::default();
        a.begin(0);
        assert_eq!(fail(&mut a, &put, Reach::MaybeSent, 2), Next::Failover);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_cannot_be_replayed_ends_the_attempts() {
        let c = Case::new(3, true);
        let mut a = Attempts::default();
        a.begin(0);
        let next = a.after_failure(
            &c.rules(),
            Reach::MaybeSent,
            false,
            2,
            Instant::now(),
            &mut rng(),
        );
        assert_eq!(next, Next::GiveUp(Stop::NotAllowed));
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_is_scheduled_past_the_deadline() {
        let mut c = Case::new(5, true);
        c.deadline = Instant::now() + 40 * MS;
        let mut a = Attempts::default();
        a.begin(0);
        assert_eq!(fail(&mut a, &c, Reach::NotSent, 1), Next::Retry(25 * MS));
        tokio::time::advance(25 * MS).await;
        a.begin(0);
        assert_eq!(
            fail(&mut a, &c, Reach::NotSent, 1),
            Next::GiveUp(Stop::Deadline),
            "50 ms of backoff would end after the deadline"
        );
        tokio::time::advance(20 * MS).await;
        let mut b = Attempts::default();
        b.begin(0);
        assert_eq!(
            fail(&mut b, &c, Reach::NotSent, 2),
            Next::GiveUp(Stop::Deadline),
            "even an immediate failover once the deadline has passed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_when_the_budget_is_spent_and_resume_as_it_refills() {
        let mut c = Case::new(3, true);
        c.budget = budget(1); // 10 retries per 10 s window, no traffic
        let mut granted = 0;
        for _ in 0..20 {
            let mut a = Attempts::default();
            a.begin(0);
            match fail(&mut a, &c, Reach::NotSent, 2) {
                Next::Failover => granted += 1,
                Next::GiveUp(Stop::BudgetSpent) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(granted, 10);
        tokio::time::advance(10 * SEC).await;
        c.deadline = Instant::now() + 30 * SEC;
        let mut a = Attempts::default();
        a.begin(0);
        assert_eq!(fail(&mut a, &c, Reach::NotSent, 2), Next::Failover);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_retry_costs_no_budget() {
        let mut c = Case::new(1, true);
        c.budget = budget(1);
        for _ in 0..50 {
            let mut a = Attempts::default();
            a.begin(0);
            assert_eq!(
                fail(&mut a, &c, Reach::NotSent, 2),
                Next::GiveUp(Stop::NotAllowed)
            );
        }
        c.retry.max_attempts = 2;
        let mut a = Attempts::default();
        a.begin(0);
        assert_eq!(fail(&mut a, &c, Reach::NotSent, 2), Next::Failover);
    }

    #[test]
    fn only_a_421_naming_a_newer_epoch_is_misdirected() {
        let mut h = HeaderMap::new();
        h.insert("x-cluster-epoch", "9".parse().unwrap());
        assert_eq!(misdirected(StatusCode::MISDIRECTED_REQUEST, &h, 8), Some(9));
        assert_eq!(misdirected(StatusCode::MISDIRECTED_REQUEST, &h, 9), None);
        assert_eq!(misdirected(StatusCode::OK, &h, 8), None);
        h.insert("x-cluster-epoch", "nine".parse().unwrap());
        assert_eq!(misdirected(StatusCode::MISDIRECTED_REQUEST, &h, 8), None);
        assert_eq!(
            misdirected(StatusCode::MISDIRECTED_REQUEST, &HeaderMap::new(), 8),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_misdirected_read_waits_once_for_the_newer_map_and_a_write_never() {
        let now = Instant::now();
        let deadline = now + 30 * SEC;
        let mut r = Replacement::default();
        assert_eq!(
            r.after_misdirected(RequestClass::Write, 9, deadline, now),
            None
        );
        assert_eq!(
            r.after_misdirected(RequestClass::Read, 9, deadline, now),
            Some(WaitFor {
                above: 8,
                until: now + MISDIRECTED_WAIT
            })
        );
        assert_eq!(
            r.after_misdirected(RequestClass::Read, 10, deadline, now),
            None,
            "placed again at most once"
        );
        let mut r = Replacement::default();
        let soon = now + 500 * MS;
        assert_eq!(
            r.after_misdirected(RequestClass::Read, 9, soon, now)
                .map(|w| w.until),
            Some(soon),
            "never past the request's deadline"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_is_held_through_a_failover_only_with_buffering_and_only_once() {
        let now = Instant::now();
        let deadline = now + 30 * SEC;
        let buffer = FailoverBuffer {
            max_wait: 5 * SEC,
            max_requests: 10,
        };
        let mut r = Replacement::default();
        assert_eq!(
            r.after_primary_unavailable(RequestClass::Write, None, 7, deadline, now),
            None,
            "buffering off: the write fails at once"
        );
        assert_eq!(
            r.after_primary_unavailable(RequestClass::Read, Some(buffer), 7, deadline, now),
            None,
            "reads are not held"
        );
        assert_eq!(
            r.after_primary_unavailable(RequestClass::Write, Some(buffer), 7, deadline, now),
            Some(WaitFor {
                above: 7,
                until: now + 5 * SEC
            })
        );
        assert_eq!(
            r.after_primary_unavailable(RequestClass::Write, Some(buffer), 8, deadline, now),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_a_promoted_primary_refuses_goes_again_after_doubling_pauses_until_the_buffer_runs_out()
     {
        let now = Instant::now();
        let buffer = FailoverBuffer {
            max_wait: SEC,
            max_requests: 10,
        };
        let mut r = Replacement::default();
        assert_eq!(
            r.after_role_refusal(RequestClass::Write, None, (now + 30 * SEC, now)),
            None,
            "buffering off: the refusal is the answer"
        );
        assert_eq!(
            r.after_role_refusal(RequestClass::Read, Some(buffer), (now + 30 * SEC, now)),
            None
        );
        // A hold through the failover itself does not use up this one.
        let deadline = now + 30 * SEC;
        assert!(
            r.after_primary_unavailable(RequestClass::Write, Some(buffer), 6, deadline, now)
                .is_some()
        );
        let mut at = now;
        let mut pauses = Vec::new();
        while let Some(until) =
            r.after_role_refusal(RequestClass::Write, Some(buffer), (deadline, at))
        {
            assert!(until > at && until <= now + SEC);
            pauses.push(until - at);
            at = until;
        }
        assert_eq!(&pauses[..5], [10 * MS, 20 * MS, 40 * MS, 80 * MS, 100 * MS]);
        assert!(pauses[5..].iter().all(|p| *p <= 100 * MS));
        assert_eq!(
            at,
            now + SEC,
            "held for max_wait from the first refusal, no longer"
        );

        // Never past the request's own deadline.
        let mut r = Replacement::default();
        let soon = now + 15 * MS;
        let first = r.after_role_refusal(RequestClass::Write, Some(buffer), (soon, now));
        assert_eq!(first, Some(now + 10 * MS));
        let second = r.after_role_refusal(RequestClass::Write, Some(buffer), (soon, now + 10 * MS));
        assert_eq!(second, Some(soon));
        assert_eq!(
            r.after_role_refusal(RequestClass::Write, Some(buffer), (soon, soon)),
            None
        );
    }
}
