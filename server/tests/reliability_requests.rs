//! Reliability of the request/response path between real processes: every
//! message size, oversize refusal, responses that never come or come late,
//! the server killed under a blocked client, clients killed mid-request,
//! mid-dispatch and while the server sleeps, server-side disconnects from
//! a handler, retried disconnect callbacks, dispatch from the connect
//! callback.

use std::io::IoSlice;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use coroipc_client::{Error, Sizes};
use coroipc_testkit::suite::rel::*;

coroipc_testkit::rel_children!(client_mode);

fn client_mode(name: &str) -> Option<ClientMode> {
    match name {
        "server_death" => Some(server_death_mode),
        _ => None,
    }
}

#[test]
fn round_trips_at_every_size_from_32_bytes_to_the_negotiated_maximum_blocking_and_timed() {
    let server = start_server("sizes", &[]);
    let client = connect(&server.ep);
    welcome(&client);
    let max = client.max_message();
    assert_eq!(max, 8192, "the server's default maximum");
    let base = pattern(7, max + 256);
    let mut buf = vec![0u8; max];
    let start = Instant::now();
    for size in 32..=max {
        let off = size % 251;
        let req = &base[off..off + size - HDR];
        // Blocking.
        let n = client.call(CMD_ECHO, req, &mut buf).unwrap_or_else(|e| panic!("size {size}: {e}"));
        assert_eq!(&buf[..n], req, "size {size}: blocking echo intact");
        // With a timeout, gathered from two slices.
        let (a, b) = req.split_at(req.len() / 3);
        let n = client
            .call_timeout(CMD_ECHO, &[IoSlice::new(a), IoSlice::new(b)], &mut buf, Some(T))
            .unwrap_or_else(|e| panic!("size {size} timed: {e}"));
        assert_eq!(&buf[..n], req, "size {size}: timed echo intact");
        if size % 61 == 0 || size == max {
            let g = client.call_in_place(CMD_ECHO, &[IoSlice::new(req)], Some(T)).expect("zero-copy call");
            assert_eq!(&g[..], req, "size {size}: zero-copy echo intact");
        }
    }
    eprintln!("{} sizes × 2 round trips in {:?}", max - 31, start.elapsed());
}

/// The request counter of this connection, from the server.
fn server_requests(client: &coroipc_client::Client) -> u64 {
    let mut b = [0u8; 48];
    client.call(CMD_STATS, b"", &mut b).expect("stats");
    le_u64(&b, 24)
}

#[test]
fn oversize_request_is_too_big_and_nothing_is_sent() {
    let server = start_server("oversize", &[]);
    let client = connect(&server.ep);
    welcome(&client);
    let max = client.max_message();
    let before = server_requests(&client);
    let too_big = vec![1u8; max - HDR + 1];
    let mut buf = vec![0u8; max];
    assert!(matches!(client.call(CMD_ECHO, &too_big, &mut buf), Err(Error::TooBig)), "call");
    let half = vec![2u8; (max - HDR) / 2 + 1];
    let parts = [IoSlice::new(&half), IoSlice::new(&half)];
    assert!(matches!(client.call_vectored(CMD_ECHO, &parts, &mut buf), Err(Error::TooBig)), "vectored");
    assert!(matches!(client.send_vectored(CMD_ECHO, &parts, None), Err(Error::TooBig)), "pipelined");
    assert!(matches!(client.send_oneway_vectored(CMD_ECHO, &parts, None), Err(Error::TooBig)), "oneway");
    assert_eq!(client.in_flight(), 0, "nothing outstanding");
    assert!(matches!(client.call_in_place(CMD_ECHO, &parts, Some(T)), Err(Error::TooBig)), "zero-copy call");
    // The server saw none of them: one more request (the stats call itself).
    assert_eq!(server_requests(&client), before + 1, "no oversize request reached the server");
    // The largest allowed size still goes through, both ways.
    let exact = vec![3u8; max - HDR];
    let n = client.call(CMD_ECHO, &exact, &mut buf).expect("maximum-size call");
    assert_eq!(&buf[..n], &exact[..]);
    // Nothing was half-sent: the next calls line up with their answers.
    echo(&client, b"after");
}

