//! The guest console as a service: an append-only output log with stream
//! offsets, of which only the *released* prefix is ever shown to clients, and a
//! TCP server that streams released output to every connected client and feeds
//! their input to the guest.
//!
//! ```text
//!  guest bytes ──append──▶ [ start … released │ unreleased … end ]
//!                                   ▲ release_to(): the primary on an ack,
//!                                     a promoted backup at once
//! ```
//!
//! Protocol on the TCP port: raw bytes both ways. A client that wants
//! exactly-once output across a failover opens with the 16-byte resume request
//! `"USCONSOL" + u64 LE offset` (the offset of the next byte it needs); the
//! server answers `"USCONSOL" + u64 LE offset` of the first byte it will send
//! and streams from there. Other clients get output from "now" (a primary) or
//! from the first byte that might not have been delivered (a promoted backup,
//! which may repeat up to one epoch of output).
//!
//! Exactly-once *input* too: with `"USCONSL2" + u64 LE offset` the server
//! answers `"USCONSL2" + u64 LE output start + u64 LE input offset`, once a
//! VM runs on this host: the input offset is how many input bytes the VM has
//! taken (or queued) since it booted, so the next byte this client sends gets
//! that offset. Input accepted by a primary after its last checkpoint never
//! reaches the VM on the other host; a client that keeps what it sent
//! ([`ResumingClient`] does) resends from the offset the new host names, and
//! the guest sees every byte once, in order. The console is one byte stream:
//! this holds for one writing client at a time.
//!
//! Input has back-pressure: a guest that does not read its input makes the
//! server stop reading the client's socket (it never piles up in memory or in
//! checkpoints), and a standby reads no input until its VM runs.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use understudy_vmm::{ConsoleInput, InputRefused};

use crate::server_tls::HANDSHAKE_TIMEOUT;

/// Magic of the resume request and reply.
pub const RESUME_MAGIC: [u8; 8] = *b"USCONSOL";
/// Magic of the resume request and reply that also carry the input offset.
pub const RESUME_MAGIC_V2: [u8; 8] = *b"USCONSL2";
/// The resume offset that asks for output from now on (the server answers
/// with the offset it starts from).
pub const FROM_NOW: u64 = u64::MAX;
/// How long a new connection may take to send its resume request.
const RESUME_GRACE: Duration = Duration::from_millis(100);
/// Released output kept for clients that resume from an older offset.
const RETAIN_RELEASED: usize = 4 << 20;

struct Log {
    /// Offset of `buf[0]`.
    start: u64,
    buf: VecDeque<u8>,
    released: u64,
    /// Where raw clients start; `None` = at the released end ("now").
    raw_start: Option<u64>,
}

impl Log {
    fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    fn trim(&mut self) {
        let keep_from = self
            .released
            .saturating_sub(RETAIN_RELEASED as u64)
            .max(self.start);
        let drop = (keep_from - self.start) as usize;
        self.buf.drain(..drop);
        self.start = keep_from;
    }
}

/// Console output with offsets; shared by the producer and the console server.
pub struct ConsoleLog {
    log: Mutex<Log>,
    /// The generation this host runs the VM at, for the release events
    /// (`understudy::release` at debug level: what a fault checker reads to
    /// prove no two hosts ever released output side by side).
    generation: std::sync::atomic::AtomicU64,
    released_tx: watch::Sender<u64>,
    /// Bumped to close every client connection (this host stopped running
    /// the guest: its clients must follow it to the new primary).
    disconnect_tx: watch::Sender<u64>,
}

impl std::fmt::Debug for ConsoleLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let log = self.lock();
        f.debug_struct("ConsoleLog")
            .field("start", &log.start)
            .field("released", &log.released)
            .field("end", &log.end())
            .finish()
    }
}

