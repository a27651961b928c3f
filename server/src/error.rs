//! Error types of the server API.

use std::fmt;
use std::io;

use coroipc_transport::channel::ChannelError;

/// Why a dispatch message was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DispatchError {
    /// Flow control is on or the client's dispatch ring is full; nothing was
    /// sent — send it again later.
    TryAgain,
    /// The deadline passed.
    Timeout,
    /// The message exceeds the connection's maximum.
    TooBig,
    /// The connection is closed (or the client corrupted it).
    Disconnected,
    /// The client did not keep up: its outbound queue went over its bound
    /// under [`OverflowPolicy::Disconnect`](crate::OverflowPolicy::Disconnect),
    /// so the connection is being closed (the client learns why). This
    /// message was not sent.
    ClientTooSlow,
}

/// Why a response was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RespondError {
    /// The response exceeds the connection's maximum.
    TooBig,
    /// The client did not make room for the response in time.
    Timeout,
    /// The connection is closed.
    Disconnected,
    /// The status cannot be sent: a `Status::Service` code below
    /// `Status::SERVICE_BASE` or a `Status::Unknown` code (it would reach
    /// the client as another status). Nothing was sent; the request is
    /// answered `Status::Invalid` when its `Call` or `Responder` is dropped.
    InvalidStatus,
}

impl From<ChannelError> for DispatchError {
    fn from(e: ChannelError) -> Self {
        match e {
            ChannelError::TryAgain => Self::TryAgain,
            ChannelError::Timeout => Self::Timeout,
            ChannelError::TooBig { .. } => Self::TooBig,
            _ => Self::Disconnected,
        }
    }
}

impl From<ChannelError> for RespondError {
    fn from(e: ChannelError) -> Self {
        match e {
            ChannelError::Timeout | ChannelError::TryAgain => Self::Timeout,
            ChannelError::TooBig { .. } => Self::TooBig,
            _ => Self::Disconnected,
        }
    }
}

impl fmt::Display for DispatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TryAgain => "try again: flow control on",
            Self::Timeout => "dispatch timed out",
            Self::TooBig => "dispatch message too big",
            Self::Disconnected => "connection closed",
            Self::ClientTooSlow => "client too slow: disconnected",
        })
    }
}

impl fmt::Display for RespondError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TooBig => "response too big",
            Self::Timeout => "client did not read its responses in time",
            Self::Disconnected => "connection closed",
            Self::InvalidStatus => "status code reserved or unknown",
        })
    }
}

impl std::error::Error for DispatchError {}
impl std::error::Error for RespondError {}

/// Why a server could not be built.
#[derive(Debug)]
pub enum ServerBuildError {
    /// No endpoint was given.
    NoEndpoint,
    /// The endpoint string is not valid.
    BadEndpoint(String),
    /// Two services were registered with the same id.
    DuplicateService(u16),
    /// A limit is inconsistent (e.g. a maximum message the rings cannot carry).
    BadLimits(&'static str),
    /// Binding the socket or creating the waker failed.
    Io(io::Error),
}

impl fmt::Display for ServerBuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoEndpoint => f.write_str("no endpoint given"),
            Self::BadEndpoint(e) => write!(f, "bad endpoint: {e}"),
            Self::DuplicateService(id) => write!(f, "service {id} registered twice"),
            Self::BadLimits(why) => write!(f, "bad limits: {why}"),
            Self::Io(e) => write!(f, "cannot start server: {e}"),
        }
    }
}

impl std::error::Error for ServerBuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ServerBuildError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}
