//! Pipelined requests, with the server in a separate process:
//! many requests in flight answered out of order from another server
//! thread, mixed with synchronous calls, fire-and-forget, and the async
//! client under tokio.

use std::collections::HashMap;
use std::io::IoSlice;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coroipc_client::{Client, Error};
use coroipc_server::{Responder, Server, ServiceBuilder};

const SERVICE: u16 = 5;
const ECHO: u16 = 0;
/// Deferred: answered later, in shuffled batches, by another thread.
const SHUFFLED: u16 = 1;
/// Fire-and-forget: counted.
const COUNT: u16 = 2;
/// Returns the number of `COUNT` requests seen.
const GET_COUNT: u16 = 3;
/// Dispatches `n` messages (payload: n as u64), each carrying its index.
const DISPATCH: u16 = 4;

/// Requests the server answers later, with their payloads.
type Deferred = Vec<(Responder, Vec<u8>)>;

/// A child process running the test server; killed on drop.
struct ServerProc {
    child: Child,
    endpoint: String,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(tag: &str) -> ServerProc {
    let endpoint = format!("@coroipc-client-pipeline-{}-{tag}", std::process::id());
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--ignored", "--exact", "server_process", "--nocapture", "--test-threads=1"])
        .env("COROIPC_TEST_ENDPOINT", &endpoint)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the server process");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    while !line.contains("READY") {
        line.clear();
        assert!(out.read_line(&mut line).expect("read") > 0, "server process died");
    }
    ServerProc { child, endpoint }
}

