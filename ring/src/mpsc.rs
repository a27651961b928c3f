//! The multi-producer end: several threads of one process writing to one
//! consumer (the server's threads sending dispatch messages to one client).
//!
//! Same record format and the same [`Consumer`](crate::Consumer) as SPSC.
//!
//! * **Reservation is lock-free**: a CAS on a *process-private* claim counter
//!   hands each producer a disjoint span.
//! * **Publication is in claim order**: the shared `tail` may only move over
//!   contiguous, filled records, so a producer's commit waits (spinning, then
//!   yielding) until every earlier reservation is published, then stores
//!   `tail` past its own. A producer that reserved but has not committed
//!   therefore holds back only the records behind it; it never exposes a
//!   half-written one. A grant dropped without commit publishes its span as
//!   padding, so nobody waits forever on it.
//! * The words producers coordinate on (`claim`, `published`, the head
//!   cache) live in private memory: the consumer's process cannot make the
//!   producers spin or overwrite unconsumed data by scribbling on them. The
//!   shared header is only written (`tail`) or read and validated (`head`).
//!
//! **Provenance.** This is the claim/publish design of the LMAX Disruptor's
//! multi-producer sequencer (claim a range with a CAS on a cursor, fill it,
//! publish), applied to variable-length records: where the Disruptor publishes each slot in an
//! availability buffer and lets the consumer scan it, here producers hand
//! publication on in claim order (`published`, sync point TURN) so that the
//! consumer sees one shared `tail`, exactly as with SPSC, and the consumer's
//! process never sees or writes the producers' coordination words.

use std::io::IoSlice;
use std::sync::Arc;

use crate::error::{Corruption, PushError, RingAttachError};
use crate::flow::{raise_if_high, FlowChange, FlowState};
use crate::header::{positions_ok, record_size, RingRef, RECORD_HEADER};
use crate::record::Kind;
use crate::region::Region;
use crate::spsc::{plan, write_headers, Plan};
use crate::sync::{publish_ordering, spin_hint, yield_now, AtomicU64, Ordering};
use crate::wait::{WaitHandle, WaitPoint};

#[derive(Debug)]
struct Shared {
    ring: RingRef,
    /// End of the last reservation. Private; only ever increases.
    /// Invariant: `published <= claim`; every span between them is reserved
    /// by a live grant or being published (a dropped grant publishes its
    /// span as padding), so `published` always catches up with `claim`.
    claim: AtomicU64,
    /// End of the last publication (equal to the shared `tail` we last
    /// stored). Private; only ever increases, and only by the producer whose
    /// reservation starts at it. Release-stored by the publishing producer,
    /// Acquire-loaded by the next in line (sync point TURN).
    published: AtomicU64,
    /// Largest validated consumer position seen by any producer.
    /// Release/Acquire so a producer that uses another's observation also
    /// inherits its happens-before edge with the consumer (sync point HEAD).
    head_cache: AtomicU64,
}

/// The writing end of a multi-producer ring: `Clone + Send + Sync`; every
/// clone is one more producer.
///
/// # Examples
///
/// Four threads write into one ring; each thread's records arrive in the
/// order it committed them, and none is lost.
///
/// ```
/// use std::sync::Arc;
/// use coroipc_ring::{init, required_size, Consumer, HeapRegion, MpscProducer, Region, RingConfig};
///
/// let config = RingConfig::new(1 << 16);
/// let region: Arc<dyn Region> = Arc::new(HeapRegion::new(required_size(config.capacity)));
/// init(&region, 0, region.len(), &config).unwrap();
/// let tx = MpscProducer::attach(region.clone(), 0, region.len()).unwrap();
/// let mut rx = Consumer::attach(region.clone(), 0, region.len()).unwrap();
///
/// std::thread::scope(|s| {
///     for thread in 0..4u8 {
///         let tx = tx.clone();
///         s.spawn(move || {
///             for i in 0..100u8 {
///                 // 400 records of 16 bytes fill 6400 of 65536: never full.
///                 let _ = tx.try_push(&[thread, i]).unwrap();
///             }
///         });
///     }
/// });
///
/// let mut next = [0u8; 4];
/// while let Ok(record) = rx.try_pop_vec() {
///     let (thread, i) = (record[0] as usize, record[1]);
///     assert_eq!(i, next[thread]);
///     next[thread] += 1;
/// }
/// assert_eq!(next, [100; 4]);
/// ```
#[derive(Debug, Clone)]
pub struct MpscProducer {
    shared: Arc<Shared>,
}

