//! The client's data path: one connection, in two halves that can sit
//! behind separate locks.
//!
//! [`ClientChannel`] is what a connect returns. [`ClientChannel::split`]
//! cuts it into a [`ClientRequests`] (the request ring it produces into and
//! the response ring it consumes) and a [`ClientDispatch`] (the dispatch ring
//! it consumes), plus a [`ClientStatus`]: an owned, shareable handle that
//! answers questions about the connection (is the server alive, why did it
//! go, flow control) and sleeps until a response is published, without
//! borrowing either half. A client library puts each half behind its own
//! lock, so a thread holding a zero-copy dispatch message never stands in
//! the way of calls, and a thread waiting for its response holds no lock
//! while it sleeps. The connection closes when the last of the three drops.
//!
//! ## The dispatch fd is level-triggered
//!
//! [`ClientDispatch::dispatch_fd`] is readable exactly while a dispatch
//! message is pending (coroipc's `coroipcc_fd_get` contract), from connect
//! on. The half keeps the dispatch eventfd's counter in step with the ring:
//!
//! | state | announced as poller | eventfd counter |
//! |-------|---------------------|-----------------|
//! | ring empty | yes | 0 (a publish rings it) |
//! | ring holds messages | no | > 0 |
//!
//! Entering "empty" (a peek or a release that finds nothing) announces,
//! drains the counter, then looks at the ring again: a message published
//! before the drain is seen by that look (and the counter is set by this
//! side), one published after it rings the eventfd. Entering "holds
//! messages" from "empty" withdraws the announcement without draining: the
//! message that is there was published after the drain, so its publication
//! rang. No eventfd write is spent per message while the ring stays
//! non-empty.
//!
//! Invariant: *not announced and not quiet ⇒ the counter is above 0* (only
//! entering "empty" drains it, and that either announces or sets the
//! counter again). A blocking receive
//! ([`ClientDispatch::peek_dispatch_spin`]) withdraws the announcement while
//! it spins, so that the server pays no eventfd write meanwhile; the half
//! is then *quiet* (a message published during the spin did not ring) and
//! the release sets the counter once if messages remain, or announces
//! again if none do. Released with
//! [`ClientDispatch::release_dispatch_streaming`], the last message of a
//! stream leaves the fd as it was — readable — until the next
//! [`ClientDispatch::peek_dispatch`] finds the ring empty: one spurious
//! readiness, never a missed one, and no syscall per message.

use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coroipc_ring::{
    Announcement, Consumer, DataWatch, FlowState, PopError, Producer, Region as RingRegion, RingAttachError,
    WaitHandle,
};

use super::{
    pop_error, push_error, wake_all, ChannelError, ConnectError, ConnectOptions, PendingConnect, REPLY_FDS,
};
use crate::bell::Bell;
use crate::control::{Control, DisconnectReason, Side, CONTROL_LEN};
use crate::eventfd::EventFd;
use crate::handshake::{Accepted, ClientHello, RingSizes, ServerReply, Span, REPLY_LEN};
use crate::segment::Segment;
use crate::socket::{Endpoint, PeerCred, Stream};
use crate::waiter::{spin_backoff_until, wait_until, Liveness, WaitPolicy};

/// What the parts of a client connection share: the socket, the segment
/// with the control block, the three bells. Closes the client side when
/// the last part drops.
#[derive(Debug)]
struct Link {
    stream: Stream,
    server: PeerCred,
    accepted: Accepted,
    request_bell: Bell,
    response_bell: Bell,
    dispatch_bell: Bell,
    /// The server's sleepers that closing wakes.
    request_data: WaitHandle,
    dispatch_space: WaitHandle,
    response_space: WaitHandle,
    segment: Arc<Segment>,
}

