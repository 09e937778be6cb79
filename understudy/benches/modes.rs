//! Checkpoint mode against replay mode (replication by log shipping), side
//! by side in one run: a local pair protecting the kv guest (64 MiB), a
//! client sending `SET` requests one after another, then a SIGKILL of the
//! primary. Per mode: request latency (p50/p99 and its distribution), the
//! requests a closed-loop client gets through per second, bytes shipped per
//! second, the backup's CPU, and the failover time a client sees (SIGKILL →
//! the answer to a request sent to the promoted backup). Rounds alternate
//! the modes, so both see the same machine noise.
//!
//! Run: `cargo bench -p understudy --bench modes`; `UNDERSTUDY_MODE_ROUNDS=N`
//! sets the rounds per mode (default 3), `UNDERSTUDY_MODE_REQUESTS=N` the
//! requests per round (default 500).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::time::{Duration, Instant};

use understudy::daemon::Role;
use understudy::pair::LocalPair;
use understudy::remote;
use understudy_bench::{Chart, Report, Table, cdf, num, quantile, quantiles};
use understudy_common::console::ResumingClient;

/// The two configurations compared (default epochs; replay mode's default
/// checkpoint interval).
const MODES: [(&str, &str); 2] = [
    (
        "checkpoint",
        "mode = \"checkpoint\"\nepoch_interval = \"25ms\"",
    ),
    ("replay", "mode = \"replay\"\ncheckpoint_interval = \"1s\""),
];

/// One figure read off a round.
type Figure<'a> = &'a dyn Fn(&Round) -> f64;

/// What one round of one mode measured.
#[derive(Default)]
struct Round {
    /// Request round trips, ms.
    latencies: Vec<f64>,
    requests_per_s: f64,
    shipped_per_s: f64,
    /// The backup's CPU time ÷ wall time while the client ran.
    backup_cpu: f64,
    /// SIGKILL → the promoted backup's answer to a new request, ms.
    failover_ms: f64,
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// The next full line from `client` (bytes after it stay in `partial`).
async fn line(client: &mut ResumingClient, partial: &mut Vec<u8>) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    loop {
        if let Some(i) = partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial.drain(..=i).collect();
            return String::from_utf8_lossy(&line[..i]).into_owned();
        }
        let n = tokio::time::timeout_at(deadline, client.read(&mut buf))
            .await
            .expect("no answer within 20 s")
            .expect("the console failed");
        assert!(n > 0, "the console closed");
        partial.extend_from_slice(&buf[..n]);
    }
}

