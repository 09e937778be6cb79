//! gRPC's message framing on an HTTP/2 stream, for the one RPC that carries
//! guest memory (`Replication.Replicate`) without tonic's copies.
//!
//! tonic copies every message twice on its way: the sender's prost encodes
//! a message into tonic's buffer (a copy of each chunk), and the receiver
//! appends each HTTP/2 DATA frame to a buffer of its own before decoding
//! from it (a copy of each chunk). For a stream of 256 KiB chunks of guest
//! pages those copies were a tenth of the sender's and a quarter of the
//! receiver's CPU (`docs/ARCHITECTURE.md`, "What limits the replication
//! pipeline"). The bytes on the wire are the same as tonic's: a message is
//! a 1-byte compressed flag, a 4-byte big-endian length and the protobuf
//! encoding; a stream ends with trailers carrying `grpc-status`.
//!
//! - [`MessageReader`] cuts messages out of the DATA frames as they come,
//!   as the pieces of the frames they came in: prost decodes a chunk's
//!   bytes as a view of the frame they arrived in (no copy).
//! - [`epoch_chunk_frames`] frames an [`EpochChunk`] as two pieces, its
//!   small fields and the chunk's own bytes, which go out as they are.
//! - [`encode_message`], [`status_trailers`] and [`ok_trailers`] frame the
//!   small messages and the stream's end.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tonic::Status;

use crate::{Ack, EpochChunk};

/// The gRPC message prefix: compressed flag and big-endian length.
pub const PREFIX_LEN: usize = 5;

/// The largest message a Replicate stream takes (tonic's default limit,
/// which the stream had before it was read here): a chunk's body is at
/// most 256 KiB (`understudy_checkpoint::MAX_CHUNK_BODY`), a trace segment
/// or a post-copy batch less.
pub const MAX_MESSAGE: usize = 4 << 20;

/// The path of the RPC this framing carries.
pub const REPLICATE_PATH: &str = "/understudy.v1.Replication/Replicate";

/// Reassembles gRPC messages from the DATA frames of one HTTP/2 stream.
#[derive(Debug)]
pub struct MessageReader {
    /// Frames (or their rest) not yet cut into messages, oldest first.
    pending: VecDeque<Bytes>,
    /// Bytes in `pending`.
    len: usize,
    /// The current message's length, once its prefix was read.
    body_len: Option<usize>,
    max: usize,
}

impl MessageReader {
    /// A reader that refuses messages over `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            pending: VecDeque::new(),
            len: 0,
            body_len: None,
            max,
        }
    }

    /// Adds one DATA frame's bytes.
    pub fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.len += data.len();
            self.pending.push_back(data);
        }
    }

    /// The next whole message, if its bytes are all here: the pieces of
    /// the frames it came in (no copy). The error names a malformed stream.
    pub fn next_message(&mut self) -> Result<Option<Segments>, Status> {
        let body_len = match self.body_len {
            Some(len) => len,
            None => {
                if self.len < PREFIX_LEN {
                    return Ok(None);
                }
                let mut prefix = [0u8; PREFIX_LEN];
                self.take(PREFIX_LEN).copy_to_slice(&mut prefix);
                if prefix[0] != 0 {
                    return Err(Status::unimplemented(format!(
                        "compressed gRPC message (flag {}) on the replication stream: this \
                         stream takes uncompressed messages only (pages are compressed by the \
                         epoch codec instead)",
                        prefix[0]
                    )));
                }
                let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
                if len > self.max {
                    return Err(Status::out_of_range(format!(
                        "a message of {len} bytes on the replication stream is over its limit of \
                         {} bytes",
                        self.max
                    )));
                }
                self.body_len = Some(len);
                len
            }
        };
        if self.len < body_len {
            return Ok(None);
        }
        self.body_len = None;
        Ok(Some(self.take(body_len)))
    }

    /// Bytes received but not yet part of a whole message (at the stream's
    /// end, anything here is a message cut short).
    pub fn buffered(&self) -> usize {
        self.len + self.body_len.map_or(0, |_| PREFIX_LEN)
    }

    /// The next `n` bytes (`n <= self.len`), as slices of the frames.
    fn take(&mut self, n: usize) -> Segments {
        self.len -= n;
        let mut out = Segments {
            parts: VecDeque::new(),
            len: n,
        };
        let mut want = n;
        while want > 0 {
            let Some(front) = self.pending.front_mut() else {
                unreachable!("n <= self.len");
            };
            if front.len() <= want {
                want -= front.len();
                out.parts.extend(self.pending.pop_front());
            } else {
                out.parts.push_back(front.split_to(want));
                want = 0;
            }
        }
        out
    }
}

