//! Deterministic record and replay on real KVM: a recorded run replays to
//! the same console output, RAM and vCPU state; from its first snapshot or
//! one taken midway; a replay can go live; a flipped bit or a changed log
//! value is caught at the first exit it affects. They fail (never skip)
//! when /dev/kvm is missing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use std::path::Path;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use understudy_checkpoint::trace::{Record, TraceWriter, parse_segment};
use understudy_vmm::deterministic::{AfterReplay, ReplayOutcome, TraceMode};
use understudy_vmm::{BootOptions, BuiltinBoot, GuestRam, RamBacking, Vm, VmEnd, snapshot};

fn require_kvm() {
    if let Err(e) = understudy_vmm::open_kvm() {
        panic!("these tests need /dev/kvm: {e}");
    }
}

/// A recording: its log's segments, the console output, and snapshots.
struct Recording {
    segments: Vec<Vec<u8>>,
    output: Vec<u8>,
}

fn drain(out: &Receiver<u8>, into: &mut Vec<u8>) {
    while let Ok(b) = out.try_recv() {
        into.push(b);
    }
}

/// Records `boot` for `run_for`, feeding `inputs` (offset from the start,
/// bytes), snapshotting at the start into `dir/start`, at `mid` (if any)
/// into `dir/mid`, and at the end into `dir/end`.
fn record(
    boot: &BuiltinBoot,
    dir: &Path,
    run_for: Duration,
    inputs: &[(Duration, Vec<u8>)],
    mid: Option<Duration>,
) -> Recording {
    require_kvm();
    let ram = GuestRam::new(32 << 20, RamBacking::Anonymous).unwrap();
    let (sink, segments) = crossbeam_channel::unbounded();
    let writer = TraceWriter::new(rand_stream(), 0);
    let (vm, console) = Vm::boot_deterministic(
        ram,
        boot,
        BootOptions {
            boot_record: Some(boot.clone()),
            start_paused: true,
            dirty_logging: false,
        },
        TraceMode::Record { writer, sink },
    )
    .unwrap();
    snapshot::write_snapshot(&vm, &dir.join("start")).unwrap();
    let mut output = Vec::new();
    let start = Instant::now();
    vm.resume().unwrap();
    let mut inputs = inputs.iter().peekable();
    let mut mid = mid;
    while start.elapsed() < run_for {
        while let Some((at, bytes)) = inputs.peek() {
            if start.elapsed() < *at {
                break;
            }
            assert!(console.input.send(bytes));
            inputs.next();
        }
        if let Some(at) = mid
            && start.elapsed() >= at
        {
            vm.pause().unwrap();
            snapshot::write_snapshot(&vm, &dir.join("mid")).unwrap();
            vm.resume().unwrap();
            mid = None;
        }
        drain(&console.output, &mut output);
        std::thread::sleep(Duration::from_millis(2));
    }
    vm.pause().unwrap();
    snapshot::write_snapshot(&vm, &dir.join("end")).unwrap();
    assert_eq!(vm.stop(), VmEnd::Stopped);
    drain(&console.output, &mut output);
    Recording {
        segments: segments.try_iter().collect(),
        output,
    }
}

fn rand_stream() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    u64::from_le_bytes(b)
}

fn source(segments: &[Vec<u8>]) -> Receiver<Vec<u8>> {
    let (tx, rx) = crossbeam_channel::unbounded();
    for s in segments {
        tx.send(s.clone()).unwrap();
    }
    rx
}

/// Replays from the snapshot in `from` to the log's end; returns the VM
/// (parked), the console output and how the replay ended.
fn replay(
    from: &Path,
    segments: &[Vec<u8>],
    until: Option<u64>,
    then: AfterReplay,
) -> (Vm, Receiver<u8>, Result<ReplayOutcome, String>) {
    let (vm, console) = snapshot::restore_deterministic(
        from,
        false,
        TraceMode::Replay {
            source: source(segments),
            until,
            then,
        },
    )
    .unwrap();
    let outcome = vm
        .wait_replay(Duration::from_secs(120))
        .map_err(|e| e.to_string());
    (vm, console.output, outcome)
}

