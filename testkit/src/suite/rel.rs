//! The reliability and security suite's test server and client children.
//!
//! **Real processes.** The server under test always runs in a child
//! process: the test binary re-executes itself
//! ([`std::env::current_exe`]) running the `#[ignore]`d entry point
//! [`SERVER_HELPER`] (or, for clients that get killed or misbehave,
//! [`CLIENT_HELPER`]), put into the binary by
//! [`rel_children!`](crate::rel_children), with `--ignored --exact <helper>
//! --nocapture --test-threads=1`; the role comes in `REL_*` environment
//! variables.
//! Children print `@@MARKER key=value …` lines that the parent waits for
//! ([`ChildProc::expect`]); they exit when their stdin closes, and
//! [`ChildProc`] SIGKILLs and reaps on drop, so nothing is left behind.
//! The test process itself is a third process: most tests use it as a
//! well-behaved client.
//!
//! **The server child** runs a real `coroipc_server::Server` (built-in
//! loop on its own thread) with five services — [`SVC_REL`] (the command
//! set below), [`SVC_OTHER`] (echo only), [`SVC_PRIV`] (refused by the
//! authentication callback) — and answers control lines on stdin: `res`
//! (its own descriptors, segment mappings, `RssShmem`, `RssAnon`, threads,
//! CPU time, connections), `stats`, `shutdown_service <id>`,
//! `pause <id> <0|1>`, `release` (lets go of the handles [`CMD_HOLD`]
//! kept). It measures itself from `/proc/self`, so the numbers are the
//! server's own.

