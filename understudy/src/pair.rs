//! A primary/backup pair of `understudyd` child processes on loopback, with a
//! written configuration, free ports and per-role log files: what the demo,
//! the drills and the benchmarks run against. Dropping the pair kills both
//! daemons.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use understudy_common::console::ResumingClient;

use crate::daemon::Role;
use crate::remote;

/// Where each daemon listens.
#[derive(Clone, Copy, Debug)]
pub struct PairAddrs {
    /// The primary's console.
    pub primary_console: SocketAddr,
    /// The primary's control service.
    pub primary_control: SocketAddr,
    /// Where the primary's host listens once a switchover made it the backup.
    pub primary_replication: SocketAddr,
    /// The backup's replication address.
    pub replication: SocketAddr,
    /// The backup's console.
    pub backup_console: SocketAddr,
    /// The backup's control service.
    pub backup_control: SocketAddr,
}

/// A local pair. State lives in `dir/primary` and `dir/backup` (emptied
/// first: an earlier run's fence marker or image must not change this one),
/// logs in `dir/primary.log` and `dir/backup.log`.
#[derive(Debug)]
pub struct LocalPair {
    /// Where the config, state and logs live.
    pub dir: PathBuf,
    /// The pair's config file.
    pub config: PathBuf,
    /// Its addresses.
    pub addrs: PairAddrs,
    daemon: PathBuf,
    primary: Option<Child>,
    backup: Option<Child>,
}

fn free_addr() -> Result<SocketAddr> {
    unused_loopback_addr()
}

/// The low end of the kernel's ephemeral port range (outgoing connections
/// take their local ports from there).
fn ephemeral_low() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A loopback address nobody listens on, for a daemon to bind later. It lies
/// below the ephemeral port range: a port the kernel hands out for `:0` could
/// meanwhile become some outgoing connection's local port, and the daemon
/// would then fail with "address in use". Each call in a process returns a
/// different port.
pub fn unused_loopback_addr() -> Result<SocketAddr> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const START: u32 = 10_000;
    let end = ephemeral_low().unwrap_or(32_768).max(START + 1_000);
    let span = end - START;
    let seed = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let port = START + (seed + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port as u16)) {
            return Ok(listener.local_addr()?);
        }
    }
    bail!("no free loopback port between {START} and {end}")
}

/// `understudyd` beside the running program (both binaries are built together).
pub fn daemon_binary() -> Result<PathBuf> {
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

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Backup => "backup",
    }
}

