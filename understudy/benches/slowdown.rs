//! Guest slowdown under protection: the `dirtier` guest's work rate (pages
//! written per second) with protection ÷ without, for epoch intervals of 10,
//! 25, 50 and 100 ms and a light (1k pages/s), medium (10k pages/s) and heavy
//! (flat out) dirty rate. Both rates are measured in the same run.
//!
//! Run: `cargo bench -p understudy --bench slowdown`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use understudy_common::console::ResumingClient;

const MEASURE: Duration = Duration::from_secs(2);

fn free() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Work rate of the dirtier on a protected pair with `epoch_ms` epochs.
async fn protected_rate(rate: u64, epoch_ms: u64) -> f64 {
    let daemon = env!("CARGO_BIN_EXE_understudyd");
    let dir = tempfile::tempdir().unwrap();
    let (pc, pk, rep, bc, bk) = (free(), free(), free(), free(), free());
    let config = dir.path().join("vm.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"slow\"\nguest = \"dirtier\"\nmemory_mib = 64\nstate_dir = \"{}\"\nepoch_interval = \"{epoch_ms}ms\"\n\
             guest_params = {{ working_set = 2048, dirty_rate = {rate}, report_ms = 50 }}\n\
             [primary]\nconsole = \"{pc}\"\ncontrol = \"{pk}\"\n[backup]\nreplication = \"{rep}\"\nconsole = \"{bc}\"\ncontrol = \"{bk}\"\n\
             [tls]\ninsecure = true\n",
            dir.path().join("p").display()
        ),
    )
    .unwrap();
    let spawn = |role: &str, extra: &[String]| {
        Command::new(daemon)
            .arg(role)
            .arg("--config")
            .arg(&config)
            .args(extra.iter().flat_map(|e| ["--set".to_string(), e.clone()]))
            .env("UNDERSTUDY_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut backup = spawn(
        "backup",
        &[format!(
            "state_dir={:?}",
            dir.path().join("b").display().to_string()
        )],
    );
    let mut primary = spawn("primary", &[]);
    // Wait for protection, then read "work N" lines for MEASURE.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "not protected");
        if let Ok(s) = understudy::remote::fetch_status(pk, None).await
            && s.protected
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = ResumingClient::connect(pc, 0).await.unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    // Output commit releases lines in per-epoch batches, so arrival times are
    // off by up to an epoch; the guest prints every 50 ms of its own (PIT)
    // time, so count lines for time instead.
    let mut first: Option<(Instant, u64)> = None;
    let mut last = None;
    let mut lines = 0u64;
    let end = tokio::time::Instant::now() + MEASURE + Duration::from_millis(300);
    while let Ok(Ok(n)) = tokio::time::timeout_at(end, client.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
        while let Some(i) = text.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = text.drain(..=i).collect();
            if let Some(v) = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| l.trim().strip_prefix("work ")?.parse::<u64>().ok())
            {
                let now = Instant::now();
                first.get_or_insert((now, v));
                last = Some((now, v));
                lines += 1;
            }
        }
        if first.is_some_and(|(t, _)| t.elapsed() > MEASURE) {
            break;
        }
    }
    let _ = primary.kill();
    let _ = backup.kill();
    let _ = primary.wait();
    let _ = backup.wait();
    match (first, last) {
        (Some((_, v0)), Some((_, v1))) if lines > 1 => {
            (v1 - v0) as f64 / ((lines - 1) as f64 * 0.05)
        }
        _ => 0.0,
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "dirtier work rate with protection ÷ without, same run (2048-page working set, 64 MiB guest)"
    );
    println!(
        "{:<22} {:>12} {:>10} {:>10} {:>10} {:>10}",
        "dirty rate", "unprotected", "10 ms", "25 ms", "50 ms", "100 ms"
    );
    for (name, rate) in [
        ("light (1k pages/s)", 1_000u64),
        ("medium (10k pages/s)", 10_000),
        ("heavy (flat out)", 0),
    ] {
        let alone = understudy::drill::unprotected_rate(rate, MEASURE).unwrap();
        let mut row = format!("{name:<22} {alone:>12.0}");
        for epoch_ms in [10u64, 25, 50, 100] {
            let protected = runtime.block_on(protected_rate(rate, epoch_ms));
            row += &format!(" {:>10.3}", protected / alone);
        }
        println!("{row}");
    }
}
