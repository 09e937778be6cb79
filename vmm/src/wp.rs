//! A checkpoint's dirty pages copied after the guest resumed.
//!
//! Copying the dirty set inside the pause makes the guest's stop grow with
//! it (~0.4 µs a page: 4 ms at 10k pages). Instead, in the pause the dirty
//! pages are write-protected ([`WriteProtectCopy::protect`], one
//! userfaultfd ioctl per run of consecutive pages) and the guest resumes;
//! then [`Protected::copy`] copies them while it runs, unprotecting each
//! piece of a run once copied ([`UNPROTECT_PIECE_PAGES`]). A write to a page
//! not copied yet (by a vCPU inside KVM or by a VMM thread) stops the
//! writer; the copier looks for such a fault every few pages
//! ([`SERVE_EVERY_PAGES`]) and serves it: it copies that page and the next
//! few first ([`FAULT_AROUND_PAGES`]), then unprotects them, which lets the
//! writer go on, and goes on from there itself, ahead of the writer. Every
//! page is copied exactly once, by the copier, before anything can write
//! it: the copy is the page as it was in the pause, as QEMU's background
//! snapshot does it. The copier must never write guest RAM while pages are
//! protected (nothing else would serve its fault); it only reads it.
//!
//! It needs guest RAM the kernel can write-protect per page: anonymous
//! memory (and shmem). RAM mapped from a regular file (a promoted host runs
//! on its image) cannot be registered; callers then copy in the pause.

use crate::memory::{GuestRam, MemoryError, PAGE_SIZE};
use crate::uffd::{Uffd, UffdError};

/// What went wrong copying protected pages. The copy is then not a
/// consistent checkpoint (and every page has been unprotected).
#[derive(Debug, thiserror::Error)]
pub enum WpError {
    /// A userfaultfd request failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// Reading guest RAM failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The pages to protect are not in ascending order, each once (a fault
    /// could then not find its page, and would let a write through before
    /// the copy).
    #[error("the pages to protect are not ascending: page {page} after {after}")]
    NotAscending {
        /// The page out of order.
        page: u32,
        /// The page before it.
        after: u32,
    },
    /// The staging buffer does not hold the protected pages.
    #[error("the staging buffer holds {have} bytes, the protected pages need {need}")]
    Staging {
        /// Bytes given.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
}

/// Guest RAM registered for write-protect faults, for copying checkpoints
/// after the resume. One per VM; checkpoints use it one at a time.
#[derive(Debug)]
pub struct WriteProtectCopy {
    uffd: Uffd,
    pages: usize,
}

/// Pages write-protected in a pause, waiting for [`Protected::copy`].
/// Dropped without it, they are unprotected (the writers waiting go on).
#[derive(Debug)]
pub struct Protected<'a> {
    owner: &'a WriteProtectCopy,
    /// The pages to copy, ascending.
    pages: Vec<u32>,
    /// The ranges protected, ascending: each covers `pages[from..to]` and
    /// the short gaps between them.
    ranges: Vec<Range>,
}

/// One protected range of guest RAM.
#[derive(Debug, Clone, Copy)]
struct Range {
    first: usize,
    count: usize,
    /// The pages to copy in it: `pages[from..to]`.
    from: usize,
    to: usize,
}

/// Gaps of up to this many clean pages between dirty ones are protected
/// with them: protecting a page costs ~0.1 µs, a request ~1.6 µs (a TLB
/// shootdown on the other cores), measured by the vmm bench's "every other
/// page" rows. A write to a gap page waits only to be unprotected.
pub const MERGE_GAP_PAGES: usize = 16;

/// What one copy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyReport {
    /// Pages copied.
    pub pages: usize,
    /// Writes that had to wait for their page to be copied.
    pub faults: usize,
}

impl WriteProtectCopy {
    /// Registers `ram` for write-protect faults (see [`Uffd::register_write_protect`]).
    pub fn new(ram: &GuestRam) -> Result<Self, WpError> {
        let uffd = Uffd::register_write_protect(ram)?;
        Ok(Self {
            uffd,
            pages: ram.pages(),
        })
    }

