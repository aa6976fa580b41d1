//! The gRPC listener: `ClusterDiscoveryService.ReportHeartbeat` and
//! `grpc.health.v1.Health`.

use super::state::{Command, Heartbeat, Refusal, Usage};
use super::store::Store;
use super::{Coordinator, HeartbeatError, unix_ms};
use crate::clock::Hlc;
use crate::proto::cluster_discovery_service_server::{
    ClusterDiscoveryService, ClusterDiscoveryServiceServer,
};
use crate::proto::heartbeat_response::Command as WireCommand;
use crate::proto::{
    Assignment as WireAssignment, HeartbeatRequest, HeartbeatResponse, ReplicationStatus,
};
use crate::replication::{ReplicaState, ReplicationReport, Role};
use crate::server::tls_incoming;
use crate::tls::Terminator;
use crate::topology::{NodeAddr, ShardMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Largest heartbeat accepted; a real one is under 200 bytes.
const MAX_MESSAGE: usize = 16 * 1024;
/// Heartbeat timestamps further than this from the coordinator's clock are refused.
const MAX_TIMESTAMP_OFFSET_MS: i64 = 24 * 60 * 60 * 1000;
/// Longest node id accepted.
const MAX_NODE_ID: usize = 128;
/// Longest address accepted (the schema's `ip_address VARCHAR(45)`).
const MAX_ADDRESS: usize = 45;

/// Check every field of a heartbeat; nothing changes for a refused one.
pub(super) fn validate(req: &HeartbeatRequest, now_ms: i64) -> Result<Heartbeat, Status> {
    let id = req.node_id.as_str();
    if id.trim().is_empty() {
        return Err(Status::invalid_argument("node_id is empty"));
    }
    if id.len() > MAX_NODE_ID || id.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "node_id must be at most {MAX_NODE_ID} bytes of printable text"
        )));
    }
    if req.ip_address.len() > MAX_ADDRESS {
        return Err(Status::invalid_argument("ip_address is too long"));
    }
    let addr: NodeAddr = req
        .ip_address
        .parse()
        .map_err(|e| Status::invalid_argument(format!("ip_address: {e}")))?;
    if (req.epoch_timestamp_ms - now_ms).abs() > MAX_TIMESTAMP_OFFSET_MS {
        return Err(Status::invalid_argument(
            "epoch_timestamp_ms is more than a day away from the coordinator's clock",
        ));
    }
    let usage = req
        .resource_status
        .as_ref()
        .map_or(Ok(Usage::default()), |r| {
            if !r.cpu_percent.is_finite() || !(0.0..=100.0).contains(&r.cpu_percent) {
                return Err(Status::invalid_argument(
                    "cpu_percent must be between 0 and 100",
                ));
            }
            if r.free_memory_bytes < 0 || r.active_connections < 0 {
                return Err(Status::invalid_argument(
                    "resource figures must not be negative",
                ));
            }
            Ok(Usage {
                cpu_percent: r.cpu_percent,
                free_memory_bytes: r.free_memory_bytes,
                active_connections: r.active_connections,
            })
        })?;
    let replication = req.replication.as_ref().map(replication).transpose()?;
    Ok(Heartbeat {
        node_id: id.to_owned(),
        addr,
        node_time_ms: req.epoch_timestamp_ms,
        usage,
        replication,
    })
}

/// The heartbeat's replication status, checked.
fn replication(r: &ReplicationStatus) -> Result<ReplicationReport, Status> {
    let state = if r.state.is_empty() {
        ReplicaState::InSync
    } else {
        ReplicaState::parse(&r.state).ok_or_else(|| {
            Status::invalid_argument("replication.state must be IN_SYNC, LAGGING or STALLED")
        })?
    };
    Ok(ReplicationReport {
        role: Role::parse(&r.role),
        applied: Hlc::from_u64(r.applied_hlc),
        lag_bytes: r.lag_bytes,
        lag_ms: r.lag_ms,
        state,
        sequence: r.last_replicated_sequence,
    })
}

