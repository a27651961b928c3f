//! The async client (feature `tokio`): `call` is an `async fn`, dispatch
//! messages arrive as a [`Stream`] or one at a time from
//! [`AsyncClient::next_dispatch`].
//!
//! It shares the protocol with the blocking [`Client`](crate::Client) — the
//! same core sends requests and matches responses to requests by sequence
//! number, the same dispatch half decodes dispatch messages — and differs
//! only in how it waits: instead of spinning or sleeping in the kernel it
//! announces itself as a poller on the response ring while any call is in
//! flight and awaits the response eventfd's readiness through [`AsyncFd`],
//! with no thread per wait and no busy loop. A waiting call returns
//! `Pending` to the runtime. Every wake-up drains the eventfd *before* it
//! reads the ring, and the announcement stays up as long as one call
//! waits, so an answer published after that read rings again: none slips
//! between a look and a sleep, whichever task happens to read it (answers
//! for other tasks are stashed and those tasks woken).

use std::io::IoSlice;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use coroipc_transport::channel::{ClientDispatch, ClientStatus};
use coroipc_transport::message::{FLAG_ONEWAY, HEADER_LEN};
use coroipc_transport::socket::PeerCred;
use futures_core::Stream;
use parking_lot::{Mutex, MutexGuard};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

use crate::builder::ClientBuilder;
use crate::core::{peek_dispatch, Core, Deadline};
use crate::error::{Error, Result};
use crate::{FlowState, Sizes, Ticket};

/// A dispatch message received by the async client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    /// The service's message id.
    pub id: u32,
    /// The connection's dispatch sequence number.
    pub seq: u64,
    /// The payload.
    pub payload: Vec<u8>,
}

/// A connection to one service, driven by tokio. `Send + Sync`; share it
/// (e.g. in an `Arc`) to make concurrent calls: they are pipelined and each
/// gets its own response.
#[derive(Debug)]
pub struct AsyncClient {
    core: Mutex<Core>,
    dispatch: Mutex<ClientDispatch>,
    status: ClientStatus,
    response_fd: AsyncFd<OwnedFd>,
    dispatch_fd: AsyncFd<OwnedFd>,
    socket_fd: AsyncFd<OwnedFd>,
    /// Woken whenever a task stashes a response that another task awaits.
    stashed: Notify,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("in_flight", &self.outstanding.len()).finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// Connects an [`AsyncClient`] (the handshake runs on a blocking
    /// thread).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future abandons the connect: the handshake already
    /// under way finishes on its blocking thread (within the builder's
    /// timeout) and the connection it made, if any, is closed at once; the
    /// server sees a client that connected and left.
    ///
    /// # Errors
    ///
    /// As [`ClientBuilder::connect`].
    pub async fn connect_async(self) -> Result<AsyncClient> {
        let parts = tokio::task::spawn_blocking(move || self.open())
            .await
            .map_err(|e| Error::from(std::io::Error::other(e)))??;
        let response_fd = parts.core.channel.response_fd().try_clone_to_owned().map_err(Error::from)?;
        // tokio deprecates its safe constructors because an arbitrary
        // `AsRawFd` type may hand out a different fd later (tokio#8587); an
        // `OwnedFd` owns one fixed descriptor until it drops, which is the
        // contract `register_with_interest` asks for. This crate forbids
        // `unsafe`, so use the safe (deprecated) form.
        #[allow(deprecated)]
        let readable = |fd: OwnedFd| AsyncFd::with_interest(fd, Interest::READABLE).map_err(Error::from);
        Ok(AsyncClient {
            core: Mutex::new(parts.core),
            dispatch: Mutex::new(parts.dispatch),
            status: parts.status,
            response_fd: readable(response_fd)?,
            dispatch_fd: readable(parts.dispatch_fd)?,
            socket_fd: readable(parts.socket_fd)?,
            stashed: Notify::new(),
        })
    }
}

/// Forgets a request whose future was dropped before its response came:
/// the late response is then discarded like a timed-out call's.
struct Abandon<'a> {
    client: &'a AsyncClient,
    seq: Option<u64>,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if let Some(seq) = self.seq {
            self.client.lock().abandon(seq);
        }
    }
}

