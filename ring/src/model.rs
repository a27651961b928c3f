//! The reference model of a ring, and a driver that runs the same
//! operations on a real one: the one model both the proptest state machines
//! (`coroipc-verification`) and the `ring_ops` fuzz target check the ring
//! against.
//!
//! The model is a `VecDeque` of records plus the ring's position arithmetic:
//! a record of `8 + align8(len)` bytes goes at `tail % capacity` if it fits
//! before the end of the data area, otherwise a padding record fills the end
//! and the record goes to index 0; the ring is full when
//! `tail − head + padding + size > capacity`. It also follows the
//! flow-control hysteresis and which transitions each call reports.
//!
//! ```
//! use coroipc_ring::model::{Model, Op, RealRing};
//!
//! let mut model = Model::new(256, None, false);
//! let mut ring = RealRing::new(256, None, false);
//! for op in [Op::Push { len: 40, seed: 1 }, Op::PeekRelease, Op::PeekRelease] {
//!     model.apply(&op);
//!     assert_eq!(ring.apply(&op), *model.last());
//! }
//! model.check(&ring);
//! ```

use std::collections::VecDeque;
use std::sync::Arc;

use crate::{
    init, max_payload_for, record_size, required_size, Consumer, FlowChange, FlowState, HeapRegion,
    MpscProducer, PopError, Producer, PushError, Region, RingConfig, Watermarks,
};

/// One operation on the ring. Payload bytes are derived from `seed`
/// ([`payload_bytes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `try_push` of a `len`-byte payload.
    Push {
        /// Payload length.
        len: usize,
        /// Derives the payload bytes.
        seed: u8,
    },
    /// `try_reserve`, fill, `commit`.
    ReserveCommit {
        /// Payload length.
        len: usize,
        /// Derives the payload bytes.
        seed: u8,
    },
    /// `try_reserve`, fill part of it, drop the grant (an MPSC ring
    /// publishes the span as padding; an SPSC ring forgets it).
    ReserveDrop {
        /// Payload length.
        len: usize,
        /// Derives the payload bytes.
        seed: u8,
    },
    /// `try_peek`, check, `release`.
    PeekRelease,
    /// `try_peek`, check, drop the grant (the record stays).
    PeekKeep,
    /// `try_pop` into a `buf`-byte buffer (possibly too small).
    Pop {
        /// Buffer length.
        buf: usize,
    },
}

/// What an operation returned (the model: what it must return).
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
    /// A read returned this payload; the `FlowChange` is what the release
    /// reported (`None` when the grant was kept or the copying `try_pop`
    /// was used, which reports nothing).
    Read(Vec<u8>, FlowChange),
    /// `PopError::Empty`.
    Empty,
    /// `PopError::BufferTooSmall` naming this length.
    TooSmall(usize),
}

/// The payload of a record: `len` bytes derived from `seed`.
pub fn payload_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i as u8).wrapping_mul(31))).collect()
}

/// A record in the model: padding in front, its own size, its payload
/// (`None`: an abandoned MPSC span, i.e. padding).
#[derive(Clone, Debug)]
struct Rec {
    pad: u64,
    size: u64,
    payload: Option<Vec<u8>>,
}

/// The reference state.
#[derive(Clone, Debug)]
pub struct Model {
    cap: u64,
    max_record: u64,
    watermarks: Option<Watermarks>,
    mpsc: bool,
    /// Consumer position (bytes consumed, padding included).
    head: u64,
    /// Producer position (bytes published, padding included).
    tail: u64,
    queue: VecDeque<Rec>,
    flow_on: bool,
    /// Flow transitions the ring makes without reporting them (documented
    /// on the ring's calls): a clear inside `try_pop`, a raise by a dropped
    /// MPSC grant, and a second clear folded into one report.
    silent_transitions: u64,
    /// A clear made while `try_peek` skipped padding, which the ring
    /// reports with the next `ReadGrant::release`.
    pending_clear: bool,
    last: Outcome,
}

impl Model {
    /// An empty ring of `capacity` bytes, with `watermarks` if any, fed by
    /// a multi-producer end if `mpsc`.
    pub fn new(capacity: u64, watermarks: Option<Watermarks>, mpsc: bool) -> Self {
        Self {
            cap: capacity,
            max_record: max_payload_for(capacity),
            watermarks,
            mpsc,
            head: 0,
            tail: 0,
            queue: VecDeque::new(),
            flow_on: false,
            silent_transitions: 0,
            pending_clear: false,
            last: Outcome::Start,
        }
    }

    /// The ring's capacity.
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    /// The watermarks, if any.
    pub fn watermarks(&self) -> Option<Watermarks> {
        self.watermarks
    }

    /// What the last applied operation must have returned.
    pub fn last(&self) -> &Outcome {
        &self.last
    }

    /// Whether flow control is on.
    pub fn flow_on(&self) -> bool {
        self.flow_on
    }

    /// Bytes published and not yet consumed, padding included.
    pub fn fill(&self) -> u64 {
        self.tail - self.head
    }

