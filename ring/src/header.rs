//! The ring header: a `#[repr(C)]` block at the start of every ring, followed
//! by the data area. Creating (`init`) and validating (`attach`) it.
//!
//! ```text
//! offset  line  field        written by         read by
//!      0  0     config       init, then nobody  attach (once, validated)
//!    128  1     tail         producer(s)        consumer
//!    256  2     head         consumer           producer(s)
//!    384  3     data_wait    consumer (waiting) producer (notifying)
//!    512  4     space_wait   producer (waiting) consumer (notifying)
//!    640  5     flow         both (CAS)         both
//!    768        data area (capacity bytes)
//! ```
//!
//! Positions (`head`, `tail`) are monotonically increasing byte counts; the
//! index into the data area is `position & (capacity - 1)`. Invariant of a
//! healthy ring: `head <= tail`, `tail - head <= capacity`, both multiples of 8.
//! Every reader of a position checks that invariant against its own local
//! copy of the other position before it uses the value.
#![allow(unsafe_code)]

use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::{RingAttachError, RingInitError};
use crate::flow::Watermarks;
use crate::region::{Data, Region, REGION_ALIGN};
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// `b"CIPCRING"` read as a little-endian `u64`.
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"CIPCRING");
/// Version of the header and record layout. Bumped on any layout change.
pub const RING_VERSION: u32 = 1;
/// Smallest capacity a ring may have.
pub const MIN_CAPACITY: u64 = 64;
/// Largest capacity a ring may have (1 TiB keeps every sum far from overflow).
pub const MAX_CAPACITY: u64 = 1 << 40;
/// Size of a record header in bytes.
pub const RECORD_HEADER: u64 = 8;
/// Largest valid position (`head`/`tail` byte count). Positions start at 0
/// and grow by at most a capacity at a time, so a healthy ring needs
/// centuries to get here; a peer's value beyond it is corruption. Keeping
/// every position below it (and capacities at most [`MAX_CAPACITY`]) means
/// no position arithmetic can overflow.
pub const MAX_POSITION: u64 = 1 << 62;

/// Whether `head`/`tail` are a consistent pair for a ring of `capacity`:
/// `head <= tail <= head + capacity`, both 8-aligned, both at most
/// [`MAX_POSITION`].
#[inline]
pub(crate) fn positions_ok(head: u64, tail: u64, capacity: u64) -> bool {
    head <= tail && tail - head <= capacity && tail <= MAX_POSITION && (head | tail).is_multiple_of(8)
}

/// One 128-byte line: keeps the fields written by different sides apart so
/// they never share a cache line (adjacent-line prefetch included).
#[repr(C, align(128))]
pub(crate) struct Line<T>(pub(crate) T);

/// Written once by `init`; `attach` reads each field once and keeps local,
/// validated copies. Atomics because the peer can write them at any time.
#[repr(C)]
pub(crate) struct Config {
    pub(crate) magic: AtomicU64,
    pub(crate) version: AtomicU32,
    /// Reserved, must be zero.
    pub(crate) flags: AtomicU32,
    /// Data area size in bytes: a power of two in `MIN_CAPACITY..=MAX_CAPACITY`.
    pub(crate) capacity: AtomicU64,
    /// Largest payload of one record; `record_size(max_record) <= capacity / 2`
    /// so that any record fits into an empty ring wherever the head is.
    pub(crate) max_record: AtomicU64,
    /// Fill level (bytes) at which flow control turns on; 0 = watermarks off.
    pub(crate) high_watermark: AtomicU64,
    /// Fill level at or below which flow control turns off again.
    pub(crate) low_watermark: AtomicU64,
}

/// The words of one wait point (see `wait.rs` for the protocol).
#[derive(Debug)]
#[repr(C)]
pub(crate) struct WaitWords {
    /// Number of sleepers that announced themselves.
    pub(crate) waiters: AtomicU32,
    /// Futex word: bumped by every notification that found a waiter.
    pub(crate) epoch: AtomicU32,
}

