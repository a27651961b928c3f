//! The API suite's test server and client children.
//!
//! **Self re-exec.** Every test runs the server (and, where it matters,
//! clients) in separate processes: the test binary spawns itself
//! ([`std::env::current_exe`]) running one `#[ignore]`d entry point —
//! [`SERVER_HELPER`] or [`CLIENT_HELPER`], put into the binary by
//! [`api_children!`](crate::api_children) — with
//! `--ignored --exact <name> --nocapture --test-threads=1`, and gives it its
//! configuration in environment variables ([`EP`], [`LOOP`], …). Children
//! report on stdout in lines containing `@@MARKER key=value …` (libtest's
//! own output shares the stream, so markers are searched anywhere in a
//! line); the parent waits for them with timeouts ([`ChildProc::expect`]).
//! A child exits when its stdin closes, so a parent that dies leaves no
//! orphan, and [`ChildProc`] kills (SIGKILL) and reaps on drop.
//!
//! **The test server** ([`server_process`]) is a real
//! `coroipc_server::Server` with five services (see the `SVC_*` and `CMD_*`
//! constants), an authentication callback, optional limits, and a control
//! channel on stdin (`stats`, `conn_stats <id>`, `conns`, `disconnect <id>`,
//! `pause_service <svc> <0|1>`, `shutdown_service <svc>`, `shutdown`) served
//! by a thread through a `ServerHandle`. It runs either the built-in loop
//! or a hand-rolled `poll(2)` loop ([`PollLoop`]) — the foreign-loop
//! integration.

