//! The proxy config file as written: plain data, one struct per section,
//! every field with its default (documented where it is set, and in
//! `config/shardgate.toml`). Nothing here is checked; `validate` does that.

use super::super::load::{Issues, TomlDoc};
use serde::Deserialize;
use std::time::Duration;

/// `[server]`: listeners and connection handling.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ServerSection {
    /// Client-facing listener.
    pub listen: String,
    /// Admin listener (metrics, health, topology); loopback unless you mean otherwise.
    pub admin_listen: String,
    /// Runtime worker threads; 0 = one per available CPU; 1 = single-threaded.
    pub workers: usize,
    /// Longest a drain may take on SIGTERM/SIGINT before connections are cut.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Serve HTTP/2 (prior knowledge, or ALPN under TLS) as well as HTTP/1.1.
    pub http2: bool,
    /// Serve the admin listener over TLS with this certificate (PEM); empty: plain.
    pub admin_tls_cert: String,
    /// The admin certificate's key (PEM).
    pub admin_tls_key: String,
    /// Require admin clients to present certificates signed by this CA.
    pub admin_client_ca: String,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            workers: 0,
            shutdown_grace: Duration::from_secs(30),
            http2: true,
            admin_tls_cert: String::new(),
            admin_tls_key: String::new(),
            admin_client_ca: String::new(),
        }
    }
}

/// One SNI entry of `[tls]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniDoc {
    /// Server names (as clients send them in SNI) this certificate serves.
    pub names: Vec<String>,
    /// PEM certificate chain.
    pub cert: String,
    /// PEM private key.
    pub key: String,
}

/// `[tls]`: TLS on the client-facing listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct TlsSection {
    /// Default certificate chain (PEM); empty: plain HTTP.
    pub cert: String,
    /// Its private key (PEM).
    pub key: String,
    /// Further certificates chosen by SNI.
    pub sni: Vec<SniDoc>,
    /// Require client certificates signed by this CA (mTLS); empty: none asked.
    pub client_ca: String,
    /// A client must finish its handshake within this time.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert: String::new(),
            key: String::new(),
            sni: Vec::new(),
            client_ca: String::new(),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// `[topology]`: where the shard map comes from.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct TopologySection {
    /// A file path, or coordinator URLs (`http://host:port`) tried in order.
    pub sources: Vec<String>,
    /// Port used for node addresses the map writes without one.
    pub default_upstream_port: u16,
    /// How long a watch (`waitForEpochAbove`) may be held open by the coordinator.
    #[serde(with = "humantime_serde")]
    pub watch_timeout: Duration,
    /// Polling period when a coordinator offers no watch, before jitter.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Timeout of one plain fetch (not a watch).
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// Largest map accepted from a coordinator, in bytes.
    pub max_map_bytes: usize,
    /// Where the last valid map from a coordinator is saved; loaded at start-up
    /// when no coordinator answers. `auto` (the default): one file per proxy
    /// instance in the state directory (see `default_cache_file`); a path:
    /// that file; empty: no cache.
    pub cache_file: String,
    /// How long start-up waits for a coordinator before using the cache.
    #[serde(with = "humantime_serde")]
    pub startup_wait: Duration,
    /// Writes answer `503 topology_stale` once the map in force is older than
    /// this (reads continue). "0s": never.
    #[serde(with = "humantime_serde")]
    pub max_staleness: Duration,
    /// CA for https coordinators; empty: the system's roots.
    pub tls_ca: String,
    /// Client certificate for coordinators that require one (PEM).
    pub tls_cert: String,
    /// Its key (PEM).
    pub tls_key: String,
}

