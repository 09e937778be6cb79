//! Harness for end-to-end tests: a primary and a backup `understudyd` as real
//! child processes on loopback ports, with console clients and status polls.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use understudy_common::console::ResumingClient;
use understudy_proto::StatusRequest;
use understudy_proto::control_client::ControlClient;

pub const DAEMON: &str = env!("CARGO_BIN_EXE_understudyd");
pub const CTL: &str = env!("CARGO_BIN_EXE_understudyctl");

pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests need /dev/kvm: {e}");
    }
}

/// Pair-based tests run one at a time: several pairs of daemons and VMs on a
/// 2-core machine would starve each other's heartbeats, and the tests use the
/// product's default timeouts.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// `serial()` for plain (non-async) tests.
pub fn serial_blocking() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.blocking_lock()
}

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Asserts that a command succeeded, showing its output if not.
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `ip ARGS` (network namespaces for multi-host tests), failing loudly
/// without iproute2 or root.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("this test needs iproute2 (`ip`): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {} (this test needs root for network namespaces)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loopback port nobody listens on (below the ephemeral range, so no
/// outgoing connection takes it before a daemon binds it).
pub fn free_port() -> u16 {
    understudy::pair::unused_loopback_addr().unwrap().port()
}

/// Addresses of one pair.
#[derive(Clone, Debug)]
pub struct Addrs {
    pub primary_console: SocketAddr,
    pub primary_control: SocketAddr,
    pub replication: SocketAddr,
    pub backup_console: SocketAddr,
    pub backup_control: SocketAddr,
}

