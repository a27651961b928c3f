//! The server: builder, event-loop entry points, the built-in loop, and the
//! handle other threads use to control it.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use coroipc_transport::channel::{layout_for, negotiate, ChannelError, Limits, PendingHandshake};
use coroipc_transport::control::DisconnectReason;
use coroipc_transport::eventfd::EventFd;
use coroipc_transport::handshake::{HandshakeDecodeError, Refusal, RingSizes, ServerReply};
use coroipc_transport::message::{MessageHeader, FLAG_ONEWAY, HEADER_LEN, KNOWN_FLAGS};
use coroipc_transport::socket::{Endpoint, Listener, PathPermissions};
use coroipc_transport::waiter::spin_until;

use crate::connection::{Connection, ConnectionId, Credentials};

/// A connection's id inside the loop (its token): [`ConnectionId`]'s value.
type RawId = u64;
use crate::error::ServerBuildError;
use crate::poll::{EpollPoller, Poller, Token};
use crate::service::{Disconnect, Outcome, Request, ServiceBuilder, ServiceDyn, State};
use crate::stats::Stats;

/// The listener's token.
pub const LISTENER_TOKEN: Token = Token(0);
/// The waker's token (other threads wake the loop through it).
pub const WAKER_TOKEN: Token = Token(1);
const FIRST_CONNECTION_ID: u64 = 2;

/// Requests handled per connection before the loop moves on to the next
/// one (fairness between connections).
const REQUEST_BATCH: usize = 64;

/// Descriptors one connection holds in the server: its socket, its segment
/// memfd and three eventfds (request, response and dispatch bells).
const FDS_PER_CONNECTION: u64 = 5;
/// Descriptors kept in reserve (placeholder eventfds): given back just
/// before a connection's memory and bells are made, so that making them
/// cannot fail for lack of descriptors, and before an `accept` that failed
/// with `EMFILE`, so that the waiting client can still be told "no".
const RESERVE_FDS: usize = FDS_PER_CONNECTION as usize;
/// Descriptors left for the application besides those open at build time.
const FD_SLACK: u64 = 16;
/// How long the listener is not watched after `accept` ran out of
/// descriptors (a level-triggered listener would wake the loop at once,
/// again and again).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Clients refused through the reserve descriptor per wake-up while out of
/// descriptors, before the listener backs off.
const EMFILE_REFUSALS_PER_WAKE: usize = 64;

/// The authentication decision: peer credentials (from the kernel) and the
/// service asked for → accept, or the refusal the client will see.
pub type AuthFn = dyn Fn(&Credentials, u16) -> Result<(), Refusal> + Send + Sync;

