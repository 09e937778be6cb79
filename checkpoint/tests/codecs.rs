//! Property tests: any sequence of page writes, encoded as epochs with any
//! policy and applied to an image store, reproduces the sender's memory exactly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Model, Rng, decode, ship, synced_store};
use proptest::prelude::*;
use understudy_checkpoint::PAGE_SIZE;
use understudy_checkpoint::epoch::{EpochKind, SenderState};
use understudy_checkpoint::store::ImageStatus;
use understudy_checkpoint::{Codec, CodecPolicy, CommittedImage, Compression};

fn policies() -> Vec<(&'static str, CodecPolicy)> {
    let only = |f: fn(&mut CodecPolicy)| {
        let mut p = CodecPolicy::RAW;
        f(&mut p);
        p
    };
    vec![
        ("raw", CodecPolicy::RAW),
        ("zero", only(|p| p.zero = true)),
        ("dedup", only(|p| p.dedup = true)),
        (
            "delta",
            only(|p| {
                p.delta = true;
                p.delta_cache_pages = 16;
            }),
        ),
        ("lz4", only(|p| p.compression = Compression::Lz4)),
        ("zstd", only(|p| p.compression = Compression::Zstd(3))),
        ("adaptive", CodecPolicy::ADAPTIVE),
        (
            "adaptive, tiny cache",
            CodecPolicy {
                delta_cache_pages: 2,
                ..CodecPolicy::ADAPTIVE
            },
        ),
    ]
}

fn run(seed: u64, pages: u32, epochs: usize, writes: usize, policy: CodecPolicy) -> [u64; 8] {
    let mut rng = Rng(seed);
    let mut model = Model::new(pages);
    for _ in 0..pages {
        model.mutate(&mut rng);
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut sender, mut store) = synced_store(&dir.path().join("img"), &model, policy);
    assert_eq!(store.memory(), &model.mem[..]);
    let mut by_codec = [0u64; 8];
    for epoch in 2..2 + epochs as u64 {
        let touched: Vec<u32> = (0..writes).map(|_| model.mutate(&mut rng)).collect();
        let encoded = ship(
            &mut sender,
            &mut store,
            &model,
            epoch,
            EpochKind::Checkpoint,
            &touched,
        );
        for (total, n) in by_codec.iter_mut().zip(encoded.report.pages_by_codec) {
            *total += n;
        }
        assert_eq!(store.status(), ImageStatus::Committed { epoch });
        assert!(
            store.memory() == &model.mem[..],
            "memory differs after epoch {epoch}"
        );
        assert_eq!(store.digest(), sender.digest());
        assert_eq!(store.device_state(), format!("device@{epoch}").as_bytes());
    }
    // Reopening verifies every page against the committed digest.
    drop(store);
    let (store, _) =
        understudy_checkpoint::ImageStore::open(&dir.path().join("img"), Default::default())
            .unwrap();
    assert!(store.memory() == &model.mem[..]);
    by_codec
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn every_policy_reproduces_the_sender_exactly(seed in any::<u64>(), pages in 1u32..96, epochs in 1usize..6, writes in 0usize..60) {
        for (_, policy) in policies() {
            run(seed, pages, epochs, writes, policy);
        }
    }
}

#[test]
fn every_codec_is_exercised_by_the_adaptive_policy() {
    let by_codec = run(7, 128, 30, 80, CodecPolicy::ADAPTIVE);
    for codec in Codec::ALL {
        if codec == Codec::Raw || codec == Codec::Zstd {
            continue; // adaptive uses lz4; raw only for incompressible pages it could not delta
        }
        assert!(
            by_codec[codec as usize] > 0,
            "{} never used: {by_codec:?}",
            codec.name()
        );
    }
    let zstd = run(
        7,
        64,
        5,
        40,
        CodecPolicy {
            compression: Compression::Zstd(3),
            ..CodecPolicy::ADAPTIVE
        },
    );
    assert!(zstd[Codec::Zstd as usize] > 0);
    let raw = run(7, 64, 5, 40, CodecPolicy::RAW);
    assert_eq!(raw.iter().sum::<u64>(), raw[Codec::Raw as usize]);
}

