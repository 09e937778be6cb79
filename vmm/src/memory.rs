//! Guest RAM: one contiguous region at guest-physical address 0, mapped with
//! `memmap2` (anonymous, or a file mapped shared or private) and wrapped in a
//! vm-memory `GuestMemoryMmap` whose `AtomicBitmap` records every page the VMM
//! writes through the `Bytes` API.
//!
//! This module owns the mapping and the VMM-side dirty bitmap. It does not know
//! about KVM's dirty log (see `vm.rs`, which merges the two) or about snapshots.
//! The VMM never writes guest RAM through raw pointers: every write goes through
//! [`GuestRam::write_at`] or [`GuestRam::memory`] so that it is marked dirty.

use std::fs::File;
use std::io::Write;
use std::num::NonZeroUsize;

use memmap2::{MmapMut, MmapOptions};
use vm_memory::bitmap::{AtomicBitmap, BS};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
    VolatileSlice, WriteVolatile,
};

use crate::dirty::DirtyBitmap;

/// Size of a guest page, the unit of dirty tracking.
pub const PAGE_SIZE: usize = 4096;

/// Largest guest RAM supported: RAM sits below the 32-bit MMIO hole, and the
/// boot page tables map the first 4 GiB.
pub const MAX_RAM_BYTES: usize = 3 << 30;
/// Smallest guest RAM: the built-in guests use the first 8 MiB.
pub const MIN_RAM_BYTES: usize = 8 << 20;

