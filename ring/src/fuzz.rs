//! Fuzz harnesses, called by the cargo-fuzz targets in `fuzz/` and by the
//! tests in `tests/hostile.rs` (so they run on stable in every CI run too).
//!
//! * [`ring_ops`]: an operation sequence decoded from the input, replayed on a
//!   real ring and on a reference model (a `VecDeque` plus position
//!   arithmetic); every result and every payload is compared.
//! * [`ring_hostile`]: the input is the shared image itself and a stream of
//!   peer writes into it, under a live producer and consumer; every call must
//!   return (`Ok` or a typed error) without panicking, and whatever a pop
//!   returns must respect the validated bounds.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::{
    init, record_size, required_size, Consumer, HeapRegion, MpscProducer, PopError, Producer, PushError,
    Region, RingConfig, Watermarks, RECORD_HEADER,
};

/// A cursor over fuzz input; yields zeros when exhausted.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The reference model: what a correct ring must do.
struct Model {
    cap: u64,
    head: u64,
    tail: u64,
    /// (padding bytes in front, record size, payload)
    queue: VecDeque<(u64, u64, Vec<u8>)>,
}

impl Model {
    fn plan(&self, len: usize) -> (u64, u64) {
        let size = record_size(len as u64);
        let to_end = self.cap - (self.tail % self.cap);
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
    fn push(&mut self, payload: Vec<u8>) {
        let (pad, size) = self.plan(payload.len());
        self.tail += pad + size;
        self.queue.push_back((pad, size, payload));
    }
    /// The consumer skipped the padding in front of the first record.
    fn skip_pad(&mut self) {
        if let Some(front) = self.queue.front_mut() {
            self.head += front.0;
            front.0 = 0;
        }
    }
    fn pop(&mut self) -> Option<Vec<u8>> {
        let (pad, size, payload) = self.queue.pop_front()?;
        self.head += pad + size;
        Some(payload)
    }
}

fn payload(seq: u32, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seq as usize).wrapping_mul(31).wrapping_add(i) as u8).collect()
}

/// Differential harness: decode operations from `data`, run them on a ring
/// and on the model, panic on any disagreement.
pub fn ring_ops(data: &[u8]) {
    let mut input = Input(data);
    let first = input.byte();
    let capacity = 64u64 << (first % 7); // 64 ..= 4096
    let mpsc = first & 0x80 != 0;
    let watermarks = first & 0x40 != 0;
    let max_record = crate::max_payload_for(capacity);
    let mut config = RingConfig::new(capacity);
    if watermarks {
        config = config.with_watermarks(Watermarks { high: capacity * 3 / 4, low: capacity / 4 });
    }
    let size = required_size(capacity);
    let region: Arc<dyn Region> = Arc::new(HeapRegion::new(size));
    init(&region, 0, size, &config).expect("valid config");
    let mut spsc = Producer::attach(region.clone(), 0, size).expect("fresh ring attaches");
    let multi = MpscProducer::attach(region.clone(), 0, size).expect("fresh ring attaches");
    let mut rx = Consumer::attach(region.clone(), 0, size).expect("fresh ring attaches");
    let mut model = Model { cap: capacity, head: 0, tail: 0, queue: VecDeque::new() };
    let mut seq = 0u32;

    while !input.is_empty() {
        let op = input.byte();
        let len = (input.u16() as u64 % (max_record + 16)) as usize;
        match op % 6 {
            // push (copying)
            0 | 1 => {
                seq += 1;
                let p = payload(seq, len);
                let result = if mpsc { multi.try_push(&p) } else { spsc.try_push(&p) };
                if len as u64 > max_record {
                    assert!(matches!(result, Err(PushError::TooBig { .. })), "oversize push must be TooBig");
                } else if model.fits(len) {
                    assert!(result.is_ok(), "push of {len} must fit: {result:?}");
                    model.push(p);
                } else {
                    assert_eq!(result, Err(PushError::Full), "push of {len} must be Full");
                }
            }
            // reserve, then commit or drop
            2 => {
                seq += 1;
                let p = payload(seq, len);
                let commit = op & 0x80 != 0;
                if mpsc {
                    match multi.try_reserve(len) {
                        Ok(mut g) => {
                            assert!(model.fits(len), "reserve succeeded where the model is full");
                            g.write_at(0, &p);
                            if commit {
                                let _ = g.commit();
                                model.push(p);
                            } else {
                                // An abandoned MPSC grant becomes padding of the same size.
                                drop(g);
                                model.push(p);
                                let last = model.queue.back_mut().expect("just pushed");
                                last.2 = Vec::new();
                                last.0 += last.1;
                                last.1 = 0;
                            }
                        }
                        Err(e) => assert!(
                            len as u64 > max_record || (!model.fits(len) && e == PushError::Full),
                            "reserve failed wrongly: {e:?}"
                        ),
                    }
                } else {
                    match spsc.try_reserve(len) {
                        Ok(mut g) => {
                            assert!(model.fits(len), "reserve succeeded where the model is full");
                            g.write_at(0, &p);
                            if commit {
                                let _ = g.commit();
                                model.push(p);
                            }
                        }
                        Err(e) => assert!(
                            len as u64 > max_record || (!model.fits(len) && e == PushError::Full),
                            "reserve failed wrongly: {e:?}"
                        ),
                    }
                }
            }
            // peek, then release or keep
            3 => {
                // Abandoned MPSC spans (size 0 records in the model) are skipped by peek.
                while model.queue.front().is_some_and(|f| f.1 == 0) {
                    let (pad, _, _) = model.queue.pop_front().expect("front exists");
                    model.head += pad;
                }
                let release = op & 0x80 != 0;
                match rx.try_peek() {
                    Ok(g) => {
                        model.skip_pad();
                        let expected = &model.queue.front().expect("model has a record").2;
                        assert_eq!(&g.to_vec(), expected, "peeked payload differs from the model");
                        if release {
                            let _ = g.release();
                            model.pop();
                        }
                    }
                    Err(e) => {
                        assert_eq!(e, PopError::Empty, "peek on a healthy ring must only fail Empty");
                        assert!(model.queue.is_empty(), "ring empty but model has records");
                        model.head = model.tail;
                    }
                }
            }
            // pop into a buffer of fuzzed size
            _ => {
                while model.queue.front().is_some_and(|f| f.1 == 0) {
                    let (pad, _, _) = model.queue.pop_front().expect("front exists");
                    model.head += pad;
                }
                let mut buf = vec![0u8; len];
                match rx.try_pop(&mut buf) {
                    Ok(n) => {
                        let expected = model.pop().expect("model has a record");
                        assert_eq!(&buf[..n], &expected[..], "popped payload differs from the model");
                    }
                    Err(PopError::BufferTooSmall { needed }) => {
                        model.skip_pad();
                        let expected = &model.queue.front().expect("model has a record").2;
                        assert_eq!(needed, expected.len(), "BufferTooSmall must report the record length");
                        assert!(len < needed, "BufferTooSmall with a big enough buffer");
                    }
                    Err(e) => {
                        assert_eq!(e, PopError::Empty, "pop on a healthy ring must only fail Empty");
                        assert!(model.queue.is_empty(), "ring empty but model has records");
                        model.head = model.tail;
                    }
                }
            }
        }
        assert!(model.tail - model.head <= capacity, "model invariant");
    }
}

