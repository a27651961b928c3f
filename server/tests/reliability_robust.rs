//! Robustness of the server against its own users' code and against
//! clients that withhold reading: panicking handlers and callbacks cost at
//! most their call or their connection; service status codes arrive as
//! sent; a worker thread waiting for a non-reading client's ring space
//! never stalls the event loop.

use std::time::{Duration, Instant};

use coroipc_client::{Client, Error};
use coroipc_testkit::suite::rel::*;

coroipc_testkit::rel_children!(client_mode);

fn client_mode(_name: &str) -> Option<ClientMode> {
    None
}

fn call(client: &Client, command: u16, payload: &[u8]) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; 256];
    client
        .call_timeout(command, &[std::io::IoSlice::new(payload)], &mut buf, Some(T))
        .map(|n| buf[..n].to_vec())
}

/// The server is alive and serving: an old connection and a new one both
/// get their echo.
fn still_serving(server: &TestServer, old: &Client, what: &str) {
    assert_eq!(call(old, CMD_ECHO, b"old").unwrap_or_else(|e| panic!("{what}: old connection: {e}")), b"old");
    let new = connect(&server.ep);
    welcome(&new);
    assert_eq!(
        call(&new, CMD_ECHO, b"new").unwrap_or_else(|e| panic!("{what}: new connection: {e}")),
        b"new"
    );
}

#[test]
fn a_panicking_handler_or_callback_costs_only_its_call_or_connection() {
    let mut server = start_server("panic", &[]);
    let honest = connect(&server.ep);
    welcome(&honest);
    still_serving(&server, &honest, "before any panic");

    // A handler panics: its call is answered "invalid", its connection and
    // every other carry on.
    let c = connect(&server.ep);
    welcome(&c);
    assert!(
        matches!(call(&c, CMD_PANIC, b""), Err(Error::Invalid)),
        "a panicking handler's call is answered"
    );
    assert_eq!(call(&c, CMD_ECHO, b"same").expect("the same connection goes on"), b"same");
    still_serving(&server, &honest, "after a handler panic");

    // A handler panics holding a deferred responder: unwinding drops it,
    // and dropping answers.
    assert!(
        matches!(call(&c, CMD_PANIC_DEFERRED, b""), Err(Error::Invalid)),
        "a responder dropped by a panic answers"
    );
    still_serving(&server, &honest, "after a panic with a deferred responder");

    // The admission callback panics: the request is answered "invalid".
    assert!(matches!(call(&c, CMD_ADMIT_PANIC, b""), Err(Error::Invalid)), "a panicking admission answers");
    still_serving(&server, &honest, "after an admission panic");

    // The connect callback panics: that connection is closed, not the server.
    let r = Client::builder(&server.ep, SVC_CONNECT_PANIC).timeout(T).connect().and_then(|c| {
        let mut b = [0u8; 16];
        c.call_timeout(CMD_ECHO, &[], &mut b, Some(T))
    });
    assert!(r.is_err(), "a connection whose connect callback panicked is closed: {r:?}");
    still_serving(&server, &honest, "after a connect-callback panic");

    // The authentication callback panics: that client is refused.
    let r = Client::builder(&server.ep, SVC_AUTH_PANIC).timeout(T).connect();
    assert!(matches!(r, Err(Error::AccessDenied)), "a panicking authentication refuses: {r:?}");
    still_serving(&server, &honest, "after an authentication panic");

    // The disconnect callback panics: the connection is gone anyway.
    let d = connect(&server.ep);
    let id = welcome(&d);
    assert_eq!(call(&d, CMD_PANIC_ON_DISCONNECT, b"").expect("arm"), b"armed");
    drop(d);
    server.proc.expect_with("DISC_PANIC", "id", &id.to_string(), T);
    still_serving(&server, &honest, "after a disconnect-callback panic");
    assert!(server.proc.is_running(), "the server process is alive");
}

#[test]
fn service_status_codes_arrive_as_sent_and_reserved_codes_cannot_be_sent() {
    let mut server = start_server("status", &[]);
    let client = connect(&server.ep);
    welcome(&client);
    for code in [1000u32, 1001, 4242, 65_535, 65_536, u32::MAX - 1, u32::MAX] {
        match call(&client, CMD_STATUS, &code.to_le_bytes()) {
            Err(Error::Service(c)) => assert_eq!(c, code, "service code {code} arrives unchanged"),
            other => panic!("service code {code} arrived as {other:?}"),
        }
    }
    for code in [0u32, 1, 2, 5, 6, 7, 999] {
        let r = call(&client, CMD_STATUS, &code.to_le_bytes());
        assert!(
            matches!(r, Err(Error::Invalid)),
            "reserved code {code} is not sent; the call is answered invalid: {r:?}"
        );
        let line = server.proc.expect_with("STATUS_REFUSED", "code", &code.to_string(), T);
        assert!(line.contains("InvalidStatus"), "respond_status says why: {line}");
    }
    echo(&client, b"still fine");
}

#[test]
fn deferred_answers_waiting_for_a_non_reading_client_do_not_stall_other_connections() {
    let server = start_server("defer-noread", &[]);
    // A hand-made client that asks for many deferred answers of 6000 bytes
    // (the response ring holds 64 KiB) and never reads one: worker threads
    // end up waiting for its ring space.
    let mut raw = raw_connect(&server.ep, coroipc_transport::handshake::RingSizes::default());
    // All in one burst, answered 100 ms later: the loop takes them all
    // (the response ring is still empty), then the answers pile up.
    for seq in 1..=40u64 {
        raw.requests
            .try_push(&message(CMD_DEFER_NOW, seq, &u32s(&[6000, 100])))
            .expect("request ring has room");
    }
    raw.request_bell.signal();
    std::thread::sleep(Duration::from_millis(400));
    // More requests the loop cannot serve yet (their answers would not
    // fit): the loop looks at this connection's response space again and
    // again while the workers wait for it.
    for seq in 41..=44u64 {
        raw.requests.try_push(&message(CMD_ECHO, seq, b"x")).expect("request ring has room");
    }
    raw.request_bell.signal();
    // An honest client on another connection keeps being served.
    let honest = connect(&server.ep);
    welcome(&honest);
    let start = Instant::now();
    let mut buf = [0u8; 64];
    for i in 0..200u32 {
        let req = i.to_le_bytes();
        let t = Instant::now();
        let r = honest.call_timeout(
            CMD_ECHO,
            &[std::io::IoSlice::new(&req)],
            &mut buf,
            Some(Duration::from_secs(1)),
        );
        assert!(r.is_ok(), "call {i} beside the non-reading client: {r:?} after {:?}", t.elapsed());
    }
    eprintln!("200 calls in {:?}", start.elapsed());
    drop(raw);
}
