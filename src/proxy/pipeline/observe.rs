//! Observe, a layer: once a request is answered, its metrics (SPEC §5) and,
//! for every error and a sampled share of successes, an access-log line
//! (SPEC §6). Nothing is logged per request at info level otherwise.

use super::{Answered, Inbound, Trail};
use crate::routing::{PartitionMetrics, RequestClass};
use crate::telemetry::TraceId;
use http::{Method, Response, StatusCode};
use rand::RngExt;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::time::Instant;
use tower::{Layer, Service};

/// Adds [`Observe`].
pub(crate) struct ObserveLayer {
    unrouted: Arc<PartitionMetrics>,
}

impl ObserveLayer {
    /// Requests no partition took are counted under `unrouted`.
    pub(crate) fn new(unrouted: Arc<PartitionMetrics>) -> ObserveLayer {
        ObserveLayer { unrouted }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            unrouted: self.unrouted.clone(),
        }
    }
}

/// Records every request the inner service answers.
pub(crate) struct Observe<S> {
    inner: S,
    unrouted: Arc<PartitionMetrics>,
}

/// What is known of a request when it arrives.
struct Arrival {
    arrived: Instant,
    method: Method,
    trace_id: u128,
    /// Share of successes written to the access log.
    sample: f64,
    unrouted: Arc<PartitionMetrics>,
}

impl<S, B, R> Service<Inbound<R>> for Observe<S>
where
    S: Service<Inbound<R>, Response = Answered<B>, Error = Infallible>,
{
    type Response = Response<B>;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, inbound: Inbound<R>) -> Self::Future {
        let arrival = Arrival {
            arrived: inbound.arrived,
            method: inbound.req.method().clone(),
            trace_id: inbound.trace.0.trace_id,
            sample: inbound.snapshot.settings.access_log_sample,
            unrouted: self.unrouted.clone(),
        };
        ObserveFuture {
            inner: self.inner.call(inbound),
            arrival: Some(arrival),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner answer, recorded as it passes.
    pub(crate) struct ObserveFuture<F> {
        #[pin]
        inner: F,
        arrival: Option<Arrival>,
    }
}

impl<F, B> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Answered<B>, Infallible>>,
{
    type Output = Result<Response<B>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(answered) = ready!(this.inner.poll(cx));
        if let Some(arrival) = this.arrival.take() {
            record(
                &arrival,
                answered.response.status(),
                &answered.trail,
                answered.error,
            );
        }
        Poll::Ready(Ok(answered.response))
    }
}

/// The metrics of one answered request; returns its duration in seconds.
#[inline]
pub(super) fn count(
    arrived: Instant,
    method: &Method,
    status: StatusCode,
    trail: &Trail,
    unrouted: &PartitionMetrics,
) -> f64 {
    let class = RequestClass::of(method);
    let ended = trail.answered.unwrap_or_else(Instant::now);
    let secs = ended.saturating_duration_since(arrived).as_secs_f64();
    let partition = trail.partition.as_ref().map_or(unrouted, |(_, m)| &**m);
    partition.request(class, status.as_u16(), trail.served_by, secs);
    secs
}

/// Metrics and the sampled access log for one answered request.
fn record(a: &Arrival, status: StatusCode, trail: &Trail, error: Option<&'static str>) {
    let secs = count(a.arrived, &a.method, status, trail, &a.unrouted);
    let is_error = error.is_some() || status.is_server_error();
    // Sampling draws a random number; at a rate of 0 it need not.
    let sampled = a.sample > 0.0 && rand::rng().random_bool(a.sample);
    if is_error || sampled {
        tracing::info!(
            target: "shardgate::access",
            method = %a.method,
            status = status.as_u16(),
            partition = trail.partition.as_ref().map(|(i, _)| *i),
            upstream = trail.upstream.as_deref(),
            served_by = ?trail.served_by,
            attempts = trail.attempts,
            duration_ms = secs * 1000.0,
            error,
            trace_id = %TraceId(a.trace_id),
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::inbound;
    use super::*;
    use crate::routing::ServedBy;
    use crate::telemetry::Metrics;
    use std::time::Duration;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_is_counted_under_its_partition_and_timed_to_its_arrival() {
        let registry = Arc::new(Metrics::new());
        let unrouted = Arc::new(PartitionMetrics::new(registry.clone(), "none"));
        let partition = Arc::new(PartitionMetrics::new(registry.clone(), "2"));
        let mut svc = ObserveLayer::new(unrouted).layer(tower::service_fn(move |i: Inbound<()>| {
            let partition = partition.clone();
            async move {
                // The upstream answered 50 ms after arrival; the rest of the
                // wait is not the request's duration.
                let answered = i.arrived + Duration::from_millis(50);
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<_, Infallible>(Answered {
                    response: Response::new(()),
                    trail: Trail {
                        partition: Some((2, partition)),
                        served_by: ServedBy::Replica,
                        answered: Some(answered),
                        attempts: 1,
                        upstream: None,
                    },
                    error: None,
                })
            }
        }));
        let resp = svc
            .call(inbound(http::Request::get("/").body(()).unwrap()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let m = registry.render();
        assert_eq!(
            line(
                &m,
                r#"shardgate_requests_total{partition="2",class="read",code="2xx",served_by="replica"}"#
            ),
            Some("1"),
            "{m}"
        );
        assert_eq!(
            line(
                &m,
                r#"shardgate_request_duration_seconds_sum{partition="2",class="read"}"#
            ),
            Some("0.05")
        );
    }

    #[tokio::test]
    async fn a_request_no_partition_took_is_counted_as_none() {
        let registry = Arc::new(Metrics::new());
        let unrouted = Arc::new(PartitionMetrics::new(registry.clone(), "none"));
        let mut svc =
            ObserveLayer::new(unrouted).layer(tower::service_fn(|_: Inbound<()>| async {
                let mut response = Response::new(());
                *response.status_mut() = StatusCode::BAD_REQUEST;
                Ok::<_, Infallible>(Answered {
                    response,
                    trail: Trail::default(),
                    error: Some("missing_shard_key"),
                })
            }));
        let req = http::Request::post("/").body(()).unwrap();
        svc.call(inbound(req)).await.unwrap();
        let m = registry.render();
        assert_eq!(
            line(
                &m,
                r#"shardgate_requests_total{partition="none",class="write",code="4xx",served_by="proxy"}"#
            ),
            Some("1"),
            "{m}"
        );
    }
}
