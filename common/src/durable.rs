//! Small state files a daemon must never find torn: the primary's generation
//! and fence marker, the host's role, the primary's record of the VM it ran.
//! Each is replaced whole: written to a temporary file in the same directory,
//! fsynced, renamed over the old one, and the directory fsynced, so a crash or
//! a power loss at any instant leaves the old content or the new one.
//!
//! A full disk must not stop such a write either: a promotion records the
//! host's new generation and role, and a write that failed there would
//! leave the VM it just resumed without a host to run it. So the temporary
//! file is kept between writes as a *spare* of [`SPARE_LEN`] bytes, its
//! blocks claimed: a write overwrites it in place (no new block, so no
//! `ENOSPC` for a file that fits it), renames it over the old file (which
//! frees the old file's blocks), and allocates the next spare in their
//! place. [`reserve`] makes a spare ahead of a file's first write; a daemon
//! reserves all of its state files when it starts.
//!
//! This module knows nothing of what the files mean.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The size of a state file's spare: every state file fits it.
pub const SPARE_LEN: usize = 4096;

/// A state file that cannot be written or read.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}")]
pub struct DurableError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

fn err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> DurableError + 'a {
    move |source| DurableError {
        action,
        path: path.to_owned(),
        source,
    }
}

fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The temporary file of `path`, kept as its spare between writes.
fn spare_of(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    dir_of(path).join(name)
}