    /// Write-protects `pages` (ascending, each once), one request per run
    /// of pages no more than [`MERGE_GAP_PAGES`] apart. Call it with the
    /// guest paused.
    pub fn protect(&self, pages: &[u32]) -> Result<Protected<'_>, WpError> {
        self.protect_ranges(pages, ranges_of(pages))
    }

    /// [`Self::protect`] if protecting `pages` takes less than half the time
    /// copying them would (at `copy_ns_per_page`, as measured by the caller)
    /// and there are at least [`MIN_PAGES`] of them; otherwise None, and
    /// nothing is protected: the caller copies in the stop.
    pub fn protect_if_shorter(
        &self,
        pages: &[u32],
        copy_ns_per_page: f64,
    ) -> Result<Option<Protected<'_>>, WpError> {
        if pages.len() < MIN_PAGES {
            return Ok(None);
        }
        let ranges = ranges_of(pages);
        if !pays(pages.len(), &ranges, copy_ns_per_page) {
            return Ok(None);
        }
        self.protect_ranges(pages, ranges).map(Some)
    }

    fn protect_ranges(&self, pages: &[u32], ranges: Vec<Range>) -> Result<Protected<'_>, WpError> {
        if let Some(w) = pages.windows(2).find(|w| w[1] <= w[0]) {
            return Err(WpError::NotAscending {
                page: w[1],
                after: w[0],
            });
        }
        let mut protected = Protected {
            owner: self,
            pages: pages.to_vec(),
            ranges: Vec::with_capacity(ranges.len()),
        };
        // On failure, `protected` unprotects what it protected when dropped.
        for range in ranges {
            self.uffd.write_protect(range.first, range.count, true)?;
            protected.ranges.push(range);
        }
        Ok(protected)
    }

    /// Unprotects all of guest RAM (the failure path: nothing waits after it).
    fn unprotect_all(&self) {
        if let Err(e) = self.uffd.write_protect(0, self.pages, false) {
            tracing::error!(error = %e, "cannot unprotect guest RAM");
        }
    }
}

/// Below this many dirty pages a checkpoint copies in the stop: the copy
/// takes ~0.1 ms, and the copy after the resume adds protect requests and
/// the guest's waits for little gain.
pub const MIN_PAGES: usize = 256;
/// What a protect request costs, besides its pages (see [`MERGE_GAP_PAGES`]).
const PROTECT_REQUEST_NS: f64 = 1600.0;
/// What protecting one page costs (page table and KVM's mapping of it).
const PROTECT_PAGE_NS: f64 = 90.0;

/// Whether protecting `ranges` (holding `pages` dirty pages) takes less
/// than half the time copying them would.
fn pays(pages: usize, ranges: &[Range], copy_ns_per_page: f64) -> bool {
    let protect_ns: f64 = ranges
        .iter()
        .map(|r| PROTECT_REQUEST_NS + PROTECT_PAGE_NS * r.count as f64)
        .sum();
    protect_ns * 2.0 < copy_ns_per_page * pages as f64
}

/// The ranges to protect for `pages` (ascending).
fn ranges_of(pages: &[u32]) -> Vec<Range> {
    let mut ranges: Vec<Range> = Vec::new();
    for (i, &p) in pages.iter().enumerate() {
        let p = p as usize;
        match ranges.last_mut() {
            Some(r) if p >= r.first + r.count && p - (r.first + r.count) <= MERGE_GAP_PAGES => {
                r.count = p + 1 - r.first;
                r.to = i + 1;
            }
            _ => ranges.push(Range {
                first: p,
                count: 1,
                from: i,
                to: i + 1,
            }),
        }
    }
    ranges
}

impl Drop for Protected<'_> {
    fn drop(&mut self) {
        for r in &self.ranges {
            if let Err(e) = self.owner.uffd.write_protect(r.first, r.count, false) {
                tracing::error!(error = %e, "cannot unprotect pages");
                self.owner.unprotect_all();
                return;
            }
        }
    }
}