use std::collections::HashMap;
use std::io::{BufRead, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use coroipc_client::{Client, Error, Sizes};
use coroipc_server::{
    Connection, Disconnect, DispatchError, Refusal, Responder, Server, ServerHandle, ServiceBuilder,
};

/// The suite's timeout for anything a well-behaved peer does at once.
pub const T: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// Protocol of the test server
// ---------------------------------------------------------------------------

/// The service under test.
pub const SVC_REL: u16 = 1;
/// An echo-only service (for "other services are not starved").
pub const SVC_OTHER: u16 = 2;
/// A service the authentication callback refuses to everybody.
pub const SVC_PRIV: u16 = 3;

pub use super::CMD_ECHO;
/// Defers and never answers (the `Responder` is parked until exit);
/// reports `@@NEVER id=<conn>`.
pub const CMD_NEVER: u16 = 2;
/// Payload `ms: u32` then data: answers the data `ms` later from another
/// thread.
pub const CMD_LATE: u16 = 3;
/// Payload `ms: u32`: reports `@@SLEEPING id=`, sleeps `ms` *in the event
/// loop*, answers `slept`.
pub const CMD_SLEEP: u16 = 4;
/// Answers `bye`, then disconnects its own connection from inside the
/// handler.
pub const CMD_DISCONNECT_ME: u16 = 5;
/// Payload `n: u32, every: u32`: answers `started`; a thread then
/// dispatches `n` [`DISPATCH_STORM`] messages, every `every`-th one of the
/// maximum size, each carrying its index, retrying every "try again"
/// (alternately with `try_dispatch` and `dispatch_timeout`). Reports
/// `@@STORM_DONE id= sent= again=`.
pub const CMD_STORM: u16 = 6;
/// Payload `len: u32, tag: u64`: one `try_dispatch` of a
/// [`DISPATCH_ONE`] message of `len` bytes in all (header included),
/// payload filled with [`pattern`]`(tag)`. Answers `[outcome, flow]`:
/// outcome 0 sent, 1 "try again", 2 other error; flow 1 if flow control
/// is on after it.
pub const CMD_DISPATCH_ONE: u16 = 7;
/// Defers; a holder thread keeps the `Responder` and a connection clone
/// until the `release` control line, then tries to answer and to
/// dispatch and reports `@@HOLD_RESULT id= respond=<Debug> dispatch=<Debug>`.
/// Reports `@@HOLDING id=` at once.
pub const CMD_HOLD: u16 = 8;
/// Answers this connection's statistics: `dispatched, flow_on, flow_off,
/// requests, responses, retries` (`u64` LE each).
pub const CMD_STATS: u16 = 9;
/// Payload `n: u32`: `try_dispatch`es up to `n` [`DISPATCH_TICKLE`]
/// messages (payload: their own per-connection counter, `u64`), stopping at
/// the first "try again"; answers the number sent (`u32`).
pub const CMD_TICKLE: u16 = 11;

/// Panics in the handler (the call must still be answered, the server must
/// carry on).
pub const CMD_PANIC: u16 = 12;
/// Defers, then panics with the `Responder` still held: unwinding drops it,
/// which must still answer.
pub const CMD_PANIC_DEFERRED: u16 = 13;
/// Payload `code: u32`: `respond_status(Status::Service(code))`; if the
/// server refuses the status, answers the payload `refused` instead.
pub const CMD_STATUS: u16 = 14;
/// Payload `len: u32, ms: u32`: defers and answers `len` bytes `ms` later
/// from another thread (which waits for ring space if the client does not
/// read); reports `@@DEFER_DONE result=`.
pub const CMD_DEFER_NOW: u16 = 15;
/// Panics in the admission callback.
pub const CMD_ADMIT_PANIC: u16 = 16;
/// Makes this connection's disconnect callback panic.
pub const CMD_PANIC_ON_DISCONNECT: u16 = 17;

/// A service whose connect callback panics.
pub const SVC_CONNECT_PANIC: u16 = 4;
/// A service for which the authentication callback panics.
pub const SVC_AUTH_PANIC: u16 = 5;

/// Dispatched by [`SVC_REL`]'s connect callback: the connection id (`u64`).
pub const DISPATCH_WELCOME: u32 = 100;
/// See [`CMD_STORM`].
pub const DISPATCH_STORM: u32 = 101;
/// See [`CMD_DISPATCH_ONE`] and [`CMD_HOLD`].
pub const DISPATCH_ONE: u32 = 102;
/// See [`CMD_TICKLE`].
pub const DISPATCH_TICKLE: u32 = 103;

/// Message header length (`coroipc_transport::message::HEADER_LEN`).
pub const HDR: usize = 16;

pub use crate::{eventually, le_u32, le_u64, mono_ns, u32s, Garbage};

/// A payload of `len` bytes that depends on `tag` in every byte, so a torn,
/// shifted or stale message is caught.
pub fn pattern(tag: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (tag.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8).collect()
}

/// Storm message `i` of a connection whose maximum message is `max`
/// (header included): `u64 i`, `u32 len`, then [`pattern`].
pub fn storm_payload(i: u64, every: u32, max: usize) -> Vec<u8> {
    let len = if every > 0 && i % u64::from(every) == u64::from(every) - 1 {
        max - HDR
    } else {
        12 + (i % 53) as usize
    };
    let mut p = i.to_le_bytes().to_vec();
    p.extend_from_slice(&(len as u32).to_le_bytes());
    p.extend_from_slice(&pattern(i, len - 12));
    p
}

// ---------------------------------------------------------------------------
// Environment of the children
// ---------------------------------------------------------------------------

pub use super::EP;
/// The server's connection limit.
pub const MAX_CONN: &str = "REL_MAX_CONN";
/// How many times the disconnect callback asks to be retried.
pub const RETRY: &str = "REL_RETRY";
/// The server's handshake timeout in ms.
pub const HS_TIMEOUT_MS: &str = "REL_HS_TIMEOUT_MS";
/// The server child lowers its soft descriptor limit to this before it
/// builds the server.
pub const NOFILE: &str = "REL_NOFILE";
/// `total,per_uid` bytes: the server's memory budget.
pub const MEM_BUDGET: &str = "REL_MEM_BUDGET";
/// After the server started, the child takes descriptors until none is
/// left but this many (someone else in the process used them up).
pub const HOG_FDS_LEAVE: &str = "REL_HOG_FDS_LEAVE";
/// Comma-separated command ids: [`SVC_REL`] refuses every other command
/// ("invalid", the handler does not run). For hostile clients whose garbage
/// can form any command id: a random `CMD_HOLD` or `CMD_LATE` would make the
/// service keep a connection handle (and a thread) on purpose, which a
/// resource baseline would then count as a leak.
pub const ONLY_CMDS: &str = "REL_ONLY_CMDS";
/// Sets `max_pending_handshakes`.
pub const MAX_PENDING: &str = "REL_MAX_PENDING";
/// What a client child does (see [`client_process`]).
pub const MODE: &str = "REL_MODE";
/// A free-form argument of the client mode.
pub const ARG: &str = "REL_ARG";

/// The server child's entry point (see [`rel_children!`](crate::rel_children)).
pub const SERVER_HELPER: &str = "rel_server_process";
/// The client child's entry point.
pub const CLIENT_HELPER: &str = "rel_client_process";

/// A fresh abstract endpoint name (nothing in the filesystem).
pub fn endpoint(tag: &str) -> String {
    crate::unique_endpoint("rel", tag)
}

use super::env_num;

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

pub use super::{echo, error_name, is_lost, stats_fields, TestServer};
pub use crate::{field, num, report, ChildProc};

/// Spawns `helper` of this test binary with `envs` (see [`crate::spawn`]).
pub fn spawn_helper(helper: &str, envs: &[(&str, String)]) -> ChildProc {
    crate::spawn(helper, envs)
}

/// Starts the server child (its `@@READY` line carries `pid=`,
/// `max_conns=` and its resources) and waits until it listens.
pub fn start_server(tag: &str, envs: &[(&str, String)]) -> TestServer {
    TestServer::start(SERVER_HELPER, "rel", tag, envs)
}

impl TestServer {
    /// The reliability server's own resource figures (its `res` command).
    pub fn res(&mut self) -> Res {
        Res::parse(&self.proc.command("res", "RES"))
    }

    /// Waits until the server has `conns` connections and its descriptors
    /// and segment mappings equal `base`'s (they are freed asynchronously,
    /// on the server's loop); returns the last measurement.
    pub fn settle_to(&mut self, base: &Res, what: &str) -> Res {
        // Generous: under a loaded CI machine the server's loop may take a
        // while to notice every dead client; a real leak never settles.
        let deadline = Instant::now() + 3 * T;
        loop {
            let now = self.res();
            // A leak is *more* than the baseline; fewer (a descriptor or
            // thread that was transient when the baseline was taken) is not.
            if now.conns == base.conns
                && now.fds <= base.fds
                && now.maps <= base.maps
                && now.threads <= base.threads
            {
                if now.fds != base.fds || now.threads != base.threads {
                    eprintln!("{what}: settled below the baseline: {now:?} vs {base:?}");
                }
                return now;
            }
            assert!(Instant::now() < deadline, "{what}: server resources {now:?}, expected back to {base:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a client child of the reliability suite in `mode` (see
    /// [`client_process`]) with `arg`, against this server.
    pub fn spawn_client(&self, mode: &str, arg: &str) -> ChildProc {
        spawn_helper(CLIENT_HELPER, &[(EP, self.ep.clone()), (MODE, mode.into()), (ARG, arg.into())])
    }
}

/// What the server child reports about itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Res {
    /// Open descriptors.
    pub fds: u64,
    /// Mappings of `memfd:coroipc` segments: count and bytes.
    pub maps: u64,
    /// Bytes of those mappings.
    pub map_bytes: u64,
    /// `RssShmem` in KiB.
    pub shmem_kb: u64,
    /// `RssAnon` in KiB.
    pub anon_kb: u64,
    /// Threads.
    pub threads: u64,
    /// CPU time (user + system) so far, in ms.
    pub cpu_ms: u64,
    /// Open connections.
    pub conns: u64,
}

impl Res {
    /// Reads a `@@RES` line.
    pub fn parse(line: &str) -> Self {
        Self {
            fds: num(line, "fds"),
            maps: num(line, "maps"),
            map_bytes: num(line, "map_bytes"),
            shmem_kb: num(line, "shmem_kb"),
            anon_kb: num(line, "anon_kb"),
            threads: num(line, "threads"),
            cpu_ms: num(line, "cpu_ms"),
            conns: num(line, "conns"),
        }
    }
}

// ---------------------------------------------------------------------------
// Measurements (of the calling process)
// ---------------------------------------------------------------------------

pub use crate::procfs::{cpu_ms, memfd_maps, open_fds, status_field};

/// This process's resource figures as a `@@RES` line ([`Res::parse`]).
pub fn res_line(conns: usize) -> String {
    let (maps, map_bytes) = memfd_maps();
    format!(
        "fds={} maps={maps} map_bytes={map_bytes} shmem_kb={} anon_kb={} threads={} cpu_ms={} conns={conns}",
        open_fds(),
        status_field("RssShmem"),
        status_field("RssAnon"),
        status_field("Threads"),
        cpu_ms()
    )
}

// ---------------------------------------------------------------------------
// The server child
// ---------------------------------------------------------------------------

struct RelState {
    id: u64,
    panic_on_disconnect: bool,
}

/// Process-wide state of the server child.
#[derive(Default)]
struct Globals {
    parked: Mutex<Vec<Responder>>,
    disconnects: Mutex<HashMap<u64, u32>>,
    hold_release: (Mutex<bool>, Condvar),
}

fn globals() -> &'static Globals {
    static G: std::sync::OnceLock<Globals> = std::sync::OnceLock::new();
    G.get_or_init(Globals::default)
}

fn rel_service(retry: u32) -> ServiceBuilder<RelState> {
    let only: Option<Vec<u16>> = std::env::var(ONLY_CMDS)
        .ok()
        .map(|v| v.split(',').map(|c| c.trim().parse().expect("command id")).collect());
    ServiceBuilder::new(SVC_REL, |conn: &Connection| {
        // Dispatch from inside the connect callback.
        let r = conn.try_dispatch(DISPATCH_WELCOME, &conn.id().get().to_le_bytes());
        report("CONNECTED", &format!("id={} welcome={r:?}", conn.id()));
        Ok(RelState { id: conn.id().get(), panic_on_disconnect: false })
    })
    .admission(move |request, _state, _conn| {
        if only.as_ref().is_some_and(|o| !o.contains(&request.command())) {
            return coroipc_server::Admission::Invalid;
        }
        if request.command() == CMD_ADMIT_PANIC {
            panic!("test: admission callback panics");
        }
        coroipc_server::Admission::Allow
    })
    .on_disconnect(move |conn, state| {
        assert_eq!(conn.id().get(), state.id, "the state belongs to its connection");
        if state.panic_on_disconnect {
            report("DISC_PANIC", &format!("id={}", conn.id()));
            panic!("test: disconnect callback panics");
        }
        let mut d = globals().disconnects.lock().unwrap();
        let n = d.entry(conn.id().get()).or_insert(0);
        *n += 1;
        let calls = *n;
        drop(d);
        if calls <= retry {
            report("DISC", &format!("id={} calls={calls} retry=1", conn.id()));
            Disconnect::RetryLater
        } else {
            report("DISC", &format!("id={} calls={calls} retry=0", conn.id()));
            Disconnect::Done
        }
    })
    .handler(CMD_ECHO, |call| {
        let p = call.payload();
        let _ = call.respond(p);
    })
    .handler(CMD_NEVER, |call| {
        report("NEVER", &format!("id={}", call.connection().id()));
        globals().parked.lock().unwrap().push(call.defer());
    })
    .handler(CMD_LATE, |call| {
        let p = call.payload();
        let ms = le_u32(p, 0);
        let data = p[4..].to_vec();
        let r = call.defer();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms.into()));
            let _ = r.respond(&data);
        });
    })
    .handler(CMD_SLEEP, |call| {
        let ms = le_u32(call.payload(), 0);
        report("SLEEPING", &format!("id={}", call.connection().id()));
        std::thread::sleep(Duration::from_millis(ms.into()));
        let _ = call.respond(b"slept");
    })
    .handler(CMD_DISCONNECT_ME, |call| {
        let conn = call.connection().clone();
        let r = call.respond(b"bye");
        conn.disconnect();
        report("DISCONNECTED_ME", &format!("id={} respond={r:?}", conn.id()));
    })
    .handler(CMD_STORM, |call| {
        let p = call.payload();
        let (n, every) = (le_u32(p, 0), le_u32(p, 4));
        let conn = call.connection().clone();
        let _ = call.respond(b"started");
        std::thread::spawn(move || storm(conn, n, every));
    })
    .handler(CMD_DISPATCH_ONE, |call| {
        let p = call.payload();
        let (len, tag) = (le_u32(p, 0) as usize, le_u64(p, 4));
        let conn = call.connection();
        let outcome = match conn.try_dispatch(DISPATCH_ONE, &pattern(tag, len - HDR)) {
            Ok(()) => 0u8,
            Err(DispatchError::TryAgain) => 1,
            Err(_) => 2,
        };
        let flow = u8::from(conn.dispatch_flow_control() == coroipc_server::FlowState::On);
        let _ = call.respond(&[outcome, flow]);
    })
    .handler(CMD_HOLD, |call| {
        let conn = call.connection().clone();
        let r = call.defer();
        report("HOLDING", &format!("id={}", conn.id()));
        std::thread::spawn(move || {
            let (m, cv) = &globals().hold_release;
            let mut go = m.lock().unwrap();
            while !*go {
                go = cv.wait(go).unwrap();
            }
            drop(go);
            let respond = r.respond(b"late");
            let dispatch = conn.try_dispatch(DISPATCH_ONE, b"late");
            report(
                "HOLD_RESULT",
                &format!(
                    "id={} respond={respond:?} dispatch={dispatch:?} connected={}",
                    conn.id(),
                    conn.is_connected()
                ),
            );
        });
    })
    .handler(CMD_PANIC, |_call| panic!("test: handler panics"))
    .handler(CMD_PANIC_DEFERRED, |call| {
        let _responder = call.defer();
        panic!("test: handler panics holding a responder");
    })
    .handler(CMD_STATUS, |call| {
        let code = le_u32(call.payload(), 0);
        let conn = call.connection().clone();
        match call.respond_status(coroipc_server::Status::Service(code)) {
            Ok(()) => {}
            Err(e) => report("STATUS_REFUSED", &format!("id={} code={code} err={e:?}", conn.id())),
        }
    })
    .handler(CMD_DEFER_NOW, |call| {
        let len = le_u32(call.payload(), 0) as usize;
        let ms = le_u32(call.payload(), 4);
        let r = call.defer();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms.into()));
            let res = r.respond(&vec![7u8; len]);
            report("DEFER_DONE", &format!("result={res:?}"));
        });
    })
    .handler(CMD_PANIC_ON_DISCONNECT, |mut call| {
        call.state().panic_on_disconnect = true;
        let _ = call.respond(b"armed");
    })
    .handler(CMD_STATS, |call| {
        let s = call.connection().stats();
        let v = [s.dispatched, s.flow_control_on, s.flow_control_off, s.requests, s.responses, s.retries];
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let _ = call.respond(&bytes);
    })
    .handler(CMD_TICKLE, |call| {
        let n = le_u32(call.payload(), 0);
        let conn = call.connection().clone();
        let mut sent = 0u32;
        for _ in 0..n {
            let c = conn.stats().dispatched;
            if conn.try_dispatch(DISPATCH_TICKLE, &c.to_le_bytes()).is_err() {
                break;
            }
            sent += 1;
        }
        let _ = call.respond(&sent.to_le_bytes());
    })
}

