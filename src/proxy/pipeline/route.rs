//! The forwarding stages as one service: key → placement → plan → attempts →
//! response.
//!
//! Unlike the layers above it this is not a tower stack. A layer wraps what
//! is below it without looking inside; forwarding is a loop over these
//! stages: the attempts move a request between nodes, a write may be held
//! through a failover, and a read that a node refused for an old map is
//! placed again under the newer one. Each of those decisions (`policy`)
//! needs the request, its placement, its plan and the last outcome in hand at
//! once; as layers, that state would travel back and forth through every
//! layer's request and response types.
//!
//! Stage 1 and the inputs of the later ones are computed synchronously in
//! [`Route::call`], before the returned future exists: the client's request
//! never lives in the future, which hyper moves whole for every request (each
//! byte of it costs a copy). For the same reason the future awaits through
//! pinned sub-futures and keeps rare state in boxes.

use super::super::body::ProxyBody;
use super::super::error::ProxyError;
use super::super::headers;
use super::super::live::{LiveMap, Snapshot};
use super::attempts::{self, AttemptMetrics, Run};
use super::consistency::{self, Asked, Moment};
use super::outgoing::Outgoing;
use super::placement::{self, Placement};
use super::plan;
use super::policy::{self, Replacement, WaitFor};
use super::response::{self, Delivered};
use super::{Bounded, ClientConn, Failed, Forwarded, Inbound, Ticket, Trail};
use crate::clock::{Hlc, HlcClock};
use crate::resilience::is_idempotent;
use crate::routing::{ReadPreference, RequestClass, RoutePartition};
use crate::upstream::Upload;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// What the forwarding stages of every connection share.
pub(crate) struct Forwarder {
    /// The map in force, and news of newer ones.
    pub(crate) live: Arc<LiveMap>,
    /// Writes held through failovers.
    pub(crate) holds: Holds,
    /// The proxy's hybrid logical clock: stamps writes, advanced by answers.
    pub(crate) clock: HlcClock,
    /// The attempt loop's metric handles.
    pub(crate) metrics: AttemptMetrics,
}

/// Writes held while their partition has no reachable primary (failover
/// buffering), at most so many at once.
pub(crate) struct Holds {
    slots: Arc<Semaphore>,
    max: Mutex<usize>,
}

impl Holds {
    /// At most `max` writes held at once.
    pub(crate) fn new(max: usize) -> Holds {
        Holds {
            slots: Arc::new(Semaphore::new(max)),
            max: Mutex::new(max),
        }
    }

    /// Change the limit (config reload); holds in progress keep their slots.
    pub(crate) fn set_max(&self, max: usize) {
        let mut have = self.max.lock().unwrap_or_else(|e| e.into_inner());
        if max > *have {
            self.slots.add_permits(max - *have);
        } else {
            self.slots.forget_permits(*have - max);
        }
        *have = max;
    }

    fn try_hold(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }
}

/// The forwarding stages for one client connection.
pub(crate) struct Route {
    fwd: Arc<Forwarder>,
    client: ClientConn,
}

/// A request past stage 1, with everything the later stages need.
struct Routed {
    /// The request as it goes upstream.
    outgoing: Outgoing,
    /// The map it is placed under (replaced at most once, by a newer one).
    snapshot: Arc<Snapshot>,
    placement: Placement,
    pref: ReadPreference,
    class: RequestClass,
    /// What a read's token and staleness bound ask of replicas.
    asked: Asked,
    /// A write's HLC stamp.
    stamp: Option<Hlc>,
    idempotent: bool,
    arrived: Instant,
    deadline: Instant,
    trace_id: u128,
    /// Its admission ticket, for the response body to hold.
    admitted: Option<Ticket>,
}

/// Why a request waits for a newer map before it is placed again.
enum Wait {
    /// A node that knows a newer map refused a read; its refusal is the
    /// answer if no newer map arrives in time. Boxed: this is rare.
    Misdirected(Box<Delivered>),
    /// A write held through a failover, holding one of the limited slots.
    Failover {
        error: ProxyError,
        _slot: OwnedSemaphorePermit,
    },
    /// A write the primary refused for its role, held (with a slot) until it
    /// goes again. The refusal itself is dropped at once, so it holds no
    /// upstream connection: the next attempt's answer is the one given.
    RoleRefused { _slot: OwnedSemaphorePermit },
}

