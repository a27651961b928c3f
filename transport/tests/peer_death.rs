//! Peer death and clean close across real processes: every blocked call on
//! one side returns `PeerGone` within 100 ms of the other side's SIGKILL, in
//! every wait mode, and after a clean close (typically within 0.1 ms: the
//! close wakes the sleeper; asserted against the same 100 ms bound, which a
//! loaded 2-CPU machine can stretch a 15 ms one past without any bug).
//!
//! Latencies are measured from just before `kill(2)` (or, for a clean close,
//! from a `CLOCK_MONOTONIC` reading the closing process takes just before
//! `close()`) to the return of the blocked call, and printed (run with
//! `--nocapture` to see them).

mod common;

use std::io::IoSlice;
use std::time::{Duration, Instant};

use common::*;
use coroipc_transport::channel::{ChannelError, ClientChannel, Limits, ServerChannel};
use coroipc_transport::control::DisconnectReason;
use coroipc_transport::socket::Listener;
use coroipc_transport::waiter::{SleepMode, WaitPolicy, LIVENESS_SLICE};

const T: Duration = Duration::from_secs(10);
/// The bound ARCHITECTURE.md promises for noticing a dead peer ("a dead
/// peer is noticed within 100 ms by every blocked call").
const DEATH_BOUND: Duration = Duration::from_millis(100);
/// How long the blocked side is left asleep before the peer is killed.
/// Not a multiple of `LIVENESS_SLICE`, so a futex sleeper is killed in the
/// middle of a slice rather than just before it would check anyway.
const SETTLE: Duration = Duration::from_millis(70);

#[test]
#[ignore = "helper: runs as a child process of the other tests"]
fn child() {
    child_main(|_| false);
}

// ---------------------------------------------------------------------------
// (a) server SIGKILLed while the client blocks in wait_response
// ---------------------------------------------------------------------------

fn client_sees_server_sigkill(policy: WaitPolicy, label: &str) {
    let ep = abstract_endpoint("kill-server");
    let mut server = spawn_child("server", &[(EP, ep.to_string())]);
    server.expect("READY", T);
    let mut client = ClientChannel::connect(&ep, &hello(SERVICE_ECHO, SMALL), T).expect("connect");
    client.set_wait_policy(policy);
    echo_round_trip(&mut client, 1, T);

    // Block waiting for a response that never comes.
    let waiter = std::thread::spawn(move || {
        let r = client.requests().wait_response(Some(Instant::now() + T));
        (r, Instant::now())
    });
    std::thread::sleep(SETTLE);
    assert!(!waiter.is_finished(), "the client is still waiting");
    let killed_at = server.kill();
    let (r, returned_at) = waiter.join().expect("waiter thread");
    let latency = returned_at.duration_since(killed_at);
    eprintln!("client wait_response [{label}] saw server SIGKILL after {latency:?}");
    assert_eq!(r, Err(ChannelError::Disconnected(DisconnectReason::ServerDied)), "[{label}]");
    assert!(latency < DEATH_BOUND, "[{label}] noticed after {latency:?}");
}

#[test]
fn client_sees_server_sigkill_within_100ms_futex_sleep_only() {
    client_sees_server_sigkill(WaitPolicy::sleep_only(SleepMode::Futex), "futex, sleep only");
}

#[test]
fn client_sees_server_sigkill_within_100ms_poll_sleep_only() {
    client_sees_server_sigkill(WaitPolicy::sleep_only(SleepMode::Poll), "poll, sleep only");
}

#[test]
fn client_sees_server_sigkill_within_100ms_default_policy() {
    client_sees_server_sigkill(WaitPolicy::default(), "default");
}

#[test]
fn client_sees_server_sigkill_within_100ms_spin_then_poll() {
    let policy = WaitPolicy { sleep: SleepMode::Poll, ..WaitPolicy::default() };
    client_sees_server_sigkill(policy, "spin, then poll");
}

#[test]
fn client_sees_server_sigkill_within_100ms_spin_only() {
    client_sees_server_sigkill(WaitPolicy::spin_only(), "spin only");
}