impl Default for TopologySection {
    fn default() -> Self {
        TopologySection {
            sources: Vec::new(),
            default_upstream_port: 80,
            watch_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            fetch_timeout: Duration::from_secs(5),
            max_map_bytes: 16 * 1024 * 1024,
            cache_file: "auto".into(),
            startup_wait: Duration::from_secs(5),
            max_staleness: Duration::ZERO,
            tls_ca: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

/// `[failover_buffer]`: hold writes while a partition has no reachable
/// primary, or its new primary refuses them for its role.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct FailoverBufferSection {
    /// Off by default: such writes fail at once with `primary_unavailable`.
    pub enabled: bool,
    /// Longest a write is held waiting for a new map or its new primary.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Writes held at once; more fail at once.
    pub max_requests: usize,
}

impl Default for FailoverBufferSection {
    fn default() -> Self {
        FailoverBufferSection {
            enabled: false,
            max_wait: Duration::from_secs(5),
            max_requests: 1000,
        }
    }
}

/// One entry of `routing.key_sources`: exactly one of the three.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct KeySourceDoc {
    /// Header name.
    pub header: Option<String>,
    /// Path template with one `{key}` segment.
    pub path: Option<String>,
    /// Query parameter name.
    pub query: Option<String>,
}

/// `[routing]`: keys, partitions and read preference.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct RoutingSection {
    /// Where to look for the shard key, in order.
    pub key_sources: Vec<KeySourceDoc>,
    /// Longest key accepted, in bytes.
    pub max_key_bytes: usize,
    /// Route requests with no key to this partition index instead of refusing them.
    pub keyless_partition: Option<u32>,
    /// Read preference when a request names none.
    pub read_preference: String,
    /// Header a client may use to choose a read preference per request.
    pub read_preference_header: String,
    /// Whether that header is honoured.
    pub allow_read_preference_override: bool,
    /// Add `x-shardgate-upstream` to responses (off: the upstream stays private).
    pub expose_upstream: bool,
    /// Replicas further behind their primary than this serve no reads
    /// (SPEC §7); none: no bound unless a request sets `x-max-staleness`.
    #[serde(with = "humantime_serde")]
    pub max_replica_lag: Option<Duration>,
}

impl Default for RoutingSection {
    fn default() -> Self {
        RoutingSection {
            key_sources: vec![
                KeySourceDoc {
                    header: Some("x-shard-key".into()),
                    ..KeySourceDoc::default()
                },
                KeySourceDoc {
                    path: Some("/kv/{key}".into()),
                    ..KeySourceDoc::default()
                },
                KeySourceDoc {
                    query: Some("key".into()),
                    ..KeySourceDoc::default()
                },
            ],
            max_key_bytes: 1024,
            keyless_partition: None,
            read_preference: "primaryPreferred".into(),
            read_preference_header: "x-read-preference".into(),
            allow_read_preference_override: true,
            expose_upstream: false,
            max_replica_lag: None,
        }
    }
}

/// `[limits]`: what one client may ask of the proxy.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct LimitsSection {
    /// Request line plus headers, in bytes (431 above).
    pub max_header_bytes: usize,
    /// Request body, in bytes (413 above).
    pub max_body_bytes: u64,
    /// Open client connections; further ones get `503 overloaded`.
    pub max_connections: usize,
    /// Requests being proxied at once; further ones get `503 overloaded`.
    pub max_inflight: usize,
    /// Requests in flight to any one upstream; 0 = no per-upstream limit.
    pub max_inflight_per_upstream: usize,
    /// Time a client has to send a complete request head.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time an idle client connection (no request in flight) is kept open.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time a client may take nothing of a response (an HTTP/1 socket that
    /// accepts no byte, an HTTP/2 stream granted no window) before it is cut
    /// off. nginx's `send_timeout`.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Bytes the process may hold (allocated); above it new requests get
    /// `503 overloaded` until it is back under 90 %. 0 = no bound.
    pub max_memory_bytes: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_header_bytes: 16 * 1024,
            max_body_bytes: 128 * 1024 * 1024,
            max_connections: 10_000,
            max_inflight: 10_000,
            max_inflight_per_upstream: 0,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            max_memory_bytes: 1024 * 1024 * 1024,
        }
    }
}

/// `[timeouts]`: how long the proxy waits on upstreams.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct TimeoutsSection {
    /// TCP connect to an upstream.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// One attempt, from sending until response headers arrive.
    #[serde(with = "humantime_serde")]
    pub per_try: Duration,
    /// The whole request, all attempts and the response body included.
    #[serde(with = "humantime_serde")]
    pub overall: Duration,
}

