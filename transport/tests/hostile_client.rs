//! A hostile client process: it completes the handshake by hand, maps the
//! segment it was sent, and scribbles garbage over every part of it it can
//! reach (control block, ring configs, positions, wait words, flow word,
//! record headers and payloads), while pushing requests and ringing the
//! server's bell. The server must drop that connection with an error
//! (`Corrupt`, or `PeerGone` where the garbage lands on the client's state
//! word), never panic or hang, and keep serving a well-behaved client
//! concurrently.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use coroipc_ring::{Consumer, Producer, Region as RingRegion};
use coroipc_transport::channel::{ChannelError, ClientChannel};
use coroipc_transport::eventfd::EventFd;
use coroipc_transport::handshake::{ServerReply, Span, REPLY_LEN};
use coroipc_transport::segment::Segment;
use coroipc_transport::socket::Stream;
use coroipc_transport::waiter::socket_hung_up;

const T: Duration = Duration::from_secs(10);
/// How long a hostile client scribbles at most before giving up.
const SCRIBBLE_FOR: Duration = Duration::from_secs(3);
/// Environment variable: which part of the segment the hostile child hits.
const TARGET: &str = "COROIPC_TEST_TARGET";

/// Byte offsets of a ring header's fields (coroipc-ring's `header.rs`).
use coroipc_testkit::ring_layout::{
    CONFIG as RING_CONFIG, DATA as RING_DATA, DATA_WAIT as RING_DATA_WAIT, FLOW as RING_FLOW,
    HEAD as RING_HEAD, SPACE_WAIT as RING_SPACE_WAIT, TAIL as RING_TAIL,
};
use coroipc_testkit::Garbage;

/// What the server must make of garbage in a part of the segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Memory the server reads on every operation: it drops the client
    /// with `Corrupt` while the client is still alive.
    Corrupt,
    /// The client's state word: any value but `OPEN` reads as closed, so
    /// the server drops the client (`PeerGone`) while it is still alive.
    ClosedState,
    /// Garbage anywhere: `Corrupt` or `PeerGone` (whichever the garbage
    /// hits first), while the client is still alive.
    Dropped,
    /// The dispatch ring, which the server fills and the client drains.
    /// The server reads the client's position only when it needs room, and
    /// not at all while flow control is on (garbage in the header's flow
    /// word reads as "on"; so does a ring the client stopped draining once
    /// it is past its high watermark). Garbage the server reads is caught
    /// (`Corrupt`, the client dropped while alive); otherwise the server
    /// sends this client nothing more, and the client only starves itself
    /// until it leaves (`PeerGone`). Which comes first is timing: the
    /// client's own drain stores real positions between the garbage.
    CorruptOrStarved,
    /// Memory the server never trusts after connect (ring config, copied
    /// once at attach) or only uses as a hint (wait words: a bogus value
    /// costs a spurious wake, nothing else): the connection keeps working
    /// until the client leaves (`PeerGone`).
    Harmless,
}

/// Every target, with what the server must make of it.
const TARGETS: [(&str, Outcome); 12] = [
    ("control", Outcome::ClosedState),
    ("request-config", Outcome::Harmless),
    ("request-positions", Outcome::Corrupt),
    ("request-wait-words", Outcome::Harmless),
    ("request-flow", Outcome::Harmless),
    ("request-records", Outcome::Corrupt),
    ("response-positions", Outcome::Corrupt),
    ("response-header", Outcome::Corrupt),
    ("dispatch-positions", Outcome::CorruptOrStarved),
    ("dispatch-header", Outcome::CorruptOrStarved),
    ("wait-words-everywhere", Outcome::Harmless),
    ("everything", Outcome::Dropped),
];

#[test]
#[ignore = "helper: runs as a child process of the other tests"]
fn child() {
    child_main(|role| {
        match role {
            "hostile" => hostile_client(),
            "blocking-bells" => blocking_bells_client(),
            _ => return false,
        }
        true
    });
}

