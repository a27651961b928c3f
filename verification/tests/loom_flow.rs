//! loom models of the flow-control watermarks (`ring/src/flow.rs`, sync
//! point FLOW) under concurrent push and pop.
//!
//! What `flow.rs` and `Consumer::publish_head` guarantee, and what is
//! asserted once both sides are quiescent:
//!
//! 1. `FlowState::On` implies `fill > low` (no flow control left on over a
//!    drained ring, the Dekker handshake between the producer's raise and
//!    the consumer's release).
//! 2. Transitions are paired: `#Raised − #Cleared` reported by commits and
//!    releases equals 1 if the state is `On`, else 0 (a producer that
//!    withdraws its own raise reports nothing; one whose withdrawal loses to
//!    the consumer's clear reports `Raised`).
//!
//! The first model's records (16 bytes in a 64-byte ring) never need
//! padding; `flow_control_holds_across_a_padding_skip` makes the producer
//! wrap, so the consumer's skip over the padding record (a release inside
//! `try_peek`, whose transition is reported by the next
//! `ReadGrant::release`) takes part in the handshake.
#![cfg(coroipc_loom)]

use std::sync::Arc;

use coroipc_ring::{FlowChange, FlowState, RingConfig, Watermarks};
use coroipc_verification::loom_support::{
    decode, mpsc_producer, new_ring, payload, push_mpsc, BlockingConsumer, BlockingProducer, LoomFutex,
};
use loom::thread;

const RECORD: u64 = 16; // payload 8 + header 8

fn count(changes: &[FlowChange], which: FlowChange) -> i64 {
    changes.iter().filter(|&&c| c == which).count() as i64
}

/// The checks once both sides are quiescent (invariants 1 and 2 above):
/// both sides see the same state, `On` implies `fill > low`, and the
/// transitions reported by commits (`raised`) and releases (`cleared`) pair
/// up with the state. Returns all of them, for [`assert_drained`].
fn assert_quiescent(
    tx: &BlockingProducer,
    rx: &BlockingConsumer,
    fill: u64,
    w: Watermarks,
    raised: &[FlowChange],
    cleared: &[FlowChange],
) -> Vec<FlowChange> {
    let on = rx.rx.flow_state() == FlowState::On;
    assert_eq!(tx.tx.flow_state(), rx.rx.flow_state(), "both sides read the same shared state");
    assert!(!on || fill > w.low, "flow state On implies fill > low (fill {fill})");
    let all: Vec<_> = raised.iter().chain(cleared).copied().collect();
    assert_eq!(
        count(&all, FlowChange::Raised) - count(&all, FlowChange::Cleared),
        i64::from(on),
        "reported Raised/Cleared transitions must pair up with the final state"
    );
    all
}

/// The checks once the consumer drained the ring: flow control is off and
/// every `Raised` was matched by exactly one reported `Cleared`.
fn assert_drained(rx: &BlockingConsumer, changes: &[FlowChange]) {
    assert_eq!(rx.rx.flow_state(), FlowState::Off, "a drained ring has flow control off");
    assert_eq!(
        count(changes, FlowChange::Raised),
        count(changes, FlowChange::Cleared),
        "every Raised is matched by exactly one Cleared once drained"
    );
}

#[test]
fn watermark_hysteresis_holds_under_concurrent_push_and_pop() {
    const W: Watermarks = Watermarks { high: 48, low: 16 };
    const POPS: u64 = 2;
    loom::model(|| {
        let region = new_ring(&RingConfig::new(64).with_watermarks(W));
        let futex = Arc::new(LoomFutex::new());
        let mut tx = BlockingProducer::new(&region, &futex);
        let mut rx = BlockingConsumer::new(&region, &futex);

        // Push until flow control is raised (at most 5 records: with only
        // two pops, the fifth leaves the ring at the high watermark).
        let writer = thread::spawn(move || {
            let mut changes = Vec::new();
            for seq in 0..5u8 {
                let change = tx.push(&payload(0, seq, 8));
                changes.push(change);
                if change == FlowChange::Raised {
                    break;
                }
            }
            (tx, changes)
        });
        let mut cleared = Vec::new();
        for seq in 0..POPS as u8 {
            let (bytes, change) = rx.pop();
            assert_eq!(decode(&bytes), (0, seq), "records in order");
            cleared.push(change);
        }
        let (tx, raised) = writer.join().expect("producer thread");
        assert!(
            raised.contains(&FlowChange::Raised),
            "five records against two pops must raise flow control"
        );

        let fill = (raised.len() as u64 - POPS) * RECORD;
        let all = assert_quiescent(&tx, &rx, fill, W, &raised, &cleared);

        // Drain: the last release at or below `low` clears, exactly once.
        let mut drained = all;
        while let Some((_, change)) = rx.try_pop() {
            drained.push(change);
        }
        assert_drained(&rx, &drained);
    });
}

