//! Epochs: the unit of replication. The sender ([`SenderState`] +
//! [`EpochEncoder`]) turns dirty pages and a device-state blob into chunks; the
//! receiver ([`EpochDecoder`]) turns chunks back into a [`StagedEpoch`], checked
//! against the receiver's committed image, without touching that image.
//!
//! ```text
//! chunk seq:  0        1 … k          k+1 … m         m+1
//!           Begin → Pages … Pages → Device … Device → End
//!   Begin:  kind u8, generation u64, ram_pages u32, vm_id (u16 len + UTF-8)
//!   Pages:  runs of { first_page u32, count u16, count × (codec u8, payload) }
//!   Device: a slice of the device-state blob
//!   End:    chunks u32, pages u32, device_len u32, device_crc u32, digest u128
//! ```
//!
//! Two kinds of epoch: a **checkpoint** (a consistent VM state: dirty pages,
//! device state and the digest of the image after applying it; committed
//! atomically) and a **sync round** (pages streamed while the guest runs during
//! the initial sync; written straight into an image that is not yet committed).
//!
//! The sender tracks what the receiver holds (page hashes, a dedup index and a
//! bounded cache of previous page versions) *as if every epoch it encodes is
//! committed*. If one is not, that state is wrong: the caller must drop the
//! `SenderState` and run a full sync again.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lru::LruCache;

use crate::chunk::{self, CHUNK_HEADER_LEN, ChunkError, ChunkKind, MAX_CHUNK_BODY};
use crate::codec::{
    self, Adaptive, AdaptiveReport, Codec, CodecError, CodecPolicy, Compression, Reader,
    encode_compressed, encode_delta_words,
};
use crate::copy;
use crate::page::{
    ImageDigest, PAGE_SIZE, Page, PageHash, ZERO_PAGE, is_zero, page_hash, zero_page_hash,
};

/// Longest VM id.
pub const MAX_VM_ID_LEN: usize = 128;
/// Largest device-state blob an epoch may carry.
pub const MAX_DEVICE_STATE: usize = 16 << 20;

/// What an epoch is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EpochKind {
    /// A consistent checkpoint, committed atomically.
    Checkpoint = 0,
    /// Pages of an initial sync, streamed while the guest runs.
    SyncRound = 1,
}

/// Identity and position of an epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochHeader {
    /// The VM it belongs to.
    pub vm_id: String,
    /// The sender's fencing generation.
    pub generation: u64,
    /// Its number: each epoch follows the last committed one.
    pub epoch: u64,
    /// Guest RAM in pages.
    pub ram_pages: u32,
    /// A sync round or a checkpoint.
    pub kind: EpochKind,
}

/// Per-epoch encoding figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodeReport {
    /// Pages per codec, indexed by `Codec as usize`.
    pub pages_by_codec: [u64; 8],
    /// Pages in the epoch.
    pub pages: u64,
    /// Pages left out: the receiver holds their content already (see
    /// [`SenderState::over_zeroed_image`]); not in `pages`.
    pub pages_held: u64,
    /// Guest bytes in (pages × 4 KiB).
    pub bytes_in: u64,
    /// Bytes out: all chunks, framing included.
    pub bytes_out: u64,
    /// The device state's size.
    pub device_state_bytes: u64,
    /// Chunks made.
    pub chunks: u32,
    /// Time spent encoding (pages and device state, not waiting).
    pub encode_time: Duration,
}

impl EncodeReport {
    /// Bytes out ÷ bytes in.
    pub fn ratio(&self) -> f64 {
        if self.bytes_in == 0 {
            return 0.0;
        }
        self.bytes_out as f64 / self.bytes_in as f64
    }
}

/// Why an epoch could not be encoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A page beyond guest RAM.
    #[error("page {page} is outside guest RAM ({ram_pages} pages)")]
    PageOutOfRange {
        /// The page.
        page: u32,
        /// Guest RAM in pages.
        ram_pages: u32,
    },
    /// Pages out of order, or one twice.
    #[error("pages must be added in ascending order without repeats: {page} after {after}")]
    NotAscending {
        /// The page added.
        page: u32,
        /// The page before it.
        after: u32,
    },
    /// A checkpoint before every page was sent once.
    #[error("{unknown} pages were never sent: a checkpoint needs a complete first sync round")]
    ReceiverStateUnknown {
        /// Pages never sent.
        unknown: usize,
    },
    /// An epoch number that does not follow the last.
    #[error("epoch {got} does not follow epoch {last}")]
    EpochOrder {
        /// The last epoch encoded.
        last: u64,
        /// The one asked for.
        got: u64,
    },
    /// Device state over [`MAX_DEVICE_STATE`].
    #[error("device state of {0} bytes exceeds the {MAX_DEVICE_STATE}-byte limit")]
    DeviceStateTooLarge(usize),
    /// An empty or too long VM id.
    #[error("VM id must be 1 to {MAX_VM_ID_LEN} bytes")]
    BadVmId,
}

/// What the sender knows of the receiver's image.
#[derive(Debug)]
pub struct SenderState {
    vm_id: String,
    ram_pages: u32,
    generation: u64,
    policy: CodecPolicy,
    hashes: Vec<PageHash>,
    known: Vec<bool>,
    unknown: usize,
    digest: ImageDigest,
    dedup: HashMap<PageHash, u32>,
    cache: Option<LruCache<u32, Box<Page>>>,
    adaptive: Adaptive,
    /// Whether word deltas pay on their own (see [`DeltaPayoff`]).
    deltas: DeltaPayoff,
    last_epoch: Option<u64>,
    /// Pages chunks go without a body CRC ([`chunk::FLAG_PAGES_BY_HASH`]).
    pages_by_hash: bool,
}

/// Checkpoints with at least this many delta attempts decide whether
/// deltas pay.
pub const DELTA_SAMPLE_TRIES: u64 = 64;
/// Checkpoints without deltas before they are tried again (two epochs: one
/// fills the cache, the next measures).
pub const DELTA_PROBE_EPOCHS: u32 = 32;

/// Whether word deltas pay while the link outruns the compressor (bytes
/// saved then buy no link time). A delta that hits sends a few words for a
/// 4 KiB page: less for the encoder to append, for the kernel to copy on
/// both hosts and for the backup to decode, so on any link it costs less
/// than the page it replaces. One that misses (a page rewritten whole) costs
/// a compare and a cached copy for nothing. So deltas stay on while at
/// least half of those tried in the last measured checkpoint hit; otherwise
/// they (and the cache they need) are off, and tried again for two
/// checkpoints every [`DELTA_PROBE_EPOCHS`]. Before, the link rule alone
/// decided: once a burst of large checkpoints had measured the link faster
/// than lz4, deltas stayed off for good, and a guest back to sparse writes
/// (one word a page, the heavy dirtier's pattern) shipped every dirty page
/// whole, with the kernel copies and the backup's decoding that go with it.
#[derive(Clone, Copy, Debug)]
pub struct DeltaPayoff {
    on: bool,
    /// Checkpoints since deltas went off.
    off_for: u32,
}

