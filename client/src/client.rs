//! The client connection.

use std::collections::{HashMap, HashSet};
use std::io::IoSlice;
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use coroipc_ring::FlowState;
use coroipc_transport::channel::{ChannelError, ClientChannel, ConnectOptions, PendingConnect};
use coroipc_transport::handshake::{ClientHello, RingSizes};
use coroipc_transport::message::{MessageHeader, Status, FLAG_ONEWAY, HEADER_LEN};
use coroipc_transport::socket::{Endpoint, PeerCred};
use coroipc_transport::waiter::WaitPolicy;
use rustix::event::{epoll, poll, PollFd, PollFlags, Timespec};

use crate::error::{Error, Result};

/// Sizes a client asks for; 0 (the default) means "the server's default".
pub type Sizes = RingSizes;

/// Identifies a pipelined request (its sequence number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// A received dispatch message's header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DispatchInfo {
    /// The service's message id.
    pub id: u32,
    /// The connection's dispatch sequence number.
    pub seq: u64,
    /// Payload length in bytes.
    pub len: usize,
}

/// Configures and opens a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    endpoint: String,
    service: u16,
    sizes: Sizes,
    timeout: Duration,
    policy: WaitPolicy,
    max_in_flight: usize,
    server_uid: Option<u32>,
}

impl ClientBuilder {
    /// Sizes to ask for (0 fields: the server's defaults).
    pub fn sizes(mut self, sizes: Sizes) -> Self {
        self.sizes = sizes;
        self
    }

    /// Largest message to ask for (header included).
    pub fn max_message(mut self, bytes: u32) -> Self {
        self.sizes.max_message_bytes = bytes;
        self
    }

    /// How long connecting may take (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Requires the server to run as `uid`: the listener's kernel-given
    /// uid (`SO_PEERCRED`) is checked right after connecting, before the
    /// hello is sent or anything the server sends is used; another uid
    /// fails the connect with [`Error::WrongServer`]. Abstract endpoints
    /// (`@name`) have no permissions, so any local user can bind the name
    /// first; this check is how a client tells.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> Result<(), coroipc_client::Error> {
    /// // Only talk to a server running as root.
    /// let client = coroipc_client::Client::builder("@corosync.ipc", 1).require_server_uid(0).connect()?;
    /// # drop(client); Ok(()) }
    /// ```
    pub fn require_server_uid(mut self, uid: u32) -> Self {
        self.server_uid = Some(uid);
        self
    }

    /// The connect options: deadline and server identity.
    fn connect_options(&self) -> ConnectOptions {
        let options = ConnectOptions::new(self.timeout);
        match self.server_uid {
            Some(uid) => options.require_server_uid(uid),
            None => options,
        }
    }

