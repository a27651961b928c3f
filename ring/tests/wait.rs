//! The wait/wake protocol with a condvar backend (the futex backend lives in
//! coroipc-transport and is tested there across processes).
#![cfg(not(coroipc_loom))]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::Ring;
use coroipc_ring::atomic::AtomicU32;
use coroipc_ring::{Notify, RingConfig};

/// Futex semantics on a condvar: sleep only while the word holds `expected`.
#[derive(Default)]
struct CondvarNotify {
    lock: Mutex<()>,
    cv: Condvar,
    wakes: AtomicUsize,
}

impl Notify for CondvarNotify {
    fn wait(&self, word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
        let guard = self.lock.lock().unwrap();
        if word.load(std::sync::atomic::Ordering::SeqCst) != expected {
            return;
        }
        let _ = self.cv.wait_timeout(guard, timeout.unwrap_or(Duration::from_secs(5))).unwrap();
    }
    fn wake(&self, _word: &AtomicU32) {
        self.wakes.fetch_add(1, Relaxed);
        let _guard = self.lock.lock().unwrap();
        self.cv.notify_all();
    }
}

#[test]
fn notify_without_waiters_makes_no_wake_call() {
    let ring = Ring::new(RingConfig::new(256));
    let mut tx = ring.producer();
    let n = CondvarNotify::default();
    for _ in 0..100 {
        let _ = tx.try_push(b"x");
        assert!(!tx.data_wait().notify(&n));
        let _ = tx.try_push(b"x");
        let _ = ring.consumer().try_pop_vec();
    }
    assert_eq!(n.wakes.load(Relaxed), 0, "no sleeper, no wake call");
}

#[test]
fn sleeping_consumer_is_woken_for_every_record() {
    let ring = Ring::new(RingConfig::new(256));
    let (mut tx, mut rx) = (ring.producer(), ring.consumer());
    let n = Arc::new(CondvarNotify::default());
    let n2 = n.clone();
    const N: u32 = 2_000;
    let consumer = std::thread::spawn(move || {
        for i in 0..N {
            loop {
                if let Ok(v) = rx.try_pop_vec() {
                    assert_eq!(v, i.to_le_bytes());
                    let _ = rx.space_wait().notify(&*n2);
                    break;
                }
                // Long timeout: a lost wake-up shows as a stall, caught below.
                let _ = rx.data_wait().wait_once(&*n2, || rx.has_data_uncached(), None);
            }
        }
    });
    let start = std::time::Instant::now();
    for i in 0..N {
        loop {
            if tx.try_push(&i.to_le_bytes()).is_ok() {
                let _ = tx.data_wait().notify(&*n);
                break;
            }
            let _ = tx.space_wait().wait_once(&*n, || tx.has_space_uncached(4), None);
        }
        if i % 64 == 0 {
            std::thread::sleep(Duration::from_micros(50)); // let the consumer fall asleep
        }
    }
    consumer.join().unwrap();
    assert!(start.elapsed() < Duration::from_secs(60), "no wake-up was lost (each lost one costs 5 s)");
    assert!(n.wakes.load(Relaxed) > 0, "the consumer did sleep and was woken");
}
