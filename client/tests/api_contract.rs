//! The client's contract where several threads, zero-copy guards, an
//! application's own poll loop and an async runtime meet, with the server
//! in a separate process:
//!
//! * the dispatch fd is level-triggered from connect on: readable exactly
//!   while a dispatch message is pending, also before any receive, and
//!   readable once the server is gone;
//! * a thread holding a zero-copy guard that calls on its own client gets
//!   `GuardHeld` instead of hanging, other threads' timeouts bound their
//!   whole call (lock wait included), and a dispatch guard never blocks
//!   calls;
//! * calls from several threads are pipelined: each waits for its own
//!   answer, not behind another thread's slow one;
//! * the async client's call yields to the runtime while it waits, honours
//!   `tokio::time::timeout`, and a dropped call leaves the connection
//!   usable with its late answer discarded.
#![allow(missing_docs)]

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use coroipc_client::{Client, Error};
use coroipc_server::{Responder, Server, ServiceBuilder};
use coroipc_testkit::child::{report, spawn, ChildProc};
use rustix::event::{poll, PollFd, PollFlags, Timespec};

const SERVICE: u16 = 7;
const ECHO: u16 = 0;
/// Deferred until a `RELEASE`.
const PARK: u16 = 1;
/// Answers every parked request with its own payload, then itself.
const RELEASE: u16 = 2;
/// Answered with its payload 300 ms later, from another thread.
const SLOW: u16 = 3;
/// Queues `n` dispatch messages (payload: n as u64), each carrying its
/// index, then answers.
const QUEUE: u16 = 4;
/// Answers the number of parked requests (u64).
const PARKED: u16 = 5;

const T: Duration = Duration::from_secs(10);

/// Requests the server answers on `RELEASE`, with their payloads.
type Parked = Arc<Mutex<Vec<(Responder, Vec<u8>)>>>;

/// The server process.
#[test]
#[ignore = "helper: runs as the server child process"]
fn server_process() {
    let Ok(endpoint) = std::env::var("COROIPC_TEST_ENDPOINT") else { return };
    let parked: Parked = Arc::default();
    let releaser = parked.clone();
    let counter = parked.clone();
    let service = ServiceBuilder::new(SERVICE, |_| Ok(()))
        .handler(ECHO, |call| {
            let p = call.payload();
            let _ = call.respond(p);
        })
        .handler(PARK, move |call| {
            let payload = call.payload().to_vec();
            parked.lock().unwrap().push((call.defer(), payload));
        })
        .handler(RELEASE, move |call| {
            for (responder, payload) in std::mem::take(&mut *releaser.lock().unwrap()) {
                let _ = responder.respond(&payload);
            }
            let _ = call.respond(&[]);
        })
        .handler(SLOW, |call| {
            let payload = call.payload().to_vec();
            let responder = call.defer();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                let _ = responder.respond(&payload);
            });
        })
        .handler(PARKED, move |call| {
            let n = counter.lock().unwrap().len() as u64;
            let _ = call.respond(&n.to_le_bytes());
        })
        .handler(QUEUE, |call| {
            let n = u64::from_le_bytes(call.payload()[..8].try_into().unwrap());
            for i in 0..n {
                call.connection().dispatch(1, &i.to_le_bytes()).unwrap();
            }
            let _ = call.respond(&[]);
        });
    let server = Server::builder().endpoint(&endpoint).service(service).build().expect("server");
    report("READY", "");
    server.run().expect("server loop");
}

fn start(tag: &str) -> (ChildProc, String) {
    let endpoint = format!("@coroipc-client-contract-{}-{tag}", std::process::id());
    let mut child = spawn("server_process", &[("COROIPC_TEST_ENDPOINT", endpoint.clone())]);
    child.expect("READY", T);
    (child, endpoint)
}

/// Whether `fd` is readable within `timeout`.
fn readable(fd: &impl AsFd, timeout: Duration) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let ts = Timespec::try_from(timeout).unwrap();
    poll(&mut fds, Some(&ts)).expect("poll") == 1
}

fn queue(client: &Client, n: u64) {
    let mut buf = [0u8; 8];
    client.call(QUEUE, &n.to_le_bytes(), &mut buf).expect("queue dispatch messages");
}

