//! Admission, a layer: the proxy-wide limit on requests in flight. An
//! admitted request carries a [`Ticket`] (`Inbound::admitted`), which the
//! forwarding stages hand to the response body, so it is held until that
//! body ends (a long download counts for as long as it streams); one over
//! the limit is shed at once with `503 overloaded`, costing no upstream
//! anything.
//!
//! The ticket also tells the connection's reader (`conn::TimedIo`) whether a
//! request is in flight, which decides between the idle and the header-read
//! deadline, and, for a connection to be parked once its request ends, wakes
//! the reader when it does.

use super::super::error::ProxyError;
use super::{Failed, Forwarded, Inbound};
use metrics::Counter;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use tokio::time::Instant;
use tower::{Layer, Service};

/// The proxy-wide in-flight request limit, and the process-wide memory
/// bound's verdict.
pub(crate) struct InflightLimit {
    inflight: AtomicUsize,
    max: AtomicUsize,
    /// `shardgate_load_shed_total{reason="inflight"}`
    shed: Counter,
    /// Set by the memory watch (`proxy::memory`) while the process is over
    /// its bound: new requests are refused until it is back under.
    over_memory: AtomicBool,
    /// The bound in bytes (0: none); the watch reads it, a reload sets it.
    max_memory: AtomicU64,
    /// `shardgate_load_shed_total{reason="memory"}`
    shed_memory: Counter,
}

/// Why a request was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `max_inflight` requests are in flight.
    Inflight,
    /// The process is over its memory bound.
    Memory,
}

impl InflightLimit {
    /// A limit of `max` requests in flight; sheds are counted on `shed`.
    pub(crate) fn new(max: usize, shed: Counter, shed_memory: Counter) -> InflightLimit {
        InflightLimit {
            inflight: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            shed,
            over_memory: AtomicBool::new(false),
            max_memory: AtomicU64::new(0),
            shed_memory,
        }
    }

    /// Change the memory bound (start, config reload); 0 = none.
    pub(crate) fn set_max_memory(&self, bytes: u64) {
        self.max_memory.store(bytes, Ordering::Relaxed);
    }

    /// The memory bound in bytes; 0 = none.
    pub(crate) fn max_memory(&self) -> u64 {
        self.max_memory.load(Ordering::Relaxed)
    }

    /// The memory watch's verdict: over the bound or not.
    pub(crate) fn set_over_memory(&self, over: bool) {
        self.over_memory.store(over, Ordering::Relaxed);
    }

    /// Change the limit (config reload).
    pub(crate) fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Requests in flight now.
    pub(crate) fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }
}

/// What a connection's IO wrapper and its requests share.
pub(crate) struct ConnActivity {
    active: AtomicUsize,
    /// The reader asked to be woken when the last request in flight ends.
    wake_at_end: AtomicBool,
    reader: atomic_waker::AtomicWaker,
    /// When the last request ended, in nanoseconds after `born`; 0 before any.
    idle_since: AtomicU64,
    born: Instant,
    limit: Arc<InflightLimit>,
}

/// Held by a request from arrival until its response body is done.
pub(crate) struct Ticket(Arc<ConnActivity>);

impl Drop for Ticket {
    fn drop(&mut self) {
        let a = &self.0;
        a.limit.inflight.fetch_sub(1, Ordering::Relaxed);
        // Stamped before the count drops, so a reader that sees the connection
        // idle also sees since when. At least 1: 0 means "no request yet".
        let now = u64::try_from(a.born.elapsed().as_nanos()).unwrap_or(u64::MAX);
        a.idle_since.fetch_max(now.max(1), Ordering::Relaxed);
        // SeqCst with `wake_reader_at_end`: each side writes one value and
        // reads the other's, and one of them must see the other's write.
        // On x86 this costs the busy path a plain load.
        let was = a.active.fetch_sub(1, Ordering::SeqCst);
        if was == 1 && a.wake_at_end.load(Ordering::SeqCst) {
            a.reader.wake();
        }
    }
}

impl ConnActivity {
    /// Activity for a new connection under the proxy-wide `limit`.
    pub(crate) fn new(limit: Arc<InflightLimit>) -> Arc<ConnActivity> {
        Arc::new(ConnActivity {
            active: AtomicUsize::new(0),
            wake_at_end: AtomicBool::new(false),
            reader: atomic_waker::AtomicWaker::new(),
            idle_since: AtomicU64::new(0),
            born: Instant::now(),
            limit,
        })
    }

    /// Admit a request, or say why not.
    #[cfg(test)]
    pub(crate) fn enter(self: &Arc<Self>) -> Result<Ticket, Refused> {
        match self.ticket() {
            (ticket, None) => Ok(ticket),
            (_, Some(refused)) => Err(refused),
        }
    }

