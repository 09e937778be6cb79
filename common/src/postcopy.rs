//! Post-copy migration's page records: after the switch the source sends
//! guest pages to the destination, pushed in order and on demand, as
//! records of
//!
//! ```text
//! page u32 LE | kind u8 | data
//!   kind 0: all zero (no data)     kind 1: raw, 4096 bytes
//!   kind 2: lz4, u16 LE length + that many bytes (used when it saves)
//! ```
//!
//! packed into `EpochChunk.postcopy_pages`, followed by a CRC-32C of them
//! (u32 LE). Decoding checks the CRC and every bound and names what is
//! wrong; nothing is installed from a bad message.

use understudy_vmm::PAGE_SIZE;

const ZERO: u8 = 0;
const RAW: u8 = 1;
const LZ4: u8 = 2;

/// A bad page record.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The CRC does not match (or there is none).
    #[error("post-copy page records fail their CRC")]
    Crc,
    /// The message ends inside a record.
    #[error("post-copy page records cut short at byte {0}")]
    Truncated(usize),
    /// An unknown kind byte.
    #[error("unknown post-copy page kind {kind} at byte {at}")]
    Kind {
        /// The byte.
        kind: u8,
        /// Where.
        at: usize,
    },
    /// An lz4 page that does not decompress to exactly one page.
    #[error("post-copy page {0}: bad lz4 data")]
    Lz4(u32),
}

/// Page records being packed.
#[derive(Debug, Default)]
pub struct PageRecords {
    buf: Vec<u8>,
    pages: usize,
    zero: usize,
}

impl PageRecords {
    /// No records yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `page` with its content (zero pages as 5 bytes; lz4 when it
    /// saves a quarter).
    pub fn push(&mut self, page: u32, content: &[u8; PAGE_SIZE]) {
        self.buf.extend_from_slice(&page.to_le_bytes());
        self.pages += 1;
        if content.iter().all(|&b| b == 0) {
            self.buf.push(ZERO);
            self.zero += 1;
            return;
        }
        let packed = lz4_flex::block::compress(content);
        if packed.len() < PAGE_SIZE * 3 / 4 {
            self.buf.push(LZ4);
            self.buf
                .extend_from_slice(&(packed.len() as u16).to_le_bytes());
            self.buf.extend_from_slice(&packed);
        } else {
            self.buf.push(RAW);
            self.buf.extend_from_slice(content);
        }
    }

    /// Pages added.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Zero pages among them.
    pub fn zero_pages(&self) -> usize {
        self.zero
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Nothing added.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// The packed records and their CRC.
    pub fn into_bytes(mut self) -> Vec<u8> {
        let crc = crc32c::crc32c(&self.buf);
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

/// Calls `install(page, content)` for each record (`None`: a zero page),
/// after checking the whole message.
pub fn decode<E>(
    bytes: &[u8],
    mut install: impl FnMut(u32, Option<&[u8; PAGE_SIZE]>) -> Result<(), E>,
) -> Result<Result<(), E>, RecordError> {
    let split = bytes.len().checked_sub(4).ok_or(RecordError::Crc)?;
    let (bytes, crc) = bytes.split_at(split);
    if crc32c::crc32c(bytes).to_le_bytes() != crc {
        return Err(RecordError::Crc);
    }
    // Check and unpack first: a bad message installs nothing.
    let mut records: Vec<(u32, Option<Box<[u8; PAGE_SIZE]>>)> = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let head = bytes.get(at..at + 5).ok_or(RecordError::Truncated(at))?;
        let page = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let kind = head[4];
        at += 5;
        match kind {
            ZERO => records.push((page, None)),
            RAW => {
                let data = bytes
                    .get(at..at + PAGE_SIZE)
                    .ok_or(RecordError::Truncated(at))?;
                let mut content = Box::new([0u8; PAGE_SIZE]);
                content.copy_from_slice(data);
                records.push((page, Some(content)));
                at += PAGE_SIZE;
            }
            LZ4 => {
                let len = bytes.get(at..at + 2).ok_or(RecordError::Truncated(at))?;
                let len = u16::from_le_bytes([len[0], len[1]]) as usize;
                at += 2;
                let data = bytes.get(at..at + len).ok_or(RecordError::Truncated(at))?;
                let mut content = Box::new([0u8; PAGE_SIZE]);
                match lz4_flex::block::decompress_into(data, &mut content[..]) {
                    Ok(n) if n == PAGE_SIZE => {}
                    _ => return Err(RecordError::Lz4(page)),
                }
                records.push((page, Some(content)));
                at += len;
            }
            kind => return Err(RecordError::Kind { kind, at: at - 1 }),
        }
    }
    for (page, content) in records {
        if let Err(e) = install(page, content.as_deref()) {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_in_every_kind() {
        let zero = [0u8; PAGE_SIZE];
        let mut text = [0u8; PAGE_SIZE];
        for (i, b) in text.iter_mut().enumerate() {
            *b = b"hello page "[i % 11];
        }
        let mut noise = [0u8; PAGE_SIZE];
        let mut x = 0x1234_5678u32;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let mut r = PageRecords::new();
        r.push(7, &zero);
        r.push(8, &text);
        r.push(9, &noise);
        assert_eq!(r.pages(), 3);
        let bytes = r.into_bytes();
        assert!(
            bytes.len() < 5 + 5 + 1000 + 5 + PAGE_SIZE,
            "{}",
            bytes.len()
        );
        let mut got = Vec::new();
        decode(&bytes, |page, content| {
            got.push((page, content.map(|c| c.to_vec())));
            Ok::<(), ()>(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(got[0], (7, None));
        assert_eq!(got[1], (8, Some(text.to_vec())));
        assert_eq!(got[2], (9, Some(noise.to_vec())));
    }

    #[test]
    fn bad_records_install_nothing_and_say_why() {
        let mut r = PageRecords::new();
        r.push(1, &[0u8; PAGE_SIZE]);
        r.push(2, &[7u8; PAGE_SIZE]);
        let good = r.into_bytes();
        let mut installed = 0;
        let mut count = |_: u32, _: Option<&[u8; PAGE_SIZE]>| {
            installed += 1;
            Ok::<(), ()>(())
        };
        // Cut anywhere.
        for cut in 0..good.len() {
            assert!(decode(&good[..cut], &mut count).is_err(), "cut at {cut}");
        }
        // Any flipped bit fails the CRC.
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            assert_eq!(decode(&bad, &mut count).unwrap_err(), RecordError::Crc);
        }
        assert_eq!(decode(&[], &mut count).unwrap_err(), RecordError::Crc);
        // A well-framed message with an unknown kind.
        let mut body = good[..good.len() - 4].to_vec();
        body[4] = 9;
        let crc = crc32c::crc32c(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode(&body, &mut count).unwrap_err(),
            RecordError::Kind { kind: 9, at: 4 }
        );
        assert_eq!(installed, 0);
    }
}