/// Dispatches `n` storm messages, retrying every "try again".
fn storm(conn: Connection, n: u32, every: u32) {
    let max = conn.max_message();
    let mut again = 0u64;
    let mut sent = 0u64;
    for i in 0..u64::from(n) {
        let p = storm_payload(i, every, max);
        loop {
            let r = if again.is_multiple_of(2) {
                conn.try_dispatch(DISPATCH_STORM, &p)
            } else {
                conn.dispatch_vectored_timeout(DISPATCH_STORM, &[IoSlice::new(&p)], Duration::from_secs(10))
            };
            match r {
                Ok(()) => break,
                Err(DispatchError::TryAgain) | Err(DispatchError::Timeout) => {
                    again += 1;
                    if again.is_multiple_of(2) {
                        std::thread::yield_now();
                    }
                }
                Err(e) => {
                    report("STORM_DONE", &format!("id={} sent={sent} again={again} error={e:?}", conn.id()));
                    return;
                }
            }
        }
        sent += 1;
    }
    report("STORM_DONE", &format!("id={} sent={sent} again={again} error=none", conn.id()));
}

fn other_service() -> ServiceBuilder<()> {
    ServiceBuilder::new(SVC_OTHER, |_| Ok(())).handler(CMD_ECHO, |call| {
        let p = call.payload();
        let _ = call.respond(p);
    })
}

