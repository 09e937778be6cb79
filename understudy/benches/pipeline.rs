//! Replication pipeline throughput against the link it runs on, in one run:
//! a real backup daemon on loopback receives epochs from a sender that
//! encodes real memory (binaries from /usr), stages, verifies and commits
//! them; next to it, single-stream loopback TCP moves the same bytes.
//!
//! Reports: full sync of 256 MiB (resync) ÷ streaming 256 MiB over TCP, and
//! checkpoints of 1k/10k/50k dirty pages in MB/s of guest pages, raw and
//! adaptive, with bytes on the wire ÷ bytes dirtied.
//!
//! Run: `cargo bench -p understudy --bench pipeline`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use understudy::daemon::Role;
use understudy::pair::LocalPair;
use understudy_bench::{Report, Table, XorShift, num, real_memory};
use understudy_checkpoint::{CodecPolicy, EpochKind, PAGE_SIZE, SenderState};
use understudy_common::heartbeat::{Beater, SessionKey};
use understudy_proto::replication_client::ReplicationClient;
use understudy_proto::{EpochChunk, HelloRequest, PROTOCOL_VERSION};

const RAM: usize = 256 << 20;
const PAGES: u32 = (RAM / PAGE_SIZE) as u32;

/// Single-stream loopback TCP: seconds to move `bytes` (rounded up to MiB)
/// in 1 MiB writes, until the receiver has read them all.
async fn tcp_seconds(bytes: usize) -> f64 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        while s.read(&mut buf).await.unwrap() > 0 {}
    });
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let chunk = vec![7u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..bytes.div_ceil(chunk.len()) {
        s.write_all(&chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    reader.await.unwrap();
    t.elapsed().as_secs_f64()
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
    acks: tonic::Streaming<understudy_proto::Ack>,
    sender: SenderState,
    id: u64,
    _beater: Beater,
    /// Time spent encoding, and the backup's stage+commit time from acks.
    encode: Duration,
    commit_us: u64,
}

impl Session {
    async fn open(addr: SocketAddr, policy: CodecPolicy, id: u64) -> Self {
        let mut client = loop {
            if let Ok(c) = ReplicationClient::connect(format!("http://{addr}")).await {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let key = SessionKey::random().unwrap();
        let hello = HelloRequest {
            protocol_version: PROTOCOL_VERSION,
            vm_id: "bench".into(),
            generation: 1,
            ram_bytes: RAM as u64,
            session: id,
            incarnation: 0xbe4c,
            previous: None,
            heartbeat_key: key.as_bytes().to_vec().into(),
            mode: 0,
            migration: false,
            witness_key: String::new(),
        };
        client.hello(hello).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acks = client
            .replicate(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        // Heartbeats, as a real primary sends them (or the backup promotes).
        let beater = Beater::start(addr, id, key, Duration::from_millis(10)).unwrap();
        let sender = SenderState::new("bench", PAGES, 1, policy).unwrap();
        Self {
            tx,
            acks,
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

    async fn ack(&mut self) -> u64 {
        let ack = self.acks.next().await.unwrap().unwrap();
        self.commit_us += ack.commit_micros;
        ack.epoch
    }
}

fn row(table: &mut Table, name: &str, bytes: f64, secs: f64, tcp: f64, wire: f64, s: &Session) {
    table.row(vec![
        name.into(),
        num(bytes / secs / 1e6, 0),
        num(bytes / tcp / 1e6, 0),
        num(tcp / secs, 2),
        num(wire / bytes, 3),
        num(s.encode.as_secs_f64() / secs * 100.0, 0),
        num(s.commit_us as f64 / 1e6 / secs * 100.0, 0),
    ]);
}

/// Protects a VM of `mib` MiB from cold with real daemons (a fresh backup
/// image, the counter guest) and returns the initial sync time the primary
/// logs (first page sent → first checkpoint acked).
async fn protect_from_cold(mib: usize, codec: &str) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let mut pair = LocalPair::new(
        Some(Path::new(env!("CARGO_BIN_EXE_understudyd"))),
        dir.path(),
        "cold",
        &format!("guest = \"counter\"\nmemory_mib = {mib}\n[codec]\npolicy = \"{codec}\""),
    )
    .unwrap();
    pair.start_protected(Duration::from_secs(120))
        .await
        .unwrap();
    // The primary logs `VM protected … sync_ms=N` as it reports protection.
    let log = pair.log_path(Role::Primary);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let sync_ms = text
            .lines()
            .filter(|l| l.contains("VM protected"))
            .flat_map(|l| l.split_whitespace())
            .find_map(|w| w.strip_prefix("sync_ms=")?.parse::<u64>().ok());
        if let Some(ms) = sync_ms {
            if std::env::var_os("UNDERSTUDY_BENCH_SHOW_LOG").is_some() {
                eprintln!("{text}");
            }
            return Duration::from_millis(ms);
        }
        assert!(
            Instant::now() < deadline,
            "protected, but no sync_ms in {}:\n{text}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `UNDERSTUDY_BENCH_PARTS=pipeline` (or `resync`) runs one part, e.g. under perf.
fn part(name: &str) -> bool {
    std::env::var("UNDERSTUDY_BENCH_PARTS")
        .map_or(true, |parts| parts.split(',').any(|p| p == name))
}

/// `UNDERSTUDY_BENCH_CODECS=raw` (or `adaptive`) runs one codec.
fn only_codec(name: &str) -> bool {
    std::env::var("UNDERSTUDY_BENCH_CODECS")
        .map_or(true, |codecs| codecs.split(',').any(|c| c == name))
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mut pair = LocalPair::new(
        Some(Path::new(env!("CARGO_BIN_EXE_understudyd"))),
        dir.path(),
        "bench",
        &format!("guest = \"counter\"\nmemory_mib = {}", RAM >> 20),
    )
    .unwrap();
    // Only the backup runs: this benchmark is the primary's sender.
    pair.start(Role::Backup).unwrap();
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
             commit as a share of the wall time",
            RAM >> 20
        ),
        &[
            "",
            "MB/s",
            "TCP MB/s",
            "÷ TCP",
            "wire ÷ dirtied",
            "encode %",
            "commit %",
        ],
    );
    let mut raw_ratios = Vec::new();
    runtime.block_on(async {
        if !part("pipeline") {
            return;
        }
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
            let all: Vec<u32> = (0..PAGES).collect();
            s.encode = Duration::ZERO;
            s.commit_us = 0;
            let t = Instant::now();
            // In epochs of 8192 pages, as the primary sends a sync round.
            let mut wire = 0;
            let mut epoch = 1;
            for batch in all.chunks(8192) {
                wire += s.ship(epoch, EpochKind::SyncRound, &base, batch).await;
                epoch += 1;
            }
            s.ship(epoch, EpochKind::Checkpoint, &base, &[]).await;
            while s.ack().await != epoch {}
            let sync = t.elapsed().as_secs_f64();
            let tcp = tcp_seconds(RAM).await;
            row(
                &mut table,
                &format!("full sync (resync), {name}"),
                RAM as f64,
                sync,
                tcp,
                wire as f64,
                &s,
            );
            epoch += 1;
            let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
            for n in [1_000usize, 10_000, 50_000] {
                let mut pages: Vec<u32> = (0..n).map(|_| rng.below(PAGES.into()) as u32).collect();
                pages.sort_unstable();
                pages.dedup();
                let rounds = (200_000 / n).clamp(4, 50);
                s.encode = Duration::ZERO;
                s.commit_us = 0;
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
                let bytes = (rounds * pages.len() * PAGE_SIZE) as f64;
                let tcp = tcp_seconds(bytes as usize).await;
                row(
                    &mut table,
                    &format!("checkpoints of {n} pages, {name}"),
                    bytes,
                    secs,
                    tcp,
                    wire as f64,
                    &s,
                );
                if name == "raw" {
                    raw_ratios.push(tcp / secs);
                }
            }
        }
    });
    drop(pair);
    report.table(table);
    let best = raw_ratios.iter().copied().fold(f64::NAN, f64::max);
    report.target(
        "replication pipeline throughput",
        "≥ 50 % of same-run loopback TCP",
        format!("{:.0} % (best raw checkpoint row)", best * 100.0),
        best >= 0.5,
    );

    // Resync: real daemons protect a VM from cold; the same bytes over TCP.
    let mut table = Table::new(
        "Resync: time to protect a VM from cold (fresh backup image, counter guest; the \
         primary's initial sync, first page sent → first checkpoint acked) ÷ time to \
         stream the same bytes over single-stream loopback TCP in the same run",
        &[
            "guest RAM",
            "codec",
            "sync s",
            "TCP s",
            "sync ÷ TCP",
            "MB/s",
        ],
    );
    for mib in [256usize, 1024] {
        for codec in ["raw", "adaptive"] {
            if !part("resync") || !only_codec(codec) {
                continue;
            }
            let sync = runtime
                .block_on(protect_from_cold(mib, codec))
                .as_secs_f64();
            let tcp = runtime.block_on(tcp_seconds(mib << 20));
            table.row(vec![
                format!("{mib} MiB").into(),
                codec.into(),
                num(sync, 2),
                num(tcp, 3),
                num(sync / tcp, 1),
                num((mib << 20) as f64 / sync / 1e6, 0),
            ]);
        }
    }
    report.table(table);
    report.finish().unwrap();
}
