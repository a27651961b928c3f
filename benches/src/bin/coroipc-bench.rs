//! coroipc-bench (being written).
fn main() {}
