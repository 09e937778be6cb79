//! Page codecs: how one dirty page is written into an epoch, and read back.
//!
//! | id | codec        | payload                                   | decoded from              |
//! |----|--------------|-------------------------------------------|---------------------------|
//! | 0  | `Zero`       | none                                      | nothing                   |
//! | 1  | `Raw`        | 4096 bytes                                | the payload               |
//! | 2  | `Lz4`        | u16 length + lz4 block                    | the payload               |
//! | 3  | `Zstd`       | u16 length + zstd frame                   | the payload               |
//! | 4  | `SameAs`     | u32 page                                  | that page, as committed   |
//! | 5  | `RepeatOf`   | u32 page (earlier in this epoch)          | that page's new content   |
//! | 6  | `DeltaWords` | u16 n + n × (u16 word index, u64 xor)      | this page, as committed   |
//! | 7  | `DeltaLz4`   | u16 length + lz4 of (new xor committed)   | this page, as committed   |
//!
//! "As committed" is the receiver's image before the epoch: every reference
//! resolves against it (or, for `RepeatOf`, against the epoch's own earlier
//! pages), so decoding does not depend on the order pages are applied in.
//! The choice of codec is the sender's ([`crate::epoch::EpochEncoder`]).

use crate::page::{PAGE_SIZE, Page};

/// Words in a page, for word deltas.
pub const PAGE_WORDS: usize = PAGE_SIZE / 8;

/// The codec of one encoded page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    /// All zero: no payload.
    Zero = 0,
    /// The page as is.
    Raw = 1,
    /// lz4-compressed.
    Lz4 = 2,
    /// zstd-compressed.
    Zstd = 3,
    /// The same as another page of the committed image (dedup).
    SameAs = 4,
    /// The same as a page sent earlier in this epoch.
    RepeatOf = 5,
    /// A few changed words against this page as committed.
    DeltaWords = 6,
    /// lz4 of the XOR against this page as committed.
    DeltaLz4 = 7,
}

impl Codec {
    /// Every codec, indexed by its id.
    pub const ALL: [Codec; 8] = [
        Self::Zero,
        Self::Raw,
        Self::Lz4,
        Self::Zstd,
        Self::SameAs,
        Self::RepeatOf,
        Self::DeltaWords,
        Self::DeltaLz4,
    ];

    /// The codec with wire id `v`, if any.
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }

    /// Its name in reports and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Zero => "zero",
            Self::Raw => "raw",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
            Self::SameAs => "same-as",
            Self::RepeatOf => "repeat-of",
            Self::DeltaWords => "delta-words",
            Self::DeltaLz4 => "delta-lz4",
        }
    }
}

/// How full pages are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Never: full pages go raw.
    None,
    /// lz4: fast, for LAN links.
    Lz4,
    /// zstd at the given level (1–19): for slow links.
    Zstd(i32),
}

/// Which encodings the sender may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodecPolicy {
    /// Send all-zero pages as `Zero`.
    pub zero: bool,
    /// Send pages whose content the receiver already holds as references.
    pub dedup: bool,
    /// Send XOR deltas against the previous version of a page.
    pub delta: bool,
    /// Compression for full pages (and word-dense deltas).
    pub compression: Compression,
    /// Pages of previous versions kept for deltas (bounded memory:
    /// `delta_cache_pages` × 4 KiB).
    pub delta_cache_pages: usize,
    /// Stop compressing full pages while recent pages do not shrink by at
    /// least 1/8 (re-checked periodically), so incompressible memory costs no
    /// CPU; see [`Adaptive`].
    pub adaptive: bool,
}

impl CodecPolicy {
    /// Every page raw: the baseline.
    pub const RAW: CodecPolicy = CodecPolicy {
        zero: false,
        dedup: false,
        delta: false,
        compression: Compression::None,
        delta_cache_pages: 0,
        adaptive: false,
    };

