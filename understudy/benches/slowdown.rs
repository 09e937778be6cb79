//! Guest slowdown under protection: the `dirtier` guest's work rate (pages
//! written per second) with protection ÷ without, for epoch intervals of 10,
//! 25, 50 and 100 ms and a light (1k pages/s), medium (10k pages/s) and heavy
//! (flat out) dirty rate. Both rates are measured in the same run.
//!
//! Run: `cargo bench -p understudy --bench slowdown`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use understudy_bench::{Chart, Report, Series, Table, num};
use understudy_common::console::ResumingClient;

const MEASURE: Duration = Duration::from_secs(2);

fn free() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Work rate of the dirtier on a protected pair with `epoch_ms` epochs, and
/// the largest replication lag (epochs sent, not yet acked) seen meanwhile.
async fn protected_rate(rate: u64, epoch_ms: u64) -> (f64, u64) {
    let daemon = env!("CARGO_BIN_EXE_understudyd");
    let dir = tempfile::tempdir().unwrap();
    let (pc, pk, rep, bc, bk) = (free(), free(), free(), free(), free());
    let config = dir.path().join("vm.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"slow\"\nguest = \"dirtier\"\nmemory_mib = 64\nstate_dir = \"{}\"\nepoch_interval = \"{epoch_ms}ms\"\n\
             guest_params = {{ working_set = 2048, dirty_rate = {rate}, report_ms = 50 }}\n\
             [primary]\nconsole = \"{pc}\"\ncontrol = \"{pk}\"\n[backup]\nreplication = \"{rep}\"\nconsole = \"{bc}\"\ncontrol = \"{bk}\"\n\
             [tls]\ninsecure = true\n",
            dir.path().join("p").display()
        ),
    )
    .unwrap();
    let spawn = |role: &str, extra: &[String]| {
        Command::new(daemon)
            .arg(role)
            .arg("--config")
            .arg(&config)
            .args(extra.iter().flat_map(|e| ["--set".to_string(), e.clone()]))
            .env("UNDERSTUDY_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut backup = spawn(
        "backup",
        &[format!(
            "state_dir={:?}",
            dir.path().join("b").display().to_string()
        )],
    );
    let mut primary = spawn("primary", &[]);
    // Wait for protection, then read "work N" lines for MEASURE.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "not protected");
        if let Ok(s) = understudy::remote::fetch_status(pk, None).await
            && s.protected
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lag_watch = tokio::spawn(async move {
        let mut max = 0;
        loop {
            if let Ok(s) = understudy::remote::fetch_status(pk, None).await {
                max = max.max(s.replication_lag_epochs);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            if !lag_watching() {
                return max;
            }
        }
    });
    let mut client = ResumingClient::connect(pc, 0).await.unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    // Output commit releases lines in per-epoch batches, so arrival times are
    // off by up to an epoch; the guest prints every 50 ms of its own (PIT)
    // time, so count lines for time instead.
    let mut first: Option<(Instant, u64)> = None;
    let mut last = None;
    let mut lines = 0u64;
    let end = tokio::time::Instant::now() + MEASURE + Duration::from_millis(300);
    while let Ok(Ok(n)) = tokio::time::timeout_at(end, client.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
        while let Some(i) = text.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = text.drain(..=i).collect();
            if let Some(v) = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| l.trim().strip_prefix("work ")?.parse::<u64>().ok())
            {
                let now = Instant::now();
                first.get_or_insert((now, v));
                last = Some((now, v));
                lines += 1;
            }
        }
        if first.is_some_and(|(t, _)| t.elapsed() > MEASURE) {
            break;
        }
    }
    LAG_WATCH.store(false, std::sync::atomic::Ordering::Release);
    let max_lag = lag_watch.await.unwrap();
    LAG_WATCH.store(true, std::sync::atomic::Ordering::Release);
    let _ = primary.kill();
    let _ = backup.kill();
    let _ = primary.wait();
    let _ = backup.wait();
    let rate = match (first, last) {
        (Some((_, v0)), Some((_, v1))) if lines > 1 => {
            (v1 - v0) as f64 / ((lines - 1) as f64 * 0.05)
        }
        _ => 0.0,
    };
    (rate, max_lag)
}

static LAG_WATCH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

fn lag_watching() -> bool {
    LAG_WATCH.load(std::sync::atomic::Ordering::Acquire)
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
        "dirtier work rate with protection ÷ without, by epoch interval, same run \
         (2048-page working set, 64 MiB guest); max lag = most epochs in flight (sent, not acked)",
        &[
            "dirty rate",
            "unprotected pages/s",
            "10 ms",
            "25 ms",
            "50 ms",
            "100 ms",
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
            let (protected, lag) = runtime.block_on(protected_rate(rate, epoch_ms));
            let ratio = protected / alone;
            row.push(num(ratio, 3));
            points.push((epoch_ms as f64, ratio));
            max_lag = max_lag.max(lag);
            if rate == 1_000 && epoch_ms == 25 {
                light_25 = ratio;
            }
        }
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