/// Where `map` places the node at `addr`, on the wire.
fn assignment(
    map: &ShardMap,
    index: Option<u32>,
    addr: &NodeAddr,
    lease: Duration,
) -> WireAssignment {
    let Some(p) = index.and_then(|i| map.partition(i)) else {
        return WireAssignment {
            epoch: map.epoch(),
            ..Default::default()
        };
    };
    WireAssignment {
        assigned: true,
        partition: p.index,
        role: if p.primary == *addr {
            "primary"
        } else {
            "replica"
        }
        .to_owned(),
        epoch: map.epoch(),
        primary: p.primary.to_string(),
        replicas: p.replicas.iter().map(ToString::to_string).collect(),
        lease_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
    }
}

struct Service<S: Store> {
    coordinator: Arc<Coordinator<S>>,
}

impl<S: Store> Service<S> {
    fn authorised(&self, req: &Request<HeartbeatRequest>) -> bool {
        let token = &self.coordinator.cfg.heartbeat_token;
        if token.is_empty() {
            return true;
        }
        token.matches_bearer(
            req.metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
        )
    }
}

#[tonic::async_trait]
impl<S: Store> ClusterDiscoveryService for Service<S> {
    async fn report_heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let c = &self.coordinator;
        if !self.authorised(&request) {
            c.metrics.heartbeat("unauthenticated");
            return Err(Status::unauthenticated("missing or wrong heartbeat token"));
        }
        let hb = match validate(request.get_ref(), unix_ms()) {
            Ok(hb) => hb,
            Err(status) => {
                c.metrics.heartbeat("invalid");
                return Err(status);
            }
        };
        if !c.limiter.allow(&hb.node_id) {
            c.metrics.heartbeat("rate_limited");
            return Err(Status::resource_exhausted(
                "heartbeats from this node arrive far faster than its interval",
            ));
        }
        let addr = hb.addr;
        let applied = hb.replication.map(|r| r.applied);
        let (command, lease) = match c.heartbeat(hb).await {
            Ok(answer) => answer,
            Err(HeartbeatError::Refused(r @ Refusal::TooManyStrangers { .. })) => {
                c.metrics.heartbeat("too_many_nodes");
                tracing::debug!("heartbeat refused: {r}");
                return Err(Status::resource_exhausted(r.to_string()));
            }
            Err(HeartbeatError::Refused(r)) => {
                c.metrics.heartbeat("refused");
                tracing::warn!("heartbeat refused: {r}");
                return Err(Status::failed_precondition(r.to_string()));
            }
            Err(HeartbeatError::Store(e)) => {
                c.metrics.heartbeat("store_error");
                tracing::error!("heartbeat not recorded: {e}");
                return Err(Status::unavailable(
                    "the coordinator's store is unavailable",
                ));
            }
        };
        c.metrics.heartbeat("ok");
        let recommended = match command {
            Command::Continue => WireCommand::Continue,
            Command::Rebalance => WireCommand::Rebalance,
            Command::Terminate => WireCommand::Terminate,
        };
        let (map, index) = c.placement(&addr);
        Ok(Response::new(HeartbeatResponse {
            recommended_command: recommended as i32,
            sync_epoch_timestamp_ms: unix_ms(),
            hlc: c.hlc(applied).as_u64(),
            assignment: Some(assignment(&map, index, &addr, lease)),
        }))
    }
}

/// A request body whose gRPC messages may be no larger than `max` bytes.
///
/// A larger one is refused as gRPC answers a message over a size limit,
/// `RESOURCE_EXHAUSTED`, as soon as its length prefix arrives — before
/// anything of it is buffered. (tonic's own limit answers `OUT_OF_RANGE`;
/// it still backs this one up.)
struct MessageLimit<B> {
    inner: B,
    max: usize,
    /// The length prefix being read (flag byte, then four bytes).
    header: [u8; 5],
    header_read: usize,
    /// Bytes of the current message still to pass.
    message_left: usize,
}

impl<B> MessageLimit<B> {
    fn new(inner: B, max: usize) -> MessageLimit<B> {
        MessageLimit {
            inner,
            max,
            header: [0; 5],
            header_read: 0,
            message_left: 0,
        }
    }