fn connect_panic_service() -> ServiceBuilder<()> {
    ServiceBuilder::new(SVC_CONNECT_PANIC, |_| -> Result<(), Refusal> {
        panic!("test: connect callback panics")
    })
}

fn auth_panic_service() -> ServiceBuilder<()> {
    ServiceBuilder::new(SVC_AUTH_PANIC, |_| Ok(()))
}

fn priv_service() -> ServiceBuilder<()> {
    ServiceBuilder::new(SVC_PRIV, |_| Ok(())).handler(CMD_ECHO, |call| {
        let p = call.payload();
        let _ = call.respond(p);
    })
}

fn handle_control(handle: &ServerHandle, line: &str) {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["res"] => report("RES", &res_line(handle.connections().len())),
        ["stats"] => report("SERVER_STATS", &super::stats_text(&handle.stats())),
        ["shutdown_service", id] => {
            handle.shutdown_service(id.parse().expect("service id"));
            report("OK", "");
        }
        ["pause", id, on] => {
            handle.pause_service(id.parse().expect("service id"), *on == "1");
            report("OK", "");
        }
        ["release"] => {
            let (m, cv) = &globals().hold_release;
            *m.lock().unwrap() = true;
            cv.notify_all();
            report("OK", "");
        }
        _ => report("UNKNOWN", line),
    }
}

