//! The C types both libraries share (`include/corosync/coroipc_types.h`):
//! `cs_error_t` values, the request and response headers, and the
//! conversions of C `struct iovec` arrays.
#![allow(unsafe_code)] // raw pointers from C: see the crate docs

use std::io::IoSlice;

/// `cs_error_t` (a C `int` enum).
pub type CsError = libc::c_int;

/// `CS_OK`.
pub const CS_OK: CsError = 1;
/// `CS_ERR_LIBRARY`: the server is gone, or an internal failure.
pub const CS_ERR_LIBRARY: CsError = 2;
/// `CS_ERR_TRY_AGAIN`: connect refused, timeout, overload.
pub const CS_ERR_TRY_AGAIN: CsError = 6;
/// `CS_ERR_INVALID_PARAM`: a bad argument or an oversized request.
pub const CS_ERR_INVALID_PARAM: CsError = 7;
/// `CS_ERR_NO_MEMORY`.
pub const CS_ERR_NO_MEMORY: CsError = 8;
/// `CS_ERR_BAD_HANDLE`: an unknown or destroyed handle.
pub const CS_ERR_BAD_HANDLE: CsError = 9;
/// `CS_ERR_NOT_EXIST`: no such service.
pub const CS_ERR_NOT_EXIST: CsError = 12;
/// `CS_ERR_NO_RESOURCES`: the server is out of descriptors or connections.
pub const CS_ERR_NO_RESOURCES: CsError = 18;
/// `CS_ERR_IN_SHUTDOWN`: the server closed the connection.
pub const CS_ERR_IN_SHUTDOWN: CsError = 31;
/// `CS_ERR_SECURITY`: the server refused the credentials.
pub const CS_ERR_SECURITY: CsError = 100;

/// `coroipc_request_header_t`: every member `aligned(8)`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestHeader {
    /// Total request length, header included.
    pub size: libc::c_int,
    _pad0: libc::c_int,
    /// Index of the handler in the service's table.
    pub id: libc::c_int,
    _pad1: libc::c_int,
}

/// `coroipc_response_header_t`: every member `aligned(8)`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default)]
pub struct ResponseHeader {
    /// Total response length, header included.
    pub size: libc::c_int,
    _pad0: libc::c_int,
    /// The message id.
    pub id: libc::c_int,
    _pad1: libc::c_int,
    /// The service's status (`cs_error_t`).
    pub error: CsError,
    _pad2: libc::c_int,
}

const _: () = assert!(std::mem::size_of::<RequestHeader>() == 16);
const _: () = assert!(std::mem::size_of::<ResponseHeader>() == 24);
const _: () = assert!(std::mem::offset_of!(RequestHeader, id) == 8);
const _: () = assert!(std::mem::offset_of!(ResponseHeader, error) == 16);

/// Length of `coroipc_request_header_t`.
pub const REQUEST_HEADER_LEN: usize = 16;
/// Length of `coroipc_response_header_t`.
pub const RESPONSE_HEADER_LEN: usize = 24;

impl RequestHeader {
    /// The header at the start of `bytes` (`None` if shorter than one).
    pub fn read(bytes: &[u8]) -> Option<Self> {
        let b = bytes.get(..REQUEST_HEADER_LEN)?;
        let int = |at: usize| libc::c_int::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        Some(Self { size: int(0), id: int(8), ..Self::default() })
    }
}

impl ResponseHeader {
    /// A header-only response: `{size 24, id, error}`.
    pub fn synthesized(id: libc::c_int, error: CsError) -> [u8; RESPONSE_HEADER_LEN] {
        let mut b = [0u8; RESPONSE_HEADER_LEN];
        b[0..4].copy_from_slice(&(RESPONSE_HEADER_LEN as libc::c_int).to_ne_bytes());
        b[8..12].copy_from_slice(&id.to_ne_bytes());
        b[16..20].copy_from_slice(&error.to_ne_bytes());
        b
    }