/// One message's bytes, in the pieces of the frames it arrived in. As a
/// [`Buf`], it hands out a field that lies within one piece as a view of
/// it (`copy_to_bytes`), so prost decodes a chunk's bytes without copying
/// them; only a field split across frames is copied together.
#[derive(Debug)]
pub struct Segments {
    parts: VecDeque<Bytes>,
    len: usize,
}

impl Buf for Segments {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |p| &p[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advance past the end of a message");
        self.len -= cnt;
        while cnt > 0 {
            let Some(front) = self.parts.front_mut() else {
                unreachable!("cnt <= len");
            };
            if front.len() <= cnt {
                cnt -= front.len();
                self.parts.pop_front();
            } else {
                front.advance(cnt);
                cnt = 0;
            }
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(len <= self.len, "copy_to_bytes past the end of a message");
        if let Some(front) = self.parts.front_mut()
            && front.len() >= len
        {
            self.len -= len;
            let out = front.split_to(len);
            if front.is_empty() {
                self.parts.pop_front();
            }
            return out;
        }
        let mut out = BytesMut::with_capacity(len);
        out.put((&mut *self).take(len));
        out.freeze()
    }
}

/// Decodes an [`EpochChunk`] from a whole message; a bytes field that came
/// within one frame is a view of it (no copy).
pub fn decode_epoch_chunk(message: Segments) -> Result<EpochChunk, Status> {
    EpochChunk::decode(message).map_err(|e| {
        Status::invalid_argument(format!(
            "malformed EpochChunk on the replication stream: {e}"
        ))
    })
}

/// The prefix of an uncompressed message of `len` bytes.
fn put_prefix(out: &mut BytesMut, len: usize) {
    out.put_u8(0);
    out.put_u32(len as u32);
}

/// A small message with its gRPC prefix, in one buffer.
pub fn encode_message<M: Message>(message: &M) -> Bytes {
    let len = message.encoded_len();
    let mut out = BytesMut::with_capacity(PREFIX_LEN + len);
    put_prefix(&mut out, len);
    // A BytesMut grows as needed: encoding into it cannot fail.
    let _ = message.encode(&mut out);
    out.freeze()
}

/// `msg` framed as one gRPC message in two pieces: the prefix with every
/// field but `chunk`, then `chunk` itself, sent from where it is. Decoded
/// by any protobuf decoder as `msg` (the order of fields on the wire is
/// free; `chunk` appears once).
pub fn epoch_chunk_frames(mut msg: EpochChunk) -> [Bytes; 2] {
    let chunk = std::mem::take(&mut msg.chunk);
    let head_len = msg.encoded_len();
    // `chunk` is field 3, length-delimited: key, length, bytes.
    let chunk_field = if chunk.is_empty() {
        0
    } else {
        prost::encoding::key_len(CHUNK_FIELD)
            + prost::encoding::encoded_len_varint(chunk.len() as u64)
            + chunk.len()
    };
    let mut head = BytesMut::with_capacity(PREFIX_LEN + head_len + 16);
    put_prefix(&mut head, head_len + chunk_field);
    let _ = msg.encode(&mut head);
    if !chunk.is_empty() {
        prost::encoding::encode_key(
            CHUNK_FIELD,
            prost::encoding::WireType::LengthDelimited,
            &mut head,
        );
        prost::encoding::encode_varint(chunk.len() as u64, &mut head);
    }
    [head.freeze(), chunk]
}

/// `EpochChunk.chunk`'s field number (checked against prost's encoding by
/// a test).
const CHUNK_FIELD: u32 = 3;

/// The trailers that end a stream that went well.
pub fn ok_trailers() -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    map.insert("grpc-status", http::HeaderValue::from_static("0"));
    map
}

