//! loom model: a ring initialised in one thread and attached from another.
//!
//! The initialising thread hands the region over with a Release store of a
//! flag; the attaching thread Acquire-loads it, then validates the header
//! (magic, version, capacity, positions) and runs one push/pop through the
//! rings it attached. The second model corrupts one header field before the
//! hand-over and checks that attaching is refused with the matching error.
#![cfg(coroipc_loom)]

use std::sync::Arc;

use coroipc_ring::atomic::AtomicU64;
use coroipc_ring::{
    init, required_size, Consumer, HeapRegion, Producer, Region, RingAttachError, RingConfig,
};
use coroipc_verification::loom_support::{decode, payload};
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;

/// The slot a region is handed over through.
struct Handover {
    region: loom::sync::Mutex<Option<Arc<dyn Region>>>,
    ready: AtomicBool,
}

fn handover(corrupt: Option<fn(&Arc<dyn Region>)>) -> Result<(), RingAttachError> {
    let slot = Arc::new(Handover { region: loom::sync::Mutex::new(None), ready: AtomicBool::new(false) });
    let init_slot = slot.clone();
    let initialiser = thread::spawn(move || {
        let size = required_size(64);
        let region: Arc<dyn Region> = Arc::new(HeapRegion::new(size));
        init(&region, 0, size, &RingConfig::new(64)).expect("valid config");
        if let Some(corrupt) = corrupt {
            corrupt(&region);
        }
        *init_slot.region.lock().expect("not poisoned") = Some(region);
        // Hand-over: pairs with the Acquire load below.
        init_slot.ready.store(true, Ordering::Release);
    });
    while !slot.ready.load(Ordering::Acquire) {
        thread::yield_now();
    }
    let region = slot.region.lock().expect("not poisoned").take().expect("published before the flag");
    let result = (|| {
        let mut tx = Producer::attach(region.clone(), 0, region.len())?;
        let mut rx = Consumer::attach(region.clone(), 0, region.len())?;
        tx.try_push(&payload(1, 2, 11)).expect("fresh ring has room");
        let mut buf = [0u8; 24];
        let n = rx.try_pop(&mut buf).expect("record just pushed");
        assert_eq!(decode(&buf[..n]), (1, 2), "attached endpoints must carry the record intact");
        Ok(())
    })();
    initialiser.join().expect("initialiser thread");
    result
}

/// The header's first word (`magic`) as the loom atomic `init` wrote.
fn magic_word(region: &Arc<dyn Region>) -> &AtomicU64 {
    // The header starts with `magic: AtomicU64` at offset 0 (`header.rs`).
    let ptr = region.as_ptr().cast::<AtomicU64>();
    #[allow(unsafe_code)]
    // SAFETY: `init` placed a live, initialised `AtomicU64` at offset 0 of
    // this 128-aligned region, which outlives the borrow.
    unsafe {
        &*ptr
    }
}

#[test]
fn ring_initialised_in_one_thread_attaches_in_another() {
    loom::model(|| {
        handover(None).expect("a freshly initialised ring must validate");
    });
}

#[test]
fn corrupted_magic_is_rejected_on_attach() {
    loom::model(|| {
        let result = handover(Some(|region| {
            magic_word(region).store(0xdead_beef, Ordering::Relaxed);
        }));
        assert_eq!(
            result.err(),
            Some(RingAttachError::BadMagic(0xdead_beef)),
            "a wrong magic must be refused"
        );
    });
}
