//! Wake-path benches: round trips between
//! **two processes**, for the kernel floors and for our connection path.
//! Scenarios and figures: `benches/README.md`, section "Wake path".
//!
//! The bench binary re-executes itself as the child (environment variable
//! [`CHILD_ENV`] names the scenario). The child connects to an abstract Unix
//! socket the parent listens on; everything else (memfd, eventfds, pipe
//! ends, a socketpair end) travels over that socket with `SCM_RIGHTS`. The
//! parent measures; the child echoes. Every round trip carries a sequence
//! number that the child echoes and the parent checks.
//!
//! Two modes:
//! - default: criterion, one group `wake_rtt`, `time` per round trip
//!   (`iter_custom`, so the timing is the parent's wall clock over `n`
//!   round trips); `COROIPC_WAKE_PIN=same|split` pins the two processes
//!   to one CPU or to two (unpinned, the sleeping scenarios are bimodal);
//! - `COROIPC_WAKE_REPORT=<rounds>`: instead of criterion, times every
//!   round trip (hdrhistogram) and prints median / p99 per scenario, with
//!   the two processes unpinned, pinned to the same CPU and pinned to
//!   different CPUs, plus context switches and migrations per round trip
//!   from `/proc/<pid>/sched`. Rounds alternate the scenarios so that load
//!   from other processes spreads over all of them. Filters (comma
//!   separated names): `COROIPC_WAKE_SCENARIOS`, `COROIPC_WAKE_PLACEMENTS`
//!   (`unpinned`, `unp+busy1`, `same-cpu`, `split-cpus`).

use coroipc_benches::floor::{self, PAGE, PING, PONG};
use coroipc_benches::proc::unpin;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use coroipc_transport::channel::{negotiate, ChannelError, ClientChannel, Limits, PendingHandshake};
use coroipc_transport::futex;
use coroipc_transport::handshake::{ClientHello, RingSizes};
use coroipc_transport::message::{MessageHeader, HEADER_LEN};
use coroipc_transport::segment::Segment;
use coroipc_transport::socket::{Endpoint, Listener, Stream};
use coroipc_transport::waiter::{socket_hung_up, SleepMode, WaitPolicy};
use criterion::{Criterion, Throughput};
use hdrhistogram::Histogram;
use rustix::event::{eventfd, EventfdFlags};
use rustix::pipe::{pipe_with, PipeFlags};

/// Names the scenario a child process serves.
const CHILD_ENV: &str = "COROIPC_WAKE_CHILD";
/// The abstract socket the child connects to.
const ENDPOINT_ENV: &str = "COROIPC_WAKE_ENDPOINT";
/// The CPU the child pins itself to, if set.
const CPU_ENV: &str = "COROIPC_WAKE_CPU";
/// Criterion mode: `none` (default), `same` (both processes on CPU 0) or
/// `split` (parent on CPU 0, child on CPU 1).
const PIN_ENV: &str = "COROIPC_WAKE_PIN";
/// Report mode: number of rounds.
const REPORT_ENV: &str = "COROIPC_WAKE_REPORT";

/// The value that tells an eventfd child to exit.
const STOP: u64 = 1 << 62;
/// The value that tells a shared-memory child to exit (round trips carry
/// `seq32`, which never reaches it).
const STOP32: u32 = u32::MAX;
/// Total message size of our round trips: rr64, header included.
const MESSAGE: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// Both sides busy-poll a shared cache line (floor for the spinning path).
    Spin,
    /// Shared futex words; every step is a `FUTEX_WAKE` and a `FUTEX_WAIT`.
    Futex,
    /// Two blocking eventfds: write, then blocking `read(2)`.
    EventFd,
    /// Two pipes: write 8 bytes, blocking `read(2)` of 8 bytes.
    Pipe,
    /// A socketpair: write 8 bytes, blocking `read(2)`.
    UnixSocket,
    /// Our channel, `WaitPolicy::sleep_only(SleepMode::Futex)` on both sides.
    OursFutex,
    /// Our channel, `WaitPolicy::sleep_only(SleepMode::Poll)` on both sides.
    OursPoll,
    /// Our channel, `WaitPolicy::default()` on both sides.
    OursAdaptive,
    /// Our channel, `WaitPolicy::spin_only()` on both sides.
    OursSpin,
}

