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
#![allow(unsafe_code)]

use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use coroipc_ring::{
    init, record_size, required_size, Announcement, Consumer, Corruption, FlowChange, FlowState,
    MpscProducer, PopError, Producer, PushError, Region as RingRegion, RingAttachError, RingConfig,
    Watermarks,
};

use rustix::event::{epoll, poll, PollFd, PollFlags, Timespec};

use crate::bell::Bell;
use crate::control::{Control, DisconnectReason, Side, CONTROL_LEN};
use crate::handshake::{
    Accepted, ClientHello, HandshakeDecodeError, Refusal, Region, RingSizes, SegmentLayout, ServerReply,
    HELLO_LEN, MAX_RING_BYTES, MIN_RING_BYTES, REPLY_LEN,
};
use crate::segment::{Segment, SegmentOpenError};
use crate::socket::{
    close_in_background, release_in_background, stop_descriptors, Endpoint, PeerCred, SocketRecvError,
    Stream, MAX_FDS_PER_MESSAGE,
};
use crate::waiter::{wait_until, Liveness, WaitError, WaitPolicy};

mod client;
pub use client::{ClientChannel, ClientDispatch, ClientRequests, ClientStatus};

/// Number of descriptors in an accepting reply: memfd + three eventfds.
const REPLY_FDS: usize = 4;

/// Errors of the data path of an established connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelError {
    /// Not possible now (ring full, flow control on, nothing to read);
    /// try again later.
    TryAgain,
    /// The deadline passed.
    Timeout,
    /// The message exceeds the negotiated maximum.
    TooBig {
        /// Length of the message.
        len: usize,
        /// Largest message allowed.
        max: usize,
    },
    /// The caller's buffer is too small; the message is kept.
    BufferTooSmall {
        /// Length of the message.
        needed: usize,
    },
    /// The peer closed the connection or died.
    PeerGone,
    /// (Client side) the server closed the connection or died, and this is
    /// why (see [`DisconnectReason`]).
    Disconnected(DisconnectReason),
    /// The peer corrupted shared memory; the connection must be dropped.
    Corrupt(Corruption),
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TryAgain => f.write_str("try again"),
            Self::Timeout => f.write_str("timed out"),
            Self::TooBig { len, max } => write!(f, "message of {len} bytes exceeds maximum {max}"),
            Self::BufferTooSmall { needed } => write!(f, "buffer too small: message has {needed} bytes"),
            Self::PeerGone => f.write_str("connection lost"),
            Self::Disconnected(reason) => write!(f, "{reason}"),
            Self::Corrupt(c) => write!(f, "shared memory corrupt: {c}"),
        }
    }
}

impl std::error::Error for ChannelError {}

impl From<WaitError> for ChannelError {
    fn from(e: WaitError) -> Self {
        match e {
            WaitError::Timeout => Self::Timeout,
            WaitError::PeerGone => Self::PeerGone,
        }
    }
}

fn push_error(e: PushError, max: usize) -> ChannelError {
    match e {
        PushError::Full => ChannelError::TryAgain,
        PushError::TooBig { len, .. } => ChannelError::TooBig { len: len as usize, max },
        PushError::Corrupt(c) => ChannelError::Corrupt(c),
    }
}

fn pop_error(e: PopError) -> ChannelError {
    match e {
        PopError::Empty => ChannelError::TryAgain,
        PopError::BufferTooSmall { needed } => ChannelError::BufferTooSmall { needed },
        PopError::Corrupt(c) => ChannelError::Corrupt(c),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a ring endpoint in a state
    // that breaks memory safety; carry on.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The server's limits on what a client may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest message (header included) in any direction.
    pub max_message_bytes: u32,
    /// Largest ring data area.
    pub max_ring_bytes: u32,
    /// Sizes used where the client asks for 0 ("server default").
    pub defaults: RingSizes,
    /// Dispatch flow control: on at this percentage of the dispatch ring,
    /// off again at `dispatch_low_percent`.
    pub dispatch_high_percent: u8,
    /// See `dispatch_high_percent`.
    pub dispatch_low_percent: u8,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1 << 20,
            max_ring_bytes: 1 << 24,
            defaults: RingSizes {
                request_ring_bytes: 1 << 16,
                response_ring_bytes: 1 << 16,
                dispatch_ring_bytes: 1 << 20,
                max_message_bytes: 8 << 10,
            },
            dispatch_high_percent: 75,
            dispatch_low_percent: 25,
        }
    }
}

