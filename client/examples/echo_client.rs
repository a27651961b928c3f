//! A client of the echo service (`cargo run -p coroipc-server --example
//! echo_server`): sends a message, checks the echo, then measures the
//! round-trip time of 10,000 calls.
//!
//! ```sh
//! cargo run -p coroipc-client --example echo_client -- [message] [endpoint]
//! ```

use std::time::Instant;

use coroipc_client::Client;

fn main() -> Result<(), coroipc_client::Error> {
    let mut args = std::env::args().skip(1);
    let message = args.next().unwrap_or_else(|| "hello".to_string());
    let endpoint = args.next().unwrap_or_else(|| "@coroipc-echo".to_string());

    let client = Client::connect(&endpoint, 1)?; // service 1
    let mut buf = vec![0u8; client.max_message()];
    let n = client.call(0, message.as_bytes(), &mut buf)?; // command 0: echo
    println!("echoed: {}", String::from_utf8_lossy(&buf[..n]));

    // Zero-copy: the response is read in place and released on drop.
    let guard = client.call_in_place(0, &[std::io::IoSlice::new(b"in place")], None)?;
    assert_eq!(&guard[..], b"in place");
    drop(guard);

    const CALLS: u32 = 10_000;
    let start = Instant::now();
    for i in 0..CALLS {
        let n = client.call(0, &i.to_le_bytes(), &mut buf)?;
        assert_eq!(&buf[..n], &i.to_le_bytes());
    }
    println!("{CALLS} round trips, {:.2} µs each", start.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS));
    Ok(())
}
