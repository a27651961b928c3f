//! The server at its resource limits, between real processes: a flood of
//! handshakes that never finish, a low descriptor limit, descriptors used
//! up by someone else in the process, and the memory budget. In each case
//! the server refuses politely (a typed refusal the client sees as a clear
//! error), never spins, and goes on serving honest clients.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use coroipc_client::{Client, Error};
use coroipc_testkit::suite::rel::*;

coroipc_testkit::rel_children!(client_mode);

fn client_mode(_name: &str) -> Option<ClientMode> {
    None
}

/// CPU time (user + system) of process `pid` so far, in ms, from
/// `/proc/<pid>/stat` (clock ticks of 10 ms).
fn proc_cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("server stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5) are the 12th and 13th after the comm.
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) * 10
}

/// The server's CPU time over `window`.
fn cpu_over(pid: u32, window: Duration) -> u64 {
    let a = proc_cpu_ms(pid);
    std::thread::sleep(window);
    proc_cpu_ms(pid) - a
}

/// A connection that never sends its hello: a non-blocking connect, so a
/// full listen queue skips it instead of blocking the test.
fn half_open(ep: &str) -> Option<OwnedFd> {
    use rustix::net::{connect, socket_with, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let name = ep.strip_prefix('@').expect("an abstract endpoint");
    let addr = SocketAddrUnix::new_abstract_name(name.as_bytes()).expect("address");
    let fd = socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
    .expect("socket");
    connect(&fd, &addr).ok().map(|()| fd)
}

fn connect_other(ep: &str) -> Result<Client, Error> {
    Client::builder(ep, SVC_OTHER).timeout(T).connect()
}

fn other_echo(client: &Client, payload: &[u8]) {
    let mut buf = vec![0u8; payload.len() + 16];
    let n = client.call(CMD_ECHO, payload, &mut buf).expect("echo");
    assert_eq!(&buf[..n], payload);
}

#[test]
fn a_flood_of_half_open_connects_at_a_low_descriptor_limit_neither_spins_nor_locks_out_honest_clients() {
    let server = start_server("halfopen", &[(NOFILE, "128".into())]);
    let pid = server.proc.pid();
    let ready = server.ready.clone();
    eprintln!("server: {ready}");
    // Ten times the server's descriptor limit of clients that never say
    // hello (the listen queue takes what the server does not).
    let flood: Vec<OwnedFd> = (0..1280).filter_map(|_| half_open(&server.ep)).collect();
    eprintln!("{} half-open connections", flood.len());
    std::thread::sleep(Duration::from_millis(200));
    let cpu = cpu_over(pid, Duration::from_secs(2));
    eprintln!("server CPU beside the flood: {cpu} ms in 2 s");
    // A spinning loop uses 1000 to 2000 ms (one or two threads); an idle
    // one a few. CPU time, not wall time: a loaded machine does not
    // inflate it.
    assert!(cpu < 500, "the server spun beside a flood of half-open connects: {cpu} ms of CPU in 2 s");
    // Honest clients still connect and are served, flood or not.
    for i in 0..5u8 {
        let c =
            connect_other(&server.ep).unwrap_or_else(|e| panic!("honest client {i} beside the flood: {e}"));
        other_echo(&c, &[i; 32]);
    }
    let more: Vec<OwnedFd> = (0..300).filter_map(|_| half_open(&server.ep)).collect();
    let c = connect_other(&server.ep).expect("an honest client after a second wave");
    other_echo(&c, b"served");
    drop((flood, more));
}

#[test]
fn at_the_descriptor_limit_a_new_client_is_refused_with_connection_limit() {
    let server = start_server("fdlimit", &[(NOFILE, "128".into())]);
    let ready = server.ready.clone();
    let mut clients = Vec::new();
    let refusal = loop {
        assert!(clients.len() < 128, "128 connections at a limit of 128 descriptors, none refused");
        match connect_other(&server.ep) {
            Ok(c) => clients.push(c),
            Err(e) => break e,
        }
    };
    eprintln!("{} connections, then {refusal:?} ({ready})", clients.len());
    assert!(matches!(refusal, Error::ConnectionLimit), "the client past the limit is told so: {refusal:?}");
    assert!(!clients.is_empty(), "some clients fit");
    if let Some(max) = coroipc_testkit::field_opt(&ready, "max_conns") {
        assert_eq!(clients.len().to_string(), max, "the limit is the one the server computed");
    }
    // Every connection works, and one closing makes room for another.
    for (i, c) in clients.iter().enumerate() {
        other_echo(c, &(i as u64).to_le_bytes());
    }
    clients.pop();
    assert!(
        eventually(T, || match connect_other(&server.ep) {
            Ok(c) => {
                clients.push(c);
                true
            }
            Err(Error::ConnectionLimit) => false,
            Err(e) => panic!("not a typed refusal: {e:?}"),
        }),
        "a closed connection makes room"
    );
}

#[test]
fn out_of_descriptors_the_server_refuses_politely_and_does_not_spin() {
    // Someone else in the server process took every descriptor left.
    let server = start_server("emfile", &[(HOG_FDS_LEAVE, "0".into())]);
    let pid = server.proc.pid();
    let ready = server.ready.clone();
    eprintln!("server: {ready}");
    let flood: Vec<OwnedFd> = (0..300).filter_map(|_| half_open(&server.ep)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let cpu = cpu_over(pid, Duration::from_secs(2));
    eprintln!("server CPU out of descriptors, {} half-open connections: {cpu} ms in 2 s", flood.len());
    assert!(cpu < 500, "the server spun out of descriptors: {cpu} ms of CPU in 2 s");
    for i in 0..5 {
        let t = Instant::now();
        let r = connect_other(&server.ep);
        assert!(
            matches!(r, Err(Error::ConnectionLimit)),
            "client {i} out of descriptors is told \"connection limit\": {r:?} after {:?}",
            t.elapsed()
        );
    }
    drop(flood);
}

/// Connects to [`SVC_OTHER`] until refused (at most `max`); returns the
/// clients and the refusal.
fn fill(ep: &str, max: usize) -> (Vec<Client>, Option<Error>) {
    let mut clients = Vec::new();
    while clients.len() < max {
        match connect_other(ep) {
            Ok(c) => clients.push(c),
            Err(e) => return (clients, Some(e)),
        }
    }
    (clients, None)
}

#[test]
fn the_memory_budget_refuses_the_connection_that_would_exceed_it_and_closing_gives_it_back() {
    // A connection with the default sizes takes a little over 1 MiB; a
    // budget of 4 MB holds three. Once as the total, once per uid.
    for budget in ["4000000,1000000000", "1000000000,4000000"] {
        let server = start_server("membudget", &[(MEM_BUDGET, budget.into())]);
        let (mut clients, refusal) = fill(&server.ep, 20);
        eprintln!("budget {budget}: {} connections, then {refusal:?}", clients.len());
        assert!(
            matches!(refusal, Some(Error::NoMemory)),
            "budget {budget}: refused with NoMemory: {refusal:?}"
        );
        assert_eq!(clients.len(), 3, "budget {budget}: three connections of ~1.1 MiB fit in 4 MB");
        for c in &clients {
            other_echo(c, b"still served");
        }
        // Smaller rings still fit where the default ones do not.
        let small = coroipc_client::Sizes {
            request_ring_bytes: 4096,
            response_ring_bytes: 4096,
            dispatch_ring_bytes: 4096,
            max_message_bytes: 1024,
        };
        let c = Client::builder(&server.ep, SVC_OTHER).sizes(small).timeout(T).connect();
        let c = c.unwrap_or_else(|e| panic!("budget {budget}: a small connection still fits: {e:?}"));
        other_echo(&c, b"small");
        drop(c);
        // Closing gives the budget back.
        clients.pop();
        assert!(
            eventually(T, || match connect_other(&server.ep) {
                Ok(c) => {
                    clients.push(c);
                    true
                }
                Err(Error::NoMemory) => false,
                Err(e) => panic!("budget {budget}: not the budget refusal: {e:?}"),
            }),
            "budget {budget}: a closed connection gives its memory back"
        );
        assert!(matches!(connect_other(&server.ep), Err(Error::NoMemory)), "budget {budget}: full again");
    }
}
