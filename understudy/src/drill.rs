//! `understudyctl drill`: a failover or switchover rehearsal on a local pair,
//! reported with the five metrics of the live-migration literature —
//! downtime, disruption time, total sync time, data transferred and
//! performance degradation — as text, JSON and an SVG chart of pause time and
//! dirty pages per checkpoint.
//!
//! The drill protects the `dirtier` guest writing flat out (so the checkpoints
//! carry real work), then either kills the primary with SIGKILL or asks it
//! for a planned switchover, and follows its console onto the backup. A
//! switchover drill also waits until the old primary, now the backup, has
//! synced. Degradation compares the guest's work rate under protection with
//! the same guest running unprotected, measured in the same run just before.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use serde::Serialize;
use understudy_vmm::loader::{BOOT_INFO_GPA, BOOT_INFO_WORK_DONE};
use understudy_vmm::{BootOptions, BuiltinBoot, GuestRam, RamBacking, Vm};

use understudy_common::console::ResumingClient;

use crate::demo::{DemoOptions, DrillGuest, DrillReport, drill};
use crate::pair::Follower;

pub use crate::demo::DrillKind;

/// Options of `understudyctl drill`.
#[derive(Clone, Debug)]
pub struct DrillOptions {
    /// Kill or switchover.
    pub kind: DrillKind,
    /// How a local pair replicates (a running pair: as its config says).
    pub mode: understudy_common::ids::ReplicationMode,
    /// How long the VM runs protected before the failure.
    pub run_for: Duration,
    /// How long the backup is watched afterwards.
    pub after: Duration,
    /// Where the report (report.txt, report.json, chart.svg) and logs go.
    pub out: PathBuf,
    /// The `understudyd` binary (default: beside this program).
    pub daemon: Option<PathBuf>,
    /// Drill the running pair this config file describes instead of
    /// starting a local one.
    pub pair: Option<PathBuf>,
}

/// The report, as written to report.json.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Kill or switchover.
    pub kind: DrillKind,
    /// How the pair replicated: "checkpoint" or "replay".
    pub mode: String,
    /// The guest (`counter`, `dirtier` or `kv`).
    pub guest: String,
    /// Where: a local pair the drill started, or the running pair of a config.
    pub pair: String,
    /// Downtime: SIGKILL (or the switchover request) → first console byte
    /// from the backup.
    pub downtime_ms: f64,
    /// Silence before the backup promoted (0 for a switchover: no detection).
    pub detection_ms: f64,
    /// Promotion → VM running on the other host.
    pub resume_ms: f64,
    /// A switchover: how long the guest was stopped (final checkpoint's
    /// pause → running on the other host).
    pub guest_stopped_ms: Option<f64>,
    /// Disruption: SIGKILL (or the request) → the console back at its normal pace.
    pub disruption_ms: f64,
    /// Total sync time: start → protected (initial sync; a drilled running
    /// pair: the switchover's re-protection, none for a kill).
    pub sync_seconds: Option<f64>,
    /// A switchover: the old primary's sync as the new backup (answer →
    /// protected again).
    pub resync_seconds: Option<f64>,
    /// Data transferred between the hosts (both directions), and the number
    /// of checkpoints the primary took before the failure.
    pub data_bytes: u64,
    /// Checkpoints the primary took before the failure.
    pub epochs: u64,
    /// Dirty pages of the checkpoints the chart shows (the last ones).
    pub dirty_pages_charted: u64,
    /// Performance degradation: work rate with protection ÷ without (not
    /// measured on a running pair: there is no unprotected run to compare).
    pub work_rate_protected: f64,
    /// Work rate without protection (a local pair only).
    pub work_rate_unprotected: Option<f64>,
    /// Protected ÷ unprotected work rate.
    pub degradation_ratio: Option<f64>,
    /// Pause per checkpoint, p50 (µs).
    pub pause_p50_us: f64,
    /// The same, p99 (µs).
    pub pause_p99_us: f64,
    /// The guest's progress carried on across the failover.
    pub continued: bool,
    /// A pair with an etcd witness: the promoted host's decision through it
    /// (e.g. "promote after silence"), how it ended and how long the swap
    /// took (part of the resume time).
    pub witness_decision: Option<String>,
    /// See `witness_decision`.
    pub witness_outcome: Option<String>,
    /// See `witness_decision`.
    pub witness_ms: Option<f64>,
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
    // As a primary boots its guest, so the ratio compares like with like.
    ram.advise_huge_pages();
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

