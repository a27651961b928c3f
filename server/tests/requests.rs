//! Requests and responses between a server process and client processes:
//! copying and zero-copy calls, vectored requests and responses, private
//! per-connection state, the selector, admission, unknown commands,
//! deferred and late responses, sizes and timeouts.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coroipc_client::{Client, Error, Sizes};
use coroipc_testkit::suite::api::*;

coroipc_testkit::api_children!();

const T: Duration = Duration::from_secs(10);

#[test]
fn call_copies_the_response_into_the_callers_buffer() {
    let mut server = start_server("call", &[]);
    let (client, _) = connect_echo(&server.ep);
    let mut buf = [0u8; 64];
    let n = client.call(CMD_ECHO, b"hello", &mut buf).expect("call");
    assert_eq!(&buf[..n], b"hello");
    // A gathered request arrives as one message.
    let n = client
        .call_vectored(CMD_ECHO, &[IoSlice::new(b"he"), IoSlice::new(b""), IoSlice::new(b"llo!")], &mut buf)
        .expect("vectored call");
    assert_eq!(&buf[..n], b"hello!");
    // An empty request and an empty response are fine.
    assert_eq!(client.call(CMD_ECHO, b"", &mut buf).expect("empty call"), 0);
    let stats = stats_fields(&server.stats());
    assert_eq!(stats["requests"], 3);
    assert_eq!(stats["responses"], 3);
}

#[test]
fn call_in_place_lends_the_response_until_the_guard_drops() {
    let server = start_server("inplace", &[]);
    let (client, _) = connect_echo(&server.ep);
    // Small response ring: if guards did not release their space, a few
    // dozen calls would fill it and the server would stop answering.
    for i in 0..200u32 {
        let payload = vec![i as u8; 1000];
        let guard =
            client.call_in_place(CMD_ECHO, &[IoSlice::new(&payload)], Some(T)).expect("zero-copy call");
        assert_eq!(&guard[..], &payload[..], "call {i}: the guard shows the response in place");
    }
    // Errors come back as errors, not as guards.
    let r = client.call_in_place(CMD_UNKNOWN, &[], Some(T));
    assert!(matches!(r, Err(Error::Invalid)), "{r:?}");
    echo(&client, b"still fine");
}

#[test]
fn respond_vectored_sends_the_concatenation_of_its_parts() {
    let server = start_server("respiov", &[]);
    let (client, _) = connect_echo(&server.ep);
    let mut buf = [0u8; 64];
    let n = client.call(CMD_ECHO_IOV, b"abc", &mut buf).expect("call");
    assert_eq!(&buf[..n], b"<abc>");
}

#[test]
fn private_state_belongs_to_one_connection_and_is_dropped_after_disconnect() {
    let mut server = start_server("state", &[]);
    let (a, a_id) = connect_echo(&server.ep);
    let (b, b_id) = connect_echo(&server.ep);
    assert_ne!(a_id, b_id);
    let count = |c: &Client| {
        let mut buf = [0u8; 8];
        c.call(CMD_COUNT, b"", &mut buf).expect("count");
        u64::from_le_bytes(buf)
    };
    assert_eq!([count(&a), count(&a), count(&a)], [1, 2, 3]);
    assert_eq!([count(&b), count(&b)], [1, 2], "b's counter is its own");
    assert_eq!(count(&a), 4);
    drop(a);
    server.proc.expect_with("DISCONNECT_DONE", "id", &a_id.to_string(), T);
    server.proc.expect_with("STATE_DROPPED", "id", &a_id.to_string(), T);
    assert!(!server.proc.saw("STATE_DROPPED", "id", &b_id.to_string()), "b's state lives on");
    assert_eq!(count(&b), 3);
}

#[test]
fn unknown_command_answers_invalid_and_keeps_the_connection() {
    let mut server = start_server("unknown", &[]);
    let (client, id) = connect_echo(&server.ep);
    let mut buf = [0u8; 16];
    for _ in 0..3 {
        let r = client.call(CMD_UNKNOWN, b"x", &mut buf);
        assert!(matches!(r, Err(Error::Invalid)), "{r:?}");
    }
    echo(&client, b"after");
    assert!(client.is_connected());
    let s = stats_fields(&server.conn_stats(id));
    assert_eq!(s["errors"], 3, "each unknown command counts as an error");
    assert_eq!(s["requests"], 4);
}

#[test]
fn selector_picks_the_handler_for_each_command() {
    let server = start_server("selector", &[]);
    let client = Client::connect(&server.ep, SVC_SELECTOR).expect("connect");
    let mut buf = [0u8; 16];
    for cmd in [0u16, 2, 40, 65534] {
        let n = client.call(cmd, b"even", &mut buf).expect("an even command has a handler");
        assert_eq!(&buf[..n], b"even");
    }
    for cmd in [1u16, 3, 65535] {
        let r = client.call(cmd, b"odd", &mut buf);
        assert!(matches!(r, Err(Error::Invalid)), "odd command {cmd}: {r:?}");
    }
}

