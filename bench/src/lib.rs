//! Benchmark results as data: every benchmark in the workspace builds a
//! [`Report`] of tables and chart series, prints it as text, and (when the
//! suite runs it, with `UNDERSTUDY_BENCH_OUT` set) writes it as JSON. The
//! suite runner (`cargo run --release -p understudy-bench`) then draws the
//! charts and writes `docs/BENCHMARKS.md`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub mod chart;
pub mod full_disk;
pub mod qemu;
pub mod wan;

/// Where the suite runner asks benchmarks to write their JSON.
pub const OUT_ENV: &str = "UNDERSTUDY_BENCH_OUT";

/// Child processes killed and reaped when this is dropped, however the
/// benchmark or test that started them ends.
#[derive(Debug)]
pub struct Children(pub Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One benchmark's results.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// File stem: `<name>.json`, and the section anchor in BENCHMARKS.md.
    pub name: String,
    /// The section heading.
    pub title: String,
    /// How to run this benchmark alone.
    pub command: String,
    /// Its tables, in order.
    pub tables: Vec<Table>,
    /// Its charts, in order.
    pub charts: Vec<Chart>,
    /// Target checks: what the issue asks, what was measured, met or not.
    pub targets: Vec<Target>,
    /// Where and when it ran (the suite's machine table, stamped by the
    /// suite as each report comes in): a partial run keeps the other
    /// sections of an earlier run, maybe on another machine. Empty in
    /// reports written before it was recorded.
    #[serde(default)]
    pub ran: Vec<(String, String)>,
}

/// A table: a title, column headings and rows of formatted cells.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Table {
    /// What the table shows (printed in bold above it).
    pub title: String,
    /// Column headings.
    pub columns: Vec<String>,
    /// Formatted cells, row by row.
    pub rows: Vec<Vec<String>>,
    /// Raw numbers behind the rows (same shape; `null` for text cells).
    pub values: Vec<Vec<Option<f64>>>,
}

/// A chart to draw: named series of (x, y) points.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Chart {
    /// File stem of the SVG.
    pub name: String,
    /// The chart's title.
    pub title: String,
    /// The x axis's label.
    pub x_label: String,
    /// The y axis's label.
    pub y_label: String,
    /// A logarithmic x axis.
    pub log_x: bool,
    /// A logarithmic y axis.
    pub log_y: bool,
    /// The lines.
    pub series: Vec<Series>,
}

/// One line (or set of points) on a chart.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Series {
    /// The legend's name.
    pub name: String,
    /// (x, y) points, in x order.
    pub points: Vec<(f64, f64)>,
    /// Draw markers only, no line (for distributions).
    pub points_only: bool,
}

/// A performance target and whether this run met it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    /// What is measured.
    pub what: String,
    /// The goal, in words.
    pub goal: String,
    /// What this run measured, in words.
    pub measured: String,
    /// Whether the goal was met.
    pub met: bool,
}

/// A table cell: a number formatted with `decimals`, kept raw for the JSON.
#[derive(Clone, Debug)]
pub enum Cell {
    /// Text as is.
    Text(String),
    /// A number and its decimal places.
    Num(f64, usize),
}

impl From<&str> for Cell {
    fn from(s: &str) -> Self {
        Cell::Text(s.to_owned())
    }
}

impl From<String> for Cell {
    fn from(s: String) -> Self {
        Cell::Text(s)
    }
}

/// A number cell with `decimals` places.
pub fn num(v: f64, decimals: usize) -> Cell {
    Cell::Num(v, decimals)
}

