//! End-to-end failover tests with real daemons, real KVM, real sockets, and
//! SIGKILL/SIGSTOP: no acked write lost, seamless output, fast promotion,
//! silent failures, fencing, bad peers, and every built-in guest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Lines, Pair, counts, wait_status};
use understudy_bench::full_disk::{self, Tmpfs};

const LONG: Duration = Duration::from_secs(60);

/// Reads lines until one satisfies `pred`.
async fn read_until(
    c: &mut Lines,
    pair: &Pair,
    pred: impl Fn(&str) -> bool,
    seen: &mut Vec<String>,
) {
    loop {
        match c.next(LONG).await {
            Ok(Some(l)) => {
                let done = pred(&l);
                seen.push(l);
                if done {
                    return;
                }
            }
            other => panic!("console ended ({other:?}) after {seen:?}\n{}", pair.logs()),
        }
    }
}

/// Kills the counter's primary, reads on from the backup's console until 20
/// counts past the first line it gives, and checks that the counts `seen`
/// (those read before, then all these) are one sequence from 0, nothing
/// else among them. Returns the time from the kill to the backup's first
/// line, and the counts.
async fn kill_and_count_on(
    pair: &mut Pair,
    client: &mut Lines,
    seen: &mut Vec<String>,
) -> (Duration, Vec<u64>) {
    pair.kill_primary();
    let killed = Instant::now();
    // Drain what the dead primary had already delivered.
    while let Ok(Some(l)) = client.next(Duration::from_millis(200)).await {
        seen.push(l);
    }
    client.reconnect(pair.addrs.backup_console).await.unwrap();
    let first = match client.next(Duration::from_secs(5)).await {
        Ok(Some(line)) => line,
        other => panic!("no line from the backup ({other:?})\n{}", pair.logs()),
    };
    let failover = killed.elapsed();
    seen.push(first);
    let last = counts(seen).last().copied().unwrap();
    read_until(client, pair, |l| l == format!("count {}", last + 20), seen).await;
    let got = counts(seen);
    assert_eq!(got.len(), seen.len(), "only count lines: {seen:?}");
    assert_eq!(
        got,
        (0..got.len() as u64).collect::<Vec<_>>(),
        "one sequence, no gap, no repeat\n{}",
        pair.logs()
    );
    (failover, got)
}

/// Starts `pair`'s backup with `UNDERSTUDY_FAULTS=faults`, then its primary,
/// and reads the counter's console up to `count {until}`.
async fn faulty_backup_counting(pair: &mut Pair, faults: &str, until: u64) -> (Lines, Vec<String>) {
    pair.restart_backup_with_faults(faults);
    pair.start_primary();
    pair.wait_protected().await;
    let mut client = Lines::connect(pair.addrs.primary_console, 0).await.unwrap();
    let mut seen = Vec::new();
    read_until(
        &mut client,
        pair,
        |l| l == format!("count {until}"),
        &mut seen,
    )
    .await;
    (client, seen)
}