/// Errors from creating or accessing guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A RAM size outside the supported range, or not whole pages.
    #[error(
        "guest RAM of {bytes} bytes is not supported: use a multiple of 4 KiB between {} MiB and {} MiB",
        MIN_RAM_BYTES >> 20,
        MAX_RAM_BYTES >> 20
    )]
    BadSize {
        /// The size asked for.
        bytes: usize,
    },
    /// mmap failed.
    #[error("cannot map {bytes} bytes of guest RAM")]
    Map {
        /// The size asked for.
        bytes: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A staging buffer could not grow.
    #[error("cannot map {bytes} bytes for staging pages copied out of guest RAM")]
    Staging {
        /// The size asked for.
        bytes: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A RAM file of the wrong size.
    #[error("RAM file holds {actual} bytes but the VM needs {expected}")]
    FileSize {
        /// The VM's RAM.
        expected: u64,
        /// The file's size.
        actual: u64,
    },
    /// The RAM file's size cannot be read.
    #[error("cannot read the RAM file's size")]
    FileMetadata(#[source] std::io::Error),
    /// vm-memory refused the region.
    #[error("cannot describe guest RAM to vm-memory: {0}")]
    Region(String),
    /// An access beyond guest RAM.
    #[error("guest access of {len} bytes at gpa {gpa:#x} is outside guest RAM")]
    OutOfRange {
        /// The guest-physical address.
        gpa: u64,
        /// The access's length.
        len: usize,
    },
    /// Writing RAM out to a file failed.
    #[error("cannot write guest RAM to a file")]
    Dump(#[source] std::io::Error),
    /// `madvise` refused to fault pages in or drop them.
    #[error("cannot {what} {pages} pages of guest RAM")]
    Advise {
        /// "fault in" or "drop".
        what: &'static str,
        /// How many pages.
        pages: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How guest RAM is backed.
#[derive(Debug)]
pub enum RamBacking {
    /// Fresh zeroed anonymous memory.
    Anonymous,
    /// A file mapped `MAP_SHARED`: guest writes land in the file. The backup maps
    /// its committed image this way on promotion, so promotion copies nothing.
    SharedFile(File),
    /// A file mapped `MAP_PRIVATE`: the file is the starting content, guest
    /// writes stay in this process (copy-on-write).
    PrivateFile(File),
}

/// The guest's RAM.
pub struct GuestRam {
    // Field order matters: `memory` holds a raw pointer into `_mapping` and must
    // be dropped first.
    memory: GuestMemoryMmap<AtomicBitmap>,
    _mapping: MmapMut,
    size: usize,
    /// Anonymous memory: a page never touched is zero (see `untouched_pages`).
    anonymous: bool,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("size", &self.size)
            .finish()
    }
}

/// Checks that `bytes` is a usable guest RAM size.
pub fn validate_ram_size(bytes: usize) -> Result<(), MemoryError> {
    if bytes % PAGE_SIZE != 0 || !(MIN_RAM_BYTES..=MAX_RAM_BYTES).contains(&bytes) {
        return Err(MemoryError::BadSize { bytes });
    }
    Ok(())
}

impl GuestRam {
    /// Maps `size` bytes of guest RAM with the given backing.
    pub fn new(size: usize, backing: RamBacking) -> Result<Self, MemoryError> {
        validate_ram_size(size)?;
        let map_err = |source| MemoryError::Map {
            bytes: size,
            source,
        };
        let check_file = |file: &File| -> Result<(), MemoryError> {
            let actual = file.metadata().map_err(MemoryError::FileMetadata)?.len();
            if actual != size as u64 {
                return Err(MemoryError::FileSize {
                    expected: size as u64,
                    actual,
                });
            }
            Ok(())
        };
        let anonymous = matches!(backing, RamBacking::Anonymous);
        let mut mapping = match backing {
            RamBacking::Anonymous => MmapOptions::new().len(size).map_anon().map_err(map_err)?,
            RamBacking::SharedFile(file) => {
                check_file(&file)?;
                // SAFETY: the file is ours (an image or snapshot directory this
                // daemon owns); a concurrent truncation by another process would
                // fault the guest, which is the documented contract of the image.
                unsafe { MmapOptions::new().len(size).map_mut(&file) }.map_err(map_err)?
            }
            RamBacking::PrivateFile(file) => {
                check_file(&file)?;
                // SAFETY: as above; MAP_PRIVATE keeps guest writes out of the file.
                unsafe { MmapOptions::new().len(size).map_copy(&file) }.map_err(map_err)?
            }
        };
        let host = mapping.as_mut_ptr();
        let bitmap = AtomicBitmap::new(size, NonZeroUsize::MIN.saturating_add(PAGE_SIZE - 1));
        // SAFETY: `host..host + size` is the mapping we just made; it stays
        // mapped for as long as `memory` lives because both are owned by the
        // returned `GuestRam`, which drops `memory` first.
        let region = unsafe {
            vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(size, bitmap)
                .with_raw_mmap_pointer(host)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED)
                .build()
        }
        .map_err(|e| MemoryError::Region(e.to_string()))?;
        let region: MmapRegion<AtomicBitmap> = region;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| MemoryError::Region("region does not fit the address space".into()))?;
        let memory = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| MemoryError::Region(e.to_string()))?;
        Ok(Self {
            memory,
            _mapping: mapping,
            size,
            anonymous,
        })
    }

    /// Whether the RAM is anonymous memory (not mapped from a file).
    pub fn is_anonymous(&self) -> bool {
        self.anonymous
    }

    /// Asks for transparent huge pages for anonymous RAM, as QEMU does for
    /// its guest RAM: fewer TLB misses for the guest and the checkpoint
    /// copy, and the kernel write-protects a large folio's pages in batches
    /// (the copy after the resume protected 10k dirty pages in 0.86 ms on
    /// 4 KiB pages, 0.17 ms on huge ones: docs/ARCHITECTURE.md). Only a
    /// hint, ignored for file-backed RAM and on a kernel without THP.
    ///
    /// Not for RAM that post-copy fills page by page before registering it
    /// for missing-page faults: writing one page of a huge page makes its
    /// 511 neighbours present (zero), and a present page never faults, so
    /// the guest would read zeros where the source's pages belong.
    pub fn advise_huge_pages(&self) {
        if !self.anonymous {
            return;
        }
        // SAFETY: advice on our own mapping; it changes no content.
        let rc = unsafe {
            libc::madvise(
                self._mapping.as_ptr().cast_mut().cast(),
                self.size,
                libc::MADV_HUGEPAGE,
            )
        };
        if rc != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "guest RAM without transparent huge pages"
            );
        }
    }

    /// Faults pages `first..first + count` of anonymous RAM in, writable,
    /// as a first write would, without changing what they read (zero, or
    /// what was written before). Done ahead, it takes the cost of the first
    /// touch off a later copy into fresh RAM: on a host that takes free
    /// memory back from this machine, most of that copy's time
    /// (docs/ARCHITECTURE.md, "The replica's RAM faulted in ahead").
    /// A no-op for file-backed RAM.
    pub fn populate(&self, first: usize, count: usize) -> Result<(), MemoryError> {
        self.advise(first, count, libc::MADV_POPULATE_WRITE, "fault in")
    }

    /// Drops pages `first..first + count` of anonymous RAM: they read as
    /// zero and count as never touched again ([`Self::untouched_pages`]).
    /// A no-op for file-backed RAM.
    pub fn discard(&self, first: usize, count: usize) -> Result<(), MemoryError> {
        self.advise(first, count, libc::MADV_DONTNEED, "drop")
    }

    fn advise(
        &self,
        first: usize,
        count: usize,
        advice: libc::c_int,
        what: &'static str,
    ) -> Result<(), MemoryError> {
        if first
            .checked_add(count)
            .is_none_or(|end| end > self.pages())
        {
            return Err(MemoryError::OutOfRange {
                gpa: (first as u64).saturating_mul(PAGE_SIZE as u64),
                len: count.saturating_mul(PAGE_SIZE),
            });
        }
        if !self.anonymous || count == 0 {
            return Ok(());
        }
        // SAFETY: a range inside our own private anonymous mapping (checked
        // above); faulting pages in changes no content, and dropping them
        // makes them read as zero, which is what the callers ask for.
        let rc = unsafe {
            libc::madvise(
                self._mapping
                    .as_ptr()
                    .add(first * PAGE_SIZE)
                    .cast_mut()
                    .cast(),
                count * PAGE_SIZE,
                advice,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(MemoryError::Advise {
                what,
                pages: count,
                source: std::io::Error::last_os_error(),
            })
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> usize {
        self.size / PAGE_SIZE
    }

    /// Host virtual address of guest-physical 0, for registering the KVM slot.
    pub fn host_address(&self) -> u64 {
        // The whole region is one mapping; its start cannot be out of range.
        self.memory
            .get_host_address(GuestAddress(0))
            .map(|p| p as u64)
            .unwrap_or_default()
    }

    /// The vm-memory view, for devices that use the `Bytes` API directly.
    pub fn memory(&self) -> &GuestMemoryMmap<AtomicBitmap> {
        &self.memory
    }

    /// Writes `data` at `gpa`, marking the pages dirty.
    pub fn write_at(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.memory
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: data.len(),
            })
    }

    /// Reads `buf.len()` bytes at `gpa`.
    pub fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.memory
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: buf.len(),
            })
    }

    /// Reads a little-endian u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        let mut bytes = [0u8; 8];
        self.read_at(gpa, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// A volatile view of `len` bytes at `gpa`. Writes through it are tracked.
    pub fn slice(
        &self,
        gpa: u64,
        len: usize,
    ) -> Result<VolatileSlice<'_, BS<'_, AtomicBitmap>>, MemoryError> {
        self.memory
            .get_slice(GuestAddress(gpa), len)
            .map_err(|_| MemoryError::OutOfRange { gpa, len })
    }

    /// Copies page `page` into `out` (4 KiB). The copy is consistent only while
    /// the vCPU is paused. Straight from the mapping: a checkpoint copies
    /// thousands of pages in the guest's stop, and going through a
    /// `vm-memory` slice per page (region lookup, bitmap slice) cost ~30 %
    /// over a plain memcpy of the same pages.
    pub fn copy_page(&self, page: usize, out: &mut [u8; PAGE_SIZE]) -> Result<(), MemoryError> {
        if page >= self.pages() {
            return Err(MemoryError::OutOfRange {
                gpa: (page * PAGE_SIZE) as u64,
                len: PAGE_SIZE,
            });
        }
        // SAFETY: `page` is within the mapping (checked above), which lives
        // as long as `self`; `out` is a separate 4 KiB buffer. The guest may
        // write the page meanwhile (a sync round copies while it runs): the
        // bytes are then a mix, as with vm-memory's own copy (a
        // `copy_nonoverlapping`), and the dirty log sends the page again.
        // Not `copy_nonoverlapping` itself: a staging buffer 16 bytes past a
        // page boundary (a large `Vec`'s) made it glibc's slow `rep movsb`
        // (`understudy_checkpoint::copy`).
        unsafe {
            understudy_checkpoint::copy::copy_raw(
                self._mapping.as_ptr().add(page * PAGE_SIZE),
                out.as_mut_ptr(),
                PAGE_SIZE,
            );
        }
        Ok(())
    }

    /// Writes all of guest RAM to `out`. Consistent only while the vCPU is paused.
    pub fn dump_to(&self, out: &mut impl Write) -> Result<(), MemoryError> {
        let slice = self.slice(0, self.size)?;
        let mut writer = VolatileWriter(out);
        writer
            .write_all_volatile(&slice)
            .map_err(|e| MemoryError::Dump(std::io::Error::other(e.to_string())))
    }

    /// CRC-32C of all of guest RAM. Consistent only while the vCPU is paused.
    pub fn crc32c(&self) -> Result<u32, MemoryError> {
        let mut crc = 0u32;
        let mut chunk = vec![0u8; 1 << 20];
        let mut offset = 0usize;
        while offset < self.size {
            let len = chunk.len().min(self.size - offset);
            self.slice(offset as u64, len)?.copy_to(&mut chunk[..len]);
            crc = crc32c::crc32c_append(crc, &chunk[..len]);
            offset += len;
        }
        Ok(crc)
    }

    /// The pages of anonymous RAM that nothing ever touched (neither
    /// resident nor swapped out, says `/proc/self/pagemap`): they read as
    /// zero, and reading them would fault each one in. A full sync sends
    /// them as zero pages without reading them. A page touched after this
    /// call is dirty in the next harvest, so a caller that cleared the dirty
    /// log before asking never misses a write. None for file-backed RAM (a
    /// page not mapped here may hold the file's content) or when pagemap
    /// cannot be read.
    pub fn untouched_pages(&self) -> Option<Vec<bool>> {
        use std::os::unix::fs::FileExt;
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        if !self.anonymous {
            return None;
        }
        let pagemap = File::open("/proc/self/pagemap").ok()?;
        let first = self.host_address() / PAGE_SIZE as u64;
        let mut untouched = Vec::with_capacity(self.pages());
        let mut buf = vec![0u8; 8 * 8192];
        while untouched.len() < self.pages() {
            let n = (self.pages() - untouched.len()).min(buf.len() / 8);
            let at = (first + untouched.len() as u64) * 8;
            pagemap.read_exact_at(&mut buf[..n * 8], at).ok()?;
            untouched.extend(buf[..n * 8].chunks_exact(8).map(|e| {
                let entry = u64::from_le_bytes(e.try_into().unwrap_or_default());
                entry & (PRESENT | SWAPPED) == 0
            }));
        }
        Some(untouched)
    }

    /// Takes (and clears) the pages the VMM wrote since the last call.
    pub fn take_vmm_dirty(&self) -> DirtyBitmap {
        let words = self.bitmap().get_and_reset();
        DirtyBitmap::from_words(words, self.pages())
    }

    /// Marks every page set in `pages` dirty again, so the next harvest reports
    /// it (used to put back a harvest whose consumer failed).
    pub fn mark_dirty(&self, pages: &DirtyBitmap) {
        let bitmap = self.bitmap();
        for page in pages.iter() {
            bitmap.set_bit(page);
        }
    }

    fn bitmap(&self) -> &AtomicBitmap {
        // One region, created above.
        self.memory
            .iter()
            .next()
            .map(|region| region.bitmap())
            .unwrap_or_else(|| unreachable!("GuestRam always has exactly one region"))
    }
}