impl Table {
    /// An empty table with these headings.
    pub fn new(title: impl Into<String>, columns: &[&str]) -> Self {
        Self {
            title: title.into(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            ..Default::default()
        }
    }

    /// Adds a row (one cell per column).
    pub fn row(&mut self, cells: Vec<Cell>) {
        let mut text = Vec::with_capacity(cells.len());
        let mut values = Vec::with_capacity(cells.len());
        for c in cells {
            match c {
                Cell::Text(t) => {
                    text.push(t);
                    values.push(None);
                }
                Cell::Num(v, d) => {
                    text.push(if v.is_finite() {
                        format!("{v:.d$}")
                    } else {
                        "-".to_owned()
                    });
                    values.push(v.is_finite().then_some(v));
                }
            }
        }
        self.rows.push(text);
        self.values.push(values);
    }

    /// Aligned plain text: first column left, the rest right.
    pub fn text(&self) -> String {
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|i| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .chain(std::iter::once(&self.columns[i]))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
                let pad = w.saturating_sub(c.chars().count());
                if i == 0 {
                    out.push_str(c);
                    out.push_str(&" ".repeat(pad));
                } else {
                    out.push_str("  ");
                    out.push_str(&" ".repeat(pad));
                    out.push_str(c);
                }
            }
            out.trim_end().to_owned() + "\n"
        };
        let mut out = format!("{}\n", self.title);
        out += &line(&self.columns);
        for r in &self.rows {
            out += &line(r);
        }
        out
    }

    /// A Markdown table under a bold title.
    pub fn markdown(&self) -> String {
        let mut out = format!("**{}**\n\n", self.title);
        let _ = writeln!(out, "| {} |", self.columns.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            self.columns
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
                .collect::<String>()
        );
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        out
    }
}

impl Report {
    /// An empty report: its file stem, heading and the command that runs it.
    pub fn new(name: &str, title: &str, command: &str) -> Self {
        Self {
            name: name.to_owned(),
            title: title.to_owned(),
            command: command.to_owned(),
            ..Default::default()
        }
    }

    /// When it ran: "2026-12-04 11:52, 2c0aa77" (the date and commit of
    /// its run), or "an earlier run" for reports from before that was kept.
    pub fn ran_when(&self) -> String {
        let get = |k: &str| self.ran.iter().find(|(key, _)| key.starts_with(k));
        match (get("date"), get("commit")) {
            (Some((_, date)), Some((_, commit))) => format!("{date}, {commit}"),
            _ => "an earlier run".into(),
        }
    }

    /// Where it ran, every entry of its machine table on one line.
    pub fn ran_where(&self) -> String {
        self.ran
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Adds a table and prints it at once (benchmarks run for minutes).
    pub fn table(&mut self, table: Table) {
        println!("\n{}", table.text());
        self.tables.push(table);
    }

    /// Adds a chart (drawn by the suite).
    pub fn chart(&mut self, chart: Chart) {
        self.charts.push(chart);
    }

    /// Records a target check and prints it.
    pub fn target(&mut self, what: &str, goal: &str, measured: String, met: bool) {
        println!(
            "target {}: {what}: {goal}; measured {measured}",
            if met { "met" } else { "MISSED" }
        );
        self.targets.push(Target {
            what: what.to_owned(),
            goal: goal.to_owned(),
            measured,
            met,
        });
    }

    /// Writes `<$UNDERSTUDY_BENCH_OUT>/<name>.json` when the suite runs us.
    pub fn finish(self) -> Result<()> {
        let Some(dir) = std::env::var_os(OUT_ENV).map(PathBuf::from) else {
            return Ok(());
        };
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("{}.json", self.name));
        std::fs::write(&path, serde_json::to_string_pretty(&self)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Reads a report written by [`finish`](Self::finish).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a report", path.display()))
    }
}

/// Memory that starts on a page boundary, as guest RAM and an image's pages
/// do. A large `Vec` starts 16 bytes past one (malloc's header in front of
/// an `mmap`), and on these AMD EPYCs a copy whose destination sits 8 or 16
/// bytes past its source modulo 4 KiB takes `rep movsb`'s slow path, in
/// glibc's `memcpy` and in the kernel's copies to and from user memory alike
/// (`understudy_checkpoint::copy`): a TCP receive into such a buffer ran at
/// half speed. So a baseline that should be the true limit, and memory that
/// stands for guest RAM, live here.
pub struct PageAligned(memmap2::MmapMut);

impl PageAligned {
    /// `bytes` of zeros, every page touched (so first-touch faults are not
    /// timed later).
    pub fn zeroed(bytes: usize) -> Self {
        let mut map = memmap2::MmapMut::map_anon(bytes.max(1))
            .unwrap_or_else(|e| panic!("cannot map {bytes} bytes: {e}"));
        for b in map.iter_mut().step_by(4096) {
            *b = 0;
        }
        Self(map)
    }

    /// A copy of `bytes`, page-aligned.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut out = Self::zeroed(bytes.len());
        out[..bytes.len()].copy_from_slice(bytes);
        out
    }
}

impl std::ops::Deref for PageAligned {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0[..]
    }
}

