//! The etcd store: several coordinators share their state through a Raft
//! cluster (`--store etcd://h1:2379,h2:2379,h3:2379/prefix`).
//!
//! Keys, under the prefix:
//!
//! | key | value | written |
//! |---|---|---|
//! | `state` | the persisted state (map, fencing, nodes), JSON | on a commit, and when nodes change |
//! | `epoch` | the map's epoch, decimal | with `state`, in the same transaction |
//! | `leader` | the leading coordinator's id, under its lease | on taking the lead |
//! | `heard/<coordinator>` | the newest heartbeat of every node it hears, JSON, under its lease | at most every quarter second, when something changed |
//! | `told/<node>` | the assignment the node was last told | on REBALANCE |
//! | `replication/<coordinator>` | the replication rows it last heard | at most once a second, on change |
//! | `status/<node>` | `DEAD`, once the leader's sweep found it silent | on the change |
//!
//! **Leadership and fencing by revision.** A coordinator leads while the
//! `leader` key it created, under its own lease, exists. Every change it
//! makes as leader is a transaction conditioned on that key's create
//! revision: if its lease lapsed (it was paused, cut off, or slow) and
//! another coordinator took the key, the key's create revision is another
//! one, and the deposed leader's late write fails, whatever it believes.
//! A lock alone would not fence: the holder cannot know it lost it.
//!
//! **Heartbeats are not etcd writes, and never wait on etcd for long.**
//! Registrations are written by the flusher; the one call on the heartbeat
//! path, the claim that makes REBALANCE go out once, is bounded
//! (`CLAIM_WITHIN`), and a claim that cannot be made defers the REBALANCE to
//! the node's next heartbeat. Each coordinator keeps the newest
//! heartbeat of each node it hears in memory and a background task writes
//! the whole set as one key at most every [`FLUSH_EVERY`], so etcd sees a
//! few writes per second per coordinator whatever the number of nodes.
//! The leader learns the nodes other coordinators hear by reading those
//! keys each sweep, and times them by its own clock: a node's heartbeat
//! count changing is news, and the age is counted from when the leader saw
//! it change (plus the age the writer recorded), so coordinators' clocks
//! never enter liveness. A coordinator's key lives under its lease: when it
//! dies, what it heard goes with it after the lease's TTL.
//!
//! **What a leader change costs.** The old leader's lease must lapse (its
//! TTL, `heartbeat_timeout` rounded up to whole seconds, at least 2 s), then
//! the next sweep of another coordinator takes the key. Nodes' liveness is
//! not lost: it is in the `heard` keys. A failover that was due is decided
//! by the new leader with up to `FLUSH_EVERY` plus a sweep of extra delay.
//!
//! **etcd unreachable or without a majority.** Every request has a deadline
//! ([`REQUEST_TIMEOUT`]); a coordinator keeps serving the map it has,
//! refuses promotions and changes with the store's error, and takes
//! heartbeats as before (they touch only memory). When etcd is back, the
//! next sweep resumes.

use super::{Commit, RemoteNode, SharedStore, Store, StoreError};
use crate::clock::Hlc;
use crate::coordinator::state::{
    Assignment, Heartbeat, NodeStatus, Persisted, ReplicationRow, Usage,
};
use crate::replication::Progress;
use crate::topology::NodeAddr;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, Txn, TxnOp, TxnOpResponse,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// How often, at most, a coordinator writes the heartbeats it heard.
pub(super) const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Deadline of every etcd request: without a majority, etcd does not
/// answer, and the coordinator must say so rather than hang.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a heartbeat may wait for its REBALANCE claim.
const CLAIM_WITHIN: Duration = Duration::from_millis(500);

/// Tries of one request that etcd (or the way to it) answered Unavailable.
const TRIES: u32 = 3;

/// Evaluate `$request` (an etcd call, built afresh each time) and send it
/// again, up to [`TRIES`] times in all, while it fails as unavailable or
/// timed out: with a member down, the client's balancer may still pick that
/// member for a while, and the request fails or waits out its deadline
/// there without reaching the cluster. Every request this store sends is
/// safe to repeat: reads, whole-key puts, and transactions conditioned on
/// what they change. (One repeat can mislead: a `claim_told` that was
/// applied but answered Unavailable reads, repeated, as another
/// coordinator's claim, and the REBALANCE waits for the node's next change.)
macro_rules! retrying {
    ($request:expr) => {{
        let mut tries = 1;
        loop {
            match $request.await {
                Err(etcd_client::Error::GRpcStatus(s))
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::Cancelled
                            | tonic::Code::DeadlineExceeded
                    ) && tries < TRIES =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                r => break r,
            }
        }
    }};
}

