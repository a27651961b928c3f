//! The fixtures of the server crate's real-process suites (cargo feature
//! `suite`).
//!
//! Two test servers, each a real `coroipc_server::Server` in a child
//! process that re-executes the test binary:
//!
//! * [`api`]: the API suite's server (`requests`, `dispatch`,
//!   `lifecycle`, `foreign_loop`, …): five services covering the whole
//!   author API, either loop (built-in or a hand-rolled `poll(2)` one);
//! * [`rel`]: the reliability and security suite's server
//!   (`reliability_*`): services that misbehave on purpose (sleep in the
//!   loop, panic, hold handles), resource limits from the environment,
//!   self-measurement from `/proc/self`, and hand-made hostile clients.
//!
//! What both share is here: the [`TestServer`] handle, the endpoint
//! variable, the client-side helpers, and the macros that put each
//! fixture's `#[ignore]`d child entry points into a test binary
//! ([`api_children!`](crate::api_children), [`rel_children!`](crate::rel_children)).

pub mod api;
pub mod rel;

use std::collections::HashMap;
use std::time::Duration;

use coroipc_client::{Client, Error};
use coroipc_server::Stats;

use crate::ChildProc;

/// The environment variable that gives a child its endpoint (`@name` or a
/// path).
pub const EP: &str = "COROIPC_TEST_EP";

/// The echo command of both test servers: answers the request payload.
pub const CMD_ECHO: u16 = 0;

/// How long a test server child may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A test server child and its endpoint, ready for clients. Dropping it
/// kills the child.
#[derive(Debug)]
pub struct TestServer {
    /// The child process (its control channel on stdin).
    pub proc: ChildProc,
    /// The endpoint it listens on.
    pub ep: String,
    /// The text of its `@@READY` line.
    pub ready: String,
}

impl TestServer {
    /// Starts `helper` (a child entry point of this test binary) on a
    /// fresh endpoint (`@coroipc-<prefix>-<tag>-…`) with extra `envs`;
    /// waits for `@@READY`.
    ///
    /// # Panics
    ///
    /// If the child does not report ready in time.
    pub fn start(helper: &str, prefix: &str, tag: &str, envs: &[(&str, String)]) -> Self {
        let ep = crate::unique_endpoint(prefix, tag);
        let mut all = vec![(EP, ep.clone())];
        all.extend(envs.iter().cloned());
        let mut proc = crate::spawn(helper, &all);
        let ready = proc.expect("READY", START_TIMEOUT);
        Self { proc, ep, ready }
    }

    /// Server-wide counters (the `stats` control line), as
    /// [`stats_text`] wrote them.
    pub fn stats(&mut self) -> String {
        self.proc.command("stats", "SERVER_STATS")
    }
}

/// The counters of `s` as `key=value` fields ([`stats_fields`] reads them).
pub fn stats_text(s: &Stats) -> String {
    format!(
        "requests={} responses={} dispatched={} bytes_in={} bytes_out={} flow_on={} flow_off={} retries={} errors={}",
        s.requests,
        s.responses,
        s.dispatched,
        s.bytes_in,
        s.bytes_out,
        s.flow_control_on,
        s.flow_control_off,
        s.retries,
        s.errors
    )
}

/// The numeric fields of a stats line.
pub fn stats_fields(line: &str) -> HashMap<String, u64> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// An echo round trip ([`CMD_ECHO`]), checked.
///
/// # Panics
///
/// If the call fails or the answer is not the payload.
pub fn echo(client: &Client, payload: &[u8]) {
    let mut buf = vec![0u8; payload.len().max(16)];
    let n = client.call(CMD_ECHO, payload, &mut buf).expect("echo call");
    assert_eq!(&buf[..n], payload, "the echo service answers the request");
}

/// Whether `r` is `Disconnected` (any reason).
pub fn is_lost<T: std::fmt::Debug>(r: &Result<T, Error>) -> bool {
    matches!(r, Err(Error::Disconnected(_)))
}

/// A client error's variant name, for a marker line: `Timeout`,
/// `Disconnected.ServerShutdown`, …
pub fn error_name(e: &Error) -> String {
    if let Error::Disconnected(reason) = e {
        return format!("Disconnected.{reason:?}");
    }
    format!("{e:?}").split(|c: char| !c.is_alphanumeric()).next().unwrap_or("?").to_string()
}

/// Reads `key` from the environment as a number.
fn env_num(key: &str) -> Option<u64> {
    std::env::var(key).ok()?.parse().ok()
}

/// Puts the API suite's child entry points ([`api::SERVER_HELPER`],
/// [`api::CLIENT_HELPER`]) into a test binary: invoke it once at the root
/// of every test file that starts an [`api`] server or client child.
#[macro_export]
macro_rules! api_children {
    () => {
        /// The API suite's server child (see `coroipc_testkit::suite::api`).
        #[test]
        #[ignore = "helper: run by the tests as a child process"]
        fn test_server_process() {
            $crate::suite::api::server_process();
        }

        /// The API suite's client child (see `coroipc_testkit::suite::api`).
        #[test]
        #[ignore = "helper: run by the tests as a child process"]
        fn test_client_process() {
            $crate::suite::api::client_process();
        }
    };
}

/// Puts the reliability suite's child entry points ([`rel::SERVER_HELPER`],
/// [`rel::CLIENT_HELPER`]) into a test binary; `$modes` is the file's own
/// `fn(&str) -> Option<rel::ClientMode>` (client modes beyond the built-in
/// `block`, `flood` and `storm_reader`).
#[macro_export]
macro_rules! rel_children {
    ($modes:expr) => {
        /// The reliability suite's server child (see `coroipc_testkit::suite::rel`).
        #[test]
        #[ignore = "helper: runs as a child process of the reliability tests"]
        fn rel_server_process() {
            $crate::suite::rel::server_process();
        }

        /// The reliability suite's client child (see `coroipc_testkit::suite::rel`).
        #[test]
        #[ignore = "helper: runs as a child process of the reliability tests"]
        fn rel_client_process() {
            $crate::suite::rel::client_process($modes);
        }
    };
}