/// The replayed VM equals the recorded end snapshot: RAM page for page,
/// vCPU (but the clock MSRs), devices, deterministic state.
fn assert_same_as(vm: &Vm, end: &Path) {
    vm.pause().unwrap();
    snapshot::compare_with_snapshot(vm, end).unwrap();
}

fn end_exit(dir: &Path) -> u64 {
    let (state, _) = snapshot::read_snapshot(dir).unwrap();
    state.deterministic.unwrap().exit_index
}

#[test]
fn a_recorded_counter_replays_to_the_same_output_and_state() {
    let dir = tempfile::tempdir().unwrap();
    let boot = BuiltinBoot::counter(20);
    let rec = record(&boot, dir.path(), Duration::from_millis(1500), &[], None);
    let text = String::from_utf8_lossy(&rec.output).into_owned();
    assert!(text.contains("count 10"), "{text}");
    let (vm, out, outcome) = replay(
        &dir.path().join("start"),
        &rec.segments,
        None,
        AfterReplay::Stop,
    );
    assert_eq!(
        outcome.unwrap(),
        ReplayOutcome::Reached {
            exit: end_exit(&dir.path().join("end")),
            went_live: false
        }
    );
    assert_same_as(&vm, &dir.path().join("end"));
    let mut replayed = Vec::new();
    drain(&out, &mut replayed);
    assert_eq!(String::from_utf8_lossy(&replayed), text);
    vm.stop();
}

#[test]
fn kv_under_random_input_replays_from_the_start_and_from_midway() {
    let dir = tempfile::tempdir().unwrap();
    let boot = BuiltinBoot::new(understudy_vmm::BuiltinGuest::Kv);
    let mut inputs = Vec::new();
    let mut seed = rand_stream() | 1;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut at = Duration::from_millis(50);
    for i in 0..120 {
        at += Duration::from_millis(next() % 20);
        let key = next() % 16;
        let line = match next() % 3 {
            0 => format!("SET k{key} v{i}\n"),
            1 => format!("GET k{key}\n"),
            _ => format!("DEL k{key}\n"),
        };
        // Split some lines so bytes arrive at different exits.
        let (a, b) = line.split_at((next() as usize) % line.len());
        inputs.push((at, a.as_bytes().to_vec()));
        inputs.push((
            at + Duration::from_millis(next() % 5),
            b.as_bytes().to_vec(),
        ));
    }
    inputs.sort_by_key(|(at, _)| *at);
    let rec = record(
        &boot,
        dir.path(),
        at + Duration::from_millis(300),
        &inputs,
        Some(at / 2),
    );
    let text = String::from_utf8_lossy(&rec.output).into_owned();
    assert!(text.lines().count() >= 100, "the kv guest answered: {text}");

    let (vm, out, outcome) = replay(
        &dir.path().join("start"),
        &rec.segments,
        None,
        AfterReplay::Stop,
    );
    outcome.unwrap();
    assert_same_as(&vm, &dir.path().join("end"));
    let mut replayed = Vec::new();
    drain(&out, &mut replayed);
    assert_eq!(String::from_utf8_lossy(&replayed), text);
    vm.stop();

    // From the snapshot taken midway: the output from there on.
    let (vm, out, outcome) = replay(
        &dir.path().join("mid"),
        &rec.segments,
        None,
        AfterReplay::Stop,
    );
    outcome.unwrap();
    assert_same_as(&vm, &dir.path().join("end"));
    let mut replayed = Vec::new();
    drain(&out, &mut replayed);
    let replayed = String::from_utf8_lossy(&replayed).into_owned();
    assert!(
        !replayed.is_empty() && text.ends_with(&replayed),
        "{replayed}"
    );
    assert!(replayed.len() < text.len());
    vm.stop();
}