/// A deterministic shuffle (Fisher–Yates over the testkit's xorshift), so
/// failures replay.
fn shuffle<T>(v: &mut [T], rng: &mut coroipc_testkit::XorShift) {
    for i in (1..v.len()).rev() {
        v.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
}

/// The server process (run by the tests through re-execution).
#[test]
#[ignore = "helper: runs as the server child process"]
fn server_process() {
    let Ok(endpoint) = std::env::var("COROIPC_TEST_ENDPOINT") else { return };
    let pending: Arc<Mutex<Deferred>> = Arc::default();
    let answerer = pending.clone();
    std::thread::spawn(move || {
        let mut seed = coroipc_testkit::XorShift::new(0x2545_f491_4f6c_dd1d);
        loop {
            std::thread::sleep(Duration::from_millis(2));
            let mut batch = std::mem::take(&mut *answerer.lock().unwrap());
            shuffle(&mut batch, &mut seed);
            for (responder, payload) in batch {
                let _ = responder.respond(&payload);
            }
        }
    });
    let service = ServiceBuilder::new(SERVICE, |_| Ok(0u64))
        .handler(ECHO, |call| {
            let p = call.payload();
            let _ = call.respond(p);
        })
        .handler(SHUFFLED, move |call| {
            let payload = call.payload().to_vec();
            pending.lock().unwrap().push((call.defer(), payload));
        })
        .handler(COUNT, |mut call| {
            *call.state() += 1;
        })
        .handler(GET_COUNT, |mut call| {
            let n = *call.state();
            let _ = call.respond(&n.to_le_bytes());
        })
        .handler(DISPATCH, |call| {
            let n = u64::from_le_bytes(call.payload()[..8].try_into().unwrap());
            let conn = call.connection().clone();
            let _ = call.respond(&[]);
            std::thread::spawn(move || {
                for i in 0..n {
                    conn.dispatch_vectored_timeout(
                        1,
                        &[IoSlice::new(&i.to_le_bytes())],
                        Duration::from_secs(10),
                    )
                    .unwrap();
                }
            });
        });
    let server = Server::builder().endpoint(&endpoint).service(service).build().expect("server");
    println!("READY");
    server.run().expect("server loop");
}

#[test]
fn ten_thousand_pipelined_requests_answered_in_shuffled_order_match_their_requests() {
    let srv = spawn_server("shuffle");
    let client = Client::builder(&srv.endpoint, SERVICE).max_in_flight(256).connect().unwrap();
    let mut expected = HashMap::new();
    let (mut sent, mut done, mut out_of_order) = (0u64, 0u64, 0u64);
    let mut last = 0u64;
    let mut buf = [0u8; 64];
    while done < 10_000 {
        while sent < 10_000 && client.in_flight() < 256 {
            let payload = (sent * 7 + 1).to_le_bytes();
            let ticket = client
                .send_vectored(SHUFFLED, &[IoSlice::new(&payload)], Some(Duration::from_secs(5)))
                .unwrap();
            expected.insert(ticket, payload);
            sent += 1;
        }
        let (ticket, result) = client.wait_any(&mut buf, Some(Duration::from_secs(10))).unwrap();
        let n = result.unwrap();
        let want = expected.remove(&ticket).expect("each ticket answered once");
        assert_eq!(&buf[..n], &want, "response {ticket:?} matches its request");
        out_of_order += u64::from(ticket.0 < last);
        last = ticket.0;
        done += 1;
    }
    assert!(expected.is_empty());
    assert!(out_of_order > 100, "the server really answered out of order ({out_of_order} inversions)");
}

#[test]
fn synchronous_calls_work_while_pipelined_requests_are_in_flight() {
    let srv = spawn_server("mixed");
    let client = Client::connect(&srv.endpoint, SERVICE).unwrap();
    let mut tickets = Vec::new();
    for i in 0..50u64 {
        tickets.push((client.send_vectored(SHUFFLED, &[IoSlice::new(&i.to_le_bytes())], None).unwrap(), i));
    }
    let mut buf = [0u8; 16];
    for i in 0..200u64 {
        let n = client.call(ECHO, &(1000 + i).to_le_bytes(), &mut buf).unwrap();
        assert_eq!(&buf[..n], &(1000 + i).to_le_bytes(), "the sync call gets its own response");
    }
    for (ticket, i) in tickets.into_iter().rev() {
        let n = client.wait(ticket, &mut buf, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(&buf[..n], &i.to_le_bytes(), "pipelined response {i} kept for its ticket");
    }
    assert_eq!(client.in_flight(), 0);
    assert!(matches!(client.wait(coroipc_client::Ticket(1), &mut buf, None), Err(Error::Invalid)));
}

#[test]
fn fire_and_forget_requests_arrive_and_get_no_response() {
    let srv = spawn_server("oneway");
    let client = Client::connect(&srv.endpoint, SERVICE).unwrap();
    for _ in 0..1000 {
        client.send_oneway_vectored(COUNT, &[IoSlice::new(b"x")], Some(Duration::from_secs(5))).unwrap();
    }
    let mut buf = [0u8; 8];
    // Requests on one connection are handled in order: the count is final.
    let n = client.call(GET_COUNT, &[], &mut buf).unwrap();
    assert_eq!(u64::from_le_bytes(buf[..n].try_into().unwrap()), 1000);
    assert_eq!(client.in_flight(), 0, "no response is pending for oneway requests");
}

#[cfg(feature = "tokio")]
#[test]
fn async_client_makes_concurrent_calls_and_streams_dispatch() {
    use coroipc_client::AsyncClient;
    use std::future::poll_fn;
    use std::pin::Pin;

    let srv = spawn_server("async");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let client = Arc::new(AsyncClient::connect(&srv.endpoint, SERVICE).await.unwrap());
        // 64 tasks × 50 calls, half deferred and shuffled by the server.
        let mut tasks = Vec::new();
        for t in 0..64u64 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50u64 {
                    let v = (t << 32 | i).to_le_bytes();
                    let cmd = if i % 2 == 0 { ECHO } else { SHUFFLED };
                    let r = client.call(cmd, &v).await.unwrap();
                    assert_eq!(r, v, "task {t} call {i} got its own response");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(client.in_flight(), 0);
        // A dispatch stream: 20,000 messages in order.
        client.call(DISPATCH, &20_000u64.to_le_bytes()).await.unwrap();
        let mut stream = client.dispatch();
        for i in 0..20_000u64 {
            let next = tokio::time::timeout(
                Duration::from_secs(10),
                poll_fn(|cx| futures_core::Stream::poll_next(Pin::new(&mut stream), cx)),
            )
            .await
            .expect("dispatch arrives")
            .expect("stream open")
            .unwrap();
            assert_eq!(next.payload, i.to_le_bytes(), "dispatch {i} in order");
        }
    });
}

#[test]
fn a_pipelined_response_too_big_for_the_buffer_stays_with_its_ticket() {
    let srv = spawn_server("keep");
    let client = Client::connect(&srv.endpoint, SERVICE).unwrap();
    let ticket = client.send_vectored(ECHO, &[IoSlice::new(&[9u8; 40])], None).unwrap();
    let mut small = [0u8; 8];
    let r = client.wait(ticket, &mut small, Some(Duration::from_secs(5)));
    assert!(matches!(r, Err(Error::BufferTooSmall { needed: 40 })), "{r:?}");
    assert_eq!(client.in_flight(), 1, "the ticket is still outstanding");
    let mut big = [0u8; 64];
    assert_eq!(client.wait(ticket, &mut big, None).unwrap(), 40);
    assert_eq!(&big[..40], &[9u8; 40]);
    assert_eq!(client.in_flight(), 0);
}

#[test]
fn a_non_blocking_connect_completes_through_polling_its_fd() {
    use std::os::fd::AsFd;
    let srv = spawn_server("nonblocking");
    let mut pending = Client::builder(&srv.endpoint, SERVICE).connect_nonblocking().unwrap();
    let mut polls = 0;
    while !pending.poll().unwrap() {
        polls += 1;
        assert!(polls < 1000, "the handshake completes");
        let fd = pending.as_fd();
        let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
        let ts = rustix::event::Timespec { tv_sec: 1, tv_nsec: 0 };
        let _ = rustix::event::poll(&mut fds, Some(&ts));
    }
    let client = pending.finish().unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(client.call(ECHO, b"nb", &mut buf).unwrap(), 2);
    assert_eq!(&buf[..2], b"nb");
    // Nobody listening: an error at once, not a hang.
    assert!(Client::builder("@coroipc-nobody-listens-here", SERVICE).connect_nonblocking().is_err());
}
