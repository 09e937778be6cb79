//! Replication pipeline throughput against the link it runs on, in one run:
//! a real backup daemon on loopback receives epochs from a sender that
//! encodes real memory (binaries from /usr), stages, verifies and commits
//! them; next to it, single-stream loopback TCP moves the same bytes (the
//! fastest of three runs), twice: out of one hot 1 MiB buffer into another
//! (the link's limit with the memory system out of it), and as the pipeline
//! has them, each page from its place in the same memory into its place in a
//! region of the same size (`writev`/`readv`; what moving these pages costs
//! TCP itself).
//!
//! Reports: full sync of 256 MiB (resync) ÷ streaming 256 MiB over TCP (into a
//! backup that waited, and one just started, beside a plain write of the same
//! bytes into a just-created image file: what fresh memory alone costs), and
//! checkpoints of 1k/10k/50k dirty pages in MB/s of guest pages, raw and
//! adaptive, with bytes on the wire ÷ bytes dirtied; the time to protect an
//! idle VM from cold with real daemons, beside QEMU migrating an idle VM of
//! the same RAM (with QEMU installed: `apt install qemu-system-x86`); and
//! raw, lz4 and adaptive to a
//! backup at the far end of loopback, a 1 Gbit/s and a 100 Mbit/s link
//! (root and `iptables-legacy`, as for the migration bench).
//!
//! Run: `cargo bench -p understudy --bench pipeline`.
//! `UNDERSTUDY_BENCH_PARTS=pipeline,resync,links` picks parts,
//! `UNDERSTUDY_BENCH_CODECS=raw,adaptive` codecs (e.g. under `perf`),
//! `UNDERSTUDY_BENCH_SHOW_LOG=1` prints the daemons' logs of each resync, and
//! `UNDERSTUDY_PAIR_LOG=debug` sets the daemons' log level.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use understudy::daemon::Role;
use understudy::pair::LocalPair;
use understudy_bench::{
    PageAligned, Report, Table, ThreadTimes, XorShift, num, part, process_cpu_seconds, quantile,
    real_memory, spread,
};
use understudy_checkpoint::store::{ImageStore, StoreOptions};
use understudy_checkpoint::{CodecPolicy, EpochKind, PAGE_SIZE, SenderState};
use understudy_common::heartbeat::{Beater, SessionKey};
use understudy_common::wire;
use understudy_primary::SYNC_EPOCH_PAGES;
use understudy_primary::link_rate::LinkRate;
use understudy_proto::replication_client::ReplicationClient;
use understudy_proto::{EpochChunk, HelloRequest, PROTOCOL_VERSION};

const RAM: usize = 256 << 20;
/// Turns of each checkpoint row: a run of checkpoints, then a TCP run of
/// the same bytes (the row compares the fastest of each).
const CHECKPOINT_TURNS: usize = 3;
const PAGES: u32 = (RAM / PAGE_SIZE) as u32;
/// Full syncs of the raw row into an image its backup read ahead: the first
/// on the backup the checkpoint rows go on with, the others each on a backup
/// started for it. The row compares the fastest with TCP's fastest of three
/// (one sync of 256 MiB takes ~0.15 s and moved by a fifth between runs).
const SYNC_TURNS: usize = 3;
/// What a backup's log says once it has read its new image ahead
/// (`understudy_backup`'s `warm_in_background`).
const WARMED: &str = "read the new image into the page cache ahead of the first sync";

/// Single-stream loopback TCP: the fastest of three runs moving `bytes`
/// (rounded up to MiB), in seconds. One run swings by ±30 % on these
/// machines, so the best of three is the link's limit, as the memcpy
/// baseline of the stop is the copy's.
async fn tcp_seconds(bytes: usize) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        best = best.min(tcp_once(bytes).await);
    }
    best
}

/// One run of [`tcp_seconds`]: 1 MiB writes, until the receiver has read
/// them all.
async fn tcp_once(bytes: usize) -> f64 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        // Page-aligned, as TCP is fastest (`PageAligned`): the true limit.
        let mut buf = PageAligned::zeroed(1 << 20);
        while s.read(&mut buf).await.unwrap() > 0 {}
    });
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let chunk = PageAligned::from_slice(&[7u8; 1 << 20]);
    let t = Instant::now();
    for _ in 0..bytes.div_ceil(chunk.len()) {
        s.write_all(&chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    reader.await.unwrap();
    t.elapsed().as_secs_f64()
}

/// Single-stream loopback TCP moving the very memory the pipeline moves, the
/// fastest of three runs of [`tcp_memory_once`], in seconds.
fn tcp_memory_seconds(rounds: &[&[u8]], pages: &[u32], dest: &mut [u8]) -> f64 {
    (0..3)
        .map(|_| tcp_memory_once(rounds, pages, dest))
        .fold(f64::INFINITY, f64::min)
}

/// Loopback TCP with the memory system in it, as the pipeline has it: for
/// each of `rounds`, the `pages` of that round's memory leave from their
/// places in it (`writev`, 1 MiB at a time) and land at their places in
/// `dest`, a region of the same size touched beforehand (`readv`), as a
/// backup's image holds them. Plain blocking sockets and two threads, nothing
/// else: seconds from the first byte sent until the last one is placed.
fn tcp_memory_once(rounds: &[&[u8]], pages: &[u32], dest: &mut [u8]) -> f64 {
    use std::io::{IoSlice, IoSliceMut, Read, Write};
    const BATCH: usize = (1 << 20) / PAGE_SIZE;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|scope| {
        let receiver = scope.spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            for _ in rounds {
                for batch in pages.chunks(BATCH) {
                    // `pages` is sorted and has no repeats: each page's frame
                    // lies past the one before it.
                    let mut frames = dest.chunks_exact_mut(PAGE_SIZE);
                    let mut next = 0;
                    let mut slices: Vec<IoSliceMut<'_>> = batch
                        .iter()
                        .map(|&p| {
                            let frame = frames.nth(p as usize - next).unwrap();
                            next = p as usize + 1;
                            IoSliceMut::new(frame)
                        })
                        .collect();
                    let mut slices = &mut slices[..];
                    while !slices.is_empty() {
                        let n = s.read_vectored(slices).unwrap();
                        assert!(n > 0, "the sender closed early");
                        IoSliceMut::advance_slices(&mut slices, n);
                    }
                }
            }
        });
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        for mem in rounds {
            for batch in pages.chunks(BATCH) {
                let mut slices: Vec<IoSlice<'_>> = batch
                    .iter()
                    .map(|&p| IoSlice::new(&mem[p as usize * PAGE_SIZE..][..PAGE_SIZE]))
                    .collect();
                let mut slices = &mut slices[..];
                while !slices.is_empty() {
                    let n = s.write_vectored(slices).unwrap();
                    IoSlice::advance_slices(&mut slices, n);
                }
            }
        }
        receiver.join().unwrap();
        t.elapsed().as_secs_f64()
    })
}