fn analyse(
    kind: DrillKind,
    r: &DrillReport,
    guest: String,
    pair: String,
    unprotected: Option<f64>,
) -> Report {
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
    let (resume_ms, guest_stopped_ms, resync_seconds) = match &r.switchover {
        Some((reply, resync)) => (
            reply.resume_micros as f64 / 1e3,
            Some(reply.downtime_micros as f64 / 1e3),
            Some(resync.as_secs_f64()),
        ),
        None => (ms(r.resume), None, None),
    };
    Report {
        kind,
        mode: if r.mode.is_empty() {
            "checkpoint".into()
        } else {
            r.mode.clone()
        },
        guest,
        pair,
        downtime_ms: ms(r.failover),
        detection_ms: ms(r.detection),
        resume_ms,
        guest_stopped_ms,
        disruption_ms: ms(back_to_normal.saturating_sub(r.killed_at)),
        sync_seconds: (!r.sync_time.is_zero()).then_some(r.sync_time.as_secs_f64()),
        resync_seconds,
        data_bytes: r.bytes_both_ways,
        epochs: r.epochs,
        dirty_pages_charted: r.epoch_samples.iter().map(|s| s.dirty_pages).sum(),
        work_rate_protected: protected,
        work_rate_unprotected: unprotected,
        degradation_ratio: unprotected.filter(|u| *u > 0.0).map(|u| protected / u),
        pause_p50_us: r.pause_p50_us,
        pause_p99_us: r.pause_p99_us,
        continued: r.seamless,
        witness_decision: r.witness.as_ref().map(|w| w.last_decision.clone()),
        witness_outcome: r.witness.as_ref().map(|w| w.last_outcome.clone()),
        witness_ms: r
            .witness
            .as_ref()
            .map(|w| w.last_decision_micros as f64 / 1e3),
    }
}

