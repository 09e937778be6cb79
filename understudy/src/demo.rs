//! `understudyctl demo` and SIGKILL drills: on one machine, start a backup and
//! a primary (`understudyd` child processes on loopback) protecting the
//! `counter` guest, let it run, SIGKILL the primary, follow the console onto
//! the backup, and report what was measured. The demo narrates one drill; the
//! failover benchmark runs many quietly.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use understudy_common::console::ResumingClient;
use understudy_common::ids::ReplicationMode;

use crate::config::Config;
use crate::daemon::Role;
use crate::pair::{Follower, LocalPair, PairAddrs};
use crate::{remote, switchover};

/// What to rehearse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
pub enum DrillKind {
    /// SIGKILL the primary; the backup takes over.
    Kill,
    /// Planned role swap: the primary hands the VM over and becomes the backup.
    Switchover,
}

/// Guest RAM of the demo VM.
const DEMO_MIB: u64 = 64;

/// Options of a drill.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// How long the protected VM runs before the primary is killed.
    pub run_for: Duration,
    /// How long to watch the backup after the takeover.
    pub after: Duration,
    /// Where to keep config and logs (a temporary directory if None).
    pub dir: Option<PathBuf>,
    /// Narrate (the demo) or stay quiet (benchmarks).
    pub verbose: bool,
    /// Print the initial sync's progress even when not narrating (drills).
    pub progress: bool,
    /// The `understudyd` binary (default: beside this program).
    pub daemon: Option<PathBuf>,
    /// The guest to protect.
    pub guest: DrillGuest,
    /// How the VM leaves the primary: SIGKILL, or a planned switchover.
    pub kind: DrillKind,
    /// How the pair replicates.
    pub mode: ReplicationMode,
    /// An etcd witness for the pair: its client URL and the key prefix (a
    /// new one for each drill: a new pair starts at generation 1), or none.
    pub witness: Option<(String, String)>,
}

/// Guests a drill can run: both print a number per line that must carry on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum DrillGuest {
    /// `count N` every 50 ms: the sequence must be unbroken.
    Counter,
    /// `work N` every 50 ms while writing 2048 pages flat out: N must grow.
    Dirtier,
}

impl DrillGuest {
    fn config(self) -> &'static str {
        match self {
            Self::Counter => "guest = \"counter\"\nguest_params = { interval_ms = 50 }",
            Self::Dirtier => {
                "guest = \"dirtier\"\nguest_params = { working_set = 2048, dirty_rate = 0, report_ms = 50 }"
            }
        }
    }

    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Self::Counter => "count ",
            Self::Dirtier => "work ",
        }
    }

    /// Whether the values seen across the failover continue as they must.
    pub(crate) fn continues(self, values: &[u64]) -> bool {
        match self {
            Self::Counter => values.first() == Some(&0) && self.carries_on(values),
            Self::Dirtier => self.carries_on(values),
        }
    }

    /// Whether values seen from some point on (a running guest) carry on.
    pub(crate) fn carries_on(self, values: &[u64]) -> bool {
        !values.is_empty()
            && match self {
                Self::Counter => values.windows(2).all(|w| w[1] == w[0] + 1),
                Self::Dirtier => values.windows(2).all(|w| w[1] > w[0]),
            }
    }
}