/// Adapts any `Write` to vm-memory's `WriteVolatile` by bouncing through a
/// small buffer (guest memory may change under a plain `&[u8]`).
struct VolatileWriter<'a, W: Write>(&'a mut W);

impl<W: Write> WriteVolatile for VolatileWriter<'_, W> {
    fn write_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<'_, B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        let mut bounce = [0u8; 64 * 1024];
        let len = buf.len().min(bounce.len());
        buf.subslice(0, len)?.copy_to(&mut bounce[..len]);
        self.0
            .write_all(&bounce[..len])
            .map_err(vm_memory::VolatileMemoryError::IOError)?;
        Ok(len)
    }
}

/// Where the pages of a checkpoint are copied out of guest RAM: a buffer that
/// starts on a page boundary, as guest RAM does, so each page copy has both
/// ends aligned (a `Vec` this large starts 16 bytes past a page; copying
/// into one took 1.0–1.2× a `memcpy` into aligned memory, into this
/// 0.97–1.09×, vmm bench, 2026-12-03: within that bench's noise). Its
/// content is rewritten by each use, so growing it (inside the stop, when
/// the dirty set is larger than ever before) maps fresh memory instead of
/// copying the old, as `Vec::resize` did.
#[derive(Default)]
pub struct StagingBuffer {
    map: Option<MmapMut>,
    len: usize,
}

