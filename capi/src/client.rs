//! `libcoroipcc.so.4`: the twelve `coroipcc_*` functions over
//! [`coroipc_client::Client`].
//!
//! ## Handles
//!
//! A handle (`hdb_handle_t`, a `uint64_t`) names one connection; numbers
//! are never reused, so a destroyed handle is refused with
//! `CS_ERR_BAD_HANDLE` for the life of the process. `dispatch_get` and
//! `msg_send_reply_receive_in_buf_get` keep a reference to the connection
//! until the matching `_put`, so the memory they hand out stays valid even
//! if the handle is disconnected in between (cpg finalizes from inside a
//! dispatch callback).
//!
//! ## The dispatch fd
//!
//! `coroipcc_fd_get` returns the client's dispatch fd (the same one every
//! time): level-triggered, readable exactly while a dispatch message is
//! pending, from connect on, and when the server has gone (the next
//! `dispatch_get` then fails).
//!
//! Dispatch messages and `in_buf` responses are copied out of the shared
//! ring into 16-byte-aligned private buffers (a message starts with
//! `coroipc_response_header_t`, whose members are `aligned(8)`, and the
//! callers read it in place until the `_put`).
//!
//! ## Zero-copy buffers (`coroipcc_zcb_*`)
//!
//! `coroipcc_zcb_alloc` returns `header_size + size` bytes of private,
//! 16-byte-aligned memory of this process (no round trip); the first
//! `header_size` bytes are the caller's headroom, as in the original.
//! `coroipcc_zcb_msg_send_reply_receive` sends the request the caller
//! built at the start of the buffer (`header.size` bytes) by copying it
//! into the request ring, and the server copies it into private memory
//! before the handler runs. The original let the handler read the
//! client's mapping in place; that is exactly the hazard the security
//! model rules out (a client could change a request while the service
//! validates and uses it, see `SECURITY.md`), so the handler gets a copy
//! here. The API shape is kept: buffers are checked against what this
//! library handed out, `zcb_free` refuses unknown pointers, and buffers
//! still allocated at disconnect are freed then.
#![allow(unsafe_code)] // raw pointers from C: see the crate docs

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use coroipc_client::{Client, DisconnectReason, Error, SleepMode, WaitPolicy};
use coroipc_transport::message::HEADER_LEN;

use crate::ffi::{
    self, guard, AlignedBuf, CsError, RequestHeader, ResponseHeader, CS_ERR_BAD_HANDLE, CS_ERR_INVALID_PARAM,
    CS_ERR_IN_SHUTDOWN, CS_ERR_LIBRARY, CS_ERR_NOT_EXIST, CS_ERR_NO_MEMORY, CS_ERR_NO_RESOURCES,
    CS_ERR_SECURITY, CS_ERR_TRY_AGAIN, CS_OK, REQUEST_HEADER_LEN,
};

/// `hdb_handle_t`.
pub type HdbHandle = u64;

/// One connection behind a handle.
struct Handle {
    client: Client,
    /// The request size the caller asked for: larger requests are
    /// `CS_ERR_INVALID_PARAM`.
    request_size: usize,
    /// Largest message payload the connection carries.
    max_payload: usize,
    /// Serialises request/response; holds the `in_buf` response and the
    /// zero-copy buffers.
    req: Mutex<ReqState>,
    /// The dispatch side (another thread may receive while one calls):
    /// the message handed out by `dispatch_get` until `dispatch_put`.
    disp: Mutex<AlignedBuf>,
    /// Set by `coroipcc_service_disconnect`: a `dispatch_get` blocked in
    /// another thread returns `CS_ERR_BAD_HANDLE` within
    /// [`DISCONNECT_SLICE`].
    closed: AtomicBool,
}

/// How often a blocked `coroipcc_dispatch_get` looks whether its handle
/// was disconnected.
const DISCONNECT_SLICE: Duration = Duration::from_millis(100);

struct ReqState {
    in_buf: AlignedBuf,
    /// Zero-copy buffers by start address.
    zcb: HashMap<usize, AlignedBuf>,
}

