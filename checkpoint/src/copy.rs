//! Copying pages without the CPU's slow string-copy path.
//!
//! glibc's `memcpy` moves 4 KiB (and anything larger, up to its
//! non-temporal threshold) with `rep movsb`. On the AMD EPYC (Zen 3) of these
//! machines `rep movsb` takes its slow path when the destination lies a few
//! bytes past the source modulo 4 KiB: 4 KiB took 1.5–2.4 µs a page with the
//! destination 8 or 16 bytes past (or 4080, 4088 before), 0.12–0.18 µs at
//! every other offset tried, where a loop of 32-byte vector loads and stores
//! took 0.12–0.20 µs at all of them (`docs/ARCHITECTURE.md`, "A page copy
//! that does not depend on where it lands"). A large `Vec` comes from
//! `mmap` through malloc, 16 bytes past a page boundary, so a page copied
//! out of guest RAM (page-aligned) into one hit the slow path every time:
//! the epoch stop's copy took 2.2–2.4 µs a page where it now takes 0.56–0.68.
//!
//! [`copy`] copies with vector loads and stores (AVX2 where the CPU has it,
//! else SSE2, which every x86_64 has), whose speed does not depend on
//! alignment. Elsewhere it is `copy_nonoverlapping`. [`streaming`] copies
//! with non-temporal stores, for pages written once and not read soon (an
//! image's, a journal's).

/// Copies `src` into `dst` (same length).
///
/// # Panics
/// If the lengths differ (a caller's bug).
pub fn copy(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "a copy between slices of one length");
    // SAFETY: two distinct slices (one is borrowed mutably) of `len` bytes.
    unsafe { copy_raw(src.as_ptr(), dst.as_mut_ptr(), src.len()) }
}

/// Appends `src` to `dst`: `extend_from_slice` through [`copy`].
pub fn extend(dst: &mut Vec<u8>, src: &[u8]) {
    let at = dst.len();
    dst.reserve(src.len());
    // SAFETY: `reserve` made room for `src.len()` bytes past `at`; `src`
    // cannot overlap `dst`'s spare capacity (it is borrowed separately), and
    // every byte up to the new length is written before `set_len`.
    unsafe {
        copy_raw(src.as_ptr(), dst.as_mut_ptr().add(at), src.len());
        dst.set_len(at + src.len());
    }
}

/// Copies `len` bytes from `src` to `dst`, as `copy_nonoverlapping` does.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and
/// the two ranges must not overlap. Memory another thread writes meanwhile
/// (guest RAM while the vCPU runs) yields a mix of old and new bytes, as
/// with `copy_nonoverlapping`.
pub unsafe fn copy_raw(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked); the ranges are the caller's.
            unsafe { x86::copy_avx2(src, dst, len) };
        } else {
            // SAFETY: SSE2 is part of x86_64; the ranges are the caller's.
            unsafe { x86::copy_sse2(src, dst, len) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: the caller's contract is `copy_nonoverlapping`'s.
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, len)
    };
}

/// Copies `src` into `dst` (same length) with non-temporal stores where the
/// CPU has them: an image page is written once per epoch and not read again
/// until a promotion, so there is no point in pulling its old bytes into the
/// cache first (a plain copy reads every destination line before writing
/// it) or evicting the next chunk's pages to make room for it. The stores
/// are ordered with everything written after them by [`store_fence`].
pub fn streaming(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "a copy between slices of one length");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let len = dst.len();
        let whole = len & !15;
        if dst.as_ptr().align_offset(16) == 0 {
            let (d, s) = (
                dst.as_mut_ptr().cast::<__m128i>(),
                src.as_ptr().cast::<__m128i>(),
            );
            for i in 0..whole / 16 {
                // SAFETY: SSE2 is part of x86_64; i * 16 + 16 <= whole <= len,
                // the length of both slices, and `d` is 16-byte aligned
                // (checked above).
                unsafe { _mm_stream_si128(d.add(i), _mm_loadu_si128(s.add(i))) };
            }
            dst[whole..len].copy_from_slice(&src[whole..len]);
            return;
        }
    }
    copy(dst, src);
}