/// `etcd://h1:2379,h2:2379/prefix`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdUrl {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    /// Key prefix, without a trailing slash (`/shardgate` by default).
    pub prefix: String,
}

impl EtcdUrl {
    /// Parse `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`.
    pub fn parse(url: &str) -> Result<EtcdUrl, String> {
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("{url:?}: expected etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"))?;
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let endpoints: Vec<String> = hosts.split(',').map(str::trim).map(str::to_owned).collect();
        for e in &endpoints {
            let port = e.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
            if !matches!(port, Some((h, Ok(p))) if !h.is_empty() && p != 0) {
                return Err(format!("{url:?}: {e:?} is not HOST:PORT"));
            }
        }
        Ok(EtcdUrl {
            endpoints,
            prefix: if prefix.is_empty() {
                "/shardgate".to_owned()
            } else {
                prefix.to_owned()
            },
        })
    }
}

impl std::fmt::Display for EtcdUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd://{}{}", self.endpoints.join(","), self.prefix)
    }
}

impl From<etcd_client::Error> for StoreError {
    fn from(e: etcd_client::Error) -> StoreError {
        StoreError::Etcd(e.to_string())
    }
}

/// A coordinator's share of an etcd cluster.
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    prefix: String,
    id: String,
    ttl: i64,
    leadership: tokio::sync::Mutex<Leadership>,
    heard: Mutex<Heard>,
    /// For each (coordinator, node): the heartbeat count last seen and when
    /// this coordinator saw it change.
    observed: Mutex<HashMap<(String, String), (u64, Instant)>>,
    /// Bumped by the watch on `epoch`; the follower waits on it.
    epoch_changes: tokio::sync::Mutex<tokio::sync::watch::Receiver<i64>>,
}

#[derive(Default)]
struct Leadership {
    lease: Option<(i64, LeaseKeeper, LeaseKeepAliveStream)>,
    /// The create revision of the `leader` key this coordinator made.
    revision: Option<i64>,
}

#[derive(Default)]
struct Heard {
    nodes: HashMap<String, HeardNode>,
    dirty: bool,
    /// Node registrations to persist with the next flush.
    state: Option<Persisted>,
}

struct HeardNode {
    addr: NodeAddr,
    usage: Usage,
    skew_ms: i64,
    beats: u64,
    at: Instant,
}

/// One node in a coordinator's `heard` key.
#[derive(Serialize, Deserialize)]
struct HeardEntry {
    addr: NodeAddr,
    cpu: f64,
    mem: i64,
    conns: i64,
    skew_ms: i64,
    /// Heartbeats this coordinator has heard from it.
    beats: u64,
    /// How old the newest was when the key was written.
    age_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct HeardDoc {
    /// The writer's clock, Unix ms: used only the first time the leader sees
    /// a node, when it has no observation of its own yet.
    written_ms: i64,
    nodes: HashMap<String, HeardEntry>,
}

#[derive(Serialize, Deserialize)]
struct ReplicationEntry {
    target: NodeAddr,
    applied: u64,
    lag_bytes: u64,
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Data(format!("etcd {what}: {e}"))
}

impl EtcdStore {
    /// Connect to `url` as coordinator `id`; leases last `heartbeat_timeout`
    /// rounded up to whole seconds (etcd's unit), at least two.
    pub async fn connect(
        url: &EtcdUrl,
        id: &str,
        heartbeat_timeout: Duration,
    ) -> Result<EtcdStore, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), REQUEST_TIMEOUT);
        let client = Client::connect(&url.endpoints, Some(options)).await?;
        let (epoch_tx, epoch_rx) = tokio::sync::watch::channel(0);
        let inner = Arc::new(Inner {
            client,
            prefix: url.prefix.clone(),
            id: id.to_owned(),
            ttl: (heartbeat_timeout.as_secs_f64().ceil() as i64).max(2),
            leadership: tokio::sync::Mutex::default(),
            heard: Mutex::default(),
            observed: Mutex::default(),
            epoch_changes: tokio::sync::Mutex::new(epoch_rx),
        });
        tokio::spawn(flusher(Arc::downgrade(&inner)));
        tokio::spawn(watch_epoch(Arc::downgrade(&inner), epoch_tx));
        Ok(EtcdStore { inner })
    }
}