impl std::fmt::Debug for StagingBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingBuffer")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl StagingBuffer {
    /// An empty buffer (nothing mapped).
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes it can hold without mapping more.
    pub fn capacity(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.len())
    }

    /// Makes it `len` bytes long. Past a length it held before, the bytes
    /// are unspecified (the caller overwrites them); growing past its
    /// capacity maps at least twice as much, zeroed, and drops the old.
    pub fn set_len(&mut self, len: usize) -> Result<(), MemoryError> {
        if len > self.capacity() {
            let bytes = len.max(2 * self.capacity()).next_multiple_of(PAGE_SIZE);
            let map = MmapOptions::new()
                .len(bytes)
                .map_anon()
                .map_err(|source| MemoryError::Staging { bytes, source })?;
            self.map = Some(map);
        }
        self.len = len;
        Ok(())
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::ops::Deref for StagingBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.map {
            Some(map) => &map[..self.len],
            None => &[],
        }
    }
}

impl std::ops::DerefMut for StagingBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.map {
            Some(map) => &mut map[..self.len],
            None => &mut [],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_writes_are_tracked_and_can_be_put_back() {
        let ram = GuestRam::new(MIN_RAM_BYTES, RamBacking::Anonymous).unwrap();
        ram.write_at(3 * PAGE_SIZE as u64 + 10, &[1, 2, 3]).unwrap();
        // A write across a page boundary dirties both pages.
        ram.write_at(8 * PAGE_SIZE as u64 - 2, &[9; 4]).unwrap();
        let dirty = ram.take_vmm_dirty();
        assert_eq!(dirty.iter().collect::<Vec<_>>(), vec![3, 7, 8]);
        assert_eq!(ram.take_vmm_dirty().count(), 0, "harvest clears");
        ram.mark_dirty(&dirty);
        assert_eq!(
            ram.take_vmm_dirty().iter().collect::<Vec<_>>(),
            vec![3, 7, 8]
        );
    }

