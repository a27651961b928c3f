//! The connection handshake: a versioned, fixed-layout binary codec.
//!
//! A client connects to the server's socket and sends a [`ClientHello`]
//! naming the service and the ring sizes it would like. The server answers
//! with a [`ServerReply`]: either [`Accepted`], carrying the negotiated sizes
//! and the layout of the shared segment (whose memfd travels with the reply
//! by `SCM_RIGHTS`), or a [`Refusal`]. The peer's identity is **not** part of
//! the handshake: each side asks the kernel (`SO_PEERCRED`).
//!
//! # Wire format, version 1
//!
//! All integers are little-endian; every message has a fixed length for its
//! version, and the 8-byte header is frozen across versions so any reader can
//! frame a message and recognise a version it does not speak.
//!
//! Header (both messages):
//!
//! | offset | type | field |
//! |---:|---|---|
//! | 0 | u32 | magic, the bytes `"CIPC"` ([`MAGIC`]) |
//! | 4 | u16 | protocol version ([`PROTOCOL_VERSION`]) |
//! | 6 | u16 | total message length in bytes, header included |
//!
//! Client hello ([`HELLO_LEN`] = 32 bytes):
//!
//! | offset | type | field |
//! |---:|---|---|
//! | 8 | u16 | service id |
//! | 10 | u16 | reserved, 0 |
//! | 12 | u32 | flags; no bit is defined in version 1, all must be 0 |
//! | 16 | u32 | request ring bytes |
//! | 20 | u32 | response ring bytes |
//! | 24 | u32 | dispatch ring bytes |
//! | 28 | u32 | max message bytes |
//!
//! In a hello, 0 in a size field means "the server's default"; any other
//! ring size is a power of two in [`MIN_RING_BYTES`]`..=`[`MAX_RING_BYTES`],
//! and a max message size is at most [`MAX_MESSAGE_BYTES`].
//!
//! Server reply ([`REPLY_LEN`] = 104 bytes):
//!
//! | offset | type | field |
//! |---:|---|---|
//! | 8 | u32 | status: 0 accepted, else a [`Refusal`] code |
//! | 12 | u32 | max message bytes |
//! | 16 | u32 | request ring bytes |
//! | 20 | u32 | response ring bytes |
//! | 24 | u32 | dispatch ring bytes |
//! | 28 | u32 | reserved, 0 |
//! | 32 | u64 | segment length |
//! | 40 | u64, u64 | control block offset, length |
//! | 56 | u64, u64 | request ring region offset, length |
//! | 72 | u64, u64 | response ring region offset, length |
//! | 88 | u64, u64 | dispatch ring region offset, length |
//!
//! Widths: ring and message sizes are `u32` (a ring is at most
//! [`MAX_RING_BYTES`] = 1 GiB); the segment length and offsets are `u64`,
//! because a segment may reach [`MAX_SEGMENT_LEN`] = 4 GiB and so that
//! `offset + length` is computed without overflow (checked, then compared).
//!
//! In an accepted reply every size is non-zero, and a power of two where it
//! is a ring size; a *region* is a ring's header plus its data, so its
//! length is at least the ring size (the control block's is at least 1);
//! every region offset is a multiple of [`LAYOUT_ALIGN`] = 128 bytes (the
//! cache-line separation the rings rely on); regions lie inside the segment
//! and do not overlap. A refusal carries zeros in every field after the
//! status.
//!
//! A server that does not speak the client's version answers with a
//! version-1 reply whose status is [`Refusal::VersionMismatch`] and whose
//! version field is the server's own, so every client can read it.
//!
//! # Totality
//!
//! [`ClientHello::decode`] and [`ServerReply::decode`] accept exactly the
//! byte strings their `encode` produces and return a [`HandshakeDecodeError`]
//! for everything else, without panicking or allocating. In particular every
//! successfully decoded message re-encodes to the same bytes (there is one
//! encoding per value). [`fuzz_decode`] checks this on arbitrary input.

use std::fmt;

use crate::segment::MAX_SEGMENT_LEN;

/// The magic number opening every handshake message: the bytes `"CIPC"`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"CIPC");

/// The handshake protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// The length of the header common to all versions and both messages
/// (magic, version, kind). Not the 16-byte message header of the data path
/// ([`crate::message::HEADER_LEN`]).
pub const COMMON_HEADER_LEN: usize = 8;

/// The length of a version-1 [`ClientHello`] on the wire.
pub const HELLO_LEN: usize = 32;

/// The length of a version-1 [`ServerReply`] on the wire.
pub const REPLY_LEN: usize = 104;

/// The smallest ring, in bytes (one page).
pub const MIN_RING_BYTES: u32 = 1 << 12;

/// The largest ring, in bytes (1 GiB).
pub const MAX_RING_BYTES: u32 = 1 << 30;

/// The largest message, in bytes.
pub const MAX_MESSAGE_BYTES: u32 = MAX_RING_BYTES;