#[test]
fn a_call_whose_response_never_comes_times_out_and_the_connection_keeps_working() {
    let mut server = start_server("never", &[]);
    let client = connect(&server.ep);
    welcome(&client);
    let mut buf = [0u8; 64];

    // Never answered.
    let start = Instant::now();
    let r = client.call_timeout(CMD_NEVER, &[], &mut buf, Some(Duration::from_millis(50)));
    let took = start.elapsed();
    assert!(matches!(r, Err(Error::Timeout)), "{r:?}");
    assert!(took >= Duration::from_millis(50) && took < Duration::from_secs(1), "took {took:?}");
    server.proc.expect("NEVER", T);
    echo(&client, b"still works");

    // Answered late, while the next call is waiting for its own answer:
    // the late "first" lands before "second" and must be skipped.
    let mut late = u32s(&[150]);
    late.extend_from_slice(b"first");
    let r = client.call_timeout(CMD_LATE, &[IoSlice::new(&late)], &mut buf, Some(Duration::from_millis(20)));
    assert!(matches!(r, Err(Error::Timeout)), "{r:?}");
    let mut second = u32s(&[400]);
    second.extend_from_slice(b"second");
    let n = client.call_timeout(CMD_LATE, &[IoSlice::new(&second)], &mut buf, Some(T)).expect("second");
    assert_eq!(&buf[..n], b"second", "the late answer was not taken for the next call's");

    // Answered late, after the caller gave up and before the next call.
    late[..4].copy_from_slice(&50u32.to_le_bytes());
    let r = client.call_timeout(CMD_LATE, &[IoSlice::new(&late)], &mut buf, Some(Duration::from_millis(5)));
    assert!(matches!(r, Err(Error::Timeout)), "{r:?}");
    std::thread::sleep(Duration::from_millis(150));
    echo(&client, b"third");
    // Pipelined requests are matched by sequence number too.
    let t = client.send_vectored(CMD_ECHO, &[IoSlice::new(b"piped")], Some(T)).expect("send");
    let n = client.wait(t, &mut buf, Some(T)).expect("wait");
    assert_eq!(&buf[..n], b"piped");
}

/// Child: connects, blocks in a call that is never answered, reports when
/// it returned (`at`, monotonic ns) and with what, then drops the client
/// and reports its own descriptors and mappings before and after.
fn server_death_mode(ep: &str, _arg: &str, _control: Receiver<String>) {
    let (fds0, maps0) = (open_fds(), memfd_maps().0);
    let client = connect(ep);
    welcome(&client);
    report("READY", &format!("pid={}", std::process::id()));
    let mut buf = [0u8; 64];
    let r = client.call(CMD_NEVER, b"", &mut buf);
    let at = mono_ns();
    let err = match &r {
        Ok(_) => "ok".to_string(),
        Err(e) => error_name(e),
    };
    let again = client.call(CMD_ECHO, b"x", &mut buf).map_err(|e| error_name(&e));
    let dispatch = client.recv_dispatch(&mut buf, Some(Duration::from_secs(1))).map_err(|e| error_name(&e));
    let connected = client.is_connected();
    drop(client);
    report(
        "RESULT",
        &format!(
            "err={err} at={at} again={} dispatch={} connected={connected} fds_before={fds0} fds_after={} maps_before={maps0} maps_after={}",
            again.err().unwrap_or_default(),
            dispatch.err().unwrap_or_default(),
            open_fds(),
            memfd_maps().0
        ),
    );
}

#[test]
fn server_sigkilled_mid_request_client_gets_connection_lost_within_100ms_and_cleans_up() {
    let mut server = start_server("srvdeath", &[]);
    let mut client = server.spawn_client("server_death", "");
    client.expect("READY", T);
    server.proc.expect("NEVER", T);
    // Let the client pass its spin budget and fall asleep.
    std::thread::sleep(Duration::from_millis(100));
    let killed_at = mono_ns();
    server.proc.kill();
    let line = client.expect("RESULT", T);
    let waited_ms = (num(&line, "at") as f64 - killed_at as f64) / 1e6;
    eprintln!("blocked call returned {waited_ms:.2} ms after the server's SIGKILL: {line}");
    assert_eq!(field(&line, "err"), "Disconnected.ServerDied", "{line}");
    assert!(waited_ms < 100.0, "the blocked call noticed the death after {waited_ms:.1} ms");
    assert_eq!(field(&line, "again"), "Disconnected.ServerDied", "later calls fail at once");
    assert_eq!(field(&line, "dispatch"), "Disconnected.ServerDied", "dispatch receive too");
    assert_eq!(field(&line, "connected"), "false");
    assert_eq!(num(&line, "fds_after"), num(&line, "fds_before"), "the client closed every descriptor");
    assert_eq!(num(&line, "maps_after"), num(&line, "maps_before"), "and unmapped the segment");
}