    /// How blocking calls wait (spin budget, then futex or poll).
    pub fn wait_policy(mut self, policy: WaitPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Largest number of pipelined requests in flight (default 256).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Connects (coroipc's `coroipcc_service_connect`).
    ///
    /// # Errors
    ///
    /// `Io` if nobody listens or access to the socket is denied;
    /// `AccessDenied`, `NoSuchService`, `TooBig`, `ConnectionLimit`,
    /// `VersionMismatch` when the server refuses; `Timeout`; `Protocol` if
    /// the server's answer is malformed.
    #[doc(alias = "coroipcc_service_connect")]
    pub fn connect(self) -> Result<Client> {
        let (inner, dispatch_fd, socket_fd) = self.open()?;
        Client::assemble(inner, dispatch_fd, socket_fd)
    }

    /// Starts connecting without blocking, for event loops: poll
    /// [`PendingClient`]'s fd for readability, call
    /// [`PendingClient::poll`] until it says `true`, then
    /// [`PendingClient::finish`]. Never blocks: a server whose accept
    /// backlog is full is retried by [`PendingClient::poll`] until the
    /// [`timeout`](Self::timeout), which then reports `Timeout`.
    ///
    /// # Errors
    ///
    /// `Io` if nobody listens.
    pub fn connect_nonblocking(self) -> Result<PendingClient> {
        let endpoint = Endpoint::parse(&self.endpoint).map_err(|e| Error::Protocol(e.to_string()))?;
        let hello = ClientHello { service: self.service, flags: 0, sizes: self.sizes };
        let pending = PendingConnect::connect_with(&endpoint, &hello, &self.connect_options())?;
        Ok(PendingClient { pending, builder: self })
    }

    /// The protocol state over an established channel, with duplicates of
    /// the dispatch fd and the socket (to sleep on without the lock).
    fn adopt(&self, mut channel: ClientChannel) -> Result<(Inner, OwnedFd, OwnedFd)> {
        channel.set_wait_policy(self.policy);
        let dispatch_fd = channel.dispatch_fd().try_clone_to_owned().map_err(Error::Io)?;
        let socket_fd = channel.socket_fd().try_clone_to_owned().map_err(Error::Io)?;
        let inner = Inner {
            channel,
            next_seq: 1,
            outstanding: HashSet::new(),
            arrived: HashMap::new(),
            max_in_flight: self.max_in_flight,
            kept: None,
        };
        Ok((inner, dispatch_fd, socket_fd))
    }
}

/// A client connection being set up without blocking
/// ([`ClientBuilder::connect_nonblocking`]).
#[derive(Debug)]
pub struct PendingClient {
    pending: PendingConnect,
    builder: ClientBuilder,
}

impl PendingClient {
    /// Reads what the server sent; `true` once the handshake reply is
    /// complete.
    ///
    /// # Errors
    ///
    /// As [`ClientBuilder::connect`].
    pub fn poll(&mut self) -> Result<bool> {
        Ok(self.pending.poll()?)
    }

    /// Finishes the connection (validation and mapping; no waiting).
    ///
    /// # Errors
    ///
    /// As [`ClientBuilder::connect`].
    pub fn finish(self) -> Result<Client> {
        let channel = self.pending.finish()?;
        let (inner, dispatch_fd, socket_fd) = self.builder.adopt(channel)?;
        Client::assemble(inner, dispatch_fd, socket_fd)
    }
}

impl AsFd for PendingClient {
    /// Readable when [`PendingClient::poll`] has something to do: the
    /// server's answer arrived, a retry of a connect to a full backlog is
    /// due, or the timeout passed. The same descriptor until `finish`.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.pending.fd()
    }
}

impl Client {
    fn assemble(inner: Inner, dispatch_fd: OwnedFd, socket_fd: OwnedFd) -> Result<Client> {
        // What the application polls: readable when a dispatch message
        // arrived after a receive returned `TryAgain` (the armed eventfd),
        // and when the server went away, even killed (its socket hangs up).
        let poll_fd = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| Error::Io(e.into()))?;
        for (fd, tag) in [(&dispatch_fd, 0u64), (&socket_fd, 1)] {
            epoll::add(
                &poll_fd,
                fd,
                epoll::EventData::new_u64(tag),
                epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
            )
            .map_err(|e| Error::Io(e.into()))?;
        }
        Ok(Client { inner: Mutex::new(inner), poll_fd, _dispatch_fd: dispatch_fd, _socket_fd: socket_fd })
    }
}

impl ClientBuilder {
    /// Connects and returns the protocol state with duplicates of the
    /// dispatch fd and the socket (to sleep on without the lock).
    pub(crate) fn open(self) -> Result<(Inner, OwnedFd, OwnedFd)> {
        let endpoint = Endpoint::parse(&self.endpoint).map_err(|e| Error::Protocol(e.to_string()))?;
        let hello = ClientHello { service: self.service, flags: 0, sizes: self.sizes };
        let channel = ClientChannel::connect_with(&endpoint, &hello, &self.connect_options())?;
        self.adopt(channel)
    }
}

pub(crate) struct Inner {
    pub(crate) channel: ClientChannel,
    next_seq: u64,
    /// Pipelined requests whose response has not been collected.
    pub(crate) outstanding: HashSet<u64>,
    /// Responses that arrived for outstanding tickets before they were
    /// asked for: (status, payload).
    arrived: HashMap<u64, (Status, Vec<u8>)>,
    pub(crate) max_in_flight: usize,
    /// The response of the last synchronous call that did not fit the
    /// caller's buffer.
    kept: Option<Vec<u8>>,
}

