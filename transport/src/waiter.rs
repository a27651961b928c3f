//! Adaptive waiting: spin for a time budget, then sleep in the kernel, and
//! notice a dead peer while asleep.
//!
//! Why (figures in `benches/README.md`): on the 2-vCPU virtual
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

use std::sync::atomic::AtomicU32;

use coroipc_ring::{Notify, WaitPoint};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::io::Errno;
use rustix::time::Timespec;

use crate::bell::Bell;
use crate::control::{Control, Side};
use crate::futex;
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
    /// Measured (`benches/README.md`, "Wake path", 2-vCPU KVM
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
        if i.is_multiple_of(16) {
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

/// [`spin_until`] for a consumer that caught up with a fast producer: it
/// looks at the producer's position less and less often (exponential
/// backoff of `spin_loop` hints between looks, from `first` up to 64 times
/// that), so that the producer — which writes that cache line for every
/// record — can publish a batch without the line bouncing between the two
/// CPUs at every record. Yields after [`PURE_SPIN`] like `spin_until`.
/// (ev64, `benches/README.md`: a receiver polling the line without
/// backoff ran the stream at a quarter of the rate.)
#[inline]
pub fn spin_backoff_until(ready: &mut impl FnMut() -> bool, budget: Duration, first: u32) -> bool {
    if ready() {
        return true;
    }
    if budget.is_zero() {
        return false;
    }
    let start = Instant::now();
    let mut pause = first.max(1);
    let most = pause.saturating_mul(64);
    loop {
        for _ in 0..pause {
            std::hint::spin_loop();
        }
        if ready() {
            return true;
        }
        let elapsed = start.elapsed();
        if elapsed >= budget {
            return false;
        }
        if elapsed >= PURE_SPIN {
            std::thread::yield_now();
        }
        pause = (pause * 2).min(most);
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
    ready: impl FnMut() -> bool,
    liveness: Liveness<'_>,
    deadline: Option<Instant>,
    policy: WaitPolicy,
) -> Result<(), WaitError> {
    wait_until_observed(point, bell, ready, liveness, deadline, policy, LIVENESS_SLICE, &|_| {})
}

/// How one kernel sleep of [`wait_until_observed`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SleepEnd {
    /// Woken, interrupted, or the futex word had changed already.
    Woken,
    /// The sleep's own timer ended it (a futex slice or the poll timeout).
    TimedOut,
}

/// The futex step's backend: the ring's [`Notify`] on `bell`, reporting to
/// `observe` whether each sleep ended by its timer.
struct ObservedFutex<'a> {
    bell: &'a Bell,
    observe: &'a dyn Fn(SleepEnd),
}

impl Notify for ObservedFutex<'_> {
    fn wait(&self, word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
        // EAGAIN (word changed) and EINTR are folded into Ok: "re-check".
        let end = match futex::wait(word, expected, timeout) {
            Err(Errno::TIMEDOUT) => SleepEnd::TimedOut,
            _ => SleepEnd::Woken,
        };
        (self.observe)(end);
    }
    fn wake(&self, word: &AtomicU32) {
        self.bell.wake(word);
    }
    fn wake_waiters(&self, word: &AtomicU32, waiters: u32) {
        self.bell.wake_waiters(word, waiters);
    }
}

/// [`wait_until`] with the futex slice as a parameter and an observer told
/// how each kernel sleep ended, so tests can tell a sleep that a wake-up
/// ended from one that only its timer ended (a lost wake-up) instead of
/// timing them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn wait_until_observed(
    point: WaitPoint<'_>,
    bell: &Bell,
    mut ready: impl FnMut() -> bool,
    liveness: Liveness<'_>,
    deadline: Option<Instant>,
    policy: WaitPolicy,
    futex_slice: Duration,
    observe: &dyn Fn(SleepEnd),
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
    let futex = ObservedFutex { bell, observe };
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
                // The ring's wait step (announce, re-check, sleep while the
                // epoch is unchanged), the one the loom models check.
                let slice = left.map_or(futex_slice, |l| l.min(futex_slice));
                if point.wait_once(&futex, &mut ready, Some(slice)) {
                    return Ok(());
                }
            }
            SleepMode::Poll => {
                let a = point.announce_poll();
                if ready() {
                    point.cancel(a);
                    return Ok(());
                }
                observe(poll_bell_and_socket(bell, liveness.stream, left));
                point.cancel(a);
                bell.drain();
                if ready() {
                    return Ok(());
                }
            }
        }
    }
}

