//! Heartbeats between the primary and the backup: small UDP datagrams sent
//! and answered by a dedicated thread on each side (raised to real-time
//! priority where the host allows it), so that a busy async runtime or a slow
//! disk never reads as silence and a frozen peer is told apart from one that
//! was merely descheduled.
//!
//! Every datagram is authenticated with a per-session key (32 random bytes the
//! primary sends in its `Hello`, over the mutually authenticated gRPC channel):
//! a stranger who can reach the port cannot forge a beat that would suppress a
//! failover, and replays are refused by sequence number.
//!
//! Datagram (64 bytes, little-endian):
//!
//! ```text
//! +-------+-----+------+-------+---------+-----+----------+------------+----------+
//! | USHB  | ver | kind | rsvd  | session | seq | echo_seq | generation | MAC (24) |
//! | 4     | 1   | 1    | 2     | 8       | 8   | 8        | 8          | blake3   |
//! +-------+-----+------+-------+---------+-----+----------+------------+----------+
//! ```
//!
//! [`Liveness`] is the failure detector's arithmetic: silence is counted only
//! while the watching thread runs, so its own stall (a SIGSTOP, a starved CPU)
//! never counts as the primary's silence, and a stall long enough for the
//! primary to have given up on this backup is reported as such.
//!
//! This module knows nothing of roles or promotion; the roles own the threads.

use std::time::{Duration, Instant};

const MAGIC: [u8; 4] = *b"USHB";
const VERSION: u8 = 1;
/// Bytes in a datagram.
pub const DATAGRAM_LEN: usize = 64;
const MAC_LEN: usize = 24;
const BODY_LEN: usize = DATAGRAM_LEN - MAC_LEN;

/// A session's heartbeat key.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey([u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(…)")
    }
}

impl SessionKey {
    /// A fresh random key, or None when the kernel has no randomness to give
    /// (a primary then cannot open a session).
    pub fn random() -> Option<Self> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).ok()?;
        Some(Self(key))
    }

    /// From the wire (`Hello.heartbeat_key`); None unless exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }

    /// The wire form.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn mac(&self, body: &[u8]) -> [u8; MAC_LEN] {
        let hash = blake3::keyed_hash(&self.0, body);
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&hash.as_bytes()[..MAC_LEN]);
        mac
    }
}

/// Which way a datagram goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Primary → backup, every heartbeat interval.
    Beat,
    /// Backup → primary, answering one beat (for round-trip times).
    Echo,
}

/// One heartbeat datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Datagram {
    /// A beat (primary → backup) or its echo.
    pub kind: Kind,
    /// The replication session it belongs to.
    pub session: u64,
    /// The sender's sequence number.
    pub seq: u64,
    /// An echo: the beat's sequence number it answers.
    pub echo_seq: u64,
    /// The sender's generation.
    pub generation: u64,
}

/// Why a datagram was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// Not a heartbeat of this format (its length).
    #[error("not an understudy heartbeat ({0} bytes, or wrong magic or version)")]
    Malformed(usize),
    /// A heartbeat of another session.
    #[error("heartbeat for session {got:#x}, not the current session")]
    WrongSession {
        /// The session it claims.
        got: u64,
    },
    /// Not signed with this session's key.
    #[error("heartbeat authentication failed (not signed with this session's key)")]
    BadMac,
}

