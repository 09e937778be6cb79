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
