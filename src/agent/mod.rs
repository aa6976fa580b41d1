//! `shardgate agent`: the heartbeat sidecar beside each shard node (SPEC §4).
//!
//! Every interval it reports the node's CPU, free memory and TCP connections.
//! With a check URL it stays silent while the local service is unhealthy, so
//! the coordinator sees the node as dead. It backs off (jittered) while the
//! coordinator is unreachable and exits with `TERMINATED` when told to stop.

mod sysinfo;

pub use sysinfo::{Sample, Sampler};

use crate::clock::{Hlc, HlcClock};
use crate::gate::{Gate, GateConfig};
use crate::lease::Lease;
use crate::proto::cluster_discovery_service_client::ClusterDiscoveryServiceClient;
use crate::proto::heartbeat_response::Command as WireCommand;
use crate::proto::{
    Assignment as WireAssignment, HeartbeatRequest, HeartbeatResponse, ReplicationStatus,
    ResourceUsage,
};
use crate::replication::{ReplicaState, ReplicationReport, Role};
use crate::resilience::{Backoff, Jitter};
use crate::secret::Secret;
use crate::tls::ClientTls;
use crate::topology::NodeAddr;
use http::Uri;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Exit code when the coordinator says TERMINATE.
pub const TERMINATED: u8 = 3;

/// Agent settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Coordinator gRPC endpoint, `http://host:port` or `https://host:port`.
    pub coordinator: Uri,
    /// For an `https` coordinator: roots to verify it, identity to present.
    pub tls: ClientTls,
    /// This node's stable name.
    pub node_id: String,
    /// This node's address, as the map writes it.
    pub ip: NodeAddr,
    /// Time between heartbeats.
    pub interval: Duration,
    /// Local health check; heartbeats pause while it fails.
    pub check_url: Option<Uri>,
    /// Bearer token for heartbeats, if the coordinator requires one.
    pub token: Option<Secret>,
    /// The node's status endpoint (`GET /_shardgate/status`, SPEC §7), whose
    /// answer the heartbeat carries.
    pub status_url: Option<Uri>,
    /// Front the node as a gate (SPEC §8); the map then names the gate.
    pub gate: Option<GateConfig>,
    /// Write the gate's bound address here once it listens (for port 0).
    pub addr_file: Option<std::path::PathBuf>,
    /// Run when the node becomes its partition's primary.
    pub on_promote: Option<String>,
    /// Run when it stops being primary (demoted, removed or fenced).
    pub on_demote: Option<String>,
}

/// Longest a role hook may run before it is killed.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the coordinator's map places this node, as a heartbeat answer says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The map's epoch.
    pub epoch: u64,
    /// The node's partition and role; `None` while the map does not name it.
    pub partition: Option<u32>,
    /// Its role.
    pub role: Role,
    /// The partition's primary.
    pub primary: Option<NodeAddr>,
    /// The partition's replicas.
    pub replicas: Vec<NodeAddr>,
}

/// What a node that runs its agent in-process shares with it.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Reads the node's replication status for each heartbeat.
    pub report: Option<Arc<dyn Fn() -> ReplicationReport + Send + Sync>>,
    /// The node's clock, advanced by the coordinator's HLC in every answer.
    pub clock: Option<Arc<HlcClock>>,
    /// Told every placement the coordinator answers with.
    pub placement: Option<watch::Sender<Option<Placement>>>,
    /// The node's lease: renewed from each answer that grants one, counted
    /// from before the heartbeat was sent (SPEC §8).
    pub lease: Option<Arc<Lease>>,
}

impl Hooks {
    /// A heartbeat sent at `sent` was answered with `resp`.
    fn heard(&self, resp: &HeartbeatResponse, sent: Instant) {
        if let (Some(lease), Some(a)) = (&self.lease, &resp.assignment) {
            let length = Duration::from_millis(a.lease_ms);
            if a.assigned && a.role == "primary" {
                lease.renew(sent, length);
            } else {
                lease.revoke();
            }
        }
        self.heard_placement(resp);
    }

    fn heard_placement(&self, resp: &HeartbeatResponse) {
        if let Some(clock) = &self.clock
            && resp.hlc != 0
            && let Err(e) = clock.observe(Hlc::from_u64(resp.hlc))
        {
            tracing::warn!("coordinator's HLC not adopted: {e}");
        }
        let (Some(tx), Some(a)) = (&self.placement, &resp.assignment) else {
            return;
        };
        match placement(a) {
            Ok(p) => {
                tx.send_if_modified(|current| {
                    // Never step back to an older map's answer (answers from
                    // two coordinators may cross).
                    let newer = current
                        .as_ref()
                        .is_none_or(|c| p.epoch > c.epoch || (p.epoch == c.epoch && *c != p));
                    if newer {
                        *current = Some(p);
                    }
                    newer
                });
            }
            Err(e) => tracing::warn!("coordinator's assignment ignored: {e}"),
        }
    }
}

