//! `shardgate agent`: the heartbeat sidecar beside each shard node (SPEC §4).
//!
//! Every interval it reports the node's CPU, free memory and TCP connections.
//! With a check URL it stays silent while the local service is unhealthy, so
//! the coordinator sees the node as dead. It backs off (jittered) while the
//! coordinator is unreachable and exits with `TERMINATED` when told to stop.

mod sysinfo;

pub use sysinfo::{Sample, Sampler};

use crate::proto::cluster_discovery_service_client::ClusterDiscoveryServiceClient;
use crate::proto::heartbeat_response::Command as WireCommand;
use crate::proto::{HeartbeatRequest, ResourceUsage};
use crate::resilience::{Backoff, Jitter};
use crate::secret::Secret;
use crate::tls::ClientTls;
use crate::topology::NodeAddr;
use http::Uri;
use http_body_util::Empty;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
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
}

impl crate::exit::Failure for AgentError {
    fn exit(&self) -> crate::exit::Exit {
        match self {
            AgentError::Signals(_) => crate::exit::Exit::Runtime,
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

/// GET the check URL; healthy means a 2xx within two seconds.
async fn healthy(url: &Uri) -> bool {
    let check = async {
        let authority = url.authority()?.clone();
        let port = authority.port_u16().unwrap_or(80);
        let stream = tokio::net::TcpStream::connect((authority.host(), port))
            .await
            .ok()?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let req = http::Request::get(path)
            .header(http::header::HOST, authority.as_str())
            .body(Empty::<bytes::Bytes>::new())
            .ok()?;
        let resp = send.send_request(req).await.ok()?;
        Some(resp.status().is_success())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), check).await,
        Ok(Some(true))
    )
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
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<AgentExit, AgentError> {
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
            });
            if let Some(t) = &cfg.token
                && let Ok(v) = format!("Bearer {}", t.expose()).parse()
            {
                req.metadata_mut().insert("authorization", v);
            }
            match client.report_heartbeat(req).await {
                Ok(resp) => {
                    failures = 0;
                    last_delay = None;
                    let resp = resp.into_inner();
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
