//! Chunk framing: every piece of an epoch on the wire or on disk is one chunk,
//! self-describing and self-checking, at most [`MAX_CHUNK_BODY`] bytes of body.
//!
//! ```text
//! 0        4        6      7       8          16      20         24         28          32
//! | "USEC" | ver u16| kind | flags | epoch u64 | seq u32| body_len | body_crc | header_crc | body …
//! ```
//! All integers little-endian; CRCs are CRC-32C. An epoch is the sequence
//! `Begin, Pages*, Device*, End` with `seq` counting from 0 (see `epoch.rs`).
//!
//! A Pages chunk may carry [`FLAG_PAGES_BY_HASH`]: its body CRC is 0 and not
//! checked, because its pages are checked another way: the decoder hashes
//! every page it stages, and a checkpoint's End digest must match the image
//! those hashes make (a sync round's pages by the first checkpoint after
//! it). The CRC was a third pass over every byte on each side (after the
//! copy and the page hash). A primary sets the flag only for a backup that
//! says in its `HelloReply` that it takes it (`pages_by_hash`); a release
//! before the flag refuses such a chunk as corrupt.

use crate::codec::Reader;

/// Magic at the start of every chunk.
pub const CHUNK_MAGIC: [u8; 4] = *b"USEC";
/// Chunk format version this build reads and writes.
pub const CHUNK_FORMAT_VERSION: u16 = 1;
/// Bytes in a chunk header.
pub const CHUNK_HEADER_LEN: usize = 32;
/// Largest chunk body: a stream can carry any epoch in chunks well under 1 MiB.
pub const MAX_CHUNK_BODY: usize = 256 * 1024;
/// Header flag: a Pages chunk whose body is checked by its page hashes
/// against the epoch's digest, not by a CRC (see the module's doc).
pub const FLAG_PAGES_BY_HASH: u8 = 0x01;

/// What a chunk carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ChunkKind {
    /// The epoch's header: its kind, generation and what the receiver must
    /// hold to apply it.
    Begin = 1,
    /// Encoded pages.
    Pages = 2,
    /// The device state (the checkpoint payload).
    Device = 3,
    /// The epoch's trailer: page count and digest; the epoch is complete.
    End = 4,
}

impl ChunkKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Begin,
            2 => Self::Pages,
            3 => Self::Device,
            4 => Self::End,
            _ => return None,
        })
    }
}

/// A parsed chunk header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// What the chunk carries.
    pub kind: ChunkKind,
    /// The epoch it belongs to.
    pub epoch: u64,
    /// Its place in the epoch (0, 1, …): chunks arrive in order.
    pub seq: u32,
}

/// Why bytes are not a valid chunk.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// Shorter than a header.
    #[error("chunk of {len} bytes is shorter than its {CHUNK_HEADER_LEN}-byte header")]
    Truncated {
        /// The chunk's length.
        len: usize,
    },
    /// Not a chunk at all.
    #[error("not an understudy epoch chunk (magic {found:02x?})")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A format version this build does not speak.
    #[error(
        "epoch chunk format version {found} is not supported (this build speaks {CHUNK_FORMAT_VERSION}): \
         run the same understudy release on both hosts"
    )]
    UnsupportedVersion {
        /// The version the chunk says.
        found: u16,
    },
    /// The header's CRC does not match.
    #[error("chunk header checksum mismatch: the chunk is corrupt")]
    HeaderChecksum,
    /// A kind this build does not know.
    #[error("chunk kind {0} is unknown")]
    UnknownKind(u8),
    /// The body is not as long as the header says.
    #[error("chunk body claims {claimed} bytes but {actual} arrived")]
    LengthMismatch {
        /// What the header says.
        claimed: usize,
        /// What arrived.
        actual: usize,
    },
    /// The body is over [`MAX_CHUNK_BODY`].
    #[error("chunk body of {0} bytes exceeds the {MAX_CHUNK_BODY}-byte limit")]
    TooLarge(usize),
    /// The body's CRC does not match.
    #[error("chunk body checksum mismatch: the chunk is corrupt")]
    BodyChecksum,
    /// Header flags this build does not know, or on a kind they do not fit.
    #[error(
        "chunk flags {flags:#04x} are not valid on a {kind:?} chunk (this build knows \
         {FLAG_PAGES_BY_HASH:#04x}, on Pages chunks only)"
    )]
    BadFlags {
        /// The flags byte.
        flags: u8,
        /// The chunk's kind.
        kind: ChunkKind,
    },
}