    #[test]
    fn pages_faulted_in_keep_their_content_and_dropped_ones_read_zero_and_untouched() {
        let ram = GuestRam::new(MIN_RAM_BYTES, RamBacking::Anonymous).unwrap();
        ram.write_at(5 * PAGE_SIZE as u64, &[7; 3]).unwrap();
        ram.populate(4, 4).unwrap();
        let untouched = ram.untouched_pages().expect("pagemap of anonymous RAM");
        let touched: Vec<usize> = (0..ram.pages()).filter(|&p| !untouched[p]).collect();
        assert_eq!(touched, vec![4, 5, 6, 7], "faulted in: exactly those pages");
        assert_eq!(ram.read_u64(5 * PAGE_SIZE as u64).unwrap(), 0x07_0707);
        assert_eq!(ram.read_u64(4 * PAGE_SIZE as u64).unwrap(), 0);
        ram.discard(5, 2).unwrap();
        let untouched = ram.untouched_pages().expect("pagemap of anonymous RAM");
        let touched: Vec<usize> = (0..ram.pages()).filter(|&p| !untouched[p]).collect();
        assert_eq!(touched, vec![4, 7], "dropped pages count as never touched");
        assert_eq!(ram.read_u64(5 * PAGE_SIZE as u64).unwrap(), 0);
        let last = ram.pages() - 1;
        assert!(matches!(
            ram.populate(last, 2),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            ram.discard(usize::MAX, 2),
            Err(MemoryError::OutOfRange { .. })
        ));
    }

