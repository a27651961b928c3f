//! The header every request, response and dispatch message starts with.
//!
//! ```text
//! | id: u32 (LE) | flags: u32 (LE) | seq: u64 (LE) | payload … |
//! ```
//!
//! * request: `id` = command id, `seq` = the client's request number;
//! * response: `id` = status (0 = success, else an error code), `seq` = the
//!   request's number, which is how responses are matched to requests;
//! * dispatch: `id` = the service's message id, `seq` = the connection's
//!   dispatch counter.
//!
//! Message sizes (limits, workloads) count this header.

/// Bytes of the header.
pub const HEADER_LEN: usize = 16;

/// Flag: the request wants no response (fire-and-forget).
pub const FLAG_ONEWAY: u32 = 1;

/// Flags defined in this version; a message with others set is invalid.
pub const KNOWN_FLAGS: u32 = FLAG_ONEWAY;

/// A decoded message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MessageHeader {
    /// Command id, status or dispatch id (see the module docs).
    pub id: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Sequence number.
    pub seq: u64,
}

impl MessageHeader {
    /// The header's wire bytes.
    #[inline]
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    /// Decodes the header at the start of `message`; `None` if the message
    /// is shorter than a header.
    #[inline]
    pub fn decode(message: &[u8]) -> Option<Self> {
        let b: &[u8; HEADER_LEN] = message.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Self {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            flags: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            seq: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_codes_round_trip_and_reserved_codes_are_not_sendable() {
        for code in [Status::SERVICE_BASE, 4242, u32::MAX] {
            let s = Status::service(code).expect("a service code");
            assert!(s.is_sendable());
            assert_eq!(Status::from_code(s.code()), s, "code {code} round-trips");
        }
        for code in [0, 1, 5, 6, Status::SERVICE_BASE - 1] {
            assert_eq!(Status::service(code), None);
            assert!(!Status::Service(code).is_sendable(), "Service({code}) is not sendable");
        }
        assert!(!Status::Unknown(7).is_sendable());
        assert!(Status::Ok.is_sendable() && Status::ShuttingDown.is_sendable());
    }

    #[test]
    fn header_round_trips_and_short_input_is_refused() {
        let h = MessageHeader { id: 7, flags: FLAG_ONEWAY, seq: u64::MAX - 3 };
        let mut msg = h.encode().to_vec();
        msg.extend_from_slice(b"payload");
        assert_eq!(MessageHeader::decode(&msg), Some(h));
        assert_eq!(MessageHeader::decode(&msg[..15]), None);
    }
}

/// The status a response carries in its `id` field: success or the reason
/// the request failed (coroipc's `cs_error_t` meanings). Codes at or above
/// [`Status::SERVICE_BASE`] are the service's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// The request succeeded.
    Ok,
    /// The service cannot take the request now; try again.
    TryAgain,
    /// The request is not valid (unknown command, refused by the service).
    Invalid,
    /// The request or response exceeds the negotiated maximum.
    TooBig,
    /// The service refused the caller.
    AccessDenied,
    /// The service or server is shutting down.
    ShuttingDown,
    /// A service-defined error code (`>= SERVICE_BASE`; build it with the
    /// checked [`Status::service`]). A server refuses to send a smaller
    /// one ([`Status::is_sendable`]).
    Service(u32),
    /// A code this version does not know.
    Unknown(u32),
}

impl Status {
    /// First code available to services.
    pub const SERVICE_BASE: u32 = 1000;

    /// The wire code.
    pub fn code(self) -> u32 {
        match self {
            Self::Ok => 0,
            Self::TryAgain => 1,
            Self::Invalid => 2,
            Self::TooBig => 3,
            Self::AccessDenied => 4,
            Self::ShuttingDown => 5,
            Self::Service(c) | Self::Unknown(c) => c,
        }
    }

    /// The service-defined status `code`, if it is one: `None` for codes
    /// below [`SERVICE_BASE`](Self::SERVICE_BASE), which are reserved for
    /// the meanings above (a `Service(0)` would arrive as success, a
    /// `Service(1)` as "try again").
    ///
    /// # Examples
    ///
    /// ```
    /// use coroipc_transport::message::Status;
    /// assert_eq!(Status::service(1042), Some(Status::Service(1042)));
    /// assert_eq!(Status::service(5), None);
    /// ```
    pub const fn service(code: u32) -> Option<Self> {
        if code >= Self::SERVICE_BASE {
            Some(Self::Service(code))
        } else {
            None
        }
    }

    /// Whether this status may be sent: every named status, and
    /// `Service(code)` with `code >= SERVICE_BASE`. A `Service` code below
    /// the base or an `Unknown` code would reach the client as something
    /// else, so servers refuse to send them.
    pub const fn is_sendable(self) -> bool {
        match self {
            Self::Service(c) => c >= Self::SERVICE_BASE,
            Self::Unknown(_) => false,
            _ => true,
        }
    }

    /// Decodes a wire code (total).
    pub fn from_code(code: u32) -> Self {
        match code {
            0 => Self::Ok,
            1 => Self::TryAgain,
            2 => Self::Invalid,
            3 => Self::TooBig,
            4 => Self::AccessDenied,
            5 => Self::ShuttingDown,
            c if c >= Self::SERVICE_BASE => Self::Service(c),
            c => Self::Unknown(c),
        }
    }
}
