//! # coroipc-client — layer 3 of coroipc-rs (coroipcc)
//!
//! The client half of the coroipc API: connect to one service of a server,
//! call it synchronously (copying or zero-copy receive), pipeline requests
//! whose responses come back in any order, receive dispatch messages
//! through a pollable fd, and see flow control in both directions.
//! Contains no `unsafe`.
//!
//! ## Guarantees
//!
//! * Every call returns: with the response, with the service's error, with
//!   `Timeout` when asked for one, or with `Disconnected(reason)` within 100 ms
//!   of the server's death.
//! * Responses are matched to requests by sequence number: a late answer to
//!   a timed-out call is never taken for the answer to a later one.
//! * A server that breaks the protocol yields `Error::Protocol`, never a
//!   panic or an out-of-bounds read.
//!
//! ## Threads and locks
//!
//! A [`Client`] is shared by threads. Its request/response half and its
//! dispatch half sit behind separate locks, so dispatch and calls never wait
//! for each other. No lock is held across a sleep, except by the zero-copy
//! guards, which hold their half's lock while they lend a message in place:
//!
//! * A caller sends under the request lock, then waits for *its own*
//!   answer: one waiting thread (the *sleeper*) sleeps on the response
//!   ring without any lock; when it wakes it reads every response that
//!   arrived, keeps its own, stashes the others' answers for their callers
//!   and posts a bulletin that wakes them. Calls from several threads are
//!   pipelined: an answer the server gives at once is never queued behind
//!   another thread's slow one.
//! * Every lock wait is bounded by the call's timeout; a thread that holds
//!   a guard and calls what needs that guard's lock gets
//!   [`Error::GuardHeld`] instead of a deadlock.
//!
//! ## Example
//!
//! ```no_run
//! use coroipc_client::Client;
//!
//! let client = Client::connect("@coroipc-echo", 1)?;
//! let mut buf = [0u8; 64];
//! let n = client.call(0, b"hello", &mut buf)?;
//! assert_eq!(&buf[..n], b"hello");
//! # Ok::<(), coroipc_client::Error>(())
//! ```
#![forbid(unsafe_code)]

mod builder;
mod client;
mod core;
mod error;
mod guards;
#[cfg(feature = "tokio")]
pub mod tokio;
#[cfg(feature = "typed")]
pub mod typed;

pub use builder::{ClientBuilder, PendingClient};
pub use client::{Client, DispatchInfo, Sizes, Ticket};
pub use coroipc_ring::FlowState;
pub use coroipc_transport::control::DisconnectReason;
pub use coroipc_transport::message::Status;
pub use coroipc_transport::socket::PeerCred;
pub use coroipc_transport::waiter::{SleepMode, WaitPolicy};
pub use error::{Error, Result};
pub use guards::{DispatchGuard, ResponseGuard};
#[cfg(feature = "tokio")]
pub use tokio::{AsyncClient, Dispatch, DispatchStream};
