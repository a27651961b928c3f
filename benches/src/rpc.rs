//! The `coroipc` transport: the benchmark service on a coroipc server, and
//! the client side of every workload.

use std::io::IoSlice;
use std::time::{Duration, Instant};

use coroipc_client::{Client, Error, Sizes, WaitPolicy};
use coroipc_server::{Limits, RingSizes, Server, ServiceBuilder};

use crate::report::{histogram, now_ns, Sample};
use crate::workload::{cmd, Params, Workload, HEADER, SERVICE};

/// Pipelined requests in flight for `rr64-pipe`.
pub const PIPELINE_DEPTH: usize = 32;

/// The server's limits: room for `rr1m` and large dispatch rings.
fn limits() -> Limits {
    Limits {
        max_message_bytes: (1 << 20) + 64,
        max_ring_bytes: 1 << 24,
        defaults: RingSizes {
            request_ring_bytes: 1 << 16,
            response_ring_bytes: 1 << 16,
            dispatch_ring_bytes: 1 << 20,
            max_message_bytes: 8 << 10,
        },
        ..Limits::default()
    }
}

/// Runs the benchmark server on `endpoint` until killed. `spin` is the
/// loop's spin budget (0 for `rr64-sleep`); `connections` how many
/// connections it must hold at once (the scale sweep's idle ones included;
/// the descriptor limit must allow them, see [`crate::scale`]).
pub fn serve(endpoint: &str, spin: Duration, connections: usize) -> std::io::Result<()> {
    let service = ServiceBuilder::new(SERVICE, |_| Ok(()))
        .handler(cmd::ECHO, |call| {
            let payload = call.payload();
            let _ = call.respond(payload);
        })
        .handler(cmd::SINK, |call| {
            let mut answer = [0u8; 64 - HEADER];
            let n = call.payload().len().min(8);
            answer[..n].copy_from_slice(&call.payload()[..n]);
            let _ = call.respond(&answer);
        })
        .handler(cmd::STREAM, |call| {
            let p = call.payload();
            let (Some(count), Some(size)) = (read_u64(p, 0), read_u64(p, 8)) else {
                let _ = call.respond_status(coroipc_server::Status::Invalid);
                return;
            };
            let conn = call.connection().clone();
            let _ = call.respond(&[]);
            std::thread::spawn(move || {
                let mut payload = vec![0xa5u8; (size as usize).saturating_sub(HEADER)];
                for seq in 0..count {
                    payload[..8].copy_from_slice(&seq.to_le_bytes());
                    if conn
                        .dispatch_vectored_timeout(0, &[IoSlice::new(&payload)], Duration::from_secs(30))
                        .is_err()
                    {
                        return; // the client went away
                    }
                }
            });
        });
    let server = Server::builder()
        .endpoint(endpoint)
        .limits(limits())
        .max_connections(connections.max(1024))
        .max_pending_handshakes(512)
        // Segments are sparse (a ring's pages are touched as it is used):
        // the budget bounds what clients may ask for, not what they use.
        .memory_budget(1 << 40, 1 << 40)
        .spin(spin)
        .service(service)
        .build()
        .map_err(std::io::Error::other)?;
    println!("READY");
    server.run()
}

fn read_u64(p: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(p.get(at..at + 8)?.try_into().ok()?))
}

fn sizes_for(p: &Params) -> Sizes {
    match p.workload {
        Workload::Rr1m => Sizes { max_message_bytes: p.size as u32, ..Sizes::default() },
        Workload::Ev4k => {
            Sizes { max_message_bytes: p.size as u32, dispatch_ring_bytes: 4 << 20, ..Sizes::default() }
        }
        Workload::Ev64 => Sizes { dispatch_ring_bytes: 1 << 20, ..Sizes::default() },
        _ => Sizes::default(),
    }
}

fn connect(endpoint: &str, p: &Params, policy: WaitPolicy) -> Client {
    Client::builder(endpoint, SERVICE)
        .sizes(sizes_for(p))
        .wait_policy(policy)
        .timeout(Duration::from_secs(10))
        .connect()
        .unwrap_or_else(|e| panic!("connect to the benchmark server: {e}"))
}

fn check_seq(buf: &[u8], seq: u64, what: &str) {
    assert_eq!(read_u64(buf, 0), Some(seq), "{what}: sequence number mismatch");
}

