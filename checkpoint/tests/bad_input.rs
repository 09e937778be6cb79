//! Bad input: corrupted, truncated, reordered, foreign or stale epochs are
//! refused with a specific error, and the committed image is never touched.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Model, Rng, decode, encode, synced_store, syncing_store};
use understudy_checkpoint::chunk::{self, ChunkKind};
use understudy_checkpoint::epoch::{EpochKind, SenderState};
use understudy_checkpoint::store::{ImageStatus, ImageStore, Recovery, StoreError};
use understudy_checkpoint::{CodecError, CodecPolicy, CommittedImage, EpochError};

struct Fixture {
    _dir: tempfile::TempDir,
    store: ImageStore,
    sender: SenderState,
    model: Model,
    rng: Rng,
}

fn fixture() -> Fixture {
    let mut rng = Rng(5);
    let mut model = Model::new(64);
    for _ in 0..200 {
        model.mutate(&mut rng);
    }
    let dir = tempfile::tempdir().unwrap();
    let (sender, store) = synced_store(&dir.path().join("img"), &model, CodecPolicy::ADAPTIVE);
    Fixture {
        _dir: dir,
        store,
        sender,
        model,
        rng,
    }
}

impl Fixture {
    /// The next epoch's chunks (many small pages chunks would need a big epoch;
    /// 40 writes give Begin, Pages, Device, End).
    fn next_epoch(&mut self) -> Vec<Vec<u8>> {
        let touched: Vec<u32> = (0..40).map(|_| self.model.mutate(&mut self.rng)).collect();
        let epoch = self.store.committed_epoch().unwrap() + 1;
        encode(
            &mut self.sender,
            &self.model,
            epoch,
            EpochKind::Checkpoint,
            &touched,
            b"devstate",
        )
        .chunks
    }

    fn snapshot(&self) -> (Vec<u8>, Option<u64>, understudy_checkpoint::ImageDigest) {
        (
            self.store.memory().to_vec(),
            self.store.committed_epoch(),
            self.store.digest(),
        )
    }
}

#[test]
fn every_flipped_bit_is_refused_and_the_image_is_untouched() {
    every_flipped_bit_is_refused(false);
}

/// Pages chunks without a body CRC (`chunk::FLAG_PAGES_BY_HASH`): a flip in
/// a page is caught by the epoch's digest instead, before anything is written.
#[test]
fn every_flipped_bit_is_refused_with_pages_checked_by_hash() {
    every_flipped_bit_is_refused(true);
}

fn every_flipped_bit_is_refused(pages_by_hash: bool) {
    let mut f = fixture();
    f.sender.set_pages_by_hash(pages_by_hash);
    let chunks = f.next_epoch();
    let pages_flag = chunks
        .iter()
        .filter(|c| chunk::parse(c).unwrap().0.kind == ChunkKind::Pages)
        .all(|c| c[7] == chunk::FLAG_PAGES_BY_HASH);
    assert_eq!(pages_flag, pages_by_hash, "the Pages chunks' flag");
    let before = f.snapshot();
    let (mut refused, mut harmless) = (0, 0);
    for (c, chunk) in chunks.iter().enumerate() {
        // Every byte of small chunks, a spread of bytes of large ones.
        let step = (chunk.len() / 200).max(1);
        for i in (0..chunk.len()).step_by(step) {
            let mut bad = chunks.clone();
            bad[c][i] ^= 1 << (i % 8);
            let mut dec = understudy_checkpoint::EpochDecoder::new();
            let result = bad.iter().try_for_each(|ch| {
                dec.push(&bytes::Bytes::copy_from_slice(ch), &f.store)
                    .map(|_| ())
            });
            if result.is_err() {
                refused += 1;
                continue;
            }
            // Without a body CRC, a flip that decodes to the very same
            // pages (an lz4 match offset pointing at equal bytes) is not
            // corruption of anything; any other flip must be refused.
            assert!(pages_by_hash, "flip in chunk {c} byte {i} accepted");
            let (a, b) = (
                decode(&f.store, &chunks).unwrap(),
                decode(&f.store, &bad).unwrap(),
            );
            assert!(
                (&a.pages, &a.hashes, &a.device_state, a.digest)
                    == (&b.pages, &b.hashes, &b.device_state, b.digest),
                "flip in chunk {c} byte {i} accepted with other content"
            );
            harmless += 1;
        }
    }
    assert!(
        refused > 100 && harmless * 20 < refused,
        "{refused} refused, {harmless} harmless"
    );
    assert_eq!(f.snapshot(), before, "a refused epoch changed nothing");
    // The genuine epoch still applies.
    let staged = decode(&f.store, &chunks).unwrap();
    f.store.apply(&staged).unwrap();
    assert!(f.store.memory() == &f.model.mem[..]);
}

