//! What a daemon builds from its TLS files (a server's configuration, the
//! witness's client of etcd), built again when the files change, so that a
//! renewed certificate or a new revocation list takes effect with no restart
//! (a restart of the primary's daemon would stop its VM).
//!
//! The files are looked at (size, time, inode: [`TlsStamp`]) each time the
//! thing is wanted, and it is built again when one changed. A change that
//! does not build (a file half written, a key that does not match its
//! certificate, a revocation list of another CA) keeps the last one that
//! did: a renewal done badly never takes a working pair down. It is said in
//! the log and, until the files build, in the daemon's status
//! ([`not_loaded`]): a renewal or a revocation that did not take effect must
//! not look as if it had.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::wire::{TlsFiles, TlsStamp};

/// TLS files that changed but do not build, by their certificate file.
static NOT_LOADED: Mutex<BTreeMap<PathBuf, String>> = Mutex::new(BTreeMap::new());

/// One sentence for each set of TLS files (this host's, the witness
/// client's) that changed but does not build, while it does not.
pub fn not_loaded() -> Vec<String> {
    NOT_LOADED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect()
}

/// A `T` built from TLS files (None: plaintext, built once), and built again
/// when they change.
#[derive(Debug)]
pub(crate) struct Following<T> {
    files: Option<TlsFiles>,
    /// Names it in the log and the status ("TLS files", "witness TLS files").
    what: &'static str,
    /// What the files looked like when it was last built, and what it is.
    current: Mutex<(Option<TlsStamp>, T)>,
}

impl<T: Clone> Following<T> {
    /// Built by `build` from `files` (None: plaintext) now, or its error.
    /// The files are looked at first: a change while it builds is built
    /// again at the next [`Self::get`].
    pub(crate) fn new<E>(
        files: Option<&TlsFiles>,
        what: &'static str,
        build: impl FnOnce() -> Result<T, E>,
    ) -> Result<Self, E> {
        let stamp = files.map(TlsFiles::stamp);
        Ok(Self {
            files: files.cloned(),
            what,
            current: Mutex::new((stamp, build()?)),
        })
    }

    /// What to use now: built again by `build` (from the files) first if
    /// they changed since (looked at once per change, whatever comes of it).
    pub(crate) fn get<E: std::error::Error>(
        &self,
        build: impl FnOnce(&TlsFiles) -> Result<T, E>,
    ) -> T {
        self.get_noting(build).0
    }

    /// [`Self::get`], and whether this call built it (true for one caller
    /// per change that loaded).
    pub(crate) fn get_noting<E: std::error::Error>(
        &self,
        build: impl FnOnce(&TlsFiles) -> Result<T, E>,
    ) -> (T, bool) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let Some(files) = &self.files else {
            return (current.1.clone(), false);
        };
        let now = Some(files.stamp());
        let mut built = false;
        if now != current.0 {
            current.0 = now;
            let held = || NOT_LOADED.lock().unwrap_or_else(|p| p.into_inner());
            match build(files) {
                Ok(new) => {
                    current.1 = new;
                    built = true;
                    held().remove(&files.cert);
                    tracing::info!(
                        files = self.what,
                        cert = %files.cert.display(),
                        "TLS files changed: new connections use what they hold now"
                    );
                }
                Err(e) => {
                    let error = crate::wire::chain(&e);
                    tracing::warn!(
                        files = self.what,
                        %error,
                        "TLS files changed but do not load: new connections still use what \
                         was loaded before (fix the files; they are read again when they \
                         change)"
                    );
                    held().insert(
                        files.cert.clone(),
                        format!(
                            "{} changed but do not load ({error}): new connections still use \
                             what was loaded before; fix the files",
                            self.what
                        ),
                    );
                }
            }
        }
        (current.1.clone(), built)
    }
}