    /// Zero, dedup, delta, and lz4 on every full page (a page lz4 does not
    /// shrink still goes raw), whatever the link.
    pub const LZ4: CodecPolicy = CodecPolicy {
        adaptive: false,
        ..Self::ADAPTIVE
    };

    /// The default: zero, dedup, delta, lz4, adaptive.
    pub const ADAPTIVE: CodecPolicy = CodecPolicy {
        zero: true,
        dedup: true,
        delta: true,
        compression: Compression::Lz4,
        delta_cache_pages: 8192,
        adaptive: true,
    };
}

impl Default for CodecPolicy {
    fn default() -> Self {
        Self::ADAPTIVE
    }
}

/// Sparse deltas with at most this many changed words are sent as a word list
/// (10 bytes a word); denser ones are compressed whole.
pub const MAX_DELTA_WORDS: usize = 192;

/// A full page is sent compressed only if that saves at least 1/8.
const WORTHWHILE: usize = PAGE_SIZE - PAGE_SIZE / 8;

fn words(page: &[u8]) -> impl Iterator<Item = u64> + '_ {
    page.chunks_exact(8).map(|w| {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        u64::from_le_bytes(b)
    })
}

/// Appends the word-list delta of `new` against `old` if it has at most
/// `MAX_DELTA_WORDS` changed words. Otherwise appends nothing and returns the
/// number of changed words (so the caller can tell a dense delta of related
/// pages from unrelated pages).
pub fn encode_delta_words(old: &Page, new: &Page, out: &mut Vec<u8>) -> Result<(), usize> {
    let start = out.len();
    out.extend_from_slice(&[0, 0]);
    let mut n = 0usize;
    for (i, (a, b)) in words(old).zip(words(new)).enumerate() {
        if a != b {
            n += 1;
            if n <= MAX_DELTA_WORDS {
                out.extend_from_slice(&(i as u16).to_le_bytes());
                out.extend_from_slice(&(a ^ b).to_le_bytes());
            }
        }
    }
    if n > MAX_DELTA_WORDS {
        out.truncate(start);
        return Err(n);
    }
    out[start..start + 2].copy_from_slice(&(n as u16).to_le_bytes());
    Ok(())
}

/// Appends `u16 length + compressed` if compression saves at least 1/8.
pub fn encode_compressed(page: &[u8], compression: Compression, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    out.extend_from_slice(&[0, 0]);
    let len = match compression {
        Compression::None => None,
        Compression::Lz4 => {
            out.resize(
                start + 2 + lz4_flex::block::get_maximum_output_size(PAGE_SIZE),
                0,
            );
            lz4_flex::block::compress_into(page, &mut out[start + 2..]).ok()
        }
        Compression::Zstd(level) => {
            out.resize(start + 2 + zstd::zstd_safe::compress_bound(PAGE_SIZE), 0);
            zstd::bulk::compress_to_buffer(page, &mut out[start + 2..], level).ok()
        }
    };
    match len {
        Some(len) if len <= WORTHWHILE => {
            out.truncate(start + 2 + len);
            out[start..start + 2].copy_from_slice(&(len as u16).to_le_bytes());
            true
        }
        _ => {
            out.truncate(start);
            false
        }
    }
}

/// Why a page payload could not be decoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The payload ends early.
    #[error("{codec} payload is cut short")]
    Truncated {
        /// The codec's name.
        codec: &'static str,
    },
    /// Compressed bytes that do not make one page.
    #[error("{codec} payload does not decompress to one page")]
    BadCompressed {
        /// The codec's name.
        codec: &'static str,
    },
    /// A word delta names a word beyond the page.
    #[error("delta word index {index} is outside the page")]
    BadWordIndex {
        /// The index it names.
        index: u16,
    },
    /// A word delta with more words than a page has.
    #[error("delta has {count} words, more than a page holds")]
    BadWordCount {
        /// The count it claims.
        count: u16,
    },
}