impl Default for DeltaPayoff {
    fn default() -> Self {
        Self {
            on: true,
            off_for: 0,
        }
    }
}

impl DeltaPayoff {
    /// Whether deltas pay, as far as the last checkpoints measured.
    pub fn pays(&self) -> bool {
        self.on
    }

    /// A checkpoint ended after `tried` delta attempts of which `hit` went
    /// as a delta.
    pub fn checkpoint_done(&mut self, tried: u64, hit: u64) {
        if tried >= DELTA_SAMPLE_TRIES {
            self.on = hit.saturating_mul(2) >= tried;
            self.off_for = 0;
        } else if !self.on {
            self.off_for += 1;
            if self.off_for >= DELTA_PROBE_EPOCHS {
                self.on = true;
                self.off_for = 0;
            }
        }
    }
}

impl SenderState {
    /// A sender for a receiver whose content is not known yet (the first sync
    /// round must send every page).
    pub fn new(
        vm_id: &str,
        ram_pages: u32,
        generation: u64,
        policy: CodecPolicy,
    ) -> Result<Self, EncodeError> {
        if vm_id.is_empty() || vm_id.len() > MAX_VM_ID_LEN {
            return Err(EncodeError::BadVmId);
        }
        let cache = NonZeroUsize::new(policy.delta_cache_pages)
            .filter(|_| policy.delta)
            .map(LruCache::new);
        Ok(Self {
            vm_id: vm_id.to_owned(),
            ram_pages,
            generation,
            policy,
            hashes: vec![0; ram_pages as usize],
            known: vec![false; ram_pages as usize],
            unknown: ram_pages as usize,
            digest: ImageDigest::default(),
            dedup: HashMap::new(),
            cache,
            adaptive: Adaptive::default(),
            deltas: DeltaPayoff::default(),
            last_epoch: None,
            pages_by_hash: false,
        })
    }

    /// A sender for a receiver whose image holds zeros in every page (an
    /// image it created and never wrote, as its Hello answer says): its
    /// content is known from the start, so an epoch leaves out the pages
    /// that are zero here too, and a checkpoint may follow any round. Over an
    /// idle guest that is most of its RAM: nothing goes on the wire for it.
    pub fn over_zeroed_image(
        vm_id: &str,
        ram_pages: u32,
        generation: u64,
        policy: CodecPolicy,
    ) -> Result<Self, EncodeError> {
        let mut state = Self::new(vm_id, ram_pages, generation, policy)?;
        state.hashes = vec![zero_page_hash(); ram_pages as usize];
        state.known = vec![true; ram_pages as usize];
        state.unknown = 0;
        state.digest = ImageDigest::of_zero_image(ram_pages);
        Ok(state)
    }

    /// The digest the receiver's image will have after the last encoded epoch
    /// (meaningful once every page is known).
    pub fn digest(&self) -> ImageDigest {
        self.digest
    }

    /// Whether the receiver's image holds zeros in `page`, as this sender
    /// knows it: a zero page added there would be left out of its epoch
    /// ([`EpochEncoder::add_zero_page`]), so a caller may leave it out of
    /// the epoch altogether. False for a page beyond the RAM.
    pub fn holds_zero(&self, page: u32) -> bool {
        let page = page as usize;
        self.known.get(page) == Some(&true) && self.hashes.get(page) == Some(&zero_page_hash())
    }

    /// Pages whose receiver content is not known yet.
    pub fn unknown_pages(&self) -> usize {
        self.unknown
    }

    /// How pages are encoded.
    pub fn policy(&self) -> CodecPolicy {
        self.policy
    }

    /// Seals Pages chunks without a body CRC, their pages checked by hash
    /// ([`chunk::FLAG_PAGES_BY_HASH`]): only for a receiver that said it
    /// takes them (off by default; a receiver before the flag refuses them).
    pub fn set_pages_by_hash(&mut self, on: bool) {
        self.pages_by_hash = on;
    }

    /// The link's measured rate, bytes per second, for the adaptive policy
    /// (None: not known; it then compresses when that saves an eighth).
    pub fn set_link_rate(&mut self, bytes_per_second: Option<f64>) {
        self.adaptive.set_link_rate(bytes_per_second);
    }

    /// The adaptive policy's last decision (None: not an adaptive policy,
    /// or no decision yet).
    pub fn adaptive(&self) -> Option<AdaptiveReport> {
        (self.policy.adaptive && self.policy.compression != Compression::None)
            .then(|| self.adaptive.report())
            .flatten()
    }

    /// Starts encoding epoch `epoch`.
    pub fn begin(&mut self, epoch: u64, kind: EpochKind) -> Result<EpochEncoder<'_>, EncodeError> {
        if let Some(last) = self.last_epoch
            && epoch != last + 1
        {
            return Err(EncodeError::EpochOrder { last, got: epoch });
        }
        // A checkpoint while pages are still unknown is refused in finish():
        // this epoch's pages may fill the gaps.
        let header = EpochHeader {
            vm_id: self.vm_id.clone(),
            generation: self.generation,
            epoch,
            ram_pages: self.ram_pages,
            kind,
        };
        let mut begin = Vec::with_capacity(16 + header.vm_id.len());
        begin.push(kind as u8);
        begin.extend_from_slice(&header.generation.to_le_bytes());
        begin.extend_from_slice(&header.ram_pages.to_le_bytes());
        begin.extend_from_slice(&(header.vm_id.len() as u16).to_le_bytes());
        begin.extend_from_slice(header.vm_id.as_bytes());
        // Dedup by content is skipped for an epoch while the link outruns
        // the compressor, as word deltas are: its index lookups and upkeep
        // cost more than the bytes they save there. The image-wide index is
        // emptied then, so that keeping it true (`finish` drops the entry of
        // every page that changes) costs nothing meanwhile: an empty map
        // answers without hashing. It fills again from the pages sent once
        // dedup is back.
        let dedup =
            self.policy.dedup && !(self.policy.adaptive && self.adaptive.link_outruns_compressor());
        if !dedup && !self.dedup.is_empty() {
            self.dedup.clear();
        }
        let first = chunk::frame(ChunkKind::Begin, epoch, 0, &begin);
        let report = EncodeReport {
            bytes_out: first.len() as u64,
            chunks: 1,
            ..Default::default()
        };
        Ok(EpochEncoder {
            state: self,
            header,
            seq: 1,
            ready: vec![first],
            body: fresh_body(),
            run_header: None,
            last_page: None,
            seen: HashMap::new(),
            dedup,
            updates: Vec::new(),
            cache_misses: VecDeque::new(),
            entry: Vec::with_capacity(PAGE_SIZE + 16),
            report,
            delta_tried: 0,
            started: Instant::now(),
        })
    }
}

