//! Black-box behaviour of the single-producer ring.
#![cfg(not(coroipc_loom))]
#![allow(unsafe_code)]
mod common;

use std::io::IoSlice;

use common::{payload, Ring};
use coroipc_ring::{max_payload_for, record_size, PopError, PushError, RingConfig};

#[test]
fn push_then_pop_returns_the_same_bytes() {
    let ring = Ring::new(RingConfig::new(1024));
    let (mut tx, mut rx) = (ring.producer(), ring.consumer());
    let _ = tx.try_push(b"hello").unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(rx.try_pop(&mut buf), Ok(5));
    assert_eq!(&buf[..5], b"hello");
    assert_eq!(rx.try_pop(&mut buf), Err(PopError::Empty));
}

#[test]
fn empty_and_zero_length_records_are_distinct() {
    let ring = Ring::new(RingConfig::new(256));
    let (mut tx, mut rx) = (ring.producer(), ring.consumer());
    assert_eq!(rx.try_peek().unwrap_err(), PopError::Empty);
    let _ = tx.try_push(&[]).unwrap();
    let g = rx.try_peek().expect("a zero-length record is a record");
    assert!(g.is_empty());
    let _ = g.release();
    assert_eq!(rx.try_peek().unwrap_err(), PopError::Empty);
}

#[test]
fn push_fails_when_full_and_succeeds_after_release() {
    let ring = Ring::new(RingConfig::new(256));
    let (mut tx, mut rx) = (ring.producer(), ring.consumer());
    let rec = vec![7u8; 56]; // 64 bytes with header: exactly 4 fit
    for _ in 0..4 {
        let _ = tx.try_push(&rec).unwrap();
    }
    assert_eq!(tx.try_push(&rec), Err(PushError::Full));
    assert_eq!(tx.try_push(&[]), Err(PushError::Full), "not even a header fits");
    let mut buf = [0u8; 64];
    assert_eq!(rx.try_pop(&mut buf), Ok(56));
    let _ = tx.try_push(&rec).expect("space released by the consumer is reusable");
}

#[test]
fn push_rejects_records_over_the_maximum_without_writing() {
    let ring = Ring::new(RingConfig::new(256).with_max_record(100));
    let (mut tx, mut rx) = (ring.producer(), ring.consumer());
    assert_eq!(tx.try_push(&[0; 101]), Err(PushError::TooBig { len: 101, max: 100 }));
    assert_eq!(rx.try_peek().unwrap_err(), PopError::Empty);
    let _ = tx.try_push(&[1; 100]).unwrap();
}

#[test]
fn records_never_wrap_a_padding_record_fills_the_end() {
    // capacity 128; a 40-byte record (48 with header) three times: the
    // third does not fit in the 32 bytes left before the end.
    let ring = Ring::new(RingConfig::new(128));
    let (mut tx, mut rx) = (ring.producer(), ring.consumer());
    let mut buf = [0u8; 64];
    for seq in 0..50u64 {
        let p = payload(seq, 40);
        let _ = tx.try_push(&p).unwrap();
        assert_eq!(rx.try_pop(&mut buf), Ok(40));
        assert_eq!(&buf[..40], &p[..], "record {seq} intact across wrap-around");
    }
}

#[test]
fn record_ending_exactly_at_the_end_needs_no_padding() {
    let ring = Ring::new(RingConfig::new(128));
    let (mut tx, mut rx) = (ring.producer(), ring.consumer());
    let _ = tx.try_push(&[1; 56]).unwrap(); // 64
    let _ = tx.try_push(&[2; 56]).unwrap(); // 64: ends exactly at the end; ring full
    assert_eq!(tx.try_push(&[]), Err(PushError::Full));
    let mut buf = [0u8; 64];
    assert_eq!(rx.try_pop(&mut buf), Ok(56));
    let _ = tx.try_push(&[3; 56]).expect("starts at index 0 without padding");
    assert_eq!(rx.try_pop(&mut buf), Ok(56));
    assert_eq!(buf[..56], [2; 56]);
    assert_eq!(rx.try_pop(&mut buf), Ok(56));
    assert_eq!(buf[..56], [3; 56]);
}

