//! shardgate: a layer-7 sharding reverse proxy and its control plane.
//!
//! Layout: `topology` (the shard map, shared by both planes) sits at the
//! bottom. The data plane is `proxy`, built from `routing`, `upstream`,
//! `resilience` and `telemetry`; the control plane is `coordinator` (with its
//! heartbeat sidecar `agent` and the generated `proto`). Neither plane imports
//! the other. `config` turns files into typed values; `server` holds the
//! accept loops every listener shares.

pub mod agent;
pub mod atomic_file;
pub mod clock;
pub mod config;
pub mod coordinator;
pub mod exit;
pub mod fetch;
pub mod gate;
pub mod json_error;
pub mod lease;
pub mod node;
pub mod proto;
pub mod proxy;
pub mod replication;
pub mod resilience;
pub mod routing;
pub mod secret;
pub mod server;
pub mod signals;
pub mod status_page;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod upstream;
pub mod workers;