impl Link {
    fn control(&self) -> Control<'_> {
        Control::new(&self.segment, self.accepted.layout.control.offset)
    }

    fn liveness(&self) -> Liveness<'_> {
        Liveness { stream: &self.stream, control: self.control(), peer: Side::Server }
    }

    fn peer_alive(&self) -> bool {
        self.liveness().peer_alive()
    }

    fn gone(&self) -> bool {
        !self.control().is_open(Side::Server)
    }

    fn disconnect_reason(&self) -> DisconnectReason {
        let control = self.control();
        if control.is_open(Side::Server) {
            return DisconnectReason::ServerDied;
        }
        match control.disconnect_reason() {
            Some(reason) => reason,
            None if control.server_shutting_down() => DisconnectReason::ServerShutdown,
            None => DisconnectReason::Unknown,
        }
    }

    fn lost(&self) -> ChannelError {
        ChannelError::Disconnected(self.disconnect_reason())
    }

    /// `PeerGone` with the reason the server gave.
    fn reason(&self, e: ChannelError) -> ChannelError {
        if e == ChannelError::PeerGone {
            self.lost()
        } else {
            e
        }
    }

    fn close(&self) {
        self.control().close(Side::Client);
        wake_all(self.request_data.point(), &self.request_bell);
        wake_all(self.dispatch_space.point(), &self.dispatch_bell);
        wake_all(self.response_space.point(), &self.response_bell);
        let _ = self.stream.as_std().shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.close();
    }
}

/// The record a half last peeked, as (address, length), until it is
/// released: lets the half hand the slice out again through `&self`.
/// Invariant: while it holds a record, that record is published and
/// unreleased in the ring the half consumes, inside the mapped segment the
/// half keeps alive.
#[derive(Debug, Default)]
struct Peeked(Option<(usize, usize)>);

impl Peeked {
    /// Peeks the next record of `ring` and remembers it.
    fn peek<'a>(&mut self, ring: &'a mut Consumer) -> Result<Option<&'a [u8]>, ChannelError> {
        match ring.try_peek() {
            Ok(g) => {
                // SAFETY: the server follows the ring protocol and does not
                // write a published record before we release it (the client
                // trusts the server it connected to, for the bytes); bounds
                // were validated by `try_peek`.
                let s = unsafe { g.into_slice() };
                self.0 = Some((s.as_ptr() as usize, s.len()));
                Ok(Some(s))
            }
            Err(PopError::Empty) => Ok(None),
            Err(e) => Err(pop_error(e)),
        }
    }

    /// The record last peeked, until [`clear`](Self::clear).
    fn get(&self) -> Option<&[u8]> {
        // SAFETY: the type's invariant: the record at that address stays
        // published and unreleased until `clear`, inside a segment that
        // outlives `self`; bounds were checked when it was peeked.
        self.0.map(|(p, n)| unsafe { std::slice::from_raw_parts(p as *const u8, n) })
    }

    /// Forgets the record (before it is released).
    fn clear(&mut self) {
        self.0 = None;
    }
}

/// The client end of one connection: both halves and the status handle.
/// `Send`; [`split`](Self::split) it to share it between threads.
#[derive(Debug)]
pub struct ClientChannel {
    requests: ClientRequests,
    dispatch: ClientDispatch,
}

/// The request/response half of a client connection: sends requests,
/// reads responses in place.
#[derive(Debug)]
pub struct ClientRequests {
    link: Arc<Link>,
    requests: Producer,
    responses: Consumer,
    /// The poll-mode announcement made by `arm_response`.
    response_armed: Option<Announcement>,
    policy: WaitPolicy,
    /// The response last returned by `peek_response`, until released.
    current: Peeked,
}

/// The dispatch half of a client connection: reads dispatch messages in
/// place and keeps the dispatch fd level-triggered (see the module docs).
#[derive(Debug)]
pub struct ClientDispatch {
    link: Arc<Link>,
    dispatch: Consumer,
    /// The poll-mode announcement of the "ring empty" state. Neither armed
    /// nor quiet, the eventfd's counter is never 0 (see the module docs).
    armed: Option<Announcement>,
    /// A blocking receive withdrew the announcement to spin: messages
    /// published meanwhile did not ring, so the counter may be 0 although
    /// the ring holds messages (set right again on release).
    quiet: bool,
    policy: WaitPolicy,
    /// The message last returned by `peek_dispatch`, until released.
    current: Peeked,
}

/// An owned, shareable view of a client connection: liveness, the
/// disconnect reason, flow control, and a sleep until a response is
/// published, without borrowing either half.
#[derive(Clone, Debug)]
pub struct ClientStatus {
    link: Arc<Link>,
    responses: DataWatch,
    dispatch: DataWatch,
}

