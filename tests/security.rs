//! What clients and strangers can and cannot do to a protected pair (issue
//! 12): console traffic never makes a checkpoint impossible or exhausts the
//! daemons' descriptors, and a hostile peer speaking the replication
//! protocol cannot take the VM down. (Identities under mutual TLS are in
//! `tls.rs`; insecure mode beyond loopback in the config tests.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Lines, Pair};
use tokio::io::AsyncWriteExt;

/// Waits until the primary has taken `more` checkpoints beyond now, and is
/// protected; fails with the logs otherwise.
/// The pair still fails over: a client of the counter follows the VM from
/// the killed primary to the promoted backup, and the count goes on.
async fn fails_over_with_the_counter_going_on(pair: &mut Pair) {
    let mut client = Lines::connect_now(pair.addrs.primary_console)
        .await
        .unwrap();
    client.next(Duration::from_secs(10)).await.unwrap();
    pair.kill_primary();
    pair.wait_promoted().await;
    client.reconnect(pair.addrs.backup_console).await.unwrap();
    let line = client.next(Duration::from_secs(10)).await.unwrap().unwrap();
    assert!(line.starts_with("count "), "{line}");
}

async fn checkpoints_continue(pair: &Pair, more: u64) {
    let start = common::status(pair.addrs.primary_control)
        .await
        .unwrap()
        .epochs;
    common::wait_status(
        pair,
        pair.addrs.primary_control,
        "checkpoints continue, protected",
        Duration::from_secs(20),
        |s| s.protected && s.epochs >= start + more,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_flood_into_a_guest_that_never_reads_cannot_switch_protection_off() {
    let _serial = common::serial().await;
    let mut pair = Pair::protected("counter", "guest_params = { interval_ms = 10 }").await;
    // 40 MiB of input for a guest that never reads its console.
    let mut flood = tokio::net::TcpStream::connect(pair.addrs.primary_console)
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..40 {
            if flood.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!writer.is_finished(), "the server took 40 MiB nobody reads");
    checkpoints_continue(&pair, 20).await;
    // And the pair still fails over, with the counter going on.
    fails_over_with_the_counter_going_on(&mut pair).await;
    writer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_output_is_bounded_by_pausing_the_guest_until_a_backup_acks_it() {
    let _serial = common::serial().await;
    let mut pair = Pair::protected(
        "kv",
        "backup_loss = \"hold-output\"\nmax_held_output_kib = 64",
    )
    .await;
    let mut client = common::kv_client(pair.addrs.primary_console).await;
    let value = "v".repeat(200);
    client.send(&format!("SET big {value}")).await.unwrap();
    client.expect_line("OK").await;
    // The backup goes away: everything from here is held.
    let mut backup = pair.backup.take().unwrap();
    backup.kill().unwrap();
    backup.wait().unwrap();
    common::wait_status(
        &pair,
        pair.addrs.primary_control,
        "holding output",
        Duration::from_secs(20),
        |s| s.state_kind == "unprotected-holding",
    )
    .await;
    // 2,000 GETs of a 200-byte value: ~400 KiB of answers, far past 64 KiB.
    let gets = "GET big\n".repeat(2000);
    client.send_raw(gets.as_bytes()).await.unwrap();
    let paused = common::wait_status(
        &pair,
        pair.addrs.primary_control,
        "the guest paused for held output",
        Duration::from_secs(20),
        |s| s.state_kind == "output-bound",
    )
    .await;
    eprintln!("{}", paused.state);
    // The backup returns: output goes out, the guest runs again, and every
    // answer arrives once, in order.
    pair.backup = Some(pair.spawn(
        "backup",
        &[&format!(
            "state_dir={:?}",
            pair.dir.path().join("backup2").display().to_string()
        )],
    ));
    let started = Instant::now();
    for i in 0..2000 {
        let line = client.next(Duration::from_secs(30)).await.unwrap();
        assert_eq!(
            line.as_deref(),
            Some(format!("VALUE {value}").as_str()),
            "answer {i}\n{}",
            pair.logs()
        );
    }
    eprintln!("2,000 held answers released in {:?}", started.elapsed());
    pair.wait_protected().await;
}

/// Opens `n` raw console connections to `addr`; returns them with what
/// each was told within a short while (a refusal line, or nothing).
async fn open_clients(
    addr: std::net::SocketAddr,
    n: usize,
) -> Vec<(tokio::net::TcpStream, String)> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    for _ in 0..n {
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            continue;
        };
        let mut buf = vec![0u8; 256];
        let told = match tokio::time::timeout(Duration::from_millis(150), s.read(&mut buf)).await {
            Ok(Ok(k)) => String::from_utf8_lossy(&buf[..k]).into_owned(),
            _ => String::new(),
        };
        out.push((s, told));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_clients_are_limited_and_a_descriptor_reserve_keeps_the_backup_whole() {
    let _serial = common::serial().await;
    let mut pair = Pair::new(
        "counter",
        "console_max_clients = 8\nguest_params = { interval_ms = 10 }",
    );
    pair.start_primary();
    pair.wait_protected().await;
    // At most 8 clients at once; the others are told why and closed.
    let clients = open_clients(pair.addrs.primary_console, 20).await;
    let refused = clients
        .iter()
        .filter(|(_, told)| told.contains("8 clients already connected"))
        .count();
    assert_eq!(
        refused,
        12,
        "{:?}",
        clients.iter().map(|c| &c.1).collect::<Vec<_>>()
    );
    drop(clients);
    // A backup with 256 descriptors and a console that would take 1,000
    // clients: the reserve refuses them long before the image store runs out.
    let mut backup = pair.backup.take().unwrap();
    backup.kill().unwrap();
    backup.wait().unwrap();
    pair.backup = Some(pair.spawn_with_fd_limit(
        "backup",
        &[&pair.backup_state(), "console_max_clients=1000"],
        256,
    ));
    pair.wait_protected().await;
    let clients = open_clients(pair.addrs.backup_console, 300).await;
    let refused = clients
        .iter()
        .filter(|(_, told)| told.contains("file descriptors in use"))
        .count();
    assert!(refused > 100, "{refused} refused by the descriptor reserve");
    // The backup still commits, and promotes (opening its image) when asked to.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = common::status(pair.addrs.primary_control).await.unwrap();
    assert!(s.protected, "{s:?}\n{}", pair.logs());
    pair.kill_primary();
    pair.wait_promoted().await;
    drop(clients);
    let mut c = loop {
        // The backup's console notices the dropped clients shortly.
        match Lines::connect_now(pair.addrs.backup_console).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    // Following output "from now on" can start inside a line (CI once saw
    // "1821", the tail of "count 1821"): the next whole line is a count.
    let mut line = c.next(Duration::from_secs(10)).await.unwrap().unwrap();
    if !line.starts_with("count ") {
        line = c.next(Duration::from_secs(10)).await.unwrap().unwrap();
    }
    assert!(line.starts_with("count "), "{line}");
}

/// A small deterministic generator for the hostile peer.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Sometimes the right value, sometimes a plausible one, sometimes junk.
    fn pick(&mut self, right: u64) -> u64 {
        match self.next() % 4 {
            0 => right,
            1 => right.wrapping_add(1),
            2 => self.next() % 1000,
            _ => self.next(),
        }
    }
}

/// One round of hostile requests against the backup's replication port.
/// Sends `body` as the whole request body of a Replicate call (gRPC
/// framing or not) on `channel`; returns the stream's status from its
/// trailers (or the headers of a trailers-only answer), if one came within
/// `deadline`.
async fn raw_replicate(
    channel: &mut tonic::transport::Channel,
    body: bytes::Bytes,
    deadline: Duration,
) -> Option<tonic::Status> {
    use http_body_util::BodyExt;
    use tonic::codegen::Service;
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(understudy_proto::framing::REPLICATE_PATH)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(body)))
        .unwrap();
    tokio::time::timeout(deadline, async {
        std::future::poll_fn(|cx| channel.poll_ready(cx))
            .await
            .ok()?;
        let response = channel.call(request).await.ok()?;
        if let Some(status) = tonic::Status::from_header_map(response.headers()) {
            return Some(status);
        }
        let collected = response.into_body().collect().await.ok()?;
        tonic::Status::from_header_map(collected.trailers()?)
    })
    .await
    .ok()
    .flatten()
}

/// A channel to `addr` without TLS.
async fn plaintext_channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// One gRPC message as it goes on the wire: `flag`, the length it claims
/// (not checked against `body`), `body`.
fn grpc_message(flag: u8, len: u32, body: &[u8]) -> Vec<u8> {
    let mut m = vec![flag];
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Malformed gRPC framing on the replication stream, as a peer that does
/// not use a gRPC library could send it.
fn hostile_framing(rng: &mut Rng) -> bytes::Bytes {
    let mut out = Vec::new();
    let message = grpc_message;
    match rng.next() % 5 {
        // Compressed (this stream takes no gRPC compression).
        0 => out.extend(message(1, 8, &rng.bytes(8))),
        // Longer than the limit.
        1 => out.extend(message(
            0,
            u32::MAX - (rng.next() % 1000) as u32,
            &rng.bytes(64),
        )),
        // Cut short: the stream ends inside the message.
        2 => {
            let len = (rng.next() % 5000) as u32 + 10;
            out.extend(message(0, len, &rng.bytes(len as usize / 2)));
        }
        // Well framed, but not an EpochChunk.
        3 => {
            let n = (rng.next() % 300) as usize;
            out.extend(message(0, n as u32, &rng.bytes(n)));
        }
        // Noise.
        _ => {
            let n = (rng.next() % 300) as usize;
            out.extend(rng.bytes(n));
        }
    }
    out.into()
}

async fn hostile_round(
    rng: &mut Rng,
    client: &mut understudy_proto::replication_client::ReplicationClient<tonic::transport::Channel>,
    channel: &mut tonic::transport::Channel,
    udp: &std::net::UdpSocket,
    target: std::net::SocketAddr,
) {
    use understudy_checkpoint::{CodecPolicy, EpochKind, SenderState};
    use understudy_proto::*;
    let deadline = Duration::from_millis(500);
    match rng.next() % 9 {
        0 => {
            let hello = HelloRequest {
                protocol_version: if rng.next() % 2 == 0 {
                    PROTOCOL_VERSION
                } else {
                    rng.next() as u32
                },
                vm_id: if rng.next() % 2 == 0 {
                    "test-vm".into()
                } else {
                    "x".repeat((rng.next() % 80) as usize)
                },
                generation: rng.pick(1),
                ram_bytes: rng.pick(16 << 20),
                session: rng.next(),
                incarnation: rng.next(),
                previous: (rng.next() % 2 == 0).then(|| PreviousRun {
                    incarnation: rng.next(),
                    state: (rng.next() % 6) as i32,
                }),
                heartbeat_key: {
                    let n = (rng.next() % 40) as usize;
                    rng.bytes(n).into()
                },
                mode: (rng.next() % 3) as i32,
                // A stranger claiming to migrate a VM here is refused too.
                migration: rng.next() % 4 == 0,
                witness_key: if rng.next() % 4 == 0 {
                    "/understudy/test-vm".into()
                } else {
                    String::new()
                },
            };
            let _ = tokio::time::timeout(deadline, client.hello(hello)).await;
        }
        1 => {
            // Chunks: well-framed epochs for sessions that are not ours,
            // mutated, truncated, or plain noise.
            let mut chunks = Vec::new();
            if let Ok(mut sender) =
                SenderState::new("test-vm", 4096, rng.pick(1), CodecPolicy::ADAPTIVE)
            {
                let kind = if rng.next() % 2 == 0 {
                    EpochKind::Checkpoint
                } else {
                    EpochKind::SyncRound
                };
                if let Ok(mut enc) = sender.begin(rng.next() % 100, kind) {
                    for p in 0..(rng.next() % 8) as u32 {
                        let mut page = [0u8; 4096];
                        page[..8].copy_from_slice(&rng.next().to_le_bytes());
                        let _ = enc.add_page(p * 7, &page);
                    }
                    if let Ok(e) = enc.finish(&rng.bytes(64)) {
                        chunks = e.chunks;
                    }
                }
            }
            for c in &mut chunks {
                match rng.next() % 3 {
                    0 => {}
                    1 => {
                        let at = (rng.next() as usize) % c.len().max(1);
                        if let Some(b) = c.get_mut(at) {
                            *b ^= 1 << (rng.next() % 8);
                        }
                    }
                    _ => c.truncate((rng.next() as usize) % (c.len() + 1)),
                }
            }
            let n = (rng.next() % 300) as usize;
            chunks.push(rng.bytes(n));
            let session = rng.next();
            let generation = rng.pick(1);
            let msgs: Vec<EpochChunk> = chunks
                .into_iter()
                .map(|c| {
                    // Sometimes as a trace segment (replay mode's messages).
                    let (chunk, trace_segment) = if rng.next() % 4 == 0 {
                        (Vec::new(), c)
                    } else {
                        (c, Vec::new())
                    };
                    EpochChunk {
                        session,
                        generation,
                        chunk: chunk.into(),
                        trace_segment: trace_segment.into(),
                        // Post-copy pages no session asked for.
                        postcopy_pages: if rng.next() % 8 == 0 {
                            let n = (rng.next() % 5000) as usize;
                            rng.bytes(n).into()
                        } else {
                            Default::default()
                        },
                        postcopy_done: rng.next() % 16 == 0,
                    }
                })
                .collect();
            if let Ok(Ok(r)) =
                tokio::time::timeout(deadline, client.replicate(tokio_stream::iter(msgs))).await
            {
                let mut acks = r.into_inner();
                let _ = tokio::time::timeout(deadline, acks.message()).await;
            }
        }
        2 => {
            let g = GoodbyeRequest {
                generation: rng.pick(1),
                session: rng.next(),
                after_epoch: rng.pick(3),
                commit_wait_millis: (rng.next() % 50) as u32,
            };
            let _ = tokio::time::timeout(deadline, client.goodbye(g)).await;
        }
        3 => {
            let p = ProbeRequest {
                generation: rng.next(),
            };
            let _ = tokio::time::timeout(deadline, client.probe(p)).await;
        }
        4 => {
            let h = HandoverRequest {
                generation: rng.pick(1),
                session: rng.next(),
                epoch: rng.next() % 1000,
                // A post-copy handover out of nowhere, with any bitmap.
                postcopy: rng.next() % 2 == 0,
                valid_pages: {
                    let n = (rng.next() % 600) as usize;
                    rng.bytes(n).into()
                },
                postcopy_state: {
                    let n = (rng.next() % 2000) as usize;
                    rng.bytes(n).into()
                },
                zero_pages: {
                    let n = (rng.next() % 600) as usize;
                    rng.bytes(n).into()
                },
                // Or a replay migration's, asking for a replica.
                replay: rng.next() % 2 == 0,
                // Or one that waits for its epoch (bounded there).
                commit_wait_millis: (rng.next() % 3) as u32 * 40,
                // Or for a log's tail.
                log_exits: rng.pick(1),
            };
            let _ = tokio::time::timeout(deadline, client.handover(h)).await;
        }
        5 => {
            let body = hostile_framing(rng);
            let _ = raw_replicate(channel, body, deadline).await;
        }
        6 => {
            // Heartbeats signed with keys the backup never gave out.
            let key = understudy_common::heartbeat::SessionKey::random().unwrap();
            let beat = understudy_common::heartbeat::Datagram {
                kind: understudy_common::heartbeat::Kind::Beat,
                session: rng.next(),
                seq: rng.next(),
                echo_seq: 0,
                generation: rng.pick(1),
            };
            let _ = udp.send_to(&beat.seal(&key), target);
        }
        8 => {
            // A VM restored ahead for a handover out of nowhere: refused, or
            // (had it matched) restored paused and never run.
            let p = PrepareHandoverRequest {
                generation: rng.pick(1),
                session: rng.next(),
                epoch: rng.pick(3),
                commit_wait_millis: (rng.next() % 50) as u32,
            };
            let _ = tokio::time::timeout(deadline, client.prepare_handover(p)).await;
        }
        _ => {
            let n = (rng.next() % 100) as usize;
            let _ = udp.send_to(&rng.bytes(n), target);
        }
    }
}

/// Malformed gRPC framing on the replication stream (which the backup reads
/// itself, not through tonic): each kind ends that stream with a status
/// naming it, and the pair stays protected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_framing_on_the_replication_stream_is_refused_by_name() {
    let _serial = common::serial().await;
    let pair = Pair::protected("counter", "guest_params = { interval_ms = 10 }").await;
    let mut channel = plaintext_channel(pair.addrs.replication).await;
    let framed = |flag, len, body: &[u8]| bytes::Bytes::from(grpc_message(flag, len, body));
    let cases = [
        (
            "compressed",
            framed(1, 3, b"abc"),
            tonic::Code::Unimplemented,
            "compressed",
        ),
        (
            "too long",
            framed(0, 64 << 20, b"abc"),
            tonic::Code::OutOfRange,
            "over its limit",
        ),
        (
            "cut short",
            framed(0, 1000, &[0; 10]),
            tonic::Code::Internal,
            "inside a message",
        ),
        (
            "not an EpochChunk",
            framed(0, 2, &[0xff, 0xff]),
            tonic::Code::InvalidArgument,
            "malformed EpochChunk",
        ),
    ];
    for (what, body, code, names) in cases {
        let status = raw_replicate(&mut channel, body, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{what}: no status came back\n{}", pair.logs()));
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(status.message().contains(names), "{what}: {status:?}");
    }
    checkpoints_continue(&pair, 5).await;
    let s = common::status(pair.addrs.backup_control).await.unwrap();
    assert_eq!((s.role.as_str(), s.generation), ("backup", 1), "{s:?}");
}

/// A client speaking the replication protocol with random and mutated
/// messages against a protected pair: no panic, no promotion while the real
/// primary lives, the committed image intact, the VM protected at the end.
/// CI runs 10 s; `UNDERSTUDY_FUZZ_SECS=300` for the long run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_speaking_the_replication_protocol_cannot_take_the_vm_down() {
    use understudy_proto::replication_client::ReplicationClient;
    let _serial = common::serial().await;
    let secs: u64 = std::env::var("UNDERSTUDY_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mut pair = Pair::protected("counter", "guest_params = { interval_ms = 10 }").await;
    let mut channel = plaintext_channel(pair.addrs.replication).await;
    let mut client = ReplicationClient::new(channel.clone());
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ u64::from(std::process::id()));
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        hostile_round(
            &mut rng,
            &mut client,
            &mut channel,
            &udp,
            pair.addrs.replication,
        )
        .await;
        rounds += 1;
        if rounds % 50 == 0 {
            for (what, control, role) in [
                ("backup", pair.addrs.backup_control, "backup"),
                ("primary", pair.addrs.primary_control, "primary"),
            ] {
                let s = common::status(control).await.unwrap_or_else(|| {
                    panic!(
                        "the {what} stopped answering after {rounds} rounds\n{}",
                        pair.logs()
                    )
                });
                assert_eq!(
                    (s.role.as_str(), s.generation),
                    (role, 1),
                    "after {rounds} hostile rounds: {s:?}\n{}",
                    pair.logs()
                );
            }
        }
    }
    eprintln!("{rounds} hostile rounds in {:?}", started.elapsed());
    // Still protected, still committing, nothing promoted.
    checkpoints_continue(&pair, 10).await;
    let logs = pair.logs();
    assert!(
        !logs.contains("promoting") && !logs.contains("panicked"),
        "{logs}"
    );
    // The committed image is whole: a failover resumes the counter.
    fails_over_with_the_counter_going_on(&mut pair).await;
}
