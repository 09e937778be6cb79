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

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use understudy_vmm::ConsoleInput;

/// Magic of the resume request and reply.
pub const RESUME_MAGIC: [u8; 8] = *b"USCONSOL";
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

    /// Empties the log and restarts it at `offset` (a promoted backup takes
    /// over the stream where the primary's last checkpoint left it).
    pub fn restart_at(&self, offset: u64) {
        let mut log = self.lock();
        log.buf.clear();
        log.start = offset;
        log.released = offset;
        drop(log);
        self.released_tx.send_replace(offset);
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

    /// Releases output up to `offset` (clamped to what exists).
    pub fn release_to(&self, offset: u64) {
        let mut log = self.lock();
        let offset = offset.min(log.end());
        if offset > log.released {
            log.released = offset;
            log.trim();
            let released = log.released;
            drop(log);
            self.released_tx.send_replace(released);
        }
    }

    /// Releases everything appended so far.
    pub fn release_all(&self) {
        let end = self.end();
        self.release_to(end);
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

/// Input a standby holds for the guest it may promote (clients reconnect as
/// soon as the primary dies, often before the promotion).
const MAX_HELD_INPUT: usize = 64 * 1024;

/// Where console input goes: the guest, once there is one running here;
/// until then it is held (up to 64 KiB) and delivered when the guest starts.
#[derive(Debug, Default)]
pub struct InputSink(Mutex<(Option<ConsoleInput>, Vec<u8>)>);

impl InputSink {
    pub fn new(input: Option<ConsoleInput>) -> Arc<Self> {
        Arc::new(Self(Mutex::new((input, Vec::new()))))
    }

    /// Connects the running guest and hands it any held input.
    pub fn set(&self, input: Option<ConsoleInput>) {
        let mut sink = self.0.lock().unwrap_or_else(|p| p.into_inner());
        sink.0 = input;
        if let Some(input) = &sink.0
            && !sink.1.is_empty()
        {
            input.send(&sink.1);
            sink.1.clear();
        }
    }

    fn send(&self, bytes: &[u8]) {
        let mut sink = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &sink.0 {
            Some(input) => {
                input.send(bytes);
            }
            None => {
                let room = MAX_HELD_INPUT.saturating_sub(sink.1.len());
                if room < bytes.len() {
                    tracing::warn!(
                        dropped = bytes.len() - room,
                        "console input held for a standby overflowed"
                    );
                }
                sink.1.extend_from_slice(&bytes[..bytes.len().min(room)]);
            }
        }
    }
}

/// Serves the console until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    log: Arc<ConsoleLog>,
    input: Arc<InputSink>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tracing::debug!(%peer, "console client connected");
                tokio::spawn(client(stream, log.clone(), input.clone(), shutdown.clone()));
            }
            Err(err) => {
                tracing::warn!(%err, "console accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn client(
    stream: TcpStream,
    log: Arc<ConsoleLog>,
    input: Arc<InputSink>,
    shutdown: CancellationToken,
) {
    let (mut rd, mut wr) = stream.into_split();
    // Optional resume request: wait briefly for 16 bytes starting with the magic.
    let mut first = Vec::with_capacity(16);
    let deadline = tokio::time::Instant::now() + RESUME_GRACE;
    let mut buf = [0u8; 4096];
    while first.len() < 16 && RESUME_MAGIC.starts_with(&first[..first.len().min(8)]) {
        match tokio::time::timeout_at(deadline, rd.read(&mut buf[..16 - first.len()])).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => first.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let requested = (first.len() == 16 && first[..8] == RESUME_MAGIC).then(|| {
        let mut o = [0u8; 8];
        o.copy_from_slice(&first[8..16]);
        u64::from_le_bytes(o)
    });
    let mut cursor = log.start_for(requested);
    if requested.is_some() {
        let mut reply = RESUME_MAGIC.to_vec();
        reply.extend_from_slice(&cursor.to_le_bytes());
        if wr.write_all(&reply).await.is_err() {
            return;
        }
    } else if !first.is_empty() {
        input.send(&first);
    }

    let reader = {
        let input = input.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = rd.read(&mut buf) => match n {
                        Ok(0) | Err(_) => return,
                        Ok(n) => input.send(&buf[..n]),
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
        if wr.write_all(&bytes).await.is_err() {
            break;
        }
        cursor = from + bytes.len() as u64;
    }
    reader.abort();
}

/// A console client that resumes by offset: exactly-once output across
/// reconnections and failovers (used by tests, the demo and `understudyctl`).
#[derive(Debug)]
pub struct ResumingClient {
    stream: TcpStream,
    /// Offset of the next byte expected.
    pub offset: u64,
}

impl ResumingClient {
    /// Connects and asks for output from now on (the client learns the
    /// offset, so it can resume elsewhere later).
    pub async fn connect_now(addr: SocketAddr) -> std::io::Result<Self> {
        let (stream, start) = Self::request(addr, FROM_NOW).await?;
        Ok(Self {
            stream,
            offset: start,
        })
    }

    async fn request(addr: SocketAddr, offset: u64) -> std::io::Result<(TcpStream, u64)> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut req = RESUME_MAGIC.to_vec();
        req.extend_from_slice(&offset.to_le_bytes());
        stream.write_all(&req).await?;
        let mut reply = [0u8; 16];
        stream.read_exact(&mut reply).await?;
        if reply[..8] != RESUME_MAGIC {
            return Err(std::io::Error::other(
                "console did not answer the resume request",
            ));
        }
        let mut o = [0u8; 8];
        o.copy_from_slice(&reply[8..]);
        Ok((stream, u64::from_le_bytes(o)))
    }

    /// Connects and asks for output from `offset`.
    pub async fn connect(addr: SocketAddr, offset: u64) -> std::io::Result<Self> {
        let (stream, start) = Self::request(addr, offset).await?;
        if start > offset {
            return Err(std::io::Error::other(format!(
                "console output from offset {offset} to {start} is gone"
            )));
        }
        let mut client = Self {
            stream,
            offset: start,
        };
        // Skip what we already have.
        let mut skip = (offset - start) as usize;
        let mut buf = [0u8; 4096];
        while skip > 0 {
            let n = client.stream.read(&mut buf[..skip.min(4096)]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            skip -= n;
        }
        client.offset = offset;
        Ok(client)
    }

    /// Reads some output.
    pub async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.stream.read(buf).await?;
        self.offset += n as u64;
        Ok(n)
    }

    /// Sends input to the guest.
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
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

    /// Serves `log` on a loopback port until the returned token is cancelled.
    async fn serve_on_loopback(log: &Arc<ConsoleLog>) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            log.clone(),
            InputSink::new(None),
            shutdown.clone(),
        ));
        (addr, shutdown)
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
