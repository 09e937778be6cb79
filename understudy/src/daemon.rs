//! `understudyd`: runs one host's side of a protected VM from its config until
//! SIGTERM/SIGINT, a fence, or the guest's end.
//!
//! A host is the one listed under `[primary]` or `[backup]` (its *home*
//! section: its addresses). Its *role* starts as the home section's, or as
//! `state_dir/role` says after a role change, and changes in the same process
//! when both hosts have replication addresses: the primary that handed the VM
//! over, or was deposed, becomes the backup; the backup that took the VM over
//! (by a handover or after silence) becomes the primary and protects it. The
//! console, control, metrics and replication sockets belong to the host and
//! stay up across role changes.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use understudy_backup::BackupExit;
use understudy_common::ids::Generation;
use understudy_common::role::{HostIo, RecordAhead, SharedListener};
use understudy_common::status::{ControlService, Stats};
use understudy_common::{console, wire};
use understudy_primary::host_state::{HostState, RecordsAhead};
use understudy_primary::{PrimaryError, PrimaryExit};
use understudy_proto::control_server::ControlServer;

use crate::config::Config;
use crate::supervise;

pub use crate::config::Role;

/// Exit code of a daemon that refused to run because it was deposed.
pub const EXIT_FENCED: u8 = 3;

/// Where a host records the role it has (it survives restarts, so a host
/// that handed its VM over comes back as the backup).
const ROLE_FILE: &str = "role";

/// The role the host of `home` starts in.
pub fn starting_role(home: Role, config: &Config) -> Result<Role> {
    let path = config.state_dir.join(ROLE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => match text.trim() {
            "primary" => Ok(Role::Primary),
            "backup" => Ok(Role::Backup),
            other => anyhow::bail!(
                "{} says {other:?}: expected primary or backup (delete it to start as the {})",
                path.display(),
                home.name()
            ),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(home),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write_role(dir: &Path, role: Role) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    understudy_common::durable::write(
        &dir.join(ROLE_FILE),
        format!("{}\n", role.name()).as_bytes(),
    )
    .with_context(|| format!("cannot record the role in {}", dir.display()))
}

/// Records that this host took the VM over, on a thread of its own: its
/// generation (an older fence marker removed), then its role, in that order
/// so that a host that restarts as the primary knows its generation. The
/// new primary role starts beside it: its output waits only for the write
/// that must come first, the record that it released output unprotected.
/// Each state file's write is three fsyncs, and a virtual disk's fsync has
/// tails (50 ms in 30 s of an idle one here, 119 ms in a failover drill,
/// where these writes held the promoted VM's first output).
///
/// A write that fails leaves the VM running here: a restart would come back
/// in the old role (or refuse to, its generation unknown), which the error
/// says. Before these writes moved off the output path, such a failure
/// ended the daemon and the VM it had just resumed with it.
fn record_takeover(config: &Config, generation: Generation) -> Option<std::thread::JoinHandle<()>> {
    let dir = config.state_dir.clone();
    let write = move || {
        let written = understudy_common::fault::check("daemon.takeover.records")
            .map_err(|point| anyhow::anyhow!("fault point {point}"))
            .and_then(|()| Ok(HostState::open(&dir)?.adopt(generation)?))
            .and_then(|()| write_role(&dir, Role::Primary));
        match written {
            Ok(()) => tracing::debug!(%generation, "recorded the takeover: generation and role"),
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                dir = %dir.display(),
                "this host runs the VM but cannot record its generation and role: a restart would \
                 not find the VM's role here; fix the state directory's disk"
            ),
        }
    };
    match std::thread::Builder::new()
        .name("takeover-records".into())
        .spawn(write.clone())
    {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a thread for the takeover's records: writing them first");
            write();
            None
        }
    }
}

/// What records ahead of a takeover (see [`RecordsAhead`]: the state
/// directory's record writer). Without it a takeover writes the record
/// itself, before the VM's first output, as it did before.
fn start_records_ahead(config: &Config) -> Option<Arc<dyn RecordAhead>> {
    match HostState::open(&config.state_dir) {
        Ok(state) => Some(Arc::new(RecordsAhead::start(state))),
        Err(e) => {
            tracing::warn!(
                error = %wire::chain(&e),
                "cannot record ahead of a takeover: a takeover will write the VM record before its first output"
            );
            None
        }
    }
}

/// Waits for a takeover's records (see [`record_takeover`]).
async fn settle(records: &mut Option<std::thread::JoinHandle<()>>) {
    if let Some(handle) = records.take() {
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
    }
}

