//! The shipped poll-first counter client (`examples/counter_client.rs`)
//! against the shipped counter server (`coroipc-server`'s
//! `examples/counter_server.rs`), each compiled into this test and run as
//! a real process: notifications queued before the client ever received
//! wake its first `poll(2)`, commands typed on its stdin are answered
//! beside them, and a killed server ends its loop with the reason.
#![allow(missing_docs)]

#[allow(dead_code)]
#[path = "../../server/examples/counter_server.rs"]
mod counter_server;

#[allow(dead_code)]
#[path = "../examples/counter_client.rs"]
mod counter_client;

use std::io::Write;
use std::time::Duration;

use coroipc_client::Client;
use coroipc_testkit::child::{report, spawn, ChildProc};

const EP: &str = "COROIPC_POLL_FIRST_EP";
const T: Duration = Duration::from_secs(20);

#[test]
#[ignore = "helper: the counter server process"]
fn server_process() {
    let Ok(ep) = std::env::var(EP) else { return };
    let probe = ep.clone();
    std::thread::spawn(move || loop {
        if Client::connect(&probe, counter_server::COUNTER_SERVICE).is_ok() {
            report("READY", "");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    });
    counter_server::run(&ep).expect("the counter server");
}

/// Prefixes every whole line with the marker the test harness reads.
struct Marked<W: Write>(W, Vec<u8>);

impl<W: Write> Write for Marked<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.1.extend_from_slice(buf);
        while let Some(end) = self.1.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.1.drain(..=end).collect();
            self.0.write_all(b"@@")?;
            self.0.write_all(&line)?;
        }
        self.0.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[test]
#[ignore = "helper: the poll-first client process"]
fn watcher_process() {
    let Ok(ep) = std::env::var(EP) else { return };
    let client = Client::connect(&ep, counter_server::COUNTER_SERVICE).expect("connect");
    // Notifications queued before the first poll (from another client).
    let other = Client::connect(&ep, counter_server::COUNTER_SERVICE).expect("connect a second client");
    let mut buf = [0u8; 8];
    for _ in 0..2 {
        other.call(counter_server::CMD_ADD, &1i64.to_le_bytes(), &mut buf).expect("add");
    }
    counter_client::watch(&client, std::io::stdin().lock(), &mut Marked(std::io::stdout(), Vec::new()))
        .expect("watch");
    report("END", "");
}

#[test]
fn the_poll_first_client_sees_queued_notifications_answers_stdin_and_notices_a_killed_server() {
    let ep = format!("@coroipc-poll-first-{}", std::process::id());
    let mut server: ChildProc = spawn("server_process", &[(EP, ep.clone())]);
    server.expect("READY", T);
    let mut watcher = spawn("watcher_process", &[(EP, ep.clone())]);
    watcher.expect("counter", T);
    // The two notifications queued before its first poll.
    assert!(watcher.expect("changed:", T).starts_with("1 "));
    assert!(watcher.expect("changed:", T).starts_with("2 "));
    // A command typed on stdin, answered, and its own notification.
    watcher.send_line("add 5");
    assert_eq!(watcher.expect("counter is now", T), "7");
    assert!(watcher.expect("changed:", T).starts_with("7 "));
    // Another client's change.
    let client = Client::connect(&ep, counter_server::COUNTER_SERVICE).expect("connect");
    let mut buf = [0u8; 8];
    client.call(counter_server::CMD_ADD, &3i64.to_le_bytes(), &mut buf).expect("add");
    assert!(watcher.expect("changed:", T).starts_with("10 "));
    // The server is killed: the poll wakes, the loop ends with the reason.
    server.kill();
    assert_eq!(watcher.expect("disconnected:", T), "server died");
    watcher.expect("END", T);
}
