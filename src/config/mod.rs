//! Configuration files: plain serde data with documented defaults, validated
//! once at load into the typed values each part of shardgate runs on (which
//! live beside the code that uses them), so no hot path parses a string.
//!
//! This module sits above both planes: it knows their settings types, and
//! neither plane knows it.

mod agent;
mod coordinator;
mod load;
mod node;
mod proxy;

pub use agent::AgentFlags;
pub use coordinator::CoordinatorOverrides;
pub use load::{ConfigErrors, ConfigIssue, Issues, Location, TomlDoc};
pub use node::NodeFlags;
pub use proxy::ProxyOverrides;

// The validated types, where callers of `load` look for them.
pub use crate::coordinator::{CoordinatorConfig, StoreUrl};
pub use crate::proxy::ProxyConfig;
