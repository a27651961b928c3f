//! `libcoroipcs.so.4`: the `coroipcs_*` functions over
//! [`coroipc_server::Server`].
//!
//! `coroipcs_ipc_init_v2` builds a server on the abstract socket
//! `@socket_name` offering service ids `0..64` (corosync's
//! `SERVICE_HANDLER_MAXIMUM_COUNT`); which of them exist is the
//! executive's `service_available`, asked at each connect. The server runs
//! its own event-loop thread (with the executive's `sched_policy`), so the
//! executive's poll loop is never given a descriptor.
//!
//! ## Calls into the executive
//!
//! All made from the event-loop thread, under `serialize_lock`:
//!
//! | when | calls |
//! |---|---|
//! | a client's hello arrives | `service_available`, `init_fn_get` (either says no: "not exist"), `security_valid` (errno `EMFILE` → "no resources", else "security") |
//! | the connection is set up | `service_available`, `init_fn_get` again, `private_data_size_get`, `malloc` (zeroed), `init_fn(conn)`, `stats_create_connection`, `stats_update_value("service_id")` |
//! | each request | `sending_allowed` → the handler (`handler_fn_get`) or a synthesized `{24, 0, CS_ERR_TRY_AGAIN / CS_ERR_INVALID_PARAM}` answer → `sending_allowed_release`; `stats_increment_value` |
//! | the connection goes | `exit_fn(conn)`, again every 10 ms while it returns −1; `stats_destroy_connection` |
//!
//! `coroipcs_response_send` and `coroipcs_dispatch_send` (any thread, lock
//! held or not) never take `serialize_lock` and never block: a response
//! goes into a ring that always has room for the one outstanding answer;
//! a dispatch message the client's ring cannot take is queued (up to
//! 256 MiB per connection, then the client is disconnected as too slow)
//! and the client sees flow control on until the queue drains.
//!
//! ## Lifetime of `conn`
//!
//! `conn` points to a heap block of this library, stable for its whole
//! life and never reused while referenced. The library holds one
//! reference from connect until `exit_fn` returned 0; each
//! `coroipcs_refcount_inc` adds one. The block (and the private data,
//! with the executive's `free`) goes when the count reaches zero.
//! Sending to a connection whose client is gone is harmless (the message
//! is dropped, −1 returned).
//!
//! ## Requests
//!
//! A request reaches the handler in server-private memory: the
//! connection's request area (16-byte aligned, as large as the
//! connection's largest message), holding the request as the client built
//! it (`coroipc_request_header_t` first). A request shorter than its
//! header, whose `header.size` is below 16 or above the area, or whose
//! `header.id` differs from the command it was sent as, is answered
//! `CS_ERR_INVALID_PARAM` without calling into the executive. A request
//! whose `header.size` is larger than the bytes sent reads the rest from
//! the area, i.e. from this client's previous requests, as the original's
//! reused shared request buffer did (libcpg's `cpg_membership_get` sends
//! 16 bytes of a 144-byte request and relies on it); the handler never
//! reads past the area and never sees another client's bytes. The request id is not range-checked
//! against the service's handler table: the ABI gives no way to learn its
//! length (`sending_allowed` and `handler_fn_get` index it), so a hostile
//! client of corosync can still make the executive read past it.
//! Responses are answered in order: the C client library has one request
//! in flight per handle (a client that pipelines gets `CS_ERR_TRY_AGAIN`
//! past [`MAX_PENDING`] unanswered requests), and
//! `coroipcs_response_send` answers the oldest unanswered request of
//! `conn`, whenever and from whatever thread it comes. The library never
//! answers on a service's behalf.
#![allow(unsafe_code)] // raw pointers from C: see the crate docs

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{CStr, CString};
use std::io::IoSlice;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use coroipc_server::{
    Call, Connection, Disconnect, Handler, Limits, OutboundLimits, OverflowPolicy, Refusal, Responder,
    Server, ServerHandle, ServiceBuilder,
};

use crate::ffi::{self, AlignedBuf, ResponseHeader, CS_ERR_INVALID_PARAM, CS_ERR_TRY_AGAIN};

/// How long the event loop polls busy connections before it sleeps
/// (`COROIPC_SPIN_US` overrides): not at all, as the original, whose
/// threads sleep on semaphores. The executive's main thread needs the
/// CPUs a spinning loop would take (measured in `benches/README.md`, "C
/// ABI": spinning costs corosync's cpgbench throughput and, on a loaded
/// 2-vCPU machine, rr64 round trips too).
pub const DEFAULT_SPIN: Duration = Duration::ZERO;

/// Most unanswered requests one connection may have: past it, requests
/// are answered `CS_ERR_TRY_AGAIN` before the executive sees them.
pub const MAX_PENDING: usize = 64;

