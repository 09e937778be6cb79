//! What the primary role keeps in `state_dir`, each file replaced whole and
//! durably (`understudy_common::durable`):
//!
//! - `generation`: the generation this host runs the VM at;
//! - `fenced`: present once this host was deposed (the generation that did
//!   it); a primary refuses to boot while it is there;
//! - `vm`: the incarnation of the VM this host ran last and how that run
//!   stands (see [`RunRecord`]). A restarted primary sends it in its first
//!   `Hello`, so the backup can tell a host that lost the VM it protected
//!   (the backup resumes it) from one whose VM was stopped on purpose (a
//!   fresh boot may replace it) or released output no backup holds (only an
//!   operator can choose between the two copies).

use std::path::{Path, PathBuf};

use understudy_common::durable::{self, DurableError};
use understudy_common::ids::{Generation, Incarnation, RunState};

const FENCED_FILE: &str = "fenced";
const GENERATION_FILE: &str = "generation";
const RECORD_FILE: &str = "vm";

/// A state file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostStateError {
    /// A state file cannot be read or replaced.
    #[error(transparent)]
    Io(#[from] DurableError),
    /// The state directory cannot be created.
    #[error("cannot create the state directory {path}")]
    CreateDir {
        /// The state directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A state file holds something understudy never writes.
    #[error(
        "{path} holds {text:?}, not {what}: it was not written by understudy. \
         Restore it, or remove it if you know what it should say (see the operations guide)"
    )]
    Garbled {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
        /// What it holds.
        text: String,
    },
}

/// The last VM this host ran, and how that run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunRecord {
    /// Which boot of the VM.
    pub incarnation: Incarnation,
    /// How its run on this host stands.
    pub state: RunState,
}

impl RunRecord {
    fn encode(&self) -> String {
        format!(
            "incarnation={} state={}\n",
            self.incarnation,
            self.state.name()
        )
    }

    fn decode(text: &str) -> Option<Self> {
        let mut incarnation = None;
        let mut state = None;
        for field in text.split_whitespace() {
            match field.split_once('=')? {
                ("incarnation", v) => incarnation = Some(v.parse().ok()?),
                ("state", v) => state = Some(RunState::from_name(v)?),
                _ => return None,
            }
        }
        Some(Self {
            incarnation: incarnation?,
            state: state?,
        })
    }
}

/// The primary's state directory.
#[derive(Debug, Clone)]
pub struct HostState {
    dir: PathBuf,
}

/// Serialises the fence marker's writes and removals within the process
/// (see [`HostState::adopt`]).
fn lock_marker() -> std::sync::MutexGuard<'static, ()> {
    static MARKER: std::sync::Mutex<()> = std::sync::Mutex::new(());
    MARKER.lock().unwrap_or_else(|p| p.into_inner())
}