/// Encodes one epoch. Add pages in ascending order, then [`finish`](Self::finish).
#[derive(Debug)]
pub struct EpochEncoder<'a> {
    state: &'a mut SenderState,
    header: EpochHeader,
    seq: u32,
    ready: Vec<Vec<u8>>,
    /// The Pages chunk being filled: header room, then the body (sealed in
    /// place, so page data is not copied again).
    body: Vec<u8>,
    /// Offset in `body` of the current run's header, its first page and count.
    run_header: Option<(usize, u32, u16)>,
    last_page: Option<u32>,
    /// Content hash → page already in this epoch (for `RepeatOf`).
    seen: HashMap<PageHash, u32>,
    /// Whether this epoch dedups by content (`RepeatOf`, and `SameAs` of
    /// another page): the policy's dedup, unless skipped (see `begin`).
    dedup: bool,
    updates: Vec<(u32, PageHash)>,
    /// New content of pages that missed the delta cache, inserted at finish().
    cache_misses: VecDeque<(u32, Box<Page>)>,
    entry: Vec<u8>,
    report: EncodeReport,
    /// Pages tried as a word delta (their previous version was cached).
    delta_tried: u64,
    started: Instant,
}

/// An encoded epoch.
#[derive(Debug)]
pub struct EncodedEpoch {
    /// Which epoch.
    pub header: EpochHeader,
    /// Chunks not yet taken with [`EpochEncoder::take_chunks`].
    pub chunks: Vec<Vec<u8>>,
    /// Digest of the receiver's image once this epoch is applied.
    pub digest: ImageDigest,
    /// What encoding it cost.
    pub report: EncodeReport,
}

const RUN_HEADER_LEN: usize = 6;

/// An empty Pages chunk: room for the header, capacity for a full body.
fn fresh_body() -> Vec<u8> {
    let mut body = Vec::with_capacity(CHUNK_HEADER_LEN + MAX_CHUNK_BODY);
    body.resize(CHUNK_HEADER_LEN, 0);
    body
}
/// Largest entry: codec byte + raw page (compressed and delta forms are smaller).
const MAX_ENTRY: usize = 1 + PAGE_SIZE;

