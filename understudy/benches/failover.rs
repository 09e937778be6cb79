//! Failover time over many SIGKILL drills: a local pair protecting the counter
//! guest, the primary killed after a short run, time to the backup's first
//! console byte, split into detection (heartbeat timeout) and resume.
//!
//! Run: `cargo bench -p understudy --bench failover`; `UNDERSTUDY_DRILLS=N`
//! sets the trial count (default 20).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::time::Duration;

use understudy::demo::{DemoOptions, drill};

fn quantiles(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    println!(
        "{name:<44} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
        at(0.5),
        at(0.99),
        v[0],
        at(1.0)
    );
}

fn main() {
    let trials: usize = std::env::var("UNDERSTUDY_DRILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir =
        std::env::temp_dir().join(format!("understudy-bench-failover-{}", std::process::id()));
    let mut reports = Vec::new();
    for i in 0..trials {
        let opts = DemoOptions {
            run_for: Duration::from_millis(700 + 37 * i as u64 % 300),
            after: Duration::from_millis(200),
            dir: Some(dir.clone()),
            verbose: false,
            daemon: Some(env!("CARGO_BIN_EXE_understudyd").into()),
            guest: understudy::demo::DrillGuest::Counter,
            progress: false,
        };
        let r = runtime.block_on(drill(&opts)).unwrap();
        assert!(r.seamless, "drill {i}: console sequence broken");
        reports.push(r);
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{trials} SIGKILL drills, 64 MiB counter guest, default heartbeat settings (10 ms / 100 ms)"
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9}",
        "ms", "p50", "p99", "min", "max"
    );
    let ms = |f: fn(&understudy::demo::DrillReport) -> Duration| {
        reports
            .iter()
            .map(|r| f(r).as_secs_f64() * 1e3)
            .collect::<Vec<_>>()
    };
    quantiles(
        "failover: SIGKILL → backup's first byte",
        ms(|r| r.failover),
    );
    quantiles("  detection: silence before promoting", ms(|r| r.detection));
    quantiles("  resume: promotion → VM running", ms(|r| r.resume));
    quantiles("output gap seen by the client", ms(|r| r.output_gap));
}
