//! The client connection.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::io::IoSlice;
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coroipc_ring::FlowState;
use coroipc_transport::channel::{
    ChannelError, ClientChannel, ClientDispatch, ClientRequests, ClientStatus, ConnectOptions, PendingConnect,
};
use coroipc_transport::handshake::{ClientHello, RingSizes};
use coroipc_transport::message::{MessageHeader, Status, FLAG_ONEWAY, HEADER_LEN};
use coroipc_transport::socket::{Endpoint, PeerCred};
use coroipc_transport::waiter::WaitPolicy;
use parking_lot::{Condvar, Mutex, MutexGuard};
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
        Client::assemble(self.open()?)
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
        let started = (|| {
            let endpoint = Endpoint::parse(&self.endpoint).map_err(|e| Error::Protocol(e.to_string()))?;
            let hello = ClientHello { service: self.service, flags: 0, sizes: self.sizes };
            Ok(PendingConnect::connect_with(&endpoint, &hello, &self.connect_options())?)
        })();
        match started {
            Ok(pending) => Ok(PendingClient { pending, builder: self }),
            Err(e) => Err(self.name_in(e)),
        }
    }

    /// `e` with this builder's endpoint and service in its message.
    fn name_in(&self, e: Error) -> Error {
        e.naming(&self.endpoint, self.service)
    }

    /// The parts of a client over an established channel.
    fn adopt(&self, mut channel: ClientChannel) -> Result<Parts> {
        channel.set_wait_policy(self.policy);
        // Duplicates of the socket and the dispatch fd, to sleep on without
        // any lock.
        let socket_fd = channel.socket_fd().try_clone_to_owned().map_err(Error::from)?;
        let (requests, dispatch, status) = channel.split();
        let dispatch_fd = dispatch.dispatch_fd().try_clone_to_owned().map_err(Error::from)?;
        let core = Core {
            channel: requests,
            next_seq: 1,
            wanted: HashSet::new(),
            outstanding: HashSet::new(),
            arrived: HashMap::new(),
            max_in_flight: self.max_in_flight,
            kept: None,
            sleeper: false,
            followers: 0,
            stashed: false,
            async_waiters: 0,
        };
        Ok(Parts { core, dispatch, status, dispatch_fd, socket_fd })
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
        self.pending.poll().map_err(|e| self.builder.name_in(e.into()))
    }

    /// Finishes the connection (validation and mapping; no waiting).
    ///
    /// # Errors
    ///
    /// As [`ClientBuilder::connect`].
    pub fn finish(self) -> Result<Client> {
        let builder = self.builder;
        let channel = self.pending.finish().map_err(|e| builder.name_in(e.into()))?;
        Client::assemble(builder.adopt(channel)?)
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

/// What an open connection is made of, before it becomes a blocking or an
/// async client.
pub(crate) struct Parts {
    pub(crate) core: Core,
    pub(crate) dispatch: ClientDispatch,
    pub(crate) status: ClientStatus,
    pub(crate) dispatch_fd: OwnedFd,
    pub(crate) socket_fd: OwnedFd,
}

impl Client {
    fn assemble(parts: Parts) -> Result<Client> {
        // What the application polls: readable while a dispatch message is
        // pending (the dispatch eventfd is kept level by the transport),
        // and when the server went away, even killed (its socket hangs up).
        let poll_fd =
            epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| Error::from(std::io::Error::from(e)))?;
        for (fd, tag) in [(&parts.dispatch_fd, 0u64), (&parts.socket_fd, 1)] {
            epoll::add(
                &poll_fd,
                fd,
                epoll::EventData::new_u64(tag),
                epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
            )
            .map_err(|e| Error::from(std::io::Error::from(e)))?;
        }
        Ok(Client {
            core: Mutex::new(parts.core),
            bulletin: Bulletin::default(),
            dispatch: Mutex::new(parts.dispatch),
            status: parts.status,
            response_guard: AtomicU64::new(0),
            dispatch_guard: AtomicU64::new(0),
            poll_fd,
            _dispatch_fd: parts.dispatch_fd,
            _socket_fd: parts.socket_fd,
        })
    }
}