impl LocalPair {
    /// Writes `dir/<name>.toml` for VM `name`. `settings` are top-level TOML
    /// lines (guest, memory, intervals; tables such as `[codec]` may follow
    /// them); addresses, state directories and `insecure` TLS (loopback only)
    /// are filled in. `daemon`: the `understudyd` binary (default: beside this
    /// program).
    pub fn new(daemon: Option<&Path>, dir: &Path, name: &str, settings: &str) -> Result<Self> {
        let daemon = match daemon {
            Some(d) => d.to_owned(),
            None => daemon_binary()?,
        };
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for role in ["primary", "backup"] {
            let _ = std::fs::remove_dir_all(dir.join(role));
        }
        let addrs = PairAddrs {
            primary_console: free_addr()?,
            primary_control: free_addr()?,
            primary_replication: free_addr()?,
            replication: free_addr()?,
            backup_console: free_addr()?,
            backup_control: free_addr()?,
        };
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "# A local pair on loopback.\nname = \"{name}\"\nstate_dir = \"{}\"\n{settings}\n\n\
                 [primary]\nconsole = \"{}\"\ncontrol = \"{}\"\nreplication = \"{}\"\n\n\
                 [backup]\nreplication = \"{}\"\nconsole = \"{}\"\ncontrol = \"{}\"\n\n\
                 # Loopback only.\n[tls]\ninsecure = true\n",
                dir.join("primary").display(),
                addrs.primary_console,
                addrs.primary_control,
                addrs.primary_replication,
                addrs.replication,
                addrs.backup_console,
                addrs.backup_control,
            ),
        )
        .with_context(|| format!("cannot write {}", config.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
            config,
            addrs,
            daemon,
            primary: None,
            backup: None,
        })
    }

    /// Moves every address to `ip`, keeping the ports: the far end of a
    /// test link in another network namespace, where the daemons are then
    /// started. Plaintext stays allowed there
    /// (`tls.dangerously_allow_insecure_network`): the link is still this
    /// machine's.
    pub fn listen_on(&mut self, ip: std::net::IpAddr) -> Result<()> {
        let text = std::fs::read_to_string(&self.config)
            .with_context(|| format!("cannot read {}", self.config.display()))?;
        let text = text.replace("127.0.0.1", &ip.to_string()).replace(
            "insecure = true",
            "insecure = true\ndangerously_allow_insecure_network = true",
        );
        std::fs::write(&self.config, text)
            .with_context(|| format!("cannot write {}", self.config.display()))?;
        let a = &mut self.addrs;
        for addr in [
            &mut a.primary_console,
            &mut a.primary_control,
            &mut a.primary_replication,
            &mut a.replication,
            &mut a.backup_console,
            &mut a.backup_control,
        ] {
            addr.set_ip(ip);
        }
        Ok(())
    }

    /// The log file of `role`'s daemon.
    pub fn log_path(&self, role: Role) -> PathBuf {
        self.dir.join(format!("{}.log", role_name(role)))
    }

    /// Starts `role`'s daemon (logging to its log file at info, or at
    /// `UNDERSTUDY_PAIR_LOG` if set, e.g. `debug`); returns its pid.
    pub fn start(&mut self, role: Role) -> Result<u32> {
        let name = role_name(role);
        let log = std::fs::File::create(self.log_path(role))
            .with_context(|| format!("cannot create {}", self.log_path(role).display()))?;
        let mut cmd = Command::new(&self.daemon);
        cmd.arg(name).arg("--config").arg(&self.config);
        if role == Role::Backup {
            let state = self.dir.join("backup").display().to_string();
            cmd.arg("--set").arg(format!("state_dir={state:?}"));
        }
        let child = cmd
            .env(
                "UNDERSTUDY_LOG",
                std::env::var("UNDERSTUDY_PAIR_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.daemon.display()))?;
        let pid = child.id();
        match role {
            Role::Primary => self.primary = Some(child),
            Role::Backup => self.backup = Some(child),
        }
        Ok(pid)
    }

    /// Starts the backup, then the primary, and waits until the VM is protected.
    pub async fn start_protected(&mut self, timeout: Duration) -> Result<()> {
        self.start(Role::Backup)?;
        self.start(Role::Primary)?;
        self.wait_protected(timeout, |_| {}).await
    }

    /// Polls the primary's status until it is protected, calling `on_state`
    /// with each new state line (sync progress).
    pub async fn wait_protected(
        &self,
        timeout: Duration,
        mut on_state: impl FnMut(&str),
    ) -> Result<()> {
        let started = Instant::now();
        let mut last_state = String::new();
        loop {
            if started.elapsed() > timeout {
                bail!(
                    "the primary did not become protected within {timeout:?}; see {}",
                    self.log_path(Role::Primary).display()
                );
            }
            if let Ok(s) = remote::fetch_status(self.addrs.primary_control, None).await {
                if s.state != last_state {
                    on_state(&s.state);
                    last_state = s.state.clone();
                }
                if s.protected {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id of `role`'s daemon, if started.
    pub fn pid(&self, role: Role) -> Option<u32> {
        match role {
            Role::Primary => self.primary.as_ref(),
            Role::Backup => self.backup.as_ref(),
        }
        .map(Child::id)
    }

    /// SIGKILL to `role`'s daemon; returns when the signal was sent (the
    /// start of a failover), after waiting until the daemon is gone.
    pub fn kill(&mut self, role: Role) -> Result<Instant> {
        let child = match role {
            Role::Primary => self.primary.as_mut(),
            Role::Backup => self.backup.as_mut(),
        };
        let child = child.context("that daemon was never started")?;
        child.kill().context("cannot kill the daemon")?;
        let killed = Instant::now();
        child.wait()?;
        Ok(killed)
    }

    /// SIGTERM to `role`'s daemon (a clean stop), without waiting.
    pub fn terminate(&self, role: Role) {
        let child = match role {
            Role::Primary => self.primary.as_ref(),
            Role::Backup => self.backup.as_ref(),
        };
        if let Some(child) = child {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }
}

/// Reads console lines, calling `each` with every full line and its arrival
/// time, until `timeout` or the stream ends.
pub async fn read_lines(
    client: &mut ResumingClient,
    partial: &mut Vec<u8>,
    timeout: Duration,
    mut each: impl FnMut(&str, Instant),
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        while let Some(i) = partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial.drain(..=i).collect();
            each(String::from_utf8_lossy(&line[..i]).as_ref(), Instant::now());
        }
        match tokio::time::timeout_at(deadline, client.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => partial.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
}

/// A console client that follows the guest from host to host by offset,
/// recording every `<prefix>N` line as (arrival since `started`, N, whether
/// it came after the first move).
#[derive(Debug)]
pub struct Follower {
    client: ResumingClient,
    partial: Vec<u8>,
    started: Instant,
    prefix: Option<&'static str>,
    moved: bool,
    /// Every `<prefix>N` line: arrival since `started`, N, whether it came after the first move.
    pub values: Vec<(Duration, u64, bool)>,
}

impl Follower {
    /// Follows `client` from now on, recording lines that start with `prefix`.
    pub fn new(client: ResumingClient, started: Instant, prefix: Option<&'static str>) -> Self {
        Self {
            client,
            partial: Vec::new(),
            started,
            prefix,
            moved: false,
            values: Vec::new(),
        }
    }

    /// Reads lines for up to `timeout`, or until the host closes the console,
    /// calling `each` with every line and its arrival.
    pub async fn read(&mut self, timeout: Duration, mut each: impl FnMut(&str, Instant)) {
        let (prefix, started, moved) = (self.prefix, self.started, self.moved);
        let values = &mut self.values;
        read_lines(&mut self.client, &mut self.partial, timeout, |line, at| {
            if let Some(v) = prefix
                .and_then(|p| line.strip_prefix(p))
                .and_then(|n| n.parse().ok())
            {
                values.push((at - started, v, moved));
            }
            each(line, at);
        })
        .await;
    }

    /// Reconnects to `addr` where the client left off (a partial line is
    /// asked for again); lines from here on count as the new host's.
    pub async fn move_to(&mut self, addr: SocketAddr) -> std::io::Result<()> {
        let offset = self.client.offset - self.partial.len() as u64;
        self.partial.clear();
        self.client = ResumingClient::connect(addr, offset).await?;
        self.moved = true;
        Ok(())
    }

    /// Waits up to `timeout` for the next bytes; returns when they came.
    pub async fn first_byte(&mut self, timeout: Duration) -> Result<Instant> {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(timeout, self.client.read(&mut buf))
            .await
            .with_context(|| format!("no console output within {timeout:?}"))??;
        self.partial.extend_from_slice(&buf[..n]);
        Ok(Instant::now())
    }
}

impl Drop for LocalPair {
    fn drop(&mut self) {
        for child in [self.primary.as_mut(), self.backup.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
