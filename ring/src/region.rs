//! Memory regions a ring lives in, and the raw accessors for its data area.
//!
//! This file holds the raw accessors of the data area; the other `unsafe`
//! of the crate is the header pointer (`header.rs`), the zero-copy slices
//! (`ReadGrant::as_slice`, `WriteGrant::as_mut_slice`, whose callers take on
//! the stability question), the wait handle's `Send`/`Sync` (`wait.rs`) and
//! test-only scribbling helpers; every block carries a `SAFETY` comment
//! (enforced by `clippy::undocumented_unsafe_blocks`). A [`Region`] is
//! a span of bytes the ring may read and write for as long as the region value
//! lives: a [`HeapRegion`] for tests, Miri and loom, a shared mapping in
//! production (implemented in `coroipc-transport`). Another process may write
//! the same bytes at any moment, so nothing here ever forms a `&`/`&mut`
//! reference to them: the data area is reached through raw pointers only,
//! words are read with a single volatile load (no double fetch), and every
//! offset is bounds-checked against the validated capacity before use.
#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// A span of memory a ring can live in.
///
/// # Safety
///
/// Implementors promise that [`as_ptr`](Region::as_ptr) returns a pointer that
/// stays valid for reads and writes of [`len`](Region::len) bytes, at the same
/// address, for as long as the value lives, and that the start is aligned to
/// at least 128 bytes. The memory may be shared with other processes; the ring
/// never assumes it is stable.
pub unsafe trait Region: Send + Sync + 'static {
    /// The first byte of the region.
    fn as_ptr(&self) -> *mut u8;
    /// Length of the region in bytes.
    fn len(&self) -> usize;
    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Alignment of every region and of every ring inside one.
pub const REGION_ALIGN: usize = 128;

/// A zeroed, 128-byte aligned heap allocation: the region for tests, benches,
/// Miri and loom, where no real shared memory is needed.
#[derive(Debug)]
pub struct HeapRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the allocation is owned and only reached through raw pointers and
// atomics; moving or sharing the owner between threads is sound.
unsafe impl Send for HeapRegion {}
// SAFETY: as above; `HeapRegion` itself has no interior state.
unsafe impl Sync for HeapRegion {}

impl HeapRegion {
    /// Allocates `len` zeroed bytes aligned to [`REGION_ALIGN`].
    ///
    /// # Panics
    ///
    /// Panics if `len` is zero or too large for a `Layout`; aborts on
    /// allocation failure like `Vec`.
    pub fn new(len: usize) -> Self {
        assert!(len > 0, "a region must not be empty");
        let layout = Layout::from_size_align(len, REGION_ALIGN).expect("region too large");
        // SAFETY: `layout` has non-zero size (asserted above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Self { ptr, len }
    }
}

impl Drop for HeapRegion {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, REGION_ALIGN).expect("checked in new");
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

// SAFETY: the pointer is valid for `len` bytes until drop, 128-aligned.
unsafe impl Region for HeapRegion {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// Raw view of a ring's data area: `capacity` bytes at `base`.
///
/// Invariant (established by `header::attach`/`init`): `base` is 8-aligned and
/// valid for `capacity` bytes for as long as the `Arc<dyn Region>` held next to
/// this value lives. Every method checks its offset against `capacity`, so a
/// logic error panics instead of touching memory out of bounds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Data {
    base: NonNull<u8>,
    capacity: usize,
}

// SAFETY: a plain pointer into a region kept alive by the owner of this value.
unsafe impl Send for Data {}
// SAFETY: all accesses are raw and bounds-checked; races with the peer are
// part of the threat model and only ever produce wrong bytes, never UB in
// this process's view of its own allocations.
unsafe impl Sync for Data {}

#[cfg(not(coroipc_loom))]
impl Data {
    /// Bytes of region memory one data byte occupies (1 outside loom).
    pub(crate) const fn region_bytes(capacity: usize) -> usize {
        capacity
    }

    /// Prepares a data area at `base` (nothing to do outside loom: the bytes
    /// need no initialisation).
    ///
    /// # Safety
    ///
    /// `base` must be 8-aligned and valid for `capacity` bytes for as long as
    /// the returned value is used.
    pub(crate) unsafe fn init(base: NonNull<u8>, capacity: usize) -> Self {
        Self { base, capacity }
    }

    /// Views an already initialised data area.
    ///
    /// # Safety
    ///
    /// As for [`Data::init`].
    pub(crate) unsafe fn attach(base: NonNull<u8>, capacity: usize) -> Self {
        Self { base, capacity }
    }

    #[inline]
    fn check(&self, offset: usize, len: usize) {
        // Two compares on the hot path; the panic machinery stays out of
        // line (callgrind: the inline `assert!` with its formatting cost ~10
        // instructions per access, see benches/README.md).
        if offset > self.capacity || len > self.capacity - offset {
            out_of_bounds(offset, len, self.capacity);
        }
    }

    /// Reads the 8-byte word at `offset` exactly once.
    #[inline]
    pub(crate) fn load_word(&self, offset: usize) -> u64 {
        self.check(offset, 8);
        debug_assert_eq!(offset % 8, 0);
        #[cfg(any(test, fuzzing))]
        fetch_audit::record(self.base.as_ptr() as usize + offset);
        // SAFETY: in bounds (checked) and 8-aligned (base is 128-aligned plus
        // a multiple of 8). Volatile: the value is fetched once into a local
        // and never re-read, whatever the peer writes afterwards.
        unsafe { self.base.as_ptr().add(offset).cast::<u64>().read_volatile() }
    }

