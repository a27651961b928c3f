//! The wake-up backend: the ring's [`Notify`] implemented with a shared futex
//! (for sleepers blocked in a call) and an eventfd (for sleepers in the
//! application's event loop).
//!
//! The ring's wait protocol (`coroipc_ring::WaitPoint`) counts announced
//! waiters by kind: a direct sleeper adds 1, a poller adds
//! [`POLL_WAITER`]. [`Bell::wake_waiters`] makes only the wake calls those
//! counts ask for: `FUTEX_WAKE` if someone sleeps on the futex, one eventfd
//! write if someone polls — and nothing at all when nobody announced (that
//! fast path never reaches this module).

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use coroipc_ring::{Notify, POLL_WAITER};

use crate::eventfd::EventFd;
use crate::futex;

/// One direction's wake-up: a futex word in the ring header plus an eventfd
/// shared by both processes.
#[derive(Debug)]
pub struct Bell {
    eventfd: EventFd,
}

impl Bell {
    /// A bell over a new eventfd (server side, at connection set-up).
    ///
    /// # Errors
    ///
    /// The `eventfd2(2)` error.
    pub fn new() -> io::Result<Self> {
        Ok(Self { eventfd: EventFd::new()? })
    }

    /// A bell over an eventfd received from the peer.
    pub fn from_eventfd(eventfd: EventFd) -> Self {
        Self { eventfd }
    }

    /// The eventfd, to register with an event loop.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// Consumes pending eventfd signals (after the event loop reported the
    /// fd readable).
    pub fn drain(&self) -> u64 {
        self.eventfd.drain()
    }
}

impl AsFd for Bell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.eventfd.as_fd()
    }
}

impl Notify for Bell {
    fn wait(&self, word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
        // EAGAIN (word changed), EINTR and timeouts all mean "re-check".
        let _ = futex::wait(word, expected, timeout);
    }

    fn wake(&self, word: &AtomicU32) {
        futex::wake_all(word);
        self.eventfd.signal();
    }

    fn wake_waiters(&self, word: &AtomicU32, waiters: u32) {
        if !waiters.is_multiple_of(POLL_WAITER) {
            futex::wake_all(word);
        }
        if waiters >= POLL_WAITER {
            self.eventfd.signal();
        }
    }
}
