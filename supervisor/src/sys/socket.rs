//! `SO_MEMINFO`: a socket's receive-queue bytes and drops.
use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

/// Receive-side memory of a socket, from `SO_MEMINFO`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketMemInfo {
    /// Bytes of datagrams queued and not yet read (`SK_MEMINFO_RMEM_ALLOC`). For UDP
    /// this is the whole queue, unlike `FIONREAD`, which only gives the next datagram.
    pub queued_bytes: u32,
    /// Datagrams the kernel dropped on this socket, e.g. because the queue was full.
    pub drops: u32,
}

pub fn socket_meminfo(socket: BorrowedFd<'_>) -> io::Result<SocketMemInfo> {
    const SK_MEMINFO_RMEM_ALLOC: usize = 0;
    const SK_MEMINFO_DROPS: usize = 8;
    const SK_MEMINFO_VARS: usize = 9;
    let mut values = [0u32; SK_MEMINFO_VARS];
    let mut len = std::mem::size_of_val(&values) as libc::socklen_t;
    // SAFETY: values/len describe a buffer we own; the kernel writes at most len bytes.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            values.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(SocketMemInfo {
        queued_bytes: values[SK_MEMINFO_RMEM_ALLOC],
        drops: values[SK_MEMINFO_DROPS],
    })
}

/// `SO_COOKIE`: the kernel's 64-bit id of a socket, unique for the boot and never
/// reused. Two fds (in this process or another) refer to the same socket exactly
/// when their cookies are equal, which is how sockets taken back after a restart
/// are matched with the ones the state file recorded.
pub fn socket_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie/len describe an 8-byte buffer we own; the kernel writes at most len bytes.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