/// The trailers that end a stream with `status`.
pub fn status_trailers(status: &Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        // Only a message that cannot be a header value gets here.
        map.insert("grpc-status", http::HeaderValue::from(status.code() as i32));
    }
    map
}

/// Opens a `Replication.Replicate` stream on `channel`: each [`EpochChunk`]
/// of `chunks` goes out in two pieces ([`epoch_chunk_frames`]: the chunk's
/// bytes are handed to HTTP/2 as they are, not copied into a buffer), and
/// the acks come back decoded by tonic. Errors are the statuses tonic's
/// generated client would give: the transport's, or the backup's refusal.
pub async fn replicate<S>(
    mut channel: tonic::transport::Channel,
    chunks: S,
) -> Result<tonic::Streaming<Ack>, Status>
where
    S: tokio_stream::Stream<Item = EpochChunk> + Send + 'static,
{
    use tonic::codec::Codec as _;
    use tonic::codegen::Service as _;

    let body = tonic::body::Body::new(ChunkBody {
        chunks: Box::pin(chunks),
        next: None,
    });
    let request = http::Request::builder()
        .method(http::Method::POST)
        .version(http::Version::HTTP_2)
        .uri(REPLICATE_PATH)
        .header(http::header::TE, "trailers")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(body)
        .map_err(|e| Status::internal(format!("cannot build the Replicate request: {e}")))?;
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?;
    let decoder = tonic_prost::ProstCodec::<EpochChunk, Ack>::default().decoder();
    // A refusal comes as headers alone (a "trailers-only" response).
    if let Some(status) = Status::from_header_map(response.headers()) {
        if status.code() != tonic::Code::Ok {
            return Err(status);
        }
        return Ok(tonic::Streaming::new_empty(decoder, response.into_body()));
    }
    let code = response.status();
    Ok(tonic::Streaming::new_response(
        decoder,
        response.into_body(),
        code,
        None,
        Some(MAX_MESSAGE),
    ))
}

/// A Replicate request's body: each chunk's two pieces in turn.
struct ChunkBody {
    chunks: std::pin::Pin<Box<dyn tokio_stream::Stream<Item = EpochChunk> + Send>>,
    /// The chunk bytes of the message whose head just went.
    next: Option<Bytes>,
}

