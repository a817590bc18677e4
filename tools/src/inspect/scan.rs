//! Walking write blocks: the engine's own cold-start parser (`coldstart::scan_wblock`) for
//! the counts, and a second walk that locates the damaged records so they can be named.

use std::time::{Duration, Instant};

use ferrospike_engine::coldstart::{scan_wblock, WblockScan};
use ferrospike_engine::format::{
    claimed_wblock_seq, padded, verify_record, RecordLoc, RECORD_HEADER_BYTES, RECORD_MAGIC, WBLOCK_HEADER_BYTES,
};
use ferrospike_engine::{Digest, FormatError};

use super::device::{Device, Identity};

/// A record that failed verification inside the part of a wblock its current use wrote.
#[derive(Debug, Clone)]
pub struct Damaged {
    pub wblock: u32,
    pub offset: u32,
    /// The digest the damaged header claims (unverified: the header itself may be hit).
    pub digest: Option<Digest>,
    /// Torn: part of the record reads as an all-zero 4 KiB page (a write that did not land
    /// whole); otherwise corrupt (bytes changed).
    pub torn: bool,
    pub reason: String,
}

fn page_is_zero(buf: &[u8], page_start: usize) -> bool {
    buf[page_start..(page_start + 4096).min(buf.len())].iter().all(|&b| b == 0)
}

/// The damaged records of one wblock image, by the same rules as the cold start: a record
/// whose magic is present but that does not verify, lying before the end of the current
/// use's last good record or claiming the current use's sequence.
pub fn damaged_records(buf: &[u8], id: &Identity, w: u32, scan: &WblockScan) -> Vec<Damaged> {
    let current_end = scan.records.iter().map(|r| r.1 as usize + r.2 as usize).max().unwrap_or(0);
    let mut out = Vec::new();
    let mut pos = WBLOCK_HEADER_BYTES;
    while pos + RECORD_HEADER_BYTES <= buf.len() {
        if pos.is_multiple_of(4096) && page_is_zero(buf, pos) {
            pos += 4096;
            continue;
        }
        if buf[pos..pos + 4] == RECORD_MAGIC {
            let claimed = claimed_wblock_seq(&buf[pos..]);
            let loc = RecordLoc {
                device_id: id.device_id,
                device_index: id.device_index,
                wblock_id: w,
                wblock_seq: claimed,
                offset: pos as u32,
            };
            match verify_record(&buf[pos..], &loc, buf.len() - pos) {
                Ok((_, len)) => {
                    pos += padded(len);
                    continue;
                }
                Err(e) => {
                    if pos < current_end || claimed == scan.seq {
                        out.push(describe(buf, w, pos, e));
                    }
                }
            }
        }
        pos += 16;
    }
    out
}

fn describe(buf: &[u8], w: u32, pos: usize, e: FormatError) -> Damaged {
    let mut d = [0u8; 20];
    d.copy_from_slice(&buf[pos + 32..pos + 52]);
    let len = u32::from_le_bytes(buf[pos + 4..pos + 8].try_into().expect("4 bytes")) as usize;
    let end =
        if (RECORD_HEADER_BYTES..=buf.len() - pos).contains(&len) { pos + len } else { pos + RECORD_HEADER_BYTES };
    let first_page = pos / 4096 * 4096;
    let torn = (first_page..end).step_by(4096).any(|p| page_is_zero(buf, p));
    Damaged { wblock: w, offset: pos as u32, digest: Some(Digest(d)), torn, reason: e.to_string() }
}

/// Read every data wblock in order and hand it to `visit`, with progress on stderr once a
/// second.
pub fn for_each_wblock(
    dev: &Device,
    id: &Identity,
    what: &str,
    mut visit: impl FnMut(u32, &[u8], WblockScan),
) -> Result<(), String> {
    let wb = id.wblock_bytes as usize;
    let total = id.n_wblocks.saturating_sub(1) as u64 * wb as u64;
    let started = Instant::now();
    let mut last = started;
    for w in 1..id.n_wblocks {
        let buf = dev.read(w as u64 * wb as u64, wb)?;
        let scan = scan_wblock(&buf, id.device_id, id.device_index, w);
        visit(w, &buf, scan);
        if last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            let done = (w as u64) * wb as u64;
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "ferrospike-inspect: {what}: {} of {} MiB ({:.0}%, {:.0} MiB/s)",
                done >> 20,
                total >> 20,
                done as f64 * 100.0 / total.max(1) as f64,
                (done >> 20) as f64 / secs
            );
        }
    }
    Ok(())
}