async fn round(mode: &str, settings: &str, requests: usize, dir: &std::path::Path) -> Round {
    let mut pair = LocalPair::new(
        Some(env!("CARGO_BIN_EXE_understudyd").as_ref()),
        dir,
        "modes",
        &format!("guest = \"kv\"\nmemory_mib = 64\n{settings}"),
    )
    .unwrap();
    let backup_pid = pair.start(Role::Backup).unwrap();
    pair.start(Role::Primary).unwrap();
    pair.wait_protected(Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    let mut client = ResumingClient::connect(pair.addrs.primary_console, 0)
        .await
        .unwrap();
    let mut partial = Vec::new();
    while line(&mut client, &mut partial).await != "kv ready" {}
    // Warm up (the first requests fault in the guest's table).
    for i in 0..20 {
        client
            .write(format!("SET warm{i} {i}\n").as_bytes())
            .await
            .unwrap();
        line(&mut client, &mut partial).await;
    }
    let shipped_before = remote::fetch_status(pair.addrs.primary_control, None)
        .await
        .unwrap()
        .bytes_shipped;
    let cpu_before = cpu_seconds(backup_pid);
    let started = Instant::now();
    let mut r = Round::default();
    for i in 0..requests {
        let sent = Instant::now();
        client
            .write(format!("SET key{i} value-{i}\n").as_bytes())
            .await
            .unwrap();
        let answer = line(&mut client, &mut partial).await;
        assert_eq!(answer, "OK", "{mode}: request {i}");
        r.latencies.push(sent.elapsed().as_secs_f64() * 1e3);
    }
    let wall = started.elapsed().as_secs_f64();
    let status = remote::fetch_status(pair.addrs.primary_control, None)
        .await
        .unwrap();
    assert_eq!(status.mode, mode);
    r.requests_per_s = requests as f64 / wall;
    r.shipped_per_s = (status.bytes_shipped - shipped_before) as f64 / wall;
    r.backup_cpu = (cpu_seconds(backup_pid) - cpu_before) / wall;
    // Failover as a client sees it.
    let killed = pair.kill(Role::Primary).unwrap();
    client.reconnect(pair.addrs.backup_console).await.unwrap();
    client.write(b"GET key0\n").await.unwrap();
    loop {
        let l = line(&mut client, &mut partial).await;
        if l.starts_with("VALUE") {
            assert_eq!(l, "VALUE value-0", "{mode}: after the failover");
            break;
        }
    }
    r.failover_ms = killed.elapsed().as_secs_f64() * 1e3;
    pair.terminate(Role::Backup);
    drop(pair);
    r
}

fn main() {
    let rounds: usize = std::env::var("UNDERSTUDY_MODE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let requests: usize = std::env::var("UNDERSTUDY_MODE_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("understudy-bench-modes-{}", std::process::id()));
    let mut results: Vec<Vec<Round>> = MODES.iter().map(|_| Vec::new()).collect();
    for n in 0..rounds {
        for (m, (mode, settings)) in MODES.iter().enumerate() {
            let r = runtime.block_on(round(mode, settings, requests, &dir));
            println!(
                "round {n} {mode}: p50 {:.2} ms, p99 {:.2} ms, {:.0} req/s, {:.0} KiB/s shipped, \
                 backup CPU {:.0} %, failover {:.0} ms",
                quantile(&r.latencies, 0.5),
                quantile(&r.latencies, 0.99),
                r.requests_per_s,
                r.shipped_per_s / 1024.0,
                r.backup_cpu * 100.0,
                r.failover_ms
            );
            results[m].push(r);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    let mut report = Report::new(
        "modes",
        "Replication modes: checkpoints against log shipping",
        "cargo bench -p understudy --bench modes",
    );
    let mut table = Table::new(
        format!(
            "kv guest (64 MiB), one client sending {requests} SETs one after another, {rounds} \
             rounds per mode alternating; checkpoint mode with 25 ms epochs, replay mode with a \
             checkpoint every 1 s; medians over rounds (min–max)"
        ),
        &["", "checkpoint", "replay", "replay ÷ checkpoint"],
    );
    let per_round = |m: usize, f: Figure<'_>| -> Vec<f64> { results[m].iter().map(f).collect() };
    let rows: [(&str, Figure<'_>, usize); 7] = [
        (
            "request latency p50 (ms)",
            &|r| quantile(&r.latencies, 0.5),
            2,
        ),
        (
            "request latency p99 (ms)",
            &|r| quantile(&r.latencies, 0.99),
            2,
        ),
        (
            "requests per second (closed loop)",
            &|r| r.requests_per_s,
            0,
        ),
        ("shipped per second (KiB)", &|r| r.shipped_per_s / 1024.0, 1),
        (
            "bytes shipped per request",
            &|r| r.shipped_per_s / r.requests_per_s,
            0,
        ),
        ("backup CPU (% of one core)", &|r| r.backup_cpu * 100.0, 1),
        ("failover seen by a client (ms)", &|r| r.failover_ms, 0),
    ];
    for (name, f, decimals) in rows {
        let c = per_round(0, f);
        let r = per_round(1, f);
        let (cm, rm) = (quantile(&c, 0.5), quantile(&r, 0.5));
        let span = |v: &[f64], med: f64| {
            format!(
                "{:.*} ({:.*}–{:.*})",
                decimals,
                med,
                decimals,
                quantile(v, 0.0),
                decimals,
                quantile(v, 1.0)
            )
        };
        table.row(vec![
            name.into(),
            span(&c, cm).into(),
            span(&r, rm).into(),
            num(rm / cm, 3),
        ]);
    }
    report.table(table);
    let all = |m: usize| -> Vec<f64> {
        results[m]
            .iter()
            .flat_map(|r| r.latencies.iter().copied())
            .collect()
    };
    let mut dist = Table::new(
        "request latency over all rounds (ms)",
        &["ms", "p50", "p99", "min", "max"],
    );
    quantiles(&mut dist, "checkpoint mode (25 ms epochs)", &all(0));
    quantiles(&mut dist, "replay mode (log shipping)", &all(1));
    report.table(dist);
    report.chart(Chart {
        name: "modes-latency".into(),
        title: "Request latency by replication mode (kv guest, loopback)".into(),
        x_label: "ms".into(),
        y_label: "fraction of requests".into(),
        log_x: true,
        log_y: false,
        series: vec![
            cdf("checkpoint mode (25 ms epochs)", &all(0)),
            cdf("replay mode (log shipping)", &all(1)),
        ],
    });
    let p50 = quantile(&all(1), 0.5);
    report.target(
        "replay mode: request latency p50 on loopback",
        "< 2 ms",
        format!("{p50:.2} ms"),
        p50 < 2.0,
    );
    report.finish().unwrap();
}