impl ClientBuilder {
    /// Connects and returns the parts of a client.
    pub(crate) fn open(self) -> Result<Parts> {
        let opened = (|| {
            let endpoint = Endpoint::parse(&self.endpoint).map_err(|e| Error::Protocol(e.to_string()))?;
            let hello = ClientHello { service: self.service, flags: 0, sizes: self.sizes };
            let channel = ClientChannel::connect_with(&endpoint, &hello, &self.connect_options())?;
            self.adopt(channel)
        })();
        opened.map_err(|e| self.name_in(e))
    }
}

/// The request/response state: the transport's half plus the matching of
/// responses to requests. Locked only for short steps, never across a
/// sleep (except by a [`ResponseGuard`]).
pub(crate) struct Core {
    pub(crate) channel: ClientRequests,
    next_seq: u64,
    /// Every request whose answer someone still waits for: calls and
    /// tickets. An answer to anything else (a call that timed out, a
    /// sequence number never sent) is dropped, so the stash stays bounded.
    wanted: HashSet<u64>,
    /// Pipelined requests (tickets) whose response has not been collected.
    pub(crate) outstanding: HashSet<u64>,
    /// Answers that arrived before their caller looked: (status, payload).
    arrived: HashMap<u64, (Status, Vec<u8>)>,
    pub(crate) max_in_flight: usize,
    /// The response of the last synchronous call that did not fit the
    /// caller's buffer.
    kept: Option<Vec<u8>>,
    /// A thread sleeps on the response ring for everyone.
    sleeper: bool,
    /// Threads waiting on the bulletin for the sleeper or a stashed answer.
    followers: usize,
    /// An answer was stashed for another caller since the flag was cleared.
    pub(crate) stashed: bool,
    /// Async calls waiting (they keep the response ring's poller
    /// announcement up).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) async_waiters: usize,
}

/// Which response a wait is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Want {
    /// The answer to this sequence number.
    Seq(u64),
    /// The answer to any outstanding ticket.
    AnyTicket,
}

/// Wakes the threads that wait for answers someone else read (or for the
/// sleeper's seat): a counter behind its own small lock, so a waiter's
/// timeout never depends on the request lock.
#[derive(Debug, Default)]
struct Bulletin {
    posts: Mutex<u64>,
    posted: Condvar,
}

impl Bulletin {
    fn seen(&self) -> u64 {
        *self.posts.lock()
    }

    fn post(&self) {
        *self.posts.lock() += 1;
        self.posted.notify_all();
    }

    /// Waits until something is posted after `seen`, or the deadline.
    fn wait(&self, seen: u64, deadline: Option<Instant>) {
        let mut posts = self.posts.lock();
        while *posts == seen {
            match deadline {
                Some(d) => {
                    if self.posted.wait_until(&mut posts, d).timed_out() {
                        return;
                    }
                }
                None => self.posted.wait(&mut posts),
            }
        }
    }
}

thread_local! {
    /// This thread's token for guard ownership (0 is "nobody").
    static THREAD_TOKEN: Cell<u64> = const { Cell::new(0) };
}

/// A process-unique, non-zero token for the calling thread.
fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    THREAD_TOKEN.with(|t| {
        if t.get() == 0 {
            t.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        t.get()
    })
}

/// A connection to one service of a coroipc server.
///
/// `Send + Sync`: share it between threads (e.g. in an `Arc`). Calls from
/// several threads are pipelined and each thread gets its own answer;
/// dispatch receives never wait for calls nor calls for dispatch receives
/// (see [threads and locks](crate#threads-and-locks)). Dropping it disconnects
/// (coroipc's `coroipcc_service_disconnect`).
#[doc(alias = "coroipcc_service_disconnect")]
pub struct Client {
    core: Mutex<Core>,
    bulletin: Bulletin,
    dispatch: Mutex<ClientDispatch>,
    status: ClientStatus,
    /// The token of the thread holding a [`ResponseGuard`] (0: none).
    response_guard: AtomicU64,
    /// The token of the thread holding a [`DispatchGuard`] (0: none).
    dispatch_guard: AtomicU64,
    /// An epoll fd watching duplicates of the dispatch eventfd and the
    /// socket: the fd handed to the application, and what blocking
    /// receives sleep on without holding a lock.
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

/// A response read in place (zero-copy). The response stays in the ring
/// until the guard drops; the guard holds the client's request lock
/// meanwhile: other threads' calls wait (bounded by their timeouts), and
/// calls from the guard's own thread fail with [`Error::GuardHeld`].
/// Dispatch receives are not affected.
pub struct ResponseGuard<'a> {
    core: MutexGuard<'a, Core>,
    holder: &'a AtomicU64,
    /// The answer, when another waiting thread had already copied it out
    /// of the ring for this caller (only with concurrent callers); `None`:
    /// it is in the ring.
    copied: Option<Vec<u8>>,
}