impl Route {
    /// The stages for a connection from `client`.
    pub(crate) fn new(fwd: Arc<Forwarder>, client: ClientConn) -> Route {
        Route { fwd, client }
    }

    /// Forward one request; never fails to produce a result.
    ///
    /// The admission ticket goes with the answer, whoever writes it: the
    /// upstream's (`respond::reply`) or the proxy's own (with the failure).
    #[inline(always)] // see `observe`
    pub(crate) fn call(
        &self,
        mut b: Bounded,
    ) -> RouteFuture<impl Future<Output = Result<Forwarded<ProxyBody>, Failed>> + Send + use<>>
    {
        let admitted = b.inbound.admitted.take();
        match self.route(b) {
            Err(error) => RouteFuture::Refused {
                failed: Some(Failed {
                    admitted,
                    ..Failed::early(error)
                }),
            },
            Ok(mut routed) => {
                routed.admitted = admitted;
                let fwd = self.fwd.clone();
                RouteFuture::Forwarding {
                    inner: async move {
                        let mut forwarded = {
                            let forward = pin!(forward(&fwd, &mut routed));
                            forward.await
                        };
                        // In place: a rebuilt result is a copy per request.
                        if let Err(failed) = &mut forwarded {
                            failed.admitted = routed.admitted.take();
                        }
                        forwarded
                    },
                }
            }
        }
    }

    /// Stage 1, and the inputs the later stages read from the request.
    ///
    /// Inlined into `call`: out of line, its `Routed` (a few hundred bytes)
    /// is written to a temporary and copied into the future, once per
    /// request (callgrind: ~170 instructions of memcpy). LLVM inlined it
    /// until the response path grew.
    #[inline(always)]
    fn route(&self, b: Bounded) -> Result<Routed, ProxyError> {
        let Bounded {
            inbound:
                Inbound {
                    req,
                    snapshot,
                    arrived,
                    trace,
                    admitted: _,
                },
            deadline,
        } = b;
        let settings = &snapshot.settings;
        // 1. key: refuse anything ambiguous before reading a key out of it.
        let host =
            headers::check_inbound(&req, settings.limits.max_header_bytes, &self.client.hosts)?;
        let table = snapshot.table.as_deref().ok_or(ProxyError::NoTopology)?;
        let placement = super::key::placement(&req, &settings.routing)?;
        let class = RequestClass::of(req.method());
        placement::check_fresh(class, settings.max_staleness, || self.fwd.live.age())?;
        let pref = plan::read_preference(req.headers(), &settings.routing)?;
        let (asked, stamp) = match class {
            RequestClass::Read => (consistency::asked(req.headers(), &settings.routing)?, None),
            RequestClass::Write => (Asked::default(), Some(self.fwd.clock.now())),
        };
        let idempotent = is_idempotent(req.method());
        let outgoing = Outgoing::prepare(
            req,
            host,
            &self.client.info,
            table.epoch_header(),
            trace,
            stamp,
            settings,
        )?;
        Ok(Routed {
            outgoing,
            placement,
            pref,
            class,
            asked,
            stamp,
            idempotent,
            arrived,
            deadline,
            trace_id: trace.0.trace_id,
            snapshot,
            admitted: None,
        })
    }
}

pin_project_lite::pin_project! {
    /// A request refused at stage 1 (ready at once), or being forwarded.
    #[project = Projected]
    pub(crate) enum RouteFuture<F> {
        Refused { failed: Option<Failed> },
        Forwarding { #[pin] inner: F },
    }
}

impl<F> Future for RouteFuture<F>
where
    F: Future<Output = Result<Forwarded<ProxyBody>, Failed>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project() {
            Projected::Refused { failed } => match failed.take() {
                Some(f) => Poll::Ready(Err(f)),
                None => Poll::Pending, // polled after completion
            },
            Projected::Forwarding { inner } => inner.poll(cx),
        }
    }
}