/// The copy in flight: which pages are copied, and where they go.
struct Job<'a> {
    ram: &'a GuestRam,
    pages: &'a [u32],
    ranges: &'a [Range],
    /// Whether the job's page `i` is in its staging slot yet.
    copied: Vec<bool>,
    /// Page `i` of `pages` goes at `i * PAGE_SIZE`.
    staging: &'a mut [u8],
    /// Where the copier should go on: the job's page just after the last
    /// served fault's window (None: no fault served since the copier last
    /// looked). A writer that waited there writes on from there.
    hint: Option<usize>,
}

impl Job<'_> {
    /// The staging index of `page`, if it is one of the job's.
    fn index_of(&self, page: usize) -> Option<usize> {
        let page = u32::try_from(page).ok()?;
        self.pages.binary_search(&page).ok()
    }

    /// The range holding the job's page `i`.
    fn range_of(&self, i: usize) -> Range {
        let at = self.ranges.partition_point(|r| r.to <= i);
        self.ranges[at]
    }

    /// Copies the job's page `i` into its slot unless it is there already.
    fn claim(&mut self, i: usize) -> Result<(), MemoryError> {
        if self.copied[i] {
            return Ok(());
        }
        let slot: &mut [u8; PAGE_SIZE] = (&mut self.staging[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
            .try_into()
            .unwrap_or_else(|_| unreachable!("a page-sized slice"));
        self.ram.copy_page(self.pages[i] as usize, slot)?;
        self.copied[i] = true;
        Ok(())
    }
}

impl Protected<'_> {
    /// Pages to copy.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    /// Protect requests it took (runs of pages, short gaps merged).
    pub fn requests(&self) -> usize {
        self.ranges.len()
    }

    /// Copies the protected pages into `staging` (page `i` of the ascending
    /// list at `i * PAGE_SIZE`) while the guest runs, unprotecting each run
    /// once copied; a write to a page not copied yet waits for it. Every
    /// page is unprotected when this returns, copied or not.
    pub fn copy(self, ram: &GuestRam, staging: &mut [u8]) -> Result<CopyReport, WpError> {
        let need = self.pages.len() * PAGE_SIZE;
        if staging.len() < need {
            return Err(WpError::Staging {
                have: staging.len(),
                need,
            });
        }
        let owner = self.owner;
        let mut job = Job {
            ram,
            pages: &self.pages,
            ranges: &self.ranges,
            copied: vec![false; self.pages.len()],
            staging: &mut staging[..need],
            hint: None,
        };
        let copied = copy_runs(owner, &mut job);
        // All runs are unprotected on success; on failure make sure of it.
        let result = match copied {
            Ok(faults) => Ok(CopyReport {
                pages: self.pages.len(),
                faults,
            }),
            Err(e) => {
                owner.unprotect_all();
                Err(e)
            }
        };
        // The runs are unprotected: nothing left for Drop to do.
        let mut this = self;
        this.ranges.clear();
        result
    }
}

/// A protected range is unprotected behind the copier in pieces of this
/// many pages, not once the whole range is copied: a range can span a
/// working set of thousands of pages (one request protected it), and until
/// its piece is unprotected a write to a page already copied still stops
/// the writer for a fault. A request costs ~1.6 µs on the copier's core and
/// a TLB shootdown on the others, so not page by page either: 256 pages
/// (1 MiB) copy in ~0.1–0.2 ms.
pub const UNPROTECT_PIECE_PAGES: usize = 256;

/// A write fault copies its page and the job's pages after it up to this
/// many pages from it (in the same range), then unprotects them with one
/// request: a writer going through memory in order (most do, in stretches)
/// does not stop at the next page, and the copier, which goes on from the
/// end of this window (`copy_runs`), gets ahead of it meanwhile. The
/// fault waits for ~16 page copies (~10 µs) more; the copier would have
/// copied them anyway.
pub const FAULT_AROUND_PAGES: usize = 16;

/// One piece of a protected range: pages `first..end` of guest RAM, the
/// job's pages `from..to` among them; unprotected once all of those are
/// copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    first: usize,
    end: usize,
    from: usize,
    to: usize,
}

