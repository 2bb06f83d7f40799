//! Generates the `grpc.testing.TestService` client and server
//! (`demo/proto/grpc/testing/test.proto`) and the `grpc.health.v1.Health`
//! Check service (`demo/proto/grpc/health/v1/health.proto`) for `rpclb_tests::grpc`, which the
//! demo, the gRPC lab tests and the benchmarks share, without protoc:
//! protox parses the file and tonic-prost-build writes the code into
//! OUT_DIR.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "../demo/proto";
    let proto = "../demo/proto/grpc/testing/test.proto";
    let health = "../demo/proto/grpc/health/v1/health.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed={health}");
    let fds = protox::compile([proto, health], [root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