#[test]
fn a_replay_halfway_goes_live_and_the_guest_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let boot = BuiltinBoot::counter(10);
    let rec = record(&boot, dir.path(), Duration::from_millis(800), &[], None);
    let half = end_exit(&dir.path().join("end")) / 2;
    let (vm, out, outcome) = replay(
        &dir.path().join("start"),
        &rec.segments,
        Some(half),
        AfterReplay::GoLive,
    );
    assert_eq!(
        outcome.unwrap(),
        ReplayOutcome::Reached {
            exit: half,
            went_live: true
        }
    );
    // Live: the counter goes on past where the recording ended.
    let recorded = String::from_utf8_lossy(&rec.output).into_owned();
    let last: u64 = recorded
        .lines()
        .filter_map(|l| l.strip_prefix("count ")?.parse().ok())
        .max()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut live = Vec::new();
    let want = format!("count {}\n", last + 20);
    while !String::from_utf8_lossy(&live).contains(&want) {
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&live)
        );
        if let Ok(b) = out.recv_timeout(Duration::from_millis(100)) {
            live.push(b);
        }
    }
    let live = String::from_utf8_lossy(&live).into_owned();
    // The same lines as the recording up to the switch, in order, no gaps.
    let numbers: Vec<u64> = live
        .lines()
        .filter_map(|l| l.strip_prefix("count ")?.parse().ok())
        .collect();
    assert_eq!(numbers, (0..numbers.len() as u64).collect::<Vec<_>>());
    vm.stop();
}

#[test]
fn a_flipped_bit_in_ram_is_caught_at_the_first_exit_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let boot = BuiltinBoot::counter(10);
    let rec = record(&boot, dir.path(), Duration::from_millis(600), &[], None);
    // The counter's interval parameter lives in the boot info page: flip a
    // bit of it, and the guest prints at other ticks than the log says.
    let start = dir.path().join("start");
    let (mut state, _) = snapshot::read_snapshot(&start).unwrap();
    let mem = start.join(snapshot::MEMORY_FILE);
    let mut ram = std::fs::read(&mem).unwrap();
    let at = (understudy_vmm::loader::BOOT_INFO_GPA + 24) as usize;
    ram[at] ^= 0x08;
    state.memory.crc32c = Some(crc32c::crc32c(&ram));
    std::fs::write(&mem, &ram).unwrap();
    std::fs::write(start.join(snapshot::STATE_FILE), state.encode().unwrap()).unwrap();
    let (vm, _out, outcome) = replay(&start, &rec.segments, None, AfterReplay::Stop);
    let err = outcome.unwrap_err();
    assert!(err.contains("replay diverged: at exit"), "{err}");
    assert!(matches!(vm.ended(), Some(VmEnd::Diverged(_))));
}

#[test]
fn a_changed_log_value_is_caught_at_its_exit() {
    let dir = tempfile::tempdir().unwrap();
    let boot = BuiltinBoot::counter(10);
    let rec = record(&boot, dir.path(), Duration::from_millis(600), &[], None);
    // Rewrite the log with the 40th console byte changed.
    let mut records = Vec::new();
    let mut stream = 0;
    for s in &rec.segments {
        let (h, rs, _) = parse_segment(s).unwrap();
        stream = h.stream;
        records.extend(rs);
    }
    let mut outs = 0;
    let mut changed_exit = 0;
    let mut exits = 0u64;
    for r in &mut records {
        if let Record::Exit(e) = r {
            exits += 1;
            if let understudy_checkpoint::trace::Exit::Out {
                port: 0x3f8, value, ..
            } = e
            {
                outs += 1;
                if outs == 40 {
                    *value ^= 1;
                    changed_exit = exits;
                }
            }
        }
    }
    assert!(changed_exit > 0);
    let mut writer = TraceWriter::new(stream, 0);
    for r in &records {
        writer.push(r);
    }
    let segments = vec![writer.seal(true)];
    let (_vm, _out, outcome) = replay(
        &dir.path().join("start"),
        &segments,
        None,
        AfterReplay::Stop,
    );
    let err = outcome.unwrap_err();
    assert!(
        err.contains(&format!("at exit {changed_exit}:")),
        "expected exit {changed_exit}: {err}"
    );
}

