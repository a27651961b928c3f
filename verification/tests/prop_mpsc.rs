//! proptest state machine: the MPSC ring (one producer handle, so the order of claims is the order of calls; a dropped grant becomes padding) against a `VecDeque` model
//! (see `prop_common`) over long random sequences of push, reserve+commit,
//! reserve+drop, peek+release, peek+keep and pop (buffers too small
//! included), on capacities 64..=4096 with wrap-heavy record sizes and
//! optional watermarks.
#![cfg(not(coroipc_loom))]

mod prop_common;

use prop_common::{Flavour, RingTest};
use proptest_state_machine::prop_state_machine;

struct Mpsc;
impl Flavour for Mpsc {
    const MPSC: bool = true;
}

prop_state_machine! {
    #[test]
    fn mpsc_ring_matches_vecdeque_model(sequential 1..400 => RingTest<Mpsc>);
}
