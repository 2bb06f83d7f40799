//! Generates the gRPC code for `proto/grpc/testing/test.proto` without protoc: protox (a
//! protobuf compiler in Rust) parses the file into a FileDescriptorSet, and tonic-prost-build
//! turns that into the prost messages and the tonic client and server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/grpc/testing/test.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