impl Datagram {
    /// The signed bytes.
    pub fn seal(&self, key: &SessionKey) -> [u8; DATAGRAM_LEN] {
        let mut out = [0u8; DATAGRAM_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = match self.kind {
            Kind::Beat => 1,
            Kind::Echo => 2,
        };
        out[8..16].copy_from_slice(&self.session.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..32].copy_from_slice(&self.echo_seq.to_le_bytes());
        out[32..40].copy_from_slice(&self.generation.to_le_bytes());
        let mac = key.mac(&out[..BODY_LEN]);
        out[BODY_LEN..].copy_from_slice(&mac);
        out
    }

    /// Checks and reads a datagram of `session` signed with `key`.
    pub fn open(bytes: &[u8], session: u64, key: &SessionKey) -> Result<Self, DatagramError> {
        if bytes.len() != DATAGRAM_LEN || bytes[..4] != MAGIC || bytes[4] != VERSION {
            return Err(DatagramError::Malformed(bytes.len()));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let got = u64_at(8);
        if got != session {
            return Err(DatagramError::WrongSession { got });
        }
        let mac = key.mac(&bytes[..BODY_LEN]);
        // Constant time: a stranger learns nothing from how fast we refuse.
        if !constant_time_eq(&mac, &bytes[BODY_LEN..]) {
            return Err(DatagramError::BadMac);
        }
        let kind = match bytes[5] {
            1 => Kind::Beat,
            2 => Kind::Echo,
            _ => return Err(DatagramError::Malformed(bytes.len())),
        };
        Ok(Self {
            kind,
            session,
            seq: u64_at(16),
            echo_seq: u64_at(24),
            generation: u64_at(32),
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the failure detector concludes at a tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to do.
    Fine,
    /// The primary has been silent for longer than the timeout, counting
    /// only time this detector was running.
    Silent(Duration),
}

/// Silence accounting that tells "I was not running" from "the primary was
/// silent" (see the module doc).
#[derive(Clone, Debug)]
pub struct Liveness {
    timeout: Duration,
    /// The most silence one tick may add: a tick that comes late (the
    /// watcher was descheduled or frozen) adds no more than this.
    max_credit: Duration,
    last_tick: Instant,
    heard_since_tick: bool,
    silence: Duration,
    /// The longest gap between two ticks seen since the last call to
    /// [`Liveness::take_longest_stall`].
    longest_stall: Duration,
}

impl Liveness {
    /// `interval` is the heartbeat interval; the watcher ticks at half of it.
    pub fn new(interval: Duration, timeout: Duration, now: Instant) -> Self {
        Self {
            timeout,
            max_credit: interval,
            last_tick: now,
            heard_since_tick: true,
            silence: Duration::ZERO,
            longest_stall: Duration::ZERO,
        }
    }

    /// A valid message of the current session arrived.
    pub fn heard(&mut self) {
        self.heard_since_tick = true;
        self.silence = Duration::ZERO;
    }

    /// Counts silence since the last tick. Call at least every half
    /// interval; a later call counts as the watcher's own stall.
    pub fn tick(&mut self, now: Instant) -> Verdict {
        let gap = now.saturating_duration_since(self.last_tick);
        self.last_tick = now;
        self.longest_stall = self.longest_stall.max(gap);
        if std::mem::take(&mut self.heard_since_tick) {
            return Verdict::Fine;
        }
        self.silence += gap.min(self.max_credit);
        if self.silence > self.timeout {
            Verdict::Silent(self.silence)
        } else {
            Verdict::Fine
        }
    }

    /// Silence counted so far.
    pub fn silence(&self) -> Duration {
        self.silence
    }

    /// The longest gap between ticks since the last call: how long this
    /// watcher was not running.
    pub fn take_longest_stall(&mut self) -> Duration {
        std::mem::take(&mut self.longest_stall)
    }

    /// Starts counting afresh (a new session).
    pub fn reset(&mut self, now: Instant) {
        *self = Self::new(self.max_credit, self.timeout, now);
    }
}

/// Beats for one session from a plain thread until dropped: for tools,
/// tests and benchmarks that speak the replication protocol without a VM
/// (the primary role has its own heartbeat thread, which also measures
/// round trips).
#[derive(Debug)]
pub struct Beater {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Beater {
    /// Starts beating to `to` for `session`, signed with `key`.
    pub fn start(
        to: std::net::SocketAddr,
        session: u64,
        key: SessionKey,
        interval: Duration,
    ) -> std::io::Result<Self> {
        let socket = std::net::UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        socket.connect(to)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("beater".into())
            .spawn(move || {
                let mut seq = 0;
                while !flag.load(std::sync::atomic::Ordering::Acquire) {
                    seq += 1;
                    let beat = Datagram {
                        kind: Kind::Beat,
                        session,
                        seq,
                        echo_seq: 0,
                        generation: 0,
                    };
                    let _ = socket.send(&beat.seal(&key));
                    std::thread::sleep(interval);
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Beater {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a primary goes without a word from its backup before it
/// declares the session lost (and, under keep-running, releases output that
/// no backup holds). Lenient: a false "backup lost" costs a resync.
pub fn primary_gives_up(heartbeat_timeout: Duration) -> Duration {
    (heartbeat_timeout * GIVE_UP_TIMEOUTS).max(GIVE_UP_FLOOR)
}

/// A primary gives up on its backup after this many heartbeat timeouts…
pub const GIVE_UP_TIMEOUTS: u32 = 3;
/// …and never sooner than this (a short timeout must not make a busy
/// backup look lost).
pub const GIVE_UP_FLOOR: Duration = Duration::from_secs(1);

/// Raises the calling thread to real-time priority (SCHED_FIFO, low
/// priority) so heartbeats go out and are answered on a saturated host.
/// Needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at least `HEARTBEAT_RT_PRIORITY`
/// (the systemd units set `LimitRTPRIO=`); returns why not otherwise.
pub fn raise_priority() -> Result<(), std::io::Error> {
    let param = libc::sched_param {
        sched_priority: HEARTBEAT_RT_PRIORITY,
    };
    // SAFETY: sets the calling thread's own policy with a valid parameter.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// How many CPUs the primary beats from, each sender pinned to its own.
pub const BEAT_SENDERS: usize = 2;

/// Up to `n` CPUs this process may run on (its affinity mask), lowest
/// first; empty if the mask cannot be read (then the senders run unpinned).
///
/// One real-time sender is not enough on a host whose CPUs can stop for
/// ~100 ms: a virtual CPU the hypervisor preempts, or one inside a long
/// non-preemptible kernel section (guest emulation). The thread is stuck on
/// that CPU as far as the kernel can tell (it is "running"), so nothing
/// moves it. On the 2-core test VMs, each of two pinned senders went up to
/// 79 ms between sends while migrations ran, both at once never beyond
/// 23 ms (`docs/ARCHITECTURE.md`, "Liveness").
pub fn beat_cpus(n: usize) -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t (plain integers) is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most the size given into `set`.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the set's capacity.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .take(n)
        .collect()
}

/// Pins the calling thread to `cpu`.
pub fn pin_to(cpu: usize) -> Result<(), std::io::Error> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: a zeroed cpu_set_t (plain integers) is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE, the set's capacity.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sets the calling thread's own affinity from a valid set.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Waits until `socket` has a datagram or `timeout` passes; true if one is
/// there. (A socket read timeout counts in scheduler ticks, 4 ms here,
/// which stretches a 10 ms heartbeat interval to 12–16 ms; `ppoll` uses
/// high-resolution timers.)
pub fn wait_readable(socket: &std::net::UdpSocket, timeout: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd and a valid timespec, both on this stack.
    let n = unsafe { libc::ppoll(&mut fd, 1, &ts, std::ptr::null()) };
    n > 0 && fd.revents & libc::POLLIN != 0
}

/// The real-time priority of heartbeat threads: above every normal thread,
/// below the kernel's own real-time threads. The threads sleep almost always.
pub const HEARTBEAT_RT_PRIORITY: i32 = 10;

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SessionKey {
        SessionKey::from_bytes(&[7; 32]).unwrap()
    }

    #[test]
    fn a_sealed_datagram_opens_only_with_its_key_and_session() {
        let d = Datagram {
            kind: Kind::Beat,
            session: 42,
            seq: 9,
            echo_seq: 0,
            generation: 3,
        };
        let bytes = d.seal(&key());
        assert_eq!(Datagram::open(&bytes, 42, &key()), Ok(d));
        assert_eq!(
            Datagram::open(&bytes, 43, &key()),
            Err(DatagramError::WrongSession { got: 42 })
        );
        let other = SessionKey::from_bytes(&[8; 32]).unwrap();
        assert_eq!(
            Datagram::open(&bytes, 42, &other),
            Err(DatagramError::BadMac)
        );
        for i in 0..DATAGRAM_LEN {
            let mut bad = bytes;
            bad[i] ^= 1;
            assert!(Datagram::open(&bad, 42, &key()).is_err(), "byte {i}");
        }
        assert_eq!(
            Datagram::open(&bytes[..10], 42, &key()),
            Err(DatagramError::Malformed(10))
        );
        assert!(SessionKey::from_bytes(&[1; 31]).is_none());
        assert_ne!(SessionKey::random(), SessionKey::random());
    }

    #[test]
    fn silence_counts_only_while_the_watcher_runs() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut l = Liveness::new(ms(10), ms(100), t0);
        // Regular ticks without a word: silent after the timeout.
        let mut t = t0;
        let mut verdict = Verdict::Fine;
        for _ in 0..30 {
            t += ms(5);
            verdict = l.tick(t);
            if verdict != Verdict::Fine {
                break;
            }
        }
        assert_eq!(verdict, Verdict::Silent(ms(105)));
        // A word resets it.
        l.heard();
        assert_eq!(l.tick(t + ms(5)), Verdict::Fine);
        assert_eq!(l.silence(), Duration::ZERO);
        // The watcher frozen for 20 s: one tick's worth of silence, not 20 s.
        let thawed = t + ms(5) + Duration::from_secs(20);
        assert_eq!(l.tick(thawed), Verdict::Fine);
        assert_eq!(l.silence(), ms(10));
        assert!(l.take_longest_stall() >= Duration::from_secs(20));
        assert_eq!(l.take_longest_stall(), Duration::ZERO);
        // Late ticks (a starved watcher) promote later, never sooner.
        let mut t = thawed;
        let mut ticks = 0;
        while l.tick(t) == Verdict::Fine {
            t += ms(50);
            ticks += 1;
        }
        assert_eq!(ticks, 10, "10 ms of credit per late tick");
    }
}
