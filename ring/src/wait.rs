//! The wait/wake protocol, written once and generic over a [`Notify`]
//! backend: futexes and eventfds in `coroipc-transport`, a Mutex+Condvar
//! stand-in under loom.
//!
//! A wait point is two shared words: `waiters` (how many sleepers announced
//! themselves) and `epoch` (the futex word, bumped by each notification that
//! found a waiter).
//!
//! | step | waiter                                   | notifier                                  |
//! |------|------------------------------------------|-------------------------------------------|
//! | 1    | `e = epoch` (Acquire)                    | publish (ring store, Release)             |
//! | 2    | `waiters += 1`                           | `fence(SeqCst)`                           |
//! | 3    | `fence(SeqCst)`                          | `w = waiters`                             |
//! | 4    | re-check the condition; if true: `waiters -= 1`, done | if `w == 0`: done — no syscall |
//! | 5    | sleep while `epoch == e`                 | `epoch += 1` (Release), wake all          |
//! | 6    | `waiters -= 1`, re-check, loop            |                                           |
//!
//! **No lost wake-up.** The two SeqCst fences (sync point ANNOUNCE) order
//! step 2 of the waiter and step 1 of the notifier: if the notifier reads
//! `w == 0` at step 3, the waiter's increment comes after the notifier's
//! fence, so the waiter's re-check (step 4) sees the published data and does
//! not sleep. If the notifier reads `w > 0` it bumps `epoch` after reading
//! `waiters`, hence after the waiter read `e`, so the waiter's sleep at step 5
//! returns at once or is woken.
//!
//! **No syscall when nobody sleeps:** the notifier's fast path is one fence
//! and one load of a line nobody writes. **Hostile peers** can write both
//! words: a bogus `waiters` only costs extra wake calls, a bogus `epoch` only
//! spurious returns; a waiter never trusts a wake-up, it re-checks.
//! Modelled in `coroipc-verification` (`loom_wait`).
//!
//! **Provenance.** This is an *eventcount* (Reed and Kanodia, "Synchronization
//! with eventcounts and sequencers", CACM 1979; the futex form is the one
//! Dmitry Vyukov describes for his lock-free queues and folly's
//! `EventCount` implements): `epoch` is the count, "read `e`, re-check,
//! sleep while `epoch == e`" is its prepare/commit wait. The differences:
//! the waiter count sits in the shared line so that a notifier with nobody
//! to wake skips the bump and the syscall entirely (folly packs waiters and
//! epoch into one 64-bit word; here they are two words because the futex
//! word is 32 bits and the peer may scribble either one), and a waiter never
//! relies on a wake-up (it re-checks, and the transport's sleeps are sliced),
//! because the other side may be hostile.

use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use crate::header::WaitWords;
use crate::region::Region;
use crate::sync::{fence, AtomicU32, Ordering};

/// A sleeping and waking backend for the wait protocol.
pub trait Notify {
    /// Sleeps while `*word == expected`, at most `timeout` (`None`: no
    /// bound). May return early (spuriously); the protocol re-checks.
    fn wait(&self, word: &AtomicU32, expected: u32, timeout: Option<Duration>);
    /// Wakes every thread sleeping in [`wait`](Self::wait) on `word`.
    fn wake(&self, word: &AtomicU32);
    /// Wakes the announced waiters; `waiters` is the value of the waiters
    /// word that made the notifier call (see [`POLL_WAITER`]), so a backend
    /// can wake only the kinds of sleeper that announced themselves. The
    /// default wakes everything through [`wake`](Self::wake).
    fn wake_waiters(&self, word: &AtomicU32, waiters: u32) {
        let _ = waiters;
        self.wake(word);
    }
}

/// Weight of a waiter that sleeps in `poll(2)` on a file descriptor rather
/// than in [`Notify::wait`]: such a waiter announces itself with
/// [`WaitPoint::announce_poll`], which adds this value to the waiters word
/// instead of 1. Backends read `waiters / POLL_WAITER` as the number of
/// pollers and `waiters % POLL_WAITER` as the number of direct sleepers, and
/// make only the wake calls needed (a futex wake, an eventfd write, or both).
pub const POLL_WAITER: u32 = 1 << 16;

