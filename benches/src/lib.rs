//! Benchmarks of coroipc-rs: criterion benches in `benches/`; the `coroipc-bench` tool will live here.
