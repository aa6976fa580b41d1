//! `[telemetry] otlp_endpoint`: sampled requests reach a real OTLP/gRPC
//! receiver as server spans under the trace ids their `traceparent` carries,
//! and the proxy serves on, counting what it drops, while the receiver is gone.
//!
//! The receiver is built from the published OTLP protocol definitions
//! (`tests/proto`, compiled by `build.rs`), not from the exporter's crate.

use super::support::*;
use super::value;
use http::Request;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[allow(clippy::all, missing_docs, unreachable_pub, dead_code)]
mod pb {
    pub mod opentelemetry {
        pub mod proto {
            pub mod common {
                pub mod v1 {
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/opentelemetry.proto.common.v1.rs"
                    ));
                }
            }
            pub mod resource {
                pub mod v1 {
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/opentelemetry.proto.resource.v1.rs"
                    ));
                }
            }
            pub mod trace {
                pub mod v1 {
                    include!(concat!(env!("OUT_DIR"), "/opentelemetry.proto.trace.v1.rs"));
                }
            }
            pub mod collector {
                pub mod trace {
                    pub mod v1 {
                        include!(concat!(
                            env!("OUT_DIR"),
                            "/opentelemetry.proto.collector.trace.v1.rs"
                        ));
                    }
                }
            }
        }
    }
}

use pb::opentelemetry::proto::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use pb::opentelemetry::proto::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use pb::opentelemetry::proto::common::v1::any_value::Value;

/// One span as the receiver got it.
#[derive(Clone, Debug)]
struct Received {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: i32,
    service: String,
    attributes: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let text = |v: &Option<Value>| match v {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(i)) => i.to_string(),
            Some(Value::BoolValue(b)) => b.to_string(),
            Some(Value::DoubleValue(d)) => d.to_string(),
            other => format!("{other:?}"),
        };
        let mut got = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(&kv.value.as_ref().and_then(|v| v.value.clone())))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Received {
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        name: s.name,
                        kind: s.kind,
                        service: service.clone(),
                        attributes: s
                            .attributes
                            .iter()
                            .map(|kv| {
                                (
                                    kv.key.clone(),
                                    text(&kv.value.as_ref().and_then(|v| v.value.clone())),
                                )
                            })
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A receiver on its own runtime and thread, so stopping it closes every
/// connection it holds, as a collector that goes away would.
struct Receiver {
    addr: SocketAddr,
    collector: Collector,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start(addr: SocketAddr, collector: Collector) -> Receiver {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let svc = collector.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                tokio::select! {
                    _ = tonic::transport::Server::builder()
                        .add_service(TraceServiceServer::new(svc))
                        .serve_with_incoming(incoming) => {}
                    _ = stopped => {}
                }
            });
            rt.shutdown_background();
        });
        Receiver {
            addr,
            collector,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap();
    }

    fn spans(&self) -> Vec<Received> {
        self.collector.spans.lock().unwrap().clone()
    }
}

async fn proxy_exporting_to(
    endpoint: SocketAddr,
    up: &Upstream,
    dir: &std::path::Path,
) -> BinProxy {
    let config = format!(
        "[log]\naccess_log_sample = 0.0\n[telemetry]\notlp_endpoint = \"http://{endpoint}\"\n"
    );
    BinProxy::in_front_of(&binary(), dir, up.addr, &config).await
}

async fn get_traced(url: &str, key: &str, traceparent: Option<&str>) -> Answer {
    let mut req = Request::get(url).header("x-shard-key", key);
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    send(&client(), req.body(empty()).unwrap()).await
}

