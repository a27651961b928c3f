//! A client of the counter service (`cargo run -p coroipc-server --example
//! counter_server`) that waits for notifications by polling the
//! connection's dispatch fd with `poll(2)`, as an event loop would.
//!
//! ```sh
//! cargo run -p coroipc-client --example counter_client -- watch      # print every change
//! cargo run -p coroipc-client --example counter_client -- add [n]    # add n (default 1)
//! ```
//!
//! A last argument names another endpoint (default `@coroipc-counter`).

use coroipc_client::{Client, Error, FlowState};
use rustix::event::{poll, PollFd, PollFlags, Timespec};

const COUNTER_SERVICE: u16 = 2;
const CMD_ADD: u16 = 0;
const CMD_GET: u16 = 1;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let endpoint = args.iter().find(|a| a.starts_with('@') || a.contains('/')).cloned();
    let client = Client::connect(endpoint.as_deref().unwrap_or("@coroipc-counter"), COUNTER_SERVICE)?;
    let mut buf = [0u8; 8];
    match args.first().map(String::as_str) {
        Some("add") => {
            let n: i64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1);
            client.call(CMD_ADD, &n.to_le_bytes(), &mut buf)?;
            println!("counter is now {}", i64::from_le_bytes(buf));
            Ok(())
        }
        _ => watch(&client),
    }
}

/// Prints every notification; waits for them in `poll(2)` on the dispatch fd.
fn watch(client: &Client) -> Result<(), Error> {
    let mut buf = [0u8; 8];
    client.call(CMD_GET, b"", &mut buf)?;
    println!("counter is {}; watching (Ctrl-C to stop)", i64::from_le_bytes(buf));
    loop {
        // Drain what is queued; `TryAgain` arms the fd for the next message.
        loop {
            match client.try_recv_dispatch(&mut buf) {
                Ok(info) => println!("changed: {} (notification #{})", i64::from_le_bytes(buf), info.seq),
                Err(Error::TryAgain) => break,
                // Why: server or service shut down, too slow, server died…
                Err(Error::Disconnected(reason)) => {
                    println!("disconnected: {reason}");
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        if client.dispatch_flow_control() == FlowState::On {
            println!("(the server is queueing notifications for us until we catch up)");
        }
        // `Client: AsFd` (coroipcc_fd_get): the dispatch fd. A server that
        // closes the connection rings it; one that is killed cannot, so
        // wake up now and then to check (the next receive reports it).
        let mut fds = [PollFd::new(client, PollFlags::IN)];
        let check_every = Timespec { tv_sec: 1, tv_nsec: 0 };
        match poll(&mut fds, Some(&check_every)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(Error::Io(e.into())),
        }
    }
}