/// The alignment of every offset in a [`SegmentLayout`]: the mapping is
/// page-aligned, so a ring placed at any announced offset meets the ring's
/// own base alignment ([`coroipc_ring::REGION_ALIGN`], a property of
/// memory, where this is one of the wire format).
pub const LAYOUT_ALIGN: u64 = 128;

const _: () = assert!((LAYOUT_ALIGN as usize).is_multiple_of(coroipc_ring::REGION_ALIGN));

/// The hello flag bits defined in this version (none).
const KNOWN_HELLO_FLAGS: u32 = 0;

/// The ring sizes a client asks for, or the server grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RingSizes {
    /// Data bytes of the client → server request ring.
    pub request_ring_bytes: u32,
    /// Data bytes of the server → client response ring.
    pub response_ring_bytes: u32,
    /// Data bytes of the server → client dispatch ring.
    pub dispatch_ring_bytes: u32,
    /// The largest message either side may send, header included.
    pub max_message_bytes: u32,
}

/// The first message on a connection, client → server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[doc(alias = "coroipcc_service_connect")]
pub struct ClientHello {
    /// The service to connect to.
    pub service: u16,
    /// Option bits; none is defined in version 1, so this must be 0.
    pub flags: u32,
    /// The sizes asked for; 0 in a field means "the server's default".
    pub sizes: RingSizes,
}

/// A byte range of the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Span {
    /// Offset of the first byte from the start of the segment.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Span {
    /// One past the last byte, or `None` if that overflows `u64`.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len)
    }

    fn overlaps(&self, other: &Span) -> bool {
        // Only called on regions already known to fit in the segment.
        self.offset < other.offset + other.len && other.offset < self.offset + self.len
    }
}

/// Where the control block and the three rings lie in the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SegmentLayout {
    /// The segment (memfd) length in bytes.
    pub segment_len: u64,
    /// The control block: connection state, wake-up words.
    pub control: Span,
    /// The request ring (header and data).
    pub request: Span,
    /// The response ring (header and data).
    pub response: Span,
    /// The dispatch ring (header and data).
    pub dispatch: Span,
}

/// A successful reply: the negotiated sizes and the segment layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Accepted {
    /// The sizes granted.
    pub sizes: RingSizes,
    /// Where everything lies in the segment that comes with the reply.
    pub layout: SegmentLayout,
}

/// Why a server refused a connection; the wire status codes are fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Refusal {
    /// The authentication callback refused the peer's credentials.
    AccessDenied = 1,
    /// No service with the requested id.
    NoSuchService = 2,
    /// A requested size exceeds the server's limits.
    TooBig = 3,
    /// The server or service has reached its connection limit.
    #[doc(alias = "Busy")]
    ConnectionLimit = 4,
    /// The server does not speak the client's protocol version.
    VersionMismatch = 5,
    /// The hello was malformed.
    Invalid = 6,
    /// Granting the rings would exceed the server's memory budget (server
    /// wide or for the client's uid); ask for smaller rings or try later.
    #[doc(alias = "NoResources")]
    NoMemory = 7,
}

impl Refusal {
    /// The status code on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The refusal for a wire status code, if it is one.
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => Self::AccessDenied,
            2 => Self::NoSuchService,
            3 => Self::TooBig,
            4 => Self::ConnectionLimit,
            5 => Self::VersionMismatch,
            6 => Self::Invalid,
            7 => Self::NoMemory,
            _ => return None,
        })
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AccessDenied => "access denied",
            Self::NoSuchService => "no such service",
            Self::TooBig => "requested size too big",
            Self::ConnectionLimit => "connection limit reached",
            Self::VersionMismatch => "protocol version mismatch",
            Self::Invalid => "invalid hello",
            Self::NoMemory => "server memory budget exhausted",
        })
    }
}

/// The server's answer to a [`ClientHello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerReply {
    /// The connection is accepted; the segment memfd comes with the reply.
    Accepted(Accepted),
    /// The connection is refused; the server closes the socket.
    Refused(Refusal),
}

