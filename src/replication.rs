//! What a node says of its replication (SPEC §7), as the node, its agent and
//! the coordinator all read it. Below both planes: the node produces it, the
//! agent carries it in the heartbeat, the coordinator ranks replicas by it.

use crate::clock::Hlc;
use serde::{Deserialize, Serialize};

/// How a node's copy stands against its primary's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReplicaState {
    /// Applied everything the primary last said it had (a primary is always in sync).
    #[default]
    InSync,
    /// Behind, and still receiving.
    Lagging,
    /// Has heard nothing from its primary for too long, or never caught up.
    Stalled,
}

impl ReplicaState {
    /// As the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::InSync => "IN_SYNC",
            ReplicaState::Lagging => "LAGGING",
            ReplicaState::Stalled => "STALLED",
        }
    }

    /// Read the API's spelling.
    pub fn parse(s: &str) -> Option<ReplicaState> {
        match s {
            "IN_SYNC" => Some(ReplicaState::InSync),
            "LAGGING" => Some(ReplicaState::Lagging),
            "STALLED" => Some(ReplicaState::Stalled),
            _ => None,
        }
    }
}

/// A node's role as it knows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Not placed by the map (yet).
    #[default]
    Unassigned,
    /// Its partition's primary: takes writes.
    Primary,
    /// A replica: applies its primary's writes, serves reads.
    Replica,
}

impl Role {
    /// As the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Unassigned => "unassigned",
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }

    /// Read the API's spelling; anything else is unassigned.
    pub fn parse(s: &str) -> Role {
        match s {
            "primary" => Role::Primary,
            "replica" => Role::Replica,
            _ => Role::Unassigned,
        }
    }
}

/// One node's replication status (`GET /_shardgate/status`, the heartbeat's
/// `replication` field).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicationReport {
    /// Its role.
    pub role: Role,
    /// The newest write it has applied.
    pub applied: Hlc,
    /// Bytes of writes its primary has that it has not applied.
    pub lag_bytes: u64,
    /// How far its newest write is behind its primary's, in milliseconds.
    pub lag_ms: u64,
    /// In sync, lagging or stalled.
    pub state: ReplicaState,
    /// How many writes it has applied in its primary's log.
    pub sequence: u64,
}

/// How far a replica had got, as a shared store last recorded it (another
/// coordinator may have heard its heartbeat).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The newest write it had applied.
    pub applied: Hlc,
    /// Bytes it was behind its primary.
    pub lag_bytes: u64,
}
