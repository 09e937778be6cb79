//! Test helpers: a model of the sender's guest memory, deterministic page
//! mutations, and shipping epochs from a `SenderState` into an `ImageStore`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use understudy_checkpoint::epoch::{EpochDecoder, EpochKind, Received, SenderState, StagedEpoch};
use understudy_checkpoint::store::ImageStore;
use understudy_checkpoint::{CodecPolicy, EncodedEpoch, EpochError, PAGE_SIZE, Page};

/// SplitMix64: small, deterministic, good enough to drive tests.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The sender's guest memory.
#[derive(Clone, Debug)]
pub struct Model {
    pub mem: Vec<u8>,
}

impl Model {
    pub fn new(pages: u32) -> Self {
        Self {
            mem: vec![0; pages as usize * PAGE_SIZE],
        }
    }

    pub fn pages(&self) -> u32 {
        (self.mem.len() / PAGE_SIZE) as u32
    }

    pub fn page(&self, p: u32) -> &Page {
        self.mem[p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE]
            .try_into()
            .unwrap()
    }

    pub fn page_mut(&mut self, p: u32) -> &mut [u8] {
        &mut self.mem[p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE]
    }

    /// One mutation of the kind real memory sees; returns the page touched.
    pub fn mutate(&mut self, rng: &mut Rng) -> u32 {
        let p = rng.below(self.pages() as u64) as u32;
        match rng.below(8) {
            // a few words change
            0 | 1 => {
                for _ in 0..=rng.below(4) {
                    let w = rng.below(512) as usize * 8;
                    let v = rng.next().to_le_bytes();
                    self.page_mut(p)[w..w + 8].copy_from_slice(&v);
                }
            }
            // copy of another page (dedup)
            2 => {
                let q = rng.below(self.pages() as u64) as u32;
                let src = *self.page(q);
                self.page_mut(p).copy_from_slice(&src);
            }
            // zeroed
            3 => self.page_mut(p).fill(0),
            // compressible text
            4 => {
                let seed = rng.next() as u8;
                for (i, b) in self.page_mut(p).iter_mut().enumerate() {
                    *b = b"abcdefgh"[(i + seed as usize) % 8];
                }
            }
            // incompressible
            5 => {
                for chunk in self.page_mut(p).chunks_mut(8) {
                    chunk.copy_from_slice(&rng.next().to_le_bytes());
                }
            }
            // a buffer inside the page rewritten (200-250 words, under half)
            6 => {
                let words = 200 + rng.below(51) as usize;
                let start = rng.below((512 - words) as u64 + 1) as usize * 8;
                let fill = rng.next();
                for w in self.page_mut(p)[start..start + words * 8].chunks_mut(8) {
                    w.copy_from_slice(&fill.wrapping_add(w[0] as u64).to_le_bytes());
                }
            }
            // rewritten with the same content
            _ => {}
        }
        p
    }
}

/// Encodes `pages` (sorted, deduplicated here) of `model` as one epoch.
pub fn encode(
    sender: &mut SenderState,
    model: &Model,
    epoch: u64,
    kind: EpochKind,
    pages: &[u32],
    device_state: &[u8],
) -> EncodedEpoch {
    let mut pages = pages.to_vec();
    pages.sort_unstable();
    pages.dedup();
    let mut enc = sender.begin(epoch, kind).unwrap();
    for p in pages {
        enc.add_page(p, model.page(p)).unwrap();
    }
    enc.finish(device_state).unwrap()
}

/// Feeds chunks to a decoder against `store`.
pub fn decode(store: &ImageStore, chunks: &[Vec<u8>]) -> Result<StagedEpoch, EpochError> {
    let mut dec = EpochDecoder::new();
    for (i, c) in chunks.iter().enumerate() {
        match dec.push(&bytes::Bytes::copy_from_slice(c), store)? {
            Received::Complete(staged) => {
                assert_eq!(i, chunks.len() - 1, "complete before the last chunk");
                return Ok(*staged);
            }
            Received::NeedMore => {}
        }
    }
    panic!("epoch incomplete after all chunks");
}

/// Encodes, decodes and applies one epoch.
pub fn ship(
    sender: &mut SenderState,
    store: &mut ImageStore,
    model: &Model,
    epoch: u64,
    kind: EpochKind,
    pages: &[u32],
) -> EncodedEpoch {
    let encoded = encode(
        sender,
        model,
        epoch,
        kind,
        pages,
        format!("device@{epoch}").as_bytes(),
    );
    let staged = decode(store, &encoded.chunks).unwrap();
    store.apply(&staged).unwrap();
    encoded
}

/// A fresh store fully synced with `model` and committed at epoch 0.
/// A new image store for `model`'s VM (`vm-test`), its first sync begun.
pub fn syncing_store(dir: &std::path::Path, model: &Model) -> ImageStore {
    let mut store =
        ImageStore::create(dir, "vm-test", model.mem.len() as u64, Default::default()).unwrap();
    store.begin_sync(1, 7).unwrap();
    store
}

pub fn synced_store(
    dir: &std::path::Path,
    model: &Model,
    policy: CodecPolicy,
) -> (SenderState, ImageStore) {
    let mut store = syncing_store(dir, model);
    let mut sender = SenderState::new("vm-test", model.pages(), 1, policy).unwrap();
    let all: Vec<u32> = (0..model.pages()).collect();
    ship(
        &mut sender,
        &mut store,
        model,
        0,
        EpochKind::SyncRound,
        &all,
    );
    ship(
        &mut sender,
        &mut store,
        model,
        1,
        EpochKind::Checkpoint,
        &[],
    );
    (sender, store)
}