/// Smallest ring that carries `max_message`-byte records (a record may use
/// at most half a ring, see `coroipc_ring::max_payload_for`).
fn ring_for(max_message: u32) -> u64 {
    (2 * record_size(u64::from(max_message))).next_power_of_two().max(u64::from(MIN_RING_BYTES))
}

/// What the server grants for `asked` under `limits`, or why not.
///
/// # Errors
///
/// [`Refusal::TooBig`] if the message size or a ring exceeds the limits.
pub fn negotiate(asked: &RingSizes, limits: &Limits) -> Result<RingSizes, Refusal> {
    let pick = |v: u32, default: u32| if v == 0 { default } else { v };
    let max_message = pick(asked.max_message_bytes, limits.defaults.max_message_bytes);
    if max_message > limits.max_message_bytes || max_message < crate::message::HEADER_LEN as u32 {
        return Err(Refusal::TooBig);
    }
    let need = ring_for(max_message);
    let ring = |v: u32, default: u32| -> Result<u32, Refusal> {
        let bytes = u64::from(pick(v, default)).max(need).next_power_of_two();
        if bytes > u64::from(limits.max_ring_bytes) || bytes > u64::from(MAX_RING_BYTES) {
            return Err(Refusal::TooBig);
        }
        Ok(bytes as u32)
    };
    Ok(RingSizes {
        request_ring_bytes: ring(asked.request_ring_bytes, limits.defaults.request_ring_bytes)?,
        response_ring_bytes: ring(asked.response_ring_bytes, limits.defaults.response_ring_bytes)?,
        dispatch_ring_bytes: ring(asked.dispatch_ring_bytes, limits.defaults.dispatch_ring_bytes)?,
        max_message_bytes: max_message,
    })
}

/// The segment layout for granted sizes: control block, then the request,
/// response and dispatch rings, each 128-aligned; the length rounded up to
/// a page.
pub fn layout_for(sizes: &RingSizes) -> SegmentLayout {
    let control = Region { offset: 0, len: CONTROL_LEN };
    let mut at = CONTROL_LEN.next_multiple_of(128);
    let mut next = |cap: u32| {
        let r = Region { offset: at, len: required_size(u64::from(cap)) as u64 };
        at = (at + r.len).next_multiple_of(128);
        r
    };
    let request = next(sizes.request_ring_bytes);
    let response = next(sizes.response_ring_bytes);
    let dispatch = next(sizes.dispatch_ring_bytes);
    SegmentLayout { segment_len: at.next_multiple_of(4096), control, request, response, dispatch }
}

/// Why a server-side handshake failed (the connection is then dropped).
#[derive(Debug)]
pub enum HandshakeError {
    /// The client closed the socket before sending a complete hello.
    Closed,
    /// The hello did not decode.
    Decode(HandshakeDecodeError),
    /// A syscall failed.
    Io(io::Error),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => f.write_str("client closed during handshake"),
            Self::Decode(e) => write!(f, "bad hello: {e}"),
            Self::Io(e) => write!(f, "handshake i/o: {e}"),
        }
    }
}

impl std::error::Error for HandshakeError {}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// A connection accepted on the listener whose hello is being read.
///
/// Nonblocking: call [`poll_hello`](Self::poll_hello) whenever the socket is
/// readable; it never waits. Drop it (or let its deadline pass) to give up.
#[derive(Debug)]
pub struct PendingHandshake {
    stream: Stream,
    peer: PeerCred,
    buf: [u8; HELLO_LEN],
    got: usize,
    started: Instant,
}

