//! # coroipc-server — layer 3 of coroipc-rs (coroipcs)
//!
//! The server half of the coroipc API over the shared-memory transport:
//! services (up to 65536, each with up to 65536 command ids) with
//! per-connection state, connect and disconnect callbacks, a handler
//! selector, request admission, responses now or later from any thread,
//! dispatch messages with flow control, authentication from kernel
//! credentials, statistics, and an abstracted poll system with a built-in
//! epoll loop. Contains no `unsafe`.
//!
//! ## Guarantees
//!
//! * A request reaches its handler in server-private memory: a client
//!   cannot change it while it is read.
//! * Every request that wants an answer gets exactly one; a handler that
//!   forgets answers "invalid".
//! * Nothing is silently dropped: dispatch under flow control returns
//!   "try again" (or waits), never discards.
//! * A client that is hostile, slow or killed affects only its own
//!   connection: a corrupt ring closes that connection with a logged
//!   reason; a client that does not read stalls only itself; the event loop
//!   never blocks on one client.
//!
//! ## Example
//!
//! A complete server and client (in one process here; normally the client
//! is another process — see `examples/` and the README):
//!
//! ```
//! use coroipc_client::Client;
//! use coroipc_server::{Server, ServiceBuilder};
//!
//! // Service 1: echo every request on command 0; count requests per connection.
//! let echo = ServiceBuilder::new(1, |_conn| Ok(0u64)).handler(0, |mut call| {
//!     *call.state() += 1;
//!     let payload = call.payload();
//!     let _ = call.respond(payload);
//! });
//! let endpoint = format!("@coroipc-doc-echo-{}", std::process::id()); // or a path
//! let server = Server::builder().endpoint(&endpoint).service(echo).build()?;
//! let (handle, thread) = server.spawn()?; // or `server.run()` on this thread
//!
//! let client = Client::connect(&endpoint, 1)?;
//! let mut buf = [0u8; 64];
//! let n = client.call(0, b"hello", &mut buf)?;
//! assert_eq!(&buf[..n], b"hello");
//! assert_eq!(handle.stats().requests, 1);
//!
//! handle.shutdown(); // closes every connection, waking its client
//! thread.join().expect("server thread")?;
//! assert!(client.call(0, b"again", &mut buf).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod connection;
mod error;
mod outbound;
pub mod poll;
mod server;
mod service;
mod stats;

pub use connection::{Connection, ConnectionId, Credentials};
pub use coroipc_ring::FlowState;
pub use coroipc_transport::channel::Limits;
pub use coroipc_transport::control::DisconnectReason;
pub use coroipc_transport::handshake::{Refusal, RingSizes};
pub use coroipc_transport::message::Status;
pub use coroipc_transport::socket::{Endpoint, PeerCred};
pub use error::{DispatchError, RespondError, ServerBuildError};
pub use outbound::{OutboundLimits, OverflowPolicy};
pub use poll::{EpollPoller, Poller, Token};
pub use server::{AuthFn, Server, ServerBuilder, ServerHandle, LISTENER_TOKEN, WAKER_TOKEN};
pub use service::{Admission, Call, Disconnect, Handler, Request, Responder, ServiceBuilder};
pub use stats::Stats;
