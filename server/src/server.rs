//! The server: its state, the event-loop entry points a loop calls
//! (`handle_event`, `tick`), serving a connection's requests and closing
//! connections.
//!
//! The rest lives in the submodules, one concern each:
//!
//! * [`builder`]: [`ServerBuilder`], the configuration and what the
//!   descriptor limit allows;
//! * [`handle`]: [`ServerHandle`] and the state shared with other threads;
//! * [`admission`]: accepting clients and taking them from hello to a
//!   connection — the invariant "nothing is created before authentication"
//!   lives there;
//! * [`busy_poll`]: the built-in loop ([`Server::run`]), which polls busy
//!   connections before it sleeps in epoll.

mod admission;
mod builder;
mod busy_poll;
mod handle;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coroipc_transport::channel::{layout_for, ChannelError, Limits, PendingHandshake};
use coroipc_transport::control::DisconnectReason;
use coroipc_transport::message::{MessageHeader, FLAG_ONEWAY, HEADER_LEN, KNOWN_FLAGS};
use coroipc_transport::socket::{Endpoint, Listener};

use crate::connection::{Connection, ConnectionId};
use crate::poll::{Poller, Token};
use crate::service::{Disconnect, Outcome, Request, ServiceDyn, State};
use crate::stats::Stats;

use admission::FdReserve;
use admission::ACCEPT_BACKOFF;
pub use builder::{AuthFn, ServerBuilder};
use busy_poll::servable;
pub use handle::ServerHandle;
use handle::{lock, Shared};

/// A connection's id inside the loop (its token): [`ConnectionId`]'s value.
type RawId = u64;

/// The listener's token.
pub const LISTENER_TOKEN: Token = Token(0);
/// The waker's token (other threads wake the loop through it).
pub const WAKER_TOKEN: Token = Token(1);
const FIRST_CONNECTION_ID: RawId = 2;

/// Requests handled per connection before the loop moves on to the next
/// one (fairness between connections).
const REQUEST_BATCH: usize = 64;

/// Hashes a `u64` id to itself. Ids are assigned by the server in
/// sequence, never by a peer, so there is nothing to defend against.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

struct Entry {
    conn: Connection,
    service: Arc<dyn ServiceDyn>,
    state: State,
    /// Armed: announced as a poller, waiting for the request eventfd.
    armed: bool,
    /// The request eventfd is registered edge-triggered: no need to drain it.
    bell_edge: bool,
}

struct Closing {
    conn: Connection,
    service: Arc<dyn ServiceDyn>,
    state: State,
    retry_at: Instant,
}

