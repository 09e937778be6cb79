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
    /// The backup's last ack (its acks come in order; a late one of an
    /// old session releases only what it names, as before the gate).
    acked: u64,
    /// The newest key whose output went out.
    released: u64,
    /// A replay migration's switch ([`Releaser::gate`]): output also waits
    /// until the destination holds the log up to its key.
    second: Option<u64>,
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
        s.acked = epoch;
        self.release(&mut s);
    }

    /// Releases what every holder acked.
    fn release(&self, s: &mut ReleaseState) {
        let upto = s.acked.min(s.second.unwrap_or(u64::MAX));
        let mut release = None;
        while let Some(&(e, end)) = s.pending.front() {
            if e > upto {
                break;
            }
            release = Some(end);
            s.released = s.released.max(e);
            s.pending.pop_front();
        }
        if let (Some(end), false) = (release, s.fenced) {
            self.log.release_to(end);
        }
    }

    /// A replay migration's switch, before the guest stops: from now on
    /// output also waits until the destination holds the log that produced
    /// it ([`Releaser::second_acked`]), so that once the destination holds
    /// the log up to the key returned (all the output released so far),
    /// it holds all that clients saw, and the source's backup may stand
    /// down while the log's tail is still on its way.
    pub(crate) fn gate(&self) -> u64 {
        let mut s = self.lock();
        s.second.get_or_insert(0);
        s.released
    }

    /// The destination holds the log up to `key`.
    pub(crate) fn second_acked(&self, key: u64) {
        let mut s = self.lock();
        if let Some(second) = s.second.as_mut() {
            *second = (*second).max(key);
            self.release(&mut s);
        }
    }

    /// The migration failed: output waits for the backup alone again.
    pub(crate) fn ungate(&self) {
        let mut s = self.lock();
        if s.second.take().is_some() {
            self.release(&mut s);
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
        let mut s = self.lock();
        s.pending.clear();
        s.acked = 0;
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
    fn at_a_replay_switch_output_waits_for_the_destination_too() {
        let (log, r) = releaser();
        log.append(b"seen");
        r.checkpoint_taken(10, log.end());
        r.acked(10);
        assert_eq!(log.released(), 4);
        // The gate: what went out so far is the log up to exit 10.
        assert_eq!(r.gate(), 10);
        log.append(b"held");
        r.checkpoint_taken(20, log.end());
        log.append(b"tail");
        r.checkpoint_taken(30, log.end());
        r.acked(30);
        assert_eq!(log.released(), 4, "the backup alone holds it");
        r.second_acked(20);
        assert_eq!(log.released(), 8, "both hold the log up to 20");
        // A second gate keeps the destination's word.
        assert_eq!(r.gate(), 20);
        // The migration failed: the backup's ack is enough again.
        r.ungate();
        assert_eq!(log.released(), 12);
        r.second_acked(40);
        log.append(b"more");
        r.checkpoint_taken(40, log.end());
        r.acked(40);
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
