//! Dispatch messages (server → client, out of band) between a server
//! process and client processes: from the connect callback and from other
//! threads, copying and zero-copy receive, the pollable dispatch fd,
//! flow control under a storm with nothing lost, notifications to every
//! client, and request-side flow control.

use std::io::IoSlice;
use std::time::{Duration, Instant};

use coroipc_client::{Client, Error, FlowState, Sizes};
use coroipc_testkit::suite::api::*;

coroipc_testkit::api_children!();

const T: Duration = Duration::from_secs(10);

#[test]
fn the_connect_callback_can_dispatch_to_the_new_client() {
    let mut server = start_server("welcome", &[]);
    let (_client, id) = connect_echo(&server.ep); // checks the welcome comes first
    let connect = server.proc.expect("CONNECT", T);
    assert_eq!(num(&connect, "id"), id, "the welcome carries the server's id of this connection");
    assert_eq!(num(&connect, "service"), u64::from(SVC_ECHO));
}

#[test]
fn dispatch_is_received_copying_in_place_and_gathered() {
    let server = start_server("recv", &[]);
    let (client, _) = connect_echo(&server.ep);
    let mut buf = [0u8; 64];
    assert!(matches!(client.try_recv_dispatch(&mut buf), Err(Error::TryAgain)), "nothing queued");
    // A gathered dispatch (three slices), received by copy.
    let n = client.call(CMD_DISPATCH_IOV, b"one", &mut buf).expect("call");
    assert_eq!(&buf[..n], b"Ok(())");
    let info = client.try_recv_dispatch(&mut buf).expect("queued before the response");
    assert_eq!((info.id, info.len), (DISPATCH_IOV, 5));
    assert_eq!(&buf[..5], b"[one]");
    // Received in place; the sequence number follows the welcome's (0).
    assert_eq!(info.seq, 1);
    client.call(CMD_DISPATCH_IOV, b"two", &mut buf).expect("call");
    {
        let guard = client.recv_dispatch_in_place(Some(T)).expect("zero-copy receive");
        assert_eq!(&guard[..], b"[two]");
        assert_eq!((guard.info().id, guard.info().seq), (DISPATCH_IOV, 2));
    }
    // The guard released it: nothing left.
    assert!(matches!(client.try_recv_dispatch_in_place(), Err(Error::TryAgain)));
    // A buffer too small keeps the message for the next receive.
    client.call(CMD_DISPATCH_IOV, b"three", &mut buf).expect("call");
    let mut tiny = [0u8; 3];
    let r = client.try_recv_dispatch(&mut tiny);
    assert!(matches!(r, Err(Error::BufferTooSmall { needed: 7 })), "{r:?}");
    let info = client.recv_dispatch(&mut buf, Some(T)).expect("kept");
    assert_eq!(&buf[..info.len], b"[three]");
    assert_eq!(info.seq, 3, "nothing was skipped");
    let r = client.recv_dispatch(&mut buf, Some(Duration::from_millis(30)));
    assert!(matches!(r, Err(Error::Timeout)), "{r:?}");
}

#[test]
fn the_dispatch_fd_becomes_readable_when_a_message_arrives() {
    let server = start_server("fd", &[]);
    let (client, _) = connect_echo(&server.ep);
    let mut buf = [0u8; 64];
    // Empty: TryAgain arms the fd, which stays quiet.
    assert!(matches!(client.try_recv_dispatch(&mut buf), Err(Error::TryAgain)));
    assert!(!fd_readable(dispatch_fd(&client), Duration::from_millis(50)), "no message, no readiness");
    // A server thread dispatches 150 ms from now (CMD_DEFER), then answers.
    let mut req = 150u32.to_le_bytes().to_vec();
    req.extend_from_slice(b"ping");
    let ticket = client.send_vectored(CMD_DEFER, &[IoSlice::new(&req)], Some(T)).expect("send");
    let start = Instant::now();
    assert!(fd_readable(dispatch_fd(&client), T), "the fd wakes a poll(2) sleeper");
    assert!(start.elapsed() >= Duration::from_millis(100), "woken by the message, not at once");
    let info = client.try_recv_dispatch(&mut buf).expect("readable means a message is there");
    assert_eq!((info.id, &buf[..info.len]), (DISPATCH_LATE, &b"ping"[..]));
    let n = client.wait(ticket, &mut buf, Some(T)).expect("the deferred answer");
    assert_eq!(&buf[..n], b"ping");
    assert!(matches!(client.try_recv_dispatch(&mut buf), Err(Error::TryAgain)));
}