/// A coroipc server: a listening endpoint and its services.
///
/// The server owns no event loop: register it with any loop through
/// [`register`](Self::register) and call
/// [`handle_event`](Self::handle_event) for ready tokens — or call
/// [`run`](Self::run) for the built-in epoll loop. Other threads control it
/// through a [`ServerHandle`].
pub struct Server {
    listener: Listener,
    shared: Arc<Shared>,
    services: HashMap<u16, Arc<dyn ServiceDyn>>,
    auth: Option<Arc<AuthFn>>,
    limits: Limits,
    max_connections: usize,
    max_pending: usize,
    memory_budget: u64,
    memory_per_uid: u64,
    /// Bytes of segments of open connections, in all and per uid.
    memory_used: u64,
    memory_by_uid: HashMap<u32, u64>,
    reserve: FdReserve,
    /// Set while the listener is not watched (out of descriptors).
    listener_paused_until: Option<Instant>,
    spin: Duration,
    handshake_timeout: Duration,
    response_timeout: Duration,
    next_id: RawId,
    pending: HashMap<RawId, PendingHandshake>,
    /// Looked up several times per request: keyed by the server's own
    /// sequential ids, so an identity hash is enough (SipHash showed in the
    /// rr64 profile).
    conns: HashMap<RawId, Entry, BuildHasherDefault<IdHasher>>,
    closing: Vec<Closing>,
    /// Connections polled without arming (they had requests recently).
    active: Vec<RawId>,
    paused_services: Vec<u16>,
    scratch: Vec<u8>,
    stopped: bool,
    /// Set by [`Server::run`]. The built-in loop arms connections itself
    /// (after spinning on them); in a foreign loop the entry points arm
    /// every connection they served before returning (`arm_for_sleep`).
    builtin_loop: bool,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("endpoint", self.listener.endpoint())
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A builder.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::new()
    }

    /// A handle for other threads.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle { shared: self.shared.clone() }
    }

    /// The endpoint the server listens on.
    pub fn endpoint(&self) -> &Endpoint {
        self.listener.endpoint()
    }

    /// The connection limit in force: the configured one, lowered to what
    /// the descriptor limit can hold (see [`ServerBuilder::max_connections`]).
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Registers the listener and the waker with `poller`. Call once before
    /// feeding events to [`handle_event`](Self::handle_event).
    ///
    /// # Errors
    ///
    /// The poller's registration error.
    pub fn register(&mut self, poller: &mut dyn Poller) -> io::Result<()> {
        poller.register(self.listener.as_fd(), LISTENER_TOKEN)?;
        poller.register(self.shared.waker.as_fd(), WAKER_TOKEN)
    }

    /// Whether a shutdown completed (the loop should stop).
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Handles one ready token reported by the event loop: accepts on
    /// [`LISTENER_TOKEN`], serves control requests on [`WAKER_TOKEN`],
    /// otherwise reads a handshake or serves a connection's requests.
    ///
    /// A foreign loop needs only this, called for every ready token, and
    /// [`tick`](Self::tick) every few tens of milliseconds: before it
    /// returns, every connection it served is armed (its next request
    /// makes its eventfd readable), so the loop may sleep at once.
    pub fn handle_event(&mut self, token: Token, poller: &mut dyn Poller) {
        match token {
            LISTENER_TOKEN => self.accept_all(poller),
            WAKER_TOKEN => self.handle_wake(poller),
            Token(id) => self.ready(id, poller),
        }
        self.arm_for_sleep(poller);
    }

    /// "Listener ready" (coroipc's `coroipcs_handler_accept`): accepts
    /// every queued client and starts their handshakes.
    #[doc(alias = "coroipcs_handler_accept")]
    pub fn handle_accept(&mut self, poller: &mut dyn Poller) {
        self.accept_all(poller);
        self.arm_for_sleep(poller);
    }

    /// "Connection ready" (coroipc's `coroipcs_handler_dispatch`): reads the
    /// hello of a pending client, or serves the requests of a connection and
    /// notices its hang-up.
    #[doc(alias = "coroipcs_handler_dispatch")]
    pub fn handle_ready(&mut self, id: ConnectionId, poller: &mut dyn Poller) {
        self.ready(id.get(), poller);
        self.arm_for_sleep(poller);
    }

    fn ready(&mut self, id: RawId, poller: &mut dyn Poller) {
        if self.pending.contains_key(&id) {
            self.advance_handshake(id, poller);
            return;
        }
        let Some(entry) = self.conns.get_mut(&id) else { return };
        if entry.armed {
            if entry.bell_edge {
                entry.conn.inner.channel.disarm_requests_keep_bell();
            } else {
                entry.conn.inner.channel.disarm_requests();
            }
            entry.armed = false;
            if !self.active.contains(&id) {
                self.active.push(id);
            }
        }
        // A request it can serve means the wake-up was its bell: serve it (a
        // dead client is noticed when its socket's hang-up is reported).
        // Only otherwise pay the socket check — one `poll(2)` less per
        // request. (Not "no request": a client that floods and never reads
        // has requests it cannot be served, and its hang-up must be seen.)
        let channel = &entry.conn.inner.channel;
        if channel.peer_closed() || (!servable(&entry.conn) && !channel.peer_alive()) {
            self.close_connection(id, poller, "client closed the connection");
            return;
        }
        self.serve(id, poller);
    }

    fn handle_wake(&mut self, poller: &mut dyn Poller) {
        self.shared.waker.drain();
        let requests = std::mem::take(&mut *lock(&self.shared.control));
        for (service, paused) in requests.pause_services {
            if paused {
                self.paused_services.push(service);
            } else {
                self.paused_services.retain(|&s| s != service);
            }
            for e in self.conns.values().filter(|e| e.service.id() == service) {
                e.conn.inner.channel.set_request_paused(paused);
            }
        }
        for service in requests.shutdown_services {
            self.services.remove(&service);
            let ids: Vec<_> =
                self.conns.iter().filter(|(_, e)| e.service.id() == service).map(|(id, _)| *id).collect();
            for id in ids {
                if let Some(e) = self.conns.get(&id) {
                    e.conn.inner.channel.set_disconnect_reason(DisconnectReason::ServiceShutdown);
                    e.conn.inner.channel.close_shutting_down();
                }
                self.close_connection(id, poller, "service shut down");
            }
        }
        let requested: Vec<_> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.inner.disconnect_requested.load(Ordering::Acquire))
            .map(|(id, _)| *id)
            .collect();
        for id in requested {
            self.close_connection(id, poller, "disconnected by the server");
        }
        // Resumed connections may have requests waiting without a wake-up.
        let resumed: Vec<_> = self.conns.keys().copied().collect();
        for id in resumed {
            if self.conns.get(&id).is_some_and(|e| !e.armed || e.conn.inner.channel.has_request()) {
                self.serve(id, poller);
            }
        }
        if self.shared.shutdown.load(Ordering::Acquire) {
            self.stop(poller);
        }
    }

    /// Periodic housekeeping: drops handshakes older than the handshake
    /// timeout (slow-loris clients), retries disconnect callbacks that asked
    /// to be retried, notices dead clients of idle connections. Call it from
    /// a foreign loop every few tens of milliseconds.
    pub fn tick(&mut self, poller: &mut dyn Poller) {
        let now = Instant::now();
        if self.listener_paused_until.is_some_and(|t| now >= t) && !self.stopped {
            self.listener_paused_until = None;
            self.reserve.refill();
            match poller.register(self.listener.as_fd(), LISTENER_TOKEN) {
                Ok(()) => self.accept_all(poller),
                Err(e) => {
                    log::warn!("cannot watch the listener again: {e}");
                    self.listener_paused_until = Some(now + ACCEPT_BACKOFF);
                }
            }
        }
        let stale: Vec<RawId> = self
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.started()) > self.handshake_timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(p) = self.pending.remove(&id) {
                let _ = poller.deregister(p.stream().as_fd());
                log::info!("dropping client {id}: handshake timed out");
            }
        }
        let mut still = Vec::new();
        for mut c in std::mem::take(&mut self.closing) {
            if c.retry_at > now {
                still.push(c);
                continue;
            }
            match c.service.disconnect(&mut c.state, &c.conn) {
                Disconnect::Done => self.finish_close(c.conn),
                Disconnect::RetryLater => {
                    c.retry_at = now + Duration::from_millis(10);
                    still.push(c);
                }
            }
        }
        self.closing = still;
        // Connections stalled on a full response ring: retry them.
        let ids: Vec<_> = self.conns.keys().copied().collect();
        for id in ids {
            // Outbound dispatch queues: drained by their own threads; this
            // is the fallback if one could not be started.
            if let Some(e) = self.conns.get(&id) {
                e.conn.drain_outbound();
            }
            if self.conns.get(&id).is_some_and(|e| e.conn.inner.channel.has_request()) {
                self.serve(id, poller);
            }
        }
        self.arm_for_sleep(poller);
    }

    /// Foreign loops only (the built-in loop arms in [`run`](Self::run)
    /// after spinning): arms every connection served since the last call,
    /// so that its next request rings its eventfd and wakes the loop, and
    /// serves again those whose requests raced the arming. Without this a
    /// foreign loop would see a connection's requests only at `tick`.
    /// A connection still busy after a few rounds is left to a wake-up
    /// through the waker, so one client cannot starve the loop.
    fn arm_for_sleep(&mut self, poller: &mut dyn Poller) {
        if self.builtin_loop {
            return;
        }
        for _ in 0..4 {
            if self.active.is_empty() {
                return;
            }
            let mut raced = Vec::new();
            for id in std::mem::take(&mut self.active) {
                if let Some(e) = self.conns.get_mut(&id) {
                    e.armed = true;
                    if e.conn.inner.channel.arm_requests() {
                        raced.push(id);
                    }
                }
            }
            // `serve` puts the connections that made progress back into
            // `active`; a paused or stalled one stays armed and waits for
            // its resume (waker) or for `tick`.
            for id in raced {
                self.serve(id, poller);
            }
        }
        if !self.active.is_empty() {
            self.shared.waker.signal();
        }
    }

    /// Serves up to a batch of requests of connection `id`.
    /// Returns how many were handled.
    fn serve(&mut self, id: RawId, poller: &mut dyn Poller) -> usize {
        let Some(entry) = self.conns.get_mut(&id) else { return 0 };
        let conn = entry.conn.clone();
        let channel = &conn.inner.channel;
        if conn.inner.disconnect_requested.load(Ordering::Acquire) {
            self.close_connection(id, poller, "disconnected by the server");
            return 0;
        }
        if channel.peer_closed() && !channel.has_request() {
            self.close_connection(id, poller, "client closed the connection");
            return 0;
        }
        if channel.request_paused() {
            return 0;
        }
        let max = channel.max_message();
        let mut handled = 0;
        while handled < REQUEST_BATCH {
            // Backpressure: take a request only if its response will fit, so
            // answering never blocks the loop.
            if !channel.response_space_for(max) {
                break;
            }
            match channel.try_recv_request(&mut self.scratch) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    Self::count_error(&conn);
                    channel.set_disconnect_reason(match e {
                        ChannelError::Corrupt(_) => DisconnectReason::CorruptMemory,
                        _ => DisconnectReason::ProtocolViolation,
                    });
                    self.close_connection(id, poller, &format!("protocol violation: {e}"));
                    return handled;
                }
            }
            handled += 1;
            let Some(header) = MessageHeader::decode(&self.scratch) else {
                Self::count_error(&conn);
                channel.set_disconnect_reason(DisconnectReason::ProtocolViolation);
                self.close_connection(id, poller, "request shorter than its header");
                return handled;
            };
            if header.flags & !KNOWN_FLAGS != 0 || header.id > u32::from(u16::MAX) {
                Self::count_error(&conn);
                channel.set_disconnect_reason(DisconnectReason::ProtocolViolation);
                self.close_connection(id, poller, "request with unknown flags or command");
                return handled;
            }
            let c = &conn.inner.counters;
            crate::stats::Counters::bump(&c.requests, 1);
            crate::stats::Counters::bump(&c.bytes_in, self.scratch.len() as u64);
            let request = Request {
                command: header.id as u16,
                seq: header.seq,
                oneway: header.flags & FLAG_ONEWAY != 0,
                payload: &self.scratch[HEADER_LEN..],
            };
            let Some(entry) = self.conns.get_mut(&id) else { return handled };
            match entry.service.handle(&mut entry.state, &conn, request) {
                Outcome::Handled => {}
                Outcome::Vetoed => crate::stats::Counters::bump(&c.retries, 1),
                Outcome::Unknown => crate::stats::Counters::bump(&c.errors, 1),
            }
            if conn.inner.disconnect_requested.load(Ordering::Acquire) {
                self.close_connection(id, poller, "disconnected by the server");
                return handled;
            }
        }
        if handled > 0 && !self.builtin_loop && !self.active.contains(&id) {
            self.active.push(id); // to be armed (or served again) by `arm_for_sleep`
        }
        handled
    }

    fn count_error(conn: &Connection) {
        crate::stats::Counters::bump(&conn.inner.counters.errors, 1);
    }

    fn unregister(&mut self, conn: &Connection, poller: &mut dyn Poller) {
        let _ = poller.deregister(conn.inner.channel.socket_fd());
        let _ = poller.deregister(conn.inner.channel.request_fd());
        self.active.retain(|&a| a != conn.id().get());
    }

    /// Closes a connection: wakes the client, runs the disconnect callback
    /// (again later if it asks), then forgets the connection.
    fn close_connection(&mut self, id: RawId, poller: &mut dyn Poller, why: &str) {
        let Some(mut entry) = self.conns.remove(&id) else { return };
        log::debug!("closing connection {id}: {why}");
        self.unregister(&entry.conn, poller);
        entry.conn.inner.closed.store(true, Ordering::Release);
        entry.conn.inner.channel.close();
        match entry.service.disconnect(&mut entry.state, &entry.conn) {
            Disconnect::Done => self.finish_close(entry.conn),
            Disconnect::RetryLater => self.closing.push(Closing {
                conn: entry.conn,
                service: entry.service,
                state: entry.state,
                retry_at: Instant::now() + Duration::from_millis(10),
            }),
        }
    }

    fn finish_close(&mut self, conn: Connection) {
        conn.inner.closed.store(true, Ordering::Release);
        conn.inner.channel.close();
        // Its share of the memory budget comes back (the memory itself once
        // the last handle, e.g. a held `Responder`, is gone).
        let cost = layout_for(&conn.inner.channel.sizes()).segment_len;
        self.memory_used = self.memory_used.saturating_sub(cost);
        let uid = conn.credentials().uid;
        if let Some(used) = self.memory_by_uid.get_mut(&uid) {
            *used = used.saturating_sub(cost);
            if *used == 0 {
                self.memory_by_uid.remove(&uid);
            }
        }
        // Under the registry lock, as in `ServerHandle::stats`: a reader
        // sees the connection either open or in the closed totals, never in
        // neither (that lost its counters from a total now and then).
        let mut registry = lock(&self.shared.registry);
        registry.remove(&conn.id().get());
        let mut closed = lock(&self.shared.closed_stats);
        *closed = Stats::sum([&*closed, &conn.stats()]);
    }

    fn stop(&mut self, poller: &mut dyn Poller) {
        let ids: Vec<_> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(e) = self.conns.get(&id) {
                e.conn.inner.channel.set_disconnect_reason(DisconnectReason::ServerShutdown);
                e.conn.inner.channel.close_shutting_down();
            }
            self.close_connection(id, poller, "server shutting down");
        }
        for (_, p) in self.pending.drain() {
            let _ = poller.deregister(p.stream().as_fd());
        }
        // Disconnect callbacks that asked to be retried get one more chance
        // each; state is dropped after that.
        for mut c in std::mem::take(&mut self.closing) {
            let _ = c.service.disconnect(&mut c.state, &c.conn);
            self.finish_close(c.conn);
        }
        let _ = poller.deregister(self.listener.as_fd());
        let _ = poller.deregister(self.shared.waker.as_fd());
        self.stopped = true;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for (_, e) in self.conns.drain() {
            e.conn.inner.closed.store(true, Ordering::Release);
            e.conn.inner.channel.set_disconnect_reason(DisconnectReason::ServerShutdown);
            e.conn.inner.channel.close();
        }
        lock(&self.shared.registry).clear();
    }
}

/// The server moves to its loop's thread; handles and connections go to
/// any thread.
const _: () = {
    const fn is_send<T: Send>() {}
    is_send::<Server>();
    is_send::<ServerHandle>();
    is_send::<Connection>();
};
