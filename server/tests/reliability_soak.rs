//! Soak: 32 client processes doing calls and receiving dispatch while a
//! chaos loop SIGKILLs a random one every 100 ms and starts a new one.
//! Surviving clients lose nothing (every response and every dispatch
//! message accounted for by sequence numbers); the server's descriptors
//! and memory, measured in the server process, stay flat.
//!
//! Duration: `COROIPC_SOAK_SECS` (default 8, the CI length); the full
//! soak is `COROIPC_SOAK_SECS=60` (see the README).

use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use coroipc_client::{Error, Sizes};
use coroipc_testkit::suite::rel::*;

coroipc_testkit::rel_children!(client_mode);

fn client_mode(name: &str) -> Option<ClientMode> {
    match name {
        "soak" => Some(soak_mode),
        _ => None,
    }
}

const CLIENTS: usize = 32;

fn soak_secs() -> u64 {
    std::env::var("COROIPC_SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(8)
}

/// Sizes of a soak client: small rings, so 32 of them stay cheap and the
/// dispatch ring fills (flow control) now and then.
const SOAK_SIZES: Sizes = Sizes {
    request_ring_bytes: 4096,
    response_ring_bytes: 4096,
    dispatch_ring_bytes: 8192,
    max_message_bytes: 1024,
};

/// Receives every waiting dispatch message, checking each.
fn drain(client: &coroipc_client::Client, next: &mut u64) {
    let mut buf = [0u8; 64];
    loop {
        match client.try_recv_dispatch(&mut buf) {
            Ok(info) => {
                assert_eq!((info.id, info.seq), (DISPATCH_TICKLE, *next), "dispatch in order, none lost");
                assert_eq!(le_u64(&buf, 0), info.seq, "dispatch payload intact");
                *next += 1;
            }
            Err(Error::TryAgain) => return,
            Err(e) => panic!("dispatch receive: {e}"),
        }
    }
}

/// Child: round trips with checked payloads, dispatch requests, drains
/// the dispatch ring; on `finish`, accounts for everything and reports
/// `@@FINAL`.
fn soak_mode(ep: &str, _arg: &str, control: Receiver<String>) {
    let client = connect_with(ep, SVC_REL, SOAK_SIZES).expect("connect");
    let id = welcome(&client);
    report("READY", &format!("id={id} pid={}", std::process::id()));
    let mut buf = vec![0u8; 1024];
    let (mut calls, mut tickled, mut next_dispatch) = (0u64, 0u64, 1u64);
    loop {
        match control.try_recv() {
            Ok(line) if line == "finish" => break,
            Ok(_) | Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => return,
        }
        calls += 1;
        let mut req = calls.to_le_bytes().to_vec();
        req.extend_from_slice(&pattern(calls, (calls % 200) as usize));
        let n = client.call(CMD_ECHO, &req, &mut buf).expect("echo");
        assert_eq!(&buf[..n], &req[..], "response {calls} is this call's, intact");
        if calls % 4 == 0 {
            let n = client.call(CMD_TICKLE, &u32s(&[6]), &mut buf).expect("tickle");
            assert_eq!(n, 4);
            tickled += u64::from(le_u32(&buf, 0));
        }
        drain(&client, &mut next_dispatch);
    }
    let mut b = [0u8; 48];
    client.call(CMD_STATS, b"", &mut b).expect("stats");
    let dispatched = le_u64(&b, 0);
    let deadline = Instant::now() + T;
    while next_dispatch < dispatched {
        assert!(
            Instant::now() < deadline,
            "dispatch messages missing: got up to {next_dispatch}, server sent {dispatched}"
        );
        drain(&client, &mut next_dispatch);
    }
    assert_eq!(dispatched, tickled + 1, "the server sent what it said it sent (+ the welcome)");
    report(
        "FINAL",
        &format!("id={id} calls={calls} dispatch={} server_dispatched={dispatched} ok=1", next_dispatch - 1),
    );
}

#[test]
fn soak_32_clients_with_a_sigkill_every_100ms_lose_nothing_and_the_server_stays_flat() {
    let secs = soak_secs();
    let mut server = start_server("soak", &[]);
    let base = server.res();
    let mut clients: Vec<(ChildProc, bool)> =
        (0..CLIENTS).map(|_| (server.spawn_client("soak", ""), false)).collect();
    for (c, ready) in &mut clients {
        c.expect("READY", T);
        *ready = true;
    }
    let full = server.res();
    let mut rng = Garbage::new(mono_ns() | 1);
    let mut samples = vec![full];
    let (mut killed, mut started) = (0u64, 0u64);
    let start = Instant::now();
    let mut last_sample = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(100));
        let victim = (rng.next() % CLIENTS as u64) as usize;
        let (mut old, _) = std::mem::replace(&mut clients[victim], (server.spawn_client("soak", ""), false));
        old.kill();
        old.wait_exit(T);
        killed += 1;
        started += 1;
        if last_sample.elapsed() >= Duration::from_secs(1) {
            samples.push(server.res());
            last_sample = Instant::now();
        }
    }
    // Survivors account for everything.
    let mut finals = 0;
    let (mut calls, mut dispatch) = (0u64, 0u64);
    for (c, ready) in &mut clients {
        if !*ready {
            c.expect("READY", T);
        }
        c.send_line("finish");
    }
    let end_full = server.res();
    for (c, _) in &mut clients {
        let line = c.expect("FINAL", T);
        assert_eq!(field(&line, "ok"), "1", "{line}");
        calls += num(&line, "calls");
        dispatch += num(&line, "dispatch");
        finals += 1;
    }
    let max_fds = samples.iter().map(|s| s.fds).max().unwrap();
    let max_maps = samples.iter().map(|s| s.maps).max().unwrap();
    let max_anon = samples.iter().map(|s| s.anon_kb).max().unwrap();
    eprintln!(
        "soak {secs} s: {killed} clients SIGKILLed and {started} started; {finals} survivors made {calls} calls and received {dispatch} dispatch messages, none lost"
    );
    eprintln!("server: no clients {base:?}; 32 clients {full:?}; at the end {end_full:?}; peaks fds {max_fds}, maps {max_maps}, anon {max_anon} kB");
    assert_eq!(finals, CLIENTS);
    assert!(killed >= secs * 5, "the chaos loop ran ({killed} kills)");
    // Flat: with 32 clients (plus a few being reaped) the server holds
    // what 32 connections hold, however many came and went.
    let per_conn = (full.fds - base.fds) / CLIENTS as u64;
    assert!(max_fds <= full.fds + 8 * per_conn, "descriptors grew: {max_fds}, with 32 clients {}", full.fds);
    assert!(max_maps <= full.maps + 8, "mappings grew: {max_maps}, with 32 clients {}", full.maps);
    assert!(
        end_full.shmem_kb <= full.shmem_kb + 8 * 64,
        "shared memory grew: {} → {} kB",
        full.shmem_kb,
        end_full.shmem_kb
    );
    assert!(max_anon < full.anon_kb + 16 * 1024, "heap grew: {} → {max_anon} kB", full.anon_kb);
    drop(clients);
    let end = server.settle_to(&base, "after the soak");
    assert_eq!((end.maps, end.map_bytes), (0, 0), "no segment left mapped");
}