/// 2 server threads × 1500 messages of 200 bytes into a 16 KiB dispatch
/// ring read by a client that first sleeps and later reads in bursts.
#[test]
fn a_dispatch_storm_turns_flow_control_on_and_off_and_loses_nothing() {
    const N: u64 = 1500;
    const THREADS: u64 = 2;
    let mut server = start_server("storm", &[]);
    let sizes = Sizes { dispatch_ring_bytes: 16 << 10, max_message_bytes: 1024, ..Sizes::default() };
    let (client, id) = connect_echo_with(&server.ep, sizes);
    let mut buf = [0u8; 1024];
    client.call(CMD_STORM, &u32s(&[N as u32, 200, THREADS as u32]), &mut buf).expect("start the storm");
    // Not reading: the ring fills past its high watermark.
    let on = eventually(T, || client.dispatch_flow_control() == FlowState::On);
    assert!(on, "the client sees flow control on while it does not read");
    let mut seen_on = 0;
    let mut next_index = [0u64; THREADS as usize];
    for got in 0..N * THREADS {
        if client.dispatch_flow_control() == FlowState::On {
            seen_on += 1;
        }
        let info = client.recv_dispatch(&mut buf, Some(T)).expect("a storm message");
        assert_eq!(info.id, DISPATCH_STORM);
        assert_eq!(info.len, 200);
        assert_eq!(info.seq, got + 1, "message {got}: dispatch sequence numbers have no gap (welcome: 0)");
        let (t, i) = (le_u32(&buf, 0) as usize, le_u64(&buf, 4));
        assert_eq!(i, next_index[t], "thread {t}: its messages arrive in order, none lost");
        next_index[t] += 1;
        assert!(buf[12..200].iter().all(|&b| b == 0x5a), "payload intact");
        if got % 500 == 499 {
            std::thread::sleep(Duration::from_millis(30)); // another burst fills the ring
        }
    }
    assert_eq!(next_index, [N; THREADS as usize]);
    let done = server.proc.expect_with("STORM_DONE", "id", &id.to_string(), T);
    assert_eq!(num(&done, "sent"), N * THREADS);
    assert!(num(&done, "try_again") > 0, "the dispatchers were told to try again");
    assert_eq!(num(&done, "saw_flow_on"), 1, "the server saw flow control on");
    assert!(seen_on > 0);
    assert!(matches!(client.try_recv_dispatch(&mut buf), Err(Error::TryAgain)), "nothing extra");
    assert_eq!(client.dispatch_flow_control(), FlowState::Off, "drained: flow control off");
    let s = stats_fields(&server.conn_stats(id));
    assert_eq!(s["dispatched"], N * THREADS + 1, "every message counted once (plus the welcome)");
    assert!(s["flow_on"] >= 2, "flow control turned on in several bursts: {s:?}");
    assert_eq!(s["flow_on"], s["flow_off"], "every 'on' was followed by an 'off': {s:?}");
    assert!(s["retries"] > 0);
}

#[test]
fn the_counter_service_notifies_every_connected_client() {
    let server = start_server("counter", &[]);
    let mut listeners: Vec<ChildProc> =
        (0..3).map(|_| start_client("counter-listener", &server.ep, &[])).collect();
    let client = Client::connect(&server.ep, SVC_COUNTER).expect("connect");
    let mut buf = [0u8; 8];
    for expected in 1..=3u64 {
        client.call(CMD_INCREMENT, b"", &mut buf).expect("increment");
        assert_eq!(u64::from_le_bytes(buf), expected);
    }
    for l in &mut listeners {
        for expected in 1..=3u64 {
            let line = l.expect("COUNTER", T);
            assert_eq!(num(&line, "value"), expected, "listener {} sees every change in order", l.pid());
        }
    }
    // The caller, connected too, was notified as well.
    for expected in 1..=3u64 {
        let info = client.recv_dispatch(&mut buf, Some(T)).expect("own notification");
        assert_eq!((info.id, u64::from_le_bytes(buf)), (DISPATCH_COUNTER, expected));
    }
    // A listener that dies is dropped from the list; the others still hear.
    listeners[0].kill();
    listeners[0].wait_exit(T);
    std::thread::sleep(Duration::from_millis(50));
    client.call(CMD_INCREMENT, b"", &mut buf).expect("increment");
    for l in &mut listeners[1..] {
        assert_eq!(num(&l.expect("COUNTER", T), "value"), 4);
    }
}

