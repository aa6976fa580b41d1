//! Prometheus metrics (SPEC §5).
//!
//! Each process component owns a recorder instance rather than installing a
//! global one, so two proxies in one test process do not share counters. All
//! labelled handles are registered off the hot path — when an upstream or a
//! partition first appears — so a request never hashes a label set.

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use std::sync::OnceLock;

/// Latency buckets from 100 µs to 10 s, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Every metric name shardgate exports, with its help text.
pub mod names {
    /// Requests answered.
    pub const REQUESTS: &str = "shardgate_requests_total";
    /// Time to answer a request.
    pub const REQUEST_DURATION: &str = "shardgate_request_duration_seconds";
    /// Attempts sent upstream, by outcome.
    pub const UPSTREAM_ATTEMPTS: &str = "shardgate_upstream_attempts_total";
    /// Retries, by reason.
    pub const RETRIES: &str = "shardgate_retries_total";
    /// Retries refused by the retry budget.
    pub const RETRY_BUDGET_EXHAUSTED: &str = "shardgate_retry_budget_exhausted_total";
    /// Breaker state per upstream.
    pub const BREAKER_STATE: &str = "shardgate_breaker_state";
    /// Requests sent to a node despite its open breaker (`when_all_open = fail_open`).
    pub const BREAKER_FAIL_OPEN: &str = "shardgate_breaker_fail_open_total";
    /// Breaker transitions per upstream.
    pub const BREAKER_TRANSITIONS: &str = "shardgate_breaker_transitions_total";
    /// Epoch of the map in force.
    pub const TOPOLOGY_EPOCH: &str = "shardgate_topology_epoch";
    /// Map updates by result.
    pub const TOPOLOGY_UPDATES: &str = "shardgate_topology_updates_total";
    /// Age of the map in force.
    pub const TOPOLOGY_AGE: &str = "shardgate_topology_age_seconds";
    /// Requests in flight.
    pub const INFLIGHT: &str = "shardgate_inflight_requests";
    /// Client connections open.
    pub const DOWNSTREAM_CONNECTIONS: &str = "shardgate_downstream_connections";
    /// Requests or connections refused to protect the proxy.
    pub const LOAD_SHED: &str = "shardgate_load_shed_total";
    /// Client connections that never finished the TLS handshake, by reason.
    pub const TLS_HANDSHAKE_FAILURES: &str = "shardgate_tls_handshake_failures_total";
    /// Bytes the proxy's allocator has handed out.
    pub const MEMORY_ALLOCATED: &str = "shardgate_memory_allocated_bytes";
    /// Reads a replica served, or was passed over for, by result.
    pub const REPLICA_READS: &str = "shardgate_replica_reads_total";
    /// Replication lag per node (coordinator), bytes.
    pub const REPLICATION_LAG_BYTES: &str = "shardgate_replication_lag_bytes";
    /// Replication lag per node (coordinator), seconds.
    pub const REPLICATION_LAG_SECONDS: &str = "shardgate_replication_lag_seconds";
    /// Nodes known to the coordinator, by status.
    pub const COORDINATOR_NODES: &str = "shardgate_coordinator_nodes";
    /// Whether this coordinator leads.
    pub const COORDINATOR_IS_LEADER: &str = "shardgate_coordinator_is_leader";
    /// Heartbeats received, by result.
    pub const COORDINATOR_HEARTBEATS: &str = "shardgate_coordinator_heartbeats_total";
    /// Failovers performed, by partition.
    pub const COORDINATOR_FAILOVERS: &str = "shardgate_coordinator_failovers_total";
    /// Clock skew per node.
    pub const COORDINATOR_CLOCK_SKEW: &str = "shardgate_coordinator_node_clock_skew_seconds";
    /// Topology watches held open.
    pub const COORDINATOR_WATCHES: &str = "shardgate_coordinator_watches";
    /// Spans the OTLP exporter sent to the collector.
    pub const OTLP_SPANS_EXPORTED: &str = "shardgate_otlp_spans_exported_total";
    /// Spans dropped: the export queue was full, or the collector did not take them.
    pub const OTLP_SPANS_DROPPED: &str = "shardgate_otlp_spans_dropped_total";
    /// Topology watches answered at once because too many were held.
    pub const COORDINATOR_WATCHES_SHED: &str = "shardgate_coordinator_watches_shed_total";
}

