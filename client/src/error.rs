//! The client's one error type, with coroipc's `cs_error_t` meanings.

use std::fmt;
use std::io;
use std::sync::Arc;

use coroipc_transport::channel::{ChannelError, ConnectError};
use coroipc_transport::control::DisconnectReason;
use coroipc_transport::handshake::Refusal;
use coroipc_transport::message::Status;

/// Everything a client call can fail with. `Clone + PartialEq` (two `Io`
/// errors are equal when their kind and OS error code are).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Error {
    /// Not possible now (request flow control on, ring full, server busy,
    /// nothing to receive); try again (`CS_ERR_TRY_AGAIN`).
    TryAgain,
    /// The server refused the credentials (`CS_ERR_ACCESS`).
    AccessDenied,
    /// The server offers no such service (`CS_ERR_NOT_EXIST`).
    NoSuchService,
    /// The request was invalid: unknown command, refused by the service
    /// (`CS_ERR_INVALID_PARAM`).
    Invalid,
    /// The message exceeds the negotiated maximum, or asked-for sizes exceed
    /// the server's limits (`CS_ERR_TOO_BIG`).
    TooBig,
    /// The call did not complete in time (`CS_ERR_TIMEOUT`).
    Timeout,
    /// The process listening on the endpoint does not run as the uid
    /// required with [`ClientBuilder::require_server_uid`](crate::ClientBuilder::require_server_uid)
    /// (perhaps another user bound the name first); nothing was sent to it.
    WrongServer {
        /// The uid required.
        expected: u32,
        /// The listener's uid, from the kernel.
        actual: u32,
    },
    /// The connection is gone, and why (`CS_ERR_LIBRARY`): the server or
    /// the service shut down, the server disconnected this client (too
    /// slow, protocol violation, corrupt memory, or at the service's
    /// wish), or the server died. Every later call fails the same way.
    Disconnected(DisconnectReason),
    /// The server is at its connection limit (`CS_ERR_NO_RESOURCES`).
    ConnectionLimit,
    /// Client and server speak different protocol versions.
    VersionMismatch,
    /// The server's memory budget (server-wide or for this uid) has no room
    /// for the asked-for rings (`CS_ERR_NO_MEMORY`): ask for smaller rings,
    /// or try again once other connections closed.
    NoMemory,
    /// The caller's buffer is smaller than the message; the message is
    /// kept. A dispatch message: the next receive returns it again. A
    /// pipelined response: `wait` for its ticket again. A call's response:
    /// [`Client::take_kept_response`](crate::Client::take_kept_response)
    /// with a buffer of at least `needed` bytes. (Responses of unknown size
    /// are simplest read in place with
    /// [`Client::call_in_place`](crate::Client::call_in_place).)
    BufferTooSmall {
        /// The message length.
        needed: usize,
    },
    /// The calling thread holds a zero-copy guard ([`ResponseGuard`](crate::ResponseGuard)
    /// or [`DispatchGuard`](crate::DispatchGuard)) of this client that the
    /// call would have to wait for: waiting would deadlock, so the call
    /// fails at once. Drop the guard first.
    GuardHeld,
    /// A service-defined error code.
    Service(u32),
    /// The server broke the protocol (bad handshake, bad shared memory).
    Protocol(String),
    /// Reaching the server failed (no such socket, permission, …); the
    /// message names the endpoint and the service.
    Io(Arc<io::Error>),
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Self::Io(Arc::new(e))
    }
}

impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        use Error::*;
        match (self, other) {
            (Io(a), Io(b)) => a.kind() == b.kind() && a.raw_os_error() == b.raw_os_error(),
            (WrongServer { expected: a, actual: b }, WrongServer { expected: c, actual: d }) => {
                a == c && b == d
            }
            (Disconnected(a), Disconnected(b)) => a == b,
            (BufferTooSmall { needed: a }, BufferTooSmall { needed: b }) => a == b,
            (Service(a), Service(b)) => a == b,
            (Protocol(a), Protocol(b)) => a == b,
            (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b) && a.is_unit(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TryAgain => f.write_str("try again"),
            Self::AccessDenied => f.write_str("access denied"),
            Self::NoSuchService => f.write_str("no such service"),
            Self::Invalid => f.write_str("invalid request"),
            Self::TooBig => f.write_str("message too big"),
            Self::Timeout => f.write_str("timed out"),
            Self::WrongServer { expected, actual } => {
                write!(f, "server runs as uid {actual}, not the required uid {expected}")
            }
            Self::Disconnected(reason) => write!(f, "connection lost: {reason}"),
            Self::ConnectionLimit => f.write_str("server at its connection limit"),
            Self::VersionMismatch => f.write_str("protocol version mismatch"),
            Self::NoMemory => f.write_str("server memory budget exhausted"),
            Self::BufferTooSmall { needed } => write!(f, "buffer too small: message has {needed} bytes"),
            Self::GuardHeld => {
                f.write_str("this thread holds a zero-copy guard of the client the call needs")
            }
            Self::Service(code) => write!(f, "service error {code}"),
            Self::Protocol(what) => write!(f, "protocol error: {what}"),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(&**e),
            _ => None,
        }
    }
}

impl From<ChannelError> for Error {
    fn from(e: ChannelError) -> Self {
        match e {
            ChannelError::TryAgain => Self::TryAgain,
            ChannelError::Timeout => Self::Timeout,
            ChannelError::TooBig { .. } => Self::TooBig,
            ChannelError::BufferTooSmall { needed } => Self::BufferTooSmall { needed },
            ChannelError::PeerGone => Self::Disconnected(DisconnectReason::Unknown),
            ChannelError::Disconnected(reason) => Self::Disconnected(reason),
            ChannelError::Corrupt(c) => Self::Protocol(format!("shared memory corrupt: {c}")),
        }
    }
}

impl From<ConnectError> for Error {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Refused(r) => match r {
                Refusal::AccessDenied => Self::AccessDenied,
                Refusal::NoSuchService => Self::NoSuchService,
                Refusal::TooBig => Self::TooBig,
                Refusal::ConnectionLimit => Self::ConnectionLimit,
                Refusal::VersionMismatch => Self::VersionMismatch,
                Refusal::Invalid => Self::Invalid,
                Refusal::NoMemory => Self::NoMemory,
            },
            ConnectError::Io(e) => Self::from(e),
            ConnectError::Timeout => Self::Timeout,
            ConnectError::WrongServer { expected, actual } => Self::WrongServer { expected, actual },
            other => Self::Protocol(other.to_string()),
        }
    }
}

impl Error {
    /// Whether the variant carries no data (equality is the variant's).
    fn is_unit(&self) -> bool {
        !matches!(
            self,
            Self::Io(_)
                | Self::WrongServer { .. }
                | Self::Disconnected(_)
                | Self::BufferTooSmall { .. }
                | Self::Service(_)
                | Self::Protocol(_)
        )
    }

    /// This error with the endpoint and the service named in its message
    /// (for the errors that carry one: `Io`, `Protocol`).
    pub(crate) fn naming(self, endpoint: &str, service: u16) -> Self {
        match self {
            Self::Io(e) => {
                Self::from(io::Error::new(e.kind(), format!("{endpoint} (service {service}): {e}")))
            }
            Self::Protocol(what) => Self::Protocol(format!("{endpoint} (service {service}): {what}")),
            other => other,
        }
    }

    /// Why the connection is gone, if this error says it is.
    pub fn disconnect_reason(&self) -> Option<DisconnectReason> {
        match self {
            Self::Disconnected(reason) => Some(*reason),
            _ => None,
        }
    }

    /// The error a response status stands for (`None` for success).
    pub fn from_status(status: Status) -> Option<Self> {
        Some(match status {
            Status::Ok => return None,
            Status::TryAgain => Self::TryAgain,
            Status::Invalid => Self::Invalid,
            Status::TooBig => Self::TooBig,
            Status::AccessDenied => Self::AccessDenied,
            Status::ShuttingDown => Self::Disconnected(DisconnectReason::ServiceShutdown),
            Status::Service(c) => Self::Service(c),
            Status::Unknown(c) => Self::Protocol(format!("unknown status {c}")),
        })
    }
}

/// The client's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