/// Builds a [`Server`] (coroipc's `coroipcs_ipc_init` with its
/// `init_state` callbacks).
#[doc(alias = "coroipcs_ipc_init")]
pub struct ServerBuilder {
    endpoint: Option<Result<Endpoint, String>>,
    services: Vec<Arc<dyn ServiceDyn>>,
    auth: Option<Arc<AuthFn>>,
    limits: Limits,
    max_connections: usize,
    spin: Duration,
    handshake_timeout: Duration,
    response_timeout: Duration,
    max_pending: usize,
    memory_budget: u64,
    memory_per_uid: u64,
    endpoint_permissions: PathPermissions,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerBuilder {
    /// A builder with default limits: 1024 connections (fewer if the
    /// descriptor limit says so, see [`max_connections`](Self::max_connections)),
    /// 64 handshakes in progress, messages up to 8 KiB by default and 1 MiB
    /// at most, a memory budget of 1 GiB of connection segments in all and
    /// 256 MiB per uid, a 50 µs spin budget.
    pub fn new() -> Self {
        Self {
            endpoint: None,
            services: Vec::new(),
            auth: None,
            limits: Limits::default(),
            max_connections: 1024,
            spin: Duration::from_micros(50),
            handshake_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            max_pending: 64,
            memory_budget: 1 << 30,
            memory_per_uid: 256 << 20,
            endpoint_permissions: PathPermissions::default(),
        }
    }

    /// Where to listen: a filesystem path, or `@name` for a Linux abstract
    /// socket name.
    pub fn endpoint(mut self, endpoint: &str) -> Self {
        self.endpoint = Some(Endpoint::parse(endpoint).map_err(|e| e.to_string()));
        self
    }

    /// The mode and owner of a path endpoint's socket file (connecting
    /// needs write permission on it): e.g. `0o660` with a group lets that
    /// group's users connect and nobody else. Applied between `bind(2)` and
    /// `listen(2)`, so no client connects before they hold; they are set
    /// by path, so keep the socket in a directory only the server's user
    /// can write (whoever can write it could swap the file meanwhile).
    /// Abstract endpoints (`@name`) have no permissions: `build` fails with
    /// an I/O error `InvalidInput` if any is set for one.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let server = coroipc_server::Server::builder()
    ///     .endpoint("/run/coroipc/echo.sock")
    ///     .endpoint_permissions(0o660, None, Some(0))
    ///     .build();
    /// ```
    pub fn endpoint_permissions(mut self, mode: u32, uid: Option<u32>, gid: Option<u32>) -> Self {
        self.endpoint_permissions = PathPermissions { mode: Some(mode), uid, gid };
        self
    }

    /// Adds a service.
    pub fn service<S: Send + 'static, C: Send + Sync + 'static>(
        mut self,
        service: ServiceBuilder<S, C>,
    ) -> Self {
        self.services.push(service.build());
        self
    }

    /// Sets the authentication decision, run for every connection before
    /// any memory is created for it. Without one, every peer is accepted.
    pub fn auth(
        mut self,
        f: impl Fn(&Credentials, u16) -> Result<(), Refusal> + Send + Sync + 'static,
    ) -> Self {
        self.auth = Some(Arc::new(f));
        self
    }

    /// Sets the message and ring limits and defaults.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets the largest connection count; further clients are refused with
    /// "connection limit".
    ///
    /// [`build`](Self::build) lowers it to what the process's descriptor
    /// limit (`RLIMIT_NOFILE`, soft) can hold: each connection holds
    /// five descriptors (its socket, its segment, three eventfds) and each handshake in progress
    /// one, on top of those open at build time, a small slack and a
    /// reserve. The server never raises the limit itself (a process-wide
    /// setting); an application that wants more connections raises it
    /// before `build`. [`Server::max_connections`] tells the result.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// How long the built-in loop polls busy connections before it sleeps
    /// (0: always sleep in epoll).
    pub fn spin(mut self, budget: Duration) -> Self {
        self.spin = budget;
        self
    }

    /// How long a client may take to send its hello.
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// Sets the largest number of handshakes in progress (clients that
    /// connected but have not sent their hello yet). When a new client
    /// arrives at the limit, the oldest handshake in progress is dropped:
    /// a flood of connections that never say hello cannot use up the
    /// server's descriptors or lock honest clients out. At least 1.
    pub fn max_pending_handshakes(mut self, n: usize) -> Self {
        self.max_pending = n.max(1);
        self
    }

    /// Sets the memory budget: the largest total size of the shared
    /// segments of all connections, and of the connections of one uid
    /// (a segment holds a connection's three rings). A client whose rings
    /// would exceed either is refused with [`Refusal::NoMemory`]; closing
    /// a connection gives its share back.
    pub fn memory_budget(mut self, total_bytes: u64, per_uid_bytes: u64) -> Self {
        self.memory_budget = total_bytes;
        self.memory_per_uid = per_uid_bytes;
        self
    }

    /// How long a response may wait for a client to make room.
    pub fn response_timeout(mut self, t: Duration) -> Self {
        self.response_timeout = t;
        self
    }

    /// Binds the endpoint and returns the server.
    ///
    /// # Errors
    ///
    /// [`ServerBuildError`] for a missing or bad endpoint, duplicate
    /// services, inconsistent limits or a failed bind.
    pub fn build(self) -> Result<Server, ServerBuildError> {
        let endpoint = match self.endpoint {
            None => return Err(ServerBuildError::NoEndpoint),
            Some(Err(e)) => return Err(ServerBuildError::BadEndpoint(e)),
            Some(Ok(e)) => e,
        };
        let mut services: HashMap<u16, Arc<dyn ServiceDyn>> = HashMap::new();
        for s in self.services {
            let id = s.id();
            if services.insert(id, s).is_some() {
                return Err(ServerBuildError::DuplicateService(id));
            }
        }
        if negotiate(&RingSizes::default(), &self.limits).is_err() {
            return Err(ServerBuildError::BadLimits("the default sizes exceed the limits"));
        }
        if self.limits.dispatch_low_percent >= self.limits.dispatch_high_percent
            || self.limits.dispatch_high_percent > 100
        {
            return Err(ServerBuildError::BadLimits("dispatch watermarks must be low < high <= 100"));
        }
        let (max_connections, max_pending) = fd_limits(self.max_connections, self.max_pending);
        if max_connections == 0 {
            return Err(ServerBuildError::BadLimits("the descriptor limit leaves room for no connection"));
        }
        let listener = Listener::bind_with(&endpoint, &self.endpoint_permissions)?;
        let mut reserve = FdReserve::default();
        reserve.refill();
        let shared = Arc::new(Shared {
            waker: Arc::new(EventFd::new()?),
            shutdown: AtomicBool::new(false),
            control: Mutex::new(ControlRequests::default()),
            registry: Mutex::new(HashMap::new()),
            closed_stats: Mutex::new(Stats::default()),
        });
        for service in services.values() {
            service.attach(ServerHandle { shared: shared.clone() });
        }
        Ok(Server {
            listener,
            shared,
            services,
            auth: self.auth,
            limits: self.limits,
            max_connections,
            max_pending,
            memory_budget: self.memory_budget,
            memory_per_uid: self.memory_per_uid,
            memory_used: 0,
            memory_by_uid: HashMap::new(),
            reserve,
            listener_paused_until: None,
            spin: self.spin,
            handshake_timeout: self.handshake_timeout,
            response_timeout: self.response_timeout,
            next_id: FIRST_CONNECTION_ID,
            pending: HashMap::new(),
            conns: HashMap::default(),
            closing: Vec::new(),
            active: Vec::new(),
            paused_services: Vec::new(),
            scratch: Vec::new(),
            stopped: false,
            builtin_loop: false,
        })
    }
}

/// The connection and handshake limits the descriptor limit allows:
/// `(max_connections, max_pending)`, at most the configured ones.
fn fd_limits(max_connections: usize, max_pending: usize) -> (usize, usize) {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let Some(soft) = soft else { return (max_connections, max_pending) }; // unlimited
    let open = std::fs::read_dir("/proc/self/fd").map_or(64, |d| d.count() as u64);
    // The listener, the waker, the epoll instance and the reserve come on
    // top of what is open now.
    let left = soft.saturating_sub(open + FD_SLACK + 3 + RESERVE_FDS as u64);
    // Handshakes in progress get at most a quarter of what is left.
    let pending = (max_pending as u64).min(left / 4).max(1);
    let conns = (left.saturating_sub(pending) / FDS_PER_CONNECTION).min(max_connections as u64);
    if (conns as usize) < max_connections || (pending as usize) < max_pending {
        log::info!(
            "descriptor limit {soft} ({open} open): at most {conns} connections and {pending} handshakes \
             in progress (asked for {max_connections} and {max_pending})"
        );
    }
    (conns as usize, pending as usize)
}

/// Placeholder descriptors held in reserve (see [`RESERVE_FDS`]).
#[derive(Default)]
struct FdReserve {
    fds: Vec<EventFd>,
}

impl FdReserve {
    /// Takes descriptors back until the reserve is full; whether it is.
    fn refill(&mut self) -> bool {
        while self.fds.len() < RESERVE_FDS {
            match EventFd::new() {
                Ok(fd) => self.fds.push(fd),
                Err(_) => return false,
            }
        }
        true
    }