use std::io::{BufRead, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coroipc_client::{Client, Sizes};
use coroipc_server::{
    Admission, Call, Connection, Disconnect, DispatchError, FlowState, Handler, Poller, Refusal, Responder,
    Server, ServerHandle, ServiceBuilder, Status, Token,
};
use rustix::event::{poll, PollFd, PollFlags, Timespec};

// ---------------------------------------------------------------------------
// The test server's protocol
// ---------------------------------------------------------------------------

/// The main service: echo and friends; its connect callback dispatches a
/// [`DISPATCH_WELCOME`] carrying the connection id.
pub const SVC_ECHO: u16 = 1;
/// A shared counter: [`CMD_INCREMENT`] dispatches the new value to every
/// connected client of the service.
pub const SVC_COUNTER: u16 = 2;
/// A service with a user-defined selector: even commands echo, odd ones
/// have no handler.
pub const SVC_SELECTOR: u16 = 3;
/// A service whose connect callback refuses everybody.
pub const SVC_REFUSE: u16 = 4;
/// A service the authentication callback opens only to [`PRIVILEGED_UID`],
/// which no test runs as.
pub const SVC_PRIVILEGED: u16 = 5;
/// A service id the server does not offer.
pub const SVC_ABSENT: u16 = 77;
/// The only uid [`SVC_PRIVILEGED`] admits.
pub const PRIVILEGED_UID: u32 = 0xfffe_fffe;

pub use super::CMD_ECHO;
/// Answers `<` payload `>` through `respond_vectored` (three slices).
pub const CMD_ECHO_IOV: u16 = 1;
/// Bumps the connection's private counter; answers it (`u64` LE).
pub const CMD_COUNT: u16 = 2;
/// Payload `ms: u32 LE` then data: `Call::defer`s; another thread, holding
/// a clone of the connection, waits `ms`, dispatches [`DISPATCH_LATE`]
/// with the data, then answers with the data through the `Responder`.
pub const CMD_DEFER: u16 = 3;
/// Defers; another thread waits until the client has gone, then answers
/// through the `Responder` and reports `@@LATE id=<conn> result=<Debug>`.
pub const CMD_LATE_AFTER_CLOSE: u16 = 4;
/// Answers `bye`, then disconnects its own connection.
pub const CMD_DISCONNECT_ME: u16 = 5;
/// Payload `n: u32, size: u32, threads: u32` (LE): answers `started`, then
/// `threads` threads each dispatch `n` [`DISPATCH_STORM`] messages of
/// `size` bytes (`thread: u32, index: u64`, then filler), retrying every
/// "try again" (alternately `try_dispatch` again and `dispatch_timeout`).
/// When all are sent it reports `@@STORM_DONE id=… sent=… try_again=…
/// saw_flow_on=<0|1>`.
pub const CMD_STORM: u16 = 6;
/// Dispatches [`DISPATCH_IOV`] `[` payload `]` with
/// `try_dispatch_vectored` (three slices), then answers `sent`.
pub const CMD_DISPATCH_IOV: u16 = 7;
/// Never answered: the `Responder` is parked until the server shuts down.
pub const CMD_NEVER: u16 = 8;
/// Payload `ms: u32 LE`: pauses this connection's requests
/// (`Connection::pause_requests`), answers, and resumes them `ms` later.
pub const CMD_PAUSE_ME: u16 = 9;
/// The admission callback answers "try again" (the handler never runs).
pub const CMD_VETO_TRY: u16 = 10;
/// The admission callback answers "invalid" (the handler never runs).
pub const CMD_VETO_INVALID: u16 = 11;
/// Answers `Status::Service(SERVICE_CODE)`.
pub const CMD_SERVICE_ERROR: u16 = 12;
/// Payload `n: u32 LE`: answers `n` bytes of `0xab`.
pub const CMD_BIG: u16 = 13;
/// The handler drops its `Call` without answering.
pub const CMD_FORGET: u16 = 14;
/// No handler has this command id.
pub const CMD_UNKNOWN: u16 = 999;

/// [`SVC_COUNTER`]: increments, dispatches the value to every client,
/// answers the value (`u64` LE).
pub const CMD_INCREMENT: u16 = 0;

/// The service error code [`CMD_SERVICE_ERROR`] answers.
pub const SERVICE_CODE: u32 = Status::SERVICE_BASE + 234;

/// Dispatched by [`SVC_ECHO`]'s connect callback: the connection id.
pub const DISPATCH_WELCOME: u32 = 100;
/// See [`CMD_STORM`].
pub const DISPATCH_STORM: u32 = 101;
/// See [`CMD_DISPATCH_IOV`].
pub const DISPATCH_IOV: u32 = 102;
/// See [`CMD_DEFER`].
pub const DISPATCH_LATE: u32 = 103;
/// [`SVC_COUNTER`]'s notification: the new value (`u64` LE).
pub const DISPATCH_COUNTER: u32 = 200;

pub use crate::{eventually, le_u32, le_u64, u32s};

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

pub use super::EP;
/// `builtin` (default) or `poll`: which loop the test server runs.
pub const LOOP: &str = "COROIPC_TEST_LOOP";
/// The poll loop's tick period in ms (default 10).
pub const TICK_MS: &str = "COROIPC_TEST_TICK_MS";
/// The server's connection limit.
pub const MAX_CONN: &str = "COROIPC_TEST_MAX_CONN";
/// How many times [`SVC_ECHO`]'s disconnect callback asks to be retried.
pub const RETRY_DISCONNECT: &str = "COROIPC_TEST_RETRY_DISCONNECT";
/// What a client child does: `counter-listener`, `blocked-call`, `echo-loop`.
pub const CLIENT_MODE: &str = "COROIPC_TEST_CLIENT_MODE";

/// The server child's entry point (see [`api_children!`](crate::api_children)).
pub const SERVER_HELPER: &str = "test_server_process";
/// The client child's entry point.
pub const CLIENT_HELPER: &str = "test_client_process";

pub use super::{echo, error_name, is_lost, stats_fields, TestServer};
pub use crate::{field, field_opt, num, report, ChildProc};

/// A fresh abstract endpoint name.
pub fn endpoint(tag: &str) -> String {
    crate::unique_endpoint("srv-it", tag)
}

/// Starts a test server child with extra `envs`; waits for `@@READY`.
pub fn start_server(tag: &str, envs: &[(&str, String)]) -> TestServer {
    TestServer::start(SERVER_HELPER, "srv-it", tag, envs)
}

/// Starts a client child in `mode` against `ep`; waits for `@@CLIENT_READY`.
pub fn start_client(mode: &str, ep: &str, envs: &[(&str, String)]) -> ChildProc {
    let mut all = vec![(EP, ep.to_string()), (CLIENT_MODE, mode.to_string())];
    all.extend(envs.iter().cloned());
    let mut proc = crate::spawn(CLIENT_HELPER, &all);
    proc.ready = proc.expect("CLIENT_READY", Duration::from_secs(20));
    proc
}

impl TestServer {
    /// One connection's counters (the API server's `conn_stats` command).
    pub fn conn_stats(&mut self, id: u64) -> String {
        self.proc.command(&format!("conn_stats {id}"), "CONN_STATS")
    }
}

/// Connects to [`SVC_ECHO`] and reads the welcome dispatch; returns the
/// client and its server-side connection id.
pub fn connect_echo(ep: &str) -> (Client, u64) {
    connect_echo_with(ep, Sizes::default())
}

/// [`connect_echo`] with ring sizes.
pub fn connect_echo_with(ep: &str, sizes: Sizes) -> (Client, u64) {
    let client = Client::builder(ep, SVC_ECHO).sizes(sizes).connect().expect("connect to the echo service");
    let mut buf = [0u8; 64];
    let info = client.recv_dispatch(&mut buf, Some(Duration::from_secs(10))).expect("welcome dispatch");
    assert_eq!(info.id, DISPATCH_WELCOME, "the connect callback's dispatch comes first");
    assert_eq!(info.len, 8);
    (client, le_u64(&buf, 0))
}

// ---------------------------------------------------------------------------
// The foreign loop: a hand-rolled poll(2) loop
// ---------------------------------------------------------------------------

/// A [`Poller`] over `poll(2)`: a list of (fd, token). Safe Rust cannot
/// turn a raw fd back into a `BorrowedFd`, so the list keeps a duplicate of
/// each registered descriptor to poll on (same open file description, so
/// the same readiness), and the original's number to find it again.
///
/// The same loop as `server/examples/poll_loop.rs`, which stays a
/// self-contained demonstration; this one is strict where the example is
/// lenient (registering a descriptor twice or deregistering an unknown one
/// is an error), so the tests catch a server that misuses its poller.
#[derive(Debug, Default)]
pub struct PollLoop {
    fds: Vec<(RawFd, OwnedFd, Token)>,
}

impl PollLoop {
    /// Waits up to `timeout` and returns the tokens of ready descriptors.
    pub fn wait(&mut self, timeout: Duration) -> std::io::Result<Vec<Token>> {
        let mut pfds: Vec<PollFd<'_>> =
            self.fds.iter().map(|(_, fd, _)| PollFd::new(fd, PollFlags::IN | PollFlags::RDHUP)).collect();
        let ts = Timespec::try_from(timeout).expect("timeout fits");
        match poll(&mut pfds, Some(&ts)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        let mut ready: Vec<Token> = pfds
            .iter()
            .zip(&self.fds)
            .filter(|(p, _)| !p.revents().is_empty())
            .map(|(_, (_, _, t))| *t)
            .collect();
        ready.dedup();
        Ok(ready)
    }

    /// How many descriptors are registered.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Whether none is registered.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }
}

impl Poller for PollLoop {
    fn register(&mut self, fd: BorrowedFd<'_>, token: Token) -> std::io::Result<()> {
        let raw = fd.as_raw_fd();
        if self.fds.iter().any(|(r, _, _)| *r == raw) {
            return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
        }
        self.fds.push((raw, fd.try_clone_to_owned()?, token));
        Ok(())
    }

    fn modify(&mut self, fd: BorrowedFd<'_>, token: Token) -> std::io::Result<()> {
        let raw = fd.as_raw_fd();
        let entry = self.fds.iter_mut().find(|(r, _, _)| *r == raw).ok_or(std::io::ErrorKind::NotFound)?;
        entry.2 = token;
        Ok(())
    }

    fn deregister(&mut self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        let raw = fd.as_raw_fd();
        let before = self.fds.len();
        self.fds.retain(|(r, _, _)| *r != raw);
        if self.fds.len() == before {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        Ok(())
    }
}

/// Drives `server` from a [`PollLoop`] until it stops: `handle_event` for
/// every ready token, `tick` every `tick`.
pub fn run_poll_loop(mut server: Server, tick: Duration) {
    let mut poller = PollLoop::default();
    server.register(&mut poller).expect("register with the poll loop");
    let mut last_tick = Instant::now();
    while !server.is_stopped() {
        let left = tick.saturating_sub(last_tick.elapsed());
        for token in poller.wait(left).expect("poll") {
            server.handle_event(token, &mut poller);
        }
        if last_tick.elapsed() >= tick {
            last_tick = Instant::now();
            server.tick(&mut poller);
        }
    }
    report("POLL_LOOP_DONE", &format!("registered={}", poller.len()));
}

// ---------------------------------------------------------------------------
// The test server
// ---------------------------------------------------------------------------

/// Per-connection state of [`SVC_ECHO`]; reports its drop.
struct EchoState {
    id: u64,
    count: u64,
    disconnect_tries: u32,
}

impl Drop for EchoState {
    fn drop(&mut self) {
        report("STATE_DROPPED", &format!("id={}", self.id));
    }
}

use super::{env_num, stats_text};

fn echo_service(retry_disconnect: u32, parked: Arc<Mutex<Vec<Responder>>>) -> ServiceBuilder<EchoState> {
    ServiceBuilder::new(SVC_ECHO, |conn: &Connection| {
        report("CONNECT", &format!("id={} service={}", conn.id(), conn.service()));
        conn.try_dispatch(DISPATCH_WELCOME, &conn.id().get().to_le_bytes()).expect("welcome dispatch fits");
        Ok(EchoState { id: conn.id().get(), count: 0, disconnect_tries: 0 })
    })
    .on_disconnect(move |conn, state: &mut EchoState| {
        state.disconnect_tries += 1;
        report("DISCONNECT", &format!("id={} try={}", conn.id(), state.disconnect_tries));
        if state.disconnect_tries <= retry_disconnect {
            Disconnect::RetryLater
        } else {
            report("DISCONNECT_DONE", &format!("id={} tries={}", conn.id(), state.disconnect_tries));
            Disconnect::Done
        }
    })
    .admission(|req, _state, _conn| match req.command() {
        CMD_VETO_TRY => Admission::TryAgain,
        CMD_VETO_INVALID => Admission::Invalid,
        _ => Admission::Allow,
    })
    .handler(CMD_ECHO, |call| {
        let payload = call.payload();
        let _ = call.respond(payload);
    })
    .handler(CMD_ECHO_IOV, |call| {
        let payload = call.payload();
        let _ = call.respond_vectored(&[IoSlice::new(b"<"), IoSlice::new(payload), IoSlice::new(b">")]);
    })
    .handler(CMD_COUNT, |mut call| {
        call.state().count += 1;
        let n = call.state().count;
        let _ = call.respond(&n.to_le_bytes());
    })
    .handler(CMD_DEFER, |call| {
        let payload = call.payload();
        let ms = le_u32(payload, 0);
        let data = payload[4..].to_vec();
        let conn = call.connection().clone(); // coroipcs_refcount_inc
        let responder = call.defer();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms.into()));
            let sent =
                conn.dispatch_vectored_timeout(DISPATCH_LATE, &[IoSlice::new(&data)], Duration::from_secs(5));
            let answered = responder.respond(&data);
            report("DEFERRED", &format!("id={} dispatch={sent:?} respond={answered:?}", conn.id()));
        }); // coroipcs_refcount_dec: the clones drop here
    })
    .handler(CMD_LATE_AFTER_CLOSE, |call| {
        let responder = call.defer();
        report("LATE_PARKED", &format!("id={}", responder.connection().id()));
        std::thread::spawn(move || {
            let conn = responder.connection().clone();
            let gone = eventually(Duration::from_secs(10), || !conn.is_connected());
            let result = responder.respond(b"too late");
            report("LATE", &format!("id={} gone={gone} result={result:?}", conn.id()));
        });
    })
    .handler(CMD_DISCONNECT_ME, |call| {
        let conn = call.connection().clone();
        let _ = call.respond(b"bye");
        conn.disconnect();
    })
    .handler(CMD_STORM, |call| {
        let p = call.payload();
        let (n, size, threads) = (le_u32(p, 0), le_u32(p, 4) as usize, le_u32(p, 8));
        let conn = call.connection().clone();
        let _ = call.respond(b"started");
        std::thread::spawn(move || storm(conn, n, size.max(12), threads));
    })
    .handler(CMD_DISPATCH_IOV, |call| {
        let payload = call.payload();
        let r = call.connection().try_dispatch_vectored(
            DISPATCH_IOV,
            &[IoSlice::new(b"["), IoSlice::new(payload), IoSlice::new(b"]")],
        );
        let _ = call.respond(format!("{r:?}").as_bytes());
    })
    .handler(CMD_NEVER, move |call| {
        parked.lock().unwrap().push(call.defer());
        report("PARKED", "");
    })
    .handler(CMD_PAUSE_ME, |call| {
        let ms = le_u32(call.payload(), 0);
        let conn = call.connection().clone();
        conn.pause_requests(true); // before answering: the client sees it at once
        let _ = call.respond(b"pausing");
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms.into()));
            conn.pause_requests(false);
        });
    })
    .handler(CMD_SERVICE_ERROR, |call| {
        let _ = call.respond_status(Status::Service(SERVICE_CODE));
    })
    .handler(CMD_BIG, |call| {
        let n = le_u32(call.payload(), 0) as usize;
        let r = call.respond(&vec![0xab; n]);
        report("BIG", &format!("n={n} result={r:?}"));
    })
    .handler(CMD_FORGET, |call| drop(call))
}

