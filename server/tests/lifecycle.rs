//! Connection lifecycle between a server process and client processes:
//! authentication from kernel credentials, refusals, connection limits,
//! disconnect callbacks (retried on request), server-initiated
//! disconnect, shutdown of one service and of the whole server waking
//! blocked clients, statistics and the connection listing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use coroipc_client::{Client, DisconnectReason, Error};
use coroipc_testkit::suite::api::*;

coroipc_testkit::api_children!();

const T: Duration = Duration::from_secs(10);

#[test]
fn auth_sees_kernel_credentials_and_a_refusal_is_access_denied() {
    let mut server = start_server("auth", &[]);
    let (client, _) = connect_echo(&server.ep);
    let auth = server.proc.expect_with("AUTH", "service", &SVC_ECHO.to_string(), T);
    assert_eq!(num(&auth, "uid"), u64::from(rustix::process::getuid().as_raw()));
    assert_eq!(num(&auth, "gid"), u64::from(rustix::process::getgid().as_raw()));
    assert_eq!(num(&auth, "pid"), u64::from(std::process::id()), "the kernel names this process");
    // The server's credentials, seen from the client.
    assert_eq!(client.server_credentials().pid, Some(server.proc.pid()));
    // Refused by uid: no memory made, no connect callback.
    let r = Client::connect(&server.ep, SVC_PRIVILEGED);
    assert!(matches!(r, Err(Error::AccessDenied)), "{r:?}");
    server.proc.expect_with("AUTH", "service", &SVC_PRIVILEGED.to_string(), T);
    echo(&client, b"unaffected");
    let conns = server.proc.command("conns", "CONNS");
    assert_eq!(num(&conns, "n"), 1, "the refused client left nothing behind: {conns}");
}

#[test]
fn unknown_service_is_refused_with_no_such_service() {
    let server = start_server("nosvc", &[]);
    let r = Client::connect(&server.ep, SVC_ABSENT);
    assert!(matches!(r, Err(Error::NoSuchService)), "{r:?}");
    let (client, _) = connect_echo(&server.ep);
    echo(&client, b"fine");
}

#[test]
fn connecting_to_nobody_is_an_io_error() {
    let r = Client::builder(&endpoint("nobody"), SVC_ECHO).timeout(Duration::from_secs(1)).connect();
    assert!(matches!(r, Err(Error::Io(_))), "{r:?}");
}

/// The connect callback runs after the handshake: its refusal closes the
/// new connection, which the client sees on its first call.
#[test]
fn a_connect_callback_refusal_closes_the_connection() {
    let mut server = start_server("refuse", &[]);
    let client = Client::connect(&server.ep, SVC_REFUSE).expect("the handshake itself succeeds");
    server.proc.expect("REFUSING", T);
    let r = client.call(0, b"", &mut [0u8; 8]);
    assert!(is_lost(&r), "{r:?}");
    let conns = server.proc.command("conns", "CONNS");
    assert_eq!(num(&conns, "n"), 0, "{conns}");
}

#[test]
fn the_connection_limit_refuses_extra_clients_until_one_leaves() {
    let mut server = start_server("limit", &[(MAX_CONN, "2".into())]);
    let (a, a_id) = connect_echo(&server.ep);
    let (b, _) = connect_echo(&server.ep);
    let r = Client::connect(&server.ep, SVC_ECHO);
    assert!(matches!(r, Err(Error::ConnectionLimit)), "{r:?}");
    drop(a);
    server.proc.expect_with("DISCONNECT_DONE", "id", &a_id.to_string(), T);
    let (c, _) = connect_echo(&server.ep);
    echo(&b, b"b");
    echo(&c, b"c");
}

#[test]
fn server_initiated_disconnect_wakes_the_client_with_connection_lost() {
    let mut server = start_server("kick", &[]);
    let (client, id) = connect_echo(&server.ep);
    let (bystander, _) = connect_echo(&server.ep);
    std::thread::scope(|s| {
        let blocked = s.spawn(|| {
            let mut buf = [0u8; 16];
            let r = client.recv_dispatch(&mut buf, None);
            (r.map(|_| ()), Instant::now())
        });
        std::thread::sleep(Duration::from_millis(100));
        let at = Instant::now();
        let ok = server.proc.command(&format!("disconnect {id}"), "OK");
        assert_eq!(field(&ok, "found"), "true");
        let (r, woke) = blocked.join().expect("blocked receiver");
        assert!(matches!(r, Err(Error::Disconnected(_))), "{r:?}");
        assert!(woke.duration_since(at) < Duration::from_secs(1), "woken promptly");
    });
    server.proc.expect_with("DISCONNECT_DONE", "id", &id.to_string(), T);
    server.proc.expect_with("STATE_DROPPED", "id", &id.to_string(), T);
    assert!(is_lost(&client.call(CMD_ECHO, b"x", &mut [0u8; 8])));
    assert!(!client.is_connected());
    echo(&bystander, b"unaffected");
}

