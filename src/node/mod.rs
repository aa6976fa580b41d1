//! `shardgate node`: the reference shard node (SPEC §7).
//!
//! One process is one node: a key-value store over HTTP, its replication,
//! and its agent (in-process), which tells it where the coordinator's map
//! places it. It is what `shardgate demo` runs and the model for putting a
//! real store behind shardgate (`docs/node-protocol.md`).
//!
//! - `store`: the data and the log (pure).
//! - `leader`: a primary's senders to its replicas, and the write quorum.
//! - `http`: the HTTP surface (`/kv/{key}`, `/_shardgate/status`,
//!   `/_shardgate/replicate`) and its JSON answers.
//! - this module: the node's shared state and the rules each request meets;
//!   `run` wires it to its listener and agent and follows role changes.
//!
//! Rules every write meets, in order: the request's epoch is not older than
//! the node's (`421`); the node is its partition's primary (`503
//! not_primary`); with `majority`, it has heard from enough replicas to
//! reach a majority (`503 no_quorum`, nothing written); then the write is
//! stamped with an HLC above any the node has seen, applied, sent to the
//! replicas, and acknowledged once a majority holds it.

mod http;
mod leader;
mod store;
mod wire;

use crate::agent::{AgentConfig, AgentExit, Hooks, Placement};
use crate::clock::{Hlc, HlcClock};
use crate::lease::Lease;
use crate::proto::node::append_response::Outcome;
use crate::proto::node::{AppendRequest, AppendResponse};
use crate::replication::{ReplicaState, ReplicationReport, Role};
use crate::topology::NodeAddr;
use leader::{Leading, NotCommitted};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use store::{Gap, Position, Snapshot, Store};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A replica that has not heard from its primary for this long is STALLED.
const STALL: Duration = Duration::from_secs(2);

/// When a write is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteQuorum {
    /// Once a majority of the partition's members (the primary included) applied it.
    #[default]
    Majority,
    /// Once the primary applied it; replicas follow asynchronously.
    Async,
}

impl std::str::FromStr for WriteQuorum {
    type Err = String;

    fn from_str(s: &str) -> Result<WriteQuorum, String> {
        match s {
            "majority" => Ok(WriteQuorum::Majority),
            "async" => Ok(WriteQuorum::Async),
            _ => Err(format!("{s:?}: must be majority or async")),
        }
    }
}

/// A node's settings.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Stable name.
    pub id: String,
    /// Where to listen; port 0 picks one. The bound address is the node's
    /// address in the map.
    pub listen: SocketAddr,
    /// Write the bound address here once listening (for port 0).
    pub addr_file: Option<PathBuf>,
    /// The agent's settings except the node's own address, filled in once bound.
    pub agent: AgentConfig,
    /// When writes are acknowledged.
    pub write_quorum: WriteQuorum,
    /// How long a write may wait for its quorum before `503 no_quorum`.
    pub write_timeout: Duration,
    /// Test only: shift this node's wall clock.
    pub clock_offset_ms: i64,
    /// Test only: wait this long before applying each replication message,
    /// so this replica lags.
    pub apply_delay: Duration,
    /// Largest number of keys held.
    pub max_keys: usize,
    /// Largest number of bytes of keys and values held.
    pub max_bytes: u64,
}

/// What a replica knows of the stream it follows.
#[derive(Clone, Copy, Debug, Default)]
struct Following {
    /// Its primary's newest write, as last told.
    head: Position,
    /// When it last heard from its primary.
    heard: Option<Instant>,
}

/// The node's shared state.
pub(crate) struct Node {
    id: String,
    addr: NodeAddr,
    clock: Arc<HlcClock>,
    quorum: WriteQuorum,
    write_timeout: Duration,
    apply_delay: Duration,
    store: Mutex<Store>,
    /// The primary's newest write, for its senders to wait on.
    head: watch::Sender<u64>,
    placement: watch::Receiver<Option<Placement>>,
    newest_epoch: AtomicU64,
    /// The highest term any primary has replicated under to this node.
    newest_term: AtomicU64,
    fenced: AtomicBool,
    /// Its lease as primary, renewed by its agent (SPEC §8).
    lease: Arc<Lease>,
    leading: Mutex<Option<Arc<Leading>>>,
    following: Mutex<Following>,
}

