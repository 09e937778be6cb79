//! The whole benchmark suite in one command:
//!
//! ```text
//! cargo run --release -p understudy-bench            # everything, ~8 minutes
//! cargo run --release -p understudy-bench -- --out /tmp/bench   # elsewhere
//! cargo run --release -p understudy-bench -- --only migration  # one, the rest kept
//! ```
//!
//! Runs every `cargo bench` target of the workspace one after another (never
//! in parallel: the machines have two cores), collects their JSON reports,
//! draws the charts and writes `docs/BENCHMARKS.md`, `docs/bench/*.svg` and
//! `docs/bench/results.json`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use understudy_bench::{OUT_ENV, Report, chart, markdown};

/// (package, bench target), in the order they run and appear.
const SUITE: [(&str, &str); 8] = [
    ("understudy-vmm", "vmm"),
    ("understudy-vmm", "replay"),
    ("understudy", "failover"),
    ("understudy", "modes"),
    ("understudy", "migration"),
    ("understudy", "slowdown"),
    ("understudy", "pipeline"),
    ("understudy-checkpoint", "codec"),
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The machine the numbers came from.
fn machine() -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .map(|kb| format!("{:.1} GiB", kb / (1 << 20) as f64))
        .unwrap_or_default();
    vec![
        ("date (UTC)".into(), sh("date", &["-u", "+%Y-%m-%d %H:%M"])),
        (
            "commit".into(),
            sh("git", &["rev-parse", "--short", "HEAD"]),
        ),
        ("CPU".into(), model),
        ("cores".into(), sh("nproc", &[])),
        ("memory".into(), mem_gib),
        ("caches".into(), caches()),
        ("kernel".into(), sh("uname", &["-r"])),
        (
            "KVM".into(),
            if Path::new("/dev/kvm").exists() {
                "/dev/kvm present".into()
            } else {
                "no /dev/kvm".into()
            },
        ),
        ("rustc".into(), sh("rustc", &["--version"])),
    ]
}

/// The CPUs' caches from level 2 up, each once, with the CPUs that share it
/// ("L2 1024K: CPU 0; L2 1024K: CPU 1; L3 32768K: CPUs 0-1"), as the
/// hypervisor presents them. Copies between the cores go through a cache
/// they share, or through memory: the same code's copies ran 4× apart on
/// two machines of one kind (docs/PERFORMANCE.md).
fn caches() -> String {
    let mut seen: Vec<(u32, String, String)> = Vec::new();
    let mut dirs: Vec<_> = std::fs::read_dir("/sys/devices/system/cpu")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix("cpu")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path().join("cache"))
        .collect();
    dirs.sort();
    for cache in dirs
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
    {
        let read = |f: &str| {
            std::fs::read_to_string(cache.path().join(f))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let Ok(level) = read("level").parse::<u32>() else {
            continue;
        };
        let entry = (level, read("size"), read("shared_cpu_list"));
        if level >= 2 && !seen.contains(&entry) {
            seen.push(entry);
        }
    }
    seen.sort();
    if seen.is_empty() {
        return "unknown".into();
    }
    seen.iter()
        .map(|(level, size, cpus)| {
            let plural = if cpus.contains([',', '-']) {
                "CPUs"
            } else {
                "CPU"
            };
            format!("L{level} {size}: {plural} {cpus}")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The reports of the last run (`results.json`), and its run time less
/// theirs is not known: the whole of it is kept (an upper bound).
fn last_reports(path: &Path) -> (Vec<Report>, f64) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return (Vec::new(), 0.0);
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return (Vec::new(), 0.0);
    };
    let reports = v
        .get("reports")
        .cloned()
        .and_then(|r| serde_json::from_value(r).ok())
        .unwrap_or_default();
    let seconds = v
        .get("suite_seconds")
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(0.0);
    (reports, seconds)
}

fn main() -> Result<()> {
    let mut out = workspace().join("docs");
    let mut only: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = args.next().context("--out needs a directory")?.into(),
            "--only" => only.push(args.next().context("--only needs a bench name")?),
            "-h" | "--help" => {
                println!(
                    "usage: understudy-bench [--out DIR] [--only BENCH]...\n\
                     runs the benchmark suite ({}) and writes DIR/BENCHMARKS.md \
                     (default DIR: docs/); with --only, the other reports are kept \
                     from DIR/bench/results.json",
                    SUITE.map(|s| s.1).join(", ")
                );
                return Ok(());
            }
            other => bail!("unknown argument {other:?}; try --help"),
        }
    }
    let assets = out.join("bench");
    let raw = assets.join("raw");
    let _ = std::fs::remove_dir_all(&raw);
    std::fs::create_dir_all(&raw).with_context(|| format!("cannot create {}", raw.display()))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = Instant::now();
    let mut reports = Vec::new();
    for (package, bench) in SUITE {
        if !only.is_empty() && !only.iter().any(|o| o == bench) {
            continue;
        }
        println!("\n=== {package} / {bench} ===");
        let t = Instant::now();
        let ran = machine();
        let status = Command::new(&cargo)
            .args(["bench", "-q", "-p", package, "--bench", bench])
            .current_dir(workspace())
            .env(OUT_ENV, &raw)
            .status()
            .with_context(|| format!("cannot run {cargo}"))?;
        if !status.success() {
            bail!("benchmark {bench} failed ({status})");
        }
        println!("({bench}: {:.0} s)", t.elapsed().as_secs_f64());
        // Each bench writes the report named after it; the suite says where
        // and when it ran.
        let mut report = Report::load(&raw.join(format!("{bench}.json")))?;
        report.ran = ran;
        reports.push(report);
    }
    let elapsed = started.elapsed();
    let mut seconds = elapsed.as_secs_f64();
    if !only.is_empty() {
        // A partial run: the other reports stay as the last full run left
        // them (each names its own command and figures).
        let (kept, kept_seconds) = last_reports(&assets.join("results.json"));
        seconds += kept_seconds;
        let mut merged = Vec::new();
        for (_, bench) in SUITE {
            if let Some(r) = reports.iter().find(|r| r.name == bench) {
                merged.push(r.clone());
            } else if let Some(r) = kept.iter().find(|r| r.name == bench) {
                merged.push(r.clone());
            }
        }
        reports = merged;
    }
    for r in &reports {
        for c in &r.charts {
            chart::draw(c, &assets.join(format!("{}.svg", c.name)))?;
        }
    }
    let mut machine = machine();
    if !only.is_empty() {
        machine.push((
            "re-run in this run".into(),
            format!("{} (every other section: the run before)", only.join(", ")),
        ));
    }
    let json = serde_json::json!({
        "machine": machine.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "suite_seconds": seconds,
        "reports": reports,
    });
    std::fs::write(
        assets.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let md = markdown(&reports, &machine, seconds);
    std::fs::write(out.join("BENCHMARKS.md"), md)?;
    let _ = std::fs::remove_dir_all(&raw);
    println!(
        "\nsuite done in {:.0} s: {}/BENCHMARKS.md, {}/*.svg, {}/results.json",
        elapsed.as_secs_f64(),
        out.display(),
        assets.display(),
        assets.display()
    );
    Ok(())
}
