//! Helpers shared by coroipc-rs's real-process tests (transport, server
//! and client crates): child processes that re-execute the test binary in a
//! role and talk through marker lines, and `/proc` readings of a process's
//! descriptors and memory.
//!
//! The child-process pattern: a test binary contains `#[ignore]` helper
//! tests; a test spawns its own executable with `--ignored --exact <helper>`
//! and environment variables that give the child its role. The child
//! reports progress as `@@MARKER key=value …` lines on stdout
//! ([`report`]); the parent waits for them ([`ChildProc::expect`]) and may
//! send it commands on stdin ([`ChildProc::send_line`]). Dropping a
//! [`ChildProc`] kills it with SIGKILL.

pub mod child;
pub mod procfs;

pub use child::{field, field_opt, num, report, spawn, ChildProc};

/// Little-endian `u32`s, concatenated (a test payload).
pub fn u32s(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The little-endian `u32` at `at`.
///
/// # Panics
///
/// If `b` is too short.
pub fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The little-endian `u64` at `at`.
///
/// # Panics
///
/// If `b` is too short.
pub fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Byte offsets of a ring header's fields, as a hostile peer sees them
/// (the layout `coroipc-ring`'s `header.rs` fixes with compile-time
/// assertions).
pub mod ring_layout {
    /// Magic, version, flags, capacity, max record, watermarks: (offset, len).
    pub const CONFIG: (u64, u64) = (0, 48);
    /// The producer position.
    pub const TAIL: u64 = 128;
    /// The consumer position.
    pub const HEAD: u64 = 256;
    /// The consumer's wait words.
    pub const DATA_WAIT: u64 = 384;
    /// The producers' wait words.
    pub const SPACE_WAIT: u64 = 512;
    /// The flow-control word.
    pub const FLOW: u64 = 640;
    /// The start of the data area.
    pub const DATA: u64 = 768;
}

/// xorshift64*, with a bias towards values that break invariants: what a
/// hostile peer writes into shared memory.
#[derive(Clone, Debug)]
pub struct Garbage(pub u64);

impl Garbage {
    /// The next pseudo-random word.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Half the time a value at an edge (0, alignment-1, page size, top of
    /// the range, …), otherwise a random word.
    pub fn word(&mut self) -> u64 {
        const INTERESTING: [u64; 12] =
            [0, 1, 7, 8, 4095, 4096, 1 << 32, 1 << 63, u64::MAX, u64::MAX - 7, 0xffff_ffff, 0x1_0000_0008];
        let r = self.next();
        if r % 2 == 0 {
            INTERESTING[(r >> 8) as usize % INTERESTING.len()]
        } else {
            self.next()
        }
    }
}
