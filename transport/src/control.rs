//! The control block at the start of every connection's segment: the
//! connection's lifecycle words and the request-side flow-control switch.
//!
//! ```text
//! offset  field           written by  read by
//!      0  magic, version  server      client (once, at connect)
//!    128  server_state    server      client
//!    132  request_paused  server      client
//!    136  dispatch_queued server      client
//!    140  reason          server      client
//!    256  client_state    client      server
//! ```
//!
//! Connection lifecycle (each side writes only its own state word):
//!
//! | state    | meaning                                            |
//! |----------|----------------------------------------------------|
//! | `OPEN`   | the side serves the connection                      |
//! | `CLOSED` | the side shut the connection down cleanly; it then  |
//! |          | notifies every wait point so sleepers see it at once|
//! | `SHUTTING_DOWN` | (server only) as `CLOSED`, because the service |
//! |          | or the server shuts down                           |
//!
//! Any other value (a hostile or broken peer) reads as `CLOSED`. A peer that
//! dies without writing `CLOSED` is noticed through its socket instead (see
//! `waiter.rs`).
//!
//! `dispatch_queued` is non-zero while the server holds dispatch messages
//! for the client in its outbound queue (coroipc's flow-control flag: the
//! client is told to catch up). `reason` is the [`DisconnectReason`] the
//! server gives before it closes its side; it is written once (the first
//! reason wins) and only read by the client once the server's state word
//! says closed. A value the client does not know reads as
//! [`DisconnectReason::Unknown`], never a panic.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::segment::Segment;

/// Bytes the control block occupies.
pub const CONTROL_LEN: u64 = 384;
/// `b"CIPCCTRL"` as a little-endian `u64`.
pub const CONTROL_MAGIC: u64 = u64::from_le_bytes(*b"CIPCCTRL");
/// Layout version of the control block.
pub const CONTROL_VERSION: u32 = 1;

const MAGIC: usize = 0;
const VERSION: usize = 8;
const SERVER_STATE: usize = 128;
const REQUEST_PAUSED: usize = 132;
const DISPATCH_QUEUED: usize = 136;
const REASON: usize = 140;
const CLIENT_STATE: usize = 256;

/// A side's state word value: serving.
pub const OPEN: u32 = 0;
/// A side's state word value: shut down cleanly.
pub const CLOSED: u32 = 1;
/// The server's state word value: closed because the service or the whole
/// server is shutting down (clients report "shutting down", not "lost").
pub const SHUTTING_DOWN: u32 = 2;

/// Why the server closed a connection, as the server wrote it into the
/// control block (the `reason` word) before closing its side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The whole server is shutting down.
    ServerShutdown,
    /// The client's service is shutting down.
    ServiceShutdown,
    /// The service closed the connection (no more specific reason given).
    ByServer,
    /// The client did not read its dispatch messages fast enough: the
    /// server's outbound queue for it went over its bound.
    TooSlow,
    /// The client broke the protocol (a malformed request).
    ProtocolViolation,
    /// The client corrupted the shared memory.
    CorruptMemory,
    /// The server went away without saying why (it died or was killed).
    ServerDied,
    /// The server closed the connection without a reason, or gave one this
    /// client does not know (a newer server).
    Unknown,
}

impl DisconnectReason {
    /// The value written into the control block's `reason` word
    /// (0 means "none given").
    pub const fn code(self) -> u32 {
        match self {
            Self::ServerShutdown => 1,
            Self::ServiceShutdown => 2,
            Self::ByServer => 3,
            Self::TooSlow => 4,
            Self::ProtocolViolation => 5,
            Self::CorruptMemory => 6,
            Self::ServerDied => 7,
            Self::Unknown => 0xffff_ffff,
        }
    }

    /// The reason a `reason` word stands for; `None` for 0 (none given).
    /// Any value not listed reads as [`Unknown`](Self::Unknown).
    pub const fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => return None,
            1 => Self::ServerShutdown,
            2 => Self::ServiceShutdown,
            3 => Self::ByServer,
            4 => Self::TooSlow,
            5 => Self::ProtocolViolation,
            6 => Self::CorruptMemory,
            7 => Self::ServerDied,
            _ => Self::Unknown,
        })
    }

    /// Whether the reason is a shutdown of the service or the server.
    pub const fn is_shutdown(self) -> bool {
        matches!(self, Self::ServerShutdown | Self::ServiceShutdown)
    }
}

impl std::fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ServerShutdown => "server shut down",
            Self::ServiceShutdown => "service shut down",
            Self::ByServer => "disconnected by the server",
            Self::TooSlow => "disconnected by the server: client too slow",
            Self::ProtocolViolation => "disconnected by the server: protocol violation",
            Self::CorruptMemory => "disconnected by the server: shared memory corrupt",
            Self::ServerDied => "server died",
            Self::Unknown => "disconnected for an unknown reason",
        })
    }
}

/// Which end of the connection this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The server end.
    Server,
    /// The client end.
    Client,
}

/// Typed access to a segment's control block at a validated offset.
#[derive(Clone, Copy, Debug)]
pub struct Control<'a> {
    segment: &'a Segment,
    base: usize,
}