impl PendingHandshake {
    /// Starts the handshake on an accepted stream: makes it nonblocking and
    /// reads the peer's credentials from the kernel (`SO_PEERCRED`).
    ///
    /// # Errors
    ///
    /// The `fcntl`/`getsockopt` error.
    pub fn new(stream: Stream) -> io::Result<Self> {
        stream.as_std().set_nonblocking(true)?;
        let peer = stream.peer_credentials()?;
        Ok(Self { stream, peer, buf: [0; HELLO_LEN], got: 0, started: Instant::now() })
    }

    /// The peer's credentials, from the kernel.
    pub fn peer(&self) -> PeerCred {
        self.peer
    }

    /// When the handshake started (for a server-side deadline).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The socket, to register with an event loop.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Reads what has arrived; returns the hello once complete.
    ///
    /// # Errors
    ///
    /// [`HandshakeError::Closed`] on end of stream, `Decode` for a malformed
    /// hello, `Io` otherwise.
    pub fn poll_hello(
        &mut self,
    ) -> Result<Option<Result<ClientHello, HandshakeDecodeError>>, HandshakeError> {
        while self.got < HELLO_LEN {
            // Not `read(2)`: descriptors attached to the hello (where the
            // kernel does not refuse them, see `socket`) would be closed by
            // the kernel in this thread, the event loop's, and the last
            // close of a lingering socket blocks. `recv_with_fds` with room
            // for none hands whatever came to the closer thread.
            match self.stream.recv_with_fds(&mut self.buf[self.got..], MAX_FDS_PER_MESSAGE) {
                Ok((0, _)) => {
                    self.release();
                    return Err(HandshakeError::Closed);
                }
                Ok((n, fds)) => {
                    self.got += n;
                    fds.into_iter().for_each(close_in_background);
                }
                Err(SocketRecvError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(SocketRecvError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.release();
                    return Err(io::Error::from(e).into());
                }
            }
        }
        Ok(Some(ClientHello::decode(&self.buf)))
    }

    /// Refuses the connection: sends the refusal (best effort, never
    /// blocking) and closes. Nothing was created for it.
    pub fn refuse(self, refusal: Refusal) {
        let _ = self.stream.send_with_fds(&ServerReply::Refused(refusal).encode(), &[]);
        self.release();
    }

    /// Where the kernel cannot refuse the client's descriptors: makes sure
    /// the ones it may still have queued are closed on the closer thread,
    /// not by this socket's close in the caller's thread.
    fn release(&self) {
        release_in_background(self.stream.as_fd(), true);
    }

    /// Accepts: creates the segment, rings and bells for `sizes` (from
    /// [`negotiate`]) and sends them to the client.
    ///
    /// # Errors
    ///
    /// The error of creating the memfd or eventfds, or of sending the reply
    /// (a client that vanished).
    pub fn accept(self, sizes: RingSizes, limits: &Limits) -> io::Result<ServerChannel> {
        let layout = layout_for(&sizes);
        let accepted = Accepted { sizes, layout };
        debug_assert!(accepted.validate().is_ok(), "server computed an invalid layout");
        let segment = Arc::new(Segment::create(layout.segment_len as usize)?);
        Control::new(&segment, layout.control.offset).init();
        let max_record = u64::from(sizes.max_message_bytes);
        let region: Arc<dyn RingRegion> = segment.clone();
        let ring_init = |r: Region, cap: u32, wm: Option<Watermarks>| {
            let mut config = RingConfig::new(u64::from(cap)).with_max_record(max_record);
            if let Some(w) = wm {
                config = config.with_watermarks(w);
            }
            init(&region, r.offset as usize, r.len as usize, &config)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
        };
        ring_init(layout.request, sizes.request_ring_bytes, None)?;
        ring_init(layout.response, sizes.response_ring_bytes, None)?;
        let cap = u64::from(sizes.dispatch_ring_bytes);
        let wm =
            Watermarks::percent(cap, limits.dispatch_high_percent.into(), limits.dispatch_low_percent.into());
        ring_init(layout.dispatch, sizes.dispatch_ring_bytes, wm.is_valid_for(cap).then_some(wm))?;
        let attach_err = |e: RingAttachError| io::Error::new(io::ErrorKind::InvalidData, e);
        let requests =
            Consumer::attach(region.clone(), layout.request.offset as usize, layout.request.len as usize)
                .map_err(attach_err)?;
        let responses =
            Producer::attach(region.clone(), layout.response.offset as usize, layout.response.len as usize)
                .map_err(attach_err)?;
        let dispatch =
            MpscProducer::attach(region, layout.dispatch.offset as usize, layout.dispatch.len as usize)
                .map_err(attach_err)?;
        let bells = [Bell::new()?, Bell::new()?, Bell::new()?];
        let fds: [BorrowedFd<'_>; REPLY_FDS] =
            [segment.as_fd(), bells[0].as_fd(), bells[1].as_fd(), bells[2].as_fd()];
        self.stream.send_with_fds(&ServerReply::Accepted(accepted).encode(), &fds)?;
        let [request_bell, response_bell, dispatch_bell] = bells;
        Ok(ServerChannel {
            stream: self.stream,
            peer: self.peer,
            accepted,
            requests: Mutex::new(RequestSide { consumer: requests, armed: None }),
            responses: Mutex::new(responses),
            dispatch,
            request_bell,
            response_bell,
            dispatch_bell,
            segment,
        })
    }
}

#[derive(Debug)]
struct RequestSide {
    consumer: Consumer,
    /// The poll-mode announcement made by [`ServerChannel::arm`].
    armed: Option<Announcement>,
}

/// The server end of one connection. `Sync`: requests are read by the
/// thread that runs the event loop, responses and dispatch messages may be
/// sent from any thread.
#[derive(Debug)]
pub struct ServerChannel {
    stream: Stream,
    peer: PeerCred,
    accepted: Accepted,
    requests: Mutex<RequestSide>,
    responses: Mutex<Producer>,
    dispatch: MpscProducer,
    request_bell: Bell,
    response_bell: Bell,
    dispatch_bell: Bell,
    segment: Arc<Segment>,
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

    /// The request bell's eventfd: readable after [`arm`](Self::arm) once a
    /// request arrives.
    pub fn request_fd(&self) -> BorrowedFd<'_> {
        self.request_bell.as_fd()
    }

    /// Whether a request is waiting (or the ring is corrupt, which the next
    /// [`try_recv_request`](Self::try_recv_request) reports).
    pub fn has_request(&self) -> bool {
        lock(&self.requests).consumer.is_ready()
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
    pub fn arm(&self) -> bool {
        let mut side = lock(&self.requests);
        if side.armed.is_none() {
            let a = side.consumer.data_wait().announce_poll();
            side.armed = Some(a);
        }
        side.consumer.is_ready()
    }

    /// Waits until a request is waiting, with `policy` (spin, then sleep on
    /// the request ring's futex or in `poll(2)` on the request bell and the
    /// socket): for a server that gives a connection its own thread, and for
    /// the wake-path benches. An event-loop server uses
    /// [`arm`](Self::arm)/[`request_fd`](Self::request_fd) instead.
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

    /// [`disarm`](Self::disarm) without draining the request bell, for an
    /// event loop that watches it edge-triggered (then a pending count in
    /// the eventfd does no harm, and the `read` is saved).
    pub fn disarm_without_drain(&self) {
        let mut side = lock(&self.requests);
        if let Some(a) = side.armed.take() {
            side.consumer.data_wait().cancel(a);
        }
    }

    /// Withdraws the announcement made by [`arm`](Self::arm) and drains the
    /// request bell (after the event loop woke up).
    pub fn disarm(&self) {
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
                        || lock(&self.responses).can_reserve(len),
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
            || dispatch.flow_state() == FlowState::Off && dispatch.can_reserve(len),
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

/// Bumps the epoch and wakes every kind of sleeper on `point`, whatever it
/// announced: used on close so no sleeper misses the state change.
fn wake_all(point: coroipc_ring::WaitPoint<'_>, bell: &Bell) {
    use coroipc_ring::Notify;
    point.epoch_word().fetch_add(1, std::sync::atomic::Ordering::Release);
    bell.wake(point.epoch_word());
}

impl Drop for ServerChannel {
    fn drop(&mut self) {
        self.close();
        // Where the kernel cannot refuse the client's descriptors, the ones
        // it queued on the socket die with its last close: not here.
        release_in_background(self.stream.as_fd(), true);
    }
}

/// Why a client could not connect.
#[derive(Debug)]
pub enum ConnectError {
    /// Connecting or talking to the socket failed (no server, permission,
    /// server vanished mid-handshake).
    Io(io::Error),
    /// The server refused.
    Refused(Refusal),
    /// The server's reply did not decode.
    Handshake(HandshakeDecodeError),
    /// The server sent a wrong descriptor set.
    Descriptors(&'static str),
    /// The segment failed validation.
    Segment(SegmentOpenError),
    /// A ring header failed validation.
    Ring(RingAttachError),
    /// The control block failed validation.
    Control,
    /// The handshake did not finish in time.
    Timeout,
    /// The process listening on the endpoint is not the user the client
    /// requires ([`ConnectOptions::require_server_uid`]): perhaps a
    /// squatter that bound the name first. Nothing was sent to it.
    WrongServer {
        /// The uid required.
        expected: u32,
        /// The listener's uid, from the kernel (`SO_PEERCRED`).
        actual: u32,
    },
}

/// How a client connects: the deadline and whom it accepts as the server.
///
/// # Examples
///
/// ```
/// use coroipc_transport::channel::ConnectOptions;
/// use std::time::Duration;
///
/// // Only a server running as root will do.
/// let options = ConnectOptions::new(Duration::from_secs(5)).require_server_uid(0);
/// assert_eq!(options.server_uid, Some(0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// Connecting and the whole handshake must finish within this.
    pub timeout: Duration,
    /// If set, the listener's uid (`SO_PEERCRED`, recorded by the kernel
    /// when the server called `listen(2)`) must be this one; checked right
    /// after `connect(2)`, before the hello is sent or anything the server
    /// sends is read.
    pub server_uid: Option<u32>,
}

impl ConnectOptions {
    /// Options with `timeout` and no identity requirement.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout, server_uid: None }
    }

    /// Requires the server to run as `uid` ([`ConnectError::WrongServer`]
    /// otherwise): abstract names (`@name`) have no permissions, so any
    /// local user can bind one first.
    pub fn require_server_uid(mut self, uid: u32) -> Self {
        self.server_uid = Some(uid);
        self
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "connect: {e}"),
            Self::Refused(r) => write!(f, "refused: {r}"),
            Self::Handshake(e) => write!(f, "bad handshake reply: {e}"),
            Self::Descriptors(what) => write!(f, "bad descriptors in reply: {what}"),
            Self::Segment(e) => write!(f, "bad segment: {e}"),
            Self::Ring(e) => write!(f, "bad ring: {e}"),
            Self::Control => f.write_str("bad control block"),
            Self::Timeout => f.write_str("handshake timed out"),
            Self::WrongServer { expected, actual } => {
                write!(f, "server runs as uid {actual}, not the required uid {expected}")
            }
        }
    }
}

impl std::error::Error for ConnectError {}

impl From<io::Error> for ConnectError {
    fn from(e: io::Error) -> Self {
        if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            Self::Timeout
        } else {
            Self::Io(e)
        }
    }
}

