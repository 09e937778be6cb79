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

/// The VM records this process wrote and synced, by path, under the lock
/// that serialises their writes: they go through the directory's
/// [`RecordWriter`], but a writer whose thread is gone writes on its
/// callers' threads (two writes at once would share the file's spare).
fn written_records() -> std::sync::MutexGuard<'static, std::collections::HashMap<PathBuf, RunRecord>>
{
    static WRITTEN: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<PathBuf, RunRecord>>,
    > = std::sync::OnceLock::new();
    WRITTEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
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

    /// Records how the VM's run on this host stands (the roles write
    /// through [`RecordWriter`], which calls this in the order asked). A
    /// record this process already wrote and synced, which the file still
    /// holds, is not written again: a takeover whose record was written
    /// ahead ([`RecordsAhead`]) then puts no fsync before the VM's first
    /// output.
    fn set_record(&self, record: RunRecord) -> Result<(), HostStateError> {
        let path = self.path(RECORD_FILE);
        let mut written = written_records();
        if written.get(&path) == Some(&record) && self.record().ok().flatten() == Some(record) {
            return Ok(());
        }
        written.remove(&path);
        understudy_common::fault::check("host_state.run_record").map_err(HostStateError::Fault)?;
        durable::write(&path, record.encode().as_bytes())?;
        written.insert(path, record);
        Ok(())
    }
}

/// Writes one state directory's VM record on a thread of its own, in the
/// order the writes were asked for: one writer per state directory in the
/// process ([`Self::of`]), which every role that writes the record uses. A
/// write asked for with [`Self::write`] waits for its turn and its fsync;
/// one asked for with [`Self::write_later`] does not wait, so a thread with
/// other work (the replicator, which takes the checkpoints that release
/// held output; the backup role, which writes ahead of a takeover) puts no
/// fsync on its path where no one needs the record on disk yet. One queue
/// keeps the record the last one asked for: a "protected" still queued
/// cannot land after the "released unprotected" or "stopped" that followed
/// it, nor a record written ahead of a takeover after the new primary's. If
/// the thread is gone (it could not start, or died), writes are made on the
/// caller's thread.
#[derive(Debug)]
pub struct RecordWriter {
    state: HostState,
    asks: Option<crossbeam_channel::Sender<(RunRecord, Done)>>,
}

/// What to do with a queued write's outcome.
type Done = Box<dyn FnOnce(Result<(), HostStateError>) + Send>;

impl RecordWriter {
    /// The writer of `state`'s VM record (started at the first call for its
    /// directory; it lives as long as the process).
    pub fn of(state: &HostState) -> std::sync::Arc<Self> {
        static WRITERS: std::sync::OnceLock<
            std::sync::Mutex<std::collections::HashMap<PathBuf, std::sync::Arc<RecordWriter>>>,
        > = std::sync::OnceLock::new();
        let dir = std::fs::canonicalize(&state.dir).unwrap_or_else(|_| state.dir.clone());
        WRITERS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(dir)
            .or_insert_with(|| std::sync::Arc::new(Self::start(state.clone())))
            .clone()
    }

    fn start(state: HostState) -> Self {
        let (asks, asked) = crossbeam_channel::unbounded::<(RunRecord, Done)>();
        let writer = state.clone();
        let spawned = std::thread::Builder::new()
            .name("vm-record".into())
            .spawn(move || {
                for (record, done) in asked {
                    done(writer.set_record(record));
                }
            });
        let asks = match spawned {
            Ok(_) => Some(asks),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the thread that writes the VM record: writing it in place");
                None
            }
        };
        Self { state, asks }
    }

    /// Writes `record` after those asked for before it, and returns once it
    /// is on disk (or failed).
    pub fn write(&self, record: RunRecord) -> Result<(), HostStateError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let done: Done = Box::new(move |result| {
            let _ = tx.send(result);
        });
        match &self.asks {
            Some(asks) if asks.send((record, done)).is_ok() => match rx.recv() {
                Ok(result) => result,
                // The writer died with the write (a panic): write it here.
                Err(_) => self.state.set_record(record),
            },
            _ => self.state.set_record(record),
        }
    }

    /// Queues `record` after those asked for before it; `done` gets the
    /// outcome on the writer's thread.
    pub fn write_later(
        &self,
        record: RunRecord,
        done: impl FnOnce(Result<(), HostStateError>) + Send + 'static,
    ) {
        let done: Done = Box::new(done);
        let done = match &self.asks {
            Some(asks) => match asks.send((record, done)) {
                Ok(()) => return,
                Err(crossbeam_channel::SendError((_, done))) => done,
            },
            None => done,
        };
        done(self.state.set_record(record));
    }
}

/// The VM record written ahead of a takeover, while this host is the
/// backup (`understudy_common::role::RecordAhead`): a takeover must have it
/// on disk before the VM's first output here, and written at the takeover
/// its fsyncs (p50 0.5 ms, tails past 100 ms on these disks) came between
/// the failure and the clients. The takeover's own write of the same record
/// then finds it written (see [`RecordWriter`]).
///
/// What it writes, "this host runs incarnation X unprotected", is the
/// record a takeover of X writes, and it is read only by a primary that
/// boots on this host (its first `Hello` says how its last VM fared). A
/// host whose role file says backup does not boot as the primary, so
/// until a takeover the record is never read; after one it is the truth,
/// until the new primary's backup syncs and the record says "protected".
#[derive(Debug)]
pub struct RecordsAhead {
    writer: std::sync::Arc<RecordWriter>,
}

