//! The single-producer end.
//!
//! Writing is zero-copy: [`Producer::try_reserve`] finds contiguous space
//! (writing padding first if the record would not fit before the end of the
//! data area), the caller fills the [`WriteGrant`], and
//! [`WriteGrant::commit`] publishes it with one Release store of `tail`.
//! Nothing is visible to the consumer before the commit; a dropped grant
//! publishes nothing.

use std::io::IoSlice;
use std::sync::Arc;

use crate::error::{Corruption, PushError, RingAttachError};
use crate::flow::{raise_if_high, FlowChange, FlowState};
use crate::header::{positions_ok, record_size, RingRef, RECORD_HEADER};
use crate::record::{Kind, RecordHeader};
use crate::region::Region;
use crate::sync::{publish_ordering, Ordering};
use crate::wait::{WaitHandle, WaitPoint};

/// Where a reservation goes: computed by [`plan`] from a start position.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    /// Index of a padding record to write first, and its total size.
    pub(crate) pad: Option<(u64, u64)>,
    /// Index of the record header.
    pub(crate) index: u64,
    /// Total bytes the reservation advances the position by.
    pub(crate) advance: u64,
}

/// Lays out a record of `size` bytes at position `pos`: contiguous, with a
/// padding record in front if it would cross the end of the data area.
#[inline]
pub(crate) fn plan(ring: &RingRef, pos: u64, size: u64) -> Plan {
    let index = pos & ring.layout.mask;
    let to_end = ring.layout.capacity - index;
    if size <= to_end {
        Plan { pad: None, index, advance: size }
    } else {
        Plan { pad: Some((index, to_end)), index: 0, advance: to_end + size }
    }
}

/// Writes the padding (if any) and record headers of a plan.
#[inline]
pub(crate) fn write_headers(ring: &RingRef, plan: &Plan, kind: Kind, len: u64) {
    if let Some((index, size)) = plan.pad {
        ring.data.store_word(index as usize, RecordHeader::encode(Kind::Padding, size - RECORD_HEADER));
    }
    ring.data.store_word(plan.index as usize, RecordHeader::encode(kind, len));
}

/// Checks a consumer position read from shared memory against a local
/// producer position.
#[inline]
pub(crate) fn check_head(ring: &RingRef, head: u64, tail: u64) -> Result<u64, Corruption> {
    if !positions_ok(head, tail, ring.layout.capacity) {
        return Err(Corruption::Head { head, tail });
    }
    Ok(head)
}

/// The writing end of a single-producer ring. `Send`, not `Sync`.
///
/// # Examples
///
/// A full ring refuses a record until the consumer releases space; the
/// producer never blocks and never overwrites unread data.
///
/// ```
/// use coroipc_ring::{Consumer, Producer, PushError};
/// # use std::sync::Arc;
/// # use coroipc_ring::{init, required_size, HeapRegion, Region, RingConfig};
/// # let region: Arc<dyn Region> = Arc::new(HeapRegion::new(required_size(256)));
/// # init(&region, 0, region.len(), &RingConfig::new(256)).unwrap();
///
/// let mut tx = Producer::attach(region.clone(), 0, region.len()).unwrap();
/// let mut rx = Consumer::attach(region.clone(), 0, region.len()).unwrap();
/// assert_eq!(tx.capacity(), 256);
///
/// // 24-byte records (8-byte header + 16-byte payload): 10 fill 240 of 256 bytes.
/// let mut sent = 0;
/// while tx.try_push(&[sent as u8; 16]).is_ok() {
///     sent += 1;
/// }
/// assert_eq!(sent, 10);
/// assert_eq!(tx.try_push(&[0; 16]), Err(PushError::Full));
///
/// let mut buf = [0u8; 16];
/// assert_eq!(rx.try_pop(&mut buf), Ok(16));
/// assert_eq!(buf, [0; 16]);
/// assert!(tx.try_push(&[10; 16]).is_ok()); // room again
/// ```
#[derive(Debug)]
pub struct Producer {
    ring: RingRef,
    /// Local producer position; equal to the shared `tail` between calls
    /// (a reservation moves neither: only `commit` stores `tail`).
    /// Invariant: `head_cache <= tail`, `tail - head_cache <= capacity`.
    tail: u64,
    /// Last validated consumer position: never ahead of the position the
    /// consumer has released (so "fits by the cache" implies "fits"); only
    /// replaced by a fresh load that passed `check_head`.
    head_cache: u64,
}

/// Space reserved for one record: fill it, then [`commit`](Self::commit).
/// Dropping it publishes nothing.
#[derive(Debug)]
pub struct WriteGrant<'a> {
    producer: &'a mut Producer,
    /// Where the record goes. Invariant (checked by `try_reserve`):
    /// `tail - head_cache + plan.advance <= capacity`, so the span holds no
    /// unread byte.
    plan: Plan,
    /// Payload length. Invariant: `len <= max_record`.
    len: usize,
}