impl<'a> Control<'a> {
    /// The control block at `base` in `segment`. `base` comes from a
    /// validated layout (128-aligned, at least [`CONTROL_LEN`] bytes inside
    /// the segment); the accessors panic otherwise, never read out of bounds.
    pub fn new(segment: &'a Segment, base: u64) -> Self {
        Self { segment, base: base as usize }
    }

    /// Writes a fresh control block (server, before sharing the segment).
    pub fn init(&self) {
        self.word64(MAGIC).store(CONTROL_MAGIC, Ordering::Relaxed);
        self.word32(VERSION).store(CONTROL_VERSION, Ordering::Relaxed);
        self.word32(SERVER_STATE).store(OPEN, Ordering::Relaxed);
        self.word32(REQUEST_PAUSED).store(0, Ordering::Relaxed);
        self.word32(DISPATCH_QUEUED).store(0, Ordering::Relaxed);
        self.word32(REASON).store(0, Ordering::Relaxed);
        self.word32(CLIENT_STATE).store(OPEN, Ordering::Release);
    }

    /// Whether the magic and version are right (client, at connect).
    pub fn is_valid(&self) -> bool {
        self.word64(MAGIC).load(Ordering::Acquire) == CONTROL_MAGIC
            && self.word32(VERSION).load(Ordering::Relaxed) == CONTROL_VERSION
    }

    fn word32(&self, at: usize) -> &'a AtomicU32 {
        self.segment.atomic_u32(self.base + at)
    }

    fn word64(&self, at: usize) -> &'a AtomicU64 {
        self.segment.atomic_u64(self.base + at)
    }

    fn state_word(&self, side: Side) -> &'a AtomicU32 {
        self.word32(match side {
            Side::Server => SERVER_STATE,
            Side::Client => CLIENT_STATE,
        })
    }

    /// Marks `side` as closed. Release: everything the side did before is
    /// visible to a peer that sees `CLOSED`.
    pub fn close(&self, side: Side) {
        // Keep a more specific reason (`SHUTTING_DOWN`) if one was given.
        let _ = self.state_word(side).compare_exchange(OPEN, CLOSED, Ordering::Release, Ordering::Relaxed);
    }

    /// Marks the server side as shutting down (before closing it).
    pub fn close_shutting_down(&self) {
        self.state_word(Side::Server).store(SHUTTING_DOWN, Ordering::Release);
    }

    /// Whether the server closed because it is shutting down.
    pub fn server_shutting_down(&self) -> bool {
        self.state_word(Side::Server).load(Ordering::Acquire) == SHUTTING_DOWN
    }

    /// Whether `side` is still open (anything but `OPEN` reads as closed).
    pub fn is_open(&self, side: Side) -> bool {
        self.state_word(side).load(Ordering::Acquire) == OPEN
    }

    /// Sets the request-side flow-control switch (server only).
    pub fn set_request_paused(&self, paused: bool) {
        self.word32(REQUEST_PAUSED).store(u32::from(paused), Ordering::Release);
    }

    /// Whether the server paused reading requests.
    pub fn request_paused(&self) -> bool {
        self.word32(REQUEST_PAUSED).load(Ordering::Acquire) != 0
    }

    /// Sets the "dispatch messages queued" flag (server only).
    pub fn set_dispatch_queued(&self, queued: bool) {
        self.word32(DISPATCH_QUEUED).store(u32::from(queued), Ordering::Release);
    }

    /// Whether the server holds dispatch messages for the client in its
    /// outbound queue.
    pub fn dispatch_queued(&self) -> bool {
        self.word32(DISPATCH_QUEUED).load(Ordering::Acquire) != 0
    }

    /// Records why the server closes the connection (server only, before
    /// [`close`](Self::close)). The first reason given wins. Release: pairs
    /// with the Acquire of [`disconnect_reason`](Self::disconnect_reason)
    /// (label: reason-word).
    pub fn set_disconnect_reason(&self, reason: DisconnectReason) {
        let _ = self.word32(REASON).compare_exchange(0, reason.code(), Ordering::Release, Ordering::Relaxed);
    }

    /// The reason the server gave, if any (read the word once; any value
    /// not known reads as [`DisconnectReason::Unknown`]).
    pub fn disconnect_reason(&self) -> Option<DisconnectReason> {
        // Acquire (label: reason-word).
        DisconnectReason::from_code(self.word32(REASON).load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::DisconnectReason;

    #[test]
    fn reason_codes_round_trip_and_unknown_values_read_as_unknown() {
        use DisconnectReason::*;
        for r in
            [ServerShutdown, ServiceShutdown, ByServer, TooSlow, ProtocolViolation, CorruptMemory, ServerDied]
        {
            assert_eq!(DisconnectReason::from_code(r.code()), Some(r), "{r:?} round-trips");
        }
        assert_eq!(DisconnectReason::from_code(0), None, "0: no reason given");
        for hostile in [8, 1000, 0x8000_0000, u32::MAX] {
            assert_eq!(
                DisconnectReason::from_code(hostile),
                Some(Unknown),
                "{hostile}: unknown, never a panic"
            );
        }
    }
}