    /// Gives every reserved descriptor back to the process.
    fn release(&mut self) {
        self.fds.clear();
    }
}

fn out_of_descriptors(e: &io::Error) -> bool {
    let errno = e.raw_os_error();
    errno == Some(rustix::io::Errno::MFILE.raw_os_error())
        || errno == Some(rustix::io::Errno::NFILE.raw_os_error())
}

#[derive(Default)]
struct ControlRequests {
    shutdown_services: Vec<u16>,
    pause_services: Vec<(u16, bool)>,
}

/// State shared with [`ServerHandle`]s and connections.
struct Shared {
    waker: Arc<EventFd>,
    shutdown: AtomicBool,
    control: Mutex<ControlRequests>,
    registry: Mutex<HashMap<RawId, Connection>>,
    /// Counters of connections that are gone.
    closed_stats: Mutex<Stats>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

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

/// Whether the loop can serve a request of `conn` now: one is waiting,
/// requests are not paused, and its response would fit (see `serve`). A
/// connection with requests it cannot serve yet (its client does not read
/// its responses, or its service is paused) must not count as ready: the
/// built-in loop would poll it without ever reaching `epoll_wait`, spinning
/// a core and starving accepts and every armed connection (found by
/// `reliability_hostile::clients_flooding_requests_and_never_reading_cannot_block_the_server_or_grow_it`).
/// `tick` retries such connections; a resume wakes the loop.
fn servable(conn: &Connection) -> bool {
    let c = &conn.inner.channel;
    c.has_request() && !c.request_paused() && c.response_space_for(c.max_message())
}

/// Whether the polling loop should stop spinning for `conn`: it has work,
/// or its client closed the connection (then `serve` closes it at once,
/// instead of spinning out the budget on a dead connection and noticing
/// the hang-up only through epoll — which delayed every `connect` cycle by
/// the spin budget).
fn needs_attention(conn: &Connection) -> bool {
    servable(conn) || conn.inner.channel.peer_closed()
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
    next_id: u64,
    pending: HashMap<u64, PendingHandshake>,
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

/// Controls a running server from any thread. Cheap to clone.
#[derive(Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// Shuts the whole server down: every connection is closed (waking its
    /// client), disconnect callbacks run, and [`Server::run`] returns.
    #[doc(alias = "coroipcs_ipc_exit")]
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.waker.signal();
    }