fn traceparent(i: u32, sampled: bool) -> (String, String, String) {
    let trace_id = format!(
        "{:032x}",
        0x5eed_0000_0000_0000_0000_0000_0000_0000u128 + u128::from(i)
    );
    let parent = format!("{:016x}", 0xabc0_0000_0000_0000u64 + u64::from(i));
    let header = format!(
        "00-{trace_id}-{parent}-{}",
        if sampled { "01" } else { "00" }
    );
    (header, trace_id, parent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_requests_reach_a_real_otlp_receiver_under_their_trace_ids() {
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), Collector::default());
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = proxy_exporting_to(receiver.addr, &up, dir.path()).await;
    let url = format!("http://{}/kv/a", proxy.addr);

    // 20 requests whose clients sample their traces, 20 whose clients do
    // not, and one the proxy refuses (an error is always exported).
    let mut sampled = Vec::new();
    for i in 0..20 {
        let (header, trace_id, parent) = traceparent(i, true);
        assert_eq!(
            get_traced(&url, &format!("k{i}"), Some(&header))
                .await
                .status,
            200
        );
        sampled.push((trace_id, parent));
        let (unsampled, _, _) = traceparent(100 + i, false);
        assert_eq!(
            get_traced(&url, &format!("u{i}"), Some(&unsampled))
                .await
                .status,
            200
        );
    }
    let refused = send(
        &client(),
        Request::get(&url)
            .header("x-shard-key", "k")
            .header("x-shardgate-token", "not-a-token")
            .body(empty())
            .unwrap(),
    )
    .await;
    refused.assert_error(400, "invalid_token");

    eventually(Duration::from_secs(15), "21 spans received", || async {
        receiver.spans().len() >= 21
    })
    .await;
    let spans = receiver.spans();
    assert_eq!(
        spans.len(),
        21,
        "unsampled successes are not exported: {spans:#?}"
    );
    // What the upstream saw as its parent is the span the proxy exported.
    let upstream_parents: HashMap<String, String> = up
        .log()
        .iter()
        .filter_map(|r| r.header("traceparent"))
        .map(|tp| (tp[3..35].to_owned(), tp[36..52].to_owned()))
        .collect();
    for (trace_id, client_span) in &sampled {
        let span = spans
            .iter()
            .find(|s| &s.trace_id == trace_id)
            .unwrap_or_else(|| panic!("no span for trace {trace_id}"));
        assert_eq!(
            &span.parent_span_id, client_span,
            "the client's span is the parent"
        );
        assert_eq!(upstream_parents.get(trace_id), Some(&span.span_id));
        assert_eq!(span.name, "GET");
        assert_eq!(span.kind, 2, "SPAN_KIND_SERVER");
        assert_eq!(span.service, "shardgate-proxy");
        let a = &span.attributes;
        assert_eq!(a["http.request.method"], "GET");
        assert_eq!(a["url.path"], "/kv/a");
        assert_eq!(a["url.scheme"], "http");
        assert_eq!(a["http.response.status_code"], "200");
        assert_eq!(a["shardgate.partition"], "0");
        assert_eq!(a["shardgate.epoch"], "1");
        assert_eq!(a["shardgate.attempts"], "1");
        assert_eq!(a["shardgate.served_by"], "primary");
        assert_eq!(a["shardgate.upstream"], up.addr.to_string());
    }
    let error = spans
        .iter()
        .find(|s| {
            s.attributes
                .get("http.response.status_code")
                .map(String::as_str)
                == Some("400")
        })
        .expect("the refused request's span");
    assert_eq!(error.attributes["error.type"], "invalid_token");
    // Counted once the collector's answer is back, a moment after it has the spans.
    eventually(
        Duration::from_secs(10),
        "21 spans counted as exported",
        || async {
            let m = admin_get(proxy.admin, "/metrics").await.text();
            value(&m, "shardgate_otlp_spans_exported_total") == Some(21.0)
        },
    )
    .await;

    // The receiver goes away: requests are served as before, spans are
    // dropped and counted.
    let port = receiver.addr;
    let collector = receiver.collector.clone();
    receiver.stop();
    for i in 0..50 {
        let (header, _, _) = traceparent(1000 + i, true);
        assert_eq!(
            get_traced(&url, &format!("g{i}"), Some(&header))
                .await
                .status,
            200
        );
    }
    eventually(
        Duration::from_secs(20),
        "the lost spans are counted",
        || async {
            let m = admin_get(proxy.admin, "/metrics").await.text();
            value(
                &m,
                r#"shardgate_otlp_spans_dropped_total{reason="export_failed"}"#,
            )
            .unwrap_or(0.0)
                >= 50.0
        },
    )
    .await;

    // It comes back on the same port: export resumes.
    let receiver = Receiver::start(port, collector);
    let (header, trace_id, _) = traceparent(5000, true);
    assert_eq!(get_traced(&url, "back", Some(&header)).await.status, 200);
    eventually(Duration::from_secs(20), "export resumes", || async {
        receiver.spans().iter().any(|s| s.trace_id == trace_id)
    })
    .await;
    receiver.stop();
    proxy.signal("TERM");
    proxy.exits_zero().await;
}

#[tokio::test]
async fn an_otlp_endpoint_that_is_not_a_url_is_refused_by_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "[topology]\nsources = [\"m.json\"]\n[telemetry]\notlp_endpoint = \"collector:4317\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(binary())
        .args(["check-config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("telemetry.otlp_endpoint"), "{err}");
}
