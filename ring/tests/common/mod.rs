//! Shared test helpers: a ring in a heap region and raw "peer" writes into it.
#![allow(dead_code, unsafe_code, missing_docs)]

use std::sync::Arc;

use coroipc_ring::{init, required_size, Consumer, HeapRegion, MpscProducer, Producer, Region, RingConfig};

/// Byte offsets of the header fields (the layout is fixed by the crate's
/// compile-time assertions; these tests play the hostile peer).
pub const MAGIC: usize = 0;
pub const VERSION: usize = 8;
pub const FLAGS: usize = 12;
pub const CAPACITY: usize = 16;
pub const MAX_RECORD: usize = 24;
pub const HIGH: usize = 32;
pub const LOW: usize = 40;
pub const TAIL: usize = 128;
pub const HEAD: usize = 256;
pub const DATA_WAITERS: usize = 384;
pub const FLOW: usize = 640;
pub const DATA: usize = 768;

pub struct Ring {
    pub region: Arc<dyn Region>,
    pub size: usize,
}

impl Ring {
    pub fn new(config: RingConfig) -> Self {
        let size = required_size(config.capacity);
        let region: Arc<dyn Region> = Arc::new(HeapRegion::new(size));
        init(&region, 0, size, &config).expect("valid config");
        Self { region, size }
    }
    pub fn producer(&self) -> Producer {
        Producer::attach(self.region.clone(), 0, self.size).expect("attach producer")
    }
    pub fn mpsc(&self) -> MpscProducer {
        MpscProducer::attach(self.region.clone(), 0, self.size).expect("attach mpsc producer")
    }
    pub fn consumer(&self) -> Consumer {
        Consumer::attach(self.region.clone(), 0, self.size).expect("attach consumer")
    }
    /// The peer writes `value` at byte `offset`.
    pub fn poke_u64(&self, offset: usize, value: u64) {
        assert!(offset + 8 <= self.size);
        // SAFETY: in bounds of the live region; racing writes are the point.
        unsafe { self.region.as_ptr().add(offset).cast::<u64>().write_volatile(value) }
    }
    pub fn poke_u32(&self, offset: usize, value: u32) {
        assert!(offset + 4 <= self.size);
        // SAFETY: as above.
        unsafe { self.region.as_ptr().add(offset).cast::<u32>().write_volatile(value) }
    }
    pub fn poke_u8(&self, offset: usize, value: u8) {
        assert!(offset < self.size);
        // SAFETY: as above.
        unsafe { self.region.as_ptr().add(offset).write_volatile(value) }
    }
    pub fn peek_u64(&self, offset: usize) -> u64 {
        // SAFETY: as above.
        unsafe { self.region.as_ptr().add(offset).cast::<u64>().read_volatile() }
    }
}

/// The deterministic generator of the repository's tests, so failures replay.
#[allow(unused_imports)] // only some test binaries draw random numbers
pub use coroipc_testkit::XorShift;

pub fn payload(seq: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seq.wrapping_mul(131) as usize).wrapping_add(i) as u8).collect()
}
