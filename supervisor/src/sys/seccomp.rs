//! seccomp user notification for `bind()` (`service.handoff = "bind"`): the filter a
//! worker runs under, its installation in the child between fork and exec, and the
//! supervisor's half of the protocol (receive a notification, read the caller's
//! memory, take a copy of its fd, install a socket in its place, answer).
//!
//! The filter is six classic-BPF instructions, written here by hand: `seccompiler`
//! (rust-vmm) has no `SECCOMP_RET_USER_NOTIF` action and installs filters itself
//! (without `SECCOMP_FILTER_FLAG_NEW_LISTENER`, so no listener fd comes back), and
//! the `libseccomp` crate needs the C library at build and run time. What the
//! filter says: on this architecture's native ABI, `bind` goes to the listener;
//! every other syscall, and every syscall of another ABI (i386 `socketcall`, x32),
//! is allowed without a look.
use std::{
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::FileExt,
    },
};

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_NATIVE: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH_NATIVE: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64

/// Offsets in `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;

/// The filter, built before fork (the child may not allocate).
pub struct BindFilter {
    program: Vec<libc::sock_filter>,
}

fn statement(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

impl BindFilter {
    pub fn new() -> BindFilter {
        let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
        let equals = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
        let ret = libc::BPF_RET | libc::BPF_K;
        BindFilter {
            program: vec![
                statement(load, DATA_ARCH),
                // Another ABI: allowed (jump to the last instruction).
                jump(equals, AUDIT_ARCH_NATIVE, 0, 3),
                statement(load, DATA_NR),
                jump(equals, libc::SYS_bind as u32, 0, 1),
                statement(ret, libc::SECCOMP_RET_USER_NOTIF),
                statement(ret, libc::SECCOMP_RET_ALLOW),
            ],
        }
    }
}

impl Default for BindFilter {
    fn default() -> Self {
        BindFilter::new()
    }
}

/// Installs `filter` on the calling thread with a listener, and returns the
/// listener's fd (close-on-exec), or -1 with errno set. With `no_new_privs`,
/// `PR_SET_NO_NEW_PRIVS` is set first (what the kernel requires of a caller
/// without `CAP_SYS_ADMIN`).
///
/// # Safety
/// Only async-signal-safe syscalls, on memory allocated before any fork: callable
/// in the child between fork and exec.
pub(super) unsafe fn install_bind_filter(filter: &BindFilter, no_new_privs: bool) -> RawFd {
    // SAFETY: prctl with integer arguments.
    if no_new_privs && unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return -1;
    }
    let program = libc::sock_fprog {
        len: filter.program.len() as u16,
        filter: filter.program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `program` points at `len` instructions that live as long as
    // `filter`; the kernel copies them.
    unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &program as *const libc::sock_fprog,
        ) as RawFd
    }
}

/// Sends `fd` over the unix socket `socket` (`SCM_RIGHTS`, one byte of data).
/// False on failure, with errno set.
///
/// # Safety
/// Only async-signal-safe syscalls, on the stack: callable in the child between
/// fork and exec.
pub(super) unsafe fn send_fd(socket: RawFd, fd: RawFd) -> bool {
    // u64s: aligned for a cmsghdr; room for one header and one int.
    let mut control = [0u64; 4];
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below are to our stack.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is arithmetic.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    // SAFETY: msg_control points at `control`, which is larger than
    // CMSG_SPACE(sizeof(int)) (16 + 8 bytes on 64-bit, 32 available), so the
    // first header and its data are inside it.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&msg);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<RawFd>(), fd);
    }
    // SAFETY: msg describes buffers on our stack.
    unsafe { libc::sendmsg(socket, &msg, 0) == 1 }
}

/// Receives the fd [`send_fd`] sent (non-blocking: it was sent before exec).
pub fn receive_fd(socket: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut control = nix::cmsg_space!(RawFd);
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut control),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg
            && let Some(&fd) = fds.first()
        {
            // SAFETY: the kernel just installed this fd in our table for us
            // (close-on-exec); nobody else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    Err(io::Error::other("the worker sent no seccomp listener fd"))
}

/// Whether this kernel, and the seccomp filters the supervisor itself runs
/// under, let a worker be given a user-notification filter: `seccomp(
/// SECCOMP_GET_ACTION_AVAIL, SECCOMP_RET_USER_NOTIF)` (Linux 5.0), and
/// `SECCOMP_GET_NOTIF_SIZES` matching the structs used here.
pub fn user_notification_available() -> io::Result<()> {
    let action: u32 = libc::SECCOMP_RET_USER_NOTIF;
    // SAFETY: the kernel reads one u32 from `action`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &action as *const u32,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut sizes = libc::seccomp_notif_sizes {
        seccomp_notif: 0,
        seccomp_notif_resp: 0,
        seccomp_data: 0,
    };
    // SAFETY: the kernel writes one seccomp_notif_sizes into `sizes`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_NOTIF_SIZES,
            0,
            &mut sizes as *mut libc::seccomp_notif_sizes,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // Larger kernel structs are fine for RECV only if the extra is zero... the
    // kernel refuses a smaller buffer, so a mismatch is refused here instead.
    if usize::from(sizes.seccomp_notif) > std::mem::size_of::<libc::seccomp_notif>()
        || usize::from(sizes.seccomp_notif_resp) > std::mem::size_of::<libc::seccomp_notif_resp>()
    {
        return Err(io::Error::other(format!(
            "the kernel's seccomp notification structs ({} and {} bytes) are larger than this build's",
            sizes.seccomp_notif, sizes.seccomp_notif_resp
        )));
    }
    Ok(())
}

