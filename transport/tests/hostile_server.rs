//! A hostile server: whatever answers on the socket sends malformed or
//! truncated replies, wrong descriptors (unsealed, write-sealed or short
//! memfds, pipes for eventfds), corrupt control blocks and ring headers, or
//! corrupts the rings after a good connect. The client must return a
//! `ConnectError` or `ChannelError` for each, never panic or hang (every
//! client call here runs under a timeout, see [`within`]).

mod common;

use std::io::{IoSlice, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use coroipc_ring::{init, Producer, Region as RingRegion, RingAttachError, RingConfig};
use coroipc_transport::bell::Bell;
use coroipc_transport::channel::{layout_for, ChannelError, ClientChannel, ConnectError};
use coroipc_transport::control::Control;
use coroipc_transport::eventfd::EventFd;
use coroipc_transport::handshake::{Accepted, HandshakeDecodeError, ServerReply, Span, HELLO_LEN, REPLY_LEN};
use coroipc_transport::segment::{Segment, SegmentOpenError};
use coroipc_transport::socket::{Endpoint, Listener, Stream};
use coroipc_transport::waiter::{SleepMode, WaitPolicy};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fs::{fcntl_add_seals, ftruncate, memfd_create, MemfdFlags, SealFlags};

const T: Duration = Duration::from_secs(10);
/// The client's handshake timeout in these tests.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Ring header field offsets (coroipc-ring's `header.rs`).
const RING_MAGIC_AT: u64 = 0;
const RING_CAPACITY_AT: u64 = 16;
const RING_MAX_RECORD_AT: u64 = 24;
const RING_TAIL_AT: u64 = 128;
const RING_DATA_AT: u64 = 768;
/// Control block: the server's state word.
const SERVER_STATE_AT: u64 = 128;

#[test]
#[ignore = "helper: runs as a child process of the other tests"]
fn child() {
    child_main(|role| match role {
        "squatter" => {
            squatter();
            true
        }
        _ => false,
    });
}

/// The uid a squatter drops to (`nobody`).
const SQUATTER_UID: u32 = 65534;

/// Role `squatter`: becomes [`SQUATTER_UID`] (this thread, which is the one
/// that listens: the kernel records its credentials), binds the endpoint
/// first, reports `@@READY uid=…` and holds it until stdin closes, never
/// accepting.
fn squatter() {
    rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(SQUATTER_UID)).expect("setuid");
    let _listener = Listener::bind(&env_endpoint()).expect("bind");
    report("READY", &format!("uid={}", rustix::process::geteuid().as_raw()));
    while read_stdin_line().is_some() {}
}

// ---------------------------------------------------------------------------
// The fake server
// ---------------------------------------------------------------------------

/// A fake server on a thread: accepts one connection, reads the hello
/// and hands the stream to `behave`.
struct FakeServer {
    endpoint: Endpoint,
    handle: Option<JoinHandle<()>>,
}

