//! Planned switchovers (`understudyctl switchover`) on real daemon pairs: the
//! roles swap in the running processes, the console output carries on with no
//! gap and no repeat, the VM is protected again in the other direction (a
//! SIGKILL afterwards fails it over back), a restarted host keeps its new
//! role, a pair that cannot swap refuses without disturbing the VM, and a
//! host that took the VM over copies checkpoints after the resume when its
//! image is on tmpfs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::{CTL, Lines, Pair, assert_success, free_port, serial, wait_status};

const COUNTER: &str = "guest_params = { interval_ms = 20 }";

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A protected counter pair whose primary host can become the backup.
async fn swappable_pair() -> Pair {
    let primary_replication = loopback(free_port());
    let mut pair = Pair::new_with(
        "counter",
        COUNTER,
        &format!("replication = \"{primary_replication}\""),
        "",
    );
    pair.start_primary();
    pair.wait_protected().await;
    pair
}

/// Reads `count N` lines into `seen` until the server closes the connection
/// (the host stopped running the guest) or `limit` lines came.
async fn read_counts(lines: &mut Lines, seen: &mut Vec<u64>, limit: usize) -> bool {
    for _ in 0..limit {
        match lines.next(Duration::from_secs(10)).await {
            Ok(Some(line)) => {
                if let Some(n) = line.strip_prefix("count ").and_then(|n| n.parse().ok()) {
                    seen.push(n);
                }
            }
            Ok(None) => return true,
            Err(e) => panic!("console: {e} after {:?}", seen.last()),
        }
    }
    false
}

/// The old host closed the console (its guest moved): reads what it still
/// sent, reconnects to `to` where the client left off, and reads `more`
/// lines there.
async fn follow(lines: &mut Lines, seen: &mut Vec<u64>, to: SocketAddr, more: usize) {
    assert!(
        read_counts(lines, seen, 1000).await,
        "the old host's console stayed open"
    );
    lines.reconnect(to).await.unwrap();
    assert!(!read_counts(lines, seen, more).await);
}

/// The daemon at `control` has `role` at `generation`.
async fn assert_role(control: SocketAddr, role: &str, generation: u64) {
    let s = common::status(control).await.unwrap();
    assert_eq!((s.role.as_str(), s.generation), (role, generation), "{s:?}");
}

/// Waits until the daemon at `control` has `role` and the VM is protected.
async fn wait_protected_as(
    pair: &Pair,
    control: SocketAddr,
    role: &str,
    what: &str,
) -> understudy_proto::StatusReply {
    wait_status(pair, control, what, Duration::from_secs(30), |s| {
        s.role == role && s.protected
    })
    .await
}

