//! What a backup answers a primary's `Hello`: a pure decision over what this
//! host knows (its image and whether a primary is heard) and what the caller
//! claims, so that every rule is unit-tested without KVM or sockets.
//!
//! The rules, in order:
//!
//! 1. The protocol version, VM id, RAM size and witness key must match (else
//!    refused for good: the configurations differ), and so must the purpose: a host
//!    started with `--incoming` takes live migrations only, any other host
//!    protects its pair's VM only.
//! 2. A generation older than this host's, or a VM that already runs here,
//!    deposes the caller; an implausible generation is refused before
//!    anything is persisted.
//! 3. The caller's VM (its incarnation) is the one the image holds, or the
//!    image holds nothing worth keeping (empty, syncing, retired, torn): the
//!    sync starts.
//! 4. Otherwise the caller would boot a new VM over a committed image of
//!    another one. While that VM's primary is still heard, the caller must
//!    wait. If the caller's host ran that VM and lost it while protected, the
//!    backup resumes it (the caller then learns it was deposed). If it
//!    stopped it on purpose, the fresh boot may replace it. Anything else
//!    needs an operator: `understudyctl promote` or `discard-image`.

use understudy_common::ids::{Generation, Incarnation, RunState};
use understudy_proto::PROTOCOL_VERSION;

/// What this backup knows when a `Hello` arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Facts {
    pub vm_id: String,
    pub ram_bytes: u64,
    /// The VM runs on this host already (promoted).
    pub runs_here: bool,
    pub generation: Generation,
    /// The committed image worth keeping, if any: its incarnation (None for
    /// an image written before incarnations existed) and epoch.
    pub kept: Option<Kept>,
    /// A primary of this VM was heard within the heartbeat timeout.
    pub primary_heard: bool,
    /// This host waits for a live migration (`--incoming`).
    pub incoming: bool,
    /// The witness key this host claims the VM on ("" without a witness).
    pub witness_key: String,
}

/// A committed, promotable image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Kept {
    pub incarnation: Option<Incarnation>,
    pub epoch: u64,
}

/// What the caller claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Claim<'a> {
    pub protocol_version: u32,
    pub vm_id: &'a str,
    pub ram_bytes: u64,
    pub generation: Generation,
    pub incarnation: Option<Incarnation>,
    pub previous: Option<(Incarnation, RunState)>,
    /// The caller migrates its VM here (not a pair's protection).
    pub migration: bool,
    /// The witness key the caller claims the VM on ("" without a witness).
    pub witness_key: &'a str,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Start a full sync of the caller's VM at its generation.
    Sync,
    /// The caller was deposed by this generation.
    Deposed(Generation),
    /// The caller's host lost the VM this image holds while it was
    /// protected: resume it here, then depose the caller.
    ResumeHere,
    /// Not now (a primary of the kept VM is still heard): try again.
    Wait(String),
    /// The image holds another VM an operator must decide about.
    HoldsVm(String),
    /// A mismatch no retry fixes (`InvalidArgument`/`FailedPrecondition`).
    Refuse {
        invalid_argument: bool,
        message: String,
    },
}

