//! `understudyctl run` and `understudyctl restore`: one VM in this process with
//! its console on stdin/stdout, optionally ending in a full snapshot.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use understudy_vmm::{
    BootOptions, BuiltinBoot, BuiltinGuest, Console, GuestRam, RamBacking, Vm, VmEnd, snapshot,
};

use crate::console;

/// What to boot for `run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The built-in guest.
    pub guest: BuiltinGuest,
    /// Guest RAM in MiB.
    pub mem_mib: usize,
    /// counter: milliseconds between lines.
    pub interval_ms: u64,
    /// dirtier: working set in pages, pages per second (0 = flat out), report interval.
    pub working_set: u64,
    /// dirtier: pages written per second (0: flat out).
    pub dirty_rate: u64,
    /// dirtier: milliseconds between `work N` lines.
    pub report_ms: u64,
    /// How the session ends (and what it saves).
    pub session: SessionOptions,
}

/// How a local session ends.
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    /// Stop after this long (otherwise: when the guest ends, or on SIGINT/SIGTERM).
    pub stop_after: Option<Duration>,
    /// Pause at the end and write a full snapshot here.
    pub snapshot_to: Option<PathBuf>,
}

impl RunOptions {
    /// Fresh guest RAM of `--mem` MiB.
    pub fn ram(&self) -> Result<GuestRam> {
        let bytes = self
            .mem_mib
            .checked_mul(1 << 20)
            .context("--mem is too large")?;
        GuestRam::new(bytes, RamBacking::Anonymous).context("--mem")
    }

    /// The built-in guest and its parameters.
    pub fn boot(&self) -> BuiltinBoot {
        match self.guest {
            BuiltinGuest::Counter => BuiltinBoot::counter(self.interval_ms),
            BuiltinGuest::Dirtier => {
                BuiltinBoot::dirtier(self.working_set, self.dirty_rate, self.report_ms)
            }
            BuiltinGuest::Kv => BuiltinBoot::new(BuiltinGuest::Kv),
        }
    }
}

/// `understudyctl run`.
pub fn run(options: &RunOptions) -> Result<()> {
    let ram = options.ram()?;
    let boot = options.boot();
    let (vm, console) = Vm::boot(
        ram,
        &boot,
        BootOptions {
            boot_record: Some(boot.clone()),
            start_paused: false,
            dirty_logging: false,
        },
    )
    .with_context(|| format!("cannot start the {} guest", options.guest))?;
    eprintln!(
        "understudy: {} guest running ({} MiB)",
        options.guest, options.mem_mib
    );
    session(vm, console, &options.session)
}

/// `understudyctl restore`.
pub fn restore(dir: &Path, session_options: &SessionOptions) -> Result<()> {
    let start = Instant::now();
    let (vm, console) = snapshot::restore_snapshot(dir, false)
        .with_context(|| format!("cannot restore the snapshot in {}", dir.display()))?;
    let guest = vm
        .boot_record()
        .map_or_else(|| "raw".to_owned(), |b| b.guest.to_string());
    eprintln!(
        "understudy: {guest} guest restored from {} and running ({:.1} ms)",
        dir.display(),
        start.elapsed().as_secs_f64() * 1e3
    );
    session(vm, console, session_options)
}

/// Runs until the deadline, the guest's end, or SIGINT/SIGTERM; then optionally
/// snapshots, stops the VM and flushes its output.
fn session(vm: Vm, console: Console, options: &SessionOptions) -> Result<()> {
    let interrupted = install_signals()?;
    let output = console::pump_output(console.output);
    console::pump_input(console.input);
    let ended = wait(&vm, &interrupted, options.stop_after);

    let result = match (&ended, &options.snapshot_to) {
        (Some(end), Some(dir)) => Err(anyhow::anyhow!(
            "the VM ended ({end}) before it could be snapshotted to {}",
            dir.display()
        )),
        (None, Some(dir)) => take_snapshot(&vm, dir),
        _ => Ok(()),
    };
    let end = vm.stop();
    let _ = output.join();
    result?;
    match end {
        VmEnd::Failed(why) | VmEnd::Diverged(why) => bail!("the VM failed: {why}"),
        VmEnd::GuestReset | VmEnd::TripleFault => {
            eprintln!("understudy: {end}; VM ended");
            Ok(())
        }
        VmEnd::Stopped => Ok(()),
    }
}

/// SIGINT and SIGTERM set the returned flag (a session then ends cleanly).
pub(crate) fn install_signals() -> Result<Arc<AtomicBool>> {
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, interrupted.clone())
            .context("cannot install signal handlers")?;
    }
    Ok(interrupted)
}

/// Runs until `stop_after`, the guest's end (returned) or a signal.
pub(crate) fn wait(
    vm: &Vm,
    interrupted: &AtomicBool,
    stop_after: Option<Duration>,
) -> Option<VmEnd> {
    let deadline = stop_after.map(|d| Instant::now() + d);
    loop {
        let step = deadline.map_or(Duration::from_millis(50), |d| {
            d.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50))
        });
        if let Some(end) = vm.wait_end(step) {
            return Some(end);
        }
        if interrupted.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
    }
}

fn take_snapshot(vm: &Vm, dir: &Path) -> Result<()> {
    let start = Instant::now();
    vm.pause().context("cannot pause the VM for its snapshot")?;
    let paused = start.elapsed();
    let info = snapshot::write_snapshot(vm, dir)
        .with_context(|| format!("cannot write the snapshot to {}", dir.display()))?;
    eprintln!(
        "understudy: snapshot written to {} ({} MiB RAM, {} B state; pause {:.2} ms, total {:.1} ms)",
        dir.display(),
        info.ram_bytes >> 20,
        info.state_bytes,
        paused.as_secs_f64() * 1e3,
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