#[test]
fn multiple_sync_rounds_then_checkpoint_converge() {
    let mut rng = Rng(99);
    let mut model = Model::new(200);
    let dir = tempfile::tempdir().unwrap();
    let mut store = understudy_checkpoint::ImageStore::create(
        &dir.path().join("i"),
        "vm-test",
        200 * 4096,
        Default::default(),
    )
    .unwrap();
    store.begin_sync(3, 7).unwrap();
    let mut sender =
        understudy_checkpoint::SenderState::new("vm-test", 200, 3, CodecPolicy::ADAPTIVE).unwrap();
    // Round 1 sends everything while the guest keeps writing; later rounds
    // send what changed; the final checkpoint makes the image consistent.
    let all: Vec<u32> = (0..200).collect();
    ship(
        &mut sender,
        &mut store,
        &model,
        10,
        EpochKind::SyncRound,
        &all,
    );
    for round in 11..14 {
        let touched: Vec<u32> = (0..50).map(|_| model.mutate(&mut rng)).collect();
        ship(
            &mut sender,
            &mut store,
            &model,
            round,
            EpochKind::SyncRound,
            &touched,
        );
        assert_eq!(store.status(), ImageStatus::Syncing);
    }
    let touched: Vec<u32> = (0..20).map(|_| model.mutate(&mut rng)).collect();
    ship(
        &mut sender,
        &mut store,
        &model,
        14,
        EpochKind::Checkpoint,
        &touched,
    );
    assert_eq!(store.status(), ImageStatus::Committed { epoch: 14 });
    assert_eq!(store.generation(), 3);
    assert!(store.memory() == &model.mem[..]);
}

#[test]
fn a_checkpoint_before_every_page_was_sent_is_refused_by_the_sender() {
    let mut sender = understudy_checkpoint::SenderState::new("vm", 4, 1, CodecPolicy::RAW).unwrap();
    let enc = sender.begin(0, EpochKind::Checkpoint).unwrap();
    let err = enc.finish(b"").unwrap_err();
    assert_eq!(
        err,
        understudy_checkpoint::epoch::EncodeError::ReceiverStateUnknown { unknown: 4 }
    );
}

#[test]
fn a_sync_into_a_zeroed_image_sends_only_what_the_image_lacks() {
    const PAGES: u32 = 64;
    let mut model = Model::new(PAGES);
    for p in (0..PAGES).step_by(4) {
        model.mem[p as usize * PAGE_SIZE..][..8].copy_from_slice(&u64::from(p + 1).to_le_bytes());
    }
    let dir = tempfile::tempdir().unwrap();
    let mut store = common::syncing_store(&dir.path().join("img"), &model);
    assert!(store.holds_only_zeros(), "a created image holds zeros");
    let mut sender =
        SenderState::over_zeroed_image("vm-test", PAGES, 1, CodecPolicy::ADAPTIVE).unwrap();
    // Round 1 over all of RAM: only the pages with content go.
    let all: Vec<u32> = (0..PAGES).collect();
    let round = ship(
        &mut sender,
        &mut store,
        &model,
        1,
        EpochKind::SyncRound,
        &all,
    );
    assert_eq!(round.report.pages, u64::from(PAGES / 4));
    assert_eq!(round.report.pages_held, u64::from(PAGES - PAGES / 4));
    assert!(!store.holds_only_zeros());
    // A later round sends a page written since, not one written back with
    // the content it had, nor one still zero.
    model.mem[5 * PAGE_SIZE] = 1;
    let round = ship(
        &mut sender,
        &mut store,
        &model,
        2,
        EpochKind::SyncRound,
        &[4, 5, 6],
    );
    assert_eq!((round.report.pages, round.report.pages_held), (1, 2));
    // The checkpoint checks the image's digest: it matches the model's. It
    // too leaves out the pages the image holds (4 rewritten with its bytes,
    // 6 still zero) and sends the one that changed.
    model.mem[8 * PAGE_SIZE] = 0x55;
    let checkpoint = ship(
        &mut sender,
        &mut store,
        &model,
        3,
        EpochKind::Checkpoint,
        &[4, 6, 8],
    );
    assert_eq!(
        (checkpoint.report.pages, checkpoint.report.pages_held),
        (1, 2)
    );
    assert_eq!(store.status(), ImageStatus::Committed { epoch: 3 });
    assert_eq!(store.memory(), &model.mem[..]);
    store.promotable().unwrap();
}

