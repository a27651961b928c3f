//! The shipped echo example (`examples/echo_server.rs`, compiled into
//! this test) as a real server process on a filesystem endpoint: SIGTERM
//! or SIGINT shuts it down gracefully — its client learns "server shut
//! down", the process exits cleanly, the socket file is removed.

#![allow(missing_docs)]

#[allow(dead_code)]
#[path = "../examples/echo_server.rs"]
mod echo_server;

use std::time::Duration;

use coroipc_client::{Client, DisconnectReason, Error};
use coroipc_testkit::report;
use rustix::process::{kill_process, Pid, Signal};

const EP: &str = "COROIPC_ECHO_TEST_EP";
const T: Duration = Duration::from_secs(20);

#[test]
#[ignore = "helper: run by the tests as a child process"]
fn echo_server_process() {
    let Ok(ep) = std::env::var(EP) else { return };
    let probe = ep.clone();
    std::thread::spawn(move || loop {
        if Client::connect(&probe, 1).is_ok() {
            report("READY", "");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    });
    echo_server::run(&ep).expect("the echo server");
    report("STOPPED", "");
}

fn graceful_shutdown_on(signal: Signal) {
    let dir = std::env::temp_dir().join(format!("coroipc-echo-it-{}-{signal:?}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("echo.sock");
    let ep = path.to_str().expect("utf-8 path").to_string();
    let mut server = coroipc_testkit::spawn("echo_server_process", &[(EP, ep.clone())]);
    server.expect("READY", T);
    let client = Client::connect(&ep, 1).expect("connect");
    let mut buf = [0u8; 16];
    let n = client.call(0, b"hello", &mut buf).expect("echo");
    assert_eq!(&buf[..n], b"hello");
    assert!(path.exists(), "the endpoint's socket file exists while serving");

    let pid = Pid::from_raw(server.pid() as i32).expect("pid");
    kill_process(pid, signal).expect("signal the server");
    server.expect("STOPPED", T);
    assert!(server.wait_exit(T).success(), "the server exits cleanly");
    let r = client.call(0, b"again", &mut buf);
    assert!(
        matches!(r, Err(Error::Disconnected(DisconnectReason::ServerShutdown))),
        "the client learns of the shutdown: {r:?}"
    );
    assert!(!path.exists(), "the socket file is removed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_shuts_the_echo_server_down_gracefully() {
    graceful_shutdown_on(Signal::TERM);
}

#[test]
fn sigint_shuts_the_echo_server_down_gracefully() {
    graceful_shutdown_on(Signal::INT);
}