    /// The `error` member of a response starting at `bytes`, if it is long
    /// enough to hold a header.
    pub fn error_of(bytes: &[u8]) -> Option<CsError> {
        let b = bytes.get(16..20)?;
        Some(libc::c_int::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// A C `struct iovec` array as `IoSlice`s, or `None` if an entry with a
/// length has a null base (or the array itself is null with a length).
///
/// # Safety
///
/// `iov` must point to `iov_len` readable `struct iovec`s whose buffers
/// stay readable and unchanged for `'a`.
pub unsafe fn io_slices<'a>(iov: *const libc::iovec, iov_len: libc::c_uint) -> Option<Vec<IoSlice<'a>>> {
    if iov_len == 0 {
        return Some(Vec::new());
    }
    if iov.is_null() {
        return None;
    }
    // SAFETY: the caller promises `iov_len` iovecs at `iov`.
    let entries = unsafe { std::slice::from_raw_parts(iov, iov_len as usize) };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        if e.iov_len == 0 {
            continue;
        }
        if e.iov_base.is_null() {
            return None;
        }
        // SAFETY: the caller promises each buffer readable for 'a.
        out.push(IoSlice::new(unsafe { std::slice::from_raw_parts(e.iov_base as *const u8, e.iov_len) }));
    }
    Some(out)
}

/// The first `N` bytes gathered across `parts` (zero-filled if shorter),
/// and the total length.
pub fn prefix<const N: usize>(parts: &[IoSlice<'_>]) -> ([u8; N], usize) {
    let mut out = [0u8; N];
    let mut at = 0;
    let mut total = 0usize;
    for p in parts {
        total = total.saturating_add(p.len());
        if at < N {
            let n = p.len().min(N - at);
            out[at..at + n].copy_from_slice(&p[..n]);
            at += n;
        }
    }
    (out, total)
}

/// A heap buffer with 16-byte alignment (C code casts message pointers
/// to structs whose members are `aligned(8)`).
pub struct AlignedBuf {
    words: Box<[u128]>,
}

impl AlignedBuf {
    /// A zeroed buffer of at least `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        Self { words: vec![0u128; len.div_ceil(16).max(1)].into_boxed_slice() }
    }

    /// Its capacity in bytes.
    pub fn len(&self) -> usize {
        self.words.len() * 16
    }

    /// Always false (a buffer has at least 16 bytes).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The bytes.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        // SAFETY: `u128` has no invalid bit patterns and neither has `u8`;
        // the slice covers exactly the boxed words, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), len) }
    }

    /// The bytes, read-only.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: as in `bytes_mut`, borrowed shared.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len()) }
    }

    /// The start address, for C.
    pub fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        self.words.as_mut_ptr().cast()
    }
}

/// The `len` bytes at `ptr` as a slice (empty for `len` 0, whatever
/// `ptr` is); `None` for a null `ptr` with a length.
///
/// # Safety
///
/// With `len > 0` and `ptr` not null, `ptr` must be readable for `len`
/// bytes for `'a`, as the C caller promises.
pub unsafe fn bytes<'a>(ptr: *const libc::c_void, len: libc::size_t) -> Option<&'a [u8]> {
    if len == 0 {
        return Some(&[]);
    }
    if ptr.is_null() {
        return None;
    }
    // SAFETY: readable for `len` bytes, as the caller promises.
    Some(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
}

/// Runs `f`, turning a panic into `on_panic` (nothing unwinds into C).
pub fn guard<T>(on_panic: T, f: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(on_panic)
}

/// The spin budget set with the environment variable `COROIPC_SPIN_US`
/// (microseconds), read once: how long a blocked client call spins before
/// it sleeps, and how long the server's loop polls busy connections
/// before it sleeps in `epoll_wait`. Unset: the libraries' defaults.
pub fn spin_from_env() -> Option<std::time::Duration> {
    static SPIN: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        let us: u64 = std::env::var("COROIPC_SPIN_US").ok()?.trim().parse().ok()?;
        Some(std::time::Duration::from_micros(us))
    })
}
