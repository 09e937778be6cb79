//! Pages, page hashes and the image digest.
//!
//! A page's identity is its xxh3-128 hash (collisions are out of reach at
//! 2^-128, which dedup relies on). The digest of a whole image is the wrapping
//! sum over pages of `xxh3_128(page number ‖ page hash)`: position-dependent,
//! and updated in O(changed pages) by subtracting a page's old term and adding
//! its new one, so the backup can verify every epoch without rehashing RAM.

use twox_hash::XxHash3_128;

/// XXH3-128 with seed 0 (the hash every image, journal and chunk holds).
/// twox-hash picks its AVX2 loop at run time where the CPU has it.
fn xxh3_128(bytes: &[u8]) -> u128 {
    XxHash3_128::oneshot(bytes)
}

/// Size of a guest page.
pub const PAGE_SIZE: usize = 4096;

/// One page of guest memory.
pub type Page = [u8; PAGE_SIZE];

/// Content hash of a page.
pub type PageHash = u128;

/// The all-zero page.
pub static ZERO_PAGE: Page = [0; PAGE_SIZE];

/// Hash of a page's content.
pub fn page_hash(page: &[u8]) -> PageHash {
    xxh3_128(page)
}

/// Hash of the all-zero page (computed once: zero pages are the common
/// case of a sync, and both sides know their hash without reading them).
pub fn zero_page_hash() -> PageHash {
    static HASH: std::sync::OnceLock<PageHash> = std::sync::OnceLock::new();
    *HASH.get_or_init(|| page_hash(&ZERO_PAGE))
}

/// Whether a page is all zeros (compares in 256-byte blocks and stops at the
/// first difference: ~100 GB/s from cache, a few ns for a non-zero page).
pub fn is_zero(page: &[u8]) -> bool {
    page.chunks(256)
        .all(|block| block == &ZERO_PAGE[..block.len()])
}

fn term(page: u32, hash: PageHash) -> u128 {
    let mut bytes = [0u8; 20];
    bytes[..4].copy_from_slice(&page.to_le_bytes());
    bytes[4..].copy_from_slice(&hash.to_le_bytes());
    xxh3_128(&bytes)
}

/// Digest of a whole image, maintained incrementally.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ImageDigest(pub u128);

impl ImageDigest {
    /// Digest of an image given every page's hash.
    pub fn of_hashes(hashes: &[PageHash]) -> Self {
        let mut d = Self::default();
        for (page, &hash) in hashes.iter().enumerate() {
            d.0 = d.0.wrapping_add(term(page as u32, hash));
        }
        d
    }

    /// Digest of an all-zero image of `pages` pages.
    pub fn of_zero_image(pages: u32) -> Self {
        let zero = zero_page_hash();
        let mut d = Self::default();
        for page in 0..pages {
            d.0 = d.0.wrapping_add(term(page, zero));
        }
        d
    }

    /// Updates the digest for `page` changing from `old` to `new`.
    pub fn replace(&mut self, page: u32, old: PageHash, new: PageHash) {
        if old != new {
            self.0 = self
                .0
                .wrapping_sub(term(page, old))
                .wrapping_add(term(page, new));
        }
    }
}

impl std::fmt::Display for ImageDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut page = [0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        page[PAGE_SIZE - 1] = 1;
        assert!(!is_zero(&page));
        page[PAGE_SIZE - 1] = 0;
        page[0] = 1;
        assert!(!is_zero(&page));
    }

    #[test]
    fn incremental_digest_equals_full_recomputation() {
        let mut hashes: Vec<PageHash> = vec![zero_page_hash(); 16];
        let mut digest = ImageDigest::of_zero_image(16);
        assert_eq!(digest, ImageDigest::of_hashes(&hashes));
        for (page, byte) in [(3u32, 1u8), (7, 2), (3, 3)] {
            let new = page_hash(&[byte; PAGE_SIZE]);
            digest.replace(page, hashes[page as usize], new);
            hashes[page as usize] = new;
        }
        assert_eq!(digest, ImageDigest::of_hashes(&hashes));
        // Swapping two pages' contents changes the digest (it is positional).
        let mut swapped = hashes.clone();
        swapped.swap(3, 7);
        assert_ne!(ImageDigest::of_hashes(&swapped), digest);
    }

    /// Every hash on disk and on the wire (images, journals, chunks checked
    /// by their page hashes, a release before this one) was made by
    /// `xxhash-rust`'s XXH3-128; the hash we compute now must be the same
    /// function, at every length and whichever SIMD loop the CPU picks.
    #[test]
    fn the_page_hash_is_the_xxh3_128_that_images_and_peers_already_hold() {
        // The reference's own known answer for no input.
        assert_eq!(xxh3_128(&[]), 0x99aa06d3014798d86001c324468d497f);
        let mut bytes = vec![0u8; 3 * PAGE_SIZE + 17];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in &mut bytes {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        // Every short and medium length, the long path at page sizes and
        // around its block and stripe boundaries, and unaligned starts.
        let lengths = (0..=300).chain([
            1023,
            1024,
            1025,
            4095,
            PAGE_SIZE,
            4097,
            2 * PAGE_SIZE,
            3 * PAGE_SIZE,
        ]);
        for len in lengths {
            for start in [0, 1, 17] {
                let input = &bytes[start..start + len];
                assert_eq!(
                    xxh3_128(input),
                    xxhash_rust::xxh3::xxh3_128(input),
                    "length {len} at offset {start}"
                );
            }
        }
        assert_eq!(
            page_hash(&ZERO_PAGE),
            xxhash_rust::xxh3::xxh3_128(&ZERO_PAGE)
        );
        assert_eq!(
            term(7, 9),
            xxhash_rust::xxh3::xxh3_128(&[
                7, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ])
        );
    }
}
