//! `understudyctl run --record DIR` and `understudyctl replay DIR`: a VM in
//! the deterministic mode with its trace on disk, and the replay of that
//! trace from one of its snapshots.
//!
//! A recording directory holds:
//!
//! ```text
//! DIR/start/     full snapshot at exit 0, before the guest's first instruction
//! DIR/trace.log  the trace log (checkpoint/src/trace.rs), segment after segment
//! DIR/end/       full snapshot where the recording stopped (the log ends there)
//! ```
//!
//! Any snapshot of the same run (e.g. one written with `--snapshot-to`
//! while it was recorded) can be the starting point of a replay: it carries
//! the stream id and exit index the log is matched against.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use crossbeam_channel::{Receiver, Sender};
use understudy_checkpoint::trace::{SEGMENT_HEADER_LEN, TraceError, TraceWriter, parse_segment};
use understudy_vmm::deterministic::{AfterReplay, ReplayOutcome, Sealed, TraceMode};
use understudy_vmm::{BootOptions, Vm, VmEnd, snapshot};

use crate::console;
use crate::local::{RunOptions, SessionOptions, install_signals, wait};

/// The log inside a recording directory.
pub const TRACE_FILE: &str = "trace.log";
/// The snapshot a recording starts from.
pub const START_DIR: &str = "start";
/// The snapshot where a recording stopped.
pub const END_DIR: &str = "end";

/// `understudyctl run --record DIR`.
pub fn run_recorded(options: &RunOptions, dir: &Path) -> Result<()> {
    if options.session.snapshot_to.is_some() {
        bail!("--snapshot-to is not needed with --record: the end snapshot goes to DIR/end");
    }
    prepare_dir(dir)?;
    let ram = options.ram()?;
    let boot = options.boot();
    let (sink, segments) = crossbeam_channel::unbounded();
    let writer = TraceWriter::new(random_stream()?, 0);
    let (vm, console) = Vm::boot_deterministic(
        ram,
        &boot,
        BootOptions {
            boot_record: Some(boot.clone()),
            start_paused: true,
            dirty_logging: false,
        },
        TraceMode::Record { writer, sink },
    )
    .with_context(|| format!("cannot start the {} guest to record it", options.guest))?;
    eprintln!(
        "understudy: {} guest running ({} MiB), recording into {}",
        options.guest,
        options.mem_mib,
        dir.display()
    );
    let output = console::pump_output(console.output);
    record_session(
        vm,
        console.input,
        output,
        segments,
        dir,
        options.session.stop_after,
    )
}

/// A paused VM already recording (its log going to `segments`) becomes a
/// recording in `dir`: start snapshot, then the guest runs with its console
/// on stdin/stdout until `stop_after`, its end or a signal; end snapshot.
fn record_session(
    vm: Vm,
    input: understudy_vmm::ConsoleInput,
    output: JoinHandle<()>,
    segments: Receiver<Sealed>,
    dir: &Path,
    stop_after: Option<Duration>,
) -> Result<()> {
    snapshot::write_snapshot(&vm, &dir.join(START_DIR))
        .with_context(|| format!("cannot write the start snapshot into {}", dir.display()))?;
    let log = spawn_log_writer(dir.join(TRACE_FILE), segments)?;
    let interrupted = install_signals()?;
    let started = Instant::now();
    vm.resume().context("cannot start the guest")?;
    console::pump_input(input);
    let ended = wait(&vm, &interrupted, stop_after);
    let snapshot_result = match &ended {
        Some(end) => Err(anyhow::anyhow!(
            "the VM ended ({end}) before the recording's end snapshot"
        )),
        None => vm
            .pause()
            .context("cannot pause the VM for the end snapshot")
            .and_then(|()| {
                let end = dir.join(END_DIR);
                snapshot::write_snapshot(&vm, &end)
                    .with_context(|| format!("cannot write the end snapshot to {}", end.display()))
                    .map(|_| ())
            }),
    };
    let exits = vm
        .save_state(false)
        .ok()
        .and_then(|s| s.deterministic)
        .map_or(0, |d| d.exit_index);
    let end = vm.stop();
    let _ = output.join();
    let log_bytes = log
        .join()
        .map_err(|_| anyhow::anyhow!("the trace writer panicked"))??;
    snapshot_result?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "understudy: recorded up to exit {exits} in {secs:.1} s: {log_bytes} bytes of trace ({:.0} B/s) in {}",
        log_bytes as f64 / secs.max(1e-9),
        dir.display()
    );
    match end {
        VmEnd::Failed(why) | VmEnd::Diverged(why) => bail!("the VM failed: {why}"),
        _ => Ok(()),
    }
}

