//! Sealed memfd shared-memory segments.
//!
//! Every connection's rings and control block live in one [`Segment`]: an
//! anonymous memory file (`memfd_create(2)`) that the server creates, sizes,
//! **seals** and passes to the client with `SCM_RIGHTS`. Both map it shared
//! read/write.
//!
//! Why a sealed memfd (the peer is untrusted: `SECURITY.md`, "Threat
//! model"):
//!
//! - No name in `/dev/shm`: nothing to guess, nothing left behind when a
//!   process is killed; the memory goes away with the last descriptor and
//!   mapping.
//! - `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`: once set, nobody (not even
//!   the creator) can change the file's size or its seals. A peer that could
//!   shrink the file under our mapping would turn our next access into
//!   `SIGBUS`; [`Segment::from_fd`] refuses any descriptor without those
//!   seals, so the receiving side never maps memory that can disappear.
//!
//! The receiving side does not trust the descriptor it was sent: it checks
//! the kind (regular file that supports sealing), the exact size it
//! negotiated, an upper bound ([`MAX_SEGMENT_LEN`]) and the seals before it
//! maps anything.
//!
//! The mapping is held as a [`memmap2::MmapRaw`]: the memory is writable by
//! another process at any time, so it is reached through raw pointers and
//! atomics only, never through `&[u8]`/`&mut [u8]` that the compiler could
//! assume stable.

#![allow(unsafe_code)]

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64};

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{
    fcntl_add_seals, fcntl_get_seals, fstat, fstatfs, ftruncate, memfd_create, FileType, MemfdFlags,
    SealFlags,
};
use rustix::io::Errno;

/// The largest segment either side will create or map: 4 GiB.
///
/// It bounds what a hostile peer can make us map (address space, page
/// tables) and is comfortably above three rings of the largest size the
/// handshake allows plus a control block.
pub const MAX_SEGMENT_LEN: u64 = 1 << 32;

/// The seals every segment carries and every receiver demands.
pub const REQUIRED_SEALS: SealFlags = SealFlags::SHRINK.union(SealFlags::GROW).union(SealFlags::SEAL);

/// The name given to the memfd; visible only in `/proc/<pid>/fd` and
/// `/proc/<pid>/maps` (as `/memfd:coroipc`), useful when debugging.
const MEMFD_NAME: &str = "coroipc";

/// `f_type` of the kernel's shmem filesystem (`TMPFS_MAGIC` in
/// `linux/magic.h`), which `fstatfs` reports for every ordinary memfd.
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// A sealed, fixed-size memfd mapped shared read/write into this process.
///
/// Invariants (established by [`create`](Segment::create) and
/// [`from_fd`](Segment::from_fd), relied on by every accessor):
/// - `map` covers exactly `len` bytes, `0 < len <= MAX_SEGMENT_LEN`;
/// - `fd` is sealed with [`REQUIRED_SEALS`] and its size is `len`, so the
///   mapping stays backed for the segment's whole life (no `SIGBUS`);
/// - `map` is page-aligned (mmap returns page-aligned addresses).
pub struct Segment {
    fd: OwnedFd,
    map: MmapRaw,
    len: usize,
}

