//! Opening devices: raw block devices and fixed-size files, both with `O_DIRECT`.
//!
//! Nothing about a device is assumed. Its size comes from `BLKGETSIZE64` (or the file length),
//! its alignment from `BLKSSZGET` and `statx(STATX_DIOALIGN)`, or, where the kernel reports
//! no DIO alignment, from trial `O_DIRECT` reads. Before any device is opened,
//! [`probe_uring`] checks that io_uring is usable and supports every opcode we rely on, and
//! turns each way it can be forbidden into an error naming the cause and the fix.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use io_uring::{opcode, IoUring, Probe};

use super::buf::{AlignedBuf, BUF_ALIGN};
use super::uring::{memlock_limit, UringBackend};
use super::{DevId, DeviceInfo, DeviceSet, IoBackend, IoOp, IoRequest, Wake};
use crate::error::DeviceError;

/// Smallest alignment we ever use, whatever a device reports.
const MIN_IO_ALIGN: u32 = 512;

/// Largest single transfer accepted (Linux caps one read/write at `0x7fff_f000` bytes).
pub const MAX_IO_BYTES: usize = 1 << 30;

/// Entries of the throw-away ring used by [`probe_uring`].
const PROBE_RING_ENTRIES: u32 = 4;

/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)` with the generic ioctl encoding (x86, arm,
/// riscv …); libc does not export it.
#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
)))]
const BLKGETSIZE64: libc::Ioctl = ((2 << 30) | (8 << 16) | (0x12 << 8) | 114) as libc::Ioctl;
/// The same with the mips/powerpc/sparc encoding (read direction is 2 << 29, 13 size bits).
#[cfg(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
))]
const BLKGETSIZE64: libc::Ioctl = ((2 << 29) | (8 << 16) | (0x12 << 8) | 114) as libc::Ioctl;

/// One configured device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub path: PathBuf,
    /// `None`: a raw block device (or an existing non-empty file used at its current length).
    /// `Some(size)`: a regular file of that size, created (sparse) when missing.
    pub file_size: Option<u64>,
}

/// The opened devices of one namespace. The fds stay open for the life of the set; each
/// backend registers them with its own ring.
#[derive(Debug)]
pub struct FileDevices {
    fds: Vec<OwnedFd>,
    infos: Vec<DeviceInfo>,
    uring_entries: u32,
}

impl FileDevices {
    /// The raw fd of device `dev` (owned by this set; do not close it).
    pub fn device_fd(&self, dev: DevId) -> RawFd {
        self.fds[dev as usize].as_raw_fd()
    }

    /// One line per device for start-up logs.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .infos
            .iter()
            .map(|d| {
                format!(
                    "{} ({}, {} bytes, io_align {}, physical block {})",
                    d.path,
                    if d.is_block_device { "block device" } else { "file" },
                    d.size_bytes,
                    d.io_align,
                    d.physical_block
                )
            })
            .collect();
        format!("{} device(s), ring of {} entries: {}", self.infos.len(), self.uring_entries, parts.join("; "))
    }
}

impl DeviceSet for FileDevices {
    fn devices(&self) -> &[DeviceInfo] {
        &self.infos
    }

    fn open_backend(
        &self,
        wake: Option<Wake>,
        arena_slot_bytes: usize,
        arena_slots: usize,
    ) -> Result<Box<dyn IoBackend>, DeviceError> {
        let fds: Vec<RawFd> = self.fds.iter().map(|f| f.as_raw_fd()).collect();
        let backend =
            UringBackend::new(self.uring_entries, &fds, self.infos.clone(), wake, arena_slot_bytes, arena_slots)?;
        Ok(Box::new(backend))
    }
}

/// Probe io_uring, then open every device. `uring_entries` is the SQ size of each backend's
/// ring (the CQ gets four times as many).
pub fn open_devices(specs: &[DeviceSpec], uring_entries: u32) -> Result<FileDevices, DeviceError> {
    if specs.is_empty() {
        return Err(DeviceError::Other("no devices configured".into()));
    }
    assert!(u32::try_from(specs.len()).is_ok(), "too many devices");
    probe_uring()?;
    let mut fds = Vec::with_capacity(specs.len());
    let mut infos = Vec::with_capacity(specs.len());
    for spec in specs {
        let (fd, info) = open_one(spec)?;
        tracing::info!(
            path = %info.path,
            size_bytes = info.size_bytes,
            io_align = info.io_align,
            physical_block = info.physical_block,
            block_device = info.is_block_device,
            "device opened"
        );
        fds.push(fd);
        infos.push(info);
    }
    Ok(FileDevices { fds, infos, uring_entries })
}

// ---------------------------------------------------------------------------------------------
// io_uring probe

/// The opcodes Ferrospike submits: device I/O now, network I/O on the same ring later.
const NEEDED_OPCODES: [(u8, &str); 9] = [
    (opcode::Read::CODE, "Read"),
    (opcode::Write::CODE, "Write"),
    (opcode::Fsync::CODE, "Fsync"),
    (opcode::ReadFixed::CODE, "ReadFixed"),
    (opcode::WriteFixed::CODE, "WriteFixed"),
    (opcode::Accept::CODE, "Accept"),
    (opcode::Recv::CODE, "Recv"),
    (opcode::Send::CODE, "Send"),
    (opcode::PollAdd::CODE, "PollAdd"),
];

/// Check that io_uring can be used by this process and supports every opcode and feature
/// the engine relies on. The error names the cause and the fix.
pub fn probe_uring() -> Result<(), DeviceError> {
    let ring: IoUring = IoUring::builder().build(PROBE_RING_ENTRIES).map_err(|e| explain_setup_error(&e))?;
    if !ring.params().is_feature_ext_arg() {
        return Err(DeviceError::UringUnavailable {
            reason: "the kernel lacks IORING_FEAT_EXT_ARG (waiting with a timeout, Linux 5.11)".into(),
            fix: "run on Linux 5.11 or later (6.1 or later recommended)".into(),
        });
    }
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| DeviceError::UringUnavailable {
        reason: format!("IORING_REGISTER_PROBE failed ({e}); the kernel is older than Linux 5.6"),
        fix: "run on Linux 5.11 or later (6.1 or later recommended)".into(),
    })?;
    let missing: Vec<&str> =
        NEEDED_OPCODES.iter().filter(|(code, _)| !probe.is_supported(*code)).map(|(_, name)| *name).collect();
    if !missing.is_empty() {
        return Err(DeviceError::UringUnavailable {
            reason: format!("the kernel's io_uring does not support the opcode(s) {}", missing.join(", ")),
            fix: "run on Linux 6.1 or later; if a security module filters io_uring opcodes \
                  (io_uring restrictions, LSM policy), allow these"
                .into(),
        });
    }
    Ok(())
}

/// Turn a failed `io_uring_setup` into an actionable error, reading the sysctls that can
/// forbid io_uring.
pub(super) fn explain_setup_error(e: &io::Error) -> DeviceError {
    let disabled = read_sysctl("/proc/sys/kernel/io_uring_disabled");
    let group = read_sysctl("/proc/sys/kernel/io_uring_group");
    explain_setup_errno(e.raw_os_error(), &e.to_string(), disabled, group, memlock_limit())
}

/// The decision table behind [`explain_setup_error`], separate so it can be tested.
fn explain_setup_errno(
    errno: Option<i32>,
    text: &str,
    disabled: Option<i64>,
    group: Option<i64>,
    memlock: Option<u64>,
) -> DeviceError {
    let (reason, fix) = match errno {
        Some(libc::EPERM) => match disabled {
            Some(2) => (
                "io_uring_setup failed with EPERM: io_uring is disabled system-wide (kernel.io_uring_disabled = 2)"
                    .to_string(),
                "run `sysctl -w kernel.io_uring_disabled=0` (and persist it in /etc/sysctl.d/)".to_string(),
            ),
            Some(1) => {
                let g = group.map_or_else(|| "?".to_string(), |g| g.to_string());
                (
                    format!(
                        "io_uring_setup failed with EPERM: io_uring is restricted to the group with gid {g} \
                         (kernel.io_uring_disabled = 1, kernel.io_uring_group = {g}) and this process is not in it"
                    ),
                    format!("run the server as a member of gid {g}, or run `sysctl -w kernel.io_uring_disabled=0`"),
                )
            }
            _ => (
                "io_uring_setup failed with EPERM although kernel.io_uring_disabled allows it: a seccomp \
                 filter most likely forbids io_uring (container runtimes' default profiles do)"
                    .to_string(),
                "allow the syscalls io_uring_setup, io_uring_enter and io_uring_register in the seccomp \
                 profile (e.g. `docker run --security-opt seccomp=<profile allowing them>`)"
                    .to_string(),
            ),
        },
        Some(libc::ENOSYS) => (
            "io_uring_setup is not implemented (ENOSYS): the kernel is older than 5.1 or built without \
             CONFIG_IO_URING, or a seccomp filter answers ENOSYS for it"
                .to_string(),
            "run on Linux 6.1 or later with io_uring enabled; in a container, allow io_uring_setup, \
             io_uring_enter and io_uring_register in the seccomp profile"
                .to_string(),
        ),
        Some(libc::ENOMEM) => (
            format!(
                "io_uring_setup failed with ENOMEM: the ring's memory could not be allocated; for a process \
                 without CAP_IPC_LOCK the kernel charges it to RLIMIT_MEMLOCK, which is {}",
                memlock.map_or_else(|| "unlimited".to_string(), |l| format!("{l} bytes"))
            ),
            "raise the locked-memory limit (`ulimit -l`, systemd LimitMEMLOCK=, docker --ulimit memlock=) \
             or grant CAP_IPC_LOCK"
                .to_string(),
        ),
        _ => (
            format!("io_uring_setup failed: {text}"),
            "check the kernel log (dmesg) and the kernel version".to_string(),
        ),
    };
    DeviceError::UringUnavailable { reason, fix }
}

fn read_sysctl(path: &str) -> Option<i64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Opening one device

fn open_one(spec: &DeviceSpec) -> Result<(OwnedFd, DeviceInfo), DeviceError> {
    let path = spec.path.display().to_string();
    match fs::metadata(&spec.path) {
        Ok(md) if md.file_type().is_block_device() => {
            if let Some(size) = spec.file_size {
                tracing::warn!(%path, size, "a file size is configured for a block device; ignoring it");
            }
            open_block(&spec.path, &path)
        }
        Ok(md) if md.is_file() => open_file(spec, &path, Some(md.len())),
        Ok(_) => Err(DeviceError::Open {
            path,
            source: io::Error::new(io::ErrorKind::InvalidInput, "neither a block device nor a regular file"),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound && spec.file_size.is_some() => open_file(spec, &path, None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(DeviceError::Open {
            path,
            source: io::Error::new(
                io::ErrorKind::NotFound,
                "no such block device (configure a file size to have a file created here)",
            ),
        }),
        Err(source) => Err(DeviceError::Open { path, source }),
    }
}

/// Open a raw block device exclusively and ask the kernel for its size and block sizes.
fn open_block(p: &Path, path: &str) -> Result<(OwnedFd, DeviceInfo), DeviceError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_EXCL | libc::O_CLOEXEC)
        .open(p)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EBUSY) => DeviceError::Busy { path: path.to_string(), source },
            Some(libc::EINVAL) => DeviceError::NoDirectIo { path: path.to_string(), source },
            _ => DeviceError::Open { path: path.to_string(), source },
        })?;
    let fd = OwnedFd::from(file);
    let raw = fd.as_raw_fd();
    let ioctl_err = |what: &str, source: io::Error| DeviceError::Open {
        path: path.to_string(),
        source: io::Error::new(source.kind(), format!("{what}: {source}")),
    };

    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local;
    // the fd is owned and open.
    if unsafe { libc::ioctl(raw, BLKGETSIZE64, &mut size as *mut u64) } != 0 {
        return Err(ioctl_err("ioctl BLKGETSIZE64", io::Error::last_os_error()));
    }
    let mut logical: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live local.
    if unsafe { libc::ioctl(raw, libc::BLKSSZGET, &mut logical as *mut libc::c_int) } != 0 {
        return Err(ioctl_err("ioctl BLKSSZGET", io::Error::last_os_error()));
    }
    let mut physical: libc::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one unsigned int through the pointer, which points to a live
    // local.
    if unsafe { libc::ioctl(raw, libc::BLKPBSZGET, &mut physical as *mut libc::c_uint) } != 0 {
        return Err(ioctl_err("ioctl BLKPBSZGET", io::Error::last_os_error()));
    }
    let logical = u32::try_from(logical).unwrap_or(0);
    let dio = statx_dio_align(raw);
    let offset_align = match dio {
        Some((off, _mem)) => off.max(logical),
        None => logical,
    };
    if offset_align == 0 {
        return Err(DeviceError::Other(format!("{path}: the kernel reports a logical block size of 0")));
    }
    let info = finish_info(path, size, offset_align, dio.map(|d| d.1), physical.max(logical), true)?;
    Ok((fd, info))
}

/// Open (creating or extending when allowed) a regular file of the configured size.
fn open_file(spec: &DeviceSpec, path: &str, existing_len: Option<u64>) -> Result<(OwnedFd, DeviceInfo), DeviceError> {
    let open_err = |source: io::Error| DeviceError::Open { path: path.to_string(), source };
    match (existing_len, spec.file_size) {
        (_, Some(0)) => {
            return Err(open_err(io::Error::new(io::ErrorKind::InvalidInput, "configured file size is 0")));
        }
        (None, Some(size)) => {
            if let Some(parent) = spec.path.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(open_err)?;
            }
            let f = OpenOptions::new().write(true).create(true).truncate(false).open(&spec.path).map_err(open_err)?;
            let len = f.metadata().map_err(open_err)?.len();
            if len == 0 {
                f.set_len(size).map_err(open_err)?;
            } else if len != size {
                // Someone created it between our stat and our open.
                return Err(DeviceError::SizeMismatch { path: path.to_string(), actual: len, configured: size });
            }
        }
        (Some(0), Some(size)) => {
            let f = OpenOptions::new().write(true).open(&spec.path).map_err(open_err)?;
            f.set_len(size).map_err(open_err)?;
        }
        (Some(len), Some(size)) if len != size => {
            return Err(DeviceError::SizeMismatch { path: path.to_string(), actual: len, configured: size });
        }
        (Some(0), None) => {
            return Err(open_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the file is empty and no file size is configured",
            )));
        }
        (Some(_), _) => {}
        (None, None) => unreachable!("open_one only creates files with a configured size"),
    }

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(&spec.path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EINVAL) => DeviceError::NoDirectIo { path: path.to_string(), source },
            _ => DeviceError::Open { path: path.to_string(), source },
        })?;
    let md = file.metadata().map_err(open_err)?;
    let size = md.len();
    let fd = OwnedFd::from(file);
    let dio = statx_dio_align(fd.as_raw_fd());
    let offset_align = match dio {
        Some((off, _)) => off,
        None => probe_dio_align(fd.as_raw_fd(), size, path)?,
    };
    let physical = u32::try_from(md.blksize()).unwrap_or(u32::MAX);
    let info = finish_info(path, size, offset_align, dio.map(|d| d.1), physical, false)?;
    Ok((fd, info))
}

/// Check the alignment numbers and build the [`DeviceInfo`]. The usable size is rounded
/// down to the alignment.
fn finish_info(
    path: &str,
    size: u64,
    offset_align: u32,
    mem_align: Option<u32>,
    physical_block: u32,
    is_block_device: bool,
) -> Result<DeviceInfo, DeviceError> {
    let io_align = offset_align.max(MIN_IO_ALIGN);
    if !io_align.is_power_of_two() || io_align as usize > BUF_ALIGN {
        return Err(DeviceError::Other(format!(
            "{path}: direct I/O alignment {io_align} is not a power of two of at most {BUF_ALIGN} bytes"
        )));
    }
    if let Some(mem) = mem_align.filter(|&m| m as usize > BUF_ALIGN) {
        return Err(DeviceError::Other(format!(
            "{path}: direct I/O needs buffers aligned to {mem} bytes, more than the {BUF_ALIGN} this build provides"
        )));
    }
    let size_bytes = size - size % u64::from(io_align);
    if size_bytes != size {
        tracing::warn!(path, size, size_bytes, io_align, "size is not a multiple of the I/O alignment; using less");
    }
    if size_bytes == 0 {
        return Err(DeviceError::Other(format!("{path}: usable size is 0 bytes (size {size}, alignment {io_align})")));
    }
    Ok(DeviceInfo { path: path.to_string(), size_bytes, io_align, physical_block, is_block_device })
}

/// `(offset alignment, memory alignment)` from `statx(STATX_DIOALIGN)`, when the kernel
/// (6.1+) and the filesystem fill it in. `None` means "unknown": probe instead.
fn statx_dio_align(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated empty string, AT_EMPTY_PATH makes statx use
    // the fd (owned by the caller and open), and stx is a live, writable statx buffer.
    let rc = unsafe { libc::statx(fd, c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_offset_align, stx.stx_dio_mem_align))
}

/// Find the smallest transfer size an `O_DIRECT` read at offset 0 accepts (512 to 4096).
fn probe_dio_align(fd: RawFd, size: u64, path: &str) -> Result<u32, DeviceError> {
    let mut buf = AlignedBuf::new(BUF_ALIGN);
    let mut last = io::Error::from_raw_os_error(libc::EINVAL);
    for candidate in [512u32, 1024, 2048, 4096] {
        if u64::from(candidate) > size {
            break;
        }
        // SAFETY: buf is a live allocation of BUF_ALIGN >= candidate bytes; the fd is open.
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), candidate as usize, 0) };
        if n >= 0 {
            return Ok(candidate);
        }
        last = io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::EINVAL) {
            return Err(DeviceError::Io { path: path.to_string(), offset: 0, len: candidate as usize, source: last });
        }
    }
    Err(DeviceError::NoDirectIo { path: path.to_string(), source: last })
}

// ---------------------------------------------------------------------------------------------
// Request checks shared by both backends

/// `x` is a multiple of `align`, a power of two.
pub(super) fn is_aligned(x: u64, align: u64) -> bool {
    debug_assert!(align.is_power_of_two(), "alignment {align} is not a power of two");
    x & (align - 1) == 0
}

/// Assert that `req` is well formed for `devices`: alignment of offset, length and buffer
/// address to the device's `io_align`, bounds, and a frozen write range. Violations are
/// programmer errors, so this panics; both backends call it on `push` so that alignment bugs
/// show up in simulated runs too.
pub(super) fn assert_request(devices: &[DeviceInfo], req: &IoRequest) {
    let info =
        devices.get(req.dev as usize).unwrap_or_else(|| panic!("request for device {} of {}", req.dev, devices.len()));
    let (addr, len) = match &req.op {
        IoOp::Read { buf } => (buf.as_ptr() as usize, buf.len()),
        IoOp::Write { buf, start, end, .. } => {
            assert!(start < end, "empty write [{start}, {end}) on {}", info.path);
            (buf.io_ptr(*start, *end) as usize, end - start)
        }
        IoOp::Fsync => return,
    };
    let align = info.io_align as usize;
    assert!(len > 0, "zero-length I/O on {} at offset {}", info.path, req.offset);
    assert!(len <= MAX_IO_BYTES, "I/O of {len} bytes on {} exceeds the {MAX_IO_BYTES}-byte bound", info.path);
    assert!(
        is_aligned(req.offset, align as u64)
            && is_aligned(len as u64, align as u64)
            && is_aligned(addr as u64, align as u64),
        "misaligned I/O on {}: offset {}, length {len}, buffer address {addr:#x}; io_align is {align}",
        info.path,
        req.offset
    );
    assert!(
        req.offset.checked_add(len as u64).is_some_and(|end| end <= info.size_bytes),
        "I/O past the end of {}: offset {} + {len} bytes > size {}",
        info.path,
        req.offset,
        info.size_bytes
    );
}

// ---------------------------------------------------------------------------------------------
// Test support

/// Where tests put their device files: `$FERROSPIKE_TEST_DIR` when set, else the system temp
/// directory when `O_DIRECT` works there (it does not on tmpfs), else `target/test-io` in the
/// workspace. The choice is printed once per test that asks.
#[cfg(test)]
pub(crate) fn test_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERROSPIKE_TEST_DIR") {
        let dir = PathBuf::from(dir);
        fs::create_dir_all(&dir).expect("create FERROSPIKE_TEST_DIR");
        eprintln!("test files under {} (FERROSPIKE_TEST_DIR)", dir.display());
        return dir;
    }
    let tmp = std::env::temp_dir().join("ferrospike-test-io");
    if fs::create_dir_all(&tmp).is_ok() && direct_io_works_in(&tmp) {
        eprintln!("test files under {} (O_DIRECT works there)", tmp.display());
        return tmp;
    }
    let fallback = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/test-io"));
    fs::create_dir_all(&fallback).expect("create target/test-io");
    eprintln!("test files under {} (O_DIRECT does not work in {})", fallback.display(), tmp.display());
    fallback
}

#[cfg(test)]
fn direct_io_works_in(dir: &Path) -> bool {
    let p = dir.join(format!("odirect-probe-{}", std::process::id()));
    let ok = (|| -> io::Result<bool> {
        fs::File::create(&p)?.set_len(4096)?;
        let f = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&p)?;
        let mut buf = AlignedBuf::new(4096);
        // SAFETY: buf is a live 4096-byte allocation; f is open.
        let n = unsafe { libc::pread(f.as_raw_fd(), buf.as_mut_ptr().cast(), 4096, 0) };
        Ok(n == 4096)
    })()
    .unwrap_or(false);
    let _ = fs::remove_file(&p);
    ok
}

/// A unique path for one test's device file.
#[cfg(test)]
pub(crate) fn test_path(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    test_dir().join(format!("{name}-{}-{n}.img", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uring_probe_passes_on_this_machine() {
        // The whole suite relies on io_uring; say why if it is missing.
        if let Err(e) = probe_uring() {
            panic!("io_uring unusable here: {e}");
        }
    }

    #[test]
    fn setup_errors_name_the_cause_and_the_fix() {
        let msg = |errno, disabled, group| explain_setup_errno(Some(errno), "x", disabled, group, Some(0)).to_string();
        let m = msg(libc::EPERM, Some(2), None);
        assert!(m.contains("io_uring_disabled = 2") && m.contains("sysctl -w kernel.io_uring_disabled=0"), "{m}");
        let m = msg(libc::EPERM, Some(1), Some(1234));
        assert!(m.contains("gid 1234") && m.contains("io_uring_disabled=0"), "{m}");
        let m = msg(libc::EPERM, Some(0), None);
        assert!(m.contains("seccomp") && m.contains("io_uring_setup, io_uring_enter and io_uring_register"), "{m}");
        let m = msg(libc::ENOSYS, None, None);
        assert!(m.contains("ENOSYS") && m.contains("CONFIG_IO_URING"), "{m}");
        let m = msg(libc::ENOMEM, None, None);
        assert!(m.contains("ulimit -l") && m.contains("RLIMIT_MEMLOCK, which is 0 bytes"), "{m}");
    }

    #[test]
    fn missing_file_is_created_sparse_with_its_parent_dir() {
        let dir = test_path("newdir");
        let path = dir.join("sub").join("dev.img");
        let devs = open_devices(&[DeviceSpec { path: path.clone(), file_size: Some(64 << 20) }], 32).unwrap();
        let info = &devs.devices()[0];
        assert_eq!(info.size_bytes, 64 << 20);
        assert!(!info.is_block_device);
        assert!(info.io_align >= 512 && info.io_align.is_power_of_two());
        let md = fs::metadata(&path).unwrap();
        assert_eq!(md.len(), 64 << 20);
        assert!(md.blocks() * 512 < 1 << 20, "file should be sparse, has {} blocks", md.blocks());
        assert!(devs.describe().contains("file"));
        assert!(devs.device_fd(0) >= 0);
        drop(devs);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn existing_empty_file_is_extended_and_wrong_size_refused() {
        let path = test_path("sizes");
        fs::File::create(&path).unwrap();
        let spec = DeviceSpec { path: path.clone(), file_size: Some(1 << 20) };
        let devs = open_devices(std::slice::from_ref(&spec), 8).unwrap();
        assert_eq!(devs.devices()[0].size_bytes, 1 << 20);
        drop(devs);
        // Same size again: fine. Another size: refused, naming both.
        open_devices(std::slice::from_ref(&spec), 8).unwrap();
        let err = open_devices(&[DeviceSpec { path: path.clone(), file_size: Some(2 << 20) }], 8).unwrap_err();
        match &err {
            DeviceError::SizeMismatch { actual, configured, .. } => {
                assert_eq!((*actual, *configured), (1 << 20, 2 << 20));
            }
            other => panic!("expected SizeMismatch, got {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("1048576") && msg.contains("2097152"), "{msg}");
        // No size configured: an existing non-empty file is used at its length.
        let devs = open_devices(&[DeviceSpec { path: path.clone(), file_size: None }], 8).unwrap();
        assert_eq!(devs.devices()[0].size_bytes, 1 << 20);
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn missing_block_device_is_a_clear_error() {
        let err = open_devices(&[DeviceSpec { path: "/dev/ferrospike-no-such-disk".into(), file_size: None }], 8)
            .unwrap_err();
        assert!(matches!(err, DeviceError::Open { .. }), "{err}");
        assert!(err.to_string().contains("no such block device"), "{err}");
    }

    #[test]
    fn tmpfs_without_direct_io_is_reported() {
        // /dev/shm is tmpfs on most systems; tmpfs refuses O_DIRECT opens with EINVAL on
        // older kernels and accepts them on newer ones (6.6+), so both outcomes are valid.
        let dir = Path::new("/dev/shm");
        if !dir.is_dir() {
            eprintln!("no /dev/shm here; checking nothing about tmpfs");
            return;
        }
        let path = dir.join(format!("ferrospike-tmpfs-{}.img", std::process::id()));
        let r = open_devices(&[DeviceSpec { path: path.clone(), file_size: Some(1 << 20) }], 8);
        let _ = fs::remove_file(&path);
        match r {
            Ok(devs) => eprintln!("tmpfs accepts O_DIRECT here: {}", devs.describe()),
            Err(DeviceError::NoDirectIo { .. }) => eprintln!("tmpfs refuses O_DIRECT, reported as NoDirectIo"),
            Err(other) => panic!("unexpected error on tmpfs: {other}"),
        }
    }

    #[test]
    fn dio_alignment_probe_finds_a_size() {
        let path = test_path("probe");
        let devs = open_devices(&[DeviceSpec { path: path.clone(), file_size: Some(1 << 20) }], 8).unwrap();
        let fd = devs.device_fd(0);
        let probed = probe_dio_align(fd, 1 << 20, "probe").unwrap();
        assert!([512, 1024, 2048, 4096].contains(&probed));
        if let Some((off, mem)) = statx_dio_align(fd) {
            eprintln!("statx DIO alignment: offset {off}, memory {mem}; probed {probed}");
            if off <= 4096 {
                assert_eq!(probed, off.max(512), "trial reads disagree with statx");
            }
        }
        fs::remove_file(&path).unwrap();
    }
}