/// Waits until the host whose state directory is `dir` has recorded that
/// it runs the VM as the primary at generation 2.
fn wait_recorded_primary_at_2(dir: &std::path::Path, pair: &Pair) {
    let state = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let recorded = common::wait_for(LONG, || {
        state("role") == "primary\n" && state("generation") == "2\n"
    });
    assert!(
        recorded.is_ok(),
        "role {:?}, generation {:?}\n{}",
        state("role"),
        state("generation"),
        pair.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_output_is_one_sequence_across_sigkill_and_promotion_is_fast() {
    let _serial = common::serial().await;
    for trial in 0..3u64 {
        let mut pair = Pair::protected("counter", "guest_params = { interval_ms = 10 }").await;
        let mut client = Lines::connect(pair.addrs.primary_console, 0).await.unwrap();
        let mut seen = Vec::new();
        let until = 10 + trial * 13;
        read_until(
            &mut client,
            &pair,
            |l| l == format!("count {until}"),
            &mut seen,
        )
        .await;
        // Kill at a point that is not aligned to anything.
        tokio::time::sleep(Duration::from_micros(1000 + trial * 7777)).await;
        let (failover, got) = kill_and_count_on(&mut pair, &mut client, &mut seen).await;
        assert!(
            failover < Duration::from_secs(1),
            "SIGKILL → first byte from the backup took {failover:?}"
        );
        eprintln!("trial {trial}: failover {failover:?}, {} lines", got.len());
        let s = common::status(pair.addrs.backup_control).await.unwrap();
        assert_eq!(s.role, "primary");
        assert_eq!(s.generation, 2, "promotion bumped the generation");
    }
}

/// No disk write of a takeover but the image's fence comes between the
/// failure and the promoted VM's first output: each is a few fsyncs, and
/// this disk's fsync has tails
/// of 50–250 ms. The new generation and role are written beside the primary
/// role's start (`daemon.takeover.records`), and the VM record that says
/// the VM runs unprotected here was written ahead, while the host was the
/// backup (`host_state.run_record`). With both stalled 3 s (a slow disk),
/// the count still follows the kill within a second, and the files say
/// primary at generation 2 once the writes are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_disk_holds_no_promoted_vms_output() {
    let _serial = common::serial().await;
    // The promoted host takes the primary role, recording it.
    let mut pair = Pair::switchable("counter", "guest_params = { interval_ms = 10 }");
    let (mut client, mut seen) = faulty_backup_counting(
        &mut pair,
        "daemon.takeover.records~3000,host_state.run_record~3000",
        10,
    )
    .await;
    let dir = pair.dir.path().join("backup");
    let record = || std::fs::read_to_string(dir.join("vm")).unwrap_or_default();
    let ahead = common::wait_for(LONG, || record().contains("state=released-unprotected"));
    assert!(ahead.is_ok(), "VM record {:?}\n{}", record(), pair.logs());
    let (failover, _) = kill_and_count_on(&mut pair, &mut client, &mut seen).await;
    assert!(
        failover < Duration::from_secs(1),
        "SIGKILL → first byte from the backup took {failover:?}\n{}",
        pair.logs()
    );
    wait_recorded_primary_at_2(&dir, &pair);
}

/// A promoted host that cannot record its new generation and role
/// (`daemon.takeover.records` fails, as a failing disk would) says so and
/// runs the VM on: the count goes on as one sequence. Those writes used to
/// come before the primary role, and their failure ended the daemon and the
/// VM it had just resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_host_that_cannot_record_its_role_runs_the_vm_on() {
    let _serial = common::serial().await;
    let mut pair = Pair::switchable("counter", "guest_params = { interval_ms = 10 }");
    let (mut client, mut seen) =
        faulty_backup_counting(&mut pair, "daemon.takeover.records", 10).await;
    kill_and_count_on(&mut pair, &mut client, &mut seen).await;
    let logs = pair.logs();
    assert!(
        logs.contains("cannot record its generation and role"),
        "{logs}"
    );
    let s = common::status(pair.addrs.backup_control).await.unwrap();
    assert_eq!(
        (s.role.as_str(), s.generation),
        ("primary", 2),
        "{s:?}\n{logs}"
    );
    let role = std::fs::read_to_string(pair.dir.path().join("backup").join("role"));
    assert_eq!(role.unwrap_or_default(), "backup\n", "{logs}");
}

/// A backup whose image's blocks are not reserved (`backup.image.unreserved`
/// answers as a filesystem without `fallocate` would) promotes onto a copy
/// of the image in anonymous memory, never onto the file mapped shared (a
/// guest store into a hole a full disk cannot fill would end the VM with a
/// `SIGBUS`): the count goes on as one sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_whose_image_is_not_reserved_promotes_onto_a_copy_of_it() {
    let _serial = common::serial().await;
    let mut pair = Pair::new("counter", "guest_params = { interval_ms = 10 }");
    let (mut client, mut seen) =
        faulty_backup_counting(&mut pair, "backup.image.unreserved", 20).await;
    kill_and_count_on(&mut pair, &mut client, &mut seen).await;
    assert!(
        pair.logs()
            .contains("runs on a copy of it in anonymous memory"),
        "{}",
        pair.logs()
    );
}

