//! The outbound dispatch queue (`Connection::dispatch`), between a server
//! process and clients in the test process: a message that does not fit
//! the client's ring waits in the server, in order, and the client sees
//! flow control until the queue drained; past its byte bound the service's
//! policy applies (wait for the client, or disconnect it as too slow); a
//! lazy producer is told when the queue drained.

#![allow(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coroipc_client::{Client, DisconnectReason, Error, FlowState, Sizes};
use coroipc_server::{Connection, DispatchError, OutboundLimits, OverflowPolicy, Server, ServiceBuilder};
use coroipc_testkit::{field, le_u32, num, report, ChildProc};

const SVC: u16 = 1;
/// Payload `n: u32, size: u32`: dispatches `n` messages of `size` bytes
/// (each starts with its index, u32 LE) with `dispatch`, on the loop
/// thread; answers `queued_messages: u32, queued_bytes: u32, error: u32,
/// after: u32` (error: 0 = all accepted, else 1 + the index that failed;
/// after: 1 if a further dispatch after the failure was refused too).
const CMD_BURST: u16 = 0;
/// As [`CMD_BURST`], on another thread; reports `@@BURST_DONE error=<name>
/// sent=<n>` and answers at once.
const CMD_BURST_THREAD: u16 = 1;
/// Registers an `on_drained` callback that dispatches [`MSG_DRAINED`].
const CMD_ON_DRAINED: u16 = 2;
/// Payload `threads: u32, n: u32`: that many threads each `dispatch` `n`
/// messages `(thread: u32, i: u32)` at once; answers at once.
const CMD_BURST_THREADS: u16 = 3;
const MSG_BURST: u32 = 10;
const MSG_DRAINED: u32 = 11;

const T: Duration = Duration::from_secs(30);
const EP: &str = "COROIPC_OUTBOUND_TEST_EP";
/// `disconnect` or `wait:<ms>`.
const POLICY: &str = "COROIPC_OUTBOUND_TEST_POLICY";
const BOUND: &str = "COROIPC_OUTBOUND_TEST_BOUND";

fn burst(conn: &Connection, n: u32, size: u32) -> (u32, Result<(), DispatchError>) {
    let mut msg = vec![0xa5u8; size.max(4) as usize];
    for i in 0..n {
        msg[..4].copy_from_slice(&i.to_le_bytes());
        if let Err(e) = conn.dispatch(MSG_BURST, &msg) {
            return (i, Err(e));
        }
    }
    (n, Ok(()))
}

#[test]
#[ignore = "helper: run by the tests as a child process"]
fn outbound_server_process() {
    let Ok(ep) = std::env::var(EP) else { return };
    std::thread::spawn(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        std::process::exit(0);
    });
    let overflow = match std::env::var(POLICY).as_deref() {
        Ok(p) if p.starts_with("wait:") => {
            OverflowPolicy::Wait(Duration::from_millis(p[5..].parse().expect("wait:<ms>")))
        }
        _ => OverflowPolicy::Disconnect,
    };
    let max_queued_bytes = std::env::var(BOUND).ok().and_then(|b| b.parse().ok()).unwrap_or(1 << 20);
    let service = ServiceBuilder::new(SVC, |_| Ok(()))
        .outbound(OutboundLimits { max_queued_bytes, overflow })
        .handler(CMD_BURST, |call| {
            let p = call.payload();
            let (sent, r) = burst(call.connection(), le_u32(p, 0), le_u32(p, 4));
            let conn = call.connection().clone();
            let error = if r.is_ok() { 0 } else { sent + 1 };
            // After a refusal, is a further message refused too (not queued)?
            let after = u32::from(r.is_err() && conn.dispatch(MSG_BURST, b"later").is_err());
            let mut answer = (conn.queued_messages() as u32).to_le_bytes().to_vec();
            answer.extend_from_slice(&(conn.queued_bytes() as u32).to_le_bytes());
            answer.extend_from_slice(&error.to_le_bytes());
            answer.extend_from_slice(&after.to_le_bytes());
            let _ = call.respond(&answer);
        })
        .handler(CMD_BURST_THREAD, |call| {
            let p = call.payload();
            let (n, size) = (le_u32(p, 0), le_u32(p, 4));
            let conn = call.connection().clone();
            std::thread::spawn(move || {
                let (sent, r) = burst(&conn, n, size);
                let error = match r {
                    Ok(()) => "none".to_string(),
                    Err(e) => format!("{e:?}"),
                };
                report("BURST_DONE", &format!("error={error} sent={sent}"));
            });
            let _ = call.respond(b"");
        })
        .handler(CMD_BURST_THREADS, |call| {
            let p = call.payload();
            let (threads, n) = (le_u32(p, 0), le_u32(p, 4));
            for t in 0..threads {
                let conn = call.connection().clone();
                std::thread::spawn(move || {
                    for i in 0..n {
                        let msg = [t.to_le_bytes(), i.to_le_bytes()].concat();
                        conn.dispatch(MSG_BURST, &msg).expect("within the bound");
                    }
                });
            }
            let _ = call.respond(b"");
        })
        .handler(CMD_ON_DRAINED, |call| {
            call.connection().on_drained(|conn| {
                let _ = conn.dispatch(MSG_DRAINED, b"drained");
            });
            let _ = call.respond(b"");
        });
    let server = Server::builder().endpoint(&ep).service(service).build().expect("build");
    report("READY", "");
    server.run().expect("run");
}

