//! The backup's image store: guest RAM as one file mapped shared (exactly the
//! layout the VM maps as RAM on promotion, so promotion copies nothing), plus a
//! metadata record with the VM id, generation, last committed epoch, image
//! digest and the device state of that epoch.
//!
//! Directory layout: `memory.img` (RAM), `meta` (the record), and `journal`
//! (the last checkpoint's redo record, overwritten in place by the next; a
//! zero where its magic goes means there is none. The file is kept at least
//! [`JOURNAL_ROOM_MAX`] long, or the RAM's size if less, so the page cache can
//! hold its pages before the first checkpoint needs them; the first
//! checkpoint reserves its blocks and maps it, and journals are copied in
//! through that mapping).
//!
//! The record also names the VM *incarnation* the image belongs to (one boot
//! of the VM; the backup refuses to let a fresh boot sync over a committed
//! image of another) and whether the image was *retired* (the primary stopped
//! the VM on purpose: nobody should resume it, and a fresh boot may replace
//! it). An image is *promotable* only when it is committed, not retired, and
//! its pages hash to the committed digest ([`ImageStore::promotable`]): a
//! commit that failed half way (pages written, record not) makes it
//! unpromotable until a resync, instead of pairing epoch N+1's memory with
//! epoch N's device state.
//!
//! Applying a checkpoint is atomic and crash-safe by redo journaling:
//!
//! ```text
//!  decode + verify (image untouched)  →  write journal (pages, their hashes,
//!  device state, digest, trailer CRC)  →  ── commit point: a complete
//!  journal ──  →  copy pages into memory.img  →  write the new record
//! ```
//!
//! The record is replaced in place, in whichever of the `meta` file's two
//! slots does not hold the current one ([`crate::record_file`]): a write cut
//! short leaves the record before it, as a rename over the old file did, at
//! ~6 µs a commit instead of the rename's ~200.
//!
//! A journal is complete when its trailer CRC matches (it covers everything
//! but the pages) and every page hashes to the hash listed for it. The pages
//! are not run through the CRC: the decoder already hashed each one, so
//! listing the hashes (16 bytes a page) checks them for one pass less over
//! every byte of the epoch. The pages start on a page boundary of the file
//! (version 3), so each lands in one page-cache page and is copied in with
//! non-temporal stores through a mapping of the journal (see
//! `ImageStore::write_journal`). Version 1 journals (one CRC over everything)
//! and version 2 journals (pages right after the hashes) are still read.
//!
//! Recovery at [`ImageStore::open`]: a complete journal for the next epoch is
//! replayed (idempotently); an incomplete one is discarded (its epoch was never
//! committed and the image was never touched). Then every page is hashed and the
//! image digest must equal the committed digest, so a torn image is reported,
//! never served. A process killed at any instant therefore leaves epoch N-1 or
//! epoch N. Writes reach the page cache in order; `StoreOptions::fsync` adds
//! fsync/msync at each step for power-loss safety.
//!
//! During an initial sync the status is `Syncing`: sync rounds write straight
//! into `memory.img` (the image holds no committed epoch to protect, and must not
//! be promoted), and the checkpoint that completes the sync commits it as above.

use std::fs::{self, File};
use std::io::{IoSlice, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use memmap2::{MmapMut, MmapOptions};

use crate::codec::Reader;
use crate::copy;
use crate::epoch::{CommittedImage, EpochKind, MAX_VM_ID_LEN, StagedEpoch};
use crate::page::{ImageDigest, PAGE_SIZE, Page, PageHash, page_hash, zero_page_hash};
use crate::record_file::{RecordFile, RecordFileError};

/// Guest RAM inside an image directory.
pub const MEMORY_FILE: &str = "memory.img";
const META_FILE: &str = "meta";
const JOURNAL_FILE: &str = "journal";
const META_MAGIC: [u8; 4] = *b"USIM";
const JOURNAL_MAGIC: [u8; 4] = *b"USJN";
const JOURNAL_END: [u8; 4] = *b"USJE";
/// Version 2 added the incarnation and the retired flag to the record;
/// version 1 records are still read (incarnation unknown, not retired).
const FORMAT_VERSION: u32 = 2;
const OLDEST_READABLE_VERSION: u32 = 1;
/// The journal's own format. Version 3 starts the pages on a page boundary
/// (zeros pad the hash list); version 2 listed each page's hash after the
/// page list and left the pages out of the trailer CRC; version 1 journals
/// (one CRC over everything) are still recovered, as are version 2 ones.
const JOURNAL_VERSION: u32 = 3;
/// Runs of at least this many pages are written with `pwrite` rather than
/// copied into the mapping (see `ImageStore::write_pages`).
const WRITE_RUN_PAGES: usize = 16;
/// The recorded hash of a page whose write failed: no content hashes to it
/// (an xxh3-128 of all ones), so the page is rewritten by the next sync.
const UNKNOWN_CONTENT: PageHash = u128::MAX;
/// The read size of [`warm_image`].
const WARM_READ: usize = 1 << 20;
/// The journal file is never shorter than this (or the RAM's size, if
/// less): room for a checkpoint of ~16k changed pages in pages the page
/// cache already holds. Writing a journal into a file's new pages cost
/// ~14–18 µs a page here (111–147 ms for 32 MiB, three runs), into pages
/// read ahead from the file's unwritten extents ~1.5 µs (the read ~2.5 µs,
/// done before any checkpoint waits for it): the first checkpoint after a
/// sync, and a migration's final epoch, journal into new pages otherwise.
pub const JOURNAL_ROOM_MAX: u64 = 64 << 20;
/// Journal header: magic, version, epoch, generation, page count, device-state
/// length, digest (the page list, pages, device state and trailer follow).
const JOURNAL_HEAD_LEN: usize = 4 + 4 + 8 + 8 + 4 + 4 + 16;

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done ("cannot write", …).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `create` over an existing image.
    #[error("{path} already holds an image; open it, or remove it to start over")]
    Exists {
        /// The image directory.
        path: PathBuf,
    },
    /// A directory or record understudy did not write.
    #[error("{path} is not an understudy image ({why})")]
    NotAnImage {
        /// The image directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A record format this build does not read.
    #[error(
        "image format version {found} is not supported (this build uses {FORMAT_VERSION}): \
         use the understudy release that wrote it, or resync"
    )]
    UnsupportedVersion {
        /// The record's version.
        found: u32,
    },
    /// The pages do not hash to the committed digest.
    #[error(
        "image in {path} is corrupt: its pages hash to digest {computed} but epoch {epoch} \
         committed {expected}; remove the directory and let the primary resync"
    )]
    DigestMismatch {
        /// The image directory.
        path: PathBuf,
        /// The committed epoch.
        epoch: u64,
        /// Its committed digest.
        expected: ImageDigest,
        /// What the pages hash to.
        computed: ImageDigest,
    },
    /// A RAM size that is not whole pages.
    #[error("guest RAM of {0} bytes is not a positive multiple of 4 KiB")]
    BadRamSize(u64),
    /// An empty or too long VM id.
    #[error("VM id must be 1 to {MAX_VM_ID_LEN} bytes")]
    BadVmId,
    /// An epoch staged against another state of the image.
    #[error("the staged epoch no longer fits this image: {0}")]
    StaleStaging(String),
    /// `go_live` with a generation that does not move forward.
    #[error("generation {requested} is not newer than the image's generation {current}")]
    GenerationNotNewer {
        /// The image's generation.
        current: u64,
        /// The one asked for.
        requested: u64,
    },
    /// No committed checkpoint to promote.
    #[error("the image holds no committed checkpoint ({0})")]
    NotCommitted(&'static str),
    /// The primary stopped this VM on purpose.
    #[error(
        "the image of epoch {epoch} was retired: the primary stopped that VM on purpose, so it \
         must not be resumed"
    )]
    Retired {
        /// The retired epoch.
        epoch: u64,
    },
    /// Pages of an uncommitted epoch beside the committed record.
    #[error(
        "the image is not a committed epoch ({why}): it must not be promoted; the primary's next \
         sync repairs it"
    )]
    Torn {
        /// What was found.
        why: String,
    },
}

/// The store's error for a record file that cannot be read.
fn record_error(e: RecordFileError, path: &Path) -> StoreError {
    match e {
        RecordFileError::Io { source, .. } => io("cannot read image metadata", path)(source),
        RecordFileError::Damaged { why, .. } => StoreError::NotAnImage {
            path: path.to_owned(),
            why: why.to_owned(),
        },
    }
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// What the image holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageStatus {
    /// Created, never synced.
    Empty,
    /// An initial sync is writing into it: not a consistent VM, never promote.
    Syncing,
    /// Exactly the state of this committed epoch.
    Committed {
        /// The epoch.
        epoch: u64,
    },
}

impl ImageStatus {
    fn code(self) -> u8 {
        match self {
            Self::Empty => 0,
            Self::Syncing => 1,
            Self::Committed { .. } => 2,
        }
    }
}

/// Durability of each step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreOptions {
    /// fsync the journal, msync the image and fsync the metadata at every
    /// commit: survives power loss, at a cost per epoch. Without it the store
    /// survives any crash of this process (the page cache keeps every write).
    pub fsync: bool,
}

/// What recovery found when the store was opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// No journal: the image was at rest.
    Clean,
    /// A complete journal of this epoch was replayed: it had committed.
    Replayed {
        /// The epoch.
        epoch: u64,
    },
    /// An incomplete or stale journal was discarded: that epoch never committed.
    Discarded {
        /// Why it was incomplete or stale.
        reason: String,
    },
}

/// Figures of one applied epoch.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    /// Pages written.
    pub pages: usize,
    /// Bytes written to the redo journal.
    pub journal_bytes: u64,
    /// Journal, image and record, start to end.
    pub apply_time: Duration,
}

/// What a promotion needs from a promotable image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promotable {
    /// The committed epoch.
    pub epoch: u64,
    /// The image's generation.
    pub generation: u64,
    /// The VM incarnation (0: unknown, an image from before version 2).
    pub incarnation: u64,
    /// The checkpoint payload (VM state, console offset, held output).
    pub device_state: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Meta {
    vm_id: String,
    ram_pages: u32,
    generation: u64,
    status: ImageStatus,
    digest: ImageDigest,
    device_state: Vec<u8>,
    incarnation: u64,
    retired: bool,
}

