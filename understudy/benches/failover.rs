//! Failover time over many SIGKILL drills: a local pair protecting the counter
//! guest, the primary killed after a short run, time to the backup's first
//! console byte, split into detection (heartbeat timeout) and resume. Then
//! planned switchovers back and forth on one pair: how long the guest stops,
//! the gap a console client sees, and the re-protection sync.
//!
//! The SIGKILL drills alternate between a pair without a witness and one
//! with an etcd witness on loopback (Debian's `etcd-server`), so the two
//! figures come from the same run.
//!
//! Run: `cargo bench -p understudy --bench failover`; `UNDERSTUDY_DRILLS=N`
//! sets the trial count (default 20 of each; half as many switchovers).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::time::Duration;

use std::time::Instant;

use understudy::config::Config;
use understudy::daemon::Role;
use understudy::demo::{DemoOptions, drill};
use understudy::pair::{LocalPair, read_lines};
use understudy_bench::{Chart, Report, Table, cdf, quantile, quantiles};
use understudy_common::console::ResumingClient;

/// One switchover: guest stopped, restore on the other host, the console gap
/// a client saw (last line from the old primary → first from the new), and
/// answer → protected again; all in ms.
struct Swap {
    stopped: f64,
    restore: f64,
    gap: f64,
    reprotect: f64,
}

/// etcd on a loopback port, killed when dropped.
struct Etcd {
    child: std::process::Child,
    url: String,
    data: std::path::PathBuf,
}