/// Why bytes are not a valid handshake message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeDecodeError {
    /// The buffer is not exactly the message's length.
    WrongLength {
        /// The length of this message kind in this version.
        expected: usize,
        /// The buffer's length.
        actual: usize,
    },
    /// The first four bytes are not [`MAGIC`].
    BadMagic {
        /// The value found.
        found: u32,
    },
    /// A version this crate does not speak.
    UnsupportedVersion {
        /// The version found.
        found: u16,
    },
    /// A reply status that is neither 0 nor a [`Refusal`] code.
    UnknownStatus {
        /// The status found.
        found: u32,
    },
    /// Hello flag bits that this version does not define.
    UnknownFlags {
        /// The undefined bits that are set.
        found: u32,
    },
    /// A field holds a value outside its allowed range (including non-zero
    /// reserved fields and non-zero fields in a refusal).
    FieldOutOfRange {
        /// The field's name.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// A ring size that is not a power of two.
    NotPowerOfTwo {
        /// The field's name.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// A region offset that is not a multiple of [`LAYOUT_ALIGN`].
    Misaligned {
        /// The region's name.
        region: &'static str,
        /// The offset found.
        offset: u64,
    },
    /// A region that does not lie inside the segment.
    RegionOutOfSegment {
        /// The region's name.
        region: &'static str,
    },
    /// A ring region shorter than the ring size it must hold.
    RegionTooSmall {
        /// The region's name.
        region: &'static str,
    },
    /// Two regions share bytes.
    RegionsOverlap {
        /// The first region's name.
        first: &'static str,
        /// The second region's name.
        second: &'static str,
    },
}

impl fmt::Display for HandshakeDecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongLength { expected, actual } => {
                write!(f, "handshake message is {actual} bytes, expected {expected}")
            }
            Self::BadMagic { found } => write!(f, "bad handshake magic {found:#010x}"),
            Self::UnsupportedVersion { found } => {
                write!(f, "unsupported handshake version {found}")
            }
            Self::UnknownStatus { found } => write!(f, "unknown handshake status {found}"),
            Self::UnknownFlags { found } => write!(f, "unknown hello flags {found:#x}"),
            Self::FieldOutOfRange { field, value } => {
                write!(f, "{field} {value} out of range")
            }
            Self::NotPowerOfTwo { field, value } => {
                write!(f, "{field} {value} is not a power of two")
            }
            Self::Misaligned { region, offset } => {
                write!(f, "{region} offset {offset} is not {LAYOUT_ALIGN}-aligned")
            }
            Self::RegionOutOfSegment { region } => write!(f, "{region} lies outside the segment"),
            Self::RegionTooSmall { region } => write!(f, "{region} is smaller than its ring"),
            Self::RegionsOverlap { first, second } => write!(f, "{first} overlaps {second}"),
        }
    }
}

impl std::error::Error for HandshakeDecodeError {}

// Field offsets, shared by the encoders and decoders.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_LEN: usize = 6;

const HELLO_SERVICE: usize = 8;
const HELLO_RESERVED: usize = 10;
const HELLO_FLAGS: usize = 12;
const HELLO_SIZES: usize = 16;

const REPLY_STATUS: usize = 8;
const REPLY_MAX_MESSAGE: usize = 12;
const REPLY_RINGS: usize = 16;
const REPLY_RESERVED: usize = 28;
const REPLY_SEGMENT_LEN: usize = 32;
const REPLY_REGIONS: usize = 40;

const _: () = assert!(HELLO_SIZES + 16 == HELLO_LEN);
const _: () = assert!(REPLY_REGIONS + 4 * 16 == REPLY_LEN);
const _: () = assert!(HELLO_LEN <= REPLY_LEN && REPLY_LEN <= u16::MAX as usize);
const _: () = assert!(
    3 * (MAX_RING_BYTES as u64 + 4096) + 4096 <= MAX_SEGMENT_LEN,
    "three maximal rings and a control block fit in a segment"
);

fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_header(b: &mut [u8], len: usize) {
    put_u32(b, OFF_MAGIC, MAGIC);
    put_u16(b, OFF_VERSION, PROTOCOL_VERSION);
    // `len` is one of the two fixed lengths, checked to fit above.
    put_u16(b, OFF_LEN, len as u16);
}

/// Checks the header and the exact length; the order (magic, version, then
/// length) lets a reader report a foreign version as such, whatever its
/// length.
fn check_header(data: &[u8], len: usize) -> Result<(), HandshakeDecodeError> {
    if data.len() < COMMON_HEADER_LEN {
        return Err(HandshakeDecodeError::WrongLength { expected: len, actual: data.len() });
    }
    let magic = get_u32(data, OFF_MAGIC);
    if magic != MAGIC {
        return Err(HandshakeDecodeError::BadMagic { found: magic });
    }
    let version = get_u16(data, OFF_VERSION);
    if version != PROTOCOL_VERSION {
        return Err(HandshakeDecodeError::UnsupportedVersion { found: version });
    }
    if data.len() != len {
        return Err(HandshakeDecodeError::WrongLength { expected: len, actual: data.len() });
    }
    let declared = get_u16(data, OFF_LEN);
    if usize::from(declared) != len {
        return Err(HandshakeDecodeError::FieldOutOfRange {
            field: "declared length",
            value: declared.into(),
        });
    }
    Ok(())
}

fn get_sizes(b: &[u8], off: usize) -> RingSizes {
    RingSizes {
        request_ring_bytes: get_u32(b, off),
        response_ring_bytes: get_u32(b, off + 4),
        dispatch_ring_bytes: get_u32(b, off + 8),
        max_message_bytes: get_u32(b, off + 12),
    }
}

