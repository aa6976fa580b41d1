//! Generates the gRPC code from `proto/`, with a vendored `protoc` so a fresh
//! machine needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Handed to prost directly rather than through the PROTOC environment
    // variable: setting the environment is unsafe, and the crate forbids it.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Replicated values are passed on without a copy.
    config.bytes([".shardgate.node.v1"]);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_with_config(
            config,
            &[
                "proto/cluster_discovery.proto",
                "proto/node_replication.proto",
            ],
            &["proto"],
        )?;
    // The tests' OTLP receiver, from the protocol's published definitions
    // (tests/proto/README.md); a server only, and unused by the library.
    let mut otlp = tonic_prost_build::Config::new();
    otlp.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .compile_with_config(
            otlp,
            &["tests/proto/opentelemetry/proto/collector/trace/v1/trace_service.proto"],
            &["tests/proto"],
        )?;
    println!("cargo:rerun-if-changed=tests/proto");
    println!("cargo:rerun-if-changed=proto/cluster_discovery.proto");
    println!("cargo:rerun-if-changed=proto/node_replication.proto");
    Ok(())
}
