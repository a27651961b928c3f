//! The shipped counter example (`examples/counter_server.rs`, compiled
//! into this test) run as a real server process, with client threads in
//! the test process: one client that never reads its notifications must
//! not slow or starve the others, bad input gets an error answer, and the
//! server stays up.

#![allow(missing_docs)]

#[allow(dead_code)]
#[path = "../examples/counter_server.rs"]
mod counter_server;

use std::time::{Duration, Instant};

use coroipc_client::{Client, DisconnectReason, Error, Sizes};
use coroipc_testkit::{report, ChildProc};

const SVC: u16 = 2;
const CMD_ADD: u16 = 0;
const CMD_GET: u16 = 1;
const MSG_CHANGED: u32 = 1;
const T: Duration = Duration::from_secs(60);
const EP: &str = "COROIPC_COUNTER_TEST_EP";

/// The example's server, in a child process.
#[test]
#[ignore = "helper: run by the tests as a child process"]
fn counter_server_process() {
    let Ok(ep) = std::env::var(EP) else { return };
    std::thread::spawn(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        std::process::exit(0);
    });
    // Tell the parent once the endpoint is bound: connect until it answers.
    let probe_ep = ep.clone();
    std::thread::spawn(move || loop {
        if Client::connect(&probe_ep, SVC).is_ok() {
            report("READY", "");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    });
    counter_server::run(&ep).expect("the counter server");
}

fn start() -> (ChildProc, String) {
    let ep = format!("@coroipc-counter-it-{}-{}", std::process::id(), rand_tag());
    let mut proc = coroipc_testkit::spawn("counter_server_process", &[(EP, ep.clone())]);
    proc.expect("READY", Duration::from_secs(20));
    (proc, ep)
}

fn rand_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn call_i64(client: &Client, cmd: u16, arg: &[u8]) -> Result<i64, Error> {
    let mut buf = [0u8; 8];
    let n = client.call(cmd, arg, &mut buf)?;
    assert_eq!(n, 8, "the counter answers an i64");
    Ok(i64::from_le_bytes(buf))
}

#[test]
fn a_client_that_never_reads_does_not_slow_or_starve_a_reader() {
    const N: i64 = 10_000;
    let (_server, ep) = start();
    // The stalled client: a small dispatch ring, never read.
    let stalled = Client::builder(&ep, SVC)
        .sizes(Sizes { max_message_bytes: 256, dispatch_ring_bytes: 4096, ..Sizes::default() })
        .connect()
        .expect("connect the stalled client");
    call_i64(&stalled, CMD_GET, b"").expect("registered"); // its connect callback ran
                                                           // The reader, on its own thread: every notification, in order.
    let reader = Client::connect(&ep, SVC).expect("connect the reader");
    assert_eq!(call_i64(&reader, CMD_GET, b"").expect("get"), 0);
    let reading = std::thread::spawn(move || {
        let mut buf = [0u8; 8];
        let mut next_seq = None;
        // One deadline for all of them: a reader slowed to one notification
        // a second by the stalled client would take hours.
        let deadline = Instant::now() + T;
        for want in 1..=N {
            let left = deadline.saturating_duration_since(Instant::now());
            let info = reader.recv_dispatch(&mut buf, Some(left)).unwrap_or_else(|e| {
                panic!("notification {want} of {N} did not arrive within {T:?} of the first: {e:?}")
            });
            assert_eq!(info.id, MSG_CHANGED);
            assert_eq!(i64::from_le_bytes(buf), want, "every change, in order, none lost");
            if let Some(s) = next_seq {
                assert_eq!(info.seq, s, "consecutive sequence numbers");
            }
            next_seq = Some(info.seq + 1);
        }
        reader
    });
    let adder = Client::connect(&ep, SVC).expect("connect the adder");
    for i in 1..=N {
        assert_eq!(call_i64(&adder, CMD_ADD, &1i64.to_le_bytes()).expect("add"), i);
    }
    let _reader = reading.join().expect("the reader got all notifications");
    // The stalled client was cut off for being too slow, after the
    // notifications its ring and the bounded queue could hold.
    let mut buf = [0u8; 8];
    let mut got = 0;
    let end = loop {
        match stalled.recv_dispatch(&mut buf, Some(T)) {
            Ok(info) => {
                got += 1;
                assert_eq!(i64::from_le_bytes(buf), got, "what it got is complete and in order");
                assert_eq!(info.seq, got as u64 - 1, "no gap before the cut");
            }
            Err(e) => break e,
        }
    };
    assert!(got < N, "the stalled client cannot have been sent everything (got {got})");
    assert!(
        matches!(end, Error::Disconnected(DisconnectReason::TooSlow)),
        "then it is told it was too slow: {end:?}"
    );
}

#[test]
fn bad_input_gets_an_error_answer_and_the_server_stays_up() {
    let (mut server, ep) = start();
    let client = Client::connect(&ep, SVC).expect("connect");
    assert_eq!(call_i64(&client, CMD_ADD, &i64::MAX.to_le_bytes()).expect("add"), i64::MAX);
    let r = call_i64(&client, CMD_ADD, &1i64.to_le_bytes());
    assert!(
        matches!(r, Err(Error::Service(c)) if c == counter_server::ERR_OVERFLOW),
        "overflow is an error answer: {r:?}"
    );
    let r = call_i64(&client, CMD_ADD, b"abc");
    assert!(matches!(r, Err(Error::Invalid)), "a malformed amount is invalid: {r:?}");
    assert_eq!(call_i64(&client, CMD_GET, b"").expect("the server is still up"), i64::MAX);
    assert!(server.is_running());
}
