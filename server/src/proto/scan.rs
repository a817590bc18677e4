//! Scans and queries without a secondary-index filter (PROTOCOL.md §1.12).

use ferrospike_engine::types::N_PARTITIONS;
use ferrospike_engine::{Digest, ResultCode, ScanRecord};

use super::codes::*;
use super::msg::Msg;
use super::request::{check_fields, namespace, set_name};
use super::response::{op_bytes, write_field, write_op, RespHeader};

/// What to scan.
#[derive(Clone, Debug, PartialEq)]
pub struct ScanRequest<'a> {
    pub namespace: &'a str,
    /// Only records of this set; `None` = every set.
    pub set: Option<&'a str>,
    /// Partitions to scan, each with the digest to resume after.
    pub partitions: Vec<(u16, Option<Digest>)>,
    /// Most records to return in total; `None` = no limit.
    pub max_records: Option<u64>,
    /// Return no bins (metadata only).
    pub no_bins: bool,
    /// Return only these bins (empty = all).
    pub bins: Vec<String>,
}

pub fn parse_scan<'a>(m: &Msg<'a>) -> Result<ScanRequest<'a>, ResultCode> {
    let namespace = namespace(&m.fields)?;
    check_fields(&m.fields)?;
    if m.header.info2 & INFO2_WRITE != 0 {
        // Background scans with write ops.
        return Err(ResultCode::UnsupportedFeature);
    }
    let set = set_name(&m.fields)?;
    let mut partitions = Vec::new();
    let mut seen = vec![false; N_PARTITIONS];
    if let Some(pids) = m.field(FIELD_PID_ARRAY) {
        if pids.len() % 2 != 0 || pids.len() > 2 * N_PARTITIONS {
            return Err(ResultCode::Parameter);
        }
        for c in pids.chunks_exact(2) {
            let pid = u16::from_le_bytes([c[0], c[1]]);
            if pid as usize >= N_PARTITIONS || seen[pid as usize] {
                return Err(ResultCode::Parameter);
            }
            seen[pid as usize] = true;
            partitions.push((pid, None));
        }
    }
    if let Some(ds) = m.field(FIELD_DIGEST_ARRAY) {
        if ds.len() % 20 != 0 || ds.len() > 20 * N_PARTITIONS {
            return Err(ResultCode::Parameter);
        }
        for c in ds.chunks_exact(20) {
            let d = Digest(c.try_into().expect("20 bytes"));
            let pid = d.partition();
            if seen[pid as usize] {
                return Err(ResultCode::Parameter);
            }
            seen[pid as usize] = true;
            partitions.push((pid, Some(d)));
        }
    }
    if m.field(FIELD_PID_ARRAY).is_none() && m.field(FIELD_DIGEST_ARRAY).is_none() {
        // An old-style scan of the whole namespace.
        partitions = (0..N_PARTITIONS as u16).map(|p| (p, None)).collect();
    }
    let max_records = match m.field(FIELD_MAX_RECORDS) {
        None => None,
        Some(b) => match u64::from_be_bytes(b.try_into().map_err(|_| ResultCode::Parameter)?) {
            0 => None,
            n => Some(n),
        },
    };
    let no_bins = m.header.info1 & INFO1_GET_NO_BINS != 0;
    let mut bins = Vec::new();
    for op in &m.ops {
        if op.code != OP_READ {
            return Err(if op_unsupported(op.code) { ResultCode::UnsupportedFeature } else { ResultCode::Parameter });
        }
        if !op.name.is_empty() {
            bins.push(std::str::from_utf8(op.name).map_err(|_| ResultCode::BinName)?.to_string());
        }
    }
    Ok(ScanRequest { namespace, set: (!set.is_empty()).then_some(set), partitions, max_records, no_bins, bins })
}