/// How a replay runs.
#[derive(Clone, Debug, Default)]
pub struct ReplayOptions {
    /// The snapshot to start from (default: the recording's start).
    pub from: Option<PathBuf>,
    /// Stop at this exit index (default: the log's end).
    pub to: Option<u64>,
    /// At the end, check RAM and device state against the recording's end
    /// snapshot, page for page.
    pub verify: bool,
    /// At the end, let the guest run on live with its console on
    /// stdin/stdout (stopping as `session` says).
    pub go_live: bool,
    /// At the end, go live recording a new stream into this directory
    /// (its start snapshot is the replay's end point).
    pub record_to: Option<PathBuf>,
    /// How the session ends.
    pub session: SessionOptions,
}

/// What a replay did.
#[derive(Clone, Debug)]
pub struct ReplayReport {
    /// The exit the replay started from.
    pub from_exit: u64,
    /// The exit it reached.
    pub to_exit: u64,
    /// Guest time replayed (timer ticks × the guest's timer period).
    pub guest_time: Duration,
    /// Wall time it took.
    pub wall_time: Duration,
    /// Whether the end state matched the recording's end snapshot.
    pub verified: bool,
}

/// `understudyctl replay DIR`.
pub fn replay(dir: &Path, options: &ReplayOptions) -> Result<ReplayReport> {
    let from = options.from.clone().unwrap_or_else(|| dir.join(START_DIR));
    let end_dir = dir.join(END_DIR);
    if options.verify && options.to.is_some() {
        bail!("--verify compares with the recording's end: it cannot be combined with --to");
    }
    if options.record_to.is_some() && (options.verify || options.go_live) {
        bail!("--record goes live recording: it cannot be combined with --verify or --go-live");
    }
    if let Some(to) = &options.record_to {
        prepare_dir(to)?;
    }
    let (start_state, _) = snapshot::read_snapshot(&from)
        .with_context(|| format!("cannot use the snapshot in {}", from.display()))?;
    let Some(start) = start_state.deterministic else {
        bail!(
            "{} was not taken in the deterministic mode: replay a directory written by \
             `understudyctl run --record`",
            from.display()
        );
    };
    let (tx, source) = crossbeam_channel::bounded(64);
    let feeder = spawn_log_reader(dir.join(TRACE_FILE), tx)?;
    let mut new_log = None;
    let then = if options.record_to.is_some() {
        let (sink, segments) = crossbeam_channel::unbounded();
        new_log = Some(segments);
        AfterReplay::Record {
            stream: random_stream()?,
            sink,
        }
    } else if options.go_live {
        AfterReplay::GoLive
    } else {
        AfterReplay::Stop
    };
    let started = Instant::now();
    let (vm, console) = snapshot::restore_deterministic(
        &from,
        false,
        TraceMode::Replay {
            source,
            until: options.to,
            then,
        },
    )
    .with_context(|| format!("cannot restore {} to replay from it", from.display()))?;
    let output = console::pump_output(console.output);
    let outcome = vm.wait_replay(Duration::from_secs(365 * 24 * 3600));
    let wall_time = started.elapsed();
    // The feeder's own error (an unreadable file) says more than the VM's.
    drop(feeder);
    let to_exit = match outcome {
        Ok(ReplayOutcome::Reached { exit, .. }) => exit,
        Err(e) => {
            let end = vm.stop();
            let _ = output.join();
            return Err(match end {
                VmEnd::Diverged(why) => anyhow::anyhow!("{why}"),
                _ => anyhow::Error::new(e),
            })
            .with_context(|| format!("the replay of {} failed", dir.display()));
        }
    };
    let mut report = ReplayReport {
        from_exit: start.exit_index,
        to_exit,
        guest_time: Duration::ZERO,
        wall_time,
        verified: false,
    };
    if let (Some(to), Some(segments)) = (&options.record_to, new_log) {
        eprintln!(
            "understudy: replayed exits {}..{to_exit} in {:.2} s; the guest is live, recording into {}",
            start.exit_index,
            wall_time.as_secs_f64(),
            to.display()
        );
        vm.pause().context("cannot pause the replayed VM")?;
        record_session(
            vm,
            console.input,
            output,
            segments,
            to,
            options.session.stop_after,
        )?;
        return Ok(report);
    }
    if !options.go_live {
        vm.pause().context("cannot pause the replayed VM")?;
        if let Some(end_state) = vm.save_state(false)?.deterministic {
            let ticks = end_state.ticks.saturating_sub(start.ticks);
            let period = end_state.pit.period().unwrap_or(Duration::from_millis(1));
            report.guest_time = period.saturating_mul(u32::try_from(ticks).unwrap_or(u32::MAX));
        }
        if options.verify {
            snapshot::compare_with_snapshot(&vm, &end_dir).context("--verify failed")?;
            report.verified = true;
        }
        vm.stop();
        let _ = output.join();
        return Ok(report);
    }
    eprintln!(
        "understudy: replayed exits {}..{to_exit} in {:.2} s; the guest is live",
        start.exit_index,
        wall_time.as_secs_f64()
    );
    console::pump_input(console.input);
    let interrupted = install_signals()?;
    let ended = wait(&vm, &interrupted, options.session.stop_after);
    if let (None, Some(snap)) = (&ended, &options.session.snapshot_to) {
        vm.pause().context("cannot pause the VM for its snapshot")?;
        snapshot::write_snapshot(&vm, snap)
            .with_context(|| format!("cannot write the snapshot to {}", snap.display()))?;
    }
    vm.stop();
    let _ = output.join();
    Ok(report)
}