impl Meta {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.vm_id.len() + self.device_state.len());
        out.extend_from_slice(&META_MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.push(self.status.code());
        let epoch = match self.status {
            ImageStatus::Committed { epoch } => epoch,
            _ => 0,
        };
        out.extend_from_slice(&epoch.to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.ram_pages.to_le_bytes());
        out.extend_from_slice(&self.digest.0.to_le_bytes());
        out.extend_from_slice(&(self.vm_id.len() as u16).to_le_bytes());
        out.extend_from_slice(self.vm_id.as_bytes());
        out.extend_from_slice(&(self.device_state.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.device_state);
        out.extend_from_slice(&self.incarnation.to_le_bytes());
        out.push(u8::from(self.retired));
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8], path: &Path) -> Result<Self, StoreError> {
        let bad = |why: &str| StoreError::NotAnImage {
            path: path.to_owned(),
            why: why.to_owned(),
        };
        if bytes.len() < 8 || bytes[..4] != META_MAGIC {
            return Err(bad("no metadata magic"));
        }
        let version = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(StoreError::UnsupportedVersion { found: version });
        }
        if bytes.len() < 12 {
            return Err(bad("metadata cut short"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return Err(bad("metadata checksum mismatch"));
        }
        let mut r = Reader::new(&body[8..]);
        let cut = || bad("metadata cut short");
        let status = r.u8().ok_or_else(cut)?;
        let epoch = r.u64().ok_or_else(cut)?;
        let status = match status {
            0 => ImageStatus::Empty,
            1 => ImageStatus::Syncing,
            2 => ImageStatus::Committed { epoch },
            _ => return Err(bad("unknown status")),
        };
        let generation = r.u64().ok_or_else(cut)?;
        let ram_pages = r.u32().ok_or_else(cut)?;
        let digest = ImageDigest(r.u128().ok_or_else(cut)?);
        let len = r.u16().ok_or_else(cut)? as usize;
        let vm_id = std::str::from_utf8(r.take(len).ok_or_else(cut)?)
            .map_err(|_| bad("VM id is not UTF-8"))?
            .to_owned();
        let len = r.u32().ok_or_else(cut)? as usize;
        let device_state = r.take(len).ok_or_else(cut)?.to_vec();
        let (incarnation, retired) = if version >= 2 {
            let incarnation = r.u64().ok_or_else(cut)?;
            let retired = match r.u8().ok_or_else(cut)? {
                0 => false,
                1 => true,
                _ => return Err(bad("unknown retired flag")),
            };
            (incarnation, retired)
        } else {
            (0, false)
        };
        if !r.is_empty() {
            return Err(bad("trailing metadata bytes"));
        }
        Ok(Self {
            vm_id,
            ram_pages,
            generation,
            status,
            digest,
            device_state,
            incarnation,
            retired,
        })
    }
}