#[test]
fn admission_veto_answers_without_running_the_handler() {
    let mut server = start_server("admission", &[]);
    let (client, id) = connect_echo(&server.ep);
    let mut buf = [0u8; 16];
    let r = client.call(CMD_VETO_TRY, b"", &mut buf);
    assert!(matches!(r, Err(Error::TryAgain)), "{r:?}");
    let r = client.call(CMD_VETO_INVALID, b"", &mut buf);
    assert!(matches!(r, Err(Error::Invalid)), "{r:?}");
    echo(&client, b"allowed");
    let s = stats_fields(&server.conn_stats(id));
    assert_eq!(s["retries"], 2, "both vetoes count as retries");
    assert_eq!(s["responses"], 3);
}

#[test]
fn service_errors_and_forgotten_answers_reach_the_client() {
    let server = start_server("status", &[]);
    let (client, _) = connect_echo(&server.ep);
    let mut buf = [0u8; 16];
    let r = client.call(CMD_SERVICE_ERROR, b"", &mut buf);
    assert!(matches!(r, Err(Error::Service(SERVICE_CODE))), "{r:?}");
    let r = client.call(CMD_FORGET, b"", &mut buf);
    assert!(matches!(r, Err(Error::Invalid)), "a dropped Call answers invalid: {r:?}");
    echo(&client, b"ok");
}

#[test]
fn deferred_responses_come_later_from_another_thread_in_any_order() {
    let mut server = start_server("defer", &[]);
    let (client, id) = connect_echo(&server.ep);
    let defer = |ms: u32, data: &[u8]| {
        let mut p = ms.to_le_bytes().to_vec();
        p.extend_from_slice(data);
        p
    };
    // One blocking call answered 100 ms later by another server thread.
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let n = client.call(CMD_DEFER, &defer(100, b"later"), &mut buf).expect("deferred call");
    assert_eq!(&buf[..n], b"later");
    assert!(start.elapsed() >= Duration::from_millis(100), "answered after the delay");
    server.proc.expect_with("DEFERRED", "id", &id.to_string(), T);
    // Pipelined: the slow request is answered after the fast one.
    let slow =
        client.send_vectored(CMD_DEFER, &[IoSlice::new(&defer(300, b"slow"))], Some(T)).expect("send slow");
    let fast =
        client.send_vectored(CMD_DEFER, &[IoSlice::new(&defer(10, b"fast"))], Some(T)).expect("send fast");
    assert_eq!(client.in_flight(), 2);
    let (first, r) = client.wait_any(&mut buf, Some(T)).expect("first answer");
    assert_eq!(first, fast, "the fast request is answered first");
    assert_eq!(&buf[..r.expect("fast ok")], b"fast");
    let n = client.wait(slow, &mut buf, Some(T)).expect("slow answer");
    assert_eq!(&buf[..n], b"slow");
    assert_eq!(client.in_flight(), 0);
    // The answering threads dispatched through their clone of the
    // connection too (the kept handle): three DISPATCH_LATE messages.
    let mut got = Vec::new();
    while got.len() < 3 {
        let info = client.recv_dispatch(&mut buf, Some(T)).expect("late dispatch");
        assert_eq!(info.id, DISPATCH_LATE);
        got.push(buf[..info.len].to_vec());
    }
    assert_eq!(got, [b"later".to_vec(), b"fast".to_vec(), b"slow".to_vec()]);
}

#[test]
fn a_late_response_to_a_departed_client_is_an_error_not_a_panic() {
    let mut server = start_server("late", &[]);
    let (client, id) = connect_echo(&server.ep);
    client.send_vectored(CMD_LATE_AFTER_CLOSE, &[], Some(T)).expect("send");
    server.proc.expect_with("LATE_PARKED", "id", &id.to_string(), T);
    drop(client);
    let late = server.proc.expect_with("LATE", "id", &id.to_string(), T);
    assert_eq!(field(&late, "gone"), "true", "the responder noticed the disconnect");
    assert_eq!(field(&late, "result"), "Err(Disconnected)");
    // The server lives on.
    let (other, _) = connect_echo(&server.ep);
    echo(&other, b"alive");
}