pub(crate) fn decide(facts: &Facts, claim: &Claim<'_>) -> Decision {
    let refuse = |invalid_argument, message: String| Decision::Refuse {
        invalid_argument,
        message,
    };
    if claim.protocol_version != PROTOCOL_VERSION {
        return refuse(
            false,
            format!(
                "protocol version {} is not supported: this backup speaks version {PROTOCOL_VERSION}; \
                 run the same understudy release on both hosts",
                claim.protocol_version
            ),
        );
    }
    if claim.vm_id != facts.vm_id {
        return refuse(
            true,
            format!(
                "wrong VM: this backup protects VM {:?}, not {:?}",
                facts.vm_id, claim.vm_id
            ),
        );
    }
    if claim.ram_bytes != facts.ram_bytes {
        return refuse(
            true,
            format!(
                "VM {:?} has {} bytes of RAM here but the primary has {}: the configurations differ",
                claim.vm_id, facts.ram_bytes, claim.ram_bytes
            ),
        );
    }
    if claim.witness_key != facts.witness_key {
        let name = |key: &str| {
            if key.is_empty() {
                "no witness".to_owned()
            } else {
                format!("the witness key {key:?}")
            }
        };
        return refuse(
            false,
            format!(
                "the primary uses {} and this host {}: with a witness on one host only, a cut \
                 link could leave both running the VM. Give both hosts the same [witness] section",
                name(claim.witness_key),
                name(&facts.witness_key)
            ),
        );
    }
    match (claim.migration, facts.incoming) {
        (true, false) => {
            return refuse(
                false,
                format!(
                    "this host does not take live migrations: it protects VM {:?} for its pair. \
                     Start the destination with `understudyd primary --config FILE --incoming`",
                    facts.vm_id
                ),
            );
        }
        (false, true) => {
            return refuse(
                false,
                "this host waits for a live migration (`--incoming`), it is nobody's backup: \
                 point the primary at its pair's backup"
                    .into(),
            );
        }
        _ => {}
    }
    if !claim.generation.is_plausible() {
        return refuse(
            true,
            format!(
                "generation {} is not plausible (at most {}): refused, nothing recorded",
                claim.generation,
                Generation::PLAUSIBLE_MAX
            ),
        );
    }
    let Some(incarnation) = claim.incarnation else {
        return refuse(true, "the Hello names no VM incarnation".into());
    };
    if facts.runs_here || claim.generation < facts.generation {
        return Decision::Deposed(facts.generation);
    }
    let Some(kept) = facts.kept else {
        return Decision::Sync;
    };
    if kept.incarnation == Some(incarnation) {
        return Decision::Sync;
    }
    // A new VM would replace the one this image holds.
    let held = match kept.incarnation {
        Some(i) => format!(
            "VM {:?} (incarnation {i}) at epoch {}",
            facts.vm_id, kept.epoch
        ),
        None => format!("VM {:?} at epoch {}", facts.vm_id, kept.epoch),
    };
    // The host that ran the kept VM restarted and lost it while every byte it
    // released was acked here: resume it at once (no need to wait out the
    // heartbeat timeout; its beats may still seem recent).
    if let Some((prev, RunState::Protected)) = claim.previous
        && Some(prev) == kept.incarnation
    {
        return Decision::ResumeHere;
    }
    if facts.primary_heard {
        return Decision::Wait(format!(
            "this backup protects {held}, whose primary is still heard; a new boot must wait"
        ));
    }
    match claim.previous {
        Some((prev, RunState::Stopped)) if Some(prev) == kept.incarnation => Decision::Sync,
        Some((prev, RunState::ReleasedUnprotected)) if Some(prev) == kept.incarnation => {
            Decision::HoldsVm(format!(
                "this backup holds {held}, but that VM released output after this image while \
                 unprotected: resuming it would roll clients back, booting anew would lose it. \
                 An operator decides: `understudyctl promote --config FILE` resumes the image, \
                 `understudyctl discard-image --config FILE` lets this primary boot a new VM"
            ))
        }
        _ => Decision::HoldsVm(format!(
            "this backup holds {held}, and this primary does not know what became of it; booting \
             a new VM over it would lose it. An operator decides: `understudyctl promote --config \
             FILE` resumes the image, `understudyctl discard-image --config FILE` lets this \
             primary boot a new VM"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inc(n: u64) -> Incarnation {
        Incarnation::from_raw(n).unwrap()
    }

    fn facts() -> Facts {
        Facts {
            vm_id: "web1".into(),
            ram_bytes: 64 << 20,
            runs_here: false,
            generation: Generation(3),
            kept: Some(Kept {
                incarnation: Some(inc(7)),
                epoch: 120,
            }),
            primary_heard: false,
            incoming: false,
            witness_key: String::new(),
        }
    }

    fn claim() -> Claim<'static> {
        Claim {
            protocol_version: PROTOCOL_VERSION,
            vm_id: "web1",
            ram_bytes: 64 << 20,
            generation: Generation(3),
            incarnation: Some(inc(7)),
            previous: None,
            migration: false,
            witness_key: "",
        }
    }

    #[test]
    fn the_vm_the_image_holds_resyncs() {
        assert_eq!(decide(&facts(), &claim()), Decision::Sync);
        let heard = Facts {
            primary_heard: true,
            ..facts()
        };
        assert_eq!(
            decide(&heard, &claim()),
            Decision::Sync,
            "its own primary, reconnecting"
        );
        let newer = Claim {
            generation: Generation(4),
            ..claim()
        };
        assert_eq!(
            decide(&facts(), &newer),
            Decision::Sync,
            "re-protection after a promotion"
        );
    }

    #[test]
    fn mismatches_and_absurd_claims_are_refused_before_anything_is_kept() {
        for (c, needle) in [
            (
                Claim {
                    protocol_version: 2,
                    ..claim()
                },
                "protocol version 2",
            ),
            (
                Claim {
                    vm_id: "web2",
                    ..claim()
                },
                "wrong VM",
            ),
            (
                Claim {
                    ram_bytes: 1,
                    ..claim()
                },
                "configurations differ",
            ),
            (
                Claim {
                    witness_key: "/understudy/web1",
                    ..claim()
                },
                "the primary uses the witness key \"/understudy/web1\" and this host no witness",
            ),
            (
                Claim {
                    generation: Generation(1 << 40),
                    ..claim()
                },
                "not plausible",
            ),
            (
                Claim {
                    generation: Generation(u64::MAX),
                    ..claim()
                },
                "not plausible",
            ),
            (
                Claim {
                    incarnation: None,
                    ..claim()
                },
                "no VM incarnation",
            ),
        ] {
            match decide(&facts(), &c) {
                Decision::Refuse { message, .. } => assert!(message.contains(needle), "{message}"),
                other => panic!("{c:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn migrations_go_only_to_incoming_hosts_and_only_migrations_do() {
        let migration = Claim {
            migration: true,
            ..claim()
        };
        match decide(&facts(), &migration) {
            Decision::Refuse { message, .. } => {
                assert!(message.contains("--incoming"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        let incoming = Facts {
            incoming: true,
            kept: None,
            ..facts()
        };
        match decide(&incoming, &claim()) {
            Decision::Refuse { message, .. } => {
                assert!(message.contains("nobody's backup"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(decide(&incoming, &migration), Decision::Sync);
        // A migration is refused like any session where the VM runs already.
        let running = Facts {
            runs_here: true,
            ..incoming
        };
        assert_eq!(
            decide(&running, &migration),
            Decision::Deposed(Generation(3))
        );
    }

    #[test]
    fn an_older_generation_or_a_vm_running_here_deposes_the_caller() {
        let old = Claim {
            generation: Generation(2),
            ..claim()
        };
        assert_eq!(decide(&facts(), &old), Decision::Deposed(Generation(3)));
        let here = Facts {
            runs_here: true,
            ..facts()
        };
        assert_eq!(decide(&here, &claim()), Decision::Deposed(Generation(3)));
    }

    #[test]
    fn a_fresh_boot_never_syncs_over_a_kept_vm_without_a_reason() {
        let fresh = Claim {
            incarnation: Some(inc(8)),
            ..claim()
        };
        // Its primary is still heard: wait (a stranger cannot take it down).
        let heard = Facts {
            primary_heard: true,
            ..facts()
        };
        assert!(matches!(decide(&heard, &fresh), Decision::Wait(_)));
        // The caller's host lost it while protected: resume it here, even
        // if its last beats are still recent.
        let lost = Claim {
            previous: Some((inc(7), RunState::Protected)),
            ..fresh
        };
        assert_eq!(decide(&facts(), &lost), Decision::ResumeHere);
        assert_eq!(decide(&heard, &lost), Decision::ResumeHere);
        // Stopped on purpose: the new boot may replace it.
        let stopped = Claim {
            previous: Some((inc(7), RunState::Stopped)),
            ..fresh
        };
        assert_eq!(decide(&facts(), &stopped), Decision::Sync);
        // Released output unprotected, or nothing known: an operator decides.
        for previous in [
            Some((inc(7), RunState::ReleasedUnprotected)),
            Some((inc(9), RunState::Protected)),
            Some((inc(7), RunState::Gone)),
            None,
        ] {
            let c = Claim { previous, ..fresh };
            match decide(&facts(), &c) {
                Decision::HoldsVm(m) => assert!(m.contains("understudyctl promote"), "{m}"),
                other => panic!("{previous:?}: {other:?}"),
            }
        }
        // An image from before incarnations: the same caution.
        let unknown = Facts {
            kept: Some(Kept {
                incarnation: None,
                epoch: 5,
            }),
            ..facts()
        };
        assert!(matches!(decide(&unknown, &fresh), Decision::HoldsVm(_)));
        // Nothing kept: anything goes.
        let empty = Facts {
            kept: None,
            ..facts()
        };
        assert_eq!(decide(&empty, &fresh), Decision::Sync);
    }
}