/// Append one scan record message: NAMESPACE, DIGEST, SET if any, KEY if stored, then bins.
pub fn write_scan_record(out: &mut Vec<u8>, ns: &str, rec: &ScanRecord, no_bins: bool, only: &[String]) {
    let n_fields = 2 + !rec.set.is_empty() as u16 + rec.key.is_some() as u16;
    let selected = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let n_ops = if no_bins { 0 } else { rec.bins.iter().filter(|b| selected(&b.name)).count() };
    RespHeader {
        info1: if no_bins { INFO1_GET_NO_BINS } else { 0 },
        generation: rec.generation as u32,
        void_time: rec.void_time,
        n_fields,
        n_ops: n_ops.min(u16::MAX as usize) as u16,
        ..Default::default()
    }
    .write(out);
    write_field(out, FIELD_NAMESPACE, ns.as_bytes());
    write_field(out, FIELD_DIGEST, &rec.digest.0);
    if !rec.set.is_empty() {
        write_field(out, FIELD_SET, rec.set.as_bytes());
    }
    if let Some(k) = &rec.key {
        write_field(out, FIELD_KEY, k);
    }
    if !no_bins {
        for b in rec.bins.iter().filter(|b| selected(&b.name)).take(u16::MAX as usize) {
            write_op(out, OP_READ, &b.name, &b.value);
        }
    }
}

/// A value's size on the wire, for buffer budgeting.
pub fn record_wire_bytes(rec: &ScanRecord) -> usize {
    64 + rec.set.len()
        + rec.key.as_ref().map_or(0, Vec::len)
        + rec.bins.iter().map(|b| op_bytes(&b.name, &b.value)).sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::msg::{Field, MsgHeader};
    use ferrospike_engine::{Bin, Value};

    fn msg<'a>(fields: Vec<Field<'a>>) -> Msg<'a> {
        Msg {
            header: MsgHeader { info1: INFO1_READ, info3: INFO3_PARTITION_DONE, ..Default::default() },
            fields,
            ops: vec![],
        }
    }

    #[test]
    fn parses_partitions_resume_and_limits() {
        let pids: Vec<u8> = (0u16..4096).flat_map(|p| p.to_le_bytes()).collect();
        let m = msg(vec![
            Field { ftype: FIELD_NAMESPACE, data: b"test" },
            Field { ftype: FIELD_SET, data: b"demo" },
            Field { ftype: FIELD_PID_ARRAY, data: &pids },
        ]);
        let s = parse_scan(&m).unwrap();
        assert_eq!(s.partitions.len(), 4096);
        assert_eq!(s.set, Some("demo"));
        assert_eq!(s.max_records, None);

        let d = [0xec, 0x91, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20];
        let max = 10u64.to_be_bytes();
        let m = msg(vec![
            Field { ftype: FIELD_NAMESPACE, data: b"test" },
            Field { ftype: FIELD_SET, data: b"" },
            Field { ftype: FIELD_PID_ARRAY, data: &[1, 0] },
            Field { ftype: FIELD_DIGEST_ARRAY, data: &d },
            Field { ftype: FIELD_MAX_RECORDS, data: &max },
        ]);
        let s = parse_scan(&m).unwrap();
        assert_eq!(s.partitions, vec![(1, None), (492, Some(Digest(d)))]);
        assert_eq!(s.max_records, Some(10));
        assert_eq!(s.set, None);

        let m = msg(vec![
            Field { ftype: FIELD_NAMESPACE, data: b"test" },
            Field { ftype: FIELD_PID_ARRAY, data: &[0, 16] },
        ]);
        assert_eq!(parse_scan(&m), Err(ResultCode::Parameter));
        let m = msg(vec![Field { ftype: FIELD_NAMESPACE, data: b"test" }, Field { ftype: 21, data: b"idx" }]);
        assert_eq!(parse_scan(&m), Err(ResultCode::UnsupportedFeature));
    }

    #[test]
    fn encodes_the_captured_scan_record() {
        let rec = ScanRecord {
            digest: Digest([0xab; 20]),
            set: "demo".into(),
            key: Some(vec![1, 0, 0, 0, 0, 0, 0, 0, 42]),
            generation: 2,
            void_time: 0,
            bins: vec![Bin::new("x", Value::Int(7))],
        };
        let mut out = Vec::new();
        write_scan_record(&mut out, "test", &rec, false, &[]);
        assert_eq!(&out[..22], &[0x16, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 1]);
        assert_eq!(&out[22..31], &[0, 0, 0, 5, 0, b't', b'e', b's', b't']);
        assert_eq!(out.len(), 22 + 9 + 25 + 9 + 14 + 17);
        let mut out = Vec::new();
        write_scan_record(&mut out, "test", &rec, false, &["y".to_string()]);
        assert_eq!(out[21], 0);
    }
}
