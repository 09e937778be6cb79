//! A WAN link between this process's network namespace and a new one, for
//! benchmarks and tests that move a VM across a slow or distant network.
//!
//! ```text
//!   this namespace (near, 10.78.S.1)             namespace NS (far, 10.78.S.2)
//!   sockets ─▶ tbf ─▶ veth ══════════ veth ─▶ INPUT: NFQUEUE ─▶ sockets
//!   sockets ◀─ NFQUEUE: INPUT ◀─ veth ══════════ veth ◀─ tbf ◀─ sockets
//!              (delay line: each packet's verdict held rtt/2)
//! ```
//!
//! - **Bandwidth**: `tbf` on both ends of the veth pair (this kernel has no
//!   `netem`, `fq` or `cake`; `tbf` and `htb` work).
//! - **Latency**: nothing in the kernel adds it here, so each direction runs
//!   through a *delay line*: an `iptables -j NFQUEUE` rule on the receiver's
//!   INPUT chain hands each packet to a thread of this process, which
//!   accepts it `rtt / 2` after it arrived. Packets stay in the kernel (only
//!   their metadata is copied out) and stay in order, and TCP runs end to
//!   end, so congestion control and the bandwidth-delay product behave as on
//!   a real long link; a TCP relay would terminate the connection and hide
//!   both. The delay sits on the receiving side on purpose: a packet held on
//!   the sender's OUTPUT chain still counts against its socket's TCP Small
//!   Queues budget (about 1 ms of data), which then caps one stream at a few
//!   Mbit/s on a 50 ms link (measured: 2 Mbit/s of 100).
//! - **TCP buffers**: raised inside the far namespace, and in this one only
//!   if the link's bandwidth-delay product needs more than the default 4 MiB
//!   (restored when the link is dropped), so one stream can fill the link.
//!
//! Needs root, iproute2 (`ip`, `tc`) and legacy iptables (`iptables-legacy`,
//! Debian's `iptables` package: this kernel's nftables has no `queue`
//! statement). Dropping a [`Wan`] removes everything it added.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A link's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkSpec {
    /// Short name for tables ("1 Gbit/s, 1 ms").
    pub name: String,
    /// Bandwidth each way, in Mbit/s.
    pub mbit: u32,
    /// Round-trip time added by the delay lines (half each way).
    pub rtt: Duration,
}

impl LinkSpec {
    /// A link of `mbit` Mbit/s each way and `rtt` round trip.
    pub fn new(mbit: u32, rtt: Duration) -> Self {
        let rate = if mbit >= 1000 && mbit % 1000 == 0 {
            format!("{} Gbit/s", mbit / 1000)
        } else {
            format!("{mbit} Mbit/s")
        };
        Self {
            name: format!("{rate}, {} ms RTT", rtt.as_millis()),
            mbit,
            rtt,
        }
    }

    /// Bytes in flight that fill the link: its bandwidth-delay product.
    pub fn bdp_bytes(&self) -> u64 {
        (u64::from(self.mbit) * 1_000_000 / 8) * self.rtt.as_micros() as u64 / 1_000_000
    }
}

/// The TCP buffer sysctls a long link may need raised.
const BUFFER_SYSCTLS: [&str; 4] = [
    "net.core.rmem_max",
    "net.core.wmem_max",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
];

/// Linux's default largest TCP buffer (`tcp_wmem`'s third field): 4 MiB.
const DEFAULT_BUFFER_MAX: u64 = 4 << 20;

