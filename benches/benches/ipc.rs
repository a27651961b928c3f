//! Cross-process criterion benches (placeholder being written).
fn main() {}
