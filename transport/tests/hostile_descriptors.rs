//! Smuggled descriptors whose last close blocks: a peer attaches, with
//! `SCM_RIGHTS`, a loopback TCP socket lingering for 30 s
//! ([`LingeringSocket`]). Whoever drops the last reference to it waits in
//! `close`; neither side may ever do that on a thread that serves others or
//! past a caller's deadline.
//!
//! - A hostile client sends them with its hello and on the socket after
//!   the handshake, then hangs up: the server (a child process) keeps
//!   serving an honest client, every call within 2 s.
//! - A hostile server sends one beside the segment and eventfds, or on the
//!   socket after its reply: the client's connect returns within its
//!   timeout plus a little, and so does dropping what it returned.

mod common;

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use common::*;
use coroipc_transport::channel::{ClientChannel, ConnectError};
use coroipc_transport::control::Control;
use coroipc_transport::eventfd::EventFd;
use coroipc_transport::handshake::{Accepted, ServerReply, HELLO_LEN, REPLY_LEN};
use coroipc_transport::segment::Segment;
use coroipc_transport::socket::{Listener, Stream};

const T: Duration = Duration::from_secs(10);
const LINGER: Duration = Duration::from_secs(30);

#[test]
#[ignore = "helper: runs as a child process of the other tests"]
fn child() {
    child_main(|_| false);
}

/// Sends `bytes` with `fd` attached; if the receiver's kernel refuses
/// descriptors (`SO_PASSRIGHTS` off: `EPERM`), sends the bytes alone.
/// Our copy of `fd` is closed right after: the receiver holds the last
/// reference.
fn smuggle(stream: &Stream, bytes: &[u8], fd: OwnedFd) -> &'static str {
    match stream.send_with_fds(bytes, &[fd.as_fd()]) {
        Ok(()) => "passed",
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            // Ours is the last reference now: do not linger on it.
            rustix::net::sockopt::set_socket_linger(&fd, Some(Duration::ZERO)).expect("linger 0");
            stream.send_with_fds(bytes, &[]).expect("send without the descriptor");
            "refused by the kernel"
        }
        // The client finished and hung up before the descriptor went out
        // (it read the reply and found nothing after it): nothing to hold.
        Err(e)
            if matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) =>
        {
            rustix::net::sockopt::set_socket_linger(&fd, Some(Duration::ZERO)).expect("linger 0");
            "not sent: the client had gone"
        }
        Err(e) => panic!("smuggling: {e}"),
    }
}

/// One hostile client: a lingering socket with its hello, another on a
/// byte after the reply, then it hangs up.
fn hostile_round(endpoint: &coroipc_transport::socket::Endpoint, keep: &mut Vec<LingerGuard>) {
    let s = Stream::connect(endpoint).expect("connect");
    let (first, guard) = lingering_socket(LINGER);
    keep.push(guard);
    let how = smuggle(&s, &hello(SERVICE_ECHO, SMALL).encode(), first);
    eprintln!("hello descriptor: {how}");
    s.as_std().set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut reply = [0u8; REPLY_LEN];
    // A frozen server does not answer: go on, the honest client will see.
    let _ = s.recv_exact_with_fds(&mut reply, 4);
    let (second, guard) = lingering_socket(LINGER);
    keep.push(guard);
    let how = smuggle(&s, b"!", second);
    eprintln!("post-handshake descriptor: {how}");
    drop(s);
}

#[test]
fn lingering_descriptors_smuggled_by_clients_never_freeze_the_server() {
    let ep = abstract_endpoint("linger-server");
    let mut server = spawn_child("server", &[(EP, ep.to_string())]);
    server.expect("READY", T);
    let ep2 = ep.clone();
    let mut honest = within(T, "honest connect", move || {
        ClientChannel::connect(&ep2, &hello(SERVICE_ECHO, SMALL), Duration::from_secs(2))
    })
    .expect("the honest client connects");
    let mut keep = Vec::new();
    let start = Instant::now();
    for seq in 0..20u64 {
        if seq % 5 == 0 {
            hostile_round(&ep, &mut keep);
        }
        // Each call has 2 s; a server frozen by a lingering close fails it.
        echo_round_trip(&mut honest, seq, Duration::from_secs(2));
    }
    eprintln!("20 honest calls beside 4 hostile clients in {:?}", start.elapsed());
    // The server still takes new clients.
    let late = within(T, "late connect", move || {
        ClientChannel::connect(&ep, &hello(SERVICE_ECHO, SMALL), Duration::from_secs(2))
    });
    assert!(late.is_ok(), "{late:?}");
    drop(keep);
}

// ---------------------------------------------------------------------------
// A hostile server
// ---------------------------------------------------------------------------

