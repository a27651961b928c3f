//! One connection's channels, set up by the handshake: the server end
//! ([`ServerChannel`]) and the client end ([`ClientChannel`]).
//!
//! ```text
//!            client process                         server process
//!   requests  Producer ──── request ring (SPSC) ───▶ Consumer    rings request bell
//!   responses Consumer ◀─── response ring (SPSC) ─── Producer    rings response bell
//!   dispatch  Consumer ◀─── dispatch ring (MPSC) ─── MpscProducer (any server thread)
//! ```
//!
//! All three rings and the control block live in one sealed memfd created
//! by the server; it travels to the client with the three bells' eventfds
//! in the handshake reply (`SCM_RIGHTS`). The connection socket stays open
//! for the connection's lifetime: its hang-up is how either side learns that
//! the other died.
//!
//! **Handshake** (server side never blocks, so a slow-loris client cannot
//! stall other connects): the server accepts, reads the fixed-size hello
//! without blocking ([`PendingHandshake`]), learns the peer's uid/gid/pid
//! from the kernel, and only after the application's decision creates any
//! memory ([`PendingHandshake::accept`]) or answers with a refusal that
//! creates nothing ([`PendingHandshake::refuse`]).
//!
//! **Payload stability.** The server copies each request into private
//! memory before anyone sees it ([`ServerChannel::try_recv_request`]): a
//! hostile client cannot change a request while a handler reads it, and no
//! `&[u8]` into client-writable memory exists. The client reads responses
//! and dispatch messages in place (zero-copy): it trusts the server it chose
//! not to rewrite a published record, and bounds are checked regardless.
//!
//! **Where things are.** `error` (the errors of a connection and their
//! mappings), `layout` (size negotiation and the segment layout), `accept`
//! (the server's pending handshake), `server` (the server end), `connect`
//! (the client's handshake: connecting, checking the server, the reply) and
//! `client` (the client's data path, in halves that can sit behind separate
//! locks). Everything public is re-exported here.
#![allow(unsafe_code)]

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::bell::Bell;

mod accept;
mod client;
mod connect;
mod error;
mod layout;
mod server;

pub use accept::PendingHandshake;
pub use client::{ClientChannel, ClientDispatch, ClientRequests, ClientStatus, DispatchPoll};
pub use connect::{ConnectOptions, PendingConnect};
use error::{pop_error, push_error};
pub use error::{ChannelError, ConnectError, HandshakeError};
pub use layout::{layout_for, negotiate, Limits};
pub use server::ServerChannel;

/// Number of descriptors in an accepting reply: memfd + three eventfds.
pub(super) const REPLY_FDS: usize = 4;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a ring endpoint in a state
    // that breaks memory safety; carry on.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bumps the epoch and wakes every kind of sleeper on `point`, whatever it
/// announced: used on close so no sleeper misses the state change.
pub(super) fn wake_all(point: coroipc_ring::WaitPoint<'_>, bell: &Bell) {
    use coroipc_ring::Notify;
    point.epoch_word().fetch_add(1, std::sync::atomic::Ordering::Release);
    bell.wake(point.epoch_word());
}

#[cfg(test)]
mod tests {
    use std::io::IoSlice;
    use std::time::{Duration, Instant};

    use coroipc_ring::record_size;

    use super::*;
    use crate::control::DisconnectReason;
    use crate::handshake::{Accepted, ClientHello, Refusal, RingSizes};
    use crate::message::{MessageHeader, HEADER_LEN};
    use crate::socket::Stream;

