//! The request path, top to bottom:
//!
//! 1. **accept** — admission under the in-flight limit;
//! 2. **key** — the request is checked, then its shard key read (`routing::KeyExtractor`);
//! 3. **partition** — the key's hash picks a partition of the map in force;
//! 4. **upstream choice** — read/write class and read preference order the
//!    partition's nodes (`RoutePartition::plan`);
//! 5. **attempt loop** — breakers, retries, backoff, budget and deadlines;
//! 6. **response** — the upstream's, streamed back, or a SPEC JSON error.

use super::Proxy;
use super::body::ProxyBody;
use super::conn::{ConnActivity, Tracked};
use super::error::ProxyError;
use super::head::Head;
use super::headers::{self, ClientInfo, HostMemo};
use crate::config::{AllOpen, RoutingConfig, RuntimeConfig};
use crate::resilience::{Permit, Reach, is_idempotent};
use crate::routing::{
    KeyError, Plan, ReadPreference, RequestClass, RetryReason, Role, RoutePartition, RouteTable,
    ServedBy,
};
use crate::telemetry::{TraceContext, TraceId};
use crate::topology::key_position;
use crate::upstream::{
    AttemptOutcome, BodyError, Conn, InflightGuard, Replayer, RequestBody, SendError, Upstream,
    UpstreamBody,
};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use hyper::body::Incoming;
use rand::RngExt;
use std::convert::Infallible;
use std::pin::pin;
use std::sync::Arc;
use tokio::time::Instant;

/// What is known about a client connection, shared by its requests.
pub struct ClientConn {
    /// Forwarding facts.
    pub info: ClientInfo,
    /// Idle/busy tracking and admission.
    pub activity: Arc<ConnActivity>,
    /// The last valid `Host` it sent.
    pub hosts: HostMemo,
}

/// What metrics and the access log learn about one request.
struct Exchange {
    started: Instant,
    class: RequestClass,
    method: Method,
    partition: Option<(u32, Arc<crate::routing::PartitionMetrics>)>,
    served_by: ServedBy,
    attempts: u32,
    upstream: Option<Arc<str>>,
    /// The request's trace: the client's continued, or a new one.
    trace: (TraceContext, bool),
    error: Option<&'static str>,
    /// When the response passed on arrived from its upstream; `None` for the
    /// proxy's own answers. Ends the request-duration measurement, saving a
    /// clock read per request.
    answered: Option<Instant>,
}

/// A response from an upstream, with what it needs to stream back.
struct Delivered {
    resp: Response<Incoming>,
    conn: Conn,
    guard: InflightGuard,
    role: Role,
    /// When its head arrived.
    answered_at: Instant,
}

/// Why an attempt did not produce a response to pass on.
enum Failure {
    /// Nothing was written: connect error, or refused before writing.
    NotSent(String),
    /// The exchange broke after the request was (maybe) written.
    Broken(String),
    /// No response headers in time.
    Timeout,
    /// A retryable status; kept in case it ends up being the answer. Boxed:
    /// rare, and a failure is carried across awaits in the request's future.
    Status(Box<Delivered>),
}

/// Why a request waits for a newer map before it is placed again.
enum Wait {
    /// A node that knows a newer map refused a read; its refusal is the
    /// answer if no newer map arrives in time. Boxed: this is rare.
    Misdirected {
        above: u64,
        until: Instant,
        delivered: Box<Delivered>,
    },
    /// A write held through a failover, holding one of the limited slots.
    Failover {
        until: Instant,
        error: ProxyError,
        _slot: tokio::sync::OwnedSemaphorePermit,
    },
}

impl Failure {
    fn kind(&self) -> &str {
        match self {
            Failure::NotSent(e) | Failure::Broken(e) => e,
            Failure::Timeout => "timeout",
            Failure::Status(_) => "retryable status",
        }
    }

    fn reach(&self) -> Reach {
        match self {
            Failure::NotSent(_) => Reach::NotSent,
            _ => Reach::MaybeSent,
        }
    }
}