#[test]
fn a_handler_can_disconnect_its_own_client() {
    let mut server = start_server("selfkick", &[]);
    let (client, id) = connect_echo(&server.ep);
    let mut buf = [0u8; 8];
    let n = client.call(CMD_DISCONNECT_ME, b"", &mut buf).expect("answered before the disconnect");
    assert_eq!(&buf[..n], b"bye");
    server.proc.expect_with("DISCONNECT_DONE", "id", &id.to_string(), T);
    let r = client.call(CMD_ECHO, b"x", &mut buf);
    assert!(is_lost(&r), "{r:?}");
}

#[test]
fn a_disconnect_callback_that_asks_to_retry_is_called_again_until_done() {
    let mut server = start_server("retry", &[(RETRY_DISCONNECT, "3".into())]);
    let (client, id) = connect_echo(&server.ep);
    let (other, _) = connect_echo(&server.ep);
    let start = Instant::now();
    drop(client);
    let id = id.to_string();
    for attempt in 1..=4 {
        let line = server.proc.expect_with("DISCONNECT", "id", &id, T);
        assert_eq!(num(&line, "try"), attempt);
    }
    let done = server.proc.expect_with("DISCONNECT_DONE", "id", &id, T);
    assert_eq!(num(&done, "tries"), 4);
    server.proc.expect_with("STATE_DROPPED", "id", &id, T);
    assert!(start.elapsed() >= Duration::from_millis(20), "retried later, not in a burst");
    echo(&other, b"the loop kept serving meanwhile");
    let conns = server.proc.command("conns", "CONNS");
    assert_eq!(num(&conns, "n"), 1, "{conns}");
}

#[test]
fn shutdown_wakes_every_blocked_client_promptly() {
    let mut server = start_server("shutdown", &[]);
    // One client in another process, one in this one, both blocked in a
    // call the server never answers.
    let mut remote = start_client("blocked-call", &server.ep, &[]);
    let (client, id) = connect_echo(&server.ep);
    std::thread::scope(|s| {
        let blocked = s.spawn(|| {
            let r = client.call(CMD_NEVER, b"", &mut [0u8; 16]);
            (r, Instant::now())
        });
        for _ in 0..2 {
            server.proc.expect("PARKED", T);
        }
        let at = Instant::now();
        server.proc.command("shutdown", "OK");
        let (r, woke) = blocked.join().expect("blocked caller");
        assert!(
            matches!(r, Err(Error::Disconnected(DisconnectReason::ServerShutdown))),
            "a shutdown says so: {r:?}"
        );
        assert!(woke.duration_since(at) < Duration::from_secs(1), "woken in {:?}", woke.duration_since(at));
    });
    let remote_result = remote.expect("CALL_RESULT", T);
    assert_eq!(field(&remote_result, "error"), "Disconnected.ServerShutdown");
    server.proc.expect_with("DISCONNECT_DONE", "id", &id.to_string(), T);
    let stopped = server.proc.expect("STOPPED", T);
    assert_eq!(num(&stopped, "parked"), 2, "the parked responders outlived the connections harmlessly");
    assert!(server.proc.wait_exit(T).success(), "the server process ends cleanly");
    let r = Client::builder(&server.ep, SVC_ECHO).timeout(Duration::from_secs(1)).connect();
    assert!(matches!(r, Err(Error::Io(_))), "nobody listens any more: {r:?}");
}

#[test]
fn shutting_down_one_service_closes_its_connections_and_refuses_new_ones() {
    let mut server = start_server("svcdown", &[]);
    let mut listener = start_client("counter-listener", &server.ep, &[]);
    let (echo_client, _) = connect_echo(&server.ep);
    server.proc.command(&format!("shutdown_service {SVC_COUNTER}"), "OK");
    let lost = listener.expect("LOST", T);
    assert_eq!(field(&lost, "error"), "Disconnected.ServiceShutdown");
    let r = Client::connect(&server.ep, SVC_COUNTER);
    assert!(matches!(r, Err(Error::NoSuchService)), "{r:?}");
    echo(&echo_client, b"the other service carries on");
    let (again, _) = connect_echo(&server.ep);
    echo(&again, b"and accepts new clients");
}

