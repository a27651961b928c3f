//! Helpers shared by the loom models in `tests/loom_*.rs`.
//!
//! Everything here must run *inside* a `loom::model` closure: the ring's
//! `init` writes loom atomics and loom cells into the region, and loom
//! objects belong to one execution.

use std::sync::Arc;
use std::time::Duration;

use coroipc_ring::atomic::AtomicU32;
use coroipc_ring::{
    init, required_size, Consumer, FlowChange, HeapRegion, MpscProducer, Notify, PopError, Producer,
    PushError, Region, RingConfig,
};
use loom::sync::{Condvar, Mutex};

/// A futex stand-in for loom: a Mutex+Condvar pair that keeps the futex rule.
///
/// * `wait(word, expected)` sleeps **only if `word` still equals
///   `expected`**, and the check and the sleep are atomic with respect to
///   `wake` (both run under the mutex, and `Condvar::wait` releases it
///   atomically), exactly as the kernel checks the futex word under its
///   hash-bucket lock.
/// * `wake` is `notify_all` under the mutex.
///
/// Timeouts are ignored (loom has no clock): a model that relies on a
/// timeout to make progress is reported as a deadlock, which is what we want.
#[derive(Debug)]
pub struct LoomFutex {
    lock: Mutex<()>,
    cond: Condvar,
}

impl LoomFutex {
    /// A futex nobody sleeps on.
    pub fn new() -> Self {
        Self { lock: Mutex::new(()), cond: Condvar::new() }
    }
}

impl Default for LoomFutex {
    fn default() -> Self {
        Self::new()
    }
}

impl Notify for LoomFutex {
    fn wait(&self, word: &AtomicU32, expected: u32, _timeout: Option<Duration>) {
        let guard = self.lock.lock().expect("futex mutex poisoned");
        // The futex rule: the value check happens under the lock `wake`
        // takes, so a wake that follows a word change cannot slip in between
        // the check and the sleep.
        if word.load(loom::sync::atomic::Ordering::SeqCst) == expected {
            drop(self.cond.wait(guard).expect("futex mutex poisoned"));
        }
    }

    fn wake(&self, _word: &AtomicU32) {
        let _guard = self.lock.lock().expect("futex mutex poisoned");
        self.cond.notify_all();
    }
}

/// Creates and initialises a ring of `config` in a fresh heap region.
///
/// # Panics
///
/// If `config` is invalid.
pub fn new_ring(config: &RingConfig) -> Arc<dyn Region> {
    let size = required_size(config.capacity);
    let region: Arc<dyn Region> = Arc::new(HeapRegion::new(size));
    init(&region, 0, size, config).expect("valid ring config");
    region
}

/// A consumer attached to the whole of `region`.
///
/// # Panics
///
/// If the ring does not validate.
pub fn consumer(region: &Arc<dyn Region>) -> Consumer {
    Consumer::attach(region.clone(), 0, region.len()).expect("fresh ring attaches")
}

/// A single producer attached to the whole of `region`.
///
/// # Panics
///
/// If the ring does not validate.
pub fn producer(region: &Arc<dyn Region>) -> Producer {
    Producer::attach(region.clone(), 0, region.len()).expect("fresh ring attaches")
}

/// The multi-producer handle attached to the whole of `region`.
///
/// # Panics
///
/// If the ring does not validate.
pub fn mpsc_producer(region: &Arc<dyn Region>) -> MpscProducer {
    MpscProducer::attach(region.clone(), 0, region.len()).expect("fresh ring attaches")
}

/// The payload of record `seq` of producer `who`: `len` bytes, each one
/// identifying producer, record and position, so a torn, shifted or foreign
/// byte is caught.
pub fn payload(who: u8, seq: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| who.wrapping_mul(64).wrapping_add(seq.wrapping_mul(16)).wrapping_add(i as u8)).collect()
}

/// Which producer and record a payload made by [`payload`] came from.
///
/// # Panics
///
/// If the payload is empty or not one [`payload`] makes.
pub fn decode(bytes: &[u8]) -> (u8, u8) {
    let first = *bytes.first().expect("payloads in the models are never empty");
    let (who, seq) = (first / 64, (first % 64) / 16);
    assert_eq!(bytes, payload(who, seq, bytes.len()), "payload bytes must be exactly what was written");
    (who, seq)
}

/// A single producer with what it needs to block: a second, read-only
/// handle on the same ring for the wait points (a [`WaitPoint`] borrows the
/// endpoint it came from) and the futex stand-in.
///
/// [`WaitPoint`]: coroipc_ring::WaitPoint
#[derive(Debug)]
pub struct BlockingProducer {
    /// The producer.
    pub tx: Producer,
    view: Producer,
    futex: Arc<LoomFutex>,
}

impl BlockingProducer {
    /// Attaches a producer to `region`; sleeps and wakes through `futex`.
    pub fn new(region: &Arc<dyn Region>, futex: &Arc<LoomFutex>) -> Self {
        Self { tx: producer(region), view: producer(region), futex: futex.clone() }
    }