impl ConsoleLog {
    /// An empty log whose first byte will have offset `offset`.
    pub fn new(offset: u64) -> Arc<Self> {
        let (released_tx, _) = watch::channel(offset);
        let (disconnect_tx, _) = watch::channel(0);
        Arc::new(Self {
            generation: std::sync::atomic::AtomicU64::new(0),
            disconnect_tx,
            log: Mutex::new(Log {
                start: offset,
                buf: VecDeque::new(),
                released: offset,
                raw_start: None,
            }),
            released_tx,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A promoted backup takes the stream over where the primary's last
    /// checkpoint left it: the log restarts at `offset` with `held` (the
    /// output that checkpoint carried and the primary may never have
    /// delivered), all of it released at once.
    pub fn take_over(&self, offset: u64, held: &[u8]) {
        let mut log = self.lock();
        log.buf.clear();
        log.buf.extend(held);
        log.start = offset;
        log.released = offset + held.len() as u64;
        let released = log.released;
        drop(log);
        tracing::debug!(
            target: "understudy::release",
            generation = self.generation.load(std::sync::atomic::Ordering::Acquire),
            upto = released,
            "took over"
        );
        self.released_tx.send_replace(released);
    }

    /// Appends guest output; returns the end offset.
    pub fn append(&self, bytes: &[u8]) -> u64 {
        let mut log = self.lock();
        log.buf.extend(bytes);
        log.end()
    }

    /// Offset after the last appended byte.
    pub fn end(&self) -> u64 {
        self.lock().end()
    }

    /// Offset after the last released byte.
    pub fn released(&self) -> u64 {
        self.lock().released
    }

    /// The generation releases happen at from now on (for release events).
    pub fn set_generation(&self, generation: u64) {
        self.generation
            .store(generation, std::sync::atomic::Ordering::Release);
    }

    /// Releases output up to `offset` (clamped to what exists).
    pub fn release_to(&self, offset: u64) {
        let mut log = self.lock();
        let offset = offset.min(log.end());
        if offset > log.released {
            log.released = offset;
            log.trim();
            let released = log.released;
            drop(log);
            tracing::debug!(
                target: "understudy::release",
                generation = self.generation.load(std::sync::atomic::Ordering::Acquire),
                upto = released,
                "released"
            );
            self.released_tx.send_replace(released);
        }
    }

    /// Releases everything appended so far.
    pub fn release_all(&self) {
        let end = self.end();
        self.release_to(end);
    }

    /// Bytes appended but not released.
    pub fn unreleased_len(&self) -> usize {
        let log = self.lock();
        (log.end() - log.released) as usize
    }

    /// Unreleased output: (offset of first byte, bytes).
    pub fn unreleased(&self) -> (u64, Vec<u8>) {
        let log = self.lock();
        let from = (log.released - log.start) as usize;
        (log.released, log.buf.range(from..).copied().collect())
    }

    /// Drops unreleased output for good (a fenced primary).
    pub fn discard_unreleased(&self) -> usize {
        let mut log = self.lock();
        let keep = (log.released - log.start) as usize;
        let dropped = log.buf.len() - keep;
        log.buf.truncate(keep);
        dropped
    }

    /// Closes every connected client once it has been sent all released
    /// output (a switchover moved the guest to the other host; resuming
    /// clients reconnect there with their offset). New clients are accepted.
    pub fn disconnect_clients(&self) {
        self.disconnect_tx.send_modify(|n| *n += 1);
    }

    /// Where clients without a resume request start (`None` = "now").
    pub fn set_raw_start(&self, offset: Option<u64>) {
        self.lock().raw_start = offset;
    }

    /// Released bytes from `from` on (moved up to the oldest kept byte;
    /// nothing yet if `from` is beyond the released end).
    fn read_released(&self, from: u64, max: usize) -> (u64, Vec<u8>) {
        let log = self.lock();
        let from = from.max(log.start);
        if from >= log.released {
            return (from, Vec::new());
        }
        let skip = (from - log.start) as usize;
        let n = ((log.released - from) as usize).min(max);
        (from, log.buf.range(skip..skip + n).copied().collect())
    }

    /// Where a new client starts. A resume offset is honoured even beyond
    /// what is released yet (the client waits for it: a standby's console
    /// starts empty and fills at promotion); only bytes no longer kept are
    /// skipped.
    fn start_for(&self, requested: Option<u64>) -> u64 {
        let log = self.lock();
        let wanted = match requested {
            Some(FROM_NOW) => log.released,
            Some(offset) => offset,
            None => log.raw_start.unwrap_or(log.released),
        };
        wanted.max(log.start)
    }
}

/// Where console input goes: the running guest. (`understudy_vmm::ConsoleInput`;
/// a trait so the console can be tested without a VM.)
pub trait GuestInput: Send + Sync + std::fmt::Debug {
    /// Queues `bytes` if there is room.
    fn try_send(&self, bytes: &[u8]) -> Result<(), InputRefused>;
    /// The input offset the next byte gets.
    fn next_offset(&self) -> u64;
}

impl GuestInput for ConsoleInput {
    fn try_send(&self, bytes: &[u8]) -> Result<(), InputRefused> {
        ConsoleInput::try_send(self, bytes)
    }

    fn next_offset(&self) -> u64 {
        ConsoleInput::next_offset(self)
    }
}

/// How often a client whose input the guest has not read yet tries again.
const INPUT_RETRY: Duration = Duration::from_millis(2);

/// The guest console's input: the VM running on this host, if any. Clients'
/// input waits (in their sockets) while there is none, or while the guest
/// has not read what it was given.
#[derive(Debug)]
pub struct InputSink {
    target: watch::Sender<Option<Arc<dyn GuestInput>>>,
}

impl InputSink {
    /// A sink feeding `input` (None: no VM runs here yet).
    pub fn new(input: Option<Arc<dyn GuestInput>>) -> Arc<Self> {
        Arc::new(Self {
            target: watch::Sender::new(input),
        })
    }

    /// Connects the running guest (or disconnects it: None).
    pub fn set(&self, input: Option<ConsoleInput>) {
        self.set_target(input.map(|i| Arc::new(i) as Arc<dyn GuestInput>));
    }

    /// Connects any input target (tests).
    pub fn set_target(&self, input: Option<Arc<dyn GuestInput>>) {
        self.target.send_replace(input);
    }

    /// Waits until a guest runs here; its next input offset.
    async fn next_offset(&self) -> u64 {
        let mut rx = self.target.subscribe();
        loop {
            if let Some(t) = rx.borrow_and_update().as_ref() {
                return t.next_offset();
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Hands `bytes` to the guest, waiting while none runs here or it has not
    /// read its earlier input. Returns false if the guest ended meanwhile
    /// (the bytes are dropped: no guest will ever read them here).
    async fn send(&self, bytes: &[u8]) -> bool {
        let mut rx = self.target.subscribe();
        loop {
            let target = rx.borrow_and_update().clone();
            match target {
                None => {
                    if rx.changed().await.is_err() {
                        return false;
                    }
                }
                Some(t) => match t.try_send(bytes) {
                    Ok(()) => return true,
                    Err(InputRefused::Ended) => {
                        // A new VM may take over (a promotion): wait for it.
                        tokio::select! {
                            changed = rx.changed() => if changed.is_err() { return false },
                            _ = tokio::time::sleep(Duration::from_secs(1)) => return false,
                        }
                    }
                    Err(InputRefused::Full) => tokio::time::sleep(INPUT_RETRY).await,
                },
            }
        }
    }
}

/// How the console server treats its clients.
#[derive(Clone, Debug)]
pub struct ConsoleOptions {
    /// Clients served at once; more are told so and closed.
    pub max_clients: usize,
    /// TLS with client certificates (None: plain TCP).
    pub tls: Option<ConsoleTls>,
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        Self {
            max_clients: DEFAULT_MAX_CLIENTS,
            tls: None,
        }
    }
}

/// Console clients served at once unless configured otherwise.
pub const DEFAULT_MAX_CLIENTS: usize = 64;
/// File descriptors kept free for the image store, replication and the VM:
/// no console client is accepted past `RLIMIT_NOFILE − FD_RESERVE`.
pub const FD_RESERVE: usize = 128;
/// A client that takes no output for this long (its window full) is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP keep-alive of console connections: a vanished client is noticed.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// The console's TLS: the host's identity, and who may connect (operators
/// and console clients whose certificates the pair's CA signed).
#[derive(Clone)]
pub struct ConsoleTls {
    /// The host's certificate and the client verifier, following the files.
    pub server: std::sync::Arc<crate::server_tls::ServerTls>,
    /// Who may connect.
    pub auth: crate::auth::Authority,
}

impl std::fmt::Debug for ConsoleTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleTls")
    }
}

/// Open file descriptors of this process and its limit.
fn descriptors() -> (usize, usize) {
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    let cur = if rc == 0 {
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    } else {
        usize::MAX
    };
    (open, cur)
}

/// Raises this process's descriptor limit to its hard limit (done once at
/// start-up; the console's reserve is measured against it).
pub fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Serves the console until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    log: Arc<ConsoleLog>,
    input: Arc<InputSink>,
    options: ConsoleOptions,
    shutdown: CancellationToken,
) {
    let clients = Arc::new(tokio::sync::Semaphore::new(options.max_clients));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (mut stream, peer) = match accepted {
            Ok(a) => a,
            Err(err) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(%err, "console accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (open, limit) = descriptors();
        let refusal = if open + FD_RESERVE > limit {
            Some(format!(
                "understudy: console refused: {open} of {limit} file descriptors in use (the rest are kept for the VM's state)\n"
            ))
        } else if clients.available_permits() == 0 {
            Some(format!(
                "understudy: console refused: {} clients already connected\n",
                options.max_clients
            ))
        } else {
            None
        };
        if let Some(why) = refusal {
            tracing::warn!(%peer, reason = why.trim(), "console client refused");
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), stream.write_all(why.as_bytes()))
                        .await;
            });
            continue;
        }
        let Ok(permit) = clients.clone().try_acquire_owned() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE)
            .with_interval(Duration::from_secs(5));
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        tracing::debug!(%peer, "console client connected");
        let (log, input, shutdown) = (log.clone(), input.clone(), shutdown.clone());
        let tls = options.tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => client(stream, log, input, shutdown).await,
                Some(tls) => {
                    let accepted = tokio::time::timeout(
                        HANDSHAKE_TIMEOUT,
                        tls.server.acceptor().accept(stream),
                    )
                    .await;
                    let stream = match accepted {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, error = %e, "console TLS handshake refused");
                            return;
                        }
                        Err(_) => return,
                    };
                    let stream = crate::revocation::Watched::accepted(stream, "a console client");
                    let caller = stream
                        .get_ref()
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| tls.auth.identify_der(c.as_ref()));
                    match caller {
                        Some(
                            crate::auth::Caller::Operator(_) | crate::auth::Caller::Console(_),
                        ) => {
                            client(stream, log, input, shutdown).await;
                        }
                        other => {
                            tracing::warn!(%peer, caller = ?other, "console client refused: not an operator or console certificate");
                        }
                    }
                }
            }
        });
    }
}