/// Space reserved by one producer. Commit it; dropping it publishes the span
/// as padding.
#[derive(Debug)]
pub struct MpscWriteGrant<'a> {
    shared: &'a Shared,
    /// Start of the span `start..start + plan.advance` this grant claimed
    /// alone (the claim CAS moved `claim` from `start` past it).
    start: u64,
    /// Where the record goes inside the span.
    plan: Plan,
    /// Payload length. Invariant: `len <= max_record`.
    len: usize,
    /// Whether `commit` published the span. Invariant: the span is
    /// published exactly once, by `commit` or else by `drop` (as padding),
    /// so the producers behind it never wait forever.
    done: bool,
}

impl MpscProducer {
    /// Attaches the (single) multi-producer handle to the ring at
    /// `region[offset..offset + len]`; clone it for more producers.
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
        Ok(Self {
            shared: Arc::new(Shared {
                ring,
                claim: AtomicU64::new(tail),
                published: AtomicU64::new(tail),
                head_cache: AtomicU64::new(head),
            }),
        })
    }

    /// Data area size in bytes.
    pub fn capacity(&self) -> u64 {
        self.shared.ring.layout.capacity
    }

    /// Largest record payload the ring carries.
    pub fn max_record(&self) -> u64 {
        self.shared.ring.layout.max_record
    }

    /// Reserves space for a record with a `len`-byte payload. Lock-free;
    /// never blocks.
    ///
    /// # Errors
    ///
    /// [`PushError::Full`], [`PushError::TooBig`] or
    /// [`PushError::Corrupt`], as for the SPSC producer.
    pub fn try_reserve(&self, len: usize) -> Result<MpscWriteGrant<'_>, PushError> {
        let s = &*self.shared;
        let max = s.ring.layout.max_record;
        if len as u64 > max {
            return Err(PushError::TooBig { len: len as u64, max });
        }
        let size = record_size(len as u64);
        let cap = s.ring.layout.capacity;
        // SYNC CLAIM: the claim CAS is Release and every claim load Acquire,
        // so whoever reads a claim `c` also sees a consumer position at least
        // as new as the one the claiming producer checked (`c - head <= cap`).
        let mut claim = s.claim.load(Ordering::Acquire);
        loop {
            let plan = plan(&s.ring, claim, size);
            let mut head = s.head_cache.load(Ordering::Acquire);
            let used = claim.wrapping_sub(head);
            if used > cap || used + plan.advance > cap {
                // SYNC HEAD: pairs with the consumer's Release store.
                let fresh = s.ring.header().head.0.load(Ordering::Acquire);
                if !positions_ok(fresh, claim, cap) {
                    // Not within a capacity behind our claim. A healthy head
                    // can still be *ahead* of it if other producers claimed,
                    // published and the consumer caught up meanwhile: start
                    // over from the current claim before calling it
                    // corruption (found by the loom model
                    // `reserve_on_healthy_ring_never_reports_corrupt`).
                    let now = s.claim.load(Ordering::Acquire);
                    if now != claim {
                        claim = now;
                        continue;
                    }
                    return Err(PushError::Corrupt(Corruption::Head { head: fresh, tail: claim }));
                }
                head = fresh;
                s.head_cache.fetch_max(head, Ordering::AcqRel);
                if claim - head + plan.advance > cap {
                    return Err(PushError::Full);
                }
            }
            match s.claim.compare_exchange_weak(
                claim,
                claim + plan.advance,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(MpscWriteGrant { shared: s, start: claim, plan, len, done: false }),
                Err(now) => claim = now,
            }
        }
    }

    /// Whether a record with a `len`-byte payload fits now (a snapshot:
    /// other producers may take the space first). A corrupt consumer
    /// position counts as "fits", so that the next `try_reserve` reports it.
    pub fn has_space_uncached(&self, len: usize) -> bool {
        let s = &*self.shared;
        // SYNC CLAIM / HEAD as in `try_reserve`.
        let claim = s.claim.load(Ordering::Acquire);
        let head = s.ring.header().head.0.load(Ordering::Acquire);
        let plan = plan(&s.ring, claim, record_size(len as u64));
        let used = claim.wrapping_sub(head);
        // Anything odd (a head that overtook this claim, or corruption) is
        // left to `try_reserve` to sort out.
        used > s.ring.layout.capacity || used + plan.advance <= s.ring.layout.capacity
    }

    /// Copies `payload` into one record and publishes it.
    ///
    /// # Errors
    ///
    /// As [`try_reserve`](Self::try_reserve); nothing is written on error.
    pub fn try_push(&self, payload: &[u8]) -> Result<FlowChange, PushError> {
        let mut grant = self.try_reserve(payload.len())?;
        grant.write_at(0, payload);
        Ok(grant.commit())
    }

    /// Gathers `parts` into one record and publishes it.
    ///
    /// # Errors
    ///
    /// As [`try_push`](Self::try_push).
    pub fn try_push_vectored(&self, parts: &[IoSlice<'_>]) -> Result<FlowChange, PushError> {
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
        FlowState::from_word(self.shared.ring.header().flow.0.load(Ordering::Relaxed))
    }

    /// An owned handle on [`data_wait`](Self::data_wait).
    pub fn data_wait_handle(&self) -> WaitHandle {
        WaitHandle::new(&self.shared.ring.header().data_wait.0, self.shared.ring.region())
    }

    /// An owned handle on [`space_wait`](Self::space_wait).
    pub fn space_wait_handle(&self) -> WaitHandle {
        WaitHandle::new(&self.shared.ring.header().space_wait.0, self.shared.ring.region())
    }

    /// Where the consumer sleeps waiting for data; call
    /// [`WaitPoint::notify`] on it after committing.
    pub fn data_wait(&self) -> WaitPoint<'_> {
        WaitPoint::new(&self.shared.ring.header().data_wait.0)
    }

    /// Where producers sleep waiting for space (the consumer notifies).
    pub fn space_wait(&self) -> WaitPoint<'_> {
        WaitPoint::new(&self.shared.ring.header().space_wait.0)
    }
}

