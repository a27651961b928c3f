//! The client connection.

use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coroipc_ring::FlowState;
use coroipc_transport::channel::{ClientDispatch, ClientStatus, DispatchPoll};
use coroipc_transport::handshake::RingSizes;
use coroipc_transport::message::{FLAG_ONEWAY, HEADER_LEN};
use coroipc_transport::socket::PeerCred;
use coroipc_transport::waiter::WaitPolicy;
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::builder::ClientBuilder;
use crate::core::{peek_dispatch, Answer, Core, Deadline, Want};
use crate::error::{Error, Result};
use crate::guards::{thread_token, DispatchGuard, ResponseGuard};

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

/// What an open connection is made of, before it becomes a blocking or an
/// async client.
pub(crate) struct Parts {
    pub(crate) core: Core,
    pub(crate) dispatch: ClientDispatch,
    pub(crate) status: ClientStatus,
    /// Duplicates for the async client's `AsyncFd`s.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) dispatch_fd: OwnedFd,
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) socket_fd: OwnedFd,
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
    /// Calls that gave up without the request lock (`abandon_later`).
    abandoned: Mutex<Vec<u64>>,
    has_abandoned: AtomicBool,
    dispatch: Mutex<ClientDispatch>,
    status: ClientStatus,
    /// The token of the thread holding a [`ResponseGuard`] (0: none).
    response_guard: AtomicU64,
    /// The token of the thread holding a [`DispatchGuard`] (0: none).
    dispatch_guard: AtomicU64,
    /// An epoll fd watching duplicates of the dispatch eventfd and the
    /// socket: the fd handed to the application, and what blocking
    /// receives sleep on without holding a lock.
    poll: DispatchPoll,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("poll", &self.poll).finish_non_exhaustive()
    }
}