impl Inner {
    fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    fn leader_key(&self) -> String {
        self.key("leader")
    }

    /// The lease this coordinator's keys live under, granted or renewed.
    ///
    /// A keep-alive stream runs to one member; when that member goes away
    /// the stream breaks but the lease lives on in the cluster, so the same
    /// lease is renewed over a new stream, and leadership does not move
    /// because one member died. Only etcd saying the lease is gone (TTL 0)
    /// ends it.
    async fn lease(&self, l: &mut Leadership) -> Result<i64, StoreError> {
        if let Some((id, keeper, stream)) = &mut l.lease {
            let id = *id;
            match renew(keeper, stream).await {
                Ok(true) => return Ok(id),
                Ok(false) => {}
                Err(_) => match self.reopen(id).await {
                    Ok(Some(renewed)) => {
                        l.lease = Some(renewed);
                        return Ok(id);
                    }
                    Ok(None) => {}
                    Err(e) => return Err(e),
                },
            }
            tracing::warn!("etcd lease lapsed; any lead this coordinator had is lost");
            l.lease = None;
            l.revision = None;
        }
        let id = retrying!(self.client.lease_client().grant(self.ttl, None))?.id();
        l.lease = self.reopen(id).await?;
        Ok(id)
    }

    /// A new keep-alive stream for lease `id`, renewed once; `None` if
    /// etcd says the lease is gone.
    async fn reopen(
        &self,
        id: i64,
    ) -> Result<Option<(i64, LeaseKeeper, LeaseKeepAliveStream)>, StoreError> {
        let (mut keeper, mut stream) = tokio::time::timeout(REQUEST_TIMEOUT, async {
            retrying!(self.client.lease_client().keep_alive(id))
        })
        .await
        .map_err(|_| {
            StoreError::Etcd(format!("no keep-alive stream within {REQUEST_TIMEOUT:?}"))
        })??;
        Ok(renew(&mut keeper, &mut stream)
            .await?
            .then_some((id, keeper, stream)))
    }

    /// Write `state` only over the map it was taken with: a snapshot older
    /// than the stored map must not put that map back (its nodes are written
    /// with the next change).
    async fn save_state_over_its_epoch(&self, state: &Persisted) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(state).map_err(|e| corrupt("state", e))?;
        let txn = Txn::new()
            .when(vec![Compare::value(
                self.key("epoch"),
                CompareOp::Equal,
                state.map.cluster_epoch.to_string(),
            )])
            .and_then(vec![TxnOp::put(self.key("state"), bytes, None)]);
        retrying!(self.client.kv_client().txn(txn.clone()))?;
        Ok(())
    }

    /// The compare that fences a leader's writes, if this coordinator leads.
    async fn fence(&self) -> Option<Compare> {
        let revision = self.leadership.lock().await.revision?;
        Some(Compare::create_revision(
            self.leader_key(),
            CompareOp::Equal,
            revision,
        ))
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let state = self
            .heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state
            .take();
        if let Some(state) = state
            && let Err(e) = self.save_state_over_its_epoch(&state).await
        {
            let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
            heard.state.get_or_insert(state);
            return Err(e);
        }
        let doc = {
            let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
            if !std::mem::take(&mut heard.dirty) {
                return Ok(());
            }
            let now = Instant::now();
            HeardDoc {
                written_ms: unix_ms(),
                nodes: heard
                    .nodes
                    .iter()
                    .map(|(id, n)| {
                        (
                            id.clone(),
                            HeardEntry {
                                addr: n.addr,
                                cpu: n.usage.cpu_percent,
                                mem: n.usage.free_memory_bytes,
                                conns: n.usage.active_connections,
                                skew_ms: n.skew_ms,
                                beats: n.beats,
                                age_ms: now.saturating_duration_since(n.at).as_millis() as u64,
                            },
                        )
                    })
                    .collect(),
            }
        };
        let bytes = serde_json::to_vec(&doc).map_err(|e| corrupt("heard", e))?;
        let lease = self.leadership.lock().await.lease.as_ref().map(|l| l.0);
        let options = lease.map(|id| PutOptions::new().with_lease(id));
        let key = self.key(&format!("heard/{}", self.id));
        let put = retrying!(self.client.kv_client().put(
            key.clone(),
            bytes.clone(),
            options.clone()
        ));
        if put.is_err() {
            // Written again with the next flush.
            self.heard.lock().unwrap_or_else(|e| e.into_inner()).dirty = true;
        }
        put.map(|_| ()).map_err(StoreError::from)
    }
}