/// A sync round's pages are not checked against a digest at its End (the
/// receiver's image is not known to the sender until the sync is done), so
/// with Pages chunks checked by hash a flipped page in a sync round is
/// staged and written; the first checkpoint's digest refuses it, and the
/// image is never promotable in between.
#[test]
fn a_page_flipped_in_a_sync_round_checked_by_hash_is_caught_by_the_first_checkpoint() {
    let mut rng = Rng(11);
    let mut model = Model::new(64);
    for _ in 0..200 {
        model.mutate(&mut rng);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut store = syncing_store(&dir.path().join("img"), &model);
    let mut sender = SenderState::new("vm-test", model.pages(), 1, CodecPolicy::RAW).unwrap();
    sender.set_pages_by_hash(true);
    let all: Vec<u32> = (0..model.pages()).collect();
    let mut sync = encode(&mut sender, &model, 0, EpochKind::SyncRound, &all, b"").chunks;
    // One byte of a page's content, well inside the first Pages chunk.
    let pages_chunk = sync
        .iter()
        .position(|c| chunk::parse(c).unwrap().0.kind == ChunkKind::Pages)
        .unwrap();
    let at = sync[pages_chunk].len() / 2;
    sync[pages_chunk][at] ^= 0x10;
    let staged = decode(&store, &sync).unwrap();
    store.apply(&staged).unwrap();
    assert!(
        store.promotable().is_err(),
        "promotable in the middle of a sync"
    );
    let first = encode(&mut sender, &model, 1, EpochKind::Checkpoint, &[], b"dev").chunks;
    assert!(
        matches!(
            decode(&store, &first),
            Err(EpochError::DigestMismatch { .. })
        ),
        "the first checkpoint fits an image with a flipped page"
    );
    assert!(
        store.promotable().is_err(),
        "promotable with a flipped page"
    );
}

#[test]
fn truncated_missing_reordered_and_duplicated_chunks_are_refused() {
    let mut f = fixture();
    let chunks = f.next_epoch();
    assert!(chunks.len() >= 4, "Begin, Pages, Device, End");
    let before = f.snapshot();
    let feed = |chunks: &[Vec<u8>], store: &ImageStore| -> Result<(), EpochError> {
        let mut dec = understudy_checkpoint::EpochDecoder::new();
        for c in chunks {
            if let understudy_checkpoint::Received::Complete(_) =
                dec.push(&bytes::Bytes::copy_from_slice(c), store)?
            {
                return Ok(());
            }
        }
        Err(EpochError::BadEnd) // stream ended early: nothing to apply
    };
    let mut truncated = chunks.clone();
    let last = truncated.len() - 2;
    let cut = truncated[last].len() - 1;
    truncated[last].truncate(cut);
    assert!(matches!(
        feed(&truncated, &f.store),
        Err(EpochError::Chunk { .. })
    ));
    let mut missing = chunks.clone();
    missing.remove(1);
    assert!(matches!(
        feed(&missing, &f.store),
        Err(EpochError::OutOfOrder {
            expected: 1,
            got: 2
        })
    ));
    let mut swapped = chunks.clone();
    swapped.swap(1, 2);
    assert!(matches!(
        feed(&swapped, &f.store),
        Err(EpochError::OutOfOrder { .. })
    ));
    let mut duplicated = chunks.clone();
    duplicated.insert(1, chunks[1].clone());
    assert!(matches!(
        feed(&duplicated, &f.store),
        Err(EpochError::OutOfOrder { .. })
    ));
    let mut cut_short = chunks.clone();
    cut_short.pop();
    assert!(feed(&cut_short, &f.store).is_err());
    assert_eq!(f.snapshot(), before);
}

fn begin_body(kind: u8, generation: u64, pages: u32, vm: &str) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend_from_slice(&generation.to_le_bytes());
    b.extend_from_slice(&pages.to_le_bytes());
    b.extend_from_slice(&(vm.len() as u16).to_le_bytes());
    b.extend_from_slice(vm.as_bytes());
    b
}

