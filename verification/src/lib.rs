//! # coroipc-verification — checks of `coroipc-ring` that are not unit tests
//!
//! This crate holds no production code. Its `tests/` directory holds two
//! kinds of differential and exhaustive checks of the ring crate: **loom
//! models** (`tests/loom_*.rs`, compiled only under `--cfg coroipc_loom`)
//! that explore every interleaving and weak-memory outcome of the real ring
//! code on a tiny ring — SPSC with wrap-around and padding, MPSC with two and
//! three producers and abandoned grants, the wait/wake protocol (no lost
//! wake-up), watermark hysteresis, attach/validate, and "teeth" models that
//! must fail when an ordering is weakened — and **proptest state machines**
//! (`tests/prop_*.rs`, compiled only without that cfg) that replay long random
//! operation sequences on a ring and on a `VecDeque` reference model and
//! compare them after every step. The library itself only provides the
//! shared model helpers (`loom_support`, under loom). See `README.md` for
//! the exact commands and how to replay a failure.

#[cfg(coroipc_loom)]
pub mod loom_support;
