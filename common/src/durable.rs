//! Small state files a daemon must never find torn: the primary's generation
//! and fence marker, the host's role, the primary's record of the VM it ran.
//! Each is replaced whole: written to a temporary file in the same directory,
//! fsynced, renamed over the old one, and the directory fsynced, so a crash or
//! a power loss at any instant leaves the old content or the new one.
//!
//! This module knows nothing of what the files mean.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

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

/// Replaces `path` with `bytes` atomically and durably (see the module doc).
/// The directory must exist.
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), DurableError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    let tmp = dir.join(name);
    let mut file = File::create(&tmp).map_err(err("create", &tmp))?;
    file.write_all(bytes).map_err(err("write", &tmp))?;
    file.sync_all().map_err(err("sync", &tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(err("rename into place", path))?;
    sync_dir(dir)
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

    /// The child side of the crash test: rewrites the file with one of two
    /// long values, forever, until killed.
    #[test]
    fn child_rewrites_forever() {
        let Ok(path) = std::env::var("UNDERSTUDY_DURABLE_CHILD") else {
            return;
        };
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
        for trial in 0..20u64 {
            let mut child = Command::new(&me)
                .args(["--exact", "durable::tests::child_rewrites_forever"])
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
        }
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
        assert!(!dir.path().join("role.tmp").exists());
    }
}
