//! Observe, a layer: once a request is answered, its metrics (SPEC §5) and,
//! for every error and a sampled share of successes, an access-log line
//! (SPEC §6). Nothing is logged per request at info level otherwise.
//!
//! It sits just inside `respond` and sees the outcome as it is (a response
//! passed on, or the proxy's own error, which it counts with the status
//! `respond` will give it), and passes it on untouched.

use super::{Failed, Forwarded, Inbound, Trail};
use crate::routing::ServedBy;
use crate::routing::{PartitionMetrics, RequestClass};
use crate::telemetry::TraceId;
use http::{Method, StatusCode};
use rand::RngExt;
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
    S: Service<Inbound<R>, Response = Forwarded<B>, Error = Failed>,
{
    type Response = Forwarded<B>;
    type Error = Failed;
    type Future = ObserveFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        self.inner.poll_ready(cx)
    }

    #[inline(always)] // see `respond`
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
    /// The inner outcome, recorded as it passes.
    pub(crate) struct ObserveFuture<F> {
        #[pin]
        inner: F,
        arrival: Option<Arrival>,
    }
}

impl<F, B> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Forwarded<B>, Failed>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let outcome = ready!(this.inner.poll(cx));
        if let Some(arrival) = this.arrival.take() {
            match &outcome {
                Ok(f) => record(&arrival, f.response.status(), &f.trail, None),
                Err(f) => record(&arrival, f.error.status(), &f.trail, Some(f.error.code())),
            }
        }
        Poll::Ready(outcome)
    }
}

/// The metrics of one answered request; returns its duration in seconds.
#[inline]
pub(super) fn count(
    arrived: Instant,
    method: &Method,
    status: StatusCode,
    served_by: ServedBy,
    trail: &Trail,
    unrouted: &PartitionMetrics,
) -> f64 {
    let class = RequestClass::of(method);
    let ended = trail.answered.unwrap_or_else(Instant::now);
    let secs = ended.saturating_duration_since(arrived).as_secs_f64();
    let partition = trail.partition.as_ref().map_or(unrouted, |(_, m)| &**m);
    partition.request(class, status.as_u16(), served_by, secs);
    secs
}

/// Metrics and the sampled access log for one answered request.
fn record(a: &Arrival, status: StatusCode, trail: &Trail, error: Option<&'static str>) {
    // The proxy's own answers are served by the proxy, however far they got.
    let served_by = if error.is_some() {
        ServedBy::Proxy
    } else {
        trail.served_by
    };
    let secs = count(a.arrived, &a.method, status, served_by, trail, &a.unrouted);
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
            served_by = ?served_by,
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
    use super::super::super::error::ProxyError;
    use super::super::tests::inbound;
    use super::*;
    use crate::routing::ServedBy;
    use crate::telemetry::Metrics;
    use http::Response;
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
                Ok::<_, Failed>(Forwarded {
                    response: Response::new(()),
                    trail: Trail {
                        partition: Some((2, partition)),
                        served_by: ServedBy::Replica,
                        answered: Some(answered),
                        attempts: 1,
                        upstream: None,
                    },
                })
            }
        }));
        let Ok(forwarded) = svc
            .call(inbound(http::Request::get("/").body(()).unwrap()))
            .await
        else {
            panic!("passed on untouched")
        };
        assert_eq!(forwarded.response.status(), 200);
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
    async fn the_proxys_own_answer_is_counted_with_its_status_as_served_by_the_proxy() {
        let registry = Arc::new(Metrics::new());
        let unrouted = Arc::new(PartitionMetrics::new(registry.clone(), "none"));
        let mut svc =
            ObserveLayer::new(unrouted).layer(tower::service_fn(|_: Inbound<()>| async {
                Err::<Forwarded<()>, _>(Failed {
                    error: ProxyError::MissingShardKey("no x-shard-key".into()),
                    // An upstream was tried before the proxy gave up.
                    trail: Trail {
                        served_by: ServedBy::Primary,
                        ..Trail::default()
                    },
                })
            }));
        let req = http::Request::post("/").body(()).unwrap();
        let failed = svc.call(inbound(req)).await.err().expect("passed on");
        assert_eq!(failed.error.code(), "missing_shard_key");
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