    /// A request's ticket, and why it is refused, if it is. A refused
    /// request's ticket is held by its answer like any other: the
    /// connection's reader takes "no ticket out" to mean every answer has
    /// been handed to hyper.
    fn ticket(self: &Arc<Self>) -> (Ticket, Option<Refused>) {
        let l = &self.limit;
        let before = l.inflight.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::AcqRel);
        let ticket = Ticket(self.clone());
        let refused = if before >= l.max.load(Ordering::Relaxed) {
            Some(Refused::Inflight)
        } else if l.over_memory.load(Ordering::Relaxed) {
            Some(Refused::Memory)
        } else {
            None
        };
        (ticket, refused)
    }

    /// Whether a request is in flight on the connection.
    pub(crate) fn busy(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }

    /// Wake `reader` when the requests in flight have ended, from then on.
    /// `false`: they have already (nothing will wake it).
    pub(crate) fn wake_reader_at_end(&self, reader: &std::task::Waker) -> bool {
        self.reader.register(reader);
        if !self.wake_at_end.load(Ordering::Relaxed) {
            self.wake_at_end.store(true, Ordering::SeqCst);
        }
        self.active.load(Ordering::SeqCst) > 0
    }

    /// Stop waking the reader as requests end (it lingers after them).
    pub(crate) fn quiet_end(&self) {
        self.wake_at_end.store(false, Ordering::Relaxed);
    }

    /// When the last request ended (the raw stamp; compare with `born`).
    pub(crate) fn idle_since(&self) -> u64 {
        self.idle_since.load(Ordering::Relaxed)
    }

    /// When the connection was accepted.
    pub(crate) fn born(&self) -> Instant {
        self.born
    }
}

/// Adds [`Admission`] for one connection.
pub(crate) struct AdmissionLayer {
    activity: Arc<ConnActivity>,
}

impl AdmissionLayer {
    /// Admission of the requests of the connection `activity` tracks.
    pub(crate) fn new(activity: Arc<ConnActivity>) -> AdmissionLayer {
        AdmissionLayer { activity }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;
    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            activity: self.activity.clone(),
        }
    }
}

/// Admits requests under the in-flight limit, or sheds them.
pub(crate) struct Admission<S> {
    inner: S,
    activity: Arc<ConnActivity>,
}