impl Client {
    pub(crate) fn assemble(parts: Parts) -> Result<Client> {
        // What the application polls: readable while a dispatch message is
        // pending (the dispatch eventfd is kept level by the transport),
        // and when the server went away, even killed (its socket hangs up).
        let poll = DispatchPoll::new(&parts.dispatch)?;
        Ok(Client {
            core: Mutex::new(parts.core),
            bulletin: Bulletin::default(),
            abandoned: Mutex::new(Vec::new()),
            has_abandoned: AtomicBool::new(false),
            dispatch: Mutex::new(parts.dispatch),
            status: parts.status,
            response_guard: AtomicU64::new(0),
            dispatch_guard: AtomicU64::new(0),
            poll,
        })
    }

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
            return Ok(self.tidy(core));
        }
        if deadline.is_now() {
            return Err(Error::TryAgain);
        }
        self.relock(deadline.get())
    }

    /// The request lock, waiting until `at` at most (`None`: forever).
    fn relock(&self, at: Option<Instant>) -> Result<MutexGuard<'_, Core>> {
        let core = match at {
            None => self.core.lock(),
            Some(d) => self.core.try_lock_until(d).ok_or(Error::Timeout)?,
        };
        Ok(self.tidy(core))
    }

    /// Forgets the calls that gave up while they did not hold the lock
    /// (their late answers are then dropped).
    fn tidy<'a>(&'a self, mut core: MutexGuard<'a, Core>) -> MutexGuard<'a, Core> {
        if self.has_abandoned.load(Ordering::Acquire) {
            self.has_abandoned.store(false, Ordering::Relaxed);
            for seq in std::mem::take(&mut *self.abandoned.lock()) {
                core.abandon(seq);
            }
        }
        core
    }

    /// Forgets call `seq` at the next taking of the request lock.
    fn abandon_later(&self, seq: u64) {
        self.abandoned.lock().push(seq);
        self.has_abandoned.store(true, Ordering::Release);
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

    /// Waits for the answer to `seq`; returns it with the request lock
    /// held. The lock is re-taken after every sleep, never past the
    /// deadline; an error may come without it.
    fn await_answer<'a>(
        &'a self,
        mut core: MutexGuard<'a, Core>,
        seq: u64,
        deadline: &mut Deadline,
    ) -> Result<(MutexGuard<'a, Core>, Answer)> {
        loop {
            let found = core.find(seq);
            self.post_stashed(&mut core);
            if let Some(answer) = found? {
                return Ok((core, answer));
            }
            if deadline.is_now() {
                return Err(Error::Timeout);
            }
            core = match self.sleep_for_answers(core, deadline) {
                Ok(core) => core,
                // One last look, if the lock is free: the answer may have
                // been stashed for us just as the deadline passed.
                Err(Error::Timeout) => {
                    let Some(core) = self.core.try_lock() else { return Err(Error::Timeout) };
                    let mut core = self.tidy(core);
                    return match core.find(seq)? {
                        Some(answer) => Ok((core, answer)),
                        None => Err(Error::Timeout),
                    };
                }
                Err(e) => return Err(e),
            };
        }
    }

    /// Wakes the threads waiting on the bulletin if answers were stashed
    /// for them.
    fn post_stashed(&self, core: &mut Core) {
        if std::mem::take(&mut core.stashed) {
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
        self.await_answer(core, seq, deadline).inspect_err(|_| self.abandon_later(seq))
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
    ///
    /// # Examples
    ///
    /// Against an echo service (service 1, command 0) at `endpoint`:
    ///
    /// ```
    /// # use coroipc_server::{Server, ServiceBuilder};
    /// # let endpoint = format!("@coroipc-doc-call-{}", std::process::id());
    /// # let echo = ServiceBuilder::new(1, |_| Ok(())).handler(0, |call| {
    /// #     let payload = call.payload();
    /// #     let _ = call.respond(payload);
    /// # });
    /// # let (handle, thread) = Server::builder().endpoint(&endpoint).service(echo).build()?.spawn()?;
    /// use coroipc_client::{Client, Error};
    ///
    /// let client = Client::connect(&endpoint, 1)?;
    /// let mut buf = [0u8; 64];
    /// let n = client.call(0, b"hello", &mut buf)?;
    /// assert_eq!(&buf[..n], b"hello");
    ///
    /// // A response larger than the buffer is kept, not lost.
    /// let mut small = [0u8; 4];
    /// assert_eq!(client.call(0, b"too long", &mut small), Err(Error::BufferTooSmall { needed: 8 }));
    /// let n = client.take_kept_response(&mut buf)?;
    /// assert_eq!(&buf[..n], b"too long");
    /// # handle.shutdown();
    /// # thread.join().expect("server thread")?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
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
    ///
    /// # Examples
    ///
    /// Against an echo service (service 1, command 0) at `endpoint`:
    ///
    /// ```
    /// # use coroipc_server::{Server, ServiceBuilder};
    /// # let endpoint = format!("@coroipc-doc-in-place-{}", std::process::id());
    /// # let echo = ServiceBuilder::new(1, |_| Ok(())).handler(0, |call| {
    /// #     let payload = call.payload();
    /// #     let _ = call.respond(payload);
    /// # });
    /// # let (handle, thread) = Server::builder().endpoint(&endpoint).service(echo).build()?.spawn()?;
    /// use std::io::IoSlice;
    /// use coroipc_client::{Client, Error};
    ///
    /// let client = Client::connect(&endpoint, 1)?;
    /// let parts = [IoSlice::new(b"zero-"), IoSlice::new(b"copy")];
    /// let response = client.call_in_place(0, &parts, None)?;
    /// assert_eq!(&*response, b"zero-copy"); // read in the shared ring
    ///
    /// // While this thread holds the guard, a call would wait for itself.
    /// assert_eq!(client.call(0, b"", &mut []), Err(Error::GuardHeld));
    /// drop(response); // releases the response's space
    /// assert_eq!(client.call(0, b"", &mut []), Ok(0));
    /// # handle.shutdown();
    /// # thread.join().expect("server thread")?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
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
    ///
    /// # Examples
    ///
    /// Three requests in flight, collected in any order (against an echo
    /// service at `endpoint`):
    ///
    /// ```
    /// # use coroipc_server::{Server, ServiceBuilder};
    /// # let endpoint = format!("@coroipc-doc-send-{}", std::process::id());
    /// # let echo = ServiceBuilder::new(1, |_| Ok(())).handler(0, |call| {
    /// #     let payload = call.payload();
    /// #     let _ = call.respond(payload);
    /// # });
    /// # let (handle, thread) = Server::builder().endpoint(&endpoint).service(echo).build()?.spawn()?;
    /// use std::time::Duration;
    /// use coroipc_client::Client;
    ///
    /// let client = Client::connect(&endpoint, 1)?;
    /// let timeout = Some(Duration::from_secs(10));
    /// let tickets: Vec<_> = (0..3u8).map(|i| client.send(0, &[i], timeout)).collect::<Result<_, _>>()?;
    /// assert_eq!(client.in_flight(), 3);
    ///
    /// let mut buf = [0u8; 1];
    /// for (i, ticket) in tickets.into_iter().enumerate().rev() {
    ///     assert_eq!(client.wait(ticket, &mut buf, timeout)?, 1);
    ///     assert_eq!(buf[0], i as u8); // each ticket gets its own answer
    /// }
    /// assert_eq!(client.in_flight(), 0);
    /// # handle.shutdown();
    /// # thread.join().expect("server thread")?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
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
        let core = self.core(&mut deadline)?;
        if !core.outstanding.contains(&ticket.0) {
            return Err(Error::Invalid);
        }
        let (mut core, answer) = self.await_answer(core, ticket.0, &mut deadline)?;
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
            core = self.sleep_for_answers(core, &mut deadline)?;
        }
    }

    /// One sleep while waiting for answers; returns, with the request lock
    /// re-taken, when something may have arrived. One waiter (the sleeper)
    /// sleeps on the response ring; the others wait on the bulletin for it
    /// to stash their answers or to leave its seat. Nobody holds the
    /// request lock while sleeping, and re-taking it never waits past the
    /// deadline (a thread holding a [`ResponseGuard`] delays nobody's
    /// timeout).
    fn sleep_for_answers<'a>(
        &'a self,
        core: MutexGuard<'a, Core>,
        deadline: &mut Deadline,
    ) -> Result<MutexGuard<'a, Core>> {
        let at = deadline.get();
        match self.bulletin.take_seat() {
            Seat::Sleeper => {
                // Positions only grow: an answer published between this
                // reading and the sleep ends the sleep at once.
                let position = core.channel.response_position();
                let policy = core.channel.wait_policy();
                drop(core);
                let slept = self.status.wait_response_past(position, at, policy);
                self.bulletin.leave_seat();
                slept?;
            }
            Seat::Follower(seen) => {
                drop(core);
                self.bulletin.wait(seen, at);
                if at.is_some_and(|d| Instant::now() >= d) {
                    return Err(Error::Timeout);
                }
            }
        }
        self.relock(at)
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
    ///
    /// # Examples
    ///
    /// Against a service at `endpoint` whose command 1 dispatches its
    /// payload back to the caller as message 7:
    ///
    /// ```
    /// # use coroipc_server::{Server, ServiceBuilder};
    /// # let endpoint = format!("@coroipc-doc-recv-dispatch-{}", std::process::id());
    /// # let echo = ServiceBuilder::new(1, |_| Ok(())).handler(0, |call| {
    /// #     let payload = call.payload();
    /// #     let _ = call.respond(payload);
    /// # }).handler(1, |call| {
    /// #     let _ = call.connection().dispatch(7, call.payload());
    /// #     let _ = call.respond(b"");
    /// # });
    /// # let (handle, thread) = Server::builder().endpoint(&endpoint).service(echo).build()?.spawn()?;
    /// use std::time::Duration;
    /// use coroipc_client::{Client, Error};
    ///
    /// let client = Client::connect(&endpoint, 1)?;
    /// let mut buf = [0u8; 64];
    /// // Nothing dispatched yet: the wait ends at the timeout.
    /// let short = Some(Duration::from_millis(10));
    /// assert_eq!(client.recv_dispatch(&mut buf, short), Err(Error::Timeout));
    /// assert_eq!(client.try_recv_dispatch(&mut buf), Err(Error::TryAgain));
    ///
    /// client.call(1, b"news", &mut [])?;
    /// let info = client.recv_dispatch(&mut buf, Some(Duration::from_secs(10)))?;
    /// assert_eq!((info.id, info.seq), (7, 0));
    /// assert_eq!(&buf[..info.len], b"news");
    /// # handle.shutdown();
    /// # thread.join().expect("server thread")?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
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
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Error::Timeout);
        }
        self.poll.wait(deadline)?;
        Ok(())
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
        self.status.request_flow()
    }

    /// Whether the server is still there.
    pub fn is_connected(&self) -> bool {
        self.status.peer_alive()
    }
}