fn first_error(store: &ImageStore, chunks: &[Vec<u8>]) -> EpochError {
    let mut dec = understudy_checkpoint::EpochDecoder::new();
    for c in chunks {
        if let Err(e) = dec.push(&bytes::Bytes::copy_from_slice(c), store) {
            return e;
        }
    }
    panic!("accepted");
}

#[test]
fn wrong_vm_size_generation_epoch_and_version_each_have_their_error() {
    let f = fixture();
    let next = f.store.committed_epoch().unwrap() + 1;
    let generation0 = f.store.generation();
    let begin = |epoch, body: Vec<u8>| vec![chunk::frame(ChunkKind::Begin, epoch, 0, &body)];
    let err = first_error(
        &f.store,
        &begin(next, begin_body(0, generation0, 64, "other-vm")),
    );
    assert_eq!(
        err,
        EpochError::WrongVm {
            expected: "vm-test".into(),
            got: "other-vm".into()
        }
    );
    let err = first_error(
        &f.store,
        &begin(next, begin_body(0, generation0, 65, "vm-test")),
    );
    assert!(matches!(err, EpochError::WrongRamSize { .. }));
    let err = first_error(
        &f.store,
        &begin(next, begin_body(0, generation0 - 1, 64, "vm-test")),
    );
    assert!(matches!(err, EpochError::StaleGeneration { .. }), "{err}");
    assert!(err.to_string().contains("deposed"));
    let err = first_error(
        &f.store,
        &begin(next + 1, begin_body(0, generation0, 64, "vm-test")),
    );
    assert_eq!(
        err,
        EpochError::WrongEpoch {
            expected: next,
            got: next + 1
        }
    );
    let err = first_error(
        &f.store,
        &begin(next - 1, begin_body(0, generation0, 64, "vm-test")),
    );
    assert!(
        matches!(err, EpochError::WrongEpoch { .. }),
        "a replayed epoch is refused"
    );
    let err = first_error(
        &f.store,
        &begin(next, begin_body(1, generation0, 64, "vm-test")),
    );
    assert_eq!(err, EpochError::NotSyncing);
    let mut newer = chunk::frame(
        ChunkKind::Begin,
        next,
        0,
        &begin_body(0, generation0, 64, "vm-test"),
    );
    newer[4] = 9;
    let err = first_error(&f.store, &[newer]);
    assert!(err.to_string().contains("chunk 0 is invalid"));
    assert!(
        std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains("version 9 is not supported")
    );
}

#[test]
fn pages_out_of_range_not_ascending_or_with_bad_references_are_refused() {
    let f = fixture();
    let next = f.store.committed_epoch().unwrap() + 1;
    let begin = chunk::frame(
        ChunkKind::Begin,
        next,
        0,
        &begin_body(0, f.store.generation(), 64, "vm-test"),
    );
    let pages = |body: Vec<u8>| {
        vec![
            begin.clone(),
            chunk::frame(ChunkKind::Pages, next, 1, &body),
        ]
    };
    let run = |first: u32, entries: &[&[u8]]| {
        let mut b = first.to_le_bytes().to_vec();
        b.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        for e in entries {
            b.extend_from_slice(e);
        }
        b
    };
    let zero: &[u8] = &[0];
    assert_eq!(
        first_error(&f.store, &pages(run(64, &[zero]))),
        EpochError::PageOutOfRange {
            page: 64,
            ram_pages: 64
        }
    );
    assert!(matches!(
        first_error(&f.store, &pages(run(63, &[zero, zero]))),
        EpochError::PageOutOfRange { page: 64, .. }
    ));
    let mut twice = run(5, &[zero]);
    twice.extend(run(5, &[zero]));
    assert_eq!(
        first_error(&f.store, &pages(twice)),
        EpochError::PagesNotAscending { page: 5, after: 5 }
    );
    assert!(matches!(
        first_error(&f.store, &pages(run(3, &[&[9]]))),
        EpochError::UnknownCodec { page: 3, codec: 9 }
    ));
    let repeat_later: &[u8] = &[5, 10, 0, 0, 0];
    assert!(matches!(
        first_error(&f.store, &pages(run(3, &[repeat_later]))),
        EpochError::BadReference { to: 10, .. }
    ));
    let same_outside: &[u8] = &[4, 200, 0, 0, 0];
    assert!(matches!(
        first_error(&f.store, &pages(run(3, &[same_outside]))),
        EpochError::BadReference { to: 200, .. }
    ));
    let raw_cut_short: &[u8] = &[1, 1, 2, 3];
    assert!(matches!(
        first_error(&f.store, &pages(run(3, &[raw_cut_short]))),
        EpochError::Codec {
            page: 3,
            source: CodecError::Truncated { codec: "raw" }
        }
    ));
}

