//! The record format shared by every ring.
//!
//! A record is an 8-byte header followed by the payload, padded to a multiple
//! of 8 bytes, and never wraps around the end of the data area:
//!
//! ```text
//! | len: u32 (LE) | kind: u32 (LE) | payload (len bytes) | pad to 8 |
//! ```
//!
//! `kind` is [`Kind::Data`] for a message or [`Kind::Padding`] for space to
//! skip: the producer writes padding to fill the tail of the data area when
//! the next record does not fit before the end (so records stay contiguous
//! and zero-copy), and an MPSC producer turns an abandoned reservation into
//! padding. The consumer validates `kind`, `len` against the maximum record,
//! the end of the data area and the published tail before it uses either.

/// Record kinds. Distinct, non-zero, unlikely patterns so that zeroed or
/// stale memory is never mistaken for a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Kind {
    /// A message (`b"DATA"`).
    Data = u32::from_le_bytes(*b"DATA"),
    /// Space to skip (`b"PADD"`).
    Padding = u32::from_le_bytes(*b"PADD"),
}

impl Kind {
    #[inline]
    pub(crate) fn from_word(word: u32) -> Option<Self> {
        if word == Self::Data as u32 {
            Some(Self::Data)
        } else if word == Self::Padding as u32 {
            Some(Self::Padding)
        } else {
            None
        }
    }
}

/// A decoded record header word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub(crate) len: u32,
    pub(crate) kind: u32,
}

impl RecordHeader {
    #[inline]
    pub(crate) fn decode(word: u64) -> Self {
        Self { len: word as u32, kind: (word >> 32) as u32 }
    }

    /// The header word of a record of `kind` with a `len`-byte payload.
    #[inline]
    pub(crate) fn encode(kind: Kind, len: u64) -> u64 {
        debug_assert!(len <= u64::from(u32::MAX));
        ((kind as u32 as u64) << 32) | len
    }
}