impl Segment {
    /// Creates a new segment of `len` bytes, zero-filled, sealed against
    /// resizing, and maps it.
    ///
    /// The memfd is created `MFD_CLOEXEC | MFD_ALLOW_SEALING`, sized with
    /// `ftruncate(2)`, then sealed with [`REQUIRED_SEALS`] (sealing must come
    /// after sizing: `F_SEAL_GROW` would forbid the `ftruncate`).
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] if `len` is 0 or above
    /// [`MAX_SEGMENT_LEN`]; otherwise the failing syscall's error
    /// (`memfd_create`, `ftruncate`, `fcntl(F_ADD_SEALS)`, `mmap`).
    ///
    /// # Examples
    ///
    /// ```
    /// use coroipc_transport::segment::Segment;
    ///
    /// let seg = Segment::create(64 * 1024)?;
    /// assert_eq!(seg.len(), 64 * 1024);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn create(len: usize) -> io::Result<Self> {
        if len == 0 || len as u64 > MAX_SEGMENT_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "segment length must be in 1..=MAX_SEGMENT_LEN",
            ));
        }
        let fd = memfd_create(MEMFD_NAME, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        ftruncate(&fd, len as u64)?;
        fcntl_add_seals(&fd, REQUIRED_SEALS)?;
        let map = MmapOptions::new().len(len).map_raw(&fd)?;
        Ok(Self { fd, map, len })
    }

    /// Validates a segment descriptor received from a peer and maps it.
    ///
    /// Checks, in order, before anything is mapped:
    /// 1. `expected_len` is in `1..=MAX_SEGMENT_LEN`;
    /// 2. `fstat(2)`: `fd` is a regular file;
    /// 3. `fstatfs(2)`: the file is on the kernel's shmem filesystem
    ///    (`TMPFS_MAGIC`, where memfds live), not hugetlbfs (`MFD_HUGETLB`)
    ///    or anything else;
    /// 4. `fcntl(F_GET_SEALS)`: `fd` supports sealing (a memfd or other shmem
    ///    file) and carries at least [`REQUIRED_SEALS`];
    /// 5. `fstat(2)` again: the file is exactly `expected_len` bytes.
    ///
    /// The size is read only after the seals are known to be set: from then
    /// on it cannot change, so the peer cannot shrink the file between our
    /// check and our mapping.
    ///
    /// # Errors
    ///
    /// A [`SegmentOpenError`] naming the failed check, or
    /// [`SegmentOpenError::Io`] if a syscall (including `mmap`, e.g. for a
    /// read-only or write-sealed descriptor) fails.
    ///
    /// # Examples
    ///
    /// A descriptor whose size is not the negotiated one, or that is not a
    /// sealed memfd at all, is refused before anything is mapped:
    ///
    /// ```
    /// use coroipc_transport::segment::{Segment, SegmentOpenError};
    /// use std::os::fd::AsFd;
    ///
    /// let seg = Segment::create(8192)?;
    /// let fd = seg.as_fd().try_clone_to_owned()?;
    /// let err = Segment::from_fd(fd, 4096).unwrap_err();
    /// assert!(matches!(err, SegmentOpenError::WrongSize { expected: 4096, actual: 8192 }));
    ///
    /// let file = std::fs::File::open("/proc/self/status")?;
    /// assert!(Segment::from_fd(file.into(), 4096).is_err());
    ///
    /// let mapped = Segment::from_fd(seg.as_fd().try_clone_to_owned()?, 8192)?;
    /// assert_eq!(mapped.len(), 8192);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_fd(fd: OwnedFd, expected_len: u64) -> Result<Self, SegmentOpenError> {
        if expected_len == 0 || expected_len > MAX_SEGMENT_LEN {
            return Err(SegmentOpenError::BadLength { len: expected_len });
        }
        let stat = fstat(&fd).map_err(io::Error::from)?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(SegmentOpenError::NotRegularFile);
        }
        // Only the kernel's shmem filesystem: memfds live there, and the
        // seals above make their size final. hugetlbfs memfds take the
        // seals too, but their pages come from a pool the peer can drain.
        let fs_type = fstatfs(&fd).map_err(io::Error::from)?.f_type as u64;
        if fs_type != TMPFS_MAGIC {
            return Err(SegmentOpenError::NotShmem { fs_type });
        }
        let seals = match fcntl_get_seals(&fd) {
            Ok(seals) => seals,
            Err(Errno::INVAL) => return Err(SegmentOpenError::NotSealable),
            Err(e) => return Err(SegmentOpenError::Io(e.into())),
        };
        if !seals.contains(REQUIRED_SEALS) {
            return Err(SegmentOpenError::MissingSeals { present: seals.bits() });
        }
        // Sealed now: this size is final.
        let stat = fstat(&fd).map_err(io::Error::from)?;
        // st_size is never negative for a regular file; treat it as a
        // mismatch if it were.
        let actual = u64::try_from(stat.st_size).unwrap_or(u64::MAX);
        if actual != expected_len {
            return Err(SegmentOpenError::WrongSize { expected: expected_len, actual });
        }
        // `expected_len <= MAX_SEGMENT_LEN` fits in usize on the 64-bit
        // targets this crate supports; refuse rather than truncate elsewhere.
        let len =
            usize::try_from(expected_len).map_err(|_| SegmentOpenError::BadLength { len: expected_len })?;
        let map = MmapOptions::new().len(len).map_raw(&fd)?;
        Ok(Self { fd, map, len })
    }

    /// The first byte of the mapping. Valid for [`len`](Segment::len) bytes
    /// for as long as `self` lives; page-aligned; another process may write
    /// any byte at any time.
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// The segment's length in bytes (never 0).
    #[inline]
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// A shared 32-bit atomic at byte `offset` (e.g. a futex word in the
    /// control block).
    ///
    /// # Panics
    ///
    /// If `offset` is not 4-aligned or `offset + 4 > len()`.
    #[inline]
    pub fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset.is_multiple_of(4) && offset.checked_add(4).is_some_and(|end| end <= self.len),
            "atomic_u32 offset {offset} misaligned or out of the segment"
        );
        // SAFETY: the mapping is page-aligned and `offset` is 4-aligned, so
        // the pointer is aligned for AtomicU32; `offset + 4 <= len` keeps it
        // inside the mapping, which is valid (sealed: never truncated) for
        // the lifetime of `&self`. AtomicU32 has interior mutability, so
        // concurrent writes by other threads or processes are permitted.
        unsafe { AtomicU32::from_ptr(self.as_ptr().add(offset).cast()) }
    }

    /// A shared 64-bit atomic at byte `offset`.
    ///
    /// # Panics
    ///
    /// If `offset` is not 8-aligned or `offset + 8 > len()`.
    #[inline]
    pub fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        assert!(
            offset.is_multiple_of(8) && offset.checked_add(8).is_some_and(|end| end <= self.len),
            "atomic_u64 offset {offset} misaligned or out of the segment"
        );
        // SAFETY: as in `atomic_u32`, with 8-byte alignment: the mapping is
        // page-aligned, `offset` is 8-aligned and in bounds, the sealed
        // mapping outlives `&self`, and atomics tolerate concurrent writers.
        unsafe { AtomicU64::from_ptr(self.as_ptr().add(offset).cast()) }
    }
}