/// A request the node answers with an error (mapped to JSON in `http`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("this node has seen epoch {newest}; the request carries {given}")]
    StaleEpoch { newest: u64, given: u64 },
    #[error("this node is not its partition's primary")]
    NotPrimary { epoch: u64 },
    #[error("this node cannot reach a majority of its partition")]
    NoQuorum,
    #[error(
        "this primary's lease expired: it has not heard from the coordinator in time, and a successor may have been named"
    )]
    LeaseExpired,
    #[error("the write did not reach a majority in time; it may still be applied")]
    Unconfirmed,
    #[error("this node was fenced: it was replaced and takes no requests")]
    Fenced,
    #[error("this node is catching up with its primary and serves no reads yet")]
    CatchingUp,
    #[error("this node is not placed in the map yet")]
    Unplaced,
    #[error("{0}")]
    Full(#[from] store::Full),
    #[error("x-shardgate-hlc: {0}")]
    BadHlc(#[from] crate::clock::HlcError),
}

/// A value read.
pub(crate) struct Read {
    pub value: Option<bytes::Bytes>,
    pub version: Hlc,
    pub applied: Hlc,
}

/// A write acknowledged.
pub(crate) struct Written {
    pub hlc: Hlc,
    pub replicated: bool,
}

impl Node {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn leading(&self) -> Option<Arc<Leading>> {
        self.leading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn following(&self) -> MutexGuard<'_, Following> {
        self.following.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn role(&self) -> Role {
        self.placement
            .borrow()
            .as_ref()
            .map_or(Role::Unassigned, |p| p.role)
    }

    /// The epoch fence: a request from an older map is refused, so a proxy
    /// on it corrects itself at once.
    pub(crate) fn check_epoch(&self, given: Option<u64>) -> Result<(), Refusal> {
        let placed = self.placement.borrow().as_ref().map_or(0, |p| p.epoch);
        let newest = self
            .newest_epoch
            .fetch_max(placed, Ordering::SeqCst)
            .max(placed);
        match given {
            Some(given) => {
                let newest = self
                    .newest_epoch
                    .fetch_max(given, Ordering::SeqCst)
                    .max(newest);
                if given < newest {
                    return Err(Refusal::StaleEpoch { newest, given });
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The newest epoch this node knows: its placement's, or one a request carried.
    pub(crate) fn newest_epoch(&self) -> u64 {
        let placed = self.placement.borrow().as_ref().map_or(0, |p| p.epoch);
        self.newest_epoch.load(Ordering::SeqCst).max(placed)
    }

    /// Whether this node may serve reads: a primary always; a replica once
    /// it holds a snapshot of its primary's current term.
    fn readable(&self) -> Result<(), Refusal> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(Refusal::Fenced);
        }
        match self.role() {
            Role::Primary if self.leading().is_some() => Ok(()),
            Role::Replica if self.store().term().is_some() => Ok(()),
            Role::Unassigned => Err(Refusal::Unplaced),
            _ => Err(Refusal::CatchingUp),
        }
    }

    pub(crate) fn read(&self, key: &str) -> Result<Read, Refusal> {
        self.readable()?;
        let st = self.store();
        let v = st.get(key);
        Ok(Read {
            value: v.and_then(|v| v.value.clone()),
            version: v.map_or(Hlc::ZERO, |v| v.hlc),
            applied: st.applied().hlc,
        })
    }

    /// A write (`None` deletes), under the rules in the module comment.
    pub(crate) async fn write(
        &self,
        key: String,
        value: Option<bytes::Bytes>,
        stamp: Option<Hlc>,
    ) -> Result<Written, Refusal> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(Refusal::Fenced);
        }
        let (Role::Primary, Some(leading)) = (self.role(), self.leading()) else {
            return Err(Refusal::NotPrimary {
                epoch: self.newest_epoch(),
            });
        };
        // SPEC §8: past its lease a primary may already have a successor.
        if !self.lease.valid() {
            return Err(Refusal::LeaseExpired);
        }
        let majority = self.quorum == WriteQuorum::Majority;
        if majority && !leading.reaches_majority(Instant::now()) {
            return Err(Refusal::NoQuorum);
        }
        if let Some(stamp) = stamp {
            self.clock.observe(stamp)?;
        }
        let at = {
            let mut st = self.store();
            // Stamped under the lock: the log's order is the HLC order.
            let hlc = self.clock.now();
            st.write(hlc, key, value)?
        };
        self.head.send_replace(at.seq);
        if majority {
            match leading.committed(at.seq, self.write_timeout).await {
                Ok(()) => {}
                Err(NotCommitted::TimedOut | NotCommitted::Deposed) => {
                    return Err(Refusal::Unconfirmed);
                }
            }
        }
        Ok(Written {
            hlc: at.hlc,
            replicated: majority,
        })
    }

    /// The next request for a replica at `acked` (`None`: needs a snapshot),
    /// and the primary's newest sequence number; `None` once not leading.
    fn next_batch(
        &self,
        leading: &Leading,
        acked: Option<Position>,
    ) -> Option<(AppendRequest, u64)> {
        let st = self.store();
        let own = st.applied().seq;
        let req = leader::batch(leading.term, self.addr, &st, acked, self.clock.now())?;
        Some((req, own))
    }

    /// A primary's replication request, as a replica takes it.
    pub(crate) fn append(&self, req: AppendRequest) -> AppendResponse {
        let refuse = |reason: String| AppendResponse {
            outcome: Outcome::Refused as i32,
            applied: None,
            term: self.newest_term.load(Ordering::SeqCst),
            reason,
        };
        let (role, primary) = match self.placement.borrow().as_ref() {
            Some(p) => (p.role, p.primary),
            None => (Role::Unassigned, None),
        };
        let sender = req.primary.parse::<NodeAddr>().ok();
        if role != Role::Replica || sender.is_none() || sender != primary {
            return refuse(format!(
                "{} is not this replica's primary (role {}, primary {primary:?})",
                req.primary,
                role.as_str()
            ));
        }
        let newest = self.newest_term.fetch_max(req.term, Ordering::SeqCst);
        if req.term < newest {
            return refuse(format!("term {} is older than {newest}", req.term));
        }
        if req.hlc != 0 {
            let _ = self.clock.observe(Hlc::from_u64(req.hlc));
        }
        let prev = req.prev.map(wire::position).unwrap_or_default();
        let head = req.head.map(wire::position).unwrap_or_default();
        let writes: Vec<_> = req.writes.into_iter().map(wire::write).collect();
        if let Some(newest) = writes.iter().map(|w| w.at.hlc).max() {
            let _ = self.clock.observe(newest);
        }
        let result = {
            let mut st = self.store();
            if req.snapshot {
                st.install(Snapshot {
                    term: req.term,
                    at: prev,
                    items: writes
                        .into_iter()
                        .map(|w| {
                            (
                                w.key,
                                store::Version {
                                    hlc: w.at.hlc,
                                    value: w.value,
                                },
                            )
                        })
                        .collect(),
                });
                Ok(st.applied())
            } else {
                st.append(req.term, prev, writes)
            }
        };
        *self.following() = Following {
            head,
            heard: Some(Instant::now()),
        };
        match result {
            Ok(applied) => AppendResponse {
                outcome: Outcome::Applied as i32,
                applied: Some(wire::to_position(applied)),
                term: req.term,
                reason: String::new(),
            },
            Err(gap) => AppendResponse {
                outcome: Outcome::NeedSnapshot as i32,
                applied: None,
                term: req.term,
                reason: match gap {
                    Gap::OtherTerm => "following another term".into(),
                    Gap::NotThere => "not at the batch's start".into(),
                },
            },
        }
    }

    /// `GET /_shardgate/status`.
    pub(crate) fn report(&self) -> ReplicationReport {
        let role = self.role();
        let (applied, synced) = {
            let st = self.store();
            (st.applied(), st.term().is_some())
        };
        let mut report = ReplicationReport {
            role,
            applied: applied.hlc,
            sequence: applied.seq,
            ..ReplicationReport::default()
        };
        if role == Role::Replica {
            let f = *self.following();
            let behind = f.head.seq > applied.seq;
            if behind {
                report.lag_bytes = f.head.offset.saturating_sub(applied.offset);
                report.lag_ms = applied.hlc.behind(f.head.hlc).as_millis() as u64;
            }
            let quiet = f.heard.is_none_or(|t| t.elapsed() > STALL);
            report.state = if !synced || quiet {
                ReplicaState::Stalled
            } else if behind {
                ReplicaState::Lagging
            } else {
                ReplicaState::InSync
            };
        } else if role == Role::Unassigned {
            report.state = ReplicaState::Stalled;
        }
        report
    }

    pub(crate) fn partition(&self) -> Option<u32> {
        self.placement.borrow().as_ref().and_then(|p| p.partition)
    }

    /// Follow a new placement: start or stop leading.
    fn follow(self: &Arc<Self>, placement: Option<&Placement>) {
        let mut leading = self.leading.lock().unwrap_or_else(|e| e.into_inner());
        let want = placement.filter(|p| p.role == Role::Primary);
        let keep = match (&*leading, want) {
            (Some(l), Some(p)) => l.peers == p.replicas,
            (None, None) => true,
            _ => false,
        };
        if keep {
            return;
        }
        let term = leading.as_ref().map(|l| l.term);
        if let Some(old) = leading.take() {
            old.stop.cancel();
        }
        match want {
            Some(p) => {
                // A node that starts leading begins a term of its own: every
                // replica takes a snapshot of it first.
                let term = term.unwrap_or(p.epoch);
                self.store().lead(term);
                self.newest_term.fetch_max(term, Ordering::SeqCst);
                let l = Leading::new(term, p.replicas.clone());
                for peer in &l.peers {
                    tokio::spawn(leader::replicate(self.clone(), l.clone(), *peer));
                }
                tracing::info!(term, replicas = ?p.replicas, "leading the partition");
                *leading = Some(l);
            }
            None => {
                if term.is_some() {
                    // Demoted: what this copy holds may include writes the
                    // new primary never had; it must start from a snapshot.
                    self.store().unfollow();
                    tracing::warn!("no longer the primary; catching up from the new one");
                }
            }
        }
    }
}

/// Why a node could not run.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Its listener could not be bound.
    #[error("listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// Its address file could not be written.
    #[error("address file: {0}")]
    AddrFile(String),
    /// Its agent could not run.
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    /// Signal handlers could not be installed.
    #[error(transparent)]
    Signals(#[from] crate::signals::SignalError),
}

impl crate::exit::Failure for NodeError {
    fn exit(&self) -> crate::exit::Exit {
        match self {
            NodeError::Agent(e) => e.exit(),
            _ => crate::exit::Exit::Runtime,
        }
    }
}

/// Run a node until `shutdown`.
pub async fn run(cfg: NodeConfig, shutdown: CancellationToken) -> Result<AgentExit, NodeError> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| NodeError::Bind(cfg.listen, e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| NodeError::Bind(cfg.listen, e))?;
    if let Some(path) = &cfg.addr_file {
        crate::atomic_file::announce(path, bound)
            .await
            .map_err(|e| NodeError::AddrFile(e.to_string()))?;
    }
    let addr = NodeAddr {
        ip: bound.ip(),
        port: Some(bound.port()),
    };
    let clock = Arc::new(HlcClock::with_offset(cfg.clock_offset_ms));
    let (placed, placement) = watch::channel(None);
    let node = Arc::new(Node {
        id: cfg.id.clone(),
        addr,
        clock: clock.clone(),
        quorum: cfg.write_quorum,
        write_timeout: cfg.write_timeout,
        apply_delay: cfg.apply_delay,
        store: Mutex::new(Store::new(store::Limits {
            max_keys: cfg.max_keys,
            max_bytes: cfg.max_bytes,
            log_bytes: 64 * 1024 * 1024,
        })),
        head: watch::channel(0).0,
        placement: placement.clone(),
        newest_epoch: AtomicU64::new(0),
        newest_term: AtomicU64::new(0),
        fenced: AtomicBool::new(false),
        lease: Arc::new(Lease::default()),
        leading: Mutex::new(None),
        following: Mutex::new(Following::default()),
    });
    let server = tokio::spawn(http::serve(node.clone(), listener, shutdown.clone()));
    let roles = tokio::spawn(follow_roles(node.clone(), placement, shutdown.clone()));
    let mut agent = cfg.agent;
    agent.ip = addr;
    agent.status_url = None;
    let report = node.clone();
    let hooks = Hooks {
        report: Some(Arc::new(move || report.report())),
        clock: Some(clock),
        placement: Some(placed),
        lease: Some(node.lease.clone()),
    };
    let exit = crate::agent::run_with(agent, hooks, shutdown.clone()).await?;
    if exit == AgentExit::Terminated {
        // Fenced: refuse everything until stopped; an operator who wants it
        // back adds it to the map again and restarts it.
        node.fenced.store(true, Ordering::SeqCst);
        node.follow(None);
        shutdown.cancelled().await;
    }
    shutdown.cancel();
    let _ = roles.await;
    let _ = server.await;
    Ok(exit)
}

async fn follow_roles(
    node: Arc<Node>,
    mut placement: watch::Receiver<Option<Placement>>,
    shutdown: CancellationToken,
) {
    loop {
        let current = placement.borrow_and_update().clone();
        node.follow(current.as_ref());
        tokio::select! {
            r = placement.changed() => if r.is_err() { break },
            () = shutdown.cancelled() => break,
        }
    }
    node.follow(None);
}
