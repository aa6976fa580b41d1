//! Generated gRPC types for `codesprintpro.cluster.discovery.v1` (SPEC §4).
#![allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]

tonic::include_proto!("codesprintpro.cluster.discovery.v1");

/// Replication messages between reference nodes (`shardgate node`).
pub mod node {
    #![allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
    tonic::include_proto!("shardgate.node.v1");
}