impl ClientChannel {
    /// Connects to `endpoint` and runs the handshake for `hello`, all
    /// within `timeout` (a server whose accept backlog is full is retried
    /// until then, never waited for in `connect(2)`).
    ///
    /// # Errors
    ///
    /// A [`ConnectError`] for each way it can fail; a hostile server gets
    /// an error, never a panic or a hang past `timeout`.
    ///
    /// # Examples
    ///
    /// One round trip against a server thread that accepts with
    /// [`PendingHandshake`](super::PendingHandshake) and echoes one request
    /// (the rings carry bytes; the message header is the layer above's):
    ///
    /// ```
    /// use std::io::IoSlice;
    /// use std::time::{Duration, Instant};
    /// use coroipc_transport::channel::{negotiate, ClientChannel, Limits, PendingHandshake};
    /// use coroipc_transport::handshake::{ClientHello, RingSizes};
    /// use coroipc_transport::socket::{Endpoint, Listener};
    /// use coroipc_transport::waiter::WaitPolicy;
    ///
    /// let endpoint = Endpoint::parse(&format!("@coroipc-doc-channel-{}", std::process::id()))?;
    /// let listener = Listener::bind(&endpoint)?;
    /// let deadline = Instant::now() + Duration::from_secs(10);
    ///
    /// let server = std::thread::spawn(move || {
    ///     // A real server polls the listener and each pending handshake's
    ///     // socket; this one retries.
    ///     let stream = loop {
    ///         match listener.try_accept().unwrap() {
    ///             Some(stream) => break stream,
    ///             None => std::thread::sleep(Duration::from_millis(1)),
    ///         }
    ///     };
    ///     let mut pending = PendingHandshake::new(stream).unwrap();
    ///     let hello = loop {
    ///         match pending.poll_hello().unwrap() {
    ///             Some(hello) => break hello.unwrap(),
    ///             None => std::thread::sleep(Duration::from_millis(1)),
    ///         }
    ///     };
    ///     assert_eq!(hello.service, 7);
    ///     let limits = Limits::default();
    ///     let sizes = negotiate(&hello.sizes, &limits).unwrap();
    ///     let channel = pending.accept(sizes, &limits).unwrap();
    ///
    ///     channel.wait_request(Some(deadline), WaitPolicy::default()).unwrap();
    ///     let mut request = Vec::new();
    ///     assert!(channel.try_recv_request(&mut request).unwrap());
    ///     channel.send_response(&[IoSlice::new(&request)], Duration::from_secs(10)).unwrap();
    /// });
    ///
    /// // Zero sizes ask for the server's defaults.
    /// let hello = ClientHello { service: 7, flags: 0, sizes: RingSizes::default() };
    /// let mut client = ClientChannel::connect(&endpoint, &hello, Duration::from_secs(10))?;
    /// assert_eq!(client.server_credentials().pid, Some(std::process::id()));
    ///
    /// let requests = client.requests();
    /// requests.send(&[IoSlice::new(b"ping")], Some(deadline))?;
    /// requests.wait_response(Some(deadline))?;
    /// assert_eq!(requests.peek_response()?, Some(&b"ping"[..]));
    /// requests.release_response();
    /// server.join().unwrap();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[doc(alias = "coroipcc_service_connect")]
    pub fn connect(
        endpoint: &Endpoint,
        hello: &ClientHello,
        timeout: Duration,
    ) -> Result<Self, ConnectError> {
        Self::connect_with(endpoint, hello, &ConnectOptions::new(timeout))
    }

    /// [`connect`](Self::connect) with [`ConnectOptions`]: a deadline, and
    /// optionally the uid the server must run as.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect), plus [`ConnectError::WrongServer`].
    pub fn connect_with(
        endpoint: &Endpoint,
        hello: &ClientHello,
        options: &ConnectOptions,
    ) -> Result<Self, ConnectError> {
        PendingConnect::connect_with(endpoint, hello, options)?.complete()
    }

    /// Runs the client side of the handshake on a connected stream.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect).
    pub fn handshake(stream: Stream, hello: &ClientHello, timeout: Duration) -> Result<Self, ConnectError> {
        PendingConnect::start(stream, hello, timeout)?.complete()
    }