/// A connection to one service of a coroipc server.
///
/// `Send + Sync`: calls from several threads are serialised, pipelined
/// requests are matched to their responses by sequence number; nothing is
/// interleaved or lost. Dropping it disconnects (coroipc's
/// `coroipcc_service_disconnect`).
#[doc(alias = "coroipcc_service_disconnect")]
pub struct Client {
    inner: Mutex<Inner>,
    /// An epoll fd watching duplicates of the dispatch eventfd and the
    /// socket: the fd handed to the application, and what blocking
    /// receives sleep on without holding the lock.
    poll_fd: OwnedFd,
    _dispatch_fd: OwnedFd,
    _socket_fd: OwnedFd,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("poll_fd", &self.poll_fd).finish_non_exhaustive()
    }
}

/// A deadline read off the clock only when a wait is actually needed (the
/// common case — an answer that is already there — reads no clock; clock
/// reads showed at 12% of the pipelined profile).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline {
    timeout: Option<Duration>,
    at: Option<Instant>,
}

impl Deadline {
    pub(crate) fn new(timeout: Option<Duration>) -> Self {
        Self { timeout, at: None }
    }

    /// Whether the caller asked not to wait at all.
    fn is_now(&self) -> bool {
        self.timeout == Some(Duration::ZERO)
    }

    /// The deadline, fixed the first time it is asked for.
    fn get(&mut self) -> Option<Instant> {
        let t = self.timeout?;
        Some(*self.at.get_or_insert_with(|| Instant::now() + t))
    }
}

fn deadline(timeout: Option<Duration>) -> Option<Instant> {
    timeout.map(|t| Instant::now() + t)
}

/// A response read in place (zero-copy). The response stays in the ring
/// until the guard drops; it holds the connection's lock meanwhile.
pub struct ResponseGuard<'a> {
    inner: MutexGuard<'a, Inner>,
}

impl Deref for ResponseGuard<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.inner.channel.current_response().map_or(&[], |m| &m[HEADER_LEN..])
    }
}

impl Drop for ResponseGuard<'_> {
    fn drop(&mut self) {
        self.inner.channel.release_response();
    }
}

impl std::fmt::Debug for ResponseGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseGuard").field("len", &self.len()).finish()
    }
}

/// A dispatch message read in place (zero-copy); released on drop.
pub struct DispatchGuard<'a> {
    inner: MutexGuard<'a, Inner>,
    info: DispatchInfo,
}

impl DispatchGuard<'_> {
    /// The message's id and sequence number.
    pub fn info(&self) -> DispatchInfo {
        self.info
    }
}

impl Deref for DispatchGuard<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.inner.channel.current_dispatch().map_or(&[], |m| &m[HEADER_LEN..])
    }
}

impl Drop for DispatchGuard<'_> {
    fn drop(&mut self) {
        self.inner.channel.release_dispatch();
    }
}

impl std::fmt::Debug for DispatchGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatchGuard").field("info", &self.info).finish()
    }
}

