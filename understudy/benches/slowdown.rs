//! Guest slowdown under protection: the `dirtier` guest's work rate (pages
//! written per second) with protection ÷ without, for epoch intervals of 10,
//! 25, 50 and 100 ms and in replay mode (log shipping, a checkpoint every
//! second), at a light (1k pages/s), medium (10k pages/s) and heavy (flat
//! out) dirty rate. Both rates are measured in the same run; "without" is
//! the same daemon running the same guest with no backup. Both hosts
//! share this machine's two cores, so in replay mode the backup's replica,
//! which runs the guest a second time, competes with it for CPU.
//!
//! Run: `cargo bench -p understudy --bench slowdown`;
//! `UNDERSTUDY_BENCH_PARTS=heavy` (or `intervals`, `local`, `interference`)
//! runs one part; the tables of the others stay empty and only the part
//! that ran reports its targets. `UNDERSTUDY_BENCH_PIN=1` runs every pair
//! with its vCPU threads on CPU 1 and all their other threads on CPU 0 (the
//! `local` and `interference` parts always pin).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use understudy::daemon::Role;
use understudy::pair::{LocalPair, read_lines};

use understudy_bench::{Chart, Report, Series, Steal, Table, ThreadTimes, num, part, spread};
use understudy_common::console::ResumingClient;

const MEASURE: Duration = Duration::from_secs(2);
/// Turns of the heavy dirtier's table (each a protected run per mode, each
/// followed by a run of the guest alone).
const HEAVY_TURNS: usize = 7;

/// How a pair replicates in one column of the table.
#[derive(Clone, Copy)]
enum Protection {
    /// No backup: the same daemon running the guest unprotected, the
    /// baseline every ratio divides by.
    Unprotected,
    /// Checkpoints every this many ms.
    Epochs(u64),
    /// Checkpoints every this many ms, their pages always copied inside the
    /// stop (`copy_after_resume = false`).
    EpochsCopyInStop(u64),
    /// Log shipping, a checkpoint every second.
    Replay,
}

impl Protection {
    fn settings(self) -> String {
        match self {
            Self::Unprotected => "start_unprotected = true".into(),
            Self::Epochs(ms) => format!("epoch_interval = \"{ms}ms\""),
            Self::EpochsCopyInStop(ms) => {
                format!("epoch_interval = \"{ms}ms\"\ncopy_after_resume = false")
            }
            Self::Replay => "mode = \"replay\"\ncheckpoint_interval = \"1s\"".into(),
        }
    }
}

/// One run of the dirtier on a pair.
struct PairRun {
    /// Pages written per second of the guest's own time.
    rate: f64,
    /// The largest replication lag (epochs sent, not yet acked) seen.
    max_lag: u64,
    /// The primary's median guest stop at the end, µs.
    stop: f64,
    /// Where the time went while the work was counted.
    split: Split,
}

/// Shares of the wall time while a run's work was counted, from the
/// scheduler's accounting of each daemon thread (`ThreadTimes`).
#[derive(Clone, Copy)]
struct Split {
    /// The vCPU thread on a core.
    vcpu_run: f64,
    /// The vCPU thread runnable, waiting for a core.
    vcpu_wait: f64,
    /// The primary's other threads on a core (cores' worth).
    primary_rest: f64,
    /// The backup's threads on a core (cores' worth; 0 unprotected).
    backup: f64,
}

impl Split {
    /// The vCPU thread neither running nor runnable: in a stop, waiting
    /// for a write-protected page to be copied, or on a lock.
    fn vcpu_blocked(&self) -> f64 {
        (1.0 - self.vcpu_run - self.vcpu_wait).max(0.0)
    }
}

