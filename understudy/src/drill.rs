//! `understudyctl drill`: a failover rehearsal on a local pair, reported with
//! the five metrics of the live-migration literature — downtime, disruption
//! time, total sync time, data transferred and performance degradation — as
//! text, JSON and an SVG chart of pause time and dirty pages per checkpoint.
//!
//! The drill protects the `dirtier` guest writing flat out (so the checkpoints
//! carry real work), kills the primary with SIGKILL, and follows its console
//! onto the backup. Degradation compares the guest's work rate under
//! protection with the same guest running unprotected, measured in the same
//! run just before.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use serde::Serialize;
use understudy_vmm::loader::{BOOT_INFO_GPA, BOOT_INFO_WORK_DONE};
use understudy_vmm::{BootOptions, BuiltinBoot, GuestRam, RamBacking, Vm};

use crate::demo::{DemoOptions, DrillGuest, DrillReport, drill};

/// What to rehearse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum DrillKind {
    /// SIGKILL the primary; the backup takes over.
    Kill,
}

/// Options of `understudyctl drill`.
#[derive(Clone, Debug)]
pub struct DrillOptions {
    pub kind: DrillKind,
    pub run_for: Duration,
    pub after: Duration,
    /// Where the report (report.txt, report.json, chart.svg) and logs go.
    pub out: PathBuf,
    pub daemon: Option<PathBuf>,
}