/// A client handshake in progress, for event loops: nothing in it blocks.
/// Poll [`fd`](Self::fd) for readability and call [`poll`](Self::poll)
/// until it returns `true`, then [`finish`](Self::finish) (coroipc had no
/// such thing; a non-blocking connect lets a single-threaded application
/// connect without stalling its loop).
///
/// Connection life cycle (each step happens inside [`poll`](Self::poll),
/// none waits):
///
/// | state | `fd` is readable when | next |
/// |---|---|---|
/// | connecting: the server's accept backlog was full | the retry timer fires (1 ms, doubling to 64 ms, never past the deadline) | connected once `connect(2)` succeeds; `Timeout` at the deadline |
/// | connected, hello sent, reply incomplete | reply bytes or a hang-up arrive | reply complete (`poll` returns `true`); `Timeout` at the deadline |
#[derive(Debug)]
pub struct PendingConnect {
    stream: Stream,
    /// `Some` while `connect(2)` has not succeeded (full backlog).
    connecting: Option<Connecting>,
    /// The retry timer and the epoll set behind [`fd`](Self::fd), made the
    /// first time the backlog is full (an immediate connect needs neither).
    retry: Option<Retry>,
    reply: [u8; REPLY_LEN],
    got: usize,
    fds: Vec<OwnedFd>,
    deadline: Instant,
    /// The uid the listener must have ([`ConnectOptions::server_uid`]).
    server_uid: Option<u32>,
}