fn put_sizes(b: &mut [u8], off: usize, s: &RingSizes) {
    put_u32(b, off, s.request_ring_bytes);
    put_u32(b, off + 4, s.response_ring_bytes);
    put_u32(b, off + 8, s.dispatch_ring_bytes);
    put_u32(b, off + 12, s.max_message_bytes);
}

/// A ring size: a power of two in `MIN_RING_BYTES..=MAX_RING_BYTES`.
fn check_ring_size(field: &'static str, value: u32) -> Result<(), HandshakeDecodeError> {
    if !value.is_power_of_two() {
        return Err(HandshakeDecodeError::NotPowerOfTwo { field, value: value.into() });
    }
    if !(MIN_RING_BYTES..=MAX_RING_BYTES).contains(&value) {
        return Err(HandshakeDecodeError::FieldOutOfRange { field, value: value.into() });
    }
    Ok(())
}

fn zero_field(field: &'static str, value: u64) -> Result<(), HandshakeDecodeError> {
    if value == 0 {
        Ok(())
    } else {
        Err(HandshakeDecodeError::FieldOutOfRange { field, value })
    }
}

impl RingSizes {
    const NAMES: [&'static str; 3] = ["request ring bytes", "response ring bytes", "dispatch ring bytes"];

    fn rings(&self) -> [u32; 3] {
        [self.request_ring_bytes, self.response_ring_bytes, self.dispatch_ring_bytes]
    }

    /// Checks sizes as a hello may carry them: each 0 (server default) or
    /// in range.
    fn validate_requested(&self) -> Result<(), HandshakeDecodeError> {
        for (name, value) in Self::NAMES.into_iter().zip(self.rings()) {
            if value != 0 {
                check_ring_size(name, value)?;
            }
        }
        if self.max_message_bytes > MAX_MESSAGE_BYTES {
            return Err(HandshakeDecodeError::FieldOutOfRange {
                field: "max message bytes",
                value: self.max_message_bytes.into(),
            });
        }
        Ok(())
    }

    /// Checks sizes as a server grants them: all non-zero and in range.
    fn validate_granted(&self) -> Result<(), HandshakeDecodeError> {
        for (name, value) in Self::NAMES.into_iter().zip(self.rings()) {
            check_ring_size(name, value)?;
        }
        if !(1..=MAX_MESSAGE_BYTES).contains(&self.max_message_bytes) {
            return Err(HandshakeDecodeError::FieldOutOfRange {
                field: "max message bytes",
                value: self.max_message_bytes.into(),
            });
        }
        Ok(())
    }
}

impl ClientHello {
    /// Encodes the hello in the version-1 wire format.
    ///
    /// The encoding is written as given; a hello with out-of-range sizes or
    /// undefined flags encodes, but the server's
    /// [`decode`](ClientHello::decode) will refuse it.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        put_header(&mut b, HELLO_LEN);
        put_u16(&mut b, HELLO_SERVICE, self.service);
        put_u16(&mut b, HELLO_RESERVED, 0);
        put_u32(&mut b, HELLO_FLAGS, self.flags);
        put_sizes(&mut b, HELLO_SIZES, &self.sizes);
        b
    }

    /// Decodes and validates a hello; total (see the module docs).
    ///
    /// # Errors
    ///
    /// A [`HandshakeDecodeError`] naming the first check that failed.
    ///
    /// # Examples
    ///
    /// ```
    /// use coroipc_transport::handshake::{ClientHello, RingSizes};
    ///
    /// let hello = ClientHello { service: 7, flags: 0, sizes: RingSizes::default() };
    /// assert_eq!(ClientHello::decode(&hello.encode()), Ok(hello));
    /// assert!(ClientHello::decode(&hello.encode()[..31]).is_err());
    /// ```
    pub fn decode(data: &[u8]) -> Result<Self, HandshakeDecodeError> {
        check_header(data, HELLO_LEN)?;
        zero_field("reserved", get_u16(data, HELLO_RESERVED).into())?;
        let flags = get_u32(data, HELLO_FLAGS);
        if flags & !KNOWN_HELLO_FLAGS != 0 {
            return Err(HandshakeDecodeError::UnknownFlags { found: flags & !KNOWN_HELLO_FLAGS });
        }
        let sizes = get_sizes(data, HELLO_SIZES);
        sizes.validate_requested()?;
        Ok(Self { service: get_u16(data, HELLO_SERVICE), flags, sizes })
    }
}