/// A blocked client sleeps: its thread uses (almost) no CPU while it waits,
/// in both sleep modes, so fast detection above is not bought by spinning.
#[test]
fn blocked_client_sleeps_without_burning_cpu() {
    let ep = abstract_endpoint("cpu");
    let _server = ServerThread::spawn(ep.clone(), ServerConfig::default());
    for mode in [SleepMode::Futex, SleepMode::Poll] {
        let mut client = ClientChannel::connect(&ep, &hello(SERVICE_ECHO, SMALL), T).expect("connect");
        client.set_wait_policy(WaitPolicy::sleep_only(mode));
        let (r, cpu) = within(T, "wait_response", move || {
            let cpu = || rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
            let before = cpu();
            let r = client.requests().wait_response(Some(Instant::now() + Duration::from_millis(300)));
            let after = cpu();
            let ns = (after.tv_sec - before.tv_sec) * 1_000_000_000 + (after.tv_nsec - before.tv_nsec);
            (r, Duration::from_nanos(ns as u64))
        });
        eprintln!("{mode:?} sleeper: {cpu:?} of CPU in a 300 ms wait");
        assert_eq!(r, Err(ChannelError::Timeout));
        assert!(cpu < Duration::from_millis(30), "{mode:?}: {cpu:?} of CPU while waiting 300 ms");
    }
}

/// A futex sleeper notices death by waking every [`LIVENESS_SLICE`]: the
/// bound above only holds while the slice is well below it.
#[test]
fn liveness_slice_is_well_below_the_death_bound() {
    assert!(LIVENESS_SLICE * 2 < DEATH_BOUND, "{LIVENESS_SLICE:?}");
}

// ---------------------------------------------------------------------------
// (b) client SIGKILLed while a server thread blocks on a full ring
// ---------------------------------------------------------------------------

/// A client child connected to a server end in this process.
fn connected_client(tag: &str) -> (ChildProc, ServerChannel, Listener) {
    let ep = abstract_endpoint(tag);
    let listener = Listener::bind(&ep).expect("bind");
    let mut child = spawn_child("client", &[(EP, ep.to_string()), (ECHO, "0".into())]);
    let server = accept_one(&listener, &Limits::default(), T);
    child.expect("READY", T);
    (child, server, listener)
}

/// Fills the response ring (the client child never reads it).
fn fill_responses(server: &ServerChannel) -> Vec<u8> {
    let msg = message(CMD_ECHO, 0, &[0xab; 200]);
    let mut sent = 0;
    loop {
        match server.send_response(&[IoSlice::new(&msg)], Duration::ZERO) {
            Ok(()) => sent += 1,
            Err(ChannelError::Timeout) => break,
            Err(e) => panic!("filling the response ring: {e:?}"),
        }
        assert!(sent < 100_000, "the response ring never filled");
    }
    assert!(sent > 0);
    msg
}

/// Fills the dispatch ring until flow control refuses more.
fn fill_dispatch(server: &ServerChannel) -> Vec<u8> {
    let msg = message(DISPATCH_ID, 0, &[0xcd; 200]);
    let mut sent = 0;
    loop {
        match server.try_dispatch(&[IoSlice::new(&msg)]) {
            Ok(_) => sent += 1,
            Err(ChannelError::TryAgain) => break,
            Err(e) => panic!("filling the dispatch ring: {e:?}"),
        }
        assert!(sent < 100_000, "the dispatch ring never filled");
    }
    assert!(sent > 0);
    msg
}

fn server_sees_client_sigkill(
    tag: &str,
    fill: fn(&ServerChannel) -> Vec<u8>,
    block: fn(&ServerChannel, &[u8]) -> Result<(), ChannelError>,
) {
    let (mut child, server, _listener) = connected_client(tag);
    let msg = fill(&server);
    let blocked = std::thread::spawn(move || {
        let r = block(&server, &msg);
        (r, Instant::now())
    });
    std::thread::sleep(SETTLE);
    assert!(!blocked.is_finished(), "[{tag}] the server is still blocked");
    let killed_at = child.kill();
    let (r, returned_at) = blocked.join().expect("server thread");
    let latency = returned_at.duration_since(killed_at);
    eprintln!("server [{tag}] saw client SIGKILL after {latency:?}");
    assert_eq!(r, Err(ChannelError::PeerGone), "[{tag}]");
    assert!(latency < DEATH_BOUND, "[{tag}] noticed after {latency:?}");
}

