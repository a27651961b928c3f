//! A pollable wake-up: a nonblocking Linux eventfd.
//!
//! The dispatch channel must be readable through a file descriptor that the
//! application's own event loop can poll (`coroipcc_fd_get`), and the server
//! must be able to hand its connections' wake-ups to whatever loop it runs
//! in. An eventfd is the smallest such object: a 64-bit counter in the kernel
//! that is readable while non-zero. [`EventFd::signal`] adds one,
//! [`EventFd::drain`] reads and resets it.
//!
//! Neither side can be made to hang in `read(2)` or `write(2)`, even on a
//! descriptor shared with a hostile peer. `O_NONBLOCK` alone does not give
//! that: it is a flag of the *open file description*, which `SCM_RIGHTS`
//! shares between the two processes, so the peer can clear it on its copy
//! (`fcntl(F_SETFL)`) and thereby on ours; our next read of an empty
//! counter, or write to a counter it saturated, would then sleep until the
//! peer pleases (for ever, once it exited). So every read and write asks for
//! non-blocking I/O *per call* (`preadv2`/`pwritev2` with `RWF_NOWAIT`),
//! whatever the shared flag says; see `read_nowait` for kernels whose
//! eventfd does not take that flag. [`EventFd::from_fd`] still re-checks the
//! kind and sets `O_NONBLOCK`, for the application's own event loop.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
use rustix::io::{preadv2, pwritev2, Errno, ReadWriteFlags};

/// An owned, nonblocking, close-on-exec eventfd.
///
/// # Examples
///
/// ```
/// use coroipc_transport::eventfd::EventFd;
/// use std::time::Duration;
///
/// let efd = EventFd::new()?;
/// assert_eq!(efd.drain(), 0);
/// efd.signal();
/// efd.signal();
/// assert!(efd.wait(Some(Duration::ZERO))?);
/// assert_eq!(efd.drain(), 2);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// Creates an eventfd with counter 0, `EFD_NONBLOCK | EFD_CLOEXEC`.
    ///
    /// # Errors
    ///
    /// The `eventfd2(2)` error, e.g. `EMFILE` when out of descriptors.
    pub fn new() -> io::Result<Self> {
        let fd = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?;
        Ok(Self { fd })
    }

    /// Adopts an eventfd received from another process (e.g. over
    /// `SCM_RIGHTS`).
    ///
    /// The descriptor is checked to really be an eventfd (through
    /// `/proc/self/fd`), so a peer cannot pass a pipe or socket whose reads
    /// block or return partial counters, and `O_NONBLOCK` is set on it. Note
    /// that the open file description is shared with the sender, so the
    /// sender sees the flag change too; for an eventfd made by [`new`] it was
    /// already set.
    ///
    /// [`new`]: EventFd::new
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] when `fd` is not an eventfd, or the
    /// error of `readlink(2)`/`fcntl(2)`.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        if link.as_os_str() != "anon_inode:[eventfd]" {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "file descriptor is not an eventfd"));
        }
        let flags = fcntl_getfl(&fd)?;
        if !flags.contains(OFlags::NONBLOCK) {
            fcntl_setfl(&fd, flags | OFlags::NONBLOCK)?;
        }
        Ok(Self { fd })
    }

    /// Adds one to the counter, making the eventfd readable.
    ///
    /// Never blocks. If the counter is already at its maximum
    /// (`u64::MAX - 1`, `EAGAIN`), the eventfd is readable anyway and the
    /// signal is dropped, which is harmless for a wake-up.
    #[inline]
    pub fn signal(&self) {
        loop {
            match write_nowait(self.fd.as_fd(), &1u64.to_ne_bytes()) {
                Ok(_) | Err(Errno::AGAIN) => return,
                Err(Errno::INTR) => continue,
                Err(e) => {
                    // An 8-byte write to an eventfd can only fail with
                    // EAGAIN (saturated) or EINTR.
                    debug_assert!(false, "eventfd write failed: {e}");
                    return;
                }
            }
        }
    }

    /// Reads and resets the counter without blocking; returns how many
    /// signals were pending (0 if none).
    #[inline]
    pub fn drain(&self) -> u64 {
        let mut buf = [0u8; 8];
        loop {
            match read_nowait(self.fd.as_fd(), &mut buf) {
                Ok(8) => return u64::from_ne_bytes(buf),
                Ok(n) => {
                    debug_assert!(false, "eventfd read returned {n} bytes");
                    return 0;
                }
                Err(Errno::AGAIN) => return 0,
                Err(Errno::INTR) => continue,
                Err(e) => {
                    // An 8-byte read from an eventfd can only fail with
                    // EAGAIN (counter is 0) or EINTR.
                    debug_assert!(false, "eventfd read failed: {e}");
                    return 0;
                }
            }
        }
    }

    /// Waits with `poll(2)` until the eventfd is readable or `timeout`
    /// elapses; returns `true` if it is readable. Does not drain it.
    ///
    /// `None` waits without bound; `Some(Duration::ZERO)` only checks.
    /// Signals interrupting the wait are absorbed (the wait resumes with the
    /// time left).
    ///
    /// # Errors
    ///
    /// The error of `poll(2)` other than `EINTR` (e.g. `ENOMEM`).
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let left = match (timeout, deadline) {
                (None, _) => None,
                (Some(_), Some(deadline)) => Some(deadline.saturating_duration_since(Instant::now())),
                // A timeout too large to add to `now` waits forever.
                (Some(_), None) => None,
            };
            let timespec = left.map(|d| {
                Timespec::try_from(d).unwrap_or(Timespec { tv_sec: i64::MAX, tv_nsec: 999_999_999 })
            });
            let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
            match poll(&mut fds, timespec.as_ref()) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(fds[0].revents().contains(PollFlags::IN)),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// `read(2)` that never blocks, whatever the (peer-writable) `O_NONBLOCK`
