//! A counter service with dispatch notifications: command 0 adds the
//! request's `i64` (little-endian; empty means 1) to a shared counter, and
//! every connected client receives the new value as a dispatch message
//! (id 1, `i64` LE). Command 1 reads the counter.
//!
//! ```sh
//! cargo run -p coroipc-server --example counter_server             # listens on @coroipc-counter
//! cargo run -p coroipc-client --example counter_client -- watch    # terminal 2: prints every change
//! cargo run -p coroipc-client --example counter_client -- add 5    # terminal 3
//! ```
//!
//! Notifications go out with [`Connection::dispatch`] straight from the
//! handler: it never blocks. A client whose dispatch ring is full has its
//! notifications queued in the server (up to 64 KiB; it sees dispatch flow
//! control on meanwhile) and drained into its ring in order as it reads; a
//! client that falls further behind is disconnected and told it was too
//! slow. So one client that stops reading never slows the others, and the
//! server's memory stays bounded whatever its clients do.
//!
//! Bad input gets an error answer: an amount that is not 8 bytes is
//! "invalid", an addition that would overflow answers service error
//! [`ERR_OVERFLOW`] and leaves the counter as it was.

use std::sync::{Arc, Mutex, PoisonError};

use coroipc_server::{
    Connection, Disconnect, DispatchError, OutboundLimits, OverflowPolicy, Server, ServiceBuilder, Status,
};

/// The counter service's id.
pub const COUNTER_SERVICE: u16 = 2;
/// Add to the counter.
pub const CMD_ADD: u16 = 0;
/// Read the counter.
pub const CMD_GET: u16 = 1;
/// The dispatch message id of a change notification.
pub const MSG_CHANGED: u32 = 1;
/// The service error code of an addition that would overflow.
pub const ERR_OVERFLOW: u32 = Status::SERVICE_BASE + 1;
/// Notifications a slow client may have waiting in the server, in bytes.
pub const MAX_QUEUED_BYTES: usize = 64 << 10;

/// The counter and the clients to notify. Handlers run on the server's
/// event loop thread one at a time, so one lock keeps "add, then notify"
/// in the same order for every client.
#[derive(Default)]
struct Counter {
    value: i64,
    clients: Vec<Connection>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = std::env::args().nth(1).unwrap_or_else(|| "@coroipc-counter".to_string());
    run(&endpoint)
}

/// The counter service.
pub fn service() -> ServiceBuilder<()> {
    let counter: Arc<Mutex<Counter>> = Arc::default();
    let (on_connect, on_disconnect, add, get) = (counter.clone(), counter.clone(), counter.clone(), counter);
    ServiceBuilder::new(COUNTER_SERVICE, move |conn| {
        on_connect.lock().unwrap_or_else(PoisonError::into_inner).clients.push(conn.clone());
        println!("client {} connected", conn.id());
        Ok(())
    })
    .outbound(OutboundLimits { max_queued_bytes: MAX_QUEUED_BYTES, overflow: OverflowPolicy::Disconnect })
    .on_disconnect(move |conn, _: &mut ()| {
        on_disconnect.lock().unwrap_or_else(PoisonError::into_inner).clients.retain(|c| c.id() != conn.id());
        println!("client {} left", conn.id());
        Disconnect::Done
    })
    .handler(CMD_ADD, move |call| {
        let delta = match call.payload() {
            [] => 1,
            p => match <[u8; 8]>::try_from(p) {
                Ok(b) => i64::from_le_bytes(b),
                Err(_) => {
                    let _ = call.respond_status(Status::Invalid);
                    return;
                }
            },
        };
        let mut counter = add.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(value) = counter.value.checked_add(delta) else {
            let _ = call.respond_status(Status::Service(ERR_OVERFLOW));
            return;
        };
        counter.value = value;
        let _ = call.respond(&value.to_le_bytes());
        for c in &counter.clients {
            match c.dispatch(MSG_CHANGED, &value.to_le_bytes()) {
                Ok(()) | Err(DispatchError::Disconnected) => {} // gone meanwhile
                Err(DispatchError::ClientTooSlow) => println!("client {}: too slow, disconnected", c.id()),
                Err(e) => eprintln!("client {}: notification not delivered: {e}", c.id()),
            }
        }
    })
    .handler(CMD_GET, move |call| {
        let value = get.lock().unwrap_or_else(PoisonError::into_inner).value;
        let _ = call.respond(&value.to_le_bytes());
    })
}

/// Serves the counter on `endpoint` until the process ends.
///
/// # Errors
///
/// The server's build or event-loop error.
pub fn run(endpoint: &str) -> Result<(), Box<dyn std::error::Error>> {
    let server = Server::builder().endpoint(endpoint).service(service()).build()?;
    let handle = server.handle();
    // Statistics now and then, from another thread.
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(10));
        let s = handle.stats();
        println!(
            "{} clients; {} requests, {} notifications, flow control on {} times",
            handle.connections().len(),
            s.requests,
            s.dispatched,
            s.flow_control_on
        );
    });
    println!("counter service {COUNTER_SERVICE} listening on {endpoint}");
    server.run()?;
    Ok(())
}
