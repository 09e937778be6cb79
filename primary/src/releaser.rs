//! Output commit on the primary: the guest's console output of a checkpoint
//! goes to clients only once the backup acked that checkpoint, or at once
//! while no backup holds the VM and the policy says to release. A fence closes
//! it for good. Every release of the primary goes through here.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use understudy_common::console::ConsoleLog;

/// Releases console output, unless fenced.
#[derive(Debug)]
pub(crate) struct Releaser {
    log: Arc<ConsoleLog>,
    state: Mutex<ReleaseState>,
}

#[derive(Debug, Default)]
struct ReleaseState {
    fenced: bool,
    /// Backup lost under keep-running: output goes out at once.
    unprotected: bool,
    /// (epoch, console end offset) of checkpoints not yet acked.
    pending: VecDeque<(u64, u64)>,
}

impl Releaser {
    pub(crate) fn new(log: Arc<ConsoleLog>) -> Self {
        Self {
            log,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ReleaseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checkpoint `epoch` covers output up to `end`.
    pub(crate) fn checkpoint_taken(&self, epoch: u64, end: u64) {
        let mut s = self.lock();
        if s.unprotected && !s.fenced {
            self.log.release_to(end);
        } else {
            s.pending.push_back((epoch, end));
        }
    }

    /// The backup committed `epoch`: its output (and all before) may go out.
    pub(crate) fn acked(&self, epoch: u64) {
        let mut s = self.lock();
        let mut release = None;
        while let Some(&(e, end)) = s.pending.front() {
            if e > epoch {
                break;
            }
            release = Some(end);
            s.pending.pop_front();
        }
        if let (Some(end), false) = (release, s.fenced) {
            self.log.release_to(end);
        }
    }

    /// Output produced while no session runs.
    pub(crate) fn produced_unprotected(&self) {
        let s = self.lock();
        if s.unprotected && !s.fenced {
            self.log.release_all();
        }
    }

    pub(crate) fn set_unprotected(&self, on: bool) {
        let mut s = self.lock();
        if s.fenced {
            return;
        }
        s.unprotected = on;
        if on {
            s.pending.clear();
            self.log.release_all();
        }
    }

    /// A new session: epochs of the old one will never be acked. Output
    /// released unprotected (keep-running) stays so through the new
    /// session's sync: no backup could promote from it before its first
    /// checkpoint commits.
    pub(crate) fn new_session(&self) {
        self.lock().pending.clear();
    }

    /// The new session's first checkpoint is acked: from here on output
    /// waits for the ack of its epoch again.
    pub(crate) fn session_protected(&self) {
        self.lock().unprotected = false;
    }

    /// Closes the releaser for good and drops everything unreleased.
    pub(crate) fn fence(&self) -> usize {
        let mut s = self.lock();
        s.fenced = true;
        s.pending.clear();
        self.log.discard_unreleased()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn releaser() -> (Arc<ConsoleLog>, Releaser) {
        let log = ConsoleLog::new(0);
        (log.clone(), Releaser::new(log))
    }

    #[test]
    fn output_goes_out_only_up_to_the_acked_checkpoint() {
        let (log, r) = releaser();
        log.append(b"aaaa");
        r.checkpoint_taken(1, log.end());
        log.append(b"bbbb");
        r.checkpoint_taken(2, log.end());
        log.append(b"cc");
        assert_eq!(log.released(), 0, "nothing before an ack");
        r.acked(1);
        assert_eq!(log.released(), 4);
        // An ack covers every earlier epoch too (acks may be coalesced).
        r.acked(2);
        assert_eq!(log.released(), 8);
        // Output after the last checkpoint waits for the next one.
        r.acked(3);
        assert_eq!(log.released(), 8);
        r.checkpoint_taken(3, log.end());
        r.acked(3);
        assert_eq!(log.released(), 10);
    }

    #[test]
    fn a_late_ack_of_an_old_session_releases_nothing_of_the_new_one() {
        let (log, r) = releaser();
        log.append(b"old!");
        r.checkpoint_taken(7, log.end());
        r.new_session();
        r.acked(7);
        assert_eq!(log.released(), 0, "the old session's epoch was dropped");
        r.checkpoint_taken(1, log.end());
        r.acked(1);
        assert_eq!(log.released(), 4);
    }

    #[test]
    fn unprotected_releases_at_once_until_the_next_session_is_protected() {
        let (log, r) = releaser();
        log.append(b"held");
        r.checkpoint_taken(1, log.end());
        r.set_unprotected(true);
        assert_eq!(log.released(), 4, "everything held goes out");
        log.append(b"more");
        r.produced_unprotected();
        assert_eq!(log.released(), 8);
        // Re-protection: through the sync output still goes out…
        r.new_session();
        log.append(b"sync");
        r.checkpoint_taken(1, log.end());
        assert_eq!(log.released(), 12);
        // …and once protected, it waits for acks again.
        r.session_protected();
        log.append(b"wait");
        r.checkpoint_taken(2, log.end());
        assert_eq!(log.released(), 12);
        r.acked(2);
        assert_eq!(log.released(), 16);
    }

    #[test]
    fn a_fence_releases_nothing_ever_again() {
        let (log, r) = releaser();
        log.append(b"never");
        r.checkpoint_taken(1, log.end());
        assert_eq!(r.fence(), 5, "the unreleased bytes are dropped");
        r.acked(1);
        r.set_unprotected(true);
        log.append(b"after");
        r.produced_unprotected();
        r.checkpoint_taken(2, log.end());
        r.acked(2);
        assert_eq!(log.released(), 0);
    }
}
