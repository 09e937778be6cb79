//! End-to-end tests of `understudyctl run` and `understudyctl restore`: the real
//! binary as a child process, real KVM, console over pipes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{CTL, require_kvm};

fn ctl(args: &[&str]) -> Output {
    require_kvm();
    Command::new(CTL)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The lines the guest finished (a run ends at any instant, maybe mid-line).
fn stdout_lines(out: &Output) -> Vec<String> {
    common::finished_lines(&out.stdout).0
}

fn numbers(lines: &[String], prefix: &str) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(prefix)?.parse().ok())
        .collect()
}

/// CI once caught the restore's end between "count " and "400": that rest is
/// neither a line nor a number.
#[test]
fn a_line_cut_by_the_end_of_a_run_is_not_a_finished_line() {
    let (lines, rest) = common::finished_lines(b"count 16\ncount 1");
    assert_eq!(
        (lines, rest.as_str()),
        (vec!["count 16".to_owned()], "count 1")
    );
    let (lines, rest) = common::finished_lines(b"count 0\ncount 1\n");
    assert_eq!((lines.len(), rest.as_str()), (2, ""));
    assert_eq!(common::finished_lines(b"count ").0, Vec::<String>::new());
}

#[test]
fn counter_run_then_restore_is_one_unbroken_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("S");
    let snap = snap.to_str().unwrap();
    let first = ctl(&[
        "run",
        "--guest",
        "counter",
        "--interval",
        "10",
        "--stop-after",
        "2s",
        "--snapshot-to",
        snap,
    ]);
    common::assert_success(&first);
    let second = ctl(&["restore", snap, "--stop-after", "2s"]);
    common::assert_success(&second);
    // Concatenate raw bytes: a line cut by the snapshot is completed by the
    // restore, whose own end may cut the last line.
    let mut all = first.stdout.clone();
    all.extend(&second.stdout);
    let (lines, rest) = common::finished_lines(&all);
    let counts = numbers(&lines, "count ");
    assert_eq!(
        counts.len(),
        lines.len(),
        "only count lines on stdout: {lines:?}"
    );
    assert_eq!(counts, (0..counts.len() as u64).collect::<Vec<_>>());
    let next = format!("count {}", counts.len());
    assert!(
        next.starts_with(&rest),
        "the restore's last output {rest:?} begins {next:?}"
    );
    let before = numbers(&stdout_lines(&first), "count ").len();
    assert!(
        before >= 10 && counts.len() >= before + 10,
        "both runs made progress: {before} then {}",
        counts.len()
    );
}

/// Runs `understudyctl` with `input` written line by line, each after the
/// previous line's answer, and returns every stdout line.
fn converse(args: &[&str], input: &[String], wait_for: &str) -> (Vec<String>, Output) {
    require_kvm();
    let mut child = Command::new(CTL)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    let next = |lines: &mut Vec<String>| {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("guest answered");
        lines.push(line.clone());
        line
    };
    while next(&mut lines) != wait_for {}
    for line in input {
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        next(&mut lines);
    }
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    lines.extend(rx.try_iter());
    (lines, output)
}

#[test]
fn kv_data_set_before_a_snapshot_is_there_after_restore() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("kv");
    let snap = snap.to_str().unwrap();
    let sets: Vec<String> = (0..10).map(|i| format!("SET k{i} v{i}")).collect();
    let (lines, out) = converse(
        &[
            "run",
            "--guest",
            "kv",
            "--stop-after",
            "3s",
            "--snapshot-to",
            snap,
        ],
        &sets,
        "kv ready",
    );
    common::assert_success(&out);
    assert_eq!(lines.iter().filter(|l| *l == "OK").count(), 10, "{lines:?}");

    // Restore and ask for every key: all input goes in at once (more than the
    // UART's FIFO holds) and the answers come back in order.
    let mut child = Command::new(CTL)
        .args(["restore", snap, "--stop-after", "3s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"GET nothing\n").unwrap();
    for i in 0..10 {
        stdin.write_all(format!("GET k{i}\n").as_bytes()).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    common::assert_success(&out);
    let mut expected = vec!["NOTFOUND".to_owned()];
    expected.extend((0..10).map(|i| format!("VALUE v{i}")));
    assert_eq!(stdout_lines(&out), expected);
}

#[test]
fn dirtier_restored_from_a_snapshot_keeps_its_work() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("d");
    let snap = snap.to_str().unwrap();
    let args = [
        "run",
        "--guest",
        "dirtier",
        "--working-set",
        "2048",
        "--dirty-rate",
        "20000",
        "--report",
        "100",
    ];
    let first = ctl(&[&args[..], &["--stop-after", "2s", "--snapshot-to", snap]].concat());
    common::assert_success(&first);
    let second = ctl(&["restore", snap, "--stop-after", "2s"]);
    common::assert_success(&second);
    let before = numbers(&stdout_lines(&first), "work ");
    let after = numbers(&stdout_lines(&second), "work ");
    assert!(
        before.len() >= 5 && after.len() >= 5,
        "{before:?} / {after:?}"
    );
    let all: Vec<u64> = before.iter().chain(&after).copied().collect();
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "work only grows across the restore: {all:?}"
    );
}

fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    assert!(errors[0].contains(needle), "{needle:?} not in {stderr}");
}

#[test]
fn bad_arguments_get_one_clear_error_line() {
    assert_one_line_error(
        &ctl(&["run", "--guest", "linux"]),
        "choose counter, dirtier or kv",
    );
    assert_one_line_error(
        &ctl(&["run", "--guest", "counter", "--mem", "3"]),
        "between 8 MiB and 3072 MiB",
    );
    assert_one_line_error(
        &ctl(&[
            "run",
            "--guest",
            "dirtier",
            "--mem",
            "8",
            "--working-set",
            "5000",
        ]),
        "use at most 1024 pages",
    );
    assert_one_line_error(
        &ctl(&["run", "--guest", "counter", "--stop-after", "soon"]),
        "--stop-after",
    );
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    assert_one_line_error(
        &ctl(&["restore", missing.to_str().unwrap()]),
        "cannot read snapshot state",
    );
}

#[test]
fn a_corrupt_snapshot_is_refused_and_not_modified() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("S");
    let first = ctl(&[
        "run",
        "--guest",
        "counter",
        "--stop-after",
        "300ms",
        "--snapshot-to",
        snap.to_str().unwrap(),
    ]);
    common::assert_success(&first);
    let state = snap.join("vm.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    assert_one_line_error(
        &ctl(&["restore", snap.to_str().unwrap()]),
        "checksum mismatch",
    );
    assert_eq!(std::fs::read(&state).unwrap(), bytes);
}

#[test]
fn missing_dev_kvm_is_one_clear_error() {
    // Hide /dev/kvm in a private mount namespace (needs root, as CI has).
    let out = Command::new("unshare")
        .args([
            "--mount",
            "sh",
            "-c",
            r#"mount -t tmpfs none /dev && exec "$0" run --guest counter"#,
            CTL,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("unshare (util-linux) runs");
    assert_one_line_error(&out, "cannot open /dev/kvm");
}