/// A valid segment and bells for [`SMALL`], as a real server sends them.
struct Setup {
    accepted: Accepted,
    segment: Segment,
    bells: [EventFd; 3],
}

impl Setup {
    fn new() -> Self {
        use coroipc_ring::{init, Region as RingRegion, RingConfig};
        use std::sync::Arc;
        let layout = coroipc_transport::channel::layout_for(&SMALL);
        let accepted = Accepted { sizes: SMALL, layout };
        let segment = Arc::new(Segment::create(layout.segment_len as usize).expect("segment"));
        Control::new(&segment, layout.control.offset).init();
        let region: Arc<dyn RingRegion> = segment.clone();
        for (r, cap) in [
            (layout.request, SMALL.request_ring_bytes),
            (layout.response, SMALL.response_ring_bytes),
            (layout.dispatch, SMALL.dispatch_ring_bytes),
        ] {
            let config = RingConfig::new(cap.into()).with_max_record(SMALL.max_message_bytes.into());
            init(&region, r.offset as usize, r.len as usize, &config).expect("ring init");
        }
        drop(region);
        let segment = Arc::try_unwrap(segment).expect("sole owner");
        Self {
            accepted,
            segment,
            bells: [EventFd::new().unwrap(), EventFd::new().unwrap(), EventFd::new().unwrap()],
        }
    }

    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.segment.as_fd(), self.bells[0].as_fd(), self.bells[1].as_fd(), self.bells[2].as_fd()]
    }
}

/// A fake server on a thread: accepts one client, reads its hello, sends
/// the reply through `behave`, then holds the socket until the client
/// hangs up. Returns the connect's outcome and how long connecting and
/// dropping what it returned took.
fn against_fake_server(
    tag: &str,
    timeout: Duration,
    behave: impl FnOnce(&Stream, &Setup, OwnedFd) + Send + 'static,
) -> (Result<(), String>, Duration) {
    let endpoint = abstract_endpoint(tag);
    let listener = Listener::bind(&endpoint).expect("bind");
    let server = std::thread::spawn(move || {
        let deadline = Instant::now() + T;
        let stream = loop {
            if let Some(s) = listener.try_accept().expect("accept") {
                break s;
            }
            assert!(Instant::now() < deadline, "nobody connected to the fake server");
            std::thread::sleep(Duration::from_millis(1));
        };
        stream.as_std().set_read_timeout(Some(T)).unwrap();
        let mut hello = [0u8; HELLO_LEN];
        stream.as_std().read_exact(&mut hello).expect("read the hello");
        let setup = Setup::new();
        let (lingering, guard) = lingering_socket(LINGER);
        behave(&stream, &setup, lingering);
        let mut buf = [0u8; 64];
        let _ = stream.as_std().read(&mut buf);
        // The lingering socket's peer lives until the client is measured.
        guard
    });
    let start = Instant::now();
    let outcome = within(T + T, "client connect and drop", move || {
        let result = ClientChannel::connect(&endpoint, &hello(SERVICE_ECHO, SMALL), timeout);
        let outcome = result.as_ref().map(|_| ()).map_err(|e: &ConnectError| format!("{e:?}"));
        drop(result);
        outcome
    });
    let took = start.elapsed();
    drop(server.join().expect("fake server thread"));
    (outcome, took)
}

#[test]
fn an_extra_lingering_descriptor_beside_the_segment_cannot_hold_the_client_past_its_timeout() {
    let timeout = Duration::from_secs(2);
    let (outcome, took) = against_fake_server("linger-extra", timeout, |stream, setup, lingering| {
        let mut fds = setup.fds();
        fds.push(lingering.as_fd());
        stream.send_with_fds(&ServerReply::Accepted(setup.accepted).encode(), &fds).expect("send reply");
        drop(fds);
        drop(lingering);
    });
    eprintln!("client: {outcome:?} in {took:?}");
    assert!(
        matches!(&outcome, Err(e) if e.starts_with("Descriptors")),
        "five descriptors are a bad reply: {outcome:?}"
    );
    assert!(took < timeout + Duration::from_secs(3), "connect with a {timeout:?} timeout took {took:?}");
}

#[test]
fn a_lingering_descriptor_after_the_reply_cannot_hold_the_client_past_its_timeout() {
    let timeout = Duration::from_secs(2);
    let (outcome, took) = against_fake_server("linger-after", timeout, |stream, setup, lingering| {
        stream.send_with_fds(&ServerReply::Accepted(setup.accepted).encode(), &setup.fds()).expect("reply");
        let how = smuggle(stream, b"!", lingering);
        eprintln!("descriptor after the reply: {how}");
    });
    eprintln!("client: {outcome:?} in {took:?}");
    assert!(
        took < timeout + Duration::from_secs(3),
        "connect and drop with a {timeout:?} timeout took {took:?}"
    );
}