pub struct Pair {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub addrs: Addrs,
    pub backup: Option<Child>,
    pub primary: Option<Child>,
    pub extra: Vec<String>,
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Pair {
    /// Writes a config for `guest` (plus `settings`, TOML lines) and starts the
    /// backup; call `start_primary` next.
    pub fn new(guest: &str, settings: &str) -> Self {
        Self::new_with(guest, settings, "", "")
    }

    /// Like `new`, with the primary's metrics served at the address
    /// returned.
    pub fn with_primary_metrics(guest: &str, settings: &str) -> (Self, SocketAddr) {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let primary = format!("metrics = \"{addr}\"");
        (Self::new_with(guest, settings, &primary, ""), addr)
    }

    /// Like `new`, with extra lines for the `[primary]` and `[backup]` tables.
    pub fn new_with(guest: &str, settings: &str, primary_extra: &str, backup_extra: &str) -> Self {
        Self::new_full(guest, 16, settings, primary_extra, backup_extra)
    }

    /// Like `new`, for a pair whose roles can change: the primary's host
    /// has a replication address, so a promoted backup takes the primary
    /// role and a deposed primary rejoins as the backup.
    pub fn switchable(guest: &str, settings: &str) -> Self {
        Self::new_with(
            guest,
            settings,
            &format!("replication = \"127.0.0.1:{}\"", free_port()),
            "",
        )
    }

    /// Like `new`, with `memory_mib` MiB of guest RAM.
    pub fn with_memory(guest: &str, memory_mib: usize, settings: &str) -> Self {
        Self::new_full(guest, memory_mib, settings, "", "")
    }

    fn new_full(
        guest: &str,
        memory_mib: usize,
        settings: &str,
        primary_extra: &str,
        backup_extra: &str,
    ) -> Self {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let addrs = Addrs {
            primary_console: addr(free_port()),
            primary_control: addr(free_port()),
            replication: addr(free_port()),
            backup_console: addr(free_port()),
            backup_control: addr(free_port()),
        };
        let config = dir.path().join("vm.toml");
        std::fs::write(
            &config,
            format!(
                r#"name = "test-vm"
guest = "{guest}"
memory_mib = {memory_mib}
state_dir = "{state}"
{settings}
[primary]
console = "{}"
control = "{}"
{primary_extra}
[backup]
replication = "{}"
console = "{}"
control = "{}"
{backup_extra}
[tls]
insecure = true
"#,
                addrs.primary_console,
                addrs.primary_control,
                addrs.replication,
                addrs.backup_console,
                addrs.backup_control,
                state = dir.path().join("primary").display(),
            ),
        )
        .unwrap();
        let mut pair = Self {
            dir,
            config,
            addrs,
            backup: None,
            primary: None,
            extra: Vec::new(),
        };
        pair.backup = Some(pair.spawn("backup", &[&pair.backup_state()]));
        pair
    }

    /// The `--set` that gives a backup daemon the pair's backup state
    /// directory.
    pub fn backup_state(&self) -> String {
        format!(
            "state_dir={:?}",
            self.dir.path().join("backup").display().to_string()
        )
    }

    /// Kills the backup and starts it again on the same state with
    /// `UNDERSTUDY_FAULTS=faults` (see `common/src/fault.rs`).
    pub fn restart_backup_with_faults(&mut self, faults: &str) {
        self.restart_backup(&[], &[("UNDERSTUDY_FAULTS", faults.to_owned())]);
    }

    /// Kills the backup and starts it again on the same state directory,
    /// with more `--set` overrides and environment.
    pub fn restart_backup(&mut self, overrides: &[&str], env: &[(&str, String)]) {
        if let Some(mut backup) = self.backup.take() {
            backup.kill().unwrap();
            backup.wait().unwrap();
        }
        let state = self.backup_state();
        let overrides: Vec<&str> = std::iter::once(state.as_str())
            .chain(overrides.iter().copied())
            .collect();
        self.backup = Some(self.spawn_with_env("backup", &overrides, env));
    }

    pub fn spawn(&self, role: &str, overrides: &[&str]) -> Child {
        self.spawn_with_env(role, overrides, &[])
    }

    /// Spawns `role` with at most `nofile` open file descriptors.
    pub fn spawn_with_fd_limit(&self, role: &str, overrides: &[&str], nofile: u64) -> Child {
        self.spawn_inner(role, overrides, &[], Some(nofile))
    }

    pub fn spawn_with_env(&self, role: &str, overrides: &[&str], env: &[(&str, String)]) -> Child {
        self.spawn_inner(role, overrides, env, None)
    }

    fn spawn_inner(
        &self,
        role: &str,
        overrides: &[&str],
        env: &[(&str, String)],
        nofile: Option<u64>,
    ) -> Child {
        // One log per daemon run, in start order.
        static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log =
            std::fs::File::create(self.dir.path().join(format!("{role}-{run:03}.log"))).unwrap();
        let mut cmd = Command::new(DAEMON);
        cmd.arg(role).arg("--config").arg(&self.config);
        for o in overrides {
            cmd.arg("--set").arg(o);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.env("UNDERSTUDY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs
            // between fork and exec here.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.spawn().unwrap()
    }

    pub fn start_primary(&mut self) {
        self.primary = Some(self.spawn("primary", &[]));
    }

    /// Every daemon log so far (for failure messages).
    pub fn logs(&self) -> String {
        logs_in(self.dir.path())
    }

    pub fn signal_primary(&self, signal: libc::c_int) {
        let pid = self.primary.as_ref().unwrap().id() as libc::pid_t;
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(pid, signal) };
    }

    /// SIGKILL the primary and reap it.
    pub fn kill_primary(&mut self) {
        let mut child = self.primary.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Waits for the primary to exit.
    pub fn wait_primary_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.primary.as_mut().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.primary = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "primary did not exit within {timeout:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Pair {
    /// A pair for `guest` whose primary is running and protected.
    pub async fn protected(guest: &str, settings: &str) -> Self {
        let mut pair = Self::new(guest, settings);
        pair.start_primary();
        pair.wait_protected().await;
        pair
    }

    /// Waits until the primary reports its VM protected.
    pub async fn wait_protected(&self) {
        wait_status(
            self,
            self.addrs.primary_control,
            "primary protected",
            Duration::from_secs(60),
            |s| s.protected,
        )
        .await;
    }

    /// Waits until the backup has promoted itself.
    pub async fn wait_promoted(&self) {
        wait_status(
            self,
            self.addrs.backup_control,
            "backup promoted",
            Duration::from_secs(60),
            |s| s.role == "primary",
        )
        .await;
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for child in [self.primary.take(), self.backup.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            // SAFETY: continue a possibly stopped child before killing it.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGCONT) };
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Every `*.log` file in `dir`, by name (for failure messages).
pub fn logs_in(dir: &std::path::Path) -> String {
    let mut out = String::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if e.path().extension().is_some_and(|x| x == "log") {
            out += &format!(
                "--- {}\n{}",
                e.file_name().to_string_lossy(),
                std::fs::read_to_string(e.path()).unwrap_or_default()
            );
        }
    }
    out
}

/// The lines a guest finished on its console, and the unfinished rest: a VM
/// stopped at any instant may have printed part of its last line, and
/// "count 1" cut from "count 17" must not read as 1.
pub fn finished_lines(bytes: &[u8]) -> (Vec<String>, String) {
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let lines = String::from_utf8_lossy(&bytes[..end])
        .lines()
        .map(str::to_owned)
        .collect();
    (lines, String::from_utf8_lossy(&bytes[end..]).into_owned())
}

/// The numbers of `count N` lines.
pub fn counts(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("count ")?.parse().ok())
        .collect()
}

/// `understudyctl ARGS…`, which must succeed (else: its output and the
/// pair's logs); its standard output.
pub fn ctl<S: AsRef<std::ffi::OsStr>>(pair: &Pair, args: &[S]) -> String {
    let out = Command::new(CTL).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "understudyctl failed:\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        pair.logs()
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `understudyctl switchover --config CONFIG`, which must succeed; its output.
pub fn switchover(pair: &Pair, config: &std::path::Path) -> String {
    use std::ffi::OsStr;
    ctl(
        pair,
        &[
            OsStr::new("switchover"),
            OsStr::new("--config"),
            config.as_os_str(),
        ],
    )
}

pub async fn status(addr: SocketAddr) -> Option<understudy_proto::StatusReply> {
    let mut client = ControlClient::connect(format!("http://{addr}"))
        .await
        .ok()?;
    Some(client.status(StatusRequest {}).await.ok()?.into_inner())
}

/// Polls until `pred(status)` holds.
pub async fn wait_status(
    pair: &Pair,
    addr: SocketAddr,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&understudy_proto::StatusReply) -> bool,
) -> understudy_proto::StatusReply {
    wait_status_or(addr, what, timeout, pred, || pair.logs()).await
}

/// Polls until `pred(status)` holds; on timeout, fails with `logs()`.
pub async fn wait_status_or(
    addr: SocketAddr,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&understudy_proto::StatusReply) -> bool,
    logs: impl Fn() -> String,
) -> understudy_proto::StatusReply {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = status(addr).await
            && pred(&s)
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A line-oriented console client that resumes by offset across failovers.
pub struct Lines {
    client: ResumingClient,
    partial: Vec<u8>,
}

impl Lines {
    pub async fn connect(addr: SocketAddr, offset: u64) -> std::io::Result<Self> {
        Ok(Self {
            client: ResumingClient::connect(addr, offset).await?,
            partial: Vec::new(),
        })
    }

    /// Connects and follows output from now on.
    pub async fn connect_now(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(Self {
            client: ResumingClient::connect_now(addr).await?,
            partial: Vec::new(),
        })
    }

    /// Offset of the next byte (after any partial line).
    pub fn offset(&self) -> u64 {
        self.client.offset - self.partial.len() as u64
    }

    pub async fn send(&mut self, line: &str) -> std::io::Result<()> {
        self.client.write(format!("{line}\n").as_bytes()).await
    }

    /// Sends bytes as they are (e.g. many lines at once).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.client.write(bytes).await
    }

    /// Next full line; `Ok(None)` on EOF; Err on timeout or error.
    pub async fn next(&mut self, timeout: Duration) -> std::io::Result<Option<String>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=i).collect();
                return Ok(Some(String::from_utf8_lossy(&line[..i]).into_owned()));
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.client.read(&mut buf))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no line"))??;
            if n == 0 {
                return Ok(None);
            }
            self.partial.extend_from_slice(&buf[..n]);
        }
    }

    /// Asserts that the next line, within 10 s, is `want`.
    pub async fn expect_line(&mut self, want: &str) {
        let got = self.next(Duration::from_secs(10)).await;
        assert_eq!(
            got.as_ref().ok().and_then(|l| l.as_deref()),
            Some(want),
            "{got:?}"
        );
    }

    /// Reconnects to `addr` where this client left off (partial line kept;
    /// input the VM there has not taken is sent again).
    pub async fn reconnect(&mut self, addr: SocketAddr) -> std::io::Result<()> {
        self.client.reconnect(addr).await
    }
}

