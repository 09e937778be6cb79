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
    /// A fault point stood in for a failing disk (tests only).
    #[error("injected fault at {0}")]
    Fault(&'static str),
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

/// Serialises the VM record's writes within the process: the backup role's
/// [`RecordsAhead`] and the primary role write it from different threads
/// (two writes at once would share the file's spare).
fn lock_record() -> std::sync::MutexGuard<'static, ()> {
    static RECORD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RECORD.lock().unwrap_or_else(|p| p.into_inner())
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
        let _record = lock_record();
        understudy_common::fault::check("host_state.run_record").map_err(HostStateError::Fault)?;
        Ok(durable::write(
            &self.path(RECORD_FILE),
            record.encode().as_bytes(),
        )?)
    }
}

/// The VM record written ahead of a takeover, while this host is the
/// backup (`understudy_common::role::RecordAhead`): a takeover must have it
/// on disk before the VM's first output here, and written at the takeover
/// its fsyncs (p50 0.5 ms, tails past 100 ms on these disks) came between
/// the failure and the clients.
///
/// What it writes, "this host runs incarnation X unprotected", is the
/// record a takeover of X writes, and it is read only by a primary that
/// boots on this host (its first `Hello` says how its last VM fared). A
/// host whose role file says backup does not boot as the primary, so
/// until a takeover the record is never read; after one it is the truth,
/// until the new primary's backup syncs and the record says "protected".
#[derive(Debug)]
pub struct RecordsAhead {
    asks: crossbeam_channel::Sender<Incarnation>,
    shared: std::sync::Arc<AheadShared>,
    state: HostState,
}

#[derive(Debug, Default)]
struct AheadShared {
    progress: std::sync::Mutex<AheadProgress>,
    done: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct AheadProgress {
    /// Incarnations asked for, and those whose write ended (either way).
    asked: u64,
    ended: u64,
    /// The incarnation this process durably recorded as run unprotected
    /// here (None also after a write that failed: the file may hold
    /// anything).
    recorded: Option<Incarnation>,
    /// The writing thread is gone (it panicked): nothing more ends.
    gone: bool,
}

/// Says, as the writing thread ends however it ends, that it is gone: a
/// takeover must not wait for a write that will never end.
struct Gone(std::sync::Arc<AheadShared>);

impl Drop for Gone {
    fn drop(&mut self) {
        self.0.lock().gone = true;
        self.0.done.notify_all();
    }
}

impl RecordsAhead {
    /// Starts the thread that writes `state`'s VM record when asked.
    pub fn start(state: HostState) -> std::io::Result<Self> {
        let writer = state.clone();
        Self::start_with(state, move |record| writer.set_record(record))
    }

    /// [`Self::start`] with the write itself given (a test's may panic).
    fn start_with(
        state: HostState,
        write: impl Fn(RunRecord) -> Result<(), HostStateError> + Send + 'static,
    ) -> std::io::Result<Self> {
        let (asks, asked) = crossbeam_channel::unbounded::<Incarnation>();
        let shared = std::sync::Arc::new(AheadShared::default());
        let progress = shared.clone();
        std::thread::Builder::new()
            .name("record-ahead".into())
            .spawn(move || {
                let _gone = Gone(progress.clone());
                for incarnation in asked {
                    let record = RunRecord {
                        incarnation,
                        state: RunState::ReleasedUnprotected,
                    };
                    let recorded = match write(record) {
                        Ok(()) => {
                            tracing::debug!(%incarnation, "recorded ahead: a takeover of this VM needs no write before its output");
                            true
                        }
                        Err(e) => {
                            tracing::warn!(error = %understudy_common::wire::chain(&e), %incarnation, "cannot record ahead of a takeover: a takeover will write the VM record before its first output");
                            false
                        }
                    };
                    let mut p = progress.lock();
                    p.recorded = recorded.then_some(incarnation);
                    p.ended += 1;
                    progress.done.notify_all();
                }
            })?;
        Ok(Self {
            asks,
            shared,
            state,
        })
    }

    /// Whether this host's VM record durably says it runs `incarnation`
    /// unprotected: this process wrote it so, and the file says so still
    /// (the primary role rewrites it once the VM is protected again). Waits
    /// for a write in flight first: a takeover then uses its result rather
    /// than write the file beside it.
    pub fn recorded(&self, incarnation: Option<Incarnation>) -> bool {
        let mut p = self.shared.lock();
        while p.ended < p.asked && !p.gone {
            p = self
                .shared
                .done
                .wait(p)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let written = if p.ended < p.asked { None } else { p.recorded };
        drop(p);
        let Some(incarnation) = incarnation.filter(|&i| written == Some(i)) else {
            return false;
        };
        let _record = lock_record();
        self.state.record().ok().flatten()
            == Some(RunRecord {
                incarnation,
                state: RunState::ReleasedUnprotected,
            })
    }
}

impl AheadShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, AheadProgress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl understudy_common::role::RecordAhead for RecordsAhead {
    fn holding(&self, incarnation: Incarnation) {
        let mut p = self.shared.lock();
        if self.asks.send(incarnation).is_ok() {
            p.asked += 1;
        }
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
    fn a_record_written_ahead_counts_only_while_the_file_still_says_so() {
        use understudy_common::role::RecordAhead;
        let dir = tempfile::tempdir().unwrap();
        let state = HostState::open(dir.path()).unwrap();
        let ahead = RecordsAhead::start(state.clone()).unwrap();
        let (x, y) = (Incarnation::new_random(), Incarnation::new_random());
        assert!(!ahead.recorded(Some(x)), "nothing asked yet");
        ahead.holding(x);
        // Waits for the write it was asked for.
        assert!(ahead.recorded(Some(x)));
        let unprotected = RunRecord {
            incarnation: x,
            state: RunState::ReleasedUnprotected,
        };
        assert_eq!(state.record().unwrap(), Some(unprotected));
        assert!(!ahead.recorded(Some(y)), "another VM");
        assert!(
            !ahead.recorded(None),
            "a VM with no incarnation gets a new one"
        );
        // The primary role rewrites the record once the VM is protected
        // again: what was written ahead no longer holds.
        state
            .set_record(RunRecord {
                incarnation: x,
                state: RunState::Protected,
            })
            .unwrap();
        assert!(!ahead.recorded(Some(x)));
        ahead.holding(y);
        ahead.holding(x);
        assert!(ahead.recorded(Some(x)));
        assert!(!ahead.recorded(Some(y)), "the last one asked for");
        assert_eq!(state.record().unwrap(), Some(unprotected));
    }

    #[test]
    fn a_takeover_does_not_wait_for_a_writer_that_died() {
        use understudy_common::role::RecordAhead;
        let dir = tempfile::tempdir().unwrap();
        let state = HostState::open(dir.path()).unwrap();
        let ahead = RecordsAhead::start_with(state, |_| panic!("the writer dies")).unwrap();
        let x = Incarnation::new_random();
        ahead.holding(x);
        // Returns (the record is not there: the takeover writes it).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(ahead.recorded(Some(x))));
        let answer = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(answer, Ok(false), "the takeover waited for a dead writer");
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
