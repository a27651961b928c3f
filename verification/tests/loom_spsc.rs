//! loom model: one producer, one consumer, a 64-byte ring.
//!
//! Three records of 32, 16 and 32 bytes: the third does not fit before the
//! end of the data area (index 48, 16 bytes left), so the producer writes a
//! 16-byte padding record and the record at index 0, which needs the
//! consumer to have released the first record (wrap-around and padding
//! under concurrency). Every payload is checked byte for byte and in order;
//! loom's cells flag any payload read without a happens-before edge to its
//! write (sync point TAIL) and any overwrite of bytes still being read
//! (sync point HEAD). Both sides block through the wait protocol (a
//! spinning consumer would let loom starve the producer, see README).
#![cfg(coroipc_loom)]

use coroipc_ring::RingConfig;
use std::sync::Arc;

use coroipc_verification::loom_support::{
    decode, new_ring, payload, BlockingConsumer, BlockingProducer, LoomFutex,
};
use loom::thread;

/// Payload lengths: records of 32, 16 and 32 bytes in a 64-byte ring.
const LENS: [usize; 3] = [20, 5, 17];

#[test]
fn spsc_wraps_with_padding_and_delivers_every_byte_in_order() {
    loom::model(|| {
        let region = new_ring(&RingConfig::new(64));
        let futex = Arc::new(LoomFutex::new());
        let mut tx = BlockingProducer::new(&region, &futex);
        let mut rx = BlockingConsumer::new(&region, &futex);

        let writer = thread::spawn(move || {
            for (seq, len) in LENS.into_iter().enumerate() {
                tx.push(&payload(0, seq as u8, len));
            }
        });

        for (seq, len) in LENS.into_iter().enumerate() {
            let (bytes, _) = rx.pop();
            assert_eq!(bytes.len(), len, "record {seq} must keep its length");
            assert_eq!(decode(&bytes), (0, seq as u8), "records must arrive in push order");
        }
        writer.join().expect("producer thread");
        assert!(rx.try_pop().is_none(), "nothing may remain after the last record");
    });
}
