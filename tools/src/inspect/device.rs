//! Read-only access to a device or file: its size, its header, and whole-wblock reads
//! (O_DIRECT when the filesystem allows it, so the page cache neither serves stale data nor
//! fills up; buffered otherwise).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use ferrospike_engine::format::{DeviceHeader, WblockHeader, HEADER_COPY_STRIDE, WBLOCK_HEADER_BYTES};
use ferrospike_engine::io::AlignedBuf;
use ferrospike_engine::FormatError;

/// An open device, read-only.
pub struct Device {
    pub path: String,
    file: File,
    pub size_bytes: u64,
    pub direct: bool,
}

impl Device {
    pub fn open(path: &str) -> Result<Device, String> {
        let direct = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path);
        let (mut file, direct) = match direct {
            Ok(f) => (f, true),
            Err(_) => (File::open(path).map_err(|e| format!("cannot open {path}: {e}"))?, false),
        };
        // Block devices report a zero length in their metadata; seeking to the end works for both.
        let size_bytes = file.seek(SeekFrom::End(0)).map_err(|e| format!("cannot size {path}: {e}"))?;
        Ok(Device { path: path.into(), file, size_bytes, direct })
    }

    /// Read `len` bytes at `offset` (both multiples of 4096 when direct); a short read past
    /// the end leaves zeros.
    pub fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, String> {
        let mut buf = AlignedBuf::new(len);
        let mut done = 0usize;
        while done < len {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read error on {} at offset {}: {e}", self.path, offset + done as u64)),
            }
        }
        Ok(buf)
    }
}

/// Both header copies as decoded, and the one that wins (the valid copy with the larger
/// write sequence).
pub struct Headers {
    pub copies: [Result<DeviceHeader, FormatError>; 2],
}

impl Headers {
    pub fn read(dev: &Device) -> Result<Headers, String> {
        let b = dev.read(0, 2 * HEADER_COPY_STRIDE as usize)?;
        let s = HEADER_COPY_STRIDE as usize;
        Ok(Headers { copies: [DeviceHeader::decode(&b[..s]), DeviceHeader::decode(&b[s..])] })
    }

    pub fn best(&self) -> Option<&DeviceHeader> {
        self.copies.iter().filter_map(|c| c.as_ref().ok()).max_by_key(|h| h.write_seq)
    }
}

/// What the scan needs to verify records: the device id and index every checksum covers,
/// and the write-block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub device_id: u64,
    pub device_index: u32,
    pub wblock_bytes: u32,
    pub n_wblocks: u32,
    /// Where the identity came from: the header, or wblock headers (header unreadable).
    pub from_header: bool,
}

/// Wblocks sampled to recover the identity when the device header is unreadable.
const RECOVERY_SAMPLE_WBLOCKS: u32 = 4096;

/// The device's identity from its header, or, when the header is unreadable, from the most
/// common (device id, device index) among valid wblock headers (needs `wblock_override`).
pub fn identity(dev: &Device, headers: &Headers, wblock_override: Option<u32>) -> Result<Identity, String> {
    if let Some(h) = headers.best() {
        let wb = wblock_override.unwrap_or(h.wblock_bytes);
        if wb != h.wblock_bytes {
            eprintln!(
                "ferrospike-inspect: warning: --write-block-size {wb} differs from the header's {}",
                h.wblock_bytes
            );
        }
        let usable = h.device_bytes.min(dev.size_bytes);
        return Ok(Identity {
            device_id: h.device_id,
            device_index: h.device_index,
            wblock_bytes: wb,
            n_wblocks: (usable / wb as u64) as u32,
            from_header: true,
        });
    }
    let Some(wb) = wblock_override else {
        return Err(format!(
            "{}: the device header is unreadable ({}; {}); pass --write-block-size to scan the write blocks anyway",
            dev.path,
            err_text(&headers.copies[0]),
            err_text(&headers.copies[1])
        ));
    };
    let n = (dev.size_bytes / wb as u64) as u32;
    let mut seen: std::collections::HashMap<(u64, u32), u32> = std::collections::HashMap::new();
    for w in 1..n.min(RECOVERY_SAMPLE_WBLOCKS) {
        let b = dev.read(w as u64 * wb as u64, 4096)?;
        if let Ok(h) = WblockHeader::decode(&b[..WBLOCK_HEADER_BYTES]) {
            if h.wblock_id == w {
                *seen.entry((h.device_id, h.device_index)).or_default() += 1;
            }
        }
    }
    let Some(((device_id, device_index), _)) = seen.into_iter().max_by_key(|(_, c)| *c) else {
        return Err(format!("{}: the device header is unreadable and no valid write block header was found", dev.path));
    };
    eprintln!(
        "ferrospike-inspect: device header unreadable; using device id {device_id:#018x}, index {device_index} \
         from the write block headers"
    );
    Ok(Identity { device_id, device_index, wblock_bytes: wb, n_wblocks: n, from_header: false })
}

pub fn err_text<T>(r: &Result<T, FormatError>) -> String {
    match r {
        Ok(_) => "valid".into(),
        Err(e) => e.to_string(),
    }
}