/// Flips one bit of byte `at` in the file at `path` (on-disk damage).
pub fn flip_bit(path: &std::path::Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x10;
    std::fs::write(path, &bytes).unwrap();
}

/// Sends `write` (a kv `SET`), SIGKILLs the primary while it is in flight,
/// and follows the client to the backup. Exactly once: the write is
/// answered `OK` either by the dying primary or, once, by the promoted
/// backup (from its image's output, or run again from the resent input).
pub async fn kill_with_a_write_in_flight(pair: &mut Pair, client: &mut Lines, write: &str) {
    client.send(write).await.unwrap();
    pair.kill_primary();
    // Whatever the dead primary delivered counts: an OK seen is an ack.
    let mut answered = false;
    while let Ok(Some(l)) = client.next(Duration::from_millis(300)).await {
        answered |= l == "OK";
    }
    client.reconnect(pair.addrs.backup_console).await.unwrap();
    if !answered {
        let l = client.next(Duration::from_secs(20)).await.unwrap();
        assert_eq!(
            l.as_deref(),
            Some("OK"),
            "the write in flight ({write})\n{}",
            pair.logs()
        );
    }
}

/// A host waiting for the VM (`understudyd primary --incoming`), with its own
/// config: the same VM, its own addresses, a backup that is not running.
pub struct Destination {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub console: SocketAddr,
    pub control: SocketAddr,
    pub replication: SocketAddr,
    pub child: Option<Child>,
}