impl EpochEncoder<'_> {
    /// The epoch being encoded.
    pub fn header(&self) -> &EpochHeader {
        &self.header
    }

    /// Adds dirty page `page` with its content at the pause.
    pub fn add_page(&mut self, page: u32, content: &Page) -> Result<(), EncodeError> {
        let zero = self.state.policy.zero && is_zero(content);
        self.add(page, content, zero, zero)
    }

    /// Adds page `page`, known to be all zeros without reading it (a page
    /// the guest never touched). Under a policy without zero pages it goes
    /// raw, like any other.
    pub fn add_zero_page(&mut self, page: u32) -> Result<(), EncodeError> {
        self.add(page, &ZERO_PAGE, self.state.policy.zero, true)
    }

    /// `zero`: the page goes as a zero page; `known_zero`: its content is
    /// known to be zeros (its hash is known without hashing it, even when
    /// the policy sends it raw).
    fn add(
        &mut self,
        page: u32,
        content: &Page,
        zero: bool,
        known_zero: bool,
    ) -> Result<(), EncodeError> {
        if page >= self.header.ram_pages {
            return Err(EncodeError::PageOutOfRange {
                page,
                ram_pages: self.header.ram_pages,
            });
        }
        if let Some(after) = self.last_page
            && page <= after
        {
            return Err(EncodeError::NotAscending { page, after });
        }
        self.last_page = Some(page);
        // The adaptive codec weighs the encoder's whole time for a page it
        // tried to compress (hash, compress, append), not the compressor's
        // alone: that is the pace the stream goes at while compressing.
        // Only pages of a sample are timed (zero pages are never tried, and
        // while the link outruns the compressor a sample is 256 pages in
        // thousands).
        let timed = self.state.policy.adaptive && !zero && self.state.adaptive.sampling();
        let started = timed.then(Instant::now);
        // A zero page's hash is known without hashing it.
        let hash = if known_zero {
            zero_page_hash()
        } else {
            page_hash(content)
        };
        // An epoch sends what the receiver's image lacks: a page it holds
        // already (a zero page over a zeroed image, a page written back with
        // the content it had) is left out; the receiver would not write it.
        let s = &*self.state;
        if s.known[page as usize] && s.hashes[page as usize] == hash {
            self.report.pages_held += 1;
            return Ok(());
        }
        // Word deltas (and the cached pages they need) are skipped while the
        // link outruns the encoder (see `Adaptive::link_outruns_compressor`)
        // and they do not pay on their own (see `DeltaPayoff`).
        let deltas = !(self.state.policy.adaptive && self.state.adaptive.link_outruns_compressor())
            || self.state.deltas.pays();
        let (codec, tried) = self.encode_entry(page, hash, content, zero, deltas);
        self.report.pages_by_codec[codec as usize] += 1;
        self.report.pages += 1;
        self.report.bytes_in += PAGE_SIZE as u64;
        // Only dedup looks pages up by content (`RepeatOf`).
        if codec != Codec::Zero && self.dedup {
            self.seen.entry(hash).or_insert(page);
        }
        if let Some(cache) = &mut self.state.cache {
            // Hits are updated in place. Misses are inserted only at finish():
            // pages arrive in ascending order, and inserting each miss at once
            // would evict the cached pages further up that this same epoch is
            // about to hit (LRU scan pollution). Zero pages and sync rounds'
            // pages are not cached (a sync round streams all of RAM through
            // it; a zero page deltas as well against nothing): an older
            // version of such a page is dropped, never left stale. Nor is
            // any page while deltas are skipped.
            let cacheable = !zero && deltas && self.header.kind == EpochKind::Checkpoint;
            match cache.get_mut(&page) {
                Some(_) if !cacheable => {
                    cache.pop(&page);
                }
                Some(old) => copy::copy(&mut old[..], content),
                None if !cacheable => {}
                None => {
                    if self.cache_misses.len() == cache.cap().get() {
                        self.cache_misses.pop_front();
                    }
                    self.cache_misses.push_back((page, Box::new(*content)));
                }
            }
        }
        self.updates.push((page, hash));
        self.append_entry(page, (codec == Codec::Raw).then_some(content));
        if let (Some(started), Some(out_len)) = (started, tried) {
            self.state.adaptive.record(out_len, started.elapsed());
        }
        Ok(())
    }

    /// Chooses the codec for one page and writes `codec + payload` to
    /// `self.entry` (for a raw page the codec byte alone: its content is
    /// appended from where it is); with it, the compressed length of a full-page
    /// compression it tried (`PAGE_SIZE` if it did not pay), for the
    /// adaptive codec.
    fn encode_entry(
        &mut self,
        page: u32,
        hash: PageHash,
        content: &Page,
        zero: bool,
        deltas: bool,
    ) -> (Codec, Option<usize>) {
        let s = &mut *self.state;
        let policy = s.policy;
        let out = &mut self.entry;
        out.clear();
        out.push(0);
        let checkpoint = self.header.kind == EpochKind::Checkpoint;
        let mut tried = None;
        let codec = 'choose: {
            if zero {
                break 'choose Codec::Zero;
            }
            // (An unchanged page never gets here: `add` leaves it out.)
            // By content (unless skipped this epoch, see `begin`).
            if self.dedup {
                if let Some(&earlier) = self.seen.get(&hash) {
                    out.extend_from_slice(&earlier.to_le_bytes());
                    break 'choose Codec::RepeatOf;
                }
                if checkpoint && let Some(&holder) = s.dedup.get(&hash) {
                    out.extend_from_slice(&holder.to_le_bytes());
                    break 'choose Codec::SameAs;
                }
            }
            if checkpoint
                && deltas
                && let Some(old) = s.cache.as_mut().and_then(|c| c.peek(&page))
            {
                self.delta_tried += 1;
                match encode_delta_words(old, content, out) {
                    Ok(()) => break 'choose Codec::DeltaWords,
                    // A dense but partial change: the XOR is mostly zeros and
                    // compresses far better than the page. Past half the words
                    // the pages are unrelated and the full page does better.
                    Err(changed)
                        if changed <= codec::PAGE_WORDS / 2
                            && policy.compression != Compression::None =>
                    {
                        let mut xor = [0u8; PAGE_SIZE];
                        for ((x, a), b) in xor.iter_mut().zip(old.iter()).zip(content) {
                            *x = a ^ b;
                        }
                        if encode_compressed(&xor, Compression::Lz4, out) {
                            break 'choose Codec::DeltaLz4;
                        }
                    }
                    Err(_) => {}
                }
            }
            if policy.compression != Compression::None
                && (!policy.adaptive || s.adaptive.should_try())
            {
                let ok = encode_compressed(content, policy.compression, out);
                tried = Some(if ok { out.len() - 3 } else { PAGE_SIZE });
                if ok {
                    break 'choose match policy.compression {
                        Compression::Zstd(_) => Codec::Zstd,
                        _ => Codec::Lz4,
                    };
                }
            }
            // A raw page goes from `content` straight into the chunk
            // (`append_entry`), not through `entry`.
            Codec::Raw
        };
        out[0] = codec as u8;
        (codec, tried)
    }

    /// Appends `self.entry` for `page` to the current Pages chunk, continuing the
    /// current run if `page` follows it; a raw page's content is `raw`
    /// (copied once, from where it is).
    fn append_entry(&mut self, page: u32, raw: Option<&Page>) {
        if self.body.len() - CHUNK_HEADER_LEN + RUN_HEADER_LEN + MAX_ENTRY > MAX_CHUNK_BODY {
            self.flush_pages();
        }
        match &mut self.run_header {
            Some((at, first, count)) if *first + u32::from(*count) == page && *count < u16::MAX => {
                *count += 1;
                let at = *at;
                let count = *count;
                self.body[at + 4..at + 6].copy_from_slice(&count.to_le_bytes());
            }
            _ => {
                let at = self.body.len();
                self.body.extend_from_slice(&page.to_le_bytes());
                self.body.extend_from_slice(&1u16.to_le_bytes());
                self.run_header = Some((at, page, 1));
            }
        }
        self.body.extend_from_slice(&self.entry);
        if let Some(content) = raw {
            copy::extend(&mut self.body, content);
        }
    }

    fn push_chunk(&mut self, kind: ChunkKind, body: &[u8]) {
        self.push_framed(chunk::frame(kind, self.header.epoch, self.seq, body));
    }

    fn push_framed(&mut self, framed: Vec<u8>) {
        self.seq += 1;
        self.report.chunks += 1;
        self.report.bytes_out += framed.len() as u64;
        self.ready.push(framed);
    }

    fn flush_pages(&mut self) {
        if self.body.len() > CHUNK_HEADER_LEN {
            let mut framed = std::mem::replace(&mut self.body, fresh_body());
            if self.state.pages_by_hash {
                chunk::seal_pages_by_hash(self.header.epoch, self.seq, &mut framed);
            } else {
                chunk::seal(ChunkKind::Pages, self.header.epoch, self.seq, &mut framed);
            }
            self.push_framed(framed);
        }
        self.run_header = None;
    }

    /// Takes the chunks finished so far (to stream them while encoding goes on).
    pub fn take_chunks(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.ready)
    }

    /// Adds the device state and the End chunk, and records the epoch as sent.
    pub fn finish(mut self, device_state: &[u8]) -> Result<EncodedEpoch, EncodeError> {
        if device_state.len() > MAX_DEVICE_STATE {
            return Err(EncodeError::DeviceStateTooLarge(device_state.len()));
        }
        self.flush_pages();
        for part in device_state.chunks(MAX_CHUNK_BODY) {
            self.push_chunk(ChunkKind::Device, part);
        }
        // Record what the receiver will hold.
        let s = &mut *self.state;
        if let Some(cache) = &mut s.cache {
            for (page, content) in self.cache_misses.drain(..) {
                cache.put(page, content);
            }
        }
        let all_known_before = s.unknown == 0;
        let dedup = self.dedup;
        for &(page, hash) in &self.updates {
            let p = page as usize;
            if s.known[p] {
                let old = s.hashes[p];
                if s.dedup.get(&old) == Some(&page) {
                    s.dedup.remove(&old);
                }
                if all_known_before {
                    s.digest.replace(page, old, hash);
                }
            } else {
                s.known[p] = true;
                s.unknown -= 1;
            }
            s.hashes[p] = hash;
            if dedup {
                s.dedup.entry(hash).or_insert(page);
            }
        }
        if !all_known_before && s.unknown == 0 {
            s.digest = ImageDigest::of_hashes(&s.hashes);
        }
        if self.header.kind == EpochKind::Checkpoint && s.unknown > 0 {
            return Err(EncodeError::ReceiverStateUnknown { unknown: s.unknown });
        }
        if self.header.kind == EpochKind::Checkpoint && s.cache.is_some() {
            let by_codec = &self.report.pages_by_codec;
            let hit = by_codec[Codec::DeltaWords as usize] + by_codec[Codec::DeltaLz4 as usize];
            s.deltas.checkpoint_done(self.delta_tried, hit);
        }
        s.last_epoch = Some(self.header.epoch);
        let digest = if s.unknown == 0 {
            s.digest
        } else {
            ImageDigest::default()
        };
        let mut end = Vec::with_capacity(32);
        end.extend_from_slice(&(self.seq + 1).to_le_bytes());
        end.extend_from_slice(&(self.report.pages as u32).to_le_bytes());
        end.extend_from_slice(&(device_state.len() as u32).to_le_bytes());
        end.extend_from_slice(&crc32c::crc32c(device_state).to_le_bytes());
        end.extend_from_slice(&digest.0.to_le_bytes());
        self.push_chunk(ChunkKind::End, &end);
        self.report.device_state_bytes = device_state.len() as u64;
        self.report.encode_time = self.started.elapsed();
        Ok(EncodedEpoch {
            header: self.header,
            chunks: self.ready,
            digest,
            report: self.report,
        })
    }
}

// ---- receiving ----------------------------------------------------------------