/// Service ids offered (corosync's `SERVICE_HANDLER_MAXIMUM_COUNT`).
pub const MAX_SERVICES: u16 = 64;

type InitFn = unsafe extern "C" fn(conn: *mut libc::c_void) -> libc::c_int;
type ExitFn = unsafe extern "C" fn(conn: *mut libc::c_void) -> libc::c_int;
type HandlerFn = unsafe extern "C" fn(conn: *mut libc::c_void, msg: *const libc::c_void);

/// `struct coroipcs_init_state_v2` (x86_64: 224 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
#[allow(missing_docs)] // the members are the C struct's, documented in coroipcs.h
pub struct InitStateV2 {
    pub socket_name: *const libc::c_char,
    pub sched_policy: libc::c_int,
    pub sched_param: *const libc::sched_param,
    pub malloc: Option<unsafe extern "C" fn(libc::size_t) -> *mut libc::c_void>,
    pub free: Option<unsafe extern "C" fn(*mut libc::c_void)>,
    pub old_log_printf: Option<unsafe extern "C" fn(*const libc::c_char, ...)>,
    pub service_available: Option<unsafe extern "C" fn(libc::c_uint) -> libc::c_int>,
    pub private_data_size_get: Option<unsafe extern "C" fn(libc::c_uint) -> libc::c_int>,
    pub security_valid: Option<unsafe extern "C" fn(libc::c_int, libc::c_int) -> libc::c_int>,
    pub serialize_lock: Option<unsafe extern "C" fn()>,
    pub serialize_unlock: Option<unsafe extern "C" fn()>,
    pub sending_allowed: Option<
        unsafe extern "C" fn(
            libc::c_uint,
            libc::c_uint,
            *const libc::c_void,
            *mut libc::c_void,
        ) -> libc::c_int,
    >,
    pub sending_allowed_release: Option<unsafe extern "C" fn(*mut libc::c_void)>,
    pub poll_accept_add: Option<unsafe extern "C" fn(libc::c_int)>,
    pub poll_dispatch_add: Option<unsafe extern "C" fn(libc::c_int, *mut libc::c_void)>,
    pub poll_dispatch_modify: Option<unsafe extern "C" fn(libc::c_int, libc::c_int)>,
    pub poll_dispatch_destroy: Option<unsafe extern "C" fn(libc::c_int, *mut libc::c_void)>,
    pub fatal_error: Option<unsafe extern "C" fn(*const libc::c_char) -> !>,
    pub init_fn_get: Option<unsafe extern "C" fn(libc::c_uint) -> Option<InitFn>>,
    pub exit_fn_get: Option<unsafe extern "C" fn(libc::c_uint) -> Option<ExitFn>>,
    pub handler_fn_get: Option<unsafe extern "C" fn(libc::c_uint, libc::c_uint) -> Option<HandlerFn>>,
    pub stats_create_connection:
        Option<unsafe extern "C" fn(*const libc::c_char, libc::pid_t, libc::c_int) -> u64>,
    pub stats_destroy_connection: Option<unsafe extern "C" fn(u64)>,
    pub stats_update_value:
        Option<unsafe extern "C" fn(u64, *const libc::c_char, *const libc::c_void, libc::size_t)>,
    pub stats_increment_value: Option<unsafe extern "C" fn(u64, *const libc::c_char)>,
    pub log_printf: Option<
        unsafe extern "C" fn(
            libc::c_uint,
            *const libc::c_char,
            *const libc::c_char,
            libc::c_int,
            *const libc::c_char,
            ...
        ),
    >,
    pub log_subsys_id: libc::c_int,
    pub stats_decrement_value: Option<unsafe extern "C" fn(u64, *const libc::c_char)>,
}

const _: () = assert!(std::mem::size_of::<InitStateV2>() == 224);
const _: () = assert!(std::mem::offset_of!(InitStateV2, serialize_lock) == 72);
const _: () = assert!(std::mem::offset_of!(InitStateV2, handler_fn_get) == 160);
const _: () = assert!(std::mem::offset_of!(InitStateV2, log_subsys_id) == 208);

/// Size of the v1 `struct coroipcs_init_state` (the v2 struct up to
/// `handler_fn_get`).
const INIT_STATE_V1_LEN: usize = 168;

/// The executive as this library sees it.
struct Exec {
    cb: InitStateV2,
    handle: OnceLock<ServerHandle>,
    /// Live `conn` blocks per service (freed ones are gone).
    live: Mutex<HashMap<u16, usize>>,
    /// Services asked to exit.
    exiting: Mutex<HashSet<u16>>,
    short_name: Option<unsafe extern "C" fn(u32, *mut libc::c_char, libc::size_t) -> *const libc::c_char>,
}

