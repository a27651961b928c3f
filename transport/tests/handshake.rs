//! The connection handshake across real processes: path and abstract
//! endpoints, kernel-given credentials on both sides, every refusal the
//! client can get (and that a refusal creates nothing on the server), and
//! that slow or dying clients never stall the server's other connects.

mod common;

use std::time::{Duration, Instant};

use common::*;
use coroipc_transport::channel::{ClientChannel, ConnectError};
use coroipc_transport::handshake::{Refusal, RingSizes};
use coroipc_transport::socket::Stream;

const T: Duration = Duration::from_secs(10);

#[test]
#[ignore = "helper: runs as a child process of the other tests"]
fn child() {
    child_main(|_| false);
}

fn sizes_text(s: RingSizes) -> String {
    format!(
        "{},{},{},{}",
        s.request_ring_bytes, s.response_ring_bytes, s.dispatch_ring_bytes, s.max_message_bytes
    )
}

#[test]
fn handshake_over_path_endpoint_between_processes_agrees_on_sizes_and_credentials() {
    let tmp = TempEndpoint::new("hs-path");
    let mut server = spawn_child("server", &[(EP, tmp.endpoint.to_string())]);
    server.expect("READY", T);

    let asked = RingSizes {
        request_ring_bytes: 8192,
        response_ring_bytes: 16384,
        dispatch_ring_bytes: 32768,
        max_message_bytes: 2048,
    };
    let mut client = ClientChannel::connect(&tmp.endpoint, &hello(SERVICE_ECHO, asked), T).expect("connect");
    let accepted = server.expect("ACCEPTED", T);

    assert_eq!(field(&accepted, "sizes"), sizes_text(client.sizes()), "both sides negotiated the same sizes");
    assert_eq!(client.sizes(), asked, "sizes within the limits are granted as asked");
    assert_eq!(num(&accepted, "pid"), u64::from(std::process::id()), "the server sees the client's pid");
    assert_eq!(num(&accepted, "uid"), u64::from(rustix::process::geteuid().as_raw()));
    let cred = client.server_credentials();
    assert_eq!(cred.pid, Some(server.pid()), "the client sees the server's pid");
    assert_eq!(cred.uid, rustix::process::getuid().as_raw(), "the client sees the server's uid");
    assert_eq!(cred.gid, rustix::process::getgid().as_raw());

    for seq in 0..100 {
        echo_round_trip(&mut client, seq, T);
    }
}

#[test]
fn handshake_over_abstract_endpoint_between_processes_agrees_on_sizes_and_credentials() {
    let ep = abstract_endpoint("hs-abstract");
    assert!(ep.to_string().starts_with('@'));
    let server = ServerThread::spawn(ep.clone(), ServerConfig::default());
    let mut client = spawn_child("client", &[(EP, ep.to_string())]);
    let ready = client.expect("READY", T);
    let ev = server.expect_event(T, |e| matches!(e, Event::Accepted { .. }));
    let Event::Accepted { pid, uid, sizes, .. } = ev else { unreachable!() };

    assert_eq!(pid, Some(client.pid()), "the server sees the client's pid (SO_PEERCRED)");
    assert_eq!(uid, rustix::process::geteuid().as_raw());
    assert_eq!(field(&ready, "sizes"), sizes_text(sizes), "both sides negotiated the same sizes");
    assert_eq!(sizes, SMALL);
    assert_eq!(num(&ready, "server_pid"), u64::from(std::process::id()), "the client sees the server's pid");
    assert_eq!(num(&ready, "server_uid"), u64::from(rustix::process::getuid().as_raw()));
}

/// Connects and expects a refusal.
fn refused(ep: &coroipc_transport::socket::Endpoint, service: u16, sizes: RingSizes) -> Refusal {
    match ClientChannel::connect(ep, &hello(service, sizes), T) {
        Err(ConnectError::Refused(r)) => r,
        Err(e) => panic!("expected a refusal, got {e:?}"),
        Ok(_) => panic!("expected a refusal, got a connection"),
    }
}

#[test]
fn every_refusal_reaches_the_client_and_the_server_creates_nothing_for_it() {
    let ep = abstract_endpoint("refusals");
    let mut server = spawn_child("server", &[(EP, ep.to_string()), (MAX_CONN, "1".into())]);
    server.expect("READY", T);

    // One live connection: the limit is reached.
    let mut first = ClientChannel::connect(&ep, &hello(SERVICE_ECHO, SMALL), T).expect("first connect");
    let live = server.expect("ACCEPTED", T);
    let (fds, memfd) = (num(&live, "fds"), num(&live, "memfd"));
    assert!(memfd > 0, "an accepted connection maps its segment");

    let too_big = RingSizes { max_message_bytes: 2 << 20, ..RingSizes::default() };
    let cases = [
        (99, SMALL, Refusal::NoSuchService),
        (SERVICE_PRIVILEGED, SMALL, Refusal::AccessDenied),
        (SERVICE_ECHO, too_big, Refusal::TooBig),
        (SERVICE_ECHO, SMALL, Refusal::ConnectionLimit),
    ];
    for (service, sizes, expected) in cases {
        assert_eq!(refused(&ep, service, sizes), expected, "service {service}");
        let line = server.expect("REFUSED", T);
        assert_eq!(field(&line, "refusal"), format!("{expected:?}"));
        assert_eq!(num(&line, "fds"), fds, "{expected:?}: the server holds no new descriptor");
        assert_eq!(num(&line, "memfd"), memfd, "{expected:?}: the server mapped no new segment");
    }

    // The first connection is unaffected; once it goes, the limit frees up.
    echo_round_trip(&mut first, 1, T);
    drop(first);
    let closed = server.expect("CLOSED", T);
    assert_eq!(field(&closed, "reason"), "PeerGone");
    let mut again = ClientChannel::connect(&ep, &hello(SERVICE_ECHO, SMALL), T).expect("connect after close");
    echo_round_trip(&mut again, 2, T);
}