impl Deref for ResponseGuard<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.copied {
            Some(payload) => payload,
            None => self.core.channel.current_response().map_or(&[], |m| &m[HEADER_LEN..]),
        }
    }
}

impl Drop for ResponseGuard<'_> {
    fn drop(&mut self) {
        if self.copied.is_none() {
            self.core.channel.release_response();
        }
        self.holder.store(0, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for ResponseGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseGuard").field("len", &self.len()).finish()
    }
}

/// A dispatch message read in place (zero-copy); released on drop. Holds
/// the client's dispatch lock meanwhile (calls are not affected; another
/// dispatch receive from the guard's own thread fails with
/// [`Error::GuardHeld`]).
pub struct DispatchGuard<'a> {
    dispatch: MutexGuard<'a, ClientDispatch>,
    holder: &'a AtomicU64,
    info: DispatchInfo,
    /// From a blocking receive: released as a stream's message.
    streaming: bool,
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
        self.dispatch.current_dispatch().map_or(&[], |m| &m[HEADER_LEN..])
    }
}

impl Drop for DispatchGuard<'_> {
    fn drop(&mut self) {
        if self.streaming {
            self.dispatch.release_dispatch_streaming();
        } else {
            self.dispatch.release_dispatch();
        }
        self.holder.store(0, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for DispatchGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatchGuard").field("info", &self.info).finish()
    }
}

/// An answer found for a caller: still in the ring (peeked), or stashed.
enum Answer {
    InRing(Status, usize),
    Stashed(Status, Vec<u8>),
}

