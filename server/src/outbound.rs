//! The per-connection outbound queue behind [`Connection::dispatch`]
//! (coroipc's `coroipcs_dispatch_send`, which never fails: a message that
//! does not fit the client's dispatch ring waits in the server and the
//! client sees flow control until the queue drains).
//!
//! | ring has room, queue empty | → straight into the ring             |
//! |----------------------------|--------------------------------------|
//! | otherwise                  | → appended to the queue              |
//! | queue over its byte bound  | → the service's [`OverflowPolicy`]   |
//!
//! Order: a message goes into the ring only once every message queued
//! before it is there, so nothing overtakes a queued message; sequence
//! numbers are given when a message is accepted (ring or queue), under the
//! same lock, so they are consecutive in the order the client receives.
//!
//! Draining: every dispatch first moves what fits from the queue into the
//! ring; and while messages are queued a drainer thread of the connection
//! sleeps on the ring's space wait point — the client's release wakes it —
//! and moves them on. The drainer ends when the queue is empty or the
//! connection is closed, so at most one thread per connection with queued
//! messages exists, and none for a client that keeps up.
//!
//! While the queue holds messages the control block's `dispatch_queued`
//! word is set: the client's `dispatch_flow_control()` reads `On`.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use coroipc_transport::channel::ChannelError;
use coroipc_transport::control::DisconnectReason;
use coroipc_transport::message::{MessageHeader, HEADER_LEN};

use crate::connection::Connection;
use crate::error::DispatchError;
use crate::stats::Counters;

/// What [`Connection::dispatch`] does with a message that would take the
/// connection's outbound queue over its byte bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverflowPolicy {
    /// The dispatching thread waits up to this long for the client to
    /// drain enough; then the message is refused with
    /// [`DispatchError::Timeout`] (nothing of it was sent).
    Wait(Duration),
    /// The client is disconnected as too slow (it learns
    /// [`DisconnectReason::TooSlow`]); the message is refused with
    /// [`DispatchError::ClientTooSlow`]. The caller never blocks.
    Disconnect,
}

/// The bound and policy of a connection's outbound queue, chosen per
/// service with [`ServiceBuilder::outbound`](crate::ServiceBuilder::outbound).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboundLimits {
    /// Most bytes (message headers included) the queue holds; a message
    /// larger than this alone is still accepted into an empty queue.
    pub max_queued_bytes: usize,
    /// What happens past the bound.
    pub overflow: OverflowPolicy,
}

impl Default for OutboundLimits {
    /// 1 MiB, then disconnect.
    fn default() -> Self {
        Self { max_queued_bytes: 1 << 20, overflow: OverflowPolicy::Disconnect }
    }
}

type DrainedFn = Box<dyn FnOnce(&Connection) + Send>;

/// The queue proper, under the connection's dispatch lock.
pub(crate) struct Queue {
    /// The sequence number of the next accepted message. A message is
    /// numbered when it is accepted (pushed into the ring or queued), so
    /// numbers are never skipped and never reused.
    next_seq: u64,
    /// Encoded messages (header included), oldest first. Invariant: they
    /// carry consecutive sequence numbers ending at `next_seq - 1`, and
    /// nothing of this connection is pushed into the ring while one waits
    /// here (so the client receives them in number order).
    messages: VecDeque<Vec<u8>>,
    /// Bytes in `messages`. Invariant: at most the service's
    /// `max_queued_bytes`, except for a single message admitted into an
    /// empty queue (so any message the connection can carry gets through).
    bytes: usize,
    /// Whether a drainer thread is running for this connection.
    drainer: bool,
    /// Run once the queue is empty (see [`Connection::on_drained`]).
    on_drained: Vec<DrainedFn>,
}