// SAFETY: the mapping is page-aligned (>= 128), valid for `len` bytes and
// never truncated (sealed) while the segment lives; the ring reaches it only
// through raw pointers and atomics.
unsafe impl coroipc_ring::Region for Segment {
    fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl AsFd for Segment {
    /// The memfd, e.g. to pass it to the peer with `SCM_RIGHTS`.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment")
            .field("fd", &self.fd)
            .field("ptr", &self.as_ptr())
            .field("len", &self.len)
            .finish()
    }
}

/// Why a received segment descriptor was refused by [`Segment::from_fd`].
#[derive(Debug)]
#[non_exhaustive]
pub enum SegmentOpenError {
    /// The negotiated length is 0 or above [`MAX_SEGMENT_LEN`].
    BadLength {
        /// The length asked for.
        len: u64,
    },
    /// The descriptor is not a regular file (a pipe, socket, directory, …).
    NotRegularFile,
    /// The file's size differs from the negotiated length.
    WrongSize {
        /// The negotiated length.
        expected: u64,
        /// The file's size.
        actual: u64,
    },
    /// The file does not support sealing, so it is not a memfd.
    NotSealable,
    /// The file lacks `F_SEAL_SHRINK`, `F_SEAL_GROW` or `F_SEAL_SEAL`: the
    /// peer could still resize it under our mapping.
    MissingSeals {
        /// The `F_SEAL_*` bits that are set.
        present: u32,
    },
    /// The file is not on the kernel's shmem filesystem (`fstatfs`
    /// `f_type` is not `TMPFS_MAGIC`), e.g. a hugetlbfs memfd
    /// (`MFD_HUGETLB`, `HUGETLBFS_MAGIC` = `0x958458f6`), whose pages come
    /// from the huge page pool: a peer that punches a hole and drains the
    /// pool would make the next touch of the mapping a SIGBUS.
    NotShmem {
        /// The filesystem's `f_type`.
        fs_type: u64,
    },
    /// A syscall (`fstat`, `fstatfs`, `fcntl`, `mmap`) failed.
    Io(io::Error),
}

