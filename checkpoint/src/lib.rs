//! understudy's checkpoint format and the backup's image store.
//!
//! Pure data: no KVM, no async runtime, no sockets. An epoch (dirty pages +
//! device state + image digest) is encoded by [`epoch::SenderState`] into
//! self-checking [`chunk`]s with per-page [`codec`]s, decoded and verified by
//! [`epoch::EpochDecoder`] against the receiver's committed image, and
//! committed atomically and crash-safely by [`store::ImageStore`].

pub mod chunk;
pub mod codec;
pub mod copy;
pub mod epoch;
pub mod page;
pub mod record_file;
pub mod store;
pub mod trace;

pub use codec::{AdaptiveReport, Codec, CodecError, CodecPolicy, Compression};
pub use epoch::{
    CommittedImage, EncodeReport, EncodedEpoch, EpochDecoder, EpochError, EpochHeader, EpochKind,
    Received, SenderState, Slot, StagedEpoch, StagingBuffers,
};
pub use page::{ImageDigest, PAGE_SIZE, Page, PageHash};
pub use store::{ImageStore, Promotable, StoreError};