/// What the listener has for us (`poll`, without waiting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerState {
    /// A notification is pending: [`receive_notification`] will not block.
    Pending,
    /// Every process under the filter has exited.
    Closed,
    Idle,
}

/// Polls the listener once. `SECCOMP_IOCTL_NOTIF_RECV` blocks when nothing is
/// pending, so it is only called after this said `Pending` (a notification
/// whose caller died meanwhile makes it fail with `ENOENT`, not block).
pub fn listener_state(listener: BorrowedFd<'_>) -> io::Result<ListenerState> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(listener, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO)?;
    let revents = fds[0].revents().unwrap_or(PollFlags::empty());
    Ok(if revents.contains(PollFlags::POLLIN) {
        ListenerState::Pending
    } else if revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL) {
        ListenerState::Closed
    } else {
        ListenerState::Idle
    })
}

/// One intercepted syscall.
#[derive(Debug, Clone, Copy)]
pub struct Notification {
    pub id: u64,
    pub pid: i32,
    pub nr: i64,
    pub args: [u64; 6],
}

/// Takes the next pending notification (the listener is readable).
pub fn receive_notification(listener: BorrowedFd<'_>) -> io::Result<Notification> {
    // SAFETY: the kernel requires a zeroed struct; all-zero is a valid value.
    let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: the ioctl writes one seccomp_notif into `notif`.
    let ret = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_RECV,
            &mut notif as *mut libc::seccomp_notif,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Notification {
        id: notif.id,
        pid: notif.pid as i32,
        nr: i64::from(notif.data.nr),
        args: notif.data.args,
    })
}

/// Whether notification `id` is still pending (its caller has not died or been
/// interrupted): what was read from its memory or fd table before is its own.
pub fn notification_valid(listener: BorrowedFd<'_>, id: u64) -> bool {
    // SAFETY: the ioctl reads one u64.
    unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
            &id as *const u64,
        ) == 0
    }
}

/// Answers notification `id`: `Ok(())` makes the syscall return 0, `Err(errno)`
/// makes it fail with `errno`; `continue_syscall` lets the kernel run it as if
/// there were no filter.
pub fn respond(
    listener: BorrowedFd<'_>,
    id: u64,
    result: Result<(), i32>,
    continue_syscall: bool,
) -> io::Result<()> {
    let resp = libc::seccomp_notif_resp {
        id,
        val: 0,
        error: match result {
            Ok(()) => 0,
            Err(errno) => -errno,
        },
        flags: if continue_syscall {
            libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32
        } else {
            0
        },
    };
    // SAFETY: the ioctl reads (and may write) one seccomp_notif_resp we own.
    let ret = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND,
            &resp as *const libc::seccomp_notif_resp,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Installs `source` in the caller of notification `id` at fd number `target`,
/// replacing what was there (`SECCOMP_ADDFD_FLAG_SETFD`, Linux 5.14).
pub fn install_fd(
    listener: BorrowedFd<'_>,
    id: u64,
    source: BorrowedFd<'_>,
    target: RawFd,
    cloexec: bool,
) -> io::Result<()> {
    let addfd = libc::seccomp_notif_addfd {
        id,
        flags: libc::SECCOMP_ADDFD_FLAG_SETFD as u32,
        srcfd: source.as_raw_fd() as u32,
        newfd: target as u32,
        newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
    };
    // SAFETY: the ioctl reads one seccomp_notif_addfd we own.
    let ret = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ADDFD,
            &addfd as *const libc::seccomp_notif_addfd,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads `len` bytes at `address` in process `pid` (`/proc/PID/mem`). Check the
/// notification is still valid afterwards: the pid may have been reused.
pub fn read_process_memory(pid: i32, address: u64, len: usize) -> io::Result<Vec<u8>> {
    let file = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let mut buffer = vec![0u8; len];
    let read = file.read_at(&mut buffer, address)?;
    buffer.truncate(read);
    Ok(buffer)
}

/// A copy of fd `fd` of the process behind `pidfd` (`pidfd_getfd`, Linux 5.6),
/// close-on-exec.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel just installed for us.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// An `int` socket option.
pub fn get_int_option(socket: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value/len describe an int we own.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Sets an `int` socket option.
pub fn set_int_option(socket: BorrowedFd<'_>, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: the kernel reads one int we own.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_notification_is_available_on_this_kernel() {
        user_notification_available().unwrap();
    }

    #[test]
    fn filter_jumps_stay_inside_the_program() {
        let filter = BindFilter::new();
        for (i, instruction) in filter.program.iter().enumerate() {
            let after = i + 1;
            assert!(after + usize::from(instruction.jt) < filter.program.len() + 1);
            assert!(after + usize::from(instruction.jf) < filter.program.len() + 1);
        }
        assert_eq!(
            filter.program.last().unwrap().k,
            libc::SECCOMP_RET_ALLOW,
            "the fall-through allows"
        );
    }
}