/// Stages 2–6 for a routed request: place it, plan, attempt, respond — and
/// place it once more under a newer map when `policy` says so.
async fn forward(fwd: &Forwarder, r: &mut Routed) -> Result<Forwarded<ProxyBody>, Failed> {
    let mut trail = Trail::default();
    let mut replacement = Replacement::default();
    loop {
        let newer = {
            let snapshot = &r.snapshot;
            let Some(table) = snapshot.table.as_deref() else {
                return Err(Failed::at(ProxyError::NoTopology, trail));
            };
            // 2. placement
            let partition = match placement::place(table, r.placement) {
                Ok(p) => p,
                Err(error) => return Err(Failed::at(error, trail)),
            };
            trail.partition = Some((partition.index, partition.metrics.clone()));
            // 3. plan
            let needs = r.asked.needs(partition.index);
            let at = Moment::now(needs, &fwd.clock);
            let plan = match plan::plan(partition, r.class, r.pref, needs, at) {
                Ok(p) => p,
                Err(error) => {
                    if let ProxyError::NoFreshReplica { why, .. } = error {
                        fwd.metrics.replica_reads.unfit(why);
                    }
                    return Err(Failed::at(error, trail));
                }
            };
            fwd.metrics.replica_reads.passed_over(&plan.passed_over);
            let run = Run {
                settings: &snapshot.settings,
                budget: &snapshot.budget,
                metrics: &fwd.metrics,
                arrived: r.arrived,
                deadline: r.deadline,
                idempotent: r.idempotent,
                trace_id: r.trace_id,
                needs,
                clock: &fwd.clock,
            };
            let expose = snapshot.settings.routing.expose_upstream;
            // hyper moves the outermost future for every request, so its size
            // matters: the attempt loop is pinned in place and awaited through
            // the pin (a directly awaited call is laid out twice), and its
            // outcome lives in this block only, not through the rare wait for
            // a newer map below.
            let (wait, w): (Wait, WaitFor) = 'placed: {
                // 4. attempts
                let (outcome, made) = {
                    let attempts = pin!(attempts::run(&mut r.outgoing, &plan, partition, &run));
                    attempts.await
                };
                trail.attempts += made;
                match outcome {
                    Ok(delivered) => {
                        let Some(theirs) = policy::misdirected(
                            delivered.resp.status(),
                            delivered.resp.headers(),
                            table.epoch(),
                        ) else {
                            // A primary not yet in its role refused the
                            // write unapplied: with failover buffering it
                            // waits and goes again (see `policy`).
                            let refused = policy::refused_not_yet(
                                delivered.resp.status(),
                                delivered.resp.headers(),
                            );
                            let hold = refused
                                .then(|| {
                                    replacement.after_role_refusal(
                                        r.class,
                                        snapshot.settings.failover_buffer,
                                        (r.deadline, Instant::now()),
                                    )
                                })
                                .flatten();
                            if let Some((until, slot)) = held(hold, &mut r.outgoing, &fwd.holds) {
                                let w = WaitFor {
                                    above: table.epoch(),
                                    until,
                                };
                                break 'placed (Wait::RoleRefused { _slot: slot }, w);
                            }
                            // 5. response
                            let mut delivered = delivered;
                            if let Some(stamp) = r.stamp {
                                issue_token(&mut delivered, partition.index, table.epoch(), stamp);
                            }
                            return Ok(finish(
                                delivered,
                                partition,
                                expose,
                                r.deadline,
                                r.outgoing.unfinished_upload(),
                                r.admitted.take(),
                                trail,
                            ));
                        };
                        // A node that knows a newer map refused: fetch it now,
                        // and send a read once more under it.
                        fwd.live.news().ask_for_refresh();
                        let again = replacement.after_misdirected(
                            r.class,
                            theirs,
                            r.deadline,
                            Instant::now(),
                        );
                        match again {
                            Some(w) if r.outgoing.refill() => {
                                (Wait::Misdirected(Box::new(delivered)), w)
                            }
                            _ => {
                                return Ok(finish(
                                    delivered,
                                    partition,
                                    expose,
                                    r.deadline,
                                    r.outgoing.unfinished_upload(),
                                    r.admitted.take(),
                                    trail,
                                ));
                            }
                        }
                    }
                    Err(error @ ProxyError::PrimaryUnavailable { .. }) => {
                        // Failover buffering: a write that can be sent again —
                        // nothing of it was sent, or it is idempotent and kept —
                        // waits for the new primary instead of failing. A
                        // non-idempotent write that may have reached the old
                        // primary has no kept copy and is never sent twice.
                        let hold = replacement.after_primary_unavailable(
                            r.class,
                            snapshot.settings.failover_buffer,
                            table.epoch(),
                            r.deadline,
                            Instant::now(),
                        );
                        match held(hold, &mut r.outgoing, &fwd.holds) {
                            Some((w, slot)) => (Wait::Failover { error, _slot: slot }, w),
                            None => return Err(Failed::at(error, trail)),
                        }
                    }
                    Err(error) => return Err(Failed::at(error, trail)),
                }
            };
            match (fwd.live.newer_than(w.above, w.until).await, wait) {
                (Some(newer), _) => newer,
                // With no newer map in time the refusal is the answer; the
                // read is not sent again under the same map.
                (None, Wait::Misdirected(delivered)) => {
                    let mut answer = finish(
                        *delivered,
                        partition,
                        expose,
                        r.deadline,
                        r.outgoing.unfinished_upload(),
                        r.admitted.take(),
                        trail,
                    );
                    // Answered only now, after the wait: `observe` reads the clock.
                    answer.trail.answered = None;
                    return Ok(answer);
                }
                (None, Wait::Failover { error, .. }) => return Err(Failed::at(error, trail)),
                // No newer map: the same primary, once more.
                (None, Wait::RoleRefused { .. }) => snapshot.clone(),
            }
        };
        if let Some(t) = newer.table.as_deref() {
            r.outgoing.set_epoch(t.epoch_header());
        }
        r.snapshot = newer;
    }
}

