//! `understudyctl demo`: on one machine, start a backup and a primary
//! (`understudyd` child processes on loopback) protecting the `counter` guest,
//! show it running, SIGKILL the primary, show the backup taking over with the
//! count continuing, and print what was measured.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use understudy_common::console::ResumingClient;

use crate::remote;

/// Options of the demo.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// How long the protected VM runs before the primary is killed.
    pub run_for: Duration,
    /// How long to watch the backup after the takeover.
    pub after: Duration,
    /// Where to keep the demo's files (a temporary directory if None).
    pub dir: Option<PathBuf>,
}

struct Daemons(Vec<Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn daemon_binary() -> Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find this program's path")?;
    let daemon = me.with_file_name("understudyd");
    if !daemon.exists() {
        bail!(
            "{} not found: build both binaries (cargo build --release --bin understudyd --bin understudyctl)",
            daemon.display()
        );
    }
    Ok(daemon)
}

fn spawn(
    daemon: &Path,
    role: &str,
    config: &Path,
    dir: &Path,
    overrides: &[String],
) -> Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{role}.log")))?;
    let mut cmd = Command::new(daemon);
    cmd.arg(role).arg("--config").arg(config);
    for o in overrides {
        cmd.arg("--set").arg(o);
    }
    cmd.env("UNDERSTUDY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    cmd.spawn()
        .with_context(|| format!("cannot start {}", daemon.display()))
}

/// Reads console lines (with arrival times) until `stop` says so or `timeout`.
async fn read_lines(
    client: &mut ResumingClient,
    partial: &mut Vec<u8>,
    timeout: Duration,
    mut each: impl FnMut(&str, Instant) -> bool,
) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        while let Some(i) = partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial.drain(..=i).collect();
            if !each(String::from_utf8_lossy(&line[..i]).as_ref(), Instant::now()) {
                return Ok(true);
            }
        }
        match tokio::time::timeout_at(deadline, client.read(&mut buf)).await {
            Err(_) => return Ok(false),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(false),
            Ok(Ok(n)) => partial.extend_from_slice(&buf[..n]),
        }
    }
}

