//! `shardgate coordinator` configuration: the file as written, and its
//! validation into `coordinator::CoordinatorConfig`.

use super::load::{ConfigErrors, ConfigIssue, Issues, TomlDoc, checked_server_tls};
use super::proxy::parse_log;
use crate::coordinator::{CoordinatorConfig, StoreUrl};
use crate::tls::ServerTls;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `[coordinator]`: identity, listeners, timing and the store.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub(super) struct CoordinatorSection {
    /// This coordinator's id; maps it serves name it as `masterNodeId` while it leads.
    pub id: String,
    /// HTTP API: topology, nodes, metrics.
    pub http_listen: String,
    /// gRPC: heartbeats and grpc.health.v1.
    pub grpc_listen: String,
    /// Map to start from when the store holds none yet.
    pub topology: Option<String>,
    /// `file:PATH` (default) or `postgres://user@host/db`.
    pub store: String,
    /// A node silent this long is DEAD.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// How often the leader looks for dead nodes.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Clock skew beyond this makes a node DEGRADED.
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// After a failover, the partition is left alone this long (no ping-pong).
    #[serde(with = "humantime_serde")]
    pub failover_hold_down: Duration,
    /// When a primary dies and its most caught-up live replica is further
    /// behind it than `failover_max_lag`: `wait` (consistent: not promoted,
    /// the partition refuses writes until its primary returns or an operator
    /// acts) or `promote` (available: promoted, and the writes it never
    /// received are lost).
    pub failover_lagging: String,
    /// How far behind its dead primary (in the time between their newest
    /// writes) a replica may be and still be promoted under `wait`.
    #[serde(with = "humantime_serde")]
    pub failover_max_lag: Duration,
    /// A primary's lease (SPEC §8), renewed by every heartbeat answered: it
    /// takes writes only while it holds one. Default: two thirds of
    /// heartbeat_timeout. Must end before the node can be declared dead:
    /// `lease × (1.01)² < heartbeat_timeout` (see `src/lease.rs`).
    #[serde(with = "humantime_serde::option")]
    pub lease: Option<Duration>,
    /// Longest a `waitForEpochAbove` watch is held open.
    #[serde(with = "humantime_serde")]
    pub watch_timeout: Duration,
    /// Heartbeats one node may send per second before RESOURCE_EXHAUSTED.
    pub max_heartbeats_per_second: u32,
    /// Nodes the map does not name that may register at once; more are
    /// refused (RESOURCE_EXHAUSTED), and silent ones are forgotten.
    pub max_unknown_nodes: usize,
    /// Connections the HTTP API holds at once (proxies' watches, operators,
    /// health checks); further ones are closed.
    pub http_max_connections: usize,
    /// Watches (`waitForEpochAbove`) held open at once; further ones are
    /// answered at once with the map in force, so watches never take the
    /// connections operators and health checks need. Below http_max_connections.
    pub max_watches: usize,
    /// Accept unauthenticated heartbeats on a listener reachable beyond this
    /// machine (no heartbeat_token, no grpc_client_ca). Off: such a
    /// coordinator refuses to start.
    pub insecure_heartbeats: bool,
    /// Bearer token required by PUT /v1/cluster/topology; empty refuses every change.
    pub admin_token: String,
    /// Bearer token agents must send with heartbeats; empty accepts any.
    pub heartbeat_token: String,
    /// Heartbeat history older than this is pruned (PostgreSQL store).
    #[serde(with = "humantime_serde")]
    pub heartbeat_retention: Duration,
    /// PEM certificate chain served on both listeners; empty: plain text.
    pub tls_cert: String,
    /// Its private key.
    pub tls_key: String,
    /// Require HTTP clients (proxies, operators) to present a certificate from this CA.
    pub http_client_ca: String,
    /// Require gRPC clients (agents) to present a certificate from this CA.
    pub grpc_client_ca: String,
}

