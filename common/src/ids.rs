//! The identities both roles and the wire share, as types rather than bare
//! integers: a [`Generation`] (the fencing token: every promotion bumps it),
//! an [`Incarnation`] (one boot of the VM: it survives checkpoints, failovers
//! and switchovers, and only a fresh boot makes a new one), and the
//! [`RunState`] a primary records for the incarnation it ran.

use std::fmt;
use std::str::FromStr;

/// The fencing generation. A daemon that meets a higher one was deposed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

impl Generation {
    /// The generation of a VM no promotion has moved yet.
    pub const FIRST: Self = Self(1);
    /// No pair promotes four billion times: a claim above this is forged or
    /// corrupt, and is refused before anything is persisted.
    pub const PLAUSIBLE_MAX: Self = Self(1 << 32);

    /// The generation a promotion moves to.
    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }

    /// Whether a peer's claim of this generation can be true at all.
    pub fn is_plausible(self) -> bool {
        self <= Self::PLAUSIBLE_MAX
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Generation {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

/// A checkpoint's number in its session's sequence (sync rounds and
/// checkpoints share it; the first is 1). Where "none yet" is meant, the
/// code says `Option<Epoch>` (or an [`EpochCell`]), never a 0 or a `+ 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl Epoch {
    /// From the wire, where 0 means "no epoch" (an ack of log alone).
    pub fn from_wire(raw: u64) -> Option<Self> {
        (raw != 0).then_some(Self(raw))
    }

    /// The epoch before this one; None before the first.
    pub fn previous(self) -> Option<Self> {
        self.0.checked_sub(1).filter(|&e| e > 0).map(Self)
    }

    /// How many epochs `newer` is past `older` (none counts as before the
    /// first): the epochs in flight between a sent and an acked mark.
    pub fn distance(newer: Option<Self>, older: Option<Self>) -> u64 {
        let n = newer.map_or(0, |e| e.0);
        let o = older.map_or(0, |e| e.0);
        n.saturating_sub(o)
    }

    /// Whether `mark` (the latest acked or committed epoch) covers this one.
    pub fn covered_by(self, mark: Option<Self>) -> bool {
        mark.is_some_and(|m| m >= self)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The latest epoch something reached (acked, committed, sent), or none
/// yet: an atomic `Option<Epoch>` that only the owner resets and that
/// otherwise only moves forward. Epoch 0 is never a real epoch, so the cell
/// stores it as "none" (the one place that encoding lives).
#[derive(Debug, Default)]
pub struct EpochCell(std::sync::atomic::AtomicU64);

impl EpochCell {
    /// A cell holding no epoch.
    pub const fn new() -> Self {
        Self(std::sync::atomic::AtomicU64::new(0))
    }

    /// The latest epoch, or None.
    pub fn get(&self) -> Option<Epoch> {
        let raw = self.0.load(std::sync::atomic::Ordering::Acquire);
        (raw != 0).then_some(Epoch(raw))
    }

    /// Sets the latest epoch (None: starts over).
    pub fn set(&self, epoch: Option<Epoch>) {
        self.0.store(
            epoch.map_or(0, |e| e.0),
            std::sync::atomic::Ordering::Release,
        );
    }

    /// Moves the mark forward to `epoch` if it is newer.
    pub fn raise(&self, epoch: Epoch) {
        self.0
            .fetch_max(epoch.0, std::sync::atomic::Ordering::AcqRel);
    }

    /// Whether the mark covers `epoch`.
    pub fn covers(&self, epoch: Epoch) -> bool {
        epoch.covered_by(self.get())
    }
}

/// One replication or migration session: a fresh random id per `Hello`,
/// never 0 (the wire's 0 means "no session", and never parses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionId(std::num::NonZeroU64);

impl SessionId {
    /// A new random id, or None if the kernel gives no randomness.
    pub fn random() -> Option<Self> {
        random_stream().and_then(Self::from_raw)
    }

    /// From the wire form; None for 0.
    pub fn from_raw(raw: u64) -> Option<Self> {
        std::num::NonZeroU64::new(raw).map(Self)
    }

    /// The wire form.
    pub fn raw(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::LowerHex for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0.get(), f)
    }
}

/// A random id for a new trace stream (never 0), or None if the kernel
/// gives no randomness.
pub fn random_stream() -> Option<u64> {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).ok()?;
    Some(u64::from_le_bytes(id) | 1)
}

/// How a pair replicates its VM (`mode` in the configuration).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ReplicationMode {
    /// A checkpoint every epoch; output waits for the epoch's ack.
    #[default]
    Checkpoint,
    /// The VM records its inputs and the log streams to the backup, which
    /// replays it on a replica; checkpoints come seldom, and output waits
    /// only for the ack of the log that produced it.
    Replay,
}

impl ReplicationMode {
    /// The configuration's and status's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Checkpoint => "checkpoint",
            Self::Replay => "replay",
        }
    }
}

impl fmt::Display for ReplicationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReplicationMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "checkpoint" => Ok(Self::Checkpoint),
            "replay" => Ok(Self::Replay),
            other => Err(format!(
                "unknown replication mode {other:?}: use \"checkpoint\" or \"replay\""
            )),
        }
    }
}

/// One boot of the VM (random, never 0). Carried by every `Hello` and kept
/// with the backup's image, so a backup can tell the VM it protects from a
/// fresh boot that would replace it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Incarnation(u64);

