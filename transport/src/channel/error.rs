//! The errors of a connection and their mappings from the ring's.

use std::fmt;
use std::io;

use coroipc_ring::{Corruption, PopError, PushError, RingAttachError};

use crate::control::DisconnectReason;
use crate::handshake::{HandshakeDecodeError, Refusal};
use crate::segment::SegmentOpenError;
use crate::waiter::WaitError;

/// Errors of the data path of an established connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelError {
    /// Not possible now (ring full, flow control on, nothing to read);
    /// try again later.
    TryAgain,
    /// The deadline passed.
    Timeout,
    /// The message exceeds the negotiated maximum.
    TooBig {
        /// Length of the message.
        len: usize,
        /// Largest message allowed.
        max: usize,
    },
    /// The caller's buffer is too small; the message is kept.
    BufferTooSmall {
        /// Length of the message.
        needed: usize,
    },
    /// The peer closed the connection or died.
    PeerGone,
    /// (Client side) the server closed the connection or died, and this is
    /// why (see [`DisconnectReason`]).
    Disconnected(DisconnectReason),
    /// The peer corrupted shared memory; the connection must be dropped.
    Corrupt(Corruption),
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TryAgain => f.write_str("try again"),
            Self::Timeout => f.write_str("timed out"),
            Self::TooBig { len, max } => write!(f, "message of {len} bytes exceeds maximum {max}"),
            Self::BufferTooSmall { needed } => write!(f, "buffer too small: message has {needed} bytes"),
            Self::PeerGone => f.write_str("connection lost"),
            Self::Disconnected(reason) => write!(f, "{reason}"),
            Self::Corrupt(c) => write!(f, "shared memory corrupt: {c}"),
        }
    }
}

impl std::error::Error for ChannelError {}

impl From<WaitError> for ChannelError {
    fn from(e: WaitError) -> Self {
        match e {
            WaitError::Timeout => Self::Timeout,
            WaitError::PeerGone => Self::PeerGone,
        }
    }
}

pub(super) fn push_error(e: PushError, max: usize) -> ChannelError {
    match e {
        PushError::Full => ChannelError::TryAgain,
        PushError::TooBig { len, .. } => ChannelError::TooBig { len: len as usize, max },
        PushError::Corrupt(c) => ChannelError::Corrupt(c),
    }
}

pub(super) fn pop_error(e: PopError) -> ChannelError {
    match e {
        PopError::Empty => ChannelError::TryAgain,
        PopError::BufferTooSmall { needed } => ChannelError::BufferTooSmall { needed },
        PopError::Corrupt(c) => ChannelError::Corrupt(c),
    }
}

/// Why a server-side handshake failed (the connection is then dropped).
#[derive(Debug)]
pub enum HandshakeError {
    /// The client closed the socket before sending a complete hello.
    Closed,
    /// The hello did not decode.
    Decode(HandshakeDecodeError),
    /// A syscall failed.
    Io(io::Error),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => f.write_str("client closed during handshake"),
            Self::Decode(e) => write!(f, "bad hello: {e}"),
            Self::Io(e) => write!(f, "handshake i/o: {e}"),
        }
    }
}

impl std::error::Error for HandshakeError {}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Why a client could not connect.
#[derive(Debug)]
pub enum ConnectError {
    /// Connecting or talking to the socket failed (no server, permission,
    /// server vanished mid-handshake).
    Io(io::Error),
    /// The server refused.
    Refused(Refusal),
    /// The server's reply did not decode.
    Handshake(HandshakeDecodeError),
    /// The server sent a wrong descriptor set.
    Descriptors(&'static str),
    /// The segment failed validation.
    Segment(SegmentOpenError),
    /// A ring header failed validation.
    Ring(RingAttachError),
    /// The control block failed validation.
    Control,
    /// The handshake did not finish in time.
    Timeout,
    /// The process listening on the endpoint is not the user the client
    /// requires ([`ConnectOptions::require_server_uid`](super::ConnectOptions::require_server_uid)): perhaps a
    /// squatter that bound the name first. Nothing was sent to it.
    WrongServer {
        /// The uid required.
        expected: u32,
        /// The listener's uid, from the kernel (`SO_PEERCRED`).
        actual: u32,
    },
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "connect: {e}"),
            Self::Refused(r) => write!(f, "refused: {r}"),
            Self::Handshake(e) => write!(f, "bad handshake reply: {e}"),
            Self::Descriptors(what) => write!(f, "bad descriptors in reply: {what}"),
            Self::Segment(e) => write!(f, "bad segment: {e}"),
            Self::Ring(e) => write!(f, "bad ring: {e}"),
            Self::Control => f.write_str("bad control block"),
            Self::Timeout => f.write_str("handshake timed out"),
            Self::WrongServer { expected, actual } => {
                write!(f, "server runs as uid {actual}, not the required uid {expected}")
            }
        }
    }
}

impl std::error::Error for ConnectError {}

impl From<io::Error> for ConnectError {
    fn from(e: io::Error) -> Self {
        if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            Self::Timeout
        } else {
            Self::Io(e)
        }
    }
}
