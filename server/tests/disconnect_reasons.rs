//! The client learns why it was disconnected, one reason per test, with a
//! real server process: server shutdown, service shutdown, disconnected by
//! the service, server died (SIGKILL), protocol violation and corrupt
//! memory (hand-made clients that break the rules; they read the reason
//! word the server wrote). "Too slow" is in `outbound.rs` and
//! `counter_example.rs`.

use std::time::Duration;

use coroipc_client::{Client, DisconnectReason, Error};
use coroipc_testkit::suite::api::*;
use coroipc_testkit::suite::rel;
use coroipc_transport::control::Control;
use coroipc_transport::message::MessageHeader;
use coroipc_transport::waiter::socket_hung_up;

coroipc_testkit::api_children!();
coroipc_testkit::rel_children!(client_mode);

/// The reliability suite's client modes (none needed here).
fn client_mode(_name: &str) -> Option<rel::ClientMode> {
    None
}

const T: Duration = Duration::from_secs(10);

/// What a call, a dispatch receive and a later call say.
fn reasons(client: &Client) -> [Option<DisconnectReason>; 3] {
    // The control commands return before the server's loop acted.
    assert!(eventually(T, || !client.is_connected()), "the connection closes");
    let mut buf = [0u8; 64];
    let call = client.call(CMD_ECHO, b"x", &mut buf).err();
    let recv = loop {
        // Messages sent before the close are still delivered first.
        match client.recv_dispatch(&mut buf, Some(T)) {
            Ok(_) => continue,
            Err(e) => break Some(e),
        }
    };
    let again = client.call(CMD_ECHO, b"x", &mut buf).err();
    [call, recv, again].map(|e| e.and_then(|e| e.disconnect_reason()))
}

#[test]
fn a_server_shutdown_says_server_shutdown() {
    let mut server = start_server("why-shutdown", &[]);
    let (client, _) = connect_echo(&server.ep);
    server.proc.command("shutdown", "OK");
    assert_eq!(reasons(&client), [Some(DisconnectReason::ServerShutdown); 3]);
}

#[test]
fn a_service_shutdown_says_service_shutdown() {
    let mut server = start_server("why-service", &[]);
    let client = Client::connect(&server.ep, SVC_COUNTER).expect("connect");
    let (other, _) = connect_echo(&server.ep);
    server.proc.command(&format!("shutdown_service {SVC_COUNTER}"), "OK");
    let mut buf = [0u8; 64];
    let r = client.recv_dispatch(&mut buf, Some(T));
    assert!(matches!(r, Err(Error::Disconnected(DisconnectReason::ServiceShutdown))), "{r:?}");
    echo(&other, b"other services are served on");
}

#[test]
fn a_disconnect_by_the_service_says_by_server() {
    let mut server = start_server("why-kick", &[]);
    let (client, id) = connect_echo(&server.ep);
    server.proc.command(&format!("disconnect {id}"), "OK");
    assert_eq!(reasons(&client), [Some(DisconnectReason::ByServer); 3]);
}

#[test]
fn a_killed_server_says_server_died() {
    let mut server = start_server("why-kill", &[]);
    let (client, _) = connect_echo(&server.ep);
    server.proc.kill();
    assert_eq!(reasons(&client), [Some(DisconnectReason::ServerDied); 3]);
}

/// A hand-made client (of the reliability server) publishes `request`;
/// returns the reason word the server left in the control block once it
/// hung up.
fn reason_after(tag: &str, request: impl FnOnce(&mut rel::Raw)) -> Option<DisconnectReason> {
    let server = rel::start_server(tag, &[]);
    let mut raw = rel::raw_connect(&server.ep, Default::default());
    request(&mut raw);
    raw.request_bell.signal();
    assert!(eventually(T, || socket_hung_up(&raw.stream)), "the server dropped the client");
    Control::new(&raw.segment, raw.accepted.layout.control.offset).disconnect_reason()
}

#[test]
fn a_request_with_unknown_flags_says_protocol_violation() {
    let reason = reason_after("why-proto", |raw| {
        let mut m = MessageHeader { id: 0, flags: 0x4000_0000, seq: 1 }.encode().to_vec();
        m.extend_from_slice(b"bad flags");
        raw.requests.try_push(&m).expect("push");
    });
    assert_eq!(reason, Some(DisconnectReason::ProtocolViolation));
}

#[test]
fn a_corrupt_request_ring_says_corrupt_memory() {
    use std::sync::atomic::Ordering;
    let reason = reason_after("why-corrupt", |raw| {
        // A record whose length word is garbage, published at the tail.
        let l = raw.accepted.layout;
        let tail_word = raw.segment.atomic_u64((l.request.offset + rel::RING_TAIL) as usize);
        let tail = tail_word.load(Ordering::Acquire);
        let cap = u64::from(raw.accepted.sizes.request_ring_bytes);
        let header = (l.request.offset + rel::RING_DATA + (tail % cap)) as usize;
        raw.segment.atomic_u64(header & !7).store(0x7fff_ffff_ffff_fff1, Ordering::Relaxed);
        tail_word.store(tail.wrapping_add(64), Ordering::Release);
    });
    assert_eq!(reason, Some(DisconnectReason::CorruptMemory));
}
