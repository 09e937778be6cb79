//! End-to-end tests of `understudyctl run --record` and `understudyctl
//! replay`: the real binary, real KVM, the replay in another process than
//! the recording; and every way a recording on disk can be damaged.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{CTL, require_kvm};
use understudy_checkpoint::trace::{SEGMENT_HEADER_LEN, parse_segment};

fn replay(dir: &Path, extra: &[&str]) -> Output {
    Command::new(CTL)
        .arg("replay")
        .arg(dir)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Records the kv guest for a few seconds under a random SET/GET/DEL load
/// written to its console at random moments; returns its console output.
fn record_kv(dir: &Path, seed: u64) -> Vec<u8> {
    require_kvm();
    let mut child = Command::new(CTL)
        .args([
            "run",
            "--guest",
            "kv",
            "--mem",
            "16",
            "--stop-after",
            "4s",
            "--record",
        ])
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut seed = seed | 1;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_millis(3000) {
        let key = next() % 24;
        let line = match next() % 3 {
            0 => format!("SET k{key} v{i}\n"),
            1 => format!("GET k{key}\n"),
            _ => format!("DEL k{key}\n"),
        };
        let cut = (next() as usize) % line.len();
        let _ = stdin.write_all(&line.as_bytes()[..cut]);
        let _ = stdin.flush();
        std::thread::sleep(Duration::from_millis(next() % 4));
        let _ = stdin.write_all(&line.as_bytes()[cut..]);
        let _ = stdin.flush();
        std::thread::sleep(Duration::from_millis(next() % 30));
        i += 1;
    }
    let out = child.wait_with_output().unwrap();
    common::assert_success(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().count() > 50, "the kv guest answered: {text}");
    out.stdout
}

#[test]
fn a_kv_recording_replays_in_another_process_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    let recorded = record_kv(&rec, 0x9e37_79b9_7f4a_7c15);
    let out = replay(&rec, &["--verify"]);
    common::assert_success(&out);
    assert!(
        out.stdout == recorded,
        "replayed output differs:\n{}\n---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&recorded)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("equal the recorded end, page for page"),
        "{err}"
    );
}

#[test]
fn a_counter_replayed_to_an_exit_then_live_carries_on() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    let out = Command::new(CTL)
        .args([
            "run",
            "--guest",
            "counter",
            "--interval",
            "10",
            "--stop-after",
            "1s",
            "--record",
        ])
        .arg(&rec)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    common::assert_success(&out);
    let out = replay(&rec, &["--to", "200", "--go-live", "--stop-after", "1s"]);
    common::assert_success(&out);
    let lines: Vec<u64> = common::finished_lines(&out.stdout)
        .0
        .iter()
        .filter_map(|l| l.strip_prefix("count ")?.parse().ok())
        .collect();
    // Exit 200 is early in the first second; one live second adds ~100 lines.
    assert!(lines.len() > 60, "{lines:?}");
    assert_eq!(lines, (0..lines.len() as u64).collect::<Vec<_>>());

    // Replayed to an exit, then recording anew: that recording replays too.
    let again = dir.path().join("again");
    let out = Command::new(CTL)
        .arg("replay")
        .arg(&rec)
        .args(["--to", "300", "--stop-after", "700ms", "--record"])
        .arg(&again)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    common::assert_success(&out);
    let live = out.stdout.clone();
    let out = replay(&again, &["--verify"]);
    common::assert_success(&out);
    assert!(!out.stdout.is_empty() && live.ends_with(&out.stdout));
    let (state, _) = understudy_vmm::snapshot::read_snapshot(&again.join("start")).unwrap();
    assert_eq!(state.deterministic.unwrap().exit_index, 300);
}

/// Splits the log into its segments.
fn segments(log: &[u8]) -> Vec<Vec<u8>> {
    let mut rest = log;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (_, _, used) = parse_segment(rest).unwrap();
        out.push(rest[..used].to_vec());
        rest = &rest[used..];
    }
    out
}

