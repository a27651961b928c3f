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
//! spinning consumer would let loom starve the producer, see README). The
//! body lives in `coroipc_verification::loom_support::models`, shared with
//! the teeth model.
#![cfg(coroipc_loom)]

use coroipc_verification::loom_support::models;

#[test]
fn spsc_wraps_with_padding_and_delivers_every_byte_in_order() {
    loom::model(models::spsc_wrap_with_padding);
}