impl Destination {
    pub fn start(guest: &str) -> Self {
        Self::start_with_faults(guest, "")
    }

    /// With `UNDERSTUDY_FAULTS=faults` (e.g. `backup.apply~40`: every commit
    /// takes 40 ms longer, a slow destination).
    pub fn start_with_faults(guest: &str, faults: &str) -> Self {
        Self::start_full(guest, 16, "", faults)
    }

    /// `memory_mib` MiB, `settings` (TOML lines), faults.
    pub fn start_full(guest: &str, memory_mib: usize, settings: &str, faults: &str) -> Self {
        Self::start_config(guest, memory_mib, settings, "insecure = true", faults)
    }

    /// As [`Self::start_full`], its daemon at CPU priority `nice` (19: the
    /// lowest): a host slower than the source.
    pub fn start_niced(guest: &str, memory_mib: usize, settings: &str, nice: u8) -> Self {
        let mut command = Command::new("nice");
        command.args(["-n", &nice.to_string(), DAEMON]);
        Self::start_local(guest, memory_mib, settings, "insecure = true", command, "")
    }

    /// With `tls` as the `[tls]` table's lines.
    pub fn start_config(
        guest: &str,
        memory_mib: usize,
        settings: &str,
        tls: &str,
        faults: &str,
    ) -> Self {
        Self::start_local(
            guest,
            memory_mib,
            settings,
            tls,
            Command::new(DAEMON),
            faults,
        )
    }

    /// On loopback addresses of its own, its daemon started by `command`.
    fn start_local(
        guest: &str,
        memory_mib: usize,
        settings: &str,
        tls: &str,
        mut command: Command,
        faults: &str,
    ) -> Self {
        let local = || addr(free_port());
        let mut d = Self::configure(
            guest,
            memory_mib,
            settings,
            tls,
            [local(), local(), local()],
        );
        d.spawn_with(&mut command, faults);
        d
    }

    /// In the far namespace of `wan`: replication on the link, console and
    /// control on its management network (reachable while the link is cut).
    pub fn start_in(
        wan: &understudy_bench::wan::Wan,
        guest: &str,
        memory_mib: usize,
        settings: &str,
        faults: &str,
    ) -> Self {
        let at = |ip: std::net::Ipv4Addr| SocketAddr::from((ip, free_port()));
        let mut d = Self::configure(
            guest,
            memory_mib,
            settings,
            "insecure = true\ndangerously_allow_insecure_network = true",
            [at(wan.mgmt_far), at(wan.mgmt_far), at(wan.far)],
        );
        let mut command = wan.command(DAEMON);
        d.spawn_with(&mut command, faults);
        d
    }

    /// Writes the destination's configuration: `[console, control,
    /// replication]` addresses (its unused `[backup]` on the replication
    /// address's host).
    fn configure(
        guest: &str,
        memory_mib: usize,
        settings: &str,
        tls: &str,
        [console, control, replication]: [SocketAddr; 3],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("dest.toml");
        let unused = || SocketAddr::new(replication.ip(), free_port());
        std::fs::write(
            &config,
            format!(
                r#"name = "test-vm"
guest = "{guest}"
memory_mib = {memory_mib}
state_dir = "{state}"
{settings}
[primary]
console = "{console}"
control = "{control}"
replication = "{replication}"
[backup]
replication = "{}"
console = "{}"
control = "{}"
[tls]
{tls}
"#,
                unused(),
                unused(),
                unused(),
                state = dir.path().join("state").display(),
            ),
        )
        .unwrap();
        Self {
            dir,
            config,
            console,
            control,
            replication,
            child: None,
        }
    }