/// Renew a lease once over its stream: `true` while it lives, `false` once
/// etcd says it lapsed. The stream has no request deadline of its own.
async fn renew(
    keeper: &mut LeaseKeeper,
    stream: &mut LeaseKeepAliveStream,
) -> Result<bool, StoreError> {
    let renewed = tokio::time::timeout(REQUEST_TIMEOUT, async {
        keeper.keep_alive().await?;
        stream.message().await
    })
    .await
    .map_err(|_| {
        StoreError::Etcd(format!(
            "the lease was not renewed within {REQUEST_TIMEOUT:?}"
        ))
    })??;
    match renewed {
        Some(r) => Ok(r.ttl() > 0),
        None => Err(StoreError::Etcd("the keep-alive stream ended".into())),
    }
}

/// Writes what this coordinator heard, at most every `FLUSH_EVERY`, until
/// the store is dropped. A failed write is retried with the next.
async fn flusher(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match inner.flush().await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("recording heartbeats in etcd again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(
                    "cannot record heartbeats in etcd (heartbeats are still answered): {e}"
                );
            }
            Err(_) => {}
        }
    }
}

/// Follows the `epoch` key with an etcd watch, so followers adopt a new map
/// as soon as it is committed; re-established after any error.
async fn watch_epoch(inner: Weak<Inner>, changes: tokio::sync::watch::Sender<i64>) {
    loop {
        let (mut client, key) = match inner.upgrade() {
            Some(i) => (i.client.watch_client(), i.key("epoch")),
            None => return,
        };
        if let Ok(mut stream) = client.watch(key, None).await {
            while let Ok(Some(resp)) = stream.message().await {
                if resp.canceled() {
                    break;
                }
                let revision = resp.header().map_or(0, |h| h.revision());
                changes.send_replace(revision);
                if inner.strong_count() == 0 {
                    return;
                }
            }
        }
        if changes.is_closed() || inner.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl Store for EtcdStore {
    type Shared = EtcdStore;

    fn shared(&self) -> Option<&EtcdStore> {
        Some(self)
    }

    async fn load(&self) -> Result<Option<Persisted>, StoreError> {
        let resp = retrying!(
            self.inner
                .client
                .kv_client()
                .get(self.inner.key("state"), None)
        )?;
        match resp.kvs().first() {
            Some(kv) => serde_json::from_slice(kv.value())
                .map(Some)
                .map_err(|e| corrupt("state", e)),
            None => Ok(None),
        }
    }

    async fn commit(&self, expected: Option<u64>, state: &Persisted) -> Result<Commit, StoreError> {
        let inner = &self.inner;
        let epoch_key = inner.key("epoch");
        let mut when = vec![match expected {
            Some(e) => Compare::value(epoch_key.clone(), CompareOp::Equal, e.to_string()),
            None => Compare::create_revision(epoch_key.clone(), CompareOp::Equal, 0),
        }];
        when.extend(inner.fence().await);
        let bytes = serde_json::to_vec(state).map_err(|e| corrupt("state", e))?;
        let txn = Txn::new().when(when).and_then(vec![
            TxnOp::put(inner.key("state"), bytes, None),
            TxnOp::put(epoch_key, state.map.cluster_epoch.to_string(), None),
        ]);
        let resp = retrying!(inner.client.kv_client().txn(txn.clone()))?;
        Ok(if resp.succeeded() {
            Commit::Won
        } else {
            Commit::Lost
        })
    }

    async fn save_nodes(&self, state: &Persisted) -> Result<(), StoreError> {
        // On the heartbeat path: kept for the flusher, so a heartbeat never
        // waits on etcd (a registration lost with a crash is made again by
        // the node's next heartbeat).
        let mut heard = self.inner.heard.lock().unwrap_or_else(|e| e.into_inner());
        heard.state = Some(state.clone());
        Ok(())
    }

    async fn save_replication(&self, rows: &[ReplicationRow]) -> Result<(), StoreError> {
        let entries: Vec<ReplicationEntry> = rows
            .iter()
            .map(|r| ReplicationEntry {
                target: r.target_addr,
                applied: r.report.applied.as_u64(),
                lag_bytes: r.report.lag_bytes,
            })
            .collect();
        let bytes = serde_json::to_vec(&entries).map_err(|e| corrupt("replication", e))?;
        let inner = &self.inner;
        let key = inner.key(&format!("replication/{}", inner.id));
        retrying!(
            inner
                .client
                .kv_client()
                .put(key.clone(), bytes.clone(), None)
        )?;
        Ok(())
    }
}

impl SharedStore for EtcdStore {
    /// The lease goes, and with it the lead and what this coordinator heard.
    async fn resign(&self) {
        let lease = self.inner.leadership.lock().await.lease.take();
        if let Some((id, _, _)) = lease {
            let _ = self.inner.client.lease_client().revoke(id).await;
        }
    }

    async fn lead(&self) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let mut l = inner.leadership.lock().await;
        let lease = inner.lease(&mut l).await?;
        let key = inner.leader_key();
        // Take the key if nobody holds it; either way, read who does.
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key.clone(),
                inner.id.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else(vec![TxnOp::get(key, None)]);
        let resp = retrying!(inner.client.kv_client().txn(txn.clone()))?;
        let revision = if resp.succeeded() {
            resp.header().map(|h| h.revision())
        } else {
            resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .filter(|kv| kv.lease() == lease && kv.value() == inner.id.as_bytes())
                    .map(|kv| kv.create_revision()),
                _ => None,
            })
        };
        if revision.is_some() && l.revision.is_none() {
            tracing::info!(coordinator = %inner.id, "took the lead in etcd");
        }
        l.revision = revision;
        Ok(revision.is_some())
    }

    async fn record_heartbeat(
        &self,
        hb: &Heartbeat,
        _status: NodeStatus,
        skew_ms: i64,
        _handling: Duration,
    ) -> Result<(), StoreError> {
        // Memory only: the flusher writes it (see the module comment).
        let mut heard = self.inner.heard.lock().unwrap_or_else(|e| e.into_inner());
        let n = heard.nodes.entry(hb.node_id.clone()).or_insert(HeardNode {
            addr: hb.addr,
            usage: hb.usage,
            skew_ms,
            beats: 0,
            at: Instant::now(),
        });
        n.addr = hb.addr;
        n.usage = hb.usage;
        n.skew_ms = skew_ms;
        n.beats += 1;
        n.at = Instant::now();
        heard.dirty = true;
        Ok(())
    }

    async fn claim_told(&self, node: &str, assignment: Assignment) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let key = inner.key(&format!("told/{node}"));
        let value = serde_json::to_vec(&assignment).map_err(|e| corrupt("told", e))?;
        let txn = Txn::new()
            .when(vec![Compare::value(
                key.clone(),
                CompareOp::Equal,
                value.clone(),
            )])
            .or_else(vec![TxnOp::put(key, value, None)]);
        // On the heartbeat path, so bounded: past it the caller answers
        // CONTINUE and tries again with the node's next heartbeat.
        let claimed = tokio::time::timeout(CLAIM_WITHIN, async {
            retrying!(inner.client.kv_client().txn(txn.clone()))
        })
        .await
        .map_err(|_| StoreError::Etcd(format!("no answer within {CLAIM_WITHIN:?}")))??;
        // Already equal: another coordinator told it.
        Ok(!claimed.succeeded())
    }

    async fn remote_nodes(&self) -> Result<Vec<RemoteNode>, StoreError> {
        let inner = &self.inner;
        let resp = retrying!(
            inner
                .client
                .kv_client()
                .get(inner.key("heard/"), Some(GetOptions::new().with_prefix()))
        )?;
        let now = Instant::now();
        let now_ms = unix_ms();
        let mut observed = inner.observed.lock().unwrap_or_else(|e| e.into_inner());
        let mut newest: HashMap<String, RemoteNode> = HashMap::new();
        for kv in resp.kvs() {
            let writer = String::from_utf8_lossy(kv.key())
                .rsplit('/')
                .next()
                .unwrap_or("")
                .to_owned();
            let Ok(doc) = serde_json::from_slice::<HeardDoc>(kv.value()) else {
                tracing::warn!(%writer, "unreadable heartbeat record in etcd, ignored");
                continue;
            };
            for (id, e) in doc.nodes {
                let age_then = Duration::from_millis(e.age_ms);
                let seen = observed
                    .entry((writer.clone(), id.clone()))
                    .or_insert_with(|| {
                        // First sight: the writer's clock says how long ago.
                        let since_write = Duration::from_millis(
                            now_ms.saturating_sub(doc.written_ms).max(0) as u64,
                        );
                        (e.beats, now.checked_sub(since_write).unwrap_or(now))
                    });
                if seen.0 != e.beats {
                    *seen = (e.beats, now);
                }
                let age = now.saturating_duration_since(seen.1) + age_then;
                let node = RemoteNode {
                    id: id.clone(),
                    addr: e.addr,
                    age,
                    usage: Usage {
                        cpu_percent: e.cpu,
                        free_memory_bytes: e.mem,
                        active_connections: e.conns,
                    },
                    skew_ms: e.skew_ms,
                };
                match newest.get(&id) {
                    Some(have) if have.age <= node.age => {}
                    _ => {
                        newest.insert(id, node);
                    }
                }
            }
        }
        Ok(newest.into_values().collect())
    }

    async fn replication_progress(&self) -> Result<Vec<(NodeAddr, Progress)>, StoreError> {
        let inner = &self.inner;
        let resp = retrying!(inner.client.kv_client().get(
            inner.key("replication/"),
            Some(GetOptions::new().with_prefix())
        ))?;
        let mut best: HashMap<NodeAddr, Progress> = HashMap::new();
        for kv in resp.kvs() {
            let Ok(rows) = serde_json::from_slice::<Vec<ReplicationEntry>>(kv.value()) else {
                continue;
            };
            for r in rows {
                let p = Progress {
                    applied: Hlc::from_u64(r.applied),
                    lag_bytes: r.lag_bytes,
                };
                let e = best.entry(r.target).or_insert(p);
                if p.applied > e.applied {
                    *e = p;
                }
            }
        }
        Ok(best.into_iter().collect())
    }

    async fn mark_dead(&self, ids: &[String]) -> Result<(), StoreError> {
        let inner = &self.inner;
        let ops: Vec<TxnOp> = ids
            .iter()
            .map(|id| TxnOp::put(inner.key(&format!("status/{id}")), "DEAD", None))
            .collect();
        let when: Vec<Compare> = inner.fence().await.into_iter().collect();
        let txn = Txn::new().when(when).and_then(ops);
        retrying!(inner.client.kv_client().txn(txn.clone()))?;
        Ok(())
    }

    async fn changed(&self, period: Duration) {
        let mut rx = self.inner.epoch_changes.lock().await;
        let _ = tokio::time::timeout(period, rx.changed()).await;
    }

    async fn prune(&self, _retention: Duration) -> Result<u64, StoreError> {
        // Nothing piles up: heartbeats are one key per coordinator, under
        // its lease, and the observations of writers gone are dropped here.
        let mut observed = self
            .inner
            .observed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let before = observed.len();
        observed.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(3600));
        Ok((before - observed.len()) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_members_and_a_prefix() {
        let u = EtcdUrl::parse("etcd://10.0.0.1:2379,10.0.0.2:2379/prod/shardgate/").unwrap();
        assert_eq!(u.endpoints, ["10.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!(u.prefix, "/prod/shardgate");
        assert_eq!(
            u.to_string(),
            "etcd://10.0.0.1:2379,10.0.0.2:2379/prod/shardgate"
        );
        let bare = EtcdUrl::parse("etcd://127.0.0.1:2379").unwrap();
        assert_eq!(bare.prefix, "/shardgate");
        for bad in [
            "etcd://",
            "etcd://host",
            "etcd://h:0",
            "etcd://:2379",
            "http://h:2379",
        ] {
            assert!(EtcdUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
