//! Resources and fairness of the server, measured in the server process:
//! thousands of connect/disconnect cycles, refusals that allocate nothing,
//! a busy service beside the accept path and other services, and a service
//! shut down while a handler thread still holds a connection handle.

use std::io::IoSlice;
use std::time::{Duration, Instant};

use coroipc_client::{Client, Error, Sizes};
use coroipc_testkit::suite::rel::*;
use coroipc_transport::handshake::{ClientHello, RingSizes, ServerReply, REPLY_LEN};
use coroipc_transport::socket::{Endpoint, Stream};

coroipc_testkit::rel_children!(client_mode);

fn client_mode(_name: &str) -> Option<ClientMode> {
    None
}

#[test]
fn five_thousand_connect_disconnect_cycles_return_fds_memory_and_threads_to_their_start() {
    let mut server = start_server("cycles", &[]);
    let base = server.res();
    let small = Sizes {
        request_ring_bytes: 4096,
        response_ring_bytes: 4096,
        dispatch_ring_bytes: 4096,
        max_message_bytes: 512,
    };
    let start = Instant::now();
    let mut mid = base;
    for i in 0..5_000u32 {
        // Default sizes every tenth time (a 1 MiB dispatch ring), small ones
        // otherwise.
        let sizes = if i % 10 == 0 { Sizes::default() } else { small };
        let client = connect_with(&server.ep, SVC_REL, sizes).expect("connect");
        if i % 10 == 0 {
            welcome(&client);
            echo(&client, &i.to_le_bytes());
        }
        if i == 2_500 {
            mid = server.res();
        }
    }
    eprintln!("5,000 connect/disconnect cycles in {:?}", start.elapsed());
    let end = server.settle_to(&base, "after 5,000 cycles");
    eprintln!("server: start {base:?}, mid-run {mid:?}, end {end:?}");
    assert_eq!((end.maps, end.map_bytes), (0, 0), "no segment left mapped");
    assert!(
        end.shmem_kb <= base.shmem_kb + 64,
        "shared memory back: {} → {} kB",
        base.shmem_kb,
        end.shmem_kb
    );
    assert!(end.anon_kb < base.anon_kb + 8 * 1024, "heap: {} → {} kB", base.anon_kb, end.anon_kb);
    // (Clients that leave before the connect callback ran make its
    // welcome dispatch fail with "disconnected": counted as errors, and
    // harmless.)
    let all = server.stats();
    eprintln!("server statistics: {all}");
}

/// What the server answers a hand-made hello.
fn refusal_of(ep: &str, hello: &[u8]) -> String {
    let s = Stream::connect(&Endpoint::parse(ep).unwrap()).expect("connect");
    s.as_std().set_read_timeout(Some(T)).unwrap();
    s.send_with_fds(hello, &[]).unwrap();
    let mut reply = [0u8; REPLY_LEN];
    match s.recv_exact_with_fds(&mut reply, 4) {
        Ok(_) => format!("{:?}", ServerReply::decode(&reply)),
        Err(e) => format!("closed: {e}"),
    }
}

#[test]
fn auth_refusal_wrong_version_and_connection_limit_are_clear_errors_that_allocate_nothing() {
    let mut server = start_server("refusals", &[(MAX_CONN, "2".into())]);
    let base = server.res();
    let first = connect(&server.ep);
    welcome(&first);
    let one = server.res();

    assert!(matches!(Client::connect(&server.ep, SVC_PRIV), Err(Error::AccessDenied)), "auth refusal");
    // (The server closes a refused socket right after sending the refusal,
    // so the client may hear before the descriptor is gone: wait for it.)
    assert!(eventually(T, || server.res().fds == one.fds), "nothing kept for a refused client");
    let mut hello = ClientHello { service: SVC_REL, flags: 0, sizes: RingSizes::default() }.encode();
    hello[4] = 2; // protocol version 2
    let answer = refusal_of(&server.ep, &hello);
    assert!(answer.contains("VersionMismatch"), "wrong version: {answer}");
    assert!(matches!(Client::connect(&server.ep, 77), Err(Error::NoSuchService)), "absent service");

    let second = Client::connect(&server.ep, SVC_OTHER).expect("the second of two");
    echo(&second, b"second");
    let two = server.res();
    for _ in 0..20 {
        let r = Client::connect(&server.ep, SVC_REL);
        assert!(matches!(r, Err(Error::ConnectionLimit)), "limit reached: {r:?}");
    }
    let r = Client::connect(&server.ep, SVC_PRIV);
    assert!(matches!(r, Err(Error::ConnectionLimit) | Err(Error::AccessDenied)), "{r:?}");
    let mut after = server.res();
    assert!(
        eventually(T, || {
            after = server.res();
            (after.fds, after.maps, after.conns) == (two.fds, two.maps, 2)
        }),
        "refusals allocated nothing: {after:?}, expected {two:?}"
    );
    // A slot frees up when a client leaves.
    drop(second);
    assert!(eventually(T, || Client::connect(&server.ep, SVC_OTHER).is_ok_and(|c| {
        echo(&c, b"third");
        true
    })));
    drop(first);
    server.settle_to(&base, "after the refusals");
}