#[test]
fn slow_loris_clients_do_not_stall_other_connects() {
    let ep = abstract_endpoint("loris");
    let mut server = spawn_child("server", &[(EP, ep.to_string())]);
    server.expect("READY", T);

    // Fifty connections in this process that send part of a hello (or
    // nothing) and stall.
    let bytes = hello(SERVICE_ECHO, SMALL).encode();
    let stalled: Vec<Stream> = (0..50)
        .map(|i| {
            let s = Stream::connect(&ep).expect("connect");
            let n = i % bytes.len();
            if n > 0 {
                s.send_with_fds(&bytes[..n], &[]).expect("half a hello");
            }
            s
        })
        .collect();

    // Client processes killed after connecting: before any byte of the
    // hello, and halfway through it.
    let mut killed = Vec::new();
    for sent in [0, 1, 16, 31] {
        let mut c = spawn_child("half-hello", &[(EP, ep.to_string()), (HELLO_BYTES, sent.to_string())]);
        c.expect("BLOCKED", T);
        c.kill();
        c.wait_exit(T);
        killed.push(c);
    }

    // A well-behaved client connects and round-trips promptly meanwhile.
    let start = Instant::now();
    let mut good =
        ClientChannel::connect(&ep, &hello(SERVICE_ECHO, SMALL), T).expect("connect past the stallers");
    for seq in 0..10 {
        echo_round_trip(&mut good, seq, T);
    }
    let took = start.elapsed();
    eprintln!("connect + 10 round trips past 50 stalled and 4 killed handshakes: {took:?}");
    assert!(took < Duration::from_secs(2), "the server was stalled: {took:?}");

    // The server noticed each killed handshake and dropped it.
    for _ in 0..killed.len() {
        let line = server.expect("HSFAIL", T);
        assert!(field(&line, "why").contains("closed"), "{line}");
    }
    // The stalled ones are still pending, not refused, and go when closed.
    drop(stalled);
    for _ in 0..50 {
        server.expect("HSFAIL", T);
    }
    echo_round_trip(&mut good, 99, T);
}

/// A client attaches descriptors (`SCM_RIGHTS`) to its hello, and after the
/// handshake to a byte on the socket. Where the kernel can refuse them
/// (`SO_PASSRIGHTS`, Linux 6.16) the client's send fails with `EPERM` and
/// it sends the bytes alone; elsewhere the server receives them and closes
/// them on its closer thread. Either way the server ends up holding exactly
/// what it held before.
#[test]
fn descriptors_smuggled_on_the_socket_do_not_leak_into_the_server() {
    use coroipc_transport::eventfd::EventFd;
    use coroipc_transport::handshake::{ServerReply, REPLY_LEN};
    use std::os::fd::{AsFd, BorrowedFd};

    let ep = abstract_endpoint("smuggle");
    let mut server = spawn_child("server", &[(EP, ep.to_string())]);
    let ready = server.expect("READY", T);
    let (fds, memfd) = (num(&ready, "fds"), num(&ready, "memfd"));
    let junk: Vec<EventFd> = (0..100).map(|_| EventFd::new().unwrap()).collect();
    let junk_fds: Vec<BorrowedFd<'_>> = junk.iter().map(|e| e.as_fd()).collect();

    // Refused hello with 100 descriptors attached.
    // Sends `bytes` with the junk attached, or alone if the kernel refuses.
    let smuggle = |s: &Stream, bytes: &[u8]| match s.send_with_fds(bytes, &junk_fds) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => s.send_with_fds(bytes, &[]).unwrap(),
        Err(e) => panic!("send: {e}"),
    };
    let s = Stream::connect(&ep).unwrap();
    smuggle(&s, &hello(99, SMALL).encode());
    let line = server.expect("REFUSED", T);
    assert_eq!((num(&line, "fds"), num(&line, "memfd")), (fds, memfd), "nothing kept after a refusal");
    drop(s);

    // Accepted hello with 100 descriptors attached: the server holds the
    // connection's own five (socket, memfd, three eventfds) and no more.
    let s = Stream::connect(&ep).unwrap();
    smuggle(&s, &hello(SERVICE_ECHO, SMALL).encode());
    let line = server.expect("ACCEPTED", T);
    assert_eq!(num(&line, "fds"), fds + 5, "the connection's descriptors only");
    let mut reply = [0u8; REPLY_LEN];
    let got = s.recv_exact_with_fds(&mut reply, 4).unwrap();
    assert!(matches!(ServerReply::decode(&reply), Ok(ServerReply::Accepted(_))));
    drop(got);

    // Descriptors sent on the socket after the handshake: the server takes
    // anything arriving there as a dead peer and drops the connection.
    smuggle(&s, b"!");
    let line = server.expect("CLOSED", T);
    assert_eq!(field(&line, "reason"), "PeerGone");
    assert_eq!((num(&line, "fds"), num(&line, "memfd")), (fds, memfd), "back to the start");
}
