//! Putting a guest into fresh RAM: the built-in guests (flat binaries built from
//! `guests/`) and raw code for smoke tests. A loader writes the image and its
//! boot data and returns where the vCPU starts.
//!
//! The [`Loader`] trait is the seam for a Linux bzImage/ELF (PVH) loader later:
//! it would write boot params and the kernel and return a different entry; the
//! VM does not care which loader produced the [`BootEntry`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::arch;
use crate::memory::{GuestRam, MemoryError, PAGE_SIZE};

/// Guest-physical address of the boot-info page (see `guests/guest.h`).
pub const BOOT_INFO_GPA: u64 = 0x6000;
/// Where flat images are loaded and entered.
pub const IMAGE_GPA: u64 = 0x10_0000;
/// Initial stack pointer (the stack grows down from here).
pub const STACK_TOP: u64 = 0x8_0000;
/// Start of the `dirtier` guest's working set.
pub const DIRTIER_WORKING_SET_GPA: u64 = 0x40_0000;
/// Start of the `kv` guest's table.
pub const KV_TABLE_GPA: u64 = 0x20_0000;
/// Offset of `work_done` in the boot-info page.
pub const BOOT_INFO_WORK_DONE: u64 = 88;
/// Offset of `ticks` (guest milliseconds) in the boot-info page.
pub const BOOT_INFO_TICKS: u64 = 96;

const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"USTDBOOT");
const BOOT_VERSION: u32 = 1;
/// Largest image a flat loader accepts: it must end below the `kv` table.
const MAX_IMAGE_BYTES: usize = (KV_TABLE_GPA - IMAGE_GPA) as usize;

static COUNTER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/counter.bin"));
static DIRTIER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/dirtier.bin"));
static KV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kv.bin"));

/// Errors from loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Guest RAM refused the write.
    #[error("cannot write the guest into RAM")]
    Memory(#[from] MemoryError),
    /// An image over the loader's limit.
    #[error("guest image of {bytes} bytes is larger than the {MAX_IMAGE_BYTES} bytes allowed")]
    ImageTooLarge {
        /// The image's size.
        bytes: usize,
    },
    /// The dirtier's working set does not fit in RAM.
    #[error(
        "dirtier working set of {pages} pages does not fit in {ram_mib} MiB of RAM \
         (it starts at 4 MiB): use at most {max_pages} pages or more memory"
    )]
    WorkingSetTooLarge {
        /// The working set asked for.
        pages: u64,
        /// Guest RAM.
        ram_mib: usize,
        /// The most that fits.
        max_pages: u64,
    },
}

/// Where the vCPU starts after a loader ran: 64-bit mode on the boot page tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// The first instruction.
    pub rip: u64,
    /// The initial stack pointer.
    pub rsp: u64,
}

/// Something that can put a bootable guest into fresh RAM.
pub trait Loader: fmt::Debug + Send {
    /// Writes the guest and everything it needs to boot; returns its entry.
    fn load(&self, ram: &GuestRam) -> Result<BootEntry, LoadError>;

    /// The deterministic mode's check: refuses an image that could read the
    /// host without an exit (see [`fn@refuse_nondeterminism`]).
    fn refuse_nondeterminism(&self) -> Result<(), String>;
}

/// The built-in guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BuiltinGuest {
    /// Prints `count N` at an interval.
    Counter,
    /// Writes pages of a working set at a rate and reports its work.
    Dirtier,
    /// A key-value store on the console (`SET k v`, `GET k`).
    Kv,
}

impl BuiltinGuest {
    /// Every built-in guest.
    pub const ALL: [BuiltinGuest; 3] = [Self::Counter, Self::Dirtier, Self::Kv];

    /// The flat binary built from `guests/<name>.c`.
    pub fn image(self) -> &'static [u8] {
        match self {
            Self::Counter => COUNTER,
            Self::Dirtier => DIRTIER,
            Self::Kv => KV,
        }
    }

    /// Its name in configurations.
    pub fn name(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Dirtier => "dirtier",
            Self::Kv => "kv",
        }
    }

    fn id(self) -> u32 {
        match self {
            Self::Counter => 1,
            Self::Dirtier => 2,
            Self::Kv => 3,
        }
    }
}