#[test]
fn pausing_a_service_turns_on_request_flow_control_until_resumed() {
    let mut server = start_server("pause", &[]);
    let (client, _) = connect_echo(&server.ep);
    let (other, _) = Client::connect(&server.ep, SVC_SELECTOR).map(|c| (c, ())).expect("connect");
    assert_eq!(client.request_flow_control(), FlowState::Off);
    server.proc.command(&format!("pause_service {SVC_ECHO} 1"), "OK");
    assert!(eventually(T, || client.request_flow_control() == FlowState::On), "the client sees it");
    let mut buf = [0u8; 16];
    let r = client.send_vectored(CMD_ECHO, &[IoSlice::new(b"x")], Some(Duration::ZERO));
    assert!(matches!(r, Err(Error::TryAgain)), "a non-waiting send: {r:?}");
    let r = client.call_timeout(CMD_ECHO, &[IoSlice::new(b"x")], &mut buf, Some(Duration::from_millis(50)));
    assert!(matches!(r, Err(Error::Timeout)), "a bounded call: {r:?}");
    // Another service is not paused.
    assert_eq!(other.call(0, b"even", &mut buf).expect("other service"), 4);
    // A blocking call waits for the resume, then completes.
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let start = Instant::now();
            let mut buf = [0u8; 16];
            let n = client.call(CMD_ECHO, b"waited", &mut buf).expect("call after resume");
            assert_eq!(&buf[..n], b"waited");
            start.elapsed()
        });
        std::thread::sleep(Duration::from_millis(150));
        server.proc.command(&format!("pause_service {SVC_ECHO} 0"), "OK");
        let waited = waiter.join().expect("waiter");
        assert!(waited >= Duration::from_millis(100), "it waited for the resume: {waited:?}");
    });
    assert_eq!(client.request_flow_control(), FlowState::Off);
}

#[test]
fn a_connection_can_pause_its_own_requests() {
    let server = start_server("pauseconn", &[]);
    let (client, _) = connect_echo(&server.ep);
    let (neighbour, _) = connect_echo(&server.ep);
    let mut buf = [0u8; 16];
    client.call(CMD_PAUSE_ME, &u32s(&[200]), &mut buf).expect("pause me");
    assert_eq!(client.request_flow_control(), FlowState::On, "paused before the answer was read");
    assert_eq!(neighbour.request_flow_control(), FlowState::Off, "only this connection");
    echo(&neighbour, b"unaffected");
    let start = Instant::now();
    echo(&client, b"after the pause");
    assert!(start.elapsed() >= Duration::from_millis(100), "served only after the resume");
    assert_eq!(client.request_flow_control(), FlowState::Off);
}

#[test]
fn the_dispatch_fd_wakes_a_poller_when_the_server_is_killed() {
    let mut server = start_server("fdkill", &[]);
    let (client, _id) = connect_echo(&server.ep);
    let mut buf = [0u8; 16];
    assert!(matches!(client.try_recv_dispatch(&mut buf), Err(Error::TryAgain)), "arms the fd");
    assert!(!fd_readable(dispatch_fd(&client), Duration::from_millis(30)));
    server.proc.kill();
    let t0 = std::time::Instant::now();
    assert!(fd_readable(dispatch_fd(&client), T), "a loop polling only the dispatch fd learns of the death");
    assert!(t0.elapsed() < Duration::from_millis(100), "within 100 ms: {:?}", t0.elapsed());
    let r = client.try_recv_dispatch(&mut buf);
    assert!(is_lost(&r), "{r:?}");
}

#[test]
fn the_dispatch_fd_wakes_a_poller_when_the_server_closes_the_connection() {
    let mut server = start_server("fdclose", &[]);
    let (client, id) = connect_echo(&server.ep);
    let mut buf = [0u8; 16];
    assert!(matches!(client.try_recv_dispatch(&mut buf), Err(Error::TryAgain)), "arms the fd");
    assert!(!fd_readable(dispatch_fd(&client), Duration::from_millis(30)));
    server.proc.command(&format!("disconnect {id}"), "OK");
    assert!(fd_readable(dispatch_fd(&client), T), "a loop polling only the dispatch fd learns of the close");
    let r = client.try_recv_dispatch(&mut buf);
    assert!(is_lost(&r), "{r:?}");
}
