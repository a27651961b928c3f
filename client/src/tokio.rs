//! The async client (feature `tokio`): `call` is an `async fn`, dispatch
//! messages arrive as a [`Stream`].
//!
//! It shares the protocol with the blocking [`Client`](crate::Client) — the
//! same `Inner` sends requests, matches responses to requests by sequence
//! number and decodes dispatch messages — and differs only in how it waits:
//! instead of spinning or sleeping in the kernel it arms the transport's
//! eventfds (announcing itself as a poller on the ring's wait point) and
//! awaits their readiness through [`AsyncFd`], with no thread per wait and
//! no busy loop. Readiness is edge-triggered: every wake-up drains the
//! eventfd and re-checks the ring before it waits again, and an arm is
//! always followed by a re-check, so no message slips between the two.

use std::io::IoSlice;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

use crate::client::{ClientBuilder, Deadline, Inner};
use crate::error::{Error, Result};
use crate::Status;

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
    inner: Arc<Mutex<Inner>>,
    response_fd: AsyncFd<OwnedFd>,
    dispatch_fd: AsyncFd<OwnedFd>,
    socket_fd: AsyncFd<OwnedFd>,
    /// Woken whenever a task stashes a response that another task awaits.
    stashed: Notify,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").field("in_flight", &self.outstanding.len()).finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// Connects an [`AsyncClient`] (the handshake runs on a blocking
    /// thread).
    ///
    /// # Errors
    ///
    /// As [`ClientBuilder::connect`].
    pub async fn connect_async(self) -> Result<AsyncClient> {
        let (inner, dispatch_fd, socket_fd) = tokio::task::spawn_blocking(move || self.open())
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        let response_fd = inner.channel.response_fd().try_clone_to_owned().map_err(Error::Io)?;
        // tokio deprecates its safe constructors because an arbitrary
        // `AsRawFd` type may hand out a different fd later (tokio#8587); an
        // `OwnedFd` owns one fixed descriptor until it drops, which is the
        // contract `register_with_interest` asks for. This crate forbids
        // `unsafe`, so use the safe (deprecated) form.
        #[allow(deprecated)]
        let readable = |fd: OwnedFd| AsyncFd::with_interest(fd, Interest::READABLE).map_err(Error::Io);
        Ok(AsyncClient {
            inner: Arc::new(Mutex::new(inner)),
            response_fd: readable(response_fd)?,
            dispatch_fd: readable(dispatch_fd)?,
            socket_fd: readable(socket_fd)?,
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
            let mut inner = self.client.lock();
            inner.outstanding.remove(&seq);
            let _ = inner.try_take(seq);
        }
    }
}