/// flag of the shared file description says.
///
/// `preadv2(RWF_NOWAIT)` at the current position (`u64::MAX`) is a
/// per-call non-blocking read. A kernel whose eventfd does not take
/// `RWF_NOWAIT` (`EOPNOTSUPP`; `EINVAL` before Linux 4.14) gets the best
/// this crate can do there: read only if `poll(2)` says readable, after
/// setting `O_NONBLOCK` again. That leaves a peer racing both steps a
/// window to block us; kernels that take the flag leave none.
///
/// Whether the kernel takes the flag is learnt from the first call and
/// remembered for the process ([`NOWAIT`]), so a kernel that does not pays
/// no failing `preadv2` per call (measured on Linux 6.18, whose eventfd
/// refuses it: a quarter of the syscalls of a connect).
fn read_nowait(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    if nowait_supported() {
        match preadv2(fd, &mut [io::IoSliceMut::new(buf)], u64::MAX, ReadWriteFlags::NOWAIT) {
            Err(Errno::OPNOTSUPP | Errno::INVAL) => NOWAIT.store(NOWAIT_NO, Ordering::Relaxed),
            other => {
                NOWAIT.store(NOWAIT_YES, Ordering::Relaxed);
                return other;
            }
        }
    }
    if !ready_now(fd, PollFlags::IN) {
        return Err(Errno::AGAIN);
    }
    reassert_nonblock(fd);
    rustix::io::read(fd, buf)
}

/// `write(2)` that never blocks; see [`read_nowait`].
fn write_nowait(fd: BorrowedFd<'_>, buf: &[u8]) -> Result<usize, Errno> {
    if nowait_supported() {
        match pwritev2(fd, &[io::IoSlice::new(buf)], u64::MAX, ReadWriteFlags::NOWAIT) {
            Err(Errno::OPNOTSUPP | Errno::INVAL) => NOWAIT.store(NOWAIT_NO, Ordering::Relaxed),
            other => {
                NOWAIT.store(NOWAIT_YES, Ordering::Relaxed);
                return other;
            }
        }
    }
    if !ready_now(fd, PollFlags::OUT) {
        return Err(Errno::AGAIN);
    }
    reassert_nonblock(fd);
    rustix::io::write(fd, buf)
}

/// Whether this kernel's eventfd takes `RWF_NOWAIT`: not known yet, yes, no.
/// A property of the kernel, so one answer serves every eventfd of the
/// process; a race between two first calls only costs one more try.
static NOWAIT: AtomicU8 = AtomicU8::new(NOWAIT_UNKNOWN);
const NOWAIT_UNKNOWN: u8 = 0;
const NOWAIT_YES: u8 = 1;
const NOWAIT_NO: u8 = 2;

fn nowait_supported() -> bool {
    NOWAIT.load(Ordering::Relaxed) != NOWAIT_NO
}