    /// Completes a handshake whose reply (and descriptors) arrived: checks
    /// everything the server sent before using any of it.
    pub(super) fn finish(
        stream: Stream,
        reply: &[u8; REPLY_LEN],
        fds: Vec<OwnedFd>,
    ) -> Result<Self, ConnectError> {
        let std = stream.as_std();
        let accepted = match ServerReply::decode(reply).map_err(ConnectError::Handshake)? {
            ServerReply::Refused(r) => return Err(ConnectError::Refused(r)),
            ServerReply::Accepted(a) => a,
        };
        if fds.len() != REPLY_FDS {
            return Err(ConnectError::Descriptors("expected a memfd and three eventfds"));
        }
        let mut fds = fds.into_iter();
        let mut next_fd = || fds.next().ok_or(ConnectError::Descriptors("missing"));
        let layout = accepted.layout;
        let segment =
            Arc::new(Segment::from_fd(next_fd()?, layout.segment_len).map_err(ConnectError::Segment)?);
        let bell = |fd: OwnedFd| -> Result<Bell, ConnectError> {
            EventFd::from_fd(fd)
                .map(Bell::from_eventfd)
                .map_err(|_| ConnectError::Descriptors("not an eventfd"))
        };
        let request_bell = bell(next_fd()?)?;
        let response_bell = bell(next_fd()?)?;
        let dispatch_bell = bell(next_fd()?)?;
        if layout.control.len < CONTROL_LEN || !Control::new(&segment, layout.control.offset).is_valid() {
            return Err(ConnectError::Control);
        }
        let region: Arc<dyn RingRegion> = segment.clone();
        let at = |r: Span| (r.offset as usize, r.len as usize);
        let (o, l) = at(layout.request);
        let requests = Producer::attach(region.clone(), o, l).map_err(ConnectError::Ring)?;
        let (o, l) = at(layout.response);
        let responses = Consumer::attach(region.clone(), o, l).map_err(ConnectError::Ring)?;
        let (o, l) = at(layout.dispatch);
        let dispatch = Consumer::attach(region, o, l).map_err(ConnectError::Ring)?;
        let max = u64::from(accepted.sizes.max_message_bytes);
        if requests.max_record() < max || responses.max_record() < max || dispatch.max_record() < max {
            return Err(ConnectError::Ring(RingAttachError::BadMaxRecord(max)));
        }
        std.set_nonblocking(true)?;
        let server = stream.peer_credentials()?;
        let link = Arc::new(Link {
            stream,
            server,
            accepted,
            request_bell,
            response_bell,
            dispatch_bell,
            request_data: requests.data_wait_handle(),
            dispatch_space: dispatch.space_wait_handle(),
            response_space: responses.space_wait_handle(),
            segment,
        });
        let policy = WaitPolicy::default();
        let mut dispatch = ClientDispatch {
            link: link.clone(),
            dispatch,
            armed: None,
            quiet: false,
            policy,
            current: Peeked::default(),
        };
        dispatch.level().map_err(|_| ConnectError::Control)?;
        let requests = ClientRequests {
            link,
            requests,
            responses,
            response_armed: None,
            policy,
            current: Peeked::default(),
        };
        Ok(Self { requests, dispatch })
    }

    /// Cuts the connection into its request/response half, its dispatch
    /// half and a status handle (see the module docs).
    pub fn split(self) -> (ClientRequests, ClientDispatch, ClientStatus) {
        let status = self.status();
        (self.requests, self.dispatch, status)
    }

    /// A status handle on this connection.
    pub fn status(&self) -> ClientStatus {
        ClientStatus {
            link: self.requests.link.clone(),
            responses: self.requests.responses.data_watch(),
            dispatch: self.dispatch.dispatch.data_watch(),
        }
    }

    /// The request/response half.
    pub fn requests(&mut self) -> &mut ClientRequests {
        &mut self.requests
    }

    /// The dispatch half.
    pub fn dispatch(&mut self) -> &mut ClientDispatch {
        &mut self.dispatch
    }

    /// The server's credentials, from the kernel: check them to be sure
    /// you talk to the daemon you expect.
    pub fn server_credentials(&self) -> PeerCred {
        self.requests.link.server
    }

    /// The negotiated sizes.
    pub fn sizes(&self) -> RingSizes {
        self.requests.link.accepted.sizes
    }

    /// Largest message (header included).
    pub fn max_message(&self) -> usize {
        self.requests.max_message()
    }

    /// Sets how blocking calls of both halves wait.
    pub fn set_wait_policy(&mut self, policy: WaitPolicy) {
        self.requests.policy = policy;
        self.dispatch.policy = policy;
    }

    /// The connection socket (readable/hung up when the server goes away).
    pub fn socket_fd(&self) -> BorrowedFd<'_> {
        self.requests.link.stream.as_fd()
    }

    /// Why the server went away (see [`ClientStatus::disconnect_reason`]).
    pub fn disconnect_reason(&self) -> DisconnectReason {
        self.requests.link.disconnect_reason()
    }

    /// Closes the client side: marks it closed, wakes server-side sleepers
    /// and shuts the socket down. Idempotent; dropping the last part of
    /// the connection does the same.
    pub fn close(&mut self) {
        self.requests.link.close();
    }
}