/// The 8-aligned byte ranges `target` scribbles over.
fn target_ranges(target: &str, a: &coroipc_transport::handshake::Accepted) -> Vec<(u64, u64)> {
    let l = a.layout;
    let field = |r: Span, off: u64, len: u64| (r.offset + off, r.offset + off + len);
    let positions = |r: Span| vec![field(r, RING_TAIL, 8), field(r, RING_HEAD, 8)];
    let waits = |r: Span| vec![field(r, RING_DATA_WAIT, 8), field(r, RING_SPACE_WAIT, 8)];
    let header = |r: Span| vec![field(r, 0, RING_DATA)];
    match target {
        "control" => vec![(l.control.offset, l.control.offset + l.control.len)],
        "request-config" => vec![field(l.request, RING_CONFIG.0, RING_CONFIG.1)],
        "request-positions" => positions(l.request),
        "request-wait-words" => waits(l.request),
        "request-flow" => vec![field(l.request, RING_FLOW, 8)],
        "request-records" => vec![(l.request.offset + RING_DATA, l.request.offset + l.request.len)],
        "response-positions" => positions(l.response),
        "response-header" => header(l.response),
        "dispatch-positions" => positions(l.dispatch),
        "dispatch-header" => header(l.dispatch),
        "wait-words-everywhere" => [l.request, l.response, l.dispatch].into_iter().flat_map(waits).collect(),
        "everything" => vec![(0, l.segment_len)],
        other => panic!("unknown target {other}"),
    }
}

/// A handshake by hand, as a hostile client does it (no `ClientChannel`, so
/// nothing stops it from scribbling): the stream, the accepted layout, the
/// mapped segment and the three bell descriptors.
fn raw_handshake(
) -> (Stream, coroipc_transport::handshake::Accepted, Segment, std::vec::IntoIter<std::os::fd::OwnedFd>) {
    let stream = Stream::connect(&env_endpoint()).expect("connect");
    stream.send_with_fds(&hello(SERVICE_ECHO, SMALL).encode(), &[]).expect("send hello");
    let mut reply = [0u8; REPLY_LEN];
    let fds = stream.recv_exact_with_fds(&mut reply, 4).expect("reply");
    let ServerReply::Accepted(accepted) = ServerReply::decode(&reply).expect("decodes") else {
        panic!("refused")
    };
    let mut fds = fds.into_iter();
    let segment = Segment::from_fd(fds.next().unwrap(), accepted.layout.segment_len).expect("segment");
    (stream, accepted, segment, fds)
}

