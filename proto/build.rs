//! Compiles `proto/understudy.proto` with protox (pure Rust: no system protoc)
//! and generates tonic/prost code into OUT_DIR.

fn main() {
    let proto = "proto/understudy.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = match protox::compile([proto], ["proto"]) {
        Ok(fds) => fds,
        Err(e) => panic!("cannot compile {proto}: {e}"),
    };
    if let Err(e) = tonic_prost_build::configure().bytes(".").compile_fds(fds) {
        panic!("cannot generate gRPC code from {proto}: {e}");
    }
}
