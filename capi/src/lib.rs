//! # coroipc-capi — coroipc's C ABI over coroipc-rs
//!
//! The two C shared libraries of corosync's coroipc, re-created over the
//! Rust crates: `libcoroipcs.so.4` (the server side, set up with
//! `coroipcs_ipc_init_v2`, over [`coroipc_server`]) and `libcoroipcc.so.4`
//! (the client side, over [`coroipc_client`]). A program built for coroipc
//! (corosync 1.4's executive, its client libraries and tools) runs on them
//! unmodified: put the folder holding both first on `LD_LIBRARY_PATH`.
//! Both sides must be swapped together: the wire protocol between them is
//! coroipc-rs's, not the original's.
//!
//! The crate builds one static library holding both sides;
//! `capi/link.sh` links it twice, exporting only the functions of each
//! side, with the SONAMEs `libcoroipcs.so.4` and `libcoroipcc.so.4` and
//! the client's `COROSYNC_COROIPCC_3.0` version node
//! (`capi/coroipcc.map`). The C declarations are in
//! `include/corosync/{coroipc_types,coroipcc,coroipcs}.h`.
//!
//! This is the only crate of the workspace with `unsafe` in its
//! interface: every exported function takes raw pointers from C. The
//! `unsafe` stays in the files that cross the boundary (`ffi.rs`,
//! `client.rs`, `server.rs`, each with its own `allow(unsafe_code)`); each
//! block says what it relies on. No exported function unwinds into C: a
//! panic is caught and returned as `CS_ERR_LIBRARY` (or −1, or a no-op for
//! functions returning nothing).
//!
//! ## Tuning
//!
//! Neither side spins by default: a blocked call sleeps on a futex and the
//! server's loop sleeps in `epoll_wait`, as the original's threads sleep on
//! semaphores, leaving the CPUs to the executive (`benches/README.md`, "C
//! ABI", has the measurements). `COROIPC_SPIN_US=N` in the environment of a
//! process makes both libraries spin up to N µs first.
//!
//! ## What differs from the original, on purpose
//!
//! * **No client-supplied paths or addresses.** Segments are sealed memfds
//!   the server creates; zero-copy buffers are identified by pointers the
//!   client library itself handed out and checks.
//! * **Request sizes are checked.** A request shorter than its header, or
//!   whose header says it is shorter than a header or longer than the
//!   connection's request area, is answered `CS_ERR_INVALID_PARAM` before
//!   any service code sees it; the handler never reads past what this
//!   client sent into its own request area (see [`server`]).
//! * **Handlers never read memory the client can still change.** Every
//!   request, zero-copy ones included, reaches the handler in
//!   server-private memory (see [`client`] for the zero-copy choice).
//! * **Threads.** The server runs one event-loop thread (plus the server
//!   crate's per-connection drainer threads, which never call into the
//!   executive) instead of one thread per connection. Every call into the
//!   executive (`service_available`, `security_valid`, `init_fn`,
//!   `sending_allowed`, handlers, `exit_fn`, the `stats_*` callbacks) is
//!   made from that thread under `serialize_lock`, except the `responses`
//!   and `dispatched` counters, bumped by whichever thread sends, as the
//!   original does; `coroipcs_response_send` and `coroipcs_dispatch_send`
//!   never take the lock and never block.
//! * **The executive's poll loop is not used** (`poll_accept_add` is never
//!   called), so `coroipcs_handler_accept`/`_dispatch` are never invoked.
pub mod client;
pub mod ffi;
pub mod server;
