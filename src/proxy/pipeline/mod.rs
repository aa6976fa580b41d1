//! The request path, top to bottom. Every request passes these steps in order:
//!
//! | step | what happens | module |
//! |---|---|---|
//! | entry | the live snapshot, arrival time and trace are taken | [`Entry`], here |
//! | respond | the proxy's own answers (errors) become SPEC JSON, in this one place | `respond` (layer) |
//! | observe | once answered: metrics, and the access log for errors and a sample | `observe` (layer) |
//! | admission | the in-flight limit: a ticket, or `503 overloaded` | `admission` (layer) |
//! | deadline | one overall deadline, which every later wait honours | `deadline` (layer) |
//! | key | the request is checked, then its shard key read | `key` |
//! | placement | the key's ring position picks a partition of the map | `placement` |
//! | plan | class and read preference order the partition's nodes; replicas too far behind, or without the read's token, are left out | `plan`, `consistency` |
//! | attempts | breakers, retries, backoff, budget; re-placement | `attempts` (I/O), `policy` (decisions) |
//! | response | the upstream's answer, headers rewritten, body streamed | `response` |
//!
//! The first four are tower layers: each wraps everything below it without
//! looking inside, and none allocates or reads the clock per request. The
//! forwarding stages below them are one service, `route`, for reasons its
//! opening comment gives.

mod admission;
mod attempts;
mod consistency;
mod deadline;
mod key;
mod observe;
mod outgoing;
mod placement;
mod plan;
mod policy;
mod respond;
mod response;
mod route;

pub(crate) use admission::{ConnActivity, InflightLimit, Ticket};
pub(crate) use attempts::{AttemptMetrics, ReplicaReads};
pub(crate) use route::{Forwarder, Holds};

use super::body::ProxyBody;
use super::error::ProxyError;
use super::headers::{ClientInfo, HostMemo};
use super::live::{LiveMap, Snapshot};
use crate::routing::{PartitionMetrics, ServedBy};
use crate::telemetry::{SpanSink, TraceContext};
use http::{Request, Response};
use hyper::body::Incoming;
use std::cell::RefCell;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder};

/// A request as the pipeline carries it (generic over the body only so the
/// layers can be tested without a connection).
pub(crate) struct Inbound<B = Incoming> {
    /// The client's request.
    pub(crate) req: Request<B>,
    /// The map, settings and budget it runs under, start to end.
    pub(crate) snapshot: Arc<Snapshot>,
    /// When it arrived.
    pub(crate) arrived: Instant,
    /// Its trace: the client's continued (`true`), or a new one.
    pub(crate) trace: (TraceContext, bool),
    /// Its place under the in-flight limit, once admitted: it goes with the
    /// response body and is held until that ends.
    pub(crate) admitted: Option<Ticket>,
}

/// An inbound request with its overall deadline, as the forwarding stages take it.
pub(crate) struct Bounded<B = Incoming> {
    /// The request.
    pub(crate) inbound: Inbound<B>,
    /// When it must be answered by.
    pub(crate) deadline: Instant,
}

/// What the forwarding stages learned on the way, for metrics and the access log.
#[derive(Default)]
pub(crate) struct Trail {
    /// The partition chosen (index and its metric handles).
    pub(crate) partition: Option<(u32, Arc<PartitionMetrics>)>,
    /// Who produced the response.
    pub(crate) served_by: ServedBy,
    /// The upstream that answered.
    pub(crate) upstream: Option<Arc<str>>,
    /// Attempts sent upstream.
    pub(crate) attempts: u32,
    /// When the answer passed on arrived from its upstream: the end of the
    /// request-duration measurement (`None`: the proxy's own answer, timed
    /// when observed).
    pub(crate) answered: Option<Instant>,
}

/// A response to pass on, and how it came about.
pub(crate) struct Forwarded<B> {
    pub(crate) response: Response<B>,
    pub(crate) trail: Trail,
}

/// A request the proxy answers itself, and how far it got.
pub(crate) struct Failed {
    pub(crate) error: ProxyError,
    pub(crate) trail: Trail,
    /// Its admission ticket, for the answer's body to hold (`respond`
    /// puts it there; the forwarding stage hands it back with the failure).
    pub(crate) admitted: Option<Ticket>,
}

impl Failed {
    /// `error`, before any partition was chosen.
    pub(crate) fn early(error: ProxyError) -> Failed {
        Failed::at(error, Trail::default())
    }

    /// `error`, after the stages that left `trail`.
    pub(crate) fn at(error: ProxyError, trail: Trail) -> Failed {
        Failed {
            error,
            trail,
            admitted: None,
        }
    }
}

impl From<ProxyError> for Failed {
    fn from(error: ProxyError) -> Failed {
        Failed::early(error)
    }
}

/// What a connection's client is, shared by its requests.
pub(crate) struct ClientConn {
    /// Forwarding facts.
    pub(crate) info: ClientInfo,
    /// The last valid `Host` it sent.
    pub(crate) hosts: HostMemo,
}