    /// Shuts one service down: its connections are closed and new clients
    /// of it are refused with "no such service".
    #[doc(alias = "coroipcs_ipc_service_exit")]
    pub fn shutdown_service(&self, service: u16) {
        lock(&self.shared.control).shutdown_services.push(service);
        self.shared.waker.signal();
    }

    /// Pauses (or resumes) reading requests on every connection of
    /// `service` (request-side flow control).
    pub fn pause_service(&self, service: u16, paused: bool) {
        lock(&self.shared.control).pause_services.push((service, paused));
        self.shared.waker.signal();
    }

    /// The open connections.
    pub fn connections(&self) -> Vec<Connection> {
        let mut v: Vec<Connection> = lock(&self.shared.registry).values().cloned().collect();
        v.sort_by_key(Connection::id);
        v
    }

    /// The connection with `id`, if open.
    pub fn connection(&self, id: ConnectionId) -> Option<Connection> {
        lock(&self.shared.registry).get(&id.get()).cloned()
    }

    /// Server-wide counters: every connection, open or gone.
    pub fn stats(&self) -> Stats {
        // Both under the registry lock: see `Server::finish_close`.
        let registry = lock(&self.shared.registry);
        let mut all: Vec<Stats> = registry.values().map(Connection::stats).collect();
        all.push(*lock(&self.shared.closed_stats));
        drop(registry);
        Stats::sum(all.iter())
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

    fn accept_all(&mut self, poller: &mut dyn Poller) {
        if self.listener_paused_until.is_some() {
            return; // a stale readiness report: `tick` resumes accepting
        }
        loop {
            let stream = match self.listener.try_accept() {
                Ok(Some(s)) => s,
                Ok(None) => return,
                Err(e) if out_of_descriptors(&e) => {
                    self.refuse_without_descriptors(poller);
                    return;
                }
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    return;
                }
            };
            if self.pending.len() >= self.max_pending {
                // The oldest handshake in progress makes room: a flood of
                // clients that never say hello cannot lock others out.
                if let Some(&oldest) = self.pending.iter().min_by_key(|(_, p)| p.started()).map(|(id, _)| id)
                {
                    if let Some(p) = self.pending.remove(&oldest) {
                        let _ = poller.deregister(p.stream().as_fd());
                        log::info!("dropping client {oldest}: too many handshakes in progress");
                    }
                }
            }
            let pending = match PendingHandshake::new(stream) {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("handshake set-up failed: {e}");
                    continue;
                }
            };
            let id = self.next_id;
            self.next_id += 1;
            if let Err(e) = poller.register(pending.stream().as_fd(), Token(id)) {
                log::warn!("cannot register a new client: {e}");
                continue;
            }
            self.pending.insert(id, pending);
            // The hello may already be there.
            self.advance_handshake(id, poller);
        }
    }

