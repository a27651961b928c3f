//! # coroipc-client — layer 3 of coroipc-rs (coroipcc)
//!
//! Will hold the client half of the coroipc API: connecting to a service,
//! synchronous calls with copying and zero-copy receive, dispatch receive
//! through a pollable fd, and flow-control queries. Contains no `unsafe`.
//!
//! Not built yet: this crate currently exports nothing.
#![forbid(unsafe_code)]
