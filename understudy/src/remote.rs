//! `understudyctl status`: a daemon's live figures over its Control service.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use understudy_common::wire::TlsFiles;
use understudy_proto::control_client::ControlClient;
use understudy_proto::{StatusReply, StatusRequest, SwitchoverReply, SwitchoverRequest};

use crate::config::Config;
use crate::daemon::Role;

/// How long an operator request that moves the VM (switchover, promote)
/// may take: a final checkpoint's ack and a restore take well under a
/// second; this leaves room for a slow disk.
const OPERATOR_RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// A channel to a daemon's control service (mutual TLS when `tls` is given:
/// the daemon's certificate must name `addr`'s IP).
async fn control_channel(
    addr: SocketAddr,
    tls: Option<&TlsFiles>,
) -> Result<ControlClient<tonic::transport::Channel>> {
    control_client(addr, tls, Duration::from_secs(5)).await
}

/// A client of the control service at `addr` (mutual TLS when `tls` is
/// given) whose calls may take up to `timeout`.
pub async fn control_client(
    addr: SocketAddr,
    tls: Option<&TlsFiles>,
    timeout: Duration,
) -> Result<ControlClient<tonic::transport::Channel>> {
    // http://: the TLS, if any, is the connector's (`wire::TlsConnector`:
    // the daemon's certificate checked against the CA and the CRL).
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(timeout);
    let channel = match tls {
        Some(tls) => {
            let connector = tls.connector(&addr.ip().to_string())?;
            endpoint.connect_with_connector(connector).await
        }
        None => endpoint.connect().await,
    }
    .with_context(|| {
        format!("cannot reach the control service at {addr}: is understudyd running there?")
    })?;
    Ok(ControlClient::new(channel))
}

/// Fetches a daemon's status.
pub async fn fetch_status(addr: SocketAddr, tls: Option<&TlsFiles>) -> Result<StatusReply> {
    Ok(control_channel(addr, tls)
        .await?
        .status(StatusRequest {})
        .await
        .with_context(|| format!("status request to {addr} failed"))?
        .into_inner())
}

/// Fetches a primary's recent per-checkpoint figures.
pub async fn fetch_epochs(
    addr: SocketAddr,
    tls: Option<&TlsFiles>,
) -> Result<Vec<understudy_proto::EpochSample>> {
    Ok(control_channel(addr, tls)
        .await?
        .epochs(understudy_proto::EpochsRequest {})
        .await?
        .into_inner()
        .samples)
}

/// Asks the primary at `addr` for a switchover; returns once the other host
/// runs the VM.
pub async fn request_switchover(
    addr: SocketAddr,
    tls: Option<&TlsFiles>,
) -> Result<SwitchoverReply> {
    let mut client = control_channel(addr, tls).await?;
    let mut request = tonic::Request::new(SwitchoverRequest {});
    // The final checkpoint's ack and the other host's restore take well
    // under a second; leave room for a slow disk.
    request.set_timeout(OPERATOR_RPC_TIMEOUT);
    let reply = client
        .switchover(request)
        .await
        .map_err(|status| anyhow::anyhow!("the switchover did not happen: {}", status.message()))?;
    Ok(reply.into_inner())
}

/// Asks the primary at `addr` to SIGKILL itself (a kill drill). Only a
/// refusal is an error: a daemon that dies before its answer is out did what
/// was asked, and the drill sees the takeover for itself.
pub async fn request_crash(addr: SocketAddr, tls: Option<&TlsFiles>) -> Result<()> {
    match control_channel(addr, tls)
        .await?
        .crash(understudy_proto::CrashRequest {})
        .await
    {
        Ok(_) => Ok(()),
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            anyhow::bail!("{}", status.message())
        }
        Err(status) => {
            tracing::debug!(%status, "no answer from the primary told to die");
            Ok(())
        }
    }
}

/// The pair's hosts, by their config section, with the status each gave
/// (None: not reachable).
pub async fn pair_status(config: &Config) -> Vec<(Role, SocketAddr, Option<StatusReply>)> {
    let tls = config.tls_files();
    let mut out = Vec::new();
    for section in [Role::Primary, Role::Backup] {
        let addr = config.host(section).control;
        out.push((section, addr, fetch_status(addr, tls.as_ref()).await.ok()));
    }
    out
}

/// The control address of whichever host runs the VM as the primary.
pub async fn find_primary(config: &Config) -> Result<(Role, SocketAddr)> {
    find_role(config, Role::Primary).await
}