/// The shared header at the start of every ring.
#[repr(C)]
pub(crate) struct RingHeader {
    pub(crate) config: Line<Config>,
    /// Producer position: every byte before it is published.
    /// Release-stored by the producer, Acquire-loaded by the consumer
    /// (sync point TAIL).
    pub(crate) tail: Line<AtomicU64>,
    /// Consumer position: every byte before it is free again.
    /// Release-stored by the consumer, Acquire-loaded by producers
    /// (sync point HEAD).
    pub(crate) head: Line<AtomicU64>,
    /// The consumer waits here for data; producers notify.
    pub(crate) data_wait: Line<WaitWords>,
    /// Producers wait here for space; the consumer notifies.
    pub(crate) space_wait: Line<WaitWords>,
    /// Flow-control state, `FlowState` as `u32` (see `flow.rs`).
    pub(crate) flow: Line<AtomicU32>,
}

#[cfg(not(coroipc_loom))]
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<RingHeader>() == 768);
    assert!(align_of::<RingHeader>() == 128);
    assert!(offset_of!(RingHeader, tail) == 128);
    assert!(offset_of!(RingHeader, head) == 256);
    assert!(offset_of!(RingHeader, data_wait) == 384);
    assert!(offset_of!(RingHeader, space_wait) == 512);
    assert!(offset_of!(RingHeader, flow) == 640);
    assert!(size_of::<AtomicU64>() == 8 && size_of::<AtomicU32>() == 4);
};

/// Bytes the header occupies in front of the data area.
pub(crate) const HEADER_BYTES: usize = std::mem::size_of::<RingHeader>();

/// Rounds `len` up to the next multiple of 8.
#[inline]
pub(crate) const fn align8(len: u64) -> u64 {
    (len + 7) & !7
}

/// Bytes one record with a `payload`-byte payload occupies in the ring.
#[inline]
pub const fn record_size(payload: u64) -> u64 {
    RECORD_HEADER + align8(payload)
}

/// Largest payload a ring of `capacity` bytes can carry in one record.
#[inline]
pub const fn max_payload_for(capacity: u64) -> u64 {
    capacity / 2 - RECORD_HEADER
}

/// Bytes of region memory a ring with a `capacity`-byte data area needs.
pub const fn required_size(capacity: u64) -> usize {
    HEADER_BYTES + Data::region_bytes(capacity as usize)
}

/// What `init` writes into a fresh ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingConfig {
    /// Data area size in bytes: a power of two, at least [`MIN_CAPACITY`].
    pub capacity: u64,
    /// Largest record payload; at most [`max_payload_for`]`(capacity)`.
    pub max_record: u64,
    /// Flow-control watermarks, or `None` for none.
    pub watermarks: Option<Watermarks>,
}

impl RingConfig {
    /// A ring of `capacity` bytes carrying records of up to the largest
    /// payload that capacity allows, without watermarks.
    pub const fn new(capacity: u64) -> Self {
        Self {
            capacity,
            max_record: if capacity >= MIN_CAPACITY { max_payload_for(capacity) } else { 0 },
            watermarks: None,
        }
    }

    /// Sets the largest record payload.
    pub const fn with_max_record(mut self, max_record: u64) -> Self {
        self.max_record = max_record;
        self
    }

    /// Sets flow-control watermarks.
    pub const fn with_watermarks(mut self, watermarks: Watermarks) -> Self {
        self.watermarks = Some(watermarks);
        self
    }

    fn validate(&self) -> Result<(), RingInitError> {
        let cap = self.capacity;
        if !cap.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&cap) {
            return Err(RingInitError::BadCapacity(cap));
        }
        if self.max_record == 0 || self.max_record > max_payload_for(cap) {
            return Err(RingInitError::BadMaxRecord(self.max_record));
        }
        if let Some(w) = self.watermarks {
            if !w.is_valid_for(cap) {
                return Err(RingInitError::BadWatermarks(w));
            }
        }
        Ok(())
    }
}

/// The validated, process-local copy of a ring's configuration. Never re-read
/// from shared memory after `attach`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    pub(crate) capacity: u64,
    pub(crate) mask: u64,
    pub(crate) max_record: u64,
    pub(crate) watermarks: Option<Watermarks>,
}

