//! `understudyctl migrate`: asks the pair's primary to move its VM to a host
//! waiting with `understudyd primary --incoming`, shows progress while it
//! runs (from the primary's status), and reports what it cost.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use understudy_proto::{MigrateReply, MigrateRequest, MigrationProgress};

use crate::config::Config;
use crate::remote::{codec_line, human_bytes};

/// How long a migration may take before the CLI stops waiting (the
/// primary carries on and reports in its status).
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(3600);
/// How often progress is polled.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// What the operator asked for.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// The destination's replication address.
    pub to: SocketAddr,
    /// The name its certificate carries (default: its IP).
    pub to_name: Option<String>,
    /// "stop-and-copy", "precopy", "postcopy", "hybrid" or "replay".
    pub mode: String,
    /// The stop a pre-copy switch may take.
    pub max_downtime: Duration,
    /// Print progress lines to stderr while it runs.
    pub progress: bool,
}

/// Runs a migration of the VM `config` describes; returns its report.
pub async fn run(config: &Config, opts: &MigrateOptions) -> Result<MigrateReply> {
    let (_, control) = crate::remote::find_primary(config).await?;
    let tls = config.tls_files();
    let request = MigrateRequest {
        destination: opts.to.to_string(),
        destination_name: opts.to_name.clone().unwrap_or_default(),
        mode: opts.mode.clone(),
        max_downtime_micros: opts.max_downtime.as_micros() as u64,
    };
    let mut client = crate::remote::control_client(control, tls.as_ref(), MIGRATE_TIMEOUT).await?;
    let mut call = Box::pin(async move {
        let mut request = tonic::Request::new(request);
        request.set_timeout(MIGRATE_TIMEOUT);
        client.migrate(request).await
    });
    let started = Instant::now();
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let mut last = String::new();
    loop {
        tokio::select! {
            reply = &mut call => {
                if opts.progress && !last.is_empty() {
                    eprintln!();
                }
                return reply.map(tonic::Response::into_inner).map_err(|status| {
                    // `Unknown`: the source handed the VM over and then lost
                    // track of it (see `finish_migration`); anything else:
                    // it failed before the switch, the VM runs on there.
                    let context = if status.code() == tonic::Code::Unknown {
                        "the migration's outcome is not known"
                    } else {
                        "the migration did not happen"
                    };
                    anyhow::anyhow!("{}", status.message()).context(context)
                });
            }
            _ = tick.tick(), if opts.progress => {
                let Ok(status) = crate::remote::fetch_status(control, tls.as_ref()).await else {
                    continue;
                };
                if let Some(p) = status.migration.filter(|p| p.phase != "done" && p.phase != "failed") {
                    let line = progress_line(&p, started.elapsed());
                    if line != last {
                        eprintln!("{line}");
                        last = line;
                    }
                }
            }
        }
    }
}

/// One progress line.
pub fn progress_line(p: &MigrationProgress, elapsed: Duration) -> String {
    format!(
        "{:>6.1} s  {:<13} round {:<3} sent {:>9}  to go {:>7} pages  {:>9}/s  dirty {:>7.0} pages/s  throttle {:>2}%",
        elapsed.as_secs_f64(),
        p.phase,
        p.round,
        human_bytes(p.bytes_transferred as f64),
        p.remaining_pages,
        human_bytes(p.rate_bytes_per_second),
        p.dirty_pages_per_second,
        p.throttle_percent
    )
}