impl Scenario {
    const ALL: [Scenario; 9] = [
        Scenario::Spin,
        Scenario::Futex,
        Scenario::EventFd,
        Scenario::Pipe,
        Scenario::UnixSocket,
        Scenario::OursFutex,
        Scenario::OursPoll,
        Scenario::OursAdaptive,
        Scenario::OursSpin,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Spin => "spin_cacheline",
            Scenario::Futex => "futex",
            Scenario::EventFd => "eventfd",
            Scenario::Pipe => "pipe",
            Scenario::UnixSocket => "unix_socket",
            Scenario::OursFutex => "ours_sleep_futex",
            Scenario::OursPoll => "ours_sleep_poll",
            Scenario::OursAdaptive => "ours_adaptive",
            Scenario::OursSpin => "ours_spin",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s)
    }

    fn policy(self) -> Option<WaitPolicy> {
        match self {
            Scenario::OursFutex => Some(WaitPolicy::sleep_only(SleepMode::Futex)),
            Scenario::OursPoll => Some(WaitPolicy::sleep_only(SleepMode::Poll)),
            Scenario::OursAdaptive => Some(WaitPolicy::default()),
            Scenario::OursSpin => Some(WaitPolicy::spin_only()),
            _ => None,
        }
    }

    /// The floor ping-pong (`coroipc_benches::floor`) this scenario runs,
    /// if it is one of the shared-memory floors.
    fn floor_kind(self) -> Option<floor::Kind> {
        match self {
            Scenario::Spin => Some(floor::Kind::Spin),
            Scenario::Futex => Some(floor::Kind::Futex),
            _ => None,
        }
    }

    /// Busy-polls without bound: meaningless with both processes on one CPU.
    fn spins_forever(self) -> bool {
        matches!(self, Scenario::Spin | Scenario::OursSpin)
    }
}

// ---------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------

/// The parent's end of one scenario.
enum Ends {
    /// A segment: ping word at [`PING`], pong word at [`PONG`], the floor
    /// ping-pong of `kind`.
    Shared(Segment, floor::Kind),
    /// Write to `ping`, read from `pong` (eventfds, pipes).
    Fds {
        ping: OwnedFd,
        pong: OwnedFd,
    },
    Socket(Stream),
    Ours(Box<ClientChannel>),
}

/// A running scenario: the parent's end and the child process.
struct Peer {
    scenario: Scenario,
    ends: Option<Ends>,
    child: Child,
    seq: u64,
    /// The socket the child connected on: kept open, its hang-up tells a
    /// spinning or futex-sleeping child that the parent is gone.
    _control: Stream,
}

