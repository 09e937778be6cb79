//! Microbenchmarks of the microVM's VMM-side costs, on real KVM:
//! pause latency (request → vCPU parked), a whole epoch-style stop
//! (pause → harvest → state capture → resume), state capture alone, and the time
//! to bring a snapshot back to a running guest.
//!
//! Run: `cargo bench -p understudy-vmm --bench vmm`. Prints median, p99 and max.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::time::{Duration, Instant};

use understudy_vmm::memory::RamBacking;
use understudy_vmm::snapshot;
use understudy_vmm::{BootOptions, BuiltinBoot, GuestRam, Vm};

const MEM: usize = 256 << 20;

fn boot(boot: BuiltinBoot) -> (Vm, understudy_vmm::Console) {
    let ram = GuestRam::new(MEM, RamBacking::Anonymous).unwrap();
    Vm::boot(
        ram,
        &boot.clone(),
        BootOptions {
            boot_record: Some(boot),
            start_paused: false,
            dirty_logging: true,
        },
    )
    .unwrap()
}

struct Stats(Vec<Duration>);

impl Stats {
    fn row(mut self, name: &str) {
        self.0.sort();
        let n = self.0.len();
        let at = |q: f64| self.0[((n as f64 * q) as usize).min(n - 1)].as_secs_f64() * 1e6;
        println!(
            "{name:<58} {n:>6} {:>10.1} {:>10.1} {:>10.1}",
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
}

fn header(title: &str) {
    println!("\n{title}");
    println!(
        "{:<58} {:>6} {:>10} {:>10} {:>10}",
        "", "n", "p50 µs", "p99 µs", "max µs"
    );
}

fn pause_and_epoch(label: &str, vm: &Vm, runs: usize) {
    // Let the guest settle into its steady state first.
    std::thread::sleep(Duration::from_millis(200));
    let mut pause = Vec::with_capacity(runs);
    let mut epoch = Vec::with_capacity(runs);
    let mut capture = Vec::with_capacity(runs);
    let mut dirty = 0usize;
    for i in 0..runs {
        std::thread::sleep(Duration::from_millis(2));
        let start = Instant::now();
        vm.pause().unwrap();
        let paused = start.elapsed();
        if i % 2 == 0 {
            pause.push(paused);
            vm.resume().unwrap();
            continue;
        }
        dirty += vm.harvest_dirty().unwrap().count();
        let captured = Instant::now();
        vm.save_state(false).unwrap();
        capture.push(captured.elapsed());
        vm.resume().unwrap();
        epoch.push(start.elapsed());
    }
    Stats(pause).row(&format!("{label}: pause (request → vCPU parked)"));
    Stats(capture).row(&format!("{label}: state capture while paused"));
    Stats(epoch).row(&format!(
        "{label}: pause+harvest+capture+resume, {} pages",
        dirty / (runs / 2)
    ));
}

/// The pause of one checkpoint, step by step, against a memcpy of the same
/// scattered pages from ordinary memory in the same run.
fn pause_vs_dirty_set() {
    use understudy_vmm::PAGE_SIZE;
    use understudy_vmm::loader::{BOOT_INFO_GPA, BOOT_INFO_WORK_DONE};
    println!(
        "\ncheckpoint stop vs dirty set (dirtier writes its working set flat out; medians of 9)"
    );
    println!(
        "{:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8}",
        "pages",
        "kick µs",
        "harvest",
        "copy",
        "capture",
        "resume",
        "total µs",
        "memcpy µs",
        "÷ memcpy"
    );
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let source = vec![1u8; MEM];
    const MAX_PAGES: usize = 51_000; // working set plus the guest's own few pages
    let mut staging = vec![0u8; MAX_PAGES * PAGE_SIZE]; // pre-faulted below
    staging.fill(0);
    for pages in [0usize, 100, 1_000, 10_000, 50_000] {
        let (vm, _c) = boot(BuiltinBoot::dirtier(pages.max(1) as u64, 0, 1000));
        let work = |vm: &Vm| {
            vm.ram()
                .read_u64(BOOT_INFO_GPA + BOOT_INFO_WORK_DONE)
                .unwrap()
        };
        let mut rows: Vec<[Duration; 6]> = Vec::new();
        let mut copies = Vec::new();
        for _ in 0..9 {
            // Let the guest write its whole working set since the last harvest.
            vm.harvest_dirty().unwrap();
            let target = work(&vm) + pages as u64 + 64;
            while pages > 0 && work(&vm) < target {
                std::thread::sleep(Duration::from_millis(2));
            }
            let t0 = Instant::now();
            vm.pause().unwrap();
            let t1 = Instant::now();
            let dirty = vm.harvest_dirty().unwrap();
            let t2 = Instant::now();
            for (i, p) in dirty.iter().enumerate().take(MAX_PAGES) {
                let page: &mut [u8; PAGE_SIZE] = (&mut staging[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
                    .try_into()
                    .unwrap();
                vm.ram().copy_page(p, page).unwrap();
            }
            let t3 = Instant::now();
            vm.save_state(false).unwrap();
            let t4 = Instant::now();
            vm.resume().unwrap();
            let t5 = Instant::now();
            rows.push([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0]);
            // Baseline: the same number of scattered 4 KiB pages, plain memcpy.
            let n = dirty.count().min(MAX_PAGES);
            let t = Instant::now();
            for i in 0..n {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let src = (rng as usize % (MEM / PAGE_SIZE)) * PAGE_SIZE;
                staging[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                    .copy_from_slice(&source[src..src + PAGE_SIZE]);
            }
            copies.push(t.elapsed());
            std::hint::black_box(&staging);
        }
        vm.stop();
        let med = |k: usize| {
            let mut v: Vec<Duration> = rows.iter().map(|r| r[k]).collect();
            v.sort();
            v[v.len() / 2].as_secs_f64() * 1e6
        };
        copies.sort();
        let memcpy = copies[copies.len() / 2].as_secs_f64() * 1e6;
        println!(
            "{pages:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>10.1} {:>8}",
            med(0),
            med(1),
            med(2),
            med(3),
            med(4),
            med(5),
            memcpy,
            if memcpy > 1.0 {
                format!("{:.1}", med(5) / memcpy)
            } else {
                "-".into()
            }
        );
    }
}

fn main() {
    if let Err(e) = understudy_vmm::open_kvm() {
        panic!("this benchmark needs /dev/kvm: {e}");
    }
    pause_vs_dirty_set();
    header(&format!(
        "VMM costs, {} MiB guest, 1 vCPU; counter ticks every 1 ms, dirtier writes a 4096-page set flat out",
        MEM >> 20
    ));

    let (vm, _c) = boot(BuiltinBoot::counter(1));
    pause_and_epoch("counter (idle)", &vm, 1000);
    vm.stop();

    let (vm, _c) = boot(BuiltinBoot::dirtier(4096, 0, 1000));
    pause_and_epoch("dirtier (busy)", &vm, 1000);
    vm.stop();

    // Restore: snapshot a counter printing every millisecond, then time
    // (a) reading + verifying the snapshot files, (b) creating the VM from the
    // mapped RAM until the vCPU runs, (c) until the guest's first console byte.
    let dir = tempfile_dir();
    let (vm, console) = boot(BuiltinBoot::counter(1));
    console
        .output
        .recv_timeout(Duration::from_secs(10))
        .unwrap();
    vm.pause().unwrap();
    snapshot::write_snapshot(&vm, &dir).unwrap();
    vm.stop();
    let (mut read, mut start_vm, mut first_byte) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..30 {
        let t0 = Instant::now();
        let (state, file) = snapshot::read_snapshot(&dir).unwrap();
        let t1 = Instant::now();
        let ram = GuestRam::new(MEM, RamBacking::PrivateFile(file)).unwrap();
        let (vm, console) = Vm::restore(&state, ram, false).unwrap();
        let t2 = Instant::now();
        console
            .output
            .recv_timeout(Duration::from_secs(10))
            .unwrap();
        let t3 = Instant::now();
        vm.stop();
        read.push(t1 - t0);
        start_vm.push(t2 - t1);
        first_byte.push(t3 - t1);
    }
    header("restore of a 256 MiB snapshot (RAM file mapped MAP_PRIVATE)");
    Stats(read).row("read + verify snapshot (decode, RAM CRC-32C)");
    Stats(start_vm).row("map RAM, create VM, restore state → vCPU running");
    Stats(first_byte).row("map RAM → first guest console byte");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("understudy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
