//! `shardgate agent` settings: its flags as given, validated into
//! `agent::AgentConfig`. Every problem is reported, each by its flag.

use super::load::{ConfigErrors, Issues};
use crate::agent::{AgentConfig, coordinator_uri};
use crate::tls::{ALPN_H2, CertFiles, ClientTls, client_config};
use std::path::PathBuf;
use std::time::Duration;

/// The agent's flags, as given on the command line.
#[derive(Clone, Debug, Default)]
pub struct AgentFlags {
    /// `--coordinator`: `host:port`, `http://host:port` or `https://host:port`.
    pub coordinator: String,
    /// `--node-id`
    pub node_id: String,
    /// `--ip`: the node's address as the map writes it.
    pub ip: String,
    /// `--interval`, seconds.
    pub interval: f64,
    /// `--check-url`
    pub check_url: Option<String>,
    /// `--status-url`
    pub status_url: Option<String>,
    /// `--token` (or `SHARDGATE_HEARTBEAT_TOKEN`)
    pub token: Option<String>,
    /// `--tls-ca`
    pub tls_ca: Option<PathBuf>,
    /// `--tls-cert`
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`
    pub tls_key: Option<PathBuf>,
    /// `--gate-listen`: front the node as a gate on this address.
    pub gate_listen: Option<String>,
    /// `--node`: the node the gate fronts (`http://ip:port`).
    pub node: Option<String>,
    /// `--gate-timeout`, seconds.
    pub gate_timeout: f64,
    /// `--addr-file`
    pub addr_file: Option<PathBuf>,
    /// `--on-promote`
    pub on_promote: Option<String>,
    /// `--on-demote`
    pub on_demote: Option<String>,
}

impl AgentConfig {
    /// Validate the agent's flags.
    pub fn from_flags(f: &AgentFlags) -> Result<AgentConfig, ConfigErrors> {
        let mut issues = Issues::new(None);
        let gate = gate(f, &mut issues);
        // A gate's address is the node's in the map: --ip may be left out.
        let ip = match (&gate, f.ip.is_empty()) {
            (Some(g), true) => Some(crate::topology::NodeAddr {
                ip: g.listen.ip(),
                port: Some(g.listen.port()),
            }),
            _ => {
                f.ip.parse()
                    .map_err(|e| issues.push("--ip", format!("{:?}: {e}", f.ip)))
                    .ok()
            }
        };
        for (flag, hook) in [
            ("--on-promote", &f.on_promote),
            ("--on-demote", &f.on_demote),
        ] {
            if hook.as_ref().is_some_and(|h| h.trim().is_empty()) {
                issues.push(flag, "must be a command");
            }
        }
        if f.node_id.trim().is_empty() {
            issues.push("--node-id", "must not be empty");
        }
        if !(f.interval.is_finite() && f.interval > 0.0 && f.interval <= 3600.0) {
            issues.push("--interval", "must be seconds between 0 and 3600");
        }
        let check_url = http_url(f.check_url.as_deref(), "--check-url", &mut issues);
        let status_url = http_url(f.status_url.as_deref(), "--status-url", &mut issues);
        let coordinator = coordinator_uri(&f.coordinator)
            .map_err(|e| issues.push("--coordinator", e.to_string()))
            .ok();
        let tls = ClientTls {
            ca: f.tls_ca.clone(),
            identity: match (&f.tls_cert, &f.tls_key) {
                (Some(cert), Some(key)) => Some(CertFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                (None, None) => None,
                _ => {
                    issues.push("--tls-cert", "give both --tls-cert and --tls-key");
                    None
                }
            },
        };
        let https = coordinator
            .as_ref()
            .is_some_and(|c| c.scheme_str() == Some("https"));
        if !https && (tls.ca.is_some() || tls.identity.is_some()) {
            issues.push(
                "--tls-ca",
                "--tls-ca/--tls-cert need an https:// --coordinator",
            );
        }
        if https && let Err(e) = client_config(&tls, ALPN_H2) {
            issues.push("--tls-ca", format!("coordinator TLS: {e}"));
        }
        let (Some(ip), Some(coordinator)) = (ip, coordinator) else {
            return Err(issues.into_errors("flags"));
        };
        let config = AgentConfig {
            coordinator,
            tls,
            node_id: f.node_id.clone(),
            ip,
            interval: Duration::from_secs_f64(f.interval.clamp(0.001, 3600.0)),
            check_url,
            status_url,
            token: f.token.clone().filter(|t| !t.is_empty()).map(Into::into),
            gate,
            addr_file: f.addr_file.clone(),
            on_promote: f.on_promote.clone(),
            on_demote: f.on_demote.clone(),
        };
        issues.finish("flags", config)
    }
}

/// `--gate-listen`, `--node` and `--gate-timeout`, checked together.
fn gate(f: &AgentFlags, issues: &mut Issues) -> Option<crate::gate::GateConfig> {
    let listen = f.gate_listen.as_deref()?;
    let listen = listen
        .parse()
        .map_err(|e| issues.push("--gate-listen", format!("{listen:?}: {e}")))
        .ok();
    let node = match f.node.as_deref() {
        None => {
            issues.push(
                "--node",
                "a gate needs the node it fronts: --node http://IP:PORT",
            );
            None
        }
        Some(n) => {
            let addr = n.strip_prefix("http://").unwrap_or(n).trim_end_matches('/');
            addr.parse()
                .map_err(|e| issues.push("--node", format!("{n:?}: expected http://IP:PORT ({e})")))
                .ok()
        }
    };
    if !(f.gate_timeout.is_finite() && f.gate_timeout > 0.0 && f.gate_timeout <= 3600.0) {
        issues.push("--gate-timeout", "must be seconds between 0 and 3600");
    }
    Some(crate::gate::GateConfig {
        listen: listen?,
        node: node?,
        timeout: Duration::from_secs_f64(f.gate_timeout.clamp(0.001, 3600.0)),
    })
}

/// An `http://` URL flag, checked.
fn http_url(given: Option<&str>, flag: &str, issues: &mut Issues) -> Option<http::Uri> {
    let u = given?;
    match u.parse::<http::Uri>() {
        Ok(uri) if uri.scheme_str() == Some("http") && uri.authority().is_some() => Some(uri),
        Ok(_) => {
            issues.push(flag, format!("{u:?}: must be an http:// URL"));
            None
        }
        Err(e) => {
            issues.push(flag, format!("{u:?}: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> AgentFlags {
        AgentFlags {
            coordinator: "127.0.0.1:7401".into(),
            node_id: "n1".into(),
            ip: "10.0.0.1:8080".into(),
            interval: 5.0,
            ..AgentFlags::default()
        }
    }

    #[test]
    fn good_flags_make_a_config() {
        let c = AgentConfig::from_flags(&flags()).unwrap();
        assert_eq!(c.coordinator.to_string(), "http://127.0.0.1:7401/");
        assert_eq!(c.interval, Duration::from_secs(5));
        assert_eq!(c.ip.to_string(), "10.0.0.1:8080");
    }

    #[test]
    fn every_bad_flag_is_named() {
        let f = AgentFlags {
            ip: "db.local".into(),
            node_id: " ".into(),
            interval: 0.0,
            check_url: Some("ftp://x/".into()),
            tls_ca: Some("/nonexistent/ca.pem".into()),
            ..flags()
        };
        let err = AgentConfig::from_flags(&f).unwrap_err();
        let keys: Vec<&str> = err.issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            ["--ip", "--node-id", "--interval", "--check-url", "--tls-ca"],
            "{err}"
        );
    }
}