/// Who sleeps for answers, and the posts that wake the others: behind
/// its own small lock (never held across a sleep), so seats change and
/// waiters wake without the request lock, and a waiter's timeout never
/// depends on it.
#[derive(Debug, Default)]
struct Bulletin {
    seats: Mutex<Seats>,
    posted: Condvar,
}

/// The bulletin's state.
#[derive(Debug, Default)]
struct Seats {
    /// Bumped for every post (an answer stashed, the sleeper's seat freed).
    posts: u64,
    /// A thread sleeps on the response ring for everyone.
    sleeper: bool,
    /// Threads waiting for a post.
    followers: usize,
}

/// The part a waiting thread takes.
enum Seat {
    /// It sleeps on the response ring; it must [`Bulletin::leave_seat`].
    Sleeper,
    /// It waits for a post after this count ([`Bulletin::wait`]).
    Follower(u64),
}

impl Bulletin {
    /// The sleeper's seat if it is free, else a place among the followers.
    fn take_seat(&self) -> Seat {
        let mut seats = self.seats.lock();
        if seats.sleeper {
            seats.followers += 1;
            Seat::Follower(seats.posts)
        } else {
            seats.sleeper = true;
            Seat::Sleeper
        }
    }

    /// Frees the sleeper's seat and wakes the followers (one takes it).
    fn leave_seat(&self) {
        let mut seats = self.seats.lock();
        seats.sleeper = false;
        if seats.followers > 0 {
            seats.posts += 1;
            self.posted.notify_all();
        }
    }

    /// Wakes the followers (answers were stashed for some of them).
    fn post(&self) {
        let mut seats = self.seats.lock();
        if seats.followers > 0 {
            seats.posts += 1;
            self.posted.notify_all();
        }
    }

    /// A follower waits until something is posted after `seen`, or the
    /// deadline; then it leaves the followers.
    fn wait(&self, seen: u64, deadline: Option<Instant>) {
        let mut seats = self.seats.lock();
        while seats.posts == seen {
            match deadline {
                Some(d) => {
                    if self.posted.wait_until(&mut seats, d).timed_out() {
                        break;
                    }
                }
                None => self.posted.wait(&mut seats),
            }
        }
        seats.followers -= 1;
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
        self.poll.as_fd()
    }
}

#[allow(dead_code)]
fn _assert_traits() {
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Client>();
}
