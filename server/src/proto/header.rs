//! The 8-byte proto header: version 2, message type, 48-bit big-endian body size.

use super::codes::{MSG_TYPE_ADMIN, MSG_TYPE_AS_MSG, MSG_TYPE_COMPRESSED, MSG_TYPE_INFO};
use super::ProtocolError;

pub const PROTO_HEADER_BYTES: usize = 8;
pub const PROTO_VERSION: u8 = 2;
/// The largest body the 48-bit size field can express.
pub const MAX_PROTO_SIZE: u64 = (1 << 48) - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtoHeader {
    pub msg_type: u8,
    /// Body size in bytes, not counting the 8 header bytes.
    pub size: u64,
}

impl ProtoHeader {
    /// Decode and check a header. A size above `max_body` is refused here, before anyone
    /// allocates for the body.
    pub fn parse(b: &[u8; PROTO_HEADER_BYTES], max_body: u64) -> Result<ProtoHeader, ProtocolError> {
        if b[0] != PROTO_VERSION {
            return Err(ProtocolError::Version(b[0]));
        }
        let msg_type = b[1];
        if !matches!(msg_type, MSG_TYPE_INFO | MSG_TYPE_ADMIN | MSG_TYPE_AS_MSG | MSG_TYPE_COMPRESSED) {
            return Err(ProtocolError::MsgType(msg_type));
        }
        let size = u64::from_be_bytes(*b) & MAX_PROTO_SIZE;
        if size > max_body {
            return Err(ProtocolError::TooLarge { size, max: max_body });
        }
        Ok(ProtoHeader { msg_type, size })
    }

    pub fn encode(msg_type: u8, size: u64) -> [u8; PROTO_HEADER_BYTES] {
        assert!(size <= MAX_PROTO_SIZE, "proto body of {size} bytes");
        let v = ((PROTO_VERSION as u64) << 56) | ((msg_type as u64) << 48) | size;
        v.to_be_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_worked_example() {
        let h = ProtoHeader::parse(&[2, 3, 0, 0, 0, 0, 0, 0x96], 1 << 20).unwrap();
        assert_eq!(h, ProtoHeader { msg_type: 3, size: 150 });
        assert_eq!(ProtoHeader::encode(3, 150), [2, 3, 0, 0, 0, 0, 0, 0x96]);
    }

    #[test]
    fn refuses_bad_version_type_and_size() {
        assert_eq!(ProtoHeader::parse(&[1, 3, 0, 0, 0, 0, 0, 1], 100), Err(ProtocolError::Version(1)));
        assert_eq!(ProtoHeader::parse(&[2, 9, 0, 0, 0, 0, 0, 1], 100), Err(ProtocolError::MsgType(9)));
        let huge = ProtoHeader::encode(3, 1 << 47);
        assert_eq!(ProtoHeader::parse(&huge, 16 << 20), Err(ProtocolError::TooLarge { size: 1 << 47, max: 16 << 20 }));
    }
}
