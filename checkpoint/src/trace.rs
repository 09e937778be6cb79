//! The trace log of a deterministic run: every exit the guest made to the
//! VMM (its kind, port and value, in order: the exit index is implicit) and
//! every non-deterministic input the VMM gave it between two exits (timer
//! ticks, console input bytes), plus what a replay checks itself against
//! (each injected interrupt's vector, a digest of the registers every
//! [`SYNC_EVERY`] exits). Replaying the inputs at the same exits from a
//! snapshot reproduces the run; comparing the exits finds the first
//! divergence, exactly.
//!
//! The log is a sequence of self-checking segments, each tied to its stream
//! (one recording, from one snapshot) and to its place in it:
//!
//! ```text
//! +------+-----+-------+--------+-----+-----------+------------+-------+----------+----------+------------+
//! | USTR | ver | flags | stream | seq | base_exit | first_exit | exits | body_len | body_crc | header_crc | body …
//! | 4    | 2   | 2     | 8      | 4   | 8         | 8          | 4     | 4        | 4        | 4          |
//! +------+-----+-------+--------+-----+-----------+------------+-------+----------+----------+------------+
//! ```
//!
//! (little-endian; CRC-32C; flag 1: the stream ends with this segment). The
//! body is a run of records, one opcode byte each, the frequent exits in one
//! or two bytes (a console byte written, an end-of-interrupt, a status read),
//! lengths and addresses as varints. A reader consumes a log that is still
//! being written: whole segments as they come, refusing a torn, corrupt,
//! reordered, duplicated or foreign one with an error that says which.
//!
//! Pure data: nothing here knows KVM.

use std::collections::VecDeque;

use crate::codec::Reader;

/// Magic of every segment.
pub const TRACE_MAGIC: [u8; 4] = *b"USTR";
/// Segment format version this build reads and writes.
pub const TRACE_FORMAT_VERSION: u16 = 1;
/// Bytes in a segment header.
pub const SEGMENT_HEADER_LEN: usize = 52;
/// Largest segment body.
pub const MAX_SEGMENT_BODY: usize = 1 << 20;
/// A writer seals a segment once its body reaches this size.
pub const SEGMENT_TARGET: usize = 64 << 10;
/// A register digest every this many exits.
pub const SYNC_EVERY: u64 = 4096;
/// Flag: the stream ends with this segment.
pub const FLAG_END: u16 = 1;

/// What the guest did to leave guest mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `out`: `size` bytes (1, 2 or 4) of `value` to `port`.
    Out {
        /// The I/O port.
        port: u16,
        /// Bytes written: 1, 2 or 4.
        size: u8,
        /// The value written.
        value: u32,
    },
    /// `in`: the `value` the guest read (what the devices answered).
    In {
        /// The I/O port.
        port: u16,
        /// Bytes read: 1, 2 or 4.
        size: u8,
        /// The value the guest got.
        value: u32,
    },
    /// `hlt`.
    Halt,
    /// The interrupt window the VMM asked for opened.
    Window,
    /// A memory access outside RAM (read: the data the guest got).
    MmioRead {
        /// The guest-physical address.
        addr: u64,
        /// The bytes the guest got.
        data: Vec<u8>,
    },
    /// A memory write outside RAM.
    MmioWrite {
        /// The guest-physical address.
        addr: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
}

/// One record of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// The next exit.
    Exit(Exit),
    /// After the latest exit: the virtual timer ticked (an edge on IRQ 0).
    Tick,
    /// After the latest exit: these console input bytes reached the UART.
    Input(Vec<u8>),
    /// After the latest exit: this vector was injected (a check).
    Inject(u8),
    /// After the latest exit: the registers' digest (a check).
    Sync(u64),
}