impl HostState {
    /// Opens (creating) the state directory.
    pub fn open(dir: &Path) -> Result<Self, HostStateError> {
        std::fs::create_dir_all(dir).map_err(|source| HostStateError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The fence marker's path (for messages).
    pub fn fenced_marker(&self) -> PathBuf {
        self.path(FENCED_FILE)
    }

    /// The generation that deposed this host, if it was.
    pub fn fenced(&self) -> Result<Option<Generation>, HostStateError> {
        let path = self.fenced_marker();
        // A marker that cannot be read still means "deposed".
        Ok(durable::read(&path)?.map(|text| text.trim().parse().unwrap_or(Generation::FIRST)))
    }

    /// Records that `generation` deposed this host.
    pub fn mark_fenced(&self, generation: Generation) -> Result<(), HostStateError> {
        let _marker = lock_marker();
        Ok(durable::write(
            &self.fenced_marker(),
            format!("{generation}\n").as_bytes(),
        )?)
    }

    /// This host runs the VM at `generation` now (a promotion or handover
    /// made it the primary): an older fence marker no longer applies.
    ///
    /// A marker of a newer generation stays: the daemon records a takeover
    /// on a thread beside the primary role, which a newer promotion elsewhere
    /// may depose meanwhile.
    pub fn adopt(&self, generation: Generation) -> Result<(), HostStateError> {
        self.set_generation(generation)?;
        let _marker = lock_marker();
        match self.fenced()? {
            None => Ok(()),
            Some(newer) if newer > generation => {
                tracing::warn!(%generation, deposed_by = %newer, "this host was deposed again meanwhile: its fence marker stays");
                Ok(())
            }
            Some(_) => {
                tracing::info!(%generation, "removed a fence marker of an older generation");
                Ok(durable::remove(&self.fenced_marker())?)
            }
        }
    }

    /// The generation this host runs the VM at (the first one if none yet).
    pub fn generation(&self) -> Result<Generation, HostStateError> {
        let path = self.path(GENERATION_FILE);
        match durable::read(&path)? {
            Some(text) => text.trim().parse().map_err(|_| HostStateError::Garbled {
                path,
                what: "a generation number",
                text,
            }),
            None => {
                self.set_generation(Generation::FIRST)?;
                Ok(Generation::FIRST)
            }
        }
    }

    fn set_generation(&self, generation: Generation) -> Result<(), HostStateError> {
        Ok(durable::write(
            &self.path(GENERATION_FILE),
            format!("{generation}\n").as_bytes(),
        )?)
    }

    /// The last VM this host ran, if it recorded one.
    pub fn record(&self) -> Result<Option<RunRecord>, HostStateError> {
        let path = self.path(RECORD_FILE);
        match durable::read(&path)? {
            None => Ok(None),
            Some(text) => RunRecord::decode(&text)
                .map(Some)
                .ok_or(HostStateError::Garbled {
                    path,
                    what: "a VM record (incarnation=… state=…)",
                    text,
                }),
        }
    }

    /// Makes the spares of this host's state files (see
    /// `understudy_common::durable`): their writes then need no new disk
    /// block, so a promotion on a disk that has filled since still records
    /// the new generation.
    pub fn reserve(&self) -> Result<(), HostStateError> {
        for name in [GENERATION_FILE, FENCED_FILE, RECORD_FILE] {
            durable::reserve(&self.path(name))?;
        }
        Ok(())
    }

    /// Records how the VM's run on this host stands.
    pub fn set_record(&self, record: RunRecord) -> Result<(), HostStateError> {
        Ok(durable::write(
            &self.path(RECORD_FILE),
            record.encode().as_bytes(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let state = HostState::open(&dir.path().join("s")).unwrap();
        assert_eq!(state.record().unwrap(), None);
        assert_eq!(state.generation().unwrap(), Generation::FIRST);
        for s in [
            RunState::Protected,
            RunState::ReleasedUnprotected,
            RunState::Stopped,
            RunState::Gone,
        ] {
            let r = RunRecord {
                incarnation: Incarnation::new_random(),
                state: s,
            };
            state.set_record(r).unwrap();
            assert_eq!(state.record().unwrap(), Some(r));
        }
        std::fs::write(dir.path().join("s/vm"), "incarnation=zz state=running\n").unwrap();
        let err = state.record().unwrap_err().to_string();
        assert!(err.contains("not a VM record"), "{err}");
        std::fs::write(dir.path().join("s/generation"), "").unwrap();
        let err = state.generation().unwrap_err().to_string();
        assert!(err.contains("not a generation number"), "{err}");
    }

    #[test]
    fn a_fence_marker_is_cleared_when_the_host_adopts_a_newer_generation() {
        let dir = tempfile::tempdir().unwrap();
        let state = HostState::open(dir.path()).unwrap();
        state.mark_fenced(Generation(3)).unwrap();
        assert_eq!(state.fenced().unwrap(), Some(Generation(3)));
        state.adopt(Generation(4)).unwrap();
        assert_eq!(state.fenced().unwrap(), None);
        assert_eq!(state.generation().unwrap(), Generation(4));
    }

    #[test]
    fn a_fence_marker_of_a_newer_generation_outlives_the_adoption_of_an_older_one() {
        // The daemon records a takeover at generation 4 on a thread while a
        // promotion elsewhere (generation 5) deposes the new primary.
        let dir = tempfile::tempdir().unwrap();
        let state = HostState::open(dir.path()).unwrap();
        state.mark_fenced(Generation(5)).unwrap();
        state.adopt(Generation(4)).unwrap();
        assert_eq!(state.fenced().unwrap(), Some(Generation(5)));
        assert_eq!(state.generation().unwrap(), Generation(4));
    }
}
