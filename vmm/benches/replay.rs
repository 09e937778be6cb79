//! What deterministic record and replay cost and gain, on real KVM, side by
//! side in one run for each guest:
//!
//! - the trace's bytes per second of guest time, next to the dirty-page bytes
//!   per second the same run would ship as 25 ms checkpoints (the ratio is
//!   the point of the technique);
//! - the recording overhead: the guest's work rate recording ÷ the same
//!   guest in the kernel mode (KVM's irqchip and PIT), same run;
//! - the replay speed: recorded wall time ÷ the wall time to replay it.
//!
//! Run: `cargo bench -p understudy-vmm --bench replay`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use understudy_bench::{Report, Table, num};
use understudy_checkpoint::trace::TraceWriter;
use understudy_vmm::deterministic::{AfterReplay, Sealed, TraceMode};
use understudy_vmm::loader::{BOOT_INFO_GPA, BOOT_INFO_WORK_DONE};
use understudy_vmm::{BootOptions, BuiltinBoot, BuiltinGuest, GuestRam, RamBacking, Vm, snapshot};

const MEM: usize = 64 << 20;
const RUN: Duration = Duration::from_secs(3);
const EPOCH: Duration = Duration::from_millis(25);

struct Workload {
    name: String,
    boot: BuiltinBoot,
    /// kv requests per second (0: no load).
    kv_rate: u64,
}

/// What one run measured.
#[derive(Default)]
struct Run {
    secs: f64,
    /// Guest work: dirtier pages written, counter lines, kv answers.
    work: f64,
    dirty_bytes: u64,
    log_bytes: u64,
}

fn work_of(vm: &Vm, guest: BuiltinGuest, output: &[u8]) -> f64 {
    match guest {
        BuiltinGuest::Dirtier => vm
            .ram()
            .read_u64(BOOT_INFO_GPA + BOOT_INFO_WORK_DONE)
            .unwrap() as f64,
        _ => output.iter().filter(|&&b| b == b'\n').count() as f64,
    }
}

/// Sends `SET`s at `rate` per second until told to stop.
fn kv_load(
    input: understudy_vmm::ConsoleInput,
    rate: u64,
    stop: crossbeam_channel::Receiver<()>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let period = Duration::from_secs_f64(1.0 / rate as f64);
        let start = Instant::now();
        let mut i = 0u64;
        loop {
            let due = start + period.mul_f64(i as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now())
                && stop.recv_timeout(wait).is_ok()
            {
                return;
            }
            if stop.try_recv().is_ok() {
                return;
            }
            let line = format!("SET k{} v{i}\n", i % 64);
            if input.try_send(line.as_bytes()).is_err() {
                return;
            }
            i += 1;
        }
    })
}

/// Runs `w` for [`RUN`], harvesting dirty pages every [`EPOCH`]; records
/// (into `dir`, start snapshot and log) when `dir` is given.
fn run(w: &Workload, record: Option<&Path>) -> (Run, Vec<Vec<u8>>) {
    let ram = GuestRam::new(MEM, RamBacking::Anonymous).unwrap();
    let options = BootOptions {
        boot_record: Some(w.boot.clone()),
        start_paused: true,
        dirty_logging: true,
    };
    let (sink, segments) = crossbeam_channel::unbounded();
    let (mut vm, console) = match record {
        Some(_) => Vm::boot_deterministic(
            ram,
            &w.boot,
            options,
            TraceMode::Record {
                writer: TraceWriter::new(7, 0),
                sink,
            },
        )
        .unwrap(),
        None => Vm::boot(ram, &w.boot, options).unwrap(),
    };
    if let Some(dir) = record {
        snapshot::write_snapshot(&vm, &dir.join("start")).unwrap();
    }
    vm.start_dirty_logging().unwrap();
    vm.harvest_dirty().unwrap();
    let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
    let load = (w.kv_rate > 0).then(|| kv_load(console.input.clone(), w.kv_rate, stop_rx));
    let start = Instant::now();
    vm.resume().unwrap();
    let mut output = Vec::new();
    let mut dirty_pages = 0u64;
    while start.elapsed() < RUN {
        std::thread::sleep(EPOCH);
        dirty_pages += vm.harvest_dirty().unwrap().count() as u64;
        output.extend(console.output.try_iter());
    }
    let _ = stop_tx.send(());
    vm.pause().unwrap();
    let secs = start.elapsed().as_secs_f64();
    dirty_pages += vm.harvest_dirty().unwrap().count() as u64;
    output.extend(console.output.try_iter());
    let work = work_of(&vm, w.boot.guest, &output);
    if let Some(dir) = record {
        snapshot::write_snapshot(&vm, &dir.join("end")).unwrap();
    }
    vm.stop();
    if let Some(load) = load {
        load.join().unwrap();
    }
    let segments: Vec<Vec<u8>> = segments.try_iter().map(|s: Sealed| s.bytes).collect();
    let run = Run {
        secs,
        work,
        dirty_bytes: dirty_pages * 4096,
        log_bytes: segments.iter().map(|s| s.len() as u64).sum(),
    };
    (run, segments)
}