#[test]
fn a_checkpoint_completes_a_sync_that_left_every_page_out() {
    // The primary leaves a page the guest never touched out of its sync
    // rounds when the sender knows the image holds zeros there
    // (`holds_zero`): over an idle guest no round has a page, and the first
    // checkpoint alone completes the sync.
    const PAGES: u32 = 16;
    let mut model = Model::new(PAGES);
    let dir = tempfile::tempdir().unwrap();
    let mut store = common::syncing_store(&dir.path().join("img"), &model);
    let mut sender = SenderState::over_zeroed_image("vm-test", PAGES, 1, CodecPolicy::RAW).unwrap();
    assert!((0..PAGES).all(|p| sender.holds_zero(p)));
    assert!(!sender.holds_zero(PAGES), "a page beyond the RAM");
    model.mem[3 * PAGE_SIZE] = 9;
    let checkpoint = ship(
        &mut sender,
        &mut store,
        &model,
        1,
        EpochKind::Checkpoint,
        &[3],
    );
    assert_eq!(checkpoint.report.pages, 1);
    assert_eq!(store.status(), ImageStatus::Committed { epoch: 1 });
    assert_eq!(store.memory(), &model.mem[..]);
    store.promotable().unwrap();
    assert!(!sender.holds_zero(3), "page 3 holds 9 now");
    assert!(sender.holds_zero(2));
    // A sender that does not know the image holds no page as zero.
    let unknown = SenderState::new("vm-test", PAGES, 1, CodecPolicy::RAW).unwrap();
    assert!(!unknown.holds_zero(0));
}

#[test]
fn a_sender_wrong_about_a_zeroed_image_is_refused_at_the_checkpoint() {
    const PAGES: u32 = 16;
    let mut model = Model::new(PAGES);
    let dir = tempfile::tempdir().unwrap();
    let mut store = common::syncing_store(&dir.path().join("img"), &model);
    // The image holds something at page 2 (a sync before this one).
    model.mem[2 * PAGE_SIZE] = 7;
    let mut before = SenderState::new("vm-test", PAGES, 1, CodecPolicy::RAW).unwrap();
    ship(
        &mut before,
        &mut store,
        &model,
        1,
        EpochKind::SyncRound,
        &(0..PAGES).collect::<Vec<_>>(),
    );
    assert!(!store.holds_only_zeros());
    // A sender that takes the image for zeroed leaves page 2 out: the
    // checkpoint's digest says so, and nothing is committed.
    model.mem[2 * PAGE_SIZE] = 0;
    let mut wrong = SenderState::over_zeroed_image("vm-test", PAGES, 1, CodecPolicy::RAW).unwrap();
    let round = common::encode(
        &mut wrong,
        &model,
        2,
        EpochKind::SyncRound,
        &(0..PAGES).collect::<Vec<_>>(),
        b"",
    );
    assert_eq!(round.report.pages, 0);
    store
        .apply(&decode(&store, &round.chunks).unwrap())
        .unwrap();
    let checkpoint = common::encode(&mut wrong, &model, 3, EpochKind::Checkpoint, &[], b"dev");
    let err = decode(&store, &checkpoint.chunks).unwrap_err();
    assert!(
        matches!(
            err,
            understudy_checkpoint::epoch::EpochError::DigestMismatch { .. }
        ),
        "{err}"
    );
    assert_eq!(store.status(), ImageStatus::Syncing);
}