/// The config section and control address of the host with `role`.
pub async fn find_role(config: &Config, role: Role) -> Result<(Role, SocketAddr)> {
    let hosts = pair_status(config).await;
    let matching: Vec<_> = hosts
        .iter()
        .filter(|(_, _, s)| s.as_ref().is_some_and(|s| s.role == role.name()))
        .collect();
    match matching.as_slice() {
        [(section, addr, _)] => Ok((*section, *addr)),
        [] => {
            let seen: Vec<String> = hosts
                .iter()
                .map(|(_, addr, s)| match s {
                    Some(s) => format!("{addr}: {} ({})", s.role, s.state),
                    None => format!("{addr}: unreachable"),
                })
                .collect();
            anyhow::bail!(
                "no host of the pair has the {role} role: {}",
                seen.join("; ")
            )
        }
        _ => anyhow::bail!(
            "both hosts report the {role} role: one of them is changing roles; try again shortly"
        ),
    }
}

/// Asks the backup at `addr` to resume the VM from its image.
pub async fn request_promote(
    addr: SocketAddr,
    tls: Option<&TlsFiles>,
) -> Result<understudy_proto::PromoteReply> {
    let mut client = control_channel(addr, tls).await?;
    let mut request = tonic::Request::new(understudy_proto::PromoteRequest {});
    request.set_timeout(OPERATOR_RPC_TIMEOUT);
    Ok(client
        .promote(request)
        .await
        .map_err(|status| anyhow::anyhow!("{}", status.message()))?
        .into_inner())
}

/// Asks the backup at `addr` to forget the VM its image holds.
pub async fn request_discard(
    addr: SocketAddr,
    tls: Option<&TlsFiles>,
) -> Result<understudy_proto::DiscardImageReply> {
    Ok(control_channel(addr, tls)
        .await?
        .discard_image(understudy_proto::DiscardImageRequest {})
        .await
        .map_err(|status| anyhow::anyhow!("{}", status.message()))?
        .into_inner())
}

/// A byte count for people (B, KiB, MiB, GiB).
pub(crate) fn human_bytes(b: f64) -> String {
    match b {
        b if b >= (1u64 << 30) as f64 => format!("{:.2} GiB", b / (1u64 << 30) as f64),
        b if b >= (1 << 20) as f64 => format!("{:.2} MiB", b / (1 << 20) as f64),
        b if b >= 1024.0 => format!("{:.1} KiB", b / 1024.0),
        b => format!("{b:.0} B"),
    }
}

/// The adaptive codec's decision and what it was made from.
pub(crate) fn codec_line(c: &understudy_proto::CodecStatus) -> String {
    let link = if c.link_bytes_per_second > 0.0 {
        format!("{}/s", human_bytes(c.link_bytes_per_second))
    } else {
        "not measured yet".to_owned()
    };
    format!(
        "{} (link {link}, compressor {}/s saving {:.0} %)",
        if c.compressing { "compressing" } else { "raw" },
        human_bytes(c.compress_bytes_per_second),
        c.saved_share * 100.0
    )
}

/// Renders the pair's view: who runs the VM, who protects it, then each
/// host's status (`status --config FILE`).
pub fn render_pair(config: &Config, hosts: &[(Role, SocketAddr, Option<StatusReply>)]) -> String {
    let describe = |role: &Role, addr: &SocketAddr| format!("the [{}] host ({addr})", role.name());
    let running: Vec<_> = hosts
        .iter()
        .filter(|(_, _, s)| s.as_ref().is_some_and(|s| s.role == Role::Primary.name()))
        .collect();
    let backups: Vec<_> = hosts
        .iter()
        .filter(|(_, _, s)| s.as_ref().is_some_and(|s| s.role == Role::Backup.name()))
        .collect();
    let mut out = format!("VM {}\n", config.name);
    match running.as_slice() {
        [(role, addr, Some(s))] => {
            out.push_str(&format!(
                "  runs on       {} as the primary, generation {}\n",
                describe(role, addr),
                s.generation
            ));
            let protected_by = match backups.as_slice() {
                [(role, addr, Some(b))] if s.protected => format!(
                    "{} (last epoch {})",
                    describe(role, addr),
                    if b.has_epoch {
                        b.last_epoch.to_string()
                    } else {
                        "none yet".into()
                    }
                ),
                [(role, addr, Some(b))] => {
                    format!("nobody yet: {} is {}", describe(role, addr), b.state)
                }
                _ => "nobody: the VM is unprotected".into(),
            };
            out.push_str(&format!("  protected by  {protected_by}\n"));
        }
        [] => out.push_str("  runs on       no host of the pair reports the primary role\n"),
        _ => out.push_str(
            "  runs on       both hosts report the primary role (one is changing roles, or \
             the link is cut with backup_loss = \"keep-running\")\n",
        ),
    }
    for (role, addr, status) in hosts {
        out.push_str(&format!("\n[{}] {addr}\n", role.name()));
        match status {
            Some(s) => {
                for line in render(s).lines() {
                    out.push_str(&format!("  {line}\n"));
                }
            }
            None => out.push_str("  unreachable (is understudyd running there?)\n"),
        }
    }
    out
}