impl Incarnation {
    /// A new incarnation for a fresh boot.
    pub fn new_random() -> Self {
        loop {
            let mut bytes = [0u8; 8];
            if getrandom::fill(&mut bytes).is_err() {
                // No kernel randomness: time and pid are unique enough for
                // telling boots apart (this is not a secret).
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or_default();
                bytes = (nanos ^ (u64::from(std::process::id()) << 40)).to_le_bytes();
            }
            if let Some(i) = Self::from_raw(u64::from_le_bytes(bytes)) {
                return i;
            }
        }
    }

    /// The wire form: 0 means "none".
    pub fn from_raw(raw: u64) -> Option<Self> {
        (raw != 0).then_some(Self(raw))
    }

    /// The wire form.
    pub fn raw(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for Incarnation {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16)
            .ok()
            .and_then(Self::from_raw)
            .ok_or("not a non-zero hexadecimal incarnation")
    }
}

/// How a primary's run of one incarnation stands, as it records it durably
/// (and tells the backup when it starts again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Running, and every byte of output it released was acked by a backup:
    /// the backup's image holds the latest state clients may have seen.
    Protected,
    /// Running and releasing output that no backup acked (keep-running
    /// without a backup): a backup's image is older than what clients saw.
    ReleasedUnprotected,
    /// Stopped on purpose (a clean stop, or the guest ended): nobody should
    /// resume it.
    Stopped,
    /// The VM left this host (handed over, or this host was deposed).
    Gone,
}

impl RunState {
    /// The word used in state files and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Protected => "protected",
            Self::ReleasedUnprotected => "released-unprotected",
            Self::Stopped => "stopped",
            Self::Gone => "gone",
        }
    }

    /// Parses [`Self::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::Protected,
            Self::ReleasedUnprotected,
            Self::Stopped,
            Self::Gone,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }

    /// The wire form (`understudy.v1.RunState`).
    pub fn to_proto(self) -> i32 {
        use understudy_proto::RunState as P;
        match self {
            Self::Protected => P::Protected,
            Self::ReleasedUnprotected => P::ReleasedUnprotected,
            Self::Stopped => P::Stopped,
            Self::Gone => P::Gone,
        }
        .into()
    }

    /// From the wire form; None for an unknown or unset value.
    pub fn from_proto(value: i32) -> Option<Self> {
        use understudy_proto::RunState as P;
        match P::try_from(value).ok()? {
            P::Unspecified => None,
            P::Protected => Some(Self::Protected),
            P::ReleasedUnprotected => Some(Self::ReleasedUnprotected),
            P::Stopped => Some(Self::Stopped),
            P::Gone => Some(Self::Gone),
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_mark_starts_at_none_and_only_moves_forward() {
        let cell = EpochCell::new();
        assert_eq!(cell.get(), None);
        assert!(!cell.covers(Epoch(1)));
        cell.raise(Epoch(3));
        cell.raise(Epoch(2));
        assert_eq!(cell.get(), Some(Epoch(3)));
        assert!(cell.covers(Epoch(3)) && cell.covers(Epoch(1)) && !cell.covers(Epoch(4)));
        cell.set(None);
        assert_eq!(cell.get(), None);
        assert_eq!(Epoch(1).previous(), None);
        assert_eq!(Epoch(5).previous(), Some(Epoch(4)));
        assert_eq!(Epoch::from_wire(0), None);
        assert_eq!(Epoch::distance(Some(Epoch(7)), Some(Epoch(4))), 3);
        assert_eq!(Epoch::distance(Some(Epoch(2)), None), 2);
        assert_eq!(Epoch::distance(None, Some(Epoch(2))), 0);
        assert!(None < Some(Epoch(1)), "an ack raises the mark from none");
    }

    #[test]
    fn identities_round_trip_through_text_and_wire() {
        let i = Incarnation::new_random();
        assert_eq!(i.to_string().parse::<Incarnation>(), Ok(i));
        assert_eq!(Incarnation::from_raw(i.raw()), Some(i));
        assert_eq!(Incarnation::from_raw(0), None);
        assert!("0".parse::<Incarnation>().is_err());
        assert_ne!(Incarnation::new_random(), Incarnation::new_random());
        for s in [
            RunState::Protected,
            RunState::ReleasedUnprotected,
            RunState::Stopped,
            RunState::Gone,
        ] {
            assert_eq!(RunState::from_name(s.name()), Some(s));
            assert_eq!(RunState::from_proto(s.to_proto()), Some(s));
        }
        assert_eq!(RunState::from_proto(0), None);
        assert_eq!(Generation(7).next(), Generation(8));
        let s = SessionId::random().unwrap();
        assert_eq!(SessionId::from_raw(s.raw()), Some(s));
        assert_eq!(SessionId::from_raw(0), None);
        assert_eq!(SessionId::from_raw(0x2a).unwrap().to_string(), "0x2a");
        assert_eq!(format!("{:#x}", SessionId::from_raw(0x2a).unwrap()), "0x2a");
        assert!(!Generation(1 << 40).is_plausible());
        assert_eq!(Generation(u64::MAX).next(), Generation(u64::MAX));
    }
}

/// A daemon's role, one type for the daemon, its status, the proto's string
/// and the config's `[primary]`/`[backup]` tables (the host that starts
/// with that role).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Runs the VM and protects it.
    Primary,
    /// Holds the image and promotes when the primary goes silent.
    Backup,
}

impl Role {
    /// As in status, metrics and the proto: `primary` or `backup`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Backup => "backup",
        }
    }

    /// The other one.
    pub fn other(self) -> Self {
        match self {
            Self::Primary => Self::Backup,
            Self::Backup => Self::Primary,
        }
    }

    /// The role a status reply names (None for anything else).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "primary" => Some(Self::Primary),
            "backup" => Some(Self::Backup),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