/// A log that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    /// Fewer bytes than a segment needs.
    #[error("trace segment cut short ({got} bytes, {need} needed): the log is truncated")]
    Truncated {
        /// Bytes there.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Not a trace log.
    #[error("not an understudy trace log (magic {found:02x?})")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A segment after the first whose header does not start as one: the
    /// log was damaged there.
    #[error("trace segment {seq}: its header is damaged (magic {found:02x?}): the log is corrupt")]
    DamagedHeader {
        /// The segment due there.
        seq: u32,
        /// The four bytes where its magic belongs.
        found: [u8; 4],
    },
    /// A format version this build does not read.
    #[error(
        "trace format version {found} is not supported (this build reads {TRACE_FORMAT_VERSION}): \
         replay it with the understudy release that recorded it"
    )]
    UnsupportedVersion {
        /// The segment's version.
        found: u16,
    },
    /// The header's CRC does not match.
    #[error("trace segment {seq}: header checksum mismatch: the log is corrupt")]
    HeaderChecksum {
        /// The segment.
        seq: u32,
    },
    /// The body's CRC does not match.
    #[error("trace segment {seq}: body checksum mismatch: the log is corrupt")]
    BodyChecksum {
        /// The segment.
        seq: u32,
    },
    /// A body over [`MAX_SEGMENT_BODY`].
    #[error("trace segment {seq} claims a {len}-byte body (at most {MAX_SEGMENT_BODY})")]
    BodyTooLong {
        /// The segment.
        seq: u32,
        /// The length it claims.
        len: usize,
    },
    /// A segment of another recording.
    #[error(
        "trace segment of stream {found:#018x} in a log of stream {expected:#018x}: a segment \
         of another recording"
    )]
    ForeignStream {
        /// The log's stream.
        expected: u64,
        /// The segment's.
        found: u64,
    },
    /// Segments missing or reordered.
    #[error(
        "trace segment {found} where segment {expected} was due: segments missing or reordered"
    )]
    OutOfOrder {
        /// The segment due.
        expected: u32,
        /// The segment that came.
        found: u32,
    },
    /// Exits missing between segments.
    #[error(
        "trace segment {seq} starts at exit {found} but the log so far ends at exit {expected}: \
         exits missing"
    )]
    ExitGap {
        /// The segment.
        seq: u32,
        /// The exit the log so far ends at.
        expected: u64,
        /// The segment's first exit.
        found: u64,
    },
    /// A segment recorded from another snapshot.
    #[error("trace segment {seq} starts from the snapshot at exit {found}, not {expected}")]
    WrongBase {
        /// The segment.
        seq: u32,
        /// The snapshot's exit.
        expected: u64,
        /// The segment's base.
        found: u64,
    },
    /// A record that does not parse.
    #[error("trace segment {seq}: record {record} is malformed ({why})")]
    BadRecord {
        /// The segment.
        seq: u32,
        /// The record's index in it.
        record: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// The header's exit count disagrees with the records.
    #[error("trace segment {seq} holds {found} exits but says {claimed}")]
    ExitCount {
        /// The segment.
        seq: u32,
        /// The header's count.
        claimed: u32,
        /// The records'.
        found: u32,
    },
    /// A segment after the one flagged as the end.
    #[error("a trace segment after the end of the stream")]
    AfterEnd,
}

/// A segment's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// [`FLAG_END`] on the last segment.
    pub flags: u16,
    /// The recording it belongs to.
    pub stream: u64,
    /// Its place in the stream (0, 1, …).
    pub seq: u32,
    /// The exit index of the snapshot the stream starts from.
    pub base_exit: u64,
    /// The exit index of the first exit in this segment (exits are counted
    /// from the VM's boot).
    pub first_exit: u64,
    /// Exits recorded in it.
    pub exits: u32,
    /// The body's length in bytes.
    pub body_len: u32,
}

