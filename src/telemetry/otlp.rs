//! OTLP export of the sampled traces (SPEC §6, §10): one server span per
//! sampled request, under the W3C trace id its `traceparent` carries.
//!
//! The request path never waits on this: a finished span goes into a bounded
//! queue with `try_send`, and when the queue is full it is dropped and
//! counted. One task on the proxy's own runtime batches the queue and sends
//! it with opentelemetry-otlp's gRPC exporter; a batch the collector does not
//! take (down, slow, refusing) is dropped and counted too, never retried into
//! a backlog.
//!
//! Not the SDK's `BatchSpanProcessor`: it runs its own thread (a proxy with
//! `workers = 1` keeps to one) and reports the spans it drops only in its own
//! log at shutdown, where operators need a counter. Not the SDK's tracer
//! either: it picks span ids itself, and the id this hop exports must be the
//! one it already sent upstream as the parent in `traceparent`.

use super::TraceContext;
use super::registry::{Metrics, names};
use metrics::Counter;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use std::borrow::Cow;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Spans sent to the collector in one request, at most.
const MAX_BATCH: usize = 512;
/// How long a batch waits for more spans once its first has arrived.
const LINGER: Duration = Duration::from_millis(200);
/// How long the collector has to take one batch.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the last batch may take at shutdown.
const FINAL_EXPORT_TIMEOUT: Duration = Duration::from_secs(1);

/// Where, and how much may wait.
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC endpoint (`http://` or `https://`).
    pub endpoint: http::Uri,
    /// Spans that may wait for export; beyond that they are dropped.
    pub max_queue: usize,
}

/// The exporter could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
#[error("cannot export traces to {endpoint}: {reason}")]
pub struct OtlpError {
    endpoint: String,
    reason: String,
}

/// One request as a server span.
#[derive(Debug)]
pub struct ServerSpan<'a> {
    /// Its trace: the trace id, this hop's span id, the client's span id.
    pub trace: TraceContext,
    /// When it arrived, and when it was answered.
    pub start: SystemTime,
    /// When it was answered.
    pub end: SystemTime,
    /// `http.request.method`
    pub method: &'a str,
    /// `url.path`
    pub path: &'a str,
    /// `url.scheme`
    pub scheme: &'static str,
    /// `network.protocol.version`
    pub protocol: &'static str,
    /// `client.address`
    pub client: &'a str,
    /// `http.response.status_code`
    pub status: u16,
    /// `error.type`: the proxy's error code, when it answered itself.
    pub error: Option<&'static str>,
    /// `shardgate.partition`
    pub partition: Option<u32>,
    /// `shardgate.epoch`: the map the request ran under.
    pub epoch: Option<u64>,
    /// `shardgate.attempts`
    pub attempts: u32,
    /// `shardgate.served_by`
    pub served_by: &'static str,
    /// `shardgate.upstream`: the node that answered.
    pub upstream: Option<&'a str>,
}

/// The request path's end of the export queue. Offering never waits.
#[derive(Clone, Debug)]
pub struct SpanSink {
    queue: mpsc::Sender<SpanData>,
    dropped_full: Counter,
    scope: InstrumentationScope,
}

impl SpanSink {
    /// Queue `span` for export, or drop and count it if the queue is full.
    pub fn record(&self, span: &ServerSpan<'_>) {
        if self.queue.try_send(span_data(span, &self.scope)).is_err() {
            self.dropped_full.increment(1);
        }
    }
}

