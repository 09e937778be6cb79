//! Microbenchmarks of the microVM's VMM-side costs, on real KVM:
//! pause latency (request → vCPU parked), a whole epoch-style stop
//! (pause → harvest → state capture → resume), state capture alone, and the time
//! to bring a snapshot back to a running guest.
//!
//! Run: `cargo bench -p understudy-vmm --bench vmm`. Prints median, p99 and max.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::time::{Duration, Instant};

use understudy_bench::{Chart, Report, Series, Steal, Table, num, quantile};
use understudy_vmm::memory::RamBacking;
use understudy_vmm::snapshot;
use understudy_vmm::{BootOptions, BuiltinBoot, GuestRam, Vm};

const MEM: usize = 256 << 20;

fn boot(boot: BuiltinBoot) -> (Vm, understudy_vmm::Console) {
    let ram = GuestRam::new(MEM, RamBacking::Anonymous).unwrap();
    ram.advise_huge_pages(); // as a primary's guest RAM
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

/// A row of n, p50, p99 and max in µs.
fn stats_row(table: &mut Table, name: &str, v: &[Duration]) {
    let us: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    table.row(vec![
        name.into(),
        num(us.len() as f64, 0),
        num(quantile(&us, 0.5), 1),
        num(quantile(&us, 0.99), 1),
        num(quantile(&us, 1.0), 1),
    ]);
}

fn stats_table(title: &str) -> Table {
    Table::new(title, &["", "n", "p50 µs", "p99 µs", "max µs"])
}

fn pause_and_epoch(table: &mut Table, label: &str, vm: &Vm, runs: usize) {
    // Let the guest settle into its steady state first.
    std::thread::sleep(Duration::from_millis(200));
    let mut pause = Vec::with_capacity(runs);
    let mut epoch = Vec::with_capacity(runs);
    let mut capture = Vec::with_capacity(runs);
    let mut dirty = 0usize;
    for i in 0..runs {
        std::thread::sleep(Duration::from_millis(2));
        let start = Instant::now();
        // Thirds: a pause alone; a capture asked for while paused; a
        // checkpoint's stop as the replicator takes it (the vCPU thread
        // captures while this one harvests).
        match i % 3 {
            0 => {
                vm.pause().unwrap();
                pause.push(start.elapsed());
            }
            1 => {
                vm.pause().unwrap();
                let captured = Instant::now();
                vm.save_state(false).unwrap();
                capture.push(captured.elapsed());
            }
            _ => {
                vm.pause_saving().unwrap();
                dirty += vm.harvest_dirty().unwrap().count();
                vm.save_state(false).unwrap();
                vm.resume().unwrap();
                epoch.push(start.elapsed());
                continue;
            }
        }
        vm.resume().unwrap();
    }
    stats_row(
        table,
        &format!("{label}: pause (request → vCPU parked)"),
        &pause,
    );
    stats_row(
        table,
        &format!("{label}: state capture while paused"),
        &capture,
    );
    stats_row(
        table,
        &format!(
            "{label}: pause+harvest+capture+resume, {} pages",
            dirty / epoch.len().max(1)
        ),
        &epoch,
    );
}

/// The pause of one checkpoint, step by step, against the true limit of its
/// copy: a plain memcpy of the same dirty pages out of the same guest-RAM
/// mapping (same backing, same page size) into a page-aligned buffer, in
/// the same pause. Which of the
/// two copies goes first alternates from stop to stop, so neither always
/// finds the pages in cache; the baseline's time is left out of the stop's.
fn pause_vs_dirty_set(report: &mut Report) {
    use understudy_vmm::PAGE_SIZE;
    use understudy_vmm::loader::{BOOT_INFO_GPA, BOOT_INFO_WORK_DONE};
    let mut table = Table::new(
        format!(
            "Checkpoint stop (guest paused) vs dirty set: the dirtier writes its working set \
             flat out; medians of {RUNS} stops ({RUNS_AT_1K} at 1k pages); memcpy = the same \
             dirty pages copied out of the same guest-RAM mapping in the same pause (plain \
             memcpy into page-aligned memory, its fastest case; it and the stop's copy take \
             turns going first); the vCPU thread \
             captures its state while the stop harvests and copies, so capture = what is \
             left to wait for after the copy"
        ),
        &[
            "dirty pages",
            "kick µs",
            "harvest µs",
            "copy µs",
            "capture µs",
            "resume µs",
            "total µs",
            "memcpy µs",
            "total ÷ memcpy",
        ],
    );
    let (mut pause_line, mut memcpy_line) = (Vec::new(), Vec::new());
    let mut at_1k: Option<(f64, f64, Vec<f64>, f64)> = None;
    let mut fixed = f64::NAN;
    const MAX_PAGES: usize = 51_000; // working set plus the guest's own few pages
    // The daemon's staging buffer, pre-faulted.
    let mut staging = understudy_vmm::StagingBuffer::new();
    staging.set_len(MAX_PAGES * PAGE_SIZE).unwrap();
    staging.fill(0);
    // The baseline lands page-aligned: glibc's memcpy of a page is `rep
    // movsb`, which is fast there and 10× slower on this CPU with the
    // destination 8 or 16 bytes past the source's alignment, where a large
    // `Vec` starts (`understudy_checkpoint::copy`). So the baseline is
    // memcpy at its best.
    let mut baseline = understudy_vmm::StagingBuffer::new();
    baseline.set_len(MAX_PAGES * PAGE_SIZE).unwrap();
    baseline.fill(0);
    for pages in [0usize, 100, 1_000, 10_000, 50_000] {
        let (vm, _c) = boot(BuiltinBoot::dirtier(pages.max(1) as u64, 0, 1000));
        let work = |vm: &Vm| {
            vm.ram()
                .read_u64(BOOT_INFO_GPA + BOOT_INFO_WORK_DONE)
                .unwrap()
        };
        let mut rows: Vec<[Duration; 6]> = Vec::new();
        let mut copies = Vec::new();
        let runs = if pages == 1_000 { RUNS_AT_1K } else { RUNS };
        let steal = Steal::start();
        for run in 0..runs {
            // Let the guest write its whole working set since the last harvest.
            vm.harvest_dirty().unwrap();
            let target = work(&vm) + pages as u64 + 64;
            while pages > 0 && work(&vm) < target {
                std::thread::sleep(Duration::from_millis(2));
            }
            let t0 = Instant::now();
            vm.pause_saving().unwrap();
            let t1 = Instant::now();
            let dirty = vm.harvest_dirty().unwrap();
            let t2 = Instant::now();
            let ram = vm.ram().host_address() as *const u8;
            let memcpy = |out: &mut [u8]| {
                let t = Instant::now();
                for (i, p) in dirty.iter().enumerate().take(MAX_PAGES) {
                    // SAFETY: `p` is a page of guest RAM (mapped for the VM's
                    // life), `out` holds MAX_PAGES pages, and the vCPU is paused.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            ram.add(p * PAGE_SIZE),
                            out.as_mut_ptr().add(i * PAGE_SIZE),
                            PAGE_SIZE,
                        )
                    };
                }
                t.elapsed()
            };
            let mut base = Duration::ZERO;
            if run % 2 == 1 {
                base = memcpy(&mut baseline);
            }
            let t2b = Instant::now();
            for (i, p) in dirty.iter().enumerate().take(MAX_PAGES) {
                let page: &mut [u8; PAGE_SIZE] = (&mut staging[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
                    .try_into()
                    .unwrap();
                vm.ram().copy_page(p, page).unwrap();
            }
            let t3 = Instant::now();
            if run % 2 == 0 {
                base = memcpy(&mut baseline);
            }
            let t3b = Instant::now();
            vm.save_state(false).unwrap();
            let t4 = Instant::now();
            vm.resume().unwrap();
            let t5 = Instant::now();
            rows.push([
                t1 - t0,
                t2 - t1,
                t3 - t2b,
                t4 - t3b,
                t5 - t4,
                (t5 - t0) - base,
            ]);
            copies.push(base);
            std::hint::black_box((&staging, &baseline));
        }
        vm.stop();
        let med = |k: usize| {
            let mut v: Vec<Duration> = rows.iter().map(|r| r[k]).collect();
            v.sort();
            v[v.len() / 2].as_secs_f64() * 1e6
        };
        copies.sort();
        let memcpy = copies[copies.len() / 2].as_secs_f64() * 1e6;
        table.row(vec![
            num(pages as f64, 0),
            num(med(0), 1),
            num(med(1), 1),
            num(med(2), 1),
            num(med(3), 1),
            num(med(4), 1),
            num(med(5), 1),
            num(memcpy, 1),
            num(
                if memcpy > 1.0 {
                    med(5) / memcpy
                } else {
                    f64::NAN
                },
                2,
            ),
        ]);
        if pages == 0 {
            fixed = med(5);
        } else {
            pause_line.push((pages as f64, med(5)));
            memcpy_line.push((pages as f64, memcpy));
        }
        if pages == 1_000 {
            let totals = rows.iter().map(|r| r[5].as_secs_f64() * 1e6).collect();
            at_1k = Some((med(5), memcpy, totals, steal.share()));
        }
    }
    report.table(table);
    report.chart(Chart {
        name: "pause-vs-dirty".into(),
        title: "Checkpoint stop vs dirty pages (median), with memcpy of the same pages".into(),
        x_label: "dirty pages".into(),
        y_label: "µs".into(),
        log_x: true,
        log_y: true,
        series: vec![
            Series {
                name: "checkpoint stop (guest paused)".into(),
                points: pause_line,
                points_only: false,
            },
            Series {
                name: "memcpy of the same pages".into(),
                points: memcpy_line,
                points_only: false,
            },
        ],
    });
    report.target(
        "fixed cost of a stop",
        "under 0.5 ms (stop with 0 dirty pages)",
        format!("{fixed:.0} µs"),
        fixed < 500.0,
    );
    if let Some((median, memcpy, totals, stolen)) = at_1k {
        report.target(
            "stop at 1k dirty pages",
            "within 3× same-run memcpy + fixed cost",
            format!(
                "{median:.0} µs = {fixed:.0} µs fixed + {:.1}× memcpy ({memcpy:.0} µs)",
                (median - fixed) / memcpy
            ),
            median - fixed <= 3.0 * memcpy,
        );
        let p99 = quantile(&totals, 0.99);
        report.target(
            "stop at 1k dirty pages, p99",
            "never over 2 ms",
            format!(
                "p99 {p99:.0} µs, max {:.0} µs over {} stops (memcpy of the same pages in the \
                 same pause, median: {memcpy:.0} µs, {:.2} µs a page; the hypervisor under this \
                 machine took {:.1} % of its CPU meanwhile)",
                quantile(&totals, 1.0),
                totals.len(),
                memcpy / 1000.0,
                stolen * 100.0
            ),
            p99 <= 2000.0,
        );
    }
}

/// The stop with the copy after the resume ([`understudy_vmm::wp`]) against
/// the stop with the copy inside it, taking turns in the same VM. "every
/// other page" protects and copies only alternate pages of the dirty set
/// (gaps of one page, merged into the runs: see `wp::MERGE_GAP_PAGES`).
fn pause_with_copy_after_resume(report: &mut Report) {
    use understudy_vmm::PAGE_SIZE;
    use understudy_vmm::loader::{BOOT_INFO_GPA, BOOT_INFO_WORK_DONE};
    use understudy_vmm::wp::WriteProtectCopy;
    let mut table = Table::new(
        format!(
            "Checkpoint stop with the copy after the resume (dirty pages write-protected in the \
             stop, copied while the guest runs) against the copy inside the stop, alternating \
             in the same VM; the dirtier writes its working set flat out; medians of {RUNS_WP} \
             stops each"
        ),
        &[
            "dirty pages",
            "layout",
            "requests",
            "protect µs",
            "stop µs (copy after)",
            "stop µs (copy inside)",
            "after ÷ inside",
            "copy after resume µs",
            "writes waiting per stop",
        ],
    );
    let mut at_10k = None;
    for pages in [100usize, 1_000, 10_000, 50_000] {
        let (vm, _c) = boot(BuiltinBoot::dirtier(pages as u64, 0, 1000));
        let wp = WriteProtectCopy::new(vm.ram()).unwrap();
        let mut staging = understudy_vmm::StagingBuffer::new();
        staging.set_len((pages + 1000) * PAGE_SIZE).unwrap();
        staging.fill(0);
        let work = |vm: &Vm| {
            vm.ram()
                .read_u64(BOOT_INFO_GPA + BOOT_INFO_WORK_DONE)
                .unwrap()
        };
        for alternate in [false, true] {
            let (mut protect, mut after_stop, mut inside_stop, mut copy, mut faults) =
                (vec![], vec![], vec![], vec![], 0usize);
            let mut runs = 0;
            for run in 0..RUNS_WP * 2 {
                vm.harvest_dirty().unwrap();
                let target = work(&vm) + pages as u64 + 64;
                while work(&vm) < target {
                    std::thread::sleep(Duration::from_millis(2));
                }
                let t0 = Instant::now();
                vm.pause_saving().unwrap();
                let dirty: Vec<u32> = vm
                    .harvest_dirty()
                    .unwrap()
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !alternate || i % 2 == 0)
                    .map(|(_, p)| p as u32)
                    .collect();
                if run % 2 == 0 {
                    for (i, &p) in dirty.iter().enumerate() {
                        let page = (&mut staging[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
                            .try_into()
                            .unwrap();
                        vm.ram().copy_page(p as usize, page).unwrap();
                    }
                    vm.save_state(false).unwrap();
                    vm.resume().unwrap();
                    inside_stop.push(t0.elapsed());
                } else {
                    let t1 = Instant::now();
                    let protected = wp.protect(&dirty).unwrap();
                    protect.push(t1.elapsed());
                    runs = protected.requests();
                    vm.save_state(false).unwrap();
                    vm.resume().unwrap();
                    let t2 = Instant::now();
                    after_stop.push(t2 - t0);
                    let r = protected.copy(vm.ram(), &mut staging).unwrap();
                    copy.push(t2.elapsed());
                    faults += r.faults;
                }
                std::hint::black_box(&staging);
            }
            let med = |v: &mut Vec<Duration>| {
                v.sort();
                v[v.len() / 2].as_secs_f64() * 1e6
            };
            let (after, inside) = (med(&mut after_stop), med(&mut inside_stop));
            table.row(vec![
                num(pages as f64, 0),
                if alternate {
                    "every other page"
                } else {
                    "as written"
                }
                .into(),
                num(runs as f64, 0),
                num(med(&mut protect), 1),
                num(after, 1),
                num(inside, 1),
                num(after / inside, 2),
                num(med(&mut copy), 1),
                num(faults as f64 / RUNS_WP as f64, 1),
            ]);
            if pages == 10_000 && !alternate {
                at_10k = Some((after, inside));
            }
        }
        drop(wp);
        vm.stop();
    }
    report.table(table);
    if let Some((after, inside)) = at_10k {
        report.target(
            "stop at 10k dirty pages",
            "under 1 ms (copying after the resume)",
            format!("{after:.0} µs (copying inside the stop: {inside:.0} µs, same run)"),
            after < 1000.0,
        );
    }
}

/// Stops per mode in the copy-after-resume table.
const RUNS_WP: usize = 15;

/// Stops per dirty-set size (medians), and at 1k pages (for the p99).
const RUNS: usize = 9;
const RUNS_AT_1K: usize = 201;

fn main() {
    if let Err(e) = understudy_vmm::open_kvm() {
        panic!("this benchmark needs /dev/kvm: {e}");
    }
    let mut report = Report::new(
        "vmm",
        "Epoch pause and VMM costs",
        "cargo bench -p understudy-vmm --bench vmm",
    );
    pause_vs_dirty_set(&mut report);
    pause_with_copy_after_resume(&mut report);
    let mut table = stats_table(&format!(
        "VMM costs, {} MiB guest, 1 vCPU; the counter ticks every 1 ms, the dirtier writes a \
         4096-page set flat out",
        MEM >> 20
    ));

    let (vm, _c) = boot(BuiltinBoot::counter(1));
    pause_and_epoch(&mut table, "counter (idle)", &vm, 1000);
    vm.stop();

    let (vm, _c) = boot(BuiltinBoot::dirtier(4096, 0, 1000));
    pause_and_epoch(&mut table, "dirtier (busy)", &vm, 1000);
    vm.stop();
    report.table(table);

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
    let mut table = stats_table("Restore of a 256 MiB snapshot (RAM file mapped MAP_PRIVATE)");
    stats_row(
        &mut table,
        "read + verify snapshot (decode, RAM CRC-32C)",
        &read,
    );
    stats_row(
        &mut table,
        "map RAM, create VM, restore state → vCPU running",
        &start_vm,
    );
    stats_row(
        &mut table,
        "map RAM → first guest console byte",
        &first_byte,
    );
    report.table(table);
    let _ = std::fs::remove_dir_all(&dir);
    report.finish().unwrap();
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("understudy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