/// Frames `body` as a chunk.
pub fn frame(kind: ChunkKind, epoch: u64, seq: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + body.len());
    out.resize(CHUNK_HEADER_LEN, 0);
    out.extend_from_slice(body);
    seal(kind, epoch, seq, &mut out);
    out
}

/// Frames in place: `buf` holds [`CHUNK_HEADER_LEN`] bytes of room followed by
/// the body, and gets its header written (no copy of the body).
pub fn seal(kind: ChunkKind, epoch: u64, seq: u32, buf: &mut [u8]) {
    seal_with(kind, 0, epoch, seq, buf);
}

/// [`seal`] for a Pages chunk whose pages the receiver checks by their
/// hashes ([`FLAG_PAGES_BY_HASH`]): no CRC over the body.
pub fn seal_pages_by_hash(epoch: u64, seq: u32, buf: &mut [u8]) {
    seal_with(ChunkKind::Pages, FLAG_PAGES_BY_HASH, epoch, seq, buf);
}

fn seal_with(kind: ChunkKind, flags: u8, epoch: u64, seq: u32, buf: &mut [u8]) {
    debug_assert!(buf.len() >= CHUNK_HEADER_LEN);
    let (header, body) = buf.split_at_mut(CHUNK_HEADER_LEN);
    debug_assert!(body.len() <= MAX_CHUNK_BODY);
    header[0..4].copy_from_slice(&CHUNK_MAGIC);
    header[4..6].copy_from_slice(&CHUNK_FORMAT_VERSION.to_le_bytes());
    header[6] = kind as u8;
    header[7] = flags;
    header[8..16].copy_from_slice(&epoch.to_le_bytes());
    header[16..20].copy_from_slice(&seq.to_le_bytes());
    header[20..24].copy_from_slice(&(body.len() as u32).to_le_bytes());
    let body_crc = if flags & FLAG_PAGES_BY_HASH != 0 {
        0
    } else {
        crc32c::crc32c(body)
    };
    header[24..28].copy_from_slice(&body_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&header[..28]);
    header[28..32].copy_from_slice(&header_crc.to_le_bytes());
}