impl AsyncClient {
    /// Connects to `service` at `endpoint` with default sizes.
    ///
    /// # Errors
    ///
    /// As [`Client::connect`](crate::Client::connect).
    pub async fn connect(endpoint: &str, service: u16) -> Result<Self> {
        crate::Client::builder(endpoint, service).connect_async().await
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `request` as command `command` and returns the response.
    /// Many calls may be in flight at once (from concurrent tasks); each
    /// gets its own response, matched by sequence number. Dropping the
    /// future abandons the call (its late response is discarded).
    ///
    /// # Errors
    ///
    /// As [`Client::call`](crate::Client::call); `Disconnected(reason)`
    /// when the server goes away.
    pub async fn call(&self, command: u16, request: &[u8]) -> Result<Vec<u8>> {
        let seq = self.send(command, request).await?;
        let mut abandon = Abandon { client: self, seq: Some(seq) };
        let result = self.response(seq).await;
        abandon.seq = None;
        result
    }

    /// Sends a request (waiting while the request ring is full or the
    /// server paused requests) and registers it as outstanding.
    async fn send(&self, command: u16, request: &[u8]) -> Result<u64> {
        let mut backoff = Duration::from_micros(50);
        loop {
            {
                let mut inner = self.lock();
                if inner.outstanding.len() < inner.max_in_flight {
                    // A zero timeout makes the send non-blocking.
                    let mut now = Deadline::new(Some(Duration::ZERO));
                    match inner.send(command, 0, &[IoSlice::new(request)], &mut now) {
                        Ok(seq) => {
                            inner.outstanding.insert(seq);
                            return Ok(seq);
                        }
                        Err(Error::TryAgain | Error::Timeout) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            // No fd signals free request space (the server's doorbell is
            // its own); back off with timer sleeps, never a busy loop.
            let gone = {
                let inner = self.lock();
                (!inner.channel.peer_alive()).then(|| inner.channel.disconnect_reason())
            };
            if let Some(reason) = gone {
                return Err(Error::Disconnected(reason));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(5));
        }
    }

    /// Awaits the response to outstanding request `seq`.
    async fn response(&self, seq: u64) -> Result<Vec<u8>> {
        loop {
            let stashed = self.stashed.notified();
            tokio::pin!(stashed);
            stashed.as_mut().enable();
            {
                let mut inner = self.lock();
                let before = inner.outstanding.len();
                let taken = inner.try_take(seq)?;
                if let Some((status, payload)) = taken {
                    return match Error::from_status(status) {
                        None => Ok(payload),
                        Some(e) => Err(e),
                    };
                }
                // Responses for other tasks may have been stashed: wake them.
                if inner.outstanding.len() == before {
                    self.stashed.notify_waiters();
                }
                if inner.channel.arm_response() {
                    continue; // something arrived between the look and the arm
                }
            }
            tokio::select! {
                ready = self.response_fd.readable() => {
                    let mut guard = ready.map_err(Error::Io)?;
                    self.lock().channel.disarm_response(); // drains the eventfd
                    guard.clear_ready();
                }
                () = &mut stashed => {}
                _ = self.socket_fd.readable() => {
                    // Hang-up: take a response that made it, else give up.
                    let mut inner = self.lock();
                    if let Some((status, payload)) = inner.try_take(seq)? {
                        return match Error::from_status(status) {
                            None => Ok(payload),
                            Some(e) => Err(e),
                        };
                    }
                    return Err(Error::Disconnected(inner.channel.disconnect_reason()));
                }
            }
        }
    }

    /// The dispatch messages, as a stream. When the connection goes away,
    /// whatever the reason, the stream yields `Err(Error::Disconnected(reason))`
    /// once and then ends. Only one stream should be polled at a time.
    pub fn dispatch(&self) -> DispatchStream<'_> {
        DispatchStream { client: self, ended: false }
    }

    /// Receives one dispatch message without waiting (arming the dispatch
    /// fd when there is none).
    fn try_dispatch(&self) -> Result<Dispatch> {
        let mut inner = self.lock();
        let info = inner.peek_dispatch(Duration::ZERO)?;
        let payload =
            inner.channel.current_dispatch().map(|m| m[coroipc_transport::message::HEADER_LEN..].to_vec());
        inner.channel.release_dispatch();
        Ok(Dispatch { id: info.id, seq: info.seq, payload: payload.unwrap_or_default() })
    }

    /// The dispatch flow-control state.
    pub fn dispatch_flow_control(&self) -> crate::FlowState {
        self.lock().channel.dispatch_flow()
    }

    /// Number of calls in flight.
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
        let client = self.client;
        loop {
            match client.try_dispatch() {
                Ok(d) => return Poll::Ready(Some(Ok(d))),
                Err(Error::TryAgain) => {}
                // Whatever the reason: the reason once, then the end.
                Err(e @ Error::Disconnected(_)) => {
                    self.get_mut().ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            // Empty, and the dispatch fd is armed (see `peek_dispatch`).
            match client.dispatch_fd.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => {
                    // The next `try_dispatch` drains the eventfd before it
                    // looks at the ring (and re-arms after looking), so
                    // clearing readiness here cannot lose a message.
                    guard.clear_ready();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(Error::Io(e)))),
                Poll::Pending => {
                    if let Poll::Ready(Ok(_)) = client.socket_fd.poll_read_ready(cx) {
                        // The server is gone; anything it sent was read above.
                        return Poll::Ready(None);
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[allow(dead_code)]
fn _assert_traits() {
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<AsyncClient>();
    let _ = Status::Ok;
}
