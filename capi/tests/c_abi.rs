//! The C ABI tested the way C programs meet it: `capi/link.sh` turns this
//! crate's static library into `libcoroipcs.so.4` and `libcoroipcc.so.4`,
//! `cc` compiles the C programs of `tests/c/` against
//! `include/corosync/*.h` and links them to those libraries, and the
//! tests run them as separate processes (a miniature executive,
//! `test_server.c`, and `test_client.c`, which checks every function).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

const DEADLINE: Duration = Duration::from_secs(20);

/// The built libraries and programs.
struct Built {
    lib: PathBuf,
    bin: PathBuf,
}

fn built() -> &'static Built {
    static B: OnceLock<Built> = OnceLock::new();
    B.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
        // The test binary is target/<profile>/deps/c_abi-*; cargo built the
        // static library beside it as deps/libcoroipc_capi-*.a (the newest
        // is this build's: `cargo test` does not refresh the copy in
        // target/<profile>/).
        let exe = std::env::current_exe().expect("test exe");
        let deps = exe.parent().expect("deps dir");
        let archive = std::fs::read_dir(deps)
            .expect("deps")
            .filter_map(|e| e.ok())
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("libcoroipc_capi-") && n.ends_with(".a")
            })
            .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
            .expect("libcoroipc_capi-*.a next to the test binary")
            .path();
        let out = deps.parent().expect("profile dir").join("capi-test");
        let lib = out.join("lib");
        let bin = out.join("bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        run(Command::new(root.join("capi/link.sh")).arg(&archive).arg(&lib));
        let include = root.join("include");
        let c = root.join("capi/tests/c");
        for (prog, side, extra) in
            [("test_server", "coroipcs", "-rdynamic"), ("test_client", "coroipcc", "-O1")]
        {
            run(Command::new("cc")
                .args(["-O1", "-Wall", "-Wextra", "-Werror", extra, "-I"])
                .arg(&include)
                .arg("-o")
                .arg(bin.join(prog))
                .arg(c.join(format!("{prog}.c")))
                .arg(format!("-L{}", lib.display()))
                .arg(format!("-l{side}"))
                .arg("-lpthread"));
        }
        Built { lib, bin }
    })
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A child process whose stdout lines arrive through a channel; killed
/// with SIGKILL when dropped.
struct Proc {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn spawn(prog: &str, args: &[&str]) -> Proc {
        let b = built();
        let mut child = Command::new(b.bin.join(prog))
            .args(args)
            .env("LD_LIBRARY_PATH", &b.lib)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{prog}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines, seen: Vec::new() }
    }

    /// The next line starting with `prefix`, within the deadline.
    fn expect(&mut self, prefix: &str) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => panic!("no {prefix:?} line; saw:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(self.child.id() as i32).expect("pid");
        kill_process(pid, sig).expect("kill");
    }

    fn wait(&mut self) -> ExitStatus {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(Instant::now() < end, "child did not exit; saw:\n{}", self.seen.join("\n"));
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every remaining line (after the process exited).
    fn rest(&mut self) -> Vec<String> {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        self.seen.clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SIGKILL: Signal = Signal::KILL;
const SIGTERM: Signal = Signal::TERM;
const POLLIN: u64 = 1;

fn socket_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("capi-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

fn server(name: &str) -> Proc {
    let mut s = Proc::spawn("test_server", &[name]);
    let poll = s.expect("POLL");
    assert_eq!(poll, "POLL unused accept=0 dispatch=-1", "no descriptor for the executive's loop");
    s.expect("READY");
    s
}

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .parse()
        .expect("number")
}

fn objdump_t(lib: &Path) -> Vec<(String, String)> {
    let out = Command::new("objdump").arg("-T").arg(lib).output().expect("objdump");
    assert!(out.status.success());
    // Defined global symbols: "ADDR g  DF .text SIZE  VERSION  NAME".
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" g ") && !l.contains("*UND*") && !l.contains("*ABS*"))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let name = w[w.len() - 1].to_owned();
            let version = w[w.len() - 2].trim_matches(|c| c == '(' || c == ')').to_owned();
            (name, version)
        })
        .collect()
}

fn soname(lib: &Path) -> String {
    let out = Command::new("readelf").arg("-d").arg(lib).output().expect("readelf");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("(SONAME)")).expect("SONAME").to_owned();
    line.split('[').nth(1).and_then(|r| r.split(']').next()).expect("name").to_owned()
}