/// How long a read that met a 421 may wait for the newer map.
const MISDIRECTED_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The epoch a `421 Misdirected Request` names, when it is newer than ours.
fn misdirected(d: &Delivered, ours: u64) -> Option<u64> {
    if d.resp.status() != StatusCode::MISDIRECTED_REQUEST {
        return None;
    }
    let theirs: u64 = d
        .resp
        .headers()
        .get(headers::EPOCH_HEADER)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    (theirs > ours).then_some(theirs)
}

/// Where a request belongs, kept so it can be placed again under a newer map.
#[derive(Clone, Copy, Debug)]
enum Placement {
    /// The key's ring position.
    Position(u32),
    /// A fixed partition (keyless requests, when configured).
    Index(u32),
}

/// A request past steps 1–2, with everything the rest of its path needs.
///
/// Built synchronously when hyper hands the request over, so the client's
/// request never lives in the request future: that future is moved whole by
/// hyper for every request, and each byte of it costs a copy.
struct Routed {
    /// The request to send; empty while an attempt holds it, and after one
    /// that wrote any of it. A request nothing of which was sent is back here.
    req: Option<Request<RequestBody>>,
    /// The map it is placed under (replaced at most once, see `forward`).
    table: Arc<RouteTable>,
    placement: Placement,
    pref: ReadPreference,
    deadline: Instant,
    kept: Kept,
}

/// What a request that may be sent again after reaching an upstream keeps:
/// a copy of its head and a way to replay its body.
struct Kept {
    head: Option<Head>,
    replayer: Option<Replayer>,
}

impl Kept {
    /// The request again, rebuilt from the kept head and body, if it may be.
    fn again(&self) -> Option<Request<RequestBody>> {
        self.head
            .as_ref()?
            .with_body(self.replayer.as_ref()?.next()?)
    }

    /// Make sure `slot` holds the request, rebuilding it if an attempt used
    /// it up; `false` if it cannot be.
    fn refill(&self, slot: &mut Option<Request<RequestBody>>) -> bool {
        if slot.is_none() {
            *slot = self.again();
        }
        slot.is_some()
    }

    /// Whether `again` can still rebuild the body.
    fn can_replay(&self) -> bool {
        self.replayer.as_ref().is_some_and(Replayer::can_replay)
    }
}