impl std::ops::DerefMut for PageAligned {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0[..]
    }
}

impl Clone for PageAligned {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl std::fmt::Debug for PageAligned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageAligned({} bytes)", self.0.len())
    }
}

/// Real bytes as a stand-in for guest RAM: executables and libraries from
/// /usr, concatenated (padded if /usr holds less), page-aligned as guest RAM
/// is.
pub fn real_memory(bytes: usize) -> PageAligned {
    let mut out = Vec::with_capacity(bytes);
    for dir in ["/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib"] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut paths: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        for p in paths {
            if out.len() >= bytes {
                return PageAligned::from_slice(&out);
            }
            if let Ok(d) = std::fs::read(&p) {
                out.extend_from_slice(&d[..d.len().min(bytes - out.len())]);
            }
        }
    }
    out.resize(bytes, 0x5a);
    PageAligned::from_slice(&out)
}

/// CPU time the hypervisor under this machine took from it ("steal" in
/// `/proc/stat`) while a measurement ran: this machine is itself a VM, and
/// a guest's work rate here moves with it by more than some effects
/// measured, so benches report it beside their ratios.
#[derive(Clone, Copy, Debug)]
pub struct Steal {
    ticks: u64,
    at: std::time::Instant,
}

impl Steal {
    /// Starts counting.
    pub fn start() -> Self {
        Self {
            ticks: steal_ticks(),
            at: std::time::Instant::now(),
        }
    }

    /// The share of the machine's CPU time (all cores) stolen since
    /// [`Self::start`]; NaN where `/proc/stat` cannot be read.
    pub fn share(&self) -> f64 {
        // SAFETY: sysconf reads a constant of the running system.
        let (hz, cpus) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_NPROCESSORS_ONLN),
            )
        };
        let stolen = steal_ticks().saturating_sub(self.ticks) as f64 / hz.max(1) as f64;
        stolen / (self.at.elapsed().as_secs_f64() * cpus.max(1) as f64)
    }
}

/// The machine's stolen CPU time so far, in clock ticks (0 if unknown).
fn steal_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| {
            // "cpu  user nice system idle iowait irq softirq steal ..."
            stat.lines().next()?.split_whitespace().nth(8)?.parse().ok()
        })
        .unwrap_or(0)
}

/// Whether a bench runs its part `name`: all parts unless
/// `UNDERSTUDY_BENCH_PARTS` lists some (comma-separated), e.g. to run one
/// part under perf or to compare two daemons on it.
pub fn part(name: &str) -> bool {
    std::env::var("UNDERSTUDY_BENCH_PARTS")
        .map_or(true, |parts| parts.split(',').any(|p| p == name))
}

/// The median, smallest and largest of `v` (sorted in place); NaN when
/// empty.
pub fn spread(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |i: usize| v.get(i).copied().unwrap_or(f64::NAN);
    (at(v.len() / 2), at(0), at(v.len().wrapping_sub(1)))
}

/// CPU seconds (user and system) this process has used so far, threads
/// that have ended included.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU time of each thread of one process so far, from the scheduler's
/// own accounting (`/proc/<pid>/task/<tid>/schedstat`: time on a core, time
/// runnable but waiting for one). Two snapshots say where a thread's wall
/// time went between them: running, waiting for a core, or blocked (asleep:
/// a guest stop, a write-protect fault, a lock).
#[derive(Clone, Debug, Default)]
pub struct ThreadTimes {
    /// (thread id, name, ns on a core, ns runnable and waiting).
    threads: Vec<(u32, String, u64, u64)>,
}