    pub fn spawn(&mut self, faults: &str) {
        self.spawn_with(&mut Command::new(DAEMON), faults);
    }

    fn spawn_with(&mut self, command: &mut Command, faults: &str) {
        let log = std::fs::File::create(self.dir.path().join("dest.log")).unwrap();
        self.child = Some(
            command
                .args(["primary", "--incoming", "--config"])
                .arg(&self.config)
                .env("UNDERSTUDY_LOG", "info")
                .env("UNDERSTUDY_FAULTS", faults)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dest.log")).unwrap_or_default()
    }

    pub fn signal(&self, signal: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(c.id() as i32, signal) };
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub async fn wait_incoming(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = status(self.control).await
                && s.state_kind == "incoming"
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the destination never waited for the VM\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A one-member etcd cluster (Debian's `etcd-server`), as a witness: in
/// `netns` (None: this namespace), serving clients on `client` and its own
/// peer port on loopback, with its data in a temporary directory. Killed
/// when dropped.
pub struct Etcd {
    child: Option<Child>,
    pub client: SocketAddr,
    listen: String,
    netns: Option<String>,
    /// Client TLS: the CA, etcd's certificate and key (clients must present
    /// a certificate the CA signed).
    tls: Option<[PathBuf; 3]>,
    data: tempfile::TempDir,
    log: PathBuf,
}

impl Etcd {
    /// Starts it and waits until it answers.
    pub fn start(netns: Option<&str>, client: SocketAddr) -> Self {
        Self::start_on(netns, &[client])
    }

    /// Starts it serving clients on every address of `listen` (the first
    /// is the one it advertises and `ctl` uses).
    pub fn start_on(netns: Option<&str>, listen: &[SocketAddr]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let log = data.path().join("etcd.log");
        let mut etcd = Self {
            child: None,
            client: listen[0],
            listen: listen
                .iter()
                .map(|a| format!("http://{a}"))
                .collect::<Vec<_>>()
                .join(","),
            netns: netns.map(str::to_owned),
            tls: None,
            data,
            log,
        };
        etcd.spawn();
        etcd
    }

    /// Starts it serving clients over mutual TLS on `client` (https):
    /// `tls` is the CA, etcd's certificate and its key; `ctl` presents the
    /// same certificate as a client.
    pub fn start_tls(client: SocketAddr, tls: [PathBuf; 3]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let log = data.path().join("etcd.log");
        let mut etcd = Self {
            child: None,
            client,
            listen: format!("https://{client}"),
            netns: None,
            tls: Some(tls),
            data,
            log,
        };
        etcd.spawn();
        etcd
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn spawn(&mut self) {
        let which = Command::new("etcd").arg("--version").output();
        assert!(
            which.is_ok_and(|o| o.status.success()),
            "these tests need etcd as the witness: apt-get install etcd-server"
        );
        let peer = format!("http://127.0.0.1:{}", free_port());
        let url = format!("{}://{}", self.scheme(), self.client);
        let listen = self.listen.clone();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
            None => Command::new("etcd"),
        };
        cmd.args(["--name", "witness", "--data-dir"])
            .arg(self.data.path().join("data"))
            .args([
                "--listen-client-urls",
                &listen,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("witness={peer}"),
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .args(self.tls.iter().flat_map(|[ca, cert, key]| {
                [
                    "--client-cert-auth".into(),
                    format!("--trusted-ca-file={}", ca.display()),
                    format!("--cert-file={}", cert.display()),
                    format!("--key-file={}", key.display()),
                ]
            }))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log).unwrap());
        self.child = Some(cmd.spawn().unwrap());
        let started = Instant::now();
        loop {
            let put = self.ctl(&["put", "/understudy-test/ready", "1"]);
            if put.status.success() {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "etcd did not start: {}\n{}",
                String::from_utf8_lossy(&put.stderr),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `etcdctl` (v3 API) against it.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        let endpoint = format!("--endpoints={}://{}", self.scheme(), self.client);
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcdctl"]);
                c
            }
            None => Command::new("etcdctl"),
        };
        cmd.env("ETCDCTL_API", "3")
            .arg(endpoint)
            .args(self.tls.iter().flat_map(|[ca, cert, key]| {
                [
                    format!("--cacert={}", ca.display()),
                    format!("--cert={}", cert.display()),
                    format!("--key={}", key.display()),
                ]
            }))
            .arg("--command-timeout=2s")
            .args(args)
            .output()
            .expect("these tests need etcdctl: apt-get install etcd-client")
    }

    /// The value of `key` ("" if none).
    pub fn get(&self, key: &str) -> String {
        let out = self.ctl(&["get", "--print-value-only", key]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) it: a witness that does not
    /// answer.
    pub fn freeze(&self, frozen: bool) {
        if let Some(c) = &self.child {
            let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
            // With `ip netns exec` the child execs etcd: same pid.
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as libc::pid_t, signal) };
            // A stop is delivered asynchronously: until etcd shows as
            // stopped, it may still answer (seen once in CI).
            if frozen {
                let deadline = Instant::now() + Duration::from_secs(2);
                loop {
                    let stat = std::fs::read_to_string(format!("/proc/{}/stat", c.id()))
                        .unwrap_or_default();
                    let state = stat
                        .rsplit_once(") ")
                        .and_then(|(_, rest)| rest.chars().next());
                    if matches!(state, Some('T' | 't')) {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "etcd (pid {}) not stopped 2 s after SIGSTOP: state {state:?}",
                        c.id()
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// Kills it (SIGKILL); `restart` brings it back with its data.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            self.freeze(false);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again after `kill`, with the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A console client of a kv guest, past its "kv ready" greeting.
pub async fn kv_client(console: SocketAddr) -> Lines {
    let mut client = Lines::connect(console, 0).await.unwrap();
    client.expect_line("kv ready").await;
    client
}

/// A loopback address nobody listens on.
pub fn free_addr() -> SocketAddr {
    addr(free_port())
}

/// Polls `pred` every 50 ms for up to `limit`.
pub fn wait_for(limit: Duration, mut pred: impl FnMut() -> bool) -> Result<(), ()> {
    let started = Instant::now();
    while !pred() {
        if started.elapsed() > limit {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Fetches `/metrics` with a bare HTTP/1.0 request.
pub fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out
}

/// Scrapes `metrics` until `more` checkpoints have been taken since the
/// first scrape (20 s at most, then fails with `what` and the pair's logs);
/// returns the first scrape and the last.
pub async fn scrape_after_epochs(
    pair: &Pair,
    metrics: std::net::SocketAddr,
    more: f64,
    what: &str,
) -> (String, String) {
    let epochs = |m: &str| metric(m, "understudy_epochs_total");
    let before = scrape(metrics);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = scrape(metrics);
        if epochs(&now) >= epochs(&before) + more {
            return (before, now);
        }
        assert!(
            Instant::now() < deadline,
            "{what}: checkpoints stopped at {}\n{}",
            epochs(&now),
            pair.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the first sample of `name` in a scrape.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
}

/// Runs `openssl ARGS` in `dir` (certificates for mutual TLS; Debian
/// package openssl): what it printed; it fails the test with what it said if
/// it fails.
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (Debian package openssl) runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `openssl req` with a new EC P-256 key `name.key` (no passphrase) for the
/// subject `/CN=name`; `more` says what it makes.
pub fn request_with_new_key(dir: &Path, name: &str, more: &[&str]) {
    let (key, subject) = (format!("{name}.key"), format!("/CN={name}"));
    let mut args = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &key,
        "-subj",
        &subject,
    ];
    args.extend_from_slice(more);
    openssl(dir, &args);
}

/// A CA named `ca` in `dir`: `ca.pem`, `ca.key`.
pub fn make_ca(dir: &Path, ca: &str) {
    request_with_new_key(
        dir,
        ca,
        &["-x509", "-out", &format!("{ca}.pem"), "-days", "2"],
    );
}

/// A host certificate `name.pem`/`name.key` signed by `ca`, valid for 127.0.0.1.
pub fn make_cert(dir: &Path, ca: &str, name: &str) -> (PathBuf, PathBuf) {
    make_cert_for(dir, ca, name, "IP:127.0.0.1")
}

/// An operator's certificate (the operator URI, no host address).
pub fn make_operator(dir: &Path, ca: &str, name: &str) -> (PathBuf, PathBuf) {
    make_cert_for(
        dir,
        ca,
        name,
        &format!("URI:urn:understudy:operator:{name}"),
    )
}

/// A certificate `name.pem`/`name.key` signed by `ca` with subjectAltName `san`.
pub fn make_cert_for(dir: &Path, ca: &str, name: &str, san: &str) -> (PathBuf, PathBuf) {
    request_with_new_key(dir, name, &["-out", &format!("{name}.csr")]);
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}
