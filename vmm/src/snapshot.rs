//! Full snapshots on disk: a directory holding `vm.state` (the encoded
//! [`VmState`]) and `memory.bin` (guest RAM, byte for byte, in exactly the
//! layout the VM maps as RAM). Each file is written to a temporary name, synced
//! and renamed, so a crash never leaves a half-written snapshot under the real
//! names. Reading verifies the state's checksum and the RAM's CRC-32C.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::memory::{GuestRam, RamBacking};
use crate::state::{StateError, VmState};
use crate::vm::{Console, Vm, VmError};

/// The encoded VM state inside a snapshot directory.
pub const STATE_FILE: &str = "vm.state";
/// Guest RAM inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";

/// Errors writing or reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot state {path} is unusable")]
    State {
        path: PathBuf,
        #[source]
        source: StateError,
    },
    #[error(
        "snapshot RAM {path} does not match its state (CRC-32C {computed:#010x}, state records \
         {stored:#010x}): the memory file is corrupt or from another snapshot"
    )]
    RamChecksum {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    #[error(
        "snapshot RAM {path} holds {actual} bytes but the state says {expected}: the file is truncated"
    )]
    RamSize {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("snapshot state has no RAM checksum: it was not written as a full snapshot")]
    NoRamChecksum,
    #[error(transparent)]
    Vm(#[from] VmError),
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// What a snapshot holds.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    pub ram_bytes: u64,
    pub state_bytes: usize,
}

/// Writes a full snapshot of a paused VM into `dir` (created if missing).
pub fn write_snapshot(vm: &Vm, dir: &Path) -> Result<SnapshotInfo, SnapshotError> {
    fs::create_dir_all(dir).map_err(io("cannot create snapshot directory", dir))?;
    let state = vm.save_state(true)?;
    let encoded = state.encode().map_err(|source| SnapshotError::State {
        path: dir.join(STATE_FILE),
        source,
    })?;
    write_atomically(&dir.join(MEMORY_FILE), |out| {
        vm.ram()
            .dump_to(out)
            .map_err(|e| std::io::Error::other(e.to_string()))
    })?;
    write_atomically(&dir.join(STATE_FILE), |out| out.write_all(&encoded))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync snapshot directory", dir))?;
    Ok(SnapshotInfo {
        ram_bytes: state.memory.size_bytes,
        state_bytes: encoded.len(),
    })
}

fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>,
) -> Result<(), SnapshotError> {
    let tmp = path.with_extension("tmp");
    let file = File::create(&tmp).map_err(io("cannot create", &tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, &file);
    fill(&mut out).map_err(io("cannot write", &tmp))?;
    out.flush().map_err(io("cannot write", &tmp))?;
    drop(out);
    file.sync_all().map_err(io("cannot sync", &tmp))?;
    fs::rename(&tmp, path).map_err(io("cannot rename into place", path))
}

/// Reads and verifies a snapshot: its state, and its RAM file (opened, size and
/// checksum checked).
pub fn read_snapshot(dir: &Path) -> Result<(VmState, File), SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let bytes = fs::read(&state_path).map_err(io("cannot read snapshot state", &state_path))?;
    let state = VmState::decode(&bytes).map_err(|source| SnapshotError::State {
        path: state_path,
        source,
    })?;
    let stored = state.memory.crc32c.ok_or(SnapshotError::NoRamChecksum)?;
    let mem_path = dir.join(MEMORY_FILE);
    let mut file = File::open(&mem_path).map_err(io("cannot open snapshot RAM", &mem_path))?;
    let actual = file
        .metadata()
        .map_err(io("cannot stat snapshot RAM", &mem_path))?
        .len();
    if actual != state.memory.size_bytes {
        return Err(SnapshotError::RamSize {
            path: mem_path,
            expected: state.memory.size_bytes,
            actual,
        });
    }
    let mut crc = 0u32;
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut chunk)
            .map_err(io("cannot read snapshot RAM", &mem_path))?;
        if n == 0 {
            break;
        }
        crc = crc32c::crc32c_append(crc, &chunk[..n]);
    }
    if crc != stored {
        return Err(SnapshotError::RamChecksum {
            path: mem_path,
            stored,
            computed: crc,
        });
    }
    Ok((state, file))
}

/// Restores a snapshot in this process. RAM is the snapshot's file mapped
/// private (copy-on-write): the snapshot on disk is never modified.
pub fn restore_snapshot(dir: &Path, start_paused: bool) -> Result<(Vm, Console), SnapshotError> {
    let (state, file) = read_snapshot(dir)?;
    let ram = GuestRam::new(
        state.memory.size_bytes as usize,
        RamBacking::PrivateFile(file),
    )
    .map_err(VmError::from)?;
    Ok(Vm::restore(&state, ram, start_paused)?)
}
