//! Response encoding (PROTOCOL.md §1.10–1.12): frames, 22-byte headers, fields, ops.

use ferrospike_engine::{Reply, Value};

use super::codes::{MSG_TYPE_AS_MSG, OP_READ};
use super::header::{ProtoHeader, PROTO_HEADER_BYTES};
use super::msg::MSG_HEADER_BYTES;

/// The numbers of one response message header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RespHeader {
    pub info1: u8,
    pub info3: u8,
    pub result_code: u8,
    pub generation: u32,
    pub void_time: u32,
    pub txn_ttl: u32,
    pub n_fields: u16,
    pub n_ops: u16,
}

impl RespHeader {
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(MSG_HEADER_BYTES as u8);
        out.extend_from_slice(&[self.info1, 0, self.info3, 0, self.result_code]);
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&self.void_time.to_be_bytes());
        out.extend_from_slice(&self.txn_ttl.to_be_bytes());
        out.extend_from_slice(&self.n_fields.to_be_bytes());
        out.extend_from_slice(&self.n_ops.to_be_bytes());
    }
}

/// Start a frame of `msg_type` in `out`; returns where it starts, for [`end_frame`].
pub fn begin_frame(out: &mut Vec<u8>, msg_type: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&ProtoHeader::encode(msg_type, 0));
    start
}

/// Patch the size of the frame begun at `start` to cover everything written since.
pub fn end_frame(out: &mut [u8], start: usize) {
    let size = (out.len() - start - PROTO_HEADER_BYTES) as u64;
    let msg_type = out[start + 1];
    out[start..start + PROTO_HEADER_BYTES].copy_from_slice(&ProtoHeader::encode(msg_type, size));
}

pub fn write_field(out: &mut Vec<u8>, ftype: u8, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32 + 1).to_be_bytes());
    out.push(ftype);
    out.extend_from_slice(data);
}

/// The bytes [`write_op`] writes for a bin.
pub fn op_bytes(name: &str, value: &Value) -> usize {
    8 + name.len().min(u8::MAX as usize) + value.encoded_len()
}

pub fn write_op(out: &mut Vec<u8>, code: u8, name: &str, value: &Value) {
    // Bin names are at most 15 bytes (checked on the way in), so the u8 cannot truncate.
    let size = op_bytes(name, value) - 4;
    let name = &name.as_bytes()[..name.len().min(u8::MAX as usize)];
    out.extend_from_slice(&(size as u32).to_be_bytes());
    out.extend_from_slice(&[code, value.particle_type(), 0, name.len() as u8]);
    out.extend_from_slice(name);
    value.encode_into(out);
}

/// One record message (no frame): header, then the reply's bins as ops. `op_codes`, when
/// it has one code per returned bin, is echoed; otherwise every op says READ.
pub fn write_reply_msg(out: &mut Vec<u8>, reply: &Reply, op_codes: Option<&[u8]>, txn_ttl: u32, info1: u8) {
    RespHeader {
        info1,
        result_code: reply.result.code(),
        generation: reply.generation as u32,
        void_time: reply.void_time,
        txn_ttl,
        n_ops: reply.bins.len().min(u16::MAX as usize) as u16,
        ..Default::default()
    }
    .write(out);
    let codes = op_codes.filter(|c| c.len() == reply.bins.len());
    for (i, b) in reply.bins.iter().take(u16::MAX as usize).enumerate() {
        let code = codes.map_or(OP_READ, |c| c[i]);
        write_op(out, code, &b.name, &b.value);
    }
}

/// A complete single-record response frame.
pub fn encode_reply(reply: &Reply, op_codes: Option<&[u8]>) -> Vec<u8> {
    // Sized exactly, so the values are copied once, with no reallocation.
    let ops: usize = reply.bins.iter().map(|b| op_bytes(&b.name, &b.value)).sum();
    let mut out = Vec::with_capacity(PROTO_HEADER_BYTES + MSG_HEADER_BYTES + ops);
    let start = begin_frame(&mut out, MSG_TYPE_AS_MSG);
    write_reply_msg(&mut out, reply, op_codes, 0, 0);
    end_frame(&mut out, start);
    out
}

/// A header-only response frame carrying a result code.
pub fn encode_error(rc: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(PROTO_HEADER_BYTES + MSG_HEADER_BYTES);
    let start = begin_frame(&mut out, MSG_TYPE_AS_MSG);
    RespHeader { result_code: rc, ..Default::default() }.write(&mut out);
    end_frame(&mut out, start);
    out
}

/// The message that ends a multi-message response (batch, scan), with a result code.
pub fn write_last_msg(out: &mut Vec<u8>, rc: u8) {
    RespHeader { info3: super::codes::INFO3_LAST, result_code: rc, ..Default::default() }.write(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::msg::tests::hex;
    use ferrospike_engine::{OpResult, ResultCode};

    #[test]
    fn encodes_the_captured_get_response() {
        let reply = Reply {
            result: ResultCode::Ok,
            generation: 1,
            void_time: 0x1fc8f402,
            bins: vec![
                OpResult { name: "i".into(), value: Value::Int(1) },
                OpResult { name: "s".into(), value: Value::Str(b"abc".to_vec()) },
                OpResult { name: "f".into(), value: Value::Float(1.5) },
                OpResult { name: "b".into(), value: Value::Blob(vec![0, 1]) },
                OpResult { name: "l".into(), value: Value::List(hex("9201a20378")) },
                OpResult { name: "m".into(), value: Value::Map(hex("81a2036b02")) },
            ],
        };
        let want = hex(&[
            "020300000000006b",
            "160000000000",
            "00000001",
            "1fc8f402",
            "00000000",
            "0000",
            "0006",
            "0000000d01010001690000000000000001",
            "000000080103000173616263",
            "0000000d01020001663ff8000000000000",
            "00000007010400016200 01",
            "0000000a011400016c9201a20378",
            "0000000a011300016d81a2036b02",
        ]
        .concat()
        .replace(' ', ""));
        let got = encode_reply(&reply, None);
        assert_eq!(got, want);
        assert_eq!(got.capacity(), got.len(), "sized exactly");
    }

    #[test]
    fn encodes_misses_and_respond_all_ops() {
        assert_eq!(encode_error(2), hex(&format!("0203000000000016160000000002{}", "00".repeat(16))));
        let reply = Reply {
            result: ResultCode::Ok,
            generation: 2,
            void_time: 0,
            bins: vec![
                OpResult { name: "i".into(), value: Value::Nil },
                OpResult { name: "i".into(), value: Value::Int(16) },
            ],
        };
        let f = encode_reply(&reply, Some(&[5, 1]));
        assert_eq!(&f[30..39], &hex("000000050500000169")[..]);
        assert_eq!(&f[39..43], &hex("0000000d")[..]);
        assert_eq!(f[43], 1);
    }
}