/// A region of `bytes` with every page touched, page-aligned as an image's
/// pages are: the destination of [`tcp_memory_once`].
fn touched(bytes: usize) -> PageAligned {
    PageAligned::zeroed(bytes)
}

async fn send(tx: &tokio::sync::mpsc::Sender<EpochChunk>, id: u64, chunks: Vec<Vec<u8>>) -> u64 {
    let mut wire = 0;
    for c in chunks {
        wire += c.len() as u64;
        let msg = EpochChunk {
            session: id,
            generation: 1,
            chunk: c.into(),
            ..Default::default()
        };
        tx.send(msg).await.unwrap();
    }
    wire
}

struct Session {
    tx: tokio::sync::mpsc::Sender<EpochChunk>,
    acks: Option<tonic::Streaming<understudy_proto::Ack>>,
    sender: SenderState,
    id: u64,
    _beater: Beater,
    /// Time spent encoding, and the backup's stage+commit time from acks.
    encode: Duration,
    commit_us: u64,
}

impl Session {
    async fn open(addr: SocketAddr, policy: CodecPolicy, id: u64) -> Self {
        Self::open_with(addr, policy, id, RAM).await
    }

    async fn open_with(addr: SocketAddr, policy: CodecPolicy, id: u64, ram: usize) -> Self {
        // The primary's connection settings (`understudy_primary::peer`).
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .tcp_nodelay(true)
            .initial_stream_window_size(wire::STREAM_WINDOW)
            .initial_connection_window_size(wire::CONNECTION_WINDOW);
        let channel = loop {
            if let Ok(c) = endpoint.connect().await {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut client = ReplicationClient::new(channel.clone());
        let key = SessionKey::random().unwrap();
        let hello = HelloRequest {
            protocol_version: PROTOCOL_VERSION,
            vm_id: "bench".into(),
            generation: 1,
            ram_bytes: ram as u64,
            session: id,
            incarnation: 0xbe4c,
            previous: None,
            heartbeat_key: key.as_bytes().to_vec().into(),
            mode: 0,
            migration: false,
            witness_key: String::new(),
        };
        let reply = client.hello(hello).await.unwrap().into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        // The stream as the primary opens it (chunks sent without a copy).
        let acks = understudy_proto::framing::replicate(
            channel,
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )
        .await
        .unwrap();
        // Heartbeats, as a real primary sends them (or the backup promotes).
        let beater = Beater::start(addr, id, key, Duration::from_millis(10)).unwrap();
        // As the primary does: zero pages left out over a zeroed image (this
        // bench's memory has none), no body CRC on Pages chunks for a backup
        // that checks them by their page hashes.
        let pages = (ram / PAGE_SIZE) as u32;
        let mut sender = if reply.image_zeroed {
            SenderState::over_zeroed_image("bench", pages, 1, policy)
        } else {
            SenderState::new("bench", pages, 1, policy)
        }
        .unwrap();
        sender.set_pages_by_hash(reply.pages_by_hash);
        Self {
            tx,
            acks: Some(acks),
            sender,
            id,
            _beater: beater,
            encode: Duration::ZERO,
            commit_us: 0,
        }
    }

    /// Encodes and ships one epoch of `pages` from `mem`; returns bytes on the wire.
    async fn ship(&mut self, epoch: u64, kind: EpochKind, mem: &[u8], pages: &[u32]) -> u64 {
        let mut wire = 0;
        let mut encode = Duration::ZERO;
        let mut t = Instant::now();
        let (tx, id) = (self.tx.clone(), self.id);
        let mut enc = self.sender.begin(epoch, kind).unwrap();
        for (i, &p) in pages.iter().enumerate() {
            let at = p as usize * PAGE_SIZE;
            let page: &[u8; PAGE_SIZE] = mem[at..at + PAGE_SIZE].try_into().unwrap();
            enc.add_page(p, page).unwrap();
            if i % 256 == 255 {
                let chunks = enc.take_chunks();
                encode += t.elapsed();
                wire += send(&tx, id, chunks).await;
                t = Instant::now();
            }
        }
        let encoded = enc.finish(b"bench device state").unwrap();
        encode += t.elapsed();
        self.encode += encode;
        wire + send(&tx, id, encoded.chunks).await
    }

    /// Encodes one checkpoint whole, then hands it to the stream, as the
    /// primary does (`link` hears when it was handed over).
    async fn ship_whole(
        &mut self,
        epoch: u64,
        mem: &[u8],
        pages: &[u32],
        link: &mut LinkRate,
    ) -> u64 {
        let t = Instant::now();
        let mut enc = self.sender.begin(epoch, EpochKind::Checkpoint).unwrap();
        for &p in pages {
            let at = p as usize * PAGE_SIZE;
            enc.add_page(p, mem[at..at + PAGE_SIZE].try_into().unwrap())
                .unwrap();
        }
        let encoded = enc.finish(b"bench device state").unwrap();
        self.encode += t.elapsed();
        link.shipped(epoch, Instant::now(), encoded.report.bytes_out);
        send(&self.tx, self.id, encoded.chunks).await
    }

    async fn ack(&mut self) -> u64 {
        let ack = self.acks.as_mut().unwrap().next().await.unwrap().unwrap();
        self.commit_us += ack.commit_micros;
        ack.epoch
    }
}

/// A full sync of `mem` in sync-round epochs of the primary's size
/// ([`SYNC_EPOCH_PAGES`]), as the primary sends one,
/// and the checkpoint that completes it: seconds until that checkpoint is
/// acked, bytes on the wire, and the last epoch number.
async fn full_sync(s: &mut Session, mem: &[u8]) -> (f64, u64, u64) {
    let all: Vec<u32> = (0..PAGES).collect();
    s.encode = Duration::ZERO;
    s.commit_us = 0;
    let t = Instant::now();
    let mut wire = 0;
    let mut epoch = 1;
    for batch in all.chunks(SYNC_EPOCH_PAGES) {
        wire += s.ship(epoch, EpochKind::SyncRound, mem, batch).await;
        epoch += 1;
    }
    s.ship(epoch, EpochKind::Checkpoint, mem, &[]).await;
    while s.ack().await != epoch {}
    (t.elapsed().as_secs_f64(), wire, epoch)
}

/// Waits until the backup of `pair` has read its new image ahead, as a
/// backup that waits for its primary does, so a sync into it measures the
/// pipeline and not the first touch of fresh memory.
async fn wait_warmed(pair: &LocalPair) {
    let log = pair.log_path(Role::Backup);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains(WARMED)) {
        assert!(
            Instant::now() < deadline,
            "the backup did not read its image ahead within 60 s: its log {} never said \
             \"{WARMED}\" (UNDERSTUDY_PAIR_LOG, if set, must log at info or finer)",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Seconds to write `mem` into the memory file of an image created just
/// before, as a backup creates one (blocks reserved, nothing in the page
/// cache): one thread, 1 MiB writes, nothing else. On hosts that hand free
/// memory back to their hypervisor, each new page-cache page costs its first
/// touch (`docs/ARCHITECTURE.md`): the least any sync into a just-created
/// image pays on one core.
fn fresh_image_write_seconds(dir: &Path, mem: &[u8]) -> f64 {
    use std::os::unix::fs::FileExt;
    let image = dir.join("image");
    let store =
        ImageStore::create(&image, "floor", mem.len() as u64, StoreOptions::default()).unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(store.memory_path())
        .unwrap();
    let t = Instant::now();
    for (i, piece) in mem.chunks(1 << 20).enumerate() {
        file.write_all_at(piece, (i << 20) as u64).unwrap();
    }
    t.elapsed().as_secs_f64()
}

/// One row of the pipeline table; `range`: the smallest and largest ratio
/// over the turns the row is the median of (none: a single run).
#[allow(clippy::too_many_arguments)]
fn row(
    table: &mut Table,
    name: &str,
    bytes: f64,
    secs: f64,
    (tcp, tcp_memory): (f64, f64),
    wire: f64,
    s: &Session,
    range: Option<(f64, f64)>,
) {
    table.row(vec![
        name.into(),
        num(bytes / secs / 1e6, 0),
        num(bytes / tcp / 1e6, 0),
        num(tcp / secs, 2),
        range.map_or_else(
            || "one run".into(),
            |(lo, hi)| format!("{lo:.2}–{hi:.2}").into(),
        ),
        num(bytes / tcp_memory / 1e6, 0),
        num(tcp_memory / secs, 2),
        num(wire / bytes, 3),
        num(s.encode.as_secs_f64() / secs * 100.0, 0),
        num(s.commit_us as f64 / 1e6 / secs * 100.0, 0),
    ]);
}

/// What protecting a VM from cold took, as the primary logs it in "VM
/// protected": the connection, the Hello, the stream's opening and the
/// replicator's start of the sync (`setup_ms`), and the initial sync
/// (`sync_ms`: first page sent → first checkpoint acked).
struct Protected {
    setup: f64,
    sync: f64,
}

/// Protections from cold (and QEMU migrations) per row of the resync
/// table: their median counts.
const COLD_TURNS: usize = 3;

/// What the backup logs once it has built, at its start, the VM a promotion
/// would restore into: its start is done.
const SHELL_BUILT: &str = "built the VM a promotion restores into";

/// Protects a VM of `mib` MiB from cold with real daemons (a fresh backup
/// image, the counter guest) and returns what the primary logs of it. The
/// backup is started first and has finished starting (its image created,
/// the VM a promotion would restore into built) before the primary starts,
/// as QEMU's destination is listening before its migration starts; it may
/// still be reading its image ahead, as a backup waiting for its primary
/// does.
async fn protect_from_cold(mib: usize, codec: &str) -> Protected {
    let dir = tempfile::tempdir().unwrap();
    let mut pair = LocalPair::new(
        Some(Path::new(env!("CARGO_BIN_EXE_understudyd"))),
        dir.path(),
        "cold",
        &format!("guest = \"counter\"\nmemory_mib = {mib}\n[codec]\npolicy = \"{codec}\""),
    )
    .unwrap();
    pair.start(Role::Backup).unwrap();
    let log = pair.log_path(Role::Backup);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains(SHELL_BUILT)) {
        assert!(
            Instant::now() < deadline,
            "the backup did not finish starting within 60 s: its log {} never said \
             \"{SHELL_BUILT}\" (UNDERSTUDY_PAIR_LOG, if set, must log at info or finer)",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pair.start(Role::Primary).unwrap();
    pair.wait_protected(Duration::from_secs(120), |_| {})
        .await
        .unwrap();
    let log = pair.log_path(Role::Primary);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let line = text.lines().find(|l| l.contains("VM protected"));
        let field = |name: &str| {
            line?
                .split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.parse::<f64>().ok())
        };
        if let (Some(setup), Some(sync)) = (field("setup_ms="), field("sync_ms=")) {
            if std::env::var_os("UNDERSTUDY_BENCH_SHOW_LOG").is_some() {
                eprintln!("{text}");
                eprintln!(
                    "{}",
                    std::fs::read_to_string(pair.log_path(Role::Backup)).unwrap_or_default()
                );
            }
            return Protected {
                setup: setup / 1e3,
                sync: sync / 1e3,
            };
        }
        assert!(
            Instant::now() < deadline,
            "protected, but no setup_ms and sync_ms in {}:\n{text}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// RAM of the VM the codec-by-link table ships (a full sync of it crosses
/// the 100 Mbit/s link once per policy).
const LINK_RAM: usize = 64 << 20;
/// Changed pages per checkpoint in that table, and measured checkpoints
/// per policy on the shaped links.
const LINK_PAGES: usize = 2000;
const LINK_EPOCHS: u64 = 12;
/// Measured checkpoints per policy on loopback, where 12 pass in ~0.1 s
/// and one such run swings by a third on the two shared cores.
const LOOPBACK_EPOCHS: u64 = 36;
const LINK_WARMUP: u64 = 8;
/// Turns the policies take on loopback (each keeps its best run).
const LOOPBACK_TURNS: usize = 5;

/// The codec against the link it runs on: a backup daemon at the far end
/// of each link (loopback; 1 Gbit/s with a 1 ms round trip; 100 Mbit/s
/// with 50 ms, shaped as the migration bench shapes them), a VM of real
/// memory synced, then checkpoints that each rewrite 2000 pages with new
/// content, by each policy in turn. The adaptive policy is told the link's
/// rate by the primary's own estimator (`understudy_primary::link_rate`),
/// fed by these checkpoints' handovers and acks.
fn codec_by_link(runtime: &tokio::runtime::Runtime, report: &mut Report) {
    use understudy_bench::wan::{LinkSpec, Wan};
    let daemon = Path::new(env!("CARGO_BIN_EXE_understudyd"));
    let mut table = Table::new(
        format!(
            "The codec against the link: checkpoints of {LINK_PAGES} rewritten pages of real \
             memory ({} MiB VM) to a backup daemon at the far end of each link, MB/s of guest \
             pages by policy, same run (on loopback {LOOPBACK_EPOCHS} checkpoints a run, the \
             best of {LOOPBACK_TURNS} turns each); \
             adaptive ÷ best = adaptive against the faster of raw and lz4 on that link",
            LINK_RAM >> 20
        ),
        &[
            "link",
            "raw MB/s",
            "lz4 MB/s",
            "adaptive MB/s",
            "adaptive ÷ best",
            "link rate it measured",
            "adaptive wire ÷ dirtied",
        ],
    );
    let base = real_memory(LINK_RAM);
    let mut shifted = base.clone();
    shifted.rotate_left(7_654_321);
    let mut worst = f64::INFINITY;
    let links = [
        ("loopback", None),
        (
            "1 Gbit/s, 1 ms",
            Some(LinkSpec::new(1000, Duration::from_millis(1))),
        ),
        (
            "100 Mbit/s, 50 ms",
            Some(LinkSpec::new(100, Duration::from_millis(50))),
        ),
    ];
    for (name, spec) in links {
        if !only_link(name) {
            continue;
        }
        let wan = spec.map(|s| Wan::new(&s).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let mut pair = LocalPair::new(
            Some(daemon),
            dir.path(),
            "bench",
            &format!("guest = \"counter\"\nmemory_mib = {}", LINK_RAM >> 20),
        )
        .unwrap();
        let mut backup = None;
        let addr = match &wan {
            None => {
                pair.start(Role::Backup).unwrap();
                pair.addrs.replication
            }
            Some(wan) => {
                pair.listen_on(wan.far.into()).unwrap();
                let log = std::fs::File::create(dir.path().join("far-backup.log")).unwrap();
                backup = Some(
                    wan.command(daemon)
                        .args(["backup", "--config"])
                        .arg(&pair.config)
                        .arg("--set")
                        .arg(format!(
                            "state_dir={:?}",
                            dir.path().join("backup").display().to_string()
                        ))
                        .stdin(std::process::Stdio::null())
                        .stdout(std::process::Stdio::null())
                        .stderr(log)
                        .spawn()
                        .unwrap(),
                );
                pair.addrs.replication
            }
        };
        // On loopback twelve checkpoints take ~0.1 s, and one such run
        // swings by a third on the two shared cores: a run there is
        // LOOPBACK_EPOCHS checkpoints, and the policies take turns
        // LOOPBACK_TURNS times, each keeping its best. On the shaped links
        // the link sets the pace and one run lasts seconds.
        let (turns, epochs) = if wan.is_none() {
            (LOOPBACK_TURNS, LOOPBACK_EPOCHS)
        } else {
            (1, LINK_EPOCHS)
        };
        let mut rates = [0.0f64; 3];
        let mut measured = None;
        let mut adaptive_wire = f64::NAN;
        let mut id = 2000;
        for _ in 0..turns {
            for (i, policy) in [CodecPolicy::RAW, CodecPolicy::LZ4, CodecPolicy::ADAPTIVE]
                .into_iter()
                .enumerate()
            {
                id += 1;
                let (rate, link, wire) =
                    runtime.block_on(link_run(addr, policy, id, epochs, &base, &shifted));
                if rate > rates[i] {
                    rates[i] = rate;
                    if policy.adaptive {
                        measured = link;
                        adaptive_wire = wire;
                    }
                }
            }
        }
        if let Some(mut child) = backup {
            let _ = child.kill();
            let _ = child.wait();
        }
        drop(pair);
        let best = rates[0].max(rates[1]);
        let ratio = rates[2] / best;
        worst = worst.min(ratio);
        println!(
            "{name}: raw {:.1}, lz4 {:.1}, adaptive {:.1} MB/s",
            rates[0], rates[1], rates[2]
        );
        table.row(vec![
            name.into(),
            num(rates[0], 1),
            num(rates[1], 1),
            num(rates[2], 1),
            num(ratio, 2),
            measured
                .map_or_else(|| "-".to_owned(), |r| format!("{:.0} MB/s", r / 1e6))
                .into(),
            num(adaptive_wire, 3),
        ]);
        drop(wan);
    }
    report.table(table);
    report.target(
        "the adaptive codec on every link",
        "never slower than the faster of raw and lz4 (≥ 0.9×, same run)",
        format!("worst {worst:.2}× over loopback, 1 Gbit/s and 100 Mbit/s"),
        worst >= 0.9,
    );
}

/// One policy over one link: a full sync, [`LINK_WARMUP`] checkpoints, then
/// `epochs` measured checkpoints of [`LINK_PAGES`] pages; returns MB/s of
/// guest pages over the checkpoints, the link rate the estimator ended
/// with, and wire ÷ dirtied.
async fn link_run(
    addr: SocketAddr,
    policy: CodecPolicy,
    id: u64,
    epochs: u64,
    base: &[u8],
    shifted: &[u8],
) -> (f64, Option<f64>, f64) {
    let mut s = Session::open_with(addr, policy, id, LINK_RAM).await;
    let pages = (LINK_RAM / PAGE_SIZE) as u32;
    let all: Vec<u32> = (0..pages).collect();
    let mut epoch = 1;
    for batch in all.chunks(SYNC_EPOCH_PAGES) {
        s.ship(epoch, EpochKind::SyncRound, base, batch).await;
        epoch += 1;
    }
    s.ship(epoch, EpochKind::Checkpoint, base, &[]).await;
    while s.ack().await != epoch {}
    let mut rng = XorShift(0x5851_f42d_4c95_7f2d);
    let mut dirty: Vec<u32> = (0..LINK_PAGES)
        .map(|_| rng.below(pages.into()) as u32)
        .collect();
    dirty.sort_unstable();
    dirty.dedup();
    let mut link = LinkRate::default();
    // Acks are timed as they arrive, as the primary's session task does
    // (not when this loop, busy encoding, gets to them).
    let mut acks = s.acks.take().unwrap();
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(ack)) = acks.next().await {
            if ack_tx.send((ack.epoch, Instant::now())).is_err() {
                break;
            }
        }
    });
    // Warm-up (the estimator's first samples, the adaptive codec's first
    // decisions), then the measured run: the same for every policy.
    let (mut t, mut wire, mut in_flight) = (Instant::now(), 0, 0);
    for r in 0..LINK_WARMUP + epochs {
        if r == LINK_WARMUP {
            (t, wire) = (Instant::now(), 0);
        }
        while let Ok((acked, at)) = ack_rx.try_recv() {
            link.acked(acked, at);
            in_flight -= 1;
        }
        epoch += 1;
        s.sender.set_link_rate(link.rate());
        let mem = if r % 2 == 0 { shifted } else { base };
        wire += s.ship_whole(epoch, mem, &dirty, &mut link).await;
        in_flight += 1;
        let last_of_part = r == LINK_WARMUP - 1 || r == LINK_WARMUP + epochs - 1;
        while in_flight > 4 || (last_of_part && in_flight > 0) {
            let (acked, at) = ack_rx.recv().await.unwrap();
            link.acked(acked, at);
            in_flight -= 1;
        }
    }
    let bytes = (epochs as usize * dirty.len() * PAGE_SIZE) as f64;
    (
        bytes / t.elapsed().as_secs_f64() / 1e6,
        link.rate(),
        wire as f64 / bytes,
    )
}

/// "a–b %" over `values` (ratios), or "-" if there are none.
fn percent_range(values: impl Iterator<Item = f64>) -> String {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        return "-".into();
    }
    format!("{:.0}–{:.0} %", lo * 100.0, hi * 100.0)
}

/// `UNDERSTUDY_BENCH_CODECS=raw` (or `adaptive`) runs one codec.
fn only_codec(name: &str) -> bool {
    std::env::var("UNDERSTUDY_BENCH_CODECS")
        .map_or(true, |codecs| codecs.split(',').any(|c| c == name))
}

/// `UNDERSTUDY_BENCH_LINKS=loopback` (or a shaped link's name, as its row
/// gives it: `1 Gbit/s, 1 ms`) runs the codec-by-link table on that link.
fn only_link(name: &str) -> bool {
    std::env::var("UNDERSTUDY_BENCH_LINKS")
        .map_or(true, |links| links.split(';').any(|l| l.trim() == name))
}

fn main() {
    // As the daemons do (this process encodes as a primary would).
    understudy_common::alloc::keep_freed_memory();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Path::new(env!("CARGO_BIN_EXE_understudyd"));
    let config = format!("guest = \"counter\"\nmemory_mib = {}", RAM >> 20);
    let mut pair = LocalPair::new(Some(daemon), dir.path(), "bench", &config).unwrap();
    // Only the backup runs: this benchmark is the primary's sender. Only
    // for the pipeline part: an idle backup reads its fresh image ahead
    // until a primary says Hello, which would take from the other parts.
    if part("pipeline") {
        pair.start(Role::Backup).unwrap();
    }
    let repl = pair.addrs.replication;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = real_memory(RAM);
    // Each checkpoint rewrites its pages with content from elsewhere (new to the receiver).
    let mut shifted = base.clone();
    shifted.rotate_left(1_234_567);
    let mut report = Report::new(
        "pipeline",
        "Replication throughput and resync",
        "cargo bench -p understudy --bench pipeline",
    );
    let mut table = Table::new(
        format!(
            "Replication pipeline (encode → gRPC → stage, verify → commit on a real backup \
             daemon) vs single-stream loopback TCP moving the same bytes in the same run; \
             {} MiB of real memory (binaries from /usr); MB/s of guest pages; encode and \
             commit as a share of the wall time. TCP: one hot 1 MiB buffer written over and \
             over; TCP, same memory: each page from its place in the same memory into its \
             place in a region of the same size (writev/readv, nothing else). A full sync \
             against the fastest of three TCP runs of each (raw into an image read ahead: \
             the fastest of {SYNC_TURNS} syncs, each into a backup of its own, and the \
             range of their ratios); checkpoints in {CHECKPOINT_TURNS} \
             turns, each a run of checkpoints then a TCP run of the same bytes, both ways: \
             the fastest of each, and the range of the turns' own ratios to the hot buffer",
            RAM >> 20
        ),
        &[
            "",
            "MB/s",
            "TCP MB/s",
            "÷ TCP",
            "÷ TCP over the turns",
            "TCP, same memory MB/s",
            "÷ it",
            "wire ÷ dirtied",
            "encode %",
            "commit %",
        ],
    );
    let mut raw_ratios = Vec::new();
    let mut cpu_table = Table::new(
        "CPU time per GB of guest pages in the raw checkpoint rows above, the same turns \
         (medians): the sender (this process: encode, gRPC, its side of TCP), the backup \
         daemon (all its threads), both, and how many of this machine's two cores they \
         kept busy; TCP moving the same bytes (both ends in this process): the hot \
         buffer, and the same memory; ceiling = the most the pipeline could move with both \
         cores busy for it alone (2 cores ÷ its CPU a byte), against TCP's rate in the \
         same turns (from the hot buffer)",
        &[
            "",
            "sender CPU-s/GB",
            "backup CPU-s/GB",
            "pipeline CPU-s/GB",
            "cores busy",
            "TCP CPU-s/GB",
            "TCP, same memory CPU-s/GB",
            "pipeline CPU ÷ TCP's",
            "pipeline CPU ÷ TCP's, same memory",
            "ceiling MB/s",
            "ceiling ÷ TCP",
        ],
    );
    // Per raw checkpoint row: the pipeline's CPU ceiling ÷ TCP's rate, and
    // TCP moving the same memory's own ceiling ÷ TCP's rate.
    let mut ceilings = Vec::new();
    let backup_pid = pair.pid(Role::Backup);
    let backup_times = || backup_pid.map(ThreadTimes::of).unwrap_or_default();
    // Full sync of real memory, raw: time ÷ TCP's for the same bytes.
    let mut full_sync_raw = None;
    // Into a backup just started: its time ÷ TCP's, and writing the bytes
    // alone into a just-created image file ÷ TCP's.
    let mut full_sync_cold = None;
    runtime.block_on(async {
        if !part("pipeline") {
            return;
        }
        // Where the same-memory TCP baseline puts what it receives.
        let mut dest = touched(RAM);
        let all_pages: Vec<u32> = (0..PAGES).collect();
        // A primary's Hello ends the read-ahead: wait for it first.
        wait_warmed(&pair).await;
        for (name, policy) in [
            ("raw", CodecPolicy::RAW),
            ("adaptive", CodecPolicy::ADAPTIVE),
        ] {
            if !only_codec(name) {
                continue;
            }
            let mut s = Session::open(repl, policy, 1000 + name.len() as u64).await;
            // The adaptive codec weighs compression against the link: here
            // the link rate a daemon would measure is loopback TCP's.
            let link = (64 << 20) as f64 / tcp_seconds(64 << 20).await;
            s.sender.set_link_rate(Some(link));
            let (sender_0, backup_0) = (process_cpu_seconds(), backup_times());
            let (sync, wire, mut epoch) = full_sync(&mut s, &base).await;
            // The sync's CPU a GB, both sides: with both cores busy for it
            // alone, it could take no less than this over 2 cores.
            let gb = RAM as f64 / 1e9;
            let sync_cpu = (
                (process_cpu_seconds() - sender_0) / gb,
                backup_times().since(&backup_0, "").0 / gb,
            );
            // Per sync: seconds, CPU a GB (sender, backup), encode time and
            // the backup's commit time.
            let mut syncs = vec![(sync, sync_cpu, s.encode, s.commit_us)];
            // Raw: the same sync into a backup started just before (its fresh
            // image's memory is taken page by page as the sync writes it,
            // `understudy_checkpoint::store::warm_image`), then the same bytes
            // written into a just-created image file by one thread, no
            // pipeline: what the fresh memory alone costs. Both before the
            // other syncs into images read ahead, whose backups free their
            // memory when they end (memory freed just before a run is cheap
            // for it); the floor while the cold backup still holds its image.
            let mut cold_rows = None;
            if name == "raw" {
                let dir = tempfile::tempdir().unwrap();
                let mut cold = LocalPair::new(Some(daemon), dir.path(), "bench", &config).unwrap();
                cold.start(Role::Backup).unwrap();
                let mut c = Session::open(cold.addrs.replication, policy, 999).await;
                let (cold_sync, cold_wire, _) = full_sync(&mut c, &base).await;
                let floor_dir = tempfile::tempdir().unwrap();
                let floor = fresh_image_write_seconds(floor_dir.path(), &base);
                // Gone before its session ends, or it would promote.
                drop(cold);
                cold_rows = Some((cold_sync, cold_wire, (c.encode, c.commit_us), floor));
            }
            for turn in 1..if name == "raw" { SYNC_TURNS } else { 1 } {
                let dir = tempfile::tempdir().unwrap();
                let mut other = LocalPair::new(Some(daemon), dir.path(), "bench", &config).unwrap();
                let pid = other.start(Role::Backup).unwrap();
                wait_warmed(&other).await;
                let mut o =
                    Session::open(other.addrs.replication, policy, 2000 + turn as u64).await;
                let (sender_0, backup_0) = (process_cpu_seconds(), ThreadTimes::of(pid));
                let (secs, _, _) = full_sync(&mut o, &base).await;
                let cpu = (
                    (process_cpu_seconds() - sender_0) / gb,
                    ThreadTimes::of(pid).since(&backup_0, "").0 / gb,
                );
                syncs.push((secs, cpu, o.encode, o.commit_us));
                drop(other);
            }
            let tcp = tcp_seconds(RAM).await;
            let tcp_memory = tcp_memory_seconds(&[&base], &all_pages, &mut dest);
            let (sync, sync_cpu, encode, commit_us) = syncs
                .iter()
                .copied()
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .unwrap_or_else(|| unreachable!("one sync at least"));
            if name == "raw" {
                let floor = (sync_cpu.0 + sync_cpu.1) * gb / 2.0;
                full_sync_raw = Some((sync / tcp, sync / tcp_memory, sync_cpu, floor / tcp));
            }
            let slowest = syncs.iter().map(|t| t.0).fold(sync, f64::max);
            // The row's encode and commit shares: the fastest sync's (the
            // checkpoint turns reset them).
            (s.encode, s.commit_us) = (encode, commit_us);
            row(
                &mut table,
                &format!("full sync, backup waited, {name}"),
                RAM as f64,
                sync,
                (tcp, tcp_memory),
                wire as f64,
                &s,
                (syncs.len() > 1).then_some((tcp / slowest, tcp / sync)),
            );
            if let Some((cold_sync, cold_wire, (encode, commit_us), floor)) = cold_rows {
                (s.encode, s.commit_us) = (encode, commit_us);
                row(
                    &mut table,
                    "full sync, backup just started, raw",
                    RAM as f64,
                    cold_sync,
                    (tcp, tcp_memory),
                    cold_wire as f64,
                    &s,
                    None,
                );
                full_sync_cold = Some((cold_sync / tcp, floor / tcp, cold_sync / tcp_memory));
                table.row(vec![
                    "writing the same bytes into a just-created image file, one thread".into(),
                    num(RAM as f64 / floor / 1e6, 0),
                    num(RAM as f64 / tcp / 1e6, 0),
                    num(tcp / floor, 2),
                    "one run".into(),
                    num(RAM as f64 / tcp_memory / 1e6, 0),
                    num(tcp_memory / floor, 2),
                    "—".into(),
                    "—".into(),
                    "—".into(),
                ]);
            }
            epoch += 1;
            let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
            for n in [1_000usize, 10_000, 50_000] {
                let mut pages: Vec<u32> = (0..n).map(|_| rng.below(PAGES.into()) as u32).collect();
                pages.sort_unstable();
                pages.dedup();
                let rounds = (200_000 / n).clamp(4, 50);
                let bytes = (rounds * pages.len() * PAGE_SIZE) as f64;
                // Turns of a run of checkpoints next to a TCP run of the same
                // bytes (this machine's pace moves between seconds by more
                // than a third).
                let mut turns = Vec::new();
                // The memory each checkpoint of a run reads its pages from.
                let memory: Vec<&[u8]> = (0..rounds)
                    .map(|r| if r % 2 == 0 { &shifted[..] } else { &base[..] })
                    .collect();
                // Per turn: CPU seconds of the sender, the backup, TCP from
                // the hot buffer and from the same memory, and the run's wall
                // time.
                let mut cpu = Vec::new();
                for _ in 0..CHECKPOINT_TURNS {
                    s.encode = Duration::ZERO;
                    s.commit_us = 0;
                    let (sender_0, backup_0) = (process_cpu_seconds(), backup_times());
                    let t = Instant::now();
                    let mut wire = 0;
                    let mut in_flight = 0;
                    for r in 0..rounds {
                        let mem = if r % 2 == 0 { &shifted } else { &base };
                        wire += s.ship(epoch, EpochKind::Checkpoint, mem, &pages).await;
                        epoch += 1;
                        in_flight += 1;
                        if in_flight > 4 {
                            s.ack().await;
                            in_flight -= 1;
                        }
                    }
                    while in_flight > 0 {
                        s.ack().await;
                        in_flight -= 1;
                    }
                    let secs = t.elapsed().as_secs_f64();
                    let sender = process_cpu_seconds() - sender_0;
                    let backup = backup_times().since(&backup_0, "").0;
                    let c = process_cpu_seconds();
                    let tcp = tcp_once(bytes as usize).await;
                    let tcp_cpu = process_cpu_seconds() - c;
                    let c = process_cpu_seconds();
                    let tcp_memory = tcp_memory_once(&memory, &pages, &mut dest);
                    let tcp_memory_cpu = process_cpu_seconds() - c;
                    cpu.push([sender, backup, tcp_cpu, tcp_memory_cpu, secs, tcp]);
                    turns.push((
                        tcp / secs,
                        secs,
                        tcp,
                        wire,
                        s.encode,
                        s.commit_us,
                        tcp_memory,
                    ));
                }
                // Each at its best, as the full sync's TCP baseline: the
                // machine's pace, not the pipeline, moves between turns.
                let tcp = turns.iter().map(|t| t.2).fold(f64::INFINITY, f64::min);
                let tcp_memory = turns.iter().map(|t| t.6).fold(f64::INFINITY, f64::min);
                let best = turns
                    .iter()
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .copied()
                    .unwrap_or_else(|| unreachable!("CHECKPOINT_TURNS > 0"));
                let (_, secs, _, wire, encode, commit_us, _) = best;
                (s.encode, s.commit_us) = (encode, commit_us);
                let ratio = tcp / secs;
                turns.sort_by(|a, b| a.0.total_cmp(&b.0));
                row(
                    &mut table,
                    &format!("checkpoints of {n} pages, {name}"),
                    bytes,
                    secs,
                    (tcp, tcp_memory),
                    wire as f64,
                    &s,
                    Some((turns[0].0, turns[turns.len() - 1].0)),
                );
                if name == "raw" {
                    raw_ratios.push((ratio, tcp_memory / secs));
                    let gb = bytes / 1e9;
                    let median_of = |f: &dyn Fn(&[f64; 6]) -> f64| {
                        spread(&mut cpu.iter().map(f).collect::<Vec<_>>()).0
                    };
                    let pipeline = median_of(&|c| (c[0] + c[1]) / gb);
                    let tcp = median_of(&|c| c[2] / gb);
                    let tcp_memory = median_of(&|c| c[3] / gb);
                    let tcp_rate = median_of(&|c| gb / c[5]);
                    ceilings.push((2.0 / pipeline / tcp_rate, 2.0 / tcp_memory / tcp_rate));
                    cpu_table.row(vec![
                        format!("checkpoints of {n} pages").into(),
                        num(median_of(&|c| c[0] / gb), 2),
                        num(median_of(&|c| c[1] / gb), 2),
                        num(pipeline, 2),
                        num(median_of(&|c| (c[0] + c[1]) / c[4]), 2),
                        num(tcp, 2),
                        num(tcp_memory, 2),
                        num(pipeline / tcp, 1),
                        num(pipeline / tcp_memory, 1),
                        num(2.0 / pipeline * 1e3, 0),
                        num(2.0 / pipeline / tcp_rate, 2),
                    ]);
                }
            }
        }
    });
    drop(pair);
    // A run of other parts (or of the adaptive codec alone) has no rows
    // for this table's target.
    if !raw_ratios.is_empty() {
        report.table(table);
        report.table(cpu_table);
        let best = raw_ratios.iter().map(|r| r.0).fold(f64::NAN, f64::max);
        let best_memory = raw_ratios.iter().map(|r| r.1).fold(f64::NAN, f64::max);
        report.target(
            "replication pipeline throughput",
            "≥ 50 % of same-run loopback TCP",
            format!(
                "{:.0} % (best raw checkpoint row; {:.0} % of TCP moving the same pages \
                 between regions of guest-RAM size). What limits it: CPU. Both cores busy, \
                 it could reach at most {} of TCP (its CPU a byte ÷ 2 cores); TCP alone moving \
                 the same memory at most {}",
                best * 100.0,
                best_memory * 100.0,
                percent_range(ceilings.iter().map(|c| c.0)),
                percent_range(ceilings.iter().map(|c| c.1)),
            ),
            best >= 0.5,
        );
    } else if part("pipeline") {
        report.table(table);
    }

    // Resync: real daemons protect a VM from cold; the same bytes over TCP,
    // and QEMU migrating an idle VM of the same RAM.
    let qemu = understudy_bench::qemu::find();
    let mut table = Table::new(
        "Resync: time to protect a VM from cold (fresh backup image, counter guest; the \
         primary's initial sync, first page sent → first checkpoint acked) ÷ time to \
         stream the same bytes over single-stream loopback TCP in the same run (fastest of \
         three; the protection: median of three, each with a backup that had finished \
         starting); and the whole protection (connection, Hello and stream opened, then \
         the sync) against QEMU (7.2, `-accel kvm -nodefaults`, defaults) migrating an \
         idle VM of the same RAM over loopback in the same run (its `total-time`, median \
         of three)",
        &[
            "guest RAM",
            "codec",
            "sync ms",
            "TCP ms",
            "sync ÷ TCP",
            "MB/s",
            "setup ms",
            "setup + sync ms",
            "QEMU ms",
            "÷ QEMU",
        ],
    );
    let mut resync_raw = Vec::new();
    let mut against_qemu: Vec<(usize, &str, f64, f64)> = Vec::new();
    for mib in [256usize, 1024] {
        if !part("resync") {
            continue;
        }
        let codecs: Vec<&str> = ["raw", "adaptive"]
            .into_iter()
            .filter(|c| only_codec(c))
            .collect();
        // QEMU and each codec take turns, QEMU first in one turn and last in
        // the next, so neither always runs right after the other (with QEMU's
        // three migrations all first, the three protections of the row after
        // them took ~20 ms once, the others 3–5).
        let mut qemu_runs = Vec::new();
        let mut ours: Vec<Vec<Protected>> = codecs.iter().map(|_| Vec::new()).collect();
        for turn in 0..COLD_TURNS {
            let qemu_first = turn % 2 == 0;
            let qemu_turn = |runs: &mut Vec<f64>| {
                if let Some(qemu) = &qemu {
                    let port = understudy::pair::unused_loopback_addr().unwrap().port();
                    let dir = dir.path().join(format!("qemu-{mib}-{turn}"));
                    let m = understudy_bench::qemu::migrate(qemu, mib, &dir, false, None, port)
                        .unwrap();
                    runs.push(m.total_ms);
                }
            };
            if qemu_first {
                qemu_turn(&mut qemu_runs);
            }
            for (runs, codec) in ours.iter_mut().zip(&codecs) {
                runs.push(runtime.block_on(protect_from_cold(mib, codec)));
            }
            if !qemu_first {
                qemu_turn(&mut qemu_runs);
            }
        }
        let qemu_ms = (!qemu_runs.is_empty()).then(|| quantile(&qemu_runs, 0.5));
        for (runs, codec) in ours.iter().zip(codecs) {
            let median =
                |f: fn(&Protected) -> f64| quantile(&runs.iter().map(f).collect::<Vec<_>>(), 0.5);
            let cold = Protected {
                setup: median(|p| p.setup),
                sync: median(|p| p.sync),
            };
            let tcp = runtime.block_on(tcp_seconds(mib << 20));
            if codec == "raw" {
                resync_raw.push((mib, cold.sync / tcp));
            }
            let whole_ms = median(|p| p.setup + p.sync) * 1e3;
            if let Some(q) = qemu_ms {
                against_qemu.push((mib, codec, whole_ms, q));
            }
            table.row(vec![
                format!("{mib} MiB").into(),
                codec.into(),
                num(cold.sync * 1e3, 1),
                num(tcp * 1e3, 1),
                num(cold.sync / tcp, 2),
                num((mib << 20) as f64 / cold.sync / 1e6, 0),
                num(cold.setup * 1e3, 1),
                num(whole_ms, 1),
                qemu_ms.map_or("–".into(), |q| num(q, 0)),
                qemu_ms.map_or("–".into(), |q| num(whole_ms / q, 2)),
            ]);
        }
    }
    report.table(table);
    if part("resync") && qemu.is_none() {
        println!("qemu-system-x86_64 not found: no QEMU comparison (apt install qemu-system-x86)");
    }
    if !against_qemu.is_empty() {
        let worst = against_qemu
            .iter()
            .map(|&(_, _, ours, q)| ours / q)
            .fold(0.0, f64::max);
        let rows: Vec<String> = against_qemu
            .iter()
            .map(|(mib, codec, ours, q)| format!("{mib} MiB {codec}: {ours:.1} ms against {q:.0}"))
            .collect();
        report.target(
            "protecting an idle VM from cold ≤ QEMU migrating an idle VM of the same RAM \
             (loopback, same run)",
            "≤ 1.0× QEMU's total time",
            format!(
                "worst {worst:.2}× QEMU ({}; ours: connection, Hello, stream and the sync to \
                 the first checkpoint acked; QEMU's: `total-time`, to its last byte sent)",
                rows.join("; ")
            ),
            worst <= 1.0,
        );
    }
    if let (Some((full, full_memory, full_cpu, full_floor)), Some((cold, floor, cold_memory))) =
        (full_sync_raw, full_sync_cold)
        && !resync_raw.is_empty()
    {
        // Every row counts, the cold image's too.
        let worst = resync_raw
            .iter()
            .map(|&(_, r)| r)
            .fold(full.max(cold), f64::max);
        let daemons: Vec<String> = resync_raw
            .iter()
            .map(|(mib, r)| format!("{mib} MiB {r:.2}×"))
            .collect();
        report.target(
            "resync of incompressible memory (raw codec)",
            "≤ 2× the time same-run loopback TCP takes for the same bytes",
            format!(
                "256 MiB of real memory, every page written: {full:.1}× into an image the \
                 backup read ahead while it waited (fastest of {SYNC_TURNS}), {cold:.1}× into \
                 one just created (where \
                 writing the bytes alone into a just-created image file takes {floor:.1}×) \
                 (against TCP moving the same pages between regions of guest-RAM size: \
                 {full_memory:.1}× and {cold_memory:.1}×); daemons from cold: {}. What \
                 limits it: into the image read ahead, CPU: the sync took {:.2} \
                 CPU-s a GB (sender {:.2}, backup {:.2}), so with both cores busy for it alone it \
                 takes at least {full_floor:.1}× TCP's time; into the one just created, the \
                 host's first touch of the image's memory: the sync took {:.2}× the time the \
                 bytes alone took to be written into it",
                daemons.join(", "),
                full_cpu.0 + full_cpu.1,
                full_cpu.0,
                full_cpu.1,
                cold / floor,
            ),
            worst <= 2.0,
        );
    }
    if part("links") {
        codec_by_link(&runtime, &mut report);
    }
    report.finish().unwrap();
}
