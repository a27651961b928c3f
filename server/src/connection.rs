//! The cloneable connection handle (coroipc's reference-counted connection).

use std::any::Any;
use std::fmt;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use coroipc_ring::{FlowChange, FlowState};
use coroipc_transport::channel::{ChannelError, ServerChannel};
use coroipc_transport::eventfd::EventFd;
use coroipc_transport::message::{MessageHeader, Status, HEADER_LEN};
use coroipc_transport::socket::PeerCred;

use coroipc_transport::control::DisconnectReason;

use crate::error::{DispatchError, RespondError};
use crate::outbound::{Outbound, OutboundLimits};
use crate::stats::{Counters, Stats};

/// Identifies a connection within its server: unique for the server's
/// lifetime, never reused. Also the connection's [`Token`](crate::Token)
/// value in a foreign event loop (see
/// [`Server::handle_ready`](crate::Server::handle_ready)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectionId(pub(crate) u64);

impl ConnectionId {
    /// The id as a number (as logged, and as its event-loop token).
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The id with number `n` (e.g. read back from a log or a token).
    pub const fn from_raw(n: u64) -> Self {
        Self(n)
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for ConnectionId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

/// The client's credentials, from the kernel (`SO_PEERCRED`).
pub type Credentials = PeerCred;

pub(crate) struct ConnInner {
    pub(crate) id: u64,
    pub(crate) service: u16,
    pub(crate) channel: ServerChannel,
    pub(crate) counters: Counters,
    /// The outbound queue; its lock is also the dispatch lock (see
    /// [`Connection::dispatch_once`]) and holds the next sequence number.
    pub(crate) outbound: Outbound,
    /// Whether this side last saw dispatch flow control on. The ring reports
    /// "raised" to the producer (us) but "cleared" to the consumer (the
    /// client), so the server learns of the clear by looking: see
    /// [`Connection::observe_flow`].
    flow_on: AtomicBool,
    /// Set by `disconnect()` (any thread); acted on by the event loop.
    pub(crate) disconnect_requested: AtomicBool,
    /// Set by the event loop once the connection is closed.
    pub(crate) closed: AtomicBool,
    /// Wakes the event loop (the server's waker eventfd).
    pub(crate) waker: Arc<EventFd>,
    pub(crate) response_timeout: Duration,
    /// The service's per-connection context readable from any thread (see
    /// [`Connection::set_context`]).
    context: Mutex<Option<Arc<dyn Any + Send + Sync>>>,
}

/// A handle on one client connection. Cheap to clone; every clone keeps the
/// connection's memory alive, so a response or dispatch message can be sent
/// later from any thread (coroipc's `coroipcs_refcount_inc`/`_dec`). Once
/// the connection is closed, sending returns an error, never panics.
#[derive(Clone)]
#[doc(alias = "coroipcs_refcount_inc")]
#[doc(alias = "coroipcs_refcount_dec")]
pub struct Connection {
    pub(crate) inner: Arc<ConnInner>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.inner.id)
            .field("service", &self.inner.service)
            .field("peer", &self.inner.channel.peer())
            .finish_non_exhaustive()
    }
}

impl Connection {
    pub(crate) fn new(
        id: u64,
        service: u16,
        channel: ServerChannel,
        waker: Arc<EventFd>,
        response_timeout: Duration,
        outbound: OutboundLimits,
    ) -> Self {
        Self {
            inner: Arc::new(ConnInner {
                id,
                service,
                channel,
                counters: Counters::default(),
                outbound: Outbound::new(outbound),
                flow_on: AtomicBool::new(false),
                disconnect_requested: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                waker,
                response_timeout,
                context: Mutex::new(None),
            }),
        }
    }

    /// The connection's id, unique within the server's lifetime.
    pub fn id(&self) -> ConnectionId {
        ConnectionId(self.inner.id)
    }

    /// The service the client connected to.
    pub fn service(&self) -> u16 {
        self.inner.service
    }

