//! The reference state machine shared by `prop_spsc.rs` and `prop_mpsc.rs`:
//! a `VecDeque` of records plus the position arithmetic of the ring (where
//! each record lands, when padding is needed, when the ring is full) and the
//! flow-control state, in proptest-state-machine's
//! `ReferenceStateMachine` / `StateMachineTest` style. The system under test
//! is a real ring in a heap region; after every transition the outcome and
//! the flow state are compared with the model.

use std::collections::VecDeque;
use std::sync::Arc;

use coroipc_ring::{
    init, max_payload_for, record_size, required_size, Consumer, FlowChange, FlowState, HeapRegion,
    MpscProducer, PopError, Producer, PushError, Region, RingConfig, Watermarks,
};
use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};

/// Which producer end the machine drives.
pub trait Flavour: 'static {
    /// True for the multi-producer ring (a dropped grant becomes padding).
    const MPSC: bool;
}

/// One operation on the ring. Payload bytes are derived from `seed`.
#[derive(Clone, Debug)]
pub enum Op {
    /// `try_push` of a `len`-byte payload.
    Push { len: usize, seed: u8 },
    /// `try_reserve`, fill, `commit`.
    ReserveCommit { len: usize, seed: u8 },
    /// `try_reserve`, fill part of it, drop the grant.
    ReserveDrop { len: usize, seed: u8 },
    /// `try_peek`, check, `release`.
    PeekRelease,
    /// `try_peek`, check, drop the grant (the record stays).
    PeekKeep,
    /// `try_pop` into a `buf`-byte buffer (possibly too small).
    Pop { buf: usize },
}

/// What the model says the last operation must return.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing yet.
    Start,
    /// A write succeeded (commit / push), reporting this flow change.
    Written(FlowChange),
    /// A reservation was made and dropped.
    Dropped,
    /// `PushError::Full`.
    Full,
    /// `PushError::TooBig`.
    TooBig,
    /// A read returned this payload; `FlowChange` is what the release
    /// reported (`None` when the grant was kept or the copy helper used).
    Read(Vec<u8>, FlowChange),
    /// `PopError::Empty`.
    Empty,
    /// `PopError::BufferTooSmall` naming this length.
    TooSmall(usize),
}

/// A record in the model: padding in front, its own size, its payload
/// (`None`: an abandoned MPSC span, i.e. padding).
#[derive(Clone, Debug)]
pub struct Rec {
    pad: u64,
    size: u64,
    payload: Option<Vec<u8>>,
}

/// The reference state.
#[derive(Clone, Debug)]
pub struct Model {
    pub cap: u64,
    pub max_record: u64,
    pub watermarks: Option<Watermarks>,
    pub mpsc: bool,
    /// Consumer position (bytes consumed, padding included).
    pub head: u64,
    /// Producer position (bytes published, padding included).
    pub tail: u64,
    pub queue: VecDeque<Rec>,
    pub flow_on: bool,
    /// Flow transitions the ring makes without reporting them (documented
    /// in the ring): a clear inside `try_pop`, a raise by a dropped MPSC
    /// grant, and a second clear folded into one report.
    pub silent_transitions: u64,
    /// A clear made while `try_peek` skipped padding, which the ring
    /// reports with the next `ReadGrant::release`.
    pub pending_clear: bool,
    pub last: Outcome,
}

/// The payload of a record: `len` bytes derived from `seed`.
pub fn payload_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i as u8).wrapping_mul(31))).collect()
}

impl Model {
    /// (padding, record size) of a `len`-byte record written at `tail`.
    fn plan(&self, len: usize) -> (u64, u64) {
        let size = record_size(len as u64);
        let to_end = self.cap - self.tail % self.cap;
        if size <= to_end {
            (0, size)
        } else {
            (to_end, size)
        }
    }

    fn fits(&self, len: usize) -> bool {
        let (pad, size) = self.plan(len);
        self.tail - self.head + pad + size <= self.cap
    }

    fn fill(&self) -> u64 {
        self.tail - self.head
    }

    /// Producer half of flow control after publishing; returns whether it raised.
    fn raise_if_high(&mut self) -> bool {
        match self.watermarks {
            Some(w) if !self.flow_on && self.fill() >= w.high => {
                self.flow_on = true;
                true
            }
            _ => false,
        }
    }

    /// Consumer half of flow control after moving `head`; returns whether it cleared.
    fn clear_if_low(&mut self) -> bool {
        match self.watermarks {
            Some(w) if self.flow_on && self.fill() <= w.low => {
                self.flow_on = false;
                true
            }
            _ => false,
        }
    }