impl Inner {
    pub(crate) fn send(
        &mut self,
        command: u16,
        flags: u32,
        parts: &[IoSlice<'_>],
        deadline: &mut Deadline,
    ) -> Result<u64> {
        let seq = self.next_seq;
        let header = MessageHeader { id: u32::from(command), flags, seq }.encode();
        // Header + parts, on the stack for up to three parts (no allocation
        // per call).
        let mut inline = [IoSlice::new(&[]); 4];
        let heap;
        let iov: &[IoSlice<'_>] = if parts.len() < inline.len() {
            inline[0] = IoSlice::new(&header);
            inline[1..=parts.len()].copy_from_slice(parts);
            &inline[..=parts.len()]
        } else {
            heap = [&[IoSlice::new(&header)][..], parts].concat();
            &heap
        };
        match self.channel.try_send(iov) {
            Err(ChannelError::TryAgain) if !deadline.is_now() => self.channel.send(iov, deadline.get())?,
            other => other?,
        }
        self.next_seq += 1;
        Ok(seq)
    }

    /// Looks at the responses that have arrived, without waiting, for the
    /// one wanted: the response to `want`, or (`None`) to any outstanding
    /// pipelined request. That one is left peeked (readable through
    /// `current_response`) and returned as (seq, status, length);
    /// responses for other outstanding tickets are stashed; late responses
    /// of abandoned calls are dropped. The one place responses are matched
    /// to requests — every blocking and async wait goes through it.
    pub(crate) fn next_response(&mut self, want: Option<u64>) -> Result<Option<(u64, Status, usize)>> {
        loop {
            let Some(msg) = self.channel.peek_response()? else {
                return Ok(None);
            };
            let Some(h) = MessageHeader::decode(msg) else {
                self.channel.release_response();
                return Err(Error::Protocol("response shorter than its header".into()));
            };
            let len = msg.len() - HEADER_LEN;
            let outstanding = self.outstanding.contains(&h.seq);
            if want == Some(h.seq) || (want.is_none() && outstanding) {
                return Ok(Some((h.seq, Status::from_code(h.id), len)));
            }
            if outstanding {
                let payload = msg[HEADER_LEN..].to_vec();
                self.arrived.insert(h.seq, (Status::from_code(h.id), payload));
            }
            // Otherwise: the late answer to a call that timed out.
            self.channel.release_response();
        }
    }

    /// The response to `seq` if it arrived (see [`next_response`](Self::next_response)).
    pub(crate) fn poll_response(&mut self, seq: u64) -> Result<Option<(Status, usize)>> {
        Ok(self.next_response(Some(seq))?.map(|(_, status, len)| (status, len)))
    }

    /// Peeks the next dispatch message and decodes its header; the message
    /// stays peeked (readable through `current_dispatch`) until released.
    /// `TryAgain` if there is none — the dispatch fd is armed then. Shared
    /// by every dispatch receive, blocking or async.
    pub(crate) fn peek_dispatch(&mut self, spin: Duration) -> Result<DispatchInfo> {
        let Some(msg) = self.channel.peek_dispatch_spin(spin)? else {
            return Err(Error::TryAgain);
        };
        let Some(h) = MessageHeader::decode(msg) else {
            self.channel.release_dispatch();
            return Err(Error::Protocol("dispatch message shorter than its header".into()));
        };
        Ok(DispatchInfo { id: h.id, seq: h.seq, len: msg.len() - HEADER_LEN })
    }

    /// Waits for the response to `seq` (see [`poll_response`](Self::poll_response)).
    fn await_response(&mut self, seq: u64, deadline: &mut Deadline) -> Result<(Status, usize)> {
        loop {
            if let Some(r) = self.poll_response(seq)? {
                return Ok(r);
            }
            self.channel.wait_response(deadline.get())?;
        }
    }

    /// Takes the stashed or arrived response of outstanding `seq` as an
    /// owned message, without waiting.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn try_take(&mut self, seq: u64) -> Result<Option<(Status, Vec<u8>)>> {
        if let Some(r) = self.arrived.remove(&seq) {
            self.outstanding.remove(&seq);
            return Ok(Some(r));
        }
        match self.poll_response(seq)? {
            Some((status, _)) => {
                let payload =
                    self.channel.current_response().map(|m| m[HEADER_LEN..].to_vec()).unwrap_or_default();
                self.channel.release_response();
                self.outstanding.remove(&seq);
                Ok(Some((status, payload)))
            }
            None => Ok(None),
        }
    }

