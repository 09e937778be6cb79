//! Runs the fuzz target's entry point (see `fuzz/`) over many inputs derived
//! from a valid epoch: random byte flips, insertions, truncations and splices.
//! It must never panic; the unmodified epoch must decode.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Rng;
use understudy_checkpoint::chunk;
use understudy_checkpoint::epoch::fuzzing::decode_arbitrary;

/// A valid epoch for the fuzz image, as the fuzz input format (mode byte 1:
/// each piece is kind + body, framed by the harness).
fn seed_input() -> Vec<u8> {
    let mut begin = vec![0u8]; // checkpoint
    begin.extend_from_slice(&3u64.to_le_bytes());
    begin.extend_from_slice(&16u32.to_le_bytes());
    begin.extend_from_slice(&4u16.to_le_bytes());
    begin.extend_from_slice(b"fuzz");
    // Pages: run at 2, two entries: Zero, SameAs(5).
    let mut pages = 2u32.to_le_bytes().to_vec();
    pages.extend_from_slice(&2u16.to_le_bytes());
    pages.push(0);
    pages.push(4);
    pages.extend_from_slice(&5u32.to_le_bytes());
    let device = b"dev".to_vec();
    // End: chunks, pages, device len, device crc, digest.
    let image = understudy_checkpoint::epoch::fuzzing::MemImage::default();
    let mut digest = understudy_checkpoint::CommittedImage::digest(&image);
    use understudy_checkpoint::CommittedImage;
    let zero = understudy_checkpoint::page::zero_page_hash();
    digest.replace(2, image.page_hash(2), zero);
    digest.replace(3, image.page_hash(3), image.page_hash(5));
    let mut end = 4u32.to_le_bytes().to_vec(); // Begin, Pages, Device, End
    end.extend_from_slice(&2u32.to_le_bytes());
    end.extend_from_slice(&3u32.to_le_bytes());
    end.extend_from_slice(&crc32c::crc32c(&device).to_le_bytes());
    end.extend_from_slice(&digest.0.to_le_bytes());
    let mut input = vec![1u8];
    for (kind, body) in [(0u8, begin), (1, pages), (2, device), (3, end)] {
        input.extend_from_slice(&(body.len() as u16 + 1).to_le_bytes());
        input.push(kind);
        input.extend_from_slice(&body);
    }
    input
}

#[test]
fn the_seed_decodes_and_ten_thousand_mutants_do_not_panic() {
    let seed = seed_input();
    let staged = decode_arbitrary(&seed).expect("the seed input is a valid epoch");
    assert_eq!(staged.pages, vec![2, 3]);
    let mut rng = Rng(1);
    let mut accepted = 0;
    for _ in 0..10_000 {
        let mut input = seed.clone();
        for _ in 0..=rng.below(4) {
            let at = rng.below(input.len() as u64) as usize;
            match rng.below(4) {
                0 => input[at] ^= 1 << rng.below(8),
                1 => input.insert(at, rng.next() as u8),
                2 => input.truncate(at.max(1)),
                _ => {
                    let v = rng.next() as u8;
                    input[at] = v;
                }
            }
        }
        if decode_arbitrary(&input).is_some() {
            accepted += 1;
        }
    }
    // Raw mode (even first byte) with real framed chunks, and garbage.
    assert!(decode_arbitrary(&[0, 3, 0, 1, 2, 3]).is_none());
    let framed = chunk::frame(chunk::ChunkKind::End, 8, 0, b"");
    let mut raw = vec![0u8];
    raw.extend_from_slice(&(framed.len() as u16).to_le_bytes());
    raw.extend_from_slice(&framed);
    assert!(decode_arbitrary(&raw).is_none());
    assert!(accepted < 10_000, "mutants are mostly refused");
}
