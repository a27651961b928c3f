//! Cross-process futex wait and wake on a 32-bit word in shared memory.
//!
//! These are the kernel half of the ring's wait protocol: a waiter publishes
//! "I am about to sleep" in a shared word, re-checks the condition, then calls
//! [`wait`] with the value it last saw; a notifier changes the word and calls
//! [`wake`]. The kernel compares the word with `expected` under its own lock
//! and only sleeps if they are still equal, which is what rules out a lost
//! wake-up between the waiter's last check and its sleep.
//!
//! The futexes here are **shared** (no `FUTEX_PRIVATE_FLAG`): the kernel keys
//! them by the page's backing object and offset, not by this process's
//! address space, so two processes that map the same memfd at different
//! addresses meet on the same futex. A private futex would silently never
//! wake a waiter in another process. The test
//! `wake_reaches_a_waiter_through_a_second_mapping` checks exactly that.
//!
//! Cost (`benches/README.md`): on the 2-vCPU machines this project is measured on a
//! futex sleep/wake round trip between two processes costs about 45 µs, so
//! callers spin for a time budget before calling [`wait`], and call [`wake`]
//! only when the shared word says somebody sleeps.

use core::sync::atomic::AtomicU32;
use core::time::Duration;

use rustix::io::Errno;
use rustix::thread::futex;

/// Sleeps while `*word == expected`, until woken, interrupted or timed out.
///
/// `timeout` is relative and measured on `CLOCK_MONOTONIC`; `None` waits
/// without bound. `word` must be 4-byte aligned (guaranteed by `AtomicU32`)
/// and should live in memory shared with the process that will wake it.
///
/// Returning `Ok(())` promises nothing about the word: it covers a wake-up by
/// [`wake`], a spurious wake-up, a signal (`EINTR`) and the word already
/// differing from `expected` on entry (`EAGAIN`). Callers re-check their
/// condition in a loop, as with any futex.
///
/// # Errors
///
/// - [`Errno::TIMEDOUT`] when `timeout` elapsed without a wake-up.
/// - Any other errno the kernel reports (`EFAULT`, `EINVAL`, `ENOSYS`), which
///   means the word or the system is unusable; these are not expected for a
///   valid `&AtomicU32`.
///
/// # Examples
///
/// ```
/// use std::sync::atomic::AtomicU32;
/// use std::time::Duration;
///
/// let word = AtomicU32::new(1);
/// // The word is not 0, so this returns at once (EAGAIN is folded into Ok).
/// coroipc_transport::futex::wait(&word, 0, Some(Duration::from_secs(5))).unwrap();
/// // Nobody changes the word, so this times out.
/// let err = coroipc_transport::futex::wait(&word, 1, Some(Duration::from_millis(1)));
/// assert_eq!(err, Err(rustix::io::Errno::TIMEDOUT));
/// ```
#[doc(alias = "FUTEX_WAIT")]
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> Result<(), Errno> {
    let timespec = timeout.map(duration_to_timespec);
    match futex::wait(word, futex::Flags::empty(), expected, timespec.as_ref()) {
        Ok(()) | Err(Errno::AGAIN) | Err(Errno::INTR) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Wakes at most `n` threads sleeping in [`wait`] on `word`, in any process
/// that maps the same memory; returns how many were woken.
///
/// `n` is capped at `i32::MAX`: the kernel reads it as a C `int`, and a value
/// that turns negative there would wake only one waiter. Use [`wake_all`] to
/// wake everybody.
///
/// A wake with nobody waiting costs a syscall (about 0.3 µs) and does
/// nothing; callers avoid it by recording sleepers in the shared word.
///
/// Errors from the kernel (`EFAULT`, `EINVAL`) cannot happen for a valid
/// `&AtomicU32` and are reported as zero threads woken.
#[doc(alias = "FUTEX_WAKE")]
pub fn wake(word: &AtomicU32, n: u32) -> usize {
    let n = n.min(i32::MAX as u32);
    match futex::wake(word, futex::Flags::empty(), n) {
        Ok(woken) => woken,
        Err(e) => {
            debug_assert!(false, "FUTEX_WAKE failed on a valid word: {e}");
            0
        }
    }
}

/// Wakes every thread sleeping in [`wait`] on `word`; returns how many.
pub fn wake_all(word: &AtomicU32) -> usize {
    wake(word, u32::MAX)
}

/// Converts a relative timeout, saturating at the largest `timespec` (which
/// is as good as "forever").
fn duration_to_timespec(d: Duration) -> futex::Timespec {
    futex::Timespec::try_from(d).unwrap_or(futex::Timespec { tv_sec: i64::MAX, tv_nsec: 999_999_999 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::Segment;
    use std::os::fd::AsFd;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn wait_returns_at_once_when_value_differs() {
        let word = AtomicU32::new(7);
        let start = Instant::now();
        assert_eq!(wait(&word, 8, Some(Duration::from_secs(10))), Ok(()));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn wait_times_out() {
        let word = AtomicU32::new(0);
        let start = Instant::now();
        assert_eq!(wait(&word, 0, Some(Duration::from_millis(20))), Err(Errno::TIMEDOUT));
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn huge_timeout_saturates_instead_of_failing() {
        let word = AtomicU32::new(1);
        assert_eq!(wait(&word, 0, Some(Duration::MAX)), Ok(()));
    }

    #[test]
    fn wake_with_no_waiter_wakes_nobody() {
        let word = AtomicU32::new(0);
        assert_eq!(wake(&word, 1), 0);
        assert_eq!(wake_all(&word), 0);
    }

    #[test]
    fn wake_releases_a_waiting_thread() {
        let word = Arc::new(AtomicU32::new(0));
        let waiter = {
            let word = Arc::clone(&word);
            std::thread::spawn(move || {
                while word.load(Ordering::Acquire) == 0 {
                    wait(&word, 0, Some(Duration::from_secs(10))).unwrap();
                }
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        word.store(1, Ordering::Release);
        wake_all(&word);
        waiter.join().unwrap();
    }

    /// Two mappings of one memfd at different addresses stand in for two
    /// processes: only a shared futex (keyed by the memfd page) connects them.
    #[test]
    fn wake_reaches_a_waiter_through_a_second_mapping() {
        let a = Segment::create(4096).unwrap();
        let fd = a.as_fd().try_clone_to_owned().unwrap();
        let b = Segment::from_fd(fd, 4096).unwrap();
        assert_ne!(a.as_ptr(), b.as_ptr(), "the two mappings must differ");

        let word_a = a.atomic_u32(0);
        let b = Arc::new(b);
        let waiter = {
            let b = Arc::clone(&b);
            std::thread::spawn(move || {
                let word = b.atomic_u32(0);
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut woken_by_syscall = false;
                while word.load(Ordering::Acquire) == 0 {
                    assert!(Instant::now() < deadline, "waiter never woke");
                    match wait(word, 0, Some(Duration::from_secs(10))) {
                        Ok(()) => woken_by_syscall = true,
                        Err(e) => panic!("wait failed: {e}"),
                    }
                }
                woken_by_syscall
            })
        };
        // Wait until the waiter sleeps in the kernel, then wake it through
        // the other mapping.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            std::thread::sleep(Duration::from_millis(5));
            word_a.store(0, Ordering::Release);
            if wake(word_a, 1) == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "waiter never slept");
        }
        // The first wake only proves the futexes meet; now let it finish.
        word_a.store(1, Ordering::Release);
        wake_all(word_a);
        assert!(waiter.join().unwrap());
        assert_eq!(b.atomic_u32(0).load(Ordering::Acquire), 1);
    }
}
