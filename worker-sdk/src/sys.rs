//! The crate's only `unsafe` code, kept small so it can be audited at a glance.
//!
//! Three things cannot be done with safe Rust:
//!
//! * turning an inherited fd number into an [`OwnedFd`]: the type system
//!   cannot know that fd 3 is open and that nobody else owns it;
//! * reading an integer socket option the standard library does not expose
//!   (`SO_TYPE`, `SO_DOMAIN`, `SO_PROTOCOL`);
//! * removing environment variables, which edition 2024 marks `unsafe`
//!   because C's `getenv` in another thread may be reading them.
//!
//! Each function below states the invariant that makes its `unsafe` block
//! sound and checks what it can at run time.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Takes ownership of `fd`, which this process inherited across `exec`.
///
/// The caller must make sure that the process has exactly one owner for
/// each inherited fd: [`crate::Listeners::from_env`] adopts the socket
/// activation fds at most once per process (a process-wide flag), and only
/// after checking `LISTEN_PID` says they were passed to *this* process.
pub(crate) fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // A closed fd must not become an OwnedFd: dropping it would close
    // whatever unrelated file later reuses the number. F_GETFD is the
    // cheapest way to ask "is this fd open?": it fails with EBADF if not.
    //
    // SAFETY: fcntl(F_GETFD) only reads the fd table entry; it is sound
    // for any integer, open or not.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open (checked just above), and by the socket
    // activation protocol it was handed to this process to own: LISTEN_PID
    // names us. Nothing else in the process claims it, because
    // `Listeners::from_env` (our only caller) adopts each inherited fd once
    // per process. The fd cannot be closed and reused between the check and
    // here, since only its owner would close it, and that is us from now on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads an `int`-valued socket option, e.g. `SOL_SOCKET`/`SO_TYPE`.
pub(crate) fn sockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is a live fd for the duration of the borrow; `value` and
    // `len` are valid, writable locals, and `len` tells the kernel it may
    // write at most size_of::<c_int>() bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // Options of these names are all ints; anything else means we asked the
    // wrong question, not that the socket is odd.
    if len as usize != mem::size_of::<libc::c_int>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("socket option {level}/{name} is {len} bytes, not an int"),
        ));
    }
    Ok(value)
}

/// Removes `vars` from the environment, but only if that is sound right now:
/// when this is the process's only thread. Returns whether it did.
///
/// Why not always: `std::env::remove_var` takes std's environment lock, but
/// C code (`getenv` inside libc, DNS resolution, a C library) reads `environ`
/// without it, so removing a variable while another thread runs can make that
/// reader follow a freed pointer. With a single thread nothing can run
/// concurrently, and no thread can be spawned while this one is busy here.
///
/// Leaving the variables when we cannot remove them is harmless for the
/// socket-activation variables: a child process that inherits them sees a
/// `LISTEN_PID` that is not its own and ignores the fds (which are
/// close-on-exec anyway). That is exactly why the protocol has `LISTEN_PID`.
pub(crate) fn remove_env_if_single_threaded(vars: &[&str]) -> bool {
    if !is_single_threaded() {
        return false;
    }
    for var in vars {
        // SAFETY: this process has exactly one thread (just checked), the
        // one running this code, so nothing else can read or write the
        // environment concurrently.
        unsafe { std::env::remove_var(var) };
    }
    true
}

/// Whether the process has exactly one thread, from the `Threads:` line of
/// `/proc/self/status`. Without `/proc` we cannot know, so we say no.
fn is_single_threaded() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .is_some_and(|count| count.trim() == "1")
}
