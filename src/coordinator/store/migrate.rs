//! `shardgate coordinator migrate-store`: the cluster state, epoch and all,
//! from one store into an empty one.

use super::{Commit, EtcdStore, FileStore, PgStore, Store, StoreError};
use crate::coordinator::StoreUrl;
use crate::coordinator::state::Persisted;
use crate::exit::{Exit, Failure};
use std::time::Duration;

/// Why a store migration stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// There is nothing to copy.
    #[error("the source store holds no cluster state")]
    Empty,
    /// The destination is in use; it is left as it was.
    #[error("the destination store already holds cluster state (epoch {0}); nothing was copied")]
    NotEmpty(u64),
    /// A store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Failure for MigrateError {
    fn exit(&self) -> Exit {
        match self {
            MigrateError::Empty | MigrateError::NotEmpty(_) => Exit::Invalid,
            MigrateError::Store(_) => Exit::Runtime,
        }
    }
}

/// `shardgate coordinator migrate-store`: copy the state in `from` into
/// the empty store `to`, epoch and all; returns what was copied. Run it with
/// the coordinators stopped: a change made meanwhile would not come along.
pub async fn migrate_store(
    from: &StoreUrl,
    to: &StoreUrl,
    id: &str,
) -> Result<Persisted, MigrateError> {
    let state = match from {
        StoreUrl::File(p) => FileStore::new(p.clone()).load().await?,
        StoreUrl::Postgres(u) => PgStore::connect(u, id).await?.load().await?,
        StoreUrl::Etcd(u) => {
            EtcdStore::connect(u, id, Duration::from_secs(2))
                .await?
                .load()
                .await?
        }
    }
    .ok_or(MigrateError::Empty)?;
    match to {
        StoreUrl::File(p) => copy_into(&FileStore::new(p.clone()), &state).await?,
        StoreUrl::Postgres(u) => copy_into(&PgStore::connect(u, id).await?, &state).await?,
        StoreUrl::Etcd(u) => {
            copy_into(
                &EtcdStore::connect(u, id, Duration::from_secs(2)).await?,
                &state,
            )
            .await?;
        }
    }
    Ok(state)
}

/// Write `state` into `store`, only if it holds none.
async fn copy_into<S: Store>(store: &S, state: &Persisted) -> Result<(), MigrateError> {
    if let Some(existing) = store.load().await? {
        return Err(MigrateError::NotEmpty(existing.map.cluster_epoch));
    }
    match store.commit(None, state).await? {
        Commit::Won => Ok(()),
        Commit::Lost => match store.load().await? {
            Some(existing) => Err(MigrateError::NotEmpty(existing.map.cluster_epoch)),
            None => Err(MigrateError::Empty),
        },
    }
}