    /// Writes the 8-byte word at `offset`.
    #[inline]
    pub(crate) fn store_word(&self, offset: usize, value: u64) {
        self.check(offset, 8);
        debug_assert_eq!(offset % 8, 0);
        // SAFETY: in bounds and aligned, as in `load_word`.
        unsafe { self.base.as_ptr().add(offset).cast::<u64>().write_volatile(value) }
    }

    /// Copies `dst.len()` bytes starting at `offset` out of the ring.
    #[inline]
    pub(crate) fn read(&self, offset: usize, dst: &mut [u8]) {
        self.check(offset, dst.len());
        // SAFETY: source in bounds (checked); `dst` is private memory, so the
        // two ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.base.as_ptr().add(offset), dst.as_mut_ptr(), dst.len()) }
    }

    /// Copies `src` into the ring starting at `offset`.
    #[inline]
    pub(crate) fn write(&self, offset: usize, src: &[u8]) {
        self.check(offset, src.len());
        // SAFETY: destination in bounds (checked); `src` is private memory.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.as_ptr().add(offset), src.len()) }
    }

    /// Pointer to `len` bytes at `offset`, for zero-copy access.
    #[inline]
    pub(crate) fn ptr(&self, offset: usize, len: usize) -> *mut u8 {
        self.check(offset, len);
        // SAFETY: in bounds (checked).
        unsafe { self.base.as_ptr().add(offset) }
    }
}

/// Starts one operation of the double-fetch audit (module `fetch_audit`):
/// from here on, each word of a data area may be loaded at most once. A
/// no-op outside unit tests and fuzz builds.
#[inline(always)]
pub(crate) fn begin_fetch_audit() {
    #[cfg(all(any(test, fuzzing), not(coroipc_loom)))]
    fetch_audit::begin();
}

/// The double-fetch audit, compiled into the crate's unit tests and into
/// fuzz builds (`--cfg fuzzing`, set by cargo-fuzz) only.
///
/// Every word of a data area is written by the peer, so the ring must load
/// it once per use, validate the local copy and never look again: a second
/// load can return a different value than the one that was validated.
/// Operations that read data words call [`begin_fetch_audit`] first (the
/// consumer's `try_peek` at its start and after each fresh capture of the
/// producer position, since a new capture may legitimately revisit an index
/// one lap later); [`Data::load_word`] then records the address of each load
/// and panics on the second load of the same word within the operation.
#[cfg(all(any(test, fuzzing), not(coroipc_loom)))]
pub(crate) mod fetch_audit {
    use std::cell::RefCell;

    thread_local! {
        static LOADED: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    }

    /// Forgets the loads of the previous operation.
    pub(crate) fn begin() {
        LOADED.with(|l| l.borrow_mut().clear());
    }

    /// Records a load of the word at `addr`; panics if the current operation
    /// loaded it before.
    pub(crate) fn record(addr: usize) {
        LOADED.with(|l| {
            let mut l = l.borrow_mut();
            assert!(
                !l.contains(&addr),
                "double fetch: the shared word at {addr:#x} was loaded twice in one operation"
            );
            l.push(addr);
        });
    }
}

#[cfg(not(coroipc_loom))]
#[cold]
#[inline(never)]
fn out_of_bounds(offset: usize, len: usize, capacity: usize) -> ! {
    panic!("ring data access out of bounds: offset {offset} len {len} capacity {capacity}")
}

/// Under loom the data area is an array of `loom::cell::UnsafeCell<u64>`, one
/// per 8-byte word, so that loom checks every data access for a
/// happens-before edge: a publication store weakened to `Relaxed` makes the
/// consumer's read of the payload a reported causality violation.
#[cfg(coroipc_loom)]
impl Data {
    pub(crate) const fn region_bytes(capacity: usize) -> usize {
        (capacity / 8) * std::mem::size_of::<loom::cell::UnsafeCell<u64>>()
    }

    pub(crate) unsafe fn init(base: NonNull<u8>, capacity: usize) -> Self {
        let cells = base.as_ptr().cast::<loom::cell::UnsafeCell<u64>>();
        for i in 0..capacity / 8 {
            // SAFETY: the caller sized the region with `region_bytes`.
            unsafe { cells.add(i).write(loom::cell::UnsafeCell::new(0)) };
        }
        Self { base, capacity }
    }

    pub(crate) unsafe fn attach(base: NonNull<u8>, capacity: usize) -> Self {
        Self { base, capacity }
    }

    fn cell(&self, word: usize) -> &loom::cell::UnsafeCell<u64> {
        assert!(word < self.capacity / 8, "ring data access out of bounds");
        // SAFETY: initialised by `init`, in bounds (checked).
        unsafe { &*self.base.as_ptr().cast::<loom::cell::UnsafeCell<u64>>().add(word) }
    }

    pub(crate) fn load_word(&self, offset: usize) -> u64 {
        // SAFETY: loom checks the access for causality.
        self.cell(offset / 8).with(|p| unsafe { *p })
    }

    pub(crate) fn store_word(&self, offset: usize, value: u64) {
        // SAFETY: loom checks the access for causality.
        self.cell(offset / 8).with_mut(|p| unsafe { *p = value })
    }

    pub(crate) fn read(&self, offset: usize, dst: &mut [u8]) {
        for (i, b) in dst.iter_mut().enumerate() {
            let at = offset + i;
            let word = self.load_word(at & !7);
            *b = word.to_le_bytes()[at % 8];
        }
    }

    pub(crate) fn write(&self, offset: usize, src: &[u8]) {
        for (i, b) in src.iter().enumerate() {
            let at = offset + i;
            let mut bytes = self.load_word(at & !7).to_le_bytes();
            bytes[at % 8] = *b;
            self.store_word(at & !7, u64::from_le_bytes(bytes));
        }
    }
}
