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
}

impl AgentConfig {
    /// Validate the agent's flags.
    pub fn from_flags(f: &AgentFlags) -> Result<AgentConfig, ConfigErrors> {
        let mut issues = Issues::new(None);
        let ip =
            f.ip.parse()
                .map_err(|e| issues.push("--ip", format!("{:?}: {e}", f.ip)))
                .ok();
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
        };
        issues.finish("flags", config)
    }
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
