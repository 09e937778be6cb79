//! A small record kept in a file and replaced in place, crash-safely: the
//! image store's `meta` (see [`crate::store`]).
//!
//! Replacing a file by writing a new one and renaming it over the old costs
//! ~190–210 µs on these machines' ext4 (ext4 starts writing the new file's
//! data back at a rename over an existing file, `auto_da_alloc`), against
//! ~6 µs to open the file and `pwrite` into it (~2 µs of that the
//! `pwrite`). The store replaced its record at every commit, and three
//! times on a migration's switch (the final commit, the goodbye's
//! retirement, the destination's new generation), so the rename was most
//! of an idle epoch's commit.
//!
//! So the file holds two slots and a write goes to the one not holding the
//! current record: a write cut short (a crash, `kill -9` between the pages
//! of a `pwrite`, a power loss without fsync) leaves the other slot, the
//! record before it, as the rename left the old file. Each slot carries a
//! sequence number and a CRC; the valid slot with the higher sequence is the
//! record.
//!
//! ```text
//! +------+---------+----------+-----+   slot (at 16 + i × slot_len):
//! | USRF | version | slot_len | crc |   +-----+-----+--------+-----+
//! | 4    | 4       | 4        | 4   |   | seq | len | record | crc |
//! +------+---------+----------+-----+   | 8   | 4   | len    | 4   |
//!                                        +-----+-----+--------+-----+
//! ```
//!
//! A record larger than a slot rewrites the whole file (by rename, as
//! before) with slots twice its size. A file that does not start with the
//! magic is a record of an older release, written whole: it is read as the
//! record, and its first replacement rewrites it in this form.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: [u8; 4] = *b"USRF";
const VERSION: u32 = 1;
const HEAD_LEN: usize = 16;
/// seq (8) and len (4) before the record, its CRC (4) after.
const SLOT_OVERHEAD: usize = 8 + 4 + 4;
/// The smallest slot: a record of the image store without held output is
/// ~1–3 KiB.
const MIN_SLOT_LEN: usize = 16 << 10;

/// Why a record file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordFileError {
    /// Reading it failed.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither slot holds a whole record, or the head is damaged.
    #[error("{path}: {why}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
}

/// A record file, ready for in-place replacement. Each replacement opens
/// the file by its path (~4 µs more than a descriptor kept open, and what
/// the rename did too: whatever sits at the path is what gets written, or
/// the write fails).
#[derive(Debug)]
pub struct RecordFile {
    path: PathBuf,
    /// The file is in this form (false: an older release's, or not yet
    /// written): else the next replacement rewrites it whole.
    slotted: bool,
    slot_len: usize,
    /// The slot holding the current record, and its sequence number.
    current: usize,
    seq: u64,
    fsync: bool,
}

/// What [`RecordFile::open`] found.
#[derive(Debug)]
pub struct Opened {
    /// The file, ready for [`RecordFile::replace`].
    pub file: RecordFile,
    /// The current record.
    pub record: Vec<u8>,
    /// The other slot held something that is not a whole record: a
    /// replacement cut short (the record is the one before it).
    pub other_damaged: bool,
}

impl RecordFile {
    /// Writes a new file at `path` holding `record` (whole, by rename).
    pub fn create(path: &Path, record: &[u8], fsync: bool) -> std::io::Result<Self> {
        let mut file = Self::unwritten(path, fsync);
        file.rewrite(record)?;
        Ok(file)
    }

    /// A file not (yet) in this form: its first replacement writes it whole.
    fn unwritten(path: &Path, fsync: bool) -> Self {
        Self {
            path: path.to_owned(),
            slotted: false,
            slot_len: 0,
            current: 0,
            seq: 0,
            fsync,
        }
    }