fn assert_unbroken(seen: &[u64], pair: &Pair) {
    for w in seen.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "the count sequence broke: {seen:?}\n{}",
            pair.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchovers_swap_the_roles_and_keep_the_output_and_the_protection() {
    let _serial = serial().await;
    let mut pair = swappable_pair().await;
    let a = pair.addrs.clone();
    let mut lines = Lines::connect(a.primary_console, 0).await.unwrap();
    let mut seen = Vec::new();
    assert!(!read_counts(&mut lines, &mut seen, 10).await);

    // 1. Swap: the backup's host runs the VM, the primary's host backs it up.
    let text = common::switchover(&pair, &pair.config);
    assert!(
        text.contains("now runs on the [backup] table's host"),
        "{text}"
    );
    assert!(text.contains("protected again"), "{text}");
    // The old primary closes its clients once its output is out; they
    // follow the guest to the other host.
    follow(&mut lines, &mut seen, a.backup_console, 20).await;
    let new_primary = wait_protected_as(
        &pair,
        a.backup_control,
        "primary",
        "backup host protected as the primary",
    )
    .await;
    assert_eq!(
        new_primary.generation, 2,
        "a handover promotes one generation"
    );
    // A switchover is no failure: the new primary waits for the old one to
    // stand down without a warning.
    let logs = pair.logs();
    let warned: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("backup not available yet"))
        .collect();
    assert!(warned.is_empty(), "{warned:#?}\n{logs}");
    let out = Command::new(CTL)
        .args(["status", "--control"])
        .arg(a.backup_control.to_string())
        .output()
        .unwrap();
    assert_success(&out);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("by handover"), "{shown}");
    let old_primary = common::status(a.primary_control).await.unwrap();
    assert_eq!(old_primary.role, "backup");
    let role_file =
        |side: &str| std::fs::read_to_string(pair.dir.path().join(side).join("role")).unwrap();
    assert_eq!(role_file("primary"), "backup\n");
    assert_eq!(role_file("backup"), "primary\n");

    // 2. The primary's host restarts: it comes back as the backup (its role
    // file), and the VM is protected again.
    pair.kill_primary();
    pair.start_primary();
    wait_protected_as(
        &pair,
        a.primary_control,
        "backup",
        "restarted host back as the backup",
    )
    .await;
    wait_protected_as(
        &pair,
        a.backup_control,
        "primary",
        "protected again after the restart",
    )
    .await;
    assert!(!read_counts(&mut lines, &mut seen, 10).await);

    // 3. Swap back.
    let text = common::switchover(&pair, &pair.config);
    assert!(
        text.contains("now runs on the [primary] table's host"),
        "{text}"
    );
    follow(&mut lines, &mut seen, a.primary_console, 10).await;
    assert_role(a.primary_control, "primary", 3).await;

    // 4. The protection is real: SIGKILL the primary's host and the backup's
    // host takes over from the last acked epoch.
    wait_status(
        &pair,
        a.primary_control,
        "protected after swapping back",
        Duration::from_secs(30),
        |s| s.protected,
    )
    .await;
    assert!(!read_counts(&mut lines, &mut seen, 5).await);
    pair.kill_primary();
    follow(&mut lines, &mut seen, a.backup_console, 10).await;
    assert_role(a.backup_control, "primary", 4).await;

    assert_eq!(seen.first(), Some(&0));
    assert_unbroken(&seen, &pair);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_that_cannot_swap_refuses_and_the_vm_runs_on() {
    let _serial = serial().await;
    // No primary.replication: the primary's host could not be the backup.
    let pair = Pair::protected("counter", COUNTER).await;
    let a = pair.addrs.clone();
    let mut lines = Lines::connect(a.primary_console, 0).await.unwrap();
    let mut seen = Vec::new();
    assert!(!read_counts(&mut lines, &mut seen, 5).await);
    let out = Command::new(CTL)
        .arg("switchover")
        .arg("--config")
        .arg(&pair.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("primary.replication is not set"), "{err}");
    // Asked at the backup's control address, it says where to go.
    let out = Command::new(CTL)
        .args(["status", "--control"])
        .arg(a.backup_control.to_string())
        .output()
        .unwrap();
    assert_success(&out);
    // Nothing changed: same roles, still protected, output flowing.
    assert!(!read_counts(&mut lines, &mut seen, 20).await);
    assert_unbroken(&seen, &pair);
    let s = common::status(a.primary_control).await.unwrap();
    assert_eq!(
        (s.role.as_str(), s.protected, s.generation),
        ("primary", true, 1)
    );
    let b = common::status(a.backup_control).await.unwrap();
    assert_eq!(b.role, "backup");
}