/// A backup whose disk fills up keeps protecting (its image and its
/// journal's room were reserved when the image was made) and, when the
/// primary is killed, promotes and runs the VM on: a promotion writes the
/// image's record and the host's generation and role, and none of those
/// writes needs a new disk block (the record is replaced in place, the
/// state files through spares kept for them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_whose_disk_is_full_still_promotes_and_runs_the_vm() {
    let _serial = common::serial().await;
    // The promoted host takes the primary role, recording it.
    let mut pair = Pair::switchable("counter", "guest_params = { interval_ms = 10 }");
    // The backup's state directory on a tmpfs of its own: 16 MiB of guest
    // RAM, so an image and a journal's room of 16 MiB each, and the image's
    // record with room for the largest device state (5 MiB twice).
    if let Some(mut backup) = pair.backup.take() {
        backup.kill().unwrap();
        backup.wait().unwrap();
    }
    let disk = Tmpfs::mount(&pair.dir.path().join("backup"), "48m");
    pair.restart_backup(&[], &[]);
    pair.start_primary();
    pair.wait_protected().await;
    full_disk::fill_up(disk.path());
    // Epochs still commit.
    let committed = |s: &understudy_proto::StatusReply| s.has_epoch.then_some(s.last_epoch);
    let before = committed(&common::status(pair.addrs.backup_control).await.unwrap());
    wait_status(
        &pair,
        pair.addrs.backup_control,
        "epochs committed on the full disk",
        LONG,
        |s| committed(s) > before.map(|e| e + 10),
    )
    .await;
    let mut client = Lines::connect(pair.addrs.primary_console, 0).await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut client, &pair, |l| l == "count 20", &mut seen).await;
    kill_and_count_on(&mut pair, &mut client, &mut seen).await;
    let s = common::status(pair.addrs.backup_control).await.unwrap();
    assert_eq!(
        (s.role.as_str(), s.generation),
        ("primary", 2),
        "{s:?}\n{}",
        pair.logs()
    );
    // The record had its room made before the disk filled.
    assert!(!pair.logs().contains("cannot make room"), "{}", pair.logs());
    // The host recorded its new role and generation, and runs on.
    wait_recorded_primary_at_2(disk.path(), &pair);
    let next = counts(&seen).last().unwrap() + 20;
    read_until(
        &mut client,
        &pair,
        |l| l == format!("count {next}"),
        &mut seen,
    )
    .await;
    // The daemons go before their disk does.
    drop(pair);
    drop(disk);
}

