//! What the primary puts in an epoch's device-state blob: the encoded VM state
//! plus the console output the primary had not yet released when it took the
//! checkpoint (with its stream offset), so a promoted backup can serve output
//! that a dying primary never delivered.

use serde::{Deserialize, Serialize};

const MAGIC: [u8; 4] = *b"USCP";
const VERSION: u32 = 1;

/// The device-state blob of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointPayload {
    /// `understudy_vmm::VmState::encode()` of the paused VM.
    pub vm_state: Vec<u8>,
    /// Console stream offset of `console_out[0]`.
    pub console_offset: u64,
    /// Output not yet released by the primary, up to the checkpoint.
    pub console_out: Vec<u8>,
}

/// A payload that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// Not a checkpoint payload.
    #[error("checkpoint payload has no magic: not written by understudy")]
    BadMagic,
    /// A format version this build does not read.
    #[error("checkpoint payload version {0} is not supported (this build reads {VERSION})")]
    Version(u32),
    /// The body does not decode.
    #[error("checkpoint payload cannot be decoded")]
    Decode(#[source] postcard::Error),
}

impl CheckpointPayload {
    /// The payload's bytes (magic, version, body).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&VERSION.to_le_bytes());
        // Serialising plain vectors and integers cannot fail.
        out.extend(postcard::to_stdvec(self).unwrap_or_default());
        out
    }

    /// Reads a payload written by [`CheckpointPayload::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        if bytes.len() < 8 || bytes[..4] != MAGIC {
            return Err(PayloadError::BadMagic);
        }
        let version = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if version != VERSION {
            return Err(PayloadError::Version(version));
        }
        postcard::from_bytes(&bytes[8..]).map_err(PayloadError::Decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let p = CheckpointPayload {
            vm_state: vec![1, 2, 3],
            console_offset: 77,
            console_out: b"count 5\n".to_vec(),
        };
        assert_eq!(CheckpointPayload::decode(&p.encode()).unwrap(), p);
        assert!(matches!(
            CheckpointPayload::decode(b"nope"),
            Err(PayloadError::BadMagic)
        ));
        let mut v2 = p.encode();
        v2[4] = 2;
        assert!(matches!(
            CheckpointPayload::decode(&v2),
            Err(PayloadError::Version(2))
        ));
    }
}
