//! Generates the gRPC code from `proto/`, with a vendored `protoc` so a fresh
//! machine needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through PROTOC.
    #[allow(unsafe_code)]
    // SAFETY: this build script runs on one thread; nothing reads the
    // environment concurrently.
    unsafe {
        std::env::set_var("PROTOC", protoc);
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/cluster_discovery.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/cluster_discovery.proto");
    Ok(())
}
