//! Services: per-connection state, connect/disconnect callbacks, request
//! admission and the handler selector.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::io::IoSlice;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use coroipc_transport::handshake::Refusal;
use coroipc_transport::message::Status;

use crate::connection::Connection;
use crate::error::RespondError;
use crate::outbound::OutboundLimits;
use crate::server::ServerHandle;

/// A request as a handler sees it: in server-private memory (copied out of
/// the shared ring before any handler runs, so a client cannot change it
/// while it is read).
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub(crate) command: u16,
    pub(crate) seq: u64,
    pub(crate) oneway: bool,
    pub(crate) payload: &'a [u8],
}

impl<'a> Request<'a> {
    /// The command id.
    pub fn command(&self) -> u16 {
        self.command
    }

    /// The client's sequence number for this request.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether the client wants no response (fire-and-forget).
    pub fn is_oneway(&self) -> bool {
        self.oneway
    }

    /// The payload (the message after its header).
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }
}

/// A service's verdict on one request before its handler runs (coroipc's
/// `sending_allowed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Run the handler.
    Allow,
    /// Answer "try again" without running the handler.
    TryAgain,
    /// Answer "invalid" without running the handler.
    Invalid,
}

/// What a disconnect callback asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disconnect {
    /// Done: drop the connection's state.
    Done,
    /// Not yet (the service still holds work for it): call again later.
    RetryLater,
}

/// One request being handled: the request, the connection's state, and
/// the means to answer — now ([`respond`](Self::respond)) or later from any
/// thread ([`defer`](Self::defer)).
///
/// Every request that wants a response gets exactly one: a `Call` dropped
/// without answering answers [`Status::Invalid`], so a client never waits
/// for a response that will not come.
pub struct Call<'a, S, C = ()> {
    request: Request<'a>,
    state: &'a mut S,
    connection: &'a Connection,
    context: &'a C,
    server: &'a ServerHandle,
    answered: bool,
}

impl<S, C> fmt::Debug for Call<'_, S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call").field("request", &self.request).finish_non_exhaustive()
    }
}

impl<'a, S, C> Call<'a, S, C> {
    /// The request.
    pub fn request(&self) -> Request<'a> {
        self.request
    }

    /// The request payload.
    pub fn payload(&self) -> &'a [u8] {
        self.request.payload
    }

    /// The connection's state (coroipc's `coroipcs_private_data_get`).
    #[doc(alias = "coroipcs_private_data_get")]
    pub fn state(&mut self) -> &mut S {
        self.state
    }

    /// The connection (clone it to keep it past this call).
    pub fn connection(&self) -> &Connection {
        self.connection
    }

    /// The service's shared context, given to
    /// [`ServiceBuilder::with_context`] (no `Arc` clone per handler).
    pub fn context(&self) -> &'a C {
        self.context
    }

    /// The server this call arrived at: its connections (with
    /// [`ServerHandle::connections`]), statistics, shutdown.
    pub fn server(&self) -> &'a ServerHandle {
        self.server
    }

    /// Largest response payload this connection carries (its negotiated
    /// maximum message less the 16-byte header); a larger response is
    /// refused with `TooBig` and the client is answered [`Status::TooBig`].
    pub fn max_payload(&self) -> usize {
        self.connection.max_payload()
    }

    /// Answers with `payload` (coroipc's `coroipcs_response_send`).
    ///
    /// # Errors
    ///
    /// [`RespondError`] if the connection closed or the response is too big
    /// (the client is then answered [`Status::TooBig`]).
    #[doc(alias = "coroipcs_response_send")]
    pub fn respond(self, payload: &[u8]) -> Result<(), RespondError> {
        self.respond_vectored(&[IoSlice::new(payload)])
    }

    /// Answers with the concatenation of `parts` (coroipc's
    /// `coroipcs_response_iov_send`).
    ///
    /// # Errors
    ///
    /// As [`respond`](Self::respond).
    #[doc(alias = "coroipcs_response_iov_send")]
    pub fn respond_vectored(mut self, parts: &[IoSlice<'_>]) -> Result<(), RespondError> {
        self.answered = true;
        if self.request.oneway {
            return Ok(());
        }
        answer(self.connection, self.request.seq, parts)
    }

    /// Answers with an error status and no payload. Service codes are
    /// `Status::Service(code)` with `code >= Status::SERVICE_BASE` (see
    /// [`Status::service`]); the client receives the same code.
    ///
    /// # Errors
    ///
    /// As [`respond`](Self::respond); [`RespondError::InvalidStatus`] for a
    /// status that is not [sendable](Status::is_sendable) (nothing is sent,
    /// and the request is answered [`Status::Invalid`]).
    pub fn respond_status(mut self, status: Status) -> Result<(), RespondError> {
        if !status.is_sendable() {
            return Err(RespondError::InvalidStatus); // dropping answers Invalid
        }
        self.answered = true;
        if self.request.oneway {
            return Ok(());
        }
        self.connection.respond(self.request.seq, status, &[])
    }

    /// Answers later: the returned [`Responder`] can be moved to another
    /// thread and keeps the connection alive until it answers.
    pub fn defer(mut self) -> Responder {
        self.answered = true;
        Responder {
            connection: self.connection.clone(),
            seq: self.request.seq,
            oneway: self.request.oneway,
            answered: false,
        }
    }
}

