//! Two-thread throughput of the coroipc rings, beside `rtrb` and
//! `crossbeam_queue::ArrayQueue` moving the same payload in the same run.
//!
//! Every scenario streams `iters` messages through one bounded ring: the
//! producer thread(s) and the consumer thread wait on one `Barrier`, then
//! each takes its own start and stop time; the sample is the span from the
//! earliest start to the latest stop (the two-thread pattern of rtrb's and
//! crossbeam's benches, timed with `iter_custom`). Every message carries a
//! sequence number that the consumer checks, so nothing is lost or reordered
//! unnoticed. Scenarios are defined in `benches/README.md`.
#![allow(missing_docs, reason = "criterion_group! generates an undocumented pub fn")]

use std::hint::{black_box, spin_loop};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use coroipc_ring::{
    init, required_size, Consumer, HeapRegion, MpscProducer, PopError, Producer, PushError, Region,
    RingConfig,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;

/// Data area of our rings for 64-byte payloads; the slot queues get the same
/// 64 KiB as 1024 slots of `[u8; 64]` (our records take 72 bytes: an 8-byte
/// header in front of the payload, so 910 of them fit).
const SMALL_RING_BYTES: u64 = 64 * 1024;
/// Slots of the `rtrb` and `ArrayQueue` rings.
const SLOTS: usize = 1024;
/// Data area of our rings for 4 KiB payloads (63 records of 4104 bytes).
const LARGE_RING_BYTES: u64 = 256 * 1024;

/// Waits for the other side: spin briefly, then give the core away (with
/// three threads on two cores a pure spinner would starve the thread it
/// waits for). Used by every scenario alike.
#[inline]
fn backoff(spins: &mut u32) {
    if *spins < 64 {
        spin_loop();
        *spins += 1;
    } else {
        thread::yield_now();
    }
}

/// The message with sequence number `seq` in its first 8 bytes.
#[inline]
fn stamp<const N: usize>(msg: &mut [u8; N], seq: u64) {
    msg[..8].copy_from_slice(&seq.to_le_bytes());
}

#[inline]
fn seq_of(msg: &[u8]) -> u64 {
    u64::from_le_bytes(msg[..8].try_into().expect("8 bytes"))
}

/// Producer `id`'s `i`-th sequence number (producer id in the top 16 bits).
#[inline]
fn seq(id: usize, i: u64) -> u64 {
    ((id as u64) << 48) | i
}

/// Messages producer `id` of `producers` sends out of `iters` in total.
fn share(iters: u64, producers: usize, id: usize) -> u64 {
    let p = producers as u64;
    iters / p + u64::from((id as u64) < iters % p)
}

/// Checks that per producer, sequence numbers arrive in order and complete.
struct SeqCheck {
    next: Vec<u64>,
}

impl SeqCheck {
    fn new(producers: usize) -> Self {
        Self { next: vec![0; producers] }
    }

    #[inline]
    fn check(&mut self, seq: u64) {
        let id = (seq >> 48) as usize;
        let i = seq & ((1 << 48) - 1);
        assert_eq!(i, self.next[id], "producer {id}: message lost or reordered");
        self.next[id] += 1;
    }
}

/// Runs the producers on their own threads and the consumer on this one, all
/// released together by a barrier. Returns the span from the earliest start
/// to the latest stop.
fn run<P, C>(producers: Vec<P>, consumer: C) -> Duration
where
    P: FnOnce() + Send,
    C: FnOnce(),
{
    let barrier = Barrier::new(producers.len() + 1);
    let (start, stop) = thread::scope(|s| {
        let handles: Vec<_> = producers
            .into_iter()
            .map(|produce| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    produce();
                    (start, Instant::now())
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        consumer();
        let stop = Instant::now();
        handles
            .into_iter()
            .map(|h| h.join().expect("producer thread panicked"))
            .fold((start, stop), |(a, b), (s, e)| (a.min(s), b.max(e)))
    });
    stop - start
}

fn ring_region(capacity: u64) -> Arc<dyn Region> {
    let size = required_size(capacity);
    let region: Arc<dyn Region> = Arc::new(HeapRegion::new(size));
    init(&region, 0, size, &RingConfig::new(capacity)).expect("valid ring config");
    region
}

/// Our SPSC ring: copy in with `try_push`, copy out with `try_pop`.
fn coroipc_spsc<const N: usize>(capacity: u64, iters: u64) -> Duration {
    let region = ring_region(capacity);
    let mut tx = Producer::attach(region.clone(), 0, region.len()).expect("attach producer");
    let mut rx = Consumer::attach(region.clone(), 0, region.len()).expect("attach consumer");
    let produce = move || {
        let mut msg = [0u8; N];
        for i in 0..iters {
            stamp(&mut msg, seq(0, i));
            let mut spins = 0;
            loop {
                match tx.try_push(black_box(&msg)) {
                    Ok(_) => break,
                    Err(PushError::Full) => backoff(&mut spins),
                    Err(e) => panic!("SPSC push failed on a healthy ring: {e:?}"),
                }
            }
        }
    };
    let consume = move || {
        let mut msg = [0u8; N];
        let mut check = SeqCheck::new(1);
        for _ in 0..iters {
            let mut spins = 0;
            loop {
                match rx.try_pop(&mut msg) {
                    Ok(n) => {
                        assert_eq!(n, N, "record length");
                        check.check(seq_of(black_box(&msg)));
                        break;
                    }
                    Err(PopError::Empty) => backoff(&mut spins),
                    Err(e) => panic!("pop failed on a healthy ring: {e:?}"),
                }
            }
        }
    };
    run(vec![produce], consume)
}

/// Our MPSC ring with `producers` clones of one `MpscProducer`.
fn coroipc_mpsc<const N: usize>(capacity: u64, producers: usize, iters: u64) -> Duration {
    let region = ring_region(capacity);
    let tx = MpscProducer::attach(region.clone(), 0, region.len()).expect("attach producer");
    let mut rx = Consumer::attach(region.clone(), 0, region.len()).expect("attach consumer");
    let produce: Vec<_> = (0..producers)
        .map(|id| {
            let tx = tx.clone();
            move || {
                let mut msg = [0u8; N];
                for i in 0..share(iters, producers, id) {
                    stamp(&mut msg, seq(id, i));
                    let mut spins = 0;
                    loop {
                        match tx.try_push(black_box(&msg)) {
                            Ok(_) => break,
                            Err(PushError::Full) => backoff(&mut spins),
                            Err(e) => panic!("MPSC push failed on a healthy ring: {e:?}"),
                        }
                    }
                }
            }
        })
        .collect();
    drop(tx);
    let consume = move || {
        let mut msg = [0u8; N];
        let mut check = SeqCheck::new(producers);
        for _ in 0..iters {
            let mut spins = 0;
            loop {
                match rx.try_pop(&mut msg) {
                    Ok(n) => {
                        assert_eq!(n, N, "record length");
                        check.check(seq_of(black_box(&msg)));
                        break;
                    }
                    Err(PopError::Empty) => backoff(&mut spins),
                    Err(e) => panic!("pop failed on a healthy ring: {e:?}"),
                }
            }
        }
    };
    run(produce, consume)
}

/// `rtrb::RingBuffer<[u8; 64]>`: the value moves in and out by copy.
fn rtrb_spsc(iters: u64) -> Duration {
    let (mut tx, mut rx) = rtrb::RingBuffer::<[u8; 64]>::new(SLOTS);
    let produce = move || {
        let mut msg = [0u8; 64];
        for i in 0..iters {
            stamp(&mut msg, seq(0, i));
            let mut spins = 0;
            let mut value = black_box(msg);
            while let Err(rtrb::PushError::Full(back)) = tx.push(value) {
                value = back;
                backoff(&mut spins);
            }
        }
    };
    let consume = move || {
        let mut check = SeqCheck::new(1);
        for _ in 0..iters {
            let mut spins = 0;
            loop {
                match rx.pop() {
                    Ok(msg) => {
                        check.check(seq_of(black_box(&msg)));
                        break;
                    }
                    Err(rtrb::PopError::Empty) => backoff(&mut spins),
                }
            }
        }
    };
    run(vec![produce], consume)
}

/// `crossbeam_queue::ArrayQueue<[u8; 64]>` (an MPMC queue) with `producers`
/// producer threads.
fn crossbeam_array_queue(producers: usize, iters: u64) -> Duration {
    let queue = ArrayQueue::<[u8; 64]>::new(SLOTS);
    let queue = &queue;
    let produce: Vec<_> = (0..producers)
        .map(|id| {
            move || {
                let mut msg = [0u8; 64];
                for i in 0..share(iters, producers, id) {
                    stamp(&mut msg, seq(id, i));
                    let mut spins = 0;
                    let mut value = black_box(msg);
                    while let Err(back) = queue.push(value) {
                        value = back;
                        backoff(&mut spins);
                    }
                }
            }
        })
        .collect();
    let consume = move || {
        let mut check = SeqCheck::new(producers);
        for _ in 0..iters {
            let mut spins = 0;
            loop {
                match queue.pop() {
                    Some(msg) => {
                        check.check(seq_of(black_box(&msg)));
                        break;
                    }
                    None => backoff(&mut spins),
                }
            }
        }
    };
    run(produce, consume)
}

fn small_records(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_64B");
    g.throughput(Throughput::Bytes(64));
    g.bench_function("coroipc_spsc", |b| b.iter_custom(|n| coroipc_spsc::<64>(SMALL_RING_BYTES, n)));
    g.bench_function("rtrb", |b| b.iter_custom(rtrb_spsc));
    g.bench_function("crossbeam_array_queue", |b| b.iter_custom(|n| crossbeam_array_queue(1, n)));
    g.bench_function("coroipc_mpsc_1p", |b| b.iter_custom(|n| coroipc_mpsc::<64>(SMALL_RING_BYTES, 1, n)));
    g.bench_function("coroipc_mpsc_2p", |b| b.iter_custom(|n| coroipc_mpsc::<64>(SMALL_RING_BYTES, 2, n)));
    g.bench_function("crossbeam_array_queue_2p", |b| b.iter_custom(|n| crossbeam_array_queue(2, n)));
    g.finish();
}

/// 64-byte records *including* our 8-byte header (56-byte payload), the way
/// The workloads count message sizes whole (benches/README.md): one record per cache line.
fn small_records_with_header(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_64B_record");
    g.throughput(Throughput::Bytes(64));
    g.bench_function("coroipc_spsc", |b| b.iter_custom(|n| coroipc_spsc::<56>(SMALL_RING_BYTES, n)));
    g.finish();
}

fn large_records(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_4KiB");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("coroipc_spsc", |b| b.iter_custom(|n| coroipc_spsc::<4096>(LARGE_RING_BYTES, n)));
    g.bench_function("coroipc_mpsc_1p", |b| b.iter_custom(|n| coroipc_mpsc::<4096>(LARGE_RING_BYTES, 1, n)));
    g.bench_function("coroipc_mpsc_2p", |b| b.iter_custom(|n| coroipc_mpsc::<4096>(LARGE_RING_BYTES, 2, n)));
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = small_records, small_records_with_header, large_records
}
criterion_main!(benches);
