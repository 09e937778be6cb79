//! A set of dirty guest pages, one bit per 4 KiB page, in the same word layout
//! as KVM's dirty log (bit `i % 64` of word `i / 64` is page `i`).
//!
//! This is what a harvest returns: the union of KVM's log and the VMM's own
//! writes. It knows nothing of where the bits came from or where pages go.

use std::ops::Range;

/// Dirty pages of one memory slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl DirtyBitmap {
    /// An empty set over `pages` pages.
    pub fn new(pages: usize) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64)],
            pages,
        }
    }

    /// A set of every page, e.g. for a full copy.
    pub fn full(pages: usize) -> Self {
        let mut set = Self::new(pages);
        set.words.fill(u64::MAX);
        set.clear_tail();
        set
    }

    /// Wraps words in KVM's layout; words past `pages` are ignored.
    pub fn from_words(mut words: Vec<u64>, pages: usize) -> Self {
        words.resize(pages.div_ceil(64), 0);
        let mut set = Self { words, pages };
        set.clear_tail();
        set
    }

    fn clear_tail(&mut self) {
        let rem = self.pages % 64;
        if rem != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << rem) - 1;
        }
    }

    /// Number of pages this set covers (dirty or not).
    pub fn len_pages(&self) -> usize {
        self.pages
    }

    /// The raw words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Adds every page of `other` (same layout; extra words are ignored).
    pub fn union_words(&mut self, other: &[u64]) {
        for (word, extra) in self.words.iter_mut().zip(other) {
            *word |= extra;
        }
        self.clear_tail();
    }

    /// Marks `page` dirty. Pages outside the set are ignored.
    pub fn set(&mut self, page: usize) {
        if page < self.pages {
            self.words[page / 64] |= 1 << (page % 64);
        }
    }

    /// Marks `page` clean. Pages outside the set are ignored.
    pub fn unset(&mut self, page: usize) {
        if page < self.pages {
            self.words[page / 64] &= !(1 << (page % 64));
        }
    }

    /// Whether `page` is dirty.
    pub fn contains(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Dirty page numbers in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(i * 64 + bit)
            })
        })
    }

    /// Dirty page numbers in ascending order, as the checkpoint encoder and
    /// the write-protected copy take them.
    pub fn page_numbers(&self) -> Vec<u32> {
        self.iter().map(|p| p as u32).collect()
    }

    /// Maximal runs of consecutive dirty pages, ascending.
    pub fn ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let mut pages = self.iter().peekable();
        std::iter::from_fn(move || {
            let start = pages.next()?;
            let mut end = start + 1;
            while pages.peek() == Some(&end) {
                pages.next();
                end += 1;
            }
            Some(start..end)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iter_and_ranges_agree() {
        let mut set = DirtyBitmap::new(200);
        for page in [0, 1, 2, 63, 64, 65, 130, 199] {
            set.set(page);
        }
        set.set(200); // outside: ignored
        assert_eq!(set.count(), 8);
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            vec![0, 1, 2, 63, 64, 65, 130, 199]
        );
        assert_eq!(
            set.ranges().collect::<Vec<_>>(),
            vec![0..3, 63..66, 130..131, 199..200]
        );
        assert!(set.contains(64) && !set.contains(66) && !set.contains(500));
    }

    #[test]
    fn full_and_from_words_respect_the_page_count() {
        let full = DirtyBitmap::full(70);
        assert_eq!(full.count(), 70);
        assert_eq!(full.ranges().collect::<Vec<_>>(), vec![0..70]);
        let set = DirtyBitmap::from_words(vec![u64::MAX, u64::MAX, 1], 65);
        assert_eq!(set.count(), 65);
        let mut union = DirtyBitmap::new(65);
        union.union_words(&[1 << 5, 1]);
        assert_eq!(union.iter().collect::<Vec<_>>(), vec![5, 64]);
        assert!(DirtyBitmap::new(10).is_empty());
    }
}
