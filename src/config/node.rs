//! `shardgate node` settings: its flags as given, validated into
//! `node::NodeConfig`. Every problem is reported, each by its flag.

use super::agent::AgentFlags;
use super::load::{ConfigErrors, Issues};
use crate::agent::AgentConfig;
use crate::node::{NodeConfig, WriteQuorum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The node's flags, as given on the command line.
#[derive(Clone, Debug, Default)]
pub struct NodeFlags {
    /// `--id`
    pub id: String,
    /// `--listen`
    pub listen: String,
    /// `--addr-file`
    pub addr_file: Option<PathBuf>,
    /// `--coordinator`
    pub coordinator: String,
    /// `--write-quorum`
    pub write_quorum: String,
    /// `--write-timeout`, seconds.
    pub write_timeout: f64,
    /// `--interval`, seconds between heartbeats.
    pub interval: f64,
    /// `--token` (or `SHARDGATE_HEARTBEAT_TOKEN`)
    pub token: Option<String>,
    /// `--clock-offset-ms` (tests only)
    pub clock_offset_ms: i64,
    /// `--apply-delay-ms` (tests only)
    pub apply_delay_ms: u64,
    /// `--max-keys`
    pub max_keys: usize,
    /// `--max-bytes`
    pub max_bytes: u64,
}

impl NodeConfig {
    /// Validate the node's flags.
    pub fn from_flags(f: &NodeFlags) -> Result<NodeConfig, ConfigErrors> {
        let mut issues = Issues::new(None);
        let listen: Option<SocketAddr> = f
            .listen
            .parse()
            .map_err(|e| issues.push("--listen", format!("{:?}: {e}", f.listen)))
            .ok();
        let write_quorum: Option<WriteQuorum> = f
            .write_quorum
            .parse()
            .map_err(|e: String| issues.push("--write-quorum", e))
            .ok();
        if !(f.write_timeout.is_finite() && f.write_timeout > 0.0 && f.write_timeout <= 600.0) {
            issues.push("--write-timeout", "must be seconds between 0 and 600");
        }
        if f.clock_offset_ms.unsigned_abs() > 3_600_000 {
            issues.push("--clock-offset-ms", "must be within an hour");
        }
        if f.max_keys == 0 || f.max_bytes == 0 {
            issues.push("--max-keys", "--max-keys and --max-bytes must be above 0");
        }
        // The agent's own checks, with the node's address filled in once bound.
        let agent = AgentConfig::from_flags(&AgentFlags {
            coordinator: f.coordinator.clone(),
            node_id: f.id.clone(),
            ip: "127.0.0.1:1".into(),
            interval: f.interval,
            token: f.token.clone(),
            ..AgentFlags::default()
        })
        .map_err(|e| {
            for i in e.issues {
                issues.push(
                    if i.key == "--node-id" { "--id" } else { &i.key },
                    i.message,
                );
            }
        })
        .ok();
        let (Some(listen), Some(write_quorum), Some(agent)) = (listen, write_quorum, agent) else {
            return Err(issues.into_errors("flags"));
        };
        let config = NodeConfig {
            id: f.id.clone(),
            listen,
            addr_file: f.addr_file.clone(),
            agent,
            write_quorum,
            write_timeout: Duration::from_secs_f64(f.write_timeout.clamp(0.001, 600.0)),
            clock_offset_ms: f.clock_offset_ms,
            apply_delay: Duration::from_millis(f.apply_delay_ms.min(60_000)),
            max_keys: f.max_keys,
            max_bytes: f.max_bytes,
        };
        issues.finish("flags", config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> NodeFlags {
        NodeFlags {
            id: "n1".into(),
            listen: "127.0.0.1:0".into(),
            coordinator: "127.0.0.1:7401".into(),
            write_quorum: "majority".into(),
            write_timeout: 2.0,
            interval: 0.5,
            max_keys: 10,
            max_bytes: 10,
            ..NodeFlags::default()
        }
    }

    #[test]
    fn good_flags_make_a_config() {
        let c = NodeConfig::from_flags(&flags()).unwrap();
        assert_eq!(c.write_quorum, WriteQuorum::Majority);
        assert_eq!(c.agent.interval, Duration::from_millis(500));
        assert_eq!(c.agent.node_id, "n1");
    }

    #[test]
    fn every_bad_flag_is_named() {
        let f = NodeFlags {
            id: String::new(),
            listen: "nowhere".into(),
            write_quorum: "all".into(),
            write_timeout: -1.0,
            ..flags()
        };
        let err = NodeConfig::from_flags(&f).unwrap_err();
        let keys: Vec<&str> = err.issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            ["--listen", "--write-quorum", "--write-timeout", "--id"],
            "{err}"
        );
    }
}
