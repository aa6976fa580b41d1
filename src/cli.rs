//! Command-line interface (SPEC §1): argument definitions and the commands
//! that need no long-running runtime.

use clap::{Args, Parser, Subcommand};
use shardgate::config::{ConfigErrors, ProxyConfig, ProxyOverrides, TomlDoc};
use shardgate::topology::{ShardMap, key_position};
use std::io::Write;
use std::path::{Path, PathBuf};

/// shardgate: a layer-7 sharding proxy and its control plane.
#[derive(Debug, Parser)]
#[command(name = "shardgate", version, about)]
pub(crate) struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the data plane.
    Proxy(ProxyArgs),
    /// Print, per key: key, hash (8 hex digits), partition index, primary.
    Route(RouteArgs),
    /// Validate a proxy config, a coordinator config or a topology file.
    CheckConfig(CheckArgs),
    /// Run the control plane.
    Coordinator(CoordinatorArgs),
    /// Run the heartbeat sidecar beside a shard node.
    Agent(AgentArgs),
    /// Run a whole cluster on loopback and print what to try.
    Demo(DemoArgs),
    /// Run the reference shard node (a replicated key-value store) and its agent.
    Node(NodeArgs),
    /// Print a cluster's state as a coordinator or a proxy sees it.
    Status(StatusArgs),
    /// Check that a whole shardgate command line (what a unit, a manifest or
    /// a compose file runs) is accepted, its flags and config included,
    /// without running it: `shardgate check-command -- proxy --config F`.
    #[command(hide = true, name = "check-command")]
    CheckLine(CheckCommandArgs),
}

/// `shardgate check-command` arguments.
#[derive(Debug, Args)]
pub(crate) struct CheckCommandArgs {
    /// The command line, after `shardgate`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub line: Vec<String>,
}

/// Parse `line` as `shardgate` would and validate what the command would
/// validate at start-up; a summary, or every problem.
pub(crate) fn check_command(line: &[String]) -> Result<String, InputError> {
    let cli =
        Cli::try_parse_from(std::iter::once("shardgate".to_owned()).chain(line.iter().cloned()))
            .map_err(|e| InputError::Other(e.to_string()))?;
    let what = match &cli.command {
        Command::Proxy(a) => {
            ProxyConfig::load(a.config.as_deref(), &a.overrides())?;
            "proxy"
        }
        Command::Coordinator(a) => {
            shardgate::config::CoordinatorConfig::load(a.config.as_deref(), &a.overrides())?;
            "coordinator"
        }
        Command::Agent(a) => {
            shardgate::agent::AgentConfig::from_flags(&a.flags())?;
            "agent"
        }
        Command::Node(a) => {
            shardgate::node::NodeConfig::from_flags(&a.flags())?;
            "node"
        }
        Command::CheckConfig(a) => {
            check_config(&a.file)?;
            "check-config"
        }
        Command::Route(_) => "route",
        Command::Demo(_) => "demo",
        Command::Status(_) => "status",
        Command::CheckLine(_) => "check-command",
    };
    Ok(format!("{what}: command line accepted"))
}

/// `shardgate status` flags.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("from").required(true).args(["coordinator", "admin"])))]
pub(crate) struct StatusArgs {
    /// A coordinator's HTTP URL: its map, nodes and replication.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// A proxy's admin URL: the map it routes by and its upstreams.
    #[arg(long)]
    pub admin: Option<String>,
    /// Print the JSON read, for scripts.
    #[arg(long)]
    pub json: bool,
}

/// `shardgate demo` flags.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Proxy listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Proxy admin listen address.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub admin_listen: std::net::SocketAddr,
    /// Coordinator HTTP listen address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub coordinator_http: std::net::SocketAddr,
    /// Coordinator gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:7401")]
    pub coordinator_grpc: std::net::SocketAddr,
}

/// `shardgate node` flags.
#[derive(Debug, Args)]
pub(crate) struct NodeArgs {
    /// Node id.
    #[arg(long)]
    pub id: String,
    /// Listen address (also the node's address in the map); port 0 picks one.
    #[arg(long)]
    pub listen: String,
    /// Write the bound address here once listening (for port 0).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Coordinator gRPC address (`host:port`, `http://` or `https://`).
    #[arg(long)]
    pub coordinator: String,
    /// When a write is acknowledged: once a majority of the partition's
    /// members applied it (`majority`), or once the primary did (`async`).
    #[arg(long, default_value = "majority")]
    pub write_quorum: String,
    /// Seconds a write may wait for its quorum before `503 no_quorum`.
    #[arg(long, default_value_t = 2.0)]
    pub write_timeout: f64,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 0.5)]
    pub interval: f64,
    /// Heartbeat bearer token, if the coordinator requires one.
    #[arg(long, env = "SHARDGATE_HEARTBEAT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Most keys held.
    #[arg(long, default_value_t = 100_000)]
    pub max_keys: usize,
    /// Most bytes of keys and values held.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_bytes: u64,
    /// Tests only: shift this node's wall clock by this many milliseconds.
    #[arg(long, default_value_t = 0, hide = true, allow_hyphen_values = true)]
    pub clock_offset_ms: i64,
    /// Tests only: wait this many milliseconds before applying each
    /// replication message, so this replica lags.
    #[arg(long, default_value_t = 0, hide = true)]
    pub apply_delay_ms: u64,
}

