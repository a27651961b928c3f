//! The service author's API, with the server on its own thread and a
//! client in this process: handlers that return a `Result` (and so can use
//! `?`), the payload limit, connection ids.

#![allow(missing_docs)]

use coroipc_client::{Client, Error};
use coroipc_server::{ConnectionId, Server, ServiceBuilder, Status};

const CMD_DOUBLE: u16 = 0;
const CMD_FILL: u16 = 1;
const CMD_LIMIT: u16 = 2;
const ERR_OVERFLOW: u32 = Status::SERVICE_BASE + 1;

#[test]
fn result_handlers_answer_ok_bytes_or_the_error_status_and_max_payload_is_the_limit() {
    let service = ServiceBuilder::new(1, |_| Ok(()))
        .handler_result(CMD_DOUBLE, |call| {
            let bytes: [u8; 8] = call.payload().try_into().map_err(|_| Status::Invalid)?;
            let n = u64::from_le_bytes(bytes).checked_mul(2).ok_or(Status::Service(ERR_OVERFLOW))?;
            Ok::<_, Status>(n.to_le_bytes())
        })
        .handler_result(CMD_FILL, |call| {
            // A response of `max_payload() + extra` bytes.
            let extra = usize::from(call.payload().first().copied().unwrap_or(0));
            Ok::<_, Status>(vec![7u8; call.max_payload() + extra])
        })
        .handler_result(CMD_LIMIT, |call| {
            let c = call.connection();
            assert_eq!(c.max_payload(), c.max_message() - 16);
            Ok::<_, Status>((call.max_payload() as u64).to_le_bytes())
        });
    let ep = format!("@coroipc-author-api-{}", std::process::id());
    let server = Server::builder().endpoint(&ep).service(service).build().expect("build");
    let (handle, thread) = server.spawn().expect("spawn");
    let client = Client::connect(&ep, 1).expect("connect");
    let mut buf = vec![0u8; 1 << 16];

    let n = client.call(CMD_DOUBLE, &21u64.to_le_bytes(), &mut buf).expect("Ok(bytes) is the response");
    assert_eq!(&buf[..n], &42u64.to_le_bytes());
    let r = client.call(CMD_DOUBLE, b"short", &mut buf);
    assert!(matches!(r, Err(Error::Invalid)), "Err(status) answers it: {r:?}");
    let r = client.call(CMD_DOUBLE, &u64::MAX.to_le_bytes(), &mut buf);
    assert!(matches!(r, Err(Error::Service(ERR_OVERFLOW))), "a service code: {r:?}");

    let n = client.call(CMD_LIMIT, b"", &mut buf).expect("limit");
    let max_payload = u64::from_le_bytes(buf[..n].try_into().unwrap()) as usize;
    assert_eq!(max_payload, client.max_message() - 16, "both sides agree on the limit");
    let n = client.call(CMD_FILL, &[0], &mut buf).expect("a response of exactly max_payload fits");
    assert_eq!(n, max_payload);
    let r = client.call(CMD_FILL, &[1], &mut buf);
    assert!(matches!(r, Err(Error::TooBig)), "one byte more is refused, the client answered: {r:?}");

    // Connection ids: a newtype that prints and parses as its number.
    let conns = handle.connections();
    assert_eq!(conns.len(), 1);
    let id = conns[0].id();
    assert_eq!(id.to_string().parse::<ConnectionId>().unwrap(), id);
    assert_eq!(ConnectionId::from_raw(id.get()), id);
    assert!(handle.connection(id).is_some());

    handle.shutdown();
    thread.join().expect("server thread").expect("server run");
}

#[test]
fn handlers_reach_the_service_context_and_the_server_and_connections_carry_a_context() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    struct Name(String);
    // Command 0: count in the shared context, name this connection, and
    // answer how many connections the server has and their names.
    let service = ServiceBuilder::with_context(1, AtomicU64::new(0), |conn| {
        conn.set_context(Arc::new(Name(format!("client-{}", conn.id()))));
        Ok(())
    })
    .handler_result(0, |call| {
        let n = call.context().fetch_add(1, Ordering::Relaxed) + 1;
        let names: Vec<String> = call
            .server()
            .connections()
            .iter()
            .map(|c| c.context::<Name>().map_or("?".into(), |name| name.0.clone()))
            .collect();
        assert!(call.connection().context::<u32>().is_none(), "a context of another type is None");
        Ok::<_, Status>(format!("{n} {}", names.join(",")).into_bytes())
    });
    let ep = format!("@coroipc-author-api-ctx-{}", std::process::id());
    let server = Server::builder().endpoint(&ep).service(service).build().expect("build");
    let (handle, thread) = server.spawn().expect("spawn");
    let a = Client::connect(&ep, 1).expect("connect a");
    let b = Client::connect(&ep, 1).expect("connect b");
    let mut buf = [0u8; 256];
    // A call is served after its connection's connect callback ran.
    a.call(0, b"", &mut buf).expect("warm-up a");
    b.call(0, b"", &mut buf).expect("warm-up b");
    let ids: Vec<String> = handle.connections().iter().map(|c| format!("client-{}", c.id())).collect();
    let n = a.call(0, b"", &mut buf).expect("call a");
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), format!("3 {}", ids.join(",")));
    let n = b.call(0, b"", &mut buf).expect("call b");
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), format!("4 {}", ids.join(",")));
    handle.shutdown();
    thread.join().expect("server thread").expect("server run");
}
