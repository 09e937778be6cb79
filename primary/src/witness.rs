//! The primary's side of the witness (`understudy_common::witness`): the
//! claims this host makes on the VM's key while it runs the VM.
//!
//! ```text
//!  boot ──────────────▶ claim {g, me, unprotected} ─▶ the VM boots
//!  session protected ─▶ claim {g, me, protected}     (in the background:
//!                                                     lets the backup promote)
//!  backup lost ───────▶ claim {g, me, unprotected} ─▶ output released alone
//!                        (keep-running; until then output is held)
//!  every check_interval: read; a claim of another host at ≥ g ─▶ fence
//! ```
//!
//! A claim that finds another host's at this generation or above means this
//! host was deposed; one that cannot reach etcd leaves everything as it is
//! (output stays held). Claims are serialized: the key moves in the order
//! this host decided.

use std::time::Duration;

use understudy_common::ids::Generation;
use understudy_common::witness::{Claim, Held, Swap, Witness, WitnessError};

/// How a claim ended.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// The key says what was asked.
    Granted,
    /// Another host holds the VM at this generation (its own): fence.
    Deposed(u64),
    /// Not decided: etcd did not answer (or the key kept changing).
    Unreachable(WitnessError),
    /// The claim no longer applied once it was this host's turn.
    Moot,
}

/// This host's claims on the VM's key.
#[derive(Debug)]
pub(crate) struct Seat {
    witness: Witness,
    generation: Generation,
    /// The claim as this host last read or wrote it (None: read it first).
    held: tokio::sync::Mutex<Option<Held>>,
}

/// Lost races in a row before a claim gives up for now.
const MAX_RACES: usize = 3;

impl Seat {
    pub(crate) fn new(witness: Witness, generation: u64) -> Self {
        Self {
            witness,
            generation: Generation(generation),
            held: tokio::sync::Mutex::new(None),
        }
    }

    /// How often the running VM's host reads its key.
    pub(crate) fn check_interval(&self) -> Duration {
        self.witness.check_interval()
    }

    /// The generation that deposed this host, if `claim` is another host's
    /// at this generation or above.
    fn deposed_by(&self, claim: &Claim) -> Option<u64> {
        let other = claim.owner != self.witness.me();
        (claim.generation > self.generation || (claim.generation == self.generation && other))
            .then(|| claim.generation.0.max(self.generation.0 + 1))
    }

    /// Makes the key say that this host runs the VM at its generation,
    /// `protected` or not. `applies` is asked once it is this claim's turn:
    /// false makes it [`Verdict::Moot`].
    pub(crate) async fn claim(
        &self,
        decision: &str,
        protected: bool,
        applies: impl Fn() -> bool,
    ) -> Verdict {
        let mut held = self.held.lock().await;
        if !applies() {
            return Verdict::Moot;
        }
        let target = Claim {
            generation: self.generation,
            owner: self.witness.me().to_owned(),
            protected,
        };
        for _ in 0..MAX_RACES {
            let current = match held.take() {
                Some(h) => Some(h),
                None => match self.witness.read().await {
                    Ok(h) => h,
                    Err(e) => return Verdict::Unreachable(e),
                },
            };
            if let Some(h) = &current {
                if let Some(g) = self.deposed_by(&h.claim) {
                    *held = current;
                    return Verdict::Deposed(g);
                }
                if h.claim == target {
                    *held = current;
                    return Verdict::Granted;
                }
            }
            match self.witness.swap(decision, current.as_ref(), &target).await {
                Ok(Swap::Won(now)) => {
                    *held = Some(now);
                    return Verdict::Granted;
                }
                // Someone moved it: decide again on what it holds now.
                Ok(Swap::Lost(now)) => *held = now,
                // Not known whether it moved: read it next time.
                Err(e) => return Verdict::Unreachable(e),
            }
        }
        Verdict::Unreachable(WitnessError::Unreachable(format!(
            "the key changed under {MAX_RACES} claims in a row"
        )))
    }

    /// Reads the key: Some(generation) if another host was given the VM.
    pub(crate) async fn check(&self) -> Result<Option<u64>, WitnessError> {
        let now = self.witness.read().await?;
        Ok(now.as_ref().and_then(|h| self.deposed_by(&h.claim)))
    }
}
