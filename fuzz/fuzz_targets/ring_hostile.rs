//! Arbitrary bytes as the shared ring image and a stream of peer writes under
//! a live producer and consumer; see `coroipc_ring::fuzz::ring_hostile`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| coroipc_ring::fuzz::ring_hostile(data));