    /// `accept` ran out of descriptors: the classic reserve-descriptor
    /// trick. Give the reserve back, accept the waiting clients with it one
    /// by one and tell each "connection limit" (a typed refusal, not a
    /// reset), take the reserve again; then stop watching the listener for
    /// [`ACCEPT_BACKOFF`], so that a queue the server cannot take does not
    /// wake the loop at once, again and again.
    #[cold]
    fn refuse_without_descriptors(&mut self, poller: &mut dyn Poller) {
        let mut refused = 0;
        while refused < EMFILE_REFUSALS_PER_WAKE {
            self.reserve.release();
            let accepted = self.listener.try_accept();
            let more = match accepted {
                Ok(Some(stream)) => {
                    let _ = stream.as_std().set_nonblocking(true);
                    let _ =
                        stream.send_with_fds(&ServerReply::Refused(Refusal::ConnectionLimit).encode(), &[]);
                    refused += 1;
                    true
                }
                _ => false,
            };
            let full = self.reserve.refill();
            if !more || !full {
                break;
            }
        }
        log::warn!("out of descriptors: refused {refused} clients; not accepting for {ACCEPT_BACKOFF:?}");
        let _ = poller.deregister(self.listener.as_fd());
        self.listener_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
    }

    /// "Connection ready" (coroipc's `coroipcs_handler_dispatch`): reads the
    /// hello of a pending client, or serves the requests of a connection and
    /// notices its hang-up.
    #[doc(alias = "coroipcs_handler_dispatch")]
    pub fn handle_ready(&mut self, id: ConnectionId, poller: &mut dyn Poller) {
        self.ready(id.get(), poller);
        self.arm_for_sleep(poller);
    }