impl ThreadTimes {
    /// A snapshot of `pid`'s threads (empty if it is gone or `/proc` cannot
    /// be read).
    pub fn of(pid: u32) -> Self {
        let mut threads = Vec::new();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Self::default();
        };
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let read = |f: &str| std::fs::read_to_string(task.path().join(f)).ok();
            let (Some(comm), Some(stat)) = (read("comm"), read("schedstat")) else {
                continue; // the thread ended meanwhile
            };
            let mut fields = stat.split_whitespace().map(|f| f.parse::<u64>().ok());
            if let (Some(Some(run)), Some(Some(wait))) = (fields.next(), fields.next()) {
                threads.push((tid, comm.trim().to_string(), run, wait));
            }
        }
        Self { threads }
    }

    /// Seconds on a core and seconds waiting for one since `earlier`, summed
    /// over the threads whose name starts with `prefix` (all with ""); a
    /// thread born since counts from zero.
    pub fn since(&self, earlier: &Self, prefix: &str) -> (f64, f64) {
        let (mut run, mut wait) = (0, 0);
        for (tid, name, r, w) in &self.threads {
            if !name.starts_with(prefix) {
                continue;
            }
            let (r0, w0) = earlier
                .threads
                .iter()
                .find(|t| t.0 == *tid)
                .map_or((0, 0), |t| (t.2, t.3));
            run += r.saturating_sub(r0);
            wait += w.saturating_sub(w0);
        }
        (run as f64 / 1e9, wait as f64 / 1e9)
    }
}

/// xorshift64: cheap, repeatable page picks (never seed with 0).
#[derive(Clone, Debug)]
pub struct XorShift(pub u64);

impl XorShift {
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A table row: `name`, then p50, p99, min and max of `v` (one decimal).
pub fn quantiles(table: &mut Table, name: &str, v: &[f64]) {
    table.row(vec![
        name.into(),
        num(quantile(v, 0.5), 1),
        num(quantile(v, 0.99), 1),
        num(quantile(v, 0.0), 1),
        num(quantile(v, 1.0), 1),
    ]);
}

/// Samples as a cumulative distribution (x: the value, y: the fraction of
/// samples at or below it).
pub fn cdf(name: &str, v: &[f64]) -> Series {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len() as f64;
    Series {
        name: name.into(),
        points: s
            .into_iter()
            .enumerate()
            .map(|(i, x)| (x, (i + 1) as f64 / n))
            .collect(),
        points_only: false,
    }
}

/// The `q` quantile (0..=1) of `v`, by nearest rank; NaN when empty.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() as f64 * q) as usize).min(s.len() - 1)]
}