async fn client<S>(
    stream: S,
    log: Arc<ConsoleLog>,
    input: Arc<InputSink>,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Optional resume request: wait briefly for 16 bytes starting with a magic.
    let mut first = Vec::with_capacity(16);
    let deadline = tokio::time::Instant::now() + RESUME_GRACE;
    let mut buf = [0u8; 4096];
    let is_magic_prefix = |b: &[u8]| {
        let n = b.len().min(8);
        RESUME_MAGIC.starts_with(&b[..n]) || RESUME_MAGIC_V2.starts_with(&b[..n])
    };
    while first.len() < 16 && is_magic_prefix(&first) {
        match tokio::time::timeout_at(deadline, rd.read(&mut buf[..16 - first.len()])).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => first.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let magic = (first.len() == 16)
        .then(|| {
            [RESUME_MAGIC, RESUME_MAGIC_V2]
                .into_iter()
                .find(|m| first[..8] == *m)
        })
        .flatten();
    let requested = magic.map(|_| {
        let mut o = [0u8; 8];
        o.copy_from_slice(&first[8..16]);
        u64::from_le_bytes(o)
    });
    let mut early_input = Vec::new();
    if magic == Some(RESUME_MAGIC_V2) {
        // The input offset is known once a VM runs here; a client that gives
        // up meanwhile (it looks for the VM elsewhere) ends this task.
        let mut probe = [0u8; 4096];
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = input.next_offset() => break,
                n = rd.read(&mut probe) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => early_input.extend_from_slice(&probe[..n]),
                },
            }
        }
    }
    let mut cursor = log.start_for(requested);
    match magic {
        Some(RESUME_MAGIC_V2) => {
            let input_next = input.next_offset().await;
            let mut reply = RESUME_MAGIC_V2.to_vec();
            reply.extend_from_slice(&cursor.to_le_bytes());
            reply.extend_from_slice(&input_next.to_le_bytes());
            if wr.write_all(&reply).await.is_err() {
                return;
            }
        }
        Some(_) => {
            let mut reply = RESUME_MAGIC.to_vec();
            reply.extend_from_slice(&cursor.to_le_bytes());
            if wr.write_all(&reply).await.is_err() {
                return;
            }
        }
        None => {}
    }
    let pending_first = if magic.is_none() { first } else { early_input };

    let reader = {
        let input = input.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if !pending_first.is_empty() && !input.send(&pending_first).await {
                return;
            }
            let mut buf = [0u8; 4096];
            loop {
                // Back-pressure: the next read waits until the guest took
                // this chunk.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = rd.read(&mut buf) => match n {
                        Ok(0) | Err(_) => return,
                        Ok(n) => if !input.send(&buf[..n]).await { return },
                    },
                }
            }
        })
    };
    let mut released = log.released_tx.subscribe();
    let mut disconnect = log.disconnect_tx.subscribe();
    let mut closing = false;
    loop {
        let (from, bytes) = log.read_released(cursor, 64 * 1024);
        if from > cursor {
            if requested.is_some() {
                // A resuming client must never miss a byte: close, so it
                // reconnects and learns where the output it needs is.
                tracing::warn!(
                    behind = from - cursor,
                    "console client is behind what this host keeps: closing it"
                );
                break;
            }
            tracing::warn!(
                lost = from - cursor,
                "console client was too far behind; output skipped"
            );
        }
        if bytes.is_empty() {
            // Asked to disconnect: only once everything released is sent.
            if closing {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = disconnect.changed() => closing = true,
                changed = released.changed() => if changed.is_err() { break },
            }
            continue;
        }
        // A client that does not take its output is dropped, not waited
        // for: it would hold a descriptor and this task for ever.
        match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                tracing::warn!("console client took no output for {WRITE_TIMEOUT:?}: dropped");
                break;
            }
        }
        cursor = from + bytes.len() as u64;
    }
    reader.abort();
}

