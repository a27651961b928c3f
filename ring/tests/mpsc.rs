//! Black-box behaviour of the multi-producer ring.
#![cfg(not(coroipc_loom))]
mod common;

use std::sync::Arc;

use common::{payload, Ring};
use coroipc_ring::{PopError, PushError, RingConfig};

#[test]
fn mpsc_producers_keep_their_own_order_and_lose_nothing() {
    let ring = Ring::new(RingConfig::new(2048));
    let tx = ring.mpsc();
    let mut rx = ring.consumer();
    const PER: u64 = 50_000;
    const PRODUCERS: u64 = 3;
    let barrier = Arc::new(std::sync::Barrier::new(PRODUCERS as usize));
    let threads: Vec<_> = (0..PRODUCERS)
        .map(|id| {
            let tx = tx.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut seq = 0;
                while seq < PER {
                    let len = 16 + ((seq * 7 + id) % 50) as usize;
                    let mut p = payload(seq ^ id, len);
                    p[..8].copy_from_slice(&id.to_le_bytes());
                    p[8..16].copy_from_slice(&seq.to_le_bytes());
                    match tx.try_push(&p) {
                        Ok(_) => seq += 1,
                        Err(PushError::Full) => std::thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    let mut next = [0u64; PRODUCERS as usize];
    let mut got = 0;
    let mut buf = [0u8; 128];
    while got < PER * PRODUCERS {
        match rx.try_pop(&mut buf) {
            Ok(n) => {
                let id = u64::from_le_bytes(buf[..8].try_into().unwrap());
                let seq = u64::from_le_bytes(buf[8..16].try_into().unwrap());
                assert!(id < PRODUCERS, "producer id intact");
                assert_eq!(seq, next[id as usize], "per-producer order preserved");
                let mut p = payload(seq ^ id, n);
                p[..8].copy_from_slice(&id.to_le_bytes());
                p[8..16].copy_from_slice(&seq.to_le_bytes());
                assert_eq!(&buf[..n], &p[..], "payload intact");
                next[id as usize] += 1;
                got += 1;
            }
            Err(PopError::Empty) => std::thread::yield_now(),
            Err(e) => panic!("{e}"),
        }
    }
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn uncommitted_reservation_blocks_only_records_behind_it() {
    let ring = Ring::new(RingConfig::new(1024));
    let tx = ring.mpsc();
    let mut rx = ring.consumer();
    let _ = tx.try_push(b"first").unwrap();
    let mut slow = tx.try_reserve(8).unwrap();
    let tx2 = tx.clone();
    let later = std::thread::spawn(move || {
        let _ = tx2.try_push(b"third").unwrap(); // waits for its turn to publish
    });
    assert_eq!(rx.try_pop_vec().unwrap(), b"first", "records before the reservation flow");
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(rx.try_peek().unwrap_err(), PopError::Empty, "nothing behind the open reservation leaks out");
    slow.write_at(0, b"second!!");
    let _ = slow.commit();
    later.join().unwrap();
    assert_eq!(rx.try_pop_vec().unwrap(), b"second!!");
    assert_eq!(rx.try_pop_vec().unwrap(), b"third");
}

#[test]
fn abandoned_reservation_becomes_padding() {
    let ring = Ring::new(RingConfig::new(256));
    let tx = ring.mpsc();
    let mut rx = ring.consumer();
    drop(tx.try_reserve(40).unwrap());
    let _ = tx.try_push(b"after").unwrap();
    assert_eq!(rx.try_pop_vec().unwrap(), b"after", "the abandoned span is skipped");
    assert_eq!(rx.try_peek().unwrap_err(), PopError::Empty);
}

#[test]
fn mpsc_full_and_too_big() {
    let ring = Ring::new(RingConfig::new(128));
    let tx = ring.mpsc();
    let mut rx = ring.consumer();
    assert!(matches!(tx.try_push(&[0; 57]), Err(PushError::TooBig { .. })));
    let _ = tx.try_push(&[1; 56]).unwrap();
    let _ = tx.try_push(&[2; 56]).unwrap();
    assert_eq!(tx.try_push(&[3]), Err(PushError::Full));
    assert_eq!(rx.try_pop_vec().unwrap(), [1; 56]);
    let _ = tx.try_push(&[3]).unwrap();
}
