//! The daemon's watch over the TLS certificates it presents and trusts
//! (`understudy_common::tls_validity` says why): checked when it starts and
//! every hour, each file's end of validity a metric, what needs doing in the
//! status and the log.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use understudy_common::status::Stats;
use understudy_common::tls_validity::{self, Validity};

use crate::config::Config;

/// How often the files are read again.
pub const CHECK_EVERY: Duration = Duration::from_secs(3600);

/// The certificate files a daemon with `config` presents or trusts: the
/// pair's, and the witness's. Empty in insecure mode.
fn files(config: &Config) -> Vec<(&'static str, PathBuf)> {
    let mut files = Vec::new();
    if let Some(tls) = config.tls_files() {
        files.push(("certificate", tls.cert));
        files.push(("CA certificate", tls.ca));
    }
    if let Some(tls) = config.witness_config().and_then(|w| w.tls) {
        files.push(("witness client certificate", tls.cert));
        files.push(("witness CA certificate", tls.ca));
    }
    files
}

fn read(files: &[(&'static str, PathBuf)]) -> Result<Vec<Validity>, tls_validity::ValidityError> {
    let refs: Vec<(&'static str, &std::path::Path)> =
        files.iter().map(|(w, p)| (*w, p.as_path())).collect();
    tls_validity::read(&refs)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// One look at the files: the metrics, the status, and a log line for each
/// warning when they changed.
fn check(files: &[(&'static str, PathBuf)], window: Duration, stats: &Stats) {
    let warnings = match read(files) {
        Ok(certs) => {
            for (what, path) in files {
                let end = certs
                    .iter()
                    .filter(|c| c.what == *what)
                    .map(|c| c.not_after)
                    .min();
                if let Some(end) = end {
                    stats
                        .metrics
                        .set_tls_not_after(what, &path.display().to_string(), end);
                }
            }
            tls_validity::warnings(&certs, now(), window)
        }
        Err(e) => vec![format!(
            "{}: this daemon cannot tell when its certificates expire",
            understudy_common::wire::chain(&e)
        )],
    };
    if stats.set_tls_warnings(warnings.clone()) {
        if warnings.is_empty() {
            tracing::info!("TLS certificates: none expires within the warning window any more");
        }
        for warning in &warnings {
            tracing::warn!("{warning}");
        }
    }
}

/// What `understudyd check` says of the certificates of `config`: each
/// file's end of validity, then what needs doing (as the daemon would warn).
pub fn report(config: &Config) -> Vec<String> {
    let files = files(config);
    if files.is_empty() {
        return Vec::new();
    }
    let window = config.tls.expiry_warning();
    let mut lines = Vec::new();
    // A revocation list is put through what the servers do with it (it
    // must pass this host's own certificate).
    if let Some(tls) = config.tls_files()
        && let Some(crl) = &tls.crl
    {
        lines.push(match tls.server_config(Vec::new()) {
            Ok(_) => format!(
                "TLS certificate revocation list {}: loads, and passes this host's certificate",
                crl.display()
            ),
            Err(e) => format!("warning: {}", understudy_common::wire::chain(&e)),
        });
    }
    lines.extend(certificates(&files, window));
    lines
}

/// Each certificate file's end of validity, then the warnings.
fn certificates(files: &[(&'static str, PathBuf)], window: Duration) -> Vec<String> {
    match read(files) {
        Ok(certs) => {
            let mut lines: Vec<String> = certs
                .iter()
                .map(|c| {
                    format!(
                        "TLS {} {} ({}): valid until {}",
                        c.what,
                        c.path.display(),
                        c.subject,
                        tls_validity::utc(c.not_after)
                    )
                })
                .collect();
            lines.extend(
                tls_validity::warnings(&certs, now(), window)
                    .into_iter()
                    .map(|w| format!("warning: {w}")),
            );
            lines
        }
        Err(e) => vec![format!("warning: {}", understudy_common::wire::chain(&e))],
    }
}

/// Watches the certificates of `config` until `shutdown` (nothing to do in
/// insecure mode). What the files hold is what the daemon presents: the
/// servers load them again when they change, the clients read them at each
/// connection, the witness's client is built again when they change.
pub fn spawn(config: &Config, stats: Arc<Stats>, shutdown: CancellationToken) {
    let files = files(config);
    if files.is_empty() {
        return;
    }
    let window = config.tls.expiry_warning();
    check(&files, window, &stats);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(CHECK_EVERY) => check(&files, window, &stats),
            }
        }
    });
}