/// Input a [`ResumingClient`] keeps for resending after a failover.
const KEEP_INPUT: usize = 1 << 20;

/// A console client that resumes by offset: exactly-once output and input
/// across reconnections, switchovers and failovers (used by tests, the demo
/// and `understudyctl`). It keeps the last 1 MiB of what it sent and resends
/// whatever the VM on the host it reconnects to has not taken.
pub struct ResumingClient {
    stream: Box<dyn ConsoleStream>,
    /// TLS for every host it connects to (None: plain TCP).
    tls: Option<tokio_rustls::TlsConnector>,
    /// Offset of the next byte expected.
    pub offset: u64,
    /// Input offset of `sent[0]`.
    input_base: u64,
    /// Input sent, kept for resending.
    sent: VecDeque<u8>,
}

impl std::fmt::Debug for ResumingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumingClient")
            .field("offset", &self.offset)
            .field("input_base", &self.input_base)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A console connection, plain or TLS.
trait ConsoleStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ConsoleStream for T {}

/// Connects to a console (TLS when `tls` is given: the host's certificate
/// must name `addr`'s IP).
async fn dial(
    addr: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> std::io::Result<Box<dyn ConsoleStream>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    match tls {
        None => Ok(Box::new(stream)),
        Some(connector) => {
            let name = rustls::pki_types::ServerName::from(addr.ip());
            Ok(Box::new(connector.connect(name, stream).await?))
        }
    }
}