#[test]
fn zero_pages_are_neither_staged_nor_rewritten_and_leave_no_stale_delta_base() {
    const PAGES: u32 = 64;
    let policy = CodecPolicy {
        delta_cache_pages: 16,
        ..CodecPolicy::ADAPTIVE
    };
    let mut model = Model::new(PAGES);
    for p in 0..PAGES / 2 {
        model.mem[p as usize * PAGE_SIZE..][..8].copy_from_slice(&u64::from(p + 1).to_le_bytes());
    }
    let dir = tempfile::tempdir().unwrap();
    let mut store = common::syncing_store(&dir.path().join("img"), &model);
    let mut sender = SenderState::new("vm-test", PAGES, 1, policy).unwrap();
    // A sync round with the upper half "never touched": sent without reading.
    let mut enc = sender.begin(1, EpochKind::SyncRound).unwrap();
    for p in 0..PAGES {
        if p < PAGES / 2 {
            enc.add_page(p, model.page(p)).unwrap();
        } else {
            enc.add_zero_page(p).unwrap();
        }
    }
    let encoded = enc.finish(b"").unwrap();
    assert_eq!(
        encoded.report.pages_by_codec[Codec::Zero as usize],
        u64::from(PAGES / 2)
    );
    let staged = decode(&store, &encoded.chunks).unwrap();
    assert_eq!(
        staged.data.len(),
        (PAGES / 2) as usize * PAGE_SIZE,
        "zero pages take no staging memory"
    );
    assert_eq!(staged.page_data(PAGES as usize - 1), &[0u8; PAGE_SIZE]);
    store.apply(&staged).unwrap();
    ship(
        &mut sender,
        &mut store,
        &model,
        2,
        EpochKind::Checkpoint,
        &[],
    );
    assert_eq!(store.memory(), &model.mem[..]);

    // Page 3 is cached as a delta base, then zeroed, then written again:
    // a stale cached version would make the last delta wrong.
    let mut epoch = 3;
    let mut step = |model: &mut Model, f: &dyn Fn(&mut [u8])| {
        f(&mut model.mem[3 * PAGE_SIZE..4 * PAGE_SIZE]);
        ship(
            &mut sender,
            &mut store,
            model,
            epoch,
            EpochKind::Checkpoint,
            &[3],
        );
        epoch += 1;
        assert_eq!(store.memory(), &model.mem[..], "epoch {}", epoch - 1);
    };
    step(&mut model, &|p| p[100] = 9);
    step(&mut model, &|p| p[200] = 7);
    step(&mut model, &|p| p.fill(0));
    step(&mut model, &|p| p[300] = 5);
    store.promotable().unwrap();
}

#[test]
fn raw_pages_are_applied_from_the_chunks_they_arrived_in() {
    const PAGES: u32 = 64;
    let mut rng = Rng(0x5eed_1234);
    let mut model = Model::new(PAGES);
    let fill = |model: &mut Model, rng: &mut Rng| {
        for word in model.mem.chunks_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
        // Page 9 repeats page 3: sent as a reference to it.
        let page3 = *model.page(3);
        model.mem[9 * PAGE_SIZE..10 * PAGE_SIZE].copy_from_slice(&page3);
    };
    fill(&mut model, &mut rng);
    let policy = CodecPolicy {
        dedup: true,
        ..CodecPolicy::RAW
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut sender, mut store) = synced_store(&dir.path().join("img"), &model, policy);
    fill(&mut model, &mut rng);
    let all: Vec<u32> = (0..PAGES).collect();
    let epoch = store.committed_epoch().unwrap() + 1;
    let encoded = common::encode(&mut sender, &model, epoch, EpochKind::Checkpoint, &all, b"");
    assert_eq!(encoded.report.pages_by_codec[Codec::RepeatOf as usize], 1);
    // As the receiver holds them: each chunk in a buffer of its own.
    let chunks: Vec<bytes::Bytes> = encoded.chunks.into_iter().map(Into::into).collect();
    let mut dec = understudy_checkpoint::EpochDecoder::new();
    let mut staged = None;
    for c in &chunks {
        if let understudy_checkpoint::Received::Complete(s) = dec.push(c, &store).unwrap() {
            staged = Some(s);
        }
    }
    let staged = staged.unwrap();
    assert!(
        staged.data.is_empty(),
        "raw pages were copied into the staging buffer"
    );
    let in_a_chunk = |page: &[u8]| {
        chunks.iter().any(|c| {
            let range = c.as_ptr_range();
            range.contains(&page.as_ptr()) && page.len() <= c.len()
        })
    };
    for i in 0..PAGES as usize {
        assert_eq!(staged.page_data(i), model.page(i as u32), "page {i}");
        assert!(
            in_a_chunk(staged.page_data(i)),
            "page {i} is not in its chunk"
        );
    }
    assert_eq!(staged.slots[9], staged.slots[3], "a repeat shares its page");
    store.apply(&staged).unwrap();
    assert!(store.memory() == &model.mem[..]);

    // A short chunk's raw pages are copied: it is not kept.
    for p in [20u32, 21, 40] {
        model.mem[p as usize * PAGE_SIZE] ^= 0x5a;
    }
    let encoded = common::encode(
        &mut sender,
        &model,
        epoch + 1,
        EpochKind::Checkpoint,
        &[20, 21, 40],
        b"",
    );
    let staged = decode(&store, &encoded.chunks).unwrap();
    assert!(staged.wire.is_empty(), "a short chunk was kept");
    assert_eq!(staged.data.len(), 3 * PAGE_SIZE);
    store.apply(&staged).unwrap();
    assert!(store.memory() == &model.mem[..]);
}