/// Orders the non-temporal stores of [`streaming`] before every store
/// after it (the journal's emptying, the record).
pub fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86_64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::hint::black_box;

    use std::arch::x86_64::{
        __m128i, __m256i, _mm_loadu_si128, _mm_storeu_si128, _mm256_loadu_si256, _mm256_store_si256,
    };

    /// The loops below take each step's addresses through `black_box`: a
    /// loop of plain loads and stores at steady strides is what the compiler
    /// turns back into a call of `memcpy` (and so `rep movsb`). The stores
    /// are aligned (the first bytes up to the destination's 32-byte boundary
    /// go on their own): a store that straddles two cache lines costs more
    /// than a load that does.
    ///
    /// # Safety
    /// As `copy_raw`, on a CPU with AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn copy_avx2(src: *const u8, dst: *mut u8, len: usize) {
        let head = dst.align_offset(32).min(len);
        // SAFETY: the first `head` bytes lie within both ranges.
        unsafe { copy_small(src, dst, 0, head) };
        let steps = (len - head) / 128;
        for i in 0..steps {
            let at = head + i * 128;
            // SAFETY: bytes `at..at + 128` lie within both ranges; `dst + at`
            // is 32-byte aligned (`head` aligned it, steps are 128 bytes).
            unsafe {
                let s = black_box(src.add(at)).cast::<__m256i>();
                let d = black_box(dst.add(at)).cast::<__m256i>();
                let (a, b) = (_mm256_loadu_si256(s), _mm256_loadu_si256(s.add(1)));
                let (c, e) = (_mm256_loadu_si256(s.add(2)), _mm256_loadu_si256(s.add(3)));
                _mm256_store_si256(d, a);
                _mm256_store_si256(d.add(1), b);
                _mm256_store_si256(d.add(2), c);
                _mm256_store_si256(d.add(3), e);
            }
        }
        // SAFETY: the rest lies within both ranges.
        unsafe { copy_small(src, dst, head + steps * 128, len) };
    }

    /// # Safety
    /// As `copy_raw`.
    pub(super) unsafe fn copy_sse2(src: *const u8, dst: *mut u8, len: usize) {
        let blocks = len / 16;
        let (s, d) = (src.cast::<__m128i>(), dst.cast::<__m128i>());
        for i in 0..blocks {
            // SAFETY: block `i` lies within both ranges; SSE2 is x86_64's.
            unsafe {
                let v = _mm_loadu_si128(black_box(s.add(i)));
                _mm_storeu_si128(black_box(d.add(i)), v);
            }
        }
        // SAFETY: the rest lies within both ranges.
        unsafe { copy_small(src, dst, blocks * 16, len) };
    }

    /// Bytes `from..len`, fewer than 128: a small `memcpy`, which never uses
    /// `rep movsb`.
    unsafe fn copy_small(src: *const u8, dst: *mut u8, from: usize, len: usize) {
        if from < len {
            // SAFETY: `from..len` lies within both ranges (the caller's).
            unsafe { std::ptr::copy_nonoverlapping(src.add(from), dst.add(from), len - from) };
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::page::PAGE_SIZE;

    #[test]
    fn copies_every_length_at_every_alignment() {
        let src: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in (0..100).chain([4095, 4096, 4097, 8000]) {
            for off in [0usize, 1, 8, 15, 16, 31, 33] {
                let mut dst = vec![0xAAu8; len + 64];
                copy(&mut dst[off..off + len], &src[off / 2..off / 2 + len]);
                assert_eq!(&dst[off..off + len], &src[off / 2..off / 2 + len]);
                assert!(dst[..off].iter().all(|&b| b == 0xAA), "wrote before");
                assert!(dst[off + len..].iter().all(|&b| b == 0xAA), "wrote past");
            }
        }
    }

    #[test]
    fn extends_as_extend_from_slice_does() {
        let mut ours = b"head".to_vec();
        let mut std = ours.clone();
        let page: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        for piece in [&page[..], &page[..17], &[][..], &page[100..]] {
            extend(&mut ours, piece);
            std.extend_from_slice(piece);
        }
        assert_eq!(ours, std);
    }

    #[test]
    fn a_streaming_copy_equals_a_plain_one_at_any_alignment_and_length() {
        let src: Vec<u8> = (0..3 * PAGE_SIZE + 64).map(|i| (i * 7 + 3) as u8).collect();
        // Destinations 0 and 16 bytes past a 16-byte boundary take the
        // streaming path, 1 and 8 the plain one.
        for dst_off in [0usize, 1, 8, 16] {
            for src_off in [0usize, 1, 5, 16] {
                for len in [0usize, 1, 15, 16, 17, 100, PAGE_SIZE, 2 * PAGE_SIZE + 9] {
                    let mut dst = vec![0xeeu8; 16 + dst_off + len + 32];
                    let at = dst.as_ptr().align_offset(16) + dst_off;
                    assert_eq!(dst[at..].as_ptr().align_offset(16) == 0, dst_off % 16 == 0);
                    streaming(&mut dst[at..at + len], &src[src_off..src_off + len]);
                    store_fence();
                    assert_eq!(&dst[at..at + len], &src[src_off..src_off + len]);
                    let around = dst[..at].iter().chain(&dst[at + len..]);
                    assert!(around.copied().all(|b| b == 0xee), "wrote outside");
                }
            }
        }
    }
}
