//! The allocator settings of a process on the data path.
//!
//! Replication moves epochs in buffers of a chunk (256 KiB) and more: encoded
//! chunks, tonic's message buffers on both ends, decoded pages. glibc serves
//! an allocation above its mmap threshold (128 KiB at start; raised on the fly
//! only after such a block is freed) with a fresh mapping, and hands freed
//! memory at the top of a heap back to the kernel once more than its trim
//! threshold (128 KiB) is free there. Either way the next buffer is fresh
//! memory: a page fault for every 4 KiB, and the kernel zero-filling the page
//! before the copy overwrites it. A profile of the pipeline bench put 8.6 % of
//! the machine's time in the backup's `clear_page_erms` alone.
//!
//! A third way to get fresh memory: glibc gives each thread an arena of its
//! own (up to eight per core), and a freed block goes back to the arena it
//! came from. A tokio worker that blocks hands its place to another thread,
//! so a stream's buffers are allocated on one thread's arena and freed on
//! another's, and every arena grows to the peak on its own. With the backup
//! keeping an epoch's received chunks until it commits them (raw pages are
//! written from where they arrived), that alone put 40 % of its samples in
//! zero-filling fresh pages.
//!
//! [`keep_freed_memory`] fixes both thresholds high and the process to one
//! arena, so freed buffers stay with the process and the next chunk reuses
//! them. What the process keeps is bounded by what it held at its peak.
//! Blocks over [`MMAP_THRESHOLD`] (a large staging buffer, guest RAM) are
//! still mappings of their own.
//!
//! Kept memory is only cheap once the process has it: a backup's first sync
//! grows the heap to its peak page by page, as the received stream piles up
//! in the HTTP/2 window, and on a host that hands free memory back to its own
//! hypervisor each new page costs a fault there too. [`warm_heap`] takes that
//! memory ahead, while the backup waits for its primary.

use std::sync::atomic::{AtomicBool, Ordering};

/// Allocations up to this size come from the heap (glibc's largest allowed
/// value on 64-bit hosts).
pub const MMAP_THRESHOLD: usize = 32 << 20;
/// Free memory kept at the top of the heap before glibc gives it back.
pub const TRIM_THRESHOLD: usize = 1 << 30;
/// Arenas: one. The data path's allocations come from a handful of threads,
/// rarely at once; an uncontended lock costs less than memory that is
/// touched fresh.
pub const ARENAS: usize = 1;

/// Sets the allocator's thresholds and arenas (see the module doc). Call it first
/// thing in `main`, before other threads start. Returns false where the
/// allocator refused a setting or is not glibc's (nothing changes then:
/// correctness never depends on it).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters; all three values
        // are in the ranges glibc documents (it returns 0 for others).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_ARENA_MAX, ARENAS as libc::c_int) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The blocks [`warm_heap`] grows the heap by: under [`MMAP_THRESHOLD`], so
/// they come from the heap and stay there when freed.
const WARM_BLOCK: usize = 4 << 20;

/// Grows the heap by `bytes`, touching every page, then frees it all: the
/// next allocations up to that size find memory the process already has (no
/// page fault, no zero-filling). Only with [`keep_freed_memory`] in force
/// (glibc would hand the freed top of the heap straight back otherwise).
/// Stops between blocks once `stop` is set; returns the bytes touched.
pub fn warm_heap(bytes: usize, stop: &AtomicBool) -> usize {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut warmed = 0;
    while warmed < bytes && !stop.load(Ordering::Relaxed) {
        let len = WARM_BLOCK.min(bytes - warmed);
        let mut block: Vec<u8> = Vec::with_capacity(len);
        for page in block.spare_capacity_mut().chunks_mut(4096) {
            // Volatile: a store to memory freed right after is otherwise
            // free to be left out, and then no page is touched.
            // SAFETY: `page` is at least one byte of the block's own,
            // writable capacity.
            unsafe { std::ptr::write_volatile(page.as_mut_ptr(), std::mem::MaybeUninit::new(0)) };
        }
        blocks.push(block);
        warmed += len;
    }
    warmed
}
