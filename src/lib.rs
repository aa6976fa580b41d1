//! shardgate: a layer-7 sharding reverse proxy and its control plane.
//!
//! Layout: `topology` (the shard map, shared by both planes) sits at the
//! bottom. The data plane is `proxy`, built from `routing`, `upstream`,
//! `resilience` and `telemetry`. `config` turns files into typed values;
//! `server` holds the accept loops every listener shares.

pub mod cli;
pub mod config;
pub mod proxy;
pub mod resilience;
pub mod routing;
pub mod server;
pub mod telemetry;
pub mod topology;
pub mod upstream;