/// Ring bug, see README: in MPSC, `raise_slow` (ring/src/flow.rs) computes
/// the fill from the committing producer's own `end`, not the shared tail.
/// When a later producer has published and the consumer drained past `end`
/// before the re-read of `head`, `fill()` sees `head > end`, returns `None`,
/// and the `_ => Raised` arm keeps flow control On over an empty ring.
#[test]
fn mpsc_flow_never_stays_on_over_a_drained_ring() {
    const W: Watermarks = Watermarks { high: 32, low: 16 };
    loom::model(|| {
        let region = new_ring(&RingConfig::new(64).with_watermarks(W));
        let futex = Arc::new(LoomFutex::new());
        let tx = mpsc_producer(&region);
        let mut rx = BlockingConsumer::new(&region, &futex);
        let (a_tx, a_futex) = (tx.clone(), futex.clone());
        let a = thread::spawn(move || push_mpsc(&a_tx, &a_futex, &payload(0, 0, 24)));
        let (b_tx, b_futex) = (tx.clone(), futex.clone());
        let b = thread::spawn(move || push_mpsc(&b_tx, &b_futex, &payload(1, 0, 8)));
        let mut changes = vec![rx.pop().1, rx.pop().1];
        changes.push(a.join().expect("producer 0"));
        changes.push(b.join().expect("producer 1"));
        let on = tx.flow_state() == FlowState::On;
        assert!(!on, "flow state On implies fill > low, and the ring is empty");
        assert_eq!(
            count(&changes, FlowChange::Raised) - count(&changes, FlowChange::Cleared),
            i64::from(on),
            "reported transitions must pair up with the final state"
        );
    });
}

/// Records of 24 bytes in a 64-byte ring: the third does not fit in the 16
/// bytes before the end, so the producer writes a 16-byte padding record and
/// wraps (and must wait for the consumer to free the first record). The
/// padding counts in the fill; the consumer releases it inside `try_peek`
/// before the third record. With `low` at one record, that skip is the
/// release that clears flow control whenever the third commit raised it
/// (the third record's own release then finds it off), so a dropped report
/// of the skip's `Cleared` leaves the transitions unpaired. Same assertions
/// as above, at quiescence and after draining.
#[test]
fn flow_control_holds_across_a_padding_skip() {
    const W: Watermarks = Watermarks { high: 40, low: 24 };
    const RECORD: u64 = 24; // payload 16 + header 8
    const POPS: u64 = 2;
    loom::model(|| {
        let region = new_ring(&RingConfig::new(64).with_watermarks(W));
        let futex = Arc::new(LoomFutex::new());
        let mut tx = BlockingProducer::new(&region, &futex);
        let mut rx = BlockingConsumer::new(&region, &futex);

        let writer = thread::spawn(move || {
            let changes: Vec<_> = (0..3u8).map(|seq| tx.push(&payload(0, seq, 16))).collect();
            (tx, changes)
        });
        let mut cleared = Vec::new();
        for seq in 0..POPS as u8 {
            let (bytes, change) = rx.pop();
            assert_eq!(decode(&bytes), (0, seq), "records in order");
            cleared.push(change);
        }
        let (tx, raised) = writer.join().expect("producer thread");

        // Three records and one padding record published, two records
        // consumed: the third record and the padding are left, whether or
        // not the consumer has skipped the padding yet (it skips it only
        // when it peeks the third record, which it has not).
        let fill = 3 * RECORD + 16 - POPS * RECORD;
        let all = assert_quiescent(&tx, &rx, fill, W, &raised, &cleared);

        let mut drained = all;
        let (bytes, change) = rx.try_pop().expect("the third record is published");
        assert_eq!(decode(&bytes), (0, 2), "the record after the padding");
        drained.push(change);
        assert!(rx.try_pop().is_none(), "three records, no more");
        assert_drained(&rx, &drained); // the padding skip's Cleared included
    });
}
