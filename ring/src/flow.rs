//! Flow-control watermarks with hysteresis.
//!
//! The state lives in the shared header so both sides can read it:
//!
//! | state | entered when                                   | by        |
//! |-------|------------------------------------------------|-----------|
//! | `Off` | initially; a release leaves fill `<= low`       | consumer  |
//! | `On`  | a commit leaves fill `>= high`                  | producer  |
//!
//! Between `low` and `high` the state does not change (hysteresis).
//!
//! Invariant: once both sides are quiescent, `On` implies `fill > low`.
//! Without care this breaks when the producer decides to raise on a stale
//! head while the consumer drains the ring and sees `Off`: flow control would
//! then stay on over an empty ring. Both sides therefore run a Dekker-style
//! handshake (sync point FLOW): the producer stores `On`, issues
//! `fence(SeqCst)`, re-reads `head`, and withdraws if the ring drained; the
//! consumer stores `head`, issues `fence(SeqCst)`, and reads the state. The
//! two fences guarantee at least one side sees the other's store. This is
//! the store-fence-load pattern of Dekker's mutual-exclusion algorithm (each
//! side writes its own flag, then reads the other's), used here not to
//! exclude but to make sure one side notices the other; the withdrawal
//! (a CAS back to `Off`) keeps every transition reported exactly once.
//! Modelled in `coroipc-verification` (`loom_flow`, including a wrap over
//! padding).

/// Fill levels in bytes that switch flow control on (`high`) and off (`low`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermarks {
    /// Fill level at or above which flow control turns on.
    pub high: u64,
    /// Fill level at or below which flow control turns off.
    pub low: u64,
}

impl Watermarks {
    /// Watermarks at fractions of `capacity`: on at `high_pct`% full, off at
    /// `low_pct`% full.
    pub const fn percent(capacity: u64, high_pct: u64, low_pct: u64) -> Self {
        Self { high: capacity / 100 * high_pct, low: capacity / 100 * low_pct }
    }

    /// Whether these watermarks make sense for a ring of `capacity` bytes.
    pub const fn is_valid_for(&self, capacity: u64) -> bool {
        self.low < self.high && self.high <= capacity
    }
}

/// The flow-control state as both sides see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum FlowState {
    /// The consumer keeps up; producers may send.
    Off = 0,
    /// The ring filled past the high watermark; producers should hold off
    /// until it drains to the low watermark.
    On = 1,
}

impl FlowState {
    /// Decodes a state word written by a possibly hostile peer: any value
    /// other than `Off` counts as `On` (the conservative reading).
    #[inline]
    pub(crate) fn from_word(word: u32) -> Self {
        if word == Self::Off as u32 {
            Self::Off
        } else {
            Self::On
        }
    }
}

/// A transition an operation caused, reported so the caller can count it,
/// wake someone or tell its user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FlowChange {
    /// No transition.
    #[default]
    None,
    /// This commit switched flow control on.
    Raised,
    /// This release switched flow control off.
    Cleared,
}

use crate::header::RingRef;
use crate::sync::{fence, Ordering};

/// The producer half of the flow-control handshake, run after publishing
/// `tail`. `head_hint` is the producer's cached consumer position (never
/// newer than the real one, so the fill it gives is an upper bound and the
/// common case costs no shared-memory read). When the hint says "high",
/// the real head is read; `refresh` is then called with it (validated), so
/// the caller can update its cache and the next commit is cheap again
/// (without it, a stale hint sent every commit down this path: 14% of the
/// `ev64` profile).
#[inline]
pub(crate) fn raise_if_high(
    ring: &RingRef,
    tail: u64,
    head_hint: u64,
    refresh: impl FnOnce(u64),
) -> FlowChange {
    let Some(w) = ring.layout.watermarks else {
        return FlowChange::None;
    };
    if tail.wrapping_sub(head_hint) < w.high {
        return FlowChange::None;
    }
    raise_slow(ring, w, tail, refresh)
}

#[cold]
fn raise_slow(ring: &RingRef, w: Watermarks, tail: u64, refresh: impl FnOnce(u64)) -> FlowChange {
    let header = ring.header();
    // `tail` is the end of *our* publication. An MPSC producer's end can be
    // behind the shared tail, and the consumer may already have consumed
    // past it: a head up to a capacity ahead of `tail` means "drained past
    // us", fill 0 (found by the loom model `mpsc_flow_never_stays_on_over_a_drained_ring`).
    let cap = ring.layout.capacity;
    let fill = |head: u64| {
        let fill = tail.wrapping_sub(head);
        if fill <= cap {
            Some(fill)
        } else if head.wrapping_sub(tail) <= cap {
            Some(0)
        } else {
            None
        }
    };
    let head = header.head.0.load(Ordering::Acquire);
    let Some(f) = fill(head) else {
        return FlowChange::None; // corrupt head: the next reserve reports it
    };
    if tail.wrapping_sub(head) <= ring.layout.capacity && head.is_multiple_of(8) {
        refresh(head); // a valid head no further than `tail`
    }
    if f < w.high {
        return FlowChange::None;
    }
    if header
        .flow
        .0
        .compare_exchange(FlowState::Off as u32, FlowState::On as u32, Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        return FlowChange::None; // already on (or garbage, which reads as on)
    }
    // SYNC FLOW: orders our `On` store before the head re-read; pairs with
    // the consumer's fence between its head store and its state load.
    fence(Ordering::SeqCst);
    match fill(header.head.0.load(Ordering::Relaxed)) {
        Some(f) if f <= w.low => {
            // The consumer drained the ring while we raised and may have
            // missed our store: withdraw.
            // If it saw it (and reported `Cleared`), our CAS fails and we
            // report `Raised` so the transitions stay paired.
            let withdrawn = header
                .flow
                .0
                .compare_exchange(
                    FlowState::On as u32,
                    FlowState::Off as u32,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
            if withdrawn {
                FlowChange::None
            } else {
                FlowChange::Raised
            }
        }
        _ => FlowChange::Raised,
    }
}