#[test]
fn the_encoder_feeds_the_adaptive_codec_a_sample_of_the_pages_it_compresses() {
    // Compressible pages (text-like, never zero): every full page is a
    // candidate. The encoder must time the pages of a sample and hand them
    // to the adaptive codec, which then decides; with no link rate known,
    // saving an eighth is enough to go on compressing.
    const PAGES: u32 = 2 * understudy_checkpoint::codec::SAMPLE_PAGES;
    let mut sender = SenderState::new("vm", PAGES, 1, CodecPolicy::ADAPTIVE).unwrap();
    assert_eq!(sender.adaptive(), None, "no decision before any page");
    // Text, and each page's number at its start: no two alike (a repeat
    // would be sent as a reference, not compressed).
    let page = |p: u32| -> [u8; PAGE_SIZE] {
        let mut page: [u8; PAGE_SIZE] =
            std::array::from_fn(|i| b"understudy keeps a VM alive "[i % 28]);
        page[..4].copy_from_slice(&p.to_le_bytes());
        page
    };
    let mut enc = sender.begin(1, EpochKind::SyncRound).unwrap();
    for p in 0..PAGES {
        enc.add_page(p, &page(p)).unwrap();
    }
    enc.finish(b"").unwrap();
    let report = sender
        .adaptive()
        .expect("the encoder fed the adaptive codec");
    assert!(report.compressing, "{report:?}");
    assert!(report.saved_share > 0.5, "{report:?}");
    assert!(
        report.compress_rate.is_finite() && report.compress_rate > 0.0,
        "{report:?}"
    );
}

/// A synced adaptive sender and its image over pages of random words, the
/// link far faster than any compressor and its first sample taken (pages
/// 0..400 rewritten, shipped in one checkpoint, incompressible: lz4 saves
/// nothing either).
struct FastLink {
    _dir: tempfile::TempDir,
    model: Model,
    rng: Rng,
    sender: SenderState,
    store: understudy_checkpoint::ImageStore,
    epoch: u64,
}

impl FastLink {
    const SAMPLE: std::ops::Range<u32> = 0..400;

    fn new(pages: u32, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let mut model = Model::new(pages);
        for p in 0..pages {
            fill_random(&mut model, p, &mut rng);
        }
        let dir = tempfile::tempdir().unwrap();
        let (mut sender, store) =
            synced_store(&dir.path().join("img"), &model, CodecPolicy::ADAPTIVE);
        sender.set_link_rate(Some(1e15));
        let mut f = Self {
            _dir: dir,
            model,
            rng,
            sender,
            store,
            epoch: 2,
        };
        for p in Self::SAMPLE {
            fill_random(&mut f.model, p, &mut f.rng);
        }
        f.step(&Self::SAMPLE.collect::<Vec<_>>());
        let report = f.sender.adaptive().expect("a decision");
        assert!(!report.compressing, "{report:?}");
        f
    }

    /// Ships a checkpoint of `pages` and checks the image; its pages by codec.
    fn step(&mut self, pages: &[u32]) -> [u64; 8] {
        let epoch = self.epoch;
        let (sender, store) = (&mut self.sender, &mut self.store);
        let encoded = ship(
            sender,
            store,
            &self.model,
            epoch,
            EpochKind::Checkpoint,
            pages,
        );
        assert!(
            self.store.memory() == &self.model.mem[..],
            "image differs after epoch {epoch}"
        );
        self.epoch += 1;
        encoded.report.pages_by_codec
    }

    /// Page `to` takes page `from`'s content.
    fn copy(&mut self, from: u32, to: u32) {
        let content = *self.model.page(from);
        self.model.mem[to as usize * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&content);
    }

    fn fill(&mut self, page: u32) {
        fill_random(&mut self.model, page, &mut self.rng);
    }
}

/// Fills `page` of `model` with random words.
fn fill_random(model: &mut Model, page: u32, rng: &mut Rng) {
    for word in model.mem[page as usize * PAGE_SIZE..][..PAGE_SIZE].chunks_mut(8) {
        word.copy_from_slice(&rng.next().to_le_bytes());
    }
}