/// The journal file's bytes when it holds a journal (its magic is not
/// zero); empty when it is missing, shorter than a magic, or emptied. Only
/// the magic is read in the last two cases.
fn journal_if_any(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut magic = [0u8; JOURNAL_MAGIC.len()];
    match file.read_exact(&mut magic) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    if magic == [0; JOURNAL_MAGIC.len()] {
        return Ok(Vec::new());
    }
    let mut bytes = magic.to_vec();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A journal read back for recovery.
struct Journal {
    epoch: u64,
    generation: u64,
    digest: ImageDigest,
    pages: Vec<u32>,
    data: Vec<u8>,
    device_state: Vec<u8>,
}

/// The journal's head for checkpoint `staged` journaling the staged pages
/// of `runs` (ranges of staged indices): the epoch, the digest after it,
/// and each journaled page's number and hash.
fn encode_journal_head(staged: &StagedEpoch, runs: &[Range<usize>]) -> Vec<u8> {
    let journaled = || runs.iter().flat_map(Range::clone);
    let count = runs.iter().map(Range::len).sum::<usize>();
    let mut head = Vec::with_capacity(journal_pages_at(count));
    head.extend_from_slice(&JOURNAL_MAGIC);
    head.extend_from_slice(&JOURNAL_VERSION.to_le_bytes());
    head.extend_from_slice(&staged.header.epoch.to_le_bytes());
    head.extend_from_slice(&staged.header.generation.to_le_bytes());
    head.extend_from_slice(&(count as u32).to_le_bytes());
    head.extend_from_slice(&(staged.device_state.len() as u32).to_le_bytes());
    head.extend_from_slice(&staged.digest.0.to_le_bytes());
    debug_assert_eq!(head.len(), JOURNAL_HEAD_LEN);
    for i in journaled() {
        head.extend_from_slice(&staged.pages[i].to_le_bytes());
    }
    debug_assert_eq!(staged.hashes.len(), staged.pages.len());
    for i in journaled() {
        head.extend_from_slice(&staged.hashes[i].to_le_bytes());
    }
    head
}

/// Where a version 3 journal of `count` pages puts its first page: the
/// head and the page and hash lists, rounded up to a whole page.
fn journal_pages_at(count: usize) -> usize {
    (JOURNAL_HEAD_LEN + count * (4 + 16)).next_multiple_of(PAGE_SIZE)
}

/// Parses a journal; `None` if it is incomplete or damaged in any way. The
/// file is reused from epoch to epoch, so bytes past the journal's own end
/// (left from a longer one) are ignored.
fn decode_journal(bytes: &[u8], ram_pages: u32) -> Option<Journal> {
    let mut r = Reader::new(bytes);
    if r.take(4)? != JOURNAL_MAGIC {
        return None;
    }
    let version = r.u32()?;
    let epoch = r.u64()?;
    let generation = r.u64()?;
    let count = r.u32()? as usize;
    let device_len = r.u32()? as usize;
    let digest = ImageDigest(r.u128()?);
    // Each page number, then (version 2) each page's hash.
    let hash_list = match version {
        1 => false,
        2 | 3 => true,
        _ => return None,
    };
    let listed = if hash_list { 4 + 16 } else { 4 };
    let lists_end = JOURNAL_HEAD_LEN.checked_add(count.checked_mul(listed)?)?;
    // Version 3: zeros (not checked) up to the next page boundary.
    let pages_at = if version == 3 {
        lists_end.checked_next_multiple_of(PAGE_SIZE)?
    } else {
        lists_end
    };
    let device_at = pages_at.checked_add(count.checked_mul(PAGE_SIZE)?)?;
    let len = device_at.checked_add(device_len)?;
    let body = bytes.get(..len)?;
    let trailer = bytes.get(len..len + 8)?;
    if trailer[4..] != JOURNAL_END {
        return None;
    }
    let crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let computed = if hash_list {
        crc32c::crc32c_append(crc32c::crc32c(&body[..lists_end]), &body[device_at..])
    } else {
        crc32c::crc32c(body)
    };
    if computed != crc {
        return None;
    }
    let mut list = Reader::new(&body[JOURNAL_HEAD_LEN..lists_end]);
    let mut pages = Vec::with_capacity(count.min(ram_pages as usize));
    for _ in 0..count {
        let page = list.u32()?;
        if page >= ram_pages {
            return None;
        }
        pages.push(page);
    }
    let data = &body[pages_at..device_at];
    // Version 2: the CRC left the pages out; each must be what was hashed
    // (a crash mid-write leaves an older journal's bytes under new hashes).
    if hash_list {
        for page in data.chunks_exact(PAGE_SIZE) {
            if page_hash(page) != list.u128()? {
                return None;
            }
        }
    }
    Some(Journal {
        epoch,
        generation,
        digest,
        pages,
        data: data.to_vec(),
        device_state: body[device_at..].to_vec(),
    })
}

/// The backup's image of one VM.
#[derive(Debug)]
pub struct ImageStore {
    dir: PathBuf,
    /// memory.img, mapped as `mem` and written through both.
    file: File,
    mem: MmapMut,
    meta: Meta,
    /// `meta` on disk, replaced in place (see [`crate::record_file`]).
    record: RecordFile,
    hashes: Vec<PageHash>,
    /// Digest of the current content (equals `meta.digest` when committed).
    digest: ImageDigest,
    /// Digest of an image of this size holding only zeros.
    zero_digest: ImageDigest,
    options: StoreOptions,
    /// Whether memory.img's blocks are reserved ([`reserve_blocks`]), so a
    /// store through `mem` cannot meet a hole a full disk could not fill
    /// (the kernel's answer to that is a `SIGBUS`, not an error). Without
    /// the reservation (a filesystem without `fallocate`, or an image of an
    /// older build on a disk that filled since) every page goes in with
    /// `pwrite`, which reports a full disk as an error.
    reserved: bool,
    /// The journal file, and a shared mapping of all of it (at least
    /// [`Self::journal_room`] bytes) where its blocks could be reserved;
    /// opened at the first checkpoint ([`Self::journal_file`]).
    journal: Option<JournalFile>,
}

/// The journal file as the store writes it.
#[derive(Debug)]
enum JournalFile {
    /// Its room reserved and mapped: a journal that fits is copied in.
    Mapped(File, MmapMut),
    /// Its blocks could not be reserved: every journal goes in with `writev`.
    Unmapped(File),
}

impl ImageStore {
    /// Creates an empty image for `vm_id` with `ram_bytes` of zeroed RAM.
    /// Creation is atomic: the directory appears complete or not at all.
    pub fn create(
        dir: &Path,
        vm_id: &str,
        ram_bytes: u64,
        options: StoreOptions,
    ) -> Result<Self, StoreError> {
        if vm_id.is_empty() || vm_id.len() > MAX_VM_ID_LEN {
            return Err(StoreError::BadVmId);
        }
        if ram_bytes == 0
            || ram_bytes % PAGE_SIZE as u64 != 0
            || ram_bytes / PAGE_SIZE as u64 > u32::MAX as u64
        {
            return Err(StoreError::BadRamSize(ram_bytes));
        }
        if dir.join(META_FILE).exists() {
            return Err(StoreError::Exists {
                path: dir.to_owned(),
            });
        }
        let ram_pages = (ram_bytes / PAGE_SIZE as u64) as u32;
        let tmp = dir.with_extension("creating");
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io("cannot create", &tmp))?;
        let mem_path = tmp.join(MEMORY_FILE);
        let file = File::create(&mem_path).map_err(io("cannot create", &mem_path))?;
        file.set_len(ram_bytes)
            .map_err(io("cannot size", &mem_path))?;
        reserve_blocks(&file, ram_bytes).map_err(io("cannot allocate the image", &mem_path))?;
        // The journal's room too: a disk too small for the image and the
        // journals of its checkpoints fails here, not at the first one.
        let journal_path = tmp.join(JOURNAL_FILE);
        let journal = File::create(&journal_path).map_err(io("cannot create", &journal_path))?;
        let room = ram_bytes.min(JOURNAL_ROOM_MAX);
        journal
            .set_len(room)
            .map_err(io("cannot size", &journal_path))?;
        reserve_blocks(&journal, room).map_err(io("cannot allocate the journal", &journal_path))?;
        let meta = Meta {
            vm_id: vm_id.to_owned(),
            ram_pages,
            generation: 0,
            status: ImageStatus::Empty,
            digest: ImageDigest::of_zero_image(ram_pages),
            device_state: Vec::new(),
            incarnation: 0,
            retired: false,
        };
        let meta_path = tmp.join(META_FILE);
        RecordFile::create(&meta_path, &meta.encode(), options.fsync)
            .map_err(io("cannot write", &meta_path))?;
        if dir.exists() {
            // An empty directory made by the operator (or a leftover without
            // metadata): replace it.
            fs::remove_dir_all(dir).map_err(io("cannot replace", dir))?;
        }
        fs::rename(&tmp, dir).map_err(io("cannot move into place", dir))?;
        // A fresh image is all zero pages: no need to read it back to hash it.
        let meta_path = dir.join(META_FILE);
        let record = RecordFile::open(&meta_path, options.fsync)
            .map_err(|e| record_error(e, &meta_path))?
            .file;
        let mut store = Self::map(dir, options, meta, record)?;
        store.hashes = vec![zero_page_hash(); ram_pages as usize];
        store.digest = store.meta.digest;
        store.clear_journal()?;
        Ok(store)
    }

    /// Opens an image, recovering from an interrupted commit and verifying
    /// every page against the committed digest.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<(Self, Recovery), StoreError> {
        let meta_path = dir.join(META_FILE);
        let opened =
            RecordFile::open(&meta_path, options.fsync).map_err(|e| record_error(e, &meta_path))?;
        let meta = Meta::decode(&opened.record, &meta_path)?;
        let mut store = Self::map(dir, options, meta, opened.file)?;
        let recovery = store.recover()?;
        store.hashes = (0..store.meta.ram_pages)
            .map(|p| page_hash(store.page(p)))
            .collect();
        store.digest = ImageDigest::of_hashes(&store.hashes);
        if let ImageStatus::Committed { epoch } = store.meta.status
            && store.digest != store.meta.digest
        {
            return Err(StoreError::DigestMismatch {
                path: dir.to_owned(),
                epoch,
                expected: store.meta.digest,
                computed: store.digest,
            });
        }
        Ok((store, recovery))
    }

    /// Maps `memory.img` of the image `meta` describes (hashes not yet known).
    fn map(
        dir: &Path,
        options: StoreOptions,
        meta: Meta,
        record: RecordFile,
    ) -> Result<Self, StoreError> {
        let mem_path = dir.join(MEMORY_FILE);
        let file = File::options()
            .read(true)
            .write(true)
            .open(&mem_path)
            .map_err(io("cannot open", &mem_path))?;
        let len = file.metadata().map_err(io("cannot stat", &mem_path))?.len();
        if len != u64::from(meta.ram_pages) * PAGE_SIZE as u64 {
            return Err(StoreError::NotAnImage {
                path: mem_path,
                why: format!("{len} bytes, metadata says {} pages", meta.ram_pages),
            });
        }
        // SAFETY: the image directory belongs to this daemon; nothing else
        // truncates memory.img while it is mapped.
        let mem = unsafe { MmapOptions::new().len(len as usize).map_mut(&file) }
            .map_err(io("cannot map", &mem_path))?;
        // `create` reserved the blocks already (there, a disk too small is an
        // error); an image opened may be one an older build left sparse.
        let reserved = match reserve_blocks(&file, len) {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(path = %mem_path.display(),
                    "this filesystem cannot reserve the image's blocks (no fallocate): writing its \
                     pages with pwrite, which reports a full disk as an error");
                false
            }
            Err(e) => {
                tracing::warn!(path = %mem_path.display(), error = %e,
                    "cannot reserve the image's blocks: writing its pages with pwrite, which \
                     reports a full disk as an error");
                false
            }
        };
        Ok(Self {
            dir: dir.to_owned(),
            file,
            mem,
            hashes: Vec::new(),
            digest: ImageDigest::default(),
            zero_digest: ImageDigest::of_zero_image(meta.ram_pages),
            meta,
            record,
            options,
            reserved,
            journal: None,
        })
    }

    fn recover(&mut self) -> Result<Recovery, StoreError> {
        let path = self.journal_path();
        // The file is kept at its room (up to 64 MiB) whether or not it holds
        // a journal: read it whole only when its magic says it does. Reading
        // all of it put a 64 MiB VM's image open 77–104 ms after a
        // switchover's end here instead of 10–14 (the open now 7–15 ms), at
        // every backup start and every re-protection.
        let bytes = match journal_if_any(&path) {
            Ok(bytes) => bytes,
            Err(e) => return Err(io("cannot read journal", &path)(e)),
        };
        if bytes.is_empty() {
            // No journal (emptied, or never written): nothing to act on.
            // Emptied again all the same, to give the file its room (an
            // image of an older release kept it empty).
            self.clear_journal()?;
            return Ok(Recovery::Clean);
        }
        // The journal holds the last journaled checkpoint. It is new work only
        // if it is the epoch after the committed one (or, while syncing, the
        // checkpoint completing the sync: begin_sync empties the journal).
        let recovery = match decode_journal(&bytes, self.meta.ram_pages) {
            None => Recovery::Discarded {
                reason: "journal incomplete or damaged: its epoch never committed".into(),
            },
            Some(journal) => {
                let follows = match self.meta.status {
                    ImageStatus::Committed { epoch } => journal.epoch == epoch + 1,
                    ImageStatus::Syncing => true,
                    ImageStatus::Empty => false,
                };
                if !follows {
                    return Ok(Recovery::Clean);
                }
                let epoch = journal.epoch;
                self.redo(&journal)?;
                Recovery::Replayed { epoch }
            }
        };
        self.clear_journal()?;
        Ok(recovery)
    }

    /// Applies a committed journal: pages into the image, then the new meta.
    fn redo(&mut self, journal: &Journal) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        for (i, &page) in journal.pages.iter().enumerate() {
            let at = page as usize * PAGE_SIZE;
            let content = &journal.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            if self.reserved {
                self.mem[at..at + PAGE_SIZE].copy_from_slice(content);
            } else {
                self.file
                    .write_all_at(content, at as u64)
                    .map_err(io("cannot redo the journal into", &self.memory_path()))?;
            }
        }
        self.commit_meta(
            journal.epoch,
            journal.generation,
            journal.digest,
            &journal.device_state,
        )?;
        Ok(())
    }

    /// Makes `epoch` the committed one: syncs the image (with fsync on), then
    /// writes the new record. The pages are already written.
    fn commit_meta(
        &mut self,
        epoch: u64,
        generation: u64,
        digest: ImageDigest,
        device_state: &[u8],
    ) -> Result<(), StoreError> {
        if self.options.fsync {
            let path = self.memory_path();
            self.mem.flush().map_err(io("cannot sync", &path))?;
        }
        let meta = Meta {
            generation: self.meta.generation.max(generation),
            status: ImageStatus::Committed { epoch },
            digest,
            device_state: device_state.to_vec(),
            retired: false,
            ..self.meta.clone()
        };
        self.replace_meta(meta)?;
        Ok(())
    }

    /// Makes room in the image's record (`meta`, replaced in place at every
    /// commit) for a device state of up to `device_state_len` bytes, so
    /// that a commit carrying one needs no new disk block: a record that
    /// outgrows its slots is rewritten into a new file, and on a full disk
    /// that commit would fail after its journal (the backup then reports
    /// its image torn until a restart redoes the journal). Rewrites the
    /// record now if its slots are smaller.
    pub fn reserve_record(&mut self, device_state_len: usize) -> Result<(), StoreError> {
        let current = self.meta.encode();
        let len = current.len() - self.meta.device_state.len() + device_state_len;
        self.record
            .reserve(&current, len)
            .map_err(io("cannot make room in", &self.dir.join(META_FILE)))
    }

    /// Makes `meta` the record on disk (in place, crash-safely: see
    /// [`crate::record_file`]) and in memory.
    fn replace_meta(&mut self, meta: Meta) -> Result<(), StoreError> {
        self.record
            .replace(&meta.encode())
            .map_err(io("cannot write", &self.dir.join(META_FILE)))?;
        self.meta = meta;
        Ok(())
    }

    /// Empties the journal: zeroes its magic, keeping the file (and its
    /// pages in the page cache) for the next epoch's journal, at least
    /// [`Self::journal_room`] long. Truncating it instead, as this once did,
    /// dropped those pages at every sync.
    fn clear_journal(&self) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        let path = self.journal_path();
        let file = File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("cannot open journal", &path))?;
        file.write_all_at(&[0; JOURNAL_MAGIC.len()], 0)
            .map_err(io("cannot clear journal", &path))?;
        let len = file.metadata().map_err(io("cannot stat", &path))?.len();
        if len < self.journal_room() {
            file.set_len(self.journal_room())
                .map_err(io("cannot size journal", &path))?;
        }
        if self.options.fsync {
            file.sync_data().map_err(io("cannot sync journal", &path))?;
        }
        Ok(())
    }

    /// The length the journal file is kept at, at least: the RAM's size, at
    /// most [`JOURNAL_ROOM_MAX`].
    fn journal_room(&self) -> u64 {
        (u64::from(self.meta.ram_pages) * PAGE_SIZE as u64).min(JOURNAL_ROOM_MAX)
    }

    /// The journal file (for [`warm_image`]).
    pub fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        if self.options.fsync {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io("cannot sync", &self.dir))?;
        }
        Ok(())
    }

    /// The image directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether every block of the RAM file is reserved: a VM may then map
    /// the file shared as its RAM, since no store of its guest can meet a
    /// hole a full disk cannot fill (the kernel's answer to that is a
    /// `SIGBUS`, which would end the VM). Where it is not (a filesystem
    /// without `fallocate`, or an older build's sparse image on a disk that
    /// has filled since), a VM runs on a copy of the image instead.
    pub fn blocks_reserved(&self) -> bool {
        self.reserved
    }

    /// The RAM file, opened again (the same file the store writes, even if
    /// its path were replaced): for a VM that maps it.
    pub fn ram_file(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Path of the RAM file (what the VM maps on promotion).
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }

    /// What the image holds.
    pub fn status(&self) -> ImageStatus {
        self.meta.status
    }

    /// The last committed epoch, if the image holds one.
    pub fn committed_epoch(&self) -> Option<u64> {
        match self.meta.status {
            ImageStatus::Committed { epoch } => Some(epoch),
            _ => None,
        }
    }

    /// Device state of the committed epoch.
    pub fn device_state(&self) -> &[u8] {
        &self.meta.device_state
    }

    /// Guest RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        u64::from(self.meta.ram_pages) * PAGE_SIZE as u64
    }

    /// Whole RAM as bytes (for verification and promotion checks).
    pub fn memory(&self) -> &[u8] {
        &self.mem
    }

    /// The VM incarnation the image belongs to (0: unknown).
    pub fn incarnation(&self) -> u64 {
        self.meta.incarnation
    }

    /// Whether the primary stopped this image's VM on purpose.
    pub fn retired(&self) -> bool {
        self.meta.retired
    }

    /// Starts (or restarts) an initial sync at `generation` of VM
    /// `incarnation`: the image stops being a committed epoch until the
    /// sync's final checkpoint commits.
    pub fn begin_sync(&mut self, generation: u64, incarnation: u64) -> Result<(), StoreError> {
        if generation < self.meta.generation {
            return Err(StoreError::GenerationNotNewer {
                current: self.meta.generation,
                requested: generation,
            });
        }
        self.clear_journal()?;
        let meta = Meta {
            generation,
            status: ImageStatus::Syncing,
            device_state: Vec::new(),
            incarnation,
            retired: false,
            ..self.meta.clone()
        };
        self.replace_meta(meta)?;
        Ok(())
    }

    /// The primary stopped the VM on purpose: the image must not be resumed,
    /// and a fresh boot may sync over it.
    pub fn retire(&mut self) -> Result<(), StoreError> {
        if self.meta.retired {
            return Ok(());
        }
        let meta = Meta {
            retired: true,
            ..self.meta.clone()
        };
        self.replace_meta(meta)
    }

    /// Whether page `page` holds only zeros, by its recorded hash (no read
    /// of the page; false for a page beyond the image).
    pub fn page_is_zero(&self, page: u32) -> bool {
        self.hashes
            .get(page as usize)
            .is_some_and(|&h| h == zero_page_hash())
    }

    /// Whether every page of the image holds zeros, as its digest says (kept
    /// incrementally: this costs nothing; an image created and never
    /// written): a primary's first sync then leaves its zero pages out
    /// ([`SenderState::over_zeroed_image`]). A page whose write failed has no
    /// known content and makes this false.
    ///
    /// [`SenderState::over_zeroed_image`]: crate::epoch::SenderState::over_zeroed_image
    pub fn holds_only_zeros(&self) -> bool {
        !self.hashes.is_empty() && self.digest == self.zero_digest
    }

    /// The committed checkpoint a promotion resumes, if the image holds one
    /// it may: committed, not retired, and its pages hash to the committed
    /// digest (kept incrementally, so this costs nothing). A commit that
    /// failed after writing pages fails the digest check here.
    pub fn promotable(&self) -> Result<Promotable, StoreError> {
        let epoch = match self.meta.status {
            ImageStatus::Committed { epoch } => epoch,
            ImageStatus::Syncing => return Err(StoreError::NotCommitted("a sync is under way")),
            ImageStatus::Empty => return Err(StoreError::NotCommitted("never synced")),
        };
        if self.meta.retired {
            return Err(StoreError::Retired { epoch });
        }
        if self.digest != self.meta.digest {
            return Err(StoreError::Torn {
                why: format!(
                    "its pages hash to {} but epoch {epoch} committed {}: a commit failed half way",
                    self.digest, self.meta.digest
                ),
            });
        }
        Ok(Promotable {
            epoch,
            generation: self.meta.generation,
            incarnation: self.meta.incarnation,
            device_state: self.meta.device_state.clone(),
        })
    }

    /// Records a new generation (promotion). It must be newer than the current one.
    pub fn set_generation(&mut self, generation: u64) -> Result<(), StoreError> {
        if generation <= self.meta.generation {
            return Err(StoreError::GenerationNotNewer {
                current: self.meta.generation,
                requested: generation,
            });
        }
        let meta = Meta {
            generation,
            ..self.meta.clone()
        };
        self.replace_meta(meta)?;
        Ok(())
    }

    /// Promotion: records `generation` (newer than the current one) and marks
    /// the image as no longer a committed epoch, because `memory.img` is
    /// about to become the running VM's RAM. Opening it later (this host as a
    /// backup again) then expects a full sync instead of verifying a digest
    /// the running guest has long changed. Read the device state first.
    pub fn go_live(&mut self, generation: u64) -> Result<(), StoreError> {
        if generation <= self.meta.generation {
            return Err(StoreError::GenerationNotNewer {
                current: self.meta.generation,
                requested: generation,
            });
        }
        self.begin_sync(generation, self.meta.incarnation)
    }

    /// Applies a staged epoch: a sync round straight into the image; a
    /// checkpoint atomically through the journal.
    pub fn apply(&mut self, staged: &StagedEpoch) -> Result<ApplyReport, StoreError> {
        let start = Instant::now();
        self.check_fits(staged)?;
        let mut report = ApplyReport {
            pages: staged.pages.len(),
            ..Default::default()
        };
        match staged.header.kind {
            EpochKind::SyncRound => {
                let runs = self.changed_runs(staged);
                self.write_pages(staged, &runs)?;
                if staged.header.generation > self.meta.generation {
                    self.begin_sync(staged.header.generation, self.meta.incarnation)?;
                }
            }
            EpochKind::Checkpoint => {
                // Only the pages the image does not hold already: those are
                // all the journal must redo (a stop-and-copy of an idle VM
                // into a fresh image stages every page, nearly all of them
                // zero, and journaling them cost ~0.3 s of fresh page-cache
                // pages while the guest was stopped).
                let runs = self.changed_runs(staged);
                report.journal_bytes = self.write_journal(staged, &runs)?;
                // Commit point passed: the epoch is durable in the journal
                // (a failed write leaves the image torn, not promotable;
                // a restart would redo the journal).
                self.write_pages(staged, &runs)?;
                self.commit_meta(
                    staged.header.epoch,
                    staged.header.generation,
                    staged.digest,
                    &staged.device_state,
                )?;
                // The journal stays: the next epoch overwrites it in place
                // (reusing its page-cache pages), and recovery ignores it once
                // its epoch is committed.
            }
        }
        report.apply_time = start.elapsed();
        Ok(report)
    }

    /// Re-checks a staged epoch against the image as it is now (another epoch
    /// may have been applied since it was decoded).
    fn check_fits(&self, staged: &StagedEpoch) -> Result<(), StoreError> {
        let h = &staged.header;
        let stale = |why: String| Err(StoreError::StaleStaging(why));
        if h.vm_id != self.meta.vm_id || h.ram_pages != self.meta.ram_pages {
            return stale("different VM or RAM size".into());
        }
        if h.generation < self.meta.generation {
            return stale(format!(
                "generation {} < {}",
                h.generation, self.meta.generation
            ));
        }
        match (h.kind, self.meta.status) {
            (EpochKind::SyncRound, ImageStatus::Syncing) => Ok(()),
            (EpochKind::SyncRound, _) => stale("no sync in progress".into()),
            (EpochKind::Checkpoint, ImageStatus::Empty) => stale("image never synced".into()),
            (EpochKind::Checkpoint, status) => {
                if let ImageStatus::Committed { epoch } = status
                    && h.epoch != epoch + 1
                {
                    return stale(format!("epoch {} after committed {epoch}", h.epoch));
                }
                // The decoder verified `digest` from `base_digest`; an image
                // still at that digest holds what the decoder read.
                if self.digest != staged.base_digest {
                    return stale("decoded against different image contents".into());
                }
                Ok(())
            }
        }
    }

    /// The staged pages the image must change, as runs of staged indices
    /// whose pages lie together in the image. A page whose content the
    /// image already holds (same hash: a zero page over a fresh image, an
    /// unchanged page) is in none: it is neither journaled nor written (no
    /// copy, no page-cache page, no block allocation).
    fn changed_runs(&self, staged: &StagedEpoch) -> Vec<Range<usize>> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        for (i, (&page, &hash)) in staged.pages.iter().zip(&staged.hashes).enumerate() {
            if self.hashes[page as usize] == hash {
                continue;
            }
            match runs.last_mut() {
                // Pages ascend: the run goes on if this is the next page
                // number and the next staged page.
                Some(run) if run.end == i && page == staged.pages[i - 1] + 1 => run.end += 1,
                _ => runs.push(i..i + 1),
            }
        }
        runs
    }

    /// Writes the staged pages of `runs` ([`Self::changed_runs`]) into the
    /// image. A checkpoint's digest is the one its decoder verified
    /// (`check_fits` made sure the image is the one it decoded against); a
    /// sync round's is kept page by page.
    ///
    /// Runs of at least [`WRITE_RUN_PAGES`] pages go in with one vectored
    /// write (`pwritev`) straight from where the pages are staged (the
    /// staging buffer, or the chunk a raw page arrived in); shorter ones are
    /// copied into the mapping with non-temporal stores ([`copy::streaming`](crate::copy::streaming);
    /// one fence after all runs). Through the mapping, a page not in the page
    /// cache yet costs a fault that reads (zero-fills) it before the copy
    /// overwrites it: a full sync paid that for every page.
    ///
    /// If a write fails, the pages it was writing hold unknown bytes: their
    /// recorded hash becomes one no content has, so the digest no longer
    /// matches any committed one (the image is not promotable, and the
    /// next epoch does not fit) until a resync rewrites them.
    fn write_pages(
        &mut self,
        staged: &StagedEpoch,
        runs: &[Range<usize>],
    ) -> Result<(), StoreError> {
        let checkpoint = staged.header.kind == EpochKind::Checkpoint;
        for run in runs {
            self.write_run(staged, run.clone())?;
            for i in run.clone() {
                let (page, hash) = (staged.pages[i] as usize, staged.hashes[i]);
                if !checkpoint {
                    self.digest.replace(page as u32, self.hashes[page], hash);
                }
                self.hashes[page] = hash;
            }
        }
        copy::store_fence();
        if checkpoint {
            self.digest = staged.digest;
        }
        Ok(())
    }

    /// Writes the `pages` staged pages from the `first`-th on, which follow
    /// one another in the image.
    fn write_run(&mut self, staged: &StagedEpoch, run: Range<usize>) -> Result<(), StoreError> {
        let start = staged.pages[run.start];
        let pages = run.len() as u32;
        let mut at = start as usize * PAGE_SIZE;
        if run.len() < WRITE_RUN_PAGES && self.reserved {
            for piece in staged.pieces(run) {
                copy::streaming(&mut self.mem[at..at + piece.len()], piece);
                at += piece.len();
            }
            return Ok(());
        }
        let mut slices: Vec<IoSlice<'_>> = staged.pieces(run).map(IoSlice::new).collect();
        if let Err(source) = pwrite_all_vectored(&self.file, &mut slices, at as u64) {
            for p in start..start + pages {
                self.hashes[p as usize] = UNKNOWN_CONTENT;
            }
            self.digest = ImageDigest::of_hashes(&self.hashes);
            return Err(StoreError::Io {
                action: "cannot write pages into",
                path: self.dir.join(MEMORY_FILE),
                source,
            });
        }
        Ok(())
    }

    /// Writes the journal of checkpoint `staged`: the pages of `runs`
    /// ([`Self::changed_runs`]), the device state, the digest after it.
    ///
    /// Overwritten in place, never truncated: a crash mid-write leaves a
    /// journal whose CRC or page hashes do not match, which recovery
    /// discards. A journal that fits the mapped room (every checkpoint of
    /// up to ~16k changed pages, see [`JOURNAL_ROOM_MAX`]) is copied into the
    /// mapping, its pages with non-temporal stores ([`copy::streaming`](crate::copy::streaming), as
    /// the image's are): a `write(2)` into the page cache took ~0.30 µs a
    /// page, the stores ~0.18 (10 000 pages from a source in cache; the
    /// pipeline bench's backup spent ~28 % of its time in that `write(2)`). A journal longer than the mapping (the first one
    /// past the room) is written with `writev`, growing the file; the next
    /// maps all of it. Both ways leave the same bytes in the file (a unit
    /// test compares them).
    fn write_journal(
        &mut self,
        staged: &StagedEpoch,
        runs: &[Range<usize>],
    ) -> Result<u64, StoreError> {
        let path = self.journal_path();
        let mut head = encode_journal_head(staged, runs);
        // The pages are checked by their listed hashes, not by the CRC.
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head), &staged.device_state);
        let count = runs.iter().map(Range::len).sum::<usize>();
        let lists_end = head.len();
        let pages_at = journal_pages_at(count);
        let mut trailer = [0; 8];
        trailer[..4].copy_from_slice(&crc.to_le_bytes());
        trailer[4..].copy_from_slice(&JOURNAL_END);
        let device_at = pages_at + count * PAGE_SIZE;
        let end = device_at + staged.device_state.len() + trailer.len();
        let fsync = self.options.fsync;
        let pieces = || runs.iter().flat_map(|run| staged.pieces(run.clone()));
        let journal = self.journal_file()?;
        if let JournalFile::Mapped(file, map) = journal
            && end <= map.len()
        {
            let mut at = pages_at;
            for piece in pieces() {
                copy::streaming(&mut map[at..at + piece.len()], piece);
                at += piece.len();
            }
            copy::store_fence();
            map[..lists_end].copy_from_slice(&head);
            map[lists_end..pages_at].fill(0);
            map[device_at..end - trailer.len()].copy_from_slice(&staged.device_state);
            map[end - trailer.len()..end].copy_from_slice(&trailer);
            if fsync {
                // fsync writes back the pages stored through the mapping
                // too (each was marked dirty at its first store).
                file.sync_all().map_err(io("cannot sync journal", &path))?;
            }
        } else {
            let (JournalFile::Mapped(file, _) | JournalFile::Unmapped(file)) = journal;
            head.resize(pages_at, 0);
            file.seek(SeekFrom::Start(0))
                .map_err(io("cannot write journal", &path))?;
            let mut parts: Vec<IoSlice<'_>> = std::iter::once(&head[..])
                .chain(pieces())
                .chain([&staged.device_state[..], &trailer[..]])
                .map(IoSlice::new)
                .collect();
            write_all_vectored(file, &mut parts).map_err(io("cannot write journal", &path))?;
            if fsync {
                file.sync_all().map_err(io("cannot sync journal", &path))?;
            }
            // The file now holds this journal's length: the next journal
            // maps it all.
            if matches!(journal, JournalFile::Mapped(..)) {
                self.journal = None;
            }
        }
        if fsync {
            self.sync_dir()?;
        }
        // Bytes written: the padding before the pages left out.
        Ok((end - (pages_at - lists_end)) as u64)
    }

    /// The journal file, and a mapping of all of it, at least its room,
    /// opened at the first call (and mapped again after a journal longer
    /// than the mapping grew the file). The room's blocks are reserved
    /// first (`fallocate`; an image of an older build may have a sparse
    /// journal), so a store into the mapping never meets a hole a full disk
    /// could not fill (a `SIGBUS` instead of an error); what lies past the
    /// room was written, so allocated, by the journal that grew the file.
    /// Where the room cannot be reserved (no `fallocate`, or the disk is
    /// full), the file is not mapped: journals go in with `writev`, whose
    /// errors say a disk is full.
    fn journal_file(&mut self) -> Result<&mut JournalFile, StoreError> {
        let journal = match self.journal.take() {
            Some(journal) => journal,
            None => self.open_journal()?,
        };
        Ok(self.journal.insert(journal))
    }

    fn open_journal(&self) -> Result<JournalFile, StoreError> {
        let path = self.journal_path();
        let room = self.journal_room();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("cannot open journal", &path))?;
        let len = file.metadata().map_err(io("cannot stat", &path))?.len();
        if len < room {
            file.set_len(room)
                .map_err(io("cannot size journal", &path))?;
        }
        match reserve_blocks(&file, room) {
            Ok(true) => {}
            Ok(false) => return Ok(JournalFile::Unmapped(file)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e,
                    "cannot reserve the journal's blocks: writing journals with writev");
                return Ok(JournalFile::Unmapped(file));
            }
        }
        let len = usize::try_from(len.max(room)).map_err(|e| StoreError::Io {
            action: "cannot map",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        // SAFETY: the image directory belongs to this daemon; nothing
        // truncates the journal (it only ever grows: `clear_journal`).
        let map = unsafe { MmapOptions::new().len(len).map_mut(&file) }
            .map_err(io("cannot map", &path))?;
        Ok(JournalFile::Mapped(file, map))
    }
}