/// The receiver's committed image, as the decoder needs it.
pub trait CommittedImage {
    /// The VM the image holds.
    fn vm_id(&self) -> &str;
    /// Its RAM in pages.
    fn ram_pages(&self) -> u32;
    /// The generation of the last commit (an older sender was deposed).
    fn generation(&self) -> u64;
    /// The epoch number a checkpoint must carry to be accepted (`None`: any,
    /// i.e. the checkpoint that completes an initial sync).
    fn next_checkpoint(&self) -> Option<u64>;
    /// Whether sync rounds are accepted (an initial sync is in progress).
    fn syncing(&self) -> bool;
    /// A page as committed.
    fn page(&self, page: u32) -> &Page;
    /// Its hash as committed.
    fn page_hash(&self, page: u32) -> PageHash;
    /// The digest of every page as committed.
    fn digest(&self) -> ImageDigest;
}

/// Why an epoch was refused. The committed image is untouched in every case.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EpochError {
    /// A chunk that is not valid in itself.
    #[error("chunk {seq} is invalid")]
    Chunk {
        /// Its place in the epoch.
        seq: u32,
        /// Why.
        #[source]
        source: ChunkError,
    },
    /// Chunks lost or reordered.
    #[error(
        "chunk {got} arrived where chunk {expected} was due: the stream lost or reordered chunks"
    )]
    OutOfOrder {
        /// The chunk due.
        expected: u32,
        /// The chunk that came.
        got: u32,
    },
    /// A chunk of another epoch.
    #[error("chunk belongs to epoch {got}, not epoch {expected}")]
    MixedEpochs {
        /// The epoch being received.
        expected: u64,
        /// The chunk's.
        got: u64,
    },
    /// A chunk kind out of place (e.g. Pages before Begin).
    #[error("a {got:?} chunk is not allowed {when}")]
    UnexpectedChunk {
        /// Its kind.
        got: ChunkKind,
        /// Where it came.
        when: &'static str,
    },
    /// A Begin chunk that does not parse.
    #[error("the Begin chunk is malformed: {0}")]
    BadBegin(&'static str),
    /// An epoch of another VM.
    #[error("epoch is for VM {got:?}, this image holds VM {expected:?}")]
    WrongVm {
        /// The image's VM.
        expected: String,
        /// The epoch's.
        got: String,
    },
    /// An epoch for another RAM size.
    #[error("epoch is for {got} pages of RAM, the image has {expected}")]
    WrongRamSize {
        /// The image's, in pages.
        expected: u32,
        /// The epoch's.
        got: u32,
    },
    /// A sender older than the image: it was deposed.
    #[error(
        "epoch generation {got} is older than the image's generation {image}: the sender was deposed"
    )]
    StaleGeneration {
        /// The image's generation.
        image: u64,
        /// The epoch's.
        got: u64,
    },
    /// An epoch that skips or repeats one.
    #[error(
        "epoch {got} does not follow the committed epoch (expected {expected}): epochs cannot be skipped or replayed"
    )]
    WrongEpoch {
        /// The epoch due.
        expected: u64,
        /// The epoch that came.
        got: u64,
    },
    /// A sync round outside an initial sync.
    #[error("a sync round arrived but no initial sync is in progress")]
    NotSyncing,
    /// A checkpoint the sync cannot take yet.
    #[error(
        "the image is in an initial sync: only sync rounds and the checkpoint that completes the sync are accepted"
    )]
    SyncIncomplete,
    /// A Pages chunk that does not parse.
    #[error("Pages chunk is malformed: {0}")]
    BadPages(&'static str),
    /// A page beyond guest RAM.
    #[error("page {page} is outside guest RAM ({ram_pages} pages)")]
    PageOutOfRange {
        /// The page.
        page: u32,
        /// Guest RAM in pages.
        ram_pages: u32,
    },
    /// Pages out of order or repeated.
    #[error("page {page} follows page {after}: pages must ascend without repeats")]
    PagesNotAscending {
        /// The page.
        page: u32,
        /// The one before it.
        after: u32,
    },
    /// A codec id this build does not know.
    #[error("page {page} has unknown codec {codec}")]
    UnknownCodec {
        /// The page.
        page: u32,
        /// The codec id.
        codec: u8,
    },
    /// A page payload that does not decode.
    #[error("page {page} cannot be decoded")]
    Codec {
        /// The page.
        page: u32,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// A dedup or repeat reference to a page it cannot refer to.
    #[error("page {page} refers to page {to}, which is {why}")]
    BadReference {
        /// The page.
        page: u32,
        /// The page it refers to.
        to: u32,
        /// Why that page cannot be used.
        why: &'static str,
    },
    /// An End chunk that does not parse.
    #[error("the End chunk is malformed")]
    BadEnd,
    /// End's counts disagree with what arrived.
    #[error("End says {claimed} {what} but {actual} arrived")]
    CountMismatch {
        /// What was counted (pages, chunks, bytes).
        what: &'static str,
        /// End's count.
        claimed: u64,
        /// The count received.
        actual: u64,
    },
    /// The device state does not match its checksum.
    #[error("device state checksum mismatch")]
    DeviceChecksum,
    /// Device state over [`MAX_DEVICE_STATE`].
    #[error("device state exceeds {MAX_DEVICE_STATE} bytes")]
    DeviceStateTooLarge,
    /// The image after this epoch would differ from the sender's.
    #[error(
        "image digest after this epoch would be {computed}, the sender says {expected}: refusing a diverged image"
    )]
    DigestMismatch {
        /// The sender's digest.
        expected: ImageDigest,
        /// The receiver's.
        computed: ImageDigest,
    },
    /// A chunk after End.
    #[error("the epoch is already complete; chunk {0} is extra")]
    AfterEnd(u32),
}

/// Reusable staging memory. Fresh memory is expensive to touch on these
/// hosts, so a receiver hands a finished epoch's buffers to the next decoder
/// ([`StagedEpoch::recycle`], [`EpochDecoder::with_buffers`]).
#[derive(Debug, Default)]
pub struct StagingBuffers {
    pages: Vec<u32>,
    slots: Vec<Slot>,
    data: Vec<u8>,
    wire: Vec<Bytes>,
    hashes: Vec<PageHash>,
    device_state: Vec<u8>,
}

/// Where a staged page's content is.
///
/// A page sent raw is not copied at all: it stays in the chunk it arrived
/// in (the receive buffer the transport handed over, kept alive by
/// [`StagedEpoch::wire`]) until the store has written it. Only pages that
/// had to be decoded (compressed, delta, copies of image pages) take
/// staging memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// All zeros: nothing is staged for it.
    Zero,
    /// Decoded into [`StagedEpoch::data`]: its index there, in pages.
    Staged(u32),
    /// Raw in received chunk `chunk` ([`StagedEpoch::wire`]), from byte `at`.
    Wire {
        /// Index into [`StagedEpoch::wire`].
        chunk: u32,
        /// Byte offset of the page in that chunk.
        at: u32,
    },
}

