//! Batch requests (field 41, PROTOCOL.md §1.11): rows decoded one at a time, so memory
//! does not grow with the number of rows.

use ferrospike_engine::{Digest, ResultCode};

use super::msg::{parse_fields, parse_ops};
use super::request::{single, Flags, SingleRequest};
use super::{ProtocolError, Reader};

pub const ROW_REPEAT: u8 = 0x01;
pub const ROW_HAS_EXTRA_INFO: u8 = 0x02;
pub const ROW_HAS_GENERATION: u8 = 0x04;
pub const ROW_HAS_RECORD_TTL: u8 = 0x08;
pub const ROW_HAS_INFO4: u8 = 0x10;

/// One row: its index in the client's key list and the command (or why it cannot run).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRow<'a> {
    pub index: u32,
    pub req: Result<SingleRequest<'a>, ResultCode>,
}

/// Iterator over the rows of a BATCH_INDEX field.
pub struct BatchRows<'a> {
    r: Reader<'a>,
    left: u32,
    prev: Option<Result<SingleRequest<'a>, ResultCode>>,
    /// Where the row `prev` came from starts (REPEAT rows copy it).
    prev_at: Option<usize>,
    failed: bool,
}

/// Where an iteration over a batch's rows stands, to go on later over the same bytes
/// without holding a borrow of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchCursor {
    pos: usize,
    left: u32,
    prev_at: Option<usize>,
}

impl<'a> BatchRows<'a> {
    pub fn new(data: &'a [u8]) -> Result<BatchRows<'a>, ProtocolError> {
        let mut r = Reader::new(data);
        let left = r.u32("batch row count")?;
        let _parent_flags = r.u8("batch flags")?;
        Ok(BatchRows { r, left, prev: None, prev_at: None, failed: false })
    }

    /// Where this iteration stands.
    pub fn cursor(&self) -> BatchCursor {
        BatchCursor { pos: self.r.position(), left: self.left, prev_at: self.prev_at }
    }

    /// Go on from `cursor` over the same `data` it was taken from.
    pub fn resume(data: &'a [u8], cursor: BatchCursor) -> Result<BatchRows<'a>, ProtocolError> {
        let mut rows =
            BatchRows { r: Reader::at(data, cursor.pos), left: cursor.left, prev: None, prev_at: None, failed: false };
        if let Some(at) = cursor.prev_at {
            // Decode the row REPEAT rows refer to again (it is a full row).
            let mut again = BatchRows { r: Reader::at(data, at), left: 1, prev: None, prev_at: None, failed: false };
            again.row()?;
            rows.prev = again.prev;
            rows.prev_at = Some(at);
        }
        Ok(rows)
    }

    /// Rows still to come, as the client announced them.
    pub fn announced(&self) -> u32 {
        self.left
    }

    /// Walk every row once without keeping any, to refuse a malformed batch before
    /// executing part of it.
    pub fn validate(data: &'a [u8]) -> Result<u32, ProtocolError> {
        let mut rows = BatchRows::new(data)?;
        let mut n = 0u32;
        for row in &mut rows {
            row?;
            n += 1;
        }
        if rows.r.remaining() != 0 {
            return Err(ProtocolError::Malformed("bytes after the last batch row"));
        }
        Ok(n)
    }

    fn row(&mut self) -> Result<BatchRow<'a>, ProtocolError> {
        let start = self.r.position();
        let index = self.r.u32("batch row index")?;
        let digest = Digest(self.r.bytes(20, "batch row digest")?.try_into().expect("20 bytes"));
        let flags = self.r.u8("batch row flags")?;
        if flags & ROW_REPEAT != 0 {
            let mut req = self.prev.clone().ok_or(ProtocolError::Malformed("first batch row repeats"))?;
            if let Ok(r) = req.as_mut() {
                r.cmd.digest = digest;
            }
            return Ok(BatchRow { index, req });
        }
        let info1 = self.r.u8("batch row")?;
        let (info2, info3) =
            if flags & ROW_HAS_EXTRA_INFO != 0 { (self.r.u8("batch row")?, self.r.u8("batch row")?) } else { (0, 0) };
        let info4 = if flags & ROW_HAS_INFO4 != 0 { self.r.u8("batch row")? } else { 0 };
        let generation = if flags & ROW_HAS_GENERATION != 0 { self.r.u16("batch row")? as u32 } else { 0 };
        let record_ttl = if flags & ROW_HAS_RECORD_TTL != 0 { self.r.u32("batch row")? } else { 0 };
        let n_fields = self.r.u16("batch row")? as usize;
        let n_ops = self.r.u16("batch row")? as usize;
        let fields = parse_fields(&mut self.r, n_fields)?;
        let ops = parse_ops(&mut self.r, n_ops)?;
        let f = Flags { info1, info2, info3, info4, generation, record_ttl };
        let req = single(&f, &fields, &ops, Some(digest));
        self.prev = Some(req.clone());
        self.prev_at = Some(start);
        Ok(BatchRow { index, req })
    }
}

impl<'a> Iterator for BatchRows<'a> {
    type Item = Result<BatchRow<'a>, ProtocolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 || self.failed {
            return None;
        }
        self.left -= 1;
        let r = self.row();
        self.failed = r.is_err();
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::codes::*;