impl ResumingClient {
    /// Connects and asks for output from now on (the client learns the
    /// offset, so it can resume elsewhere later).
    pub async fn connect_now(addr: SocketAddr) -> std::io::Result<Self> {
        Self::connect_now_with(addr, None).await
    }

    /// [`Self::connect_now`] over TLS (a console with `tls.console = true`).
    pub async fn connect_now_with(
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsConnector>,
    ) -> std::io::Result<Self> {
        let (stream, start, input_next) = Self::request(addr, FROM_NOW, tls.as_ref()).await?;
        Ok(Self {
            stream,
            tls,
            offset: start,
            input_base: input_next,
            sent: VecDeque::new(),
        })
    }

    async fn request(
        addr: SocketAddr,
        offset: u64,
        tls: Option<&tokio_rustls::TlsConnector>,
    ) -> std::io::Result<(Box<dyn ConsoleStream>, u64, u64)> {
        let mut stream = dial(addr, tls).await?;
        let mut req = RESUME_MAGIC_V2.to_vec();
        req.extend_from_slice(&offset.to_le_bytes());
        stream.write_all(&req).await?;
        let mut reply = [0u8; 24];
        stream.read_exact(&mut reply).await?;
        if reply[..8] != RESUME_MAGIC_V2 {
            return Err(std::io::Error::other(
                "console did not answer the resume request",
            ));
        }
        let u64_at = |at: usize| {
            let mut o = [0u8; 8];
            o.copy_from_slice(&reply[at..at + 8]);
            u64::from_le_bytes(o)
        };
        Ok((stream, u64_at(8), u64_at(16)))
    }