impl Default for CoordinatorSection {
    fn default() -> Self {
        CoordinatorSection {
            id: "coordinator-1".into(),
            http_listen: "127.0.0.1:7400".into(),
            grpc_listen: "127.0.0.1:7401".into(),
            topology: None,
            store: "file:shardgate-state.json".into(),
            heartbeat_timeout: Duration::from_secs(15),
            sweep_interval: Duration::from_secs(5),
            max_clock_skew: Duration::from_millis(100),
            failover_hold_down: Duration::from_secs(30),
            failover_lagging: "wait".into(),
            failover_max_lag: Duration::from_secs(5),
            lease: None,
            watch_timeout: Duration::from_secs(30),
            max_heartbeats_per_second: 10,
            max_unknown_nodes: 1024,
            http_max_connections: 16_384,
            max_watches: 8_192,
            insecure_heartbeats: false,
            admin_token: String::new(),
            heartbeat_token: String::new(),
            heartbeat_retention: Duration::from_secs(3600),
            tls_cert: String::new(),
            tls_key: String::new(),
            http_client_ca: String::new(),
            grpc_client_ca: String::new(),
        }
    }
}

/// `[log]` for the coordinator.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub(super) struct CoordinatorLogSection {
    /// Level or filter; `RUST_LOG` wins.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for CoordinatorLogSection {
    fn default() -> Self {
        CoordinatorLogSection {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// Command-line flags that override the file.
#[derive(Clone, Debug, Default)]
pub struct CoordinatorOverrides {
    /// `--id`
    pub id: Option<String>,
    /// `--http-listen`
    pub http_listen: Option<String>,
    /// `--grpc-listen`
    pub grpc_listen: Option<String>,
    /// `--topology`
    pub topology: Option<String>,
    /// `--store`
    pub store: Option<String>,
    /// `--heartbeat-timeout` (seconds)
    pub heartbeat_timeout: Option<f64>,
    /// `--sweep-interval` (seconds)
    pub sweep_interval: Option<f64>,
    /// `--tls-cert`
    pub tls_cert: Option<String>,
    /// `--tls-key`
    pub tls_key: Option<String>,
    /// `--insecure-heartbeats`
    pub insecure_heartbeats: bool,
}

fn secs(v: f64, key: &str, issues: &mut Issues<'_>) -> Option<Duration> {
    if v.is_finite() && v > 0.0 && v < 86_400.0 {
        Some(Duration::from_secs_f64(v))
    } else {
        issues.push(key, "must be a number of seconds above 0");
        None
    }
}

impl CoordinatorConfig {
    /// Load `path` (or defaults), apply flags, validate everything.
    pub fn load(
        path: Option<&std::path::Path>,
        o: &CoordinatorOverrides,
    ) -> Result<Self, ConfigErrors> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| ConfigErrors {
                source_name: p.display().to_string(),
                issues: vec![ConfigIssue {
                    location: None,
                    key: String::new(),
                    message: format!("cannot read: {e}"),
                }],
            })?,
            None => String::new(),
        };
        let name = path.map_or_else(|| "flags".to_owned(), |p| p.display().to_string());
        Self::from_toml(&text, &name, o)
    }

    /// Parse and validate config text.
    pub fn from_toml(
        text: &str,
        name: &str,
        o: &CoordinatorOverrides,
    ) -> Result<Self, ConfigErrors> {
        let doc = TomlDoc::parse(text, name)?;
        let mut issues = Issues::new(Some(&doc));
        doc.reject_unknown_sections(&["coordinator", "log"], &mut issues);
        let mut c: CoordinatorSection = doc.section("coordinator", &mut issues);
        let log: CoordinatorLogSection = doc.section("log", &mut issues);
        if !issues.is_empty() {
            return Err(issues.into_errors(name));
        }
        let flag = |given: bool, flag: &str, key: &str| {
            if given {
                flag.to_owned()
            } else {
                key.to_owned()
            }
        };
        if let Some(v) = &o.http_listen {
            c.http_listen = v.clone();
        }
        if let Some(v) = &o.grpc_listen {
            c.grpc_listen = v.clone();
        }
        if let Some(v) = &o.id {
            c.id = v.clone();
        }
        if let Some(v) = &o.topology {
            c.topology = Some(v.clone());
        }
        if let Some(v) = &o.store {
            c.store = v.clone();
        }
        if let Some(v) = o.heartbeat_timeout
            && let Some(d) = secs(v, "--heartbeat-timeout", &mut issues)
        {
            c.heartbeat_timeout = d;
        }
        if let Some(v) = o.sweep_interval
            && let Some(d) = secs(v, "--sweep-interval", &mut issues)
        {
            c.sweep_interval = d;
        }

        if let Some(v) = &o.tls_cert {
            c.tls_cert = v.clone();
        }
        if let Some(v) = &o.tls_key {
            c.tls_key = v.clone();
        }
        let (http_tls, grpc_tls) = validate_tls(&c, &mut issues);

        let addr = |s: &str, key: String, issues: &mut Issues<'_>| match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                issues.push(key, format!("{s:?} is not an address like 127.0.0.1:7400"));
                None
            }
        };
        let http_listen = addr(
            &c.http_listen,
            flag(
                o.http_listen.is_some(),
                "--http-listen",
                "coordinator.http_listen",
            ),
            &mut issues,
        );
        let grpc_listen = addr(
            &c.grpc_listen,
            flag(
                o.grpc_listen.is_some(),
                "--grpc-listen",
                "coordinator.grpc_listen",
            ),
            &mut issues,
        );
        let store_key = flag(o.store.is_some(), "--store", "coordinator.store");
        let store = StoreUrl::parse(&c.store).unwrap_or_else(|e| {
            issues.push(store_key, e);
            StoreUrl::File(PathBuf::new())
        });
        if c.id.trim().is_empty() {
            issues.push("coordinator.id", "must not be empty");
        }
        for (key, d) in [
            ("coordinator.heartbeat_timeout", c.heartbeat_timeout),
            ("coordinator.sweep_interval", c.sweep_interval),
            ("coordinator.max_clock_skew", c.max_clock_skew),
            ("coordinator.watch_timeout", c.watch_timeout),
        ] {
            if d.is_zero() {
                issues.push(key, "must be above zero");
            }
        }
        let lease = c
            .lease
            .unwrap_or_else(|| crate::lease::default_for(c.heartbeat_timeout));
        let safe = crate::lease::longest_safe(c.heartbeat_timeout);
        if lease.is_zero() || lease > safe {
            issues.push(
                "coordinator.lease",
                format!(
                    "{lease:?} with heartbeat_timeout {:?}: a lease must end before its node can be \
                     declared dead and replaced, with a margin for clocks that run 1 % fast or \
                     slow (lease × 1.01² < heartbeat_timeout, so at most {safe:?}); leave it unset \
                     for two thirds of heartbeat_timeout",
                    c.heartbeat_timeout
                ),
            );
        }
        if c.max_watches >= c.http_max_connections {
            issues.push(
                "coordinator.max_watches",
                "must be below http_max_connections, so operators and health checks always get in",
            );
        }
        if c.max_heartbeats_per_second == 0 {
            issues.push(
                "coordinator.max_heartbeats_per_second",
                "must be at least 1",
            );
        }
        let log_format = parse_log(&log.level, &log.format, &mut issues);
        let failover_max_lag = match c.failover_lagging.as_str() {
            "wait" => Some(c.failover_max_lag),
            "promote" => None,
            other => {
                issues.push(
                    "coordinator.failover_lagging",
                    format!(
                        "{other:?} is neither \"wait\" (consistent) nor \"promote\" (available)"
                    ),
                );
                None
            }
        };
        if let Some(grpc) = grpc_listen
            && !grpc.ip().is_loopback()
            && c.heartbeat_token.is_empty()
            && c.grpc_client_ca.is_empty()
            && !(c.insecure_heartbeats || o.insecure_heartbeats)
        {
            issues.push(
                flag(
                    o.grpc_listen.is_some(),
                    "--grpc-listen",
                    "coordinator.grpc_listen",
                ),
                format!(
                    "{grpc} is reachable beyond this machine, and anyone who reaches it could \
                     forge heartbeats and fail primaries over: set heartbeat_token or \
                     grpc_client_ca, or pass --insecure-heartbeats (insecure_heartbeats = true) \
                     to accept that"
                ),
            );
        }
        let (Some(http_listen), Some(grpc_listen)) = (http_listen, grpc_listen) else {
            return Err(issues.into_errors(name));
        };
        let config = CoordinatorConfig {
            id: c.id,
            http_listen,
            grpc_listen,
            topology: c.topology.map(PathBuf::from),
            store,
            heartbeat_timeout: c.heartbeat_timeout,
            sweep_interval: c.sweep_interval,
            max_clock_skew: c.max_clock_skew,
            failover_hold_down: c.failover_hold_down,
            failover_max_lag,
            lease,
            watch_timeout: c.watch_timeout,
            max_heartbeats_per_second: c.max_heartbeats_per_second,
            max_unknown_nodes: c.max_unknown_nodes,
            http_max_connections: c.http_max_connections,
            max_watches: c.max_watches,
            admin_token: c.admin_token.into(),
            heartbeat_token: c.heartbeat_token.into(),
            heartbeat_retention: c.heartbeat_retention,
            http_tls,
            grpc_tls,
            log_level: log.level,
            log_format,
        };
        issues.finish(name, config)
    }
}

