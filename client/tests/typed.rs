//! Typed commands end to end, the server in a separate process: a typed
//! request reaches a typed handler decoded, its `Ok` comes back decoded,
//! its `Err` as the service's status; bytes that do not decode are refused
//! without reaching the handler; raw and typed commands share a service;
//! and the async client calls the same commands.
#![cfg(feature = "typed")]

use std::time::Duration;

use coroipc_client::typed::Command;
use coroipc_client::{Client, Error};
use coroipc_server::{Server, ServiceBuilder, Status};
use coroipc_testkit::child::{report, spawn, ChildProc};
use serde::{Deserialize, Serialize};

const SERVICE: u16 = 9;
const T: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Set {
    key: String,
    value: Vec<u8>,
}

/// Stores a value; answers the previous one.
struct SetCmd;
impl Command for SetCmd {
    const ID: u16 = 1;
    type Request = Set;
    type Response = Option<Vec<u8>>;
}

/// Reads a value; an unknown key is the service's error 1404.
struct GetCmd;
impl Command for GetCmd {
    const ID: u16 = 2;
    type Request = String;
    type Response = Vec<u8>;
}

/// How many typed requests the handlers saw (a raw command).
const SEEN: u16 = 3;

/// The server process.
#[test]
#[ignore = "helper: runs as the server child process"]
fn server_process() {
    let Ok(endpoint) = std::env::var("COROIPC_TEST_ENDPOINT") else { return };
    type Db = std::collections::HashMap<String, Vec<u8>>;
    let service = ServiceBuilder::new(SERVICE, |_| Ok((Db::new(), 0u64)))
        .typed::<SetCmd, Status>(|call, set| {
            let (db, seen) = call.state();
            *seen += 1;
            Ok(db.insert(set.key, set.value))
        })
        .typed::<GetCmd, Status>(|call, key| {
            let (db, seen) = call.state();
            *seen += 1;
            db.get(&key).cloned().ok_or(Status::Service(1404))
        })
        .handler(SEEN, |mut call| {
            let seen = call.state().1;
            let _ = call.respond(&seen.to_le_bytes());
        });
    let server = Server::builder().endpoint(&endpoint).service(service).build().expect("server");
    report("READY", "");
    server.run().expect("server loop");
}

fn start(tag: &str) -> (ChildProc, String) {
    let endpoint = format!("@coroipc-client-typed-{}-{tag}", std::process::id());
    let mut child = spawn("server_process", &[("COROIPC_TEST_ENDPOINT", endpoint.clone())]);
    child.expect("READY", T);
    (child, endpoint)
}

fn seen(client: &Client) -> u64 {
    let mut buf = [0u8; 8];
    assert_eq!(client.call(SEEN, &[], &mut buf).expect("raw call"), 8);
    u64::from_le_bytes(buf)
}

#[test]
fn typed_calls_round_trip_errors_are_statuses_and_garbage_never_reaches_the_handler() {
    let (_server, endpoint) = start("blocking");
    let client = Client::connect(&endpoint, SERVICE).expect("connect");

    let set = Set { key: "totem.token".into(), value: b"3000".to_vec() };
    assert_eq!(client.call_typed::<SetCmd>(&set).expect("set"), None);
    let again = Set { value: b"5000".to_vec(), ..set.clone() };
    assert_eq!(client.call_typed::<SetCmd>(&again).expect("set again"), Some(b"3000".to_vec()));
    assert_eq!(client.call_typed::<GetCmd>(&"totem.token".to_string()).expect("get"), b"5000");
    let missing = client.call_typed_timeout::<GetCmd>(&"nope".to_string(), Some(T));
    assert!(
        matches!(missing, Err(Error::Service(1404))),
        "the handler's Err arrives as its status: {missing:?}"
    );
    assert_eq!(seen(&client), 4, "four typed requests reached the handlers");

    // Bytes that are no `Set` (a string length past the end): refused as
    // invalid, and the handler never ran.
    let mut buf = [0u8; 64];
    let garbage = client.call(SetCmd::ID, &[0xff, 0x01], &mut buf);
    assert!(matches!(garbage, Err(Error::Invalid)), "{garbage:?}");
    // A valid `Set` followed by a stray byte: a message is exactly one value.
    let mut bytes = coroipc_client::typed::encode(&set).expect("encodes");
    bytes.push(0);
    let trailing = client.call(SetCmd::ID, &bytes, &mut buf);
    assert!(matches!(trailing, Err(Error::Invalid)), "{trailing:?}");
    assert_eq!(seen(&client), 4, "undecodable requests never reach the handler");
    // The connection is still fine.
    assert_eq!(client.call_typed::<GetCmd>(&"totem.token".to_string()).expect("get"), b"5000");
}

#[cfg(feature = "tokio")]
#[test]
fn the_async_client_calls_the_same_typed_commands() {
    let (_server, endpoint) = start("async");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = coroipc_client::AsyncClient::connect(&endpoint, SERVICE).await.expect("connect");
        let set = Set { key: "k".into(), value: vec![1, 2, 3] };
        assert_eq!(client.call_typed::<SetCmd>(&set).await.expect("set"), None);
        assert_eq!(client.call_typed::<GetCmd>(&"k".to_string()).await.expect("get"), vec![1, 2, 3]);
        let missing = client.call_typed::<GetCmd>(&"x".to_string()).await;
        assert!(matches!(missing, Err(Error::Service(1404))), "{missing:?}");
    });
}