    fn write(&mut self, len: usize, seed: u8, commit: bool) {
        if len as u64 > self.max_record {
            self.last = Outcome::TooBig;
            return;
        }
        if !self.fits(len) {
            self.last = Outcome::Full;
            return;
        }
        let (pad, size) = self.plan(len);
        if commit {
            self.tail += pad + size;
            self.queue.push_back(Rec { pad, size, payload: Some(payload_bytes(len, seed)) });
            let raised = self.raise_if_high();
            self.last = Outcome::Written(if raised { FlowChange::Raised } else { FlowChange::None });
        } else {
            if self.mpsc {
                // An abandoned MPSC span is published as padding.
                self.tail += pad + size;
                self.queue.push_back(Rec { pad, size, payload: None });
                if self.raise_if_high() {
                    self.silent_transitions += 1;
                }
            }
            self.last = Outcome::Dropped;
        }
    }

    /// What `try_peek` does before it returns: skip padding (releasing it,
    /// which may clear flow control silently) up to the first data record.
    fn skip_padding(&mut self) {
        loop {
            let Some(front) = self.queue.front_mut() else { return };
            let (pad, is_data, size) = (front.pad, front.payload.is_some(), front.size);
            front.pad = 0;
            if pad > 0 {
                self.head += pad;
                self.note_padding_clear();
            }
            if is_data {
                return;
            }
            self.queue.pop_front();
            self.head += size;
            self.note_padding_clear();
        }
    }

    /// A clear while skipping padding is reported by the next release; a
    /// second one before that release is folded into the same report.
    fn note_padding_clear(&mut self) {
        if self.clear_if_low() {
            if self.pending_clear {
                self.silent_transitions += 1;
            }
            self.pending_clear = true;
        }
    }

    fn read(&mut self, release: bool, buf: Option<usize>) {
        self.skip_padding();
        let Some(front) = self.queue.front() else {
            self.last = Outcome::Empty;
            return;
        };
        let bytes = front.payload.clone().expect("skip_padding stops at data");
        if let Some(buf) = buf {
            if bytes.len() > buf {
                self.last = Outcome::TooSmall(bytes.len());
                return;
            }
        }
        if !release {
            self.last = Outcome::Read(bytes, FlowChange::None);
            return;
        }
        let size = front.size;
        self.queue.pop_front();
        self.head += size;
        let cleared_now = self.clear_if_low();
        let pending = std::mem::take(&mut self.pending_clear);
        let clears = u64::from(cleared_now) + u64::from(pending);
        let change = if clears > 0 && buf.is_none() {
            self.silent_transitions += clears - 1; // one report for both
            FlowChange::Cleared
        } else {
            self.silent_transitions += clears; // `try_pop` does not report them
            FlowChange::None
        };
        self.last = Outcome::Read(bytes, change);
    }
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
            .prop_map(|(cap, watermarks)| Model {
                cap,
                max_record: max_payload_for(cap),
                watermarks,
                mpsc: F::MPSC,
                head: 0,
                tail: 0,
                queue: VecDeque::new(),
                flow_on: false,
                silent_transitions: 0,
                pending_clear: false,
                last: Outcome::Start,
            })
            .boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Op> {
        op(state.cap).boxed()
    }

    fn apply(mut state: Model, op: &Op) -> Model {
        match *op {
            Op::Push { len, seed } | Op::ReserveCommit { len, seed } => state.write(len, seed, true),
            Op::ReserveDrop { len, seed } => state.write(len, seed, false),
            Op::PeekRelease => state.read(true, None),
            Op::PeekKeep => state.read(false, None),
            Op::Pop { buf } => state.read(true, Some(buf)),
        }
        assert!(state.tail - state.head <= state.cap, "model: fill never exceeds capacity");
        state
    }
}

/// The producer end under test.
pub enum Tx {
    Spsc(Producer),
    Mpsc(MpscProducer),
}

/// The system under test: a real ring in a heap region.
pub struct Sut {
    _region: Arc<dyn Region>,
    tx: Tx,
    rx: Consumer,
}