/// Renders a status as aligned `field value` lines.
pub fn render(s: &StatusReply) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("VM", s.vm_id.clone()),
        ("role", s.role.clone()),
        (
            "state",
            // The kind, and the sentence when it says more.
            if s.state_kind.is_empty() || s.state == s.state_kind {
                s.state.clone()
            } else {
                format!("{} ({})", s.state_kind, s.state)
            },
        ),
        (
            "mode",
            if s.mode.is_empty() {
                "checkpoint".into()
            } else {
                s.mode.clone()
            },
        ),
        ("generation", s.generation.to_string()),
        (
            "incarnation",
            if s.incarnation.is_empty() {
                "none yet".into()
            } else {
                s.incarnation.clone()
            },
        ),
        (
            "protected",
            if s.protected {
                "yes".into()
            } else {
                "no".into()
            },
        ),
        (
            "last epoch",
            if s.has_epoch {
                s.last_epoch.to_string()
            } else {
                "none yet".into()
            },
        ),
    ];
    // Epoch figures exist only where checkpoints are taken (a running primary).
    if s.pause_p50_micros > 0.0 {
        rows.extend([
            (
                "epoch rate",
                format!("{:.1}/s ({} epochs)", s.epochs_per_second, s.epochs),
            ),
            (
                "pause",
                format!(
                    "p50 {:.0} µs, p99 {:.0} µs",
                    s.pause_p50_micros, s.pause_p99_micros
                ),
            ),
            (
                "dirty pages",
                format!("{:.1} per epoch", s.dirty_pages_per_epoch),
            ),
            (
                "shipped",
                format!(
                    "{} per epoch, {} in all",
                    human_bytes(s.bytes_per_epoch),
                    human_bytes(s.bytes_shipped as f64)
                ),
            ),
            (
                "replication lag",
                format!(
                    "{} epoch(s) unacked, ack latency p50 {:.0} µs",
                    s.replication_lag_epochs, s.ack_latency_micros
                ),
            ),
        ]);
    } else if s.bytes_shipped > 0 {
        rows.push(("received", human_bytes(s.bytes_shipped as f64)));
    }
    if s.mode == "replay" && (s.replica_lag_exits > 0 || s.replica_lag_millis > 0.0) {
        rows.push((
            "replica lag",
            format!(
                "{} exits, {:.1} ms behind the log",
                s.replica_lag_exits, s.replica_lag_millis
            ),
        ));
    }
    if s.promotion_resume_micros > 0 {
        let resume = s.promotion_resume_micros as f64 / 1e3;
        rows.push((
            "promotion",
            if s.promotion_detect_micros == 0 {
                format!("by handover (switchover); running {resume:.1} ms later")
            } else {
                format!(
                    "after {:.1} ms of silence; running {resume:.1} ms later",
                    s.promotion_detect_micros as f64 / 1e3
                )
            },
        ));
    }
    if !s.peer.is_empty() {
        rows.push(("peer", s.peer.clone()));
    }
    if let Some(m) = &s.migration {
        rows.push((
            "migration",
            format!(
                "{} to {} by {}: round {}, {} sent{}",
                m.phase,
                m.destination,
                m.mode,
                m.round,
                human_bytes(m.bytes_transferred as f64),
                if m.error.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", m.error)
                }
            ),
        ));
    }
    if let Some(c) = s.migration.as_ref().and_then(|m| m.codec.as_ref()) {
        rows.push(("migration codec", codec_line(c)));
    }
    if let Some(c) = &s.codec {
        rows.push(("codec", codec_line(c)));
    }
    if let Some(w) = &s.witness {
        let mut line = if w.reachable {
            format!(
                "reachable; key holds \"{}\"",
                if w.claim.is_empty() {
                    "nothing yet"
                } else {
                    &w.claim
                }
            )
        } else if w.error.is_empty() {
            "not asked yet".to_owned()
        } else {
            format!("UNREACHABLE ({})", w.error)
        };
        if !w.last_decision.is_empty() {
            line.push_str(&format!(
                "; last decision: {} ({}, {:.1} ms)",
                w.last_decision,
                w.last_outcome,
                w.last_decision_micros as f64 / 1e3
            ));
        }
        rows.push(("witness", line));
    }
    for warning in &s.warnings {
        rows.push(("WARNING", warning.clone()));
    }
    rows.iter().map(|(k, v)| format!("{k:<16}{v}\n")).collect()
}