    /// Connects and asks for output from `offset`.
    pub async fn connect(addr: SocketAddr, offset: u64) -> std::io::Result<Self> {
        Self::connect_with(addr, offset, None).await
    }

    /// [`Self::connect`] over TLS.
    pub async fn connect_with(
        addr: SocketAddr,
        offset: u64,
        tls: Option<tokio_rustls::TlsConnector>,
    ) -> std::io::Result<Self> {
        let (stream, start, input_next) = Self::request(addr, offset, tls.as_ref()).await?;
        let mut client = Self {
            stream,
            tls,
            offset: start,
            input_base: input_next,
            sent: VecDeque::new(),
        };
        client.skip_to(offset).await?;
        Ok(client)
    }

    /// Skips output this client already has (the server started at
    /// `self.offset`, at or before `offset`).
    async fn skip_to(&mut self, offset: u64) -> std::io::Result<()> {
        if self.offset > offset {
            return Err(std::io::Error::other(format!(
                "console output from offset {offset} to {} is gone",
                self.offset
            )));
        }
        let mut skip = (offset - self.offset) as usize;
        let mut buf = [0u8; 4096];
        while skip > 0 {
            let n = self.stream.read(&mut buf[..skip.min(4096)]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            skip -= n;
        }
        self.offset = offset;
        Ok(())
    }

    /// Connects to `addr` (the same host or the other one) where this
    /// client left off: output from its offset, and the input the VM there
    /// has not taken is sent again.
    pub async fn reconnect(&mut self, addr: SocketAddr) -> std::io::Result<()> {
        let wanted = self.offset;
        let (stream, start, input_next) = Self::request(addr, wanted, self.tls.as_ref()).await?;
        if self.sent.is_empty() {
            // Nothing of ours to resend: input offsets are someone else's.
            self.input_base = input_next;
        }
        let sent_end = self.input_base + self.sent.len() as u64;
        if input_next < self.input_base {
            return Err(std::io::Error::other(format!(
                "the console wants input from offset {input_next}; this client kept only from {}",
                self.input_base
            )));
        }
        if input_next > sent_end {
            return Err(std::io::Error::other(format!(
                "the console took input up to {input_next} but this client sent only up to {sent_end}: \
                 another client writes to it"
            )));
        }
        self.stream = stream;
        self.offset = start;
        self.skip_to(wanted).await?;
        let resend: Vec<u8> = self
            .sent
            .range((input_next - self.input_base) as usize..)
            .copied()
            .collect();
        if !resend.is_empty() {
            self.stream.write_all(&resend).await?;
        }
        Ok(())
    }

    /// Reads some output.
    pub async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.stream.read(buf).await?;
        self.offset += n as u64;
        Ok(n)
    }