/// Checks the listener's uid, if one is required, before anything is sent.
fn check_server(stream: &Stream, required: Option<u32>) -> Result<(), ConnectError> {
    let Some(expected) = required else { return Ok(()) };
    let actual = stream.peer_credentials()?.uid;
    if actual == expected {
        Ok(())
    } else {
        Err(ConnectError::WrongServer { expected, actual })
    }
}

/// A connect waiting for room in the server's backlog.
#[derive(Debug)]
struct Connecting {
    endpoint: Endpoint,
    hello: [u8; HELLO_LEN],
    backoff: Duration,
}

/// What [`PendingConnect::fd`] stands for after a full backlog: an epoll
/// set holding the retry timer, and the socket once connected, so that the
/// descriptor an event loop registered stays the same across states.
#[derive(Debug)]
struct Retry {
    epoll: OwnedFd,
    timer: OwnedFd,
}

/// The first and the longest pause between connect attempts to a full
/// backlog.
const RETRY_FIRST: Duration = Duration::from_millis(1);
const RETRY_MAX: Duration = Duration::from_millis(64);

impl Retry {
    fn new() -> io::Result<Self> {
        use rustix::time::{timerfd_create, TimerfdClockId, TimerfdFlags};
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let timer =
            timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK)?;
        epoll::add(&epoll, &timer, epoll::EventData::new_u64(0), epoll::EventFlags::IN)?;
        Ok(Self { epoll, timer })
    }

    /// Makes the timer fire once, `after` from now.
    fn arm(&self, after: Duration) -> io::Result<()> {
        use rustix::time::{timerfd_settime, Itimerspec, TimerfdTimerFlags};
        let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
        // A zero `it_value` would disarm the timer: fire after 1 ns at least.
        let after = after.max(Duration::from_nanos(1));
        let value = Timespec { tv_sec: after.as_secs() as i64, tv_nsec: after.subsec_nanos().into() };
        timerfd_settime(
            &self.timer,
            TimerfdTimerFlags::empty(),
            &Itimerspec { it_interval: zero, it_value: value },
        )?;
        Ok(())
    }

    /// Consumes a pending expiry (the timer stays readable until read).
    fn drain(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.timer, &mut buf);
    }
}

