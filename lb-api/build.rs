//! Generates the controller <-> agent gRPC code from `proto/rpclb/v1/state.proto`
//! without protoc: protox parses the file, tonic-prost-build writes the code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/rpclb/v1/state.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
