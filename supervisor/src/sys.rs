//! Every `unsafe` block and raw syscall of the supervisor lives here, each with the
//! invariant that makes it sound written next to it. The rest of the crate uses the
//! safe functions below.
//!
//! - [`spawn_worker`]: fork + exec with the socket-activation fds moved to 3.. and
//!   `LISTEN_PID` written in the child, after fork, as systemd does. Nothing in the
//!   crates we use can do that: `std::process::Command` builds the environment
//!   before fork, and the child's pid is only known after it.
//! - pidfds ([`pidfd_open`], [`pidfd_signal`], [`pidfd_try_wait`]): race-free handles
//!   on worker processes (a pid can be reused, a pidfd cannot).
//! - [`ControlWord`]: the mmap of the selector's `CONTROL` map, so the generation flip
//!   is one atomic 8-byte store.
//! - [`socket_meminfo`]: `SO_MEMINFO`, the receive-queue bytes and drop count of a
//!   socket (nix has no wrapper for it).
//! - [`synchronize_rcu`]: `membarrier(MEMBARRIER_CMD_GLOBAL)`, an RCU grace period, so
//!   the XDP filter knows when no packet still uses a ruleset it switched away from.
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

/// Everything a worker's exec needs, allocated before fork: after fork in a
/// multi-threaded process the child may only call async-signal-safe functions, so it
/// must not allocate (another thread may have held the allocator's lock at fork time).
pub struct PreparedExec {
    program: CString,
    /// NUL-terminated argv strings; `argv_ptrs` points into them.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    /// Environment entries as owned byte buffers, each NUL-terminated. The
    /// `LISTEN_PID=` entry has room for any pid; the child writes its own pid there.
    env: Vec<Vec<u8>>,
    listen_pid_entry: Option<usize>,
    /// fds to place at 3, 4, ... in the child, in order.
    fds: Vec<RawFd>,
    /// Scratch space for the child's first pass over `fds` (see `spawn_worker`):
    /// one entry per fd, allocated here because the child may not allocate.
    staging: Vec<RawFd>,
    credentials: Option<(libc::uid_t, libc::gid_t)>,
    /// `PR_SET_NO_NEW_PRIVS` in the child; with `credentials`, also an empty
    /// capability bounding set.
    no_new_privs: bool,
}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
/// Digits reserved for the pid (pid_max is at most 2^22, 7 digits).
const PID_DIGITS: usize = 20;

impl PreparedExec {
    /// `program` must be a path (the caller resolves `PATH` beforehand, so a missing
    /// command is reported before anything is forked).
    pub fn new(
        program: &str,
        argv: &[String],
        env: &[(String, String)],
        with_listen_pid: bool,
        fds: Vec<RawFd>,
        credentials: Option<(u32, u32)>,
        no_new_privs: bool,
    ) -> io::Result<Self> {
        let cstring = |s: &str| {
            CString::new(s).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{s:?} contains a NUL byte"),
                )
            })
        };
        let program = cstring(program)?;
        let argv: Vec<CString> = argv.iter().map(|a| cstring(a)).collect::<Result<_, _>>()?;
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());

        let mut entries: Vec<Vec<u8>> = Vec::with_capacity(env.len() + 1);
        for (key, value) in env {
            let entry = cstring(&format!("{key}={value}"))?;
            entries.push(entry.into_bytes_with_nul());
        }
        let listen_pid_entry = with_listen_pid.then(|| {
            let mut entry = LISTEN_PID_PREFIX.to_vec();
            entry.resize(LISTEN_PID_PREFIX.len() + PID_DIGITS + 1, 0);
            entries.push(entry);
            entries.len() - 1
        });
        Ok(PreparedExec {
            program,
            _argv: argv,
            argv_ptrs,
            env: entries,
            listen_pid_entry,
            staging: vec![-1; fds.len()],
            fds,
            credentials,
            no_new_privs,
        })
    }
}