impl Queue {
    pub(crate) fn has_queued(&self) -> bool {
        !self.messages.is_empty()
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub(crate) fn bump_seq(&mut self) {
        self.next_seq += 1;
    }

    pub(crate) fn front_len(&self) -> Option<usize> {
        self.messages.front().map(Vec::len)
    }
}

pub(crate) struct Outbound {
    queue: Mutex<Queue>,
    pub(crate) limits: OutboundLimits,
}

/// How long the drainer sleeps before it looks whether its connection
/// closed (a close by the server does not ring the space wait point).
const DRAIN_SLICE: Duration = Duration::from_millis(50);

impl Outbound {
    pub(crate) fn new(limits: OutboundLimits) -> Self {
        Self {
            queue: Mutex::new(Queue {
                next_seq: 0,
                messages: VecDeque::new(),
                bytes: 0,
                drainer: false,
                on_drained: Vec::new(),
            }),
            limits,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A failed drain: the channel error (the connection is unusable).
#[derive(Debug)]
pub(crate) struct DrainError(ChannelError);

impl DrainError {
    pub(crate) fn into_channel(self) -> ChannelError {
        self.0
    }
}

impl From<DrainError> for DispatchError {
    fn from(e: DrainError) -> Self {
        e.0.into()
    }
}

/// The outcome of one push attempt.
enum Pushed {
    Ring,
    Full,
}

impl Connection {
    /// Pushes one encoded message into the ring.
    fn push_ring(&self, parts: &[IoSlice<'_>], len: usize) -> Result<Pushed, DrainError> {
        // Counted before the push (a client that has the message never
        // reads statistics without it); taken back if it was not sent.
        let c = &self.inner.counters;
        Counters::bump(&c.dispatched, 1);
        Counters::bump(&c.bytes_out, len as u64);
        let result = self.inner.channel.try_dispatch(parts);
        if result.is_err() {
            c.dispatched.fetch_sub(1, Ordering::Relaxed);
            c.bytes_out.fetch_sub(len as u64, Ordering::Relaxed);
        }
        match result {
            Ok(change) => {
                self.count_flow(change);
                Ok(Pushed::Ring)
            }
            Err(ChannelError::TryAgain) => Ok(Pushed::Full),
            Err(e) => {
                Counters::bump(&c.errors, 1);
                Err(DrainError(e))
            }
        }
    }

    /// Moves queued messages into the ring while they fit. Returns the
    /// callbacks to run if the queue became empty (run them unlocked).
    pub(crate) fn drain_locked(&self, q: &mut Queue) -> Result<Vec<DrainedFn>, DrainError> {
        if q.messages.is_empty() {
            return Ok(Vec::new());
        }
        self.observe_flow();
        while let Some(front) = q.messages.front() {
            let len = front.len();
            match self.push_ring(&[IoSlice::new(front)], len)? {
                Pushed::Ring => {
                    q.messages.pop_front();
                    q.bytes -= len;
                }
                Pushed::Full => return Ok(Vec::new()),
            }
        }
        self.inner.channel.set_dispatch_queued(false);
        Ok(std::mem::take(&mut q.on_drained))
    }

    pub(crate) fn run_drained(&self, callbacks: Vec<DrainedFn>) {
        for f in callbacks {
            // A panic in user code costs that callback, not the caller.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
            if r.is_err() {
                log::warn!("connection {}: an on_drained callback panicked", self.inner.id);
            }
        }
    }

    /// Drops the queue of a closed connection (its memory is freed at once).
    fn discard_queue(q: &mut Queue) {
        q.messages = VecDeque::new();
        q.bytes = 0;
        q.on_drained.clear();
    }

    /// Sends dispatch message `id` with `payload` (coroipc's
    /// `coroipcs_dispatch_send`): into the client's dispatch ring if it has
    /// room, else into the connection's outbound queue, which the server
    /// drains into the ring in order as the client reads. Callable from any
    /// thread; never blocks under [`OverflowPolicy::Disconnect`].
    ///
    /// Messages of one connection carry consecutive sequence numbers
    /// (from 0) in the order the client receives them, whichever thread
    /// sent them and whether or not they waited in the queue.
    ///
    /// # Errors
    ///
    /// * [`DispatchError::TooBig`]: larger than
    ///   [`max_payload`](Self::max_payload).
    /// * [`DispatchError::ClientTooSlow`]: the queue was over its bound
    ///   under [`OverflowPolicy::Disconnect`]; the client is being
    ///   disconnected (nothing more is delivered to it).
    /// * [`DispatchError::Timeout`]: the queue stayed over its bound for
    ///   the [`OverflowPolicy::Wait`] time; this message was not sent.
    /// * [`DispatchError::Disconnected`]: the connection is closed.
    ///
    /// # Examples
    ///
    /// A service that greets each client from its connect callback and
    /// tells every connected client about each change, from whatever
    /// thread handles the change. A slow client's messages wait in the
    /// queue (1 MiB by default); one too slow for that is disconnected and
    /// told so (the default [`OverflowPolicy::Disconnect`]).
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use std::time::Duration;
    /// use coroipc_client::Client;
    /// use coroipc_server::{Connection, Server, ServiceBuilder};
    ///
    /// const WELCOME: u32 = 1;
    /// const CHANGED: u32 = 2;
    ///
    /// let watchers: Arc<Mutex<Vec<Connection>>> = Arc::default();
    /// let (on_connect, on_change) = (watchers.clone(), watchers.clone());
    /// let service = ServiceBuilder::new(1, move |conn: &Connection| {
    ///     let _ = conn.dispatch(WELCOME, b"hello"); // from the connect callback too
    ///     on_connect.lock().unwrap().push(conn.clone());
    ///     Ok(())
    /// })
    /// .handler(0, move |call| {
    ///     let change = call.payload();
    ///     // Drop the ones that went away; tell the others.
    ///     on_change.lock().unwrap().retain(|c| c.dispatch(CHANGED, change).is_ok());
    ///     let _ = call.respond(b"");
    /// });
    ///
    /// let endpoint = format!("@coroipc-doc-dispatch-{}", std::process::id());
    /// let (handle, thread) = Server::builder().endpoint(&endpoint).service(service).build()?.spawn()?;
    ///
    /// let watcher = Client::connect(&endpoint, 1)?;
    /// let changer = Client::connect(&endpoint, 1)?;
    /// changer.call(0, b"x = 1", &mut [])?;
    ///
    /// let mut buf = [0u8; 64];
    /// let timeout = Some(Duration::from_secs(10));
    /// let info = watcher.recv_dispatch(&mut buf, timeout)?;
    /// assert_eq!((info.id, info.seq, &buf[..info.len]), (WELCOME, 0, &b"hello"[..]));
    /// let info = watcher.recv_dispatch(&mut buf, timeout)?;
    /// assert_eq!((info.id, info.seq, &buf[..info.len]), (CHANGED, 1, &b"x = 1"[..]));
    ///
    /// handle.shutdown();
    /// thread.join().expect("server thread")?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[doc(alias = "coroipcs_dispatch_send")]
    pub fn dispatch(&self, id: u32, payload: &[u8]) -> Result<(), DispatchError> {
        self.dispatch_vectored(id, &[IoSlice::new(payload)])
    }

    /// Gathering form of [`dispatch`](Self::dispatch): the message is the
    /// concatenation of `parts` (coroipc's `coroipcs_dispatch_iov_send`).
    ///
    /// # Errors
    ///
    /// As [`dispatch`](Self::dispatch).
    #[doc(alias = "coroipcs_dispatch_iov_send")]
    pub fn dispatch_vectored(&self, id: u32, parts: &[IoSlice<'_>]) -> Result<(), DispatchError> {
        self.check_open()?;
        if !self.is_connected() {
            // Being disconnected (e.g. as too slow): queue nothing more.
            return Err(DispatchError::Disconnected);
        }
        let len = HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>();
        if len > self.max_message() {
            Counters::bump(&self.inner.counters.errors, 1);
            return Err(DispatchError::TooBig);
        }
        let limits = self.inner.outbound.limits;
        let mut deadline = None;
        let mut q = self.inner.outbound.lock();
        loop {
            let drained = self.drain_locked(&mut q)?;
            if !drained.is_empty() {
                drop(q);
                self.run_drained(drained);
                q = self.inner.outbound.lock();
                continue;
            }
            if q.messages.is_empty() {
                let header = MessageHeader { id, flags: 0, seq: q.next_seq }.encode();
                let iov = crate::connection::with_header(&header, parts);
                if let Pushed::Ring = self.push_ring(&iov, len)? {
                    q.next_seq += 1;
                    return Ok(());
                }
            }
            if q.messages.is_empty() || q.bytes + len <= limits.max_queued_bytes {
                break;
            }
            // Over the bound.
            match limits.overflow {
                OverflowPolicy::Disconnect => {
                    Self::discard_queue(&mut q);
                    drop(q);
                    log::info!(
                        "connection {}: client too slow (outbound queue over {} bytes): disconnecting",
                        self.inner.id,
                        limits.max_queued_bytes
                    );
                    Counters::bump(&self.inner.counters.errors, 1);
                    self.disconnect_because(DisconnectReason::TooSlow);
                    return Err(DispatchError::ClientTooSlow);
                }
                OverflowPolicy::Wait(timeout) => {
                    let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeout);
                    let front = q.messages.front().map_or(len, Vec::len);
                    drop(q);
                    let now = Instant::now();
                    if now >= deadline {
                        Counters::bump(&self.inner.counters.retries, 1);
                        return Err(DispatchError::Timeout);
                    }
                    match self.inner.channel.wait_dispatch_room(front, deadline.min(now + DRAIN_SLICE)) {
                        Ok(()) | Err(ChannelError::Timeout) => {}
                        Err(e) => return Err(e.into()),
                    }
                    self.check_open()?;
                    q = self.inner.outbound.lock();
                }
            }
        }
        // Queue it (copied: the caller's slices are borrowed).
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&MessageHeader { id, flags: 0, seq: q.next_seq }.encode());
        for p in parts {
            msg.extend_from_slice(p);
        }
        q.next_seq += 1;
        q.bytes += len;
        q.messages.push_back(msg);
        self.inner.channel.set_dispatch_queued(true);
        if !q.drainer {
            q.drainer = true;
            let conn = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("coroipc-drain-{}", self.inner.id))
                .spawn(move || conn.drainer());
            if let Err(e) = spawned {
                // The queue still drains on the next dispatch and at the
                // event loop's tick.
                log::warn!("connection {}: cannot start a drainer thread: {e}", self.inner.id);
                q.drainer = false;
            }
        }
        Ok(())
    }

    /// The drainer thread: moves queued messages into the ring as the
    /// client frees room, until the queue is empty or the connection closed.
    fn drainer(self) {
        loop {
            let mut q = self.inner.outbound.lock();
            if !self.is_connected() {
                Self::discard_queue(&mut q);
                q.drainer = false;
                return;
            }
            let drained = match self.drain_locked(&mut q) {
                Ok(d) => d,
                Err(_) => {
                    Self::discard_queue(&mut q);
                    q.drainer = false;
                    return;
                }
            };
            let Some(front) = q.messages.front().map(Vec::len) else {
                q.drainer = false;
                drop(q);
                self.run_drained(drained);
                return;
            };
            drop(q);
            match self.inner.channel.wait_dispatch_room(front, Instant::now() + DRAIN_SLICE) {
                Ok(()) | Err(ChannelError::Timeout) => {}
                Err(_) => {
                    // The client is gone; the event loop closes the
                    // connection, its queue goes now.
                    let mut q = self.inner.outbound.lock();
                    Self::discard_queue(&mut q);
                    self.inner.channel.set_dispatch_queued(false);
                    q.drainer = false;
                    return;
                }
            }
        }
    }

    /// Moves what fits of the outbound queue into the ring now (the event
    /// loop calls it on its tick; the drainer thread does it as the client
    /// reads).
    pub(crate) fn drain_outbound(&self) {
        let mut q = self.inner.outbound.lock();
        if let Ok(drained) = self.drain_locked(&mut q) {
            drop(q);
            self.run_drained(drained);
        }
    }

    /// Bytes (headers included) waiting in this connection's outbound
    /// queue: 0 while the client keeps up.
    pub fn queued_bytes(&self) -> usize {
        self.inner.outbound.lock().bytes
    }

    /// Messages waiting in this connection's outbound queue.
    pub fn queued_messages(&self) -> usize {
        self.inner.outbound.lock().messages.len()
    }

    /// Runs `f` once this connection can take dispatch messages without
    /// queueing them: at once (on this thread) if its outbound queue is
    /// empty, else on the thread that drains the queue, as soon as it is
    /// empty. For a producer that makes its messages lazily. A connection
    /// that closes first never calls `f` (it is dropped).
    pub fn on_drained(&self, f: impl FnOnce(&Connection) + Send + 'static) {
        let mut q = self.inner.outbound.lock();
        if q.messages.is_empty() {
            drop(q);
            self.run_drained(vec![Box::new(f)]);
        } else {
            q.on_drained.push(Box::new(f));
        }
    }
}