/// The report, as written to report.json.
#[derive(Debug, Serialize)]
pub struct Report {
    pub kind: DrillKind,
    pub guest: DrillGuest,
    /// Downtime: SIGKILL → first console byte from the backup.
    pub downtime_ms: f64,
    pub detection_ms: f64,
    pub resume_ms: f64,
    /// Disruption: SIGKILL → the console back at its normal pace.
    pub disruption_ms: f64,
    /// Total sync time: start → protected (initial sync).
    pub sync_seconds: f64,
    /// Data transferred to the backup, and in how many checkpoints.
    pub data_bytes: u64,
    pub epochs: u64,
    /// Dirty pages of the checkpoints the chart shows (the last ones).
    pub dirty_pages_charted: u64,
    /// Performance degradation: work rate with protection ÷ without.
    pub work_rate_protected: f64,
    pub work_rate_unprotected: f64,
    pub degradation_ratio: f64,
    pub pause_p50_us: f64,
    pub pause_p99_us: f64,
    /// The guest's progress carried on across the failover.
    pub continued: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Pages per second the dirtier (2048-page working set, `rate` pages/s, 0 =
/// flat out) writes with no protection, over `period`.
pub fn unprotected_rate(rate: u64, period: Duration) -> Result<f64> {
    let ram = GuestRam::new(64 << 20, RamBacking::Anonymous)?;
    let boot = BuiltinBoot::dirtier(2048, rate, 50);
    let (vm, _console) = Vm::boot(
        ram,
        &boot.clone(),
        BootOptions {
            boot_record: Some(boot),
            start_paused: false,
            dirty_logging: false,
        },
    )?;
    let work = |vm: &Vm| vm.ram().read_u64(BOOT_INFO_GPA + BOOT_INFO_WORK_DONE);
    std::thread::sleep(Duration::from_millis(200));
    let (w0, t0) = (work(&vm)?, Instant::now());
    std::thread::sleep(period);
    let (w1, t1) = (work(&vm)?, Instant::now());
    vm.stop();
    Ok((w1 - w0) as f64 / (t1 - t0).as_secs_f64())
}

fn analyse(kind: DrillKind, r: &DrillReport, unprotected: f64) -> Report {
    let primary: Vec<&(Duration, u64, bool)> = r.values.iter().filter(|v| !v.2).collect();
    let backup: Vec<&(Duration, u64, bool)> = r.values.iter().filter(|v| v.2).collect();
    let protected = match (primary.first(), primary.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64(),
        _ => 0.0,
    };
    // Normal pace: the median gap between lines before the kill. Disruption
    // ends at the first backup line after which three gaps are normal again.
    let normal = median(
        primary
            .windows(2)
            .map(|w| (w[1].0 - w[0].0).as_secs_f64())
            .collect(),
    );
    let mut back_to_normal = r.values.last().map(|v| v.0).unwrap_or(r.killed_at);
    for (i, v) in backup.iter().enumerate() {
        let next: Vec<f64> = backup[i..]
            .windows(2)
            .take(3)
            .map(|w| (w[1].0 - w[0].0).as_secs_f64())
            .collect();
        if next.len() == 3 && next.iter().all(|g| *g <= normal * 1.5 + 0.005) {
            back_to_normal = v.0;
            break;
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Report {
        kind,
        guest: DrillGuest::Dirtier,
        downtime_ms: ms(r.failover),
        detection_ms: ms(r.detection),
        resume_ms: ms(r.resume),
        disruption_ms: ms(back_to_normal.saturating_sub(r.killed_at)),
        sync_seconds: r.sync_time.as_secs_f64(),
        data_bytes: r.bytes_shipped,
        epochs: r.epochs,
        dirty_pages_charted: r.epoch_samples.iter().map(|s| s.dirty_pages).sum(),
        work_rate_protected: protected,
        work_rate_unprotected: unprotected,
        degradation_ratio: if unprotected > 0.0 {
            protected / unprotected
        } else {
            0.0
        },
        pause_p50_us: r.pause_p50_us,
        pause_p99_us: r.pause_p99_us,
        continued: r.seamless,
    }
}

/// The text form of a report.
pub fn render(r: &Report) -> String {
    format!(
        "drill: {:?} of the primary, {:?} guest\n\
         downtime            {:>10.1} ms   SIGKILL → first console byte from the backup\n\
         \x20 detection         {:>10.1} ms   silence before the backup promoted\n\
         \x20 resume            {:>10.1} ms   promotion → VM running\n\
         disruption          {:>10.1} ms   SIGKILL → console back at its normal pace\n\
         total sync time     {:>10.2} s    start → protected\n\
         data transferred    {:>10.2} MiB  in {} checkpoints\n\
         degradation         {:>10.3}      work rate protected ÷ unprotected ({:.0} ÷ {:.0} pages/s)\n\
         epoch pause         {:>10.0} µs   p50 ({:.0} µs p99)\n\
         guest progress      {}\n",
        r.kind,
        r.guest,
        r.downtime_ms,
        r.detection_ms,
        r.resume_ms,
        r.disruption_ms,
        r.sync_seconds,
        r.data_bytes as f64 / (1 << 20) as f64,
        r.epochs,
        r.degradation_ratio,
        r.work_rate_protected,
        r.work_rate_unprotected,
        r.pause_p50_us,
        r.pause_p99_us,
        if r.continued {
            "carried on across the failover"
        } else {
            "BROKEN across the failover"
        },
    )
}

type PlotResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// One line chart of `ys` over checkpoints.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    unit: &str,
    ys: &[f64],
    color: RGBColor,
) -> PlotResult<()>
where
    DB::ErrorType: 'static,
{
    let max = ys.iter().copied().fold(1.0, f64::max) * 1.1;
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..ys.len().max(2) as f64, 0f64..max)?;
    c.configure_mesh()
        .x_desc("checkpoint")
        .y_desc(unit)
        .draw()?;
    c.draw_series(LineSeries::new(
        ys.iter().enumerate().map(|(i, y)| (i as f64, *y)),
        &color,
    ))?;
    Ok(())
}

/// Draws pause time and dirty pages per checkpoint, one panel each.
fn chart(samples: &[understudy_proto::EpochSample], path: &Path) -> Result<()> {
    let draw = || -> PlotResult<()> {
        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, bottom) = root.split_vertically(280);
        let pauses: Vec<f64> = samples.iter().map(|s| s.pause_micros).collect();
        let dirty: Vec<f64> = samples.iter().map(|s| s.dirty_pages as f64).collect();
        panel(&top, "Epoch pause (guest stopped)", "µs", &pauses, RED)?;
        panel(&bottom, "Dirty pages per checkpoint", "pages", &dirty, BLUE)?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))
}

/// Runs the drill and writes the report.
pub async fn run(opts: DrillOptions) -> Result<Report> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    println!(
        "measuring the guest's unprotected work rate ({:?})…",
        opts.run_for
    );
    let period = opts.run_for;
    let unprotected = tokio::task::spawn_blocking(move || unprotected_rate(0, period)).await??;
    println!("starting a protected pair; initial sync progress:");
    let raw = drill(&DemoOptions {
        run_for: opts.run_for,
        after: opts.after,
        dir: Some(opts.out.join("pair")),
        verbose: false,
        progress: true,
        daemon: opts.daemon.clone(),
        guest: DrillGuest::Dirtier,
    })
    .await?;
    let report = analyse(opts.kind, &raw, unprotected);
    let text = render(&report);
    print!("{text}");
    std::fs::write(opts.out.join("report.txt"), &text)?;
    std::fs::write(
        opts.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    chart(&raw.epoch_samples, &opts.out.join("chart.svg"))?;
    println!(
        "report: {0}/report.txt, {0}/report.json, {0}/chart.svg",
        opts.out.display()
    );
    if !report.continued {
        bail!("the guest did not carry on across the failover");
    }
    Ok(report)
}
