//! The server end of an established connection.

use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coroipc_ring::{
    Announcement, Consumer, FlowChange, FlowState, MpscProducer, PopError, Producer, PushError,
};

use crate::bell::Bell;
use crate::control::{Control, DisconnectReason, Side};
use crate::handshake::{Accepted, RingSizes};
use crate::segment::Segment;
use crate::socket::{release_in_background, PeerCred, Stream};
use crate::waiter::{wait_until, Liveness, WaitPolicy};

use super::{lock, pop_error, push_error, wake_all, ChannelError};

#[derive(Debug)]
pub(super) struct RequestSide {
    pub(super) consumer: Consumer,
    /// The poll-mode announcement made by [`ServerChannel::arm_requests`].
    pub(super) armed: Option<Announcement>,
}

/// The server end of one connection. `Sync`: requests are read by the
/// thread that runs the event loop, responses and dispatch messages may be
/// sent from any thread.
#[derive(Debug)]
pub struct ServerChannel {
    pub(super) stream: Stream,
    pub(super) peer: PeerCred,
    pub(super) accepted: Accepted,
    pub(super) requests: Mutex<RequestSide>,
    pub(super) responses: Mutex<Producer>,
    pub(super) dispatch: MpscProducer,
    pub(super) request_bell: Bell,
    pub(super) response_bell: Bell,
    pub(super) dispatch_bell: Bell,
    pub(super) segment: Arc<Segment>,
}