/// An attached ring: header and data pointers plus the region keeping them
/// alive. Shared by every endpoint type; a clone is another view of the same
/// ring (it keeps the region alive on its own).
#[derive(Clone)]
pub(crate) struct RingRef {
    header: NonNull<RingHeader>,
    pub(crate) data: Data,
    pub(crate) layout: Layout,
    region: Arc<dyn Region>,
}

// SAFETY: the header is only reached through `&RingHeader` whose fields are
// all atomics, and the data area through raw accessors; the region is kept
// alive by the `Arc`.
unsafe impl Send for RingRef {}
// SAFETY: as above.
unsafe impl Sync for RingRef {}

impl std::fmt::Debug for RingRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingRef").field("layout", &self.layout).finish_non_exhaustive()
    }
}

fn locate(region: &dyn Region, offset: usize, len: usize) -> Result<NonNull<u8>, (usize, usize)> {
    let end = offset.checked_add(len);
    if end.is_none_or(|e| e > region.len()) {
        return Err((offset.saturating_add(len), region.len()));
    }
    let ptr = region.as_ptr().wrapping_add(offset);
    NonNull::new(ptr).ok_or((0, 0))
}

/// Writes a fresh ring header and data area into `region[offset..offset+len]`.
///
/// Must happen before the region is shared with any peer; the positions start
/// at zero and flow control off.
///
/// # Errors
///
/// [`RingInitError`] if the configuration is invalid or does not fit.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use coroipc_ring::{init, required_size, Consumer, HeapRegion, Region, RingAttachError, RingConfig, RingInitError};
///
/// let config = RingConfig::new(4096);
/// let region: Arc<dyn Region> = Arc::new(HeapRegion::new(required_size(config.capacity)));
///
/// // Before `init` the memory is not a ring: attaching fails.
/// let err = Consumer::attach(region.clone(), 0, region.len()).unwrap_err();
/// assert!(matches!(err, RingAttachError::BadMagic(0)));
///
/// // A capacity must be a power of two; nothing is written on error.
/// let bad = RingConfig::new(1000);
/// assert_eq!(init(&region, 0, region.len(), &bad), Err(RingInitError::BadCapacity(1000)));
///
/// init(&region, 0, region.len(), &config).unwrap();
/// let rx = Consumer::attach(region.clone(), 0, region.len()).unwrap();
/// assert_eq!(rx.capacity(), 4096);
/// ```
pub fn init(
    region: &Arc<dyn Region>,
    offset: usize,
    len: usize,
    config: &RingConfig,
) -> Result<(), RingInitError> {
    config.validate()?;
    let needed = required_size(config.capacity);
    if len < needed {
        return Err(RingInitError::RegionTooSmall { needed, actual: len });
    }
    let base = locate(&**region, offset, len)
        .map_err(|(needed, actual)| RingInitError::RegionTooSmall { needed, actual })?;
    if !(base.as_ptr() as usize).is_multiple_of(REGION_ALIGN) {
        return Err(RingInitError::Misaligned);
    }
    let (high, low) = config.watermarks.map_or((0, 0), |w| (w.high, w.low));
    let header = RingHeader {
        config: Line(Config {
            magic: AtomicU64::new(RING_MAGIC),
            version: AtomicU32::new(RING_VERSION),
            flags: AtomicU32::new(0),
            capacity: AtomicU64::new(config.capacity),
            max_record: AtomicU64::new(config.max_record),
            high_watermark: AtomicU64::new(high),
            low_watermark: AtomicU64::new(low),
        }),
        tail: Line(AtomicU64::new(0)),
        head: Line(AtomicU64::new(0)),
        data_wait: Line(WaitWords { waiters: AtomicU32::new(0), epoch: AtomicU32::new(0) }),
        space_wait: Line(WaitWords { waiters: AtomicU32::new(0), epoch: AtomicU32::new(0) }),
        flow: Line(AtomicU32::new(0)),
    };
    // SAFETY: `base` is 128-aligned and valid for `needed` bytes (checked
    // above, region contract); the region is not yet shared, so this write
    // races with nobody.
    unsafe { base.as_ptr().cast::<RingHeader>().write(header) };
    // SAFETY: the data area follows the header inside the checked span.
    let data_base = unsafe { NonNull::new_unchecked(base.as_ptr().add(HEADER_BYTES)) };
    // SAFETY: 8-aligned (128 + 768) and valid for the data area's bytes.
    unsafe { Data::init(data_base, config.capacity as usize) };
    Ok(())
}