/// Read the wire assignment.
fn placement(a: &WireAssignment) -> Result<Placement, String> {
    if !a.assigned {
        return Ok(Placement {
            epoch: a.epoch,
            partition: None,
            role: Role::Unassigned,
            primary: None,
            replicas: Vec::new(),
        });
    }
    let addr = |s: &str| s.parse::<NodeAddr>().map_err(|e| format!("{s:?}: {e}"));
    Ok(Placement {
        epoch: a.epoch,
        partition: Some(a.partition),
        role: Role::parse(&a.role),
        primary: Some(addr(&a.primary)?),
        replicas: a
            .replicas
            .iter()
            .map(|r| addr(r))
            .collect::<Result<_, _>>()?,
    })
}

/// `GET /_shardgate/status`, as a node answers it.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusDoc {
    #[serde(default)]
    role: String,
    #[serde(default)]
    applied_hlc: String,
    #[serde(default)]
    lag_bytes: u64,
    #[serde(default)]
    lag_ms: u64,
    #[serde(default)]
    state: String,
    #[serde(default)]
    last_replicated_sequence: u64,
}

/// Read the node's status endpoint; `None` if it does not answer sensibly.
async fn read_status(url: &Uri) -> Option<ReplicationReport> {
    let (ok, body) = get(url).await?;
    if !ok {
        return None;
    }
    let doc: StatusDoc = serde_json::from_slice(&body).ok()?;
    Some(ReplicationReport {
        role: Role::parse(&doc.role),
        applied: doc.applied_hlc.parse().unwrap_or(Hlc::ZERO),
        lag_bytes: doc.lag_bytes,
        lag_ms: doc.lag_ms,
        state: ReplicaState::parse(&doc.state).unwrap_or(ReplicaState::Stalled),
        sequence: doc.last_replicated_sequence,
    })
}

fn wire_status(r: &ReplicationReport) -> ReplicationStatus {
    ReplicationStatus {
        role: r.role.as_str().to_owned(),
        applied_hlc: r.applied.as_u64(),
        lag_bytes: r.lag_bytes,
        lag_ms: r.lag_ms,
        state: r.state.as_str().to_owned(),
        last_replicated_sequence: r.sequence,
    }
}

/// Why the agent stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentExit {
    /// Shut down by a signal.
    Stopped,
    /// The coordinator fenced or removed this node.
    Terminated,
}

/// An agent that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The coordinator address is unusable.
    #[error("coordinator address {0:?}: {1}")]
    Coordinator(String, http::uri::InvalidUri),
    /// The coordinator address names no host.
    #[error("coordinator address {0:?} names no host")]
    NoHost(String),
    /// The TLS files for an `https` coordinator are unusable.
    #[error("coordinator TLS: {0}")]
    Tls(String),
    /// Signal handlers could not be installed.
    #[error(transparent)]
    Signals(#[from] crate::signals::SignalError),
    /// The gate's address could not be bound.
    #[error("gate listen {0}: {1}")]
    Bind(std::net::SocketAddr, std::io::Error),
    /// The gate's address file could not be written.
    #[error("--addr-file: {0}")]
    AddrFile(String),
}

impl crate::exit::Failure for AgentError {
    fn exit(&self) -> crate::exit::Exit {
        match self {
            AgentError::Signals(_) | AgentError::Bind(..) | AgentError::AddrFile(_) => {
                crate::exit::Exit::Runtime
            }
            _ => crate::exit::Exit::Invalid,
        }
    }
}

/// Parse `host:port` or `http://host:port` into a gRPC endpoint URI.
pub fn coordinator_uri(s: &str) -> Result<Uri, AgentError> {
    let full = if s.contains("://") {
        s.to_owned()
    } else {
        format!("http://{s}")
    };
    let uri: Uri = full
        .parse()
        .map_err(|e| AgentError::Coordinator(s.to_owned(), e))?;
    if uri.authority().is_none() {
        return Err(AgentError::NoHost(s.to_owned()));
    }
    Ok(uri)
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// GET `url` within two seconds: whether it answered 2xx, and its body (at most 64 KiB).
async fn get(url: &Uri) -> Option<(bool, bytes::Bytes)> {
    let (status, body) = crate::fetch::get(url, 64 * 1024, Duration::from_secs(2))
        .await
        .ok()?;
    Some((status.is_success(), body))
}

/// GET the check URL; healthy means a 2xx within two seconds.
async fn healthy(url: &Uri) -> bool {
    matches!(get(url).await, Some((true, _)))
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, AgentError> {
    std::fs::read(path).map_err(|e| AgentError::Tls(format!("{}: {e}", path.display())))
}

/// tonic's TLS settings for an `https` coordinator.
fn tls_config(spec: &ClientTls) -> Result<ClientTlsConfig, AgentError> {
    let mut config = match &spec.ca {
        Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?)),
        None => ClientTlsConfig::new().with_native_roots(),
    };
    if let Some(id) = &spec.identity {
        config = config.identity(Identity::from_pem(read(&id.cert)?, read(&id.key)?));
    }
    Ok(config.timeout(Duration::from_secs(5)))
}