/// A forked and exec'd worker.
pub struct Spawned {
    pub pid: i32,
    pub pidfd: OwnedFd,
}

/// Forks and execs a worker. Returns once the exec has succeeded (or with the exec's
/// error: `ENOENT`, `EACCES`, ...), so a bad command fails the generation at once.
///
/// The child: joins its own process group (a Ctrl-C on the supervisor's terminal
/// must not reach workers before the supervisor drains them), asks for SIGTERM when
/// the supervisor dies (no orphan keeps a socket of a dead supervisor), resets
/// signal dispositions and mask, places the sockets at 3.. without `FD_CLOEXEC`,
/// marks every fd above them close-on-exec (whatever the supervisor's launcher
/// left open reaches no worker), drops privileges if asked, writes `LISTEN_PID`,
/// and execs.
///
/// Privileges: with credentials, the inheritable and ambient capability sets are
/// cleared and, if `no_new_privs`, the bounding set emptied, all while still root
/// (dropping bounding caps needs `CAP_SETPCAP`); then groups, gid, uid. With
/// `no_new_privs`, `PR_SET_NO_NEW_PRIVS` last: no setuid bit or file capability
/// gives the worker anything at exec.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked exits, not the process: the
/// caller must fork from a thread that lives as long as the supervisor (the daemon
/// runs its event loop, and so every spawn, on the main thread).
pub fn spawn_worker(prepared: &mut PreparedExec) -> io::Result<Spawned> {
    // Pointers into `prepared`, taken before fork so the child only reads them.
    let mut env_ptrs: Vec<*const libc::c_char> =
        prepared.env.iter().map(|e| e.as_ptr().cast()).collect();
    env_ptrs.push(std::ptr::null());
    let listen_pid_buf: Option<*mut u8> = prepared
        .listen_pid_entry
        .map(|i| prepared.env[i].as_mut_ptr());
    let fd_count = prepared.fds.len() as RawFd;
    let parent = std::process::id() as libc::pid_t;

    // A pipe whose write end is close-on-exec: a successful exec closes it (the
    // parent reads EOF); a failed one writes errno into it first.
    let mut pipe_fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(pipe_fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (read_end, write_end) = unsafe {
        (
            OwnedFd::from_raw_fd(pipe_fds[0]),
            OwnedFd::from_raw_fd(pipe_fds[1]),
        )
    };

    // SAFETY: after fork the child calls only async-signal-safe functions (setpgid,
    // prctl, getppid, sigprocmask, sigaction via signal, fcntl, dup2, the raw
    // close_range, prlimit64, capget and capset syscalls, setgroups, setgid,
    // setuid, getpid, write, execve, _exit) and touches only memory that was
    // allocated before the fork or lives on its own stack; it never returns from
    // this block.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // Child. Any failure: report errno through the pipe and _exit.
        // SAFETY: the fork invariant above: only async-signal-safe calls, on memory
        // allocated before the fork (`prepared`, `env_ptrs`, the staging table).
        unsafe {
            let fail = |write_fd: RawFd| -> ! {
                let errno = *libc::__errno_location();
                let bytes = errno.to_ne_bytes();
                libc::write(write_fd, bytes.as_ptr().cast(), bytes.len());
                libc::_exit(127);
            };
            // Move the pipe's write end above the socket range first: dup2 below
            // may overwrite any fd in 3..3+n.
            let report = libc::fcntl(write_end.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3 + fd_count);
            if report < 0 {
                libc::_exit(127);
            }
            libc::setpgid(0, 0);
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            );
            if libc::getppid() != parent {
                // The supervisor died between fork and prctl.
                libc::_exit(1);
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // exec keeps ignored signals ignored; Rust ignores SIGPIPE at startup,
            // and a worker must get the defaults a shell would give it.
            for signal in 1..32 {
                if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                    libc::signal(signal, libc::SIG_DFL);
                }
            }
            // Two passes so that a source fd already inside 3..3+n is not
            // clobbered before it is copied: first above the range, then into it.
            // `staging` has exactly one entry per fd, however many listeners
            // and sockets the worker is owed.
            for (slot, &fd) in prepared.staging.iter_mut().zip(prepared.fds.iter()) {
                *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3 + fd_count);
                if *slot < 0 {
                    fail(report);
                }
            }
            for (i, &fd) in prepared.staging.iter().enumerate() {
                // dup2 gives the new fd no FD_CLOEXEC: it survives exec.
                if libc::dup2(fd, 3 + i as RawFd) < 0 {
                    fail(report);
                }
            }
            // Everything above the sockets closes at exec: the supervisor's own
            // fds are close-on-exec already, but what its launcher left open
            // (a file, a lock) is not. The staging copies and `report` are
            // close-on-exec too.
            if !cloexec_from(3 + fd_count) {
                fail(report);
            }
            if let Some((uid, gid)) = prepared.credentials
                && (!clear_inheritable_and_ambient()
                    || (prepared.no_new_privs && !empty_bounding_set())
                    || libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                fail(report);
            }
            if prepared.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                fail(report);
            }
            if let Some(buf) = listen_pid_buf {
                write_pid(buf.add(LISTEN_PID_PREFIX.len()), libc::getpid());
            }
            libc::execve(
                prepared.program.as_ptr(),
                prepared.argv_ptrs.as_ptr(),
                env_ptrs.as_ptr(),
            );
            fail(report);
        }
    }

    // Parent.
    drop(write_end);
    let mut errno_bytes = [0u8; 4];
    let mut read = 0;
    while read < errno_bytes.len() {
        // SAFETY: reading into our own buffer from an fd we own.
        let n = unsafe {
            libc::read(
                read_end.as_raw_fd(),
                errno_bytes[read..].as_mut_ptr().cast(),
                errno_bytes.len() - read,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            break;
        }
        read += n as usize;
    }
    if read == errno_bytes.len() {
        // The exec failed: reap the child so it leaves no zombie, report why.
        let mut status = 0;
        // SAFETY: pid is our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(
            errno_bytes,
        )));
    }
    let pidfd = pidfd_open(pid)?;
    Ok(Spawned { pid, pidfd })
}