// SAFETY: `cb` holds the executive's function pointers and pointers to its
// static data (the socket name, the sched_param), valid for the life of
// the process and callable from any thread: the executive's contract.
unsafe impl Send for Exec {}
// SAFETY: as for Send; `Exec`'s own state is behind mutexes.
unsafe impl Sync for Exec {}

static EXEC: OnceLock<Exec> = OnceLock::new();

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `serialize_lock` held until dropped.
struct BigLock<'a>(&'a Exec);

impl Exec {
    fn big_lock(&self) -> BigLock<'_> {
        if let Some(f) = self.cb.serialize_lock {
            // SAFETY: the executive's lock function.
            unsafe { f() };
        }
        BigLock(self)
    }

    fn stats_increment(&self, stats: u64, name: &CStr) {
        if let Some(f) = self.cb.stats_increment_value {
            // SAFETY: the executive's callback, with a handle it returned.
            unsafe { f(stats, name.as_ptr()) };
        }
    }

    fn log(&self, level: libc::c_int, msg: &str) {
        let Some(f) = self.cb.log_printf else { return };
        let Ok(msg) = CString::new(msg.replace('\0', " ")) else { return };
        // LOGSYS_ENCODE_RECID(level, subsys, LOGSYS_RECID_LOG).
        let recid = (u32::MAX >> 10) - 1;
        let rec = (recid << 10) | (((self.cb.log_subsys_id as u32) & 0x7f) << 3) | (level as u32 & 7);
        // SAFETY: the executive's printf-like logger with a "%s" format
        // and one NUL-terminated argument.
        unsafe {
            f(rec, c"coroipcs".as_ptr(), c"capi/src/server.rs".as_ptr(), 0, c"%s".as_ptr(), msg.as_ptr())
        };
    }
}

impl Drop for BigLock<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.0.cb.serialize_unlock {
            // SAFETY: the executive's unlock function, after its lock.
            unsafe { f() };
        }
    }
}

/// Forwards the server crate's `log` records to the executive's logger.
struct ExecLogger;

impl log::Log for ExecLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Info
    }

    fn log(&self, r: &log::Record<'_>) {
        let Some(exec) = EXEC.get() else { return };
        let level = match r.level() {
            log::Level::Error => libc::LOG_ERR,
            log::Level::Warn => libc::LOG_WARNING,
            log::Level::Info => libc::LOG_INFO,
            _ => libc::LOG_DEBUG,
        };
        exec.log(level, &format!("{}", r.args()));
    }

    fn flush(&self) {}
}

/// The block behind a C `conn` pointer.
struct ConnInfo {
    conn: Connection,
    service: u16,
    /// The zeroed private data (executive's `malloc`).
    private: *mut libc::c_void,
    /// The library's reference plus every `coroipcs_refcount_inc`.
    refs: AtomicUsize,
    /// Requests not answered yet, oldest first.
    pending: Mutex<VecDeque<Responder>>,
    /// The executive's stats object (0 without stats callbacks).
    stats: u64,
    /// The request area handlers read (16-byte aligned, the connection's
    /// largest payload), and `sending_allowed`'s 512-byte scratch.
    /// Event-loop thread only.
    scratch: Mutex<(AlignedBuf, AlignedBuf)>,
}

/// The per-connection state the server crate keeps: the `conn` pointer.
struct ConnPtr(*mut ConnInfo);

// SAFETY: the block is shared by design (any thread may send to `conn`);
// all its mutable parts are atomics or behind mutexes.
unsafe impl Send for ConnPtr {}

impl ConnPtr {
    fn info(&self) -> &ConnInfo {
        // SAFETY: the library's own reference keeps the block alive until
        // the disconnect callback, the last user of this state, drops it.
        unsafe { &*self.0 }
    }
}