/// Hostile-peer harness: `data` supplies the initial image of the whole
/// ring (or scribbles over a valid one) and a stream of peer writes
/// interleaved with producer and consumer calls. Panics only on a bug.
pub fn ring_hostile(data: &[u8]) {
    let mut input = Input(data);
    let first = input.byte();
    let capacity = 64u64 << (first % 5); // 64 ..= 1024
    let size = required_size(capacity);
    let region: Arc<dyn Region> = Arc::new(HeapRegion::new(size));
    let base = region.as_ptr();
    let scribble = |at: usize, byte: u8| {
        #[allow(unsafe_code)]
        // SAFETY: `at < size`, the region is live; writes from "the peer"
        // are exactly what the ring must survive.
        unsafe {
            base.add(at % size).write_volatile(byte)
        };
    };
    if first & 0x80 != 0 {
        // The whole image from the input: attach must reject or cope.
        for i in 0..size {
            scribble(i, input.byte());
        }
    } else {
        let config =
            RingConfig::new(capacity).with_watermarks(Watermarks { high: capacity / 2, low: capacity / 8 });
        init(&region, 0, size, &config).expect("valid config");
    }
    let mut tx = Producer::attach(region.clone(), 0, size).ok();
    let multi = MpscProducer::attach(region.clone(), 0, size).ok();
    let mut rx = Consumer::attach(region.clone(), 0, size).ok();
    let mut buf = vec![0u8; capacity as usize];
    let mut steps = 0;
    while !input.is_empty() && steps < 10_000 {
        steps += 1;
        let op = input.byte();
        match op % 8 {
            0 => {
                // The peer writes one byte anywhere (header, positions, data).
                let at = input.u16() as usize;
                scribble(at, input.byte());
            }
            1 => {
                // The peer writes a word at an 8-aligned offset.
                let at = (input.u16() as usize * 8) % size;
                // Small shifted values hit plausible-looking positions and
                // lengths; raw 64-bit words hit the top of the range (where a
                // wrapping check once let an overflowing head through).
                let v = if input.byte() & 1 == 0 {
                    u64::from(input.u16()) << (input.byte() % 48)
                } else {
                    u64::from_le_bytes(std::array::from_fn(|_| input.byte()))
                };
                for (i, b) in v.to_le_bytes().into_iter().enumerate() {
                    scribble(at + i, b);
                }
            }
            2 | 3 => {
                if let Some(tx) = tx.as_mut() {
                    let len = input.byte() as usize;
                    let _ = tx.try_push(&buf[..len.min(buf.len())]);
                }
            }
            4 => {
                if let Some(m) = multi.as_ref() {
                    let len = input.byte() as usize;
                    if let Ok(g) = m.try_reserve(len) {
                        if op & 0x80 != 0 {
                            let _ = g.commit();
                        }
                    }
                }
            }
            5 | 6 => {
                if let Some(rx) = rx.as_mut() {
                    if let Ok(g) = rx.try_peek() {
                        assert!(
                            g.len() as u64 <= crate::max_payload_for(capacity),
                            "record longer than allowed"
                        );
                        let v = g.to_vec();
                        assert_eq!(v.len(), g.len());
                        let _ = g.release();
                    }
                }
            }
            _ => {
                if let Some(rx) = rx.as_mut() {
                    if let Ok(n) = rx.try_pop(&mut buf) {
                        assert!(n as u64 + RECORD_HEADER <= capacity, "pop returned too much");
                    }
                    let _ = rx.has_data();
                    let _ = rx.flow_state();
                }
            }
        }
    }
}
