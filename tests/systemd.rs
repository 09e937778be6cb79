//! systemd integration: the daemons speak the sd_notify protocol on a real
//! notify socket (READY, STATUS, WATCHDOG, STOPPING, in order), and the unit
//! files pass `systemd-analyze verify`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use common::Pair;

/// Reads notify datagrams until one contains `want` (returns all seen, split
/// into `KEY=value` lines).
fn until(sock: &UnixDatagram, want: &str, seen: &mut Vec<String>, pair: &Pair) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 4096];
    loop {
        assert!(
            Instant::now() < deadline,
            "no {want:?} in {seen:?}\n{}",
            pair.logs()
        );
        let Ok(n) = sock.recv(&mut buf) else { continue };
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let found = msg.lines().any(|l| l == want);
        seen.extend(msg.lines().map(str::to_owned));
        if found {
            return;
        }
    }
}

fn position(seen: &[String], want: &str) -> usize {
    seen.iter()
        .position(|l| l == want)
        .unwrap_or_else(|| panic!("{want} missing from {seen:?}"))
}

#[test]
fn daemons_notify_ready_status_watchdog_and_stopping_in_order() {
    let _serial = common::serial_blocking();
    let mut pair = Pair::new("counter", "");
    // Replace the harness's backup with one that has a notify socket.
    let mut plain = pair.backup.take().unwrap();
    plain.kill().unwrap();
    plain.wait().unwrap();
    let bind = |name: &str| {
        let path = pair.dir.path().join(name);
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        (path, sock)
    };
    let (backup_path, backup_sock) = bind("backup.notify");
    let (primary_path, primary_sock) = bind("primary.notify");
    let env = |path: &Path| {
        vec![
            ("NOTIFY_SOCKET", path.display().to_string()),
            ("WATCHDOG_USEC", "300000".to_string()),
        ]
    };
    let state = pair.backup_state();
    pair.backup = Some(pair.spawn_with_env("backup", &[&state], &env(&backup_path)));
    pair.primary = Some(pair.spawn_with_env("primary", &[], &env(&primary_path)));

    let mut primary_seen = Vec::new();
    until(&primary_sock, "READY=1", &mut primary_seen, &pair);
    let ready_status = primary_seen
        .iter()
        .rev()
        .find(|l| l.starts_with("STATUS="))
        .unwrap();
    assert!(
        ready_status.contains("role=primary") && ready_status.contains("protected=yes"),
        "{primary_seen:?}"
    );
    until(&primary_sock, "WATCHDOG=1", &mut primary_seen, &pair);

    let mut backup_seen = Vec::new();
    until(&backup_sock, "READY=1", &mut backup_seen, &pair);
    until(&backup_sock, "WATCHDOG=1", &mut backup_seen, &pair);
    assert!(
        backup_seen
            .iter()
            .any(|l| l.starts_with("STATUS=role=backup")),
        "{backup_seen:?}"
    );

    pair.signal_primary(libc::SIGTERM);
    until(&primary_sock, "STOPPING=1", &mut primary_seen, &pair);
    assert_eq!(
        pair.wait_primary_exit(Duration::from_secs(20)).code(),
        Some(0)
    );
    assert!(position(&primary_seen, "READY=1") < position(&primary_seen, "WATCHDOG=1"));
    assert!(position(&primary_seen, "WATCHDOG=1") < position(&primary_seen, "STOPPING=1"));
    assert_eq!(
        primary_seen.iter().filter(|l| *l == "READY=1").count(),
        1,
        "READY once"
    );

    let backup = pair.backup.as_ref().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(backup.id() as libc::pid_t, libc::SIGTERM) };
    until(&backup_sock, "STOPPING=1", &mut backup_seen, &pair);
    assert!(position(&backup_seen, "READY=1") < position(&backup_seen, "STOPPING=1"));
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    // A root holding the daemon where the units expect it, systemd's own
    // units (targets the services order against), and ours with an instance.
    let root = tempfile::tempdir().unwrap();
    let bin = root.path().join("usr/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(common::DAEMON, bin.join("understudyd")).unwrap();
    let system_units = root.path().join("usr/lib/systemd");
    std::fs::create_dir_all(&system_units).unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-r")
        .arg("/usr/lib/systemd/system")
        .arg(&system_units)
        .status()
        .unwrap();
    assert!(
        copied.success(),
        "systemd's units are at /usr/lib/systemd/system (Debian package systemd)"
    );
    let unit_dir = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&unit_dir).unwrap();
    for role in ["primary", "backup"] {
        let template = format!("understudy-{role}@.service");
        std::fs::copy(units.join(&template), unit_dir.join(&template)).unwrap();
        std::os::unix::fs::symlink(
            &template,
            unit_dir.join(format!("understudy-{role}@web1.service")),
        )
        .unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.path().display()))
            .arg(format!("understudy-{role}@web1.service"))
            .output()
            .expect("systemd-analyze (Debian package systemd) runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{template}: {stderr}"
        );
    }
}

#[test]
fn the_example_config_is_valid_and_documents_every_field() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/example.toml");
    let out = std::process::Command::new(common::DAEMON)
        .arg("check")
        .arg("--config")
        .arg(&example)
        .output()
        .unwrap();
    common::assert_success(&out);
    let text = std::fs::read_to_string(&example).unwrap();
    for field in [
        "name",
        "guest",
        "memory_mib",
        "state_dir",
        "image_dir",
        "epoch_interval",
        "heartbeat_interval",
        "heartbeat_timeout",
        "backup_loss",
        "max_in_flight",
        "start_unprotected",
        "fsync",
        "interval_ms",
        "working_set",
        "dirty_rate",
        "report_ms",
        "policy",
        "zstd_level",
        "delta_cache_pages",
        "console",
        "control",
        "replication",
        "metrics",
        "ca",
        "cert",
        "key",
        "backup_name",
        "primary_name",
        "insecure",
        "dangerously_allow_insecure_network",
        "expiry_warning_days",
        "crl",
        "max_held_output_kib",
        "console_max_clients",
        "incoming_from",
        "endpoints",
        "prefix",
        "timeout",
        "check_interval",
        "server_name",
    ] {
        assert!(
            text.contains(&format!("{field} =")),
            "example.toml does not show {field}"
        );
    }
}