#[test]
fn server_send_response_on_full_ring_sees_client_sigkill_within_100ms() {
    server_sees_client_sigkill("send_response", fill_responses, |s, m| {
        s.send_response(&[IoSlice::new(m)], T)
    });
}

#[test]
fn server_dispatch_timeout_on_full_ring_sees_client_sigkill_within_100ms() {
    server_sees_client_sigkill("dispatch_timeout", fill_dispatch, |s, m| {
        s.dispatch_timeout(&[IoSlice::new(m)], T).map(|_| ())
    });
}

// ---------------------------------------------------------------------------
// (d) a clean close wakes the other side at once
// ---------------------------------------------------------------------------

fn client_woken_by_server_close(policy: WaitPolicy, label: &str) {
    let ep = abstract_endpoint("close-server");
    let mut server = spawn_child("server", &[(EP, ep.to_string())]);
    server.expect("READY", T);
    let mut client = ClientChannel::connect(&ep, &hello(SERVICE_ECHO, SMALL), T).expect("connect");
    client.set_wait_policy(policy);
    echo_round_trip(&mut client, 1, T);
    // The server closes 60 ms from now; the client is asleep by then.
    let close = message(CMD_CLOSE_AFTER, 2, &(SETTLE.as_millis() as u32).to_le_bytes());
    client.requests().send(&[IoSlice::new(&close)], Some(Instant::now() + T)).expect("send close request");
    let r = client.requests().wait_response(Some(Instant::now() + T));
    let returned = mono_ns();
    let line = server.expect("CLOSED", T);
    assert_eq!(field(&line, "reason"), "Requested");
    let latency = ms_between(num(&line, "at"), returned);
    eprintln!("client wait_response [{label}] woken {latency:.3} ms after the server's close()");
    // A bare close() gives no reason.
    assert_eq!(r, Err(ChannelError::Disconnected(DisconnectReason::Unknown)), "[{label}]");
    assert!(!client.status().peer_alive());
    // "At once": the close wakes the sleeper itself; it does not wait for
    // its next liveness check (up to LIVENESS_SLICE later).
    assert!(latency < DEATH_BOUND.as_secs_f64() * 1e3, "[{label}] woken {latency:.3} ms after close");
    // The server process is alive: this was a close, not a death.
    assert!(server.is_running(), "the server process lives on: a close, not a death");
}

#[test]
fn server_close_wakes_a_futex_sleeping_client_at_once() {
    client_woken_by_server_close(WaitPolicy::sleep_only(SleepMode::Futex), "futex, sleep only");
}

#[test]
fn server_close_wakes_a_poll_sleeping_client_at_once() {
    client_woken_by_server_close(WaitPolicy::sleep_only(SleepMode::Poll), "poll, sleep only");
}

#[test]
fn client_close_wakes_a_blocked_server_at_once() {
    let (mut child, server, _listener) = connected_client("close-client");
    let msg = fill_responses(&server);
    let blocked = std::thread::spawn(move || {
        let r = server.send_response(&[IoSlice::new(&msg)], T);
        (r, mono_ns())
    });
    std::thread::sleep(SETTLE);
    assert!(!blocked.is_finished(), "the server is still blocked");
    child.send_line("CLOSE");
    let line = child.expect("CLOSED", T);
    let (r, returned) = blocked.join().expect("server thread");
    let latency = ms_between(num(&line, "at"), returned);
    eprintln!("server send_response woken {latency:.3} ms after the client's close()");
    assert_eq!(r, Err(ChannelError::PeerGone));
    assert!(latency < DEATH_BOUND.as_secs_f64() * 1e3, "woken {latency:.3} ms after close");
    assert!(child.is_running(), "the client process lives on: a close, not a death");
}