/// A shaped link to a new network namespace; see the module docs.
#[derive(Debug)]
pub struct Wan {
    /// The far namespace's name.
    pub ns: String,
    /// This namespace's address on the link.
    pub near: Ipv4Addr,
    /// The far namespace's address on the link.
    pub far: Ipv4Addr,
    /// This namespace's and the far one's addresses on a second, plain veth
    /// pair that [`cut`](Self::cut) leaves alone: a management network, for
    /// clients and operators who must reach both sides of a cut link.
    pub mgmt_near: Ipv4Addr,
    /// See `mgmt_near`.
    pub mgmt_far: Ipv4Addr,
    /// The link's shape.
    pub spec: LinkSpec,
    near_dev: String,
    far_dev: String,
    queue: u16,
    near_rule: bool,
    lines: Vec<DelayLine>,
    /// The link is cut: the delay lines drop what they hold (a cut link
    /// loses the packets on it, as a real one does).
    cut: Arc<AtomicBool>,
    /// Sysctls of this namespace changed, with their old values.
    restore: Vec<(String, String)>,
}

/// Links made by this process so far (their subnets and names differ).
static LINKS: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| {
        format!("cannot run {cmd:?} (the WAN link needs iproute2 and iptables)")
    })?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {} (the WAN link needs root, iproute2 and iptables-legacy)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

impl Wan {
    /// Makes the namespace, the veth pair, the shaping and the delay lines.
    pub fn new(spec: &LinkSpec) -> Result<Self> {
        let n = LINKS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Subnet 10.78.S.0/24 and queue numbers unique to this process and
        // link, so concurrent test binaries do not collide.
        let subnet = (pid.wrapping_mul(7).wrapping_add(n) % 250) as u8 + 1;
        let tag = format!("{}{}", pid % 100_000, n);
        let mut wan = Self {
            ns: format!("us-wan-{tag}"),
            near: Ipv4Addr::new(10, 78, subnet, 1),
            far: Ipv4Addr::new(10, 78, subnet, 2),
            mgmt_near: Ipv4Addr::new(10, 79, subnet, 1),
            mgmt_far: Ipv4Addr::new(10, 79, subnet, 2),
            spec: spec.clone(),
            near_dev: format!("uw{tag}n"),
            far_dev: format!("uw{tag}f"),
            queue: (pid % 30_000) as u16 * 2 + n as u16 % 2 + 1000,
            near_rule: false,
            lines: Vec::new(),
            cut: Arc::new(AtomicBool::new(false)),
            restore: Vec::new(),
        };
        // On error, Drop undoes what was made so far.
        wan.build()?;
        Ok(wan)
    }

