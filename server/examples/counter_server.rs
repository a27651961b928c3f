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
//! Notifications go out from a notifier thread (a `Connection` dispatches
//! from any thread), so the event loop never waits for a slow client. A
//! client under flow control (its dispatch ring is full) is waited for up
//! to a second, then reported; nothing is dropped silently.

use std::io::IoSlice;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use coroipc_server::{Connection, Disconnect, DispatchError, Server, ServiceBuilder, Status};

/// The counter service's id.
const COUNTER_SERVICE: u16 = 2;
/// Add to the counter.
const CMD_ADD: u16 = 0;
/// Read the counter.
const CMD_GET: u16 = 1;
/// The dispatch message id of a change notification.
const MSG_CHANGED: u32 = 1;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = std::env::args().nth(1).unwrap_or_else(|| "@coroipc-counter".to_string());
    let counter = Arc::new(AtomicI64::new(0));
    // The connected clients, to notify. A `Connection` is a cheap handle.
    let clients: Arc<Mutex<Vec<Connection>>> = Arc::default();

    let (on_connect, on_disconnect, notify) = (clients.clone(), clients.clone(), clients);
    // The notifier thread: every change, to every client.
    let (changes_tx, changes) = mpsc::channel::<i64>();
    let changes_tx = Mutex::new(changes_tx);
    std::thread::spawn(move || {
        for value in changes {
            let everybody = notify.lock().unwrap().clone();
            for c in everybody {
                let msg = value.to_le_bytes();
                match c.dispatch_timeout(MSG_CHANGED, &[IoSlice::new(&msg)], Duration::from_secs(1)) {
                    Ok(()) | Err(DispatchError::Disconnected) => {} // gone meanwhile
                    Err(e) => eprintln!("client {}: notification not delivered: {e}", c.id()),
                }
            }
        }
    });
    let (add, get) = (counter.clone(), counter);
    let service = ServiceBuilder::new(COUNTER_SERVICE, move |conn| {
        on_connect.lock().unwrap().push(conn.clone());
        println!("client {} connected", conn.id());
        Ok(())
    })
    .on_disconnect(move |conn, _: &mut ()| {
        on_disconnect.lock().unwrap().retain(|c| c.id() != conn.id());
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
        let value = add.fetch_add(delta, Ordering::SeqCst) + delta;
        let _ = call.respond(&value.to_le_bytes());
        let _ = changes_tx.lock().unwrap().send(value);
    })
    .handler(CMD_GET, move |call| {
        let _ = call.respond(&get.load(Ordering::SeqCst).to_le_bytes());
    });

    let server = Server::builder().endpoint(&endpoint).service(service).build()?;
    let handle = server.handle();
    // Statistics now and then, from another thread.
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(10));
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