impl http_body::Body for ChunkBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        use std::task::Poll;
        if let Some(chunk) = self.next.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
        }
        match self.chunks.as_mut().poll_next(cx) {
            Poll::Ready(Some(msg)) => {
                let [head, chunk] = epoch_chunk_frames(msg);
                if !chunk.is_empty() {
                    self.next = Some(chunk);
                }
                Poll::Ready(Some(Ok(http_body::Frame::data(head))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chunk(len: usize) -> EpochChunk {
        EpochChunk {
            session: 0x1234_5678_9abc,
            generation: 7,
            chunk: Bytes::from((0..len).map(|i| (i * 31 % 251) as u8).collect::<Vec<_>>()),
            ..Default::default()
        }
    }

    /// The two-piece framing is byte for byte what prost (and so tonic)
    /// would put on the wire for the same message, bar the field order.
    #[test]
    fn two_piece_frames_decode_as_the_message() {
        for len in [0, 1, 127, 128, 4096, 300_000] {
            let msg = chunk(len);
            let [head, body] = epoch_chunk_frames(msg.clone());
            let mut wire = head.to_vec();
            wire.extend_from_slice(&body);
            assert_eq!(wire.len(), PREFIX_LEN + msg.encoded_len(), "len {len}");
            let mut reader = MessageReader::new(MAX_MESSAGE);
            reader.push(Bytes::from(wire));
            let got = decode_epoch_chunk(reader.next_message().unwrap().unwrap()).unwrap();
            assert_eq!(got, msg, "len {len}");
            assert_eq!(reader.buffered(), 0);
        }
    }

    /// Sent as two frames, the chunk is decoded where it arrived.
    #[test]
    fn a_chunk_sent_as_its_own_frame_is_received_without_a_copy() {
        let msg = chunk(200_000);
        let [head, body] = epoch_chunk_frames(msg.clone());
        let at = body.as_ptr();
        let mut reader = MessageReader::new(MAX_MESSAGE);
        reader.push(head);
        assert!(reader.next_message().unwrap().is_none());
        reader.push(body);
        let got = decode_epoch_chunk(reader.next_message().unwrap().unwrap()).unwrap();
        assert_eq!(got, msg);
        assert_eq!(got.chunk.as_ptr(), at, "the chunk was copied");
    }

    #[test]
    fn a_message_within_one_frame_is_not_copied() {
        let msg = chunk(100_000);
        let one = encode_message(&msg);
        let mut two = one.to_vec();
        two.extend_from_slice(&one);
        let frame = Bytes::from(two);
        let range = frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len();
        let mut reader = MessageReader::new(MAX_MESSAGE);
        reader.push(frame);
        for _ in 0..2 {
            let got = decode_epoch_chunk(reader.next_message().unwrap().unwrap()).unwrap();
            assert!(
                range.contains(&(got.chunk.as_ptr() as usize)),
                "chunk copied"
            );
            assert_eq!(got, msg);
        }
        assert!(reader.next_message().unwrap().is_none());
    }

    /// Any cut of a stream of messages into frames gives the same messages.
    #[test]
    fn messages_cut_anywhere_into_frames_come_out_whole() {
        let msgs: Vec<EpochChunk> = [0, 5, 4096, 70_000, 3].into_iter().map(chunk).collect();
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend_from_slice(&encode_message(m));
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for cut in [1, 2, 3, 4, 5, 6, 7, 4101, 65_536, 0] {
            let mut reader = MessageReader::new(MAX_MESSAGE);
            let mut got = Vec::new();
            let mut at = 0;
            while at < wire.len() {
                let step = if cut == 0 {
                    // Random cuts.
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    1 + (state % 20_000) as usize
                } else {
                    cut
                };
                let end = (at + step).min(wire.len());
                reader.push(Bytes::copy_from_slice(&wire[at..end]));
                at = end;
                while let Some(m) = reader.next_message().unwrap() {
                    got.push(decode_epoch_chunk(m).unwrap());
                }
            }
            assert_eq!(got, msgs, "cut {cut}");
            assert_eq!(reader.buffered(), 0, "cut {cut}");
        }
    }

    #[test]
    fn a_stream_cut_inside_a_message_leaves_bytes_buffered() {
        let wire = encode_message(&chunk(1000));
        for keep in [1, PREFIX_LEN, PREFIX_LEN + 1, wire.len() - 1] {
            let mut reader = MessageReader::new(MAX_MESSAGE);
            reader.push(wire.slice(..keep));
            assert!(reader.next_message().unwrap().is_none());
            assert_eq!(reader.buffered(), keep, "kept {keep}");
        }
    }

    #[test]
    fn compressed_and_oversized_messages_are_refused_by_name() {
        let mut reader = MessageReader::new(MAX_MESSAGE);
        reader.push(Bytes::from_static(&[1, 0, 0, 0, 1, 0]));
        let e = reader.next_message().unwrap_err();
        assert!(e.message().contains("compressed"), "{e}");

        let mut reader = MessageReader::new(1000);
        reader.push(Bytes::from_static(&[0, 0, 0, 3, 233]));
        let e = reader.next_message().unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        assert!(e.message().contains("1001 bytes"), "{e}");

        let mut reader = MessageReader::new(MAX_MESSAGE);
        reader.push(Bytes::from_static(&[0, 0, 0, 0, 2, 0xff, 0xff]));
        let m = reader.next_message().unwrap().unwrap();
        let e = decode_epoch_chunk(m).unwrap_err();
        assert!(e.message().contains("malformed EpochChunk"), "{e}");
    }

    #[test]
    fn trailers_carry_the_status() {
        let status = Status::failed_precondition("epoch 9 refused: digest mismatch");
        let got = Status::from_header_map(&status_trailers(&status)).unwrap();
        assert_eq!(got.code(), status.code());
        assert_eq!(got.message(), status.message());
        let ok = Status::from_header_map(&ok_trailers()).unwrap();
        assert_eq!(ok.code(), tonic::Code::Ok);
    }
}
