//! The blocking and the async client report a disconnect the same way —
//! `Error::Disconnected(reason)` — and the async dispatch stream yields
//! that error once, then ends, whatever the reason (server on a thread of
//! this process; the real-process cases are in `server/tests`).
#![cfg(feature = "tokio")]
#![allow(missing_docs)]

use std::future::poll_fn;
use std::pin::Pin;
use std::time::Duration;

use coroipc_client::{AsyncClient, Client, DisconnectReason, Error};
use coroipc_server::{Server, ServerHandle, ServiceBuilder};

const KICK_ME: u16 = 0;
const ECHO: u16 = 1;

fn start(tag: &str) -> (String, ServerHandle, std::thread::JoinHandle<std::io::Result<()>>) {
    let service = ServiceBuilder::new(1, |_| Ok(()))
        .handler(KICK_ME, |call| {
            call.connection().disconnect();
            let _ = call.respond(b"bye");
        })
        .handler(ECHO, |call| {
            let p = call.payload();
            let _ = call.respond(p);
        });
    let ep = format!("@coroipc-async-disc-{tag}-{}", std::process::id());
    let server = Server::builder().endpoint(&ep).service(service).build().expect("build");
    let (handle, thread) = server.spawn().expect("spawn");
    (ep, handle, thread)
}

async fn next_dispatch(
    stream: &mut coroipc_client::DispatchStream<'_>,
) -> Option<coroipc_client::Result<coroipc_client::Dispatch>> {
    tokio::time::timeout(
        Duration::from_secs(10),
        poll_fn(|cx| futures_core::Stream::poll_next(Pin::new(&mut *stream), cx)),
    )
    .await
    .expect("the stream does not hang")
}

async fn stream_ends_with(client: &AsyncClient, reason: DisconnectReason) {
    let mut stream = client.dispatch();
    match next_dispatch(&mut stream).await {
        Some(Err(Error::Disconnected(r))) => assert_eq!(r, reason),
        other => panic!("expected the reason, got {other:?}"),
    }
    assert!(next_dispatch(&mut stream).await.is_none(), "then the stream ends");
}

fn reason_of<T: std::fmt::Debug>(r: Result<T, Error>) -> DisconnectReason {
    match r {
        Err(Error::Disconnected(reason)) => reason,
        other => panic!("expected Disconnected, got {other:?}"),
    }
}

#[test]
fn blocking_and_async_clients_report_the_same_reason_and_the_stream_ends_the_same_way() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // Disconnected by the service.
    let (ep, handle, thread) = start("kick");
    let blocking = Client::connect(&ep, 1).expect("connect");
    let _ = blocking.call(KICK_ME, b"", &mut [0u8; 8]);
    let mut buf = [0u8; 8];
    let r = blocking.recv_dispatch(&mut buf, Some(Duration::from_secs(10)));
    assert_eq!(reason_of(r), DisconnectReason::ByServer);
    rt.block_on(async {
        let client = AsyncClient::connect(&ep, 1).await.expect("connect");
        let _ = client.call(KICK_ME, b"").await;
        stream_ends_with(&client, DisconnectReason::ByServer).await;
        assert_eq!(reason_of(client.call(ECHO, b"x").await), DisconnectReason::ByServer);
    });
    handle.shutdown();
    thread.join().unwrap().unwrap();

    // Server shutdown.
    let (ep, handle, thread) = start("shutdown");
    let blocking = Client::connect(&ep, 1).expect("connect");
    rt.block_on(async {
        let client = AsyncClient::connect(&ep, 1).await.expect("connect");
        assert_eq!(client.call(ECHO, b"x").await.expect("echo"), b"x");
        handle.shutdown();
        stream_ends_with(&client, DisconnectReason::ServerShutdown).await;
        assert_eq!(reason_of(client.call(ECHO, b"x").await), DisconnectReason::ServerShutdown);
    });
    thread.join().unwrap().unwrap();
    assert_eq!(reason_of(blocking.call(ECHO, b"x", &mut buf)), DisconnectReason::ServerShutdown);
}