    /// Copies the peeked response `seq` into `buf` and releases it. A
    /// response larger than `buf` is kept, not lost: a pipelined one stays
    /// stashed under its ticket (`keep_as_ticket`; `wait` it again with a
    /// larger buffer), a synchronous call's is kept for
    /// [`Client::take_kept_response`].
    fn copy_response(
        &mut self,
        seq: u64,
        status: Status,
        len: usize,
        buf: &mut [u8],
        keep_as_ticket: bool,
    ) -> Result<usize> {
        if let Some(e) = Error::from_status(status) {
            self.channel.release_response();
            return Err(e);
        }
        if len > buf.len() {
            let payload =
                self.channel.current_response().map(|m| m[HEADER_LEN..].to_vec()).unwrap_or_default();
            self.channel.release_response();
            if keep_as_ticket {
                self.outstanding.insert(seq);
                self.arrived.insert(seq, (status, payload));
            } else {
                self.kept = Some(payload);
            }
            return Err(Error::BufferTooSmall { needed: len });
        }
        if let Some(m) = self.channel.current_response() {
            buf[..len].copy_from_slice(&m[HEADER_LEN..]);
        }
        self.channel.release_response();
        Ok(len)
    }
}

impl Client {
    /// Connects to `service` at `endpoint` (a path, or `@name` for an
    /// abstract socket) with default sizes and a 5 s timeout.
    ///
    /// # Errors
    ///
    /// As [`ClientBuilder::connect`].
    #[doc(alias = "coroipcc_service_connect")]
    pub fn connect(endpoint: &str, service: u16) -> Result<Self> {
        Self::builder(endpoint, service).connect()
    }