impl FakeServer {
    fn spawn(tag: &str, behave: impl FnOnce(Stream) + Send + 'static) -> Self {
        let endpoint = abstract_endpoint(tag);
        let listener = Listener::bind(&endpoint).expect("bind");
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + T;
            let stream = loop {
                if let Some(s) = listener.try_accept().expect("accept") {
                    break s;
                }
                assert!(Instant::now() < deadline, "nobody connected to the fake server");
                std::thread::sleep(Duration::from_millis(1));
            };
            stream.as_std().set_read_timeout(Some(T)).expect("timeout");
            let mut hello = [0u8; HELLO_LEN];
            stream.as_std().read_exact(&mut hello).expect("read the hello");
            behave(stream);
        });
        Self { endpoint, handle: Some(handle) }
    }

    /// Connects to it (under a timeout: a hang fails the test).
    fn connect(&self) -> Result<ClientChannel, ConnectError> {
        let ep = self.endpoint.clone();
        within(CONNECT_TIMEOUT + T, "client connect", move || {
            ClientChannel::connect(&ep, &hello(SERVICE_ECHO, SMALL), CONNECT_TIMEOUT)
        })
    }

    /// Joins the fake server thread (propagating its panic).
    fn join(mut self) {
        if let Some(h) = self.handle.take() {
            h.join().expect("fake server thread");
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A correct segment and bells for [`SMALL`] sizes, as a real server makes
/// them; tests break one thing at a time.
struct Setup {
    accepted: Accepted,
    segment: Arc<Segment>,
    bells: [EventFd; 3],
}

impl Setup {
    fn new() -> Self {
        let layout = layout_for(&SMALL);
        let accepted = Accepted { sizes: SMALL, layout };
        assert!(accepted.validate().is_ok());
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
        let bells = [EventFd::new().unwrap(), EventFd::new().unwrap(), EventFd::new().unwrap()];
        Self { accepted, segment, bells }
    }

    fn reply(&self) -> [u8; REPLY_LEN] {
        ServerReply::Accepted(self.accepted).encode()
    }

    fn fds(&self) -> [BorrowedFd<'_>; 4] {
        [self.segment.as_fd(), self.bells[0].as_fd(), self.bells[1].as_fd(), self.bells[2].as_fd()]
    }

    fn send(&self, stream: &Stream) {
        stream.send_with_fds(&self.reply(), &self.fds()).expect("send reply");
    }

    fn word(&self, at: u64) -> &std::sync::atomic::AtomicU64 {
        self.segment.atomic_u64(at as usize)
    }

    fn region(&self, which: &str) -> Span {
        let l = self.accepted.layout;
        match which {
            "request" => l.request,
            "response" => l.response,
            "dispatch" => l.dispatch,
            _ => unreachable!(),
        }
    }
}

/// Connects to a fake server doing `behave` and returns the client's error.
fn connect_error(tag: &str, behave: impl FnOnce(Stream) + Send + 'static) -> ConnectError {
    let server = FakeServer::spawn(tag, behave);
    let err = match server.connect() {
        Err(e) => e,
        Ok(_) => panic!("[{tag}] the client accepted a hostile setup"),
    };
    eprintln!("[{tag}] client: {err}");
    server.join();
    err
}

/// A fake server that sends a valid setup after `spoil` changed it, and
/// holds the connection open a little (so errors are the client's own).
fn spoiled(tag: &str, spoil: impl FnOnce(&Setup) + Send + 'static) -> ConnectError {
    connect_error(tag, move |stream| {
        let setup = Setup::new();
        spoil(&setup);
        setup.send(&stream);
        hold_until_closed(&stream);
    })
}

/// Keeps `stream` open until the client hangs up (or `T` passed).
fn hold_until_closed(stream: &Stream) {
    let mut buf = [0u8; 64];
    let _ = stream.as_std().read(&mut buf);
}

fn memfd(len: u64, seals: SealFlags) -> OwnedFd {
    let fd = memfd_create("coroipc", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).expect("memfd");
    ftruncate(&fd, len).expect("ftruncate");
    if !seals.is_empty() {
        fcntl_add_seals(&fd, seals).expect("seal");
    }
    fd
}

// ---------------------------------------------------------------------------
// (a) malformed replies
// ---------------------------------------------------------------------------

#[test]
fn garbage_reply_is_a_handshake_error() {
    let err = connect_error("garbage", |stream| {
        let garbage: Vec<u8> = (0..REPLY_LEN as u32).map(|i| (i.wrapping_mul(167) ^ 0x5a) as u8).collect();
        stream.send_with_fds(&garbage, &[]).unwrap();
        hold_until_closed(&stream);
    });
    assert!(matches!(err, ConnectError::Handshake(HandshakeDecodeError::BadMagic { .. })), "{err:?}");
}

#[test]
fn reply_with_valid_header_but_impossible_layout_is_a_handshake_error() {
    let err = connect_error("bad-layout", |stream| {
        let setup = Setup::new();
        let mut reply = setup.reply();
        // The response ring overlaps the request ring.
        reply[72..80].copy_from_slice(&setup.accepted.layout.request.offset.to_le_bytes());
        stream.send_with_fds(&reply, &setup.fds()).unwrap();
        hold_until_closed(&stream);
    });
    assert!(matches!(err, ConnectError::Handshake(_)), "{err:?}");
}

#[test]
fn unknown_refusal_code_is_a_handshake_error() {
    let err = connect_error("bad-status", |stream| {
        let mut reply = ServerReply::Refused(coroipc_transport::handshake::Refusal::Invalid).encode();
        reply[8..12].copy_from_slice(&77u32.to_le_bytes());
        stream.send_with_fds(&reply, &[]).unwrap();
    });
    assert!(
        matches!(err, ConnectError::Handshake(HandshakeDecodeError::UnknownStatus { found: 77 })),
        "{err:?}"
    );
}

#[test]
fn truncated_reply_then_close_is_an_io_error() {
    let err = connect_error("truncated-close", |stream| {
        let setup = Setup::new();
        stream.send_with_fds(&setup.reply()[..50], &setup.fds()).unwrap();
    });
    assert!(matches!(err, ConnectError::Io(_)), "{err:?}");
}

#[test]
fn truncated_reply_then_silence_times_out() {
    let start = Instant::now();
    let err = connect_error("truncated-stall", |stream| {
        let setup = Setup::new();
        stream.send_with_fds(&setup.reply()[..50], &setup.fds()).unwrap();
        hold_until_closed(&stream);
    });
    assert!(matches!(err, ConnectError::Timeout), "{err:?}");
    assert!(start.elapsed() < CONNECT_TIMEOUT * 4, "took {:?}", start.elapsed());
}

#[test]
fn silent_server_times_out() {
    let err = connect_error("silent", |stream| hold_until_closed(&stream));
    assert!(matches!(err, ConnectError::Timeout), "{err:?}");
}

#[test]
fn server_closing_without_a_reply_is_an_io_error() {
    let err = connect_error("close", drop);
    assert!(matches!(err, ConnectError::Io(_)), "{err:?}");
}

#[test]
fn accepted_reply_with_missing_or_extra_descriptors_is_refused() {
    for n in [0usize, 1, 3, 5, 8] {
        let err = connect_error(&format!("fds-{n}"), move |stream| {
            let setup = Setup::new();
            let extra = EventFd::new().unwrap();
            let mut fds: Vec<BorrowedFd<'_>> = setup.fds().to_vec();
            while fds.len() < n {
                fds.push(extra.as_fd());
            }
            fds.truncate(n);
            stream.send_with_fds(&setup.reply(), &fds).unwrap();
            hold_until_closed(&stream);
        });
        assert!(matches!(err, ConnectError::Descriptors(_)), "{n} fds: {err:?}");
    }
}

// ---------------------------------------------------------------------------
// (b), (c), (d) wrong descriptors
// ---------------------------------------------------------------------------

/// Sends the valid reply with `segment` in place of the memfd.
fn with_segment_fd(tag: &str, make: impl FnOnce(u64) -> OwnedFd + Send + 'static) -> ConnectError {
    connect_error(tag, move |stream| {
        let setup = Setup::new();
        let fd = make(setup.accepted.layout.segment_len);
        let mut fds = setup.fds();
        fds[0] = fd.as_fd();
        stream.send_with_fds(&setup.reply(), &fds).unwrap();
        hold_until_closed(&stream);
    })
}

#[test]
fn unsealed_memfd_is_refused() {
    let err = with_segment_fd("unsealed", |len| memfd(len, SealFlags::empty()));
    assert!(matches!(err, ConnectError::Segment(SegmentOpenError::MissingSeals { .. })), "{err:?}");
}

#[test]
fn memfd_that_can_still_shrink_is_refused() {
    let err = with_segment_fd("grow-only", |len| memfd(len, SealFlags::GROW | SealFlags::SEAL));
    assert!(matches!(err, ConnectError::Segment(SegmentOpenError::MissingSeals { .. })), "{err:?}");
}

#[test]
fn write_sealed_memfd_is_refused() {
    let err = with_segment_fd("write-sealed", |len| {
        memfd(len, SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL)
    });
    assert!(matches!(err, ConnectError::Segment(SegmentOpenError::Io(_))), "{err:?}");
}

#[test]
fn short_memfd_is_refused() {
    let err = with_segment_fd("short", |len| {
        memfd(len - 4096, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
    });
    assert!(matches!(err, ConnectError::Segment(SegmentOpenError::WrongSize { .. })), "{err:?}");
}

#[test]
fn pipe_or_socket_as_segment_is_refused() {
    let err = with_segment_fd("pipe-segment", |_| rustix::pipe::pipe().unwrap().0);
    assert!(matches!(err, ConnectError::Segment(SegmentOpenError::NotRegularFile)), "{err:?}");
    let err = with_segment_fd("socket-segment", |_| OwnedFd::from(Stream::pair().unwrap().0.into_std()));
    assert!(matches!(err, ConnectError::Segment(SegmentOpenError::NotRegularFile)), "{err:?}");
}

/// The huge page size hugetlbfs memfds use here (`MFD_HUGETLB` without a
/// size flag takes the default, 2 MiB on x86-64).
const HUGE_PAGE: u64 = 2 << 20;

/// A sealed `MFD_HUGETLB` memfd of one huge page, or `None` where the
/// kernel has no hugetlbfs.
fn hugetlb_memfd() -> Option<OwnedFd> {
    let fd = memfd_create("coroipc", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING | MemfdFlags::HUGETLB)
        .ok()?;
    ftruncate(&fd, HUGE_PAGE).ok()?;
    fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL).ok()?;
    Some(fd)
}

/// A hugetlbfs memfd passes every seal and size check, but its pages come
/// from the huge page pool: a hostile server that punches a hole in it and
/// drains the pool makes the client's next touch a SIGBUS. The client
/// accepts only ordinary shmem memfds and refuses it before mapping it.
/// (Whether the pool has pages does not matter for the verdict: the refusal
/// comes from `fstatfs` before `mmap`.)
#[test]
fn hugetlbfs_memfd_is_refused_before_it_is_mapped() {
    let Some(probe) = hugetlb_memfd() else {
        eprintln!("no hugetlbfs memfds on this kernel: covered by the non-shmem check below only");
        return;
    };
    drop(probe);
    let err = connect_error("hugetlb-segment", move |stream| {
        let mut setup = Setup::new();
        // The same layout in a segment of one huge page (hugetlbfs sizes
        // are whole huge pages).
        setup.accepted.layout.segment_len = HUGE_PAGE;
        let fd = hugetlb_memfd().expect("made above");
        let mut fds = setup.fds();
        fds[0] = fd.as_fd();
        stream.send_with_fds(&ServerReply::Accepted(setup.accepted).encode(), &fds).unwrap();
        hold_until_closed(&stream);
    });
    assert!(matches!(err, ConnectError::Segment(SegmentOpenError::NotShmem { .. })), "{err:?}");
}

/// Over the segment API: a hugetlbfs memfd is refused with its filesystem
/// type, an ordinary sealed memfd passes. (A file on disk is refused
/// earlier: it cannot be sealed, `unsealed_memfd_is_refused`'s class.)
#[test]
fn segment_from_fd_accepts_only_shmem() {
    if let Some(fd) = hugetlb_memfd() {
        let err = Segment::from_fd(fd, HUGE_PAGE).expect_err("hugetlbfs");
        assert!(matches!(err, SegmentOpenError::NotShmem { fs_type: 0x9584_58f6 }), "{err:?}");
    }
    let ok = Segment::from_fd(memfd(4096, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL), 4096);
    assert!(ok.is_ok(), "an ordinary sealed memfd: {ok:?}");
}

#[test]
fn pipe_instead_of_an_eventfd_is_refused() {
    for slot in 1..4 {
        let err = connect_error(&format!("pipe-bell-{slot}"), move |stream| {
            let setup = Setup::new();
            let (r, _w) = rustix::pipe::pipe().unwrap();
            let mut fds = setup.fds();
            fds[slot] = r.as_fd();
            stream.send_with_fds(&setup.reply(), &fds).unwrap();
            hold_until_closed(&stream);
        });
        assert!(matches!(err, ConnectError::Descriptors(_)), "bell {slot}: {err:?}");
    }
}

// ---------------------------------------------------------------------------
// (e) corrupt control block and ring headers at connect
// ---------------------------------------------------------------------------

#[test]
fn bad_control_block_is_refused() {
    let err = spoiled("control-magic", |s| s.word(0).store(0x1234, Ordering::Relaxed));
    assert!(matches!(err, ConnectError::Control), "{err:?}");
}

#[test]
fn ring_header_with_bad_magic_is_refused() {
    for ring in ["request", "response", "dispatch"] {
        let err = spoiled(&format!("magic-{ring}"), move |s| {
            s.word(s.region(ring).offset + RING_MAGIC_AT)
                .store(u64::from_le_bytes(*b"NOTARING"), Ordering::Relaxed)
        });
        assert!(matches!(err, ConnectError::Ring(RingAttachError::BadMagic(_))), "{ring}: {err:?}");
    }
}

#[test]
fn ring_header_with_bad_capacity_is_refused() {
    for (capacity, why) in [(0u64, "zero"), (3000, "not a power of two"), (1 << 20, "beyond the region")] {
        let err = spoiled(&format!("capacity-{capacity}"), move |s| {
            s.word(s.region("response").offset + RING_CAPACITY_AT).store(capacity, Ordering::Relaxed)
        });
        assert!(
            matches!(
                err,
                ConnectError::Ring(RingAttachError::BadCapacity(_) | RingAttachError::RegionTooSmall { .. })
            ),
            "capacity {why}: {err:?}"
        );
    }
}

#[test]
fn ring_whose_records_are_smaller_than_the_negotiated_maximum_is_refused() {
    let err = spoiled("max-record", |s| {
        s.word(s.region("dispatch").offset + RING_MAX_RECORD_AT).store(64, Ordering::Relaxed)
    });
    assert!(matches!(err, ConnectError::Ring(RingAttachError::BadMaxRecord(_))), "{err:?}");
}

#[test]
fn ring_with_impossible_positions_at_connect_is_refused() {
    let err = spoiled("positions", |s| {
        s.word(s.region("response").offset + RING_TAIL_AT).store(12_345, Ordering::Relaxed)
    });
    assert!(matches!(err, ConnectError::Ring(RingAttachError::BadPositions { .. })), "{err:?}");
}

// ---------------------------------------------------------------------------
// (e) rings corrupted after a good connect
// ---------------------------------------------------------------------------

/// A fake server that completes a correct handshake, waits for the test's
/// go, then runs `attack` on its setup (it holds the connection until the
/// client hangs up).
fn connected_then(
    tag: &str,
    attack: impl FnOnce(&Setup) + Send + 'static,
) -> (FakeServer, ClientChannel, mpsc::Sender<()>) {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let server = FakeServer::spawn(tag, move |stream| {
        let setup = Setup::new();
        setup.send(&stream);
        if go_rx.recv().is_ok() {
            attack(&setup);
        }
        hold_until_closed(&stream);
    });
    let client = server.connect().unwrap_or_else(|e| panic!("[{tag}] good handshake failed: {e}"));
    (server, client, go_tx)
}

/// Publishes one record on `ring` the proper way, with a bogus header
/// written over it, and rings the client's bell.
fn publish_raw(s: &Setup, ring: &str, bell: usize, header: u64) {
    let region: Arc<dyn RingRegion> = s.segment.clone();
    let r = s.region(ring);
    let mut producer = Producer::attach(region, r.offset as usize, r.len as usize).expect("attach");
    let _ = producer.try_push(b"first a good record").expect("push");
    // The record just published starts at the data area (a fresh ring).
    s.word(r.offset + RING_DATA_AT).store(header, Ordering::Release);
    let ring_bell =
        Bell::from_eventfd(EventFd::from_fd(s.bells[bell].as_fd().try_clone_to_owned().unwrap()).unwrap());
    producer.data_wait().notify(&ring_bell);
}

/// `DATA` record header word with payload length `len`.
fn data_header(len: u32) -> u64 {
    u64::from(u32::from_le_bytes(*b"DATA")) << 32 | u64::from(len)
}

fn response_corruption_is_corrupt(mode: SleepMode) {
    for (what, header) in
        [("oversized record", data_header(1 << 30)), ("unknown kind", 0xdead_beef_0000_0010)]
    {
        let tag = format!("response-{what}-{mode:?}");
        let (server, mut client, go) = connected_then(&tag, move |s| publish_raw(s, "response", 1, header));
        client.set_wait_policy(WaitPolicy::sleep_only(mode));
        let r = within(T, "wait + peek", move || {
            let blocked = std::thread::spawn(move || {
                let waited = client.requests().wait_response(Some(Instant::now() + T));
                let peeked = client.requests().peek_response().map(|m| m.map(<[u8]>::to_vec));
                client.requests().release_response();
                (waited, peeked)
            });
            std::thread::sleep(Duration::from_millis(30));
            go.send(()).unwrap();
            blocked.join().expect("client thread")
        });
        eprintln!("[{tag}] client: {r:?}");
        assert_eq!(r.0, Ok(()), "[{tag}] the waiter wakes");
        assert!(matches!(r.1, Err(ChannelError::Corrupt(_))), "[{tag}] {:?}", r.1);
        server.join();
    }
}

#[test]
fn response_ring_corrupted_after_connect_is_corrupt_for_a_futex_sleeper() {
    response_corruption_is_corrupt(SleepMode::Futex);
}

#[test]
fn response_ring_corrupted_after_connect_is_corrupt_for_a_poll_sleeper() {
    response_corruption_is_corrupt(SleepMode::Poll);
}

#[test]
fn response_tail_beyond_capacity_is_corrupt() {
    let (server, mut client, go) = connected_then("response-tail", |s| {
        s.word(s.region("response").offset + RING_TAIL_AT).store(1 << 40, Ordering::Release)
    });
    go.send(()).unwrap();
    let r = within(T, "peek", move || {
        let deadline = Instant::now() + T;
        loop {
            match client.requests().peek_response() {
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                other => return other.map(|m| m.map(<[u8]>::to_vec)),
            }
        }
    });
    assert!(matches!(r, Err(ChannelError::Corrupt(_))), "{r:?}");
    server.join();
}

#[test]
fn dispatch_ring_corrupted_after_connect_is_corrupt() {
    let (server, mut client, go) =
        connected_then("dispatch-record", |s| publish_raw(s, "dispatch", 2, data_header(u32::MAX)));
    assert_eq!(
        client.dispatch().peek_dispatch().map(|m| m.is_none()),
        Ok(true),
        "nothing yet; the fd is armed"
    );
    go.send(()).unwrap();
    let r = within(T, "wait + peek dispatch", move || {
        let waited = client.dispatch().wait_dispatch(Some(Instant::now() + T));
        (waited, client.dispatch().peek_dispatch().map(|m| m.map(<[u8]>::to_vec)))
    });
    assert!(matches!(r.1, Err(ChannelError::Corrupt(_))), "{r:?}");
    server.join();
}

#[test]
fn garbage_server_state_reads_as_closed() {
    let (server, mut client, go) = connected_then("server-state", |s| {
        let at = s.accepted.layout.control.offset + SERVER_STATE_AT;
        s.word(at).store(0x0bad_0bad_0bad_0bad, Ordering::Release);
    });
    go.send(()).unwrap();
    let r = within(T, "wait", move || client.requests().wait_response(Some(Instant::now() + T)));
    assert_eq!(r, Err(ChannelError::Disconnected(coroipc_transport::control::DisconnectReason::Unknown)));
    server.join();
}

/// The server scribbles over the whole segment while the client runs every
/// data-path call in a loop: each call returns (an error is fine), none
/// panics or hangs.
#[test]
fn client_survives_a_server_scribbling_over_the_whole_segment() {
    let (server, mut client, go) = connected_then("scribble", |s| {
        let mut rng = coroipc_testkit::XorShift::new(0x9e37_79b9_7f4a_7c15);
        let words = s.segment.len() as u64 / 8;
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            for _ in 0..64 {
                let v = rng.next_u64();
                s.word((v % words) * 8).store(if v & 1 == 0 { v } else { v & 0xffff }, Ordering::Relaxed);
            }
            for b in &s.bells {
                b.signal();
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    });
    client.set_wait_policy(WaitPolicy::sleep_only(SleepMode::Futex));
    go.send(()).unwrap();
    let outcomes = within(T, "client data path under garbage", move || {
        let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
        let mut note = |what: &str, r: Result<(), ChannelError>| {
            let key = match r {
                Ok(()) => format!("{what}: ok"),
                Err(ChannelError::Corrupt(_)) => format!("{what}: Corrupt"),
                Err(e) => format!("{what}: {e:?}").split(" {").next().unwrap().to_string(),
            };
            *outcomes.entry(key).or_default() += 1;
        };
        let until = Instant::now() + Duration::from_millis(600);
        let req = message(CMD_ECHO, 1, b"hello");
        while Instant::now() < until {
            let soon = Some(Instant::now() + Duration::from_millis(5));
            note("try_send", client.requests().try_send(&[IoSlice::new(&req)]));
            note("send", client.requests().send(&[IoSlice::new(&req)], soon));
            note("wait_response", client.requests().wait_response(soon));
            note("peek_response", client.requests().peek_response().map(|_| ()));
            client.requests().release_response();
            note("peek_dispatch", client.dispatch().peek_dispatch().map(|_| ()));
            client.dispatch().release_dispatch();
            note("wait_dispatch", client.dispatch().wait_dispatch(soon));
            let _ = (
                client.status().peer_alive(),
                client.status().request_paused(),
                client.status().dispatch_flow(),
            );
        }
        outcomes
    });
    eprintln!("client outcomes under a scribbling server: {outcomes:?}");
    server.join();
}

/// The server clears `O_NONBLOCK` on the eventfds it shares with the client
/// (the flag belongs to the shared file description), saturates the
/// request bell's counter and announces a poll-waiter on every wait point:
/// the client's signals (a write to a saturated counter) and drains (a read
/// of an empty one) must still return at once.
#[test]
fn server_making_shared_eventfds_blocking_cannot_hang_the_client() {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
    let (server, mut client, go) = connected_then("blocking-bells", |s| {
        for bell in &s.bells {
            let flags = fcntl_getfl(bell).unwrap();
            fcntl_setfl(bell, flags - OFlags::NONBLOCK).unwrap();
        }
        rustix::io::write(&s.bells[0], &(u64::MAX - 1).to_ne_bytes()).unwrap();
        for ring in ["request", "response", "dispatch"] {
            for words in [384u64, 512] {
                s.segment
                    .atomic_u32((s.region(ring).offset + words) as usize)
                    .store(coroipc_ring::POLL_WAITER, Ordering::Release);
            }
        }
    });
    go.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    within(T, "client calls on blocking eventfds", move || {
        let req = message(CMD_ECHO, 1, b"x");
        for _ in 0..10 {
            let _ = client.requests().try_send(&[IoSlice::new(&req)]);
            let _ = client.dispatch().peek_dispatch();
            let _ = client.dispatch().peek_dispatch();
            client.set_wait_policy(WaitPolicy::sleep_only(SleepMode::Poll));
            let _ = client.requests().wait_response(Some(Instant::now() + Duration::from_millis(5)));
            let _ = client.dispatch().wait_dispatch(Some(Instant::now() + Duration::from_millis(5)));
        }
        client.close();
    });
    server.join();
}

// ---------------------------------------------------------------------------
// A server that never accepts: connect honours its deadline
// ---------------------------------------------------------------------------

/// A listener that never accepts, with its accept backlog filled by
/// connections that never say hello; returns it with the queued sockets.
fn full_backlog(tag: &str) -> (Endpoint, Listener, Vec<OwnedFd>) {
    use rustix::net::{connect, socket_with, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let endpoint = abstract_endpoint(tag);
    let listener = Listener::bind(&endpoint).expect("bind");
    let Endpoint::Abstract(name) = &endpoint else { unreachable!() };
    let addr = SocketAddrUnix::new_abstract_name(name).expect("address");
    let mut queued = Vec::new();
    loop {
        let s = socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .expect("socket");
        match connect(&s, &addr) {
            Ok(()) => queued.push(s),
            Err(rustix::io::Errno::AGAIN) => break,
            Err(e) => panic!("unexpected connect error {e}"),
        }
        assert!(queued.len() < 100_000, "the backlog never filled");
    }
    (endpoint, listener, queued)
}

#[test]
fn blocking_connect_to_a_full_backlog_times_out_at_its_deadline() {
    let (endpoint, _listener, _queued) = full_backlog("backlog-blocking");
    let start = Instant::now();
    let err = within(T, "connect to a full backlog", move || {
        ClientChannel::connect(&endpoint, &hello(SERVICE_ECHO, SMALL), Duration::from_secs(1))
    })
    .expect_err("nobody accepts");
    let took = start.elapsed();
    assert!(matches!(err, ConnectError::Timeout), "{err:?}");
    assert!(took < Duration::from_secs(5), "a 1 s connect took {took:?}");
}

#[test]
fn nonblocking_connect_to_a_full_backlog_returns_at_once_then_connects_when_room_appears() {
    use coroipc_transport::channel::PendingConnect;
    use coroipc_transport::handshake::Refusal;
    let (endpoint, listener, queued) = full_backlog("backlog-nonblocking");
    let ep = endpoint.clone();
    // Must return without waiting for the backlog (a hang fails here).
    let mut pending = within(T, "connect_nonblocking to a full backlog", move || {
        PendingConnect::connect(&ep, &hello(SERVICE_ECHO, SMALL), T)
    })
    .expect("a full backlog is not an error for a nonblocking connect");
    assert!(!pending.poll().expect("still connecting"), "nobody accepted yet");
    // Room appears: the server accepts the queued ones and answers the
    // next hello with a refusal, which proves the pending client connected,
    // sent its hello and read the reply.
    let server = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        let deadline = Instant::now() + T;
        let mut accepted = 0;
        loop {
            match listener.try_accept().expect("accept") {
                Some(stream) if accepted < queued.len() => {
                    drop(stream);
                    accepted += 1;
                }
                Some(stream) => {
                    stream.as_std().set_read_timeout(Some(T)).unwrap();
                    let mut hello = [0u8; HELLO_LEN];
                    stream.as_std().read_exact(&mut hello).expect("the pending client's hello");
                    stream.send_with_fds(&ServerReply::Refused(Refusal::AccessDenied).encode(), &[]).unwrap();
                    hold_until_closed(&stream);
                    return;
                }
                None => {
                    assert!(Instant::now() < deadline, "the pending client never arrived");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    });
    let result = within(T + T, "pending connect", move || {
        let deadline = Instant::now() + T;
        loop {
            match pending.poll() {
                Ok(true) => return pending.finish().map(|_| ()),
                Ok(false) => {}
                Err(e) => return Err(e),
            }
            assert!(Instant::now() < deadline, "the pending connect never completed");
            let fd = pending.fd();
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            let ts = Timespec { tv_sec: 1, tv_nsec: 0 };
            let _ = poll(&mut fds, Some(&ts));
        }
    });
    assert!(matches!(result, Err(ConnectError::Refused(Refusal::AccessDenied))), "{result:?}");
    server.join().expect("server thread");
}

#[test]
fn nonblocking_connect_to_a_full_backlog_times_out_at_its_deadline() {
    use coroipc_transport::channel::PendingConnect;
    let (endpoint, _listener, _queued) = full_backlog("backlog-nonblocking-timeout");
    let start = Instant::now();
    let err = within(T, "nonblocking connect to a full backlog", move || {
        let mut pending =
            PendingConnect::connect(&endpoint, &hello(SERVICE_ECHO, SMALL), Duration::from_secs(1))?;
        loop {
            if pending.poll()? {
                return pending.finish().map(|_| ());
            }
            let fd = pending.fd();
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            let ts = Timespec { tv_sec: 1, tv_nsec: 0 };
            let _ = poll(&mut fds, Some(&ts));
        }
    })
    .expect_err("nobody accepts");
    let took = start.elapsed();
    assert!(matches!(err, ConnectError::Timeout), "{err:?}");
    assert!(took < Duration::from_secs(5), "a 1 s connect took {took:?}");
}

// ---------------------------------------------------------------------------
// Endpoint squatting
// ---------------------------------------------------------------------------

#[test]
fn a_client_requiring_the_server_uid_refuses_a_squatter_before_saying_hello() {
    use coroipc_transport::channel::ConnectOptions;
    if !rustix::process::geteuid().is_root() {
        eprintln!("needs root to run a squatter as another user: skipped");
        return;
    }
    let ep = abstract_endpoint("squatter");
    let mut squatter = spawn_child("squatter", &[(EP, ep.to_string())]);
    let ready = squatter.expect("READY", T);
    assert_eq!(num(&ready, "uid"), u64::from(SQUATTER_UID));
    let options = ConnectOptions::new(Duration::from_secs(2)).require_server_uid(0);
    let err = within(T, "connect to a squatter", move || {
        ClientChannel::connect_with(&ep, &hello(SERVICE_ECHO, SMALL), &options).map(|_| ())
    })
    .expect_err("a squatter is not the server");
    assert!(matches!(err, ConnectError::WrongServer { expected: 0, actual: SQUATTER_UID }), "{err:?}");
}

#[test]
fn a_client_requiring_the_server_uid_connects_to_the_right_server() {
    use coroipc_transport::channel::ConnectOptions;
    let ep = abstract_endpoint("right-uid");
    let mut server = spawn_child("server", &[(EP, ep.to_string())]);
    server.expect("READY", T);
    let me = rustix::process::geteuid().as_raw();
    let options = ConnectOptions::new(T).require_server_uid(me);
    let mut client = within(T + T, "connect", move || {
        ClientChannel::connect_with(&ep, &hello(SERVICE_ECHO, SMALL), &options)
    })
    .expect("the server runs as our uid");
    echo_round_trip(&mut client, 1, T);
}