/// One side's wait point in a ring's shared header.
///
/// # Examples
///
/// A consumer thread sleeps until data arrives; the producer notifies after
/// committing. The [`Notify`] backend here is a Mutex+Condvar; the
/// transport's are futexes and eventfds.
///
/// ```
/// use std::sync::atomic::AtomicU32;
/// use std::sync::{Condvar, Mutex};
/// use std::time::Duration;
/// use coroipc_ring::{Consumer, Notify, Producer};
/// # use std::sync::Arc;
/// # use coroipc_ring::{init, required_size, HeapRegion, Region, RingConfig};
/// # let region: Arc<dyn Region> = Arc::new(HeapRegion::new(required_size(256)));
/// # init(&region, 0, region.len(), &RingConfig::new(256)).unwrap();
///
/// #[derive(Default)]
/// struct CondvarNotify(Mutex<()>, Condvar);
///
/// impl Notify for CondvarNotify {
///     fn wait(&self, word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
///         let guard = self.0.lock().unwrap();
///         // Sleep only if the word still holds `expected` (the futex rule).
///         if word.load(std::sync::atomic::Ordering::Acquire) == expected {
///             let _ = self.1.wait_timeout(guard, timeout.unwrap_or(Duration::from_millis(10)));
///         }
///     }
///     fn wake(&self, _word: &AtomicU32) {
///         let _guard = self.0.lock().unwrap();
///         self.1.notify_all();
///     }
/// }
///
/// let notifier = CondvarNotify::default();
/// let mut tx = Producer::attach(region.clone(), 0, region.len()).unwrap();
/// let mut rx = Consumer::attach(region.clone(), 0, region.len()).unwrap();
///
/// std::thread::scope(|s| {
///     s.spawn(|| {
///         let wait = rx.data_wait_handle();
///         // Announce, re-check, sleep; a wake-up is only a hint, so loop.
///         while !wait.point().wait_once(&notifier, || rx.has_data_uncached(), None) {}
///         assert_eq!(rx.try_pop_vec().unwrap(), b"wake up");
///     });
///     let _ = tx.try_push(b"wake up").unwrap();
///     // One fence and one load when nobody sleeps; a wake call otherwise.
///     tx.data_wait().notify(&notifier);
/// });
/// ```
#[derive(Clone, Copy, Debug)]
pub struct WaitPoint<'a> {
    words: &'a WaitWords,
}

/// Proof that a waiter announced itself; redeem it with
/// [`WaitPoint::sleep`] or [`WaitPoint::cancel`].
#[derive(Debug)]
#[must_use = "an announced waiter must sleep or cancel, or notifiers keep paying for wake calls"]
pub struct Announcement {
    epoch: u32,
    weight: u32,
}

impl<'a> WaitPoint<'a> {
    pub(crate) fn new(words: &'a WaitWords) -> Self {
        Self { words }
    }

    /// Steps 1–3: announce the intention to sleep. The caller must re-check
    /// its condition afterwards and then [`sleep`](Self::sleep) or
    /// [`cancel`](Self::cancel).
    #[inline]
    pub fn announce(&self) -> Announcement {
        self.announce_weighted(1)
    }

    /// Like [`announce`](Self::announce), for a waiter that will sleep in
    /// `poll(2)` on the backend's file descriptor (see [`POLL_WAITER`]).
    /// Withdraw it with [`cancel`](Self::cancel) once the descriptor fired
    /// or the caller stops polling.
    #[inline]
    pub fn announce_poll(&self) -> Announcement {
        self.announce_weighted(POLL_WAITER)
    }

    #[inline]
    fn announce_weighted(&self, weight: u32) -> Announcement {
        let epoch = self.words.epoch.load(Ordering::Acquire);
        self.words.waiters.fetch_add(weight, Ordering::Relaxed);
        // SYNC ANNOUNCE: pairs with the fence in `notify`.
        fence(Ordering::SeqCst);
        Announcement { epoch, weight }
    }

    /// Withdraws an announcement (the re-check found the condition true, or
    /// a poller woke up).
    #[inline]
    pub fn cancel(&self, announcement: Announcement) {
        self.words.waiters.fetch_sub(announcement.weight, Ordering::Relaxed);
    }