impl Etcd {
    fn start(dir: &std::path::Path) -> Self {
        let client = understudy::pair::unused_loopback_addr().unwrap();
        let peer = understudy::pair::unused_loopback_addr().unwrap();
        let data = dir.join("etcd");
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(dir).unwrap();
        let url = format!("http://{client}");
        let peer_url = format!("http://{peer}");
        let child = std::process::Command::new("etcd")
            .args(["--name", "witness", "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("witness={peer_url}")])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("the failover bench needs etcd (apt-get install etcd-server): {e}")
            });
        let started = Instant::now();
        while std::net::TcpStream::connect(client).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "etcd did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, url, data }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// `n` switchovers back and forth on one pair (counter guest, a line every
/// 10 ms), each after the VM is protected again.
async fn switchovers(n: usize) -> Vec<Swap> {
    let dir = std::env::temp_dir().join(format!(
        "understudy-bench-switchover-{}",
        std::process::id()
    ));
    let mut pair = LocalPair::new(
        Some(env!("CARGO_BIN_EXE_understudyd").as_ref()),
        &dir,
        "bench",
        "guest = \"counter\"\nguest_params = { interval_ms = 10 }\nmemory_mib = 64",
    )
    .unwrap();
    pair.start_protected(Duration::from_secs(60)).await.unwrap();
    let config = Config::load(&pair.config, &[]).unwrap();
    let console = |role: Role| match role {
        Role::Primary => pair.addrs.primary_console,
        Role::Backup => pair.addrs.backup_console,
    };
    let mut on = Role::Primary;
    let mut client = ResumingClient::connect(console(on), 0).await.unwrap();
    let mut partial = Vec::new();
    let mut last = Instant::now();
    read_lines(
        &mut client,
        &mut partial,
        Duration::from_millis(300),
        |_, at| last = at,
    )
    .await;
    let mut swaps = Vec::new();
    for _ in 0..n {
        let task = understudy::switchover::spawn(config.clone());
        // The old primary closes the console once its last output is out.
        read_lines(
            &mut client,
            &mut partial,
            Duration::from_secs(10),
            |_, at| last = at,
        )
        .await;
        let last_old = last;
        let offset = client.offset - partial.len() as u64;
        partial.clear();
        on = on.other();
        client = ResumingClient::connect(console(on), offset).await.unwrap();
        let mut first_new = None;
        read_lines(
            &mut client,
            &mut partial,
            Duration::from_millis(300),
            |_, at| {
                first_new.get_or_insert(at);
                last = at;
            },
        )
        .await;
        let outcome = task.await.unwrap().unwrap();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        swaps.push(Swap {
            stopped: outcome.reply.downtime_micros as f64 / 1e3,
            restore: outcome.reply.resume_micros as f64 / 1e3,
            gap: ms(first_new.expect("no output after the switchover") - last_old),
            reprotect: ms(outcome.reprotect_time.unwrap_or_default()),
        });
    }
    drop(pair);
    let _ = std::fs::remove_dir_all(&dir);
    swaps
}

fn main() {
    let trials: usize = std::env::var("UNDERSTUDY_DRILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir =
        std::env::temp_dir().join(format!("understudy-bench-failover-{}", std::process::id()));
    let etcd = Etcd::start(&dir.join("witness"));
    let mut reports = Vec::new();
    let mut witnessed = Vec::new();
    for i in 0..trials * 2 {
        let with_witness = i % 2 == 1;
        let opts = DemoOptions {
            run_for: Duration::from_millis(700 + 37 * i as u64 % 300),
            after: Duration::from_millis(200),
            dir: Some(dir.clone()),
            verbose: false,
            daemon: Some(env!("CARGO_BIN_EXE_understudyd").into()),
            guest: understudy::demo::DrillGuest::Counter,
            kind: understudy::drill::DrillKind::Kill,
            progress: false,
            mode: understudy_common::ids::ReplicationMode::Checkpoint,
            // A fresh key per drill: each pair starts at generation 1.
            witness: with_witness.then(|| (etcd.url.clone(), format!("/bench/{i}/"))),
        };
        let r = runtime.block_on(drill(&opts)).unwrap();
        assert!(r.seamless, "drill {i}: console sequence broken");
        if with_witness {
            witnessed.push(r);
        } else {
            reports.push(r);
        }
    }
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
    let mut report = Report::new(
        "failover",
        "Failover time",
        "cargo bench -p understudy --bench failover",
    );
    let mut table = Table::new(
        format!(
            "{trials} SIGKILL drills: 64 MiB counter guest, default heartbeats (10 ms interval, \
             100 ms timeout); time from SIGKILL of the primary to the backup's first console byte"
        ),
        &["ms", "p50", "p99", "min", "max"],
    );
    let ms = |f: fn(&understudy::demo::DrillReport) -> Duration| {
        reports
            .iter()
            .map(|r| f(r).as_secs_f64() * 1e3)
            .collect::<Vec<_>>()
    };
    let failover = ms(|r| r.failover);
    let detection = ms(|r| r.detection);
    let resume = ms(|r| r.resume);
    quantiles(
        &mut table,
        "failover: SIGKILL → backup's first byte",
        &failover,
    );
    quantiles(
        &mut table,
        "  detection: silence before promoting",
        &detection,
    );
    quantiles(&mut table, "  resume: promotion → VM running", &resume);
    quantiles(
        &mut table,
        "output gap seen by the client",
        &ms(|r| r.output_gap),
    );
    report.table(table);
    let mut table = Table::new(
        "The same drills with an etcd witness (one member on loopback, default timeouts), \
         alternating with the drills above in one run: the backup swaps the witness's key \
         before its VM runs",
        &["ms", "p50", "p99", "min", "max"],
    );
    let wms = |f: fn(&understudy::demo::DrillReport) -> Duration| {
        witnessed
            .iter()
            .map(|r| f(r).as_secs_f64() * 1e3)
            .collect::<Vec<_>>()
    };
    let w_failover = wms(|r| r.failover);
    quantiles(
        &mut table,
        "failover: SIGKILL → backup's first byte",
        &w_failover,
    );
    quantiles(
        &mut table,
        "  detection: silence before promoting",
        &wms(|r| r.detection),
    );
    quantiles(
        &mut table,
        "  resume: promotion → VM running",
        &wms(|r| r.resume),
    );
    let swap: Vec<f64> = witnessed
        .iter()
        .filter_map(|r| r.witness.as_ref())
        .filter(|w| w.last_outcome == "won")
        .map(|w| w.last_decision_micros as f64 / 1e3)
        .collect();
    assert_eq!(
        swap.len(),
        witnessed.len(),
        "every promotion won the witness's swap"
    );
    quantiles(&mut table, "    of which the etcd swap", &swap);
    report.table(table);
    let w_p50 = quantile(&w_failover, 0.5);
    report.chart(Chart {
        name: "failover-distribution".into(),
        title: format!("Failover time over {trials} SIGKILL drills (cumulative)"),
        x_label: "ms".into(),
        y_label: "fraction of drills".into(),
        log_x: false,
        log_y: false,
        series: vec![
            cdf("failover (SIGKILL → first byte)", &failover),
            cdf("failover with the etcd witness", &w_failover),
            cdf("detection", &detection),
            cdf("resume", &resume),
        ],
    });
    let (p50, p99) = (quantile(&failover, 0.5), quantile(&failover, 0.99));
    let swaps = runtime.block_on(switchovers(trials.div_ceil(2)));
    let mut table = Table::new(
        format!(
            "{} switchovers back and forth on one pair (64 MiB counter guest, a line every \
             10 ms): no heartbeat wait; the old primary syncs as the new backup each time",
            swaps.len()
        ),
        &["ms", "p50", "p99", "min", "max"],
    );
    let col = |f: fn(&Swap) -> f64| swaps.iter().map(f).collect::<Vec<_>>();
    quantiles(
        &mut table,
        "guest stopped: final pause → running there",
        &col(|s| s.stopped),
    );
    quantiles(
        &mut table,
        "  restore on the other host",
        &col(|s| s.restore),
    );
    quantiles(&mut table, "output gap seen by the client", &col(|s| s.gap));
    quantiles(
        &mut table,
        "re-protection: answer → protected again",
        &col(|s| s.reprotect),
    );
    report.table(table);
    report.target(
        "failover median",
        "under 150 ms",
        format!("{p50:.0} ms"),
        p50 < 150.0,
    );
    report.target(
        "failover p99",
        "under 300 ms",
        format!("{p99:.0} ms"),
        p99 < 300.0,
    );
    report.target(
        "failover median with the etcd witness",
        "under 200 ms",
        format!("{w_p50:.0} ms"),
        w_p50 < 200.0,
    );
    report.finish().unwrap();
}