/// The server child ([`SERVER_HELPER`]). Does nothing when run without
/// [`EP`].
pub fn server_process() {
    let Ok(ep) = std::env::var(EP) else { return };
    let retry = env_num(RETRY).unwrap_or(0) as u32;
    if let Some(n) = env_num(NOFILE) {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let hard = getrlimit(Resource::Nofile).maximum;
        setrlimit(Resource::Nofile, Rlimit { current: Some(n), maximum: hard }).expect("lower RLIMIT_NOFILE");
    }
    let mut b = Server::builder()
        .endpoint(&ep)
        .service(rel_service(retry))
        .service(other_service())
        .service(priv_service())
        .service(connect_panic_service())
        .service(auth_panic_service())
        .auth(|cred, service| {
            if service == SVC_AUTH_PANIC {
                panic!("test: authentication callback panics");
            }
            if service == SVC_PRIV && cred.uid != 0xfffe_fffe {
                Err(Refusal::AccessDenied)
            } else {
                Ok(())
            }
        });
    if let Some(n) = env_num(MAX_CONN) {
        b = b.max_connections(n as usize);
    }
    if let Some(ms) = env_num(HS_TIMEOUT_MS) {
        b = b.handshake_timeout(Duration::from_millis(ms));
    }
    if let Some(n) = env_num(MAX_PENDING) {
        b = b.max_pending_handshakes(n as usize);
    }
    if let Ok(v) = std::env::var(MEM_BUDGET) {
        let (total, per_uid) = v.split_once(',').expect("total,per_uid");
        b = b.memory_budget(total.parse().expect("total"), per_uid.parse().expect("per uid"));
    }
    let server = b.build().expect("build the server");
    let max_conns = server.max_connections();
    let (handle, _join) = server.spawn().expect("spawn the server loop");
    let line = res_line(0);
    let mut hogged = Vec::new();
    if let Some(leave) = env_num(HOG_FDS_LEAVE) {
        while let Ok(fd) = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC) {
            hogged.push(fd);
        }
        for _ in 0..leave {
            hogged.pop();
        }
    }
    report(
        "READY",
        &format!("pid={} max_conns={max_conns} hogged={} {line}", std::process::id(), hogged.len()),
    );
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        handle_control(&handle, &line);
    }
    handle.shutdown();
    std::process::exit(0);
}

