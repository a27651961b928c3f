//! Reliability of the dispatch channel between real processes: a storm
//! through flow-control transitions, the ring exactly full at the wrap
//! point and records ending exactly at its end, flow control visible in
//! both directions with matching statistics, and a client that never reads
//! its dispatch channel.

use std::io::IoSlice;
use std::time::{Duration, Instant};

use coroipc_client::{Client, Error, FlowState, Sizes};
use coroipc_testkit::suite::rel::*;

coroipc_testkit::rel_children!(client_mode);

fn client_mode(_name: &str) -> Option<ClientMode> {
    None
}

/// This connection's counters on the server: dispatched, flow on, flow
/// off, requests, responses, retries.
fn conn_stats(client: &Client) -> [u64; 6] {
    let mut b = [0u8; 48];
    client.call(CMD_STATS, b"", &mut b).expect("stats");
    std::array::from_fn(|i| le_u64(&b, i * 8))
}

#[test]
fn dispatch_storm_of_30000_messages_through_flow_control_arrives_complete_in_order_and_intact() {
    let mut server = start_server("storm", &[]);
    // A small dispatch ring, so flow control goes on and off many times.
    let sizes = Sizes { dispatch_ring_bytes: 64 << 10, ..Sizes::default() };
    let client = connect_with(&server.ep, SVC_REL, sizes).expect("connect");
    let id = welcome(&client);
    let max = client.max_message();
    const N: u32 = 30_000;
    let mut buf = [0u8; 16];
    client.call(CMD_STORM, &u32s(&[N, 1000]), &mut buf).expect("start the storm");
    let mut msg = vec![0u8; max];
    let (mut saw_on, mut big) = (0u32, 0u32);
    let start = Instant::now();
    for i in 0..u64::from(N) {
        if i % 2500 == 0 {
            // Stop reading for a while: the ring fills and flow control
            // turns on; the storm thread waits or retries.
            std::thread::sleep(Duration::from_millis(15));
            if client.dispatch_flow_control() == FlowState::On {
                saw_on += 1;
            }
        }
        let info = client.recv_dispatch(&mut msg, Some(T)).unwrap_or_else(|e| panic!("message {i}: {e}"));
        assert_eq!((info.id, info.seq), (DISPATCH_STORM, i + 1), "message {i}: in order, none lost");
        let expected = storm_payload(i, 1000, max);
        assert_eq!(info.len, expected.len(), "message {i}: length");
        assert!(msg[..info.len] == expected[..], "message {i}: intact");
        if info.len == max - HDR {
            big += 1;
        }
    }
    eprintln!(
        "{N} dispatch messages ({big} of {max} bytes) in {:?}; flow control seen on {saw_on} times",
        start.elapsed()
    );
    assert_eq!(big, N / 1000, "every 1000th message was of the maximum size");
    assert!(saw_on >= 2, "flow control turned on while the client paused ({saw_on})");
    let done = server.proc.expect_with("STORM_DONE", "id", &id.to_string(), T);
    assert_eq!((num(&done, "sent"), field(&done, "error")), (u64::from(N), "none"), "{done}");
    assert!(matches!(client.try_recv_dispatch(&mut msg), Err(Error::TryAgain)), "nothing more");
    assert_eq!(client.dispatch_flow_control(), FlowState::Off, "drained: flow control off");
    let [dispatched, on, off, ..] = conn_stats(&client);
    eprintln!("server statistics: dispatched {dispatched}, flow control on {on}, off {off}");
    assert_eq!(dispatched, u64::from(N) + 1, "the storm and the welcome");
    assert!(on >= 2, "the server counted the transitions ({on})");
    assert_eq!(on, off, "every 'on' was followed by an 'off'");
}

/// One `try_dispatch` of a `len`-byte message (header included) on the
/// server: (sent, flow control on afterwards).
fn dispatch_one(client: &Client, len: usize, tag: u64) -> (bool, bool) {
    let mut b = [0u8; 2];
    let mut req = u32s(&[len as u32]);
    req.extend_from_slice(&tag.to_le_bytes());
    client.call(CMD_DISPATCH_ONE, &req, &mut b).expect("dispatch one");
    assert_ne!(b[0], 2, "dispatch of {len} bytes failed");
    (b[0] == 0, b[1] == 1)
}

