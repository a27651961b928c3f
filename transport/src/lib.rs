//! # coroipc-transport — layer 2 of coroipc-rs
//!
//! The operating-system building blocks under the coroipc API: shared
//! memory, wake-ups, the socket rendezvous and the handshake codec. It sits
//! between the rings (`coroipc-ring`, layer 1: pure memory, no syscalls) and
//! the coroipc semantics (`coroipc-server`, `coroipc-client`, layer 3: no
//! `unsafe`). Linux only.
//!
//! One concept per module:
//!
//! - [`segment`]: sealed memfd segments (`F_SEAL_SHRINK | F_SEAL_GROW |
//!   F_SEAL_SEAL`), created by the server and checked by the receiver
//!   (kind, exact size, seals) before mapping, so a peer can never truncate
//!   the memory under us (no `SIGBUS`) and nothing is left in `/dev/shm`.
//! - [`futex`]: shared (cross-process) futex wait/wake on a 32-bit word in
//!   a segment.
//! - [`eventfd`]: a nonblocking eventfd, the pollable wake-up handed to the
//!   application's event loop (reads and writes never block, even if the
//!   peer clears `O_NONBLOCK` on the shared file description).
//! - [`bell`]: one direction's wake-up: the ring's wait protocol
//!   ([`coroipc_ring::Notify`]) over a futex word and an eventfd, waking
//!   each sleeper where it sleeps.
//! - [`waiter`]: adaptive waiting (spin for a budget, then sleep on the
//!   futex or in `poll(2)`), noticing a dead peer while asleep.
//! - [`socket`]: Unix stream socket endpoints (path or abstract), a
//!   nonblocking listener that replaces only stale socket files, descriptor
//!   passing with `SCM_RIGHTS` (close-on-exec, truncation is an error), and
//!   the peer's kernel-given credentials (`SO_PEERCRED`, read in the
//!   private `peercred` module, which also makes sockets refuse the peer's
//!   descriptors with `SO_PASSRIGHTS`).
//! - [`handshake`]: the versioned, fixed-layout hello/reply codec; its
//!   decoders are total (every byte string decodes or yields a typed error)
//!   and validate the segment layout a server announces.
//! - [`control`]: the connection's control block in the segment (each
//!   side's state word, the disconnect reason, the dispatch-queued flag).
//! - [`message`]: the 16-byte message header and the response statuses.
//! - [`channel`]: the connection layer on top: the server's nonblocking
//!   handshake and [`channel::ServerChannel`], the client's connect and
//!   [`channel::ClientChannel`] — the three rings placed in one segment,
//!   woken through bells, flow control, peer-death detection.
//! - `typed` (cargo feature `typed`): typed commands, serde over postcard.
//!
//! What a hostile peer can and cannot do here: it can send any bytes and any
//! descriptors, and write any word of the shared segment at any moment; the
//! handshake decoders, [`segment::Segment::from_fd`],
//! [`eventfd::EventFd::from_fd`] and [`socket::recv_with_fds`] turn every
//! malformed input into an error, never a panic, an unbounded allocation, a
//! blocking read or an out-of-bounds mapping, and the channels turn every
//! corrupt ring or control word into a typed error for that connection.
//!
//! # Example
//!
//! A server creates a segment and passes it to a client over a socket; the
//! client validates and maps it, and both see the same memory:
//!
//! ```
//! use coroipc_transport::segment::Segment;
//! use coroipc_transport::socket::Stream;
//! use std::os::fd::AsFd;
//! use std::sync::atomic::Ordering;
//!
//! let (server_sock, client_sock) = Stream::pair()?;
//!
//! let seg = Segment::create(64 * 1024)?;
//! server_sock.send_with_fds(b"S", &[seg.as_fd()])?;
//!
//! let mut byte = [0u8; 1];
//! let mut fds = client_sock.recv_exact_with_fds(&mut byte, 1)?;
//! let mapped = Segment::from_fd(fds.remove(0), 64 * 1024)?;
//!
//! seg.atomic_u32(0).store(7, Ordering::Release);
//! assert_eq!(mapped.atomic_u32(0).load(Ordering::Acquire), 7);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bell;
pub mod channel;
pub mod control;
pub mod eventfd;
pub mod futex;
pub mod handshake;
pub mod message;
mod peercred;
pub mod segment;
pub mod socket;
#[cfg(feature = "typed")]
pub mod typed;
pub mod waiter;

#[doc(hidden)]
pub use handshake::fuzz_decode;