#[test]
fn a_response_larger_than_the_buffer_is_reported_with_its_length() {
    let server = start_server("small", &[]);
    let (client, _) = connect_echo(&server.ep);
    let mut buf = [0u8; 10];
    let r = client.call(CMD_BIG, &u32s(&[100]), &mut buf);
    assert!(matches!(r, Err(Error::BufferTooSmall { needed: 100 })), "{r:?}");
    // The response is kept, not lost: fetch it with a big enough buffer.
    let mut mid = [0u8; 50];
    let r = client.take_kept_response(&mut mid);
    assert!(matches!(r, Err(Error::BufferTooSmall { needed: 100 })), "still kept: {r:?}");
    let mut kept = [0u8; 128];
    assert_eq!(client.take_kept_response(&mut kept).expect("the kept response"), 100);
    assert!(kept[..100].iter().all(|&b| b == 0xab));
    assert!(matches!(client.take_kept_response(&mut kept), Err(Error::Invalid)), "taken once");
    // The call completed: the next call gets its own answer.
    let mut big = [0u8; 100];
    assert_eq!(client.call(CMD_BIG, &u32s(&[100]), &mut big).expect("fits now"), 100);
    assert!(big.iter().all(|&b| b == 0xab));
    echo(&client, b"next");
}

#[test]
fn oversized_messages_are_refused_in_both_directions() {
    let mut server = start_server("toobig", &[]);
    let sizes = Sizes { max_message_bytes: 1024, ..Sizes::default() };
    let (client, id) = connect_echo_with(&server.ep, sizes);
    assert_eq!(client.max_message(), 1024);
    let mut buf = vec![0u8; 4096];
    let r = client.call_timeout(CMD_ECHO, &[IoSlice::new(&[7u8; 2000])], &mut buf, Some(T));
    assert!(matches!(r, Err(Error::TooBig)), "request over the maximum: {r:?}");
    // A response over the maximum: the handler learns it, the client is
    // answered "too big" (not left waiting), the connection stays.
    let r = client.call_timeout(CMD_BIG, &[IoSlice::new(&u32s(&[2000]))], &mut buf, Some(T));
    assert!(matches!(r, Err(Error::TooBig)), "{r:?}");
    let big = server.proc.expect("BIG", T);
    assert_eq!(field(&big, "result"), "Err(TooBig)");
    echo(&client, &[1u8; 1000]);
    assert_eq!(stats_fields(&server.conn_stats(id))["errors"], 1, "the failed response counts");
    // Asking for more than the server allows is refused at connect.
    let r = Client::builder(&server.ep, SVC_ECHO).max_message(64 << 20).connect();
    assert!(matches!(r, Err(Error::TooBig)), "{r:?}");
}

#[test]
fn a_timed_out_call_does_not_take_a_later_calls_answer() {
    let server = start_server("timeout", &[]);
    let (client, _) = connect_echo(&server.ep);
    let mut req = 300u32.to_le_bytes().to_vec();
    req.extend_from_slice(b"stale");
    let mut buf = [0u8; 64];
    let start = Instant::now();
    let r = client.call_timeout(CMD_DEFER, &[IoSlice::new(&req)], &mut buf, Some(Duration::from_millis(50)));
    assert!(matches!(r, Err(Error::Timeout)), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(1), "timed out on time: {:?}", start.elapsed());
    // The stale answer arrives while this call waits; it must be skipped.
    let mut req = 400u32.to_le_bytes().to_vec();
    req.extend_from_slice(b"fresh");
    let n = client.call(CMD_DEFER, &req, &mut buf).expect("second call");
    assert_eq!(&buf[..n], b"fresh");
}

#[test]
fn threads_sharing_one_client_get_their_own_answers() {
    let server = start_server("threads", &[]);
    let (client, _) = connect_echo(&server.ep);
    let client = Arc::new(client);
    let workers: Vec<_> = (0..4u8)
        .map(|t| {
            let client = client.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                for i in 0..200u32 {
                    let req = format!("thread {t} call {i}");
                    let n = client.call(CMD_ECHO, req.as_bytes(), &mut buf).expect("call");
                    assert_eq!(&buf[..n], req.as_bytes(), "never another thread's answer");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
}

#[test]
fn a_oneway_request_runs_its_handler_and_gets_no_response() {
    let mut server = start_server("oneway", &[]);
    let (client, id) = connect_echo(&server.ep);
    client.send_oneway_vectored(CMD_COUNT, &[], Some(T)).expect("oneway");
    client.send_oneway_vectored(CMD_UNKNOWN, &[], Some(T)).expect("oneway to nothing: no answer either");
    let mut buf = [0u8; 8];
    client.call(CMD_COUNT, b"", &mut buf).expect("count");
    assert_eq!(u64::from_le_bytes(buf), 2, "the oneway request ran its handler");
    assert_eq!(client.in_flight(), 0);
    let s = stats_fields(&server.conn_stats(id));
    assert_eq!((s["requests"], s["responses"]), (3, 1), "only the call was answered");
}