    /// Pushes `bytes`, sleeping on the space wait point while the ring is
    /// full, then notifies the consumer. Returns the commit's flow change.
    ///
    /// # Panics
    ///
    /// On any error other than `Full`.
    pub fn push(&mut self, bytes: &[u8]) -> FlowChange {
        loop {
            match self.tx.try_push(bytes) {
                Ok(change) => {
                    self.view.data_wait().notify(&*self.futex);
                    return change;
                }
                Err(PushError::Full) => {
                    let tx = &self.tx;
                    self.view.space_wait().wait_once(
                        &*self.futex,
                        || tx.has_space_uncached(bytes.len()),
                        None,
                    );
                }
                Err(e) => panic!("push on a healthy ring must only fail Full, got {e:?}"),
            }
        }
    }
}

/// Pushes `bytes` through a multi-producer handle, sleeping on the space
/// wait point while the ring is full, then notifies the consumer.
///
/// # Panics
///
/// On any error other than `Full`.
pub fn push_mpsc(tx: &MpscProducer, futex: &LoomFutex, bytes: &[u8]) -> FlowChange {
    loop {
        match tx.try_push(bytes) {
            Ok(change) => {
                tx.data_wait().notify(futex);
                return change;
            }
            Err(PushError::Full) => {
                tx.space_wait().wait_once(futex, || tx.has_space_uncached(bytes.len()), None);
            }
            Err(e) => panic!("push on a healthy ring must only fail Full, got {e:?}"),
        }
    }
}

/// The consumer with what it needs to block (see [`BlockingProducer`]).
#[derive(Debug)]
pub struct BlockingConsumer {
    /// The consumer.
    pub rx: Consumer,
    view: Consumer,
    futex: Arc<LoomFutex>,
}

impl BlockingConsumer {
    /// Attaches the consumer to `region`; sleeps and wakes through `futex`.
    pub fn new(region: &Arc<dyn Region>, futex: &Arc<LoomFutex>) -> Self {
        Self { rx: consumer(region), view: consumer(region), futex: futex.clone() }
    }

    /// Pops the next record, sleeping on the data wait point while the ring
    /// is empty, then notifies producers waiting for space. Returns the
    /// payload and the flow change its release reported.
    ///
    /// # Panics
    ///
    /// On any error other than `Empty`.
    pub fn pop(&mut self) -> (Vec<u8>, FlowChange) {
        loop {
            if let Some(popped) = self.try_pop() {
                return popped;
            }
            let rx = &mut self.rx;
            self.view.data_wait().wait_once(&*self.futex, || rx.has_data().unwrap_or(true), None);
        }
    }

    /// Pops the next record if one is published (and then notifies
    /// producers waiting for space).
    ///
    /// # Panics
    ///
    /// On any error other than `Empty`.
    pub fn try_pop(&mut self) -> Option<(Vec<u8>, FlowChange)> {
        let popped = match self.rx.try_peek() {
            Ok(grant) => {
                let bytes = grant.to_vec();
                (bytes, grant.release())
            }
            Err(PopError::Empty) => return None,
            Err(e) => panic!("peek on a healthy ring must only fail Empty, got {e:?}"),
        };
        self.view.space_wait().notify(&*self.futex);
        Some(popped)
    }
}

/// Model bodies shared by the regular models and the teeth models
/// (`tests/loom_teeth.rs` runs them with an ordering weakened and expects
/// loom to fail). Call them inside `loom::model`.
pub mod models {
    use std::sync::Arc;

    use coroipc_ring::RingConfig;
    use loom::thread;

    use super::{
        consumer, decode, new_ring, payload, producer, BlockingConsumer, BlockingProducer, LoomFutex,
    };

    /// SPSC, 64-byte ring, records of 32, 16 and 32 bytes: the third needs a
    /// padding record and the wrap to index 0. Checks every byte and the order.
    pub fn spsc_wrap_with_padding() {
        const LENS: [usize; 3] = [20, 5, 17];
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
    }

    /// The consumer waits for data with `data_wait().wait_once(..)` in a
    /// loop; the producer pushes one record, then `data_wait().notify(..)`.
    /// A lost wake-up leaves the consumer asleep forever: loom reports the
    /// deadlock.
    pub fn consumer_waits_for_data() {
        let region = new_ring(&RingConfig::new(64));
        let futex = Arc::new(LoomFutex::new());
        let mut tx = producer(&region);
        let mut rx = consumer(&region);
        // A second handle for the wait point: `WaitPoint` borrows the
        // endpoint it came from, and the condition needs `&mut rx`.
        let rx_view = consumer(&region);

        let notifier = futex.clone();
        let writer = thread::spawn(move || {
            tx.try_push(&payload(0, 1, 12)).expect("empty ring has room");
            tx.data_wait().notify(&*notifier);
        });

        let bytes = loop {
            match rx.try_pop_vec() {
                Ok(bytes) => break bytes,
                Err(coroipc_ring::PopError::Empty) => {
                    rx_view.data_wait().wait_once(&*futex, || rx.has_data().unwrap_or(true), None);
                }
                Err(e) => panic!("pop on a healthy ring must only fail Empty, got {e:?}"),
            }
        };
        assert_eq!(decode(&bytes), (0, 1), "the record waited for must arrive intact");
        writer.join().expect("producer thread");
    }
}