/// Runs the demo; prints as it goes and a summary at the end.
pub async fn run(opts: DemoOptions) -> Result<()> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        bail!("the demo needs /dev/kvm ({e}): run it on a host with KVM");
    }
    let daemon = daemon_binary()?;
    let tmp;
    let dir = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = std::env::temp_dir().join(format!("understudy-demo-{}", std::process::id()));
            std::fs::create_dir_all(&tmp)?;
            tmp
        }
    };
    let (pc, pk, rep, bc, bk) = (
        free_addr()?,
        free_addr()?,
        free_addr()?,
        free_addr()?,
        free_addr()?,
    );
    let config = dir.join("demo.toml");
    std::fs::write(
        &config,
        format!(
            "# Written by understudyctl demo.\nname = \"demo\"\nguest = \"counter\"\nmemory_mib = 64\n\
             state_dir = \"{}\"\nguest_params = {{ interval_ms = 50 }}\n\n[primary]\nconsole = \"{pc}\"\ncontrol = \"{pk}\"\n\n\
             [backup]\nreplication = \"{rep}\"\nconsole = \"{bc}\"\ncontrol = \"{bk}\"\n",
            dir.join("primary").display()
        ),
    )?;
    println!(
        "understudy demo: the counter guest, protected by a backup on this machine; then the primary gets SIGKILL."
    );
    println!("files and daemon logs: {}", dir.display());
    let mut daemons = Daemons(Vec::new());
    let backup_state = format!("state_dir={:?}", dir.join("backup").display().to_string());
    daemons
        .0
        .push(spawn(&daemon, "backup", &config, &dir, &[backup_state])?);
    println!(
        "backup   started (pid {}), replication on {rep}, console on {bc}",
        daemons.0[0].id()
    );
    let started = Instant::now();
    daemons
        .0
        .push(spawn(&daemon, "primary", &config, &dir, &[])?);
    let primary_pid = daemons.0[1].id();
    println!("primary  started (pid {primary_pid}), console on {pc}");

    // Initial sync: show progress until protected.
    let mut last_state = String::new();
    loop {
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "the primary did not become protected within 60 s; see {}",
                dir.join("primary.log").display()
            );
        }
        if let Ok(s) = remote::fetch_status(pk).await {
            if s.state != last_state {
                println!(
                    "primary  {} ({:.2} s)",
                    s.state,
                    started.elapsed().as_secs_f64()
                );
                last_state = s.state.clone();
            }
            if s.protected {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sync_time = started.elapsed();

    let mut client = ResumingClient::connect(pc, 0)
        .await
        .context("cannot connect to the primary's console")?;
    let mut partial = Vec::new();
    let mut counts = Vec::new();
    let mut last_primary_line = Instant::now();
    read_lines(&mut client, &mut partial, opts.run_for, |line, at| {
        println!("primary │ {line}");
        counts.extend(
            line.strip_prefix("count ")
                .and_then(|n| n.parse::<u64>().ok()),
        );
        last_primary_line = at;
        true
    })
    .await?;
    let before = remote::fetch_status(pk).await?;
    print!("{}", indent(&remote::render(&before)));

    println!("SIGKILL  → primary (pid {primary_pid})");
    let primary = &mut daemons.0[1];
    primary.kill().context("cannot kill the primary")?;
    let killed = Instant::now();
    primary.wait()?;
    // Whatever the primary delivered before it died.
    read_lines(
        &mut client,
        &mut partial,
        Duration::from_millis(50),
        |line, at| {
            println!("primary │ {line}");
            counts.extend(
                line.strip_prefix("count ")
                    .and_then(|n| n.parse::<u64>().ok()),
            );
            last_primary_line = at;
            true
        },
    )
    .await?;
    let offset = client.offset - partial.len() as u64;
    partial.clear();
    let mut client = ResumingClient::connect(bc, offset)
        .await
        .context("cannot connect to the backup's console")?;
    let mut first_backup_byte = None;
    let mut first_backup_line = None;
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf))
        .await
        .context("the backup did not take over within 10 s")??;
    first_backup_byte.get_or_insert(Instant::now());
    partial.extend_from_slice(&buf[..n]);
    read_lines(&mut client, &mut partial, opts.after, |line, at| {
        println!("backup  │ {line}");
        counts.extend(
            line.strip_prefix("count ")
                .and_then(|n| n.parse::<u64>().ok()),
        );
        first_backup_line.get_or_insert(at);
        true
    })
    .await?;
    let after = remote::fetch_status(bk).await?;
    print!("{}", indent(&remote::render(&after)));

    let failover = first_backup_byte.map(|t| t - killed).unwrap_or_default();
    let gap = first_backup_line
        .map(|t| t.saturating_duration_since(last_primary_line))
        .unwrap_or_default();
    let seamless = counts.windows(2).all(|w| w[1] == w[0] + 1) && counts.first() == Some(&0);
    println!("\nsummary");
    println!(
        "  failover time     {:>8.1} ms  SIGKILL → first console byte from the backup",
        failover.as_secs_f64() * 1e3
    );
    println!(
        "    detection       {:>8.1} ms  silence before the backup promoted (heartbeat timeout)",
        after.promotion_detect_micros as f64 / 1e3
    );
    println!(
        "    resume          {:>8.1} ms  promotion → VM running (map image, restore state)",
        after.promotion_resume_micros as f64 / 1e3
    );
    println!(
        "  downtime          {:>8.1} ms  last line from the primary → first line from the backup",
        gap.as_secs_f64() * 1e3
    );
    println!(
        "  epoch pause       {:>8.0} µs  p50 ({:.0} µs p99) guest stopped per checkpoint",
        before.pause_p50_micros, before.pause_p99_micros
    );
    println!(
        "  initial sync      {:>8.2} s   start → protected ({} MiB guest)",
        sync_time.as_secs_f64(),
        64
    );
    println!(
        "  data shipped      {:>8.2} MiB over {} epochs ({:.1}/s)",
        before.bytes_shipped as f64 / (1 << 20) as f64,
        before.epochs,
        before.epochs_per_second
    );
    println!("  last acked epoch  {:>8}", before.last_epoch);
    println!(
        "  console           {} lines, {}",
        counts.len(),
        if seamless {
            "one unbroken count sequence: no gap, no repeat, no restart"
        } else {
            "SEQUENCE BROKEN"
        }
    );
    // Stop the promoted VM cleanly.
    if let Some(backup) = daemons.0.first() {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(backup.id() as libc::pid_t, libc::SIGTERM) };
    }
    if !seamless {
        bail!("the console sequence was broken across the failover: {counts:?}");
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("         {l}\n")).collect()
}