/// Start exporting to `config`'s collector, until `shutdown`.
///
/// `instance` names this proxy (`service.instance.id`).
pub fn start(
    config: &OtlpConfig,
    instance: String,
    registry: &Metrics,
    shutdown: CancellationToken,
) -> Result<(SpanSink, JoinHandle<()>), OtlpError> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.endpoint.to_string())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| OtlpError {
            endpoint: config.endpoint.to_string(),
            reason: e.to_string(),
        })?;
    exporter.set_resource(
        &Resource::builder_empty()
            .with_service_name("shardgate-proxy")
            .with_attributes([
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("service.instance.id", instance),
            ])
            .build(),
    );
    let (queue, rx) = mpsc::channel(config.max_queue.max(1));
    let dropped = |reason| registry.counter(names::OTLP_SPANS_DROPPED, &[("reason", reason)]);
    let sink = SpanSink {
        queue,
        dropped_full: dropped("queue_full"),
        scope: InstrumentationScope::builder("shardgate")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    };
    let counters = Counters {
        exported: registry.counter(names::OTLP_SPANS_EXPORTED, &[]),
        failed: dropped("export_failed"),
    };
    let task = tokio::spawn(export(rx, exporter, counters, shutdown));
    Ok((sink, task))
}

struct Counters {
    exported: Counter,
    failed: Counter,
}

/// Batch the queue and send it until `shutdown`, then send what is left once.
async fn export(
    mut rx: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    counters: Counters,
    shutdown: CancellationToken,
) {
    let mut failing = false;
    loop {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let open = tokio::select! {
            n = rx.recv_many(&mut batch, MAX_BATCH) => n > 0,
            () = shutdown.cancelled() => false,
        };
        if open {
            // A burst goes out as one request rather than one per span.
            let _ = tokio::time::timeout(LINGER, async {
                while batch.len() < MAX_BATCH {
                    let room = MAX_BATCH - batch.len();
                    if rx.recv_many(&mut batch, room).await == 0 {
                        break;
                    }
                }
            })
            .await;
        } else {
            while batch.len() < MAX_BATCH
                && let Ok(span) = rx.try_recv()
            {
                batch.push(span);
            }
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            let within = if open {
                EXPORT_TIMEOUT
            } else {
                FINAL_EXPORT_TIMEOUT
            };
            let sent = tokio::time::timeout(within, exporter.export(batch)).await;
            match sent {
                Ok(Ok(())) => {
                    counters.exported.increment(n);
                    if std::mem::take(&mut failing) {
                        tracing::info!("the trace collector takes spans again");
                    }
                }
                Ok(Err(e)) => {
                    counters.failed.increment(n);
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(
                            "the trace collector refused spans; dropping them until it takes them: {e}"
                        );
                    }
                }
                Err(_) => {
                    counters.failed.increment(n);
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(
                            "the trace collector did not answer in {within:?}; dropping spans until it does"
                        );
                    }
                }
            }
        }
        if !open {
            return;
        }
    }
}

