//! The eventfd doorbell that wakes a sleeping shard.
//!
//! A shard announces that it is about to sleep (`prepare_sleep`), re-checks its queue, and
//! then waits on its ring, where a read of this eventfd is armed. Senders enqueue first and
//! ring only when the flag is set, so a busy shard costs senders no syscall.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

pub struct Doorbell {
    fd: OwnedFd,
    sleeping: AtomicBool,
}

impl Doorbell {
    pub fn new() -> std::io::Result<Doorbell> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        Ok(Doorbell { fd: unsafe { OwnedFd::from_raw_fd(fd) }, sleeping: AtomicBool::new(false) })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Called by the shard before it re-checks its queue and sleeps.
    pub fn prepare_sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }

    /// Called by the shard when it wakes (or decides not to sleep).
    pub fn awake(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }

    /// Called by a sender after enqueueing: wake the shard if it is (about to be) asleep.
    pub fn ring_if_sleeping(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            self.ring();
        }
    }

    /// Unconditionally wake the shard.
    pub fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own. A full counter
        // (EAGAIN) already means a pending wake-up, so the result can be ignored.
        unsafe {
            libc::write(self.fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8);
        }
    }
}