/// One line for a replay's report.
pub fn render(report: &ReplayReport) -> String {
    let wall = report.wall_time.as_secs_f64();
    let guest = report.guest_time.as_secs_f64();
    let speed = if guest > 0.0 {
        format!(
            "{guest:.2} s of guest time in {wall:.2} s ({:.2}× real time)",
            guest / wall.max(1e-9)
        )
    } else {
        // E.g. kv, which masks its timer: no guest clock to compare with.
        format!("in {wall:.2} s (the guest's timer did not tick)")
    };
    format!(
        "replayed exits {}..{} ({} exits): {speed}{}\n",
        report.from_exit,
        report.to_exit,
        report.to_exit - report.from_exit,
        if report.verified {
            "; RAM, vCPU and devices equal the recorded end, page for page"
        } else {
            ""
        }
    )
}

fn prepare_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        let mut entries =
            fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} is not empty: record into a new or empty directory (a recording is never \
                 overwritten)",
                dir.display()
            );
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

fn random_stream() -> Result<u64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness for the stream id: {e}"))?;
    Ok(u64::from_le_bytes(b))
}

/// Appends each sealed segment to the log file; syncs it when the stream
/// ends (the channel closes after the last segment). Returns the bytes
/// written.
fn spawn_log_writer(path: PathBuf, segments: Receiver<Sealed>) -> Result<JoinHandle<Result<u64>>> {
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create the trace log {}", path.display()))?;
    std::thread::Builder::new()
        .name("trace-writer".into())
        .spawn(move || {
            let mut written = 0u64;
            for segment in segments {
                file.write_all(&segment.bytes)
                    .with_context(|| format!("cannot write the trace log {}", path.display()))?;
                written += segment.bytes.len() as u64;
            }
            file.sync_all()
                .with_context(|| format!("cannot sync the trace log {}", path.display()))?;
            Ok(written)
        })
        .context("cannot start the trace writer thread")
}

/// Feeds the log file's segments to a replay, one whole segment at a time
/// (parsed only for its length: the replay checks each one). A torn or
/// corrupt segment is handed over as it is, so the replay refuses it with
/// the reason.
fn spawn_log_reader(path: PathBuf, tx: Sender<Vec<u8>>) -> Result<JoinHandle<()>> {
    let mut file = File::open(&path)
        .with_context(|| format!("cannot open the trace log {}", path.display()))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .with_context(|| format!("cannot read the trace log {}", path.display()))?;
    if bytes.is_empty() {
        bail!(
            "the trace log {} is empty: the recording never started",
            path.display()
        );
    }
    std::thread::Builder::new()
        .name("trace-reader".into())
        .spawn(move || {
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let len = match parse_segment(rest) {
                    Ok((_, _, used)) => used,
                    // Hand the bad bytes over whole: the replay names the
                    // problem (torn, corrupt, from another stream, …).
                    Err(TraceError::Truncated { .. }) | Err(_) => rest.len(),
                };
                let len = len.max(SEGMENT_HEADER_LEN.min(rest.len()));
                if tx.send(rest[..len].to_vec()).is_err() {
                    return;
                }
                rest = &rest[len..];
            }
        })
        .context("cannot start the trace reader thread")
}