fn start(envs: &[(&str, String)]) -> (ChildProc, String) {
    static N: AtomicU64 = AtomicU64::new(0);
    let ep = format!("@coroipc-outbound-it-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let mut all = vec![(EP, ep.clone())];
    all.extend(envs.iter().cloned());
    let mut proc = coroipc_testkit::spawn("outbound_server_process", &all);
    proc.expect("READY", Duration::from_secs(20));
    (proc, ep)
}

/// A client with a small (4 KiB) dispatch ring.
fn small_client(ep: &str) -> Client {
    Client::builder(ep, SVC)
        .sizes(Sizes { max_message_bytes: 512, dispatch_ring_bytes: 4096, ..Sizes::default() })
        .connect()
        .expect("connect")
}

fn args(n: u32, size: u32) -> Vec<u8> {
    [n.to_le_bytes(), size.to_le_bytes()].concat()
}

/// Receives `n` burst messages; checks indices and sequence numbers.
fn receive_burst(client: &Client, n: u32, first_seq: u64) {
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + T;
    for i in 0..n {
        let left = deadline.saturating_duration_since(Instant::now());
        let info =
            client.recv_dispatch(&mut buf, Some(left)).unwrap_or_else(|e| panic!("message {i}: {e:?}"));
        assert_eq!(info.id, MSG_BURST);
        assert_eq!(le_u32(&buf, 0), i, "in order, none lost");
        assert_eq!(info.seq, first_seq + u64::from(i), "consecutive sequence numbers");
    }
}

#[test]
fn dispatch_queues_past_a_full_ring_in_order_and_the_client_sees_flow_control_until_drained() {
    let (_server, ep) = start(&[]);
    let client = small_client(&ep);
    let mut answer = [0u8; 16];
    // 400 messages of 100 bytes: ~45 KB, ten times the ring.
    client.call(CMD_BURST, &args(400, 100), &mut answer).expect("burst");
    let (queued, bytes, error) = (le_u32(&answer, 0), le_u32(&answer, 4), le_u32(&answer, 8));
    assert_eq!(error, 0, "every message accepted");
    assert!(queued > 0 && bytes > 0, "what the ring could not take waits in the queue");
    assert_eq!(client.dispatch_flow_control(), FlowState::On, "queued messages: flow control on");
    client.call(CMD_ON_DRAINED, b"", &mut answer).expect("register the callback");
    receive_burst(&client, 400, 0);
    // The drained callback's message comes after every queued one.
    let mut buf = [0u8; 64];
    let info = client.recv_dispatch(&mut buf, Some(T)).expect("the drained notification");
    assert_eq!((info.id, &buf[..info.len]), (MSG_DRAINED, &b"drained"[..]));
    assert_eq!(client.dispatch_flow_control(), FlowState::Off, "drained: flow control off");
}

#[test]
fn under_the_disconnect_policy_a_client_over_the_bound_is_disconnected_not_silently_dropped() {
    let (_server, ep) = start(&[(BOUND, "8192".into())]);
    let client = small_client(&ep);
    let mut answer = [0u8; 16];
    client.call(CMD_BURST, &args(400, 100), &mut answer).expect("burst");
    let error = le_u32(&answer, 8);
    assert!(error > 0, "the burst was refused once the queue was over its bound");
    assert_eq!(le_u32(&answer, 12), 1, "a client being disconnected gets nothing more queued");
    // What was delivered is complete and in order up to the cut; then the
    // connection ends.
    let mut buf = [0u8; 512];
    let mut got = 0u32;
    let end = loop {
        match client.recv_dispatch(&mut buf, Some(T)) {
            Ok(info) => {
                assert_eq!(le_u32(&buf, 0), got, "no gap before the cut");
                assert_eq!(info.seq, u64::from(got));
                got += 1;
            }
            Err(e) => break e,
        }
    };
    assert!(got < error, "the refused message and those after it were never delivered");
    assert!(matches!(end, Error::Disconnected(DisconnectReason::TooSlow)), "the client learns why: {end:?}");
}

#[test]
fn under_the_wait_policy_the_dispatcher_waits_for_the_client_then_everything_arrives() {
    let (mut server, ep) = start(&[(POLICY, "wait:20000".into()), (BOUND, "2048".into())]);
    let client = small_client(&ep);
    client.call(CMD_BURST_THREAD, &args(400, 100), &mut [0u8; 4]).expect("burst");
    // The dispatcher is stuck on the bound until we read.
    std::thread::sleep(Duration::from_millis(200));
    assert!(!server.saw("BURST_DONE", "error", "none"), "waits while the client does not read");
    receive_burst(&client, 400, 0);
    let done = server.expect("BURST_DONE", T);
    assert_eq!(field(&done, "error"), "none");
    assert_eq!(num(&done, "sent"), 400);
}

#[test]
fn under_the_wait_policy_a_client_that_never_reads_makes_the_dispatch_time_out_and_stays_connected() {
    let (mut server, ep) = start(&[(POLICY, "wait:300".into()), (BOUND, "2048".into())]);
    let client = small_client(&ep);
    client.call(CMD_BURST_THREAD, &args(400, 100), &mut [0u8; 4]).expect("burst");
    let done = server.expect("BURST_DONE", T);
    assert_eq!(field(&done, "error"), "Timeout", "{done}");
    let sent = num(&done, "sent") as u32;
    assert!(sent > 0 && sent < 400);
    // The accepted ones all arrive; the refused one never does.
    receive_burst(&client, sent, 0);
    let r = client.recv_dispatch(&mut [0u8; 512], Some(Duration::from_millis(200)));
    assert!(matches!(r, Err(Error::Timeout)), "nothing past the refused message: {r:?}");
    assert!(client.is_connected());
}

#[test]
fn concurrent_dispatchers_through_the_queue_keep_each_threads_order_and_consecutive_numbers() {
    let (_server, ep) = start(&[]);
    let client = small_client(&ep);
    let (threads, n) = (4u32, 500u32);
    client.call(CMD_BURST_THREADS, &args(threads, n), &mut [0u8; 4]).expect("burst");
    let mut next = vec![0u32; threads as usize];
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + T;
    for k in 0..u64::from(threads * n) {
        if k % 100 == 0 {
            std::thread::sleep(Duration::from_millis(2)); // a slowish reader: the queue is used
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let info =
            client.recv_dispatch(&mut buf, Some(left)).unwrap_or_else(|e| panic!("message {k}: {e:?}"));
        assert_eq!(info.seq, k, "consecutive sequence numbers in arrival order");
        let (t, i) = (le_u32(&buf, 0) as usize, le_u32(&buf, 4));
        assert_eq!(i, next[t], "thread {t}'s messages in its order, none lost");
        next[t] += 1;
    }
    assert!(next.iter().all(|&c| c == n));
}