/// Heartbeat until `shutdown` or TERMINATE.
pub async fn run(
    mut cfg: AgentConfig,
    shutdown: CancellationToken,
) -> Result<AgentExit, AgentError> {
    let (placed, placement) = watch::channel(None);
    let lease = Arc::new(Lease::default());
    let stop_tasks = shutdown.child_token();
    let mut tasks = Vec::new();
    if let Some(g) = cfg.gate.clone() {
        let listener = tokio::net::TcpListener::bind(g.listen)
            .await
            .map_err(|e| AgentError::Bind(g.listen, e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| AgentError::Bind(g.listen, e))?;
        // The map names the gate: its address is the node's.
        cfg.ip = NodeAddr {
            ip: bound.ip(),
            port: Some(bound.port()),
        };
        if let Some(path) = &cfg.addr_file {
            crate::atomic_file::announce(path, bound)
                .await
                .map_err(|e| AgentError::AddrFile(e.to_string()))?;
        }
        tracing::info!(gate = %bound, node = %g.node, "gate listening");
        let gate = Gate::new(&g, placement.clone(), lease.clone())
            .map_err(|e| AgentError::Tls(e.to_string()))?;
        let gate = Arc::new(gate);
        tasks.push(tokio::spawn(crate::gate::serve(
            gate,
            listener,
            stop_tasks.clone(),
        )));
    }
    let hooks_task = (cfg.on_promote.is_some() || cfg.on_demote.is_some()).then(|| {
        tokio::spawn(role_hooks(
            placement.clone(),
            cfg.on_promote.clone(),
            cfg.on_demote.clone(),
        ))
    });
    let hooks = Hooks {
        placement: Some(placed.clone()),
        lease: Some(lease.clone()),
        ..Hooks::default()
    };
    let exit = run_with(cfg, hooks, shutdown).await;
    // Fenced or stopped: no role any more (a primary's demotion hook runs).
    lease.revoke();
    placed.send_replace(None);
    drop(placed);
    if let Some(t) = hooks_task {
        let _ = t.await;
    }
    stop_tasks.cancel();
    for t in tasks {
        let _ = t.await;
    }
    exit
}

/// Run `--on-promote` / `--on-demote` as the node's role changes, one at a
/// time and in order, until the placement channel closes.
async fn role_hooks(
    mut placement: watch::Receiver<Option<Placement>>,
    on_promote: Option<String>,
    on_demote: Option<String>,
) {
    let mut was_primary = false;
    loop {
        let now = placement.borrow_and_update().clone();
        let primary = now.as_ref().is_some_and(|p| p.role == Role::Primary);
        let hook = match (was_primary, primary) {
            (false, true) => on_promote.as_deref(),
            (true, false) => on_demote.as_deref(),
            _ => None,
        };
        was_primary = primary;
        if let Some(cmd) = hook {
            run_hook(cmd, now.as_ref()).await;
        }
        if placement.changed().await.is_err() {
            // Closed: the agent stopped. A primary until now is one no more.
            if was_primary && let Some(cmd) = on_demote.as_deref() {
                run_hook(cmd, None).await;
            }
            return;
        }
    }
}

/// Run one hook with the role, partition and epoch in its environment.
async fn run_hook(cmd: &str, placement: Option<&Placement>) {
    let role = placement.map_or("unassigned", |p| p.role.as_str());
    let mut c = tokio::process::Command::new("sh");
    c.args(["-c", cmd])
        .env("SHARDGATE_ROLE", role)
        .env(
            "SHARDGATE_PARTITION",
            placement
                .and_then(|p| p.partition)
                .map(|p| p.to_string())
                .unwrap_or_default(),
        )
        .env(
            "SHARDGATE_EPOCH",
            placement.map(|p| p.epoch.to_string()).unwrap_or_default(),
        )
        .kill_on_drop(true);
    let status = match c.spawn() {
        Ok(mut child) => tokio::time::timeout(HOOK_TIMEOUT, child.wait()).await,
        Err(e) => {
            tracing::error!(hook = cmd, "role hook could not start: {e}");
            return;
        }
    };
    match status {
        Ok(Ok(s)) if s.success() => tracing::info!(hook = cmd, role, "role hook ran"),
        Ok(Ok(s)) => tracing::error!(hook = cmd, role, status = %s, "role hook failed"),
        Ok(Err(e)) => tracing::error!(hook = cmd, role, "role hook: {e}"),
        Err(_) => tracing::error!(
            hook = cmd,
            role,
            "role hook ran past {HOOK_TIMEOUT:?}; killed"
        ),
    }
}

/// Heartbeat until `shutdown` or TERMINATE, sharing `hooks` with a node in
/// the same process.
pub async fn run_with(
    cfg: AgentConfig,
    hooks: Hooks,
    shutdown: CancellationToken,
) -> Result<AgentExit, AgentError> {
    let mut endpoint = Endpoint::from(cfg.coordinator.clone())
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    if cfg.coordinator.scheme_str() == Some("https") {
        endpoint = endpoint
            .tls_config(tls_config(&cfg.tls)?)
            .map_err(|e| AgentError::Tls(e.to_string()))?;
    }
    let channel: Channel = endpoint.connect_lazy();
    let mut client = ClusterDiscoveryServiceClient::new(channel);
    let backoff = Backoff {
        base: cfg.interval.min(Duration::from_secs(1)),
        max: Duration::from_secs(30),
        jitter: Jitter::Decorrelated,
    };
    let mut failures = 0u32;
    let mut last_delay = None;
    let mut sampler = Sampler::default();
    let mut was_healthy = true;
    let mut warned_for = None;
    sampler.sample();
    loop {
        let mut wait = cfg.interval;
        let healthy_now = match &cfg.check_url {
            Some(url) => healthy(url).await,
            None => true,
        };
        if healthy_now != was_healthy {
            if healthy_now {
                tracing::info!("local service healthy again; resuming heartbeats");
            } else {
                tracing::warn!("local service unhealthy; heartbeats paused");
            }
            was_healthy = healthy_now;
        }
        if healthy_now {
            let replication = match (&hooks.report, &cfg.status_url) {
                (Some(report), _) => Some(report()),
                (None, Some(url)) => read_status(url).await,
                (None, None) => None,
            };
            let s = sampler.sample();
            let mut req = tonic::Request::new(HeartbeatRequest {
                node_id: cfg.node_id.clone(),
                ip_address: cfg.ip.to_string(),
                epoch_timestamp_ms: unix_ms(),
                resource_status: Some(ResourceUsage {
                    cpu_percent: s.cpu_percent,
                    free_memory_bytes: s.free_memory_bytes,
                    active_connections: s.active_connections,
                }),
                replication: replication.as_ref().map(wire_status),
            });
            if let Some(t) = &cfg.token
                && let Ok(v) = format!("Bearer {}", t.expose()).parse()
            {
                req.metadata_mut().insert("authorization", v);
            }
            // The lease counts from here: before the request leaves.
            let sent = Instant::now();
            match client.report_heartbeat(req).await {
                Ok(resp) => {
                    failures = 0;
                    last_delay = None;
                    let resp = resp.into_inner();
                    hooks.heard(&resp, sent);
                    let lease = resp
                        .assignment
                        .as_ref()
                        .map_or(Duration::ZERO, |a| Duration::from_millis(a.lease_ms));
                    // Said once per lease length, not on every heartbeat.
                    if !lease.is_zero() && cfg.interval * 2 >= lease && warned_for != Some(lease) {
                        warned_for = Some(lease);
                        tracing::warn!(
                            interval = ?cfg.interval,
                            ?lease,
                            "heartbeats come too seldom to keep the lease: a healthy primary will \
                             refuse writes between them; shorten --interval"
                        );
                    }
                    match WireCommand::try_from(resp.recommended_command) {
                        Ok(WireCommand::Continue) => {}
                        Ok(WireCommand::Rebalance) => tracing::info!(
                            node = %cfg.node_id,
                            "coordinator says REBALANCE: this node's role or partition changed"
                        ),
                        Ok(WireCommand::Terminate) => {
                            tracing::error!(
                                node = %cfg.node_id,
                                "coordinator says TERMINATE: this node was fenced or removed; stopping"
                            );
                            return Ok(AgentExit::Terminated);
                        }
                        Err(_) => {
                            tracing::warn!(command = resp.recommended_command, "unknown command");
                        }
                    }
                }
                Err(status) => {
                    let delay = backoff.delay(failures, last_delay, &mut rand::rng());
                    failures = failures.saturating_add(1);
                    last_delay = Some(delay);
                    wait = delay;
                    tracing::warn!(
                        code = ?status.code(),
                        message = status.message(),
                        retry_in = ?delay,
                        "heartbeat failed"
                    );
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(AgentExit::Stopped),
            () = tokio::time::sleep(wait) => {}
        }
    }
}