impl ClientStatus {
    /// The server's credentials, from the kernel.
    pub fn server_credentials(&self) -> PeerCred {
        self.link.server
    }

    /// The negotiated sizes.
    pub fn sizes(&self) -> RingSizes {
        self.link.accepted.sizes
    }

    /// Largest message (header included).
    pub fn max_message(&self) -> usize {
        self.link.accepted.sizes.max_message_bytes as usize
    }

    /// Whether the server is still there (its state word and its socket).
    pub fn peer_alive(&self) -> bool {
        self.link.peer_alive()
    }

    /// Whether the server paused reading requests (request-side flow control).
    pub fn request_paused(&self) -> bool {
        self.link.control().request_paused()
    }

    /// Request flow control: `On` while the server paused reading requests.
    pub fn request_flow(&self) -> FlowState {
        if self.request_paused() {
            FlowState::On
        } else {
            FlowState::Off
        }
    }

    /// Dispatch flow control: `On` while the server holds dispatch
    /// messages for this client in its outbound queue, or the dispatch
    /// ring is above its high watermark (until it drains to the low one).
    pub fn dispatch_flow(&self) -> FlowState {
        if self.link.control().dispatch_queued() {
            return FlowState::On;
        }
        self.dispatch.flow_state()
    }

    /// Why the server went away: the reason it wrote into the control
    /// block before closing its side (validated: an unknown value is
    /// [`DisconnectReason::Unknown`]); [`DisconnectReason::ServerDied`] if
    /// it never closed its side (killed, crashed). Meaningful once a call
    /// failed because the server is gone.
    pub fn disconnect_reason(&self) -> DisconnectReason {
        self.link.disconnect_reason()
    }

    /// Sleeps until the server publishes a response past `position` (the
    /// [`ClientRequests::response_position`] taken when
    /// [`ClientRequests::peek_response`] found nothing), the deadline, or
    /// the server's end. Holds no part of the connection meanwhile.
    ///
    /// # Errors
    ///
    /// `Timeout`; `Disconnected(reason)`.
    pub fn wait_response_past(
        &self,
        position: u64,
        deadline: Option<Instant>,
        policy: WaitPolicy,
    ) -> Result<(), ChannelError> {
        let responses = &self.responses;
        wait_until(
            responses.data_wait(),
            &self.link.response_bell,
            || responses.published_past(position),
            self.link.liveness(),
            deadline,
            policy,
        )
        .map_err(|e| self.link.reason(e.into()))
    }
}

impl ClientRequests {
    /// Largest message (header included).
    pub fn max_message(&self) -> usize {
        self.link.accepted.sizes.max_message_bytes as usize
    }

    /// Sets how this half's blocking calls wait.
    pub fn set_wait_policy(&mut self, policy: WaitPolicy) {
        self.policy = policy;
    }

    /// The current wait policy.
    pub fn wait_policy(&self) -> WaitPolicy {
        self.policy
    }

    /// Whether the server is still there.
    pub fn peer_alive(&self) -> bool {
        self.link.peer_alive()
    }

    /// Why the server went away (see [`ClientStatus::disconnect_reason`]).
    pub fn disconnect_reason(&self) -> DisconnectReason {
        self.link.disconnect_reason()
    }

