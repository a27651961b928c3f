//! A server frees everything a connection held: after thousands of clean
//! connect/disconnect cycles, and after a thousand client processes killed
//! with SIGKILL at a live connection, its open descriptors and mapped
//! segment memory are back to where they started.
//!
//! The server runs on a thread of this test process, so `/proc/self`
//! measures it; the tests here run one at a time ([`SERIAL`]) so that no
//! other test's descriptors are counted.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use coroipc_transport::channel::ClientChannel;

const T: Duration = Duration::from_secs(10);

/// Serialises the tests of this file: they measure the whole process.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
#[ignore = "helper: runs as a child process of the other tests"]
fn child() {
    child_main(|_| false);
}

/// Waits until the server holds no connection and this process's
/// resources are back to `baseline`.
fn assert_back_to(server: &ServerThread, baseline: Resources, what: &str) {
    server.wait_until(T, "all connections reaped", |s| s.connections() == 0 && s.pending() == 0);
    let deadline = Instant::now() + T;
    loop {
        let now = resources();
        if now == baseline {
            eprintln!("{what}: back to {now:?}");
            return;
        }
        assert!(Instant::now() < deadline, "{what}: resources {now:?}, started at {baseline:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn ten_thousand_connect_disconnect_cycles_leave_no_descriptor_or_mapping_behind() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = ServerThread::spawn(abstract_endpoint("cycles"), ServerConfig::default());
    let baseline = resources();
    assert_eq!((baseline.memfd_maps, baseline.memfd_bytes), (0, 0), "no segment mapped yet");

    let start = Instant::now();
    let mut peak = baseline;
    for i in 0..10_000u64 {
        let mut client =
            ClientChannel::connect(&server.endpoint, &hello(SERVICE_ECHO, SMALL), T).expect("connect");
        if i % 10 == 0 {
            echo_round_trip(&mut client, i, T);
        }
        if i == 5_000 {
            peak = resources();
        }
        drop(client);
        if i % 1_000 == 999 {
            let _ = server.drain_events();
        }
    }
    eprintln!("10,000 connect/disconnect cycles in {:?} (mid-run: {peak:?})", start.elapsed());
    assert_back_to(&server, baseline, "after 10,000 cycles");
    let events = server.drain_events();
    assert!(events.iter().all(|e| !matches!(e, Event::HandshakeFailed(_))), "{events:?}");
}

#[test]
fn a_thousand_sigkilled_client_processes_leave_no_descriptor_or_mapping_behind() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = ServerThread::spawn(abstract_endpoint("killed"), ServerConfig::default());
    let baseline = resources();
    const BATCH: usize = 20;
    const CLIENTS: usize = 1_000;

    let start = Instant::now();
    let mut accepted = 0;
    let mut gone = 0;
    let mut max_connections = 0;
    for b in 0..CLIENTS / BATCH {
        // Every other batch is killed while busy with round trips (SIGKILL
        // at any instruction of a request), the others while idle.
        let flood = if b % 2 == 0 { "1" } else { "0" };
        let mut batch: Vec<ChildProc> = (0..BATCH)
            .map(|_| spawn_child("client", &[(EP, server.endpoint.to_string()), (FLOOD, flood.into())]))
            .collect();
        // Each connected and did one round trip; now kill it mid-connection.
        for c in &mut batch {
            c.expect("READY", T);
        }
        max_connections = max_connections.max(server.connections());
        for c in &mut batch {
            c.kill();
        }
        for c in &mut batch {
            c.wait_exit(T);
        }
        drop(batch);
        for ev in server.drain_events() {
            match ev {
                Event::Accepted { .. } => accepted += 1,
                Event::Closed { reason: Err(coroipc_transport::channel::ChannelError::PeerGone), .. } => {
                    gone += 1
                }
                other => panic!("unexpected server event {other:?}"),
            }
        }
    }
    eprintln!(
        "{CLIENTS} client processes spawned, connected, SIGKILLed in batches of {BATCH}: {:?}",
        start.elapsed()
    );
    assert_back_to(&server, baseline, "after 1,000 SIGKILLed clients");
    for ev in server.drain_events() {
        match ev {
            Event::Accepted { .. } => accepted += 1,
            Event::Closed { reason: Err(coroipc_transport::channel::ChannelError::PeerGone), .. } => {
                gone += 1
            }
            other => panic!("unexpected server event {other:?}"),
        }
    }
    assert_eq!(accepted, CLIENTS, "every client connected");
    assert_eq!(gone, CLIENTS, "every death was noticed as PeerGone");
    assert!(max_connections > 1, "clients overlapped (saw at most {max_connections} at once)");
}