    fn build(&mut self) -> Result<()> {
        let (ns, far_dev) = (self.ns.clone(), self.far_dev.clone());
        let _ = cmd("ip", &["netns", "del", &ns]).output();
        run(&mut cmd("ip", &["netns", "add", &ns]))?;
        run(&mut cmd("ip", &["-n", &ns, "link", "set", "lo", "up"]))?;
        run(&mut cmd(
            "ip",
            &[
                "link",
                "add",
                &self.near_dev,
                "type",
                "veth",
                "peer",
                "name",
                &far_dev,
                "netns",
                &ns,
            ],
        ))?;
        let (near, far) = (format!("{}/24", self.near), format!("{}/24", self.far));
        run(&mut cmd(
            "ip",
            &["addr", "add", &near, "dev", &self.near_dev],
        ))?;
        run(&mut cmd("ip", &["link", "set", &self.near_dev, "up"]))?;
        run(&mut cmd(
            "ip",
            &["-n", &ns, "addr", "add", &far, "dev", &far_dev],
        ))?;
        run(&mut cmd("ip", &["-n", &ns, "link", "set", &far_dev, "up"]))?;
        let (mgmt, mgmt_peer) = (
            self.near_dev.replace("uw", "um"),
            far_dev.replace("uw", "um"),
        );
        run(&mut cmd(
            "ip",
            &[
                "link", "add", &mgmt, "type", "veth", "peer", "name", &mgmt_peer, "netns", &ns,
            ],
        ))?;
        let (near, far) = (
            format!("{}/24", self.mgmt_near),
            format!("{}/24", self.mgmt_far),
        );
        run(&mut cmd("ip", &["addr", "add", &near, "dev", &mgmt]))?;
        run(&mut cmd("ip", &["link", "set", &mgmt, "up"]))?;
        run(&mut cmd(
            "ip",
            &["-n", &ns, "addr", "add", &far, "dev", &mgmt_peer],
        ))?;
        run(&mut cmd(
            "ip",
            &["-n", &ns, "link", "set", &mgmt_peer, "up"],
        ))?;

        // Bandwidth: a token bucket on each end. Its burst holds a whole GSO
        // packet (64 KiB) and at least 2 ms at the rate; its queue holds
        // one round trip (at least 20 ms) before it drops, as a router would.
        let rate_bytes = u64::from(self.spec.mbit) * 125_000;
        let burst = (rate_bytes / 500).max(96 << 10);
        let latency = self.spec.rtt.as_millis().max(20);
        let tbf = |dev: &str| -> Vec<String> {
            [
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                &format!("{}mbit", self.spec.mbit),
                "burst",
                &burst.to_string(),
                "latency",
                &format!("{latency}ms"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        run(Command::new("tc").args(tbf(&self.near_dev)))?;
        run(Command::new("ip")
            .args(["netns", "exec", &ns, "tc"])
            .args(tbf(&far_dev)))?;

        // TCP buffers: room for twice the bandwidth-delay product.
        let want = (2 * self.spec.bdp_bytes()).max(DEFAULT_BUFFER_MAX);
        self.raise_buffers(Some(&ns), want)?;
        if want > DEFAULT_BUFFER_MAX {
            self.raise_buffers(None, want)?;
        }

        // Latency: a delay line per direction, listening before its rule
        // sends packets to it (a queue nobody listens on drops them).
        if !self.spec.rtt.is_zero() {
            let one_way = self.spec.rtt / 2;
            self.lines.push(DelayLine::start(
                None,
                self.queue,
                one_way,
                self.cut.clone(),
            )?);
            self.lines.push(DelayLine::start(
                Some(&ns),
                self.queue,
                one_way,
                self.cut.clone(),
            )?);
            let q = self.queue.to_string();
            let rule = |dev: &str| -> Vec<String> {
                ["-A", "INPUT", "-i", dev, "-j", "NFQUEUE", "--queue-num", &q]
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            };
            run(Command::new("iptables-legacy").args(rule(&self.near_dev)))?;
            self.near_rule = true;
            run(Command::new("ip")
                .args(["netns", "exec", &ns, "iptables-legacy"])
                .args(rule(&far_dev)))?;
        }
        Ok(())
    }

    /// Sets the TCP buffer limits of `ns` (None: this namespace, whose old
    /// values are kept to restore) to at least `max` bytes.
    fn raise_buffers(&mut self, ns: Option<&str>, max: u64) -> Result<()> {
        let exec = |args: &[&str]| -> Command {
            let mut c = match ns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns, "sysctl"]);
                    c
                }
                None => Command::new("sysctl"),
            };
            c.args(args);
            c
        };
        for key in BUFFER_SYSCTLS {
            let Ok(old) = run(&mut exec(&["-n", key])) else {
                // net.core.* may not exist per namespace on older kernels.
                continue;
            };
            let old = old.split_whitespace().collect::<Vec<_>>().join(" ");
            let new = if key.starts_with("net.core") {
                max.to_string()
            } else {
                // min default max: keep the first two.
                let fields: Vec<&str> = old.split(' ').collect();
                if fields.len() != 3 {
                    continue;
                }
                format!("{} {} {max}", fields[0], fields[1])
            };
            run(&mut exec(&["-q", "-w", &format!("{key}={new}")]))?;
            if ns.is_none() {
                self.restore.push((key.to_owned(), old));
            }
        }
        Ok(())
    }

    /// A command run inside the far namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Cuts the link (both directions; the management network stays up), or
    /// heals it. What was on its way when it was cut is lost.
    pub fn cut(&self, cut: bool) -> Result<()> {
        let state = if cut { "down" } else { "up" };
        self.cut.store(cut, Ordering::Release);
        run(&mut cmd("ip", &["link", "set", &self.near_dev, state]))?;
        Ok(())
    }

    /// Whether a delay line failed (its error), e.g. its queue overflowed.
    pub fn check(&self) -> Result<()> {
        for line in &self.lines {
            if let Some(e) = line
                .error
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .clone()
            {
                bail!("the WAN link's delay line failed: {e}");
            }
        }
        Ok(())
    }

    /// Measures the link as TCP sees it: the median round trip of 20 one-byte
    /// pings on one connection, and the rate of one stream sending for
    /// `bulk` (Mbit/s, counted once the receiver has the bytes).
    pub fn probe(&self, bulk: Duration) -> Result<(Duration, f64)> {
        use std::io::{Read, Write};
        let listener = self.in_far(|| std::net::TcpListener::bind(("0.0.0.0", 0)))?;
        let listener = listener
            .join()
            .map_err(|_| anyhow::anyhow!("the probe's listener thread panicked"))???;
        let port = listener.local_addr()?.port();
        let server = std::thread::spawn(move || -> std::io::Result<u64> {
            let (mut s, _) = listener.accept()?;
            s.set_nodelay(true)?;
            let mut b = [0u8; 1];
            for _ in 0..20 {
                s.read_exact(&mut b)?;
                s.write_all(&b)?;
            }
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf)? {
                    0 => break,
                    n => total += n as u64,
                }
            }
            s.write_all(&total.to_le_bytes())?;
            Ok(total)
        });
        let mut c = std::net::TcpStream::connect((self.far, port))?;
        c.set_nodelay(true)?;
        let mut rtts = Vec::new();
        let mut b = [7u8; 1];
        for _ in 0..20 {
            let t = Instant::now();
            c.write_all(&b)?;
            c.read_exact(&mut b)?;
            rtts.push(t.elapsed());
        }
        rtts.sort();
        let buf = vec![0x5au8; 1 << 20];
        let started = Instant::now();
        while started.elapsed() < bulk {
            c.write_all(&buf)?;
        }
        c.shutdown(std::net::Shutdown::Write)?;
        let mut total = [0u8; 8];
        c.read_exact(&mut total)?;
        let secs = started.elapsed().as_secs_f64();
        let _ = server.join();
        self.check()?;
        let mbit = u64::from_le_bytes(total) as f64 * 8.0 / secs / 1e6;
        Ok((rtts[rtts.len() / 2], mbit))
    }

    /// Runs `f` on a thread inside the far namespace (sockets it opens live
    /// there), and returns its result.
    pub fn in_far<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<JoinHandle<Result<T>>> {
        let ns = self.ns.clone();
        Ok(std::thread::spawn(move || {
            enter_netns(&ns)?;
            Ok(f())
        }))
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        if self.near_rule {
            let q = self.queue.to_string();
            let _ = cmd(
                "iptables-legacy",
                &[
                    "-D",
                    "INPUT",
                    "-i",
                    &self.near_dev,
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    &q,
                ],
            )
            .output();
        }
        // Deleting the namespace deletes the veth pair, its qdiscs and the
        // far rule.
        let _ = cmd("ip", &["netns", "del", &self.ns]).output();
        let _ = cmd("ip", &["link", "del", &self.near_dev]).output();
        let _ = cmd("ip", &["link", "del", &self.near_dev.replace("uw", "um")]).output();
        for line in self.lines.drain(..) {
            line.stop();
        }
        for (key, old) in self.restore.drain(..) {
            let _ = cmd("sysctl", &["-q", "-w", &format!("{key}={old}")]).output();
        }
    }
}