/// Keeps the response ring's poller announcement up while a call waits;
/// the last waiter to leave takes it down.
struct Armed<'a> {
    client: &'a AsyncClient,
}

impl<'a> Armed<'a> {
    fn new(client: &'a AsyncClient) -> Self {
        let mut core = client.lock();
        core.async_waiters += 1;
        let _ = core.channel.arm_response();
        Self { client }
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        let mut core = self.client.lock();
        core.async_waiters -= 1;
        if core.async_waiters == 0 {
            core.channel.disarm_response();
        }
    }
}

impl AsyncClient {
    /// Connects to `service` at `endpoint` with default sizes.
    ///
    /// # Cancel safety
    ///
    /// As [`ClientBuilder::connect_async`].
    ///
    /// # Errors
    ///
    /// As [`Client::connect`](crate::Client::connect).
    pub async fn connect(endpoint: &str, service: u16) -> Result<Self> {
        crate::Client::builder(endpoint, service).connect_async().await
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock()
    }

    /// Sends `request` as command `command` and returns the response.
    /// Many calls may be in flight at once (from concurrent tasks); each
    /// gets its own response, matched by sequence number. While it waits
    /// the future returns `Pending` (the task sleeps until the response
    /// eventfd is readable); it never blocks the runtime's thread.
    ///
    /// # Cancel safety
    ///
    /// This method is cancel safe: dropping the future (e.g. in
    /// `tokio::select!` or `tokio::time::timeout`) abandons the call, the
    /// connection stays usable, and the late response is discarded when
    /// it comes — never taken for the answer to another call. A request
    /// already sent is still delivered to the server.
    ///
    /// # Errors
    ///
    /// As [`Client::call`](crate::Client::call); `Disconnected(reason)`
    /// when the server goes away.
    ///
    /// # Examples
    ///
    /// Concurrent calls over one connection on a current-thread runtime
    /// (against an echo service at `endpoint`):
    ///
    /// ```
    /// # use coroipc_server::{Server, ServiceBuilder};
    /// # let endpoint = format!("@coroipc-doc-async-call-{}", std::process::id());
    /// # let echo = ServiceBuilder::new(1, |_| Ok(())).handler(0, |call| {
    /// #     let payload = call.payload();
    /// #     let _ = call.respond(payload);
    /// # });
    /// # let (handle, thread) = Server::builder().endpoint(&endpoint).service(echo).build()?.spawn()?;
    /// use coroipc_client::AsyncClient;
    ///
    /// let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    /// runtime.block_on(async {
    ///     let client = AsyncClient::connect(&endpoint, 1).await?;
    ///     let (a, b) = tokio::join!(client.call(0, b"one"), client.call(0, b"two"));
    ///     assert_eq!((a?, b?), (b"one".to_vec(), b"two".to_vec()));
    ///     Ok::<_, coroipc_client::Error>(())
    /// })?;
    /// # handle.shutdown();
    /// # thread.join().expect("server thread")?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn call(&self, command: u16, request: &[u8]) -> Result<Vec<u8>> {
        let seq = self.send_seq(command, 0, request).await?;
        let mut abandon = Abandon { client: self, seq: Some(seq) };
        let result = self.response(seq).await;
        abandon.seq = None;
        if result.is_err() {
            self.lock().abandon(seq);
        }
        result
    }

    /// [`call`](Self::call) bounded by `timeout`.
    ///
    /// # Cancel safety
    ///
    /// As [`call`](Self::call).
    ///
    /// # Errors
    ///
    /// As [`call`](Self::call), plus `Timeout` (the late answer is
    /// discarded).
    pub async fn call_timeout(&self, command: u16, request: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        tokio::time::timeout(timeout, self.call(command, request)).await.map_err(|_| Error::Timeout)?
    }

    /// Sends a request without waiting for its response (pipelining);
    /// collect it with [`wait`](Self::wait).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropped before it returned, the request was either
    /// not sent or sent and its ticket lost — its answer is then kept
    /// until the connection closes, like any uncollected ticket's.
    ///
    /// # Errors
    ///
    /// `TryAgain` if `max_in_flight` requests are outstanding; `TooBig`,
    /// `Disconnected`.
    pub async fn send(&self, command: u16, request: &[u8]) -> Result<Ticket> {
        let seq = self.send_seq(command, 0, request).await?;
        self.lock().outstanding.insert(seq);
        Ok(Ticket(seq))
    }

    /// Sends a request that wants no response (fire-and-forget).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropped, the request was sent whole or not at all.
    ///
    /// # Errors
    ///
    /// `TooBig`, `Disconnected`.
    pub async fn send_oneway(&self, command: u16, request: &[u8]) -> Result<()> {
        self.send_seq(command, FLAG_ONEWAY, request).await.map(drop)
    }

    /// Collects the response of `ticket`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropped, the ticket stays outstanding and can be
    /// waited for again.
    ///
    /// # Errors
    ///
    /// As [`call`](Self::call); `Invalid` for a ticket that is not
    /// outstanding.
    pub async fn wait(&self, ticket: Ticket) -> Result<Vec<u8>> {
        if !self.lock().outstanding.contains(&ticket.0) {
            return Err(Error::Invalid);
        }
        let result = self.response(ticket.0).await;
        self.lock().outstanding.remove(&ticket.0);
        result
    }

    /// Sends a request (waiting while the request ring is full or the
    /// server paused requests); its answer is then wanted.
    async fn send_seq(&self, command: u16, flags: u32, request: &[u8]) -> Result<u64> {
        let mut backoff = Duration::from_micros(50);
        loop {
            {
                let mut core = self.lock();
                if flags & FLAG_ONEWAY != 0 || core.outstanding.len() < core.max_in_flight {
                    // A zero timeout makes the send non-blocking.
                    let mut now = Deadline::new(Some(Duration::ZERO));
                    match core.send(command, flags, &[IoSlice::new(request)], &mut now) {
                        Err(Error::TryAgain | Error::Timeout) => {}
                        other => return other,
                    }
                } else {
                    return Err(Error::TryAgain);
                }
            }
            // No fd signals free request space (the server's doorbell is
            // its own); back off with timer sleeps, never a busy loop.
            if !self.status.peer_alive() {
                return Err(Error::Disconnected(self.status.disconnect_reason()));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(5));
        }
    }

    /// Awaits the response to wanted request `seq`.
    async fn response(&self, seq: u64) -> Result<Vec<u8>> {
        // First a short cooperative spin: look, yield to the runtime (other
        // tasks run meanwhile), look again, for up to the wait policy's spin
        // budget. An answer the server gives at once is then taken without
        // an eventfd write on the server's side and a reactor wake-up on
        // ours (a cross-CPU wake costs 20–45 µs here; a round trip under a
        // microsecond). The thread is never held: every look is followed by
        // a yield.
        let spin = self.lock().channel.wait_policy().spin;
        if !spin.is_zero() {
            let started = std::time::Instant::now();
            loop {
                if let Some(answer) = self.take_answer(seq)? {
                    return answer;
                }
                if started.elapsed() >= spin {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        let _armed = Armed::new(self);
        loop {
            let stashed = self.stashed.notified();
            tokio::pin!(stashed);
            stashed.as_mut().enable();
            {
                let mut core = self.lock();
                let taken = core.try_take(seq);
                if std::mem::take(&mut core.stashed) {
                    self.stashed.notify_waiters();
                }
                if let Some((status, payload)) = taken? {
                    return match Error::from_status(status) {
                        None => Ok(payload),
                        Some(e) => Err(e),
                    };
                }
            }
            tokio::select! {
                ready = self.response_fd.readable() => {
                    let mut guard = ready.map_err(Error::from)?;
                    // Drain before the next look at the ring: an answer
                    // published after that look rings again (the
                    // announcement stays up while `_armed` lives).
                    guard.clear_ready();
                    self.lock().channel.drain_response_fd();
                }
                () = &mut stashed => {}
                _ = self.socket_fd.readable() => {
                    // Hang-up: take a response that made it, else give up.
                    let mut core = self.lock();
                    if let Some((status, payload)) = core.try_take(seq)? {
                        return match Error::from_status(status) {
                            None => Ok(payload),
                            Some(e) => Err(e),
                        };
                    }
                    return Err(Error::Disconnected(self.status.disconnect_reason()));
                }
            }
        }
    }

    /// The answer to `seq` if it arrived, without waiting (answers for
    /// other tasks found meanwhile are stashed and those tasks woken).
    fn take_answer(&self, seq: u64) -> Result<Option<Result<Vec<u8>>>> {
        let mut core = self.lock();
        let taken = core.try_take(seq);
        if std::mem::take(&mut core.stashed) {
            self.stashed.notify_waiters();
        }
        Ok(taken?.map(|(status, payload)| match Error::from_status(status) {
            None => Ok(payload),
            Some(e) => Err(e),
        }))
    }

    /// The dispatch messages, as a stream. When the connection goes away,
    /// whatever the reason, the stream yields `Err(Error::Disconnected(reason))`
    /// once and then ends. Only one stream should be polled at a time.
    pub fn dispatch(&self) -> DispatchStream<'_> {
        DispatchStream { client: self, ended: false }
    }

    /// The next dispatch message (without any stream crate).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a message is taken from the ring only in the poll
    /// that returns it.
    ///
    /// # Errors
    ///
    /// `Disconnected(reason)` when the server is gone and every message it
    /// sent was received; `Protocol` if it broke the ring.
    pub async fn next_dispatch(&self) -> Result<Dispatch> {
        std::future::poll_fn(|cx| self.poll_dispatch(cx)).await
    }

    /// Receives one dispatch message without waiting.
    fn try_dispatch(&self) -> Result<Dispatch> {
        let mut dispatch = self.dispatch.lock();
        let info = peek_dispatch(&mut dispatch, Duration::ZERO)?;
        let payload = dispatch.current_dispatch().map(|m| m[HEADER_LEN..].to_vec());
        dispatch.release_dispatch();
        Ok(Dispatch { id: info.id, seq: info.seq, payload: payload.unwrap_or_default() })
    }

    /// Polls for the next dispatch message.
    fn poll_dispatch(&self, cx: &mut Context<'_>) -> Poll<Result<Dispatch>> {
        loop {
            match self.try_dispatch() {
                Err(Error::TryAgain) => {}
                other => return Poll::Ready(other),
            }
            // Empty: the dispatch eventfd was drained and rings on the next
            // message (it is level-triggered, see the transport).
            match self.dispatch_fd.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => guard.clear_ready(),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::from(e))),
                Poll::Pending => {
                    // A hung-up socket: the next look reports the reason.
                    if let Poll::Ready(Ok(mut guard)) = self.socket_fd.poll_read_ready(cx) {
                        guard.clear_ready();
                        if !self.status.peer_alive() {
                            continue;
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// The dispatch flow-control state (see
    /// [`Client::dispatch_flow_control`](crate::Client::dispatch_flow_control)).
    pub fn dispatch_flow_control(&self) -> FlowState {
        self.status.dispatch_flow()
    }

    /// The request flow-control state (see
    /// [`Client::request_flow_control`](crate::Client::request_flow_control)).
    pub fn request_flow_control(&self) -> FlowState {
        self.status.request_flow()
    }

    /// Whether the server is still there.
    pub fn is_connected(&self) -> bool {
        self.status.peer_alive()
    }

    /// The server's credentials, from the kernel.
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

    /// Number of pipelined requests (tickets) not yet collected.
    pub fn in_flight(&self) -> usize {
        self.lock().outstanding.len()
    }
}

/// The stream of dispatch messages of an [`AsyncClient`].
#[derive(Debug)]
pub struct DispatchStream<'a> {
    client: &'a AsyncClient,
    /// The disconnect was reported: the stream has ended.
    ended: bool,
}

impl Stream for DispatchStream<'_> {
    type Item = Result<Dispatch>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.client.poll_dispatch(cx) {
            Poll::Pending => Poll::Pending,
            // Whatever the reason: the reason once, then the end.
            Poll::Ready(Err(e @ Error::Disconnected(_))) => {
                self.get_mut().ended = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(other) => Poll::Ready(Some(other)),
        }
    }
}

#[allow(dead_code)]
fn _assert_traits() {
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<AsyncClient>();
}