/// Replaces `path` with `bytes` atomically and durably, through its spare
/// (see the module doc). The directory must exist.
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), DurableError> {
    let dir = dir_of(path);
    let tmp = spare_of(path);
    // Into the spare where there is one: its blocks are there already.
    let file = File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&tmp)
        .map_err(err("create", &tmp))?;
    file.write_all_at(bytes, 0).map_err(err("write", &tmp))?;
    file.set_len(bytes.len() as u64)
        .map_err(err("write", &tmp))?;
    file.sync_all().map_err(err("sync", &tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(err("rename into place", path))?;
    sync_dir(dir)?;
    // The next write's spare, in the blocks the rename just freed. The
    // write is done either way: without a spare, the next one allocates.
    if let Err(e) = reserve(path) {
        tracing::warn!(error = %e, "cannot keep a spare for the next write of a state file");
    }
    Ok(())
}

/// Makes the spare of `path` (see the module doc) unless it has one, so that
/// a write of `path` needs no new disk block.
///
/// A spare is room, not content: its blocks are claimed when it is written
/// (a delayed allocation is counted against the free space then), so it is
/// not fsynced. A crash may lose it, or leave its length without its blocks
/// (a hole); the daemon reserves its state files when it starts, and a
/// spare is judged by the blocks it holds, not its length.
pub fn reserve(path: &Path) -> Result<(), DurableError> {
    use std::os::unix::fs::MetadataExt;
    let tmp = spare_of(path);
    if tmp
        .metadata()
        .is_ok_and(|m| m.len() >= SPARE_LEN as u64 && m.blocks() * 512 >= SPARE_LEN as u64)
    {
        return Ok(());
    }
    let mut file = File::create(&tmp).map_err(err("create", &tmp))?;
    file.write_all(&[0; SPARE_LEN]).map_err(err("write", &tmp))
}

/// Removes `path` durably (absent is fine).
pub fn remove(path: &Path) -> Result<(), DurableError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err("remove", path)(e)),
    }
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// The file's text, or None if it does not exist.
pub fn read(path: &Path) -> Result<Option<String>, DurableError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err("read", path)(e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err("sync the directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Duration;
    use understudy_bench::full_disk;

    /// The child side of the crash test: rewrites the file with one of two
    /// long values, forever, until killed.
    #[test]
    #[ignore = "run by a_process_killed_mid_write_leaves_the_old_or_the_new_content"]
    fn child_rewrites_forever() {
        let path = std::env::var("UNDERSTUDY_DURABLE_CHILD")
            .expect("run by a_process_killed_mid_write_leaves_the_old_or_the_new_content");
        let values = [vec![b'a'; 64 << 10], vec![b'b'; 64 << 10]];
        for i in 0.. {
            write(Path::new(&path), &values[i % 2]).unwrap();
        }
    }

    #[test]
    fn a_process_killed_mid_write_leaves_the_old_or_the_new_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write(&path, &vec![b'a'; 64 << 10]).unwrap();
        let me = std::env::current_exe().unwrap();
        // Each write renames a new file into place: the file must have been
        // replaced at least once, or the trials below checked nothing.
        let inode =
            |path: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap());
        let first = inode(&path);
        let mut replaced = false;
        for trial in 0..20u64 {
            let mut child = Command::new(&me)
                .args([
                    "--exact",
                    "--ignored",
                    "durable::tests::child_rewrites_forever",
                ])
                .env("UNDERSTUDY_DURABLE_CHILD", &path)
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(20 + trial * 3));
            child.kill().unwrap();
            child.wait().unwrap();
            let text = std::fs::read(&path).unwrap();
            assert_eq!(
                text.len(),
                64 << 10,
                "trial {trial}: torn ({} bytes)",
                text.len()
            );
            assert!(
                text.iter().all(|&b| b == text[0]),
                "trial {trial}: a mix of two writes"
            );
            replaced |= inode(&path) != first;
        }
        assert!(
            replaced,
            "the child never rewrote the file: nothing was tested"
        );
    }

    /// On a full disk, a state file with a spare is still written, again
    /// and again; one without fails with `ENOSPC` and leaves nothing
    /// half-written. Runs [`full_disk_child`] in a mount namespace of its
    /// own on a 64 KiB tmpfs (needs root, as CI has).
    #[test]
    fn a_state_file_with_a_spare_is_written_on_a_full_disk() {
        full_disk::run_child_on_tmpfs("durable::tests::full_disk_child", "64k");
    }

    #[test]
    #[ignore = "run by a_state_file_with_a_spare_is_written_on_a_full_disk"]
    fn full_disk_child() {
        let dir = full_disk::child_dir();
        let (generation, role, never) = (dir.join("generation"), dir.join("role"), dir.join("x"));
        write(&generation, b"1\n").unwrap();
        reserve(&role).unwrap();
        full_disk::fill_up(&dir);
        for g in 2..10 {
            write(&generation, format!("{g}\n").as_bytes()).unwrap();
            assert_eq!(read(&generation).unwrap(), Some(format!("{g}\n")));
        }
        write(&role, b"primary\n").unwrap();
        assert_eq!(read(&role).unwrap().as_deref(), Some("primary\n"));
        // Without a spare: ENOSPC, and the file as it was (absent).
        let e = write(&never, b"y\n").unwrap_err();
        let source = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(
            source.and_then(std::io::Error::raw_os_error),
            Some(libc::ENOSPC),
            "{e}"
        );
        assert_eq!(read(&never).unwrap(), None);
    }

    #[test]
    fn a_spare_without_its_blocks_is_made_again() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("role");
        let spare = dir.path().join("role.tmp");
        // What a crash can leave: the spare's length, none of its blocks.
        File::create(&spare)
            .unwrap()
            .set_len(SPARE_LEN as u64)
            .unwrap();
        assert_eq!(
            std::fs::metadata(&spare).unwrap().blocks(),
            0,
            "not a hole here"
        );
        reserve(&path).unwrap();
        let m = std::fs::metadata(&spare).unwrap();
        assert!(
            m.blocks() * 512 >= SPARE_LEN as u64,
            "{} blocks",
            m.blocks()
        );
        assert_eq!(m.len(), SPARE_LEN as u64);
    }

    #[test]
    fn read_and_remove_treat_absence_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("role");
        assert_eq!(read(&path).unwrap(), None);
        write(&path, b"backup\n").unwrap();
        assert_eq!(read(&path).unwrap().as_deref(), Some("backup\n"));
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert_eq!(read(&path).unwrap(), None);
        // The spare stays, for the next write.
        let spare = dir.path().join("role.tmp");
        assert_eq!(std::fs::metadata(&spare).unwrap().len(), SPARE_LEN as u64);
        write(&path, b"primary\n").unwrap();
        assert_eq!(read(&path).unwrap().as_deref(), Some("primary\n"));
    }
}
