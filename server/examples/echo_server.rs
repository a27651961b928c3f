//! An echo service: every request on command 0 is answered with itself.
//!
//! ```sh
//! cargo run -p coroipc-server --example echo_server            # listens on @coroipc-echo
//! cargo run -p coroipc-client --example echo_client -- hello   # in another terminal
//! ```
//!
//! An optional argument names another endpoint: `@name` (a Linux abstract
//! socket) or a filesystem path.
//!
//! Graceful shutdown: Ctrl-C (SIGINT) or SIGTERM stops it cleanly. A
//! thread waits for the signal (`signal-hook`'s iterator: the signal
//! handler only writes to a pipe, everything else runs on that ordinary
//! thread, no `unsafe`) and calls `ServerHandle::shutdown`; `run` then
//! closes every connection — each client learns "server shut down", every
//! disconnect callback runs — and returns, and dropping the server removes
//! a filesystem endpoint's socket file.

use coroipc_server::{Disconnect, Server, ServiceBuilder};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// The echo service's id (clients connect to it by number).
const ECHO_SERVICE: u16 = 1;
/// The echo command.
const CMD_ECHO: u16 = 0;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = std::env::args().nth(1).unwrap_or_else(|| "@coroipc-echo".to_string());
    run(&endpoint)
}

/// Serves echo on `endpoint` until SIGINT or SIGTERM.
///
/// # Errors
///
/// The server's build or event-loop error, or the signal set-up's.
pub fn run(endpoint: &str) -> Result<(), Box<dyn std::error::Error>> {
    // Per-connection state: how many requests this client made.
    let echo = ServiceBuilder::new(ECHO_SERVICE, |conn| {
        let peer = conn.credentials();
        println!("client {} connected (uid {}, pid {:?})", conn.id(), peer.uid, peer.pid);
        Ok(0u64)
    })
    .on_disconnect(|conn, requests: &mut u64| {
        println!("client {} left after {requests} requests", conn.id());
        Disconnect::Done
    })
    .handler(CMD_ECHO, |mut call| {
        *call.state() += 1;
        let payload = call.payload();
        let _ = call.respond(payload);
    });

    let server = Server::builder()
        .endpoint(endpoint)
        .service(echo)
        // Accept only clients running as our own user.
        .auth(|peer, _service| {
            if peer.uid == rustix::process::getuid().as_raw() {
                Ok(())
            } else {
                Err(coroipc_server::Refusal::AccessDenied)
            }
        })
        .build()?;
    // Shut down on SIGINT/SIGTERM.
    let handle = server.handle();
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            println!("signal {signal}: shutting down");
            handle.shutdown();
        }
    });
    println!("echo service {ECHO_SERVICE} listening on {endpoint}");
    server.run()?; // returns once every connection is closed
    println!("stopped");
    Ok(())
}