/// Parses and verifies one chunk; returns its header and body.
pub fn parse(bytes: &[u8]) -> Result<(ChunkHeader, &[u8]), ChunkError> {
    if bytes.len() < CHUNK_HEADER_LEN {
        return Err(ChunkError::Truncated { len: bytes.len() });
    }
    let (header, body) = bytes.split_at(CHUNK_HEADER_LEN);
    let mut r = Reader::new(header);
    let truncated = ChunkError::Truncated { len: bytes.len() };
    let magic = r.take(4).ok_or(truncated.clone())?;
    if magic != CHUNK_MAGIC {
        let mut found = [0u8; 4];
        found.copy_from_slice(magic);
        return Err(ChunkError::BadMagic { found });
    }
    let version = r.u16().ok_or(truncated.clone())?;
    if version != CHUNK_FORMAT_VERSION {
        return Err(ChunkError::UnsupportedVersion { found: version });
    }
    let stored_header_crc = u32::from_le_bytes([header[28], header[29], header[30], header[31]]);
    if crc32c::crc32c(&header[..28]) != stored_header_crc {
        return Err(ChunkError::HeaderChecksum);
    }
    let kind_byte = r.u8().ok_or(truncated.clone())?;
    let kind = ChunkKind::from_u8(kind_byte).ok_or(ChunkError::UnknownKind(kind_byte))?;
    let flags = r.u8().ok_or(truncated.clone())?;
    if flags & !FLAG_PAGES_BY_HASH != 0 || (flags != 0 && kind != ChunkKind::Pages) {
        return Err(ChunkError::BadFlags { flags, kind });
    }
    let epoch = r.u64().ok_or(truncated.clone())?;
    let seq = r.u32().ok_or(truncated.clone())?;
    let body_len = r.u32().ok_or(truncated.clone())? as usize;
    let body_crc = r.u32().ok_or(truncated)?;
    if body_len > MAX_CHUNK_BODY {
        return Err(ChunkError::TooLarge(body_len));
    }
    if body_len != body.len() {
        return Err(ChunkError::LengthMismatch {
            claimed: body_len,
            actual: body.len(),
        });
    }
    let checked = if flags & FLAG_PAGES_BY_HASH != 0 {
        // Checked by the decoder's page hashes; the field must say so.
        body_crc == 0
    } else {
        crc32c::crc32c(body) == body_crc
    };
    if !checked {
        return Err(ChunkError::BodyChecksum);
    }
    Ok((ChunkHeader { kind, epoch, seq }, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_parse_round_trip() {
        let chunk = frame(ChunkKind::Pages, 42, 3, b"hello");
        let (h, body) = parse(&chunk).unwrap();
        assert_eq!(
            h,
            ChunkHeader {
                kind: ChunkKind::Pages,
                epoch: 42,
                seq: 3
            }
        );
        assert_eq!(body, b"hello");
    }

    #[test]
    fn any_corruption_or_truncation_is_refused() {
        let chunk = frame(ChunkKind::End, 7, 1, &[1, 2, 3, 4, 5, 6, 7, 8]);
        for i in 0..chunk.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = chunk.clone();
                bad[i] ^= bit;
                assert!(
                    parse(&bad).is_err(),
                    "flip of byte {i} bit {bit:#x} accepted"
                );
            }
        }
        for len in 0..chunk.len() {
            assert!(
                parse(&chunk[..len]).is_err(),
                "truncation to {len} accepted"
            );
        }
        let mut longer = chunk.clone();
        longer.push(0);
        assert!(matches!(
            parse(&longer),
            Err(ChunkError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn a_pages_chunk_checked_by_hash_has_no_body_crc_and_only_pages_may() {
        let mut chunk = vec![0u8; CHUNK_HEADER_LEN];
        chunk.extend_from_slice(b"pages");
        seal_pages_by_hash(9, 2, &mut chunk);
        assert_eq!(&chunk[24..28], &[0; 4]);
        let (h, body) = parse(&chunk).unwrap();
        assert_eq!(
            (h.kind, h.epoch, h.seq, body),
            (ChunkKind::Pages, 9, 2, &b"pages"[..])
        );
        // The header is still checked, and the body's CRC field must be 0.
        for i in 0..CHUNK_HEADER_LEN {
            let mut bad = chunk.clone();
            bad[i] ^= 0x01;
            assert!(parse(&bad).is_err(), "flip of header byte {i} accepted");
        }
        // The flag on another kind, or an unknown flag: refused by name.
        for (kind, flags) in [
            (ChunkKind::Begin, FLAG_PAGES_BY_HASH),
            (ChunkKind::Device, FLAG_PAGES_BY_HASH),
            (ChunkKind::End, FLAG_PAGES_BY_HASH),
            (ChunkKind::Pages, 0x02),
        ] {
            let mut c = vec![0u8; CHUNK_HEADER_LEN + 3];
            seal_with(kind, flags, 1, 0, &mut c);
            assert_eq!(parse(&c), Err(ChunkError::BadFlags { flags, kind }));
        }
    }

    #[test]
    fn version_and_magic_errors_are_specific() {
        let mut chunk = frame(ChunkKind::Begin, 1, 0, b"");
        chunk[4] = 2;
        assert_eq!(
            parse(&chunk),
            Err(ChunkError::UnsupportedVersion { found: 2 })
        );
        let mut chunk = frame(ChunkKind::Begin, 1, 0, b"");
        chunk[0] = b'X';
        assert!(matches!(parse(&chunk), Err(ChunkError::BadMagic { .. })));
    }
}