impl Proxy {
    /// Answer one client request. Never fails: every error becomes a response.
    ///
    /// Steps 1 and 2 run here, before the returned future exists.
    pub(super) fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: &ClientConn,
    ) -> impl Future<Output = Result<Response<Tracked<ProxyBody>>, Infallible>> + Send + use<> {
        let mut x = Exchange {
            started: Instant::now(),
            class: RequestClass::of(req.method()),
            method: req.method().clone(),
            partition: None,
            served_by: ServedBy::Proxy,
            attempts: 0,
            upstream: None,
            trace: headers::trace_of(req.headers()),
            error: None,
            answered: None,
        };
        let cfg = self.runtime.load_full();
        // 1. accept
        let ticket = client.activity.enter();
        let mut routed = match ticket {
            Some(_) => self.route(req, &cfg, client, &mut x),
            None => {
                self.metrics.shed_inflight.increment(1);
                Err(ProxyError::Overloaded {
                    reason: "too many requests in flight",
                    partition: None,
                })
            }
        };
        async move {
            // Matched by reference: moving the routed request out of the
            // `Result` would lay it out twice in this future.
            let resp = match &mut routed {
                Ok(r) => {
                    let forwarded = {
                        let forward = pin!(self.forward(r, &cfg, &mut x));
                        forward.await
                    };
                    match forwarded {
                        Ok(resp) => resp,
                        Err(e) => answer_error(&mut x, &e),
                    }
                }
                Err(e) => answer_error(&mut x, e),
            };
            self.observe(&x, resp.status(), &cfg);
            Ok(resp.map(|b| Tracked::new(b, ticket)))
        }
    }

    /// 2. key: check the request, read its key, and make it the one to send.
    fn route(
        &self,
        req: Request<Incoming>,
        cfg: &RuntimeConfig,
        client: &ClientConn,
        x: &mut Exchange,
    ) -> Result<Routed, ProxyError> {
        // Refuse anything ambiguous before reading a key out of it.
        let host = headers::check_inbound(&req, cfg.limits.max_header_bytes, &client.hosts)?;
        let table = self.routes.load_full().ok_or(ProxyError::NoTopology)?;
        let placement = placement(&req, &cfg.routing)?;
        if x.class == RequestClass::Write
            && let Some(max) = cfg.max_staleness
        {
            let age = self.map_age();
            if age > max {
                return Err(ProxyError::TopologyStale {
                    age_secs: age.as_secs(),
                });
            }
        }
        let pref = read_preference(req.headers(), &cfg.routing)?;
        let (mut parts, body) = req.into_parts();
        let body = request_body(&parts.method, body, cfg)?;
        headers::to_upstream(
            &mut parts,
            host,
            &client.info,
            table.epoch_header(),
            x.trace,
        );
        // Only requests that may be sent again after reaching an upstream keep
        // a copy of their head; everything else gets its request back unsent.
        let head =
            (is_idempotent(&parts.method) && cfg.retry.max_attempts > 1).then(|| Head::of(&parts));
        let replayer = head.as_ref().and_then(|_| body.replayer());
        Ok(Routed {
            req: Some(Request::from_parts(parts, body)),
            table,
            placement,
            pref,
            deadline: x.started + cfg.timeouts.overall,
            kept: Kept { head, replayer },
        })
    }

    /// Steps 3–6 for a routed request.
    async fn forward(
        &self,
        r: &mut Routed,
        cfg: &RuntimeConfig,
        x: &mut Exchange,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let deadline = r.deadline;
        let pref = r.pref;
        // At most one second placement per request: after a 421 from a node
        // that knows a newer map, or after holding a write through a failover.
        let mut replaced = false;
        loop {
            let newer = {
                // 3. partition
                let partition = place(&r.table, r.placement)?;
                x.partition = Some((partition.index, partition.metrics.clone()));
                // 4. upstream choice
                let plan = partition.plan(x.class, pref);
                if plan.candidates.is_empty() {
                    return Err(ProxyError::NoHealthyUpstream {
                        partition: partition.index,
                        cause: format!(
                            "read preference {pref} needs a replica and the partition has none"
                        ),
                    });
                }
                // hyper moves the outermost future for every request, so its
                // size matters: the attempt loop is pinned in place and awaited
                // through the pin (a directly awaited call is laid out twice),
                // and its outcome lives in this block only, not through the
                // rare wait for a newer map below.
                let wait = {
                    // 5. attempt loop
                    let outcome = {
                        let attempts =
                            pin!(self.attempt_loop(
                                &mut r.req, &plan, partition, cfg, deadline, &r.kept, x
                            ));
                        attempts.await
                    };
                    match outcome {
                        Ok(delivered) => {
                            let Some(newer) = misdirected(&delivered, r.table.epoch()) else {
                                return Ok(self.respond(delivered, partition, cfg, deadline, x));
                            };
                            // A node that knows a newer map refused: fetch it now, and
                            // send a read once more under it.
                            self.request_refresh();
                            let again = (!replaced && x.class == RequestClass::Read)
                                .then(|| r.kept.again())
                                .flatten();
                            let Some(again) = again else {
                                return Ok(self.respond(delivered, partition, cfg, deadline, x));
                            };
                            r.req = Some(again);
                            Wait::Misdirected {
                                above: newer.saturating_sub(1),
                                until: deadline.min(Instant::now() + MISDIRECTED_WAIT),
                                delivered: Box::new(delivered),
                            }
                        }
                        Err(error @ ProxyError::PrimaryUnavailable { .. })
                            if !replaced
                                && x.class == RequestClass::Write
                                && cfg.failover_buffer.is_some() =>
                        {
                            // Failover buffering: a write that can be sent again —
                            // nothing of it was sent, or it is idempotent and kept —
                            // waits for the new primary instead of failing. A
                            // non-idempotent write that may have reached the old
                            // primary has no kept copy and is never sent twice.
                            let Some(buffer) = cfg.failover_buffer else {
                                return Err(error);
                            };
                            if !r.kept.refill(&mut r.req) {
                                return Err(error);
                            }
                            let Ok(slot) = self.held.clone().try_acquire_owned() else {
                                return Err(error);
                            };
                            Wait::Failover {
                                until: deadline.min(Instant::now() + buffer.max_wait),
                                error,
                                _slot: slot,
                            }
                        }
                        Err(error) => return Err(error),
                    }
                };
                // One await for both kinds of wait keeps `wait` out of the
                // layout shared with the attempt loop's await.
                let (above, until) = match &wait {
                    Wait::Misdirected { above, until, .. } => (*above, *until),
                    Wait::Failover { until, .. } => (r.table.epoch(), *until),
                };
                match (self.newer_table(above, until).await, wait) {
                    (Some(t), _) => t,
                    // With no newer map in time the refusal is the answer; the
                    // read is not sent again under the same map.
                    (None, Wait::Misdirected { delivered, .. }) => {
                        let resp = self.respond(*delivered, partition, cfg, deadline, x);
                        // Answered only now, after the wait: `observe` reads the clock.
                        x.answered = None;
                        return Ok(resp);
                    }
                    (None, Wait::Failover { error, .. }) => return Err(error),
                }
            };
            r.table = newer;
            if let Some(req) = r.req.as_mut() {
                req.headers_mut()
                    .insert(headers::EPOCH_HEADER, r.table.epoch_header().clone());
            }
            if let Some(head) = r.kept.head.as_mut() {
                head.set_epoch(r.table.epoch_header());
            }
            replaced = true;
        }
    }

    /// 6. The upstream's response, with the header rules applied, streamed back.
    fn respond(
        &self,
        delivered: Delivered,
        partition: &RoutePartition,
        cfg: &RuntimeConfig,
        deadline: Instant,
        x: &mut Exchange,
    ) -> Response<ProxyBody> {
        x.served_by = delivered.role.into();
        x.upstream = Some(delivered.guard.upstream().label().clone());
        x.answered = Some(delivered.answered_at);
        let (mut parts, incoming) = delivered.resp.into_parts();
        // The client connection's protocol, not the upstream's, frames the answer.
        parts.version = Version::HTTP_11;
        let exposed = cfg
            .routing
            .expose_upstream
            .then(|| &**delivered.guard.upstream().label());
        headers::to_downstream(&mut parts.headers, &partition.index_header, exposed);
        let body = UpstreamBody::new(
            incoming,
            delivered.guard,
            delivered.conn,
            deadline,
            delivered.answered_at,
        );
        Response::from_parts(parts, ProxyBody::Upstream(body))
    }

    /// Try the plan's nodes until one answers acceptably or the rules of
    /// SPEC §3 say stop: retry only idempotent requests or requests nothing
    /// of which was sent, within attempts, budget and deadline.
    /// `slot` holds the request; whatever of it was not sent is left there.
    #[allow(clippy::too_many_arguments)]
    async fn attempt_loop(
        &self,
        slot: &mut Option<Request<RequestBody>>,
        plan: &Plan<'_>,
        partition: &RoutePartition,
        cfg: &RuntimeConfig,
        deadline: Instant,
        kept: &Kept,
        x: &mut Exchange,
    ) -> Result<Delivered, ProxyError> {
        let policy = &cfg.retry;
        let idempotent = is_idempotent(&x.method);
        let budget = self.budget.load();
        budget.deposit(x.started);

        let mut cursor = 0usize;
        let mut tried: u64 = 0;
        let mut previous_delay = None;
        let mut last: Option<(Failure, Arc<str>)> = None;
        loop {
            // Which node: the first from the cursor whose breaker and in-flight limit admit us.
            let Some((slot_index, permit, guard)) = self.admit(plan, cursor, cfg) else {
                if let Some((Failure::Status(kept), _)) = last {
                    // The upstream's own retryable answer beats a proxy error.
                    return Ok(*kept);
                }
                return Err(self.refused(plan, partition, last.as_ref(), cfg));
            };
            let (upstream, role) = plan.candidates[slot_index];
            if !kept.refill(slot) {
                tracing::debug!(
                    head = kept.head.is_some(),
                    replayer = kept.replayer.is_some(),
                    replayable = kept.can_replay(),
                    "cannot send the request again"
                );
                return give_up(last, plan, partition);
            }
            tried |= 1u64 << slot_index.min(63);
            x.attempts += 1;

            // A first attempt goes out microseconds after the request arrived:
            // its arrival time will do, saving a clock read per request.
            let sent_at = if x.attempts == 1 {
                x.started
            } else {
                Instant::now()
            };
            let trace = TraceId(x.trace.0.trace_id);
            tracing::debug!(attempt = x.attempts, upstream = %upstream.label(), %trace, "attempt");
            let try_deadline = deadline.min(sent_at + cfg.timeouts.per_try);
            // The attempt's result and failure live in this block only: a
            // local still in scope at the backoff's await below would be laid
            // out in the request's future, which hyper moves for every request.
            let backoff = {
                let result = {
                    let attempt = pin!(tokio::time::timeout_at(
                        try_deadline,
                        upstream.send(slot, sent_at)
                    ));
                    attempt.await
                };
                let failure = match result {
                    Ok(Ok((resp, conn))) => {
                        let answered_at = Instant::now();
                        tracing::debug!(%trace, status = resp.status().as_u16(), reused = conn.is_reused(), "answered");
                        upstream
                            .latency()
                            .observe(answered_at - sent_at, answered_at);
                        let status = resp.status();
                        let delivered = Delivered {
                            resp,
                            conn,
                            guard,
                            role,
                            answered_at,
                        };
                        if status == StatusCode::SWITCHING_PROTOCOLS {
                            // Upgrades are never forwarded, so a 101 is a confused upstream.
                            settle(upstream, permit, AttemptOutcome::SendError, answered_at);
                            Failure::Broken("unexpected 101 Switching Protocols".into())
                        } else if cfg.breaker.failure_statuses.contains(status) {
                            settle(upstream, permit, AttemptOutcome::FailureStatus, answered_at);
                            if idempotent && policy.retry_statuses.contains(status) {
                                Failure::Status(Box::new(delivered))
                            } else {
                                return Ok(delivered);
                            }
                        } else {
                            settle(upstream, permit, AttemptOutcome::Ok, answered_at);
                            return Ok(delivered);
                        }
                    }
                    Ok(Err(unsent @ (SendError::Connect(_) | SendError::NotSent(_)))) => {
                        settle(
                            upstream,
                            permit,
                            AttemptOutcome::ConnectError,
                            Instant::now(),
                        );
                        Failure::NotSent(unsent.to_string())
                    }
                    Ok(Err(nothing @ SendError::Nothing)) => {
                        drop(permit);
                        Failure::NotSent(nothing.to_string())
                    }
                    Ok(Err(SendError::Failed(error))) => {
                        // The client's fault, not the upstream's: no breaker verdict, no retry.
                        if let Some(e) = client_side(&error) {
                            drop(permit);
                            return Err(e);
                        }
                        settle(upstream, permit, AttemptOutcome::SendError, Instant::now());
                        Failure::Broken(error.to_string())
                    }
                    Err(_elapsed) => {
                        settle(upstream, permit, AttemptOutcome::Timeout, Instant::now());
                        Failure::Timeout
                    }
                };
                let label = upstream.label().clone();
                tracing::debug!(attempt = x.attempts, upstream = %label, %trace, failure = ?failure.kind(), "attempt failed");

                // Whether to try again, where, and after how long.
                let resendable = slot.is_some() || kept.can_replay();
                let allowed = x.attempts < policy.max_attempts
                    && (failure.reach() == Reach::NotSent || idempotent)
                    && resendable
                    && Instant::now() < deadline;
                let budget_spent = allowed && !budget.try_withdraw();
                if budget_spent {
                    self.metrics.budget_exhausted.increment(1);
                }
                if !allowed || budget_spent {
                    return give_up(Some((failure, label)), plan, partition);
                }
                cursor = (slot_index + 1) % plan.candidates.len();
                // Moving to a node not yet tried is immediate; going back to one is spaced by backoff.
                let delay = if tried & (1u64 << cursor.min(63)) != 0 {
                    let delay =
                        policy
                            .backoff
                            .delay(x.attempts - 1, previous_delay, &mut rand::rng());
                    if Instant::now() + delay >= deadline {
                        return give_up(Some((failure, label)), plan, partition);
                    }
                    previous_delay = Some(delay);
                    partition.metrics.retry(RetryReason::Retry);
                    Some(delay)
                } else {
                    partition.metrics.retry(RetryReason::Failover);
                    None
                };
                last = Some((failure, label));
                delay
            };
            if let Some(delay) = backoff {
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// The first candidate from `cursor` on that a breaker and the per-upstream
    /// in-flight limit admit; `fail_open` falls back to the least-bad node.
    fn admit<'p>(
        &self,
        plan: &Plan<'p>,
        cursor: usize,
        cfg: &RuntimeConfig,
    ) -> Option<(usize, Permit<'p>, InflightGuard)> {
        let n = plan.candidates.len();
        let limit = cfg.limits.max_inflight_per_upstream;
        for i in 0..n {
            let slot = (cursor + i) % n;
            let upstream: &'p Arc<Upstream> = plan.candidates[slot].0;
            let Some(permit) = upstream.breaker().try_acquire() else {
                continue;
            };
            match upstream.try_begin(limit) {
                Some(guard) => return Some((slot, permit, guard)),
                None => self.metrics.shed_upstream.increment(1),
            }
        }
        if cfg.breaker.when_all_open == AllOpen::FailOpen {
            let least_bad = (0..n).min_by_key(|&s| {
                plan.candidates[s]
                    .0
                    .breaker()
                    .open_until()
                    .unwrap_or_else(Instant::now)
            })?;
            let upstream: &'p Arc<Upstream> = plan.candidates[least_bad].0;
            let guard = upstream.try_begin(limit)?;
            self.metrics.breaker_fail_open.increment(1);
            return Some((least_bad, upstream.breaker().force_acquire(), guard));
        }
        None
    }

    /// Every node the request may use refused it (breakers open, in-flight
    /// limits) before this attempt could be made.
    fn refused(
        &self,
        plan: &Plan<'_>,
        partition: &RoutePartition,
        last: Option<&(Failure, Arc<str>)>,
        cfg: &RuntimeConfig,
    ) -> ProxyError {
        let full = cfg.limits.max_inflight_per_upstream != 0
            && plan
                .candidates
                .iter()
                .any(|(u, _)| u.inflight() >= cfg.limits.max_inflight_per_upstream);
        if full && last.is_none() {
            return ProxyError::Overloaded {
                reason: "upstream in-flight limit reached",
                partition: Some(partition.index),
            };
        }
        self.metrics.shed_breaker.increment(1);
        // Earlier attempts may have failed on their own; what matters now is
        // that no node may be tried: the partition has no reachable primary
        // (or no healthy node), which is what failover buffering waits out.
        let cause = match last {
            Some((f, upstream)) => format!("circuit breaker open after {upstream}: {}", f.kind()),
            None => "circuit breaker open".to_owned(),
        };
        if plan.primary_only {
            ProxyError::PrimaryUnavailable {
                partition: partition.index,
                upstream: plan.candidates[0].0.label().to_string(),
                cause,
            }
        } else {
            ProxyError::NoHealthyUpstream {
                partition: partition.index,
                cause: format!("every node refused: {cause}"),
            }
        }
    }

    /// Metrics and the sampled access log for one answered request.
    fn observe(&self, x: &Exchange, status: StatusCode, cfg: &RuntimeConfig) {
        let ended = x.answered.unwrap_or_else(Instant::now);
        let secs = ended.saturating_duration_since(x.started).as_secs_f64();
        match &x.partition {
            Some((_, m)) => m.request(x.class, status.as_u16(), x.served_by, secs),
            None => self
                .metrics
                .unrouted
                .request(x.class, status.as_u16(), x.served_by, secs),
        }
        let is_error = x.error.is_some() || status.is_server_error();
        // Sampling draws a random number; at the default rate of 0 it need not.
        let sampled = cfg.access_log_sample > 0.0 && rand::rng().random_bool(cfg.access_log_sample);
        if is_error || sampled {
            tracing::info!(
                target: "shardgate::access",
                method = %x.method,
                status = status.as_u16(),
                partition = x.partition.as_ref().map(|(i, _)| *i),
                upstream = x.upstream.as_deref(),
                served_by = ?x.served_by,
                attempts = x.attempts,
                duration_ms = secs * 1000.0,
                error = x.error,
                trace_id = %TraceId(x.trace.0.trace_id),
                "request"
            );
        }
    }
}

/// The proxy's own answer to a request it could not forward.
fn answer_error(x: &mut Exchange, e: &ProxyError) -> Response<ProxyBody> {
    x.error = Some(e.code());
    x.served_by = ServedBy::Proxy;
    e.to_response()
}

/// Settle a breaker permit and count the attempt.
fn settle(upstream: &Upstream, permit: Permit<'_>, outcome: AttemptOutcome, at: Instant) {
    upstream.count_attempt(outcome);
    match outcome {
        AttemptOutcome::Ok => permit.success(at),
        _ => permit.failure(at),
    }
}

/// The final answer once no further attempt will be made.
fn give_up(
    last: Option<(Failure, Arc<str>)>,
    plan: &Plan<'_>,
    partition: &RoutePartition,
) -> Result<Delivered, ProxyError> {
    let index = partition.index;
    let Some((failure, upstream)) = last else {
        return Err(ProxyError::NoHealthyUpstream {
            partition: index,
            cause: "no attempt could be made".into(),
        });
    };
    match failure {
        // The upstream's own answer is passed through as the final response.
        Failure::Status(d) => Ok(*d),
        Failure::NotSent(cause) if plan.primary_only => Err(ProxyError::PrimaryUnavailable {
            partition: index,
            upstream: upstream.to_string(),
            cause,
        }),
        Failure::NotSent(cause) => Err(ProxyError::NoHealthyUpstream {
            partition: index,
            cause: format!("last tried {upstream}: {cause}"),
        }),
        Failure::Timeout => Err(ProxyError::UpstreamTimeout {
            partition: index,
            upstream: upstream.to_string(),
        }),
        Failure::Broken(cause) => Err(ProxyError::UpstreamFailed {
            partition: index,
            upstream: upstream.to_string(),
            cause,
        }),
    }
}

/// If a failed exchange was the client's doing (oversized or broken body).
fn client_side(error: &hyper::Error) -> Option<ProxyError> {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(b) = e.downcast_ref::<BodyError>() {
            return match b {
                BodyError::TooLarge { limit } => {
                    Some(ProxyError::PayloadTooLarge { limit: *limit })
                }
                BodyError::Client(c) => Some(ProxyError::ClientBodyFailed(c.to_string())),
                _ => None,
            };
        }
        source = e.source();
    }
    None
}