impl Core {
    /// Sends a request under the next sequence number and marks its answer
    /// as wanted.
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
        if flags & FLAG_ONEWAY == 0 {
            self.wanted.insert(seq);
        }
        Ok(seq)
    }

    /// Forgets request `seq`: its answer, if it comes, is dropped.
    pub(crate) fn abandon(&mut self, seq: u64) {
        self.wanted.remove(&seq);
        self.outstanding.remove(&seq);
        self.arrived.remove(&seq);
    }

    /// Looks at the responses that have arrived, without waiting, for the
    /// one wanted. That one is left peeked (readable through
    /// `current_response`) and returned as (seq, status, length); answers
    /// other callers still want are stashed for them (and `stashed` set);
    /// answers nobody wants are dropped. The one place responses are
    /// matched to requests — every blocking and async wait goes through it.
    pub(crate) fn next_response(&mut self, want: Want) -> Result<Option<(u64, Status, usize)>> {
        loop {
            let Some(msg) = self.channel.peek_response()? else {
                return Ok(None);
            };
            let Some(h) = MessageHeader::decode(msg) else {
                self.channel.release_response();
                return Err(Error::Protocol("response shorter than its header".into()));
            };
            let len = msg.len() - HEADER_LEN;
            let hit = match want {
                Want::Seq(seq) => h.seq == seq,
                Want::AnyTicket => self.outstanding.contains(&h.seq),
            };
            if hit && self.wanted.contains(&h.seq) {
                return Ok(Some((h.seq, Status::from_code(h.id), len)));
            }
            if self.wanted.contains(&h.seq) {
                let payload = msg[HEADER_LEN..].to_vec();
                self.arrived.insert(h.seq, (Status::from_code(h.id), payload));
                self.stashed = true;
            }
            self.channel.release_response();
        }
    }

    /// The answer to `seq` if it is there (stashed or next in the ring);
    /// marks it no longer wanted.
    fn find(&mut self, seq: u64) -> Result<Option<Answer>> {
        if let Some((status, payload)) = self.arrived.remove(&seq) {
            self.wanted.remove(&seq);
            return Ok(Some(Answer::Stashed(status, payload)));
        }
        Ok(self.next_response(Want::Seq(seq))?.map(|(seq, status, len)| {
            self.wanted.remove(&seq);
            Answer::InRing(status, len)
        }))
    }

    /// Copies out and releases the response left peeked in the ring.
    pub(crate) fn take_in_ring(&mut self) -> Vec<u8> {
        let payload = self.channel.current_response().map(|m| m[HEADER_LEN..].to_vec()).unwrap_or_default();
        self.channel.release_response();
        payload
    }

    /// Takes the stashed or arrived response of `seq` as an owned
    /// message, without waiting.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn try_take(&mut self, seq: u64) -> Result<Option<(Status, Vec<u8>)>> {
        Ok(match self.find(seq)? {
            Some(Answer::Stashed(status, payload)) => Some((status, payload)),
            Some(Answer::InRing(status, _)) => Some((status, self.take_in_ring())),
            None => None,
        })
    }

    /// Copies the peeked response `seq` into `buf` and releases it. A
    /// response larger than `buf` is kept, not lost: a pipelined one stays
    /// stashed under its ticket (`keep_as_ticket`; `wait` it again with a
    /// larger buffer), a synchronous call's is kept for
    /// [`Client::take_kept_response`].
    fn copy_answer(
        &mut self,
        seq: u64,
        answer: Answer,
        buf: &mut [u8],
        keep_as_ticket: bool,
    ) -> Result<usize> {
        let (status, payload) = match answer {
            Answer::InRing(status, len) => {
                if let Some(e) = Error::from_status(status) {
                    self.channel.release_response();
                    return Err(e);
                }
                if len <= buf.len() {
                    if let Some(m) = self.channel.current_response() {
                        buf[..len].copy_from_slice(&m[HEADER_LEN..]);
                    }
                    self.channel.release_response();
                    return Ok(len);
                }
                (status, self.take_in_ring())
            }
            Answer::Stashed(status, payload) => {
                if let Some(e) = Error::from_status(status) {
                    return Err(e);
                }
                (status, payload)
            }
        };
        if payload.len() > buf.len() {
            let needed = payload.len();
            if keep_as_ticket {
                self.outstanding.insert(seq);
                self.wanted.insert(seq);
                self.arrived.insert(seq, (status, payload));
            } else {
                self.kept = Some(payload);
            }
            return Err(Error::BufferTooSmall { needed });
        }
        buf[..payload.len()].copy_from_slice(&payload);
        Ok(payload.len())
    }
}