/// A fully received, verified epoch, not yet applied.
#[derive(Debug)]
pub struct StagedEpoch {
    /// Which epoch.
    pub header: EpochHeader,
    /// Page numbers, ascending.
    pub pages: Vec<u32>,
    /// Where each page's content is.
    pub slots: Vec<Slot>,
    /// The decoded pages' content, 4 KiB each ([`Slot::Staged`]).
    pub data: Vec<u8>,
    /// The received chunks that hold pages sent raw ([`Slot::Wire`]).
    pub wire: Vec<Bytes>,
    /// Each staged page's hash, in the same order.
    pub hashes: Vec<PageHash>,
    /// The checkpoint payload (device state and held output).
    pub device_state: Vec<u8>,
    /// The image digest after applying (verified for checkpoints).
    pub digest: ImageDigest,
    /// The image digest it was decoded and verified against (checkpoints):
    /// an image that still has it holds the content the decoder saw.
    pub base_digest: ImageDigest,
    /// Bytes of chunks received.
    pub wire_bytes: u64,
}

impl StagedEpoch {
    /// Returns the buffers (emptied, capacity kept) for the next epoch.
    pub fn recycle(self) -> StagingBuffers {
        StagingBuffers {
            pages: self.pages,
            slots: self.slots,
            data: self.data,
            wire: self.wire,
            hashes: self.hashes,
            device_state: self.device_state,
        }
        .cleared()
    }

    /// The new content of the `i`-th staged page.
    pub fn page_data(&self, i: usize) -> &Page {
        slot_data(&self.data, &self.wire, self.slots[i])
    }

    /// The content of staged pages `range` in page order, as pieces of
    /// contiguous bytes (pages decoded one after another in the staging
    /// buffer are one piece; a page still in its chunk, or a zero page, is a
    /// piece of its own): for writing and checksumming without copying.
    pub fn pieces(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = &[u8]> + '_ {
        let slots = &self.slots[range];
        let mut i = 0;
        std::iter::from_fn(move || {
            let slot = *slots.get(i)?;
            i += 1;
            let Slot::Staged(first) = slot else {
                return Some(&slot_data(&self.data, &self.wire, slot)[..]);
            };
            let mut next = first + 1;
            while slots.get(i) == Some(&Slot::Staged(next)) {
                next += 1;
                i += 1;
            }
            Some(&self.data[first as usize * PAGE_SIZE..next as usize * PAGE_SIZE])
        })
    }
}

/// Pages chunks with a body at least this long keep their raw pages where
/// they arrived (16 pages): a shorter one has them copied, so a stream of
/// small chunks cannot make the receiver keep a receive buffer per page.
pub const KEEP_CHUNK_BODY: usize = 16 * PAGE_SIZE;

fn slot_data<'a>(data: &'a [u8], wire: &'a [Bytes], slot: Slot) -> &'a Page {
    let (bytes, at) = match slot {
        Slot::Zero => return &ZERO_PAGE,
        Slot::Staged(i) => (data, i as usize * PAGE_SIZE),
        Slot::Wire { chunk, at } => (&wire[chunk as usize][..], at as usize),
    };
    bytes[at..at + PAGE_SIZE]
        .try_into()
        .unwrap_or_else(|_| unreachable!("a slot names a whole page"))
}

impl StagingBuffers {
    fn cleared(mut self) -> Self {
        self.pages.clear();
        self.slots.clear();
        self.data.clear();
        self.wire.clear();
        self.hashes.clear();
        self.device_state.clear();
        self
    }
}

/// Progress of an epoch's reception.
#[derive(Debug)]
pub enum Received {
    /// The epoch is not complete yet.
    NeedMore,
    /// The epoch is complete and verified: apply it.
    Complete(Box<StagedEpoch>),
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Begin,
    Pages,
    Device,
    Done,
}

/// Receives one epoch, chunk by chunk, against a committed image.
#[derive(Debug)]
pub struct EpochDecoder {
    phase: Phase,
    next_seq: u32,
    header: Option<EpochHeader>,
    pages: Vec<u32>,
    slots: Vec<Slot>,
    data: Vec<u8>,
    wire: Vec<Bytes>,
    hashes: Vec<PageHash>,
    device_state: Vec<u8>,
    wire_bytes: u64,
}

impl Default for EpochDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl EpochDecoder {
    /// A decoder with fresh staging buffers.
    pub fn new() -> Self {
        Self::with_buffers(StagingBuffers::default())
    }

    /// A decoder that stages into `buffers` (from a previous epoch).
    pub fn with_buffers(buffers: StagingBuffers) -> Self {
        Self {
            phase: Phase::Begin,
            next_seq: 0,
            header: None,
            pages: buffers.pages,
            slots: buffers.slots,
            data: buffers.data,
            wire: buffers.wire,
            hashes: buffers.hashes,
            device_state: buffers.device_state,
            wire_bytes: 0,
        }
    }

    /// Gives the staging memory back (emptied, capacity kept), for a
    /// decoder of another session.
    pub fn into_buffers(self) -> StagingBuffers {
        StagingBuffers {
            pages: self.pages,
            slots: self.slots,
            data: self.data,
            wire: self.wire,
            hashes: self.hashes,
            device_state: self.device_state,
        }
        .cleared()
    }

    /// The header, once the Begin chunk has been accepted.
    pub fn header(&self) -> Option<&EpochHeader> {
        self.header.as_ref()
    }

    /// Feeds one chunk. Pages it carries raw are not copied: the decoder
    /// keeps a reference to `bytes` until the epoch is applied.
    pub fn push(
        &mut self,
        bytes: &Bytes,
        image: &dyn CommittedImage,
    ) -> Result<Received, EpochError> {
        let seq = self.next_seq;
        let (h, body) = chunk::parse(bytes).map_err(|source| EpochError::Chunk { seq, source })?;
        if self.phase == Phase::Done {
            return Err(EpochError::AfterEnd(h.seq));
        }
        if h.seq != seq {
            return Err(EpochError::OutOfOrder {
                expected: seq,
                got: h.seq,
            });
        }
        if let Some(header) = &self.header
            && h.epoch != header.epoch
        {
            return Err(EpochError::MixedEpochs {
                expected: header.epoch,
                got: h.epoch,
            });
        }
        self.next_seq += 1;
        self.wire_bytes += bytes.len() as u64;
        match (h.kind, &self.phase) {
            (ChunkKind::Begin, Phase::Begin) => {
                self.header = Some(parse_begin(h.epoch, body, image)?);
                self.phase = Phase::Pages;
            }
            (ChunkKind::Pages, Phase::Pages) => {
                // `parse` returns the body as the rest of the chunk.
                let body_at = bytes.len() - body.len();
                self.decode_pages(bytes, body_at, image)?;
            }
            (ChunkKind::Device, Phase::Pages | Phase::Device) => {
                if self.device_state.len() + body.len() > MAX_DEVICE_STATE {
                    return Err(EpochError::DeviceStateTooLarge);
                }
                self.device_state.extend_from_slice(body);
                self.phase = Phase::Device;
            }
            (ChunkKind::End, Phase::Pages | Phase::Device) => {
                self.phase = Phase::Done;
                return self
                    .finish(body, image)
                    .map(|s| Received::Complete(Box::new(s)));
            }
            (kind, phase) => {
                return Err(EpochError::UnexpectedChunk {
                    got: kind,
                    when: match phase {
                        Phase::Begin => "before Begin",
                        Phase::Pages => "among the pages",
                        Phase::Device => "after the device state",
                        Phase::Done => "after End",
                    },
                });
            }
        }
        Ok(Received::NeedMore)
    }