/// Reads the next dispatch message: must be `tag`'s, `len` bytes long.
fn read_one(client: &Client, seq: &mut u64, len: usize, tag: u64) {
    let mut buf = vec![0u8; 4096];
    let info = client.try_recv_dispatch(&mut buf).expect("a dispatch message is waiting");
    assert_eq!((info.id, info.seq, info.len), (DISPATCH_ONE, *seq, len - HDR), "tag {tag}");
    assert!(buf[..info.len] == pattern(tag, len - HDR)[..], "tag {tag}: intact");
    *seq += 1;
}

#[test]
fn dispatch_ring_exactly_full_at_the_wrap_point_and_records_ending_at_its_end() {
    let server = start_server("wrap", &[]);
    // A 4096-byte dispatch ring; records are 8 bytes of header + the
    // message rounded up to 8, at most half the ring (2048).
    let sizes = Sizes { dispatch_ring_bytes: 4096, max_message_bytes: 2040, ..Sizes::default() };
    let client = connect_with(&server.ep, SVC_REL, sizes).expect("connect");
    assert_eq!(client.sizes().dispatch_ring_bytes, 4096);
    welcome(&client); // a 24-byte message: a 32-byte record at 0..32
    let mut seq = 1;
    let rec = |len: usize| 8 + len.next_multiple_of(8);

    // 32..2080, then a record that ends exactly at the end of the ring
    // (2080..4096) without filling it.
    let last = 4096 - 2080 - 8;
    assert_eq!(rec(2040) + rec(last), 4096 - 32);
    assert_eq!(dispatch_one(&client, 2040, 1), (true, false));
    let (sent, on) = dispatch_one(&client, last, 2);
    assert!(sent && on, "above the high watermark");
    assert_eq!(dispatch_one(&client, 24, 99), (false, true), "flow control refuses more");
    assert_eq!(client.dispatch_flow_control(), FlowState::On, "and the client sees it");
    read_one(&client, &mut seq, 2040, 1);
    read_one(&client, &mut seq, last, 2);
    assert_eq!(client.dispatch_flow_control(), FlowState::Off);

    // Now at the wrap point (4096 ≡ 0): two half-ring records fill the ring
    // exactly, the second ending exactly at its end.
    assert_eq!(dispatch_one(&client, 2040, 3), (true, false));
    assert_eq!(dispatch_one(&client, 2040, 4), (true, true), "the ring is exactly full");
    assert_eq!(dispatch_one(&client, 24, 99), (false, true), "nothing more fits");
    assert_eq!(client.dispatch_flow_control(), FlowState::On);
    read_one(&client, &mut seq, 2040, 3);
    assert_eq!(client.dispatch_flow_control(), FlowState::On, "still above the low watermark");
    read_one(&client, &mut seq, 2040, 4);
    assert_eq!(client.dispatch_flow_control(), FlowState::Off);

    // Padding: 0..1008, 1008..3056, then a record that does not fit the
    // 1040 bytes left wraps behind a padding record; then again exactly
    // full at the wrap point.
    for (len, tag) in [(1000, 5), (2040, 6), (2040, 7), (2040, 8), (1000, 9), (1000, 10)] {
        let (sent, _) = dispatch_one(&client, len, tag);
        assert!(sent, "tag {tag}");
        read_one(&client, &mut seq, len, tag);
    }
    // Many laps at odd sizes, each message read before the next.
    for tag in 11..1011u64 {
        let len = 24 + (tag as usize * 37) % (2040 - 24);
        assert!(dispatch_one(&client, len, tag).0, "tag {tag}");
        read_one(&client, &mut seq, len, tag);
    }
    let mut buf = [0u8; 64];
    assert!(matches!(client.try_recv_dispatch(&mut buf), Err(Error::TryAgain)));
}

