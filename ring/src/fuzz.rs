//! Fuzz harnesses, called by the cargo-fuzz targets in `fuzz/` and by the
//! tests in `tests/hostile.rs` (so they run on stable in every CI run too).
//!
//! * [`ring_ops`]: an operation sequence decoded from the input, replayed on a
//!   real ring and on the reference model ([`crate::model`]); every result,
//!   payload and flow transition is compared.
//! * [`ring_hostile`]: the input is the shared image itself and a stream of
//!   peer writes into it, under a live producer and consumer; every call must
//!   return (`Ok` or a typed error) without panicking, and whatever a pop
//!   returns must respect the validated bounds.

use std::sync::Arc;

use crate::model::{Model, Op, RealRing};
use crate::{
    init, required_size, Consumer, HeapRegion, MpscProducer, Producer, Region, RingConfig, Watermarks,
    RECORD_HEADER,
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

/// Differential harness: decode operations from `data`, run them on a ring
/// and on the reference model ([`crate::model`], the one the proptest state
/// machines use too), panic on any disagreement: every result, payload
/// byte, reported flow transition and the shared flow state.
pub fn ring_ops(data: &[u8]) {
    let mut input = Input(data);
    let first = input.byte();
    let capacity = 64u64 << (first % 7); // 64 ..= 4096
    let mpsc = first & 0x80 != 0;
    let watermarks = (first & 0x40 != 0).then_some(Watermarks { high: capacity * 3 / 4, low: capacity / 4 });
    let max_record = crate::max_payload_for(capacity);
    let mut ring = RealRing::new(capacity, watermarks, mpsc);
    let mut model = Model::new(capacity, watermarks, mpsc);
    let mut seq = 0u8;
    while !input.is_empty() {
        let byte = input.byte();
        let len = (u64::from(input.u16()) % (max_record + 16)) as usize;
        seq = seq.wrapping_add(1);
        let keep = byte & 0x80 != 0;
        let op = match byte % 6 {
            0 | 1 => Op::Push { len, seed: seq },
            2 if keep => Op::ReserveDrop { len, seed: seq },
            2 => Op::ReserveCommit { len, seed: seq },
            3 if keep => Op::PeekKeep,
            3 => Op::PeekRelease,
            _ => Op::Pop { buf: len },
        };
        model.apply(&op);
        assert_eq!(&ring.apply(&op), model.last(), "the ring answers what the model predicts for {op:?}");
        model.check(&ring);
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
