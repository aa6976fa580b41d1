//! Observe, a layer: once a request is answered, its metrics (SPEC §5) and,
//! for every error and a sampled share of successes, an access-log line
//! (SPEC §6). Nothing is logged per request at info level otherwise.
//!
//! With `[telemetry] otlp_endpoint`, the same requests (and those whose
//! client's `traceparent` asks for sampling) are exported as spans.
//!
//! It sits just inside `respond` and sees the outcome as it is (a response
//! passed on, or the proxy's own error, which it counts with the status
//! `respond` will give it), and passes it on untouched.

use super::super::headers::ClientInfo;
use super::{Failed, Forwarded, Inbound, Trail};
use crate::routing::ServedBy;
use crate::routing::{PartitionMetrics, RequestClass};
use crate::telemetry::{ServerSpan, SpanSink, TraceContext, TraceId};
use http::{Method, StatusCode, Version};
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
    spans: Option<Arc<SpanConn>>,
}

impl ObserveLayer {
    /// Requests no partition took are counted under `unrouted`; spans go
    /// to `spans`, when traces are exported.
    pub(crate) fn new(unrouted: Arc<PartitionMetrics>, spans: Option<SpanConn>) -> ObserveLayer {
        ObserveLayer {
            unrouted,
            spans: spans.map(Arc::new),
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            unrouted: self.unrouted.clone(),
            spans: self.spans.clone(),
        }
    }
}

/// Records every request the inner service answers.
pub(crate) struct Observe<S> {
    inner: S,
    unrouted: Arc<PartitionMetrics>,
    spans: Option<Arc<SpanConn>>,
}

/// A client connection's part of its requests' spans.
pub(crate) struct SpanConn {
    sink: Arc<SpanSink>,
    scheme: &'static str,
    client: String,
}

impl SpanConn {
    /// Spans of requests from the client `info` describes, into `sink`.
    pub(crate) fn new(sink: Arc<SpanSink>, info: &ClientInfo) -> SpanConn {
        SpanConn {
            sink,
            scheme: if info.tls { "https" } else { "http" },
            client: info.forwarded_for.to_str().unwrap_or("").to_owned(),
        }
    }
}

/// What a span needs of a request that only its arrival knows; taken only
/// when traces are exported.
struct SpanStart {
    conn: Arc<SpanConn>,
    path: String,
    version: Version,
    epoch: Option<u64>,
}

/// What is known of a request when it arrives.
struct Arrival {
    arrived: Instant,
    method: Method,
    /// Its trace, and whether the client's was continued.
    trace: (TraceContext, bool),
    /// Share of successes written to the access log.
    sample: f64,
    unrouted: Arc<PartitionMetrics>,
    span: Option<SpanStart>,
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
        let span = self.spans.as_ref().map(|conn| SpanStart {
            conn: conn.clone(),
            path: inbound.req.uri().path().to_owned(),
            version: inbound.req.version(),
            epoch: inbound.snapshot.table.as_ref().map(|t| t.epoch()),
        });
        let arrival = Arrival {
            arrived: inbound.arrived,
            method: inbound.req.method().clone(),
            trace: inbound.trace,
            sample: inbound.snapshot.settings.access_log_sample,
            unrouted: self.unrouted.clone(),
            span,
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
    if let Some(span) = &a.span {
        // A client that samples its trace gets this hop's span too (OpenTelemetry's parent-based sampling).
        let (trace, continued) = a.trace;
        if is_error || sampled || (continued && trace.flags & 1 == 1) {
            export(a, span, status, trail, served_by, error, secs);
        }
    }
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
            trace_id = %TraceId(a.trace.0.trace_id),
            "request"
        );
    }
}

/// Hand one answered request's span to the exporter.
fn export(
    a: &Arrival,
    span: &SpanStart,
    status: StatusCode,
    trail: &Trail,
    served_by: ServedBy,
    error: Option<&'static str>,
    secs: f64,
) {
    let ago = Instant::now().saturating_duration_since(a.arrived);
    let start = std::time::SystemTime::now()
        .checked_sub(ago)
        .unwrap_or(std::time::UNIX_EPOCH);
    span.conn.sink.record(&ServerSpan {
        trace: a.trace.0,
        start,
        end: start + std::time::Duration::from_secs_f64(secs.max(0.0)),
        method: a.method.as_str(),
        path: &span.path,
        scheme: span.conn.scheme,
        protocol: match span.version {
            Version::HTTP_2 => "2",
            Version::HTTP_10 => "1.0",
            _ => "1.1",
        },
        client: &span.conn.client,
        status: status.as_u16(),
        error,
        partition: trail.partition.as_ref().map(|(i, _)| *i),
        epoch: span.epoch,
        attempts: trail.attempts,
        served_by: served_by.label(),
        upstream: trail.upstream.as_deref(),
    });
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
        let mut svc =
            ObserveLayer::new(unrouted, None).layer(tower::service_fn(move |i: Inbound<()>| {
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
            ObserveLayer::new(unrouted, None).layer(tower::service_fn(|_: Inbound<()>| async {
                Err::<Forwarded<()>, _>(Failed {
                    admitted: None,
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
