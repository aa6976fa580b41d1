//! Shared test support, by job:
//!
//! - `upstream`: recording upstream servers that misbehave on demand;
//! - `topology`: shard maps and keys;
//! - `cluster`: proxies (in-process or the real binary), coordinators,
//!   agents, a coordinator stand-in, throwaway PostgreSQL databases;
//! - `netns`: hosts in network namespaces, for partitions of chosen links;
//! - `relay`: a TCP relay that cuts, black-holes or delays one link;
//! - `etcd`: a throwaway etcd cluster whose members a test kills and restarts;
//! - `nodes`: a partition of replicated reference nodes and its coordinator;
//! - `client`: the HTTP client, answers, SPEC error checks, polling;
//! - `tls`: a throwaway PKI and real TLS clients (openssl, curl).
//!
//! Everything binds 127.0.0.1:0 so tests run in parallel, and every wait is a
//! bounded poll of a condition, never a fixed sleep.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

mod client;
mod cluster;
mod etcd;
mod netns;
mod nodes;
mod relay;
pub(crate) mod tls;
mod topology;
mod upstream;

// Each test binary uses its own part of the support.
#[allow(unused_imports)]
pub(crate) use {
    client::*, cluster::*, etcd::*, netns::*, nodes::*, relay::*, topology::*, upstream::*,
};