/// `span` in the SDK's export model.
fn span_data(span: &ServerSpan<'_>, scope: &InstrumentationScope) -> SpanData {
    let t = &span.trace;
    let mut attributes = Vec::with_capacity(14);
    attributes.extend([
        KeyValue::new("http.request.method", span.method.to_owned()),
        KeyValue::new("url.path", span.path.to_owned()),
        KeyValue::new("url.scheme", span.scheme),
        KeyValue::new("network.protocol.name", "http"),
        KeyValue::new("network.protocol.version", span.protocol),
        KeyValue::new("client.address", span.client.to_owned()),
        KeyValue::new("http.response.status_code", i64::from(span.status)),
        KeyValue::new("shardgate.attempts", i64::from(span.attempts)),
        KeyValue::new("shardgate.served_by", span.served_by),
    ]);
    if let Some(p) = span.partition {
        attributes.push(KeyValue::new("shardgate.partition", i64::from(p)));
    }
    if let Some(e) = span.epoch {
        // Epochs are u64; OTLP integers are i64, so a string keeps them exact.
        attributes.push(KeyValue::new("shardgate.epoch", e.to_string()));
    }
    if let Some(u) = span.upstream {
        attributes.push(KeyValue::new("shardgate.upstream", u.to_owned()));
    }
    // HTTP semantic conventions: a server span is an error on a 5xx (and
    // `error.type` names why: the proxy's own code, else the status).
    let error_type: Option<Cow<'static, str>> = match span.error {
        Some(code) => Some(code.into()),
        None if span.status >= 500 => Some(span.status.to_string().into()),
        None => None,
    };
    let status = if span.status >= 500 {
        Status::error(error_type.clone().unwrap_or_default())
    } else {
        Status::Unset
    };
    if let Some(e) = error_type {
        attributes.push(KeyValue::new("error.type", e));
    }
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(t.trace_id),
            SpanId::from(t.span_id),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        ),
        parent_span_id: SpanId::from(t.parent_id),
        parent_span_is_remote: t.parent_id != 0,
        span_kind: SpanKind::Server,
        name: Cow::Owned(span.method.to_owned()),
        start_time: span.start,
        end_time: span.end,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(status: u16, error: Option<&'static str>) -> SpanData {
        span_data(
            &ServerSpan {
                trace: TraceContext {
                    trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
                    span_id: 0x1111,
                    flags: 1,
                    parent_id: 0x00f067aa0ba902b7,
                },
                start: SystemTime::UNIX_EPOCH,
                end: SystemTime::UNIX_EPOCH + Duration::from_millis(3),
                method: "GET",
                path: "/kv/a",
                scheme: "http",
                protocol: "1.1",
                client: "127.0.0.1",
                status,
                error,
                partition: Some(2),
                epoch: Some(u64::MAX),
                attempts: 1,
                served_by: "primary",
                upstream: Some("10.0.0.1:80"),
            },
            &InstrumentationScope::builder("t").build(),
        )
    }

    fn attr(s: &SpanData, key: &str) -> Option<String> {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    }

    #[test]
    fn a_span_carries_the_trace_this_hop_sent_upstream_under_the_clients_span() {
        let s = span(200, None);
        assert_eq!(
            s.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(s.span_context.span_id(), SpanId::from(0x1111));
        assert_eq!(s.parent_span_id, SpanId::from(0x00f067aa0ba902b7));
        assert!(s.parent_span_is_remote);
        assert_eq!(s.span_kind, SpanKind::Server);
        assert_eq!(
            attr(&s, "shardgate.epoch").as_deref(),
            Some("18446744073709551615")
        );
        assert_eq!(
            attr(&s, "http.response.status_code").as_deref(),
            Some("200")
        );
        assert_eq!(s.status, Status::Unset);
        assert_eq!(attr(&s, "error.type"), None);
    }

    #[test]
    fn a_5xx_is_an_error_named_by_the_proxys_code_or_the_status() {
        let own = span(503, Some("no_healthy_upstream"));
        assert_eq!(
            attr(&own, "error.type").as_deref(),
            Some("no_healthy_upstream")
        );
        assert!(matches!(own.status, Status::Error { .. }));
        let upstream = span(502, None);
        assert_eq!(attr(&upstream, "error.type").as_deref(), Some("502"));
        let client_error = span(404, None);
        assert_eq!(
            client_error.status,
            Status::Unset,
            "4xx is not a server error"
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let registry = Metrics::new();
        let (queue, _rx) = mpsc::channel(2);
        let sink = SpanSink {
            queue,
            dropped_full: registry.counter(names::OTLP_SPANS_DROPPED, &[("reason", "queue_full")]),
            scope: InstrumentationScope::builder("t").build(),
        };
        let one = ServerSpan {
            trace: TraceContext::start(),
            start: SystemTime::now(),
            end: SystemTime::now(),
            method: "GET",
            path: "/",
            scheme: "http",
            protocol: "1.1",
            client: "127.0.0.1",
            status: 200,
            error: None,
            partition: None,
            epoch: None,
            attempts: 0,
            served_by: "proxy",
            upstream: None,
        };
        for _ in 0..5 {
            sink.record(&one);
        }
        let text = registry.render();
        assert!(
            text.contains(r#"shardgate_otlp_spans_dropped_total{reason="queue_full"} 3"#),
            "{text}"
        );
    }
}
