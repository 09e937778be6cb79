//! Pieces both roles share: the guest console service (an offset-addressed
//! output log with output commit, and its TCP server), the checkpoint payload
//! (VM state + unreleased console output), and live status figures with the
//! Control service. No replication logic lives here.

pub mod alloc;
pub mod auth;
pub mod backlog;
pub mod console;
pub mod durable;
pub mod fault;
pub mod heartbeat;
pub mod ids;
pub mod metrics;
pub mod operator;
pub mod payload;
pub mod postcopy;
pub mod revocation;
pub mod role;
pub mod server_tls;
pub mod status;
pub mod tls_follow;
pub mod tls_validity;
pub mod wire;
pub mod witness;

pub use understudy_proto::control_server::Control;