impl Producer {
    /// Attaches to the ring at `region[offset..offset + len]`.
    ///
    /// # Errors
    ///
    /// [`RingAttachError`] if the header is not a valid ring.
    pub fn attach(region: Arc<dyn Region>, offset: usize, len: usize) -> Result<Self, RingAttachError> {
        let ring = RingRef::attach(region, offset, len)?;
        let tail = ring.header().tail.0.load(Ordering::Acquire);
        let head = ring.header().head.0.load(Ordering::Acquire);
        if !positions_ok(head, tail, ring.layout.capacity) {
            return Err(RingAttachError::BadPositions { head, tail });
        }
        Ok(Self { ring, tail, head_cache: head })
    }

    /// Data area size in bytes.
    pub fn capacity(&self) -> u64 {
        self.ring.layout.capacity
    }

    /// Largest record payload the ring carries.
    pub fn max_record(&self) -> u64 {
        self.ring.layout.max_record
    }

    /// Reloads and validates the consumer position (sync point HEAD).
    #[inline]
    fn load_head(&mut self) -> Result<u64, Corruption> {
        // SYNC HEAD: pairs with the consumer's Release store; its reads of
        // the space we are about to overwrite are complete.
        let head = self.ring.header().head.0.load(Ordering::Acquire);
        self.head_cache = check_head(&self.ring, head, self.tail)?;
        Ok(head)
    }

    /// Reserves space for a record with a `len`-byte payload. Never blocks.
    ///
    /// # Errors
    ///
    /// [`PushError::Full`] if the consumer has not freed enough space yet,
    /// [`PushError::TooBig`] if `len` exceeds the maximum record,
    /// [`PushError::Corrupt`] if the consumer position is invalid.
    ///
    /// # Examples
    ///
    /// ```
    /// use coroipc_ring::{Consumer, Producer, PushError};
    /// # use std::sync::Arc;
    /// # use coroipc_ring::{init, required_size, HeapRegion, Region, RingConfig};
    /// # let region: Arc<dyn Region> = Arc::new(HeapRegion::new(required_size(256)));
    /// # init(&region, 0, region.len(), &RingConfig::new(256)).unwrap();
    ///
    /// let mut tx = Producer::attach(region.clone(), 0, region.len()).unwrap();
    /// let mut rx = Consumer::attach(region.clone(), 0, region.len()).unwrap();
    ///
    /// // Fill the record in place, in any order, then publish it.
    /// let mut grant = tx.try_reserve(11).unwrap();
    /// grant.write_at(6, b"world");
    /// grant.write_at(0, b"hello ");
    /// let _ = grant.commit();
    /// assert_eq!(rx.try_pop_vec().unwrap(), b"hello world");
    ///
    /// // A dropped grant publishes nothing.
    /// drop(tx.try_reserve(4).unwrap());
    /// assert!(rx.try_pop_vec().is_err());
    ///
    /// // No record exceeds the ring's maximum.
    /// let max = tx.max_record();
    /// assert_eq!(tx.try_reserve(max as usize + 1).unwrap_err(), PushError::TooBig { len: max + 1, max });
    /// ```
    #[inline]
    pub fn try_reserve(&mut self, len: usize) -> Result<WriteGrant<'_>, PushError> {
        let max = self.ring.layout.max_record;
        if len as u64 > max {
            return Err(PushError::TooBig { len: len as u64, max });
        }
        let plan = plan(&self.ring, self.tail, record_size(len as u64));
        let cap = self.ring.layout.capacity;
        if self.tail - self.head_cache + plan.advance > cap {
            let head = self.load_head().map_err(PushError::Corrupt)?;
            if self.tail - head + plan.advance > cap {
                return Err(PushError::Full);
            }
        }
        Ok(WriteGrant { producer: self, plan, len })
    }

    /// Whether a record with a `len`-byte payload fits now, without
    /// updating any cached state (usable while a [`WaitPoint`] borrows the
    /// producer). A corrupt consumer position counts as "fits", so that the
    /// caller's next `try_reserve` reports it.
    pub fn has_space_uncached(&self, len: usize) -> bool {
        let plan = plan(&self.ring, self.tail, record_size(len as u64));
        // The cached head is never ahead of the real one: if it says "fits",
        // it fits, and no shared line is touched (the server asks this
        // before every request; a miss on the client's head line each time
        // showed in the rr64 profile).
        if self.tail - self.head_cache + plan.advance <= self.ring.layout.capacity {
            return true;
        }
        // SYNC HEAD (as in `load_head`).
        let head = self.ring.header().head.0.load(Ordering::Acquire);
        match check_head(&self.ring, head, self.tail) {
            Ok(head) => self.tail - head + plan.advance <= self.ring.layout.capacity,
            Err(_) => true,
        }
    }

    /// Whether a record with a `len`-byte payload fits now, refreshing the
    /// cached consumer position when the cache says "full" — so a caller
    /// that asks before every record reads the shared line about once per
    /// lap of the ring, not every time. A corrupt consumer position counts
    /// as "fits" (the next `try_reserve` reports it).
    pub fn has_space(&mut self, len: usize) -> bool {
        let plan = plan(&self.ring, self.tail, record_size(len as u64));
        let cap = self.ring.layout.capacity;
        if self.tail - self.head_cache + plan.advance <= cap {
            return true;
        }
        match self.load_head() {
            Ok(head) => self.tail - head + plan.advance <= cap,
            Err(_) => true,
        }
    }

    /// Copies `payload` into one record and publishes it.
    ///
    /// # Errors
    ///
    /// As [`try_reserve`](Self::try_reserve); nothing is written on error.
    #[inline]
    pub fn try_push(&mut self, payload: &[u8]) -> Result<FlowChange, PushError> {
        let mut grant = self.try_reserve(payload.len())?;
        grant.write_at(0, payload);
        Ok(grant.commit())
    }

    /// Gathers `parts` into one record and publishes it.
    ///
    /// # Errors
    ///
    /// As [`try_push`](Self::try_push).
    pub fn try_push_vectored(&mut self, parts: &[IoSlice<'_>]) -> Result<FlowChange, PushError> {
        let len = parts.iter().map(|p| p.len()).sum();
        let mut grant = self.try_reserve(len)?;
        let mut at = 0;
        for p in parts {
            grant.write_at(at, p);
            at += p.len();
        }
        Ok(grant.commit())
    }

    /// The flow-control state in the shared header.
    pub fn flow_state(&self) -> FlowState {
        FlowState::from_word(self.ring.header().flow.0.load(Ordering::Relaxed))
    }

    /// An owned handle on [`data_wait`](Self::data_wait).
    pub fn data_wait_handle(&self) -> WaitHandle {
        WaitHandle::new(&self.ring.header().data_wait.0, self.ring.region())
    }

    /// An owned handle on [`space_wait`](Self::space_wait).
    pub fn space_wait_handle(&self) -> WaitHandle {
        WaitHandle::new(&self.ring.header().space_wait.0, self.ring.region())
    }

    /// Where the consumer sleeps waiting for data; call
    /// [`WaitPoint::notify`] on it after committing.
    pub fn data_wait(&self) -> WaitPoint<'_> {
        WaitPoint::new(&self.ring.header().data_wait.0)
    }

    /// Where this producer sleeps waiting for space (the consumer notifies).
    pub fn space_wait(&self) -> WaitPoint<'_> {
        WaitPoint::new(&self.ring.header().space_wait.0)
    }
}