impl RecordsAhead {
    /// Writes `state`'s VM record ahead when asked (on its [`RecordWriter`]).
    pub fn start(state: HostState) -> Self {
        Self {
            writer: RecordWriter::of(&state),
        }
    }
}

impl understudy_common::role::RecordAhead for RecordsAhead {
    fn holding(&self, incarnation: Incarnation) {
        let record = RunRecord {
            incarnation,
            state: RunState::ReleasedUnprotected,
        };
        self.writer.write_later(record, move |result| match result {
            Ok(()) => tracing::debug!(%incarnation, "recorded ahead: a takeover of this VM needs no write before its output"),
            Err(e) => tracing::warn!(error = %understudy_common::wire::chain(&e), %incarnation, "cannot record ahead of a takeover: a takeover will write the VM record before its first output"),
        });
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
    fn a_record_written_and_still_held_is_not_written_again() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let state = HostState::open(dir.path()).unwrap();
        // Each write renames a new file into place: a new inode.
        let inode = || std::fs::metadata(dir.path().join("vm")).unwrap().ino();
        let x = Incarnation::new_random();
        let record = |state| RunRecord {
            incarnation: x,
            state,
        };
        let unprotected = record(RunState::ReleasedUnprotected);
        state.set_record(unprotected).unwrap();
        let first = inode();
        state.set_record(unprotected).unwrap();
        assert_eq!(inode(), first, "written again");
        // Another record in between: written, and so is the first again.
        state.set_record(record(RunState::Protected)).unwrap();
        let protected = inode();
        assert_ne!(protected, first);
        state.set_record(unprotected).unwrap();
        assert_ne!(inode(), protected, "not written after another record");
        assert_eq!(state.record().unwrap(), Some(unprotected));
        // A file changed behind this process's back is written.
        let other = RunRecord {
            incarnation: Incarnation::new_random(),
            state: RunState::Stopped,
        };
        std::fs::write(dir.path().join("vm"), other.encode()).unwrap();
        state.set_record(unprotected).unwrap();
        assert_eq!(state.record().unwrap(), Some(unprotected));
    }

    #[test]
    fn a_record_written_ahead_is_on_disk_before_the_takeover_writes_it() {
        use understudy_common::role::RecordAhead;
        let dir = tempfile::tempdir().unwrap();
        let state = HostState::open(dir.path()).unwrap();
        let ahead = RecordsAhead::start(state.clone());
        let x = Incarnation::new_random();
        ahead.holding(x);
        let unprotected = RunRecord {
            incarnation: x,
            state: RunState::ReleasedUnprotected,
        };
        let held = (0..1000).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            state.record().unwrap() == Some(unprotected)
        });
        assert!(held, "the record was not written ahead");
    }

    #[test]
    fn a_record_waited_for_lands_after_those_queued_before_it() {
        use std::sync::{Arc, Mutex};
        let dir = tempfile::tempdir().unwrap();
        let state = HostState::open(dir.path()).unwrap();
        let writer = RecordWriter::of(&state);
        let x = Incarnation::new_random();
        let record = move |state| RunRecord {
            incarnation: x,
            state,
        };
        let order = Arc::new(Mutex::new(Vec::new()));
        // The writer is held after a first record until `release`.
        let (release, released) = crossbeam_channel::bounded::<()>(0);
        writer.write_later(record(RunState::Stopped), move |r| {
            r.unwrap();
            released.recv().unwrap();
        });
        let o = order.clone();
        writer.write_later(record(RunState::Protected), move |r| {
            r.unwrap();
            o.lock().unwrap().push(RunState::Protected);
        });
        let waiter = {
            let (writer, order) = (writer.clone(), order.clone());
            std::thread::spawn(move || {
                writer.write(record(RunState::ReleasedUnprotected)).unwrap();
                order.lock().unwrap().push(RunState::ReleasedUnprotected);
            })
        };
        // A write that jumped the queue would be done by now.
        let jumped = (0..40).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            !order.lock().unwrap().is_empty()
        });
        assert!(
            !jumped,
            "written before the queue: {:?}",
            order.lock().unwrap()
        );
        release.send(()).unwrap();
        waiter.join().unwrap();
        assert_eq!(
            *order.lock().unwrap(),
            [RunState::Protected, RunState::ReleasedUnprotected]
        );
        assert_eq!(
            state.record().unwrap(),
            Some(record(RunState::ReleasedUnprotected))
        );
    }

    #[test]
    fn a_state_directory_has_one_record_writer_for_every_role() {
        let dir = tempfile::tempdir().unwrap();
        let state = HostState::open(dir.path()).unwrap();
        let ahead = RecordsAhead::start(state.clone());
        // The same directory by another spelling.
        let again = HostState::open(&dir.path().join(".")).unwrap();
        assert!(std::sync::Arc::ptr_eq(
            &ahead.writer,
            &RecordWriter::of(&again)
        ));
        let other = tempfile::tempdir().unwrap();
        let other = HostState::open(other.path()).unwrap();
        assert!(!std::sync::Arc::ptr_eq(
            &ahead.writer,
            &RecordWriter::of(&other)
        ));
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