fn poll_bell_and_socket(bell: &Bell, stream: &Stream, timeout: Option<Duration>) -> SleepEnd {
    let mut fds = [PollFd::new(bell, PollFlags::IN), PollFd::new(stream, PollFlags::IN | PollFlags::RDHUP)];
    let ts = timeout.map(|d| Timespec::try_from(d).unwrap_or(Timespec { tv_sec: i64::MAX, tv_nsec: 0 }));
    match poll(&mut fds, ts.as_ref()) {
        Ok(0) => SleepEnd::TimedOut,
        _ => SleepEnd::Woken,
    }
}

/// The blocking waits as they run — spin budget zero, announce, re-check,
/// sleep on the futex or in `poll(2)`, wake — with a waiter and a "peer" on
/// two mappings of one memfd (as two processes would be), and every kernel
/// sleep's ending observed. The verdicts count sleeps that their timer
/// ended; no test measures how long anything took.
///
/// Teeth (checked when the tests were written, by applying each mutant and
/// running `cargo test -p coroipc-transport --lib waiter`):
/// - no re-check after announcing in the futex step (the step is the ring's
///   `WaitPoint::wait_once`; mutant
///   `verification/mutants/wait-once-no-recheck.patch`):
///   `a_publication_just_before_the_announcement_is_never_slept_through`
///   fails (one sleep ended by its slice timer);
/// - no re-check after `announce_poll` (mutant
///   `verification/mutants/waiter-poll-no-recheck.patch`): the same test
///   fails in poll mode;
/// - private futexes (`FUTEX_PRIVATE_FLAG` in `futex.rs`, mutant
///   `verification/mutants/futex-private.patch`):
///   `a_peer_on_another_mapping_wakes_a_sleeper` fails (the wake through
///   the other mapping never reaches the sleeper, whose long slice ends by
///   its timer).
#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::{mpsc, Arc};

    use coroipc_ring::{init, required_size, Consumer, Producer, Region, RingConfig};

    use super::*;
    use crate::segment::Segment;

    const RING_AT: usize = 512;
    const CAPACITY: u64 = 256;

    /// The waiter's mapping (control block at 0, a ring at `RING_AT`) and
    /// the peer's second mapping of the same memfd.
    fn two_mappings() -> (Arc<Segment>, Arc<Segment>) {
        let a = Arc::new(Segment::create(4096).expect("memfd"));
        Control::new(&a, 0).init();
        let region: Arc<dyn Region> = a.clone();
        init(&region, RING_AT, required_size(CAPACITY), &RingConfig::new(CAPACITY)).expect("valid ring");
        let fd = a.as_fd().try_clone_to_owned().expect("dup");
        let b = Arc::new(Segment::from_fd(fd, 4096).expect("second mapping"));
        assert_ne!(a.as_ptr(), b.as_ptr(), "the two mappings must differ");
        (a, b)
    }

    fn consumer(s: &Arc<Segment>) -> Consumer {
        Consumer::attach(s.clone(), RING_AT, required_size(CAPACITY)).expect("attach consumer")
    }

    fn producer(s: &Arc<Segment>) -> Producer {
        Producer::attach(s.clone(), RING_AT, required_size(CAPACITY)).expect("attach producer")
    }

    /// Counts the sleeps that ended by their own timer.
    fn counting(timeouts: &AtomicU32) -> impl Fn(SleepEnd) + '_ {
        move |end| {
            if end == SleepEnd::TimedOut {
                timeouts.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The peer publishes right after the waiter's last check before it
    /// announces. The ready check plays the peer: the first check made
    /// before the waiter ever announced (or slept) publishes a record and
    /// notifies through the other mapping, and every such check answers
    /// "not ready" — what the waiter would see if the record had
    /// landed just after its last such check, wherever that is. The
    /// notification finds no waiter and wakes nobody, so only the re-check
    /// after announcing can see the record; a waiter that sleeps instead
    /// sleeps until its timer ends the sleep.
    #[test]
    fn a_publication_just_before_the_announcement_is_never_slept_through() {
        for mode in [SleepMode::Futex, SleepMode::Poll] {
            let (a, b) = two_mappings();
            let rx = consumer(&a);
            let mut tx = producer(&b);
            let peer_rx = consumer(&b); // the peer's view of the wait point
            let bell = Bell::new().expect("eventfd");
            let (stream, _peer_end) = Stream::pair().expect("socketpair");
            let liveness = Liveness { stream: &stream, control: Control::new(&a, 0), peer: Side::Server };
            let timeouts = AtomicU32::new(0);
            let slept = std::cell::Cell::new(false);
            let observe = |end| {
                slept.set(true);
                counting(&timeouts)(end);
            };
            let mut published = false;
            let mut announced = false;
            let ready = || {
                announced |= rx.data_wait().has_waiters() || slept.get();
                if !announced {
                    if !published {
                        published = true;
                        let _ = tx.try_push(b"just too late").expect("room");
                        assert!(!peer_rx.data_wait().notify(&bell), "nobody announced: no wake call");
                    }
                    return false;
                }
                rx.has_data_uncached()
            };
            let deadline = Some(Instant::now() + Duration::from_secs(5));
            let result = wait_until_observed(
                rx.data_wait(),
                &bell,
                ready,
                liveness,
                deadline,
                WaitPolicy::sleep_only(mode),
                LIVENESS_SLICE,
                &observe,
            );
            assert_eq!(result, Ok(()), "{mode:?}: the record is there");
            assert!(published, "{mode:?}: the peer published");
            assert_eq!(
                timeouts.load(Ordering::Relaxed),
                0,
                "{mode:?}: a sleep ended by its timer although the record was published before it began (lost wake-up)"
            );
            assert!(!rx.data_wait().has_waiters(), "{mode:?}: the announcement is withdrawn");
        }
    }

    /// Whether thread `tid` of this process is blocked in the kernel.
    fn sleeping(tid: i32) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
        stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('S'))
    }

    /// A waiter asleep on its mapping is woken by a peer that publishes and
    /// notifies through the other mapping. The futex slice is 30 s, so a
    /// wake that does not reach the sleeper (a private futex keys the two
    /// mappings apart) shows as a sleep ended by its timer, not as a slow
    /// pass; the peer notifies only once the waiter is announced and blocked
    /// in the kernel, so the wake-up is what must end the sleep.
    #[test]
    fn a_peer_on_another_mapping_wakes_a_sleeper() {
        for mode in [SleepMode::Futex, SleepMode::Poll] {
            let (a, b) = two_mappings();
            let bell = Arc::new(Bell::new().expect("eventfd"));
            let (tid_tx, tid_rx) = mpsc::channel();
            let done = Arc::new(AtomicBool::new(false));
            let waiter = {
                let (a, bell, done) = (a.clone(), bell.clone(), done.clone());
                std::thread::spawn(move || {
                    let rx = consumer(&a);
                    let (stream, _peer_end) = Stream::pair().expect("socketpair");
                    let liveness =
                        Liveness { stream: &stream, control: Control::new(&a, 0), peer: Side::Server };
                    let timeouts = AtomicU32::new(0);
                    tid_tx.send(rustix::thread::gettid().as_raw_nonzero().get()).expect("main thread");
                    let result = wait_until_observed(
                        rx.data_wait(),
                        &bell,
                        || rx.has_data_uncached(),
                        liveness,
                        Some(Instant::now() + Duration::from_secs(60)),
                        WaitPolicy::sleep_only(mode),
                        Duration::from_secs(30),
                        &counting(&timeouts),
                    );
                    done.store(true, Ordering::Release);
                    (result, timeouts.load(Ordering::Relaxed))
                })
            };
            let tid = tid_rx.recv().expect("waiter thread");
            let peer_rx = consumer(&b);
            let mut tx = producer(&b);
            let give_up = Instant::now() + Duration::from_secs(20);
            while !(peer_rx.data_wait().has_waiters() && sleeping(tid)) {
                assert!(Instant::now() < give_up, "{mode:?}: the waiter never went to sleep");
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = tx.try_push(b"wake up").expect("room");
            assert!(peer_rx.data_wait().notify(&*bell), "{mode:?}: the sleeper announced itself");
            let (result, timeouts) = waiter.join().expect("waiter thread");
            assert!(done.load(Ordering::Acquire));
            assert_eq!(result, Ok(()), "{mode:?}");
            assert_eq!(
                timeouts, 0,
                "{mode:?}: the wake-up did not reach the sleeper; its timer ended the sleep"
            );
        }
    }
}