    /// Sends a request without waiting.
    ///
    /// # Errors
    ///
    /// `TryAgain` (ring full or the server paused requests), `TooBig`,
    /// `Disconnected`, `Corrupt`.
    pub fn try_send(&mut self, parts: &[IoSlice<'_>]) -> Result<(), ChannelError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let max = self.max_message();
        if len > max {
            return Err(ChannelError::TooBig { len, max });
        }
        if self.link.gone() {
            return Err(self.link.lost());
        }
        if self.link.control().request_paused() {
            return Err(ChannelError::TryAgain);
        }
        let _ = self.requests.try_push_vectored(parts).map_err(|e| push_error(e, max))?;
        self.requests.data_wait().notify(&self.link.request_bell);
        Ok(())
    }

    /// Sends a request, waiting until `deadline` for space.
    ///
    /// # Errors
    ///
    /// As [`try_send`](Self::try_send), with `Timeout` instead of `TryAgain`.
    pub fn send(&mut self, parts: &[IoSlice<'_>], deadline: Option<Instant>) -> Result<(), ChannelError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        loop {
            match self.try_send(parts) {
                Err(ChannelError::TryAgain) => {}
                other => return other,
            }
            let link = &*self.link;
            let control = link.control();
            let requests = &self.requests;
            wait_until(
                requests.space_wait(),
                &link.request_bell,
                || !control.request_paused() && requests.has_space_uncached(len),
                link.liveness(),
                deadline,
                self.policy,
            )
            .map_err(|e| link.reason(e.into()))?;
        }
    }

    /// Waits until a response is readable (holding this half: other
    /// threads that share it should sleep through
    /// [`ClientStatus::wait_response_past`] instead).
    ///
    /// # Errors
    ///
    /// `Timeout`, `Disconnected`.
    pub fn wait_response(&mut self, deadline: Option<Instant>) -> Result<(), ChannelError> {
        if self.response_armed.is_some() {
            self.disarm_response();
        }
        let responses = &self.responses;
        wait_until(
            responses.data_wait(),
            &self.link.response_bell,
            || responses.has_data_uncached(),
            self.link.liveness(),
            deadline,
            self.policy,
        )
        .map_err(|e| self.link.reason(e.into()))
    }

    /// The response ring's read position, for
    /// [`ClientStatus::wait_response_past`] after
    /// [`peek_response`](Self::peek_response) found nothing.
    pub fn response_position(&self) -> u64 {
        self.responses.position()
    }

    /// Prepares to wait for a response in an event loop: announces on the
    /// response ring that this side polls the response fd, and re-checks.
    /// Returns `true` if a response is already there (do not wait then).
    /// The fd ([`response_fd`](Self::response_fd)) becomes readable when
    /// the next response arrives; call
    /// [`disarm_response`](Self::disarm_response) after it did.
    pub fn arm_response(&mut self) -> bool {
        if self.response_armed.is_none() {
            self.response_armed = Some(self.responses.data_wait().announce_poll());
        }
        self.responses.has_data_uncached()
    }

    /// Withdraws [`arm_response`](Self::arm_response)'s announcement and
    /// drains the response bell.
    pub fn disarm_response(&mut self) {
        if let Some(a) = self.response_armed.take() {
            self.responses.data_wait().cancel(a);
        }
        self.link.response_bell.drain();
    }

    /// Drains the response bell without withdrawing
    /// [`arm_response`](Self::arm_response)'s announcement (for event
    /// loops that keep it up while several calls wait: drain, then look at
    /// the ring; an answer published after the look rings again).
    pub fn drain_response_fd(&mut self) {
        self.link.response_bell.drain();
    }

    /// The response bell's eventfd, readable after
    /// [`arm_response`](Self::arm_response) once a response arrives.
    pub fn response_fd(&self) -> BorrowedFd<'_> {
        self.link.response_bell.as_fd()
    }

    /// The next response in place, without copying; `None` if there is
    /// none. Stays valid (and in the ring) until
    /// [`release_response`](Self::release_response).
    ///
    /// # Errors
    ///
    /// `Corrupt` if the server corrupted the ring.
    pub fn peek_response(&mut self) -> Result<Option<&[u8]>, ChannelError> {
        self.current.peek(&mut self.responses)
    }

    /// The response last returned by [`peek_response`](Self::peek_response),
    /// until it is released.
    pub fn current_response(&self) -> Option<&[u8]> {
        self.current.get()
    }

    /// Frees the response returned by [`peek_response`](Self::peek_response).
    pub fn release_response(&mut self) {
        self.current.clear();
        if let Ok(g) = self.responses.try_peek() {
            // A server thread may be waiting for room to answer (a deferred
            // response on a full ring): without this wake it would only see
            // the space at its next liveness slice.
            let _ = g.release_notify(&self.link.response_bell);
        }
    }
}

impl ClientDispatch {
    /// Sets how this half's blocking calls wait.
    pub fn set_wait_policy(&mut self, policy: WaitPolicy) {
        self.policy = policy;
    }

    /// The current wait policy.
    pub fn wait_policy(&self) -> WaitPolicy {
        self.policy
    }

