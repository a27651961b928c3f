//! Teeth: the models must fail when the ring is deliberately broken.
//!
//! `coroipc_ring::loom_teeth` holds two process-wide switches (std
//! `AtomicBool`s, read by the ring under loom only):
//!
//! * `WEAK_PUBLISH` turns the producer's Release store of `tail` (sync point
//!   TAIL) into a Relaxed one. The SPSC model must then report a causality
//!   violation: the consumer reads payload cells with no happens-before edge
//!   to the producer's writes.
//! * `SKIP_RECHECK` removes the re-check between announcing and sleeping in
//!   `WaitPoint::wait_once`. The wait model must then deadlock (a lost
//!   wake-up), which loom reports as a panic.
//!
//! The switches are global, so this binary serialises its tests with a
//! mutex and resets the switch even when the model panics (a drop guard).
//! They live in their own test binary so they never run while a regular
//! model runs in a sibling thread.
#![cfg(coroipc_loom)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use coroipc_ring::loom_teeth::{SKIP_RECHECK, WEAK_PUBLISH};
use coroipc_verification::loom_support::models;

static SERIAL: Mutex<()> = Mutex::new(());

/// Sets a switch for the lifetime of the guard (and holds the lock).
struct Broken {
    switch: &'static AtomicBool,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Broken {
    fn new(switch: &'static AtomicBool) -> Self {
        let serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        switch.store(true, Ordering::SeqCst);
        Self { switch, _serial: serial }
    }
}

impl Drop for Broken {
    fn drop(&mut self) {
        self.switch.store(false, Ordering::SeqCst);
    }
}

#[test]
#[should_panic(expected = "Causality violation")]
fn spsc_model_catches_relaxed_tail_publication() {
    let _broken = Broken::new(&WEAK_PUBLISH);
    loom::model(models::spsc_wrap_with_padding);
}

#[test]
#[should_panic(expected = "deadlock")]
fn wait_model_catches_missing_recheck() {
    let _broken = Broken::new(&SKIP_RECHECK);
    loom::model(models::consumer_waits_for_data);
}

/// Control: the same models pass with both switches off, in this binary.
#[test]
fn models_pass_unbroken() {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    assert!(!WEAK_PUBLISH.load(Ordering::SeqCst) && !SKIP_RECHECK.load(Ordering::SeqCst));
    loom::model(models::spsc_wrap_with_padding);
    loom::model(models::consumer_waits_for_data);
}
