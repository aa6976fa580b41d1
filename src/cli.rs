//! Command-line interface (SPEC §1): argument definitions and the commands
//! that need no long-running runtime.

use crate::config::{ConfigErrors, ProxyConfig, ProxyOverrides, TomlDoc};
use crate::topology::{ShardMap, key_position};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};

/// shardgate: a layer-7 sharding proxy and its control plane.
#[derive(Debug, Parser)]
#[command(name = "shardgate", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the data plane.
    Proxy(ProxyArgs),
    /// Print, per key: key, hash (8 hex digits), partition index, primary.
    Route(RouteArgs),
    /// Validate a proxy config or a topology file.
    CheckConfig(CheckArgs),
}

/// `shardgate proxy` flags; each overrides the config file.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Config file (TOML); built-in defaults when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Client-facing listen address.
    #[arg(long)]
    pub listen: Option<String>,
    /// Admin listen address.
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// Topology file, or coordinator URLs (repeat or comma-separate).
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    pub topology: Vec<String>,
}

impl ProxyArgs {
    /// The flags as config overrides.
    pub fn overrides(&self) -> ProxyOverrides {
        ProxyOverrides {
            listen: self.listen.clone(),
            admin_listen: self.admin_listen.clone(),
            topology: self.topology.clone(),
        }
    }
}

/// `shardgate route` arguments.
#[derive(Debug, Args)]
pub struct RouteArgs {
    /// Topology file.
    #[arg(long)]
    pub topology: PathBuf,
    /// Keys to route.
    #[arg(required = true)]
    pub keys: Vec<String>,
}

/// `shardgate check-config` arguments.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Proxy config (.toml) or topology (.json).
    pub file: PathBuf,
}

/// A command's input was unusable (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// A config file broke rules.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// A topology file broke rules.
    #[error("{0}")]
    Topology(#[from] crate::proxy::TopologyFileError),
    /// Anything else about the input.
    #[error("{0}")]
    Other(String),
}

/// `shardgate route`: where each key goes under a topology file.
pub fn route(args: &RouteArgs, out: &mut impl Write) -> Result<(), InputError> {
    let map = crate::proxy::read_topology_file(&args.topology)?;
    for key in &args.keys {
        let pos = key_position(key.as_bytes());
        let p = map.partition_for(pos);
        writeln!(out, "{key}\t{pos:08x}\t{}\t{}", p.index, p.primary)
            .map_err(|e| InputError::Other(e.to_string()))?;
    }
    Ok(())
}

/// `shardgate check-config`: validate and summarise, or list every problem.
pub fn check_config(path: &Path) -> Result<String, InputError> {
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_json {
        let map = crate::proxy::read_topology_file(path)?;
        return Ok(summarise_map(path, &map));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| InputError::Other(format!("{}: cannot read: {e}", path.display())))?;
    let name = path.display().to_string();
    // Reject syntax errors before guessing the file's kind.
    TomlDoc::parse(&text, &name)?;
    let config = ProxyConfig::from_toml(&text, &name, &ProxyOverrides::default())?;
    Ok(format!(
        "{name}: valid proxy config: listen {}, admin {}, {} key source(s), topology from {}",
        config.server.listen,
        config.server.admin_listen,
        config.runtime.routing.keys.sources().len(),
        config
            .topology_sources
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

fn summarise_map(path: &Path, map: &ShardMap) -> String {
    let nodes: std::collections::HashSet<_> =
        map.partitions().iter().flat_map(|p| p.nodes()).collect();
    format!(
        "{}: valid topology: epoch {}, {} partition(s), {} node(s), master {}",
        path.display(),
        map.epoch(),
        map.partitions().len(),
        nodes.len(),
        map.master_node_id()
    )
}
