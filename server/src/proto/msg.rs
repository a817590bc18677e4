//! The AS_MSG body: the 22-byte header, then fields, then ops, all borrowed from the frame.

use super::codes::MAX_N_OPS;
use super::{ProtocolError, Reader};

pub const MSG_HEADER_BYTES: usize = 22;
/// Smallest encoding of a field (4-byte size + type byte).
const MIN_FIELD_BYTES: usize = 5;
/// Smallest encoding of an op (4-byte size + op, ptype, flags, name length).
const MIN_OP_BYTES: usize = 8;

/// The fixed AS_MSG header (PROTOCOL.md §1.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsgHeader {
    pub info1: u8,
    pub info2: u8,
    pub info3: u8,
    pub info4: u8,
    pub result_code: u8,
    pub generation: u32,
    pub record_ttl: u32,
    pub transaction_ttl: u32,
    pub n_fields: u16,
    pub n_ops: u16,
}

impl MsgHeader {
    pub fn parse(r: &mut Reader<'_>) -> Result<MsgHeader, ProtocolError> {
        let hsz = r.u8("msg header")?;
        if hsz as usize != MSG_HEADER_BYTES {
            return Err(ProtocolError::HeaderSize(hsz));
        }
        Ok(MsgHeader {
            info1: r.u8("msg header")?,
            info2: r.u8("msg header")?,
            info3: r.u8("msg header")?,
            info4: r.u8("msg header")?,
            result_code: r.u8("msg header")?,
            generation: r.u32("msg header")?,
            record_ttl: r.u32("msg header")?,
            transaction_ttl: r.u32("msg header")?,
            n_fields: r.u16("msg header")?,
            n_ops: r.u16("msg header")?,
        })
    }
}

/// One field: type and data (without the type byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field<'a> {
    pub ftype: u8,
    pub data: &'a [u8],
}

/// One op as sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpRef<'a> {
    pub code: u8,
    pub ptype: u8,
    pub name: &'a [u8],
    pub value: &'a [u8],
}

/// A decoded AS_MSG body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg<'a> {
    pub header: MsgHeader,
    pub fields: Vec<Field<'a>>,
    pub ops: Vec<OpRef<'a>>,
}

impl<'a> Msg<'a> {
    /// Decode a whole AS_MSG body. Trailing bytes after the last op are refused.
    pub fn parse(body: &'a [u8]) -> Result<Msg<'a>, ProtocolError> {
        let mut r = Reader::new(body);
        let header = MsgHeader::parse(&mut r)?;
        let fields = parse_fields(&mut r, header.n_fields as usize)?;
        let ops = parse_ops(&mut r, header.n_ops as usize)?;
        if r.remaining() != 0 {
            return Err(ProtocolError::Malformed("bytes after the last op"));
        }
        Ok(Msg { header, fields, ops })
    }

    pub fn field(&self, t: u8) -> Option<&'a [u8]> {
        field(&self.fields, t)
    }
}

/// The data of the first field of type `t`.
pub fn field<'a>(fields: &[Field<'a>], t: u8) -> Option<&'a [u8]> {
    fields.iter().find(|f| f.ftype == t).map(|f| f.data)
}

pub fn parse_fields<'a>(r: &mut Reader<'a>, n: usize) -> Result<Vec<Field<'a>>, ProtocolError> {
    let mut out = Vec::with_capacity(n.min(r.remaining() / MIN_FIELD_BYTES));
    for _ in 0..n {
        let size = r.u32("field size")? as usize;
        if size == 0 {
            return Err(ProtocolError::Malformed("field size 0"));
        }
        let ftype = r.u8("field type")?;
        let data = r.bytes(size - 1, "field data")?;
        out.push(Field { ftype, data });
    }
    Ok(out)
}

/// Decode `n` ops. More than [`MAX_N_OPS`] is refused without reading them.
pub fn parse_ops<'a>(r: &mut Reader<'a>, n: usize) -> Result<Vec<OpRef<'a>>, ProtocolError> {
    if n > MAX_N_OPS {
        return Err(ProtocolError::Malformed("more than 32768 ops"));
    }
    let mut out = Vec::with_capacity(n.min(r.remaining() / MIN_OP_BYTES));
    for _ in 0..n {
        let size = r.u32("op size")? as usize;
        if size < 4 {
            return Err(ProtocolError::Malformed("op size below 4"));
        }
        let code = r.u8("op")?;
        let ptype = r.u8("op")?;
        let _flags = r.u8("op")?;
        let name_len = r.u8("op")? as usize;
        if name_len > size - 4 {
            return Err(ProtocolError::Malformed("op name longer than the op"));
        }
        let name = r.bytes(name_len, "op name")?;
        let value = r.bytes(size - 4 - name_len, "op value")?;
        out.push(OpRef { code, ptype, name, value });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The captured Python get request of PROTOCOL.md §1.10 (body only).
    pub fn get_body() -> Vec<u8> {
        let mut b = vec![0x16, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x03, 0xe8, 0, 3, 0, 0];
        b.extend_from_slice(&[0, 0, 0, 5, 0, b't', b'e', b's', b't']);
        b.extend_from_slice(&[0, 0, 0, 5, 1, b'd', b'e', b'm', b'o']);
        b.extend_from_slice(&[0, 0, 0, 0x15, 4]);
        b.extend_from_slice(&hex("ec91192d4b7f8ce35d5d78d34bca65cbaaaac960"));
        b
    }

    pub fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn parses_a_captured_get() {
        let body = get_body();
        assert_eq!(body.len(), 65);
        let m = Msg::parse(&body).unwrap();
        assert_eq!(m.header.info1, 3);
        assert_eq!(m.header.transaction_ttl, 1000);
        assert_eq!(m.fields.len(), 3);
        assert_eq!(m.field(0), Some(&b"test"[..]));
        assert_eq!(m.field(1), Some(&b"demo"[..]));
        assert_eq!(m.field(4).unwrap().len(), 20);
        assert!(m.ops.is_empty());
    }

    #[test]
    fn refuses_truncation_and_lies() {
        let body = get_body();
        for cut in 0..body.len() {
            assert!(Msg::parse(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut b = body.clone();
        b[0] = 21;
        assert_eq!(Msg::parse(&b), Err(ProtocolError::HeaderSize(21)));
        let mut b = body.clone();
        b[22..26].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(Msg::parse(&b), Err(ProtocolError::Truncated { .. })));
        let mut b = body;
        b[20..22].copy_from_slice(&40000u16.to_be_bytes());
        assert!(matches!(Msg::parse(&b), Err(ProtocolError::Malformed(_))));
    }

    #[test]
    fn parses_ops() {
        let mut body = vec![0x16, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64, 0, 0, 0x03, 0xe8, 0, 0, 0, 2];
        body.extend_from_slice(&[0, 0, 0, 0x0d, 2, 1, 0, 1, b'i', 0, 0, 0, 0, 0, 0, 0, 1]);
        body.extend_from_slice(&[0, 0, 0, 8, 2, 3, 0, 1, b's', b'a', b'b', b'c']);
        let m = Msg::parse(&body).unwrap();
        assert_eq!(m.header.record_ttl, 100);
        assert_eq!(m.ops[0], OpRef { code: 2, ptype: 1, name: b"i", value: &[0, 0, 0, 0, 0, 0, 0, 1] });
        assert_eq!(m.ops[1], OpRef { code: 2, ptype: 3, name: b"s", value: b"abc" });
    }
}