// ---------------------------------------------------------------------------
// The client child
// ---------------------------------------------------------------------------

/// Exits the process when stdin closes (the parent is gone); forwards
/// lines to the returned receiver.
pub fn watch_stdin() -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
        std::process::exit(0);
    });
    rx
}

/// A client mode: what a client child does, given the endpoint, its
/// argument and its stdin lines. Every test file defines
/// `fn client_mode(name: &str) -> Option<ClientMode>` for its own modes
/// and passes it to [`rel_children!`](crate::rel_children).
pub type ClientMode = fn(ep: &str, arg: &str, control: Receiver<String>);

/// The client child ([`CLIENT_HELPER`]): runs mode [`MODE`] — `block`,
/// `flood`, `storm_reader` (below) or one `modes` knows — then stays alive
/// until killed. Does nothing when run without [`EP`] and [`MODE`].
pub fn client_process(modes: fn(&str) -> Option<ClientMode>) {
    let (Ok(ep), Ok(mode)) = (std::env::var(EP), std::env::var(MODE)) else { return };
    let arg = std::env::var(ARG).unwrap_or_default();
    let control = watch_stdin();
    let f = match mode.as_str() {
        "block" => block_mode as ClientMode,
        "flood" => flood_mode,
        "storm_reader" => storm_reader_mode,
        other => modes(other).unwrap_or_else(|| panic!("no client mode {other}")),
    };
    f(&ep, &arg, control);
    // Stay alive until killed or released.
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Connects to [`SVC_REL`] (5 s timeout).
pub fn connect(ep: &str) -> Client {
    Client::connect(ep, SVC_REL).expect("connect to the test server")
}

/// Connects to `service` with `sizes`.
///
/// # Errors
///
/// The connect error.
pub fn connect_with(ep: &str, service: u16, sizes: Sizes) -> Result<Client, Error> {
    Client::builder(ep, service).sizes(sizes).connect()
}

/// The welcome message: returns the connection id.
pub fn welcome(client: &Client) -> u64 {
    let mut buf = [0u8; 64];
    let info = client.recv_dispatch(&mut buf, Some(T)).expect("welcome dispatch");
    assert_eq!((info.id, info.seq, info.len), (DISPATCH_WELCOME, 0, 8), "welcome is dispatch seq 0");
    le_u64(&buf, 0)
}

/// `arg` = command and ms: `sleep:300` or `never`. Reports `@@READY id=`,
/// then blocks in that call and reports `@@RESULT`.
fn block_mode(ep: &str, arg: &str, _control: Receiver<String>) {
    let client = connect(ep);
    let id = welcome(&client);
    report("READY", &format!("id={id} pid={}", std::process::id()));
    let mut buf = [0u8; 64];
    let r = match arg.split_once(':') {
        Some(("sleep", ms)) => client.call(CMD_SLEEP, &u32s(&[ms.parse().unwrap()]), &mut buf),
        _ => client.call(CMD_NEVER, b"", &mut buf),
    };
    report("RESULT", &format!("{r:?}").replace(' ', "_"));
}

/// Echo calls as fast as possible; reports `@@READY id=` after the first.
fn flood_mode(ep: &str, arg: &str, _control: Receiver<String>) {
    let service = if arg == "other" { SVC_OTHER } else { SVC_REL };
    let client = Client::connect(ep, service).expect("connect");
    let id = if service == SVC_REL { welcome(&client) } else { 0 };
    let mut buf = vec![0u8; 256];
    let mut n = 0u64;
    loop {
        let req = n.to_le_bytes();
        let got = client.call(CMD_ECHO, &req, &mut buf).expect("echo");
        assert_eq!(&buf[..got], &req, "echo {n}");
        if n == 0 {
            report("READY", &format!("id={id} pid={}", std::process::id()));
        }
        n += 1;
    }
}

/// Starts a storm (`arg` = `n`) and reads it slowly until killed.
fn storm_reader_mode(ep: &str, arg: &str, _control: Receiver<String>) {
    let client = connect(ep);
    let id = welcome(&client);
    let n: u32 = arg.parse().unwrap_or(100_000);
    let mut buf = [0u8; 16];
    client.call(CMD_STORM, &u32s(&[n, 1000]), &mut buf).expect("start storm");
    let mut big = vec![0u8; client.max_message()];
    let mut got = 0u64;
    loop {
        let info = client.recv_dispatch(&mut big, Some(T)).expect("storm message");
        got += 1;
        if got == 10 {
            report("READY", &format!("id={id} pid={} seq={}", std::process::id(), info.seq));
        }
        if got.is_multiple_of(64) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A counter for unique tags.
pub fn next_tag() -> u64 {
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// Hand-made connections (hostile clients)
// ---------------------------------------------------------------------------

/// A connection made by hand from the transport's parts, bypassing
/// `coroipc_client`: a hostile client holds the raw segment.
pub struct Raw {
    /// The connection's socket.
    pub stream: coroipc_transport::socket::Stream,
    /// The server's reply: negotiated sizes and the segment layout.
    pub accepted: coroipc_transport::handshake::Accepted,
    /// The mapped segment, writable anywhere.
    pub segment: std::sync::Arc<coroipc_transport::segment::Segment>,
    /// The request eventfd (rings the server).
    pub request_bell: coroipc_transport::eventfd::EventFd,
    /// The request ring's producer end.
    pub requests: coroipc_ring::Producer,
    /// The response ring's consumer end.
    pub responses: coroipc_ring::Consumer,
    /// The dispatch ring's consumer end.
    pub dispatch: coroipc_ring::Consumer,
}

/// Connects by hand and completes a well-formed handshake.
pub fn raw_connect(ep: &str, sizes: coroipc_transport::handshake::RingSizes) -> Raw {
    use coroipc_transport::handshake::{ClientHello, ServerReply, REPLY_LEN};
    let ep = coroipc_transport::socket::Endpoint::parse(ep).expect("endpoint");
    let stream = coroipc_transport::socket::Stream::connect(&ep).expect("connect");
    let hello = ClientHello { service: SVC_REL, flags: 0, sizes };
    stream.send_with_fds(&hello.encode(), &[]).expect("send hello");
    let mut reply = [0u8; REPLY_LEN];
    let fds = stream.recv_exact_with_fds(&mut reply, 4).expect("reply");
    let ServerReply::Accepted(accepted) = ServerReply::decode(&reply).expect("reply decodes") else {
        panic!("refused")
    };
    let mut fds = fds.into_iter();
    let segment = std::sync::Arc::new(
        coroipc_transport::segment::Segment::from_fd(fds.next().expect("memfd"), accepted.layout.segment_len)
            .expect("segment"),
    );
    let request_bell =
        coroipc_transport::eventfd::EventFd::from_fd(fds.next().expect("bell")).expect("request eventfd");
    let region: std::sync::Arc<dyn coroipc_ring::Region> = segment.clone();
    let at = |r: coroipc_transport::handshake::Span| (r.offset as usize, r.len as usize);
    let (o, l) = at(accepted.layout.request);
    let requests = coroipc_ring::Producer::attach(region.clone(), o, l).expect("request ring");
    let (o, l) = at(accepted.layout.response);
    let responses = coroipc_ring::Consumer::attach(region.clone(), o, l).expect("response ring");
    let (o, l) = at(accepted.layout.dispatch);
    let dispatch = coroipc_ring::Consumer::attach(region, o, l).expect("dispatch ring");
    Raw { stream, accepted, segment, request_bell, requests, responses, dispatch }
}

/// A request message: header then payload.
pub fn message(command: u16, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut m =
        coroipc_transport::message::MessageHeader { id: u32::from(command), flags: 0, seq }.encode().to_vec();
    m.extend_from_slice(payload);
    m
}

pub use crate::ring_layout::{
    DATA as RING_DATA, DATA_WAIT as RING_DATA_WAIT, FLOW as RING_FLOW, HEAD as RING_HEAD,
    SPACE_WAIT as RING_SPACE_WAIT, TAIL as RING_TAIL,
};