/// Peeks the next dispatch message and decodes its header; the message
/// stays peeked (readable through `current_dispatch`) until released.
/// `TryAgain` if there is none. Shared by every dispatch receive, blocking
/// or async.
pub(crate) fn peek_dispatch(dispatch: &mut ClientDispatch, spin: Duration) -> Result<DispatchInfo> {
    let Some(msg) = dispatch.peek_dispatch_spin(spin)? else {
        return Err(Error::TryAgain);
    };
    let Some(h) = MessageHeader::decode(msg) else {
        dispatch.release_dispatch();
        return Err(Error::Protocol("dispatch message shorter than its header".into()));
    };
    Ok(DispatchInfo { id: h.id, seq: h.seq, len: msg.len() - HEADER_LEN })
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

    /// The request lock, waiting no longer than `deadline`.
    fn core(&self, deadline: &mut Deadline) -> Result<MutexGuard<'_, Core>> {
        if self.response_guard.load(Ordering::Relaxed) == thread_token() {
            return Err(Error::GuardHeld);
        }
        if let Some(core) = self.core.try_lock() {
            return Ok(core);
        }
        if deadline.is_now() {
            return Err(Error::TryAgain);
        }
        match deadline.get() {
            None => Ok(self.core.lock()),
            Some(d) => self.core.try_lock_until(d).ok_or(Error::Timeout),
        }
    }

    /// The dispatch lock, waiting no longer than `deadline`.
    fn dispatch_lock(&self, deadline: Option<Instant>) -> Result<MutexGuard<'_, ClientDispatch>> {
        if self.dispatch_guard.load(Ordering::Relaxed) == thread_token() {
            return Err(Error::GuardHeld);
        }
        if let Some(dispatch) = self.dispatch.try_lock() {
            return Ok(dispatch);
        }
        match deadline {
            None => Ok(self.dispatch.lock()),
            Some(d) => self.dispatch.try_lock_until(d).ok_or(Error::TryAgain),
        }
    }

    /// Waits for the answer to `seq`, re-taking the request lock (bounded
    /// by the deadline) after every sleep.
    fn await_answer<'a>(
        &'a self,
        core: &mut MutexGuard<'a, Core>,
        seq: u64,
        deadline: &mut Deadline,
    ) -> Result<Answer> {
        loop {
            let found = core.find(seq);
            self.post_stashed(core);
            if let Some(answer) = found? {
                return Ok(answer);
            }
            if deadline.is_now() {
                return Err(Error::Timeout);
            }
            match self.sleep_for_answers(core, deadline) {
                // One last look: the answer may have been stashed for us
                // just as the deadline passed.
                Err(Error::Timeout) => return core.find(seq)?.ok_or(Error::Timeout),
                other => other?,
            }
        }
    }

    /// Wakes the threads waiting on the bulletin if answers were stashed
    /// for them.
    fn post_stashed(&self, core: &mut Core) {
        if std::mem::take(&mut core.stashed) && core.followers > 0 {
            self.bulletin.post();
        }
    }

    /// Sends a call and waits for its answer with the request lock held
    /// on return; a call that fails after sending is abandoned (its late
    /// answer will be dropped).
    fn round_trip(
        &self,
        command: u16,
        request: &[IoSlice<'_>],
        deadline: &mut Deadline,
    ) -> Result<(MutexGuard<'_, Core>, Answer)> {
        let mut core = self.core(deadline)?;
        let seq = core.send(command, 0, request, deadline)?;
        match self.await_answer(&mut core, seq, deadline) {
            Ok(answer) => Ok((core, answer)),
            Err(e) => {
                core.abandon(seq);
                Err(e)
            }
        }
    }

    /// The server's credentials, from the kernel (check them to be sure you
    /// talk to the daemon you expect).
    pub fn server_credentials(&self) -> PeerCred {
        self.status.server_credentials()
    }

    /// The negotiated sizes.
    pub fn sizes(&self) -> Sizes {
        self.status.sizes()
    }

    /// Largest message (header included) in either direction.
    pub fn max_message(&self) -> usize {
        self.status.max_message()
    }

    /// Sets how blocking calls wait.
    ///
    /// # Errors
    ///
    /// [`Error::GuardHeld`] if the calling thread holds a guard of this
    /// client.
    pub fn set_wait_policy(&self, policy: WaitPolicy) -> Result<()> {
        let mut forever = Deadline::new(None);
        self.core(&mut forever)?.channel.set_wait_policy(policy);
        self.dispatch_lock(None)?.set_wait_policy(policy);
        Ok(())
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
    /// answered by the service, `GuardHeld` if this thread holds a
    /// [`ResponseGuard`] of this client, `Timeout` (only with
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

    /// [`call`](Self::call) bounded by `timeout` (`None`: unbounded): the
    /// whole call, waiting for the lock included. On timeout the request
    /// may still be answered later; that late response is recognised by
    /// its sequence number and discarded, never mistaken for the answer to
    /// a later call.
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
        let (mut core, answer) = self.round_trip(command, request, &mut deadline)?;
        core.copy_answer(0, answer, response, false)
    }

    /// Sends `request` and returns the response in place, without copying
    /// (coroipc's `coroipcc_msg_send_reply_receive_in_buf`). The guard
    /// holds the client's request lock until dropped (see
    /// [`ResponseGuard`]).
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
        let (mut core, answer) = self.round_trip(command, request, &mut deadline)?;
        let copied = match answer {
            Answer::InRing(status, _) => {
                if let Some(e) = Error::from_status(status) {
                    core.channel.release_response();
                    return Err(e);
                }
                None
            }
            // Another waiting thread copied it out of the ring already.
            Answer::Stashed(status, payload) => match Error::from_status(status) {
                Some(e) => return Err(e),
                None => Some(payload),
            },
        };
        self.response_guard.store(thread_token(), Ordering::Relaxed);
        Ok(ResponseGuard { core, holder: &self.response_guard, copied })
    }

    /// Sends a request without waiting for its response (pipelining);
    /// collect the response with [`wait`](Self::wait) or
    /// [`wait_any`](Self::wait_any). Waits up to `timeout` for the lock and
    /// for ring space.
    ///
    /// # Errors
    ///
    /// `TryAgain` if `max_in_flight` requests are outstanding or (with a
    /// zero timeout) the ring is full or request flow control is on;
    /// `Timeout`, `TooBig`, `Disconnected`, `GuardHeld`.
    pub fn send(&self, command: u16, request: &[u8], timeout: Option<Duration>) -> Result<Ticket> {
        self.send_vectored(command, &[IoSlice::new(request)], timeout)
    }

    /// Gathering form of [`send`](Self::send).
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub fn send_vectored(
        &self,
        command: u16,
        request: &[IoSlice<'_>],
        timeout: Option<Duration>,
    ) -> Result<Ticket> {
        let mut deadline = Deadline::new(timeout);
        let mut core = self.core(&mut deadline)?;
        if core.outstanding.len() >= core.max_in_flight {
            return Err(Error::TryAgain);
        }
        let seq = core.send(command, 0, request, &mut deadline)?;
        core.outstanding.insert(seq);
        Ok(Ticket(seq))
    }

    /// Sends a request that wants no response (fire-and-forget).
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub fn send_oneway(&self, command: u16, request: &[u8], timeout: Option<Duration>) -> Result<()> {
        self.send_oneway_vectored(command, &[IoSlice::new(request)], timeout)
    }

    /// Gathering form of [`send_oneway`](Self::send_oneway).
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub fn send_oneway_vectored(
        &self,
        command: u16,
        request: &[IoSlice<'_>],
        timeout: Option<Duration>,
    ) -> Result<()> {
        let mut deadline = Deadline::new(timeout);
        self.core(&mut deadline)?.send(command, FLAG_ONEWAY, request, &mut deadline).map(|_| ())
    }

    /// Collects the response of `ticket` into `response`.
    ///
    /// # Errors
    ///
    /// As [`call`](Self::call); `Invalid` for a ticket that is not
    /// outstanding; `Timeout` (the ticket stays outstanding).
    pub fn wait(&self, ticket: Ticket, response: &mut [u8], timeout: Option<Duration>) -> Result<usize> {
        let mut deadline = Deadline::new(timeout);
        let mut core = self.core(&mut deadline)?;
        if !core.outstanding.contains(&ticket.0) {
            return Err(Error::Invalid);
        }
        let answer = self.await_answer(&mut core, ticket.0, &mut deadline)?;
        core.outstanding.remove(&ticket.0);
        core.copy_answer(ticket.0, answer, response, true)
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
        let mut core = self.core(&mut deadline)?;
        loop {
            let stashed = core.outstanding.iter().copied().find(|seq| core.arrived.contains_key(seq));
            if let Some(seq) = stashed {
                let (status, payload) = core.arrived.remove(&seq).expect("stashed");
                core.wanted.remove(&seq);
                core.outstanding.remove(&seq);
                return Ok((
                    Ticket(seq),
                    core.copy_answer(seq, Answer::Stashed(status, payload), response, true),
                ));
            }
            if core.outstanding.is_empty() {
                return Err(Error::Invalid);
            }
            let found = core.next_response(Want::AnyTicket);
            self.post_stashed(&mut core);
            if let Some((seq, status, len)) = found? {
                core.wanted.remove(&seq);
                core.outstanding.remove(&seq);
                let result = core.copy_answer(seq, Answer::InRing(status, len), response, true);
                return Ok((Ticket(seq), result));
            }
            if deadline.is_now() {
                return Err(Error::Timeout);
            }
            self.sleep_for_answers(&mut core, &mut deadline)?;
        }
    }

    /// One sleep while waiting for answers; returns when something may
    /// have arrived. One waiter (the sleeper) sleeps on the response ring
    /// without a lock; the others wait on the bulletin for it to stash
    /// their answers or to leave its seat.
    fn sleep_for_answers<'a>(
        &'a self,
        core: &mut MutexGuard<'a, Core>,
        deadline: &mut Deadline,
    ) -> Result<()> {
        let at = deadline.get();
        if !core.sleeper {
            core.sleeper = true;
            let position = core.channel.response_position();
            let policy = core.channel.wait_policy();
            let slept = MutexGuard::unlocked(core, || self.status.wait_response_past(position, at, policy));
            core.sleeper = false;
            if core.followers > 0 {
                self.bulletin.post();
            }
            slept?;
        } else {
            let seen = self.bulletin.seen();
            core.followers += 1;
            MutexGuard::unlocked(core, || self.bulletin.wait(seen, at));
            core.followers -= 1;
            if at.is_some_and(|d| Instant::now() >= d) {
                return Err(Error::Timeout);
            }
        }
        Ok(())
    }

    /// The response of the last [`call`](Self::call) that failed with
    /// [`Error::BufferTooSmall`]: the response is kept, not lost; fetch it
    /// with a buffer of at least `needed` bytes.
    ///
    /// # Errors
    ///
    /// `Invalid` if no response is kept; `BufferTooSmall` again (still
    /// kept) if `buf` is still too small; `GuardHeld`.
    pub fn take_kept_response(&self, buf: &mut [u8]) -> Result<usize> {
        let mut core = self.core(&mut Deadline::new(None))?;
        let Some(payload) = core.kept.take() else {
            return Err(Error::Invalid);
        };
        if payload.len() > buf.len() {
            let needed = payload.len();
            core.kept = Some(payload);
            return Err(Error::BufferTooSmall { needed });
        }
        buf[..payload.len()].copy_from_slice(&payload);
        Ok(payload.len())
    }

    /// Number of pipelined requests not yet collected (0 while this thread
    /// holds a [`ResponseGuard`]: the count needs the request lock).
    pub fn in_flight(&self) -> usize {
        self.core(&mut Deadline::new(None)).map_or(0, |core| core.outstanding.len())
    }

    /// Receives one dispatch message into `buf` without waiting
    /// (coroipc's `coroipcc_dispatch_recv` with timeout 0).
    ///
    /// # Errors
    ///
    /// `TryAgain` if none is waiting (or another thread is receiving),
    /// `BufferTooSmall` (kept), `Disconnected`, `GuardHeld` if this thread
    /// holds a [`DispatchGuard`] of this client.
    #[doc(alias = "coroipcc_dispatch_recv")]
    pub fn try_recv_dispatch(&self, buf: &mut [u8]) -> Result<DispatchInfo> {
        self.recv_dispatch_spin(buf, Duration::ZERO, Some(Instant::now()), false)
    }

    /// [`try_recv_dispatch`](Self::try_recv_dispatch) after spinning up to
    /// `spin` for a message; `streaming` for a blocking receive (see
    /// `ClientDispatch::release_dispatch_streaming`).
    fn recv_dispatch_spin(
        &self,
        buf: &mut [u8],
        spin: Duration,
        lock_by: Option<Instant>,
        streaming: bool,
    ) -> Result<DispatchInfo> {
        let mut dispatch = self.dispatch_lock(lock_by)?;
        let info = peek_dispatch(&mut dispatch, spin)?;
        if info.len > buf.len() {
            return Err(Error::BufferTooSmall { needed: info.len });
        }
        if let Some(msg) = dispatch.current_dispatch() {
            buf[..info.len].copy_from_slice(&msg[HEADER_LEN..]);
        }
        if streaming {
            dispatch.release_dispatch_streaming();
        } else {
            dispatch.release_dispatch();
        }
        Ok(info)
    }

    /// Receives one dispatch message, waiting up to `timeout` (`None`:
    /// forever). Sleeps without holding any lock, so other threads keep
    /// calling meanwhile.
    ///
    /// # Errors
    ///
    /// As [`try_recv_dispatch`](Self::try_recv_dispatch), with `Timeout`
    /// instead of `TryAgain`.
    pub fn recv_dispatch(&self, buf: &mut [u8], timeout: Option<Duration>) -> Result<DispatchInfo> {
        // The common case — a message is waiting — reads no clock.
        match self.recv_dispatch_spin(buf, Duration::ZERO, None, true) {
            Err(Error::TryAgain) => {}
            other => return other,
        }
        let deadline = instant_after(timeout);
        let spin = self.spin_budget()?;
        loop {
            match self.recv_dispatch_spin(buf, spin, deadline, true) {
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
        self.recv_dispatch_in_place_spin(Duration::ZERO, Some(Instant::now()), false)
    }

    fn recv_dispatch_in_place_spin(
        &self,
        spin: Duration,
        lock_by: Option<Instant>,
        streaming: bool,
    ) -> Result<DispatchGuard<'_>> {
        let mut dispatch = self.dispatch_lock(lock_by)?;
        let info = peek_dispatch(&mut dispatch, spin)?;
        self.dispatch_guard.store(thread_token(), Ordering::Relaxed);
        Ok(DispatchGuard { dispatch, holder: &self.dispatch_guard, info, streaming })
    }

    /// The spin budget of a blocking receive.
    fn spin_budget(&self) -> Result<Duration> {
        Ok(self.dispatch_lock(None)?.wait_policy().spin.min(Duration::from_millis(1)))
    }

    /// Receives one dispatch message in place, waiting up to `timeout`.
    ///
    /// # Errors
    ///
    /// As [`recv_dispatch`](Self::recv_dispatch).
    pub fn recv_dispatch_in_place(&self, timeout: Option<Duration>) -> Result<DispatchGuard<'_>> {
        // The common case — a message is waiting — reads no clock. (A
        // leaner variant that spun before it ever looked was measured at
        // half the ev64 rate: a consumer that catches up and polls the
        // producer's line slows the producer. Keep this shape unless a
        // benchmark says otherwise.)
        match self.recv_dispatch_in_place_spin(Duration::ZERO, None, true) {
            Err(Error::TryAgain) => {}
            other => return other,
        }
        let deadline = instant_after(timeout);
        let spin = self.spin_budget()?;
        loop {
            match self.recv_dispatch_in_place_spin(spin, deadline, true) {
                Err(Error::TryAgain) => {}
                other => return other,
            }
            self.sleep_dispatch(deadline)?;
        }
    }

    /// Sleeps until the dispatch fd (or the socket) is readable, or the
    /// deadline.
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
            Err(e) => Err(Error::from(std::io::Error::from(e))),
        }
    }

    /// The dispatch channel's flow-control state: `On` while the server
    /// holds back dispatch messages for this client (its outbound queue
    /// holds some, or the ring is above its high watermark) (coroipc's
    /// `coroipcc_dispatch_flow_control_get`).
    #[doc(alias = "coroipcc_dispatch_flow_control_get")]
    pub fn dispatch_flow_control(&self) -> FlowState {
        self.status.dispatch_flow()
    }

    /// The request channel's flow-control state: `On` while the server
    /// paused reading this client's requests.
    pub fn request_flow_control(&self) -> FlowState {
        if self.status.request_paused() {
            FlowState::On
        } else {
            FlowState::Off
        }
    }

    /// Whether the server is still there.
    pub fn is_connected(&self) -> bool {
        self.status.peer_alive()
    }
}

/// The instant `timeout` from now (`None`: never).
fn instant_after(timeout: Option<Duration>) -> Option<Instant> {
    timeout.map(|t| Instant::now() + t)
}

impl AsFd for Client {
    /// The dispatch fd (coroipc's `coroipcc_fd_get`): level-triggered,
    /// readable exactly while a dispatch message is pending — from connect
    /// on, before any receive — and readable when the server goes away,
    /// closed or killed (the next receive then returns `Disconnected`).
    /// Poll it, then call [`try_recv_dispatch`](Client::try_recv_dispatch)
    /// (one message per readiness, or until `TryAgain`). (An epoll fd over
    /// the dispatch eventfd and the connection socket.)
    #[doc(alias = "coroipcc_fd_get")]
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.poll_fd.as_fd()
    }
}

#[allow(dead_code)]
fn _assert_traits() {
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Client>();
}
