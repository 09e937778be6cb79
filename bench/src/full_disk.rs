//! A full disk for tests: a tmpfs of a chosen size, filled up. Needs root
//! (`mount`, and util-linux's `unshare` for a mount namespace of its own),
//! as CI has; a test that cannot get one fails and says why.
//!
//! Two ways in. A test of code inside this process runs one of its own
//! ignored tests as a child in a mount namespace of its own
//! ([`run_child_on_tmpfs`]; the child finds its directory with
//! [`child_dir`]), so nothing is mounted on the host. A test of daemons it
//! spawns mounts a [`Tmpfs`] where they keep their files (unmounted when
//! dropped). Either way [`fill_up`] then leaves no room on it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The variable that hands the child its tmpfs.
const DIR_ENV: &str = "UNDERSTUDY_FULL_DISK_DIR";

/// Runs `child` (an `#[ignore]`d test of this test binary, by its full
/// name) in a mount namespace of its own with a tmpfs of `size` (`mount`'s
/// `size=`, e.g. `1m`) at a fresh directory, and panics unless it ran and
/// passed.
pub fn run_child_on_tmpfs(child: &str, size: &str) {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("understudy-full-disk-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("no test binary: {e}"));
    let script = format!(
        r#"mount -t tmpfs -o size={size} none "$1" && exec "$0" --exact --ignored --nocapture {child}"#
    );
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .arg(&exe)
        .arg(&dir)
        .env(DIR_ENV, &dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run unshare (util-linux): {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{child} on a {size} tmpfs (needs root): {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The tmpfs [`run_child_on_tmpfs`] gave this child.
pub fn child_dir() -> PathBuf {
    std::env::var_os(DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("run by run_child_on_tmpfs, which sets {DIR_ENV}"))
}

/// Writes the file `filler` in `dir` until its filesystem is full, and
/// checks that it is (a new byte anywhere fails with `ENOSPC`).
pub fn fill_up(dir: &Path) {
    let path = dir.join("filler");
    let mut filler = std::fs::File::create(&path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    loop {
        match filler.write(&[0xff; 4096]) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::ENOSPC),
                    "filling {}: {e}",
                    dir.display()
                );
                break;
            }
        }
    }
    match std::fs::write(dir.join("probe"), b"p") {
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {}
        other => panic!("{} is not full: a byte more gave {other:?}", dir.display()),
    }
}

/// A tmpfs mounted for a test, unmounted (lazily) when dropped: drop what
/// keeps files open on it first.
#[derive(Debug)]
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` at `at` (made if missing).
    pub fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", at.display()));
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "none"])
            .arg(at)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {} (needs root): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self(at.to_owned())
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
