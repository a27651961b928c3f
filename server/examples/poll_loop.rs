//! The server driven by an event loop it does not own: a hand-rolled
//! `poll(2)` loop that also runs its own timer — the shape of an
//! application that already has a loop (corosync's qb loop, a GUI, mio).
//!
//! ```sh
//! cargo run -p coroipc-server --example poll_loop                 # echo on @coroipc-poll
//! cargo run -p coroipc-client --example echo_client -- hi @coroipc-poll
//! ```
//!
//! Everything the server needs from the loop is the [`Poller`] trait
//! (register, modify, deregister an fd with a token) and two calls:
//! [`Server::handle_event`] for every ready token and [`Server::tick`]
//! every few tens of milliseconds.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use coroipc_server::{Poller, Server, ServiceBuilder, Token};
use rustix::event::{poll, PollFd, PollFlags, Timespec};

/// A `poll(2)` loop's descriptor list. Safe Rust cannot turn a raw fd back
/// into a `BorrowedFd`, so it keeps a duplicate of each registered
/// descriptor to poll on (same open file, same readiness) and the
/// original's number to find it again; a C loop would keep the number only.
#[derive(Default)]
struct PollLoop {
    fds: Vec<(RawFd, OwnedFd, Token)>,
}

impl PollLoop {
    /// Waits up to `timeout`; returns the tokens of ready descriptors.
    fn wait(&self, timeout: Duration) -> io::Result<Vec<Token>> {
        let mut pfds: Vec<PollFd<'_>> =
            self.fds.iter().map(|(_, fd, _)| PollFd::new(fd, PollFlags::IN | PollFlags::RDHUP)).collect();
        let ts = Timespec::try_from(timeout).map_err(|_| io::ErrorKind::InvalidInput)?;
        match poll(&mut pfds, Some(&ts)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        let mut ready: Vec<Token> = pfds
            .iter()
            .zip(&self.fds)
            .filter(|(p, _)| !p.revents().is_empty())
            .map(|(_, &(_, _, token))| token)
            .collect();
        ready.dedup(); // a connection has two fds under one token
        Ok(ready)
    }
}

impl Poller for PollLoop {
    fn register(&mut self, fd: BorrowedFd<'_>, token: Token) -> io::Result<()> {
        self.fds.push((fd.as_raw_fd(), fd.try_clone_to_owned()?, token));
        Ok(())
    }

    fn modify(&mut self, fd: BorrowedFd<'_>, token: Token) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        let entry = self.fds.iter_mut().find(|(r, _, _)| *r == raw).ok_or(io::ErrorKind::NotFound)?;
        entry.2 = token;
        Ok(())
    }

    fn deregister(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        self.fds.retain(|(r, _, _)| *r != raw);
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = std::env::args().nth(1).unwrap_or_else(|| "@coroipc-poll".to_string());
    let echo = ServiceBuilder::new(1, |_conn| Ok(())).handler(0, |call| {
        let payload = call.payload();
        let _ = call.respond(payload);
    });
    let mut server = Server::builder().endpoint(&endpoint).service(echo).build()?;
    let handle = server.handle();

    let mut poller = PollLoop::default();
    server.register(&mut poller)?;
    println!("echo service 1 listening on {endpoint}, driven by a poll(2) loop");

    const TICK: Duration = Duration::from_millis(20);
    let mut last_tick = Instant::now();
    let mut last_report = Instant::now();
    while !server.is_stopped() {
        for token in poller.wait(TICK.saturating_sub(last_tick.elapsed()))? {
            server.handle_event(token, &mut poller);
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            server.tick(&mut poller);
        }
        // The application's own work, in the same loop.
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            let s = handle.stats();
            println!(
                "{} fds watched, {} clients, {} requests",
                poller.fds.len(),
                handle.connections().len(),
                s.requests
            );
        }
    }
    Ok(())
}