// Opcodes. The frequent exits of real guests get their own, shorter ones.
const OP_OUT_COM1: u8 = 0x10; // out8 0x3f8, value
const OP_EOI_MASTER: u8 = 0x11; // out8 0x20, 0x20
const OP_EOI_SLAVE: u8 = 0x12; // out8 0xa0, 0x20
const OP_IN_COM1_LSR: u8 = 0x13; // in8 0x3fd, value
const OP_IN_COM1: u8 = 0x14; // in8 0x3f8, value
const OP_OUT_SYNC_PORT: u8 = 0x15; // out8 0x80, value
const OP_OUT: u8 = 0x20; // size, port u16, value (size bytes)
const OP_IN: u8 = 0x21;
const OP_HALT: u8 = 0x30;
const OP_WINDOW: u8 = 0x31;
const OP_MMIO_READ: u8 = 0x32; // addr varint, len, data
const OP_MMIO_WRITE: u8 = 0x33;
const OP_TICK: u8 = 0x40;
const OP_INPUT: u8 = 0x41; // len varint, bytes
const OP_INJECT: u8 = 0x42; // vector
const OP_SYNC: u8 = 0x43; // digest u64

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(r: &mut Reader<'_>) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = r.u8()?;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn encode_record(out: &mut Vec<u8>, record: &Record) {
    match record {
        Record::Exit(exit) => match exit {
            Exit::Out {
                port: 0x3f8,
                size: 1,
                value,
            } => out.extend_from_slice(&[OP_OUT_COM1, *value as u8]),
            Exit::Out {
                port: 0x20,
                size: 1,
                value: 0x20,
            } => out.push(OP_EOI_MASTER),
            Exit::Out {
                port: 0xa0,
                size: 1,
                value: 0x20,
            } => out.push(OP_EOI_SLAVE),
            Exit::Out {
                port: 0x80,
                size: 1,
                value,
            } => out.extend_from_slice(&[OP_OUT_SYNC_PORT, *value as u8]),
            Exit::In {
                port: 0x3fd,
                size: 1,
                value,
            } => out.extend_from_slice(&[OP_IN_COM1_LSR, *value as u8]),
            Exit::In {
                port: 0x3f8,
                size: 1,
                value,
            } => out.extend_from_slice(&[OP_IN_COM1, *value as u8]),
            Exit::Out { port, size, value } | Exit::In { port, size, value } => {
                out.push(if matches!(exit, Exit::Out { .. }) {
                    OP_OUT
                } else {
                    OP_IN
                });
                out.push(*size);
                out.extend_from_slice(&port.to_le_bytes());
                out.extend_from_slice(&value.to_le_bytes()[..usize::from((*size).min(4))]);
            }
            Exit::Halt => out.push(OP_HALT),
            Exit::Window => out.push(OP_WINDOW),
            Exit::MmioRead { addr, data } | Exit::MmioWrite { addr, data } => {
                out.push(if matches!(exit, Exit::MmioRead { .. }) {
                    OP_MMIO_READ
                } else {
                    OP_MMIO_WRITE
                });
                put_varint(out, *addr);
                out.push(data.len() as u8);
                out.extend_from_slice(data);
            }
        },
        Record::Tick => out.push(OP_TICK),
        Record::Input(bytes) => {
            out.push(OP_INPUT);
            put_varint(out, bytes.len() as u64);
            out.extend_from_slice(bytes);
        }
        Record::Inject(vector) => out.extend_from_slice(&[OP_INJECT, *vector]),
        Record::Sync(digest) => {
            out.push(OP_SYNC);
            out.extend_from_slice(&digest.to_le_bytes());
        }
    }
}

