//! Validation of the proxy config: every rule checked, every problem
//! reported with its key and line, and the file turned into the typed values
//! the data plane runs on (`crate::proxy::ProxyConfig` and the settings
//! beside the code that uses them).

use super::super::load::{ConfigErrors, ConfigIssue, Issues, TomlDoc, checked_server_tls};
use super::file::*;
use super::topology::{default_cache_file, parse_topology_source};
use crate::proxy::{
    FailoverBuffer, Limits, ProxyConfig, RuntimeConfig, ServerConfig, Timeouts, TopologySource,
    WatchConfig,
};
use crate::resilience::{
    AllOpen, Backoff, BreakerConfig, BreakerPolicy, BudgetConfig, Jitter, RetryPolicy, StatusSet,
};
use crate::routing::{KeyExtractor, KeySource, PathTemplate, ReadPreference, RoutingConfig};
use crate::telemetry::{LogConfig, LogFormat, OtlpConfig};
use crate::upstream::{PoolSettings, UpstreamSettings, UpstreamTls};
use http::HeaderName;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

impl ProxyConfig {
    /// Load `path` (or defaults when `None`), apply flags, validate everything.
    pub fn load(
        path: Option<&std::path::Path>,
        o: &ProxyOverrides,
    ) -> Result<ProxyConfig, ConfigErrors> {
        let Some(path) = path else {
            let mut file = ProxyFile::default();
            file.apply(o);
            return ProxyConfig::validate(&file, o, None, "flags");
        };
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            source_name: name.clone(),
            issues: vec![ConfigIssue {
                location: None,
                key: String::new(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        ProxyConfig::from_toml(&text, &name, o)
    }

    /// Parse and validate config text; `name` labels errors.
    pub fn from_toml(
        text: &str,
        name: &str,
        o: &ProxyOverrides,
    ) -> Result<ProxyConfig, ConfigErrors> {
        let doc = TomlDoc::parse(text, name)?;
        let mut issues = Issues::new(Some(&doc));
        let mut file = ProxyFile::from_doc(&doc, &mut issues);
        if !issues.is_empty() {
            return Err(issues.into_errors(name));
        }
        file.apply(o);
        ProxyConfig::validate(&file, o, Some(&doc), name)
    }

    /// Check every rule, collecting all problems.
    pub fn validate(
        f: &ProxyFile,
        o: &ProxyOverrides,
        doc: Option<&TomlDoc<'_>>,
        name: &str,
    ) -> Result<ProxyConfig, ConfigErrors> {
        let mut issues = Issues::new(doc);
        let flag_or = |flag: &str, given: bool, key: &str| {
            if given {
                flag.to_owned()
            } else {
                key.to_owned()
            }
        };

        let listen = parse_addr(
            &f.server.listen,
            &flag_or("--listen", o.listen.is_some(), "server.listen"),
            &mut issues,
        );
        let admin_listen = parse_addr(
            &f.server.admin_listen,
            &flag_or(
                "--admin-listen",
                o.admin_listen.is_some(),
                "server.admin_listen",
            ),
            &mut issues,
        );
        if f.server.shutdown_grace.is_zero() {
            issues.push("server.shutdown_grace", "must be above zero");
        }

        let sources_key = flag_or("--topology", !o.topology.is_empty(), "topology.sources");
        let mut topology_sources = Vec::new();
        if f.topology.sources.is_empty() {
            issues.push(
                sources_key.clone(),
                "no shard map source: give a topology file or coordinator URL",
            );
        }
        for (i, s) in f.topology.sources.iter().enumerate() {
            match parse_topology_source(s) {
                Ok(src) => topology_sources.push(src),
                Err(m) => issues.push(format!("{sources_key}.{i}"), m),
            }
        }
        let files = topology_sources
            .iter()
            .filter(|s| matches!(s, TopologySource::File(_)))
            .count();
        if files > 1 || (files == 1 && topology_sources.len() > 1) {
            issues.push(
                sources_key,
                "give either one topology file or one or more coordinator URLs, not a mix",
            );
        }
        if f.topology.default_upstream_port == 0 {
            issues.push("topology.default_upstream_port", "must be a port above 0");
        }
        for (key, d) in [
            ("topology.watch_timeout", f.topology.watch_timeout),
            ("topology.poll_interval", f.topology.poll_interval),
            ("topology.fetch_timeout", f.topology.fetch_timeout),
        ] {
            if d.is_zero() {
                issues.push(key, "must be above zero");
            }
        }
        if f.topology.max_map_bytes < 1024 {
            issues.push("topology.max_map_bytes", "must be at least 1024");
        }
        let fb = &f.failover_buffer;
        if fb.enabled && (fb.max_wait.is_zero() || fb.max_requests == 0) {
            issues.push(
                "failover_buffer.max_wait",
                "an enabled buffer needs max_wait and max_requests above zero",
            );
        }

        let routing = validate_routing(&f.routing, &mut issues);
        let limits = validate_limits(&f.limits, &mut issues);
        let timeouts = validate_timeouts(&f.timeouts, &mut issues);
        let (retry, budget) = validate_retry(&f.retry, &mut issues);
        let (breaker_config, breaker) = validate_breaker(&f.breaker, &mut issues);
        if f.upstream.pool_idle_timeout.is_zero() {
            issues.push("upstream.pool_idle_timeout", "must be above zero");
        }
        let log = validate_log(&f.log, &mut issues);
        let otlp = validate_telemetry(&f.telemetry, &mut issues);
        let tls = validate_server_tls(&f.tls, &mut issues);
        let admin_tls = admin_tls(&f.server, &mut issues);
        // System roots are only needed (and only checked) when a coordinator is https.
        let https = topology_sources.iter().any(
            |s| matches!(s, TopologySource::Coordinator(u) if u.scheme_str() == Some("https")),
        );
        let t = &f.topology;
        let topology_tls = client_tls(
            "topology",
            [&t.tls_ca, &t.tls_cert, &t.tls_key],
            https,
            &mut issues,
        );
        let u = &f.upstream;
        let upstream_tls = u.tls.then(|| UpstreamTls {
            client: client_tls(
                "upstream",
                [&u.tls_ca, &u.tls_cert, &u.tls_key],
                true,
                &mut issues,
            ),
            server_name: (!f.upstream.tls_server_name.is_empty())
                .then(|| f.upstream.tls_server_name.clone()),
        });
        if !f.upstream.tls_server_name.is_empty()
            && let Err(e) = crate::tls::parse_server_name(&f.upstream.tls_server_name)
        {
            issues.push("upstream.tls_server_name", e.to_string());
        }
        if f.tls.handshake_timeout.is_zero() {
            issues.push("tls.handshake_timeout", "must be above zero");
        }
        let upstream = UpstreamSettings {
            pool: PoolSettings {
                max_idle: f.upstream.pool_max_idle,
                idle_timeout: f.upstream.pool_idle_timeout,
                connect_timeout: timeouts.connect,
            },
            breaker: breaker_config,
            tls: upstream_tls,
        };

        let (Some(listen), Some(admin_listen), Some(routing)) = (listen, admin_listen, routing)
        else {
            return Err(issues.into_errors(name));
        };
        if listen == admin_listen && listen.port() != 0 {
            issues.push("server.admin_listen", "must differ from server.listen");
        }
        let config = ProxyConfig {
            server: ServerConfig {
                listen,
                admin_listen,
                workers: f.server.workers,
                shutdown_grace: f.server.shutdown_grace,
                http2: f.server.http2,
                tls,
                tls_handshake_timeout: f.tls.handshake_timeout,
                admin_tls,
            },
            topology_sources,
            default_upstream_port: f.topology.default_upstream_port,
            runtime: Arc::new(RuntimeConfig {
                routing,
                limits,
                timeouts,
                retry,
                budget,
                breaker,
                upstream,
                access_log_sample: log.access_log_sample,
                max_staleness: (!f.topology.max_staleness.is_zero())
                    .then_some(f.topology.max_staleness),
                failover_buffer: fb.enabled.then_some(FailoverBuffer {
                    max_wait: fb.max_wait,
                    max_requests: fb.max_requests,
                }),
            }),
            watch: WatchConfig {
                watch_timeout: f.topology.watch_timeout,
                poll_interval: f.topology.poll_interval,
                fetch_timeout: f.topology.fetch_timeout,
                max_map_bytes: f.topology.max_map_bytes,
                cache_file: match f.topology.cache_file.as_str() {
                    "" => None,
                    "auto" => default_cache_file(listen, &|name| std::env::var_os(name)),
                    path => Some(PathBuf::from(path)),
                },
                startup_wait: f.topology.startup_wait,
                client_tls: topology_tls,
            },
            log,
            otlp,
        };
        issues.finish(name, config)
    }
}

fn parse_addr(s: &str, key: &str, issues: &mut Issues<'_>) -> Option<SocketAddr> {
    match s.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            issues.push(
                key,
                format!("{s:?} is not an address like 127.0.0.1:8080 or [::1]:8080"),
            );
            None
        }
    }
}

fn validate_server_tls(t: &TlsSection, issues: &mut Issues<'_>) -> Option<crate::tls::ServerTls> {
    if t.cert.is_empty() && t.key.is_empty() {
        if !t.sni.is_empty() || !t.client_ca.is_empty() {
            issues.push(
                "tls.cert",
                "SNI certificates and client_ca need a default cert and key",
            );
        }
        return None;
    }
    if t.cert.is_empty() || t.key.is_empty() {
        issues.push(
            "tls.cert",
            "give both cert and key (or --tls-cert and --tls-key)",
        );
        return None;
    }
    let mut spec = crate::tls::ServerTls::single(&t.cert, &t.key, &t.client_ca);
    spec.sni = t
        .sni
        .iter()
        .map(|e| (e.names.clone(), crate::tls::CertFiles::new(&e.cert, &e.key)))
        .collect();
    checked_server_tls(spec, crate::tls::ALPN_H2_H1, "tls.cert", issues)
}

fn admin_tls(s: &ServerSection, issues: &mut Issues<'_>) -> Option<crate::tls::ServerTls> {
    match (s.admin_tls_cert.is_empty(), s.admin_tls_key.is_empty()) {
        (true, true) => {
            if !s.admin_client_ca.is_empty() {
                issues.push(
                    "server.admin_client_ca",
                    "client certificates need admin_tls_cert and admin_tls_key",
                );
            }
            None
        }
        (false, false) => checked_server_tls(
            crate::tls::ServerTls::single(&s.admin_tls_cert, &s.admin_tls_key, &s.admin_client_ca),
            crate::tls::ALPN_H1,
            "server.admin_tls_cert",
            issues,
        ),
        _ => {
            issues.push(
                "server.admin_tls_cert",
                "give both admin_tls_cert and admin_tls_key",
            );
            None
        }
    }
}

/// Client TLS files for `section`; with `check`, the files are loaded (as
/// connecting would) and problems reported.
fn client_tls(
    section: &str,
    [ca, cert, key]: [&str; 3],
    check: bool,
    issues: &mut Issues<'_>,
) -> crate::tls::ClientTls {
    let spec = crate::tls::ClientTls {
        ca: (!ca.is_empty()).then(|| PathBuf::from(ca)),
        identity: match (cert.is_empty(), key.is_empty()) {
            (true, true) => None,
            (false, false) => Some(crate::tls::CertFiles::new(cert, key)),
            _ => {
                issues.push(
                    format!("{section}.tls_cert"),
                    "give both tls_cert and tls_key",
                );
                None
            }
        },
    };
    if check && let Err(e) = crate::tls::client_config(&spec, crate::tls::ALPN_H1) {
        issues.push(format!("{section}.tls_ca"), e.to_string());
    }
    spec
}

fn validate_routing(r: &RoutingSection, issues: &mut Issues<'_>) -> Option<RoutingConfig> {
    let mut sources = Vec::new();
    if r.key_sources.is_empty() && r.keyless_partition.is_none() {
        issues.push(
            "routing.key_sources",
            "no key source and no keyless_partition: every request would be refused",
        );
    }
    for (i, s) in r.key_sources.iter().enumerate() {
        let key = format!("routing.key_sources.{i}");
        match (&s.header, &s.path, &s.query) {
            (Some(h), None, None) => match HeaderName::from_bytes(h.as_bytes()) {
                Ok(name) => sources.push(KeySource::Header(name)),
                Err(_) => issues.push(key, format!("{h:?} is not a valid header name")),
            },
            (None, Some(p), None) => match PathTemplate::parse(p) {
                Ok(t) => sources.push(KeySource::Path(t)),
                Err(e) => issues.push(key, e.to_string()),
            },
            (None, None, Some(q)) if !q.is_empty() => sources.push(KeySource::Query(q.clone())),
            (None, None, Some(_)) => issues.push(key, "query parameter name is empty"),
            _ => issues.push(key, "give exactly one of header, path or query"),
        }
    }
    if r.max_key_bytes == 0 {
        issues.push("routing.max_key_bytes", "must be above zero");
    }
    let read_preference = r
        .read_preference
        .parse::<ReadPreference>()
        .map_err(|e| issues.push("routing.read_preference", e.to_string()))
        .ok();
    let read_preference_header = if r.allow_read_preference_override {
        HeaderName::from_bytes(r.read_preference_header.as_bytes())
            .map_err(|_| {
                issues.push(
                    "routing.read_preference_header",
                    format!("{:?} is not a valid header name", r.read_preference_header),
                );
            })
            .ok()
    } else {
        None
    };
    Some(RoutingConfig {
        keys: KeyExtractor::new(sources, r.max_key_bytes),
        keyless_partition: r.keyless_partition,
        read_preference: read_preference?,
        read_preference_header,
        expose_upstream: r.expose_upstream,
        max_replica_lag_ms: r
            .max_replica_lag
            .map(|d| d.as_millis().min(u64::MAX as u128) as u64),
    })
}

fn validate_limits(l: &LimitsSection, issues: &mut Issues<'_>) -> Limits {
    if l.max_header_bytes < 1024 {
        issues.push("limits.max_header_bytes", "must be at least 1024");
    }
    for (key, v) in [
        ("limits.max_connections", l.max_connections),
        ("limits.max_inflight", l.max_inflight),
    ] {
        if v == 0 {
            issues.push(key, "must be above zero");
        }
    }
    for (key, d) in [
        ("limits.header_read_timeout", l.header_read_timeout),
        ("limits.idle_timeout", l.idle_timeout),
        ("limits.send_timeout", l.send_timeout),
    ] {
        if d.is_zero() {
            issues.push(key, "must be above zero");
        }
    }
    Limits {
        max_header_bytes: l.max_header_bytes,
        max_body_bytes: l.max_body_bytes,
        max_connections: l.max_connections,
        max_inflight: l.max_inflight,
        max_inflight_per_upstream: l.max_inflight_per_upstream,
        header_read_timeout: l.header_read_timeout,
        idle_timeout: l.idle_timeout,
        send_timeout: l.send_timeout,
        max_memory_bytes: l.max_memory_bytes,
    }
}

fn validate_timeouts(t: &TimeoutsSection, issues: &mut Issues<'_>) -> Timeouts {
    for (key, d) in [
        ("timeouts.connect", t.connect),
        ("timeouts.per_try", t.per_try),
        ("timeouts.overall", t.overall),
    ] {
        if d.is_zero() {
            issues.push(key, "must be above zero");
        }
    }
    if t.per_try > t.overall {
        issues.push("timeouts.per_try", "must not exceed timeouts.overall");
    }
    Timeouts {
        connect: t.connect,
        per_try: t.per_try,
        overall: t.overall,
    }
}

fn check_statuses(key: &str, codes: &[u16], issues: &mut Issues<'_>) -> StatusSet {
    for &c in codes {
        if !(500..=599).contains(&c) {
            issues.push(key, format!("{c} is not a 5xx status"));
        }
    }
    StatusSet::from_codes(codes)
}

fn validate_retry(r: &RetrySection, issues: &mut Issues<'_>) -> (RetryPolicy, BudgetConfig) {
    if r.max_attempts == 0 {
        issues.push(
            "retry.max_attempts",
            "must be at least 1 (1 disables retries)",
        );
    }
    if r.base_delay > r.max_delay {
        issues.push("retry.base_delay", "must not exceed retry.max_delay");
    }
    let jitter = r
        .jitter
        .parse::<Jitter>()
        .map_err(|e| issues.push("retry.jitter", e.to_string()))
        .unwrap_or_default();
    let statuses = check_statuses("retry.on_status", &r.on_status, issues);
    if !(0.0..=10.0).contains(&r.budget_ratio) || r.budget_ratio.is_nan() {
        issues.push("retry.budget_ratio", "must be between 0 and 10");
    }
    if r.budget_window < Duration::from_secs(1) {
        issues.push("retry.budget_window", "must be at least 1s");
    }
    (
        RetryPolicy {
            max_attempts: r.max_attempts.max(1),
            backoff: Backoff {
                base: r.base_delay,
                max: r.max_delay,
                jitter,
            },
            retry_statuses: statuses,
            buffer_limit: r.buffer_bytes,
        },
        BudgetConfig {
            ratio: r.budget_ratio,
            window: r.budget_window,
            min_per_second: r.budget_min_per_second,
        },
    )
}

fn validate_breaker(b: &BreakerSection, issues: &mut Issues<'_>) -> (BreakerConfig, BreakerPolicy) {
    if b.failure_ratio <= 0.0 || b.failure_ratio.is_nan() {
        issues.push(
            "breaker.failure_ratio",
            "must be above 0 (above 1 disables it)",
        );
    }
    if b.window < Duration::from_secs(1) {
        issues.push("breaker.window", "must be at least 1s");
    }
    if b.min_open.is_zero() {
        issues.push("breaker.min_open", "must be above zero");
    }
    if b.min_open > b.max_open {
        issues.push("breaker.min_open", "must not exceed breaker.max_open");
    }
    if b.half_open_probes == 0 {
        issues.push("breaker.half_open_probes", "must be at least 1");
    }
    let failure_statuses = check_statuses("breaker.failure_statuses", &b.failure_statuses, issues);
    let when_all_open = match b.when_all_open.as_str() {
        "fail_fast" => AllOpen::FailFast,
        "fail_open" => AllOpen::FailOpen,
        other => {
            issues.push(
                "breaker.when_all_open",
                format!("{other:?}: expected fail_fast or fail_open"),
            );
            AllOpen::FailFast
        }
    };
    (
        BreakerConfig {
            consecutive_failures: b.consecutive_failures,
            failure_ratio: b.failure_ratio,
            window: b.window,
            min_requests: b.min_requests,
            cool_down: Backoff {
                base: b.min_open,
                max: b.max_open,
                jitter: Jitter::Equal,
            },
            half_open_probes: b.half_open_probes,
        },
        BreakerPolicy {
            failure_statuses,
            when_all_open,
        },
    )
}

/// Check `[telemetry]`: an OTLP endpoint is an http(s) URL with a host.
fn validate_telemetry(t: &TelemetrySection, issues: &mut Issues<'_>) -> Option<OtlpConfig> {
    if t.otlp_endpoint.is_empty() {
        return None;
    }
    if t.otlp_max_queue == 0 {
        issues.push("telemetry.otlp_max_queue", "must be above zero");
    }
    match t.otlp_endpoint.parse::<http::Uri>() {
        Ok(endpoint)
            if matches!(endpoint.scheme_str(), Some("http" | "https"))
                && endpoint.host().is_some() =>
        {
            Some(OtlpConfig {
                endpoint,
                max_queue: t.otlp_max_queue.max(1),
            })
        }
        _ => {
            issues.push(
                "telemetry.otlp_endpoint",
                format!(
                    "{:?}: expected the collector's OTLP/gRPC URL, such as http://127.0.0.1:4317",
                    t.otlp_endpoint
                ),
            );
            None
        }
    }
}

/// Check `[log] level` and `format` (shared by every command's config).
pub(in crate::config) fn parse_log(
    level: &str,
    format: &str,
    issues: &mut Issues<'_>,
) -> LogFormat {
    if tracing_subscriber::EnvFilter::try_new(level).is_err() {
        issues.push("log.level", format!("{level:?} is not a level or filter"));
    }
    match format {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            issues.push("log.format", format!("{other:?}: expected text or json"));
            LogFormat::Text
        }
    }
}