    #[test]
    fn a_page_copy_is_the_page_and_stays_inside_ram() {
        let ram = GuestRam::new(MIN_RAM_BYTES, RamBacking::Anonymous).unwrap();
        let last = ram.pages() - 1;
        ram.write_at((last * PAGE_SIZE) as u64, &[1, 2, 3]).unwrap();
        ram.write_at((last * PAGE_SIZE + PAGE_SIZE - 1) as u64, &[9])
            .unwrap();
        let mut out = [7u8; PAGE_SIZE];
        ram.copy_page(last, &mut out).unwrap();
        assert_eq!(
            (&out[..3], out[3], out[PAGE_SIZE - 1]),
            (&[1u8, 2, 3][..], 0, 9)
        );
        let err = ram.copy_page(last + 1, &mut out).unwrap_err();
        assert!(matches!(err, MemoryError::OutOfRange { .. }), "{err}");
    }

    #[test]
    fn untouched_anonymous_pages_are_known_zero_and_file_backed_ram_is_not() {
        let ram = GuestRam::new(MIN_RAM_BYTES, RamBacking::Anonymous).unwrap();
        ram.write_at(5 * PAGE_SIZE as u64 + 7, &[1]).unwrap();
        let mut out = [0u8; PAGE_SIZE];
        ram.copy_page(9, &mut out).unwrap();
        let untouched = ram.untouched_pages().expect("pagemap is readable");
        assert_eq!(untouched.len(), ram.pages());
        assert!(!untouched[5], "a written page is touched");
        // A read maps the shared zero page: present, so no longer "untouched"
        // (reading it again is what the sync avoids; both answers are safe).
        // The neighbours of a written page stay untouched: RAM gets no huge
        // pages unless asked (`advise_huge_pages`), which post-copy relies
        // on (a page it copies in must not make its neighbours present).
        assert!(untouched[4] && untouched[6] && untouched[ram.pages() - 1]);
        let file = tempfile::tempfile().unwrap();
        file.set_len(MIN_RAM_BYTES as u64).unwrap();
        let mapped = GuestRam::new(MIN_RAM_BYTES, RamBacking::PrivateFile(file)).unwrap();
        assert_eq!(
            mapped.untouched_pages(),
            None,
            "a file's pages may hold data"
        );
    }