impl MpscWriteGrant<'_> {
    /// Payload length reserved.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the reserved payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `src` into the payload at `offset`.
    ///
    /// # Panics
    ///
    /// Panics if `offset + src.len()` exceeds the reserved length.
    pub fn write_at(&mut self, offset: usize, src: &[u8]) {
        assert!(offset <= self.len && src.len() <= self.len - offset, "write past the reserved record");
        let at = (self.plan.index + RECORD_HEADER) as usize + offset;
        self.shared.ring.data.write(at, src);
    }

    /// Publishes the record once every earlier reservation is published.
    /// Returns [`FlowChange::Raised`] if it switched flow control on.
    pub fn commit(mut self) -> FlowChange {
        self.done = true;
        self.publish(Kind::Data)
    }

    fn publish(&self, kind: Kind) -> FlowChange {
        let s = self.shared;
        let (kind, len) = match kind {
            Kind::Data => (Kind::Data, self.len as u64),
            // An abandoned span: one padding record over the record's size.
            Kind::Padding => (Kind::Padding, record_size(self.len as u64) - RECORD_HEADER),
        };
        write_headers(&s.ring, &self.plan, kind, len);
        let end = self.start + self.plan.advance;
        // SYNC TURN: wait until every earlier reservation is published; the
        // Acquire pairs with their Release of `published`, so their bytes
        // happen-before our `tail` store too.
        let mut spins = 0u32;
        while s.published.load(Ordering::Acquire) != self.start {
            if spins < 64 {
                spin_hint();
                spins += 1;
            } else {
                yield_now();
            }
        }
        // SYNC TAIL: publishes this record and, transitively, the earlier ones.
        s.ring.header().tail.0.store(end, publish_ordering());
        s.published.store(end, Ordering::Release);
        raise_if_high(&s.ring, end, s.head_cache.load(Ordering::Acquire), |head| {
            s.head_cache.fetch_max(head, Ordering::AcqRel);
        })
    }
}

impl Drop for MpscWriteGrant<'_> {
    /// Publishes the abandoned span as padding. A flow-control transition
    /// this causes is not reported (there is nobody to report it to); the
    /// state itself is in the shared header.
    fn drop(&mut self) {
        if !self.done {
            let _ = self.publish(Kind::Padding);
        }
    }
}