/// The pieces of `ranges` ([`UNPROTECT_PIECE_PAGES`] pages each, the last
/// of a range shorter), in ascending order.
fn pieces_of(ranges: &[Range], pages: &[u32]) -> Vec<Piece> {
    let mut pieces = Vec::new();
    for r in ranges {
        let end = r.first + r.count;
        let (mut first, mut i) = (r.first, r.from);
        while first < end {
            let piece_end = (first + UNPROTECT_PIECE_PAGES).min(end);
            let from = i;
            while i < r.to && (pages[i] as usize) < piece_end {
                i += 1;
            }
            pieces.push(Piece {
                first,
                end: piece_end,
                from,
                to: i,
            });
            first = piece_end;
        }
    }
    pieces
}

/// The copier: piece by piece, copy what a served fault did not copy yet,
/// then unprotect the piece; every [`SERVE_EVERY_PAGES`] pages it serves
/// the queued faults. It goes
/// up through the pieces, but after a fault it goes on from where the
/// fault's window ended (`Job::hint`), then comes back for what it left: a
/// writer resumes where it was in the pause, anywhere in the range, and
/// writes on from there, so the copier that started at the bottom would
/// have it waiting once every [`FAULT_AROUND_PAGES`] pages until it got
/// there (4–5 waits a stop for the heavy dirtier). Returns how many of the
/// job's pages it served faults for.
fn copy_runs(owner: &WriteProtectCopy, job: &mut Job<'_>) -> Result<usize, WpError> {
    let pieces = pieces_of(job.ranges, job.pages);
    let mut left = vec![true; pieces.len()];
    let (mut remaining, mut next, mut faults) = (pieces.len(), 0, 0);
    let mut copied = 0usize;
    while remaining > 0 {
        // Where to go on: after the last fault's window, if its piece is
        // still protected; else the next piece still protected.
        let hinted = job.hint.take();
        let at = hinted.map(|h| (pieces.partition_point(|p| p.to <= h), h));
        let (k, start) = match at {
            Some((k, h)) if k < pieces.len() && left[k] => (k, h),
            _ => {
                let k = (next..pieces.len())
                    .chain(0..next)
                    .find(|&k| left[k])
                    .unwrap_or_else(|| unreachable!("{remaining} pieces left"));
                (k, pieces[k].from)
            }
        };
        let p = pieces[k];
        // From `start` up, then the piece's pages below it; a fault served
        // meanwhile sends the copier there (this piece stays protected
        // until it comes back).
        let mut moved = false;
        for i in (start..p.to).chain(p.from..start) {
            job.claim(i)?;
            copied += 1;
            if copied % SERVE_EVERY_PAGES == 0 {
                while let Some(page) = owner.uffd.read_fault()? {
                    faults += usize::from(serve_fault(owner, job, page)?);
                }
                if job.hint.is_some() {
                    moved = true;
                    break;
                }
            }
        }
        if moved {
            continue;
        }
        owner.uffd.write_protect(p.first, p.end - p.first, false)?;
        left[k] = false;
        remaining -= 1;
        next = k + 1;
    }
    Ok(faults)
}

/// The copier looks for a queued write fault every this many pages and
/// serves it: it is on a core already, where a thread of its own for the
/// faults must first be woken while the writer waits. Measured with the
/// flat-out dirtier (2048 pages, a stop every 25 ms, nothing shipped, three
/// runs each): its work rate 0.945–0.948 of the guest alone with a handler
/// thread serving the faults, 0.973–0.979 with the copier serving them every
/// 2, 8 or 32 pages (the interval made no difference). A look costs one
/// `read(2)` (~1 µs, against ~8 page copies). The copier is the only server
/// (since 2026-12-05): a handler thread started for each copy, for the
/// faults the copier did not read first, cost the vCPU's CPU ~90 IPIs a
/// second more at 40 checkpoints a second (its start and exit; the
/// slowdown bench's local table, 878 against 971).
pub const SERVE_EVERY_PAGES: usize = 8;