#[test]
fn a_wrong_digest_is_refused_before_anything_is_written() {
    let mut f = fixture();
    let mut chunks = f.next_epoch();
    // Re-frame the End chunk with a different digest: CRCs are right, content is not.
    let last = chunks.len() - 1;
    let (h, body) = chunk::parse(&chunks[last])
        .map(|(h, b)| (h, b.to_vec()))
        .unwrap();
    let mut body = body;
    body[16] ^= 1;
    chunks[last] = chunk::frame(ChunkKind::End, h.epoch, h.seq, &body);
    let before = f.snapshot();
    let err = decode(&f.store, &chunks).unwrap_err();
    assert!(matches!(err, EpochError::DigestMismatch { .. }), "{err}");
    assert_eq!(f.snapshot(), before);
}

#[test]
fn a_staged_epoch_that_no_longer_fits_is_not_applied() {
    let mut f = fixture();
    let chunks = f.next_epoch();
    let staged = decode(&f.store, &chunks).unwrap();
    f.store.apply(&staged).unwrap();
    let before = f.snapshot();
    let err = f.store.apply(&staged).unwrap_err();
    assert!(matches!(err, StoreError::StaleStaging(_)), "{err}");
    assert_eq!(f.snapshot(), before);
}

/// Flips one bit of byte `at` in the file at `path`.
fn flip_bit(path: &std::path::Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x10;
    std::fs::write(path, &bytes).unwrap();
}

#[test]
fn damaged_metadata_or_image_is_reported_on_open() {
    let Fixture {
        _dir: keep, store, ..
    } = fixture();
    let dir = store.dir().to_owned();
    drop(store);
    flip_bit(&dir.join("memory.img"), 12345);
    let err = ImageStore::open(&dir, Default::default()).unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("let the primary resync"));
    // Flipped back: the image is whole again.
    flip_bit(&dir.join("memory.img"), 12345);
    let (store, recovery) = ImageStore::open(&dir, Default::default()).unwrap();
    assert_eq!(recovery, Recovery::Clean);
    assert!(matches!(store.status(), ImageStatus::Committed { .. }));
    drop(store);

    // The record file keeps the current record and the one before it (a
    // write cut short leaves the older): damaged in both, it is refused.
    let meta = std::fs::read(dir.join("meta")).unwrap();
    let slot_len = u32::from_le_bytes(meta[8..12].try_into().unwrap()) as usize;
    flip_bit(&dir.join("meta"), 16 + 20);
    flip_bit(&dir.join("meta"), 16 + slot_len + 20);
    let err = ImageStore::open(&dir, Default::default()).unwrap_err();
    assert!(
        err.to_string().contains("metadata checksum mismatch"),
        "{err}"
    );
    let err = ImageStore::create(&dir, "vm-test", 4096, Default::default()).unwrap_err();
    assert!(matches!(err, StoreError::Exists { .. }));
    drop(keep);
}

#[test]
fn generation_only_moves_forward() {
    let mut f = fixture();
    let generation0 = f.store.generation();
    f.store.set_generation(generation0 + 1).unwrap();
    assert!(matches!(
        f.store.set_generation(generation0 + 1),
        Err(StoreError::GenerationNotNewer { .. })
    ));
    // The old primary's epochs are now refused as stale.
    let chunks = f.next_epoch();
    assert!(matches!(
        decode(&f.store, &chunks),
        Err(EpochError::StaleGeneration { .. })
    ));
    let Fixture {
        _dir: keep, store, ..
    } = f;
    let dir = store.dir().to_owned();
    drop(store);
    let (store, _) = ImageStore::open(&dir, Default::default()).unwrap();
    assert_eq!(
        store.generation(),
        generation0 + 1,
        "the bump is persistent"
    );
    drop(keep);
}

