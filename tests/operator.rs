//! The operator commands end to end: `understudyctl demo` (the README's main
//! command) and `understudyctl status` against a live pair.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{CTL, Pair, wait_status};

#[test]
fn demo_runs_kills_the_primary_and_reports_a_seamless_takeover() {
    common::require_kvm();
    let _serial = common::serial_blocking();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(CTL)
        .args(["demo", "--run-for", "1s", "--after", "1s", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    common::assert_success(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
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

/// Waits until the primary is protected and checkpoints are flowing.
async fn wait_epochs_flowing(pair: &Pair) {
    wait_status(
        pair,
        pair.addrs.primary_control,
        "epochs flowing",
        Duration::from_secs(60),
        |s| s.protected && s.epochs > 5,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_role_generation_protection_and_replication_figures() {
    let _serial = common::serial().await;
    let mut pair = Pair::new(
        "dirtier",
        "guest_params = { working_set = 512, dirty_rate = 5000 }",
    );
    pair.start_primary();
    wait_epochs_flowing(&pair).await;
    let show = |addr: std::net::SocketAddr| {
        let out = Command::new(CTL)
            .args(["status", "--control", &addr.to_string()])
            .output()
            .unwrap();
        common::assert_success(&out);
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
    // With the config alone: both hosts, and who runs and protects the VM.
    let out = Command::new(CTL)
        .arg("status")
        .arg("--config")
        .arg(&pair.config)
        .output()
        .unwrap();
    common::assert_success(&out);
    let both = String::from_utf8(out.stdout).unwrap();
    let primary_control = pair.addrs.primary_control.to_string();
    let backup_control = pair.addrs.backup_control.to_string();
    for needle in [
        "VM test-vm",
        &format!(
            "runs on       the [primary] host ({primary_control}) as the primary, generation 1"
        ),
        &format!("protected by  the [backup] host ({backup_control})"),
        "  role            backup",
        "  role            primary",
    ] {
        assert!(both.contains(needle), "{needle:?} missing:\n{both}");
    }
    let out = Command::new(CTL)
        .args(["status", "--control", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is understudyd running there?"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_replication_runs_and_after_a_failover() {
    let _serial = common::serial().await;
    let (pm, bm) = (common::free_port(), common::free_port());
    let mut pair = Pair::new_with(
        "dirtier",
        // 500 pages an epoch: enough for the copy after the resume.
        "guest_params = { working_set = 512, dirty_rate = 20000 }",
        &format!("metrics = \"127.0.0.1:{pm}\""),
        &format!("metrics = \"127.0.0.1:{bm}\""),
    );
    pair.start_primary();
    wait_epochs_flowing(&pair).await;
    let pm: std::net::SocketAddr = format!("127.0.0.1:{pm}").parse().unwrap();
    let bm: std::net::SocketAddr = format!("127.0.0.1:{bm}").parse().unwrap();
    let first = common::scrape(pm);
    let counters = [
        "understudy_epochs_total",
        "understudy_epoch_pause_seconds_count",
        "understudy_epoch_bytes_in_bytes_total",
        "understudy_epoch_bytes_out_bytes_total",
        "understudy_ack_latency_seconds_count",
        "understudy_heartbeat_rtt_seconds_count",
        "understudy_epoch_interval_seconds_count",
        "understudy_epoch_pages_copied_after_resume_total",
    ];
    // Every counter moves while replication runs (scrapes until they have).
    let deadline = Instant::now() + Duration::from_secs(20);
    let second = loop {
        let now = common::scrape(pm);
        let stuck: Vec<_> = counters
            .iter()
            .filter(|c| common::metric(&now, c) <= common::metric(&first, c))
            .collect();
        if stuck.is_empty() {
            break now;
        }
        assert!(Instant::now() < deadline, "{stuck:?} did not move");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        common::metric(&second, "understudy_epoch_bytes_in_bytes_total")
            >= common::metric(&second, "understudy_epoch_bytes_out_bytes_total") * 0.5
    );
    assert_eq!(common::metric(&second, "understudy_protected"), 1.0);
    // The adaptive codec's gauges: -1 before its first decision, else 0/1.
    let compressing = common::metric(&second, "understudy_codec_compressing");
    assert!([-1.0, 0.0, 1.0].contains(&compressing), "{compressing}");
    assert!(common::metric(&second, "understudy_link_bytes_per_second") >= 0.0);
    assert_eq!(common::metric(&second, "understudy_generation"), 1.0);
    assert!(
        second.contains("understudy_role{role=\"primary\"} 1"),
        "{second}"
    );
    let pause_sum = common::metric(&second, "understudy_epoch_pause_seconds_sum");
    let pause_n = common::metric(&second, "understudy_epoch_pause_seconds_count");
    assert!(
        pause_sum / pause_n > 1e-6 && pause_sum / pause_n < 0.1,
        "plausible mean pause"
    );
    let backup = common::scrape(bm);
    assert_eq!(common::metric(&backup, "understudy_failovers_total"), 0.0);
    assert!(common::metric(&backup, "understudy_epochs_total") > 5.0);
    pair.kill_primary();
    wait_status(
        &pair,
        pair.addrs.backup_control,
        "promoted",
        Duration::from_secs(30),
        |s| s.role == "primary",
    )
    .await;
    let after = common::scrape(bm);
    assert_eq!(common::metric(&after, "understudy_failovers_total"), 1.0);
    assert_eq!(common::metric(&after, "understudy_generation"), 2.0);
    assert!(
        after.contains("understudy_role{role=\"primary\"} 1"),
        "{after}"
    );
}

/// Runs `understudyctl drill --kind KIND` on a local pair; checks the parts
/// every report has and returns report.json.
fn drill(kind: &str) -> serde_json::Value {
    common::require_kvm();
    let _serial = common::serial_blocking();
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(CTL)
        .args([
            "drill",
            "--kind",
            kind,
            "--run-for",
            "1s",
            "--after",
            "1s",
            "--out",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    common::assert_success(&run);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("syncing") || stdout.contains("protected"),
        "sync progress shown: {stdout}"
    );
    let text = std::fs::read_to_string(out.path().join("report.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let num = |key: &str| {
        json[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}: {json}"))
    };
    let downtime = num("downtime_ms");
    assert!(downtime > 0.0 && downtime < 1000.0, "{json}");
    assert!(num("disruption_ms") >= downtime * 0.5, "{json}");
    assert!(num("sync_seconds") > 0.0);
    let ratio = num("degradation_ratio");
    assert!(ratio > 0.2 && ratio < 1.5, "{json}");
    assert!(num("epochs") >= 10.0);
    // Every charted dirty page crossed the wire in at least its codec byte.
    assert!(num("data_bytes") >= num("dirty_pages_charted"), "{json}");
    assert_eq!(json["continued"], true);
    let svg = std::fs::read_to_string(out.path().join("chart.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("Epoch pause") && svg.contains("Dirty pages"),
        "chart"
    );
    let report = std::fs::read_to_string(out.path().join("report.txt")).unwrap();
    for field in [
        "downtime",
        "disruption",
        "total sync time",
        "data transferred",
        "degradation",
    ] {
        assert!(report.contains(field), "{field} missing from {report}");
    }
    json
}

#[test]
fn kill_drill_writes_a_plausible_consistent_report_with_a_chart() {
    let json = drill("kill");
    let num = |key: &str| json[key].as_f64().unwrap();
    // Detection counts the silence from the primary's last message, which can
    // precede the SIGKILL by up to one heartbeat interval (10 ms): the parts fit
    // the whole within that (plus scheduling slack on a loaded 2-core machine).
    assert!(
        num("detection_ms") + num("resume_ms") <= num("downtime_ms") + 10.0 + 15.0,
        "parts fit the whole: {json}"
    );
    assert!(
        num("detection_ms") >= 100.0,
        "the heartbeat timeout: {json}"
    );
    assert!(json["resync_seconds"].is_null() && json["guest_stopped_ms"].is_null());
}

#[test]
fn switchover_drill_reports_the_handover_and_the_re_protection() {
    let json = drill("switchover");
    let num = |key: &str| {
        json[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}: {json}"))
    };
    assert_eq!(json["kind"], "Switchover");
    // No heartbeat timeout to wait out: the handover promotes at once.
    assert_eq!(num("detection_ms"), 0.0);
    let stopped = num("guest_stopped_ms");
    assert!(
        stopped > 0.0 && stopped < num("downtime_ms") + 5.0,
        "{json}"
    );
    assert!(
        num("resume_ms") > 0.0 && num("resume_ms") < stopped,
        "{json}"
    );
    // The guest stops for the final checkpoint, its ack and the restore
    // only: well under the heartbeat timeout a failover waits out alone.
    assert!(stopped < 100.0, "{json}");
    // The old primary synced as the new backup before the drill ended.
    assert!(num("resync_seconds") > 0.0, "{json}");
}