    /// Sends input to the guest (kept for resending after a failover).
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.sent.extend(bytes);
        let excess = self.sent.len().saturating_sub(KEEP_INPUT);
        self.sent.drain(..excess);
        self.input_base += excess as u64;
        self.stream.write_all(bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_released_output_is_readable_and_unreleased_can_be_dropped() {
        let log = ConsoleLog::new(100);
        assert_eq!(log.append(b"hello "), 106);
        assert_eq!(log.append(b"world"), 111);
        assert_eq!(log.read_released(100, 100), (100, vec![]));
        log.release_to(106);
        assert_eq!(log.read_released(100, 100), (100, b"hello ".to_vec()));
        assert_eq!(log.unreleased(), (106, b"world".to_vec()));
        assert_eq!(log.discard_unreleased(), 5);
        assert_eq!(log.end(), 106);
        log.release_to(1000);
        assert_eq!(log.released(), 106, "cannot release what does not exist");
    }

    /// A guest's input queue: takes at most `room` bytes until drained.
    #[derive(Debug, Default)]
    struct FakeGuest {
        taken: Mutex<Vec<u8>>,
        base: u64,
        room: usize,
    }

    impl GuestInput for FakeGuest {
        fn try_send(&self, bytes: &[u8]) -> Result<(), InputRefused> {
            let mut taken = self.taken.lock().unwrap();
            if self.room > 0 && taken.len() + bytes.len() > self.room {
                return Err(InputRefused::Full);
            }
            taken.extend_from_slice(bytes);
            Ok(())
        }

        fn next_offset(&self) -> u64 {
            self.base + self.taken.lock().unwrap().len() as u64
        }
    }

    /// Serves `log` on a loopback port until the returned token is
    /// cancelled, with `guest` (if any) taking the input.
    async fn serve_with(
        log: &Arc<ConsoleLog>,
        guest: Option<Arc<FakeGuest>>,
    ) -> (SocketAddr, CancellationToken, Arc<InputSink>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let sink = InputSink::new(guest.map(|g| g as Arc<dyn GuestInput>));
        tokio::spawn(serve(
            listener,
            log.clone(),
            sink.clone(),
            ConsoleOptions::default(),
            shutdown.clone(),
        ));
        (addr, shutdown, sink)
    }

    async fn serve_on_loopback(log: &Arc<ConsoleLog>) -> (SocketAddr, CancellationToken) {
        let (addr, shutdown, _) = serve_with(log, Some(Arc::default())).await;
        (addr, shutdown)
    }

    /// Waits until `guest` took `n` bytes.
    async fn taken(guest: &FakeGuest, n: usize) -> Vec<u8> {
        for _ in 0..500 {
            let taken = guest.taken.lock().unwrap().clone();
            if taken.len() >= n {
                return taken;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("the guest took only {:?}", guest.taken.lock().unwrap());
    }

    #[tokio::test]
    async fn input_is_exactly_once_across_a_move_to_another_host() {
        let log = ConsoleLog::new(0);
        let first = Arc::new(FakeGuest::default());
        let (a, stop_a, _) = serve_with(&log, Some(first.clone())).await;
        let mut c = ResumingClient::connect_now(a).await.unwrap();
        c.write(b"SET a 1\nSET b").await.unwrap();
        assert_eq!(taken(&first, 13).await, b"SET a 1\nSET b");
        // The other host's VM was restored from a checkpoint that had taken
        // only "SET a 1\n" (8 bytes): the client resends the rest, once.
        let second = Arc::new(FakeGuest {
            base: 8,
            ..Default::default()
        });
        let (b, stop_b, _) = serve_with(&log, Some(second.clone())).await;
        c.reconnect(b).await.unwrap();
        c.write(b" 2\n").await.unwrap();
        assert_eq!(taken(&second, 8).await, b"SET b 2\n", "no line cut in two");
        // Reconnecting to the same host resends nothing.
        c.reconnect(b).await.unwrap();
        c.write(b"GET a\n").await.unwrap();
        assert_eq!(taken(&second, 14).await, b"SET b 2\nGET a\n");
        // A host that took more than this client sent: another writer.
        let third = Arc::new(FakeGuest {
            base: 100,
            ..Default::default()
        });
        let (d, stop_d, _) = serve_with(&log, Some(third)).await;
        let err = c.reconnect(d).await.unwrap_err();
        assert!(err.to_string().contains("another client"), "{err}");
        for s in [stop_a, stop_b, stop_d] {
            s.cancel();
        }
    }

    #[tokio::test]
    async fn a_guest_that_does_not_read_holds_its_clients_back() {
        let log = ConsoleLog::new(0);
        let guest = Arc::new(FakeGuest {
            room: 4096,
            ..Default::default()
        });
        let (addr, shutdown, _) = serve_with(&log, Some(guest.clone())).await;
        let mut raw = TcpStream::connect(addr).await.unwrap();
        // 8 MiB into a guest that takes 4 KiB: the writer blocks once the
        // socket buffers are full; nothing piles up in the server.
        let flood = vec![b'x'; 8 << 20];
        let write = tokio::time::timeout(Duration::from_millis(500), raw.write_all(&flood)).await;
        assert!(write.is_err(), "the server kept reading input nobody took");
        assert!(guest.taken.lock().unwrap().len() <= 4096);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_standby_answers_input_resumes_only_once_its_vm_runs() {
        let log = ConsoleLog::new(0);
        let (addr, shutdown, sink) = serve_with(&log, None).await;
        let pending = tokio::spawn(ResumingClient::connect_now(addr));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!pending.is_finished(), "answered before a VM ran");
        sink.set_target(Some(Arc::new(FakeGuest {
            base: 42,
            ..Default::default()
        })));
        let c = pending.await.unwrap().unwrap();
        assert_eq!(c.input_base, 42);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn resuming_clients_get_exactly_once_and_raw_clients_get_now() {
        let log = ConsoleLog::new(0);
        log.append(b"0123456789");
        log.release_to(10);
        let (addr, shutdown) = serve_on_loopback(&log).await;

        let mut c = ResumingClient::connect(addr, 4).await.unwrap();
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        while got.len() < 6 {
            let n = c.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"456789");
        log.append(b"abc");
        log.release_all();
        let n = c.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"abc");
        assert_eq!(c.offset, 13);

        // A raw client sees only what is released after it connected.
        let mut raw = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(RESUME_GRACE * 2).await;
        log.append(b"XY");
        log.release_all();
        let n = raw.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"XY");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn clients_from_now_learn_their_offset_and_a_disconnect_flushes_first() {
        let log = ConsoleLog::new(0);
        log.append(b"old output\n");
        log.release_all();
        let (addr, shutdown) = serve_on_loopback(&log).await;
        let mut c = ResumingClient::connect_now(addr).await.unwrap();
        assert_eq!(c.offset, 11, "starts at the released end");
        // Released output, then a disconnect (a switchover): the client gets
        // every released byte before the connection closes.
        log.append(b"last words");
        log.release_all();
        log.disconnect_clients();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            let n = c.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"last words");
        assert_eq!(c.offset, 21);
        // New clients are still served.
        let again = ResumingClient::connect(addr, 11).await.unwrap();
        assert_eq!(again.offset, 11);
        shutdown.cancel();
    }
}