/// Replays a recording to its end; returns the wall time, after checking
/// the result against the end snapshot.
fn replay(dir: &Path, segments: Vec<Vec<u8>>) -> Duration {
    let (tx, source) = crossbeam_channel::unbounded();
    for s in segments {
        tx.send(s).unwrap();
    }
    drop(tx);
    let start = Instant::now();
    let (vm, _console) = snapshot::restore_deterministic(
        &dir.join("start"),
        false,
        TraceMode::Replay {
            source,
            until: None,
            then: AfterReplay::Stop,
        },
    )
    .unwrap();
    vm.wait_replay(Duration::from_secs(600)).unwrap();
    let took = start.elapsed();
    vm.pause().unwrap();
    snapshot::compare_with_snapshot(&vm, &dir.join("end")).unwrap();
    vm.stop();
    took
}

fn rate(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9)
}

fn main() {
    if let Err(e) = understudy_vmm::open_kvm() {
        panic!("this benchmark needs /dev/kvm: {e}");
    }
    let mut report = Report::new(
        "replay",
        "Deterministic record and replay",
        "cargo bench -p understudy-vmm --bench replay",
    );
    let kv = |rate: u64| Workload {
        name: format!("kv, {rate} SET/s"),
        boot: BuiltinBoot::new(BuiltinGuest::Kv),
        kv_rate: rate,
    };
    let workloads = [
        Workload {
            name: "counter, a line every 10 ms".into(),
            boot: BuiltinBoot::counter(10),
            kv_rate: 0,
        },
        Workload {
            name: "dirtier, 4096 pages at 20k pages/s".into(),
            boot: BuiltinBoot::dirtier(4096, 20_000, 1000),
            kv_rate: 0,
        },
        Workload {
            name: "dirtier, 1024 pages flat out".into(),
            boot: BuiltinBoot::dirtier(1024, 0, 1000),
            kv_rate: 0,
        },
        kv(10),
        kv(100),
        kv(1000),
    ];
    let mut table = Table::new(
        format!(
            "Trace vs dirty pages, {} s runs, {} MiB guest; dirty pages harvested every {} ms \
             (what checkpoints would ship); work = pages written (dirtier), lines (counter), \
             answers (kv)",
            RUN.as_secs(),
            MEM >> 20,
            EPOCH.as_millis()
        ),
        &[
            "workload",
            "trace B/s",
            "dirty-page B/s",
            "dirty ÷ trace",
            "work/s, kernel mode",
            "work/s, recording",
            "recording ÷ kernel",
            "replay speed (× real time)",
        ],
    );
    let mut worst_overhead: f64 = f64::MAX;
    let mut kv100_ratio = 0.0;
    for w in &workloads {
        let (plain, _) = run(w, None);
        let dir = tempfile::tempdir().unwrap();
        let (recorded, segments) = run(w, Some(dir.path()));
        let replay_wall = replay(dir.path(), segments);
        let trace_rate = rate(recorded.log_bytes, recorded.secs);
        let dirty_rate = rate(recorded.dirty_bytes, recorded.secs);
        let plain_work = plain.work / plain.secs;
        let rec_work = recorded.work / recorded.secs;
        let overhead = if plain_work > 0.0 {
            rec_work / plain_work
        } else {
            1.0
        };
        if w.kv_rate == 0 {
            worst_overhead = worst_overhead.min(overhead);
        }
        if w.kv_rate == 100 {
            kv100_ratio = dirty_rate / trace_rate.max(1.0);
        }
        table.row(vec![
            w.name.clone().into(),
            num(trace_rate, 0),
            num(dirty_rate, 0),
            num(dirty_rate / trace_rate.max(1.0), 0),
            num(plain_work, 0),
            num(rec_work, 0),
            num(overhead, 2),
            num(recorded.secs / replay_wall.as_secs_f64(), 1),
        ]);
    }
    report.table(table);
    report.target(
        "trace vs checkpoint data, kv at 100 requests/s",
        "the trace at least 10× smaller than the dirty pages of the same run",
        format!("{kv100_ratio:.0}×"),
        kv100_ratio >= 10.0,
    );
    report.target(
        "recording overhead (counter, dirtier)",
        "guest work rate recording ≥ 0.9 × kernel mode",
        format!("worst {worst_overhead:.2}×"),
        worst_overhead >= 0.9,
    );
    report.finish().unwrap();
}