/// Marks every fd from `first` on close-on-exec, without allocating (for the child
/// after fork): `close_range(first, ~0, CLOSE_RANGE_CLOEXEC)` (Linux 5.11), else
/// `fcntl` on each fd number up to the soft `RLIMIT_NOFILE`. False on failure,
/// with errno set.
///
/// # Safety
/// Only async-signal-safe syscalls; the caller must be able to live with every fd
/// from `first` on closing at exec.
unsafe fn cloexec_from(first: RawFd) -> bool {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: plain syscall with integer arguments.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if ret == 0 {
        return true;
    }
    // SAFETY: errno is thread-local and this thread's.
    let errno = unsafe { *libc::__errno_location() };
    if errno != libc::ENOSYS && errno != libc::EINVAL {
        return false;
    }
    let mut limit = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit64 on ourselves (pid 0) writes the current limits into `limit`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_prlimit64,
            0,
            libc::RLIMIT_NOFILE,
            std::ptr::null::<libc::rlimit64>(),
            &mut limit as *mut libc::rlimit64,
        )
    };
    if ret != 0 {
        return false;
    }
    let end = limit.rlim_cur.min(libc::c_int::MAX as u64) as RawFd;
    for fd in first..end {
        // SAFETY: fcntl with integer arguments; EBADF for fds that are not open.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    true
}