    #[test]
    fn reads_see_writes_and_bounds_are_checked() {
        let ram = GuestRam::new(MIN_RAM_BYTES, RamBacking::Anonymous).unwrap();
        ram.write_at(0x1234, &42u64.to_le_bytes()).unwrap();
        assert_eq!(ram.read_u64(0x1234).unwrap(), 42);
        let err = ram.write_at(MIN_RAM_BYTES as u64 - 2, &[0; 4]).unwrap_err();
        assert!(matches!(err, MemoryError::OutOfRange { .. }), "{err}");
    }

    #[test]
    fn bad_sizes_are_refused() {
        for bytes in [
            0,
            MIN_RAM_BYTES - PAGE_SIZE,
            MIN_RAM_BYTES + 1,
            MAX_RAM_BYTES + PAGE_SIZE,
        ] {
            assert!(matches!(
                GuestRam::new(bytes, RamBacking::Anonymous),
                Err(MemoryError::BadSize { .. })
            ));
        }
    }

    #[test]
    fn shared_file_backing_writes_through_and_private_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(MIN_RAM_BYTES as u64).unwrap();
        {
            let ram = GuestRam::new(
                MIN_RAM_BYTES,
                RamBacking::SharedFile(file.try_clone().unwrap()),
            )
            .unwrap();
            ram.write_at(4096, b"shared").unwrap();
        }
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[4096..4102], b"shared");
        {
            let ram = GuestRam::new(MIN_RAM_BYTES, RamBacking::PrivateFile(file)).unwrap();
            let mut buf = [0u8; 6];
            ram.read_at(4096, &mut buf).unwrap();
            assert_eq!(&buf, b"shared");
            ram.write_at(4096, b"privat").unwrap();
        }
        assert_eq!(&std::fs::read(&path).unwrap()[4096..4102], b"shared");
    }

    #[test]
    fn wrong_file_size_is_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        let err = GuestRam::new(MIN_RAM_BYTES, RamBacking::SharedFile(file)).unwrap_err();
        assert!(matches!(err, MemoryError::FileSize { .. }), "{err}");
    }

    #[test]
    fn dump_and_crc_cover_all_of_ram() {
        let ram = GuestRam::new(MIN_RAM_BYTES, RamBacking::Anonymous).unwrap();
        ram.write_at(MIN_RAM_BYTES as u64 - 1, &[0xab]).unwrap();
        let mut out = Vec::new();
        ram.dump_to(&mut out).unwrap();
        assert_eq!(out.len(), MIN_RAM_BYTES);
        assert_eq!(out[MIN_RAM_BYTES - 1], 0xab);
        assert_eq!(ram.crc32c().unwrap(), crc32c::crc32c(&out));
    }

    #[test]
    fn a_staging_buffer_starts_on_a_page_and_grows_by_fresh_mappings() {
        let mut staging = StagingBuffer::new();
        assert!(staging.is_empty());
        assert_eq!(&staging[..], &[] as &[u8]);
        staging.set_len(3 * PAGE_SIZE).unwrap();
        assert_eq!(staging.len(), 3 * PAGE_SIZE);
        assert_eq!(staging.as_ptr() as usize % PAGE_SIZE, 0);
        staging[PAGE_SIZE] = 7;
        // Shorter and back within the capacity: the same memory.
        let capacity = staging.capacity();
        staging.set_len(PAGE_SIZE).unwrap();
        assert_eq!(staging.len(), PAGE_SIZE);
        staging.set_len(3 * PAGE_SIZE).unwrap();
        assert_eq!((staging.capacity(), staging[PAGE_SIZE]), (capacity, 7));
        // Past it: at least twice as much, page-aligned, whole pages.
        staging.set_len(capacity + 1).unwrap();
        assert!(staging.capacity() >= 2 * capacity);
        assert_eq!(staging.capacity() % PAGE_SIZE, 0);
        assert_eq!(staging.as_ptr() as usize % PAGE_SIZE, 0);
        assert_eq!(staging.len(), capacity + 1);
    }
}