/// A private metrics registry with Prometheus text rendering.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with shardgate's latency buckets and help texts.
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        let m = Metrics { recorder, handle };
        m.describe_all();
        m
    }

    fn describe_all(&self) {
        use names::*;
        let r = &self.recorder;
        let c = |n: &'static str, h: &'static str| r.describe_counter(n.into(), None, h.into());
        let g = |n: &'static str, h: &'static str| r.describe_gauge(n.into(), None, h.into());
        c(REQUESTS, "Requests answered by the proxy.");
        c(OTLP_SPANS_EXPORTED, "Trace spans the collector took.");
        c(
            TLS_HANDSHAKE_FAILURES,
            "Client connections that never finished the TLS handshake, by reason.",
        );
        c(
            OTLP_SPANS_DROPPED,
            "Trace spans dropped: export queue full, or the collector did not take them.",
        );
        r.describe_histogram(
            REQUEST_DURATION.into(),
            Some(Unit::Seconds),
            "Time from request arrival to response headers.".into(),
        );
        c(UPSTREAM_ATTEMPTS, "Attempts sent to upstreams, by outcome.");
        c(RETRIES, "Retries made, by partition and reason.");
        c(
            RETRY_BUDGET_EXHAUSTED,
            "Retries refused because the retry budget was spent.",
        );
        g(
            BREAKER_STATE,
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
        );
        c(
            BREAKER_FAIL_OPEN,
            "Requests sent despite open breakers because every node was open.",
        );
        c(
            BREAKER_TRANSITIONS,
            "Circuit breaker transitions, by target state.",
        );
        g(TOPOLOGY_EPOCH, "Cluster epoch of the shard map in force.");
        c(TOPOLOGY_UPDATES, "Shard map updates, by result.");
        g(
            TOPOLOGY_AGE,
            "Seconds since the shard map in force was confirmed.",
        );
        g(INFLIGHT, "Requests being proxied.");
        g(DOWNSTREAM_CONNECTIONS, "Client connections open.");
        g(
            MEMORY_ALLOCATED,
            "Bytes the proxy's allocator has handed out (sampled every second).",
        );
        c(
            LOAD_SHED,
            "Requests or connections refused to protect the proxy, by reason.",
        );
        c(
            REPLICA_READS,
            "Reads a replica served (served), or was passed over for: too far behind \
             (too_stale) or not known to hold the read's token (token_not_applied).",
        );
        g(
            REPLICATION_LAG_BYTES,
            "Bytes of writes a replica's primary has that it has not applied.",
        );
        g(
            REPLICATION_LAG_SECONDS,
            "How far a replica's newest applied write is behind its primary's.",
        );
        g(
            COORDINATOR_NODES,
            "Nodes known to the coordinator, by status.",
        );
        g(
            COORDINATOR_IS_LEADER,
            "1 when this coordinator leads the cluster.",
        );
        c(COORDINATOR_HEARTBEATS, "Heartbeats received, by result.");
        c(
            COORDINATOR_FAILOVERS,
            "Primary failovers performed, by partition.",
        );
        g(
            COORDINATOR_CLOCK_SKEW,
            "Node clock minus coordinator clock, in seconds.",
        );
        g(COORDINATOR_WATCHES, "Topology watches held open.");
        c(
            COORDINATOR_WATCHES_SHED,
            "Topology watches answered at once because too many were held.",
        );
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect();
        Key::from_parts(name, labels)
    }

    fn meta() -> Metadata<'static> {
        Metadata::new(module_path!(), metrics::Level::INFO, None)
    }

    /// A counter handle.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&Self::key(name, labels), &Self::meta())
    }

    /// A gauge handle.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder
            .register_gauge(&Self::key(name, labels), &Self::meta())
    }

    /// A histogram handle.
    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(name, labels), &Self::meta())
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Fold recorded histogram samples; call periodically so samples cannot pile up.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// A handle created on first use and reused after: label hashing happens once.
pub struct Lazy<T>(OnceLock<T>);

impl<T> Default for Lazy<T> {
    fn default() -> Self {
        Lazy(OnceLock::new())
    }
}

impl<T> Lazy<T> {
    /// The handle, made by `make` the first time.
    #[inline]
    pub fn get(&self, make: impl FnOnce() -> T) -> &T {
        self.0.get_or_init(make)
    }
}