#[test]
fn libraries_export_exactly_the_coroipc_abi_with_sonames_and_versions() {
    let b = built();
    let client = b.lib.join("libcoroipcc.so.4");
    let server = b.lib.join("libcoroipcs.so.4");
    assert_eq!(soname(&client), "libcoroipcc.so.4");
    assert_eq!(soname(&server), "libcoroipcs.so.4");

    let mut c = objdump_t(&client);
    c.sort();
    let versioned = [
        "coroipcc_dispatch_flow_control_get",
        "coroipcc_fd_get",
        "coroipcc_msg_send_reply_receive",
        "coroipcc_service_connect",
        "coroipcc_service_disconnect",
        "coroipcc_zcb_alloc",
        "coroipcc_zcb_free",
        "coroipcc_zcb_msg_send_reply_receive",
    ];
    let base = [
        "coroipcc_dispatch_get",
        "coroipcc_dispatch_put",
        "coroipcc_msg_send_reply_receive_in_buf_get",
        "coroipcc_msg_send_reply_receive_in_buf_put",
    ];
    let mut want: Vec<(String, String)> = versioned
        .iter()
        .map(|n| (n.to_string(), "COROSYNC_COROIPCC_3.0".to_string()))
        .chain(base.iter().map(|n| (n.to_string(), "Base".to_string())))
        .collect();
    want.sort();
    assert_eq!(c, want, "libcoroipcc.so.4 exports exactly the 12 functions, 8 in COROSYNC_COROIPCC_3.0");

    let mut s: Vec<String> = objdump_t(&server)
        .into_iter()
        .map(|(n, v)| {
            assert!(v == "Base" || v.is_empty(), "{n} is versioned {v}: the original has no version nodes");
            n
        })
        .collect();
    s.sort();
    let mut want: Vec<String> = [
        "conn_info_exit_list_head",
        "conn_info_list_head",
        "coroipcs_dispatch_iov_send",
        "coroipcs_dispatch_send",
        "coroipcs_handler_accept",
        "coroipcs_handler_dispatch",
        "coroipcs_ipc_exit",
        "coroipcs_ipc_init",
        "coroipcs_ipc_init_v2",
        "coroipcs_ipc_service_exit",
        "coroipcs_private_data_get",
        "coroipcs_refcount_dec",
        "coroipcs_refcount_inc",
        "coroipcs_response_iov_send",
        "coroipcs_response_send",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    want.sort();
    assert_eq!(s, want, "libcoroipcs.so.4 exports exactly the coroipcs ABI");
}

#[test]
fn c_client_exercises_every_function_against_a_c_executive() {
    let name = socket_name();
    let mut srv = server(&name);
    let mut client = Proc::spawn("test_client", &["all", &name]);
    let done = client.expect("DONE");
    let status = client.wait();
    let lines = client.rest();
    let failed: Vec<&String> = lines.iter().filter(|l| l.starts_with("FAIL")).collect();
    assert!(failed.is_empty(), "failed checks: {failed:#?}");
    assert_eq!(field(&done, "failures"), 0);
    assert!(status.success(), "test_client: {status}");
    assert!(lines.iter().filter(|l| l.starts_with("PASS")).count() >= 45, "every check ran: {lines:#?}");

    srv.signal(SIGTERM);
    let exit = srv.expect("EXIT ");
    assert_eq!(field(&exit, "lock_violations"), 0, "{exit}");
    assert_eq!(field(&exit, "inits"), field(&exit, "exits"), "every init has its exit: {exit}");
    assert!(srv.wait().success());
}

#[test]
fn sigkilled_client_gets_its_exit_fn_and_the_server_goes_on() {
    let name = socket_name();
    let mut srv = server(&name);
    let mut victim = Proc::spawn("test_client", &["victim", &name]);
    victim.expect("READY");
    victim.signal(SIGKILL);
    let _ = victim.wait();
    // Its connection (with a full dispatch ring, a queue and a zero-copy
    // buffer) is torn down: exit_fn runs.
    srv.expect("EXITFN");
    let mut client = Proc::spawn("test_client", &["all", &name]);
    let done = client.expect("DONE");
    assert_eq!(field(&done, "failures"), 0, "{:#?}", client.rest());
    assert!(client.wait().success());
    srv.signal(SIGTERM);
    let exit = srv.expect("EXIT ");
    assert_eq!(field(&exit, "inits"), field(&exit, "exits"), "{exit}");
    assert!(srv.wait().success());
}

#[test]
fn sigkilled_server_wakes_a_client_blocked_in_dispatch_get() {
    let name = socket_name();
    let mut srv = server(&name);
    let mut holder = Proc::spawn("test_client", &["hold", &name]);
    holder.expect("CONNECTED");
    srv.signal(SIGKILL);
    let _ = srv.wait();
    let gone = holder.expect("GONE");
    assert_eq!(field(&gone, "dispatch"), 2, "dispatch_get: CS_ERR_LIBRARY once the server died: {gone}");
    assert_eq!(field(&gone, "call"), 2, "a call after that: CS_ERR_LIBRARY: {gone}");
    assert_ne!(field(&gone, "revents") & POLLIN, 0, "the dispatch fd reads readable: {gone}");
    assert!(holder.wait().success());
}

#[test]
fn server_shutdown_with_a_live_client_ends_both_cleanly() {
    let name = socket_name();
    let mut srv = server(&name);
    let mut holder = Proc::spawn("test_client", &["hold", &name]);
    holder.expect("CONNECTED");
    srv.signal(SIGTERM);
    let exit = srv.expect("EXIT ");
    assert_eq!(field(&exit, "exits"), 1, "ipc_service_exit ran the live client's exit_fn: {exit}");
    assert!(srv.wait().success());
    let gone = holder.expect("GONE");
    assert_eq!(field(&gone, "dispatch"), 31, "CS_ERR_IN_SHUTDOWN: the server closed the connection: {gone}");
    assert_ne!(field(&gone, "call"), 1, "{gone}");
    assert!(holder.wait().success());
}

#[test]
fn version_1_init_serves_and_ipc_exit_closes_every_connection() {
    let name = socket_name();
    let mut srv = Proc::spawn("test_server", &[&name, "v1"]);
    srv.expect("READY");
    let mut holder = Proc::spawn("test_client", &["hold", &name]);
    holder.expect("CONNECTED");
    srv.signal(SIGTERM);
    let exit = srv.expect("EXIT v1");
    assert_eq!(field(&exit, "exits"), 1, "coroipcs_ipc_exit ran the live connection's exit_fn: {exit}");
    assert_eq!(field(&exit, "lock_violations"), 0, "{exit}");
    let gone = holder.expect("GONE");
    assert_eq!(field(&gone, "dispatch"), 31, "CS_ERR_IN_SHUTDOWN: the server closed the connection: {gone}");
    assert!(srv.wait().success());
    assert!(holder.wait().success());
}

#[test]
fn a_rust_client_pipelining_or_lying_about_ids_is_contained() {
    use coroipc_client::{Client, Error};
    let name = socket_name();
    let mut srv = server(&name);
    // Not the C library (one request at a time): the Rust client, which
    // pipelines. Handler 10 of the test service never answers.
    let client = Client::builder(&format!("@{name}"), 1).max_message(4096).connect().expect("connect");
    let mut req = [0u8; 16];
    req[0..4].copy_from_slice(&16i32.to_ne_bytes());
    req[8..12].copy_from_slice(&10i32.to_ne_bytes());
    let limit = coroipc_capi::server::MAX_PENDING;
    let tickets: Vec<_> =
        (0..limit + 6).map(|_| client.send(10, &req, Some(DEADLINE)).expect("send")).collect();
    let mut buf = [0u8; 64];
    for t in &tickets[limit..] {
        let n = client.wait(*t, &mut buf, Some(DEADLINE)).expect("an answer past the limit");
        assert_eq!(n, 24, "a synthesized header");
        assert_eq!(i32::from_ne_bytes(buf[16..20].try_into().expect("4")), 6, "CS_ERR_TRY_AGAIN");
    }
    // A header id other than the command it travels as is refused before
    // the executive sees it (CS_ERR_INVALID_PARAM), as is a request
    // shorter than its header.
    let n = client.call(0, &req, &mut buf).expect("an answer");
    assert_eq!((n, i32::from_ne_bytes(buf[16..20].try_into().expect("4"))), (24, 7), "mismatched id");
    let n = client.call(0, &req[..8], &mut buf).expect("an answer");
    assert_eq!((n, i32::from_ne_bytes(buf[16..20].try_into().expect("4"))), (24, 7), "short request");
    // The first `limit` wait for the service, which never answers: the
    // library does not answer for it.
    assert!(matches!(
        client.wait(tickets[0], &mut buf, Some(Duration::from_millis(100))),
        Err(Error::Timeout)
    ));
    drop(client);
    srv.expect("EXITFN");
    srv.signal(SIGTERM);
    let exit = srv.expect("EXIT ");
    assert_eq!(field(&exit, "inits"), field(&exit, "exits"), "{exit}");
    assert!(srv.wait().success());
}

#[test]
fn a_referenced_connection_outlives_its_exit_fn_until_the_last_refcount_dec() {
    let name = socket_name();
    let mut srv = server(&name);
    let mut client = Proc::spawn("test_client", &["holdref", &name]);
    assert_eq!(client.expect("HOLDREF"), "HOLDREF call=1 id=111");
    assert!(client.wait().success());
    srv.expect("EXITFN");
    let held = srv.expect("HELD");
    assert_eq!(
        held, "HELD freed_before=0 dispatch=-1 response=-1 freed_after=1",
        "after exit_fn the referenced conn stays allocated, sending to it fails harmlessly, \
         and the last coroipcs_refcount_dec frees it"
    );
    srv.signal(SIGTERM);
    let exit = srv.expect("EXIT ");
    assert_eq!(field(&exit, "lock_violations"), 0, "{exit}");
    assert!(srv.wait().success());
}