    /// Transitions so far that the ring makes without reporting them.
    pub fn silent_transitions(&self) -> u64 {
        self.silent_transitions
    }

    /// Applies `op`; [`last`](Self::last) then says what the ring must
    /// return for it.
    ///
    /// # Panics
    ///
    /// If the model's own invariant breaks (fill beyond capacity).
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::Push { len, seed } | Op::ReserveCommit { len, seed } => self.write(len, seed, true),
            Op::ReserveDrop { len, seed } => self.write(len, seed, false),
            Op::PeekRelease => self.read(true, None),
            Op::PeekKeep => self.read(false, None),
            Op::Pop { buf } => self.read(true, Some(buf)),
        }
        assert!(self.fill() <= self.cap, "model: fill never exceeds capacity");
    }

    /// Checks the state `ring` shows against the model: the shared flow
    /// state follows the hysteresis, `On` implies fill above `low`, and the
    /// consumer never sees more than a capacity pending.
    ///
    /// # Panics
    ///
    /// On any disagreement.
    pub fn check(&self, ring: &RealRing) {
        let expected = if self.flow_on { FlowState::On } else { FlowState::Off };
        assert_eq!(
            ring.flow_state(),
            expected,
            "the shared flow state follows the watermark hysteresis of the model"
        );
        if let Some(w) = self.watermarks {
            assert!(!self.flow_on || self.fill() > w.low, "flow state On implies fill > low");
        }
        assert!(ring.rx.pending_bytes() <= self.cap, "the consumer never sees more than a capacity pending");
    }

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
        self.fill() + pad + size <= self.cap
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
    /// which may clear flow control) up to the first data record.
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

/// The producer end of a [`RealRing`].
#[derive(Debug)]
enum Tx {
    Spsc(Producer),
    Mpsc(MpscProducer),
}

/// A real ring in a heap region, driven by the operations of [`Op`].
#[derive(Debug)]
pub struct RealRing {
    tx: Tx,
    rx: Consumer,
}

impl RealRing {
    /// A fresh ring as [`Model::new`] describes it.
    ///
    /// # Panics
    ///
    /// If the configuration is invalid (capacity not a power of two in
    /// range, watermarks that do not fit).
    pub fn new(capacity: u64, watermarks: Option<Watermarks>, mpsc: bool) -> Self {
        let mut config = RingConfig::new(capacity);
        if let Some(w) = watermarks {
            config = config.with_watermarks(w);
        }
        let size = required_size(capacity);
        let region: Arc<dyn Region> = Arc::new(HeapRegion::new(size));
        init(&region, 0, size, &config).expect("a valid ring configuration");
        let tx = if mpsc {
            Tx::Mpsc(MpscProducer::attach(region.clone(), 0, size).expect("fresh ring attaches"))
        } else {
            Tx::Spsc(Producer::attach(region.clone(), 0, size).expect("fresh ring attaches"))
        };
        let rx = Consumer::attach(region.clone(), 0, size).expect("fresh ring attaches");
        Self { tx, rx }
    }

    /// Runs `op` on the ring and says what it returned.
    ///
    /// # Panics
    ///
    /// If the ring answers what a healthy ring never answers (`Corrupt`, a
    /// grant of the wrong length, a pop that writes past its record).
    pub fn apply(&mut self, op: &Op) -> Outcome {
        match *op {
            Op::Push { len, seed } => self.write(len, seed, true, true),
            Op::ReserveCommit { len, seed } => self.write(len, seed, true, false),
            Op::ReserveDrop { len, seed } => self.write(len, seed, false, false),
            Op::PeekRelease => self.read(true),
            Op::PeekKeep => self.read(false),
            Op::Pop { buf } => self.pop(buf),
        }
    }

    /// The shared flow-control state, as the consumer reads it.
    pub fn flow_state(&self) -> FlowState {
        self.rx.flow_state()
    }

    fn write(&mut self, len: usize, seed: u8, commit: bool, copying: bool) -> Outcome {
        let bytes = payload_bytes(len, seed);
        // The two grant types share their API but no trait.
        macro_rules! fill_grant {
            ($grant:expr) => {{
                let mut grant = $grant;
                assert_eq!(grant.len(), len, "a grant has the reserved length");
                if commit {
                    grant.write_at(0, &bytes);
                    Outcome::Written(grant.commit())
                } else {
                    grant.write_at(0, &bytes[..len / 2]);
                    Outcome::Dropped
                }
            }};
        }
        let result = match (&mut self.tx, copying) {
            (Tx::Spsc(tx), true) => tx.try_push(&bytes).map(Outcome::Written),
            (Tx::Mpsc(tx), true) => tx.try_push(&bytes).map(Outcome::Written),
            (Tx::Spsc(tx), false) => tx.try_reserve(len).map(|grant| fill_grant!(grant)),
            (Tx::Mpsc(tx), false) => tx.try_reserve(len).map(|grant| fill_grant!(grant)),
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
}
