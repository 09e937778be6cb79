//! Failover time over many SIGKILL drills: a local pair protecting the counter
//! guest, the primary killed after a short run, time to the backup's first
//! console byte, split into detection (heartbeat timeout) and resume.
//!
//! Run: `cargo bench -p understudy --bench failover`; `UNDERSTUDY_DRILLS=N`
//! sets the trial count (default 20).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::time::Duration;

use understudy::demo::{DemoOptions, drill};
use understudy_bench::{Chart, Report, Series, Table, num, quantile};

fn quantiles(table: &mut Table, name: &str, v: &[f64]) {
    table.row(vec![
        name.into(),
        num(quantile(v, 0.5), 1),
        num(quantile(v, 0.99), 1),
        num(quantile(v, 0.0), 1),
        num(quantile(v, 1.0), 1),
    ]);
}

/// Sorted samples as a cumulative distribution.
fn cdf(name: &str, v: &[f64]) -> Series {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len() as f64;
    Series {
        name: name.into(),
        points: s
            .into_iter()
            .enumerate()
            .map(|(i, x)| (x, (i + 1) as f64 / n))
            .collect(),
        points_only: false,
    }
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
            kind: understudy::drill::DrillKind::Kill,
            progress: false,
        };
        let r = runtime.block_on(drill(&opts)).unwrap();
        assert!(r.seamless, "drill {i}: console sequence broken");
        reports.push(r);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut report = Report::new(
        "failover",
        "Failover time",
        "cargo bench -p understudy --bench failover",
    );
    let mut table = Table::new(
        format!(
            "{trials} SIGKILL drills: 64 MiB counter guest, default heartbeats (10 ms interval, \
             100 ms timeout); time from SIGKILL of the primary to the backup's first console byte"
        ),
        &["ms", "p50", "p99", "min", "max"],
    );
    let ms = |f: fn(&understudy::demo::DrillReport) -> Duration| {
        reports
            .iter()
            .map(|r| f(r).as_secs_f64() * 1e3)
            .collect::<Vec<_>>()
    };
    let failover = ms(|r| r.failover);
    let detection = ms(|r| r.detection);
    let resume = ms(|r| r.resume);
    quantiles(
        &mut table,
        "failover: SIGKILL → backup's first byte",
        &failover,
    );
    quantiles(
        &mut table,
        "  detection: silence before promoting",
        &detection,
    );
    quantiles(&mut table, "  resume: promotion → VM running", &resume);
    quantiles(
        &mut table,
        "output gap seen by the client",
        &ms(|r| r.output_gap),
    );
    report.table(table);
    report.chart(Chart {
        name: "failover-distribution".into(),
        title: format!("Failover time over {trials} SIGKILL drills (cumulative)"),
        x_label: "ms".into(),
        y_label: "fraction of drills".into(),
        log_x: false,
        log_y: false,
        series: vec![
            cdf("failover (SIGKILL → first byte)", &failover),
            cdf("detection", &detection),
            cdf("resume", &resume),
        ],
    });
    let (p50, p99) = (quantile(&failover, 0.5), quantile(&failover, 0.99));
    report.target(
        "failover median",
        "under 150 ms",
        format!("{p50:.0} ms"),
        p50 < 150.0,
    );
    report.target(
        "failover p99",
        "under 300 ms",
        format!("{p99:.0} ms"),
        p99 < 300.0,
    );
    report.finish().unwrap();
}