impl<S, C> Drop for Call<'_, S, C> {
    fn drop(&mut self) {
        if !self.answered && !self.request.oneway {
            let _ = self.connection.respond(self.request.seq, Status::Invalid, &[]);
        }
    }
}

/// A deferred answer to one request, sendable from any thread. Dropping it
/// without answering answers [`Status::Invalid`].
///
/// # Examples
///
/// The handler hands the work to another thread and returns at once, so
/// the event loop goes on serving; the client's call waits for the answer.
///
/// ```
/// use coroipc_client::{Client, Error};
/// use coroipc_server::{Server, ServiceBuilder};
///
/// let slow = ServiceBuilder::new(1, |_| Ok(()))
///     .handler(0, |call| {
///         let request = call.payload().to_vec(); // the payload is borrowed from the call
///         let responder = call.defer();
///         std::thread::spawn(move || {
///             let answer: Vec<u8> = request.iter().rev().copied().collect();
///             let _ = responder.respond(&answer);
///         });
///     })
///     .handler(1, |call| {
///         // Forgotten: the drop answers "invalid", the client is not left waiting.
///         drop(call.defer());
///     });
///
/// let endpoint = format!("@coroipc-doc-responder-{}", std::process::id());
/// let (handle, thread) = Server::builder().endpoint(&endpoint).service(slow).build()?.spawn()?;
///
/// let client = Client::connect(&endpoint, 1)?;
/// let mut buf = [0u8; 16];
/// let n = client.call(0, b"stressed", &mut buf)?;
/// assert_eq!(&buf[..n], b"desserts");
/// assert_eq!(client.call(1, b"", &mut buf), Err(Error::Invalid));
///
/// handle.shutdown();
/// thread.join().expect("server thread")?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Responder {
    connection: Connection,
    seq: u64,
    oneway: bool,
    answered: bool,
}

impl Responder {
    /// The request's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The connection.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Answers with `payload` (coroipc's `coroipcs_response_send`, from
    /// any thread).
    ///
    /// # Errors
    ///
    /// [`RespondError::Disconnected`] if the client went away meanwhile
    /// (never a panic); `TooBig` (the client is then answered
    /// [`Status::TooBig`]); `Timeout` if the client did not make room.
    pub fn respond(self, payload: &[u8]) -> Result<(), RespondError> {
        self.respond_vectored(&[IoSlice::new(payload)])
    }