/// A cursor over untrusted bytes.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A cursor at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    /// Nothing is left.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// The next `n` bytes, or None (and nothing consumed) if fewer are left.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    /// The next byte.
    pub fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    /// The next little-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    /// The next little-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Some(u32::from_le_bytes(a))
    }

    /// The next little-endian u64.
    pub fn u64(&mut self) -> Option<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Some(u64::from_le_bytes(a))
    }

    /// The next little-endian u128.
    pub fn u128(&mut self) -> Option<u128> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Some(u128::from_le_bytes(a))
    }
}

/// Decodes a compressed payload (`Lz4`, `Zstd`) into `out`.
pub fn decode_compressed(
    codec: Codec,
    r: &mut Reader<'_>,
    out: &mut Page,
) -> Result<(), CodecError> {
    let name = codec.name();
    let truncated = || CodecError::Truncated { codec: name };
    let bad = || CodecError::BadCompressed { codec: name };
    match codec {
        Codec::Lz4 => {
            let len = r.u16().ok_or_else(truncated)? as usize;
            let data = r.take(len).ok_or_else(truncated)?;
            let n = lz4_flex::block::decompress_into(data, out).map_err(|_| bad())?;
            if n != PAGE_SIZE {
                return Err(bad());
            }
        }
        Codec::Zstd => {
            let len = r.u16().ok_or_else(truncated)? as usize;
            let data = r.take(len).ok_or_else(truncated)?;
            let n = zstd::bulk::decompress_to_buffer(data, &mut out[..]).map_err(|_| bad())?;
            if n != PAGE_SIZE {
                return Err(bad());
            }
        }
        _ => unreachable!("decode_compressed is only called for compressed codecs"),
    }
    Ok(())
}

/// Applies a delta payload to `out`, which holds the base (committed) page.
pub fn apply_delta(codec: Codec, r: &mut Reader<'_>, out: &mut Page) -> Result<(), CodecError> {
    let name = codec.name();
    let truncated = || CodecError::Truncated { codec: name };
    match codec {
        Codec::DeltaWords => {
            let count = r.u16().ok_or_else(truncated)?;
            if count as usize > PAGE_WORDS {
                return Err(CodecError::BadWordCount { count });
            }
            for _ in 0..count {
                let index = r.u16().ok_or_else(truncated)?;
                let xor = r.u64().ok_or_else(truncated)?;
                let at = index as usize * 8;
                let word = out
                    .get_mut(at..at + 8)
                    .ok_or(CodecError::BadWordIndex { index })?;
                let mut b = [0u8; 8];
                b.copy_from_slice(word);
                word.copy_from_slice(&(u64::from_le_bytes(b) ^ xor).to_le_bytes());
            }
        }
        Codec::DeltaLz4 => {
            let mut xor = [0u8; PAGE_SIZE];
            decode_compressed(Codec::Lz4, r, &mut xor).map_err(|e| match e {
                CodecError::Truncated { .. } => truncated(),
                _ => CodecError::BadCompressed { codec: name },
            })?;
            for (o, x) in out.iter_mut().zip(xor) {
                *o ^= x;
            }
        }
        _ => unreachable!("apply_delta is only called for delta codecs"),
    }
    Ok(())
}

/// Adaptive compression: samples whether compressing full pages pays, on
/// this link and this CPU. Encoding and the link work at the same time, so a
/// stream of pages goes at the pace of the slower of the two: raw, at the
/// link's (the encoder's raw copy is far faster); compressed, at the slower
/// of the compressor and the link carrying the smaller pages. Compression
/// therefore pays when it saves at least an eighth of the bytes (less is not
/// worth a core) *and* the encoder while compressing, measured over the last
/// [`SAMPLE_PAGES`] pages it compressed (its whole time for each: hash,
/// compress, frame; not the compressor's alone, which on a fast link made
/// it compress at a third of raw's pace), takes in guest bytes faster than
/// the link carries them. When it does not pay, pages go raw for the next
/// [`SKIP_PAGES`], then it samples again; each decision against in a row
/// doubles that (up to [`MAX_SKIP_PAGES`]), so on a fast link sampling costs
/// well under 1 % of the pages. A decision against because the link is at
/// least [`CLEAR_MARGIN`] times the compressor's pace skips the longest
/// stretch at once (a sample costs the encoder three times a raw page's
/// time, and on a short burst of checkpoints the doubling never got that
/// far), and a link measured slower than that compressor pace since then
/// ends the stretch: the next page samples. Without a measured link rate,
/// the eighth alone decides.
#[derive(Clone, Debug, Default)]
pub struct Adaptive {
    tried: u32,
    saved: u64,
    /// The encoder's time for each page of the sample, in nanoseconds.
    spent: Vec<u32>,
    skip: u32,
    /// Pages to go raw after the next decision against (doubles in a row).
    skip_len: u32,
    link: Option<f64>,
    last: Option<AdaptiveReport>,
}