/// Writes all of `bufs` at the file's position (std's `write_all_vectored`
/// is not stable yet).
fn write_all_vectored(file: &mut File, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !bufs.is_empty() {
        match file.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `bufs` at `offset` (`pwritev`, at most [`IOV_MAX`] slices a
/// call).
fn pwrite_all_vectored(
    file: &File,
    mut bufs: &mut [IoSlice<'_>],
    mut offset: u64,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    while !bufs.is_empty() {
        let count = bufs.len().min(IOV_MAX) as libc::c_int;
        let at = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix (std
        // guarantees it); the slices outlive the call; the fd is ours.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), bufs.as_ptr().cast(), count, at) };
        match n {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n if n > 0 => {
                IoSlice::advance_slices(&mut bufs, n as usize);
                offset += n as u64;
            }
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Slices one `pwritev` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Reserves the image's disk blocks without writing them (`fallocate`:
/// unwritten extents, no zeroing, no page cache), so a disk too small for the
/// image fails here, not with a SIGBUS mid-sync. Zero pages are then never
/// written at all (see `write_pages`): an idle VM's image stays mostly
/// unwritten extents. A filesystem without fallocate (EOPNOTSUPP) gets a
/// sparse file, as before the reservation existed: `Ok(false)`, and the
/// store then writes with system calls only (see [`ImageStore::reserved`]).
fn reserve_blocks(file: &File, bytes: u64) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    #[cfg(test)]
    if tests::NO_FALLOCATE.get() {
        return Ok(false);
    }
    let len = libc::off_t::try_from(bytes).map_err(std::io::Error::other)?;
    // SAFETY: fallocate on a file descriptor we own, no memory passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return Ok(false);
    }
    Err(e)
}

/// What [`warm_image`] did.
#[derive(Debug, Clone, Copy)]
pub struct Warmed {
    /// Bytes of the journal file read into the page cache.
    pub journal_bytes: u64,
    /// Bytes of the RAM file read into the page cache.
    pub bytes: u64,
    /// How long it took.
    pub took: Duration,
    /// Stopped early: `stop` was set.
    pub stopped: bool,
}

/// Brings a fresh image's journal file into the page cache, then its RAM
/// file, until both are there or `stop` is set. Run it on a thread of
/// its own, while the backup waits for its first primary
/// (`ImageStore::open` reads every page of an existing image anyway, to
/// hash it, and its journal, to recover it).
///
/// The journal ([`JOURNAL_ROOM_MAX`] at most) goes first: its pages are
/// what the first checkpoint after a sync writes (a migration's final
/// epoch, with the guest stopped), and a destination waiting for its
/// migration reads it in tens of milliseconds.
///
/// So the memory a VM of this size needs is taken before the first sync,
/// not page by page in the middle of it. On a host that hands free memory
/// back to its own hypervisor (free page reporting, as these machines do),
/// a page the kernel has not used since costs ~3.5 µs on first touch, ten
/// times the copy of its 4 KiB: a full sync of real memory into a cold
/// 256 MiB image ran at 350–400 MB/s, into a warmed one at ~1 GB/s
/// (`docs/ARCHITECTURE.md`). The pages read are the file's unwritten
/// extents, so the kernel fills them with zeros without disk I/O; they stay
/// clean (nothing to write back) and the first write to each finds it in
/// place. Under memory pressure the kernel may drop them again: only the
/// head start is lost.
///
/// Reading on while a sync runs costs more than it saves (a sync of
/// mostly-zero memory writes few pages, and the first touches slow the
/// whole machine down: 0.19 → 0.33 s for 256 MiB from cold), so the backup
/// sets `stop` when a primary says Hello. The thread runs at idle priority
/// and reads through a descriptor of its own: it shares nothing with the
/// store, and a failure changes nothing but the head start.
pub fn warm_image(journal: &Path, memory: &Path, stop: &AtomicBool) -> std::io::Result<Warmed> {
    idle_priority();
    let start = Instant::now();
    let mut buf = vec![0u8; WARM_READ];
    let (journal_bytes, stopped) = read_through(journal, &mut buf, stop)?;
    let (bytes, stopped) = if stopped {
        (0, true)
    } else {
        read_through(memory, &mut buf, stop)?
    };
    Ok(Warmed {
        journal_bytes,
        bytes,
        took: start.elapsed(),
        stopped,
    })
}

/// Puts the calling thread at idle priority (`SCHED_IDLE`): it runs only
/// when nothing else wants the CPU. For work done ahead while a daemon
/// waits ([`warm_image`]). If the kernel refuses, the thread runs at
/// normal priority: such work stops when it is no longer ahead anyway.
pub fn idle_priority() {
    // SAFETY: sets the calling thread's scheduling policy; the parameter
    // is a valid, initialised struct.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
    }
}

/// Reads `path` to its end through `buf`, or until `stop` is set: the bytes
/// read, and whether it stopped early.
fn read_through(path: &Path, buf: &mut [u8], stop: &AtomicBool) -> std::io::Result<(u64, bool)> {
    let mut file = File::open(path)?;
    let mut bytes = 0;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok((bytes, true));
        }
        match std::io::Read::read(&mut file, buf) {
            Ok(0) => return Ok((bytes, false)),
            Ok(n) => bytes += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

impl CommittedImage for ImageStore {
    fn vm_id(&self) -> &str {
        &self.meta.vm_id
    }

    fn ram_pages(&self) -> u32 {
        self.meta.ram_pages
    }

    fn generation(&self) -> u64 {
        self.meta.generation
    }

    fn next_checkpoint(&self) -> Option<u64> {
        match self.meta.status {
            ImageStatus::Committed { epoch } => Some(epoch + 1),
            // The checkpoint that completes a sync may carry any number; an
            // empty image accepts no checkpoint (see `syncing`).
            ImageStatus::Syncing | ImageStatus::Empty => None,
        }
    }

    fn syncing(&self) -> bool {
        self.meta.status == ImageStatus::Syncing
    }

    fn page(&self, page: u32) -> &Page {
        let at = page as usize * PAGE_SIZE;
        self.mem[at..at + PAGE_SIZE]
            .try_into()
            .unwrap_or_else(|_| unreachable!("a page slice is PAGE_SIZE bytes"))
    }

    fn page_hash(&self, page: u32) -> PageHash {
        self.hashes[page as usize]
    }

    fn digest(&self) -> ImageDigest {
        self.digest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epoch::{EpochHeader, Slot};
    use understudy_bench::full_disk;

    thread_local! {
        /// Set: [`reserve_blocks`] answers as on a filesystem without
        /// `fallocate` (on this test's thread only).
        pub(super) static NO_FALLOCATE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A checkpoint of `pages`, each filled with its page number plus
    /// `epoch` (so two epochs' journals differ in every page).
    fn staged(epoch: u64, pages: &[u32]) -> StagedEpoch {
        let fill = |p: u32| [(p as u64 + epoch) as u8; PAGE_SIZE];
        StagedEpoch {
            header: EpochHeader {
                vm_id: "vm".into(),
                generation: 2,
                epoch,
                ram_pages: 16,
                kind: EpochKind::Checkpoint,
            },
            pages: pages.to_vec(),
            slots: (0..pages.len() as u32).map(Slot::Staged).collect(),
            data: pages.iter().flat_map(|&p| fill(p)).collect(),
            wire: Vec::new(),
            hashes: pages.iter().map(|&p| page_hash(&fill(p))).collect(),
            device_state: b"device".to_vec(),
            digest: ImageDigest(0xabc),
            base_digest: ImageDigest(0),
            wire_bytes: 0,
        }
    }

    /// Every staged page of `s` as one run (for the journal).
    #[allow(clippy::single_range_in_vec_init)] // one run, not a list of indices
    fn every_page(s: &StagedEpoch) -> [Range<usize>; 1] {
        [0..s.pages.len()]
    }

    /// The journal `write_journal` writes for `s`, every page journaled,
    /// into the journal of an image of `ram_pages` pages.
    fn journal_bytes_in(s: &StagedEpoch, ram_pages: u64) -> Vec<u8> {
        journal_bytes_with(s, ram_pages, StoreOptions::default())
    }

    /// A fresh image of `ram_pages` pages in `dir`.
    fn image_in(dir: &Path, ram_pages: u64, options: StoreOptions) -> ImageStore {
        ImageStore::create(
            &dir.join("img"),
            "vm",
            ram_pages * PAGE_SIZE as u64,
            options,
        )
        .unwrap()
    }

    /// The same, with `options` (fsync or not).
    fn journal_bytes_with(s: &StagedEpoch, ram_pages: u64, options: StoreOptions) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let mut store = image_in(dir.path(), ram_pages, options);
        let written = store.write_journal(s, &every_page(s)).unwrap();
        let count = s.pages.len();
        let lists_end = JOURNAL_HEAD_LEN + 20 * count;
        let len = journal_pages_at(count) + count * PAGE_SIZE + s.device_state.len() + 8;
        assert_eq!(
            written as usize,
            len - (journal_pages_at(count) - lists_end)
        );
        let mut bytes = fs::read(store.journal_path()).unwrap();
        // Its room past the journal's end stays zero.
        assert!(bytes[len..].iter().all(|&b| b == 0));
        bytes.truncate(len);
        bytes
    }

    /// The journal `write_journal` writes for `s` into a 16-page image.
    fn journal_bytes(s: &StagedEpoch) -> Vec<u8> {
        journal_bytes_in(s, 16)
    }

    /// The journal a version 2 build wrote for `s`: the pages right after
    /// the hashes.
    fn journal_v2_bytes(s: &StagedEpoch) -> Vec<u8> {
        let mut bytes = encode_journal_head(s, &every_page(s));
        bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes), &s.device_state);
        for piece in s.pieces(0..s.pages.len()) {
            bytes.extend_from_slice(piece);
        }
        bytes.extend_from_slice(&s.device_state);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes.extend_from_slice(&JOURNAL_END);
        bytes
    }

    /// The journal a version 1 build wrote for `s`: no hashes, one CRC over
    /// everything.
    fn journal_v1_bytes(s: &StagedEpoch) -> Vec<u8> {
        let mut bytes = encode_journal_head(s, &every_page(s));
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        bytes.truncate(JOURNAL_HEAD_LEN + 4 * s.pages.len());
        for piece in s.pieces(0..s.pages.len()) {
            bytes.extend_from_slice(piece);
        }
        bytes.extend_from_slice(&s.device_state);
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes.extend_from_slice(&JOURNAL_END);
        bytes
    }

    #[test]
    fn a_version_1_record_is_read_as_an_unknown_incarnation_not_retired() {
        let meta = Meta {
            vm_id: "vm".into(),
            ram_pages: 16,
            generation: 3,
            status: ImageStatus::Committed { epoch: 9 },
            digest: ImageDigest(5),
            device_state: b"dev".to_vec(),
            incarnation: 0,
            retired: false,
        };
        // Version 1 wrote everything up to the device state.
        let v2 = meta.encode();
        let mut v1 = v2[..v2.len() - 4 - 9].to_vec();
        v1[4..8].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(Meta::decode(&v1, Path::new("meta")).unwrap(), meta);
        let v2_meta = Meta {
            incarnation: 77,
            retired: true,
            ..meta
        };
        assert_eq!(
            Meta::decode(&v2_meta.encode(), Path::new("meta")).unwrap(),
            v2_meta
        );
        let mut v3 = v2_meta.encode();
        v3[4..8].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            Meta::decode(&v3, Path::new("meta")),
            Err(StoreError::UnsupportedVersion { found: 3 })
        ));
    }

    /// A sync round of `pages` whose content is `fill` (all bytes), sent
    /// raw: the pages are in a received chunk, each after its one-byte codec
    /// tag, as the decoder leaves them.
    fn sync_round(pages: std::ops::Range<u32>, fill: u8) -> StagedEpoch {
        let pages: Vec<u32> = pages.collect();
        let page = [fill; PAGE_SIZE];
        let chunk: Vec<u8> = pages
            .iter()
            .flat_map(|_| std::iter::once(0xee).chain(page))
            .collect();
        StagedEpoch {
            header: EpochHeader {
                vm_id: "vm".into(),
                generation: 2,
                epoch: 1,
                ram_pages: 64,
                kind: EpochKind::SyncRound,
            },
            slots: (0..pages.len())
                .map(|i| Slot::Wire {
                    chunk: 0,
                    at: (i * (PAGE_SIZE + 1) + 1) as u32,
                })
                .collect(),
            hashes: vec![page_hash(&page); pages.len()],
            pages,
            data: Vec::new(),
            wire: vec![chunk.into()],
            device_state: Vec::new(),
            digest: ImageDigest(0),
            base_digest: ImageDigest(0),
            wire_bytes: 0,
        }
    }

    /// A new image of 64 pages in `dir`: its path and the store.
    fn image_of_64_pages(dir: &Path) -> (PathBuf, ImageStore) {
        let img = dir.join("img");
        let store =
            ImageStore::create(&img, "vm", 64 * PAGE_SIZE as u64, Default::default()).unwrap();
        (img, store)
    }

    #[test]
    fn long_runs_are_written_through_the_file_and_a_failed_write_is_rewritten_by_the_next_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (img, mut store) = image_of_64_pages(dir.path());
        store.begin_sync(2, 7).unwrap();
        // 32 pages in a row (a pwrite) and 3 (copied into the mapping).
        store.apply(&sync_round(0..32, 0x11)).unwrap();
        store.apply(&sync_round(40..43, 0x22)).unwrap();
        assert!(store.memory()[..32 * PAGE_SIZE].iter().all(|&b| b == 0x11));
        assert!(
            store.memory()[40 * PAGE_SIZE..43 * PAGE_SIZE]
                .iter()
                .all(|&b| b == 0x22)
        );
        assert!(
            store.memory()[32 * PAGE_SIZE..40 * PAGE_SIZE]
                .iter()
                .all(|&b| b == 0)
        );
        // A write that fails (here: the file is read-only) leaves its pages
        // unknown: the digest matches nothing, and the next sync writes them.
        // Sent again, the same round must land: had the failed pages kept the
        // new hash, it would be skipped as "already there" and the image
        // would hold the old bytes under the new hash.
        let writable =
            std::mem::replace(&mut store.file, File::open(img.join(MEMORY_FILE)).unwrap());
        let before = store.digest;
        let err = store.apply(&sync_round(0..32, 0x33)).unwrap_err();
        assert!(err.to_string().contains("cannot write pages into"), "{err}");
        assert!(store.hashes[..32].iter().all(|&h| h == UNKNOWN_CONTENT));
        assert_ne!(store.digest, before);
        store.file = writable;
        store.apply(&sync_round(0..32, 0x33)).unwrap();
        assert!(store.memory()[..32 * PAGE_SIZE].iter().all(|&b| b == 0x33));
        assert_eq!(store.digest, ImageDigest::of_hashes(&store.hashes));
        // And the content it held before comes back the same way.
        store.apply(&sync_round(0..32, 0x11)).unwrap();
        assert!(store.memory()[..32 * PAGE_SIZE].iter().all(|&b| b == 0x11));
        assert_eq!(store.digest, before);
    }

    #[test]
    fn an_image_holds_only_zeros_until_a_page_with_content_lands() {
        let dir = tempfile::tempdir().unwrap();
        let (img, mut store) = image_of_64_pages(dir.path());
        assert!(store.holds_only_zeros(), "created");
        store.begin_sync(2, 7).unwrap();
        store.apply(&sync_round(5..6, 0x11)).unwrap();
        assert!(!store.holds_only_zeros(), "page 5 written");
        assert!(!store.page_is_zero(5) && store.page_is_zero(4) && store.page_is_zero(63));
        assert!(!store.page_is_zero(64), "beyond the image");
        store.apply(&sync_round(5..6, 0)).unwrap();
        assert!(store.holds_only_zeros(), "page 5 zero again");
        assert!(store.page_is_zero(5));
        // Reopened, it hashes its pages: still all zero.
        drop(store);
        let (mut store, _) = ImageStore::open(&img, Default::default()).unwrap();
        assert!(store.holds_only_zeros(), "reopened");
        // A write that fails leaves its pages' content unknown.
        let writable =
            std::mem::replace(&mut store.file, File::open(img.join(MEMORY_FILE)).unwrap());
        store.apply(&sync_round(0..32, 0x22)).unwrap_err();
        assert!(!store.holds_only_zeros(), "after a failed write");
        store.file = writable;
    }

    #[test]
    fn a_created_image_knows_its_hashes_without_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        let (img, created) = image_of_64_pages(dir.path());
        let (opened, _) = ImageStore::open(&img, Default::default()).unwrap();
        assert_eq!(created.hashes, opened.hashes);
        assert_eq!(created.digest, opened.digest);
        assert_eq!(created.digest, ImageDigest::of_zero_image(64));
    }

    #[test]
    fn journal_round_trips_even_over_a_longer_stale_journal() {
        for (version, encode) in [
            (3, journal_bytes as fn(&StagedEpoch) -> Vec<u8>),
            (2, journal_v2_bytes),
            (1, journal_v1_bytes),
        ] {
            let long = encode(&staged(4, &[1, 2, 3, 4, 5]));
            let short = encode(&staged(5, &[9]));
            let mut reused = long.clone();
            reused[..short.len()].copy_from_slice(&short);
            let j = decode_journal(&reused, 16).unwrap();
            assert_eq!((j.epoch, j.generation, j.pages.clone()), (5, 2, vec![9]));
            assert_eq!(j.data, vec![14u8; PAGE_SIZE]);
            assert_eq!(j.device_state, b"device");
            assert_eq!(j.digest, ImageDigest(0xabc));
            // Cut anywhere, the journal is not taken for complete.
            for cut in [0, 10, JOURNAL_HEAD_LEN, short.len() - 1] {
                assert!(
                    decode_journal(&short[..cut], 16).is_none(),
                    "version {version} cut at {cut}"
                );
            }
            // A new header over an old body (crash mid-write): the old
            // pages fail the new hashes (versions 2, 3) or the CRC (version 1).
            let new = encode(&staged(5, &[1, 2, 3, 4, 5]));
            let head = match version {
                3 => journal_pages_at(5),
                2 => JOURNAL_HEAD_LEN + 20 * 5,
                _ => JOURNAL_HEAD_LEN + 4 * 5,
            };
            let mut torn = long.clone();
            torn[..head].copy_from_slice(&new[..head]);
            assert!(decode_journal(&torn, 16).is_none(), "version {version}");
            // Every page but one new, and the trailer new: still refused.
            let mut torn = new.clone();
            let third = head + 2 * PAGE_SIZE;
            torn[third..third + PAGE_SIZE].copy_from_slice(&long[third..third + PAGE_SIZE]);
            assert!(decode_journal(&torn, 16).is_none(), "version {version}");
            assert!(decode_journal(&new, 16).is_some(), "version {version}");
            // Pages outside RAM are refused.
            assert!(decode_journal(&encode(&staged(5, &[16])), 16).is_none());
        }
    }

    #[test]
    fn a_journal_copied_into_its_mapping_is_the_one_writev_writes() {
        // 15 pages: a journal 14 bytes longer than a 16-page image's room
        // (written with writev), inside a 64-page image's (mapped).
        let s = staged(4, &(0..15).collect::<Vec<_>>());
        let written = journal_bytes_in(&s, 16);
        assert_eq!(written.len(), 16 * PAGE_SIZE + 14);
        let mapped = journal_bytes_in(&s, 64);
        assert!(written == mapped, "the two ways write different journals");
        // Both ways with fsync (the file synced after the copy).
        let fsync = StoreOptions { fsync: true };
        assert!(journal_bytes_with(&s, 16, fsync) == mapped, "writev, fsync");
        assert!(journal_bytes_with(&s, 64, fsync) == mapped, "mapped, fsync");
        // The file grown by the longer journal is mapped whole after it.
        let dir = tempfile::tempdir().unwrap();
        let mut small = image_in(dir.path(), 16, Default::default());
        small.write_journal(&s, &every_page(&s)).unwrap();
        assert!(
            small.journal.is_none(),
            "written with writev, mapping dropped"
        );
        small.write_journal(&s, &every_page(&s)).unwrap();
        let map_len = match &small.journal {
            Some(JournalFile::Mapped(_, map)) => Some(map.len()),
            _ => None,
        };
        assert_eq!(map_len, Some(mapped.len()), "mapped whole");
        let bytes = fs::read(small.journal_path()).unwrap();
        assert!(bytes == mapped, "the grown file's journal, mapped");
        let j = decode_journal(&mapped, 16).unwrap();
        assert_eq!(j.pages, s.pages);
        assert_eq!(j.data, s.data);
        // The mapped journal written over a longer one, and again over its
        // own bytes: the same journal each time (the padding rezeroed).
        let dir = tempfile::tempdir().unwrap();
        let mut store = image_in(dir.path(), 64, Default::default());
        let long = staged(3, &(0..40).collect::<Vec<_>>());
        store.write_journal(&long, &every_page(&long)).unwrap();
        store.write_journal(&s, &every_page(&s)).unwrap();
        let bytes = fs::read(store.journal_path()).unwrap();
        assert!(bytes[..mapped.len()] == mapped[..], "over a longer journal");
        use std::os::unix::fs::FileExt;
        let file = File::options()
            .write(true)
            .open(store.journal_path())
            .unwrap();
        file.write_all_at(&vec![0xa5; 64 * PAGE_SIZE], 0).unwrap();
        store.write_journal(&s, &every_page(&s)).unwrap();
        let bytes = fs::read(store.journal_path()).unwrap();
        assert!(bytes[..mapped.len()] == mapped[..], "over other bytes");
    }

    /// A checkpoint of a 64-page image (`sync_round`'s) that sets `pages`
    /// to `fill`, staged against `store` as it is now.
    fn checkpoint_over(store: &ImageStore, epoch: u64, pages: Range<u32>, fill: u8) -> StagedEpoch {
        let page = [fill; PAGE_SIZE];
        let pages: Vec<u32> = pages.collect();
        let mut hashes = store.hashes.clone();
        for &p in &pages {
            hashes[p as usize] = page_hash(&page);
        }
        StagedEpoch {
            header: EpochHeader {
                vm_id: "vm".into(),
                generation: 2,
                epoch,
                ram_pages: 64,
                kind: EpochKind::Checkpoint,
            },
            slots: (0..pages.len() as u32).map(Slot::Staged).collect(),
            data: pages.iter().flat_map(|_| page).collect(),
            wire: Vec::new(),
            hashes: vec![page_hash(&page); pages.len()],
            pages,
            device_state: vec![epoch as u8; 100],
            digest: ImageDigest::of_hashes(&hashes),
            base_digest: store.digest,
            wire_bytes: 0,
        }
    }

    /// Where `fallocate` is missing, nothing is mapped for writing: every
    /// page and journal goes in with a system call, and the image, its
    /// journal and a recovery from it come out as they do through the
    /// mappings.
    #[test]
    fn without_fallocate_the_store_writes_the_same_image_and_journal_with_system_calls() {
        let run = |no_fallocate: bool| {
            NO_FALLOCATE.set(no_fallocate);
            let dir = tempfile::tempdir().unwrap();
            let mut store = image_in(dir.path(), 64, Default::default());
            assert_eq!(store.reserved, !no_fallocate);
            store.begin_sync(2, 7).unwrap();
            // A long run (pwritev either way) and a short one (through the
            // mapping, or pwrite without fallocate).
            store.apply(&sync_round(0..32, 0x11)).unwrap();
            store.apply(&sync_round(40..43, 0x22)).unwrap();
            let first = checkpoint_over(&store, 1, 2..5, 0x33);
            store.apply(&first).unwrap();
            let mapped = matches!(store.journal, Some(JournalFile::Mapped(..)));
            assert_eq!(mapped, !no_fallocate, "journal mapped");
            // A journal left behind by a crash right after its commit point
            // is redone at the next open (pwrite without fallocate).
            let second = checkpoint_over(&store, 2, 10..20, 0x44);
            let runs = store.changed_runs(&second);
            store.write_journal(&second, &runs).unwrap();
            let journal = fs::read(store.journal_path()).unwrap();
            drop(store);
            let (store, recovery) =
                ImageStore::open(&dir.path().join("img"), Default::default()).unwrap();
            assert_eq!(recovery, Recovery::Replayed { epoch: 2 });
            assert_eq!(store.reserved, !no_fallocate);
            NO_FALLOCATE.set(false);
            (store.memory().to_vec(), journal, store.digest)
        };
        let (memory, journal, digest) = run(false);
        let (memory_without, journal_without, digest_without) = run(true);
        assert!(memory == memory_without, "the images differ");
        assert!(journal == journal_without, "the journals differ");
        assert_eq!(digest, digest_without);
        assert!(
            memory[10 * PAGE_SIZE..20 * PAGE_SIZE]
                .iter()
                .all(|&b| b == 0x44)
        );
    }

    /// A disk that fills up under the image: with the blocks reserved,
    /// checkpoints whose journal fits the reserved room still commit and
    /// one past it fails cleanly; without (no `fallocate`), a page or a
    /// journal that meets the full disk is an error (a store through a
    /// mapping would have been a `SIGBUS`, killing the process). Either
    /// way the committed image stays as it was and opens. Runs
    /// [`full_disk_child`] in a mount namespace of its own, on a 1 MiB
    /// tmpfs (needs root, as CI has).
    #[test]
    fn a_full_disk_is_an_error_never_a_crash_and_never_damages_the_committed_image() {
        full_disk::run_child_on_tmpfs("store::tests::full_disk_child", "1m");
    }

    /// The child of the full-disk test, in its own mount namespace with a
    /// 1 MiB tmpfs.
    #[test]
    #[ignore = "run by a_full_disk_is_an_error_never_a_crash_and_never_damages_the_committed_image"]
    fn full_disk_child() {
        let root = full_disk::child_dir();
        let img = root.join("img");
        let reopen = || ImageStore::open(&img, Default::default()).unwrap().0;
        let no_space = |e: StoreError| match &e {
            StoreError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {}
            _ => panic!("not a full disk: {e:?}"),
        };
        // `checkpoint` refused for the full disk; the last epoch and its
        // image (`committed`, read while there was room: on tmpfs even a
        // read through a shared mapping allocates a hole's page) kept, in
        // the store and once it is opened again.
        let refused_and_kept =
            |mut store: ImageStore, checkpoint: &StagedEpoch, committed: &[u8]| {
                let last = store.committed_epoch();
                no_space(store.apply(checkpoint).unwrap_err());
                assert_eq!(store.committed_epoch(), last);
                assert!(store.memory() == committed, "the image changed");
                drop(store);
                let store = reopen();
                assert_eq!(store.committed_epoch(), last);
                assert!(store.memory() == committed, "the image reopened changed");
            };
        // A sync round and checkpoint 1 into a fresh image.
        let synced = |store: &mut ImageStore| {
            store.begin_sync(2, 7).unwrap();
            store.apply(&sync_round(0..32, 0x11)).unwrap();
            store.apply(&sync_round(40..43, 0x22)).unwrap();
            let first = checkpoint_over(store, 1, 2..5, 0x33);
            store.apply(&first).unwrap();
        };
        // A checkpoint whose device state (40 KiB) is larger than any
        // before: past the record's first slots (16 KiB).
        let large = |store: &ImageStore, epoch: u64| {
            let mut large = checkpoint_over(store, epoch, 2..5, epoch as u8);
            large.device_state = vec![0x42; 40 << 10];
            large
        };

        // Reserved: 64 pages of image, 64 of journal room, and the record's
        // room for the large device state, then a full disk.
        let mut store = image_in(&root, 64, Default::default());
        assert!(store.reserved);
        store.reserve_record(40 << 10).unwrap();
        full_disk::fill_up(&root);
        synced(&mut store);
        let large_one = large(&store, 2);
        store.apply(&large_one).unwrap();
        // Every page changed: a journal one header longer than its room.
        let all = checkpoint_over(&store, 3, 0..64, 0x55);
        let committed = store.memory().to_vec();
        refused_and_kept(store, &all, &committed);
        fs::remove_dir_all(&img).unwrap();
        fs::remove_file(root.join("filler")).unwrap();

        // Without that room (the limit `reserve_record` is for): the large
        // record is rewritten into a new file, which fails after the
        // journal. The epoch is committed (the journal is whole); the store
        // says its image is torn until it is opened again, which redoes it.
        let mut store = image_in(&root, 64, Default::default());
        full_disk::fill_up(&root);
        synced(&mut store);
        let large_one = large(&store, 2);
        no_space(store.apply(&large_one).unwrap_err());
        assert!(matches!(store.promotable(), Err(StoreError::Torn { .. })));
        drop(store);
        fs::remove_file(root.join("filler")).unwrap();
        let (store, recovery) = ImageStore::open(&img, Default::default()).unwrap();
        assert_eq!(recovery, Recovery::Replayed { epoch: 2 });
        assert_eq!(
            store.promotable().unwrap().device_state,
            large_one.device_state
        );
        drop(store);
        fs::remove_dir_all(&img).unwrap();

        // Not reserved: a sparse image and journal on a full disk.
        NO_FALLOCATE.set(true);
        let mut store = image_in(&root, 64, Default::default());
        assert!(!store.reserved);
        full_disk::fill_up(&root);
        store.begin_sync(2, 7).unwrap();
        // A short run (once through the mapping: a SIGBUS) and a long one.
        no_space(store.apply(&sync_round(40..43, 0x22)).unwrap_err());
        no_space(store.apply(&sync_round(0..32, 0x11)).unwrap_err());
        // Room again: the same rounds land.
        fs::remove_file(root.join("filler")).unwrap();
        store.apply(&sync_round(0..32, 0x11)).unwrap();
        store.apply(&sync_round(40..43, 0x22)).unwrap();
        let first = checkpoint_over(&store, 1, 2..5, 0x33);
        store.apply(&first).unwrap();
        let committed = store.memory().to_vec();
        full_disk::fill_up(&root);
        let second = checkpoint_over(&store, 2, 8..40, 0x66);
        refused_and_kept(store, &second, &committed);
        NO_FALLOCATE.set(false);
    }

    #[test]
    fn any_flipped_bit_in_a_journal_is_refused() {
        let bytes = journal_bytes(&staged(3, &[0, 7]));
        assert!(decode_journal(&bytes, 16).is_some());
        let mut bad = bytes.clone();
        let padding = JOURNAL_HEAD_LEN + 2 * 20..journal_pages_at(2);
        for at in (0..bytes.len()).step_by(61).chain([bytes.len() - 1]) {
            if padding.contains(&at) {
                // The padding before the pages is not checked (nothing reads it).
                continue;
            }
            bad[at] ^= 0x10;
            assert!(decode_journal(&bad, 16).is_none(), "flip at byte {at}");
            bad[at] ^= 0x10;
        }
    }

    /// Pages of `path` resident in the page cache (`mincore` over a mapping).
    fn resident_pages(path: &Path) -> usize {
        let file = File::open(path).unwrap();
        // SAFETY: a private read-only mapping of a file nothing truncates
        // during the test; only its residency is asked.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let mut vec = vec![0u8; map.len().div_ceil(PAGE_SIZE)];
        // SAFETY: `vec` has one byte per page of the mapping.
        let rc = unsafe { libc::mincore(map.as_ptr() as *mut _, map.len(), vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    #[test]
    fn opening_an_image_without_a_journal_reads_only_the_journal_files_magic() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let ram = 4096 * PAGE_SIZE as u64;
        let journal = ImageStore::create(&img, "vm", ram, Default::default())
            .unwrap()
            .journal_path();
        // The journal's room (16 MiB here) is kept, empty: only the page of
        // its zero magic is in the page cache.
        assert_eq!(fs::metadata(&journal).unwrap().len(), ram);
        assert_eq!(resident_pages(&journal), 1);
        let (_store, recovery) = ImageStore::open(&img, Default::default()).unwrap();
        assert!(matches!(recovery, Recovery::Clean));
        // Reading the whole file to find that out (a 64 MiB VM's image was
        // open 77–104 ms after a switchover's end instead of 10–14) is what
        // this holds against; a little read-ahead is the kernel's business.
        let resident = resident_pages(&journal);
        assert!(
            resident < 4096 / 10,
            "{resident} of 4096 journal pages read"
        );
    }

    #[test]
    fn journal_if_any_reads_a_journal_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        assert!(journal_if_any(&path).unwrap().is_empty(), "missing");
        fs::write(&path, b"US").unwrap();
        assert!(
            journal_if_any(&path).unwrap().is_empty(),
            "shorter than a magic"
        );
        fs::write(&path, [0, 0, 0, 0, 9, 9, 9]).unwrap();
        assert!(journal_if_any(&path).unwrap().is_empty(), "emptied");
        let mut bytes = JOURNAL_MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 2, 3]);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(journal_if_any(&path).unwrap(), bytes, "a journal, whole");
    }

    #[test]
    fn warming_a_fresh_image_brings_all_of_it_into_the_page_cache_unless_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let ram = 4096 * PAGE_SIZE as u64;
        let store = ImageStore::create(&img, "vm", ram, Default::default()).unwrap();
        let (journal, memory) = (store.journal_path(), store.memory_path());
        // The journal has its room (the RAM's size, here under the cap),
        // none of it in the page cache yet but the page of its (zero) magic.
        assert_eq!(fs::metadata(&journal).unwrap().len(), ram);
        assert_eq!(resident_pages(&journal), 1);
        // Stopped: nothing is read.
        let stop = AtomicBool::new(true);
        let stopped = warm_image(&journal, &memory, &stop).unwrap();
        assert!(stopped.stopped);
        assert_eq!((stopped.journal_bytes, stopped.bytes), (0, 0));
        assert_eq!(resident_pages(&journal), 1);
        assert_eq!(resident_pages(&memory), 0);
        stop.store(false, Ordering::Relaxed);
        let warmed = warm_image(&journal, &memory, &stop).unwrap();
        assert_eq!(warmed.journal_bytes, ram);
        assert_eq!(resident_pages(&journal), 4096);
        assert!(!warmed.stopped);
        assert_eq!(warmed.bytes, ram);
        assert_eq!(resident_pages(&memory), 4096);
        // Reading changed nothing: still a zero image, and nothing dirty.
        assert!(store.memory().iter().all(|&b| b == 0));
        let (reopened, recovery) = ImageStore::open(&img, Default::default()).unwrap();
        assert_eq!(reopened.digest, ImageDigest::of_zero_image(4096));
        assert!(matches!(recovery, Recovery::Clean));
    }
}