    /// Reads the record at `path` (a file in an older release's form is
    /// read whole).
    pub fn open(path: &Path, fsync: bool) -> Result<Opened, RecordFileError> {
        let bytes = std::fs::read(path).map_err(|source| RecordFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        let damaged = |why| RecordFileError::Damaged {
            path: path.to_owned(),
            why,
        };
        if bytes.get(..4) != Some(&MAGIC[..]) {
            // An older release's record, whole.
            return Ok(Opened {
                file: Self::unwritten(path, fsync),
                record: bytes,
                other_damaged: false,
            });
        }
        let head = bytes
            .get(..HEAD_LEN)
            .ok_or(damaged("record file cut short"))?;
        let word =
            |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        if crc32c::crc32c(&head[..12]) != word(12) {
            return Err(damaged("metadata checksum mismatch (record file head)"));
        }
        if word(4) != VERSION {
            return Err(damaged("record file of an unknown version"));
        }
        let slot_len = word(8) as usize;
        if slot_len < SLOT_OVERHEAD {
            return Err(damaged("record file slots too small"));
        }
        let mut best: Option<(usize, u64, Vec<u8>)> = None;
        let mut damaged_slots = [false; 2];
        for (i, damaged_slot) in damaged_slots.iter_mut().enumerate() {
            let start = HEAD_LEN + i * slot_len;
            let end = (start + slot_len).min(bytes.len());
            match read_slot(bytes.get(start..end).unwrap_or_default()) {
                Slot::Valid { seq, record } if best.as_ref().is_none_or(|b| seq > b.1) => {
                    best = Some((i, seq, record));
                }
                Slot::Damaged => *damaged_slot = true,
                Slot::Valid { .. } | Slot::Empty => {}
            }
        }
        let Some((current, seq, record)) = best else {
            return Err(damaged(
                "metadata checksum mismatch (no whole record in either slot)",
            ));
        };
        let other_damaged = damaged_slots[1 - current];
        Ok(Opened {
            file: Self {
                path: path.to_owned(),
                slotted: true,
                slot_len,
                current,
                seq,
                fsync,
            },
            record,
            other_damaged,
        })
    }

    /// Makes `record` the current one: in place, into the slot not holding
    /// the current record, when it fits; else the whole file anew.
    pub fn replace(&mut self, record: &[u8]) -> std::io::Result<()> {
        if !self.slotted || record.len() + SLOT_OVERHEAD > self.slot_len {
            return self.rewrite(record);
        }
        let file = File::options().write(true).open(&self.path)?;
        let next = 1 - self.current;
        let seq = self.seq + 1;
        file.write_all_at(
            &encode_slot(seq, record),
            (HEAD_LEN + next * self.slot_len) as u64,
        )?;
        if self.fsync {
            file.sync_data()?;
        }
        self.current = next;
        self.seq = seq;
        Ok(())
    }

    /// Makes room in place for records of up to `record_len` bytes: if the
    /// slots are smaller, the file is rewritten now (by rename) holding
    /// `current`, the current record, with slots of that size. A later
    /// replacement by a record that size then writes into the file as it
    /// is, needing no new disk block.
    pub fn reserve(&mut self, current: &[u8], record_len: usize) -> std::io::Result<()> {
        if self.slotted && record_len + SLOT_OVERHEAD <= self.slot_len {
            return Ok(());
        }
        self.rewrite_with(current, record_len + SLOT_OVERHEAD)
    }

    /// Writes the whole file anew (by rename) with `record` in slot 0 and
    /// slots big enough for it twice over.
    fn rewrite(&mut self, record: &[u8]) -> std::io::Result<()> {
        self.rewrite_with(record, 0)
    }

    /// [`Self::rewrite`] with slots of at least `min_slot` bytes.
    fn rewrite_with(&mut self, record: &[u8], min_slot: usize) -> std::io::Result<()> {
        let slot_len = ((record.len() + SLOT_OVERHEAD) * 2)
            .max(MIN_SLOT_LEN)
            .max(min_slot);
        let slot_len_word = u32::try_from(slot_len)
            .map_err(|_| std::io::Error::other("record too large for a record file"))?;
        let seq = self.seq + 1;
        let mut bytes = Vec::with_capacity(HEAD_LEN + 2 * slot_len);
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&slot_len_word.to_le_bytes());
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes.extend_from_slice(&encode_slot(seq, record));
        bytes.resize(HEAD_LEN + 2 * slot_len, 0);
        let tmp = self.path.with_extension("tmp");
        {
            let mut out = File::create(&tmp)?;
            std::io::Write::write_all(&mut out, &bytes)?;
            if self.fsync {
                out.sync_all()?;
            }
        }
        std::fs::rename(&tmp, &self.path)?;
        if self.fsync
            && let Some(dir) = self.path.parent()
        {
            File::open(dir)?.sync_all()?;
        }
        self.slotted = true;
        self.slot_len = slot_len;
        self.current = 0;
        self.seq = seq;
        Ok(())
    }
}

