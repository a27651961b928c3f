//! # coroipc-server — layer 3 of coroipc-rs (coroipcs)
//!
//! Will hold the server half of the coroipc API: the `Server` builder,
//! services with per-connection state, handlers, dispatch with flow control,
//! authentication and the abstracted poll system. Contains no `unsafe`.
//!
//! Not built yet: this crate currently exports nothing.
#![forbid(unsafe_code)]