/// `docs/BENCHMARKS.md`: the machine, the target checks, then each report's
/// tables and charts (SVGs in `bench/` beside it).
pub fn markdown(reports: &[Report], machine: &[(String, String)], seconds: f64) -> String {
    let mut md = String::from(
        "# Benchmarks\n\n\
         Written by `cargo run --release -p understudy-bench` (the whole suite, one \
         benchmark at a time); do not edit by hand. Every ratio compares two things \
         measured side by side in the same run: these machines are shared and noisy, \
         so absolute times move from run to run and ratios move much less.\n\n\
         Raw numbers: [`bench/results.json`](bench/results.json).\n\n## Machine\n\n\
         | | |\n|---|---|\n",
    );
    for (k, v) in machine {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let _ = writeln!(md, "| suite run time | {:.0} s |", seconds);
    md.push_str(
        "\nOn these machines `/dev/kvm` is KVM's software (PVM) backend: it runs guest \
         code through an emulator at about 0.5 µs per instruction, so guest-side speed \
         is reported as a ratio (with ÷ without protection) and VMM-side costs in \
         absolute terms.\n",
    );
    let targets: Vec<_> = reports
        .iter()
        .flat_map(|r| r.targets.iter().map(move |t| (r, t)))
        .collect();
    if !targets.is_empty() {
        md.push_str("\n## Targets\n\n| | target | measured | | ran |\n|---|---|---|---|---|\n");
        for (r, t) in targets {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                t.what,
                t.goal,
                t.measured,
                if t.met { "met" } else { "**missed**" },
                r.ran_when()
            );
        }
    }
    for r in reports {
        let _ = write!(md, "\n## {}\n\nRun alone: `{}`\n\n", r.title, r.command);
        if !r.ran.is_empty() {
            let _ = writeln!(md, "Ran: {}\n", r.ran_where());
        }
        for t in &r.tables {
            md.push_str(&t.markdown());
            md.push('\n');
        }
        for c in &r.charts {
            let _ = writeln!(md, "![{}](bench/{}.svg)\n", c.title, c.name);
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_cpu_counts_a_thread_that_has_ended() {
        let before = process_cpu_seconds();
        std::thread::spawn(|| {
            let t = std::time::Instant::now();
            while t.elapsed() < std::time::Duration::from_millis(100) {
                std::hint::spin_loop();
            }
        })
        .join()
        .unwrap();
        let used = process_cpu_seconds() - before;
        // 0.1 s of spinning, on a core shared with other tests.
        assert!(used >= 0.02, "{used} s");
    }

    #[test]
    fn thread_times_tell_a_busy_thread_from_a_sleeping_one() {
        let pid = std::process::id();
        let before = ThreadTimes::of(pid);
        assert!(
            !before.threads.is_empty(),
            "this process's threads are in /proc"
        );
        let spawn = |name: &str, busy: bool| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let t = std::time::Instant::now();
                    while t.elapsed() < std::time::Duration::from_millis(200) {
                        if busy {
                            std::hint::spin_loop();
                        } else {
                            std::thread::sleep(std::time::Duration::from_millis(50));
                        }
                    }
                    ThreadTimes::of(std::process::id())
                })
                .unwrap()
        };
        let (busy, idle) = (spawn("tt-busy", true), spawn("tt-idle", false));
        let (after_busy, after_idle) = (busy.join().unwrap(), idle.join().unwrap());
        // Each thread read its own times just before it ended. Both shared
        // two cores with the rest of the tests, so only the order of
        // magnitude is certain.
        let (run, wait) = after_busy.since(&before, "tt-busy");
        assert!(
            run + wait >= 0.15,
            "the spinning thread: {run} s run, {wait} s waiting"
        );
        assert!(run >= 0.02, "the spinning thread ran {run} s");
        let (run, _) = after_idle.since(&before, "tt-idle");
        assert!(run < 0.02, "the sleeping thread ran {run} s");
        assert_eq!(after_busy.since(&before, "no-such-thread"), (0.0, 0.0));
    }

    #[test]
    fn tables_keep_text_and_values_in_step() {
        let mut t = Table::new("t", &["name", "µs"]);
        t.row(vec!["a".into(), num(1.25, 1)]);
        t.row(vec!["bb".into(), num(f64::NAN, 1)]);
        assert_eq!(t.rows, vec![vec!["a", "1.2"], vec!["bb", "-"]]);
        assert_eq!(t.values, vec![vec![None, Some(1.25)], vec![None, None]]);
        assert_eq!(t.text(), "t\nname   µs\na     1.2\nbb      -\n");
        assert!(t.markdown().contains("| a | 1.2 |\n| bb | - |"));
    }

    #[test]
    fn markdown_has_machine_targets_tables_and_charts() {
        let mut r = Report::new(
            "vmm",
            "Epoch pause",
            "cargo bench -p understudy-vmm --bench vmm",
        );
        let mut t = Table::new("stops", &["pages", "µs"]);
        t.row(vec!["1000".into(), num(714.0, 0)]);
        r.tables.push(t);
        r.charts.push(Chart {
            name: "pause-vs-dirty".into(),
            title: "pause".into(),
            ..Default::default()
        });
        r.targets.push(Target {
            what: "stop at 1k".into(),
            goal: "under 2 ms".into(),
            measured: "714 µs".into(),
            met: true,
        });
        r.ran = vec![
            ("date (UTC)".into(), "2026-12-04 11:52".into()),
            ("commit".into(), "2c0aa77".into()),
            ("caches".into(), "L3 32768K: CPUs 0-1".into()),
        ];
        // A section kept from a run before sections said where they ran.
        let mut old = Report::new("pipeline", "Pipeline", "cargo bench --bench pipeline");
        old.targets.push(Target {
            what: "pipeline".into(),
            goal: "50 %".into(),
            measured: "30 %".into(),
            met: false,
        });
        let md = markdown(&[r, old], &[("cores".into(), "2".into())], 200.0);
        for want in [
            "| cores | 2 |",
            "| suite run time | 200 s |",
            "| stop at 1k | under 2 ms | 714 µs | met | 2026-12-04 11:52, 2c0aa77 |",
            "| pipeline | 50 % | 30 % | **missed** | an earlier run |",
            "Ran: date (UTC) 2026-12-04 11:52; commit 2c0aa77; caches L3 32768K: CPUs 0-1",
            "## Epoch pause",
            "Run alone: `cargo bench -p understudy-vmm --bench vmm`",
            "| 1000 | 714 |",
            "![pause](bench/pause-vs-dirty.svg)",
        ] {
            assert!(md.contains(want), "{want:?} missing from:\n{md}");
        }
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 51.0);
        assert_eq!(quantile(&v, 0.99), 100.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