#[test]
fn statistics_and_the_connection_listing_account_for_every_message() {
    let mut server = start_server("stats", &[]);
    let (a, a_id) = connect_echo(&server.ep);
    let (b, b_id) = connect_echo(&server.ep);
    let mut buf = [0u8; 64];
    for _ in 0..5 {
        echo(&a, b"0123456789"); // 16-byte header + 10 bytes, both ways
    }
    let _ = b.call(CMD_UNKNOWN, b"", &mut buf);
    let _ = b.call(CMD_VETO_TRY, b"", &mut buf);
    b.call(CMD_DISPATCH_IOV, b"x", &mut buf).expect("dispatch");

    let conns = server.proc.command("conns", "CONNS");
    assert_eq!(num(&conns, "n"), 2);
    let me = format!("{}:{SVC_ECHO}:{}:{}", a_id, rustix::process::getuid().as_raw(), std::process::id());
    assert!(field(&conns, "list").split(',').any(|c| c == me), "{conns} lists {me}");

    // The server counts a response once it is in the ring, so a client can
    // see its answer a moment before the counter moves (and a vetoed or
    // unknown request is counted after its answer): wait for the counters
    // to settle, then check them exactly.
    let settled = |server: &mut TestServer, id: u64, done: &dyn Fn(&HashMap<String, u64>) -> bool| {
        let mut last = stats_fields(&server.conn_stats(id));
        let deadline = Instant::now() + T;
        while !done(&last) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            last = stats_fields(&server.conn_stats(id));
        }
        last
    };
    let sa = settled(&mut server, a_id, &|s| s["responses"] >= 5);
    assert_eq!((sa["requests"], sa["responses"]), (5, 5));
    assert_eq!(sa["bytes_in"], 5 * 26);
    assert_eq!(sa["bytes_out"], 5 * 26 + 24, "responses plus the 24-byte welcome dispatch");
    assert_eq!((sa["dispatched"], sa["errors"], sa["retries"]), (1, 0, 0));
    let sb = settled(&mut server, b_id, &|s| s["responses"] >= 3 && s["errors"] >= 1 && s["retries"] >= 1);
    assert_eq!((sb["requests"], sb["responses"], sb["dispatched"]), (3, 3, 2));
    assert_eq!((sb["errors"], sb["retries"]), (1, 1), "unknown command; veto");

    // Server totals keep the counters of connections that are gone.
    drop(a);
    server.proc.expect_with("DISCONNECT_DONE", "id", &a_id.to_string(), T);
    // The callback reports before the loop forgets the connection.
    assert!(
        eventually(T, || field(&server.conn_stats(a_id), "id") == "none"),
        "a closed connection leaves the listing"
    );
    let total = stats_fields(&server.stats());
    assert_eq!(total["requests"], 8);
    assert_eq!(total["responses"], 8);
    assert_eq!(total["dispatched"], 3);
    assert_eq!(total["errors"], 1);
    assert_eq!(num(&server.proc.command("conns", "CONNS"), "n"), 1);
}

#[test]
fn the_server_survives_a_client_killed_mid_stream() {
    let mut server = start_server("sigkill", &[]);
    let mut victim = start_client("echo-loop", &server.ep, &[]);
    let victim_id = field(&victim.ready, "id").to_string();
    victim.expect("ECHOING", T);
    let (client, _) = connect_echo(&server.ep);
    let conns = server.proc.command("conns", "CONNS");
    assert_eq!(num(&conns, "n"), 2);
    victim.kill();
    victim.wait_exit(T);
    // Its connection is closed, its disconnect callback ran.
    server.proc.expect_with("DISCONNECT_DONE", "id", &victim_id, T);
    server.proc.expect_with("STATE_DROPPED", "id", &victim_id, T);
    assert!(
        eventually(T, || num(&server.proc.command("conns", "CONNS"), "n") == 1),
        "the dead client's connection is gone"
    );
    echo(&client, b"still serving");
}

#[test]
fn building_a_server_reports_typed_errors() {
    use coroipc_server::{Limits, Server, ServerBuildError, ServiceBuilder};
    let svc = |id| ServiceBuilder::new(id, |_| Ok(()));
    let r = Server::builder().service(svc(1)).build();
    assert!(matches!(r, Err(ServerBuildError::NoEndpoint)), "{r:?}");
    let r = Server::builder().endpoint("").build();
    assert!(matches!(r, Err(ServerBuildError::BadEndpoint(_))), "{r:?}");
    let r = Server::builder().endpoint(&endpoint("dup")).service(svc(7)).service(svc(7)).build();
    assert!(matches!(r, Err(ServerBuildError::DuplicateService(7))), "{r:?}");
    let limits = Limits { max_message_bytes: 64, ..Limits::default() };
    let r = Server::builder().endpoint(&endpoint("limits")).limits(limits).build();
    assert!(matches!(r, Err(ServerBuildError::BadLimits(_))), "{r:?}");
    let limits = Limits { dispatch_low_percent: 80, dispatch_high_percent: 50, ..Limits::default() };
    let r = Server::builder().endpoint(&endpoint("wm")).limits(limits).build();
    assert!(matches!(r, Err(ServerBuildError::BadLimits(_))), "{r:?}");
    // The endpoint is taken: a second server cannot bind it.
    let server = start_server("taken", &[]);
    let r = Server::builder().endpoint(&server.ep).build();
    assert!(matches!(r, Err(ServerBuildError::Io(_))), "{r:?}");
}