/// Runs one client of `p` against the server at `endpoint`.
pub fn client(endpoint: &str, p: Params, policy: WaitPolicy) -> Sample {
    let payload_len = p.size.saturating_sub(HEADER).max(8);
    match p.workload {
        Workload::Rr64 | Workload::Rr64Sleep | Workload::Rr64Spin | Workload::Fanin => {
            let client = connect(endpoint, &p, policy);
            round_trips(&client, p.count, payload_len)
        }
        Workload::Rr64Pipe => {
            let client = connect(endpoint, &p, policy);
            pipelined(&client, p.count, payload_len)
        }
        Workload::Rr64Async => async_round_trips(endpoint, &p, policy, payload_len),
        Workload::Rr1m => {
            let client = connect(endpoint, &p, policy);
            let mut req = vec![0x5au8; payload_len];
            let mut resp = [0u8; 64];
            let warmup = 10;
            let mut start = now_ns();
            for seq in 0..p.count + warmup {
                if seq == warmup {
                    start = now_ns();
                }
                req[..8].copy_from_slice(&seq.to_le_bytes());
                let n = client.call(cmd::SINK, &req, &mut resp).expect("rr1m call");
                assert_eq!(n, 64 - HEADER);
                check_seq(&resp, seq, "rr1m");
            }
            Sample::new(None, p.count, p.count * p.size as u64, start, now_ns())
        }
        Workload::Ev64 | Workload::Ev4k => {
            let client = connect(endpoint, &p, policy);
            let mut req = [0u8; 16];
            req[..8].copy_from_slice(&p.count.to_le_bytes());
            req[8..].copy_from_slice(&(p.size as u64).to_le_bytes());
            let start = now_ns();
            client.call(cmd::STREAM, &req, &mut []).expect("start the stream");
            for seq in 0..p.count {
                let m =
                    client.recv_dispatch_in_place(Some(Duration::from_secs(30))).expect("dispatch message");
                assert_eq!(m.len(), payload_len, "dispatch size");
                check_seq(&m, seq, "dispatch");
            }
            Sample::new(None, p.count, p.count * p.size as u64, start, now_ns())
        }
        Workload::Connect => {
            let mut hist = histogram();
            let start = now_ns();
            let mut buf = [0u8; 64];
            for seq in 0..p.count {
                let t0 = Instant::now();
                let client = connect(endpoint, &p, policy);
                let n = client.call(cmd::ECHO, &seq.to_le_bytes(), &mut buf).expect("call after connect");
                check_seq(&buf[..n], seq, "connect");
                drop(client);
                hist.record(t0.elapsed().as_nanos() as u64).expect("in range");
            }
            Sample::new(Some(&hist), p.count, 0, start, now_ns())
        }
    }
}

fn round_trips(client: &Client, count: u64, payload_len: usize) -> Sample {
    let mut req = vec![0u8; payload_len];
    let mut resp = vec![0u8; payload_len];
    let mut hist = histogram();
    let warmup = (count / 10).clamp(100, 10_000);
    let mut start = now_ns();
    for seq in 0..count + warmup {
        if seq == warmup {
            start = now_ns();
        }
        req[..8].copy_from_slice(&seq.to_le_bytes());
        let t0 = Instant::now();
        let n = client.call(cmd::ECHO, &req, &mut resp).expect("rr call");
        let dt = t0.elapsed().as_nanos() as u64;
        assert_eq!(n, payload_len);
        check_seq(&resp, seq, "rr");
        if seq >= warmup {
            hist.record(dt).expect("in range");
        }
    }
    Sample::new(Some(&hist), count, 0, start, now_ns())
}

/// `rr64` from the async client: one task calling in turn on a two-worker
/// multi-thread runtime (what a tokio service talking to a coroipc daemon
/// looks like).
fn async_round_trips(endpoint: &str, p: &Params, policy: WaitPolicy, payload_len: usize) -> Sample {
    let rt = async_runtime();
    let builder = Client::builder(endpoint, SERVICE).sizes(sizes_for(p)).wait_policy(policy);
    let count = p.count;
    rt.block_on(async move {
        let client = builder.connect_async().await.unwrap_or_else(|e| panic!("connect: {e}"));
        tokio::spawn(async move {
            let mut req = vec![0u8; payload_len];
            let mut hist = histogram();
            let warmup = (count / 10).clamp(100, 10_000);
            let mut start = now_ns();
            for seq in 0..count + warmup {
                if seq == warmup {
                    start = now_ns();
                }
                req[..8].copy_from_slice(&seq.to_le_bytes());
                let t0 = Instant::now();
                let resp = client.call(cmd::ECHO, &req).await.expect("async rr call");
                let dt = t0.elapsed().as_nanos() as u64;
                assert_eq!(resp.len(), payload_len);
                check_seq(&resp, seq, "async rr");
                if seq >= warmup {
                    hist.record(dt).expect("in range");
                }
            }
            Sample::new(Some(&hist), count, 0, start, now_ns())
        })
        .await
        .expect("the calling task")
    })
}

/// The runtime of the async workloads: multi-thread, two workers.
pub fn async_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

fn pipelined(client: &Client, count: u64, payload_len: usize) -> Sample {
    let mut req = vec![0u8; payload_len];
    let mut resp = vec![0u8; payload_len];
    let mut sent = 0u64;
    let mut done = 0u64;
    let mut tickets = std::collections::HashMap::with_capacity(PIPELINE_DEPTH);
    let start = now_ns();
    while done < count {
        while sent < count && tickets.len() < PIPELINE_DEPTH {
            req[..8].copy_from_slice(&sent.to_le_bytes());
            match client.send_vectored(cmd::ECHO, &[IoSlice::new(&req)], Some(Duration::from_secs(10))) {
                Ok(t) => {
                    tickets.insert(t, sent);
                    sent += 1;
                }
                Err(Error::TryAgain) => break,
                Err(e) => panic!("pipelined send: {e}"),
            }
        }
        let (ticket, result) =
            client.wait_any(&mut resp, Some(Duration::from_secs(10))).expect("pipelined wait");
        let n = result.expect("pipelined response");
        assert_eq!(n, payload_len);
        let seq = tickets.remove(&ticket).expect("a ticket we sent");
        check_seq(&resp, seq, "pipelined response matches its request");
        done += 1;
    }
    Sample::new(None, count, 0, start, now_ns())
}