/// Serves the write fault at `page`: copies it and the job's pages after it
/// (see [`FAULT_AROUND_PAGES`]), then unprotects them, which wakes the
/// writer. True if it was one of the job's pages.
fn serve_fault(owner: &WriteProtectCopy, job: &mut Job<'_>, page: usize) -> Result<bool, WpError> {
    let Some(i) = job.index_of(page) else {
        // A clean page of a merged gap (or a fault left from an
        // earlier copy): nothing to copy.
        owner.uffd.write_protect(page, 1, false)?;
        return Ok(false);
    };
    // This page and the job's next ones up to FAULT_AROUND_PAGES from
    // it in its range, each copied before any is unprotected.
    let r = job.range_of(i);
    let end = (page + FAULT_AROUND_PAGES).min(r.first + r.count);
    let mut j = i;
    while j < r.to && (job.pages[j] as usize) < end {
        job.claim(j)?;
        j += 1;
    }
    owner.uffd.write_protect(page, end - page, false)?;
    // The writer goes on from here: so does the copier.
    job.hint = Some(j);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The least guest RAM there is, anonymous.
    fn small_ram() -> GuestRam {
        GuestRam::new(
            crate::memory::MIN_RAM_BYTES,
            crate::memory::RamBacking::Anonymous,
        )
        .unwrap()
    }

    #[test]
    fn short_gaps_are_protected_with_their_runs_and_long_ones_are_not() {
        let gap = MERGE_GAP_PAGES as u32;
        let pages = [3, 4, 5, 6 + gap, 7 + gap, 8 + 3 * gap, 100_000];
        let ranges = ranges_of(&pages);
        let spans: Vec<_> = ranges
            .iter()
            .map(|r| (r.first, r.count, r.from, r.to))
            .collect();
        assert_eq!(
            spans,
            vec![
                (3, 5 + gap as usize, 0, 5),
                (8 + 3 * gap as usize, 1, 5, 6),
                (100_000, 1, 6, 7)
            ]
        );
        assert!(ranges_of(&[]).is_empty());
    }

    #[test]
    fn pages_out_of_order_or_outside_ram_protect_nothing() {
        let ram = small_ram();
        let wp = WriteProtectCopy::new(&ram).unwrap();
        let err = wp.protect(&[5, 9, 7]).unwrap_err();
        assert!(
            matches!(err, WpError::NotAscending { page: 7, after: 9 }),
            "{err}"
        );
        let err = wp.protect(&[5, 5]).unwrap_err();
        assert!(matches!(err, WpError::NotAscending { .. }), "{err}");
        let beyond = ram.pages() as u32;
        assert!(wp.protect(&[1, beyond]).is_err());
        // What was protected before the bad range is unprotected again: a
        // write goes through (with nobody to handle its fault, it would wait
        // until the registration is gone).
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let ram = &ram;
            s.spawn(move || {
                ram.write_at(PAGE_SIZE as u64, &[1]).unwrap();
                tx.send(()).unwrap();
            });
            let written = rx.recv_timeout(std::time::Duration::from_secs(5));
            if written.is_err() {
                wp.uffd.write_protect(0, ram.pages(), false).unwrap();
                panic!("page 1 stayed protected after a failed protect");
            }
        });
        let protected = wp.protect(&[1, 2, 3]).unwrap();
        assert_eq!((protected.pages(), protected.requests()), (3, 1));
        let mut staging = vec![0u8; 3 * PAGE_SIZE];
        let report = protected.copy(&ram, &mut staging).unwrap();
        assert_eq!(
            report,
            CopyReport {
                pages: 3,
                faults: 0
            }
        );
        assert_eq!(staging[0], 1);
        ram.write_at(2 * PAGE_SIZE as u64, &[2]).unwrap();
    }

    /// A write to a page not copied yet waits for the copier, the only
    /// thread that serves faults: it copies the page as it was protected,
    /// counts the wait, and lets the write go on.
    #[test]
    fn the_copier_serves_a_write_waiting_on_a_page_not_copied_yet() {
        let ram = small_ram();
        let pages: Vec<u32> = (0..1024).collect();
        let mark = |p: u32| (p as u8) ^ 0x5a;
        for &p in &pages {
            ram.write_at(p as u64 * PAGE_SIZE as u64, &[mark(p)])
                .unwrap();
        }
        let wp = WriteProtectCopy::new(&ram).unwrap();
        let protected = wp.protect(&pages).unwrap();
        let mut staging = vec![0u8; pages.len() * PAGE_SIZE];
        let at = 700u64 * PAGE_SIZE as u64;
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let ram = &ram;
            s.spawn(move || {
                ram.write_at(at, &[0xff]).unwrap();
                tx.send(()).unwrap();
            });
            // The writer's fault is queued before the copy starts.
            let mut fd = libc::pollfd {
                fd: wp.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut fd, 1, 5000) };
            assert_eq!(n, 1, "the write to a protected page raised no fault");
            assert!(rx.try_recv().is_err(), "the write went through");
            let report = protected.copy(ram, &mut staging).unwrap();
            rx.recv_timeout(std::time::Duration::from_secs(5))
                .expect("the writer never went on");
            assert_eq!(
                report,
                CopyReport {
                    pages: 1024,
                    faults: 1
                }
            );
        });
        for &p in &pages {
            assert_eq!(staging[p as usize * PAGE_SIZE], mark(p), "page {p}");
        }
        let mut byte = [0u8];
        ram.read_at(at, &mut byte).unwrap();
        assert_eq!(byte, [0xff]);
    }

    #[test]
    fn pieces_tile_each_range_and_the_pages_in_order() {
        let piece = UNPROTECT_PIECE_PAGES as u32;
        // A range of 2.5 pieces (every page dirty), then one far away.
        let mut pages: Vec<u32> = (0..piece * 5 / 2).collect();
        pages.push(100_000);
        let ranges = ranges_of(&pages);
        let pieces = pieces_of(&ranges, &pages);
        let p = piece as usize;
        let spans: Vec<_> = pieces
            .iter()
            .map(|q| (q.first, q.end, q.from, q.to))
            .collect();
        assert_eq!(
            spans,
            vec![
                (0, p, 0, p),
                (p, 2 * p, p, 2 * p),
                (2 * p, 5 * p / 2, 2 * p, 5 * p / 2),
                (100_000, 100_001, 5 * p / 2, 5 * p / 2 + 1),
            ]
        );
        // Dirty pages a merged gap apart: one range, whose pieces hold the
        // pages that fall in them.
        let gap = MERGE_GAP_PAGES as u32;
        let sparse: Vec<u32> = (0..piece).map(|i| i * (gap + 1)).collect();
        let pieces = pieces_of(&ranges_of(&sparse), &sparse);
        assert_eq!(pieces.first().map(|q| q.first), Some(0));
        assert_eq!(pieces.last().map(|q| q.to), Some(sparse.len()));
        for w in pieces.windows(2) {
            // Contiguous in RAM and in the job's pages, so a fault's page
            // index finds exactly one piece.
            assert_eq!((w[0].end, w[0].to), (w[1].first, w[1].from));
        }
        for q in &pieces {
            assert!(q.end - q.first <= UNPROTECT_PIECE_PAGES);
            assert!(sparse[q.from..q.to].iter().all(|&x| {
                let x = x as usize;
                x >= q.first && x < q.end
            }));
        }
    }

    #[test]
    fn protecting_is_chosen_only_where_it_takes_under_half_the_copy() {
        let copy_ns = 400.0;
        // 10k pages in a row: one request, ~0.9 ms against a 4 ms copy.
        let run: Vec<u32> = (1000..11_000).collect();
        assert!(pays(run.len(), &ranges_of(&run), copy_ns));
        // 10k pages each alone: 10k requests cost more than the copy.
        let alone: Vec<u32> = (0..10_000).map(|i| i * 64).collect();
        assert!(!pays(alone.len(), &ranges_of(&alone), copy_ns));
        // Every other page: merged into one request covering twice the pages.
        let every_other: Vec<u32> = (0..10_000).map(|i| i * 2).collect();
        assert_eq!(ranges_of(&every_other).len(), 1);
        assert!(pays(every_other.len(), &ranges_of(&every_other), copy_ns));
        // A copy that is cheap enough is never worth protecting.
        assert!(!pays(run.len(), &ranges_of(&run), 100.0));
    }
}