/// While the link outruns the compressor the adaptive codec skips dedup by
/// content for whole epochs (its image-wide index emptied), and once the
/// link is slow again it dedups from what it sends next. The image is exact
/// after every epoch, so no reference ever named a page that had changed
/// since it was indexed.
#[test]
fn dedup_skipped_while_the_link_outruns_the_compressor_resumes_without_stale_references() {
    let mut f = FastLink::new(700, 5);
    // Copies of content the image holds, and that content's page changed:
    // an index kept through these epochs would name it stale.
    for round in 0..3u32 {
        let holder = 500 + round;
        let mut pages: Vec<u32> = (600 + round * 10..610 + round * 10).collect();
        for &p in &pages {
            f.copy(holder, p);
        }
        f.fill(holder);
        pages.push(holder);
        let by_codec = f.step(&pages);
        assert_eq!(by_codec[Codec::RepeatOf as usize], 0, "{by_codec:?}");
        assert_eq!(by_codec[Codec::SameAs as usize], 0, "{by_codec:?}");
    }
    // A slow link: dedup again, from what is sent from now on.
    f.sender.set_link_rate(Some(1.0));
    let pages: Vec<u32> = (100..110).collect();
    f.fill(100);
    for &p in &pages[1..] {
        f.copy(100, p);
    }
    let by_codec = f.step(&pages);
    assert_eq!(by_codec[Codec::RepeatOf as usize], 9, "{by_codec:?}");
    let pages: Vec<u32> = (200..205).collect();
    for &p in &pages {
        f.copy(105, p);
    }
    // The first refers to page 100 by the index, the rest to the first.
    let by_codec = f.step(&pages);
    assert_eq!(by_codec[Codec::SameAs as usize], 1, "{by_codec:?}");
    assert_eq!(by_codec[Codec::RepeatOf as usize], 4, "{by_codec:?}");
}

/// On a link faster than the compressor, word deltas stay on while they
/// hit (a page with one word changed goes as that word, not 4 KiB), go off
/// once pages are rewritten whole, and are tried again after
/// `DELTA_PROBE_EPOCHS` checkpoints. The image is exact after every epoch.
#[test]
fn deltas_on_a_fast_link_follow_their_own_payoff() {
    use understudy_checkpoint::epoch::{DELTA_PROBE_EPOCHS, DELTA_SAMPLE_TRIES};
    let mut f = FastLink::new(600, 11);
    let working: Vec<u32> = FastLink::SAMPLE.collect();
    // One word of each page changes per epoch (the heavy dirtier's
    // pattern): the first epoch fills the cache, then every page is a delta.
    let touch = |f: &mut FastLink| {
        for &p in &working {
            let at = p as usize * PAGE_SIZE + (f.rng.next() % 512) as usize * 8;
            f.model.mem[at] ^= 0x11;
        }
    };
    touch(&mut f);
    f.step(&working);
    for _ in 0..3 {
        touch(&mut f);
        let by_codec = f.step(&working);
        assert_eq!(by_codec[Codec::DeltaWords as usize], 400, "{by_codec:?}");
    }
    // Pages rewritten whole: one checkpoint of misses turns deltas off.
    assert!(working.len() as u64 >= DELTA_SAMPLE_TRIES);
    for &p in &working {
        f.fill(p);
    }
    let by_codec = f.step(&working);
    assert_eq!(by_codec[Codec::Raw as usize], 400, "{by_codec:?}");
    // Off for DELTA_PROBE_EPOCHS checkpoints: even one-word changes go raw
    // (the cache is not kept meanwhile)...
    for _ in 0..DELTA_PROBE_EPOCHS {
        touch(&mut f);
        let by_codec = f.step(&working);
        assert_eq!(by_codec[Codec::Raw as usize], 400, "{by_codec:?}");
    }
    // ... until the probe: one checkpoint fills the cache, the next finds
    // deltas paying again.
    touch(&mut f);
    let by_codec = f.step(&working);
    assert_eq!(by_codec[Codec::Raw as usize], 400, "{by_codec:?}");
    touch(&mut f);
    let by_codec = f.step(&working);
    assert_eq!(by_codec[Codec::DeltaWords as usize], 400, "{by_codec:?}");
}
