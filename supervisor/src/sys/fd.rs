//! File descriptors: registering with tokio's reactor, `FD_CLOEXEC`, and taking
//! over the ones a previous image of this process left open.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// Registers an fd-owning value with tokio's reactor.
///
/// `AsyncFd::register` is unsafe because it needs the fd to stay open and the same
/// for the `AsyncFd`'s whole life. `T: Into<OwnedFd>` restricts this to types that
/// own their fd (OwnedFd, UnixDatagram, ...): the fd closes only when the value,
/// now owned by the `AsyncFd`, is dropped.
pub fn register_async<T: AsRawFd + Into<OwnedFd>>(
    inner: T,
) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: see above; T owns its fd and as_raw_fd returns that same fd every time.
    unsafe { tokio::io::unix::AsyncFd::register(inner) }.map_err(io::Error::from)
}

/// Sets or clears `FD_CLOEXEC` on an fd number. Not memory-unsafe whatever the
/// number (fcntl fails with EBADF on a closed one); in here because it is a raw
/// libc call. Used to let exactly the handoff's fds survive a re-exec.
pub fn set_cloexec(fd: RawFd, cloexec: bool) -> io::Result<()> {
    // SAFETY: fcntl with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if cloexec {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes ownership of an fd inherited across a re-exec.
///
/// Sound because the only caller, `reexec::read`, passes each fd number named in
/// the handoff that this process's previous image wrote just before exec'ing:
/// those fds are open (checked here with F_GETFD), owned by nothing else in this
/// image (nothing in it has opened anything with those numbers yet: `run` reads
/// the handoff first), and each is named once.
pub fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl with integer arguments only.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above: open, and not owned by anything else in this process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