    fn ready(&mut self, id: u64, poller: &mut dyn Poller) {
        if self.pending.contains_key(&id) {
            self.advance_handshake(id, poller);
            return;
        }
        let Some(entry) = self.conns.get_mut(&id) else { return };
        if entry.armed {
            if entry.bell_edge {
                entry.conn.inner.channel.disarm_without_drain();
            } else {
                entry.conn.inner.channel.disarm();
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
        let stale: Vec<u64> = self
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
                    if e.conn.inner.channel.arm() {
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

    fn advance_handshake(&mut self, id: u64, poller: &mut dyn Poller) {
        let Some(pending) = self.pending.get_mut(&id) else { return };
        let hello = match pending.poll_hello() {
            Ok(None) => return,
            Ok(Some(hello)) => hello,
            Err(e) => {
                log::info!("client {id} dropped during handshake: {e}");
                if let Some(p) = self.pending.remove(&id) {
                    let _ = poller.deregister(p.stream().as_fd());
                }
                return;
            }
        };
        let pending = self.pending.remove(&id).expect("present above");
        let hello = match hello {
            Ok(h) => h,
            Err(e) => {
                let refusal = match e {
                    HandshakeDecodeError::UnsupportedVersion { .. } => Refusal::VersionMismatch,
                    _ => Refusal::Invalid,
                };
                log::info!("client {id} sent a bad hello: {e}");
                let _ = poller.deregister(pending.stream().as_fd());
                pending.refuse(refusal);
                return;
            }
        };
        let decision = self
            .admit(&pending, hello.service)
            .and_then(|service| negotiate(&hello.sizes, &self.limits).map(|sizes| (service, sizes)));
        let (service, sizes) = match decision {
            Ok(ok) => ok,
            Err(refusal) => {
                log::info!("client {id} refused: {refusal}");
                let _ = poller.deregister(pending.stream().as_fd());
                pending.refuse(refusal);
                return;
            }
        };
        let peer = pending.peer();
        let cost = layout_for(&sizes).segment_len;
        let uid_used = self.memory_by_uid.get(&peer.uid).copied().unwrap_or(0);
        if self.memory_used + cost > self.memory_budget || uid_used + cost > self.memory_per_uid {
            log::info!(
                "client {id} refused: {cost} bytes of rings exceed the memory budget \
                 ({} of {} used, uid {}: {uid_used} of {})",
                self.memory_used,
                self.memory_budget,
                peer.uid,
                self.memory_per_uid
            );
            let _ = poller.deregister(pending.stream().as_fd());
            pending.refuse(Refusal::NoMemory);
            return;
        }
        // The connection's descriptors come out of the reserve, so making
        // them cannot fail for lack of descriptors; a reserve that cannot
        // be filled again means the process is at its limit: refuse, typed.
        if !self.reserve.refill() {
            log::warn!("client {id} refused: out of descriptors");
            let _ = poller.deregister(pending.stream().as_fd());
            pending.refuse(Refusal::ConnectionLimit);
            return;
        }
        self.reserve.release();
        // `accept` consumes the stream and closes it on failure: deregister
        // it first (epoll would forget a closed fd by itself, a poll(2)
        // loop's list would not) and register it again on success.
        let _ = poller.deregister(pending.stream().as_fd());
        let accepted = pending.accept(sizes, &self.limits);
        self.reserve.refill();
        let channel = match accepted {
            Ok(c) => c,
            Err(e) => {
                log::warn!("client {id}: cannot set up the connection: {e}");
                return;
            }
        };
        self.memory_used += cost;
        *self.memory_by_uid.entry(peer.uid).or_insert(0) += cost;
        let conn = Connection::new(
            id,
            service.id(),
            channel,
            self.shared.waker.clone(),
            self.response_timeout,
            service.outbound(),
        );
        if let Err(e) = poller.register(conn.inner.channel.socket_fd(), Token(id)) {
            log::warn!("client {id}: cannot register: {e}");
            self.finish_close(conn);
            return;
        }
        let bell_edge = match poller.register_edge(conn.inner.channel.request_fd(), Token(id)) {
            Ok(edge) => edge,
            Err(e) => {
                log::warn!("client {id}: cannot register: {e}");
                let _ = poller.deregister(conn.inner.channel.socket_fd());
                self.finish_close(conn);
                return;
            }
        };
        if self.paused_services.contains(&service.id()) {
            conn.inner.channel.set_request_paused(true);
        }
        lock(&self.shared.registry).insert(id, conn.clone());
        self.conns.insert(
            id,
            Entry {
                conn: conn.clone(),
                service: service.clone(),
                state: Box::new(()),
                armed: false,
                bell_edge,
            },
        );
        self.active.push(id);
        match service.connect(&conn) {
            Ok(state) => {
                if let Some(e) = self.conns.get_mut(&id) {
                    e.state = state;
                }
                self.serve(id, poller);
            }
            Err(refusal) => {
                log::info!("client {id}: service {} refused the connection: {refusal}", service.id());
                // No state was made, so there is no disconnect callback.
                self.conns.remove(&id);
                self.unregister(&conn, poller);
                self.finish_close(conn);
            }
        }
    }

    /// The admission checks that need no memory: service, limits, auth.
    fn admit(&self, pending: &PendingHandshake, service: u16) -> Result<Arc<dyn ServiceDyn>, Refusal> {
        let svc = self.services.get(&service).ok_or(Refusal::NoSuchService)?;
        // Connections whose disconnect callback asked to be retried still
        // hold their descriptors and memory.
        if self.conns.len() + self.closing.len() >= self.max_connections {
            return Err(Refusal::ConnectionLimit);
        }
        if let Some(max) = svc.max_connections() {
            if self.conns.values().filter(|e| e.service.id() == service).count() >= max {
                return Err(Refusal::ConnectionLimit);
            }
        }
        if let Some(auth) = &self.auth {
            let peer = pending.peer();
            let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| auth(&peer, service)));
            match verdict {
                Ok(v) => v?,
                Err(p) => {
                    // A panicking decision is no "yes": refuse this client only.
                    log::error!(
                        "the authentication callback panicked (pid {:?}): {}",
                        peer.pid,
                        crate::service::panic_text(&*p)
                    );
                    return Err(Refusal::AccessDenied);
                }
            }
        }
        Ok(svc.clone())
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

    /// Serves the active connections (those that had requests recently)
    /// without sleeping: polls them for up to the spin budget, returns as
    /// soon as one had requests. Returns whether anything was served.
    fn poll_active(&mut self, poller: &mut dyn Poller) -> bool {
        if self.active.is_empty() {
            return false;
        }
        // Taken out (not cloned: no allocation per poll) and put back; a
        // connection `serve` closes meanwhile is skipped by every later use.
        let mut active = std::mem::take(&mut self.active);
        let conns = &self.conns;
        let mut ready = || active.iter().any(|id| conns.get(id).is_some_and(|e| needs_attention(&e.conn)));
        if !spin_until(&mut ready, self.spin) {
            self.active = active;
            return false;
        }
        let mut served = 0;
        for &id in &active {
            served += self.serve(id, poller);
        }
        active.retain(|id| self.conns.contains_key(id));
        active.append(&mut self.active);
        self.active = active;
        served > 0
    }

    /// Arms every active connection (announces that the loop will sleep in
    /// epoll); returns `true` if a request arrived meanwhile, in which case
    /// the loop must not sleep.
    fn arm_active(&mut self) -> bool {
        let mut raced = false;
        for id in std::mem::take(&mut self.active) {
            if let Some(e) = self.conns.get_mut(&id) {
                if e.conn.inner.channel.arm() && servable(&e.conn) {
                    // A request arrived before the announcement, so its
                    // client rang nobody: keep polling this connection, or
                    // the request would wait for the next tick (10 ms).
                    raced = true;
                    self.active.push(id);
                }
                e.armed = true;
            }
        }
        raced
    }

    /// Runs the built-in event loop (epoll) until
    /// [`ServerHandle::shutdown`].
    ///
    /// Between two requests of a busy client the loop does not sleep: it
    /// polls the connections that were active for the spin budget, and only
    /// then arms their eventfds and sleeps in `epoll_wait` (ARCHITECTURE.md
    /// explains the choice and its measurements).
    ///
    /// # Errors
    ///
    /// An error of the epoll instance itself.
    pub fn run(mut self) -> io::Result<()> {
        let mut poller = EpollPoller::new()?;
        self.register(&mut poller)?;
        self.run_with(poller)
    }

    /// The built-in loop on an epoll instance the server is registered with.
    fn run_with(mut self, mut poller: EpollPoller) -> io::Result<()> {
        self.builtin_loop = true;
        let mut ready = Vec::with_capacity(64);
        let mut last_tick = Instant::now();
        let mut last_epoll = Instant::now();
        const TICK: Duration = Duration::from_millis(10);
        while !self.stopped {
            if self.poll_active(&mut poller) {
                // Busy: look at other descriptors now and then, not per request.
                if last_epoll.elapsed() < Duration::from_micros(200) {
                    continue;
                }
                last_epoll = Instant::now();
                poller.wait(&mut ready, Some(Duration::ZERO))?;
            } else if self.arm_active() {
                continue;
            } else {
                poller.wait(&mut ready, Some(TICK))?;
                last_epoll = Instant::now();
            }
            for token in ready.drain(..) {
                self.handle_event(token, &mut poller);
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.tick(&mut poller);
            }
        }
        Ok(())
    }

    /// Starts [`run`](Self::run) on a new thread; returns a handle and the
    /// thread's join handle.
    ///
    /// # Errors
    ///
    /// The thread spawn error.
    pub fn spawn(mut self) -> io::Result<(ServerHandle, std::thread::JoinHandle<io::Result<()>>)> {
        let handle = self.handle();
        // Set the loop up here, so every descriptor it needs exists (and a
        // failure is reported) before `spawn` returns.
        let mut poller = EpollPoller::new()?;
        self.register(&mut poller)?;
        let epoll = poller.into_fd();
        let join = std::thread::Builder::new()
            .name("coroipc-server".into())
            .spawn(move || self.run_with(EpollPoller::from_fd(epoll)))?;
        Ok((handle, join))
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

#[allow(dead_code)]
fn _assert_send() {
    fn is_send<T: Send>() {}
    is_send::<Server>();
    is_send::<ServerHandle>();
    is_send::<Connection>();
    let _ = ChannelError::TryAgain;
}
