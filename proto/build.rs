//! Compiles `proto/understudy.proto` and the subset of etcd's v3 API the
//! witness uses (`proto/etcd/`) with protox (pure Rust: no system protoc)
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
    // etcd's messages stay plain Vec<u8>: keys and values are a few bytes.
    let etcd = "proto/etcd/rpc.proto";
    println!("cargo:rerun-if-changed=proto/etcd");
    let fds = match protox::compile([etcd], ["proto/etcd"]) {
        Ok(fds) => fds,
        Err(e) => panic!("cannot compile {etcd}: {e}"),
    };
    if let Err(e) = tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)
    {
        panic!("cannot generate gRPC code from {etcd}: {e}");
    }
}
