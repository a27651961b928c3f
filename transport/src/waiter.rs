//! Adaptive waiting: spin for a time budget, then sleep in the kernel, and
//! notice a dead peer while asleep.
//!
//! Why (DESIGN.md §5, figures in `benches/README.md`): on the 2-vCPU virtual
//! machines this project runs on, a kernel sleep/wake round trip between two
//! processes costs tens of microseconds while a spinning cache-line round
//! trip costs about a tenth of a microsecond. A waiter whose peer answers at
//! once must therefore not sleep; one whose peer is slow must not burn a core.
//!
//! 1. **Spin** until the condition holds or [`WaitPolicy::spin`] elapsed
//!    (budgeted in time, not iterations). After [`PURE_SPIN`] the spinner
//!    yields between checks, so that with more runnable processes than
//!    cores (16 clients on 2 cores, or a busy machine) the peer it waits for
//!    gets to run.
//! 2. **Sleep**: announce on the ring's wait point, re-check, then sleep —
//!    on the futex word ([`SleepMode::Futex`]) or in `poll(2)` on the
//!    direction's eventfd and the connection socket ([`SleepMode::Poll`]).
//!
//! **Peer death.** A peer that shuts down cleanly writes `CLOSED` into the
//! control block and wakes every wait point, so sleepers return at once. A
//! peer killed with SIGKILL writes nothing, but the kernel closes its end of
//! the connection socket: a poll sleeper sees the hang-up at once, a futex
//! sleeper sleeps in slices of [`LIVENESS_SLICE`] and checks the socket
//! between them. Either way every blocked call returns
//! [`WaitError::PeerGone`] well within 100 ms.

use std::time::{Duration, Instant};

use coroipc_ring::WaitPoint;
use rustix::event::{poll, PollFd, PollFlags};
use rustix::time::Timespec;

use crate::bell::Bell;
use crate::control::{Control, Side};
use crate::socket::Stream;

/// Longest a futex sleeper sleeps before it checks that its peer lives.
pub const LIVENESS_SLICE: Duration = Duration::from_millis(20);

/// Where a sleeping waiter sleeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SleepMode {
    /// On the futex word in the ring header.
    Futex,
    /// In `poll(2)` on the eventfd and the socket.
    Poll,
}

/// How a blocking call waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitPolicy {
    /// How long to spin before sleeping; zero sleeps at once.
    pub spin: Duration,
    /// Where to sleep.
    pub sleep: SleepMode,
}

impl WaitPolicy {
    /// The default spin budget: about one cross-CPU kernel wake-up.
    ///
    /// Measured (`benches/README.md`, "Wake path (issue 3)", 2-vCPU KVM
    /// guest): a sleep/wake round trip between two processes on different
    /// vCPUs costs 42–47 µs median whatever the primitive (futex, eventfd,
    /// pipe, socket), so one wake-up costs ~21 µs; on one vCPU it costs
    /// ~1.8 µs. Spinning for as long as a wake-up costs (the ski-rental
    /// rule) keeps a waiter within 2× of the best choice made in hindsight,
    /// and catches every answer that comes "at once" (~0.5 µs round trip
    /// spinning). Past [`PURE_SPIN`] the spinner yields, so a peer sharing
    /// its CPU is not kept waiting for the whole budget.
    pub const DEFAULT_SPIN: Duration = Duration::from_micros(20);

    /// Never spin: every wait sleeps in the kernel (the `rr64-sleep` workload).
    pub const fn sleep_only(sleep: SleepMode) -> Self {
        Self { spin: Duration::ZERO, sleep }
    }

    /// Spin practically forever (the `rr64-spin` workload); still notices a
    /// dead peer between spin budgets.
    pub const fn spin_only() -> Self {
        Self { spin: Duration::from_secs(3600), sleep: SleepMode::Futex }
    }
}

/// [`DEFAULT_SPIN`](WaitPolicy::DEFAULT_SPIN), then sleep on the futex:
/// with both processes on one vCPU a futex-sleeping round trip measured
/// 2.0 µs median against 2.2 µs in `poll(2)` on the eventfd (one syscall
/// fewer per wait: no drain); across vCPUs both cost the same ~43 µs.
impl Default for WaitPolicy {
    fn default() -> Self {
        Self { spin: Self::DEFAULT_SPIN, sleep: SleepMode::Futex }
    }
}

/// Why a wait ended without the condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitError {
    /// The deadline passed.
    Timeout,
    /// The peer closed the connection or died.
    PeerGone,
}

/// What tells whether the peer still serves the connection.
#[derive(Clone, Copy, Debug)]
pub struct Liveness<'a> {
    /// The connection socket.
    pub stream: &'a Stream,
    /// The control block.
    pub control: Control<'a>,
    /// The side whose liveness is checked (the peer's).
    pub peer: Side,
}

impl Liveness<'_> {
    /// Whether the peer is still there: its state word says open and its
    /// end of the socket is not closed. One `poll(2)` with zero timeout.
    pub fn peer_alive(&self) -> bool {
        self.control.is_open(self.peer) && !socket_hung_up(self.stream)
    }
}

