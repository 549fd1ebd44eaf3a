//! Compiles `proto/` into Rust with protox (a pure-Rust protobuf compiler), so that building l4mesh
//! needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/envoy/discovery/discovery.proto",
        "proto/istio/workload/workload.proto",
        "proto/istio/workload/zds.proto",
        "proto/istio/security/authorization.proto",
        "proto/istio/ca/ca.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