impl NodeArgs {
    /// The flags as plain data, for `config` to validate.
    pub(crate) fn flags(&self) -> shardgate::config::NodeFlags {
        shardgate::config::NodeFlags {
            id: self.id.clone(),
            listen: self.listen.clone(),
            addr_file: self.addr_file.clone(),
            coordinator: self.coordinator.clone(),
            write_quorum: self.write_quorum.clone(),
            write_timeout: self.write_timeout,
            interval: self.interval,
            token: self.token.clone(),
            clock_offset_ms: self.clock_offset_ms,
            apply_delay_ms: self.apply_delay_ms,
            max_keys: self.max_keys,
            max_bytes: self.max_bytes,
        }
    }
}

/// `shardgate coordinator` flags; each overrides the config file.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct CoordinatorArgs {
    /// Instead of running: a one-off task on the stores.
    #[command(subcommand)]
    pub action: Option<CoordinatorAction>,
    /// Config file (TOML); built-in defaults when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This coordinator's id (overrides `coordinator.id`): coordinators that
    /// share a store need one each, e.g. their pod names.
    #[arg(long)]
    pub id: Option<String>,
    /// HTTP API listen address.
    #[arg(long)]
    pub http_listen: Option<String>,
    /// gRPC listen address.
    #[arg(long)]
    pub grpc_listen: Option<String>,
    /// Map to start from when the store is empty.
    #[arg(long)]
    pub topology: Option<String>,
    /// `file:PATH`, `postgres://...` or `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`.
    #[arg(long)]
    pub store: Option<String>,
    /// Seconds of silence before a node is DEAD.
    #[arg(long)]
    pub heartbeat_timeout: Option<f64>,
    /// Seconds between liveness sweeps.
    #[arg(long)]
    pub sweep_interval: Option<f64>,
    /// Serve both listeners over TLS with this certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<String>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<String>,
    /// Accept unauthenticated heartbeats on a gRPC listener reachable beyond
    /// this machine (by default such a coordinator refuses to start).
    #[arg(long)]
    pub insecure_heartbeats: bool,
}

/// One-off coordinator tasks.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum CoordinatorAction {
    /// Copy the cluster state, epoch and all, from one store into an empty
    /// one (e.g. a state file into etcd), with the coordinators stopped.
    MigrateStore {
        /// The store to copy from.
        #[arg(long)]
        from: String,
        /// The empty store to copy into.
        #[arg(long)]
        to: String,
    },
}

impl CoordinatorArgs {
    /// The flags as config overrides.
    pub(crate) fn overrides(&self) -> shardgate::config::CoordinatorOverrides {
        shardgate::config::CoordinatorOverrides {
            id: self.id.clone(),
            http_listen: self.http_listen.clone(),
            grpc_listen: self.grpc_listen.clone(),
            topology: self.topology.clone(),
            store: self.store.clone(),
            heartbeat_timeout: self.heartbeat_timeout,
            sweep_interval: self.sweep_interval,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            insecure_heartbeats: self.insecure_heartbeats,
        }
    }
}

