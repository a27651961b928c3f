//! The one place this crate takes its synchronisation primitives from.
//!
//! Under `--cfg coroipc_loom` every primitive is loom's, so the models in
//! `coroipc-verification` explore all interleavings and weak-memory outcomes
//! of the very code that runs in production; otherwise they are `core`'s.
//! The ring's own code names `core::sync::atomic` or `loom` nowhere else
//! (the pattern of crossbeam's `primitive` module and tokio's `src/loom`);
//! the exceptions are the public `atomic` re-export in `lib.rs` (so that
//! region backends and the models name the same types) and the loom-only
//! data cells of `HeapRegion` in `region.rs`.

#[cfg(not(coroipc_loom))]
pub(crate) use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

#[cfg(coroipc_loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// A hint inside a spin loop. Under loom a spin loop must yield to let the
/// model schedule the thread it waits for.
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(not(coroipc_loom))]
    core::hint::spin_loop();
    #[cfg(coroipc_loom)]
    loom::thread::yield_now();
}

/// Gives the processor away while waiting for another *thread of this
/// process* (MPSC producers waiting for their turn to publish).
#[inline]
pub(crate) fn yield_now() {
    #[cfg(not(coroipc_loom))]
    std::thread::yield_now();
    #[cfg(coroipc_loom)]
    loom::thread::yield_now();
}

/// The ordering of the publication store (sync point TAIL): `Release`.
///
/// Under loom a model can switch it to `Relaxed` through
/// [`crate::loom_teeth`] to show that the models catch a weakened ordering.
#[inline(always)]
pub(crate) fn publish_ordering() -> Ordering {
    #[cfg(coroipc_loom)]
    if crate::loom_teeth::WEAK_PUBLISH.load(std::sync::atomic::Ordering::Relaxed) {
        return Ordering::Relaxed;
    }
    Ordering::Release
}
