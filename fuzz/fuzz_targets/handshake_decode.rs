//! Arbitrary bytes through both handshake decoders; whatever decodes must
//! re-encode to the same bytes. See `coroipc_transport::handshake::fuzz_decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| coroipc_transport::handshake::fuzz_decode(data));