/// Sends a kv command and returns its answer line.
async fn ask(c: &mut Lines, line: &str) -> std::io::Result<Option<String>> {
    c.send(line).await?;
    c.next(Duration::from_secs(20)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acked_kv_write_is_lost_when_the_primary_is_killed_at_random() {
    let _serial = common::serial().await;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for trial in 0..8 {
        let mut pair = Pair::protected("kv", "").await;
        let mut client = Lines::connect(pair.addrs.primary_console, 0).await.unwrap();
        let mut seen = Vec::new();
        read_until(&mut client, &pair, |l| l == "kv ready", &mut seen).await;
        // Kill somewhere in the next 0.1-1 s while the client writes.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let kill_after = Duration::from_millis(100 + rng % 900);
        let started = Instant::now();
        let mut acked = Vec::new();
        let mut i = 0u64;
        while started.elapsed() < kill_after {
            match ask(&mut client, &format!("SET key{trial}-{i} value-{i}")).await {
                Ok(Some(l)) if l == "OK" => acked.push(i),
                other => panic!("unexpected answer {other:?}\n{}", pair.logs()),
            }
            i += 1;
        }
        // One more write in flight while the primary dies.
        common::kill_with_a_write_in_flight(
            &mut pair,
            &mut client,
            &format!("SET key{trial}-{i} value-{i}"),
        )
        .await;
        acked.push(i);
        for &k in &acked {
            let got = ask(&mut client, &format!("GET key{trial}-{k}"))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                got,
                format!("VALUE value-{k}"),
                "trial {trial}: acked write key{trial}-{k} lost\n{}",
                pair.logs()
            );
        }
        eprintln!(
            "trial {trial}: {} acked writes survived a SIGKILL after {kill_after:?}",
            acked.len()
        );
        assert!(!acked.is_empty());
    }
}

async fn frozen_primary_is_deposed_and_never_releases_output(policy: &str) {
    let mut pair = Pair::protected("kv", &format!("backup_loss = \"{policy}\"")).await;
    let mut client = Lines::connect(pair.addrs.primary_console, 0).await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut client, &pair, |l| l == "kv ready", &mut seen).await;
    for k in 0..5 {
        assert_eq!(
            ask(&mut client, &format!("SET before{k} yes"))
                .await
                .unwrap()
                .unwrap(),
            "OK"
        );
    }
    // Freeze the primary: no FIN, no RST; only heartbeats can tell.
    pair.signal_primary(libc::SIGSTOP);
    let frozen = Instant::now();
    client.send("SET frozen primary").await.unwrap();
    pair.wait_promoted().await;
    let detected = frozen.elapsed();
    // A client on the new primary writes the same key.
    let mut other = Lines::connect(pair.addrs.backup_console, client.offset())
        .await
        .unwrap();
    assert_eq!(
        ask(&mut other, "SET frozen backup").await.unwrap().unwrap(),
        "OK"
    );
    // Wake the old primary: it must learn it was deposed and fence itself.
    pair.signal_primary(libc::SIGCONT);
    let status = pair.wait_primary_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(3), "fenced exit code\n{}", pair.logs());
    // Its client got nothing after the freeze: no answer to the frozen write.
    let rest = client.next(Duration::from_secs(2)).await;
    assert!(
        matches!(rest, Ok(None) | Err(_)),
        "stale primary released {rest:?}\n{}",
        pair.logs()
    );
    for k in 0..5 {
        assert_eq!(
            ask(&mut other, &format!("GET before{k}"))
                .await
                .unwrap()
                .unwrap(),
            "VALUE yes"
        );
    }
    assert_eq!(
        ask(&mut other, "GET frozen").await.unwrap().unwrap(),
        "VALUE backup"
    );
    assert!(
        pair.logs().contains("deposed"),
        "the old primary says why\n{}",
        pair.logs()
    );
    eprintln!("{policy}: frozen primary detected and promoted after {detected:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstopped_primary_is_deposed_keep_running() {
    let _serial = common::serial().await;
    frozen_primary_is_deposed_and_never_releases_output("keep-running").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstopped_primary_is_deposed_hold_output() {
    let _serial = common::serial().await;
    frozen_primary_is_deposed_and_never_releases_output("hold-output").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_primary_restarted_after_promotion_refuses_to_run() {
    let _serial = common::serial().await;
    let mut pair = Pair::protected("counter", "").await;
    pair.kill_primary();
    pair.wait_promoted().await;
    // Its state dir has no fence marker (it died before learning); the
    // handshake tells it, and it writes the marker.
    pair.start_primary();
    let status = pair.wait_primary_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(3), "{}", pair.logs());
    let marker = pair.dir.path().join("primary/fenced");
    assert!(marker.exists(), "the refusal is recorded");
    // Restarted again: refused from the marker alone, with the reason.
    pair.start_primary();
    let status = pair.wait_primary_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(3));
    let logs = pair.logs();
    assert!(
        logs.contains("this primary was deposed") && logs.contains("Refusing to run it here too"),
        "{logs}"
    );
    // The promoted VM kept running throughout.
    let s = common::status(pair.addrs.backup_control).await.unwrap();
    assert_eq!((s.role.as_str(), s.generation), ("primary", 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirtier_fails_over_and_keeps_working() {
    let _serial = common::serial().await;
    let mut pair = Pair::protected(
        "dirtier",
        "guest_params = { working_set = 2048, dirty_rate = 20000, report_ms = 100 }",
    )
    .await;
    let mut client = Lines::connect(pair.addrs.primary_console, 0).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(client.next(LONG).await.unwrap().unwrap());
    }
    let s = common::status(pair.addrs.primary_control).await.unwrap();
    assert!(
        s.dirty_pages_per_epoch > 10.0,
        "the dirtier dirties pages: {s:?}"
    );
    pair.kill_primary();
    while let Ok(Some(l)) = client.next(Duration::from_millis(200)).await {
        seen.push(l);
    }
    client.reconnect(pair.addrs.backup_console).await.unwrap();
    for _ in 0..5 {
        seen.push(client.next(LONG).await.unwrap().unwrap());
    }
    let work: Vec<u64> = seen
        .iter()
        .filter_map(|l| l.strip_prefix("work ")?.parse().ok())
        .collect();
    assert_eq!(work.len(), seen.len(), "{seen:?}");
    assert!(
        work.windows(2).all(|w| w[0] < w[1]),
        "work only grows across the failover: {work:?}"
    );
}

mod fake_primary {
    use std::time::Duration;

    use tokio_stream::StreamExt;
    use understudy_checkpoint::{CodecPolicy, EpochKind, SenderState};
    use understudy_proto::replication_client::ReplicationClient;
    use understudy_proto::{EpochChunk, HelloRequest, PROTOCOL_VERSION};

    pub const RAM: u64 = 16 << 20;

    pub fn hello(session: u64) -> HelloRequest {
        HelloRequest {
            protocol_version: PROTOCOL_VERSION,
            vm_id: "test-vm".into(),
            generation: 1,
            ram_bytes: RAM,
            session,
            incarnation: 0x1234_5678,
            previous: None,
            heartbeat_key: vec![7; 32].into(),
            mode: 0,
            migration: false,
            witness_key: String::new(),
        }
    }

    /// A session that synced and committed checkpoint 2; returns the open
    /// stream pieces for more epochs.
    pub struct Session {
        pub tx: tokio::sync::mpsc::Sender<EpochChunk>,
        pub acks: tonic::Streaming<understudy_proto::Ack>,
        pub sender: SenderState,
        pub id: u64,
    }

    impl Session {
        pub async fn open(
            client: &mut ReplicationClient<tonic::transport::Channel>,
            id: u64,
        ) -> Self {
            client.hello(hello(id)).await.unwrap();
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            let acks = client
                .replicate(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let sender =
                SenderState::new("test-vm", (RAM / 4096) as u32, 1, CodecPolicy::ADAPTIVE).unwrap();
            let mut s = Self {
                tx,
                acks,
                sender,
                id,
            };
            let all: Vec<u32> = (0..(RAM / 4096) as u32).collect();
            let chunks = s.encode(1, EpochKind::SyncRound, &all);
            s.send(chunks).await;
            assert_eq!(s.acks.next().await.unwrap().unwrap().epoch, 1);
            let chunks = s.encode(2, EpochKind::Checkpoint, &[5, 6, 7]);
            s.send(chunks).await;
            assert_eq!(s.acks.next().await.unwrap().unwrap().epoch, 2);
            s
        }

        pub fn encode(&mut self, epoch: u64, kind: EpochKind, pages: &[u32]) -> Vec<Vec<u8>> {
            let mut enc = self.sender.begin(epoch, kind).unwrap();
            for &p in pages {
                let mut page = [0u8; 4096];
                page[..8].copy_from_slice(&(epoch * 1000 + p as u64).to_le_bytes());
                enc.add_page(p, &page).unwrap();
            }
            enc.finish(b"not a VM state").unwrap().chunks
        }

        pub async fn send(&self, chunks: Vec<Vec<u8>>) {
            for c in chunks {
                let msg = EpochChunk {
                    session: self.id,
                    generation: 1,
                    chunk: c.into(),
                    ..Default::default()
                };
                if self.tx.send(msg).await.is_err() {
                    return;
                }
            }
        }

        /// The next ack or the error that ended the stream.
        pub async fn outcome(&mut self) -> Result<u64, tonic::Status> {
            match tokio::time::timeout(Duration::from_secs(20), self.acks.next()).await {
                Ok(Some(Ok(ack))) => Ok(ack.epoch),
                Ok(Some(Err(status))) => Err(status),
                Ok(None) => Err(tonic::Status::aborted("stream closed")),
                Err(_) => Err(tonic::Status::deadline_exceeded("no answer")),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_the_backup_refuses_stops_with_the_reason() {
    let _serial = common::serial().await;
    let mut pair = Pair::new("counter", "");
    // The configurations differ: the backup protects 16 MiB, this primary has 32.
    pair.primary = Some(pair.spawn("primary", &["memory_mib=32"]));
    let status = pair.wait_primary_exit(Duration::from_secs(20));
    assert!(!status.success(), "{}", pair.logs());
    let logs = pair.logs();
    assert!(
        logs.contains("refused the primary") && logs.contains("the configurations differ"),
        "{logs}"
    );
    assert!(!logs.contains("VM booted"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_and_the_image_keeps_its_last_commit() {
    let _serial = common::serial().await;
    use understudy_checkpoint::EpochKind;
    use understudy_proto::replication_client::ReplicationClient;

    let mut pair = Pair::new("counter", "");
    let mut client = loop {
        if let Ok(c) =
            ReplicationClient::connect(format!("http://{}", pair.addrs.replication)).await
        {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Handshake refusals, each with its reason.
    let mut bad = fake_primary::hello(1);
    bad.protocol_version = 99;
    let err = client.hello(bad).await.unwrap_err();
    assert!(
        err.message()
            .contains("protocol version 99 is not supported"),
        "{err}"
    );
    let mut bad = fake_primary::hello(1);
    bad.vm_id = "someone-else".into();
    let err = client.hello(bad).await.unwrap_err();
    assert!(
        err.message().contains("wrong VM") && err.message().contains("someone-else"),
        "{err}"
    );
    let mut bad = fake_primary::hello(1);
    bad.ram_bytes *= 2;
    let err = client.hello(bad).await.unwrap_err();
    assert!(err.message().contains("configurations differ"), "{err}");

    // A synced session at checkpoint 2, then an epoch that skips a number.
    let mut s = fake_primary::Session::open(&mut client, 7).await;
    // (Our own sender refuses to skip; re-frame epoch 3's chunks as epoch 4.)
    let chunks: Vec<Vec<u8>> = s
        .encode(3, EpochKind::Checkpoint, &[1])
        .iter()
        .map(|c| {
            let (h, body) = understudy_checkpoint::chunk::parse(c).unwrap();
            understudy_checkpoint::chunk::frame(h.kind, 4, h.seq, body)
        })
        .collect();
    s.send(chunks).await;
    let err = s.outcome().await.unwrap_err();
    assert!(err.message().contains("epochs cannot be skipped"), "{err}");
    let st = common::status(pair.addrs.backup_control).await.unwrap();
    assert_eq!(
        (st.last_epoch, st.protected),
        (2, true),
        "image still at checkpoint 2"
    );

    // A new session, then a corrupted epoch.
    let mut s = fake_primary::Session::open(&mut client, 8).await;
    let mut chunks = s.encode(3, EpochKind::Checkpoint, &[9, 10, 11]);
    let mid = chunks.len() / 2;
    let at = chunks[mid].len() / 2;
    chunks[mid][at] ^= 0x20;
    s.send(chunks).await;
    let err = s.outcome().await.unwrap_err();
    assert!(
        err.message().contains("image kept at its last commit")
            && err.message().contains("checksum"),
        "{err}"
    );
    assert_eq!(
        common::status(pair.addrs.backup_control)
            .await
            .unwrap()
            .last_epoch,
        2
    );

    // Chunks for a session that no longer exists are refused too.
    s.send(vec![vec![1, 2, 3]]).await;

    // The fake primary is now silent past the heartbeat timeout. The backup
    // tries to promote, but this checkpoint's payload is not a VM state: the
    // attempt must fail without bumping the generation, so the primary (still
    // generation 1) is not told it was deposed.
    wait_status(
        &pair,
        pair.addrs.backup_control,
        "failed promotion reported",
        LONG,
        |s| s.state_kind == "promotion-failed",
    )
    .await;
    let st = common::status(pair.addrs.backup_control).await.unwrap();
    assert_eq!((st.generation, st.role.as_str()), (1, "backup"), "{st:?}");
    let probe = client
        .probe(understudy_proto::ProbeRequest { generation: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (probe.generation, probe.role.as_str()),
        (1, "backup"),
        "generation 1 is still welcome"
    );

    // On disk: exactly checkpoint 2, verified page by page on open.
    let mut backup = pair.backup.take().unwrap();
    backup.kill().unwrap();
    backup.wait().unwrap();
    let (store, _) = understudy_checkpoint::ImageStore::open(
        &pair.dir.path().join("backup/image"),
        Default::default(),
    )
    .unwrap();
    assert_eq!(store.committed_epoch(), Some(2));
    let page5 = &store.memory()[5 * 4096..5 * 4096 + 8];
    assert_eq!(
        u64::from_le_bytes(page5.try_into().unwrap()),
        2005,
        "the page committed by checkpoint 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_primary_cleanly_without_a_promotion() {
    let _serial = common::serial().await;
    let mut pair = Pair::protected("counter", "guest_params = { interval_ms = 10 }").await;
    let mut client = Lines::connect(pair.addrs.primary_console, 0).await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut client, &pair, |l| l == "count 10", &mut seen).await;
    pair.signal_primary(libc::SIGTERM);
    let status = pair.wait_primary_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", pair.logs());
    while let Ok(Some(l)) = client.next(Duration::from_millis(300)).await {
        seen.push(l);
    }
    let got = counts(&seen);
    assert_eq!(got, (0..got.len() as u64).collect::<Vec<_>>());
    // Well past the heartbeat timeout: the backup stays a backup.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let s = common::status(pair.addrs.backup_control).await.unwrap();
    assert_eq!(
        s.role,
        "backup",
        "no promotion after a clean stop\n{}",
        pair.logs()
    );
    assert_eq!(s.state_kind, "primary-stopped", "{s:?}");
}

async fn backup_loss_then_return(policy: &str) {
    let mut pair = Pair::protected(
        "counter",
        &format!("backup_loss = \"{policy}\"\nguest_params = {{ interval_ms = 10 }}"),
    )
    .await;
    let mut client = Lines::connect(pair.addrs.primary_console, 0).await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut client, &pair, |l| l == "count 5", &mut seen).await;
    // The backup dies.
    let mut backup = pair.backup.take().unwrap();
    backup.kill().unwrap();
    backup.wait().unwrap();
    wait_status(
        &pair,
        pair.addrs.primary_control,
        "primary unprotected",
        LONG,
        |s| {
            !s.protected
                && s.state_kind.starts_with("unprotected-")
                && s.state.contains("backup lost")
        },
    )
    .await;
    let before = counts(&seen).last().copied().unwrap();
    match policy {
        "keep-running" => {
            // Output keeps flowing while unprotected: 30 more counts.
            while counts(&seen).last().copied().unwrap() <= before + 30 {
                match client.next(Duration::from_secs(5)).await {
                    Ok(Some(l)) => seen.push(l),
                    other => panic!("keep-running stopped releasing output: {other:?}"),
                }
            }
        }
        _ => {
            // What epochs acked before the loss released, then nothing: the
            // guest runs on (a count every 10 ms) but no line comes out.
            while let Ok(Some(l)) = client.next(Duration::from_millis(300)).await {
                seen.push(l);
            }
            let held = client.next(Duration::from_millis(700)).await;
            assert!(
                matches!(&held, Err(e) if e.kind() == std::io::ErrorKind::TimedOut),
                "hold-output released {held:?} while unprotected"
            );
        }
    }
    // The backup returns (fresh image): the primary resyncs and is protected again.
    pair.backup = Some(pair.spawn(
        "backup",
        &[&format!(
            "state_dir={:?}",
            pair.dir.path().join("backup2").display().to_string()
        )],
    ));
    pair.wait_protected().await;
    let until = counts(&seen).last().copied().unwrap() + 20;
    read_until(
        &mut client,
        &pair,
        |l| l == format!("count {until}"),
        &mut seen,
    )
    .await;
    let got = counts(&seen);
    assert_eq!(
        got,
        (0..got.len() as u64).collect::<Vec<_>>(),
        "{policy}: one sequence through loss and resync"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_loss_keep_running_releases_output_and_resyncs() {
    let _serial = common::serial().await;
    backup_loss_then_return("keep-running").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_loss_hold_output_holds_output_until_a_backup_acks_again() {
    let _serial = common::serial().await;
    backup_loss_then_return("hold-output").await;
}

/// A backup waiting for its first primary takes the memory that sync will
/// need: its new image read ahead, then the heap its receive path fills as
/// the stream piles up (on these hosts every fresh page costs a fault, which
/// the sync would otherwise pay page by page on the side that limits it).
/// Restarted on the image it made, it takes the heap again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_backup_takes_its_receive_heap_ahead() {
    let _serial = common::serial().await;
    let mut pair = Pair::with_memory("counter", 64, "");
    assert_holds_receive_heap(
        &pair,
        "read the new image into the page cache ahead of the first sync",
    );
    pair.restart_backup(&[], &[]);
    assert_holds_receive_heap(&pair, "took the receive heap ahead of the first sync");
}

/// An idle VM over a new image: the pages its guest never touched are zero
/// in the backup's image already, and the first sync round leaves them out
/// before it is cut into epochs. A VM of 256 MiB went as 32 epochs of
/// 8 MiB with next to nothing in them before its first checkpoint; the
/// counter guest touches a few MiB, one epoch or two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_vm_over_a_new_image_is_protected_without_an_epoch_for_untouched_pages() {
    let _serial = common::serial().await;
    let mut pair = Pair::with_memory("counter", 256, "");
    pair.start_primary();
    pair.wait_protected().await;
    let (epoch, logs) = protected_field::<u64>(&pair, "epoch=");
    assert!(
        epoch <= 8,
        "the VM was protected by epoch {epoch}: its sync sent epochs for pages the guest \
         never touched (256 MiB is 32 epochs of them)\n{logs}"
    );
}

/// A replicator idling without a session starts the session's sync as soon
/// as it is set, not at its next epoch tick or guest output. The primary
/// boots without its backup (it starts unprotected), the kv guest prints
/// nothing unasked and the epochs are 10 s apart: a replicator that waited
/// them out started the sync ~10 s after the VM booted, seconds after the
/// backup came and the stream opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_set_while_the_replicator_idles_starts_its_sync_at_once() {
    let _serial = common::serial().await;
    let mut pair = Pair::new("kv", "epoch_interval = \"10s\"\nstart_unprotected = true");
    let mut backup = pair.backup.take().unwrap();
    backup.kill().unwrap();
    backup.wait().unwrap();
    pair.start_primary();
    wait_status(
        &pair,
        pair.addrs.primary_control,
        "primary running unprotected",
        LONG,
        |s| s.state_kind.starts_with("unprotected-"),
    )
    .await;
    pair.backup = Some(pair.spawn("backup", &[&pair.backup_state()]));
    pair.wait_protected().await;
    let (setup_ms, logs) = protected_field::<f64>(&pair, "setup_ms=");
    assert!(
        setup_ms < 3000.0,
        "the sync started {setup_ms} ms after the connection: the replicator waited for \
         its epoch tick\n{logs}"
    );
}

/// The field `name` (e.g. `epoch=`) of the primary's "VM protected" line,
/// and the logs it was read from.
fn protected_field<T: std::str::FromStr>(pair: &Pair, name: &str) -> (T, String) {
    let logs = pair.logs();
    let value = logs
        .lines()
        .find(|l| l.contains("VM protected"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.parse().ok())
        })
        .unwrap_or_else(|| panic!("no \"VM protected … {name}\" in the logs:\n{logs}"));
    (value, logs)
}

/// Waits for the backup's log to say `said`, then checks it holds the
/// 32 MiB heap of a VM of 64 MiB (`RECEIVE_HEAP`), kept once freed.
fn assert_holds_receive_heap(pair: &Pair, said: &str) {
    let said_it = common::wait_for(Duration::from_secs(30), || pair.logs().contains(said));
    assert!(
        said_it.is_ok(),
        "the backup never said {said:?}:\n{}",
        pair.logs()
    );
    let pid = pair.backup.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let anon_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        anon_kib >= 32 << 10,
        "the waiting backup holds {anon_kib} kB of anonymous memory, not the 32 MiB heap \
         its first sync will need\n{}",
        pair.logs()
    );
}