impl Sut {
    fn write(&mut self, len: usize, seed: u8, commit: bool, copying: bool) -> Outcome {
        let bytes = payload_bytes(len, seed);
        let result = match (&mut self.tx, copying) {
            (Tx::Spsc(tx), true) => tx.try_push(&bytes).map(Outcome::Written),
            (Tx::Mpsc(tx), true) => tx.try_push(&bytes).map(Outcome::Written),
            (Tx::Spsc(tx), false) => tx.try_reserve(len).map(|mut grant| {
                assert_eq!(grant.len(), len, "a grant has the reserved length");
                if commit {
                    grant.write_at(0, &bytes);
                    Outcome::Written(grant.commit())
                } else {
                    grant.write_at(0, &bytes[..len / 2]);
                    Outcome::Dropped
                }
            }),
            (Tx::Mpsc(tx), false) => tx.try_reserve(len).map(|mut grant| {
                assert_eq!(grant.len(), len, "a grant has the reserved length");
                if commit {
                    grant.write_at(0, &bytes);
                    Outcome::Written(grant.commit())
                } else {
                    grant.write_at(0, &bytes[..len / 2]);
                    Outcome::Dropped
                }
            }),
        };
        match result {
            Ok(outcome) => outcome,
            Err(PushError::Full) => Outcome::Full,
            Err(PushError::TooBig { len: l, max }) => {
                assert_eq!(l, len as u64, "TooBig names the requested length");
                assert_eq!(max, self.rx.max_record(), "TooBig names the maximum record");
                Outcome::TooBig
            }
            Err(e) => panic!("a healthy ring only fails Full or TooBig, got {e:?}"),
        }
    }

    fn read(&mut self, release: bool) -> Outcome {
        match self.rx.try_peek() {
            Ok(grant) => {
                let bytes = grant.to_vec();
                assert_eq!(grant.len(), bytes.len(), "grant length equals the copied length");
                let change = if release { grant.release() } else { FlowChange::None };
                Outcome::Read(bytes, change)
            }
            Err(PopError::Empty) => Outcome::Empty,
            Err(e) => panic!("peek on a healthy ring only fails Empty, got {e:?}"),
        }
    }

    fn pop(&mut self, buf: usize) -> Outcome {
        let mut buffer = vec![0xAA; buf];
        match self.rx.try_pop(&mut buffer) {
            Ok(n) => {
                assert!(buffer[n..].iter().all(|&b| b == 0xAA), "pop writes only the record's bytes");
                buffer.truncate(n);
                Outcome::Read(buffer, FlowChange::None)
            }
            Err(PopError::Empty) => Outcome::Empty,
            Err(PopError::BufferTooSmall { needed }) => {
                assert!(needed > buf, "BufferTooSmall only when the buffer is too small");
                Outcome::TooSmall(needed)
            }
            Err(e) => panic!("pop on a healthy ring only fails Empty or BufferTooSmall, got {e:?}"),
        }
    }

    fn flow_state(&self) -> FlowState {
        self.rx.flow_state()
    }
}

/// The state-machine test for flavour `F`.
pub struct RingTest<F>(std::marker::PhantomData<F>);

impl<F: Flavour> StateMachineTest for RingTest<F> {
    type SystemUnderTest = Sut;
    type Reference = RefMachine<F>;

    fn init_test(model: &Model) -> Sut {
        let mut config = RingConfig::new(model.cap);
        if let Some(w) = model.watermarks {
            config = config.with_watermarks(w);
        }
        let size = required_size(model.cap);
        let region: Arc<dyn Region> = Arc::new(HeapRegion::new(size));
        init(&region, 0, size, &config).expect("the strategies only make valid configs");
        let tx = if F::MPSC {
            Tx::Mpsc(MpscProducer::attach(region.clone(), 0, size).expect("fresh ring attaches"))
        } else {
            Tx::Spsc(Producer::attach(region.clone(), 0, size).expect("fresh ring attaches"))
        };
        let rx = Consumer::attach(region.clone(), 0, size).expect("fresh ring attaches");
        Sut { _region: region, tx, rx }
    }

    fn apply(mut sut: Sut, model: &Model, op: Op) -> Sut {
        let outcome = match op {
            Op::Push { len, seed } => sut.write(len, seed, true, true),
            Op::ReserveCommit { len, seed } => sut.write(len, seed, true, false),
            Op::ReserveDrop { len, seed } => sut.write(len, seed, false, false),
            Op::PeekRelease => sut.read(true),
            Op::PeekKeep => sut.read(false),
            Op::Pop { buf } => sut.pop(buf),
        };
        assert_eq!(
            outcome, model.last,
            "every operation returns what the model predicts (result, payload bytes, reported flow change) for {op:?}"
        );
        sut
    }

    fn check_invariants(sut: &Sut, model: &Model) {
        let expected = if model.flow_on { FlowState::On } else { FlowState::Off };
        assert_eq!(
            sut.flow_state(),
            expected,
            "the shared flow state follows the watermark hysteresis of the model"
        );
        if let Some(w) = model.watermarks {
            assert!(!model.flow_on || model.tail - model.head > w.low, "flow state On implies fill > low");
        }
        assert!(sut.rx.pending_bytes() <= model.cap, "the consumer never sees more than a capacity pending");
    }
}
