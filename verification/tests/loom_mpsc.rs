//! loom models: several producer threads, one consumer, a 64-byte ring.
//!
//! Checked in every interleaving: every record arrives exactly once, byte for
//! byte, each producer's records in the order it pushed them, and an
//! abandoned (dropped) reservation turns into padding the consumer skips
//! without holding back the records behind it. The consumer and producers
//! waiting for space block through the wait protocol; the only spinning left
//! is the ring's own wait for an earlier producer's turn to publish.
#![cfg(coroipc_loom)]

use std::sync::Arc;

use coroipc_ring::{MpscProducer, PushError, RingConfig};
use coroipc_verification::loom_support::{
    decode, mpsc_producer, new_ring, payload, push_mpsc, BlockingConsumer, LoomFutex,
};
use loom::thread;

/// Pops `count` records and checks that each producer's records arrive
/// complete and in order; `lens[who]` are producer `who`'s payload lengths.
fn drain_in_order(rx: &mut BlockingConsumer, lens: &[&[usize]]) {
    let total: usize = lens.iter().map(|l| l.len()).sum();
    let mut next = vec![0u8; lens.len()];
    for _ in 0..total {
        let (bytes, _) = rx.pop();
        let (who, seq) = decode(&bytes);
        let who = usize::from(who);
        assert_eq!(seq, next[who], "producer {who}'s records must arrive in push order, none lost");
        assert_eq!(bytes.len(), lens[who][usize::from(seq)], "a record must keep its length");
        next[who] += 1;
    }
    assert!(rx.try_pop().is_none(), "no record may be delivered twice or invented");
}

fn spawn_producer(
    tx: &MpscProducer,
    futex: &Arc<LoomFutex>,
    who: u8,
    lens: &'static [usize],
) -> thread::JoinHandle<()> {
    let tx = tx.clone();
    let futex = futex.clone();
    thread::spawn(move || {
        for (seq, &len) in lens.iter().enumerate() {
            push_mpsc(&tx, &futex, &payload(who, seq as u8, len));
        }
    })
}

#[test]
fn two_producers_keep_per_producer_order_and_lose_nothing() {
    // 16 + 24 + 16 + 24 = 80 bytes through a 64-byte ring: at least one
    // producer waits for space, and the ring wraps (with padding whenever a
    // 24-byte record lands at index 48).
    const A: &[usize] = &[8, 16];
    const B: &[usize] = &[4, 12];
    loom::model(|| {
        let region = new_ring(&RingConfig::new(64));
        let futex = Arc::new(LoomFutex::new());
        let tx = mpsc_producer(&region);
        let mut rx = BlockingConsumer::new(&region, &futex);
        let a = spawn_producer(&tx, &futex, 0, A);
        let b = spawn_producer(&tx, &futex, 1, B);
        drop(tx);
        drain_in_order(&mut rx, &[A, B]);
        a.join().expect("producer 0");
        b.join().expect("producer 1");
    });
}

#[test]
fn three_producers_keep_per_producer_order_and_lose_nothing() {
    // Producer 2 is started by producer 0 once producer 0 has pushed, so at
    // most one producer ever waits for another's turn to publish: with two
    // turn-waiters loom's scheduler may bounce between them forever while
    // the reservation they wait for is never scheduled (an unfair schedule a
    // real kernel does not produce; loom reports it as "exceeded maximum
    // number of branches"). Producers 1 and 2 still race for claims, and so
    // do 0 and 1. Bounded to two preemptions whatever LOOM_MAX_PREEMPTIONS says.
    const A: &[usize] = &[8];
    const B: &[usize] = &[16];
    const C: &[usize] = &[4];
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.check(|| {
        let region = new_ring(&RingConfig::new(64));
        let futex = Arc::new(LoomFutex::new());
        let tx = mpsc_producer(&region);
        let mut rx = BlockingConsumer::new(&region, &futex);
        let b = spawn_producer(&tx, &futex, 1, B);
        let (first, first_futex) = (tx.clone(), futex.clone());
        let a = thread::spawn(move || {
            push_mpsc(&first, &first_futex, &payload(0, 0, A[0]));
            spawn_producer(&first, &first_futex, 2, C)
        });
        drop(tx);
        drain_in_order(&mut rx, &[A, B, C]);
        a.join().expect("producer 0").join().expect("producer 2");
        b.join().expect("producer 1");
    });
}

#[test]
fn abandoned_grant_becomes_padding_and_does_not_block_later_records() {
    const A: &[usize] = &[8];
    const B: &[usize] = &[12];
    loom::model(|| {
        let region = new_ring(&RingConfig::new(64));
        let futex = Arc::new(LoomFutex::new());
        let tx = mpsc_producer(&region);
        let mut rx = BlockingConsumer::new(&region, &futex);
        let quitter = tx.clone();
        // Producer 0 reserves, writes part of a record, then gives up; later
        // it pushes a real one. Producer 1 pushes concurrently and may have
        // claimed its span after the abandoned one.
        let quitter_futex = futex.clone();
        let a = thread::spawn(move || {
            let mut grant = quitter.try_reserve(20).expect("empty ring has room");
            grant.write_at(0, &payload(3, 3, 4));
            drop(grant);
            push_mpsc(&quitter, &quitter_futex, &payload(0, 0, A[0]));
        });
        let b = spawn_producer(&tx, &futex, 1, B);
        drop(tx);
        drain_in_order(&mut rx, &[A, B]);
        a.join().expect("producer 0");
        b.join().expect("producer 1");
    });
}

/// Ring bug, see the report in `README.md`: `MpscProducer::try_reserve`
/// (ring/src/mpsc.rs) checks a freshly loaded `head` against a *stale* local
/// copy of `claim`. If other producers claim, publish and the consumer
/// releases between the two loads, `head > claim` and `check_head` reports
/// `PushError::Corrupt` on a perfectly healthy ring.
#[test]
fn reserve_on_healthy_ring_never_reports_corrupt() {
    loom::model(|| {
        let region = new_ring(&RingConfig::new(64));
        let futex = Arc::new(LoomFutex::new());
        let tx = mpsc_producer(&region);
        let mut rx = BlockingConsumer::new(&region, &futex);
        // 48 of 64 bytes in use: a 32-byte reservation needs a fresh head.
        for seq in 0..3 {
            tx.try_push(&payload(0, seq, 8)).expect("room for three 16-byte records");
        }
        let other = tx.clone();
        let other_futex = futex.clone();
        let b = thread::spawn(move || {
            push_mpsc(&other, &other_futex, &payload(1, 0, 8));
        });
        let c = thread::spawn(move || {
            for _ in 0..4 {
                let _ = rx.pop();
            }
        });
        match tx.try_reserve(24) {
            Ok(grant) => drop(grant),
            Err(PushError::Full) => {}
            Err(e) => panic!("a healthy ring may only be Full, got {e:?}"),
        }
        b.join().expect("producer 1");
        c.join().expect("consumer");
    });
}
