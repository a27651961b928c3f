//! Wake-path benches (placeholder being written): see benches/README.md.
fn main() {}