#[test]
fn the_largest_record_fits_an_empty_ring_wherever_the_head_is() {
    let cap = 256;
    let ring = Ring::new(RingConfig::new(cap));
    let (mut tx, mut rx) = (ring.producer(), ring.consumer());
    let max = max_payload_for(cap) as usize;
    let mut buf = vec![0u8; max];
    for small in 0..40 {
        let _ = tx.try_push(&vec![9; small]).unwrap();
        rx.try_pop(&mut buf).unwrap();
        let p = payload(small as u64, max);
        let _ = tx.try_push(&p).unwrap_or_else(|e| panic!("max record after {small}: {e}"));
        assert_eq!(rx.try_pop(&mut buf), Ok(max));
        assert_eq!(buf, p);
    }
}

#[test]
fn zero_copy_reserve_fill_commit_and_peek_release() {
    let ring = Ring::new(RingConfig::new(1024));
    let (mut tx, mut rx) = (ring.producer(), ring.consumer());
    let mut g = tx.try_reserve(10).unwrap();
    // SAFETY: the consumer in this test follows the protocol.
    unsafe { g.as_mut_slice() }.copy_from_slice(b"0123456789");
    assert_eq!(rx.try_peek().unwrap_err(), PopError::Empty, "nothing visible before commit");
    let _ = g.commit();
    let g = rx.try_peek().unwrap();
    // SAFETY: the producer in this test follows the protocol.
    assert_eq!(unsafe { g.as_slice() }, b"0123456789");
    let _ = g; // dropped without release
    let g = rx.try_peek().expect("an unreleased record is peeked again");
    assert_eq!(g.to_vec(), b"0123456789");
    let _ = g.release();
    assert_eq!(rx.try_peek().unwrap_err(), PopError::Empty);
}

#[test]
fn dropped_write_grant_publishes_nothing() {
    let ring = Ring::new(RingConfig::new(256));
    let (mut tx, mut rx) = (ring.producer(), ring.consumer());
    let _unreleased = tx.try_reserve(32).unwrap();
    #[allow(clippy::drop_non_drop)]
    drop(_unreleased);
    assert_eq!(rx.try_peek().unwrap_err(), PopError::Empty);
    let _ = tx.try_push(b"x").unwrap();
    assert_eq!(rx.try_pop_vec().unwrap(), b"x");
}

#[test]
fn vectored_push_gathers_parts_into_one_record() {
    let ring = Ring::new(RingConfig::new(256));
    let (mut tx, mut rx) = (ring.producer(), ring.consumer());
    let _ = tx.try_push_vectored(&[IoSlice::new(b"ab"), IoSlice::new(b""), IoSlice::new(b"cde")]).unwrap();
    assert_eq!(rx.try_pop_vec().unwrap(), b"abcde");
}

#[test]
fn pop_into_a_small_buffer_keeps_the_record() {
    let ring = Ring::new(RingConfig::new(256));
    let (mut tx, mut rx) = (ring.producer(), ring.consumer());
    let _ = tx.try_push(b"0123456789").unwrap();
    let mut small = [0u8; 4];
    assert_eq!(rx.try_pop(&mut small), Err(PopError::BufferTooSmall { needed: 10 }));
    let mut big = [0u8; 10];
    assert_eq!(rx.try_pop(&mut big), Ok(10));
    assert_eq!(&big, b"0123456789");
}

#[test]
fn two_threads_move_a_million_records_in_order() {
    let ring = Ring::new(RingConfig::new(4096));
    let (mut tx, mut rx) = (ring.producer(), ring.consumer());
    const N: u64 = 200_000;
    let t = std::thread::spawn(move || {
        let mut seq = 0u64;
        while seq < N {
            let len = (seq % 61) as usize + 8;
            let mut p = payload(seq, len);
            p[..8].copy_from_slice(&seq.to_le_bytes());
            match tx.try_push(&p) {
                Ok(_) => seq += 1,
                Err(PushError::Full) => std::hint::spin_loop(),
                Err(e) => panic!("{e}"),
            }
        }
    });
    let mut buf = [0u8; 128];
    let mut expect = 0u64;
    while expect < N {
        match rx.try_pop(&mut buf) {
            Ok(n) => {
                let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
                assert_eq!(seq, expect, "records arrive in order");
                let mut p = payload(seq, n);
                p[..8].copy_from_slice(&seq.to_le_bytes());
                assert_eq!(&buf[..n], &p[..], "record {seq} intact");
                expect += 1;
            }
            Err(PopError::Empty) => std::hint::spin_loop(),
            Err(e) => panic!("{e}"),
        }
    }
    t.join().unwrap();
}

#[test]
fn record_size_accounts_header_and_alignment() {
    assert_eq!(record_size(0), 8);
    assert_eq!(record_size(1), 16);
    assert_eq!(record_size(8), 16);
    assert_eq!(record_size(9), 24);
}
