//! Peer identity from the kernel (`SO_PEERCRED`), and refusing the
//! peer's descriptors (`SO_PASSRIGHTS`).
//!
//! The server's authentication callback decides on the uid, gid and pid the
//! kernel recorded when the peer called `connect(2)` (or `socketpair(2)`);
//! nothing the peer says about itself is believed (`SECURITY.md`, "Threat
//! model").
//!
//! This is the one place the crate calls libc directly. rustix's
//! `sockopt::socket_peercred` returns a `UCred` whose `pid` is a non-zero
//! `Pid`, but the kernel reports pid 0 when the peer's process is not
//! visible in our pid namespace (e.g. a client in a sibling container
//! connecting through a shared socket path); materialising that as a `Pid`
//! would be undefined behaviour, so the raw `ucred` is read here and a
//! missing pid becomes `None`. rustix has no `SO_PASSRIGHTS` (Linux 6.16)
//! either, which [`set_pass_rights`] sets.

#![allow(unsafe_code)]

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd};

/// The credentials of the process at the other end of a Unix socket, as the
/// kernel recorded them at `connect(2)`/`socketpair(2)` time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerCred {
    /// The peer's process id, `None` if that process is not visible in this
    /// process's pid namespace.
    pub pid: Option<u32>,
    /// The peer's effective user id.
    pub uid: u32,
    /// The peer's effective group id.
    pub gid: u32,
}

/// Reads `SO_PEERCRED` from a connected Unix socket.
///
/// # Errors
///
/// The `getsockopt(2)` error: `ENOTSOCK` for a non-socket, `ENOTCONN` for
/// an unconnected socket, …
///
/// # Examples
///
/// ```
/// use std::os::unix::net::UnixStream;
///
/// let (a, _b) = UnixStream::pair()?;
/// let cred = coroipc_transport::socket::peer_credentials(&a)?;
/// assert_eq!(cred.pid, Some(std::process::id()));
/// # Ok::<(), std::io::Error>(())
/// ```
#[doc(alias = "SO_PEERCRED")]
pub fn peer_credentials(sock: impl AsFd) -> io::Result<PeerCred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a valid, writable `ucred` of `len` bytes, and `len`
    // is a valid in/out length; the descriptor is borrowed for the call.
    // Every bit pattern is a valid `ucred` (three integers).
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != size_of::<libc::ucred>() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "short SO_PEERCRED reply"));
    }
    Ok(PeerCred { pid: u32::try_from(cred.pid).ok().filter(|&pid| pid != 0), uid: cred.uid, gid: cred.gid })
}

/// `SO_PASSRIGHTS` (Linux 6.16): whether the socket accepts descriptors
/// (`SCM_RIGHTS`). 83 in the generic socket option numbering; the
/// architectures with their own numbering (alpha, mips, parisc, sparc) are
/// left to the fallback (see [`set_pass_rights`]).
#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const SO_PASSRIGHTS: Option<libc::c_int> = Some(83);
#[cfg(any(target_arch = "mips", target_arch = "mips64", target_arch = "sparc", target_arch = "sparc64"))]
const SO_PASSRIGHTS: Option<libc::c_int> = None;

/// Sets `SO_PASSRIGHTS` on a Unix socket: with `allow` false, the kernel
/// refuses (`EPERM` to the sender) every message that carries descriptors
/// towards it, so none ever enters this process. A listener's setting is
/// inherited by the sockets it accepts, from the moment the peer connects.
/// Returns `false` if the kernel does not know the option (before 6.16).
///
/// # Errors
///
/// Any other `setsockopt(2)` error (`ENOTSOCK`, …).
pub(crate) fn set_pass_rights(sock: impl AsFd, allow: bool) -> io::Result<bool> {
    let Some(option) = SO_PASSRIGHTS else { return Ok(false) };
    let value: libc::c_int = allow.into();
    // SAFETY: `sock` is a live descriptor for the duration of the call;
    // the option value is a valid `c_int` whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOPROTOOPT) | Some(libc::EINVAL) => Ok(false),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn socketpair_reports_this_process() {
        let (a, b) = UnixStream::pair().unwrap();
        let me = PeerCred {
            pid: Some(std::process::id()),
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        };
        assert_eq!(peer_credentials(&a).unwrap(), me);
        assert_eq!(peer_credentials(&b).unwrap(), me);
    }

    #[test]
    fn non_socket_is_an_error() {
        let (r, _w) = rustix::pipe::pipe().unwrap();
        let err = peer_credentials(&r).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTSOCK));
    }
}
