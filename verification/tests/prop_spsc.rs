//! proptest state machine: the SPSC ring against a `VecDeque` model
//! (see `prop_common`) over long random sequences of push, reserve+commit,
//! reserve+drop, peek+release, peek+keep and pop (buffers too small
//! included), on capacities 64..=4096 with wrap-heavy record sizes and
//! optional watermarks.
#![cfg(not(coroipc_loom))]

mod prop_common;

use prop_common::{Flavour, RingTest};
use proptest_state_machine::prop_state_machine;

struct Spsc;
impl Flavour for Spsc {
    const MPSC: bool = false;
}

prop_state_machine! {
    #[test]
    fn spsc_ring_matches_vecdeque_model(sequential 1..400 => RingTest<Spsc>);
}

/// Regression test of a ring finding (see README): a release that happens
/// while `try_peek` skips a padding record can switch flow control off; the
/// resulting `FlowChange::Cleared` used to be dropped. The consumer now
/// keeps it and reports it from the next `ReadGrant::release`, and this test
/// checks that every transition is reported once. (The state machine above
/// still allows silent transitions where the API documents them:
/// `try_pop`/`try_pop_vec` and a dropped MPSC grant.)
#[test]
fn every_flow_transition_is_reported_once() {
    use std::sync::Arc;

    use coroipc_ring::{
        init, required_size, Consumer, FlowChange, FlowState, HeapRegion, Producer, Region, RingConfig,
        Watermarks,
    };

    let config = RingConfig::new(64).with_watermarks(Watermarks { high: 48, low: 24 });
    let size = required_size(64);
    let region: Arc<dyn Region> = Arc::new(HeapRegion::new(size));
    init(&region, 0, size, &config).expect("valid config");
    let mut tx = Producer::attach(region.clone(), 0, size).expect("attach");
    let mut rx = Consumer::attach(region.clone(), 0, size).expect("attach");
    let mut changes = Vec::new();
    let release = |rx: &mut Consumer| rx.try_peek().expect("a record").release();

    changes.push(tx.try_push(&[1; 24]).expect("room")); // [0, 32)
    changes.push(tx.try_push(&[2; 8]).expect("room")); // [32, 48): fill 48, Raised
    changes.push(release(&mut rx)); // fill 16: Cleared
    changes.push(tx.try_push(&[3; 16]).expect("room")); // padding [48, 64) + [64, 88): fill 56, Raised
    changes.push(release(&mut rx)); // fill 40
    changes.push(release(&mut rx)); // padding skip: fill 24 <= low, clears silently; then fill 0

    assert_eq!(rx.flow_state(), FlowState::Off, "a drained ring has flow control off");
    let raised = changes.iter().filter(|&&c| c == FlowChange::Raised).count();
    let cleared = changes.iter().filter(|&&c| c == FlowChange::Cleared).count();
    assert_eq!(
        raised, cleared,
        "every On -> Off transition is reported as Cleared exactly once: {changes:?}"
    );
}
