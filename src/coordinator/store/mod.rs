//! Where the coordinator's state lives: one interface, two stores.
//!
//! - `FileStore`: a local JSON state file, written atomically; one coordinator.
//! - `PgStore`: PostgreSQL with the SPEC §4 schema; several coordinators share
//!   it, one leads (advisory lock), promotions are compare-and-set on the epoch.
//! - `EtcdStore`: etcd; several coordinators share it, one leads (a leased
//!   key), and every change the leader makes is fenced by that key's revision.

mod etcd;
mod file;
mod migrate;
mod postgres;

pub use etcd::{EtcdStore, EtcdUrl};
pub use file::FileStore;
pub use migrate::{MigrateError, migrate_store};
pub use postgres::{PgStore, migrations};

use super::state::{Assignment, Heartbeat, NodeStatus, Persisted, ReplicationRow, Usage};
use crate::replication::Progress;
use crate::topology::NodeAddr;
use std::future::Future;
use std::time::Duration;

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the state file failed.
    #[error("state file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The state file is not valid state.
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// PostgreSQL refused or failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// Data in PostgreSQL or etcd breaks an invariant.
    #[error("store data: {0}")]
    Data(String),
    /// etcd refused, failed, or did not answer in time (no majority?).
    #[error("etcd: {0}")]
    Etcd(String),
}

/// Whether a compare-and-set commit won.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Written.
    Won,
    /// Someone else changed the epoch first; nothing was written.
    Lost,
}

/// A heartbeat as another coordinator recorded it (shared stores only).
#[derive(Clone, Debug)]
pub struct RemoteNode {
    /// Stable name.
    pub id: String,
    /// Address.
    pub addr: NodeAddr,
    /// Time since its last heartbeat, by the store's clock.
    pub age: Duration,
    /// Last usage.
    pub usage: Usage,
    /// Last clock skew, ms.
    pub skew_ms: i64,
}

/// What every store keeps: the state that must survive a restart.
pub trait Store: Send + Sync + 'static {
    /// The duties of a store several coordinators share; [`NotShared`] for
    /// one that a single coordinator owns.
    type Shared: SharedStore;

    /// This store's shared duties, if several coordinators may share it.
    fn shared(&self) -> Option<&Self::Shared>;

    /// The persisted state, or `None` if the store is empty.
    fn load(&self) -> impl Future<Output = Result<Option<Persisted>, StoreError>> + Send;

    /// Write `state` if the epoch in the store is still `expected` (`None`:
    /// the store must be empty). Promotions and operator maps go through here.
    fn commit(
        &self,
        expected: Option<u64>,
        state: &Persisted,
    ) -> impl Future<Output = Result<Commit, StoreError>> + Send;

    /// Persist node registrations and what nodes were told (no epoch change).
    fn save_nodes(&self, state: &Persisted) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Keep the replication rows (`replication_logs`) current: each
    /// (primary, replica) pair's latest report. Never raises the epoch.
    fn save_replication(
        &self,
        rows: &[ReplicationRow],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// What a store shared by several coordinators adds: one of them leads, and
/// each learns the heartbeats the others heard.
pub trait SharedStore: Send + Sync + 'static {
    /// Become or stay the leader; `false` while another coordinator leads.
    fn lead(&self) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Record one heartbeat (history, usage, liveness) for the others to see.
    fn record_heartbeat(
        &self,
        hb: &Heartbeat,
        status: NodeStatus,
        skew_ms: i64,
        handling: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Atomically note that `node` is being told `assignment`; `true` only for
    /// the one caller that changed it, so REBALANCE goes out exactly once
    /// however many coordinators hear the node.
    fn claim_told(
        &self,
        node: &str,
        assignment: Assignment,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Heartbeats every coordinator recorded, for the leader's sweep.
    fn remote_nodes(&self) -> impl Future<Output = Result<Vec<RemoteNode>, StoreError>> + Send;

    /// How far each replica had got, per address, as last recorded by any
    /// coordinator.
    fn replication_progress(
        &self,
    ) -> impl Future<Output = Result<Vec<(NodeAddr, Progress)>, StoreError>> + Send;

    /// Record nodes the leader's sweep found DEAD.
    fn mark_dead(&self, ids: &[String]) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Drop heartbeat history older than `retention`.
    fn prune(&self, retention: Duration) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Give up the lead at once, on a clean shutdown, rather than when it
    /// would lapse.
    fn resign(&self) -> impl Future<Output = ()> + Send;

    /// Return when the shared state may have changed, or after `period`
    /// at the latest: a store that can watch wakes followers at once, one
    /// that cannot is polled every `period`.
    fn changed(&self, period: Duration) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(period)
    }
}

/// The shared duties of a store no other coordinator shares: there are
/// none. The type has no values, so none of its methods can ever run.
#[derive(Debug)]
pub enum NotShared {}

impl SharedStore for NotShared {
    async fn lead(&self) -> Result<bool, StoreError> {
        match *self {}
    }

    async fn record_heartbeat(
        &self,
        _: &Heartbeat,
        _: NodeStatus,
        _: i64,
        _: Duration,
    ) -> Result<(), StoreError> {
        match *self {}
    }

    async fn claim_told(&self, _: &str, _: Assignment) -> Result<bool, StoreError> {
        match *self {}
    }

    async fn remote_nodes(&self) -> Result<Vec<RemoteNode>, StoreError> {
        match *self {}
    }

    async fn replication_progress(&self) -> Result<Vec<(NodeAddr, Progress)>, StoreError> {
        match *self {}
    }

    async fn mark_dead(&self, _: &[String]) -> Result<(), StoreError> {
        match *self {}
    }

    async fn prune(&self, _: Duration) -> Result<u64, StoreError> {
        match *self {}
    }

    async fn resign(&self) {
        match *self {}
    }
}