    fn pair(limits: Limits, asked: RingSizes) -> (ServerChannel, ClientChannel) {
        let (server_end, client_end) = Stream::pair().unwrap();
        let client = std::thread::spawn(move || {
            let hello = ClientHello { service: 3, flags: 0, sizes: asked };
            ClientChannel::handshake(client_end, &hello, Duration::from_secs(5))
        });
        let mut pending = PendingHandshake::new(server_end).unwrap();
        let hello = loop {
            if let Some(h) = pending.poll_hello().unwrap() {
                break h.unwrap();
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(hello.service, 3);
        let sizes = negotiate(&hello.sizes, &limits).unwrap();
        let server = pending.accept(sizes, &limits).unwrap();
        (server, client.join().unwrap().unwrap())
    }

    #[test]
    fn request_response_and_dispatch_over_a_socketpair() {
        let (server, mut client) = pair(Limits::default(), RingSizes::default());
        assert_eq!(server.sizes(), client.sizes());
        let req = MessageHeader { id: 9, flags: 0, seq: 1 }.encode();
        client.requests().send(&[IoSlice::new(&req), IoSlice::new(b"ping")], None).unwrap();
        let mut buf = Vec::new();
        assert!(server.try_recv_request(&mut buf).unwrap());
        assert_eq!(MessageHeader::decode(&buf).unwrap().seq, 1);
        assert_eq!(&buf[HEADER_LEN..], b"ping");
        server.send_response(&[IoSlice::new(&buf)], Duration::from_secs(1)).unwrap();
        let requests = client.requests();
        requests.wait_response(Some(Instant::now() + Duration::from_secs(5))).unwrap();
        assert_eq!(requests.peek_response().unwrap().unwrap(), &buf[..]);
        requests.release_response();
        assert!(requests.peek_response().unwrap().is_none());

        let dispatch = client.dispatch();
        assert!(dispatch.peek_dispatch().unwrap().is_none(), "nothing yet");
        assert!(!crate::eventfd::EventFd::wait_fd(dispatch.dispatch_fd(), Duration::ZERO), "not readable");
        let _ = server.try_dispatch(&[IoSlice::new(b"event")]).unwrap();
        assert!(
            crate::eventfd::EventFd::wait_fd(dispatch.dispatch_fd(), Duration::from_secs(1)),
            "a pending message makes the fd readable"
        );
        assert_eq!(dispatch.peek_dispatch().unwrap().unwrap(), b"event");
        dispatch.release_dispatch();
        assert!(!crate::eventfd::EventFd::wait_fd(dispatch.dispatch_fd(), Duration::ZERO), "drained");
    }

    #[test]
    fn the_dispatch_fd_rings_after_a_blocking_receive_took_the_last_message_of_its_spin() {
        let (server, mut client) = pair(Limits::default(), RingSizes::default());
        let server = std::sync::Arc::new(server);
        let dispatch = client.dispatch();
        assert!(dispatch.peek_dispatch().unwrap().is_none(), "empty: the fd is armed");
        // A blocking receive spins with the announcement withdrawn; the
        // message published meanwhile does not ring.
        let publisher = {
            let server = server.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                let _ = server.try_dispatch(&[IoSlice::new(b"during the spin")]).unwrap();
            })
        };
        let got = dispatch.peek_dispatch_spin(Duration::from_secs(10)).unwrap().map(<[u8]>::to_vec);
        assert_eq!(got.as_deref(), Some(&b"during the spin"[..]));
        publisher.join().unwrap();
        dispatch.release_dispatch_streaming();
        // The next message must make the fd readable (a poll-first
        // application may take over from here).
        let _ = server.try_dispatch(&[IoSlice::new(b"next")]).unwrap();
        assert!(
            crate::eventfd::EventFd::wait_fd(dispatch.dispatch_fd(), Duration::from_secs(5)),
            "a message after a spun receive rings the fd"
        );
        assert_eq!(dispatch.peek_dispatch().unwrap().unwrap(), b"next");
    }

    #[test]
    fn server_close_wakes_a_blocked_client_at_once() {
        let (server, mut client) = pair(Limits::default(), RingSizes::default());
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            let r = client.requests().wait_response(Some(Instant::now() + Duration::from_secs(10)));
            (r, start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        server.close();
        let (r, waited) = t.join().unwrap();
        // Closed without giving a reason.
        assert_eq!(r, Err(ChannelError::Disconnected(DisconnectReason::Unknown)));
        assert!(waited < Duration::from_secs(2), "woken promptly, waited {waited:?}");
    }

    #[test]
    fn negotiation_clamps_and_refuses() {
        let limits = Limits::default();
        let s = negotiate(&RingSizes::default(), &limits).unwrap();
        assert_eq!(s.max_message_bytes, limits.defaults.max_message_bytes);
        assert!(u64::from(s.request_ring_bytes) >= 2 * record_size(u64::from(s.max_message_bytes)));
        let big = RingSizes { max_message_bytes: limits.max_message_bytes + 1, ..RingSizes::default() };
        assert_eq!(negotiate(&big, &limits), Err(Refusal::TooBig));
        let huge_ring = RingSizes { dispatch_ring_bytes: 1 << 30, ..RingSizes::default() };
        assert_eq!(negotiate(&huge_ring, &limits), Err(Refusal::TooBig));
        let layout = layout_for(&s);
        assert!(Accepted { sizes: s, layout }.validate().is_ok());
    }
}
