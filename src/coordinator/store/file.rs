//! The default store: one JSON file, replaced atomically (see `atomic_file`).

use super::{Commit, RemoteNode, Store, StoreError};
use crate::coordinator::state::{Assignment, Heartbeat, NodeStatus, Persisted};
use crate::topology::NodeAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A state file owned by one coordinator.
pub struct FileStore {
    path: PathBuf,
    // Writes are serialised so an older snapshot never lands after a newer one.
    write: tokio::sync::Mutex<()>,
}

impl FileStore {
    /// A store at `path` (created on first write).
    pub fn new(path: impl Into<PathBuf>) -> FileStore {
        FileStore {
            path: path.into(),
            write: tokio::sync::Mutex::new(()),
        }
    }

    fn err(&self, source: std::io::Error) -> StoreError {
        StoreError::File {
            path: self.path.display().to_string(),
            source,
        }
    }

    async fn write(&self, state: &Persisted) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StoreError::Corrupt {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        })?;
        let _one_at_a_time = self.write.lock().await;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || crate::atomic_file::write(&path, &bytes))
            .await
            .map_err(|e| self.err(std::io::Error::other(e)))?
            .map_err(|e| self.err(e))
    }
}

impl Store for FileStore {
    async fn load(&self) -> Result<Option<Persisted>, StoreError> {
        match tokio::fs::read(&self.path).await {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt {
                        path: self.path.display().to_string(),
                        reason: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    async fn commit(
        &self,
        _expected: Option<u64>,
        state: &Persisted,
    ) -> Result<Commit, StoreError> {
        // One coordinator owns the file: there is nobody to lose a race to.
        self.write(state).await.map(|()| Commit::Won)
    }

    async fn save_nodes(&self, state: &Persisted) -> Result<(), StoreError> {
        self.write(state).await
    }

    async fn record_heartbeat(
        &self,
        _: &Heartbeat,
        _: NodeStatus,
        _: i64,
        _: Duration,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    async fn mark_dead(&self, _: &[String]) -> Result<(), StoreError> {
        Ok(())
    }

    async fn claim_told(&self, _: &str, _: Assignment) -> Result<bool, StoreError> {
        Ok(true)
    }

    async fn lead(&self) -> Result<bool, StoreError> {
        Ok(true)
    }

    async fn remote_nodes(&self) -> Result<Vec<RemoteNode>, StoreError> {
        Ok(Vec::new())
    }

    async fn replication_lag(&self) -> Result<Vec<(NodeAddr, u64)>, StoreError> {
        Ok(Vec::new())
    }

    async fn prune(&self, _: Duration) -> Result<u64, StoreError> {
        Ok(0)
    }

    fn is_shared(&self) -> bool {
        false
    }
}
