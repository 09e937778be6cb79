//! `understudyctl`: the operator CLI. Parses arguments and calls the library.

// The doc comments below are clap's --help text, where `[tls]` names a TOML
// table, not a Rust item.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use understudy::local::{self, RunOptions, SessionOptions};
use understudy_common::ids::ReplicationMode;
use understudy_vmm::BuiltinGuest;

#[derive(Parser, Debug)]
#[command(
    name = "understudyctl",
    version,
    about = "Operate understudy: run, snapshot and restore VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
struct Session {
    /// Stop after this long (e.g. 2s, 500ms); otherwise run until the guest ends or Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    stop_after: Option<Duration>,
    /// At the end, pause the VM and write a full snapshot into this directory.
    #[arg(long, value_name = "DIR")]
    snapshot_to: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a built-in guest with its console on stdin/stdout.
    Run {
        /// Which built-in guest: counter, dirtier or kv.
        #[arg(long)]
        guest: BuiltinGuest,
        /// Guest RAM in MiB (8 to 3072).
        #[arg(long, default_value_t = 64, value_name = "MIB")]
        mem: usize,
        /// counter: milliseconds between lines.
        #[arg(long, default_value_t = 50, value_name = "MS")]
        interval: u64,
        /// dirtier: working set in 4 KiB pages.
        #[arg(long, default_value_t = 1024, value_name = "PAGES")]
        working_set: u64,
        /// dirtier: pages written per second (0 = as fast as it can).
        #[arg(long, default_value_t = 10_000, value_name = "PAGES_PER_SEC")]
        dirty_rate: u64,
        /// dirtier: milliseconds between "work N" lines.
        #[arg(long, default_value_t = 1000, value_name = "MS")]
        report: u64,
        /// Run in the deterministic mode and record the trace into this new
        /// directory (start snapshot, trace.log, end snapshot); replay it with
        /// `understudyctl replay DIR`.
        #[arg(long, value_name = "DIR")]
        record: Option<PathBuf>,
        #[command(flatten)]
        session: Session,
    },
    /// Replay a recording made by `run --record`: re-execute the guest from a
    /// snapshot feeding it the logged inputs, print its console output, and
    /// stop at the log's end (or --to), checking every exit against the log.
    Replay {
        /// The recording directory.
        dir: PathBuf,
        /// Start from this snapshot of the recording (default: DIR/start).
        #[arg(long, value_name = "SNAPSHOT_DIR")]
        from: Option<PathBuf>,
        /// Stop at this exit index instead of the log's end.
        #[arg(long, value_name = "EXIT")]
        to: Option<u64>,
        /// At the end, check RAM (page for page), vCPU and devices against the
        /// recording's end snapshot.
        #[arg(long)]
        verify: bool,
        /// At the end, let the guest run on live with its console on stdin/stdout.
        #[arg(long, conflicts_with = "verify")]
        go_live: bool,
        /// At the end, go live recording anew into this new directory (its start
        /// snapshot is the point the replay reached).
        #[arg(long, value_name = "DIR", conflicts_with_all = ["verify", "go_live"])]
        record: Option<PathBuf>,
        #[command(flatten)]
        session: Session,
    },
    /// Resume a snapshot written by `run --snapshot-to` in this process.
    Restore {
        /// The snapshot directory.
        dir: PathBuf,
        #[command(flatten)]
        session: Session,
    },
    /// Show a daemon's role, generation, protection and replication figures.
    /// With --config alone: both hosts of the pair, and who runs and protects the VM.
    Status {
        /// One daemon's control address (primary.control or backup.control);
        /// without it, both hosts named in --config are asked.
        #[arg(long, value_name = "ADDR", required_unless_present = "config")]
        control: Option<std::net::SocketAddr>,
        /// The VM's config file: both hosts' control addresses, and the [tls]
        /// section's CA, certificate and key to connect with.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Planned role swap: the primary hands the VM to the backup (final
    /// checkpoint with the guest paused) and becomes its backup.
    Switchover {
        /// The VM's config file (both hosts' control addresses; its [tls]
        /// section gives the CA, certificate and key to connect with).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Wait this long for the VM to be protected again (0s: do not wait).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Live migration: move the running VM to a host waiting with
    /// `understudyd primary --incoming`; its backup (if any) protects it until
    /// the switch. Shows progress, then what it cost.
    Migrate {
        /// The VM's config file (the pair's control addresses, TLS).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The destination's replication address (its [primary].replication).
        #[arg(long, value_name = "ADDR")]
        to: std::net::SocketAddr,
        /// The name the destination's certificate carries (default: its IP).
        #[arg(long, value_name = "NAME")]
        to_name: Option<String>,
        /// stop-and-copy (pause, copy everything, resume there), precopy
        /// (rounds while the guest runs, then a short stop), postcopy (run
        /// there at once, pages fetched at faults and pushed), hybrid (one
        /// pre-copy round, then post-copy), or replay (for a VM with mode =
        /// "replay": pre-copy, a checkpoint, then only its log, replayed
        /// there as it arrives; CR/TR-Motion).
        #[arg(long, default_value = "precopy")]
        mode: String,
        /// Pre-copy: the guest stop the switch may take.
        #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
        max_downtime: Duration,
        /// Print the report as JSON on stdout (progress still on stderr).
        #[arg(long)]
        json: bool,
        /// No progress lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Resume the VM from the backup's image when its primary is gone for good
    /// and the backup will not promote by itself (it says why in its status:
    /// e.g. a restarted primary that released output unprotected, or a backup
    /// that was itself frozen). Refused while a primary is heard.
    Promote {
        /// The VM's config file (both hosts' control addresses, TLS).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Forget the VM the backup's image holds, so that the primary may boot a
    /// new VM over it (the VM the image holds is lost). Refused while a
    /// primary is heard or the VM runs on the backup's host.
    DiscardImage {
        /// The VM's config file (both hosts' control addresses, TLS).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Rehearse a failover or a switchover (on a local pair, or a running one
    /// with --config); report the five metrics (text, JSON, SVG chart).
    Drill {
        /// What to rehearse.
        #[arg(long, value_enum, default_value = "kill")]
        kind: understudy::drill::DrillKind,
        /// How long the protected VM runs before the failure.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        run_for: Duration,
        /// How long to watch the backup afterwards.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        after: Duration,
        /// Where to write report.txt, report.json and chart.svg.
        #[arg(long, default_value = "understudy-drill", value_name = "DIR")]
        out: PathBuf,
        /// Drill the running pair this config file describes instead of
        /// starting a local pair (a kill drill makes its primary SIGKILL itself).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// How the local pair replicates: checkpoint or replay (a running
        /// pair: as its config says).
        #[arg(long, default_value = "checkpoint", value_parser = parse_mode)]
        mode: ReplicationMode,
    },
    /// Start a protected counter VM on this machine, kill its primary, watch the backup take over.
    Demo {
        /// How the pair replicates: checkpoint (a checkpoint every epoch) or
        /// replay (the backup replays the primary's input log).
        #[arg(long, default_value = "checkpoint", value_parser = parse_mode)]
        mode: ReplicationMode,
        /// How long the protected VM runs before the primary is killed.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        run_for: Duration,
        /// How long to watch the backup afterwards.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        after: Duration,
        /// Keep the demo's config and logs here (default: a temporary directory).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

fn parse_mode(text: &str) -> Result<ReplicationMode, String> {
    text.parse()
}

fn main() -> ExitCode {
    // Before any thread: chunk-sized buffers are reused, not faulted in anew.
    understudy_common::alloc::keep_freed_memory();
    understudy::init_logging("warn", &[]);
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            guest,
            mem,
            interval,
            working_set,
            dirty_rate,
            report,
            record,
            session,
        } => {
            let options = RunOptions {
                guest,
                mem_mib: mem,
                interval_ms: interval,
                working_set,
                dirty_rate,
                report_ms: report,
                session: session.into(),
            };
            match record {
                Some(dir) => understudy::record::run_recorded(&options, &dir),
                None => local::run(&options),
            }
        }
        Command::Replay {
            dir,
            from,
            to,
            verify,
            go_live,
            record,
            session,
        } => understudy::record::replay(
            &dir,
            &understudy::record::ReplayOptions {
                from,
                to,
                verify,
                go_live,
                record_to: record,
                session: session.into(),
            },
        )
        .map(|report| eprint!("understudy: {}", understudy::record::render(&report))),
        Command::Restore { dir, session } => local::restore(&dir, &session.into()),
        Command::Status { control, config } => async_main(async move {
            let config = match config {
                Some(path) => Some(understudy::config::Config::load(&path, &[])?),
                None => None,
            };
            match (control, config) {
                (Some(control), config) => {
                    let tls = config.and_then(|c| c.tls_files());
                    let status = understudy::remote::fetch_status(control, tls.as_ref()).await?;
                    print!("{}", understudy::remote::render(&status));
                }
                (None, Some(config)) => {
                    let hosts = understudy::remote::pair_status(&config).await;
                    print!("{}", understudy::remote::render_pair(&config, &hosts));
                    if hosts.iter().all(|(_, _, s)| s.is_none()) {
                        anyhow::bail!("neither host of the pair answered");
                    }
                }
                (None, None) => anyhow::bail!("give --control ADDR or --config FILE"),
            }
            Ok(())
        }),
        Command::Switchover { config, wait } => async_main(async move {
            let config = understudy::config::Config::load(&config, &[])?;
            let wait = (!wait.is_zero()).then_some(wait);
            let outcome = understudy::switchover::run(&config, wait).await?;
            print!("{}", understudy::switchover::render(&outcome, &config));
            Ok(())
        }),
        Command::Migrate {
            config,
            to,
            to_name,
            mode,
            max_downtime,
            json,
            quiet,
        } => async_main(async move {
            let config = understudy::config::Config::load(&config, &[])?;
            let options = understudy::migrate::MigrateOptions {
                to,
                to_name,
                mode,
                max_downtime,
                progress: !quiet,
            };
            let report = understudy::migrate::run(&config, &options).await?;
            if json {
                println!("{}", understudy::migrate::to_json(&report));
            } else {
                print!("{}", understudy::migrate::render(&report));
            }
            Ok(())
        }),
        Command::Promote { config } => async_main(async move {
            let config = understudy::config::Config::load(&config, &[])?;
            let (section, addr) =
                understudy::remote::find_role(&config, understudy::config::Role::Backup).await?;
            let reply =
                understudy::remote::request_promote(addr, config.tls_files().as_ref()).await?;
            println!(
                "promote: the [{}] table's host (control {addr}) runs VM {} from epoch {}, generation {}",
                section.name(),
                config.name,
                reply.epoch,
                reply.generation
            );
            Ok(())
        }),
        Command::DiscardImage { config } => async_main(async move {
            let config = understudy::config::Config::load(&config, &[])?;
            let (section, addr) =
                understudy::remote::find_role(&config, understudy::config::Role::Backup).await?;
            let reply =
                understudy::remote::request_discard(addr, config.tls_files().as_ref()).await?;
            println!(
                "discard-image: the [{}] table's host (control {addr}) forgot VM {} (incarnation {}, epoch {}); \
                 its primary may now boot a new VM",
                section.name(),
                config.name,
                if reply.incarnation.is_empty() {
                    "unknown"
                } else {
                    &reply.incarnation
                },
                reply.epoch
            );
            Ok(())
        }),
        Command::Drill {
            kind,
            run_for,
            after,
            out,
            config,
            mode,
        } => async_main(async move {
            understudy::drill::run(understudy::drill::DrillOptions {
                kind,
                mode,
                run_for,
                after,
                out,
                daemon: None,
                pair: config,
            })
            .await
            .map(|_| ())
        }),
        Command::Demo {
            mode,
            run_for,
            after,
            dir,
        } => async_main(understudy::demo::run(understudy::demo::DemoOptions {
            mode,
            run_for,
            after,
            dir,
            verbose: true,
            daemon: None,
            guest: understudy::demo::DrillGuest::Counter,
            kind: understudy::drill::DrillKind::Kill,
            progress: false,
            witness: None,
        })),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("understudyctl: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn async_main(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(fut)
}

impl From<Session> for SessionOptions {
    fn from(s: Session) -> Self {
        Self {
            stop_after: s.stop_after,
            snapshot_to: s.snapshot_to,
        }
    }
}