impl PendingConnect {
    /// Starts connecting to `endpoint` and, once connected, sends the hello;
    /// never waits, not even for a full accept backlog (the attempt is then
    /// retried by [`poll`](Self::poll) until the deadline).
    ///
    /// # Errors
    ///
    /// `Io` if nobody listens (`ECONNREFUSED`, `ENOENT`, `EACCES`, …) or a
    /// descriptor cannot be made.
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
    /// As [`connect`](Self::connect), plus [`ConnectError::WrongServer`]
    /// (here or from [`poll`](Self::poll), once the connect completes).
    pub fn connect_with(
        endpoint: &Endpoint,
        hello: &ClientHello,
        options: &ConnectOptions,
    ) -> Result<Self, ConnectError> {
        let deadline = Instant::now() + options.timeout;
        let (stream, connected) = Stream::connect_nonblocking(endpoint)?;
        if connected {
            return Self::started(stream, hello, deadline, options.server_uid);
        }
        let retry = Retry::new()?;
        let connecting =
            Connecting { endpoint: endpoint.clone(), hello: hello.encode(), backoff: RETRY_FIRST };
        retry.arm(RETRY_FIRST.min(deadline.saturating_duration_since(Instant::now())))?;
        Ok(Self {
            stream,
            connecting: Some(connecting),
            retry: Some(retry),
            reply: [0; REPLY_LEN],
            got: 0,
            fds: Vec::new(),
            deadline,
            server_uid: options.server_uid,
        })
    }

