//! The zero-copy guards: a response or a dispatch message lent in place
//! until the guard drops, and the thread tokens that tell a guard holder
//! calling on its own client from anyone else.

use std::cell::Cell;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};

use coroipc_transport::channel::ClientDispatch;
use coroipc_transport::message::HEADER_LEN;
use parking_lot::MutexGuard;

use crate::client::DispatchInfo;
use crate::core::Core;

thread_local! {
    /// This thread's token for guard ownership (0 is "nobody").
    static THREAD_TOKEN: Cell<u64> = const { Cell::new(0) };
}

/// A process-unique, non-zero token for the calling thread.
pub(crate) fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    THREAD_TOKEN.with(|t| {
        if t.get() == 0 {
            t.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        t.get()
    })
}

/// A response read in place (zero-copy). The response stays in the ring
/// until the guard drops; the guard holds the client's request lock
/// meanwhile: other threads' calls wait (bounded by their timeouts), and
/// calls from the guard's own thread fail with [`Error::GuardHeld`](crate::Error::GuardHeld).
/// Dispatch receives are not affected.
pub struct ResponseGuard<'a> {
    pub(crate) core: MutexGuard<'a, Core>,
    pub(crate) holder: &'a AtomicU64,
    /// The answer, when another waiting thread had already copied it out
    /// of the ring for this caller (only with concurrent callers); `None`:
    /// it is in the ring.
    pub(crate) copied: Option<Vec<u8>>,
}

impl Deref for ResponseGuard<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.copied {
            Some(payload) => payload,
            None => self.core.channel.current_response().map_or(&[], |m| &m[HEADER_LEN..]),
        }
    }
}

impl Drop for ResponseGuard<'_> {
    fn drop(&mut self) {
        if self.copied.is_none() {
            self.core.channel.release_response();
        }
        self.holder.store(0, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for ResponseGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseGuard").field("len", &self.len()).finish()
    }
}

/// A dispatch message read in place (zero-copy); released on drop. Holds
/// the client's dispatch lock meanwhile (calls are not affected; another
/// dispatch receive from the guard's own thread fails with
/// [`Error::GuardHeld`](crate::Error::GuardHeld)).
pub struct DispatchGuard<'a> {
    pub(crate) dispatch: MutexGuard<'a, ClientDispatch>,
    pub(crate) holder: &'a AtomicU64,
    pub(crate) info: DispatchInfo,
    /// From a blocking receive: released as a stream's message.
    pub(crate) streaming: bool,
}

impl DispatchGuard<'_> {
    /// The message's id and sequence number.
    pub fn info(&self) -> DispatchInfo {
        self.info
    }
}

impl Deref for DispatchGuard<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.dispatch.current_dispatch().map_or(&[], |m| &m[HEADER_LEN..])
    }
}

impl Drop for DispatchGuard<'_> {
    fn drop(&mut self) {
        if self.streaming {
            self.dispatch.release_dispatch_streaming();
        } else {
            self.dispatch.release_dispatch();
        }
        self.holder.store(0, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for DispatchGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatchGuard").field("info", &self.info).finish()
    }
}