/// Makes the spares of the state files a promotion writes (the role, and
/// the primary's generation, fence marker and VM record; see
/// `understudy_common::durable`), so that a promotion on a disk that has
/// filled since still records them. A host that cannot (its disk full
/// already) starts anyway, and says so.
fn reserve_state_files(config: &Config) {
    let reserved = || -> Result<()> {
        understudy_primary::host_state::HostState::open(&config.state_dir)?.reserve()?;
        understudy_common::durable::reserve(&config.state_dir.join(ROLE_FILE))?;
        Ok(())
    };
    if let Err(why) = reserved() {
        tracing::warn!(why = %format!("{why:#}"), "cannot reserve room for the state files: on a full disk, a promotion here could not record its generation");
    }
}

/// How the daemon starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// In the home section's role, or the one `state_dir/role` records.
    Home,
    /// As the destination of a live migration (`understudyd primary
    /// --incoming`): no boot; the host waits on `[primary].replication` for
    /// a source to move the VM here, then runs it as the primary.
    Incoming,
}

/// Runs the host of `home`; returns the process exit code.
pub fn run(home: Role, config: &Config, start: Start) -> Result<u8> {
    let mut incoming = start == Start::Incoming;
    if incoming {
        if home != Role::Primary {
            anyhow::bail!("--incoming is for `understudyd primary`: the VM arrives to run here");
        }
        if config.host(home).replication.is_none() {
            anyhow::bail!(
                "--incoming needs [primary].replication in {}: the address the source migrates the VM to",
                config.name
            );
        }
        if config.state_dir.join(ROLE_FILE).exists() {
            anyhow::bail!(
                "--incoming: {} says this host already has a role for VM {:?} (it ran or protected it);                  a host that has the VM cannot receive it. Delete the state directory's `role` file only                  if this host holds nothing of the VM",
                config.state_dir.join(ROLE_FILE).display(),
                config.name
            );
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("understudyd")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone())?;
        let mut role = if incoming {
            tracing::info!(vm = %config.name, "waiting for the VM to arrive by a live migration (--incoming)");
            Role::Backup
        } else {
            starting_role(home, config)?
        };
        if role != home && !incoming {
            tracing::info!(
                role = role.name(),
                "this host took the {} role in a switchover (state_dir/role): starting as the {}",
                role.name(),
                role.name()
            );
        }
        reserve_state_files(config);
        let addrs = config.host(home);
        let stats = Arc::new(Stats::new(&config.name, role, String::new(), 0));
        stats.set_mode(config.mode);
        if let Some(faults) = understudy_common::fault::describe() {
            tracing::warn!(%faults, "fault injection is armed ({}): for tests only", understudy_common::fault::ENV);
        }
        crate::tls_watch::spawn(config, stats.clone(), shutdown.clone());
        if config.tls.dangerously_allow_insecure_network {
            tracing::warn!(
                "tls.insecure = true on network addresses (tls.dangerously_allow_insecure_network): anyone \
                 who can reach this host's ports can read guest memory, crash, promote or move the VM"
            );
        } else if config.tls.insecure {
            tracing::warn!(
                "tls.insecure = true: replication and control run in plaintext (loopback only)"
            );
        }
        // One handle on the witness for every role this host takes: its
        // name in claims is its control address.
        let witness = match config.witness_config() {
            Some(w) => {
                let witness = understudy_common::witness::Witness::new(
                    &w,
                    &config.name,
                    addrs.control.to_string(),
                    stats.clone(),
                )?;
                tracing::info!(endpoints = ?w.endpoints, key = %witness.key(), "witness: role changes go through etcd");
                Some(witness)
            }
            None => None,
        };
        let supervisor = tokio::spawn(supervise::supervise(stats.clone(), shutdown.clone()));
        // Bound once: the roles take turns serving on it.
        let replication = match addrs.replication {
            Some(addr) => Some(SharedListener::bind("replication", addr).await?),
            None => None,
        };
        let mut host = HostIo::new(stats.clone(), replication);
        // Both hosts have a replication address: roles can change.
        let roles_can_change = config.switchover_unavailable().is_none();
        // A backup that can take the primary role records ahead what a
        // takeover must have on disk before the VM's first output.
        if roles_can_change {
            host.record_ahead = start_records_ahead(config);
        }

        // The host's servers, up across role changes.
        console::raise_descriptor_limit();
        let console_listener = wire::listen("console", addrs.console).await?;
        let console_tls = match (config.tls.console, config.tls_files()) {
            (true, Some(files)) => Some(console::ConsoleTls {
                server: understudy_common::server_tls::ServerTls::console(&files)?,
                auth: config.authority(home, Some(stats.clone())),
            }),
            _ => None,
        };
        tokio::spawn(console::serve(
            console_listener,
            host.log.clone(),
            host.input.clone(),
            console::ConsoleOptions {
                max_clients: config.console_max_clients,
                tls: console_tls,
            },
            shutdown.clone(),
        ));
        let control = wire::listen("control", addrs.control).await?;
        let control_tls =
            wire::server_tls(config.tls_files().as_ref()).map_err(anyhow::Error::msg)?;
        let control_router =
            tonic::transport::Server::builder().add_service(ControlServer::new(ControlService {
                stats: stats.clone(),
                operator: host.operator.clone(),
                auth: config.authority(home, Some(stats.clone())),
            }));
        let control_server = tokio::spawn(wire::serve(
            control_router,
            control,
            control_tls,
            shutdown.clone().cancelled_owned(),
        ));
        if let Some(addr) = addrs.metrics {
            let listener = wire::listen("metrics", addr).await?;
            let scrape = stats.clone();
            tokio::spawn(understudy_common::metrics::serve(
                listener,
                std::sync::Arc::new(move || scrape.render_metrics()),
                shutdown.clone(),
            ));
            tracing::info!(%addr, "metrics on /metrics");
        }

        let mut adopted = None;
        // A VM this host took over, and the thread recording that (see
        // `record_takeover`).
        let mut took_over = false;
        let mut records = None;
        let code = loop {
            if shutdown.is_cancelled() {
                break Ok(0);
            }
            // A host waiting for a migration has no role to come back to;
            // one that took the VM over records its role beside the start.
            if !incoming && !took_over {
                write_role(&config.state_dir, role)?;
            }
            let role_done = shutdown.child_token();
            match role {
                Role::Primary => {
                    let mut opts = config.primary_options(home).map_err(anyhow::Error::msg)?;
                    opts.auth = config.authority(home, Some(stats.clone()));
                    opts.witness = witness.clone();
                    stats.start_role(Role::Primary, opts.backup.to_string());
                    let start = adopted
                        .take()
                        .map_or(understudy_primary::Start::Boot, understudy_primary::Start::Adopt);
                    let result = understudy_primary::run(opts, host.clone(), role_done, start).await;
                    // The next role's records come after the takeover's.
                    settle(&mut records).await;
                    took_over = false;
                    let deposed = match result {
                        Ok(PrimaryExit::Shutdown) => break Ok(0),
                        Ok(PrimaryExit::VmEnded(end)) => {
                            tracing::info!(reason = %end, "guest ended");
                            break Ok(0);
                        }
                        Ok(PrimaryExit::HandedOver { generation }) => {
                            tracing::info!(generation, "switchover done: the other host runs the VM; this host is the backup now");
                            role = Role::Backup;
                            continue;
                        }
                        Ok(PrimaryExit::MigratedAway { generation, destination }) => {
                            tracing::info!(generation, %destination, "live migration done: the VM runs at the destination; nothing of it runs here");
                            break Ok(0);
                        }
                        Ok(PrimaryExit::Fenced { generation }) => format!(
                            "deposed by the other host's promotion at generation {generation}: VM stopped, its unacked output dropped"
                        ),
                        Err(e @ PrimaryError::Fenced { .. }) => e.to_string(),
                        Err(e) => break Err(e.into()),
                    };
                    if !roles_can_change {
                        tracing::error!("{deposed}");
                        eprintln!("understudyd: {deposed}");
                        break Ok(EXIT_FENCED);
                    }
                    tracing::warn!(%deposed, "this host becomes the backup of the VM's new primary");
                    role = Role::Backup;
                }
                Role::Backup => {
                    let mut opts = config.backup_options(home).map_err(anyhow::Error::msg)?;
                    opts.auth = config.authority(home, Some(stats.clone()));
                    opts.witness = witness.clone();
                    if incoming {
                        opts.incoming = true;
                        opts.auth = config.incoming_authority(Some(stats.clone()));
                        stats.set_state(
                            understudy_common::status::StateKind::Incoming,
                            "incoming: waiting for a live migration",
                        );
                    }
                    stats.start_role(Role::Backup, String::new());
                    match understudy_backup::run(opts, host.clone(), role_done).await {
                        Ok(BackupExit::Shutdown) => break Ok(0),
                        Ok(BackupExit::VmEnded(end)) => {
                            tracing::info!(reason = %end, "promoted guest ended");
                            break Ok(0);
                        }
                        Ok(BackupExit::TookOver(vm)) => {
                            if incoming {
                                tracing::info!("the VM arrived by a live migration: this host runs it as the primary");
                                incoming = false;
                            }
                            records = record_takeover(config, vm.generation);
                            took_over = true;
                            adopted = Some(vm);
                            role = Role::Primary;
                        }
                        Err(e) => break Err(e.into()),
                    }
                }
            }
        };
        shutdown.cancel();
        settle(&mut records).await;
        let _ = supervisor.await;
        let _ = control_server.await;
        code
    })
}

fn spawn_signal_handler(shutdown: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        shutdown.cancel();
    });
    Ok(())
}