    /// Like [`peek_dispatch`](Self::peek_dispatch), but first spins up to
    /// `spin` for a message, with the poller announcement withdrawn (so the
    /// server pays no eventfd write while this side spins) and looking at
    /// the producer's position with a backoff. Blocking receives use it
    /// after a first look found nothing: a stream of dispatch messages is
    /// then drained without a kernel sleep per message. Release what it
    /// returns with [`release_dispatch_streaming`](Self::release_dispatch_streaming).
    ///
    /// # Errors
    ///
    /// As [`peek_dispatch`](Self::peek_dispatch).
    pub fn peek_dispatch_spin(&mut self, spin: Duration) -> Result<Option<&[u8]>, ChannelError> {
        if !spin.is_zero() && !self.dispatch.has_data_uncached() {
            if let Some(a) = self.armed.take() {
                self.dispatch.data_wait().cancel(a);
                self.quiet = true;
            }
            let dispatch = &self.dispatch;
            spin_backoff_until(&mut || dispatch.has_data_uncached(), spin, backoff_first());
        }
        self.peek_dispatch()
    }

    /// The next dispatch message in place; `None` if there is none (the
    /// dispatch fd is then not readable until one arrives).
    ///
    /// # Errors
    ///
    /// `Corrupt` if the server corrupted the ring; `Disconnected` once the
    /// server is gone and the ring is drained.
    pub fn peek_dispatch(&mut self) -> Result<Option<&[u8]>, ChannelError> {
        // One validated look at the ring in the common case (a message is
        // there): peek it, then leave the "empty" state if in it.
        if self.current.peek(&mut self.dispatch)?.is_some() {
            self.leave_empty();
            return Ok(self.current.get());
        }
        // The server's state word alone is not enough: a server killed with
        // SIGKILL never writes it, and then an empty ring read "nothing yet"
        // for ever. Its socket hangs up, so check that too; look at the ring
        // once more after noticing, in case a message landed just before
        // the server went.
        if !self.link.peer_alive() {
            if !self.ready()? {
                return Err(self.link.lost());
            }
        } else if !self.enter_empty()? {
            return Ok(None);
        }
        self.leave_empty();
        self.current.peek(&mut self.dispatch)
    }

    /// Enters "holds messages": withdraws the announcement; the counter is
    /// set (see the module docs).
    fn leave_empty(&mut self) {
        if let Some(a) = self.armed.take() {
            self.dispatch.data_wait().cancel(a);
        }
    }

    /// The dispatch message last returned by
    /// [`peek_dispatch`](Self::peek_dispatch), until it is released.
    pub fn current_dispatch(&self) -> Option<&[u8]> {
        self.current.get()
    }

    /// Whether a dispatch message is ready (skipping padding).
    fn ready(&mut self) -> Result<bool, ChannelError> {
        match self.dispatch.try_peek() {
            Ok(_) => Ok(true),
            Err(PopError::Empty) => Ok(false),
            Err(e) => Err(pop_error(e)),
        }
    }

    /// Enters the "ring empty" state of the module docs: announce, drain,
    /// look again. Returns `true` if a message is there after all (the
    /// counter is then set, as "holds messages" wants).
    fn enter_empty(&mut self) -> Result<bool, ChannelError> {
        if self.armed.is_some() {
            return Ok(false); // entered before, nothing published since
        }
        let a = self.dispatch.data_wait().announce_poll();
        self.link.dispatch_bell.drain();
        self.quiet = false;
        if self.ready()? {
            self.dispatch.data_wait().cancel(a);
            self.link.dispatch_bell.eventfd().signal();
            return Ok(true);
        }
        self.armed = Some(a);
        Ok(false)
    }

    /// Brings the eventfd in step with the ring (at connect).
    fn level(&mut self) -> Result<(), ChannelError> {
        if self.ready()? {
            self.link.dispatch_bell.eventfd().signal();
        } else {
            self.enter_empty()?;
        }
        Ok(())
    }

    /// Frees the dispatch message returned by
    /// [`peek_dispatch`](Self::peek_dispatch), wakes a server thread
    /// waiting for dispatch space, and keeps the dispatch fd level: if the
    /// ring is now empty the fd stops being readable.
    pub fn release_dispatch(&mut self) {
        self.release();
        // An unvalidated look is enough here: "maybe more" (padding, or a
        // corrupt position the next peek reports) at worst leaves the fd
        // readable once with nothing to take.
        if self.dispatch.has_data_uncached() {
            self.unquiet();
        } else {
            let _ = self.enter_empty();
        }
    }

