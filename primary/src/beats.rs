//! The primary's heartbeat thread: every heartbeat interval it sends the
//! current session's signed beat to the backup's replication address (UDP),
//! and reads the backup's echoes for liveness and round-trip times. It runs
//! outside the async runtime at real-time priority where the host allows
//! it, so a busy runtime never silences the primary (which would promote the
//! backup beside a live primary).
//!
//! It carries no fencing: a promoted backup tells the old primary so through
//! its gRPC answers (acks, refusals, probes).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use understudy_common::heartbeat::{
    DATAGRAM_LEN, Datagram, Kind, SessionKey, raise_priority, wait_readable,
};
use understudy_common::ids::SessionId;
use understudy_common::status::Stats;

/// What the session manager and the heartbeat thread share.
#[derive(Debug)]
pub(crate) struct Beats {
    clock: Instant,
    session: Mutex<Option<(SessionId, SessionKey)>>,
    /// Nanoseconds since `clock` of the last valid echo of the session.
    last_echo: AtomicU64,
    stop: AtomicBool,
}

impl Beats {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            clock: Instant::now(),
            session: Mutex::new(None),
            last_echo: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        })
    }

    /// Beats for session `id` with `key` from now on (None: no beats).
    pub(crate) fn set_session(&self, session: Option<(SessionId, SessionKey)>) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = session;
        self.last_echo
            .store(self.clock.elapsed().as_nanos() as u64, Ordering::Release);
    }

    /// Time since the backup last answered a beat of the current session.
    pub(crate) fn since_echo(&self) -> Duration {
        let now = self.clock.elapsed().as_nanos() as u64;
        Duration::from_nanos(now.saturating_sub(self.last_echo.load(Ordering::Acquire)))
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Starts the heartbeat thread, beating to `backup` every `interval`.
pub(crate) fn spawn(
    beats: Arc<Beats>,
    backup: SocketAddr,
    interval: Duration,
    generation: u64,
    stats: Arc<Stats>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let local: SocketAddr = if backup.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // Not connected: a connect() fails while the network to the backup is
    // down (ENETUNREACH), and beats must start anyway; each is sent on its own.
    let socket = UdpSocket::bind(local)?;
    socket.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("heartbeats".into())
        .spawn(move || run(&beats, &socket, backup, interval, generation, &stats))
}

fn run(
    beats: &Beats,
    socket: &UdpSocket,
    backup: SocketAddr,
    interval: Duration,
    generation: u64,
    stats: &Stats,
) {
    match raise_priority() {
        Ok(()) => tracing::debug!("heartbeat thread at real-time priority"),
        Err(e) => tracing::info!(
            error = %e,
            "heartbeats run at normal priority (grant CAP_SYS_NICE or LimitRTPRIO=10): \
             under heavy CPU load a late beat can promote the backup falsely"
        ),
    }
    let mut seq = 0u64;
    let mut sent: std::collections::VecDeque<(u64, Instant)> = Default::default();
    let mut next = Instant::now();
    let mut buf = [0u8; 2 * DATAGRAM_LEN];
    while !beats.stop.load(Ordering::Acquire) {
        let session = beats
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let now = Instant::now();
        if now >= next {
            next = now + interval;
            if let Some((id, key)) = &session {
                seq += 1;
                let beat = Datagram {
                    kind: Kind::Beat,
                    session: id.raw(),
                    seq,
                    echo_seq: 0,
                    generation,
                };
                // An unreachable backup (nobody on the port yet, the network
                // down) only loses this beat.
                let _ = socket.send_to(&beat.seal(key), backup);
                if sent.len() >= 64 {
                    sent.pop_front();
                }
                sent.push_back((seq, now));
            }
        }
        let wait = next.saturating_duration_since(Instant::now());
        if !wait_readable(socket, wait) {
            continue;
        }
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if from != backup {
            continue;
        }
        let Some((id, key)) = &session else { continue };
        match Datagram::open(&buf[..n], id.raw(), key) {
            Ok(echo) if echo.kind == Kind::Echo => {
                beats
                    .last_echo
                    .store(beats.clock.elapsed().as_nanos() as u64, Ordering::Release);
                if let Some(&(_, at)) = sent.iter().find(|(s, _)| *s == echo.echo_seq) {
                    stats.record_heartbeat_rtt(at.elapsed());
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "heartbeat echo refused"),
        }
    }
}