impl<S, B, R> Service<Inbound<R>> for Admission<S>
where
    S: Service<Inbound<R>, Response = Forwarded<B>, Error = Failed>,
{
    type Response = Forwarded<B>;
    type Error = Failed;
    type Future = AdmissionFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        self.inner.poll_ready(cx)
    }

    #[inline(always)] // see `respond`
    fn call(&mut self, mut inbound: Inbound<R>) -> Self::Future {
        match self.activity.ticket() {
            (ticket, None) => {
                inbound.admitted = Some(ticket);
                AdmissionFuture::Admitted {
                    inner: self.inner.call(inbound),
                }
            }
            (ticket, Some(refused)) => {
                let l = &self.activity.limit;
                let reason = match refused {
                    Refused::Inflight => {
                        l.shed.increment(1);
                        "too many requests in flight"
                    }
                    Refused::Memory => {
                        l.shed_memory.increment(1);
                        "the proxy is over its memory bound"
                    }
                };
                AdmissionFuture::Shed {
                    failed: Some(Failed {
                        admitted: Some(ticket),
                        ..Failed::early(ProxyError::Overloaded {
                            reason,
                            partition: None,
                        })
                    }),
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// An admitted request, or a shed one.
    #[project = Projected]
    pub(crate) enum AdmissionFuture<F> {
        Admitted { #[pin] inner: F },
        Shed { failed: Option<Failed> },
    }
}

impl<F, B> Future for AdmissionFuture<F>
where
    F: Future<Output = Result<Forwarded<B>, Failed>>,
{
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Admitted { inner } => inner.poll(cx),
            Projected::Shed { failed } => match failed.take() {
                Some(f) => Poll::Ready(Err(f)),
                None => Poll::Pending, // polled after completion
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Metrics;

    fn limit(max: usize) -> Arc<InflightLimit> {
        let m = Metrics::new();
        Arc::new(InflightLimit::new(
            max,
            m.counter("shardgate_load_shed_total", &[("reason", "inflight")]),
            m.counter("shardgate_load_shed_total", &[("reason", "memory")]),
        ))
    }

    #[test]
    fn requests_over_the_limit_are_refused_and_a_ticket_frees_its_place() {
        let l = limit(2);
        let conn = ConnActivity::new(l.clone());
        let a = conn.enter().expect("first");
        let b = conn.enter().expect("second");
        assert_eq!(
            conn.enter().err(),
            Some(Refused::Inflight),
            "third is over the limit"
        );
        assert_eq!(l.inflight(), 2, "a refused request holds no place");
        drop(a);
        let c = conn.enter().expect("a place was freed");
        assert!(conn.busy());
        drop((b, c));
        assert!(!conn.busy());
        assert_eq!(l.inflight(), 0);
    }

    #[test]
    fn the_limit_is_shared_by_every_connection_and_can_change() {
        let l = limit(1);
        let (one, two) = (ConnActivity::new(l.clone()), ConnActivity::new(l.clone()));
        let t = one.enter().unwrap();
        assert!(two.enter().is_err());
        assert!(!two.busy(), "the refused request left no trace");
        l.set_max(2);
        let u = two.enter().expect("raised limit");
        drop((t, u));
    }

    #[test]
    fn a_connection_knows_since_when_it_is_idle() {
        let conn = ConnActivity::new(limit(8));
        assert_eq!(conn.idle_since(), 0, "no request yet");
        drop(conn.enter());
        assert!(conn.idle_since() > 0);
    }
}

#[cfg(test)]
mod layer_tests {
    use super::super::Trail;
    use super::super::tests::inbound;
    use super::*;
    use crate::telemetry::Metrics;
    use http::Response;

    /// The connection's reader parks an idle connection as soon as no
    /// ticket is out, and takes that to mean every answer is in hyper's
    /// hands: the proxy's own answers hold their ticket too.
    #[tokio::test]
    async fn the_proxys_own_answers_keep_their_connection_busy_until_their_body_is_done() {
        use super::super::respond::RespondLayer;
        use crate::proxy::body::ProxyBody;
        use http_body_util::BodyExt;
        let m = Metrics::new();
        let limit = Arc::new(InflightLimit::new(
            1,
            m.counter("shed", &[]),
            m.counter("memory", &[]),
        ));
        let conn = ConnActivity::new(limit.clone());
        // A stage that refuses every request, handing the ticket back as
        // `route` does.
        let mut svc = RespondLayer::new(Arc::new(AtomicBool::new(false))).layer(
            AdmissionLayer::new(conn.clone()).layer(tower::service_fn(|mut i: Inbound<()>| {
                let admitted = i.admitted.take();
                async move {
                    Err::<Forwarded<ProxyBody>, _>(Failed {
                        admitted,
                        ..Failed::early(ProxyError::NoTopology)
                    })
                }
            })),
        );
        let refused = svc.call(inbound(http::Request::new(()))).await.unwrap();
        assert_eq!(refused.status(), 503);
        assert!(conn.busy(), "the answer's body holds the ticket");
        // Shed while the first answer is out: its answer holds one too.
        let shed = svc.call(inbound(http::Request::new(()))).await.unwrap();
        assert_eq!(shed.status(), 503);
        drop(refused.into_body().collect().await.unwrap());
        assert!(conn.busy(), "the shed answer is not written yet");
        drop(shed.into_body().collect().await.unwrap());
        assert!(!conn.busy());
        assert_eq!(limit.inflight(), 0);
    }

    #[tokio::test]
    async fn an_admitted_request_carries_the_ticket_that_holds_its_place_and_the_next_is_shed() {
        let m = Metrics::new();
        let shed = m.counter("shardgate_load_shed_total", &[("reason", "inflight")]);
        let limit = Arc::new(InflightLimit::new(1, shed, m.counter("memory", &[])));
        let conn = ConnActivity::new(limit.clone());
        // As the forwarding stages do: the ticket goes with the response body.
        let mut svc =
            AdmissionLayer::new(conn.clone()).layer(tower::service_fn(|i: Inbound<()>| async {
                Ok::<_, Failed>(Forwarded {
                    response: Response::new(i.admitted),
                    trail: Trail::default(),
                })
            }));
        let first = svc
            .call(inbound(http::Request::new(())))
            .await
            .unwrap_or_else(|_| panic!("the first request is admitted"));
        assert!(first.response.body().is_some(), "it carried a ticket");
        assert_eq!(limit.inflight(), 1, "held while the body is alive");
        let Err(shed) = svc.call(inbound(http::Request::new(()))).await else {
            panic!("the second request is over the limit");
        };
        assert_eq!(shed.error.code(), "overloaded");
        assert_eq!(shed.error.status(), 503);
        assert!(
            m.render()
                .contains(r#"shardgate_load_shed_total{reason="inflight"} 1"#)
        );
        // The shed request's answer holds its ticket until it is written.
        assert!(shed.admitted.is_some());
        drop((first, shed));
        assert_eq!(limit.inflight(), 0, "the place is freed with the body");
        assert!(!conn.busy());
    }
}