    fn decode_pages(
        &mut self,
        chunk: &Bytes,
        body_at: usize,
        image: &dyn CommittedImage,
    ) -> Result<(), EpochError> {
        let ram_pages = image.ram_pages();
        let checkpoint = self.header.as_ref().map(|h| h.kind) == Some(EpochKind::Checkpoint);
        let body = &chunk[body_at..];
        let mut r = Reader::new(body);
        // This chunk's index among those kept for their raw pages, once the
        // first is staged from it. A short chunk's raw pages are copied
        // instead: keeping it would keep its whole receive buffer.
        let chunk_index = self.wire.len() as u32;
        let keep = body.len() >= KEEP_CHUNK_BODY;
        let mut kept = false;
        while !r.is_empty() {
            let first = r
                .u32()
                .ok_or(EpochError::BadPages("run header cut short"))?;
            let count = r
                .u16()
                .ok_or(EpochError::BadPages("run header cut short"))?;
            if count == 0 {
                return Err(EpochError::BadPages("empty run"));
            }
            for i in 0..u32::from(count) {
                let page = first
                    .checked_add(i)
                    .ok_or(EpochError::BadPages("run overflows"))?;
                if page >= ram_pages {
                    return Err(EpochError::PageOutOfRange { page, ram_pages });
                }
                if let Some(&after) = self.pages.last()
                    && page <= after
                {
                    return Err(EpochError::PagesNotAscending { page, after });
                }
                let codec_byte = r.u8().ok_or(EpochError::BadPages("entry cut short"))?;
                let codec = Codec::from_u8(codec_byte).ok_or(EpochError::UnknownCodec {
                    page,
                    codec: codec_byte,
                })?;
                // Decoded onto the end of the staging buffer (a zero page
                // is not staged: its slot says so).
                let at = self.data.len();
                let decoded = decode_one(
                    &self.pages,
                    &mut self.data,
                    page,
                    codec,
                    checkpoint,
                    &mut r,
                    image,
                );
                let (slot, hash) = match decoded {
                    Err(e) => {
                        self.data.truncate(at);
                        return Err(e);
                    }
                    Ok(Staged::Zero) => (Slot::Zero, zero_page_hash()),
                    Ok(Staged::Data) => (
                        Slot::Staged((at / PAGE_SIZE) as u32),
                        page_hash(&self.data[at..]),
                    ),
                    Ok(Staged::Same(i)) => (self.slots[i], self.hashes[i]),
                    Ok(Staged::Raw(content)) if !keep => {
                        copy::extend(&mut self.data, content);
                        (Slot::Staged((at / PAGE_SIZE) as u32), page_hash(content))
                    }
                    Ok(Staged::Raw(content)) => {
                        // Left where it arrived: hashed there, written
                        // from there.
                        if !kept {
                            self.wire.push(chunk.clone());
                            kept = true;
                        }
                        let offset = content.as_ptr() as usize - chunk.as_ptr() as usize;
                        let slot = Slot::Wire {
                            chunk: chunk_index,
                            at: offset as u32,
                        };
                        (slot, page_hash(content))
                    }
                };
                self.slots.push(slot);
                self.hashes.push(hash);
                self.pages.push(page);
            }
        }
        Ok(())
    }
}

/// Where [`decode_one`] put a page.
enum Staged<'a> {
    /// Sent raw: this is its content, in the chunk.
    Raw(&'a [u8]),
    /// All zeros: nothing staged.
    Zero,
    /// Appended to the staging buffer.
    Data,
    /// The same content as the `i`-th page staged before it: it shares
    /// that page's slot and hash.
    Same(usize),
}

/// Decodes one page entry onto the end of `data`, the staging buffer. A raw
/// page stays in its chunk (its content is returned), a `RepeatOf` names the
/// earlier page of this epoch (numbered by `pages`) it repeats; content that
/// is copied whole (same-as) is appended directly; the staging buffer is
/// zero-filled only for codecs that decode in place. On error `data` may
/// hold part of a page: the caller truncates it.
fn decode_one<'a>(
    pages: &[u32],
    data: &mut Vec<u8>,
    page: u32,
    codec: Codec,
    checkpoint: bool,
    r: &mut Reader<'a>,
    image: &dyn CommittedImage,
) -> Result<Staged<'a>, EpochError> {
    let codec_err = |source| EpochError::Codec { page, source };
    let truncated = || EpochError::Codec {
        page,
        source: CodecError::Truncated {
            codec: codec.name(),
        },
    };
    let at = data.len();
    match codec {
        Codec::Zero => return Ok(Staged::Zero),
        Codec::Raw => return Ok(Staged::Raw(r.take(PAGE_SIZE).ok_or_else(truncated)?)),
        Codec::Lz4 | Codec::Zstd => {
            codec::decode_compressed(codec, r, in_place(data, at)).map_err(codec_err)?
        }
        Codec::SameAs => {
            let to = r.u32().ok_or_else(truncated)?;
            if !checkpoint {
                return Err(EpochError::BadReference {
                    page,
                    to,
                    why: "not committed (sync rounds cannot refer to the image)",
                });
            }
            if to >= image.ram_pages() {
                return Err(EpochError::BadReference {
                    page,
                    to,
                    why: "outside guest RAM",
                });
            }
            copy::extend(data, image.page(to));
        }
        Codec::RepeatOf => {
            let to = r.u32().ok_or_else(truncated)?;
            let i = pages
                .binary_search(&to)
                .map_err(|_| EpochError::BadReference {
                    page,
                    to,
                    why: "not earlier in this epoch",
                })?;
            return Ok(Staged::Same(i));
        }
        Codec::DeltaWords | Codec::DeltaLz4 => {
            if !checkpoint {
                return Err(EpochError::BadReference {
                    page,
                    to: page,
                    why: "not committed (sync rounds cannot carry deltas)",
                });
            }
            copy::extend(data, image.page(page));
            let out = in_place(data, at);
            codec::apply_delta(codec, r, out).map_err(codec_err)?;
        }
    }
    Ok(Staged::Data)
}

/// Grows `data` by one zeroed page at `at` and returns it, for codecs that
/// decode in place.
fn in_place(data: &mut Vec<u8>, at: usize) -> &mut Page {
    data.resize(at + PAGE_SIZE, 0);
    (&mut data[at..])
        .try_into()
        .unwrap_or_else(|_| unreachable!("resized by one page"))
}