    /// [`release_dispatch`](Self::release_dispatch) for a receiver about to
    /// look again (a blocking receive): when the ring is now empty the fd
    /// is left as it is — it may read readable once more, until the next
    /// [`peek_dispatch`](Self::peek_dispatch) finds nothing — which spares
    /// a stream of messages a syscall per message. A pending message
    /// always leaves it readable.
    pub fn release_dispatch_streaming(&mut self) {
        self.release();
        if self.quiet {
            // The spin withdrew the announcement: messages that land from
            // now on would not ring, so either set the counter for the ones
            // there or announce again.
            if self.dispatch.has_data_uncached() {
                self.unquiet();
            } else {
                let _ = self.enter_empty();
            }
        }
    }

    /// Sets the counter for the messages in the ring if a spin left it
    /// possibly at 0 (the "quiet" state of the module docs).
    fn unquiet(&mut self) {
        if std::mem::take(&mut self.quiet) {
            self.link.dispatch_bell.eventfd().signal();
        }
    }

    /// Frees the peeked message and wakes a server thread waiting for
    /// room, with one fence for both handshakes.
    fn release(&mut self) {
        self.current.clear();
        if let Ok(g) = self.dispatch.try_peek() {
            let _ = g.release_notify(&self.link.dispatch_bell);
        }
    }

    /// Waits until a dispatch message is readable.
    ///
    /// # Errors
    ///
    /// `Timeout`, `Disconnected`.
    pub fn wait_dispatch(&mut self, deadline: Option<Instant>) -> Result<(), ChannelError> {
        let dispatch = &self.dispatch;
        wait_until(
            dispatch.data_wait(),
            &self.link.dispatch_bell,
            || dispatch.has_data_uncached(),
            self.link.liveness(),
            deadline,
            self.policy,
        )
        .map_err(|e| self.link.reason(e.into()))
    }

    /// The dispatch fd (an eventfd): readable exactly while a dispatch
    /// message is pending (see the module docs).
    #[doc(alias = "coroipcc_fd_get")]
    pub fn dispatch_fd(&self) -> BorrowedFd<'_> {
        self.link.dispatch_bell.as_fd()
    }
}

/// The one descriptor an application polls for a client connection
/// (coroipc's `coroipcc_fd_get`): an epoll fd over the dispatch eventfd
/// (level-triggered, see the module docs) and the connection socket (which
/// hangs up when the server goes away, even killed). Readable exactly while
/// a dispatch message is pending or the server is gone.
#[derive(Debug)]
pub struct DispatchPoll {
    epoll: OwnedFd,
}

impl DispatchPoll {
    /// The poll set of the connection that `dispatch` belongs to.
    ///
    /// # Errors
    ///
    /// `epoll_create1(2)` / `epoll_ctl(2)` failures (out of descriptors).
    pub fn new(dispatch: &ClientDispatch) -> std::io::Result<Self> {
        use rustix::event::epoll;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let fds = [dispatch.link.dispatch_bell.as_fd(), dispatch.link.stream.as_fd()];
        for (tag, fd) in fds.into_iter().enumerate() {
            epoll::add(
                &epoll,
                fd,
                epoll::EventData::new_u64(tag as u64),
                epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
            )?;
        }
        Ok(Self { epoll })
    }

    /// Sleeps until the set is readable or `deadline` passes (`None`:
    /// forever); returns whether it is readable. A signal ends the sleep
    /// early (the caller looks and sleeps again).
    ///
    /// # Errors
    ///
    /// `poll(2)` failures other than `EINTR`.
    pub fn wait(&self, deadline: Option<Instant>) -> std::io::Result<bool> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let ts = left.map(|d| Timespec::try_from(d).unwrap_or(Timespec { tv_sec: i64::MAX, tv_nsec: 0 }));
        let mut fds = [PollFd::new(&self.epoll, PollFlags::IN)];
        match poll(&mut fds, ts.as_ref()) {
            Ok(n) => Ok(n > 0),
            Err(rustix::io::Errno::INTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

impl AsFd for DispatchPoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

/// The first backoff of a caught-up dispatch receiver, in `spin_loop`
/// hints (`COROIPC_BACKOFF` overrides it, for tuning with the benchmark).
fn backoff_first() -> u32 {
    static FIRST: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *FIRST.get_or_init(|| std::env::var("COROIPC_BACKOFF").ok().and_then(|v| v.parse().ok()).unwrap_or(16))
}
