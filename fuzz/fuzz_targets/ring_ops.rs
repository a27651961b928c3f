//! Ring operation sequences replayed on a real ring and on a `VecDeque`
//! model; see `coroipc_ring::fuzz::ring_ops`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| coroipc_ring::fuzz::ring_ops(data));