/// The text form of a report.
pub fn render(r: &Report) -> String {
    let event = match r.kind {
        DrillKind::Kill => "SIGKILL",
        DrillKind::Switchover => "request",
    };
    let mut text = format!(
        "drill: {:?} of the primary, {} guest, {}, {} mode\n\
         downtime            {:>10.1} ms   {event} → first console byte from the backup\n",
        r.kind, r.guest, r.pair, r.mode, r.downtime_ms,
    );
    match r.guest_stopped_ms {
        Some(stopped) => text.push_str(&format!(
            "\x20 guest stopped     {stopped:>10.1} ms   final checkpoint's pause → running on the other host\n"
        )),
        None => text.push_str(&format!(
            "\x20 detection         {:>10.1} ms   silence before the backup promoted\n",
            r.detection_ms
        )),
    }
    text.push_str(&format!(
        "\x20 resume            {:>10.1} ms   promotion → VM running\n",
        r.resume_ms,
    ));
    if let (Some(decision), Some(outcome), Some(ms)) =
        (&r.witness_decision, &r.witness_outcome, r.witness_ms)
    {
        text.push_str(&format!(
            "\x20   witness         {ms:>10.1} ms   the etcd swap ({decision}: {outcome}), part of resume\n"
        ));
    }
    text.push_str(&format!(
        "disruption          {:>10.1} ms   {event} → console back at its normal pace\n",
        r.disruption_ms,
    ));
    match r.sync_seconds {
        Some(sync) => text.push_str(&format!(
            "total sync time     {sync:>10.2} s    start → protected\n"
        )),
        None => text.push_str(
            "total sync time     not measured  the running pair synced before the drill; the old primary's host syncs when it is back\n",
        ),
    }
    if let Some(resync) = r.resync_seconds {
        text.push_str(&format!(
            "\x20 re-protection     {resync:>10.2} s    switched → protected again (the old primary synced as the backup)\n"
        ));
    }
    text.push_str(&format!(
        "data transferred    {:>10.2} MiB  between the hosts ({} checkpoints before the {})\n",
        r.data_bytes as f64 / (1 << 20) as f64,
        r.epochs,
        match r.kind {
            DrillKind::Kill => "failure",
            DrillKind::Switchover => "switchover",
        },
    ));
    match (r.degradation_ratio, r.work_rate_unprotected) {
        (Some(ratio), Some(unprotected)) => text.push_str(&format!(
            "degradation         {ratio:>10.3}      work rate protected ÷ unprotected ({:.0} ÷ {unprotected:.0} pages/s)\n",
            r.work_rate_protected
        )),
        _ => text.push_str(
            "degradation         not measured  a running pair has no unprotected run to compare with\n",
        ),
    }
    text.push_str(&format!(
        "epoch pause         {:>10.0} µs   p50 ({:.0} µs p99)\n\
         guest progress      {}\n",
        r.pause_p50_us,
        r.pause_p99_us,
        if r.continued {
            "carried on across the takeover"
        } else {
            "BROKEN across the takeover"
        },
    ));
    text
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
    let (report, samples) = match &opts.pair {
        Some(config) => {
            let (raw, guest) = remote(&opts, config).await?;
            let report = analyse(
                opts.kind,
                &raw,
                guest,
                format!("running pair of {}", config.display()),
                None,
            );
            (report, raw.epoch_samples)
        }
        None => {
            println!(
                "measuring the guest's unprotected work rate ({:?})…",
                opts.run_for
            );
            let period = opts.run_for;
            let unprotected =
                tokio::task::spawn_blocking(move || unprotected_rate(0, period)).await??;
            println!("starting a protected pair; initial sync progress:");
            let raw = drill(&DemoOptions {
                run_for: opts.run_for,
                after: opts.after,
                dir: Some(opts.out.join("pair")),
                verbose: false,
                progress: true,
                daemon: opts.daemon.clone(),
                guest: DrillGuest::Dirtier,
                kind: opts.kind,
                mode: opts.mode,
                witness: None,
            })
            .await?;
            let report = analyse(
                opts.kind,
                &raw,
                "dirtier".into(),
                "local pair".into(),
                Some(unprotected),
            );
            (report, raw.epoch_samples)
        }
    };
    let text = render(&report);
    print!("{text}");
    std::fs::write(opts.out.join("report.txt"), &text)?;
    std::fs::write(
        opts.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    chart(&samples, &opts.out.join("chart.svg"))?;
    println!(
        "report: {0}/report.txt, {0}/report.json, {0}/chart.svg",
        opts.out.display()
    );
    if !report.continued {
        bail!("the guest did not carry on across the takeover");
    }
    Ok(report)
}

/// A switchover drill on the running pair `config_path` describes: follows
/// the console from the host that runs the VM, asks for the switchover,
/// follows the console onto the other host and waits until the VM is
/// protected again. Returns the measurements and the guest's name.
async fn remote(opts: &DrillOptions, config_path: &Path) -> Result<(DrillReport, String)> {
    let config = crate::config::Config::load(config_path, &[])?;
    let tls = config.tls_files();
    let (section, control) = crate::remote::find_primary(&config).await?;
    let before = crate::remote::fetch_status(control, tls.as_ref()).await?;
    if !before.protected {
        bail!(
            "the VM is not protected ({}): a drill needs a synced backup",
            before.state
        );
    }
    let (old_console, new_console) = (
        config.host(section).console,
        config.host(section.other()).console,
    );
    let new_control = config.host(section.other()).control;
    let new_before = crate::remote::fetch_status(new_control, tls.as_ref()).await?;
    let guest = match config.guest {
        understudy_vmm::BuiltinGuest::Counter => Some(DrillGuest::Counter),
        understudy_vmm::BuiltinGuest::Dirtier => Some(DrillGuest::Dirtier),
        understudy_vmm::BuiltinGuest::Kv => None,
    };
    println!(
        "drilling the running pair of {}: the VM runs on the {} host; following its console for {:?}",
        config_path.display(),
        section.name(),
        opts.run_for
    );
    let started = Instant::now();
    let client = ResumingClient::connect_now(old_console)
        .await
        .with_context(|| format!("cannot connect to the console at {old_console}"))?;
    let mut follow = Follower::new(client, started, guest.map(DrillGuest::prefix));
    follow.read(opts.run_for, |_, _| {}).await;
    let samples = crate::remote::fetch_epochs(control, tls.as_ref())
        .await
        .unwrap_or_default();
    let epochs_before = crate::remote::fetch_status(control, tls.as_ref()).await?;
    let requested = Instant::now();
    let switching = match opts.kind {
        DrillKind::Kill => {
            println!(
                "kill drill → the {} host's daemon SIGKILLs itself",
                section.name()
            );
            crate::remote::request_crash(control, tls.as_ref()).await?;
            None
        }
        DrillKind::Switchover => {
            println!("switchover → the {} host", section.other().name());
            Some(crate::switchover::spawn(config.clone()))
        }
    };
    // The old primary closes its console once its last output is out, or
    // its process dies.
    follow.read(Duration::from_secs(10), |_, _| {}).await;
    follow
        .move_to(new_console)
        .await
        .with_context(|| format!("cannot connect to the console at {new_console}"))?;
    let mut first_byte = None;
    follow
        .read(opts.after, |_, at| {
            first_byte.get_or_insert(at);
        })
        .await;
    let values = follow.values;
    let outcome = match switching {
        Some(task) => Some(task.await??),
        None => None,
    };
    let after = crate::remote::fetch_status(new_control, tls.as_ref()).await?;
    let us = Duration::from_micros;
    // For a guest that prints nothing by itself (kv), the downtime is the
    // guest's stop (switchover) or detection + resume (kill).
    let (detection, resume, stopped) = match &outcome {
        Some(o) => (
            Duration::ZERO,
            us(o.reply.resume_micros),
            us(o.reply.downtime_micros),
        ),
        None => (
            us(after.promotion_detect_micros),
            us(after.promotion_resume_micros),
            us(after.promotion_detect_micros + after.promotion_resume_micros),
        ),
    };
    let reprotect = outcome.as_ref().and_then(|o| o.reprotect_time);
    let report = DrillReport {
        failover: first_byte.map_or(stopped, |t| t - requested),
        detection,
        resume,
        output_gap: Duration::ZERO,
        pause_p50_us: epochs_before.pause_p50_micros,
        pause_p99_us: epochs_before.pause_p99_micros,
        // A running pair synced before the drill: a switchover's sync is the
        // re-protection; a kill's waits for the old host to come back.
        sync_time: reprotect.unwrap_or_default(),
        bytes_shipped: epochs_before.bytes_shipped,
        epochs: epochs_before.epochs,
        last_epoch: epochs_before.last_epoch,
        lines: values.len(),
        seamless: guest
            .is_none_or(|g| g.carries_on(&values.iter().map(|v| v.1).collect::<Vec<_>>())),
        killed_at: requested - started,
        epoch_samples: samples,
        values,
        switchover: outcome.map(|o| (o.reply, reprotect.unwrap_or_default())),
        // What crossed between the hosts during the drill: the other host
        // counts what it received as the backup and shipped as the primary.
        bytes_both_ways: after.bytes_shipped.saturating_sub(new_before.bytes_shipped),
        mode: before.mode.clone(),
        replica_lag_ms: before.replica_lag_millis,
        witness: after.witness.clone(),
    };
    Ok((report, config.guest.to_string()))
}