    /// Follow the message framing over `data`; an error for a message too large.
    fn inspect(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.message_left > 0 {
                let n = self.message_left.min(data.len());
                self.message_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.header_read).min(data.len());
            self.header[self.header_read..self.header_read + n].copy_from_slice(&data[..n]);
            self.header_read += n;
            data = &data[n..];
            if self.header_read == 5 {
                self.header_read = 0;
                let [_, a, b, c, d] = self.header;
                let len = u32::from_be_bytes([a, b, c, d]) as usize;
                if len > self.max {
                    return Err(Status::resource_exhausted(format!(
                        "a {len}-byte message is over the {}-byte limit",
                        self.max
                    )));
                }
                self.message_left = len;
            }
        }
        Ok(())
    }
}

impl<B> http_body::Body for MessageLimit<B>
where
    B: http_body::Body<Data = bytes::Bytes, Error = Status> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && let Err(e) = self.inspect(data)
        {
            return std::task::Poll::Ready(Some(Err(e)));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serve heartbeats and health until `shutdown`.
pub(super) async fn serve<S: Store>(
    coordinator: Arc<Coordinator<S>>,
    listener: TcpListener,
    tls: Option<Arc<Terminator>>,
    shutdown: CancellationToken,
) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ClusterDiscoveryServiceServer<Service<S>>>()
        .await;
    let service = ClusterDiscoveryServiceServer::new(Service { coordinator })
        .max_decoding_message_size(MAX_MESSAGE);
    let router = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(64)
        .max_concurrent_streams(128)
        .timeout(Duration::from_secs(10))
        .layer(tower::layer::layer_fn(|inner| {
            tower::util::MapRequest::new(inner, |req: http::Request<tonic::body::Body>| {
                req.map(|b| tonic::body::Body::new(MessageLimit::new(b, MAX_MESSAGE)))
            })
        }))
        .add_service(health_service)
        .add_service(service);
    // TLS is terminated by our own acceptor rather than tonic's so both
    // listeners share one policy: TLS 1.2+, handshake deadline, SIGHUP reload.
    let result = match tls {
        None => {
            router
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    shutdown.cancelled_owned(),
                )
                .await
        }
        Some(tls) => {
            let incoming = tls_incoming(listener, tls, 256, shutdown.clone());
            router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await
        }
    };
    if let Err(e) = result {
        tracing::error!("gRPC server stopped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ResourceUsage;

    fn req(id: &str, ip: &str, ts: i64) -> HeartbeatRequest {
        HeartbeatRequest {
            node_id: id.into(),
            ip_address: ip.into(),
            epoch_timestamp_ms: ts,
            resource_status: Some(ResourceUsage {
                cpu_percent: 12.5,
                free_memory_bytes: 1 << 30,
                active_connections: 7,
            }),
            replication: None,
        }
    }

    #[test]
    fn a_message_over_the_limit_is_refused_as_soon_as_its_length_arrives() {
        let mut m = MessageLimit::new((), 16);
        // Two messages of 16 bytes, framed, split at awkward places.
        let mut stream = Vec::new();
        for _ in 0..2 {
            stream.extend_from_slice(&[0, 0, 0, 0, 16]);
            stream.extend_from_slice(&[7; 16]);
        }
        for piece in stream.chunks(3) {
            assert!(m.inspect(piece).is_ok());
        }
        let e = m.inspect(&[0, 0, 0]).and(m.inspect(&[0, 17])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn malformed_heartbeats_are_invalid_argument() {
        let now = 1_700_000_000_000;
        assert!(validate(&req("n1", "10.0.0.1:80", now), now).is_ok());
        for bad in [
            req("", "10.0.0.1:80", now),
            req("  ", "10.0.0.1:80", now),
            req("n\u{7}", "10.0.0.1:80", now),
            req("n1", "not-an-ip", now),
            req("n1", "", now),
            req("n1", "10.0.0.1:80", now + 25 * 3600 * 1000),
            req("n1", "10.0.0.1:80", 0),
        ] {
            let e = validate(&bad, now).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
        let mut neg = req("n1", "10.0.0.1:80", now);
        neg.resource_status.as_mut().unwrap().cpu_percent = f64::NAN;
        assert!(validate(&neg, now).is_err());
    }
}
