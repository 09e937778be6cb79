//! The primary's heartbeat threads: every heartbeat interval each sends the
//! current session's signed beat to the backup's replication address (UDP),
//! and reads the backup's echoes for liveness and round-trip times. They run
//! outside the async runtime at real-time priority where the host allows
//! it, so a busy runtime never silences the primary (which would promote the
//! backup beside a live primary). There are two, each pinned to a CPU of
//! its own ([`understudy_common::heartbeat::beat_cpus`]): a CPU that stops
//! for as long as the heartbeat timeout (preempted by the hypervisor, or
//! inside a long kernel section) silences only one of them. They number
//! their beats from one counter, so the backup's replay check holds.
//!
//! It carries no fencing: a promoted backup tells the old primary so through
//! its gRPC answers (acks, refusals, probes).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use understudy_common::heartbeat::{
    BEAT_SENDERS, DATAGRAM_LEN, Datagram, Kind, SessionKey, beat_cpus, pin_to, raise_priority,
    wait_readable,
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
    /// The last beat's number (all senders draw from it).
    seq: AtomicU64,
    stop: AtomicBool,
}

impl Beats {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            clock: Instant::now(),
            session: Mutex::new(None),
            last_echo: AtomicU64::new(0),
            seq: AtomicU64::new(0),
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

/// Starts the heartbeat threads, beating to `backup` every `interval`:
/// one per CPU of [`beat_cpus`], at most [`BEAT_SENDERS`] (one, unpinned,
/// if the process's CPUs cannot be read).
pub(crate) fn spawn(
    beats: Arc<Beats>,
    backup: SocketAddr,
    interval: Duration,
    generation: u64,
    stats: Arc<Stats>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let local: SocketAddr = if backup.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let cpus: Vec<Option<usize>> = match beat_cpus(BEAT_SENDERS) {
        cpus if cpus.is_empty() => vec![None],
        cpus => cpus.into_iter().map(Some).collect(),
    };
    let mut threads = Vec::with_capacity(cpus.len());
    for (i, cpu) in cpus.into_iter().enumerate() {
        // Not connected: a connect() fails while the network to the backup
        // is down (ENETUNREACH), and beats must start anyway; each is sent
        // on its own. A socket per sender: each reads its own echoes.
        let socket = UdpSocket::bind(local)?;
        socket.set_nonblocking(true)?;
        let (mine, stats) = (beats.clone(), stats.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("heartbeats-{i}"))
            .spawn(move || {
                if let Some(cpu) = cpu
                    && let Err(e) = pin_to(cpu)
                {
                    tracing::debug!(cpu, error = %e, "heartbeat sender not pinned");
                }
                run(&mine, &socket, backup, interval, generation, &stats)
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                beats.stop();
                for t in threads {
                    let _ = t.join();
                }
                return Err(e);
            }
        }
    }
    Ok(threads)
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
                let seq = beats.seq.fetch_add(1, Ordering::AcqRel) + 1;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use understudy_common::ids::Role;

    /// Two senders on two CPUs (where the process has two), one numbering:
    /// every beat a new number, beats from both sockets.
    #[test]
    fn two_pinned_senders_share_one_count() {
        let backup = UdpSocket::bind("127.0.0.1:0").unwrap();
        backup
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let beats = Beats::new();
        let key = SessionKey::random().unwrap();
        let id = SessionId::from_raw(7).unwrap();
        beats.set_session(Some((id, key.clone())));
        let stats = Arc::new(Stats::new("vm", Role::Primary, String::new(), 1));
        let threads = spawn(
            beats.clone(),
            backup.local_addr().unwrap(),
            Duration::from_millis(5),
            1,
            stats,
        )
        .unwrap();
        // Two senders wherever the process may use two CPUs (counted
        // independently of `BEAT_SENDERS`, so lowering it fails here).
        let cpus = beat_cpus(usize::MAX).len().clamp(1, 2);
        assert_eq!(threads.len(), cpus);
        let mut seqs = Vec::new();
        let mut senders = std::collections::HashSet::new();
        let mut buf = [0u8; 2 * DATAGRAM_LEN];
        while seqs.len() < 40 {
            let (n, from) = backup.recv_from(&mut buf).unwrap();
            let beat = Datagram::open(&buf[..n], id.raw(), &key).unwrap();
            assert_eq!(beat.kind, Kind::Beat);
            seqs.push(beat.seq);
            senders.insert(from);
        }
        beats.stop();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(senders.len(), cpus, "beats from every sender");
        let mut unique = seqs.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), seqs.len(), "a number used twice: {seqs:?}");
    }
}