#[test]
fn the_dispatch_fd_is_level_triggered_from_connect_on() {
    let (mut server, ep) = start("level");
    let client = Client::connect(&ep, SERVICE).expect("connect");
    assert!(!readable(&client, Duration::ZERO), "nothing pending yet: not readable");
    // Messages queued before the application ever received: poll first.
    queue(&client, 3);
    assert!(readable(&client, T), "messages pending: readable before any receive");
    let mut buf = [0u8; 8];
    for i in 0..3u64 {
        assert!(readable(&client, Duration::ZERO), "message {i} pending: readable");
        let info = client.try_recv_dispatch(&mut buf).expect("a pending message");
        assert_eq!(u64::from_le_bytes(buf), i);
        assert_eq!(info.len, 8);
    }
    assert!(matches!(client.try_recv_dispatch(&mut buf), Err(Error::TryAgain)));
    assert!(!readable(&client, Duration::ZERO), "drained: not readable");
    // The same through the zero-copy receive.
    queue(&client, 2);
    assert!(readable(&client, T), "readable again");
    drop(client.try_recv_dispatch_in_place().expect("first"));
    assert!(readable(&client, Duration::ZERO), "one still pending");
    drop(client.try_recv_dispatch_in_place().expect("second"));
    assert!(matches!(client.try_recv_dispatch_in_place(), Err(Error::TryAgain)));
    assert!(!readable(&client, Duration::ZERO), "drained again");
    // A blocking receive that finds the message leaves the fd as it found
    // the ring.
    queue(&client, 2);
    client.recv_dispatch(&mut buf, Some(T)).expect("blocking receive");
    assert!(readable(&client, Duration::ZERO), "one still pending after a blocking receive");
    client.recv_dispatch(&mut buf, Some(T)).expect("blocking receive");
    assert!(matches!(client.try_recv_dispatch(&mut buf), Err(Error::TryAgain)));
    assert!(!readable(&client, Duration::ZERO), "drained after the blocking receives");
    // The server goes away: readable, and the receive says why.
    server.kill();
    assert!(readable(&client, T), "a dead server makes the fd readable");
    assert!(matches!(client.try_recv_dispatch(&mut buf), Err(Error::Disconnected(_))));
}

#[test]
fn a_guard_never_deadlocks_its_own_client_and_timeouts_bound_the_whole_call() {
    let (_server, ep) = start("guards");
    let client = Arc::new(Client::connect(&ep, SERVICE).expect("connect"));
    let mut buf = [0u8; 16];

    // A dispatch guard does not stand in the way of calls.
    queue(&client, 1);
    let dispatch = client.recv_dispatch_in_place(Some(T)).expect("dispatch message");
    assert_eq!(client.call(ECHO, b"beside", &mut buf).expect("call beside a dispatch guard"), 6);
    assert_eq!(&buf[..6], b"beside");
    // ... but a second dispatch receive on the guard's thread cannot
    // proceed: a typed error, not a hang.
    assert!(matches!(client.try_recv_dispatch(&mut buf), Err(Error::GuardHeld)));
    drop(dispatch);

    // A response guard: calls on the same thread get GuardHeld at once.
    let guard = client.call_in_place(ECHO, &[std::io::IoSlice::new(b"held")], Some(T)).expect("in place");
    assert_eq!(&guard[..], b"held");
    assert!(matches!(client.call(ECHO, b"x", &mut buf), Err(Error::GuardHeld)));
    assert!(matches!(
        client.call_timeout(ECHO, &[std::io::IoSlice::new(b"x")], &mut buf, Some(T)),
        Err(Error::GuardHeld)
    ));
    // Another thread's call is bounded by its timeout while the guard is
    // held: it reports Timeout while this thread still holds the guard.
    let (tx, rx) = mpsc::channel();
    let other = client.clone();
    let waiter = std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        let r = other.call_timeout(
            ECHO,
            &[std::io::IoSlice::new(b"late")],
            &mut buf,
            Some(Duration::from_millis(300)),
        );
        tx.send(r.map(|n| buf[..n].to_vec())).unwrap();
    });
    let r = rx.recv_timeout(T).expect("the other thread's call returned while the guard is held");
    assert!(matches!(r, Err(Error::Timeout)), "bounded by its timeout: {r:?}");
    assert_eq!(&guard[..], b"held", "the guard still shows its response");
    drop(guard);
    waiter.join().unwrap();
    // The connection is fine afterwards; the timed-out call's late answer
    // is not taken for this one.
    assert_eq!(client.call(ECHO, b"after", &mut buf).expect("call after the guard"), 5);
    assert_eq!(&buf[..5], b"after");
}

