//! The async client under tokio: 16 tasks calling the echo service
//! concurrently over one connection.
//!
//! ```text
//! cargo run --release -p coroipc-server --example echo_server
//! cargo run --release -p coroipc-client --features tokio --example async_client [-- ENDPOINT]
//! ```

use std::sync::Arc;

use coroipc_client::AsyncClient;

const ECHO_SERVICE: u16 = 1;
const ECHO: u16 = 0;

fn main() -> Result<(), coroipc_client::Error> {
    let endpoint = std::env::args().nth(1).unwrap_or_else(|| "@coroipc-echo".to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(coroipc_client::Error::from)?;
    rt.block_on(async {
        let client = Arc::new(AsyncClient::connect(&endpoint, ECHO_SERVICE).await?);
        let tasks: Vec<_> = (0..16u32)
            .map(|t| {
                let client = client.clone();
                tokio::spawn(async move {
                    for i in 0..1000u32 {
                        let msg = [t.to_le_bytes(), i.to_le_bytes()].concat();
                        let answer = client.call(ECHO, &msg).await?;
                        assert_eq!(answer, msg, "every task gets its own answers");
                    }
                    Ok::<_, coroipc_client::Error>(())
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task")?;
        }
        println!("16 tasks × 1000 concurrent calls answered over one connection");
        Ok(())
    })
}