/// TLS for each listener: one certificate, a client CA per listener.
fn validate_tls(
    c: &CoordinatorSection,
    issues: &mut Issues<'_>,
) -> (Option<ServerTls>, Option<ServerTls>) {
    if c.tls_cert.is_empty() && c.tls_key.is_empty() {
        for (key, ca) in [
            ("coordinator.http_client_ca", &c.http_client_ca),
            ("coordinator.grpc_client_ca", &c.grpc_client_ca),
        ] {
            if !ca.is_empty() {
                issues.push(
                    key,
                    "client certificates need TLS: set tls_cert and tls_key",
                );
            }
        }
        return (None, None);
    }
    if c.tls_cert.is_empty() || c.tls_key.is_empty() {
        issues.push(
            "coordinator.tls_cert",
            "give both tls_cert and tls_key (or --tls-cert and --tls-key)",
        );
        return (None, None);
    }
    let spec = |client_ca: &str, alpn: &[&[u8]], key: &str, issues: &mut Issues<'_>| {
        checked_server_tls(
            ServerTls::single(&c.tls_cert, &c.tls_key, client_ca),
            alpn,
            key,
            issues,
        )
    };
    (
        spec(
            &c.http_client_ca,
            crate::tls::ALPN_H1,
            "coordinator.http_client_ca",
            issues,
        ),
        spec(
            &c.grpc_client_ca,
            crate::tls::ALPN_H2,
            "coordinator.grpc_client_ca",
            issues,
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_flags_override() {
        let o = CoordinatorOverrides {
            store: Some("postgres://u@127.0.0.1/db".into()),
            heartbeat_timeout: Some(2.5),
            ..Default::default()
        };
        let c = CoordinatorConfig::from_toml("", "t", &o).unwrap();
        assert_eq!(
            c.store,
            StoreUrl::Postgres("postgres://u@127.0.0.1/db".into())
        );
        assert_eq!(c.heartbeat_timeout, Duration::from_millis(2500));
        assert_eq!(c.grpc_listen.port(), 7401);
    }

    #[test]
    fn problems_are_listed_with_keys() {
        let err = CoordinatorConfig::from_toml(
            "[coordinator]\nstore = \"redis://x\"\nsweep_interval = \"0s\"\n",
            "c.toml",
            &Default::default(),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("coordinator.store"), "{text}");
        assert!(text.contains("coordinator.sweep_interval"), "{text}");
    }
}