#[test]
fn an_image_gone_live_reopens_for_a_resync_instead_of_failing_its_digest() {
    let Fixture {
        _dir: keep,
        mut store,
        ..
    } = fixture();
    let generation0 = store.generation();
    assert!(matches!(
        store.go_live(generation0),
        Err(StoreError::GenerationNotNewer { .. })
    ));
    store.go_live(generation0 + 1).unwrap();
    let dir = store.dir().to_owned();
    drop(store);
    // The promoted VM ran on memory.img and changed it.
    flip_bit(&dir.join("memory.img"), 12345);
    // This host as a backup again: the image opens, waiting for a full sync.
    let (store, _) = ImageStore::open(&dir, Default::default()).unwrap();
    assert_eq!(store.status(), ImageStatus::Syncing);
    assert_eq!(store.generation(), generation0 + 1);
    assert_eq!(store.committed_epoch(), None);
    drop(keep);
}

#[test]
fn a_commit_that_fails_after_writing_pages_leaves_the_image_unpromotable_until_recovered() {
    let mut f = fixture();
    let committed = f.store.promotable().unwrap();
    assert_eq!(committed.incarnation, 7);
    // A device state too big for the record file's slots (as much held
    // console output makes it): the record is rewritten whole, and cannot
    // be (its temporary name is taken by a directory: a real EISDIR, as a
    // full or failing disk would give).
    let touched: Vec<u32> = (0..40).map(|_| f.model.mutate(&mut f.rng)).collect();
    let chunks = encode(
        &mut f.sender,
        &f.model,
        committed.epoch + 1,
        EpochKind::Checkpoint,
        &touched,
        &[0x5a; 40 << 10],
    )
    .chunks;
    let staged = decode(&f.store, &chunks).unwrap();
    let dir = f.store.dir().to_owned();
    std::fs::create_dir(dir.join("meta.tmp")).unwrap();
    let err = f.store.apply(&staged).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    // memory.img holds the new epoch's pages, the record the old epoch.
    let err = f.store.promotable().unwrap_err();
    assert!(matches!(err, StoreError::Torn { .. }), "{err}");
    assert!(err.to_string().contains("must not be promoted"), "{err}");
    // Reopened once the disk is fine: the complete journal is replayed and
    // the image is the new epoch, whole and promotable.
    std::fs::remove_dir(dir.join("meta.tmp")).unwrap();
    let Fixture {
        _dir: keep, store, ..
    } = f;
    drop(store);
    let (store, recovery) = ImageStore::open(&dir, Default::default()).unwrap();
    assert_eq!(
        recovery,
        Recovery::Replayed {
            epoch: committed.epoch + 1
        }
    );
    assert_eq!(store.promotable().unwrap().epoch, committed.epoch + 1);
    drop(keep);
}

