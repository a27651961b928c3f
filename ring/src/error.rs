//! Error types, one per operation family.

use std::fmt;

use crate::flow::Watermarks;

/// Why `init` refused to create a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingInitError {
    /// The span is smaller than `required_size(capacity)` or lies outside the region.
    RegionTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        actual: usize,
    },
    /// The span does not start on a 128-byte boundary.
    Misaligned,
    /// Capacity is not a power of two within `MIN_CAPACITY..=MAX_CAPACITY`.
    BadCapacity(u64),
    /// Maximum record is zero or larger than `max_payload_for(capacity)`.
    BadMaxRecord(u64),
    /// Watermarks are not `low < high <= capacity`.
    BadWatermarks(Watermarks),
}

impl fmt::Display for RingInitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RegionTooSmall { needed, actual } => {
                write!(f, "region too small for ring: need {needed} bytes, have {actual}")
            }
            Self::Misaligned => f.write_str("ring region is not 128-byte aligned"),
            Self::BadCapacity(c) => write!(f, "invalid ring capacity {c}"),
            Self::BadMaxRecord(m) => write!(f, "invalid maximum record size {m}"),
            Self::BadWatermarks(w) => {
                write!(f, "invalid watermarks high {} low {}", w.high, w.low)
            }
        }
    }
}

impl std::error::Error for RingInitError {}

/// Why attaching to a ring header in (possibly foreign) memory failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingAttachError {
    /// The span is too small for the header or for the capacity it claims.
    RegionTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        actual: usize,
    },
    /// The span does not start on a 128-byte boundary.
    Misaligned,
    /// The magic number is wrong: not a ring, or not initialised.
    BadMagic(u64),
    /// The header was written by another layout version.
    VersionMismatch {
        /// Version found in the header.
        found: u32,
        /// Version this crate speaks.
        expected: u32,
    },
    /// Reserved flag bits are set.
    UnknownFlags(u32),
    /// Capacity is not a power of two within bounds.
    BadCapacity(u64),
    /// Maximum record size is zero or too large for the capacity.
    BadMaxRecord(u64),
    /// Watermarks are not `low < high <= capacity`.
    BadWatermarks {
        /// High watermark found.
        high: u64,
        /// Low watermark found.
        low: u64,
    },
    /// Positions violate `head <= tail <= head + capacity` or alignment.
    BadPositions {
        /// Consumer position found.
        head: u64,
        /// Producer position found.
        tail: u64,
    },
}

impl fmt::Display for RingAttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RegionTooSmall { needed, actual } => {
                write!(f, "region too small for ring: need {needed} bytes, have {actual}")
            }
            Self::Misaligned => f.write_str("ring region is not 128-byte aligned"),
            Self::BadMagic(m) => write!(f, "bad ring magic {m:#018x}"),
            Self::VersionMismatch { found, expected } => {
                write!(f, "ring version {found}, expected {expected}")
            }
            Self::UnknownFlags(x) => write!(f, "unknown ring flags {x:#x}"),
            Self::BadCapacity(c) => write!(f, "invalid ring capacity {c}"),
            Self::BadMaxRecord(m) => write!(f, "invalid maximum record size {m}"),
            Self::BadWatermarks { high, low } => {
                write!(f, "invalid watermarks high {high} low {low}")
            }
            Self::BadPositions { head, tail } => {
                write!(f, "invalid ring positions head {head} tail {tail}")
            }
        }
    }
}

impl std::error::Error for RingAttachError {}

/// What was found wrong in a live ring. The peer wrote something a correct
/// peer never writes; the connection should be dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// The producer position is behind the consumer, more than a capacity
    /// ahead, or unaligned.
    Tail {
        /// Local consumer position.
        head: u64,
        /// Producer position read.
        tail: u64,
    },
    /// The consumer position is ahead of the producer, more than a capacity
    /// behind, or unaligned.
    Head {
        /// Consumer position read.
        head: u64,
        /// Local producer position.
        tail: u64,
    },
    /// A record header carries an unknown kind.
    RecordKind(u32),
    /// A record is longer than the ring's maximum record size.
    RecordTooLong(u64),
    /// A record would run past the end of the data area.
    RecordCrossesEnd {
        /// Index of the record.
        index: u64,
        /// Its size in bytes.
        size: u64,
    },
    /// A record extends past the published producer position.
    RecordPastTail {
        /// Its size in bytes.
        size: u64,
        /// Published bytes available.
        available: u64,
    },
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tail { head, tail } => write!(f, "tail {tail} invalid for head {head}"),
            Self::Head { head, tail } => write!(f, "head {head} invalid for tail {tail}"),
            Self::RecordKind(k) => write!(f, "unknown record kind {k:#x}"),
            Self::RecordTooLong(n) => write!(f, "record of {n} bytes exceeds maximum"),
            Self::RecordCrossesEnd { index, size } => {
                write!(f, "record of {size} bytes at {index} crosses the ring end")
            }
            Self::RecordPastTail { size, available } => {
                write!(f, "record of {size} bytes exceeds {available} published bytes")
            }
        }
    }
}

/// Why a record could not be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushError {
    /// Not enough free space now; try again after the consumer released some.
    Full,
    /// The payload exceeds the ring's maximum record size; it never fits.
    TooBig {
        /// Payload length asked for.
        len: u64,
        /// Largest payload the ring carries.
        max: u64,
    },
    /// The consumer corrupted the ring.
    Corrupt(Corruption),
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full => f.write_str("ring full"),
            Self::TooBig { len, max } => write!(f, "record of {len} bytes exceeds maximum {max}"),
            Self::Corrupt(c) => write!(f, "ring corrupt: {c}"),
        }
    }
}

impl std::error::Error for PushError {}

/// Why no record could be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PopError {
    /// Nothing published yet.
    Empty,
    /// The caller's buffer is smaller than the record; the record stays in
    /// the ring.
    BufferTooSmall {
        /// Length of the record.
        needed: usize,
    },
    /// The producer corrupted the ring.
    Corrupt(Corruption),
}

impl fmt::Display for PopError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("ring empty"),
            Self::BufferTooSmall { needed } => {
                write!(f, "buffer too small: record has {needed} bytes")
            }
            Self::Corrupt(c) => write!(f, "ring corrupt: {c}"),
        }
    }
}

impl std::error::Error for PopError {}