#[test]
fn flow_control_is_visible_to_clients_in_both_directions_and_matches_the_statistics() {
    let mut server = start_server("flow", &[]);
    let sizes = Sizes { dispatch_ring_bytes: 4096, max_message_bytes: 512, ..Sizes::default() };
    let client = connect_with(&server.ep, SVC_REL, sizes).expect("connect");
    welcome(&client);
    let mut seq = 1;
    // Dispatch direction, three times over.
    for round in 1..=3u64 {
        let mut tags = Vec::new();
        loop {
            let tag = round * 1000 + tags.len() as u64;
            let (sent, on) = dispatch_one(&client, 512, tag);
            if !sent {
                assert!(on, "refused only under flow control");
                break;
            }
            tags.push(tag);
        }
        assert_eq!(client.dispatch_flow_control(), FlowState::On, "round {round}: the client sees it on");
        let [_, on, off, _, _, retries] = conn_stats(&client);
        assert_eq!((on, off), (round, round - 1), "round {round}: counted on, not yet off");
        assert!(retries >= round, "the refused dispatch counts as a retry");
        for tag in tags {
            read_one(&client, &mut seq, 512, tag);
        }
        assert_eq!(client.dispatch_flow_control(), FlowState::Off, "round {round}: off once drained");
        let [_, on, off, ..] = conn_stats(&client);
        assert_eq!((on, off), (round, round), "round {round}: the server counted the 'off'");
    }
    let all = server.stats();
    assert_eq!((num(&all, "flow_on"), num(&all, "flow_off")), (3, 3), "server-wide: {all}");

    // Request direction: the service is paused.
    server.proc.command(&format!("pause {SVC_REL} 1"), "OK");
    assert!(eventually(T, || client.request_flow_control() == FlowState::On), "the client sees the pause");
    assert!(matches!(
        client.send_vectored(CMD_ECHO, &[IoSlice::new(b"x")], Some(Duration::ZERO)),
        Err(Error::TryAgain)
    ));
    let mut buf = [0u8; 16];
    let r = client.call_timeout(CMD_ECHO, &[IoSlice::new(b"x")], &mut buf, Some(Duration::from_millis(100)));
    assert!(matches!(r, Err(Error::Timeout)), "{r:?}");
    // Another service is not paused.
    let other = Client::connect(&server.ep, SVC_OTHER).expect("connect");
    echo(&other, b"other service");
    server.proc.command(&format!("pause {SVC_REL} 0"), "OK");
    assert!(eventually(T, || client.request_flow_control() == FlowState::Off), "the client sees the resume");
    echo(&client, b"resumed");
}

#[test]
fn a_client_that_never_reads_its_dispatch_channel_cannot_block_the_server_or_grow_it() {
    let mut server = start_server("noread", &[]);
    let base = server.res();
    let sleeper = connect(&server.ep);
    let id = welcome(&sleeper);
    let mut buf = [0u8; 16];
    sleeper.call(CMD_STORM, &u32s(&[1_000_000, 1000]), &mut buf).expect("start a storm");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sleeper.dispatch_flow_control(), FlowState::On, "its ring filled up");
    let a = server.res();
    // The loop keeps answering: the sleeper's own requests, and others.
    let start = Instant::now();
    for tag in 0..50 {
        let mut b = [0u8; 2];
        let mut req = u32s(&[64]);
        req.extend_from_slice(&(tag as u64).to_le_bytes());
        sleeper.call(CMD_DISPATCH_ONE, &req, &mut b).expect("dispatch one");
        assert_eq!(b, [1, 1], "refused at once with 'try again'");
        let c = Client::connect(&server.ep, SVC_OTHER).expect("connect");
        echo(&c, b"served");
    }
    let took = start.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let b = server.res();
    eprintln!("50 refused dispatches + 50 connects beside a non-reader: {took:?}; server {a:?} → {b:?}");
    assert!(took < Duration::from_secs(5), "the server was held up: {took:?}");
    assert!(b.anon_kb < a.anon_kb + 2048, "the server's heap grew from {} to {} kB", a.anon_kb, b.anon_kb);
    assert!(b.shmem_kb <= a.shmem_kb + 256, "shared memory grew from {} to {} kB", a.shmem_kb, b.shmem_kb);
    let cpu = b.cpu_ms - a.cpu_ms;
    assert!(cpu < 1000, "the server burnt {cpu} ms of CPU waiting for a non-reader");
    drop(sleeper);
    let done = server.proc.expect_with("STORM_DONE", "id", &id.to_string(), T);
    assert_eq!(field(&done, "error"), "Disconnected", "{done}");
    server.settle_to(&base, "after the non-reader left");
}
