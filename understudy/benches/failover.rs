//! Failover time over many SIGKILL drills: a local pair protecting the counter
//! guest, the primary killed after a short run, time to the backup's first
//! console byte, split into detection (heartbeat timeout) and resume. Then
//! planned switchovers back and forth on one pair: how long the guest stops,
//! the gap a console client sees, and the re-protection sync.
//!
//! Run: `cargo bench -p understudy --bench failover`; `UNDERSTUDY_DRILLS=N`
//! sets the trial count (default 20; half as many switchovers).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::time::Duration;

use std::time::Instant;

use understudy::config::Config;
use understudy::daemon::Role;
use understudy::demo::{DemoOptions, drill};
use understudy::pair::{LocalPair, read_lines};
use understudy_bench::{Chart, Report, Table, cdf, quantile, quantiles};
use understudy_common::console::ResumingClient;

/// One switchover: guest stopped, restore on the other host, the console gap
/// a client saw (last line from the old primary → first from the new), and
/// answer → protected again; all in ms.
struct Swap {
    stopped: f64,
    restore: f64,
    gap: f64,
    reprotect: f64,
}

/// `n` switchovers back and forth on one pair (counter guest, a line every
/// 10 ms), each after the VM is protected again.
async fn switchovers(n: usize) -> Vec<Swap> {
    let dir = std::env::temp_dir().join(format!(
        "understudy-bench-switchover-{}",
        std::process::id()
    ));
    let mut pair = LocalPair::new(
        Some(env!("CARGO_BIN_EXE_understudyd").as_ref()),
        &dir,
        "bench",
        "guest = \"counter\"\nguest_params = { interval_ms = 10 }\nmemory_mib = 64",
    )
    .unwrap();
    pair.start_protected(Duration::from_secs(60)).await.unwrap();
    let config = Config::load(&pair.config, &[]).unwrap();
    let console = |role: Role| match role {
        Role::Primary => pair.addrs.primary_console,
        Role::Backup => pair.addrs.backup_console,
    };
    let mut on = Role::Primary;
    let mut client = ResumingClient::connect(console(on), 0).await.unwrap();
    let mut partial = Vec::new();
    let mut last = Instant::now();
    read_lines(
        &mut client,
        &mut partial,
        Duration::from_millis(300),
        |_, at| last = at,
    )
    .await;
    let mut swaps = Vec::new();
    for _ in 0..n {
        let task = understudy::switchover::spawn(config.clone());
        // The old primary closes the console once its last output is out.
        read_lines(
            &mut client,
            &mut partial,
            Duration::from_secs(10),
            |_, at| last = at,
        )
        .await;
        let last_old = last;
        let offset = client.offset - partial.len() as u64;
        partial.clear();
        on = on.other();
        client = ResumingClient::connect(console(on), offset).await.unwrap();
        let mut first_new = None;
        read_lines(
            &mut client,
            &mut partial,
            Duration::from_millis(300),
            |_, at| {
                first_new.get_or_insert(at);
                last = at;
            },
        )
        .await;
        let outcome = task.await.unwrap().unwrap();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        swaps.push(Swap {
            stopped: outcome.reply.downtime_micros as f64 / 1e3,
            restore: outcome.reply.resume_micros as f64 / 1e3,
            gap: ms(first_new.expect("no output after the switchover") - last_old),
            reprotect: ms(outcome.reprotect_time.unwrap_or_default()),
        });
    }
    drop(pair);
    let _ = std::fs::remove_dir_all(&dir);
    swaps
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
            mode: understudy_common::ids::ReplicationMode::Checkpoint,
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
    let swaps = runtime.block_on(switchovers(trials.div_ceil(2)));
    let mut table = Table::new(
        format!(
            "{} switchovers back and forth on one pair (64 MiB counter guest, a line every \
             10 ms): no heartbeat wait; the old primary syncs as the new backup each time",
            swaps.len()
        ),
        &["ms", "p50", "p99", "min", "max"],
    );
    let col = |f: fn(&Swap) -> f64| swaps.iter().map(f).collect::<Vec<_>>();
    quantiles(
        &mut table,
        "guest stopped: final pause → running there",
        &col(|s| s.stopped),
    );
    quantiles(
        &mut table,
        "  restore on the other host",
        &col(|s| s.restore),
    );
    quantiles(&mut table, "output gap seen by the client", &col(|s| s.gap));
    quantiles(
        &mut table,
        "re-protection: answer → protected again",
        &col(|s| s.reprotect),
    );
    report.table(table);
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