impl ServerChannel {
    fn control(&self) -> Control<'_> {
        Control::new(&self.segment, self.accepted.layout.control.offset)
    }

    fn liveness(&self) -> Liveness<'_> {
        Liveness { stream: &self.stream, control: self.control(), peer: Side::Client }
    }

    /// The client's credentials, from the kernel.
    pub fn peer(&self) -> PeerCred {
        self.peer
    }

    /// The negotiated sizes.
    pub fn sizes(&self) -> RingSizes {
        self.accepted.sizes
    }

    /// Largest message (header included).
    pub fn max_message(&self) -> usize {
        self.accepted.sizes.max_message_bytes as usize
    }

    /// The connection socket: register it for readability/hang-up with the
    /// event loop to notice the client's death at once.
    pub fn socket_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// The request bell's eventfd: readable after [`arm_requests`](Self::arm_requests) once a
    /// request arrives.
    pub fn request_fd(&self) -> BorrowedFd<'_> {
        self.request_bell.as_fd()
    }

    /// Whether a request is waiting (or the ring is corrupt, which the next
    /// [`try_recv_request`](Self::try_recv_request) reports).
    pub fn has_request(&self) -> bool {
        lock(&self.requests).consumer.has_data_uncached()
    }

    /// Copies the next request into `buf` (resized to fit) and frees its
    /// space; returns `false` if there is none.
    ///
    /// # Errors
    ///
    /// [`ChannelError::Corrupt`] if the client corrupted the ring.
    pub fn try_recv_request(&self, buf: &mut Vec<u8>) -> Result<bool, ChannelError> {
        let mut side = lock(&self.requests);
        let grant = match side.consumer.try_peek() {
            Ok(g) => g,
            Err(PopError::Empty) => return Ok(false),
            Err(e) => return Err(pop_error(e)),
        };
        // Resize without clearing first: a reused buffer is zero-filled only
        // where it grows, not on every request (for `rr1m` that was a third
        // pass over each megabyte).
        buf.resize(grant.len(), 0);
        grant.copy_to(buf);
        // Frees the space and wakes a client blocked on a full request ring.
        let _ = grant.release_notify(&self.request_bell);
        Ok(true)
    }

    /// Prepares for the event loop to sleep: announces on the request ring
    /// that this side waits in poll on [`request_fd`](Self::request_fd).
    /// Returns `true` if a request arrived meanwhile (then do not sleep).
    pub fn arm_requests(&self) -> bool {
        let mut side = lock(&self.requests);
        if side.armed.is_none() {
            let a = side.consumer.data_wait().announce_poll();
            side.armed = Some(a);
        }
        side.consumer.has_data_uncached()
    }

    /// Waits until a request is waiting, with `policy` (spin, then sleep on
    /// the request ring's futex or in `poll(2)` on the request bell and the
    /// socket): for a server that gives a connection its own thread, and for
    /// the wake-path benches. An event-loop server uses
    /// [`arm_requests`](Self::arm_requests)/[`request_fd`](Self::request_fd) instead.
    ///
    /// Does not hold the request lock while it sleeps.
    ///
    /// # Errors
    ///
    /// `Timeout` once `deadline` passed, `PeerGone`.
    pub fn wait_request(&self, deadline: Option<Instant>, policy: WaitPolicy) -> Result<(), ChannelError> {
        // An owned handle: the lock is not held while sleeping.
        let handle = lock(&self.requests).consumer.data_wait_handle();
        wait_until(
            handle.point(),
            &self.request_bell,
            || self.has_request(),
            self.liveness(),
            deadline,
            policy,
        )
        .map_err(Into::into)
    }

    /// [`disarm_requests`](Self::disarm_requests) without draining the request bell, for an
    /// event loop that watches it edge-triggered (then a pending count in
    /// the eventfd does no harm, and the `read` is saved).
    pub fn disarm_requests_keep_bell(&self) {
        let mut side = lock(&self.requests);
        if let Some(a) = side.armed.take() {
            side.consumer.data_wait().cancel(a);
        }
    }

    /// Withdraws the announcement made by [`arm_requests`](Self::arm_requests) and drains the
    /// request bell (after the event loop woke up).
    pub fn disarm_requests(&self) {
        let mut side = lock(&self.requests);
        if let Some(a) = side.armed.take() {
            side.consumer.data_wait().cancel(a);
        }
        self.request_bell.drain();
    }

    /// Sends a response (gathered from `parts`), waiting up to `timeout`
    /// for ring space if the client is slow to read. The response lock is
    /// held for the copy only, never while waiting.
    ///
    /// # Errors
    ///
    /// `TooBig`, `Timeout`, `PeerGone`, `Corrupt`.
    pub fn send_response(&self, parts: &[IoSlice<'_>], timeout: Duration) -> Result<(), ChannelError> {
        let max = self.max_message();
        // The clock is read only if the ring is full.
        let mut deadline = None;
        loop {
            let mut responses = lock(&self.responses);
            match responses.try_push_vectored(parts) {
                Ok(_) => {
                    responses.data_wait().notify(&self.response_bell);
                    return Ok(());
                }
                Err(PushError::Full) => {
                    let len: usize = parts.iter().map(|p| p.len()).sum();
                    let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeout);
                    // Wait without the lock: the event loop takes it to
                    // check response space, and a client that never reads
                    // would otherwise freeze the loop for `timeout` per
                    // waiting answer. An owned handle keeps the wait point.
                    let handle = responses.space_wait_handle();
                    drop(responses);
                    wait_until(
                        handle.point(),
                        &self.response_bell,
                        || lock(&self.responses).has_space_uncached(len),
                        self.liveness(),
                        Some(deadline),
                        WaitPolicy::default(),
                    )?;
                }
                Err(e) => return Err(push_error(e, max)),
            }
        }
    }

    /// Whether a response of `len` bytes fits in the response ring now.
    /// The event loop checks this before it takes a request, so that
    /// answering never blocks it (a client that does not read its responses
    /// only stalls its own connection).
    pub fn response_space_for(&self, len: usize) -> bool {
        lock(&self.responses).has_space(len)
    }

    /// Sends a dispatch message without blocking.
    ///
    /// # Errors
    ///
    /// [`ChannelError::TryAgain`] while flow control is on or the ring is
    /// full; `TooBig`, `Corrupt`, `PeerGone`.
    pub fn try_dispatch(&self, parts: &[IoSlice<'_>]) -> Result<FlowChange, ChannelError> {
        if self.dispatch.flow_state() == FlowState::On {
            return Err(ChannelError::TryAgain);
        }
        if !self.control().is_open(Side::Client) {
            return Err(ChannelError::PeerGone);
        }
        let change = self.dispatch.try_push_vectored(parts).map_err(|e| push_error(e, self.max_message()))?;
        self.dispatch.data_wait().notify(&self.dispatch_bell);
        Ok(change)
    }

    /// Sends a dispatch message, waiting up to `timeout` while flow
    /// control is on or the ring is full.
    ///
    /// # Errors
    ///
    /// As [`try_dispatch`](Self::try_dispatch), with `Timeout` instead of
    /// `TryAgain`.
    pub fn dispatch_timeout(
        &self,
        parts: &[IoSlice<'_>],
        timeout: Duration,
    ) -> Result<FlowChange, ChannelError> {
        let deadline = Instant::now() + timeout;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        loop {
            match self.try_dispatch(parts) {
                Err(ChannelError::TryAgain) => {}
                other => return other,
            }
            self.wait_dispatch_room(len, deadline)?;
        }
    }

    /// Waits until flow control is off and a dispatch message of `len`
    /// bytes fits (another producer may still take the room first: then
    /// [`try_dispatch`](Self::try_dispatch) says `TryAgain` and the caller
    /// waits again). Lets a caller that serialises its own dispatchers
    /// wait without holding its lock.
    ///
    /// # Errors
    ///
    /// `Timeout` once `deadline` passed, `PeerGone`.
    pub fn wait_dispatch_room(&self, len: usize, deadline: Instant) -> Result<(), ChannelError> {
        let dispatch = &self.dispatch;
        wait_until(
            dispatch.space_wait(),
            &self.dispatch_bell,
            || dispatch.flow_state() == FlowState::Off && dispatch.has_space_uncached(len),
            self.liveness(),
            Some(deadline),
            WaitPolicy::default(),
        )
        .map_err(Into::into)
    }

    /// The dispatch ring's flow-control state.
    pub fn dispatch_flow(&self) -> FlowState {
        self.dispatch.flow_state()
    }

    /// Pauses or resumes reading requests (request-side flow control,
    /// visible to the client).
    pub fn set_request_paused(&self, paused: bool) {
        self.control().set_request_paused(paused);
        if !paused {
            lock(&self.requests).consumer.space_wait().notify(&self.request_bell);
        }
    }

    /// Whether request reading is paused.
    pub fn request_paused(&self) -> bool {
        self.control().request_paused()
    }

    /// Whether the client marked the connection closed (a clean
    /// disconnect): one load of its state word, no syscall — cheap enough
    /// for a loop that polls its busy connections.
    pub fn peer_closed(&self) -> bool {
        !self.control().is_open(Side::Client)
    }

    /// Whether the client is still there (state word and socket).
    pub fn peer_alive(&self) -> bool {
        self.liveness().peer_alive()
    }

    /// Sets the control block's "dispatch messages queued" flag, which the
    /// client reads as dispatch flow control (see [`crate::control`]).
    pub fn set_dispatch_queued(&self, queued: bool) {
        self.control().set_dispatch_queued(queued);
    }

    /// Records why the server is about to close the connection (the first
    /// reason given wins); the client reads it once it sees the close.
    pub fn set_disconnect_reason(&self, reason: DisconnectReason) {
        self.control().set_disconnect_reason(reason);
    }

    /// Closes the connection because the service or the server shuts down:
    /// the client reports "shutting down" rather than "connection lost".
    pub fn close_shutting_down(&self) {
        self.control().close_shutting_down();
        self.close();
    }

    /// Closes the connection from the server side: marks it closed in the
    /// control block, wakes every sleeper on the client side, and shuts the
    /// socket down. Idempotent.
    pub fn close(&self) {
        self.control().close(Side::Server);
        wake_all(lock(&self.responses).data_wait(), &self.response_bell);
        wake_all(self.dispatch.data_wait(), &self.dispatch_bell);
        wake_all(lock(&self.requests).consumer.space_wait(), &self.request_bell);
        let _ = self.stream.as_std().shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for ServerChannel {
    fn drop(&mut self) {
        self.close();
        // Where the kernel cannot refuse the client's descriptors, the ones
        // it queued on the socket die with its last close: not here.
        release_in_background(self.stream.as_fd(), true);
    }
}