impl Peer {
    fn spawn(scenario: Scenario, child_cpu: Option<usize>) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("coroipc-wake-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let endpoint = Endpoint::Abstract(name.clone().into_bytes());
        let listener = Listener::bind(&endpoint).expect("bind the bench socket");
        let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
        cmd.env(CHILD_ENV, scenario.name())
            .env(ENDPOINT_ENV, format!("@{name}"))
            .env_remove(REPORT_ENV)
            .stdin(Stdio::null());
        if let Some(cpu) = child_cpu {
            cmd.env(CPU_ENV, cpu.to_string());
        }
        let child = cmd.spawn().expect("spawn the child");
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            if let Some(s) = listener.try_accept().expect("accept") {
                break s;
            }
            assert!(Instant::now() < deadline, "child did not connect");
            std::thread::sleep(Duration::from_millis(1));
        };
        let ends = match scenario {
            Scenario::Spin | Scenario::Futex => {
                let seg = Segment::create(PAGE).expect("memfd");
                stream.send_with_fds(b"S", &[seg.as_fd()]).expect("send memfd");
                Ends::Shared(seg, scenario.floor_kind().expect("a floor"))
            }
            Scenario::EventFd => {
                let ping = eventfd(0, EventfdFlags::CLOEXEC).expect("eventfd");
                let pong = eventfd(0, EventfdFlags::CLOEXEC).expect("eventfd");
                stream.send_with_fds(b"E", &[ping.as_fd(), pong.as_fd()]).expect("send eventfds");
                Ends::Fds { ping, pong }
            }
            Scenario::Pipe => {
                let (ping_r, ping_w) = pipe_with(PipeFlags::CLOEXEC).expect("pipe");
                let (pong_r, pong_w) = pipe_with(PipeFlags::CLOEXEC).expect("pipe");
                stream.send_with_fds(b"P", &[ping_r.as_fd(), pong_w.as_fd()]).expect("send pipes");
                Ends::Fds { ping: ping_w, pong: pong_r }
            }
            Scenario::UnixSocket => {
                let (mine, theirs) = Stream::pair().expect("socketpair");
                stream.send_with_fds(b"U", &[theirs.as_fd()]).expect("send socket");
                Ends::Socket(mine)
            }
            Scenario::OursFutex | Scenario::OursPoll | Scenario::OursAdaptive | Scenario::OursSpin => {
                let (mine, theirs) = Stream::pair().expect("socketpair");
                stream.send_with_fds(b"C", &[theirs.as_fd()]).expect("send socket");
                drop(theirs);
                let sizes = RingSizes { max_message_bytes: 1024, ..RingSizes::default() };
                let hello = ClientHello { service: 1, flags: 0, sizes };
                let mut ch =
                    ClientChannel::handshake(mine, &hello, Duration::from_secs(10)).expect("handshake");
                ch.set_wait_policy(scenario.policy().expect("our scenario"));
                Ends::Ours(Box::new(ch))
            }
        };
        let mut peer = Self { scenario, ends: Some(ends), child, seq: 0, _control: stream };
        for _ in 0..100 {
            peer.round_trip();
        }
        peer
    }

    /// One round trip: send the next sequence number, wait for its echo.
    #[inline]
    fn round_trip(&mut self) {
        self.seq += 1;
        let seq = self.seq;
        match self.ends.as_mut().expect("running") {
            Ends::Shared(seg, kind) => {
                floor::ping(*kind, seg.atomic_u32(PING), seg.atomic_u32(PONG), seq32(seq));
            }
            Ends::Fds { ping, pong } => {
                write_all(ping, &seq.to_ne_bytes());
                let mut b = [0u8; 8];
                read_exact(pong, &mut b);
                assert_eq!(u64::from_ne_bytes(b), seq, "echo carries the sequence number");
            }
            Ends::Socket(s) => {
                s.as_std().write_all(&seq.to_ne_bytes()).expect("write");
                let mut b = [0u8; 8];
                s.as_std().read_exact(&mut b).expect("read");
                assert_eq!(u64::from_ne_bytes(b), seq, "echo carries the sequence number");
            }
            Ends::Ours(ch) => {
                let hdr = MessageHeader { id: 1, flags: 0, seq }.encode();
                let body = [0x5au8; MESSAGE - HEADER_LEN];
                ch.requests().send(&[IoSlice::new(&hdr), IoSlice::new(&body)], None).expect("send request");
                ch.requests().wait_response(None).expect("wait response");
                let r = ch.requests().peek_response().expect("peek").expect("a response");
                assert_eq!(r.len(), MESSAGE);
                assert_eq!(MessageHeader::decode(r).expect("header").seq, seq, "response echoes seq");
                ch.requests().release_response();
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        match self.ends.take() {
            Some(Ends::Shared(seg, _)) => {
                seg.atomic_u32(PING).store(STOP32, Ordering::Release);
                futex::wake_all(seg.atomic_u32(PING));
            }
            Some(Ends::Fds { ping, .. }) if self.scenario == Scenario::EventFd => {
                write_all(&ping, &STOP.to_ne_bytes())
            }
            // Pipes, sockets and our channel: closing is the stop signal.
            _ => {}
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn seq32(seq: u64) -> u32 {
    (seq % u64::from(STOP32)) as u32
}

fn write_all(fd: &OwnedFd, mut b: &[u8]) {
    while !b.is_empty() {
        match rustix::io::write(fd, b) {
            Ok(n) => b = &b[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => panic!("write: {e}"),
        }
    }
}

/// Fills `b`; returns `false` on end of file.
fn read_exact(fd: &OwnedFd, b: &mut [u8]) -> bool {
    let mut got = 0;
    while got < b.len() {
        match rustix::io::read(fd, &mut b[got..]) {
            Ok(0) => return false,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    true
}

// ---------------------------------------------------------------------------
// Child side
// ---------------------------------------------------------------------------

fn child_main(name: &str) {
    let scenario = Scenario::from_name(name).expect("known scenario");
    if let Ok(cpu) = std::env::var(CPU_ENV) {
        pin(cpu.parse().expect("cpu number"));
    }
    let endpoint = Endpoint::parse(&std::env::var(ENDPOINT_ENV).expect("endpoint")).expect("endpoint");
    let stream = Stream::connect(&endpoint).expect("connect to parent");
    let mut tag = [0u8; 1];
    let want = match scenario {
        Scenario::Spin | Scenario::Futex | Scenario::UnixSocket => 1,
        Scenario::EventFd | Scenario::Pipe => 2,
        _ => 1,
    };
    let mut fds = stream.recv_exact_with_fds(&mut tag, want).expect("descriptors").into_iter();
    match scenario {
        Scenario::Spin | Scenario::Futex => {
            let kind = scenario.floor_kind().expect("a floor");
            let seg = Segment::from_fd(fds.next().expect("memfd"), PAGE as u64).expect("segment");
            let (ping, pong) = (seg.atomic_u32(PING), seg.atomic_u32(PONG));
            let mut last = 0;
            // A parent that died without stopping us: its socket hangs up.
            while let Some(v) = floor::pong(kind, ping, pong, last, || socket_hung_up(&stream)) {
                if v == STOP32 {
                    return;
                }
                last = v;
            }
        }
        Scenario::EventFd | Scenario::Pipe => {
            let (ping, pong) = (fds.next().expect("ping"), fds.next().expect("pong"));
            let mut b = [0u8; 8];
            while read_exact(&ping, &mut b) {
                if u64::from_ne_bytes(b) == STOP {
                    return;
                }
                write_all(&pong, &b);
            }
        }
        Scenario::UnixSocket => {
            let s = Stream::from(std::os::unix::net::UnixStream::from(fds.next().expect("socket")));
            let mut b = [0u8; 8];
            while s.as_std().read_exact(&mut b).is_ok() {
                if s.as_std().write_all(&b).is_err() {
                    return;
                }
            }
        }
        Scenario::OursFutex | Scenario::OursPoll | Scenario::OursAdaptive | Scenario::OursSpin => {
            let s = Stream::from(std::os::unix::net::UnixStream::from(fds.next().expect("socket")));
            serve(s, scenario.policy().expect("our scenario"));
        }
    }
}

/// The server end of our scenarios: a dedicated thread per connection that
/// waits for a request with `ServerChannel::wait_request` and the same
/// `policy` as the client (spin for `policy.spin`, then sleep on the request
/// ring's futex or in `poll(2)` on the request bell and the socket), copies
/// the request out, checks its sequence number and answers it with a
/// response of the same 64 bytes (`send_response`, which notifies the
/// client's wait point only if the client announced itself asleep).
fn serve(stream: Stream, policy: WaitPolicy) {
    let mut pending = PendingHandshake::new(stream).expect("pending handshake");
    let hello = loop {
        if let Some(h) = pending.poll_hello().expect("hello") {
            break h.expect("valid hello");
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let limits = Limits::default();
    let sizes = negotiate(&hello.sizes, &limits).expect("negotiate");
    let server = pending.accept(sizes, &limits).expect("accept");
    let mut buf = Vec::with_capacity(MESSAGE);
    let mut expect = 1u64;
    loop {
        match server.wait_request(None, policy) {
            Ok(()) => {}
            Err(ChannelError::PeerGone) => return,
            Err(e) => panic!("wait_request: {e}"),
        }
        while server.try_recv_request(&mut buf).expect("request") {
            let seq = MessageHeader::decode(&buf).expect("header").seq;
            assert_eq!(seq, expect, "requests arrive in order");
            expect += 1;
            match server.send_response(&[IoSlice::new(&buf)], Duration::from_secs(10)) {
                Ok(()) => {}
                Err(ChannelError::PeerGone) => return,
                Err(e) => panic!("send_response: {e}"),
            }
        }
    }
}

fn pin(cpu: usize) {
    let _ = coroipc_benches::proc::pin(cpu);
}

// ---------------------------------------------------------------------------
// Criterion mode
// ---------------------------------------------------------------------------

fn criterion_benches(c: &mut Criterion) {
    // Unpinned, the scheduler's placement (one vCPU or two) decides the
    // sleeping scenarios' figures and flips between runs; pin for ratios.
    let pinning = std::env::var(PIN_ENV).unwrap_or_default();
    let child_cpu = match pinning.as_str() {
        "" | "none" => None,
        "same" => Some(0),
        "split" => Some(1),
        other => panic!("{PIN_ENV}={other}: expected none, same or split"),
    };
    if child_cpu.is_some() {
        pin(0);
    }
    let mut g = c.benchmark_group("wake_rtt");
    g.throughput(Throughput::Elements(1));
    for scenario in Scenario::ALL {
        if child_cpu == Some(0) && scenario.spins_forever() {
            continue;
        }
        let mut peer = Peer::spawn(scenario, child_cpu);
        g.bench_function(scenario.name(), |b| {
            b.iter_custom(|n| {
                let start = Instant::now();
                for _ in 0..n {
                    peer.round_trip();
                }
                start.elapsed()
            })
        });
        drop(peer);
    }
    g.finish();
}

// ---------------------------------------------------------------------------
// Report mode
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// The scheduler places both processes.
    Unpinned,
    /// Unpinned, with a busy-looping thread of the parent pinned to CPU 1
    /// (stands in for other load on the machine).
    UnpinnedBusy,
    /// Both pinned to CPU 0.
    SameCpu,
    /// Parent on CPU 0, child on CPU 1.
    SplitCpus,
}

impl Placement {
    fn name(self) -> &'static str {
        match self {
            Placement::Unpinned => "unpinned",
            Placement::UnpinnedBusy => "unp+busy1",
            Placement::SameCpu => "same-cpu",
            Placement::SplitCpus => "split-cpus",
        }
    }
}

/// Scheduler counters of one process, from `/proc/<pid>/sched`.
#[derive(Clone, Copy, Debug, Default)]
struct SchedCounters {
    switches: u64,
    migrations: u64,
}

fn sched_counters(pid: u32) -> SchedCounters {
    let text = std::fs::read_to_string(format!("/proc/{pid}/sched")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.rsplit(':').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    SchedCounters { switches: field("nr_switches"), migrations: field("se.nr_migrations") }
}

/// The CPU `pid` last ran on (field 39 of `/proc/<pid>/stat`).
fn last_cpu(pid: u32) -> Option<usize> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 2..];
    after.split_whitespace().nth(36)?.parse().ok()
}

struct Cell {
    hist: Histogram<u64>,
    n: u64,
    parent: [SchedCounters; 2],
    child: [SchedCounters; 2],
    /// (parent's CPU, child's last CPU) before and after the timed part.
    cpus: [(usize, Option<usize>); 2],
}

fn measure(scenario: Scenario, placement: Placement) -> Cell {
    let child_cpu = match placement {
        Placement::Unpinned | Placement::UnpinnedBusy => None,
        Placement::SameCpu => Some(0),
        Placement::SplitCpus => Some(1),
    };
    if matches!(placement, Placement::Unpinned | Placement::UnpinnedBusy) {
        unpin();
    } else {
        pin(0);
    }
    let stop_hog = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hog = (placement == Placement::UnpinnedBusy).then(|| {
        let stop = stop_hog.clone();
        std::thread::spawn(move || {
            pin(1);
            while !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    });
    let mut peer = Peer::spawn(scenario, child_cpu);
    for _ in 0..1000 {
        peer.round_trip();
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).expect("histogram");
    let me = std::process::id();
    let cpus0 = (rustix::thread::sched_getcpu(), last_cpu(peer.pid()));
    let (p0, c0) = (sched_counters(me), sched_counters(peer.pid()));
    let start = Instant::now();
    let mut n = 0u64;
    while n < 50_000 && start.elapsed() < Duration::from_millis(1500) {
        let t = Instant::now();
        peer.round_trip();
        hist.saturating_record(t.elapsed().as_nanos() as u64);
        n += 1;
    }
    let (p1, c1) = (sched_counters(me), sched_counters(peer.pid()));
    let cpus1 = (rustix::thread::sched_getcpu(), last_cpu(peer.pid()));
    drop(peer);
    stop_hog.store(true, Ordering::Relaxed);
    if let Some(h) = hog {
        h.join().expect("hog");
    }
    unpin();
    Cell { hist, n, parent: [p0, p1], child: [c0, c1], cpus: [cpus0, cpus1] }
}

fn cpus((p, c): (usize, Option<usize>)) -> String {
    format!("{p},{}", c.map_or("?".into(), |c| c.to_string()))
}

/// Comma-separated names from `var`, or everything.
fn selected(var: &str, name: &str) -> bool {
    std::env::var(var).map_or(true, |v| v.split(',').any(|x| x == name))
}

fn report(rounds: u32) {
    println!(
        "{:<18} {:<10} {:>7} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}  cpus(parent,child) before→after",
        "scenario", "placement", "n", "median", "p99", "mean", "p.cs/rt", "c.cs/rt", "migr/rt"
    );
    for round in 0..rounds {
        let placements =
            [Placement::Unpinned, Placement::UnpinnedBusy, Placement::SameCpu, Placement::SplitCpus];
        for placement in placements {
            if !selected("COROIPC_WAKE_PLACEMENTS", placement.name()) {
                continue;
            }
            for scenario in Scenario::ALL {
                let spins = scenario.spins_forever() || scenario == Scenario::OursAdaptive;
                if (placement == Placement::SameCpu && scenario.spins_forever())
                    || (placement == Placement::UnpinnedBusy && spins)
                    || !selected("COROIPC_WAKE_SCENARIOS", scenario.name())
                {
                    continue;
                }
                let cell = measure(scenario, placement);
                let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / cell.n as f64;
                let migr = per(cell.parent[0].migrations, cell.parent[1].migrations)
                    + per(cell.child[0].migrations, cell.child[1].migrations);
                println!(
                    "{:<18} {:<10} {:>7} {:>9} {:>9} {:>9.0} {:>8.2} {:>8.2} {:>8.3}  {}→{}  r{round}",
                    scenario.name(),
                    placement.name(),
                    cell.n,
                    cell.hist.value_at_quantile(0.5),
                    cell.hist.value_at_quantile(0.99),
                    cell.hist.mean(),
                    per(cell.parent[0].switches, cell.parent[1].switches),
                    per(cell.child[0].switches, cell.child[1].switches),
                    migr,
                    cpus(cell.cpus[0]),
                    cpus(cell.cpus[1]),
                );
            }
        }
    }
}

fn main() {
    if let Ok(name) = std::env::var(CHILD_ENV) {
        child_main(&name);
        return;
    }
    if let Ok(rounds) = std::env::var(REPORT_ENV) {
        report(rounds.parse().expect("COROIPC_WAKE_REPORT=<rounds>"));
        return;
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    criterion_benches(&mut c);
    c.final_summary();
}