enum Slot {
    /// Never written (all zero).
    Empty,
    Valid {
        seq: u64,
        record: Vec<u8>,
    },
    /// Written, but not whole (or damaged since).
    Damaged,
}

fn encode_slot(seq: u64, record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(record.len() + SLOT_OVERHEAD);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(record.len() as u32).to_le_bytes());
    out.extend_from_slice(record);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn read_slot(bytes: &[u8]) -> Slot {
    if bytes.iter().take(12).all(|&b| b == 0) {
        return Slot::Empty;
    }
    let parse = || -> Option<Slot> {
        let seq = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
        let len = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?) as usize;
        let end = 12usize.checked_add(len)?;
        let body = bytes.get(..end)?;
        let crc = u32::from_le_bytes(bytes.get(end..end + 4)?.try_into().ok()?);
        (crc32c::crc32c(body) == crc).then(|| Slot::Valid {
            seq,
            record: body[12..].to_vec(),
        })
    };
    parse().unwrap_or(Slot::Damaged)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn reopen(path: &Path) -> Opened {
        RecordFile::open(path, false).unwrap()
    }

    #[test]
    fn each_replacement_is_read_back_and_alternates_slots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let mut file = RecordFile::create(&path, b"one", false).unwrap();
        assert_eq!(reopen(&path).record, b"one");
        for i in 0..5u8 {
            let record = vec![i; 100 + usize::from(i)];
            file.replace(&record).unwrap();
            let opened = reopen(&path);
            assert_eq!(opened.record, record);
            assert!(!opened.other_damaged);
            assert_eq!(opened.file.current, usize::from(i + 1) % 2);
        }
    }

    #[test]
    fn a_replacement_cut_short_leaves_the_record_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let mut file = RecordFile::create(&path, b"committed 1", false).unwrap();
        file.replace(b"committed 2").unwrap();
        // The next write, cut after its first 14 bytes (a kill between
        // pages, or a power loss): slot 0 holds a piece of it.
        let slot = encode_slot(3, &[7u8; 9000]);
        let handle = File::options().write(true).open(&path).unwrap();
        handle.write_all_at(&slot[..14], HEAD_LEN as u64).unwrap();
        let opened = reopen(&path);
        assert_eq!(opened.record, b"committed 2");
        assert!(opened.other_damaged);
        // Replaced again, it writes over the torn slot.
        let mut file = opened.file;
        file.replace(b"committed 3").unwrap();
        let opened = reopen(&path);
        assert_eq!(opened.record, b"committed 3");
        assert!(!opened.other_damaged);
    }

    #[test]
    fn damage_in_both_slots_or_the_head_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let mut file = RecordFile::create(&path, b"one", false).unwrap();
        file.replace(b"two").unwrap();
        let flip = |at: usize| {
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[at] ^= 1;
            std::fs::write(&path, bytes).unwrap();
        };
        let slot_len = file.slot_len;
        flip(HEAD_LEN + slot_len + 13);
        assert_eq!(reopen(&path).record, b"one", "the other slot stands");
        flip(HEAD_LEN + 13);
        let err = RecordFile::open(&path, false).unwrap_err();
        assert!(
            err.to_string().contains("metadata checksum mismatch"),
            "{err}"
        );
        flip(HEAD_LEN + 13);
        flip(9);
        let err = RecordFile::open(&path, false).unwrap_err();
        assert!(err.to_string().contains("record file head"), "{err}");
    }

    #[test]
    fn a_record_too_big_for_its_slot_rewrites_the_file_and_an_old_record_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        std::fs::write(&path, b"USIM an older release's record").unwrap();
        let opened = reopen(&path);
        assert_eq!(opened.record, b"USIM an older release's record");
        let mut file = opened.file;
        file.replace(b"now in slots").unwrap();
        assert_eq!(reopen(&path).record, b"now in slots");
        let big = vec![3u8; 3 * MIN_SLOT_LEN];
        file.replace(&big).unwrap();
        let opened = reopen(&path);
        assert_eq!(opened.record, big);
        assert!(opened.file.slot_len >= 2 * big.len());
        file.replace(b"small again").unwrap();
        assert_eq!(reopen(&path).record, b"small again");
    }
}
