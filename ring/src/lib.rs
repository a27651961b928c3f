//! # coroipc-ring — layer 1 of coroipc-rs
//!
//! Record rings over raw memory that another, untrusted process may share:
//! one single-producer ring ([`Producer`] → [`Consumer`]) for the request and
//! response channels, one multi-producer ring ([`MpscProducer`] →
//! [`Consumer`]) for the dispatch channel. No syscalls: waking is left to a
//! [`Notify`] backend supplied by the caller (`coroipc-transport` uses futexes
//! and eventfds).
//!
//! ## Guarantees
//!
//! * **Records, zero-copy.** Variable-length records, 8-byte aligned, always
//!   contiguous (a padding record fills the end of the data area before a
//!   wrap). Writers reserve → fill → commit; readers peek → use → release.
//!   Copying helpers (`try_push`, `try_push_vectored`, `try_pop`) sit on top.
//! * **Non-blocking.** Every `try_*` call returns at once. SPSC endpoints are
//!   wait-free; MPSC reservation is lock-free and publication waits only for
//!   earlier reservations of the same process (see [`mpsc`]).
//! * **Full and empty.** [`PushError::Full`]: the record does not fit in the
//!   free space now (try again after the consumer releases).
//!   [`PopError::Empty`]: nothing published. A record never exceeds half the
//!   capacity, so any record fits an empty ring.
//! * **No allocation** on any ring operation (`try_pop_vec` aside).
//! * **Flow control.** Optional [`Watermarks`] with hysteresis; the state is
//!   in the shared header and transitions are returned as [`FlowChange`].
//! * **Hostile peers.** The peer may write any byte of the ring at any time.
//!   Every position, length and kind is read once into a local, validated and
//!   only then used: a corrupt ring yields [`PopError::Corrupt`] /
//!   [`PushError::Corrupt`] (or an attach error), never a panic, an
//!   out-of-bounds access or an endless loop. What a hostile peer *can* do is
//!   change payload bytes while they are read (copy them out first, see
//!   [`ReadGrant::as_slice`]) and stall or flood its own connection.
//!
//! ## Example
//!
//! ```
//! use std::sync::Arc;
//! use coroipc_ring::{init, required_size, Consumer, HeapRegion, Producer, Region, RingConfig};
//!
//! let config = RingConfig::new(4096);
//! let region: Arc<dyn Region> = Arc::new(HeapRegion::new(required_size(config.capacity)));
//! init(&region, 0, region.len(), &config).unwrap();
//! let mut tx = Producer::attach(region.clone(), 0, region.len()).unwrap();
//! let mut rx = Consumer::attach(region.clone(), 0, region.len()).unwrap();
//!
//! // Zero-copy write: reserve, fill, commit.
//! let mut grant = tx.try_reserve(5).unwrap();
//! grant.write_at(0, b"hello");
//! let _ = grant.commit();
//!
//! // Zero-copy read: peek, use, release.
//! let grant = rx.try_peek().unwrap();
//! assert_eq!(grant.to_vec(), b"hello");
//! let _ = grant.release();
//! assert!(rx.try_peek().is_err());
//! ```
#![warn(clippy::undocumented_unsafe_blocks)]

mod consumer;
mod error;
mod flow;
mod header;
pub mod mpsc;
mod record;
mod region;
mod spsc;
pub(crate) mod sync;
mod wait;

#[doc(hidden)]
pub mod fuzz;
#[doc(hidden)]
pub mod model;

pub use consumer::{Consumer, DataWatch, ReadGrant};
pub use error::{Corruption, PopError, PushError, RingAttachError, RingInitError};
pub use flow::{FlowChange, FlowState, Watermarks};
pub use header::{
    init, max_payload_for, record_size, required_size, RingConfig, MAX_CAPACITY, MIN_CAPACITY, RECORD_HEADER,
    RING_MAGIC, RING_VERSION,
};
pub use mpsc::{MpscProducer, MpscWriteGrant};
pub use region::{HeapRegion, Region, REGION_ALIGN};
pub use spsc::{Producer, WriteGrant};
pub use wait::{Announcement, Notify, WaitHandle, WaitPoint, POLL_WAITER};

/// Re-exported synchronisation types so backends and models name the same
/// atomics the ring uses (loom's under `--cfg coroipc_loom`).
pub mod atomic {
    #[cfg(not(coroipc_loom))]
    pub use core::sync::atomic::{AtomicU32, AtomicU64};
    #[cfg(coroipc_loom)]
    pub use loom::sync::atomic::{AtomicU32, AtomicU64};
}

/// Switches that deliberately break the ring, so the loom models can show
/// they catch the breakage ("teeth"). Only compiled under loom.
#[cfg(coroipc_loom)]
#[doc(hidden)]
pub mod loom_teeth {
    use std::sync::atomic::AtomicBool;
    /// Weakens the publication store of `tail` from Release to Relaxed.
    pub static WEAK_PUBLISH: AtomicBool = AtomicBool::new(false);
    /// Removes the re-check between announcing and sleeping.
    pub static SKIP_RECHECK: AtomicBool = AtomicBool::new(false);
}