#[test]
fn a_busy_service_does_not_starve_the_accept_path_or_other_services() {
    let server = start_server("busy", &[]);
    // Four processes hammer service 1 with round trips.
    let mut busy: Vec<ChildProc> = (0..4).map(|_| server.spawn_client("flood", "")).collect();
    for b in &mut busy {
        b.expect("READY", T);
    }
    let mut connects = Vec::new();
    let mut calls = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let t = Instant::now();
        let c = Client::connect(&server.ep, SVC_OTHER).expect("connect beside a busy service");
        connects.push(t.elapsed());
        for i in 0..10u8 {
            let t = Instant::now();
            echo(&c, &[i; 64]);
            calls.push(t.elapsed());
        }
    }
    connects.sort();
    calls.sort();
    let pct = |v: &[Duration], p: usize| v[(v.len() - 1) * p / 100];
    eprintln!(
        "beside 4 flooding clients: {} connects (median {:?}, max {:?}), {} calls of another service (median {:?}, p99 {:?}, max {:?})",
        connects.len(),
        pct(&connects, 50),
        pct(&connects, 100),
        calls.len(),
        pct(&calls, 50),
        pct(&calls, 99),
        pct(&calls, 100)
    );
    assert!(pct(&connects, 100) < Duration::from_millis(500), "a connect waited {:?}", pct(&connects, 100));
    assert!(
        pct(&calls, 99) < Duration::from_millis(100),
        "calls of another service: p99 {:?}",
        pct(&calls, 99)
    );
    drop(busy);
}

#[test]
fn a_service_shut_down_while_a_handler_thread_holds_a_connection_handle() {
    let mut server = start_server("svc-shutdown", &[]);
    let base = server.res();
    let client = connect(&server.ep);
    let id = welcome(&client);
    let other = Client::connect(&server.ep, SVC_OTHER).expect("connect");
    // A call whose Responder and a connection clone sit in another thread.
    let waiter = std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        let start = Instant::now();
        let r = client.call_timeout(CMD_HOLD, &[IoSlice::new(b"")], &mut buf, Some(T));
        (r.map_err(|e| error_name(&e)), start.elapsed(), client)
    });
    server.proc.expect_with("HOLDING", "id", &id.to_string(), T);
    server.proc.command(&format!("shutdown_service {SVC_REL}"), "OK");
    let (r, waited, client) = waiter.join().unwrap();
    assert_eq!(r, Err("Disconnected.ServiceShutdown".into()), "the blocked call learns of the shutdown");
    assert!(waited < Duration::from_secs(5), "promptly ({waited:?})");
    let disc = server.proc.expect_with("DISC", "id", &id.to_string(), T);
    assert_eq!(num(&disc, "calls"), 1, "{disc}");
    // The holder answers and dispatches through its handles: errors, no panic.
    server.proc.command("release", "OK");
    let held = server.proc.expect_with("HOLD_RESULT", "id", &id.to_string(), T);
    assert_eq!(field(&held, "respond"), "Err(Disconnected)", "{held}");
    assert_eq!(field(&held, "dispatch"), "Err(Disconnected)", "{held}");
    assert_eq!(field(&held, "connected"), "false", "{held}");
    drop(client);
    // New clients of the service are refused; the other service serves on.
    assert!(matches!(Client::connect(&server.ep, SVC_REL), Err(Error::NoSuchService)));
    echo(&other, b"other service still up");
    drop(other);
    // The holder thread has dropped its handles: everything is freed.
    server.settle_to(&base, "after the service shutdown");
}
