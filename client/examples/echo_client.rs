//! A client of the echo service (`cargo run -p coroipc-server --example
//! echo_server`): sends a message, checks the echo, then measures the
//! round-trip time of 10,000 calls.
//!
//! ```sh
//! cargo run -p coroipc-client --example echo_client -- [--server-uid UID] [message] [endpoint]
//! ```
//!
//! With `--server-uid UID` the client refuses a server that does not run
//! as `UID` (`Error::WrongServer`): any local user may bind an abstract name
//! such as `@coroipc-echo` first.

use std::time::{Duration, Instant};

use coroipc_client::Client;

fn main() -> Result<(), coroipc_client::Error> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let server_uid = match args.iter().position(|a| a == "--server-uid") {
        Some(at) => {
            let uid = args.get(at + 1).and_then(|v| v.parse::<u32>().ok());
            let Some(uid) = uid else {
                eprintln!("--server-uid needs a numeric uid");
                std::process::exit(2);
            };
            args.drain(at..at + 2);
            Some(uid)
        }
        None => None,
    };
    let mut args = args.into_iter();
    let message = args.next().unwrap_or_else(|| "hello".to_string());
    let endpoint = args.next().unwrap_or_else(|| "@coroipc-echo".to_string());

    let mut builder = Client::builder(&endpoint, 1).timeout(Duration::from_secs(5)); // service 1
    if let Some(uid) = server_uid {
        builder = builder.require_server_uid(uid);
    }
    let client = builder.connect()?;
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
