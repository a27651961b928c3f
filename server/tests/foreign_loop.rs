//! The poll abstraction proven with a loop written elsewhere: the test
//! server process drives `Server` from a hand-rolled `poll(2)` loop
//! (`coroipc_testkit::suite::api::PollLoop`, a `Poller` over a list of (fd, token)) calling only
//! `handle_event` and `tick` — no built-in loop — and clients in this
//! process use every feature through it.

use std::io::IoSlice;
use std::time::{Duration, Instant};

use coroipc_client::{Client, DisconnectReason, Error};
use coroipc_server::{Server, ServiceBuilder, LISTENER_TOKEN, WAKER_TOKEN};
use coroipc_testkit::suite::api::*;

coroipc_testkit::api_children!();

const T: Duration = Duration::from_secs(10);

/// A foreign loop that ticks only every 500 ms: requests must be served
/// because their eventfds wake the loop, not because a tick polls them.
fn poll_server(tag: &str) -> TestServer {
    start_server(tag, &[(LOOP, "poll".into()), (TICK_MS, "500".into())])
}

#[test]
fn a_poll_loop_serves_calls_promptly_without_relying_on_ticks() {
    let server = poll_server("prompt");
    let (client, _) = connect_echo(&server.ep);
    let start = Instant::now();
    for i in 0..50u32 {
        echo(&client, &i.to_le_bytes());
    }
    let took = start.elapsed();
    // Served by ticks, 50 calls would take about 12 s.
    assert!(took < Duration::from_secs(3), "50 calls took {took:?}");
    // A second connection, and pipelined requests beyond one batch.
    let (other, _) = connect_echo(&server.ep);
    let tickets: Vec<_> = (0..100u32)
        .map(|i| other.send_vectored(CMD_ECHO, &[IoSlice::new(&i.to_le_bytes())], Some(T)).unwrap())
        .collect();
    let mut buf = [0u8; 8];
    let start = Instant::now();
    for (i, t) in tickets.into_iter().enumerate() {
        let n = other.wait(t, &mut buf, Some(T)).expect("pipelined answer");
        assert_eq!(&buf[..n], &(i as u32).to_le_bytes());
    }
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
}

#[test]
fn a_poll_loop_carries_dispatch_deferred_answers_and_flow_control() {
    let mut server = poll_server("features");
    let (client, id) = connect_echo(&server.ep);
    let mut buf = [0u8; 64];
    let mut req = 20u32.to_le_bytes().to_vec();
    req.extend_from_slice(b"deferred");
    let n = client.call(CMD_DEFER, &req, &mut buf).expect("deferred answer");
    assert_eq!(&buf[..n], b"deferred");
    let info = client.recv_dispatch(&mut buf, Some(T)).expect("dispatch from another thread");
    assert_eq!((info.id, &buf[..info.len]), (DISPATCH_LATE, &b"deferred"[..]));
    let r = client.call(CMD_UNKNOWN, b"", &mut buf);
    assert!(matches!(r, Err(Error::Invalid)), "{r:?}");
    // Pausing goes through the waker.
    server.proc.command(&format!("pause_service {SVC_ECHO} 1"), "OK");
    assert!(eventually(T, || client.request_flow_control() == coroipc_client::FlowState::On));
    server.proc.command(&format!("pause_service {SVC_ECHO} 0"), "OK");
    let start = Instant::now();
    echo(&client, b"resumed");
    assert!(start.elapsed() < Duration::from_millis(400), "resumed by the waker, not a tick");
    let s = stats_fields(&server.conn_stats(id));
    assert_eq!((s["requests"], s["errors"]), (3, 1));
}

#[test]
fn a_poll_loop_handles_disconnects_and_shutdown() {
    let mut server = poll_server("lifecycle");
    let (kicked, kicked_id) = connect_echo(&server.ep);
    let (leaving, leaving_id) = connect_echo(&server.ep);
    let (blocked, _) = connect_echo(&server.ep);
    // Server-initiated disconnect: through the waker.
    server.proc.command(&format!("disconnect {kicked_id}"), "OK");
    server.proc.expect_with("DISCONNECT_DONE", "id", &kicked_id.to_string(), T);
    assert!(is_lost(&kicked.call(CMD_ECHO, b"x", &mut [0u8; 8])));
    // A client leaving: through its socket's hang-up.
    drop(leaving);
    server.proc.expect_with("DISCONNECT_DONE", "id", &leaving_id.to_string(), T);
    // Shutdown wakes a blocked caller and ends the loop with nothing left
    // registered with it.
    std::thread::scope(|s| {
        let t = s.spawn(|| blocked.call(CMD_NEVER, b"", &mut [0u8; 8]));
        server.proc.expect("PARKED", T);
        server.proc.command("shutdown", "OK");
        let r = t.join().unwrap();
        assert!(matches!(r, Err(Error::Disconnected(DisconnectReason::ServerShutdown))), "{r:?}");
    });
    let done = server.proc.expect("POLL_LOOP_DONE", T);
    assert_eq!(num(&done, "registered"), 0, "every fd was deregistered");
    server.proc.expect("STOPPED", T);
}

/// The same loop in this process, looked at from the inside: what the
/// server registers, and that it deregisters what it closes.
#[test]
fn the_server_registers_and_deregisters_its_fds_through_the_poller() {
    let ep = endpoint("inside");
    let echo_svc = ServiceBuilder::new(SVC_ECHO, |_| Ok(())).handler(CMD_ECHO, |call| {
        let p = call.payload();
        let _ = call.respond(p);
    });
    let mut server = Server::builder().endpoint(&ep).service(echo_svc).build().expect("build");
    let handle = server.handle();
    let mut poller = PollLoop::default();
    server.register(&mut poller).expect("register");
    assert_eq!(poller.len(), 2, "listener and waker");
    // A client (on a thread: the server is in this process so that the
    // test can look at its poller) connects, echoes, leaves.
    let client_ep = ep.clone();
    let client = std::thread::spawn(move || {
        let c = Client::connect(&client_ep, SVC_ECHO).expect("connect");
        let mut buf = [0u8; 8];
        let n = c.call(CMD_ECHO, b"inside", &mut buf).expect("call");
        assert_eq!(&buf[..n], b"inside");
        c
    });
    let mut max_registered = 0;
    let mut client_conn = None;
    let deadline = Instant::now() + T;
    while client_conn.is_none() || !client.is_finished() {
        assert!(Instant::now() < deadline, "the client was not served");
        for token in poller.wait(Duration::from_millis(10)).expect("poll") {
            assert!(token == LISTENER_TOKEN || token == WAKER_TOKEN || token.0 >= 2);
            server.handle_event(token, &mut poller);
        }
        server.tick(&mut poller);
        max_registered = max_registered.max(poller.len());
        client_conn = handle.connections().first().cloned().or(client_conn);
    }
    assert_eq!(max_registered, 4, "a connection adds its socket and its request eventfd");
    let c = client.join().expect("client thread");
    drop(c);
    let deadline = Instant::now() + T;
    while poller.len() > 2 {
        assert!(Instant::now() < deadline, "the closed connection's fds stay registered");
        for token in poller.wait(Duration::from_millis(10)).expect("poll") {
            server.handle_event(token, &mut poller);
        }
    }
    assert!(handle.connections().is_empty());
    handle.shutdown();
    while !server.is_stopped() {
        for token in poller.wait(Duration::from_millis(10)).expect("poll") {
            server.handle_event(token, &mut poller);
        }
    }
    assert_eq!(poller.len(), 0, "stopping deregisters the listener and the waker");
}