/// Pages compressed per decision.
pub const SAMPLE_PAGES: u32 = 256;
/// Pages sent raw after a decision against compressing, before sampling again.
pub const SKIP_PAGES: u32 = 4096;
/// The longest raw stretch between samples.
pub const MAX_SKIP_PAGES: u32 = 65536;
/// Compression pays only if it saves at least this share of the bytes
/// (less is not worth a core).
pub const MIN_SAVED_SHARE: f64 = 1.0 / 8.0;
/// A link this many times faster than the compressor decides against
/// compressing for the longest stretch at once.
pub const CLEAR_MARGIN: f64 = 2.0;

/// The adaptive codec's last decision and what it was made from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaptiveReport {
    /// Whether full pages are being compressed.
    pub compressing: bool,
    /// The encoder's rate while compressing, over the last sample (its
    /// whole time for each page it compressed), guest bytes per second.
    pub compress_rate: f64,
    /// Share of the sampled bytes compression saved.
    pub saved_share: f64,
    /// The link rate the decision used, bytes per second (None: unknown).
    pub link_rate: Option<f64>,
}

impl Adaptive {
    /// Whether to try compressing the next full page.
    pub fn should_try(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// Whether the next full page will be tried ([`Self::should_try`] says
    /// yes): the encoder times only the pages of a sample.
    pub fn sampling(&self) -> bool {
        self.skip == 0
    }

    /// The link's measured rate in bytes per second (None: not known).
    pub fn set_link_rate(&mut self, bytes_per_second: Option<f64>) {
        self.link = bytes_per_second.filter(|r| r.is_finite() && *r > 0.0);
        // Raw because the link outran the compressor, and now it does not:
        // the next page samples (the stretch may be long, see `record`).
        if self.skip > 0
            && let (Some(link), Some(last)) = (self.link, self.last)
            && !last.compressing
            && last.saved_share >= MIN_SAVED_SHARE
            && link < last.compress_rate
        {
            self.skip = 0;
            self.skip_len = SKIP_PAGES;
        }
    }

    /// Records the outcome of one attempt (`out_len` = PAGE_SIZE if it did
    /// not pay) and the encoder's whole time for that page. The sample's
    /// time is its median page's times the pages: a page the encoder
    /// thread was preempted in (or took a page fault in) would otherwise
    /// count for milliseconds and turn compression off on a slow link.
    pub fn record(&mut self, out_len: usize, took: std::time::Duration) {
        self.tried += 1;
        self.saved += (PAGE_SIZE - out_len.min(PAGE_SIZE)) as u64;
        self.spent
            .push(u32::try_from(took.as_nanos()).unwrap_or(u32::MAX));
        if self.tried == SAMPLE_PAGES {
            let sampled = (SAMPLE_PAGES as u64 * PAGE_SIZE as u64) as f64;
            let middle = self.spent.len() / 2;
            let median_ns = *self.spent.select_nth_unstable(middle).1;
            let spent = (f64::from(median_ns) * 1e-9 * f64::from(SAMPLE_PAGES)).max(1e-9);
            let compress_rate = sampled / spent;
            let saved_share = self.saved as f64 / sampled;
            let shrinks = saved_share >= MIN_SAVED_SHARE;
            let pays = shrinks && self.link.is_none_or(|link| compress_rate > link);
            let clearly_outrun = self
                .link
                .is_some_and(|link| link >= CLEAR_MARGIN * compress_rate);
            if pays {
                self.skip_len = SKIP_PAGES;
            } else if shrinks && clearly_outrun {
                // `set_link_rate` ends the stretch if the link slows.
                self.skip = MAX_SKIP_PAGES;
                self.skip_len = MAX_SKIP_PAGES;
            } else {
                self.skip_len = self.skip_len.clamp(SKIP_PAGES, MAX_SKIP_PAGES);
                self.skip = self.skip_len;
                self.skip_len = self.skip_len.saturating_mul(2).min(MAX_SKIP_PAGES);
            }
            self.last = Some(AdaptiveReport {
                compressing: pays,
                compress_rate,
                saved_share,
                link_rate: self.link,
            });
            self.tried = 0;
            self.saved = 0;
            self.spent.clear();
        }
    }

    /// Whether the last decision found the link faster than the compressor:
    /// then bytes saved are worth less than the encoder's time, and word
    /// deltas (and keeping the pages they need) are skipped too.
    pub fn link_outruns_compressor(&self) -> bool {
        self.last.is_some_and(|last| {
            !last.compressing && self.link.is_some_and(|link| last.compress_rate < link)
        })
    }

    /// The last decision; None before the first.
    pub fn report(&self) -> Option<AdaptiveReport> {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_with(f: impl FnMut(usize) -> u8) -> Page {
        std::array::from_fn(f)
    }

    #[test]
    fn a_few_pages_the_encoder_was_preempted_in_do_not_turn_compression_off() {
        let decide = |slow_pages: u32, slow: std::time::Duration| {
            let mut a = Adaptive::default();
            a.set_link_rate(Some(100e6));
            for i in 0..SAMPLE_PAGES {
                let took = if i < slow_pages {
                    slow
                } else {
                    std::time::Duration::from_micros(9)
                };
                a.record(PAGE_SIZE / 2, took);
            }
            a.report().expect("decided after a sample").compressing
        };
        // Three pages of 20 ms (a preemption each) among 9 µs ones: the sum
        // would say 17 MB/s, the encoder's pace is 455 MB/s.
        assert!(decide(3, std::time::Duration::from_millis(20)));
        // An encoder slower than the link on most pages: raw.
        assert!(!decide(
            SAMPLE_PAGES / 2 + 1,
            std::time::Duration::from_micros(50)
        ));
    }

    #[test]
    fn adaptive_compresses_on_a_slow_link_and_goes_raw_on_a_fast_one() {
        let decide = |link: Option<f64>, out_len: usize| {
            let mut a = Adaptive::default();
            a.set_link_rate(link);
            for _ in 0..SAMPLE_PAGES {
                assert!(a.should_try());
                // lz4's measured speed on these machines: ~0.45 GB/s a core.
                a.record(out_len, std::time::Duration::from_micros(9));
            }
            let report = a.report().expect("decided after a sample");
            assert_eq!(
                report.compressing,
                a.should_try(),
                "the decision is applied"
            );
            report
        };
        // The compressor takes 4 KiB in 9 µs (455 MB/s): slower than a
        // 1.1 GB/s link (raw goes faster), faster than a 1 Gbit/s one, where
        // even a quarter saved pays (the link then sets the pace).
        assert!(decide(Some(100e6), PAGE_SIZE / 2).compressing);
        assert!(decide(Some(122e6), PAGE_SIZE * 3 / 4).compressing);
        assert!(!decide(Some(1.1e9), PAGE_SIZE / 2).compressing);
        assert!(!decide(Some(10e9), PAGE_SIZE / 2).compressing);
        // Saving less than an eighth is not worth a core, however slow the link.
        assert!(!decide(Some(1e6), PAGE_SIZE - 100).compressing);
        // Unknown link: an eighth saved is the bar.
        assert!(decide(None, PAGE_SIZE / 2).compressing);
        assert!(!decide(None, PAGE_SIZE - 100).compressing);
        let r = decide(Some(100e6), PAGE_SIZE / 2);
        assert!((r.saved_share - 0.5).abs() < 1e-9, "{r:?}");
        assert!(
            (r.compress_rate - PAGE_SIZE as f64 / 9e-6).abs() < 1.0,
            "{r:?}"
        );
        // Word deltas are skipped only when the link outran the compressor
        // (not when pages merely did not shrink, nor when the link is unknown).
        let outruns = |link: Option<f64>, out_len: usize| {
            let mut a = Adaptive::default();
            a.set_link_rate(link);
            assert!(!a.link_outruns_compressor(), "no decision yet");
            for _ in 0..SAMPLE_PAGES {
                a.record(out_len, std::time::Duration::from_micros(9));
            }
            a.link_outruns_compressor()
        };
        assert!(outruns(Some(10e9), PAGE_SIZE / 2));
        assert!(!outruns(Some(100e6), PAGE_SIZE / 2));
        assert!(!outruns(Some(100e6), PAGE_SIZE - 100));
        assert!(!outruns(None, PAGE_SIZE - 100));
        // Raw for SKIP_PAGES after a decision against, then sampling again
        // (a link under CLEAR_MARGIN times the compressor's 455 MB/s).
        let mut a = Adaptive::default();
        a.set_link_rate(Some(0.8e9));
        for _ in 0..SAMPLE_PAGES {
            a.record(PAGE_SIZE / 2, std::time::Duration::from_micros(9));
        }
        assert!(!a.sampling(), "the encoder would time raw pages");
        assert_eq!((0..SKIP_PAGES).filter(|_| a.should_try()).count(), 0);
        assert!(a.sampling(), "the encoder would not time the sample");
        assert!(a.should_try());
        // Each decision against in a row doubles the raw stretch, up to a cap;
        // one in favour starts over.
        let mut stretches = Vec::new();
        for _ in 0..6 {
            for _ in 0..SAMPLE_PAGES {
                a.record(PAGE_SIZE / 2, std::time::Duration::from_micros(9));
            }
            let mut raw = 0;
            while !a.should_try() {
                raw += 1;
            }
            stretches.push(raw);
        }
        assert_eq!(stretches, [8192, 16384, 32768, 65536, 65536, 65536]);
        a.set_link_rate(Some(100e6));
        for _ in 0..SAMPLE_PAGES {
            a.record(PAGE_SIZE / 2, std::time::Duration::from_micros(9));
        }
        assert!(a.should_try() && a.report().is_some_and(|r| r.compressing));
        a.set_link_rate(Some(0.8e9));
        for _ in 0..SAMPLE_PAGES {
            a.record(PAGE_SIZE / 2, std::time::Duration::from_micros(9));
        }
        assert_eq!(
            (0..SKIP_PAGES + 1).take_while(|_| !a.should_try()).count(),
            SKIP_PAGES as usize
        );
    }

    #[test]
    fn a_link_far_faster_than_the_compressor_skips_long_until_it_slows() {
        // The compressor at 455 MB/s (4 KiB in 9 µs), halving the pages.
        let sample = |a: &mut Adaptive| {
            for _ in 0..SAMPLE_PAGES {
                assert!(a.should_try());
                a.record(PAGE_SIZE / 2, std::time::Duration::from_micros(9));
            }
        };
        let stretch = |a: &mut Adaptive| (0..).take_while(|_| !a.should_try()).count();
        // A 10 GB/s link: the longest stretch at once.
        let mut a = Adaptive::default();
        a.set_link_rate(Some(10e9));
        sample(&mut a);
        assert_eq!(stretch(&mut a), MAX_SKIP_PAGES as usize);
        // Mid-stretch, the link still outruns the compressor: it goes on.
        sample(&mut a);
        assert!((0..1000).all(|_| !a.should_try()));
        a.set_link_rate(Some(0.6e9));
        assert!(
            !a.sampling(),
            "a link still faster than lz4 ended the stretch"
        );
        // It slows below the compressor's pace: the next page samples, and
        // compressing pays again.
        a.set_link_rate(Some(0.3e9));
        assert!(a.sampling(), "the stretch went on over a slow link");
        sample(&mut a);
        assert!(a.report().is_some_and(|r| r.compressing));
        // Pages that do not shrink on a fast link: the doubling stretches,
        // and a slower link does not end them (compressing would not pay).
        let mut a = Adaptive::default();
        a.set_link_rate(Some(10e9));
        for _ in 0..SAMPLE_PAGES {
            a.record(PAGE_SIZE, std::time::Duration::from_micros(9));
        }
        a.set_link_rate(Some(1e6));
        assert_eq!(stretch(&mut a), SKIP_PAGES as usize);
    }

    #[test]
    fn word_delta_round_trips_and_gives_up_when_dense() {
        let old = page_with(|i| i as u8);
        let mut new = old;
        new[8] ^= 0xff;
        new[4095] = 7;
        let mut out = Vec::new();
        assert!(encode_delta_words(&old, &new, &mut out).is_ok());
        assert_eq!(out.len(), 2 + 2 * 10);
        let mut base = old;
        apply_delta(Codec::DeltaWords, &mut Reader::new(&out), &mut base).unwrap();
        assert_eq!(base, new);

        let dense = page_with(|i| (i * 7) as u8 ^ 0x5a);
        let mut out = vec![9];
        assert!(encode_delta_words(&old, &dense, &mut out).unwrap_err() > MAX_DELTA_WORDS);
        assert_eq!(out, vec![9], "nothing left behind");
    }

    #[test]
    fn compression_round_trips_and_is_skipped_when_it_does_not_pay() {
        let text = page_with(|i| b"understudy "[i % 11]);
        for compression in [Compression::Lz4, Compression::Zstd(3)] {
            let mut out = Vec::new();
            assert!(encode_compressed(&text, compression, &mut out));
            let codec = if compression == Compression::Lz4 {
                Codec::Lz4
            } else {
                Codec::Zstd
            };
            let mut page = [0u8; PAGE_SIZE];
            decode_compressed(codec, &mut Reader::new(&out), &mut page).unwrap();
            assert_eq!(page, text);
        }
        let mut state = 0x1234_5678_9abc_def0u64;
        let noise = page_with(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        });
        let mut out = Vec::new();
        assert!(!encode_compressed(&noise, Compression::Lz4, &mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        let mut page = [0u8; PAGE_SIZE];
        let cases: &[(Codec, &[u8])] = &[
            (Codec::Lz4, &[10, 0, 1]),
            (Codec::Lz4, &[3, 0, 0xff, 0xff, 0xff]),
            (Codec::Zstd, &[2, 0, 1, 2]),
            (Codec::DeltaWords, &[1, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]),
            (Codec::DeltaWords, &[0xff, 0xff]),
            (Codec::DeltaWords, &[1, 0, 1]),
            (Codec::DeltaLz4, &[5, 0]),
        ];
        for (codec, bytes) in cases {
            let r = &mut Reader::new(bytes);
            let result = match codec {
                Codec::DeltaWords | Codec::DeltaLz4 => apply_delta(*codec, r, &mut page),
                _ => decode_compressed(*codec, r, &mut page),
            };
            assert!(result.is_err(), "{codec:?} {bytes:?} was accepted");
        }
    }

    #[test]
    fn adaptive_stops_trying_on_incompressible_pages_and_probes_again() {
        let mut a = Adaptive::default();
        for _ in 0..SAMPLE_PAGES {
            assert!(a.should_try());
            a.record(PAGE_SIZE, std::time::Duration::from_micros(9));
        }
        let skipped = (0..SKIP_PAGES).filter(|_| !a.should_try()).count();
        assert_eq!(skipped, SKIP_PAGES as usize);
        assert!(a.should_try(), "probes again after the skip window");
    }
}