impl RingRef {
    /// Validates the ring header at `region[offset..offset+len]` and returns
    /// a handle carrying local copies of its configuration.
    pub(crate) fn attach(
        region: Arc<dyn Region>,
        offset: usize,
        len: usize,
    ) -> Result<Self, RingAttachError> {
        if len < HEADER_BYTES {
            return Err(RingAttachError::RegionTooSmall { needed: HEADER_BYTES, actual: len });
        }
        let base = locate(&*region, offset, len)
            .map_err(|(needed, actual)| RingAttachError::RegionTooSmall { needed, actual })?;
        if !(base.as_ptr() as usize).is_multiple_of(REGION_ALIGN) {
            return Err(RingAttachError::Misaligned);
        }
        let header = base.cast::<RingHeader>();
        // SAFETY: aligned and in bounds (checked); every field is an atomic,
        // so a shared reference is sound however the peer writes the bytes.
        let h = unsafe { header.as_ref() };
        let c = &h.config.0;
        // Each field is read exactly once, here.
        let magic = c.magic.load(Ordering::Acquire);
        if magic != RING_MAGIC {
            return Err(RingAttachError::BadMagic(magic));
        }
        let version = c.version.load(Ordering::Relaxed);
        if version != RING_VERSION {
            return Err(RingAttachError::VersionMismatch { found: version, expected: RING_VERSION });
        }
        let flags = c.flags.load(Ordering::Relaxed);
        if flags != 0 {
            return Err(RingAttachError::UnknownFlags(flags));
        }
        let capacity = c.capacity.load(Ordering::Relaxed);
        if !capacity.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
            return Err(RingAttachError::BadCapacity(capacity));
        }
        let needed = required_size(capacity);
        if len < needed {
            return Err(RingAttachError::RegionTooSmall { needed, actual: len });
        }
        let max_record = c.max_record.load(Ordering::Relaxed);
        if max_record == 0 || max_record > max_payload_for(capacity) {
            return Err(RingAttachError::BadMaxRecord(max_record));
        }
        let high = c.high_watermark.load(Ordering::Relaxed);
        let low = c.low_watermark.load(Ordering::Relaxed);
        let watermarks = if high == 0 && low == 0 {
            None
        } else {
            let w = Watermarks { high, low };
            if !w.is_valid_for(capacity) {
                return Err(RingAttachError::BadWatermarks { high, low });
            }
            Some(w)
        };
        let head = h.head.0.load(Ordering::Acquire);
        let tail = h.tail.0.load(Ordering::Acquire);
        if !positions_ok(head, tail, capacity) {
            return Err(RingAttachError::BadPositions { head, tail });
        }
        // SAFETY: inside the checked span, after the header.
        let data_base = unsafe { NonNull::new_unchecked(base.as_ptr().add(HEADER_BYTES)) };
        // SAFETY: 8-aligned, valid for the data area (len >= needed checked).
        let data = unsafe { Data::attach(data_base, capacity as usize) };
        Ok(Self {
            header,
            data,
            layout: Layout { capacity, mask: capacity - 1, max_record, watermarks },
            region,
        })
    }

    /// The region the ring lives in (kept alive by this value).
    #[inline]
    pub(crate) fn region(&self) -> &Arc<dyn Region> {
        &self.region
    }

    /// The shared header. All fields are atomics.
    #[inline]
    pub(crate) fn header(&self) -> &RingHeader {
        // SAFETY: validated in `attach`; kept alive by `region`; atomics only.
        unsafe { self.header.as_ref() }
    }
}