    fn ns_set() -> Vec<u8> {
        let mut v = vec![0, 0, 0, 5, 0];
        v.extend_from_slice(b"test");
        v.extend_from_slice(&[0, 0, 0, 5, 1]);
        v.extend_from_slice(b"demo");
        v
    }

    /// The start of the captured Python batch body: a full row, then two REPEAT rows.
    fn python_batch() -> Vec<u8> {
        let mut b = vec![0, 0, 0, 3, 0x0d];
        b.extend_from_slice(&[0, 0, 0, 0]);
        b.extend_from_slice(&[1; 20]);
        b.extend_from_slice(&[0x0a, 0x03, 0, 0, 0, 0, 0, 0, 0, 0x02, 0, 0]);
        b.extend_from_slice(&ns_set());
        b.extend_from_slice(&[0, 0, 0, 1]);
        b.extend_from_slice(&[2; 20]);
        b.push(ROW_REPEAT);
        b.extend_from_slice(&[0, 0, 0, 2]);
        b.extend_from_slice(&[3; 20]);
        b.push(ROW_REPEAT);
        b
    }

    #[test]
    fn decodes_rows_with_repeat() {
        let b = python_batch();
        assert_eq!(BatchRows::validate(&b), Ok(3));
        let rows: Vec<_> = BatchRows::new(&b).unwrap().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 3);
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(row.index, i as u32);
            let r = row.req.as_ref().unwrap();
            assert_eq!(r.namespace, "test");
            assert!(r.cmd.read_all);
            assert_eq!(r.cmd.digest.0, [i as u8 + 1; 20]);
        }
    }

    #[test]
    fn resuming_at_every_row_gives_the_same_rows() {
        let b = python_batch();
        let all: Vec<_> = BatchRows::new(&b).unwrap().map(Result::unwrap).collect();
        for stop in 0..=all.len() {
            let mut first = BatchRows::new(&b).unwrap();
            let mut got: Vec<_> = (&mut first).take(stop).map(Result::unwrap).collect();
            let cursor = first.cursor();
            got.extend(BatchRows::resume(&b, cursor).unwrap().map(Result::unwrap));
            assert_eq!(got, all, "resumed after {stop} rows");
        }
    }

    #[test]
    fn write_rows_and_damage() {
        let mut b = vec![0, 0, 0, 1, 0x0d, 0, 0, 0, 7];
        b.extend_from_slice(&[9; 20]);
        b.extend_from_slice(&[0x0e, INFO1_READ, INFO2_WRITE | INFO2_RESPOND_ALL_OPS, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1]);
        b.extend_from_slice(&ns_set());
        b.extend_from_slice(&[0, 0, 0, 0x0d, 2, 1, 0, 1, b'x', 0, 0, 0, 0, 0, 0, 0, 5]);
        let rows: Vec<_> = BatchRows::new(&b).unwrap().map(Result::unwrap).collect();
        let r = rows[0].req.as_ref().unwrap();
        assert_eq!(rows[0].index, 7);
        assert!(r.cmd.is_write() && r.cmd.respond_all_ops);
        for cut in 0..b.len() {
            assert!(BatchRows::validate(&b[..cut]).is_err(), "cut {cut}");
        }
        let mut rep = vec![0, 0, 0, 1, 0x0d, 0, 0, 0, 0];
        rep.extend_from_slice(&[1; 20]);
        rep.push(ROW_REPEAT);
        assert!(BatchRows::validate(&rep).is_err());
        // A row count far beyond the data fails on the data, without allocating for it.
        assert!(BatchRows::validate(&[0xff, 0xff, 0xff, 0xff, 0]).is_err());
    }
}