impl WriteGrant<'_> {
    /// Payload length reserved.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the reserved payload is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `src` into the payload at `offset`.
    ///
    /// # Panics
    ///
    /// Panics if `offset + src.len()` exceeds the reserved length.
    #[inline]
    pub fn write_at(&mut self, offset: usize, src: &[u8]) {
        assert!(offset <= self.len && src.len() <= self.len - offset, "write past the reserved record");
        let at = (self.plan.index + RECORD_HEADER) as usize + offset;
        self.producer.ring.data.write(at, src);
    }

    /// The reserved payload in place, for zero-copy writes.
    ///
    /// # Safety
    ///
    /// The bytes live in memory the consumer's process can read and write.
    /// A consumer that follows the protocol never touches them before the
    /// commit; the caller must not rely on the slice being exclusive against
    /// one that does not (write into it, do not read back from it).
    #[cfg(not(coroipc_loom))]
    #[allow(unsafe_code)]
    #[inline]
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        let at = (self.plan.index + RECORD_HEADER) as usize;
        let ptr = self.producer.ring.data.ptr(at, self.len);
        // SAFETY: in bounds (checked by `ptr`); the region outlives the
        // borrow of the producer; exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(ptr, self.len) }
    }

    /// Publishes the record (sync point TAIL). Returns
    /// [`FlowChange::Raised`] if it switched flow control on. Does not wake
    /// a sleeping consumer: call [`Producer::data_wait`]`().notify(..)`.
    #[inline]
    pub fn commit(self) -> FlowChange {
        let p = self.producer;
        write_headers(&p.ring, &self.plan, Kind::Data, self.len as u64);
        p.tail += self.plan.advance;
        // SYNC TAIL: Release publishes the headers and payload written above.
        p.ring.header().tail.0.store(p.tail, publish_ordering());
        let mut head_cache = p.head_cache;
        let change = raise_if_high(&p.ring, p.tail, head_cache, |head| head_cache = head);
        p.head_cache = head_cache;
        change
    }
}
