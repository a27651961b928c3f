//! loom models of the wait/wake protocol (`ring/src/wait.rs`) with a futex
//! stand-in that keeps the futex rule (`LoomFutex`: sleep only while the
//! word still equals the expected value; wake is `notify_all` under the
//! mutex). A lost wake-up leaves a thread asleep with nobody left to wake
//! it, which loom reports as a deadlock; these models must pass.
#![cfg(coroipc_loom)]

use std::sync::Arc;

use coroipc_ring::{PushError, RingConfig};
use coroipc_verification::loom_support::{consumer, decode, models, new_ring, payload, producer, LoomFutex};
use loom::thread;

#[test]
fn consumer_waiting_for_data_is_always_woken() {
    loom::model(models::consumer_waits_for_data);
}

/// A producer fills a 64-byte ring, then waits for space while a consumer
/// frees one record with `free` (which must wake it).
fn producer_waits_for_space(
    config: RingConfig,
    free: fn(&mut coroipc_ring::Consumer, &LoomFutex) -> Vec<u8>,
) {
    loom::model(move || {
        let region = new_ring(&config);
        let futex = Arc::new(LoomFutex::new());
        let mut tx = producer(&region);
        let tx_view = producer(&region);
        let mut rx = consumer(&region);
        // Fill the ring: two 32-byte records.
        tx.try_push(&payload(0, 0, 24)).expect("empty ring has room");
        tx.try_push(&payload(0, 1, 24)).expect("half-full ring has room");
        assert_eq!(tx.try_push(&payload(0, 2, 8)), Err(PushError::Full), "the ring must be full");

        let notifier = futex.clone();
        let reader = thread::spawn(move || {
            let bytes = free(&mut rx, &notifier);
            assert_eq!(decode(&bytes), (0, 0), "first record first");
            rx
        });

        let record = payload(0, 2, 8);
        loop {
            match tx.try_push(&record) {
                Ok(_) => break,
                Err(PushError::Full) => {
                    tx_view.space_wait().wait_once(&*futex, || tx.has_space_uncached(record.len()), None);
                }
                Err(e) => panic!("push on a healthy ring must only fail Full, got {e:?}"),
            }
        }
        let mut rx = reader.join().expect("consumer thread");
        assert_eq!(decode(&rx.try_pop_vec().expect("second record")), (0, 1), "order kept");
        assert_eq!(decode(&rx.try_pop_vec().expect("third record")), (0, 2), "order kept");
    });
}

#[test]
fn producer_waiting_for_space_is_always_woken() {
    producer_waits_for_space(RingConfig::new(64), |rx, futex| {
        let bytes = rx.try_pop_vec().expect("the ring is full");
        rx.space_wait().notify(futex);
        bytes
    });
}

/// The same with `ReadGrant::release_notify`, which publishes the head and
/// checks for waiting producers behind a single fence (with watermarks on,
/// so the fence also serves the flow-control handshake).
#[test]
fn release_notify_wakes_a_producer_waiting_for_space() {
    let config = RingConfig::new(64).with_watermarks(coroipc_ring::Watermarks { high: 64, low: 32 });
    producer_waits_for_space(config, |rx, futex| {
        let grant = rx.try_peek().expect("the ring is full");
        let bytes = grant.to_vec();
        let _ = grant.release_notify(futex);
        bytes
    });
}

/// `release_notify` on a ring without watermarks (the dispatch ring's
/// default): no flow-control handshake needs the fence, so the release
/// issues it for the wait handshake alone. Without it the head store and
/// the waiters load are not ordered against the producer's announcement
/// (store buffering): the consumer reads `waiters == 0` while the producer
/// re-checks against the old head, and the producer sleeps forever (loom:
/// deadlock). Shown to have teeth: removing the `fence` in the
/// `always_fence` branch of `Consumer::publish_head_fenced` makes this model
/// fail with a deadlock (`verification/mutants/release-notify-no-fence.patch`).
#[test]
fn release_notify_without_watermarks_wakes_a_producer_waiting_for_space() {
    producer_waits_for_space(RingConfig::new(64), |rx, futex| {
        let grant = rx.try_peek().expect("the ring is full");
        let bytes = grant.to_vec();
        let _ = grant.release_notify(futex);
        bytes
    });
}

#[test]
fn both_directions_at_once_lose_no_wake_up() {
    // Producer pushes two 32-byte records into a 64-byte ring and then a
    // third that must wait for space; the consumer waits for data, pops
    // all three. Both sides sleep, both sides notify.
    loom::model(|| {
        let region = new_ring(&RingConfig::new(64));
        let futex = Arc::new(LoomFutex::new());
        let mut tx = coroipc_verification::loom_support::BlockingProducer::new(&region, &futex);
        let mut rx = coroipc_verification::loom_support::BlockingConsumer::new(&region, &futex);
        let writer = thread::spawn(move || {
            for seq in 0..3 {
                tx.push(&payload(0, seq, 24));
            }
        });
        for seq in 0..3 {
            assert_eq!(decode(&rx.pop().0), (0, seq), "records in order, none lost");
        }
        writer.join().expect("producer thread");
    });
}