/// What one drill measured.
#[derive(Clone, Debug, Default)]
pub struct DrillReport {
    /// SIGKILL (or the switchover request) → first console byte from the backup.
    pub failover: Duration,
    /// Silence the backup waited out before promoting.
    pub detection: Duration,
    /// Promotion → VM running on the backup.
    pub resume: Duration,
    /// Last line from the primary → first line from the backup.
    pub output_gap: Duration,
    /// The primary's pause per checkpoint, p50 (µs).
    pub pause_p50_us: f64,
    /// The same, p99 (µs).
    pub pause_p99_us: f64,
    /// Start → protected.
    pub sync_time: Duration,
    /// Bytes the primary shipped before the failure.
    pub bytes_shipped: u64,
    /// Checkpoints it took.
    pub epochs: u64,
    /// The last epoch the backup acked.
    pub last_epoch: u64,
    /// Console lines seen in all.
    pub lines: usize,
    /// Every console value with its arrival (since the drill started) and
    /// whether the backup delivered it.
    pub values: Vec<(Duration, u64, bool)>,
    /// When the primary was killed or asked to switch over (since the drill started).
    pub killed_at: Duration,
    /// A switchover: what the old primary answered, and how long until the
    /// VM was protected again (the old primary synced as the backup).
    pub switchover: Option<(understudy_proto::SwitchoverReply, Duration)>,
    /// Bytes that crossed between the hosts in both directions (a
    /// switchover's re-protection sync included).
    pub bytes_both_ways: u64,
    /// The primary's last checkpoints before the kill, oldest first.
    pub epoch_samples: Vec<understudy_proto::EpochSample>,
    /// The console showed one unbroken count sequence from 0.
    pub seamless: bool,
    /// How the pair replicated ("checkpoint" or "replay").
    pub mode: String,
    /// Replay mode: how far the backup's replica was behind the primary's
    /// log just before the failure.
    pub replica_lag_ms: f64,
    /// The promoted host's last decision through the etcd witness (a pair
    /// with `[witness]`).
    pub witness: Option<understudy_proto::WitnessStatus>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("         {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the demo: one narrated drill and its summary.
pub async fn run(opts: DemoOptions) -> Result<()> {
    let r = drill(&opts).await?;
    println!("\nsummary");
    println!(
        "  failover time     {:>8.1} ms  SIGKILL → first console byte from the backup",
        ms(r.failover)
    );
    println!(
        "    detection       {:>8.1} ms  silence before the backup promoted (heartbeat timeout)",
        ms(r.detection)
    );
    println!(
        "    resume          {:>8.1} ms  promotion → VM running ({})",
        ms(r.resume),
        if r.mode == "replay" {
            "the replica replays the rest of the log"
        } else {
            "restore state into the VM built ahead"
        }
    );
    println!(
        "  downtime          {:>8.1} ms  last line from the primary → first line from the backup",
        ms(r.output_gap)
    );
    println!(
        "  epoch pause       {:>8.0} µs  p50 ({:.0} µs p99) guest stopped per checkpoint",
        r.pause_p50_us, r.pause_p99_us
    );
    println!(
        "  initial sync      {:>8.2} s   start → protected ({DEMO_MIB} MiB guest)",
        r.sync_time.as_secs_f64()
    );
    println!(
        "  data shipped      {:>8.2} MiB over {} epochs",
        r.bytes_shipped as f64 / (1 << 20) as f64,
        r.epochs
    );
    println!("  last acked epoch  {:>8}", r.last_epoch);
    println!(
        "  mode              {:>8}  {}",
        r.mode,
        if r.mode == "replay" {
            "the backup's replica replayed the primary's input log; output waited for the log's ack"
        } else {
            "a checkpoint every epoch; output waited for its epoch's ack"
        }
    );
    if r.mode == "replay" {
        println!(
            "  replica lag       {:>8.1} ms  behind the primary's log just before the failure",
            r.replica_lag_ms
        );
    }
    println!(
        "  console           {} lines, {}",
        r.lines,
        if r.seamless {
            "one unbroken count sequence: no gap, no repeat, no restart"
        } else {
            "SEQUENCE BROKEN"
        }
    );
    if !r.seamless {
        bail!("the console sequence was broken across the failover");
    }
    Ok(())
}

/// One SIGKILL drill on a local pair.
pub async fn drill(opts: &DemoOptions) -> Result<DrillReport> {
    let say = |text: String| {
        if opts.verbose {
            println!("{text}");
        }
    };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        bail!("the demo needs /dev/kvm ({e}): run it on a host with KVM");
    }
    let dir = match &opts.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("understudy-demo-{}", std::process::id())),
    };
    let mut pair = LocalPair::new(
        opts.daemon.as_deref(),
        &dir,
        "demo",
        &format!(
            "{}\nmemory_mib = {DEMO_MIB}\nmode = \"{}\"\n{}",
            opts.guest.config(),
            opts.mode,
            opts.witness
                .as_ref()
                .map(|(url, prefix)| format!(
                    "[witness]\nendpoints = [\"{url}\"]\nprefix = \"{prefix}\"\n"
                ))
                .unwrap_or_default()
        ),
    )?;
    let PairAddrs {
        primary_console: pc,
        primary_control: pk,
        backup_console: bc,
        backup_control: bk,
        replication: rep,
        ..
    } = pair.addrs;
    say(format!(
        "understudy demo: the counter guest, protected by a backup on this machine ({} mode); then the primary gets SIGKILL.",
        opts.mode
    ));
    say(format!("files and daemon logs: {}", dir.display()));
    let backup_pid = pair.start(Role::Backup)?;
    say(format!(
        "backup   started (pid {backup_pid}), replication on {rep}, console on {bc}"
    ));
    let started = Instant::now();
    let primary_pid = pair.start(Role::Primary)?;
    say(format!(
        "primary  started (pid {primary_pid}), console on {pc}"
    ));

    // Initial sync: progress until protected.
    pair.wait_protected(Duration::from_secs(60), |state| {
        if opts.verbose || opts.progress {
            println!(
                "primary  {state} ({:.2} s)",
                started.elapsed().as_secs_f64()
            );
        }
    })
    .await?;
    let sync_time = started.elapsed();

    let client = ResumingClient::connect(pc, 0)
        .await
        .context("cannot connect to the primary's console")?;
    let mut follow = Follower::new(client, started, Some(opts.guest.prefix()));
    let mut last_primary_line = Instant::now();
    follow
        .read(opts.run_for, |line, at| {
            say(format!("primary │ {line}"));
            last_primary_line = at;
        })
        .await;
    let before = remote::fetch_status(pk, None).await?;
    let epochs = remote::fetch_epochs(pk, None).await.unwrap_or_default();
    say(indent(&remote::render(&before)));

    let (killed, switching) = match opts.kind {
        DrillKind::Kill => {
            say(format!("SIGKILL  → primary (pid {primary_pid})"));
            (pair.kill(Role::Primary)?, None)
        }
        DrillKind::Switchover => {
            say("switchover → the backup's host takes the VM".into());
            let at = Instant::now();
            (
                at,
                Some(switchover::spawn(Config::load(&pair.config, &[])?)),
            )
        }
    };
    // Whatever the primary delivered before it died, or before it closed
    // the console once its last output was out (a switchover).
    let linger = match opts.kind {
        DrillKind::Kill => Duration::from_millis(50),
        DrillKind::Switchover => Duration::from_secs(10),
    };
    follow
        .read(linger, |line, at| {
            say(format!("primary │ {line}"));
            last_primary_line = at;
        })
        .await;
    follow
        .move_to(bc)
        .await
        .context("cannot connect to the backup's console")?;
    let first_backup_byte = follow
        .first_byte(Duration::from_secs(10))
        .await
        .context("the backup did not take over")?;
    let mut first_backup_line = None;
    follow
        .read(opts.after, |line, at| {
            say(format!("backup  │ {line}"));
            first_backup_line.get_or_insert(at);
        })
        .await;
    let values = follow.values;
    let switchover = match switching {
        Some(task) => {
            let outcome = task.await??;
            Some((outcome.reply, outcome.reprotect_time.unwrap_or_default()))
        }
        None => None,
    };
    let after = remote::fetch_status(bk, None).await?;
    say(indent(&remote::render(&after)));
    // Stop the promoted VM cleanly.
    pair.terminate(Role::Backup);
    Ok(DrillReport {
        failover: first_backup_byte - killed,
        detection: Duration::from_micros(after.promotion_detect_micros),
        resume: Duration::from_micros(after.promotion_resume_micros),
        output_gap: first_backup_line
            .map(|t| t.saturating_duration_since(last_primary_line))
            .unwrap_or_default(),
        pause_p50_us: before.pause_p50_micros,
        pause_p99_us: before.pause_p99_micros,
        sync_time,
        bytes_shipped: before.bytes_shipped,
        epochs: before.epochs,
        last_epoch: before.last_epoch,
        lines: values.len(),
        seamless: opts
            .guest
            .continues(&values.iter().map(|v| v.1).collect::<Vec<_>>()),
        killed_at: killed - started,
        // The backup's host counts what it received and, after a
        // switchover, what it shipped back.
        bytes_both_ways: match opts.kind {
            DrillKind::Kill => before.bytes_shipped,
            DrillKind::Switchover => after.bytes_shipped,
        },
        switchover,
        epoch_samples: epochs,
        values,
        mode: before.mode.clone(),
        replica_lag_ms: before.replica_lag_millis,
        witness: after.witness.clone(),
    })
}