impl Accepted {
    /// Checks the invariants an accepted reply must satisfy (see the module
    /// docs): a server calls this on the layout it computed before sending
    /// it, a client gets it from [`ServerReply::decode`].
    ///
    /// # Errors
    ///
    /// A [`HandshakeDecodeError`] naming the first violated invariant.
    pub fn validate(&self) -> Result<(), HandshakeDecodeError> {
        self.sizes.validate_granted()?;
        let layout = &self.layout;
        if !(1..=MAX_SEGMENT_LEN).contains(&layout.segment_len) {
            return Err(HandshakeDecodeError::FieldOutOfRange {
                field: "segment length",
                value: layout.segment_len,
            });
        }
        let regions = [
            ("control block", layout.control, 1u64),
            ("request ring", layout.request, self.sizes.request_ring_bytes.into()),
            ("response ring", layout.response, self.sizes.response_ring_bytes.into()),
            ("dispatch ring", layout.dispatch, self.sizes.dispatch_ring_bytes.into()),
        ];
        for (name, region, min_len) in regions {
            if region.offset % LAYOUT_ALIGN != 0 {
                return Err(HandshakeDecodeError::Misaligned { region: name, offset: region.offset });
            }
            match region.end() {
                Some(end) if end <= layout.segment_len => {}
                _ => return Err(HandshakeDecodeError::RegionOutOfSegment { region: name }),
            }
            if region.len < min_len {
                return Err(HandshakeDecodeError::RegionTooSmall { region: name });
            }
        }
        for (i, (first, a, _)) in regions.iter().enumerate() {
            for (second, b, _) in &regions[i + 1..] {
                if a.overlaps(b) {
                    return Err(HandshakeDecodeError::RegionsOverlap { first, second });
                }
            }
        }
        Ok(())
    }
}

impl ServerReply {
    /// Encodes the reply in the version-1 wire format.
    ///
    /// An [`Accepted`] is written as given; call [`Accepted::validate`]
    /// first, since the client's [`decode`](ServerReply::decode) refuses an
    /// invalid layout.
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        put_header(&mut b, REPLY_LEN);
        match self {
            ServerReply::Refused(refusal) => put_u32(&mut b, REPLY_STATUS, refusal.code()),
            ServerReply::Accepted(acc) => {
                put_u32(&mut b, REPLY_STATUS, 0);
                put_u32(&mut b, REPLY_MAX_MESSAGE, acc.sizes.max_message_bytes);
                put_u32(&mut b, REPLY_RINGS, acc.sizes.request_ring_bytes);
                put_u32(&mut b, REPLY_RINGS + 4, acc.sizes.response_ring_bytes);
                put_u32(&mut b, REPLY_RINGS + 8, acc.sizes.dispatch_ring_bytes);
                put_u32(&mut b, REPLY_RESERVED, 0);
                let l = &acc.layout;
                put_u64(&mut b, REPLY_SEGMENT_LEN, l.segment_len);
                for (i, r) in [l.control, l.request, l.response, l.dispatch].iter().enumerate() {
                    put_u64(&mut b, REPLY_REGIONS + 16 * i, r.offset);
                    put_u64(&mut b, REPLY_REGIONS + 16 * i + 8, r.len);
                }
            }
        }
        b
    }

    /// Decodes and validates a reply; total (see the module docs). An
    /// accepted reply has passed [`Accepted::validate`].
    ///
    /// # Errors
    ///
    /// A [`HandshakeDecodeError`] naming the first check that failed.
    pub fn decode(data: &[u8]) -> Result<Self, HandshakeDecodeError> {
        check_header(data, REPLY_LEN)?;
        let status = get_u32(data, REPLY_STATUS);
        let region_at = |i: usize| Span {
            offset: get_u64(data, REPLY_REGIONS + 16 * i),
            len: get_u64(data, REPLY_REGIONS + 16 * i + 8),
        };
        let sizes = RingSizes {
            max_message_bytes: get_u32(data, REPLY_MAX_MESSAGE),
            request_ring_bytes: get_u32(data, REPLY_RINGS),
            response_ring_bytes: get_u32(data, REPLY_RINGS + 4),
            dispatch_ring_bytes: get_u32(data, REPLY_RINGS + 8),
        };
        let layout = SegmentLayout {
            segment_len: get_u64(data, REPLY_SEGMENT_LEN),
            control: region_at(0),
            request: region_at(1),
            response: region_at(2),
            dispatch: region_at(3),
        };
        zero_field("reserved", get_u32(data, REPLY_RESERVED).into())?;
        if status == 0 {
            let accepted = Accepted { sizes, layout };
            accepted.validate()?;
            return Ok(ServerReply::Accepted(accepted));
        }
        let refusal =
            Refusal::from_code(status).ok_or(HandshakeDecodeError::UnknownStatus { found: status })?;
        // A refusal carries nothing: one encoding per value.
        if sizes != RingSizes::default() || layout != SegmentLayout::default() {
            let first_nonzero =
                data[REPLY_MAX_MESSAGE..].iter().position(|&b| b != 0).map_or(0, |i| i + REPLY_MAX_MESSAGE);
            return Err(HandshakeDecodeError::FieldOutOfRange {
                field: "refusal body byte",
                value: first_nonzero as u64,
            });
        }
        Ok(ServerReply::Refused(refusal))
    }
}