/// Drops one reference; frees the block and the private data at zero.
///
/// # Safety
///
/// `ptr` must be a live block and the caller must own one of its references.
unsafe fn release(ptr: *mut ConnInfo) {
    // SAFETY: live, as the caller promises.
    let info = unsafe { &*ptr };
    if info.refs.fetch_sub(1, Ordering::AcqRel) != 1 {
        return;
    }
    // SAFETY: the last reference: nobody else can reach the block.
    let info = unsafe { Box::from_raw(ptr) };
    if let Some(exec) = EXEC.get() {
        // SAFETY: allocated with the executive's malloc (libc's without one).
        unsafe { exec.cb.free.map_or_else(|| libc::free(info.private), |free| free(info.private)) };
        if let Some(n) = lock(&exec.live).get_mut(&info.service) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The program name of `pid` from `/proc/PID/stat`.
fn proc_name(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    stat.get(open + 1..close).map(str::to_owned)
}

fn connect(exec: &'static Exec, service: u16, conn: &Connection) -> Result<ConnPtr, Refusal> {
    let cb = &exec.cb;
    let s = libc::c_uint::from(service);
    let _big = exec.big_lock();
    // SAFETY: an executive callback, called as its init state documents, under serialize_lock.
    let available = cb.service_available.is_none_or(|f| unsafe { f(s) } != 0);
    // SAFETY: an executive callback, called as its init state documents, under serialize_lock.
    let init = cb.init_fn_get.and_then(|f| unsafe { f(s) });
    let Some(init) = init.filter(|_| available) else { return Err(Refusal::NoSuchService) };
    // SAFETY: an executive callback, called as its init state documents, under serialize_lock.
    let size = cb.private_data_size_get.map_or(0, |f| unsafe { f(s) }).max(0) as usize;
    // SAFETY: the executive's malloc, or libc's.
    let private =
        unsafe { cb.malloc.map_or_else(|| libc::malloc(size.max(1)), |malloc| malloc(size.max(1))) };
    if private.is_null() {
        return Err(Refusal::NoMemory);
    }
    // SAFETY: `size.max(1)` bytes just allocated.
    unsafe { std::ptr::write_bytes(private.cast::<u8>(), 0, size.max(1)) };
    let pid = conn.credentials().pid.and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
    let id = i32::try_from(conn.id().get() % (i32::MAX as u64)).unwrap_or(0);
    let stats = match cb.stats_create_connection {
        Some(create) => {
            let mut buf = [0 as libc::c_char; 16];
            let short = exec
                .short_name
                // SAFETY: corosync's short_service_name_get, with a buffer of buf.len() bytes.
                .map(|f| unsafe { f(u32::from(service), buf.as_mut_ptr(), buf.len()) })
                .filter(|p| !p.is_null())
                // SAFETY: it returned a NUL-terminated string (its buffer or a static one).
                .map(|p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
                .unwrap_or_else(|| service.to_string());
            let pname = proc_name(pid).unwrap_or_else(|| "proc".into());
            let name = CString::new(format!("{pname}:{short}:{pid}:{id}").replace('\0', " "))
                .unwrap_or_else(|_| c"proc".into());
            // SAFETY: an executive callback, under serialize_lock; `name` is
            // NUL-terminated.
            let h = unsafe { create(name.as_ptr(), pid, id) };
            if let Some(update) = cb.stats_update_value {
                let sid = u32::from(service);
                // SAFETY: an executive callback, under serialize_lock; `sid` is the
                // 4-byte value named.
                unsafe { update(h, c"service_id".as_ptr(), (&raw const sid).cast(), 4) };
            }
            h
        }
        None => 0,
    };
    let info = Box::new(ConnInfo {
        conn: conn.clone(),
        service,
        private,
        refs: AtomicUsize::new(1),
        pending: Mutex::new(VecDeque::new()),
        stats,
        scratch: Mutex::new((AlignedBuf::zeroed(conn.max_payload()), AlignedBuf::zeroed(512))),
    });
    *lock(&exec.live).entry(service).or_insert(0) += 1;
    let ptr = Box::into_raw(info);
    // SAFETY: the service's lib_init_fn with the new, live block, under serialize_lock.
    unsafe { init(ptr.cast()) };
    Ok(ConnPtr(ptr))
}

/// Answers the oldest unanswered request of `info` with `parts`.
fn answer(info: &ConnInfo, parts: &[IoSlice<'_>]) -> libc::c_int {
    let Some(r) = lock(&info.pending).pop_front() else { return -1 };
    match r.respond_vectored(parts) {
        Ok(()) => {
            if let Some(exec) = EXEC.get() {
                exec.stats_increment(info.stats, c"responses");
            }
            0
        }
        Err(_) => -1,
    }
}

fn serve(exec: &'static Exec, service: u16, mut call: Call<'_, ConnPtr>) {
    let ptr = call.state().0;
    let command = call.request().command();
    let payload = call.payload();
    // SAFETY: see `ConnPtr::info`; the handler runs before the disconnect
    // callback, so the library's reference is still held.
    let info = unsafe { &*ptr };
    let header = ffi::RequestHeader::read(payload);
    let mut scratch = lock(&info.scratch);
    let (area, pd) = &mut *scratch;
    let valid = header.is_some_and(|h| {
        h.size >= ffi::REQUEST_HEADER_LEN as i32
            && h.size as usize <= area.len()
            && h.id == i32::from(command)
    });
    if !valid {
        exec.stats_increment(info.stats, c"invalid_request");
        let _ = call.respond(&ResponseHeader::synthesized(0, CS_ERR_INVALID_PARAM));
        return;
    }
    let id = libc::c_uint::from(command);
    // The connection's request area, as the original's: this request over
    // what is left of the previous ones. A request whose header.size is
    // larger than what was sent (libcpg's cpg_membership_get sends 16 of
    // its 144 bytes) reads the rest from there, as it did from the
    // original's reused shared request buffer; here that memory is
    // private, and only this client's own earlier bytes.
    area.bytes_mut()[..payload.len()].copy_from_slice(payload);
    let msg: *const libc::c_void = area.as_mut_ptr();
    let pd = pd.as_mut_ptr();
    // Our locks are only ever taken inside serialize_lock, never around a
    // call into the executive: let the area go first. Only this thread
    // (the event loop) uses it, so `msg` and `pd` stay ours meanwhile.
    drop(scratch);
    {
        let mut pending = lock(&info.pending);
        if pending.len() >= MAX_PENDING {
            // Only a client pipelining requests (not the C library, which
            // waits for each answer) gets here: it holds no more.
            drop(pending);
            exec.stats_increment(info.stats, c"overload");
            let _ = call.respond(&ResponseHeader::synthesized(0, CS_ERR_TRY_AGAIN));
            return;
        }
        pending.push_back(call.defer());
    }
    let cb = &exec.cb;
    let s = libc::c_uint::from(service);
    let _big = exec.big_lock();
    exec.stats_increment(info.stats, c"requests");
    // SAFETY: an executive callback under serialize_lock; `msg` holds the
    // whole request (16-byte aligned, `header.size` checked against the
    // area), valid until this function returns; `pd` is 512 bytes of
    // per-connection scratch.
    let verdict = cb.sending_allowed.map_or(1, |f| unsafe { f(s, id, msg, pd) });
    match verdict {
        // SAFETY: an executive callback, called as its init state documents, under serialize_lock.
        1 => match cb.handler_fn_get.and_then(|f| unsafe { f(s, id) }) {
            // SAFETY: the service's handler, with a live conn and the request.
            Some(handler) => unsafe { handler(ptr.cast(), msg) },
            None => {
                exec.stats_increment(info.stats, c"invalid_request");
                answer(info, &[IoSlice::new(&ResponseHeader::synthesized(0, CS_ERR_INVALID_PARAM))]);
            }
        },
        0 => {
            exec.stats_increment(info.stats, c"overload");
            answer(info, &[IoSlice::new(&ResponseHeader::synthesized(0, CS_ERR_TRY_AGAIN))]);
        }
        _ => {
            exec.stats_increment(info.stats, c"invalid_request");
            answer(info, &[IoSlice::new(&ResponseHeader::synthesized(0, CS_ERR_INVALID_PARAM))]);
        }
    }
    if let Some(f) = cb.sending_allowed_release {
        // SAFETY: an executive callback, called as its init state documents, under serialize_lock.
        unsafe { f(pd) };
    }
}

fn disconnect(exec: &'static Exec, service: u16, state: &mut ConnPtr) -> Disconnect {
    let info = state.info();
    {
        let _big = exec.big_lock();
        // SAFETY: the executive's exit function for the connection's
        // service, with the block it was given at init, under the lock.
        let exit = exec.cb.exit_fn_get.and_then(|f| unsafe { f(libc::c_uint::from(service)) });
        if let Some(exit) = exit {
            // SAFETY: the service's lib_exit_fn with the block it was given at init, under the lock.
            if unsafe { exit(state.0.cast()) } == -1 {
                return Disconnect::RetryLater;
            }
        }
        if let (Some(destroy), true) =
            (exec.cb.stats_destroy_connection, exec.cb.stats_create_connection.is_some())
        {
            // SAFETY: the handle its create returned, destroyed once.
            unsafe { destroy(info.stats) };
        }
    }
    lock(&info.pending).clear();
    // SAFETY: the library's own reference, given up exactly once.
    unsafe { release(state.0) };
    Disconnect::Done
}

fn service(exec: &'static Exec, id: u16) -> ServiceBuilder<ConnPtr> {
    let handler: Handler<ConnPtr> = Arc::new(move |call| serve(exec, id, call));
    ServiceBuilder::new(id, move |conn| connect(exec, id, conn))
        .selector(move |_| Some(handler.clone()))
        .on_disconnect(move |_, state| disconnect(exec, id, state))
        .outbound(OutboundLimits { max_queued_bytes: 256 << 20, overflow: OverflowPolicy::Disconnect })
}

fn fatal(exec: &Exec, msg: &str) -> ! {
    let msg = CString::new(msg.replace('\0', " ")).unwrap_or_else(|_| c"coroipcs: fatal error".into());
    if let Some(f) = exec.cb.fatal_error {
        // SAFETY: the executive's fatal error handler (it does not return).
        unsafe { f(msg.as_ptr()) }
    }
    eprintln!("{}", msg.to_string_lossy());
    std::process::exit(1)
}

fn init(cb: InitStateV2) {
    // SAFETY: looking up an optional symbol of the executable
    // (`short_service_name_get`, exported by corosync with -rdynamic).
    let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"short_service_name_get".as_ptr()) };
    let short_name = (!sym.is_null()).then(|| {
        // SAFETY: corosync's `const char *short_service_name_get(uint32_t, char *, size_t)`.
        unsafe {
            std::mem::transmute::<
                *mut libc::c_void,
                unsafe extern "C" fn(u32, *mut libc::c_char, libc::size_t) -> *const libc::c_char,
            >(sym)
        }
    });
    let exec = Exec {
        cb,
        handle: OnceLock::new(),
        live: Mutex::new(HashMap::new()),
        exiting: Mutex::new(HashSet::new()),
        short_name,
    };
    if EXEC.set(exec).is_err() {
        return; // initialised once; a second init is ignored
    }
    let exec = EXEC.get().expect("just set");
    if log::set_logger(&ExecLogger).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    let name = if cb.socket_name.is_null() {
        "corosync.ipc".to_owned()
    } else {
        // SAFETY: the executive's NUL-terminated socket name.
        unsafe { CStr::from_ptr(cb.socket_name) }.to_string_lossy().into_owned()
    };
    let limits = Limits { max_message_bytes: (4 << 20) + 64, max_ring_bytes: 1 << 24, ..Limits::default() };
    let mut builder = Server::builder()
        .endpoint(&format!("@{name}"))
        .limits(limits)
        .memory_budget(8 << 30, 8 << 30)
        .response_timeout(Duration::ZERO)
        .spin(ffi::spin_from_env().unwrap_or(DEFAULT_SPIN))
        .auth(move |creds, service| {
            let _big = exec.big_lock();
            let s = libc::c_uint::from(service);
            // SAFETY: the executive's callbacks, under serialize_lock.
            let available = exec.cb.service_available.is_none_or(|f| unsafe { f(s) } != 0)
                && exec.cb.init_fn_get.and_then(|f| unsafe { f(s) }).is_some();
            if !available {
                return Err(Refusal::NoSuchService);
            }
            let Some(valid) = exec.cb.security_valid else { return Ok(()) };
            // SAFETY: clearing errno, then the executive's check, which
            // reports its reason in errno.
            let (ok, errno) = unsafe {
                *libc::__errno_location() = 0;
                let ok = valid(creds.uid as libc::c_int, creds.gid as libc::c_int);
                (ok, *libc::__errno_location())
            };
            match (ok, errno) {
                (1, _) => Ok(()),
                (_, libc::EMFILE) => Err(Refusal::ConnectionLimit),
                _ => Err(Refusal::AccessDenied),
            }
        });
    for id in 0..MAX_SERVICES {
        builder = builder.service(service(exec, id));
    }
    let server = match builder.build() {
        Ok(s) => s,
        Err(e) => fatal(exec, &format!("coroipcs: cannot serve @{name}: {e}")),
    };
    let _ = exec.handle.set(server.handle());
    let policy = cb.sched_policy;
    let param = cb.sched_param as usize;
    let spawned = std::thread::Builder::new().name("coroipcs".into()).spawn(move || {
        if policy != 0 && param != 0 {
            // SAFETY: the executive's sched_param, for this thread.
            unsafe {
                libc::pthread_setschedparam(libc::pthread_self(), policy, param as *const libc::sched_param)
            };
        }
        if let Err(e) = server.run() {
            exec.log(libc::LOG_ERR, &format!("coroipcs: event loop failed: {e}"));
        }
    });
    if let Err(e) = spawned {
        fatal(exec, &format!("coroipcs: cannot start the event loop: {e}"));
    }
}

/// Starts serving (coroipc's `coroipcs_ipc_init_v2`): binds `\0` +
/// `socket_name` and starts the event loop. Writes `old_log_printf = NULL`.
///
/// # Safety
///
/// `init_state` must point to a valid `struct coroipcs_init_state_v2`
/// whose callbacks stay callable from any thread for the life of the
/// process.
#[no_mangle]
pub unsafe extern "C" fn coroipcs_ipc_init_v2(init_state: *mut InitStateV2) {
    ffi::guard((), || {
        if init_state.is_null() {
            return;
        }
        // SAFETY: a valid init state, as the caller promises.
        let cb = unsafe {
            (*init_state).old_log_printf = None;
            *init_state
        };
        init(cb);
    })
}

/// The version-1 init (`struct coroipcs_init_state`, no stats callbacks,
/// no logging), coroipc's `coroipcs_ipc_init`.
///
/// # Safety
///
/// As [`coroipcs_ipc_init_v2`], for the 168-byte v1 struct.
#[no_mangle]
pub unsafe extern "C" fn coroipcs_ipc_init(init_state: *mut libc::c_void) {
    ffi::guard((), || {
        if init_state.is_null() {
            return;
        }
        // SAFETY: all-zero is a valid `InitStateV2` (null pointers and
        // `None`s); the v1 struct is its first 168 bytes.
        let cb = unsafe {
            let mut v2: InitStateV2 = std::mem::zeroed();
            std::ptr::copy_nonoverlapping(
                init_state.cast::<u8>(),
                (&raw mut v2).cast::<u8>(),
                INIT_STATE_V1_LEN,
            );
            v2.old_log_printf = None;
            v2
        };
        init(cb);
    })
}

/// Unused: this library never registers descriptors with the executive's
/// poll loop. Returns 0.
#[no_mangle]
pub extern "C" fn coroipcs_handler_accept(
    _fd: libc::c_int,
    _revent: libc::c_int,
    _data: *mut libc::c_void,
) -> libc::c_int {
    0
}

/// Unused, as [`coroipcs_handler_accept`]. Returns −1 ("drop this fd").
#[no_mangle]
pub extern "C" fn coroipcs_handler_dispatch(
    _fd: libc::c_int,
    _revent: libc::c_int,
    _context: *mut libc::c_void,
) -> libc::c_int {
    -1
}

/// The connection's zeroed private data (coroipc's
/// `coroipcs_private_data_get`).
///
/// # Safety
///
/// `conn` must be a connection this library handed out, still referenced.
#[no_mangle]
pub unsafe extern "C" fn coroipcs_private_data_get(conn: *mut libc::c_void) -> *mut libc::c_void {
    if conn.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: a live block, as the caller promises.
    unsafe { (*conn.cast::<ConnInfo>()).private }
}

/// Answers the oldest unanswered request of `conn` with `mlen` bytes at
/// `msg` (coroipc's `coroipcs_response_send`). Any thread; never blocks.
/// Returns 0, or −1 if nothing is waiting for an answer or the client is
/// gone.
///
/// # Safety
///
/// `conn` as in [`coroipcs_private_data_get`]; `msg` readable for `mlen`.
#[no_mangle]
pub unsafe extern "C" fn coroipcs_response_send(
    conn: *mut libc::c_void,
    msg: *const libc::c_void,
    mlen: libc::size_t,
) -> libc::c_int {
    ffi::guard(-1, || {
        // SAFETY: `msg` readable for `mlen` bytes, as the caller promises.
        let Some(bytes) = (unsafe { ffi::bytes(msg, mlen) }) else { return -1 };
        if conn.is_null() {
            return -1;
        }
        // SAFETY: a live block, as the caller promises.
        answer(unsafe { &*conn.cast::<ConnInfo>() }, &[IoSlice::new(bytes)])
    })
}

/// Gathering form of [`coroipcs_response_send`] (coroipc's
/// `coroipcs_response_iov_send`).
///
/// # Safety
///
/// `conn` as there; `iov` points to `iov_len` iovecs of readable buffers.
#[no_mangle]
pub unsafe extern "C" fn coroipcs_response_iov_send(
    conn: *mut libc::c_void,
    iov: *const libc::iovec,
    iov_len: libc::c_uint,
) -> libc::c_int {
    ffi::guard(-1, || {
        if conn.is_null() {
            return -1;
        }
        // SAFETY: the caller promises the iovecs.
        let Some(parts) = (unsafe { ffi::io_slices(iov, iov_len) }) else { return -1 };
        // SAFETY: a live block, as the caller promises.
        answer(unsafe { &*conn.cast::<ConnInfo>() }, &parts)
    })
}

fn dispatch(conn: *mut libc::c_void, parts: &[IoSlice<'_>]) -> libc::c_int {
    // SAFETY: a live block, as the exported functions' callers promise.
    let info = unsafe { &*conn.cast::<ConnInfo>() };
    let (head, _) = ffi::prefix::<{ ffi::REQUEST_HEADER_LEN }>(parts);
    let id = ffi::RequestHeader::read(&head).map_or(0, |h| h.id as u32);
    match info.conn.dispatch_vectored(id, parts) {
        Ok(()) => {
            if let Some(exec) = EXEC.get() {
                exec.stats_increment(info.stats, c"dispatched");
            }
            0
        }
        Err(e) => {
            log::debug!("coroipcs: dispatch to connection {} dropped: {e}", info.conn.id());
            -1
        }
    }
}

/// Sends a dispatch message (coroipc's `coroipcs_dispatch_send`). Any
/// thread; never blocks; never fails for want of room (the message is
/// queued and flow control turned on). Returns 0, or −1 when the client is
/// gone or the message exceeds the connection's largest message.
///
/// # Safety
///
/// `conn` as in [`coroipcs_private_data_get`]; `msg` readable for `mlen`.
#[no_mangle]
pub unsafe extern "C" fn coroipcs_dispatch_send(
    conn: *mut libc::c_void,
    msg: *const libc::c_void,
    mlen: libc::size_t,
) -> libc::c_int {
    ffi::guard(-1, || {
        // SAFETY: `msg` readable for `mlen` bytes, as the caller promises.
        let Some(bytes) = (unsafe { ffi::bytes(msg, mlen) }) else { return -1 };
        if conn.is_null() {
            return -1;
        }
        dispatch(conn, &[IoSlice::new(bytes)])
    })
}

/// Gathering form of [`coroipcs_dispatch_send`] (one message).
///
/// # Safety
///
/// `conn` as there; `iov` points to `iov_len` iovecs of readable buffers.
#[no_mangle]
pub unsafe extern "C" fn coroipcs_dispatch_iov_send(
    conn: *mut libc::c_void,
    iov: *const libc::iovec,
    iov_len: libc::c_uint,
) -> libc::c_int {
    ffi::guard(-1, || {
        if conn.is_null() {
            return -1;
        }
        // SAFETY: the caller promises the iovecs.
        let Some(parts) = (unsafe { ffi::io_slices(iov, iov_len) }) else { return -1 };
        dispatch(conn, &parts)
    })
}

/// Keeps `conn` alive across asynchronous work (coroipc's
/// `coroipcs_refcount_inc`).
///
/// # Safety
///
/// `conn` as in [`coroipcs_private_data_get`].
#[no_mangle]
pub unsafe extern "C" fn coroipcs_refcount_inc(conn: *mut libc::c_void) {
    if conn.is_null() {
        return;
    }
    // SAFETY: a live block, as the caller promises.
    unsafe { (*conn.cast::<ConnInfo>()).refs.fetch_add(1, Ordering::AcqRel) };
}

/// Drops a reference of [`coroipcs_refcount_inc`]; the last one frees the
/// connection (coroipc's `coroipcs_refcount_dec`).
///
/// # Safety
///
/// `conn` as there, and the caller must own the reference it drops.
#[no_mangle]
pub unsafe extern "C" fn coroipcs_refcount_dec(conn: *mut libc::c_void) {
    if conn.is_null() {
        return;
    }
    ffi::guard((), || {
        // SAFETY: as the caller promises.
        unsafe { release(conn.cast()) }
    })
}

/// Disconnects every connection of `service` (coroipc's
/// `coroipcs_ipc_service_exit`): −1 ("call again") while any remains,
/// including ones whose `exit_fn` is busy or that are still referenced; 0
/// when none is left.
#[no_mangle]
pub extern "C" fn coroipcs_ipc_service_exit(service: libc::c_uint) -> libc::c_int {
    ffi::guard(0, || {
        let Some(exec) = EXEC.get() else { return 0 };
        let Ok(service) = u16::try_from(service) else { return 0 };
        // Live blocks (exit_fn pending or references held), and connections
        // the server accepted whose init has not run yet.
        let live = lock(&exec.live).get(&service).copied().unwrap_or(0) > 0
            || exec.handle.get().is_some_and(|h| h.connections().iter().any(|c| c.service() == service));
        if !live {
            return 0;
        }
        if lock(&exec.exiting).insert(service) {
            if let Some(h) = exec.handle.get() {
                h.shutdown_service(service);
            }
        }
        -1
    })
}

/// Closes every connection and stops the event loop (coroipc's
/// `coroipcs_ipc_exit`).
#[no_mangle]
pub extern "C" fn coroipcs_ipc_exit() {
    ffi::guard((), || {
        if let Some(h) = EXEC.get().and_then(|e| e.handle.get()) {
            h.shutdown();
        }
    })
}

/// `struct list_head` of the original's exported (and unused) connection
/// lists, kept for the ABI.
#[repr(C)]
pub struct ListHead {
    next: *mut ListHead,
    prev: *mut ListHead,
}

/// The original's connection list (exported, unused by corosync; empty).
#[no_mangle]
pub static mut conn_info_list_head: ListHead =
    ListHead { next: std::ptr::null_mut(), prev: std::ptr::null_mut() };

/// The original's exit list (exported, unused by corosync; empty).
#[no_mangle]
pub static mut conn_info_exit_list_head: ListHead =
    ListHead { next: std::ptr::null_mut(), prev: std::ptr::null_mut() };
