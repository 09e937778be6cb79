//! The operator commands end to end: `understudyctl demo` (the README's main
//! command) and `understudyctl status` against a live pair.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{CTL, Pair, wait_status};

#[test]
fn demo_runs_kills_the_primary_and_reports_a_seamless_takeover() {
    common::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(CTL)
        .args(["demo", "--run-for", "1s", "--after", "1s", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("one unbroken count sequence"), "{stdout}");
    assert!(stdout.contains("backup  │ count"), "{stdout}");
    let failover_ms: f64 = stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("failover time")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap();
    assert!(failover_ms > 0.0 && failover_ms < 1000.0, "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_role_generation_protection_and_replication_figures() {
    let _serial = common::serial().await;
    let mut pair = Pair::new(
        "dirtier",
        "guest_params = { working_set = 512, dirty_rate = 5000 }",
    );
    pair.start_primary();
    wait_status(
        &pair,
        pair.addrs.primary_control,
        "epochs flowing",
        Duration::from_secs(60),
        |s| s.protected && s.epochs > 5,
    )
    .await;
    let show = |addr: std::net::SocketAddr| {
        let out = Command::new(CTL)
            .args(["status", "--control", &addr.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let primary = show(pair.addrs.primary_control);
    for field in [
        "role            primary",
        "protected       yes",
        "generation      1",
        "epoch rate",
        "pause",
        "dirty pages",
        "shipped",
        "replication lag",
    ] {
        assert!(primary.contains(field), "{field:?} missing:\n{primary}");
    }
    let backup = show(pair.addrs.backup_control);
    assert!(
        backup.contains("role            backup") && backup.contains("protected       yes"),
        "{backup}"
    );
    let out = Command::new(CTL)
        .args(["status", "--control", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is understudyd running there?"));
}