impl Default for TimeoutsSection {
    fn default() -> Self {
        TimeoutsSection {
            connect: Duration::from_secs(1),
            per_try: Duration::from_secs(15),
            overall: Duration::from_secs(30),
        }
    }
}

/// `[retry]`: attempts, spacing and the budget that caps them.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct RetrySection {
    /// Attempts per request, the first included; 1 disables retries.
    pub max_attempts: u32,
    /// Delay before the first retry to the same upstream, before jitter.
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    /// Longest delay between attempts.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// `none`, `full`, `equal` or `decorrelated`.
    pub jitter: String,
    /// Upstream statuses retried for idempotent requests.
    pub on_status: Vec<u16>,
    /// Request bodies up to this many bytes are kept for replay.
    pub buffer_bytes: usize,
    /// Retries allowed as a share of requests over the budget window.
    pub budget_ratio: f64,
    /// Window the budget counts over.
    #[serde(with = "humantime_serde")]
    pub budget_window: Duration,
    /// Retries per second allowed regardless of traffic.
    pub budget_min_per_second: u32,
}

impl Default for RetrySection {
    fn default() -> Self {
        RetrySection {
            max_attempts: 3,
            base_delay: Duration::from_millis(25),
            max_delay: Duration::from_secs(1),
            jitter: "full".into(),
            on_status: vec![502, 503, 504],
            buffer_bytes: 64 * 1024,
            budget_ratio: 0.2,
            budget_window: Duration::from_secs(10),
            budget_min_per_second: 10,
        }
    }
}

/// `[breaker]`: per-upstream circuit breakers.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct BreakerSection {
    /// Consecutive failures that open a breaker; 0 disables this trigger.
    pub consecutive_failures: u32,
    /// Failure share over the window that opens a breaker; above 1 disables it.
    pub failure_ratio: f64,
    /// Window for the failure share.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Requests the window must hold before the share counts.
    pub min_requests: u32,
    /// Shortest time a breaker stays open.
    #[serde(with = "humantime_serde")]
    pub min_open: Duration,
    /// Longest time a breaker stays open, however often it trips.
    #[serde(with = "humantime_serde")]
    pub max_open: Duration,
    /// Probes let through at once while half-open.
    pub half_open_probes: u32,
    /// Upstream statuses that count as failures.
    pub failure_statuses: Vec<u16>,
    /// When every node of a partition is open: `fail_fast` or `fail_open`.
    pub when_all_open: String,
}

impl Default for BreakerSection {
    fn default() -> Self {
        BreakerSection {
            consecutive_failures: 5,
            failure_ratio: 0.5,
            window: Duration::from_secs(10),
            min_requests: 20,
            min_open: Duration::from_secs(5),
            max_open: Duration::from_secs(60),
            half_open_probes: 3,
            failure_statuses: vec![502, 503, 504],
            when_all_open: "fail_fast".into(),
        }
    }
}

/// `[upstream]`: connections to shard nodes.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct UpstreamSection {
    /// Idle keep-alive connections kept per upstream.
    pub pool_max_idle: usize,
    /// How long an idle pooled connection is kept; keep it below the nodes' own keep-alive timeout.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Speak TLS to shard nodes.
    pub tls: bool,
    /// CA the nodes' certificates must chain to; empty: the system's roots.
    pub tls_ca: String,
    /// Name to send in SNI and verify the certificate against; empty: the node's IP.
    pub tls_server_name: String,
    /// Client certificate for nodes that require one (PEM).
    pub tls_cert: String,
    /// Its key (PEM).
    pub tls_key: String,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        UpstreamSection {
            // Below the requests in flight to one node, every answer beyond
            // the cap closes a connection the next request reopens: with 512
            // HTTP/2 streams in flight a cap of 64 doubled the CPU per request
            // (benches/compare.py --h2). Idle ones still go after
            // pool_idle_timeout, and HAProxy and Envoy set no cap at all.
            pool_max_idle: 1024,
            pool_idle_timeout: Duration::from_secs(30),
            tls: false,
            tls_ca: String::new(),
            tls_server_name: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

/// `[log]`: logging and access-log sampling.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct LogSection {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a full filter; `RUST_LOG` wins.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
    /// Share of successful requests written to the access log (errors always are).
    pub access_log_sample: f64,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".into(),
            format: "text".into(),
            access_log_sample: 0.01,
        }
    }
}