/// `understudyctl drill --kind KIND --config` against the running pair;
/// returns report.json.
fn drill_running_pair(pair: &Pair, kind: &str, out: &std::path::Path) -> serde_json::Value {
    let mut args: Vec<std::ffi::OsString> = [
        "drill",
        "--kind",
        kind,
        "--run-for",
        "1s",
        "--after",
        "1s",
        "--config",
    ]
    .map(Into::into)
    .into();
    args.extend([pair.config.clone().into(), "--out".into(), out.into()]);
    common::ctl(pair, &args);
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_drill_runs_against_a_running_pair() {
    let _serial = serial().await;
    let pair = swappable_pair().await;
    let out = tempfile::tempdir().unwrap();
    let json = drill_running_pair(&pair, "switchover", out.path());
    let num = |key: &str| {
        json[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}: {json}"))
    };
    assert_eq!(json["guest"], "counter");
    assert!(
        json["pair"].as_str().unwrap().contains("running pair"),
        "{json}"
    );
    assert_eq!(json["continued"], true, "{json}");
    assert!(
        num("downtime_ms") > 0.0 && num("downtime_ms") < 1000.0,
        "{json}"
    );
    assert!(num("guest_stopped_ms") > 0.0, "{json}");
    assert!(num("resync_seconds") > 0.0, "{json}");
    assert!(
        num("data_bytes") > 0.0,
        "the re-protection sync crossed: {json}"
    );
    assert!(json["degradation_ratio"].is_null(), "{json}");
    let text = std::fs::read_to_string(out.path().join("report.txt")).unwrap();
    assert!(text.contains("not measured"), "{text}");
    // The drill really swapped the running pair.
    let s = common::status(pair.addrs.backup_control).await.unwrap();
    assert_eq!((s.role.as_str(), s.protected), ("primary", true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_refuses_handovers_that_do_not_match_its_committed_image() {
    use understudy_proto::HandoverRequest;
    use understudy_proto::replication_client::ReplicationClient;
    let _serial = serial().await;
    let pair = swappable_pair().await;
    let a = pair.addrs.clone();
    let status = common::status(a.primary_control).await.unwrap();
    let mut client = ReplicationClient::connect(format!("http://{}", a.replication))
        .await
        .unwrap();
    // A session that is not the backup's, an epoch it has not committed,
    // and an old generation: each refused, nothing promoted.
    for (request, needle) in [
        (
            HandoverRequest {
                generation: 1,
                session: 12345,
                epoch: status.last_epoch,
                ..Default::default()
            },
            "handover refused",
        ),
        (
            // A post-copy handover is no way around the session check.
            HandoverRequest {
                generation: 1,
                session: 12345,
                epoch: status.last_epoch,
                postcopy: true,
                valid_pages: vec![0xff; 512].into(),
                postcopy_state: vec![1, 2, 3].into(),
                zero_pages: Default::default(),
                replay: false,
                commit_wait_millis: 0,
                log_exits: 0,
            },
            "handover refused",
        ),
        (
            // Nor one that waits for an epoch to commit.
            HandoverRequest {
                generation: 1,
                session: 12345,
                epoch: status.last_epoch + 1,
                commit_wait_millis: 300,
                ..Default::default()
            },
            "handover refused",
        ),
        (
            // Nor is a replay migration's.
            HandoverRequest {
                generation: 1,
                session: 12345,
                epoch: status.last_epoch,
                replay: true,
                ..Default::default()
            },
            "handover refused",
        ),
        (
            // Nor one that waits for the log's tail.
            HandoverRequest {
                generation: 1,
                session: 12345,
                epoch: status.last_epoch,
                replay: true,
                log_exits: u64::MAX,
                commit_wait_millis: 300,
                ..Default::default()
            },
            "handover refused",
        ),
        (
            HandoverRequest {
                generation: 1,
                session: 0,
                epoch: u64::MAX,
                ..Default::default()
            },
            "handover refused",
        ),
        (
            HandoverRequest {
                generation: 0,
                session: 0,
                epoch: 0,
                ..Default::default()
            },
            "deposed",
        ),
    ] {
        let err = client.handover(request).await.unwrap_err();
        assert!(err.message().contains(needle), "{err}");
    }
    assert_role(a.backup_control, "backup", 1).await;
    wait_status(
        &pair,
        a.primary_control,
        "still protected",
        Duration::from_secs(5),
        |s| s.protected && s.generation == 1,
    )
    .await;
}

/// Sends `line` and waits for the guest's one-line answer.
async fn ask(lines: &mut Lines, line: &str) -> std::io::Result<Option<String>> {
    lines.send(line).await?;
    lines.next(Duration::from_secs(20)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_at_any_point_of_a_switchover_loses_no_acked_write() {
    let _serial = serial().await;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for trial in 0..5 {
        let primary_replication = loopback(free_port());
        let mut pair = Pair::new_with(
            "kv",
            "",
            &format!("replication = \"{primary_replication}\""),
            "",
        );
        pair.start_primary();
        pair.wait_protected().await;
        let a = pair.addrs.clone();
        let mut client = common::kv_client(a.primary_console).await;
        let mut acked = Vec::new();
        for i in 0..10u64 {
            assert_eq!(
                ask(&mut client, &format!("SET k{i} v{i}"))
                    .await
                    .unwrap()
                    .as_deref(),
                Some("OK")
            );
            acked.push(i);
        }
        // Ask for a switchover and SIGKILL the primary 0-60 ms later, while
        // writing: before, during or after its final checkpoint and handover.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let kill_after = Duration::from_millis(rng % 60);
        let mut switchover = Command::new(CTL)
            .args(["switchover", "--wait", "0s", "--config"])
            .arg(&pair.config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        let mut i = 10u64;
        let mut open = true;
        while open && started.elapsed() < kill_after {
            client.send(&format!("SET k{i} v{i}")).await.unwrap();
            match client.next(Duration::from_secs(5)).await {
                Ok(Some(l)) if l == "OK" => acked.push(i),
                Ok(Some(other)) => panic!("trial {trial}: {other}"),
                // The old primary closed the console: the VM moved.
                Ok(None) | Err(_) => open = false,
            }
            i += 1;
        }
        pair.kill_primary();
        let _ = switchover.wait();
        // Whichever way it went (handover or silence), the backup's host
        // runs the VM now; what the dead primary never delivered comes from
        // there, and an OK seen there is an ack too.
        pair.wait_promoted().await;
        client.reconnect(a.backup_console).await.unwrap();
        while let Ok(Some(l)) = client.next(Duration::from_millis(300)).await {
            if l == "OK" {
                acked.push(i - 1);
            }
        }
        for k in &acked {
            assert_eq!(
                ask(&mut client, &format!("GET k{k}"))
                    .await
                    .unwrap()
                    .as_deref(),
                Some(format!("VALUE v{k}").as_str()),
                "trial {trial} (kill after {kill_after:?}): acked write k{k} lost\n{}",
                pair.logs()
            );
        }
    }
}

fn signal(child: &std::process::Child, signal: libc::c_int) {
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_old_primary_rejoins_as_the_backup_and_the_vm_is_protected_again() {
    let _serial = serial().await;
    let mut pair = swappable_pair().await;
    let a = pair.addrs.clone();
    let mut lines = Lines::connect(a.primary_console, 0).await.unwrap();
    let mut seen = Vec::new();
    assert!(!read_counts(&mut lines, &mut seen, 10).await);

    // 1. SIGKILL the primary: the backup's host takes the VM over.
    pair.kill_primary();
    follow(&mut lines, &mut seen, a.backup_console, 10).await;
    assert_role(a.backup_control, "primary", 2).await;

    // 2. The old primary's host restarts with its unit's command: deposed,
    // it becomes the backup instead of refusing to run, and the VM is
    // protected again.
    pair.start_primary();
    wait_protected_as(
        &pair,
        a.backup_control,
        "primary",
        "protected again by the restarted host",
    )
    .await;
    let s = common::status(a.primary_control).await.unwrap();
    assert_eq!(s.role, "backup");
    assert!(pair.primary.as_mut().unwrap().try_wait().unwrap().is_none());
    assert!(!read_counts(&mut lines, &mut seen, 10).await);

    // 3. Freeze the new primary: the first host promotes. Thawed, the frozen
    // one learns it was deposed, stops its VM and becomes the backup.
    signal(pair.backup.as_ref().unwrap(), libc::SIGSTOP);
    wait_status(
        &pair,
        a.primary_control,
        "the first host promoted",
        Duration::from_secs(30),
        |s| s.role == "primary",
    )
    .await;
    lines.reconnect(a.primary_console).await.unwrap();
    assert!(!read_counts(&mut lines, &mut seen, 10).await);
    signal(pair.backup.as_ref().unwrap(), libc::SIGCONT);
    wait_status(
        &pair,
        a.primary_control,
        "protected again by the thawed host",
        Duration::from_secs(30),
        |s| s.role == "primary" && s.protected && s.generation == 3,
    )
    .await;
    assert_role(a.backup_control, "backup", 3).await;
    assert!(pair.backup.as_mut().unwrap().try_wait().unwrap().is_none());
    assert!(!read_counts(&mut lines, &mut seen, 10).await);
    assert_eq!(seen.first(), Some(&0));
    assert_unbroken(&seen, &pair);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_drill_runs_against_a_running_pair() {
    use understudy_proto::CrashRequest;
    use understudy_proto::control_client::ControlClient;
    let _serial = serial().await;
    let mut pair = swappable_pair().await;
    let a = pair.addrs.clone();
    // Only a protected primary takes the drill's kill.
    let mut backup = ControlClient::connect(format!("http://{}", a.backup_control))
        .await
        .unwrap();
    let err = backup.crash(CrashRequest {}).await.unwrap_err();
    assert!(err.message().contains("kill drill refused"), "{err}");

    let out = tempfile::tempdir().unwrap();
    let json = drill_running_pair(&pair, "kill", out.path());
    let num = |key: &str| {
        json[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}: {json}"))
    };
    assert_eq!(json["continued"], true, "{json}");
    assert!(num("detection_ms") >= 90.0, "the heartbeat timeout: {json}");
    assert!(num("downtime_ms") < 1000.0, "{json}");
    assert!(json["sync_seconds"].is_null(), "{json}");
    // The primary's process really died of SIGKILL, and the backup's host
    // runs the VM.
    let status = pair.wait_primary_exit(Duration::from_secs(5));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert_role(a.backup_control, "primary", 2).await;
}

/// A host that took the VM over runs it on its image, a file mapped shared.
/// On a disk file system the kernel cannot write-protect that file's pages,
/// so its checkpoints copy their pages in the stop; with `image_dir` on
/// tmpfs it can, and they copy after the resume, as on the host that
/// booted the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_took_over_copies_after_the_resume_when_its_image_is_on_tmpfs() {
    let _serial = serial().await;
    for tmpfs in [false, true] {
        // The image's place is named either way: the pair's directory is
        // under /tmp, which may be tmpfs; the target directory is on disk.
        let images = if tmpfs {
            tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm (tmpfs)")
        } else {
            tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
        };
        let metrics = loopback(free_port());
        let primary_replication = loopback(free_port());
        // 500 pages an epoch, in a row: every checkpoint that can takes the
        // copy after the resume.
        let mut pair = Pair::new_with(
            "dirtier",
            "guest_params = { working_set = 512, dirty_rate = 20000 }",
            &format!("replication = \"{primary_replication}\""),
            &format!("metrics = \"{metrics}\""),
        );
        let image_dir = format!(
            "image_dir={:?}",
            images.path().join("image").display().to_string()
        );
        pair.restart_backup(&[&image_dir], &[]);
        pair.start_primary();
        pair.wait_protected().await;
        let text = common::switchover(&pair, &pair.config);
        assert!(
            text.contains("now runs on the [backup] table's host"),
            "{text}"
        );
        wait_protected_as(
            &pair,
            pair.addrs.backup_control,
            "primary",
            "the backup's host protected as the primary",
        )
        .await;
        let (_, after) =
            common::scrape_after_epochs(&pair, metrics, 10.0, &format!("tmpfs {tmpfs}")).await;
        let late = common::metric(&after, "understudy_epoch_pages_copied_after_resume_total");
        let logs = pair.logs();
        let refused = "this VM's RAM cannot be write-protected";
        if tmpfs {
            assert!(
                late > 0.0 && !logs.contains(refused),
                "image on tmpfs: {late} pages copied after the resume\n{logs}"
            );
        } else {
            assert!(
                late == 0.0 && logs.contains(refused),
                "image on disk: {late} pages copied after the resume\n{logs}"
            );
        }
    }
}