impl fmt::Display for BuiltinGuest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown guest name.
#[derive(Debug, thiserror::Error)]
#[error("unknown guest {0:?}: choose counter, dirtier or kv")]
pub struct UnknownGuest(String);

impl FromStr for BuiltinGuest {
    type Err = UnknownGuest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|g| g.name() == s)
            .ok_or_else(|| UnknownGuest(s.to_owned()))
    }
}

/// A built-in guest with its parameters (see `guests/README.md`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltinBoot {
    /// Which guest.
    pub guest: BuiltinGuest,
    /// Its parameters, as the boot-info page passes them (per guest; see
    /// `guests/README.md`).
    pub params: [u64; 8],
}

impl BuiltinBoot {
    /// `guest` with default parameters.
    pub fn new(guest: BuiltinGuest) -> Self {
        Self {
            guest,
            params: [0; 8],
        }
    }

    /// `counter` printing every `interval_ms`.
    pub fn counter(interval_ms: u64) -> Self {
        let mut boot = Self::new(BuiltinGuest::Counter);
        boot.params[0] = interval_ms;
        boot
    }

    /// `dirtier` over `working_set_pages` at `pages_per_sec` (0 = flat out).
    pub fn dirtier(working_set_pages: u64, pages_per_sec: u64, report_ms: u64) -> Self {
        let mut boot = Self::new(BuiltinGuest::Dirtier);
        boot.params[..3].copy_from_slice(&[working_set_pages, pages_per_sec, report_ms]);
        boot
    }

    fn check_fits(&self, ram: &GuestRam) -> Result<(), LoadError> {
        if self.guest == BuiltinGuest::Dirtier {
            let max_pages = (ram.size() as u64 - DIRTIER_WORKING_SET_GPA) / PAGE_SIZE as u64;
            let pages = self.params[0];
            if pages > max_pages {
                return Err(LoadError::WorkingSetTooLarge {
                    pages,
                    ram_mib: ram.size() >> 20,
                    max_pages,
                });
            }
        }
        Ok(())
    }
}

impl Loader for BuiltinBoot {
    fn load(&self, ram: &GuestRam) -> Result<BootEntry, LoadError> {
        self.check_fits(ram)?;
        let entry = RawCode(self.guest.image().to_vec()).load(ram)?;
        let mut info = Vec::with_capacity(104);
        info.extend_from_slice(&BOOT_MAGIC.to_le_bytes());
        info.extend_from_slice(&BOOT_VERSION.to_le_bytes());
        info.extend_from_slice(&self.guest.id().to_le_bytes());
        info.extend_from_slice(&(ram.size() as u64).to_le_bytes());
        for param in self.params {
            info.extend_from_slice(&param.to_le_bytes());
        }
        ram.write_at(BOOT_INFO_GPA, &info)?;
        Ok(entry)
    }

    fn refuse_nondeterminism(&self) -> Result<(), String> {
        refuse_nondeterminism(self.guest.image())
    }
}

/// Raw 64-bit code loaded and entered at [`IMAGE_GPA`], for smoke tests and
/// flat binaries.
#[derive(Clone)]
pub struct RawCode(pub Vec<u8>);

impl fmt::Debug for RawCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawCode({} bytes)", self.0.len())
    }
}

impl Loader for RawCode {
    fn load(&self, ram: &GuestRam) -> Result<BootEntry, LoadError> {
        if self.0.len() > MAX_IMAGE_BYTES {
            return Err(LoadError::ImageTooLarge {
                bytes: self.0.len(),
            });
        }
        arch::write_boot_tables(ram)?;
        ram.write_at(IMAGE_GPA, &self.0)?;
        Ok(BootEntry {
            rip: IMAGE_GPA,
            rsp: STACK_TOP,
        })
    }