/// `[telemetry]`: trace export.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct TelemetrySection {
    /// The OTLP/gRPC collector sampled traces go to (`http://host:4317`);
    /// empty: no export.
    pub otlp_endpoint: String,
    /// Spans that may wait for export; beyond that they are dropped and counted.
    pub otlp_max_queue: usize,
}

impl Default for TelemetrySection {
    fn default() -> Self {
        TelemetrySection {
            otlp_endpoint: String::new(),
            otlp_max_queue: 2048,
        }
    }
}

/// The proxy config file, section by section.
#[derive(Clone, Debug, Default)]
pub struct ProxyFile {
    /// `[server]`
    pub server: ServerSection,
    /// `[tls]`
    pub tls: TlsSection,
    /// `[topology]`
    pub topology: TopologySection,
    /// `[routing]`
    pub routing: RoutingSection,
    /// `[limits]`
    pub limits: LimitsSection,
    /// `[timeouts]`
    pub timeouts: TimeoutsSection,
    /// `[retry]`
    pub retry: RetrySection,
    /// `[breaker]`
    pub breaker: BreakerSection,
    /// `[upstream]`
    pub upstream: UpstreamSection,
    /// `[failover_buffer]`
    pub failover_buffer: FailoverBufferSection,
    /// `[log]`
    pub log: LogSection,
    /// `[telemetry]`
    pub telemetry: TelemetrySection,
}

pub(super) const SECTIONS: &[&str] = &[
    "server",
    "tls",
    "topology",
    "routing",
    "limits",
    "timeouts",
    "retry",
    "breaker",
    "upstream",
    "failover_buffer",
    "log",
    "telemetry",
];

/// Command-line flags that override the file.
#[derive(Clone, Debug, Default)]
pub struct ProxyOverrides {
    /// `--listen`
    pub listen: Option<String>,
    /// `--admin-listen`
    pub admin_listen: Option<String>,
    /// `--topology` (replaces the file's sources when given)
    pub topology: Vec<String>,
    /// `--tls-cert`
    pub tls_cert: Option<String>,
    /// `--tls-key`
    pub tls_key: Option<String>,
}

impl ProxyFile {
    /// Read the sections of a parsed document.
    pub fn from_doc(doc: &TomlDoc<'_>, issues: &mut Issues<'_>) -> ProxyFile {
        doc.reject_unknown_sections(SECTIONS, issues);
        ProxyFile {
            server: doc.section("server", issues),
            tls: doc.section("tls", issues),
            topology: doc.section("topology", issues),
            routing: doc.section("routing", issues),
            limits: doc.section("limits", issues),
            timeouts: doc.section("timeouts", issues),
            retry: doc.section("retry", issues),
            breaker: doc.section("breaker", issues),
            upstream: doc.section("upstream", issues),
            failover_buffer: doc.section("failover_buffer", issues),
            log: doc.section("log", issues),
            telemetry: doc.section("telemetry", issues),
        }
    }

    /// Apply command-line flags on top of the file.
    pub fn apply(&mut self, o: &ProxyOverrides) {
        if let Some(l) = &o.listen {
            self.server.listen = l.clone();
        }
        if let Some(a) = &o.admin_listen {
            self.server.admin_listen = a.clone();
        }
        if !o.topology.is_empty() {
            self.topology.sources = o.topology.clone();
        }
        if let Some(c) = &o.tls_cert {
            self.tls.cert = c.clone();
        }
        if let Some(k) = &o.tls_key {
            self.tls.key = k.clone();
        }
    }
}