/// `capget`/`capset`'s header and data (`_LINUX_CAPABILITY_VERSION_3`: two
/// data structs, for capabilities 0-31 and 32-63).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Empties this thread's inheritable capability set (keeping effective and
/// permitted, which the uid change below clears) and its ambient set. Without
/// allocating (for the child after fork). False on failure, with errno set.
///
/// # Safety
/// Only async-signal-safe syscalls.
unsafe fn clear_inheritable_and_ambient() -> bool {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and data are valid for the kernel to read and write (two
    // data structs, as version 3 requires).
    if unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    } != 0
    {
        return false;
    }
    for d in &mut data {
        d.inheritable = 0;
    }
    // SAFETY: as above; capset only reads them.
    if unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    } != 0
    {
        return false;
    }
    // SAFETY: prctl with integer arguments. EINVAL: a kernel without ambient
    // capabilities (before 4.3), which has none to clear.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    // SAFETY: errno is thread-local and this thread's.
    ret == 0 || unsafe { *libc::__errno_location() } == libc::EINVAL
}

/// Drops every capability from this thread's bounding set (`PR_CAPBSET_DROP`
/// from 0 up to the first number the kernel does not know), so that nothing
/// exec'd later can gain one. Needs `CAP_SETPCAP`. Without allocating. False on
/// failure, with errno set.
///
/// # Safety
/// Only async-signal-safe syscalls.
unsafe fn empty_bounding_set() -> bool {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            // SAFETY: errno is thread-local and this thread's.
            return unsafe { *libc::__errno_location() } == libc::EINVAL && cap > 0;
        }
    }
    true
}

/// Writes `pid` as decimal digits followed by NUL at `dst`, without allocating.
///
/// # Safety
/// `dst` must have room for `PID_DIGITS + 1` bytes.
unsafe fn write_pid(dst: *mut u8, pid: libc::pid_t) {
    let mut digits = [0u8; PID_DIGITS];
    let mut n = pid as u64;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 || len == PID_DIGITS {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: i < len <= PID_DIGITS, within the caller's buffer.
        unsafe { *dst.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: len <= PID_DIGITS, and the buffer has PID_DIGITS + 1 bytes.
    unsafe { *dst.add(len) = 0 };
}

/// `pidfd_open(2)`: a handle that refers to this process and no later one with the
/// same pid. Called on our own unreaped child, so the pid cannot have been reused.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(2)`. ESRCH (already exited) is not an error for callers.
pub fn pidfd_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    // SAFETY: plain syscall; the fd is borrowed for its duration; NULL siginfo is allowed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exited with status {code}"),
            ExitStatus::Signaled(signal) => {
                let name = nix::sys::signal::Signal::try_from(*signal)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| signal.to_string());
                write!(f, "killed by {name}")
            }
        }
    }
}

