//! Aligned I/O buffers.
//!
//! [`AlignedBuf`] owns an aligned, zero-initialised allocation (or borrows a slot of a
//! backend's registered arena). [`WBuf`] wraps one for a write block that is appended to while
//! earlier parts of it are being written by the device: the prefix `[0, frozen)` is immutable
//! (the kernel may be reading it), appends go strictly after it.

use std::alloc::{self, Layout};
use std::cell::{Cell, UnsafeCell};
use std::ptr::NonNull;

/// Alignment of every buffer: covers 4 KiB sector devices and page-aligned registered memory.
pub const BUF_ALIGN: usize = 4096;

/// An aligned byte buffer usable for O_DIRECT I/O.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Bytes allocated; `len` may be truncated below it.
    cap: usize,
    /// `Some(slot)` when the memory belongs to a backend's registered arena: it is not freed
    /// on drop (the arena owns it) and the backend may use fixed-buffer opcodes for it.
    arena_slot: Option<u16>,
}

// SAFETY: AlignedBuf uniquely owns its allocation (or its arena slot, which no one else uses
// while the buffer exists); moving it to another thread moves that ownership.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled heap buffer of `len` bytes (rounded up to at least one byte).
    pub fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), BUF_ALIGN).expect("buffer layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, cap: len, arena_slot: None }
    }

    /// Wrap a slot of a registered arena.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes, aligned to `BUF_ALIGN` (4096), not
    /// used through any other handle while this buffer exists, and outlive it.
    pub unsafe fn from_arena(ptr: NonNull<u8>, len: usize, slot: u16) -> Self {
        debug_assert_eq!(ptr.as_ptr() as usize % BUF_ALIGN, 0);
        AlignedBuf { ptr, len, cap: len, arena_slot: Some(slot) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn arena_slot(&self) -> Option<u16> {
        self.arena_slot
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Bytes allocated (the length before any `set_len`).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Change the visible length within the allocation; used to reuse a buffer for a
    /// shorter (or, up to its capacity, longer) transfer.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap);
        self.len = len;
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes and initialised (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for Deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.arena_slot.is_none() {
            let layout = Layout::from_size_align(self.cap.max(1), BUF_ALIGN).expect("layout");
            // SAFETY: ptr came from alloc_zeroed with this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf(len={}, slot={:?})", self.len, self.arena_slot)
    }
}

/// A write-block buffer shared between the shard (appending) and in-flight writes (reading
/// the frozen prefix). Single-threaded: it lives behind an `Rc` on one shard thread.
pub struct WBuf {
    buf: UnsafeCell<AlignedBuf>,
    /// Bytes `[0, frozen)` may be under I/O and are never written again.
    frozen: Cell<usize>,
}

impl WBuf {
    pub fn new(buf: AlignedBuf) -> Self {
        WBuf { buf: UnsafeCell::new(buf), frozen: Cell::new(0) }
    }

    pub fn len(&self) -> usize {
        // SAFETY: reading the length field does not overlap any byte range under I/O.
        unsafe { (*self.buf.get()).len() }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn frozen(&self) -> usize {
        self.frozen.get()
    }

    /// Copy `data` to `off`. The range must lie wholly after the frozen prefix.
    pub fn write_at(&self, off: usize, data: &[u8]) {
        assert!(off >= self.frozen.get(), "write into frozen range at {off}");
        assert!(off + data.len() <= self.len(), "write past the end of the buffer");
        // SAFETY: [off, off+len) is inside the allocation and after the frozen prefix, so no
        // in-flight I/O reads it, and no reference into it is alive (frozen_slice only
        // lends the frozen prefix; anything after it is only ever copied).
        unsafe {
            let base = (*self.buf.get()).as_mut_ptr();
            std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(off), data.len());
        }
    }

    /// Zero `[off, end)`, which must lie after the frozen prefix.
    pub fn zero(&self, off: usize, end: usize) {
        assert!(off >= self.frozen.get() && off <= end && end <= self.len());
        // SAFETY: as for write_at.
        unsafe {
            let base = (*self.buf.get()).as_mut_ptr();
            std::ptr::write_bytes(base.add(off), 0, end - off);
        }
    }

    /// Copy `[off, off+len)` out of the buffer.
    pub fn read_at(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off.checked_add(len).is_some_and(|end| end <= self.len()), "read_at out of range");
        let mut out = Vec::with_capacity(len);
        // SAFETY: the range is inside the allocation; concurrent device reads of the frozen
        // prefix do not conflict with our read, and nothing writes the buffer meanwhile
        // (single-threaded, and writes only happen through write_at/zero). `out` has room
        // for `len` bytes, and all `len` are initialised by the copy before `set_len`.
        unsafe {
            let base = (*self.buf.get()).as_ptr();
            std::ptr::copy_nonoverlapping(base.add(off), out.as_mut_ptr(), len);
            out.set_len(len);
        }
        out
    }

    /// `[off, off+len)` in place, when it lies in the frozen prefix (else `None`: copy it
    /// with [`WBuf::read_at`]).
    pub fn frozen_slice(&self, off: usize, len: usize) -> Option<&[u8]> {
        let end = off.checked_add(len)?;
        if end > self.frozen.get() {
            return None;
        }
        // SAFETY: the range is inside the allocation (frozen <= len, see freeze_to) and in
        // the frozen prefix, which is never written again: write_at and zero assert that
        // they start after it, and it never shrinks. Device writes only read it. The buffer
        // cannot be freed or moved while the slice borrows `self` (into_inner consumes it).
        Some(unsafe { std::slice::from_raw_parts((*self.buf.get()).as_ptr().add(off), len) })
    }

    /// Ask the CPU to start loading `[off, off+len)` into its caches (a hint: no effect on
    /// what the buffer holds, and nothing on CPUs without a prefetch instruction).
    pub fn prefetch(&self, off: usize, len: usize) {
        if off.checked_add(len).is_none_or(|end| end > self.len()) {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // SAFETY: only the buffer's address is taken (as `len` does); no byte is read or
            // written through the reference.
            let base = unsafe { (*self.buf.get()).as_ptr() };
            let mut at = off & !63;
            while at < off + len {
                // SAFETY: a prefetch is a hint that never faults and has no architectural
                // effect; the address is inside the allocation (checked above).
                unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(at) as *const i8) };
                at += 64;
            }
        }
    }

    /// Declare `[0, end)` immutable from now on. Never shrinks.
    pub fn freeze_to(&self, end: usize) {
        assert!(end <= self.len());
        if end > self.frozen.get() {
            self.frozen.set(end);
        }
    }

    /// Pointer to byte `off` for the I/O backend. Only ranges inside the frozen prefix may be
    /// handed to the device.
    pub fn io_ptr(&self, off: usize, end: usize) -> *const u8 {
        assert!(off <= end && end <= self.frozen.get(), "I/O of an unfrozen range");
        // SAFETY: in bounds, checked above.
        unsafe { (*self.buf.get()).as_ptr().add(off) }
    }

    /// The arena slot of the underlying buffer, for fixed-buffer writes.
    pub fn arena_slot(&self) -> Option<u16> {
        // SAFETY: reads a field that never changes while the WBuf exists.
        unsafe { (*self.buf.get()).arena_slot() }
    }

    /// Take the buffer back (for recycling); the caller must hold the only `Rc`.
    pub fn into_inner(self) -> AlignedBuf {
        self.buf.into_inner()
    }
}

impl std::fmt::Debug for WBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WBuf(len={}, frozen={})", self.len(), self.frozen.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_slices_only_cover_the_frozen_prefix() {
        let w = WBuf::new(AlignedBuf::new(8192));
        w.write_at(100, b"record");
        assert_eq!(w.frozen_slice(100, 6), None, "not frozen yet: the caller copies");
        assert_eq!(w.read_at(100, 6), b"record");
        w.freeze_to(4096);
        assert_eq!(w.frozen_slice(100, 6), Some(&b"record"[..]));
        assert_eq!(w.frozen_slice(4090, 6), Some(&[0u8; 6][..]));
        assert_eq!(w.frozen_slice(4091, 6), None, "ends past the frozen prefix");
        assert_eq!(w.frozen_slice(usize::MAX, 2), None);
        w.write_at(4096, b"next");
        assert_eq!(w.read_at(4096, 4), b"next");
    }
}
