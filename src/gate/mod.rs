//! The gate (SPEC §8): `shardgate agent --gate-listen ADDR --node URL`
//! fronts any HTTP shard node, and the map names the gate's address. Every
//! write passes only while the node is its partition's primary under a
//! valid lease and the request's `x-cluster-epoch` is not older than the
//! newest epoch the node has seen; reads always pass (an isolated node is
//! read-only, never write-only). Refusals are the SPEC's answers, so a
//! proxy's fast correction (`421`) and failover hold (`503`) do the right
//! thing with them:
//!
//! | why | answer |
//! |---|---|
//! | the request's epoch is older than the node's | `421 stale_epoch`, with the node's `x-cluster-epoch` |
//! | the node is not (or no longer) primary | `503 not_primary` |
//! | the lease expired | `503 lease_expired` |
//!
//! Requests that pass go to the node over the proxy's own upstream code:
//! pooled keep-alive connections, bodies streamed both ways, the connection
//! pooled again only after a clean end. The rule is checked when the
//! request's head arrives; a write already passed when the lease runs out
//! mid-body still reaches the node, as a write already sent to a primary
//! would, and the lease's margin below the failover timeout covers it.

use crate::agent::Placement;
use crate::json_error::JsonError;
use crate::lease::Lease;
use crate::replication::Role;
use crate::resilience::{Backoff, BreakerConfig, Jitter};
use crate::telemetry::Metrics;
use crate::upstream::{
    PoolSettings, RequestBody, SendError, Upstream, UpstreamBody, UpstreamFactory, UpstreamSettings,
};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// `x-cluster-epoch`: the epoch of the map a request was routed by.
const EPOCH: HeaderName = HeaderName::from_static("x-cluster-epoch");

/// Largest request body passed on (the proxy's own default).
const MAX_BODY: u64 = 64 * 1024 * 1024;

/// What a gate answers with: the node's streamed answer, or its own.
pub type GateBody = Either<UpstreamBody, Full<Bytes>>;

/// The gate's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateConfig {
    /// Where it listens (the address the map names).
    pub listen: SocketAddr,
    /// The node it fronts.
    pub node: SocketAddr,
    /// Longest a request may take at the node, head to end of body.
    pub timeout: Duration,
}

/// Why a write may not pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The request was routed by an older map than the node knows.
    #[error("the request was routed by epoch {given}; this node has seen epoch {newest}")]
    StaleEpoch {
        /// The node's newest epoch.
        newest: u64,
        /// The request's.
        given: u64,
    },
    /// The node is not its partition's primary.
    #[error("this node is not its partition's primary (epoch {epoch})")]
    NotPrimary {
        /// The node's newest epoch.
        epoch: u64,
    },
    /// The node's lease ran out.
    #[error(
        "this primary's lease expired: it has not heard from the coordinator in time, and a successor may have been named"
    )]
    LeaseExpired,
}

impl Refusal {
    fn response(self) -> Response<GateBody> {
        let (status, code) = match self {
            Refusal::StaleEpoch { .. } => (StatusCode::MISDIRECTED_REQUEST, "stale_epoch"),
            Refusal::NotPrimary { .. } => (StatusCode::SERVICE_UNAVAILABLE, "not_primary"),
            Refusal::LeaseExpired => (StatusCode::SERVICE_UNAVAILABLE, "lease_expired"),
        };
        let mut r = own(&JsonError::new(status, code, self.to_string()));
        if let Refusal::StaleEpoch { newest, .. } | Refusal::NotPrimary { epoch: newest } = self {
            r.headers_mut().insert(EPOCH, HeaderValue::from(newest));
        }
        r
    }
}

fn own(e: &JsonError<'_>) -> Response<GateBody> {
    e.response::<Full<Bytes>>().map(Either::Right)
}

/// A gate's state: what the agent heard, and the node's upstream.
pub struct Gate {
    placement: watch::Receiver<Option<Placement>>,
    lease: Arc<Lease>,
    newest_epoch: AtomicU64,
    node: Arc<Upstream>,
    timeout: Duration,
}

impl Gate {
    /// A gate to `cfg.node`, following `placement` and `lease` (kept
    /// current by the agent).
    pub fn new(
        cfg: &GateConfig,
        placement: watch::Receiver<Option<Placement>>,
        lease: Arc<Lease>,
    ) -> Result<Gate, crate::tls::TlsError> {
        let settings = UpstreamSettings {
            pool: PoolSettings {
                max_idle: 256,
                idle_timeout: Duration::from_secs(60),
                connect_timeout: Duration::from_secs(2),
            },
            // One node behind the gate: there is nowhere else to send a
            // request, so a breaker would only turn its errors into ours.
            breaker: BreakerConfig {
                consecutive_failures: 0,
                failure_ratio: 2.0,
                window: Duration::from_secs(10),
                min_requests: u32::MAX,
                cool_down: Backoff {
                    base: Duration::from_secs(1),
                    max: Duration::from_secs(1),
                    jitter: Jitter::Equal,
                },
                half_open_probes: 1,
            },
            tls: None,
        };
        let node = UpstreamFactory::new(settings, Arc::new(Metrics::new()))?.make(cfg.node);
        Ok(Gate {
            placement,
            lease,
            newest_epoch: AtomicU64::new(0),
            node,
            timeout: cfg.timeout,
        })
    }

