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
//!
//! With the cargo feature `suite`, [`suite`] holds the fixtures of the
//! server crate's real-process suites: the two test servers and the
//! helpers that drive them as clients.
//!
//! This is the one home of the repository's test helpers: a generic helper
//! (a polling wait, a pseudo-random generator, a unique endpoint name)
//! lives here once instead of in each test directory.

pub mod child;
pub mod procfs;
#[cfg(feature = "suite")]
pub mod suite;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

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

/// Polls `cond` every 2 ms until it holds (`true`) or `timeout` passes
/// (`false`; `cond` is checked once more at the deadline).
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return cond();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A fresh Linux abstract endpoint name (`@coroipc-<prefix>-<tag>-<pid>-<n>`,
/// nothing in the filesystem), unique within the machine while this
/// process lives.
pub fn unique_endpoint(prefix: &str, tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("@coroipc-{prefix}-{tag}-{}-{n}", std::process::id())
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process of the
/// machine, so a child's timestamp and the parent's compare.
pub fn mono_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The repository's one pseudo-random generator: xorshift64* (Marsaglia's
/// xorshift with Vigna's multiplicative output scrambling), deterministic
/// so that a failing test replays. Not for anything but tests.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator seeded with `seed` (0, which xorshift cannot leave, is
    /// replaced by a fixed non-zero seed).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { seed })
    }

    /// The next pseudo-random word.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A pseudo-random value below `n` (modulo: slightly biased, which
    /// tests do not mind).
    ///
    /// # Panics
    ///
    /// If `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `len` pseudo-random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// Pseudo-random words with a bias towards values that break invariants:
/// what a hostile peer writes into shared memory.
#[derive(Clone, Debug)]
pub struct Garbage(XorShift);

impl Garbage {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(XorShift::new(seed))
    }

    /// The next pseudo-random word.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Half the time a value at an edge (0, alignment-1, page size, top of
    /// the range, …), otherwise a random word.
    pub fn word(&mut self) -> u64 {
        const INTERESTING: [u64; 12] =
            [0, 1, 7, 8, 4095, 4096, 1 << 32, 1 << 63, u64::MAX, u64::MAX - 7, 0xffff_ffff, 0x1_0000_0008];
        let r = self.next();
        if r.is_multiple_of(2) {
            INTERESTING[(r >> 8) as usize % INTERESTING.len()]
        } else {
            self.next()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xorshift_replays_its_sequence_and_a_zero_seed_does_not_stick() {
        let (mut a, mut b) = (XorShift::new(42), XorShift::new(42));
        let first: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        assert!(first.iter().all(|&x| x == b.next_u64()), "same seed, same sequence");
        let mut zero = XorShift::new(0);
        assert!((0..100).any(|_| zero.next_u64() != 0), "seed 0 is replaced, not stuck at 0");
        assert!((0..1000).all(|_| a.below(7) < 7), "below stays below");
        assert_eq!(a.bytes(33).len(), 33);
    }

    #[test]
    fn eventually_says_whether_the_condition_came_true() {
        assert!(eventually(Duration::from_secs(5), || true));
        let mut calls = 0;
        assert!(eventually(Duration::from_secs(5), || {
            calls += 1;
            calls == 3
        }));
        assert!(!eventually(Duration::ZERO, || false), "a condition that never holds times out");
    }

    #[test]
    fn unique_endpoints_differ_and_are_abstract() {
        let (a, b) = (unique_endpoint("kit", "t"), unique_endpoint("kit", "t"));
        assert_ne!(a, b);
        assert!(a.starts_with("@coroipc-kit-t-"), "{a}");
    }
}
