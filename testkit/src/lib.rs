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
