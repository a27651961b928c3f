//! A poll-first client of the counter service (`cargo run -p
//! coroipc-server --example counter_server`): one `poll(2)` over the
//! connection's dispatch fd and stdin, as an application's own event loop
//! would. It polls *before* it ever receives: the dispatch fd is
//! level-triggered (coroipc's `coroipcc_fd_get`), readable exactly while a
//! notification is pending — from connect on — and readable when the
//! server goes away, even killed.
//!
//! ```sh
//! cargo run -p coroipc-client --example counter_client -- watch      # print every change; type "add 3"
//! cargo run -p coroipc-client --example counter_client -- add [n]    # add n (default 1)
//! ```
//!
//! A last argument names another endpoint (default `@coroipc-counter`).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;

use coroipc_client::{Client, Error, FlowState};
use rustix::event::{poll, PollFd, PollFlags};

const COUNTER_SERVICE: u16 = 2;
const CMD_ADD: u16 = 0;
const CMD_GET: u16 = 1;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let endpoint = args.iter().find(|a| a.starts_with('@') || a.contains('/')).cloned();
    let client = Client::connect(endpoint.as_deref().unwrap_or("@coroipc-counter"), COUNTER_SERVICE)?;
    match args.first().map(String::as_str) {
        Some("add") => {
            let n: i64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1);
            println!("counter is now {}", add(&client, n)?);
            Ok(())
        }
        _ => watch(&client, std::io::stdin().lock(), &mut std::io::stdout()),
    }
}

/// Adds `n`; returns the new value.
fn add(client: &Client, n: i64) -> Result<i64, Error> {
    let mut buf = [0u8; 8];
    client.call(CMD_ADD, &n.to_le_bytes(), &mut buf)?;
    Ok(i64::from_le_bytes(buf))
}

/// Prints every notification and runs the commands typed on `input`
/// (`add N`), waiting for both in one `poll(2)`; returns at the end of
/// `input` or when the server is gone.
pub fn watch(client: &Client, input: impl BufRead + AsFd, out: &mut impl Write) -> Result<(), Error> {
    let mut buf = [0u8; 8];
    client.call(CMD_GET, b"", &mut buf)?;
    writeln!(out, "counter is {}; watching (type \"add N\")", i64::from_le_bytes(buf))
        .map_err(Error::from)?;
    let input_fd = input.as_fd().try_clone_to_owned().map_err(Error::from)?;
    let mut lines = BufReader::new(input);
    loop {
        // `Client: AsFd` is the dispatch fd. No timeout needed: a server
        // that is killed hangs up its socket, which makes the fd readable.
        let mut fds = [PollFd::new(client, PollFlags::IN), PollFd::new(&input_fd, PollFlags::IN)];
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(Error::from(std::io::Error::from(e))),
        }
        if !fds[0].revents().is_empty() {
            // Readable: one notification (or the reason the server went).
            match client.try_recv_dispatch(&mut buf) {
                Ok(info) => {
                    writeln!(out, "changed: {} (notification #{})", i64::from_le_bytes(buf), info.seq)
                        .map_err(Error::from)?;
                    if client.dispatch_flow_control() == FlowState::On {
                        writeln!(out, "(the server is queueing notifications until we catch up)")
                            .map_err(Error::from)?;
                    }
                }
                Err(Error::TryAgain) => {}
                // Why: server or service shut down, too slow, server died…
                Err(Error::Disconnected(reason)) => {
                    writeln!(out, "disconnected: {reason}").map_err(Error::from)?;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        if !fds[1].revents().is_empty() {
            // A line (and whatever else is buffered already).
            loop {
                let mut line = String::new();
                if lines.read_line(&mut line).map_err(Error::from)? == 0 {
                    return Ok(());
                }
                let mut words = line.split_whitespace();
                match (words.next(), words.next().map(str::parse::<i64>)) {
                    (Some("add"), Some(Ok(n))) => match add(client, n) {
                        Ok(v) => writeln!(out, "counter is now {v}"),
                        Err(e) => writeln!(out, "add failed: {e}"),
                    },
                    (None, _) => Ok(()),
                    _ => writeln!(out, "commands: add N"),
                }
                .map_err(Error::from)?;
                if lines.buffer().is_empty() {
                    break;
                }
            }
        }
    }
}