    /// Answers with the concatenation of `parts`.
    ///
    /// # Errors
    ///
    /// As [`respond`](Self::respond).
    pub fn respond_vectored(mut self, parts: &[IoSlice<'_>]) -> Result<(), RespondError> {
        self.answered = true;
        if self.oneway {
            return Ok(());
        }
        answer(&self.connection, self.seq, parts)
    }

    /// Answers with an error status (see [`Call::respond_status`]).
    ///
    /// # Errors
    ///
    /// As [`respond`](Self::respond); [`RespondError::InvalidStatus`] for a
    /// status that is not [sendable](Status::is_sendable) (nothing is sent,
    /// and the request is answered [`Status::Invalid`]).
    pub fn respond_status(mut self, status: Status) -> Result<(), RespondError> {
        if !status.is_sendable() {
            return Err(RespondError::InvalidStatus); // dropping answers Invalid
        }
        self.answered = true;
        if self.oneway {
            return Ok(());
        }
        self.connection.respond(self.seq, status, &[])
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.answered && !self.oneway {
            let _ = self.connection.respond(self.seq, Status::Invalid, &[]);
        }
    }
}

/// Sends the response `parts` to request `seq`. A response too big for
/// the connection is answered [`Status::TooBig`] instead: the request is
/// marked answered, and without this the client would wait for ever.
fn answer(connection: &Connection, seq: u64, parts: &[IoSlice<'_>]) -> Result<(), RespondError> {
    let result = connection.respond(seq, Status::Ok, parts);
    if result == Err(RespondError::TooBig) {
        let _ = connection.respond(seq, Status::TooBig, &[]);
    }
    result
}

/// A request handler.
pub type Handler<S, C = ()> = Arc<dyn Fn(Call<'_, S, C>) + Send + Sync>;

type ConnectFn<S> = Box<dyn Fn(&Connection) -> Result<S, Refusal> + Send + Sync>;
type DisconnectFn<S> = Box<dyn Fn(&Connection, &mut S) -> Disconnect + Send + Sync>;
type SelectorFn<S, C> = Box<dyn Fn(u16) -> Option<Handler<S, C>> + Send + Sync>;
type AdmissionFn<S> = Box<dyn Fn(&Request<'_>, &mut S, &Connection) -> Admission + Send + Sync>;

/// Describes one service: its id, the per-connection state type `S`, its
/// callbacks and handlers. Hand it to
/// [`ServerBuilder::service`](crate::ServerBuilder::service).
///
/// # Examples
///
/// A running sum per connection: the connect callback makes the state,
/// command 0 adds to it, an unknown command is answered "invalid", and the
/// disconnect callback sees the final state.
///
/// ```
/// use std::sync::mpsc;
/// use std::time::Duration;
/// use coroipc_client::{Client, Error};
/// use coroipc_server::{Disconnect, Server, ServiceBuilder, Status};
///
/// let (totals, final_totals) = mpsc::channel();
/// let sum = ServiceBuilder::new(1, |_conn| Ok(0u64))
///     .handler_result(0, |call| {
///         let n: [u8; 8] = call.payload().try_into().map_err(|_| Status::Invalid)?;
///         *call.state() += u64::from_le_bytes(n);
///         Ok::<_, Status>(call.state().to_le_bytes())
///     })
///     .on_disconnect(move |_conn, total| {
///         let _ = totals.send(*total);
///         Disconnect::Done
///     });
///
/// let endpoint = format!("@coroipc-doc-service-{}", std::process::id());
/// let (handle, thread) = Server::builder().endpoint(&endpoint).service(sum).build()?.spawn()?;
///
/// let client = Client::connect(&endpoint, 1)?;
/// let mut buf = [0u8; 8];
/// client.call(0, &5u64.to_le_bytes(), &mut buf)?;
/// client.call(0, &7u64.to_le_bytes(), &mut buf)?;
/// assert_eq!(u64::from_le_bytes(buf), 12);
/// assert_eq!(client.call(0, b"short", &mut buf), Err(Error::Invalid));
/// assert_eq!(client.call(9, b"", &mut buf), Err(Error::Invalid)); // no handler
///
/// drop(client); // the server notices the hang-up and runs `on_disconnect`
/// assert_eq!(final_totals.recv_timeout(Duration::from_secs(10))?, 12);
/// handle.shutdown();
/// thread.join().expect("server thread")?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ServiceBuilder<S, C = ()> {
    id: u16,
    connect: ConnectFn<S>,
    disconnect: Option<DisconnectFn<S>>,
    handlers: HashMap<u16, Handler<S, C>>,
    selector: Option<SelectorFn<S, C>>,
    context: C,
    server: OnceLock<ServerHandle>,
    admission: Option<AdmissionFn<S>>,
    max_connections: Option<usize>,
    outbound: OutboundLimits,
}

impl<S: Send + 'static> ServiceBuilder<S> {
    /// A service with id `id` whose per-connection state is made by
    /// `connect` when a client connects (coroipc's `lib_init_fn`). The
    /// callback may dispatch to the new connection; an `Err` closes it.
    pub fn new(id: u16, connect: impl Fn(&Connection) -> Result<S, Refusal> + Send + Sync + 'static) -> Self {
        Self::with_context(id, (), connect)
    }
}

impl<S: Send + 'static, C: Send + Sync + 'static> ServiceBuilder<S, C> {
    /// As [`new`](ServiceBuilder::new), with a context shared by every
    /// handler and callback of the service: handlers reach it through
    /// [`Call::context`] (no `Arc` clone per handler).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use coroipc_server::ServiceBuilder;
    ///
    /// let service = ServiceBuilder::with_context(1, AtomicU64::new(0), |_| Ok(())).handler(0, |call| {
    ///     let n = call.context().fetch_add(1, Ordering::Relaxed) + 1;
    ///     let _ = call.respond(&n.to_le_bytes());
    /// });
    /// # let _ = service;
    /// ```
    pub fn with_context(
        id: u16,
        context: C,
        connect: impl Fn(&Connection) -> Result<S, Refusal> + Send + Sync + 'static,
    ) -> Self {
        Self {
            id,
            connect: Box::new(connect),
            disconnect: None,
            handlers: HashMap::new(),
            selector: None,
            admission: None,
            context,
            server: OnceLock::new(),
            max_connections: None,
            outbound: OutboundLimits::default(),
        }
    }

    /// Called when the connection goes away (client disconnect or death,
    /// server-initiated disconnect, shutdown); may ask to be called again
    /// later (coroipc's `lib_exit_fn` returning -1).
    pub fn on_disconnect(
        mut self,
        f: impl Fn(&Connection, &mut S) -> Disconnect + Send + Sync + 'static,
    ) -> Self {
        self.disconnect = Some(Box::new(f));
        self
    }

    /// Registers the handler of command `command` in the default table.
    pub fn handler(mut self, command: u16, f: impl Fn(Call<'_, S, C>) + Send + Sync + 'static) -> Self {
        self.handlers.insert(command, Arc::new(f));
        self
    }

    /// Registers a handler whose result is the answer, so it can use `?`:
    /// `Ok(bytes)` is sent as the response, `Err(e)` answers the error
    /// status `e.into()` with no payload (make your error type
    /// `Into<Status>`, e.g. a service code `Status::Service(1000 + n)`).
    /// A handler that answered itself (e.g. with
    /// [`Call::respond_vectored`]) cannot be written this way; use
    /// [`handler`](Self::handler).
    ///
    /// # Examples
    ///
    /// ```
    /// use coroipc_server::{ServiceBuilder, Status};
    ///
    /// let service = ServiceBuilder::new(1, |_| Ok(())).handler_result(0, |call| {
    ///     let bytes: [u8; 8] = call.payload().try_into().map_err(|_| Status::Invalid)?;
    ///     let n = u64::from_le_bytes(bytes).checked_mul(2).ok_or(Status::Service(1001))?;
    ///     Ok::<_, Status>(n.to_le_bytes())
    /// });
    /// # let _ = service;
    /// ```
    pub fn handler_result<R, E>(
        self,
        command: u16,
        f: impl Fn(&mut Call<'_, S, C>) -> Result<R, E> + Send + Sync + 'static,
    ) -> Self
    where
        R: AsRef<[u8]>,
        E: Into<Status>,
    {
        self.handler(command, move |mut call| match f(&mut call) {
            Ok(bytes) => {
                let _ = call.respond(bytes.as_ref());
            }
            Err(e) => {
                let _ = call.respond_status(e.into());
            }
        })
    }

    /// Registers the handler of the typed command `K` (cargo feature
    /// `typed`): the request is decoded into `K::Request` before `f` runs
    /// (bytes that do not decode are answered [`Status::Invalid`] and `f`
    /// never sees them), `Ok(response)` is encoded and sent, `Err(e)`
    /// answers the status `e.into()` with no payload. The client calls it
    /// with `Client::call_typed::<K>`; raw handlers and typed ones can share
    /// a service.
    ///
    /// # Examples
    ///
    /// ```
    /// use coroipc_server::typed::Command;
    /// use coroipc_server::{ServiceBuilder, Status};
    ///
    /// /// Adds to the connection's counter; answers the new value.
    /// struct Add;
    /// impl Command for Add {
    ///     const ID: u16 = 1;
    ///     type Request = u64;
    ///     type Response = u64;
    /// }
    ///
    /// let service = ServiceBuilder::new(2, |_| Ok(0u64)).typed::<Add, Status>(|call, n| {
    ///     let total = call.state().checked_add(n).ok_or(Status::Service(1001))?;
    ///     *call.state() = total;
    ///     Ok(total)
    /// });
    /// # let _ = service;
    /// ```
    #[cfg(feature = "typed")]
    pub fn typed<K, E>(
        self,
        f: impl Fn(&mut Call<'_, S, C>, K::Request) -> Result<K::Response, E> + Send + Sync + 'static,
    ) -> Self
    where
        K: coroipc_transport::typed::Command + 'static,
        E: Into<Status>,
    {
        use coroipc_transport::typed::{decode, encode};
        self.handler(K::ID, move |mut call| {
            let request = match decode::<K::Request>(call.payload()) {
                Ok(request) => request,
                Err(e) => {
                    log::debug!("connection {}: command {}: {e}", call.connection().id(), K::ID);
                    let _ = call.respond_status(Status::Invalid);
                    return;
                }
            };
            match f(&mut call, request).map(|response| encode(&response)) {
                Ok(Ok(bytes)) => {
                    let _ = call.respond(&bytes);
                }
                Ok(Err(e)) => {
                    log::warn!(
                        "connection {}: command {}: the response does not encode: {e}",
                        call.connection().id(),
                        K::ID
                    );
                    let _ = call.respond_status(Status::Invalid);
                }
                Err(e) => {
                    let _ = call.respond_status(e.into());
                }
            }
        })
    }

    /// Replaces the table lookup with a user-defined selector (coroipc's
    /// handler selector): returns the handler for a command id, or `None`
    /// ("invalid" is answered).
    pub fn selector(mut self, f: impl Fn(u16) -> Option<Handler<S, C>> + Send + Sync + 'static) -> Self {
        self.selector = Some(Box::new(f));
        self
    }

    /// Sets a per-request veto run before the handler (coroipc's
    /// `sending_allowed`).
    pub fn admission(
        mut self,
        f: impl Fn(&Request<'_>, &mut S, &Connection) -> Admission + Send + Sync + 'static,
    ) -> Self {
        self.admission = Some(Box::new(f));
        self
    }

    /// Sets the bound and overflow policy of each connection's outbound
    /// dispatch queue (see [`Connection::dispatch`]); the default is
    /// [`OutboundLimits::default`] (1 MiB, then the client is disconnected
    /// as too slow).
    pub fn outbound(mut self, limits: OutboundLimits) -> Self {
        self.outbound = limits;
        self
    }

    /// Limits the number of simultaneous connections to this service.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = Some(n);
        self
    }

    pub(crate) fn build(self) -> Arc<dyn ServiceDyn> {
        Arc::new(self)
    }
}

/// Per-connection state, type-erased.
pub(crate) type State = Box<dyn Any + Send>;

/// The type-erased face of a service, used by the event loop.
pub(crate) trait ServiceDyn: Send + Sync {
    fn id(&self) -> u16;
    fn max_connections(&self) -> Option<usize>;
    fn outbound(&self) -> OutboundLimits;
    /// Gives the service its server's handle (once, when the server is built).
    fn attach(&self, server: ServerHandle);
    fn connect(&self, conn: &Connection) -> Result<State, Refusal>;
    /// Admission, selection and the handler; answers itself on refusal.
    fn handle(&self, state: &mut State, conn: &Connection, request: Request<'_>) -> Outcome;
    fn disconnect(&self, state: &mut State, conn: &Connection) -> Disconnect;
}

/// What became of one request (for statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Handled,
    Vetoed,
    Unknown,
}

impl<S: Send + 'static, C: Send + Sync + 'static> ServiceDyn for ServiceBuilder<S, C> {
    fn id(&self) -> u16 {
        self.id
    }

    fn max_connections(&self) -> Option<usize> {
        self.max_connections
    }

    fn outbound(&self) -> OutboundLimits {
        self.outbound
    }

    fn attach(&self, server: ServerHandle) {
        let _ = self.server.set(server);
    }

    fn connect(&self, conn: &Connection) -> Result<State, Refusal> {
        match catch_unwind(AssertUnwindSafe(|| (self.connect)(conn))) {
            Ok(r) => r.map(|s| Box::new(s) as State),
            Err(p) => {
                log_panic("connect callback", conn, &p);
                Err(Refusal::Invalid)
            }
        }
    }

    fn handle(&self, state: &mut State, conn: &Connection, request: Request<'_>) -> Outcome {
        // The state was made by this service's `connect`, so the downcast
        // holds; answer "invalid" rather than panic if it ever did not.
        let Some(state) = state.downcast_mut::<S>() else {
            let _ = conn.respond(request.seq, Status::Invalid, &[]);
            return Outcome::Unknown;
        };
        // User code below may panic: each panic costs that request only
        // (answered "invalid"), never the event loop.
        if let Some(admission) = &self.admission {
            let verdict =
                catch_unwind(AssertUnwindSafe(|| admission(&request, state, conn))).unwrap_or_else(|p| {
                    log_panic("admission callback", conn, &p);
                    Admission::Invalid
                });
            let status = match verdict {
                Admission::Allow => None,
                Admission::TryAgain => Some(Status::TryAgain),
                Admission::Invalid => Some(Status::Invalid),
            };
            if let Some(status) = status {
                if !request.oneway {
                    let _ = conn.respond(request.seq, status, &[]);
                }
                return Outcome::Vetoed;
            }
        }
        let handler = match &self.selector {
            Some(select) => catch_unwind(AssertUnwindSafe(|| select(request.command))).unwrap_or_else(|p| {
                log_panic("handler selector", conn, &p);
                None
            }),
            None => self.handlers.get(&request.command).cloned(),
        };
        let Some(handler) = handler else {
            if !request.oneway {
                let _ = conn.respond(request.seq, Status::Invalid, &[]);
            }
            return Outcome::Unknown;
        };
        let Some(server) = self.server.get() else {
            // Not attached: cannot happen for a built server; answer, never panic.
            if !request.oneway {
                let _ = conn.respond(request.seq, Status::Invalid, &[]);
            }
            return Outcome::Unknown;
        };
        // A panicking handler drops its `Call` (or the `Responder` it
        // deferred to) while unwinding, and dropping answers "invalid".
        let call = Call { request, state, connection: conn, context: &self.context, server, answered: false };
        match catch_unwind(AssertUnwindSafe(|| handler(call))) {
            Ok(()) => Outcome::Handled,
            Err(p) => {
                log_panic("request handler", conn, &p);
                Outcome::Unknown
            }
        }
    }

    fn disconnect(&self, state: &mut State, conn: &Connection) -> Disconnect {
        match (&self.disconnect, state.downcast_mut::<S>()) {
            (Some(f), Some(state)) => catch_unwind(AssertUnwindSafe(|| f(conn, state))).unwrap_or_else(|p| {
                log_panic("disconnect callback", conn, &p);
                Disconnect::Done
            }),
            _ => Disconnect::Done,
        }
    }
}

/// The text of a panic payload (`panic!` with a literal or a format).
pub(crate) fn panic_text(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-text panic payload)")
}

fn log_panic(what: &str, conn: &Connection, payload: &(dyn Any + Send)) {
    log::error!("connection {}: the {what} panicked: {}", conn.id(), panic_text(payload));
}
