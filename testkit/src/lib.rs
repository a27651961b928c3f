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