/// What every connection's pipeline shares.
pub(crate) struct Shared {
    pub(crate) live: Arc<LiveMap>,
    pub(crate) forwarder: Arc<Forwarder>,
    pub(crate) limit: Arc<InflightLimit>,
    /// Metric handles for requests no partition took.
    pub(crate) unrouted: Arc<PartitionMetrics>,
    /// Set once a successor binary serves: HTTP/1 answers say
    /// `Connection: close`, so keep-alive clients leave after their next
    /// answer instead of racing a close.
    pub(crate) closing: Arc<std::sync::atomic::AtomicBool>,
    /// Where sampled requests' spans go, when traces are exported.
    pub(crate) spans: Option<Arc<SpanSink>>,
}

/// The bookkeeping one successful request does, for `benches/hot_path.rs`:
/// the same functions the stages call, so the bench times what requests do.
#[doc(hidden)]
pub mod bench {
    use super::*;
    use crate::resilience::RetryBudget;
    use crate::upstream::{AttemptOutcome, Upstream};

    /// Resilience: the retry-budget deposit, the breaker's permit, the
    /// latency estimate and the attempt's verdict.
    pub fn resilience(upstream: &Upstream, budget: &RetryBudget, sent: Instant, answered: Instant) {
        budget.deposit(sent);
        let Some(permit) = upstream.breaker().try_acquire() else {
            return;
        };
        attempts::learn_latency(upstream, sent, answered);
        attempts::verdict(upstream, permit, AttemptOutcome::Ok, answered);
    }

    /// Metrics: the request counter and duration histogram of a 200 from a
    /// primary (the access log's sampling draws nothing at the shipped rate).
    pub fn metrics(
        partition: &Arc<PartitionMetrics>,
        unrouted: &PartitionMetrics,
        arrived: Instant,
        answered: Instant,
    ) {
        observe::count(
            arrived,
            &http::Method::GET,
            http::StatusCode::OK,
            ServedBy::Primary,
            &Trail {
                partition: Some((0, partition.clone())),
                served_by: ServedBy::Primary,
                upstream: None,
                attempts: 1,
                answered: Some(answered),
            },
            unrouted,
        );
    }
}

/// The pipeline for one client connection, as hyper calls it.
pub(crate) fn connection(
    shared: &Shared,
    client: ClientConn,
    activity: Arc<ConnActivity>,
) -> Entry<
    impl Service<Inbound, Response = Response<ProxyBody>, Error = Infallible, Future: Send + 'static>
    + Send
    + use<>,
> {
    let spans = shared
        .spans
        .as_ref()
        .map(|sink| observe::SpanConn::new(sink.clone(), &client.info));
    let route = route::Route::new(shared.forwarder.clone(), client);
    let stack = ServiceBuilder::new()
        .layer(respond::RespondLayer::new(shared.closing.clone()))
        .layer(observe::ObserveLayer::new(shared.unrouted.clone(), spans))
        .layer(admission::AdmissionLayer::new(activity))
        .layer(deadline::DeadlineLayer)
        .service_fn(move |b: Bounded| route.call(b));
    Entry {
        stack: RefCell::new(stack),
        live: shared.live.clone(),
    }
}

/// Where hyper hands a request to the pipeline.
///
/// hyper calls its service through `&self` and only ever from the
/// connection's own task, so the tower stack (which `call`s through
/// `&mut self`) sits in a `RefCell`: no lock, and no clone of the stack per
/// request.
pub(crate) struct Entry<S> {
    stack: RefCell<S>,
    live: Arc<LiveMap>,
}

impl<S> hyper::service::Service<Request<Incoming>> for Entry<S>
where
    S: Service<Inbound, Response = Response<ProxyBody>, Error = Infallible>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = S::Future;

    #[inline(always)] // see `observe`
    fn call(&self, req: Request<Incoming>) -> S::Future {
        let inbound = Inbound {
            trace: super::headers::trace_of(req.headers()),
            snapshot: self.live.snapshot(),
            arrived: Instant::now(),
            req,
            admitted: None,
        };
        let mut stack = self.stack.borrow_mut();
        // Every layer is always ready: the in-flight limit sheds in `call`
        // with an answer rather than making hyper wait.
        let ready = stack.poll_ready(&mut Context::from_waker(Waker::noop()));
        debug_assert!(matches!(ready, Poll::Ready(Ok(()))));
        stack.call(inbound)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::proxy::{ProxyConfig, RuntimeConfig};
    use crate::resilience::RetryBudget;

    /// The shipped defaults.
    pub(crate) fn settings() -> Arc<RuntimeConfig> {
        ProxyConfig::from_toml(
            "[topology]\nsources = [\"m.json\"]\n",
            "t",
            &Default::default(),
        )
        .unwrap()
        .runtime
    }

    /// `req` arriving now, with no map yet and the shipped settings.
    pub(crate) fn inbound<B>(req: Request<B>) -> Inbound<B> {
        let settings = settings();
        Inbound {
            req,
            snapshot: Arc::new(Snapshot {
                table: None,
                budget: Arc::new(RetryBudget::new(settings.budget)),
                settings,
            }),
            arrived: Instant::now(),
            trace: (TraceContext::start(), false),
            admitted: None,
        }
    }
}