/// The references a `_get` holds until its `_put`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Held {
    Dispatch,
    InBuf,
}

struct Registry {
    handles: Mutex<HashMap<HdbHandle, Arc<Handle>>>,
    held: Mutex<HashMap<(HdbHandle, Held), Arc<Handle>>>,
    next: AtomicU64,
}

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| Registry {
        handles: Mutex::new(HashMap::new()),
        held: Mutex::new(HashMap::new()),
        next: AtomicU64::new(1),
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn lookup(handle: HdbHandle) -> Option<Arc<Handle>> {
    lock(&registry().handles).get(&handle).cloned()
}

/// The `cs_error_t` of a failed call or receive.
fn cs_error(e: &Error) -> CsError {
    match e {
        Error::TryAgain | Error::Timeout => CS_ERR_TRY_AGAIN,
        Error::Invalid | Error::TooBig | Error::BufferTooSmall { .. } => CS_ERR_INVALID_PARAM,
        Error::AccessDenied | Error::WrongServer { .. } => CS_ERR_SECURITY,
        Error::NoSuchService => CS_ERR_NOT_EXIST,
        Error::ConnectionLimit => CS_ERR_NO_RESOURCES,
        Error::NoMemory => CS_ERR_NO_MEMORY,
        _ => CS_ERR_LIBRARY,
    }
}

/// The `cs_error_t` of a failed connect: not reaching the server at all is
/// "try again" (callers retry on it).
fn connect_error(e: &Error) -> CsError {
    match e {
        Error::Io(_) | Error::Timeout => CS_ERR_TRY_AGAIN,
        other => cs_error(other),
    }
}

/// Connects to `service` at the abstract socket `socket_name` (coroipc's
/// `coroipcc_service_connect`). The sizes bound the request the caller
/// may send and the response and dispatch messages it can receive.
///
/// # Safety
///
/// `socket_name` must be a NUL-terminated string and `handle` writable
/// (either may be null: `CS_ERR_INVALID_PARAM`).
#[no_mangle]
pub unsafe extern "C" fn coroipcc_service_connect(
    socket_name: *const libc::c_char,
    service: libc::c_uint,
    request_size: libc::size_t,
    response_size: libc::size_t,
    dispatch_size: libc::size_t,
    handle: *mut HdbHandle,
) -> CsError {
    guard(CS_ERR_LIBRARY, || {
        if socket_name.is_null() || handle.is_null() {
            return CS_ERR_INVALID_PARAM;
        }
        // SAFETY: a NUL-terminated string, as the caller promises.
        let name = unsafe { std::ffi::CStr::from_ptr(socket_name) }.to_string_lossy().into_owned();
        let Ok(service) = u16::try_from(service) else { return CS_ERR_NOT_EXIST };
        let largest = request_size.max(response_size).max(dispatch_size).max(ffi::RESPONSE_HEADER_LEN);
        let Some(max_message) = largest.checked_add(HEADER_LEN).map(|n| n.next_multiple_of(8)) else {
            return CS_ERR_INVALID_PARAM;
        };
        let Ok(max_message) = u32::try_from(max_message) else { return CS_ERR_INVALID_PARAM };
        let builder = Client::builder(&format!("@{name}"), service).max_message(max_message);
        // No spinning unless asked for (`COROIPC_SPIN_US`): see
        // `server::DEFAULT_SPIN`.
        let spin = ffi::spin_from_env().unwrap_or(crate::server::DEFAULT_SPIN);
        let builder = builder.wait_policy(WaitPolicy { spin, sleep: SleepMode::Futex });
        let client = match builder.connect() {
            Ok(c) => c,
            Err(e) => return connect_error(&e),
        };
        let max_payload = client.max_message().saturating_sub(HEADER_LEN);
        let h = Arc::new(Handle {
            client,
            request_size,
            max_payload,
            req: Mutex::new(ReqState { in_buf: AlignedBuf::zeroed(max_payload), zcb: HashMap::new() }),
            disp: Mutex::new(AlignedBuf::zeroed(max_payload)),
            closed: AtomicBool::new(false),
        });
        let id = registry().next.fetch_add(1, Ordering::Relaxed);
        lock(&registry().handles).insert(id, h);
        // SAFETY: checked non-null above; the caller promises it writable.
        unsafe { handle.write(id) };
        CS_OK
    })
}

/// Disconnects and destroys the handle (coroipc's
/// `coroipcc_service_disconnect`). Memory handed out by a `_get` stays
/// valid until its `_put`.
#[no_mangle]
pub extern "C" fn coroipcc_service_disconnect(handle: HdbHandle) -> CsError {
    guard(CS_ERR_LIBRARY, || match lock(&registry().handles).remove(&handle) {
        Some(h) => {
            h.closed.store(true, Ordering::Release);
            CS_OK
        }
        None => CS_ERR_BAD_HANDLE,
    })
}

/// The dispatch descriptor of the handle: the same every time,
/// level-triggered (coroipc's `coroipcc_fd_get`).
///
/// # Safety
///
/// `fd` must be writable (null: `CS_ERR_INVALID_PARAM`).
#[no_mangle]
pub unsafe extern "C" fn coroipcc_fd_get(handle: HdbHandle, fd: *mut libc::c_int) -> CsError {
    guard(CS_ERR_LIBRARY, || {
        let Some(h) = lookup(handle) else { return CS_ERR_BAD_HANDLE };
        if fd.is_null() {
            return CS_ERR_INVALID_PARAM;
        }
        // SAFETY: checked non-null; the caller promises it writable.
        unsafe { fd.write(h.client.as_fd().as_raw_fd()) };
        CS_OK
    })
}

/// 1 while the server holds dispatch messages back because this client's
/// ring is full, else 0 (coroipc's `coroipcc_dispatch_flow_control_get`).
///
/// # Safety
///
/// `state` must be writable (null: `CS_ERR_INVALID_PARAM`).
#[no_mangle]
pub unsafe extern "C" fn coroipcc_dispatch_flow_control_get(
    handle: HdbHandle,
    state: *mut libc::c_uint,
) -> CsError {
    guard(CS_ERR_LIBRARY, || {
        let Some(h) = lookup(handle) else { return CS_ERR_BAD_HANDLE };
        if state.is_null() {
            return CS_ERR_INVALID_PARAM;
        }
        let on = h.client.dispatch_flow_control() == coroipc_client::FlowState::On;
        // SAFETY: checked non-null; the caller promises it writable.
        unsafe { state.write(libc::c_uint::from(on)) };
        CS_OK
    })
}

impl Handle {
    /// The `cs_error_t` of a failed dispatch receive.
    fn dispatch_error(e: &Error) -> CsError {
        match e {
            Error::Disconnected(DisconnectReason::ServerDied) => CS_ERR_LIBRARY,
            Error::Disconnected(_) => CS_ERR_IN_SHUTDOWN,
            other => cs_error(other),
        }
    }

    /// Sends the request gathered from `parts` and hands the response to
    /// `take` in place.
    fn call<R>(&self, parts: &[IoSlice<'_>], take: impl FnOnce(&[u8]) -> R) -> Result<R, CsError> {
        let (head, total) = ffi::prefix::<REQUEST_HEADER_LEN>(parts);
        if total < REQUEST_HEADER_LEN || total > self.request_size || total > self.max_payload {
            return Err(CS_ERR_INVALID_PARAM);
        }
        let header = RequestHeader::read(&head).ok_or(CS_ERR_INVALID_PARAM)?;
        let command = u16::try_from(header.id).map_err(|_| CS_ERR_INVALID_PARAM)?;
        match self.client.call_in_place(command, parts, None) {
            Ok(response) => Ok(take(&response)),
            Err(e) => Err(cs_error(&e)),
        }
    }
}

/// Waits up to `timeout` ms (0: not at all, -1: for ever) for a dispatch
/// message and hands it out in place until `coroipcc_dispatch_put`
/// (coroipc's `coroipcc_dispatch_get`): contiguous, 16-byte aligned,
/// starting with `coroipc_response_header_t`.
///
/// # Errors
///
/// `CS_ERR_TRY_AGAIN` (none in time), `CS_ERR_LIBRARY` (the server died),
/// `CS_ERR_IN_SHUTDOWN` (the server closed the connection),
/// `CS_ERR_BAD_HANDLE` (also for a wait ended by a disconnect of the
/// handle from another thread).
///
/// # Safety
///
/// `buf` must be writable (null: `CS_ERR_INVALID_PARAM`).
#[no_mangle]
pub unsafe extern "C" fn coroipcc_dispatch_get(
    handle: HdbHandle,
    buf: *mut *mut libc::c_void,
    timeout: libc::c_int,
) -> CsError {
    guard(CS_ERR_LIBRARY, || {
        let Some(h) = lookup(handle) else { return CS_ERR_BAD_HANDLE };
        if buf.is_null() {
            return CS_ERR_INVALID_PARAM;
        }
        let mut d = lock(&h.disp);
        let got = if timeout == 0 {
            h.client.try_recv_dispatch(d.bytes_mut())
        } else {
            // In slices, so that a disconnect from another thread ends the
            // wait (as the original's closed socket did): CS_ERR_BAD_HANDLE.
            let end = u64::try_from(timeout).ok().map(|ms| Instant::now() + Duration::from_millis(ms));
            loop {
                let left = end.map_or(DISCONNECT_SLICE, |e| e.saturating_duration_since(Instant::now()));
                match h.client.recv_dispatch(d.bytes_mut(), Some(left.min(DISCONNECT_SLICE))) {
                    Err(Error::Timeout) if h.closed.load(Ordering::Acquire) => return CS_ERR_BAD_HANDLE,
                    Err(Error::Timeout) if end.is_none_or(|e| Instant::now() < e) => continue,
                    other => break other,
                }
            }
        };
        if let Err(e) = got {
            return Handle::dispatch_error(&e);
        }
        // SAFETY: checked non-null; the caller promises it writable.
        unsafe { buf.write(d.as_mut_ptr()) };
        lock(&registry().held).insert((handle, Held::Dispatch), h.clone());
        CS_OK
    })
}

/// Releases the message of the last `coroipcc_dispatch_get` (coroipc's
/// `coroipcc_dispatch_put`); works after the handle was disconnected.
#[no_mangle]
pub extern "C" fn coroipcc_dispatch_put(handle: HdbHandle) -> CsError {
    guard(CS_ERR_LIBRARY, || {
        let held = lock(&registry().held).remove(&(handle, Held::Dispatch));
        if held.is_some() || lookup(handle).is_some() {
            CS_OK
        } else {
            CS_ERR_BAD_HANDLE
        }
    })
}

/// Sends the request gathered from `iov` and copies `res_len` bytes of the
/// response to `res_msg` (zero-filled past what the service sent)
/// (coroipc's `coroipcc_msg_send_reply_receive`). Blocks until the service
/// answers.
///
/// # Errors
///
/// `CS_ERR_INVALID_PARAM` for a request larger than the connection's
/// request size (or shorter than its header, or with a header id outside
/// 0..=65535); `CS_ERR_TRY_AGAIN` when the response's `header.error` says
/// so (nothing is copied then); `CS_ERR_LIBRARY` when the server is gone;
/// `CS_ERR_BAD_HANDLE`.
///
/// # Safety
///
/// `iov` must point to `iov_len` iovecs of readable buffers; `res_msg` to
/// `res_len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn coroipcc_msg_send_reply_receive(
    handle: HdbHandle,
    iov: *const libc::iovec,
    iov_len: libc::c_uint,
    res_msg: *mut libc::c_void,
    res_len: libc::size_t,
) -> CsError {
    guard(CS_ERR_LIBRARY, || {
        let Some(h) = lookup(handle) else { return CS_ERR_BAD_HANDLE };
        // SAFETY: the caller promises the iovecs.
        let Some(parts) = (unsafe { ffi::io_slices(iov, iov_len) }) else { return CS_ERR_INVALID_PARAM };
        if res_msg.is_null() && res_len > 0 {
            return CS_ERR_INVALID_PARAM;
        }
        let _serial = lock(&h.req);
        // SAFETY: `res_len` writable bytes at `res_msg`, as the caller promises.
        let out = unsafe { out_slice(res_msg, res_len) };
        match h.call(&parts, |response| copy_response(response, out)) {
            Ok(code) => code,
            Err(code) => code,
        }
    })
}

/// `res_len` bytes at `res_msg` (empty for a null pointer).
///
/// # Safety
///
/// `res_msg` must point to `res_len` writable bytes, or be null.
unsafe fn out_slice<'a>(res_msg: *mut libc::c_void, res_len: usize) -> &'a mut [u8] {
    if res_msg.is_null() {
        return &mut [];
    }
    // SAFETY: as the caller promises.
    unsafe { std::slice::from_raw_parts_mut(res_msg.cast::<u8>(), res_len) }
}

/// coroipc's response rule: a `CS_ERR_TRY_AGAIN` header is returned as
/// such without copying; otherwise `out` gets what there is, the rest
/// zeroed.
fn copy_response(response: &[u8], out: &mut [u8]) -> CsError {
    if ResponseHeader::error_of(response) == Some(CS_ERR_TRY_AGAIN) {
        return CS_ERR_TRY_AGAIN;
    }
    let n = response.len().min(out.len());
    out[..n].copy_from_slice(&response[..n]);
    out[n..].fill(0);
    CS_OK
}

/// Sends the request gathered from `iov` and hands out the response in
/// place until `coroipcc_msg_send_reply_receive_in_buf_put` (coroipc's
/// `coroipcc_msg_send_reply_receive_in_buf_get`). No `TRY_AGAIN` special
/// case. The pointer is only safe in the calling thread (another call on
/// the handle reuses the buffer), as in the original.
///
/// # Errors
///
/// As [`coroipcc_msg_send_reply_receive`], without the `TRY_AGAIN` rule.
///
/// # Safety
///
/// `iov` as there; `res_msg` writable.
#[no_mangle]
pub unsafe extern "C" fn coroipcc_msg_send_reply_receive_in_buf_get(
    handle: HdbHandle,
    iov: *const libc::iovec,
    iov_len: libc::c_uint,
    res_msg: *mut *mut libc::c_void,
) -> CsError {
    guard(CS_ERR_LIBRARY, || {
        let Some(h) = lookup(handle) else { return CS_ERR_BAD_HANDLE };
        // SAFETY: the caller promises the iovecs.
        let Some(parts) = (unsafe { ffi::io_slices(iov, iov_len) }) else { return CS_ERR_INVALID_PARAM };
        if res_msg.is_null() {
            return CS_ERR_INVALID_PARAM;
        }
        let mut req = lock(&h.req);
        let buf = &mut req.in_buf;
        let r = h.call(&parts, |response| {
            let b = buf.bytes_mut();
            let n = response.len().min(b.len());
            b[..n].copy_from_slice(&response[..n]);
            let end = n.next_multiple_of(8).min(b.len());
            b[n..end].fill(0);
        });
        if let Err(code) = r {
            return code;
        }
        // SAFETY: checked non-null; the caller promises it writable.
        unsafe { res_msg.write(req.in_buf.as_mut_ptr()) };
        drop(req);
        lock(&registry().held).insert((handle, Held::InBuf), h.clone());
        CS_OK
    })
}

/// Releases the response of `_in_buf_get` (coroipc's
/// `coroipcc_msg_send_reply_receive_in_buf_put`); harmless after a failed
/// `_get`.
#[no_mangle]
pub extern "C" fn coroipcc_msg_send_reply_receive_in_buf_put(handle: HdbHandle) -> CsError {
    guard(CS_ERR_LIBRARY, || {
        if lock(&registry().held).remove(&(handle, Held::InBuf)).is_some() || lookup(handle).is_some() {
            CS_OK
        } else {
            CS_ERR_BAD_HANDLE
        }
    })
}

/// Allocates a zero-copy request buffer of `header_size + size` bytes
/// (coroipc's `coroipcc_zcb_alloc`; see the module docs).
///
/// # Safety
///
/// `buffer` must be writable (null: `CS_ERR_INVALID_PARAM`).
#[no_mangle]
pub unsafe extern "C" fn coroipcc_zcb_alloc(
    handle: HdbHandle,
    buffer: *mut *mut libc::c_void,
    size: libc::size_t,
    header_size: libc::size_t,
) -> CsError {
    guard(CS_ERR_LIBRARY, || {
        let Some(h) = lookup(handle) else { return CS_ERR_BAD_HANDLE };
        if buffer.is_null() {
            return CS_ERR_INVALID_PARAM;
        }
        let Some(total) = size.checked_add(header_size) else { return CS_ERR_INVALID_PARAM };
        if total > isize::MAX as usize / 2 {
            return CS_ERR_NO_MEMORY;
        }
        let mut b = AlignedBuf::zeroed(total);
        let p = b.as_mut_ptr();
        lock(&h.req).zcb.insert(p as usize, b);
        // SAFETY: checked non-null; the caller promises it writable.
        unsafe { buffer.write(p) };
        CS_OK
    })
}

/// Frees a buffer of `coroipcc_zcb_alloc` (coroipc's `coroipcc_zcb_free`).
///
/// # Errors
///
/// `CS_ERR_INVALID_PARAM` for a pointer this handle did not hand out.
#[no_mangle]
pub extern "C" fn coroipcc_zcb_free(handle: HdbHandle, buffer: *mut libc::c_void) -> CsError {
    guard(CS_ERR_LIBRARY, || {
        let Some(h) = lookup(handle) else { return CS_ERR_BAD_HANDLE };
        let removed = lock(&h.req).zcb.remove(&(buffer as usize));
        match removed {
            Some(_) => CS_OK,
            None => CS_ERR_INVALID_PARAM,
        }
    })
}

/// Sends the request at the start of zero-copy buffer `msg`
/// (`header.size` bytes) and copies `res_len` bytes of the response
/// (coroipc's `coroipcc_zcb_msg_send_reply_receive`); response rules as
/// [`coroipcc_msg_send_reply_receive`].
///
/// # Errors
///
/// `CS_ERR_INVALID_PARAM` if `msg` is not a buffer of this handle or its
/// `header.size` is shorter than a header, longer than the buffer or the
/// request size; otherwise as [`coroipcc_msg_send_reply_receive`].
///
/// # Safety
///
/// `res_msg` must point to `res_len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn coroipcc_zcb_msg_send_reply_receive(
    handle: HdbHandle,
    msg: *mut libc::c_void,
    res_msg: *mut libc::c_void,
    res_len: libc::size_t,
) -> CsError {
    guard(CS_ERR_LIBRARY, || {
        let Some(h) = lookup(handle) else { return CS_ERR_BAD_HANDLE };
        if res_msg.is_null() && res_len > 0 {
            return CS_ERR_INVALID_PARAM;
        }
        let req = lock(&h.req);
        let Some(b) = req.zcb.get(&(msg as usize)) else { return CS_ERR_INVALID_PARAM };
        let bytes = b.bytes();
        let Some(header) = RequestHeader::read(bytes) else { return CS_ERR_INVALID_PARAM };
        let Ok(size) = usize::try_from(header.size) else { return CS_ERR_INVALID_PARAM };
        if size < REQUEST_HEADER_LEN || size > bytes.len() {
            return CS_ERR_INVALID_PARAM;
        }
        // SAFETY: `res_len` writable bytes at `res_msg`, as the caller promises.
        let out = unsafe { out_slice(res_msg, res_len) };
        match h.call(&[IoSlice::new(&bytes[..size])], |response| copy_response(response, out)) {
            Ok(code) => code,
            Err(code) => code,
        }
    })
}
