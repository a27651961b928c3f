//! The proptest state machines shared by `prop_spsc.rs` and `prop_mpsc.rs`:
//! the ring's reference model (`coroipc_ring::model`, the one the
//! `ring_ops` fuzz target checks against too) as proptest-state-machine's
//! `ReferenceStateMachine`, a real ring in a heap region as the system under
//! test, and the strategies that pick capacities, watermarks and
//! wrap-heavy operation sequences. After every transition the outcome and
//! the flow state are compared with the model.

use coroipc_ring::max_payload_for;
use coroipc_ring::model::{Model, Op, RealRing};
use coroipc_ring::Watermarks;
use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};

/// Which producer end the machine drives.
pub trait Flavour: 'static {
    /// True for the multi-producer ring (a dropped grant becomes padding).
    const MPSC: bool;
}

/// Ring capacities 64..=4096 bytes.
pub fn capacity() -> impl Strategy<Value = u64> {
    (6u32..=12).prop_map(|shift| 1u64 << shift)
}

/// Watermarks for a ring of `cap` bytes, or none.
pub fn watermarks(cap: u64) -> impl Strategy<Value = Option<Watermarks>> {
    prop_oneof![
        1 => Just(None),
        3 => (1u64..=cap / 8).prop_flat_map(move |high8| (Just(high8 * 8), 0u64..high8))
            .prop_map(|(high, low8)| Some(Watermarks { high, low: low8 * 8 })),
    ]
}

/// Payload lengths biased to wrap: near half the capacity (the largest
/// record), near a quarter, tiny, and a few over the maximum.
pub fn payload_len(cap: u64) -> impl Strategy<Value = usize> {
    let max = max_payload_for(cap) as usize;
    prop_oneof![
        3 => max.saturating_sub(16)..=max,
        2 => (cap as usize / 4).saturating_sub(12)..=cap as usize / 4 + 4,
        2 => 0usize..=16,
        2 => 0usize..=max,
        1 => max + 1..=max + 16,
    ]
}

/// One operation, with lengths for a ring of `cap` bytes.
pub fn op(cap: u64) -> impl Strategy<Value = Op> {
    let max = max_payload_for(cap) as usize;
    prop_oneof![
        3 => (payload_len(cap), any::<u8>()).prop_map(|(len, seed)| Op::Push { len, seed }),
        2 => (payload_len(cap), any::<u8>()).prop_map(|(len, seed)| Op::ReserveCommit { len, seed }),
        1 => (payload_len(cap), any::<u8>()).prop_map(|(len, seed)| Op::ReserveDrop { len, seed }),
        3 => Just(Op::PeekRelease),
        1 => Just(Op::PeekKeep),
        2 => (0usize..=max + 8).prop_map(|buf| Op::Pop { buf }),
    ]
}

/// The reference machine for flavour `F`.
pub struct RefMachine<F>(std::marker::PhantomData<F>);

impl<F: Flavour> ReferenceStateMachine for RefMachine<F> {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        capacity()
            .prop_flat_map(|cap| (Just(cap), watermarks(cap)))
            .prop_map(|(cap, watermarks)| Model::new(cap, watermarks, F::MPSC))
            .boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Op> {
        op(state.capacity()).boxed()
    }

    fn apply(mut state: Model, op: &Op) -> Model {
        state.apply(op);
        state
    }
}

/// The state-machine test for flavour `F`.
pub struct RingTest<F>(std::marker::PhantomData<F>);

impl<F: Flavour> StateMachineTest for RingTest<F> {
    type SystemUnderTest = RealRing;
    type Reference = RefMachine<F>;

    fn init_test(model: &Model) -> RealRing {
        RealRing::new(model.capacity(), model.watermarks(), F::MPSC)
    }

    fn apply(mut ring: RealRing, model: &Model, op: Op) -> RealRing {
        let outcome = ring.apply(&op);
        assert_eq!(
            &outcome,
            model.last(),
            "every operation returns what the model predicts (result, payload bytes, reported flow change) for {op:?}"
        );
        ring
    }

    fn check_invariants(ring: &RealRing, model: &Model) {
        model.check(ring);
    }
}