#[test]
fn a_foreign_log_and_a_kernel_mode_snapshot_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let boot = BuiltinBoot::counter(10);
    let rec = record(&boot, dir.path(), Duration::from_millis(300), &[], None);
    let other = tempfile::tempdir().unwrap();
    let rec2 = record(&boot, other.path(), Duration::from_millis(300), &[], None);
    let (_vm, _out, outcome) = replay(
        &dir.path().join("start"),
        &rec2.segments,
        None,
        AfterReplay::Stop,
    );
    let err = outcome.unwrap_err();
    assert!(err.contains("stream"), "{err}");
    drop(rec);

    // A snapshot of the kernel mode cannot be replayed.
    let ram = GuestRam::new(32 << 20, RamBacking::Anonymous).unwrap();
    let (vm, _console) = Vm::boot(
        ram,
        &boot,
        BootOptions {
            boot_record: Some(boot.clone()),
            start_paused: true,
            dirty_logging: false,
        },
    )
    .unwrap();
    let kernel = dir.path().join("kernel");
    snapshot::write_snapshot(&vm, &kernel).unwrap();
    vm.stop();
    let err = snapshot::restore_deterministic(
        &kernel,
        false,
        TraceMode::Replay {
            source: source(&rec2.segments),
            until: None,
            then: AfterReplay::Stop,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("kernel mode"), "{err}");
}

#[test]
fn the_dirtier_flat_out_and_paced_replays_to_the_same_ram() {
    for boot in [
        BuiltinBoot::dirtier(512, 0, 100),
        BuiltinBoot::dirtier(256, 20_000, 50),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let rec = record(
            &boot,
            dir.path(),
            Duration::from_millis(1000),
            &[],
            Some(Duration::from_millis(400)),
        );
        let text = String::from_utf8_lossy(&rec.output).into_owned();
        assert!(text.contains("work "), "{text}");
        for from in ["start", "mid"] {
            let (vm, out, outcome) = replay(
                &dir.path().join(from),
                &rec.segments,
                None,
                AfterReplay::Stop,
            );
            outcome.unwrap();
            assert_same_as(&vm, &dir.path().join("end"));
            let mut replayed = Vec::new();
            drain(&out, &mut replayed);
            assert!(text.ends_with(&*String::from_utf8_lossy(&replayed)));
            vm.stop();
        }
    }
}

#[test]
fn a_replay_can_hand_over_to_a_new_recording_that_replays_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let boot = BuiltinBoot::new(understudy_vmm::BuiltinGuest::Kv);
    let inputs: Vec<(Duration, Vec<u8>)> = (0..20)
        .map(|i| {
            (
                Duration::from_millis(20 * i),
                format!("SET a{i} {i}\n").into_bytes(),
            )
        })
        .collect();
    let rec = record(&boot, dir.path(), Duration::from_millis(600), &inputs, None);
    let half = end_exit(&dir.path().join("end")) / 2;
    let (sink, new_segments) = crossbeam_channel::unbounded();
    let (vm, console) = snapshot::restore_deterministic(
        &dir.path().join("start"),
        false,
        TraceMode::Replay {
            source: source(&rec.segments),
            until: Some(half),
            then: AfterReplay::Record { stream: 77, sink },
        },
    )
    .unwrap();
    let outcome = vm.wait_replay(Duration::from_secs(60)).unwrap();
    assert_eq!(
        outcome,
        ReplayOutcome::Reached {
            exit: half,
            went_live: false
        }
    );
    vm.pause().unwrap();
    snapshot::write_snapshot(&vm, &dir.path().join("switch")).unwrap();
    vm.resume().unwrap();
    for i in 0..10 {
        assert!(console.input.send(format!("GET a{i}\n").as_bytes()));
        std::thread::sleep(Duration::from_millis(15));
    }
    std::thread::sleep(Duration::from_millis(200));
    vm.pause().unwrap();
    snapshot::write_snapshot(&vm, &dir.path().join("end2")).unwrap();
    vm.stop();
    let mut live = Vec::new();
    drain(&console.output, &mut live);
    let live = String::from_utf8_lossy(&live).into_owned();
    assert!(live.contains("VALUE 9"), "{live}");
    let segments: Vec<Vec<u8>> = new_segments.try_iter().collect();
    let (vm, out, outcome) = replay(
        &dir.path().join("switch"),
        &segments,
        None,
        AfterReplay::Stop,
    );
    outcome.unwrap();
    assert_same_as(&vm, &dir.path().join("end2"));
    let mut replayed = Vec::new();
    drain(&out, &mut replayed);
    assert!(live.ends_with(&*String::from_utf8_lossy(&replayed)));
    assert!(String::from_utf8_lossy(&replayed).contains("VALUE 9"));
    vm.stop();
}