/// Whether the peer closed its end of `stream` (or sent anything: after the
/// handshake nothing legitimate arrives on the socket).
pub fn socket_hung_up(stream: &Stream) -> bool {
    let mut fds = [PollFd::new(stream, PollFlags::IN | PollFlags::RDHUP)];
    let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
    match poll(&mut fds, Some(&zero)) {
        Ok(0) => false,
        Ok(_) => !fds[0].revents().is_empty(),
        Err(_) => false,
    }
}

/// Spins until `ready()` or `budget` elapsed; returns the last `ready()`.
#[inline]
pub fn spin_until(ready: &mut impl FnMut() -> bool, budget: Duration) -> bool {
    if ready() {
        return true;
    }
    if budget.is_zero() {
        return false;
    }
    let start = Instant::now();
    // Phase 1: pure spinning, long enough for a peer on another CPU that
    // answers at once (a cache-line round trip is ~0.3 µs here).
    let mut i = 0u32;
    loop {
        if ready() {
            return true;
        }
        i = i.wrapping_add(1);
        if i % 16 == 0 {
            let elapsed = start.elapsed();
            if elapsed >= budget {
                return false;
            }
            if elapsed >= PURE_SPIN {
                break;
            }
        }
        std::hint::spin_loop();
    }
    // Phase 2: yield between checks. When the machine is oversubscribed the
    // peer may be waiting for *this* CPU; pure spinning would burn the time
    // slice it needs (measured: rr64 flipped between 0.66 µs and 27 µs per
    // round trip, the latter with client and server sharing one vCPU and
    // spinning in turn). `sched_yield` hands the CPU over at once and costs
    // a fraction of a microsecond when the other CPU is free.
    loop {
        if ready() {
            return true;
        }
        if start.elapsed() >= budget {
            return false;
        }
        std::thread::yield_now();
    }
}

/// How long [`spin_until`] spins without yielding.
pub const PURE_SPIN: Duration = Duration::from_micros(2);

/// Waits until `ready()` holds: spins, then sleeps on `point`, whose
/// notifier rings `bell`; checks `liveness` before each sleep.
///
/// # Errors
///
/// [`WaitError::Timeout`] once `deadline` passed, [`WaitError::PeerGone`]
/// if the peer closed or died.
pub fn wait_until(
    point: WaitPoint<'_>,
    bell: &Bell,
    mut ready: impl FnMut() -> bool,
    liveness: Liveness<'_>,
    deadline: Option<Instant>,
    policy: WaitPolicy,
) -> Result<(), WaitError> {
    // Spin phase, in slices so that a dead peer is noticed even by a
    // spin-only waiter.
    let start = Instant::now();
    let spin_end = match deadline {
        Some(d) => d.min(start + policy.spin),
        None => start + policy.spin,
    };
    if ready() {
        return Ok(());
    }
    loop {
        let chunk = spin_end.saturating_duration_since(Instant::now()).min(LIVENESS_SLICE);
        if chunk.is_zero() {
            break;
        }
        if spin_until(&mut ready, chunk) {
            return Ok(());
        }
        // Between slices only: the sleep phase checks before it sleeps long.
        if Instant::now() < spin_end && !liveness.peer_alive() {
            return if ready() { Ok(()) } else { Err(WaitError::PeerGone) };
        }
    }
    // Sleep phase. The peer's state word (shared memory, no syscall) is
    // checked before every sleep; its socket (a `poll(2)`, ~0.4 µs on the
    // measured VM, two per round trip) only after a sleep came back without
    // the condition: a poll sleeper watches the socket while it sleeps
    // anyway, and a futex sleeper sleeps at most LIVENESS_SLICE, so a peer
    // that died before the first sleep is still noticed within one slice.
    let mut slept = false;
    loop {
        let gone = if slept { !liveness.peer_alive() } else { !liveness.control.is_open(liveness.peer) };
        if gone {
            return if ready() { Ok(()) } else { Err(WaitError::PeerGone) };
        }
        slept = true;
        let left = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return if ready() { Ok(()) } else { Err(WaitError::Timeout) };
                }
                Some(left)
            }
            None => None,
        };
        match policy.sleep {
            SleepMode::Futex => {
                let a = point.announce();
                if ready() {
                    point.cancel(a);
                    return Ok(());
                }
                let slice = left.map_or(LIVENESS_SLICE, |l| l.min(LIVENESS_SLICE));
                point.sleep(a, bell, Some(slice));
            }
            SleepMode::Poll => {
                let a = point.announce_poll();
                if ready() {
                    point.cancel(a);
                    return Ok(());
                }
                poll_bell_and_socket(bell, liveness.stream, left);
                point.cancel(a);
                bell.drain();
            }
        }
        if ready() {
            return Ok(());
        }
    }
}

fn poll_bell_and_socket(bell: &Bell, stream: &Stream, timeout: Option<Duration>) {
    let mut fds = [PollFd::new(bell, PollFlags::IN), PollFd::new(stream, PollFlags::IN | PollFlags::RDHUP)];
    let ts = timeout.map(|d| Timespec::try_from(d).unwrap_or(Timespec { tv_sec: i64::MAX, tv_nsec: 0 }));
    let _ = poll(&mut fds, ts.as_ref());
}