/// Waits until the server holds `n` parked requests.
fn await_parked(client: &Client, n: u64) {
    let started = std::time::Instant::now();
    loop {
        let mut count = [0u8; 8];
        client.call(PARKED, &[], &mut count).expect("count parked requests");
        if u64::from_le_bytes(count) == n {
            return;
        }
        assert!(started.elapsed() < T, "the parked request reached the server");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_sleeping_call_times_out_on_time_while_another_thread_holds_a_response_guard() {
    let (_server, ep) = start("guard-sleeper");
    let client = Arc::new(Client::connect(&ep, SERVICE).expect("connect"));
    // A call the server never answers, sleeping for it with a 500 ms timeout.
    let (tx, rx) = mpsc::channel();
    let waiter = {
        let client = client.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8];
            let r = client.call_timeout(
                PARK,
                &[std::io::IoSlice::new(b"never")],
                &mut buf,
                Some(Duration::from_millis(500)),
            );
            tx.send(r.map(drop)).unwrap();
        })
    };
    await_parked(&client, 1);
    std::thread::sleep(Duration::from_millis(20)); // the waiter is asleep
                                                   // This thread takes an answer in place and keeps it: the waiter's
                                                   // timeout still ends its call (it never needs the lock past it).
    let guard = client.call_in_place(ECHO, &[std::io::IoSlice::new(b"held")], Some(T)).expect("in place");
    let r = rx.recv_timeout(T).expect("the waiting call returned while the guard is held");
    assert!(matches!(r, Err(Error::Timeout)), "its own timeout: {r:?}");
    assert_eq!(&guard[..], b"held");
    drop(guard);
    waiter.join().unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(client.call(ECHO, b"after", &mut buf).expect("usable after"), 5);
}

#[test]
fn calls_from_several_threads_are_pipelined() {
    let (_server, ep) = start("pipelined");
    let client = Arc::new(Client::connect(&ep, SERVICE).expect("connect"));
    let parked = {
        let client = client.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            let n = client.call_timeout(PARK, &[std::io::IoSlice::new(b"parked")], &mut buf, Some(T))?;
            Ok::<_, Error>(buf[..n].to_vec())
        })
    };
    // Once the server holds it, the parked call stays unanswered until
    // RELEASE. Meanwhile calls from other threads are answered at once
    // (each waits for its own answer).
    await_parked(&client, 1);
    let answered = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..3u8)
        .map(|t| {
            let client = client.clone();
            let answered = answered.clone();
            std::thread::spawn(move || {
                for i in 0..50u8 {
                    let mut buf = [0u8; 2];
                    let n = client
                        .call_timeout(ECHO, &[std::io::IoSlice::new(&[t, i])], &mut buf, Some(T))
                        .expect("an echo beside a parked call");
                    assert_eq!(&buf[..n], &[t, i], "each thread gets its own answer");
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for c in callers {
        c.join().expect("caller");
    }
    assert_eq!(answered.load(Ordering::Relaxed), 150);
    assert!(!parked.is_finished(), "the parked call is still waiting for its answer");
    let mut buf = [0u8; 4];
    client.call(RELEASE, &[], &mut buf).expect("release");
    assert_eq!(parked.join().unwrap().expect("the parked call gets its answer"), b"parked");
}

#[cfg(feature = "tokio")]
mod async_client {
    use super::*;
    use coroipc_client::AsyncClient;

    #[test]
    fn a_waiting_call_yields_to_the_runtime_and_honours_timeouts() {
        let (_server, ep) = start("async");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let client = AsyncClient::connect(&ep, SERVICE).await.expect("connect");
            let ticks = Arc::new(AtomicU64::new(0));
            let ticker = {
                let ticks = ticks.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        ticks.fetch_add(1, Ordering::Relaxed);
                    }
                })
            };
            // A 300 ms call on a current-thread runtime: the ticker runs
            // meanwhile (a call that blocked the thread would let it run 0
            // times).
            let answer = client.call(SLOW, b"slow").await.expect("slow call");
            assert_eq!(answer, b"slow");
            let during = ticks.load(Ordering::Relaxed);
            assert!(during >= 10, "the runtime ran other tasks during the call ({during} ticks)");

            // A timeout around a call fires; dropping the call mid-wait
            // leaves the connection usable and its late answer is discarded.
            let r = tokio::time::timeout(Duration::from_millis(50), client.call(SLOW, b"dropped")).await;
            assert!(r.is_err(), "the timeout fired");
            assert_eq!(client.call(ECHO, b"next").await.expect("call after a cancelled one"), b"next");
            tokio::time::sleep(Duration::from_millis(400)).await; // the late answer arrives
            assert_eq!(client.call(ECHO, b"again").await.expect("and after its late answer"), b"again");
            ticker.abort();
        });
    }
}

#[test]
fn connect_errors_name_the_endpoint_and_the_service_and_compare_equal() {
    let ep = format!("@coroipc-client-contract-nobody-{}", std::process::id());
    let err = Client::connect(&ep, 3).expect_err("nobody listens");
    assert!(matches!(err, Error::Io(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&ep) && text.contains("service 3"), "the message names both: {text}");
    assert_eq!(err.clone(), err, "errors are Clone + PartialEq");
    assert_ne!(err, Error::Timeout);
    assert_eq!(
        Error::Disconnected(coroipc_client::DisconnectReason::ServerDied).clone(),
        Error::Disconnected(coroipc_client::DisconnectReason::ServerDied)
    );
}