fn decode_record(r: &mut Reader<'_>) -> Result<Record, &'static str> {
    let op = r.u8().ok_or("cut short")?;
    let byte = |r: &mut Reader<'_>| r.u8().ok_or("cut short");
    let out8 = |port, value| {
        Record::Exit(Exit::Out {
            port,
            size: 1,
            value,
        })
    };
    let in8 = |port, value| {
        Record::Exit(Exit::In {
            port,
            size: 1,
            value,
        })
    };
    Ok(match op {
        OP_OUT_COM1 => out8(0x3f8, u32::from(byte(r)?)),
        OP_EOI_MASTER => out8(0x20, 0x20),
        OP_EOI_SLAVE => out8(0xa0, 0x20),
        OP_OUT_SYNC_PORT => out8(0x80, u32::from(byte(r)?)),
        OP_IN_COM1_LSR => in8(0x3fd, u32::from(byte(r)?)),
        OP_IN_COM1 => in8(0x3f8, u32::from(byte(r)?)),
        OP_OUT | OP_IN => {
            let size = byte(r)?;
            if !matches!(size, 1 | 2 | 4) {
                return Err("port access size not 1, 2 or 4");
            }
            let port = r.u16().ok_or("cut short")?;
            let mut v = [0u8; 4];
            v[..usize::from(size)].copy_from_slice(r.take(usize::from(size)).ok_or("cut short")?);
            let value = u32::from_le_bytes(v);
            Record::Exit(if op == OP_OUT {
                Exit::Out { port, size, value }
            } else {
                Exit::In { port, size, value }
            })
        }
        OP_HALT => Record::Exit(Exit::Halt),
        OP_WINDOW => Record::Exit(Exit::Window),
        OP_MMIO_READ | OP_MMIO_WRITE => {
            let addr = get_varint(r).ok_or("bad address")?;
            let len = usize::from(byte(r)?);
            if len > 8 {
                return Err("MMIO access over 8 bytes");
            }
            let data = r.take(len).ok_or("cut short")?.to_vec();
            Record::Exit(if op == OP_MMIO_READ {
                Exit::MmioRead { addr, data }
            } else {
                Exit::MmioWrite { addr, data }
            })
        }
        OP_TICK => Record::Tick,
        OP_INPUT => {
            let len = get_varint(r).ok_or("bad length")?;
            if len > MAX_SEGMENT_BODY as u64 {
                return Err("input longer than a segment");
            }
            Record::Input(r.take(len as usize).ok_or("cut short")?.to_vec())
        }
        OP_INJECT => Record::Inject(byte(r)?),
        OP_SYNC => Record::Sync(r.u64().ok_or("cut short")?),
        _ => return Err("unknown opcode"),
    })
}

/// Builds a stream's segments as a deterministic run goes.
#[derive(Debug)]
pub struct TraceWriter {
    stream: u64,
    base_exit: u64,
    seq: u32,
    /// Exit index of the first exit of the open segment.
    first_exit: u64,
    exits: u32,
    body: Vec<u8>,
    /// Exit index the next exit gets.
    next_exit: u64,
    ended: bool,
}

impl TraceWriter {
    /// A new stream `stream` (random: it tells this recording's segments
    /// from any other's) that starts from the snapshot at `base_exit`.
    pub fn new(stream: u64, base_exit: u64) -> Self {
        Self {
            stream,
            base_exit,
            seq: 0,
            first_exit: base_exit,
            exits: 0,
            body: Vec::with_capacity(SEGMENT_TARGET + 256),
            next_exit: base_exit,
            ended: false,
        }
    }

    /// The stream's id.
    pub fn stream(&self) -> u64 {
        self.stream
    }

    /// The exit index the next exit gets (= exits recorded so far).
    pub fn next_exit(&self) -> u64 {
        self.next_exit
    }

    /// Appends a record.
    pub fn push(&mut self, record: &Record) {
        if matches!(record, Record::Exit(_)) {
            self.exits += 1;
            self.next_exit += 1;
        }
        encode_record(&mut self.body, record);
    }

    /// Whether the open segment is big enough to seal.
    pub fn wants_seal(&self) -> bool {
        self.body.len() >= SEGMENT_TARGET
    }

    /// Whether the open segment holds anything.
    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    /// Seals the open segment (with `end`, the stream's last) and returns
    /// its bytes; the next records go into a new segment.
    pub fn seal(&mut self, end: bool) -> Vec<u8> {
        let body = std::mem::take(&mut self.body);
        let mut out = Vec::with_capacity(SEGMENT_HEADER_LEN + body.len());
        out.extend_from_slice(&TRACE_MAGIC);
        out.extend_from_slice(&TRACE_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(if end { FLAG_END } else { 0 }).to_le_bytes());
        out.extend_from_slice(&self.stream.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.base_exit.to_le_bytes());
        out.extend_from_slice(&self.first_exit.to_le_bytes());
        out.extend_from_slice(&self.exits.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        let header_crc = crc32c::crc32c(&out);
        out.extend_from_slice(&header_crc.to_le_bytes());
        out.extend_from_slice(&body);
        self.seq += 1;
        self.first_exit = self.next_exit;
        self.exits = 0;
        self.body = body;
        self.body.clear();
        self.ended |= end;
        out
    }
}

/// Parses one segment from the front of `bytes`: its header, its records,
/// and how many bytes it took. `Truncated` if `bytes` holds only part of one
/// (a reader of a log still being written waits for more).
pub fn parse_segment(bytes: &[u8]) -> Result<(SegmentHeader, Vec<Record>, usize), TraceError> {
    // The magic first, so that what is not a log is not called a torn one.
    let head = &bytes[..bytes.len().min(4)];
    if head != &TRACE_MAGIC[..head.len()] {
        let mut found = [0u8; 4];
        found[..head.len()].copy_from_slice(head);
        return Err(TraceError::BadMagic { found });
    }
    if bytes.len() < SEGMENT_HEADER_LEN {
        return Err(TraceError::Truncated {
            got: bytes.len(),
            need: SEGMENT_HEADER_LEN,
        });
    }
    let mut r = Reader::new(&bytes[4..SEGMENT_HEADER_LEN]);
    let cut = TraceError::Truncated {
        got: bytes.len(),
        need: SEGMENT_HEADER_LEN,
    };
    let version = r.u16().ok_or(cut.clone())?;
    if version != TRACE_FORMAT_VERSION {
        return Err(TraceError::UnsupportedVersion { found: version });
    }
    let flags = r.u16().ok_or(cut.clone())?;
    let stream = r.u64().ok_or(cut.clone())?;
    let seq = r.u32().ok_or(cut.clone())?;
    let base_exit = r.u64().ok_or(cut.clone())?;
    let first_exit = r.u64().ok_or(cut.clone())?;
    let exits = r.u32().ok_or(cut.clone())?;
    let body_len = r.u32().ok_or(cut.clone())?;
    let body_crc = r.u32().ok_or(cut.clone())?;
    let header_crc = r.u32().ok_or(cut)?;
    if crc32c::crc32c(&bytes[..SEGMENT_HEADER_LEN - 4]) != header_crc {
        return Err(TraceError::HeaderChecksum { seq });
    }
    if body_len as usize > MAX_SEGMENT_BODY {
        return Err(TraceError::BodyTooLong {
            seq,
            len: body_len as usize,
        });
    }
    let end = SEGMENT_HEADER_LEN + body_len as usize;
    let body = bytes
        .get(SEGMENT_HEADER_LEN..end)
        .ok_or(TraceError::Truncated {
            got: bytes.len(),
            need: end,
        })?;
    if crc32c::crc32c(body) != body_crc {
        return Err(TraceError::BodyChecksum { seq });
    }
    let mut r = Reader::new(body);
    let mut records = Vec::new();
    let mut found = 0u32;
    while !r.is_empty() {
        let record = decode_record(&mut r).map_err(|why| TraceError::BadRecord {
            seq,
            record: records.len(),
            why,
        })?;
        found += u32::from(matches!(record, Record::Exit(_)));
        records.push(record);
    }
    if found != exits {
        return Err(TraceError::ExitCount {
            seq,
            claimed: exits,
            found,
        });
    }
    Ok((
        SegmentHeader {
            flags,
            stream,
            seq,
            base_exit,
            first_exit,
            exits,
            body_len,
        },
        records,
        end,
    ))
}

/// Takes a stream's segments in order and hands out its records, checking
/// that every segment belongs to the stream and follows the one before.
#[derive(Debug, Default)]
pub struct TraceReader {
    stream: Option<u64>,
    base_exit: Option<u64>,
    /// The first exit of the first segment taken.
    start_exit: Option<u64>,
    /// The first segment may have any seq (a reader that joins a stream
    /// where a snapshot was taken, not at its start).
    joining: bool,
    next_seq: u32,
    /// Exit index the next exit record has.
    next_exit: Option<u64>,
    records: VecDeque<Record>,
    ended: bool,
}

impl TraceReader {
    /// A reader that takes the first segment's stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// A reader that refuses every stream but `stream` (the one a snapshot
    /// says it was recorded into).
    pub fn expecting(stream: u64) -> Self {
        Self {
            stream: Some(stream),
            ..Self::default()
        }
    }

    /// A reader that joins stream `stream` part way: its first segment may
    /// have any seq (it must start where the caller's snapshot was taken);
    /// the ones after it follow in order as usual.
    pub fn joining(stream: u64) -> Self {
        Self {
            stream: Some(stream),
            joining: true,
            ..Self::default()
        }
    }

    /// Adds one whole segment (as [`parse_segment`] found it in `bytes`);
    /// returns the bytes it took.
    pub fn push_segment(&mut self, bytes: &[u8]) -> Result<usize, TraceError> {
        let (h, records, used) = parse_segment(bytes).map_err(|e| match e {
            // After a segment of the log: the log, damaged, not another file.
            TraceError::BadMagic { found } if self.start_exit.is_some() => {
                TraceError::DamagedHeader {
                    seq: self.next_seq,
                    found,
                }
            }
            e => e,
        })?;
        if self.ended {
            return Err(TraceError::AfterEnd);
        }
        if let Some(stream) = self.stream
            && stream != h.stream
        {
            return Err(TraceError::ForeignStream {
                expected: stream,
                found: h.stream,
            });
        }
        if self.joining && self.start_exit.is_none() {
            self.next_seq = h.seq;
            self.next_exit = Some(h.first_exit);
        }
        if h.seq != self.next_seq {
            return Err(TraceError::OutOfOrder {
                expected: self.next_seq,
                found: h.seq,
            });
        }
        if let Some(base) = self.base_exit
            && base != h.base_exit
        {
            return Err(TraceError::WrongBase {
                seq: h.seq,
                expected: base,
                found: h.base_exit,
            });
        }
        let expected_first = self.next_exit.unwrap_or(h.base_exit);
        if h.first_exit != expected_first {
            return Err(TraceError::ExitGap {
                seq: h.seq,
                expected: expected_first,
                found: h.first_exit,
            });
        }
        self.stream = Some(h.stream);
        self.base_exit = Some(h.base_exit);
        self.start_exit.get_or_insert(h.first_exit);
        self.next_seq = h.seq + 1;
        self.next_exit = Some(h.first_exit + u64::from(h.exits));
        self.ended = h.flags & FLAG_END != 0;
        self.records.extend(records);
        Ok(used)
    }

    /// Adds every whole segment at the front of `bytes`; returns the bytes
    /// they took (a partial segment at the end is left for later).
    pub fn push_bytes(&mut self, mut bytes: &[u8]) -> Result<usize, TraceError> {
        let mut used = 0;
        while !bytes.is_empty() {
            match self.push_segment(bytes) {
                Ok(n) => {
                    used += n;
                    bytes = &bytes[n..];
                }
                Err(TraceError::Truncated { .. }) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(used)
    }

    /// The stream's id, once a segment came.
    pub fn stream(&self) -> Option<u64> {
        self.stream
    }

    /// The exit index of the snapshot the stream starts from.
    pub fn base_exit(&self) -> Option<u64> {
        self.base_exit
    }

    /// The first exit of the first segment this reader took (the stream's
    /// base, unless it joined part way).
    pub fn start_exit(&self) -> Option<u64> {
        self.start_exit
    }

    /// The exit index after the last exit received so far.
    pub fn received_exits(&self) -> Option<u64> {
        self.next_exit
    }

    /// Whether the stream's last segment came.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The next record, if it came.
    pub fn next_record(&mut self) -> Option<Record> {
        self.records.pop_front()
    }

    /// The next record without taking it.
    pub fn peek(&self) -> Option<&Record> {
        self.records.front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record::Exit(Exit::Out {
                port: 0x3f8,
                size: 1,
                value: b'c'.into(),
            }),
            Record::Exit(Exit::Halt),
            Record::Tick,
            Record::Inject(0x20),
            Record::Exit(Exit::Out {
                port: 0x20,
                size: 1,
                value: 0x20,
            }),
            Record::Exit(Exit::In {
                port: 0x3fd,
                size: 1,
                value: 0x61,
            }),
            Record::Input(b"SET a 1\n".to_vec()),
            Record::Exit(Exit::In {
                port: 0x71,
                size: 4,
                value: 0xdead_beef,
            }),
            Record::Exit(Exit::Out {
                port: 0x43,
                size: 1,
                value: 0x34,
            }),
            Record::Exit(Exit::Window),
            Record::Exit(Exit::MmioRead {
                addr: 0xfee0_0000,
                data: vec![0xff; 4],
            }),
            Record::Sync(0x1234_5678_9abc_def0),
        ]
    }

    #[test]
    fn records_round_trip_through_segments_and_exits_are_counted() {
        let mut w = TraceWriter::new(77, 1000);
        for r in sample() {
            w.push(&r);
        }
        let first = w.seal(false);
        for r in sample() {
            w.push(&r);
        }
        let second = w.seal(true);
        assert_eq!(w.next_exit(), 1000 + 16);
        let mut log = first.clone();
        log.extend_from_slice(&second);
        let mut reader = TraceReader::new();
        assert_eq!(reader.push_bytes(&log).unwrap(), log.len());
        assert!(reader.ended());
        assert_eq!(reader.received_exits(), Some(1016));
        let got: Vec<Record> = std::iter::from_fn(|| reader.next_record()).collect();
        let mut want = sample();
        want.extend(sample());
        assert_eq!(got, want);
        // The frequent exits take one or two bytes.
        assert!(first.len() < SEGMENT_HEADER_LEN + 60, "{}", first.len());
    }

    #[test]
    fn a_partial_segment_waits_and_bad_logs_are_refused_by_name() {
        let mut w = TraceWriter::new(5, 0);
        w.push(&Record::Exit(Exit::Halt));
        let s0 = w.seal(false);
        w.push(&Record::Exit(Exit::Halt));
        let s1 = w.seal(false);
        // Streaming: half a segment is left for later.
        let mut r = TraceReader::new();
        assert_eq!(r.push_bytes(&s0[..s0.len() - 1]).unwrap(), 0);
        assert_eq!(r.push_bytes(&s0).unwrap(), s0.len());
        // Reordered or duplicated.
        assert!(matches!(
            r.push_segment(&s0),
            Err(TraceError::OutOfOrder {
                expected: 1,
                found: 0
            })
        ));
        // Foreign.
        let mut other = TraceWriter::new(6, 0);
        other.push(&Record::Exit(Exit::Halt));
        other.seal(false);
        other.push(&Record::Exit(Exit::Halt));
        let foreign = other.seal(false);
        assert!(matches!(
            r.push_segment(&foreign),
            Err(TraceError::ForeignStream { .. })
        ));
        // Every flipped bit of a segment is refused.
        for i in 0..s1.len() {
            let mut bad = s1.clone();
            bad[i] ^= 1 << (i % 8);
            let mut fresh = TraceReader::new();
            fresh.push_segment(&s0).unwrap();
            assert!(fresh.push_segment(&bad).is_err(), "byte {i}");
        }
        assert!(matches!(
            parse_segment(b"USTR").unwrap_err(),
            TraceError::Truncated { .. }
        ));
        let mut magic = s0.clone();
        magic[0] = b'X';
        assert!(matches!(
            parse_segment(&magic).unwrap_err(),
            TraceError::BadMagic { .. }
        ));
        // The same first bytes after a segment of the log: a damaged log.
        assert!(matches!(
            TraceReader::new().push_segment(&magic),
            Err(TraceError::BadMagic { .. })
        ));
        let mut damaged = s1.clone();
        damaged[0] = b'X';
        let mut fresh = TraceReader::new();
        fresh.push_segment(&s0).unwrap();
        assert!(matches!(
            fresh.push_segment(&damaged),
            Err(TraceError::DamagedHeader { seq: 1, .. })
        ));
        r.push_segment(&s1).unwrap();
    }

    #[test]
    fn a_joining_reader_starts_at_any_segment_then_keeps_the_order() {
        let mut w = TraceWriter::new(9, 100);
        let mut segments = Vec::new();
        for _ in 0..4 {
            w.push(&Record::Exit(Exit::Halt));
            w.push(&Record::Tick);
            w.push(&Record::Exit(Exit::Halt));
            segments.push(w.seal(false));
        }
        // A fresh reader wants seq 0; a joining one takes seq 2…
        assert!(matches!(
            TraceReader::expecting(9).push_segment(&segments[2]),
            Err(TraceError::OutOfOrder { expected: 0, .. })
        ));
        let mut r = TraceReader::joining(9);
        r.push_segment(&segments[2]).unwrap();
        assert_eq!(r.start_exit(), Some(104));
        assert_eq!(r.base_exit(), Some(100));
        // …then only seq 3, and only of its stream.
        assert!(matches!(
            r.push_segment(&segments[1]),
            Err(TraceError::OutOfOrder {
                expected: 3,
                found: 1
            })
        ));
        r.push_segment(&segments[3]).unwrap();
        assert_eq!(r.received_exits(), Some(108));
        let mut other = TraceWriter::new(10, 0);
        other.push(&Record::Exit(Exit::Halt));
        assert!(matches!(
            TraceReader::joining(9).push_segment(&other.seal(false)),
            Err(TraceError::ForeignStream { .. })
        ));
    }

    #[test]
    fn random_bytes_never_panic_the_parser() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 200) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 56)) as u8).collect();
            if x % 3 == 0 && bytes.len() > 4 {
                bytes[..4].copy_from_slice(&TRACE_MAGIC);
            }
            let _ = parse_segment(&bytes);
            let _ = TraceReader::new().push_bytes(&bytes);
        }
    }
}