    /// Starts the handshake on a connected stream.
    ///
    /// # Errors
    ///
    /// `Io` if the hello cannot be sent.
    pub fn start(stream: Stream, hello: &ClientHello, timeout: Duration) -> Result<Self, ConnectError> {
        Self::started(stream, hello, Instant::now() + timeout, None)
    }

    fn started(
        stream: Stream,
        hello: &ClientHello,
        deadline: Instant,
        server_uid: Option<u32>,
    ) -> Result<Self, ConnectError> {
        check_server(&stream, server_uid)?;
        Self::send_hello(&stream, &hello.encode())?;
        Ok(Self {
            stream,
            connecting: None,
            retry: None,
            reply: [0; REPLY_LEN],
            got: 0,
            fds: Vec::new(),
            deadline,
            server_uid,
        })
    }

    fn send_hello(stream: &Stream, hello: &[u8; HELLO_LEN]) -> Result<(), ConnectError> {
        stream.as_std().set_nonblocking(true)?;
        // 32 bytes into a fresh socket's empty buffer: never `WouldBlock`.
        stream.send_with_fds(hello, &[])?;
        Ok(())
    }

    /// What to wait on: readable when [`poll`](Self::poll) has something
    /// to do (the reply or a hang-up arrived, a retry of a connect to a
    /// full backlog is due, or the deadline passed). The same descriptor
    /// for the whole handshake.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match &self.retry {
            Some(retry) => retry.epoll.as_fd(),
            None => self.stream.as_fd(),
        }
    }

    /// Retries a connect to a full backlog; `true` once connected.
    fn poll_connect(&mut self) -> Result<bool, ConnectError> {
        let Some(connecting) = &mut self.connecting else { return Ok(true) };
        let Some(retry) = &self.retry else { return Ok(true) };
        retry.drain();
        if self.stream.retry_connect(&connecting.endpoint)? {
            check_server(&self.stream, self.server_uid)?;
            Self::send_hello(&self.stream, &connecting.hello)?;
            epoll::add(&retry.epoll, &self.stream, epoll::EventData::new_u64(1), epoll::EventFlags::IN)
                .map_err(io::Error::from)?;
            self.connecting = None;
            return Ok(true);
        }
        let now = Instant::now();
        if now >= self.deadline {
            return Err(ConnectError::Timeout);
        }
        connecting.backoff = (connecting.backoff * 2).min(RETRY_MAX);
        retry.arm(connecting.backoff.min(self.deadline - now))?;
        Ok(false)
    }

    /// Does what is due: retries the connect while the server's backlog is
    /// full, then reads what has arrived; returns `true` once the whole
    /// reply is there (then call [`finish`](Self::finish)).
    ///
    /// # Errors
    ///
    /// As [`ClientChannel::connect`], including `Timeout` once the deadline
    /// given at the start has passed.
    pub fn poll(&mut self) -> Result<bool, ConnectError> {
        let polled = self.poll_reply();
        if polled.is_err() {
            // The caller drops us next: what the server queued on the socket
            // must not be closed in the caller's thread.
            let _ = stop_descriptors(&self.stream);
            release_in_background(self.stream.as_fd(), false);
        }
        polled
    }

    fn poll_reply(&mut self) -> Result<bool, ConnectError> {
        if !self.poll_connect()? {
            return Ok(false);
        }
        while self.got < REPLY_LEN {
            match self.stream.recv_with_fds(&mut self.reply[self.got..], REPLY_FDS - self.fds.len()) {
                Ok((0, _)) => {
                    return Err(ConnectError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "server closed during handshake",
                    )))
                }
                Ok((n, more)) => {
                    self.got += n;
                    self.fds.extend(more);
                }
                Err(SocketRecvError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(SocketRecvError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= self.deadline {
                        return Err(ConnectError::Timeout);
                    }
                    return Ok(false);
                }
                Err(SocketRecvError::Io(e)) => return Err(e.into()),
                Err(_) => return Err(ConnectError::Descriptors("truncated or too many")),
            }
        }
        self.nothing_after_the_reply()?;
        Ok(true)
    }

    /// The reply is complete: from now on the socket takes no descriptors
    /// (where the kernel can refuse them), and anything the server sent
    /// beyond the reply before that is an error — its descriptors go to
    /// the closer thread, so that no later close of this socket (when the
    /// connection ends) drops them in the caller's thread.
    fn nothing_after_the_reply(&mut self) -> Result<(), ConnectError> {
        stop_descriptors(&self.stream)?;
        let mut extra = [0u8; 1];
        loop {
            return match self.stream.recv_with_fds(&mut extra, 0) {
                // End of stream (a refusal is followed by a close), or
                // nothing more: as it should be.
                Ok((0, _)) => Ok(()),
                Err(SocketRecvError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                Err(SocketRecvError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok((n, _)) => Err(ConnectError::Handshake(HandshakeDecodeError::WrongLength {
                    expected: REPLY_LEN,
                    actual: REPLY_LEN + n,
                })),
                // A server that closed without reading our hello resets the
                // connection (`ECONNRESET`) after its reply, e.g. a refusal
                // out of descriptors: the reply stands, the hang-up is seen
                // later.
                Err(SocketRecvError::Io(_)) => Ok(()),
                Err(_) => Err(ConnectError::Descriptors("sent after the reply")),
            };
        }
    }

    /// Polls and waits on [`fd`](Self::fd) until the reply is complete or
    /// the deadline passes, then [`finish`](Self::finish)es.
    fn complete(mut self) -> Result<ClientChannel, ConnectError> {
        loop {
            if self.poll()? {
                return self.finish();
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            let fd = self.fd();
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            let ts = Timespec::try_from(left).unwrap_or(Timespec { tv_sec: i64::MAX, tv_nsec: 0 });
            match poll(&mut fds, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(ConnectError::Io(e.into())),
            }
        }
    }

    /// Validates the server's reply and descriptors and sets the connection
    /// up (no waiting: everything arrived).
    ///
    /// # Errors
    ///
    /// As [`ClientChannel::connect`]; `Timeout`-free. Calling it before
    /// [`poll`](Self::poll) returned `true` fails with a decode error.
    pub fn finish(self) -> Result<ClientChannel, ConnectError> {
        if self.got < REPLY_LEN {
            return Err(ConnectError::Handshake(HandshakeDecodeError::WrongLength {
                expected: REPLY_LEN,
                actual: self.got,
            }));
        }
        ClientChannel::finish(self.stream, &self.reply, self.fds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{MessageHeader, HEADER_LEN};

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
