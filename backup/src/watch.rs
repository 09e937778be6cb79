//! The backup's failure detector: a dedicated thread (real-time priority
//! where allowed) that receives the primary's signed heartbeat datagrams,
//! answers each one, and decides from [`Liveness`] when the primary has been
//! silent for the heartbeat timeout. It never waits on the async runtime or
//! the image store, so a slow disk or a busy runtime does not read as the
//! primary's silence.
//!
//! ```text
//!            valid beat of the current session ──▶ heard, echo
//!  tick ──▶  silence > timeout and armed ─────────▶ Event::Silent (disarm)
//!            own stall > primary's give-up window,
//!            primary may release alone, armed ────▶ Event::Stalled (disarm)
//! ```
//!
//! *Armed* means a silence may promote: the image holds a committed
//! checkpoint of the current session, the primary did not say goodbye, and
//! the image is not known to be older than what the primary may have
//! released. The async side arms and disarms; the thread only disarms.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use understudy_common::heartbeat::{
    DATAGRAM_LEN, Datagram, Kind, Liveness, SessionKey, Verdict, raise_priority, wait_readable,
};
use understudy_common::ids::SessionId;

/// What the thread tells the async side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// The primary was silent this long (counting only time the detector
    /// ran): promote.
    Silent(Duration),
    /// The detector itself did not run for this long, past the primary's
    /// give-up window: the primary may have released output this image does
    /// not hold.
    Stalled(Duration),
}

/// The session whose beats count.
#[derive(Clone, Debug)]
struct Watched {
    id: SessionId,
    key: SessionKey,
}

/// What the detector thread and the async side share.
#[derive(Debug)]
pub(crate) struct Watch {
    clock: Instant,
    session: Mutex<Option<Watched>>,
    /// Bumped whenever `session` changes, so the thread resets its count.
    session_seq: AtomicU64,
    /// Nanoseconds since `clock` of the last valid word of the current
    /// session (a beat, or an epoch chunk the receiver accepted).
    last_heard: AtomicU64,
    armed: AtomicBool,
    /// The thread saw its own long stall and reported it; nothing arms the
    /// detector until the async side has handled that (ended the session).
    stalled: AtomicBool,
    stop: AtomicBool,
}

impl Watch {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            clock: Instant::now(),
            session: Mutex::new(None),
            session_seq: AtomicU64::new(0),
            last_heard: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        })
    }

    /// Beats of session `id` signed with `key` count from now on (None:
    /// none count).
    pub(crate) fn set_session(&self, session: Option<(SessionId, SessionKey)>) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) =
            session.map(|(id, key)| Watched { id, key });
        self.session_seq.fetch_add(1, Ordering::AcqRel);
        self.heard();
    }

    /// A valid word of the current session arrived (the receiver calls this
    /// for every accepted chunk; the thread for every valid beat).
    pub(crate) fn heard(&self) {
        self.last_heard
            .store(self.clock.elapsed().as_nanos() as u64, Ordering::Release);
    }

    /// How long since the current session's primary was last heard (wall
    /// time, for answering a `Hello`; promotion uses the stall-aware count).
    pub(crate) fn since_heard(&self) -> Duration {
        let now = self.clock.elapsed().as_nanos() as u64;
        Duration::from_nanos(now.saturating_sub(self.last_heard.load(Ordering::Acquire)))
    }

    /// Arms (a silence may promote) or disarms the detector. Arming waits
    /// until a reported stall was handled.
    pub(crate) fn arm(&self, armed: bool) {
        self.armed.store(
            armed && !self.stalled.load(Ordering::Acquire),
            Ordering::Release,
        );
    }

    /// The stall the thread reported was handled.
    pub(crate) fn stall_handled(&self) {
        self.stalled.store(false, Ordering::Release);
    }

    #[cfg(test)]
    pub(crate) fn armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Settings of the detector thread.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    pub interval: Duration,
    pub timeout: Duration,
    /// After this much silence the primary gives this backup up.
    pub primary_gives_up: Duration,
    /// The primary releases output when it gives up (keep-running).
    pub primary_releases_alone: bool,
}