/// Whether `fd` is ready for `flags` now (zero-timeout `poll(2)`).
fn ready_now(fd: BorrowedFd<'_>, flags: PollFlags) -> bool {
    let mut fds = [PollFd::from_borrowed_fd(fd, flags)];
    let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
    matches!(poll(&mut fds, Some(&zero)), Ok(n) if n > 0) && fds[0].revents().intersects(flags)
}

/// Sets `O_NONBLOCK` again if the peer cleared it.
fn reassert_nonblock(fd: BorrowedFd<'_>) {
    if let Ok(flags) = fcntl_getfl(fd) {
        if !flags.contains(OFlags::NONBLOCK) {
            let _ = fcntl_setfl(fd, flags | OFlags::NONBLOCK);
        }
    }
}

impl EventFd {
    /// Waits with `poll(2)` until `fd` is readable or `timeout` elapses;
    /// returns whether it is readable. For descriptors handed out as
    /// [`BorrowedFd`] (e.g. a dispatch fd).
    pub fn wait_fd(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        let ts = Timespec::try_from(timeout).unwrap_or(Timespec { tv_sec: i64::MAX, tv_nsec: 0 });
        matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0)
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<EventFd> for OwnedFd {
    fn from(efd: EventFd) -> OwnedFd {
        efd.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn drain_of_fresh_eventfd_is_zero() {
        let efd = EventFd::new().unwrap();
        assert_eq!(efd.drain(), 0);
        assert!(!efd.wait(Some(Duration::ZERO)).unwrap());
    }

    #[test]
    fn signals_accumulate_and_drain_resets() {
        let efd = EventFd::new().unwrap();
        efd.signal();
        efd.signal();
        efd.signal();
        assert_eq!(efd.drain(), 3);
        assert_eq!(efd.drain(), 0);
    }

    #[test]
    fn wait_times_out_when_not_signalled() {
        let efd = EventFd::new().unwrap();
        let start = Instant::now();
        assert!(!efd.wait(Some(Duration::from_millis(20))).unwrap());
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn wait_wakes_on_signal_from_another_thread() {
        let efd = Arc::new(EventFd::new().unwrap());
        let signaller = {
            let efd = Arc::clone(&efd);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                efd.signal();
            })
        };
        assert!(efd.wait(Some(Duration::from_secs(10))).unwrap());
        assert_eq!(efd.drain(), 1);
        signaller.join().unwrap();
    }

    #[test]
    fn saturated_counter_does_not_block_signal() {
        let efd = EventFd::new().unwrap();
        rustix::io::write(&efd, &(u64::MAX - 1).to_ne_bytes()).unwrap();
        efd.signal(); // would block on a blocking eventfd
        assert_eq!(efd.drain(), u64::MAX - 1);
    }

    /// A peer sharing the file description clears `O_NONBLOCK` on it:
    /// draining an empty counter and signalling a saturated one still
    /// return at once (they would sleep for ever with plain read/write).
    #[test]
    fn peer_clearing_o_nonblock_cannot_make_drain_or_signal_block() {
        let ours = EventFd::new().unwrap();
        let theirs = ours.as_fd().try_clone_to_owned().unwrap();
        let flags = fcntl_getfl(&theirs).unwrap();
        fcntl_setfl(&theirs, flags - OFlags::NONBLOCK).unwrap();
        assert!(!fcntl_getfl(&ours).unwrap().contains(OFlags::NONBLOCK), "the flag is shared");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let empty = ours.drain();
            rustix::io::write(&theirs, &(u64::MAX - 1).to_ne_bytes()).unwrap();
            ours.signal();
            let _ = tx.send((empty, ours.drain()));
        });
        let got = rx.recv_timeout(Duration::from_secs(5)).expect("drain/signal blocked");
        assert_eq!(got, (0, u64::MAX - 1));
    }

    #[test]
    fn from_fd_accepts_an_eventfd_and_shares_the_counter() {
        let a = EventFd::new().unwrap();
        let b = EventFd::from_fd(a.as_fd().try_clone_to_owned().unwrap()).unwrap();
        a.signal();
        assert_eq!(b.drain(), 1);
    }

    #[test]
    fn from_fd_rejects_a_pipe() {
        let (reader, _writer) = rustix::pipe::pipe().unwrap();
        let err = EventFd::from_fd(reader).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn from_fd_forces_nonblocking() {
        let fd = eventfd(0, EventfdFlags::CLOEXEC).unwrap();
        let efd = EventFd::from_fd(fd).unwrap();
        assert_eq!(efd.drain(), 0, "a blocking eventfd would hang here");
    }
}