/// A hold the policy granted, if the request can be sent again after it
/// and one of the limited hold slots is free.
fn held<T>(
    hold: Option<T>,
    outgoing: &mut Outgoing,
    holds: &Holds,
) -> Option<(T, OwnedSemaphorePermit)> {
    let hold = hold.filter(|_| outgoing.refill())?;
    Some((hold, holds.try_hold()?))
}

/// A successful write's answer carries its read-your-writes token: the
/// node's own stamp when it returned one, else the proxy's.
fn issue_token(d: &mut Delivered, partition: u32, epoch: u64, stamp: Hlc) {
    if !d.resp.status().is_success() {
        return;
    }
    let headers = d.resp.headers_mut();
    let hlc = consistency::stamp_of(headers).unwrap_or(stamp);
    headers.insert(
        consistency::TOKEN,
        consistency::Token {
            partition,
            epoch,
            hlc,
        }
        .to_header(),
    );
}

/// Stage 6 for a delivered answer, its facts added to `trail`.
fn finish(
    delivered: Delivered,
    partition: &RoutePartition,
    expose_upstream: bool,
    deadline: Instant,
    upload: Option<Upload>,
    admitted: Option<Ticket>,
    mut trail: Trail,
) -> Forwarded<ProxyBody> {
    let (response, served) = response::reply(
        delivered,
        partition,
        expose_upstream,
        deadline,
        upload,
        admitted,
    );
    trail.served_by = served.by;
    trail.upstream = Some(served.upstream);
    trail.answered = Some(served.at);
    Forwarded { response, trail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_are_bounded_and_their_limit_follows_a_reload() {
        let h = Holds::new(2);
        let a = h.try_hold().unwrap();
        let _b = h.try_hold().unwrap();
        assert!(h.try_hold().is_none(), "two at most");
        h.set_max(3);
        let c = h.try_hold().expect("raised");
        drop((a, c));
        h.set_max(1);
        assert!(
            h.try_hold().is_none(),
            "lowered: the hold in progress uses the one slot"
        );
    }
}
