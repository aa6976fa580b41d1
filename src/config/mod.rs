//! Configuration: plain serde data with documented defaults, validated once at
//! load into typed values, so the hot path never parses a string.

mod coordinator;
mod load;
mod proxy;
mod secret;

pub use coordinator::{CoordinatorConfig, CoordinatorOverrides, StoreUrl};
pub use load::{ConfigErrors, ConfigIssue, Issues, Location, TomlDoc};
pub use proxy::{
    AllOpen, BreakerPolicy, FailoverBuffer, Limits, LogConfig, LogFormat, PoolConfig, ProxyConfig,
    ProxyFile, ProxyOverrides, RoutingConfig, RuntimeConfig, ServerConfig, Timeouts,
    TopologySource, WatchConfig,
};
pub use secret::Secret;
