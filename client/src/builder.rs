//! Configuring and opening a connection: [`ClientBuilder`], and
//! [`PendingClient`] for event loops that connect without blocking.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use coroipc_transport::channel::{ClientChannel, ConnectOptions, PendingConnect};
use coroipc_transport::handshake::ClientHello;
use coroipc_transport::socket::Endpoint;
use coroipc_transport::waiter::WaitPolicy;

use crate::client::{Client, Parts, Sizes};
use crate::core::Core;
use crate::error::{Error, Result};

/// Configures and opens a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    pub(crate) endpoint: String,
    pub(crate) service: u16,
    pub(crate) sizes: Sizes,
    pub(crate) timeout: Duration,
    pub(crate) policy: WaitPolicy,
    pub(crate) max_in_flight: usize,
    pub(crate) server_uid: Option<u32>,
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
            stashed: false,
            async_waiters: 0,
        };
        Ok(Parts { core, dispatch, status, dispatch_fd, socket_fd })
    }

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
