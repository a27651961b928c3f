//! Pipelined requests against the echo service: up to 32 requests in
//! flight, each response matched to its request by ticket.
//!
//! ```text
//! cargo run --release -p coroipc-server --example echo_server
//! cargo run --release -p coroipc-client --example pipeline_client [-- COUNT [ENDPOINT]]
//! ```

use std::collections::HashMap;
use std::io::IoSlice;
use std::time::{Duration, Instant};

use coroipc_client::Client;

const ECHO_SERVICE: u16 = 1;
const ECHO: u16 = 0;
const DEPTH: usize = 32;

fn main() -> Result<(), coroipc_client::Error> {
    let mut args = std::env::args().skip(1);
    let count: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let endpoint = args.next().unwrap_or_else(|| "@coroipc-echo".to_string());
    let client = Client::builder(&endpoint, ECHO_SERVICE).max_in_flight(DEPTH).connect()?;

    let mut in_flight = HashMap::new();
    let (mut sent, mut done) = (0u64, 0u64);
    let mut buf = [0u8; 64];
    let start = Instant::now();
    while done < count {
        // Keep the pipe full...
        while sent < count && in_flight.len() < DEPTH {
            let ticket = client.send_vectored(
                ECHO,
                &[IoSlice::new(&sent.to_le_bytes())],
                Some(Duration::from_secs(5)),
            )?;
            in_flight.insert(ticket, sent);
            sent += 1;
        }
        // ...and take whichever response comes first.
        let (ticket, result) = client.wait_any(&mut buf, Some(Duration::from_secs(5)))?;
        let n = result?;
        let expected = in_flight.remove(&ticket).expect("a ticket we sent");
        assert_eq!(&buf[..n], &expected.to_le_bytes(), "each response answers its own request");
        done += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{count} pipelined requests ({DEPTH} in flight) in {secs:.3} s: {:.0} requests/s",
        count as f64 / secs
    );
    Ok(())
}