#[test]
fn a_journal_holds_only_the_changed_pages_and_redoes_the_whole_epoch_after_a_crash() {
    let mut f = fixture();
    let dir = f.store.dir().to_owned();
    let committed = f.store.committed_epoch().unwrap();
    // The image as it was committed, as a crash right after the next
    // epoch's journal would leave it (the journal added below).
    let crashed = f._dir.path().join("crashed");
    std::fs::create_dir(&crashed).unwrap();
    for file in ["memory.img", "meta"] {
        std::fs::copy(dir.join(file), crashed.join(file)).unwrap();
    }
    // The next checkpoint: 3 pages changed, and 30 sent whose content the
    // image holds already (dirtied to the same bytes). A sender leaves out what it knows the receiver holds; one that does not
    // know (as a release before that did not) sends them: here, a sender
    // that believes pages 10..40 hold other bytes.
    let mut believed = f.model.clone();
    for p in 10..40 {
        believed.page_mut(p)[7] ^= 0x77;
    }
    let mut unaware = SenderState::new("vm-test", 64, 1, CodecPolicy::ADAPTIVE).unwrap();
    let all: Vec<u32> = (0..64).collect();
    encode(
        &mut unaware,
        &believed,
        committed,
        EpochKind::SyncRound,
        &all,
        b"",
    );
    let changed = [3, 4, 40];
    for &p in &changed {
        f.model.page_mut(p)[100] ^= 0x5a;
    }
    let zero = (0..64).find(|&p| f.model.page(p).iter().all(|&b| b == 0));
    let mut touched: Vec<u32> = (10..40).chain(changed).collect();
    touched.extend(zero);
    let chunks = encode(
        &mut unaware,
        &f.model,
        committed + 1,
        EpochKind::Checkpoint,
        &touched,
        b"devstate",
    )
    .chunks;
    let staged = decode(&f.store, &chunks).unwrap();
    assert!(
        staged.pages.len() > 30,
        "{} pages staged",
        staged.pages.len()
    );
    let report = f.store.apply(&staged).unwrap();
    // Head (48 bytes), 3 × (number, hash, page), device state, trailer.
    assert_eq!(report.journal_bytes, 48 + 3 * (4 + 16 + 4096) + 8 + 8);
    assert_eq!(f.store.memory(), &f.model.mem[..]);
    // The crash: the journal is on disk, the image and record are not.
    std::fs::copy(dir.join("journal"), crashed.join("journal")).unwrap();
    let (recovered, recovery) = ImageStore::open(&crashed, Default::default()).unwrap();
    assert_eq!(
        recovery,
        Recovery::Replayed {
            epoch: committed + 1
        }
    );
    assert_eq!(recovered.memory(), &f.model.mem[..]);
    assert_eq!(recovered.digest(), f.store.digest());
    assert_eq!(recovered.promotable().unwrap().epoch, committed + 1);
    assert_eq!(recovered.device_state(), b"devstate");
}

#[test]
fn a_journal_emptied_by_a_new_sync_keeps_its_room_and_is_never_replayed() {
    let mut f = fixture();
    let dir = f.store.dir().to_owned();
    let journal = dir.join("journal");
    let room = std::fs::metadata(&journal).unwrap().len();
    assert_eq!(
        room,
        u64::from(f.model.pages()) * 4096,
        "a fresh image's journal room"
    );
    // A checkpoint journals its pages: a complete journal of the committed
    // epoch stays in the file.
    let committed = f.store.committed_epoch().unwrap();
    for p in [3, 4, 40] {
        f.model.page_mut(p)[7] ^= 0x33;
    }
    let chunks = encode(
        &mut f.sender,
        &f.model,
        committed + 1,
        EpochKind::Checkpoint,
        &[3, 4, 40],
        b"devstate",
    )
    .chunks;
    let staged = decode(&f.store, &chunks).unwrap();
    f.store.apply(&staged).unwrap();
    assert_eq!(&std::fs::read(&journal).unwrap()[..4], b"USJN");
    // A new sync empties it (a syncing image takes any journal as its own
    // work, so one left readable would be replayed over the sync): its
    // magic is gone, the file and its pages are kept.
    f.store.begin_sync(2, 0xbe4c).unwrap();
    let bytes = std::fs::read(&journal).unwrap();
    assert_eq!(bytes.len() as u64, room);
    assert_eq!(&bytes[..4], [0; 4]);
    drop(f.store);
    let (store, recovery) = ImageStore::open(&dir, Default::default()).unwrap();
    assert_eq!(recovery, Recovery::Clean);
    assert_eq!(store.status(), ImageStatus::Syncing);
    assert!(store.promotable().is_err());
}

#[test]
fn a_retired_image_is_not_promotable_until_the_next_sync_commits() {
    let Fixture {
        _dir: keep,
        mut store,
        ..
    } = fixture();
    let epoch = store.committed_epoch().unwrap();
    store.retire().unwrap();
    let dir = store.dir().to_owned();
    drop(store);
    let (mut store, _) = ImageStore::open(&dir, Default::default()).unwrap();
    assert!(store.retired(), "retirement is persistent");
    let err = store.promotable().unwrap_err();
    assert!(
        matches!(err, StoreError::Retired { epoch: e } if e == epoch),
        "{err}"
    );
    store.begin_sync(store.generation(), 9).unwrap();
    assert!(!store.retired());
    assert_eq!(store.incarnation(), 9);
    assert!(matches!(
        store.promotable(),
        Err(StoreError::NotCommitted(_))
    ));
    drop(keep);
}
