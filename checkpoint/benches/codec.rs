//! Encode and apply throughput of epochs, side by side with a plain memcpy of
//! the same scattered pages in the same run, and bytes out ÷ bytes in, on three
//! page sets: zero pages, pages with a few words changed since they were last
//! shipped, and real memory (binaries from /usr as a stand-in for guest RAM).
//!
//! Run: `cargo bench -p understudy-checkpoint --bench codec`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::time::{Duration, Instant};

use understudy_bench::{PageAligned, Report, Table, XorShift, num, real_memory};
use understudy_checkpoint::epoch::{
    EpochDecoder, EpochKind, Received, SenderState, StagingBuffers,
};
use understudy_checkpoint::store::ImageStore;
use understudy_checkpoint::{CodecPolicy, Compression, PAGE_SIZE, Page};

const RAM_PAGES: u32 = 32 * 1024; // 128 MiB
const DIRTY: usize = 10_000;
const REPEATS: usize = 7;

fn page(mem: &[u8], p: u32) -> &Page {
    mem[p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE]
        .try_into()
        .unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

struct Row {
    set: &'static str,
    policy: &'static str,
    memcpy: Duration,
    encode: Duration,
    apply: Duration,
    ratio: f64,
}

fn run(
    set: &'static str,
    policy_name: &'static str,
    policy: CodecPolicy,
    before: &[u8],
    after: &[u8],
    dirty: &[u32],
) -> Row {
    let (mut memcpys, mut encodes, mut applies) = (Vec::new(), Vec::new(), Vec::new());
    let mut ratio = 0.0;
    // Page-aligned, as the real memory is: glibc's memcpy is then at its
    // best (`understudy_bench::PageAligned`).
    let mut staging = PageAligned::zeroed(dirty.len() * PAGE_SIZE);
    // A synced receiver holding `before`, and a sender that shipped it. The
    // backup keeps one store and recycles its staging buffers, so measure the
    // steady state: epochs before→after (measured) alternate with after→before.
    let dir = tempfile::tempdir().unwrap();
    let mut store = ImageStore::create(
        &dir.path().join("img"),
        "bench",
        before.len() as u64,
        Default::default(),
    )
    .unwrap();
    store.begin_sync(1, 7).unwrap();
    let mut sender = SenderState::new("bench", RAM_PAGES, 1, policy).unwrap();
    let mut buffers = Some(StagingBuffers::default());
    let mut ship = |sender: &mut SenderState,
                    store: &mut ImageStore,
                    epoch,
                    kind,
                    mem: &[u8],
                    pages: &mut dyn Iterator<Item = u32>| {
        let t = Instant::now();
        let mut enc = sender.begin(epoch, kind).unwrap();
        for p in pages {
            enc.add_page(p, page(mem, p)).unwrap();
        }
        let encoded = enc.finish(&[0u8; 12_000]).unwrap();
        let encode = t.elapsed();
        // As the receiver gets them: in buffers of their own (no copy).
        let chunks: Vec<bytes::Bytes> = encoded.chunks.into_iter().map(Into::into).collect();
        let t = Instant::now();
        let mut dec = EpochDecoder::with_buffers(buffers.take().unwrap_or_default());
        let mut staged = None;
        for c in &chunks {
            if let Received::Complete(s) = dec.push(c, store).unwrap() {
                staged = Some(s);
            }
        }
        let staged = staged.unwrap();
        store.apply(&staged).unwrap();
        let apply = t.elapsed();
        buffers = Some(staged.recycle());
        (encode, apply, encoded.report.ratio())
    };
    ship(
        &mut sender,
        &mut store,
        0,
        EpochKind::SyncRound,
        before,
        &mut (0..RAM_PAGES),
    );
    ship(
        &mut sender,
        &mut store,
        1,
        EpochKind::Checkpoint,
        before,
        &mut std::iter::empty(),
    );
    for r in 0..REPEATS as u64 {
        // Same-run baseline: gather the same scattered pages into a buffer.
        let t = Instant::now();
        for (i, &p) in dirty.iter().enumerate() {
            staging[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(page(after, p));
        }
        memcpys.push(t.elapsed());
        std::hint::black_box(&staging);

        let (encode, apply, rt) = ship(
            &mut sender,
            &mut store,
            2 + 2 * r,
            EpochKind::Checkpoint,
            after,
            &mut dirty.iter().copied(),
        );
        assert!(
            store.memory() == after,
            "bench epoch did not reproduce the sender"
        );
        encodes.push(encode);
        applies.push(apply);
        ratio = rt;
        ship(
            &mut sender,
            &mut store,
            3 + 2 * r,
            EpochKind::Checkpoint,
            before,
            &mut dirty.iter().copied(),
        );
    }
    Row {
        set,
        policy: policy_name,
        memcpy: median(memcpys),
        encode: median(encodes),
        apply: median(applies),
        ratio,
    }
}

/// How long `f` takes over every page of `pages`, `rounds` times.
fn time_pages(pages: &[u8], rounds: usize, mut f: impl FnMut(&[u8])) -> Duration {
    let started = Instant::now();
    for _ in 0..rounds {
        pages.chunks_exact(PAGE_SIZE).for_each(&mut f);
    }
    started.elapsed()
}

/// The page hash against a memcpy of the same pages: (hash, memcpy) ns a
/// page, medians of REPEATS, for 16 pages hashed over and over (in cache,
/// as the backup hashes a page it just received) and for every page of
/// `mem` once (from memory, as the sender hashes guest RAM).
fn hash_costs(mem: &[u8]) -> [(f64, f64); 2] {
    let mut out = PageAligned::zeroed(PAGE_SIZE);
    let hot = &mem[..16 * PAGE_SIZE];
    [(hot, 4096), (mem, 1)].map(|(pages, rounds)| {
        let (mut hash, mut copy) = (Vec::new(), Vec::new());
        for _ in 0..REPEATS {
            hash.push(time_pages(pages, rounds, |p| {
                std::hint::black_box(understudy_checkpoint::page::page_hash(p));
            }));
            copy.push(time_pages(pages, rounds, |p| {
                out.copy_from_slice(p);
                std::hint::black_box(&mut out);
            }));
        }
        let per_page =
            |d: Duration| d.as_nanos() as f64 / (rounds * pages.len() / PAGE_SIZE) as f64;
        (per_page(median(hash)), per_page(median(copy)))
    })
}

fn main() {
    let bytes = RAM_PAGES as usize * PAGE_SIZE;
    let real = real_memory(bytes);
    let mut rng = XorShift(0x1234_5678);
    let mut dirty: Vec<u32> = (0..DIRTY)
        .map(|_| (rng.next_u64() % RAM_PAGES as u64) as u32)
        .collect();
    dirty.sort_unstable();
    dirty.dedup();

    // zeros: dirty pages become zero. few words: 1-4 words change per page.
    let mut zeros = real.clone();
    let mut few = real.clone();
    for &p in &dirty {
        let at = p as usize * PAGE_SIZE;
        zeros[at..at + PAGE_SIZE].fill(0);
        for _ in 0..=(rng.next_u64() % 4) {
            let w = at + (rng.next_u64() % 512) as usize * 8;
            few[w..w + 8].copy_from_slice(&rng.next_u64().to_le_bytes());
        }
    }
    // real: the dirty pages take content from elsewhere in real memory that the
    // receiver does not hold (shifted by a non-page-aligned offset).
    let mut fresh = real.clone();
    for &p in &dirty {
        let at = p as usize * PAGE_SIZE;
        let src = (at + 1_234_567) % (bytes - PAGE_SIZE);
        let moved: Vec<u8> = real[src..src + PAGE_SIZE].to_vec();
        fresh[at..at + PAGE_SIZE].copy_from_slice(&moved);
    }

    let policies = [
        ("raw", CodecPolicy::RAW),
        (
            "lz4",
            CodecPolicy {
                compression: Compression::Lz4,
                ..CodecPolicy::RAW
            },
        ),
        (
            "zstd-1",
            CodecPolicy {
                compression: Compression::Zstd(1),
                ..CodecPolicy::RAW
            },
        ),
        ("adaptive", CodecPolicy::ADAPTIVE),
    ];
    let mut report = Report::new(
        "codec",
        "Codecs: encode and apply vs memcpy, bytes on the wire",
        "cargo bench -p understudy-checkpoint --bench codec",
    );
    let mut table = Table::new(
        format!(
            "One epoch of {} dirty pages in {} MiB of real memory; medians of {REPEATS}; \
             memcpy = the same pages gathered in the same run",
            dirty.len(),
            bytes >> 20
        ),
        &[
            "pages",
            "policy",
            "memcpy ms",
            "encode ms",
            "apply ms",
            "encode ÷ memcpy",
            "apply ÷ memcpy",
            "encode MB/s",
            "wire ÷ dirtied",
        ],
    );
    for (set, after) in [("zeros", &zeros), ("few-words", &few), ("real", &fresh)] {
        for (name, policy) in policies {
            let row = run(set, name, policy, &real, after, &dirty);
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let mb = dirty.len() as f64 * PAGE_SIZE as f64 / 1e6;
            table.row(vec![
                row.set.into(),
                row.policy.into(),
                num(ms(row.memcpy), 2),
                num(ms(row.encode), 2),
                num(ms(row.apply), 2),
                num(row.encode.as_secs_f64() / row.memcpy.as_secs_f64(), 1),
                num(row.apply.as_secs_f64() / row.memcpy.as_secs_f64(), 1),
                num(mb / row.encode.as_secs_f64(), 0),
                num(row.ratio, 4),
            ]);
        }
    }
    report.table(table);
    let mut table = Table::new(
        format!(
            "The page hash (XXH3-128; every page is hashed on both sides) against a memcpy of the \
             same page, ns a page, medians of {REPEATS}: 16 pages over and over (in cache), and \
             every page of the {} MiB once (from memory)",
            bytes >> 20
        ),
        &["pages", "hash ns", "memcpy ns", "hash ÷ memcpy"],
    );
    for ((hash, copy), name) in hash_costs(&real)
        .into_iter()
        .zip(["in cache", "from memory"])
    {
        table.row(vec![
            name.into(),
            num(hash, 0),
            num(copy, 0),
            num(hash / copy, 1),
        ]);
    }
    report.table(table);
    report.finish().unwrap();
}
