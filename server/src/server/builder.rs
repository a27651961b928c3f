//! [`ServerBuilder`]: the server's configuration, checked and fitted to
//! the process's descriptor limit by [`ServerBuilder::build`].

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coroipc_transport::channel::{negotiate, Limits};
use coroipc_transport::eventfd::EventFd;
use coroipc_transport::handshake::{Refusal, RingSizes};
use coroipc_transport::socket::{Endpoint, Listener, PathPermissions};

use super::admission::{FdReserve, FDS_PER_CONNECTION, RESERVE_FDS};
use super::handle::{ControlRequests, ServerHandle, Shared};
use super::{Server, FIRST_CONNECTION_ID};
use crate::connection::Credentials;
use crate::error::ServerBuildError;
use crate::service::{ServiceBuilder, ServiceDyn};
use crate::stats::Stats;

/// Descriptors left for the application besides those open at build time.
const FD_SLACK: u64 = 16;

/// The authentication decision: peer credentials (from the kernel) and the
/// service asked for → accept, or the refusal the client will see.
pub type AuthFn = dyn Fn(&Credentials, u16) -> Result<(), Refusal> + Send + Sync;

/// Builds a [`Server`] (coroipc's `coroipcs_ipc_init` with its
/// `init_state` callbacks).
///
/// # Examples
///
/// A configuration mistake is a [`ServerBuildError`] from
/// [`build`](Self::build), before anything listens; the authentication
/// decision runs on the kernel's credentials before any memory is created
/// for a client.
///
/// ```
/// use coroipc_client::{Client, Error};
/// use coroipc_server::{Refusal, Server, ServerBuildError, ServiceBuilder};
///
/// let endpoint = format!("@coroipc-doc-builder-{}", std::process::id());
/// let service = |id| ServiceBuilder::new(id, |_| Ok(())).handler(0, |call| {
///     let _ = call.respond(b"ok");
/// });
///
/// let err = Server::builder().service(service(1)).build().unwrap_err();
/// assert!(matches!(err, ServerBuildError::NoEndpoint));
/// let err = Server::builder().endpoint(&endpoint).service(service(1)).service(service(1)).build().unwrap_err();
/// assert!(matches!(err, ServerBuildError::DuplicateService(1)));
///
/// const NOBODY: u32 = 65534;
/// let server = Server::builder()
///     .endpoint(&endpoint)
///     .service(service(1))
///     .service(service(2))
///     // Anyone may use service 1; only the user `nobody` service 2.
///     .auth(|peer, service| match service {
///         2 if peer.uid != NOBODY => Err(Refusal::AccessDenied),
///         _ => Ok(()),
///     })
///     .max_connections(16)
///     .build()?;
/// assert!(server.max_connections() <= 16);
/// let (handle, thread) = server.spawn()?;
///
/// let client = Client::connect(&endpoint, 1)?;
/// let mut buf = [0u8; 8];
/// assert_eq!(client.call(0, b"", &mut buf)?, 2);
/// # use std::os::unix::fs::MetadataExt;
/// # if std::fs::metadata("/proc/self")?.uid() != NOBODY {
/// assert!(matches!(Client::connect(&endpoint, 2), Err(Error::AccessDenied)));
/// # }
/// assert!(matches!(Client::connect(&endpoint, 3), Err(Error::NoSuchService)));
///
/// handle.shutdown();
/// thread.join().expect("server thread")?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
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
