//! `understudyd`: runs one VM's role (primary or backup) from its config until
//! SIGTERM/SIGINT, a fence, or the guest's end.

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use understudy_backup::BackupExit;
use understudy_common::status::Stats;
use understudy_primary::{PrimaryError, PrimaryExit};

use crate::config::Config;
use crate::supervise;

/// The role to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Backup,
}

/// Exit code of a daemon that refused to run because it was deposed.
pub const EXIT_FENCED: u8 = 3;

/// Runs the role; returns the process exit code.
pub fn run(role: Role, config: &Config) -> Result<u8> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("understudyd")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone())?;
        let (role_name, peer) = match role {
            Role::Primary => ("primary", config.backup.replication.to_string()),
            Role::Backup => ("backup", String::new()),
        };
        let stats = Arc::new(Stats::new(&config.name, role_name, peer, 0));
        if config.tls.insecure {
            tracing::warn!(
                "tls.insecure = true: replication and control run in plaintext; guest memory crosses the network unencrypted"
            );
        }
        let supervisor = tokio::spawn(supervise::supervise(stats.clone(), shutdown.clone()));
        let metrics_addr = match role {
            Role::Primary => config.primary.metrics,
            Role::Backup => config.backup.metrics,
        };
        if let Some(addr) = metrics_addr {
            let listener = understudy_common::wire::listen("metrics", addr).await?;
            tokio::spawn(understudy_common::metrics::serve(listener, stats.clone(), shutdown.clone()));
            tracing::info!(%addr, "metrics on /metrics");
        }
        let code = match role {
            Role::Primary => {
                let opts = config.primary_options().map_err(anyhow::Error::msg)?;
                match understudy_primary::run(opts, stats, shutdown.clone()).await {
                    Ok(PrimaryExit::Shutdown) => Ok(0),
                    Ok(PrimaryExit::VmEnded(end)) => {
                        tracing::info!(reason = %end, "guest ended");
                        Ok(0)
                    }
                    Ok(PrimaryExit::Fenced { generation }) => {
                        tracing::error!(generation, "deposed by the backup's promotion: VM stopped, its unacked output dropped");
                        Ok(EXIT_FENCED)
                    }
                    Err(e @ PrimaryError::Fenced { .. }) => {
                        tracing::error!("{e}");
                        eprintln!("understudyd: {e}");
                        Ok(EXIT_FENCED)
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Role::Backup => match understudy_backup::run(config.backup_options(), stats, shutdown.clone()).await {
                Ok(BackupExit::Shutdown) => Ok(0),
                Ok(BackupExit::VmEnded(end)) => {
                    tracing::info!(reason = %end, "promoted guest ended");
                    Ok(0)
                }
                Err(e) => Err(e.into()),
            },
        };
        shutdown.cancel();
        let _ = supervisor.await;
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