/// The hostile child: a hand-made handshake, then garbage.
fn hostile_client() {
    let target = std::env::var(TARGET).expect("target");
    let (stream, accepted, segment, mut fds) = raw_handshake();
    let segment = Arc::new(segment);
    let request_bell = EventFd::from_fd(fds.next().unwrap()).expect("request eventfd");
    let region: Arc<dyn RingRegion> = segment.clone();
    let r = accepted.layout.request;
    let mut requests =
        Producer::attach(region.clone(), r.offset as usize, r.len as usize).expect("request ring");
    // It drains what the server sends, so that the server is never merely
    // waiting for space: whatever ends the connection is the garbage. The
    // exception is the response ring when it scribbles the response ring's
    // consumer position: draining would store real positions between the
    // garbage, and whether the server then reads garbage or a real position
    // would be timing (under load it may only ever see real ones). Left
    // undrained, the ring fills, and the server re-reads the garbage on every
    // attempt to answer (a corrupt position counts as "room", so the push
    // that follows reports it). The dispatch ring cannot be pinned down so:
    // once it is full, flow control stops the server from touching it (see
    // `CorruptOrStarved`).
    let attach = |r: Span| Consumer::attach(region.clone(), r.offset as usize, r.len as usize).expect("ring");
    let response_head_scribbled = target == "response-positions" || target == "response-header";
    let mut inbound = vec![attach(accepted.layout.dispatch)];
    if !response_head_scribbled {
        inbound.push(attach(accepted.layout.response));
    }
    let mut sink = vec![0u8; 4096];
    let ranges = target_ranges(&target, &accepted);
    report("READY", &format!("pid={} target={target}", std::process::id()));

    let mut garbage = Garbage::new(u64::from(std::process::id()) << 32 | mono_ns() | 1);
    let start = Instant::now();
    let mut rounds = 0u64;
    let dropped = loop {
        if socket_hung_up(&stream) {
            break true;
        }
        if start.elapsed() > SCRIBBLE_FOR {
            break false;
        }
        rounds += 1;
        // Valid-looking traffic, so the server reads, answers and dispatches.
        let _ = requests.try_push(&message(CMD_ECHO, rounds, b"hostile"));
        let _ = requests.try_push(&message(CMD_DISPATCH, rounds, &4u32.to_le_bytes()));
        request_bell.signal();
        for ring in &mut inbound {
            for _ in 0..16 {
                if ring.try_pop(&mut sink).is_err() {
                    break;
                }
            }
        }
        for _ in 0..8 {
            let (lo, hi) = ranges[(garbage.next() as usize) % ranges.len()];
            let words = (hi - lo) / 8;
            let at = lo + (garbage.next() % words) * 8;
            segment.atomic_u64(at as usize).store(garbage.word(), Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    report("DONE", &format!("dropped={dropped} rounds={rounds}"));
}

#[test]
fn server_drops_scribbling_clients_and_keeps_serving_a_good_one() {
    let server = ServerThread::spawn(abstract_endpoint("hostile"), ServerConfig::default());

    // A well-behaved client does round trips the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let ep = server.endpoint.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut client = ClientChannel::connect(&ep, &hello(SERVICE_ECHO, SMALL), T).expect("connect");
            let mut worst = Duration::ZERO;
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                let t = Instant::now();
                echo_round_trip(&mut client, n, T);
                worst = worst.max(t.elapsed());
                n += 1;
            }
            (n, worst)
        })
    };
    let good_pid = std::process::id();
    server.expect_event(T, |e| matches!(e, Event::Accepted { pid, .. } if *pid == Some(good_pid)));

    let mut hostile: Vec<(ChildProc, &str, Outcome)> = TARGETS
        .iter()
        .map(|&(target, outcome)| {
            let c =
                spawn_child("hostile", &[(EP, server.endpoint.to_string()), (TARGET, target.to_string())]);
            (c, target, outcome)
        })
        .collect();
    for (c, _, _) in &mut hostile {
        c.expect("READY", T);
    }

    for (c, target, outcome) in &mut hostile {
        let done = c.expect("DONE", T);
        let pid = c.pid();
        let ev = server.expect_event(T, |e| matches!(e, Event::Closed { pid: p, .. } if *p == Some(pid)));
        let Event::Closed { reason, .. } = ev else { unreachable!() };
        eprintln!("hostile client [{target}]: {done}; server: {reason:?}");
        let dropped_alive = field(&done, "dropped") == "true";
        match outcome {
            Outcome::Corrupt => {
                assert!(matches!(reason, Err(ChannelError::Corrupt(_))), "[{target}] {reason:?}");
                assert!(dropped_alive, "[{target}] the server dropped the client while it lived");
            }
            Outcome::ClosedState => {
                assert_eq!(reason, Err(ChannelError::PeerGone), "[{target}]");
                assert!(dropped_alive, "[{target}] the server dropped the client while it lived");
            }
            Outcome::Dropped => {
                assert!(
                    matches!(reason, Err(ChannelError::Corrupt(_) | ChannelError::PeerGone)),
                    "[{target}] {reason:?}"
                );
                assert!(dropped_alive, "[{target}] the server dropped the client while it lived");
            }
            Outcome::Harmless => {
                assert_eq!(reason, Err(ChannelError::PeerGone), "[{target}]");
                assert!(!dropped_alive, "[{target}] served until the client left");
            }
            Outcome::CorruptOrStarved => {
                let corrupt = matches!(reason, Err(ChannelError::Corrupt(_)));
                assert!(corrupt || reason == Err(ChannelError::PeerGone), "[{target}] {reason:?}");
                assert_eq!(corrupt, dropped_alive, "[{target}] dropped while alive exactly when corrupt");
            }
        }
    }
    server.wait_until(T, "only the good client left", |s| s.connections() == 1);

    stop.store(true, Ordering::Release);
    let (n, worst) = within(T, "good client", move || good.join().expect("the good client never failed"));
    eprintln!("good client: {n} round trips meanwhile, slowest {worst:?}");
    assert!(n > 0);
}