impl fmt::Display for SegmentOpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadLength { len } => write!(f, "segment length {len} out of range"),
            Self::NotRegularFile => f.write_str("segment is not a regular file"),
            Self::WrongSize { expected, actual } => {
                write!(f, "segment is {actual} bytes, expected {expected}")
            }
            Self::NotSealable => f.write_str("segment is not a memfd"),
            Self::MissingSeals { present } => {
                write!(f, "segment is not sealed against resizing (seals {present:#x})")
            }
            Self::NotShmem { fs_type } => {
                write!(f, "segment is not an ordinary memfd (filesystem type {fs_type:#x})")
            }
            Self::Io(_) => f.write_str("cannot open segment"),
        }
    }
}

impl std::error::Error for SegmentOpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for SegmentOpenError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn dup(seg: &Segment) -> OwnedFd {
        seg.as_fd().try_clone_to_owned().unwrap()
    }

    #[test]
    fn create_seals_and_maps_zeroed_memory() {
        let seg = Segment::create(8192).unwrap();
        assert_eq!(seg.len(), 8192);
        assert_eq!(seg.as_ptr() as usize % 4096, 0, "mapping is page-aligned");
        let seals = fcntl_get_seals(&seg).unwrap();
        assert!(seals.contains(REQUIRED_SEALS));
        assert_eq!(seg.atomic_u64(8184).load(Ordering::Relaxed), 0);
    }

    #[test]
    fn create_rejects_zero_and_oversized_lengths() {
        assert_eq!(Segment::create(0).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            Segment::create(MAX_SEGMENT_LEN as usize + 1).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn sealed_segment_cannot_be_shrunk_or_grown() {
        let seg = Segment::create(4096).unwrap();
        assert_eq!(ftruncate(&seg, 0), Err(Errno::PERM));
        assert_eq!(ftruncate(&seg, 8192), Err(Errno::PERM));
        assert_eq!(
            fcntl_add_seals(&seg, SealFlags::WRITE),
            Err(Errno::PERM),
            "F_SEAL_SEAL forbids adding seals"
        );
    }

    #[test]
    fn two_mappings_share_memory() {
        let a = Segment::create(4096).unwrap();
        let b = Segment::from_fd(dup(&a), 4096).unwrap();
        a.atomic_u32(100).store(0xdead_beef, Ordering::Release);
        assert_eq!(b.atomic_u32(100).load(Ordering::Acquire), 0xdead_beef);
    }

    #[test]
    fn from_fd_rejects_unsealed_memfd() {
        let fd = memfd_create("t", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        ftruncate(&fd, 4096).unwrap();
        let err = Segment::from_fd(fd, 4096).unwrap_err();
        assert!(matches!(err, SegmentOpenError::MissingSeals { .. }), "{err:?}");
    }

    #[test]
    fn from_fd_rejects_partially_sealed_memfd() {
        let fd = memfd_create("t", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        ftruncate(&fd, 4096).unwrap();
        // SHRINK and GROW but not SEAL: the peer could still add WRITE later.
        fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW).unwrap();
        let err = Segment::from_fd(fd, 4096).unwrap_err();
        assert!(matches!(err, SegmentOpenError::MissingSeals { .. }), "{err:?}");
    }

    #[test]
    fn from_fd_rejects_memfd_without_sealing_support() {
        // Without MFD_ALLOW_SEALING the memfd is born with F_SEAL_SEAL only.
        let fd = memfd_create("t", MemfdFlags::CLOEXEC).unwrap();
        ftruncate(&fd, 4096).unwrap();
        let err = Segment::from_fd(fd, 4096).unwrap_err();
        assert!(matches!(err, SegmentOpenError::MissingSeals { .. }), "{err:?}");
    }

    #[test]
    fn from_fd_rejects_short_memfd() {
        let seg = Segment::create(4096).unwrap();
        let err = Segment::from_fd(dup(&seg), 8192).unwrap_err();
        assert!(matches!(err, SegmentOpenError::WrongSize { expected: 8192, actual: 4096 }), "{err:?}");
    }

    #[test]
    fn from_fd_rejects_long_memfd() {
        let seg = Segment::create(8192).unwrap();
        let err = Segment::from_fd(dup(&seg), 4096).unwrap_err();
        assert!(matches!(err, SegmentOpenError::WrongSize { .. }), "{err:?}");
    }

    #[test]
    fn from_fd_rejects_out_of_range_lengths() {
        let seg = Segment::create(4096).unwrap();
        for len in [0, MAX_SEGMENT_LEN + 1, u64::MAX] {
            let err = Segment::from_fd(dup(&seg), len).unwrap_err();
            assert!(matches!(err, SegmentOpenError::BadLength { .. }), "{err:?}");
        }
    }

    #[test]
    fn from_fd_rejects_non_regular_files() {
        let (reader, _writer) = rustix::pipe::pipe().unwrap();
        let err = Segment::from_fd(reader, 4096).unwrap_err();
        assert!(matches!(err, SegmentOpenError::NotRegularFile), "{err:?}");
    }

    #[test]
    fn from_fd_rejects_regular_file_that_is_not_shmem() {
        let dir = std::env::temp_dir();
        let file = tempfile_in(&dir);
        file.set_len(4096).unwrap();
        let err = Segment::from_fd(file.into(), 4096).unwrap_err();
        // Off tmpfs the filesystem check refuses it first; on tmpfs it is a
        // sealable shmem file without seals (or, on an old kernel, one that
        // cannot be sealed).
        assert!(
            matches!(
                err,
                SegmentOpenError::NotShmem { .. }
                    | SegmentOpenError::NotSealable
                    | SegmentOpenError::MissingSeals { .. }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn from_fd_rejects_read_only_descriptor() {
        let seg = Segment::create(4096).unwrap();
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&seg.fd));
        let ro = std::fs::File::open(path).unwrap();
        let err = Segment::from_fd(ro.into(), 4096).unwrap_err();
        assert!(matches!(err, SegmentOpenError::Io(_)), "{err:?}");
    }

    #[test]
    #[should_panic(expected = "misaligned or out of the segment")]
    fn atomic_accessor_checks_bounds() {
        let seg = Segment::create(4096).unwrap();
        let _ = seg.atomic_u32(4096);
    }

    #[test]
    #[should_panic(expected = "misaligned or out of the segment")]
    fn atomic_accessor_checks_alignment() {
        let seg = Segment::create(4096).unwrap();
        let _ = seg.atomic_u64(4);
    }

    #[test]
    fn errors_display_short_lower_case() {
        let msgs = [
            SegmentOpenError::BadLength { len: 0 }.to_string(),
            SegmentOpenError::NotRegularFile.to_string(),
            SegmentOpenError::WrongSize { expected: 1, actual: 2 }.to_string(),
            SegmentOpenError::NotSealable.to_string(),
            SegmentOpenError::MissingSeals { present: 0 }.to_string(),
            SegmentOpenError::Io(io::Error::other("x")).to_string(),
        ];
        for m in msgs {
            assert!(m.starts_with(|c: char| c.is_ascii_lowercase()), "{m}");
            assert!(!m.ends_with('.'), "{m}");
        }
    }

    /// An unlinked regular file in `dir` (no tempfile crate needed).
    fn tempfile_in(dir: &std::path::Path) -> std::fs::File {
        let path = dir.join(format!(
            "coroipc-segment-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