    fn refuse_nondeterminism(&self) -> Result<(), String> {
        refuse_nondeterminism(&self.0)
    }
}

/// Refuses a guest image that could read the host without an exit, which
/// no log could replay: `rdtsc` (0f 31), `rdtscp` (0f 01 f9), `rdrand` and
/// `rdseed` (0f c7 /6, /7 with a register operand). A byte scan: it may
/// refuse data that merely looks like them, never the reverse.
pub fn refuse_nondeterminism(image: &[u8]) -> Result<(), String> {
    for at in 0..image.len() {
        // Three bytes from `at` (fewer at the very end: `rdtsc` is two).
        let w = &image[at..image.len().min(at + 3)];
        let what = match w {
            [0x0f, 0x31, ..] => Some("rdtsc"),
            [0x0f, 0x01, 0xf9] => Some("rdtscp"),
            [0x0f, 0xc7, modrm] if modrm >> 6 == 3 && (modrm >> 3) & 7 == 6 => Some("rdrand"),
            [0x0f, 0xc7, modrm] if modrm >> 6 == 3 && (modrm >> 3) & 7 == 7 => Some("rdseed"),
            _ => None,
        };
        if let Some(what) = what {
            return Err(format!(
                "the guest image holds `{what}` at byte {at:#x}: it reads the host without an exit, \
                 which a trace cannot replay; record mode refuses it"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MIN_RAM_BYTES, RamBacking};

    #[test]
    fn builtin_images_are_embedded_and_named() {
        for guest in BuiltinGuest::ALL {
            assert!(!guest.image().is_empty());
            assert_eq!(guest.name().parse::<BuiltinGuest>().unwrap(), guest);
        }
        let err = "linux".parse::<BuiltinGuest>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown guest \"linux\": choose counter, dirtier or kv"
        );
    }

    #[test]
    fn boot_info_carries_guest_and_params() {
        let ram = GuestRam::new(MIN_RAM_BYTES, RamBacking::Anonymous).unwrap();
        let entry = BuiltinBoot::counter(7).load(&ram).unwrap();
        assert_eq!(
            entry,
            BootEntry {
                rip: IMAGE_GPA,
                rsp: STACK_TOP
            }
        );
        assert_eq!(ram.read_u64(BOOT_INFO_GPA).unwrap(), BOOT_MAGIC);
        assert_eq!(
            ram.read_u64(BOOT_INFO_GPA + 16).unwrap(),
            MIN_RAM_BYTES as u64
        );
        assert_eq!(ram.read_u64(BOOT_INFO_GPA + 24).unwrap(), 7);
    }

    #[test]
    fn images_that_read_the_host_without_an_exit_are_refused() {
        for guest in BuiltinGuest::ALL {
            assert_eq!(BuiltinBoot::new(guest).refuse_nondeterminism(), Ok(()));
        }
        for (code, what) in [
            (&[0x90, 0x0f, 0x31][..], "rdtsc"),
            (&[0x0f, 0x01, 0xf9], "rdtscp"),
            (&[0x48, 0x0f, 0xc7, 0xf0], "rdrand"),
            (&[0x0f, 0xc7, 0xf8], "rdseed"),
        ] {
            let err = RawCode(code.to_vec()).refuse_nondeterminism().unwrap_err();
            assert!(err.contains(&format!("`{what}`")), "{err}");
        }
        // cmpxchg8b (0f c7 /1, a memory operand) is not refused.
        assert!(
            RawCode(vec![0x0f, 0xc7, 0x0e])
                .refuse_nondeterminism()
                .is_ok()
        );
    }

    #[test]
    fn oversized_working_set_is_refused_with_the_limit() {
        let ram = GuestRam::new(MIN_RAM_BYTES, RamBacking::Anonymous).unwrap();
        let err = BuiltinBoot::dirtier(2000, 0, 0).load(&ram).unwrap_err();
        assert!(err.to_string().contains("use at most 1024 pages"), "{err}");
        assert!(BuiltinBoot::dirtier(1024, 0, 0).load(&ram).is_ok());
    }
}