    /// Step 5–6: sleeps until notified (or `timeout`, or spuriously), then
    /// withdraws the announcement. The caller re-checks its condition.
    pub fn sleep<N: Notify + ?Sized>(
        &self,
        announcement: Announcement,
        notifier: &N,
        timeout: Option<Duration>,
    ) {
        notifier.wait(&self.words.epoch, announcement.epoch, timeout);
        self.words.waiters.fetch_sub(announcement.weight, Ordering::Relaxed);
    }

    /// One complete wait: returns `true` at once if `ready()` holds,
    /// otherwise announces, re-checks, sleeps once (bounded by `timeout`)
    /// and returns `ready()`. Callers loop with their own deadline.
    pub fn wait_once<N: Notify + ?Sized>(
        &self,
        notifier: &N,
        mut ready: impl FnMut() -> bool,
        timeout: Option<Duration>,
    ) -> bool {
        if ready() {
            return true;
        }
        let a = self.announce();
        #[cfg(coroipc_loom)]
        let skip_recheck = crate::loom_teeth::SKIP_RECHECK.load(std::sync::atomic::Ordering::Relaxed);
        #[cfg(not(coroipc_loom))]
        let skip_recheck = false;
        if !skip_recheck && ready() {
            self.cancel(a);
            return true;
        }
        self.sleep(a, notifier, timeout);
        ready()
    }

    /// Whether any waiter announced itself (what `notify` checks).
    #[inline]
    pub fn has_waiters(&self) -> bool {
        self.words.waiters.load(Ordering::Relaxed) != 0
    }

    /// The notifier's side, after publishing: wakes sleepers if any
    /// announced themselves; otherwise costs a fence and a load. Returns
    /// whether a wake call was made.
    #[inline]
    pub fn notify<N: Notify + ?Sized>(&self, notifier: &N) -> bool {
        // SYNC ANNOUNCE: pairs with the fence in `announce`.
        fence(Ordering::SeqCst);
        let waiters = self.words.waiters.load(Ordering::Relaxed);
        if waiters == 0 {
            return false;
        }
        self.notify_slow(notifier, waiters);
        true
    }

    /// [`notify`](Self::notify) for a caller that has just issued the
    /// `fence(SeqCst)` after publishing (e.g. `ReadGrant::release_notify`).
    #[inline]
    pub(crate) fn notify_fenced<N: Notify + ?Sized>(&self, notifier: &N) -> bool {
        let waiters = self.words.waiters.load(Ordering::Relaxed);
        if waiters == 0 {
            return false;
        }
        self.notify_slow(notifier, waiters);
        true
    }

    #[cold]
    fn notify_slow<N: Notify + ?Sized>(&self, notifier: &N, waiters: u32) {
        self.words.epoch.fetch_add(1, Ordering::Release);
        notifier.wake_waiters(&self.words.epoch, waiters);
    }

    /// The futex word, for backends that sleep in the kernel on it.
    pub fn epoch_word(&self) -> &'a AtomicU32 {
        &self.words.epoch
    }
}

/// An owned handle on one wait point: keeps the ring's memory alive on its
/// own, so a thread can wait without borrowing the endpoint (which may sit
/// behind a lock the notifier side needs).
pub struct WaitHandle {
    words: NonNull<WaitWords>,
    _region: Arc<dyn Region>,
}

// SAFETY: the words are atomics in a region kept alive by the `Arc`.
#[allow(unsafe_code)]
unsafe impl Send for WaitHandle {}
// SAFETY: as above; all access is through atomics.
#[allow(unsafe_code)]
unsafe impl Sync for WaitHandle {}

impl std::fmt::Debug for WaitHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitHandle").finish_non_exhaustive()
    }
}

impl WaitHandle {
    pub(crate) fn new(words: &WaitWords, region: &Arc<dyn Region>) -> Self {
        Self { words: NonNull::from(words), _region: region.clone() }
    }

    /// The wait point.
    pub fn point(&self) -> WaitPoint<'_> {
        #[allow(unsafe_code)]
        // SAFETY: `words` points into the ring header inside the region the
        // `Arc` keeps mapped; the fields are atomics.
        let words = unsafe { self.words.as_ref() };
        WaitPoint::new(words)
    }
}
