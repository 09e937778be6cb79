//! Guest slowdown under protection: the `dirtier` guest's work rate (pages
//! written per second) with protection ÷ without, for epoch intervals of 10,
//! 25, 50 and 100 ms and in replay mode (log shipping, a checkpoint every
//! second), at a light (1k pages/s), medium (10k pages/s) and heavy (flat
//! out) dirty rate. Both rates are measured in the same run. Both hosts
//! share this machine's two cores, so in replay mode the backup's replica,
//! which runs the guest a second time, competes with it for CPU.
//!
//! Run: `cargo bench -p understudy --bench slowdown`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use understudy::pair::{LocalPair, read_lines};

use understudy_bench::{Chart, Report, Series, Table, num};
use understudy_common::console::ResumingClient;

const MEASURE: Duration = Duration::from_secs(2);

/// How a pair replicates in one column of the table.
#[derive(Clone, Copy)]
enum Protection {
    /// Checkpoints every this many ms.
    Epochs(u64),
    /// Log shipping, a checkpoint every second.
    Replay,
}

impl Protection {
    fn settings(self) -> String {
        match self {
            Self::Epochs(ms) => format!("epoch_interval = \"{ms}ms\""),
            Self::Replay => "mode = \"replay\"\ncheckpoint_interval = \"1s\"".into(),
        }
    }
}

/// Work rate of the dirtier on a protected pair, and the largest
/// replication lag (epochs sent, not yet acked) seen meanwhile.
async fn protected_rate(rate: u64, protection: Protection) -> (f64, u64) {
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
    // Wait for protection, then read "work N" lines for MEASURE while
    // sampling the lag.
    pair.start_protected(Duration::from_secs(60)).await.unwrap();
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
    // Output commit releases lines in per-epoch batches, so arrival times are
    // off by up to an epoch; the guest prints every 50 ms of its own (PIT)
    // time, so count lines for time instead.
    let mut values = Vec::new();
    read_lines(&mut client, &mut Vec::new(), MEASURE, |line, _| {
        if let Some(v) = line
            .trim()
            .strip_prefix("work ")
            .and_then(|n| n.parse::<u64>().ok())
        {
            values.push(v);
        }
    })
    .await;
    lag_watch.abort();
    drop(pair);
    let rate = match values.as_slice() {
        [first, .., last] => (last - first) as f64 / ((values.len() - 1) as f64 * 0.05),
        _ => 0.0,
    };
    (rate, max_lag.load(Ordering::Relaxed))
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let intervals = [10u64, 25, 50, 100];
    let mut report = Report::new(
        "slowdown",
        "Guest slowdown under protection",
        "cargo bench -p understudy --bench slowdown",
    );
    let mut table = Table::new(
        "dirtier work rate with protection ÷ without, by epoch interval and in replay mode, \
         same run (2048-page working set, 64 MiB guest); max lag = most checkpoint epochs in \
         flight (sent, not acked); in replay mode the backup's replica shares the two cores \
         with the guest it follows",
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
    ] {
        let alone = understudy::drill::unprotected_rate(rate, MEASURE).unwrap();
        let mut row = vec![name.into(), num(alone, 0)];
        let mut points = Vec::new();
        let mut max_lag = 0;
        for epoch_ms in intervals {
            let (protected, lag) =
                runtime.block_on(protected_rate(rate, Protection::Epochs(epoch_ms)));
            let ratio = protected / alone;
            row.push(num(ratio, 3));
            points.push((epoch_ms as f64, ratio));
            max_lag = max_lag.max(lag);
            if rate == 1_000 && epoch_ms == 25 {
                light_25 = ratio;
            }
        }
        let (replayed, _) = runtime.block_on(protected_rate(rate, Protection::Replay));
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
    report.finish().unwrap();
}