    /// Attaches a context to this connection that any thread can read back
    /// with [`context`](Self::context) — e.g. while walking
    /// [`ServerHandle::connections`](crate::ServerHandle::connections)
    /// (libqb's `qb_ipcs_context_set`). The per-connection state `S` stays
    /// with the event loop's handlers; this is for what other threads need.
    #[doc(alias = "qb_ipcs_context_set")]
    pub fn set_context<T: Any + Send + Sync>(&self, context: Arc<T>) {
        *self.inner.context.lock().unwrap_or_else(PoisonError::into_inner) = Some(context);
    }

    /// The context set with [`set_context`](Self::set_context), if it is a
    /// `T` (libqb's `qb_ipcs_context_get`).
    #[doc(alias = "qb_ipcs_context_get")]
    pub fn context<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let context = self.inner.context.lock().unwrap_or_else(PoisonError::into_inner).clone()?;
        context.downcast::<T>().ok()
    }

    /// The client's uid, gid and pid, from the kernel.
    pub fn credentials(&self) -> Credentials {
        self.inner.channel.peer()
    }

    /// Largest message (header included) in either direction.
    pub fn max_message(&self) -> usize {
        self.inner.channel.max_message()
    }

    /// Largest payload of one response or dispatch message: the
    /// negotiated [`max_message`](Self::max_message) less the 16-byte
    /// message header. A larger one is refused with `TooBig`.
    pub fn max_payload(&self) -> usize {
        self.max_message() - HEADER_LEN
    }

    /// Whether the connection is still open.
    pub fn is_connected(&self) -> bool {
        !self.inner.closed.load(Ordering::Acquire) && !self.inner.disconnect_requested.load(Ordering::Acquire)
    }

    /// A snapshot of this connection's counters.
    pub fn stats(&self) -> Stats {
        self.observe_flow();
        self.inner.counters.snapshot()
    }

    /// Asks the server to close this connection (server-initiated
    /// disconnect). Returns at once; the event loop closes it, wakes the
    /// client and runs the service's disconnect callback.
    /// The client learns [`DisconnectReason::ByServer`].
    pub fn disconnect(&self) {
        self.disconnect_because(DisconnectReason::ByServer);
    }

    /// As [`disconnect`](Self::disconnect), telling the client `reason`
    /// (the first reason given for a connection wins).
    pub fn disconnect_because(&self, reason: DisconnectReason) {
        self.inner.channel.set_disconnect_reason(reason);
        self.inner.disconnect_requested.store(true, Ordering::Release);
        self.inner.waker.signal();
    }

    /// The dispatch channel's flow-control state: `On` while the server
    /// holds messages for the client in its outbound queue (see
    /// [`dispatch`](Self::dispatch)) or the client's dispatch ring is above
    /// its high watermark (until it drains to the low one). The client's
    /// `dispatch_flow_control()` reads the same state.
    #[doc(alias = "coroipcs_dispatch_flow_control")]
    pub fn dispatch_flow_control(&self) -> FlowState {
        self.observe_flow();
        if self.queued_messages() > 0 {
            return FlowState::On;
        }
        self.inner.channel.dispatch_flow()
    }

    /// Pauses (or resumes) reading this connection's requests; the client
    /// sees request-side flow control (libqb's rate limiting).
    pub fn pause_requests(&self, paused: bool) {
        self.inner.channel.set_request_paused(paused);
        if !paused {
            self.inner.waker.signal(); // the loop resumes reading it
        }
    }

    /// Whether request reading is paused.
    pub fn requests_paused(&self) -> bool {
        self.inner.channel.request_paused()
    }

    pub(crate) fn check_open(&self) -> Result<(), ChannelError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(ChannelError::PeerGone);
        }
        Ok(())
    }

    /// Counts a flow-control "off" transition once the client has cleared
    /// flow control (the consumer's release clears it, and only the client
    /// is told). Called whenever the server looks at the connection's flow
    /// state or counters, so `flow_control_off` catches up with
    /// `flow_control_on` as soon as the client drained its ring.
    pub(crate) fn observe_flow(&self) {
        if self.inner.flow_on.load(Ordering::Acquire)
            && self.inner.channel.dispatch_flow() == FlowState::Off
            && self.inner.flow_on.compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            Counters::bump(&self.inner.counters.flow_control_off, 1);
        }
    }

    pub(crate) fn count_flow(&self, change: FlowChange) {
        let c = &self.inner.counters;
        match change {
            FlowChange::Raised => {
                // Raised again before we saw the clear in between: count
                // that clear too, so "on" and "off" stay paired.
                if self.inner.flow_on.swap(true, Ordering::AcqRel) {
                    Counters::bump(&c.flow_control_off, 1);
                }
                Counters::bump(&c.flow_control_on, 1);
            }
            FlowChange::Cleared => Counters::bump(&c.flow_control_off, 1),
            FlowChange::None => {}
        }
    }

    /// One attempt to dispatch, never waiting: numbers the message and
    /// pushes it under the connection's dispatch lock (the outbound queue's),
    /// so that sequence numbers are given only to messages actually
    /// accepted and reach the client in order, whatever threads dispatch
    /// concurrently. Queued messages go first; while any is left this
    /// message is not pushed ("try again"), so it cannot overtake them. The
    /// lock is held for the copies into the ring, never while waiting.
    fn dispatch_once(&self, id: u32, parts: &[IoSlice<'_>]) -> (Result<FlowChange, ChannelError>, usize) {
        let mut q = self.inner.outbound.lock();
        let header_len = HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>();
        match self.drain_locked(&mut q) {
            Ok(drained) if !drained.is_empty() => {
                drop(q);
                self.run_drained(drained);
                q = self.inner.outbound.lock();
            }
            Ok(_) => {}
            Err(e) => return (Err(e.into_channel()), header_len),
        }
        if q.has_queued() {
            return (Err(ChannelError::TryAgain), header_len);
        }
        let header = MessageHeader { id, flags: 0, seq: q.next_seq() }.encode();
        let iov = with_header(&header, parts);
        let result = self.inner.channel.try_dispatch(&iov);
        if result.is_ok() {
            q.bump_seq();
        }
        (result, header_len)
    }

    fn after_dispatch(
        &self,
        result: Result<FlowChange, ChannelError>,
        len: usize,
    ) -> Result<(), DispatchError> {
        let c = &self.inner.counters;
        match result {
            Ok(change) => {
                Counters::bump(&c.dispatched, 1);
                Counters::bump(&c.bytes_out, len as u64);
                self.count_flow(change);
                Ok(())
            }
            Err(ChannelError::TryAgain) => {
                Counters::bump(&c.retries, 1);
                Err(DispatchError::TryAgain)
            }
            Err(e) => {
                Counters::bump(&c.errors, 1);
                Err(e.into())
            }
        }
    }

    /// Sends dispatch message `id` with `payload` straight into the
    /// client's ring, or not at all: never queues, never waits. Callable
    /// from any thread. Most services want [`dispatch`](Self::dispatch),
    /// which queues instead of answering "try again".
    ///
    /// Sequence numbers are shared with [`dispatch`](Self::dispatch): one
    /// connection's messages carry consecutive numbers (from 0) in the
    /// order the client receives them.
    ///
    /// # Errors
    ///
    /// [`DispatchError::TryAgain`] while flow control is on, the ring is
    /// full or messages wait in the outbound queue (nothing is dropped:
    /// send it again later), `TooBig`, `Disconnected`.
    pub fn try_dispatch(&self, id: u32, payload: &[u8]) -> Result<(), DispatchError> {
        self.try_dispatch_vectored(id, &[IoSlice::new(payload)])
    }

    /// Gathering form of [`try_dispatch`](Self::try_dispatch): the message
    /// is the concatenation of `parts` (coroipc's
    /// `coroipcs_dispatch_iov_send`).
    ///
    /// # Errors
    ///
    /// As [`try_dispatch`](Self::try_dispatch).
    pub fn try_dispatch_vectored(&self, id: u32, parts: &[IoSlice<'_>]) -> Result<(), DispatchError> {
        self.check_open()?;
        self.observe_flow();
        let (result, len) = self.dispatch_once(id, parts);
        self.after_dispatch(result, len)
    }

    /// Sends dispatch message `id` with `payload` into the client's ring,
    /// waiting up to `timeout` while flow control is on, the ring is full
    /// or earlier messages wait in the outbound queue. Unlike
    /// [`dispatch`](Self::dispatch) the message is in the ring on `Ok`.
    ///
    /// # Errors
    ///
    /// `Timeout`, `TooBig`, `Disconnected`.
    pub fn dispatch_timeout(&self, id: u32, payload: &[u8], timeout: Duration) -> Result<(), DispatchError> {
        self.dispatch_vectored_timeout(id, &[IoSlice::new(payload)], timeout)
    }

    /// Gathering form of [`dispatch_timeout`](Self::dispatch_timeout): the
    /// message is the concatenation of `parts`.
    ///
    /// # Errors
    ///
    /// `Timeout`, `TooBig`, `Disconnected`.
    pub fn dispatch_vectored_timeout(
        &self,
        id: u32,
        parts: &[IoSlice<'_>],
        timeout: Duration,
    ) -> Result<(), DispatchError> {
        self.check_open()?;
        // Read the clock only once a wait is needed.
        let mut deadline = None;
        loop {
            self.observe_flow();
            let (result, len) = self.dispatch_once(id, parts);
            match result {
                Err(ChannelError::TryAgain) => {}
                other => return self.after_dispatch(other, len),
            }
            // Wait without the dispatch lock, so other threads' try_dispatch
            // keep answering at once.
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeout);
            let need = self.inner.outbound.lock().front_len().unwrap_or(len);
            if let Err(e) = self.inner.channel.wait_dispatch_room(need, deadline) {
                return self.after_dispatch(Err(e), len);
            }
            self.check_open()?;
        }
    }

    /// Sends a response to request `seq` (used by `Call` and `Responder`).
    pub(crate) fn respond(
        &self,
        seq: u64,
        status: Status,
        parts: &[IoSlice<'_>],
    ) -> Result<(), RespondError> {
        self.check_open()?;
        let header = MessageHeader { id: status.code(), flags: 0, seq }.encode();
        let iov = with_header(&header, parts);
        let len: usize = iov.iter().map(|p| p.len()).sum();
        let c = &self.inner.counters;
        // Counted before the push, so that a client that has its answer
        // never reads statistics without it; taken back if it failed.
        Counters::bump(&c.responses, 1);
        Counters::bump(&c.bytes_out, len as u64);
        match self.inner.channel.send_response(&iov, self.inner.response_timeout) {
            Ok(()) => Ok(()),
            Err(e) => {
                c.responses.fetch_sub(1, Ordering::Relaxed);
                c.bytes_out.fetch_sub(len as u64, Ordering::Relaxed);
                Counters::bump(&c.errors, 1);
                Err(e.into())
            }
        }
    }
}

/// `header` followed by `parts`, without copying the parts. Small vectors
/// stay on the stack.
pub(crate) fn with_header<'a>(header: &'a [u8; HEADER_LEN], parts: &[IoSlice<'a>]) -> Iov<'a> {
    if parts.len() < INLINE_IOV {
        let mut a = [IoSlice::new(&[]); INLINE_IOV];
        a[0] = IoSlice::new(header);
        a[1..=parts.len()].copy_from_slice(parts);
        Iov::Inline(a, parts.len() + 1)
    } else {
        let mut v = Vec::with_capacity(parts.len() + 1);
        v.push(IoSlice::new(header));
        v.extend_from_slice(parts);
        Iov::Heap(v)
    }
}

/// Slices gathered for one message: up to `INLINE_IOV` on the stack (no
/// allocation per dispatch or response), more on the heap.
const INLINE_IOV: usize = 4;

pub(crate) enum Iov<'a> {
    Inline([IoSlice<'a>; INLINE_IOV], usize),
    Heap(Vec<IoSlice<'a>>),
}

impl<'a> std::ops::Deref for Iov<'a> {
    type Target = [IoSlice<'a>];
    fn deref(&self) -> &[IoSlice<'a>] {
        match self {
            Self::Inline(a, n) => &a[..*n],
            Self::Heap(v) => v,
        }
    }
}