/// A pair running the dirtier at `rate` (0: flat out), protected as
/// `protection` says: returned once protected (unprotected: once the
/// primary runs). The directory holds both daemons' files.
async fn started_pair(rate: u64, protection: Protection) -> (tempfile::TempDir, LocalPair) {
    let dir = tempfile::tempdir().unwrap();
    let mut pair = LocalPair::new(
        Some(Path::new(env!("CARGO_BIN_EXE_understudyd"))),
        dir.path(),
        "slow",
        &format!(
            "guest = \"dirtier\"\nmemory_mib = 64\n{}\n\
             guest_params = {{ working_set = 2048, dirty_rate = {rate}, report_ms = 50 }}",
            protection.settings()
        ),
    )
    .unwrap();
    let pk = pair.addrs.primary_control;
    if let Protection::Unprotected = protection {
        pair.start(Role::Primary).unwrap();
        let started = std::time::Instant::now();
        while !understudy::remote::fetch_status(pk, None)
            .await
            .is_ok_and(|s| s.state.starts_with("unprotected"))
        {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the primary did not start unprotected; see {}",
                pair.log_path(Role::Primary).display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    } else {
        pair.start_protected(Duration::from_secs(60)).await.unwrap();
    }
    (dir, pair)
}

/// Work rate of the dirtier on a pair protected as `protection` says, with
/// the lag, the stop and where the time went. Unprotected, only the
/// primary runs.
async fn pair_rate(rate: u64, protection: Protection) -> PairRun {
    let (_dir, pair) = started_pair(rate, protection).await;
    if std::env::var_os("UNDERSTUDY_BENCH_PIN").is_some() {
        for pid in [pair.pid(Role::Primary), pair.pid(Role::Backup)]
            .into_iter()
            .flatten()
        {
            pin_threads(pid, &[VCPU_CPU], &[LOAD_CPU]);
        }
    }
    let pk = pair.addrs.primary_control;
    let max_lag = Arc::new(AtomicU64::new(0));
    let lag_watch = tokio::spawn({
        let max_lag = max_lag.clone();
        async move {
            loop {
                if let Ok(s) = understudy::remote::fetch_status(pk, None).await {
                    max_lag.fetch_max(s.replication_lag_epochs, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let pc = pair.addrs.primary_console;
    let mut client = ResumingClient::connect(pc, 0).await.unwrap();
    let pids = (pair.pid(Role::Primary), pair.pid(Role::Backup));
    let times = |pid: Option<u32>| pid.map(ThreadTimes::of).unwrap_or_default();
    let (primary_0, backup_0, t0) = (times(pids.0), times(pids.1), std::time::Instant::now());
    let rate = work_rate(&mut client, &mut Vec::new(), MEASURE)
        .await
        .unwrap_or(0.0);
    let wall = t0.elapsed().as_secs_f64();
    let (primary_1, backup_1) = (times(pids.0), times(pids.1));
    let (vcpu_run, vcpu_wait) = primary_1.since(&primary_0, "vcpu");
    let (primary_all, _) = primary_1.since(&primary_0, "");
    let split = Split {
        vcpu_run: vcpu_run / wall,
        vcpu_wait: vcpu_wait / wall,
        primary_rest: (primary_all - vcpu_run) / wall,
        backup: backup_1.since(&backup_0, "").0 / wall,
    };
    lag_watch.abort();
    let pause = understudy::remote::fetch_status(pk, None)
        .await
        .map_or(f64::NAN, |s| s.pause_p50_micros);
    drop(pair);
    PairRun {
        rate,
        max_lag: max_lag.load(Ordering::Relaxed),
        stop: pause,
        split,
    }
}

/// Reads the dirtier's `work N` lines for `time` and returns its work rate:
/// pages written a second of its own time (it prints every 50 ms of its PIT
/// time; output commit releases lines in per-epoch batches, so their
/// arrival times would be off by up to an epoch). None with under two lines.
async fn work_rate(
    client: &mut ResumingClient,
    partial: &mut Vec<u8>,
    time: Duration,
) -> Option<f64> {
    let mut values = Vec::new();
    read_lines(client, partial, time, |line, _| {
        if let Some(v) = line
            .trim()
            .strip_prefix("work ")
            .and_then(|n| n.parse::<u64>().ok())
        {
            values.push(v);
        }
    })
    .await;
    match values.as_slice() {
        [first, .., last] => Some((last - first) as f64 / ((values.len() - 1) as f64 * 0.05)),
        _ => None,
    }
}

/// What a local stop does, for the decomposition of the heavy dirtier's
/// slowdown (no backup, nothing shipped).
#[derive(Clone, Copy, PartialEq)]
enum LocalStop {
    /// No dirty logging, no stops: the guest alone.
    None,
    /// Stop, harvest the dirty log, resume: the cost of tracking writes
    /// (each page's first write in an epoch traps).
    Harvest,
    /// Stop, harvest, copy the dirty pages inside the stop, resume.
    CopyInStop,
    /// Stop, harvest, write-protect, resume, copy (the default).
    CopyAfterResume,
}

/// The flat-out dirtier in this process (no backup, nothing shipped), its
/// vCPU pinned to [`VCPU_CPU`] and this process's other threads to
/// [`LOAD_CPU`], each of `steps` taking turns in [`PHASE`]-long phases of one VM ([`CYCLES`]
/// cycles: runs of their own moved by more than the effect). Per step and
/// cycle: work a second, work a second on a core, the vCPU's share on a
/// core, IPIs a second on its CPU.
fn local_phases(steps: &[LocalStop], epoch: Duration) -> Vec<Vec<[f64; 4]>> {
    use understudy_vmm::loader::{BOOT_INFO_GPA, BOOT_INFO_WORK_DONE};
    use understudy_vmm::memory::RamBacking;
    use understudy_vmm::{BootOptions, BuiltinBoot, GuestRam, PAGE_SIZE, Vm};
    let ram = GuestRam::new(64 << 20, RamBacking::Anonymous).unwrap();
    ram.advise_huge_pages(); // as a primary's guest RAM
    let boot = BuiltinBoot::dirtier(2048, 0, 50);
    let (vm, _console) = Vm::boot(
        ram,
        &boot.clone(),
        BootOptions {
            boot_record: Some(boot),
            start_paused: false,
            dirty_logging: true,
        },
    )
    .unwrap();
    let me = std::process::id();
    pin_threads(me, &[VCPU_CPU], &[LOAD_CPU]);
    let wp = understudy_vmm::wp::WriteProtectCopy::new(vm.ram()).unwrap();
    let mut staging = vec![0u8; 4096 * PAGE_SIZE];
    staging.fill(0);
    let work = |vm: &Vm| {
        vm.ram()
            .read_u64(BOOT_INFO_GPA + BOOT_INFO_WORK_DONE)
            .unwrap()
    };
    // One stop as the replicator makes it (the vCPU captures meanwhile).
    let mut stop_once = |stop: LocalStop| {
        vm.pause_saving().unwrap();
        let pages = vm.harvest_dirty().unwrap().page_numbers();
        let protected = match stop {
            LocalStop::CopyAfterResume => Some(wp.protect(&pages).unwrap()),
            LocalStop::CopyInStop => {
                for (i, &p) in pages.iter().enumerate() {
                    let page = (&mut staging[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
                        .try_into()
                        .unwrap();
                    vm.ram().copy_page(p as usize, page).unwrap();
                }
                None
            }
            _ => None,
        };
        vm.save_state(false).unwrap();
        vm.resume().unwrap();
        if let Some(p) = protected {
            p.copy(vm.ram(), &mut staging).unwrap();
        }
    };
    std::thread::sleep(Duration::from_millis(200));
    let mut out = vec![Vec::new(); steps.len()];
    for _ in 0..CYCLES {
        for (k, &stop) in steps.iter().enumerate() {
            // A tenth of a phase to switch: the first stops of a phase
            // after one without harvest copy everything dirtied since.
            let mut phase = |length: Duration| {
                let (w0, times_0, ipis_0, t0) = (
                    work(&vm),
                    ThreadTimes::of(me),
                    ipis(VCPU_CPU),
                    std::time::Instant::now(),
                );
                while t0.elapsed() < length {
                    std::thread::sleep(epoch);
                    if stop != LocalStop::None {
                        stop_once(stop);
                    }
                }
                let wall = t0.elapsed().as_secs_f64();
                let on_core = ThreadTimes::of(me).since(&times_0, "vcpu").0 / wall;
                let rate = (work(&vm) - w0) as f64 / wall;
                let ipis = (ipis(VCPU_CPU) - ipis_0) as f64 / wall;
                [rate, rate / on_core, on_core, ipis]
            };
            phase(PHASE / 10);
            out[k].push(phase(PHASE));
        }
    }
    vm.stop();
    // This process goes on to run the bench's other parts.
    pin_threads(me, &[VCPU_CPU, LOAD_CPU], &[VCPU_CPU, LOAD_CPU]);
    out
}

/// Lets thread `tid` (0: the calling thread) run on `cpus` only.
fn set_affinity(tid: u32, cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it
    // (each cpu < CPU_SETSIZE, checked); sched_setaffinity only reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            assert!(cpu < libc::CPU_SETSIZE as usize, "CPU {cpu} out of range");
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(tid as libc::pid_t, std::mem::size_of_val(&set), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Lets `pid`'s vCPU threads run on `vcpu_cpus` only and its other threads
/// on `rest_cpus` (threads born later inherit their creator's CPUs). A
/// thread that ends meanwhile is passed over; any other failure stops the
/// bench (a run it calls pinned must be).
fn pin_threads(pid: u32, vcpu_cpus: &[usize], rest_cpus: &[usize]) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("cannot list the threads of {pid}: {e}"));
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue; // the thread ended
        };
        let cpus = if comm.starts_with("vcpu") {
            vcpu_cpus
        } else {
            rest_cpus
        };
        match set_affinity(tid, cpus) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {} // ended meanwhile
            Err(e) => panic!(
                "cannot pin thread {tid} of {pid} to CPUs {cpus:?} (the bench needs two): {e}"
            ),
        }
    }
}

/// Inter-processor interrupts `cpu` has taken since boot: rescheduling,
/// function-call and TLB-shootdown (`RES`, `CAL`, `TLB` in
/// `/proc/interrupts`). Each one taken while the vCPU runs interrupts the
/// guest.
fn ipis(cpu: usize) -> u64 {
    let text = std::fs::read_to_string("/proc/interrupts")
        .unwrap_or_else(|e| panic!("cannot read /proc/interrupts: {e}"));
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?;
            ["RES:", "CAL:", "TLB:"].contains(&name).then_some(())?;
            f.nth(cpu)?.parse::<u64>().ok()
        })
        .sum()
}

/// What runs on the other CPU in a phase of the interference table.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// Nothing.
    Idle,
    /// An integer loop in registers: a busy core, no memory traffic.
    Spin,
    /// Non-temporal copies between two 64 MiB buffers (more than the
    /// last-level cache), this many MB a second in 5 ms slices (0: flat
    /// out), as the replication pipeline's copies are.
    Copy(u64),
    /// Page copies (the pipeline's, `copy::copy`) between two 256 KiB
    /// buffers, flat out: the core's load and store units busy, the data in
    /// its own cache, no traffic to memory.
    CachedCopy,
    /// Page hashes (the pipeline's, XXH3-128) over a 256 KiB buffer, flat
    /// out: vector arithmetic, the data in the core's own cache.
    CachedHash,
}

impl Load {
    fn name(self) -> String {
        match self {
            Self::Idle => "nothing".into(),
            Self::Spin => "an integer loop (a busy core, no memory traffic)".into(),
            Self::Copy(0) => "non-temporal copies, flat out".into(),
            Self::Copy(mb) => format!("non-temporal copies, {:.1} GB/s", mb as f64 / 1e3),
            Self::CachedCopy => "page copies in the core's cache, flat out".into(),
            Self::CachedHash => "page hashes in the core's cache, flat out".into(),
        }
    }
}

/// The interference table's loads, in the order each cycle runs them.
const LOADS: [Load; 7] = [
    Load::Idle,
    Load::Spin,
    Load::Copy(500),
    Load::Copy(1500),
    Load::Copy(0),
    Load::CachedCopy,
    Load::CachedHash,
];
/// Cycles through [`LOADS`], and how long each load runs in a cycle.
const CYCLES: usize = 8;
const PHASE: Duration = Duration::from_secs(1);
/// The CPUs of the interference table: the guest's vCPU, everything else.
const VCPU_CPU: usize = 1;
const LOAD_CPU: usize = 0;

/// A thread on [`LOAD_CPU`] running `LOADS[mode]` until `stop`; adds the
/// bytes it copies or hashes to `copied`.
fn load_thread(
    mode: Arc<std::sync::atomic::AtomicUsize>,
    copied: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use understudy_checkpoint::copy::{copy, streaming};
    use understudy_checkpoint::page::page_hash;
    const BUF: usize = 64 << 20;
    const CACHED: usize = 256 << 10;
    const PIECE: usize = 64 << 10;
    const SLICE: Duration = Duration::from_millis(5);
    std::thread::spawn(move || {
        if let Err(e) = set_affinity(0, &[LOAD_CPU]) {
            panic!("cannot pin the load to CPU {LOAD_CPU}: {e}");
        }
        let src = vec![0x5au8; BUF];
        let mut dst = vec![0u8; BUF];
        let (mut at, mut x) = (0, 0x9e37_79b9_7f4a_7c15u64);
        while !stop.load(Ordering::Relaxed) {
            let slice_end = std::time::Instant::now() + SLICE;
            match LOADS[mode.load(Ordering::Relaxed)] {
                Load::Idle => std::thread::sleep(SLICE),
                Load::Spin => {
                    while std::time::Instant::now() < slice_end {
                        for _ in 0..10_000 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                        }
                        x = std::hint::black_box(x);
                    }
                }
                Load::Copy(mb_per_s) => {
                    let budget = match mb_per_s {
                        0 => usize::MAX,
                        mb => mb as usize * 1_000_000 / 1000 * SLICE.as_millis() as usize,
                    };
                    let mut done = 0;
                    while done < budget && std::time::Instant::now() < slice_end {
                        streaming(&mut dst[at..at + PIECE], &src[at..at + PIECE]);
                        at = (at + PIECE) % BUF;
                        done += PIECE;
                    }
                    copied.fetch_add(done as u64, Ordering::Relaxed);
                    std::thread::sleep(
                        slice_end.saturating_duration_since(std::time::Instant::now()),
                    );
                }
                Load::CachedCopy => {
                    let mut done = 0;
                    while std::time::Instant::now() < slice_end {
                        for (d, s) in dst[..CACHED]
                            .chunks_mut(4096)
                            .zip(src[..CACHED].chunks(4096))
                        {
                            copy(d, s);
                        }
                        done += CACHED;
                    }
                    copied.fetch_add(done as u64, Ordering::Relaxed);
                }
                Load::CachedHash => {
                    let mut done = 0;
                    while std::time::Instant::now() < slice_end {
                        for page in src[..CACHED].chunks(4096) {
                            x ^= std::hint::black_box(page_hash(page)) as u64;
                        }
                        done += CACHED;
                    }
                    copied.fetch_add(done as u64, Ordering::Relaxed);
                }
            }
        }
    })
}

/// One row of the interference table per load: the guest alone (no
/// backup) with its vCPU pinned to [`VCPU_CPU`] and the load on
/// [`LOAD_CPU`], the loads taking turns in phases of one run, so every
/// phase is compared with the same VM's idle phases around it (runs of
/// their own moved by more than the effect). Per load: the work a second
/// on a core ÷ the idle phases' (median over cycles, range), the vCPU's
/// share on a core, the bytes copied a second and the IPIs a second on the
/// vCPU's CPU (medians).
async fn interference() -> Vec<(Load, (f64, f64, f64), f64, f64, f64)> {
    let (_dir, pair) = started_pair(0, Protection::Unprotected).await;
    let pid = pair.pid(Role::Primary).unwrap();
    pin_threads(pid, &[VCPU_CPU], &[LOAD_CPU]);
    let mode = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let copied = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thread = load_thread(mode.clone(), copied.clone(), stop.clone());
    let mut client = ResumingClient::connect(pair.addrs.primary_console, 0)
        .await
        .unwrap();
    let mut partial = Vec::new();
    // Work a second on a core, vCPU share, GB/s, IPIs/s: per cycle, per load.
    let mut phases = vec![vec![[f64::NAN; 4]; LOADS.len()]; CYCLES];
    // One phase to settle (the guest's first seconds, the load's buffers).
    read_lines(&mut client, &mut partial, PHASE, |_, _| {}).await;
    for cycle in &mut phases {
        for (k, slot) in cycle.iter_mut().enumerate() {
            mode.store(k, Ordering::Relaxed);
            // The first 100 ms: the load switching, lines of the phase before.
            read_lines(&mut client, &mut partial, PHASE / 10, |_, _| {}).await;
            let (times_0, copied_0, ipis_0, t0) = (
                ThreadTimes::of(pid),
                copied.load(Ordering::Relaxed),
                ipis(VCPU_CPU),
                std::time::Instant::now(),
            );
            let rate = work_rate(&mut client, &mut partial, PHASE)
                .await
                .unwrap_or(f64::NAN);
            let wall = t0.elapsed().as_secs_f64();
            let on_core = ThreadTimes::of(pid).since(&times_0, "vcpu").0 / wall;
            let gbs = (copied.load(Ordering::Relaxed) - copied_0) as f64 / wall / 1e9;
            let ipis = (ipis(VCPU_CPU) - ipis_0) as f64 / wall;
            *slot = [rate / on_core, on_core, gbs, ipis];
        }
    }
    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();
    drop(pair);
    (0..LOADS.len())
        .map(|k| {
            // Each phase against the mean of its cycle's idle phase and the
            // next cycle's (the last cycle: its own).
            let mut ratios: Vec<f64> = (0..CYCLES)
                .map(|c| {
                    let idle = (phases[c][0][0] + phases[(c + 1).min(CYCLES - 1)][0][0]) / 2.0;
                    phases[c][k][0] / idle
                })
                .collect();
            let median =
                |i: usize| spread(&mut phases.iter().map(|p| p[k][i]).collect::<Vec<_>>()).0;
            (
                LOADS[k],
                spread(&mut ratios),
                median(1),
                median(2),
                median(3),
            )
        })
        .collect()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The guest alone: the same daemon, the same guest and the same way of
    // counting its work (its own report lines), with no backup. (An earlier
    // baseline ran the guest in this process and divided its work counter by
    // wall time: a different process and a different clock than the
    // protected runs had.)
    let alone = |rate| runtime.block_on(pair_rate(rate, Protection::Unprotected));
    let intervals = [10u64, 25, 50, 100];
    let mut report = Report::new(
        "slowdown",
        "Guest slowdown under protection",
        "cargo bench -p understudy --bench slowdown",
    );
    let mut table = Table::new(
        "dirtier work rate with protection ÷ without (the same daemon, no backup), by epoch \
         interval and in replay mode, same run (2048-page working set, 64 MiB guest); max lag \
         = most checkpoint epochs in flight (sent, not acked); in replay mode the backup's \
         replica shares the two cores with the guest it follows",
        &[
            "dirty rate",
            "unprotected pages/s",
            "10 ms",
            "25 ms",
            "50 ms",
            "100 ms",
            "replay mode",
            "max lag (epochs)",
        ],
    );
    let mut series = Vec::new();
    let mut light_25 = f64::NAN;
    let mut heavy_lag = 0;
    for (name, rate) in [
        ("light (1k pages/s)", 1_000u64),
        ("medium (10k pages/s)", 10_000),
        ("heavy (flat out)", 0),
    ]
    .into_iter()
    .filter(|_| part("intervals"))
    {
        let alone = alone(rate).rate;
        let mut row = vec![name.into(), num(alone, 0)];
        let mut points = Vec::new();
        let mut max_lag = 0;
        for epoch_ms in intervals {
            let PairRun {
                rate: protected,
                max_lag: lag,
                ..
            } = runtime.block_on(pair_rate(rate, Protection::Epochs(epoch_ms)));
            let ratio = protected / alone;
            row.push(num(ratio, 3));
            points.push((epoch_ms as f64, ratio));
            max_lag = max_lag.max(lag);
            if rate == 1_000 && epoch_ms == 25 {
                light_25 = ratio;
            }
        }
        let replayed = runtime.block_on(pair_rate(rate, Protection::Replay)).rate;
        row.push(num(replayed / alone, 3));
        if rate == 0 {
            heavy_lag = max_lag;
        }
        row.push(num(max_lag as f64, 0));
        table.row(row);
        series.push(Series {
            name: name.into(),
            points,
            points_only: false,
        });
    }
    report.table(table);
    report.chart(Chart {
        name: "slowdown-vs-epoch".into(),
        title: "Guest work rate with protection ÷ without, by epoch interval".into(),
        x_label: "epoch interval (ms)".into(),
        y_label: "work rate ratio".into(),
        log_x: false,
        log_y: false,
        series,
    });
    // The heavy dirtier with its pages copied after the resume (the
    // default) and inside the stop, taking turns in the same run, each run
    // between two runs of the guest alone (this machine's rate moves between
    // seconds by more than the effect measured).
    let mut table = Table::new(
        format!(
            "heavy dirtier (flat out, 2048-page working set): pages copied after the resume \
             (write-protected until copied, the default) against inside the stop, same run; \
             each ratio is a protected run ÷ the mean of the runs of the guest alone (the same \
             daemon, no backup) right before and after it, median of {HEAVY_TURNS} turns (range in brackets); stop = the \
             primary's median guest stop; stolen = CPU time the hypervisor under this machine \
             took while the turns ran (median and range over the runs); alone moved = how much \
             the guest alone's rate changed between the two runs around a protected run \
             (median): the noise floor of one ratio"
        ),
        &[
            "epoch interval",
            "ratio, copy after resume",
            "ratio, copy in stop",
            "stop µs, copy after resume",
            "stop µs, copy in stop",
            "stolen",
            "alone moved",
        ],
    );
    let mut heavy_25 = (f64::NAN, f64::NAN);
    // Where the time went in the 25 ms turns: the alone runs, then each mode.
    let mut splits: [Vec<Split>; 3] = Default::default();
    // Each mode's work per second on a core ÷ the alone runs' around it.
    let mut per_core: [Vec<f64>; 2] = Default::default();
    for epoch_ms in [10u64, 25].into_iter().filter(|_| part("heavy")) {
        let (mut after, mut inside) = (Vec::new(), Vec::new());
        let (mut after_stop, mut inside_stop) = (Vec::new(), Vec::new());
        let mut stolen = Vec::new();
        let mut moved = Vec::new();
        // Every protected run lies between two runs of the guest alone and
        // is divided by their mean: this machine's rate drifts by more than
        // the effect between runs seconds apart, and one run before each
        // protected run counted all of that drift as protection's.
        let mut before = alone(0);
        for _ in 0..HEAVY_TURNS {
            for (k, (protection, ratios, stops)) in [
                (Protection::Epochs(epoch_ms), &mut after, &mut after_stop),
                (
                    Protection::EpochsCopyInStop(epoch_ms),
                    &mut inside,
                    &mut inside_stop,
                ),
            ]
            .into_iter()
            .enumerate()
            {
                let steal = Steal::start();
                let run = runtime.block_on(pair_rate(0, protection));
                let next = alone(0);
                stolen.push(steal.share());
                ratios.push(run.rate / ((before.rate + next.rate) / 2.0));
                stops.push(run.stop);
                moved.push((next.rate / before.rate - 1.0).abs());
                if epoch_ms == 25 {
                    let on_core = |r: &PairRun| r.rate / r.split.vcpu_run;
                    let alone_on_core = (on_core(&before) + on_core(&next)) / 2.0;
                    per_core[k].push(on_core(&run) / alone_on_core);
                    splits[k + 1].push(run.split);
                    splits[0].push(next.split);
                }
                before = next;
            }
        }
        let (steal, steal_lo, steal_hi) = spread(&mut stolen);
        let (after, inside) = (spread(&mut after), spread(&mut inside));
        let (ratio_after, ratio_inside) = (after.0, inside.0);
        let with_range = |(m, lo, hi): (f64, f64, f64)| format!("{m:.3} ({lo:.3}–{hi:.3})");
        table.row(vec![
            format!("{epoch_ms} ms").into(),
            with_range(after).into(),
            with_range(inside).into(),
            num(spread(&mut after_stop).0, 0),
            num(spread(&mut inside_stop).0, 0),
            format!(
                "{:.0} % ({:.0}–{:.0} %)",
                steal * 100.0,
                steal_lo * 100.0,
                steal_hi * 100.0
            )
            .into(),
            format!("{:.1} %", spread(&mut moved).0 * 100.0).into(),
        ]);
        if epoch_ms == 25 {
            heavy_25 = (ratio_after, ratio_inside);
        }
    }
    report.table(table);
    let mut table = Table::new(
        "where the heavy dirtier's wall time goes at 25 ms epochs, the daemons of the turns \
         above (medians over their runs, from the kernel's accounting of each thread while \
         the work was counted): the vCPU thread on a core, runnable but waiting for one, or \
         blocked (in a stop, waiting for a write-protected page to be copied); work per \
         second on a core = the work rate ÷ the vCPU's time on a core, against the alone \
         runs around it; the daemons' other threads in cores (this machine has two)",
        &[
            "run",
            "vCPU on a core",
            "vCPU waiting for a core",
            "vCPU blocked",
            "work per second on a core ÷ alone",
            "primary's other threads",
            "backup",
            "all threads",
        ],
    );
    let pct = |v: f64| format!("{:.1} %", v * 100.0);
    // The copy after the resume's medians, for the target line: the vCPU
    // blocked, waiting for a core, and its work a second on a core ÷ alone.
    let mut heavy_split = (f64::NAN, f64::NAN, f64::NAN);
    for (k, name) in [
        "guest alone (no backup)",
        "copy after resume",
        "copy in stop",
    ]
    .into_iter()
    .enumerate()
    {
        let field =
            |f: fn(&Split) -> f64| spread(&mut splits[k].iter().map(f).collect::<Vec<_>>()).0;
        let all = field(|s| s.vcpu_run + s.primary_rest + s.backup);
        let (wait, blocked) = (field(|s| s.vcpu_wait), field(Split::vcpu_blocked));
        let on_core = match k {
            0 => 1.0,
            _ => spread(&mut per_core[k - 1]).0,
        };
        if k == 1 {
            heavy_split = (blocked, wait, on_core);
        }
        table.row(vec![
            name.into(),
            pct(field(|s| s.vcpu_run)).into(),
            pct(wait).into(),
            pct(blocked).into(),
            num(on_core, 3),
            num(field(|s| s.primary_rest), 2),
            num(field(|s| s.backup), 2),
            num(all, 2),
        ]);
    }
    report.table(table);
    // Where the rest goes: the same guest in this process, no backup,
    // each step of a stop added in turn, in phases of one VM.
    let mut table = Table::new(
        format!(
            "where the heavy dirtier's time goes at 25 ms epochs: the same guest in this \
             process with no backup and nothing shipped, its vCPU pinned to CPU {VCPU_CPU} and \
             the stop loop to CPU {LOAD_CPU}, each step added in turn, the steps taking turns \
             in {PHASE:?} phases of one VM ({CYCLES} cycles); each ÷ the mean of the no-stop \
             phases of its cycle and the next (median, range in brackets)"
        ),
        &[
            "local stop every 25 ms",
            "work a second",
            "work a second on a core",
            "vCPU on a core",
            "IPIs a second on the vCPU's CPU",
        ],
    );
    let epoch = Duration::from_millis(25);
    let steps = [
        ("none (dirty logging on, never harvested)", LocalStop::None),
        (
            "harvest the dirty log only (tracking writes)",
            LocalStop::Harvest,
        ),
        ("+ copy the pages inside the stop", LocalStop::CopyInStop),
        (
            "+ copy the pages after the resume",
            LocalStop::CopyAfterResume,
        ),
    ];
    let stop_kinds: Vec<LocalStop> = steps.iter().map(|s| s.1).collect();
    // The whole loop's work a second on a core (copying after the resume),
    // for the target line.
    let mut local_after = f64::NAN;
    if part("local") {
        let phases = local_phases(&stop_kinds, epoch);
        let ratio = |k: usize, i: usize| {
            let mut r: Vec<f64> = (0..CYCLES)
                .map(|c| {
                    let base = (phases[0][c][i] + phases[0][(c + 1).min(CYCLES - 1)][i]) / 2.0;
                    phases[k][c][i] / base
                })
                .collect();
            spread(&mut r)
        };
        for (k, (name, _)) in steps.iter().enumerate() {
            let with_range = |(m, lo, hi): (f64, f64, f64)| format!("{m:.3} ({lo:.3}–{hi:.3})");
            let (rate, per_core) = (ratio(k, 0), ratio(k, 1));
            let median =
                |i: usize| spread(&mut phases[k].iter().map(|p| p[i]).collect::<Vec<_>>()).0;
            if stop_kinds[k] == LocalStop::CopyAfterResume {
                local_after = per_core.0;
            }
            table.row(vec![
                (*name).into(),
                with_range(rate).into(),
                with_range(per_core).into(),
                pct(median(2)).into(),
                num(median(3), 0),
            ]);
        }
    }
    report.table(table);
    // What another core's work does to the guest's pace, with no
    // protection at all (see `interference`).
    let mut table = Table::new(
        format!(
            "the heavy dirtier alone (no backup), its vCPU pinned to CPU {VCPU_CPU}, while a \
             load from this process runs on CPU {LOAD_CPU}: its work a second on a core ÷ the \
             same VM's with nothing there, the loads taking turns in {PHASE:?} phases of one \
             run ({CYCLES} cycles; median, range in brackets); GB/s = the load's bytes a \
             second (copies: each read and written once; hashes: each read once)"
        ),
        &[
            "on the other CPU",
            "work a second on a core ÷ nothing",
            "vCPU on a core",
            "load GB/s",
            "IPIs a second on the vCPU's CPU",
        ],
    );
    // The flat-out copies' ratio, for the heavy dirtier's target line.
    let mut copy_flat_out = f64::NAN;
    if part("interference") {
        for (load, (median, lo, hi), on_core, gbs, ipis) in runtime.block_on(interference()) {
            if load == Load::Copy(0) {
                copy_flat_out = median;
            }
            table.row(vec![
                load.name().into(),
                format!("{median:.3} ({lo:.3}–{hi:.3})").into(),
                pct(on_core).into(),
                if gbs > 0.0 { num(gbs, 2) } else { "–".into() },
                num(ipis, 0),
            ]);
        }
    }
    report.table(table);
    // A target is reported only by the part that measures it: a part not run
    // measured nothing, and "at most 0 epochs in flight" would read as met.
    if part("heavy") {
        // What the in-process parts found, when they ran with it.
        let without = |value: f64| {
            if value.is_nan() {
                "not run".to_owned()
            } else {
                format!("{value:.3}")
            }
        };
        report.target(
            "guest slowdown, heavy dirtier, 25 ms epochs",
            "ratio ≥ 0.97 (pages copied after the resume)",
            format!(
                "ratio {:.3} (copying inside the stop: {:.3}, same run). Where it goes: the \
                 vCPU off a core {:.1} % of the time (blocked in stops and write-protect waits \
                 {:.1} %, waiting for a core {:.1} %), and {} work a second on a core. \
                 Without the pipeline, work a second on a core ÷ none: the stop loop \
                 copying after the resume in this process {}, flat-out copies on the other \
                 core {}",
                heavy_25.0,
                heavy_25.1,
                (heavy_split.0 + heavy_split.1) * 100.0,
                heavy_split.0 * 100.0,
                heavy_split.1 * 100.0,
                if heavy_split.2 <= 1.0 {
                    format!("{:.1} % less", (1.0 - heavy_split.2) * 100.0)
                } else {
                    format!("{:.1} % more", (heavy_split.2 - 1.0) * 100.0)
                },
                without(local_after),
                without(copy_flat_out),
            ),
            heavy_25.0 >= 0.97,
        );
    }
    if part("intervals") {
        report.target(
            "guest slowdown, light dirty rate, 25 ms epochs",
            "under 10 % (ratio ≥ 0.90)",
            format!("ratio {light_25:.3}"),
            light_25 >= 0.90,
        );
        report.target(
            "replication lag at the highest dirty rate",
            "bounded: at most max_in_flight (4) acked-pending epochs plus the one being sent",
            format!("at most {heavy_lag} epochs in flight"),
            heavy_lag <= 5,
        );
    }
    report.finish().unwrap();
}