    /// A builder for `service` at `endpoint`.
    pub fn builder(endpoint: &str, service: u16) -> ClientBuilder {
        ClientBuilder {
            endpoint: endpoint.to_owned(),
            service,
            sizes: Sizes::default(),
            timeout: Duration::from_secs(5),
            policy: WaitPolicy::default(),
            max_in_flight: 256,
            server_uid: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The server's credentials, from the kernel (check them to be sure you
    /// talk to the daemon you expect).
    pub fn server_credentials(&self) -> PeerCred {
        self.lock().channel.server_credentials()
    }

    /// The negotiated sizes.
    pub fn sizes(&self) -> Sizes {
        self.lock().channel.sizes()
    }

    /// Largest message (header included) in either direction.
    pub fn max_message(&self) -> usize {
        self.lock().channel.max_message()
    }

    /// Sets how blocking calls wait.
    pub fn set_wait_policy(&self, policy: WaitPolicy) {
        self.lock().channel.set_wait_policy(policy);
    }

    /// Sends `request` as command `command`, blocks until the response
    /// arrives and copies it into `response`; returns its length
    /// (coroipc's `coroipcc_msg_send_reply_receive`).
    ///
    /// # Errors
    ///
    /// `BufferTooSmall` (the response is kept: fetch it with
    /// [`take_kept_response`](Self::take_kept_response)),
    /// `TooBig`, `Disconnected`, `TryAgain`/`Invalid`/`Service` as
    /// answered by the service, `Timeout` (only with
    /// [`call_timeout`](Self::call_timeout)).
    #[doc(alias = "coroipcc_msg_send_reply_receive")]
    pub fn call(&self, command: u16, request: &[u8], response: &mut [u8]) -> Result<usize> {
        self.call_timeout(command, &[IoSlice::new(request)], response, None)
    }

    /// Gathering form of [`call`](Self::call).
    ///
    /// # Errors
    ///
    /// As [`call`](Self::call).
    pub fn call_vectored(&self, command: u16, request: &[IoSlice<'_>], response: &mut [u8]) -> Result<usize> {
        self.call_timeout(command, request, response, None)
    }

    /// [`call`](Self::call) bounded by `timeout` (`None`: unbounded). On
    /// timeout the request may still be answered later; that late response
    /// is recognised by its sequence number and discarded, never mistaken
    /// for the answer to a later call.
    ///
    /// # Errors
    ///
    /// As [`call`](Self::call), plus `Timeout`.
    pub fn call_timeout(
        &self,
        command: u16,
        request: &[IoSlice<'_>],
        response: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<usize> {
        let mut deadline = Deadline::new(timeout);
        let mut inner = self.lock();
        let seq = inner.send(command, 0, request, &mut deadline)?;
        let (status, len) = inner.await_response(seq, &mut deadline)?;
        inner.copy_response(seq, status, len, response, false)
    }

    /// Sends `request` and returns the response in place, without copying
    /// (coroipc's `coroipcc_msg_send_reply_receive_in_buf`). The guard
    /// holds the connection until dropped.
    ///
    /// # Errors
    ///
    /// As [`call_timeout`](Self::call_timeout).
    #[doc(alias = "coroipcc_msg_send_reply_receive_in_buf")]
    pub fn call_in_place(
        &self,
        command: u16,
        request: &[IoSlice<'_>],
        timeout: Option<Duration>,
    ) -> Result<ResponseGuard<'_>> {
        let mut deadline = Deadline::new(timeout);
        let mut inner = self.lock();
        let seq = inner.send(command, 0, request, &mut deadline)?;
        let (status, _) = inner.await_response(seq, &mut deadline)?;
        if let Some(e) = Error::from_status(status) {
            inner.channel.release_response();
            return Err(e);
        }
        Ok(ResponseGuard { inner })
    }

    /// Sends a request without waiting for its response (pipelining);
    /// collect the response with [`wait`](Self::wait) or
    /// [`wait_any`](Self::wait_any). Waits up to `timeout` for ring space.
    ///
    /// # Errors
    ///
    /// `TryAgain` if `max_in_flight` requests are outstanding or (with a
    /// zero timeout) the ring is full or request flow control is on;
    /// `Timeout`, `TooBig`, `Disconnected`.
    pub fn send(&self, command: u16, request: &[IoSlice<'_>], timeout: Option<Duration>) -> Result<Ticket> {
        let mut deadline = Deadline::new(timeout);
        let mut inner = self.lock();
        if inner.outstanding.len() >= inner.max_in_flight {
            return Err(Error::TryAgain);
        }
        let seq = inner.send(command, 0, request, &mut deadline)?;
        inner.outstanding.insert(seq);
        Ok(Ticket(seq))
    }

    /// Sends a request that wants no response (fire-and-forget).
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub fn send_oneway(
        &self,
        command: u16,
        request: &[IoSlice<'_>],
        timeout: Option<Duration>,
    ) -> Result<()> {
        let mut deadline = Deadline::new(timeout);
        self.lock().send(command, FLAG_ONEWAY, request, &mut deadline).map(|_| ())
    }

    /// Collects the response of `ticket` into `response`.
    ///
    /// # Errors
    ///
    /// As [`call`](Self::call); `Invalid` for a ticket that is not
    /// outstanding; `Timeout` (the ticket stays outstanding).
    pub fn wait(&self, ticket: Ticket, response: &mut [u8], timeout: Option<Duration>) -> Result<usize> {
        let mut deadline = Deadline::new(timeout);
        let mut inner = self.lock();
        if !inner.outstanding.contains(&ticket.0) {
            return Err(Error::Invalid);
        }
        if let Some((status, payload)) = inner.arrived.remove(&ticket.0) {
            inner.outstanding.remove(&ticket.0);
            return inner.copy_stashed(ticket.0, status, payload, response);
        }
        let (status, len) = inner.await_response(ticket.0, &mut deadline)?;
        inner.outstanding.remove(&ticket.0);
        inner.copy_response(ticket.0, status, len, response, true)
    }

    /// Collects whichever outstanding response arrives first.
    ///
    /// # Errors
    ///
    /// As [`wait`](Self::wait); `Invalid` if nothing is outstanding. An
    /// error answer is returned as `Err` after the ticket is removed; use
    /// [`wait`](Self::wait) to learn which ticket failed.
    pub fn wait_any(
        &self,
        response: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<(Ticket, Result<usize>)> {
        let mut deadline = Deadline::new(timeout);
        let mut inner = self.lock();
        if let Some(&seq) = inner.arrived.keys().next() {
            let (status, payload) = inner.arrived.remove(&seq).expect("key exists");
            inner.outstanding.remove(&seq);
            return Ok((Ticket(seq), inner.copy_stashed(seq, status, payload, response)));
        }
        if inner.outstanding.is_empty() {
            return Err(Error::Invalid);
        }
        loop {
            if let Some((seq, status, len)) = inner.next_response(None)? {
                inner.outstanding.remove(&seq);
                let result = inner.copy_response(seq, status, len, response, true);
                return Ok((Ticket(seq), result));
            }
            inner.channel.wait_response(deadline.get())?;
        }
    }

    /// The response of the last [`call`](Self::call) that failed with
    /// [`Error::BufferTooSmall`]: the response is kept, not lost; fetch it
    /// with a buffer of at least `needed` bytes.
    ///
    /// # Errors
    ///
    /// `Invalid` if no response is kept; `BufferTooSmall` again (still
    /// kept) if `buf` is still too small.
    pub fn take_kept_response(&self, buf: &mut [u8]) -> Result<usize> {
        let mut inner = self.lock();
        let Some(payload) = inner.kept.take() else {
            return Err(Error::Invalid);
        };
        if payload.len() > buf.len() {
            let needed = payload.len();
            inner.kept = Some(payload);
            return Err(Error::BufferTooSmall { needed });
        }
        buf[..payload.len()].copy_from_slice(&payload);
        Ok(payload.len())
    }

    /// Number of pipelined requests not yet collected.
    pub fn in_flight(&self) -> usize {
        self.lock().outstanding.len()
    }

    /// Receives one dispatch message into `buf` without waiting
    /// (coroipc's `coroipcc_dispatch_recv` with timeout 0). When it returns
    /// `TryAgain`, the dispatch fd ([`AsFd`]) becomes readable as soon as
    /// the next message arrives.
    ///
    /// # Errors
    ///
    /// `TryAgain` if none is waiting, `BufferTooSmall` (kept), `Disconnected`.
    #[doc(alias = "coroipcc_dispatch_recv")]
    pub fn try_recv_dispatch(&self, buf: &mut [u8]) -> Result<DispatchInfo> {
        self.recv_dispatch_spin(buf, Duration::ZERO)
    }

    /// [`try_recv_dispatch`](Self::try_recv_dispatch) after spinning up to
    /// `spin` for a message.
    fn recv_dispatch_spin(&self, buf: &mut [u8], spin: Duration) -> Result<DispatchInfo> {
        let mut inner = self.lock();
        let info = inner.peek_dispatch(spin)?;
        if info.len > buf.len() {
            return Err(Error::BufferTooSmall { needed: info.len });
        }
        if let Some(msg) = inner.channel.current_dispatch() {
            buf[..info.len].copy_from_slice(&msg[HEADER_LEN..]);
        }
        inner.channel.release_dispatch();
        Ok(info)
    }

    /// Receives one dispatch message, waiting up to `timeout` (`None`:
    /// forever). Sleeps without holding the connection, so other threads
    /// keep calling meanwhile.
    ///
    /// # Errors
    ///
    /// As [`try_recv_dispatch`](Self::try_recv_dispatch), with `Timeout`
    /// instead of `TryAgain`.
    pub fn recv_dispatch(&self, buf: &mut [u8], timeout: Option<Duration>) -> Result<DispatchInfo> {
        // The common case — a message is waiting — reads no clock.
        match self.try_recv_dispatch(buf) {
            Err(Error::TryAgain) => {}
            other => return other,
        }
        let deadline = deadline(timeout);
        let spin = self.spin_budget();
        loop {
            match self.recv_dispatch_spin(buf, spin) {
                Err(Error::TryAgain) => {}
                other => return other,
            }
            self.sleep_dispatch(deadline)?;
        }
    }

    /// Receives one dispatch message in place (zero-copy), without waiting.
    ///
    /// # Errors
    ///
    /// As [`try_recv_dispatch`](Self::try_recv_dispatch).
    pub fn try_recv_dispatch_in_place(&self) -> Result<DispatchGuard<'_>> {
        self.recv_dispatch_in_place_spin(Duration::ZERO)
    }

    fn recv_dispatch_in_place_spin(&self, spin: Duration) -> Result<DispatchGuard<'_>> {
        let mut inner = self.lock();
        let info = inner.peek_dispatch(spin)?;
        Ok(DispatchGuard { inner, info })
    }

    /// The spin budget of a blocking receive.
    fn spin_budget(&self) -> Duration {
        self.lock().channel.wait_policy().spin.min(Duration::from_millis(1))
    }

    /// Receives one dispatch message in place, waiting up to `timeout`.
    ///
    /// # Errors
    ///
    /// As [`recv_dispatch`](Self::recv_dispatch).
    pub fn recv_dispatch_in_place(&self, timeout: Option<Duration>) -> Result<DispatchGuard<'_>> {
        // The common case — a message is waiting — reads no clock. (Two
        // attempts because a guard borrows `self` for its whole life. A
        // leaner single-lock variant that spun before it ever armed was
        // measured at half the ev64 rate, 6 vs 12–13 M msg/s: a consumer
        // that catches up and polls the producer's line slows the producer.
        // Keep this shape unless a benchmark says otherwise.)
        if self.lock().peek_dispatch(Duration::ZERO).is_ok() {
            return self.try_recv_dispatch_in_place();
        }
        let deadline = deadline(timeout);
        let spin = self.spin_budget();
        loop {
            match self.recv_dispatch_in_place_spin(spin) {
                Err(Error::TryAgain) => {}
                other => return other,
            }
            self.sleep_dispatch(deadline)?;
        }
    }

    /// Sleeps until the (armed) dispatch fd or the socket is readable, or
    /// the deadline.
    fn sleep_dispatch(&self, deadline: Option<Instant>) -> Result<()> {
        let left = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::Timeout);
                }
                Some(left)
            }
            None => None,
        };
        let mut fds = [PollFd::new(&self.poll_fd, PollFlags::IN)];
        let ts = left.map(|d| Timespec::try_from(d).unwrap_or(Timespec { tv_sec: i64::MAX, tv_nsec: 0 }));
        match poll(&mut fds, ts.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
            Err(e) => Err(Error::Io(e.into())),
        }
    }

    /// The dispatch channel's flow-control state: `On` while the server
    /// holds back dispatch messages because this client's ring is full
    /// (coroipc's `coroipcc_dispatch_flow_control_get`).
    #[doc(alias = "coroipcc_dispatch_flow_control_get")]
    pub fn dispatch_flow_control(&self) -> FlowState {
        self.lock().channel.dispatch_flow()
    }

    /// The request channel's flow-control state: `On` while the server
    /// paused reading this client's requests.
    pub fn request_flow_control(&self) -> FlowState {
        if self.lock().channel.request_paused() {
            FlowState::On
        } else {
            FlowState::Off
        }
    }

    /// Whether the server is still there.
    pub fn is_connected(&self) -> bool {
        self.lock().channel.peer_alive()
    }
}

impl Inner {
    /// Copies a stashed response of ticket `seq`; one that does not fit
    /// goes back to the stash (the ticket stays outstanding).
    fn copy_stashed(&mut self, seq: u64, status: Status, payload: Vec<u8>, buf: &mut [u8]) -> Result<usize> {
        if let Some(e) = Error::from_status(status) {
            return Err(e);
        }
        if payload.len() > buf.len() {
            let needed = payload.len();
            self.outstanding.insert(seq);
            self.arrived.insert(seq, (status, payload));
            return Err(Error::BufferTooSmall { needed });
        }
        buf[..payload.len()].copy_from_slice(&payload);
        Ok(payload.len())
    }
}

impl AsFd for Client {
    /// The dispatch fd: poll it for readability, then call
    /// [`try_recv_dispatch`](Client::try_recv_dispatch) until `TryAgain`
    /// (coroipc's `coroipcc_fd_get`). It also becomes readable when the
    /// server goes away — closed or killed — and the next receive then
    /// returns `Disconnected`. (An epoll fd over the dispatch eventfd and
    /// the connection socket; level-triggered.)
    #[doc(alias = "coroipcc_fd_get")]
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.poll_fd.as_fd()
    }
}

#[allow(dead_code)]
fn _assert_traits() {
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Client>();
    let _ = ChannelError::TryAgain;
}