/// Moves the calling thread into network namespace `ns` (made by `ip netns
/// add`); other threads stay where they are.
fn enter_netns(ns: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
    // SAFETY: setns on a valid, open namespace file descriptor changes only
    // this thread's network namespace; no memory is involved.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "cannot enter network namespace {ns}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// One direction's delay line: a thread holding each queued packet's
/// verdict for `delay`.
#[derive(Debug)]
struct DelayLine {
    stop: Arc<AtomicBool>,
    error: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

/// How many packets a delay line may hold (the kernel drops beyond it).
const QUEUE_MAX: u32 = 1 << 16;

/// How often an idle delay line looks for packets: the delay's precision.
const POLL: Duration = Duration::from_micros(100);

impl DelayLine {
    /// Starts the thread (inside `ns`, if given) and waits until it listens
    /// on `queue`.
    fn start(ns: Option<&str>, queue: u16, delay: Duration, cut: Arc<AtomicBool>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let error = Arc::new(Mutex::new(None));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let ns = ns.map(str::to_owned);
        let thread = {
            let (stop, error) = (stop.clone(), error.clone());
            std::thread::Builder::new()
                .name(format!("delay-line-{queue}"))
                .spawn(move || {
                    let opened = ns
                        .as_deref()
                        .map_or(Ok(()), enter_netns)
                        .map_err(|e| format!("{e:#}"))
                        .and_then(|()| open_queue(queue).map_err(|e| e.to_string()));
                    let q = match opened {
                        Ok(q) => {
                            let _ = ready_tx.send(Ok(()));
                            q
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    if let Err(e) = hold(q, delay, &stop, &cut)
                        && let Ok(mut slot) = error.lock()
                    {
                        *slot = Some(e.to_string());
                    }
                })
                .context("cannot start a delay-line thread")?
        };
        let line = Self {
            stop,
            error,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(line),
            Ok(Err(e)) => bail!("the delay line cannot listen on NFQUEUE {queue}: {e}"),
            Err(_) => bail!("the delay-line thread ended before it listened"),
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_queue(queue: u16) -> std::io::Result<nfq::Queue> {
    let mut q = nfq::Queue::open()?;
    q.bind(queue)?;
    // Metadata only: the packet stays in the kernel until its verdict.
    q.set_copy_range(queue, 0)?;
    q.set_recv_gso(queue, true)?;
    q.set_queue_max_len(queue, QUEUE_MAX)?;
    q.set_nonblocking(true);
    Ok(q)
}

/// The delay line's loop: take every packet queued, accept each `delay`
/// after it came (drop it if the link is `cut` by then).
fn hold(
    mut q: nfq::Queue,
    delay: Duration,
    stop: &AtomicBool,
    cut: &AtomicBool,
) -> std::io::Result<()> {
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    while !stop.load(Ordering::Relaxed) {
        loop {
            match q.recv() {
                Ok(msg) => held.push_back((Instant::now() + delay, msg)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, mut msg)) = held.pop_front() {
                msg.set_verdict(if cut.load(Ordering::Acquire) {
                    nfq::Verdict::Drop
                } else {
                    nfq::Verdict::Accept
                });
                q.verdict(msg)?;
            }
        }
        let wait = held.front().map_or(POLL, |(due, _)| {
            due.saturating_duration_since(now).min(POLL)
        });
        std::thread::sleep(wait);
    }
    // Let what is still held through: the link is going away.
    for (_, mut msg) in held {
        msg.set_verdict(nfq::Verdict::Accept);
        let _ = q.verdict(msg);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_bandwidth_delay_products() {
        let lan = LinkSpec::new(1000, Duration::from_millis(1));
        assert_eq!(lan.name, "1 Gbit/s, 1 ms RTT");
        assert_eq!(lan.bdp_bytes(), 125_000);
        let wan = LinkSpec::new(100, Duration::from_millis(50));
        assert_eq!(wan.name, "100 Mbit/s, 50 ms RTT");
        assert_eq!(wan.bdp_bytes(), 625_000);
    }
}
