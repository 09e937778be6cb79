//! A network partition between two hosts, made of real network namespaces:
//! each daemon runs in its own namespace (`ip netns`), the replication link
//! between them is a veth pair, and each host has a second veth to the test
//! (clients and operators). Cutting the replication link is a partition: the
//! backup promotes, and the primary, which cannot tell a partition from a dead
//! backup, must under `hold-output` release nothing the backup does not hold.
//! Healed, the old primary learns of the promotion, is fenced and rejoins as
//! the backup. Needs root and iproute2; fails loudly without them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{DAEMON, Lines, counts, ip};
use understudy_bench::Children;

/// Two hosts in their own network namespaces: `a` (the [primary] table) and
/// `b`, linked by `peer` veths (replication, 10.77.1.0/24), each with a
/// client veth to the test's namespace (10.77.2.0/24 for a, 10.77.3.0/24 for
/// b). Dropping it deletes the namespaces and every veth.
struct Hosts {
    ns: [String; 2],
    /// The replication link's end in host a's namespace.
    a_peer: String,
}

impl Hosts {
    fn new() -> Self {
        let id = std::process::id() % 100_000;
        let ns = [format!("us-a-{id}"), format!("us-b-{id}")];
        for n in &ns {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        let hosts = Self {
            a_peer: format!("u{id}ap"),
            ns,
        };
        let (a, b) = (&hosts.ns[0], &hosts.ns[1]);
        let b_peer = format!("u{id}bp");
        ip(&[
            "link",
            "add",
            &hosts.a_peer,
            "netns",
            a,
            "type",
            "veth",
            "peer",
            "name",
            &b_peer,
            "netns",
            b,
        ]);
        ip(&["-n", a, "addr", "add", "10.77.1.1/24", "dev", &hosts.a_peer]);
        ip(&["-n", b, "addr", "add", "10.77.1.2/24", "dev", &b_peer]);
        ip(&["-n", a, "link", "set", &hosts.a_peer, "up"]);
        ip(&["-n", b, "link", "set", &b_peer, "up"]);
        for (i, n) in hosts.ns.iter().enumerate() {
            let (inside, outside) = (format!("u{id}c{i}"), format!("u{id}t{i}"));
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", n,
            ]);
            let net = 2 + i;
            ip(&["addr", "add", &format!("10.77.{net}.1/24"), "dev", &outside]);
            ip(&["link", "set", &outside, "up"]);
            ip(&[
                "-n",
                n,
                "addr",
                "add",
                &format!("10.77.{net}.2/24"),
                "dev",
                &inside,
            ]);
            ip(&["-n", n, "link", "set", &inside, "up"]);
        }
        hosts
    }

    /// Cuts (or restores) the replication link: a partition between the hosts.
    fn partition(&self, cut: bool) {
        let state = if cut { "down" } else { "up" };
        ip(&["-n", &self.ns[0], "link", "set", &self.a_peer, state]);
    }

    /// Runs `understudyd ROLE` in host `i`'s namespace.
    fn spawn(&self, i: usize, role: &str, config: &Path, state: &Path, log: &Path) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.ns[i], DAEMON, role, "--config"])
            .arg(config)
            .arg("--set")
            .arg(format!("state_dir={:?}", state.display().to_string()))
            .env("UNDERSTUDY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// Polls the daemon at `addr` until `pred` holds; on timeout, fails with the
/// daemons' logs in `logs`.
async fn wait_status_or_logs(
    what: &str,
    addr: SocketAddr,
    logs: &Path,
    pred: impl Fn(&understudy_proto::StatusReply) -> bool,
) {
    common::wait_status_or(addr, what, Duration::from_secs(30), pred, || {
        common::logs_in(logs)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_under_hold_output_releases_nothing_unacked_and_heals_into_a_protected_pair() {
    common::require_kvm();
    let _serial = common::serial().await;
    let hosts = Hosts::new();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vm.toml");
    std::fs::write(
        &config,
        r#"name = "partitioned"
guest = "counter"
memory_mib = 16
state_dir = "/nonexistent"
backup_loss = "hold-output"
guest_params = { interval_ms = 10 }
[primary]
console = "10.77.2.2:7401"
control = "10.77.2.2:7501"
replication = "10.77.1.1:7301"
[backup]
replication = "10.77.1.2:7301"
console = "10.77.3.2:7401"
control = "10.77.3.2:7501"
[tls]
insecure = true
dangerously_allow_insecure_network = true
"#,
    )
    .unwrap();
    let (a_control, b_control) = (addr("10.77.2.2:7501"), addr("10.77.3.2:7501"));
    let (a_console, b_console) = (addr("10.77.2.2:7401"), addr("10.77.3.2:7401"));
    let logs = dir.path();
    let mut daemons = Children(vec![
        hosts.spawn(0, "primary", &config, &logs.join("a"), &logs.join("a.log")),
        hosts.spawn(1, "backup", &config, &logs.join("b"), &logs.join("b.log")),
    ]);
    wait_status_or_logs("protected", a_control, logs, |s| s.protected).await;

    let mut client = Lines::connect(a_console, 0).await.unwrap();
    let mut seen = Vec::new();
    while counts(&seen).len() < 20 {
        seen.push(client.next(Duration::from_secs(10)).await.unwrap().unwrap());
    }

    // Partition: the backup hears nothing and promotes; the primary, cut off
    // too, holds all output from now on.
    hosts.partition(true);
    wait_status_or_logs("backup promoted", b_control, logs, |s| s.role == "primary").await;
    // What the primary released was acked before the cut; then nothing more.
    while let Ok(Some(l)) = client.next(Duration::from_millis(500)).await {
        seen.push(l);
    }
    let held = client.next(Duration::from_millis(700)).await;
    assert!(
        matches!(&held, Err(e) if e.kind() == std::io::ErrorKind::TimedOut),
        "the partitioned primary released {held:?} beside the promoted backup"
    );
    let a_status = common::status(a_control).await.unwrap();
    assert!(
        a_status.state_kind == "unprotected-holding",
        "{}",
        a_status.state
    );

    // The client follows the VM to the promoted host from where it was: the
    // partitioned primary released nothing that host does not continue.
    client.reconnect(b_console).await.unwrap();
    let before = counts(&seen).len();
    while counts(&seen).len() < before + 20 {
        let line = client.next(Duration::from_secs(10)).await;
        let Ok(Some(line)) = line else {
            panic!(
                "the promoted host served no line ({line:?}; the client is at offset {})\n{}",
                client.offset(),
                common::logs_in(logs)
            );
        };
        seen.push(line);
    }

    // Healed: the old primary meets the higher generation, is fenced, drops
    // what it held and becomes the backup; the VM is protected again.
    hosts.partition(false);
    wait_status_or_logs("protected again after the heal", b_control, logs, |s| {
        s.role == "primary" && s.protected
    })
    .await;
    let a_status = common::status(a_control).await.unwrap();
    assert_eq!(a_status.role, "backup", "{a_status:?}");
    assert!(
        daemons.0[0].try_wait().unwrap().is_none(),
        "the old primary rejoined, not exited"
    );
    let before = counts(&seen).len();
    while counts(&seen).len() < before + 20 {
        seen.push(client.next(Duration::from_secs(10)).await.unwrap().unwrap());
    }
    let got = counts(&seen);
    assert_eq!(
        got,
        (0..got.len() as u64).collect::<Vec<_>>(),
        "one sequence through the partition, the promotion and the heal"
    );
}
