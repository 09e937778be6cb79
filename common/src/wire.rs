//! gRPC conventions both roles follow: how "you were deposed" is said (the
//! higher generation travels in response metadata, so the loser can fence
//! itself without parsing messages) and the HTTP/2 tuning every channel uses.

use std::time::Duration;

use tonic::Status;

const GENERATION_KEY: &str = "understudy-generation";

/// HTTP/2 flow-control windows: big enough for epoch streams (PERF-NOTES:
/// windows plus 1 MiB frames reach ~2.6 GB/s on loopback; size windows to at
/// least bandwidth × RTT on real links).
pub const STREAM_WINDOW: u32 = 16 << 20;
pub const CONNECTION_WINDOW: u32 = 32 << 20;
pub const MAX_FRAME: u32 = (1 << 20) - 1;
/// Connect timeout for peer channels.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// An error with its sources, `a: b: c`, for messages that cross the wire.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// "The peer has a newer generation than you: stop."
pub fn deposed(generation: u64, message: impl Into<String>) -> Status {
    let mut status = Status::failed_precondition(message);
    if let Ok(value) = generation.to_string().parse() {
        status.metadata_mut().insert(GENERATION_KEY, value);
    }
    status
}

/// The generation a `deposed` status carries, if any.
pub fn deposed_generation(status: &Status) -> Option<u64> {
    status
        .metadata()
        .get(GENERATION_KEY)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deposed_carries_the_generation() {
        let s = deposed(7, "you were deposed");
        assert_eq!(deposed_generation(&s), Some(7));
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(deposed_generation(&Status::internal("x")), None);
    }
}