fn validate_log(l: &LogSection, issues: &mut Issues<'_>) -> LogConfig {
    let format = parse_log(&l.level, &l.format, issues);
    if !(0.0..=1.0).contains(&l.access_log_sample) {
        issues.push("log.access_log_sample", "must be between 0 and 1");
    }
    LogConfig {
        level: l.level.clone(),
        format,
        access_log_sample: l.access_log_sample.clamp(0.0, 1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<ProxyConfig, ConfigErrors> {
        ProxyConfig::from_toml(text, "t.toml", &ProxyOverrides::default())
    }

    const MIN: &str = "[topology]\nsources = [\"map.json\"]\n";

    #[test]
    fn defaults_are_valid_and_documented_values_hold() {
        let c = load(MIN).unwrap();
        assert_eq!(c.server.admin_listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.runtime.routing.keys.sources().len(), 3);
        assert_eq!(
            c.runtime.routing.read_preference,
            ReadPreference::PrimaryPreferred
        );
        assert_eq!(c.runtime.retry.max_attempts, 3);
        assert_eq!(c.runtime.retry.buffer_limit, 64 * 1024);
        assert_eq!(c.runtime.budget.ratio, 0.2);
        assert_eq!(c.runtime.upstream.breaker.consecutive_failures, 5);
    }

    #[test]
    fn flags_override_the_file() {
        let o = ProxyOverrides {
            listen: Some("127.0.0.1:0".into()),
            topology: vec!["other.json".into()],
            ..Default::default()
        };
        let c = ProxyConfig::from_toml(MIN, "t.toml", &o).unwrap();
        assert_eq!(c.server.listen.port(), 0);
        assert_eq!(
            c.topology_sources,
            vec![TopologySource::File("other.json".into())]
        );
    }

    #[test]
    fn unusable_tls_files_are_config_errors_naming_the_key_and_file() {
        let text = format!(
            "{MIN}\n[tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n\
             [upstream]\ntls = true\ntls_ca = \"/nonexistent/ca.pem\"\ntls_server_name = \"bad name!\"\n"
        );
        let e = ProxyConfig::from_toml(&text, "t.toml", &ProxyOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tls.cert") && e.contains("/nonexistent/cert.pem"),
            "{e}"
        );
        assert!(
            e.contains("upstream.tls_ca") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        assert!(e.contains("upstream.tls_server_name"), "{e}");
        let half = format!("{MIN}\n[tls]\ncert = \"c.pem\"\n");
        let e = ProxyConfig::from_toml(&half, "t.toml", &ProxyOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("give both cert and key"), "{e}");
    }

    #[test]
    fn bad_flags_are_named_as_flags() {
        let o = ProxyOverrides {
            listen: Some("nope".into()),
            ..Default::default()
        };
        let err = ProxyConfig::from_toml(MIN, "t.toml", &o).unwrap_err();
        assert_eq!(err.issues[0].key, "--listen");
    }

    #[test]
    fn every_semantic_problem_is_listed_with_its_line() {
        let text = r#"
[topology]
sources = ["map.json"]
[timeouts]
per_try = "40s"
[retry]
jitter = "wobbly"
on_status = [404]
[routing]
read_preference = "closest"
key_sources = [{ header = "x-k", query = "k" }]
"#;
        let err = load(text).unwrap_err();
        let keys: Vec<_> = err.issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "timeouts.per_try",
                "retry.jitter",
                "retry.on_status",
                "routing.read_preference",
                "routing.key_sources.0"
            ],
            "{err}"
        );
        assert!(err.issues.iter().all(|i| i.location.is_some()));
    }

    #[test]
    fn unknown_keys_and_bad_types_are_errors() {
        let err =
            load("[limits]\nmax_body = 1\n[timeouts]\nconnect = 5\n[nonsense]\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("t.toml:2:1: limits.max_body: unknown key"),
            "{text}"
        );
        assert!(text.contains("timeouts"), "{text}");
        assert!(text.contains("nonsense: unknown section"), "{text}");
    }

    #[test]
    fn file_and_coordinator_sources_do_not_mix() {
        let err =
            load("[topology]\nsources = [\"a.json\", \"http://127.0.0.1:7400\"]\n").unwrap_err();
        assert!(err.to_string().contains("not a mix"));
        let c =
            load("[topology]\nsources = [\"http://127.0.0.1:7400\", \"http://127.0.0.2:7400\"]\n")
                .unwrap();
        assert_eq!(c.topology_sources.len(), 2);
    }
}