    /// SPEC §8's rule for a write routed by `given` (the request's
    /// `x-cluster-epoch`, if it sent one).
    pub fn admit_write(&self, given: Option<u64>) -> Result<(), Refusal> {
        let (role, epoch) = match &*self.placement.borrow() {
            Some(p) => (p.role, p.epoch),
            None => (Role::Unassigned, 0),
        };
        let newest = self
            .newest_epoch
            .fetch_max(epoch, Ordering::SeqCst)
            .max(epoch);
        if let Some(given) = given
            && given < newest
        {
            return Err(Refusal::StaleEpoch { newest, given });
        }
        if role != Role::Primary {
            return Err(Refusal::NotPrimary { epoch: newest });
        }
        if !self.lease.valid() {
            return Err(Refusal::LeaseExpired);
        }
        Ok(())
    }

    /// One request: checked if it is a write, then passed to the node.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<GateBody> {
        let read = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        if !read {
            // The node's epoch comes from the coordinator only: a request
            // cannot raise it, so a client cannot fence the node off.
            let given: Option<u64> = req
                .headers()
                .get(EPOCH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            if let Err(r) = self.admit_write(given) {
                return r.response();
            }
        }
        self.pass(req).await
    }

    async fn pass(&self, req: Request<Incoming>) -> Response<GateBody> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let Some(guard) = self.node.try_begin(0) else {
            return own(&JsonError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "no slot",
            ));
        };
        let (parts, body) = req.into_parts();
        let mut slot = Some(Request::from_parts(
            parts,
            RequestBody::streaming(body, MAX_BODY),
        ));
        let sent = tokio::time::timeout_at(deadline, self.node.send(&mut slot, started)).await;
        match sent {
            Ok(Ok((resp, conn))) => {
                let answered_at = Instant::now();
                resp.map(|incoming| {
                    Either::Left(UpstreamBody::new(
                        incoming,
                        guard,
                        conn,
                        deadline,
                        answered_at,
                        None,
                    ))
                })
            }
            Ok(Err(e)) => {
                let (status, code) = match e {
                    SendError::Connect(_) | SendError::NotSent(_) | SendError::Nothing => {
                        (StatusCode::SERVICE_UNAVAILABLE, "node_unavailable")
                    }
                    SendError::Failed(_) => (StatusCode::BAD_GATEWAY, "upstream_failed"),
                };
                own(&JsonError::new(
                    status,
                    code,
                    format!("the node behind this gate: {e}"),
                ))
            }
            Err(_) => own(&JsonError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the node behind this gate did not answer in time",
            )),
        }
    }
}

/// Serve `gate` on `listener` until `shutdown`.
pub async fn serve(gate: Arc<Gate>, listener: TcpListener, shutdown: CancellationToken) {
    crate::server::serve_http1(
        listener,
        None,
        16_384,
        shutdown,
        Duration::from_secs(5),
        move |req, _peer: SocketAddr| {
            let gate = gate.clone();
            async move { gate.handle(req).await }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(role: Role, epoch: u64) -> (Gate, Arc<Lease>, watch::Sender<Option<Placement>>) {
        let (tx, rx) = watch::channel(Some(Placement {
            epoch,
            partition: Some(0),
            role,
            primary: None,
            replicas: Vec::new(),
        }));
        let lease = Arc::new(Lease::default());
        let cfg = GateConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            node: "127.0.0.1:9".parse().unwrap(),
            timeout: Duration::from_secs(1),
        };
        (Gate::new(&cfg, rx, lease.clone()).unwrap(), lease, tx)
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_passes_only_as_primary_under_a_lease_and_a_current_epoch() {
        let (g, lease, tx) = gate(Role::Primary, 5);
        assert_eq!(
            g.admit_write(Some(5)),
            Err(Refusal::LeaseExpired),
            "no lease yet"
        );
        lease.renew(Instant::now(), Duration::from_millis(500));
        assert_eq!(g.admit_write(Some(5)), Ok(()));
        assert_eq!(g.admit_write(None), Ok(()), "a request without an epoch");
        assert_eq!(
            g.admit_write(Some(6)),
            Ok(()),
            "a newer map that names it primary"
        );
        assert_eq!(
            g.admit_write(Some(4)),
            Err(Refusal::StaleEpoch {
                newest: 5,
                given: 4
            })
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(g.admit_write(Some(5)), Err(Refusal::LeaseExpired));
        lease.renew(Instant::now(), Duration::from_millis(500));
        tx.send_replace(Some(Placement {
            epoch: 7,
            partition: Some(0),
            role: Role::Replica,
            primary: None,
            replicas: Vec::new(),
        }));
        assert_eq!(
            g.admit_write(Some(7)),
            Err(Refusal::NotPrimary { epoch: 7 })
        );
        // The epoch it saw never goes back, even if an older answer arrives.
        tx.send_replace(Some(Placement {
            epoch: 6,
            partition: Some(0),
            role: Role::Primary,
            primary: None,
            replicas: Vec::new(),
        }));
        assert_eq!(
            g.admit_write(Some(6)),
            Err(Refusal::StaleEpoch {
                newest: 7,
                given: 6
            })
        );
    }
}