/// Environment variable: "exit" makes the `blocking-bells` child exit right
/// after its attack (the server then drops the connection), "stay" keeps
/// it connected.
const THEN: &str = "COROIPC_TEST_THEN";

/// A hostile child that turns the three eventfds it was sent into blocking
/// ones. `O_NONBLOCK` is a flag of the open file description, which
/// `SCM_RIGHTS` shares with the server: the server's own descriptors become
/// blocking too. It then saturates the response and dispatch counters (a
/// blocking `write(2)` of 1 to a saturated eventfd sleeps until somebody
/// reads) and announces a poll-waiter on every wait point, so that each
/// server notification writes to an eventfd.
fn blocking_bells_client() {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
    let (_stream, accepted, segment, fds) = raw_handshake();
    let bells: Vec<_> = fds.collect();
    for fd in &bells {
        let flags = fcntl_getfl(fd).expect("getfl");
        fcntl_setfl(fd, flags - OFlags::NONBLOCK).expect("setfl");
    }
    for fd in &bells[1..] {
        rustix::io::write(fd, &(u64::MAX - 1).to_ne_bytes()).expect("saturate");
    }
    for r in [accepted.layout.request, accepted.layout.response, accepted.layout.dispatch] {
        for wait_words in [RING_DATA_WAIT, RING_SPACE_WAIT] {
            // waiters = one poller (coroipc_ring::POLL_WAITER).
            segment
                .atomic_u32((r.offset + wait_words) as usize)
                .store(coroipc_ring::POLL_WAITER, Ordering::Release);
        }
    }
    report("READY", &format!("pid={}", std::process::id()));
    if std::env::var(THEN).as_deref() == Ok("stay") {
        let _ = read_stdin_line();
    }
}

fn blocking_bells_cannot_hang_the_server(then: &str) {
    let server = ServerThread::spawn(abstract_endpoint("blocking-bells"), ServerConfig::default());
    let mut good = ClientChannel::connect(&server.endpoint, &hello(SERVICE_ECHO, SMALL), T).expect("connect");
    echo_round_trip(&mut good, 0, T);

    let mut hostile =
        spawn_child("blocking-bells", &[(EP, server.endpoint.to_string()), (THEN, then.to_string())]);
    hostile.expect("READY", T);
    let pid = hostile.pid();
    let gone = |server: &ServerThread| {
        server.expect_event(T, |e| matches!(e, Event::Closed { pid: p, .. } if *p == Some(pid)));
    };
    if then == "exit" {
        // The server drops the connection: its close wakes every wait
        // point, which writes to the saturated, now blocking, eventfds.
        hostile.wait_exit(T);
        gone(&server);
    }
    // The server keeps serving: a blocked server thread would leave these
    // round trips hanging.
    let good = within(Duration::from_secs(5), "round trips past the blocking bells", move || {
        for seq in 1..200 {
            echo_round_trip(&mut good, seq, Duration::from_secs(2));
        }
        good
    });
    if then == "stay" {
        drop(hostile);
        gone(&server);
    }
    drop(good);
}

#[test]
fn client_making_shared_eventfds_blocking_cannot_hang_the_server_while_connected() {
    blocking_bells_cannot_hang_the_server("stay");
}

#[test]
fn client_making_shared_eventfds_blocking_cannot_hang_the_server_when_it_leaves() {
    blocking_bells_cannot_hang_the_server("exit");
}