/// The report as text.
pub fn render(r: &MigrateReply) -> String {
    let ms = |us: u64| format!("{:.1} ms", us as f64 / 1e3);
    let rows: Vec<(&str, String)> = vec![
        ("destination", r.destination.clone()),
        ("mode", r.mode.clone()),
        ("generation", r.generation.to_string()),
        (
            "downtime",
            format!(
                "{} ({} until the last byte left for the destination)",
                ms(r.downtime_micros),
                ms(r.sent_micros)
            ),
        ),
        ("total time", ms(r.total_micros)),
        ("setup time", ms(r.setup_micros)),
        ("transferred", human_bytes(r.bytes_transferred as f64)),
        (
            "pages",
            format!(
                "{} sent ({} zero, {} duplicate), {} held there already",
                r.pages_transferred, r.zero_pages, r.duplicate_pages, r.held_pages
            ),
        ),
        ("rounds", r.rounds.to_string()),
        (
            "dirty rate",
            format!("{:.0} pages/s", r.dirty_pages_per_second),
        ),
        (
            "final stop",
            format!(
                "{} pages, {}",
                r.final_pages,
                human_bytes(r.final_bytes as f64)
            ),
        ),
        (
            "guest ran",
            format!(
                "{:.1} % of the time before the switch (auto-converge held it up to {} %)",
                r.guest_run_share * 100.0,
                r.throttle_percent
            ),
        ),
        ("restore there", ms(r.resume_micros)),
    ];
    let mut rows = rows;
    if let Some(c) = &r.codec {
        rows.push(("codec", codec_line(c)));
    }
    if r.postcopy_pages > 0 || r.mode == "postcopy" || r.mode == "hybrid" {
        rows.extend([
            (
                "post-copy",
                format!(
                    "{} pages after the switch in {}, {} asked for at a fault",
                    r.postcopy_pages,
                    ms(r.postcopy_micros),
                    r.postcopy_requests
                ),
            ),
            (
                "fault wait",
                format!(
                    "p50 {}, p99 {}",
                    ms(r.fault_wait_p50_micros),
                    ms(r.fault_wait_p99_micros)
                ),
            ),
        ]);
    }
    if r.mode == "replay" {
        rows.extend([
            (
                "base stop",
                format!(
                    "{} (the checkpoint the log follows)",
                    ms(r.base_pause_micros)
                ),
            ),
            (
                "log",
                format!(
                    "{} in {}, replayed there as it came",
                    human_bytes(r.log_bytes as f64),
                    ms(r.log_phase_micros)
                ),
            ),
        ]);
    }
    let mut out = String::from("migration done: the destination runs the VM\n");
    for (k, v) in rows {
        out.push_str(&format!("  {k:<14}{v}\n"));
    }
    out
}

/// The report as JSON (one object; times in microseconds).
pub fn to_json(r: &MigrateReply) -> serde_json::Value {
    serde_json::json!({
        "destination": r.destination,
        "mode": r.mode,
        "generation": r.generation,
        "downtime_micros": r.downtime_micros,
        "sent_micros": r.sent_micros,
        "total_micros": r.total_micros,
        "setup_micros": r.setup_micros,
        "bytes_transferred": r.bytes_transferred,
        "pages_transferred": r.pages_transferred,
        "zero_pages": r.zero_pages,
        "duplicate_pages": r.duplicate_pages,
        "held_pages": r.held_pages,
        "rounds": r.rounds,
        "dirty_pages_per_second": r.dirty_pages_per_second,
        "final_pages": r.final_pages,
        "final_bytes": r.final_bytes,
        "throttle_percent": r.throttle_percent,
        "guest_run_share": r.guest_run_share,
        "resume_micros": r.resume_micros,
        "postcopy_requests": r.postcopy_requests,
        "postcopy_pages": r.postcopy_pages,
        "postcopy_micros": r.postcopy_micros,
        "fault_wait_p50_micros": r.fault_wait_p50_micros,
        "fault_wait_p99_micros": r.fault_wait_p99_micros,
        "log_bytes": r.log_bytes,
        "base_pause_micros": r.base_pause_micros,
        "log_phase_micros": r.log_phase_micros,
        "codec": r.codec.as_ref().map(|c| serde_json::json!({
            "compressing": c.compressing,
            "link_bytes_per_second": c.link_bytes_per_second,
            "compress_bytes_per_second": c.compress_bytes_per_second,
            "saved_share": c.saved_share,
        })),
    })
}