/// Step 2: where the request's key places it.
fn placement(req: &Request<Incoming>, routing: &RoutingConfig) -> Result<Placement, ProxyError> {
    match routing.keys.extract(req.uri(), req.headers()) {
        Ok(key) => Ok(Placement::Position(key_position(&key))),
        Err(KeyError::Missing(looked)) => match routing.keyless_partition {
            Some(i) => Ok(Placement::Index(i)),
            None => Err(ProxyError::MissingShardKey(format!(
                "no shard key found (looked in {looked})"
            ))),
        },
        Err(e @ KeyError::Invalid { .. }) => Err(ProxyError::InvalidShardKey(e.to_string())),
    }
}

/// Step 3: the partition of `table` the placement names.
fn place(table: &RouteTable, placement: Placement) -> Result<&RoutePartition, ProxyError> {
    match placement {
        Placement::Position(pos) => Ok(table.partition_for(pos)),
        Placement::Index(i) => table.partition_by_index(i).ok_or_else(|| {
            ProxyError::MissingShardKey(format!(
                "no shard key, and the keyless partition {i} is not in the map"
            ))
        }),
    }
}

/// The request's read preference: its header if allowed and present, else the default.
fn read_preference(
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

/// How the body travels: empty, streamed once, or kept for replay.
fn request_body(
    method: &Method,
    body: Incoming,
    cfg: &RuntimeConfig,
) -> Result<RequestBody, ProxyError> {
    let max = cfg.limits.max_body_bytes;
    if body.size_hint().lower() > max {
        return Err(ProxyError::PayloadTooLarge { limit: max });
    }
    if body.is_end_stream() {
        return Ok(RequestBody::empty());
    }
    if is_idempotent(method) && cfg.retry.max_attempts > 1 && cfg.retry.buffer_limit > 0 {
        Ok(RequestBody::replayable(body, cfg.retry.buffer_limit, max))
    } else {
        Ok(RequestBody::streaming(body, max))
    }
}