/// Reaps the process behind `pidfd` if it has exited (`waitid(P_PIDFD, WNOHANG)`).
pub fn pidfd_try_wait(pidfd: BorrowedFd<'_>) -> io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo_t is plain data; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: P_PIDFD with an fd we borrow; info is a valid out-pointer.
    let ret = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid succeeded, so si_pid and si_status are initialised (zero if
    // nothing has exited yet, per WNOHANG).
    let (pid, status, code) = unsafe { (info.si_pid(), info.si_status(), info.si_code) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(if code == libc::CLD_EXITED {
        ExitStatus::Exited(status)
    } else {
        ExitStatus::Signaled(status)
    }))
}

/// The selector's `CONTROL` words, mapped into our memory.
///
/// The map is created with `BPF_F_MMAPABLE`, so its 8-byte values live in a page
/// the kernel lets us map shared. A store here is one aligned 8-byte atomic
/// store: the selector, which loads the word with one 8-byte load, sees the old
/// value or the new one, never a mix. (A `bpf_map_update_elem` copies the value
/// with memcpy, which promises no such thing.)
pub struct ControlWord {
    ptr: NonNull<AtomicU64>,
    len: usize,
    entries: usize,
}

// SAFETY: the mapping is process-wide shared memory accessed only atomically.
unsafe impl Send for ControlWord {}
// SAFETY: as for Send: every access is an atomic load or store of an AtomicU64.
unsafe impl Sync for ControlWord {}

impl ControlWord {
    /// Maps an mmapable array map of `entries` `u64` values (at most a page).
    pub fn map(map_fd: BorrowedFd<'_>, entries: usize) -> io::Result<ControlWord> {
        // SAFETY: sysconf has no memory effects.
        let len = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        assert!(entries * 8 <= len, "control array larger than a page");
        // SAFETY: a fresh shared mapping of an fd we borrow; the kernel keeps the
        // map alive while the mapping exists, independent of the fd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map_fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Element i of an array map with 8-byte values is at offset 8 * i of the
        // page-aligned mapping, so every AtomicU64 is aligned.
        let ptr =
            NonNull::new(ptr.cast::<AtomicU64>()).expect("mmap returned NULL without failing");
        Ok(ControlWord { ptr, len, entries })
    }

    fn word(&self, index: u32) -> &AtomicU64 {
        let index = index as usize;
        assert!(index < self.entries, "control index {index} out of range");
        // SAFETY: index < entries and entries * 8 <= len: inside the mapping, which
        // lives as long as self (see map()); aligned as explained there.
        unsafe { &*self.ptr.as_ptr().add(index) }
    }

    pub fn load(&self, index: u32) -> u64 {
        self.word(index).load(Ordering::SeqCst)
    }

    pub fn store(&self, index: u32, word: u64) {
        self.word(index).store(word, Ordering::SeqCst)
    }
}

impl Drop for ControlWord {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in map().
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

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

/// Waits for an RCU grace period: returns only after every CPU has left the RCU
/// read-side section it was in at the call, which includes every eBPF program run
/// (XDP and socket programs run inside one, with bottom halves disabled).
///
/// The XDP filter's ruleset switch uses it: after it returns, no packet can still be
/// using a ruleset slot the control word stopped pointing at before the call, so the
/// slot may be refilled. `membarrier(MEMBARRIER_CMD_GLOBAL)` is exactly
/// `synchronize_rcu()` in the kernel. It is refused on `nohz_full` kernels; the
/// caller then falls back to waiting (see `crate::xdp`).
pub fn synchronize_rcu() -> io::Result<()> {
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    // SAFETY: plain syscall with integer arguments and no memory effects on us.
    let ret = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

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

/// `bpf(BPF_MAP_DELETE_ELEM)` with a `u32` key: empties a slot of the selector's
/// `GENERATIONS` array-of-maps when its generation is retired, so the kernel frees
/// that generation's socket array at once. aya 0.14 has no delete for
/// `ArrayOfMaps`. A missing entry (ENOENT) is not an error.
pub fn bpf_map_delete_u32(map: BorrowedFd<'_>, key: u32) -> io::Result<()> {
    // The prefix of `union bpf_attr` used by the map element commands.
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: 0,
        flags: 0,
    };
    // SAFETY: attr is a valid, fully initialised bpf_attr prefix whose key pointer
    // refers to a live u32 for the duration of the call; the kernel only reads it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_DELETE_ELEM,
            &attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>(),
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOENT) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn pid_is_written_as_decimal() {
        let mut buf = [0xffu8; PID_DIGITS + 1];
        // SAFETY: the buffer has PID_DIGITS + 1 bytes.
        unsafe { write_pid(buf.as_mut_ptr(), 4_194_304) };
        assert_eq!(&buf[..8], b"4194304\0");
        // SAFETY: as above.
        unsafe { write_pid(buf.as_mut_ptr(), 7) };
        assert_eq!(&buf[..2], b"7\0");
    }

    #[test]
    fn spawn_reports_exec_errors_and_sets_listen_pid() {
        let mut missing = PreparedExec::new(
            "/nonexistent/worker",
            &["w".into()],
            &[],
            true,
            vec![],
            None,
            false,
        )
        .unwrap();
        let err = spawn_worker(&mut missing)
            .err()
            .expect("exec of a missing file fails");
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));

        // The child checks that LISTEN_PID is its own pid and exits 0 if so.
        let mut check = PreparedExec::new(
            "/bin/sh",
            &[
                "sh".into(),
                "-c".into(),
                "test \"$LISTEN_PID\" = \"$$\"".into(),
            ],
            &[],
            true,
            vec![],
            None,
            false,
        )
        .unwrap();
        let spawned = spawn_worker(&mut check).unwrap();
        let status = loop {
            if let Some(status) = pidfd_try_wait(spawned.pidfd.as_fd()).unwrap() {
                break status;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(status, ExitStatus::Exited(0));
    }

    /// Waits for the child behind `spawned` and returns how it ended.
    fn wait(spawned: &Spawned) -> ExitStatus {
        loop {
            if let Some(status) = pidfd_try_wait(spawned.pidfd.as_fd()).unwrap() {
                return status;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// An fd the supervisor inherited without close-on-exec (as from a careless
    /// launcher) does not reach the worker; its sockets do; `no_new_privs` is set.
    #[test]
    fn spawn_passes_only_the_sockets_and_sets_no_new_privs() {
        // Above the fds the child's sockets go to (3..), as a launcher's fd 7 is.
        let file = std::fs::File::open("/etc/hostname").unwrap();
        // SAFETY: fcntl with integer arguments; F_DUPFD gives no FD_CLOEXEC.
        let leaked = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD, 100) };
        assert!(leaked >= 100, "{}", io::Error::last_os_error());
        // SAFETY: a new fd that nothing else owns.
        let _leaked = unsafe { OwnedFd::from_raw_fd(leaked) };
        let socket = std::fs::File::open("/dev/null").unwrap();
        // Exit codes say which check failed.
        let script = "ls -l /proc/$$/fd/ | grep -q /etc/hostname && exit 3; \
             test \"$(readlink /proc/$$/fd/3)\" = /dev/null || exit 4; \
             grep -q '^NoNewPrivs:[[:space:]]*1$' /proc/$$/status || exit 5"
            .to_string();
        let mut check = PreparedExec::new(
            "/bin/sh",
            &["sh".into(), "-c".into(), script],
            &[],
            false,
            vec![socket.as_raw_fd()],
            None,
            true,
        )
        .unwrap();
        assert_eq!(
            wait(&spawn_worker(&mut check).unwrap()),
            ExitStatus::Exited(0)
        );
        // And without no_new_privs, the flag stays off.
        let mut check = PreparedExec::new(
            "/bin/sh",
            &[
                "sh".into(),
                "-c".into(),
                "grep -q '^NoNewPrivs:[[:space:]]*0$' /proc/$$/status".into(),
            ],
            &[],
            false,
            vec![],
            None,
            false,
        )
        .unwrap();
        assert_eq!(
            wait(&spawn_worker(&mut check).unwrap()),
            ExitStatus::Exited(0)
        );
    }

    /// A worker owed more sockets than any fixed-size table would hold still gets
    /// every one of them, in order, at 3.. (it used to get 128).
    #[test]
    fn spawn_places_every_fd_however_many() {
        const COUNT: usize = 200;
        let files: Vec<std::fs::File> = (0..COUNT)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let fds = files.iter().map(|f| f.as_raw_fd()).collect();
        let last = 3 + COUNT - 1;
        let mut check = PreparedExec::new(
            "/bin/sh",
            &[
                "sh".into(),
                "-c".into(),
                format!("test -e /proc/$$/fd/{last}"),
            ],
            &[],
            false,
            fds,
            None,
            false,
        )
        .unwrap();
        let spawned = spawn_worker(&mut check).unwrap();
        let status = loop {
            if let Some(status) = pidfd_try_wait(spawned.pidfd.as_fd()).unwrap() {
                break status;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(status, ExitStatus::Exited(0));
    }
}
