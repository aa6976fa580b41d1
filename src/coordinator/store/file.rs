//! The default store: one JSON file, replaced atomically (see `atomic_file`).

use super::{Commit, NotShared, Store, StoreError};
use crate::coordinator::state::{Persisted, ReplicationRow};
use std::path::PathBuf;

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
        self.replace(self.path.clone(), bytes).await
    }

    async fn replace(&self, path: PathBuf, bytes: Vec<u8>) -> Result<(), StoreError> {
        tokio::task::spawn_blocking(move || crate::atomic_file::write(&path, &bytes))
            .await
            .map_err(|e| self.err(std::io::Error::other(e)))?
            .map_err(|e| self.err(e))
    }

    /// The replication rows' file, beside the state file: they change with
    /// every write the cluster takes, the map hardly ever, so they are kept
    /// apart and the state file is only rewritten when the map or the nodes
    /// change.
    pub fn replication_path(&self) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_owned();
        name.push(".replication");
        self.path.with_file_name(name)
    }
}

impl Store for FileStore {
    type Shared = NotShared;

    fn shared(&self) -> Option<&NotShared> {
        None
    }

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

    async fn save_replication(&self, rows: &[ReplicationRow]) -> Result<(), StoreError> {
        let doc = serde_json::json!({
            "replication": rows.iter().map(ReplicationRow::to_json).collect::<Vec<_>>()
        });
        let bytes = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        self.replace(self.replication_path(), bytes).await
    }
}