impl EpochDecoder {
    fn finish(
        &mut self,
        body: &[u8],
        image: &dyn CommittedImage,
    ) -> Result<StagedEpoch, EpochError> {
        let mut r = Reader::new(body);
        let chunks = r.u32().ok_or(EpochError::BadEnd)?;
        let pages = r.u32().ok_or(EpochError::BadEnd)?;
        let device_len = r.u32().ok_or(EpochError::BadEnd)?;
        let device_crc = r.u32().ok_or(EpochError::BadEnd)?;
        let digest = ImageDigest(r.u128().ok_or(EpochError::BadEnd)?);
        if !r.is_empty() {
            return Err(EpochError::BadEnd);
        }
        let check = |what, claimed: u64, actual: u64| {
            if claimed == actual {
                Ok(())
            } else {
                Err(EpochError::CountMismatch {
                    what,
                    claimed,
                    actual,
                })
            }
        };
        check("chunks", chunks.into(), self.next_seq.into())?;
        check("pages", pages.into(), self.pages.len() as u64)?;
        check(
            "device-state bytes",
            device_len.into(),
            self.device_state.len() as u64,
        )?;
        if crc32c::crc32c(&self.device_state) != device_crc {
            return Err(EpochError::DeviceChecksum);
        }
        let header = self.header.take().ok_or(EpochError::BadEnd)?;
        let base_digest = image.digest();
        if header.kind == EpochKind::Checkpoint {
            let mut computed = base_digest;
            for (&page, &hash) in self.pages.iter().zip(&self.hashes) {
                computed.replace(page, image.page_hash(page), hash);
            }
            if computed != digest {
                return Err(EpochError::DigestMismatch {
                    expected: digest,
                    computed,
                });
            }
        }
        Ok(StagedEpoch {
            header,
            pages: std::mem::take(&mut self.pages),
            slots: std::mem::take(&mut self.slots),
            data: std::mem::take(&mut self.data),
            wire: std::mem::take(&mut self.wire),
            hashes: std::mem::take(&mut self.hashes),
            device_state: std::mem::take(&mut self.device_state),
            digest,
            base_digest,
            wire_bytes: self.wire_bytes,
        })
    }
}

fn parse_begin(
    epoch: u64,
    body: &[u8],
    image: &dyn CommittedImage,
) -> Result<EpochHeader, EpochError> {
    let mut r = Reader::new(body);
    let kind = match r.u8().ok_or(EpochError::BadBegin("cut short"))? {
        0 => EpochKind::Checkpoint,
        1 => EpochKind::SyncRound,
        _ => return Err(EpochError::BadBegin("unknown epoch kind")),
    };
    let generation = r.u64().ok_or(EpochError::BadBegin("cut short"))?;
    let ram_pages = r.u32().ok_or(EpochError::BadBegin("cut short"))?;
    let len = r.u16().ok_or(EpochError::BadBegin("cut short"))? as usize;
    if len == 0 || len > MAX_VM_ID_LEN {
        return Err(EpochError::BadBegin("VM id length"));
    }
    let vm_id = std::str::from_utf8(r.take(len).ok_or(EpochError::BadBegin("cut short"))?)
        .map_err(|_| EpochError::BadBegin("VM id is not UTF-8"))?
        .to_owned();
    if !r.is_empty() {
        return Err(EpochError::BadBegin("trailing bytes"));
    }
    if vm_id != image.vm_id() {
        return Err(EpochError::WrongVm {
            expected: image.vm_id().to_owned(),
            got: vm_id,
        });
    }
    if ram_pages != image.ram_pages() {
        return Err(EpochError::WrongRamSize {
            expected: image.ram_pages(),
            got: ram_pages,
        });
    }
    if generation < image.generation() {
        return Err(EpochError::StaleGeneration {
            image: image.generation(),
            got: generation,
        });
    }
    match kind {
        EpochKind::SyncRound if !image.syncing() => return Err(EpochError::NotSyncing),
        EpochKind::Checkpoint => {
            if let Some(expected) = image.next_checkpoint()
                && epoch != expected
            {
                return Err(EpochError::WrongEpoch {
                    expected,
                    got: epoch,
                });
            }
        }
        EpochKind::SyncRound => {}
    }
    Ok(EpochHeader {
        vm_id,
        generation,
        epoch,
        ram_pages,
        kind,
    })
}

/// Entry points for fuzzing the decoder (used by `fuzz/` and by tests).
#[doc(hidden)]
pub mod fuzzing {
    use super::*;
    use crate::page::{ImageDigest, page_hash};

    /// A small in-memory committed image (16 pages, epoch 7, generation 3).
    #[derive(Debug)]
    pub struct MemImage {
        pages: Vec<Page>,
        hashes: Vec<PageHash>,
        digest: ImageDigest,
    }

    impl Default for MemImage {
        fn default() -> Self {
            let pages: Vec<Page> = (0..16u8).map(|i| [i.wrapping_mul(17); PAGE_SIZE]).collect();
            let hashes: Vec<PageHash> = pages.iter().map(|p| page_hash(p)).collect();
            let digest = ImageDigest::of_hashes(&hashes);
            Self {
                pages,
                hashes,
                digest,
            }
        }
    }

    impl CommittedImage for MemImage {
        fn vm_id(&self) -> &str {
            "fuzz"
        }
        fn ram_pages(&self) -> u32 {
            self.pages.len() as u32
        }
        fn generation(&self) -> u64 {
            3
        }
        fn next_checkpoint(&self) -> Option<u64> {
            Some(8)
        }
        fn syncing(&self) -> bool {
            false
        }
        fn page(&self, page: u32) -> &Page {
            &self.pages[page as usize]
        }
        fn page_hash(&self, page: u32) -> PageHash {
            self.hashes[page as usize]
        }
        fn digest(&self) -> ImageDigest {
            self.digest
        }
    }

    /// Splits `data` into chunks and feeds them to a decoder. If the first byte
    /// is odd, each piece is `kind byte + body` and is framed with valid CRCs
    /// (so fuzzing reaches past the checksums); otherwise pieces are raw chunks.
    /// Pieces are u16-length-prefixed.
    pub fn decode_arbitrary(data: &[u8]) -> Option<StagedEpoch> {
        let image = MemImage::default();
        let (&mode, mut rest) = data.split_first()?;
        let mut decoder = EpochDecoder::new();
        let mut seq = 0u32;
        while rest.len() >= 2 {
            let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
            let piece = rest.get(2..2 + len).unwrap_or(&rest[2..]);
            rest = rest.get(2 + len..).unwrap_or(&[]);
            let framed;
            let chunk = if mode & 1 == 1 {
                let (&kind, body) = piece.split_first()?;
                let kind = match kind % 4 {
                    0 => ChunkKind::Begin,
                    1 => ChunkKind::Pages,
                    2 => ChunkKind::Device,
                    _ => ChunkKind::End,
                };
                framed = chunk::frame(kind, 8, seq, &body[..body.len().min(MAX_CHUNK_BODY)]);
                seq += 1;
                &framed[..]
            } else {
                piece
            };
            match decoder.push(&Bytes::copy_from_slice(chunk), &image) {
                Ok(Received::Complete(staged)) => return Some(*staged),
                Ok(Received::NeedMore) => {}
                Err(_) => return None,
            }
        }
        None
    }
}