/// Fuzzing harness: decodes `data` as both message kinds and, for whatever
/// decodes, checks the invariants the decoders promise (exact re-encoding,
/// validated layout). Panics on a violated invariant; meant to be the whole
/// body of a cargo-fuzz target (e.g. `handshake_decode`), and run by this
/// module's tests on bit-flipped and pseudo-random input.
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) {
    match ClientHello::decode(data) {
        Ok(hello) => {
            assert_eq!(&hello.encode()[..], data, "a decoded hello re-encodes to the same bytes");
            assert_eq!(hello.flags & !KNOWN_HELLO_FLAGS, 0, "no unknown flags");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    match ServerReply::decode(data) {
        Ok(reply) => {
            assert_eq!(&reply.encode()[..], data, "a decoded reply re-encodes to the same bytes");
            if let ServerReply::Accepted(acc) = reply {
                assert_eq!(acc.validate(), Ok(()), "a decoded layout is valid");
                for r in [acc.layout.control, acc.layout.request, acc.layout.response, acc.layout.dispatch] {
                    assert!(
                        r.end().is_some_and(|end| end <= acc.layout.segment_len),
                        "every region lies inside the segment"
                    );
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use HandshakeDecodeError as E;

    fn hello() -> ClientHello {
        ClientHello {
            service: 0xbeef,
            flags: 0,
            sizes: RingSizes {
                request_ring_bytes: 1 << 20,
                response_ring_bytes: 1 << 16,
                dispatch_ring_bytes: 0,
                max_message_bytes: 1 << 16,
            },
        }
    }

    /// A plausible layout: control block, then the three rings, each region
    /// a ring plus a 256-byte header.
    fn accepted() -> Accepted {
        let sizes = RingSizes {
            request_ring_bytes: 1 << 20,
            response_ring_bytes: 1 << 16,
            dispatch_ring_bytes: 1 << 16,
            max_message_bytes: 1 << 16,
        };
        let control = Span { offset: 0, len: 4096 };
        let request = Span { offset: 4096, len: 256 + (1 << 20) };
        let response = Span { offset: request.end().unwrap(), len: 256 + (1 << 16) };
        let dispatch = Span { offset: response.end().unwrap(), len: 256 + (1 << 16) };
        Accepted {
            sizes,
            layout: SegmentLayout {
                segment_len: dispatch.end().unwrap(),
                control,
                request,
                response,
                dispatch,
            },
        }
    }

    fn with_accepted(f: impl FnOnce(&mut Accepted)) -> Result<ServerReply, E> {
        let mut a = accepted();
        f(&mut a);
        ServerReply::decode(&ServerReply::Accepted(a).encode())
    }

    fn patched(mut bytes: Vec<u8>, off: usize, value: &[u8]) -> Vec<u8> {
        bytes[off..off + value.len()].copy_from_slice(value);
        bytes
    }

    const REFUSALS: [Refusal; 7] = [
        Refusal::AccessDenied,
        Refusal::NoSuchService,
        Refusal::TooBig,
        Refusal::ConnectionLimit,
        Refusal::VersionMismatch,
        Refusal::Invalid,
        Refusal::NoMemory,
    ];

    #[test]
    fn magic_is_cipc_on_the_wire() {
        assert_eq!(&hello().encode()[..4], b"CIPC");
        assert_eq!(&ServerReply::Refused(Refusal::Invalid).encode()[..4], b"CIPC");
    }

    #[test]
    fn hello_round_trips() {
        let h = hello();
        let bytes = h.encode();
        assert_eq!(bytes.len(), HELLO_LEN);
        assert_eq!(ClientHello::decode(&bytes), Ok(h));
        let defaults = ClientHello { service: 0, flags: 0, sizes: RingSizes::default() };
        assert_eq!(ClientHello::decode(&defaults.encode()), Ok(defaults));
    }

    #[test]
    fn accepted_reply_round_trips() {
        let reply = ServerReply::Accepted(accepted());
        assert_eq!(ServerReply::decode(&reply.encode()), Ok(reply));
    }

    #[test]
    fn every_refusal_round_trips() {
        for r in REFUSALS {
            assert_eq!(Refusal::from_code(r.code()), Some(r));
            let reply = ServerReply::Refused(r);
            assert_eq!(ServerReply::decode(&reply.encode()), Ok(reply));
        }
        assert_eq!(Refusal::from_code(0), None);
        assert_eq!(Refusal::from_code(8), None);
    }

    #[test]
    fn wire_layout_is_little_endian_and_fixed() {
        let b = hello().encode();
        assert_eq!(&b[4..8], &[1, 0, 32, 0], "version 1, length 32");
        assert_eq!(&b[8..10], &[0xef, 0xbe], "service id");
        assert_eq!(&b[16..20], &(1u32 << 20).to_le_bytes(), "request ring");
        let r = ServerReply::Accepted(accepted()).encode();
        assert_eq!(&r[6..8], &[104, 0], "length 104");
        assert_eq!(&r[56..64], &4096u64.to_le_bytes(), "request offset");
    }

    #[test]
    fn every_prefix_of_a_valid_message_fails_cleanly() {
        let messages: [(&[u8], usize); 3] = [
            (&hello().encode(), HELLO_LEN),
            (&ServerReply::Accepted(accepted()).encode(), REPLY_LEN),
            (&ServerReply::Refused(Refusal::TooBig).encode(), REPLY_LEN),
        ];
        for (i, (bytes, len)) in messages.iter().enumerate() {
            for cut in 0..*len {
                let prefix = &bytes[..cut];
                let err = if i == 0 {
                    ClientHello::decode(prefix).unwrap_err()
                } else {
                    ServerReply::decode(prefix).unwrap_err()
                };
                assert_eq!(err, E::WrongLength { expected: *len, actual: cut }, "prefix of {cut} bytes");
                fuzz_decode(prefix);
            }
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut long = hello().encode().to_vec();
        long.push(0);
        assert_eq!(
            ClientHello::decode(&long),
            Err(E::WrongLength { expected: HELLO_LEN, actual: HELLO_LEN + 1 })
        );
    }

    #[test]
    fn bad_magic() {
        let b = patched(hello().encode().to_vec(), 0, b"CIPD");
        assert!(matches!(ClientHello::decode(&b), Err(E::BadMagic { .. })));
        assert!(matches!(ServerReply::decode(&b), Err(E::BadMagic { .. })));
    }

    #[test]
    fn unsupported_version_is_reported_before_length() {
        // A future version may be longer: the version error comes first.
        let mut b = patched(hello().encode().to_vec(), 4, &2u16.to_le_bytes());
        b.extend_from_slice(&[0; 16]);
        assert_eq!(ClientHello::decode(&b), Err(E::UnsupportedVersion { found: 2 }));
    }

    #[test]
    fn wrong_declared_length() {
        let b = patched(hello().encode().to_vec(), 6, &33u16.to_le_bytes());
        assert_eq!(ClientHello::decode(&b), Err(E::FieldOutOfRange { field: "declared length", value: 33 }));
        // A hello is not a reply, even with the right header fields.
        let b = ServerReply::Refused(Refusal::Invalid).encode();
        assert!(matches!(ClientHello::decode(&b), Err(E::WrongLength { .. })));
    }

    #[test]
    fn unknown_flags() {
        let h = ClientHello { flags: 0x8000_0001, ..hello() };
        assert_eq!(ClientHello::decode(&h.encode()), Err(E::UnknownFlags { found: 0x8000_0001 }));
    }

    #[test]
    fn nonzero_reserved_fields() {
        let b = patched(hello().encode().to_vec(), HELLO_RESERVED, &[1, 0]);
        assert!(matches!(ClientHello::decode(&b), Err(E::FieldOutOfRange { field: "reserved", .. })));
        let b = patched(ServerReply::Accepted(accepted()).encode().to_vec(), REPLY_RESERVED, &[0, 0, 0, 1]);
        assert!(matches!(ServerReply::decode(&b), Err(E::FieldOutOfRange { field: "reserved", .. })));
    }

    #[test]
    fn hello_sizes_out_of_range() {
        let cases = [
            (3000, E::NotPowerOfTwo { field: "request ring bytes", value: 3000 }),
            (2048, E::FieldOutOfRange { field: "request ring bytes", value: 2048 }),
            (1 << 31, E::FieldOutOfRange { field: "request ring bytes", value: 1 << 31 }),
        ];
        for (value, expected) in cases {
            let mut h = hello();
            h.sizes.request_ring_bytes = value;
            assert_eq!(ClientHello::decode(&h.encode()), Err(expected));
        }
        let mut h = hello();
        h.sizes.max_message_bytes = MAX_MESSAGE_BYTES + 1;
        assert!(matches!(
            ClientHello::decode(&h.encode()),
            Err(E::FieldOutOfRange { field: "max message bytes", .. })
        ));
    }

    #[test]
    fn unknown_status() {
        let b = patched(
            ServerReply::Refused(Refusal::Invalid).encode().to_vec(),
            REPLY_STATUS,
            &8u32.to_le_bytes(),
        );
        assert_eq!(ServerReply::decode(&b), Err(E::UnknownStatus { found: 8 }));
    }

    #[test]
    fn refusal_with_a_body_is_refused() {
        let b = patched(ServerReply::Refused(Refusal::TooBig).encode().to_vec(), REPLY_SEGMENT_LEN, &[0, 1]);
        assert_eq!(
            ServerReply::decode(&b),
            Err(E::FieldOutOfRange { field: "refusal body byte", value: REPLY_SEGMENT_LEN as u64 + 1 })
        );
    }

    #[test]
    fn granted_sizes_must_be_nonzero_powers_of_two() {
        assert_eq!(
            with_accepted(|a| a.sizes.dispatch_ring_bytes = 0),
            Err(E::NotPowerOfTwo { field: "dispatch ring bytes", value: 0 })
        );
        assert_eq!(
            with_accepted(|a| a.sizes.response_ring_bytes = (1 << 16) + 128),
            Err(E::NotPowerOfTwo { field: "response ring bytes", value: (1 << 16) + 128 })
        );
        assert_eq!(
            with_accepted(|a| a.sizes.max_message_bytes = 0),
            Err(E::FieldOutOfRange { field: "max message bytes", value: 0 })
        );
    }

    #[test]
    fn segment_length_out_of_range() {
        assert!(matches!(
            with_accepted(|a| a.layout.segment_len = MAX_SEGMENT_LEN + 1),
            Err(E::FieldOutOfRange { field: "segment length", .. })
        ));
    }

    #[test]
    fn misaligned_region() {
        assert_eq!(
            with_accepted(|a| a.layout.response.offset += 64),
            Err(E::Misaligned { region: "response ring", offset: accepted().layout.response.offset + 64 })
        );
    }

    #[test]
    fn region_out_of_segment() {
        assert_eq!(
            with_accepted(|a| a.layout.segment_len -= 1),
            Err(E::RegionOutOfSegment { region: "dispatch ring" })
        );
        // Offset + length overflowing u64 is out of the segment, not a wrap.
        assert_eq!(
            with_accepted(|a| {
                a.layout.control.offset = u64::MAX - 127;
                a.layout.control.len = 1 << 20;
            }),
            Err(E::RegionOutOfSegment { region: "control block" })
        );
    }

    #[test]
    fn region_too_small() {
        assert_eq!(
            with_accepted(|a| a.layout.request.len = (1 << 20) - 1),
            Err(E::RegionTooSmall { region: "request ring" })
        );
        assert_eq!(
            with_accepted(|a| a.layout.control.len = 0),
            Err(E::RegionTooSmall { region: "control block" })
        );
    }

    #[test]
    fn overlapping_regions() {
        assert_eq!(
            with_accepted(|a| a.layout.dispatch = a.layout.response),
            Err(E::RegionsOverlap { first: "response ring", second: "dispatch ring" })
        );
        assert_eq!(
            with_accepted(|a| a.layout.control.len += 128),
            Err(E::RegionsOverlap { first: "control block", second: "request ring" })
        );
    }

    #[test]
    fn every_error_displays_short_lower_case() {
        let errors = [
            E::WrongLength { expected: 1, actual: 2 },
            E::BadMagic { found: 1 },
            E::UnsupportedVersion { found: 2 },
            E::UnknownStatus { found: 9 },
            E::UnknownFlags { found: 1 },
            E::FieldOutOfRange { field: "reserved", value: 1 },
            E::NotPowerOfTwo { field: "request ring bytes", value: 3 },
            E::Misaligned { region: "request ring", offset: 1 },
            E::RegionOutOfSegment { region: "request ring" },
            E::RegionTooSmall { region: "request ring" },
            E::RegionsOverlap { first: "request ring", second: "dispatch ring" },
        ];
        for e in errors {
            let m = e.to_string();
            assert!(m.starts_with(|c: char| c.is_ascii_lowercase()), "{m}");
            assert!(!m.ends_with('.') && m.len() < 80, "{m}");
        }
        for r in REFUSALS {
            assert!(r.to_string().starts_with(|c: char| c.is_ascii_lowercase()));
        }
    }

    /// Every single-bit corruption of every valid message either decodes to
    /// something that re-encodes to the same bytes or fails with a typed
    /// error: `fuzz_decode` asserts it.
    #[test]
    fn every_single_bit_flip_is_handled() {
        let mut messages =
            vec![hello().encode().to_vec(), ServerReply::Accepted(accepted()).encode().to_vec()];
        messages.extend(REFUSALS.map(|r| ServerReply::Refused(r).encode().to_vec()));
        for msg in messages {
            fuzz_decode(&msg);
            for bit in 0..msg.len() * 8 {
                let mut m = msg.clone();
                m[bit / 8] ^= 1 << (bit % 8);
                fuzz_decode(&m);
            }
        }
    }

    /// A deterministic stand-in for the fuzzer: pseudo-random buffers of
    /// every interesting length, with a valid header half the time so the
    /// field checks are reached.
    #[test]
    fn pseudo_random_input_never_panics() {
        let mut rng = coroipc_testkit::XorShift::new(0x9e37_79b9_7f4a_7c15);
        for round in 0..20_000 {
            let len = [HELLO_LEN, REPLY_LEN, rng.below(128) as usize][round % 3];
            let mut buf = rng.bytes(len);
            if round % 2 == 0 && len >= COMMON_HEADER_LEN {
                put_header(&mut buf, len);
            }
            fuzz_decode(&buf);
        }
    }
}