#[test]
fn client_sigkilled_mid_request_mid_dispatch_and_while_the_server_sleeps_is_disconnected_once_and_freed() {
    let mut server = start_server("clideath", &[]);
    let base = server.res();

    // While the server sleeps in a handler (the event loop is busy).
    let mut sleeper = server.spawn_client("block", "sleep:400");
    let id_sleep = num(&sleeper.expect("READY", T), "id");
    server.proc.expect_with("SLEEPING", "id", &id_sleep.to_string(), T);
    sleeper.kill();
    sleeper.wait_exit(T);

    // Mid-request: a client doing round trips as fast as it can.
    let mut flooder = server.spawn_client("flood", "");
    let id_flood = num(&flooder.expect("READY", T), "id");
    std::thread::sleep(Duration::from_millis(30));
    flooder.kill();
    flooder.wait_exit(T);

    // Mid-dispatch: a storm of dispatch messages is flowing to it.
    let mut reader = server.spawn_client("storm_reader", "1000000");
    let id_storm = num(&reader.expect("READY", T), "id");
    reader.kill();
    reader.wait_exit(T);

    for id in [id_sleep, id_flood, id_storm] {
        let line = server.proc.expect_with("DISC", "id", &id.to_string(), T);
        assert_eq!((num(&line, "calls"), num(&line, "retry")), (1, 0), "connection {id}: {line}");
    }
    let storm = server.proc.expect_with("STORM_DONE", "id", &id_storm.to_string(), T);
    assert_eq!(field(&storm, "error"), "Disconnected", "the storm thread learns of the death: {storm}");
    let after = server.settle_to(&base, "after three SIGKILLed clients");
    eprintln!("server resources: start {base:?}, after {after:?}");

    // Still serving; and no disconnect callback ran twice.
    let client = connect(&server.ep);
    welcome(&client);
    echo(&client, b"still serving");
    for id in [id_sleep, id_flood, id_storm] {
        assert!(
            server.proc.take_all("DISC", "id", &id.to_string()).is_empty(),
            "connection {id}: called once"
        );
    }
}

#[test]
fn disconnect_from_a_handler_with_a_retried_disconnect_callback_and_dispatch_from_connect() {
    let mut server = start_server("handler-disc", &[(RETRY, "2".into())]);
    let base = server.res();
    let client = connect(&server.ep);
    // The connect callback's dispatch is the first message, seq 0.
    let id = welcome(&client);
    let connected = server.proc.expect_with("CONNECTED", "id", &id.to_string(), T);
    assert_eq!(field(&connected, "welcome"), "Ok(())", "{connected}");

    let mut buf = [0u8; 16];
    let n = client.call(CMD_DISCONNECT_ME, b"", &mut buf).expect("answered before the disconnect");
    assert_eq!(&buf[..n], b"bye");
    let line = server.proc.expect_with("DISCONNECTED_ME", "id", &id.to_string(), T);
    assert_eq!(field(&line, "respond"), "Ok(())");
    let start = Instant::now();
    let r = client.call(CMD_ECHO, b"x", &mut buf);
    assert!(is_lost(&r), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(1), "told at once, not after the retries");
    assert!(matches!(client.try_recv_dispatch(&mut buf), Err(Error::Disconnected(_))));

    // The callback asked twice to be retried: three calls, then done.
    for calls in 1..=3 {
        let line = server.proc.expect_with("DISC", "id", &id.to_string(), T);
        assert_eq!(num(&line, "calls"), calls, "{line}");
        assert_eq!(num(&line, "retry"), u64::from(calls < 3), "{line}");
    }
    drop(client);
    server.settle_to(&base, "after the retried disconnect");
    std::thread::sleep(Duration::from_millis(50));
    assert!(server.proc.take_all("DISC", "id", &id.to_string()).is_empty(), "never called after Done");

    // A refusal by size is a clear error too, and the server serves on.
    let huge = Sizes { max_message_bytes: 64 << 20, ..Sizes::default() };
    assert!(matches!(connect_with(&server.ep, SVC_REL, huge), Err(Error::TooBig)));
    let again = connect(&server.ep);
    welcome(&again);
    echo(&again, b"next client");
}
