//! Verification of coroipc-rs: loom models and proptest state machines live in `tests/`.