fn assert_refused(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad log was accepted: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "expected {needle:?} in: {err}"
    );
}

#[test]
fn damaged_logs_and_snapshots_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    let other = dir.path().join("other");
    record_kv(&rec, 42);
    record_kv(&other, 43);
    let log_path = rec.join("trace.log");
    let log = std::fs::read(&log_path).unwrap();
    let segs = segments(&log);
    assert!(segs.len() >= 3, "a 4 s recording seals several segments");

    let case = |name: &str, bytes: &[u8], needle: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for sub in ["start", "end"] {
            let to = d.join(sub);
            std::fs::create_dir_all(&to).unwrap();
            for f in ["vm.state", "memory.bin"] {
                std::fs::copy(rec.join(sub).join(f), to.join(f)).unwrap();
            }
        }
        std::fs::write(d.join("trace.log"), bytes).unwrap();
        eprintln!("case {name}");
        assert_refused(&replay(&d, &["--verify"]), needle);
    };

    // Truncated inside a segment.
    case("truncated", &log[..log.len() - 7], "truncated");
    // A flipped bit in a segment's body: the middle of the first segment
    // after the first that has one (how long each is depends on the run:
    // a fixed offset could land in the next segment's header).
    let (i, seg) = segs
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, s)| s.len() > SEGMENT_HEADER_LEN + 8)
        .expect("a 4 s recording has a segment with records after its first");
    let before: usize = segs[..i].iter().map(Vec::len).sum();
    let mut corrupt = log.clone();
    corrupt[before + (SEGMENT_HEADER_LEN + seg.len()) / 2] ^= 0x10;
    case("corrupt", &corrupt, "body checksum mismatch");
    // A flipped bit in the magic of a segment after the first: a damaged
    // log, not "not a trace log".
    let mut damaged = log.clone();
    damaged[segs[0].len()] ^= 0x10;
    case("damaged", &damaged, "segment 1: its header is damaged");
    // Two segments swapped.
    let mut reordered = segs.clone();
    reordered.swap(1, 2);
    case("reordered", &reordered.concat(), "order");
    // A segment repeated.
    let mut repeated = segs.clone();
    repeated.insert(1, segs[0].clone());
    case("repeated", &repeated.concat(), "order");
    // Another recording's log.
    let foreign = std::fs::read(other.join("trace.log")).unwrap();
    case("foreign", &foreign, "stream");
    // Not a log at all.
    case(
        "garbage",
        b"this is not a trace log at all, just some text\n",
        "not an understudy trace log",
    );
    // A log cut at a segment boundary (the last segment is the empty end
    // mark, so cut two): replays what it holds, and --verify says the end
    // is not reached.
    case("short", &segs[..segs.len() - 2].concat(), "differs");

    // A missing log, a missing snapshot, an empty directory.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_refused(&replay(&empty, &[]), "cannot use the snapshot");
    let no_log = dir.path().join("nolog");
    std::fs::create_dir_all(&no_log).unwrap();
    std::fs::rename(rec.join("start"), no_log.join("start")).unwrap();
    assert_refused(&replay(&no_log, &[]), "cannot open the trace log");

    // A snapshot of the kernel mode cannot be replayed.
    let kernel = dir.path().join("kernel");
    let out = Command::new(CTL)
        .args([
            "run",
            "--guest",
            "counter",
            "--stop-after",
            "300ms",
            "--snapshot-to",
        ])
        .arg(kernel.join("start"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    common::assert_success(&out);
    std::fs::write(kernel.join("trace.log"), &log).unwrap();
    assert_refused(&replay(&kernel, &[]), "deterministic mode");

    // Recording into a directory that holds something is refused.
    let out = Command::new(CTL)
        .args([
            "run",
            "--guest",
            "counter",
            "--stop-after",
            "300ms",
            "--record",
        ])
        .arg(&other)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_refused(&out, "not empty");
}