/// Starts the detector thread on `socket` (the host's heartbeat socket).
pub(crate) fn spawn(
    watch: Arc<Watch>,
    socket: UdpSocket,
    settings: Settings,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("heartbeats".into())
        .spawn(move || run(&watch, &socket, settings, &events))
}

fn run(
    watch: &Watch,
    socket: &UdpSocket,
    settings: Settings,
    events: &tokio::sync::mpsc::UnboundedSender<Event>,
) {
    match raise_priority() {
        Ok(()) => tracing::debug!("heartbeat thread at real-time priority"),
        Err(e) => tracing::info!(
            error = %e,
            "heartbeats run at normal priority (grant CAP_SYS_NICE or LimitRTPRIO=10): \
             under heavy CPU load a late beat can promote this backup falsely"
        ),
    }
    let tick = (settings.interval / 2).max(Duration::from_millis(1));
    if let Err(e) = socket.set_nonblocking(true) {
        tracing::error!(error = %e, "heartbeat socket: cannot make it non-blocking");
    }
    let mut liveness = Liveness::new(settings.interval, settings.timeout, Instant::now());
    let mut seen_session = u64::MAX;
    let mut last_seq = 0u64;
    let mut last_data = 0u64;
    let mut next_tick = Instant::now() + tick;
    let mut buf = [0u8; 2 * DATAGRAM_LEN];
    while !watch.stop.load(Ordering::Acquire) {
        let session_seq = watch.session_seq.load(Ordering::Acquire);
        if session_seq != seen_session {
            seen_session = session_seq;
            last_seq = 0;
            // A session that began right after this thread was stopped
            // (the async side can win the race at a thaw): the stall is
            // not reported (the new session resyncs the image and arms the
            // detector only at its first checkpoint), but it is said.
            let now = Instant::now();
            let _ = liveness.tick(now);
            let stall = liveness.take_longest_stall();
            if stall > settings.primary_gives_up && settings.primary_releases_alone {
                said_stall(stall, "a new session began meanwhile");
            }
            liveness.reset(now);
        }
        let readable = wait_readable(socket, next_tick.saturating_duration_since(Instant::now()));
        if let Some(Ok((n, from))) = readable.then(|| socket.recv_from(&mut buf)) {
            let current = watch
                .session
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(w) = current {
                match Datagram::open(&buf[..n], w.id.raw(), &w.key) {
                    Ok(beat) if beat.kind == Kind::Beat && beat.seq > last_seq => {
                        last_seq = beat.seq;
                        liveness.heard();
                        watch.heard();
                        let echo = Datagram {
                            kind: Kind::Echo,
                            session: w.id.raw(),
                            seq: beat.seq,
                            echo_seq: beat.seq,
                            generation: beat.generation,
                        };
                        // A lost echo costs only a round-trip sample.
                        let _ = socket.send_to(&echo.seal(&w.key), from);
                    }
                    Ok(_) => tracing::debug!(%from, "heartbeat replayed or misdirected: ignored"),
                    Err(e) => tracing::debug!(%from, error = %e, "heartbeat refused"),
                }
            }
        }
        let now = Instant::now();
        if now < next_tick {
            continue;
        }
        next_tick = now + tick;
        // Epoch chunks the receiver accepted count as well.
        let data = watch.last_heard.load(Ordering::Acquire);
        if data != last_data {
            last_data = data;
            liveness.heard();
        }
        let verdict = liveness.tick(now);
        let stall = liveness.take_longest_stall();
        if stall > settings.primary_gives_up && settings.primary_releases_alone {
            if watch.armed.load(Ordering::Acquire) {
                watch.stalled.store(true, Ordering::Release);
                watch.armed.store(false, Ordering::Release);
                let _ = events.send(Event::Stalled(stall));
                continue;
            }
            // Disarmed meanwhile (at a thaw, the primary's new session can
            // reach the async side first): that session resyncs the image.
            said_stall(stall, "it was not armed by then");
        }
        if let Verdict::Silent(silence) = verdict
            && watch.armed.swap(false, Ordering::AcqRel)
        {
            let _ = events.send(Event::Silent(silence));
        }
    }
}