/// The body of [`CMD_STORM`]'s dispatching threads.
fn storm(conn: Connection, n: u32, size: usize, threads: u32) {
    let try_again = Arc::new(AtomicU64::new(0));
    let saw_flow_on = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (conn, try_again, saw_flow_on) = (conn.clone(), try_again.clone(), saw_flow_on.clone());
            std::thread::spawn(move || {
                let mut msg = vec![0x5a; size];
                msg[..4].copy_from_slice(&t.to_le_bytes());
                for i in 0..u64::from(n) {
                    msg[4..12].copy_from_slice(&i.to_le_bytes());
                    let mut attempt = 0u64;
                    loop {
                        let r = if attempt.is_multiple_of(2) {
                            conn.try_dispatch(DISPATCH_STORM, &msg)
                        } else {
                            conn.dispatch_vectored_timeout(
                                DISPATCH_STORM,
                                &[IoSlice::new(&msg)],
                                Duration::from_secs(10),
                            )
                        };
                        match r {
                            Ok(()) => break,
                            Err(DispatchError::TryAgain) => {
                                try_again.fetch_add(1, Ordering::Relaxed);
                                if conn.dispatch_flow_control() == FlowState::On {
                                    saw_flow_on.store(true, Ordering::Relaxed);
                                }
                                attempt += 1;
                            }
                            Err(e) => {
                                report("STORM_FAILED", &format!("id={} error={e:?}", conn.id()));
                                return;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    report(
        "STORM_DONE",
        &format!(
            "id={} sent={} try_again={} saw_flow_on={}",
            conn.id(),
            u64::from(n) * u64::from(threads),
            try_again.load(Ordering::Relaxed),
            u8::from(saw_flow_on.load(Ordering::Relaxed))
        ),
    );
}

fn counter_service() -> ServiceBuilder<()> {
    let clients: Arc<Mutex<Vec<Connection>>> = Arc::default();
    let value = Arc::new(AtomicU64::new(0));
    let on_connect = clients.clone();
    let on_disconnect = clients.clone();
    ServiceBuilder::new(SVC_COUNTER, move |conn: &Connection| {
        on_connect.lock().unwrap().push(conn.clone());
        Ok(())
    })
    .on_disconnect(move |conn, _: &mut ()| {
        on_disconnect.lock().unwrap().retain(|c| c.id() != conn.id());
        Disconnect::Done
    })
    .handler(CMD_INCREMENT, move |call| {
        let v = value.fetch_add(1, Ordering::SeqCst) + 1;
        let everybody = clients.lock().unwrap().clone();
        for c in everybody {
            let r = c.dispatch_vectored_timeout(
                DISPATCH_COUNTER,
                &[IoSlice::new(&v.to_le_bytes())],
                Duration::from_secs(5),
            );
            if let Err(e) = r {
                report("COUNTER_DISPATCH_FAILED", &format!("id={} error={e:?}", c.id()));
            }
        }
        let _ = call.respond(&v.to_le_bytes());
    })
}

fn selector_service() -> ServiceBuilder<()> {
    let echo: Handler<()> = Arc::new(|call: Call<'_, ()>| {
        let payload = call.payload();
        let _ = call.respond(payload);
    });
    ServiceBuilder::new(SVC_SELECTOR, |_| Ok(()))
        .selector(move |command| (command % 2 == 0).then(|| echo.clone()))
}

fn handle_control(handle: &ServerHandle, line: &str) {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["stats"] => report("SERVER_STATS", &stats_text(&handle.stats())),
        ["conn_stats", id] => match handle.connection(id.parse().expect("connection id")) {
            Some(c) => report("CONN_STATS", &format!("id={} {}", c.id(), stats_text(&c.stats()))),
            None => report("CONN_STATS", "id=none"),
        },
        ["conns"] => {
            let list: Vec<String> = handle
                .connections()
                .iter()
                .map(|c| {
                    let cred = c.credentials();
                    format!("{}:{}:{}:{}", c.id(), c.service(), cred.uid, cred.pid.unwrap_or(0))
                })
                .collect();
            report("CONNS", &format!("n={} list={}", list.len(), list.join(",")));
        }
        ["disconnect", id] => {
            let found =
                handle.connection(id.parse().expect("connection id")).map(|c| c.disconnect()).is_some();
            report("OK", &format!("found={found}"));
        }
        ["pause_service", svc, on] => {
            handle.pause_service(svc.parse().expect("service"), *on == "1");
            report("OK", "");
        }
        ["shutdown_service", svc] => {
            handle.shutdown_service(svc.parse().expect("service"));
            report("OK", "");
        }
        ["shutdown"] => {
            // Acknowledged first: once the loop stops, the main thread
            // reports STOPPED and the process exits, possibly before this
            // thread got to print anything after `shutdown()` (the parent
            // then saw stdout close before OK).
            report("OK", "");
            handle.shutdown();
        }
        _ => report("UNKNOWN_COMMAND", line),
    }
}

/// The test server child ([`SERVER_HELPER`]). Does nothing when run
/// without [`EP`] (a plain `cargo test -- --ignored`).
pub fn server_process() {
    let Ok(ep) = std::env::var(EP) else { return };
    let retry = env_num(RETRY_DISCONNECT).unwrap_or(0) as u32;
    let parked: Arc<Mutex<Vec<Responder>>> = Arc::default();
    let refuse: ServiceBuilder<()> = ServiceBuilder::new(SVC_REFUSE, |conn: &Connection| {
        report("REFUSING", &format!("id={}", conn.id()));
        Err(Refusal::AccessDenied)
    });
    let privileged: ServiceBuilder<()> = ServiceBuilder::new(SVC_PRIVILEGED, |_| Ok(()));
    let mut builder = Server::builder()
        .endpoint(&ep)
        .service(echo_service(retry, parked.clone()))
        .service(counter_service())
        .service(selector_service())
        .service(refuse)
        .service(privileged)
        .auth(|cred, service| {
            report(
                "AUTH",
                &format!("uid={} gid={} pid={} service={service}", cred.uid, cred.gid, cred.pid.unwrap_or(0)),
            );
            if service == SVC_PRIVILEGED && cred.uid != PRIVILEGED_UID {
                return Err(Refusal::AccessDenied);
            }
            Ok(())
        });
    if let Some(n) = env_num(MAX_CONN) {
        builder = builder.max_connections(n as usize);
    }
    let server = builder.build().expect("build the test server");
    let handle = server.handle();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            handle_control(&handle, line.trim());
        }
        // The parent went away.
        std::process::exit(0);
    });
    report("READY", &format!("endpoint={ep} pid={}", std::process::id()));
    match std::env::var(LOOP).as_deref() {
        Ok("poll") => {
            let tick = Duration::from_millis(env_num(TICK_MS).unwrap_or(10));
            run_poll_loop(server, tick);
        }
        _ => server.run().expect("the built-in loop"),
    }
    let still_parked = parked.lock().unwrap().len();
    report("STOPPED", &format!("parked={still_parked}"));
}

// ---------------------------------------------------------------------------
// Client children
// ---------------------------------------------------------------------------

/// A client child ([`CLIENT_HELPER`]). Modes ([`CLIENT_MODE`]):
/// - `counter-listener`: connects to [`SVC_COUNTER`], reports
///   `@@CLIENT_READY`, then every notification as `@@COUNTER value=<v>`;
///   reports `@@LOST error=<name>` when the connection ends.
/// - `blocked-call`: connects to [`SVC_ECHO`], reports `@@CLIENT_READY`,
///   calls [`CMD_NEVER`] and reports `@@CALL_RESULT error=<name> ms=<ms>`.
/// - `echo-loop`: connects to [`SVC_ECHO`], reports `@@CLIENT_READY id=…`,
///   then echoes until killed (`@@ECHOING` after the first 10).
pub fn client_process() {
    let (Ok(ep), Ok(mode)) = (std::env::var(EP), std::env::var(CLIENT_MODE)) else { return };
    std::thread::spawn(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        std::process::exit(0);
    });
    match mode.as_str() {
        "counter-listener" => {
            let client = Client::connect(&ep, SVC_COUNTER).expect("connect to the counter");
            report("CLIENT_READY", &format!("pid={}", std::process::id()));
            let mut buf = [0u8; 64];
            loop {
                match client.recv_dispatch(&mut buf, None) {
                    Ok(info) => {
                        assert_eq!(info.id, DISPATCH_COUNTER);
                        report("COUNTER", &format!("value={}", le_u64(&buf, 0)));
                    }
                    Err(e) => {
                        report("LOST", &format!("error={}", error_name(&e)));
                        return;
                    }
                }
            }
        }
        "blocked-call" => {
            let (client, id) = connect_echo(&ep);
            report("CLIENT_READY", &format!("id={id}"));
            let start = Instant::now();
            let r = client.call(CMD_NEVER, b"", &mut [0u8; 16]);
            let name = match &r {
                Ok(_) => "none".to_string(),
                Err(e) => error_name(e),
            };
            report("CALL_RESULT", &format!("error={name} ms={}", start.elapsed().as_millis()));
        }
        "echo-loop" => {
            let (client, id) = connect_echo(&ep);
            report("CLIENT_READY", &format!("id={id}"));
            for i in 0u64.. {
                echo(&client, &i.to_le_bytes());
                if i == 10 {
                    report("ECHOING", "");
                }
            }
        }
        other => panic!("unknown client mode {other}"),
    }
}

/// Asserts the dispatch fd of `client` is (or is not) readable within `timeout`.
pub fn fd_readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut pfd = [PollFd::new(&fd, PollFlags::IN)];
    let ts = Timespec::try_from(timeout).expect("timeout fits");
    matches!(poll(&mut pfd, Some(&ts)), Ok(n) if n > 0)
}

/// The dispatch fd of a client.
pub fn dispatch_fd(client: &Client) -> BorrowedFd<'_> {
    client.as_fd()
}
