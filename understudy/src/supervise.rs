//! Tells systemd how the daemon is doing (`Type=notify` units): `READY=1` once
//! the primary's VM is protected, or once the backup has its image loaded and a
//! primary linked up; `STATUS=` lines with role, generation, protection and
//! epoch whenever they change; after READY, `WATCHDOG=1` at half the
//! `WatchdogSec` interval while the runtime is alive; `STOPPING=1` when
//! shutdown starts. Without
//! `NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use understudy_common::status::Stats;

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

fn status_line(stats: &Stats) -> String {
    let epoch = stats
        .last_epoch()
        .map_or_else(|| "-".to_owned(), |e| e.to_string());
    format!(
        "role={} generation={} protected={} epoch={} state={} ({})",
        stats.role(),
        stats.generation.load(Ordering::Acquire),
        if stats.protected.load(Ordering::Acquire) {
            "yes"
        } else {
            "no"
        },
        epoch,
        stats.state_kind(),
        stats.state()
    )
}

fn ready(stats: &Stats) -> bool {
    match stats.role() {
        understudy_common::ids::Role::Backup => stats.link_up.load(Ordering::Acquire),
        // A primary is ready once protected; a promoted backup is running.
        _ => {
            stats.protected.load(Ordering::Acquire)
                || stats.state_kind() == understudy_common::status::StateKind::Promoted
        }
    }
}

/// Runs until `shutdown`, then sends `STOPPING=1`.
pub async fn supervise(stats: Arc<Stats>, shutdown: CancellationToken) {
    let watchdog = sd_notify::watchdog_enabled();
    let period = watchdog.map_or(Duration::from_millis(200), |w| {
        (w / 2).min(Duration::from_millis(200))
    });
    let mut tick = tokio::time::interval(period);
    let mut was_ready = false;
    let mut last_status = String::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let status = status_line(&stats);
        let mut states = Vec::new();
        if !was_ready && ready(&stats) {
            was_ready = true;
            states.push(NotifyState::Ready);
        }
        if status != last_status {
            states.push(NotifyState::Status(&status));
        }
        // systemd arms the watchdog once the service is ready.
        if watchdog.is_some() && was_ready {
            states.push(NotifyState::Watchdog);
        }
        if !states.is_empty() {
            notify(&states);
        }
        last_status = status;
    }
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}
