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
//! * Nothing is silently dropped. [`Connection::dispatch`] never fails for
//!   want of room (coroipc's `dispatch_send`): a message the client's ring
//!   cannot take waits in the connection's outbound queue, which the server
//!   drains into the ring in order as the client reads; the client sees
//!   dispatch flow control on meanwhile. The queue is bounded in bytes
//!   ([`OutboundLimits`], per service); past the bound the service's
//!   [`OverflowPolicy`] either makes the dispatcher wait (then "timed
//!   out") or disconnects the client, which learns it was too slow.
//!   [`Connection::try_dispatch`] never queues: "try again".
//! * A client that is hostile, slow or killed affects only its own
//!   connection: a corrupt ring closes that connection with a logged
//!   reason; a client that does not read stalls only itself; the event loop
//!   never blocks on one client; memory per connection is bounded.
//! * A panic in user code costs at most that call or that connection,
//!   never the server. A request handler, admission callback or handler
//!   selector that panics gets its request answered `Status::Invalid` (the
//!   unwinding drops the `Call`, or the `Responder` it deferred to, and
//!   dropping answers); the connection goes on. A connect callback that
//!   panics closes that connection; a disconnect callback that panics
//!   counts as [`Disconnect::Done`]; an authentication callback that panics
//!   refuses that client with [`Refusal::AccessDenied`]. Each panic is
//!   logged through `log` at error level. (A build with `panic = "abort"`
//!   aborts the process, as Rust does.)
//! * Resources are bounded and the server refuses politely when they run
//!   out, never spins: handshakes in progress are bounded in time and
//!   number ([`ServerBuilder::max_pending_handshakes`], the oldest dropped);
//!   connections by [`ServerBuilder::max_connections`], lowered to what the
//!   process's descriptor limit holds (refusal [`Refusal::ConnectionLimit`],
//!   also when `accept` runs out of descriptors); ring memory by a budget
//!   in all and per uid ([`ServerBuilder::memory_budget`], default 1 GiB and
//!   256 MiB; refusal [`Refusal::NoMemory`]).
//! * No lock the event loop takes is held while a thread waits for a
//!   client (a deferred answer waiting for ring space waits without it).
//! * A client always learns why the server closed its connection
//!   ([`DisconnectReason`]: server or service shutdown, disconnected by the
//!   service, too slow, protocol violation, corrupt memory; "server died"
//!   if it could not say).
//!
//! ## Limits and sizes
//!
//! * **Payload limit.** A connection's largest message (request, response
//!   or dispatch, the 16-byte header included) is negotiated at connect:
//!   the client's ask, or [`Limits::defaults`] (8 KiB), capped by
//!   [`Limits::max_message_bytes`] (1 MiB by default; a larger ask is
//!   refused "too big"). [`Connection::max_payload`] and
//!   [`Call::max_payload`] give the payload part; larger payloads are
//!   refused with `TooBig`, never truncated.
//! * **Ring sizes** are rounded up to a power of two, at least twice the
//!   largest record (so any message fits) and at least the ring minimum;
//!   an ask above [`Limits::max_ring_bytes`] is refused.
//!
//! ## Logging and shutdown
//!
//! The server logs through the [`log`](https://docs.rs/log) facade
//! (connection closes and their reasons at `debug`, refusals and bad
//! clients at `info`, resource failures at `warn`); install any logger to
//! see it. [`ServerHandle::shutdown`] (from any thread, e.g. a signal
//! thread: see `examples/echo_server.rs`) closes every connection — each
//! client learns [`DisconnectReason::ServerShutdown`] at once, blocked
//! calls included — runs every disconnect callback, and makes
//! [`Server::run`] return; dropping the [`Server`] then removes a
//! filesystem endpoint's socket file. Responses and dispatch messages sent
//! later through kept `Connection`s or `Responder`s fail with
//! `Disconnected`, never panic.
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

/// Typed commands (cargo feature `typed`): see [`ServiceBuilder::typed`].
#[cfg(feature = "typed")]
pub use coroipc_transport::typed;
