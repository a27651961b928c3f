//! # coroipc-benches
//!
//! The workloads of `benches/README.md`, runnable against three transports —
//! `coroipc` (this project), `uds` (the same protocol over Unix domain
//! sockets, written the way a user would) and `floor` (the physical limits
//! of the machine: cache-line, futex and pipe ping-pong, memcpy bandwidth) —
//! each with server and clients in separate processes. Used by the
//! `coroipc-bench` tool and by the criterion benches in `benches/`.
//!
//! Every message carries a sequence number that its receiver checks; a
//! mismatch aborts the run.

pub mod floor;
pub mod proc;
pub mod report;
pub mod rpc;
pub mod scale;
pub mod uds;
pub mod workload;