/// Logs a stall past the primary's give-up window with no armed session
/// to mark stale (nothing could promote from the image on silence).
fn said_stall(stall: Duration, why: &str) {
    tracing::warn!(
        stall_ms = stall.as_millis() as u64,
        "this backup was not running for {:.1} s, past the primary's give-up window; {why}, \
         so there was no session to mark stale",
        stall.as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            interval: Duration::from_millis(10),
            timeout: Duration::from_millis(100),
            primary_gives_up: Duration::from_secs(1),
            primary_releases_alone: true,
        }
    }

    struct Rig {
        watch: Arc<Watch>,
        events: tokio::sync::mpsc::UnboundedReceiver<Event>,
        primary: UdpSocket,
        thread: Option<std::thread::JoinHandle<()>>,
        key: SessionKey,
    }

    impl Rig {
        fn new(settings: Settings) -> Self {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let primary = UdpSocket::bind("127.0.0.1:0").unwrap();
            primary.connect(socket.local_addr().unwrap()).unwrap();
            primary
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let watch = Watch::new();
            let key = SessionKey::random().unwrap();
            watch.set_session(Some((SessionId::from_raw(5).unwrap(), key.clone())));
            let (tx, events) = tokio::sync::mpsc::unbounded_channel();
            let thread = spawn(watch.clone(), socket, settings, tx).unwrap();
            Self {
                watch,
                events,
                primary,
                thread: Some(thread),
                key,
            }
        }

        fn beat(&self, seq: u64, key: &SessionKey) {
            let d = Datagram {
                kind: Kind::Beat,
                session: 5,
                seq,
                echo_seq: 0,
                generation: 1,
            };
            self.primary.send(&d.seal(key)).unwrap();
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            self.watch.stop();
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    #[test]
    fn beats_keep_an_armed_backup_quiet_and_silence_promotes_once() {
        let mut rig = Rig::new(settings());
        rig.watch.arm(true);
        for seq in 1..=30 {
            rig.beat(seq, &rig.key.clone());
            let mut echo = [0u8; DATAGRAM_LEN];
            let n = rig.primary.recv(&mut echo).unwrap();
            let e = Datagram::open(&echo[..n], 5, &rig.key).unwrap();
            assert_eq!((e.kind, e.echo_seq), (Kind::Echo, seq));
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            rig.events.try_recv().is_err(),
            "no promotion while beats arrive"
        );
        let started = Instant::now();
        let event = rig.events.blocking_recv().unwrap();
        assert!(matches!(event, Event::Silent(d) if d > Duration::from_millis(100)));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(!rig.watch.armed(), "one event, then disarmed");
    }

    #[test]
    fn forged_and_replayed_beats_do_not_count() {
        let mut rig = Rig::new(settings());
        rig.watch.arm(true);
        let stranger = SessionKey::random().unwrap();
        rig.beat(1, &rig.key.clone());
        let started = Instant::now();
        // A stranger's beats (wrong key) and replays of beat 1, every 5 ms.
        let event = loop {
            rig.beat(1, &rig.key.clone());
            rig.beat(2, &stranger);
            if let Ok(e) = rig.events.try_recv() {
                break e;
            }
            assert!(started.elapsed() < Duration::from_secs(3), "never promoted");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(matches!(event, Event::Silent(_)), "{event:?}");
    }

    #[test]
    fn a_disarmed_backup_stays_quiet() {
        let mut rig = Rig::new(settings());
        std::thread::sleep(Duration::from_millis(400));
        assert!(rig.events.try_recv().is_err());
    }
}