/// `shardgate agent` flags.
#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// Coordinator gRPC address (`host:port` or `http://host:port`).
    #[arg(long)]
    pub coordinator: String,
    /// This node's stable name.
    #[arg(long)]
    pub node_id: String,
    /// This node's address as the map writes it (`ip` or `ip:port`); with
    /// `--gate-listen`, the gate's address (the default).
    #[arg(long, required_unless_present = "gate_listen")]
    pub ip: Option<String>,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 5.0)]
    pub interval: f64,
    /// Local health check URL; heartbeats pause while it does not answer 2xx.
    #[arg(long)]
    pub check_url: Option<String>,
    /// The node's replication status URL (`GET /_shardgate/status`, SPEC §7),
    /// reported in every heartbeat.
    #[arg(long)]
    pub status_url: Option<String>,
    /// Heartbeat bearer token, if the coordinator requires one.
    #[arg(long, env = "SHARDGATE_HEARTBEAT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Verify an `https://` coordinator against this CA (PEM) instead of the system roots.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) to present to the coordinator (mTLS).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Front the node as a gate on this address (SPEC §8): writes pass only
    /// while the node is primary under a valid lease and the request's
    /// epoch is not older than the node's. The map names the gate.
    #[arg(long, requires = "node")]
    pub gate_listen: Option<String>,
    /// The node the gate fronts: `http://IP:PORT`.
    #[arg(long, requires = "gate_listen")]
    pub node: Option<String>,
    /// Seconds a request may take at the node, through the gate.
    #[arg(long, default_value_t = 60.0)]
    pub gate_timeout: f64,
    /// Write the gate's bound address here once it listens (for port 0).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Shell command run when the node becomes primary (SHARDGATE_ROLE,
    /// SHARDGATE_PARTITION, SHARDGATE_EPOCH in its environment; 30 s limit).
    #[arg(long)]
    pub on_promote: Option<String>,
    /// Shell command run when the node stops being primary.
    #[arg(long)]
    pub on_demote: Option<String>,
}

impl AgentArgs {
    /// The flags as plain data, for `config` to validate.
    pub(crate) fn flags(&self) -> shardgate::config::AgentFlags {
        shardgate::config::AgentFlags {
            coordinator: self.coordinator.clone(),
            node_id: self.node_id.clone(),
            ip: self.ip.clone().unwrap_or_default(),
            interval: self.interval,
            check_url: self.check_url.clone(),
            status_url: self.status_url.clone(),
            token: self.token.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            gate_listen: self.gate_listen.clone(),
            node: self.node.clone(),
            gate_timeout: self.gate_timeout,
            addr_file: self.addr_file.clone(),
            on_promote: self.on_promote.clone(),
            on_demote: self.on_demote.clone(),
        }
    }
}

/// `shardgate proxy` flags; each overrides the config file.
#[derive(Debug, Args)]
pub(crate) struct ProxyArgs {
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
    /// Serve TLS with this certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<String>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<String>,
}

impl ProxyArgs {
    /// The flags as config overrides.
    pub(crate) fn overrides(&self) -> ProxyOverrides {
        ProxyOverrides {
            listen: self.listen.clone(),
            admin_listen: self.admin_listen.clone(),
            topology: self.topology.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
        }
    }
}

/// `shardgate route` arguments.
#[derive(Debug, Args)]
pub(crate) struct RouteArgs {
    /// Topology file.
    #[arg(long)]
    pub topology: PathBuf,
    /// Keys to route.
    #[arg(required = true)]
    pub keys: Vec<String>,
}

/// `shardgate check-config` arguments.
#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// Proxy config (.toml) or topology (.json).
    pub file: PathBuf,
}

/// A command's input was unusable (exit 1).
#[derive(Debug, thiserror::Error)]
pub(crate) enum InputError {
    /// A config file broke rules.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// A topology file broke rules.
    #[error("{0}")]
    Topology(#[from] shardgate::topology::TopologyFileError),
    /// Anything else about the input.
    #[error("{0}")]
    Other(String),
}

/// `shardgate route`: where each key goes under a topology file.
pub(crate) fn route(args: &RouteArgs, out: &mut impl Write) -> Result<(), InputError> {
    let map = shardgate::topology::read_topology_file(&args.topology)?;
    for key in &args.keys {
        let pos = key_position(key.as_bytes());
        let p = map.partition_for(pos);
        writeln!(out, "{key}\t{pos:08x}\t{}\t{}", p.index, p.primary)
            .map_err(|e| InputError::Other(e.to_string()))?;
    }
    Ok(())
}

/// `shardgate check-config`: validate and summarise, or list every problem.
pub(crate) fn check_config(path: &Path) -> Result<String, InputError> {
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_json {
        let map = shardgate::topology::read_topology_file(path)?;
        return Ok(summarise_map(path, &map));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| InputError::Other(format!("{}: cannot read: {e}", path.display())))?;
    let name = path.display().to_string();
    // Reject syntax errors before guessing the file's kind.
    let doc = TomlDoc::parse(&text, &name)?;
    if doc.has("coordinator") {
        let c = shardgate::config::CoordinatorConfig::from_toml(&text, &name, &Default::default())?;
        return Ok(format!(
            "{name}: valid coordinator config: id {}, http {}, grpc {}, store {:?}, \
             heartbeat timeout {:?}, lease {:?}",
            c.id, c.http_listen, c.grpc_listen, c.store, c.heartbeat_timeout, c.lease
        ));
    }
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
